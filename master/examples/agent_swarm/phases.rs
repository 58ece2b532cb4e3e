//! The run: a master, `N` emulated agents, then the phases whose figures it prints — idle
//! (heartbeats only), launch overhead, master restart — and a [`Report`] of the counts the
//! smoke test checks.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_sdk::proto::Role;
use agora_sdk::scheduler::{run as run_driver, DriverConfig};
use agora_sdk::tls::TlsFiles;
use agora_sdk::Resources;
use tokio_util::sync::CancellationToken;

use crate::launch::{pct, Idle, Launcher};
use crate::master::{cpu_time, prepare, rss, MasterProc};
use crate::swarm::{self, Stats, SwarmConfig};

/// The run's settings (the example's flags).
#[derive(Clone, Debug)]
pub struct Options {
    pub agents: usize,
    pub frameworks: usize,
    pub launches: usize,
    /// Tasks launched and not yet finished, at most.
    pub in_flight: usize,
    pub restart: bool,
    pub heartbeat: Duration,
    pub idle: Duration,
    /// The generator's handshakes at once.
    pub connecting: usize,
    /// The master in this process (smoke test) rather than a child.
    pub in_process: bool,
    /// Longest wait for a phase to complete (agents registered, tasks finished).
    pub timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            agents: 5_000,
            frameworks: 10,
            launches: 2_000,
            in_flight: 32,
            restart: false,
            heartbeat: Duration::from_secs(1),
            idle: Duration::from_secs(10),
            connecting: 256,
            in_process: false,
            timeout: Duration::from_secs(300),
        }
    }
}

/// What happened, for the smoke test.
#[derive(Debug, Default)]
pub struct Report {
    /// Agents registered after the start.
    pub registered: u64,
    /// Tasks that reported RUNNING and ended FINISHED.
    pub running: usize,
    pub finished: usize,
    pub failed: usize,
    /// Agents registered again after the restart (`None` without one).
    pub reregistered: Option<u64>,
    /// Registered connections lost other than by the master's restart.
    pub dropped: u64,
    /// `Error` messages agents got.
    pub errors: u64,
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Waits until `done` or `timeout`; whether it was done.
async fn wait(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while !done() {
        if Instant::now() > end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// CPU share of one core a process used over a window.
struct CpuWindow {
    pid: u32,
    cpu: Duration,
    at: Instant,
}

impl CpuWindow {
    fn start(pid: u32) -> Self {
        CpuWindow { pid, cpu: cpu_time(pid), at: Instant::now() }
    }

    fn percent(&self) -> f64 {
        100.0 * (cpu_time(self.pid) - self.cpu).as_secs_f64() / self.at.elapsed().as_secs_f64().max(1e-9)
    }
}

/// Runs every phase and prints its figures.
pub async fn run(opts: &Options) -> anyhow::Result<Report> {
    let dir = tempfile::tempdir()?;
    let mut spec = prepare(dir.path())?;
    spec.heartbeat = opts.heartbeat;
    let mut master = MasterProc::start(&spec, ([127, 0, 0, 1], 0).into(), !opts.in_process).await?;
    let addr = master.addr();
    let base_rss = rss(master.pid());
    println!(
        "master: pid {} on {addr}, {} | RSS with no agent {:.1} MiB",
        master.pid(),
        if opts.in_process { "in this process" } else { "child process" },
        mib(base_rss)
    );

    let stats = Arc::new(Stats::default());
    let stop = CancellationToken::new();
    let cfg = SwarmConfig {
        agents: opts.agents,
        master: addr,
        tls: TlsFiles::in_dir(&spec.tls, "agent"),
        resources: Resources::parse("cpus:8;mem:32GiB;disk:100GiB")?,
        connecting: opts.connecting,
    };
    let n = opts.agents as u64;
    let t = Instant::now();
    let cpu = CpuWindow::start(master.pid());
    swarm::start(&cfg, stats.clone(), stop.clone())?;
    let own = CpuWindow::start(std::process::id());
    let mut next_note = Instant::now() + Duration::from_secs(10);
    let all = wait(opts.timeout, || {
        if Instant::now() > next_note {
            next_note += Duration::from_secs(10);
            eprintln!(
                "  {:.0} s: {} registered, {} handshakes failed, {} connections lost ({} to silence), generator CPU {:.0} %",
                t.elapsed().as_secs_f64(),
                stats.registered.load(Relaxed),
                stats.connect_failures.load(Relaxed),
                stats.lost.load(Relaxed),
                stats.silences.load(Relaxed),
                own.percent()
            );
        }
        stats.registered.load(Relaxed) >= n
    })
    .await;
    let mut report = Report { registered: stats.registered.load(Relaxed), ..Report::default() };
    println!(
        "registration: {} of {n} agents in {:.2} s ({} handshakes at once at most) | master CPU {:.0} % of a core",
        report.registered,
        t.elapsed().as_secs_f64(),
        opts.connecting,
        cpu.percent()
    );
    if !all {
        stop.cancel();
        master.kill();
        anyhow::bail!("not every agent registered within {:?}", opts.timeout);
    }

    // (a) Idle: heartbeats only.
    let heartbeats = stats.heartbeats.load(Relaxed);
    let cpu = CpuWindow::start(master.pid());
    let own = CpuWindow::start(std::process::id());
    let mut peak = 0;
    let end = Instant::now() + opts.idle;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(250)).await;
        peak = peak.max(rss(master.pid()));
    }
    let idle_rss = rss(master.pid());
    println!(
        "idle ({:.0} s, heartbeat {:?}): master RSS {:.1} MiB (peak {:.1}, {:.1} KiB per agent over the empty master) | master CPU {:.1} % of a core | {:.0} heartbeats/s | generator RSS {:.1} MiB, CPU {:.1} % of a core",
        opts.idle.as_secs_f64(),
        opts.heartbeat,
        mib(idle_rss),
        mib(peak),
        (idle_rss.saturating_sub(base_rss)) as f64 / 1024.0 / n.max(1) as f64,
        cpu.percent(),
        (stats.heartbeats.load(Relaxed) - heartbeats) as f64 / opts.idle.as_secs_f64(),
        mib(rss(std::process::id())),
        own.percent()
    );

    // (b) Launch overhead under that load, with the other frameworks declining.
    let mut idle_frameworks = Vec::new();
    for i in 1..opts.frameworks {
        let name = format!("fw{i}");
        agora_sdk::tls::issue(&spec.tls, Role::Framework, &name, &name)?;
        let files = TlsFiles::in_dir(&spec.tls, &name);
        let config = DriverConfig::new(addr.to_string(), files, format!("swarm-idle-{i}"));
        idle_frameworks.push(tokio::spawn(async move {
            let _ = run_driver(config, &mut Idle).await;
        }));
    }
    let cpu = CpuWindow::start(master.pid());
    let mut launcher = Launcher::new(opts.launches, opts.in_flight);
    let config =
        DriverConfig::new(addr.to_string(), TlsFiles::in_dir(&spec.tls, "framework"), "swarm-launcher");
    let ran = tokio::time::timeout(opts.timeout, run_driver(config, &mut launcher)).await;
    let launch_cpu = cpu.percent();
    let mut out = launcher.out;
    out.to_running.sort();
    out.to_finished.sort();
    (report.running, report.finished, report.failed) =
        (out.to_running.len(), out.to_finished.len() - out.failed, out.failed);
    if !matches!(ran, Ok(Ok(()))) || report.running != opts.launches || report.failed > 0 {
        println!(
            "launch: INVALID RUN ({ran:?}): {} of {} RUNNING, {} ended, {} not FINISHED | launcher got {} offers, subscribed {} times, {} errors",
            report.running,
            opts.launches,
            out.to_finished.len(),
            report.failed,
            out.offers,
            out.subscriptions,
            out.errors
        );
    }
    println!(
        "launch ({} frameworks, {} in flight): n={} accept→RUNNING p50 {} p99 {} | accept→FINISHED p50 {} p99 {} | {:.0} tasks/s | master CPU {:.0} % of a core, RSS {:.1} MiB",
        opts.frameworks,
        opts.in_flight,
        opts.launches,
        ms(pct(&out.to_running, 0.5)),
        ms(pct(&out.to_running, 0.99)),
        ms(pct(&out.to_finished, 0.5)),
        ms(pct(&out.to_finished, 0.99)),
        opts.launches as f64 / out.elapsed.as_secs_f64().max(1e-9),
        launch_cpu,
        mib(rss(master.pid()))
    );
    for f in idle_frameworks {
        f.abort();
    }

    // (c) Master restart: every agent re-registers with the new master.
    let lost_before = stats.lost.load(Relaxed);
    if opts.restart {
        let registrations = stats.registrations.load(Relaxed);
        let failures = stats.connect_failures.load(Relaxed);
        let killed = Instant::now();
        master.kill();
        master = MasterProc::start(&spec, addr, !opts.in_process).await?;
        let up = Instant::now();
        let cpu = CpuWindow::start(master.pid());
        let all = wait(opts.timeout, || {
            stats.registrations.load(Relaxed) >= registrations + n && stats.registered.load(Relaxed) >= n
        })
        .await;
        let storm = up.elapsed();
        let again = stats.registrations.load(Relaxed) - registrations;
        report.reregistered = Some(again);
        println!(
            "restart: {again} of {n} agents re-registered {:.2} s after the new master listened ({:.2} s after the kill{}) | {} handshakes failed meanwhile | master CPU {:.0} % of a core, RSS {:.1} MiB",
            storm.as_secs_f64(),
            killed.elapsed().as_secs_f64(),
            if all { "" } else { ": INCOMPLETE" },
            stats.connect_failures.load(Relaxed) - failures,
            cpu.percent(),
            mib(rss(master.pid()))
        );
        // Connections of the old master still being noticed as lost count as expected.
        tokio::time::sleep(opts.heartbeat * 4).await;
    }
    let expected = if opts.restart { n } else { 0 };
    report.dropped = (stats.lost.load(Relaxed) - lost_before).saturating_sub(expected);
    report.errors = stats.errors.load(Relaxed);
    println!(
        "connections: {} registered now, {} dropped other than by the restart ({} connections given up for the master's silence in all), {} master errors, {} update retries",
        stats.registered.load(Relaxed),
        report.dropped,
        stats.silences.load(Relaxed),
        report.errors,
        stats.retries.load(Relaxed)
    );
    println!("allocation cycle: the server exports no cycle time; see `--example scale_sim` at this size");
    stop.cancel();
    master.kill();
    Ok(report)
}
