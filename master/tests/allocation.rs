//! Acceptance tests of the allocation modules on the sans-IO master core, with simulated
//! time: the DRF paper's example, weights, strict priority, quotas, starvation, offer
//! semantics (filters, revive, suppress, offer timeout, reservations, crumbs) and
//! demand-aware slicing.

mod sim;

use std::collections::BTreeMap;
use std::time::Duration;

use std::time::Instant;

use agora_master::allocator::{
    Allocation, Allocator, AllocatorOptions, Candidate, Eligibility, HierarchicalAllocator,
};
use agora_master::core::MasterConfig;
use agora_sdk::proto::*;
use agora_sdk::Resources;
use sim::{res, Sim};

const SEC: Duration = Duration::from_secs(1);

fn config(allocation: AllocatorOptions) -> MasterConfig {
    MasterConfig {
        allocation: AllocatorOptions { min_allocatable: vec![res("cpus:0.01")], ..allocation },
        // The simulated agents send no heartbeats.
        agent_timeout: Duration::from_secs(3600),
        ..MasterConfig::default()
    }
}

/// Frameworks that launch one task of their shape per offer while it fits, and decline
/// (without a filter) what does not fit; runs cycles until nothing moves. Returns how many
/// offers each got; panics on an offer of zero CPUs (a crumb).
fn one_task_per_offer(sim: &mut Sim, fws: &[(u64, Resources)], cycles: usize) -> Vec<usize> {
    let mut got = vec![0; fws.len()];
    for _ in 0..cycles {
        sim.cycle();
        let mut moved = false;
        for (i, (conn, shape)) in fws.iter().enumerate() {
            for offer in sim.offers(*conn) {
                assert!(offer.resources.cpus > 0, "a crumb was offered: {}", offer.resources);
                got[i] += 1;
                moved = true;
                if offer.resources.contains(shape) {
                    sim.launch(*conn, &offer, &[shape]);
                } else {
                    sim.decline(*conn, &offer, Some(0.0));
                }
            }
        }
        if !moved {
            sim.advance(SEC);
            if (0..fws.len()).all(|i| sim.offers(fws[i].0).is_empty()) {
                break;
            }
        }
    }
    got
}

fn dominant(sim: &Sim, fw: &FrameworkId, total: &Resources) -> f64 {
    sim.used(fw).dominant_share(total)
}

#[test]
fn drf_paper_example_ends_with_three_and_two_tasks_at_equal_dominant_shares() {
    let mut sim = Sim::new(config(AllocatorOptions::default()));
    sim.add_agent("cpus:9;mem:18GiB");
    let (ca, a) = sim.subscribe("*");
    let (cb, b) = sim.subscribe("*");
    let shapes = [(ca, res("cpus:1;mem:4GiB")), (cb, res("cpus:3;mem:1GiB"))];
    one_task_per_offer(&mut sim, &shapes, 50);
    assert_eq!(sim.task_count(&a), 3);
    assert_eq!(sim.task_count(&b), 2);
    let total = res("cpus:9;mem:18GiB");
    assert!((dominant(&sim, &a, &total) - 2.0 / 3.0).abs() < 1e-9);
    assert!((dominant(&sim, &b, &total) - 2.0 / 3.0).abs() < 1e-9);
}

#[test]
fn weights_converge_to_two_to_one() {
    let weights: BTreeMap<String, f64> = [("heavy".to_string(), 2.0), ("light".to_string(), 1.0)].into();
    let mut sim = Sim::new(config(AllocatorOptions { role_weights: weights, ..Default::default() }));
    for _ in 0..3 {
        sim.add_agent("cpus:10;mem:10GiB");
    }
    let (ch, h) = sim.subscribe("heavy");
    let (cl, l) = sim.subscribe("light");
    let shape = res("cpus:1;mem:1GiB");
    one_task_per_offer(&mut sim, &[(ch, shape.clone()), (cl, shape)], 200);
    let (nh, nl) = (sim.task_count(&h), sim.task_count(&l));
    assert_eq!(nh + nl, 30, "the cluster is full");
    assert_eq!((nh, nl), (20, 10), "weight 2 gets twice the dominant share");
}

#[test]
fn strict_priority_starves_the_low_role_until_the_high_one_is_full_or_declines() {
    let opts = AllocatorOptions {
        role_priorities: [("high".to_string(), 10), ("low".to_string(), 1)].into(),
        ..Default::default()
    };
    let mut sim = Sim::with_allocator(config(opts.clone()), Box::new(HierarchicalAllocator::priority(&opts)));
    sim.add_agent("cpus:4;mem:4GiB");
    let (cl, _low) = sim.subscribe("low");
    let (ch, high) = sim.subscribe("high");
    // The high framework takes one task per offer: the low one sees nothing until it is full.
    let shape = res("cpus:1;mem:1GiB");
    for _ in 0..4 {
        sim.cycle();
        assert!(sim.offers(cl).is_empty(), "low got an offer while high could use it");
        let offers = sim.offers(ch);
        assert_eq!(offers.len(), 1);
        sim.launch(ch, &offers[0], &[&shape]);
    }
    assert_eq!(sim.task_count(&high), 4);
    sim.cycle();
    assert!(sim.offers(cl).is_empty() && sim.offers(ch).is_empty(), "full: nothing to offer");
    // A second agent: high declines it, then (and only then) low gets it.
    sim.add_agent("cpus:4;mem:4GiB");
    sim.cycle();
    assert!(sim.offers(cl).is_empty());
    let offers = sim.offers(ch);
    assert_eq!(offers.len(), 1);
    sim.decline(ch, &offers[0], Some(60.0));
    sim.cycle();
    assert_eq!(sim.offers(cl).len(), 1);
}

#[test]
fn quota_guarantee_is_kept_for_its_role_even_when_a_greedier_role_came_first() {
    let opts = AllocatorOptions {
        quota_guarantees: [("analytics".to_string(), res("cpus:4"))].into(),
        ..Default::default()
    };
    let mut sim = Sim::new(config(opts));
    sim.add_agent("cpus:4;mem:4GiB");
    sim.add_agent("cpus:4;mem:4GiB");
    let (cg, greedy) = sim.subscribe("web");
    // The greedy framework takes everything it is offered, for several cycles.
    for _ in 0..5 {
        sim.cycle();
        for offer in sim.offers(cg) {
            let r = offer.resources.clone();
            sim.launch(cg, &offer, &[&r]);
        }
    }
    assert_eq!(sim.used(&greedy).cpus, 4000, "the guarantee's headroom stays free");
    let (ca, _analytics) = sim.subscribe("analytics");
    sim.cycle();
    let offers = sim.offers(ca);
    let cpus: u64 = offers.iter().map(|o| o.resources.cpus).sum();
    assert_eq!(cpus, 4000, "{offers:?}");
}

#[test]
fn quota_limit_caps_a_role_even_on_an_idle_cluster() {
    let opts =
        AllocatorOptions { quota_limits: [("web".to_string(), res("cpus:2"))].into(), ..Default::default() };
    let mut sim = Sim::new(config(opts));
    sim.add_agent("cpus:8;mem:8GiB");
    let (cw, web) = sim.subscribe("web");
    sim.cycle();
    let offers = sim.offers(cw);
    assert_eq!(offers.len(), 1);
    assert_eq!(offers[0].resources.cpus, 2000, "capped at the limit");
    assert_eq!(offers[0].resources.mem, 8 << 30, "kinds the limit does not name are not capped");
    let r = offers[0].resources.clone();
    sim.launch(cw, &offers[0], &[&r]);
    for _ in 0..5 {
        sim.advance(SEC);
        assert!(sim.offers(cw).is_empty(), "over the limit");
    }
    assert_eq!(sim.used(&web).cpus, 2000);
    // Another role is not limited.
    let (co, _) = sim.subscribe("other");
    sim.cycle();
    assert_eq!(sim.offers(co)[0].resources.cpus, 6000);
}

#[test]
fn no_framework_starves_among_a_hundred_that_decline_most_offers() {
    let mut sim = Sim::new(config(AllocatorOptions::default()));
    for _ in 0..10 {
        sim.add_agent("cpus:8;mem:16GiB");
    }
    let fws: Vec<(u64, FrameworkId)> = (0..100).map(|_| sim.subscribe("*")).collect();
    let mut first_offer: Vec<Option<usize>> = vec![None; fws.len()];
    let shape = res("cpus:0.1;mem:32MiB");
    let mut offers_seen = 0usize;
    for cycle in 1..=20 {
        sim.cycle();
        for (i, (conn, _)) in fws.iter().enumerate() {
            for offer in sim.offers(*conn) {
                first_offer[i].get_or_insert(cycle);
                offers_seen += 1;
                // Decline most offers (with a filter); accept one in seven.
                if offers_seen.is_multiple_of(7) {
                    sim.launch(*conn, &offer, &[&shape]);
                } else {
                    sim.decline(*conn, &offer, Some(30.0));
                }
            }
        }
    }
    let worst = first_offer.iter().map(|c| c.unwrap_or(usize::MAX)).max().unwrap_or(usize::MAX);
    // 10 agents per cycle, 100 frameworks: they take turns, so 10 cycles cover everyone.
    assert!(worst <= 11, "a framework waited {worst} cycles: {first_offer:?}");
}

#[test]
fn decline_filters_hide_only_what_they_cover_and_revive_clears_them() {
    let mut sim = Sim::new(config(AllocatorOptions::default()));
    let (agent_conn, _) = sim.add_agent("cpus:4;mem:4GiB");
    let (c, f) = sim.subscribe("*");
    sim.cycle();
    let o = sim.offers(c).remove(0);
    let t = sim.launch(c, &o, &[&res("cpus:2;mem:2GiB")]);
    sim.cycle();
    // The rest (2 CPUs) is declined for a minute: not offered again...
    let o = sim.offers(c).remove(0);
    assert_eq!(o.resources.cpus, 2000);
    sim.decline(c, &o, Some(60.0));
    sim.advance(10 * SEC);
    assert!(sim.offers(c).is_empty());
    // ...but a larger offer (the task ended) passes the filter.
    sim.finish(agent_conn, &f, &t[0]);
    sim.cycle();
    let o = sim.offers(c).remove(0);
    assert_eq!(o.resources.cpus, 4000);
    sim.decline(c, &o, Some(60.0));
    sim.advance(10 * SEC);
    assert!(sim.offers(c).is_empty());
    // REVIVE clears the filters; SUPPRESS stops offers until the next REVIVE.
    sim.call(c, SchedulerCall::Revive);
    sim.cycle();
    let o = sim.offers(c).remove(0);
    sim.call(c, SchedulerCall::Suppress);
    sim.decline(c, &o, Some(0.0));
    sim.advance(10 * SEC);
    assert!(sim.offers(c).is_empty());
    sim.call(c, SchedulerCall::Revive);
    sim.cycle();
    assert_eq!(sim.offers(c).len(), 1);
}

#[test]
fn an_unanswered_offer_times_out_and_goes_to_someone_else() {
    let mut sim =
        Sim::new(MasterConfig { offer_timeout: Some(10 * SEC), ..config(AllocatorOptions::default()) });
    sim.add_agent("cpus:4;mem:4GiB");
    let (c1, _) = sim.subscribe("*");
    let (c2, _) = sim.subscribe("*");
    sim.cycle();
    let held = sim.offers(c1);
    assert_eq!(held.len(), 1);
    assert!(sim.offers(c2).is_empty());
    sim.advance(9 * SEC);
    assert!(sim.rescinded(c1).is_empty());
    sim.advance(2 * SEC);
    assert_eq!(sim.rescinded(c1), vec![held[0].id.clone()]);
    assert_eq!(sim.offers(c2).len(), 1, "reallocated");
    // The rescinded offer cannot be used any more.
    sim.launch(c1, &held[0], &[&res("cpus:1")]);
    assert_eq!(sim.m.tasks().len(), 0);
}

#[test]
fn reservations_go_only_to_their_role() {
    let mut sim = Sim::new(config(AllocatorOptions::default()));
    sim.add_agent("cpus(analytics):2;mem(analytics):4GiB;cpus:2;mem:4GiB");
    let (cw, web) = sim.subscribe("web");
    sim.cycle();
    let o = sim.offers(cw).remove(0);
    assert_eq!(o.resources.to_string(), "cpus:2;mem:4GiB", "no reserved resources for web");
    // Web cannot launch more than the unreserved part.
    sim.launch(cw, &o, &[&res("cpus:3")]);
    assert_eq!(sim.task_count(&web), 0);
    let (ca, analytics) = sim.subscribe("analytics");
    sim.cycle();
    let o = sim.offers(ca).remove(0);
    assert_eq!(o.resources.reserved_for("analytics"), res("cpus:2;mem:4GiB"));
    // A flat task uses the reservation first, then the unreserved part.
    sim.launch(ca, &o, &[&res("cpus:3;mem:1GiB")]);
    assert_eq!(sim.task_count(&analytics), 1);
    sim.advance(10 * SEC);
    let o = sim.offers(cw).remove(0);
    assert_eq!(o.resources.to_string(), "cpus:1;mem:4GiB", "web gets what is left unreserved");
    assert!(sim.offers(ca).iter().all(|o| o.resources.unreserved().cpus == 0));
}

#[test]
fn stated_demands_share_one_agent_in_one_cycle() {
    let mut sim = Sim::new(config(AllocatorOptions::default()));
    sim.add_agent("cpus:9;mem:18GiB");
    let (ca, _) = sim.subscribe("*");
    let (cb, _) = sim.subscribe("*");
    sim.call(
        ca,
        SchedulerCall::Request { demands: vec![Demand { resources: res("cpus:1;mem:4GiB"), count: 10 }] },
    );
    sim.call(
        cb,
        SchedulerCall::Request { demands: vec![Demand { resources: res("cpus:3;mem:1GiB"), count: 10 }] },
    );
    sim.cycle();
    let a = sim.offers(ca);
    let b = sim.offers(cb);
    assert_eq!(a.len(), 1);
    assert_eq!(b.len(), 1);
    assert_eq!(a[0].agent_id, b[0].agent_id, "one agent, two slices");
    assert_eq!(a[0].resources.to_string(), "cpus:3;mem:12GiB");
    assert_eq!(b[0].resources.to_string(), "cpus:6;mem:2GiB");
    // The leftover (0 CPUs, 4 GiB) is a crumb: never offered.
    sim.advance(5 * SEC);
    assert!(sim.offers(ca).is_empty() && sim.offers(cb).is_empty());
    // A bad demand is refused with an error naming it.
    sim.call(
        ca,
        SchedulerCall::Request { demands: vec![Demand { resources: Resources::default(), count: 1 }] },
    );
    let errors = sim.errors(ca);
    assert_eq!(errors.len(), 1);
    assert!(errors[0].message.contains("demand entry 0"), "{errors:?}");
}

/// An allocator that breaks the contract (crumbs, another role's reservations, more than is
/// free), with one valid decision for each framework beside them: the core must drop exactly
/// the bad ones and offer exactly the good ones.
struct Rogue;

impl Allocator for Rogue {
    fn name(&self) -> &str {
        "rogue"
    }
    fn add_framework(&mut self, _: &FrameworkId, _: &str) {}
    fn remove_framework(&mut self, _: &FrameworkId) {}
    fn activate_framework(&mut self, _: &FrameworkId) {}
    fn deactivate_framework(&mut self, _: &FrameworkId) {}
    fn suppress(&mut self, _: &FrameworkId) {}
    fn revive(&mut self, _: &FrameworkId) {}
    fn add_agent(&mut self, _: &AgentId, _: &Resources) {}
    fn remove_agent(&mut self, _: &AgentId) {}
    fn allocated(&mut self, _: &FrameworkId, _: &AgentId, _: &Resources) {}
    fn recover(&mut self, _: &FrameworkId, _: &AgentId, _: &Resources) {}
    fn allocate(&mut self, _: Instant, candidates: &[Candidate<'_>], _: &Eligibility<'_>) -> Vec<Allocation> {
        let mut out = Vec::new();
        for c in candidates {
            // To the web framework: everything, the analytics reservation included.
            out.push(Allocation {
                framework: FrameworkId::new("m-F1"),
                agent: c.agent.clone(),
                resources: c.available.clone(),
            });
            // To the other: a crumb of memory only.
            out.push(Allocation {
                framework: FrameworkId::new("m-F2"),
                agent: c.agent.clone(),
                resources: res("mem:1MiB"),
            });
            // Valid: a slice of the unreserved resources to each (the positive control).
            out.push(Allocation {
                framework: FrameworkId::new("m-F1"),
                agent: c.agent.clone(),
                resources: res("cpus:0.5;mem:1GiB"),
            });
            out.push(Allocation {
                framework: FrameworkId::new("m-F2"),
                agent: c.agent.clone(),
                resources: res("cpus:1;mem:2GiB"),
            });
            // More than is still free after those: dropped.
            out.push(Allocation {
                framework: FrameworkId::new("m-F2"),
                agent: c.agent.clone(),
                resources: res("cpus:1;mem:2GiB"),
            });
        }
        out
    }
}

#[test]
fn the_core_drops_decisions_that_break_the_contract() {
    let mut sim = Sim::with_allocator(config(AllocatorOptions::default()), Box::new(Rogue));
    sim.add_agent("cpus(analytics):2;cpus:2;mem:4GiB");
    let (cw, web) = sim.subscribe("web");
    let (cx, other) = sim.subscribe("*");
    assert_eq!((web.as_str(), other.as_str()), ("m-F1", "m-F2"));
    sim.cycle();
    // Exactly the valid decisions, as the allocator sized them (a core that ignored the
    // allocator, or dropped everything it said, would not offer these).
    let shown = |offers: Vec<Offer>| offers.iter().map(|o| o.resources.to_string()).collect::<Vec<_>>();
    assert_eq!(
        shown(sim.offers(cw)),
        ["cpus:0.5;mem:1GiB"],
        "another role's reservation is never offered; the valid slice is"
    );
    assert_eq!(
        shown(sim.offers(cx)),
        ["cpus:1;mem:2GiB"],
        "a crumb (no CPU) and what is no longer free are never offered; the valid slice is"
    );
}

#[test]
fn a_framework_without_demand_gets_whole_agents() {
    let mut sim = Sim::new(config(AllocatorOptions::default()));
    sim.add_agent("cpus:9;mem:18GiB");
    let (ca, _) = sim.subscribe("*");
    let (cb, _) = sim.subscribe("*");
    sim.call(
        cb,
        SchedulerCall::Request { demands: vec![Demand { resources: res("cpus:1;mem:1GiB"), count: 2 }] },
    );
    sim.cycle();
    let a = sim.offers(ca);
    let b = sim.offers(cb);
    // A (no demand, first in order) gets the whole agent; B's demand waits for it.
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].resources.to_string(), "cpus:9;mem:18GiB");
    assert!(b.is_empty());
    sim.decline(ca, &a[0], Some(60.0));
    sim.cycle();
    assert_eq!(sim.offers(cb)[0].resources.to_string(), "cpus:2;mem:2GiB", "sized to its demand");
}
