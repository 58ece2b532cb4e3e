//! A framework with its own executor: uploads `examples/echo_executor.rs`'s binary to the
//! master's artifact store, runs N tasks in it (one executor process per agent, named `echo`,
//! fetched into its sandbox by the agent), then pings every executor it used with a framework
//! message, prints the replies, shuts the executors down and tears the framework down.
//!
//! ```text
//! cargo build --examples                        # builds echo_executor next to this example
//! agora dev &                                   # writes .agora-dev/client.toml
//! cargo run --example executor_framework -- --config .agora-dev/client.toml --tasks 20
//! ```
//!
//! The last line is `summary: N tasks finished in E executor(s); M messages answered`; the
//! exit status is 0 only if every task finished and every executor answered.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use agora_sdk::artifacts;
use agora_sdk::client::Session;
use agora_sdk::config::ClientConfig;
use agora_sdk::proto::*;
use agora_sdk::scheduler::{run, take_fitting, Driver, DriverConfig, Scheduler};
use agora_sdk::Resources;
use tokio::task::JoinHandle;

/// The executor id every task names.
const EXECUTOR_ID: &str = "echo";
/// The executor's own resources (on top of its tasks').
const EXECUTOR_RESOURCES: &str = "cpus:0.1;mem:32MiB";
/// Each task's resources.
const TASK_RESOURCES: &str = "cpus:0.1;mem:16MiB";
/// How long to wait for the executors' answers to `ping`.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

struct EchoFramework {
    queue: VecDeque<TaskInfo>,
    total: usize,
    /// The executor's resources, taken from the offer that launches its first task on an agent.
    executor_resources: Resources,
    /// Agents where the executor was launched (and has not exited).
    launched_on: BTreeSet<AgentId>,
    /// Finished tasks and where they ran.
    finished: BTreeMap<TaskId, AgentId>,
    /// Tasks that ended otherwise.
    failed: BTreeMap<TaskId, TaskStatus>,
    /// Executor pids seen in RUNNING updates, per agent.
    pids: BTreeMap<AgentId, BTreeSet<u32>>,
    /// Executors sent `ping` (by agent), those that answered and those that exited meanwhile.
    pinged: BTreeSet<AgentId>,
    answered: BTreeSet<AgentId>,
    exited: BTreeSet<AgentId>,
    /// Ends the wait for answers.
    timer: Option<JoinHandle<()>>,
    stopping: bool,
}

impl EchoFramework {
    /// Every task ended: ping each executor that ran a finished task.
    fn ping_executors(&mut self, driver: &Driver) {
        self.pinged = self.finished.values().cloned().collect();
        if self.pinged.is_empty() {
            self.finish(driver);
            return;
        }
        println!("all {} task(s) ended; pinging {} executor(s)", self.total, self.pinged.len());
        for agent in &self.pinged {
            if let Err(e) =
                driver.send_framework_message(agent.clone(), ExecutorId::new(EXECUTOR_ID), b"ping".to_vec())
            {
                eprintln!("cannot ping the executor on {agent}: {e}");
            }
        }
        let (driver, agents) = (driver.clone(), self.pinged.clone());
        self.timer = Some(tokio::spawn(async move {
            tokio::time::sleep(REPLY_TIMEOUT).await;
            eprintln!("not every executor answered within {REPLY_TIMEOUT:?}");
            shut_down(&driver, &agents);
        }));
    }

    /// Whether every pinged executor answered (or exited, so will not).
    fn all_heard(&self) -> bool {
        self.pinged.iter().all(|a| self.answered.contains(a) || self.exited.contains(a))
    }

    fn finish(&mut self, driver: &Driver) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        if let Some(timer) = self.timer.take() {
            timer.abort();
        }
        shut_down(driver, &self.pinged);
    }
}

/// Shuts the executors down and tears the framework down.
fn shut_down(driver: &Driver, agents: &BTreeSet<AgentId>) {
    for agent in agents {
        driver.shutdown_executor(agent.clone(), ExecutorId::new(EXECUTOR_ID));
    }
    driver.stop(true);
}

impl Scheduler for EchoFramework {
    async fn resource_offers(&mut self, driver: &Driver, offers: Vec<Offer>) {
        for offer in offers {
            let first = !self.launched_on.contains(&offer.agent_id);
            // The first launch on an agent also pays for the executor.
            let room = if first {
                offer.resources.checked_sub(&self.executor_resources)
            } else {
                Some(offer.resources.clone())
            };
            let launch = room.map(|room| take_fitting(&room, &mut self.queue)).unwrap_or_default();
            if launch.is_empty() {
                driver.decline(vec![offer.id], Some(5.0));
                continue;
            }
            println!(
                "launching {} task(s) on {}{}",
                launch.len(),
                offer.hostname,
                if first { " with a new executor" } else { "" }
            );
            self.launched_on.insert(offer.agent_id.clone());
            driver.launch(vec![offer.id], launch);
        }
        if self.queue.is_empty() {
            driver.suppress(); // nothing left to run: stop offers
        }
    }

    async fn status_update(&mut self, driver: &Driver, status: &TaskStatus) {
        let agent = status.agent_id.clone();
        if status.state == TaskState::Running {
            let pid = status.message.split_whitespace().find_map(|w| w.strip_prefix("pid=")?.parse().ok());
            if let (Some(agent), Some(pid)) = (agent, pid) {
                self.pids.entry(agent).or_default().insert(pid);
            }
            return;
        }
        if !status.state.is_terminal() {
            return;
        }
        let where_ = agent.as_ref().map(|a| a.to_string()).unwrap_or_else(|| "?".into());
        println!("{} {} on {where_}: {} {}", status.task_id, status.state, status.reason, status.message);
        match (status.state, agent) {
            (TaskState::Finished, Some(agent)) => {
                self.finished.insert(status.task_id.clone(), agent);
            }
            _ => {
                self.failed.insert(status.task_id.clone(), status.clone());
            }
        }
        if self.pinged.is_empty() && !self.stopping && self.finished.len() + self.failed.len() == self.total {
            self.ping_executors(driver);
        }
    }

    async fn framework_message(
        &mut self,
        driver: &Driver,
        agent_id: &AgentId,
        executor_id: &ExecutorId,
        data: &[u8],
    ) {
        println!("reply from {executor_id} on {agent_id}: {}", String::from_utf8_lossy(data));
        if executor_id.as_str() == EXECUTOR_ID && self.pinged.contains(agent_id) {
            self.answered.insert(agent_id.clone());
            if self.all_heard() {
                self.finish(driver);
            }
        }
    }

    async fn executor_exited(
        &mut self,
        driver: &Driver,
        agent_id: &AgentId,
        executor_id: &ExecutorId,
        message: &str,
    ) {
        println!("executor {executor_id} on {agent_id} exited: {message}");
        if executor_id.as_str() != EXECUTOR_ID {
            return;
        }
        // Its next task there would start a new one, paid for again.
        self.launched_on.remove(agent_id);
        self.exited.insert(agent_id.clone());
        if !self.pinged.is_empty() && self.all_heard() {
            self.finish(driver);
        }
    }
}

const USAGE: &str = concat!(
    "usage: executor_framework [--config CLIENT_TOML] [--tasks N] [--executor PATH]\n",
    "  --config CLIENT_TOML  the cluster (default: $AGORA_CONFIG)\n",
    "  --tasks N             tasks to run, at least 1 (default 20)\n",
    "  --executor PATH       the echo_executor binary (default: echo_executor next to this program)",
);

fn usage(problem: &str) -> ExitCode {
    eprintln!("executor_framework: {problem}\n{USAGE}");
    ExitCode::from(2)
}

fn fail(reason: impl std::fmt::Display) -> ExitCode {
    eprintln!("executor_framework: {reason}");
    ExitCode::from(1)
}

/// Command-line options.
struct Options {
    config: Option<PathBuf>,
    tasks: usize,
    executor: Option<PathBuf>,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut opts = Options { config: None, tasks: 20, executor: None };
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| args.next().ok_or_else(|| format!("{flag} needs a value"));
        match arg.as_str() {
            "--config" => opts.config = Some(PathBuf::from(value("--config")?)),
            "--executor" => opts.executor = Some(PathBuf::from(value("--executor")?)),
            "--tasks" => {
                let n = value("--tasks")?;
                opts.tasks = n
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("--tasks takes a positive number, not `{n}`"))?;
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(opts)
}

/// Uploads the executor binary through a connection of its own.
async fn upload_executor(
    cfg: &ClientConfig,
    tls: &agora_sdk::tls::TlsFiles,
    path: &Path,
) -> Result<ArtifactRef, String> {
    let session = Session::connect(&cfg.master, tls, Role::Framework)
        .await
        .map_err(|e| format!("cannot reach the master at {}: {e}", cfg.master))?;
    let uploaded = artifacts::upload(&session.conn, ArtifactKind::Executable, "echo_executor", path)
        .await
        .map_err(|e| format!("cannot upload {}: {e}", path.display()));
    session.conn.close(0u32.into(), b"uploaded");
    session.endpoint.wait_idle().await;
    uploaded
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let opts = match parse_args(args.into_iter()) {
        Ok(o) => o,
        Err(problem) => return usage(&problem),
    };
    let executor = match opts.executor {
        Some(p) => p,
        None => match std::env::current_exe() {
            Ok(exe) => exe.with_file_name("echo_executor"),
            Err(e) => return fail(format_args!("cannot locate this program to find echo_executor: {e}")),
        },
    };
    if !executor.is_file() {
        return fail(format_args!(
            "executor file {} not found (build it with `cargo build --examples` or pass --executor PATH)",
            executor.display()
        ));
    }
    let cfg = match ClientConfig::resolve(opts.config.as_deref(), None, None) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let tls = match cfg.identity(Role::Framework) {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let artifact = match upload_executor(&cfg, &tls, &executor).await {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    println!("uploaded {} ({} bytes, sha256 {})", executor.display(), artifact.size, artifact.digest);

    let (Ok(executor_resources), Ok(task_resources)) =
        (Resources::parse(EXECUTOR_RESOURCES), Resources::parse(TASK_RESOURCES))
    else {
        return fail("bad built-in resources");
    };
    let info = ExecutorInfo {
        executor_id: ExecutorId::new(EXECUTOR_ID),
        name: "echo executor".into(),
        command: CommandInfo { argv: vec!["./echo_executor".into()], shell: false, env: vec![] },
        resources: executor_resources.clone(),
        fetch: vec![FetchInfo { artifact, path: "echo_executor".into(), executable: true }],
    };
    let queue: VecDeque<TaskInfo> = (0..opts.tasks)
        .map(|i| TaskInfo {
            task_id: TaskId(format!("echo-{}-{i}", std::process::id())),
            name: "echo".into(),
            resources: task_resources.clone(),
            kind: TaskKind::Executor(Box::new(ExecutorTask { executor: info.clone(), data: Vec::new() })),
            kill_grace: None,
            user: None,
        })
        .collect();
    let mut sched = EchoFramework {
        total: queue.len(),
        queue,
        executor_resources,
        launched_on: BTreeSet::new(),
        finished: BTreeMap::new(),
        failed: BTreeMap::new(),
        pids: BTreeMap::new(),
        pinged: BTreeSet::new(),
        answered: BTreeSet::new(),
        exited: BTreeSet::new(),
        timer: None,
        stopping: false,
    };
    let driver = DriverConfig::new(cfg.master.clone(), tls, "executor-framework");
    if let Err(e) = run(driver, &mut sched).await {
        return fail(e);
    }

    for (agent, pids) in &sched.pids {
        if pids.len() > 1 {
            println!("note: tasks on {agent} ran in {} executor processes {pids:?}", pids.len());
        }
    }
    let executors: BTreeSet<&AgentId> = sched.finished.values().collect();
    let answered = sched.answered.len();
    println!(
        "summary: {} tasks finished in {} executor(s); {answered} messages answered",
        sched.finished.len(),
        executors.len()
    );
    if sched.finished.len() == sched.total && answered == executors.len() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
