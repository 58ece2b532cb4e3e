//! `agora run`: a short-lived framework that runs one task (streaming its output and passing
//! its exit code through) or `--count N` tasks (with a progress bar and a summary).
//!
//! It follows the master across restarts and network blips: the driver subscribes again with
//! the run's framework id, the output streams resume at the byte offset already written (so
//! output is complete and not repeated), and tasks whose launch was lost go back in the queue.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use agora_sdk::proto::*;
use agora_sdk::resources::parse_milli;
use agora_sdk::scheduler::{self, Driver, DriverConfig, Scheduler};
use agora_sdk::units::{parse_duration, parse_size};
use agora_sdk::Resources;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::JoinHandle;

use super::run_output::{relay_output, sync_back};
use super::ClusterArgs;

/// How long `agora run` may lose the master (a restart, a partition) and still carry on.
pub const FAILOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the master keeps a detached run's framework (and so its tasks) once the CLI left:
/// a framework's tasks die with it, so a detached run asks for a long failover timeout. Its
/// tasks are killed if they still run after this long.
pub const DETACHED_FAILOVER_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long an interrupted run waits for its teardown to reach the master.
const TEARDOWN_WAIT: Duration = Duration::from_secs(5);

/// Exit code when the task never ran (ERROR, DROPPED, no agent fits it, …), as `docker run`
/// does.
pub const EXIT_NEVER_RAN: u8 = 125;
/// Exit code of a local or usage error (an unreadable file) and of a task that ran and was
/// then lost (its own exit code unknown): agora's own errors.
pub const EXIT_ERROR: u8 = 1;
/// Exit code of a Wasm task that ran and failed without an exit code of its own (a trap, or a
/// fuel, time or memory limit): 128 + SIGABRT, as `wasmtime run` exits on a trap.
pub const EXIT_WASM_FAILED: u8 = 134;

fn parse_dir(s: &str) -> Result<(std::path::PathBuf, String), String> {
    let (local, guest) = s.split_once("::").unwrap_or((s, s));
    if local.is_empty() {
        return Err(format!("invalid --dir `{s}`: expected LOCAL::GUEST"));
    }
    let guest = if guest.starts_with('/') { guest.to_string() } else { format!("/{guest}") };
    if guest.split('/').any(|p| p == "..") {
        return Err(format!("invalid --dir `{s}`: the guest path may not contain `..`"));
    }
    Ok((std::path::PathBuf::from(local), guest))
}

fn parse_fuel(s: &str) -> Result<u64, String> {
    let digits: String = s.chars().filter(|c| *c != '_').collect();
    match digits.parse::<u64>() {
        Ok(0) | Err(_) => Err(format!("invalid --fuel `{s}`: a positive whole number, e.g. 1000000")),
        Ok(v) => Ok(v),
    }
}

fn parse_cpus(s: &str) -> Result<u64, String> {
    match parse_milli(s) {
        Some(0) | None => {
            Err(format!("invalid --cpus `{s}`: a positive number with at most 3 decimals, e.g. 0.5"))
        }
        Some(v) => Ok(v),
    }
}

/// `--mem`: a size above zero (a task without memory would run without a memory limit; the
/// master refuses it too).
fn parse_mem(s: &str) -> Result<u64, String> {
    match parse_size(s) {
        Ok(0) => Err(format!("invalid --mem `{s}`: a task needs some memory, e.g. --mem 64MiB")),
        Ok(v) => Ok(v),
        Err(e) => Err(format!("invalid --mem `{s}`: {e}")),
    }
}

/// `--timeout`: above zero and at most the master's bound for Wasm timeouts.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    let max = agora_master::validate::MAX_WASM_TIMEOUT;
    match parse_duration(s) {
        Ok(d) if d.is_zero() => Err(format!("invalid --timeout `{s}`: a duration above zero, e.g. 30s")),
        Ok(d) if d > max => Err(format!("invalid --timeout `{s}`: at most {}s (one year)", max.as_secs())),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("invalid --timeout `{s}`: {e}")),
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
    #[arg(long, default_value = "64MiB", value_parser = parse_mem)]
    mem: u64,
    /// Disk per task.
    #[arg(long, value_parser = parse_size)]
    disk: Option<u64>,
    /// Number of tasks.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    count: u32,
    /// Print the task id (one per line with --count) on stdout and exit 0 once every task is
    /// RUNNING (or already ended); the tasks keep running. The run's framework stays
    /// registered, disconnected, for 7 days (its failover timeout): tasks still running then
    /// are killed. Stop them sooner with `agora kill`.
    #[arg(long, short = 'd')]
    detach: bool,
    /// Do not print the task id on stderr.
    #[arg(long, short = 'q')]
    quiet: bool,
    /// Task name (default: the program's name).
    #[arg(long)]
    name: Option<String>,
    /// Role of this run's framework.
    #[arg(long, default_value = "*")]
    role: String,
    /// OS user the task runs as on its agent (native commands; must exist there and not be
    /// root; the master's ACLs may restrict it). Default: the agent's --task-user.
    #[arg(long)]
    user: Option<String>,
    /// Environment variable for the task (repeatable).
    #[arg(long = "env", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Run the words after `--` as one `/bin/sh -c` script.
    #[arg(long, conflicts_with = "wasm")]
    shell: bool,
    /// Run this WebAssembly module (a WASI preview 1 command or a WASI 0.2 command component)
    /// instead of a native command; the words after `--` are its arguments.
    #[arg(long, value_name = "FILE")]
    wasm: Option<std::path::PathBuf>,
    /// Ship a local directory with a Wasm task and preopen it at GUEST (repeatable).
    #[arg(long = "dir", value_name = "LOCAL::GUEST", value_parser = parse_dir, requires = "wasm")]
    dirs: Vec<(std::path::PathBuf, String)>,
    /// When the Wasm task ends, copy what is in each `--dir` back into its LOCAL directory
    /// (files written or changed by the task; links and special files are skipped).
    #[arg(long, requires = "dirs", conflicts_with_all = ["count", "detach"])]
    sync_back: bool,
    /// Total fuel a Wasm task may burn (about one unit per instruction); it fails with
    /// `fuel exhausted` when spent.
    #[arg(long, value_parser = parse_fuel, requires = "wasm")]
    fuel: Option<u64>,
    /// Wall-time limit of a Wasm task (e.g. 30s); it fails with `timeout` when reached.
    #[arg(long, value_parser = parse_timeout, requires = "wasm")]
    timeout: Option<Duration>,
    /// The command and its arguments (with --wasm: the module's arguments).
    #[arg(last = true, required_unless_present = "wasm")]
    command: Vec<String>,
}

impl RunCommand {
    pub async fn execute(self) -> anyhow::Result<ExitCode> {
        let mut steps = super::run_steps::Steps::from_env();
        let cfg = self.cluster.resolve()?;
        let tls = cfg.identity(Role::Framework)?;
        let program = match &self.wasm {
            Some(path) => path.display().to_string(),
            // With --shell the words make one script: its first word names the task.
            None if self.shell => self.command.join(" "),
            None => self.command.first().cloned().unwrap_or_default(),
        };
        let name = self.name.clone().unwrap_or_else(|| id_word(&program));
        let id_base = id_word(&name);
        let argv = if self.shell { vec![self.command.join(" ")] } else { self.command.clone() };
        let resources =
            Resources { cpus: self.cpus, mem: self.mem, disk: self.disk.unwrap_or(0), ..Default::default() };
        let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
        let kind = match &self.wasm {
            None => TaskKind::Command(CommandInfo { argv, shell: self.shell, env: self.env.clone() }),
            Some(path) => match self.wasm_task(&cfg, &tls, path, &name).await {
                Ok(info) => TaskKind::Wasm(Box::new(info)),
                Err(e) => {
                    eprintln!("agora: {e}");
                    return Ok(ExitCode::from(e.exit_code()));
                }
            },
        };
        if self.wasm.is_some() {
            steps.mark("uploaded");
        }
        let tasks: VecDeque<TaskInfo> = (0..self.count)
            .map(|i| TaskInfo {
                task_id: TaskId(if self.count == 1 {
                    format!("{id_base}-{run_id}")
                } else {
                    format!("{id_base}-{run_id}-{i}")
                }),
                name: name.clone(),
                resources: resources.clone(),
                kind: kind.clone(),
                kill_grace: None,
                user: None,
            })
            .collect();
        if let Some(why) = unschedulable(&cfg, &resources).await? {
            eprintln!("agora: {why}");
            return Ok(ExitCode::from(EXIT_NEVER_RAN));
        }
        steps.mark("capacity checked");
        let ids: Vec<TaskId> = tasks.iter().map(|t| t.task_id.clone()).collect();
        if !self.quiet && !self.detach {
            eprintln!("agora: {}", describe_ids(&ids));
        }
        let mut driver_cfg = DriverConfig::new(cfg.master.clone(), tls, format!("agora-run {name}"));
        driver_cfg.framework.role = self.role.clone();
        driver_cfg.framework.user = self.user.clone();
        // How long the run may be cut off from the master before giving up (the master keeps
        // its tasks as long, so a run that died leaves them behind for this long). A detached
        // run leaves on purpose: its tasks must outlive it, so the master keeps it far longer.
        driver_cfg.framework.failover_timeout =
            if self.detach { DETACHED_FAILOVER_TIMEOUT } else { FAILOVER_TIMEOUT };
        // State the demand with the subscription, so offers are sized to these tasks.
        driver_cfg.demand = Some(vec![Demand { resources: resources.clone(), count: self.count }]);
        driver_cfg.demand_task_ids = vec![ids.clone()];
        let single = self.count == 1;
        let progress = if single || self.detach {
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
        let driver_handle: Arc<OnceLock<Driver>> = Arc::new(OnceLock::new());
        // The tasks still waiting for resources, for the line that says why they wait.
        let (waiting_tx, waiting_rx) = tokio::sync::watch::channel(ids.clone());
        let notice = (!self.quiet).then(|| {
            tokio::spawn(say_why_waiting(cfg.clone(), resources.clone(), waiting_rx, progress.clone()))
        });
        let mut sched = RunScheduler {
            shape: resources.clone(),
            pending: tasks,
            launched: BTreeMap::new(),
            wasm: self.wasm.is_some(),
            total: self.count as usize,
            states: BTreeMap::new(),
            finals: BTreeMap::new(),
            single,
            streams: Vec::new(),
            progress,
            started: Instant::now(),
            running_at: None,
            ran: BTreeSet::new(),
            detach: self.detach,
            detached: false,
            driver: driver_handle.clone(),
            sync_back: if self.sync_back { self.dirs.clone() } else { Vec::new() },
            waiting: waiting_tx,
            steps,
        };
        let result = {
            let run = scheduler::run(driver_cfg, &mut sched);
            tokio::pin!(run);
            tokio::select! {
                r = &mut run => r,
                code = interrupted() => {
                    // Tear the framework down (its tasks killed with the reason) rather than leave
                    // the tasks behind for the failover timeout.
                    match driver_handle.get() {
                        Some(driver) => {
                            // Cut off from the master (failing over), the teardown cannot go out.
                            let reachable = driver.connection().is_some();
                            driver.stop_because(Reason::RunInterrupted);
                            tokio::select! {
                                _ = tokio::time::timeout(TEARDOWN_WAIT, &mut run) => {}
                                _ = interrupted() => {}
                            }
                            if reachable {
                                eprintln!("agora: interrupted: the run's tasks are killed ({})", Reason::RunInterrupted);
                            } else {
                                eprintln!(
                                    "agora: interrupted while the master is out of reach: it kills the run's \
                                     tasks once the run's failover timeout ({}s) passes",
                                    if self.detach { DETACHED_FAILOVER_TIMEOUT } else { FAILOVER_TIMEOUT }.as_secs()
                                );
                            }
                        }
                        None => eprintln!("agora: interrupted before any task was launched"),
                    }
                    return Ok(ExitCode::from(code));
                }
            }
        };
        if let Some(n) = notice {
            n.abort();
        }
        result?;
        if self.detach {
            for id in &ids {
                println!("{id}");
            }
        }
        sched.steps.mark("torn down");
        for s in sched.streams.drain(..) {
            let _ = s.await;
        }
        if let Some(pb) = &sched.progress {
            pb.finish_and_clear();
        }
        if let Some(line) = sched.steps.line() {
            eprintln!("{line}");
        }
        Ok(sched.exit_code())
    }
}

impl RunCommand {
    /// Uploads the module and any shipped directories to the master's artifact store; the
    /// error is the one line the user sees (the master names what is wrong with a module).
    async fn wasm_task(
        &self,
        cfg: &agora_sdk::config::ClientConfig,
        tls: &agora_sdk::tls::TlsFiles,
        path: &std::path::Path,
        name: &str,
    ) -> Result<WasmInfo, WasmTaskError> {
        use WasmTaskError::{Local, Remote};
        let meta =
            std::fs::metadata(path).map_err(|e| Local(format!("cannot read {}: {e}", path.display())))?;
        if !meta.is_file() {
            return Err(Local(format!("{} is not a file", path.display())));
        }
        let mut packed = Vec::new();
        for (local, guest) in &self.dirs {
            let local = local.clone();
            let archive = tokio::task::spawn_blocking(move || pack_dir(&local))
                .await
                .map_err(|e| Local(e.to_string()))?
                .map_err(Local)?;
            packed.push((archive, guest.clone()));
        }
        let mut search =
            agora_sdk::masters::MasterSearch::new(&cfg.master).map_err(|e| Local(e.to_string()))?;
        let session = search
            .connect_patiently(tls, Role::Framework)
            .await
            .map_err(|e| Local(format!("cannot reach the master at {}: {e}", cfg.master)))?;
        let conn = session.conn.clone();
        let file_name =
            path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| name.into());
        let module = if path.extension().is_some_and(|e| e == "wat") {
            // WebAssembly text, as `wasmtime run` takes it: assembled here, checked by the master.
            let bytes = wat::parse_file(path).map_err(|e| Local(format!("{}: {e}", path.display())))?;
            agora_sdk::artifacts::upload_bytes(&conn, ArtifactKind::WasmModule, &file_name, &bytes).await
        } else {
            agora_sdk::artifacts::upload(&conn, ArtifactKind::WasmModule, &file_name, path).await
        }
        .map_err(|e| Remote(upload_error(&file_name, e)))?;
        let mut dirs = Vec::new();
        for (archive, guest) in &packed {
            let label = format!("--dir {guest}");
            let r = agora_sdk::artifacts::upload(&conn, ArtifactKind::Archive, &label, archive.path())
                .await
                .map_err(|e| Remote(upload_error(&label, e)))?;
            dirs.push(DirMount { archive: r, guest: guest.clone() });
        }
        conn.close(0u32.into(), b"uploaded");
        // The close goes out at once; its draining period (three probe timeouts, ~85 ms on
        // loopback) runs beside the task's own connection instead of before it.
        tokio::spawn(async move { session.endpoint.wait_idle().await });
        let mut args = vec![file_name];
        args.extend(self.command.iter().cloned());
        Ok(WasmInfo { module, args, env: self.env.clone(), dirs, fuel: self.fuel, timeout: self.timeout })
    }
}

/// Why a Wasm task could not be prepared.
#[derive(Debug, thiserror::Error)]
enum WasmTaskError {
    /// Here: a file, a directory, the master unreachable: exits [`EXIT_ERROR`], as any error
    /// of agora's own.
    #[error("{0}")]
    Local(String),
    /// The master refused the module or an archive (or the upload broke): the task never ran.
    #[error("{0}")]
    Remote(String),
}

impl WasmTaskError {
    fn exit_code(&self) -> u8 {
        match self {
            WasmTaskError::Local(_) => EXIT_ERROR,
            WasmTaskError::Remote(_) => EXIT_NEVER_RAN,
        }
    }
}

/// The word a task id is made of: the first word of `name` (a program, a script, a module's
/// path) up to anything but letters, digits, `.`, `_`, `-` and `/` (a shell script's spaces
/// and metacharacters do not belong in an id), its last path component, at most 40
/// characters; `task` if nothing is left.
fn id_word(name: &str) -> String {
    let word_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/');
    let word: String =
        name.trim_start_matches(|c: char| !word_char(c)).chars().take_while(|c| word_char(*c)).collect();
    let base = word.rsplit('/').next().unwrap_or("").trim_start_matches(['.', '-']);
    if base.is_empty() {
        "task".into()
    } else {
        base.chars().take(40).collect()
    }
}

/// The run's task ids in one line: `task ID`, or `N tasks FIRST … LAST`.
fn describe_ids(ids: &[TaskId]) -> String {
    match ids {
        [one] => format!("task {one}"),
        [first, .., last] => format!("{} tasks {first} … {last}", ids.len()),
        [] => "no task".into(),
    }
}

/// Waits for SIGINT (Ctrl-C) or SIGTERM and returns the exit code a shell gives a command
/// ended by it: 130 or 143.
async fn interrupted() -> u8 {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
    else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => 128 + libc::SIGINT as u8,
        _ = term.recv() => 128 + libc::SIGTERM as u8,
    }
}

fn upload_error(what: &str, e: agora_sdk::client::ClientError) -> String {
    match e {
        agora_sdk::client::ClientError::Refused(w) => format!("the master refused {what}: {}", w.message),
        other => format!("cannot upload {what}: {other}"),
    }
}

/// Whether the task ended of its own doing (its exit, or a signal from within), not by the
/// cluster (a kill, a lost agent) or a limit (memory, processes).
fn ended_by_itself(st: &TaskStatus) -> bool {
    st.state == TaskState::Finished
        || matches!(
            st.reason,
            Reason::None | Reason::CommandExited | Reason::KilledBySignal | Reason::ModuleExited
        )
}

/// `task ID STATE: reason: message`, one line.
fn ended_line(st: &TaskStatus) -> String {
    format!(
        "task {} {}: {}{}",
        st.task_id,
        st.state,
        st.reason,
        if st.message.is_empty() { String::new() } else { format!(": {}", st.message) }
    )
}

/// Packs a local directory into a temporary tar archive (regular files and directories; links
/// are not followed, so nothing outside the directory is shipped).
fn pack_dir(local: &std::path::Path) -> Result<tempfile::NamedTempFile, String> {
    let meta = std::fs::metadata(local).map_err(|e| format!("--dir {}: {e}", local.display()))?;
    if !meta.is_dir() {
        return Err(format!("--dir {}: not a directory", local.display()));
    }
    let file = tempfile::NamedTempFile::new().map_err(|e| format!("cannot create a temporary file: {e}"))?;
    let mut builder = tar::Builder::new(std::io::BufWriter::new(file.reopen().map_err(|e| e.to_string())?));
    builder.follow_symlinks(false);
    builder.append_dir_all(".", local).map_err(|e| format!("cannot pack --dir {}: {e}", local.display()))?;
    builder
        .into_inner()
        .and_then(|mut w| std::io::Write::flush(&mut w))
        .map_err(|e| format!("cannot pack --dir {}: {e}", local.display()))?;
    Ok(file)
}

/// Says why no agent could ever run a task of this size, when the operator view is at hand
/// (a task that cannot fit would otherwise wait for offers forever).
async fn unschedulable(
    cfg: &agora_sdk::config::ClientConfig,
    need: &Resources,
) -> Result<Option<String>, agora_sdk::client::ClientError> {
    // Listing agents is open to a framework certificate too (a client.toml without
    // `[operator]` opens an operator session restricted to its own principal).
    if cfg.operator.is_none() && cfg.framework.is_none() {
        return Ok(None);
    }
    let mut client = agora_sdk::client::OperatorClient::connect(cfg).await?;
    let agents = client.agents().await?;
    client.close();
    let active: Vec<_> = agents.iter().filter(|a| a.status == AgentViewStatus::Active).collect();
    if active.is_empty() || active.iter().any(|a| a.resources.contains(need)) {
        return Ok(None);
    }
    let largest: Vec<String> =
        active.iter().take(3).map(|a| format!("{} has {}", a.hostname, a.resources)).collect();
    Ok(Some(format!("no agent can ever fit a task of {need} ({})", largest.join("; "))))
}

/// How long tasks wait for resources before the run says why (once, and again when the
/// reason changes).
const WAITING_NOTICE: Duration = Duration::from_secs(2);

/// Says on stderr why the run's tasks wait, once they waited [`WAITING_NOTICE`] with no
/// launch: the master's reason (`waiting: needs cpus:0.5, largest free cpus:0.2`) when the
/// master can be asked, else what they need. Again only when the reason changes.
async fn say_why_waiting(
    cfg: agora_sdk::config::ClientConfig,
    shape: Resources,
    mut waiting: tokio::sync::watch::Receiver<Vec<TaskId>>,
    progress: Option<ProgressBar>,
) {
    let mut said = String::new();
    loop {
        let ids = waiting.borrow_and_update().clone();
        if ids.is_empty() {
            // Everything launched: wait for a task to queue again (a lost launch).
            if waiting.changed().await.is_err() {
                return;
            }
            continue;
        }
        // Restart the wait whenever tasks launch.
        match tokio::time::timeout(WAITING_NOTICE, waiting.changed()).await {
            Ok(Ok(())) => continue,
            Ok(Err(_)) => return,
            Err(_) => {}
        }
        let line = match waiting_reason(&cfg, &ids).await {
            Some(reason) => reason,
            None => format!("waiting: needs {shape} per task; no offer fits yet"),
        };
        if line != said {
            let text = format!(
                "agora: {} {line}",
                if ids.len() == 1 { format!("task {}", ids[0]) } else { format!("{} tasks", ids.len()) }
            );
            match &progress {
                Some(pb) => pb.println(text),
                None => eprintln!("{text}"),
            }
            said = line;
        }
    }
}

/// The master's reason one of `ids` waits (an operator session, opened with the framework's
/// certificate when the client has no operator's: it sees its own principal's tasks).
async fn waiting_reason(cfg: &agora_sdk::config::ClientConfig, ids: &[TaskId]) -> Option<String> {
    let mut client = agora_sdk::client::OperatorClient::connect(cfg).await.ok()?;
    let pending = client.pending_tasks().await;
    client.close();
    let pending = pending.ok()?;
    pending.into_iter().find(|p| p.task_id.as_ref().is_some_and(|t| ids.contains(t))).map(|p| p.reason)
}

struct RunScheduler {
    /// Every task's resources (the demand's shape).
    shape: Resources,
    pending: VecDeque<TaskInfo>,
    /// Tasks sent to the master and not yet known to have started: put back in `pending` when
    /// their launch turns out lost (dropped while disconnected, void offer, unknown).
    launched: BTreeMap<TaskId, TaskInfo>,
    /// Wasm tasks: a failure without an exit code (trap, limit) exits [`EXIT_WASM_FAILED`].
    wasm: bool,
    total: usize,
    states: BTreeMap<TaskId, TaskState>,
    finals: BTreeMap<TaskId, TaskStatus>,
    single: bool,
    streams: Vec<JoinHandle<()>>,
    progress: Option<ProgressBar>,
    started: Instant,
    running_at: Option<Instant>,
    /// Tasks seen RUNNING: one lost later ran (its exit code is unknown, but it was no
    /// launch failure).
    ran: BTreeSet<TaskId>,
    /// `--detach`: leave once every task runs (or ended).
    detach: bool,
    detached: bool,
    /// The driver, once subscribed, for an interrupted run's teardown.
    driver: Arc<OnceLock<Driver>>,
    /// `--sync-back`: the `--dir`s to copy back from the task's sandbox when it ends.
    sync_back: Vec<(std::path::PathBuf, String)>,
    /// The ids of `pending`, for [`say_why_waiting`].
    waiting: tokio::sync::watch::Sender<Vec<TaskId>>,
    /// Step times (`AGORA_RUN_STEPS`).
    steps: super::run_steps::Steps,
}

impl RunScheduler {
    /// Tells the master how many tasks still wait for resources.
    fn state_demand(&self, driver: &Driver) {
        let count = u32::try_from(self.pending.len()).unwrap_or(u32::MAX);
        let ids: Vec<TaskId> = self.pending.iter().map(|t| t.task_id.clone()).collect();
        self.waiting.send_replace(ids.clone());
        if count == 0 {
            driver.request(Vec::new());
        } else {
            // Named, so that operators see them pending (`agora tasks`) with why they wait.
            driver.request_tasks(vec![Demand { resources: self.shape.clone(), count }], vec![ids]);
        }
    }

    fn start_streams(&mut self, driver: &Driver, task_id: &TaskId, follow: bool) {
        for which in [OutputStream::Stdout, OutputStream::Stderr] {
            self.streams.push(tokio::spawn(relay_output(driver.clone(), task_id.clone(), which, follow)));
        }
    }

    /// Puts a task whose launch was lost back at the front of the queue and asks for offers.
    fn requeue(&mut self, driver: &Driver, task_id: &TaskId) -> bool {
        let Some(info) = self.launched.remove(task_id) else { return false };
        tracing::info!(%task_id, "the task's launch was lost; launching it again");
        self.states.remove(task_id);
        self.pending.push_front(info);
        self.state_demand(driver);
        driver.revive();
        true
    }

    /// With `--detach`: once every task runs or ended, leave without a teardown (the tasks
    /// keep running; the master keeps the framework for [`DETACHED_FAILOVER_TIMEOUT`]). When
    /// they all ended, the usual end of the run applies.
    fn maybe_detach(&mut self, driver: &Driver, status: &TaskStatus) {
        if !self.detach || self.detached || !self.pending.is_empty() || !self.launched.is_empty() {
            return;
        }
        if self.finals.len() == self.total || self.states.len() < self.total {
            return;
        }
        let all_started =
            self.states.iter().all(|(id, s)| *s == TaskState::Running || self.finals.contains_key(id));
        if all_started {
            self.detached = true;
            driver.acknowledge(status);
            driver.stop(false);
        }
    }

    /// One line on stderr when the cluster or a limit (not the task itself) ended the task:
    /// its exit code or signal alone does not say (a memory limit's OOM kill is signal 9).
    fn say_why(st: &TaskStatus) {
        if !ended_by_itself(st) {
            eprintln!("agora: {}", ended_line(st));
        }
    }

    fn exit_code(&self) -> ExitCode {
        if self.detach && self.detached {
            let failed = self.finals.values().filter(|s| s.state != TaskState::Finished).count();
            for st in self.finals.values().filter(|s| s.state != TaskState::Finished) {
                eprintln!("agora: {}", ended_line(st));
            }
            return if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(EXIT_ERROR) };
        }
        if self.single {
            let Some(st) = self.finals.values().next() else {
                eprintln!("agora: the task did not finish");
                return ExitCode::from(EXIT_NEVER_RAN);
            };
            return match st.state {
                TaskState::Finished => ExitCode::SUCCESS,
                TaskState::Failed | TaskState::Killed if st.exit_code.is_some() || st.signal.is_some() => {
                    Self::say_why(st);
                    if let Some(sig) = st.signal {
                        ExitCode::from((128 + sig.clamp(0, 127)) as u8)
                    } else {
                        ExitCode::from(st.exit_code.unwrap_or(1).clamp(0, 255) as u8)
                    }
                }
                _ => {
                    eprintln!("agora: {}", ended_line(st));
                    let limit_or_trap = matches!(
                        st.reason,
                        Reason::Trap | Reason::FuelExhausted | Reason::Timeout | Reason::MemoryLimitExceeded
                    );
                    ExitCode::from(match st.state {
                        TaskState::Killed => 137,
                        TaskState::Failed if self.wasm && limit_or_trap => EXIT_WASM_FAILED,
                        // Lost, gone, unknown after it ran: no launch failure, an error.
                        _ if self.ran.contains(&st.task_id) => EXIT_ERROR,
                        _ => EXIT_NEVER_RAN,
                    })
                }
            };
        }
        let mut by_state: BTreeMap<&'static str, usize> = BTreeMap::new();
        let mut codes: BTreeMap<String, usize> = BTreeMap::new();
        for st in self.finals.values() {
            *by_state.entry(st.state.as_str()).or_default() += 1;
            if st.state != TaskState::Finished {
                // The cluster's or a limit's reason when there is one: a memory limit's
                // OOM kill is no plain `signal 9`.
                let k = match (st.exit_code, st.signal) {
                    _ if !ended_by_itself(st) => st.reason.to_string(),
                    (_, Some(s)) => format!("signal {s}"),
                    (Some(c), _) => format!("exit {c}"),
                    _ => st.reason.to_string(),
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
        self.steps.mark("first offer");
        let before = self.pending.len();
        for offer in offers {
            let batch = scheduler::take_fitting(&offer.resources, &mut self.pending);
            for t in &batch {
                self.states.insert(t.task_id.clone(), TaskState::Staging);
                self.launched.insert(t.task_id.clone(), t.clone());
            }
            if batch.is_empty() {
                driver.decline(vec![offer.id], Some(if self.pending.is_empty() { 60.0 } else { 1.0 }));
            } else {
                driver.launch(vec![offer.id], batch);
                self.steps.mark("launched");
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

    async fn reregistered(&mut self, driver: &Driver, _framework_id: &FrameworkId) {
        // The implicit reconciliation covers the tasks the master knows; ask for the others
        // too (a launch lost with the connection comes back TASK_UNKNOWN and is retried).
        let live: Vec<TaskId> = self
            .states
            .iter()
            .filter(|(id, s)| !s.is_terminal() && !self.finals.contains_key(*id))
            .map(|(id, _)| id.clone())
            .collect();
        if !live.is_empty() {
            driver.reconcile(live);
        }
    }

    async fn status_update(&mut self, driver: &Driver, status: &TaskStatus) {
        if self.finals.contains_key(&status.task_id) {
            // A reconciliation answer for a task already done.
            return;
        }
        let lost_launch = match status.state {
            TaskState::Dropped => {
                matches!(status.reason, Reason::MasterDisconnected | Reason::OfferNoLongerValid)
            }
            TaskState::Unknown => true,
            _ => false,
        };
        if lost_launch && self.requeue(driver, &status.task_id) {
            return;
        }
        if status.state != TaskState::Staging {
            self.launched.remove(&status.task_id);
        }
        let prev = self.states.insert(status.task_id.clone(), status.state);
        if status.state == TaskState::Running {
            self.ran.insert(status.task_id.clone());
            self.steps.mark("running");
        }
        if self.single
            && !self.detach
            && status.state == TaskState::Running
            && prev != Some(TaskState::Running)
            && self.streams.is_empty()
        {
            self.running_at = Some(Instant::now());
            self.start_streams(driver, &status.task_id.clone(), true);
        }
        // UNKNOWN for a task that had started: the master lost it for good.
        let ended = status.state.is_terminal() || status.state == TaskState::Unknown;
        if ended && !self.finals.contains_key(&status.task_id) {
            if self.single && !self.detach && self.streams.is_empty() && status.exit_code.is_some() {
                // Finished before we saw it running: read what it wrote.
                self.start_streams(driver, &status.task_id.clone(), false);
            }
            self.finals.insert(status.task_id.clone(), status.clone());
            if self.finals.len() == self.total {
                self.steps.mark("ended");
            }
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
                // Keep the connection until the output streams have drained; a task lost with
                // its agent has no output left to read (the streams would only retry).
                let streams = std::mem::take(&mut self.streams);
                let lost = matches!(status.state, TaskState::Lost | TaskState::Gone | TaskState::Unknown);
                let d = driver.clone();
                // Copied back while the run's framework is still subscribed (it may read its
                // own tasks' sandboxes, and the task's sandbox is still there).
                let sync = if lost { Vec::new() } else { std::mem::take(&mut self.sync_back) };
                let task = status.task_id.clone();
                tokio::spawn(async move {
                    for s in streams {
                        if lost {
                            s.abort();
                        }
                        let _ = s.await;
                    }
                    for (local, guest) in &sync {
                        let remote = format!("mnt/{}", guest.trim_start_matches('/'));
                        match sync_back(&d, &task, &remote, local).await {
                            Ok((files, bytes)) => eprintln!(
                                "agora: --sync-back {guest}: {files} file(s), {bytes} bytes into {}",
                                local.display()
                            ),
                            Err(e) => eprintln!("agora: --sync-back {guest}: {e}"),
                        }
                    }
                    d.stop(false);
                });
            }
        }
        if status.state == TaskState::Unreachable {
            tracing::warn!(task_id = %status.task_id, "task unreachable: its agent stopped answering");
        }
        self.maybe_detach(driver, status);
    }

    async fn registered(&mut self, driver: &Driver, _framework_id: &FrameworkId) {
        self.steps.mark("subscribed");
        let _ = self.driver.set(driver.clone());
    }

    async fn error(&mut self, driver: &Driver, error: &WireError) {
        eprintln!("agora: the master reported: {}", error.message);
        let _ = driver;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_made_of_the_names_first_word() {
        assert_eq!(id_word("echo hi; exit 3"), "echo");
        assert_eq!(id_word("/bin/true;ls *"), "true");
        assert_eq!(id_word("  (cd /tmp && make)"), "cd");
        assert_eq!(id_word("examples/wasm/hello.wat"), "hello.wat");
        assert_eq!(id_word("'$(rm -rf /)'"), "rm");
        assert_eq!(id_word("dir/"), "task");
        assert_eq!(id_word("../.hidden"), "hidden");
        assert_eq!(id_word(""), "task");
        assert_eq!(id_word(&"x".repeat(100)).len(), 40);
    }

    #[test]
    fn zero_sized_tasks_and_unbounded_timeouts_are_refused_with_a_hint() {
        let e = parse_mem("0").unwrap_err();
        assert!(e.contains("--mem 64MiB"), "{e}");
        assert_eq!(parse_mem("64MiB"), Ok(64 << 20));
        assert!(parse_cpus("0").unwrap_err().contains("e.g. 0.5"));
        assert!(parse_cpus("0.000").is_err());
        assert!(parse_timeout("0s").unwrap_err().contains("above zero"));
        assert!(parse_timeout("3000000000s").unwrap_err().contains("one year"));
        assert_eq!(parse_timeout("30s"), Ok(Duration::from_secs(30)));
    }
}
