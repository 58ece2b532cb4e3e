//! `agora executor-command`: the command executor process (internal: started by the agent, one
//! per framework per agent). It is the parent of the framework's native tasks on the node: it
//! spawns each in its own process group, cgroup and sandbox as the task user, reaps it and
//! reports its exit. Logs go to stderr (the agent writes them to a file).

use std::path::PathBuf;
use std::process::ExitCode;

use agora_agent::cgroups::IsolationSpec;
use agora_agent::command_executor::{serve, CommandExecutorConfig};
use agora_agent::user::TaskUser;
use anyhow::Context as _;
use clap::Args;

#[derive(Args)]
pub struct ExecutorCommandCommand {
    /// The agent's Unix socket to connect to.
    #[arg(long)]
    socket: PathBuf,
    /// The id the agent gave this executor (sent back in the handshake).
    #[arg(long)]
    executor_id: String,
    /// The agent's cgroup root, as JSON (absent: tasks run without cgroups).
    #[arg(long, value_parser = parse_isolation)]
    isolation: Option<IsolationSpec>,
    /// The uid tasks run as (with --task-gid).
    #[arg(long, requires = "task_gid")]
    task_uid: Option<u32>,
    /// The gid tasks run as.
    #[arg(long, requires = "task_uid")]
    task_gid: Option<u32>,
    /// How long the tasks keep running while the agent is away, whole seconds; then they are
    /// killed [default: $AGORA_RECOVERY_TIMEOUT, else 900].
    #[arg(long, value_parser = super::executor_wasm::parse_recovery_timeout)]
    recovery_timeout: Option<std::time::Duration>,
}

fn parse_isolation(s: &str) -> Result<IsolationSpec, String> {
    serde_json::from_str(s).map_err(|e| format!("invalid --isolation: {e}"))
}

impl ExecutorCommandCommand {
    pub async fn execute(self) -> anyhow::Result<ExitCode> {
        let user = match (self.task_uid, self.task_gid) {
            (Some(uid), Some(gid)) if uid != 0 => Some(TaskUser { uid, gid }),
            (Some(_), Some(_)) => anyhow::bail!("--task-uid 0: tasks never run as root"),
            _ => None,
        };
        let recovery_timeout = super::executor_wasm::recovery_timeout(self.recovery_timeout)?;
        tracing::info!(executor_id = %self.executor_id, socket = %self.socket.display(), ?user,
            cgroups = self.isolation.is_some(), ?recovery_timeout, "command executor starting");
        let config = CommandExecutorConfig {
            socket: self.socket,
            executor_id: self.executor_id.clone(),
            isolation: self.isolation,
            user,
            recovery_timeout,
        };
        serve(config).await.with_context(|| format!("command executor {}", self.executor_id))?;
        tracing::info!(executor_id = %self.executor_id, "command executor stopped");
        Ok(ExitCode::SUCCESS)
    }
}
