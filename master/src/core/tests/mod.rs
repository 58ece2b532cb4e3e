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

mod artifacts;
mod drain;
mod executors;
mod general;
mod recovery;
mod slices;
