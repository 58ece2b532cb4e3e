//! 50,000 agents on one master, the load generator (issue 15 item 4): the master runs as a
//! child process (this example re-executed in its hidden `--serve-master` mode, so that its
//! RSS and CPU are its own), and this process opens one real QUIC connection per emulated
//! agent (mutual TLS, one client endpoint), then prints the figures of each phase: idle
//! master (heartbeats only), launch overhead through a real scheduler driver while other
//! frameworks decline, and with `--restart` the re-registration storm after the master is
//! killed and started again from its registry.
//!
//! ```text
//! cargo run --release -p agora-master --example agent_swarm -- [--agents 5000] [--frameworks 10]
//!     [--launches 2000] [--in-flight 32] [--restart] [--heartbeat-ms 1000] [--idle-secs 10]
//!     [--connecting 256] [--timeout-secs 300] [--in-process]
//! ```
//! Figures go to BENCHMARKS.md by hand, with the machine.

mod launch;
mod master;
mod phases;
mod swarm;

use std::time::Duration;

// The same allocator as the `agora` binary, so that the master's RSS is what it would be.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--serve-master") {
        return master::serve(&args[1..]);
    }
    let mut opts = phases::Options::default();
    let usage =
        "usage: agent_swarm [--agents N] [--frameworks F] [--launches L] [--in-flight K] [--restart] \
                 [--heartbeat-ms MS] [--idle-secs S] [--connecting C] [--timeout-secs S] [--in-process]";
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--restart" => opts.restart = true,
            "--in-process" => opts.in_process = true,
            _ => {
                let v: u64 =
                    it.next().and_then(|v| v.parse().ok()).ok_or_else(|| anyhow::anyhow!("{usage}"))?;
                match a.as_str() {
                    "--agents" => opts.agents = v as usize,
                    "--frameworks" => opts.frameworks = (v as usize).max(1),
                    "--launches" => opts.launches = v as usize,
                    "--in-flight" => opts.in_flight = v as usize,
                    "--heartbeat-ms" => opts.heartbeat = Duration::from_millis(v.max(100)),
                    "--idle-secs" => opts.idle = Duration::from_secs(v),
                    "--connecting" => opts.connecting = v as usize,
                    "--timeout-secs" => opts.timeout = Duration::from_secs(v),
                    _ => anyhow::bail!("{usage}"),
                }
            }
        }
    }
    let runtime = tokio::runtime::Runtime::new()?;
    let report = runtime.block_on(phases::run(&opts))?;
    if report.failed > 0 || report.running != opts.launches {
        anyhow::bail!("not every task ran and finished: these figures are void");
    }
    Ok(())
}
