//! A fast run of the delay-scheduling simulation (`examples/delay_sim`): the real
//! master core with simulated time, 100 agents in 10 racks, 16 frameworks using the SDK's
//! `DelayScheduler`. Asserts the shape of the published result: static partitioning gives
//! node locality far below half, a 1 s node delay on the shared cluster above 90 %, 5 s at
//! least as much, and jobs finish faster with the delay than without.

#[path = "../examples/delay_sim/model.rs"]
mod model;

use std::time::Duration;

use agora_sdk::locality::Locality;
use model::{run, Model, Policy};

#[test]
fn delay_scheduling_has_the_shape_of_the_paper() {
    let model = Model { arrivals_for: Duration::from_secs(12), ..Model::small() };
    let delay = |s: u64| Policy::Delay { node: Duration::from_secs(s), rack: Duration::from_secs(s) };
    let [fixed, naive, greedy, one, five] = [Policy::Static, Policy::Naive, delay(0), delay(1), delay(5)]
        .map(|p| {
            let o = run(&model, p);
            println!(
                "{}: {} jobs, {} tasks, node {:.1} %, rack {:.1} %, mean job response {:.2} s",
                p.label(),
                o.jobs,
                o.tasks,
                100.0 * o.fraction(Locality::Node),
                100.0 * o.fraction(Locality::Rack),
                o.mean_response.as_secs_f64()
            );
            assert!(o.jobs > 100, "enough jobs to mean something: {}", o.jobs);
            if p != Policy::Naive {
                assert_eq!(
                    (o.reported.node, o.reported.rack, o.reported.any),
                    (o.node, o.rack, o.any),
                    "the schedulers' counts agree with the simulation's"
                );
            }
            o
        });
    let node = |o: &model::Outcome| o.fraction(Locality::Node);
    assert!(node(&fixed) < 0.5, "static partitioning: {:.3}", node(&fixed));
    assert!(node(&naive) < 0.5, "shared, locality-blind, no delay: {:.3}", node(&naive));
    assert!(one.mean_response < naive.mean_response, "jobs finish faster with the delay than without");
    assert!(node(&greedy) < node(&one), "no delay {:.3} vs 1 s {:.3}", node(&greedy), node(&one));
    assert!(node(&one) > 0.9, "1 s: {:.3}", node(&one));
    assert!(node(&five) >= node(&one), "5 s {:.3} vs 1 s {:.3}", node(&five), node(&one));
    assert!(one.mean_response < greedy.mean_response, "jobs finish faster with the delay");
    assert!(greedy.mean_response < fixed.mean_response, "and sharing beats static partitioning");
}
