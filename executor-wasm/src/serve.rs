//! The executor side of the agent ↔ executor protocol ([`agora_sdk::executor`]): what the
//! `agora executor-wasm` process runs.
//!
//! [`serve`] connects to the agent's Unix socket, says `Hello`, waits for `Welcome`, then runs
//! every [`WasmLaunch`] it is sent as a tokio task on one [`WasmRuntime`] and reports
//! [`ExecutorUpdate`]s: RUNNING (`task started`) once the module is instantiated, then FINISHED,
//! FAILED or KILLED. A task that cannot be started ends FAILED `launch failed` without RUNNING.
//!
//! One loop owns the task table; it reads the agent's frames and the tasks' ends, so a kill
//! racing a task's exit reports whichever really happened, once. A single writer task drains
//! whatever updates are queued into as few `Updates` frames as fit (each at most
//! [`MAX_FRAME`]), so updates batch naturally under load and stay in order per task.
//!
//! Modules: the first launch of a digest reads `module_path`, checks its sha256 and loads it
//! (memory, disk cache, or a compile on the blocking pool); concurrent launches of the same
//! digest wait for that one load (a per-digest [`OnceCell`]) and then refer to the module by
//! digest. A thousand launches of a new module in one batch compile it once.
//!
//! Concurrency: at most [`RuntimeConfig::max_concurrent_tasks`] tasks are set up (sandbox,
//! output files) and run at once; the others wait for a slot in launch order, holding no file
//! descriptors.
//!
//! `Shutdown` kills what still runs and returns `Ok`; a malformed frame from the agent returns
//! [`ServeError::Malformed`].
//!
//! The executor outlives its agent ([`agora_sdk::executor_link`]): updates are numbered and
//! kept until the agent acknowledges them. When the socket closes without `Shutdown`, the tasks
//! keep running in wasmtime and their updates are kept while the executor connects again, with
//! the tasks it still runs, for at most [`ServeConfig::recovery_timeout`]; then it sends what
//! the agent has not acknowledged and carries on. If the agent does not come back in time or
//! refuses the reconnecting executor, every task is cancelled and [`serve`] returns
//! [`ServeError::Recovery`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agora_sdk::executor_link::{
    reconnecting, Connection, Link, OutboxLimits, Received, ReconnectError, Reconnecting,
};
use agora_sdk::executor_proto::{AgentToExecutor, ExecutorUpdate, WasmLaunch, DEFAULT_RECOVERY_TIMEOUT};
use agora_sdk::frame::FrameError;
use agora_sdk::proto::{Reason, TaskId, TaskState, Usage, WireError};
use tokio::sync::{mpsc, OnceCell, Semaphore};
use tokio::task::{AbortHandle, JoinError, JoinSet};
use tracing::Instrument as _;

use crate::digest::Digest;
use crate::error::WasmError;
use crate::runtime::{RuntimeConfig, WasmRuntime};
use crate::task::{FailureReason, ModuleSource, Preopen, TaskEnd, TaskOutcome, WasmTaskSpec};

/// Longest `message` put in an update (longer ones are cut), so that one update always fits a
/// frame with room for many others.
const MAX_MESSAGE_BYTES: usize = 16 << 10;
/// Task ids remembered after their task ended, to refuse a relaunch under the same id.
const RECENT_IDS: usize = 100_000;
/// How long the last updates may take to reach the agent when the executor stops.
const FINAL_FLUSH: Duration = Duration::from_secs(5);

/// How [`serve`] runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The agent's Unix socket.
    pub socket: PathBuf,
    /// The id the agent gave this executor (sent back in `Hello`).
    pub executor_id: String,
    /// The Wasm runtime every task runs on.
    pub runtime: RuntimeConfig,
    /// How long the tasks keep running while the agent is away
    /// ([`DEFAULT_RECOVERY_TIMEOUT`] by default; see the module docs).
    pub recovery_timeout: Duration,
}

impl ServeConfig {
    /// A configuration with the default recovery timeout.
    pub fn new(socket: impl Into<PathBuf>, executor_id: impl Into<String>, runtime: RuntimeConfig) -> Self {
        Self {
            socket: socket.into(),
            executor_id: executor_id.into(),
            runtime,
            recovery_timeout: DEFAULT_RECOVERY_TIMEOUT,
        }
    }
}

/// Why [`serve`] stopped with an error (the process then exits non-zero).
///
/// Each message includes its cause (the variants do not chain it as a `source`, so that
/// `{:#}` does not print it twice).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The Wasm runtime could not be built.
    #[error("cannot start the Wasm runtime: {0}")]
    Runtime(WasmError),
    /// The agent's socket could not be reached.
    #[error("cannot connect to the agent at {path}: {error}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        error: io::Error,
    },
    /// Sending `Hello` or reading the agent's answer failed.
    #[error("handshake with the agent failed: {0}")]
    Handshake(FrameError),
    /// The agent closed the socket before answering `Hello`.
    #[error("the agent closed the socket before answering Hello")]
    NoWelcome,
    /// The agent refused this executor.
    #[error("the agent refused this executor: {}", .0.message)]
    Refused(WireError),
    /// The agent sent a frame that does not decode (or is too large).
    #[error("malformed frame from the agent: {0}")]
    Malformed(FrameError),
    /// The agent sent a message out of order.
    #[error("unexpected `{got}` from the agent {when}")]
    Unexpected {
        /// The message's name.
        got: &'static str,
        /// Where in the session it came.
        when: &'static str,
    },
    /// The agent went away and did not come back in time, or came back without knowing this
    /// executor: the tasks were cancelled.
    #[error("{0}; the tasks were cancelled")]
    Recovery(ReconnectError),
}

impl From<agora_sdk::executor_proto::HandshakeError> for ServeError {
    fn from(e: agora_sdk::executor_proto::HandshakeError) -> Self {
        use agora_sdk::executor_proto::HandshakeError as H;
        match e {
            H::Connect { path, error } => ServeError::Connect { path, error },
            H::Io(e) => ServeError::Handshake(e),
            H::Closed => ServeError::NoWelcome,
            H::Refused(e) => ServeError::Refused(e),
            H::Unexpected(got) => ServeError::Unexpected { got, when: "before Welcome" },
            H::Malformed(e) => ServeError::Malformed(e),
        }
    }
}

/// Runs the executor: builds the runtime from `config.runtime`, connects to the agent and
/// serves it until `Shutdown` (or until the agent, gone, does not come back in time).
pub async fn serve(config: ServeConfig) -> Result<(), ServeError> {
    let runtime = WasmRuntime::new(config.runtime.clone()).map_err(ServeError::Runtime)?;
    serve_with_runtime(runtime, &config.socket, &config.executor_id, config.recovery_timeout).await
}

/// [`serve`] on an existing runtime (whose cache counters the caller can then read).
pub async fn serve_with_runtime(
    runtime: WasmRuntime,
    socket: &Path,
    executor_id: &str,
    recovery_timeout: Duration,
) -> Result<(), ServeError> {
    let (reader, writer, welcomed) = agora_sdk::executor_proto::handshake(socket, executor_id, None).await?;
    let framework_id = welcomed.framework_id;
    let span = tracing::info_span!("executor", executor_id, framework_id = %framework_id);
    tracing::info!(parent: &span, "welcomed by the agent");

    let max_tasks = runtime.config().max_concurrent_tasks as usize;
    // Each task makes at most two updates; queued launches wait for a slot without making any.
    let link = Link::new(OutboxLimits::for_tasks(max_tasks, 4));
    let mut conn = Some(Connection::new(&link, reader, writer));
    let mut away: Option<Reconnecting> = None;
    let (updates, started) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(max_tasks));
    let mut tasks = Tasks {
        runtime,
        gate,
        modules: HashMap::new(),
        live: HashMap::new(),
        by_join: HashMap::new(),
        running: JoinSet::new(),
        recent: RecentIds::default(),
        updates,
        started,
        link: link.clone(),
        killed_message: "killed by the agent",
        span: span.clone(),
    };

    let result = async {
        loop {
            tokio::select! {
                received = Connection::next_opt(&mut conn, &link) => match received {
                    Received::Message(AgentToExecutor::Launch(launches)) => {
                        tracing::debug!(tasks = launches.len(), "launch");
                        for launch in launches {
                            tasks.launch(launch);
                        }
                    }
                    Received::Message(AgentToExecutor::Kill { task_id }) => tasks.kill(&task_id),
                    Received::Message(AgentToExecutor::Shutdown) => {
                        tracing::info!(live = tasks.live.len(), "shutdown requested by the agent");
                        return (Ok(()), "executor shut down");
                    }
                    Received::Message(AgentToExecutor::Refused(error)) => {
                        tracing::error!(%error, "the agent refused this executor");
                        return (Err(ServeError::Refused(error)), "executor refused by the agent");
                    }
                    Received::Message(other @ (AgentToExecutor::LaunchCommands(_) | AgentToExecutor::LaunchTasks(_)
                        | AgentToExecutor::FrameworkMessage(_))) => {
                        tracing::error!("the agent sent the Wasm executor a message for another kind of executor");
                        let got = other.name();
                        return (Err(ServeError::Unexpected { got, when: "after Welcome" }), "protocol error");
                    }
                    // `Acked` never comes here: the connection hands it to the link.
                    Received::Message(other @ (AgentToExecutor::Welcome { .. } | AgentToExecutor::Acked { .. })) => {
                        tracing::error!(message = other.name(), "unexpected message from the agent after Welcome");
                        let got = other.name();
                        return (Err(ServeError::Unexpected { got, when: "after Welcome" }), "protocol error");
                    }
                    Received::Malformed(error) => {
                        tracing::error!(%error, "malformed frame from the agent");
                        return (Err(ServeError::Malformed(error)), "protocol error");
                    }
                    Received::Lost(error) => {
                        tracing::info!(live = tasks.live.len(), error = ?error.map(|e| e.to_string()),
                            timeout = ?recovery_timeout,
                            "lost the agent: the tasks keep running while the executor connects again");
                        conn = None;
                        away = Some(link.reconnect(socket.to_path_buf(), executor_id.to_string(), recovery_timeout));
                    }
                },
                again = reconnecting(&mut away) => match again {
                    Ok((reader, writer, _)) => conn = Some(Connection::new(&link, reader, writer)),
                    Err(error) => {
                        tracing::error!(%error, live = tasks.live.len(), "cancelling every task and exiting");
                        let why = match error {
                            ReconnectError::TimedOut(_) => "the agent did not come back in time",
                            ReconnectError::Refused(_) => "the agent did not know the executor after its restart",
                        };
                        return (Err(ServeError::Recovery(error)), why);
                    }
                },
                // At the outbox's bound, task events wait until the agent acknowledges.
                Some(update) = tasks.started.recv(), if link.has_room() => {
                    let _ = link.push(update);
                }
                Some(joined) = tasks.running.join_next_with_id(), if !tasks.running.is_empty() && link.has_room() => {
                    tasks.ended(joined);
                }
            }
        }
    }
    .instrument(span.clone())
    .await;

    let (result, why) = result;
    tasks.killed_message = why;
    tasks.stop_all().instrument(span.clone()).await;
    match conn {
        Some(conn) => conn.finish(&link, FINAL_FLUSH).instrument(span.clone()).await,
        None => link.close(),
    }
    result
}

/// The task table, owned by the serve loop.
struct Tasks {
    runtime: WasmRuntime,
    /// Slots for tasks being set up or running.
    gate: Arc<Semaphore>,
    /// One load per digest; later launches wait for it.
    modules: HashMap<Digest, Arc<OnceCell<Digest>>>,
    live: HashMap<TaskId, AbortHandle>,
    by_join: HashMap<tokio::task::Id, TaskId>,
    running: JoinSet<TaskOutcome>,
    recent: RecentIds,
    /// RUNNING updates from the tasks, into `started`.
    updates: mpsc::UnboundedSender<ExecutorUpdate>,
    started: mpsc::UnboundedReceiver<ExecutorUpdate>,
    /// Numbers, keeps and sends the updates.
    link: Link,
    /// The message of KILLED updates.
    killed_message: &'static str,
    span: tracing::Span,
}

impl Tasks {
    fn send(&self, update: ExecutorUpdate) {
        // Closed only once the loop has ended.
        let _ = self.link.push(update);
    }

    fn launch(&mut self, launch: WasmLaunch) {
        let task_id = launch.task_id.clone();
        if self.live.contains_key(&task_id) {
            tracing::warn!(%task_id, "launch of a task id that is already running; ignored");
            return;
        }
        if self.recent.contains(&task_id) {
            tracing::warn!(%task_id, "launch of a task id this executor already ran; refused");
            let message = format!("task id {task_id} was already used by this executor");
            self.send(launch_failed(task_id, message));
            return;
        }
        let max = self.runtime.config().max_task_memory_bytes;
        let checked = crate::digest::parse(&launch.digest).and_then(|digest| {
            if launch.mem_bytes > max {
                Err(WasmError::MemoryLimitTooLarge { requested: launch.mem_bytes, max })
            } else {
                Ok(digest)
            }
        });
        let digest = match checked {
            Ok(digest) => digest,
            Err(error) => {
                tracing::info!(%task_id, %error, "launch failed");
                self.recent.insert(task_id.clone());
                self.send(launch_failed(task_id, error.to_string()));
                return;
            }
        };
        let module = self.modules.entry(digest.clone()).or_default().clone();
        let span = tracing::info_span!(parent: &self.span, "task", task_id = %task_id);
        let run =
            run_launch(self.runtime.clone(), self.gate.clone(), module, digest, launch, self.updates.clone());
        let handle = self.running.spawn(run.instrument(span));
        self.link.launched(task_id.clone());
        self.by_join.insert(handle.id(), task_id.clone());
        self.live.insert(task_id, handle);
    }

    fn kill(&mut self, task_id: &TaskId) {
        match self.live.get(task_id) {
            Some(handle) => {
                tracing::info!(%task_id, "killing task");
                handle.abort();
            }
            None => tracing::debug!(%task_id, "kill of a task that is not running; ignored"),
        }
    }

    fn ended(&mut self, joined: Result<(tokio::task::Id, TaskOutcome), JoinError>) {
        let (id, result) = match joined {
            Ok((id, outcome)) => (id, Ok(outcome)),
            Err(error) => (error.id(), Err(error)),
        };
        let Some(task_id) = self.by_join.remove(&id) else { return };
        // Its RUNNING (if any) goes first.
        while let Ok(update) = self.started.try_recv() {
            self.send(update);
        }
        self.live.remove(&task_id);
        self.recent.insert(task_id.clone());
        let update = match result {
            Ok(outcome) => {
                tracing::debug!(%task_id, status = ?outcome.status, "task ended");
                terminal(task_id, &outcome)
            }
            Err(error) if error.is_cancelled() => ExecutorUpdate {
                seq: 0,
                task_id,
                state: TaskState::Killed,
                reason: Reason::Killed,
                message: self.killed_message.into(),
                exit_code: None,
                signal: None,
                pid: None,
                usage: None,
            },
            Err(error) => {
                tracing::error!(%task_id, %error, "task panicked");
                ExecutorUpdate {
                    seq: 0,
                    task_id,
                    state: TaskState::Failed,
                    reason: Reason::ExecutorError,
                    message: truncate(format!("the executor failed running the task: {error}")),
                    exit_code: None,
                    signal: None,
                    pid: None,
                    usage: None,
                }
            }
        };
        self.send(update);
    }

    /// Kills every task and waits until they are gone, queueing their last updates.
    async fn stop_all(&mut self) {
        self.running.abort_all();
        while let Some(joined) = self.running.join_next_with_id().await {
            self.ended(joined);
        }
    }
}

/// One launch, from module to outcome.
async fn run_launch(
    runtime: WasmRuntime,
    gate: Arc<Semaphore>,
    module: Arc<OnceCell<Digest>>,
    digest: Digest,
    launch: WasmLaunch,
    updates: mpsc::UnboundedSender<ExecutorUpdate>,
) -> TaskOutcome {
    let task_id = launch.task_id.clone();
    let path = launch.module_path.clone();
    let loaded = module.get_or_try_init(|| load_module(&runtime, &digest, &path)).await;
    if let Err(error) = loaded {
        tracing::info!(%error, "launch failed");
        return failed_to_launch(error.to_string());
    }
    // Never closed; held until the task ends.
    let Ok(_slot) = gate.acquire_owned().await else {
        return failed_to_launch("the executor is shutting down".into());
    };
    let prepared = match runtime.prepare_task(spec(digest.clone(), launch)).await {
        Ok(prepared) => prepared,
        Err(error) => {
            tracing::info!(%error, "launch failed");
            return failed_to_launch(error.to_string());
        }
    };
    prepared
        .run_notify(move || {
            tracing::debug!("task started");
            let _ = updates.send(ExecutorUpdate {
                seq: 0,
                task_id,
                state: TaskState::Running,
                reason: Reason::TaskStarted,
                message: format!("module {digest} instantiated"),
                exit_code: None,
                signal: None,
                pid: None,
                usage: None,
            });
        })
        .await
}

/// Why a launch's module could not be loaded. The text is the message of its TASK_FAILED.
#[derive(Debug, thiserror::Error)]
enum LoadError {
    /// The module file the agent placed could not be read.
    #[error("cannot read module {}: {err}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    /// The file's bytes are not the module the launch names.
    #[error("module {} has sha256 {actual}, the launch expects {expected}", path.display())]
    Digest { path: PathBuf, actual: Digest, expected: Digest },
    /// The runtime refused or could not compile the module.
    #[error(transparent)]
    Wasm(#[from] crate::WasmError),
}

/// Reads a module's bytes, checks them against the launch's digest and loads them.
async fn load_module(runtime: &WasmRuntime, digest: &Digest, path: &Path) -> Result<Digest, LoadError> {
    let bytes =
        tokio::fs::read(path).await.map_err(|err| LoadError::Read { path: path.to_path_buf(), err })?;
    let actual = Digest::of(&bytes);
    if actual != *digest {
        return Err(LoadError::Digest { path: path.to_path_buf(), actual, expected: digest.clone() });
    }
    let info = runtime.load_async(Arc::from(bytes)).await?;
    tracing::debug!(module = %info.digest, kind = ?info.kind, "module loaded");
    Ok(info.digest)
}

fn spec(digest: Digest, launch: WasmLaunch) -> WasmTaskSpec {
    let mut spec = WasmTaskSpec::new(ModuleSource::Digest(digest), launch.sandbox);
    spec.args = launch.args;
    spec.env = launch.env;
    spec.preopens =
        launch.preopens.into_iter().map(|(host, guest)| Preopen { host, guest, read_only: false }).collect();
    spec.stdout = Some(launch.stdout);
    spec.stderr = Some(launch.stderr);
    spec.memory_limit_bytes = launch.mem_bytes;
    spec.cpu_millis = launch.cpu_millis;
    spec.fuel_budget = launch.fuel;
    spec.timeout = launch.timeout;
    spec
}

fn failed_to_launch(message: String) -> TaskOutcome {
    TaskOutcome {
        status: TaskEnd::Failed { reason: FailureReason::LaunchFailed, message },
        fuel_consumed: 0,
        peak_memory_bytes: 0,
        wall_time: Duration::ZERO,
    }
}

fn launch_failed(task_id: TaskId, message: String) -> ExecutorUpdate {
    ExecutorUpdate {
        seq: 0,
        task_id,
        state: TaskState::Failed,
        reason: FailureReason::LaunchFailed.reason(),
        message: truncate(message),
        exit_code: None,
        signal: None,
        pid: None,
        usage: None,
    }
}

/// The terminal update of a task that ran (or failed to launch).
fn terminal(task_id: TaskId, outcome: &TaskOutcome) -> ExecutorUpdate {
    let wall = format!("{:.3}s", outcome.wall_time.as_secs_f64());
    // wasmtime keeps a function's fuel count in a register and writes it back around calls and
    // returns, not before `memory.grow`: a task stopped by a refused grow can show none used.
    // Unknown is then the honest figure.
    let stale = outcome.fuel_consumed == 0
        && matches!(outcome.status, TaskEnd::Failed { reason: FailureReason::MemoryLimitExceeded, .. });
    let usage = Some(Usage {
        fuel: (!stale).then_some(outcome.fuel_consumed),
        peak_mem: Some(outcome.peak_memory_bytes),
        ..Usage::default()
    });
    match &outcome.status {
        TaskEnd::Exited { code } => ExecutorUpdate {
            seq: 0,
            task_id,
            state: if *code == 0 { TaskState::Finished } else { TaskState::Failed },
            reason: Reason::ModuleExited,
            message: format!("exited with code {code} after {wall}"),
            exit_code: Some(*code),
            signal: None,
            pid: None,
            usage,
        },
        TaskEnd::Failed { reason: FailureReason::LaunchFailed, message } => {
            launch_failed(task_id, message.clone())
        }
        TaskEnd::Failed { reason, message } => ExecutorUpdate {
            seq: 0,
            task_id,
            state: TaskState::Failed,
            reason: reason.reason(),
            message: truncate(format!("{message} (after {wall})")),
            exit_code: None,
            signal: None,
            pid: None,
            usage,
        },
    }
}

fn truncate(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_BYTES {
        let mut end = MAX_MESSAGE_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("… (truncated)");
    }
    message
}

/// The ids of the last [`RECENT_IDS`] tasks that ended.
#[derive(Default)]
struct RecentIds {
    set: HashSet<TaskId>,
    order: VecDeque<TaskId>,
}

impl RecentIds {
    fn contains(&self, id: &TaskId) -> bool {
        self.set.contains(id)
    }

    fn insert(&mut self, id: TaskId) {
        if self.set.insert(id.clone()) {
            self.order.push_back(id);
            if self.order.len() > RECENT_IDS {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let cut = truncate("é".repeat(MAX_MESSAGE_BYTES));
        assert!(cut.len() < MAX_MESSAGE_BYTES + 32);
        assert!(cut.ends_with("(truncated)"));
        assert_eq!(truncate("short".into()), "short");
    }

    #[test]
    fn recent_ids_forget_the_oldest() {
        let mut recent = RecentIds::default();
        for i in 0..=RECENT_IDS {
            recent.insert(TaskId(i.to_string()));
        }
        assert!(!recent.contains(&TaskId("0".into())));
        assert!(recent.contains(&TaskId("1".into())));
        assert_eq!(recent.set.len(), RECENT_IDS);
    }
}
