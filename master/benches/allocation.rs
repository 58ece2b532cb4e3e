//! One full allocation cycle of the sans-IO master core, no sockets:
//!
//! - `cycle/10000x1000` and `cycle/50000x200`: every agent free, every framework active (no
//!   demand: whole agents, Mesos's behaviour). Timed: the `handle_timeout` steps that run the
//!   whole cycle (all its slices of `MasterConfig::allocation_slice` agents) and produce the
//!   offers. `cycle_unsliced/50000x200`: the same with whole cycles in one step (the baseline
//!   of slicing; `examples/slice_latency.rs` times the slices themselves). Between iterations (untimed) every offer is declined
//!   without a filter, so the next cycle sees the whole cluster free again.
//! - `decline_heavy/10000x1000`: every framework declines every offer with a 5 s filter
//!   (Mesos's default) and a cycle runs each simulated second, so each agent carries the
//!   filters of its last few holders. Timed: all the declines of the previous cycle's offers
//!   plus the cycle itself.
//!
//! ```text
//! cargo bench -p agora-master --bench allocation -- --warm-up-time 1 --measurement-time 5
//! ```

use std::time::{Duration, Instant};

use agora_master::core::{Action, Event, Master, MasterConfig, DEFAULT_ALLOCATION_SLICE};
use agora_master::testing::{framework_info, register, res};
use agora_sdk::proto::*;
use criterion::{criterion_group, criterion_main, Criterion};

struct Bench {
    m: Master,
    now: Instant,
    /// Outstanding offers per framework connection.
    offers: Vec<(u64, OfferId)>,
}

impl Bench {
    fn new(agents: usize, frameworks: usize, slice: usize) -> Bench {
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
        for j in 0..frameworks as u64 {
            let conn = 1_000_000 + j;
            let info = framework_info(None, &format!("fw{j}"), Duration::from_secs(3600));
            m.handle(
                now,
                Event::Framework { conn, principal: "fw".into(), call: SchedulerCall::Subscribe(info) },
            );
        }
        let mut b = Bench { m, now, offers: Vec::new() };
        b.drain();
        b
    }

    fn drain(&mut self) {
        while let Some(a) = self.m.poll_action() {
            if let Action::ToFramework { conn, event: SchedulerEvent::Offers(offers) } = a {
                self.offers.extend(offers.into_iter().map(|o| (conn, o.id)));
            }
        }
    }

    /// One allocation cycle, a simulated second after the previous one: all its slices.
    fn cycle(&mut self) {
        self.now += Duration::from_secs(1);
        self.m.handle_timeout(self.now);
        while self.m.allocation_in_progress() {
            self.m.handle_timeout(self.now);
        }
    }

    /// Every outstanding offer is declined (one call per offer).
    fn decline_all(&mut self, refuse_seconds: f64) {
        for (conn, id) in std::mem::take(&mut self.offers) {
            let call = SchedulerCall::Decline { offer_ids: vec![id], refuse_seconds: Some(refuse_seconds) };
            self.m.handle(self.now, Event::Framework { conn, principal: "fw".into(), call });
        }
    }
}

fn full_cycle(c: &mut Criterion, agents: usize, frameworks: usize, slice: usize) {
    let mut b = Bench::new(agents, frameworks, slice);
    let name = if slice == usize::MAX { "cycle_unsliced" } else { "cycle" };
    c.bench_function(&format!("{name}/{agents}x{frameworks}"), |bencher| {
        bencher.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                b.decline_all(0.0);
                b.drain();
                let t = Instant::now();
                b.cycle();
                total += t.elapsed();
                b.drain();
                assert_eq!(b.offers.len(), agents, "every agent is offered");
            }
            total
        })
    });
}

fn decline_heavy(c: &mut Criterion, agents: usize, frameworks: usize) {
    let mut b = Bench::new(agents, frameworks, DEFAULT_ALLOCATION_SLICE);
    // Reach the steady state: every agent carries the filters of its last holders.
    for _ in 0..10 {
        b.cycle();
        b.drain();
        b.decline_all(5.0);
    }
    c.bench_function(&format!("decline_heavy/{agents}x{frameworks}"), |bencher| {
        bencher.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                b.drain();
                let t = Instant::now();
                b.decline_all(5.0);
                b.cycle();
                total += t.elapsed();
                b.drain();
            }
            total
        })
    });
}

fn benches(c: &mut Criterion) {
    full_cycle(c, 10_000, 1_000, DEFAULT_ALLOCATION_SLICE);
    full_cycle(c, 50_000, 200, DEFAULT_ALLOCATION_SLICE);
    full_cycle(c, 50_000, 200, usize::MAX);
    decline_heavy(c, 10_000, 1_000);
}

criterion_group! {
    name = allocation;
    config = Criterion::default().sample_size(10);
    targets = benches
}
criterion_main!(allocation);
