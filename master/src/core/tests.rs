use super::offers::offer_id_text;
use super::*;
use crate::registry::{MemoryRegistry, Registry};
use crate::testing::{
    closed, command_task, errors, events, framework_info, offers, registered, res, run_tasks, single_offer,
    subscribed, to_agent, updates,
};

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);

fn task(id: &str, r: &str) -> TaskInfo {
    command_task(TaskId::new(id), res(r))
}

fn info(id: Option<&FrameworkId>, failover: Duration) -> FrameworkInfo {
    framework_info(id, "test", failover)
}

/// Drives a master with simulated time and collects its actions.
struct Harness {
    m: Master,
    t0: Instant,
    now: Instant,
    next_conn: ConnId,
    uuids: u128,
    /// What the core wrote to its registry (a restart builds a new core from it).
    reg: MemoryRegistry,
    restarts: u32,
}

impl Harness {
    fn new() -> Self {
        let t0 = Instant::now();
        // The tests count agents' silence against a 20 s agent timeout, and leave frameworks
        // silent for minutes of simulated time (their liveness has tests of its own).
        let config = MasterConfig {
            master_id: "m".into(),
            agent_timeout: 20 * SEC,
            framework_timeout: None,
            ..MasterConfig::default()
        };
        let mut m = Master::new(config, t0);
        m.set_unix_time(t0, 1_000_000);
        Harness { m, t0, now: t0, next_conn: 0, uuids: 0, reg: MemoryRegistry::new(), restarts: 0 }
    }

    /// The master dies (connections, offers and tasks with it) and a new one starts from the
    /// registry, with the same configuration and a new master id.
    fn restart(&mut self) {
        self.drain();
        self.restarts += 1;
        let config = MasterConfig { master_id: format!("m{}", self.restarts), ..self.m.config().clone() };
        self.m = Master::new(config, self.now);
        self.m.set_unix_time(self.now, 1_000_000);
        self.m.recover(self.now, &self.reg.state);
    }

    fn conn(&mut self) -> ConnId {
        self.next_conn += 1;
        self.next_conn
    }

    fn uuid(&mut self) -> Uuid {
        self.uuids += 1;
        Uuid::from_u128(self.uuids)
    }

    fn drain(&mut self) -> Vec<Action> {
        let ops: Vec<_> = std::iter::from_fn(|| self.m.poll_registry_op()).collect();
        self.reg.apply(&ops).expect("memory registry");
        std::iter::from_fn(|| self.m.poll_action()).collect()
    }

    fn agent(&mut self, conn: ConnId, msg: AgentMessage) -> Vec<Action> {
        self.m.handle(self.now, Event::Agent { conn, principal: "agent".into(), msg });
        self.drain()
    }

    fn call(&mut self, conn: ConnId, call: SchedulerCall) -> Vec<Action> {
        self.call_as(conn, "alice", call)
    }

    fn call_as(&mut self, conn: ConnId, principal: &str, call: SchedulerCall) -> Vec<Action> {
        self.m.handle(self.now, Event::Framework { conn, principal: principal.into(), call });
        self.drain()
    }

    /// Runs every timer up to `now + d` and returns what came out.
    fn advance(&mut self, d: Duration) -> Vec<Action> {
        let target = self.now + d;
        for _ in 0..100_000 {
            match self.m.poll_timeout() {
                Some(t) if t <= target => {
                    self.now = self.now.max(t);
                    self.m.handle_timeout(self.now);
                }
                _ => break,
            }
        }
        self.now = target;
        self.drain()
    }

    fn register(
        &mut self,
        id: Option<AgentId>,
        r: &str,
        tasks: Vec<TaskReport>,
    ) -> (ConnId, AgentId, Vec<Action>) {
        let conn = self.conn();
        let acts = self.agent(
            conn,
            AgentMessage::Register {
                agent_id: id,
                hostname: format!("host{conn}"),
                resources: res(r),
                attributes: Attributes::parse("rack:r1").expect("attrs"),
                tasks,
            },
        );
        let id = registered(&acts, conn).expect("agent registered");
        (conn, id, acts)
    }

    fn add_agent(&mut self, r: &str) -> (ConnId, AgentId) {
        let (c, id, _) = self.register(None, r, vec![]);
        (c, id)
    }

    fn subscribe(&mut self, principal: &str, failover: Duration) -> (ConnId, FrameworkId) {
        let conn = self.conn();
        let acts = self.call_as(conn, principal, SchedulerCall::Subscribe(info(None, failover)));
        let id = subscribed(&acts, conn).expect("subscribed");
        (conn, id)
    }

    fn status(
        &mut self,
        conn: ConnId,
        fw: &FrameworkId,
        agent: &AgentId,
        tid: &str,
        state: TaskState,
    ) -> (Uuid, Vec<Action>) {
        let uuid = self.uuid();
        let s = TaskStatus {
            task_id: TaskId::new(tid),
            framework_id: fw.clone(),
            agent_id: Some(agent.clone()),
            state,
            uuid: Some(uuid),
            source: UpdateSource::Executor,
            reason: "test".into(),
            message: String::new(),
            exit_code: if state == TaskState::Finished { Some(0) } else { None },
            signal: None,
            usage: None,
            timestamp_ms: 0,
        };
        (uuid, self.agent(conn, AgentMessage::StatusUpdate(s)))
    }

    /// Subscribes a framework, registers an agent and launches one task on it (RUNNING).
    fn running_task(&mut self, agent_res: &str, task_res: &str, failover: Duration) -> Setup {
        let (fc, fw) = self.subscribe("alice", failover);
        let (ac, agent) = self.add_agent(agent_res);
        let offer = single_offer(&self.advance(5 * MS), fc);
        let acts = self.call(
            fc,
            SchedulerCall::Accept {
                offer_ids: vec![offer.id],
                operations: vec![Operation::Launch { tasks: vec![task("t1", task_res)] }],
                refuse_seconds: None,
            },
        );
        assert_eq!(run_tasks(&acts, ac).len(), 1);
        let (uuid, _) = self.status(ac, &fw, &agent, "t1", TaskState::Running);
        self.call(
            fc,
            SchedulerCall::Acknowledge { agent_id: agent.clone(), task_id: TaskId::new("t1"), uuid },
        );
        Setup { fc, fw, ac, agent }
    }
}

struct Setup {
    fc: ConnId,
    fw: FrameworkId,
    ac: ConnId,
    agent: AgentId,
}

fn accept(offer: &Offer, tasks: Vec<TaskInfo>, refuse_seconds: Option<f64>) -> SchedulerCall {
    SchedulerCall::Accept {
        offer_ids: vec![offer.id.clone()],
        operations: vec![Operation::Launch { tasks }],
        refuse_seconds,
    }
}

fn decline(offer: &Offer, refuse_seconds: Option<f64>) -> SchedulerCall {
    SchedulerCall::Decline { offer_ids: vec![offer.id.clone()], refuse_seconds }
}

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

// -----------------------------------------------------------------------------------------
// Frameworks' own executors

fn executor_info(id: &str, r: &str) -> ExecutorInfo {
    ExecutorInfo {
        executor_id: ExecutorId::new(id),
        name: format!("executor {id}"),
        command: CommandInfo { argv: vec!["./exec".into()], shell: false, env: vec![] },
        resources: res(r),
        fetch: vec![FetchInfo {
            artifact: ArtifactRef { digest: Digest::of(b"#!/bin/sh\n"), size: 10 },
            path: "exec".into(),
            executable: true,
        }],
    }
}

fn exec_task(id: &str, r: &str, executor: &ExecutorInfo) -> TaskInfo {
    TaskInfo {
        kind: TaskKind::Executor(Box::new(ExecutorTask {
            executor: executor.clone(),
            data: b"job".to_vec(),
        })),
        ..task(id, r)
    }
}

impl Harness {
    /// A harness whose artifact store holds the executors' binary.
    fn with_executor_binary() -> Self {
        let mut h = Harness::new();
        h.m.artifact_stored(Digest::of(b"#!/bin/sh\n"));
        h
    }

    fn finish(&mut self, s: &Setup, tid: &str) {
        let (uuid, _) = self.status(s.ac, &s.fw, &s.agent, tid, TaskState::Finished);
        self.call(
            s.fc,
            SchedulerCall::Acknowledge { agent_id: s.agent.clone(), task_id: TaskId::new(tid), uuid },
        );
    }

    /// Subscribes a framework and registers an agent; returns them and the first offer.
    fn offered(&mut self, agent_res: &str) -> (Setup, Offer) {
        let (fc, fw) = self.subscribe("alice", SEC);
        let (ac, agent) = self.add_agent(agent_res);
        let offer = single_offer(&self.advance(5 * MS), fc);
        (Setup { fc, fw, ac, agent }, offer)
    }
}

#[test]
fn executor_resources_are_taken_once_per_agent_and_freed_when_it_exits() {
    let mut h = Harness::with_executor_binary();
    let (s, offer) = h.offered("cpus:4;mem:4GiB");
    let e = executor_info("e1", "cpus:0.5;mem:512MiB");
    let acts = h.call(
        s.fc,
        accept(
            &offer,
            vec![exec_task("t1", "cpus:1;mem:1GiB", &e), exec_task("t2", "cpus:1;mem:1GiB", &e)],
            None,
        ),
    );
    assert!(updates(&acts, s.fc).is_empty(), "{acts:#?}");
    let launched = run_tasks(&acts, s.ac);
    assert_eq!(launched.iter().map(|t| t.task_id.as_str()).collect::<Vec<_>>(), ["t1", "t2"]);
    assert_eq!(h.m.executors.len(), 1);
    assert_eq!(h.m.agents()[0].used, res("cpus:2.5;mem:2.5GiB"));
    assert_eq!(h.m.frameworks()[0].used, res("cpus:2.5;mem:2.5GiB"));
    let views = h.m.tasks();
    assert!(views.iter().all(|t| t.executor_id == ExecutorId::new("e1")));
    // The leftover is what neither the tasks nor the executor hold.
    let leftover = single_offer(&h.advance(5 * MS), s.fc);
    assert_eq!(leftover.resources, res("cpus:1.5;mem:1.5GiB"));

    // Tasks end: the executor keeps its share.
    h.finish(&s, "t1");
    h.finish(&s, "t2");
    assert_eq!(h.m.agents()[0].used, res("cpus:0.5;mem:512MiB"));
    assert_eq!(h.m.frameworks()[0].used, res("cpus:0.5;mem:512MiB"));
    // A later task for the running executor takes only its own resources.
    let acts = h.call(s.fc, accept(&leftover, vec![exec_task("t3", "cpus:1;mem:1GiB", &e)], None));
    assert_eq!(run_tasks(&acts, s.ac).len(), 1);
    assert_eq!(h.m.agents()[0].used, res("cpus:1.5;mem:1.5GiB"));

    // The executor exits: its resources come back and the framework is told.
    let acts = h.agent(
        s.ac,
        AgentMessage::ExecutorExited {
            framework_id: s.fw.clone(),
            executor_id: ExecutorId::new("e1"),
            message: "exit status 3".into(),
        },
    );
    assert_eq!(
        events(&acts, s.fc),
        vec![SchedulerEvent::ExecutorExited {
            agent_id: s.agent.clone(),
            executor_id: ExecutorId::new("e1"),
            message: "exit status 3".into(),
        }]
    );
    assert_eq!(h.m.executors.len(), 0);
    assert_eq!(h.m.agents()[0].used, res("cpus:1;mem:1GiB"));
    assert_eq!(h.m.frameworks()[0].used, res("cpus:1;mem:1GiB"));
    // Reported twice: nothing more to free (the framework still hears of it).
    h.agent(
        s.ac,
        AgentMessage::ExecutorExited {
            framework_id: s.fw.clone(),
            executor_id: ExecutorId::new("e1"),
            message: "again".into(),
        },
    );
    assert_eq!(h.m.agents()[0].used, res("cpus:1;mem:1GiB"));

    // The next task naming it starts a new executor, which takes its resources again.
    let offer = single_offer(&h.advance(5 * MS), s.fc);
    assert_eq!(offer.resources, res("cpus:3;mem:3GiB"));
    let acts = h.call(s.fc, accept(&offer, vec![exec_task("t4", "cpus:1;mem:1GiB", &e)], None));
    assert_eq!(run_tasks(&acts, s.ac).len(), 1);
    assert_eq!(h.m.agents()[0].used, res("cpus:2.5;mem:2.5GiB"));
    assert_eq!(h.m.executors.len(), 1);
}

/// The agent runs one process of an executor per user its tasks run as: a second user's
/// first task takes the executor's resources from the offer again, the same user's next task
/// does not, every user's process must run the same ExecutorInfo, and the agent's report that
/// the executor ended frees every user's share.
#[test]
fn executor_resources_are_taken_once_per_user_of_the_executor() {
    let mut h = Harness::with_executor_binary();
    let (s, offer) = h.offered("cpus:8;mem:8GiB");
    let e = executor_info("e1", "cpus:0.5;mem:512MiB");
    let as_user = |id: &str, user: Option<&str>, e: &ExecutorInfo| TaskInfo {
        user: user.map(str::to_owned),
        ..exec_task(id, "cpus:1;mem:1GiB", e)
    };
    let acts = h.call(
        s.fc,
        accept(
            &offer,
            vec![
                as_user("t1", Some("alice"), &e),
                as_user("t2", Some("bob"), &e),
                as_user("t3", Some("alice"), &e),
                as_user("t4", None, &e),
            ],
            None,
        ),
    );
    assert!(updates(&acts, s.fc).is_empty(), "{acts:#?}");
    assert_eq!(run_tasks(&acts, s.ac).len(), 4);
    // Four tasks and three processes (alice, bob, the agent's default user).
    assert_eq!(h.m.executors.len(), 3);
    assert_eq!(h.m.agents()[0].used, res("cpus:5.5;mem:5.5GiB"));
    assert_eq!(h.m.frameworks()[0].used, res("cpus:5.5;mem:5.5GiB"));
    let leftover = single_offer(&h.advance(5 * MS), s.fc);
    assert_eq!(leftover.resources, res("cpus:2.5;mem:2.5GiB"));

    // Another ExecutorInfo under the same id is refused whichever user asks.
    let mut other = e.clone();
    other.resources = res("cpus:0.25;mem:256MiB");
    let acts = h.call(s.fc, accept(&leftover, vec![as_user("t5", Some("carol"), &other)], None));
    assert!(run_tasks(&acts, s.ac).is_empty());
    let ups = updates(&acts, s.fc);
    assert_eq!(ups.len(), 1);
    assert_eq!(ups[0].state, TaskState::Error);
    assert!(ups[0].message.contains("already running with a different ExecutorInfo"), "{}", ups[0].message);
    assert_eq!(h.m.executors.len(), 3);

    // The executor ends (its last process): every user's share comes back.
    let acts = h.agent(
        s.ac,
        AgentMessage::ExecutorExited {
            framework_id: s.fw.clone(),
            executor_id: ExecutorId::new("e1"),
            message: "exit status 1".into(),
        },
    );
    assert_eq!(events(&acts, s.fc).len(), 1);
    assert_eq!(h.m.executors.len(), 0);
    assert_eq!(h.m.agents()[0].used, res("cpus:4;mem:4GiB"));
}

#[test]
fn a_task_whose_new_executor_does_not_fit_gets_task_error() {
    let mut h = Harness::with_executor_binary();
    let (s, offer) = h.offered("cpus:2;mem:2GiB");
    let e = executor_info("e1", "cpus:1;mem:32MiB");
    let acts = h.call(s.fc, accept(&offer, vec![exec_task("t1", "cpus:1.5;mem:1GiB", &e)], None));
    assert!(run_tasks(&acts, s.ac).is_empty());
    let ups = updates(&acts, s.fc);
    assert_eq!(ups.len(), 1);
    assert_eq!(ups[0].state, TaskState::Error);
    assert_eq!(ups[0].reason, "invalid launch");
    assert_eq!(
        ups[0].message,
        "task t1 asks for cpus:1.5;mem:1GiB and its new executor e1 for cpus:1;mem:32MiB but the offer \
         has cpus:2;mem:2GiB left"
    );
    assert_eq!(h.m.executors.len(), 0);
    assert_eq!(h.m.agents()[0].used, Resources::default());
    // Everything comes back.
    let again = single_offer(&h.advance(5 * MS), s.fc);
    assert_eq!(again.resources, res("cpus:2;mem:2GiB"));
    // The same task fits with a smaller executor; the task after it no longer does.
    let small = executor_info("e1", "cpus:0.5;mem:32MiB");
    let acts = h.call(
        s.fc,
        accept(
            &again,
            vec![exec_task("t1", "cpus:1.5;mem:1GiB", &small), exec_task("t2", "cpus:0.1;mem:1MiB", &small)],
            None,
        ),
    );
    assert_eq!(run_tasks(&acts, s.ac).len(), 1);
    let ups = updates(&acts, s.fc);
    assert_eq!(ups.len(), 1);
    assert_eq!(ups[0].task_id.as_str(), "t2");
    assert_eq!(ups[0].message, "task t2 asks for cpus:0.1;mem:1MiB but the offer has mem:992MiB left");
    assert_eq!(h.m.agents()[0].used, res("cpus:2;mem:1056MiB"));
}

#[test]
fn invalid_executor_infos_get_task_error() {
    let mut h = Harness::with_executor_binary();
    let (s, offer) = h.offered("cpus:8;mem:8GiB");
    let good = executor_info("e1", "cpus:0.1;mem:32MiB");
    let with = |tid: &str, f: &dyn Fn(&mut ExecutorTask)| {
        let mut t = exec_task(tid, "cpus:0.1;mem:1MiB", &good);
        if let TaskKind::Executor(e) = &mut t.kind {
            f(e);
        }
        t
    };
    let missing = Digest::of(b"not uploaded");
    let tasks = vec![
        with("reserved", &|e| e.executor.executor_id = ExecutorId::new("agora-wasm")),
        with("slash", &|e| e.executor.executor_id = ExecutorId::new("a/b")),
        with("noargv", &|e| e.executor.command.argv.clear()),
        with("env", &|e| e.executor.command.env.push(("A=B".into(), "1".into()))),
        with("upload", &|e| e.executor.fetch[0].artifact.digest = missing.clone()),
        with("escape", &|e| e.executor.fetch[0].path = "../exec".into()),
        with("data", &|e| e.data = vec![0; MAX_TASK_DATA + 1]),
        with("nores", &|e| e.executor.resources = Resources::default()),
        with("ok", &|_| {}),
    ];
    let acts = h.call(s.fc, accept(&offer, tasks, None));
    assert_eq!(run_tasks(&acts, s.ac).iter().map(|t| t.task_id.as_str()).collect::<Vec<_>>(), ["ok"]);
    let ups = updates(&acts, s.fc);
    assert!(ups.iter().all(|u| u.state == TaskState::Error && u.reason == "invalid launch"));
    let messages: Vec<&str> = ups.iter().map(|u| u.message.as_str()).collect();
    assert_eq!(
        messages,
        vec![
            "task reserved: executor id `agora-wasm` is reserved (ids starting `agora-` name built-in \
             executors)"
                .to_string(),
            "task slash: executor id \"a/b\" may contain only letters, digits, `.`, `_` and `-`".to_string(),
            "task noargv: executor e1 has an empty command".to_string(),
            "task env: executor e1: environment variable name \"A=B\" is empty or contains `=` or NUL"
                .to_string(),
            format!(
                "task upload: executor e1: artifact {missing} for `exec` is not in the master's artifact \
                 store; upload it first"
            ),
            "task escape: executor e1: fetch path \"../exec\" has a `..` component".to_string(),
            format!(
                "task data carries {} bytes of data, over the limit of {MAX_TASK_DATA}",
                MAX_TASK_DATA + 1
            ),
            "task nores: executor e1 asks for no cpus and no mem".to_string(),
        ]
    );
    assert_eq!(h.m.executors.len(), 1);
    assert_eq!(h.m.agents()[0].used, res("cpus:0.2;mem:33MiB"));
}

#[test]
fn a_different_executor_info_for_the_same_id_is_refused() {
    let mut h = Harness::with_executor_binary();
    let (s, offer) = h.offered("cpus:8;mem:8GiB");
    let a = executor_info("e1", "cpus:0.1;mem:32MiB");
    let b = executor_info("e1", "cpus:0.2;mem:32MiB");
    let mismatch = |tid: &str| {
        format!(
            "task {tid}: executor e1 on agent {} is already running with a different ExecutorInfo",
            s.agent
        )
    };
    // Within one call: the first one wins.
    let acts = h.call(
        s.fc,
        accept(
            &offer,
            vec![exec_task("t1", "cpus:1;mem:1MiB", &a), exec_task("t2", "cpus:1;mem:1MiB", &b)],
            None,
        ),
    );
    assert_eq!(run_tasks(&acts, s.ac).len(), 1);
    let ups = updates(&acts, s.fc);
    assert_eq!(ups.len(), 1);
    assert_eq!((ups[0].task_id.as_str(), ups[0].state), ("t2", TaskState::Error));
    assert_eq!(ups[0].message, mismatch("t2"));
    // In a later call: compared with the executor running there.
    let offer = single_offer(&h.advance(5 * MS), s.fc);
    let mut renamed = a.clone();
    renamed.name = "other name".into();
    let acts = h.call(s.fc, accept(&offer, vec![exec_task("t3", "cpus:1;mem:1MiB", &renamed)], None));
    assert!(run_tasks(&acts, s.ac).is_empty());
    assert_eq!(updates(&acts, s.fc)[0].message, mismatch("t3"));
    assert_eq!(h.m.executors.len(), 1);
    assert_eq!(h.m.agents()[0].used, res("cpus:1.1;mem:33MiB"));
    // Another framework's executor of the same id is its own: no mismatch, its own resources.
    let (f2, fw2) = h.subscribe("bob", SEC);
    let offer2 = single_offer(&h.advance(5 * MS), f2);
    let acts = h.call(f2, accept(&offer2, vec![exec_task("t1", "cpus:1;mem:1MiB", &b)], None));
    assert_eq!(run_tasks(&acts, s.ac).len(), 1);
    assert!(updates(&acts, f2).is_empty());
    assert_eq!(h.m.executors.len(), 2);
    assert_eq!(h.m.agents()[0].used, res("cpus:2.3;mem:66MiB"));
    let used: Vec<(FrameworkId, Resources)> = h.m.frameworks().into_iter().map(|f| (f.id, f.used)).collect();
    assert_eq!(used, vec![(s.fw.clone(), res("cpus:1.1;mem:33MiB")), (fw2, res("cpus:1.2;mem:33MiB"))]);
}

#[test]
fn framework_messages_are_relayed_both_ways() {
    let mut h = Harness::with_executor_binary();
    let s = h.running_task("cpus:4;mem:4GiB", "cpus:1;mem:1GiB", SEC);
    let e1 = ExecutorId::new("e1");
    // Scheduler → executor: to the agent, under the caller's framework id.
    let acts = h.call(
        s.fc,
        SchedulerCall::Message { agent_id: s.agent.clone(), executor_id: e1.clone(), data: b"hi".to_vec() },
    );
    assert_eq!(
        acts,
        vec![Action::ToAgent {
            conn: s.ac,
            msg: MasterToAgent::FrameworkMessage {
                framework_id: s.fw.clone(),
                executor_id: e1.clone(),
                data: b"hi".to_vec()
            },
        }]
    );
    // The largest message passes; one byte more is refused.
    let acts = h.call(
        s.fc,
        SchedulerCall::Message {
            agent_id: s.agent.clone(),
            executor_id: e1.clone(),
            data: vec![7; MAX_FRAMEWORK_MESSAGE],
        },
    );
    assert_eq!(to_agent(&acts, s.ac).len(), 1);
    let acts = h.call(
        s.fc,
        SchedulerCall::Message {
            agent_id: s.agent.clone(),
            executor_id: e1.clone(),
            data: vec![7; MAX_FRAMEWORK_MESSAGE + 1],
        },
    );
    assert_eq!(
        errors(&acts, s.fc),
        vec![WireError::new(
            ErrorCode::TooLarge,
            format!(
                "framework message of {} bytes to executor e1 is over the limit of {MAX_FRAMEWORK_MESSAGE} bytes",
                MAX_FRAMEWORK_MESSAGE + 1
            )
        )]
    );
    assert!(to_agent(&acts, s.ac).is_empty());
    assert!(closed(&acts, s.fc).is_none());
    // An unknown agent.
    let acts = h.call(
        s.fc,
        SchedulerCall::Message { agent_id: AgentId::new("nope"), executor_id: e1.clone(), data: vec![] },
    );
    assert_eq!(errors(&acts, s.fc), vec![WireError::new(ErrorCode::NotFound, "no agent nope")]);

    // Executor → scheduler.
    let from_agent = |fw: &FrameworkId, data: Vec<u8>| AgentMessage::FrameworkMessage {
        framework_id: fw.clone(),
        executor_id: ExecutorId::new("e1"),
        data,
    };
    let acts = h.agent(s.ac, from_agent(&s.fw, b"result".to_vec()));
    assert_eq!(
        acts,
        vec![Action::ToFramework {
            conn: s.fc,
            event: SchedulerEvent::Message {
                agent_id: s.agent.clone(),
                executor_id: e1.clone(),
                data: b"result".to_vec()
            },
        }]
    );
    // Too large, or for a framework that is unknown or away: dropped, never kept.
    assert!(h.agent(s.ac, from_agent(&s.fw, vec![0; MAX_FRAMEWORK_MESSAGE + 1])).is_empty());
    assert!(h.agent(s.ac, from_agent(&FrameworkId::new("m-F99"), b"x".to_vec())).is_empty());
    h.m.handle(h.now, Event::FrameworkDisconnected { conn: s.fc });
    h.drain();
    assert!(h.agent(s.ac, from_agent(&s.fw, b"lost".to_vec())).is_empty());
    let fc = h.conn();
    let acts = h.call(fc, SchedulerCall::Subscribe(info(Some(&s.fw), SEC)));
    assert!(!events(&acts, fc).iter().any(|e| matches!(e, SchedulerEvent::Message { .. })));

    // An agent that is not connected.
    h.m.handle(h.now, Event::AgentDisconnected { conn: s.ac });
    h.drain();
    let acts = h.call(
        fc,
        SchedulerCall::Message { agent_id: s.agent.clone(), executor_id: e1.clone(), data: vec![] },
    );
    assert_eq!(
        errors(&acts, fc),
        vec![WireError::new(ErrorCode::NotFound, format!("agent {} is disconnected", s.agent))]
    );
}

#[test]
fn shutdown_executor_is_relayed_and_resources_wait_for_the_exit() {
    let mut h = Harness::with_executor_binary();
    let (s, offer) = h.offered("cpus:4;mem:4GiB");
    let e = executor_info("e1", "cpus:0.5;mem:512MiB");
    h.call(s.fc, accept(&offer, vec![exec_task("t1", "cpus:1;mem:1GiB", &e)], None));
    let acts = h.call(
        s.fc,
        SchedulerCall::ShutdownExecutor { agent_id: s.agent.clone(), executor_id: ExecutorId::new("e1") },
    );
    assert_eq!(
        acts,
        vec![Action::ToAgent {
            conn: s.ac,
            msg: MasterToAgent::ShutdownExecutor {
                framework_id: s.fw.clone(),
                executor_id: ExecutorId::new("e1")
            },
        }]
    );
    assert_eq!(h.m.agents()[0].used, res("cpus:1.5;mem:1.5GiB"));
    let acts = h.call(
        s.fc,
        SchedulerCall::ShutdownExecutor {
            agent_id: AgentId::new("nope"),
            executor_id: ExecutorId::new("e1"),
        },
    );
    assert_eq!(errors(&acts, s.fc), vec![WireError::new(ErrorCode::NotFound, "no agent nope")]);
    // The agent kills the task and reports the exit.
    h.status(s.ac, &s.fw, &s.agent, "t1", TaskState::Killed);
    h.agent(
        s.ac,
        AgentMessage::ExecutorExited {
            framework_id: s.fw.clone(),
            executor_id: ExecutorId::new("e1"),
            message: "shut down".into(),
        },
    );
    assert_eq!(h.m.agents()[0].used, Resources::default());
}

#[test]
fn a_framework_cannot_address_another_frameworks_executors() {
    let mut h = Harness::with_executor_binary();
    let (s, offer) = h.offered("cpus:4;mem:4GiB");
    let e = executor_info("e1", "cpus:0.5;mem:512MiB");
    h.call(s.fc, accept(&offer, vec![exec_task("t1", "cpus:1;mem:1GiB", &e)], None));
    let (f2, fw2) = h.subscribe("bob", SEC);
    // Bob names Alice's agent and executor: the agent hears Bob's framework id, so his
    // message and his shutdown can only reach an executor of his own.
    let acts = h.call(
        f2,
        SchedulerCall::Message {
            agent_id: s.agent.clone(),
            executor_id: ExecutorId::new("e1"),
            data: vec![1],
        },
    );
    assert_eq!(
        to_agent(&acts, s.ac),
        vec![MasterToAgent::FrameworkMessage {
            framework_id: fw2.clone(),
            executor_id: ExecutorId::new("e1"),
            data: vec![1]
        }]
    );
    let acts = h.call(
        f2,
        SchedulerCall::ShutdownExecutor { agent_id: s.agent.clone(), executor_id: ExecutorId::new("e1") },
    );
    assert_eq!(
        to_agent(&acts, s.ac),
        vec![MasterToAgent::ShutdownExecutor {
            framework_id: fw2.clone(),
            executor_id: ExecutorId::new("e1")
        }]
    );
    // An exit reported for Bob's (non-existent) e1 frees nothing of Alice's.
    let acts = h.agent(
        s.ac,
        AgentMessage::ExecutorExited {
            framework_id: fw2.clone(),
            executor_id: ExecutorId::new("e1"),
            message: "never ran".into(),
        },
    );
    assert!(events(&acts, s.fc).is_empty());
    assert_eq!(h.m.executors.len(), 1);
    assert_eq!(h.m.agents()[0].used, res("cpus:1.5;mem:1.5GiB"));
    // Messages of Alice's executor go to Alice only.
    let acts = h.agent(
        s.ac,
        AgentMessage::FrameworkMessage {
            framework_id: s.fw.clone(),
            executor_id: ExecutorId::new("e1"),
            data: vec![2],
        },
    );
    assert_eq!(events(&acts, s.fc).len(), 1);
    assert!(events(&acts, f2).is_empty());
}

#[test]
fn executor_resources_go_with_the_framework_and_the_agent() {
    // Framework removed: its executors' resources are free, and agents where it had only
    // an executor left are told to shut it down.
    let mut h = Harness::with_executor_binary();
    let (s, offer) = h.offered("cpus:4;mem:4GiB");
    let e = executor_info("e1", "cpus:0.5;mem:512MiB");
    h.call(s.fc, accept(&offer, vec![exec_task("t1", "cpus:1;mem:1GiB", &e)], None));
    h.finish(&s, "t1");
    assert_eq!(h.m.agents()[0].used, res("cpus:0.5;mem:512MiB"));
    let acts = h.call(s.fc, SchedulerCall::Teardown);
    assert_eq!(to_agent(&acts, s.ac), vec![MasterToAgent::ShutdownFramework { framework_id: s.fw.clone() }]);
    assert_eq!(h.m.executors.len(), 0);
    assert_eq!(h.m.agents()[0].used, Resources::default());

    // Agent lost: its executors are forgotten; back with a task of one, it is adopted
    // with its resources again.
    let mut h = Harness::with_executor_binary();
    let (s, offer) = h.offered("cpus:4;mem:4GiB");
    let t1 = exec_task("t1", "cpus:1;mem:1GiB", &e);
    h.call(s.fc, accept(&offer, vec![t1.clone()], None));
    h.status(s.ac, &s.fw, &s.agent, "t1", TaskState::Running);
    h.advance(21 * SEC);
    assert_eq!(h.m.agents()[0].status, AgentViewStatus::Unreachable);
    assert_eq!(h.m.executors.len(), 0);
    assert_eq!(h.m.agents()[0].used, res("cpus:1;mem:1GiB"));
    let report = TaskReport { framework_id: s.fw.clone(), task: t1, state: TaskState::Running };
    h.register(Some(s.agent.clone()), "cpus:4;mem:4GiB", vec![report]);
    assert_eq!(h.m.executors.len(), 1);
    assert_eq!(h.m.agents()[0].used, res("cpus:1.5;mem:1.5GiB"));
    assert_eq!(h.m.frameworks()[0].used, res("cpus:1.5;mem:1.5GiB"));
    // Back again without it (restarted agent): the executor is gone with its task.
    let (_, _, acts) = h.register(Some(s.agent.clone()), "cpus:4;mem:4GiB", vec![]);
    assert_eq!(updates(&acts, s.fc)[0].state, TaskState::Gone);
    assert_eq!(h.m.executors.len(), 0);
    assert_eq!(h.m.agents()[0].used, Resources::default());
}

// ---------------------------------------------------------------------------------------------
// Restarts of the master (registry recovery), reconciliation answers and partitions

fn reconcile_on(tasks: &[(&str, Option<&AgentId>)]) -> SchedulerCall {
    SchedulerCall::ReconcileTasks {
        tasks: tasks
            .iter()
            .map(|(t, a)| ReconcileTask { task_id: TaskId::new(*t), agent_id: a.cloned() })
            .collect(),
    }
}

fn states(ups: &[TaskStatus]) -> Vec<(&str, TaskState)> {
    ups.iter().map(|u| (u.task_id.as_str(), u.state)).collect()
}

fn report(fw: &FrameworkId, id: &str, r: &str) -> TaskReport {
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

#[test]
fn a_referenced_artifact_is_never_evicted_and_an_evicted_one_refuses_launches() {
    let mut h = Harness::with_executor_binary();
    let bin = Digest::of(b"#!/bin/sh\n");
    let (s, offer) = h.offered("cpus:4;mem:4GiB");
    let e = executor_info("e1", "cpus:0.5;mem:512MiB");
    let acts = h.call(s.fc, accept(&offer, vec![exec_task("t1", "cpus:1;mem:1GiB", &e)], None));
    assert_eq!(run_tasks(&acts, s.ac).len(), 1);
    let leftover = single_offer(&h.advance(5 * MS), s.fc);
    assert!(h.m.artifacts_in_use().contains(&bin));
    assert!(!h.m.artifact_evicted(&bin), "its executor and task refer to it");
    // The task ends; its executor still runs and still refers to it.
    h.finish(&s, "t1");
    assert!(!h.m.artifact_evicted(&bin), "the executor refers to it");
    h.agent(
        s.ac,
        AgentMessage::ExecutorExited {
            framework_id: s.fw.clone(),
            executor_id: ExecutorId::new("e1"),
            message: "exit status 0".into(),
        },
    );
    assert!(h.m.artifacts_in_use().is_empty());
    assert!(h.m.artifact_evicted(&bin));
    // Evicted: a launch naming it is refused until it is uploaded again.
    let acts = h.call(s.fc, accept(&leftover, vec![exec_task("t2", "cpus:1;mem:1GiB", &e)], None));
    assert!(run_tasks(&acts, s.ac).is_empty(), "{acts:#?}");
    assert!(!updates(&acts, s.fc).is_empty(), "the framework is told: {acts:#?}");
}

#[test]
fn upload_quotas_count_first_uploaders_and_reservations() {
    let mut m =
        Master::new(MasterConfig { master_id: "m".into(), ..MasterConfig::default() }, Instant::now());
    let record = |d: &str, who: Option<&str>, size| crate::registry::ArtifactRecord {
        digest: Digest::parse(&d.repeat(32)).expect("digest"),
        kind: None,
        size,
        uploader: who.map(String::from),
    };
    let mut a = record("ab", Some("alice"), 600);
    m.artifact_uploaded(&mut a);
    assert_eq!(m.upload_usage("alice"), 600);
    // The same bytes sent again by bob stay alice's (and cost bob nothing).
    let mut again = record("ab", Some("bob"), 600);
    m.artifact_uploaded(&mut again);
    assert_eq!(again.uploader.as_deref(), Some("alice"), "the index keeps the first uploader");
    assert_eq!(m.upload_usage("bob"), 0);
    // Reservations count until given back; past the quota is refused naming the principal.
    assert!(m.reserve_upload("alice", 300, 1000).is_ok());
    let e = m.reserve_upload("alice", 200, 1000).unwrap_err();
    assert_eq!(e.code, ErrorCode::Unauthorized);
    assert!(e.message.contains("principal `alice` may not upload"), "{}", e.message);
    m.release_upload("alice", 300);
    assert!(m.reserve_upload("alice", 400, 1000).is_ok());
    // A lost artifact leaves its uploader's usage.
    m.release_upload("alice", 400);
    m.artifacts_lost(&[a.digest.clone()]);
    assert_eq!(m.upload_usage("alice"), 0);
}
