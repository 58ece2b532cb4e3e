//! `agora job run FILE`, `agora job status NAME`, `agora job stop NAME`: declarative batch jobs.
//!
//! A job file (TOML) names the job and its task groups; each group is `count` copies of one task
//! (a native command or a Wasm module) with its resources, attribute constraints and a restart
//! policy for failed tasks. `agora job run` subscribes a framework named `agora-job NAME`, places
//! the tasks on offers whose agents meet their group's constraints, retries failed ones as the
//! policy says (each attempt a task of its own id), shows progress, and exits 0 when every task
//! finished, 1 otherwise, with a summary. The job file's errors name their line.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use agora_sdk::attributes::{AttrValue, Attributes};
use agora_sdk::client::OperatorClient;
use agora_sdk::proto::*;
use agora_sdk::resources::parse_milli;
use agora_sdk::scheduler::{self, Driver, DriverConfig, Scheduler};
use agora_sdk::units::parse_duration;
use agora_sdk::Resources;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use toml::Spanned;

use super::list::Format;
use super::ClusterArgs;

/// Largest job file read.
const MAX_FILE: u64 = 1 << 20;
/// Most groups in a job.
const MAX_GROUPS: usize = 64;
/// Most tasks in a job (every group's count together).
const MAX_TASKS: u64 = 100_000;
/// Most attempts a restart policy may give a task (its first run not counted).
const MAX_ATTEMPTS: u32 = 100;
/// Longest pause between attempts.
const MAX_DELAY: Duration = Duration::from_secs(3600);
/// The prefix of a job's framework name.
const FRAMEWORK_PREFIX: &str = "agora-job ";

#[derive(Args)]
pub struct JobCommand {
    #[command(subcommand)]
    action: JobAction,
}

#[derive(Subcommand)]
enum JobAction {
    /// Run a job file: its task groups, with progress, a summary and the exit code of
    /// `agora run --count` (0 when every task finished).
    Run {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// The job file (TOML; see examples/job.toml).
        file: PathBuf,
    },
    /// The tasks of a running job, by group and state.
    Status {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
        format: Format,
        name: String,
    },
    /// Kill every task of a running job (killed tasks are not restarted; `agora job run` ends).
    Stop {
        #[command(flatten)]
        cluster: ClusterArgs,
        name: String,
    },
}

impl JobCommand {
    pub async fn execute(self) -> anyhow::Result<ExitCode> {
        match self.action {
            JobAction::Run { cluster, file } => run(&cluster, &file).await,
            JobAction::Status { cluster, format, name } => status(&cluster, &name, format).await,
            JobAction::Stop { cluster, name } => stop(&cluster, &name).await,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The file

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobFile {
    name: Spanned<String>,
    role: Option<Spanned<String>>,
    /// OS user of the job's tasks (the framework's `user`).
    user: Option<Spanned<String>>,
    #[serde(default, rename = "group")]
    groups: Vec<Spanned<GroupFile>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupFile {
    name: Spanned<String>,
    #[serde(default = "one")]
    count: Spanned<u32>,
    cpus: Spanned<f64>,
    mem: Spanned<String>,
    disk: Option<Spanned<String>>,
    command: Option<Spanned<Vec<String>>>,
    wasm: Option<Spanned<String>>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    fuel: Option<u64>,
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    constraints: Vec<Spanned<String>>,
    restart: Option<Spanned<RestartFile>>,
}

fn one() -> Spanned<u32> {
    Spanned::new(0..0, 1)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestartFile {
    attempts: u32,
    #[serde(default)]
    delay: Option<String>,
}

/// A job file that cannot be used: the line it names and why.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {why}")]
struct FileError {
    file: String,
    line: usize,
    why: String,
}

/// The 1-based line of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())].iter().filter(|b| **b == b'\n').count() + 1
}

/// An attribute constraint: `ATTR == VALUE`, `ATTR != VALUE` or `ATTR contains VALUE`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Constraint {
    Equals(String, String),
    NotEquals(String, String),
    Contains(String, String),
}

impl Constraint {
    fn parse(s: &str) -> Result<Self, String> {
        let words: Vec<&str> = s.split_whitespace().collect();
        let [attr, op, value] = words[..] else {
            return Err(format!(
                "constraint `{s}`: expected `ATTR == VALUE`, `ATTR != VALUE` or `ATTR contains VALUE`"
            ));
        };
        let (attr, value) = (attr.to_string(), value.to_string());
        match op {
            "==" => Ok(Constraint::Equals(attr, value)),
            "!=" => Ok(Constraint::NotEquals(attr, value)),
            "contains" => Ok(Constraint::Contains(attr, value)),
            _ => Err(format!("constraint `{s}`: unknown operator `{op}` (==, != or contains)")),
        }
    }

    /// Whether an agent with `attributes` meets it (a missing attribute meets only `!=`).
    fn holds(&self, attributes: &Attributes) -> bool {
        let equals = |a: &AttrValue, v: &str| match a {
            AttrValue::Text(t) => t == v,
            AttrValue::Scalar(x) => parse_milli(v) == Some(*x),
            _ => false,
        };
        match self {
            Constraint::Equals(a, v) => attributes.get(a).is_some_and(|x| equals(x, v)),
            Constraint::NotEquals(a, v) => !attributes.get(a).is_some_and(|x| equals(x, v)),
            Constraint::Contains(a, v) => attributes.get(a).is_some_and(|x| match x {
                AttrValue::Set(s) => s.contains(v),
                AttrValue::Ranges(r) => {
                    v.parse::<u64>().is_ok_and(|n| r.iter().any(|(b, e)| *b <= n && n <= *e))
                }
                AttrValue::Text(t) => t.contains(v.as_str()),
                AttrValue::Scalar(_) => equals(x, v),
            }),
        }
    }
}

/// A group, checked.
#[derive(Clone, Debug)]
struct Group {
    name: String,
    count: u32,
    resources: Resources,
    kind: GroupKind,
    constraints: Vec<Constraint>,
    attempts: u32,
    delay: Duration,
}

#[derive(Clone, Debug)]
enum GroupKind {
    Command(Vec<String>, Vec<(String, String)>),
    Wasm {
        module: PathBuf,
        args: Vec<String>,
        env: Vec<(String, String)>,
        fuel: Option<u64>,
        timeout: Option<Duration>,
    },
}

/// A job, checked.
#[derive(Debug)]
struct Job {
    name: String,
    role: String,
    user: Option<String>,
    groups: Vec<Group>,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

/// Reads and checks a job file; every error names its line.
fn parse_job(file: &str, text: &str, base: &Path) -> Result<Job, FileError> {
    let at = |span: std::ops::Range<usize>, why: String| FileError {
        file: file.to_string(),
        line: line_of(text, span.start),
        why,
    };
    let raw: JobFile = toml::from_str(text).map_err(|e| FileError {
        file: file.to_string(),
        line: e.span().map_or(1, |s| line_of(text, s.start)),
        why: e.message().to_string(),
    })?;
    if !valid_name(raw.name.get_ref()) {
        return Err(at(
            raw.name.span(),
            format!("job name `{}`: 1 to 64 letters, digits, '-', '_', '.'", raw.name.get_ref()),
        ));
    }
    let role = match &raw.role {
        Some(r) if r.get_ref() != "*" && !agora_sdk::resources::valid_role(r.get_ref()) => {
            return Err(at(r.span(), format!("invalid role `{}`", r.get_ref())))
        }
        Some(r) => r.get_ref().clone(),
        None => "*".into(),
    };
    let user = match &raw.user {
        Some(u) if u.get_ref().is_empty() || u.get_ref().len() > 64 => {
            return Err(at(u.span(), format!("invalid user `{}`: 1 to 64 characters", u.get_ref())))
        }
        Some(u) => Some(u.get_ref().clone()),
        None => None,
    };
    if raw.groups.is_empty() {
        return Err(FileError {
            file: file.into(),
            line: 1,
            why: "a job needs at least one [[group]]".into(),
        });
    }
    if raw.groups.len() > MAX_GROUPS {
        return Err(at(raw.groups[MAX_GROUPS].span(), format!("at most {MAX_GROUPS} groups")));
    }
    let mut groups: Vec<Group> = Vec::new();
    let mut total = 0u64;
    for g in &raw.groups {
        let span = g.span();
        let g = g.get_ref();
        let name = g.name.get_ref().clone();
        if !valid_name(&name) {
            return Err(at(
                g.name.span(),
                format!("group name `{name}`: 1 to 64 letters, digits, '-', '_', '.'"),
            ));
        }
        if groups.iter().any(|o| o.name == name) {
            return Err(at(g.name.span(), format!("group `{name}` is named twice")));
        }
        let count = *g.count.get_ref();
        total += u64::from(count);
        if count == 0 || total > MAX_TASKS {
            let span = if g.count.span().is_empty() { span.clone() } else { g.count.span() };
            return Err(at(
                span,
                format!("count {count}: each group 1 or more, at most {MAX_TASKS} tasks in a job"),
            ));
        }
        let cpus = *g.cpus.get_ref();
        if !(cpus.is_finite() && cpus > 0.0 && cpus <= 1024.0) {
            return Err(at(g.cpus.span(), format!("cpus {cpus}: a number above 0 (e.g. 0.5)")));
        }
        let mut spec = format!("cpus:{cpus};mem:{}", g.mem.get_ref());
        if let Some(d) = &g.disk {
            spec.push_str(&format!(";disk:{}", d.get_ref()));
        }
        let resources =
            Resources::parse(&spec).map_err(|e| at(g.mem.span(), format!("resources `{spec}`: {e}")))?;
        if resources.mem < (1 << 20) {
            return Err(at(
                g.mem.span(),
                format!("mem `{}` is below 1 MiB: say the unit (`32MiB`)", g.mem.get_ref()),
            ));
        }
        let env: Vec<(String, String)> = g.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let kind = match (&g.command, &g.wasm) {
            (Some(c), None) if c.get_ref().is_empty() => return Err(at(c.span(), "command is empty".into())),
            (Some(c), None) => {
                if g.fuel.is_some() || g.timeout.is_some() || !g.args.is_empty() {
                    return Err(at(span, "fuel, timeout and args are for Wasm groups (`wasm = ...`)".into()));
                }
                GroupKind::Command(c.get_ref().clone(), env)
            }
            (None, Some(w)) => {
                let module = base.join(w.get_ref());
                if !module.is_file() {
                    return Err(at(w.span(), format!("wasm module {} is not a file", module.display())));
                }
                let timeout = match &g.timeout {
                    Some(t) => Some(parse_duration(t.get_ref()).map_err(|e| at(t.span(), e.to_string()))?),
                    None => None,
                };
                GroupKind::Wasm { module, args: g.args.clone(), env, fuel: g.fuel, timeout }
            }
            (Some(_), Some(w)) => {
                return Err(at(w.span(), "a group has either `command` or `wasm`, not both".into()))
            }
            (None, None) => {
                return Err(at(span, format!("group `{name}` needs `command = [...]` or `wasm = \"FILE\"`")))
            }
        };
        let mut constraints = Vec::new();
        for c in &g.constraints {
            constraints.push(Constraint::parse(c.get_ref()).map_err(|why| at(c.span(), why))?);
        }
        let (attempts, delay) = match &g.restart {
            None => (0, Duration::ZERO),
            Some(r) => {
                let rf = r.get_ref();
                let delay = match &rf.delay {
                    Some(d) => parse_duration(d).map_err(|e| at(r.span(), e.to_string()))?,
                    None => Duration::from_secs(1),
                };
                if rf.attempts > MAX_ATTEMPTS || delay > MAX_DELAY {
                    return Err(at(
                        r.span(),
                        format!("restart: at most {MAX_ATTEMPTS} attempts, delay at most 1h"),
                    ));
                }
                (rf.attempts, delay)
            }
        };
        groups.push(Group { name, count, resources, kind, constraints, attempts, delay });
    }
    Ok(Job { name: raw.name.into_inner(), role, user, groups })
}

// ---------------------------------------------------------------------------------------------
// agora job run

/// One task to place: its group, its attempt (0 first) and what to launch.
#[derive(Clone, Debug)]
struct Pending {
    group: usize,
    index: u32,
    attempt: u32,
    info: TaskInfo,
}

struct JobScheduler {
    groups: Vec<Group>,
    pending: VecDeque<Pending>,
    /// Failed tasks waiting for their next attempt, with when it may start.
    delayed: Vec<(Instant, Pending)>,
    /// Launched and not ended.
    live: BTreeMap<TaskId, Pending>,
    finished: u64,
    failed: u64,
    retries: u64,
    total: u64,
    run_id: String,
    progress: ProgressBar,
    /// Tasks whose group's constraints no agent offered so far meets (said once).
    waiting_said: bool,
}

impl JobScheduler {
    fn task_id(&self, group: usize, index: u32, attempt: u32) -> TaskId {
        let g = &self.groups[group].name;
        if attempt == 0 {
            TaskId(format!("{g}-{}-{index}", self.run_id))
        } else {
            TaskId(format!("{g}-{}-{index}-r{attempt}", self.run_id))
        }
    }

    fn done(&self) -> bool {
        self.finished + self.failed == self.total
    }

    fn promote_due(&mut self) {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = self.delayed.drain(..).partition(|(at, _)| *at <= now);
        self.delayed = later;
        self.pending.extend(due.into_iter().map(|(_, p)| p));
    }

    fn ended(&mut self, driver: &Driver, status: &TaskStatus) {
        let Some(p) = self.live.remove(&status.task_id) else { return };
        let group = &self.groups[p.group];
        if status.state == TaskState::Finished {
            self.finished += 1;
            self.progress.inc(1);
        } else if status.state != TaskState::Killed && p.attempt < group.attempts {
            self.retries += 1;
            let attempt = p.attempt + 1;
            let mut next = p.clone();
            next.attempt = attempt;
            next.info.task_id = self.task_id(p.group, p.index, attempt);
            self.progress.println(format!(
                "{} {}: {} ({}); attempt {} of {} in {:?}",
                status.task_id,
                status.state,
                status.reason,
                status.message,
                attempt,
                group.attempts,
                group.delay
            ));
            self.delayed.push((Instant::now() + group.delay, next));
            let (driver, delay) = (driver.clone(), group.delay);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                driver.revive();
            });
        } else {
            self.failed += 1;
            self.progress.inc(1);
            self.progress.println(format!(
                "{} {}: {} {}",
                status.task_id, status.state, status.reason, status.message
            ));
        }
        self.progress.set_message(format!("{} finished, {} failed", self.finished, self.failed));
        if self.done() {
            driver.stop(true);
        }
    }
}

impl Scheduler for JobScheduler {
    async fn resource_offers(&mut self, driver: &Driver, offers: Vec<Offer>) {
        self.promote_due();
        for offer in offers {
            let mut left = offer.resources.clone();
            let mut launch = Vec::new();
            let mut keep = VecDeque::new();
            while let Some(p) = self.pending.pop_front() {
                let g = &self.groups[p.group];
                let fits = g.constraints.iter().all(|c| c.holds(&offer.attributes));
                match left.checked_sub(&g.resources).filter(|_| fits) {
                    Some(rest) => {
                        left = rest;
                        launch.push(p);
                    }
                    None => keep.push_back(p),
                }
            }
            self.pending = keep;
            if launch.is_empty() {
                driver.decline(vec![offer.id], Some(1.0));
                continue;
            }
            let infos = launch.iter().map(|p| p.info.clone()).collect();
            for p in launch {
                self.live.insert(p.info.task_id.clone(), p);
            }
            driver.launch(vec![offer.id], infos);
        }
        if !self.pending.is_empty() && self.live.is_empty() && self.delayed.is_empty() && !self.waiting_said {
            self.waiting_said = true;
            self.progress.println(format!(
                "waiting: {} task(s) fit no agent offered so far (resources or constraints)",
                self.pending.len()
            ));
        }
        if self.pending.is_empty() && self.delayed.is_empty() {
            driver.suppress();
        }
    }

    async fn status_update(&mut self, driver: &Driver, status: &TaskStatus) {
        if status.state.is_terminal() {
            self.ended(driver, status);
        }
    }

    async fn reregistered(&mut self, driver: &Driver, _framework_id: &FrameworkId) {
        let ids: Vec<TaskId> = self.live.keys().cloned().collect();
        driver.reconcile(ids);
    }
}

async fn run(cluster: &ClusterArgs, file: &Path) -> anyhow::Result<ExitCode> {
    let meta = std::fs::metadata(file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
    if meta.len() > MAX_FILE {
        anyhow::bail!("{}: larger than {MAX_FILE} bytes", file.display());
    }
    let text =
        std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
    let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let job = match parse_job(&file.display().to_string(), &text, &base) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("agora: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let cfg = cluster.resolve()?;
    let tls = cfg.identity(Role::Framework)?;
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let mut sched = JobScheduler {
        groups: job.groups.clone(),
        pending: VecDeque::new(),
        delayed: Vec::new(),
        live: BTreeMap::new(),
        finished: 0,
        failed: 0,
        retries: 0,
        total: job.groups.iter().map(|g| u64::from(g.count)).sum(),
        run_id,
        progress: ProgressBar::hidden(),
        waiting_said: false,
    };
    for (gi, g) in job.groups.iter().enumerate() {
        let kind = match &g.kind {
            GroupKind::Command(argv, env) => {
                TaskKind::Command(CommandInfo { argv: argv.clone(), shell: false, env: env.clone() })
            }
            GroupKind::Wasm { module, args, env, fuel, timeout } => {
                match upload_module(&cfg, &tls, module).await {
                    Ok(m) => {
                        let name =
                            module.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                        let mut argv = vec![name];
                        argv.extend(args.iter().cloned());
                        TaskKind::Wasm(Box::new(WasmInfo {
                            module: m,
                            args: argv,
                            env: env.clone(),
                            dirs: Vec::new(),
                            fuel: *fuel,
                            timeout: *timeout,
                        }))
                    }
                    Err(why) => {
                        eprintln!("agora: group {}: {why}", g.name);
                        return Ok(ExitCode::from(super::run::EXIT_NEVER_RAN));
                    }
                }
            }
        };
        for i in 0..g.count {
            let info = TaskInfo {
                task_id: sched.task_id(gi, i, 0),
                name: g.name.clone(),
                resources: g.resources.clone(),
                kind: kind.clone(),
                kill_grace: None,
                user: None,
            };
            sched.pending.push_back(Pending { group: gi, index: i, attempt: 0, info });
        }
    }
    let pb = ProgressBar::new(sched.total);
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} done  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    sched.progress = pb;
    let mut driver_cfg =
        DriverConfig::new(cfg.master.clone(), tls, format!("{FRAMEWORK_PREFIX}{}", job.name));
    driver_cfg.framework.role = job.role.clone();
    driver_cfg.framework.user = job.user.clone();
    driver_cfg.framework.failover_timeout = super::run::FAILOVER_TIMEOUT;
    let started = Instant::now();
    let result = tokio::select! {
        r = scheduler::run(driver_cfg, &mut sched) => r,
        _ = super::shutdown_signal() => {
            sched.progress.finish_and_clear();
            eprintln!("agora: interrupted; the job's tasks are killed when the master sees it leave");
            return Ok(ExitCode::from(130));
        }
    };
    sched.progress.finish_and_clear();
    result?;
    eprintln!(
        "job {}: {} finished, {} failed, {} retried, in {:.1?}",
        job.name,
        sched.finished,
        sched.failed,
        sched.retries,
        started.elapsed()
    );
    Ok(if sched.failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Uploads a group's module (WebAssembly text assembled first) to the master's store.
async fn upload_module(
    cfg: &agora_sdk::config::ClientConfig,
    tls: &agora_sdk::tls::TlsFiles,
    path: &Path,
) -> Result<ArtifactRef, String> {
    let mut search = agora_sdk::masters::MasterSearch::new(&cfg.master).map_err(|e| e.to_string())?;
    let session = search
        .connect_patiently(tls, Role::Framework)
        .await
        .map_err(|e| format!("cannot reach the master: {e}"))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let r = if path.extension().is_some_and(|e| e == "wat") {
        let bytes = wat::parse_file(path).map_err(|e| format!("{}: {e}", path.display()))?;
        agora_sdk::artifacts::upload_bytes(&session.conn, ArtifactKind::WasmModule, &name, &bytes).await
    } else {
        agora_sdk::artifacts::upload(&session.conn, ArtifactKind::WasmModule, &name, path).await
    };
    session.conn.close(0u32.into(), b"uploaded");
    r.map_err(|e| match e {
        agora_sdk::client::ClientError::Refused(w) => format!("the master refused {name}: {}", w.message),
        other => format!("cannot upload {name}: {other}"),
    })
}

// ---------------------------------------------------------------------------------------------
// agora job status / stop

/// The running frameworks of job `name`, and the tasks of each.
async fn job_tasks(client: &mut OperatorClient, name: &str) -> anyhow::Result<Vec<TaskView>> {
    let wanted = format!("{FRAMEWORK_PREFIX}{name}");
    let ids: Vec<FrameworkId> =
        client.frameworks().await?.into_iter().filter(|f| f.name == wanted).map(|f| f.id).collect();
    if ids.is_empty() {
        anyhow::bail!("no running job named {name}");
    }
    Ok(client.tasks().await?.into_iter().filter(|t| ids.contains(&t.framework_id)).collect())
}

async fn status(cluster: &ClusterArgs, name: &str, format: Format) -> anyhow::Result<ExitCode> {
    let mut client = OperatorClient::connect(&cluster.resolve()?).await?;
    let tasks = job_tasks(&mut client, name).await?;
    client.close();
    let mut by_group: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for t in &tasks {
        *by_group.entry(t.name.clone()).or_default().entry(t.state.to_string()).or_default() += 1;
    }
    match format {
        Format::Json => {
            let v = serde_json::json!({ "job": name, "groups": by_group });
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Format::Table => {
            println!("{:<20} STATES", "GROUP");
            for (g, states) in &by_group {
                let s: Vec<String> = states.iter().map(|(st, n)| format!("{st}={n}")).collect();
                println!("{g:<20} {}", s.join(" "));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn stop(cluster: &ClusterArgs, name: &str) -> anyhow::Result<ExitCode> {
    let mut client = OperatorClient::connect(&cluster.resolve()?).await?;
    let tasks = job_tasks(&mut client, name).await?;
    let mut killed = 0;
    for t in tasks.iter().filter(|t| !t.state.is_terminal()) {
        client.kill(&t.id).await?;
        killed += 1;
    }
    client.close();
    println!("job {name}: kill requested for {killed} task(s)");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Job, FileError> {
        parse_job("job.toml", text, Path::new("."))
    }

    #[test]
    fn the_issue_example_parses() {
        let job = parse(
            r#"
name = "nightly"
role = "etl"
[[group]]
name = "extract"
count = 3
cpus = 0.1
mem = "32MiB"
command = ["sh", "-c", "echo extracted"]
constraints = ["rack == r1", "blocks contains b17"]
restart = { attempts = 2, delay = "1s" }
"#,
        )
        .expect("parses");
        assert_eq!((job.name.as_str(), job.role.as_str()), ("nightly", "etl"));
        let g = &job.groups[0];
        assert_eq!((g.count, g.attempts, g.delay), (3, 2, Duration::from_secs(1)));
        assert_eq!(g.constraints.len(), 2);
    }

    #[test]
    fn the_example_job_file_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let text = std::fs::read_to_string(dir.join("job.toml")).expect("examples/job.toml");
        let job = parse_job("examples/job.toml", &text, &dir).expect("the example parses");
        assert_eq!((job.role.as_str(), job.groups.len()), ("*", 2));
    }

    #[test]
    fn bad_files_name_the_line() {
        let err = |text: &str| parse(text).expect_err("must be refused").to_string();
        let e = err("name = \"j\"\n[[group]]\nname = \"g\"\ncpus = 0.1\nmem = \"32MiB\"\ncommand = [\"true\"]\ncolour = 1\n");
        assert!(e.starts_with("job.toml:7:") && e.contains("colour"), "{e}");
        let e = err(
            "name = \"j\"\n[[group]]\nname = \"g\"\ncpus = \"lots\"\nmem = \"32MiB\"\ncommand = [\"true\"]\n",
        );
        assert!(e.starts_with("job.toml:4:"), "{e}");
        let e =
            err("name = \"j\"\n[[group]]\nname = \"g\"\ncpus = 0.1\nmem = \"64\"\ncommand = [\"true\"]\n");
        assert!(e.starts_with("job.toml:5:") && e.contains("did you mean `64MiB`"), "{e}");
        let e = err("name = \"j\"\n[[group]]\nname = \"g\"\ncpus = 0.1\nmem = \"32MiB\"\ncommand = [\"true\"]\nconstraints = [\"rack ~ r1\"]\n");
        assert!(e.starts_with("job.toml:7:") && e.contains("unknown operator"), "{e}");
        let e = err("name = \"j\"\n[[group]]\nname = \"g\"\ncpus = 0.1\nmem = \"32MiB\"\n");
        assert!(e.starts_with("job.toml:2:") && e.contains("needs `command"), "{e}");
        let e = err("name = \"j\"\n[[group]]\nname = \"g\"\ncpus = 0.1\nmem = \"32MiB\"\ncommand = [\"true\"]\nrestart = { attempts = 1000 }\n");
        assert!(e.starts_with("job.toml:7:") && e.contains("at most"), "{e}");
    }

    #[test]
    fn constraints_match_attributes() {
        let attrs = Attributes::parse("rack:r1;cores:8;blocks:{b17,b42};ports:[1-5]").expect("attributes");
        let holds = |c: &str| Constraint::parse(c).expect("constraint").holds(&attrs);
        assert!(holds("rack == r1") && !holds("rack == r2") && holds("rack != r2"));
        assert!(holds("cores == 8") && holds("blocks contains b17") && !holds("blocks contains b1"));
        assert!(holds("ports contains 3") && !holds("ports contains 9"));
        assert!(!holds("zone == a") && holds("zone != a"));
    }
}
