//! Data locality by delay scheduling on a real in-process cluster: agents holding
//! different blocks (`blocks` set attribute), a framework that waits for node-local offers with
//! the SDK's `DelayScheduler`, and one that takes the first offer; and `agora agents` showing the
//! attributes `agora dev --agent-attributes` gives each agent.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use agora_sdk::locality::{DelayConfig, DelayScheduler, Locality, LocalityStats, Preference};
use agora_sdk::proto::*;
use agora_sdk::scheduler::{self, Driver, Scheduler};
use common::dev::Dev;
use common::{sh_task, TestCluster};
use tokio::sync::oneshot;

const AGENTS: usize = 4;
const BLOCKS: usize = 32;

/// The agent holding block `b` (one replica), scattered so that neither queue order nor
/// finishing order lines blocks up with agents.
fn holder(b: usize) -> usize {
    (b * 7 + b / 5 + 3) % AGENTS
}

/// What a finished job reports: its locality counts and how each task ended.
type Outcome = (LocalityStats, BTreeMap<TaskId, TaskState>);

/// Runs each block's task (`sleep`, 0.2–0.5 s) through a `DelayScheduler`; reports its stats
/// when every task has ended.
struct BlockJob {
    sched: DelayScheduler<TaskInfo>,
    total: usize,
    ended: BTreeMap<TaskId, TaskState>,
    done: Option<oneshot::Sender<Outcome>>,
}

impl BlockJob {
    /// `one_job_per_task`: every task is its own job (FIFO: the oldest task takes what is
    /// offered first); otherwise the whole data set is one job.
    fn new(config: DelayConfig, one_job_per_task: bool) -> (Self, oneshot::Receiver<Outcome>) {
        let mut sched = DelayScheduler::new(config);
        let now = std::time::Instant::now();
        for b in 0..BLOCKS {
            let ms = 200 + (b * 37) % 300;
            let task = sh_task(&format!("map-b{b}"), &format!("sleep 0.{ms:03}"), "cpus:1;mem:16MiB");
            let pending = agora_sdk::locality::PendingTask::from_info(
                task,
                Preference::default().attribute("blocks", format!("b{b}")),
            );
            let job = if one_job_per_task { b as u64 } else { 0 };
            assert!(sched.add(now, pending.in_job(job)));
        }
        let (tx, rx) = oneshot::channel();
        (BlockJob { sched, total: BLOCKS, ended: BTreeMap::new(), done: Some(tx) }, rx)
    }
}

impl Scheduler for BlockJob {
    async fn resource_offers(&mut self, driver: &Driver, offers: Vec<Offer>) {
        self.sched.resource_offers(driver, &offers);
    }

    async fn status_update(&mut self, driver: &Driver, status: &TaskStatus) {
        if !status.state.is_terminal() {
            return;
        }
        self.ended.insert(status.task_id.clone(), status.state);
        if self.ended.len() == self.total {
            if let Some(tx) = self.done.take() {
                let _ = tx.send((self.sched.stats().clone(), self.ended.clone()));
            }
            driver.acknowledge(status);
            driver.stop(true);
        }
    }
}

async fn cluster() -> TestCluster {
    let mut c = TestCluster::start(0, "cpus:1").await;
    for i in 0..AGENTS {
        let blocks: Vec<String> = (0..BLOCKS).filter(|b| holder(*b) == i).map(|b| format!("b{b}")).collect();
        let attrs = format!("rack:r{};blocks:{{{}}}", i / 2, blocks.join(","));
        c.add_agent_attributed(i, "cpus:2;mem:1GiB", &attrs);
    }
    c.wait_agents(AGENTS).await;
    c
}

/// Runs a framework to the end (generous limit: the machine may be loaded).
async fn run(c: &TestCluster, name: &str, config: DelayConfig, one_job_per_task: bool) -> LocalityStats {
    let (mut job, done) = BlockJob::new(config, one_job_per_task);
    let cfg = c.framework(name);
    let run = tokio::spawn(async move { scheduler::run(cfg, &mut job).await });
    let (stats, ended) = tokio::time::timeout(Duration::from_secs(180), done)
        .await
        .expect("the job finished in time")
        .expect("done");
    let failed: Vec<_> = ended.iter().filter(|(_, s)| **s != TaskState::Finished).collect();
    assert!(failed.is_empty(), "tasks that did not finish: {failed:?}");
    let _ = tokio::time::timeout(Duration::from_secs(20), run).await;
    assert_eq!(stats.launched(), BLOCKS as u64);
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_scheduling_reaches_node_locality_that_taking_the_first_offer_does_not() {
    let c = cluster().await;
    // Waits up to 5 s for a node-local offer (long, so a loaded machine cannot push it into
    // rack-local launches).
    let delayed =
        run(&c, "delay", DelayConfig::new(Duration::from_secs(5), Duration::from_secs(5)), false).await;
    println!("delay scheduling: {delayed}");
    // No delay, each task its own job: the oldest task takes whatever is offered first.
    let greedy = run(&c, "greedy", DelayConfig::greedy(), true).await;
    println!("first offer:      {greedy}");
    assert!(delayed.fraction(Locality::Node) >= 0.9, "delay scheduling: {delayed}");
    assert!(greedy.fraction(Locality::Node) < 0.9, "greedy: {greedy}");
    assert!(greedy.fraction(Locality::Node) < delayed.fraction(Locality::Node));
    c.stop().await;
}

#[test]
fn agora_agents_shows_the_attributes_agora_dev_gives_each_agent() {
    let dev = Dev::start_with(&[
        "--agents",
        "2",
        "--resources",
        "cpus:1;mem:256MiB",
        "--agent-attributes",
        "rack:r1;blocks:{b17,b42}",
        "--agent-attributes",
        "rack:r2;zone:a;cores:8",
    ]);
    let out = dev.agora(&["agents", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let agents: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json");
    let mut attrs: Vec<String> =
        agents.iter().map(|a| a["attributes"].as_str().expect("attributes text").to_string()).collect();
    attrs.sort();
    assert_eq!(attrs, ["blocks:{b17,b42};rack:r1", "cores:8;rack:r2;zone:a"]);
    let table = dev.agora(&["agents"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.lines().next().is_some_and(|h| h.contains("ATTRIBUTES")), "{table}");
    assert!(table.contains("blocks:{b17,b42};rack:r1"), "{table}");
    dev.stop();

    // More attribute sets than agents is refused.
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(common::dev::AGORA)
        .args(["dev", "--listen", "127.0.0.1:0", "--agents", "1", "--agent-attributes", "rack:r1"])
        .args(["--agent-attributes", "rack:r2", "--dir"])
        .arg(dir.path())
        .output()
        .expect("run agora dev");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--agent-attributes"));
}
