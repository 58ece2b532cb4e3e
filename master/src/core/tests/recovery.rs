//! Restarts of the master (registry recovery), reconciliation answers and partitions.

use super::*;

pub(super) fn reconcile_on(tasks: &[(&str, Option<&AgentId>)]) -> SchedulerCall {
    SchedulerCall::ReconcileTasks {
        tasks: tasks
            .iter()
            .map(|(t, a)| ReconcileTask { task_id: TaskId::new(*t), agent_id: a.cloned() })
            .collect(),
    }
}

pub(super) fn states(ups: &[TaskStatus]) -> Vec<(&str, TaskState)> {
    ups.iter().map(|u| (u.task_id.as_str(), u.state)).collect()
}

pub(super) fn report(fw: &FrameworkId, id: &str, r: &str) -> TaskReport {
    TaskReport { framework_id: fw.clone(), task: task(id, r), state: TaskState::Running }
}

#[test]
fn the_registry_follows_frameworks_and_agents() {
    let mut h = Harness::new();
    let s = h.running_task("cpus:4", "cpus:1", 60 * SEC);
    let f = &h.reg.state.frameworks[&s.fw];
    assert_eq!((f.principal.as_str(), f.failover_timeout), ("alice", 60 * SEC));
    let a = &h.reg.state.agents[&s.agent];
    assert_eq!((a.standing, a.resources.clone()), (AgentStanding::Admitted, res("cpus:4")));
    // Silent past the agent timeout: unreachable in the registry, with the time.
    h.advance(21 * SEC);
    assert!(
        matches!(h.reg.state.agents[&s.agent].standing, AgentStanding::Unreachable { since_ms } if since_ms > 1_000_000)
    );
    h.register(Some(s.agent.clone()), "cpus:4", vec![report(&s.fw, "t1", "cpus:1")]);
    assert_eq!(h.reg.state.agents[&s.agent].standing, AgentStanding::Admitted);
    h.call(s.fc, SchedulerCall::Teardown);
    assert!(h.reg.state.frameworks.is_empty());
}

#[test]
fn a_restarted_master_takes_its_frameworks_and_agents_back() {
    let mut h = Harness::new();
    let s = h.running_task("cpus:4;mem:4GiB", "cpus:1;mem:1GiB", 3600 * SEC);
    h.restart();
    assert_eq!(
        h.m.frameworks().iter().map(|f| (f.id.clone(), f.status)).collect::<Vec<_>>(),
        [(s.fw.clone(), FrameworkViewStatus::Disconnected)]
    );
    assert_eq!(
        h.m.agents().iter().map(|a| (a.id.clone(), a.status)).collect::<Vec<_>>(),
        [(s.agent.clone(), AgentViewStatus::Recovering)]
    );
    // The framework re-subscribes with its id (a stranger may not take it).
    let thief = h.conn();
    let acts = h.call_as(thief, "mallory", SchedulerCall::Subscribe(info(Some(&s.fw), SEC)));
    assert_eq!(closed(&acts, thief).map(|e| e.code), Some(ErrorCode::Unauthorized));
    let fc = h.conn();
    let acts = h.call(fc, SchedulerCall::Subscribe(info(Some(&s.fw), 3600 * SEC)));
    assert_eq!(subscribed(&acts, fc), Some(s.fw.clone()));
    // Until the agent re-registers, its tasks are unreachable (never lost).
    let ups = updates(&h.call(fc, reconcile_on(&[("t1", Some(&s.agent))])), fc);
    assert_eq!(states(&ups), [("t1", TaskState::Unreachable)]);
    assert_eq!(ups[0].reason, Reason::AgentRecovering);
    let ups = updates(&h.call(fc, SchedulerCall::Reconcile { task_ids: vec![TaskId::new("t1")] }), fc);
    assert_eq!(states(&ups), [("t1", TaskState::Unreachable)]);
    // A task naming an agent nobody knows.
    let ups = updates(&h.call(fc, reconcile_on(&[("t9", Some(&AgentId::new("nobody")))])), fc);
    assert_eq!(states(&ups), [("t9", TaskState::Unknown)]);
    // No offers from an agent that has not re-registered.
    assert!(offers(&h.advance(2 * SEC), fc).is_empty());
    // The agent comes back with its task, and a task of a framework the registry does not
    // know (removed before the restart): that one is shut down.
    let ghost = FrameworkId::new("m-F99");
    let (ac, id, acts) = h.register(
        Some(s.agent.clone()),
        "cpus:4;mem:4GiB",
        vec![report(&s.fw, "t1", "cpus:1;mem:1GiB"), report(&ghost, "g1", "cpus:1")],
    );
    assert_eq!(id, s.agent);
    assert!(to_agent(&acts, ac).contains(&MasterToAgent::ShutdownFramework { framework_id: ghost }));
    let ups = updates(&h.call(fc, SchedulerCall::Reconcile { task_ids: vec![] }), fc);
    assert_eq!(states(&ups), [("t1", TaskState::Running)]);
    let ups = updates(&h.call(fc, reconcile_on(&[("t1", Some(&s.agent)), ("t2", Some(&s.agent))])), fc);
    assert_eq!(states(&ups), [("t1", TaskState::Running), ("t2", TaskState::Gone)]);
    assert_eq!(h.m.frameworks()[0].used, res("cpus:1;mem:1GiB"));
    // The rest of the agent is offered again; new ids do not collide with the old ones.
    // (The shut-down task holds its cpu until the agent reports it over.)
    let o = single_offer(&h.advance(2 * SEC), fc);
    assert_eq!(o.resources, res("cpus:2;mem:3GiB"));
    let (_, fresh) = h.subscribe("bob", SEC);
    assert_ne!(fresh, s.fw);
    assert!(fresh.as_str().starts_with("m1-"), "{fresh}");
}

#[test]
fn a_recovered_framework_has_its_failover_timeout_from_the_restart() {
    let mut h = Harness::new();
    let (_, fw) = h.subscribe("alice", 10 * SEC);
    h.advance(100 * SEC);
    h.restart();
    h.advance(9 * SEC);
    assert_eq!(h.m.frameworks().len(), 1);
    h.advance(2 * SEC);
    assert!(h.m.frameworks().is_empty());
    assert!(!h.reg.state.frameworks.contains_key(&fw));
    let fc = h.conn();
    let acts = h.call(fc, SchedulerCall::Subscribe(info(Some(&fw), SEC)));
    assert_eq!(closed(&acts, fc).map(|e| e.code), Some(ErrorCode::NotFound));
}

#[test]
fn an_agent_that_does_not_re_register_in_time_is_removed_and_refused() {
    let mut h = Harness::new();
    let s = h.running_task("cpus:4", "cpus:1", 3600 * SEC);
    h.restart();
    let fc = h.conn();
    h.call(fc, SchedulerCall::Subscribe(info(Some(&s.fw), 3600 * SEC)));
    h.advance(599 * SEC);
    assert_eq!(h.m.agents().len(), 1);
    h.advance(2 * SEC);
    assert!(h.m.agents().is_empty());
    assert!(matches!(h.reg.state.agents[&s.agent].standing, AgentStanding::Gone { .. }));
    let ups = updates(&h.call(fc, reconcile_on(&[("t1", Some(&s.agent))])), fc);
    assert_eq!(states(&ups), [("t1", TaskState::Gone)]);
    assert_eq!(ups[0].reason, "reconciliation: agent removed");
    // Without an agent, and no agent left to wait for: unknown.
    let ups = updates(&h.call(fc, SchedulerCall::Reconcile { task_ids: vec![TaskId::new("t1")] }), fc);
    assert_eq!(states(&ups), [("t1", TaskState::Unknown)]);
    // It comes back: refused, and told why; it stays out (also after another restart).
    let ac = h.conn();
    let acts = h.agent(
        ac,
        AgentMessage::Register {
            agent_id: Some(s.agent.clone()),
            hostname: "h".into(),
            resources: res("cpus:4"),
            attributes: Attributes::default(),
            tasks: vec![report(&s.fw, "t1", "cpus:1")],
        },
    );
    let err = closed(&acts, ac).expect("refused");
    assert_eq!(err.code, ErrorCode::Unauthorized);
    assert!(err.message.contains("was removed from the cluster"), "{}", err.message);
    assert!(registered(&acts, ac).is_none());
    h.restart();
    let ac = h.conn();
    let acts = h.agent(
        ac,
        AgentMessage::Register {
            agent_id: Some(s.agent.clone()),
            hostname: "h".into(),
            resources: res("cpus:4"),
            attributes: Attributes::default(),
            tasks: vec![],
        },
    );
    assert_eq!(closed(&acts, ac).map(|e| e.code), Some(ErrorCode::Unauthorized));
}

#[test]
fn a_kill_during_recovery_reaches_the_agent_that_reports_the_task() {
    let mut h = Harness::new();
    let s = h.running_task("cpus:4", "cpus:1", 3600 * SEC);
    h.restart();
    let fc = h.conn();
    h.call(fc, SchedulerCall::Subscribe(info(Some(&s.fw), 3600 * SEC)));
    let ups = updates(&h.call(fc, SchedulerCall::Kill { task_id: TaskId::new("t1") }), fc);
    assert_eq!(states(&ups), [("t1", TaskState::Unreachable)]);
    let (ac, _, acts) = h.register(Some(s.agent.clone()), "cpus:4", vec![report(&s.fw, "t1", "cpus:1")]);
    assert!(to_agent(&acts, ac)
        .contains(&MasterToAgent::KillTask { framework_id: s.fw.clone(), task_id: TaskId::new("t1") }));
}

#[test]
fn reconciliation_answers_from_the_agent_when_the_task_is_unknown() {
    let mut h = Harness::new();
    let s = h.running_task("cpus:4", "cpus:1", 3600 * SEC);
    let (_, other) = h.add_agent("cpus:1");
    // Registered agent, unknown task: gone.
    let ups = updates(&h.call(s.fc, reconcile_on(&[("x", Some(&other)), ("t1", Some(&other))])), s.fc);
    assert_eq!(states(&ups), [("x", TaskState::Gone), ("t1", TaskState::Running)]);
    // Unreachable agent: unreachable.
    h.advance(21 * SEC);
    let ups = updates(&h.call(s.fc, reconcile_on(&[("x", Some(&other)), ("t1", None)])), s.fc);
    assert_eq!(states(&ups), [("x", TaskState::Unreachable), ("t1", TaskState::Unreachable)]);
    assert!(ups.iter().all(|u| u.state != TaskState::Lost));
}

#[test]
fn a_task_killed_during_a_partition_is_killed_when_its_agent_returns() {
    let mut h = Harness::new();
    let s = h.running_task("cpus:4", "cpus:1", 3600 * SEC);
    h.advance(21 * SEC);
    assert_eq!(h.m.tasks()[0].state, TaskState::Unreachable);
    let ups = updates(&h.call(s.fc, SchedulerCall::Kill { task_id: TaskId::new("t1") }), s.fc);
    assert_eq!(states(&ups), [("t1", TaskState::Unreachable)]);
    let (ac, _, acts) = h.register(Some(s.agent.clone()), "cpus:4", vec![report(&s.fw, "t1", "cpus:1")]);
    // No RUNNING announcement: the kill goes out and KILLED follows from the agent.
    assert!(updates(&acts, s.fc).is_empty(), "{acts:#?}");
    assert_eq!(
        to_agent(&acts, ac)
            .into_iter()
            .filter(|m| matches!(m, MasterToAgent::KillTask { .. }))
            .collect::<Vec<_>>(),
        [MasterToAgent::KillTask { framework_id: s.fw.clone(), task_id: TaskId::new("t1") }]
    );
    let (_, acts) = h.status(ac, &s.fw, &s.agent, "t1", TaskState::Killed);
    assert_eq!(states(&updates(&acts, s.fc)), [("t1", TaskState::Killed)]);
}

#[test]
fn ended_frameworks_are_kept_in_a_bounded_history() {
    let mut h = Harness::new();
    let mut ids = Vec::new();
    for _ in 0..COMPLETED_FRAMEWORKS + 2 {
        let (fc, fw) = h.subscribe("alice", SEC);
        h.call(fc, SchedulerCall::Teardown);
        ids.push(fw);
    }
    let (_, alive) = h.subscribe("alice", SEC);
    let done = h.m.completed_frameworks();
    assert_eq!(done.len(), COMPLETED_FRAMEWORKS);
    assert_eq!(done.first().map(|f| &f.id), Some(&ids[2]));
    assert_eq!(done.last().map(|f| &f.id), ids.last());
    assert!(done.iter().all(|f| f.status == FrameworkViewStatus::Completed && f.id != alive));
    assert_eq!(h.m.frameworks().len(), 1);
}

#[test]
fn the_simulator_restarts_its_master_from_the_registry() {
    let mut sim = crate::testing::Sim::new(MasterConfig::default());
    let (_, agent) = sim.add_agent("cpus:2");
    let (_, fw) = sim.subscribe("*");
    sim.restart();
    assert_eq!(sim.registry.state.epoch, 1);
    assert!(sim.m.config().master_id.ends_with("-1"), "{}", sim.m.config().master_id);
    let fws = sim.m.frameworks();
    assert_eq!((fws[0].id.clone(), fws[0].status.as_str()), (fw, "disconnected"));
    let agents = sim.m.agents();
    assert_eq!((agents[0].id.clone(), agents[0].status), (agent, AgentViewStatus::Recovering));
}

#[test]
fn an_operator_policy_is_checked_recorded_and_recovered() {
    let mut h = Harness::new();
    assert_eq!(h.m.policy().1, "flags");
    let bad = AllocationPolicy { weights: "analytics=heavy".into(), ..Default::default() };
    let err = h.m.set_policy(&bad).expect_err("a weight that is no number");
    assert_eq!(err.code, ErrorCode::Invalid);
    assert!(err.message.contains("invalid weight `heavy` for role analytics"), "{}", err.message);
    let twice = AllocationPolicy { quotas: vec!["a=cpus:1".into(), "a=cpus:2".into()], ..Default::default() };
    let err = h.m.set_policy(&twice).expect_err("one role twice");
    assert!(err.message.contains("role a is given twice in --quota"), "{}", err.message);
    assert_eq!(h.m.policy().1, "flags", "a refused policy changed nothing");

    let good = AllocationPolicy {
        weights: "analytics=2".into(),
        quotas: vec!["analytics=cpus:1;mem:1GiB".into()],
        ..Default::default()
    };
    h.m.set_policy(&good).expect("set");
    let (policy, source) = h.m.policy();
    assert_eq!((policy.weights.as_str(), source), ("analytics=2", "registry"));
    assert_eq!(policy.quotas.len(), 1);
    h.drain();
    assert_eq!(h.reg.state.policy.as_ref(), Some(&policy), "not recorded for the registry");

    // A master started from the registry (with no policy flags) takes it.
    let mut again = Master::new(MasterConfig { master_id: "m2".into(), ..MasterConfig::default() }, h.now);
    again.recover(h.now, &h.reg.state);
    assert_eq!(again.policy(), (policy, "registry"));
}
