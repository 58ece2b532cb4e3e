//! Where a native task's time goes with cgroup isolation: each phase of the agent's per-task
//! cgroup work, timed on the real kernel, beside spawning the same program without a group.
//!
//! ```text
//! sudo cargo run --release -p agora-agent --example cgroup_phases -- [N]
//! ```
//! Needs root and a usable cgroup hierarchy (it says so and exits otherwise).

use std::process::Stdio;
use std::time::{Duration, Instant};

use agora_agent::cgroups::{self, IsolationConfig, IsolationMode, Isolator};
use agora_sdk::Resources;

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(300);
    let dir = tempfile::tempdir()?;
    let config = IsolationConfig { mode: IsolationMode::Cgroups, ..IsolationConfig::default() };
    let iso = match Isolator::setup(&config, dir.path()) {
        Ok(i) => i,
        Err(e) => {
            println!("skipped: {e}");
            return Ok(());
        }
    };
    let mem_mib: u64 = std::env::args().nth(2).map(|s| s.parse()).transpose()?.unwrap_or(64);
    let cpus: u64 = std::env::args().nth(3).map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let limits = iso.limits_for(&Resources { cpus, mem: mem_mib << 20, ..Resources::default() });
    let names = ["create", "spawn gated", "admit", "wait", "stats", "destroy", "total", "plain spawn+wait"];
    let mut t: Vec<Vec<Duration>> = vec![Vec::with_capacity(n); names.len()];
    for i in 0..n {
        let start = Instant::now();
        let mut lap = start;
        let mut mark = |k: usize, t: &mut Vec<Vec<Duration>>| {
            let now = Instant::now();
            t[k].push(now - lap);
            lap = now;
        };
        let cg = iso.create(&format!("task-phase-{i}"), limits)?.expect("active");
        mark(0, &mut t);
        let mut child = cgroups::gated_command("/bin/true").stdin(Stdio::piped()).spawn()?;
        mark(1, &mut t);
        cgroups::admit(&mut child, &cg)?;
        mark(2, &mut t);
        child.wait()?;
        mark(3, &mut t);
        let _ = cg.stats()?;
        mark(4, &mut t);
        cg.destroy()?;
        mark(5, &mut t);
        t[6].push(start.elapsed());
        let s = Instant::now();
        std::process::Command::new("/bin/true").status()?;
        t[7].push(s.elapsed());
    }
    iso.shutdown();
    println!("{n} tasks, µs per phase (p50 / p90 / p99):");
    for (name, v) in names.iter().zip(t.iter_mut()) {
        println!("  {name:<18} {:>8.0} {:>8.0} {:>8.0}", pct(v, 0.5), pct(v, 0.9), pct(v, 0.99));
    }
    Ok(())
}
