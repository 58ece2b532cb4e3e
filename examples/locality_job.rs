//! A map-style job with data locality by delay scheduling: one task per block (native,
//! or a WebAssembly module with `--wasm FILE`) of a data set whose blocks live on the agents (their `blocks` set attribute), placed by the
//! SDK's `DelayScheduler`; prints where the tasks ran (node-, rack-local or neither) and the
//! job time.
//!
//! ```text
//! agora dev --agents 4 --resources 'cpus:2;mem:1GiB' \
//!   --agent-attributes 'rack:r1;blocks:{b0,b1,b2,b3,b4,b5}' \
//!   --agent-attributes 'rack:r1;blocks:{b3,b4,b5,b6,b7,b8}' \
//!   --agent-attributes 'rack:r2;blocks:{b6,b7,b8,b9,b10,b11}' \
//!   --agent-attributes 'rack:r2;blocks:{b9,b10,b11,b0,b1,b2}' &
//! cargo run --example locality_job -- --config .agora-dev/client.toml            # 1 s node delay
//! cargo run --example locality_job -- --config .agora-dev/client.toml --fifo     # first offer
//! cargo run --example locality_job -- --config .agora-dev/client.toml --wasm examples/wasm/hello.wat
//! ```
//!
//! The blocks and where they live are read from the cluster (`agora agents`): every value of an
//! agent's `blocks` attribute is a block, held by every agent that lists it. Each task is
//! `sh -c 'sleep S; echo processed bN'`, or with `--wasm FILE` the module (uploaded once to the
//! master's artifact store; `.wat` is assembled first) run with arguments `map processed bN`.
//!
//! Options: `--node-delay S` (default 1) and `--rack-delay S` (default 1) are the two waits;
//! `--fifo` puts each task in a job of its own with no delay, so the oldest task takes whatever
//! is offered first (the baseline); `--work S` is each task's sleep (default 0.5);
//! `--cpus C` each task's CPUs (default 1).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use agora_sdk::artifacts::upload_bytes;
use agora_sdk::attributes::AttrValue;
use agora_sdk::client::{OperatorClient, Session};
use agora_sdk::config::ClientConfig;
use agora_sdk::locality::{DelayConfig, DelayScheduler, Locality, PendingTask, Placement, Preference};
use agora_sdk::proto::*;
use agora_sdk::scheduler::{run, Driver, DriverConfig, Scheduler};
use agora_sdk::Resources;

/// Places the tasks with the delay scheduler; stops when every task has ended.
struct LocalityJob {
    sched: DelayScheduler<TaskInfo>,
    total: usize,
    placed: BTreeMap<TaskId, Placement>,
    ended: BTreeMap<TaskId, TaskState>,
}

impl Scheduler for LocalityJob {
    async fn resource_offers(&mut self, driver: &Driver, offers: Vec<Offer>) {
        for p in self.sched.resource_offers(driver, &offers) {
            println!(
                "{} on {} ({}, waited {:.2}s)",
                p.task_id,
                p.agent_id,
                p.locality,
                p.waited.as_secs_f64()
            );
            self.placed.insert(p.task_id.clone(), p);
        }
    }

    async fn status_update(&mut self, driver: &Driver, status: &TaskStatus) {
        if !status.state.is_terminal() {
            return;
        }
        if status.state != TaskState::Finished {
            eprintln!("{} {}: {} {}", status.task_id, status.state, status.reason, status.message);
        }
        self.ended.insert(status.task_id.clone(), status.state);
        if self.ended.len() == self.total {
            driver.acknowledge(status);
            driver.stop(true);
        }
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: locality_job [--config CLIENT_TOML] [--node-delay S] [--rack-delay S] [--fifo] [--work S] [--cpus C] \
         [--wasm FILE]"
    );
    std::process::exit(2)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut config, mut node, mut rack, mut fifo, mut work, mut cpus, mut wasm) =
        (None, 1.0, 1.0, false, 0.5, "1".to_string(), None::<PathBuf>);
    while let Some(a) = args.next() {
        let mut secs = || {
            args.next().and_then(|v| v.parse::<f64>().ok()).filter(|v| *v >= 0.0).unwrap_or_else(|| usage())
        };
        match a.as_str() {
            "--config" => config = Some(PathBuf::from(args.next().unwrap_or_else(|| usage()))),
            "--node-delay" => node = secs(),
            "--rack-delay" => rack = secs(),
            "--work" => work = secs(),
            "--cpus" => cpus = args.next().unwrap_or_else(|| usage()),
            "--fifo" => fifo = true,
            "--wasm" => wasm = Some(PathBuf::from(args.next().unwrap_or_else(|| usage()))),
            _ => usage(),
        }
    }
    let cfg = ClientConfig::resolve(config.as_deref(), None, None)?;

    // The data set: every block some agent holds, and where.
    let mut operator = OperatorClient::connect(&cfg).await?;
    let agents = operator.agents().await?;
    operator.close();
    let mut holders: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for a in &agents {
        if let Some(AttrValue::Set(blocks)) = a.attributes.get("blocks") {
            for b in blocks {
                holders.entry(b.clone()).or_default().insert(a.hostname.clone());
            }
        }
    }
    if holders.is_empty() {
        anyhow::bail!(
            "no agent has a `blocks` attribute (start agents with --attributes 'blocks:{{b1,b2}}')"
        );
    }
    // Natural order (b2 before b10).
    let mut blocks: Vec<&String> = holders.keys().collect();
    blocks.sort_by_key(|b| (b.len(), b.to_string()));
    println!("{} blocks on {} agents", blocks.len(), agents.len());

    let delays = if fifo {
        DelayConfig::greedy()
    } else {
        DelayConfig::new(Duration::from_secs_f64(node), Duration::from_secs_f64(rack))
    };
    // `--wasm`: the module goes to the master's artifact store once; tasks name it by digest.
    let module = match &wasm {
        None => None,
        Some(path) => {
            let bytes = if path.extension().is_some_and(|e| e == "wat") {
                wat::parse_file(path)?
            } else {
                std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?
            };
            let session =
                Session::connect(&cfg.master, &cfg.identity(Role::Framework)?, Role::Framework).await?;
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let module = upload_bytes(&session.conn, ArtifactKind::WasmModule, &name, &bytes).await?;
            session.conn.close(0u32.into(), b"uploaded");
            Some(module)
        }
    };
    let mut sched = DelayScheduler::new(delays);
    let resources = Resources::parse(&format!("cpus:{cpus};mem:32MiB"))?;
    let run_id = std::process::id();
    let now = Instant::now();
    for (i, b) in blocks.iter().enumerate() {
        let task = TaskInfo {
            task_id: TaskId(format!("map-{run_id}-{b}")),
            name: format!("map-{b}"),
            resources: resources.clone(),
            kind: match &module {
                None => TaskKind::Command(CommandInfo {
                    argv: vec![format!("sleep {work}; echo processed {b}")],
                    shell: true,
                    env: vec![],
                }),
                Some(module) => TaskKind::Wasm(Box::new(WasmInfo {
                    module: module.clone(),
                    args: vec!["map".into(), "processed".into(), b.to_string()],
                    env: vec![],
                    dirs: vec![],
                    fuel: None,
                    timeout: None,
                })),
            },
            kill_grace: None,
            user: None,
        };
        // The racks of the holders are learned from the offers (their `rack` attribute).
        let pending = PendingTask::from_info(task, Preference::default().attribute("blocks", b.as_str()));
        // `--fifo`: a job per task, so the oldest task takes the first offer.
        sched.add(now, if fifo { pending.in_job(i as u64) } else { pending });
    }
    let mut job = LocalityJob { total: blocks.len(), sched, placed: BTreeMap::new(), ended: BTreeMap::new() };
    let started = Instant::now();
    let driver = DriverConfig::new(cfg.master.clone(), cfg.identity(Role::Framework)?, "locality-job");
    run(driver, &mut job).await?;
    let elapsed = started.elapsed();

    let stats = job.sched.stats();
    let finished = job.ended.values().filter(|s| **s == TaskState::Finished).count();
    println!(
        "summary: {} tasks ({} finished) in {:.2}s; node-local {:.0}%, rack-local {:.0}%, other {:.0}%; mean wait {:.2}s, max wait {:.2}s",
        job.total,
        finished,
        elapsed.as_secs_f64(),
        100.0 * stats.fraction(Locality::Node),
        100.0 * stats.fraction(Locality::Rack),
        100.0 * stats.fraction(Locality::Any),
        stats.mean_wait().as_secs_f64(),
        stats.max_wait.as_secs_f64(),
    );
    Ok(())
}
