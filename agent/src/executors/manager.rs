//! The executor manager: one task owning every executor's bookkeeping.

use super::*;

// ---------------------------------------------------------------------------------------------
// Executor manager

/// Identifies an executor process on this agent: its framework, its id there and the uid it
/// runs as. A Wasm or framework executor runs as the user of the tasks it was started for
/// (`TaskInfo::user`, else `--task-user`), as Mesos runs an executor as its user: two users of
/// one framework get two processes of the same executor id, each with a sandbox (a run of
/// its own under the executor's directory), socket, cgroup and Wasm cache of its own, and a
/// task joins only the process of its own user. The command executor serves every user of
/// its framework (it switches users per task) and has `None`, as has every executor of an
/// agent that does not switch users.
pub type ExecKey = (FrameworkId, ExecutorId, Option<u32>);

/// A process: its pid and its start time (against pid reuse).
pub(super) type ProcessId = (u32, Option<u64>);

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
    /// Checkpoint this executor process (it was started, or its pid is known).
    Checkpoint(Box<ExecutorRecord>),
    /// The executor process `serial` sent updates up to number `seq`, all of them passed on
    /// already (as task events, ahead of this): acknowledge them once checkpointed.
    Seen {
        /// The executor.
        exec: ExecKey,
        /// Its process.
        serial: u64,
        /// The highest sequence number handled.
        seq: u64,
    },
    /// The executor process `serial` ended (forget its checkpoint).
    Gone {
        /// The executor.
        exec: ExecKey,
        /// Its process.
        serial: u64,
    },
}

/// A task of an executor that outlived the agent, for [`super::Executors::recover`].
#[derive(Debug)]
pub struct RecoveredTask {
    /// The task.
    pub key: TaskKey,
    /// Its executor.
    pub executor_id: ExecutorId,
    /// The uid its executor runs as (see [`ExecKey`]; checkpointed with the task).
    pub uid: Option<u32>,
    /// RUNNING was reported already.
    pub running: bool,
    /// Its resources (the executor's cgroup is sized from them).
    pub resources: Resources,
    /// A native task's process group, if it is still that task's process.
    pub process_group: Option<u32>,
    /// A native task's cgroup.
    pub cgroup: Option<String>,
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
        reason: Reason,
        message: String,
    },
    /// Run a task: with its `slot` when it comes straight from [`launch`] (`attempt` 0), or
    /// after [`ManagerCmd::Preparing`] without.
    Launch {
        key: TaskKey,
        attempt: u64,
        /// The uid of the executor it goes to (see [`executor_uid`]).
        uid: Option<u32>,
        launch: Box<LaunchItem>,
        resources: Resources,
        slot: Option<NewSlot>,
    },
    Kill {
        key: TaskKey,
    },
    /// Shut every executor down; the pids (with start times) of those that were running go
    /// back through `reply`.
    ShutdownAll {
        reply: Option<tokio::sync::oneshot::Sender<Vec<ProcessId>>>,
    },
    /// Executors that outlived the agent's restart, and their tasks with their slots.
    Recover {
        executors: Vec<ExecutorRecord>,
        tasks: Vec<(RecoveredTask, NewSlot)>,
        timeout: Duration,
        done: tokio::sync::oneshot::Sender<()>,
    },
    /// The core checkpointed an executor's updates up to `seq`.
    Ack {
        exec: ExecKey,
        serial: u64,
        seq: u64,
    },
    /// The executor process is spawned.
    Spawned {
        exec: ExecKey,
        serial: u64,
        pid: u32,
    },
    /// A scheduler's message for an executor (each of its users' processes gets it).
    ToExecutor {
        framework_id: FrameworkId,
        executor_id: ExecutorId,
        data: Vec<u8>,
    },
    /// A framework shuts one of its executors down (every user's process of it).
    ShutdownExecutor {
        framework_id: FrameworkId,
        executor_id: ExecutorId,
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
        /// What an executor reconnecting after the agent's restart still runs.
        resume: Option<Resume>,
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
        reason: Reason,
        why: String,
    },
}

/// Handle on the executor manager task.
#[derive(Clone)]
pub struct ExecutorManager {
    pub(super) tx: mpsc::UnboundedSender<ManagerCmd>,
    /// Closes every executor's connection (see [`super::Executors::detach`]).
    pub(super) detach: CancellationToken,
    /// Cancelled once the manager task ended and dropped what it held (the isolator).
    pub(super) ended: CancellationToken,
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

pub(super) struct Manager {
    /// Cancelled when the agent stops without shutting its executors down.
    pub(super) detach: CancellationToken,
    pub(super) ended: CancellationToken,
    pub(super) config: ExecutorsConfig,
    pub(super) dir: PathBuf,
    pub(super) cache_dir: PathBuf,
    pub(super) isolator: Isolator,
    pub(super) fetcher: Arc<Fetcher>,
    pub(super) agent_id: Arc<Mutex<Option<AgentId>>>,
    pub(super) exec_events: mpsc::UnboundedSender<ExecutorEvent>,
    pub(super) executors: HashMap<ExecKey, Executor>,
    /// Modules placed where a framework's Wasm executor (of each user) can read them: the
    /// agent's artifact cache is closed to it.
    pub(super) modules: HashMap<(FrameworkId, Option<u32>), HashMap<String, PathBuf>>,
    pub(super) preparing: HashMap<TaskKey, PreparingTask>,
    pub(super) next_serial: u64,
    pub(super) tx: mpsc::UnboundedSender<ManagerCmd>,
    /// Adopted executors not reconnected yet, and who waits for them all.
    pub(super) recovering: usize,
    pub(super) recovery_done: Option<tokio::sync::oneshot::Sender<()>>,
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
        let ended = CancellationToken::new();
        let manager = Manager {
            detach: detach.clone(),
            ended: ended.clone(),
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
            // Serials name sockets, logs and cgroups: unique across the agent's restarts (an
            // executor of an earlier run may still use its number).
            next_serial: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2))
                .unwrap_or(0),
            tx: tx.clone(),
            recovering: 0,
            recovery_done: None,
        };
        tokio::spawn(async move {
            let ended = manager.ended.clone();
            manager.run(rx).await;
            ended.cancel();
        });
        Self { tx, detach, ended }
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
                        if let Some(tx) = self.executors.get(&exec).and_then(Executor::sender) {
                            let _ = tx.send(launch_message(list));
                        }
                    }
                    self.resize_groups();
                }
                () = sleep_until_opt(next_idle) => self.stop_idle(),
                // The agent stopped and leaves its executors running for its next run: this
                // task ends (and with it the isolator it holds, so that a new agent of the same
                // work dir gets the cgroup root's lock at once).
                () = self.detach.cancelled() => return,
            }
        }
        self.shutdown_all();
    }

    /// Checkpoints executor `exec` as it is now.
    pub(super) fn checkpoint(&self, exec: &ExecKey) {
        if let Some(ex) = self.executors.get(exec) {
            let _ = self.exec_events.send(ExecutorEvent::Checkpoint(Box::new(ex.record(exec))));
        }
    }

    /// Fails every task of `ex` that neither runs in it nor was reported ended by it after it
    /// reconnected to the restarted agent.
    pub(super) fn reconcile(exec: &ExecKey, ex: &mut Executor) {
        let Lifecycle::Ready { reconcile, .. } = &mut ex.state else { return };
        let Some(Reconcile { running, .. }) = reconcile.take() else { return };
        let lost: Vec<TaskId> = ex.tasks.keys().filter(|t| !running.contains(*t)).cloned().collect();
        for task_id in lost {
            if let Some(slot) = ex.tasks.remove(&task_id) {
                ex.resize = true;
                tracing::warn!(framework_id = %exec.0, executor_id = %exec.1, task_id = %task_id,
                    "the reconnected executor no longer runs a task and reported no end for it");
                slot.end(
                    &exec.0,
                    &task_id,
                    failed(
                        Reason::ExecutorTerminated,
                        "the executor no longer runs the task and reported no end for it after the agent restarted"
                            .into(),
                    ),
                );
            }
        }
        ex.note_if_idle();
    }

    /// One adopted executor reconnected or is gone: when none is left waiting, recovery is done.
    pub(super) fn recovered_one(&mut self) {
        self.recovering = self.recovering.saturating_sub(1);
        if self.recovering == 0 {
            if let Some(done) = self.recovery_done.take() {
                let _ = done.send(());
            }
        }
    }

    pub(super) fn handle(&mut self, cmd: ManagerCmd, launches: &mut HashMap<ExecKey, Vec<LaunchItem>>) {
        match cmd {
            ManagerCmd::Preparing { key, attempt, slot } => {
                self.preparing.insert(key, PreparingTask { attempt, slot });
            }
            ManagerCmd::PrepareFailed { key, attempt, reason, message } => {
                if let Some(p) = self.take_preparing(&key, attempt) {
                    tracing::warn!(task_id = %key.task_id, framework_id = %key.framework_id, %reason, "{message}");
                    finish(&p.events, &key, &p.done, failed(reason, message));
                }
            }
            ManagerCmd::Launch { key, attempt, uid, launch, resources, slot } => {
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
                let exec = (framework_id.clone(), launch.executor_id(), uid);
                if let LaunchItem::Wasm(l) = &mut launch {
                    match self.framework_module(&exec, l) {
                        Ok(path) => l.module_path = path,
                        Err(why) => {
                            let key = TaskKey { framework_id, task_id };
                            finish(
                                &slot.events,
                                &key,
                                &slot.done,
                                failed(Reason::FetchFailed, why.to_string()),
                            );
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
                        finish(
                            &slot.events,
                            &key,
                            &slot.done,
                            failed(Reason::ExecutorTerminated, why.to_string()),
                        );
                        return;
                    }
                }
                let Some(ex) = self.executors.get_mut(&exec) else { return };
                if ex.tasks.contains_key(&task_id) {
                    let why = format!("task {task_id} is already running in this executor");
                    let key = TaskKey { framework_id, task_id };
                    finish(&slot.events, &key, &slot.done, failed(Reason::ExecutorTerminated, why));
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
                ex.resize = true;
                ex.take_launch(&exec, launch, launches);
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
                    .find(|((fw, _, _), e)| fw == &framework_id && e.tasks.contains_key(&task_id))
                else {
                    return;
                };
                let Some(slot) = ex.tasks.get_mut(&task_id) else { return };
                if slot.killing {
                    return;
                }
                slot.killing = true;
                slot.emit(&framework_id, &task_id, TaskEvent::Killing);
                match &mut ex.state {
                    Lifecycle::Ready { to_executor: tx, .. } => {
                        // Launches collected in this round go out after this loop: send them
                        // first so the executor knows the task it is asked to kill.
                        if let Some(list) = launches.remove(exec) {
                            let _ = tx.send(launch_message(list));
                        }
                        let _ = tx.send(AgentToExecutor::Kill { task_id });
                    }
                    Lifecycle::Starting(pending) | Lifecycle::Recovering { pending, .. } => {
                        pending.kills.push(task_id)
                    }
                }
            }
            ManagerCmd::ShutdownAll { reply } => {
                let pids = self.executors.values().filter_map(|e| Some((e.pid?, e.start_time))).collect();
                self.shutdown_all();
                if let Some(reply) = reply {
                    let _ = reply.send(pids);
                }
            }
            ManagerCmd::Recover { executors, tasks, timeout, done } => {
                self.recover(executors, tasks, timeout, done);
            }
            ManagerCmd::Ack { exec, serial, seq } => {
                if let Some(ex) = self.executors.get_mut(&exec).filter(|e| e.serial == serial) {
                    if seq > ex.acked_seq {
                        ex.acked_seq = seq;
                        if let Some(tx) = ex.sender() {
                            let _ = tx.send(AgentToExecutor::Acked { seq });
                        }
                    }
                }
            }
            ManagerCmd::Spawned { exec, serial, pid } => {
                if let Some(ex) = self.executors.get_mut(&exec).filter(|e| e.serial == serial) {
                    ex.pid = Some(pid);
                    ex.start_time = crate::checkpoint::process_start_time(pid);
                    self.checkpoint(&exec);
                }
            }
            ManagerCmd::ToExecutor { framework_id, executor_id, data } => {
                let mut sent = false;
                for ((fw, id, _), ex) in &self.executors {
                    if fw != &framework_id
                        || id != &executor_id
                        || !matches!(ex.kind, ExecKind::Custom { .. })
                    {
                        continue;
                    }
                    if let Some(tx) = ex.sender() {
                        let _ = tx.send(AgentToExecutor::FrameworkMessage(data.clone()));
                        sent = true;
                    }
                }
                if !sent {
                    tracing::debug!(framework_id = %framework_id, executor_id = %executor_id,
                        "dropping a framework message: the executor is not running here");
                }
            }
            ManagerCmd::ShutdownFramework { framework_id } => {
                let execs: Vec<ExecKey> =
                    self.executors.keys().filter(|(fw, _, _)| fw == &framework_id).cloned().collect();
                for exec in execs {
                    self.shutdown_executor(&exec);
                }
            }
            ManagerCmd::ShutdownExecutor { framework_id, executor_id } => {
                let execs: Vec<ExecKey> = self
                    .executors
                    .keys()
                    .filter(|(fw, id, _)| fw == &framework_id && id == &executor_id)
                    .cloned()
                    .collect();
                for exec in execs {
                    self.shutdown_executor(&exec);
                }
            }
            ManagerCmd::FromExecutor { exec, serial, data } => {
                if self.executors.get(&exec).is_some_and(|e| e.serial == serial) {
                    let _ = self.exec_events.send(ExecutorEvent::Message { exec, data });
                }
            }
            ManagerCmd::Started { exec, serial, pid, to_executor, resume } => {
                let Some(ex) = self.executors.get_mut(&exec).filter(|e| e.serial == serial) else {
                    let _ = to_executor.send(AgentToExecutor::Shutdown);
                    return;
                };
                let framework_id = &exec.0;
                let placeholder = Lifecycle::Starting(Pending::default());
                let (pending, mut reconcile, idle_since, resumed) =
                    match std::mem::replace(&mut ex.state, placeholder) {
                        Lifecycle::Starting(pending) => (pending, None, None, false),
                        Lifecycle::Recovering { pending, idle_since } => (pending, None, idle_since, true),
                        Lifecycle::Ready { reconcile, idle_since, .. } => {
                            (Pending::default(), reconcile, idle_since, false)
                        }
                    };
                tracing::info!(framework_id = %framework_id, executor_id = %exec.1, pid, queued = pending.launches.len(),
                    resumed, "executor ready");
                let pid_changed = ex.pid != Some(pid);
                ex.pid = Some(pid);
                let mut reconcile_now = false;
                if resumed {
                    let resume = resume.unwrap_or_default();
                    tracing::info!(framework_id = %framework_id, executor_id = %exec.1, tasks = resume.tasks.len(),
                        last_seq = resume.last_seq, acked = ex.acked_seq, "executor reconnected after the agent restarted");
                    let running: std::collections::HashSet<TaskId> = resume.tasks.iter().cloned().collect();
                    // Tasks it runs that this agent does not know (launched just before the
                    // agent died, never checkpointed): nobody would manage them.
                    for task_id in resume.tasks.iter().filter(|t| !ex.tasks.contains_key(*t)) {
                        tracing::warn!(task_id = %task_id, "the reconnected executor runs a task this agent does not know: killing it");
                        let _ = to_executor.send(AgentToExecutor::Kill { task_id: task_id.clone() });
                    }
                    reconcile_now = resume.last_seq <= ex.seen_seq;
                    reconcile = Some(Reconcile { running, last_seq: resume.last_seq });
                }
                let tx = to_executor.clone();
                ex.state = Lifecycle::Ready { to_executor, reconcile, idle_since };
                if reconcile_now {
                    Self::reconcile(&exec, ex);
                }
                if !pending.launches.is_empty() {
                    let _ = tx.send(launch_message(pending.launches));
                }
                for task_id in pending.kills {
                    let _ = tx.send(AgentToExecutor::Kill { task_id });
                }
                if pending.shutdown {
                    let _ = tx.send(AgentToExecutor::Shutdown);
                }
                if resumed {
                    self.recovered_one();
                } else if pid_changed {
                    self.checkpoint(&exec);
                }
            }
            ManagerCmd::Updates { exec, serial, updates } => {
                let Some(ex) = self.executors.get_mut(&exec).filter(|e| e.serial == serial) else {
                    return;
                };
                let framework_id = exec.0.clone();
                let custom = matches!(ex.kind, ExecKind::Custom { .. });
                let pid = ex.pid.unwrap_or(0);
                let seen_before = ex.seen_seq;
                for mut update in updates {
                    // Sent again after a reconnection: handled (and checkpointed) already.
                    if update.seq != 0 && update.seq <= seen_before {
                        continue;
                    }
                    ex.seen_seq = ex.seen_seq.max(update.seq);
                    if custom {
                        // A framework's executor is not trusted: bound what it says, and keep
                        // to the states an executor may report (its reason was cut to
                        // MAX_REASON_LEN as it was read).
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
                if ex.seen_seq > seen_before {
                    // After the task events above, on the core's other queue: the core takes
                    // every task event queued before it handles this.
                    let _ = self.exec_events.send(ExecutorEvent::Seen {
                        exec: exec.clone(),
                        serial,
                        seq: ex.seen_seq,
                    });
                }
                let seen = ex.seen_seq;
                if matches!(&ex.state, Lifecycle::Ready { reconcile: Some(r), .. } if seen >= r.last_seq) {
                    Self::reconcile(&exec, ex);
                }
                ex.note_if_idle();
            }
            ManagerCmd::Gone { exec, serial, reason, why } => {
                let _ = self.exec_events.send(ExecutorEvent::Gone { exec: exec.clone(), serial });
                let Some(ex) = remove_if_serial(&mut self.executors, &exec, serial) else { return };
                if ex.recovering() {
                    self.recovered_one();
                }
                let framework_id = &exec.0;
                if !ex.tasks.is_empty() {
                    tracing::warn!(framework_id = %framework_id, executor_id = %exec.1, tasks = ex.tasks.len(), "executor died: {why}");
                }
                let mut leftovers = Vec::new();
                for (task_id, mut slot) in ex.tasks {
                    leftovers.push(std::mem::take(&mut slot.leftovers));
                    slot.end(framework_id, &task_id, failed(reason.clone(), why.clone()));
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

    /// Tells executor process `exec` to shut down (at once, or as soon as it says hello).
    pub(super) fn shutdown_executor(&mut self, exec: &ExecKey) {
        if let Some(ex) = self.executors.get_mut(exec) {
            tracing::info!(framework_id = %exec.0, executor_id = %exec.1, uid = ?exec.2, "shutting down an executor on its framework's request");
            ex.request_shutdown();
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
            .filter_map(Executor::idle_since)
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
            .filter(|(_, e)| e.tasks.is_empty() && e.idle_since().is_some_and(|t| t + timeout <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for exec in idle {
            if let Some(ex) = self.executors.remove(&exec) {
                tracing::info!(framework_id = %exec.0, executor_id = %exec.1, "shutting down an idle executor");
                if let Some(tx) = ex.sender() {
                    let _ = tx.send(AgentToExecutor::Shutdown);
                }
                destroy_group(ex.cgroup);
            }
        }
    }

    pub(super) fn shutdown_all(&mut self) {
        for ((fw, _, _), ex) in self.executors.drain() {
            if let Some(tx) = ex.sender() {
                let _ = tx.send(AgentToExecutor::Shutdown);
            }
            for (task_id, slot) in ex.tasks {
                slot.end(
                    &fw,
                    &task_id,
                    failed(Reason::ExecutorTerminated, "the agent shut the executor down".into()),
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
