//! Framework <-> master (part of [`crate::proto`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::attributes::Attributes;
use crate::resources::Resources;

use super::*;

/// Most offer ids one `Accept` or `Decline` may name (the master refuses more; the SDK's
/// [`crate::scheduler::Driver::decline`] splits a longer list into calls of this size).
pub const MAX_OFFER_IDS: usize = 1024;

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
