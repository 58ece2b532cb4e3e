//! The scale simulation through the sans-IO core (no sockets, no threads): a master with
//! `agents` agents and `frameworks` frameworks, measured as the process's RSS before and after
//! building it, the time its agents take to register, an allocation cycle over all of them,
//! the recovery of a new master from the registry followed by every agent's re-registration,
//! and the handling of ACCEPTs (accept → `RunTask`) in that state.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agora_master::core::{Action, ConnId, Event, Master, MasterConfig};
use agora_master::registry::{MemoryRegistry, Registry};
use agora_master::testing::{command_task, framework_info, register, res};
use agora_sdk::proto::*;

/// First connection id of the frameworks (agents are `0..agents`).
const FRAMEWORK_CONN: ConnId = 1 << 40;

/// What was measured.
#[derive(Debug, Default)]
pub struct Figures {
    /// Process RSS before building the master and after (bytes).
    pub rss_before: u64,
    pub rss_after: u64,
    /// Every agent's first registration (the core and the registry writes it makes).
    pub register: Duration,
    /// Allocation cycles over the whole cluster, every agent free (sorted).
    pub cycles: Vec<Duration>,
    /// Offers the last cycle made.
    pub offers: usize,
    /// A new master's recovery from the registry.
    pub recover: Duration,
    /// Then every agent's re-registration.
    pub reregister: Duration,
    pub reregistered: usize,
    /// Per ACCEPT of one task: handling until its `RunTask` is out (sorted).
    pub accepts: Vec<Duration>,
    /// Launches that produced no `RunTask`.
    pub refused: usize,
}

/// The master, its registry and what the drivers learnt.
struct Cluster {
    m: Master,
    registry: MemoryRegistry,
    now: Instant,
    agent_ids: Vec<Option<AgentId>>,
    framework_ids: HashMap<ConnId, FrameworkId>,
    /// Offers outstanding, by framework connection.
    offers: Vec<(ConnId, Offer)>,
    /// `RunTask`s seen by the last drain.
    run_tasks: usize,
}

impl Cluster {
    /// As a driver does: the registry first, then the actions.
    fn drain(&mut self) {
        let ops: Vec<_> = std::iter::from_fn(|| self.m.poll_registry_op()).collect();
        self.registry.apply(&ops).expect("memory registry");
        self.registry.log.clear();
        while let Some(a) = self.m.poll_action() {
            match a {
                Action::ToAgent { conn, msg: MasterToAgent::Registered { agent_id, .. } } => {
                    self.agent_ids[conn as usize] = Some(agent_id);
                }
                Action::ToAgent { msg: MasterToAgent::RunTask { .. }, .. } => self.run_tasks += 1,
                Action::ToFramework { conn, event: SchedulerEvent::Subscribed { framework_id, .. } } => {
                    self.framework_ids.insert(conn, framework_id);
                }
                Action::ToFramework { conn, event: SchedulerEvent::Offers(offers) } => {
                    self.offers.extend(offers.into_iter().map(|o| (conn, o)));
                }
                _ => {}
            }
        }
    }

    fn agent(&mut self, conn: ConnId, msg: AgentMessage) {
        self.m.handle(self.now, Event::Agent { conn, principal: "agent".into(), msg });
    }

    fn call(&mut self, conn: ConnId, call: SchedulerCall) {
        self.m.handle(self.now, Event::Framework { conn, principal: "fw".into(), call });
    }

    /// Declines every outstanding offer without a filter (untimed), then runs a cycle a
    /// simulated second later (timed).
    fn cycle(&mut self) -> Duration {
        for (conn, offer) in std::mem::take(&mut self.offers) {
            self.call(conn, SchedulerCall::Decline { offer_ids: vec![offer.id], refuse_seconds: Some(0.0) });
        }
        self.drain();
        self.now += Duration::from_secs(1);
        let t = Instant::now();
        self.m.handle_timeout(self.now);
        let took = t.elapsed();
        self.drain();
        took
    }
}

/// Resident memory of this process (`VmRSS`), in bytes.
pub fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Runs the simulation: `cycles` allocation cycles, `launches` ACCEPTs of one task.
pub fn run(agents: usize, frameworks: usize, cycles: usize, launches: usize) -> Figures {
    let mut f = Figures { rss_before: rss(), ..Figures::default() };
    let config = MasterConfig {
        master_id: "sim".into(),
        // No heartbeats in simulated time: silence must not mark anything unreachable.
        agent_timeout: Duration::from_secs(10_000_000),
        framework_heartbeat_interval: Duration::from_secs(10_000_000),
        framework_timeout: None,
        ..MasterConfig::default()
    };
    let mut registry = MemoryRegistry::new();
    let state = registry.open_epoch().expect("memory registry");
    let now = Instant::now();
    let mut m = Master::new(MasterConfig { master_id: state.master_id(), ..config.clone() }, now);
    m.recover(now, &state);
    let mut c = Cluster {
        m,
        registry,
        now,
        agent_ids: vec![None; agents],
        framework_ids: HashMap::new(),
        offers: Vec::new(),
        run_tasks: 0,
    };
    let resources = res("cpus:32;mem:128GiB;disk:1TiB");
    let t = Instant::now();
    for i in 0..agents {
        c.agent(i as ConnId, register(&format!("host{i}"), resources.clone()));
        c.drain();
    }
    f.register = t.elapsed();
    for j in 0..frameworks {
        let info = framework_info(None, &format!("fw{j}"), Duration::from_secs(3600));
        c.call(FRAMEWORK_CONN + j as ConnId, SchedulerCall::Subscribe(info));
        c.drain();
    }
    f.rss_after = rss();

    for _ in 0..cycles.max(1) {
        f.cycles.push(c.cycle());
    }
    f.cycles.sort();
    f.offers = c.offers.len();

    // A new master from the registry; then every agent comes back with its id.
    let state = c.registry.open_epoch().expect("memory registry");
    let t = Instant::now();
    let mut m = Master::new(MasterConfig { master_id: state.master_id(), ..config }, c.now);
    m.recover(c.now, &state);
    f.recover = t.elapsed();
    drop(std::mem::replace(&mut c.m, m));
    c.offers.clear();
    let ids = std::mem::replace(&mut c.agent_ids, vec![None; agents]);
    let t = Instant::now();
    for (i, id) in ids.into_iter().enumerate() {
        let AgentMessage::Register { hostname, resources, attributes, .. } =
            register(&format!("host{i}"), resources.clone())
        else {
            unreachable!("register builds a Register")
        };
        let msg = AgentMessage::Register { agent_id: id, hostname, resources, attributes, tasks: vec![] };
        c.agent(i as ConnId, msg);
        c.drain();
    }
    f.reregister = t.elapsed();
    f.reregistered = c.agent_ids.iter().filter(|a| a.is_some()).count();
    // The frameworks fail over to the new master.
    for (conn, id) in c.framework_ids.clone() {
        let j = conn - FRAMEWORK_CONN;
        let info = framework_info(Some(&id), &format!("fw{j}"), Duration::from_secs(3600));
        c.call(conn, SchedulerCall::Subscribe(info));
        c.drain();
    }
    c.cycle();

    // ACCEPTs of one task each on distinct offers, in that state.
    let shape = res("cpus:0.1;mem:32MiB");
    let offers = std::mem::take(&mut c.offers);
    for (n, (conn, offer)) in offers.into_iter().take(launches).enumerate() {
        let task = command_task(TaskId::new(format!("sim-{n}")), shape.clone());
        let call = SchedulerCall::Accept {
            offer_ids: vec![offer.id],
            operations: vec![Operation::Launch { tasks: vec![task] }],
            refuse_seconds: None,
        };
        let before = c.run_tasks;
        let t = Instant::now();
        c.call(conn, call);
        c.drain();
        f.accepts.push(t.elapsed());
        if c.run_tasks == before {
            f.refused += 1;
        }
    }
    f.accepts.sort();
    f
}
