//! Agent <-> master (part of [`crate::proto`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::attributes::Attributes;
use crate::resources::Resources;

use super::*;

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
