//! Allocation modules: the policy that decides *which framework* is offered an agent's free
//! resources. The [`core`](crate::core) owns the mechanism (agents, offers, decline filters,
//! tasks) and drives an [`Allocator`] through a small set of notifications; the allocator only
//! keeps what its policy needs (here: each framework's allocation and the cluster total).
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
//! - Calls about frameworks the allocator does not know (e.g. removed ones) must be ignored.
//!
//! Built-in allocators are listed in [`BUILTIN`] and created with [`by_name`].

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use agora_sdk::proto::{AgentId, FrameworkId};
use agora_sdk::resources::Resources;

/// An agent whose free, unoffered resources may be allocated in this cycle.
#[derive(Clone, Debug)]
pub struct Candidate<'a> {
    pub agent: &'a AgentId,
    /// Free resources nobody holds (never empty).
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
/// filters). Allocators must skip a framework for which this returns `false`.
pub type Eligibility<'a> = dyn Fn(&FrameworkId, &AgentId, &Resources) -> bool + 'a;

/// A pluggable allocation policy (weighted DRF, strict priority, quotas, ...).
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

    /// An agent joined the pool with these total resources.
    fn add_agent(&mut self, agent: &AgentId, total: &Resources);
    /// An agent left the pool (its tasks' resources were recovered before this call).
    fn remove_agent(&mut self, agent: &AgentId);

    /// `framework` now also holds `resources` on `agent` without an offer (adopted tasks).
    fn allocated(&mut self, framework: &FrameworkId, agent: &AgentId, resources: &Resources);
    /// `framework` no longer holds `resources` on `agent`.
    fn recover(&mut self, framework: &FrameworkId, agent: &AgentId, resources: &Resources);

    /// Decides who gets the candidates' resources. Each returned allocation is recorded as
    /// held by its framework; an agent appears at most once.
    fn allocate(
        &mut self,
        now: Instant,
        candidates: &[Candidate<'_>],
        eligible: &Eligibility<'_>,
    ) -> Vec<Allocation>;
}

/// Settings shared by the built-in allocators.
#[derive(Clone, Debug, Default)]
pub struct AllocatorOptions {
    /// Role weights for weighted fair sharing (a missing role weighs 1; a weight that is not
    /// a positive finite number counts as 1).
    pub role_weights: BTreeMap<String, f64>,
}

/// Names of the built-in allocators, for [`by_name`].
pub const BUILTIN: &[&str] = &[DrfAllocator::NAME];

/// Names of the built-in allocators.
pub fn names() -> &'static [&'static str] {
    BUILTIN
}

/// Creates a built-in allocator by name with default options, or `None` if there is none
/// with that name.
pub fn by_name(name: &str) -> Option<Box<dyn Allocator>> {
    by_name_with(name, &AllocatorOptions::default())
}

/// Creates a built-in allocator by name with these options.
pub fn by_name_with(name: &str, options: &AllocatorOptions) -> Option<Box<dyn Allocator>> {
    match name {
        DrfAllocator::NAME => Some(Box::new(DrfAllocator::with_weights(options.role_weights.clone()))),
        _ => None,
    }
}

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

#[derive(Debug)]
struct DrfFramework {
    role: String,
    allocated: Resources,
    active: bool,
    suppressed: bool,
    /// `Some(key)` exactly when the framework is in [`DrfAllocator::order`] under that key.
    key: Option<Share>,
}

impl DrfFramework {
    fn offerable(&self) -> bool {
        self.active && !self.suppressed
    }
}

/// Weighted Dominant Resource Fairness: each agent goes to the offerable framework with the
/// lowest dominant share (allocation over cluster total, divided by its role's weight), ties
/// broken by framework id.
///
/// Port ranges are left out of the shares: the same range on many agents would merge into one
/// and distort the total. Offerable frameworks are kept in a set sorted by share, so one
/// allocation costs O(log frameworks) when no filter is in the way.
#[derive(Debug, Default)]
pub struct DrfAllocator {
    weights: BTreeMap<String, f64>,
    agents: HashMap<AgentId, Resources>,
    total: Resources,
    frameworks: HashMap<FrameworkId, DrfFramework>,
    /// Offerable frameworks by ascending weighted share.
    order: BTreeSet<(Share, FrameworkId)>,
    /// The total changed since the keys in `order` were computed.
    stale: bool,
}

/// The part of `r` that takes part in DRF shares (everything but ports).
fn scalar_part(r: &Resources) -> Resources {
    Resources { ports: Vec::new(), ..r.clone() }
}

impl DrfAllocator {
    /// Its name in [`by_name`].
    pub const NAME: &'static str = "drf";

    /// Plain DRF (every role weighs 1).
    pub fn new() -> Self {
        Self::default()
    }

    /// Weighted DRF with these role weights.
    pub fn with_weights(weights: BTreeMap<String, f64>) -> Self {
        DrfAllocator { weights, ..Self::default() }
    }

    /// Sets one role's weight (effective from the next allocation).
    pub fn set_weight(&mut self, role: &str, weight: f64) {
        self.weights.insert(role.to_string(), weight);
        self.stale = true;
    }

    /// The weighted dominant share of a framework, if known (for tests and observability).
    pub fn share(&self, framework: &FrameworkId) -> Option<f64> {
        self.frameworks.get(framework).map(|f| self.key_of(f).0)
    }

    fn weight(&self, role: &str) -> f64 {
        match self.weights.get(role) {
            Some(w) if w.is_finite() && *w > 0.0 => *w,
            _ => 1.0,
        }
    }

    fn key_of(&self, f: &DrfFramework) -> Share {
        Share(f.allocated.dominant_share(&self.total) / self.weight(&f.role))
    }

    /// Puts a framework at its right place in `order` (or out of it).
    fn rekey(&mut self, id: &FrameworkId) {
        let Some(f) = self.frameworks.get(id) else { return };
        let new_key = f.offerable().then(|| self.key_of(f));
        let old_key = f.key;
        if let Some(k) = old_key {
            self.order.remove(&(k, id.clone()));
        }
        if let Some(k) = new_key {
            self.order.insert((k, id.clone()));
        }
        if let Some(f) = self.frameworks.get_mut(id) {
            f.key = new_key;
        }
    }

    fn rebuild(&mut self) {
        let ids: Vec<FrameworkId> = self.frameworks.keys().cloned().collect();
        for id in &ids {
            self.rekey(id);
        }
        self.stale = false;
    }

    fn update(&mut self, id: &FrameworkId, change: impl FnOnce(&mut DrfFramework)) {
        if let Some(f) = self.frameworks.get_mut(id) {
            change(f);
            self.rekey(id);
        }
    }
}

impl Allocator for DrfAllocator {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn add_framework(&mut self, framework: &FrameworkId, role: &str) {
        if self.frameworks.contains_key(framework) {
            return;
        }
        self.frameworks.insert(
            framework.clone(),
            DrfFramework {
                role: role.to_string(),
                allocated: Resources::default(),
                active: true,
                suppressed: false,
                key: None,
            },
        );
        self.rekey(framework);
    }

    fn remove_framework(&mut self, framework: &FrameworkId) {
        if let Some(f) = self.frameworks.remove(framework) {
            if let Some(k) = f.key {
                self.order.remove(&(k, framework.clone()));
            }
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
        let r = scalar_part(resources);
        self.update(framework, |f| f.allocated.add_assign(&r));
    }

    fn recover(&mut self, framework: &FrameworkId, _agent: &AgentId, resources: &Resources) {
        let r = scalar_part(resources);
        self.update(framework, |f| f.allocated = f.allocated.saturating_sub(&r));
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
        let mut out = Vec::new();
        for c in candidates {
            if c.available.is_empty() {
                continue;
            }
            let chosen = self
                .order
                .iter()
                .find(|(_, fw)| eligible(fw, c.agent, &c.available))
                .map(|(_, fw)| fw.clone());
            let Some(framework) = chosen else { continue };
            self.allocated(&framework, c.agent, &c.available);
            out.push(Allocation { framework, agent: c.agent.clone(), resources: c.available.clone() });
        }
        out
    }
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
    fn registry_knows_drf() {
        let a = by_name("drf").expect("drf exists");
        assert_eq!(a.name(), "drf");
        assert!(by_name("nope").is_none());
        assert!(by_name_with("drf", &AllocatorOptions::default()).is_some());
        assert_eq!(names(), &["drf"]);
    }

    #[test]
    fn lowest_dominant_share_wins_and_ties_go_by_id() {
        let mut a = DrfAllocator::new();
        a.add_agent(&ag("a1"), &res("cpus:10;mem:10GiB"));
        a.add_agent(&ag("a2"), &res("cpus:10;mem:10GiB"));
        a.add_framework(&fw("f2"), "*");
        a.add_framework(&fw("f1"), "*");
        // Equal shares: ties go to the smaller id, then the other one is lower.
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
        assert!(a.order.is_empty());
        assert!(run(&mut a, &[(ag("a1"), res("cpus:1"))]).is_empty());
    }
}
