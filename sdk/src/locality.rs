//! Data locality by delay scheduling (Zaharia et al., "Delay Scheduling: A Simple Technique
//! for Achieving Locality and Fairness in Cluster Scheduling", EuroSys 2010).
//!
//! The master knows nothing about a framework's data. A framework gets locality by declining
//! offers that do not suit it — for a bounded time. [`DelayScheduler`] is that policy as a pure
//! state machine: time is passed in, offers go in, a [`Decision`] (launches and declines) comes
//! out. It does no IO and does not know the [`Driver`], so a simulation on the sans-IO master
//! and a real framework run the same code; [`DelayScheduler::resource_offers`] and
//! [`DelayScheduler::submit`] are the thin adapter for the [`Driver`].
//!
//! Each pending task names what it prefers ([`Preference`]): agents by id, or an attribute
//! match ("the agent's `blocks` set holds `b17`"), and racks. Against an offer a task is
//! *node-local* (the agent matches), *rack-local* (the agent's rack attribute names a preferred
//! rack, or the rack of an agent seen earlier that matches) or neither (*any*).
//!
//! ## The algorithm (the paper's Algorithm 2)
//!
//! The paper keeps, per job, a locality `level` (0 node, 1 rack, 2 any) and a `wait`: the time
//! the job has spent being skipped since it last launched a task. A task belongs to a job
//! ([`PendingTask::job`], default 0); a framework that puts all its tasks in one job gets one
//! level and one wait for the whole framework. Jobs are served in the order of their first
//! task (FIFO), a job's tasks in the order they were added. For every batch of offers, at time
//! `now`, each job in turn, on what earlier jobs left of the offers:
//!
//! 1. launches its node-local tasks on every offer (as many as fit), whatever its level. A
//!    launch sets its level to *node* and its wait to zero;
//! 2. if its level allows it — the level is already *rack* or *any*, or the job has waited
//!    `node_delay` — launches rack-local tasks; that sets the level to *rack*, the wait to zero;
//! 3. if its level allows it — *any*, or *rack* and a wait of `rack_delay`, or *node* and a
//!    wait of `node_delay + rack_delay` — launches any task; that sets the level to *any*;
//! 4. if it launched nothing although one of its tasks fitted what was left, it was *skipped*:
//!    its wait starts now (if it had not started already).
//!
//! Then tasks without any preference are launched on what is left, at no level. Offers with
//! no launch are declined with a short filter ([`DelayConfig::refuse`]) so that the master
//! offers them to other frameworks; the unused rest of an accepted offer is filtered as long.
//!
//! A skipped job leaves the offer to the jobs behind it (and, once declined, to other
//! frameworks): that is what delay scheduling buys. Because a launch zeroes the wait, a job
//! that just launched a node-local task must wait again before it takes a worse one, as in the
//! paper's per-heartbeat loop. With both delays zero every level is allowed at once: the head
//! job takes what is offered (its node-local tasks first), which is greedy FIFO. A job whose
//! last task is launched is forgotten (a new job starts at node level). With nothing pending,
//! every offer is declined with the long [`DelayConfig::idle_refuse`] filter, and the next
//! [`add`](DelayScheduler::add) asks for a revive ([`take_revive`](DelayScheduler::take_revive)).
//!
//! ```
//! use std::time::{Duration, Instant};
//! use agora_sdk::locality::{DelayConfig, DelayScheduler, PendingTask, Preference};
//! use agora_sdk::{Resources, TaskId};
//!
//! let mut sched = DelayScheduler::new(DelayConfig::new(Duration::from_secs(1), Duration::from_secs(2)));
//! let now = Instant::now();
//! sched.add(now, PendingTask::new(
//!     TaskId::new("map-17"),
//!     Resources::cpus(1000),
//!     Preference::default().attribute("blocks", "b17").rack("r1"),
//!     "payload for block 17",
//! ));
//! // Later, in `resource_offers`: let decision = sched.on_offers(Instant::now(), &offers);
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::time::{Duration, Instant};

use crate::attributes::{AttrValue, Attributes};
use crate::proto::{AgentId, Offer, OfferId, TaskId, TaskInfo};
use crate::resources::{format_milli, parse_milli, Resources};
use crate::scheduler::Driver;

/// How close a launched task is to its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Locality {
    /// On an agent the task prefers.
    Node,
    /// On another agent of a preferred rack.
    Rack,
    /// Anywhere else (also: tasks that prefer nothing).
    Any,
}

impl Locality {
    pub fn as_str(self) -> &'static str {
        match self {
            Locality::Node => "node",
            Locality::Rack => "rack",
            Locality::Any => "any",
        }
    }
}

impl fmt::Display for Locality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a task would like to run. An agent is *preferred* when its id is in `agents` or one
/// of `attributes` matches it; a rack is preferred when it is in `racks` or holds a preferred
/// agent the scheduler has seen in an offer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Preference {
    pub agents: Vec<AgentId>,
    /// `(name, value)`: the agent's attribute `name` is a set holding `value`, a text equal to
    /// it, a scalar equal to it, or ranges containing it (e.g. `("blocks", "b17")`).
    pub attributes: Vec<(String, String)>,
    /// Values of the rack attribute ([`DelayConfig::rack_attribute`]).
    pub racks: Vec<String>,
}

impl Preference {
    /// Prefers this agent too.
    pub fn agent(mut self, agent: impl Into<AgentId>) -> Self {
        self.agents.push(agent.into());
        self
    }

    /// Prefers agents whose attribute `name` holds `value` too.
    pub fn attribute(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.push((name.into(), value.into()));
        self
    }

    /// Prefers this rack too.
    pub fn rack(mut self, rack: impl Into<String>) -> Self {
        self.racks.push(rack.into());
        self
    }

    /// No preference at all: the task runs anywhere, at once.
    pub fn is_empty(&self) -> bool {
        self.agents.is_empty() && self.attributes.is_empty() && self.racks.is_empty()
    }

    /// Whether an agent with this id and these attributes is preferred.
    pub fn matches(&self, agent: &AgentId, attributes: &Attributes) -> bool {
        self.agents.contains(agent)
            || self
                .attributes
                .iter()
                .any(|(name, value)| attributes.get(name).is_some_and(|a| holds(a, value)))
    }
}

/// Whether an attribute value holds `value` (set member, equal text or scalar, within ranges).
fn holds(attr: &AttrValue, value: &str) -> bool {
    match attr {
        AttrValue::Set(s) => s.contains(value),
        AttrValue::Text(t) => t == value,
        AttrValue::Scalar(v) => parse_milli(value) == Some(*v),
        AttrValue::Ranges(r) => value.parse::<u64>().is_ok_and(|x| r.iter().any(|(b, e)| *b <= x && x <= *e)),
    }
}

/// The text of a rack attribute (text or scalar).
fn rack_of(attributes: &Attributes, name: &str) -> Option<String> {
    match attributes.get(name)? {
        AttrValue::Text(t) => Some(t.clone()),
        AttrValue::Scalar(v) => Some(format_milli(*v)),
        _ => None,
    }
}

/// A task waiting for an offer: what it needs, what it prefers, the job it belongs to, and the
/// caller's `task` (a [`TaskInfo`] for a real framework, anything for a simulation).
#[derive(Clone, Debug, PartialEq)]
pub struct PendingTask<T> {
    pub id: TaskId,
    pub resources: Resources,
    pub preference: Preference,
    /// The job (delay-scheduling level and wait are kept per job); 0 unless set.
    pub job: u64,
    pub task: T,
}

impl<T> PendingTask<T> {
    /// A task of job 0.
    pub fn new(id: TaskId, resources: Resources, preference: Preference, task: T) -> Self {
        PendingTask { id, resources, preference, job: 0, task }
    }

    /// The same task in job `job`.
    pub fn in_job(mut self, job: u64) -> Self {
        self.job = job;
        self
    }
}

impl PendingTask<TaskInfo> {
    /// A pending [`TaskInfo`] of job 0 (its id and resources are the task's own).
    pub fn from_info(info: TaskInfo, preference: Preference) -> Self {
        PendingTask::new(info.task_id.clone(), info.resources.clone(), preference, info)
    }
}

/// The two delays and the filters.
#[derive(Clone, Debug, PartialEq)]
pub struct DelayConfig {
    /// How long the framework waits for a node-local offer before it takes rack-local ones
    /// (the paper's W1).
    pub node_delay: Duration,
    /// How much longer it waits for a rack-local offer before it takes any (W2).
    pub rack_delay: Duration,
    /// The agent attribute naming its rack (default `rack`).
    pub rack_attribute: String,
    /// Filter on offers passed on while tasks are pending, and on the unused rest of accepted
    /// offers (default 1 s): short, so the agent comes back soon, but long enough that the
    /// master offers it to others first.
    pub refuse: Duration,
    /// Filter on offers declined with nothing pending (default 30 s; adding a task then asks
    /// for a revive).
    pub idle_refuse: Duration,
}

impl DelayConfig {
    pub fn new(node_delay: Duration, rack_delay: Duration) -> Self {
        DelayConfig {
            node_delay,
            rack_delay,
            rack_attribute: "rack".into(),
            refuse: Duration::from_secs(1),
            idle_refuse: Duration::from_secs(30),
        }
    }

    /// No waiting: every offer that fits a task is used (node-local tasks still go first).
    pub fn greedy() -> Self {
        Self::new(Duration::ZERO, Duration::ZERO)
    }
}

impl Default for DelayConfig {
    /// 1 s at node level, 2 s more at rack level.
    fn default() -> Self {
        Self::new(Duration::from_secs(1), Duration::from_secs(2))
    }
}

/// A task placed on an offer.
#[derive(Clone, Debug, PartialEq)]
pub struct Placed<T> {
    pub id: TaskId,
    pub task: T,
    pub locality: Locality,
    /// From [`DelayScheduler::add`] to this launch.
    pub waited: Duration,
}

/// Tasks to launch on one offer.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch<T> {
    pub offer_id: OfferId,
    pub agent_id: AgentId,
    pub tasks: Vec<Placed<T>>,
}

/// What to do with a batch of offers: accept some with tasks (filtering their unused rest for
/// `refuse_seconds`), decline the others (filtered as long).
#[derive(Clone, Debug, PartialEq)]
pub struct Decision<T> {
    pub launches: Vec<Launch<T>>,
    pub declines: Vec<OfferId>,
    pub refuse_seconds: f64,
}

impl<T> Decision<T> {
    /// How many tasks are launched.
    pub fn task_count(&self) -> usize {
        self.launches.iter().map(|l| l.tasks.len()).sum()
    }
}

/// Launch counts by locality and the time tasks waited.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalityStats {
    pub node: u64,
    pub rack: u64,
    pub any: u64,
    /// Sum over launched tasks of the time from `add` to launch.
    pub total_wait: Duration,
    pub max_wait: Duration,
}

impl LocalityStats {
    pub fn launched(&self) -> u64 {
        self.node + self.rack + self.any
    }

    /// The share of launched tasks at this locality (0 when none was launched).
    pub fn fraction(&self, locality: Locality) -> f64 {
        let n = match locality {
            Locality::Node => self.node,
            Locality::Rack => self.rack,
            Locality::Any => self.any,
        };
        match self.launched() {
            0 => 0.0,
            total => n as f64 / total as f64,
        }
    }

    /// Mean time from `add` to launch.
    pub fn mean_wait(&self) -> Duration {
        match u32::try_from(self.launched()) {
            Ok(0) => Duration::ZERO,
            Ok(n) => self.total_wait / n,
            Err(_) => self.total_wait.div_f64(self.launched() as f64),
        }
    }

    fn record(&mut self, locality: Locality, waited: Duration) {
        match locality {
            Locality::Node => self.node += 1,
            Locality::Rack => self.rack += 1,
            Locality::Any => self.any += 1,
        }
        self.total_wait += waited;
        self.max_wait = self.max_wait.max(waited);
    }
}

impl fmt::Display for LocalityStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} tasks: node {:.1}%, rack {:.1}%, any {:.1}%, mean wait {:.2}s, max wait {:.2}s",
            self.launched(),
            100.0 * self.fraction(Locality::Node),
            100.0 * self.fraction(Locality::Rack),
            100.0 * self.fraction(Locality::Any),
            self.mean_wait().as_secs_f64(),
            self.max_wait.as_secs_f64()
        )
    }
}

struct Entry<T> {
    task: PendingTask<T>,
    added: Instant,
    /// Preferred racks: the task's own and those of matching agents seen in offers.
    racks: BTreeSet<String>,
}

impl<T> Entry<T> {
    /// No preference: placed anywhere at once.
    fn free(&self) -> bool {
        self.task.preference.is_empty()
    }
}

/// The delay-scheduling state of one job.
#[derive(Debug)]
struct Job {
    /// The level of the job's last launch (the paper's `j.level`).
    level: Locality,
    /// When the job was first skipped since its last launch (the paper's `j.wait` is
    /// `now - waiting_since`).
    waiting_since: Option<Instant>,
    /// Its pending tasks (entry keys, in the order they were added).
    tasks: BTreeSet<u64>,
}

/// One offer during a decision.
struct Slot<'a> {
    offer: &'a Offer,
    rack: Option<String>,
    left: Resources,
    /// Entry keys placed on it, with their locality.
    placed: Vec<(u64, Locality)>,
}

/// The delay-scheduling state machine of one framework (see the module docs).
pub struct DelayScheduler<T> {
    config: DelayConfig,
    /// Pending tasks by arrival number.
    pending: BTreeMap<u64, Entry<T>>,
    ids: HashMap<TaskId, u64>,
    next: u64,
    /// Jobs with pending tasks, by the arrival number of their first task (FIFO).
    jobs: BTreeMap<u64, Job>,
    /// The key in `jobs` of each job id.
    job_keys: HashMap<u64, u64>,
    /// Rack of every agent seen in an offer.
    agent_racks: HashMap<AgentId, String>,
    /// Attributes of every agent seen in an offer (to learn a new one's racks).
    agent_attributes: HashMap<AgentId, Attributes>,
    /// Racks of the agents seen holding each attribute value: name → value → racks.
    value_racks: HashMap<String, HashMap<String, BTreeSet<String>>>,
    /// Offers were declined as idle: the next `add` asks for a revive.
    idle_declined: bool,
    revive: bool,
    stats: LocalityStats,
}

impl<T> fmt::Debug for DelayScheduler<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DelayScheduler")
            .field("config", &self.config)
            .field("pending", &self.pending.len())
            .field("jobs", &self.jobs.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<T> DelayScheduler<T> {
    pub fn new(config: DelayConfig) -> Self {
        DelayScheduler {
            config,
            pending: BTreeMap::new(),
            ids: HashMap::new(),
            next: 0,
            jobs: BTreeMap::new(),
            job_keys: HashMap::new(),
            agent_racks: HashMap::new(),
            agent_attributes: HashMap::new(),
            value_racks: HashMap::new(),
            idle_declined: false,
            revive: false,
            stats: LocalityStats::default(),
        }
    }

    pub fn config(&self) -> &DelayConfig {
        &self.config
    }

    /// Queues a task at `now` (its wait counts from here). Returns `false`, changing nothing,
    /// when a task with the same id is already pending.
    pub fn add(&mut self, now: Instant, task: PendingTask<T>) -> bool {
        if self.ids.contains_key(&task.id) {
            return false;
        }
        let mut racks: BTreeSet<String> = task.preference.racks.iter().cloned().collect();
        for agent in &task.preference.agents {
            racks.extend(self.agent_racks.get(agent).cloned());
        }
        for (name, value) in &task.preference.attributes {
            if let Some(r) = self.value_racks.get(name).and_then(|v| v.get(value)) {
                racks.extend(r.iter().cloned());
            }
        }
        self.next += 1;
        let key = self.next;
        let job_key = *self.job_keys.entry(task.job).or_insert(key);
        self.jobs
            .entry(job_key)
            .or_insert_with(|| Job { level: Locality::Node, waiting_since: None, tasks: BTreeSet::new() })
            .tasks
            .insert(key);
        self.ids.insert(task.id.clone(), key);
        self.pending.insert(key, Entry { task, added: now, racks });
        if self.idle_declined {
            self.idle_declined = false;
            self.revive = true;
        }
        true
    }

    /// Forgets a pending entry (launched or removed); a job without tasks is forgotten too.
    fn take(&mut self, key: u64) -> Option<Entry<T>> {
        let entry = self.pending.remove(&key)?;
        self.ids.remove(&entry.task.id);
        if let Some(&job_key) = self.job_keys.get(&entry.task.job) {
            let empty = self.jobs.get_mut(&job_key).is_none_or(|j| {
                j.tasks.remove(&key);
                j.tasks.is_empty()
            });
            if empty {
                self.jobs.remove(&job_key);
                self.job_keys.remove(&entry.task.job);
            }
        }
        Some(entry)
    }

    /// Takes a pending task back (e.g. it was cancelled).
    pub fn remove(&mut self, id: &TaskId) -> Option<PendingTask<T>> {
        let key = *self.ids.get(id)?;
        self.take(key).map(|e| e.task)
    }

    /// Whether the framework should revive offers (it declined them as idle and has work
    /// again). Returns `true` once per such change.
    pub fn take_revive(&mut self) -> bool {
        std::mem::take(&mut self.revive)
    }

    /// How many tasks are pending.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The pending tasks, oldest first.
    pub fn pending_tasks(&self) -> impl Iterator<Item = &PendingTask<T>> {
        self.pending.values().map(|e| &e.task)
    }

    /// A job's locality level (that of its last launch), while it has pending tasks.
    pub fn level(&self, job: u64) -> Option<Locality> {
        self.job(job).map(|j| j.level)
    }

    /// Since when a job has been passing on offers without launching (the paper's wait);
    /// `None` right after a launch, or when the job has no pending task.
    pub fn waiting_since(&self, job: u64) -> Option<Instant> {
        self.job(job).and_then(|j| j.waiting_since)
    }

    fn job(&self, job: u64) -> Option<&Job> {
        self.jobs.get(self.job_keys.get(&job)?)
    }

    pub fn stats(&self) -> &LocalityStats {
        &self.stats
    }

    /// The worst locality allowed at `level` after waiting `wait`.
    fn allowed(&self, level: Locality, wait: Duration) -> Locality {
        let (w1, w2) = (self.config.node_delay, self.config.rack_delay);
        match level {
            Locality::Node if wait >= w1.saturating_add(w2) => Locality::Any,
            Locality::Node if wait >= w1 => Locality::Rack,
            Locality::Node => Locality::Node,
            Locality::Rack if wait >= w2 => Locality::Any,
            Locality::Rack => Locality::Rack,
            Locality::Any => Locality::Any,
        }
    }

    /// Remembers an agent seen in an offer: its rack, and the racks its attribute values live
    /// in (so that tasks preferring a value also prefer those racks).
    fn learn(&mut self, offer: &Offer) {
        if self.agent_attributes.get(&offer.agent_id) == Some(&offer.attributes) {
            return;
        }
        self.agent_attributes.insert(offer.agent_id.clone(), offer.attributes.clone());
        let Some(rack) = rack_of(&offer.attributes, &self.config.rack_attribute) else { return };
        self.agent_racks.insert(offer.agent_id.clone(), rack.clone());
        for (name, value) in &offer.attributes.0 {
            let values: Vec<String> = match value {
                AttrValue::Set(s) => s.iter().cloned().collect(),
                AttrValue::Text(t) => vec![t.clone()],
                AttrValue::Scalar(_) | AttrValue::Ranges(_) => continue,
            };
            let by_value = self.value_racks.entry(name.clone()).or_default();
            for v in values {
                by_value.entry(v).or_default().insert(rack.clone());
            }
        }
        for e in self.pending.values_mut() {
            if !e.racks.contains(&rack) && e.task.preference.matches(&offer.agent_id, &offer.attributes) {
                e.racks.insert(rack.clone());
            }
        }
    }

    /// The locality of a pending task on an offer.
    fn locality(entry: &Entry<T>, slot: &Slot<'_>) -> Locality {
        if entry.task.preference.matches(&slot.offer.agent_id, &slot.offer.attributes) {
            Locality::Node
        } else if slot.rack.as_ref().is_some_and(|r| entry.racks.contains(r)) {
            Locality::Rack
        } else {
            Locality::Any
        }
    }

    /// Places `keys` (pending entries, in order) of exactly `want` locality — or, for `None`,
    /// those without a preference — on the slots while they fit. Returns how many.
    fn place(
        &self,
        slots: &mut [Slot<'_>],
        keys: &BTreeSet<u64>,
        taken: &mut BTreeSet<u64>,
        want: Option<Locality>,
    ) -> usize {
        let mut n = 0;
        for slot in slots.iter_mut() {
            for key in keys {
                if slot.left.is_empty() {
                    break;
                }
                let Some(e) = self.pending.get(key) else { continue };
                if taken.contains(key) || e.free() != want.is_none() || !slot.left.contains(&e.task.resources)
                {
                    continue;
                }
                let locality = match want {
                    None => Locality::Any,
                    Some(w) if Self::locality(e, slot) == w => w,
                    Some(_) => continue,
                };
                slot.left = slot.left.saturating_sub(&e.task.resources);
                slot.placed.push((*key, locality));
                taken.insert(*key);
                n += 1;
            }
        }
        n
    }

    /// Decides what to do with a batch of offers at `now` (see the module docs).
    pub fn on_offers(&mut self, now: Instant, offers: &[Offer]) -> Decision<T> {
        for offer in offers {
            self.learn(offer);
        }
        if self.pending.is_empty() {
            self.idle_declined |= !offers.is_empty();
            return Decision {
                launches: Vec::new(),
                declines: offers.iter().map(|o| o.id.clone()).collect(),
                refuse_seconds: self.config.idle_refuse.as_secs_f64(),
            };
        }
        let rack_attribute = self.config.rack_attribute.clone();
        let mut slots: Vec<Slot<'_>> = offers
            .iter()
            .map(|offer| Slot {
                offer,
                rack: rack_of(&offer.attributes, &rack_attribute),
                left: offer.resources.clone(),
                placed: Vec::new(),
            })
            .collect();
        let mut taken = BTreeSet::new();
        let job_keys: Vec<u64> = self.jobs.keys().copied().collect();
        for job_key in job_keys {
            let Some(job) = self.jobs.get(&job_key) else { continue };
            let wait = job.waiting_since.map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
            let mut allowed = self.allowed(job.level, wait);
            let mut launched = None;
            for level in [Locality::Node, Locality::Rack, Locality::Any] {
                if level > allowed {
                    break;
                }
                if self.place(&mut slots, &job.tasks, &mut taken, Some(level)) > 0 {
                    // A launch at `level`: the level is that, the wait starts over.
                    launched = Some(level);
                    allowed = self.allowed(level, Duration::ZERO);
                }
            }
            // Skipped: one of its tasks would have fitted what it passed on.
            let skipped = launched.is_none()
                && job.tasks.iter().any(|k| {
                    self.pending.get(k).is_some_and(|e| {
                        !e.free() && slots.iter().any(|s| s.left.contains(&e.task.resources))
                    })
                });
            let Some(job) = self.jobs.get_mut(&job_key) else { continue };
            if let Some(level) = launched {
                job.level = level;
                job.waiting_since = None;
            } else if skipped {
                job.waiting_since.get_or_insert(now);
            }
        }
        let free: BTreeSet<u64> =
            self.pending.iter().filter(|(k, e)| e.free() && !taken.contains(*k)).map(|(k, _)| *k).collect();
        if !free.is_empty() {
            self.place(&mut slots, &free, &mut taken, None);
        }

        let mut decision = Decision {
            launches: Vec::new(),
            declines: Vec::new(),
            refuse_seconds: self.config.refuse.as_secs_f64(),
        };
        for slot in slots {
            if slot.placed.is_empty() {
                decision.declines.push(slot.offer.id.clone());
                continue;
            }
            let mut tasks = Vec::with_capacity(slot.placed.len());
            for (key, locality) in slot.placed {
                let Some(e) = self.take(key) else { continue };
                let waited = now.saturating_duration_since(e.added);
                self.stats.record(locality, waited);
                tasks.push(Placed { id: e.task.id, task: e.task.task, locality, waited });
            }
            decision.launches.push(Launch {
                offer_id: slot.offer.id.clone(),
                agent_id: slot.offer.agent_id.clone(),
                tasks,
            });
        }
        decision
    }
}

/// A task the adapter launched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub task_id: TaskId,
    pub agent_id: AgentId,
    pub locality: Locality,
    pub waited: Duration,
}

/// Carries a decision out on the driver: one ACCEPT per launch (the unused rest filtered for
/// `refuse_seconds`) and one DECLINE for the offers passed on.
pub fn carry_out(driver: &Driver, decision: Decision<TaskInfo>) -> Vec<Placement> {
    let mut out = Vec::with_capacity(decision.task_count());
    let refuse = Some(decision.refuse_seconds);
    for launch in decision.launches {
        let mut tasks = Vec::with_capacity(launch.tasks.len());
        for p in launch.tasks {
            out.push(Placement {
                task_id: p.id,
                agent_id: launch.agent_id.clone(),
                locality: p.locality,
                waited: p.waited,
            });
            tasks.push(p.task);
        }
        driver.accept(vec![launch.offer_id], vec![crate::proto::Operation::Launch { tasks }], refuse);
    }
    if !decision.declines.is_empty() {
        driver.decline(decision.declines, refuse);
    }
    out
}

/// The adapter for the [`Driver`]: wall-clock time, [`TaskInfo`] payloads.
impl DelayScheduler<TaskInfo> {
    /// Queues a task now, reviving offers if they were declined for want of work.
    pub fn submit(&mut self, driver: &Driver, task: TaskInfo, preference: Preference) -> bool {
        let added = self.add(Instant::now(), PendingTask::from_info(task, preference));
        if self.take_revive() {
            driver.revive();
        }
        added
    }

    /// The body of [`Scheduler::resource_offers`](crate::scheduler::Scheduler::resource_offers):
    /// decides now and carries the decision out.
    pub fn resource_offers(&mut self, driver: &Driver, offers: &[Offer]) -> Vec<Placement> {
        let decision = self.on_offers(Instant::now(), offers);
        carry_out(driver, decision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::FrameworkId;

    const SEC: Duration = Duration::from_secs(1);

    fn res(s: &str) -> Resources {
        Resources::parse(s).expect("resources")
    }

    /// An offer of `r` on agent `agent` with attributes `attrs`.
    fn offer(n: u32, agent: &str, attrs: &str, r: &str) -> Offer {
        Offer {
            id: OfferId::new(format!("o{n}")),
            framework_id: FrameworkId::new("f"),
            agent_id: AgentId::new(agent),
            hostname: agent.into(),
            resources: res(r),
            attributes: Attributes::parse(attrs).expect("attributes"),
        }
    }

    fn block_task(id: &str, block: &str) -> PendingTask<()> {
        PendingTask::new(TaskId::new(id), res("cpus:1"), Preference::default().attribute("blocks", block), ())
    }

    fn launched<T>(d: &Decision<T>) -> Vec<(String, String, Locality)> {
        d.launches
            .iter()
            .flat_map(|l| l.tasks.iter().map(|t| (t.id.to_string(), l.agent_id.to_string(), t.locality)))
            .collect()
    }

    // Agents: a1 (rack r1) holds b1; a2 (rack r1) holds b2; a3 (rack r2) holds b3.
    const A1: &str = "rack:r1;blocks:{b1,b9}";
    const A2: &str = "rack:r1;blocks:{b2}";
    const A3: &str = "rack:r2;blocks:{b3}";

    fn sched(node: u64, rack: u64) -> DelayScheduler<()> {
        DelayScheduler::new(DelayConfig::new(SEC * node as u32, SEC * rack as u32))
    }

    #[test]
    fn a_node_local_offer_is_taken_at_once_and_others_declined_with_a_short_filter() {
        let t0 = Instant::now();
        let mut s = sched(1, 2);
        s.add(t0, block_task("t1", "b1"));
        let d = s.on_offers(t0, &[offer(1, "a3", A3, "cpus:4"), offer(2, "a1", A1, "cpus:4")]);
        assert_eq!(launched(&d), [("t1".into(), "a1".into(), Locality::Node)]);
        assert_eq!(d.launches[0].offer_id, OfferId::new("o2"));
        assert_eq!(d.declines, [OfferId::new("o1")]);
        assert_eq!(d.refuse_seconds, 1.0);
        assert_eq!(s.stats().node, 1);
        assert_eq!(s.pending(), 0);
    }

    #[test]
    fn waits_then_escalates_to_rack_then_to_any() {
        let t0 = Instant::now();
        let mut s = sched(1, 2);
        s.add(t0, block_task("t1", "b1"));
        // Learn that b1 lives in rack r1 (a1 is offered but full).
        let d = s.on_offers(t0, &[offer(1, "a1", A1, "cpus:0.5")]);
        assert!(d.launches.is_empty());
        assert_eq!(s.waiting_since(0), None, "nothing fitted: not a skip");
        // A rack-local offer: declined, the wait starts.
        let d = s.on_offers(t0, &[offer(2, "a2", A2, "cpus:4")]);
        assert!(d.launches.is_empty());
        assert_eq!(d.declines, [OfferId::new("o2")]);
        assert_eq!(s.waiting_since(0), Some(t0));
        // Still within the node delay: an off-rack and a rack-local offer are passed on.
        let d = s.on_offers(t0 + SEC / 2, &[offer(3, "a3", A3, "cpus:4"), offer(4, "a2", A2, "cpus:4")]);
        assert!(d.launches.is_empty() && d.declines.len() == 2);
        assert_eq!(s.waiting_since(0), Some(t0), "the wait keeps its start");
        // Past the node delay: off-rack still declined, rack-local taken.
        let d = s.on_offers(t0 + SEC, &[offer(5, "a3", A3, "cpus:4")]);
        assert!(d.launches.is_empty());
        let d = s.on_offers(t0 + SEC, &[offer(6, "a2", A2, "cpus:4")]);
        assert_eq!(launched(&d), [("t1".into(), "a2".into(), Locality::Rack)]);
        assert_eq!(s.level(0), None, "the job is done: forgotten");
        assert_eq!(s.stats().rack, 1);
        assert_eq!(s.stats().max_wait, SEC);

        // A new task: off-rack offers only; taken after node + rack delay (3 s).
        let t1 = t0 + 10 * SEC;
        s.add(t1, block_task("t2", "b1"));
        for (i, dt) in [0u32, 1, 2].into_iter().enumerate() {
            let d = s.on_offers(t1 + dt * SEC, &[offer(10 + i as u32, "a3", A3, "cpus:4")]);
            assert!(d.launches.is_empty(), "at {dt}s");
        }
        let d = s.on_offers(t1 + 3 * SEC, &[offer(20, "a3", A3, "cpus:4")]);
        assert_eq!(launched(&d), [("t2".into(), "a3".into(), Locality::Any)]);
        assert_eq!(s.stats().any, 1);
        assert_eq!(s.stats().total_wait, 4 * SEC);
    }

    #[test]
    fn the_level_sticks_until_a_node_local_launch_resets_it() {
        let t0 = Instant::now();
        let mut s = sched(1, 1);
        for i in 0..4 {
            s.add(t0, block_task(&format!("t{i}"), "b1"));
        }
        s.on_offers(t0, &[offer(1, "a1", A1, "cpus:0")]); // learn a1's rack
        assert!(s.on_offers(t0, &[offer(2, "a2", A2, "cpus:1")]).launches.is_empty());
        let d = s.on_offers(t0 + SEC, &[offer(3, "a2", A2, "cpus:1")]);
        assert_eq!(launched(&d)[0].2, Locality::Rack);
        assert_eq!(s.level(0), Some(Locality::Rack));
        // At rack level a rack-local offer is taken at once, an off-rack one is not.
        let d = s.on_offers(t0 + SEC, &[offer(4, "a3", A3, "cpus:1"), offer(5, "a2", A2, "cpus:1")]);
        assert_eq!(launched(&d), [("t1".into(), "a2".into(), Locality::Rack)]);
        assert_eq!(d.declines, [OfferId::new("o4")]);
        // A node-local launch resets the level: rack-local must wait again.
        let d = s.on_offers(t0 + 2 * SEC, &[offer(6, "a1", A1, "cpus:1")]);
        assert_eq!(launched(&d)[0].2, Locality::Node);
        assert_eq!(s.level(0), Some(Locality::Node));
        assert!(s.on_offers(t0 + 2 * SEC, &[offer(7, "a2", A2, "cpus:1")]).launches.is_empty());
    }

    #[test]
    fn after_a_node_local_launch_the_rest_of_a_batch_waits() {
        let t0 = Instant::now();
        let mut s = sched(1, 1);
        s.add(t0, block_task("t1", "b1"));
        s.add(t0, block_task("t2", "b3"));
        // Both levels would be allowed by the wait, but the node-local launch zeroes it.
        for j in s.jobs.values_mut() {
            j.waiting_since = Some(t0);
        }
        let d = s.on_offers(t0 + 5 * SEC, &[offer(1, "a1", A1, "cpus:1"), offer(2, "a2", A2, "cpus:1")]);
        assert_eq!(launched(&d), [("t1".into(), "a1".into(), Locality::Node)]);
        assert_eq!(d.declines, [OfferId::new("o2")]);
        // Greedy: both at once.
        let mut g: DelayScheduler<()> = DelayScheduler::new(DelayConfig::greedy());
        g.add(t0, block_task("t1", "b1"));
        g.add(t0, block_task("t2", "b3"));
        let d = g.on_offers(t0, &[offer(1, "a1", A1, "cpus:1"), offer(2, "a2", A2, "cpus:1")]);
        assert_eq!(
            launched(&d),
            [("t1".into(), "a1".into(), Locality::Node), ("t2".into(), "a2".into(), Locality::Any)]
        );
    }

    #[test]
    fn greedy_prefers_node_local_tasks_then_fills_the_offer_in_order() {
        let t0 = Instant::now();
        let mut s: DelayScheduler<()> = DelayScheduler::new(DelayConfig::greedy());
        for (i, b) in ["b3", "b3", "b1", "b3", "b1"].into_iter().enumerate() {
            s.add(t0, block_task(&format!("t{i}"), b));
        }
        let d = s.on_offers(t0, &[offer(1, "a1", A1, "cpus:3;mem:1GiB")]);
        assert_eq!(
            launched(&d),
            [
                ("t2".into(), "a1".into(), Locality::Node),
                ("t4".into(), "a1".into(), Locality::Node),
                ("t0".into(), "a1".into(), Locality::Any),
            ]
        );
        assert_eq!(s.pending(), 2);
        assert_eq!(s.stats().fraction(Locality::Node), 2.0 / 3.0);
    }

    #[test]
    fn several_tasks_fit_one_offer_by_resources() {
        let t0 = Instant::now();
        let mut s = sched(1, 1);
        for i in 0..5 {
            s.add(t0, block_task(&format!("t{i}"), "b9"));
        }
        let d = s.on_offers(t0, &[offer(1, "a1", A1, "cpus:3.5;mem:1GiB")]);
        assert_eq!(d.task_count(), 3, "three whole CPUs in 3.5");
        assert_eq!(s.pending(), 2);
    }

    #[test]
    fn agent_ids_explicit_racks_and_text_attributes_match() {
        let t0 = Instant::now();
        let mut s = sched(1, 1);
        let by_id = PendingTask::new(TaskId::new("id"), res("cpus:1"), Preference::default().agent("a3"), ());
        let by_rack =
            PendingTask::new(TaskId::new("rk"), res("cpus:1"), Preference::default().rack("r2"), ());
        let by_zone = PendingTask::new(
            TaskId::new("zn"),
            res("cpus:1"),
            Preference::default().attribute("zone", "z1"),
            (),
        );
        s.add(t0, by_id);
        s.add(t0, by_rack);
        s.add(t0, by_zone);
        let d = s.on_offers(t0, &[offer(1, "a3", A3, "cpus:1"), offer(2, "x", "rack:r9;zone:z1", "cpus:1")]);
        assert_eq!(
            launched(&d),
            [("id".into(), "a3".into(), Locality::Node), ("zn".into(), "x".into(), Locality::Node)]
        );
        // A task preferring only a rack is rack-local there, never node-local: it waits.
        assert!(s.on_offers(t0, &[offer(3, "a3", A3, "cpus:1")]).launches.is_empty());
        let d = s.on_offers(t0 + SEC, &[offer(4, "a3", A3, "cpus:1")]);
        assert_eq!(launched(&d), [("rk".into(), "a3".into(), Locality::Rack)]);
    }

    #[test]
    fn racks_are_learned_for_tasks_added_before_and_after_the_agent_is_seen() {
        let t0 = Instant::now();
        let mut s = sched(1, 1);
        s.add(t0, block_task("before", "b2"));
        s.on_offers(t0, &[offer(1, "a2", A2, "cpus:0")]); // a2 (rack r1) holds b2
        s.add(t0, block_task("after", "b2"));
        // a1 is in r1: rack-local for both once the node delay has passed.
        assert!(s.on_offers(t0, &[offer(2, "a1", A1, "cpus:2")]).launches.is_empty());
        let d = s.on_offers(t0 + SEC, &[offer(3, "a1", A1, "cpus:2")]);
        assert_eq!(
            launched(&d),
            [("before".into(), "a1".into(), Locality::Rack), ("after".into(), "a1".into(), Locality::Rack)]
        );
    }

    #[test]
    fn tasks_without_preference_run_anywhere_at_once() {
        let t0 = Instant::now();
        let mut s = sched(5, 5);
        s.add(t0, PendingTask::new(TaskId::new("free"), res("cpus:1"), Preference::default(), ()));
        s.add(t0, block_task("t1", "b1"));
        let d = s.on_offers(t0, &[offer(1, "a3", A3, "cpus:2")]);
        assert_eq!(launched(&d), [("free".into(), "a3".into(), Locality::Any)]);
        assert_eq!(s.waiting_since(0), Some(t0), "the constrained task was skipped");
        assert_eq!(s.level(0), Some(Locality::Node));
    }

    #[test]
    fn idle_declines_use_the_long_filter_and_new_work_asks_for_a_revive() {
        let t0 = Instant::now();
        let mut s = sched(1, 1);
        let d = s.on_offers(t0, &[offer(1, "a1", A1, "cpus:4")]);
        assert_eq!(d.declines.len(), 1);
        assert_eq!(d.refuse_seconds, 30.0);
        assert!(!s.take_revive());
        s.add(t0, block_task("t1", "b1"));
        assert!(s.take_revive());
        assert!(!s.take_revive(), "once");
        s.add(t0, block_task("t2", "b1"));
        assert!(!s.take_revive(), "offers were not declined since");
    }

    #[test]
    fn duplicate_ids_are_refused_and_removal_works() {
        let t0 = Instant::now();
        let mut s = sched(1, 1);
        assert!(s.add(t0, block_task("t1", "b1")));
        assert!(!s.add(t0, block_task("t1", "b2")));
        assert_eq!(s.pending(), 1);
        assert_eq!(s.remove(&TaskId::new("t1")).map(|t| t.id), Some(TaskId::new("t1")));
        assert!(s.remove(&TaskId::new("t1")).is_none());
        assert!(s.add(t0, block_task("t1", "b1")), "the id is free again");
    }

    #[test]
    fn holds_reads_every_attribute_type() {
        let a = Attributes::parse("rack:r1;cores:8;ids:[1-5];blocks:{b1,b2}").expect("attributes");
        let p = |n: &str, v: &str| Preference::default().attribute(n, v);
        let agent = AgentId::new("x");
        assert!(p("rack", "r1").matches(&agent, &a));
        assert!(p("cores", "8").matches(&agent, &a));
        assert!(p("ids", "3").matches(&agent, &a));
        assert!(!p("ids", "6").matches(&agent, &a));
        assert!(p("blocks", "b2").matches(&agent, &a));
        assert!(!p("blocks", "b3").matches(&agent, &a));
        assert!(!p("missing", "b1").matches(&agent, &a));
    }

    #[test]
    fn greedy_serves_the_head_job_first_and_delay_lets_a_later_job_take_its_local_offer() {
        let t0 = Instant::now();
        let job = |id: &str, block: &str, j: u64| block_task(id, block).in_job(j);
        // Greedy: job 1 (head) takes the offer on a1 with a non-local task; job 2's local task
        // on a1 waits.
        let mut g: DelayScheduler<()> = DelayScheduler::new(DelayConfig::greedy());
        g.add(t0, job("head", "b3", 1));
        g.add(t0, job("local", "b1", 2));
        let d = g.on_offers(t0, &[offer(1, "a1", A1, "cpus:1")]);
        assert_eq!(launched(&d), [("head".into(), "a1".into(), Locality::Any)]);
        // Delay: the head job is skipped, job 2 launches node-local; the head job waits.
        let mut s = sched(1, 1);
        s.add(t0, job("head", "b3", 1));
        s.add(t0, job("local", "b1", 2));
        let d = s.on_offers(t0, &[offer(1, "a1", A1, "cpus:1")]);
        assert_eq!(launched(&d), [("local".into(), "a1".into(), Locality::Node)]);
        assert_eq!(s.waiting_since(1), Some(t0));
        assert_eq!(s.level(2), None, "job 2 is done");
        // Levels are per job: job 3 starts at node level while job 1 has waited long enough.
        s.add(t0, job("new", "b3", 3));
        let d = s.on_offers(t0 + 3 * SEC, &[offer(2, "a2", A2, "cpus:2")]);
        assert_eq!(launched(&d), [("head".into(), "a2".into(), Locality::Any)]);
        assert_eq!(s.waiting_since(3), Some(t0 + 3 * SEC), "job 3 was skipped: its wait starts");
        assert_eq!(s.level(3), Some(Locality::Node));
    }

    #[test]
    fn jobs_are_served_in_the_order_of_their_first_task() {
        let t0 = Instant::now();
        let mut g: DelayScheduler<()> = DelayScheduler::new(DelayConfig::greedy());
        g.add(t0, block_task("b-1", "b3").in_job(9));
        g.add(t0, block_task("a-1", "b3").in_job(4));
        g.add(t0, block_task("b-2", "b3").in_job(9));
        let d = g.on_offers(t0, &[offer(1, "a1", A1, "cpus:2")]);
        let ids: Vec<String> = launched(&d).into_iter().map(|l| l.0).collect();
        assert_eq!(ids, ["b-1", "b-2"], "job 9 came first and takes both slots");
    }
}
