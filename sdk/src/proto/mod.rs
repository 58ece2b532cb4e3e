//! The wire protocol: one serde enum per direction, postcard-encoded in length-delimited frames
//! (see [`crate::frame`]). Every connection opens with [`Hello`] / [`HelloReply`] on its first
//! bidirectional stream (the control stream). Bulk data (task output) uses streams of its own.

use std::fmt;

use serde::{Deserialize, Serialize};

pub use crate::reason::{OtherReason, Reason};

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

mod tasks;
pub use tasks::*;
mod agent;
pub use agent::*;
mod scheduler;
pub use scheduler::*;
mod operator;
pub use operator::*;
mod streams;
pub use streams::*;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attributes::Attributes;
    use crate::resources::Resources;
    use uuid::Uuid;

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
