//! `agora executor-wasm`: the Wasm executor process (internal: started by the agent, one per
//! framework per agent). It connects to the agent's socket and runs the Wasm tasks it is sent
//! until the agent shuts it down or goes away. Logs go to stderr (the agent writes them to a file).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

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
    /// How long the tasks keep running while the agent is away, whole seconds; then they are
    /// killed [default: $AGORA_RECOVERY_TIMEOUT, else 900].
    #[arg(long, value_parser = parse_recovery_timeout)]
    recovery_timeout: Option<Duration>,
}

/// `--recovery-timeout` of the built-in executors.
pub fn parse_recovery_timeout(s: &str) -> Result<Duration, String> {
    agora_sdk::executor_link::parse_recovery_timeout(s).map_err(|e| e.to_string())
}

/// The recovery timeout a built-in executor uses: its flag, else
/// `AGORA_RECOVERY_TIMEOUT`, else the default (15 minutes).
pub fn recovery_timeout(flag: Option<Duration>) -> anyhow::Result<Duration> {
    match flag {
        Some(d) => Ok(d),
        None => agora_sdk::executor_link::recovery_timeout_from_env()
            .with_context(|| format!("invalid {}", agora_sdk::executor_proto::ENV_RECOVERY_TIMEOUT)),
    }
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
        let recovery_timeout = recovery_timeout(self.recovery_timeout)?;
        tracing::info!(
            executor_id = %self.executor_id,
            socket = %self.socket.display(),
            max_tasks = runtime.max_concurrent_tasks,
            max_task_mem = runtime.max_task_memory_bytes,
            threads = self.threads,
            ?recovery_timeout,
            "Wasm executor starting"
        );
        let mut config = ServeConfig::new(self.socket, self.executor_id.clone(), runtime);
        config.recovery_timeout = recovery_timeout;
        serve(config).await.with_context(|| format!("Wasm executor {}", self.executor_id))?;
        tracing::info!(executor_id = %self.executor_id, "Wasm executor stopped");
        Ok(ExitCode::SUCCESS)
    }
}
