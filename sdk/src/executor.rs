//! The executor protocol: agent ↔ executor over a Unix-domain socket in the agent's work dir,
//! with the same framing as the network protocol ([`crate::frame`]).
//!
//! The agent listens; the executor it started connects and sends [`ExecutorMessage::Hello`];
//! the agent answers [`AgentToExecutor::Welcome`] (or [`AgentToExecutor::Refused`] and closes).
//! Then the agent sends launches and kills, and the executor reports task updates. Both sides
//! batch: one [`AgentToExecutor::Launch`] may carry many tasks and one
//! [`ExecutorMessage::Updates`] many updates, in order per task (RUNNING before the terminal
//! update). The agent turns executor updates into acknowledged status updates to the master;
//! the executor does not retry (the socket is reliable, and a lost executor fails its tasks).
//!
//! An executor whose socket closes kills its tasks and exits. The agent ends an idle executor
//! with [`AgentToExecutor::Shutdown`]: the agent decides, so a launch can never race the exit.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::proto::{ErrorCode, FrameworkId, TaskId, TaskState, Usage, WireError};

/// Bumped on any incompatible change to the messages below.
pub const EXECUTOR_PROTOCOL_VERSION: u32 = 1;

/// Executor → agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecutorMessage {
    /// First frame.
    Hello {
        version: u32,
        /// The id the agent gave the executor on its command line.
        executor_id: String,
        pid: u32,
    },
    /// Task updates, oldest first.
    Updates(Vec<ExecutorUpdate>),
}

/// Agent → executor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentToExecutor {
    Welcome {
        framework_id: FrameworkId,
    },
    Refused(WireError),
    /// Start these tasks now.
    Launch(Vec<WasmLaunch>),
    /// Stop a task: it ends TASK_KILLED (unless it already ended).
    Kill {
        task_id: TaskId,
    },
    /// Kill whatever still runs and exit.
    Shutdown,
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

/// What happened to a task in the executor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutorUpdate {
    pub task_id: TaskId,
    /// RUNNING, then one of FINISHED, FAILED, KILLED (or FAILED straight away when the task
    /// could not be started).
    pub state: TaskState,
    /// `module exited`, `fuel exhausted`, `timeout`, `memory limit exceeded`, `trap`,
    /// `launch failed`, `killed`.
    pub reason: String,
    pub message: String,
    /// The guest's `proc_exit` code (0 when `_start` returned).
    pub exit_code: Option<i32>,
    /// Fuel consumed and peak linear memory, on terminal updates.
    pub usage: Option<Usage>,
}

impl AgentToExecutor {
    /// A refusal with a reason.
    pub fn refused(message: impl Into<String>) -> Self {
        AgentToExecutor::Refused(WireError::new(ErrorCode::Invalid, message))
    }
}
