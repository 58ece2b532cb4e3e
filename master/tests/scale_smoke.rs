//! The 50,000-agent benchmarks keep compiling and running (issue 15 item 6), at tiny sizes and
//! with no timing asserted: `examples/scale_sim` through the sans-IO core, and
//! `examples/agent_swarm` with real QUIC agents against a master in this process (launches
//! through a scheduler driver, then a master restart every agent comes back from).

#[allow(dead_code)]
#[path = "../examples/agent_swarm/launch.rs"]
mod launch;
#[allow(dead_code)]
#[path = "../examples/agent_swarm/master.rs"]
mod master;
#[allow(dead_code)]
#[path = "../examples/agent_swarm/phases.rs"]
mod phases;
#[allow(dead_code)]
#[path = "../examples/scale_sim/sim.rs"]
mod sim;
#[allow(dead_code)]
#[path = "../examples/agent_swarm/swarm.rs"]
mod swarm;

use std::time::Duration;

#[test]
fn scale_sim_registers_allocates_recovers_and_launches() {
    let f = sim::run(200, 4, 2, 20);
    assert_eq!(f.cycles.len(), 2);
    assert_eq!(f.offers, 200, "every free agent is offered in a cycle");
    assert_eq!(f.reregistered, 200, "every agent re-registers with the recovered master");
    assert_eq!(f.accepts.len(), 20);
    assert_eq!(f.refused, 0, "every ACCEPT produced its RunTask");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_swarm_registers_launches_and_survives_a_restart() {
    let opts = phases::Options {
        agents: 20,
        frameworks: 2,
        launches: 10,
        in_flight: 4,
        restart: true,
        heartbeat: Duration::from_millis(200),
        idle: Duration::from_millis(500),
        connecting: 8,
        in_process: true,
        timeout: Duration::from_secs(60),
    };
    let r = phases::run(&opts).await.expect("the swarm runs");
    assert_eq!(r.registered, 20);
    assert_eq!((r.running, r.finished, r.failed), (10, 10, 0), "{r:?}");
    assert!(r.reregistered.is_some_and(|n| n >= 20), "every agent came back after the restart: {r:?}");
    assert_eq!(r.errors, 0, "{r:?}");
}
