//! `agora run`: a short-lived framework that runs one task (streaming its output and passing
//! its exit code through) or `--count N` tasks (with a progress bar and a summary).

use std::collections::{BTreeMap, VecDeque};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use agora_sdk::proto::*;
use agora_sdk::resources::parse_milli;
use agora_sdk::scheduler::{self, Driver, DriverConfig, Scheduler};
use agora_sdk::units::parse_size;
use agora_sdk::Resources;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::JoinHandle;

use super::ClusterArgs;

/// Exit code when the task never ran (ERROR, LOST, DROPPED, …), as `docker run` does.
pub const EXIT_NEVER_RAN: u8 = 125;

fn parse_cpus(s: &str) -> Result<u64, String> {
    match parse_milli(s) {
        Some(0) | None => {
            Err(format!("invalid --cpus `{s}`: a positive number with at most 3 decimals, e.g. 0.5"))
        }
        Some(v) => Ok(v),
    }
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("invalid --env `{s}`: expected KEY=VALUE")),
    }
}

#[derive(Args)]
pub struct RunCommand {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// CPUs per task (e.g. 0.5).
    #[arg(long, default_value = "0.1", value_parser = parse_cpus)]
    cpus: u64,
    /// Memory per task (e.g. 64MiB).
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    mem: u64,
    /// Disk per task.
    #[arg(long, value_parser = parse_size)]
    disk: Option<u64>,
    /// Number of tasks.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Task name (default: the program's name).
    #[arg(long)]
    name: Option<String>,
    /// Role of this run's framework.
    #[arg(long, default_value = "*")]
    role: String,
    /// Environment variable for the task (repeatable).
    #[arg(long = "env", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Run the words after `--` as one `/bin/sh -c` script.
    #[arg(long)]
    shell: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

impl RunCommand {
    pub async fn execute(self) -> anyhow::Result<ExitCode> {
        if self.count == 0 {
            anyhow::bail!("--count must be at least 1");
        }
        let cfg = self.cluster.resolve()?;
        let tls = cfg.identity(Role::Framework)?;
        let program = self.command.first().cloned().unwrap_or_default();
        let name = self.name.clone().unwrap_or_else(|| {
            let base = program.rsplit('/').next().unwrap_or("task");
            if base.is_empty() {
                "task".into()
            } else {
                base.chars().take(40).collect()
            }
        });
        let argv = if self.shell { vec![self.command.join(" ")] } else { self.command.clone() };
        let resources =
            Resources { cpus: self.cpus, mem: self.mem, disk: self.disk.unwrap_or(0), ..Default::default() };
        let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
        let tasks: VecDeque<TaskInfo> = (0..self.count)
            .map(|i| TaskInfo {
                task_id: TaskId(if self.count == 1 {
                    format!("{name}-{run_id}")
                } else {
                    format!("{name}-{run_id}-{i}")
                }),
                name: name.clone(),
                resources: resources.clone(),
                kind: TaskKind::Command(CommandInfo {
                    argv: argv.clone(),
                    shell: self.shell,
                    env: self.env.clone(),
                }),
                kill_grace: None,
            })
            .collect();
        if let Some(why) = unschedulable(&cfg, &resources).await? {
            eprintln!("agora: {why}");
            return Ok(ExitCode::from(EXIT_NEVER_RAN));
        }
        let mut driver_cfg = DriverConfig::new(cfg.master.clone(), tls, format!("agora-run {name}"));
        driver_cfg.framework.role = self.role.clone();
        driver_cfg.framework.failover_timeout = Duration::from_secs(10);
        driver_cfg.reconnect = false;
        // State the demand with the subscription, so offers are sized to these tasks.
        driver_cfg.demand = Some(vec![Demand { resources: resources.clone(), count: self.count }]);
        let single = self.count == 1;
        let progress = if single {
            None
        } else {
            let pb = ProgressBar::new(u64::from(self.count));
            pb.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} done  {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            Some(pb)
        };
        let mut sched = RunScheduler {
            shape: resources.clone(),
            pending: tasks,
            total: self.count as usize,
            states: BTreeMap::new(),
            finals: BTreeMap::new(),
            single,
            streams: Vec::new(),
            progress,
            started: Instant::now(),
            running_at: None,
        };
        // Ctrl-C kills the tasks (teardown) instead of leaving them behind.
        let result = tokio::select! {
            r = scheduler::run(driver_cfg, &mut sched) => r,
            _ = super::shutdown_signal() => {
                eprintln!("agora: interrupted; the run's tasks are killed when the master sees it leave");
                return Ok(ExitCode::from(130));
            }
        };
        result?;
        for s in sched.streams.drain(..) {
            let _ = s.await;
        }
        if let Some(pb) = &sched.progress {
            pb.finish_and_clear();
        }
        Ok(sched.exit_code())
    }
}

/// Says why no agent could ever run a task of this size, when the operator view is at hand
/// (a task that cannot fit would otherwise wait for offers forever).
async fn unschedulable(
    cfg: &agora_sdk::config::ClientConfig,
    need: &Resources,
) -> Result<Option<String>, agora_sdk::client::ClientError> {
    if cfg.operator.is_none() {
        return Ok(None);
    }
    let mut client = agora_sdk::client::OperatorClient::connect(cfg).await?;
    let agents = client.agents().await?;
    client.close();
    let active: Vec<_> = agents.iter().filter(|a| a.status == "active").collect();
    if active.is_empty() || active.iter().any(|a| a.resources.contains(need)) {
        return Ok(None);
    }
    let largest: Vec<String> =
        active.iter().take(3).map(|a| format!("{} has {}", a.hostname, a.resources)).collect();
    Ok(Some(format!("no agent can ever fit a task of {need} ({})", largest.join("; "))))
}

struct RunScheduler {
    /// Every task's resources (the demand's shape).
    shape: Resources,
    pending: VecDeque<TaskInfo>,
    total: usize,
    states: BTreeMap<TaskId, TaskState>,
    finals: BTreeMap<TaskId, TaskStatus>,
    single: bool,
    streams: Vec<JoinHandle<()>>,
    progress: Option<ProgressBar>,
    started: Instant,
    running_at: Option<Instant>,
}

impl RunScheduler {
    /// Tells the master how many tasks still wait for resources.
    fn state_demand(&self, driver: &Driver) {
        let count = u32::try_from(self.pending.len()).unwrap_or(u32::MAX);
        let demands =
            if count == 0 { Vec::new() } else { vec![Demand { resources: self.shape.clone(), count }] };
        driver.request(demands);
    }

    fn start_streams(&mut self, driver: &Driver, task_id: &TaskId, follow: bool) {
        let Some(conn) = driver.connection() else { return };
        for which in [OutputStream::Stdout, OutputStream::Stderr] {
            let conn = conn.clone();
            let id = task_id.clone();
            self.streams.push(tokio::spawn(async move {
                match agora_sdk::client::open_output(&conn, &id, which, 0, follow).await {
                    Ok(mut r) => {
                        let res = match which {
                            OutputStream::Stdout => tokio::io::copy(&mut r, &mut tokio::io::stdout()).await,
                            OutputStream::Stderr => tokio::io::copy(&mut r, &mut tokio::io::stderr()).await,
                        };
                        if let Err(e) = res {
                            tracing::warn!(error = %e, "output stream broke");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot open the task's output"),
                }
            }));
        }
    }

    fn exit_code(&self) -> ExitCode {
        if self.single {
            let Some(st) = self.finals.values().next() else {
                eprintln!("agora: the task did not finish");
                return ExitCode::from(EXIT_NEVER_RAN);
            };
            return match st.state {
                TaskState::Finished => ExitCode::SUCCESS,
                TaskState::Failed | TaskState::Killed if st.exit_code.is_some() || st.signal.is_some() => {
                    if let Some(sig) = st.signal {
                        ExitCode::from((128 + sig.clamp(0, 127)) as u8)
                    } else {
                        ExitCode::from(st.exit_code.unwrap_or(1).clamp(0, 255) as u8)
                    }
                }
                _ => {
                    eprintln!(
                        "agora: task {} {}: {}{}",
                        st.task_id,
                        st.state,
                        st.reason,
                        if st.message.is_empty() { String::new() } else { format!(": {}", st.message) }
                    );
                    ExitCode::from(if st.state == TaskState::Killed { 137 } else { EXIT_NEVER_RAN })
                }
            };
        }
        let mut by_state: BTreeMap<&'static str, usize> = BTreeMap::new();
        let mut codes: BTreeMap<String, usize> = BTreeMap::new();
        for st in self.finals.values() {
            *by_state.entry(st.state.as_str()).or_default() += 1;
            if st.state != TaskState::Finished {
                let k = match (st.exit_code, st.signal) {
                    (_, Some(s)) => format!("signal {s}"),
                    (Some(c), _) => format!("exit {c}"),
                    _ => st.reason.clone(),
                };
                *codes.entry(k).or_default() += 1;
            }
        }
        let secs = self.started.elapsed().as_secs_f64();
        let states: Vec<String> = by_state.iter().map(|(k, v)| format!("{v} {k}")).collect();
        eprintln!(
            "{} tasks in {:.2}s ({:.0} tasks/s): {}",
            self.total,
            secs,
            self.total as f64 / secs.max(1e-9),
            states.join(", ")
        );
        if !codes.is_empty() {
            let c: Vec<String> = codes.iter().map(|(k, v)| format!("{k} ×{v}")).collect();
            eprintln!("failures: {}", c.join(", "));
        }
        if by_state.get("TASK_FINISHED").copied().unwrap_or(0) == self.total {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        }
    }
}

impl Scheduler for RunScheduler {
    async fn resource_offers(&mut self, driver: &Driver, offers: Vec<Offer>) {
        let before = self.pending.len();
        for offer in offers {
            let batch = scheduler::take_fitting(&offer.resources, &mut self.pending);
            for t in &batch {
                self.states.insert(t.task_id.clone(), TaskState::Staging);
            }
            if batch.is_empty() {
                driver.decline(vec![offer.id], Some(if self.pending.is_empty() { 60.0 } else { 1.0 }));
            } else {
                driver.launch(vec![offer.id], batch);
            }
        }
        if self.pending.len() != before {
            // Lower the demand to what is still waiting.
            self.state_demand(driver);
        }
        if self.pending.is_empty() {
            driver.suppress();
        }
    }

    async fn offer_rescinded(&mut self, driver: &Driver, _offer_id: &OfferId) {
        // The master counted that offer against our demand: state it again.
        if !self.pending.is_empty() {
            self.state_demand(driver);
        }
    }

    async fn status_update(&mut self, driver: &Driver, status: &TaskStatus) {
        let prev = self.states.insert(status.task_id.clone(), status.state);
        if self.single
            && status.state == TaskState::Running
            && prev != Some(TaskState::Running)
            && self.streams.is_empty()
        {
            self.running_at = Some(Instant::now());
            self.start_streams(driver, &status.task_id.clone(), true);
        }
        if status.state.is_terminal() && !self.finals.contains_key(&status.task_id) {
            if self.single && self.streams.is_empty() && status.exit_code.is_some() {
                // Finished before we saw it running: read what it wrote.
                self.start_streams(driver, &status.task_id.clone(), false);
            }
            self.finals.insert(status.task_id.clone(), status.clone());
            if let Some(pb) = &self.progress {
                pb.inc(1);
                let failed = self.finals.values().filter(|s| s.state != TaskState::Finished).count();
                if failed > 0 {
                    pb.set_message(format!("{failed} failed"));
                }
            }
            if self.finals.len() == self.total {
                // Acknowledge now: a stop queued in this callback goes out before the
                // automatic acknowledgement would.
                driver.acknowledge(status);
                // Keep the connection until the output streams have drained.
                let streams = std::mem::take(&mut self.streams);
                let d = driver.clone();
                tokio::spawn(async move {
                    for s in streams {
                        let _ = s.await;
                    }
                    d.stop(false);
                });
            }
        }
        if status.state == TaskState::Unreachable {
            tracing::warn!(task_id = %status.task_id, "task unreachable: its agent stopped answering");
        }
    }

    async fn error(&mut self, driver: &Driver, error: &WireError) {
        eprintln!("agora: the master reported: {}", error.message);
        let _ = driver;
    }
}
