//! One test harness for everything that drives the sans-IO core without sockets: the core's
//! unit tests, the simulator of the integration tests (`tests/sim`), the delay-scheduling
//! example and the allocation benchmark. Behind the `testing` feature (the crate's own tests,
//! examples and benchmarks turn it on through a dev-dependency on the crate itself).
//!
//! - builders of the messages a driver sends ([`register`], [`framework_info`],
//!   [`command_task`], [`res`]);
//! - readers of the actions the core produced, for one connection ([`offers`], [`updates`],
//!   [`run_tasks`], [`to_agent`], [`errors`], [`events`], [`closed`]);
//! - [`Sim`]: a master, a simulated clock, the undelivered actions by connection and the
//!   registry the master writes ([`Sim::restart`] starts a new master from it).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agora_sdk::proto::*;
use agora_sdk::{Attributes, Resources};

use crate::allocator::Allocator;
use crate::core::{Action, ConnId, Event, Master, MasterConfig};
use crate::registry::{MemoryRegistry, Registry};

/// Parses resources written as in the CLI (`cpus:2;mem:1GiB`); panics on a typo.
pub fn res(s: &str) -> Resources {
    Resources::parse(s).expect("test resources")
}

/// A new agent's `Register`: no id, no attributes, no tasks.
pub fn register(hostname: &str, resources: Resources) -> AgentMessage {
    AgentMessage::Register {
        agent_id: None,
        hostname: hostname.into(),
        resources,
        attributes: Attributes::default(),
        tasks: vec![],
    }
}

/// A framework of role `*` (with `id` when it fails over).
pub fn framework_info(id: Option<&FrameworkId>, name: &str, failover: Duration) -> FrameworkInfo {
    FrameworkInfo {
        id: id.cloned(),
        name: name.into(),
        role: "*".into(),
        failover_timeout: failover,
        hostname: "h".into(),
        user: None,
    }
}

/// A command task running `true`.
pub fn command_task(task_id: TaskId, resources: Resources) -> TaskInfo {
    TaskInfo {
        name: format!("name-{task_id}"),
        task_id,
        resources,
        kind: TaskKind::Command(CommandInfo { argv: vec!["true".into()], shell: false, env: vec![] }),
        kill_grace: None,
        user: None,
    }
}

/// The connection an action goes to.
pub fn conn_of(action: &Action) -> ConnId {
    match action {
        Action::ToAgent { conn, .. } | Action::ToFramework { conn, .. } | Action::Close { conn, .. } => *conn,
    }
}

/// The events sent to framework connection `conn`.
pub fn events(acts: &[Action], conn: ConnId) -> Vec<SchedulerEvent> {
    acts.iter()
        .filter_map(|a| match a {
            Action::ToFramework { conn: c, event } if *c == conn => Some(event.clone()),
            _ => None,
        })
        .collect()
}

/// The offers sent to `conn`.
pub fn offers(acts: &[Action], conn: ConnId) -> Vec<Offer> {
    events(acts, conn)
        .into_iter()
        .filter_map(|e| match e {
            SchedulerEvent::Offers(o) => Some(o),
            _ => None,
        })
        .flatten()
        .collect()
}

/// The one offer sent to `conn`; panics unless there is exactly one.
pub fn single_offer(acts: &[Action], conn: ConnId) -> Offer {
    let o = offers(acts, conn);
    assert_eq!(o.len(), 1, "expected one offer to {conn}: {acts:#?}");
    o[0].clone()
}

/// The status updates sent to `conn`.
pub fn updates(acts: &[Action], conn: ConnId) -> Vec<TaskStatus> {
    events(acts, conn)
        .into_iter()
        .filter_map(|e| match e {
            SchedulerEvent::Update(s) => Some(s),
            _ => None,
        })
        .collect()
}

/// The errors sent to `conn`.
pub fn errors(acts: &[Action], conn: ConnId) -> Vec<WireError> {
    events(acts, conn)
        .into_iter()
        .filter_map(|e| match e {
            SchedulerEvent::Error(e) => Some(e),
            _ => None,
        })
        .collect()
}

/// The messages sent to agent connection `conn`.
pub fn to_agent(acts: &[Action], conn: ConnId) -> Vec<MasterToAgent> {
    acts.iter()
        .filter_map(|a| match a {
            Action::ToAgent { conn: c, msg } if *c == conn => Some(msg.clone()),
            _ => None,
        })
        .collect()
}

/// The tasks agent connection `conn` was told to run.
pub fn run_tasks(acts: &[Action], conn: ConnId) -> Vec<TaskInfo> {
    to_agent(acts, conn)
        .into_iter()
        .filter_map(|m| match m {
            MasterToAgent::RunTask { task, .. } => Some(task),
            _ => None,
        })
        .collect()
}

/// The id agent connection `conn` was registered under, if it was.
pub fn registered(acts: &[Action], conn: ConnId) -> Option<AgentId> {
    to_agent(acts, conn).into_iter().find_map(|m| match m {
        MasterToAgent::Registered { agent_id, .. } => Some(agent_id),
        _ => None,
    })
}

/// The id framework connection `conn` was subscribed under, if it was.
pub fn subscribed(acts: &[Action], conn: ConnId) -> Option<FrameworkId> {
    events(acts, conn).into_iter().find_map(|e| match e {
        SchedulerEvent::Subscribed { framework_id, .. } => Some(framework_id),
        _ => None,
    })
}

/// The error `conn` was closed with, if it was.
pub fn closed(acts: &[Action], conn: ConnId) -> Option<WireError> {
    acts.iter().find_map(|a| match a {
        Action::Close { conn: c, error } if *c == conn => Some(error.clone()),
        _ => None,
    })
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
    /// What the master wrote to its registry.
    pub registry: MemoryRegistry,
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
        Sim {
            m,
            t0,
            now: t0,
            next_conn: 0,
            next_task: 0,
            inbox: HashMap::new(),
            agent_ids: HashMap::new(),
            registry: MemoryRegistry::new(),
        }
    }

    /// The master dies (connections, offers, tasks and undelivered actions with it) and a new
    /// one with the same configuration and the default allocator starts from the registry, as
    /// a restarted `agora master` does from its work dir.
    pub fn restart(&mut self) {
        self.collect();
        self.inbox.clear();
        self.agent_ids.clear();
        let state = self.registry.open_epoch().expect("memory registry");
        let config = MasterConfig { master_id: state.master_id(), ..self.m.config().clone() };
        self.m = Master::new(config, self.now);
        self.m.recover(self.now, &state);
    }

    fn collect(&mut self) {
        // As a driver does: the registry first, then the actions that may depend on it.
        let ops: Vec<_> = std::iter::from_fn(|| self.m.poll_registry_op()).collect();
        self.registry.apply(&ops).expect("memory registry");
        while let Some(a) = self.m.poll_action() {
            self.inbox.entry(conn_of(&a)).or_default().push(a);
        }
    }

    fn conn(&mut self) -> ConnId {
        self.next_conn += 1;
        self.next_conn
    }

    /// Registers an agent with these resources; returns its connection and id.
    pub fn add_agent(&mut self, resources: &str) -> (ConnId, AgentId) {
        let conn = self.conn();
        let msg = register(&format!("host{conn}"), res(resources));
        self.m.handle(self.now, Event::Agent { conn, principal: format!("agent{conn}"), msg });
        self.collect();
        let id =
            registered(self.inbox.get(&conn).map_or(&[][..], Vec::as_slice), conn).expect("agent registered");
        self.inbox.remove(&conn);
        self.agent_ids.insert(conn, id.clone());
        (conn, id)
    }

    /// Subscribes a framework of `role`; returns its connection and id.
    pub fn subscribe(&mut self, role: &str) -> (ConnId, FrameworkId) {
        let conn = self.conn();
        let info = FrameworkInfo {
            role: role.into(),
            ..framework_info(None, &format!("fw{conn}"), Duration::from_secs(60))
        };
        self.call(conn, SchedulerCall::Subscribe(info));
        let events = self.inbox.remove(&conn).unwrap_or_default();
        let id = subscribed(&events, conn).expect("subscribed");
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

    /// Runs timers until the next allocation (at most `max`): one allocation cycle, all its
    /// slices.
    pub fn cycle(&mut self) {
        self.advance(self.m.config().allocation_batch.max(Duration::from_millis(1)) * 2);
        while self.m.allocation_in_progress() {
            self.m.handle_timeout(self.now);
            self.collect();
        }
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
                TaskInfo { name: "t".into(), ..command_task(id, (*r).clone()) }
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
            reason: Reason::CommandExited,
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
