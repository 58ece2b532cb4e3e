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
//! use agora_sdk::{TaskId, TaskInfo, TaskState};
//!
//! /// Finishes every task at once.
//! struct Instant;
//!
//! impl Executor for Instant {
//!     async fn launch_task(&mut self, driver: &ExecutorDriver, task: TaskInfo) {
//!         let _ = driver.send_status_update(task.task_id.clone(), TaskState::Running, "started", "").await;
//!         let _ = driver.send_status_update(task.task_id, TaskState::Finished, "done", "").await;
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
//! [`ExecutorDriver`]. Updates and framework messages sent through the driver are queued (a
//! bounded queue: a full one makes the sender wait) and written to the agent in order, as
//! few frames as fit: a burst of updates goes in one `Updates` frame.
//!
//! The agent fails the tasks of an executor that exits or closes its socket, so an executor
//! should report every task it was given as ended (FINISHED, FAILED or KILLED) before that.

use std::ffi::OsString;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::executor_proto::{
    AgentToExecutor, ExecutorMessage, ExecutorUpdate, ENV_AGENT_ID, ENV_EXECUTOR_ID, ENV_FRAMEWORK_ID,
    ENV_SANDBOX, ENV_SOCKET, EXECUTOR_PROTOCOL_VERSION, MAX_MESSAGE_LEN, MAX_REASON_LEN,
};
use crate::frame::{chunk_by_size, encoded_len, FrameError, FrameReader, FrameWriter, MAX_FRAME};
use crate::proto::{
    AgentId, ExecutorId, FrameworkId, TaskId, TaskInfo, TaskState, WireError, MAX_FRAMEWORK_MESSAGE,
};
pub use crate::scheduler::MessageTooLarge;

/// How long [`run`] waits by default for the agent to answer `Hello` (connecting included).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Updates and framework messages the driver queues before a sender has to wait.
pub const QUEUE_CAPACITY: usize = 1024;
/// How long the last queued updates may take to reach the agent when [`run`] returns.
const FINAL_FLUSH: Duration = Duration::from_secs(5);
/// Room in a frame for an `Updates` message's enum tag and list length.
const UPDATES_BUDGET: usize = MAX_FRAME - 16;

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

    /// The agent asked the executor to end (or closed its socket): stop whatever still runs and
    /// report those tasks KILLED. [`run`] returns when this returns, after sending what was
    /// queued. Does nothing by default.
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
}

impl ExecutorEnv {
    /// Reads [`ENV_SOCKET`], [`ENV_EXECUTOR_ID`], [`ENV_FRAMEWORK_ID`], [`ENV_AGENT_ID`] and
    /// [`ENV_SANDBOX`]. A variable that is not set (or, except the agent id, empty or not
    /// UTF-8) is an error naming it.
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
        Ok(ExecutorEnv {
            socket,
            executor_id,
            framework_id,
            agent_id,
            sandbox,
            handshake_timeout: HANDSHAKE_TIMEOUT,
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

/// What the driver queues for the agent.
#[derive(Debug)]
enum Outgoing {
    Update(ExecutorUpdate),
    Message(Vec<u8>),
}

/// Sends task updates and framework messages to the agent. Cheap to clone; usable from spawned
/// tasks while [`run`] runs.
#[derive(Clone, Debug)]
pub struct ExecutorDriver {
    tx: mpsc::Sender<Outgoing>,
    stop: CancellationToken,
}

impl ExecutorDriver {
    /// Reports that `task_id` is now in `state`, with a short machine-friendly `reason` (e.g.
    /// `task started`, `task exited`) and a human `message`. Executors may report STARTING,
    /// RUNNING, FINISHED, FAILED, KILLED and ERROR; a terminal state must be the task's last
    /// update. A `reason` over [`MAX_REASON_LEN`] bytes or a `message` over [`MAX_MESSAGE_LEN`]
    /// is cut (at a character boundary), as the agent would. Waits while the queue is full.
    pub async fn send_status_update(
        &self,
        task_id: TaskId,
        state: TaskState,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Result<(), DriverError> {
        let update = status_update(task_id, state, reason.into(), message.into())?;
        self.tx.send(Outgoing::Update(update)).await.map_err(|_| DriverError::Stopped)
    }

    /// Sends `data` to the framework's scheduler (delivered at most once). Larger than
    /// [`MAX_FRAMEWORK_MESSAGE`] is an error, checked here. Waits while the queue is full.
    pub async fn send_framework_message(&self, data: Vec<u8>) -> Result<(), DriverError> {
        if data.len() > MAX_FRAMEWORK_MESSAGE {
            return Err(MessageTooLarge { size: data.len() }.into());
        }
        self.tx.send(Outgoing::Message(data)).await.map_err(|_| DriverError::Stopped)
    }

    /// Ends [`run`] once the current callback returns (without calling
    /// [`Executor::shutdown`]): what is queued is sent, then the socket closes and the agent
    /// fails the tasks that have not ended.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

/// Builds an update, refusing states an executor may not report and cutting long texts.
fn status_update(
    task_id: TaskId,
    state: TaskState,
    mut reason: String,
    mut message: String,
) -> Result<ExecutorUpdate, DriverError> {
    use TaskState::*;
    if !matches!(state, Starting | Running | Finished | Failed | Killed | Error) {
        return Err(DriverError::InvalidState(state));
    }
    truncate(&mut reason, MAX_REASON_LEN);
    truncate(&mut message, MAX_MESSAGE_LEN);
    Ok(ExecutorUpdate {
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
/// until it sends `Shutdown` or closes the socket (then [`Executor::shutdown`] is called and
/// this returns `Ok`), or until [`ExecutorDriver::stop`]. A refusal, a malformed frame or a
/// message meant for another kind of executor is an error.
pub async fn run_with<E: Executor>(executor: &mut E, env: ExecutorEnv) -> Result<(), ExecutorError> {
    let (mut reader, writer, registration) =
        match tokio::time::timeout(env.handshake_timeout, handshake(&env)).await {
            Ok(r) => r?,
            Err(_) => return Err(ExecutorError::HandshakeTimeout(env.handshake_timeout)),
        };
    info!(executor_id = %registration.executor_id, framework_id = %registration.framework_id, "welcomed by the agent");

    let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
    let driver = ExecutorDriver { tx, stop: CancellationToken::new() };
    let finish = CancellationToken::new();
    let mut writer_task = Some(tokio::spawn(write_out(writer, rx, finish.clone())));

    executor.registered(&driver, &registration).await;
    let result = serve(executor, &driver, &mut reader, &mut writer_task).await;

    // Send what is queued (the updates of `shutdown` included), within bounds, then close.
    finish.cancel();
    if let Some(mut task) = writer_task {
        match tokio::time::timeout(FINAL_FLUSH, &mut task).await {
            Ok(Ok(Err(error))) => debug!(%error, "final updates not sent"),
            Ok(_) => {}
            Err(_) => {
                warn!("the agent did not take the final updates in time");
                task.abort();
            }
        }
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
    let stream = UnixStream::connect(&env.socket)
        .await
        .map_err(|error| ExecutorError::Connect { path: env.socket.clone(), error })?;
    let (read, write) = stream.into_split();
    let mut reader = FrameReader::new(read);
    let mut writer = FrameWriter::new(write);
    let hello = ExecutorMessage::Hello {
        version: EXECUTOR_PROTOCOL_VERSION,
        executor_id: env.executor_id.clone(),
        pid: std::process::id(),
    };
    writer.send(&hello).await.map_err(ExecutorError::Handshake)?;
    match reader.recv::<AgentToExecutor>().await {
        Ok(Some(AgentToExecutor::Welcome { framework_id, agent_id, executor_id })) => {
            let registration = ExecutorRegistration {
                framework_id,
                executor_id: ExecutorId(executor_id),
                agent_id: agent_id.or_else(|| env.agent_id.clone()),
                sandbox: env.sandbox.clone(),
            };
            Ok((reader, writer, registration))
        }
        Ok(Some(AgentToExecutor::Refused(error))) => Err(ExecutorError::Refused(error)),
        Ok(Some(other)) => {
            Err(ExecutorError::Unexpected { got: message_name(&other), when: "before Welcome" })
        }
        Ok(None) => Err(ExecutorError::NoWelcome),
        Err(e @ (FrameError::Malformed(_) | FrameError::TooLarge { .. })) => Err(ExecutorError::Malformed(e)),
        Err(e) => Err(ExecutorError::Handshake(e)),
    }
}

/// What woke the serve loop.
enum Event {
    Frame(Result<Option<AgentToExecutor>, FrameError>),
    Stop,
    WriterEnded,
}

/// The message loop after `Welcome`.
async fn serve<E: Executor>(
    executor: &mut E,
    driver: &ExecutorDriver,
    reader: &mut FrameReader<tokio::net::unix::OwnedReadHalf>,
    writer_task: &mut Option<JoinHandle<Result<(), FrameError>>>,
) -> Result<(), ExecutorError> {
    loop {
        let event = match writer_task.as_mut() {
            Some(task) => tokio::select! {
                biased;
                _ = driver.stop.cancelled() => Event::Stop,
                frame = reader.recv::<AgentToExecutor>() => Event::Frame(frame),
                written = task => {
                    match written {
                        Ok(Ok(())) => debug!("update writer stopped"),
                        Ok(Err(error)) => info!(%error, "cannot write to the agent"),
                        Err(error) => warn!(%error, "update writer failed"),
                    }
                    Event::WriterEnded
                }
            },
            None => Event::WriterEnded,
        };
        let message = match event {
            Event::Stop => {
                info!("stopped by the executor");
                return Ok(());
            }
            Event::WriterEnded => {
                *writer_task = None;
                executor.shutdown(driver).await;
                return Ok(());
            }
            Event::Frame(Ok(Some(message))) => message,
            Event::Frame(Ok(None)) => {
                info!("the agent closed the socket");
                executor.shutdown(driver).await;
                return Ok(());
            }
            Event::Frame(Err(FrameError::Io(error))) => {
                info!(%error, "the agent's socket failed");
                executor.shutdown(driver).await;
                return Ok(());
            }
            Event::Frame(Err(error)) => return Err(ExecutorError::Malformed(error)),
        };
        match message {
            AgentToExecutor::LaunchTasks(tasks) => {
                debug!(tasks = tasks.len(), "launch");
                for task in tasks {
                    executor.launch_task(driver, task).await;
                }
            }
            AgentToExecutor::Kill { task_id } => executor.kill_task(driver, &task_id).await,
            AgentToExecutor::FrameworkMessage(data) => executor.framework_message(driver, &data).await,
            AgentToExecutor::Shutdown => {
                info!("shutdown requested by the agent");
                executor.shutdown(driver).await;
                return Ok(());
            }
            AgentToExecutor::Refused(error) => return Err(ExecutorError::Refused(error)),
            other @ (AgentToExecutor::Launch(_)
            | AgentToExecutor::LaunchCommands(_)
            | AgentToExecutor::Welcome { .. }) => {
                return Err(ExecutorError::Unexpected { got: message_name(&other), when: "after Welcome" })
            }
        }
    }
}

/// Writes what the driver queues: runs of updates as `Updates` frames (each within the frame
/// limit), framework messages as frames of their own, in queue order. On `finish` it sends
/// what is queued and ends.
async fn write_out(
    mut writer: FrameWriter<OwnedWriteHalf>,
    mut rx: mpsc::Receiver<Outgoing>,
    finish: CancellationToken,
) -> Result<(), FrameError> {
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            biased;
            _ = finish.cancelled() => {
                // Bounded: senders may keep sending while this drains.
                while batch.len() < QUEUE_CAPACITY {
                    match rx.try_recv() {
                        Ok(out) => batch.push(out),
                        Err(_) => break,
                    }
                }
                return write_batch(&mut writer, std::mem::take(&mut batch)).await;
            }
            n = rx.recv_many(&mut batch, QUEUE_CAPACITY) => {
                if n == 0 {
                    return Ok(());
                }
                write_batch(&mut writer, std::mem::take(&mut batch)).await?;
            }
        }
    }
}

async fn write_batch(
    writer: &mut FrameWriter<OwnedWriteHalf>,
    batch: Vec<Outgoing>,
) -> Result<(), FrameError> {
    let mut updates = Vec::new();
    for out in batch {
        match out {
            Outgoing::Update(u) => updates.push(u),
            Outgoing::Message(data) => {
                feed_updates(writer, std::mem::take(&mut updates)).await?;
                writer.feed(&ExecutorMessage::FrameworkMessage(data)).await?;
            }
        }
    }
    feed_updates(writer, updates).await?;
    writer.flush().await
}

/// Queues `updates` as `Updates` frames that each fit; an update that could never fit (only
/// possible with a huge task id) is dropped with an error in the log.
async fn feed_updates(
    writer: &mut FrameWriter<OwnedWriteHalf>,
    updates: Vec<ExecutorUpdate>,
) -> Result<(), FrameError> {
    if updates.is_empty() {
        return Ok(());
    }
    for run in chunk_by_size(updates, UPDATES_BUDGET) {
        if let [one] = run.as_slice() {
            if encoded_len(one).is_none_or(|n| n > UPDATES_BUDGET) {
                tracing::error!(task_id = %one.task_id, "update too large to send; dropped");
                continue;
            }
        }
        writer.feed(&ExecutorMessage::Updates(run)).await?;
    }
    Ok(())
}

fn message_name(m: &AgentToExecutor) -> &'static str {
    match m {
        AgentToExecutor::Welcome { .. } => "Welcome",
        AgentToExecutor::Refused(_) => "Refused",
        AgentToExecutor::Launch(_) => "Launch",
        AgentToExecutor::LaunchCommands(_) => "LaunchCommands",
        AgentToExecutor::LaunchTasks(_) => "LaunchTasks",
        AgentToExecutor::FrameworkMessage(_) => "FrameworkMessage",
        AgentToExecutor::Kill { .. } => "Kill",
        AgentToExecutor::Shutdown => "Shutdown",
    }
}
