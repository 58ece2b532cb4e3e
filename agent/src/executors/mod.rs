//! Executors on the agent: every task goes to an executor process (DESIGN §6).
//!
//! The [`ExecutorManager`] runs, per framework, the built-in command executor
//! (`agora executor-command`, native tasks), the built-in Wasm executor (`agora executor-wasm`)
//! and any executor of the framework's own (keyed by executor id), each started on first use
//! and talking to the agent over a Unix-domain socket with the executor protocol
//! ([`agora_sdk::executor_proto`]); a Wasm or framework executor runs as its tasks' user, one
//! process per user ([`ExecKey`]). Launches that arrive together go to an executor in one
//! frame. Built-in executors without tasks for [`ExecutorsConfig::idle_timeout`] are told to shut
//! down (the agent decides, so a launch never races an executor's exit); a framework's own stays
//! until its framework shuts it down. An executor that dies fails its tasks with
//! `executor terminated` and the tail of its log.
//!
//! Wasm tasks ([`launch`]) first fetch their module (and shipped directories) from the master's
//! artifact store by digest into the agent's cache (`WORK/artifacts/sha256/<hex>`, once per
//! agent however many tasks ask at the same time); a framework executor's files are fetched
//! when it starts and verified while copied into its sandbox (`fetch.rs`). The Wasm executor
//! and framework executors run in cgroups sized to their tasks plus their own share, resized as
//! tasks come and go; the command executor gives each task a cgroup of its own.
//!
//! Files: `fetch.rs` (artifact cache, placing files in sandboxes), `manager.rs` (the manager
//! task and its executors' lifecycles), `spawn.rs` (starting one executor process and relaying
//! its frames).

mod executor;
mod fetch;
mod manager;
mod spawn;
mod start;

use executor::*;
pub use fetch::Fetcher;
use fetch::*;
use manager::*;
pub use manager::{ExecKey, ExecutorEvent, ExecutorManager, RecoveredTask};
use spawn::*;

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agora_sdk::executor_proto::{
    AgentToExecutor, CommandLaunch, ExecutorMessage, ExecutorUpdate, Resume, WasmLaunch, ENV_AGENT_ID,
    ENV_EXECUTOR_ID, ENV_FRAMEWORK_ID, ENV_RECOVERY_TIMEOUT, ENV_SANDBOX, ENV_SOCKET,
    EXECUTOR_PROTOCOL_VERSION, MAX_MESSAGE_LEN,
};
use agora_sdk::frame::{FrameError, FrameReader, FrameWriter, LIST_BUDGET, MAX_FRAME};
use agora_sdk::proto::{
    AgentId, Digest, ExecutorId, ExecutorInfo, FetchInfo, FrameworkId, TaskId, TaskInfo, TaskKind, TaskState,
    WasmInfo, COMMAND_EXECUTOR_ID, WASM_EXECUTOR_ID,
};
use agora_sdk::{Reason, Resources};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch, OnceCell};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cgroups::{Cgroup, Isolator};
use crate::checkpoint::{ExecutorKind, ExecutorRecord};
use crate::sandbox::Layout;
use crate::tasks::{EventSender, InvalidTask, LaunchSpec, TaskEvent, TaskHandle, TaskKey, Termination};

/// Memory the executor process itself may use on top of its tasks' (engine, compiler, I/O).
pub const EXECUTOR_OVERHEAD_MEM: u64 = 128 << 20;
/// CPU the executor is given on top of its tasks', millicores.
pub const EXECUTOR_OVERHEAD_CPU: u64 = 100;
/// Largest artifact the agent fetches.
pub const MAX_FETCH_BYTES: u64 = 1 << 30;
/// How long an executor told to shut down has to exit before it is killed (Mesos's default is
/// 5 s; the command executor gets its tasks' longest grace period on top).
const EXECUTOR_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long a starting executor has to connect and say hello.
const EXECUTOR_START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the agent waits for a connection to the master before failing a fetch.
const FETCH_CONNECT_WAIT: Duration = Duration::from_secs(15);
/// How the agent runs executors (the built-in ones and frameworks' own).
#[derive(Clone, Debug)]
pub struct ExecutorsConfig {
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
    /// How long an executor that lost the agent keeps its tasks and waits for the agent to
    /// come back (passed to executors as `AGORA_RECOVERY_TIMEOUT`).
    pub recovery_timeout: Duration,
}

impl Default for ExecutorsConfig {
    fn default() -> Self {
        Self {
            executor_program: None,
            idle_timeout: Duration::from_secs(30),
            max_tasks_per_executor: 256,
            executor_threads: 2,
            task_groups: None,
            recovery_timeout: agora_sdk::executor_proto::DEFAULT_RECOVERY_TIMEOUT,
        }
    }
}

/// Checks a Wasm task before launching it; the error is the message of a TASK_ERROR.
pub fn validate(info: &WasmInfo) -> Result<(), InvalidTask> {
    if !info.module.digest.is_valid() {
        return Err(InvalidTask::ModuleDigest(info.module.digest.clone()));
    }
    if info.args.is_empty() {
        return Err(InvalidTask::NoArgv0);
    }
    crate::tasks::validate_args_env(&info.args, &info.env)?;
    for d in &info.dirs {
        if !d.archive.digest.is_valid() {
            return Err(InvalidTask::DirectoryDigest(d.archive.digest.clone()));
        }
        guest_dir(&d.guest)?;
    }
    Ok(())
}

/// Checks a framework executor's description before starting it (the master checked it too;
/// the agent does not rely on that): the error is the message of a TASK_ERROR.
pub fn validate_executor(info: &ExecutorInfo) -> Result<(), InvalidTask> {
    let id = info.executor_id.as_str();
    if id.is_empty() || id.starts_with("agora-") {
        return Err(InvalidTask::ReservedExecutorId(id.to_string()));
    }
    crate::sandbox::path_component("executor", id)?;
    let Some(first) = info.command.argv.first().filter(|a| !a.is_empty()) else {
        return Err(InvalidTask::NoExecutorCommand(id.to_string()));
    };
    if first.contains('\0') {
        return Err(InvalidTask::NulExecutorProgram(id.to_string()));
    }
    crate::tasks::validate_args_env(&info.command.argv, &info.command.env)?;
    if info.fetch.len() > agora_sdk::proto::MAX_EXECUTOR_FETCHES {
        return Err(InvalidTask::TooManyFetches { id: id.to_string(), n: info.fetch.len() });
    }
    for f in &info.fetch {
        if !f.artifact.digest.is_valid() {
            return Err(InvalidTask::FetchDigest { id: id.to_string(), digest: f.artifact.digest.clone() });
        }
        relative_path(&f.path).map_err(|_| InvalidTask::FetchPath(f.path.clone()))?;
    }
    Ok(())
}

/// The relative host path (inside the sandbox's `mnt/`) for guest directory `guest`.
fn guest_dir(guest: &str) -> Result<PathBuf, InvalidTask> {
    let rel = guest.trim_start_matches('/');
    let bad = || InvalidTask::GuestDir(guest.to_string());
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
// Supervisor

/// The agent's executors: the artifact cache and the executor manager, shared by every launch.
#[derive(Debug, Clone)]
pub struct Executors {
    fetcher: Arc<Fetcher>,
    /// `WORK/wasm-cache`: the Wasm executor's compiled modules.
    compiled_dir: PathBuf,
    manager: ExecutorManager,
    agent_id: Arc<Mutex<Option<AgentId>>>,
    /// Numbers launches that prepare on a task of their own, so that a late result is never
    /// taken for a newer launch of the same task id.
    attempts: Arc<AtomicU64>,
}

impl Executors {
    /// Starts the executor manager. Artifacts go to `WORK/artifacts`, compiled modules to
    /// `WORK/wasm-cache`, executor sockets and logs to `WORK/wasm-executors`.
    pub fn start(
        config: ExecutorsConfig,
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
        let compiled_dir = work_dir.join("wasm-cache");
        Self { fetcher, compiled_dir, manager, agent_id, attempts: Arc::new(AtomicU64::new(0)) }
    }

    /// The work of bringing the caches under `max` bytes (see [`crate::cache`]), to run on the
    /// blocking pool: digests in `keep` (live tasks') and being fetched stay.
    pub fn cache_eviction(
        &self,
        mut keep: std::collections::HashSet<String>,
        max: u64,
        grace: Duration,
    ) -> impl FnOnce() -> std::io::Result<crate::cache::Evicted> + Send + 'static {
        let fetcher = self.fetcher.clone();
        let compiled = self.compiled_dir.clone();
        move || {
            keep.extend(fetcher.fetching());
            let used = fetcher.last_used();
            let now = std::time::SystemTime::now();
            let cutoff = now.checked_sub(grace).unwrap_or(std::time::UNIX_EPOCH);
            crate::cache::evict(&fetcher.dir, &compiled, max, &keep, &used, cutoff, |d, remove| {
                fetcher.evict(d, cutoff, remove)
            })
        }
    }

    /// The master gave this agent its id (executors started from now on are told).
    pub fn set_agent_id(&self, id: &AgentId) {
        *self.agent_id.lock().unwrap_or_else(|p| p.into_inner()) = Some(id.clone());
    }

    /// Relays a scheduler's message to one of its executors (dropped when there is none).
    pub fn framework_message(&self, framework_id: FrameworkId, executor_id: ExecutorId, data: Vec<u8>) {
        let _ = self.manager.tx.send(ManagerCmd::ToExecutor { framework_id, executor_id, data });
    }

    /// Shuts every executor of a framework down (the framework is gone).
    pub fn shutdown_framework(&self, framework_id: FrameworkId) {
        let _ = self.manager.tx.send(ManagerCmd::ShutdownFramework { framework_id });
    }

    /// Shuts one of a framework's executors down (its tasks are killed).
    pub fn shutdown_executor(&self, framework_id: FrameworkId, executor_id: ExecutorId) {
        let _ = self.manager.tx.send(ManagerCmd::ShutdownExecutor { framework_id, executor_id });
    }

    /// The agent stops without shutting its executors down: their connections close and
    /// they keep their tasks, reconnecting to the same sockets until the agent comes back (or
    /// their recovery timeout passes). The executor manager ends.
    pub fn detach(&self) {
        self.manager.detach.cancel();
    }

    /// Waits (at most `wait`) for the executor manager to end after [`Self::detach`].
    pub async fn ended(&self, wait: Duration) {
        let _ = tokio::time::timeout(wait, self.manager.ended.cancelled()).await;
    }

    /// The core checkpointed executor process `serial`'s updates up to `seq`: it is told so.
    pub fn ack(&self, exec: ExecKey, serial: u64, seq: u64) {
        let _ = self.manager.tx.send(ManagerCmd::Ack { exec, serial, seq });
    }

    /// Takes back the executors of an earlier run of the agent, with their tasks: the live
    /// ones get their sockets back and `timeout` to reconnect (their tasks fail if they do not);
    /// the tasks of the others fail at once, and what is left of them is killed. Returns the
    /// core's handles on the tasks and a receiver that fires once every executor reconnected
    /// or was given up.
    pub fn recover(
        &self,
        executors: Vec<ExecutorRecord>,
        tasks: Vec<RecoveredTask>,
        events: &EventSender,
        timeout: Duration,
    ) -> (HashMap<TaskKey, TaskHandle>, tokio::sync::oneshot::Receiver<()>) {
        let mut handles = HashMap::new();
        let mut slots = Vec::with_capacity(tasks.len());
        for t in tasks {
            let (handle, done) = handle_for(&t.key, &self.manager.tx);
            handles.insert(t.key.clone(), handle);
            slots.push((t, NewSlot { events: events.clone(), done }));
        }
        let (done, rx) = tokio::sync::oneshot::channel();
        let _ = self.manager.tx.send(ManagerCmd::Recover { executors, tasks: slots, timeout, done });
        (handles, rx)
    }

    /// Tells every executor to shut down (agent shutdown with `kill_tasks_on_shutdown`) and
    /// waits up to `wait` for their processes to end; what is left is killed.
    pub async fn shutdown(&self, wait: Duration) {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let _ = self.manager.tx.send(ManagerCmd::ShutdownAll { reply: Some(reply) });
        let Ok(pids) = rx.await else { return };
        let deadline = Instant::now() + wait;
        loop {
            let alive: Vec<&(u32, Option<u64>)> =
                pids.iter().filter(|(p, t)| crate::checkpoint::same_process(*p, *t)).collect();
            if alive.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                for (pid, _) in alive {
                    tracing::warn!(pid, "an executor did not exit after being shut down: killing it");
                    crate::checkpoint::kill_session(*pid);
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The uid of the executor process that runs `task` as `user` (see [`ExecKey`]): a Wasm or
/// framework executor runs as its tasks' user; the command executor, which switches users per
/// task, has none.
pub fn executor_uid(task: &TaskInfo, user: Option<crate::user::TaskUser>) -> Option<u32> {
    match task.kind {
        TaskKind::Command(_) => None,
        TaskKind::Wasm(_) | TaskKind::Executor(_) => user.map(|u| u.uid),
    }
}

/// Starts Wasm task `spec`. A task whose module the agent holds (and that ships no
/// directories) goes straight to the executor manager; otherwise a task of its own fetches and
/// unpacks first. From then on the manager reports the task's events to `events` under its key
/// and flips its `done`: no task, channel or timer per Wasm task.
pub fn launch(spec: &LaunchSpec, support: &Executors, events: &EventSender) -> TaskHandle {
    let key = spec.key();
    let tx = support.manager.tx.clone();
    let (handle, done_tx) = handle_for(&key, &tx);
    let TaskKind::Wasm(info) = &spec.task.kind else {
        finish(events, &key, &done_tx, failed(Reason::InvalidTask, "not a Wasm task".into()));
        return handle;
    };
    let resources = spec.task.resources.clone();
    let uid = executor_uid(&spec.task, spec.user);
    let cached = if info.dirs.is_empty() { support.fetcher.cached(&info.module.digest) } else { None };
    if let Some(module_path) = cached {
        let launch = Box::new(LaunchItem::Wasm(wasm_launch(spec, info, module_path, Vec::new())));
        let slot = Some(NewSlot { events: events.clone(), done: done_tx });
        if let Err(mpsc::error::SendError(ManagerCmd::Launch { key, slot: Some(slot), .. })) =
            tx.send(ManagerCmd::Launch { key, attempt: 0, uid, launch, resources, slot })
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
                uid,
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
pub fn launch_direct(spec: &LaunchSpec, support: &Executors, events: &EventSender) -> TaskHandle {
    let key = spec.key();
    let tx = support.manager.tx.clone();
    let (handle, done_tx) = handle_for(&key, &tx);
    let launch = match &spec.task.kind {
        TaskKind::Command(cmd) => LaunchItem::Command(CommandLaunch {
            task_id: spec.task.task_id.clone(),
            command: cmd.clone(),
            resources: spec.task.resources.clone(),
            sandbox: spec.run_dir.clone(),
            checkpoint: Layout::task_checkpoint(&spec.executor_dir),
            kill_grace: spec.kill_grace,
            run_as: spec.user.map(|u| (u.uid, u.gid)),
        }),
        TaskKind::Executor(t) => {
            LaunchItem::Task(Box::new(spec.task.clone()), Box::new(t.executor.clone()), spec.run_dir.clone())
        }
        TaskKind::Wasm(_) => {
            finish(
                events,
                &key,
                &done_tx,
                failed(Reason::InvalidTask, "a Wasm task needs a fetch first".into()),
            );
            return handle;
        }
    };
    let resources = spec.task.resources.clone();
    let slot = Some(NewSlot { events: events.clone(), done: done_tx });
    if let Err(mpsc::error::SendError(ManagerCmd::Launch { key, slot: Some(slot), .. })) =
        tx.send(ManagerCmd::Launch {
            key,
            attempt: 0,
            uid: executor_uid(&spec.task, spec.user),
            launch: Box::new(launch),
            resources,
            slot,
        })
    {
        finish(&slot.events, &key, &slot.done, shutting_down());
    }
    handle
}

/// The core's handle on a task run by an executor: a kill goes to the manager; `done` flips
/// when the task is over (the sender is the manager's, through the task's slot).
fn handle_for(key: &TaskKey, tx: &mpsc::UnboundedSender<ManagerCmd>) -> (TaskHandle, watch::Sender<bool>) {
    let (done_tx, done) = watch::channel(false);
    let (tx, key) = (tx.clone(), key.clone());
    let handle =
        TaskHandle::with_kill(Box::new(move || drop(tx.send(ManagerCmd::Kill { key: key.clone() }))), done);
    (handle, done_tx)
}

/// Ends a task that never reached an executor.
fn finish(events: &EventSender, key: &TaskKey, done: &watch::Sender<bool>, end: Termination) {
    done.send_replace(true);
    let _ = events.send((key.clone(), TaskEvent::Terminated(end)));
}

fn shutting_down() -> Termination {
    failed(Reason::ExecutorTerminated, "the agent is shutting down".into())
}

fn failed(reason: Reason, message: String) -> Termination {
    Termination { state: TaskState::Failed, reason, message, exit_code: None, signal: None, usage: None }
}

fn killed_before_start() -> Termination {
    Termination {
        state: TaskState::Killed,
        reason: Reason::Killed,
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
) -> Result<WasmLaunch, (Reason, String)> {
    let module_path =
        fetcher.get(&info.module.digest).await.map_err(|e| (Reason::FetchFailed, e.to_string()))?;
    let mut preopens = Vec::with_capacity(info.dirs.len());
    // Shipped directories live in the sandbox and count against the task's disk (the core
    // put the agent's default there for a task without one).
    let limit = (spec.task.resources.disk > 0).then_some(spec.task.resources.disk);
    let mut used = 0u64;
    for d in &info.dirs {
        let archive =
            fetcher.get(&d.archive.digest).await.map_err(|e| (Reason::FetchFailed, e.to_string()))?;
        let host = spec.run_dir.join(guest_dir(&d.guest).map_err(|e| (Reason::InvalidTask, e.to_string()))?);
        let dest = host.clone();
        let user = spec.user;
        let run_dir = spec.run_dir.clone();
        let budget = limit.map(|l| l.saturating_sub(used));
        let unpacked = tokio::task::spawn_blocking(move || {
            let n = unpack(&archive, &dest, budget)?;
            // The guest writes there as the task user.
            if let Some(u) = user {
                chown_tree(&run_dir, u)?;
            }
            Ok::<_, fetch::UnpackError>(n)
        })
        .await
        .map_err(|e| (Reason::FetchFailed, e.to_string()))?
        .map_err(|e| {
            let reason = match e {
                fetch::UnpackError::TooBig { .. } => Reason::DiskLimitExceeded,
                _ => Reason::FetchFailed,
            };
            (reason, format!("directory {}: {e}", d.guest))
        })?;
        used = used.saturating_add(unpacked);
        preopens.push((host, d.guest.clone()));
    }
    Ok(wasm_launch(spec, info, module_path, preopens))
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
            user: None,
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
        let config = ExecutorsConfig {
            executor_program: Some(dir.path().join("no-such-agora")),
            ..ExecutorsConfig::default()
        };
        let (exec_tx, _exec_rx) = mpsc::unbounded_channel();
        let support = Executors::start(config, dir.path(), Isolator::none(), conn_rx, exec_tx);
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
        assert_eq!((t.state, &t.reason), (TaskState::Failed, &Reason::FetchFailed), "{t:?}");
        assert!(t.message.contains("shutting down"), "{}", t.message);
        assert!(*failing.done.borrow());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err(), "one terminal event per task, nothing else");
    }
}
