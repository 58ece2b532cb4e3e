//! A deterministic driver for the sans-IO master core with simulated time, shared by the
//! allocation acceptance tests and the benchmark-free integration tests.

#![allow(dead_code)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agora_master::allocator::Allocator;
use agora_master::core::{Action, ConnId, Event, Master, MasterConfig};
use agora_sdk::proto::*;
use agora_sdk::{Attributes, Resources};

pub fn res(s: &str) -> Resources {
    Resources::parse(s).expect("test resources")
}

/// A master, a clock and the actions it produced, per connection.
pub struct Sim {
    pub m: Master,
    pub t0: Instant,
    pub now: Instant,
    next_conn: ConnId,
    next_task: u64,
    /// Undelivered actions by connection, in order.
    inbox: HashMap<ConnId, Vec<Action>>,
    /// Agent id of each agent connection.
    pub agent_ids: HashMap<ConnId, AgentId>,
}

impl Sim {
    pub fn new(config: MasterConfig) -> Self {
        let t0 = Instant::now();
        Self::with(Master::new(MasterConfig { master_id: "m".into(), ..config }, t0), t0)
    }

    pub fn with_allocator(config: MasterConfig, allocator: Box<dyn Allocator>) -> Self {
        let t0 = Instant::now();
        Self::with(
            Master::with_allocator(MasterConfig { master_id: "m".into(), ..config }, allocator, t0),
            t0,
        )
    }

    fn with(m: Master, t0: Instant) -> Self {
        Sim { m, t0, now: t0, next_conn: 0, next_task: 0, inbox: HashMap::new(), agent_ids: HashMap::new() }
    }

    fn collect(&mut self) {
        while let Some(a) = self.m.poll_action() {
            let conn = match &a {
                Action::ToAgent { conn, .. }
                | Action::ToFramework { conn, .. }
                | Action::Close { conn, .. } => *conn,
            };
            self.inbox.entry(conn).or_default().push(a);
        }
    }

    fn conn(&mut self) -> ConnId {
        self.next_conn += 1;
        self.next_conn
    }

    /// Registers an agent with these resources; returns its connection and id.
    pub fn add_agent(&mut self, resources: &str) -> (ConnId, AgentId) {
        let conn = self.conn();
        let msg = AgentMessage::Register {
            agent_id: None,
            hostname: format!("host{conn}"),
            resources: res(resources),
            attributes: Attributes::default(),
            tasks: vec![],
        };
        self.m.handle(self.now, Event::Agent { conn, principal: format!("agent{conn}"), msg });
        self.collect();
        let id = self
            .inbox
            .get_mut(&conn)
            .and_then(|v| {
                v.iter().find_map(|a| match a {
                    Action::ToAgent { msg: MasterToAgent::Registered { agent_id, .. }, .. } => {
                        Some(agent_id.clone())
                    }
                    _ => None,
                })
            })
            .expect("agent registered");
        self.inbox.remove(&conn);
        self.agent_ids.insert(conn, id.clone());
        (conn, id)
    }

    /// Subscribes a framework of `role`; returns its connection and id.
    pub fn subscribe(&mut self, role: &str) -> (ConnId, FrameworkId) {
        let conn = self.conn();
        let info = FrameworkInfo {
            id: None,
            name: format!("fw{conn}"),
            role: role.into(),
            failover_timeout: Duration::from_secs(60),
            hostname: "h".into(),
        };
        self.call(conn, SchedulerCall::Subscribe(info));
        let events = self.inbox.remove(&conn).unwrap_or_default();
        let id = events
            .iter()
            .find_map(|a| match a {
                Action::ToFramework { event: SchedulerEvent::Subscribed { framework_id, .. }, .. } => {
                    Some(framework_id.clone())
                }
                _ => None,
            })
            .expect("subscribed");
        (conn, id)
    }

    pub fn call(&mut self, conn: ConnId, call: SchedulerCall) {
        self.m.handle(self.now, Event::Framework { conn, principal: format!("fw{conn}"), call });
        self.collect();
    }

    /// Runs timers up to `now + d` (every timer in between fires at its time).
    pub fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        while let Some(t) = self.m.poll_timeout() {
            if t > end {
                break;
            }
            self.now = self.now.max(t);
            self.m.handle_timeout(self.now);
            self.collect();
        }
        self.now = end;
    }

    /// Runs timers until the next allocation (at most `max`): one allocation cycle.
    pub fn cycle(&mut self) {
        self.advance(self.m.config().allocation_batch.max(Duration::from_millis(1)) * 2);
    }

    /// Takes the offers sent to `conn` so far.
    pub fn offers(&mut self, conn: ConnId) -> Vec<Offer> {
        let v = self.inbox.entry(conn).or_default();
        let mut out = Vec::new();
        v.retain(|a| match a {
            Action::ToFramework { event: SchedulerEvent::Offers(o), .. } => {
                out.extend(o.iter().cloned());
                false
            }
            _ => true,
        });
        out
    }

    /// Takes the errors sent to `conn` so far.
    pub fn errors(&mut self, conn: ConnId) -> Vec<WireError> {
        let v = self.inbox.entry(conn).or_default();
        let mut out = Vec::new();
        v.retain(|a| match a {
            Action::ToFramework { event: SchedulerEvent::Error(e), .. } => {
                out.push(e.clone());
                false
            }
            _ => true,
        });
        out
    }

    /// Takes the offer ids rescinded from `conn` so far.
    pub fn rescinded(&mut self, conn: ConnId) -> Vec<OfferId> {
        let v = self.inbox.entry(conn).or_default();
        let mut out = Vec::new();
        v.retain(|a| match a {
            Action::ToFramework { event: SchedulerEvent::Rescind { offer_id }, .. } => {
                out.push(offer_id.clone());
                false
            }
            _ => true,
        });
        out
    }

    /// Launches tasks of these shapes on an offer (the rest goes back without a filter).
    pub fn launch(&mut self, conn: ConnId, offer: &Offer, shapes: &[&Resources]) -> Vec<TaskId> {
        let mut ids = Vec::new();
        let tasks = shapes
            .iter()
            .map(|r| {
                self.next_task += 1;
                let id = TaskId::new(format!("t{}", self.next_task));
                ids.push(id.clone());
                TaskInfo {
                    task_id: id,
                    name: "t".into(),
                    resources: (*r).clone(),
                    kind: TaskKind::Command(CommandInfo {
                        argv: vec!["true".into()],
                        shell: false,
                        env: vec![],
                    }),
                    kill_grace: None,
                }
            })
            .collect();
        self.call(
            conn,
            SchedulerCall::Accept {
                offer_ids: vec![offer.id.clone()],
                operations: vec![Operation::Launch { tasks }],
                refuse_seconds: None,
            },
        );
        ids
    }

    pub fn decline(&mut self, conn: ConnId, offer: &Offer, refuse_seconds: Option<f64>) {
        self.call(conn, SchedulerCall::Decline { offer_ids: vec![offer.id.clone()], refuse_seconds });
    }

    /// Live tasks of a framework.
    pub fn task_count(&self, fw: &FrameworkId) -> usize {
        self.m.tasks().iter().filter(|t| t.framework_id == *fw && !t.state.is_terminal()).count()
    }

    /// Sum of a framework's live tasks' resources.
    pub fn used(&self, fw: &FrameworkId) -> Resources {
        let mut r = Resources::default();
        for t in self.m.tasks().iter().filter(|t| t.framework_id == *fw && !t.state.is_terminal()) {
            r.add_assign(&t.resources);
        }
        r
    }

    /// Reports a task ended (agent-side update with a uuid, acknowledged by the framework).
    pub fn finish(&mut self, agent_conn: ConnId, fw: &FrameworkId, task: &TaskId) {
        self.next_task += 1;
        let status = TaskStatus {
            task_id: task.clone(),
            framework_id: fw.clone(),
            agent_id: None,
            state: TaskState::Finished,
            uuid: Some(uuid::Uuid::from_u128(u128::from(self.next_task))),
            source: UpdateSource::Agent,
            reason: "command exited".into(),
            message: String::new(),
            exit_code: Some(0),
            signal: None,
            usage: None,
            timestamp_ms: 0,
        };
        self.m.handle(
            self.now,
            Event::Agent { conn: agent_conn, principal: "x".into(), msg: AgentMessage::StatusUpdate(status) },
        );
        self.collect();
    }
}
