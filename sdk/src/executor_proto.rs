//! The executor wire protocol: agent ↔ executor over a Unix-domain socket in the agent's work
//! dir, with the same framing as the network protocol ([`crate::frame`]). Spoken by the
//! built-in command and Wasm executors and by frameworks' own executors (through the API in
//! [`crate::executor`]).
//!
//! The agent starts an executor with these environment variables: [`ENV_SOCKET`] (the socket to
//! connect to), [`ENV_EXECUTOR_ID`], [`ENV_FRAMEWORK_ID`], [`ENV_AGENT_ID`] and
//! [`ENV_SANDBOX`]. The built-in executors also take them as command-line flags.
//!
//! The agent listens; the executor it started connects and sends [`ExecutorMessage::Hello`];
//! the agent answers [`AgentToExecutor::Welcome`] (or [`AgentToExecutor::Refused`] and closes).
//! Then the agent sends launches and kills, and the executor reports task updates. Both sides
//! batch: one [`AgentToExecutor::Launch`] may carry many tasks and one
//! [`ExecutorMessage::Updates`] many updates, in order per task (RUNNING before the terminal
//! update). The agent turns executor updates into acknowledged status updates to the master.
//!
//! ## Surviving the agent (recovery)
//!
//! Executors outlive their agent: an agent that dies or is upgraded finds its executors again
//! when it restarts. So that no update is lost in between, every [`ExecutorUpdate`] carries a
//! sequence number (`seq`, per executor process, from 1, increasing by one per update) and the
//! executor keeps each update until the agent answers [`AgentToExecutor::Acked`] with that
//! number or a later one (the agent acknowledges once it has checkpointed the update; one
//! `Acked` covers every earlier update).
//!
//! An executor whose socket closes (or fails) without [`AgentToExecutor::Shutdown`] keeps its
//! tasks running and connects to the same socket path again, every second or so (jittered, at
//! most 2 s apart), for at most the recovery timeout ([`ENV_RECOVERY_TIMEOUT`], whole seconds,
//! default [`DEFAULT_RECOVERY_TIMEOUT`]; 0 gives up at once), counted from the moment the
//! connection was lost; then it kills its tasks and exits with an error. When it gets through,
//! its `Hello` carries a [`Resume`]: the tasks it still runs. Once welcomed it sends again, in
//! order and with their numbers, the updates the agent has not acknowledged (those made while
//! it was away included), then carries on as before; the agent drops those it has already
//! checkpointed (a number not above the last one it acknowledged) and learns from the rest what
//! happened while it was down. An agent that does not know the executor (it started clean)
//! answers [`AgentToExecutor::Refused`]: the executor kills its tasks and exits with an error.
//! Framework messages are not kept: delivered at most once, those sent while the agent is away
//! are dropped.
//!
//! An executor keeps a bounded number of unacknowledged updates; at the bound it stops taking
//! new task events (they wait, never dropped) until an `Acked` frees room. Every executor
//! shares one implementation of this side: [`crate::executor_link`].
//!
//! The agent ends an idle executor with [`AgentToExecutor::Shutdown`]: the agent decides, so a
//! launch can never race the exit.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::proto::{
    AgentId, CommandInfo, ErrorCode, FrameworkId, Reason, TaskId, TaskInfo, TaskState, Usage, WireError,
};
use crate::Resources;

/// Bumped on any incompatible change to the messages below.
pub const EXECUTOR_PROTOCOL_VERSION: u32 = 4;

/// Environment variable: how long an executor that lost its agent keeps its tasks and waits
/// for the agent to come back, in whole seconds (see the module docs). The built-in executors
/// also take it as `--recovery-timeout`.
pub const ENV_RECOVERY_TIMEOUT: &str = "AGORA_RECOVERY_TIMEOUT";
/// The recovery timeout when the agent sets none (Mesos's `--recovery_timeout`).
pub const DEFAULT_RECOVERY_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Environment variable: path of the Unix socket the executor connects to.
pub const ENV_SOCKET: &str = "AGORA_EXECUTOR_SOCKET";
/// Environment variable: the executor's id within its framework.
pub const ENV_EXECUTOR_ID: &str = "AGORA_EXECUTOR_ID";
/// Environment variable: the framework's id.
pub const ENV_FRAMEWORK_ID: &str = "AGORA_FRAMEWORK_ID";
/// Environment variable: the agent's id.
pub const ENV_AGENT_ID: &str = "AGORA_AGENT_ID";
/// Environment variable: the executor's sandbox (also its working directory).
pub const ENV_SANDBOX: &str = "AGORA_SANDBOX";
/// Longest reason text ([`Reason::Other`]) a peer may give, bytes (longer ones are cut when read).
pub const MAX_REASON_LEN: usize = 256;
/// Longest `message` of an executor's update the agent passes on, bytes (longer ones are cut).
pub const MAX_MESSAGE_LEN: usize = 4096;

/// Executor → agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecutorMessage {
    /// First frame.
    Hello {
        version: u32,
        /// The id the agent gave the executor on its command line.
        executor_id: String,
        pid: u32,
        /// Set when the executor connects again after losing its agent: what it still runs.
        resume: Option<Resume>,
    },
    /// Task updates, oldest first, each with its sequence number.
    Updates(Vec<ExecutorUpdate>),
    /// A message for the framework's scheduler (at most
    /// [`crate::proto::MAX_FRAMEWORK_MESSAGE`] bytes; relayed at most once).
    FrameworkMessage(Vec<u8>),
}

/// Agent → executor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentToExecutor {
    Welcome {
        framework_id: FrameworkId,
        /// The agent's id, once the master gave it one.
        agent_id: Option<AgentId>,
        /// The executor's id within its framework.
        executor_id: String,
    },
    Refused(WireError),
    /// Start these Wasm tasks now (the Wasm executor).
    Launch(Vec<WasmLaunch>),
    /// Start these native commands now (the command executor).
    LaunchCommands(Vec<CommandLaunch>),
    /// Run these tasks (a framework's own executor).
    LaunchTasks(Vec<TaskInfo>),
    /// A message from the framework's scheduler (a framework's own executor).
    FrameworkMessage(Vec<u8>),
    /// Stop a task: it ends TASK_KILLED (unless it already ended).
    Kill {
        task_id: TaskId,
    },
    /// Kill whatever still runs and exit.
    Shutdown,
    /// The agent has checkpointed every update up to and including number `seq`: the executor
    /// forgets them (it would otherwise send them again after reconnecting).
    Acked {
        /// The highest sequence number acknowledged.
        seq: u64,
    },
}

/// What an executor that reconnects after losing its agent still has.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// The tasks it still runs (not ended). Tasks that ended meanwhile are not listed: their
    /// terminal updates follow `Hello`, unless the agent acknowledged them before it went away.
    pub tasks: Vec<TaskId>,
    /// The highest sequence number it has used so far (0: none).
    pub last_seq: u64,
}

/// One Wasm task, with everything resolved to paths on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WasmLaunch {
    pub task_id: TaskId,
    /// The module's bytes, in the agent's artifact cache (read-only for the executor).
    pub module_path: PathBuf,
    /// sha256 of the module, hex: the key of the compiled-module cache.
    pub digest: String,
    /// The guest's argv, `argv[0]` included.
    pub args: Vec<String>,
    /// The guest's whole environment.
    pub env: Vec<(String, String)>,
    /// The task's sandbox directory.
    pub sandbox: PathBuf,
    /// Directories to preopen: host path (inside `sandbox`) and the guest path.
    pub preopens: Vec<(PathBuf, String)>,
    /// Files the guest's stdout and stderr go to (created by the executor).
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    /// Cap on the task's linear memories, bytes.
    pub mem_bytes: u64,
    /// The task's CPU share, millicores (sets its fuel slice).
    pub cpu_millis: u32,
    pub fuel: Option<u64>,
    pub timeout: Option<Duration>,
}

/// One native command task, for the command executor: it creates the sandbox and the task's
/// cgroup, spawns the process there as the task user, and reports its exit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandLaunch {
    pub task_id: TaskId,
    pub command: CommandInfo,
    /// Sizes the task's cgroup.
    pub resources: Resources,
    /// The task's sandbox (created by the executor; stdout and stderr go to files there).
    pub sandbox: PathBuf,
    /// Where the executor checkpoints the task (`task.json`, closed to tasks).
    pub checkpoint: PathBuf,
    /// SIGTERM → SIGKILL delay when the task is killed.
    pub kill_grace: Duration,
    /// The uid and gid the task runs as (its `TaskInfo::user`, with its framework's group),
    /// resolved by the agent; `None`: the executor's configured user.
    pub run_as: Option<(u32, u32)>,
}

/// What happened to a task in the executor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutorUpdate {
    /// The update's number in this executor's stream (from 1; see the module docs). Assigned
    /// when the update is first sent and kept when it is sent again.
    pub seq: u64,
    pub task_id: TaskId,
    /// RUNNING, then one of FINISHED, FAILED, KILLED (or FAILED straight away when the task
    /// could not be started).
    pub state: TaskState,
    /// `module exited`, `fuel exhausted`, `timeout`, `memory limit exceeded`, `trap`,
    /// `launch failed`, `killed`, `command exited`, … (a framework's executor says its own:
    /// [`Reason::Other`]). Its text on the wire, as when it was a `String`.
    pub reason: Reason,
    pub message: String,
    /// The exit code (a Wasm guest's `proc_exit` code, 0 when `_start` returned).
    pub exit_code: Option<i32>,
    /// The signal that ended a native process.
    pub signal: Option<i32>,
    /// The task's process (native tasks, on RUNNING).
    pub pid: Option<u32>,
    /// Fuel consumed and peak linear memory, on terminal updates.
    pub usage: Option<Usage>,
}

impl AgentToExecutor {
    /// A refusal with a reason.
    pub fn refused(message: impl Into<String>) -> Self {
        AgentToExecutor::Refused(WireError::new(ErrorCode::Invalid, message))
    }

    /// The message's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            AgentToExecutor::Welcome { .. } => "Welcome",
            AgentToExecutor::Refused(_) => "Refused",
            AgentToExecutor::Launch(_) => "Launch",
            AgentToExecutor::LaunchCommands(_) => "LaunchCommands",
            AgentToExecutor::LaunchTasks(_) => "LaunchTasks",
            AgentToExecutor::FrameworkMessage(_) => "FrameworkMessage",
            AgentToExecutor::Kill { .. } => "Kill",
            AgentToExecutor::Shutdown => "Shutdown",
            AgentToExecutor::Acked { .. } => "Acked",
        }
    }
}

/// The agent's side of an executor's socket, read half.
pub type AgentReader = crate::frame::FrameReader<tokio::net::unix::OwnedReadHalf>;
/// The agent's side of an executor's socket, write half.
pub type AgentWriter = crate::frame::FrameWriter<tokio::net::unix::OwnedWriteHalf>;

/// What the agent said in `Welcome`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcomed {
    /// The framework the executor works for.
    pub framework_id: FrameworkId,
    /// The agent's id, once the master gave it one.
    pub agent_id: Option<AgentId>,
    /// The executor's id within its framework.
    pub executor_id: String,
}

/// Why an executor's handshake with its agent failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The agent's socket could not be reached.
    #[error("cannot connect to the agent at {}: {error}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// Sending `Hello` or reading the answer failed.
    #[error("handshake with the agent failed: {0}")]
    Io(crate::frame::FrameError),
    /// The agent closed the socket before answering `Hello`.
    #[error("the agent closed the socket before answering Hello")]
    Closed,
    /// The agent refused this executor.
    #[error("the agent refused this executor: {}", .0.message)]
    Refused(WireError),
    /// The agent answered something other than `Welcome`.
    #[error("unexpected `{0}` from the agent before Welcome")]
    Unexpected(&'static str),
    /// The agent's answer does not decode (or is too large).
    #[error("malformed frame from the agent: {0}")]
    Malformed(crate::frame::FrameError),
}

/// Connects to the agent's socket, says `Hello` as `executor_id` (with this process's pid and,
/// when it reconnects after losing its agent, what it still runs) and waits for `Welcome`: the
/// opening every executor (built-in or a framework's own) makes.
pub async fn handshake(
    socket: &std::path::Path,
    executor_id: &str,
    resume: Option<Resume>,
) -> Result<(AgentReader, AgentWriter, Welcomed), HandshakeError> {
    use crate::frame::{FrameError, FrameReader, FrameWriter};
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|error| HandshakeError::Connect { path: socket.to_path_buf(), error })?;
    let (read, write) = stream.into_split();
    let mut reader = FrameReader::new(read);
    let mut writer = FrameWriter::new(write);
    let hello = ExecutorMessage::Hello {
        version: EXECUTOR_PROTOCOL_VERSION,
        executor_id: executor_id.to_string(),
        pid: std::process::id(),
        resume,
    };
    writer.send(&hello).await.map_err(HandshakeError::Io)?;
    match reader.recv::<AgentToExecutor>().await {
        Ok(Some(AgentToExecutor::Welcome { framework_id, agent_id, executor_id })) => {
            Ok((reader, writer, Welcomed { framework_id, agent_id, executor_id }))
        }
        Ok(Some(AgentToExecutor::Refused(e))) => Err(HandshakeError::Refused(e)),
        Ok(Some(other)) => Err(HandshakeError::Unexpected(other.name())),
        Ok(None) => Err(HandshakeError::Closed),
        Err(e @ (FrameError::Malformed(_) | FrameError::TooLarge { .. })) => {
            Err(HandshakeError::Malformed(e))
        }
        Err(e) => Err(HandshakeError::Io(e)),
    }
}
