//! The records the master core keeps: agents, frameworks, offers, tasks and filters.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::Hash;
use std::time::{Duration, Instant};

use agora_sdk::proto::*;
use agora_sdk::{Attributes, Resources};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::core::ConnId;
use crate::registry::AgentStanding;

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
    /// Known from the registry of an earlier incarnation of the master and not re-registered
    /// since this one started: its tasks are unknown until it does (UNREACHABLE to
    /// reconciliation); removed at the agent re-register timeout.
    Recovering,
}

impl AgentStatus {
    /// The status operators see (before any drain).
    pub(crate) fn view(self) -> AgentViewStatus {
        match self {
            AgentStatus::Active { .. } => AgentViewStatus::Active,
            AgentStatus::Disconnected => AgentViewStatus::Disconnected,
            AgentStatus::Unreachable => AgentViewStatus::Unreachable,
            AgentStatus::Recovering => AgentViewStatus::Recovering,
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
    /// Numbers of its outstanding offers, sorted (few per agent: a sorted `Vec` keeps its
    /// capacity from cycle to cycle where a set would allocate a node per offer).
    pub offers: Vec<u64>,
    /// Every task the master keeps on this agent (completed ones are dropped from here).
    pub tasks: BTreeSet<TaskKey>,
    /// Its standing as last recorded in the registry (rewritten with the drain).
    pub standing: AgentStanding,
    /// An operator drains it: no offers, and its tasks are killed at the deadline.
    pub drain: Option<Drain>,
}

/// An operator's drain of an agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Drain {
    /// When its remaining tasks are killed (if `view.kill`); `None`: never.
    pub deadline: Option<Instant>,
    /// The deadline in Unix ms and whether to kill, as operators, frameworks and the registry
    /// see them.
    pub view: DrainView,
}

impl Agent {
    pub(crate) fn add_offer(&mut self, n: u64) {
        if let Err(i) = self.offers.binary_search(&n) {
            self.offers.insert(i, n);
        }
    }

    pub(crate) fn remove_offer(&mut self, n: u64) {
        if let Ok(i) = self.offers.binary_search(&n) {
            self.offers.remove(i);
        }
    }

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
            offers: Vec::new(),
            tasks: BTreeSet::new(),
            standing: AgentStanding::Admitted,
            drain: None,
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
        crate::quick::sub(&crate::quick::sub(&self.total, &self.used), &self.offered)
    }
}

/// Whether a framework is reachable, and whether it takes offers while it is: a SUPPRESS
/// lasts until its REVIVE or its next subscription, so a disconnected framework has none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FrameworkLink {
    /// Subscribed on this connection, taking offers.
    Connected(ConnId),
    /// Subscribed on this connection, its offers suppressed (SUPPRESS).
    Suppressed(ConnId),
    /// Gone since `since`; removed at `deadline` (`None`: a failover timeout too long to
    /// represent, i.e. never).
    Disconnected { deadline: Option<Instant> },
}

impl FrameworkLink {
    /// Its connection, if it is connected.
    pub(crate) fn conn(self) -> Option<ConnId> {
        match self {
            FrameworkLink::Connected(conn) | FrameworkLink::Suppressed(conn) => Some(conn),
            FrameworkLink::Disconnected { .. } => None,
        }
    }
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
    /// The OS user its tasks run as unless a task names one (`FrameworkInfo::user`).
    pub user: Option<String>,
    pub link: FrameworkLink,
    /// Numbers of its outstanding offers (unordered: walks sort their ids first).
    pub offers: FxHashSet<u64>,
    /// Decline filters by agent slot. The only agents ever removed are those recovered from
    /// the registry that never re-registered, which had no offers and so no filters: a slot
    /// names one agent.
    pub filters: FxHashMap<usize, Vec<Filter>>,
}

impl Framework {
    pub(crate) fn conn(&self) -> Option<ConnId> {
        self.link.conn()
    }

    /// Whether it asked for no offers (SUPPRESS) on its current connection.
    pub(crate) fn suppressed(&self) -> bool {
        matches!(self.link, FrameworkLink::Suppressed(_))
    }

    /// SUPPRESS: no offers until REVIVE (a disconnected framework has nothing to suppress).
    pub(crate) fn suppress(&mut self) {
        if let FrameworkLink::Connected(conn) = self.link {
            self.link = FrameworkLink::Suppressed(conn);
        }
    }

    /// REVIVE: offers again.
    pub(crate) fn revive(&mut self) {
        if let FrameworkLink::Suppressed(conn) = self.link {
            self.link = FrameworkLink::Connected(conn);
        }
    }

    /// Whether a live filter hides `resources` on `agent` from this framework: a filter hides
    /// only offers it covers, so a larger offer still goes through.
    pub(crate) fn filtered(&self, agent: usize, resources: &Resources, now: Instant) -> bool {
        if self.filters.is_empty() {
            return false;
        }
        self.filters
            .get(&agent)
            .is_some_and(|fs| fs.iter().any(|f| f.expires > now && f.resources.contains(resources)))
    }

    pub(crate) fn status(&self) -> FrameworkViewStatus {
        match self.link {
            FrameworkLink::Disconnected { .. } => FrameworkViewStatus::Disconnected,
            FrameworkLink::Suppressed(_) => FrameworkViewStatus::Suppressed,
            FrameworkLink::Connected(_) => FrameworkViewStatus::Active,
        }
    }
}

/// An outstanding offer. Its framework and agent are named by their slots in the master's
/// tables: agents with offers are never removed, and a framework's offers are all taken before
/// it is, so the slots stay valid as long as the offer is outstanding.
#[derive(Clone, Debug)]
pub(crate) struct OfferRecord {
    pub framework: usize,
    pub agent: usize,
    pub resources: Resources,
}

/// Hashes offer numbers so that consecutive numbers land in consecutive buckets (the low
/// bits are the number itself) while the top bits, which the table compares first, stay
/// mixed: a cycle's offers are numbered in a row, so recording them walks the index
/// sequentially instead of missing the cache once per offer.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SequentialHasher(u64);

impl std::hash::Hasher for SequentialHasher {
    fn finish(&self) -> u64 {
        let mixed = self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (self.0 & 0x01FF_FFFF_FFFF_FFFF) | (mixed & 0xFE00_0000_0000_0000)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type SequentialMap<V> = std::collections::HashMap<u64, V, std::hash::BuildHasherDefault<SequentialHasher>>;

/// Outstanding offers by number, in slots (the hashed index holds only numbers, so growing
/// or cleaning it never moves the records).
#[derive(Debug, Default)]
pub(crate) struct Offers {
    index: SequentialMap<usize>,
    records: Vec<Option<OfferRecord>>,
    free: Vec<usize>,
}

impl Offers {
    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    /// Makes room for `additional` new offers. For a large batch, free slots are handed out
    /// lowest first so that the batch fills the records in memory order (the sort is paid
    /// only when the batch is at least an eighth of the free list: O(log n) per offer).
    pub(crate) fn reserve(&mut self, additional: usize) {
        self.index.reserve(additional);
        if additional >= self.free.len() / 8 {
            self.free.sort_unstable_by(|a, b| b.cmp(a));
        }
    }

    pub(crate) fn get(&self, n: &u64) -> Option<&OfferRecord> {
        self.records.get(*self.index.get(n)?).and_then(Option::as_ref)
    }

    /// Records a new offer (`n` is fresh: offer numbers are never reused).
    pub(crate) fn insert(&mut self, n: u64, record: OfferRecord) {
        let i = match self.free.pop() {
            Some(i) => {
                self.records[i] = Some(record);
                i
            }
            None => {
                self.records.push(Some(record));
                self.records.len() - 1
            }
        };
        if let Some(old) = self.index.insert(n, i) {
            // Not reached (numbers are fresh); keep the slots consistent anyway.
            self.records[old] = None;
            self.free.push(old);
        }
    }

    pub(crate) fn remove(&mut self, n: &u64) -> Option<OfferRecord> {
        let i = self.index.remove(n)?;
        self.free.push(i);
        self.records.get_mut(i).and_then(Option::take)
    }
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
    /// Its last [`TASK_HISTORY`] state changes, oldest first (`agora describe task`).
    pub history: std::collections::VecDeque<TaskTransition>,
    /// Why the master itself had it killed — its agent's drain (`agent drained`) or its
    /// framework's teardown that said why (`TeardownBecause`, e.g. `run interrupted`): the
    /// reason its KILLED update carries instead of the executor's.
    pub kill_reason: Option<Reason>,
    /// The uuid of an update applied ahead of its turn ([`AgentMessage::LatestState`]: its
    /// agent still waits for the acknowledgement of an earlier one): the earlier updates that
    /// arrive meanwhile are forwarded without changing the state, and the task is not
    /// completed before this update itself arrived and was acknowledged.
    pub ahead: Option<uuid::Uuid>,
}

/// How many state changes the master keeps per task: enough for a launch, a partition and an
/// end, bounded because a task flapping between RUNNING and UNREACHABLE would grow without end.
pub(crate) const TASK_HISTORY: usize = 16;

impl Task {
    /// Records a change of state at `unix_ms` (the master's clock), keeping the last
    /// [`TASK_HISTORY`]. Repeats of the current state (retried updates) are not changes.
    pub(crate) fn record(&mut self, state: TaskState, reason: &Reason, unix_ms: u64) {
        if self.history.back().is_some_and(|t| t.state == state) {
            return;
        }
        if self.history.len() >= TASK_HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(TaskTransition { state, reason: reason.clone(), timestamp_ms: unix_ms });
    }

    pub(crate) fn key(&self) -> TaskKey {
        TaskKey::new(self.framework_id.clone(), self.info.task_id.clone())
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
            executor_id: self.info.kind.executor_id(),
        }
    }
}

/// Records by id, as a `BTreeMap` would keep them (iteration in id order) but looked up by
/// a fast hash: the allocation cycle looks an agent or a framework up per decision, and
/// string-keyed trees made `memcmp` the top symbol of the cycle. Records live in slots of a
/// `Vec`; the ordered index is only walked, never searched, on hot paths.
#[derive(Debug)]
pub(crate) struct Table<K, V> {
    index: FxHashMap<K, usize>,
    order: BTreeMap<K, usize>,
    /// `order`'s slots as a flat list, when up to date ([`Table::refresh_order`]).
    order_list: Vec<usize>,
    order_list_valid: bool,
    slots: Vec<Option<V>>,
    /// Per slot, how many records it has held before the current one.
    generations: Vec<u32>,
    free: Vec<usize>,
}

impl<K, V> Default for Table<K, V> {
    fn default() -> Self {
        Table {
            index: FxHashMap::default(),
            order: BTreeMap::new(),
            order_list: Vec::new(),
            order_list_valid: true,
            slots: Vec::new(),
            generations: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<K: Ord + Hash + Clone, V> Table<K, V> {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    pub(crate) fn contains_key(&self, k: &K) -> bool {
        self.index.contains_key(k)
    }

    /// The slot of a record (stable until it is removed).
    pub(crate) fn slot(&self, k: &K) -> Option<usize> {
        self.index.get(k).copied()
    }

    pub(crate) fn at(&self, slot: usize) -> Option<&V> {
        self.slots.get(slot).and_then(Option::as_ref)
    }

    pub(crate) fn at_mut(&mut self, slot: usize) -> Option<&mut V> {
        self.slots.get_mut(slot).and_then(Option::as_mut)
    }

    /// One more than the highest slot in use so far.
    pub(crate) fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// Brings the flat id-order list up to date (after records came or went), so that
    /// [`Table::slots_in_order`] walks a `Vec` instead of the tree.
    pub(crate) fn refresh_order(&mut self) {
        if !self.order_list_valid {
            self.order_list.clear();
            self.order_list.extend(self.order.values().copied());
            self.order_list_valid = true;
        }
    }

    /// `(slot, generation)` of every record, in id order, without reading the records (a walk
    /// over tens of thousands of them is a cache miss each).
    pub(crate) fn order_with_generations(&mut self) -> Vec<(usize, u32)> {
        self.refresh_order();
        self.order_list.iter().map(|&i| (i, self.generations.get(i).copied().unwrap_or(0))).collect()
    }

    /// Slots and records in id order.
    #[cfg(test)]
    pub(crate) fn slots_in_order(&self) -> impl Iterator<Item = (usize, &V)> + '_ {
        let list: Box<dyn Iterator<Item = usize> + '_> = if self.order_list_valid {
            Box::new(self.order_list.iter().copied())
        } else {
            Box::new(self.order.values().copied())
        };
        list.filter_map(|i| self.slots.get(i).and_then(Option::as_ref).map(|v| (i, v)))
    }

    pub(crate) fn get(&self, k: &K) -> Option<&V> {
        let i = *self.index.get(k)?;
        self.slots.get(i).and_then(Option::as_ref)
    }

    pub(crate) fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        let i = *self.index.get(k)?;
        self.slots.get_mut(i).and_then(Option::as_mut)
    }

    /// Inserts or replaces; returns the replaced record.
    pub(crate) fn insert(&mut self, k: K, v: V) -> Option<V> {
        if let Some(&i) = self.index.get(&k) {
            return self.slots.get_mut(i).and_then(|s| s.replace(v));
        }
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(v);
                i
            }
            None => {
                self.slots.push(Some(v));
                self.generations.push(0);
                self.slots.len() - 1
            }
        };
        self.index.insert(k.clone(), i);
        self.order.insert(k, i);
        self.order_list_valid = false;
        None
    }

    pub(crate) fn remove(&mut self, k: &K) -> Option<V> {
        let i = self.index.remove(k)?;
        self.order.remove(k);
        self.order_list_valid = false;
        let v = self.slots.get_mut(i).and_then(Option::take);
        if let Some(g) = self.generations.get_mut(i) {
            *g = g.wrapping_add(1);
        }
        self.free.push(i);
        v
    }

    /// The record in `slot` if it is still the one of `generation` (a removed record's slot
    /// may hold another one since).
    pub(crate) fn at_generation_mut(&mut self, slot: usize, generation: u32) -> Option<&mut V> {
        if self.generations.get(slot) != Some(&generation) {
            return None;
        }
        self.at_mut(slot)
    }

    pub(crate) fn generation(&self, slot: usize) -> u32 {
        self.generations.get(slot).copied().unwrap_or(0)
    }

    /// Records in id order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &V> + '_ {
        self.order.values().filter_map(|&i| self.slots.get(i).and_then(Option::as_ref))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_history_keeps_the_last_changes() {
        let mut task = Task {
            info: TaskInfo {
                task_id: TaskId::new("t"),
                name: "t".into(),
                resources: Resources::default(),
                kind: TaskKind::Command(CommandInfo { argv: vec!["true".into()], shell: false, env: vec![] }),
                kill_grace: None,
                user: None,
            },
            framework_id: FrameworkId::new("f"),
            agent_id: AgentId::new("a"),
            state: TaskState::Staging,
            allocation: Resources::default(),
            latest: None,
            pending: Vec::new(),
            kill_requested: false,
            history: Default::default(),
            kill_reason: None,
            ahead: None,
        };
        task.record(TaskState::Staging, &Reason::Launched, 1);
        task.record(TaskState::Running, &Reason::TaskStarted, 2);
        // A retried update is no change.
        task.record(TaskState::Running, &Reason::TaskStarted, 3);
        let states = |t: &Task| t.history.iter().map(|h| (h.state, h.timestamp_ms)).collect::<Vec<_>>();
        assert_eq!(states(&task), vec![(TaskState::Staging, 1), (TaskState::Running, 2)]);
        // A task flapping across partitions: the last TASK_HISTORY changes.
        for i in 0..40 {
            let state = if i % 2 == 0 { TaskState::Unreachable } else { TaskState::Running };
            task.record(state, &"flap".into(), 10 + i);
        }
        assert_eq!(task.history.len(), TASK_HISTORY);
        assert_eq!(task.history.back().map(|h| (h.state, h.timestamp_ms)), Some((TaskState::Running, 49)));
    }

    #[test]
    fn task_table_walks_in_framework_then_task_order() {
        let task = |fw: &str, id: &str| Task {
            info: TaskInfo {
                task_id: TaskId::new(id),
                name: id.into(),
                resources: Resources::default(),
                kind: TaskKind::Command(CommandInfo { argv: vec!["true".into()], shell: false, env: vec![] }),
                kill_grace: None,
                user: None,
            },
            framework_id: FrameworkId::new(fw),
            agent_id: AgentId::new("a"),
            state: TaskState::Staging,
            allocation: Resources::default(),
            latest: None,
            pending: Vec::new(),
            kill_requested: false,
            history: Default::default(),
            kill_reason: None,
            ahead: None,
        };
        let mut t = TaskTable::default();
        for (fw, id) in [("f2", "b"), ("f1", "z"), ("f2", "a"), ("f1", "a")] {
            assert!(t.insert(TaskKey::new(FrameworkId::new(fw), TaskId::new(id)), task(fw, id)).is_none());
        }
        let keys = |t: &TaskTable| t.values().map(Task::key).collect::<Vec<_>>();
        let k = |fw: &str, id: &str| TaskKey::new(FrameworkId::new(fw), TaskId::new(id));
        assert_eq!(keys(&t), vec![k("f1", "a"), k("f1", "z"), k("f2", "a"), k("f2", "b")]);
        let f2: Vec<_> = t.of_framework(&FrameworkId::new("f2")).map(Task::key).collect();
        assert_eq!(f2, vec![k("f2", "a"), k("f2", "b")]);
        assert!(t.insert(k("f1", "a"), task("f1", "a")).is_some(), "replaced");
        assert_eq!(t.len(), 4);
        for (fw, id) in [("f1", "a"), ("f1", "z")] {
            assert!(t.remove(&k(fw, id)).is_some());
        }
        assert!(t.remove(&k("f1", "a")).is_none());
        assert_eq!(t.of_framework(&FrameworkId::new("f1")).count(), 0);
        assert_eq!(keys(&t), vec![k("f2", "a"), k("f2", "b")]);
        assert!(t.contains_key(&k("f2", "b")) && t.get(&k("f2", "b")).is_some());
    }

    #[test]
    fn tables_walk_in_id_order_and_name_reused_slots_by_generation() {
        let mut t: Table<AgentId, u32> = Table::new();
        for (i, id) in ["b", "a10", "a9", "c"].into_iter().enumerate() {
            assert!(t.insert(AgentId::new(id), i as u32).is_none());
        }
        let walk = |t: &Table<AgentId, u32>| t.values().copied().collect::<Vec<_>>();
        assert_eq!(walk(&t), vec![1, 2, 0, 3]);
        t.refresh_order();
        assert_eq!(t.slots_in_order().map(|(_, v)| *v).collect::<Vec<_>>(), vec![1, 2, 0, 3]);
        let slot = t.slot(&AgentId::new("b")).expect("b");
        let generation = t.generation(slot);
        assert_eq!(t.remove(&AgentId::new("b")), Some(0));
        assert!(t.insert(AgentId::new("d"), 7).is_none());
        assert_eq!(t.slot(&AgentId::new("d")), Some(slot), "the freed slot is reused");
        assert!(t.at_generation_mut(slot, generation).is_none(), "but not under the old generation");
        assert_eq!(t.at_generation_mut(slot, t.generation(slot)).copied(), Some(7));
        assert_eq!(walk(&t), vec![1, 2, 3, 7]);
        assert_eq!(t.insert(AgentId::new("d"), 8), Some(7));
        assert_eq!((t.len(), t.get(&AgentId::new("d")).copied()), (4, Some(8)));
    }

    #[test]
    fn offers_are_found_by_number() {
        let mut o = Offers::default();
        let rec = |agent| OfferRecord { framework: 0, agent, resources: Resources::cpus(1) };
        for n in 1..=1000u64 {
            o.reserve(1);
            o.insert(n, rec(n as usize));
        }
        for n in (1..=1000u64).step_by(2) {
            assert_eq!(o.remove(&n).map(|r| r.agent), Some(n as usize));
        }
        o.reserve(10);
        o.insert(5000, rec(5000));
        assert_eq!(o.len(), 501);
        assert!(o.get(&1).is_none());
        assert_eq!(o.get(&2).map(|r| r.agent), Some(2));
        assert_eq!(o.get(&5000).map(|r| r.agent), Some(5000));
    }
}

/// The live tasks: a hash map for the per-update lookups (an ordered map of two strings that
/// share a framework-id prefix spent most of its time in `memcmp`), plus an ordered index so
/// that walks stay in `(framework, task)` order, as the core's messages and replies must be
/// deterministic.
#[derive(Debug, Default)]
pub(crate) struct TaskTable {
    map: FxHashMap<TaskKey, Task>,
    order: BTreeMap<FrameworkId, BTreeSet<TaskId>>,
}

impl TaskTable {
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn get(&self, key: &TaskKey) -> Option<&Task> {
        self.map.get(key)
    }

    pub(crate) fn get_mut(&mut self, key: &TaskKey) -> Option<&mut Task> {
        self.map.get_mut(key)
    }

    pub(crate) fn contains_key(&self, key: &TaskKey) -> bool {
        self.map.contains_key(key)
    }

    /// Adds or replaces a task; returns the one it replaced.
    pub(crate) fn insert(&mut self, key: TaskKey, task: Task) -> Option<Task> {
        self.order.entry(key.framework_id.clone()).or_default().insert(key.task_id.clone());
        self.map.insert(key, task)
    }

    pub(crate) fn remove(&mut self, key: &TaskKey) -> Option<Task> {
        let task = self.map.remove(key)?;
        if let Some(ids) = self.order.get_mut(&key.framework_id) {
            ids.remove(&key.task_id);
            if ids.is_empty() {
                self.order.remove(&key.framework_id);
            }
        }
        Some(task)
    }

    /// Every task, in `(framework, task id)` order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &Task> + '_ {
        self.order.iter().flat_map(move |(fw, ids)| ids.iter().filter_map(move |id| self.lookup(fw, id)))
    }

    /// One framework's tasks, in task id order.
    pub(crate) fn of_framework<'a>(&'a self, fw: &FrameworkId) -> impl Iterator<Item = &'a Task> + 'a {
        let fw = fw.clone();
        let ids = self.order.get(&fw);
        ids.into_iter().flat_map(move |ids| {
            let fw = fw.clone();
            ids.iter().filter_map(move |id| self.lookup(&fw, id))
        })
    }

    fn lookup(&self, fw: &FrameworkId, id: &TaskId) -> Option<&Task> {
        // The map is keyed by owned keys; this walk is off the per-update path.
        self.map.get(&TaskKey::new(fw.clone(), id.clone()))
    }
}
