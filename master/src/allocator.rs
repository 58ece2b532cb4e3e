//! Allocation modules: the policy that decides *which framework* is offered *how much* of the
//! agents' free resources. The [`core`](crate::core) owns the mechanism (agents, offers, decline
//! filters, tasks) and drives an [`Allocator`] through a small set of notifications; the
//! allocator only keeps what its policy needs.
//!
//! Contract between the core and an allocator:
//!
//! - A framework's *allocation* is everything it holds: resources of outstanding offers plus
//!   resources of its non-terminal tasks on reachable agents.
//! - [`Allocator::allocate`] returns decisions and records each returned allocation as held
//!   by its framework. Every later return of resources (declined, rescinded or unused offers,
//!   ended tasks, agents that became unreachable) is reported through [`Allocator::recover`];
//!   resources the framework gains without an offer (tasks adopted from a re-registering agent)
//!   through [`Allocator::allocated`].
//! - A decision may only hold unreserved resources and resources reserved for the framework's
//!   role, and must fit in the candidate's `available` (all decisions on one agent together).
//!   The core drops (and recovers) decisions that break this, and crumbs smaller than
//!   [`AllocatorOptions::min_allocatable`].
//! - Calls about frameworks the allocator does not know (e.g. removed ones) must be ignored.
//!
//! Allocators are created by name from a [`Registry`]: [`Registry::builtin`] is the one place
//! that lists the built-ins (`drf`, `priority`), and [`Registry::register`] adds more (see
//! `examples/binpack_allocator.rs`).

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use agora_sdk::proto::{AgentId, Demand, FrameworkId};
use agora_sdk::resources::{ResourceKinds, UNRESERVED_ROLE};
use agora_sdk::Resources;
use rustc_hash::FxHashMap;

use crate::quick;

mod budget;
mod options;
mod registry;
mod slab;

use budget::CycleBudget;
pub use budget::{MAX_CYCLE_TIME, MAX_GRANTS_PER_CYCLE};
pub use options::*;
pub use registry::*;
use slab::Slab;

/// An agent whose free, unoffered resources may be allocated in this cycle.
#[derive(Clone, Debug)]
pub struct Candidate<'a> {
    pub agent: &'a AgentId,
    /// Free resources nobody holds (never empty), with their reservation breakdown.
    pub available: Resources,
}

/// One decision: offer `resources` on `agent` to `framework`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub framework: FrameworkId,
    pub agent: AgentId,
    pub resources: Resources,
}

/// Whether `framework` may be offered `resources` on `agent` right now (the core's decline
/// filters and the framework's link). Allocators must skip a framework for which this returns
/// `false`.
pub type Eligibility<'a> = dyn Fn(&FrameworkId, &AgentId, &Resources) -> bool + 'a;

/// A pluggable allocation policy (weighted DRF, strict priority, bin packing, ...).
///
/// Only frameworks that are both *active* (connected) and not *suppressed* may receive
/// allocations. The core calls every method from one thread; implementations must be cheap:
/// [`allocate`](Allocator::allocate) runs every allocation interval over every candidate agent
/// (target: O(agents · log frameworks) per cycle).
pub trait Allocator: Send {
    /// The name this allocator is selected by (`--allocator NAME`).
    fn name(&self) -> &str;

    /// A framework subscribed (it starts active and unsuppressed).
    fn add_framework(&mut self, framework: &FrameworkId, role: &str);
    /// A framework is gone for good; forget its allocation.
    fn remove_framework(&mut self, framework: &FrameworkId);
    /// The framework is connected again.
    fn activate_framework(&mut self, framework: &FrameworkId);
    /// The framework disconnected (it keeps its allocation but gets no offers).
    fn deactivate_framework(&mut self, framework: &FrameworkId);
    /// No offers to this framework until [`revive`](Allocator::revive).
    fn suppress(&mut self, framework: &FrameworkId);
    /// Offers resume.
    fn revive(&mut self, framework: &FrameworkId);
    /// The framework's pending demand (replaces the previous one; empty: it wants nothing).
    /// Tasks offered against it count as served until the framework states it again.
    /// Allocators that do not size offers to demand may ignore it (the default).
    fn set_demand(&mut self, framework: &FrameworkId, demands: &[Demand]) {
        let _ = (framework, demands);
    }

    /// An agent joined the pool with these total resources.
    fn add_agent(&mut self, agent: &AgentId, total: &Resources);
    /// An agent left the pool (its tasks' resources were recovered before this call).
    fn remove_agent(&mut self, agent: &AgentId);

    /// `framework` now also holds `resources` on `agent` without an offer (adopted tasks).
    fn allocated(&mut self, framework: &FrameworkId, agent: &AgentId, resources: &Resources);
    /// `framework` no longer holds `resources` on `agent`.
    fn recover(&mut self, framework: &FrameworkId, agent: &AgentId, resources: &Resources);

    /// Decides who gets the candidates' resources. Each returned allocation is recorded as
    /// held by its framework. An agent may appear several times (slices for several
    /// frameworks); one framework at most once per agent.
    ///
    /// Without [`begin_cycle`](Allocator::begin_cycle), one call is one whole cycle. Between
    /// `begin_cycle` and [`end_cycle`](Allocator::end_cycle) (allocators that say they are
    /// [`sliced`](Allocator::sliced)), each call gets the next slice of the same cycle.
    fn allocate(
        &mut self,
        now: Instant,
        candidates: &[Candidate<'_>],
        eligible: &Eligibility<'_>,
    ) -> Vec<Allocation>;

    /// Whether the core may hand this allocator a cycle in slices: `begin_cycle`, then one
    /// [`allocate`](Allocator::allocate) call per slice of at most
    /// [`MasterConfig::allocation_slice`](crate::core::MasterConfig::allocation_slice) agents
    /// (the agents in the cycle's order, each in one slice only), with other events handled
    /// between the calls, then `end_cycle`. Decisions of a slice go out as offers before the
    /// next slice is asked for, so what the allocator keeps between calls (held resources,
    /// shares) is up to date with them.
    ///
    /// An allocator whose decisions compare all of a cycle's agents with one another (bin
    /// packing's fullest agent first, "one agent per framework per cycle") keeps the default,
    /// `false`: it is given the whole cycle in one call, and the core answers nobody for that
    /// long.
    fn sliced(&self) -> bool {
        false
    }

    /// A sliced cycle starts at `now` (only for [`sliced`](Allocator::sliced) allocators):
    /// state that must span the whole cycle rather than one call (rounds, budgets) starts
    /// here.
    fn begin_cycle(&mut self, now: Instant) {
        let _ = now;
    }

    /// The sliced cycle begun by [`begin_cycle`](Allocator::begin_cycle) is over.
    fn end_cycle(&mut self) {}

    /// Takes new options (an operator's `agora policy set`, or the policy the registry
    /// holds), in force from the next allocation. An allocator that cannot change its policy
    /// while running refuses, saying why.
    fn set_options(&mut self, options: &AllocatorOptions) -> Result<(), PolicyError> {
        let _ = options;
        Err(PolicyError::Fixed { allocator: self.name().to_string() })
    }
}

// ---------------------------------------------------------------------------------------------
// The hierarchical allocator (drf, priority)

/// A totally ordered share, so frameworks can be kept in a sorted set.
#[derive(Clone, Copy, Debug)]
struct Share(f64);

impl PartialEq for Share {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Share {}
impl PartialOrd for Share {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Share {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Place of a framework within its role: DRF (share, cycle of its last allocation,
/// subscription order, slot); priority (0, subscription order, subscription order, slot).
/// Plain numbers, so that keeping the order costs no allocation and no string comparison (the
/// subscription order is unique: the slot never decides, it only names the framework).
type FwKey = (Share, u64, u64, usize);
/// Place of a role: (weighted share or minus priority, name, slot). Names are unique among
/// live roles, so the slot never decides either.
type RoleKey = (Share, Arc<str>, usize);

/// How roles and frameworks are ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Policy {
    /// Lowest weighted dominant share first (roles), then lowest dominant share (frameworks
    /// within a role); ties by role name, then the framework allocated least recently (so
    /// frameworks that decline everything take turns), then subscription order.
    Drf,
    /// Highest role priority first (ties by role name), then frameworks in subscription
    /// order (first come, first served).
    Priority,
}

#[derive(Debug)]
struct Fw {
    id: FrameworkId,
    /// Slot of its role in `roles`.
    role: usize,
    seq: u64,
    /// The allocation cycle in which it was last given something (0: never).
    last_round: u64,
    /// Scalar part of everything it holds (no ports, no breakdown).
    allocated: Resources,
    active: bool,
    suppressed: bool,
    /// Pending demand not yet offered: `None` when never stated (whole agents).
    demand: Option<Vec<(Resources, u32)>>,
    /// `Some(key)` exactly when it is in its role's `order` under that key.
    key: Option<FwKey>,
}

impl Fw {
    fn offerable(&self) -> bool {
        self.active && !self.suppressed && self.demand.as_ref().is_none_or(|d| d.iter().any(|(_, n)| *n > 0))
    }
}

#[derive(Debug)]
struct RoleState {
    name: Arc<str>,
    /// Sum of its frameworks' allocations (scalar part).
    allocated: Resources,
    /// Offerable frameworks in policy order.
    order: BTreeSet<FwKey>,
    /// Members, offerable or not.
    members: usize,
    key: Option<RoleKey>,
}

/// The built-in allocators: hierarchical (roles, then frameworks within a role) with quota
/// guarantees and limits, reservations, demand-aware slicing and minimum allocatable
/// resources; ordered by weighted DRF (`drf`) or strict priority (`priority`).
///
/// Per cycle, for every candidate agent in turn:
/// 1. roles whose quota guarantee is not met pick first, up to the guarantee;
/// 2. then every role in policy order, frameworks within it in policy order; the first
///    eligible framework that can use the agent gets either the whole of what it may have
///    (no stated demand: Mesos's behaviour) or one task of its demand, after which the order
///    is updated and the next pick happens on what is left (DRF progressive filling);
///
/// never beyond a role's limit, and never eating into the headroom that unmet guarantees need.
/// Port ranges are left out of the shares.
///
/// Frameworks and roles live in slots (ids are hashed once per notification, never in the
/// cycle's inner loop); a grant re-keys the framework in its role's order and the role in the
/// role order, both `BTreeSet`s of plain numbers.
#[derive(Debug)]
pub struct HierarchicalAllocator {
    policy: Policy,
    options: AllocatorOptions,
    agents: FxHashMap<AgentId, Resources>,
    total: Resources,
    frameworks: Slab<Fw>,
    /// Slot of each framework by id.
    framework_slots: FxHashMap<FrameworkId, usize>,
    roles: Slab<RoleState>,
    /// Slot of each role by name.
    role_slots: FxHashMap<String, usize>,
    /// Roles with at least one offerable framework, in policy order.
    role_order: BTreeSet<RoleKey>,
    /// The total changed since the DRF keys were computed.
    stale: bool,
    next_seq: u64,
    /// Allocation cycles run so far.
    round: u64,
    /// Per-agent working lists of `fill_agent`, kept between agents and cycles.
    scratch: Scratch,
    /// What is left of this cycle's budget.
    budget: CycleBudget,
    /// Between `begin_cycle` and `end_cycle`: `allocate` calls are slices of one cycle (one
    /// round, one grant budget) rather than a cycle each.
    in_cycle: bool,
}

/// Working lists of one agent's filling (reused: no allocation per agent).
#[derive(Debug, Default)]
struct Scratch {
    /// Framework slots that cannot use this agent any more this cycle.
    skip_fw: Vec<usize>,
    /// Role slots that cannot use this agent any more this cycle.
    skip_role: Vec<usize>,
    /// (framework slot, index in `out`) of this agent's allocations so far.
    given: Vec<(usize, usize)>,
}

/// The DRF allocator (kept as the name existing code uses).
pub type DrfAllocator = HierarchicalAllocator;

/// The part of `r` that takes part in shares and quotas (no ports, no breakdown).
fn scalar_part(r: &Resources) -> Resources {
    if r.ports.is_empty() && r.reserved.is_empty() {
        return r.clone();
    }
    Resources { ports: Vec::new(), reserved: BTreeMap::new(), ..r.clone() }
}

/// [`scalar_part`] without a copy when `r` has no ports and no breakdown (the common case).
fn scalar_part_cow(r: &Resources) -> Cow<'_, Resources> {
    if r.ports.is_empty() && r.reserved.is_empty() {
        Cow::Borrowed(r)
    } else {
        Cow::Owned(scalar_part(r))
    }
}

/// What a pick gives.
enum Grant {
    /// Everything the framework may have here (no stated demand).
    Whole(Resources),
    /// One task of demand entry `index`.
    Slice(Resources, usize),
}

impl Default for HierarchicalAllocator {
    fn default() -> Self {
        Self::drf(&AllocatorOptions::default())
    }
}

impl HierarchicalAllocator {
    /// Name of the weighted DRF variant.
    pub const DRF: &'static str = "drf";
    /// Name of the strict priority variant.
    pub const PRIORITY: &'static str = "priority";
    /// Kept for existing callers: [`Self::DRF`].
    pub const NAME: &'static str = Self::DRF;

    fn with_policy(policy: Policy, options: &AllocatorOptions) -> Self {
        HierarchicalAllocator {
            policy,
            options: options.clone(),
            agents: FxHashMap::default(),
            total: Resources::default(),
            frameworks: Slab::default(),
            framework_slots: FxHashMap::default(),
            roles: Slab::default(),
            role_slots: FxHashMap::default(),
            role_order: BTreeSet::new(),
            stale: false,
            next_seq: 0,
            round: 0,
            scratch: Scratch::default(),
            budget: CycleBudget::default(),
            in_cycle: false,
        }
    }

    /// Plain DRF (every role weighs 1, no quotas).
    pub fn new() -> Self {
        Self::default()
    }

    /// Hierarchical weighted DRF with these options.
    pub fn drf(options: &AllocatorOptions) -> Self {
        Self::with_policy(Policy::Drf, options)
    }

    /// Weighted DRF with these role weights.
    pub fn with_weights(weights: BTreeMap<String, f64>) -> Self {
        Self::drf(&AllocatorOptions { role_weights: weights, ..AllocatorOptions::default() })
    }

    /// Strict priority with these options.
    pub fn priority(options: &AllocatorOptions) -> Self {
        Self::with_policy(Policy::Priority, options)
    }

    /// Sets one role's weight (effective from the next allocation).
    ///
    /// (See also [`Allocator::set_options`], which replaces the whole policy.)
    pub fn set_weight(&mut self, role: &str, weight: f64) {
        self.options.role_weights.insert(role.to_string(), weight);
        self.stale = true;
    }

    /// The dominant share of a framework within its role, if known (for tests and
    /// observability).
    pub fn share(&self, framework: &FrameworkId) -> Option<f64> {
        self.fw(framework).map(|(_, f)| f.allocated.dominant_share(&self.total))
    }

    /// The weighted dominant share of a role (0 for an unknown role).
    pub fn role_share(&self, role: &str) -> f64 {
        self.role(role).map_or(0.0, |r| r.allocated.dominant_share(&self.total) / self.weight(role))
    }

    fn fw(&self, id: &FrameworkId) -> Option<(usize, &Fw)> {
        let slot = *self.framework_slots.get(id)?;
        self.frameworks.get(slot).map(|f| (slot, f))
    }

    fn role(&self, name: &str) -> Option<&RoleState> {
        self.role_slots.get(name).and_then(|i| self.roles.get(*i))
    }

    fn weight(&self, role: &str) -> f64 {
        match self.options.role_weights.get(role) {
            Some(w) if w.is_finite() && *w > 0.0 => *w,
            _ => 1.0,
        }
    }

    fn fw_key(&self, slot: usize, f: &Fw) -> FwKey {
        match self.policy {
            Policy::Drf => (Share(f.allocated.dominant_share(&self.total)), f.last_round, f.seq, slot),
            Policy::Priority => (Share(0.0), f.seq, f.seq, slot),
        }
    }

    fn role_primary(&self, r: &RoleState) -> Share {
        Share(match self.policy {
            Policy::Drf => {
                let share = r.allocated.dominant_share(&self.total);
                if self.options.role_weights.is_empty() {
                    share
                } else {
                    share / self.weight(&r.name)
                }
            }
            Policy::Priority => -(self.options.role_priorities.get(&*r.name).copied().unwrap_or(0) as f64),
        })
    }

    /// Puts a framework at its right place in its role's order (or out of it), then the role.
    /// Returns whether it moved (and the role was re-keyed).
    fn rekey(&mut self, slot: usize) -> bool {
        let Some(f) = self.frameworks.get(slot) else { return false };
        let new_key = f.offerable().then(|| self.fw_key(slot, f));
        let moved = new_key != f.key;
        if moved {
            let role = f.role;
            let old_key = f.key;
            if let Some(r) = self.roles.get_mut(role) {
                if let Some(k) = &old_key {
                    r.order.remove(k);
                }
                if let Some(k) = new_key {
                    r.order.insert(k);
                }
            }
            if let Some(f) = self.frameworks.get_mut(slot) {
                f.key = new_key;
            }
            self.rekey_role(role);
        }
        moved
    }

    fn rekey_role(&mut self, slot: usize) {
        let Some(r) = self.roles.get(slot) else { return };
        let primary = (!r.order.is_empty()).then(|| self.role_primary(r));
        if primary == r.key.as_ref().map(|k| k.0) {
            return;
        }
        let new_key = primary.map(|p| (p, r.name.clone(), slot));
        if let Some(k) = &r.key {
            self.role_order.remove(k);
        }
        if let Some(k) = &new_key {
            self.role_order.insert(k.clone());
        }
        if let Some(r) = self.roles.get_mut(slot) {
            r.key = new_key;
        }
    }

    fn rebuild(&mut self) {
        let slots: Vec<usize> = self.frameworks.iter().map(|(i, _)| i).collect();
        for slot in slots {
            self.rekey(slot);
        }
        let roles: Vec<usize> = self.roles.iter().map(|(i, _)| i).collect();
        for r in roles {
            self.rekey_role(r);
        }
        self.stale = false;
    }

    fn update(&mut self, id: &FrameworkId, change: impl FnOnce(&mut Fw)) {
        let Some(&slot) = self.framework_slots.get(id) else { return };
        if let Some(f) = self.frameworks.get_mut(slot) {
            change(f);
            self.rekey(slot);
        }
    }

    /// Adds (or with `negative`, removes) `r` to a framework's and its role's allocation.
    fn account(&mut self, slot: usize, r: &Resources, negative: bool) {
        let r = scalar_part_cow(r);
        let r = r.as_ref();
        let Some(f) = self.frameworks.get_mut(slot) else { return };
        let apply = |a: &mut Resources| {
            if negative {
                quick::sub_assign(a, r);
            } else {
                quick::add_assign(a, r);
            }
        };
        apply(&mut f.allocated);
        let role = f.role;
        if let Some(rs) = self.roles.get_mut(role) {
            apply(&mut rs.allocated);
        }
        if self.policy == Policy::Drf && !self.rekey(slot) {
            self.rekey_role(role);
        }
    }

    /// The quota guarantee a role still misses (named kinds only), if any.
    fn shortfall(&self, role: &str) -> Option<Resources> {
        let g = self.options.quota_guarantees.get(role)?;
        let have = self.role(role).map(|r| &r.allocated);
        let missing = match have {
            Some(h) => g.saturating_sub(h),
            None => g.clone(),
        };
        (!missing.is_empty()).then_some(missing)
    }

    /// What a role may still get under its limit (named kinds only).
    fn limit_headroom(&self, role: &str) -> Option<(Resources, ResourceKinds)> {
        let l = self.options.quota_limits.get(role)?;
        let have = self.role(role).map(|r| r.allocated.clone()).unwrap_or_default();
        Some((l.saturating_sub(&have), l.kinds()))
    }
}

/// Working state of one cycle's quota bookkeeping.
struct QuotaCycle {
    /// Kinds named by some guarantee.
    kinds: ResourceKinds,
    /// Unmet guarantees per role.
    shortfall: BTreeMap<String, Resources>,
    /// Sum of the unmet guarantees.
    need: Resources,
    /// Sum of the candidates' free resources (scalar part).
    free: Resources,
}

impl QuotaCycle {
    /// The most a role may take (on guarantee kinds) without eating into other roles'
    /// unmet guarantees: its own shortfall plus the surplus of free over need.
    fn cap(&self, role: &str) -> Resources {
        let surplus = self.free.saturating_sub(&self.need);
        match self.shortfall.get(role) {
            Some(s) => surplus.add(s),
            None => surplus,
        }
    }

    fn take(&mut self, role: &str, given: &Resources) {
        // `free` counts unreserved resources only; reserved ones count towards the guarantee.
        self.free = self.free.saturating_sub(&scalar_part(&given.unreserved()));
        let given = scalar_part(given);
        if let Some(s) = self.shortfall.get_mut(role) {
            let before = s.clone();
            *s = s.saturating_sub(&given);
            let met = before.saturating_sub(s);
            self.need = self.need.saturating_sub(&met);
            if s.is_empty() {
                self.shortfall.remove(role);
            }
        }
    }
}

fn union_kinds(a: &mut ResourceKinds, b: &ResourceKinds) {
    a.cpus |= b.cpus;
    a.mem |= b.mem;
    a.disk |= b.disk;
    for s in &b.scalars {
        if !a.scalars.contains(s) {
            a.scalars.push(s.clone());
        }
    }
}

impl HierarchicalAllocator {
    /// What framework `f` of `role` can be given out of `usable` (already restricted to
    /// its role and caps), or `None` when it can use nothing of it.
    fn grant_for(&self, f: &Fw, role: &str, usable: &Resources) -> Option<Grant> {
        match &f.demand {
            None => {
                is_allocatable(usable, &self.options.min_allocatable).then(|| Grant::Whole(usable.clone()))
            }
            Some(d) => d.iter().enumerate().filter(|(_, (_, n))| *n > 0).find_map(|(i, (shape, _))| {
                usable.take_for_role(role, shape).map(|slice| Grant::Slice(slice, i))
            }),
        }
    }

    /// Restricts `remaining` to what role `role` may get now: its reservations and the
    /// unreserved part, capped by its limit and (when quotas are in force) by the headroom
    /// other roles' guarantees need; in the guarantee stage, also by its own shortfall.
    fn usable_for(
        &self,
        role: &str,
        remaining: &Resources,
        quota: Option<&QuotaCycle>,
        guarantee_stage: bool,
    ) -> Resources {
        let mut usable = remaining.for_role(role);
        if let Some((head, kinds)) = self.limit_headroom(role) {
            usable = usable.capped_by(&head, &kinds);
        }
        if let Some(q) = quota {
            if guarantee_stage {
                // Up to the guarantee on every kind it names (a kind already met is capped at
                // zero here and comes in the fair-share stage).
                if let (Some(s), Some(g)) = (q.shortfall.get(role), self.options.quota_guarantees.get(role)) {
                    usable = usable.capped_by(s, &g.kinds());
                }
            } else {
                // Reservations are the role's own: only its unreserved take counts here.
                let own = usable.reserved_for(role);
                usable = usable.capped_by(&q.cap(role).add(&own), &q.kinds);
            }
        }
        usable
    }

    /// Fills one agent: repeatedly picks the first eligible framework in policy order that can
    /// use what is left, until nobody can.
    fn fill_agent(
        &mut self,
        agent: &AgentId,
        remaining: &mut Resources,
        eligible: &Eligibility<'_>,
        mut quota: Option<&mut QuotaCycle>,
        guarantee_stage: bool,
        out: &mut Vec<Allocation>,
    ) {
        // Frameworks and roles that cannot use this agent any more this cycle: what is left
        // only shrinks, so a filter that hides it or a demand that does not fit stays so.
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.skip_fw.clear();
        scratch.skip_role.clear();
        scratch.given.clear();
        while !self.budget.exhausted && is_allocatable(remaining, &self.options.min_allocatable) {
            let mut pick: Option<(usize, usize, Grant)> = None;
            'roles: for (_, name, ri) in &self.role_order {
                let ri = *ri;
                if scratch.skip_role.contains(&ri) {
                    continue;
                }
                if guarantee_stage && quota.as_ref().is_none_or(|q| !q.shortfall.contains_key(&**name)) {
                    continue;
                }
                let Some(rs) = self.roles.get(ri) else { continue };
                let usable = self.usable_for(name, remaining, quota.as_deref(), guarantee_stage);
                if usable.is_empty() {
                    scratch.skip_role.push(ri);
                    continue;
                }
                for (_, _, _, slot) in &rs.order {
                    let slot = *slot;
                    if scratch.skip_fw.contains(&slot) {
                        continue;
                    }
                    let Some(f) = self.frameworks.get(slot) else { continue };
                    if !eligible(&f.id, agent, &usable) {
                        scratch.skip_fw.push(slot);
                        continue;
                    }
                    match self.grant_for(f, name, &usable) {
                        Some(g) => {
                            pick = Some((slot, ri, g));
                            break 'roles;
                        }
                        None => scratch.skip_fw.push(slot),
                    }
                }
                scratch.skip_role.push(ri);
            }
            let Some((slot, ri, grant)) = pick else { break };
            if !self.budget.spend() {
                break;
            }
            let sliced = matches!(grant, Grant::Slice(..));
            let given = match grant {
                Grant::Whole(r) => {
                    // Nothing more for this framework here.
                    scratch.skip_fw.push(slot);
                    r
                }
                Grant::Slice(r, i) => {
                    if let Some(Some(d)) = self.frameworks.get_mut(slot).map(|f| f.demand.as_mut()) {
                        if let Some(e) = d.get_mut(i) {
                            e.1 = e.1.saturating_sub(1);
                        }
                    }
                    r
                }
            };
            quick::sub_assign(remaining, &given);
            if let Some(f) = self.frameworks.get_mut(slot) {
                f.last_round = self.round;
            }
            if let Some(q) = quota.as_deref_mut() {
                if let Some(rs) = self.roles.get(ri) {
                    q.take(&rs.name, &given);
                }
            }
            self.account(slot, &given, false);
            if sliced || self.policy != Policy::Drf {
                // A framework whose demand is now all offered leaves the order (DRF re-keyed
                // it in `account` already).
                self.rekey(slot);
            }
            match scratch.given.iter().find(|(s, _)| *s == slot) {
                Some((_, i)) => out[*i].resources.add_assign(&given),
                None => {
                    let Some(f) = self.frameworks.get(slot) else { continue };
                    scratch.given.push((slot, out.len()));
                    out.push(Allocation { framework: f.id.clone(), agent: agent.clone(), resources: given });
                }
            }
        }
        self.scratch = scratch;
    }
}

impl Allocator for HierarchicalAllocator {
    fn name(&self) -> &str {
        match self.policy {
            Policy::Drf => Self::DRF,
            Policy::Priority => Self::PRIORITY,
        }
    }

    fn set_options(&mut self, options: &AllocatorOptions) -> Result<(), PolicyError> {
        self.options = options.clone();
        self.stale = true;
        Ok(())
    }

    // Sliced: shares, orders and demands live here between calls and are re-keyed at every
    // grant, so slice after slice decides as one call over all of them would, except for
    // quotas: the headroom kept for unmet guarantees is reckoned on the slice's free
    // resources (not the cycle's), which can only keep more for them, never less.
    fn sliced(&self) -> bool {
        true
    }

    fn begin_cycle(&mut self, _now: Instant) {
        // One round for the whole cycle: frameworks served in different slices tie as they
        // would have in one call.
        self.in_cycle = true;
        self.round += 1;
        self.budget.start();
    }

    fn end_cycle(&mut self) {
        self.in_cycle = false;
    }

    fn add_framework(&mut self, framework: &FrameworkId, role: &str) {
        if self.framework_slots.contains_key(framework) {
            return;
        }
        self.next_seq += 1;
        let role_slot = match self.role_slots.get(role) {
            Some(r) => *r,
            None => {
                let r = self.roles.insert(RoleState {
                    name: Arc::from(role),
                    allocated: Resources::default(),
                    order: BTreeSet::new(),
                    members: 0,
                    key: None,
                });
                self.role_slots.insert(role.to_string(), r);
                r
            }
        };
        if let Some(r) = self.roles.get_mut(role_slot) {
            r.members += 1;
        }
        let slot = self.frameworks.insert(Fw {
            id: framework.clone(),
            role: role_slot,
            seq: self.next_seq,
            last_round: 0,
            allocated: Resources::default(),
            active: true,
            suppressed: false,
            demand: None,
            key: None,
        });
        self.framework_slots.insert(framework.clone(), slot);
        self.rekey(slot);
    }

    fn remove_framework(&mut self, framework: &FrameworkId) {
        let Some(slot) = self.framework_slots.remove(framework) else { return };
        let Some(f) = self.frameworks.remove(slot) else { return };
        let mut empty = false;
        if let Some(r) = self.roles.get_mut(f.role) {
            if let Some(k) = &f.key {
                r.order.remove(k);
            }
            r.allocated = r.allocated.saturating_sub(&f.allocated);
            r.members = r.members.saturating_sub(1);
            empty = r.members == 0;
        }
        if empty {
            if let Some(r) = self.roles.remove(f.role) {
                self.role_slots.remove(&*r.name);
                if let Some(k) = r.key {
                    self.role_order.remove(&k);
                }
            }
        } else {
            self.rekey_role(f.role);
        }
    }

    fn activate_framework(&mut self, framework: &FrameworkId) {
        self.update(framework, |f| f.active = true);
    }

    fn deactivate_framework(&mut self, framework: &FrameworkId) {
        self.update(framework, |f| f.active = false);
    }

    fn suppress(&mut self, framework: &FrameworkId) {
        self.update(framework, |f| f.suppressed = true);
    }

    fn revive(&mut self, framework: &FrameworkId) {
        self.update(framework, |f| f.suppressed = false);
    }

    fn set_demand(&mut self, framework: &FrameworkId, demands: &[Demand]) {
        let d: Vec<(Resources, u32)> = demands
            .iter()
            .filter(|d| d.count > 0 && !d.resources.is_empty())
            .map(|d| (d.resources.flatten(), d.count))
            .collect();
        self.update(framework, |f| f.demand = Some(d));
    }

    fn add_agent(&mut self, agent: &AgentId, total: &Resources) {
        let total = scalar_part(total);
        if let Some(old) = self.agents.insert(agent.clone(), total.clone()) {
            self.total = self.total.saturating_sub(&old);
        }
        self.total.add_assign(&total);
        self.stale = true;
    }

    fn remove_agent(&mut self, agent: &AgentId) {
        if let Some(old) = self.agents.remove(agent) {
            self.total = self.total.saturating_sub(&old);
            self.stale = true;
        }
    }

    fn allocated(&mut self, framework: &FrameworkId, _agent: &AgentId, resources: &Resources) {
        if let Some(&slot) = self.framework_slots.get(framework) {
            self.account(slot, resources, false);
        }
    }

    fn recover(&mut self, framework: &FrameworkId, _agent: &AgentId, resources: &Resources) {
        if let Some(&slot) = self.framework_slots.get(framework) {
            self.account(slot, resources, true);
        }
    }

    fn allocate(
        &mut self,
        _now: Instant,
        candidates: &[Candidate<'_>],
        eligible: &Eligibility<'_>,
    ) -> Vec<Allocation> {
        if self.stale {
            self.rebuild();
        }
        if self.in_cycle {
            self.budget.start_slice();
        } else {
            self.round += 1;
            self.budget.start();
        }
        let mut out = Vec::new();
        if self.role_order.is_empty() {
            return out;
        }
        out.reserve(candidates.len());
        // Quota bookkeeping only when some guarantee is unmet.
        let mut quota = None;
        let shortfall: BTreeMap<String, Resources> = self
            .options
            .quota_guarantees
            .keys()
            .filter_map(|role| self.shortfall(role).map(|s| (role.clone(), s)))
            .collect();
        if !shortfall.is_empty() {
            let mut kinds = ResourceKinds::default();
            let mut need = Resources::default();
            for s in shortfall.values() {
                union_kinds(&mut kinds, &s.kinds());
                need.add_assign(s);
            }
            let mut free = Resources::default();
            for c in candidates {
                free.add_assign(&scalar_part(&c.available.unreserved()));
            }
            quota = Some(QuotaCycle { kinds, shortfall, need, free });
        }
        let mut remaining: Vec<Resources> = Vec::new();
        if let Some(q) = quota.as_mut() {
            remaining = candidates.iter().map(|c| c.available.clone()).collect();
            for (c, rem) in candidates.iter().zip(remaining.iter_mut()) {
                if q.shortfall.is_empty() {
                    break;
                }
                self.fill_agent(c.agent, rem, eligible, Some(q), true, &mut out);
            }
        }
        for (i, c) in candidates.iter().enumerate() {
            let q = quota.as_mut().filter(|q| !q.shortfall.is_empty());
            match remaining.get_mut(i) {
                Some(rem) => self.fill_agent(c.agent, rem, eligible, q, false, &mut out),
                None => {
                    let mut rem = c.available.clone();
                    self.fill_agent(c.agent, &mut rem, eligible, q, false, &mut out);
                }
            }
        }
        // One allocation per framework and agent (the guarantee stage may have given some).
        if quota.is_some() {
            let mut merged: Vec<Allocation> = Vec::with_capacity(out.len());
            let mut index: FxHashMap<(FrameworkId, AgentId), usize> = FxHashMap::default();
            for a in out {
                match index.get(&(a.framework.clone(), a.agent.clone())) {
                    Some(i) => merged[*i].resources.add_assign(&a.resources),
                    None => {
                        index.insert((a.framework.clone(), a.agent.clone()), merged.len());
                        merged.push(a);
                    }
                }
            }
            out = merged;
        }
        out
    }
}

/// Whether resources of `r` may go to a framework of `role` (only its own reservations).
pub fn fits_role(r: &Resources, role: &str) -> bool {
    r.reserved.keys().all(|k| k == role && role != UNRESERVED_ROLE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(s: &str) -> Resources {
        Resources::parse(s).expect("test resources")
    }

    fn fw(s: &str) -> FrameworkId {
        FrameworkId::new(s)
    }

    fn ag(s: &str) -> AgentId {
        AgentId::new(s)
    }

    fn run(a: &mut dyn Allocator, agents: &[(AgentId, Resources)]) -> Vec<(String, String)> {
        let candidates: Vec<Candidate<'_>> =
            agents.iter().map(|(id, r)| Candidate { agent: id, available: r.clone() }).collect();
        a.allocate(Instant::now(), &candidates, &|_, _, _| true)
            .into_iter()
            .map(|d| (d.framework.0, d.agent.0))
            .collect()
    }

    #[test]
    fn registry_knows_the_builtins_and_takes_more() {
        let a = by_name("drf").expect("drf exists");
        assert_eq!(a.name(), "drf");
        assert_eq!(by_name("priority").expect("priority exists").name(), "priority");
        assert!(by_name("nope").is_none());
        assert!(by_name_with("drf", &AllocatorOptions::default()).is_some());
        assert_eq!(names(), vec!["drf", "priority"]);
        let mut r = Registry::builtin();
        assert_eq!(r.names(), vec!["drf", "priority"]);
        assert_eq!(
            r.register("drf", |o| Box::new(HierarchicalAllocator::drf(o))),
            Err(RegistryError::Duplicate("drf".into()))
        );
        assert!(r.register("bad name", |o| Box::new(HierarchicalAllocator::drf(o))).is_err());
        r.register("fifo", |o| Box::new(HierarchicalAllocator::priority(o))).expect("register");
        assert_eq!(
            r.create("fifo", &AllocatorOptions::default()).map(|a| a.name().to_string()),
            Ok("priority".into())
        );
        let e =
            r.create("nope", &AllocatorOptions::default()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("nope") && e.contains("drf, fifo, priority"), "{e}");
    }

    #[test]
    fn option_parsers_name_the_bad_value() {
        assert_eq!(parse_weights("analytics=2,web=1").expect("ok")["analytics"], 2.0);
        let e = parse_weights("analytics=x").unwrap_err().to_string();
        assert_eq!(e, "invalid weight `x` for role analytics: a positive number");
        assert!(parse_weights("analytics=0").is_err());
        assert!(parse_weights("analytics").unwrap_err().to_string().contains("ROLE=VALUE"));
        assert!(parse_weights("a=1,a=2").unwrap_err().to_string().contains("twice"));
        assert_eq!(parse_priorities("a=10,b=-1").expect("ok")["b"], -1);
        assert!(parse_priorities("a=high").unwrap_err().to_string().contains("`high` for role a"));
        let (role, r) = parse_role_resources("--quota", "analytics=cpus:4;mem:8GiB").expect("ok");
        assert_eq!((role.as_str(), r.cpus), ("analytics", 4000));
        let e = parse_role_resources("--quota", "analytics=cpus:x").unwrap_err().to_string();
        assert!(e.contains("--quota") && e.contains("analytics") && e.contains("cpus:x"), "{e}");
        assert!(parse_role_resources("--quota-limit", "a=cpus(a):1").is_err());
        assert_eq!(parse_min_allocatable("cpus:0.01|mem:32MiB").expect("ok").len(), 2);
        assert!(parse_min_allocatable("cpus:0").is_err());
        assert!(is_allocatable(&res("mem:1GiB"), &parse_min_allocatable("cpus:0.01|mem:32MiB").expect("ok")));
        assert!(!is_allocatable(&res("mem:1GiB"), &parse_min_allocatable("cpus:0.01").expect("ok")));
        assert!(!is_allocatable(&Resources::default(), &[]));
    }

    #[test]
    fn lowest_dominant_share_wins_and_ties_go_by_arrival() {
        let mut a = DrfAllocator::new();
        a.add_agent(&ag("a1"), &res("cpus:10;mem:10GiB"));
        a.add_agent(&ag("a2"), &res("cpus:10;mem:10GiB"));
        a.add_framework(&fw("f1"), "*");
        a.add_framework(&fw("f2"), "*");
        // Equal shares: ties go to the first subscribed, then the other one is lower.
        let got = run(&mut a, &[(ag("a1"), res("cpus:1")), (ag("a2"), res("cpus:1"))]);
        assert_eq!(got, vec![("f1".into(), "a1".into()), ("f2".into(), "a2".into())]);
        // f1 now uses more memory (dominant): f2 gets the next one.
        a.allocated(&fw("f1"), &ag("a1"), &res("mem:5GiB"));
        let got = run(&mut a, &[(ag("a2"), res("cpus:1"))]);
        assert_eq!(got, vec![("f2".into(), "a2".into())]);
        assert!(a.share(&fw("f1")).is_some_and(|s| (s - 0.25).abs() < 1e-9));
    }

    #[test]
    fn inactive_suppressed_and_filtered_frameworks_are_skipped() {
        let mut a = DrfAllocator::new();
        a.add_agent(&ag("a1"), &res("cpus:4"));
        a.add_framework(&fw("f1"), "*");
        a.add_framework(&fw("f2"), "*");
        a.add_framework(&fw("f3"), "*");
        a.deactivate_framework(&fw("f1"));
        a.suppress(&fw("f2"));
        let cands = [Candidate { agent: &ag("a1"), available: res("cpus:4") }];
        let out = a.allocate(Instant::now(), &cands, &|f, _, _| f.as_str() != "f3");
        assert!(out.is_empty(), "{out:?}");
        a.revive(&fw("f2"));
        let out = a.allocate(Instant::now(), &cands, &|_, _, _| true);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].framework, fw("f2"));
        a.activate_framework(&fw("f1"));
        a.recover(&fw("f2"), &ag("a1"), &res("cpus:4"));
        a.allocated(&fw("f2"), &ag("a1"), &res("cpus:1"));
        let out = a.allocate(Instant::now(), &cands, &|_, _, _| true);
        assert_eq!(out[0].framework, fw("f1"));
    }

    #[test]
    fn roles_come_first_then_frameworks_within_them() {
        let mut a = DrfAllocator::new();
        a.add_agent(&ag("a1"), &res("cpus:12"));
        // Role x has two frameworks with 2 CPUs each (role share 4/12); role y one with 3.
        a.add_framework(&fw("x1"), "x");
        a.add_framework(&fw("x2"), "x");
        a.add_framework(&fw("y1"), "y");
        a.allocated(&fw("x1"), &ag("a1"), &res("cpus:2"));
        a.allocated(&fw("x2"), &ag("a1"), &res("cpus:2"));
        a.allocated(&fw("y1"), &ag("a1"), &res("cpus:3"));
        // Flat DRF would pick x1 (2 < 3); hierarchical picks role y (3 < 4).
        let got = run(&mut a, &[(ag("a1"), res("cpus:1"))]);
        assert_eq!(got, vec![("y1".into(), "a1".into())]);
        assert!((a.role_share("x") - 4.0 / 12.0).abs() < 1e-9);
    }

    #[test]
    fn role_weights_scale_shares() {
        let mut weights = BTreeMap::new();
        weights.insert("heavy".to_string(), 3.0);
        weights.insert("broken".to_string(), f64::NAN);
        let mut a = DrfAllocator::with_weights(weights);
        a.add_agent(&ag("a1"), &res("cpus:12"));
        a.add_framework(&fw("f-light"), "*");
        a.add_framework(&fw("f-heavy"), "heavy");
        a.add_framework(&fw("f-broken"), "broken");
        a.allocated(&fw("f-light"), &ag("a1"), &res("cpus:2"));
        a.allocated(&fw("f-heavy"), &ag("a1"), &res("cpus:3"));
        a.allocated(&fw("f-broken"), &ag("a1"), &res("cpus:2.5"));
        // light 2/12, heavy 3/12/3 = 1/12, broken weighs 1: 2.5/12.
        let got = run(&mut a, &[(ag("a1"), res("cpus:1"))]);
        assert_eq!(got, vec![("f-heavy".into(), "a1".into())]);
        a.set_weight("heavy", 1.0);
        let got = run(&mut a, &[(ag("a1"), res("cpus:1"))]);
        assert_eq!(got, vec![("f-light".into(), "a1".into())]);
    }

    #[test]
    fn priority_serves_roles_by_priority_then_frameworks_in_arrival_order() {
        let opts = AllocatorOptions {
            role_priorities: [("high".to_string(), 10), ("low".to_string(), 1)].into_iter().collect(),
            ..AllocatorOptions::default()
        };
        let mut a = HierarchicalAllocator::priority(&opts);
        a.add_agent(&ag("a1"), &res("cpus:8"));
        a.add_framework(&fw("z-low"), "low");
        a.add_framework(&fw("h2"), "high");
        a.add_framework(&fw("h1"), "high");
        a.allocated(&fw("h2"), &ag("a1"), &res("cpus:6"));
        // h2 came first within "high" and keeps its place whatever it holds.
        let got = run(&mut a, &[(ag("a1"), res("cpus:1")), (ag("a2"), res("cpus:1"))]);
        assert_eq!(got, vec![("h2".into(), "a1".into()), ("h2".into(), "a2".into())]);
        a.suppress(&fw("h2"));
        let got = run(&mut a, &[(ag("a1"), res("cpus:1"))]);
        assert_eq!(got, vec![("h1".into(), "a1".into())]);
        a.suppress(&fw("h1"));
        let got = run(&mut a, &[(ag("a1"), res("cpus:1"))]);
        assert_eq!(got, vec![("z-low".into(), "a1".into())]);
    }

    #[test]
    fn a_hostile_demand_cannot_hold_the_cycle() {
        // `Request {mem: 1 byte, count: u32::MAX}` with no minimum allocatable: before the
        // budget, one grant per byte of the agent (billions of iterations in one cycle).
        let mut a = HierarchicalAllocator::new();
        a.add_framework(&fw("A"), "*");
        let agents = [(ag("a1"), res("cpus:4;mem:1TiB"))];
        for (id, r) in &agents {
            a.add_agent(id, r);
        }
        a.set_demand(&fw("A"), &[Demand { resources: res("mem:1B"), count: u32::MAX }]);
        let candidates: Vec<Candidate<'_>> =
            agents.iter().map(|(id, r)| Candidate { agent: id, available: r.clone() }).collect();
        let out = a.allocate(Instant::now(), &candidates, &|_, _, _| true);
        let given: u64 = out.iter().map(|x| x.resources.mem).sum();
        assert!(given > 0 && given <= MAX_GRANTS_PER_CYCLE as u64, "{given}");
        // The next cycle goes on where this one stopped.
        let more = a.allocate(Instant::now(), &candidates, &|_, _, _| true);
        assert!(!more.is_empty());
    }

    #[test]
    fn demand_slices_one_agent_by_progressive_filling() {
        let mut a = DrfAllocator::new();
        a.add_agent(&ag("a1"), &res("cpus:9;mem:18GiB"));
        a.add_framework(&fw("A"), "*");
        a.add_framework(&fw("B"), "*");
        a.set_demand(&fw("A"), &[Demand { resources: res("cpus:1;mem:4GiB"), count: 10 }]);
        a.set_demand(&fw("B"), &[Demand { resources: res("cpus:3;mem:1GiB"), count: 10 }]);
        let cands = [Candidate { agent: &ag("a1"), available: res("cpus:9;mem:18GiB") }];
        let out = a.allocate(Instant::now(), &cands, &|_, _, _| true);
        let by: BTreeMap<String, String> =
            out.iter().map(|d| (d.framework.0.clone(), d.resources.to_string())).collect();
        assert_eq!(by["A"], "cpus:3;mem:12GiB");
        assert_eq!(by["B"], "cpus:6;mem:2GiB");
        // A demand of nothing gets nothing; no demand at all gets whole agents.
        a.set_demand(&fw("A"), &[]);
        a.set_demand(&fw("B"), &[]);
        a.add_framework(&fw("C"), "*");
        let cands = [Candidate { agent: &ag("a1"), available: res("cpus:1;mem:4GiB") }];
        let out = a.allocate(Instant::now(), &cands, &|_, _, _| true);
        assert_eq!(
            out,
            vec![Allocation { framework: fw("C"), agent: ag("a1"), resources: res("cpus:1;mem:4GiB") }]
        );
    }

    #[test]
    fn totals_follow_agents_and_unknown_frameworks_are_ignored() {
        let mut a = DrfAllocator::new();
        a.add_agent(&ag("a1"), &res("cpus:4;ports:[1-100]"));
        a.add_agent(&ag("a2"), &res("cpus:4;ports:[1-100]"));
        a.add_framework(&fw("f1"), "*");
        a.allocated(&fw("f1"), &ag("a1"), &res("cpus:2;ports:[1-5]"));
        a.rebuild();
        assert!(a.share(&fw("f1")).is_some_and(|s| (s - 0.25).abs() < 1e-9));
        a.remove_agent(&ag("a2"));
        a.rebuild();
        assert!(a.share(&fw("f1")).is_some_and(|s| (s - 0.5).abs() < 1e-9));
        // Nothing happens for frameworks it does not know.
        a.recover(&fw("gone"), &ag("a1"), &res("cpus:1"));
        a.allocated(&fw("gone"), &ag("a1"), &res("cpus:1"));
        a.remove_framework(&fw("gone"));
        a.remove_framework(&fw("f1"));
        assert!(a.role_order.is_empty());
        assert!(a.roles.is_empty());
        assert!(run(&mut a, &[(ag("a1"), res("cpus:1"))]).is_empty());
    }
}
