//! The records the master core keeps: agents, frameworks, offers, tasks and filters.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use agora_sdk::proto::*;
use agora_sdk::{Attributes, Resources};

use crate::core::ConnId;

/// Tasks are named by framework and task id (task ids are unique within a framework only).
pub(crate) type TaskKey = (FrameworkId, TaskId);

/// Which kind of peer a connection carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Peer {
    Agent(AgentId),
    Framework(FrameworkId),
}

/// Where an agent stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AgentStatus {
    /// Registered on this connection.
    Active { conn: ConnId },
    /// Its connection is gone; its tasks are kept until the agent timeout.
    Disconnected,
    /// Silent past the agent timeout: its tasks are UNREACHABLE until it re-registers.
    Unreachable,
}

impl AgentStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AgentStatus::Active { .. } => "active",
            AgentStatus::Disconnected => "disconnected",
            AgentStatus::Unreachable => "unreachable",
        }
    }
}

#[derive(Debug)]
pub(crate) struct Agent {
    pub id: AgentId,
    pub principal: String,
    pub hostname: String,
    pub total: Resources,
    pub attributes: Attributes,
    pub status: AgentStatus,
    /// Its deadline in the master's agent-timeout queue (absent when unreachable).
    pub deadline: Option<Instant>,
    /// Whether the allocator counts this agent (and its tasks).
    pub attached: bool,
    /// Resources of its non-terminal tasks.
    pub used: Resources,
    /// Resources of its outstanding offers.
    pub offered: Resources,
    pub offers: BTreeSet<OfferId>,
    /// Every task the master keeps on this agent (completed ones are dropped from here).
    pub tasks: BTreeSet<TaskKey>,
}

impl Agent {
    pub(crate) fn new(id: AgentId, principal: String) -> Self {
        Agent {
            id,
            principal,
            hostname: String::new(),
            total: Resources::default(),
            attributes: Attributes::default(),
            status: AgentStatus::Unreachable,
            deadline: None,
            attached: false,
            used: Resources::default(),
            offered: Resources::default(),
            offers: BTreeSet::new(),
            tasks: BTreeSet::new(),
        }
    }

    pub(crate) fn conn(&self) -> Option<ConnId> {
        match self.status {
            AgentStatus::Active { conn } => Some(conn),
            _ => None,
        }
    }

    /// Free resources nobody holds.
    pub(crate) fn available(&self) -> Resources {
        self.total.saturating_sub(&self.used).saturating_sub(&self.offered)
    }
}

/// Whether a framework is reachable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FrameworkLink {
    Connected(ConnId),
    /// Gone since `since`; removed at `deadline` (`None`: a failover timeout too long to
    /// represent, i.e. never).
    Disconnected {
        deadline: Option<Instant>,
    },
}

/// "Do not offer me these resources on this agent until `expires`."
#[derive(Clone, Debug)]
pub(crate) struct Filter {
    pub resources: Resources,
    pub expires: Instant,
}

#[derive(Debug)]
pub(crate) struct Framework {
    pub id: FrameworkId,
    pub name: String,
    pub role: String,
    pub principal: String,
    pub hostname: String,
    pub failover_timeout: Duration,
    pub link: FrameworkLink,
    pub suppressed: bool,
    pub offers: BTreeSet<OfferId>,
    pub filters: HashMap<AgentId, Vec<Filter>>,
}

impl Framework {
    pub(crate) fn conn(&self) -> Option<ConnId> {
        match self.link {
            FrameworkLink::Connected(conn) => Some(conn),
            FrameworkLink::Disconnected { .. } => None,
        }
    }

    /// Whether a live filter hides `resources` on `agent` from this framework: a filter hides
    /// only offers it covers, so a larger offer still goes through.
    pub(crate) fn filtered(&self, agent: &AgentId, resources: &Resources, now: Instant) -> bool {
        self.filters
            .get(agent)
            .is_some_and(|fs| fs.iter().any(|f| f.expires > now && f.resources.contains(resources)))
    }

    pub(crate) fn status_str(&self) -> &'static str {
        match self.link {
            FrameworkLink::Disconnected { .. } => "disconnected",
            FrameworkLink::Connected(_) if self.suppressed => "suppressed",
            FrameworkLink::Connected(_) => "active",
        }
    }
}

/// An outstanding offer.
#[derive(Clone, Debug)]
pub(crate) struct OfferRecord {
    pub framework_id: FrameworkId,
    pub agent_id: AgentId,
    pub resources: Resources,
}

#[derive(Clone, Debug)]
pub(crate) struct Task {
    pub info: TaskInfo,
    pub framework_id: FrameworkId,
    pub agent_id: AgentId,
    pub state: TaskState,
    /// What the task holds on its agent, with the reservation breakdown (its flat request
    /// `info.resources` served from its role's reservation first).
    pub allocation: Resources,
    /// The latest status applied (exit code, reason, usage...).
    pub latest: Option<TaskStatus>,
    /// Updates not yet acknowledged (with a uuid) or not yet delivered (without one).
    pub pending: Vec<TaskStatus>,
    /// A kill was asked for; sent again when the agent re-registers.
    pub kill_requested: bool,
}

impl Task {
    pub(crate) fn key(&self) -> TaskKey {
        (self.framework_id.clone(), self.info.task_id.clone())
    }

    pub(crate) fn view(&self) -> TaskView {
        let latest = self.latest.as_ref();
        TaskView {
            id: self.info.task_id.clone(),
            name: self.info.name.clone(),
            framework_id: self.framework_id.clone(),
            agent_id: self.agent_id.clone(),
            state: self.state,
            resources: self.info.resources.clone(),
            exit_code: latest.and_then(|s| s.exit_code),
            signal: latest.and_then(|s| s.signal),
            reason: latest.map(|s| s.reason.clone()).unwrap_or_default(),
            message: latest.map(|s| s.message.clone()).unwrap_or_default(),
            usage: latest.and_then(|s| s.usage.clone()),
        }
    }
}
