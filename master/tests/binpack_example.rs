//! The bin-packing allocator of `examples/binpack_allocator.rs`, registered from outside the
//! master crate and driven on the sans-IO core.

mod sim;

#[path = "../../examples/binpack_allocator.rs"]
#[allow(dead_code)]
mod binpack;

use std::time::Duration;

use agora_master::allocator::{AllocatorOptions, Registry};
use agora_master::core::MasterConfig;
use agora_sdk::proto::*;
use sim::{res, Sim};

fn master_config() -> MasterConfig {
    MasterConfig { agent_timeout: Duration::from_secs(3600), ..MasterConfig::default() }
}

#[test]
fn an_allocator_registered_from_outside_is_chosen_by_name() {
    let mut registry = Registry::builtin();
    binpack::register(&mut registry).expect("register");
    assert_eq!(registry.names(), vec!["binpack", "drf", "priority"]);
    assert!(binpack::register(&mut registry).is_err(), "a name is registered once");
    let alloc = registry.create("binpack", &AllocatorOptions::default()).expect("create");
    assert_eq!(alloc.name(), "binpack");

    let mut sim = Sim::with_allocator(master_config(), alloc);
    assert_eq!(sim.m.allocator_name(), "binpack");
    let (_, big) = sim.add_agent("cpus:8;mem:8GiB");
    let (_, small) = sim.add_agent("cpus:2;mem:2GiB");
    // Make the big agent the fuller one: 7 of its 8 CPUs are in use.
    let (cf, _) = sim.subscribe("*");
    sim.cycle();
    let offers = sim.offers(cf);
    assert_eq!(offers.len(), 1, "one whole agent per cycle without a demand");
    // Equally empty agents: ties go by agent id, so the big one comes first.
    let big_offer = offers.into_iter().find(|o| o.agent_id == big).expect("the big agent is offered");
    sim.launch(cf, &big_offer, &[&res("cpus:7;mem:1GiB")]);
    sim.call(cf, SchedulerCall::Suppress);

    // Three one-CPU tasks: the fullest agent first (1 CPU left on big), then the next.
    let (cd, _) = sim.subscribe("*");
    sim.call(
        cd,
        SchedulerCall::Request { demands: vec![Demand { resources: res("cpus:1;mem:256MiB"), count: 3 }] },
    );
    sim.cycle();
    let mut got: Vec<(AgentId, String)> =
        sim.offers(cd).into_iter().map(|o| (o.agent_id, o.resources.to_string())).collect();
    got.sort();
    assert_eq!(got, vec![(big, "cpus:1;mem:256MiB".into()), (small, "cpus:2;mem:512MiB".into())]);
}
