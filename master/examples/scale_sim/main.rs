//! 50,000 agents × 200 frameworks through the sans-IO master core (issue 15 item 4, the
//! simulation beside `agent_swarm`'s real connections): memory of the core, time for every
//! agent to register and to re-register after a new master recovers from the registry, the
//! allocation cycle, and the handling of one-task ACCEPTs in that state.
//!
//! ```text
//! cargo run --release -p agora-master --example scale_sim -- [--agents 50000] [--frameworks 200]
//!     [--cycles 5] [--launches 2000]
//! ```

mod sim;

use std::time::Duration;

// The allocator of the `agora` binary, so that the RSS figures are the master's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

fn main() -> anyhow::Result<()> {
    let (mut agents, mut frameworks, mut cycles, mut launches) = (50_000usize, 200usize, 5usize, 2_000usize);
    let usage = "usage: scale_sim [--agents N] [--frameworks F] [--cycles C] [--launches L]";
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v: usize = args.next().and_then(|v| v.parse().ok()).ok_or_else(|| anyhow::anyhow!("{usage}"))?;
        match a.as_str() {
            "--agents" => agents = v,
            "--frameworks" => frameworks = v,
            "--cycles" => cycles = v,
            "--launches" => launches = v,
            _ => anyhow::bail!("{usage}"),
        }
    }
    let f = sim::run(agents, frameworks, cycles, launches);
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    println!(
        "core with {agents} agents × {frameworks} frameworks: process RSS {:.1} MiB → {:.1} MiB (+{:.1} MiB, {:.2} KiB per agent; includes the in-memory registry copy)",
        mib(f.rss_before),
        mib(f.rss_after),
        mib(f.rss_after.saturating_sub(f.rss_before)),
        f.rss_after.saturating_sub(f.rss_before) as f64 / 1024.0 / agents.max(1) as f64
    );
    println!(
        "registration: {agents} agents in {} ({:.1} µs each)",
        ms(f.register),
        f.register.as_secs_f64() * 1e6 / agents.max(1) as f64
    );
    println!(
        "allocation cycle, every agent free: min {} median {} max {} over {} cycles ({} offers)",
        ms(f.cycles[0]),
        ms(pct(&f.cycles, 0.5)),
        ms(f.cycles[f.cycles.len() - 1]),
        f.cycles.len(),
        f.offers
    );
    println!(
        "restart: recovery from the registry {} | {} of {agents} agents re-registered in {} ({:.1} µs each)",
        ms(f.recover),
        f.reregistered,
        ms(f.reregister),
        f.reregister.as_secs_f64() * 1e6 / agents.max(1) as f64
    );
    println!(
        "accept → RunTask: n={} p50 {} p99 {} max {} ({} refused)",
        f.accepts.len(),
        ms(pct(&f.accepts, 0.5)),
        ms(pct(&f.accepts, 0.99)),
        ms(f.accepts.last().copied().unwrap_or_default()),
        f.refused
    );
    Ok(())
}
