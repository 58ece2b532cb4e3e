//! Framework liveness on the master's side, with synthetic time: a subscribed framework that
//! stops talking (no call, no heartbeat) is handled as disconnected after its heartbeats stop,
//! so its failover timeout starts without waiting for the transport to give up.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use agora_master::core::MasterConfig;
use agora_master::testing::Sim;
use agora_sdk::proto::{FrameworkId, FrameworkViewStatus, SchedulerCall};

const HB: Duration = Duration::from_secs(2);

fn status(sim: &Sim, id: &FrameworkId) -> Option<FrameworkViewStatus> {
    sim.m.frameworks().into_iter().find(|f| f.id == *id).map(|f| f.status)
}

fn sim(timeout: Option<Duration>) -> Sim {
    Sim::new(MasterConfig {
        framework_heartbeat_interval: HB,
        framework_timeout: timeout,
        ..MasterConfig::default()
    })
}

#[test]
fn a_framework_that_stops_heartbeating_is_disconnected_and_its_failover_timer_runs() {
    let mut sim = sim(Some(HB * 3));
    let (talker, talker_id) = sim.subscribe("*");
    let (mute, mute_id) = sim.subscribe("*");
    // Five seconds: under the 6 s limit, both are still connected.
    for _ in 0..5 {
        sim.advance(Duration::from_secs(1));
        sim.call(talker, SchedulerCall::Heartbeat);
    }
    assert_eq!(status(&sim, &mute_id), Some(FrameworkViewStatus::Active));
    // A call of any kind counts as a sign of life: the mute one speaks once at 5 s.
    sim.call(mute, SchedulerCall::Revive);
    for _ in 0..5 {
        sim.advance(Duration::from_secs(1));
        sim.call(talker, SchedulerCall::Heartbeat);
    }
    assert_eq!(status(&sim, &mute_id), Some(FrameworkViewStatus::Active), "heard from 5 s ago");
    // Then silence: gone within the limit plus one heartbeat interval (checked at heartbeats).
    for _ in 0..4 {
        sim.advance(Duration::from_secs(1));
        sim.call(talker, SchedulerCall::Heartbeat);
    }
    assert_eq!(status(&sim, &mute_id), Some(FrameworkViewStatus::Disconnected), "silent for 9 s");
    assert_eq!(status(&sim, &talker_id), Some(FrameworkViewStatus::Active), "its heartbeats keep it");
    // Its failover timeout (60 s in the simulator) runs from there: then it is removed.
    for _ in 0..62 {
        sim.advance(Duration::from_secs(1));
        sim.call(talker, SchedulerCall::Heartbeat);
    }
    assert_eq!(status(&sim, &mute_id), None, "removed after its failover timeout");
    assert_eq!(status(&sim, &talker_id), Some(FrameworkViewStatus::Active));
    // Later calls on the closed connection change nothing.
    sim.call(mute, SchedulerCall::Heartbeat);
    assert_eq!(status(&sim, &mute_id), None);
}

#[test]
fn without_a_framework_timeout_only_the_transport_decides() {
    let mut sim = sim(None);
    let (_, id) = sim.subscribe("*");
    sim.advance(Duration::from_secs(120));
    assert_eq!(status(&sim, &id), Some(FrameworkViewStatus::Active));
}
