//! The executor side: write a framework's own executor by implementing [`Executor`] and
//! handing it to [`run`].
//!
//! The agent starts the executor program (named by a task's
//! [`ExecutorInfo`](crate::proto::ExecutorInfo)) the first time a task names its executor id on
//! that agent, with the environment variables of [`crate::executor_proto`]. [`run`] reads them,
//! connects to the agent's Unix socket, says `Hello`, waits for `Welcome`, calls
//! [`Executor::registered`] and then hands every task, kill, framework message and shutdown
//! the agent sends to the executor's callbacks, one at a time, in the order they came.
//!
//! ```no_run
//! use agora_sdk::executor::{run, Executor, ExecutorDriver};
//! use agora_sdk::{Reason, TaskId, TaskInfo, TaskState};
//!
//! /// Finishes every task at once.
//! struct Instant;
//!
//! impl Executor for Instant {
//!     async fn launch_task(&mut self, driver: &ExecutorDriver, task: TaskInfo) {
//!         let id = task.task_id;
//!         let _ = driver.send_status_update(id.clone(), TaskState::Running, Reason::TaskStarted, "").await;
//!         // Words of its own: `Reason::Other("done")`.
//!         let _ = driver.send_status_update(id, TaskState::Finished, "done", "").await;
//!     }
//!     async fn kill_task(&mut self, driver: &ExecutorDriver, task_id: &TaskId) {
//!         // Nothing runs for long here: tasks are finished before a kill can come.
//!         let _ = (driver, task_id);
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() {
//!     if let Err(e) = run(&mut Instant).await {
//!         eprintln!("executor: {e}");
//!         std::process::exit(1);
//!     }
//! }
//! ```
//!
//! Callbacks run one at a time on the task that called [`run`]: a callback that takes long
//! holds up the next message, so long work belongs in a spawned task holding a clone of the
//! [`ExecutorDriver`]. Updates and framework messages sent through the driver are queued and
//! written to the agent in order, as few frames as fit: a burst of updates goes in one
//! `Updates` frame.
//!
//! ## Agent restarts
//!
//! The runtime survives its agent's restarts without any code in the executor: when the
//! agent's socket closes without `Shutdown`, [`run`] keeps the executor and its tasks going,
//! keeps every update sent meanwhile, connects again (about every second, for at most the
//! recovery timeout that the agent sets in [`ENV_RECOVERY_TIMEOUT`]) and sends the agent every
//! update it has not acknowledged, then serves it as before. Only if the agent does not come
//! back in time, or comes back without knowing the executor, is [`Executor::shutdown`] called
//! and [`run`] returns an error. Framework messages are delivered at most once: those sent
//! while the agent is away are dropped.
//!
//! The agent fails the tasks of an executor that exits, so an executor should report every task
//! it was given as ended (FINISHED, FAILED or KILLED) before that.

use std::ffi::OsString;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::executor_link::{
    reconnect, recovery_timeout_from, take_ack, Link, OutboxLimits, ReconnectError, RecoveryTimeoutError,
    READER_GRACE,
};
use crate::executor_proto::{
    AgentToExecutor, ExecutorUpdate, HandshakeError, ENV_AGENT_ID, ENV_EXECUTOR_ID, ENV_FRAMEWORK_ID,
    ENV_RECOVERY_TIMEOUT, ENV_SANDBOX, ENV_SOCKET, MAX_MESSAGE_LEN,
};
use crate::frame::{FrameError, FrameReader, FrameWriter};
use crate::proto::{
    AgentId, ExecutorId, FrameworkId, Reason, TaskId, TaskInfo, TaskState, WireError, MAX_FRAMEWORK_MESSAGE,
};
pub use crate::scheduler::MessageTooLarge;

/// How long [`run`] waits by default for the agent to answer `Hello` (connecting included).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Framework messages the driver queues before a sender has to wait (updates wait only when
/// the agent leaves very many unacknowledged: see [`crate::executor_link`]).
pub const QUEUE_CAPACITY: usize = crate::executor_link::MAX_QUEUED_MESSAGES;
/// How long the last queued updates may take to reach the agent when [`run`] returns.
const FINAL_FLUSH: Duration = Duration::from_secs(5);

/// Callbacks of an executor. Only [`Executor::launch_task`] and [`Executor::kill_task`] must
/// be written; the others have defaults.
pub trait Executor: Send {
    /// The agent accepted this executor. Called once, before any other callback.
    fn registered(
        &mut self,
        driver: &ExecutorDriver,
        info: &ExecutorRegistration,
    ) -> impl Future<Output = ()> + Send {
        let _ = (driver, info);
        async {}
    }

    /// Run `task`: report it RUNNING (or STARTING first) and, when it ends, FINISHED, FAILED
    /// or KILLED with [`ExecutorDriver::send_status_update`]. Long work belongs in a spawned
    /// task: the next message from the agent waits for this callback.
    fn launch_task(&mut self, driver: &ExecutorDriver, task: TaskInfo) -> impl Future<Output = ()> + Send;

    /// Stop `task_id`, then report it KILLED (unless it already ended; the agent may ask for a
    /// task it does not know has ended).
    fn kill_task(&mut self, driver: &ExecutorDriver, task_id: &TaskId) -> impl Future<Output = ()> + Send;

    /// A message from the framework's scheduler (at most [`MAX_FRAMEWORK_MESSAGE`] bytes).
    /// Ignored by default.
    fn framework_message(&mut self, driver: &ExecutorDriver, data: &[u8]) -> impl Future<Output = ()> + Send {
        let _ = (driver, data);
        async {}
    }

    /// The agent asked the executor to end (or went away and did not come back within the
    /// recovery timeout): stop whatever still runs and report those tasks KILLED. [`run`]
    /// returns when this returns, after sending what was queued. Does nothing by default.
    fn shutdown(&mut self, driver: &ExecutorDriver) -> impl Future<Output = ()> + Send {
        let _ = driver;
        async {}
    }
}

/// Who this executor is, as the agent's `Welcome` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecutorRegistration {
    /// The framework the executor works for.
    pub framework_id: FrameworkId,
    /// The executor's id within its framework (the `executor_id` of its `ExecutorInfo`).
    pub executor_id: ExecutorId,
    /// The agent's id, once the master gave it one.
    pub agent_id: Option<AgentId>,
    /// The executor's sandbox (also its working directory), from [`ENV_SANDBOX`].
    pub sandbox: PathBuf,
}

/// Where and as whom [`run_with`] connects; [`ExecutorEnv::from_env`] reads it from the
/// environment variables the agent sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecutorEnv {
    /// The agent's Unix socket ([`ENV_SOCKET`]).
    pub socket: PathBuf,
    /// The id the agent gave this executor, sent back in `Hello` ([`ENV_EXECUTOR_ID`]).
    pub executor_id: String,
    /// The framework's id ([`ENV_FRAMEWORK_ID`]).
    pub framework_id: FrameworkId,
    /// The agent's id ([`ENV_AGENT_ID`]; `None` when it is set but empty).
    pub agent_id: Option<AgentId>,
    /// The executor's sandbox ([`ENV_SANDBOX`]).
    pub sandbox: PathBuf,
    /// How long to wait for the agent's `Welcome`, connecting included
    /// ([`HANDSHAKE_TIMEOUT`] by default).
    pub handshake_timeout: Duration,
    /// How long the executor keeps its tasks and tries to reach its agent again after the
    /// socket closed without `Shutdown` ([`ENV_RECOVERY_TIMEOUT`], whole seconds;
    /// [`DEFAULT_RECOVERY_TIMEOUT`](crate::executor_proto::DEFAULT_RECOVERY_TIMEOUT) when it is
    /// not set).
    pub recovery_timeout: Duration,
}

impl ExecutorEnv {
    /// Reads [`ENV_SOCKET`], [`ENV_EXECUTOR_ID`], [`ENV_FRAMEWORK_ID`], [`ENV_AGENT_ID`],
    /// [`ENV_SANDBOX`] and (optional) [`ENV_RECOVERY_TIMEOUT`]. A variable that is not set (or,
    /// except the agent id, empty or not UTF-8), or a recovery timeout that is not a whole
    /// number of seconds, is an error naming it.
    pub fn from_env() -> Result<Self, ExecutorError> {
        Self::from_vars(|name| std::env::var_os(name))
    }

    /// [`Self::from_env`] with the variables looked up by `var`.
    fn from_vars(var: impl Fn(&str) -> Option<OsString>) -> Result<Self, ExecutorError> {
        let get = |name: &'static str, allow_empty: bool| -> Result<String, ExecutorError> {
            let value = var(name).ok_or(ExecutorError::MissingEnv { name })?;
            let value = value
                .into_string()
                .map_err(|_| ExecutorError::InvalidEnv { name, reason: "is not UTF-8" })?;
            if value.is_empty() && !allow_empty {
                return Err(ExecutorError::InvalidEnv { name, reason: "is empty" });
            }
            Ok(value)
        };
        let socket = PathBuf::from(get(ENV_SOCKET, false)?);
        let executor_id = get(ENV_EXECUTOR_ID, false)?;
        let framework_id = FrameworkId(get(ENV_FRAMEWORK_ID, false)?);
        let agent_id = Some(get(ENV_AGENT_ID, true)?).filter(|s| !s.is_empty()).map(AgentId);
        let sandbox = PathBuf::from(get(ENV_SANDBOX, false)?);
        let recovery_timeout = recovery_timeout_from(var(ENV_RECOVERY_TIMEOUT)).map_err(|e| {
            let reason = match e {
                RecoveryTimeoutError::NotSeconds(_) => "is not a whole number of seconds",
                RecoveryTimeoutError::TooLong(_) => "is longer than the longest recovery timeout (a week)",
                RecoveryTimeoutError::NotUtf8 => "is not UTF-8",
            };
            ExecutorError::InvalidEnv { name: ENV_RECOVERY_TIMEOUT, reason }
        })?;
        Ok(ExecutorEnv {
            socket,
            executor_id,
            framework_id,
            agent_id,
            sandbox,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            recovery_timeout,
        })
    }
}

/// Why [`run`] could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    /// An environment variable the agent sets is missing: the program was not started by an
    /// agent (or not as a framework's executor).
    #[error(
        "environment variable {name} is not set (executors are started by an Agora agent, which sets it)"
    )]
    MissingEnv {
        /// The variable.
        name: &'static str,
    },
    /// An environment variable the agent sets has a value that cannot be used.
    #[error("environment variable {name} {reason}")]
    InvalidEnv {
        /// The variable.
        name: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The agent's socket could not be reached.
    #[error("cannot connect to the agent at {}: {error}", path.display())]
    Connect {
        /// The socket's path.
        path: PathBuf,
        /// The OS error.
        error: io::Error,
    },
    /// Sending `Hello` or reading the agent's answer failed.
    #[error("handshake with the agent failed: {0}")]
    Handshake(FrameError),
    /// The agent did not answer `Hello` in time.
    #[error("the agent did not answer Hello within {0:?}")]
    HandshakeTimeout(Duration),
    /// The agent closed the socket before answering `Hello`.
    #[error("the agent closed the socket before answering Hello")]
    NoWelcome,
    /// The agent refused this executor.
    #[error("the agent refused this executor: {}", .0.message)]
    Refused(WireError),
    /// The agent sent a frame that does not decode (or is too large).
    #[error("malformed frame from the agent: {0}")]
    Malformed(FrameError),
    /// The agent sent a message this kind of executor does not take, or out of order.
    #[error("unexpected `{got}` from the agent {when}")]
    Unexpected {
        /// The message's name.
        got: &'static str,
        /// Where in the session it came.
        when: &'static str,
    },
    /// The agent went away and did not come back within the recovery timeout (the tasks were
    /// shut down).
    #[error("the agent did not come back within the recovery timeout ({0:?}); the tasks were shut down")]
    RecoveryTimedOut(Duration),
}

/// Why the driver did not queue an update or message.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DriverError {
    /// Executors report only STARTING, RUNNING, FINISHED, FAILED, KILLED and ERROR; the other
    /// states are the agent's and master's to give.
    #[error("an executor cannot report {0} (only TASK_STARTING, TASK_RUNNING, TASK_FINISHED, TASK_FAILED, TASK_KILLED and TASK_ERROR)")]
    InvalidState(TaskState),
    /// A framework message over [`MAX_FRAMEWORK_MESSAGE`] bytes.
    #[error(transparent)]
    MessageTooLarge(#[from] MessageTooLarge),
    /// [`run`] has returned: nothing goes to the agent any more.
    #[error("the executor has stopped; nothing more can be sent to the agent")]
    Stopped,
}

/// Sends task updates and framework messages to the agent. Cheap to clone; usable from spawned
/// tasks while [`run`] runs.
///
/// Updates are numbered and kept until the agent acknowledges them, so that none is lost while
/// the agent restarts: sent while the agent is away, they reach it once it is back.
#[derive(Clone, Debug)]
pub struct ExecutorDriver {
    link: Link,
    stop: CancellationToken,
}

impl ExecutorDriver {
    /// Reports that `task_id` is now in `state`, with a short machine-friendly `reason` (a
    /// [`Reason`], e.g. [`Reason::TaskStarted`]; text of the executor's own, `&str` or `String`,
    /// becomes [`Reason::Other`] unless it spells a known reason) and a human `message`. Executors may report STARTING,
    /// RUNNING, FINISHED, FAILED, KILLED and ERROR; a terminal state must be the task's last
    /// update. A reason's text over
    /// [`MAX_REASON_LEN`](crate::executor_proto::MAX_REASON_LEN) bytes or a `message` over [`MAX_MESSAGE_LEN`]
    /// is cut (at a character boundary), as the agent would. The update is kept until the agent
    /// acknowledges it (and sent again if the agent restarts meanwhile); this waits only while
    /// very many updates wait for the agent's acknowledgement (see [`crate::executor_link`]).
    pub async fn send_status_update(
        &self,
        task_id: TaskId,
        state: TaskState,
        reason: impl Into<Reason>,
        message: impl Into<String>,
    ) -> Result<(), DriverError> {
        let update = status_update(task_id, state, reason.into(), message.into())?;
        self.link.push_when_room(update).await.map(|_| ()).map_err(|_| DriverError::Stopped)
    }

    /// Sends `data` to the framework's scheduler (delivered at most once: a message sent while
    /// the agent is away is dropped). Larger than [`MAX_FRAMEWORK_MESSAGE`] is an error,
    /// checked here. Waits while [`QUEUE_CAPACITY`] messages are queued.
    pub async fn send_framework_message(&self, data: Vec<u8>) -> Result<(), DriverError> {
        if data.len() > MAX_FRAMEWORK_MESSAGE {
            return Err(MessageTooLarge { size: data.len() }.into());
        }
        match self.link.send_message(data).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                debug!("a framework message sent while the agent is away is dropped");
                Ok(())
            }
            Err(_) => Err(DriverError::Stopped),
        }
    }

    /// Ends [`run`] once the current callback returns (without calling
    /// [`Executor::shutdown`]): what is queued is sent, then the socket closes and the agent
    /// fails the tasks that have not ended. Also ends the wait for an agent that went away.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

/// Builds an update, refusing states an executor may not report and cutting long texts.
fn status_update(
    task_id: TaskId,
    state: TaskState,
    reason: Reason,
    mut message: String,
) -> Result<ExecutorUpdate, DriverError> {
    use TaskState::*;
    if !matches!(state, Starting | Running | Finished | Failed | Killed | Error) {
        return Err(DriverError::InvalidState(state));
    }
    truncate(&mut message, MAX_MESSAGE_LEN);
    Ok(ExecutorUpdate {
        seq: 0,
        task_id,
        state,
        reason,
        message,
        exit_code: None,
        signal: None,
        pid: None,
        usage: None,
    })
}

/// Cuts `s` to at most `max` bytes, at a character boundary.
fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// Runs `executor` as the agent started it: reads the environment ([`ExecutorEnv::from_env`])
/// and serves the agent as [`run_with`] does.
pub async fn run<E: Executor>(executor: &mut E) -> Result<(), ExecutorError> {
    run_with(executor, ExecutorEnv::from_env()?).await
}

/// Connects to the agent as `env` says, says `Hello`, waits for `Welcome` (at most
/// `env.handshake_timeout`), calls [`Executor::registered`] and serves the agent's messages
/// until it sends `Shutdown` (then [`Executor::shutdown`] is called and this returns `Ok`), or
/// until [`ExecutorDriver::stop`]. A refusal, a malformed frame or a message meant for another
/// kind of executor is an error.
///
/// When the socket closes without `Shutdown` (the agent died or is being upgraded), the
/// executor and its tasks carry on: updates are kept and this connects again, about every
/// second, for at most `env.recovery_timeout`, then sends the updates the agent has not
/// acknowledged and serves it as before. If the agent does not come back in time
/// ([`ExecutorError::RecoveryTimedOut`]) or does not know the executor any more
/// ([`ExecutorError::Refused`]), [`Executor::shutdown`] is called and this returns the error.
pub async fn run_with<E: Executor>(executor: &mut E, env: ExecutorEnv) -> Result<(), ExecutorError> {
    let (reader, writer, registration) =
        match tokio::time::timeout(env.handshake_timeout, handshake(&env)).await {
            Ok(r) => r?,
            Err(_) => return Err(ExecutorError::HandshakeTimeout(env.handshake_timeout)),
        };
    info!(executor_id = %registration.executor_id, framework_id = %registration.framework_id, "welcomed by the agent");

    let link = Link::new(OutboxLimits::default());
    let driver = ExecutorDriver { link: link.clone(), stop: CancellationToken::new() };
    let mut writer_task = link.connect(writer);
    let mut inbox = Inbox::spawn(reader, link.clone());

    executor.registered(&driver, &registration).await;
    let result = loop {
        match serve(executor, &driver, &link, &mut inbox, &mut writer_task).await {
            Served::Done(result) => break result,
            Served::Lost => {}
        }
        link.disconnect();
        inbox.task.abort();
        let lost = tokio::time::Instant::now();
        let again = reconnect(
            env.socket.clone(),
            env.executor_id.clone(),
            lost + env.recovery_timeout,
            env.recovery_timeout,
            || link.resume(),
        );
        let again = tokio::select! {
            r = again => r,
            _ = driver.stop.cancelled() => {
                info!("stopped by the executor while the agent was away");
                break Ok(());
            }
        };
        match again {
            Ok((reader, writer, _)) => {
                writer_task = link.connect(writer);
                inbox = Inbox::spawn(reader, link.clone());
            }
            Err(ReconnectError::TimedOut(timeout)) => {
                tracing::error!(
                    ?timeout,
                    "the agent did not come back within the recovery timeout: killing the tasks and exiting"
                );
                executor.shutdown(&driver).await;
                break Err(ExecutorError::RecoveryTimedOut(timeout));
            }
            Err(ReconnectError::Refused(error)) => {
                tracing::error!(%error, "the agent refused the reconnecting executor: killing the tasks and exiting");
                executor.shutdown(&driver).await;
                break Err(ExecutorError::Refused(error));
            }
        }
    };
    inbox.task.abort();

    // Send what is queued (the updates of `shutdown` included), within bounds, then close.
    link.close();
    if link.is_connected() {
        match tokio::time::timeout(FINAL_FLUSH, &mut writer_task).await {
            Ok(Ok(Err(error))) => debug!(%error, "final updates not sent"),
            Ok(_) => {}
            Err(_) => {
                warn!("the agent did not take the final updates in time");
                writer_task.abort();
            }
        }
    } else {
        writer_task.abort();
    }
    result
}

/// Connects, says `Hello` and reads the agent's answer.
async fn handshake(
    env: &ExecutorEnv,
) -> Result<
    (FrameReader<tokio::net::unix::OwnedReadHalf>, FrameWriter<OwnedWriteHalf>, ExecutorRegistration),
    ExecutorError,
> {
    let (reader, writer, welcomed) =
        crate::executor_proto::handshake(&env.socket, &env.executor_id, None).await?;
    let registration = ExecutorRegistration {
        framework_id: welcomed.framework_id,
        executor_id: ExecutorId(welcomed.executor_id),
        agent_id: welcomed.agent_id.or_else(|| env.agent_id.clone()),
        sandbox: env.sandbox.clone(),
    };
    Ok((reader, writer, registration))
}

impl From<HandshakeError> for ExecutorError {
    fn from(e: HandshakeError) -> Self {
        match e {
            HandshakeError::Connect { path, error } => ExecutorError::Connect { path, error },
            HandshakeError::Io(e) => ExecutorError::Handshake(e),
            HandshakeError::Closed => ExecutorError::NoWelcome,
            HandshakeError::Refused(e) => ExecutorError::Refused(e),
            HandshakeError::Unexpected(got) => ExecutorError::Unexpected { got, when: "before Welcome" },
            HandshakeError::Malformed(e) => ExecutorError::Malformed(e),
        }
    }
}

/// What the reader task passes on.
enum Inbound {
    Message(AgentToExecutor),
    /// The socket closed or failed (the agent is gone).
    Lost(Option<io::Error>),
    /// A frame that does not decode.
    Malformed(FrameError),
}

/// The agent's messages, read by a task of their own: `Acked` is taken at once (a callback
/// waiting for room in a full outbox must not keep it from being read); the rest waits here
/// for the callbacks, at most [`INBOX_CAPACITY`] messages.
struct Inbox {
    rx: mpsc::Receiver<Inbound>,
    task: JoinHandle<()>,
}

/// Messages from the agent read ahead of the callbacks.
const INBOX_CAPACITY: usize = 1024;

impl Inbox {
    fn spawn(mut reader: FrameReader<tokio::net::unix::OwnedReadHalf>, link: Link) -> Self {
        let (tx, rx) = mpsc::channel(INBOX_CAPACITY);
        let task = tokio::spawn(async move {
            loop {
                let inbound = match reader.recv::<AgentToExecutor>().await {
                    Ok(Some(message)) => match take_ack(&link, message) {
                        None => continue,
                        Some(message) => Inbound::Message(message),
                    },
                    Ok(None) => Inbound::Lost(None),
                    Err(FrameError::Io(error)) => Inbound::Lost(Some(error)),
                    Err(error) => Inbound::Malformed(error),
                };
                let last = !matches!(inbound, Inbound::Message(_));
                if tx.send(inbound).await.is_err() || last {
                    return;
                }
            }
        });
        Inbox { rx, task }
    }
}

/// Sleeps until `at`, or forever.
async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How one connection's message loop ended.
enum Served {
    /// `run` returns this.
    Done(Result<(), ExecutorError>),
    /// The connection is gone without `Shutdown`: connect again.
    Lost,
}

/// The message loop of one connection.
async fn serve<E: Executor>(
    executor: &mut E,
    driver: &ExecutorDriver,
    link: &Link,
    inbox: &mut Inbox,
    writer_task: &mut JoinHandle<Result<(), FrameError>>,
) -> Served {
    let mut writing = true;
    // Once the writer failed, the reader gets a moment to see the socket closed (reading what
    // came before, acknowledgements included).
    let mut reader_grace = None;
    loop {
        let inbound = tokio::select! {
            biased;
            _ = driver.stop.cancelled() => {
                info!("stopped by the executor");
                return Served::Done(Ok(()));
            }
            inbound = inbox.rx.recv() => inbound,
            written = &mut *writer_task, if writing => {
                writing = false;
                match written {
                    Ok(Ok(())) => debug!("update writer stopped"),
                    Ok(Err(error)) => info!(%error, "cannot write to the agent"),
                    Err(error) => warn!(%error, "update writer failed"),
                }
                reader_grace = Some(tokio::time::Instant::now() + READER_GRACE);
                continue;
            }
            () = sleep_until_opt(reader_grace) => {
                info!("the agent's socket does not take writes any more");
                return Served::Lost;
            }
        };
        let message = match inbound {
            Some(Inbound::Message(message)) => message,
            Some(Inbound::Lost(None)) | None => {
                info!("the agent closed the socket");
                return Served::Lost;
            }
            Some(Inbound::Lost(Some(error))) => {
                info!(%error, "the agent's socket failed");
                return Served::Lost;
            }
            Some(Inbound::Malformed(error)) => return Served::Done(Err(ExecutorError::Malformed(error))),
        };
        match message {
            AgentToExecutor::LaunchTasks(tasks) => {
                debug!(tasks = tasks.len(), "launch");
                for task in tasks {
                    link.launched(task.task_id.clone());
                    executor.launch_task(driver, task).await;
                }
            }
            AgentToExecutor::Kill { task_id } => executor.kill_task(driver, &task_id).await,
            AgentToExecutor::FrameworkMessage(data) => executor.framework_message(driver, &data).await,
            AgentToExecutor::Shutdown => {
                info!("shutdown requested by the agent");
                executor.shutdown(driver).await;
                return Served::Done(Ok(()));
            }
            AgentToExecutor::Refused(error) => return Served::Done(Err(ExecutorError::Refused(error))),
            // Taken by the reader.
            AgentToExecutor::Acked { seq } => link.ack(seq),
            other @ (AgentToExecutor::Launch(_)
            | AgentToExecutor::LaunchCommands(_)
            | AgentToExecutor::Welcome { .. }) => {
                return Served::Done(Err(ExecutorError::Unexpected {
                    got: other.name(),
                    when: "after Welcome",
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use tokio::net::unix::OwnedReadHalf;
    use tokio::net::UnixListener;

    use super::*;
    use crate::executor_proto::{ExecutorMessage, Resume};
    use crate::proto::{CommandInfo, ErrorCode, ExecutorInfo, ExecutorTask, TaskKind};
    use crate::Resources;

    const WAIT: Duration = Duration::from_secs(10);

    /// The echo executor of `examples/echo_executor.rs`, with what happened to it recorded.
    #[derive(Default)]
    struct Echo {
        count: u64,
        me: Option<ExecutorRegistration>,
        sleeping: HashMap<TaskId, u64>,
        shutdowns: usize,
        /// Send this many extra RUNNING updates per task (to make bursts).
        chatter: usize,
        /// Tasks with data `later` finish (from a spawned task) once this has a permit; each
        /// adds one to `finished_later` after its update is sent.
        later: Option<(Arc<tokio::sync::Semaphore>, Arc<AtomicUsize>)>,
    }

    impl Executor for Echo {
        async fn registered(&mut self, _driver: &ExecutorDriver, info: &ExecutorRegistration) {
            self.me = Some(info.clone());
        }

        async fn launch_task(&mut self, driver: &ExecutorDriver, task: TaskInfo) {
            self.count += 1;
            let n = self.count;
            let id = task.task_id.clone();
            let pid = std::process::id();
            let running = format!("pid={pid} count={n}");
            driver.send_status_update(id.clone(), TaskState::Running, "task started", running).await.unwrap();
            for _ in 0..self.chatter {
                driver.send_status_update(id.clone(), TaskState::Running, "still", "").await.unwrap();
            }
            let data = match &task.kind {
                TaskKind::Executor(t) => String::from_utf8_lossy(&t.data).into_owned(),
                _ => String::new(),
            };
            if data == "sleep" {
                self.sleeping.insert(id, n);
            } else if let (Some((gate, done)), "later") = (&self.later, data.as_str()) {
                let (gate, done, driver) = (gate.clone(), done.clone(), driver.clone());
                tokio::spawn(async move {
                    gate.acquire().await.unwrap().forget();
                    driver.send_status_update(id, TaskState::Finished, "later", "").await.unwrap();
                    done.fetch_add(1, Ordering::SeqCst);
                });
            } else {
                driver
                    .send_status_update(id, TaskState::Finished, "done", format!("count={n}"))
                    .await
                    .unwrap();
            }
        }

        async fn kill_task(&mut self, driver: &ExecutorDriver, task_id: &TaskId) {
            if let Some(n) = self.sleeping.remove(task_id) {
                let msg = format!("count={n}");
                driver.send_status_update(task_id.clone(), TaskState::Killed, "killed", msg).await.unwrap();
            }
        }

        async fn framework_message(&mut self, driver: &ExecutorDriver, data: &[u8]) {
            let me = self.me.as_ref().map(|m| m.executor_id.to_string()).unwrap_or_default();
            let reply = format!("pong {me} tasks={} ({} bytes)", self.count, data.len());
            driver.send_framework_message(reply.into_bytes()).await.unwrap();
        }

        async fn shutdown(&mut self, driver: &ExecutorDriver) {
            self.shutdowns += 1;
            for (id, n) in std::mem::take(&mut self.sleeping) {
                let msg = format!("count={n}");
                driver.send_status_update(id, TaskState::Killed, "executor shut down", msg).await.unwrap();
            }
        }
    }

    /// A fake agent: listens on a socket in a temporary directory.
    struct FakeAgent {
        dir: tempfile::TempDir,
        /// `None` while the agent is away.
        listener: Option<UnixListener>,
    }

    /// One executor's connection to the fake agent, after its `Hello`.
    struct Conn {
        reader: FrameReader<OwnedReadHalf>,
        writer: FrameWriter<OwnedWriteHalf>,
        hello: ExecutorMessage,
    }

    impl FakeAgent {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let listener = UnixListener::bind(dir.path().join("executor.sock")).unwrap();
            FakeAgent { dir, listener: Some(listener) }
        }

        /// The agent dies: nobody listens on the socket any more.
        fn vanish(&mut self) {
            self.listener = None;
            std::fs::remove_file(self.dir.path().join("executor.sock")).unwrap();
        }

        /// The agent is back, listening on the same path.
        fn come_back(&mut self) {
            self.listener = Some(UnixListener::bind(self.dir.path().join("executor.sock")).unwrap());
        }

        fn env(&self) -> ExecutorEnv {
            ExecutorEnv {
                socket: self.dir.path().join("executor.sock"),
                executor_id: "echo".into(),
                framework_id: FrameworkId::new("fw-1"),
                agent_id: Some(AgentId::new("agent-env")),
                sandbox: self.dir.path().to_path_buf(),
                handshake_timeout: WAIT,
                recovery_timeout: WAIT,
            }
        }

        async fn accept(&self) -> Conn {
            let listener = self.listener.as_ref().expect("the agent is here");
            let (stream, _) = tokio::time::timeout(WAIT, listener.accept()).await.unwrap().unwrap();
            let (read, write) = stream.into_split();
            let mut reader = FrameReader::new(read);
            let writer = FrameWriter::new(write);
            let hello = tokio::time::timeout(WAIT, reader.recv()).await.unwrap().unwrap().unwrap();
            Conn { reader, writer, hello }
        }

        /// Accepts and welcomes an executor.
        async fn welcomed(&self) -> Conn {
            let mut conn = self.accept().await;
            conn.send(AgentToExecutor::Welcome {
                framework_id: FrameworkId::new("fw-1"),
                agent_id: Some(AgentId::new("agent-1")),
                executor_id: "echo".into(),
            })
            .await;
            conn
        }
    }

    impl Conn {
        async fn send(&mut self, m: AgentToExecutor) {
            self.writer.send(&m).await.unwrap();
        }

        /// The next frame (`None` at end of stream).
        async fn next(&mut self) -> Option<ExecutorMessage> {
            tokio::time::timeout(WAIT, self.reader.recv()).await.expect("no frame from the executor").unwrap()
        }

        /// The next `n` updates, and how many frames they came in.
        async fn updates(&mut self, n: usize) -> (Vec<ExecutorUpdate>, usize) {
            let (mut got, mut frames) = (Vec::new(), 0);
            while got.len() < n {
                match self.next().await {
                    Some(ExecutorMessage::Updates(u)) => {
                        frames += 1;
                        got.extend(u)
                    }
                    other => panic!("expected updates, got {other:?}"),
                }
            }
            assert_eq!(got.len(), n, "more updates than expected: {got:?}");
            (got, frames)
        }
    }

    fn task(id: &str, data: &str) -> TaskInfo {
        TaskInfo {
            task_id: TaskId::new(id),
            name: id.into(),
            resources: Resources::parse("cpus:0.1;mem:16MiB").unwrap(),
            kind: TaskKind::Executor(Box::new(ExecutorTask {
                executor: ExecutorInfo {
                    executor_id: ExecutorId::new("echo"),
                    name: "echo".into(),
                    command: CommandInfo { argv: vec!["./echo_executor".into()], shell: false, env: vec![] },
                    resources: Resources::parse("cpus:0.1;mem:32MiB").unwrap(),
                    fetch: vec![],
                },
                data: data.as_bytes().to_vec(),
            })),
            kill_grace: None,
            user: None,
        }
    }

    fn spawn_echo(env: ExecutorEnv, echo: Echo) -> JoinHandle<(Result<(), ExecutorError>, Echo)> {
        tokio::spawn(async move {
            let mut echo = echo;
            let r = run_with(&mut echo, env).await;
            (r, echo)
        })
    }

    async fn joined(h: JoinHandle<(Result<(), ExecutorError>, Echo)>) -> (Result<(), ExecutorError>, Echo) {
        tokio::time::timeout(WAIT, h).await.expect("run did not return").unwrap()
    }

    fn states(updates: &[ExecutorUpdate]) -> Vec<(&str, TaskState, &str)> {
        updates.iter().map(|u| (u.task_id.as_str(), u.state, u.message.as_str())).collect()
    }

    #[tokio::test]
    async fn handshake_says_hello_and_registers_with_the_welcome() {
        let agent = FakeAgent::new();
        let run = spawn_echo(agent.env(), Echo::default());
        let mut conn = agent.welcomed().await;
        assert_eq!(
            conn.hello,
            ExecutorMessage::Hello {
                version: crate::executor_proto::EXECUTOR_PROTOCOL_VERSION,
                executor_id: "echo".into(),
                pid: std::process::id(),
                resume: None,
            }
        );
        conn.send(AgentToExecutor::Shutdown).await;
        let (r, echo) = joined(run).await;
        r.unwrap();
        assert_eq!(
            echo.me,
            Some(ExecutorRegistration {
                framework_id: FrameworkId::new("fw-1"),
                executor_id: ExecutorId::new("echo"),
                agent_id: Some(AgentId::new("agent-1")),
                sandbox: agent.dir.path().to_path_buf(),
            })
        );
    }

    #[tokio::test]
    async fn launched_tasks_report_running_then_finished_in_order() {
        let agent = FakeAgent::new();
        let run = spawn_echo(agent.env(), Echo::default());
        let mut conn = agent.welcomed().await;
        conn.send(AgentToExecutor::LaunchTasks(vec![task("a", ""), task("b", "anything")])).await;
        conn.send(AgentToExecutor::LaunchTasks(vec![task("c", "")])).await;
        let (got, _) = conn.updates(6).await;
        let pid = std::process::id();
        let (r1, r2, r3) =
            (format!("pid={pid} count=1"), format!("pid={pid} count=2"), format!("pid={pid} count=3"));
        assert_eq!(
            states(&got),
            [
                ("a", TaskState::Running, r1.as_str()),
                ("a", TaskState::Finished, "count=1"),
                ("b", TaskState::Running, r2.as_str()),
                ("b", TaskState::Finished, "count=2"),
                ("c", TaskState::Running, r3.as_str()),
                ("c", TaskState::Finished, "count=3"),
            ]
        );
        assert!(got
            .iter()
            .all(|u| u.exit_code.is_none() && u.signal.is_none() && u.pid.is_none() && u.usage.is_none()));
        assert_eq!(got[1].reason, "done");
        conn.send(AgentToExecutor::Shutdown).await;
        let (r, echo) = joined(run).await;
        r.unwrap();
        assert_eq!(echo.count, 3);
    }

    #[tokio::test]
    async fn kill_ends_a_running_task_killed() {
        let agent = FakeAgent::new();
        let run = spawn_echo(agent.env(), Echo::default());
        let mut conn = agent.welcomed().await;
        conn.send(AgentToExecutor::LaunchTasks(vec![task("s", "sleep")])).await;
        let (got, _) = conn.updates(1).await;
        assert_eq!(got[0].state, TaskState::Running);
        // A kill of a task the executor does not run is ignored by the echo executor.
        conn.send(AgentToExecutor::Kill { task_id: TaskId::new("unknown") }).await;
        conn.send(AgentToExecutor::Kill { task_id: TaskId::new("s") }).await;
        let (got, _) = conn.updates(1).await;
        assert_eq!(states(&got), [("s", TaskState::Killed, "count=1")]);
        conn.send(AgentToExecutor::Shutdown).await;
        assert_eq!(conn.next().await, None, "nothing after the shutdown: the task had ended");
        let (r, echo) = joined(run).await;
        r.unwrap();
        assert_eq!(echo.shutdowns, 1);
    }

    #[tokio::test]
    async fn framework_messages_go_both_ways() {
        let agent = FakeAgent::new();
        let run = spawn_echo(agent.env(), Echo::default());
        let mut conn = agent.welcomed().await;
        conn.send(AgentToExecutor::LaunchTasks(vec![task("a", "")])).await;
        conn.send(AgentToExecutor::FrameworkMessage(b"ping".to_vec())).await;
        let (got, _) = conn.updates(2).await;
        assert_eq!(got[1].state, TaskState::Finished);
        assert_eq!(
            conn.next().await,
            Some(ExecutorMessage::FrameworkMessage(b"pong echo tasks=1 (4 bytes)".to_vec()))
        );
        // The largest message the protocol allows goes through.
        conn.send(AgentToExecutor::FrameworkMessage(vec![b'x'; MAX_FRAMEWORK_MESSAGE])).await;
        let reply = format!("pong echo tasks=1 ({MAX_FRAMEWORK_MESSAGE} bytes)").into_bytes();
        assert_eq!(conn.next().await, Some(ExecutorMessage::FrameworkMessage(reply)));
        conn.send(AgentToExecutor::Shutdown).await;
        joined(run).await.0.unwrap();
    }

    #[tokio::test]
    async fn driver_refuses_oversized_messages_and_states_executors_cannot_report() {
        let link = Link::new(OutboxLimits::default());
        let driver = ExecutorDriver { link: link.clone(), stop: CancellationToken::new() };
        let err = driver.send_framework_message(vec![0; MAX_FRAMEWORK_MESSAGE + 1]).await.unwrap_err();
        assert_eq!(err, DriverError::MessageTooLarge(MessageTooLarge { size: MAX_FRAMEWORK_MESSAGE + 1 }));
        assert!(err.to_string().contains("larger than the limit"), "{err}");
        driver.send_framework_message(vec![0; MAX_FRAMEWORK_MESSAGE]).await.unwrap();
        let mut kept = 0;
        for state in TaskState::ALL {
            let r = driver.send_status_update(TaskId::new("t"), state, "r", "m").await;
            use TaskState::*;
            if matches!(state, Starting | Running | Finished | Failed | Killed | Error) {
                r.unwrap();
                kept += 1;
            } else {
                assert_eq!(r, Err(DriverError::InvalidState(state)));
            }
        }
        assert_eq!(link.unacked(), kept, "every update is kept until acknowledged");
        // Long texts are cut as the agent would, at a character boundary.
        let long = "é".repeat(MAX_MESSAGE_LEN);
        let u = status_update(TaskId::new("t"), TaskState::Failed, long.clone().into(), long).unwrap();
        assert_eq!(u.reason.as_str().len(), crate::executor_proto::MAX_REASON_LEN);
        assert_eq!(u.message.len(), MAX_MESSAGE_LEN);
        link.close();
        assert_eq!(driver.send_framework_message(vec![1]).await, Err(DriverError::Stopped));
        let r = driver.send_status_update(TaskId::new("t"), TaskState::Running, "r", "m").await;
        assert_eq!(r, Err(DriverError::Stopped));
    }

    #[tokio::test]
    async fn refused_by_the_agent_is_an_error() {
        let agent = FakeAgent::new();
        let run = spawn_echo(agent.env(), Echo::default());
        let mut conn = agent.accept().await;
        conn.send(AgentToExecutor::refused("no executor `echo` expected")).await;
        let (r, echo) = joined(run).await;
        match r {
            Err(ExecutorError::Refused(e)) => {
                assert_eq!(e.code, ErrorCode::Invalid);
                assert_eq!(e.message, "no executor `echo` expected");
            }
            other => panic!("{other:?}"),
        }
        assert!(echo.me.is_none(), "not registered");
        assert_eq!(echo.shutdowns, 0);
    }

    #[tokio::test]
    async fn shutdown_calls_the_callback_sends_its_updates_then_run_returns() {
        let agent = FakeAgent::new();
        let run = spawn_echo(agent.env(), Echo::default());
        let mut conn = agent.welcomed().await;
        conn.send(AgentToExecutor::LaunchTasks(vec![task("s1", "sleep"), task("s2", "sleep")])).await;
        conn.updates(2).await;
        conn.send(AgentToExecutor::Shutdown).await;
        let (mut got, _) = conn.updates(2).await;
        got.sort_by(|a, b| a.task_id.cmp(&b.task_id));
        assert_eq!(
            states(&got),
            [("s1", TaskState::Killed, "count=1"), ("s2", TaskState::Killed, "count=2")]
        );
        assert_eq!(got[0].reason, "executor shut down");
        assert_eq!(conn.next().await, None, "the executor closes its socket");
        let (r, echo) = joined(run).await;
        r.unwrap();
        assert_eq!(echo.shutdowns, 1);
    }

    #[tokio::test]
    async fn messages_for_other_executor_kinds_are_protocol_errors() {
        let agent = FakeAgent::new();
        let run = spawn_echo(agent.env(), Echo::default());
        let mut conn = agent.welcomed().await;
        conn.send(AgentToExecutor::LaunchCommands(vec![])).await;
        match joined(run).await.0 {
            Err(ExecutorError::Unexpected { got: "LaunchCommands", when: "after Welcome" }) => {}
            other => panic!("{other:?}"),
        }

        let run = spawn_echo(agent.env(), Echo::default());
        let mut conn = agent.welcomed().await;
        conn.send(AgentToExecutor::Launch(vec![])).await;
        let err = joined(run).await.0.unwrap_err();
        assert_eq!(err.to_string(), "unexpected `Launch` from the agent after Welcome");

        // Anything but Welcome or Refused first.
        let run = spawn_echo(agent.env(), Echo::default());
        let mut conn = agent.accept().await;
        conn.send(AgentToExecutor::Shutdown).await;
        assert!(matches!(
            joined(run).await.0,
            Err(ExecutorError::Unexpected { got: "Shutdown", when: "before Welcome" })
        ));

        // Garbage.
        let run = spawn_echo(agent.env(), Echo::default());
        let mut conn = agent.welcomed().await;
        conn.writer.send(&(u32::MAX, "not a message")).await.unwrap();
        assert!(matches!(joined(run).await.0, Err(ExecutorError::Malformed(_))));
    }

    #[tokio::test]
    async fn stop_from_a_spawned_task_ends_run() {
        struct Stopper;
        impl Executor for Stopper {
            async fn launch_task(&mut self, driver: &ExecutorDriver, task: TaskInfo) {
                let driver = driver.clone();
                tokio::spawn(async move {
                    driver.send_status_update(task.task_id, TaskState::Finished, "done", "").await.unwrap();
                    driver.stop();
                });
            }
            async fn kill_task(&mut self, _driver: &ExecutorDriver, _task_id: &TaskId) {}
            async fn shutdown(&mut self, _driver: &ExecutorDriver) {
                panic!("stop does not call shutdown");
            }
        }
        let agent = FakeAgent::new();
        let env = agent.env();
        let run = tokio::spawn(async move { run_with(&mut Stopper, env).await });
        let mut conn = agent.welcomed().await;
        conn.send(AgentToExecutor::LaunchTasks(vec![task("a", "")])).await;
        let (got, _) = conn.updates(1).await;
        assert_eq!(got[0].state, TaskState::Finished);
        assert_eq!(conn.next().await, None);
        tokio::time::timeout(WAIT, run).await.unwrap().unwrap().unwrap();
    }

    #[tokio::test]
    async fn bursts_of_updates_are_batched_in_few_frames_in_order() {
        let agent = FakeAgent::new();
        let run = spawn_echo(agent.env(), Echo { chatter: 3, ..Echo::default() });
        let mut conn = agent.welcomed().await;
        let n = 2000;
        let tasks: Vec<TaskInfo> = (0..n).map(|i| task(&format!("t{i}"), "")).collect();
        conn.send(AgentToExecutor::LaunchTasks(tasks)).await;
        let (got, frames) = conn.updates(n * 5).await;
        assert!(frames < n, "{frames} frames for {} updates", got.len());
        for (i, chunk) in got.chunks(5).enumerate() {
            let id = format!("t{i}");
            assert!(chunk.iter().all(|u| u.task_id.as_str() == id), "{chunk:?}");
            assert_eq!(chunk[0].message, format!("pid={} count={}", std::process::id(), i + 1));
            assert_eq!(chunk[4].state, TaskState::Finished);
        }
        conn.send(AgentToExecutor::Shutdown).await;
        joined(run).await.0.unwrap();
    }

    #[tokio::test]
    async fn a_silent_agent_or_no_agent_is_an_error() {
        let agent = FakeAgent::new();
        let mut env = agent.env();
        env.handshake_timeout = Duration::from_millis(200);
        let run = spawn_echo(env.clone(), Echo::default());
        let _conn = agent.accept().await; // never answers
        match joined(run).await.0 {
            Err(ExecutorError::HandshakeTimeout(d)) => assert_eq!(d, Duration::from_millis(200)),
            other => panic!("{other:?}"),
        }

        // The agent closes before answering.
        let run = spawn_echo(env.clone(), Echo::default());
        drop(agent.accept().await);
        assert!(matches!(joined(run).await.0, Err(ExecutorError::NoWelcome)));

        env.socket = agent.dir.path().join("nobody.sock");
        let err = run_with(&mut Echo::default(), env).await.unwrap_err();
        assert!(matches!(err, ExecutorError::Connect { .. }), "{err}");
        assert!(err.to_string().contains("nobody.sock"), "{err}");
    }

    fn seqs(updates: &[ExecutorUpdate]) -> Vec<u64> {
        updates.iter().map(|u| u.seq).collect()
    }

    fn welcome() -> AgentToExecutor {
        AgentToExecutor::Welcome {
            framework_id: FrameworkId::new("fw-1"),
            agent_id: Some(AgentId::new("agent-1")),
            executor_id: "echo".into(),
        }
    }

    /// The agent goes away and comes back: the tasks keep running, the executor reconnects
    /// with what it still runs, sends again (with their numbers) the updates the agent had not
    /// acknowledged, those made meanwhile included, and then serves the agent as before.
    #[tokio::test]
    async fn the_runtime_survives_an_agent_restart_without_losing_updates() {
        let mut agent = FakeAgent::new();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        let echo = Echo { later: Some((gate.clone(), done.clone())), ..Echo::default() };
        let run = spawn_echo(agent.env(), echo);
        let mut conn = agent.welcomed().await;
        conn.send(AgentToExecutor::LaunchTasks(vec![task("s", "sleep"), task("l", "later")])).await;
        let (got, _) = conn.updates(2).await;
        assert_eq!(seqs(&got), [1, 2], "numbered from 1");
        assert_eq!(states(&got)[..].iter().map(|s| s.0).collect::<Vec<_>>(), ["s", "l"]);
        conn.send(AgentToExecutor::Acked { seq: 1 }).await;
        drop(conn);
        agent.vanish();
        // A task ends while the agent is away.
        gate.add_permits(1);
        let deadline = std::time::Instant::now() + WAIT;
        while done.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "the task never ended");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        agent.come_back();
        let mut conn = agent.accept().await;
        match &conn.hello {
            ExecutorMessage::Hello { resume: Some(r), pid, .. } => {
                assert_eq!(*pid, std::process::id());
                assert_eq!(r, &Resume { tasks: vec![TaskId::new("s")], last_seq: 3 });
            }
            other => panic!("expected a resuming Hello, got {other:?}"),
        }
        conn.send(welcome()).await;
        let (got, _) = conn.updates(2).await;
        assert_eq!(seqs(&got), [2, 3], "the unacknowledged updates again, in order");
        assert_eq!(
            got.iter().map(|u| (u.task_id.as_str(), u.state)).collect::<Vec<_>>(),
            [("l", TaskState::Running), ("l", TaskState::Finished)]
        );
        // Business as usual: launches, kills and shutdown work on the new connection.
        conn.send(AgentToExecutor::Acked { seq: 3 }).await;
        conn.send(AgentToExecutor::LaunchTasks(vec![task("a", "")])).await;
        let (got, _) = conn.updates(2).await;
        assert_eq!(seqs(&got), [4, 5]);
        conn.send(AgentToExecutor::Kill { task_id: TaskId::new("s") }).await;
        let (got, _) = conn.updates(1).await;
        assert_eq!((got[0].seq, got[0].state), (6, TaskState::Killed));
        conn.send(AgentToExecutor::Shutdown).await;
        assert_eq!(conn.next().await, None);
        let (r, echo) = joined(run).await;
        r.unwrap();
        assert_eq!((echo.count, echo.shutdowns), (3, 1));
    }

    /// An agent that does not come back within the recovery timeout: the executor shuts its
    /// tasks down and `run` fails, saying so.
    #[tokio::test]
    async fn no_agent_within_the_recovery_timeout_shuts_the_tasks_down() {
        let mut agent = FakeAgent::new();
        let mut env = agent.env();
        env.recovery_timeout = Duration::from_secs(1);
        let run = spawn_echo(env, Echo::default());
        let mut conn = agent.welcomed().await;
        conn.send(AgentToExecutor::LaunchTasks(vec![task("s", "sleep")])).await;
        conn.updates(1).await;
        drop(conn);
        agent.vanish();
        let lost = std::time::Instant::now();
        let (r, echo) = joined(run).await;
        assert!(lost.elapsed() >= Duration::from_millis(900), "{:?}", lost.elapsed());
        match r {
            Err(e @ ExecutorError::RecoveryTimedOut(_)) => {
                assert!(e.to_string().contains("recovery timeout (1s)"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(echo.shutdowns, 1);
        assert!(echo.sleeping.is_empty(), "the sleeping task was ended");
    }

    /// An agent that started clean does not know the executor: it refuses the resumed
    /// handshake, and the executor shuts its tasks down.
    #[tokio::test]
    async fn a_refused_resume_shuts_the_tasks_down() {
        let agent = FakeAgent::new();
        let run = spawn_echo(agent.env(), Echo::default());
        let mut conn = agent.welcomed().await;
        conn.send(AgentToExecutor::LaunchTasks(vec![task("s", "sleep")])).await;
        conn.updates(1).await;
        drop(conn);
        let mut conn = agent.accept().await;
        assert!(
            matches!(&conn.hello, ExecutorMessage::Hello { resume: Some(r), .. } if r.tasks == [TaskId::new("s")]),
            "{:?}",
            conn.hello
        );
        conn.send(AgentToExecutor::refused("unknown executor")).await;
        let (r, echo) = joined(run).await;
        assert!(matches!(&r, Err(ExecutorError::Refused(e)) if e.message == "unknown executor"), "{r:?}");
        assert_eq!(echo.shutdowns, 1);
    }

    /// The `echo_executor` example's binary against the fake agent (its path in
    /// `AGORA_TEST_ECHO_EXECUTOR`, e.g. `target/debug/examples/echo_executor` after
    /// `cargo build --examples`).
    #[tokio::test]
    #[ignore = "needs AGORA_TEST_ECHO_EXECUTOR=<path of the built echo_executor example>"]
    async fn echo_executor_example_against_the_fake_agent() {
        let Some(bin) = std::env::var_os("AGORA_TEST_ECHO_EXECUTOR") else {
            panic!("set AGORA_TEST_ECHO_EXECUTOR to the echo_executor binary");
        };
        let agent = FakeAgent::new();
        let spawn = || {
            let env = agent.env();
            tokio::process::Command::new(&bin)
                .env(ENV_SOCKET, &env.socket)
                .env(ENV_EXECUTOR_ID, "echo")
                .env(ENV_FRAMEWORK_ID, "fw-1")
                .env(ENV_AGENT_ID, "agent-1")
                .env(ENV_SANDBOX, &env.sandbox)
                .kill_on_drop(true)
                .spawn()
                .unwrap()
        };
        let mut child = spawn();
        let mut conn = agent.welcomed().await;
        let pid = child.id().unwrap();
        assert!(matches!(conn.hello, ExecutorMessage::Hello { pid: p, .. } if p == pid), "{:?}", conn.hello);
        conn.send(AgentToExecutor::LaunchTasks(vec![task("a", ""), task("b", "sleep")])).await;
        let (got, _) = conn.updates(3).await;
        let (r1, r2) = (format!("pid={pid} count=1"), format!("pid={pid} count=2"));
        assert_eq!(
            states(&got),
            [
                ("a", TaskState::Running, r1.as_str()),
                ("a", TaskState::Finished, "count=1"),
                ("b", TaskState::Running, r2.as_str()),
            ]
        );
        conn.send(AgentToExecutor::FrameworkMessage(b"ping".to_vec())).await;
        assert_eq!(conn.next().await, Some(ExecutorMessage::FrameworkMessage(b"pong echo tasks=2".to_vec())));
        conn.send(AgentToExecutor::Kill { task_id: TaskId::new("b") }).await;
        assert_eq!(states(&conn.updates(1).await.0), [("b", TaskState::Killed, "count=2")]);
        conn.send(AgentToExecutor::LaunchTasks(vec![task("c", "crash")])).await;
        let status = tokio::time::timeout(WAIT, child.wait()).await.unwrap().unwrap();
        assert_eq!(status.code(), Some(3));

        // Shut down by the agent: exits 0, its sleeping task reported KILLED first.
        let mut child = spawn();
        let mut conn = agent.welcomed().await;
        conn.send(AgentToExecutor::LaunchTasks(vec![task("s", "sleep")])).await;
        conn.updates(1).await;
        conn.send(AgentToExecutor::Shutdown).await;
        assert_eq!(states(&conn.updates(1).await.0), [("s", TaskState::Killed, "count=1")]);
        let status = tokio::time::timeout(WAIT, child.wait()).await.unwrap().unwrap();
        assert_eq!(status.code(), Some(0));
    }

    #[test]
    fn missing_or_empty_environment_variables_are_named() {
        let full = |name: &str| -> Option<OsString> {
            Some(
                match name {
                    ENV_SOCKET => "/run/agent.sock",
                    ENV_EXECUTOR_ID => "echo",
                    ENV_FRAMEWORK_ID => "fw",
                    ENV_AGENT_ID => "ag",
                    ENV_SANDBOX => "/sandbox",
                    _ => return None,
                }
                .into(),
            )
        };
        let env = ExecutorEnv::from_vars(full).unwrap();
        assert_eq!(env.socket, Path::new("/run/agent.sock"));
        assert_eq!(env.executor_id, "echo");
        assert_eq!(env.framework_id, FrameworkId::new("fw"));
        assert_eq!(env.agent_id, Some(AgentId::new("ag")));
        assert_eq!(env.sandbox, Path::new("/sandbox"));
        assert_eq!(env.handshake_timeout, HANDSHAKE_TIMEOUT);
        assert_eq!(env.recovery_timeout, crate::executor_proto::DEFAULT_RECOVERY_TIMEOUT);
        let with = |value: &'static str| {
            ExecutorEnv::from_vars(
                move |n| if n == ENV_RECOVERY_TIMEOUT { Some(value.into()) } else { full(n) },
            )
        };
        assert_eq!(with("3").unwrap().recovery_timeout, Duration::from_secs(3));
        let err = with("15m").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("environment variable {ENV_RECOVERY_TIMEOUT} is not a whole number of seconds")
        );

        for missing in [ENV_SOCKET, ENV_EXECUTOR_ID, ENV_FRAMEWORK_ID, ENV_AGENT_ID, ENV_SANDBOX] {
            let err = ExecutorEnv::from_vars(|n| if n == missing { None } else { full(n) }).unwrap_err();
            assert!(matches!(err, ExecutorError::MissingEnv { name } if name == missing), "{err}");
            assert!(err.to_string().contains(missing), "{err}");
        }
        let err =
            ExecutorEnv::from_vars(|n| if n == ENV_SOCKET { Some("".into()) } else { full(n) }).unwrap_err();
        assert_eq!(err.to_string(), format!("environment variable {ENV_SOCKET} is empty"));
        // An agent without an id yet sets it empty.
        let env =
            ExecutorEnv::from_vars(|n| if n == ENV_AGENT_ID { Some("".into()) } else { full(n) }).unwrap();
        assert_eq!(env.agent_id, None);
        {
            use std::os::unix::ffi::OsStringExt;
            let err = ExecutorEnv::from_vars(|n| {
                if n == ENV_EXECUTOR_ID {
                    Some(OsString::from_vec(vec![0xff]))
                } else {
                    full(n)
                }
            })
            .unwrap_err();
            assert!(matches!(err, ExecutorError::InvalidEnv { name: ENV_EXECUTOR_ID, .. }), "{err}");
        }
        // The process's own environment has none of them under `cargo test`.
        if std::env::var_os(ENV_SOCKET).is_none() {
            assert!(matches!(ExecutorEnv::from_env(), Err(ExecutorError::MissingEnv { name: ENV_SOCKET })));
        }
    }
}
