//! How long the sans-IO master core is busy with an allocation cycle, slice by slice, and how
//! long a status update that arrives as a cycle starts waits for its answer
//! (`MasterConfig::allocation_slice`). No sockets, simulated time, wall-clock figures:
//!
//! ```text
//! cargo run --release -p agora-master --example slice_latency -- [AGENTS] [FRAMEWORKS] [CYCLES] [SLICE...]
//! ```
//!
//! Defaults: 50,000 agents `cpus:32;mem:128GiB;disk:1TiB`, 200 frameworks of role `*` with no
//! demand (whole-agent offers, as `benches/allocation.rs`), 20 cycles per slice size, slice
//! sizes `max` (whole cycles: the baseline), 1000, 2000, 5000. Each cycle: every offer of the
//! previous one is declined without a filter (untimed), then, as a driver does, the core
//! runs a step of the cycle, takes what arrived meanwhile (here: one agent's status update,
//! queued when the cycle became due) and answers it, and runs the remaining steps. Printed per
//! slice size: the whole cycle (sum of its steps; median and max over the cycles), its first
//! step (median), the longest of the other steps, and the update's wait from the cycle's
//! start to its answer (median and max). Steps are timed twice: on the wall clock (what an
//! event waits on this machine, preemptions by other processes included) and in the thread's
//! CPU time (what the core computes; the figure a quiet machine would show).

use std::time::{Duration, Instant};

use agora_master::core::{Action, Event, Master, MasterConfig};
use agora_master::testing::{command_task, framework_info, register, res};
use agora_sdk::proto::*;
use uuid::Uuid;

struct World {
    m: Master,
    now: Instant,
    /// Outstanding offers: framework connection, offer, agent.
    offers: Vec<(u64, OfferId, AgentId)>,
    /// The agent (connection, id) running the task whose updates are timed, and the task.
    agent: (u64, AgentId),
    framework: (u64, FrameworkId),
    task: TaskId,
    uuids: u128,
}

const FW_CONN: u64 = 1_000_000;

impl World {
    fn new(agents: usize, frameworks: usize, slice: usize) -> World {
        let now = Instant::now();
        let config = MasterConfig {
            master_id: "b".into(),
            agent_timeout: Duration::from_secs(10_000_000),
            framework_heartbeat_interval: Duration::from_secs(10_000_000),
            framework_timeout: None,
            allocation_slice: slice,
            ..MasterConfig::default()
        };
        let mut m = Master::new(config, now);
        let resources = res("cpus:32;mem:128GiB;disk:1TiB");
        for i in 0..agents as u64 {
            let msg = register(&format!("host{i}"), resources.clone());
            m.handle(now, Event::Agent { conn: i, principal: format!("agent{i}"), msg });
        }
        let mut fw_id = None;
        for j in 0..frameworks as u64 {
            let info = framework_info(None, &format!("fw{j}"), Duration::from_secs(3600));
            let call = SchedulerCall::Subscribe(info);
            m.handle(now, Event::Framework { conn: FW_CONN + j, principal: "fw".into(), call });
            while let Some(a) = m.poll_action() {
                if let Action::ToFramework {
                    event: SchedulerEvent::Subscribed { framework_id, .. }, ..
                } = a
                {
                    fw_id.get_or_insert(framework_id);
                }
            }
        }
        let mut w = World {
            m,
            now,
            offers: Vec::new(),
            agent: (0, AgentId::new("")),
            framework: (FW_CONN, fw_id.expect("a framework subscribed")),
            task: TaskId::new("t1"),
            uuids: 0,
        };
        // One cycle, then the first framework launches one small task on its first offer.
        w.cycle(&mut |_| {});
        let (conn, offer_id, agent_id) =
            w.offers.iter().find(|(c, _, _)| *c == FW_CONN).cloned().expect("an offer");
        w.agent = (agent_conn(&agent_id), agent_id);
        let call = SchedulerCall::Accept {
            offer_ids: vec![offer_id.clone()],
            operations: vec![Operation::Launch {
                tasks: vec![command_task(w.task.clone(), res("cpus:1;mem:1GiB"))],
            }],
            refuse_seconds: Some(0.0),
        };
        w.offers.retain(|(_, id, _)| *id != offer_id);
        w.m.handle(w.now, Event::Framework { conn, principal: "fw".into(), call });
        let acts: Vec<Action> = std::iter::from_fn(|| w.m.poll_action()).collect();
        assert!(
            acts.iter().any(|a| matches!(a, Action::ToAgent { msg: MasterToAgent::RunTask { .. }, .. })),
            "the task is launched: {acts:?}"
        );
        w
    }

    fn drain(&mut self) -> bool {
        let mut update = false;
        while let Some(a) = self.m.poll_action() {
            match a {
                Action::ToFramework { conn, event: SchedulerEvent::Offers(offers) } => {
                    self.offers.extend(offers.into_iter().map(|o| (conn, o.id, o.agent_id)))
                }
                Action::ToFramework { event: SchedulerEvent::Update(_), .. } => update = true,
                _ => {}
            }
        }
        update
    }

    /// One cycle, a simulated second after the previous one: `between` runs after its first
    /// step. Returns the steps' durations.
    fn cycle(&mut self, between: &mut dyn FnMut(&mut World)) -> Vec<Took> {
        self.now += Duration::from_secs(1);
        let now = self.now;
        let mut steps = vec![timed(|| self.m.handle_timeout(now))];
        between(self);
        while self.m.allocation_in_progress() {
            steps.push(timed(|| self.m.handle_timeout(now)));
        }
        self.drain();
        steps
    }

    fn decline_all(&mut self) {
        for (conn, id, _) in std::mem::take(&mut self.offers) {
            let call = SchedulerCall::Decline { offer_ids: vec![id], refuse_seconds: Some(0.0) };
            self.m.handle(self.now, Event::Framework { conn, principal: "fw".into(), call });
        }
        self.drain();
    }

    fn status_update(&mut self) -> Event {
        self.uuids += 1;
        let status = TaskStatus {
            task_id: self.task.clone(),
            framework_id: self.framework.1.clone(),
            agent_id: Some(self.agent.1.clone()),
            state: TaskState::Running,
            uuid: Some(Uuid::from_u128(self.uuids)),
            source: UpdateSource::Executor,
            reason: "bench".into(),
            message: String::new(),
            exit_code: None,
            signal: None,
            usage: None,
            timestamp_ms: 0,
        };
        Event::Agent {
            conn: self.agent.0,
            principal: format!("agent{}", self.agent.0),
            msg: AgentMessage::StatusUpdate(status),
        }
    }
}

/// This thread's CPU time so far.
fn cpu_now() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant the kernel knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// One cycle: its steps, and the wait of the update queued at its start.
type Run = (Vec<Took>, Took);

/// A step's duration on the wall clock and in CPU time.
#[derive(Clone, Copy, Default)]
struct Took {
    wall: Duration,
    cpu: Duration,
}

fn timed(f: impl FnOnce()) -> Took {
    let (w, c) = (Instant::now(), cpu_now());
    f();
    Took { wall: w.elapsed(), cpu: cpu_now().saturating_sub(c) }
}

fn agent_conn(id: &AgentId) -> u64 {
    // "b-A{n}": the n-th agent registered on connection n - 1.
    id.as_str().rsplit('A').next().and_then(|n| n.parse::<u64>().ok()).map_or(0, |n| n - 1)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, d: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let (agents, frameworks, cycles) = (num(0, 50_000), num(1, 200), num(2, 20).max(1));
    let sort_frees = std::env::var_os("SORT_FREES").is_some();
    let mut slices: Vec<usize> = args
        .iter()
        .skip(3)
        .map(|a| if a == "max" { usize::MAX } else { a.parse().expect("a slice size or `max`") })
        .collect();
    if slices.is_empty() {
        slices = vec![usize::MAX, 1000, 2000, 5000];
    }
    println!("{agents} agents x {frameworks} frameworks, {cycles} cycles per slice size");
    println!(
        "| slice | steps/cycle | cycle (median, max) | first step (median) | longest other step | update wait (median, max) |"
    );
    println!("|---|---|---|---|---|---|");
    for slice in slices {
        let mut w = World::new(agents, frameworks, slice);
        let mut runs: Vec<Run> = Vec::new();
        for _ in 0..cycles {
            w.decline_all();
            if sort_frees {
                // glibc sorts the chunks freed by the declines (the previous cycle's 50,000
                // offers) at the next allocations, up to 10,000 chunks per allocation of 1 KiB
                // or more: here, untimed, rather than in the cycle's first step.
                let held: Vec<Vec<u8>> = (0..64).map(|_| Vec::with_capacity(4096)).collect();
                drop(std::hint::black_box(held));
            }
            let update = w.status_update();
            let (start, start_cpu) = (Instant::now(), cpu_now());
            let mut waited = None;
            let steps = w.cycle(&mut |w| {
                // What the driver does between steps: the events queued meanwhile, answered.
                w.m.handle(w.now, update.clone());
                let mut answered = false;
                while let Some(a) = w.m.poll_action() {
                    match a {
                        Action::ToFramework { event: SchedulerEvent::Update(_), .. } => answered = true,
                        Action::ToFramework { conn, event: SchedulerEvent::Offers(offers) } => {
                            w.offers.extend(offers.into_iter().map(|o| (conn, o.id, o.agent_id)))
                        }
                        _ => {}
                    }
                }
                assert!(answered, "the update is forwarded to its framework");
                waited = Some(Took { wall: start.elapsed(), cpu: cpu_now().saturating_sub(start_cpu) });
            });
            // The framework acknowledges (untimed), so the next update is a fresh one.
            let call = SchedulerCall::Acknowledge {
                agent_id: w.agent.1.clone(),
                task_id: w.task.clone(),
                uuid: Uuid::from_u128(w.uuids),
            };
            w.m.handle(w.now, Event::Framework { conn: w.framework.0, principal: "fw".into(), call });
            w.drain();
            assert_eq!(w.offers.len(), agents, "every agent is offered");
            runs.push((steps, waited.expect("the update was handled")));
        }
        let label = if slice == usize::MAX { "max (whole cycle)".to_string() } else { slice.to_string() };
        // Each figure as "wall / cpu".
        let fig = |pick: &dyn Fn(&Run) -> Took, stat: &dyn Fn(Vec<Duration>) -> Duration| {
            let wall = stat(runs.iter().map(|r| pick(r).wall).collect());
            let cpu = stat(runs.iter().map(|r| pick(r).cpu).collect());
            format!("{} / {}", ms(wall), ms(cpu))
        };
        let max = |v: Vec<Duration>| v.into_iter().max().unwrap_or_default();
        let sum =
            |r: &Run| Took { wall: r.0.iter().map(|t| t.wall).sum(), cpu: r.0.iter().map(|t| t.cpu).sum() };
        let first = |r: &Run| r.0[0];
        let other = |r: &Run| Took {
            wall: r.0.iter().skip(1).map(|t| t.wall).max().unwrap_or_default(),
            cpu: r.0.iter().skip(1).map(|t| t.cpu).max().unwrap_or_default(),
        };
        let wait = |r: &Run| r.1;
        let steps_per = runs.last().map_or(0, |r| r.0.len());
        println!(
            "| {label} | {steps_per} | {}, {} | {} | {} | {}, {} |",
            fig(&sum, &median),
            fig(&sum, &max),
            fig(&first, &median),
            if steps_per > 1 { fig(&other, &max) } else { "-".into() },
            fig(&wait, &median),
            fig(&wait, &max),
        );
    }
}
