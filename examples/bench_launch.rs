//! Launch latency and throughput of native `true` tasks and no-op Wasm tasks through a real
//! cluster (QUIC + mTLS on loopback, one master, one agent, all in this process), beside a
//! baseline of spawning the same program directly in the same run.
//!
//! ```text
//! cargo build --release   # the agent starts target/release/agora as its Wasm executor
//! cargo run --release --example bench_launch -- [--latency-tasks 300] [--throughput-tasks 1000]
//!     [--isolation auto|none] [--kind native|wasm|both|compute] [--compute-runs 7]
//! ```
//! `--kind compute` measures Wasm compute speed instead of launches: a loop-heavy kernel
//! (`count(400M)`, an i64 add and compare per iteration) and a call-heavy one (naive recursive
//! `fib(32)`), each run as a task one at a time at `--cpus` 1 and 2 (RUNNING → FINISHED: the
//! executor reports RUNNING just before `_start`), beside a bare wasmtime embedding with fuel
//! metering on (wasmtime's default `Config` + `consume_fuel`, `_start` called synchronously) in
//! the same run: the ratio is what Agora costs a CPU-bound task.
//! `BENCH_TRACE=1` prints when each ACCEPT went out and when the 1st, 1,000th, … RUNNING and
//! FINISHED arrived; `BENCH_PAUSE_MS=N` idles N ms before the throughput phase (what a cluster
//! that was quiet for a while sees).
//! Figures go to BENCHMARKS.md by hand, with the machine.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agora_master::core::MasterConfig;
use agora_master::server::{self, ServerConfig};
use agora_sdk::proto::*;
use agora_sdk::scheduler::{run, Driver, DriverConfig, Scheduler};
use agora_sdk::tls::TlsFiles;
use agora_sdk::{Attributes, Resources};
use tokio_util::sync::CancellationToken;

// The same allocator as the `agora` binary (src/main.rs): this benchmark embeds master and agent.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// What a benchmark task runs.
#[derive(Clone)]
struct TaskShape {
    /// The Wasm module, or `true` as a native command.
    wasm: Option<ArtifactRef>,
    name: &'static str,
    /// Millicpus asked for.
    cpus: u64,
}

impl TaskShape {
    fn native() -> TaskShape {
        // Native tasks ask for 0.1 CPU: with a hard CFS quota, 0.01 CPU is 1 ms per 100 ms
        // period, less than `true` needs to exec behind the start gate (~1.3 ms), so a third
        // of such tasks would wait up to 100 ms for the next period: the quota enforced, not
        // launch cost (`cargo run --release -p agora-agent --example cgroup_phases`).
        TaskShape { wasm: None, name: "true", cpus: 100 }
    }

    fn wasm(module: ArtifactRef, name: &'static str, cpus: u64) -> TaskShape {
        TaskShape { wasm: Some(module), name, cpus }
    }
}

fn make_task(i: usize, prefix: &str, shape: &TaskShape) -> TaskInfo {
    let kind = match &shape.wasm {
        None => TaskKind::Command(CommandInfo { argv: vec!["true".into()], shell: false, env: vec![] }),
        Some(module) => TaskKind::Wasm(Box::new(WasmInfo {
            module: module.clone(),
            args: vec![shape.name.into()],
            env: vec![],
            dirs: vec![],
            fuel: None,
            timeout: None,
        })),
    };
    TaskInfo {
        task_id: TaskId(format!("{prefix}-{i}")),
        name: shape.name.into(),
        resources: Resources { cpus: shape.cpus, mem: 1 << 20, ..Default::default() },
        kind,
        kill_grace: None,
        user: None,
    }
}

/// Latency mode: one task at a time; throughput mode: everything the offers fit.
struct Bench {
    prefix: &'static str,
    shape: TaskShape,
    total: usize,
    next: usize,
    one_at_a_time: bool,
    in_flight: usize,
    held: Vec<Offer>,
    sent: HashMap<TaskId, Instant>,
    to_running: Vec<Duration>,
    /// When each task's first RUNNING arrived.
    running: HashMap<TaskId, Instant>,
    to_finished: Vec<Duration>,
    /// RUNNING → terminal update, per task: for compute kernels, their run time.
    run_times: Vec<Duration>,
    done: usize,
    /// Tasks that ended other than TASK_FINISHED (the run's figures are then void).
    failed: usize,
    started: Option<Instant>,
    elapsed: Duration,
    /// The first task runs alone and is not measured: it pays what a framework's first task
    /// pays once (its Wasm executor's start), which a long-running framework does not.
    warming: Option<TaskId>,
    /// ACCEPTs sent (how the offers came back while tasks finished).
    launches: usize,
}

impl Bench {
    /// With `BENCH_TRACE`, in bulk mode: when the `n`th `what` update arrived.
    fn trace(&self, what: &str, n: usize) {
        if std::env::var_os("BENCH_TRACE").is_some()
            && !self.one_at_a_time
            && [1, 1000, 3000, 6000].contains(&n)
        {
            let t = self.started.map(|s| s.elapsed().as_secs_f64() * 1e3).unwrap_or(-1.0);
            eprintln!("{t:8.1} ms {what} #{n}");
        }
    }

    /// Launches on held offers while the mode allows.
    fn pump(&mut self, driver: &Driver) {
        if let Some(warm) = &self.warming {
            if self.in_flight == 0 {
                let Some(offer) = self.held.pop() else { return };
                let mut t = make_task(0, self.prefix, &self.shape);
                t.task_id = warm.clone();
                self.sent.insert(t.task_id.clone(), Instant::now());
                self.in_flight = 1;
                driver.launch(vec![offer.id], vec![t]);
            }
            return;
        }
        while self.next < self.total && (!self.one_at_a_time || self.in_flight == 0) {
            let Some(offer) = self.held.pop() else { return };
            let mut left = offer.resources.clone();
            let mut batch = Vec::new();
            while self.next < self.total && (!self.one_at_a_time || batch.is_empty()) {
                let t = make_task(self.next, self.prefix, &self.shape);
                match left.checked_sub(&t.resources) {
                    Some(rest) => left = rest,
                    None => break,
                }
                self.next += 1;
                self.sent.insert(t.task_id.clone(), Instant::now());
                batch.push(t);
            }
            if batch.is_empty() {
                driver.decline(vec![offer.id], Some(0.0));
            } else {
                self.in_flight += batch.len();
                self.launches += 1;
                if std::env::var_os("BENCH_TRACE").is_some() && !self.one_at_a_time {
                    let t = self.started.map(|s| s.elapsed().as_secs_f64() * 1e3).unwrap_or(-1.0);
                    eprintln!(
                        "{t:8.1} ms launch {} (in flight {}, done {})",
                        batch.len(),
                        self.in_flight,
                        self.done
                    );
                }
                driver.launch(vec![offer.id], batch);
            }
        }
    }
}

impl Scheduler for Bench {
    async fn resource_offers(&mut self, driver: &Driver, offers: Vec<Offer>) {
        if self.warming.is_none() {
            self.started.get_or_insert_with(Instant::now);
        }
        self.held.extend(offers);
        self.pump(driver);
    }

    async fn status_update(&mut self, driver: &Driver, st: &TaskStatus) {
        let Some(sent) = self.sent.get(&st.task_id).copied() else { return };
        if self.warming.as_ref() == Some(&st.task_id) {
            if st.state.is_terminal() {
                self.sent.remove(&st.task_id);
                if st.state != TaskState::Finished {
                    eprintln!("warm-up task {} ended {}: {} {}", st.task_id, st.state, st.reason, st.message);
                    self.failed += 1;
                }
                self.warming = None;
                self.in_flight = 0;
                self.started = Some(Instant::now());
                self.pump(driver);
            }
            return;
        }
        match st.state {
            // Updates are delivered at least once: count a task's first RUNNING only.
            TaskState::Running if !self.running.contains_key(&st.task_id) => {
                self.running.insert(st.task_id.clone(), Instant::now());
                self.to_running.push(sent.elapsed());
                self.trace("RUNNING", self.to_running.len());
            }
            s if s.is_terminal() => {
                // Duplicates of a terminal update find no entry any more.
                self.sent.remove(&st.task_id);
                self.to_finished.push(sent.elapsed());
                if let Some(r) = self.running.get(&st.task_id) {
                    self.run_times.push(r.elapsed());
                }
                self.trace("FINISHED", self.to_finished.len());
                self.in_flight -= 1;
                self.done += 1;
                self.pump(driver);
                if s != TaskState::Finished {
                    if self.failed == 0 {
                        eprintln!("task {} ended {s}: {} {}", st.task_id, st.reason, st.message);
                    }
                    self.failed += 1;
                }
                if self.done == self.total {
                    self.elapsed = self.started.map(|s| s.elapsed()).unwrap_or_default();
                    driver.acknowledge(st);
                    driver.stop(true);
                }
            }
            _ => {}
        }
    }
}

/// Busy and total jiffies of the whole machine (`/proc/stat`), to tell a CPU-bound phase from
/// one that waits.
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn report(name: &str, b: &mut Bench, cpu: Option<((u64, u64), (u64, u64))>) {
    b.to_running.sort();
    b.to_finished.sort();
    let busy = cpu.map_or(String::new(), |((b0, t0), (b1, t1))| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        format!(
            " | machine CPU busy {:.0} % of {cores} cores | {} launches",
            100.0 * (b1 - b0) as f64 / (t1 - t0).max(1) as f64,
            b.launches
        )
    });
    if b.to_running.len() != b.total || b.failed > 0 {
        println!(
            "{name}: INVALID RUN: {} of {} tasks reported TASK_RUNNING, {} did not finish",
            b.to_running.len(),
            b.total,
            b.failed
        );
    }
    println!(
        "{name:<28} n={:<5} accept→RUNNING p50 {} p99 {} | accept→FINISHED p50 {} p99 {} | {:.0} tasks/s{busy}",
        b.total,
        ms(pct(&b.to_running, 0.5)),
        ms(pct(&b.to_running, 0.99)),
        ms(pct(&b.to_finished, 0.5)),
        ms(pct(&b.to_finished, 0.99)),
        b.total as f64 / b.elapsed.as_secs_f64().max(1e-9)
    );
}

fn bench(prefix: &'static str, total: usize, one_at_a_time: bool, shape: TaskShape) -> Bench {
    Bench {
        prefix,
        shape,
        total,
        next: 0,
        one_at_a_time,
        in_flight: 0,
        held: Vec::new(),
        sent: HashMap::new(),
        to_running: Vec::new(),
        running: Default::default(),
        to_finished: Vec::new(),
        run_times: Vec::new(),
        done: 0,
        failed: 0,
        started: None,
        elapsed: Duration::ZERO,
        warming: Some(TaskId(format!("{prefix}-warm"))),
        launches: 0,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut lat_n, mut thr_n) = (300usize, 1000usize);
    let mut isolation = agora_agent::cgroups::IsolationMode::Auto;
    let (mut native, mut wasm, mut compute) = (true, true, false);
    let mut compute_runs = 7usize;
    let usage = "usage: bench_launch [--latency-tasks N] [--throughput-tasks N] [--isolation auto|none] \
                 [--kind native|wasm|both|compute] [--compute-runs N]";
    while let Some(a) = args.next() {
        let v = args.next();
        match (a.as_str(), v.as_deref()) {
            ("--latency-tasks", Some(v)) => lat_n = v.parse()?,
            ("--throughput-tasks", Some(v)) => thr_n = v.parse()?,
            ("--isolation", Some("none")) => isolation = agora_agent::cgroups::IsolationMode::None,
            ("--isolation", Some("auto")) => isolation = agora_agent::cgroups::IsolationMode::Auto,
            ("--kind", Some("native")) => (native, wasm, compute) = (true, false, false),
            ("--kind", Some("wasm")) => (native, wasm, compute) = (false, true, false),
            ("--kind", Some("both")) => (native, wasm, compute) = (true, true, false),
            ("--kind", Some("compute")) => (native, wasm, compute) = (false, false, true),
            ("--compute-runs", Some(v)) if v.parse::<usize>().is_ok_and(|n| n > 0) => {
                compute_runs = v.parse()?
            }
            _ => anyhow::bail!("{usage}"),
        }
    }

    // Baseline: spawn and reap `true` directly (std uses posix_spawn).
    let base_n = if compute { 0 } else { thr_n.min(2000) };
    let mut base = Vec::with_capacity(base_n);
    let t0 = Instant::now();
    for _ in 0..base_n {
        let s = Instant::now();
        std::process::Command::new("true").status()?;
        base.push(s.elapsed());
    }
    let base_total = t0.elapsed();
    base.sort();
    if !compute {
        println!(
            "{:<28} n={:<5} spawn+wait p50 {} p99 {} | {:.0} spawns/s (sequential)",
            "baseline posix_spawn(true)",
            base_n,
            ms(pct(&base, 0.5)),
            ms(pct(&base, 0.99)),
            base_n as f64 / base_total.as_secs_f64()
        );
    }

    let dir = tempfile::tempdir()?;
    let tls = dir.path().join("tls");
    agora_sdk::tls::init(&tls, "bench", false)?;
    let shutdown = CancellationToken::new();
    let master = server::spawn(
        ServerConfig {
            listen: ([127, 0, 0, 1], 0).into(),
            tls: TlsFiles::in_dir(&tls, "master"),
            core: MasterConfig { allocation_batch: Duration::from_micros(200), ..MasterConfig::default() },
            allocator: "drf".into(),
            work_dir: dir.path().join("master"),
            max_artifact_size: agora_master::artifacts::DEFAULT_MAX_ARTIFACT_SIZE,
            eviction: agora_master::artifacts::EvictionConfig::default(),
            limits: Default::default(),
        },
        shutdown.clone(),
    )?;
    let agent = agora_agent::AgentConfig {
        master: master.addr.to_string(),
        tls: TlsFiles::in_dir(&tls, "agent"),
        work_dir: dir.path().join("agent"),
        resources: Some(Resources::parse("cpus:64;mem:64GiB")?),
        attributes: Attributes::default(),
        hostname: "bench-agent".into(),
        kill_grace: Duration::from_secs(1),
        kill_tasks_on_shutdown: true,
        isolation: agora_agent::cgroups::IsolationConfig {
            mode: isolation,
            ..agora_agent::cgroups::IsolationConfig::default()
        },
        executors: agora_agent::executors::ExecutorsConfig {
            executor_program: Some(agora_binary()?),
            ..Default::default()
        },
        task_user: agora_agent::user::DEFAULT_TASK_USER.into(),
        recovery: agora_agent::RecoveryConfig::default(),
        gc: agora_agent::gc::GcConfig::default(),
        disk: agora_agent::disk::DiskConfig::default(),
    };
    let token = shutdown.clone();
    let agent_task = tokio::spawn(agora_agent::run(agent, token));
    while master.agents().await.is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let fw = TlsFiles::in_dir(&tls, "framework");
    let addr = master.addr.to_string();
    let mut kinds: Vec<(&str, TaskShape)> = Vec::new();
    if native {
        kinds.push(("native true", TaskShape::native()));
    }
    if wasm {
        let noop = wat::parse_str(include_str!("wasm/noop.wat"))?;
        let module = upload(&addr, &fw, "noop.wasm", &noop).await?;
        kinds.push(("wasm noop", TaskShape::wasm(module, "noop.wasm", 10)));
    }
    let mut invalid = 0;
    for (label, shape) in kinds {
        let wasm = shape.wasm.is_some();
        let mut lat = bench(if wasm { "lat-wasm" } else { "lat" }, lat_n, true, shape.clone());
        run(DriverConfig::new(addr.clone(), fw.clone(), "bench-latency"), &mut lat).await?;
        report(&format!("{label}, one at a time"), &mut lat, None);
        invalid += lat.failed;

        if let Some(ms) = std::env::var("BENCH_PAUSE_MS").ok().and_then(|v| v.parse().ok()) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let mut thr = bench(if wasm { "thr-wasm" } else { "thr" }, thr_n, false, shape);
        let before = cpu_jiffies();
        run(DriverConfig::new(addr.clone(), fw.clone(), "bench-throughput"), &mut thr).await?;
        let after = cpu_jiffies();
        report(&format!("{label}, all at once"), &mut thr, Some((before, after)));
        invalid += thr.failed;
    }
    if compute {
        invalid += compute_speed(&addr, &fw, compute_runs).await?;
    }

    shutdown.cancel();
    let _ = agent_task.await;
    if invalid > 0 {
        anyhow::bail!("{invalid} tasks did not finish: these figures are void");
    }
    Ok(())
}

/// Uploads a Wasm module to the master's artifact store.
async fn upload(addr: &str, fw: &TlsFiles, name: &str, bytes: &[u8]) -> anyhow::Result<ArtifactRef> {
    let session = agora_sdk::client::Session::connect(addr, fw, Role::Framework).await?;
    let module =
        agora_sdk::artifacts::upload_bytes(&session.conn, ArtifactKind::WasmModule, name, bytes).await?;
    session.conn.close(0u32.into(), b"uploaded");
    Ok(module)
}

/// The compute kernels: (label, module bytes).
fn kernels() -> anyhow::Result<Vec<(&'static str, Vec<u8>)>> {
    let fib = include_str!("../executor-wasm/tests/fixtures/fib.wat");
    let fib32 = fib.replace("(call $fib (i32.const 25))", "(call $fib (i32.const 32))");
    anyhow::ensure!(fib32 != fib, "fib.wat no longer computes fib(25) in _start");
    Ok(vec![
        ("count(400M)", wat::parse_str(include_str!("../executor-wasm/tests/fixtures/tight.wat"))?),
        ("fib(32)", wat::parse_str(&fib32)?),
    ])
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// `_start` of `bytes` on a bare wasmtime engine with fuel metering: median of `runs` calls, each
/// in a new store (instantiation not timed).
fn bare_with_fuel(bytes: &[u8], runs: usize) -> anyhow::Result<Duration> {
    let mut config = wasmtime::Config::new();
    config.consume_fuel(true);
    let engine = wasmtime::Engine::new(&config)?;
    let module = wasmtime::Module::new(&engine, bytes)?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let mut store = wasmtime::Store::new(&engine, ());
        store.set_fuel(u64::MAX)?;
        let instance = wasmtime::Instance::new(&mut store, &module, &[])?;
        let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
        let t = Instant::now();
        start.call(&mut store, ())?;
        times.push(t.elapsed());
    }
    Ok(median(&mut times))
}

/// Each kernel through the cluster at 1 and 2 CPUs against the bare embedding, one task at a
/// time; returns how many tasks failed.
async fn compute_speed(addr: &str, fw: &TlsFiles, runs: usize) -> anyhow::Result<usize> {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut failed = 0;
    for (label, bytes) in kernels()? {
        let module =
            upload(addr, fw, &format!("{}.wasm", label.split('(').next().unwrap_or(label)), &bytes).await?;
        let bare = bare_with_fuel(&bytes, runs)?;
        for cpus in [1000, 2000] {
            let mut b = bench("compute", runs, true, TaskShape::wasm(module.clone(), label, cpus));
            run(DriverConfig::new(addr.to_string(), fw.clone(), "bench-compute"), &mut b).await?;
            failed += b.failed;
            let through = median(&mut b.run_times);
            println!(
                "{label:<12} --cpus {}: through Agora (RUNNING→FINISHED) p50 {:.1} ms | bare wasmtime with fuel \
                 p50 {:.1} ms | ratio {:.2} (n={runs})",
                cpus / 1000,
                ms(through),
                ms(bare),
                through.as_secs_f64() / bare.as_secs_f64().max(1e-9)
            );
        }
    }
    Ok(failed)
}

/// The `agora` binary beside this example (`target/<profile>/agora`): the agent starts it as
/// `agora executor-wasm`.
fn agora_binary() -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(|d| d.parent()).ok_or_else(|| anyhow::anyhow!("no target dir"))?;
    let bin = dir.join("agora");
    if !bin.exists() {
        anyhow::bail!("{} is missing: run `cargo build --release` first", bin.display());
    }
    Ok(bin)
}
