//! Offers, launches, updates, filters, agents and frameworks coming and going, DRF, kills,
//! reconciliation, hostile input.

use super::*;

#[test]
fn the_core_can_move_between_threads() {
    fn is_send<T: Send>() {}
    is_send::<Master>();
}

#[test]
fn offers_whole_agent_after_the_batch_delay() {
    let mut h = Harness::new();
    let (fc, fw) = h.subscribe("alice", SEC);
    let (_, agent) = h.add_agent("cpus:4;mem:4GiB");
    assert_eq!(fw.as_str(), "m-F1");
    assert_eq!(agent.as_str(), "m-A1");
    assert_eq!(h.m.poll_timeout(), Some(h.t0 + 2 * MS));
    let offer = single_offer(&h.advance(2 * MS), fc);
    assert_eq!(offer.id.as_str(), "m-O1");
    assert_eq!(offer.framework_id, fw);
    assert_eq!(offer.agent_id, agent);
    assert_eq!(offer.resources, res("cpus:4;mem:4GiB"));
    assert_eq!(offer.hostname, "host2");
    assert!(offer.attributes.get("rack").is_some());
    // Held until answered: nothing more is offered.
    assert!(offers(&h.advance(3 * SEC), fc).is_empty());
}

#[test]
fn accept_launches_and_leftover_goes_to_the_other_framework() {
    // The example of the design: <2 CPU, 1 GB> and <1 CPU, 2 GB> out of <4 CPU, 4 GB>;
    // <1 CPU, 1 GB> is then offered to framework 2.
    let mut h = Harness::new();
    let (f1, fw1) = h.subscribe("alice", SEC);
    let (ac, agent) = h.add_agent("cpus:4;mem:4GiB");
    let offer = single_offer(&h.advance(5 * MS), f1);
    let (f2, _) = h.subscribe("bob", SEC);
    let acts =
        h.call(f1, accept(&offer, vec![task("a", "cpus:2;mem:1GiB"), task("b", "cpus:1;mem:2GiB")], None));
    let launched = run_tasks(&acts, ac);
    assert_eq!(launched.iter().map(|t| t.task_id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    assert!(updates(&acts, f1).is_empty());
    let acts = h.advance(5 * MS);
    assert!(offers(&acts, f1).is_empty());
    let leftover = single_offer(&acts, f2);
    assert_eq!(leftover.resources, res("cpus:1;mem:1GiB"));
    let tasks = h.m.tasks();
    assert_eq!(tasks.len(), 2);
    assert!(tasks
        .iter()
        .all(|t| t.state == TaskState::Staging && t.agent_id == agent && t.framework_id == fw1));
    let views = h.m.agents();
    assert_eq!(views[0].used, res("cpus:3;mem:3GiB"));
    assert_eq!(views[0].tasks, 2);
    assert_eq!(h.m.frameworks()[0].used, res("cpus:3;mem:3GiB"));
}

#[test]
fn the_leftover_comes_back_to_a_lone_framework() {
    let mut h = Harness::new();
    let (fc, _) = h.subscribe("alice", SEC);
    h.add_agent("cpus:4;mem:4GiB");
    let offer = single_offer(&h.advance(5 * MS), fc);
    h.call(fc, accept(&offer, vec![task("a", "cpus:1;mem:1GiB")], None));
    let again = single_offer(&h.advance(5 * MS), fc);
    assert_eq!(again.resources, res("cpus:3;mem:3GiB"));
}

#[test]
fn invalid_launches_get_task_error_and_nothing_runs() {
    let mut h = Harness::new();
    let (fc, _) = h.subscribe("alice", SEC);
    let (ac, _) = h.add_agent("cpus:2;mem:2GiB");
    let offer = single_offer(&h.advance(5 * MS), fc);
    let mut empty_argv = task("noargv", "cpus:0.1;mem:1MiB");
    empty_argv.kind = TaskKind::Command(CommandInfo { argv: vec![], shell: false, env: vec![] });
    let acts = h.call(
        fc,
        accept(
            &offer,
            vec![
                task("big", "cpus:4;mem:1MiB"),
                task("", "cpus:1"),
                task("nothing", "disk:1GiB"),
                empty_argv,
                task("ok", "cpus:1.5;mem:1GiB"),
                task("ok", "cpus:0.1;mem:1MiB"),
                task("late", "cpus:1;mem:1MiB"),
                task("nomem", "cpus:0.1"),
            ],
            Some(f64::NAN),
        ),
    );
    let launched = run_tasks(&acts, ac);
    assert_eq!(launched.len(), 1);
    assert_eq!(launched[0].task_id.as_str(), "ok");
    let ups = updates(&acts, fc);
    assert_eq!(ups.len(), 7, "{ups:#?}");
    for u in &ups {
        assert_eq!(u.state, TaskState::Error);
        assert_eq!(u.source, UpdateSource::Master);
        assert_eq!(u.reason, "invalid launch");
        assert!(u.uuid.is_none());
    }
    assert_eq!(ups[0].message, "task big asks for cpus:4;mem:1MiB but the offer has cpus:2;mem:2GiB left");
    assert!(ups[1].message.contains("empty task id"), "{}", ups[1].message);
    assert!(ups[2].message.contains("no cpus and no mem"), "{}", ups[2].message);
    assert!(ups[3].message.contains("empty command"), "{}", ups[3].message);
    assert!(ups[4].message.contains("twice"), "{}", ups[4].message);
    assert!(ups[5].message.contains("cpus:0.5;mem:1GiB left"), "{}", ups[5].message);
    // Zero-sized in one kind the agent offers: refused, naming the task.
    assert!(
        ups[6].message.contains("task nomem") && ups[6].message.contains("mem > 0"),
        "{}",
        ups[6].message
    );
    // An id already in use is refused too.
    let again = single_offer(&h.advance(5 * MS), fc);
    assert_eq!(again.resources, res("cpus:0.5;mem:1GiB"));
    let acts = h.call(fc, accept(&again, vec![task("ok", "cpus:0.1;mem:1MiB")], None));
    assert!(run_tasks(&acts, ac).is_empty());
    assert!(updates(&acts, fc)[0].message.contains("already exists"));
    assert_eq!(h.m.tasks().len(), 1);
}

#[test]
fn stale_offers_drop_every_task_and_recover_the_valid_ones() {
    let mut h = Harness::new();
    let (fc, _) = h.subscribe("alice", SEC);
    let (ac, _) = h.add_agent("cpus:2;mem:2GiB");
    let offer = single_offer(&h.advance(5 * MS), fc);
    let acts = h.call(
        fc,
        SchedulerCall::Accept {
            offer_ids: vec![offer.id.clone(), OfferId::new("m-O99")],
            operations: vec![Operation::Launch { tasks: vec![task("a", "cpus:1"), task("b", "cpus:1")] }],
            refuse_seconds: Some(-3.0),
        },
    );
    assert!(run_tasks(&acts, ac).is_empty());
    let ups = updates(&acts, fc);
    assert_eq!(ups.len(), 2);
    assert!(ups.iter().all(|u| u.state == TaskState::Dropped && u.reason == "offer no longer valid"));
    assert!(ups[0].message.contains("m-O99"), "{}", ups[0].message);
    // The valid offer was recovered and comes again; the used one is gone for good.
    let again = single_offer(&h.advance(5 * MS), fc);
    assert_eq!(again.resources, res("cpus:2;mem:2GiB"));
    let acts = h.call(fc, accept(&offer, vec![task("c", "cpus:1")], None));
    assert_eq!(updates(&acts, fc)[0].state, TaskState::Dropped);
    // An accept naming no offer at all.
    let acts =
        h.call(fc, SchedulerCall::Accept { offer_ids: vec![], operations: vec![], refuse_seconds: None });
    assert!(acts.is_empty(), "{acts:?}");
    assert!(h.m.tasks().is_empty());
}

#[test]
fn updates_are_forwarded_and_acks_reach_the_agent() {
    let mut h = Harness::new();
    let s = h.running_task("cpus:2;mem:2GiB", "cpus:1;mem:1GiB", SEC);
    let (uuid, acts) = h.status(s.ac, &s.fw, &s.agent, "t1", TaskState::Finished);
    let ups = updates(&acts, s.fc);
    assert_eq!(ups.len(), 1);
    assert_eq!(ups[0].state, TaskState::Finished);
    assert_eq!(ups[0].uuid, Some(uuid));
    assert_eq!(ups[0].agent_id.as_ref(), Some(&s.agent));
    // A retry of the same update is forwarded again.
    let acts = h.agent(s.ac, AgentMessage::StatusUpdate(ups[0].clone()));
    assert_eq!(updates(&acts, s.fc).len(), 1);
    let acts = h.call(
        s.fc,
        SchedulerCall::Acknowledge { agent_id: s.agent.clone(), task_id: TaskId::new("t1"), uuid },
    );
    assert_eq!(
        to_agent(&acts, s.ac),
        vec![MasterToAgent::StatusAck { framework_id: s.fw.clone(), task_id: TaskId::new("t1"), uuid }]
    );
    // Completed but still listed, with its exit code.
    let t = &h.m.tasks()[0];
    assert_eq!((t.state, t.exit_code), (TaskState::Finished, Some(0)));
    // A late retry of an acknowledged update is acknowledged by the master itself.
    let acts = h.agent(s.ac, AgentMessage::StatusUpdate(ups[0].clone()));
    assert!(updates(&acts, s.fc).is_empty());
    assert_eq!(to_agent(&acts, s.ac).len(), 1);
    // Invalid transitions are not forwarded.
    let (_, acts) = h.status(s.ac, &s.fw, &s.agent, "t1", TaskState::Running);
    assert!(updates(&acts, s.fc).is_empty());
}

#[test]
fn terminal_updates_return_resources() {
    let mut h = Harness::new();
    let s = h.running_task("cpus:2;mem:2GiB", "cpus:2;mem:2GiB", SEC);
    assert!(offers(&h.advance(2 * SEC), s.fc).is_empty(), "the agent is full");
    let (_, acts) = h.status(s.ac, &s.fw, &s.agent, "t1", TaskState::Failed);
    assert_eq!(updates(&acts, s.fc)[0].state, TaskState::Failed);
    let offer = single_offer(&h.advance(5 * MS), s.fc);
    assert_eq!(offer.resources, res("cpus:2;mem:2GiB"));
    assert_eq!(h.m.agents()[0].used, Resources::default());
    assert_eq!(h.m.agents()[0].tasks, 0);
}

#[test]
fn decline_filters_hide_the_agent_until_they_expire() {
    let mut h = Harness::new();
    let (f1, _) = h.subscribe("alice", SEC);
    let (f2, _) = h.subscribe("bob", SEC);
    h.add_agent("cpus:4;mem:4GiB");
    let o = single_offer(&h.advance(5 * MS), f1);
    h.call(f1, decline(&o, Some(10.0)));
    let acts = h.advance(5 * MS);
    assert!(offers(&acts, f1).is_empty());
    let o2 = single_offer(&acts, f2);
    assert_eq!(o2.resources, o.resources);
    h.call(f2, decline(&o2, Some(100.0)));
    // Before the filter of f1 expires nobody gets it; then f1 does again.
    let acts = h.advance(9 * SEC);
    assert!(offers(&acts, f1).is_empty() && offers(&acts, f2).is_empty(), "{acts:?}");
    let acts = h.advance(SEC + 5 * MS);
    assert_eq!(single_offer(&acts, f1).resources, o.resources);
    assert!(offers(&acts, f2).is_empty());
}

#[test]
fn default_refuse_applies_when_none_is_given() {
    let mut h = Harness::new();
    let (fc, _) = h.subscribe("alice", SEC);
    h.add_agent("cpus:1");
    let o = single_offer(&h.advance(5 * MS), fc);
    h.call(fc, decline(&o, None));
    assert!(offers(&h.advance(4 * SEC), fc).is_empty());
    assert_eq!(offers(&h.advance(SEC + 5 * MS), fc).len(), 1);
}

#[test]
fn a_larger_offer_passes_a_filter_on_a_smaller_one() {
    let mut h = Harness::new();
    let s = h.running_task("cpus:4;mem:4GiB", "cpus:2;mem:2GiB", SEC);
    let leftover = single_offer(&h.advance(5 * MS), s.fc);
    assert_eq!(leftover.resources, res("cpus:2;mem:2GiB"));
    h.call(s.fc, decline(&leftover, Some(60.0)));
    assert!(offers(&h.advance(2 * SEC), s.fc).is_empty());
    h.status(s.ac, &s.fw, &s.agent, "t1", TaskState::Finished);
    let whole = single_offer(&h.advance(5 * MS), s.fc);
    assert_eq!(whole.resources, res("cpus:4;mem:4GiB"));
}

#[test]
fn accept_refuse_seconds_filters_the_leftover() {
    let mut h = Harness::new();
    let (fc, _) = h.subscribe("alice", SEC);
    h.add_agent("cpus:4");
    let o = single_offer(&h.advance(5 * MS), fc);
    h.call(fc, accept(&o, vec![task("a", "cpus:1")], Some(3.0)));
    assert!(offers(&h.advance(2 * SEC), fc).is_empty());
    assert_eq!(single_offer(&h.advance(SEC + 5 * MS), fc).resources, res("cpus:3"));
}

#[test]
fn revive_clears_filters() {
    let mut h = Harness::new();
    let (fc, _) = h.subscribe("alice", SEC);
    h.add_agent("cpus:4");
    let o = single_offer(&h.advance(5 * MS), fc);
    h.call(fc, decline(&o, Some(1e12)));
    assert!(offers(&h.advance(3 * SEC), fc).is_empty());
    h.call(fc, SchedulerCall::Revive);
    assert_eq!(single_offer(&h.advance(5 * MS), fc).resources, res("cpus:4"));
}

#[test]
fn suppress_stops_offers_but_keeps_outstanding_ones() {
    let mut h = Harness::new();
    let (fc, _) = h.subscribe("alice", SEC);
    let (ac, _) = h.add_agent("cpus:4");
    h.add_agent("cpus:4");
    let acts = h.advance(5 * MS);
    // Both agents come in one batch.
    assert_eq!(acts.len(), 1, "{acts:?}");
    let os = offers(&acts, fc);
    assert_eq!(os.len(), 2);
    h.call(fc, SchedulerCall::Suppress);
    assert_eq!(h.m.frameworks()[0].status, FrameworkViewStatus::Suppressed);
    h.call(fc, decline(&os[1], Some(0.0)));
    let acts = h.call(fc, accept(&os[0], vec![task("a", "cpus:1")], None));
    assert_eq!(run_tasks(&acts, ac).len(), 1);
    assert!(offers(&h.advance(3 * SEC), fc).is_empty());
    h.call(fc, SchedulerCall::Revive);
    assert_eq!(h.m.frameworks()[0].status, FrameworkViewStatus::Active);
    assert_eq!(offers(&h.advance(5 * MS), fc).len(), 2);
}

#[test]
fn a_suppress_ends_with_its_connection() {
    let mut h = Harness::new();
    let (fc, fw) = h.subscribe("alice", 60 * SEC);
    h.add_agent("cpus:4");
    h.call(fc, SchedulerCall::Suppress);
    assert_eq!(h.m.frameworks()[0].status, FrameworkViewStatus::Suppressed);
    h.m.handle(h.now, Event::FrameworkDisconnected { conn: fc });
    h.drain();
    assert_eq!(h.m.frameworks()[0].status, FrameworkViewStatus::Disconnected);
    let fc2 = h.conn();
    h.call(fc2, SchedulerCall::Subscribe(info(Some(&fw), 60 * SEC)));
    assert_eq!(h.m.frameworks()[0].status, FrameworkViewStatus::Active);
    assert_eq!(offers(&h.advance(5 * MS), fc2).len(), 1);
}

#[test]
fn agent_disconnect_rescinds_its_offers() {
    let mut h = Harness::new();
    let (fc, _) = h.subscribe("alice", SEC);
    let (ac, _) = h.add_agent("cpus:4");
    let o = single_offer(&h.advance(5 * MS), fc);
    h.m.handle(h.now, Event::AgentDisconnected { conn: ac });
    let acts = h.drain();
    assert_eq!(
        acts,
        vec![Action::ToFramework { conn: fc, event: SchedulerEvent::Rescind { offer_id: o.id.clone() } }]
    );
    assert_eq!(h.m.agents()[0].status, AgentViewStatus::Disconnected);
    assert!(offers(&h.advance(2 * SEC), fc).is_empty());
    let acts = h.call(fc, accept(&o, vec![task("a", "cpus:1")], None));
    assert_eq!(updates(&acts, fc)[0].state, TaskState::Dropped);
}

#[test]
fn silent_agents_become_unreachable() {
    let mut h = Harness::new();
    let s = h.running_task("cpus:4", "cpus:1", SEC);
    let o = single_offer(&h.advance(5 * MS), s.fc);
    // Heartbeats keep it alive.
    h.advance(15 * SEC);
    let acts = h.agent(s.ac, AgentMessage::Heartbeat);
    assert_eq!(to_agent(&acts, s.ac), vec![MasterToAgent::HeartbeatAck]);
    assert!(h.advance(15 * SEC).iter().all(|a| closed(std::slice::from_ref(a), s.ac).is_none()));
    let acts = h.advance(6 * SEC);
    assert!(closed(&acts, s.ac).is_some());
    assert!(
        acts.contains(&Action::ToFramework { conn: s.fc, event: SchedulerEvent::Rescind { offer_id: o.id } })
    );
    let ups = updates(&acts, s.fc);
    assert_eq!(ups.len(), 1);
    assert_eq!(ups[0].state, TaskState::Unreachable);
    assert_eq!(ups[0].reason, "agent unreachable");
    assert_eq!(ups[0].source, UpdateSource::Master);
    assert_eq!(ups[0].uuid, None);
    assert_eq!(h.m.agents()[0].status, AgentViewStatus::Unreachable);
    assert_eq!(h.m.tasks()[0].state, TaskState::Unreachable);
    // Messages on the closed connection are ignored.
    assert!(h.agent(s.ac, AgentMessage::Heartbeat).is_empty());
    // A kill now repeats where the task stands.
    let acts = h.call(s.fc, SchedulerCall::Kill { task_id: TaskId::new("t1") });
    assert_eq!(updates(&acts, s.fc)[0].state, TaskState::Unreachable);
}

#[test]
fn a_disconnected_agent_times_out_too() {
    let mut h = Harness::new();
    let s = h.running_task("cpus:4", "cpus:1", SEC);
    h.m.handle(h.now, Event::AgentDisconnected { conn: s.ac });
    h.drain();
    assert_eq!(h.m.tasks()[0].state, TaskState::Running);
    let acts = h.advance(21 * SEC);
    assert_eq!(updates(&acts, s.fc)[0].state, TaskState::Unreachable);
}

/// An update or report that would move an ended task backwards changes nothing: the update is
/// acknowledged to its agent (so it stops retrying) and not forwarded; a re-registered agent
/// that still runs the task is told to kill it.
#[test]
fn an_ended_task_does_not_move_backwards() {
    let mut h = Harness::new();
    let s = h.running_task("cpus:4", "cpus:1", 60 * SEC);
    h.status(s.ac, &s.fw, &s.agent, "t1", TaskState::Finished);
    let (uuid, acts) = h.status(s.ac, &s.fw, &s.agent, "t1", TaskState::Running);
    assert!(updates(&acts, s.fc).is_empty(), "{acts:?}");
    assert_eq!(
        to_agent(&acts, s.ac),
        [MasterToAgent::StatusAck { framework_id: s.fw.clone(), task_id: TaskId::new("t1"), uuid }]
    );
    assert_eq!(h.m.tasks()[0].state, TaskState::Finished);
    let report =
        TaskReport { framework_id: s.fw.clone(), task: task("t1", "cpus:1"), state: TaskState::Running };
    let (ac2, _, acts) = h.register(Some(s.agent.clone()), "cpus:4", vec![report]);
    assert!(to_agent(&acts, ac2)
        .contains(&MasterToAgent::KillTask { framework_id: s.fw.clone(), task_id: TaskId::new("t1") }));
    assert_eq!(h.m.tasks()[0].state, TaskState::Finished);
}

#[test]
fn re_registration_brings_tasks_back() {
    let mut h = Harness::new();
    let s = h.running_task("cpus:4;mem:4GiB", "cpus:1;mem:1GiB", SEC);
    // A second task, staged only.
    let o = single_offer(&h.advance(5 * MS), s.fc);
    h.call(s.fc, accept(&o, vec![task("t2", "cpus:1;mem:1GiB")], None));
    h.advance(21 * SEC);
    assert_eq!(h.m.agents()[0].status, AgentViewStatus::Unreachable);
    // The agent comes back and reports t1 only.
    let report = TaskReport {
        framework_id: s.fw.clone(),
        task: task("t1", "cpus:1;mem:1GiB"),
        state: TaskState::Running,
    };
    let (ac2, id, acts) = h.register(Some(s.agent.clone()), "cpus:4;mem:4GiB", vec![report]);
    assert_eq!(id, s.agent);
    let ups = updates(&acts, s.fc);
    assert_eq!(ups.len(), 2, "{ups:#?}");
    assert_eq!((ups[0].task_id.as_str(), ups[0].state), ("t1", TaskState::Running));
    assert_eq!(ups[0].reason, "agent re-registered");
    assert_eq!((ups[1].task_id.as_str(), ups[1].state), ("t2", TaskState::Gone));
    assert_eq!(ups[1].reason, "task not reported by re-registered agent");
    // Each task's state changes, as `agora describe task` shows them.
    let history = |id: &str| -> Vec<(TaskState, String)> {
        let key = TaskKey::new(s.fw.clone(), TaskId::new(id));
        h.m.task_history(&key).expect("known").into_iter().map(|t| (t.state, t.reason.to_string())).collect()
    };
    let seen = |v: &[(TaskState, &str)]| v.iter().map(|(s, r)| (*s, r.to_string())).collect::<Vec<_>>();
    assert_eq!(
        history("t1"),
        seen(&[
            (TaskState::Staging, "launched"),
            (TaskState::Running, "test"),
            (TaskState::Unreachable, "agent unreachable"),
            (TaskState::Running, "agent re-registered"),
        ])
    );
    assert_eq!(
        history("t2"),
        seen(&[
            (TaskState::Staging, "launched"),
            (TaskState::Unreachable, "agent unreachable"),
            (TaskState::Gone, "task not reported by re-registered agent"),
        ])
    );
    let a = &h.m.agents()[0];
    assert_eq!((a.status.as_str(), a.tasks), ("active", 1));
    assert_eq!(a.used, res("cpus:1;mem:1GiB"));
    assert_eq!(single_offer(&h.advance(5 * MS), s.fc).resources, res("cpus:3;mem:3GiB"));
    // The new connection works; the old one is gone.
    let (_, acts) = h.status(ac2, &s.fw, &s.agent, "t1", TaskState::Finished);
    assert_eq!(updates(&acts, s.fc)[0].state, TaskState::Finished);
}

#[test]
fn a_second_connection_replaces_the_first() {
    let mut h = Harness::new();
    let (ac1, id) = h.add_agent("cpus:1");
    let (ac2, id2, acts) = h.register(Some(id.clone()), "cpus:2", vec![]);
    assert_eq!(id2, id);
    assert!(closed(&acts, ac1).is_some());
    assert_eq!(h.m.agents()[0].resources, res("cpus:2"));
    // The late disconnect of the old connection changes nothing.
    h.m.handle(h.now, Event::AgentDisconnected { conn: ac1 });
    assert_eq!(h.m.agents()[0].status, AgentViewStatus::Active);
    let acts = h.agent(ac2, AgentMessage::Heartbeat);
    assert_eq!(to_agent(&acts, ac2), vec![MasterToAgent::HeartbeatAck]);
    // Someone else cannot take the id.
    let conn = h.conn();
    h.m.handle(
        h.now,
        Event::Agent {
            conn,
            principal: "mallory".into(),
            msg: AgentMessage::Register {
                agent_id: Some(id),
                hostname: "x".into(),
                resources: res("cpus:1"),
                attributes: Attributes::default(),
                tasks: vec![],
            },
        },
    );
    assert_eq!(closed(&h.drain(), conn).map(|e| e.code), Some(ErrorCode::Unauthorized));
}

#[test]
fn a_restarted_master_learns_agents_back() {
    let mut h = Harness::new();
    let report = TaskReport {
        framework_id: FrameworkId::new("old-F1"),
        task: task("x", "cpus:1"),
        state: TaskState::Running,
    };
    let (_, id, _) = h.register(Some(AgentId::new("old-A7")), "cpus:4", vec![report]);
    assert_eq!(id.as_str(), "old-A7");
    assert_eq!(h.m.agents()[0].used, res("cpus:1"));
    assert_eq!(h.m.tasks()[0].state, TaskState::Running);
    let (fc, _) = h.subscribe("alice", SEC);
    assert_eq!(single_offer(&h.advance(5 * MS), fc).resources, res("cpus:3"));
}

#[test]
fn failover_within_the_timeout_keeps_tasks_and_resends_updates() {
    let mut h = Harness::new();
    let s = h.running_task("cpus:4", "cpus:1", 15 * SEC);
    h.status(s.ac, &s.fw, &s.agent, "t1", TaskState::Running);
    h.m.handle(h.now, Event::FrameworkDisconnected { conn: s.fc });
    h.drain();
    assert_eq!(h.m.frameworks()[0].status, FrameworkViewStatus::Disconnected);
    let (u_fin, acts) = h.status(s.ac, &s.fw, &s.agent, "t1", TaskState::Finished);
    assert!(acts.iter().all(|a| !matches!(a, Action::ToFramework { .. })));
    h.advance(10 * SEC);
    let fc2 = h.conn();
    let acts = h.call(fc2, SchedulerCall::Subscribe(info(Some(&s.fw), 60 * SEC)));
    assert!(
        matches!(&acts[0], Action::ToFramework { conn, event: SchedulerEvent::Subscribed { framework_id, .. } } if *conn == fc2 && *framework_id == s.fw)
    );
    let ups = updates(&acts, fc2);
    assert_eq!(ups.iter().map(|u| u.state).collect::<Vec<_>>(), [TaskState::Running, TaskState::Finished]);
    assert_eq!(h.m.frameworks()[0].status, FrameworkViewStatus::Active);
    assert_eq!(h.m.tasks().len(), 1);
    // Nothing is removed when the old deadline passes.
    h.agent(s.ac, AgentMessage::Heartbeat);
    h.advance(10 * SEC);
    assert_eq!(h.m.frameworks().len(), 1);
    let acts = h.call(
        fc2,
        SchedulerCall::Acknowledge { agent_id: s.agent.clone(), task_id: TaskId::new("t1"), uuid: u_fin },
    );
    assert_eq!(to_agent(&acts, s.ac).len(), 1);
}

#[test]
fn the_newest_state_shows_while_an_earlier_update_awaits_its_acknowledgement() {
    // A detached run's task killed: the agent's TASK_KILLED waits behind a TASK_KILLING that
    // the away framework does not acknowledge; its notice makes the master show KILLED (and
    // free the resources) at once, while the framework still gets both updates in order.
    let mut h = Harness::new();
    let s = h.running_task("cpus:4", "cpus:1", 3600 * SEC);
    h.m.handle(h.now, Event::FrameworkDisconnected { conn: s.fc });
    h.drain();
    let (u_killing, _) = h.status(s.ac, &s.fw, &s.agent, "t1", TaskState::Killing);
    assert_eq!(h.m.tasks()[0].state, TaskState::Killing);
    let u_killed = h.uuid();
    let killed = TaskStatus {
        task_id: TaskId::new("t1"),
        framework_id: s.fw.clone(),
        agent_id: Some(s.agent.clone()),
        state: TaskState::Killed,
        uuid: Some(u_killed),
        source: UpdateSource::Executor,
        reason: "killed".into(),
        message: String::new(),
        exit_code: None,
        signal: Some(9),
        usage: None,
        timestamp_ms: 0,
    };
    let acts = h.agent(s.ac, AgentMessage::LatestState(killed.clone()));
    assert!(to_agent(&acts, s.ac).is_empty(), "nothing acknowledged: {acts:?}");
    assert_eq!(h.m.tasks()[0].state, TaskState::Killed);
    assert_eq!(h.m.agents()[0].used, Resources::default());
    // The KILLING retried meanwhile changes nothing shown.
    h.agent(
        s.ac,
        AgentMessage::StatusUpdate(TaskStatus {
            state: TaskState::Killing,
            uuid: Some(u_killing),
            ..killed.clone()
        }),
    );
    assert_eq!(h.m.tasks()[0].state, TaskState::Killed);
    // The framework comes back: it gets KILLING first; its acknowledgement lets KILLED come.
    let fc2 = h.conn();
    let acts = h.call(fc2, SchedulerCall::Subscribe(info(Some(&s.fw), 3600 * SEC)));
    assert_eq!(updates(&acts, fc2).iter().map(|u| u.state).collect::<Vec<_>>(), [TaskState::Killing]);
    let acts = h.call(
        fc2,
        SchedulerCall::Acknowledge { agent_id: s.agent.clone(), task_id: TaskId::new("t1"), uuid: u_killing },
    );
    assert_eq!(to_agent(&acts, s.ac).len(), 1);
    assert_eq!(h.m.tasks().len(), 1, "not completed before its KILLED update came");
    let acts = h.agent(s.ac, AgentMessage::StatusUpdate(killed));
    assert_eq!(updates(&acts, fc2).iter().map(|u| u.state).collect::<Vec<_>>(), [TaskState::Killed]);
    h.call(
        fc2,
        SchedulerCall::Acknowledge { agent_id: s.agent.clone(), task_id: TaskId::new("t1"), uuid: u_killed },
    );
    assert!(h.m.tasks().iter().all(|t| t.state == TaskState::Killed));
    assert_eq!(h.m.agents()[0].used, Resources::default());
}

#[test]
fn pending_tasks_say_why_they_wait() {
    let mut h = Harness::new();
    h.add_agent("cpus:1;mem:1GiB");
    let (f1, _) = h.subscribe("alice", SEC);
    // Alice holds the whole agent in an offer (no demand stated: whole agents).
    let offer = single_offer(&h.advance(5 * MS), f1);
    let (f2, fw2) = h.subscribe("bob", SEC);
    let shape = Demand { resources: res("cpus:0.5"), count: 3 };
    h.call(
        f2,
        SchedulerCall::RequestTasks {
            demands: vec![shape.clone()],
            task_ids: vec![vec![TaskId::new("a"), TaskId::new("b")]],
        },
    );
    h.advance(5 * MS);
    let listed = |h: &Harness| -> Vec<(Option<String>, u32, String)> {
        h.m.pending_tasks()
            .into_iter()
            .map(|p| (p.task_id.map(|t| t.to_string()), p.count, p.reason))
            .collect()
    };
    let held = "waiting: the free resources are held in offers to other frameworks".to_string();
    assert_eq!(
        listed(&h),
        [(Some("a".into()), 1, held.clone()), (Some("b".into()), 1, held.clone()), (None, 1, held)]
    );
    assert!(h.m.pending_tasks().iter().all(|p| p.framework_id == fw2 && p.framework_name == "test"));
    // Alice launches 0.8 cpus and refuses the rest: no agent has 0.5 cpus free any more.
    h.call(f1, accept(&offer, vec![task("hog", "cpus:0.8;mem:64MiB")], Some(60.0)));
    h.advance(5 * MS);
    let short = "waiting: needs cpus:0.5, largest free cpus:0.2".to_string();
    assert!(listed(&h).iter().all(|(_, _, r)| *r == short), "{:?}", listed(&h));
    // A demand without names: one entry for all its tasks; none once it asks for nothing.
    h.call(f2, SchedulerCall::Request { demands: vec![shape] });
    assert_eq!(listed(&h), [(None, 3, short)]);
    h.call(f2, SchedulerCall::Request { demands: vec![] });
    assert!(listed(&h).is_empty());
}

#[test]
fn failover_from_a_live_connection_closes_the_old_one() {
    let mut h = Harness::new();
    let (f1, fw) = h.subscribe("alice", SEC);
    h.add_agent("cpus:1");
    let o = single_offer(&h.advance(5 * MS), f1);
    let f2 = h.conn();
    let acts = h.call(f2, SchedulerCall::Subscribe(info(Some(&fw), SEC)));
    assert!(closed(&acts, f1).is_some_and(|e| e.message.contains("failed over")));
    // The old instance's offer is void and the resources go to the new one.
    let acts = h.call(f2, accept(&o, vec![task("a", "cpus:1")], None));
    assert_eq!(updates(&acts, f2)[0].state, TaskState::Dropped);
    assert_eq!(single_offer(&h.advance(5 * MS), f2).resources, res("cpus:1"));
    h.m.handle(h.now, Event::FrameworkDisconnected { conn: f1 });
    assert_eq!(h.m.frameworks()[0].status, FrameworkViewStatus::Active);
}

#[test]
fn past_the_failover_timeout_tasks_are_killed_and_the_framework_removed() {
    let mut h = Harness::new();
    let s = h.running_task("cpus:4", "cpus:1", 10 * SEC);
    h.m.handle(h.now, Event::FrameworkDisconnected { conn: s.fc });
    h.drain();
    let acts = h.advance(9 * SEC);
    assert!(to_agent(&acts, s.ac).is_empty());
    h.agent(s.ac, AgentMessage::Heartbeat);
    let acts = h.advance(2 * SEC);
    assert_eq!(to_agent(&acts, s.ac), vec![MasterToAgent::ShutdownFramework { framework_id: s.fw.clone() }]);
    assert!(h.m.frameworks().is_empty());
    // The agent reports the kill: acknowledged by the master, resources back.
    let (uuid, acts) = h.status(s.ac, &s.fw, &s.agent, "t1", TaskState::Killed);
    assert_eq!(
        to_agent(&acts, s.ac),
        vec![MasterToAgent::StatusAck { framework_id: s.fw.clone(), task_id: TaskId::new("t1"), uuid }]
    );
    assert_eq!(h.m.agents()[0].used, Resources::default());
    assert_eq!(h.m.tasks()[0].state, TaskState::Killed);
    // Coming back is refused.
    let c = h.conn();
    let acts = h.call(c, SchedulerCall::Subscribe(info(Some(&s.fw), SEC)));
    let err = closed(&acts, c).expect("closed");
    assert_eq!(err.code, ErrorCode::NotFound);
    assert!(err.message.contains("subscribe without an id"), "{}", err.message);
}

#[test]
fn teardown_kills_tasks_and_closes() {
    let mut h = Harness::new();
    let s = h.running_task("cpus:4", "cpus:1", 60 * SEC);
    let acts = h.call(s.fc, SchedulerCall::Teardown);
    assert_eq!(to_agent(&acts, s.ac), vec![MasterToAgent::ShutdownFramework { framework_id: s.fw.clone() }]);
    assert!(closed(&acts, s.fc).is_some_and(|e| e.message.contains("torn down")));
    assert!(h.m.frameworks().is_empty());
    assert!(h.call(s.fc, SchedulerCall::Revive).is_empty());
}

#[test]
fn a_teardown_with_a_reason_gives_it_to_the_killed_tasks() {
    let mut h = Harness::new();
    let s = h.running_task("cpus:4", "cpus:1", 60 * SEC);
    // Bounded: an empty or oversized reason is refused and nothing is torn down.
    let acts =
        h.call(s.fc, SchedulerCall::TeardownBecause { reason: "x".repeat(MAX_TEARDOWN_REASON + 1).into() });
    assert!(closed(&acts, s.fc).is_none());
    assert_eq!(h.m.frameworks().len(), 1);
    let acts = h.call(s.fc, SchedulerCall::TeardownBecause { reason: Reason::RunInterrupted });
    assert_eq!(to_agent(&acts, s.ac), vec![MasterToAgent::ShutdownFramework { framework_id: s.fw.clone() }]);
    assert!(closed(&acts, s.fc).is_some_and(|e| e.message.contains("run interrupted")));
    // The agent reports its usual `killed`; the master keeps the teardown's reason.
    h.status(s.ac, &s.fw, &s.agent, "t1", TaskState::Killed);
    let t = h.m.tasks().into_iter().find(|t| t.id == TaskId::new("t1")).expect("task listed");
    assert_eq!((t.state, t.reason.as_str()), (TaskState::Killed, "run interrupted"));
}

#[test]
fn failover_with_another_principal_is_refused() {
    let mut h = Harness::new();
    let (fc, fw) = h.subscribe("alice", SEC);
    let c = h.conn();
    let acts = h.call_as(c, "mallory", SchedulerCall::Subscribe(info(Some(&fw), SEC)));
    assert_eq!(closed(&acts, c).map(|e| e.code), Some(ErrorCode::Unauthorized));
    assert!(closed(&acts, fc).is_none());
    let f = &h.m.frameworks()[0];
    assert_eq!((f.status.as_str(), f.principal.as_str()), ("active", "alice"));
}

#[test]
fn the_first_message_must_register_or_subscribe() {
    let mut h = Harness::new();
    let c = h.conn();
    let acts = h.agent(c, AgentMessage::Heartbeat);
    assert_eq!(closed(&acts, c).map(|e| e.code), Some(ErrorCode::Unexpected));
    let c = h.conn();
    let acts = h.call(c, SchedulerCall::Revive);
    assert_eq!(closed(&acts, c).map(|e| e.code), Some(ErrorCode::Unexpected));
    // Mixing roles on one connection is refused too.
    let (fc, _) = h.subscribe("alice", SEC);
    let acts = h.agent(fc, AgentMessage::Heartbeat);
    assert!(closed(&acts, fc).is_some());
    assert_eq!(h.m.frameworks()[0].status, FrameworkViewStatus::Disconnected);
}

#[test]
fn drf_offers_to_the_lowest_dominant_share() {
    let mut h = Harness::new();
    let (f1, fw1) = h.subscribe("alice", SEC);
    let (a1c, _) = h.add_agent("cpus:4;mem:4GiB");
    let o = single_offer(&h.advance(5 * MS), f1);
    let acts = h.call(f1, accept(&o, vec![task("big", "cpus:3;mem:3GiB")], None));
    assert_eq!(run_tasks(&acts, a1c).len(), 1);
    let (f2, fw2) = h.subscribe("bob", SEC);
    h.add_agent("cpus:4;mem:4GiB");
    let acts = h.advance(5 * MS);
    // f1 holds 3/8 of the cluster, f2 nothing: f2 gets the first agent (1/8), and still
    // being lower, the second too, although f1 would win a tie by id.
    assert!(offers(&acts, f1).is_empty());
    let o2 = offers(&acts, f2);
    assert_eq!(o2.len(), 2);
    assert!(o2.iter().all(|o| o.framework_id == fw2));
    // f2 now holds 5/8 cpus; what it declines goes to f1.
    h.call(
        f2,
        SchedulerCall::Decline {
            offer_ids: o2.iter().map(|o| o.id.clone()).collect(),
            refuse_seconds: Some(60.0),
        },
    );
    let acts = h.advance(5 * MS);
    let o1 = offers(&acts, f1);
    assert_eq!(o1.len(), 2);
    assert!(o1.iter().all(|o| o.framework_id == fw1));
}

#[test]
fn reconcile_explicit_and_implicit() {
    let mut h = Harness::new();
    let s = h.running_task("cpus:4", "cpus:1", SEC);
    let o = single_offer(&h.advance(5 * MS), s.fc);
    h.call(s.fc, accept(&o, vec![task("t2", "cpus:1"), task("t3", "cpus:1")], None));
    h.status(s.ac, &s.fw, &s.agent, "t3", TaskState::Finished);
    let acts = h.call(s.fc, SchedulerCall::Reconcile { task_ids: vec![] });
    let ups = updates(&acts, s.fc);
    assert_eq!(
        ups.iter().map(|u| (u.task_id.as_str(), u.state)).collect::<Vec<_>>(),
        [("t1", TaskState::Running), ("t2", TaskState::Staging), ("t3", TaskState::Finished)]
    );
    assert!(ups.iter().all(|u| u.uuid.is_none()));
    let ids = ["t3", "nope", "t1"].map(TaskId::new).to_vec();
    let ups = updates(&h.call(s.fc, SchedulerCall::Reconcile { task_ids: ids }), s.fc);
    assert_eq!(
        ups.iter().map(|u| (u.task_id.as_str(), u.state)).collect::<Vec<_>>(),
        [("t3", TaskState::Finished), ("nope", TaskState::Unknown), ("t1", TaskState::Running)]
    );
    assert_eq!(ups[0].exit_code, Some(0));
    assert_eq!(ups[1].reason, "reconciliation: unknown task");
}

#[test]
fn kills_from_frameworks_and_operators() {
    let mut h = Harness::new();
    let s = h.running_task("cpus:4", "cpus:1", SEC);
    let acts = h.call(s.fc, SchedulerCall::Kill { task_id: TaskId::new("t1") });
    assert_eq!(
        to_agent(&acts, s.ac),
        vec![MasterToAgent::KillTask { framework_id: s.fw.clone(), task_id: TaskId::new("t1") }]
    );
    let acts = h.call(s.fc, SchedulerCall::Kill { task_id: TaskId::new("ghost") });
    let ups = updates(&acts, s.fc);
    assert_eq!((ups[0].state, ups[0].reason.as_str()), (TaskState::Unknown, "reconciliation: unknown task"));
    assert!(h.m.kill_task(h.now, &TaskId::new("t1")).is_ok());
    assert_eq!(to_agent(&h.drain(), s.ac).len(), 1);
    assert_eq!(h.m.kill_task(h.now, &TaskId::new("ghost")).map_err(|e| e.code), Err(ErrorCode::NotFound));
    h.status(s.ac, &s.fw, &s.agent, "t1", TaskState::Killed);
    assert_eq!(h.m.kill_task(h.now, &TaskId::new("t1")).map_err(|e| e.code), Err(ErrorCode::Invalid));
    // A kill asked while the agent is away goes out when it comes back.
    let o = single_offer(&h.advance(5 * MS), s.fc);
    h.call(s.fc, accept(&o, vec![task("t2", "cpus:1")], None));
    h.m.handle(h.now, Event::AgentDisconnected { conn: s.ac });
    h.drain();
    assert!(h.m.kill_task(h.now, &TaskId::new("t2")).is_ok());
    let report =
        TaskReport { framework_id: s.fw.clone(), task: task("t2", "cpus:1"), state: TaskState::Running };
    let (ac2, _, acts) = h.register(Some(s.agent.clone()), "cpus:4", vec![report]);
    assert!(to_agent(&acts, ac2)
        .contains(&MasterToAgent::KillTask { framework_id: s.fw.clone(), task_id: TaskId::new("t2") }));
}

#[test]
fn output_is_located_for_allowed_readers_only() {
    let mut h = Harness::new();
    let s = h.running_task("cpus:4", "cpus:1", SEC);
    let (other, _) = h.subscribe("bob", SEC);
    let t1 = TaskId::new("t1");
    let loc = h.m.locate_output(&Requester::Operator, &t1).expect("operator may read");
    assert_eq!(
        loc,
        OutputLocation { agent_conn: s.ac, agent_id: s.agent.clone(), framework_id: s.fw.clone() }
    );
    assert_eq!(h.m.locate_output(&Requester::Framework(s.fc), &t1), Ok(loc));
    assert_eq!(
        h.m.locate_output(&Requester::Framework(other), &t1).map_err(|e| e.code),
        Err(ErrorCode::Unauthorized)
    );
    assert_eq!(
        h.m.locate_output(&Requester::Framework(999), &t1).map_err(|e| e.code),
        Err(ErrorCode::Unauthorized)
    );
    assert_eq!(
        h.m.locate_output(&Requester::Operator, &TaskId::new("x")).map_err(|e| e.code),
        Err(ErrorCode::NotFound)
    );
    h.m.handle(h.now, Event::AgentDisconnected { conn: s.ac });
    let err = h.m.locate_output(&Requester::Operator, &t1).expect_err("agent away");
    assert!(err.message.contains("not connected"), "{}", err.message);
}

#[test]
fn frameworks_get_heartbeats() {
    let mut h = Harness::new();
    let (fc, _) = h.subscribe("alice", SEC);
    let acts = h.advance(15 * SEC);
    assert_eq!(
        acts.iter()
            .filter(|a| **a == Action::ToFramework { conn: fc, event: SchedulerEvent::Heartbeat })
            .count(),
        1
    );
    assert!(h.call(fc, SchedulerCall::Heartbeat).is_empty());
}

#[test]
fn hostile_input_does_not_panic() {
    let mut h = Harness::new();
    let (fc, fw) = h.subscribe("alice", Duration::MAX);
    let (ac, agent) = h.add_agent("cpus:4;ports:[1-10]");
    let o = single_offer(&h.advance(5 * MS), fc);
    for refuse in [f64::NAN, f64::INFINITY, -1.0, 1e300, f64::MIN_POSITIVE] {
        h.call(
            fc,
            SchedulerCall::Decline { offer_ids: vec![OfferId::new("nope")], refuse_seconds: Some(refuse) },
        );
    }
    h.call(fc, accept(&o, vec![task("p", "cpus:1;ports:[5-20]")], Some(f64::INFINITY)));
    h.call(
        fc,
        SchedulerCall::Acknowledge {
            agent_id: AgentId::new("zz"),
            task_id: TaskId::new("zz"),
            uuid: Uuid::nil(),
        },
    );
    h.status(ac, &fw, &agent, "unknown", TaskState::Running);
    h.status(ac, &FrameworkId::new("other"), &agent, "unknown", TaskState::Running);
    h.agent(
        ac,
        AgentMessage::Register {
            agent_id: None,
            hostname: String::new(),
            resources: Resources::default(),
            attributes: Attributes::default(),
            tasks: vec![],
        },
    );
    h.m.handle(h.now, Event::FrameworkDisconnected { conn: fc });
    h.m.handle(h.now, Event::FrameworkDisconnected { conn: 12345 });
    h.m.handle(h.now, Event::AgentDisconnected { conn: 12345 });
    h.advance(100 * SEC);
    assert_eq!(h.m.frameworks().len(), 1, "a huge failover timeout never expires");
    assert_eq!(refuse_duration(Some(f64::NAN), SEC), Duration::ZERO);
    assert_eq!(refuse_duration(Some(1e300), SEC), MAX_REFUSE);
    assert_eq!(refuse_duration(None, Duration::MAX), MAX_REFUSE);
    assert_eq!(refuse_duration(Some(1.5), SEC), Duration::from_millis(1500));
}

#[test]
fn completed_tasks_are_bounded() {
    let mut h = Harness::new();
    let (fc, fw) = h.subscribe("alice", SEC);
    let (ac, agent) = h.add_agent("cpus:1");
    for i in 0..(COMPLETED_TASKS + 5) {
        let o = single_offer(&h.advance(5 * MS), fc);
        let id = format!("t{i}");
        h.call(fc, accept(&o, vec![task(&id, "cpus:1")], None));
        let (uuid, _) = h.status(ac, &fw, &agent, &id, TaskState::Finished);
        h.call(fc, SchedulerCall::Acknowledge { agent_id: agent.clone(), task_id: TaskId::new(id), uuid });
    }
    let tasks = h.m.tasks();
    assert_eq!(tasks.len(), COMPLETED_TASKS);
    assert!(tasks.iter().all(|t| t.id.as_str() != "t0"));
    assert_eq!(h.m.agents()[0].tasks, 0);
}

#[test]
fn offer_ids_are_read_back_strictly() {
    let m = Master::new(MasterConfig { master_id: "m-1".into(), ..MasterConfig::default() }, Instant::now());
    let mut text = String::new();
    for n in [1u64, 9, 10, 123_456_789, u64::MAX] {
        offer_id_text(&mut text, "m-1", n);
        assert_eq!(text, format!("m-1-O{n}"));
        assert_eq!(m.offer_no(&OfferId::new(text.as_str())), Some(n));
    }
    for bad in ["m-1-O", "m-1-O01", "m-1-O+1", "m-1-O1x", "m-2-O1", "m-1-o1", "m-1-O18446744073709551616"] {
        assert_eq!(m.offer_no(&OfferId::new(bad)), None, "{bad}");
    }
    let ids = m.offer_ids(&[10, 9, 100]);
    assert_eq!(ids, vec![OfferId::new("m-1-O10"), OfferId::new("m-1-O100"), OfferId::new("m-1-O9")]);
}
