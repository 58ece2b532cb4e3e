//! Allocation cycles in slices: events are answered between slices, each agent of a cycle is
//! considered once, and a new cycle waits for the one under way.

use super::*;

/// Agent ids offered in `acts` (to any framework), with how many times each.
fn offered(acts: &[Action]) -> BTreeMap<AgentId, usize> {
    let mut out = BTreeMap::new();
    for a in acts {
        if let Action::ToFramework { event: SchedulerEvent::Offers(o), .. } = a {
            for offer in o {
                *out.entry(offer.agent_id.clone()).or_insert(0) += 1;
            }
        }
    }
    out
}

/// One `handle_timeout` at the harness's current time (one slice at most).
fn step(h: &mut Harness) -> Vec<Action> {
    assert!(h.m.poll_timeout().is_some_and(|t| t <= h.now), "a step is due");
    h.m.handle_timeout(h.now);
    h.drain()
}

#[test]
fn a_cycle_runs_in_slices_and_updates_are_answered_between_them() {
    let mut h = Harness::new();
    h.m.config.allocation_slice = 10;
    // Agent 1 is taken whole by a running task: in the cycle's order, not a candidate.
    let s = h.running_task("cpus:1;mem:1GiB", "cpus:1;mem:1GiB", SEC);
    let mut agents = vec![s.agent.clone()];
    for _ in 1..100 {
        agents.push(h.add_agent("cpus:2;mem:2GiB").1);
    }
    // The cycle's order: by id ("m-A1", "m-A10", "m-A100", "m-A11", ...).
    agents.sort();
    let slices: Vec<BTreeSet<AgentId>> =
        agents.chunks(10).map(|c| c.iter().filter(|a| **a != s.agent).cloned().collect()).collect();
    assert_eq!(slices.len(), 10);

    // The registrations asked for an allocation: its first step offers the first slice only.
    h.now += 5 * MS;
    let acts = step(&mut h);
    let first = offered(&acts);
    assert_eq!(first.keys().cloned().collect::<BTreeSet<_>>(), slices[0]);
    assert!(h.m.allocation_in_progress());
    assert_eq!(h.m.poll_timeout(), Some(h.now), "the rest of the cycle is due at once");

    // An update handled now is answered at once: forwarded to the framework, acknowledged to
    // the agent, and no slice runs with it.
    let (uuid, acts) = h.status(s.ac, &s.fw, &s.agent, "t1", TaskState::Finished);
    assert_eq!(updates(&acts, s.fc).len(), 1);
    assert!(offered(&acts).is_empty());
    let call = SchedulerCall::Acknowledge { agent_id: s.agent.clone(), task_id: TaskId::new("t1"), uuid };
    let acts = h.call(s.fc, call);
    assert!(to_agent(&acts, s.ac).iter().any(|m| matches!(m, MasterToAgent::StatusAck { .. })), "{acts:?}");
    assert!(offered(&acts).is_empty());

    // Further steps finish the cycle, slice by slice, in order, even with the allocation the
    // update asked for due meanwhile: agent 1 (freed after its slice) waits for the next cycle.
    h.now += 5 * MS;
    let mut seen = first;
    for (i, slice) in slices.iter().enumerate().skip(1) {
        assert!(h.m.allocation_in_progress(), "slice {i} still to run");
        let got = offered(&step(&mut h));
        assert_eq!(got.keys().cloned().collect::<BTreeSet<_>>(), *slice, "slice {i}");
        for (agent, n) in got {
            *seen.entry(agent).or_insert(0) += n;
        }
    }
    assert!(!h.m.allocation_in_progress());
    // Every agent of the cycle offered exactly once, agent 1 not at all.
    assert_eq!(seen.len(), 99);
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");
    assert!(!seen.contains_key(&s.agent));

    // The allocation asked for during the cycle runs after it: agent 1, alone free now.
    let next: BTreeMap<AgentId, usize> = (0..10).flat_map(|_| offered(&step(&mut h))).collect();
    assert_eq!(next.into_iter().collect::<Vec<_>>(), vec![(s.agent.clone(), 1)]);
    assert!(!h.m.allocation_in_progress());
}

#[test]
fn agents_that_come_or_go_during_a_cycle_are_handled_sanely() {
    let mut h = Harness::new();
    h.m.config.allocation_slice = 2;
    let (fc, _) = h.subscribe("alice", SEC);
    let mut agents: Vec<(ConnId, AgentId)> = (0..6).map(|_| h.add_agent("cpus:2;mem:2GiB")).collect();
    agents.sort_by(|a, b| a.1.cmp(&b.1));
    h.now += 5 * MS;
    let first = offered(&step(&mut h));
    assert_eq!(first.keys().cloned().collect::<Vec<_>>(), vec![agents[0].1.clone(), agents[1].1.clone()]);

    // The third agent leaves before its slice; a new agent joins.
    let (gone_conn, gone) = agents[2].clone();
    h.m.handle(h.now, Event::AgentDisconnected { conn: gone_conn });
    h.drain();
    let (_, newcomer) = h.add_agent("cpus:2;mem:2GiB");

    let mut rest = BTreeMap::new();
    while h.m.allocation_in_progress() {
        rest.extend(offered(&step(&mut h)));
    }
    let expect: Vec<AgentId> = agents[3..].iter().map(|a| a.1.clone()).collect();
    assert_eq!(
        rest.keys().cloned().collect::<Vec<_>>(),
        expect,
        "the leaver skipped, the newcomer not in it"
    );
    assert!(!rest.contains_key(&gone) && !rest.contains_key(&newcomer));

    // The newcomer's registration asked for an allocation: the next cycle offers it.
    h.now += 5 * MS;
    let acts = h.advance(Duration::ZERO);
    assert_eq!(offers(&acts, fc).iter().map(|o| o.agent_id.clone()).collect::<Vec<_>>(), vec![newcomer]);
}
