//! `agora files TASK [PATH] [--cat]` and `agora cp TASK:PATH LOCAL`: a task's sandbox (its
//! output files, what it wrote, a Wasm task's `--dir` preopens), relayed by the master from the
//! task's agent with the authorization of `agora logs` (a framework its own tasks, an operator
//! any). Like Mesos's sandbox browser and Nomad's `alloc fs`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use agora_sdk::client::OperatorClient;
use agora_sdk::proto::{FileKind, TaskId};
use clap::Args;
use tokio::io::AsyncWriteExt;

use super::list::Format;
use super::ClusterArgs;

#[derive(Args)]
pub struct FilesCommand {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Output format of a listing.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Print the file rather than list a directory.
    #[arg(long)]
    cat: bool,
    /// Task id.
    task: String,
    /// A path in the task's sandbox (default: the sandbox itself).
    #[arg(default_value = "")]
    path: String,
}

impl FilesCommand {
    pub async fn execute(self) -> anyhow::Result<ExitCode> {
        let client = OperatorClient::connect(&self.cluster.resolve()?).await?;
        let task = TaskId(self.task.clone());
        if self.cat {
            let (size, mut body) = client.read_file(&task, &self.path).await?;
            let mut out = tokio::io::stdout();
            let n = tokio::io::copy(&mut body, &mut out).await?;
            out.flush().await?;
            client.close();
            if n != size {
                anyhow::bail!(
                    "{}: got {n} of {size} bytes (the file changed or the agent went away)",
                    self.path
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        let (entries, truncated) = client.list_files(&task, &self.path).await?;
        client.close();
        match self.format {
            Format::Json => {
                let v: Vec<serde_json::Value> = entries
                    .iter()
                    .map(|e| {
                        serde_json::json!({
                            "name": e.name, "kind": e.kind.as_str(), "size": e.size, "modified_ms": e.modified_ms,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
            Format::Table => {
                println!("{:<6} {:>12}  NAME", "KIND", "SIZE");
                for e in &entries {
                    let name = if e.kind == FileKind::Dir { format!("{}/", e.name) } else { e.name.clone() };
                    println!("{:<6} {:>12}  {name}", e.kind.as_str(), e.size);
                }
            }
        }
        if truncated {
            eprintln!("agora: the listing was cut at {} entries", entries.len());
        }
        Ok(ExitCode::SUCCESS)
    }
}

#[derive(Args)]
pub struct CpCommand {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// TASK:PATH, a file of the task's sandbox.
    source: String,
    /// Where to write it: a file, or a directory to put it in.
    dest: PathBuf,
}

impl CpCommand {
    pub async fn execute(self) -> anyhow::Result<ExitCode> {
        let Some((task, path)) = self.source.split_once(':').filter(|(t, p)| !t.is_empty() && !p.is_empty())
        else {
            anyhow::bail!("`{}`: expected TASK:PATH (a file of the task's sandbox)", self.source);
        };
        let client = OperatorClient::connect(&self.cluster.resolve()?).await?;
        let (size, mut body) = client.read_file(&TaskId(task.to_string()), path).await?;
        let dest = if self.dest.is_dir() {
            let name =
                Path::new(path).file_name().ok_or_else(|| anyhow::anyhow!("`{path}` names no file"))?;
            self.dest.join(name)
        } else {
            self.dest.clone()
        };
        // Into a temporary file beside the destination, renamed once every byte arrived.
        let dir = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let tmp = tempfile::NamedTempFile::new_in(dir)
            .map_err(|e| anyhow::anyhow!("cannot write in {}: {e}", dir.display()))?;
        let mut file = tokio::fs::File::from_std(tmp.reopen()?);
        let n = tokio::io::copy(&mut body, &mut file).await?;
        file.flush().await?;
        client.close();
        if n != size {
            anyhow::bail!(
                "{path}: got {n} of {size} bytes (the file changed or the agent went away); nothing written"
            );
        }
        tmp.persist(&dest).map_err(|e| anyhow::anyhow!("cannot write {}: {}", dest.display(), e.error))?;
        eprintln!("{task}:{path} → {} ({size} bytes)", dest.display());
        Ok(ExitCode::SUCCESS)
    }
}
