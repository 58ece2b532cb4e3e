//! The executor manager: one task owning every executor's bookkeeping.

use super::*;

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
pub(super) enum LaunchItem {
    Wasm(WasmLaunch),
    Command(CommandLaunch),
    /// A task of a framework's executor, that executor's description and its sandbox.
    Task(Box<TaskInfo>, Box<ExecutorInfo>, PathBuf),
}

impl LaunchItem {
    pub(super) fn executor_id(&self) -> ExecutorId {
        match self {
            LaunchItem::Wasm(_) => ExecutorId::new(WASM_EXECUTOR_ID),
            LaunchItem::Command(_) => ExecutorId::new(COMMAND_EXECUTOR_ID),
            LaunchItem::Task(_, e, _) => e.executor_id.clone(),
        }
    }
}

/// The kind of an executor process.
#[derive(Debug, Clone)]
pub(super) enum ExecKind {
    Wasm,
    Command,
    Custom { info: Box<ExecutorInfo>, sandbox: PathBuf },
}

/// The frames one executor gets for a list of launches (all of its own kind).
pub(super) fn launch_message(items: Vec<LaunchItem>) -> AgentToExecutor {
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
pub(super) struct NewSlot {
    pub(super) events: EventSender,
    pub(super) done: watch::Sender<bool>,
}

pub(super) enum ManagerCmd {
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
    /// The framework is gone: every executor of it ends.
    ShutdownFramework {
        framework_id: FrameworkId,
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
    pub(super) tx: mpsc::UnboundedSender<ManagerCmd>,
    /// Closes every executor's connection (see [`super::Executors::detach`]).
    pub(super) detach: CancellationToken,
}

impl std::fmt::Debug for ExecutorManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExecutorManager")
    }
}

pub(super) struct TaskSlot {
    pub(super) resources: Resources,
    pub(super) events: EventSender,
    pub(super) done: watch::Sender<bool>,
    /// A kill was sent to the executor (TASK_KILLING reported once).
    pub(super) killing: bool,
    /// RUNNING was reported (once: an executor repeating it makes no new update).
    pub(super) running: bool,
    /// A native task's process group and cgroup, for cleaning up after a command executor
    /// that died: its tasks are failed, so nothing of them may keep running.
    pub(super) leftovers: Leftovers,
}

/// What to kill of a native task whose command executor is gone.
#[derive(Debug, Default)]
pub(super) struct Leftovers {
    pub(super) process_group: Option<u32>,
    pub(super) cgroup: Option<String>,
}

impl TaskSlot {
    pub(super) fn emit(&self, fw: &FrameworkId, task_id: &TaskId, ev: TaskEvent) {
        let key = TaskKey { framework_id: fw.clone(), task_id: task_id.clone() };
        let _ = self.events.send((key, ev));
    }

    /// The task is over: `done`, then its terminal event.
    pub(super) fn end(self, fw: &FrameworkId, task_id: &TaskId, end: Termination) {
        tracing::info!(task_id = %task_id, framework_id = %fw, state = %end.state, exit_code = ?end.exit_code,
            "wasm task ended: {}", end.message);
        self.done.send_replace(true);
        self.emit(fw, task_id, TaskEvent::Terminated(end));
    }
}

/// A task fetching its artifacts.
pub(super) struct PreparingTask {
    pub(super) attempt: u64,
    pub(super) slot: NewSlot,
}

pub(super) struct Executor {
    pub(super) serial: u64,
    pub(super) kind: ExecKind,
    pub(super) pid: Option<u32>,
    pub(super) to_executor: Option<mpsc::UnboundedSender<AgentToExecutor>>,
    /// Launches waiting for the executor's hello.
    pub(super) queued: Vec<LaunchItem>,
    /// Kills of queued tasks (sent after the launches).
    pub(super) queued_kills: Vec<TaskId>,
    pub(super) tasks: HashMap<TaskId, TaskSlot>,
    pub(super) cgroup: Option<Arc<Mutex<Cgroup>>>,
    /// The task set changed since the cgroup was last sized.
    pub(super) resize: bool,
    pub(super) idle_since: Option<Instant>,
    /// Its framework asked for a shutdown before it connected.
    pub(super) shutdown_requested: bool,
}

pub(super) struct Manager {
    /// Cancelled when the agent stops without shutting its executors down.
    pub(super) detach: CancellationToken,
    pub(super) config: ExecutorsConfig,
    pub(super) dir: PathBuf,
    pub(super) cache_dir: PathBuf,
    pub(super) isolator: Isolator,
    pub(super) fetcher: Arc<Fetcher>,
    pub(super) agent_id: Arc<Mutex<Option<AgentId>>>,
    pub(super) exec_events: mpsc::UnboundedSender<ExecutorEvent>,
    pub(super) executors: HashMap<ExecKey, Executor>,
    /// Modules placed where a framework's Wasm executor (the task user) can read them: the
    /// agent's artifact cache is closed to it.
    pub(super) modules: HashMap<FrameworkId, HashMap<String, PathBuf>>,
    pub(super) preparing: HashMap<TaskKey, PreparingTask>,
    pub(super) next_serial: u64,
    pub(super) tx: mpsc::UnboundedSender<ManagerCmd>,
}

impl ExecutorManager {
    pub(super) fn start(
        config: ExecutorsConfig,
        work_dir: &Path,
        isolator: Isolator,
        fetcher: Arc<Fetcher>,
        agent_id: Arc<Mutex<Option<AgentId>>>,
        exec_events: mpsc::UnboundedSender<ExecutorEvent>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let detach = CancellationToken::new();
        let manager = Manager {
            detach: detach.clone(),
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
        Self { tx, detach }
    }
}

impl Manager {
    pub(super) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<ManagerCmd>) {
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

    pub(super) fn handle(&mut self, cmd: ManagerCmd, launches: &mut HashMap<ExecKey, Vec<LaunchItem>>) {
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
                let cgroup = match &launch {
                    LaunchItem::Command(l) => crate::tasks::cgroup_name_for(&l.sandbox),
                    _ => None,
                };
                let leftovers = Leftovers { process_group: None, cgroup };
                ex.tasks.insert(
                    task_id,
                    TaskSlot { resources, events, done, killing: false, running: false, leftovers },
                );
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
            ManagerCmd::ShutdownFramework { framework_id } => {
                let execs: Vec<ExecKey> =
                    self.executors.keys().filter(|(fw, _)| fw == &framework_id).cloned().collect();
                for exec in execs {
                    self.handle(ManagerCmd::ShutdownExecutor { exec }, launches);
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
                        match ex.tasks.get_mut(&update.task_id) {
                            Some(slot) if slot.running => {
                                tracing::debug!(task_id = %update.task_id, "ignoring a repeated RUNNING")
                            }
                            Some(slot) => {
                                slot.running = true;
                                if matches!(ex.kind, ExecKind::Command) {
                                    slot.leftovers.process_group = update.pid;
                                }
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
                let mut leftovers = Vec::new();
                for (task_id, mut slot) in ex.tasks {
                    leftovers.push(std::mem::take(&mut slot.leftovers));
                    slot.end(framework_id, &task_id, failed(reason, why.clone()));
                }
                if matches!(ex.kind, ExecKind::Command) && !leftovers.is_empty() {
                    kill_leftovers(&self.isolator, leftovers);
                }
                destroy_group(ex.cgroup);
                if matches!(ex.kind, ExecKind::Custom { .. }) {
                    let _ = self.exec_events.send(ExecutorEvent::Exited { exec, message: why });
                }
            }
        }
    }

    /// The slot of a task that was fetching, if `attempt` is still the current one.
    pub(super) fn take_preparing(&mut self, key: &TaskKey, attempt: u64) -> Option<NewSlot> {
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
    pub(super) fn next_idle_deadline(&self) -> Option<Instant> {
        self.executors
            .values()
            .filter(|e| !matches!(e.kind, ExecKind::Custom { .. }))
            .filter_map(|e| e.idle_since)
            .min()
            .map(|t| t + self.config.idle_timeout)
    }

    pub(super) fn stop_idle(&mut self) {
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

    pub(super) fn shutdown_all(&mut self) {
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
    pub(super) fn resize_groups(&mut self) {
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
    pub(super) fn user_for(&self, fw: &FrameworkId) -> Result<Option<crate::user::TaskUser>, String> {
        match &self.config.task_groups {
            Some(g) => g
                .for_framework(fw.as_str())
                .map(Some)
                .map_err(|e| format!("no group for framework {fw}: {e}")),
            None => Ok(None),
        }
    }

    /// The framework's Wasm cache directory (compiled modules, and the modules it may read).
    pub(super) fn framework_cache(&self, fw: &FrameworkId) -> Result<PathBuf, String> {
        let name = crate::sandbox::path_component("framework", fw.as_str()).map_err(|e| e.to_string())?;
        Ok(self.cache_dir.join(name))
    }

    /// Where `fw`'s Wasm executor reads launch `l`'s module: a hard link (or, across file
    /// systems, a copy) of the cached artifact in the framework's own directory, made once per
    /// framework and module.
    pub(super) fn framework_module(&mut self, fw: &FrameworkId, l: &WasmLaunch) -> Result<PathBuf, String> {
        // The hot path of every Wasm launch: no allocation when the module is placed already.
        if let Some(p) = self.modules.get(fw).and_then(|m| m.get(&l.digest)) {
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
        self.modules.entry(fw.clone()).or_default().insert(l.digest.clone(), dest.clone());
        Ok(dest)
    }

    pub(super) fn start_executor(&mut self, exec: &ExecKey, kind: ExecKind) -> Result<(), String> {
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
            detached: self.detach.clone(),
            command: matches!(kind, ExecKind::Command),
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
pub(super) fn remove_if_serial(
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
pub(super) fn executor_resources<'a>(
    kind: &ExecKind,
    tasks: impl Iterator<Item = &'a Resources>,
) -> Resources {
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

/// Kills what is left of native tasks whose command executor died (blocking pool): each
/// task's process group, then its cgroup with everything in it.
pub(super) fn kill_leftovers(isolator: &Isolator, leftovers: Vec<Leftovers>) {
    let isolator = isolator.clone();
    tokio::task::spawn_blocking(move || {
        for l in leftovers {
            if let Some(group) =
                l.process_group.and_then(|p| libc::pid_t::try_from(p).ok()).filter(|p| *p > 0)
            {
                // SAFETY: kill(2) of the task's process group; the command executor that was
                // its parent is gone, so the group can only be the task's (or empty).
                unsafe { libc::killpg(group, libc::SIGKILL) };
            }
            if let Some(name) = &l.cgroup {
                if let Err(e) = isolator.destroy_existing(name) {
                    tracing::warn!(cgroup = %name, error = %e, "cannot clean up an orphaned task's cgroup");
                }
            }
        }
    });
}

pub(super) fn destroy_group(group: Option<Arc<Mutex<Cgroup>>>) {
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
pub(super) fn socket_path(dir: &Path, serial: u64) -> PathBuf {
    let p = dir.join(format!("{serial}.sock"));
    if p.as_os_str().len() < 100 {
        p
    } else {
        std::env::temp_dir().join(format!("agora-{}-{serial}.sock", std::process::id()))
    }
}

pub(super) async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
