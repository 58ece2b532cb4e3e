//! Data locality by delay scheduling, simulated on the sans-IO master core.
//!
//! ```text
//! cargo run --release -p agora-master --example delay_sim [-- --small] [--seed N] [--delays 0,1,5]
//! ```
//!
//! The real master core (DRF, offers, decline filters), simulated time, simulated agents and
//! frameworks; every framework uses the SDK's `DelayScheduler`. See `model.rs` for the model
//! and BENCHMARKS.md for the results.

mod model;

use std::time::{Duration, Instant};

use agora_sdk::locality::Locality;
use model::{run, Model, Policy};

fn main() {
    let mut model = Model::paper();
    let mut delays = vec![0.0, 1.0, 5.0];
    let mut rack_factor = 1.0;
    let mut with_static = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--small" => model = Model { seed: model.seed, ..Model::small() },
            "--seed" => model.seed = value().parse().unwrap_or_else(|_| usage()),
            "--load" => model.load = value().parse().unwrap_or_else(|_| usage()),
            "--agents" => model.agents = value().parse().unwrap_or_else(|_| usage()),
            "--racks" => model.racks = value().parse().unwrap_or_else(|_| usage()),
            "--frameworks" => model.frameworks = value().parse().unwrap_or_else(|_| usage()),
            "--secs" => model.arrivals_for = Duration::from_secs(value().parse().unwrap_or_else(|_| usage())),
            "--no-static" => with_static = false,
            "--rack-factor" => rack_factor = value().parse().unwrap_or_else(|_| usage()),
            "--delays" => {
                delays = value().split(',').map(|d| d.trim().parse().unwrap_or_else(|_| usage())).collect()
            }
            _ => usage(),
        }
    }
    println!(
        "{} agents in {} racks ({} each), {} blocks x3, {} frameworks (framework 0: {}x the work), load {:.2}, arrivals for {}s, rack delay = {} x node delay",
        model.agents,
        model.racks,
        model.agent_resources,
        model.blocks,
        model.frameworks,
        model.heavy,
        model.load,
        model.arrivals_for.as_secs(),
        rack_factor
    );
    println!(
        "| policy | jobs | tasks | node-local | rack-local | off-rack | node-local, mean over jobs | node-local, jobs ≤ 20 tasks | mean job response | small jobs | large jobs | mean task wait | utilization | offers (declined) | wall |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut policies: Vec<Policy> = Vec::new();
    if with_static {
        policies.push(Policy::Static);
        policies.push(Policy::Naive);
    }
    for d in delays {
        let node = Duration::from_secs_f64(d);
        policies.push(Policy::Delay { node, rack: node.mul_f64(rack_factor) });
    }
    for policy in policies {
        let started = Instant::now();
        let o = run(&model, policy);
        let pct = |x: f64| format!("{:.1} %", 100.0 * x);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.2} s | {:.2} s | {:.2} s | {:.2} s | {} | {} ({}) | {:.1} s |",
            policy.label(),
            o.jobs,
            o.tasks,
            pct(o.fraction(Locality::Node)),
            pct(o.fraction(Locality::Rack)),
            pct(o.fraction(Locality::Any)),
            pct(o.node_per_job),
            pct(o.node_small),
            o.mean_response.as_secs_f64(),
            o.mean_response_small.as_secs_f64(),
            o.mean_response_large.as_secs_f64(),
            o.reported.mean_wait().as_secs_f64(),
            pct(o.utilization),
            o.offers,
            o.declined,
            started.elapsed().as_secs_f64()
        );
        if policy != Policy::Naive {
            assert_eq!(
                (o.reported.node, o.reported.rack, o.reported.any),
                (o.node, o.rack, o.any),
                "the schedulers' counts agree with the simulation's"
            );
        }
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: delay_sim [--small] [--seed N] [--load F] [--agents N] [--racks N] [--frameworks N] [--secs S] [--rack-factor F] [--delays 0,1,5] [--no-static]"
    );
    std::process::exit(2)
}
