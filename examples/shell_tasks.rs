//! A framework written with the SDK: runs N shell tasks on whatever the cluster offers and
//! prints a summary.
//!
//! ```text
//! agora dev &                                   # writes .agora-dev/client.toml
//! cargo run --example shell_tasks -- --config .agora-dev/client.toml --count 20 'echo hi from $AGORA_TASK_ID'
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::time::Instant;

use agora_sdk::config::ClientConfig;
use agora_sdk::proto::*;
use agora_sdk::scheduler::{run, take_fitting, Driver, DriverConfig, Scheduler};
use agora_sdk::Resources;

/// Launches queued tasks into offers; declines what it cannot use.
struct ShellTasks {
    queue: VecDeque<TaskInfo>,
    total: usize,
    ended: BTreeMap<TaskId, TaskStatus>,
    started: Instant,
}

impl Scheduler for ShellTasks {
    async fn resource_offers(&mut self, driver: &Driver, offers: Vec<Offer>) {
        for offer in offers {
            let launch = take_fitting(&offer.resources, &mut self.queue);
            if launch.is_empty() {
                driver.decline(vec![offer.id], Some(5.0));
            } else {
                println!("launching {} task(s) on {}", launch.len(), offer.hostname);
                driver.launch(vec![offer.id], launch);
            }
        }
        if self.queue.is_empty() {
            driver.suppress(); // nothing left to run: stop offers
        }
    }

    async fn status_update(&mut self, driver: &Driver, status: &TaskStatus) {
        if !status.state.is_terminal() {
            return;
        }
        println!("{} {} {}", status.task_id, status.state, status.reason);
        self.ended.insert(status.task_id.clone(), status.clone());
        if self.ended.len() == self.total {
            driver.acknowledge(status);
            driver.stop(true); // done: tear the framework down
        }
    }
}

fn usage() -> ! {
    eprintln!("usage: shell_tasks --config CLIENT_TOML [--count N] SCRIPT");
    std::process::exit(2)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut config, mut count, mut script) = (None, 5usize, None);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" => config = args.next().map(PathBuf::from),
            "--count" => count = args.next().and_then(|n| n.parse().ok()).unwrap_or_else(|| usage()),
            _ => script = Some(a),
        }
    }
    let cfg = ClientConfig::resolve(config.as_deref(), None, None)?;
    let script = script.unwrap_or_else(|| "echo hello from $AGORA_TASK_ID".into());
    let queue: VecDeque<TaskInfo> = (0..count)
        .map(|i| TaskInfo {
            task_id: TaskId(format!("shell-{}-{i}", std::process::id())),
            name: "shell".into(),
            resources: Resources::parse("cpus:0.1;mem:32MiB").unwrap_or_default(),
            kind: TaskKind::Command(CommandInfo { argv: vec![script.clone()], shell: true, env: vec![] }),
            kill_grace: None,
            user: None,
        })
        .collect();
    let mut sched = ShellTasks { total: queue.len(), queue, ended: BTreeMap::new(), started: Instant::now() };
    let driver = DriverConfig::new(cfg.master.clone(), cfg.identity(Role::Framework)?, "shell-tasks");
    run(driver, &mut sched).await?;
    let finished = sched.ended.values().filter(|s| s.state == TaskState::Finished).count();
    println!(
        "summary: {} tasks, {} finished, {} not, in {:.2}s",
        sched.total,
        finished,
        sched.total - finished,
        sched.started.elapsed().as_secs_f64()
    );
    Ok(())
}
