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
use crate::registry::{
    AgentRecord, AgentStanding, FrameworkRecord, RegistryOp, RegistryState, MAX_GONE_AGENTS,
};
use crate::state::{
    Agent, AgentStatus, Filter, Framework, FrameworkLink, OfferRecord, Offers, Peer, Table, Task, TaskTable,
};
use executors::{ExecutorRecord, Executors};

// One file a section of the state machine; each adds its methods to `impl Master` and, as a
// child module, reaches the core's private state.
mod agents;
mod allocation;
mod artifacts;
mod drain;
mod executors;
mod frameworks;
mod offers;
mod pending;
mod registry;
mod tasks;
#[cfg(test)]
mod tests;
mod views;

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
    /// Most agents one step of an allocation cycle considers (at least 1). A cycle over more
    /// agents runs in slices, one per `handle_timeout`, and `poll_timeout` makes the next
    /// slice due at once, so the driver handles the events queued meanwhile (status updates,
    /// accepts) between slices: none waits longer than one slice. Only for allocators that
    /// take slices ([`Allocator::sliced`](crate::allocator::Allocator::sliced), the built-ins
    /// do). `usize::MAX`: whole cycles.
    pub allocation_slice: usize,
    /// Told to agents; they send `Heartbeat` this often.
    pub agent_heartbeat_interval: Duration,
    /// An agent silent (no message at all) this long is marked unreachable.
    pub agent_timeout: Duration,
    /// After a restart, an agent the registry knows that has not re-registered within this
    /// time is removed (marked gone): its tasks are TASK_GONE and it is refused if it comes
    /// back (Mesos `--agent_reregister_timeout`, 10 min).
    pub agent_reregister_timeout: Duration,
    /// Sent to frameworks as `SchedulerEvent::Heartbeat` this often; frameworks send
    /// `SchedulerCall::Heartbeat` as often.
    pub framework_heartbeat_interval: Duration,
    /// A subscribed framework connection silent this long (no call, no heartbeat) is closed
    /// and handled as a disconnection (its failover timeout starts). Checked at each
    /// heartbeat, so noticed within one more interval. `None`: only the transport decides.
    pub framework_timeout: Option<Duration>,
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
    /// Longest grace between SIGTERM and SIGKILL a task may ask for; longer is cut to it
    /// (`agora master --max-kill-grace`). Agents also keep their own absolute ceiling.
    pub max_kill_grace: Duration,
    /// `--acls`: what each principal may do (`None`: everything is allowed).
    pub acls: Option<std::sync::Arc<crate::acl::Acls>>,
}

/// The default of [`MasterConfig::allocation_slice`]: at 50,000 agents × 200 frameworks a
/// slice of this many agents computes in about 2–3 ms on the 2-core VM of BENCHMARKS.md
/// ("allocation cycles sliced"), so an event never waits more than a few milliseconds behind
/// a cycle; the whole cycle costs about the same as unsliced.
pub const DEFAULT_ALLOCATION_SLICE: usize = 1_000;

/// Heartbeat intervals of silence after which `agora master` takes a framework for gone
/// (the default of [`MasterConfig::framework_timeout`]).
pub const FRAMEWORK_MISSED_HEARTBEATS: u32 = 3;

impl Default for MasterConfig {
    fn default() -> Self {
        MasterConfig {
            master_id: "master".into(),
            allocation_interval: Duration::from_secs(1),
            allocation_batch: Duration::from_millis(2),
            allocation_slice: DEFAULT_ALLOCATION_SLICE,
            agent_heartbeat_interval: Duration::from_secs(1),
            agent_timeout: Duration::from_secs(15),
            agent_reregister_timeout: Duration::from_secs(600),
            framework_heartbeat_interval: Duration::from_secs(15),
            framework_timeout: Some(Duration::from_secs(15) * FRAMEWORK_MISSED_HEARTBEATS),
            default_refuse: Duration::from_secs(5),
            offer_timeout: None,
            allocation: AllocatorOptions {
                min_allocatable: vec![Resources::cpus(10)],
                ..AllocatorOptions::default()
            },
            max_kill_grace: crate::validate::DEFAULT_MAX_KILL_GRACE,
            acls: None,
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
    /// An operator session without the right to read any task's (`--acls`): only tasks of
    /// this principal's frameworks.
    Principal(String),
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
/// How many ended frameworks `completed_frameworks()` keeps showing (Mesos
/// `completed_frameworks`).
const COMPLETED_FRAMEWORKS: usize = 100;
/// How many removed framework ids are remembered (to shut their tasks down on agents that
/// come back).
const REMOVED_FRAMEWORKS: usize = 10_000;
/// Most kills of unknown tasks remembered while agents re-register after a restart.
const MAX_PENDING_KILLS: usize = 100_000;
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
    reason: Reason,
    message: String,
    timestamp_ms: u64,
) -> TaskStatus {
    TaskStatus {
        task_id: key.task_id.clone(),
        framework_id: key.framework_id.clone(),
        agent_id,
        state,
        uuid: None,
        source: UpdateSource::Master,
        reason,
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
    /// The last [`COMPLETED_FRAMEWORKS`] frameworks removed, oldest first.
    completed_frameworks: VecDeque<FrameworkView>,
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
    /// Drain deadlines of agents (at each, the agent's remaining tasks are killed).
    drain_deadlines: BTreeSet<(Instant, AgentId)>,
    next_allocation: Instant,
    batch_allocation: Option<Instant>,
    /// The allocation cycle under way, when it runs in slices (see
    /// [`MasterConfig::allocation_slice`]).
    cycle: Option<allocation::Cycle>,
    next_heartbeat: Instant,
    next_agent: u64,
    next_framework: u64,
    next_offer: u64,
    /// `(instant, unix ms)` pair that turns instants into update timestamps.
    clock_anchor: (Instant, u64),
    actions: VecDeque<Action>,
    /// Digests in the artifact store (told by the driver); a Wasm launch must name only these.
    known_artifacts: FxHashSet<Digest>,
    /// Who uploaded each artifact first, and its size: the ACLs' upload quotas count these.
    uploads: FxHashMap<Digest, (String, u64)>,
    /// Bytes of uploads under way, by principal (reserved against its quota until stored).
    uploads_pending: FxHashMap<String, u64>,
    /// Frameworks' own executors launched on agents, with the resources they hold.
    executors: Executors,
    /// Changes for the registry, in order; the driver writes them before it carries out the
    /// actions produced in the same step.
    registry_ops: VecDeque<RegistryOp>,
    /// Agents removed for good (Unix ms of removal): refused if they come back.
    gone_agents: HashMap<AgentId, u64>,
    /// Whether this master recovered from a registry: frameworks it does not know are then
    /// known to be gone (their tasks on re-registering agents are shut down).
    recovered: bool,
    /// How many agents are recovered from the registry and have not re-registered yet.
    recovering: usize,
    /// Kills of tasks the master did not know while agents were still re-registering after a
    /// restart: sent to the agent that reports the task (bounded).
    pending_kills: HashSet<TaskKey>,
    /// When each subscribed framework connection was last heard from.
    framework_heard: FxHashMap<ConnId, Instant>,
    /// Whether the allocation policy in force was set by an operator (and is in the registry)
    /// rather than given by this master's flags.
    policy_from_registry: bool,
    /// Frameworks' stated demands, for the pending listing (see [`pending`]).
    demands: FxHashMap<FrameworkId, pending::StatedDemand>,
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
            completed_frameworks: VecDeque::new(),
            offers: Offers::default(),
            tasks: TaskTable::default(),
            completed: VecDeque::new(),
            completed_index: FxHashMap::default(),
            agent_deadlines: BTreeSet::new(),
            failover_deadlines: BTreeSet::new(),
            filter_expiries: BTreeMap::new(),
            offer_deadlines: BTreeSet::new(),
            drain_deadlines: BTreeSet::new(),
            batch_allocation: None,
            cycle: None,
            next_agent: 0,
            next_framework: 0,
            next_offer: 0,
            clock_anchor: (now, 0),
            actions: VecDeque::new(),
            known_artifacts: FxHashSet::default(),
            uploads: FxHashMap::default(),
            uploads_pending: FxHashMap::default(),
            executors: Executors::default(),
            registry_ops: VecDeque::new(),
            gone_agents: HashMap::new(),
            recovered: false,
            recovering: 0,
            pending_kills: HashSet::new(),
            framework_heard: FxHashMap::default(),
            policy_from_registry: false,
            demands: FxHashMap::default(),
        }
    }

    /// The allocation policy in force, and where it comes from: `registry` (an operator set
    /// it) or `flags`.
    pub fn policy(&self) -> (AllocationPolicy, &'static str) {
        let source = if self.policy_from_registry { "registry" } else { "flags" };
        (crate::allocator::policy_of(&self.config.allocation), source)
    }

    /// Replaces the allocation policy (an operator's `SetPolicy`): read as the flags are
    /// (the error names the entry), handed to the allocator, and recorded for the registry.
    pub fn set_policy(&mut self, policy: &AllocationPolicy) -> Result<(), WireError> {
        let options = crate::allocator::policy_options(policy, &self.config.allocation)
            .map_err(|e| WireError::new(ErrorCode::Invalid, e.to_string()))?;
        self.allocator
            .set_options(&options)
            .map_err(|e| WireError::new(ErrorCode::Invalid, e.to_string()))?;
        info!(weights = %policy.weights, priorities = %policy.priorities, quotas = ?policy.quotas,
            quota_limits = ?policy.quota_limits, "allocation policy set");
        self.persist(RegistryOp::PutPolicy(crate::allocator::policy_of(&options)));
        self.config.allocation = options;
        self.policy_from_registry = true;
        Ok(())
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
            Event::Framework { conn, principal, call } => {
                self.on_framework_call(now, conn, principal, call);
                if matches!(self.conns.get(&conn), Some(Peer::Framework(_))) {
                    self.framework_heard.insert(conn, now);
                }
            }
            Event::FrameworkDisconnected { conn } => {
                self.closing.remove(&conn);
                self.framework_heard.remove(&conn);
                if let Some(Peer::Framework(id)) = self.conns.get(&conn).cloned() {
                    self.conns.remove(&conn);
                    self.framework_disconnected(now, &id);
                }
            }
        }
    }

    /// The earliest time `handle_timeout` must be called: at once (the instant of the last
    /// slice) while an allocation cycle is under way.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t = self.next_allocation.min(self.next_heartbeat);
        let candidates = [
            self.cycle.as_ref().map(allocation::Cycle::due),
            self.batch_allocation,
            self.agent_deadlines.first().map(|(t, _)| *t),
            self.failover_deadlines.first().map(|(t, _)| *t),
            self.filter_expiries.first_key_value().map(|(t, _)| *t),
            self.offer_deadlines.first().map(|(t, _)| *t),
            self.drain_deadlines.first().map(|(t, _)| *t),
        ];
        for c in candidates.into_iter().flatten() {
            t = t.min(c);
        }
        Some(t)
    }

    /// Whether an allocation cycle is under way (more slices to run: `handle_timeout` is due).
    pub fn allocation_in_progress(&self) -> bool {
        self.cycle.is_some()
    }

    /// Whether `handle_timeout(now)` would run an allocation slice (the heavy part of timers).
    pub fn allocation_due(&self, now: Instant) -> bool {
        self.cycle.is_some() || self.batch_allocation.is_some_and(|t| t <= now) || self.next_allocation <= now
    }

    /// Runs everything due at `now`: agent timeouts, framework failover expiries, filter
    /// expiries, drain deadlines, allocation (one slice of a cycle at most) and framework
    /// heartbeats.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.drain_deadlines_due(now);
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
        // A cycle under way runs its next slice; a new one starts only when it is over (an
        // allocation asked for meanwhile waits for that, and takes the agents' state then).
        if self.cycle.is_none()
            && (self.batch_allocation.is_some_and(|t| t <= now) || self.next_allocation <= now)
        {
            self.batch_allocation = None;
            self.start_cycle(now);
            self.next_allocation = after(now, self.config.allocation_interval);
        }
        if self.cycle.is_some() {
            self.allocate_slice(now);
        }
        if self.next_heartbeat <= now {
            self.close_silent_frameworks(now);
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
        self.framework_heard.remove(&conn);
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

    /// Closes every framework connection silent for longer than `framework_timeout`, as if
    /// it had dropped: a peer that stopped talking (hung, or cut off by the network) would
    /// otherwise hold its offers until the transport gives up.
    fn close_silent_frameworks(&mut self, now: Instant) {
        let Some(limit) = self.config.framework_timeout else { return };
        let mut silent: Vec<ConnId> = self
            .framework_heard
            .iter()
            .filter(|(_, heard)| now.saturating_duration_since(**heard) >= limit)
            .map(|(conn, _)| *conn)
            .collect();
        silent.sort_unstable();
        for conn in silent {
            self.framework_heard.remove(&conn);
            if let Some(Peer::Framework(id)) = self.conns.get(&conn) {
                warn!(framework_id = %id, conn, ?limit, "framework silent: handling it as disconnected");
                self.close_peer(
                    now,
                    conn,
                    ErrorCode::Unexpected,
                    format!("no call or heartbeat from the framework for {}s", limit.as_secs_f64()),
                );
            }
        }
    }

    fn request_allocation(&mut self, now: Instant) {
        let at = after(now, self.config.allocation_batch);
        self.batch_allocation = Some(self.batch_allocation.map_or(at, |t| t.min(at)));
    }
}
