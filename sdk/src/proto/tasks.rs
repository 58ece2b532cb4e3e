//! Tasks: what a task is, its states and status updates (part of [`crate::proto`]).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::resources::Resources;

use super::*;

/// Mesos task states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaskState {
    Staging,
    Starting,
    Running,
    Killing,
    Finished,
    Failed,
    Killed,
    Error,
    Lost,
    Dropped,
    Unreachable,
    Gone,
    Unknown,
}

impl TaskState {
    pub const ALL: [TaskState; 13] = [
        TaskState::Staging,
        TaskState::Starting,
        TaskState::Running,
        TaskState::Killing,
        TaskState::Finished,
        TaskState::Failed,
        TaskState::Killed,
        TaskState::Error,
        TaskState::Lost,
        TaskState::Dropped,
        TaskState::Unreachable,
        TaskState::Gone,
        TaskState::Unknown,
    ];

    /// A terminal state is final: no update follows it (UNREACHABLE is not terminal: the agent
    /// may come back).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Finished
                | TaskState::Failed
                | TaskState::Killed
                | TaskState::Error
                | TaskState::Lost
                | TaskState::Dropped
                | TaskState::Gone
        )
    }

    /// Whether a task in `self` may move to `next`. Terminal states only move to themselves
    /// (a retried update); UNREACHABLE and UNKNOWN may resolve to anything.
    pub fn can_transition_to(self, next: TaskState) -> bool {
        use TaskState::*;
        if self == next {
            return true;
        }
        match self {
            s if s.is_terminal() => false,
            Staging => true,
            Starting => !matches!(next, Staging),
            Running => !matches!(next, Staging | Starting),
            Killing => !matches!(next, Staging | Starting | Running),
            Unreachable | Unknown => true,
            _ => false,
        }
    }

    /// Moves a task in `self` to `next` if [`can_transition_to`](Self::can_transition_to)
    /// allows it; otherwise `self` stays as it was and the error names both states. The one
    /// way master and agent change an existing task's state (a new task's first state is not
    /// a transition).
    pub fn transition(&mut self, next: TaskState) -> Result<(), InvalidTransition> {
        if !self.can_transition_to(next) {
            return Err(InvalidTransition { from: *self, to: next });
        }
        *self = next;
        Ok(())
    }

    /// Mesos's spelling, `TASK_RUNNING`.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Staging => "TASK_STAGING",
            TaskState::Starting => "TASK_STARTING",
            TaskState::Running => "TASK_RUNNING",
            TaskState::Killing => "TASK_KILLING",
            TaskState::Finished => "TASK_FINISHED",
            TaskState::Failed => "TASK_FAILED",
            TaskState::Killed => "TASK_KILLED",
            TaskState::Error => "TASK_ERROR",
            TaskState::Lost => "TASK_LOST",
            TaskState::Dropped => "TASK_DROPPED",
            TaskState::Unreachable => "TASK_UNREACHABLE",
            TaskState::Gone => "TASK_GONE",
            TaskState::Unknown => "TASK_UNKNOWN",
        }
    }
}

/// A task state change [`TaskState::transition`] refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid task state transition {from} -> {to}")]
pub struct InvalidTransition {
    /// The state the task is in (and stays in).
    pub from: TaskState,
    /// The state it was asked to move to.
    pub to: TaskState,
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A native command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandInfo {
    /// With `shell`, `argv[0]` is a script run by `/bin/sh -c`; otherwise the program and args.
    pub argv: Vec<String>,
    pub shell: bool,
    /// The only environment the task gets besides a minimal PATH/HOME/sandbox set.
    pub env: Vec<(String, String)>,
}

/// The sha256 of an artifact in the master's content-addressed store, as 64 lowercase hex digits.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Digest(String);

/// Text that is not a sha256 digest.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a sha256 digest (64 hex digits)")]
pub struct BadDigest(pub String);

impl Digest {
    /// Parses 64 hex digits (either case; kept lowercase).
    pub fn parse(s: &str) -> Result<Self, BadDigest> {
        if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(Self(s.to_ascii_lowercase()))
        } else {
            Err(BadDigest(s.to_string()))
        }
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        use sha2::Digest as _;
        Self(hex::encode(sha2::Sha256::digest(bytes)))
    }

    /// Wraps a finished hasher.
    pub fn from_hasher(hasher: sha2::Sha256) -> Self {
        use sha2::Digest as _;
        Self(hex::encode(hasher.finalize()))
    }

    /// Whether a digest that came off the wire is well formed (peers can send anything).
    pub fn is_valid(&self) -> bool {
        self.0.len() == 64 && self.0.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What an artifact is; decides how the master checks it at upload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ArtifactKind {
    /// A WebAssembly core module or component: validated at upload (must be a WASI command
    /// importing only what Agora provides).
    WasmModule,
    /// A tar archive of a directory shipped with a task (`--dir LOCAL::GUEST`).
    Archive,
    /// A program (an ELF binary or a `#!` script), e.g. a framework's executor: fetched into a
    /// sandbox with the execute bit when a task's [`FetchInfo`] asks for it.
    Executable,
}

/// A reference to an artifact in the master's store.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ArtifactRef {
    pub digest: Digest,
    pub size: u64,
}

/// A directory shipped with a Wasm task: the agent unpacks `archive` into the task's sandbox
/// and the executor preopens it at `guest`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirMount {
    pub archive: ArtifactRef,
    /// The path the guest sees (e.g. `/data`).
    pub guest: String,
}

/// A WebAssembly task, run by the agent's Wasm executor for the framework.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WasmInfo {
    /// The module or component (uploaded to the master's artifact store first).
    pub module: ArtifactRef,
    /// The guest's argv, `argv[0]` included.
    pub args: Vec<String>,
    /// The guest's whole environment (no host variables are passed).
    pub env: Vec<(String, String)>,
    /// Directories shipped with the task, the only ones the guest can open.
    pub dirs: Vec<DirMount>,
    /// Total fuel budget; the task fails with `fuel exhausted` when it is spent.
    pub fuel: Option<u64>,
    /// Wall-time limit; the task fails with `timeout` when it is reached.
    pub timeout: Option<Duration>,
}

/// A file the agent fetches from the master's artifact store into an executor's sandbox
/// before starting it (the job of Mesos's fetcher): verified by digest, placed at `path`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchInfo {
    pub artifact: ArtifactRef,
    /// Where it goes, relative to the executor's sandbox (no `..`, not absolute).
    pub path: String,
    /// Set the execute bit (for the executor's own binary).
    pub executable: bool,
}

/// A framework's own executor: a program the agent starts in a sandbox of its own, the first
/// time a task names `executor_id` on that agent, and that runs every task of the framework
/// naming the same id there (see [`crate::executor`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutorInfo {
    pub executor_id: ExecutorId,
    /// Shown in logs and listings.
    pub name: String,
    /// What starts it, run in its sandbox: `argv[0]` is usually a fetched file
    /// (`./my-executor`). Its environment is `command.env` plus the `AGORA_EXECUTOR_*`
    /// variables the SDK reads.
    pub command: CommandInfo,
    /// The executor's own resources, on top of its tasks'. They are taken from the offer that
    /// launches its first task on an agent and held until the executor ends.
    pub resources: Resources,
    /// Files to place in its sandbox first.
    pub fetch: Vec<FetchInfo>,
}

/// A task run by a framework's own executor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutorTask {
    pub executor: ExecutorInfo,
    /// Opaque bytes for the executor (at most [`MAX_TASK_DATA`]).
    pub data: Vec<u8>,
}

/// How a task runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskKind {
    /// A native process under the built-in command executor.
    Command(CommandInfo),
    /// A WebAssembly module under the built-in Wasm executor.
    Wasm(Box<WasmInfo>),
    /// A task handed to the framework's own executor.
    Executor(Box<ExecutorTask>),
}

impl TaskKind {
    /// The executor that runs tasks of this kind.
    pub fn executor_id(&self) -> ExecutorId {
        match self {
            TaskKind::Command(_) => ExecutorId::new(COMMAND_EXECUTOR_ID),
            TaskKind::Wasm(_) => ExecutorId::new(WASM_EXECUTOR_ID),
            TaskKind::Executor(t) => t.executor.executor_id.clone(),
        }
    }
}

/// A task a framework launches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskInfo {
    pub task_id: TaskId,
    pub name: String,
    pub resources: Resources,
    pub kind: TaskKind,
    /// Time between SIGTERM and SIGKILL when the task is killed (default 3 s).
    pub kill_grace: Option<Duration>,
    /// The OS user the task runs as on its agent (`None`: its framework's user, else the
    /// agent's `--task-user`). The master checks it against the principal's ACL grants and
    /// sends the agent the effective user; the agent refuses root and unknown users.
    #[serde(default)]
    pub user: Option<String>,
}

/// Who produced a status update.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpdateSource {
    Master,
    Agent,
    Executor,
}

/// Resource usage of a task, as far as it is known.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub cpu_time: Option<Duration>,
    pub peak_mem: Option<u64>,
    pub fuel: Option<u64>,
    /// Time the task was held back by its CPU quota (cgroup CFS throttling).
    pub throttled: Option<Duration>,
    /// Memory charged to the task's cgroup when it was last measured (bytes).
    pub mem_current: Option<u64>,
}

/// Names a task: task ids are unique within a framework only, so a task is known by both.
/// The key of the master's task table and of the agent's.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskKey {
    /// The owning framework.
    pub framework_id: FrameworkId,
    /// The task.
    pub task_id: TaskId,
}

impl TaskKey {
    pub fn new(framework_id: FrameworkId, task_id: TaskId) -> Self {
        Self { framework_id, task_id }
    }
}

/// A task status update.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatus {
    pub task_id: TaskId,
    pub framework_id: FrameworkId,
    pub agent_id: Option<AgentId>,
    pub state: TaskState,
    /// Set on updates that must be acknowledged (agent-generated). Reconciliation answers and
    /// master-generated updates carry none.
    pub uuid: Option<Uuid>,
    pub source: UpdateSource,
    /// Short machine-friendly reason, e.g. `command exited`, `killed by signal`,
    /// `invalid launch`, `agent unreachable` (its text on the wire and in JSON).
    pub reason: Reason,
    /// Human detail.
    pub message: String,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub usage: Option<Usage>,
    /// Unix time in milliseconds.
    pub timestamp_ms: u64,
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
