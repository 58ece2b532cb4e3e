//! `agora executor-wasm`: the Wasm executor process (internal: started by the agent, one per
//! framework per agent). It connects to the agent's socket and runs the Wasm tasks it is sent
//! until the agent shuts it down or goes away. Logs go to stderr (the agent writes them to a file).

use std::path::PathBuf;
use std::process::ExitCode;

use agora_executor_wasm::{serve, RuntimeConfig, ServeConfig};
use agora_sdk::units::parse_size;
use anyhow::Context as _;
use clap::Args;

#[derive(Args)]
pub struct ExecutorWasmCommand {
    /// The agent's Unix socket to connect to.
    #[arg(long)]
    socket: PathBuf,
    /// The id the agent gave this executor (sent back in the handshake).
    #[arg(long)]
    executor_id: String,
    /// Directory of the compiled-module cache (shared by the agent's executors).
    #[arg(long)]
    cache_dir: PathBuf,
    /// Tasks that run at once; more wait for a slot [default: 128].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max_tasks: Option<u32>,
    /// The largest memory limit a task may have, e.g. 512MiB (at most 4GiB) [default: 4GiB].
    #[arg(long, value_parser = parse_size)]
    max_task_mem: Option<u64>,
    /// Worker threads running the tasks.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    threads: u16,
}

impl ExecutorWasmCommand {
    /// Worker threads of the async runtime `main` builds for this command.
    pub fn worker_threads(&self) -> usize {
        usize::from(self.threads)
    }

    pub async fn execute(self) -> anyhow::Result<ExitCode> {
        let mut runtime = RuntimeConfig::new(&self.cache_dir);
        if let Some(n) = self.max_tasks {
            runtime.max_concurrent_tasks = n;
        }
        if let Some(bytes) = self.max_task_mem {
            runtime.max_task_memory_bytes = bytes;
        }
        tracing::info!(
            executor_id = %self.executor_id,
            socket = %self.socket.display(),
            max_tasks = runtime.max_concurrent_tasks,
            max_task_mem = runtime.max_task_memory_bytes,
            threads = self.threads,
            "Wasm executor starting"
        );
        let config = ServeConfig::new(self.socket, self.executor_id.clone(), runtime);
        serve(config).await.with_context(|| format!("Wasm executor {}", self.executor_id))?;
        tracing::info!(executor_id = %self.executor_id, "Wasm executor stopped");
        Ok(ExitCode::SUCCESS)
    }
}
