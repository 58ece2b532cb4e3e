//! The wire protocol: one serde enum per direction, postcard-encoded in length-delimited frames
//! (see [`crate::frame`]). Every connection opens with [`Hello`] / [`HelloReply`] on its first
//! bidirectional stream (the control stream). Bulk data (task output) uses streams of its own.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::attributes::Attributes;
pub use crate::reason::{OtherReason, Reason};
use crate::resources::Resources;

/// Bumped on any incompatible change to the messages below.
pub const PROTOCOL_VERSION: u32 = 5;

/// ALPN protocol name of Agora's QUIC connections.
pub const ALPN: &[u8] = b"agora/1";

macro_rules! id_type {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(pub String);

        impl $name {
            pub fn new(s: impl Into<String>) -> Self {
                Self(s.into())
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_string())
            }
        }
    };
}

id_type!(
    /// Assigned by the master at first registration; kept by the agent in its work dir.
    AgentId
);
id_type!(
    /// Assigned by the master at first subscription; a framework re-subscribes with it to fail over.
    FrameworkId
);
id_type!(
    /// Assigned by the master, one per offer.
    OfferId
);
id_type!(
    /// Chosen by the framework; unique within the framework.
    TaskId
);
id_type!(
    /// Names an executor within its framework on one agent: tasks of one framework that name
    /// the same executor id on one agent run in the same executor process. Chosen by the
    /// framework for its own executors; the built-in ones are [`COMMAND_EXECUTOR_ID`] and
    /// [`WASM_EXECUTOR_ID`] (ids starting `agora-` are reserved).
    ExecutorId
);

/// Executor id of the built-in command executor (native command tasks).
pub const COMMAND_EXECUTOR_ID: &str = "agora-command";
/// Executor id of the built-in Wasm executor.
pub const WASM_EXECUTOR_ID: &str = "agora-wasm";
/// Largest framework message (scheduler → executor or executor → scheduler), bytes of `data`.
pub const MAX_FRAMEWORK_MESSAGE: usize = 64 << 10;
/// Longest reason a framework may give with [`SchedulerCall::TeardownBecause`].
pub const MAX_TEARDOWN_REASON: usize = 200;
/// Largest opaque `data` a task may carry to its executor, bytes.
pub const MAX_TASK_DATA: usize = 256 << 10;
/// Most files an executor may ask to have fetched into its sandbox.
pub const MAX_EXECUTOR_FETCHES: usize = 64;

/// What a peer is, as named by its client certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    Master,
    Agent,
    Framework,
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Master => "master",
            Role::Agent => "agent",
            Role::Framework => "framework",
            Role::Operator => "operator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is none of the four.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown role `{0}` (master, agent, framework, operator)")]
pub struct UnknownRole(pub String);

impl std::str::FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Self, UnknownRole> {
        match s {
            "master" => Ok(Role::Master),
            "agent" => Ok(Role::Agent),
            "framework" => Ok(Role::Framework),
            "operator" => Ok(Role::Operator),
            other => Err(UnknownRole(other.to_string())),
        }
    }
}

/// Error classes carried on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    VersionMismatch,
    Unauthorized,
    Malformed,
    TooLarge,
    Unexpected,
    NotFound,
    Invalid,
    Internal,
}

impl ErrorCode {
    /// Every error code.
    pub const ALL: [ErrorCode; 8] = [
        ErrorCode::VersionMismatch,
        ErrorCode::Unauthorized,
        ErrorCode::Malformed,
        ErrorCode::TooLarge,
        ErrorCode::Unexpected,
        ErrorCode::NotFound,
        ErrorCode::Invalid,
        ErrorCode::Internal,
    ];

    /// The QUIC application error code the master closes a connection with for this error
    /// (1 to 8; 0 is a normal close).
    pub fn close_code(self) -> u32 {
        match self {
            ErrorCode::VersionMismatch => 1,
            ErrorCode::Unauthorized => 2,
            ErrorCode::Malformed => 3,
            ErrorCode::TooLarge => 4,
            ErrorCode::Unexpected => 5,
            ErrorCode::NotFound => 6,
            ErrorCode::Invalid => 7,
            ErrorCode::Internal => 8,
        }
    }

    /// The error a connection close code stands for (see [`ErrorCode::close_code`]).
    pub fn from_close_code(code: u64) -> Option<ErrorCode> {
        Self::ALL.into_iter().find(|c| u64::from(c.close_code()) == code)
    }
}

/// An error reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

/// First frame on every connection's control stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Hello {
    pub version: u32,
    /// Must match the role in the client certificate.
    pub role: Role,
    /// An operator that accepts a stale answer (`agora agents|frameworks|masters
    /// --allow-stale`): a standby then answers [`HelloReply::Stale`] instead of `NotLeader` and
    /// serves the listings it can read itself. The leader ignores it.
    ///
    /// Added within protocol version 3 as an optional last field, so that nothing else
    /// changes: a hello without it (an older peer) decodes as `false`, and a master that
    /// predates it reads the hello's first two fields only (postcard leaves trailing bytes
    /// alone) and answers as to any hello.
    pub allow_stale: bool,
}

impl Hello {
    /// A hello of this protocol version as `role`, not accepting stale answers.
    pub fn new(role: Role) -> Self {
        Hello { version: PROTOCOL_VERSION, role, allow_stale: false }
    }
}

impl<'de> Deserialize<'de> for Hello {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = Hello;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a hello: version, role and optionally allow_stale")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Hello, A::Error> {
                use serde::de::Error;
                let version = seq.next_element()?.ok_or_else(|| A::Error::invalid_length(0, &self))?;
                let role = seq.next_element()?.ok_or_else(|| A::Error::invalid_length(1, &self))?;
                // The optional last field: its absence (the frame ends) reads as `false`.
                let allow_stale = seq.next_element().ok().flatten().unwrap_or(false);
                Ok(Hello { version, role, allow_stale })
            }
        }
        d.deserialize_struct("Hello", &["version", "role", "allow_stale"], Fields)
    }
}

/// The master's answer to [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    /// Go ahead.
    Welcome {
        version: u32,
        master_id: String,
        /// The leader's epoch (its election's number; with one master, the registry's start
        /// count). A peer that has seen a higher epoch drops this connection: it talks to a
        /// deposed leader.
        epoch: u64,
    },
    Refused(WireError),
    /// This master is a standby (several masters, see `agora master --etcd`): it serves
    /// nothing; connect to `leader` (`host:port`) if known, or try the next master.
    NotLeader {
        leader: Option<String>,
    },
    /// Only to a hello with [`Hello::allow_stale`]: this master is a standby and will answer
    /// `GetAgents`, `GetFrameworks` and `GetMasters` from what it reads itself (the registry
    /// in etcd), which may lag the leader's view, and refuse every other call. `master_id` is
    /// its member id; `leader` the leader's address, if known.
    Stale {
        master_id: String,
        leader: Option<String>,
    },
}

// ---------------------------------------------------------------------------------------------
// Tasks

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

// ---------------------------------------------------------------------------------------------
// Agent <-> master

/// A task the agent reports when it (re-)registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskReport {
    pub framework_id: FrameworkId,
    pub task: TaskInfo,
    pub state: TaskState,
}

/// Agent → master.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMessage {
    /// First message after the handshake. `agent_id` is `Some` when re-registering.
    Register {
        agent_id: Option<AgentId>,
        hostname: String,
        resources: Resources,
        attributes: Attributes,
        /// Tasks the agent still runs (re-registration).
        tasks: Vec<TaskReport>,
    },
    Heartbeat,
    StatusUpdate(TaskStatus),
    /// Tasks for the `Register` that follows, when they do not all fit in its frame (an agent
    /// with thousands of tasks): the master adds them to that registration.
    TaskReports(Vec<TaskReport>),
    /// A framework's executor sent its scheduler a message (at most once: not retried).
    FrameworkMessage {
        framework_id: FrameworkId,
        executor_id: ExecutorId,
        data: Vec<u8>,
    },
    /// A framework's own executor ended (its unfinished tasks were failed): its resources are
    /// free again.
    ExecutorExited {
        framework_id: FrameworkId,
        executor_id: ExecutorId,
        /// How it ended, e.g. `exit status 3`.
        message: String,
    },
    /// A task's terminal update while an earlier one still awaits its framework's
    /// acknowledgement (updates go out one at a time, in order): the master shows this state
    /// (and frees a terminal task's resources) at once, but forwards nothing; the update
    /// itself follows in order, e.g. a detached run's task killed: TASK_KILLED behind a
    /// TASK_KILLING nobody acknowledges. (A variant of its own, last, so that postcard's
    /// variant indexes of the others stay.)
    LatestState(TaskStatus),
}

/// Master → agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MasterToAgent {
    Registered {
        agent_id: AgentId,
        heartbeat_interval: Duration,
    },
    RunTask {
        framework_id: FrameworkId,
        task: TaskInfo,
    },
    KillTask {
        framework_id: FrameworkId,
        task_id: TaskId,
    },
    /// The framework acknowledged this update; stop retrying it.
    StatusAck {
        framework_id: FrameworkId,
        task_id: TaskId,
        uuid: Uuid,
    },
    HeartbeatAck,
    /// The framework is gone for good: kill all its tasks.
    ShutdownFramework {
        framework_id: FrameworkId,
    },
    Error(WireError),
    /// A scheduler's message for one of its executors on this agent (dropped when there is
    /// no such executor: at most once).
    FrameworkMessage {
        framework_id: FrameworkId,
        executor_id: ExecutorId,
        data: Vec<u8>,
    },
    /// The framework asks for one of its executors to be shut down (its tasks are killed).
    ShutdownExecutor {
        framework_id: FrameworkId,
        executor_id: ExecutorId,
    },
}

// ---------------------------------------------------------------------------------------------
// Framework <-> master

/// What a framework tells the master about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameworkInfo {
    /// `Some` to re-subscribe (fail over) as an existing framework.
    pub id: Option<FrameworkId>,
    pub name: String,
    pub role: String,
    /// How long the master keeps the framework's tasks after it disconnects.
    pub failover_timeout: Duration,
    pub hostname: String,
    /// The OS user the framework's tasks run as unless a task names its own (`None`: the
    /// agent's `--task-user`).
    #[serde(default)]
    pub user: Option<String>,
}

/// A resource offer: free resources on one agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    pub id: OfferId,
    pub framework_id: FrameworkId,
    pub agent_id: AgentId,
    pub hostname: String,
    pub resources: Resources,
    pub attributes: Attributes,
}

/// Operations inside an ACCEPT.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operation {
    Launch { tasks: Vec<TaskInfo> },
}

/// Part of a framework's pending demand: `count` tasks of shape `resources` (flat quantities,
/// no reservation breakdown).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Demand {
    pub resources: Resources,
    pub count: u32,
}

/// Framework → master.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SchedulerCall {
    /// First message after the handshake.
    Subscribe(FrameworkInfo),
    /// Use offers (all on one agent). Unused resources go back to the allocator; with
    /// `refuse_seconds` they are not re-offered to this framework for that long.
    Accept {
        offer_ids: Vec<OfferId>,
        operations: Vec<Operation>,
        refuse_seconds: Option<f64>,
    },
    /// Refuse offers; they are not re-offered to this framework for `refuse_seconds` (default 5).
    Decline {
        offer_ids: Vec<OfferId>,
        refuse_seconds: Option<f64>,
    },
    /// Clear all filters and resume offers.
    Revive,
    /// Stop offers until REVIVE.
    Suppress,
    /// The framework's pending demand: it replaces the previous one. With a demand the
    /// allocator sizes this framework's offers to task shapes it can use (several frameworks
    /// may then share one agent in one cycle); an empty demand asks for nothing. A framework
    /// that never sends one gets whole agents, as in Mesos. Tasks the master offered count as
    /// served: state the demand again after declining or losing (rescind) an offer.
    Request {
        demands: Vec<Demand>,
    },
    Kill {
        task_id: TaskId,
    },
    Acknowledge {
        agent_id: AgentId,
        task_id: TaskId,
        uuid: Uuid,
    },
    /// Ask for the latest state of these tasks; an empty list asks for all (implicit).
    Reconcile {
        task_ids: Vec<TaskId>,
    },
    /// Leave for good: kill all tasks, forget the framework.
    Teardown,
    Heartbeat,
    /// A message for one of this framework's executors (at most once, at most
    /// [`MAX_FRAMEWORK_MESSAGE`] bytes).
    Message {
        agent_id: AgentId,
        executor_id: ExecutorId,
        data: Vec<u8>,
    },
    /// Shut one of this framework's executors down; its tasks are killed.
    ShutdownExecutor {
        agent_id: AgentId,
        executor_id: ExecutorId,
    },
    /// Explicit reconciliation naming, for each task, the agent it was last seen on (from its
    /// latest update), so that the master can tell a task gone with its agent (TASK_GONE), one
    /// on an agent it cannot reach (TASK_UNREACHABLE) and one it never heard of
    /// (TASK_UNKNOWN). An empty list asks for all tasks, as `Reconcile` does.
    ReconcileTasks {
        tasks: Vec<ReconcileTask>,
    },
    /// `Teardown` naming why: the tasks it kills end KILLED with `reason` (at most
    /// [`MAX_TEARDOWN_REASON`] bytes) instead of the agent's `killed`, e.g. `run interrupted`.
    /// (A variant of its own, last, so that postcard's variant indexes of the others stay.)
    TeardownBecause {
        reason: Reason,
    },
    /// `Request` naming the tasks that wait: `task_ids[i]` are the tasks of `demands[i]` (at
    /// most its count, at most [`MAX_PENDING_IDS`] in all; an entry may name none), shown to
    /// operators as pending (`agora tasks`) with why they wait. (A variant of its own, last,
    /// so that postcard's variant indexes of the others stay.)
    RequestTasks {
        demands: Vec<Demand>,
        task_ids: Vec<Vec<TaskId>>,
    },
}

/// Most task ids a [`SchedulerCall::RequestTasks`] may name (the master keeps no more).
pub const MAX_PENDING_IDS: usize = 1_000;

/// One task of an explicit reconciliation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileTask {
    pub task_id: TaskId,
    /// The agent the framework last knew the task on.
    pub agent_id: Option<AgentId>,
}

/// Master → framework.
// Status updates are most of this stream; boxing them would add an allocation per update.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SchedulerEvent {
    Subscribed {
        framework_id: FrameworkId,
        heartbeat_interval: Duration,
    },
    Offers(Vec<Offer>),
    Rescind {
        offer_id: OfferId,
    },
    Update(TaskStatus),
    /// A call could not be carried out (the connection stays open unless the error is fatal).
    Error(WireError),
    Heartbeat,
    /// A message from one of this framework's executors.
    Message {
        agent_id: AgentId,
        executor_id: ExecutorId,
        data: Vec<u8>,
    },
    /// One of this framework's own executors ended.
    ExecutorExited {
        agent_id: AgentId,
        executor_id: ExecutorId,
        message: String,
    },
    /// An operator drains this agent (`agora agent drain`): it gets no new offers, and at
    /// `deadline_unix_ms` (if any) the tasks still running on it are killed with reason
    /// [`Reason::AgentDrained`] (unless the operator chose not to kill). Sent to every
    /// subscribed framework when the drain starts or changes, and on subscription while it
    /// lasts, so that a scheduler can move its work elsewhere in time.
    AgentDraining {
        agent_id: AgentId,
        /// Unix time (ms) of the deadline; `None`: no deadline (nothing is killed).
        deadline_unix_ms: Option<u64>,
    },
    /// The drain of this agent was called off (`agora agent undrain`): it is offered again.
    AgentUndrained {
        agent_id: AgentId,
    },
}

/// Longest drain deadline an operator may set (a bound on a peer's claims; 30 days).
pub const MAX_DRAIN_DEADLINE: Duration = Duration::from_secs(30 * 24 * 3600);

// ---------------------------------------------------------------------------------------------
// Operator (CLI) <-> master

/// An agent's drain as the operator sees it (see [`OperatorCall::DrainAgent`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainView {
    /// Unix time (ms) at which its remaining tasks are killed (`None`: no deadline).
    pub deadline_unix_ms: Option<u64>,
    /// Whether the tasks still running at the deadline are killed.
    pub kill: bool,
}

/// An agent as the operator sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentView {
    pub id: AgentId,
    pub hostname: String,
    pub resources: Resources,
    pub used: Resources,
    pub attributes: Attributes,
    /// `active`, `draining` (active, drained by an operator, with tasks left), `drained`
    /// (the same with no task left), `disconnected`, `unreachable` or `recovering` (not
    /// re-registered since the master started); a standby's stale listing says `registered`.
    pub status: AgentViewStatus,
    pub tasks: u64,
    /// The agent's drain, if an operator drains it (whatever its status).
    pub drain: Option<DrainView>,
}

/// Serde for an enum of unit variants as its text ([`fmt::Display`] / `as_str`), in JSON as in
/// postcard: the bytes are those of the `String` field it replaced, so peers of either kind
/// read each other.
macro_rules! text_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident => $text:literal,)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vm])* $variant,)*
        }

        impl $name {
            /// Every value, for tests and docs.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            /// Its text, as operators see it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)*
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownStatus;
            fn from_str(s: &str) -> Result<Self, UnknownStatus> {
                match s {
                    $($text => Ok($name::$variant),)*
                    _ => Err(UnknownStatus(s.chars().take(64).collect())),
                }
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Text;
                impl serde::de::Visitor<'_> for Text {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str(concat!("a ", stringify!($name), " (text)"))
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$name, E> {
                        v.parse().map_err(E::custom)
                    }
                }
                d.deserialize_str(Text)
            }
        }
    };
}

/// A status text that is none of its kind's.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown status `{0}`")]
pub struct UnknownStatus(pub String);

text_enum!(
    /// An agent's status as the operator sees it ([`AgentView::status`]).
    AgentViewStatus {
        /// Registered and connected.
        Active => "active",
        /// Active, drained by an operator, with tasks left.
        Draining => "draining",
        /// Active, drained by an operator, with no task left.
        Drained => "drained",
        /// Its connection is gone, within the agent timeout.
        Disconnected => "disconnected",
        /// Silent past the agent timeout.
        Unreachable => "unreachable",
        /// Not re-registered since the master started.
        Recovering => "recovering",
        /// In a standby's stale listing: admitted, status unknown.
        Registered => "registered",
    }
);

text_enum!(
    /// A framework's status as the operator sees it ([`FrameworkView::status`]).
    FrameworkViewStatus {
        /// Subscribed and connected.
        Active => "active",
        /// Its connection is gone, within its failover timeout.
        Disconnected => "disconnected",
        /// Connected, asking for no offers.
        Suppressed => "suppressed",
        /// Ended (torn down or past its failover timeout).
        Completed => "completed",
        /// In a standby's stale listing: registered, status unknown.
        Registered => "registered",
    }
);

/// A framework as the operator sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameworkView {
    pub id: FrameworkId,
    pub name: String,
    pub role: String,
    pub principal: String,
    /// `active`, `disconnected` (within its failover timeout), `suppressed` or `completed`; a
    /// standby's stale listing says `registered`.
    pub status: FrameworkViewStatus,
    pub used: Resources,
    pub tasks: u64,
}

/// A task as the operator sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskView {
    pub id: TaskId,
    pub name: String,
    pub framework_id: FrameworkId,
    pub agent_id: AgentId,
    pub state: TaskState,
    pub resources: Resources,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub reason: Reason,
    pub message: String,
    pub usage: Option<Usage>,
    /// The executor that runs it ([`COMMAND_EXECUTOR_ID`], [`WASM_EXECUTOR_ID`] or the
    /// framework's own).
    pub executor_id: ExecutorId,
}

/// One change of a task's state, as the master saw it (`agora describe task`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskTransition {
    pub state: TaskState,
    /// The reason of the update that brought it ([`Reason::None`], the empty text, for a
    /// launch).
    pub reason: Reason,
    /// When the master applied it: Unix time in milliseconds.
    pub timestamp_ms: u64,
}

/// Operator → master, on the control stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OperatorCall {
    GetAgents,
    GetFrameworks,
    GetTasks,
    KillTask {
        task_id: TaskId,
    },
    /// The frameworks that ended (torn down or past their failover timeout) since the master
    /// started, oldest first (a bounded history, status `completed`); answered with
    /// `Frameworks`.
    GetCompletedFrameworks,
    /// Every master of the cluster and which one leads; answered with `Masters`.
    GetMasters,
    /// The allocation policy in force; answered with `Policy`.
    GetPolicy,
    /// Replaces the allocation policy (weights, priorities, quotas): recorded in the registry
    /// before the `Ok`, so it outlives restarts and failovers, and in force from the next
    /// allocation. A policy the master cannot read is refused, naming the entry.
    SetPolicy(AllocationPolicy),
    /// A task's last state changes (a bounded history, oldest first); answered with
    /// `TaskHistory`, or `NotFound` when the master no longer knows the task.
    GetTaskHistory {
        framework_id: FrameworkId,
        task_id: TaskId,
    },
    /// Drains an agent (Nomad's `node drain`, Mesos's maintenance): its offers are rescinded
    /// and it gets no new ones, every framework is told ([`SchedulerEvent::AgentDraining`]),
    /// and at the deadline (at most [`MAX_DRAIN_DEADLINE`]) the tasks still running on it are
    /// killed with reason [`Reason::AgentDrained`] when `kill` is set. No deadline: nothing is
    /// killed. Draining a draining agent replaces its deadline and `kill`. Recorded in the
    /// registry before the `Ok`, so the drain outlives restarts and failovers. An unknown
    /// agent is `NotFound`.
    DrainAgent {
        agent_id: AgentId,
        deadline: Option<Duration>,
        kill: bool,
    },
    /// Ends an agent's drain: it is offered again and frameworks are told
    /// ([`SchedulerEvent::AgentUndrained`]). `Ok` also when it was not draining.
    UndrainAgent {
        agent_id: AgentId,
    },
    /// The tasks of frameworks' stated demands that wait for resources, with why (at most
    /// [`MAX_PENDING_IDS`] entries); answered with `PendingTasks`.
    GetPendingTasks,
}

/// The allocation policy, in the spelling of `agora master`'s flags (`--weights`,
/// `--priorities`, `--quota`, `--quota-limit`). Set at run time with `agora policy set`, it
/// is kept in the registry and wins over the flags from then on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationPolicy {
    /// Role weights for weighted fair sharing, `analytics=2,web=1` (a role not named weighs 1).
    pub weights: String,
    /// Role priorities for strict priority, `prod=10,batch=1` (a role not named has 0).
    pub priorities: String,
    /// Guaranteed minimums, one role each: `analytics=cpus:4;mem:8GiB`.
    pub quotas: Vec<String>,
    /// Maxima, one role each: `batch=cpus:16`.
    pub quota_limits: Vec<String>,
}

/// One master of the cluster, as `agora masters` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterView {
    /// The master's id.
    pub id: String,
    /// `host:port` its peers connect to.
    pub address: String,
    /// Whether it is the leader.
    pub leader: bool,
    /// The leader's epoch (0 for a standby that has never led).
    pub epoch: u64,
}

/// Master → operator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OperatorReply {
    Agents(Vec<AgentView>),
    Frameworks(Vec<FrameworkView>),
    Tasks(Vec<TaskView>),
    Ok,
    Error(WireError),
    /// Leading parts of a list too large for one frame; the list's own variant ends it.
    AgentsPart(Vec<AgentView>),
    FrameworksPart(Vec<FrameworkView>),
    TasksPart(Vec<TaskView>),
    /// The cluster's masters (see [`OperatorCall::GetMasters`]).
    Masters(Vec<MasterView>),
    /// The allocation policy in force (see [`OperatorCall::GetPolicy`]).
    Policy {
        policy: AllocationPolicy,
        /// Where it comes from: `registry` (set with `agora policy set`) or `flags` (the
        /// leader's command line).
        source: String,
    },
    /// A task's state changes (see [`OperatorCall::GetTaskHistory`]).
    TaskHistory(Vec<TaskTransition>),
    /// Tasks that wait for resources (see [`OperatorCall::GetPendingTasks`]).
    PendingTasks(Vec<PendingTaskView>),
}

/// Tasks of a framework's stated demand that wait for resources, as operators see them
/// (`agora tasks` lists them as `TASK_PENDING`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingTaskView {
    /// The task, when the framework named it ([`SchedulerCall::RequestTasks`]); `None`: `count`
    /// unnamed tasks of this shape.
    pub task_id: Option<TaskId>,
    /// How many tasks this entry stands for (1 for a named task).
    pub count: u32,
    pub framework_id: FrameworkId,
    pub framework_name: String,
    pub role: String,
    /// What each task needs.
    pub resources: Resources,
    /// Why it waits, computed against the agents' free resources now, e.g. `waiting: needs
    /// cpus:0.5, largest free cpus:0.2`.
    pub reason: String,
}

// ---------------------------------------------------------------------------------------------
// Output streams

/// Which output file of a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// First frame of every bulk stream a peer opens (client → master, agent → master,
/// master → agent): what the stream is for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamRequest {
    /// A task's stdout or stderr; answered with [`OutputReply`] then raw bytes.
    Output(OutputRequest),
    /// Store an artifact (operators and frameworks); answered with [`UploadReply`].
    Upload(UploadRequest),
    /// Read an artifact (agents); answered with [`FetchReply`] then exactly `size` raw bytes.
    Fetch { digest: Digest },
    /// List a directory of a task's sandbox or read a file of it (frameworks for their own
    /// tasks, operators; relayed by the master to the agent); answered with [`FilesReply`].
    Files(FilesRequest),
}

/// Longest sandbox path a [`FilesRequest`] may name.
pub const MAX_SANDBOX_PATH: usize = 1024;
/// Most entries one [`FilesReply::Listing`] carries (the rest is cut, `truncated` set).
pub const MAX_LISTING: usize = 1000;

/// A directory or file of a task's sandbox: `path` is relative to the sandbox (`""` is the
/// sandbox itself), plain names only (no `..`, not absolute); symbolic links are followed only
/// while they stay inside the sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilesRequest {
    pub task_id: TaskId,
    /// Filled in by the master when it forwards the request to the agent.
    pub framework_id: Option<FrameworkId>,
    pub path: String,
    /// Read the file (`Sending` then its bytes) rather than list the directory.
    pub read: bool,
}

/// The answer to a [`FilesRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FilesReply {
    /// The directory's entries, by name (at most [`MAX_LISTING`]).
    Listing {
        entries: Vec<FileEntry>,
        truncated: bool,
    },
    /// The file follows: exactly `size` raw bytes, then the stream finishes.
    Sending {
        size: u64,
    },
    Error(WireError),
}

/// One entry of a sandbox directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
    /// Last modification, Unix milliseconds.
    pub modified_ms: u64,
}

/// What a sandbox entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
    /// A symbolic link (not followed in listings).
    Link,
    Other,
}

impl FileKind {
    /// `file`, `dir`, `link` or `other`.
    pub fn as_str(self) -> &'static str {
        match self {
            FileKind::File => "file",
            FileKind::Dir => "dir",
            FileKind::Link => "link",
            FileKind::Other => "other",
        }
    }
}

/// Puts an artifact into the master's content-addressed store. The master answers at once with
/// [`UploadReply::Present`] when it holds the digest already (nothing more is sent), or with
/// [`UploadReply::Send`]; the client then sends exactly `size` raw bytes and finishes its side,
/// and the master answers [`UploadReply::Stored`] once the bytes hash to `digest` and pass the
/// checks for `kind`, or [`UploadReply::Error`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadRequest {
    pub kind: ArtifactKind,
    pub digest: Digest,
    pub size: u64,
    /// Shown in logs and errors (e.g. the local file name).
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UploadReply {
    Present,
    Send,
    Stored,
    Error(WireError),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FetchReply {
    Sending { size: u64 },
    Error(WireError),
}

/// Opens a bulk stream for a task's output. Sent as [`StreamRequest::Output`] on a new
/// bidirectional stream (client → master, and master → agent); the answer is one [`OutputReply`] frame followed by
/// the raw bytes until the stream finishes. With `follow`, the stream stays open until the
/// task is terminal and every byte was sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputRequest {
    pub task_id: TaskId,
    /// Filled in by the master when it forwards the request to the agent.
    pub framework_id: Option<FrameworkId>,
    pub stream: OutputStream,
    pub offset: u64,
    pub follow: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutputReply {
    Streaming,
    Error(WireError),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `TaskStatus` as it was with a `String` reason.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct TaskStatusV5 {
        task_id: TaskId,
        framework_id: FrameworkId,
        agent_id: Option<AgentId>,
        state: TaskState,
        uuid: Option<Uuid>,
        source: UpdateSource,
        reason: String,
        message: String,
        exit_code: Option<i32>,
        signal: Option<i32>,
        usage: Option<Usage>,
        timestamp_ms: u64,
    }

    /// `AgentView` as it was with a `String` status.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct AgentViewV5 {
        id: AgentId,
        hostname: String,
        resources: Resources,
        used: Resources,
        attributes: Attributes,
        status: String,
        tasks: u64,
        drain: Option<DrainView>,
    }

    /// `FrameworkView` as it was with a `String` status.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct FrameworkViewV5 {
        id: FrameworkId,
        name: String,
        role: String,
        principal: String,
        status: String,
        used: Resources,
        tasks: u64,
    }

    fn status_v5(reason: &str) -> TaskStatusV5 {
        TaskStatusV5 {
            task_id: TaskId::new("t"),
            framework_id: FrameworkId::new("f"),
            agent_id: Some(AgentId::new("a")),
            state: TaskState::Failed,
            uuid: Some(Uuid::from_u128(7)),
            source: UpdateSource::Agent,
            reason: reason.into(),
            message: "m".into(),
            exit_code: Some(3),
            signal: None,
            usage: None,
            timestamp_ms: 42,
        }
    }

    #[test]
    fn task_status_reads_and_writes_as_with_a_string_reason() {
        let texts = Reason::KNOWN.iter().map(|r| r.as_str().to_string()).chain(["my executor's own".into()]);
        for text in texts {
            let old = status_v5(&text);
            let old_bytes = postcard::to_allocvec(&old).unwrap();
            let new: TaskStatus = postcard::from_bytes(&old_bytes).unwrap();
            assert_eq!(new.reason.as_str(), text);
            assert_eq!(postcard::to_allocvec(&new).unwrap(), old_bytes, "{text}");
            // JSON (`agora tasks -o json`, the HTTP API): the same document, reason a string.
            let json = serde_json::to_value(&new).unwrap();
            assert_eq!(json, serde_json::to_value(&old).unwrap());
            assert_eq!(json["reason"], serde_json::Value::String(text.clone()));
            let transition =
                TaskTransition { state: TaskState::Failed, reason: new.reason.clone(), timestamp_ms: 1 };
            assert_eq!(serde_json::to_value(&transition).unwrap()["reason"], serde_json::Value::String(text));
        }
        assert_eq!(serde_json::to_value(status_v5("")).unwrap()["reason"], "");
        let none: TaskStatus = postcard::from_bytes(&postcard::to_allocvec(&status_v5("")).unwrap()).unwrap();
        assert_eq!(none.reason, Reason::None);
    }

    #[test]
    fn view_statuses_read_and_write_as_their_former_text() {
        for &status in AgentViewStatus::ALL {
            let old = AgentViewV5 {
                id: AgentId::new("a"),
                hostname: "h".into(),
                resources: Resources::cpus(1000),
                used: Resources::default(),
                attributes: Attributes::default(),
                status: status.as_str().into(),
                tasks: 2,
                drain: None,
            };
            let old_bytes = postcard::to_allocvec(&old).unwrap();
            let new: AgentView = postcard::from_bytes(&old_bytes).unwrap();
            assert_eq!(new.status, status);
            assert_eq!(postcard::to_allocvec(&new).unwrap(), old_bytes);
            let json = serde_json::to_value(&new).unwrap();
            assert_eq!(json, serde_json::to_value(&old).unwrap());
            assert_eq!(json["status"], status.as_str());
        }
        for &status in FrameworkViewStatus::ALL {
            let old = FrameworkViewV5 {
                id: FrameworkId::new("f"),
                name: "n".into(),
                role: "r".into(),
                principal: "p".into(),
                status: status.as_str().into(),
                used: Resources::default(),
                tasks: 0,
            };
            let old_bytes = postcard::to_allocvec(&old).unwrap();
            let new: FrameworkView = postcard::from_bytes(&old_bytes).unwrap();
            assert_eq!(new.status, status);
            assert_eq!(postcard::to_allocvec(&new).unwrap(), old_bytes);
            assert_eq!(serde_json::to_value(&new).unwrap(), serde_json::to_value(&old).unwrap());
        }
        let words = |all: &[&str]| all.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            AgentViewStatus::ALL.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            words(&[
                "active",
                "draining",
                "drained",
                "disconnected",
                "unreachable",
                "recovering",
                "registered"
            ])
        );
        assert_eq!(
            FrameworkViewStatus::ALL.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            words(&["active", "disconnected", "suppressed", "completed", "registered"])
        );
        // A status this build does not know is an error, not a silent default.
        assert!(serde_json::from_str::<AgentViewStatus>("\"sleeping\"").is_err());
        assert!("ACTIVE".parse::<FrameworkViewStatus>().is_err());
    }

    /// `Hello` as protocol version 3 first shipped it.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct HelloV3 {
        version: u32,
        role: Role,
    }

    #[test]
    fn hellos_with_and_without_allow_stale_decode_both_ways() {
        let old = postcard::to_allocvec(&HelloV3 { version: 3, role: Role::Agent }).unwrap();
        assert_eq!(
            postcard::from_bytes::<Hello>(&old).unwrap(),
            Hello { version: 3, ..Hello::new(Role::Agent) }
        );
        let stale = Hello { allow_stale: true, ..Hello::new(Role::Operator) };
        let new = postcard::to_allocvec(&stale).unwrap();
        assert_eq!(postcard::from_bytes::<Hello>(&new).unwrap(), stale);
        // A master that predates the field reads the rest as before.
        assert_eq!(
            postcard::from_bytes::<HelloV3>(&new).unwrap(),
            HelloV3 { version: PROTOCOL_VERSION, role: Role::Operator }
        );
        assert!(postcard::from_bytes::<Hello>(&old[..1]).is_err(), "a hello without a role");
    }

    #[test]
    fn terminal_states_do_not_move() {
        assert!(TaskState::Staging.can_transition_to(TaskState::Running));
        assert!(TaskState::Running.can_transition_to(TaskState::Finished));
        assert!(!TaskState::Finished.can_transition_to(TaskState::Running));
        assert!(!TaskState::Running.can_transition_to(TaskState::Staging));
        assert!(TaskState::Unreachable.can_transition_to(TaskState::Running));
        for s in TaskState::ALL {
            assert!(s.can_transition_to(s));
        }
    }

    #[test]
    fn terminal_states_refuse_every_other_state() {
        for from in TaskState::ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in TaskState::ALL.into_iter().filter(|&s| s != from) {
                let mut s = from;
                assert_eq!(s.transition(to), Err(InvalidTransition { from, to }), "{from} -> {to}");
                assert_eq!(s, from, "a refused move leaves the state as it was");
            }
        }
    }

    #[test]
    fn todays_moves_are_accepted() {
        use TaskState::*;
        let live = [Staging, Starting, Running, Killing];
        let ends = TaskState::ALL.into_iter().filter(|s| s.is_terminal());
        let mut legal: Vec<(TaskState, TaskState)> = vec![
            (Staging, Starting),
            (Staging, Running),
            (Staging, Killing),
            (Starting, Running),
            (Starting, Killing),
            (Running, Killing),
            (Staging, Unreachable),
            (Running, Unreachable),
            (Killing, Unreachable),
            (Unreachable, Running),
            (Unreachable, Staging),
            (Unknown, Running),
        ];
        for end in ends {
            legal.extend(live.iter().map(|&l| (l, end)));
            legal.extend([(Unreachable, end), (Unknown, end), (end, end)]);
        }
        for (from, to) in legal {
            let mut s = from;
            assert_eq!(s.transition(to), Ok(()), "{from} -> {to}");
            assert_eq!(s, to);
        }
        // Backwards is refused.
        for (from, to) in [(Running, Staging), (Running, Starting), (Killing, Running), (Starting, Staging)] {
            let mut s = from;
            assert!(s.transition(to).is_err(), "{from} -> {to}");
            assert_eq!(s, from);
        }
    }

    #[test]
    fn an_invalid_transition_names_both_states() {
        let mut s = TaskState::Finished;
        let e = s.transition(TaskState::Running).unwrap_err();
        assert_eq!(e.to_string(), "invalid task state transition TASK_FINISHED -> TASK_RUNNING");
    }
}
