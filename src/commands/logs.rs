//! `agora logs TASK [--stderr] [-f]`: a task id, a unique prefix of one, or a unique task name.

use std::process::ExitCode;

use agora_sdk::client::OperatorClient;
use agora_sdk::proto::OutputStream;
use clap::Args;

use super::resolve::resolve;
use super::ClusterArgs;

#[derive(Args)]
pub struct LogsCommand {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Task id, a unique prefix of one, or a unique task name.
    task: String,
    /// Print stderr instead of stdout.
    #[arg(long)]
    stderr: bool,
    /// Keep printing output as the task writes it, until it ends.
    #[arg(short = 'f', long)]
    follow: bool,
}

impl LogsCommand {
    pub async fn execute(self) -> anyhow::Result<ExitCode> {
        let cfg = self.cluster.resolve()?;
        let mut client = OperatorClient::connect(&cfg).await?;
        let tasks = client.tasks().await?;
        let id = resolve(&tasks, &self.task, true)?.id.clone();
        let which = if self.stderr { OutputStream::Stderr } else { OutputStream::Stdout };
        let mut r = client.output(&id, which, self.follow).await?;
        tokio::io::copy(&mut r, &mut tokio::io::stdout()).await?;
        client.close();
        Ok(ExitCode::SUCCESS)
    }
}
