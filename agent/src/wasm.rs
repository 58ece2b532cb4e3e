//! Wasm tasks: the agent side of the built-in Wasm executor (DESIGN.md §6).
//!
//! A Wasm task's supervisor ([`launch`]) prepares its sandbox, fetches the module (and any
//! shipped directories) from the master's artifact store by digest into the agent's artifact
//! cache (`WORK/artifacts/sha256/<hex>`, fetched once per agent however many tasks ask at the
//! same time), then hands the task to the [`ExecutorManager`]. The manager runs one
//! `agora executor-wasm` process per framework, started on first use, each in a cgroup sized to
//! the sum of its tasks (plus [`EXECUTOR_OVERHEAD_MEM`] for the runtime itself), and talks to it
//! over a Unix-domain socket with the executor protocol ([`agora_sdk::executor`]). Launches that
//! arrive together go to the executor in one frame. An executor without tasks for
//! [`WasmConfig::idle_timeout`] is told to shut down; the agent decides, so a launch never races
//! an executor's exit. An executor that dies fails its tasks with `executor terminated` and the
//! tail of its log.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agora_sdk::executor_proto::{
    AgentToExecutor, CommandLaunch, ExecutorMessage, ExecutorUpdate, WasmLaunch, ENV_AGENT_ID,
    ENV_EXECUTOR_ID, ENV_FRAMEWORK_ID, ENV_SANDBOX, ENV_SOCKET, EXECUTOR_PROTOCOL_VERSION, MAX_MESSAGE_LEN,
    MAX_REASON_LEN,
};
use agora_sdk::frame::{FrameError, FrameReader, FrameWriter, MAX_FRAME};
use agora_sdk::proto::{
    AgentId, Digest, ExecutorId, ExecutorInfo, FetchInfo, FrameworkId, TaskId, TaskInfo, TaskKind, TaskState,
    WasmInfo, COMMAND_EXECUTOR_ID, WASM_EXECUTOR_ID,
};
use agora_sdk::Resources;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch, OnceCell};
use tokio::time::Instant;

use crate::cgroups::{Cgroup, Isolator};
use crate::sandbox::Layout;
use crate::tasks::{EventSender, LaunchSpec, TaskEvent, TaskHandle, TaskKey, Termination};

/// Memory the executor process itself may use on top of its tasks' (engine, compiler, I/O).
pub const EXECUTOR_OVERHEAD_MEM: u64 = 128 << 20;
/// CPU the executor is given on top of its tasks', millicores.
pub const EXECUTOR_OVERHEAD_CPU: u64 = 100;
/// Largest artifact the agent fetches.
pub const MAX_FETCH_BYTES: u64 = 1 << 30;
/// How long a starting executor has to connect and say hello.
const EXECUTOR_START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the agent waits for a connection to the master before failing a fetch.
const FETCH_CONNECT_WAIT: Duration = Duration::from_secs(15);
/// Reason of tasks whose executor died under them.
pub const REASON_EXECUTOR_TERMINATED: &str = "executor terminated";
/// Reason of tasks whose module or directories could not be fetched or unpacked.
pub const REASON_FETCH_FAILED: &str = "fetch failed";

/// How the agent runs Wasm tasks.
#[derive(Clone, Debug)]
pub struct WasmConfig {
    /// The `agora` binary to start as `agora executor-wasm`; `None` uses the running program
    /// (right for `agora agent` and `agora dev`; tests set the built binary).
    pub executor_program: Option<PathBuf>,
    /// An executor without tasks for this long is shut down.
    pub idle_timeout: Duration,
    /// Tasks one executor runs at once (the rest wait inside it for a slot).
    pub max_tasks_per_executor: u32,
    /// Worker threads of each executor.
    pub executor_threads: u32,
    /// Who each framework's executors and tasks run as (the task user with the framework's
    /// group); `None`: the agent's own user.
    pub task_groups: Option<Arc<crate::user::TaskGroups>>,
}

impl Default for WasmConfig {
    fn default() -> Self {
        Self {
            executor_program: None,
            idle_timeout: Duration::from_secs(30),
            max_tasks_per_executor: 256,
            executor_threads: 2,
            task_groups: None,
        }
    }
}

/// Checks a Wasm task before launching it; the error is the message of a TASK_ERROR.
pub fn validate(info: &WasmInfo) -> Result<(), String> {
    if !info.module.digest.is_valid() {
        return Err(format!("malformed module digest `{}`", info.module.digest));
    }
    if info.args.is_empty() {
        return Err("a Wasm task needs argv[0]".into());
    }
    crate::tasks::validate_args_env(&info.args, &info.env)?;
    for d in &info.dirs {
        if !d.archive.digest.is_valid() {
            return Err(format!("malformed directory digest `{}`", d.archive.digest));
        }
        guest_dir(&d.guest)?;
    }
    Ok(())
}

/// Checks a framework executor's description before starting it (the master checked it too;
/// the agent does not rely on that): the error is the message of a TASK_ERROR.
pub fn validate_executor(info: &ExecutorInfo) -> Result<(), String> {
    let id = info.executor_id.as_str();
    if id.is_empty() || id.starts_with("agora-") {
        return Err(format!("executor id `{id}` is empty or reserved"));
    }
    crate::sandbox::path_component("executor", id).map_err(|e| e.to_string())?;
    let Some(first) = info.command.argv.first().filter(|a| !a.is_empty()) else {
        return Err(format!("executor {id} has no command"));
    };
    if first.contains('\0') {
        return Err(format!("executor {id}: the program name contains a NUL byte"));
    }
    crate::tasks::validate_args_env(&info.command.argv, &info.command.env)?;
    if info.fetch.len() > agora_sdk::proto::MAX_EXECUTOR_FETCHES {
        return Err(format!(
            "executor {id} asks for {} files (at most {})",
            info.fetch.len(),
            agora_sdk::proto::MAX_EXECUTOR_FETCHES
        ));
    }
    for f in &info.fetch {
        if !f.artifact.digest.is_valid() {
            return Err(format!("executor {id}: malformed digest `{}`", f.artifact.digest));
        }
        relative_path(&f.path)?;
    }
    Ok(())
}

/// The relative host path (inside the sandbox's `mnt/`) for guest directory `guest`.
fn guest_dir(guest: &str) -> Result<PathBuf, String> {
    let rel = guest.trim_start_matches('/');
    let bad = || format!("guest directory `{guest}` must be an absolute path without `..`");
    if !guest.starts_with('/') || guest.contains('\0') {
        return Err(bad());
    }
    let mut out = PathBuf::from("mnt");
    for part in rel.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if part == ".." {
            return Err(bad());
        }
        out.push(part);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Artifacts

/// The agent's artifact cache, filled from the master by digest.
#[derive(Debug)]
pub struct Fetcher {
    dir: PathBuf,
    conn: watch::Receiver<Option<quinn::Connection>>,
    inflight: Mutex<HashMap<Digest, Arc<OnceCell<PathBuf>>>>,
    /// Artifacts known to be in the cache: later launches need no file system call.
    present: Mutex<HashMap<Digest, PathBuf>>,
}

impl Fetcher {
    /// A cache in `dir`, fetching over whatever connection `conn` holds.
    pub fn new(dir: PathBuf, conn: watch::Receiver<Option<quinn::Connection>>) -> Self {
        Self { dir, conn, inflight: Mutex::new(HashMap::new()), present: Mutex::new(HashMap::new()) }
    }

    /// The local path of `digest` if this agent already holds it (no I/O).
    pub fn cached(&self, digest: &Digest) -> Option<PathBuf> {
        self.present.lock().unwrap_or_else(|p| p.into_inner()).get(digest).cloned()
    }

    fn remember(&self, digest: &Digest, path: &Path) {
        self.present.lock().unwrap_or_else(|p| p.into_inner()).insert(digest.clone(), path.to_path_buf());
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("sha256").join(digest.as_str())
    }

    /// The local path of artifact `digest`, fetching it first if needed. Concurrent callers
    /// for one digest share one fetch; a failed fetch is retried by the next caller.
    pub async fn get(&self, digest: &Digest) -> Result<PathBuf, String> {
        if let Some(path) = self.cached(digest) {
            return Ok(path);
        }
        let path = self.path(digest);
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            self.remember(digest, &path);
            return Ok(path);
        }
        let cell = {
            let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(digest.clone()).or_default().clone()
        };
        let got = cell
            .get_or_try_init(|| async {
                let conn = self.connection().await?;
                if let Some(parent) = path.parent() {
                    tokio::fs::create_dir_all(parent)
                        .await
                        .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
                }
                let started = Instant::now();
                let size = agora_sdk::artifacts::fetch(&conn, digest, &path, MAX_FETCH_BYTES)
                    .await
                    .map_err(|e| format!("cannot fetch artifact {digest} from the master: {e}"))?;
                tracing::info!(%digest, size, elapsed = ?started.elapsed(), "fetched artifact");
                metrics::counter!("agora_agent_artifact_fetches_total").increment(1);
                Ok::<_, String>(path.clone())
            })
            .await
            .cloned();
        if let Ok(path) = &got {
            // Later callers find the file; the cell is not needed any more.
            self.remember(digest, path);
            self.inflight.lock().unwrap_or_else(|p| p.into_inner()).remove(digest);
        }
        got
    }

    async fn connection(&self) -> Result<quinn::Connection, String> {
        let mut rx = self.conn.clone();
        let wait = async {
            rx.wait_for(|c| c.as_ref().is_some_and(|c| c.close_reason().is_none())).await.map(|c| c.clone())
        };
        match tokio::time::timeout(FETCH_CONNECT_WAIT, wait).await {
            Ok(Ok(Some(c))) => Ok(c),
            Ok(_) => Err("the agent is shutting down".into()),
            Err(_) => Err(format!("no connection to the master for {FETCH_CONNECT_WAIT:?}")),
        }
    }
}

/// Gives `dir` and everything below it to `user` (blocking; links are not followed).
fn chown_tree(dir: &Path, user: crate::user::TaskUser) -> Result<(), String> {
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("cannot stat {}: {e}", dir.display()))?;
    std::os::unix::fs::lchown(dir, Some(user.uid), Some(user.gid))
        .map_err(|e| format!("cannot hand {} to the task user: {e}", dir.display()))?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))? {
            let entry = entry.map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
            chown_tree(&entry.path(), user)?;
        }
    }
    Ok(())
}

/// Unpacks a tar archive into `dest` (blocking). Entries cannot escape `dest`: the tar crate
/// refuses `..` and absolute paths, and the guest's view is confined to the preopen anyway.
fn unpack(archive: &Path, dest: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dest).map_err(|e| format!("cannot create {}: {e}", dest.display()))?;
    let file = std::fs::File::open(archive).map_err(|e| format!("cannot open {}: {e}", archive.display()))?;
    let mut ar = tar::Archive::new(std::io::BufReader::new(file));
    ar.set_preserve_permissions(false);
    ar.set_unpack_xattrs(false);
    ar.set_overwrite(true);
    for entry in ar.entries().map_err(|e| format!("unreadable archive: {e}"))? {
        let mut entry = entry.map_err(|e| format!("unreadable archive entry: {e}"))?;
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_dir()) {
            // Links and devices are not shipped: a symlink could point anywhere on the node.
            let name = entry.path().map(|p| p.display().to_string()).unwrap_or_default();
            tracing::debug!(%name, ?kind, "skipping a non-file archive entry");
            continue;
        }
        entry.unpack_in(dest).map_err(|e| format!("cannot unpack into {}: {e}", dest.display()))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Supervisor

/// What Wasm supervisors share: the artifact cache and the executor manager.
#[derive(Debug, Clone)]
pub struct WasmSupport {
    fetcher: Arc<Fetcher>,
    manager: ExecutorManager,
    agent_id: Arc<Mutex<Option<AgentId>>>,
    /// Numbers launches that prepare on a task of their own, so that a late result is never
    /// taken for a newer launch of the same task id.
    attempts: Arc<AtomicU64>,
}

impl WasmSupport {
    /// Starts the executor manager. Artifacts go to `WORK/artifacts`, compiled modules to
    /// `WORK/wasm-cache`, executor sockets and logs to `WORK/wasm-executors`.
    pub fn start(
        config: WasmConfig,
        work_dir: &Path,
        isolator: Isolator,
        conn: watch::Receiver<Option<quinn::Connection>>,
        exec_events: mpsc::UnboundedSender<ExecutorEvent>,
    ) -> Self {
        let fetcher = Arc::new(Fetcher::new(work_dir.join("artifacts"), conn));
        let agent_id = Arc::new(Mutex::new(None));
        let manager = ExecutorManager::start(
            config,
            work_dir,
            isolator,
            fetcher.clone(),
            agent_id.clone(),
            exec_events,
        );
        Self { fetcher, manager, agent_id, attempts: Arc::new(AtomicU64::new(0)) }
    }

    /// The master gave this agent its id (executors started from now on are told).
    pub fn set_agent_id(&self, id: &AgentId) {
        *self.agent_id.lock().unwrap_or_else(|p| p.into_inner()) = Some(id.clone());
    }

    /// Relays a scheduler's message to one of its executors (dropped when there is none).
    pub fn framework_message(&self, framework_id: FrameworkId, executor_id: ExecutorId, data: Vec<u8>) {
        let _ = self.manager.tx.send(ManagerCmd::ToExecutor { exec: (framework_id, executor_id), data });
    }

    /// Shuts one of a framework's executors down (its tasks are killed).
    pub fn shutdown_executor(&self, framework_id: FrameworkId, executor_id: ExecutorId) {
        let _ = self.manager.tx.send(ManagerCmd::ShutdownExecutor { exec: (framework_id, executor_id) });
    }

    /// Kills every executor (agent shutdown with `kill_tasks_on_shutdown`).
    pub fn shutdown(&self) {
        let _ = self.manager.tx.send(ManagerCmd::ShutdownAll);
    }
}

/// Starts Wasm task `spec`. A task whose module the agent holds (and that ships no
/// directories) goes straight to the executor manager; otherwise a task of its own fetches and
/// unpacks first. From then on the manager reports the task's events to `events` under its key
/// and flips its `done`: no task, channel or timer per Wasm task.
pub fn launch(spec: &LaunchSpec, support: &WasmSupport, events: &EventSender) -> TaskHandle {
    let key = spec.key();
    let (done_tx, done) = watch::channel(false);
    let tx = support.manager.tx.clone();
    let handle = {
        let (tx, key) = (tx.clone(), key.clone());
        TaskHandle::with_kill(Box::new(move || drop(tx.send(ManagerCmd::Kill { key: key.clone() }))), done)
    };
    let TaskKind::Wasm(info) = &spec.task.kind else {
        finish(events, &key, &done_tx, failed("invalid task", "not a Wasm task".into()));
        return handle;
    };
    let resources = spec.task.resources.clone();
    let cached = if info.dirs.is_empty() { support.fetcher.cached(&info.module.digest) } else { None };
    if let Some(module_path) = cached {
        let launch = Box::new(LaunchItem::Wasm(wasm_launch(spec, info, module_path, Vec::new())));
        let slot = Some(NewSlot { events: events.clone(), done: done_tx });
        if let Err(mpsc::error::SendError(ManagerCmd::Launch { key, slot: Some(slot), .. })) =
            tx.send(ManagerCmd::Launch { key, attempt: 0, launch, resources, slot })
        {
            finish(&slot.events, &key, &slot.done, shutting_down());
        }
        return handle;
    }
    let attempt = support.attempts.fetch_add(1, Ordering::Relaxed) + 1;
    let slot = NewSlot { events: events.clone(), done: done_tx };
    if let Err(mpsc::error::SendError(cmd)) =
        tx.send(ManagerCmd::Preparing { key: key.clone(), attempt, slot })
    {
        if let ManagerCmd::Preparing { key, slot, .. } = cmd {
            finish(&slot.events, &key, &slot.done, shutting_down());
        }
        return handle;
    }
    let (spec, fetcher) = (spec.clone(), support.fetcher.clone());
    tokio::spawn(async move {
        let TaskKind::Wasm(info) = &spec.task.kind else { return };
        let cmd = match prepare(&spec, info, &fetcher).await {
            Ok(launch) => ManagerCmd::Launch {
                key,
                attempt,
                launch: Box::new(LaunchItem::Wasm(launch)),
                resources,
                slot: None,
            },
            Err((reason, message)) => ManagerCmd::PrepareFailed { key, attempt, reason, message },
        };
        let _ = tx.send(cmd);
    });
    handle
}

/// Starts a task under an executor that needs nothing fetched per task: native commands
/// (the command executor) and tasks of a framework's own executor (whose files are fetched
/// once, when the executor starts).
pub fn launch_direct(spec: &LaunchSpec, support: &WasmSupport, events: &EventSender) -> TaskHandle {
    let key = spec.key();
    let (done_tx, done) = watch::channel(false);
    let tx = support.manager.tx.clone();
    let handle = {
        let (tx, key) = (tx.clone(), key.clone());
        TaskHandle::with_kill(Box::new(move || drop(tx.send(ManagerCmd::Kill { key: key.clone() }))), done)
    };
    let launch = match &spec.task.kind {
        TaskKind::Command(cmd) => LaunchItem::Command(CommandLaunch {
            task_id: spec.task.task_id.clone(),
            command: cmd.clone(),
            resources: spec.task.resources.clone(),
            sandbox: spec.run_dir.clone(),
            checkpoint: Layout::task_checkpoint(&spec.executor_dir),
            kill_grace: spec.kill_grace,
        }),
        TaskKind::Executor(t) => {
            LaunchItem::Task(Box::new(spec.task.clone()), Box::new(t.executor.clone()), spec.run_dir.clone())
        }
        TaskKind::Wasm(_) => {
            finish(events, &key, &done_tx, failed("invalid task", "a Wasm task needs a fetch first".into()));
            return handle;
        }
    };
    let resources = spec.task.resources.clone();
    let slot = Some(NewSlot { events: events.clone(), done: done_tx });
    if let Err(mpsc::error::SendError(ManagerCmd::Launch { key, slot: Some(slot), .. })) =
        tx.send(ManagerCmd::Launch { key, attempt: 0, launch: Box::new(launch), resources, slot })
    {
        finish(&slot.events, &key, &slot.done, shutting_down());
    }
    handle
}

/// Ends a task that never reached an executor.
fn finish(events: &EventSender, key: &TaskKey, done: &watch::Sender<bool>, end: Termination) {
    done.send_replace(true);
    let _ = events.send((key.clone(), TaskEvent::Terminated(end)));
}

fn shutting_down() -> Termination {
    failed(REASON_EXECUTOR_TERMINATED, "the agent is shutting down".into())
}

fn failed(reason: &str, message: String) -> Termination {
    Termination {
        state: TaskState::Failed,
        reason: reason.into(),
        message,
        exit_code: None,
        signal: None,
        usage: None,
    }
}

fn killed_before_start() -> Termination {
    Termination {
        state: TaskState::Killed,
        reason: "killed".into(),
        message: "killed before the module started".into(),
        exit_code: None,
        signal: None,
        usage: None,
    }
}

/// What the executor is told for `spec`, whose module is at `module_path`.
fn wasm_launch(
    spec: &LaunchSpec,
    info: &WasmInfo,
    module_path: PathBuf,
    preopens: Vec<(PathBuf, String)>,
) -> WasmLaunch {
    // Nothing is created up front: the executor creates the sandbox and each output file on the
    // first byte written (a missing file reads as empty). Inode creation was most of a short
    // Wasm task's cost.
    let dir = spec.run_dir.clone();
    let r = &spec.task.resources;
    WasmLaunch {
        task_id: spec.task.task_id.clone(),
        module_path,
        digest: info.module.digest.as_str().to_string(),
        args: info.args.clone(),
        env: info.env.clone(),
        stdout: dir.join("stdout"),
        stderr: dir.join("stderr"),
        sandbox: dir,
        preopens,
        mem_bytes: if r.mem > 0 { r.mem } else { 64 << 20 },
        cpu_millis: u32::try_from(r.cpus).unwrap_or(u32::MAX).max(1),
        fuel: info.fuel,
        timeout: info.timeout,
    }
}

/// Module and shipped directories: everything before the executor, for a task whose artifacts
/// the agent may not hold yet.
async fn prepare(
    spec: &LaunchSpec,
    info: &WasmInfo,
    fetcher: &Fetcher,
) -> Result<WasmLaunch, (&'static str, String)> {
    let module_path = fetcher.get(&info.module.digest).await.map_err(|e| (REASON_FETCH_FAILED, e))?;
    let mut preopens = Vec::with_capacity(info.dirs.len());
    for d in &info.dirs {
        let archive = fetcher.get(&d.archive.digest).await.map_err(|e| (REASON_FETCH_FAILED, e))?;
        let host = spec.run_dir.join(guest_dir(&d.guest).map_err(|e| ("invalid task", e))?);
        let dest = host.clone();
        let user = spec.user;
        let run_dir = spec.run_dir.clone();
        tokio::task::spawn_blocking(move || {
            unpack(&archive, &dest)?;
            // The guest writes there as the task user.
            match user {
                Some(u) => chown_tree(&run_dir, u),
                None => Ok(()),
            }
        })
        .await
        .map_err(|e| (REASON_FETCH_FAILED, e.to_string()))?
        .map_err(|e| (REASON_FETCH_FAILED, format!("directory {}: {e}", d.guest)))?;
        preopens.push((host, d.guest.clone()));
    }
    Ok(wasm_launch(spec, info, module_path, preopens))
}

// ---------------------------------------------------------------------------------------------
// Executor manager

/// Identifies an executor on this agent: its framework and its id there.
pub type ExecKey = (FrameworkId, ExecutorId);

/// What an executor reports that is not about one task; the agent core passes it to the master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecutorEvent {
    /// A framework's executor sent its scheduler a message.
    Message {
        /// The executor.
        exec: ExecKey,
        /// The message.
        data: Vec<u8>,
    },
    /// A framework's own executor ended (its tasks were failed).
    Exited {
        /// The executor.
        exec: ExecKey,
        /// How.
        message: String,
    },
}

/// One task for an executor, in the form its kind takes.
#[derive(Debug)]
enum LaunchItem {
    Wasm(WasmLaunch),
    Command(CommandLaunch),
    /// A task of a framework's executor, that executor's description and its sandbox.
    Task(Box<TaskInfo>, Box<ExecutorInfo>, PathBuf),
}

impl LaunchItem {
    fn executor_id(&self) -> ExecutorId {
        match self {
            LaunchItem::Wasm(_) => ExecutorId::new(WASM_EXECUTOR_ID),
            LaunchItem::Command(_) => ExecutorId::new(COMMAND_EXECUTOR_ID),
            LaunchItem::Task(_, e, _) => e.executor_id.clone(),
        }
    }
}

/// The kind of an executor process.
#[derive(Debug, Clone)]
enum ExecKind {
    Wasm,
    Command,
    Custom { info: Box<ExecutorInfo>, sandbox: PathBuf },
}

/// The frames one executor gets for a list of launches (all of its own kind).
fn launch_message(items: Vec<LaunchItem>) -> AgentToExecutor {
    let mut wasm = Vec::new();
    let mut commands = Vec::new();
    let mut tasks = Vec::new();
    for item in items {
        match item {
            LaunchItem::Wasm(l) => wasm.push(l),
            LaunchItem::Command(l) => commands.push(l),
            LaunchItem::Task(t, _, _) => tasks.push(*t),
        }
    }
    if !commands.is_empty() {
        AgentToExecutor::LaunchCommands(commands)
    } else if !tasks.is_empty() {
        AgentToExecutor::LaunchTasks(tasks)
    } else {
        AgentToExecutor::Launch(wasm)
    }
}

/// Where a task's events go, and its `done` flag.
struct NewSlot {
    events: EventSender,
    done: watch::Sender<bool>,
}

enum ManagerCmd {
    /// A task whose artifacts are being fetched (`attempt` numbers its [`ManagerCmd::Launch`]
    /// or [`ManagerCmd::PrepareFailed`]); a kill meanwhile ends it at once.
    Preparing {
        key: TaskKey,
        attempt: u64,
        slot: NewSlot,
    },
    PrepareFailed {
        key: TaskKey,
        attempt: u64,
        reason: &'static str,
        message: String,
    },
    /// Run a task: with its `slot` when it comes straight from [`launch`] (`attempt` 0), or
    /// after [`ManagerCmd::Preparing`] without.
    Launch {
        key: TaskKey,
        attempt: u64,
        launch: Box<LaunchItem>,
        resources: Resources,
        slot: Option<NewSlot>,
    },
    Kill {
        key: TaskKey,
    },
    ShutdownAll,
    /// A scheduler's message for an executor.
    ToExecutor {
        exec: ExecKey,
        data: Vec<u8>,
    },
    ShutdownExecutor {
        exec: ExecKey,
    },
    /// From an executor's connection task.
    Started {
        exec: ExecKey,
        serial: u64,
        pid: u32,
        to_executor: mpsc::UnboundedSender<AgentToExecutor>,
    },
    Updates {
        exec: ExecKey,
        serial: u64,
        updates: Vec<ExecutorUpdate>,
    },
    FromExecutor {
        exec: ExecKey,
        serial: u64,
        data: Vec<u8>,
    },
    Gone {
        exec: ExecKey,
        serial: u64,
        /// The reason its unfinished tasks fail with.
        reason: &'static str,
        why: String,
    },
}

/// Handle on the executor manager task.
#[derive(Clone)]
pub struct ExecutorManager {
    tx: mpsc::UnboundedSender<ManagerCmd>,
}

impl std::fmt::Debug for ExecutorManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExecutorManager")
    }
}

struct TaskSlot {
    resources: Resources,
    events: EventSender,
    done: watch::Sender<bool>,
    /// A kill was sent to the executor (TASK_KILLING reported once).
    killing: bool,
}

impl TaskSlot {
    fn emit(&self, fw: &FrameworkId, task_id: &TaskId, ev: TaskEvent) {
        let key = TaskKey { framework_id: fw.clone(), task_id: task_id.clone() };
        let _ = self.events.send((key, ev));
    }

    /// The task is over: `done`, then its terminal event.
    fn end(self, fw: &FrameworkId, task_id: &TaskId, end: Termination) {
        tracing::info!(task_id = %task_id, framework_id = %fw, state = %end.state, exit_code = ?end.exit_code,
            "wasm task ended: {}", end.message);
        self.done.send_replace(true);
        self.emit(fw, task_id, TaskEvent::Terminated(end));
    }
}

/// A task fetching its artifacts.
struct PreparingTask {
    attempt: u64,
    slot: NewSlot,
}

struct Executor {
    serial: u64,
    kind: ExecKind,
    pid: Option<u32>,
    to_executor: Option<mpsc::UnboundedSender<AgentToExecutor>>,
    /// Launches waiting for the executor's hello.
    queued: Vec<LaunchItem>,
    /// Kills of queued tasks (sent after the launches).
    queued_kills: Vec<TaskId>,
    tasks: HashMap<TaskId, TaskSlot>,
    cgroup: Option<Arc<Mutex<Cgroup>>>,
    /// The task set changed since the cgroup was last sized.
    resize: bool,
    idle_since: Option<Instant>,
    /// Its framework asked for a shutdown before it connected.
    shutdown_requested: bool,
}

struct Manager {
    config: WasmConfig,
    dir: PathBuf,
    cache_dir: PathBuf,
    isolator: Isolator,
    fetcher: Arc<Fetcher>,
    agent_id: Arc<Mutex<Option<AgentId>>>,
    exec_events: mpsc::UnboundedSender<ExecutorEvent>,
    executors: HashMap<ExecKey, Executor>,
    /// Modules placed where a framework's Wasm executor (the task user) can read them: the
    /// agent's artifact cache is closed to it.
    modules: HashMap<(FrameworkId, String), PathBuf>,
    preparing: HashMap<TaskKey, PreparingTask>,
    next_serial: u64,
    tx: mpsc::UnboundedSender<ManagerCmd>,
}

impl ExecutorManager {
    fn start(
        config: WasmConfig,
        work_dir: &Path,
        isolator: Isolator,
        fetcher: Arc<Fetcher>,
        agent_id: Arc<Mutex<Option<AgentId>>>,
        exec_events: mpsc::UnboundedSender<ExecutorEvent>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let manager = Manager {
            config,
            dir: work_dir.join("executors"),
            cache_dir: work_dir.join("wasm-cache"),
            isolator,
            fetcher,
            agent_id,
            exec_events,
            executors: HashMap::new(),
            modules: HashMap::new(),
            preparing: HashMap::new(),
            next_serial: 0,
            tx: tx.clone(),
        };
        tokio::spawn(manager.run(rx));
        Self { tx }
    }
}

impl Manager {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<ManagerCmd>) {
        let mut batch = Vec::with_capacity(256);
        loop {
            let next_idle = self.next_idle_deadline();
            tokio::select! {
                n = rx.recv_many(&mut batch, 1024) => {
                    if n == 0 {
                        break;
                    }
                    let mut launches: HashMap<ExecKey, Vec<LaunchItem>> = HashMap::new();
                    for cmd in batch.drain(..) {
                        self.handle(cmd, &mut launches);
                    }
                    for (exec, list) in launches {
                        if let Some(tx) = self.executors.get(&exec).and_then(|e| e.to_executor.as_ref()) {
                            let _ = tx.send(launch_message(list));
                        }
                    }
                    self.resize_groups();
                }
                () = sleep_until_opt(next_idle) => self.stop_idle(),
            }
        }
        self.shutdown_all();
    }

    fn handle(&mut self, cmd: ManagerCmd, launches: &mut HashMap<ExecKey, Vec<LaunchItem>>) {
        match cmd {
            ManagerCmd::Preparing { key, attempt, slot } => {
                self.preparing.insert(key, PreparingTask { attempt, slot });
            }
            ManagerCmd::PrepareFailed { key, attempt, reason, message } => {
                if let Some(p) = self.take_preparing(&key, attempt) {
                    tracing::warn!(task_id = %key.task_id, framework_id = %key.framework_id, reason, "{message}");
                    finish(&p.events, &key, &p.done, failed(reason, message));
                }
            }
            ManagerCmd::Launch { key, attempt, launch, resources, slot } => {
                let slot = match slot {
                    Some(slot) => slot,
                    None => match self.take_preparing(&key, attempt) {
                        Some(slot) => slot,
                        // Killed while fetching (already ended), or a stale attempt.
                        None => return,
                    },
                };
                let TaskKey { framework_id, task_id } = key;
                let mut launch = *launch;
                let exec = (framework_id.clone(), launch.executor_id());
                if let LaunchItem::Wasm(l) = &mut launch {
                    match self.framework_module(&framework_id, l) {
                        Ok(path) => l.module_path = path,
                        Err(why) => {
                            let key = TaskKey { framework_id, task_id };
                            finish(&slot.events, &key, &slot.done, failed(REASON_FETCH_FAILED, why));
                            return;
                        }
                    }
                }
                if !self.executors.contains_key(&exec) {
                    let kind = match &launch {
                        LaunchItem::Wasm(_) => Ok(ExecKind::Wasm),
                        LaunchItem::Command(_) => Ok(ExecKind::Command),
                        LaunchItem::Task(_, info, sandbox) => {
                            Ok(ExecKind::Custom { info: info.clone(), sandbox: sandbox.clone() })
                        }
                    };
                    if let Err(why) = kind.and_then(|kind| self.start_executor(&exec, kind)) {
                        let key = TaskKey { framework_id, task_id };
                        finish(&slot.events, &key, &slot.done, failed(REASON_EXECUTOR_TERMINATED, why));
                        return;
                    }
                }
                let Some(ex) = self.executors.get_mut(&exec) else { return };
                if ex.tasks.contains_key(&task_id) {
                    let why = format!("task {task_id} is already running in this executor");
                    let key = TaskKey { framework_id, task_id };
                    finish(&slot.events, &key, &slot.done, failed(REASON_EXECUTOR_TERMINATED, why));
                    return;
                }
                let NewSlot { events, done } = slot;
                ex.tasks.insert(task_id, TaskSlot { resources, events, done, killing: false });
                ex.idle_since = None;
                ex.resize = true;
                if ex.to_executor.is_some() {
                    launches.entry(exec).or_default().push(launch);
                } else {
                    ex.queued.push(launch);
                }
            }
            ManagerCmd::Kill { key } => {
                if let Some(p) = self.preparing.remove(&key) {
                    finish(&p.slot.events, &key, &p.slot.done, killed_before_start());
                    return;
                }
                let TaskKey { framework_id, task_id } = key;
                let Some((exec, ex)) = self
                    .executors
                    .iter_mut()
                    .find(|((fw, _), e)| fw == &framework_id && e.tasks.contains_key(&task_id))
                else {
                    return;
                };
                let Some(slot) = ex.tasks.get_mut(&task_id) else { return };
                if slot.killing {
                    return;
                }
                slot.killing = true;
                slot.emit(&framework_id, &task_id, TaskEvent::Killing);
                match &ex.to_executor {
                    Some(tx) => {
                        // Launches collected in this round go out after this loop: send them
                        // first so the executor knows the task it is asked to kill.
                        if let Some(list) = launches.remove(exec) {
                            let _ = tx.send(launch_message(list));
                        }
                        let _ = tx.send(AgentToExecutor::Kill { task_id });
                    }
                    None => ex.queued_kills.push(task_id),
                }
            }
            ManagerCmd::ShutdownAll => self.shutdown_all(),
            ManagerCmd::ToExecutor { exec, data } => {
                match self.executors.get(&exec).and_then(|e| e.to_executor.as_ref()) {
                    Some(tx)
                        if matches!(
                            self.executors.get(&exec).map(|e| &e.kind),
                            Some(ExecKind::Custom { .. })
                        ) =>
                    {
                        let _ = tx.send(AgentToExecutor::FrameworkMessage(data));
                    }
                    _ => tracing::debug!(framework_id = %exec.0, executor_id = %exec.1,
                    "dropping a framework message: the executor is not running here"),
                }
            }
            ManagerCmd::ShutdownExecutor { exec } => {
                if let Some(ex) = self.executors.get_mut(&exec) {
                    tracing::info!(framework_id = %exec.0, executor_id = %exec.1, "shutting down an executor on its framework's request");
                    match &ex.to_executor {
                        Some(tx) => {
                            let _ = tx.send(AgentToExecutor::Shutdown);
                        }
                        // Not connected yet: it is told as soon as it says hello.
                        None => ex.shutdown_requested = true,
                    }
                }
            }
            ManagerCmd::FromExecutor { exec, serial, data } => {
                if self.executors.get(&exec).is_some_and(|e| e.serial == serial) {
                    let _ = self.exec_events.send(ExecutorEvent::Message { exec, data });
                }
            }
            ManagerCmd::Started { exec, serial, pid, to_executor } => {
                let Some(ex) = self.executors.get_mut(&exec).filter(|e| e.serial == serial) else {
                    let _ = to_executor.send(AgentToExecutor::Shutdown);
                    return;
                };
                let framework_id = &exec.0;
                tracing::info!(framework_id = %framework_id, executor_id = %exec.1, pid, queued = ex.queued.len(), "executor ready");
                ex.pid = Some(pid);
                if !ex.queued.is_empty() {
                    let _ = to_executor.send(launch_message(std::mem::take(&mut ex.queued)));
                }
                for task_id in ex.queued_kills.drain(..) {
                    let _ = to_executor.send(AgentToExecutor::Kill { task_id });
                }
                if ex.shutdown_requested {
                    let _ = to_executor.send(AgentToExecutor::Shutdown);
                }
                ex.to_executor = Some(to_executor);
            }
            ManagerCmd::Updates { exec, serial, updates } => {
                let Some(ex) = self.executors.get_mut(&exec).filter(|e| e.serial == serial) else {
                    return;
                };
                let framework_id = exec.0.clone();
                let custom = matches!(ex.kind, ExecKind::Custom { .. });
                let pid = ex.pid.unwrap_or(0);
                for mut update in updates {
                    if custom {
                        // A framework's executor is not trusted: bound what it says, and keep
                        // to the states an executor may report.
                        truncate(&mut update.reason, MAX_REASON_LEN);
                        truncate(&mut update.message, MAX_MESSAGE_LEN);
                        update.usage = None;
                        if !matches!(
                            update.state,
                            TaskState::Starting
                                | TaskState::Running
                                | TaskState::Finished
                                | TaskState::Failed
                                | TaskState::Killed
                                | TaskState::Error
                        ) {
                            tracing::warn!(framework_id = %framework_id, executor_id = %exec.1, task_id = %update.task_id,
                                state = %update.state, "ignoring an update with a state executors may not report");
                            continue;
                        }
                    }
                    if update.state == TaskState::Running {
                        match ex.tasks.get(&update.task_id) {
                            Some(slot) => {
                                let pid = if custom { pid } else { update.pid.unwrap_or(pid) };
                                let message = custom.then(|| update.message.clone());
                                slot.emit(&framework_id, &update.task_id, TaskEvent::Running { pid, message })
                            }
                            None => {
                                tracing::debug!(task_id = %update.task_id, "update for a task the executor manager does not know")
                            }
                        }
                    } else if update.state.is_terminal() {
                        let ExecutorUpdate {
                            task_id, state, reason, message, exit_code, signal, usage, ..
                        } = update;
                        if let Some(slot) = ex.tasks.remove(&task_id) {
                            ex.resize = true;
                            let end = Termination { state, reason, message, exit_code, signal, usage };
                            slot.end(&framework_id, &task_id, end);
                        }
                    }
                }
                if ex.tasks.is_empty() && ex.idle_since.is_none() {
                    ex.idle_since = Some(Instant::now());
                }
            }
            ManagerCmd::Gone { exec, serial, reason, why } => {
                let Some(ex) = remove_if_serial(&mut self.executors, &exec, serial) else { return };
                let framework_id = &exec.0;
                if !ex.tasks.is_empty() {
                    tracing::warn!(framework_id = %framework_id, executor_id = %exec.1, tasks = ex.tasks.len(), "executor died: {why}");
                }
                for (task_id, slot) in ex.tasks {
                    slot.end(framework_id, &task_id, failed(reason, why.clone()));
                }
                destroy_group(ex.cgroup);
                if matches!(ex.kind, ExecKind::Custom { .. }) {
                    let _ = self.exec_events.send(ExecutorEvent::Exited { exec, message: why });
                }
            }
        }
    }

    /// The slot of a task that was fetching, if `attempt` is still the current one.
    fn take_preparing(&mut self, key: &TaskKey, attempt: u64) -> Option<NewSlot> {
        match self.preparing.remove(key) {
            Some(p) if p.attempt == attempt => Some(p.slot),
            Some(p) => {
                self.preparing.insert(key.clone(), p);
                None
            }
            None => None,
        }
    }

    /// Built-in executors without tasks are shut down after the idle timeout; a framework's
    /// own executor stays until its framework shuts it down or ends.
    fn next_idle_deadline(&self) -> Option<Instant> {
        self.executors
            .values()
            .filter(|e| !matches!(e.kind, ExecKind::Custom { .. }))
            .filter_map(|e| e.idle_since)
            .min()
            .map(|t| t + self.config.idle_timeout)
    }

    fn stop_idle(&mut self) {
        let now = Instant::now();
        let timeout = self.config.idle_timeout;
        let idle: Vec<ExecKey> = self
            .executors
            .iter()
            .filter(|(_, e)| !matches!(e.kind, ExecKind::Custom { .. }))
            .filter(|(_, e)| e.tasks.is_empty() && e.idle_since.is_some_and(|t| t + timeout <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for exec in idle {
            if let Some(ex) = self.executors.remove(&exec) {
                tracing::info!(framework_id = %exec.0, executor_id = %exec.1, "shutting down an idle executor");
                if let Some(tx) = &ex.to_executor {
                    let _ = tx.send(AgentToExecutor::Shutdown);
                }
                destroy_group(ex.cgroup);
            }
        }
    }

    fn shutdown_all(&mut self) {
        for ((fw, _), ex) in self.executors.drain() {
            if let Some(tx) = &ex.to_executor {
                let _ = tx.send(AgentToExecutor::Shutdown);
            }
            for (task_id, slot) in ex.tasks {
                slot.end(
                    &fw,
                    &task_id,
                    failed(REASON_EXECUTOR_TERMINATED, "the agent shut the executor down".into()),
                );
            }
            destroy_group(ex.cgroup);
        }
    }

    /// Sizes each changed executor's cgroup to the sum of its tasks (once per batch).
    fn resize_groups(&mut self) {
        for ex in self.executors.values_mut().filter(|e| e.resize) {
            ex.resize = false;
            let Some(group) = &ex.cgroup else { continue };
            let limits = self
                .isolator
                .limits_for(&executor_resources(&ex.kind, ex.tasks.values().map(|t| &t.resources)));
            let group = group.clone();
            // A few cgroupfs writes: keep them off the manager's task.
            tokio::task::spawn_blocking(move || {
                let mut g = group.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = g.resize(limits) {
                    tracing::warn!(cgroup = g.name(), error = %e, "cannot resize the wasm executor's cgroup");
                }
            });
        }
    }

    /// Who `fw`'s executors run as.
    fn user_for(&self, fw: &FrameworkId) -> Result<Option<crate::user::TaskUser>, String> {
        match &self.config.task_groups {
            Some(g) => g
                .for_framework(fw.as_str())
                .map(Some)
                .map_err(|e| format!("no group for framework {fw}: {e}")),
            None => Ok(None),
        }
    }

    /// The framework's Wasm cache directory (compiled modules, and the modules it may read).
    fn framework_cache(&self, fw: &FrameworkId) -> Result<PathBuf, String> {
        let name = crate::sandbox::path_component("framework", fw.as_str()).map_err(|e| e.to_string())?;
        Ok(self.cache_dir.join(name))
    }

    /// Where `fw`'s Wasm executor reads launch `l`'s module: a hard link (or, across file
    /// systems, a copy) of the cached artifact in the framework's own directory, made once per
    /// framework and module.
    fn framework_module(&mut self, fw: &FrameworkId, l: &WasmLaunch) -> Result<PathBuf, String> {
        let key = (fw.clone(), l.digest.clone());
        if let Some(p) = self.modules.get(&key) {
            return Ok(p.clone());
        }
        let dir = self.framework_cache(fw)?.join("modules");
        crate::sandbox::create_sandbox(&dir, self.user_for(fw)?)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let dest = dir.join(&l.digest);
        if !dest.exists() {
            if let Err(e) = std::fs::hard_link(&l.module_path, &dest) {
                tracing::debug!(error = %e, "cannot link a module for the executor; copying it");
                std::fs::copy(&l.module_path, &dest)
                    .map_err(|e| format!("cannot copy the module to {}: {e}", dest.display()))?;
            }
        }
        self.modules.insert(key, dest.clone());
        Ok(dest)
    }

    fn start_executor(&mut self, exec: &ExecKey, kind: ExecKind) -> Result<(), String> {
        self.next_serial += 1;
        let serial = self.next_serial;
        let fw = &exec.0;
        let program = match &self.config.executor_program {
            Some(p) => p.clone(),
            None => std::env::current_exe().map_err(|e| format!("cannot find the agora binary: {e}"))?,
        };
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(crate::sandbox::PASS_THROUGH)
                .create(&self.dir)
                .map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
        }
        let socket = socket_path(&self.dir, serial);
        let _ = std::fs::remove_file(&socket);
        let listener =
            UnixListener::bind(&socket).map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;
        // Only the executor's user may connect (and the peer's pid is checked on accept).
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600));
            if let Some(u) = self.user_for(fw)? {
                u.chown(&socket)
                    .map_err(|e| format!("cannot hand {} to the task user: {e}", socket.display()))?;
            }
        }
        let user = self.user_for(fw)?;
        let agent_id = self.agent_id.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut env: Vec<(String, String)> = vec![
            (ENV_SOCKET.into(), socket.display().to_string()),
            (ENV_EXECUTOR_ID.into(), exec.1.to_string()),
            (ENV_FRAMEWORK_ID.into(), fw.to_string()),
            (ENV_AGENT_ID.into(), agent_id.as_ref().map(|a| a.to_string()).unwrap_or_default()),
        ];
        let (program, args, cgroup, cwd, fetch) = match &kind {
            ExecKind::Wasm => {
                // Compiled modules are code the executor loads: the cache is per framework and
                // owned by the task user, never shared between frameworks.
                let cache = self.framework_cache(fw)?;
                crate::sandbox::create_sandbox(&cache, user)
                    .map_err(|e| format!("cannot create {}: {e}", cache.display()))?;
                let args: Vec<String> = vec![
                    "executor-wasm".into(),
                    "--socket".into(),
                    socket.display().to_string(),
                    "--executor-id".into(),
                    format!("{fw}/{serial}"),
                    "--cache-dir".into(),
                    cache.display().to_string(),
                    "--max-tasks".into(),
                    self.config.max_tasks_per_executor.to_string(),
                    "--threads".into(),
                    self.config.executor_threads.to_string(),
                ];
                (program, args, true, None, Vec::new())
            }
            ExecKind::Command => {
                let mut args: Vec<String> = vec![
                    "executor-command".into(),
                    "--socket".into(),
                    socket.display().to_string(),
                    "--executor-id".into(),
                    format!("{fw}/{serial}"),
                ];
                if let Some(spec) = self.isolator.spec() {
                    args.push("--isolation".into());
                    args.push(serde_json::to_string(&spec).map_err(|e| e.to_string())?);
                }
                if let Some(u) = user {
                    args.push("--task-uid".into());
                    args.push(u.uid.to_string());
                    args.push("--task-gid".into());
                    args.push(u.gid.to_string());
                }
                (program, args, false, None, Vec::new())
            }
            ExecKind::Custom { info, sandbox } => {
                env.push((ENV_SANDBOX.into(), sandbox.display().to_string()));
                env.push(("HOME".into(), sandbox.display().to_string()));
                env.push(("PATH".into(), crate::tasks::TASK_PATH.into()));
                env.extend(info.command.env.iter().cloned());
                let (prog, args) = if info.command.shell {
                    (
                        "/bin/sh".into(),
                        vec!["-c".to_string(), info.command.argv.first().cloned().unwrap_or_default()],
                    )
                } else {
                    let first = info.command.argv.first().cloned().unwrap_or_default();
                    let prog = if first.contains('/') { sandbox.join(&first) } else { PathBuf::from(first) };
                    (prog, info.command.argv.iter().skip(1).cloned().collect())
                };
                (prog, args, true, Some(sandbox.clone()), info.fetch.clone())
            }
        };
        let cgroup = if cgroup {
            let name = format!("executor-{serial}");
            let limits = self.isolator.limits_for(&executor_resources(&kind, std::iter::empty()));
            self.isolator
                .create(&name, limits)
                .map_err(|e| format!("cannot create the executor's cgroup: {e}"))?
                .map(|g| Arc::new(Mutex::new(g)))
        } else {
            None
        };
        let log = match &cwd {
            Some(dir) => dir.join("stderr"),
            None => self.dir.join(format!("{serial}.log")),
        };
        let spawn = ExecutorSpawn {
            program,
            args,
            env,
            cwd,
            fetch,
            fetcher: self.fetcher.clone(),
            user,
            log,
            listener,
            socket,
            cgroup: cgroup.clone(),
            exec: exec.clone(),
            serial,
            manager: self.tx.clone(),
        };
        tokio::spawn(spawn.run());
        self.executors.insert(
            exec.clone(),
            Executor {
                serial,
                kind,
                pid: None,
                to_executor: None,
                queued: Vec::new(),
                queued_kills: Vec::new(),
                tasks: HashMap::new(),
                cgroup,
                resize: false,
                idle_since: None,
                shutdown_requested: false,
            },
        );
        Ok(())
    }
}

/// Removes `fw`'s executor if it is still the one numbered `serial` (a newer one may have
/// replaced it since).
fn remove_if_serial(
    executors: &mut HashMap<ExecKey, Executor>,
    exec: &ExecKey,
    serial: u64,
) -> Option<Executor> {
    if executors.get(exec).is_some_and(|e| e.serial == serial) {
        executors.remove(exec)
    } else {
        None
    }
}

/// The executor's share: its tasks plus its own (the Wasm runtime's overhead, or what a
/// framework's executor asked for).
fn executor_resources<'a>(kind: &ExecKind, tasks: impl Iterator<Item = &'a Resources>) -> Resources {
    let mut sum = match kind {
        ExecKind::Custom { info, .. } => {
            Resources { cpus: info.resources.cpus, mem: info.resources.mem, ..Resources::default() }
        }
        _ => Resources { cpus: EXECUTOR_OVERHEAD_CPU, mem: EXECUTOR_OVERHEAD_MEM, ..Resources::default() },
    };
    for r in tasks {
        sum.cpus += r.cpus;
        sum.mem += r.mem;
    }
    sum
}

fn destroy_group(group: Option<Arc<Mutex<Cgroup>>>) {
    if let Some(group) = group {
        tokio::task::spawn_blocking(move || {
            // Give a shut-down executor a moment to exit by itself; destroy kills what is left.
            std::thread::sleep(Duration::from_millis(200));
            let g = group.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = g.destroy() {
                tracing::warn!(cgroup = g.name(), error = %e, "cannot remove the wasm executor's cgroup");
            }
        });
    }
}

/// Unix socket paths are limited to 107 bytes: deep work dirs fall back to the temp dir.
fn socket_path(dir: &Path, serial: u64) -> PathBuf {
    let p = dir.join(format!("{serial}.sock"));
    if p.as_os_str().len() < 100 {
        p
    } else {
        std::env::temp_dir().join(format!("agora-{}-{serial}.sock", std::process::id()))
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Starting one executor process and then relaying its frames.
struct ExecutorSpawn {
    program: PathBuf,
    args: Vec<String>,
    /// Extra environment (the `AGORA_EXECUTOR_*` variables, a framework executor's own).
    env: Vec<(String, String)>,
    /// A framework executor's sandbox: created for the task user, the fetched files put there,
    /// the working directory. `None` for the built-in executors.
    cwd: Option<PathBuf>,
    fetch: Vec<FetchInfo>,
    fetcher: Arc<Fetcher>,
    user: Option<crate::user::TaskUser>,
    log: PathBuf,
    listener: UnixListener,
    socket: PathBuf,
    cgroup: Option<Arc<Mutex<Cgroup>>>,
    exec: ExecKey,
    serial: u64,
    manager: mpsc::UnboundedSender<ManagerCmd>,
}

impl ExecutorSpawn {
    async fn run(self) {
        let (reason, why) = match self.prepare().await {
            Err(why) => (REASON_FETCH_FAILED, why),
            Ok(()) => match self.serve().await {
                Ok(why) | Err(why) => {
                    let tail = log_tail(&self.log);
                    let why =
                        if tail.is_empty() { why } else { format!("{why}; executor log ends with: {tail}") };
                    (REASON_EXECUTOR_TERMINATED, why)
                }
            },
        };
        let _ = std::fs::remove_file(&self.socket);
        let _ =
            self.manager.send(ManagerCmd::Gone { exec: self.exec.clone(), serial: self.serial, reason, why });
    }

    /// A framework executor's sandbox and the files it asked for.
    async fn prepare(&self) -> Result<(), String> {
        if let Some(dir) = &self.cwd {
            crate::sandbox::create_sandbox(dir, self.user)
                .map_err(|e| format!("cannot create the executor's sandbox {}: {e}", dir.display()))?;
            for f in &self.fetch {
                place_fetched(&self.fetcher, f, dir, self.user).await?;
            }
        }
        Ok(())
    }

    /// Returns why the executor ended.
    async fn serve(&self) -> Result<String, String> {
        let open = |path: &Path| {
            use std::os::unix::fs::OpenOptionsExt;
            let f =
                std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path);
            f.map_err(|e| format!("cannot create {}: {e}", path.display()))
        };
        let log = open(&self.log)?;
        // A framework's executor writes `stdout` and `stderr` in its sandbox (`agora logs` of
        // its tasks); the built-in ones one log file.
        let out = match &self.cwd {
            Some(dir) => {
                let path = dir.join("stdout");
                let f = open(&path)?;
                if let Some(u) = self.user {
                    u.chown(&path)
                        .map_err(|e| format!("cannot hand {} to the task user: {e}", path.display()))?;
                    u.chown(&self.log)
                        .map_err(|e| format!("cannot hand {} to the task user: {e}", self.log.display()))?;
                }
                f
            }
            None => log.try_clone().map_err(|e| e.to_string())?,
        };
        let gated = self.cgroup.is_some();
        let mut cmd = if gated {
            tokio::process::Command::from(crate::cgroups::gated_command(&self.program))
        } else {
            tokio::process::Command::new(&self.program)
        };
        // Executors get only what they are given (the agent's environment may hold secrets);
        // the built-in ones keep the agent's log filter.
        cmd.env_clear();
        if self.cwd.is_none() {
            cmd.env("PATH", crate::tasks::TASK_PATH);
            if let Ok(filter) = std::env::var("AGORA_LOG") {
                cmd.env("AGORA_LOG", filter);
            }
        }
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(if gated { Stdio::piped() } else { Stdio::null() })
            .stdout(out)
            .stderr(log)
            .kill_on_drop(true);
        // The command executor stays the agent's user (it creates cgroups and switches users
        // for its tasks); the Wasm executor and a framework's own run as the task user.
        let user =
            if self.args.first().map(String::as_str) == Some("executor-command") { None } else { self.user };
        if let Some(u) = user {
            cmd.uid(u.uid).gid(u.gid);
        }
        // SAFETY: prctl only, between fork and exec.
        unsafe {
            cmd.pre_exec(|| crate::user::no_new_privs_in_child());
        }
        let mut child = cmd.spawn().map_err(|e| format!("cannot start {}: {e}", self.program.display()))?;
        let pid = child.id().unwrap_or(0);
        if let (Some(group), Some(mut gate)) = (&self.cgroup, child.stdin.take()) {
            let placed = group.lock().unwrap_or_else(|p| p.into_inner()).add_process(pid);
            if let Err(e) = placed {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(format!("cannot place the executor in its cgroup: {e}"));
            }
            gate.write_all(b"\n").await.map_err(|e| format!("cannot release the executor: {e}"))?;
        }
        let accepted = tokio::select! {
            r = tokio::time::timeout(EXECUTOR_START_TIMEOUT, self.listener.accept()) => r,
            status = child.wait() => {
                return Err(format!("the executor exited before connecting ({})", describe(status)));
            }
        };
        let (stream, _) = match accepted {
            Ok(Ok(s)) => {
                // Only the process the agent started may speak for the executor.
                let peer = s.0.peer_cred().ok().and_then(|c| c.pid());
                if peer.is_some_and(|p| p.unsigned_abs() != pid) {
                    let _ = child.start_kill();
                    return Err(format!(
                        "a process other than the executor ({peer:?}) connected to its socket"
                    ));
                }
                s
            }
            Ok(Err(e)) => return Err(format!("cannot accept the executor's connection: {e}")),
            Err(_) => {
                let _ = child.start_kill();
                return Err(format!("the executor did not connect within {EXECUTOR_START_TIMEOUT:?}"));
            }
        };
        let (r, w) = stream.into_split();
        let (mut reader, mut writer) = (FrameReader::new(r), FrameWriter::new(w));
        let hello = tokio::time::timeout(EXECUTOR_START_TIMEOUT, reader.recv::<ExecutorMessage>()).await;
        let exec_pid = match hello {
            Ok(Ok(Some(ExecutorMessage::Hello { version, pid: exec_pid, .. }))) => {
                if version != EXECUTOR_PROTOCOL_VERSION {
                    let msg =
                        format!("executor protocol {version}, agent speaks {EXECUTOR_PROTOCOL_VERSION}");
                    let _ = writer.send(&AgentToExecutor::refused(msg.clone())).await;
                    return Err(msg);
                }
                exec_pid
            }
            Ok(Ok(Some(other))) => return Err(format!("the executor did not start with hello: {other:?}")),
            Ok(Ok(None)) => return Err("the executor closed its socket before hello".into()),
            Ok(Err(e)) => return Err(format!("executor hello: {e}")),
            Err(_) => return Err("the executor did not say hello".into()),
        };
        writer
            .send(&AgentToExecutor::Welcome {
                framework_id: self.exec.0.clone(),
                agent_id: self
                    .env
                    .iter()
                    .find(|(k, _)| k == ENV_AGENT_ID)
                    .map(|(_, v)| AgentId::new(v.clone()))
                    .filter(|a| !a.as_str().is_empty()),
                executor_id: self.exec.1.to_string(),
            })
            .await
            .map_err(|e| format!("cannot welcome the executor: {e}"))?;
        let (tx, mut rx) = mpsc::unbounded_channel::<AgentToExecutor>();
        let _ = self.manager.send(ManagerCmd::Started {
            exec: self.exec.clone(),
            serial: self.serial,
            pid: if exec_pid != 0 { exec_pid } else { pid },
            to_executor: tx,
        });
        let write_loop = async move {
            let mut unsendable = Vec::new();
            while let Some(msg) = rx.recv().await {
                let mut shutdown = matches!(msg, AgentToExecutor::Shutdown);
                feed_split(&mut writer, msg, &mut unsendable).await.map_err(|e| e.to_string())?;
                while let Ok(more) = rx.try_recv() {
                    shutdown |= matches!(more, AgentToExecutor::Shutdown);
                    feed_split(&mut writer, more, &mut unsendable).await.map_err(|e| e.to_string())?;
                }
                writer.flush().await.map_err(|e| e.to_string())?;
                if !unsendable.is_empty() {
                    let updates = unsendable.drain(..).map(launch_too_large).collect();
                    let _ = self.manager.send(ManagerCmd::Updates {
                        exec: self.exec.clone(),
                        serial: self.serial,
                        updates,
                    });
                }
                if shutdown {
                    break;
                }
            }
            Ok::<_, String>(())
        };
        let read_loop = async {
            loop {
                match reader.recv::<ExecutorMessage>().await {
                    Ok(Some(ExecutorMessage::Updates(updates))) => {
                        let _ = self.manager.send(ManagerCmd::Updates {
                            exec: self.exec.clone(),
                            serial: self.serial,
                            updates,
                        });
                    }
                    Ok(Some(ExecutorMessage::FrameworkMessage(data))) => {
                        if data.len() > agora_sdk::proto::MAX_FRAMEWORK_MESSAGE {
                            tracing::warn!(framework_id = %self.exec.0, executor_id = %self.exec.1, bytes = data.len(),
                                "dropping an executor's framework message larger than the limit");
                        } else {
                            let _ = self.manager.send(ManagerCmd::FromExecutor {
                                exec: self.exec.clone(),
                                serial: self.serial,
                                data,
                            });
                        }
                    }
                    Ok(Some(ExecutorMessage::Hello { .. })) => {
                        tracing::warn!(executor_id = %self.exec.1, "unexpected second hello from an executor")
                    }
                    Ok(None) => return "the executor closed its socket".to_string(),
                    Err(e) => return format!("executor socket: {e}"),
                }
            }
        };
        tokio::pin!(write_loop);
        tokio::pin!(read_loop);
        let mut writing = true;
        let ended = loop {
            tokio::select! {
                w = &mut write_loop, if writing => {
                    writing = false;
                    if let Err(e) = w {
                        break format!("cannot write to the executor: {e}");
                    }
                }
                why = &mut read_loop => break why,
            }
        };
        // The socket is closed or broken: the executor exits by itself; make sure of it.
        // (The command executor first kills its tasks, each within its grace period.)
        let status = match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
            Ok(s) => describe(s),
            Err(_) => {
                let _ = child.start_kill();
                describe(child.wait().await)
            }
        };
        Ok(format!("{ended} ({status})"))
    }
}

/// Queues `msg` for the executor. A batch of launches too large for one frame goes out in
/// several (halved until each fits, in order); a single launch that cannot fit at all is left
/// in `unsendable` for the caller to fail, and the executor carries on.
async fn feed_split<W: tokio::io::AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    msg: AgentToExecutor,
    unsendable: &mut Vec<TaskId>,
) -> Result<(), FrameError> {
    let halve = |msg| match msg {
        AgentToExecutor::Launch(mut list) if list.len() > 1 => {
            let tail = list.split_off(list.len() / 2);
            Ok((AgentToExecutor::Launch(list), AgentToExecutor::Launch(tail)))
        }
        AgentToExecutor::LaunchCommands(mut list) if list.len() > 1 => {
            let tail = list.split_off(list.len() / 2);
            Ok((AgentToExecutor::LaunchCommands(list), AgentToExecutor::LaunchCommands(tail)))
        }
        AgentToExecutor::LaunchTasks(mut list) if list.len() > 1 => {
            let tail = list.split_off(list.len() / 2);
            Ok((AgentToExecutor::LaunchTasks(list), AgentToExecutor::LaunchTasks(tail)))
        }
        other => Err(other),
    };
    for msg in writer.feed_splitting(msg, halve).await? {
        match msg {
            AgentToExecutor::Launch(list) => unsendable.extend(list.into_iter().map(|l| l.task_id)),
            AgentToExecutor::LaunchCommands(list) => unsendable.extend(list.into_iter().map(|l| l.task_id)),
            AgentToExecutor::LaunchTasks(list) => unsendable.extend(list.into_iter().map(|l| l.task_id)),
            _ => return Err(FrameError::TooLarge { max: MAX_FRAME }),
        }
    }
    Ok(())
}

fn launch_too_large(task_id: TaskId) -> ExecutorUpdate {
    ExecutorUpdate {
        task_id,
        state: TaskState::Failed,
        reason: "launch failed".into(),
        message: format!("the task's launch does not fit in one executor frame ({MAX_FRAME} bytes)"),
        exit_code: None,
        signal: None,
        pid: None,
        usage: None,
    }
}

fn describe(status: std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exit status {c}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => "ended".into(),
        },
        Err(e) => format!("cannot wait for it: {e}"),
    }
}

/// The last line or so of an executor's log, for the reason of the tasks it took down.
fn log_tail(path: &Path) -> String {
    let Ok(mut f) = std::fs::File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(400);
    let mut buf = Vec::new();
    use std::io::Seek;
    if f.seek(std::io::SeekFrom::Start(start)).is_err() || f.read_to_end(&mut buf).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&buf);
    text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string()
}

/// Copies fetched artifact `f` from the agent's cache into `sandbox`, hashing the bytes on the
/// way: a copy whose sha256 is not the digest asked for is removed and refused (a corrupted or
/// tampered cache never reaches an executor). The file is the task user's, 0755 or 0644.
async fn place_fetched(
    fetcher: &Fetcher,
    f: &FetchInfo,
    sandbox: &Path,
    user: Option<crate::user::TaskUser>,
) -> Result<(), String> {
    let cached = fetcher.get(&f.artifact.digest).await?;
    let rel = relative_path(&f.path)?;
    let dest = sandbox.join(rel);
    let (digest, want, mode) =
        (f.artifact.digest.clone(), dest.clone(), if f.executable { 0o755 } else { 0o644 });
    tokio::task::spawn_blocking(move || -> Result<(), String> {
        use sha2::Digest as _;
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(parent) = want.parent() {
            crate::sandbox::create_sandbox(parent, user)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        let mut src =
            std::fs::File::open(&cached).map_err(|e| format!("cannot open {}: {e}", cached.display()))?;
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&want)
            .map_err(|e| format!("cannot create {}: {e}", want.display()))?;
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = src.read(&mut buf).map_err(|e| format!("cannot read {}: {e}", cached.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(|e| format!("cannot write {}: {e}", want.display()))?;
        }
        let got = Digest::from_hasher(hasher);
        if got != digest {
            drop(out);
            let _ = std::fs::remove_file(&want);
            return Err(format!(
                "artifact {digest} for `{}` does not match its digest (got {got}): refused",
                want.display()
            ));
        }
        if let Some(u) = user {
            u.chown(&want).map_err(|e| format!("cannot hand {} to the task user: {e}", want.display()))?;
        }
        Ok(())
    })
    .await
    .map_err(|e| e.to_string())??;
    tracing::info!(digest = %f.artifact.digest, path = %dest.display(), "placed a fetched artifact in an executor's sandbox");
    Ok(())
}

/// Cuts `s` to at most `max` bytes, on a character boundary.
fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// A path inside a sandbox: relative, without `..`.
fn relative_path(p: &str) -> Result<PathBuf, String> {
    let path = Path::new(p);
    if p.is_empty()
        || p.contains('\0')
        || path.is_absolute()
        || path
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir))
    {
        return Err(format!("fetch path `{p}` must be relative, without `..`"));
    }
    Ok(path.to_path_buf())
}

/// Whether `task` runs under the Wasm executor.
pub fn is_wasm(task: &TaskInfo) -> bool {
    matches!(task.kind, TaskKind::Wasm(_))
}

#[cfg(test)]
mod tests {
    use super::*;
    use agora_sdk::proto::ArtifactRef;

    fn spec(dir: &Path, id: &str, module: &[u8]) -> LaunchSpec {
        let task = TaskInfo {
            task_id: TaskId::new(id),
            name: id.into(),
            resources: Resources { cpus: 100, mem: 16 << 20, ..Resources::default() },
            kind: TaskKind::Wasm(Box::new(WasmInfo {
                module: ArtifactRef { digest: Digest::of(module), size: module.len() as u64 },
                args: vec!["m".into()],
                env: vec![],
                dirs: vec![],
                fuel: None,
                timeout: None,
            })),
            kill_grace: None,
        };
        let run_dir = dir.join("run").join(id);
        LaunchSpec {
            framework_id: FrameworkId::new("fw"),
            task,
            executor_dir: run_dir.clone(),
            run_dir,
            kill_grace: Duration::from_secs(1),
            isolator: Isolator::none(),
            user: None,
        }
    }

    async fn terminated(rx: &mut mpsc::UnboundedReceiver<(TaskKey, TaskEvent)>) -> (TaskKey, Termination) {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some((key, TaskEvent::Terminated(t)))) => (key, t),
            other => panic!("expected a terminal event, got {other:?}"),
        }
    }

    /// A burst of launches larger than a frame (a new executor receives every launch that
    /// queued while it started) goes out in several frames, in order; a launch that can never
    /// fit is handed back instead of breaking the executor's connection.
    #[tokio::test]
    async fn launch_batches_past_the_frame_limit_are_split() {
        let dir = tempfile::tempdir().expect("tempdir");
        let launch = |i: usize, arg_len: usize| {
            let mut s = spec(dir.path(), &format!("t{i}"), b"m");
            if let TaskKind::Wasm(info) = &mut s.task.kind {
                info.args.push("x".repeat(arg_len));
            }
            let TaskKind::Wasm(info) = &s.task.kind else { unreachable!() };
            wasm_launch(&s, info, dir.path().join("module"), Vec::new())
        };
        let mut list: Vec<WasmLaunch> = (0..3000).map(|i| launch(i, 600)).collect();
        list.insert(1234, launch(99_999, MAX_FRAME));
        let (a, b) = tokio::io::duplex(1 << 16);
        let reader = tokio::spawn(async move {
            let mut r = FrameReader::new(b);
            let (mut frames, mut ids) = (0, Vec::new());
            while let Some(AgentToExecutor::Launch(l)) = r.recv().await.expect("frame") {
                frames += 1;
                ids.extend(l.into_iter().map(|l| l.task_id));
            }
            (frames, ids)
        });
        let mut w = FrameWriter::new(a);
        let mut unsendable = Vec::new();
        feed_split(&mut w, AgentToExecutor::Launch(list), &mut unsendable).await.expect("fed");
        w.flush().await.expect("flush");
        drop(w);
        let (frames, ids) = reader.await.expect("reader");
        assert!(frames > 1, "one frame cannot hold ~2 MB of launches");
        assert_eq!(ids, (0..3000).map(|i| TaskId::new(format!("t{i}"))).collect::<Vec<_>>());
        assert_eq!(unsendable, vec![TaskId::new("t99999")]);
    }

    /// Tasks whose module is not cached yet wait on a fetch of their own: a kill meanwhile
    /// ends them at once, and a fetch that cannot happen fails them with its reason. Neither
    /// starts an executor (the configured program does not exist).
    #[tokio::test]
    async fn killed_while_fetching_and_failed_fetches_end_their_tasks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (conn_tx, conn_rx) = watch::channel(None);
        let config =
            WasmConfig { executor_program: Some(dir.path().join("no-such-agora")), ..WasmConfig::default() };
        let (exec_tx, _exec_rx) = mpsc::unbounded_channel();
        let support = WasmSupport::start(config, dir.path(), Isolator::none(), conn_rx, exec_tx);
        let (events, mut rx) = mpsc::unbounded_channel();

        // No connection to the master yet: the fetch waits for one.
        let waiting = launch(&spec(dir.path(), "waiting", b"a"), &support, &events);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err(), "nothing happens while the fetch waits");
        waiting.kill();
        waiting.kill();
        let (key, t) = terminated(&mut rx).await;
        assert_eq!(key.task_id, TaskId::new("waiting"));
        assert_eq!((t.state, t.reason.as_str()), (TaskState::Killed, "killed"), "{t:?}");
        assert!(*waiting.done.borrow());

        // The connection goes away for good: the fetch fails and says why.
        drop(conn_tx);
        let failing = launch(&spec(dir.path(), "failing", b"b"), &support, &events);
        let (key, t) = terminated(&mut rx).await;
        assert_eq!(key.task_id, TaskId::new("failing"));
        assert_eq!((t.state, t.reason.as_str()), (TaskState::Failed, REASON_FETCH_FAILED), "{t:?}");
        assert!(t.message.contains("shutting down"), "{}", t.message);
        assert!(*failing.done.borrow());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err(), "one terminal event per task, nothing else");
    }
}
