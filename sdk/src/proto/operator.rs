//! Operator (CLI) <-> master (part of [`crate::proto`]).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::attributes::Attributes;
use crate::resources::Resources;

use super::*;

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
