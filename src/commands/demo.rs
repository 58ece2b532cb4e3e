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
        // The twenty no-op Wasm tasks are summed up at the end rather than narrated.
        if !st.task_id.as_str().starts_with("wasm-noop-") {
            let why = if st.state == TaskState::Failed && st.exit_code.is_none() {
                format!(": {}", st.reason)
            } else {
                String::new()
            };
            self.say(format!("{:<12} {}{}{}", st.task_id, st.state, detail, why));
        }
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
        user: None,
    }
}

fn wasm_task(id: &str, module: &ArtifactRef, args: &[&str], mem_mib: u64, fuel: Option<u64>) -> TaskInfo {
    let mut argv = vec![format!("{}.wasm", id.trim_start_matches("wasm-"))];
    argv.extend(args.iter().map(|a| a.to_string()));
    TaskInfo {
        task_id: TaskId(id.into()),
        name: id.split('-').take(2).collect::<Vec<_>>().join("-"),
        resources: Resources { cpus: 250, mem: mem_mib << 20, ..Default::default() },
        kind: TaskKind::Wasm(Box::new(WasmInfo {
            module: module.clone(),
            args: argv,
            env: vec![],
            dirs: vec![],
            fuel,
            timeout: Some(Duration::from_secs(20)),
        })),
        kill_grace: None,
        user: None,
    }
}

/// The demo's Wasm tasks: modules (assembled from examples/wasm/*.wat) uploaded to the master's
/// artifact store, then tasks that name them by digest.
async fn wasm_tasks(master: &str, tls: &agora_sdk::tls::TlsFiles) -> anyhow::Result<VecDeque<TaskInfo>> {
    let session = agora_sdk::client::Session::connect(master, tls, Role::Framework).await?;
    let mut modules = BTreeMap::new();
    for (name, text) in [
        ("hello", include_str!("../../examples/wasm/hello.wat")),
        ("spin", include_str!("../../examples/wasm/spin.wat")),
        ("membomb", include_str!("../../examples/wasm/membomb.wat")),
        ("trap", include_str!("../../examples/wasm/trap.wat")),
        ("noop", include_str!("../../examples/wasm/noop.wat")),
    ] {
        let bytes = wat::parse_str(text)?;
        let r =
            agora_sdk::artifacts::upload_bytes(&session.conn, ArtifactKind::WasmModule, name, &bytes).await?;
        modules.insert(name, r);
    }
    session.conn.close(0u32.into(), b"uploaded");
    let mut tasks = VecDeque::from(vec![
        wasm_task("wasm-hello", &modules["hello"], &["offers", "and", "fuel"], 16, None),
        wasm_task("wasm-spin", &modules["spin"], &[], 16, Some(200_000_000)),
        wasm_task("wasm-membomb", &modules["membomb"], &[], 32, None),
        wasm_task("wasm-trap", &modules["trap"], &[], 16, None),
    ]);
    for i in 0..20 {
        tasks.push_back(wasm_task(&format!("wasm-noop-{i}"), &modules["noop"], &[], 8, None));
    }
    Ok(tasks)
}

/// The `custom` framework: its tasks run in its own executor (`agora demo-executor`, this
/// binary, uploaded to the master's artifact store), one process per agent; once they are
/// done it asks each executor how many tasks it ran (a framework message), prints the answers
/// and shuts the executors down.
struct CustomScheduler {
    started: Instant,
    executor: ExecutorInfo,
    pending: VecDeque<TaskInfo>,
    total: usize,
    finished: usize,
    /// Agents where the executor was started (it holds its own resources there).
    executors: BTreeSet<AgentId>,
    answered: usize,
    exited: usize,
}

impl CustomScheduler {
    async fn new(master: &str, tls: &agora_sdk::tls::TlsFiles, started: Instant) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let session = agora_sdk::client::Session::connect(master, tls, Role::Framework).await?;
        let artifact =
            agora_sdk::artifacts::upload(&session.conn, ArtifactKind::Executable, "agora", &exe).await?;
        session.conn.close(0u32.into(), b"uploaded");
        let executor = ExecutorInfo {
            executor_id: ExecutorId::new("counter"),
            name: "counter".into(),
            command: CommandInfo {
                argv: vec!["./agora".into(), "demo-executor".into()],
                shell: false,
                env: vec![],
            },
            resources: Resources { cpus: 100, mem: 64 << 20, ..Default::default() },
            fetch: vec![FetchInfo { artifact, path: "agora".into(), executable: true }],
        };
        let words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"];
        let pending: VecDeque<TaskInfo> = words
            .iter()
            .map(|w| TaskInfo {
                task_id: TaskId(format!("custom-{w}")),
                name: "custom".into(),
                resources: Resources { cpus: 100, mem: 16 << 20, ..Default::default() },
                kind: TaskKind::Executor(Box::new(ExecutorTask {
                    executor: executor.clone(),
                    data: w.as_bytes().to_vec(),
                })),
                kill_grace: None,
                user: None,
            })
            .collect();
        Ok(Self {
            started,
            executor,
            total: pending.len(),
            pending,
            finished: 0,
            executors: BTreeSet::new(),
            answered: 0,
            exited: 0,
        })
    }

    fn say(&self, what: String) {
        println!("[{:5.2}s] {:<6} {what}", self.started.elapsed().as_secs_f64(), "custom");
    }
}

impl Scheduler for CustomScheduler {
    async fn resource_offers(&mut self, driver: &Driver, offers: Vec<Offer>) {
        for offer in offers {
            // The first task on an agent also pays for the executor it starts there.
            let room = if self.executors.contains(&offer.agent_id) {
                Some(offer.resources.clone())
            } else {
                offer.resources.checked_sub(&self.executor.resources)
            };
            let batch = room.map(|r| scheduler::take_fitting(&r, &mut self.pending)).unwrap_or_default();
            if batch.is_empty() {
                driver.decline(vec![offer.id], Some(if self.pending.is_empty() { 30.0 } else { 0.5 }));
                continue;
            }
            self.executors.insert(offer.agent_id.clone());
            self.say(format!(
                "offer  {} {} → launch {} task(s) in its own executor",
                offer.hostname,
                offer.resources,
                batch.len()
            ));
            driver.launch(vec![offer.id], batch);
        }
        if self.pending.is_empty() {
            driver.suppress();
        }
    }

    async fn status_update(&mut self, driver: &Driver, st: &TaskStatus) {
        if st.state == TaskState::Finished {
            self.say(format!("{:<12} {}: {}", st.task_id, st.state, st.message));
        } else if st.state != TaskState::Running {
            self.say(format!("{:<12} {} ({}: {})", st.task_id, st.state, st.reason, st.message));
        }
        if st.state.is_terminal() {
            self.finished += 1;
            if self.finished == self.total {
                for agent in &self.executors {
                    self.say(format!("message → executor counter on {agent}: how many tasks?"));
                    let _ = driver.send_framework_message(
                        agent.clone(),
                        self.executor.executor_id.clone(),
                        b"count".to_vec(),
                    );
                }
            }
        }
    }

    async fn framework_message(
        &mut self,
        driver: &Driver,
        agent: &AgentId,
        executor: &ExecutorId,
        data: &[u8],
    ) {
        self.say(format!("message ← executor {executor} on {agent}: {}", String::from_utf8_lossy(data)));
        self.answered += 1;
        if self.answered == self.executors.len() {
            for agent in &self.executors {
                driver.shutdown_executor(agent.clone(), self.executor.executor_id.clone());
            }
        }
    }

    async fn executor_exited(
        &mut self,
        driver: &Driver,
        agent: &AgentId,
        executor: &ExecutorId,
        message: &str,
    ) {
        self.say(format!("executor {executor} on {agent} ended: {message}"));
        self.exited += 1;
        if self.exited == self.executors.len() {
            driver.stop(false);
        }
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
            // The `custom` framework ships this very binary as its executor.
            gc: agora_agent::gc::GcConfig::default(),
            max_artifact_size: 1 << 30,
        })
        .await?;
        for a in cluster.master.agents().await {
            println!("  agent {} ({}) offers {}  [{}]", a.id, a.hostname, a.resources, a.attributes);
        }
        println!("Four frameworks arrive: `etl` (10 short jobs), `ml` (5 jobs: some fail, one is killed),");
        println!("`wasm` (24 WebAssembly tasks in one executor: fuel-metered, memory-capped, sandboxed)");
        println!(
            "and `custom` (6 tasks run by the framework's own executor, which it ships to the agents and talks to)."
        );
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
        let wasm_pending = wasm_tasks(&master, &tls).await?;
        let mut wasm = DemoScheduler {
            name: "wasm",
            started,
            total: wasm_pending.len(),
            pending: wasm_pending,
            to_kill: BTreeSet::new(),
            done: BTreeMap::new(),
        };
        let etl_cfg = DriverConfig::new(master.clone(), tls.clone(), "etl");
        let mut ml_cfg = DriverConfig::new(master.clone(), tls.clone(), "ml");
        ml_cfg.framework.role = "ml".into();
        let mut wasm_cfg = DriverConfig::new(master.clone(), tls.clone(), "wasm");
        wasm_cfg.framework.role = "wasm".into();
        let mut custom = CustomScheduler::new(&master, &tls, started).await?;
        let custom_cfg = DriverConfig::new(master, tls, "custom");
        let (a, b, c, d) = tokio::join!(
            tokio::time::timeout(Duration::from_secs(60), scheduler::run(etl_cfg, &mut etl)),
            tokio::time::timeout(Duration::from_secs(60), scheduler::run(ml_cfg, &mut ml)),
            tokio::time::timeout(Duration::from_secs(60), scheduler::run(wasm_cfg, &mut wasm)),
            tokio::time::timeout(Duration::from_secs(60), scheduler::run(custom_cfg, &mut custom)),
        );
        let ok = matches!(a, Ok(Ok(())))
            && matches!(b, Ok(Ok(())))
            && matches!(c, Ok(Ok(())))
            && matches!(d, Ok(Ok(())))
            && custom.answered == custom.executors.len()
            && custom.exited == custom.executors.len()
            && !custom.executors.is_empty();
        println!("\nFinal state of the cluster (`agora tasks`):\n");
        let mut tasks = cluster.master.tasks().await;
        tasks.sort_by(|x, y| x.id.cmp(&y.id));
        // Twenty no-op Wasm tasks would drown the table: they are summed up below it.
        let shown: Vec<TaskView> =
            tasks.iter().filter(|t| !t.id.as_str().starts_with("wasm-noop-")).cloned().collect();
        print!("{}", output::tasks_table(&shown));
        let noops: Vec<&TaskView> =
            tasks.iter().filter(|t| t.id.as_str().starts_with("wasm-noop-")).collect();
        println!(
            "(and wasm-noop-0..{}: {} of {} TASK_FINISHED)",
            noops.len().saturating_sub(1),
            noops.iter().filter(|t| t.state == TaskState::Finished).count(),
            noops.len()
        );
        println!();
        print!("{}", output::frameworks_table(&cluster.master.frameworks().await));
        println!("\nTask output, streamed from the agents' sandboxes through the master (`agora logs`):");
        if let Ok(client) = agora_sdk::client::OperatorClient::connect(&cluster.client).await {
            for (id, which) in [
                ("etl-3", OutputStream::Stdout),
                ("ml-eval", OutputStream::Stdout),
                ("wasm-hello", OutputStream::Stdout),
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
            "\nWhere to look next:\n  agora dev --agents 2                 a cluster to play with (writes .agora-dev/client.toml)\n  AGORA_CONFIG=.agora-dev/client.toml agora run -- echo hello\n  agora run --count 100 -- true        many tasks, with a progress bar\n  agora run --wasm examples/wasm/hello.wat -- world\n                                       a WebAssembly task (try --fuel 1000000 on spin.wat)\n  agora tasks -o json; agora logs TASK -f; agora kill TASK\n  cargo run --example shell_tasks -- --config .agora-dev/client.toml --count 20 'echo hi'\n                                       a framework written with the SDK (examples/shell_tasks.rs)"
        );
        if !ok {
            anyhow::bail!(
                "the demo's frameworks did not finish cleanly: {a:?} {b:?} {c:?} {d:?} ({} of {} executors answered)",
                custom.answered,
                custom.executors.len()
            );
        }
        Ok(ExitCode::SUCCESS)
    }
}
