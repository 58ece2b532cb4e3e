//! The master's sans-IO core: a state machine that takes events with the time passed in and
//! produces actions. No sockets, no clock, no tasks: the QUIC layer (`server.rs`) and the tests
//! drive it (the shape of `quinn-proto`).
//!
//! Usage by a driver:
//! ```text
//! core.handle(now, event);              // for every input
//! while let Some(a) = core.poll_action() { carry it out }
//! sleep until core.poll_timeout(), then core.handle_timeout(now)
//! ```

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use ::metrics::{counter, gauge};
use agora_sdk::proto::*;
use agora_sdk::{Attributes, Resources};
use rustc_hash::{FxHashMap, FxHashSet};
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::allocator::{
    fits_role, is_allocatable, Allocator, AllocatorOptions, Candidate, HierarchicalAllocator,
};
use crate::metrics;
use crate::quick;
use crate::state::{
    Agent, AgentStatus, Filter, Framework, FrameworkLink, OfferRecord, Offers, Peer, Table, Task, TaskKey,
    TaskTable,
};
use executors::{ExecutorRecord, Executors};

// The executor logic lives in its own file; as a child module it reaches the core's state.
#[path = "executors.rs"]
mod executors;

/// Identifies one connection (assigned by the driver, never reused).
pub type ConnId = u64;

/// Most tasks one agent may report when it registers (memory bound on a peer's claims).
pub const MAX_REPORTED_TASKS: usize = 1_000_000;

/// Master settings.
#[derive(Clone, Debug)]
pub struct MasterConfig {
    pub master_id: String,
    /// A full allocation cycle over every agent runs at least this often (Mesos default 1 s).
    pub allocation_interval: Duration,
    /// After an event that frees or asks for resources (task ended, framework subscribed,
    /// revive, decline, agent added), an allocation runs within this delay, batching events.
    pub allocation_batch: Duration,
    /// Told to agents; they send `Heartbeat` this often.
    pub agent_heartbeat_interval: Duration,
    /// An agent silent (no message at all) this long is marked unreachable.
    pub agent_timeout: Duration,
    /// Sent to frameworks as `SchedulerEvent::Heartbeat` this often.
    pub framework_heartbeat_interval: Duration,
    /// Filter length of a DECLINE without `refuse_seconds`.
    pub default_refuse: Duration,
    /// An offer not answered this long is rescinded (`SchedulerEvent::Rescind`), its resources
    /// are reallocated, and its framework is filtered from them for `default_refuse` (as if
    /// it had declined). `None`: offers never time out.
    pub offer_timeout: Option<Duration>,
    /// Policy settings for the allocator (weights, priorities, quotas, minimum allocatable
    /// resources). The core itself uses `min_allocatable`: no offer smaller goes out, whatever
    /// the allocator decides.
    pub allocation: AllocatorOptions,
}

/// Most entries a `Request` may carry (the rest is ignored).
const MAX_DEMANDS: usize = 1024;

impl Default for MasterConfig {
    fn default() -> Self {
        MasterConfig {
            master_id: "master".into(),
            allocation_interval: Duration::from_secs(1),
            allocation_batch: Duration::from_millis(2),
            agent_heartbeat_interval: Duration::from_secs(5),
            agent_timeout: Duration::from_secs(20),
            framework_heartbeat_interval: Duration::from_secs(15),
            default_refuse: Duration::from_secs(5),
            offer_timeout: None,
            allocation: AllocatorOptions {
                min_allocatable: vec![Resources::cpus(10)],
                ..AllocatorOptions::default()
            },
        }
    }
}

/// An input to the core.
#[derive(Clone, Debug)]
pub enum Event {
    /// A message from an agent connection (the first must be `Register`). `principal` comes
    /// from the connection's verified certificate.
    Agent {
        conn: ConnId,
        principal: String,
        msg: AgentMessage,
    },
    AgentDisconnected {
        conn: ConnId,
    },
    /// A call from a framework connection (the first must be `Subscribe`).
    Framework {
        conn: ConnId,
        principal: String,
        call: SchedulerCall,
    },
    FrameworkDisconnected {
        conn: ConnId,
    },
}

/// An output of the core, for the driver to carry out.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    ToAgent {
        conn: ConnId,
        msg: MasterToAgent,
    },
    ToFramework {
        conn: ConnId,
        event: SchedulerEvent,
    },
    /// Send the error (where the peer can take it) and close this connection only.
    Close {
        conn: ConnId,
        error: WireError,
    },
}

/// Who asks to read a task's output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requester {
    Operator,
    Framework(ConnId),
}

/// Where a task's output can be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputLocation {
    pub agent_conn: ConnId,
    pub agent_id: AgentId,
    pub framework_id: FrameworkId,
}

/// How long a decline filter or an `Accept` filter may last at most.
const MAX_REFUSE: Duration = Duration::from_secs(365 * 24 * 3600);
/// How many completed tasks `tasks()` keeps showing.
const COMPLETED_TASKS: usize = 1000;
/// How many removed framework ids are remembered (to shut their tasks down on agents that
/// come back).
const REMOVED_FRAMEWORKS: usize = 10_000;
/// Shortest timer period, so a zero in the configuration cannot make the driver spin.
const MIN_PERIOD: Duration = Duration::from_millis(1);

/// `now + d`, never panicking (absurd delays are cut to a year).
fn after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d).or_else(|| now.checked_add(MAX_REFUSE)).unwrap_or(now)
}

/// The filter length asked for by `refuse_seconds`: `None` takes `default`; NaN, negative and
/// zero mean no filter; anything above a year is cut to a year.
pub fn refuse_duration(refuse_seconds: Option<f64>, default: Duration) -> Duration {
    match refuse_seconds {
        None => default.min(MAX_REFUSE),
        Some(s) if s.is_nan() || s <= 0.0 => Duration::ZERO,
        Some(s) => Duration::try_from_secs_f64(s.min(MAX_REFUSE.as_secs_f64())).unwrap_or(MAX_REFUSE),
    }
}

/// A status update the master itself produces (no uuid: nothing to acknowledge).
fn master_status(
    key: &TaskKey,
    agent_id: Option<AgentId>,
    state: TaskState,
    reason: &str,
    message: String,
    timestamp_ms: u64,
) -> TaskStatus {
    TaskStatus {
        task_id: key.1.clone(),
        framework_id: key.0.clone(),
        agent_id,
        state,
        uuid: None,
        source: UpdateSource::Master,
        reason: reason.to_string(),
        message,
        exit_code: None,
        signal: None,
        usage: None,
        timestamp_ms,
    }
}

/// An id for logs and messages (empty when unknown).
fn name<T: std::fmt::Display>(id: Option<&T>) -> String {
    id.map(ToString::to_string).unwrap_or_default()
}

/// A set of recently removed framework ids, bounded (oldest forgotten first).
#[derive(Debug, Default)]
struct RecentSet {
    order: VecDeque<FrameworkId>,
    set: HashSet<FrameworkId>,
}

impl RecentSet {
    fn insert(&mut self, id: FrameworkId) {
        if self.set.insert(id.clone()) {
            self.order.push_back(id);
            while self.order.len() > REMOVED_FRAMEWORKS {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }

    fn contains(&self, id: &FrameworkId) -> bool {
        self.set.contains(id)
    }
}

/// The master's state machine.
pub struct Master {
    config: MasterConfig,
    allocator: Box<dyn Allocator>,
    /// Live connections that got past their first message.
    conns: HashMap<ConnId, Peer>,
    /// Connections the core closed; their further events are ignored until the driver
    /// reports them disconnected.
    closing: HashSet<ConnId>,
    /// Task reports that arrived ahead of their agent's `Register` (too many for one frame).
    pending_reports: FxHashMap<ConnId, Vec<TaskReport>>,
    /// By id (hashed lookups, id-ordered walks).
    agents: Table<AgentId, Agent>,
    frameworks: Table<FrameworkId, Framework>,
    removed_frameworks: RecentSet,
    /// Outstanding offers by number (an offer id is `{master_id}-O{number}`).
    offers: Offers,
    /// Tasks not yet completed (non-terminal, or terminal with updates not yet acknowledged).
    tasks: TaskTable,
    /// The last [`COMPLETED_TASKS`] completed tasks, oldest first.
    completed: VecDeque<Task>,
    /// How many entries of `completed` carry each key.
    completed_index: FxHashMap<TaskKey, usize>,
    agent_deadlines: BTreeSet<(Instant, AgentId)>,
    failover_deadlines: BTreeSet<(Instant, FrameworkId)>,
    /// Decline filters by expiry: every filter of a cycle's declines shares one instant, so
    /// they are kept in one list per instant (no id comparisons to keep them sorted).
    /// Entries are (framework slot, its generation, agent slot).
    filter_expiries: BTreeMap<Instant, Vec<(usize, u32, usize)>>,
    offer_deadlines: BTreeSet<(Instant, OfferId)>,
    next_allocation: Instant,
    batch_allocation: Option<Instant>,
    next_heartbeat: Instant,
    next_agent: u64,
    next_framework: u64,
    next_offer: u64,
    /// `(instant, unix ms)` pair that turns instants into update timestamps.
    clock_anchor: (Instant, u64),
    actions: VecDeque<Action>,
    /// Digests in the artifact store (told by the driver); a Wasm launch must name only these.
    known_artifacts: FxHashSet<Digest>,
    /// Frameworks' own executors launched on agents, with the resources they hold.
    executors: Executors,
}

impl std::fmt::Debug for Master {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Master")
            .field("master_id", &self.config.master_id)
            .field("allocator", &self.allocator.name())
            .field("agents", &self.agents.len())
            .field("frameworks", &self.frameworks.len())
            .field("offers", &self.offers.len())
            .field("tasks", &self.tasks.len())
            .finish_non_exhaustive()
    }
}

impl Master {
    /// A master with the hierarchical weighted DRF allocator and the configuration's
    /// allocation options.
    pub fn new(config: MasterConfig, now: Instant) -> Self {
        let allocator = Box::new(HierarchicalAllocator::drf(&config.allocation));
        Self::with_allocator(config, allocator, now)
    }

    /// A master with the given allocation module.
    pub fn with_allocator(mut config: MasterConfig, allocator: Box<dyn Allocator>, now: Instant) -> Self {
        config.allocation_interval = config.allocation_interval.max(MIN_PERIOD);
        config.framework_heartbeat_interval = config.framework_heartbeat_interval.max(MIN_PERIOD);
        config.agent_timeout = config.agent_timeout.max(MIN_PERIOD);
        Master {
            next_allocation: after(now, config.allocation_interval),
            next_heartbeat: after(now, config.framework_heartbeat_interval),
            config,
            allocator,
            conns: HashMap::new(),
            closing: HashSet::new(),
            pending_reports: FxHashMap::default(),
            agents: Table::new(),
            frameworks: Table::new(),
            removed_frameworks: RecentSet::default(),
            offers: Offers::default(),
            tasks: TaskTable::default(),
            completed: VecDeque::new(),
            completed_index: FxHashMap::default(),
            agent_deadlines: BTreeSet::new(),
            failover_deadlines: BTreeSet::new(),
            filter_expiries: BTreeMap::new(),
            offer_deadlines: BTreeSet::new(),
            batch_allocation: None,
            next_agent: 0,
            next_framework: 0,
            next_offer: 0,
            clock_anchor: (now, 0),
            actions: VecDeque::new(),
            known_artifacts: FxHashSet::default(),
            executors: Executors::default(),
        }
    }

    /// Records that the artifact store holds `digest` (at startup and after each upload), so
    /// Wasm tasks naming it may launch.
    pub fn artifact_stored(&mut self, digest: Digest) {
        self.known_artifacts.insert(digest);
    }

    /// Ties `now` to a wall-clock time (Unix milliseconds) for the `timestamp_ms` of the
    /// updates the master produces. Without it, timestamps count from the master's creation.
    pub fn set_unix_time(&mut self, now: Instant, unix_ms: u64) {
        self.clock_anchor = (now, unix_ms);
    }

    /// The configuration in force (intervals clamped to at least 1 ms).
    pub fn config(&self) -> &MasterConfig {
        &self.config
    }

    /// The allocation module's name.
    pub fn allocator_name(&self) -> &str {
        self.allocator.name()
    }

    /// Feeds one input to the core.
    pub fn handle(&mut self, now: Instant, event: Event) {
        match event {
            Event::Agent { conn, principal, msg } => self.on_agent_message(now, conn, principal, msg),
            Event::AgentDisconnected { conn } => {
                self.closing.remove(&conn);
                self.pending_reports.remove(&conn);
                if let Some(Peer::Agent(id)) = self.conns.get(&conn).cloned() {
                    self.conns.remove(&conn);
                    self.agent_disconnected(now, &id);
                }
            }
            Event::Framework { conn, principal, call } => self.on_framework_call(now, conn, principal, call),
            Event::FrameworkDisconnected { conn } => {
                self.closing.remove(&conn);
                if let Some(Peer::Framework(id)) = self.conns.get(&conn).cloned() {
                    self.conns.remove(&conn);
                    self.framework_disconnected(now, &id);
                }
            }
        }
    }

    /// The earliest time `handle_timeout` must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t = self.next_allocation.min(self.next_heartbeat);
        let candidates = [
            self.batch_allocation,
            self.agent_deadlines.first().map(|(t, _)| *t),
            self.failover_deadlines.first().map(|(t, _)| *t),
            self.filter_expiries.first_key_value().map(|(t, _)| *t),
            self.offer_deadlines.first().map(|(t, _)| *t),
        ];
        for c in candidates.into_iter().flatten() {
            t = t.min(c);
        }
        Some(t)
    }

    /// Runs everything due at `now`: agent timeouts, framework failover expiries, filter
    /// expiries, allocation and framework heartbeats.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some((t, id)) = self.agent_deadlines.first().cloned() {
            if t > now {
                break;
            }
            self.agent_deadlines.remove(&(t, id.clone()));
            self.agent_timed_out(now, &id);
        }
        while let Some((t, id)) = self.failover_deadlines.first().cloned() {
            if t > now {
                break;
            }
            self.failover_deadlines.remove(&(t, id.clone()));
            if let Some(fw) = self.frameworks.get(&id) {
                if fw.link == (FrameworkLink::Disconnected { deadline: Some(t) }) {
                    info!(framework_id = %id, "framework failover timeout passed: removing it");
                    self.remove_framework(now, &id);
                }
            }
        }
        while self.filter_expiries.first_key_value().is_some_and(|(t, _)| *t <= now) {
            let Some((_, expired)) = self.filter_expiries.pop_first() else { break };
            for (fw, generation, agent) in expired {
                if let Some(f) = self.frameworks.at_generation_mut(fw, generation) {
                    if let Some(list) = f.filters.get_mut(&agent) {
                        list.retain(|f| f.expires > now);
                        if list.is_empty() {
                            f.filters.remove(&agent);
                        }
                    }
                    self.request_allocation(now);
                }
            }
        }
        while let Some((t, id)) = self.offer_deadlines.first().cloned() {
            if t > now {
                break;
            }
            self.offer_deadlines.remove(&(t, id.clone()));
            if let Some(offer) = self.offer(&id).cloned() {
                let framework_id = self.frameworks.at(offer.framework).map(|f| f.id.clone());
                let agent_id = self.agents.at(offer.agent).map(|a| a.id.clone());
                info!(offer_id = %id, framework_id = %name(framework_id.as_ref()), agent_id = %name(agent_id.as_ref()), "offer timed out: rescinding it");
                self.rescind_offer(&id, true);
                let refuse = self.config.default_refuse;
                self.add_filter(now, offer.framework, offer.agent, offer.resources, refuse);
                self.request_allocation(now);
            }
        }
        if self.batch_allocation.is_some_and(|t| t <= now) || self.next_allocation <= now {
            self.batch_allocation = None;
            self.allocate(now);
            self.next_allocation = after(now, self.config.allocation_interval);
        }
        if self.next_heartbeat <= now {
            for fw in self.frameworks.values() {
                if let Some(conn) = fw.conn() {
                    self.actions.push_back(Action::ToFramework { conn, event: SchedulerEvent::Heartbeat });
                }
            }
            self.next_heartbeat = after(now, self.config.framework_heartbeat_interval);
        }
    }

    /// The next action for the driver, in the order they were produced.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Every known agent, by id.
    pub fn agents(&self) -> Vec<AgentView> {
        self.agents
            .values()
            .map(|a| AgentView {
                id: a.id.clone(),
                hostname: a.hostname.clone(),
                resources: a.total.clone(),
                used: a.used.clone(),
                attributes: a.attributes.clone(),
                status: a.status.as_str().to_string(),
                tasks: self.live_tasks(a.tasks.iter()).count() as u64,
            })
            .collect()
    }

    /// Every registered framework, by id.
    pub fn frameworks(&self) -> Vec<FrameworkView> {
        self.frameworks
            .values()
            .map(|f| {
                let mut used = Resources::default();
                let mut tasks = 0u64;
                for t in self.framework_tasks(&f.id).filter(|t| !t.state.is_terminal()) {
                    used.add_assign(&t.info.resources);
                    tasks += 1;
                }
                used.add_assign(&self.executors.framework_used(&f.id).flatten());
                FrameworkView {
                    id: f.id.clone(),
                    name: f.name.clone(),
                    role: f.role.clone(),
                    principal: f.principal.clone(),
                    status: f.status_str().to_string(),
                    used,
                    tasks,
                }
            })
            .collect()
    }

    /// Every known task, including the last completed ones, sorted by framework and task id
    /// (a completed task comes after a live one with the same id).
    pub fn tasks(&self) -> Vec<TaskView> {
        let mut out: Vec<(TaskView, bool, usize)> = self
            .tasks
            .values()
            .map(|t| (t.view(), false, 0))
            .chain(self.completed.iter().enumerate().map(|(i, t)| (t.view(), true, i)))
            .collect();
        out.sort_by(|a, b| {
            (&a.0.framework_id, &a.0.id, a.1, a.2).cmp(&(&b.0.framework_id, &b.0.id, b.1, b.2))
        });
        out.into_iter().map(|(v, _, _)| v).collect()
    }

    /// Operator kill: the same path as a framework's KILL.
    pub fn kill_task(&mut self, now: Instant, task_id: &TaskId) -> Result<(), WireError> {
        let live: Vec<TaskKey> =
            self.tasks.values().filter(|t| t.info.task_id == *task_id).map(Task::key).collect();
        let running: Vec<&TaskKey> =
            live.iter().filter(|k| self.tasks.get(k).is_some_and(|t| !t.state.is_terminal())).collect();
        match running.as_slice() {
            [key] => {
                let key = (*key).clone();
                self.kill_live_task(now, &key);
                Ok(())
            }
            [] => {
                let done = self
                    .tasks
                    .values()
                    .chain(self.completed.iter().rev())
                    .find(|t| t.info.task_id == *task_id);
                match done {
                    Some(t) => Err(WireError::new(
                        ErrorCode::Invalid,
                        format!("task {task_id} is already {}", t.state),
                    )),
                    None => Err(WireError::new(ErrorCode::NotFound, format!("no task {task_id}"))),
                }
            }
            many => Err(WireError::new(
                ErrorCode::Invalid,
                format!(
                    "task id {task_id} is used by {} frameworks ({}); kill it from its framework",
                    many.len(),
                    many.iter().map(|k| k.0.as_str()).collect::<Vec<_>>().join(", ")
                ),
            )),
        }
    }

    /// Where to read a task's output, if `who` may read it (frameworks: only their own tasks).
    pub fn locate_output(&self, who: &Requester, task_id: &TaskId) -> Result<OutputLocation, WireError> {
        let mut matching =
            self.tasks.values().chain(self.completed.iter().rev()).filter(|t| t.info.task_id == *task_id);
        let task = match who {
            Requester::Operator => matching.next(),
            Requester::Framework(conn) => {
                let Some(Peer::Framework(fw)) = self.conns.get(conn) else {
                    return Err(WireError::new(
                        ErrorCode::Unauthorized,
                        "this connection is not a subscribed framework",
                    ));
                };
                let all: Vec<&Task> = matching.collect();
                match all.iter().find(|t| t.framework_id == *fw) {
                    Some(t) => Some(*t),
                    None if all.is_empty() => None,
                    None => {
                        return Err(WireError::new(
                            ErrorCode::Unauthorized,
                            format!("task {task_id} belongs to another framework"),
                        ))
                    }
                }
            }
        };
        let task = task.ok_or_else(|| WireError::new(ErrorCode::NotFound, format!("no task {task_id}")))?;
        let conn = self.agents.get(&task.agent_id).and_then(Agent::conn).ok_or_else(|| {
            WireError::new(
                ErrorCode::NotFound,
                format!("agent {} of task {task_id} is not connected", task.agent_id),
            )
        })?;
        Ok(OutputLocation {
            agent_conn: conn,
            agent_id: task.agent_id.clone(),
            framework_id: task.framework_id.clone(),
        })
    }

    // -----------------------------------------------------------------------------------------
    // Small helpers

    fn unix_ms(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.clock_anchor.0).as_millis();
        self.clock_anchor.1.saturating_add(u64::try_from(since).unwrap_or(u64::MAX))
    }

    fn send_agent(&mut self, conn: ConnId, msg: MasterToAgent) {
        self.actions.push_back(Action::ToAgent { conn, msg });
    }

    fn send_framework(&mut self, conn: ConnId, event: SchedulerEvent) {
        self.actions.push_back(Action::ToFramework { conn, event });
    }

    /// Sends `error` and closes `conn` (no state change: callers undo the peer's state first).
    fn close(&mut self, conn: ConnId, code: ErrorCode, message: impl Into<String>) {
        let error = WireError::new(code, message);
        debug!(conn, error = %error, "closing connection");
        self.conns.remove(&conn);
        self.pending_reports.remove(&conn);
        self.closing.insert(conn);
        self.actions.push_back(Action::Close { conn, error });
    }

    /// Closes a connection for a protocol error, handling it as a disconnection of its peer.
    fn close_peer(&mut self, now: Instant, conn: ConnId, code: ErrorCode, message: impl Into<String>) {
        let peer = self.conns.get(&conn).cloned();
        self.close(conn, code, message);
        match peer {
            Some(Peer::Agent(id)) => self.agent_disconnected(now, &id),
            Some(Peer::Framework(id)) => self.framework_disconnected(now, &id),
            None => {}
        }
    }

    fn request_allocation(&mut self, now: Instant) {
        let at = after(now, self.config.allocation_batch);
        self.batch_allocation = Some(self.batch_allocation.map_or(at, |t| t.min(at)));
    }

    fn live_tasks<'a>(
        &'a self,
        keys: impl Iterator<Item = &'a TaskKey> + 'a,
    ) -> impl Iterator<Item = &'a Task> + 'a {
        keys.filter_map(|k| self.tasks.get(k)).filter(|t| !t.state.is_terminal())
    }

    /// The framework's tasks that are not completed.
    fn framework_tasks<'a>(&'a self, fw: &FrameworkId) -> impl Iterator<Item = &'a Task> + 'a {
        self.tasks.of_framework(fw)
    }

    fn framework_task_keys(&self, fw: &FrameworkId) -> Vec<TaskKey> {
        self.framework_tasks(fw).map(Task::key).collect()
    }

    fn recompute_used(&mut self, agent_id: &AgentId) {
        let Some(agent) = self.agents.get(agent_id) else { return };
        let mut used = Resources::default();
        for t in self.live_tasks(agent.tasks.iter()) {
            used.add_assign(&t.allocation);
        }
        for (_, e) in self.executors.on_agent(agent_id) {
            used.add_assign(&e.allocation);
        }
        if let Some(agent) = self.agents.get_mut(agent_id) {
            agent.used = used;
        }
    }

    fn recompute_offered(&mut self, agent: usize) {
        let Some(a) = self.agents.at(agent) else { return };
        let mut offered = Resources::default();
        for o in a.offers.iter().filter_map(|n| self.offers.get(n)) {
            offered.add_assign(&o.resources);
        }
        if let Some(a) = self.agents.at_mut(agent) {
            a.offered = offered;
        }
    }

    /// The number of one of this master's offer ids (`{master_id}-O{n}`, `n` written without
    /// leading zeros), if it is one.
    fn offer_no(&self, id: &OfferId) -> Option<u64> {
        let digits = id.as_str().strip_prefix(self.config.master_id.as_str())?.strip_prefix("-O")?;
        if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    }

    /// An outstanding offer by id.
    fn offer(&self, id: &OfferId) -> Option<&OfferRecord> {
        self.offers.get(&self.offer_no(id)?)
    }

    /// The ids of these offer numbers, sorted by id.
    fn offer_ids<'a>(&self, numbers: impl IntoIterator<Item = &'a u64>) -> Vec<OfferId> {
        let mut text = String::new();
        let mut ids: Vec<OfferId> = numbers
            .into_iter()
            .map(|n| {
                offer_id_text(&mut text, &self.config.master_id, *n);
                OfferId::new(text.as_str())
            })
            .collect();
        ids.sort_unstable();
        ids
    }

    fn set_agent_deadline(&mut self, id: &AgentId, deadline: Option<Instant>) {
        let Some(agent) = self.agents.get_mut(id) else { return };
        if let Some(old) = agent.deadline.take() {
            self.agent_deadlines.remove(&(old, id.clone()));
        }
        if let Some(d) = deadline {
            agent.deadline = Some(d);
            self.agent_deadlines.insert((d, id.clone()));
        }
    }

    /// Forgets an offer (no allocator call, no message). Returns it if it was outstanding.
    fn take_offer(&mut self, offer_id: &OfferId) -> Option<OfferRecord> {
        let n = self.offer_no(offer_id)?;
        let offer = self.offers.remove(&n)?;
        if let Some(agent) = self.agents.at_mut(offer.agent) {
            agent.remove_offer(n);
        }
        if let Some(fw) = self.frameworks.at_mut(offer.framework) {
            fw.offers.remove(&n);
        }
        self.recompute_offered(offer.agent);
        Some(offer)
    }

    /// Takes an offer back: its resources return to the allocator; with `notify`, the holder
    /// is told (`Rescind`) if connected.
    fn rescind_offer(&mut self, offer_id: &OfferId, notify: bool) {
        let Some(offer) = self.take_offer(offer_id) else { return };
        if let (Some(f), Some(a)) = (self.frameworks.at(offer.framework), self.agents.at(offer.agent)) {
            self.allocator.recover(&f.id, &a.id, &offer.resources);
        }
        if notify {
            counter!(metrics::OFFERS_RESCINDED).increment(1);
            if let Some(conn) = self.frameworks.at(offer.framework).and_then(Framework::conn) {
                self.send_framework(conn, SchedulerEvent::Rescind { offer_id: offer_id.clone() });
            }
        }
    }

    fn rescind_agent_offers(&mut self, agent_id: &AgentId) {
        let ids = match self.agents.get(agent_id) {
            Some(a) => self.offer_ids(&a.offers),
            None => Vec::new(),
        };
        for id in ids {
            self.rescind_offer(&id, true);
        }
    }

    /// Filters `resources` on agent slot `agent` from framework slot `fw` for `d`.
    fn add_filter(&mut self, now: Instant, fw: usize, agent: usize, resources: Resources, d: Duration) {
        if d.is_zero() || resources.is_empty() {
            return;
        }
        let generation = self.frameworks.generation(fw);
        let Some(f) = self.frameworks.at_mut(fw) else { return };
        let expires = after(now, d);
        f.filters.entry(agent).or_default().push(Filter { resources, expires });
        self.filter_expiries.entry(expires).or_default().push((fw, generation, agent));
    }

    // -----------------------------------------------------------------------------------------
    // Tasks and status updates

    /// Applies `status` to a task (the caller checked the transition) and, when the task just
    /// ended, returns its resources.
    fn apply_status(&mut self, now: Instant, key: &TaskKey, status: &TaskStatus) {
        let Some(task) = self.tasks.get_mut(key) else { return };
        let was_terminal = task.state.is_terminal();
        task.state = status.state;
        task.latest = Some(status.clone());
        if status.state.is_terminal() && !was_terminal {
            let agent_id = task.agent_id.clone();
            let resources = task.allocation.clone();
            debug!(task_id = %key.1, framework_id = %key.0, agent_id = %agent_id, state = %status.state, "task ended");
            counter!(metrics::TASKS_TERMINAL, "state" => status.state.as_str()).increment(1);
            // Incremental: recomputing walks every task of the agent, quadratic under load.
            if let Some(agent) = self.agents.get_mut(&agent_id) {
                agent.used = agent.used.saturating_sub(&resources);
            }
            if self.agents.get(&agent_id).is_some_and(|a| a.attached) {
                self.allocator.recover(&key.0, &agent_id, &resources);
            }
            self.request_allocation(now);
        }
    }

    /// Sends an update about a known task to its framework, keeping it pending until it is
    /// acknowledged (uuid) or delivered (no uuid). Updates of removed frameworks are
    /// acknowledged to the agent directly.
    fn deliver(&mut self, key: &TaskKey, status: TaskStatus) {
        let Some(task) = self.tasks.get_mut(key) else { return };
        match self.frameworks.get(&key.0) {
            None => {
                if let Some(uuid) = status.uuid {
                    let agent_conn = self.agents.get(&task.agent_id).and_then(Agent::conn);
                    if let Some(conn) = agent_conn {
                        self.actions.push_back(Action::ToAgent {
                            conn,
                            msg: MasterToAgent::StatusAck {
                                framework_id: key.0.clone(),
                                task_id: key.1.clone(),
                                uuid,
                            },
                        });
                    }
                }
            }
            Some(fw) => {
                let conn = fw.conn();
                if status.uuid.is_some() {
                    if !task.pending.iter().any(|p| p.uuid == status.uuid) {
                        task.pending.push(status.clone());
                    }
                } else if conn.is_none() {
                    task.pending.push(status.clone());
                }
                if let Some(conn) = conn {
                    self.actions
                        .push_back(Action::ToFramework { conn, event: SchedulerEvent::Update(status) });
                }
            }
        }
        self.maybe_complete(key);
    }

    /// Moves a terminal task whose updates were all acknowledged to the completed list.
    fn maybe_complete(&mut self, key: &TaskKey) {
        let done = self.tasks.get(key).is_some_and(|t| t.state.is_terminal() && t.pending.is_empty());
        if !done {
            return;
        }
        let Some(task) = self.tasks.remove(key) else { return };
        if let Some(agent) = self.agents.get_mut(&task.agent_id) {
            agent.tasks.remove(key);
        }
        *self.completed_index.entry(key.clone()).or_insert(0) += 1;
        self.completed.push_back(task);
        while self.completed.len() > COMPLETED_TASKS {
            if let Some(old) = self.completed.pop_front() {
                let k = old.key();
                if let Some(n) = self.completed_index.get_mut(&k) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.completed_index.remove(&k);
                    }
                }
            }
        }
    }

    /// A master-made update for a known task: applied (if the transition is valid) and sent.
    fn master_update(
        &mut self,
        now: Instant,
        key: &TaskKey,
        state: TaskState,
        reason: &str,
        message: String,
    ) {
        let Some(task) = self.tasks.get(key) else { return };
        if !task.state.can_transition_to(state) {
            return;
        }
        let status =
            master_status(key, Some(task.agent_id.clone()), state, reason, message, self.unix_ms(now));
        self.apply_status(now, key, &status);
        self.deliver(key, status);
    }

    /// The latest status of a task as a reconciliation answer (no uuid).
    fn reconcile_status(&self, now: Instant, task: &Task) -> TaskStatus {
        match &task.latest {
            Some(s) => TaskStatus { state: task.state, uuid: None, ..s.clone() },
            None => master_status(
                &task.key(),
                Some(task.agent_id.clone()),
                task.state,
                "reconciliation",
                String::new(),
                self.unix_ms(now),
            ),
        }
    }

    /// Asks the agent of a live task to kill it (or remembers to, if it is away).
    fn kill_live_task(&mut self, now: Instant, key: &TaskKey) {
        let Some(task) = self.tasks.get_mut(key) else { return };
        task.kill_requested = true;
        let agent_id = task.agent_id.clone();
        let state = task.state;
        let status = self.agents.get(&agent_id).map(|a| a.status);
        info!(task_id = %key.1, framework_id = %key.0, agent_id = %agent_id, "killing task");
        match status {
            Some(AgentStatus::Active { conn }) => self.send_agent(
                conn,
                MasterToAgent::KillTask { framework_id: key.0.clone(), task_id: key.1.clone() },
            ),
            Some(AgentStatus::Unreachable) if state == TaskState::Unreachable => {
                // Tell the framework again where the task stands; the kill goes out if the
                // agent comes back.
                let status = master_status(
                    key,
                    Some(agent_id.clone()),
                    TaskState::Unreachable,
                    "agent unreachable",
                    format!("agent {agent_id} is unreachable; the task is killed if it comes back"),
                    self.unix_ms(now),
                );
                self.deliver(key, status);
            }
            _ => {}
        }
    }

    // -----------------------------------------------------------------------------------------
    // Agents

    fn on_agent_message(&mut self, now: Instant, conn: ConnId, principal: String, msg: AgentMessage) {
        if self.closing.contains(&conn) {
            return;
        }
        match self.conns.get(&conn).cloned() {
            None => match msg {
                AgentMessage::Register { agent_id, hostname, resources, attributes, tasks } => {
                    let tasks = match self.pending_reports.remove(&conn) {
                        Some(mut earlier) => {
                            earlier.extend(tasks);
                            earlier
                        }
                        None => tasks,
                    };
                    self.register_agent(
                        now, conn, principal, agent_id, hostname, resources, attributes, tasks,
                    )
                }
                AgentMessage::TaskReports(reports) => {
                    let pending = self.pending_reports.entry(conn).or_default();
                    if pending.len().saturating_add(reports.len()) > MAX_REPORTED_TASKS {
                        self.close(
                            conn,
                            ErrorCode::TooLarge,
                            format!("an agent may report at most {MAX_REPORTED_TASKS} tasks"),
                        );
                    } else {
                        pending.extend(reports);
                    }
                }
                _ => {
                    self.close(conn, ErrorCode::Unexpected, "the first message of an agent must be Register")
                }
            },
            Some(Peer::Framework(_)) => {
                self.close_peer(now, conn, ErrorCode::Unexpected, "agent message on a framework connection")
            }
            Some(Peer::Agent(id)) => {
                let deadline = after(now, self.config.agent_timeout);
                self.set_agent_deadline(&id, Some(deadline));
                match msg {
                    AgentMessage::Register { .. } | AgentMessage::TaskReports(_) => self.close_peer(
                        now,
                        conn,
                        ErrorCode::Unexpected,
                        format!("agent {id} is already registered on this connection"),
                    ),
                    AgentMessage::Heartbeat => self.send_agent(conn, MasterToAgent::HeartbeatAck),
                    AgentMessage::StatusUpdate(status) => self.on_status_update(now, &id, conn, status),
                    AgentMessage::FrameworkMessage { framework_id, executor_id, data } => {
                        self.on_executor_message(&id, framework_id, executor_id, data)
                    }
                    AgentMessage::ExecutorExited { framework_id, executor_id, message } => {
                        self.on_executor_exited(now, &id, framework_id, executor_id, message)
                    }
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn register_agent(
        &mut self,
        now: Instant,
        conn: ConnId,
        principal: String,
        agent_id: Option<AgentId>,
        hostname: String,
        resources: Resources,
        attributes: Attributes,
        reports: Vec<TaskReport>,
    ) {
        let id = match agent_id {
            Some(id) if id.as_str().is_empty() => {
                self.close(conn, ErrorCode::Invalid, "re-registration with an empty agent id");
                return;
            }
            Some(id) => id,
            None => {
                self.next_agent += 1;
                AgentId::new(format!("{}-A{}", self.config.master_id, self.next_agent))
            }
        };
        match self.agents.get(&id) {
            Some(agent) if agent.principal != principal => {
                warn!(agent_id = %id, principal, registered = %agent.principal, "agent principal mismatch");
                self.close(
                    conn,
                    ErrorCode::Unauthorized,
                    format!("agent {id} is registered by principal {}, not {principal}", agent.principal),
                );
                return;
            }
            Some(agent) => {
                info!(agent_id = %id, hostname, conn, "agent re-registered");
                if let AgentStatus::Active { conn: old } = agent.status {
                    if old != conn {
                        self.close(
                            old,
                            ErrorCode::Unexpected,
                            format!("agent {id} registered again on another connection"),
                        );
                    }
                }
            }
            None => {
                info!(agent_id = %id, hostname, conn, tasks = reports.len(), "agent registered");
                self.agents.insert(id.clone(), Agent::new(id.clone(), principal));
            }
        }
        // Resources may have changed: take back its offers and re-enter it into the allocator
        // with the reported state.
        self.rescind_agent_offers(&id);
        self.detach_agent(&id);
        if let Some(agent) = self.agents.get_mut(&id) {
            agent.hostname = hostname;
            agent.total = resources;
            agent.attributes = attributes;
            agent.status = AgentStatus::Active { conn };
        }
        self.conns.insert(conn, Peer::Agent(id.clone()));
        self.set_agent_deadline(&id, Some(after(now, self.config.agent_timeout)));
        self.send_agent(
            conn,
            MasterToAgent::Registered {
                agent_id: id.clone(),
                heartbeat_interval: self.config.agent_heartbeat_interval,
            },
        );
        self.adopt_reported_tasks(now, &id, conn, reports);
        self.sync_executors(&id);
        self.recompute_used(&id);
        self.attach_agent(&id);
        self.request_allocation(now);
    }

    /// Takes an agent and its tasks out of the allocator.
    fn detach_agent(&mut self, id: &AgentId) {
        let Some(agent) = self.agents.get(id) else { return };
        if !agent.attached {
            return;
        }
        let held: Vec<(FrameworkId, Resources)> = self
            .live_tasks(agent.tasks.iter())
            .map(|t| (t.framework_id.clone(), t.allocation.clone()))
            .chain(self.executors.on_agent(id).map(|(fw, e)| (fw.clone(), e.allocation.clone())))
            .collect();
        for (fw, r) in held {
            self.allocator.recover(&fw, id, &r);
        }
        self.allocator.remove_agent(id);
        if let Some(agent) = self.agents.get_mut(id) {
            agent.attached = false;
        }
    }

    /// Puts an agent and its live tasks into the allocator.
    fn attach_agent(&mut self, id: &AgentId) {
        let Some(agent) = self.agents.get(id) else { return };
        if agent.attached {
            return;
        }
        self.allocator.add_agent(id, &agent.total);
        let held: Vec<(FrameworkId, Resources)> = self
            .live_tasks(agent.tasks.iter())
            .map(|t| (t.framework_id.clone(), t.allocation.clone()))
            .chain(self.executors.on_agent(id).map(|(fw, e)| (fw.clone(), e.allocation.clone())))
            .collect();
        for (fw, r) in held {
            self.allocator.allocated(&fw, id, &r);
        }
        if let Some(agent) = self.agents.get_mut(id) {
            agent.attached = true;
        }
    }

    /// Brings the master's view of an agent's tasks in line with what it reports.
    fn adopt_reported_tasks(&mut self, now: Instant, id: &AgentId, conn: ConnId, reports: Vec<TaskReport>) {
        let mut reported: HashSet<TaskKey> = HashSet::new();
        let mut shutdown: BTreeSet<FrameworkId> = BTreeSet::new();
        for r in reports {
            let key = (r.framework_id.clone(), r.task.task_id.clone());
            if key.1.as_str().is_empty() || !reported.insert(key.clone()) {
                warn!(agent_id = %id, task_id = %key.1, "agent reported an unnamed or duplicate task");
                continue;
            }
            if self.removed_frameworks.contains(&key.0) && !r.state.is_terminal() {
                shutdown.insert(key.0.clone());
            }
            match self.tasks.get_mut(&key) {
                Some(task) if task.agent_id != *id => {
                    warn!(agent_id = %id, task_id = %key.1, framework_id = %key.0,
                        known_on = %task.agent_id, "agent reported a task known on another agent");
                }
                Some(task) => {
                    let old = task.state;
                    let kill = task.kill_requested;
                    if r.state.is_terminal() || old == r.state {
                        // Terminal states arrive as the agent's own (retried) updates.
                    } else if old.can_transition_to(r.state) {
                        task.state = r.state;
                        if old == TaskState::Unreachable {
                            let status = master_status(
                                &key,
                                Some(id.clone()),
                                r.state,
                                "agent re-registered",
                                format!("agent {id} re-registered and reports the task {}", r.state),
                                self.unix_ms(now),
                            );
                            if let Some(task) = self.tasks.get_mut(&key) {
                                task.latest = Some(status.clone());
                            }
                            self.deliver(&key, status);
                        }
                    } else {
                        warn!(agent_id = %id, task_id = %key.1, framework_id = %key.0,
                            known = %old, reported = %r.state, "agent runs a task the master considers over: killing it");
                        self.send_agent(
                            conn,
                            MasterToAgent::KillTask { framework_id: key.0.clone(), task_id: key.1.clone() },
                        );
                        continue;
                    }
                    if kill && !r.state.is_terminal() {
                        self.send_agent(
                            conn,
                            MasterToAgent::KillTask { framework_id: key.0.clone(), task_id: key.1.clone() },
                        );
                    }
                }
                None => {
                    let completed = self.completed_index.contains_key(&key);
                    debug!(agent_id = %id, task_id = %key.1, framework_id = %key.0, state = %r.state, "adopting reported task");
                    // A reported task holds its flat request (taken from the unreserved
                    // part first); reservations are re-attributed as tasks come and go.
                    let allocation = r.task.resources.flatten();
                    self.tasks.insert(
                        key.clone(),
                        Task {
                            info: r.task,
                            framework_id: key.0.clone(),
                            agent_id: id.clone(),
                            state: r.state,
                            allocation,
                            latest: None,
                            pending: Vec::new(),
                            kill_requested: completed,
                        },
                    );
                    if let Some(agent) = self.agents.get_mut(id) {
                        agent.tasks.insert(key.clone());
                    }
                    if completed && !r.state.is_terminal() {
                        warn!(agent_id = %id, task_id = %key.1, framework_id = %key.0,
                            "agent runs a task that already completed: killing it");
                        self.send_agent(
                            conn,
                            MasterToAgent::KillTask { framework_id: key.0.clone(), task_id: key.1.clone() },
                        );
                    }
                }
            }
        }
        for fw in shutdown {
            self.send_agent(conn, MasterToAgent::ShutdownFramework { framework_id: fw });
        }
        let missing: Vec<TaskKey> = self
            .agents
            .get(id)
            .map(|a| {
                self.live_tasks(a.tasks.iter()).map(Task::key).filter(|k| !reported.contains(k)).collect()
            })
            .unwrap_or_default();
        for key in missing {
            warn!(agent_id = %id, task_id = %key.1, framework_id = %key.0, "task not reported by re-registered agent");
            self.master_update(
                now,
                &key,
                TaskState::Lost,
                "task not reported by re-registered agent",
                format!("agent {id} re-registered without task {}", key.1),
            );
        }
    }

    fn agent_disconnected(&mut self, now: Instant, id: &AgentId) {
        info!(agent_id = %id, "agent disconnected");
        self.rescind_agent_offers(id);
        if let Some(agent) = self.agents.get_mut(id) {
            if matches!(agent.status, AgentStatus::Active { .. }) {
                agent.status = AgentStatus::Disconnected;
            }
        }
        self.request_allocation(now);
    }

    fn agent_timed_out(&mut self, now: Instant, id: &AgentId) {
        let Some(agent) = self.agents.get_mut(id) else { return };
        agent.deadline = None;
        let status = agent.status;
        if status == AgentStatus::Unreachable {
            return;
        }
        warn!(agent_id = %id, timeout = ?self.config.agent_timeout, "agent timed out: unreachable");
        counter!(metrics::AGENTS_UNREACHABLE_EVENTS).increment(1);
        if let AgentStatus::Active { conn } = status {
            self.close(
                conn,
                ErrorCode::Unexpected,
                format!(
                    "agent {id} sent nothing for {:?} and is marked unreachable; register again",
                    self.config.agent_timeout
                ),
            );
        }
        self.rescind_agent_offers(id);
        self.detach_agent(id);
        // Its executors are considered gone (their resources were recovered by the detach);
        // those with live tasks are adopted again if it comes back with them.
        for (fw, e) in self.executors.remove_agent(id) {
            info!(agent_id = %id, framework_id = %fw, executor_id = %e.info.executor_id, "agent unreachable: forgetting its executor");
            if let Some(agent) = self.agents.get_mut(id) {
                agent.used = agent.used.saturating_sub(&e.allocation);
            }
        }
        if let Some(agent) = self.agents.get_mut(id) {
            agent.status = AgentStatus::Unreachable;
        }
        let live: Vec<TaskKey> = self
            .agents
            .get(id)
            .map(|a| self.live_tasks(a.tasks.iter()).map(Task::key).collect())
            .unwrap_or_default();
        for key in live {
            self.master_update(
                now,
                &key,
                TaskState::Unreachable,
                "agent unreachable",
                format!("agent {id} sent nothing for {:?}", self.config.agent_timeout),
            );
        }
        self.request_allocation(now);
    }

    fn on_status_update(&mut self, now: Instant, agent_id: &AgentId, conn: ConnId, mut status: TaskStatus) {
        counter!(metrics::STATUS_UPDATES).increment(1);
        status.agent_id = Some(agent_id.clone());
        let key = (status.framework_id.clone(), status.task_id.clone());
        let ack = |s: &TaskStatus| {
            s.uuid.map(|uuid| Action::ToAgent {
                conn,
                msg: MasterToAgent::StatusAck {
                    framework_id: s.framework_id.clone(),
                    task_id: s.task_id.clone(),
                    uuid,
                },
            })
        };
        let Some(task) = self.tasks.get(&key) else {
            if self.completed_index.contains_key(&key) || !self.frameworks.contains_key(&key.0) {
                // Already acknowledged, or nobody left to acknowledge it: stop the retries.
                debug!(agent_id = %agent_id, task_id = %key.1, framework_id = %key.0, state = %status.state, "acknowledging update of a completed task or removed framework");
                self.actions.extend(ack(&status));
            } else {
                warn!(agent_id = %agent_id, task_id = %key.1, framework_id = %key.0, state = %status.state, "status update for an unknown task dropped");
            }
            return;
        };
        if task.agent_id != *agent_id {
            warn!(agent_id = %agent_id, task_id = %key.1, framework_id = %key.0, known_on = %task.agent_id, "status update from the wrong agent dropped");
            return;
        }
        if !task.state.can_transition_to(status.state) {
            warn!(agent_id = %agent_id, task_id = %key.1, framework_id = %key.0, from = %task.state, to = %status.state, "invalid task state transition dropped");
            // Acknowledge it so the agent stops retrying an update nobody will take.
            self.actions.extend(ack(&status));
            return;
        }
        debug!(agent_id = %agent_id, task_id = %key.1, framework_id = %key.0, state = %status.state, "status update");
        self.apply_status(now, &key, &status);
        self.deliver(&key, status);
    }

    // -----------------------------------------------------------------------------------------
    // Frameworks

    fn on_framework_call(&mut self, now: Instant, conn: ConnId, principal: String, call: SchedulerCall) {
        if self.closing.contains(&conn) {
            return;
        }
        let fw = match self.conns.get(&conn).cloned() {
            None => {
                match call {
                    SchedulerCall::Subscribe(info) => self.subscribe(now, conn, principal, info),
                    _ => self.close(
                        conn,
                        ErrorCode::Unexpected,
                        "the first call of a framework must be Subscribe",
                    ),
                }
                return;
            }
            Some(Peer::Agent(_)) => {
                self.close_peer(now, conn, ErrorCode::Unexpected, "scheduler call on an agent connection");
                return;
            }
            Some(Peer::Framework(fw)) => fw,
        };
        match call {
            SchedulerCall::Subscribe(info) => {
                if info.id.as_ref() == Some(&fw) {
                    self.subscribe(now, conn, principal, info);
                } else {
                    self.close_peer(
                        now,
                        conn,
                        ErrorCode::Unexpected,
                        format!("this connection is already subscribed as framework {fw}"),
                    );
                }
            }
            SchedulerCall::Accept { offer_ids, operations, refuse_seconds } => {
                self.accept(now, conn, &fw, offer_ids, operations, refuse_seconds)
            }
            SchedulerCall::Decline { offer_ids, refuse_seconds } => {
                self.decline(now, &fw, offer_ids, refuse_seconds)
            }
            SchedulerCall::Revive => {
                if let Some(f) = self.frameworks.get_mut(&fw) {
                    info!(framework_id = %fw, "revive");
                    f.filters.clear();
                    f.suppressed = false;
                    self.allocator.revive(&fw);
                    self.request_allocation(now);
                }
            }
            SchedulerCall::Suppress => {
                if let Some(f) = self.frameworks.get_mut(&fw) {
                    info!(framework_id = %fw, "suppress");
                    f.suppressed = true;
                    self.allocator.suppress(&fw);
                }
            }
            SchedulerCall::Request { demands } => self.request(now, conn, &fw, demands),
            SchedulerCall::Kill { task_id } => self.framework_kill(now, conn, &fw, task_id),
            SchedulerCall::Acknowledge { agent_id, task_id, uuid } => {
                self.acknowledge(&fw, agent_id, task_id, uuid)
            }
            SchedulerCall::Reconcile { task_ids } => self.reconcile(now, conn, &fw, task_ids),
            SchedulerCall::Teardown => {
                info!(framework_id = %fw, "framework teardown");
                self.remove_framework(now, &fw);
                self.close(conn, ErrorCode::NotFound, format!("framework {fw} torn down"));
            }
            SchedulerCall::Heartbeat => {}
            SchedulerCall::Message { agent_id, executor_id, data } => {
                self.scheduler_message(conn, &fw, agent_id, executor_id, data)
            }
            SchedulerCall::ShutdownExecutor { agent_id, executor_id } => {
                self.shutdown_executor(conn, &fw, agent_id, executor_id)
            }
        }
    }

    fn subscribe(&mut self, now: Instant, conn: ConnId, principal: String, info: FrameworkInfo) {
        let role = if info.role.is_empty() { "*".to_string() } else { info.role.clone() };
        let id = match info.id {
            None => {
                self.next_framework += 1;
                let id = FrameworkId::new(format!("{}-F{}", self.config.master_id, self.next_framework));
                info!(framework_id = %id, name = %info.name, role, principal, "framework subscribed");
                self.frameworks.insert(
                    id.clone(),
                    Framework {
                        id: id.clone(),
                        name: info.name,
                        role: role.clone(),
                        principal,
                        hostname: info.hostname,
                        failover_timeout: info.failover_timeout,
                        link: FrameworkLink::Connected(conn),
                        suppressed: false,
                        offers: FxHashSet::default(),
                        filters: FxHashMap::default(),
                    },
                );
                self.allocator.add_framework(&id, &role);
                // Tasks of this id adopted from agents before (none for a fresh id).
                id
            }
            Some(id) => {
                let Some(fw) = self.frameworks.get(&id) else {
                    self.close(
                        conn,
                        ErrorCode::NotFound,
                        format!(
                            "framework {id} is not registered with this master (torn down, or \
                             removed after its failover timeout); subscribe without an id"
                        ),
                    );
                    return;
                };
                if fw.principal != principal {
                    warn!(framework_id = %id, principal, registered = %fw.principal, "framework failover refused: principal mismatch");
                    self.close(
                        conn,
                        ErrorCode::Unauthorized,
                        format!("framework {id} belongs to principal {}, not {principal}", fw.principal),
                    );
                    return;
                }
                if fw.role != role {
                    warn!(framework_id = %id, role, kept = %fw.role, "a framework cannot change its role on failover; keeping the old one");
                }
                let old = fw.link;
                let offers = self.offer_ids(&fw.offers);
                match old {
                    FrameworkLink::Connected(old_conn) if old_conn != conn => {
                        info!(framework_id = %id, old_conn, conn, "framework failed over");
                        self.close(
                            old_conn,
                            ErrorCode::Unexpected,
                            format!("framework {id} failed over to another connection"),
                        );
                    }
                    FrameworkLink::Connected(_) => {}
                    FrameworkLink::Disconnected { deadline } => {
                        info!(framework_id = %id, conn, "framework re-subscribed");
                        if let Some(d) = deadline {
                            self.failover_deadlines.remove(&(d, id.clone()));
                        }
                        self.allocator.activate_framework(&id);
                    }
                }
                if matches!(old, FrameworkLink::Connected(c) if c != conn) {
                    // Offers made to the old instance are unknown to the new one.
                    for o in &offers {
                        self.rescind_offer(o, false);
                    }
                }
                if let Some(fw) = self.frameworks.get_mut(&id) {
                    fw.link = FrameworkLink::Connected(conn);
                    fw.name = info.name;
                    fw.hostname = info.hostname;
                    fw.failover_timeout = info.failover_timeout;
                    // A new instance knows nothing of the old one's SUPPRESS.
                    fw.suppressed = false;
                }
                self.allocator.revive(&id);
                id
            }
        };
        self.conns.insert(conn, Peer::Framework(id.clone()));
        self.send_framework(
            conn,
            SchedulerEvent::Subscribed {
                framework_id: id.clone(),
                heartbeat_interval: self.config.framework_heartbeat_interval,
            },
        );
        self.resend_pending(&id, conn);
        self.request_allocation(now);
    }

    /// Sends every update the framework has not acknowledged (or not received) again.
    fn resend_pending(&mut self, fw: &FrameworkId, conn: ConnId) {
        for key in self.framework_task_keys(fw) {
            let Some(task) = self.tasks.get_mut(&key) else { continue };
            for s in &task.pending {
                self.actions
                    .push_back(Action::ToFramework { conn, event: SchedulerEvent::Update(s.clone()) });
            }
            task.pending.retain(|s| s.uuid.is_some());
            self.maybe_complete(&key);
        }
    }

    fn framework_disconnected(&mut self, now: Instant, id: &FrameworkId) {
        let Some(fw) = self.frameworks.get(id) else { return };
        let deadline = now.checked_add(fw.failover_timeout);
        info!(framework_id = %id, failover_timeout = ?fw.failover_timeout, "framework disconnected");
        let offers = self.offer_ids(&fw.offers);
        for o in &offers {
            self.rescind_offer(o, false);
        }
        if let Some(fw) = self.frameworks.get_mut(id) {
            fw.link = FrameworkLink::Disconnected { deadline };
        }
        if let Some(d) = deadline {
            self.failover_deadlines.insert((d, id.clone()));
        }
        self.allocator.deactivate_framework(id);
        self.request_allocation(now);
    }

    /// Forgets a framework for good: its offers are taken back and its tasks killed.
    fn remove_framework(&mut self, now: Instant, id: &FrameworkId) {
        let Some(fw) = self.frameworks.remove(id) else { return };
        counter!(metrics::FRAMEWORKS_REMOVED).increment(1);
        match fw.link {
            FrameworkLink::Connected(conn) => {
                self.conns.remove(&conn);
            }
            FrameworkLink::Disconnected { deadline: Some(d) } => {
                self.failover_deadlines.remove(&(d, id.clone()));
            }
            FrameworkLink::Disconnected { deadline: None } => {}
        }
        for o in &self.offer_ids(&fw.offers) {
            self.take_offer(o);
        }
        self.allocator.remove_framework(id);
        self.removed_frameworks.insert(id.clone());
        let keys = self.framework_task_keys(id);
        let mut agents: BTreeSet<AgentId> = BTreeSet::new();
        for key in &keys {
            if let Some(task) = self.tasks.get_mut(key) {
                task.pending.clear();
                if !task.state.is_terminal() {
                    agents.insert(task.agent_id.clone());
                }
            }
        }
        for (agent_id, e) in self.executors.remove_framework(id) {
            self.free_executor_resources(now, &agent_id, id, &e);
            agents.insert(agent_id);
        }
        for agent in agents {
            if let Some(conn) = self.agents.get(&agent).and_then(Agent::conn) {
                info!(framework_id = %id, agent_id = %agent, "shutting down framework on agent");
                self.send_agent(conn, MasterToAgent::ShutdownFramework { framework_id: id.clone() });
            }
        }
        for key in &keys {
            self.maybe_complete(key);
        }
        self.request_allocation(now);
    }

    #[allow(clippy::too_many_arguments)]
    fn accept(
        &mut self,
        now: Instant,
        conn: ConnId,
        fw: &FrameworkId,
        offer_ids: Vec<OfferId>,
        operations: Vec<Operation>,
        refuse_seconds: Option<f64>,
    ) {
        let tasks: Vec<TaskInfo> = operations
            .into_iter()
            .flat_map(|op| match op {
                Operation::Launch { tasks } => tasks,
            })
            .collect();
        // Every offer must be outstanding, held by this framework and on one agent.
        let mut problem: Option<String> = None;
        let mut seen: HashSet<&OfferId> = HashSet::new();
        let fw_slot = self.frameworks.slot(fw);
        let mut agent: Option<usize> = None;
        if offer_ids.is_empty() {
            problem = Some("the call names no offer".to_string());
        }
        for id in &offer_ids {
            let why = match self.offer(id) {
                None => Some(format!("offer {id} is not outstanding (used, declined or rescinded)")),
                Some(o) if Some(o.framework) != fw_slot => {
                    Some(format!("offer {id} is not held by framework {fw}"))
                }
                Some(_) if !seen.insert(id) => Some(format!("offer {id} is named twice")),
                Some(o) => match agent {
                    Some(a) if a != o.agent => Some(format!(
                        "offer {id} is on agent {} but an earlier one on {}",
                        name(self.agents.at(o.agent).map(|x| &x.id)),
                        name(self.agents.at(a).map(|x| &x.id))
                    )),
                    _ => {
                        agent = Some(o.agent);
                        None
                    }
                },
            };
            if problem.is_none() {
                problem = why;
            }
        }
        let agent = agent.and_then(|a| self.agents.at(a)).map(|a| a.id.clone());
        let held: Vec<OfferId> = offer_ids
            .iter()
            .filter(|id| self.offer(id).is_some_and(|o| Some(o.framework) == fw_slot))
            .cloned()
            .collect();
        let problem = match (problem, &agent) {
            (Some(p), _) => Some(p),
            (None, None) => Some("the call names no offer".to_string()),
            (None, Some(_)) => None,
        };
        if let Some(problem) = problem {
            warn!(framework_id = %fw, problem, "accept with invalid offers");
            for id in &held {
                self.rescind_offer(id, false);
            }
            let ts = self.unix_ms(now);
            for t in tasks {
                counter!(metrics::TASKS_INVALID).increment(1);
                let key = (fw.clone(), t.task_id.clone());
                let status = master_status(
                    &key,
                    None,
                    TaskState::Dropped,
                    "offer no longer valid",
                    problem.clone(),
                    ts,
                );
                self.send_framework(conn, SchedulerEvent::Update(status));
            }
            self.request_allocation(now);
            return;
        }
        let Some(agent_id) = agent else { return };
        counter!(metrics::OFFERS_ACCEPTED).increment(held.len() as u64);
        let mut remaining = Resources::default();
        for id in &held {
            if let Some(o) = self.take_offer(id) {
                remaining.add_assign(&o.resources);
            }
        }
        let agent_conn = self.agents.get(&agent_id).and_then(Agent::conn);
        let role = self.frameworks.get(fw).map(|f| f.role.clone()).unwrap_or_else(|| "*".into());
        let ts = self.unix_ms(now);
        let mut in_call: HashSet<TaskId> = HashSet::new();
        // The executor each framework executor id names in this call (the first valid one).
        let mut call_executors: HashMap<ExecutorId, ExecutorInfo> = HashMap::new();
        for task in tasks {
            let key = (fw.clone(), task.task_id.clone());
            let tid = &task.task_id;
            let duplicate = !in_call.insert(tid.clone());
            let problem = if tid.as_str().is_empty() {
                Some("a task has an empty task id".to_string())
            } else if duplicate {
                Some(format!("task {tid} appears twice in this call"))
            } else if self.tasks.contains_key(&key) {
                Some(format!("task {tid} already exists in framework {fw}"))
            } else if task.resources.cpus == 0 && task.resources.mem == 0 {
                Some(format!("task {tid} asks for no cpus and no mem"))
            } else if let Some(problem) = kind_problem(&task, &self.known_artifacts) {
                Some(problem)
            } else if agent_conn.is_none() {
                Some(format!("agent {agent_id} is not connected"))
            } else if !task.resources.reserved.is_empty() {
                Some(format!("task {tid} names reserved resources; ask for plain quantities"))
            } else {
                None
            };
            // A framework's own executor: the same ExecutorInfo as the one running there (or
            // named earlier in this call); a new one takes its resources with the task's.
            let executor = match &task.kind {
                TaskKind::Executor(e) => Some(&e.executor),
                _ => None,
            };
            let running = executor.and_then(|e| self.executors.get(&agent_id, fw, &e.executor_id));
            let problem = problem.or_else(|| {
                let e = executor?;
                let earlier = running.map(|r| &r.info).or_else(|| call_executors.get(&e.executor_id));
                match earlier {
                    Some(earlier) => executors::mismatch_problem(tid, &agent_id, e, earlier),
                    None => {
                        call_executors.insert(e.executor_id.clone(), e.clone());
                        None
                    }
                }
            });
            let new_executor = executor.filter(|_| running.is_none());
            let fit = remaining.take_for_role(&role, &task.resources).and_then(|a| {
                let Some(e) = new_executor else { return Some((a, None)) };
                let x = remaining.saturating_sub(&a).take_for_role(&role, &e.resources)?;
                Some((a, Some(x)))
            });
            let problem = problem.or_else(|| match (&fit, new_executor) {
                (Some(_), _) => None,
                (None, None) => Some(format!(
                    "task {tid} asks for {} but the offer has {} left",
                    task.resources, remaining
                )),
                (None, Some(e)) => Some(format!(
                    "task {tid} asks for {} and its new executor {} for {} but the offer has {} left",
                    task.resources, e.executor_id, e.resources, remaining
                )),
            });
            if let Some(problem) = problem {
                warn!(framework_id = %fw, task_id = %tid, agent_id = %agent_id, problem, "invalid launch");
                counter!(metrics::TASKS_INVALID).increment(1);
                let status = master_status(
                    &key,
                    Some(agent_id.clone()),
                    TaskState::Error,
                    "invalid launch",
                    problem,
                    ts,
                );
                self.send_framework(conn, SchedulerEvent::Update(status));
                continue;
            }
            // Served from the role's reservation first, then the unreserved part.
            let Some((allocation, executor_allocation)) = fit else { continue };
            remaining = remaining.saturating_sub(&allocation);
            if let (Some(e), Some(x)) = (new_executor, executor_allocation) {
                remaining = remaining.saturating_sub(&x);
                info!(framework_id = %fw, executor_id = %e.executor_id, agent_id = %agent_id, resources = %e.resources, "launching executor");
                if let Some(a) = self.agents.get_mut(&agent_id) {
                    a.used.add_assign(&x);
                }
                let record = ExecutorRecord { info: e.clone(), allocation: x };
                self.executors.insert(&agent_id, fw, record);
            }
            info!(framework_id = %fw, task_id = %tid, agent_id = %agent_id, resources = %task.resources, "launching task");
            counter!(metrics::TASKS_LAUNCHED).increment(1);
            self.tasks.insert(
                key.clone(),
                Task {
                    info: task.clone(),
                    framework_id: fw.clone(),
                    agent_id: agent_id.clone(),
                    state: TaskState::Staging,
                    allocation: allocation.clone(),
                    latest: None,
                    pending: Vec::new(),
                    kill_requested: false,
                },
            );
            if let Some(a) = self.agents.get_mut(&agent_id) {
                a.tasks.insert(key);
                a.used.add_assign(&allocation);
            }
            if let Some(c) = agent_conn {
                self.send_agent(c, MasterToAgent::RunTask { framework_id: fw.clone(), task });
            }
        }
        if !remaining.is_empty() {
            self.allocator.recover(fw, &agent_id, &remaining);
            if refuse_seconds.is_some() {
                let d = refuse_duration(refuse_seconds, Duration::ZERO);
                if let (Some(f), Some(a)) = (self.frameworks.slot(fw), self.agents.slot(&agent_id)) {
                    self.add_filter(now, f, a, remaining, d);
                }
            }
        }
        self.request_allocation(now);
    }

    fn decline(
        &mut self,
        now: Instant,
        fw: &FrameworkId,
        offer_ids: Vec<OfferId>,
        refuse_seconds: Option<f64>,
    ) {
        let d = refuse_duration(refuse_seconds, self.config.default_refuse);
        let fw_slot = self.frameworks.slot(fw);
        for id in offer_ids {
            if self.offer(&id).is_none_or(|o| Some(o.framework) != fw_slot) {
                debug!(framework_id = %fw, offer_id = %id, "decline of an offer not held: ignored");
                continue;
            }
            let Some(offer) = self.take_offer(&id) else { continue };
            let Some(agent) = self.agents.at(offer.agent) else { continue };
            counter!(metrics::OFFERS_DECLINED).increment(1);
            debug!(framework_id = %fw, offer_id = %id, agent_id = %agent.id, refuse = ?d, "offer declined");
            self.allocator.recover(fw, &agent.id, &offer.resources);
            self.add_filter(now, offer.framework, offer.agent, offer.resources, d);
        }
        self.request_allocation(now);
    }

    fn request(&mut self, now: Instant, conn: ConnId, fw: &FrameworkId, mut demands: Vec<Demand>) {
        let bad = demands
            .iter()
            .position(|d| !d.resources.reserved.is_empty() || (d.count > 0 && d.resources.is_empty()));
        if let Some(i) = bad {
            let message = format!(
                "demand entry {i} ({}) must be a non-empty shape of plain quantities",
                demands[i].resources
            );
            warn!(framework_id = %fw, message, "invalid request");
            self.send_framework(conn, SchedulerEvent::Error(WireError::new(ErrorCode::Invalid, message)));
            return;
        }
        if demands.len() > MAX_DEMANDS {
            warn!(framework_id = %fw, entries = demands.len(), "request with too many entries: keeping the first {MAX_DEMANDS}");
            demands.truncate(MAX_DEMANDS);
        }
        debug!(framework_id = %fw, tasks = demands.iter().map(|d| u64::from(d.count)).sum::<u64>(), "demand stated");
        self.allocator.set_demand(fw, &demands);
        self.request_allocation(now);
    }

    fn framework_kill(&mut self, now: Instant, conn: ConnId, fw: &FrameworkId, task_id: TaskId) {
        let key = (fw.clone(), task_id);
        let reply = match self.tasks.get(&key) {
            Some(t) if !t.state.is_terminal() => {
                self.kill_live_task(now, &key);
                None
            }
            Some(t) => Some(self.reconcile_status(now, t)),
            None => match self.completed.iter().rev().find(|t| t.key() == key) {
                Some(t) => Some(self.reconcile_status(now, t)),
                None => Some(master_status(
                    &key,
                    None,
                    TaskState::Lost,
                    "unknown task",
                    format!("framework {fw} has no task {}", key.1),
                    self.unix_ms(now),
                )),
            },
        };
        if let Some(status) = reply {
            self.send_framework(conn, SchedulerEvent::Update(status));
        }
    }

    fn acknowledge(&mut self, fw: &FrameworkId, agent_id: AgentId, task_id: TaskId, uuid: Uuid) {
        let key = (fw.clone(), task_id);
        let agent_id = match self.tasks.get_mut(&key) {
            Some(task) => {
                task.pending.retain(|s| s.uuid != Some(uuid));
                task.agent_id.clone()
            }
            None => agent_id,
        };
        if let Some(conn) = self.agents.get(&agent_id).and_then(Agent::conn) {
            self.send_agent(
                conn,
                MasterToAgent::StatusAck { framework_id: fw.clone(), task_id: key.1.clone(), uuid },
            );
        }
        self.maybe_complete(&key);
    }

    fn reconcile(&mut self, now: Instant, conn: ConnId, fw: &FrameworkId, task_ids: Vec<TaskId>) {
        let statuses: Vec<TaskStatus> = if task_ids.is_empty() {
            self.framework_tasks(fw)
                .filter(|t| !t.state.is_terminal())
                .map(|t| self.reconcile_status(now, t))
                .collect()
        } else {
            task_ids
                .into_iter()
                .map(|tid| {
                    let key = (fw.clone(), tid);
                    match self
                        .tasks
                        .get(&key)
                        .or_else(|| self.completed.iter().rev().find(|t| t.key() == key))
                    {
                        Some(t) => self.reconcile_status(now, t),
                        None => master_status(
                            &key,
                            None,
                            TaskState::Unknown,
                            "reconciliation: unknown task",
                            format!("framework {fw} has no task {}", key.1),
                            self.unix_ms(now),
                        ),
                    }
                })
                .collect()
        };
        for s in statuses {
            self.send_framework(conn, SchedulerEvent::Update(s));
        }
    }

    // -----------------------------------------------------------------------------------------
    // Allocation

    fn allocate(&mut self, now: Instant) {
        counter!(metrics::ALLOCATION_RUNS).increment(1);
        self.agents.refresh_order();
        let mut active = 0usize;
        let mut candidates = Vec::with_capacity(self.agents.len());
        // Agent slot of each candidate, in the same order.
        let mut candidate_slots: Vec<usize> = Vec::with_capacity(self.agents.len());
        for (slot, a) in self.agents.slots_in_order() {
            if a.conn().is_none() {
                continue;
            }
            active += 1;
            if !a.attached {
                continue;
            }
            let available = a.available();
            if is_allocatable(&available, &self.config.allocation.min_allocatable) {
                candidates.push(Candidate { agent: &a.id, available });
                candidate_slots.push(slot);
            }
        }
        let frameworks = &self.frameworks;
        let agents = &self.agents;
        // Allocators ask about agents mostly in candidate order, passing the candidate's own
        // id: the agent is recognised by address at the cursor, else looked up by hash.
        let cursor = Cell::new(0usize);
        let eligible = |fw: &FrameworkId, agent: &AgentId, r: &Resources| {
            let Some(f) = frameworks.get(fw) else { return false };
            if f.conn().is_none() || f.suppressed {
                return false;
            }
            if f.filters.is_empty() {
                return true;
            }
            let c = cursor.get();
            let at_cursor = [c, c + 1].into_iter().find_map(|i| {
                let slot = *candidate_slots.get(i)?;
                agents.at(slot).filter(|a| std::ptr::eq(&a.id, agent)).map(|_| (i, slot))
            });
            let slot = match at_cursor {
                Some((i, slot)) => {
                    cursor.set(i);
                    Some(slot)
                }
                None => agents.slot(agent),
            };
            !slot.is_some_and(|s| f.filtered(s, r, now))
        };
        let decisions = self.allocator.allocate(now, &candidates, &eligible);
        drop(candidates);
        gauge!(metrics::AGENTS_ACTIVE).set(active as f64);
        gauge!(metrics::AGENTS_INACTIVE).set(self.agents.len().saturating_sub(active) as f64);
        gauge!(metrics::FRAMEWORKS_ACTIVE)
            .set(self.frameworks.values().filter(|f| f.conn().is_some()).count() as f64);
        gauge!(metrics::TASKS_KNOWN).set(self.tasks.len() as f64);

        // One `Offers` event per framework, sent in framework id order. Frameworks are looked
        // up once per decision, and each batch is sized before it is filled.
        let fw_slots: Vec<Option<usize>> =
            decisions.iter().map(|d| self.frameworks.slot(&d.framework)).collect();
        let mut per_framework = vec![0u32; self.frameworks.slot_count()];
        for s in fw_slots.iter().flatten() {
            per_framework[*s] += 1;
        }
        const NO_BATCH: u32 = u32::MAX;
        let mut batch_of = vec![NO_BATCH; per_framework.len()];
        let mut batches: Vec<(usize, ConnId, Vec<Offer>)> = Vec::new();
        self.offers.reserve(decisions.len());
        let mut id_text = String::new();
        // Allocators decide agent by agent, mostly in candidate order: the agent of a decision
        // is looked for at the candidate cursor first (one id comparison), then by hash.
        let mut cursor = 0usize;
        for (d, fw_slot) in decisions.into_iter().zip(fw_slots) {
            let at_cursor = [cursor, cursor + 1].into_iter().find(|&i| {
                candidate_slots.get(i).and_then(|&s| self.agents.at(s)).is_some_and(|a| a.id == d.agent)
            });
            let agent_slot = match at_cursor {
                Some(i) => {
                    cursor = i;
                    candidate_slots.get(i).copied()
                }
                None => self.agents.slot(&d.agent),
            };
            let fw = fw_slot.and_then(|s| self.frameworks.at_mut(s));
            let conn = fw.as_deref().and_then(Framework::conn);
            let role_ok = fw.as_deref().is_some_and(|f| fits_role(&d.resources, &f.role));
            let worth = is_allocatable(&d.resources, &self.config.allocation.min_allocatable);
            // One lookup of the agent: connected, attached, and the decision fits what is
            // still free (earlier decisions of this cycle are already counted as offered).
            let agent = agent_slot.and_then(|s| self.agents.at_mut(s)).filter(|a| {
                a.conn().is_some() && a.attached && quick::contains(&a.available(), &d.resources)
            });
            let (Some(agent), Some(fw), Some(agent_slot), Some(fw_slot), true, Some(conn), true) =
                (agent, fw, agent_slot, fw_slot, role_ok, conn, worth)
            else {
                warn!(framework_id = %d.framework, agent_id = %d.agent, allocator = self.allocator.name(),
                    "allocator decision not applicable: ignored");
                self.allocator.recover(&d.framework, &d.agent, &d.resources);
                continue;
            };
            self.next_offer += 1;
            let n = self.next_offer;
            offer_id_text(&mut id_text, &self.config.master_id, n);
            let id = OfferId::new(id_text.as_str());
            agent.add_offer(n);
            quick::add_assign(&mut agent.offered, &d.resources);
            fw.offers.insert(n);
            if let Some(t) = self.config.offer_timeout {
                self.offer_deadlines.insert((after(now, t), id.clone()));
            }
            debug!(framework_id = %d.framework, agent_id = %d.agent, offer_id = %id, resources = %d.resources, "offer");
            self.offers.insert(
                n,
                OfferRecord { framework: fw_slot, agent: agent_slot, resources: d.resources.clone() },
            );
            let offer = Offer {
                id,
                framework_id: d.framework,
                agent_id: d.agent,
                hostname: agent.hostname.clone(),
                resources: d.resources,
                attributes: agent.attributes.clone(),
            };
            let batch = match batch_of[fw_slot] {
                NO_BATCH => {
                    batch_of[fw_slot] = batches.len() as u32;
                    batches.push((fw_slot, conn, Vec::with_capacity(per_framework[fw_slot] as usize)));
                    batches.len() - 1
                }
                b => b as usize,
            };
            batches[batch].2.push(offer);
        }
        let frameworks = &self.frameworks;
        batches.sort_unstable_by(|a, b| {
            let id = |slot: usize| frameworks.at(slot).map(|f| &f.id);
            id(a.0).cmp(&id(b.0))
        });
        for (_, conn, offers) in batches {
            counter!(metrics::OFFERS_SENT).increment(offers.len() as u64);
            // One event however many agents: the server splits one too large for a frame.
            self.send_framework(conn, SchedulerEvent::Offers(offers));
        }
        gauge!(metrics::OFFERS_OUTSTANDING).set(self.offers.len() as f64);
    }
}

/// Writes `{master}-O{n}` (an offer id) into `out` without the formatting machinery.
fn offer_id_text(out: &mut String, master: &str, n: u64) {
    out.clear();
    out.push_str(master);
    out.push_str("-O");
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[i..] {
        out.push(char::from(d));
    }
}

/// What is wrong with a task's executor-specific part, if anything. `known` holds the digests
/// of the artifact store.
fn kind_problem(task: &TaskInfo, known: &FxHashSet<Digest>) -> Option<String> {
    let tid = &task.task_id;
    match &task.kind {
        TaskKind::Command(c) if c.argv.first().is_none_or(|a| a.is_empty()) => {
            Some(format!("task {tid} has an empty command"))
        }
        TaskKind::Command(_) => None,
        TaskKind::Executor(t) => executors::executor_task_problem(tid, t, known),
        TaskKind::Wasm(w) => {
            if let Some(bad) = std::iter::once(&w.module.digest)
                .chain(w.dirs.iter().map(|d| &d.archive.digest))
                .find(|d| !d.is_valid())
            {
                Some(format!("task {tid} names a malformed artifact digest `{bad}`"))
            } else if w.args.is_empty() {
                Some(format!("task {tid} has no argv[0]"))
            } else if !known.contains(&w.module.digest) {
                Some(format!(
                    "task {tid}: module {} is not in the master's artifact store; upload it first",
                    w.module.digest
                ))
            } else if let Some(d) = w.dirs.iter().find(|d| !known.contains(&d.archive.digest)) {
                Some(format!(
                    "task {tid}: archive {} for directory `{}` is not in the master's artifact store; \
                     upload it first",
                    d.archive.digest, d.guest
                ))
            } else {
                w.dirs
                    .iter()
                    .find(|d| !d.guest.starts_with('/') || d.guest.contains('\0'))
                    .map(|d| format!("task {tid}: guest directory `{}` must be an absolute path", d.guest))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const SEC: Duration = Duration::from_secs(1);

    fn res(s: &str) -> Resources {
        Resources::parse(s).expect("test resources")
    }

    fn task(id: &str, r: &str) -> TaskInfo {
        TaskInfo {
            task_id: TaskId::new(id),
            name: format!("name-{id}"),
            resources: res(r),
            kind: TaskKind::Command(CommandInfo { argv: vec!["true".into()], shell: false, env: vec![] }),
            kill_grace: None,
        }
    }

    fn info(id: Option<&FrameworkId>, failover: Duration) -> FrameworkInfo {
        FrameworkInfo {
            id: id.cloned(),
            name: "test".into(),
            role: "*".into(),
            failover_timeout: failover,
            hostname: "h".into(),
        }
    }

    /// Drives a master with simulated time and collects its actions.
    struct Harness {
        m: Master,
        t0: Instant,
        now: Instant,
        next_conn: ConnId,
        uuids: u128,
    }

    impl Harness {
        fn new() -> Self {
            let t0 = Instant::now();
            let config = MasterConfig { master_id: "m".into(), ..MasterConfig::default() };
            let mut m = Master::new(config, t0);
            m.set_unix_time(t0, 1_000_000);
            Harness { m, t0, now: t0, next_conn: 0, uuids: 0 }
        }

        fn conn(&mut self) -> ConnId {
            self.next_conn += 1;
            self.next_conn
        }

        fn uuid(&mut self) -> Uuid {
            self.uuids += 1;
            Uuid::from_u128(self.uuids)
        }

        fn drain(&mut self) -> Vec<Action> {
            std::iter::from_fn(|| self.m.poll_action()).collect()
        }

        fn agent(&mut self, conn: ConnId, msg: AgentMessage) -> Vec<Action> {
            self.m.handle(self.now, Event::Agent { conn, principal: "agent".into(), msg });
            self.drain()
        }

        fn call(&mut self, conn: ConnId, call: SchedulerCall) -> Vec<Action> {
            self.call_as(conn, "alice", call)
        }

        fn call_as(&mut self, conn: ConnId, principal: &str, call: SchedulerCall) -> Vec<Action> {
            self.m.handle(self.now, Event::Framework { conn, principal: principal.into(), call });
            self.drain()
        }

        /// Runs every timer up to `now + d` and returns what came out.
        fn advance(&mut self, d: Duration) -> Vec<Action> {
            let target = self.now + d;
            for _ in 0..100_000 {
                match self.m.poll_timeout() {
                    Some(t) if t <= target => {
                        self.now = self.now.max(t);
                        self.m.handle_timeout(self.now);
                    }
                    _ => break,
                }
            }
            self.now = target;
            self.drain()
        }

        fn register(
            &mut self,
            id: Option<AgentId>,
            r: &str,
            tasks: Vec<TaskReport>,
        ) -> (ConnId, AgentId, Vec<Action>) {
            let conn = self.conn();
            let acts = self.agent(
                conn,
                AgentMessage::Register {
                    agent_id: id,
                    hostname: format!("host{conn}"),
                    resources: res(r),
                    attributes: Attributes::parse("rack:r1").expect("attrs"),
                    tasks,
                },
            );
            let id = acts
                .iter()
                .find_map(|a| match a {
                    Action::ToAgent { conn: c, msg: MasterToAgent::Registered { agent_id, .. } }
                        if *c == conn =>
                    {
                        Some(agent_id.clone())
                    }
                    _ => None,
                })
                .expect("agent registered");
            (conn, id, acts)
        }

        fn add_agent(&mut self, r: &str) -> (ConnId, AgentId) {
            let (c, id, _) = self.register(None, r, vec![]);
            (c, id)
        }

        fn subscribe(&mut self, principal: &str, failover: Duration) -> (ConnId, FrameworkId) {
            let conn = self.conn();
            let acts = self.call_as(conn, principal, SchedulerCall::Subscribe(info(None, failover)));
            let id = acts
                .iter()
                .find_map(|a| match a {
                    Action::ToFramework {
                        event: SchedulerEvent::Subscribed { framework_id, .. }, ..
                    } => Some(framework_id.clone()),
                    _ => None,
                })
                .expect("subscribed");
            (conn, id)
        }

        fn status(
            &mut self,
            conn: ConnId,
            fw: &FrameworkId,
            agent: &AgentId,
            tid: &str,
            state: TaskState,
        ) -> (Uuid, Vec<Action>) {
            let uuid = self.uuid();
            let s = TaskStatus {
                task_id: TaskId::new(tid),
                framework_id: fw.clone(),
                agent_id: Some(agent.clone()),
                state,
                uuid: Some(uuid),
                source: UpdateSource::Executor,
                reason: "test".into(),
                message: String::new(),
                exit_code: if state == TaskState::Finished { Some(0) } else { None },
                signal: None,
                usage: None,
                timestamp_ms: 0,
            };
            (uuid, self.agent(conn, AgentMessage::StatusUpdate(s)))
        }

        /// Subscribes a framework, registers an agent and launches one task on it (RUNNING).
        fn running_task(&mut self, agent_res: &str, task_res: &str, failover: Duration) -> Setup {
            let (fc, fw) = self.subscribe("alice", failover);
            let (ac, agent) = self.add_agent(agent_res);
            let offer = single_offer(&self.advance(5 * MS), fc);
            let acts = self.call(
                fc,
                SchedulerCall::Accept {
                    offer_ids: vec![offer.id],
                    operations: vec![Operation::Launch { tasks: vec![task("t1", task_res)] }],
                    refuse_seconds: None,
                },
            );
            assert_eq!(run_tasks(&acts, ac).len(), 1);
            let (uuid, _) = self.status(ac, &fw, &agent, "t1", TaskState::Running);
            self.call(
                fc,
                SchedulerCall::Acknowledge { agent_id: agent.clone(), task_id: TaskId::new("t1"), uuid },
            );
            Setup { fc, fw, ac, agent }
        }
    }

    struct Setup {
        fc: ConnId,
        fw: FrameworkId,
        ac: ConnId,
        agent: AgentId,
    }

    fn offers(acts: &[Action], conn: ConnId) -> Vec<Offer> {
        acts.iter()
            .filter_map(|a| match a {
                Action::ToFramework { conn: c, event: SchedulerEvent::Offers(o) } if *c == conn => {
                    Some(o.clone())
                }
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn single_offer(acts: &[Action], conn: ConnId) -> Offer {
        let o = offers(acts, conn);
        assert_eq!(o.len(), 1, "expected one offer to {conn}: {acts:#?}");
        o[0].clone()
    }

    fn updates(acts: &[Action], conn: ConnId) -> Vec<TaskStatus> {
        acts.iter()
            .filter_map(|a| match a {
                Action::ToFramework { conn: c, event: SchedulerEvent::Update(s) } if *c == conn => {
                    Some(s.clone())
                }
                _ => None,
            })
            .collect()
    }

    fn run_tasks(acts: &[Action], conn: ConnId) -> Vec<TaskInfo> {
        acts.iter()
            .filter_map(|a| match a {
                Action::ToAgent { conn: c, msg: MasterToAgent::RunTask { task, .. } } if *c == conn => {
                    Some(task.clone())
                }
                _ => None,
            })
            .collect()
    }

    fn to_agent(acts: &[Action], conn: ConnId) -> Vec<MasterToAgent> {
        acts.iter()
            .filter_map(|a| match a {
                Action::ToAgent { conn: c, msg } if *c == conn => Some(msg.clone()),
                _ => None,
            })
            .collect()
    }

    fn closed(acts: &[Action], conn: ConnId) -> Option<WireError> {
        acts.iter().find_map(|a| match a {
            Action::Close { conn: c, error } if *c == conn => Some(error.clone()),
            _ => None,
        })
    }

    fn accept(offer: &Offer, tasks: Vec<TaskInfo>, refuse_seconds: Option<f64>) -> SchedulerCall {
        SchedulerCall::Accept {
            offer_ids: vec![offer.id.clone()],
            operations: vec![Operation::Launch { tasks }],
            refuse_seconds,
        }
    }

    fn decline(offer: &Offer, refuse_seconds: Option<f64>) -> SchedulerCall {
        SchedulerCall::Decline { offer_ids: vec![offer.id.clone()], refuse_seconds }
    }

    #[test]
    fn the_core_can_move_between_threads() {
        fn is_send<T: Send>() {}
        is_send::<Master>();
    }

    #[test]
    fn offers_whole_agent_after_the_batch_delay() {
        let mut h = Harness::new();
        let (fc, fw) = h.subscribe("alice", SEC);
        let (_, agent) = h.add_agent("cpus:4;mem:4GiB");
        assert_eq!(fw.as_str(), "m-F1");
        assert_eq!(agent.as_str(), "m-A1");
        assert_eq!(h.m.poll_timeout(), Some(h.t0 + 2 * MS));
        let offer = single_offer(&h.advance(2 * MS), fc);
        assert_eq!(offer.id.as_str(), "m-O1");
        assert_eq!(offer.framework_id, fw);
        assert_eq!(offer.agent_id, agent);
        assert_eq!(offer.resources, res("cpus:4;mem:4GiB"));
        assert_eq!(offer.hostname, "host2");
        assert!(offer.attributes.get("rack").is_some());
        // Held until answered: nothing more is offered.
        assert!(offers(&h.advance(3 * SEC), fc).is_empty());
    }

    #[test]
    fn accept_launches_and_leftover_goes_to_the_other_framework() {
        // The example of the design: <2 CPU, 1 GB> and <1 CPU, 2 GB> out of <4 CPU, 4 GB>;
        // <1 CPU, 1 GB> is then offered to framework 2.
        let mut h = Harness::new();
        let (f1, fw1) = h.subscribe("alice", SEC);
        let (ac, agent) = h.add_agent("cpus:4;mem:4GiB");
        let offer = single_offer(&h.advance(5 * MS), f1);
        let (f2, _) = h.subscribe("bob", SEC);
        let acts = h
            .call(f1, accept(&offer, vec![task("a", "cpus:2;mem:1GiB"), task("b", "cpus:1;mem:2GiB")], None));
        let launched = run_tasks(&acts, ac);
        assert_eq!(launched.iter().map(|t| t.task_id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert!(updates(&acts, f1).is_empty());
        let acts = h.advance(5 * MS);
        assert!(offers(&acts, f1).is_empty());
        let leftover = single_offer(&acts, f2);
        assert_eq!(leftover.resources, res("cpus:1;mem:1GiB"));
        let tasks = h.m.tasks();
        assert_eq!(tasks.len(), 2);
        assert!(tasks
            .iter()
            .all(|t| t.state == TaskState::Staging && t.agent_id == agent && t.framework_id == fw1));
        let views = h.m.agents();
        assert_eq!(views[0].used, res("cpus:3;mem:3GiB"));
        assert_eq!(views[0].tasks, 2);
        assert_eq!(h.m.frameworks()[0].used, res("cpus:3;mem:3GiB"));
    }

    #[test]
    fn the_leftover_comes_back_to_a_lone_framework() {
        let mut h = Harness::new();
        let (fc, _) = h.subscribe("alice", SEC);
        h.add_agent("cpus:4;mem:4GiB");
        let offer = single_offer(&h.advance(5 * MS), fc);
        h.call(fc, accept(&offer, vec![task("a", "cpus:1;mem:1GiB")], None));
        let again = single_offer(&h.advance(5 * MS), fc);
        assert_eq!(again.resources, res("cpus:3;mem:3GiB"));
    }

    #[test]
    fn invalid_launches_get_task_error_and_nothing_runs() {
        let mut h = Harness::new();
        let (fc, _) = h.subscribe("alice", SEC);
        let (ac, _) = h.add_agent("cpus:2;mem:2GiB");
        let offer = single_offer(&h.advance(5 * MS), fc);
        let mut empty_argv = task("noargv", "cpus:0.1");
        empty_argv.kind = TaskKind::Command(CommandInfo { argv: vec![], shell: false, env: vec![] });
        let acts = h.call(
            fc,
            accept(
                &offer,
                vec![
                    task("big", "cpus:4"),
                    task("", "cpus:1"),
                    task("nothing", "disk:1GiB"),
                    empty_argv,
                    task("ok", "cpus:1.5"),
                    task("ok", "cpus:0.1"),
                    task("late", "cpus:1"),
                ],
                Some(f64::NAN),
            ),
        );
        let launched = run_tasks(&acts, ac);
        assert_eq!(launched.len(), 1);
        assert_eq!(launched[0].task_id.as_str(), "ok");
        let ups = updates(&acts, fc);
        assert_eq!(ups.len(), 6, "{ups:#?}");
        for u in &ups {
            assert_eq!(u.state, TaskState::Error);
            assert_eq!(u.source, UpdateSource::Master);
            assert_eq!(u.reason, "invalid launch");
            assert!(u.uuid.is_none());
        }
        assert_eq!(ups[0].message, "task big asks for cpus:4 but the offer has cpus:2;mem:2GiB left");
        assert!(ups[1].message.contains("empty task id"), "{}", ups[1].message);
        assert!(ups[2].message.contains("no cpus and no mem"), "{}", ups[2].message);
        assert!(ups[3].message.contains("empty command"), "{}", ups[3].message);
        assert!(ups[4].message.contains("twice"), "{}", ups[4].message);
        assert!(ups[5].message.contains("cpus:0.5;mem:2GiB left"), "{}", ups[5].message);
        // An id already in use is refused too.
        let again = single_offer(&h.advance(5 * MS), fc);
        assert_eq!(again.resources, res("cpus:0.5;mem:2GiB"));
        let acts = h.call(fc, accept(&again, vec![task("ok", "cpus:0.1")], None));
        assert!(run_tasks(&acts, ac).is_empty());
        assert!(updates(&acts, fc)[0].message.contains("already exists"));
        assert_eq!(h.m.tasks().len(), 1);
    }

    #[test]
    fn stale_offers_drop_every_task_and_recover_the_valid_ones() {
        let mut h = Harness::new();
        let (fc, _) = h.subscribe("alice", SEC);
        let (ac, _) = h.add_agent("cpus:2;mem:2GiB");
        let offer = single_offer(&h.advance(5 * MS), fc);
        let acts = h.call(
            fc,
            SchedulerCall::Accept {
                offer_ids: vec![offer.id.clone(), OfferId::new("m-O99")],
                operations: vec![Operation::Launch { tasks: vec![task("a", "cpus:1"), task("b", "cpus:1")] }],
                refuse_seconds: Some(-3.0),
            },
        );
        assert!(run_tasks(&acts, ac).is_empty());
        let ups = updates(&acts, fc);
        assert_eq!(ups.len(), 2);
        assert!(ups.iter().all(|u| u.state == TaskState::Dropped && u.reason == "offer no longer valid"));
        assert!(ups[0].message.contains("m-O99"), "{}", ups[0].message);
        // The valid offer was recovered and comes again; the used one is gone for good.
        let again = single_offer(&h.advance(5 * MS), fc);
        assert_eq!(again.resources, res("cpus:2;mem:2GiB"));
        let acts = h.call(fc, accept(&offer, vec![task("c", "cpus:1")], None));
        assert_eq!(updates(&acts, fc)[0].state, TaskState::Dropped);
        // An accept naming no offer at all.
        let acts =
            h.call(fc, SchedulerCall::Accept { offer_ids: vec![], operations: vec![], refuse_seconds: None });
        assert!(acts.is_empty(), "{acts:?}");
        assert!(h.m.tasks().is_empty());
    }

    #[test]
    fn updates_are_forwarded_and_acks_reach_the_agent() {
        let mut h = Harness::new();
        let s = h.running_task("cpus:2;mem:2GiB", "cpus:1;mem:1GiB", SEC);
        let (uuid, acts) = h.status(s.ac, &s.fw, &s.agent, "t1", TaskState::Finished);
        let ups = updates(&acts, s.fc);
        assert_eq!(ups.len(), 1);
        assert_eq!(ups[0].state, TaskState::Finished);
        assert_eq!(ups[0].uuid, Some(uuid));
        assert_eq!(ups[0].agent_id.as_ref(), Some(&s.agent));
        // A retry of the same update is forwarded again.
        let acts = h.agent(s.ac, AgentMessage::StatusUpdate(ups[0].clone()));
        assert_eq!(updates(&acts, s.fc).len(), 1);
        let acts = h.call(
            s.fc,
            SchedulerCall::Acknowledge { agent_id: s.agent.clone(), task_id: TaskId::new("t1"), uuid },
        );
        assert_eq!(
            to_agent(&acts, s.ac),
            vec![MasterToAgent::StatusAck { framework_id: s.fw.clone(), task_id: TaskId::new("t1"), uuid }]
        );
        // Completed but still listed, with its exit code.
        let t = &h.m.tasks()[0];
        assert_eq!((t.state, t.exit_code), (TaskState::Finished, Some(0)));
        // A late retry of an acknowledged update is acknowledged by the master itself.
        let acts = h.agent(s.ac, AgentMessage::StatusUpdate(ups[0].clone()));
        assert!(updates(&acts, s.fc).is_empty());
        assert_eq!(to_agent(&acts, s.ac).len(), 1);
        // Invalid transitions are not forwarded.
        let (_, acts) = h.status(s.ac, &s.fw, &s.agent, "t1", TaskState::Running);
        assert!(updates(&acts, s.fc).is_empty());
    }

    #[test]
    fn terminal_updates_return_resources() {
        let mut h = Harness::new();
        let s = h.running_task("cpus:2;mem:2GiB", "cpus:2;mem:2GiB", SEC);
        assert!(offers(&h.advance(2 * SEC), s.fc).is_empty(), "the agent is full");
        let (_, acts) = h.status(s.ac, &s.fw, &s.agent, "t1", TaskState::Failed);
        assert_eq!(updates(&acts, s.fc)[0].state, TaskState::Failed);
        let offer = single_offer(&h.advance(5 * MS), s.fc);
        assert_eq!(offer.resources, res("cpus:2;mem:2GiB"));
        assert_eq!(h.m.agents()[0].used, Resources::default());
        assert_eq!(h.m.agents()[0].tasks, 0);
    }

    #[test]
    fn decline_filters_hide_the_agent_until_they_expire() {
        let mut h = Harness::new();
        let (f1, _) = h.subscribe("alice", SEC);
        let (f2, _) = h.subscribe("bob", SEC);
        h.add_agent("cpus:4;mem:4GiB");
        let o = single_offer(&h.advance(5 * MS), f1);
        h.call(f1, decline(&o, Some(10.0)));
        let acts = h.advance(5 * MS);
        assert!(offers(&acts, f1).is_empty());
        let o2 = single_offer(&acts, f2);
        assert_eq!(o2.resources, o.resources);
        h.call(f2, decline(&o2, Some(100.0)));
        // Before the filter of f1 expires nobody gets it; then f1 does again.
        let acts = h.advance(9 * SEC);
        assert!(offers(&acts, f1).is_empty() && offers(&acts, f2).is_empty(), "{acts:?}");
        let acts = h.advance(SEC + 5 * MS);
        assert_eq!(single_offer(&acts, f1).resources, o.resources);
        assert!(offers(&acts, f2).is_empty());
    }

    #[test]
    fn default_refuse_applies_when_none_is_given() {
        let mut h = Harness::new();
        let (fc, _) = h.subscribe("alice", SEC);
        h.add_agent("cpus:1");
        let o = single_offer(&h.advance(5 * MS), fc);
        h.call(fc, decline(&o, None));
        assert!(offers(&h.advance(4 * SEC), fc).is_empty());
        assert_eq!(offers(&h.advance(SEC + 5 * MS), fc).len(), 1);
    }

    #[test]
    fn a_larger_offer_passes_a_filter_on_a_smaller_one() {
        let mut h = Harness::new();
        let s = h.running_task("cpus:4;mem:4GiB", "cpus:2;mem:2GiB", SEC);
        let leftover = single_offer(&h.advance(5 * MS), s.fc);
        assert_eq!(leftover.resources, res("cpus:2;mem:2GiB"));
        h.call(s.fc, decline(&leftover, Some(60.0)));
        assert!(offers(&h.advance(2 * SEC), s.fc).is_empty());
        h.status(s.ac, &s.fw, &s.agent, "t1", TaskState::Finished);
        let whole = single_offer(&h.advance(5 * MS), s.fc);
        assert_eq!(whole.resources, res("cpus:4;mem:4GiB"));
    }

    #[test]
    fn accept_refuse_seconds_filters_the_leftover() {
        let mut h = Harness::new();
        let (fc, _) = h.subscribe("alice", SEC);
        h.add_agent("cpus:4");
        let o = single_offer(&h.advance(5 * MS), fc);
        h.call(fc, accept(&o, vec![task("a", "cpus:1")], Some(3.0)));
        assert!(offers(&h.advance(2 * SEC), fc).is_empty());
        assert_eq!(single_offer(&h.advance(SEC + 5 * MS), fc).resources, res("cpus:3"));
    }

    #[test]
    fn revive_clears_filters() {
        let mut h = Harness::new();
        let (fc, _) = h.subscribe("alice", SEC);
        h.add_agent("cpus:4");
        let o = single_offer(&h.advance(5 * MS), fc);
        h.call(fc, decline(&o, Some(1e12)));
        assert!(offers(&h.advance(3 * SEC), fc).is_empty());
        h.call(fc, SchedulerCall::Revive);
        assert_eq!(single_offer(&h.advance(5 * MS), fc).resources, res("cpus:4"));
    }

    #[test]
    fn suppress_stops_offers_but_keeps_outstanding_ones() {
        let mut h = Harness::new();
        let (fc, _) = h.subscribe("alice", SEC);
        let (ac, _) = h.add_agent("cpus:4");
        h.add_agent("cpus:4");
        let acts = h.advance(5 * MS);
        // Both agents come in one batch.
        assert_eq!(acts.len(), 1, "{acts:?}");
        let os = offers(&acts, fc);
        assert_eq!(os.len(), 2);
        h.call(fc, SchedulerCall::Suppress);
        assert_eq!(h.m.frameworks()[0].status, "suppressed");
        h.call(fc, decline(&os[1], Some(0.0)));
        let acts = h.call(fc, accept(&os[0], vec![task("a", "cpus:1")], None));
        assert_eq!(run_tasks(&acts, ac).len(), 1);
        assert!(offers(&h.advance(3 * SEC), fc).is_empty());
        h.call(fc, SchedulerCall::Revive);
        assert_eq!(h.m.frameworks()[0].status, "active");
        assert_eq!(offers(&h.advance(5 * MS), fc).len(), 2);
    }

    #[test]
    fn agent_disconnect_rescinds_its_offers() {
        let mut h = Harness::new();
        let (fc, _) = h.subscribe("alice", SEC);
        let (ac, _) = h.add_agent("cpus:4");
        let o = single_offer(&h.advance(5 * MS), fc);
        h.m.handle(h.now, Event::AgentDisconnected { conn: ac });
        let acts = h.drain();
        assert_eq!(
            acts,
            vec![Action::ToFramework { conn: fc, event: SchedulerEvent::Rescind { offer_id: o.id.clone() } }]
        );
        assert_eq!(h.m.agents()[0].status, "disconnected");
        assert!(offers(&h.advance(2 * SEC), fc).is_empty());
        let acts = h.call(fc, accept(&o, vec![task("a", "cpus:1")], None));
        assert_eq!(updates(&acts, fc)[0].state, TaskState::Dropped);
    }

    #[test]
    fn silent_agents_become_unreachable() {
        let mut h = Harness::new();
        let s = h.running_task("cpus:4", "cpus:1", SEC);
        let o = single_offer(&h.advance(5 * MS), s.fc);
        // Heartbeats keep it alive.
        h.advance(15 * SEC);
        let acts = h.agent(s.ac, AgentMessage::Heartbeat);
        assert_eq!(to_agent(&acts, s.ac), vec![MasterToAgent::HeartbeatAck]);
        assert!(h.advance(15 * SEC).iter().all(|a| closed(std::slice::from_ref(a), s.ac).is_none()));
        let acts = h.advance(6 * SEC);
        assert!(closed(&acts, s.ac).is_some());
        assert!(acts.contains(&Action::ToFramework {
            conn: s.fc,
            event: SchedulerEvent::Rescind { offer_id: o.id }
        }));
        let ups = updates(&acts, s.fc);
        assert_eq!(ups.len(), 1);
        assert_eq!(ups[0].state, TaskState::Unreachable);
        assert_eq!(ups[0].reason, "agent unreachable");
        assert_eq!(ups[0].source, UpdateSource::Master);
        assert_eq!(ups[0].uuid, None);
        assert_eq!(h.m.agents()[0].status, "unreachable");
        assert_eq!(h.m.tasks()[0].state, TaskState::Unreachable);
        // Messages on the closed connection are ignored.
        assert!(h.agent(s.ac, AgentMessage::Heartbeat).is_empty());
        // A kill now repeats where the task stands.
        let acts = h.call(s.fc, SchedulerCall::Kill { task_id: TaskId::new("t1") });
        assert_eq!(updates(&acts, s.fc)[0].state, TaskState::Unreachable);
    }

    #[test]
    fn a_disconnected_agent_times_out_too() {
        let mut h = Harness::new();
        let s = h.running_task("cpus:4", "cpus:1", SEC);
        h.m.handle(h.now, Event::AgentDisconnected { conn: s.ac });
        h.drain();
        assert_eq!(h.m.tasks()[0].state, TaskState::Running);
        let acts = h.advance(21 * SEC);
        assert_eq!(updates(&acts, s.fc)[0].state, TaskState::Unreachable);
    }

    #[test]
    fn re_registration_brings_tasks_back() {
        let mut h = Harness::new();
        let s = h.running_task("cpus:4;mem:4GiB", "cpus:1;mem:1GiB", SEC);
        // A second task, staged only.
        let o = single_offer(&h.advance(5 * MS), s.fc);
        h.call(s.fc, accept(&o, vec![task("t2", "cpus:1")], None));
        h.advance(21 * SEC);
        assert_eq!(h.m.agents()[0].status, "unreachable");
        // The agent comes back and reports t1 only.
        let report = TaskReport {
            framework_id: s.fw.clone(),
            task: task("t1", "cpus:1;mem:1GiB"),
            state: TaskState::Running,
        };
        let (ac2, id, acts) = h.register(Some(s.agent.clone()), "cpus:4;mem:4GiB", vec![report]);
        assert_eq!(id, s.agent);
        let ups = updates(&acts, s.fc);
        assert_eq!(ups.len(), 2, "{ups:#?}");
        assert_eq!((ups[0].task_id.as_str(), ups[0].state), ("t1", TaskState::Running));
        assert_eq!(ups[0].reason, "agent re-registered");
        assert_eq!((ups[1].task_id.as_str(), ups[1].state), ("t2", TaskState::Lost));
        assert_eq!(ups[1].reason, "task not reported by re-registered agent");
        let a = &h.m.agents()[0];
        assert_eq!((a.status.as_str(), a.tasks), ("active", 1));
        assert_eq!(a.used, res("cpus:1;mem:1GiB"));
        assert_eq!(single_offer(&h.advance(5 * MS), s.fc).resources, res("cpus:3;mem:3GiB"));
        // The new connection works; the old one is gone.
        let (_, acts) = h.status(ac2, &s.fw, &s.agent, "t1", TaskState::Finished);
        assert_eq!(updates(&acts, s.fc)[0].state, TaskState::Finished);
    }

    #[test]
    fn a_second_connection_replaces_the_first() {
        let mut h = Harness::new();
        let (ac1, id) = h.add_agent("cpus:1");
        let (ac2, id2, acts) = h.register(Some(id.clone()), "cpus:2", vec![]);
        assert_eq!(id2, id);
        assert!(closed(&acts, ac1).is_some());
        assert_eq!(h.m.agents()[0].resources, res("cpus:2"));
        // The late disconnect of the old connection changes nothing.
        h.m.handle(h.now, Event::AgentDisconnected { conn: ac1 });
        assert_eq!(h.m.agents()[0].status, "active");
        let acts = h.agent(ac2, AgentMessage::Heartbeat);
        assert_eq!(to_agent(&acts, ac2), vec![MasterToAgent::HeartbeatAck]);
        // Someone else cannot take the id.
        let conn = h.conn();
        h.m.handle(
            h.now,
            Event::Agent {
                conn,
                principal: "mallory".into(),
                msg: AgentMessage::Register {
                    agent_id: Some(id),
                    hostname: "x".into(),
                    resources: res("cpus:1"),
                    attributes: Attributes::default(),
                    tasks: vec![],
                },
            },
        );
        assert_eq!(closed(&h.drain(), conn).map(|e| e.code), Some(ErrorCode::Unauthorized));
    }

    #[test]
    fn a_restarted_master_learns_agents_back() {
        let mut h = Harness::new();
        let report = TaskReport {
            framework_id: FrameworkId::new("old-F1"),
            task: task("x", "cpus:1"),
            state: TaskState::Running,
        };
        let (_, id, _) = h.register(Some(AgentId::new("old-A7")), "cpus:4", vec![report]);
        assert_eq!(id.as_str(), "old-A7");
        assert_eq!(h.m.agents()[0].used, res("cpus:1"));
        assert_eq!(h.m.tasks()[0].state, TaskState::Running);
        let (fc, _) = h.subscribe("alice", SEC);
        assert_eq!(single_offer(&h.advance(5 * MS), fc).resources, res("cpus:3"));
    }

    #[test]
    fn failover_within_the_timeout_keeps_tasks_and_resends_updates() {
        let mut h = Harness::new();
        let s = h.running_task("cpus:4", "cpus:1", 15 * SEC);
        h.status(s.ac, &s.fw, &s.agent, "t1", TaskState::Running);
        h.m.handle(h.now, Event::FrameworkDisconnected { conn: s.fc });
        h.drain();
        assert_eq!(h.m.frameworks()[0].status, "disconnected");
        let (u_fin, acts) = h.status(s.ac, &s.fw, &s.agent, "t1", TaskState::Finished);
        assert!(acts.iter().all(|a| !matches!(a, Action::ToFramework { .. })));
        h.advance(10 * SEC);
        let fc2 = h.conn();
        let acts = h.call(fc2, SchedulerCall::Subscribe(info(Some(&s.fw), 60 * SEC)));
        assert!(
            matches!(&acts[0], Action::ToFramework { conn, event: SchedulerEvent::Subscribed { framework_id, .. } } if *conn == fc2 && *framework_id == s.fw)
        );
        let ups = updates(&acts, fc2);
        assert_eq!(
            ups.iter().map(|u| u.state).collect::<Vec<_>>(),
            [TaskState::Running, TaskState::Finished]
        );
        assert_eq!(h.m.frameworks()[0].status, "active");
        assert_eq!(h.m.tasks().len(), 1);
        // Nothing is removed when the old deadline passes.
        h.agent(s.ac, AgentMessage::Heartbeat);
        h.advance(10 * SEC);
        assert_eq!(h.m.frameworks().len(), 1);
        let acts = h.call(
            fc2,
            SchedulerCall::Acknowledge { agent_id: s.agent.clone(), task_id: TaskId::new("t1"), uuid: u_fin },
        );
        assert_eq!(to_agent(&acts, s.ac).len(), 1);
    }

    #[test]
    fn failover_from_a_live_connection_closes_the_old_one() {
        let mut h = Harness::new();
        let (f1, fw) = h.subscribe("alice", SEC);
        h.add_agent("cpus:1");
        let o = single_offer(&h.advance(5 * MS), f1);
        let f2 = h.conn();
        let acts = h.call(f2, SchedulerCall::Subscribe(info(Some(&fw), SEC)));
        assert!(closed(&acts, f1).is_some_and(|e| e.message.contains("failed over")));
        // The old instance's offer is void and the resources go to the new one.
        let acts = h.call(f2, accept(&o, vec![task("a", "cpus:1")], None));
        assert_eq!(updates(&acts, f2)[0].state, TaskState::Dropped);
        assert_eq!(single_offer(&h.advance(5 * MS), f2).resources, res("cpus:1"));
        h.m.handle(h.now, Event::FrameworkDisconnected { conn: f1 });
        assert_eq!(h.m.frameworks()[0].status, "active");
    }

    #[test]
    fn past_the_failover_timeout_tasks_are_killed_and_the_framework_removed() {
        let mut h = Harness::new();
        let s = h.running_task("cpus:4", "cpus:1", 10 * SEC);
        h.m.handle(h.now, Event::FrameworkDisconnected { conn: s.fc });
        h.drain();
        let acts = h.advance(9 * SEC);
        assert!(to_agent(&acts, s.ac).is_empty());
        h.agent(s.ac, AgentMessage::Heartbeat);
        let acts = h.advance(2 * SEC);
        assert_eq!(
            to_agent(&acts, s.ac),
            vec![MasterToAgent::ShutdownFramework { framework_id: s.fw.clone() }]
        );
        assert!(h.m.frameworks().is_empty());
        // The agent reports the kill: acknowledged by the master, resources back.
        let (uuid, acts) = h.status(s.ac, &s.fw, &s.agent, "t1", TaskState::Killed);
        assert_eq!(
            to_agent(&acts, s.ac),
            vec![MasterToAgent::StatusAck { framework_id: s.fw.clone(), task_id: TaskId::new("t1"), uuid }]
        );
        assert_eq!(h.m.agents()[0].used, Resources::default());
        assert_eq!(h.m.tasks()[0].state, TaskState::Killed);
        // Coming back is refused.
        let c = h.conn();
        let acts = h.call(c, SchedulerCall::Subscribe(info(Some(&s.fw), SEC)));
        let err = closed(&acts, c).expect("closed");
        assert_eq!(err.code, ErrorCode::NotFound);
        assert!(err.message.contains("subscribe without an id"), "{}", err.message);
    }

    #[test]
    fn teardown_kills_tasks_and_closes() {
        let mut h = Harness::new();
        let s = h.running_task("cpus:4", "cpus:1", 60 * SEC);
        let acts = h.call(s.fc, SchedulerCall::Teardown);
        assert_eq!(
            to_agent(&acts, s.ac),
            vec![MasterToAgent::ShutdownFramework { framework_id: s.fw.clone() }]
        );
        assert!(closed(&acts, s.fc).is_some_and(|e| e.message.contains("torn down")));
        assert!(h.m.frameworks().is_empty());
        assert!(h.call(s.fc, SchedulerCall::Revive).is_empty());
    }

    #[test]
    fn failover_with_another_principal_is_refused() {
        let mut h = Harness::new();
        let (fc, fw) = h.subscribe("alice", SEC);
        let c = h.conn();
        let acts = h.call_as(c, "mallory", SchedulerCall::Subscribe(info(Some(&fw), SEC)));
        assert_eq!(closed(&acts, c).map(|e| e.code), Some(ErrorCode::Unauthorized));
        assert!(closed(&acts, fc).is_none());
        let f = &h.m.frameworks()[0];
        assert_eq!((f.status.as_str(), f.principal.as_str()), ("active", "alice"));
    }

    #[test]
    fn the_first_message_must_register_or_subscribe() {
        let mut h = Harness::new();
        let c = h.conn();
        let acts = h.agent(c, AgentMessage::Heartbeat);
        assert_eq!(closed(&acts, c).map(|e| e.code), Some(ErrorCode::Unexpected));
        let c = h.conn();
        let acts = h.call(c, SchedulerCall::Revive);
        assert_eq!(closed(&acts, c).map(|e| e.code), Some(ErrorCode::Unexpected));
        // Mixing roles on one connection is refused too.
        let (fc, _) = h.subscribe("alice", SEC);
        let acts = h.agent(fc, AgentMessage::Heartbeat);
        assert!(closed(&acts, fc).is_some());
        assert_eq!(h.m.frameworks()[0].status, "disconnected");
    }

    #[test]
    fn drf_offers_to_the_lowest_dominant_share() {
        let mut h = Harness::new();
        let (f1, fw1) = h.subscribe("alice", SEC);
        let (a1c, _) = h.add_agent("cpus:4;mem:4GiB");
        let o = single_offer(&h.advance(5 * MS), f1);
        let acts = h.call(f1, accept(&o, vec![task("big", "cpus:3;mem:3GiB")], None));
        assert_eq!(run_tasks(&acts, a1c).len(), 1);
        let (f2, fw2) = h.subscribe("bob", SEC);
        h.add_agent("cpus:4;mem:4GiB");
        let acts = h.advance(5 * MS);
        // f1 holds 3/8 of the cluster, f2 nothing: f2 gets the first agent (1/8), and still
        // being lower, the second too, although f1 would win a tie by id.
        assert!(offers(&acts, f1).is_empty());
        let o2 = offers(&acts, f2);
        assert_eq!(o2.len(), 2);
        assert!(o2.iter().all(|o| o.framework_id == fw2));
        // f2 now holds 5/8 cpus; what it declines goes to f1.
        h.call(
            f2,
            SchedulerCall::Decline {
                offer_ids: o2.iter().map(|o| o.id.clone()).collect(),
                refuse_seconds: Some(60.0),
            },
        );
        let acts = h.advance(5 * MS);
        let o1 = offers(&acts, f1);
        assert_eq!(o1.len(), 2);
        assert!(o1.iter().all(|o| o.framework_id == fw1));
    }

    #[test]
    fn reconcile_explicit_and_implicit() {
        let mut h = Harness::new();
        let s = h.running_task("cpus:4", "cpus:1", SEC);
        let o = single_offer(&h.advance(5 * MS), s.fc);
        h.call(s.fc, accept(&o, vec![task("t2", "cpus:1"), task("t3", "cpus:1")], None));
        h.status(s.ac, &s.fw, &s.agent, "t3", TaskState::Finished);
        let acts = h.call(s.fc, SchedulerCall::Reconcile { task_ids: vec![] });
        let ups = updates(&acts, s.fc);
        assert_eq!(
            ups.iter().map(|u| (u.task_id.as_str(), u.state)).collect::<Vec<_>>(),
            [("t1", TaskState::Running), ("t2", TaskState::Staging)]
        );
        assert!(ups.iter().all(|u| u.uuid.is_none()));
        let ids = ["t3", "nope", "t1"].map(TaskId::new).to_vec();
        let ups = updates(&h.call(s.fc, SchedulerCall::Reconcile { task_ids: ids }), s.fc);
        assert_eq!(
            ups.iter().map(|u| (u.task_id.as_str(), u.state)).collect::<Vec<_>>(),
            [("t3", TaskState::Finished), ("nope", TaskState::Unknown), ("t1", TaskState::Running)]
        );
        assert_eq!(ups[0].exit_code, Some(0));
        assert_eq!(ups[1].reason, "reconciliation: unknown task");
    }

    #[test]
    fn kills_from_frameworks_and_operators() {
        let mut h = Harness::new();
        let s = h.running_task("cpus:4", "cpus:1", SEC);
        let acts = h.call(s.fc, SchedulerCall::Kill { task_id: TaskId::new("t1") });
        assert_eq!(
            to_agent(&acts, s.ac),
            vec![MasterToAgent::KillTask { framework_id: s.fw.clone(), task_id: TaskId::new("t1") }]
        );
        let acts = h.call(s.fc, SchedulerCall::Kill { task_id: TaskId::new("ghost") });
        let ups = updates(&acts, s.fc);
        assert_eq!((ups[0].state, ups[0].reason.as_str()), (TaskState::Lost, "unknown task"));
        assert!(h.m.kill_task(h.now, &TaskId::new("t1")).is_ok());
        assert_eq!(to_agent(&h.drain(), s.ac).len(), 1);
        assert_eq!(h.m.kill_task(h.now, &TaskId::new("ghost")).map_err(|e| e.code), Err(ErrorCode::NotFound));
        h.status(s.ac, &s.fw, &s.agent, "t1", TaskState::Killed);
        assert_eq!(h.m.kill_task(h.now, &TaskId::new("t1")).map_err(|e| e.code), Err(ErrorCode::Invalid));
        // A kill asked while the agent is away goes out when it comes back.
        let o = single_offer(&h.advance(5 * MS), s.fc);
        h.call(s.fc, accept(&o, vec![task("t2", "cpus:1")], None));
        h.m.handle(h.now, Event::AgentDisconnected { conn: s.ac });
        h.drain();
        assert!(h.m.kill_task(h.now, &TaskId::new("t2")).is_ok());
        let report =
            TaskReport { framework_id: s.fw.clone(), task: task("t2", "cpus:1"), state: TaskState::Running };
        let (ac2, _, acts) = h.register(Some(s.agent.clone()), "cpus:4", vec![report]);
        assert!(to_agent(&acts, ac2)
            .contains(&MasterToAgent::KillTask { framework_id: s.fw.clone(), task_id: TaskId::new("t2") }));
    }

    #[test]
    fn output_is_located_for_allowed_readers_only() {
        let mut h = Harness::new();
        let s = h.running_task("cpus:4", "cpus:1", SEC);
        let (other, _) = h.subscribe("bob", SEC);
        let t1 = TaskId::new("t1");
        let loc = h.m.locate_output(&Requester::Operator, &t1).expect("operator may read");
        assert_eq!(
            loc,
            OutputLocation { agent_conn: s.ac, agent_id: s.agent.clone(), framework_id: s.fw.clone() }
        );
        assert_eq!(h.m.locate_output(&Requester::Framework(s.fc), &t1), Ok(loc));
        assert_eq!(
            h.m.locate_output(&Requester::Framework(other), &t1).map_err(|e| e.code),
            Err(ErrorCode::Unauthorized)
        );
        assert_eq!(
            h.m.locate_output(&Requester::Framework(999), &t1).map_err(|e| e.code),
            Err(ErrorCode::Unauthorized)
        );
        assert_eq!(
            h.m.locate_output(&Requester::Operator, &TaskId::new("x")).map_err(|e| e.code),
            Err(ErrorCode::NotFound)
        );
        h.m.handle(h.now, Event::AgentDisconnected { conn: s.ac });
        let err = h.m.locate_output(&Requester::Operator, &t1).expect_err("agent away");
        assert!(err.message.contains("not connected"), "{}", err.message);
    }

    #[test]
    fn frameworks_get_heartbeats() {
        let mut h = Harness::new();
        let (fc, _) = h.subscribe("alice", SEC);
        let acts = h.advance(15 * SEC);
        assert_eq!(
            acts.iter()
                .filter(|a| **a == Action::ToFramework { conn: fc, event: SchedulerEvent::Heartbeat })
                .count(),
            1
        );
        assert!(h.call(fc, SchedulerCall::Heartbeat).is_empty());
    }

    #[test]
    fn hostile_input_does_not_panic() {
        let mut h = Harness::new();
        let (fc, fw) = h.subscribe("alice", Duration::MAX);
        let (ac, agent) = h.add_agent("cpus:4;ports:[1-10]");
        let o = single_offer(&h.advance(5 * MS), fc);
        for refuse in [f64::NAN, f64::INFINITY, -1.0, 1e300, f64::MIN_POSITIVE] {
            h.call(
                fc,
                SchedulerCall::Decline {
                    offer_ids: vec![OfferId::new("nope")],
                    refuse_seconds: Some(refuse),
                },
            );
        }
        h.call(fc, accept(&o, vec![task("p", "cpus:1;ports:[5-20]")], Some(f64::INFINITY)));
        h.call(
            fc,
            SchedulerCall::Acknowledge {
                agent_id: AgentId::new("zz"),
                task_id: TaskId::new("zz"),
                uuid: Uuid::nil(),
            },
        );
        h.status(ac, &fw, &agent, "unknown", TaskState::Running);
        h.status(ac, &FrameworkId::new("other"), &agent, "unknown", TaskState::Running);
        h.agent(
            ac,
            AgentMessage::Register {
                agent_id: None,
                hostname: String::new(),
                resources: Resources::default(),
                attributes: Attributes::default(),
                tasks: vec![],
            },
        );
        h.m.handle(h.now, Event::FrameworkDisconnected { conn: fc });
        h.m.handle(h.now, Event::FrameworkDisconnected { conn: 12345 });
        h.m.handle(h.now, Event::AgentDisconnected { conn: 12345 });
        h.advance(100 * SEC);
        assert_eq!(h.m.frameworks().len(), 1, "a huge failover timeout never expires");
        assert_eq!(refuse_duration(Some(f64::NAN), SEC), Duration::ZERO);
        assert_eq!(refuse_duration(Some(1e300), SEC), MAX_REFUSE);
        assert_eq!(refuse_duration(None, Duration::MAX), MAX_REFUSE);
        assert_eq!(refuse_duration(Some(1.5), SEC), Duration::from_millis(1500));
    }

    #[test]
    fn completed_tasks_are_bounded() {
        let mut h = Harness::new();
        let (fc, fw) = h.subscribe("alice", SEC);
        let (ac, agent) = h.add_agent("cpus:1");
        for i in 0..(COMPLETED_TASKS + 5) {
            let o = single_offer(&h.advance(5 * MS), fc);
            let id = format!("t{i}");
            h.call(fc, accept(&o, vec![task(&id, "cpus:1")], None));
            let (uuid, _) = h.status(ac, &fw, &agent, &id, TaskState::Finished);
            h.call(
                fc,
                SchedulerCall::Acknowledge { agent_id: agent.clone(), task_id: TaskId::new(id), uuid },
            );
        }
        let tasks = h.m.tasks();
        assert_eq!(tasks.len(), COMPLETED_TASKS);
        assert!(tasks.iter().all(|t| t.id.as_str() != "t0"));
        assert_eq!(h.m.agents()[0].tasks, 0);
    }

    #[test]
    fn offer_ids_are_read_back_strictly() {
        let m =
            Master::new(MasterConfig { master_id: "m-1".into(), ..MasterConfig::default() }, Instant::now());
        let mut text = String::new();
        for n in [1u64, 9, 10, 123_456_789, u64::MAX] {
            offer_id_text(&mut text, "m-1", n);
            assert_eq!(text, format!("m-1-O{n}"));
            assert_eq!(m.offer_no(&OfferId::new(text.as_str())), Some(n));
        }
        for bad in ["m-1-O", "m-1-O01", "m-1-O+1", "m-1-O1x", "m-2-O1", "m-1-o1", "m-1-O18446744073709551616"]
        {
            assert_eq!(m.offer_no(&OfferId::new(bad)), None, "{bad}");
        }
        let ids = m.offer_ids(&[10, 9, 100]);
        assert_eq!(ids, vec![OfferId::new("m-1-O10"), OfferId::new("m-1-O100"), OfferId::new("m-1-O9")]);
    }

    // -----------------------------------------------------------------------------------------
    // Frameworks' own executors

    fn executor_info(id: &str, r: &str) -> ExecutorInfo {
        ExecutorInfo {
            executor_id: ExecutorId::new(id),
            name: format!("executor {id}"),
            command: CommandInfo { argv: vec!["./exec".into()], shell: false, env: vec![] },
            resources: res(r),
            fetch: vec![FetchInfo {
                artifact: ArtifactRef { digest: Digest::of(b"#!/bin/sh\n"), size: 10 },
                path: "exec".into(),
                executable: true,
            }],
        }
    }

    fn exec_task(id: &str, r: &str, executor: &ExecutorInfo) -> TaskInfo {
        TaskInfo {
            kind: TaskKind::Executor(Box::new(ExecutorTask {
                executor: executor.clone(),
                data: b"job".to_vec(),
            })),
            ..task(id, r)
        }
    }

    impl Harness {
        /// A harness whose artifact store holds the executors' binary.
        fn with_executor_binary() -> Self {
            let mut h = Harness::new();
            h.m.artifact_stored(Digest::of(b"#!/bin/sh\n"));
            h
        }

        fn finish(&mut self, s: &Setup, tid: &str) {
            let (uuid, _) = self.status(s.ac, &s.fw, &s.agent, tid, TaskState::Finished);
            self.call(
                s.fc,
                SchedulerCall::Acknowledge { agent_id: s.agent.clone(), task_id: TaskId::new(tid), uuid },
            );
        }

        /// Subscribes a framework and registers an agent; returns them and the first offer.
        fn offered(&mut self, agent_res: &str) -> (Setup, Offer) {
            let (fc, fw) = self.subscribe("alice", SEC);
            let (ac, agent) = self.add_agent(agent_res);
            let offer = single_offer(&self.advance(5 * MS), fc);
            (Setup { fc, fw, ac, agent }, offer)
        }
    }

    fn errors(acts: &[Action], conn: ConnId) -> Vec<WireError> {
        acts.iter()
            .filter_map(|a| match a {
                Action::ToFramework { conn: c, event: SchedulerEvent::Error(e) } if *c == conn => {
                    Some(e.clone())
                }
                _ => None,
            })
            .collect()
    }

    fn events(acts: &[Action], conn: ConnId) -> Vec<SchedulerEvent> {
        acts.iter()
            .filter_map(|a| match a {
                Action::ToFramework { conn: c, event } if *c == conn => Some(event.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn executor_resources_are_taken_once_per_agent_and_freed_when_it_exits() {
        let mut h = Harness::with_executor_binary();
        let (s, offer) = h.offered("cpus:4;mem:4GiB");
        let e = executor_info("e1", "cpus:0.5;mem:512MiB");
        let acts = h.call(
            s.fc,
            accept(
                &offer,
                vec![exec_task("t1", "cpus:1;mem:1GiB", &e), exec_task("t2", "cpus:1;mem:1GiB", &e)],
                None,
            ),
        );
        assert!(updates(&acts, s.fc).is_empty(), "{acts:#?}");
        let launched = run_tasks(&acts, s.ac);
        assert_eq!(launched.iter().map(|t| t.task_id.as_str()).collect::<Vec<_>>(), ["t1", "t2"]);
        assert_eq!(h.m.executors.len(), 1);
        assert_eq!(h.m.agents()[0].used, res("cpus:2.5;mem:2.5GiB"));
        assert_eq!(h.m.frameworks()[0].used, res("cpus:2.5;mem:2.5GiB"));
        let views = h.m.tasks();
        assert!(views.iter().all(|t| t.executor_id == ExecutorId::new("e1")));
        // The leftover is what neither the tasks nor the executor hold.
        let leftover = single_offer(&h.advance(5 * MS), s.fc);
        assert_eq!(leftover.resources, res("cpus:1.5;mem:1.5GiB"));

        // Tasks end: the executor keeps its share.
        h.finish(&s, "t1");
        h.finish(&s, "t2");
        assert_eq!(h.m.agents()[0].used, res("cpus:0.5;mem:512MiB"));
        assert_eq!(h.m.frameworks()[0].used, res("cpus:0.5;mem:512MiB"));
        // A later task for the running executor takes only its own resources.
        let acts = h.call(s.fc, accept(&leftover, vec![exec_task("t3", "cpus:1;mem:1GiB", &e)], None));
        assert_eq!(run_tasks(&acts, s.ac).len(), 1);
        assert_eq!(h.m.agents()[0].used, res("cpus:1.5;mem:1.5GiB"));

        // The executor exits: its resources come back and the framework is told.
        let acts = h.agent(
            s.ac,
            AgentMessage::ExecutorExited {
                framework_id: s.fw.clone(),
                executor_id: ExecutorId::new("e1"),
                message: "exit status 3".into(),
            },
        );
        assert_eq!(
            events(&acts, s.fc),
            vec![SchedulerEvent::ExecutorExited {
                agent_id: s.agent.clone(),
                executor_id: ExecutorId::new("e1"),
                message: "exit status 3".into(),
            }]
        );
        assert_eq!(h.m.executors.len(), 0);
        assert_eq!(h.m.agents()[0].used, res("cpus:1;mem:1GiB"));
        assert_eq!(h.m.frameworks()[0].used, res("cpus:1;mem:1GiB"));
        // Reported twice: nothing more to free (the framework still hears of it).
        h.agent(
            s.ac,
            AgentMessage::ExecutorExited {
                framework_id: s.fw.clone(),
                executor_id: ExecutorId::new("e1"),
                message: "again".into(),
            },
        );
        assert_eq!(h.m.agents()[0].used, res("cpus:1;mem:1GiB"));

        // The next task naming it starts a new executor, which takes its resources again.
        let offer = single_offer(&h.advance(5 * MS), s.fc);
        assert_eq!(offer.resources, res("cpus:3;mem:3GiB"));
        let acts = h.call(s.fc, accept(&offer, vec![exec_task("t4", "cpus:1;mem:1GiB", &e)], None));
        assert_eq!(run_tasks(&acts, s.ac).len(), 1);
        assert_eq!(h.m.agents()[0].used, res("cpus:2.5;mem:2.5GiB"));
        assert_eq!(h.m.executors.len(), 1);
    }

    #[test]
    fn a_task_whose_new_executor_does_not_fit_gets_task_error() {
        let mut h = Harness::with_executor_binary();
        let (s, offer) = h.offered("cpus:2;mem:2GiB");
        let e = executor_info("e1", "cpus:1;mem:32MiB");
        let acts = h.call(s.fc, accept(&offer, vec![exec_task("t1", "cpus:1.5;mem:1GiB", &e)], None));
        assert!(run_tasks(&acts, s.ac).is_empty());
        let ups = updates(&acts, s.fc);
        assert_eq!(ups.len(), 1);
        assert_eq!(ups[0].state, TaskState::Error);
        assert_eq!(ups[0].reason, "invalid launch");
        assert_eq!(
            ups[0].message,
            "task t1 asks for cpus:1.5;mem:1GiB and its new executor e1 for cpus:1;mem:32MiB but the offer \
             has cpus:2;mem:2GiB left"
        );
        assert_eq!(h.m.executors.len(), 0);
        assert_eq!(h.m.agents()[0].used, Resources::default());
        // Everything comes back.
        let again = single_offer(&h.advance(5 * MS), s.fc);
        assert_eq!(again.resources, res("cpus:2;mem:2GiB"));
        // The same task fits with a smaller executor; the task after it no longer does.
        let small = executor_info("e1", "cpus:0.5;mem:32MiB");
        let acts = h.call(
            s.fc,
            accept(
                &again,
                vec![
                    exec_task("t1", "cpus:1.5;mem:1GiB", &small),
                    exec_task("t2", "cpus:0.1;mem:1MiB", &small),
                ],
                None,
            ),
        );
        assert_eq!(run_tasks(&acts, s.ac).len(), 1);
        let ups = updates(&acts, s.fc);
        assert_eq!(ups.len(), 1);
        assert_eq!(ups[0].task_id.as_str(), "t2");
        assert_eq!(ups[0].message, "task t2 asks for cpus:0.1;mem:1MiB but the offer has mem:992MiB left");
        assert_eq!(h.m.agents()[0].used, res("cpus:2;mem:1056MiB"));
    }

    #[test]
    fn invalid_executor_infos_get_task_error() {
        let mut h = Harness::with_executor_binary();
        let (s, offer) = h.offered("cpus:8;mem:8GiB");
        let good = executor_info("e1", "cpus:0.1;mem:32MiB");
        let with = |tid: &str, f: &dyn Fn(&mut ExecutorTask)| {
            let mut t = exec_task(tid, "cpus:0.1", &good);
            if let TaskKind::Executor(e) = &mut t.kind {
                f(e);
            }
            t
        };
        let missing = Digest::of(b"not uploaded");
        let tasks = vec![
            with("reserved", &|e| e.executor.executor_id = ExecutorId::new("agora-wasm")),
            with("slash", &|e| e.executor.executor_id = ExecutorId::new("a/b")),
            with("noargv", &|e| e.executor.command.argv.clear()),
            with("env", &|e| e.executor.command.env.push(("A=B".into(), "1".into()))),
            with("upload", &|e| e.executor.fetch[0].artifact.digest = missing.clone()),
            with("escape", &|e| e.executor.fetch[0].path = "../exec".into()),
            with("data", &|e| e.data = vec![0; MAX_TASK_DATA + 1]),
            with("nores", &|e| e.executor.resources = Resources::default()),
            with("ok", &|_| {}),
        ];
        let acts = h.call(s.fc, accept(&offer, tasks, None));
        assert_eq!(run_tasks(&acts, s.ac).iter().map(|t| t.task_id.as_str()).collect::<Vec<_>>(), ["ok"]);
        let ups = updates(&acts, s.fc);
        assert!(ups.iter().all(|u| u.state == TaskState::Error && u.reason == "invalid launch"));
        let messages: Vec<&str> = ups.iter().map(|u| u.message.as_str()).collect();
        assert_eq!(
            messages,
            vec![
                "task reserved: executor id `agora-wasm` is reserved (ids starting `agora-` name built-in \
                 executors)"
                    .to_string(),
                "task slash: executor id \"a/b\" may contain only letters, digits, `.`, `_` and `-`"
                    .to_string(),
                "task noargv: executor e1 has an empty command".to_string(),
                "task env: executor e1: environment variable name \"A=B\" is empty or contains `=` or NUL"
                    .to_string(),
                format!(
                    "task upload: executor e1: artifact {missing} for `exec` is not in the master's artifact \
                     store; upload it first"
                ),
                "task escape: executor e1: fetch path \"../exec\" has a `..` component".to_string(),
                format!(
                    "task data carries {} bytes of data, over the limit of {MAX_TASK_DATA}",
                    MAX_TASK_DATA + 1
                ),
                "task nores: executor e1 asks for no cpus and no mem".to_string(),
            ]
        );
        assert_eq!(h.m.executors.len(), 1);
        assert_eq!(h.m.agents()[0].used, res("cpus:0.2;mem:32MiB"));
    }

    #[test]
    fn a_different_executor_info_for_the_same_id_is_refused() {
        let mut h = Harness::with_executor_binary();
        let (s, offer) = h.offered("cpus:8;mem:8GiB");
        let a = executor_info("e1", "cpus:0.1;mem:32MiB");
        let b = executor_info("e1", "cpus:0.2;mem:32MiB");
        let mismatch = |tid: &str| {
            format!(
                "task {tid}: executor e1 on agent {} is already running with a different ExecutorInfo",
                s.agent
            )
        };
        // Within one call: the first one wins.
        let acts = h.call(
            s.fc,
            accept(&offer, vec![exec_task("t1", "cpus:1", &a), exec_task("t2", "cpus:1", &b)], None),
        );
        assert_eq!(run_tasks(&acts, s.ac).len(), 1);
        let ups = updates(&acts, s.fc);
        assert_eq!(ups.len(), 1);
        assert_eq!((ups[0].task_id.as_str(), ups[0].state), ("t2", TaskState::Error));
        assert_eq!(ups[0].message, mismatch("t2"));
        // In a later call: compared with the executor running there.
        let offer = single_offer(&h.advance(5 * MS), s.fc);
        let mut renamed = a.clone();
        renamed.name = "other name".into();
        let acts = h.call(s.fc, accept(&offer, vec![exec_task("t3", "cpus:1", &renamed)], None));
        assert!(run_tasks(&acts, s.ac).is_empty());
        assert_eq!(updates(&acts, s.fc)[0].message, mismatch("t3"));
        assert_eq!(h.m.executors.len(), 1);
        assert_eq!(h.m.agents()[0].used, res("cpus:1.1;mem:32MiB"));
        // Another framework's executor of the same id is its own: no mismatch, its own resources.
        let (f2, fw2) = h.subscribe("bob", SEC);
        let offer2 = single_offer(&h.advance(5 * MS), f2);
        let acts = h.call(f2, accept(&offer2, vec![exec_task("t1", "cpus:1", &b)], None));
        assert_eq!(run_tasks(&acts, s.ac).len(), 1);
        assert!(updates(&acts, f2).is_empty());
        assert_eq!(h.m.executors.len(), 2);
        assert_eq!(h.m.agents()[0].used, res("cpus:2.3;mem:64MiB"));
        let used: Vec<(FrameworkId, Resources)> =
            h.m.frameworks().into_iter().map(|f| (f.id, f.used)).collect();
        assert_eq!(used, vec![(s.fw.clone(), res("cpus:1.1;mem:32MiB")), (fw2, res("cpus:1.2;mem:32MiB"))]);
    }

    #[test]
    fn framework_messages_are_relayed_both_ways() {
        let mut h = Harness::with_executor_binary();
        let s = h.running_task("cpus:4;mem:4GiB", "cpus:1", SEC);
        let e1 = ExecutorId::new("e1");
        // Scheduler → executor: to the agent, under the caller's framework id.
        let acts = h.call(
            s.fc,
            SchedulerCall::Message {
                agent_id: s.agent.clone(),
                executor_id: e1.clone(),
                data: b"hi".to_vec(),
            },
        );
        assert_eq!(
            acts,
            vec![Action::ToAgent {
                conn: s.ac,
                msg: MasterToAgent::FrameworkMessage {
                    framework_id: s.fw.clone(),
                    executor_id: e1.clone(),
                    data: b"hi".to_vec()
                },
            }]
        );
        // The largest message passes; one byte more is refused.
        let acts = h.call(
            s.fc,
            SchedulerCall::Message {
                agent_id: s.agent.clone(),
                executor_id: e1.clone(),
                data: vec![7; MAX_FRAMEWORK_MESSAGE],
            },
        );
        assert_eq!(to_agent(&acts, s.ac).len(), 1);
        let acts = h.call(
            s.fc,
            SchedulerCall::Message {
                agent_id: s.agent.clone(),
                executor_id: e1.clone(),
                data: vec![7; MAX_FRAMEWORK_MESSAGE + 1],
            },
        );
        assert_eq!(
            errors(&acts, s.fc),
            vec![WireError::new(
                ErrorCode::TooLarge,
                format!(
                    "framework message of {} bytes to executor e1 is over the limit of {MAX_FRAMEWORK_MESSAGE} bytes",
                    MAX_FRAMEWORK_MESSAGE + 1
                )
            )]
        );
        assert!(to_agent(&acts, s.ac).is_empty());
        assert!(closed(&acts, s.fc).is_none());
        // An unknown agent.
        let acts = h.call(
            s.fc,
            SchedulerCall::Message { agent_id: AgentId::new("nope"), executor_id: e1.clone(), data: vec![] },
        );
        assert_eq!(errors(&acts, s.fc), vec![WireError::new(ErrorCode::NotFound, "no agent nope")]);

        // Executor → scheduler.
        let from_agent = |fw: &FrameworkId, data: Vec<u8>| AgentMessage::FrameworkMessage {
            framework_id: fw.clone(),
            executor_id: ExecutorId::new("e1"),
            data,
        };
        let acts = h.agent(s.ac, from_agent(&s.fw, b"result".to_vec()));
        assert_eq!(
            acts,
            vec![Action::ToFramework {
                conn: s.fc,
                event: SchedulerEvent::Message {
                    agent_id: s.agent.clone(),
                    executor_id: e1.clone(),
                    data: b"result".to_vec()
                },
            }]
        );
        // Too large, or for a framework that is unknown or away: dropped, never kept.
        assert!(h.agent(s.ac, from_agent(&s.fw, vec![0; MAX_FRAMEWORK_MESSAGE + 1])).is_empty());
        assert!(h.agent(s.ac, from_agent(&FrameworkId::new("m-F99"), b"x".to_vec())).is_empty());
        h.m.handle(h.now, Event::FrameworkDisconnected { conn: s.fc });
        h.drain();
        assert!(h.agent(s.ac, from_agent(&s.fw, b"lost".to_vec())).is_empty());
        let fc = h.conn();
        let acts = h.call(fc, SchedulerCall::Subscribe(info(Some(&s.fw), SEC)));
        assert!(!events(&acts, fc).iter().any(|e| matches!(e, SchedulerEvent::Message { .. })));

        // An agent that is not connected.
        h.m.handle(h.now, Event::AgentDisconnected { conn: s.ac });
        h.drain();
        let acts = h.call(
            fc,
            SchedulerCall::Message { agent_id: s.agent.clone(), executor_id: e1.clone(), data: vec![] },
        );
        assert_eq!(
            errors(&acts, fc),
            vec![WireError::new(ErrorCode::NotFound, format!("agent {} is disconnected", s.agent))]
        );
    }

    #[test]
    fn shutdown_executor_is_relayed_and_resources_wait_for_the_exit() {
        let mut h = Harness::with_executor_binary();
        let (s, offer) = h.offered("cpus:4;mem:4GiB");
        let e = executor_info("e1", "cpus:0.5;mem:512MiB");
        h.call(s.fc, accept(&offer, vec![exec_task("t1", "cpus:1;mem:1GiB", &e)], None));
        let acts = h.call(
            s.fc,
            SchedulerCall::ShutdownExecutor { agent_id: s.agent.clone(), executor_id: ExecutorId::new("e1") },
        );
        assert_eq!(
            acts,
            vec![Action::ToAgent {
                conn: s.ac,
                msg: MasterToAgent::ShutdownExecutor {
                    framework_id: s.fw.clone(),
                    executor_id: ExecutorId::new("e1")
                },
            }]
        );
        assert_eq!(h.m.agents()[0].used, res("cpus:1.5;mem:1.5GiB"));
        let acts = h.call(
            s.fc,
            SchedulerCall::ShutdownExecutor {
                agent_id: AgentId::new("nope"),
                executor_id: ExecutorId::new("e1"),
            },
        );
        assert_eq!(errors(&acts, s.fc), vec![WireError::new(ErrorCode::NotFound, "no agent nope")]);
        // The agent kills the task and reports the exit.
        h.status(s.ac, &s.fw, &s.agent, "t1", TaskState::Killed);
        h.agent(
            s.ac,
            AgentMessage::ExecutorExited {
                framework_id: s.fw.clone(),
                executor_id: ExecutorId::new("e1"),
                message: "shut down".into(),
            },
        );
        assert_eq!(h.m.agents()[0].used, Resources::default());
    }

    #[test]
    fn a_framework_cannot_address_another_frameworks_executors() {
        let mut h = Harness::with_executor_binary();
        let (s, offer) = h.offered("cpus:4;mem:4GiB");
        let e = executor_info("e1", "cpus:0.5;mem:512MiB");
        h.call(s.fc, accept(&offer, vec![exec_task("t1", "cpus:1;mem:1GiB", &e)], None));
        let (f2, fw2) = h.subscribe("bob", SEC);
        // Bob names Alice's agent and executor: the agent hears Bob's framework id, so his
        // message and his shutdown can only reach an executor of his own.
        let acts = h.call(
            f2,
            SchedulerCall::Message {
                agent_id: s.agent.clone(),
                executor_id: ExecutorId::new("e1"),
                data: vec![1],
            },
        );
        assert_eq!(
            to_agent(&acts, s.ac),
            vec![MasterToAgent::FrameworkMessage {
                framework_id: fw2.clone(),
                executor_id: ExecutorId::new("e1"),
                data: vec![1]
            }]
        );
        let acts = h.call(
            f2,
            SchedulerCall::ShutdownExecutor { agent_id: s.agent.clone(), executor_id: ExecutorId::new("e1") },
        );
        assert_eq!(
            to_agent(&acts, s.ac),
            vec![MasterToAgent::ShutdownExecutor {
                framework_id: fw2.clone(),
                executor_id: ExecutorId::new("e1")
            }]
        );
        // An exit reported for Bob's (non-existent) e1 frees nothing of Alice's.
        let acts = h.agent(
            s.ac,
            AgentMessage::ExecutorExited {
                framework_id: fw2.clone(),
                executor_id: ExecutorId::new("e1"),
                message: "never ran".into(),
            },
        );
        assert!(events(&acts, s.fc).is_empty());
        assert_eq!(h.m.executors.len(), 1);
        assert_eq!(h.m.agents()[0].used, res("cpus:1.5;mem:1.5GiB"));
        // Messages of Alice's executor go to Alice only.
        let acts = h.agent(
            s.ac,
            AgentMessage::FrameworkMessage {
                framework_id: s.fw.clone(),
                executor_id: ExecutorId::new("e1"),
                data: vec![2],
            },
        );
        assert_eq!(events(&acts, s.fc).len(), 1);
        assert!(events(&acts, f2).is_empty());
    }

    #[test]
    fn executor_resources_go_with_the_framework_and_the_agent() {
        // Framework removed: its executors' resources are free, and agents where it had only
        // an executor left are told to shut it down.
        let mut h = Harness::with_executor_binary();
        let (s, offer) = h.offered("cpus:4;mem:4GiB");
        let e = executor_info("e1", "cpus:0.5;mem:512MiB");
        h.call(s.fc, accept(&offer, vec![exec_task("t1", "cpus:1;mem:1GiB", &e)], None));
        h.finish(&s, "t1");
        assert_eq!(h.m.agents()[0].used, res("cpus:0.5;mem:512MiB"));
        let acts = h.call(s.fc, SchedulerCall::Teardown);
        assert_eq!(
            to_agent(&acts, s.ac),
            vec![MasterToAgent::ShutdownFramework { framework_id: s.fw.clone() }]
        );
        assert_eq!(h.m.executors.len(), 0);
        assert_eq!(h.m.agents()[0].used, Resources::default());

        // Agent lost: its executors are forgotten; back with a task of one, it is adopted
        // with its resources again.
        let mut h = Harness::with_executor_binary();
        let (s, offer) = h.offered("cpus:4;mem:4GiB");
        let t1 = exec_task("t1", "cpus:1;mem:1GiB", &e);
        h.call(s.fc, accept(&offer, vec![t1.clone()], None));
        h.status(s.ac, &s.fw, &s.agent, "t1", TaskState::Running);
        h.advance(21 * SEC);
        assert_eq!(h.m.agents()[0].status, "unreachable");
        assert_eq!(h.m.executors.len(), 0);
        assert_eq!(h.m.agents()[0].used, res("cpus:1;mem:1GiB"));
        let report = TaskReport { framework_id: s.fw.clone(), task: t1, state: TaskState::Running };
        h.register(Some(s.agent.clone()), "cpus:4;mem:4GiB", vec![report]);
        assert_eq!(h.m.executors.len(), 1);
        assert_eq!(h.m.agents()[0].used, res("cpus:1.5;mem:1.5GiB"));
        assert_eq!(h.m.frameworks()[0].used, res("cpus:1.5;mem:1.5GiB"));
        // Back again without it (restarted agent): the executor is gone with its task.
        let (_, _, acts) = h.register(Some(s.agent.clone()), "cpus:4;mem:4GiB", vec![]);
        assert_eq!(updates(&acts, s.fc)[0].state, TaskState::Lost);
        assert_eq!(h.m.executors.len(), 0);
        assert_eq!(h.m.agents()[0].used, Resources::default());
    }
}
