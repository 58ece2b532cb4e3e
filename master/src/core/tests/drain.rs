//! Operators' drains of agents.

use super::recovery::report;
use super::*;

/// The drain events (`AgentDraining`, `AgentUndrained`) sent to `conn`.
fn drain_events(acts: &[Action], conn: ConnId) -> Vec<SchedulerEvent> {
    events(acts, conn)
        .into_iter()
        .filter(|e| matches!(e, SchedulerEvent::AgentDraining { .. } | SchedulerEvent::AgentUndrained { .. }))
        .collect()
}

fn agent_status(h: &Harness, id: &AgentId) -> (AgentViewStatus, Option<DrainView>) {
    let a = h.m.agents().into_iter().find(|a| a.id == *id).expect("agent listed");
    (a.status, a.drain)
}

#[test]
fn a_drained_agent_offers_nothing_and_its_tasks_are_killed_at_the_deadline() {
    let mut h = Harness::new();
    let s = h.running_task("cpus:4", "cpus:1", SEC);
    // The rest of the agent is on offer when the drain starts: taken back at once.
    let held = single_offer(&h.advance(5 * MS), s.fc);
    let deadline_unix_ms = h.m.unix_ms(h.now) + 10_000;
    assert_eq!(h.m.drain_agent(h.now, &s.agent, Some(10 * SEC), true), Ok(()));
    let acts = h.drain();
    assert_eq!(
        events(&acts, s.fc),
        vec![
            SchedulerEvent::Rescind { offer_id: held.id },
            SchedulerEvent::AgentDraining {
                agent_id: s.agent.clone(),
                deadline_unix_ms: Some(deadline_unix_ms)
            },
        ]
    );
    let view = DrainView { deadline_unix_ms: Some(deadline_unix_ms), kill: true };
    assert_eq!(agent_status(&h, &s.agent), (AgentViewStatus::Draining, Some(view.clone())));
    assert_eq!(h.reg.state.agents[&s.agent].drain, Some(view));
    // A framework subscribing meanwhile is told too.
    let (bob, _) = h.subscribe("bob", SEC);
    // Another agent is offered as usual; the drained one never.
    let (_, other) = h.add_agent("cpus:2");
    let acts = h.advance(9 * SEC);
    let offered: Vec<AgentId> =
        offers(&acts, s.fc).into_iter().chain(offers(&acts, bob)).map(|o| o.agent_id).collect();
    assert!(!offered.is_empty() && offered.iter().all(|a| *a == other), "{offered:?}");
    assert!(to_agent(&acts, s.ac).iter().all(|m| !matches!(m, MasterToAgent::KillTask { .. })));
    // At the deadline its task is killed, and the update says why.
    let acts = h.advance(2 * SEC);
    assert_eq!(
        to_agent(&acts, s.ac),
        vec![MasterToAgent::KillTask { framework_id: s.fw.clone(), task_id: TaskId::new("t1") }]
    );
    let (_, acts) = h.status(s.ac, &s.fw, &s.agent, "t1", TaskState::Killed);
    let ups = updates(&acts, s.fc);
    assert_eq!((ups[0].state, &ups[0].reason), (TaskState::Killed, &Reason::AgentDrained));
    assert_eq!(agent_status(&h, &s.agent).0, AgentViewStatus::Drained);
    // Undrained: frameworks are told and it is offered again.
    assert_eq!(h.m.undrain_agent(h.now, &s.agent), Ok(()));
    let acts = h.drain();
    assert_eq!(drain_events(&acts, s.fc), vec![SchedulerEvent::AgentUndrained { agent_id: s.agent.clone() }]);
    assert_eq!(drain_events(&acts, bob), vec![SchedulerEvent::AgentUndrained { agent_id: s.agent.clone() }]);
    assert_eq!(agent_status(&h, &s.agent), (AgentViewStatus::Active, None));
    assert_eq!(h.reg.state.agents[&s.agent].drain, None);
    let acts = h.advance(2 * SEC);
    let offered: Vec<Offer> = offers(&acts, s.fc).into_iter().chain(offers(&acts, bob)).collect();
    assert!(offered.iter().any(|o| o.agent_id == s.agent && o.resources == res("cpus:4")), "{offered:?}");
}

#[test]
fn a_framework_subscribing_during_a_drain_is_told() {
    let mut h = Harness::new();
    let (_, agent) = h.add_agent("cpus:4");
    assert_eq!(h.m.drain_agent(h.now, &agent, None, true), Ok(()));
    h.drain();
    let conn = h.conn();
    let acts = h.call_as(conn, "bob", SchedulerCall::Subscribe(info(None, SEC)));
    assert_eq!(
        drain_events(&acts, conn),
        vec![SchedulerEvent::AgentDraining { agent_id: agent.clone(), deadline_unix_ms: None }]
    );
    assert_eq!(agent_status(&h, &agent).0, AgentViewStatus::Drained);
    assert!(offers(&h.advance(3 * SEC), conn).is_empty());
}

#[test]
fn a_drain_without_kill_leaves_the_tasks_running() {
    let mut h = Harness::new();
    let s = h.running_task("cpus:4", "cpus:1", SEC);
    assert_eq!(h.m.drain_agent(h.now, &s.agent, Some(SEC), false), Ok(()));
    h.drain();
    let acts = h.advance(10 * SEC);
    assert!(to_agent(&acts, s.ac).iter().all(|m| !matches!(m, MasterToAgent::KillTask { .. })));
    assert!(offers(&acts, s.fc).is_empty());
    assert_eq!(agent_status(&h, &s.agent).0, AgentViewStatus::Draining);
    // A framework's own kill keeps its own reason.
    h.call(s.fc, SchedulerCall::Kill { task_id: TaskId::new("t1") });
    let (_, acts) = h.status(s.ac, &s.fw, &s.agent, "t1", TaskState::Killed);
    assert_eq!(updates(&acts, s.fc)[0].reason, "test");
}

#[test]
fn drain_calls_with_bad_arguments_are_refused() {
    let mut h = Harness::new();
    let (_, agent) = h.add_agent("cpus:4");
    let ghost = AgentId::new("m-A99");
    let code = |r: Result<(), WireError>| r.map_err(|e| e.code);
    assert_eq!(code(h.m.drain_agent(h.now, &ghost, None, true)), Err(ErrorCode::NotFound));
    assert_eq!(code(h.m.undrain_agent(h.now, &ghost)), Err(ErrorCode::NotFound));
    let e = h.m.drain_agent(h.now, &agent, Some(MAX_DRAIN_DEADLINE + SEC), true).expect_err("too long");
    assert_eq!(e.code, ErrorCode::Invalid);
    assert!(e.message.contains("at most 30 days"), "{}", e.message);
    assert_eq!(h.m.drain_agent(h.now, &agent, Some(MAX_DRAIN_DEADLINE), true), Ok(()));
    // Undraining an agent that does not drain is fine.
    assert_eq!(h.m.undrain_agent(h.now, &agent), Ok(()));
    assert_eq!(h.m.undrain_agent(h.now, &agent), Ok(()));
    h.drain();
    assert_eq!(h.reg.state.agents[&agent].drain, None);
}

#[test]
fn a_drain_outlives_a_restart_of_the_master() {
    let mut h = Harness::new();
    let s = h.running_task("cpus:4", "cpus:1", 3600 * SEC);
    let deadline_unix_ms = h.m.unix_ms(h.now) + 10_000;
    assert_eq!(h.m.drain_agent(h.now, &s.agent, Some(10 * SEC), true), Ok(()));
    h.drain();
    h.restart();
    let view = DrainView { deadline_unix_ms: Some(deadline_unix_ms), kill: true };
    assert_eq!(agent_status(&h, &s.agent), (AgentViewStatus::Recovering, Some(view)));
    let fc = h.conn();
    let acts = h.call(fc, SchedulerCall::Subscribe(info(Some(&s.fw), 3600 * SEC)));
    assert_eq!(
        drain_events(&acts, fc),
        vec![SchedulerEvent::AgentDraining {
            agent_id: s.agent.clone(),
            deadline_unix_ms: Some(deadline_unix_ms)
        }]
    );
    // Back with its task: still no offers from it.
    let (ac, _, _) = h.register(Some(s.agent.clone()), "cpus:4", vec![report(&s.fw, "t1", "cpus:1")]);
    assert_eq!(agent_status(&h, &s.agent).0, AgentViewStatus::Draining);
    let acts = h.advance(9 * SEC);
    assert!(offers(&acts, fc).is_empty());
    assert!(to_agent(&acts, ac).iter().all(|m| !matches!(m, MasterToAgent::KillTask { .. })));
    let acts = h.advance(2 * SEC);
    assert_eq!(
        to_agent(&acts, ac),
        vec![MasterToAgent::KillTask { framework_id: s.fw.clone(), task_id: TaskId::new("t1") }]
    );
    let (_, acts) = h.status(ac, &s.fw, &s.agent, "t1", TaskState::Killed);
    assert_eq!(updates(&acts, fc)[0].reason, Reason::AgentDrained);
}

#[test]
fn an_agent_back_after_its_drain_deadline_has_its_tasks_killed() {
    let mut h = Harness::new();
    let s = h.running_task("cpus:4", "cpus:1", 3600 * SEC);
    h.m.handle(h.now, Event::AgentDisconnected { conn: s.ac });
    assert_eq!(h.m.drain_agent(h.now, &s.agent, Some(SEC), true), Ok(()));
    h.drain();
    h.advance(2 * SEC);
    let (ac, _, acts) = h.register(Some(s.agent.clone()), "cpus:4", vec![report(&s.fw, "t1", "cpus:1")]);
    assert!(to_agent(&acts, ac)
        .contains(&MasterToAgent::KillTask { framework_id: s.fw.clone(), task_id: TaskId::new("t1") }));
    let (_, acts) = h.status(ac, &s.fw, &s.agent, "t1", TaskState::Killed);
    assert_eq!(updates(&acts, s.fc)[0].reason, Reason::AgentDrained);
}
