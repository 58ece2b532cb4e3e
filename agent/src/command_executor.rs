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
//! switching users need it; it runs no user code itself. `Shutdown` kills every task (each
//! with its grace period), reports what it can and exits.
//!
//! It outlives its agent ([`agora_sdk::executor_link`]): updates are numbered and kept until the
//! agent acknowledges them. When the socket closes without `Shutdown`, the tasks keep running
//! and their ends are kept while the executor connects again, with the tasks it still runs, for
//! at most the recovery timeout; then it sends what the agent has not acknowledged and carries
//! on. If the agent does not come back in time, or refuses the reconnecting executor, the
//! executor kills every task as on `Shutdown` and exits with an error.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agora_sdk::executor_link::{
    reconnecting, Connection, Link, OutboxLimits, Received, ReconnectError, Reconnecting,
};
use agora_sdk::executor_proto::{handshake, AgentToExecutor, CommandLaunch, ExecutorUpdate, HandshakeError};
use agora_sdk::frame::FrameError;
use agora_sdk::proto::{FrameworkId, Reason, TaskId, TaskInfo, TaskKind, TaskState};
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
    /// How long the tasks keep running while the agent is away (see the module docs).
    pub recovery_timeout: Duration,
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
    /// The agent went away and did not come back in time, or came back without knowing this
    /// executor: the tasks were killed.
    #[error("{0}; the tasks were killed")]
    Recovery(#[from] ReconnectError),
}

/// Connects to the agent and runs its command tasks until `Shutdown` (or until the agent, gone,
/// does not come back within the recovery timeout).
pub async fn serve(config: CommandExecutorConfig) -> Result<(), CommandExecutorError> {
    let (reader, writer, welcomed) = handshake(&config.socket, &config.executor_id, None).await?;
    let framework_id = welcomed.framework_id;
    tracing::info!(%framework_id, executor_id = %config.executor_id, "command executor welcomed");
    let isolator = config
        .isolation
        .as_ref()
        .map(|spec| Isolator::attach_pooled(spec, FRESH_CGROUPS))
        .unwrap_or_else(Isolator::none);
    let (events_tx, mut events) = mpsc::unbounded_channel::<(TaskKey, TaskEvent)>();
    let link = Link::new(OutboxLimits::default());
    let mut conn = Some(Connection::new(&link, reader, writer));
    let mut away: Option<Reconnecting> = None;
    let mut tasks: HashMap<TaskId, TaskHandle> = HashMap::new();
    let ctx = Ctx { framework_id, isolator, user: config.user };
    let mut batch = Vec::with_capacity(64);
    let result = loop {
        tokio::select! {
            received = Connection::next_opt(&mut conn, &link) => match received {
                Received::Message(AgentToExecutor::LaunchCommands(list)) => {
                    for launch in list {
                        let task_id = launch.task_id.clone();
                        if tasks.contains_key(&task_id) {
                            let _ = link.push(failed(task_id, "task id already running in this executor"));
                            continue;
                        }
                        link.launched(task_id.clone());
                        let handle = tasks::launch(ctx.spec(launch), events_tx.clone());
                        tasks.insert(task_id, handle);
                    }
                }
                Received::Message(AgentToExecutor::Kill { task_id }) => {
                    if let Some(h) = tasks.get(&task_id) {
                        h.kill();
                    }
                }
                Received::Message(AgentToExecutor::Shutdown) => break Ok(()),
                Received::Message(other) => break Err(CommandExecutorError::Unexpected(other.name())),
                Received::Malformed(e) => break Err(CommandExecutorError::Malformed(e)),
                Received::Lost(error) => {
                    tracing::info!(live = tasks.len(), error = ?error.map(|e| e.to_string()),
                        timeout = ?config.recovery_timeout,
                        "lost the agent: the tasks keep running while the executor connects again");
                    conn = None;
                    away = Some(link.reconnect(config.socket.clone(), config.executor_id.clone(), config.recovery_timeout));
                }
            },
            again = reconnecting(&mut away) => match again {
                Ok((reader, writer, _)) => conn = Some(Connection::new(&link, reader, writer)),
                Err(e) => {
                    tracing::error!(error = %e, live = tasks.len(), "killing every task and exiting");
                    break Err(e.into());
                }
            },
            // At the outbox's bound, task events wait here until the agent acknowledges.
            n = events.recv_many(&mut batch, 1024), if link.has_room() => {
                if n == 0 {
                    continue;
                }
                for (key, ev) in batch.drain(..) {
                    if let Some(u) = to_update(&key, ev, &mut tasks) {
                        let _ = link.push(u);
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
                    let _ = link.push(u);
                }
            }
            _ => break,
        }
    }
    // The used groups' removals finish and the fresh groups go while the last updates are sent.
    let isolator = ctx.isolator.clone();
    let cleanup = tokio::task::spawn_blocking(move || isolator.shutdown());
    match conn {
        Some(conn) => conn.finish(&link, FINAL_FLUSH).await,
        None => link.close(),
    }
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
        // The agent resolved the task's own user (never root): with this process's rights to
        // switch users, run it as that one.
        let user = match (l.run_as, self.user) {
            (Some((uid, gid)), Some(_)) if uid != 0 => Some(TaskUser { uid, gid }),
            _ => self.user,
        };
        let executor_dir = l.checkpoint.parent().map(Path::to_path_buf).unwrap_or_default();
        LaunchSpec {
            framework_id: self.framework_id.clone(),
            task: TaskInfo {
                name: l.task_id.to_string(),
                task_id: l.task_id,
                resources: l.resources,
                kind: TaskKind::Command(l.command),
                kill_grace: Some(l.kill_grace),
                user: None,
            },
            executor_dir,
            run_dir: l.sandbox,
            kill_grace: l.kill_grace,
            isolator: self.isolator.clone(),
            user,
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
            reason: Reason::TaskStarted,
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
        reason: Reason::LaunchFailed,
        message: message.into(),
        exit_code: None,
        signal: None,
        pid: None,
        usage: None,
    }
}
