//! `agora demo`: an embedded cluster and a showcase: two frameworks share two agents through
//! resource offers, tasks finish, fail and get killed, and every offer and state change is
//! shown as it happens.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use agora_master::core::MasterConfig;
use agora_sdk::proto::*;
use agora_sdk::scheduler::{self, Driver, DriverConfig, Scheduler};
use agora_sdk::{Attributes, Resources};
use clap::Args;

use crate::cluster::{Cluster, ClusterSpec};
use crate::output;

#[derive(Args)]
pub struct DemoCommand {
    /// Keep the demo's directory (certificates, sandboxes) instead of deleting it.
    #[arg(long)]
    keep: bool,
}

struct DemoScheduler {
    name: &'static str,
    started: Instant,
    pending: VecDeque<TaskInfo>,
    total: usize,
    to_kill: BTreeSet<TaskId>,
    done: BTreeMap<TaskId, TaskStatus>,
}

impl DemoScheduler {
    fn say(&self, what: String) {
        println!("[{:5.2}s] {:<6} {what}", self.started.elapsed().as_secs_f64(), self.name);
    }
}

impl Scheduler for DemoScheduler {
    async fn resource_offers(&mut self, driver: &Driver, offers: Vec<Offer>) {
        for offer in offers {
            let batch = scheduler::take_fitting(&offer.resources, &mut self.pending);
            if batch.is_empty() {
                self.say(format!("offer  {} {} → decline", offer.hostname, offer.resources));
                driver.decline(vec![offer.id], Some(if self.pending.is_empty() { 30.0 } else { 0.5 }));
            } else {
                self.say(format!(
                    "offer  {} {} → launch {} task(s)",
                    offer.hostname,
                    offer.resources,
                    batch.len()
                ));
                driver.launch(vec![offer.id], batch);
            }
        }
        if self.pending.is_empty() {
            driver.suppress();
        }
    }

    async fn status_update(&mut self, driver: &Driver, st: &TaskStatus) {
        let detail = match (st.state, st.exit_code, st.signal) {
            (TaskState::Failed, Some(c), _) => format!(" (exit {c})"),
            (_, _, Some(s)) => format!(" (signal {s})"),
            _ => String::new(),
        };
        self.say(format!("{:<12} {}{}", st.task_id, st.state, detail));
        if st.state == TaskState::Running && self.to_kill.contains(&st.task_id) {
            self.say(format!("kill   {} (it would sleep for a minute)", st.task_id));
            driver.kill(st.task_id.clone());
        }
        if st.state.is_terminal() {
            self.done.insert(st.task_id.clone(), st.clone());
            if self.done.len() == self.total {
                driver.acknowledge(st);
                driver.stop(false);
            }
        }
    }
}

fn shell_task(id: &str, script: &str, cpus: u64, mem_mib: u64) -> TaskInfo {
    TaskInfo {
        task_id: TaskId(id.into()),
        name: id.split('-').next().unwrap_or(id).into(),
        resources: Resources { cpus, mem: mem_mib << 20, ..Default::default() },
        kind: TaskKind::Command(CommandInfo { argv: vec![script.into()], shell: true, env: vec![] }),
        kill_grace: Some(Duration::from_millis(500)),
    }
}

impl DemoCommand {
    pub async fn execute(self) -> anyhow::Result<ExitCode> {
        let dir = tempfile::Builder::new().prefix("agora-demo-").tempdir()?;
        println!(
            "Agora demo: a master and two agents in this process, talking QUIC with mutual TLS on loopback."
        );
        let cluster = Cluster::start(ClusterSpec {
            dir: dir.path().to_path_buf(),
            listen: ([127, 0, 0, 1], 0).into(),
            agents: 2,
            resources: Some(Resources::parse("cpus:2;mem:2GiB;disk:4GiB;ports:[31000-31099]")?),
            attributes: vec![Attributes::parse("rack:r1;zone:a")?, Attributes::parse("rack:r2;zone:b")?],
            allocator: "drf".into(),
            core: MasterConfig { allocation_interval: Duration::from_millis(250), ..MasterConfig::default() },
        })
        .await?;
        for a in cluster.master.agents().await {
            println!("  agent {} ({}) offers {}  [{}]", a.id, a.hostname, a.resources, a.attributes);
        }
        println!("Two frameworks arrive: `etl` (10 short jobs) and `ml` (5 jobs: some fail, one is killed).");
        println!(
            "The DRF allocator offers each agent's free resources to the framework with the lowest share.\n"
        );
        let started = Instant::now();
        let etl_tasks: VecDeque<TaskInfo> = (0..10)
            .map(|i| {
                shell_task(
                    &format!("etl-{i}"),
                    &format!("sleep 0.{}; echo rows={}", 2 + i % 3, i * 1000),
                    500,
                    256,
                )
            })
            .collect();
        let ml_tasks: VecDeque<TaskInfo> = VecDeque::from(vec![
            shell_task("ml-train", "sleep 0.5; echo model trained", 1000, 512),
            shell_task("ml-eval", "sleep 0.3; echo accuracy=0.93", 500, 256),
            shell_task("ml-bad-input", "echo 'input missing' >&2; exit 2", 250, 64),
            shell_task("ml-crash", "echo 'segment 7 is corrupt' >&2; exit 70", 250, 64),
            shell_task("ml-forever", "sleep 60", 250, 64),
        ]);
        let mut etl = DemoScheduler {
            name: "etl",
            started,
            total: etl_tasks.len(),
            pending: etl_tasks,
            to_kill: BTreeSet::new(),
            done: BTreeMap::new(),
        };
        let mut ml = DemoScheduler {
            name: "ml",
            started,
            total: ml_tasks.len(),
            pending: ml_tasks,
            to_kill: [TaskId("ml-forever".into())].into_iter().collect(),
            done: BTreeMap::new(),
        };
        let tls = cluster.client.identity(Role::Framework)?;
        let master = cluster.master.addr.to_string();
        let etl_cfg = DriverConfig::new(master.clone(), tls.clone(), "etl");
        let mut ml_cfg = DriverConfig::new(master, tls, "ml");
        ml_cfg.framework.role = "ml".into();
        let (a, b) = tokio::join!(
            tokio::time::timeout(Duration::from_secs(60), scheduler::run(etl_cfg, &mut etl)),
            tokio::time::timeout(Duration::from_secs(60), scheduler::run(ml_cfg, &mut ml)),
        );
        let ok = matches!(a, Ok(Ok(()))) && matches!(b, Ok(Ok(())));
        println!("\nFinal state of the cluster (`agora tasks`):\n");
        let mut tasks = cluster.master.tasks().await;
        tasks.sort_by(|x, y| x.id.cmp(&y.id));
        print!("{}", output::tasks_table(&tasks));
        println!();
        print!("{}", output::frameworks_table(&cluster.master.frameworks().await));
        println!("\nTask output, streamed from the agents' sandboxes through the master (`agora logs`):");
        if let Ok(client) = agora_sdk::client::OperatorClient::connect(&cluster.client).await {
            for (id, which) in [
                ("etl-3", OutputStream::Stdout),
                ("ml-eval", OutputStream::Stdout),
                ("ml-crash", OutputStream::Stderr),
            ] {
                let mut text = Vec::new();
                if let Ok(mut r) = client.output(&TaskId(id.into()), which, false).await {
                    let _ = tokio::io::AsyncReadExt::read_to_end(&mut r, &mut text).await;
                }
                let label = if which == OutputStream::Stderr { "stderr" } else { "stdout" };
                println!("  {id:<9} {label}: {}", String::from_utf8_lossy(&text).trim_end());
            }
            client.close();
        }
        let count = |s: TaskState| tasks.iter().filter(|t| t.state == s).count();
        println!(
            "\n{} tasks in {:.1}s: {} finished, {} failed, {} killed.",
            tasks.len(),
            started.elapsed().as_secs_f64(),
            count(TaskState::Finished),
            count(TaskState::Failed),
            count(TaskState::Killed)
        );
        cluster.stop().await;
        if self.keep {
            let kept = dir.keep();
            println!("Sandboxes kept in {}", kept.display());
        }
        println!(
            "\nWhere to look next:\n  agora dev --agents 2                 a cluster to play with (writes .agora-dev/client.toml)\n  AGORA_CONFIG=.agora-dev/client.toml agora run -- echo hello\n  agora run --count 100 -- true        many tasks, with a progress bar\n  agora tasks -o json; agora logs TASK -f; agora kill TASK\n  cargo run --example shell_tasks -- --config .agora-dev/client.toml --count 20 'echo hi'\n                                       a framework written with the SDK (examples/shell_tasks.rs)"
        );
        if !ok {
            anyhow::bail!("the demo's frameworks did not finish cleanly: {a:?} {b:?}");
        }
        Ok(ExitCode::SUCCESS)
    }
}
