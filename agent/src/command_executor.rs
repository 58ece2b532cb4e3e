//! The command executor: the `agora executor-command` process, one per framework per agent,
//! the parent of that framework's native tasks on the node (DESIGN §6).
//!
//! It connects to the agent's Unix socket, says `Hello`, waits for `Welcome`, then runs every
//! [`CommandLaunch`] it is sent with the task supervisor of [`crate::tasks`]: the sandbox (0700,
//! owned by the task user), the task's own cgroup (created under the agent's root, described by
//! [`IsolationSpec`] on the command line), the process spawned in its own process group, joining
//! its cgroup and dropping to the task user between `clone` and `exec`, then waited for, killed
//! on request (SIGTERM, SIGKILL after the grace period), reaped, and its cgroup's accounting read
//! for the reason. Each task's RUNNING (with its pid) and terminal update go back to the agent
//! in `Updates` frames, batched. The agent itself spawns no task.
//!
//! The executor runs as the agent's user (root where tasks are isolated): creating cgroups and
//! switching users need it; it runs no user code itself. `Shutdown`, or the agent's socket
//! closing, kills every task (each with its grace period), reports what it can and exits.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agora_sdk::executor_proto::{
    handshake, AgentToExecutor, CommandLaunch, ExecutorMessage, ExecutorUpdate, HandshakeError,
};
use agora_sdk::frame::{chunk_by_size, FrameError, FrameWriter, LIST_BUDGET};
use agora_sdk::proto::{FrameworkId, TaskId, TaskInfo, TaskKind, TaskState};
use tokio::sync::mpsc;

use crate::cgroups::{IsolationSpec, Isolator};
use crate::tasks::{self, LaunchSpec, TaskEvent, TaskHandle, TaskKey};
use crate::user::TaskUser;

/// How long the last updates may take to reach the agent when the executor stops.
const FINAL_FLUSH: Duration = Duration::from_secs(5);

/// Task cgroups created ahead of time (v1; see [`crate::cgroups::pool`]): enough for a burst of
/// launches in one frame to find most groups made, few enough to cost little kernel memory.
const FRESH_CGROUPS: usize = 16;

/// How [`serve`] runs.
#[derive(Clone, Debug)]
pub struct CommandExecutorConfig {
    /// The agent's socket.
    pub socket: PathBuf,
    /// The id the agent gave this executor (sent back in `Hello`).
    pub executor_id: String,
    /// The agent's cgroup root, when tasks are isolated.
    pub isolation: Option<IsolationSpec>,
    /// The user tasks run as (`None`: this process's own).
    pub user: Option<TaskUser>,
}

/// Why the command executor stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum CommandExecutorError {
    /// The handshake with the agent failed.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// The agent sent something this executor does not take.
    #[error("unexpected `{0}` from the agent")]
    Unexpected(&'static str),
    /// A frame from the agent does not decode.
    #[error("malformed frame from the agent: {0}")]
    Malformed(FrameError),
}

/// Connects to the agent and runs its command tasks until `Shutdown` or the socket closes.
pub async fn serve(config: CommandExecutorConfig) -> Result<(), CommandExecutorError> {
    let (mut reader, writer, welcomed) = handshake(&config.socket, &config.executor_id, None).await?;
    let framework_id = welcomed.framework_id;
    tracing::info!(%framework_id, executor_id = %config.executor_id, "command executor welcomed");
    let isolator = config
        .isolation
        .as_ref()
        .map(|spec| Isolator::attach_pooled(spec, FRESH_CGROUPS))
        .unwrap_or_else(Isolator::none);
    let (events_tx, mut events) = mpsc::unbounded_channel::<(TaskKey, TaskEvent)>();
    let (updates_tx, updates_rx) = mpsc::unbounded_channel::<ExecutorUpdate>();
    let writer_task = tokio::spawn(write_updates(writer, updates_rx));
    let mut tasks: HashMap<TaskId, TaskHandle> = HashMap::new();
    let ctx = Ctx { framework_id, isolator, user: config.user };
    let mut batch = Vec::with_capacity(64);
    let result = loop {
        tokio::select! {
            frame = reader.recv::<AgentToExecutor>() => match frame {
                Ok(Some(AgentToExecutor::LaunchCommands(list))) => {
                    for launch in list {
                        let task_id = launch.task_id.clone();
                        if tasks.contains_key(&task_id) {
                            let _ = updates_tx.send(failed(task_id, "task id already running in this executor"));
                            continue;
                        }
                        let handle = tasks::launch(ctx.spec(launch), events_tx.clone());
                        tasks.insert(task_id, handle);
                    }
                }
                Ok(Some(AgentToExecutor::Kill { task_id })) => {
                    if let Some(h) = tasks.get(&task_id) {
                        h.kill();
                    }
                }
                Ok(Some(AgentToExecutor::Shutdown)) => break Ok(()),
                Ok(None) => {
                    tracing::info!(live = tasks.len(), "the agent closed the socket: killing the tasks");
                    break Ok(());
                }
                Ok(Some(other)) => break Err(CommandExecutorError::Unexpected(other.name())),
                Err(e @ (FrameError::Malformed(_) | FrameError::TooLarge { .. })) => {
                    break Err(CommandExecutorError::Malformed(e))
                }
                Err(e) => {
                    tracing::info!(error = %e, "the agent's socket failed: killing the tasks");
                    break Ok(());
                }
            },
            n = events.recv_many(&mut batch, 1024) => {
                if n == 0 {
                    continue;
                }
                for (key, ev) in batch.drain(..) {
                    if let Some(u) = to_update(&key, ev, &mut tasks) {
                        let _ = updates_tx.send(u);
                    }
                }
            }
        }
    };
    // Stop: kill what runs and wait for the supervisors (each bounded by its grace period).
    for h in tasks.values() {
        h.kill();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !tasks.is_empty() {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some((key, ev))) => {
                if let Some(u) = to_update(&key, ev, &mut tasks) {
                    let _ = updates_tx.send(u);
                }
            }
            _ => break,
        }
    }
    drop(updates_tx);
    // The used groups' removals finish and the fresh groups go while the last updates are sent.
    let isolator = ctx.isolator.clone();
    let cleanup = tokio::task::spawn_blocking(move || isolator.shutdown());
    let _ = tokio::time::timeout(FINAL_FLUSH, writer_task).await;
    let _ = cleanup.await;
    result
}

/// What every launch shares.
struct Ctx {
    framework_id: FrameworkId,
    isolator: Isolator,
    user: Option<TaskUser>,
}

impl Ctx {
    fn spec(&self, l: CommandLaunch) -> LaunchSpec {
        let executor_dir = l.checkpoint.parent().map(Path::to_path_buf).unwrap_or_default();
        LaunchSpec {
            framework_id: self.framework_id.clone(),
            task: TaskInfo {
                name: l.task_id.to_string(),
                task_id: l.task_id,
                resources: l.resources,
                kind: TaskKind::Command(l.command),
                kill_grace: Some(l.kill_grace),
            },
            executor_dir,
            run_dir: l.sandbox,
            kill_grace: l.kill_grace,
            isolator: self.isolator.clone(),
            user: self.user,
        }
    }
}

/// A supervisor's event as an update for the agent (KILLING is the agent's to report).
fn to_update(
    key: &TaskKey,
    ev: TaskEvent,
    tasks: &mut HashMap<TaskId, TaskHandle>,
) -> Option<ExecutorUpdate> {
    let task_id = key.task_id.clone();
    match ev {
        TaskEvent::Running { pid, .. } => Some(ExecutorUpdate {
            seq: 0,
            task_id,
            state: TaskState::Running,
            reason: "task started".into(),
            message: format!("process {pid} started"),
            exit_code: None,
            signal: None,
            pid: Some(pid),
            usage: None,
        }),
        TaskEvent::Killing => None,
        TaskEvent::Terminated(t) => {
            tasks.remove(&key.task_id);
            Some(ExecutorUpdate {
                seq: 0,
                task_id,
                state: t.state,
                reason: t.reason,
                message: t.message,
                exit_code: t.exit_code,
                signal: t.signal,
                pid: None,
                usage: t.usage,
            })
        }
    }
}

fn failed(task_id: TaskId, message: &str) -> ExecutorUpdate {
    ExecutorUpdate {
        seq: 0,
        task_id,
        state: TaskState::Failed,
        reason: "launch failed".into(),
        message: message.into(),
        exit_code: None,
        signal: None,
        pid: None,
        usage: None,
    }
}

/// Drains queued updates into as few `Updates` frames as fit.
async fn write_updates(
    mut writer: FrameWriter<tokio::net::unix::OwnedWriteHalf>,
    mut rx: mpsc::UnboundedReceiver<ExecutorUpdate>,
) -> Result<(), FrameError> {
    let mut batch = Vec::with_capacity(256);
    while rx.recv_many(&mut batch, 4096).await > 0 {
        for frame in chunk_by_size(std::mem::take(&mut batch), LIST_BUDGET) {
            writer.feed(&ExecutorMessage::Updates(frame)).await?;
        }
        writer.flush().await?;
    }
    Ok(())
}
