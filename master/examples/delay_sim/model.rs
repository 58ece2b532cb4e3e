//! The delay-scheduling simulation model: the real sans-IO master core (DRF allocator, offers,
//! decline filters) with simulated time, simulated agents that "run" tasks for a modelled
//! duration, and simulated frameworks that each use the SDK's real
//! [`DelayScheduler`](agora_sdk::locality::DelayScheduler). No sockets, no clock.
//!
//! Shared by `examples/delay_sim/main.rs` (the full run of BENCHMARKS.md) and
//! `tests/delay_sim.rs` (a small, fast run asserting the shape).

#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use agora_master::core::{Action, ConnId, Event, Master, MasterConfig};
use agora_master::testing::{command_task, framework_info, register, subscribed};
use agora_sdk::attributes::{AttrValue, Attributes};
use agora_sdk::locality::{DelayConfig, DelayScheduler, Locality, LocalityStats, PendingTask, Preference};
use agora_sdk::proto::*;
use agora_sdk::Resources;

/// The cluster and the workload.
#[derive(Clone, Debug)]
pub struct Model {
    pub agents: usize,
    pub racks: usize,
    /// Resources of every agent.
    pub agent_resources: Resources,
    /// Resources of every task (one task per block).
    pub task_resources: Resources,
    /// Blocks in the data set; each is stored three times, rack-aware (one replica in one rack,
    /// two on two other agents of another rack, as HDFS does).
    pub blocks: usize,
    pub frameworks: usize,
    /// Framework 0 submits this many times more work than each other framework (it runs above
    /// its fair share while others are light).
    pub heavy: f64,
    /// Offered load: the work submitted per second, in task-seconds of node-local tasks, as a
    /// fraction of the cluster's task slots.
    pub load: f64,
    /// Jobs arrive (Poisson, per framework) during this much simulated time; the run ends when
    /// the last job has finished.
    pub arrivals_for: Duration,
    /// Job sizes: `(weight, smallest, largest)` tasks, uniform within a bin.
    pub sizes: Vec<(f64, u32, u32)>,
    /// A task computes for a time uniform in this range (seconds)...
    pub compute: (f64, f64),
    /// ...and reads its block in this many seconds: node-local, rack-local, off-rack.
    pub read: [f64; 3],
    /// Delay between a framework's call and the master seeing it, and between the master's
    /// message and the framework or agent seeing it (one way).
    pub latency: Duration,
    pub seed: u64,
}

impl Model {
    /// The benchmark model of BENCHMARKS.md: 100 agents of 4 slots in 10 racks shared by 16
    /// frameworks (as the Mesos paper's 16 Hadoop instances), a Facebook-like mix of job sizes.
    pub fn paper() -> Self {
        Model {
            agents: 100,
            racks: 10,
            agent_resources: res("cpus:4;mem:16GiB"),
            task_resources: res("cpus:1;mem:2GiB"),
            blocks: 3000,
            frameworks: 16,
            heavy: 3.0,
            load: 0.7,
            arrivals_for: Duration::from_secs(600),
            // Shaped like the Facebook distribution of the delay scheduling paper: most jobs have
            // one or two tasks, a tail of large ones (cut at 300 tasks).
            sizes: vec![
                (39.0, 1, 1),
                (16.0, 2, 2),
                (14.0, 3, 20),
                (9.0, 21, 60),
                (6.0, 61, 150),
                (6.0, 151, 300),
            ],
            compute: (1.5, 2.5),
            // A 128 MiB block: local disk ~200 MiB/s, the rack switch ~110 MiB/s, across the
            // oversubscribed core ~40 MiB/s.
            read: [0.6, 1.2, 3.0],
            latency: Duration::from_millis(1),
            seed: 1,
        }
    }

    /// The same cluster with a short arrival window and jobs of at most 60 tasks, for a
    /// debug-mode test.
    pub fn small() -> Self {
        Model {
            blocks: 1000,
            arrivals_for: Duration::from_secs(60),
            sizes: vec![(39.0, 1, 1), (16.0, 2, 2), (14.0, 3, 20), (9.0, 21, 60)],
            ..Self::paper()
        }
    }

    fn slots(&self) -> f64 {
        let per_agent = self.agent_resources.cpus / self.task_resources.cpus.max(1);
        (per_agent as usize * self.agents) as f64
    }

    fn mean_size(&self) -> f64 {
        let w: f64 = self.sizes.iter().map(|s| s.0).sum();
        self.sizes.iter().map(|(p, lo, hi)| p * f64::from(lo + hi) / 2.0).sum::<f64>() / w
    }

    fn local_task_secs(&self) -> f64 {
        (self.compute.0 + self.compute.1) / 2.0 + self.read[0]
    }
}

pub fn res(s: &str) -> Resources {
    Resources::parse(s).unwrap_or_default()
}

/// How the frameworks share the cluster.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Policy {
    /// Static partitioning: framework `f` uses only the agents `i` with `i % frameworks == f`
    /// (it declines the others for good) and takes the first offer (no delay).
    Static,
    /// All frameworks share every agent and place tasks locality-blind, first come first
    /// served (the head task takes the next free slot): the naive fair scheduler the delay
    /// scheduling paper starts from. The schedulers see no preferences, so their own counts are
    /// all "any"; the simulation counts where the blocks really were.
    Naive,
    /// All frameworks share every agent; each waits up to `node` for node-local offers and
    /// `rack` more for rack-local ones.
    Delay { node: Duration, rack: Duration },
}

impl Policy {
    pub fn label(&self) -> String {
        match self {
            Policy::Static => "static partitioning, no delay".into(),
            Policy::Naive => "shared, locality-blind FIFO, no delay".into(),
            Policy::Delay { node, rack } => {
                format!("shared, node delay {} s, rack delay {} s", node.as_secs_f64(), rack.as_secs_f64())
            }
        }
    }
}

/// Results of one run.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub policy: Option<Policy>,
    pub jobs: usize,
    pub tasks: u64,
    /// Where tasks ran, from the simulation's own knowledge of the blocks.
    pub node: u64,
    pub rack: u64,
    pub any: u64,
    /// The same, as counted by the frameworks' schedulers (must agree).
    pub reported: LocalityStats,
    pub mean_response: Duration,
    /// Mean response of jobs of at most 20 tasks, and of larger ones.
    pub mean_response_small: Duration,
    pub mean_response_large: Duration,
    /// Node locality of tasks of small jobs.
    pub node_small: f64,
    /// Node locality per job (its node-local tasks over its tasks), averaged over jobs.
    pub node_per_job: f64,
    /// Mean busy slots over the arrival window, as a fraction of all slots.
    pub utilization: f64,
    pub offers: u64,
    pub declined: u64,
    /// Simulated time until the last job finished.
    pub makespan: Duration,
}

impl Outcome {
    pub fn fraction(&self, l: Locality) -> f64 {
        let n = match l {
            Locality::Node => self.node,
            Locality::Rack => self.rack,
            Locality::Any => self.any,
        };
        n as f64 / self.tasks.max(1) as f64
    }
}

/// The simulation's index of an offer's agent (its hostname is `agent-{i}`).
fn agent_index(offer: &Offer) -> usize {
    offer.hostname.strip_prefix("agent-").and_then(|i| i.parse().ok()).unwrap_or(usize::MAX)
}

/// SplitMix64: a small deterministic generator (no dependency needed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        (self.unit() * n as f64) as usize % n.max(1)
    }
    fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// A job arrives at framework `fw`.
    Arrival { fw: usize },
    /// Task number `task` ends on agent `agent`.
    Finish { agent: usize, task: usize },
    /// A framework's call reaches the master (index into `in_flight`).
    Call { n: usize },
    /// A master's message reaches its peer (index into `in_flight_actions`).
    Deliver { n: usize },
}

struct Agent {
    conn: ConnId,
    rack: usize,
}

struct Job {
    arrived: Instant,
    size: usize,
    left: usize,
    node: usize,
}

/// What a task is, for the simulation.
#[derive(Clone, Copy, Debug)]
struct TaskMeta {
    job: usize,
    fw: usize,
    block: usize,
}

struct Framework {
    conn: ConnId,
    id: FrameworkId,
    sched: DelayScheduler<usize>,
    rate: f64,
}

struct World {
    m: Master,
    now: Instant,
    t0: Instant,
    model: Model,
    rng: Rng,
    agents: Vec<Agent>,
    agent_by_conn: HashMap<ConnId, usize>,
    /// Agents holding each block.
    replicas: Vec<[usize; 3]>,
    frameworks: Vec<Framework>,
    fw_by_conn: HashMap<ConnId, usize>,
    jobs: Vec<Job>,
    tasks: Vec<TaskMeta>,
    events: BinaryHeap<Reverse<(Instant, u64, Ev)>>,
    seq: u64,
    calls: Vec<Option<(ConnId, SchedulerCall)>>,
    deliveries: Vec<Option<Action>>,
    out: Outcome,
    busy_slot_secs: f64,
    busy: usize,
    last_busy_change: Instant,
    uuid: u128,
    /// Finished jobs: (size, response time, node-local tasks).
    response: Vec<(usize, Duration, usize)>,
    /// Static partitioning: frameworks decline agents outside their partition.
    partitioned: bool,
    /// Tasks are added without preferences ([`Policy::Naive`]).
    blind: bool,
}

impl World {
    fn schedule(&mut self, at: Instant, ev: Ev) {
        self.seq += 1;
        self.events.push(Reverse((at, self.seq, ev)));
    }

    fn call(&mut self, fw: usize, call: SchedulerCall) {
        let conn = self.frameworks[fw].conn;
        self.calls.push(Some((conn, call)));
        let n = self.calls.len() - 1;
        let at = self.now + self.model.latency;
        self.schedule(at, Ev::Call { n });
    }

    fn set_busy(&mut self, delta: isize) {
        let end = self.t0 + self.model.arrivals_for;
        let upto = self.now.min(end);
        if upto > self.last_busy_change {
            self.busy_slot_secs += self.busy as f64 * (upto - self.last_busy_change).as_secs_f64();
            self.last_busy_change = upto;
        }
        self.busy = self.busy.saturating_add_signed(delta);
    }

    fn locality(&self, agent: usize, block: usize) -> Locality {
        let holders = &self.replicas[block];
        if holders.contains(&agent) {
            Locality::Node
        } else if holders.iter().any(|h| self.agents[*h].rack == self.agents[agent].rack) {
            Locality::Rack
        } else {
            Locality::Any
        }
    }

    fn arrival(&mut self, fw: usize) {
        let model = &self.model;
        let total: f64 = model.sizes.iter().map(|s| s.0).sum();
        let mut pick = self.rng.unit() * total;
        let mut size = 1;
        for (w, lo, hi) in &model.sizes {
            if pick < *w {
                size = *lo as usize + self.rng.below((hi - lo + 1) as usize);
                break;
            }
            pick -= w;
        }
        let start = self.rng.below(self.model.blocks);
        let job = self.jobs.len();
        self.jobs.push(Job { arrived: self.now, size, left: size, node: 0 });
        for k in 0..size {
            let block = (start + k) % self.model.blocks;
            let task = self.tasks.len();
            self.tasks.push(TaskMeta { job, fw, block });
            let mut pref = Preference::default().attribute("blocks", format!("b{block}"));
            let racks: BTreeSet<usize> = self.replicas[block].iter().map(|a| self.agents[*a].rack).collect();
            for r in racks {
                pref = pref.rack(format!("r{r}"));
            }
            if self.blind {
                pref = Preference::default();
            }
            let pending = PendingTask::new(
                TaskId::new(format!("t{task}")),
                self.model.task_resources.clone(),
                pref,
                task,
            )
            .in_job(job as u64);
            self.frameworks[fw].sched.add(self.now, pending);
        }
        if self.frameworks[fw].sched.take_revive() {
            self.call(fw, SchedulerCall::Revive);
        }
        let next = self.now + Duration::from_secs_f64(self.rng.exp(1.0 / self.frameworks[fw].rate));
        if next < self.t0 + self.model.arrivals_for {
            self.schedule(next, Ev::Arrival { fw });
        }
    }

    fn finish(&mut self, agent: usize, task: usize) {
        self.set_busy(-1);
        let meta = self.tasks[task];
        self.uuid += 1;
        let status = TaskStatus {
            task_id: TaskId::new(format!("t{task}")),
            framework_id: self.frameworks[meta.fw].id.clone(),
            agent_id: None,
            state: TaskState::Finished,
            uuid: Some(uuid::Uuid::from_u128(self.uuid)),
            source: UpdateSource::Agent,
            reason: Reason::CommandExited,
            message: String::new(),
            exit_code: Some(0),
            signal: None,
            usage: None,
            timestamp_ms: 0,
        };
        let conn = self.agents[agent].conn;
        self.m.handle(
            self.now,
            Event::Agent {
                conn,
                principal: format!("agent{agent}"),
                msg: AgentMessage::StatusUpdate(status),
            },
        );
        let job = &mut self.jobs[meta.job];
        job.left -= 1;
        if job.left == 0 {
            let response = self.now - job.arrived;
            self.out.makespan = self.out.makespan.max(self.now - self.t0);
            self.record_job(meta.job, response);
        }
    }

    fn record_job(&mut self, job: usize, response: Duration) {
        let j = &self.jobs[job];
        self.response.push((j.size, response, j.node));
    }

    /// Carries out one action of the master, now (after its latency).
    fn deliver(&mut self, action: Action) {
        match action {
            Action::ToAgent { conn, msg: MasterToAgent::RunTask { task, .. } } => {
                let Some(&agent) = self.agent_by_conn.get(&conn) else { return };
                let Some(n) = task.task_id.as_str().strip_prefix('t').and_then(|n| n.parse::<usize>().ok())
                else {
                    return;
                };
                let meta = self.tasks[n];
                let locality = self.locality(agent, meta.block);
                match locality {
                    Locality::Node => {
                        self.out.node += 1;
                        self.jobs[meta.job].node += 1;
                    }
                    Locality::Rack => self.out.rack += 1,
                    Locality::Any => self.out.any += 1,
                }
                self.out.tasks += 1;
                // The same task computes as long in every run (common random numbers).
                let (lo, hi) = self.model.compute;
                let mut r = Rng(self.model.seed ^ (n as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
                let secs = lo + (hi - lo) * r.unit() + self.model.read[locality as usize];
                self.set_busy(1);
                let at = self.now + Duration::from_secs_f64(secs);
                self.schedule(at, Ev::Finish { agent, task: n });
            }
            Action::ToAgent { .. } => {}
            Action::ToFramework { conn, event } => {
                let Some(&fw) = self.fw_by_conn.get(&conn) else { return };
                match event {
                    SchedulerEvent::Offers(mut offers) => {
                        self.out.offers += offers.len() as u64;
                        if self.partitioned {
                            let n = self.model.frameworks;
                            let (mine, others): (Vec<Offer>, Vec<Offer>) =
                                offers.into_iter().partition(|o| agent_index(o) % n == fw);
                            offers = mine;
                            if !others.is_empty() {
                                self.out.declined += others.len() as u64;
                                let offer_ids = others.into_iter().map(|o| o.id).collect();
                                let refuse_seconds = Some(30.0 * 24.0 * 3600.0);
                                self.call(fw, SchedulerCall::Decline { offer_ids, refuse_seconds });
                            }
                            if offers.is_empty() {
                                return;
                            }
                        }
                        let d = self.frameworks[fw].sched.on_offers(self.now, &offers);
                        self.out.declined += d.declines.len() as u64;
                        for l in d.launches {
                            let tasks = l
                                .tasks
                                .into_iter()
                                .map(|p| TaskInfo {
                                    name: "map".into(),
                                    ..command_task(p.id, self.model.task_resources.clone())
                                })
                                .collect();
                            self.call(
                                fw,
                                SchedulerCall::Accept {
                                    offer_ids: vec![l.offer_id],
                                    operations: vec![Operation::Launch { tasks }],
                                    refuse_seconds: Some(d.refuse_seconds),
                                },
                            );
                        }
                        if !d.declines.is_empty() {
                            self.call(
                                fw,
                                SchedulerCall::Decline {
                                    offer_ids: d.declines,
                                    refuse_seconds: Some(d.refuse_seconds),
                                },
                            );
                        }
                    }
                    SchedulerEvent::Update(status) => {
                        assert!(
                            matches!(
                                status.state,
                                TaskState::Finished | TaskState::Staging | TaskState::Running
                            ),
                            "unexpected update {status:?}"
                        );
                        if let (Some(uuid), Some(agent_id)) = (status.uuid, status.agent_id) {
                            self.call(
                                fw,
                                SchedulerCall::Acknowledge { agent_id, task_id: status.task_id, uuid },
                            );
                        }
                    }
                    SchedulerEvent::Error(e) => panic!("framework {fw} got an error: {e}"),
                    _ => {}
                }
            }
            Action::Close { conn, error } => panic!("the master closed connection {conn}: {error}"),
        }
    }

    fn drain(&mut self) {
        while let Some(a) = self.m.poll_action() {
            self.deliveries.push(Some(a));
            let n = self.deliveries.len() - 1;
            let at = self.now + self.model.latency;
            self.schedule(at, Ev::Deliver { n });
        }
    }
}

/// Runs the model with these delays.
pub fn run(model: &Model, policy: Policy) -> Outcome {
    let t0 = Instant::now();
    let config = MasterConfig {
        master_id: "sim".into(),
        // The simulated agents send no heartbeats.
        agent_timeout: Duration::from_secs(365 * 24 * 3600),
        framework_heartbeat_interval: Duration::from_secs(3600),
        // Nor do the simulated frameworks.
        framework_timeout: None,
        ..MasterConfig::default()
    };
    let mut rng = Rng(model.seed);
    let agents: Vec<Agent> = (0..model.agents)
        .map(|i| Agent { conn: 1 + i as ConnId, rack: i * model.racks / model.agents })
        .collect();
    // Rack-aware replicas: one in rack A, two (distinct agents) in another rack B.
    let by_rack: Vec<Vec<usize>> =
        (0..model.racks).map(|r| (0..model.agents).filter(|a| agents[*a].rack == r).collect()).collect();
    let mut replicas = Vec::with_capacity(model.blocks);
    for _ in 0..model.blocks {
        let ra = rng.below(model.racks);
        let rb = (ra + 1 + rng.below(model.racks - 1)) % model.racks;
        let a = by_rack[ra][rng.below(by_rack[ra].len())];
        let b = by_rack[rb][rng.below(by_rack[rb].len())];
        let mut c = b;
        while c == b {
            c = by_rack[rb][rng.below(by_rack[rb].len())];
        }
        replicas.push([a, b, c]);
    }
    let mut world = World {
        m: Master::new(config, t0),
        now: t0,
        t0,
        model: model.clone(),
        rng,
        agent_by_conn: agents.iter().enumerate().map(|(i, a)| (a.conn, i)).collect(),
        agents,
        replicas,
        frameworks: Vec::new(),
        fw_by_conn: HashMap::new(),
        jobs: Vec::new(),
        tasks: Vec::new(),
        events: BinaryHeap::new(),
        seq: 0,
        calls: Vec::new(),
        deliveries: Vec::new(),
        out: Outcome { policy: Some(policy), ..Outcome::default() },
        partitioned: policy == Policy::Static,
        blind: policy == Policy::Naive,
        busy_slot_secs: 0.0,
        busy: 0,
        last_busy_change: t0,
        uuid: 0,
        response: Vec::new(),
    };
    // Agents: `rack:rN;blocks:{...}`.
    let mut held: Vec<BTreeSet<String>> = vec![BTreeSet::new(); model.agents];
    for (b, holders) in world.replicas.iter().enumerate() {
        for h in holders {
            held[*h].insert(format!("b{b}"));
        }
    }
    for (i, blocks) in held.into_iter().enumerate() {
        let mut attributes = Attributes::default();
        attributes.0.insert("rack".into(), AttrValue::Text(format!("r{}", world.agents[i].rack)));
        attributes.0.insert("blocks".into(), AttrValue::Set(blocks));
        let mut msg = register(&format!("agent-{i}"), model.agent_resources.clone());
        if let AgentMessage::Register { attributes: a, .. } = &mut msg {
            *a = attributes;
        }
        let conn = world.agents[i].conn;
        world.m.handle(t0, Event::Agent { conn, principal: format!("agent{i}"), msg });
    }
    while world.m.poll_action().is_some() {}
    // Frameworks, with arrival rates that make the offered load.
    let weights: Vec<f64> = (0..model.frameworks).map(|i| if i == 0 { model.heavy } else { 1.0 }).collect();
    let jobs_per_sec = model.load * model.slots() / (model.mean_size() * model.local_task_secs());
    let wsum: f64 = weights.iter().sum();
    for (i, w) in weights.iter().enumerate() {
        let conn = 10_000 + i as ConnId;
        let info = FrameworkInfo {
            hostname: "sim".into(),
            ..framework_info(None, &format!("fw{i}"), Duration::from_secs(3600))
        };
        world.m.handle(
            t0,
            Event::Framework { conn, principal: format!("fw{i}"), call: SchedulerCall::Subscribe(info) },
        );
        let acts: Vec<Action> = std::iter::from_fn(|| world.m.poll_action()).collect();
        let Some(id) = subscribed(&acts, conn) else { panic!("framework {i} did not subscribe") };
        let delays = match policy {
            Policy::Static | Policy::Naive => DelayConfig::greedy(),
            Policy::Delay { node, rack } => DelayConfig::new(node, rack),
        };
        let sched = DelayScheduler::new(delays);
        world.frameworks.push(Framework { conn, id, sched, rate: jobs_per_sec * w / wsum });
        world.fw_by_conn.insert(conn, i);
        let first = t0 + Duration::from_secs_f64(world.rng.exp(wsum / (jobs_per_sec * w)));
        world.schedule(first, Ev::Arrival { fw: i });
    }

    let give_up = t0 + model.arrivals_for * 50;
    // Until every job has arrived and finished (the master's own timers run forever).
    while !(world.events.is_empty() && world.response.len() == world.jobs.len()) {
        let next_event = world.events.peek().map(|Reverse((t, _, _))| *t);
        let next_timer = world.m.poll_timeout();
        let next = match (next_event, next_timer) {
            (None, None) => panic!("nothing left to happen but jobs are unfinished"),
            (Some(e), Some(t)) => e.min(t),
            (Some(x), None) | (None, Some(x)) => x,
        };
        assert!(next < give_up, "the simulation does not converge");
        world.now = world.now.max(next);
        if next_timer.is_some_and(|t| t <= world.now) {
            world.m.handle_timeout(world.now);
            world.drain();
        }
        while let Some(Reverse((t, _, ev))) = world.events.peek().copied() {
            if t > world.now {
                break;
            }
            world.events.pop();
            match ev {
                Ev::Arrival { fw } => world.arrival(fw),
                Ev::Finish { agent, task } => world.finish(agent, task),
                Ev::Call { n } => {
                    if let Some((conn, call)) = world.calls[n].take() {
                        let principal = format!("fw{}", conn - 10_000);
                        world.m.handle(world.now, Event::Framework { conn, principal, call });
                    }
                }
                Ev::Deliver { n } => {
                    if let Some(a) = world.deliveries[n].take() {
                        world.deliver(a);
                    }
                }
            }
            world.drain();
        }
        if world.calls.len() > 1 << 16 && world.calls.iter().all(Option::is_none) {
            world.calls.clear();
        }
        if world.deliveries.len() > 1 << 16 && world.deliveries.iter().all(Option::is_none) {
            world.deliveries.clear();
        }
    }
    world.set_busy(0);
    let mut out = world.out;
    out.jobs = world.jobs.len();
    for f in &world.frameworks {
        let s = f.sched.stats();
        out.reported.node += s.node;
        out.reported.rack += s.rack;
        out.reported.any += s.any;
        out.reported.total_wait += s.total_wait;
        out.reported.max_wait = out.reported.max_wait.max(s.max_wait);
    }
    let mean = |v: &mut dyn Iterator<Item = Duration>| {
        let (mut n, mut sum) = (0u32, Duration::ZERO);
        for d in v {
            n += 1;
            sum += d;
        }
        if n == 0 {
            Duration::ZERO
        } else {
            sum / n
        }
    };
    out.mean_response = mean(&mut world.response.iter().map(|r| r.1));
    out.mean_response_small = mean(&mut world.response.iter().filter(|r| r.0 <= 20).map(|r| r.1));
    out.mean_response_large = mean(&mut world.response.iter().filter(|r| r.0 > 20).map(|r| r.1));
    let (small_tasks, small_node) =
        world.response.iter().filter(|r| r.0 <= 20).fold((0, 0), |(t, n), r| (t + r.0, n + r.2));
    out.node_small = small_node as f64 / small_tasks.max(1) as f64;
    out.node_per_job = world.response.iter().map(|r| r.2 as f64 / r.0.max(1) as f64).sum::<f64>()
        / world.response.len().max(1) as f64;
    out.utilization = world.busy_slot_secs / (model.slots() * model.arrivals_for.as_secs_f64());
    assert_eq!(world.response.len(), out.jobs, "every job finished");
    out
}
