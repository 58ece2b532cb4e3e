//! The agent core: the one owner of the agent's state (tasks, unacknowledged updates, recently
//! finished sandboxes). It reacts to master messages, supervisor events and output lookups, and
//! leaves the messages to send in an outbox; the link (see [`crate::link`]) moves them. Keeping
//! I/O out of here makes it testable with real processes but without QUIC.

use std::collections::{HashMap, VecDeque};

use rustc_hash::FxHashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use agora_sdk::proto::{
    unix_millis, AgentId, AgentMessage, ExecutorId, FrameworkId, OutputRequest, TaskId, TaskInfo, TaskKind,
    TaskReport, TaskState, TaskStatus, UpdateSource, Usage,
};
use agora_sdk::{Attributes, Reason, Resources};
use uuid::Uuid;

use crate::cgroups::Isolator;
use crate::checkpoint::{self, Checkpointer, Record};
use crate::executors::{self, Executors};
use crate::gc;
use crate::output::OutputTarget;
use crate::sandbox::Layout;
use crate::tasks::{self, EventSender, LaunchSpec, TaskEvent, TaskHandle, TaskKey, Termination};
use crate::updates::{AckOutcome, UpdateManager};
use crate::user::{TaskGroups, TaskUser, TaskUserError};

mod disk;
mod sandboxes;

/// How many finished tasks' sandboxes stay reachable for `agora logs`.
pub const FINISHED_KEPT: usize = 1000;

/// What the agent tells the master about itself at registration.
#[derive(Clone, Debug)]
pub struct AgentInfo {
    /// The node's host name.
    pub hostname: String,
    /// What the agent offers.
    pub resources: Resources,
    /// The node's attributes.
    pub attributes: Attributes,
}

#[derive(Debug)]
struct TaskEntry {
    task: TaskInfo,
    run_dir: PathBuf,
    state: TaskState,
    handle: TaskHandle,
    /// The supervisor is done (the process ended or never started).
    ended: bool,
    /// The agent killed the task for outgrowing its disk: the message its end carries.
    disk_kill: Option<String>,
    /// The uid of the Wasm or framework executor that runs it (see [`executors::ExecKey`]).
    executor_uid: Option<u32>,
}

impl TaskEntry {
    fn record(&self, framework_id: &FrameworkId) -> checkpoint::TaskRecord {
        checkpoint::TaskRecord {
            framework_id: framework_id.clone(),
            task: self.task.clone(),
            run_dir: self.run_dir.clone(),
            state: self.state,
            pid: None,
            start_time: None,
            ended: self.ended,
            executor_uid: self.executor_uid,
        }
    }
}

/// Why a task's directories cannot be made. The text is the message of its TASK_ERROR.
#[derive(Debug, thiserror::Error)]
enum TaskDirError {
    /// An id cannot be a directory name.
    #[error(transparent)]
    Id(#[from] crate::sandbox::IdError),
    /// A directory could not be created.
    #[error("cannot create {}: {err}", path.display())]
    Create {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        err: std::io::Error,
    },
}

/// Recently finished tasks' sandboxes, oldest evicted first.
#[derive(Debug, Default)]
struct FinishedTasks {
    order: VecDeque<TaskKey>,
    dirs: HashMap<TaskKey, PathBuf>,
}

impl FinishedTasks {
    fn insert(&mut self, key: TaskKey, run_dir: PathBuf) {
        if self.dirs.insert(key.clone(), run_dir).is_some() {
            self.order.retain(|k| k != &key);
        }
        self.order.push_back(key);
        while self.order.len() > FINISHED_KEPT {
            if let Some(old) = self.order.pop_front() {
                self.dirs.remove(&old);
            }
        }
    }

    fn find(&self, fw: Option<&FrameworkId>, task: &TaskId) -> Option<&PathBuf> {
        match fw {
            Some(fw) => self.dirs.get(&TaskKey { framework_id: fw.clone(), task_id: task.clone() }),
            None => self.order.iter().rev().find(|k| &k.task_id == task).and_then(|k| self.dirs.get(k)),
        }
    }
}

/// The agent's state.
#[derive(Debug)]
pub struct Core {
    info: AgentInfo,
    layout: Layout,
    default_grace: Duration,
    isolator: Isolator,
    agent_id: Option<AgentId>,
    tasks: FxHashMap<TaskKey, TaskEntry>,
    updates: UpdateManager,
    finished: FinishedTasks,
    events: EventSender,
    outbox: Vec<AgentMessage>,
    connected: bool,
    executors: Option<Executors>,
    /// Tasks whose supervisor has not ended (kept as a count: walking every task per event
    /// was quadratic under load).
    live: usize,
    /// Who each framework's tasks and executors run as (`None`: the agent's own user).
    task_groups: Option<std::sync::Arc<TaskGroups>>,
    /// Sandbox of each framework executor's current run, and of each framework's Wasm tasks,
    /// per user those executors run as.
    executor_runs: HashMap<executors::ExecKey, PathBuf>,
    /// Where every change is checkpointed (`None`: nothing is, as in unit tests).
    checkpoint: Option<Checkpointer>,
    /// Executors' updates recorded in this batch: each gets `Acked` once the batch is written.
    pending_acks: HashMap<executors::ExecKey, (u64, u64)>,
    /// Sandboxes no task or executor uses any more, waiting for removal (see [`crate::gc`]).
    gc: gc::Scheduled,
    /// Sandboxes handed to garbage collection (bounded like the finished list they serve).
    collected: gc::Collected,
    /// Disk limits of tasks.
    disk: crate::disk::DiskConfig,
    /// Sandboxes of tasks that ended since the last disk check: their output is capped once
    /// more (what they wrote after the last check while running).
    ended_outputs: Vec<(TaskKey, PathBuf)>,
}

impl Core {
    /// A core with no tasks. Supervisors report to `events`; tasks get cgroups from `isolator`.
    pub fn new(
        info: AgentInfo,
        layout: Layout,
        agent_id: Option<AgentId>,
        default_grace: Duration,
        isolator: Isolator,
        updates: UpdateManager,
        events: EventSender,
    ) -> Self {
        Self {
            info,
            layout,
            default_grace,
            isolator,
            agent_id,
            tasks: FxHashMap::default(),
            updates,
            finished: FinishedTasks::default(),
            events,
            outbox: Vec::new(),
            connected: false,
            executors: None,
            live: 0,
            task_groups: None,
            executor_runs: HashMap::new(),
            checkpoint: None,
            pending_acks: HashMap::new(),
            gc: gc::Scheduled::default(),
            collected: gc::Collected::default(),
            disk: crate::disk::DiskConfig::default(),
            ended_outputs: Vec::new(),
        }
    }

    /// Checkpoints every change from now on through `checkpoint`.
    pub fn set_checkpointer(&mut self, checkpoint: Checkpointer) {
        self.checkpoint = Some(checkpoint);
    }

    fn journal(&mut self, record: Record) {
        if let Some(c) = &mut self.checkpoint {
            c.record(record);
        }
    }

    /// Writes what this batch of events changed, then acknowledges the executors' updates it
    /// holds (an executor forgets an update once acknowledged: only a checkpointed one may be).
    /// Call before sending the outbox: nothing leaves the agent before it is checkpointed.
    pub fn flush_checkpoint(&mut self) -> Result<(), checkpoint::CheckpointError> {
        if let Some(c) = &mut self.checkpoint {
            c.flush()?;
        }
        if !self.pending_acks.is_empty() {
            for (exec, (serial, seq)) in self.pending_acks.drain() {
                if let Some(support) = &self.executors {
                    support.ack(exec, serial, seq);
                }
            }
        }
        Ok(())
    }

    /// Takes back the tasks and unacknowledged updates of a checkpoint (a restarted agent).
    /// `handles` are the recovered executors' handles on their tasks; a task without one
    /// (it had ended) gets an inert handle.
    pub fn restore(
        &mut self,
        state: &checkpoint::State,
        mut handles: HashMap<TaskKey, TaskHandle>,
        now: Instant,
    ) {
        for ((fw, id), t) in &state.tasks {
            let key = TaskKey { framework_id: fw.clone(), task_id: id.clone() };
            let handle = match handles.remove(&key) {
                Some(h) if !t.ended => h,
                _ => {
                    let (_, done) = tokio::sync::watch::channel(true);
                    TaskHandle::with_kill(Box::new(|| {}), done)
                }
            };
            let ended = t.ended || t.state.is_terminal();
            if !ended {
                self.live += 1;
            } else {
                self.finished.insert(key.clone(), t.run_dir.clone());
            }
            // A Wasm or framework executor's tasks share its run directory.
            let exec = (fw.clone(), t.task.kind.executor_id(), t.executor_uid);
            match &t.task.kind {
                TaskKind::Wasm(_) if !ended => {
                    if let Some(run) = t.run_dir.parent().and_then(Path::parent) {
                        self.executor_runs.insert(exec, run.to_path_buf());
                    }
                }
                TaskKind::Executor(_) if !ended => {
                    self.executor_runs.insert(exec, t.run_dir.clone());
                }
                _ => {}
            }
            self.tasks.insert(
                key,
                TaskEntry {
                    task: t.task.clone(),
                    run_dir: t.run_dir.clone(),
                    state: t.state,
                    handle,
                    ended,
                    disk_kill: None,
                    executor_uid: t.executor_uid,
                },
            );
        }
        for ((fw, id), queue) in &state.updates {
            let key = TaskKey { framework_id: fw.clone(), task_id: id.clone() };
            for status in queue {
                let _ = self.updates.push(key.clone(), status.clone(), now);
            }
        }
        self.update_gauges();
    }

    /// Enables executors: Wasm tasks, native commands and frameworks' own executors (without
    /// it such tasks end TASK_ERROR).
    pub fn set_executors(&mut self, executors: Executors) {
        self.executors = Some(executors);
    }

    /// Disk limits of tasks and the cap on their output (see [`crate::disk`]).
    pub fn set_disk_config(&mut self, disk: crate::disk::DiskConfig) {
        self.disk = disk;
    }

    /// Who each framework's tasks and executors run as.
    pub fn set_task_groups(&mut self, groups: Option<std::sync::Arc<TaskGroups>>) {
        self.task_groups = groups;
    }

    /// Who `task` runs as: its own user (`TaskInfo::user`, the master's effective user) with
    /// its framework's group, else the task user with that group. A named user must exist
    /// and must not be root. A native command runs as that user under its framework's command
    /// executor; a Wasm task or a task of the framework's own executor goes to a process of
    /// that executor running as that user (one per framework, executor id and user on this
    /// agent, see [`executors::ExecKey`]), started for it if there is none yet.
    fn task_user(&self, fw: &FrameworkId, task: &TaskInfo) -> Result<Option<TaskUser>, TaskUserError> {
        let base = self.user_for(fw)?;
        let Some(name) = &task.user else { return Ok(base) };
        let requested = TaskUser::lookup_requested(name)?;
        let Some(base) = base else {
            return Err(TaskUserError::NotRoot { name: name.clone() });
        };
        Ok(Some(TaskUser { uid: requested.uid, gid: base.gid }))
    }

    fn user_for(&self, fw: &FrameworkId) -> Result<Option<TaskUser>, TaskUserError> {
        match &self.task_groups {
            Some(g) => g
                .for_framework(fw.as_str())
                .map(Some)
                .map_err(|err| TaskUserError::Group { framework: fw.to_string(), err }),
            None => Ok(None),
        }
    }

    /// The id the master gave this agent, if any yet.
    pub fn agent_id(&self) -> Option<&AgentId> {
        self.agent_id.as_ref()
    }

    /// Takes the messages to send to the master.
    pub fn take_outbox(&mut self) -> Vec<AgentMessage> {
        std::mem::take(&mut self.outbox)
    }

    /// A new connection to the master: queues `Register` then every unacknowledged update.
    pub fn connected(&mut self, now: Instant) {
        self.connected = true;
        let mut tasks: Vec<TaskReport> = self
            .tasks
            .iter()
            .map(|(key, e)| TaskReport {
                framework_id: key.framework_id.clone(),
                task: e.task.clone(),
                state: e.state,
            })
            .collect();
        tasks.sort_by(|a, b| (&a.framework_id, &a.task.task_id).cmp(&(&b.framework_id, &b.task.task_id)));
        // Thousands of tasks do not fit in one frame: `TaskReports` parts go ahead of Register.
        let register = |tasks| AgentMessage::Register {
            agent_id: self.agent_id.clone(),
            hostname: self.info.hostname.clone(),
            resources: self.info.resources.clone(),
            attributes: self.info.attributes.clone(),
            tasks,
        };
        let messages = agora_sdk::frame::in_parts(tasks, AgentMessage::TaskReports, register);
        self.outbox.extend(messages);
        for status in self.updates.resend_all(now) {
            self.outbox.push(AgentMessage::StatusUpdate(status));
        }
        for status in self.updates.latest_behind() {
            self.outbox.push(AgentMessage::LatestState(status));
        }
    }

    /// The connection is gone: updates wait for the next one.
    pub fn disconnected(&mut self) {
        self.connected = false;
        self.outbox.clear();
    }

    /// The master (re)assigned our id. The caller persists it.
    pub fn registered(&mut self, agent_id: AgentId) {
        if let Some(support) = &self.executors {
            support.set_agent_id(&agent_id);
        }
        if let Some(old) = &self.agent_id {
            if old != &agent_id {
                tracing::warn!(old = %old, new = %agent_id, "the master gave this agent a new id");
            }
        }
        self.agent_id = Some(agent_id);
    }

    /// Launches a task, or answers TASK_ERROR when it cannot be launched.
    pub fn run_task(&mut self, framework_id: FrameworkId, task: TaskInfo, now: Instant) {
        let key = TaskKey { framework_id: framework_id.clone(), task_id: task.task_id.clone() };
        if self.tasks.contains_key(&key) {
            tracing::warn!(task_id = %key.task_id, framework_id = %key.framework_id,
                "refusing a task whose id is already in use on this agent");
            // Not through the update stream of the task already running under this id: its
            // acknowledgements would get mixed up. A one-off update without uuid (no ack).
            let msg = format!("task {} is already running on this agent", key.task_id);
            let mut status = self.status(&key, TaskState::Error, Reason::DuplicateTaskId, msg, None);
            status.uuid = None;
            self.send(AgentMessage::StatusUpdate(status));
            return;
        }
        if let Err(e) = tasks::validate(&task) {
            self.send_error(key, Reason::InvalidTask, e.to_string(), now);
            return;
        }
        let user = match self.task_user(&framework_id, &task) {
            Ok(u) => u,
            Err(e) => {
                self.send_error(key, Reason::InvalidTaskUser, e.to_string(), now);
                return;
            }
        };
        let dirs = match self.task_dirs(&framework_id, &task, user).map(|d| (user, d)) {
            Ok(d) => d,
            Err(e) => {
                self.send_error(key, Reason::InvalidTask, e.to_string(), now);
                return;
            }
        };
        let (user, (executor_dir, run_dir)) = dirs;
        let executor_uid = executors::executor_uid(&task, user);
        // The launch sees the limit it is held to: a task without `disk` gets the agent's
        // default, so that its shipped directories stop unpacking there too.
        let mut launched = task.clone();
        if launched.resources.disk == 0 {
            launched.resources.disk = self.disk.default_task_disk.unwrap_or(0);
        }
        let spec = LaunchSpec {
            framework_id,
            task: launched,
            executor_dir,
            run_dir: run_dir.clone(),
            // A framework chooses its tasks' grace period, within bounds (an executor shutting
            // down waits for it).
            kill_grace: task.kill_grace.unwrap_or(self.default_grace).min(crate::MAX_KILL_GRACE),
            isolator: self.isolator.clone(),
            user,
        };
        tracing::info!(task_id = %key.task_id, framework_id = %key.framework_id, name = %task.name,
            "launching task");
        // The agent spawns no task itself: every task goes to an executor.
        let handle = match &self.executors {
            Some(support) if executors::is_wasm(&task) => executors::launch(&spec, support, &self.events),
            Some(support) => executors::launch_direct(&spec, support, &self.events),
            // The unit tests below run command tasks' supervisors in this process, without an
            // `agora` binary to start as the command executor.
            #[cfg(test)]
            None if matches!(task.kind, TaskKind::Command(_)) => tasks::launch(spec, self.events.clone()),
            None => {
                self.send_error(key, Reason::InvalidTask, "this agent runs no executors".into(), now);
                return;
            }
        };
        metrics::counter!("agora_agent_tasks_launched_total").increment(1);
        let entry = TaskEntry {
            task,
            run_dir,
            state: TaskState::Staging,
            handle,
            ended: false,
            disk_kill: None,
            executor_uid,
        };
        self.journal(Record::Task(Box::new(entry.record(&key.framework_id))));
        self.tasks.insert(key, entry);
        self.live += 1;
        self.update_gauges();
    }

    /// Kills a task; an unknown task gets TASK_LOST (as Mesos does).
    pub fn kill_task(&mut self, framework_id: FrameworkId, task_id: TaskId, now: Instant) {
        let key = TaskKey { framework_id, task_id };
        match self.tasks.get(&key) {
            Some(e) if e.ended || e.state.is_terminal() => {
                tracing::debug!(task_id = %key.task_id, "kill of a task that already ended");
            }
            Some(e) => {
                tracing::info!(task_id = %key.task_id, framework_id = %key.framework_id, "killing task");
                e.handle.kill();
            }
            None => {
                tracing::info!(task_id = %key.task_id, framework_id = %key.framework_id,
                    "kill of an unknown task");
                let msg = format!("task {} is not known to this agent", key.task_id);
                let status = self.status(&key, TaskState::Lost, Reason::UnknownTask, msg, None);
                self.push_update(key, status, now);
            }
        }
    }

    /// Kills every task of a framework and ends its executors.
    pub fn shutdown_framework(&mut self, framework_id: &FrameworkId) {
        if let Some(support) = &self.executors {
            support.shutdown_framework(framework_id.clone());
        }
        let (gone, kept) = std::mem::take(&mut self.executor_runs)
            .into_iter()
            .partition::<HashMap<_, _>, _>(|((fw, _, _), _)| fw == framework_id);
        self.executor_runs = kept;
        for run in gone.into_values() {
            self.release_run(run);
        }
        for (key, e) in &self.tasks {
            if &key.framework_id == framework_id && !e.ended {
                tracing::info!(task_id = %key.task_id, framework_id = %key.framework_id,
                    "killing task of a framework being shut down");
                e.handle.kill();
            }
        }
    }

    /// A task's executor directory (its `task.json`) and sandbox. Native commands: a run
    /// directory per task. Wasm tasks: a directory below their framework's Wasm executor's run
    /// (created now for the task user, so the executor can create the task's files there). A
    /// framework executor's tasks share that executor's sandbox.
    fn task_dirs(
        &mut self,
        fw: &FrameworkId,
        task: &TaskInfo,
        user: Option<TaskUser>,
    ) -> Result<(PathBuf, PathBuf), TaskDirError> {
        let executor_dir = self.layout.executor_dir(fw, &task.task_id)?;
        let executor_id = task.kind.executor_id();
        match &task.kind {
            TaskKind::Command(_) => {
                let run = Layout::run_dir(&executor_dir, Uuid::new_v4());
                Ok((executor_dir, run))
            }
            TaskKind::Wasm(_) | TaskKind::Executor(_) => {
                // Per user too: each user's executor process has a run of its own.
                let key = (fw.clone(), executor_id, executors::executor_uid(task, user));
                let run = match self.executor_runs.get(&key) {
                    Some(run) => run.clone(),
                    None => {
                        let dir = self.layout.named_executor_dir(fw, &key.1)?;
                        let run = Layout::run_dir(&dir, Uuid::new_v4());
                        if matches!(task.kind, TaskKind::Wasm(_)) {
                            let tasks = run.join("tasks");
                            crate::sandbox::create_sandbox(&run, user)
                                .and_then(|()| crate::sandbox::create_sandbox(&tasks, user))
                                .map_err(|err| TaskDirError::Create { path: tasks.clone(), err })?;
                        }
                        self.executor_runs.insert(key, run.clone());
                        run
                    }
                };
                if matches!(task.kind, TaskKind::Wasm(_)) {
                    let name = crate::sandbox::path_component("task", task.task_id.as_str())?;
                    Ok((executor_dir, run.join("tasks").join(name)))
                } else {
                    Ok((executor_dir, run))
                }
            }
        }
    }

    /// A scheduler's message for one of its executors (dropped when there is none: at most
    /// once).
    pub fn framework_message(&mut self, framework_id: FrameworkId, executor_id: ExecutorId, data: Vec<u8>) {
        match &self.executors {
            Some(support) => support.framework_message(framework_id, executor_id, data),
            None => {
                tracing::debug!(%framework_id, %executor_id, "dropping a framework message: no executors here")
            }
        }
    }

    /// The framework shuts one of its executors down.
    pub fn shutdown_executor(&mut self, framework_id: FrameworkId, executor_id: ExecutorId) {
        if let Some(support) = &self.executors {
            support.shutdown_executor(framework_id, executor_id);
        }
    }

    /// An executor's own event (a framework message, its end) goes to the master.
    pub fn executor_event(&mut self, event: executors::ExecutorEvent) {
        match event {
            executors::ExecutorEvent::Message { exec: (framework_id, executor_id, _), data } => {
                self.send(AgentMessage::FrameworkMessage { framework_id, executor_id, data });
            }
            executors::ExecutorEvent::Exited { exec, message } => {
                // Its next task starts a new run in a new sandbox; this one is collected once
                // no task record points into it.
                if let Some(run) = self.executor_runs.remove(&exec) {
                    self.release_run(run);
                }
                let (framework_id, executor_id, uid) = exec;
                // The master holds resources for each user's process of an executor and frees
                // them all when it hears of the exit: it hears once the last process ended
                // (until then an ended user's share stays held, and its next task reuses it).
                if self.executor_runs.keys().any(|(fw, id, _)| fw == &framework_id && id == &executor_id) {
                    tracing::info!(%framework_id, %executor_id, ?uid,
                        "one user's process of an executor ended; another user's still runs: {message}");
                    return;
                }
                self.send(AgentMessage::ExecutorExited { framework_id, executor_id, message });
            }
            executors::ExecutorEvent::Checkpoint(record) => self.journal(Record::Executor(*record)),
            executors::ExecutorEvent::Seen { exec, serial, seq } => {
                self.journal(Record::ExecutorAcked { exec: exec.clone(), serial, seq });
                let entry = self.pending_acks.entry(exec).or_insert((serial, seq));
                if entry.0 != serial || entry.1 < seq {
                    *entry = (serial, seq);
                }
            }
            executors::ExecutorEvent::Gone { exec, serial } => {
                self.journal(Record::ExecutorGone { exec, serial });
            }
        }
    }

    /// Kills every task (agent shutdown).
    pub fn kill_all(&mut self) {
        for e in self.tasks.values().filter(|e| !e.ended) {
            e.handle.kill();
        }
    }

    /// Number of tasks whose process has not ended yet.
    pub fn live_tasks(&self) -> usize {
        self.live
    }

    /// A supervisor's event becomes a status update.
    pub fn task_event(&mut self, key: TaskKey, event: TaskEvent, now: Instant) {
        let Some(entry) = self.tasks.get_mut(&key) else {
            tracing::warn!(task_id = %key.task_id, "event for a task the agent forgot: {event:?}");
            return;
        };
        let task_ref = (key.framework_id.clone(), key.task_id.clone());
        let (status, record) = match event {
            TaskEvent::Running { pid, message } => {
                // A native task's process is its own: the pid, with its start time against
                // reuse, lets a restarted agent clean it up if its executor is gone.
                let native = matches!(entry.task.kind, TaskKind::Command(_));
                let (pid_rec, start_time) =
                    if native { (Some(pid), checkpoint::process_start_time(pid)) } else { (None, None) };
                if let Err(e) = entry.state.transition(TaskState::Running) {
                    // Killed before its executor said it runs (KILLING came first): no RUNNING
                    // update (the master would refuse it), but its process is still recorded.
                    if e.from == TaskState::Killing {
                        tracing::debug!(task_id = %key.task_id, framework_id = %key.framework_id, "{e}: not reported");
                    } else {
                        tracing::warn!(task_id = %key.task_id, framework_id = %key.framework_id, "{e}: not reported");
                    }
                    if pid_rec.is_some() {
                        let ended = entry.ended;
                        self.journal(Record::TaskState {
                            task: task_ref,
                            state: e.from,
                            pid: pid_rec,
                            start_time,
                            ended,
                        });
                    }
                    return;
                }
                let msg = message.unwrap_or_else(|| format!("process {pid} started"));
                let record = Record::TaskState {
                    task: task_ref,
                    state: TaskState::Running,
                    pid: pid_rec,
                    start_time,
                    ended: false,
                };
                (self.status(&key, TaskState::Running, Reason::TaskStarted, msg, None), record)
            }
            TaskEvent::Killing => {
                if let Err(e) = entry.state.transition(TaskState::Killing) {
                    // Only a task that already ended refuses KILLING: its end was reported.
                    tracing::warn!(task_id = %key.task_id, framework_id = %key.framework_id, "{e}: not reported");
                    return;
                }
                let record = Record::TaskState {
                    task: task_ref,
                    state: TaskState::Killing,
                    pid: None,
                    start_time: None,
                    ended: entry.ended,
                };
                (
                    self.status(&key, TaskState::Killing, Reason::Killing, "kill requested".into(), None),
                    record,
                )
            }
            TaskEvent::Terminated(mut t) => {
                if let Some(why) = entry.disk_kill.take() {
                    // Killed by the agent, not on request: Mesos's container limitation.
                    if t.state != TaskState::Finished {
                        t.state = TaskState::Failed;
                        t.reason = Reason::DiskLimitExceeded;
                        t.message = format!("{why}; the agent killed it ({})", t.message);
                    }
                }
                if let Err(e) = entry.state.transition(t.state) {
                    // Only a task that already ended refuses an end (its state turns terminal
                    // only here, and its supervisor is then done): its end was reported.
                    tracing::warn!(task_id = %key.task_id, framework_id = %key.framework_id, "{e}: not reported");
                    return;
                }
                if !entry.ended {
                    self.live = self.live.saturating_sub(1);
                }
                entry.ended = true;
                let record = Record::TaskState {
                    task: task_ref,
                    state: t.state,
                    pid: None,
                    start_time: None,
                    ended: true,
                };
                let run_dir = entry.run_dir.clone();
                if matches!(entry.task.kind, TaskKind::Command(_) | TaskKind::Wasm(_))
                    && self.ended_outputs.len() < FINISHED_KEPT
                {
                    self.ended_outputs.push((key.clone(), run_dir.clone()));
                }
                self.finished.insert(key.clone(), run_dir);
                self.update_gauges();
                let Termination { state, reason, message, exit_code, signal, usage } = t;
                let mut s = self.status(&key, state, reason, message, usage);
                s.exit_code = exit_code;
                s.signal = signal;
                (s, record)
            }
        };
        self.journal(record);
        self.push_update(key, status, now);
    }

    /// The master forwarded a framework's acknowledgement.
    pub fn ack(&mut self, framework_id: FrameworkId, task_id: TaskId, uuid: Uuid, now: Instant) {
        let key = TaskKey { framework_id, task_id };
        match self.updates.ack(&key, uuid, now) {
            AckOutcome::Acked { next, .. } => {
                self.journal(Record::UpdateAcked {
                    task: (key.framework_id.clone(), key.task_id.clone()),
                    uuid,
                });
                if let Some(next) = next {
                    self.send(AgentMessage::StatusUpdate(*next));
                }
                self.forget_if_done(&key);
            }
            AckOutcome::Ignored => {
                tracing::debug!(task_id = %key.task_id, %uuid, "ignoring a stale acknowledgement");
            }
        }
    }

    /// Retries updates whose time has come (only while connected).
    pub fn poll_updates(&mut self, now: Instant) {
        if !self.connected {
            return;
        }
        let due = self.updates.due(now);
        if !due.is_empty() {
            metrics::counter!("agora_agent_status_update_retries_total").increment(due.len() as u64);
        }
        for status in due {
            tracing::debug!(task_id = %status.task_id, state = %status.state, "resending status update");
            self.send(AgentMessage::StatusUpdate(status));
        }
    }

    /// When [`Self::poll_updates`] has work next.
    pub fn next_update_deadline(&self) -> Option<Instant> {
        if self.connected {
            self.updates.next_deadline()
        } else {
            None
        }
    }

    /// Where the output asked for is, if the task is known (running or recently finished).
    pub fn lookup_output(&self, req: &OutputRequest) -> Option<OutputTarget> {
        let live = match &req.framework_id {
            Some(fw) => self.tasks.get(&TaskKey { framework_id: fw.clone(), task_id: req.task_id.clone() }),
            None => self.tasks.iter().find(|(k, _)| k.task_id == req.task_id).map(|(_, e)| e),
        };
        if let Some(e) = live {
            return Some(OutputTarget {
                path: e.run_dir.clone(),
                done: e.handle.done.clone(),
                collected: false,
            });
        }
        self.finished.find(req.framework_id.as_ref(), &req.task_id).map(|dir| {
            let mut target = OutputTarget::finished(dir.clone());
            target.collected = self.collected.contains(dir);
            target
        })
    }

    /// The sandbox of a task this agent knows.
    pub fn sandbox(&self, key: &TaskKey) -> Option<&Path> {
        self.tasks
            .get(key)
            .map(|e| e.run_dir.as_path())
            .or_else(|| self.finished.dirs.get(key).map(PathBuf::as_path))
    }

    fn send_error(&mut self, key: TaskKey, reason: Reason, message: String, now: Instant) {
        tracing::warn!(task_id = %key.task_id, framework_id = %key.framework_id, %reason, "{message}");
        let status = self.status(&key, TaskState::Error, reason, message, None);
        self.push_update(key, status, now);
    }

    fn status(
        &self,
        key: &TaskKey,
        state: TaskState,
        reason: Reason,
        message: String,
        usage: Option<Usage>,
    ) -> TaskStatus {
        TaskStatus {
            task_id: key.task_id.clone(),
            framework_id: key.framework_id.clone(),
            agent_id: self.agent_id.clone(),
            state,
            uuid: Some(Uuid::new_v4()),
            source: UpdateSource::Agent,
            reason,
            message,
            exit_code: None,
            signal: None,
            usage,
            timestamp_ms: unix_millis(),
        }
    }

    fn push_update(&mut self, key: TaskKey, status: TaskStatus, now: Instant) {
        tracing::debug!(task_id = %key.task_id, framework_id = %key.framework_id,
            state = %status.state, uuid = ?status.uuid, "status update");
        if self.checkpoint.is_some() {
            self.journal(Record::Update(Box::new(status.clone())));
        }
        let terminal = status.state.is_terminal();
        match self.updates.push(key, status.clone(), now) {
            Some(head) => self.send(AgentMessage::StatusUpdate(head)),
            // A task's end behind an update not yet acknowledged (its framework may be away
            // for long): the master shows it, and frees its resources, meanwhile.
            None if terminal => self.send(AgentMessage::LatestState(status)),
            None => {}
        }
    }

    fn send(&mut self, msg: AgentMessage) {
        if self.connected {
            self.outbox.push(msg);
        }
    }

    /// A task whose terminal update was acknowledged is forgotten (its sandbox stays listed
    /// among the finished ones).
    fn forget_if_done(&mut self, key: &TaskKey) {
        let done = self.tasks.get(key).is_some_and(|e| e.ended && e.state.is_terminal());
        if done && !self.updates.has_pending(key) {
            let Some(entry) = self.tasks.remove(key) else { return };
            self.journal(Record::TaskForgotten((key.framework_id.clone(), key.task_id.clone())));
            tracing::debug!(task_id = %key.task_id, framework_id = %key.framework_id, "task record removed");
            match &entry.task.kind {
                // A run of its own.
                TaskKind::Command(_) => self.schedule_sandbox(entry.run_dir),
                // Its own directory in the Wasm executor's run, which may have ended too.
                TaskKind::Wasm(_) => {
                    let run = wasm_run_of(&entry.run_dir);
                    self.schedule_sandbox(entry.run_dir);
                    if let Some(run) = run {
                        self.release_run(run);
                    }
                }
                // Its executor's run, shared with the executor and its other tasks.
                TaskKind::Executor(_) => self.release_run(entry.run_dir),
            }
        }
    }

    fn update_gauges(&self) {
        metrics::gauge!("agora_agent_tasks_running").set(self.live_tasks() as f64);
    }
}

/// The Wasm executor run a Wasm task's sandbox (`<run>/tasks/<task>`) lies in.
fn wasm_run_of(task_dir: &Path) -> Option<PathBuf> {
    task_dir.parent().and_then(Path::parent).map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::tests::command_task;
    use tokio::sync::mpsc;

    struct Harness {
        core: Core,
        rx: mpsc::UnboundedReceiver<(TaskKey, TaskEvent)>,
        _dir: tempfile::TempDir,
    }

    fn harness() -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, rx) = mpsc::unbounded_channel();
        let info = AgentInfo {
            hostname: "node".into(),
            resources: Resources::cpus(2000),
            attributes: Attributes::default(),
        };
        let core = Core::new(
            info,
            Layout::new(dir.path()),
            Some(AgentId::new("a1")),
            Duration::from_secs(3),
            Isolator::none(),
            UpdateManager::new(Duration::from_millis(50), Duration::from_millis(200)),
            tx,
        );
        Harness { core, rx, _dir: dir }
    }

    fn statuses(core: &mut Core) -> Vec<TaskStatus> {
        core.take_outbox()
            .into_iter()
            .filter_map(|m| match m {
                AgentMessage::StatusUpdate(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    /// Feeds supervisor events into the core until `n` updates went out.
    async fn collect(h: &mut Harness, n: usize) -> Vec<TaskStatus> {
        let mut out = statuses(&mut h.core);
        while out.len() < n {
            let (k, ev) = tokio::time::timeout(Duration::from_secs(10), h.rx.recv())
                .await
                .expect("event in time")
                .expect("event");
            h.core.task_event(k, ev, Instant::now());
            out.extend(statuses(&mut h.core));
        }
        out
    }

    fn ack(h: &mut Harness, s: &TaskStatus) {
        h.core.ack(s.framework_id.clone(), s.task_id.clone(), s.uuid.unwrap_or_default(), Instant::now());
    }

    #[tokio::test]
    async fn updates_flow_in_order_and_records_are_forgotten_after_the_terminal_ack() {
        let mut h = harness();
        let now = Instant::now();
        h.core.connected(now);
        assert!(
            matches!(h.core.take_outbox().as_slice(), [AgentMessage::Register { tasks, .. }] if tasks.is_empty())
        );
        let fw = FrameworkId::new("fw");
        h.core.run_task(fw.clone(), command_task("t", "echo hi; exit 3"), now);
        // Only RUNNING goes out until it is acknowledged.
        let running = collect(&mut h, 1).await;
        assert_eq!(running.len(), 1);
        assert_eq!(running[0].state, TaskState::Running);
        assert_eq!(running[0].agent_id, Some(AgentId::new("a1")));
        let t =
            tokio::time::timeout(Duration::from_secs(10), h.rx.recv()).await.expect("in time").expect("ev");
        h.core.task_event(t.0, t.1, Instant::now());
        assert!(statuses(&mut h.core).is_empty(), "FINISHED must wait for RUNNING's ack");
        // Re-registration reports the task with its latest state, resends the head of its
        // updates, and tells the master the newest one behind it.
        h.core.connected(Instant::now());
        let out = h.core.take_outbox();
        match out.as_slice() {
            [AgentMessage::Register { tasks, .. }, AgentMessage::StatusUpdate(s), AgentMessage::LatestState(l)] =>
            {
                assert_eq!(tasks.len(), 1);
                assert_eq!(tasks[0].state, TaskState::Failed);
                assert_eq!(s.uuid, running[0].uuid);
                assert_eq!(l.state, TaskState::Failed);
            }
            other => panic!("unexpected {other:?}"),
        }
        let acked_at = Instant::now();
        let r = &running[0];
        h.core.ack(r.framework_id.clone(), r.task_id.clone(), r.uuid.unwrap_or_default(), acked_at);
        let failed = statuses(&mut h.core);
        assert_eq!(failed.len(), 1);
        assert_eq!((failed[0].state, failed[0].exit_code), (TaskState::Failed, Some(3)));
        // Retried while unacknowledged: not before the harness's 50 ms retry delay, then once.
        h.core.poll_updates(acked_at + Duration::from_millis(49));
        assert!(statuses(&mut h.core).is_empty(), "retried before its delay");
        h.core.poll_updates(acked_at + Duration::from_millis(50));
        let retried = statuses(&mut h.core);
        assert_eq!(retried.iter().map(|s| s.uuid).collect::<Vec<_>>(), [failed[0].uuid]);
        let key = TaskKey { framework_id: fw.clone(), task_id: TaskId::new("t") };
        assert!(h.core.tasks.contains_key(&key));
        ack(&mut h, &failed[0]);
        assert!(!h.core.tasks.contains_key(&key));
        // Output stays reachable after the record is gone.
        let req = OutputRequest {
            task_id: TaskId::new("t"),
            framework_id: None,
            stream: agora_sdk::proto::OutputStream::Stdout,
            offset: 0,
            follow: false,
        };
        let target = h.core.lookup_output(&req).expect("finished task known");
        assert_eq!(std::fs::read_to_string(target.path.join("stdout")).ok().as_deref(), Some("hi\n"));
    }

    /// An agent running thousands of tasks re-registers in frames that fit: its task reports
    /// go ahead of `Register` in as many messages as needed, in order, none lost.
    #[test]
    fn a_registration_with_thousands_of_tasks_goes_out_in_frames_that_fit() {
        let mut h = harness();
        let n = 12_000;
        for i in 0..n {
            let task = command_task(&format!("t{i:05}"), &"x".repeat(100));
            let key = TaskKey { framework_id: FrameworkId::new("fw"), task_id: task.task_id.clone() };
            let (_, done) = tokio::sync::watch::channel(false);
            let handle = TaskHandle::with_kill(Box::new(|| {}), done);
            let entry = TaskEntry {
                task,
                run_dir: PathBuf::new(),
                state: TaskState::Running,
                handle,
                ended: false,
                disk_kill: None,
                executor_uid: None,
            };
            h.core.tasks.insert(key, entry);
        }
        h.core.connected(Instant::now());
        let out = h.core.take_outbox();
        assert!(out.len() >= 2, "{} messages: more than one frame of reports", out.len());
        let mut ids = Vec::new();
        for (i, m) in out.iter().enumerate() {
            assert!(agora_sdk::frame::encode(m).is_ok(), "message {i} does not fit in a frame");
            match m {
                AgentMessage::TaskReports(r) if i + 1 < out.len() => {
                    ids.extend(r.iter().map(|t| t.task.task_id.clone()))
                }
                AgentMessage::Register { tasks, .. } if i + 1 == out.len() => {
                    ids.extend(tasks.iter().map(|t| t.task.task_id.clone()))
                }
                other => panic!("unexpected message {i}: {other:?}"),
            }
        }
        let expected: Vec<TaskId> = (0..n).map(|i| TaskId::new(format!("t{i:05}"))).collect();
        assert_eq!(ids, expected, "every task once, in order");
    }

    /// Every change goes to the checkpoint: a core restored from it (a restarted agent)
    /// re-registers the task and resends its unacknowledged updates in their order.
    #[tokio::test]
    async fn a_restored_core_resends_unacknowledged_updates_in_order() {
        let mut h = harness();
        let dir = h._dir.path().join("checkpoint");
        let ckpt = Checkpointer::open(&dir, 0, checkpoint::State::default()).expect("open");
        h.core.set_checkpointer(ckpt);
        let now = Instant::now();
        h.core.connected(now);
        h.core.take_outbox();
        let fw = FrameworkId::new("fw");
        h.core.run_task(fw.clone(), command_task("t", "exit 3"), now);
        let running = collect(&mut h, 1).await;
        let (k, ev) =
            tokio::time::timeout(Duration::from_secs(10), h.rx.recv()).await.expect("in time").expect("ev");
        h.core.task_event(k, ev, Instant::now());
        h.core.flush_checkpoint().expect("flush");
        // The agent dies here: RUNNING and FAILED unacknowledged.
        let loaded = checkpoint::load(&dir).expect("load").expect("some");
        let key = (fw.clone(), TaskId::new("t"));
        assert_eq!(loaded.state.tasks[&key].state, TaskState::Failed);
        assert!(loaded.state.tasks[&key].ended);
        let queued: Vec<TaskState> = loaded.state.updates[&key].iter().map(|s| s.state).collect();
        assert_eq!(queued, [TaskState::Running, TaskState::Failed]);

        let mut h2 = harness();
        h2.core.restore(&loaded.state, HashMap::new(), Instant::now());
        h2.core.connected(Instant::now());
        let out = h2.core.take_outbox();
        match out.as_slice() {
            [AgentMessage::Register { tasks, .. }, AgentMessage::StatusUpdate(s), AgentMessage::LatestState(l)] =>
            {
                assert_eq!((tasks.len(), tasks[0].state), (1, TaskState::Failed));
                assert_eq!(s.uuid, running[0].uuid, "the same RUNNING again, first");
                assert_eq!(l.state, TaskState::Failed, "the master hears of the newest state meanwhile");
            }
            other => panic!("unexpected {other:?}"),
        }
        ack(&mut h2, &running[0]);
        let failed = statuses(&mut h2.core);
        assert_eq!((failed.len(), failed[0].state, failed[0].exit_code), (1, TaskState::Failed, Some(3)));
        ack(&mut h2, &failed[0]);
        assert!(h2.core.tasks.is_empty(), "forgotten once its terminal update is acknowledged");
    }

    #[tokio::test]
    async fn kill_unknown_duplicate_and_framework_shutdown() {
        let mut h = harness();
        let now = Instant::now();
        h.core.connected(now);
        h.core.take_outbox();
        let fw = FrameworkId::new("fw");
        h.core.kill_task(fw.clone(), TaskId::new("ghost"), now);
        let lost = statuses(&mut h.core);
        assert_eq!((lost[0].state, lost[0].reason.as_str()), (TaskState::Lost, "unknown task"));

        h.core.run_task(fw.clone(), command_task("s", "sleep 30"), now);
        h.core.run_task(fw.clone(), command_task("s", "sleep 30"), now);
        let dup = statuses(&mut h.core);
        assert_eq!((dup[0].state, dup[0].reason.as_str()), (TaskState::Error, "duplicate task id"));
        assert_eq!(dup[0].uuid, None, "not part of the running task's update stream");

        let running = collect(&mut h, 1).await;
        assert_eq!(running[0].state, TaskState::Running);
        ack(&mut h, &running[0]);
        h.core.shutdown_framework(&fw);
        let killing = collect(&mut h, 1).await;
        assert_eq!(killing[0].state, TaskState::Killing);
        ack(&mut h, &killing[0]);
        let killed = collect(&mut h, 1).await;
        assert_eq!((killed[0].state, killed[0].reason.as_str()), (TaskState::Killed, "killed"));
        assert_eq!(killed[0].signal, Some(libc::SIGTERM));
        assert_eq!(h.core.live_tasks(), 0);
    }

    /// Everything scheduled for removal so far (as if the delay had passed).
    fn scheduled(core: &mut Core) -> Vec<PathBuf> {
        core.take_due_sandboxes(SystemTime::now() + Duration::from_secs(86_400), Duration::ZERO)
    }

    /// A finished native task's sandbox is scheduled once its terminal update is acknowledged,
    /// not before; a running task's never is.
    #[tokio::test]
    async fn a_finished_and_acknowledged_task_s_sandbox_is_scheduled_a_running_one_never() {
        let mut h = harness();
        let now = Instant::now();
        h.core.connected(now);
        h.core.take_outbox();
        let fw = FrameworkId::new("fw");
        h.core.run_task(fw.clone(), command_task("sleeper", "sleep 30"), now);
        let sleeper = TaskKey { framework_id: fw.clone(), task_id: TaskId::new("sleeper") };
        let sleeper_dir = h.core.sandbox(&sleeper).expect("sandbox").to_path_buf();
        let running = collect(&mut h, 1).await;
        ack(&mut h, &running[0]);
        h.core.run_task(fw.clone(), command_task("t", "echo hi"), now);
        let key = TaskKey { framework_id: fw.clone(), task_id: TaskId::new("t") };
        let dir = h.core.sandbox(&key).expect("sandbox").to_path_buf();
        let mut ups = collect(&mut h, 1).await;
        ack(&mut h, &ups[0]);
        ups.extend(collect(&mut h, 1).await);
        assert_eq!(ups[1].state, TaskState::Finished);
        assert!(scheduled(&mut h.core).is_empty(), "nothing before the terminal update is acknowledged");
        ack(&mut h, &ups[1]);
        assert!(!h.core.tasks.contains_key(&key));
        assert_eq!(scheduled(&mut h.core), std::slice::from_ref(&dir));
        assert!(!h.core.sandboxes_in_use().contains(&dir));
        assert!(h.core.sandboxes_in_use().contains(&sleeper_dir), "the running task's sandbox is in use");
        // Not due before its delay.
        h.core.schedule_sandboxes([(dir.clone(), SystemTime::now())]);
        assert!(h.core.take_due_sandboxes(SystemTime::now(), Duration::from_secs(3600)).is_empty());
        h.core.kill_task(fw.clone(), TaskId::new("sleeper"), Instant::now());
        assert_eq!(collect(&mut h, 1).await[0].state, TaskState::Killing);
        assert!(scheduled(&mut h.core).iter().all(|d| d != &sleeper_dir), "killed but not acknowledged yet");
    }

    fn insert(core: &mut Core, fw: &FrameworkId, id: &str, kind: TaskKind, run_dir: &Path, ended: bool) {
        let task = TaskInfo { kind, ..command_task(id, "true") };
        let (_, done) = tokio::sync::watch::channel(ended);
        let handle = TaskHandle::with_kill(Box::new(|| {}), done);
        let state = if ended { TaskState::Finished } else { TaskState::Running };
        let entry = TaskEntry {
            task,
            run_dir: run_dir.to_path_buf(),
            state,
            handle,
            ended,
            disk_kill: None,
            executor_uid: None,
        };
        core.tasks.insert(TaskKey { framework_id: fw.clone(), task_id: TaskId::new(id) }, entry);
    }

    fn finish_and_forget(core: &mut Core, fw: &FrameworkId, id: &str) {
        let key = TaskKey { framework_id: fw.clone(), task_id: TaskId::new(id) };
        if let Some(e) = core.tasks.get_mut(&key) {
            e.ended = true;
            e.state.transition(TaskState::Finished).expect("a running task may finish");
        }
        core.forget_if_done(&key);
        assert!(!core.tasks.contains_key(&key));
    }

    /// A framework executor's run is shared by its tasks: it is scheduled only once the
    /// executor ended and no task record points into it. A Wasm task's own directory goes when
    /// it is forgotten, its run stays while the run is live.
    #[test]
    fn executor_runs_are_scheduled_only_when_the_executor_ended_and_its_tasks_are_forgotten() {
        let mut h = harness();
        let fw = FrameworkId::new("fw");
        let exec = ExecutorId::new("ex");
        let run = h._dir.path().join("frameworks/fw/executors/ex/runs/r1");
        let custom = TaskKind::Executor(Box::new(agora_sdk::proto::ExecutorTask {
            executor: agora_sdk::proto::ExecutorInfo {
                executor_id: exec.clone(),
                name: "ex".into(),
                command: agora_sdk::proto::CommandInfo {
                    argv: vec!["./ex".into()],
                    shell: false,
                    env: vec![],
                },
                resources: Resources::cpus(100),
                fetch: vec![],
            },
            data: vec![],
        }));
        h.core.executor_runs.insert((fw.clone(), exec.clone(), None), run.clone());
        insert(&mut h.core, &fw, "a", custom.clone(), &run, false);
        insert(&mut h.core, &fw, "b", custom, &run, false);
        assert!(h.core.sandboxes_in_use().contains(&run));
        finish_and_forget(&mut h.core, &fw, "a");
        assert!(scheduled(&mut h.core).is_empty(), "the executor still runs");
        h.core.executor_event(executors::ExecutorEvent::Exited {
            exec: (fw.clone(), exec, None),
            message: "x".into(),
        });
        assert!(scheduled(&mut h.core).is_empty(), "task b's record still points into the run");
        finish_and_forget(&mut h.core, &fw, "b");
        assert_eq!(scheduled(&mut h.core), [run]);

        let wasm_run = h._dir.path().join("frameworks/fw/executors/agora-wasm/runs/r2");
        let wasm = TaskKind::Wasm(Box::new(agora_sdk::proto::WasmInfo {
            module: agora_sdk::proto::ArtifactRef { digest: agora_sdk::proto::Digest::of(b"m"), size: 1 },
            args: vec![],
            env: vec![],
            dirs: vec![],
            fuel: None,
            timeout: None,
        }));
        h.core.executor_runs.insert((fw.clone(), wasm.executor_id(), None), wasm_run.clone());
        insert(&mut h.core, &fw, "w1", wasm.clone(), &wasm_run.join("tasks/w1"), false);
        insert(&mut h.core, &fw, "w2", wasm, &wasm_run.join("tasks/w2"), false);
        let in_use = h.core.sandboxes_in_use();
        assert!(in_use.contains(&wasm_run) && in_use.contains(&wasm_run.join("tasks/w2")));
        finish_and_forget(&mut h.core, &fw, "w1");
        assert_eq!(scheduled(&mut h.core), [wasm_run.join("tasks/w1")], "the live run stays");
        // The framework is shut down: its Wasm run goes once its last task is forgotten.
        h.core.shutdown_framework(&fw);
        assert!(scheduled(&mut h.core).is_empty(), "w2 still runs");
        finish_and_forget(&mut h.core, &fw, "w2");
        let mut got = scheduled(&mut h.core);
        got.sort();
        assert_eq!(got, [wasm_run.clone(), wasm_run.join("tasks/w2")]);
    }

    /// The disk check looks at live command tasks with their limit (the agent's default for
    /// those without), at ended ones once more for their output, and kills one over its limit:
    /// its end becomes TASK_FAILED `disk limit exceeded` with the check's message.
    #[test]
    fn a_task_over_its_disk_is_killed_and_ends_disk_limit_exceeded() {
        let mut h = harness();
        h.core.set_disk_config(crate::disk::DiskConfig {
            default_task_disk: Some(5 << 20),
            ..crate::disk::DiskConfig::default()
        });
        let fw = FrameworkId::new("fw");
        let dir = h._dir.path().to_path_buf();
        let killed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let k = killed.clone();
        let (_, done) = tokio::sync::watch::channel(false);
        let handle = TaskHandle::with_kill(
            Box::new(move || k.store(true, std::sync::atomic::Ordering::Relaxed)),
            done,
        );
        let mut task = command_task("big", "true");
        task.resources.disk = 1 << 20;
        let entry = TaskEntry {
            task,
            run_dir: dir.join("big"),
            state: TaskState::Running,
            handle,
            ended: false,
            disk_kill: None,
            executor_uid: None,
        };
        h.core.tasks.insert(TaskKey { framework_id: fw.clone(), task_id: TaskId::new("big") }, entry);
        insert(&mut h.core, &fw, "nodisk", command_task("nodisk", "true").kind, &dir.join("nodisk"), false);
        insert(&mut h.core, &fw, "done", command_task("done", "true").kind, &dir.join("done"), true);
        let mut checks = h.core.disk_checks();
        checks.sort_by(|a, b| a.key.task_id.cmp(&b.key.task_id));
        let got: Vec<_> = checks.iter().map(|c| (c.key.task_id.as_str(), c.limit)).collect();
        assert_eq!(got, [("big", Some(1 << 20)), ("nodisk", Some(5 << 20))]);

        let key = TaskKey { framework_id: fw.clone(), task_id: TaskId::new("big") };
        let over = crate::disk::OverLimit::Bytes { used: 3 << 20, limit: 1 << 20 };
        let why = over.to_string();
        assert_eq!(why, "the task's sandbox uses 3MiB on disk, more than its disk limit of 1MiB");
        h.core.disk_checked(vec![crate::disk::Outcome {
            key: key.clone(),
            usage: None,
            over: Some(over),
            executor: None,
        }]);
        assert!(killed.load(std::sync::atomic::Ordering::Relaxed), "the task was killed");
        assert!(h.core.disk_checks().iter().all(|c| c.key != key), "not checked again while it dies");
        let end = Termination {
            state: TaskState::Killed,
            reason: "killed".into(),
            message: "killed on request".into(),
            exit_code: None,
            signal: Some(15),
            usage: None,
        };
        h.core.connected(Instant::now());
        statuses(&mut h.core);
        h.core.task_event(key.clone(), TaskEvent::Terminated(end), Instant::now());
        let st = statuses(&mut h.core);
        let last = st.last().expect("the end");
        assert_eq!((last.state, &last.reason), (TaskState::Failed, &Reason::DiskLimitExceeded));
        assert!(last.message.starts_with(&why), "{}", last.message);
        // Ended: checked once more for its output, without a limit, then no more.
        let again: Vec<_> = h.core.disk_checks().into_iter().filter(|c| c.key == key).collect();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].limit, None);
        assert!(h.core.disk_checks().iter().all(|c| c.key != key));
    }

    /// Supervisor events that would move a task backwards (RUNNING after KILLING, anything
    /// after its end) change nothing and send no update; the end still goes out once.
    #[test]
    fn events_that_move_a_task_backwards_are_not_reported() {
        let mut h = harness();
        let fw = FrameworkId::new("fw");
        let dir = h._dir.path().to_path_buf();
        insert(&mut h.core, &fw, "t", command_task("t", "true").kind, &dir.join("t"), false);
        let key = TaskKey { framework_id: fw.clone(), task_id: TaskId::new("t") };
        h.core.connected(Instant::now());
        h.core.take_outbox();
        let state = |h: &Harness| h.core.tasks[&key].state;
        h.core.task_event(key.clone(), TaskEvent::Killing, Instant::now());
        let killing = statuses(&mut h.core);
        assert_eq!(killing.iter().map(|s| s.state).collect::<Vec<_>>(), [TaskState::Killing]);
        let pid = std::process::id();
        h.core.task_event(key.clone(), TaskEvent::Running { pid, message: None }, Instant::now());
        assert_eq!(state(&h), TaskState::Killing);
        h.core.poll_updates(Instant::now() + Duration::from_secs(1));
        assert!(statuses(&mut h.core).iter().all(|s| s.state == TaskState::Killing), "no RUNNING");
        let end = |state| Termination {
            state,
            reason: "killed".into(),
            message: String::new(),
            exit_code: None,
            signal: None,
            usage: None,
        };
        h.core.task_event(key.clone(), TaskEvent::Terminated(end(TaskState::Killed)), Instant::now());
        assert_eq!(state(&h), TaskState::Killed);
        let live = h.core.live_tasks();
        h.core.task_event(key.clone(), TaskEvent::Terminated(end(TaskState::Failed)), Instant::now());
        h.core.task_event(key.clone(), TaskEvent::Killing, Instant::now());
        assert_eq!(state(&h), TaskState::Killed);
        assert_eq!(h.core.live_tasks(), live, "ended once");
        // Behind KILLING: its end alone, once.
        ack(&mut h, &killing[0]);
        let ended = statuses(&mut h.core);
        assert_eq!(ended.iter().map(|s| s.state).collect::<Vec<_>>(), [TaskState::Killed]);
        ack(&mut h, &ended[0]);
        assert!(!h.core.updates.has_pending(&key));
    }

    /// A framework executor's sandbox is held to its own disk plus its live tasks'; over it,
    /// every task of it is killed.
    #[test]
    fn an_executor_sandbox_is_held_to_the_disk_of_it_and_its_tasks() {
        let mut h = harness();
        let fw = FrameworkId::new("fw");
        let exec = ExecutorId::new("ex");
        let run = h._dir.path().join("run");
        let kind = |disk: u64| {
            TaskKind::Executor(Box::new(agora_sdk::proto::ExecutorTask {
                executor: agora_sdk::proto::ExecutorInfo {
                    executor_id: exec.clone(),
                    name: "ex".into(),
                    command: agora_sdk::proto::CommandInfo {
                        argv: vec!["./ex".into()],
                        shell: false,
                        env: vec![],
                    },
                    resources: Resources { disk, ..Resources::cpus(100) },
                    fetch: vec![],
                },
                data: vec![],
            }))
        };
        let kills = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for (id, disk) in [("t1", 1u64 << 20), ("t2", 2 << 20)] {
            let k = kills.clone();
            let (_, done) = tokio::sync::watch::channel(false);
            let handle = TaskHandle::with_kill(
                Box::new(move || {
                    k.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }),
                done,
            );
            let mut task = TaskInfo { kind: kind(4 << 20), ..command_task(id, "true") };
            task.resources.disk = disk;
            let entry = TaskEntry {
                task,
                run_dir: run.clone(),
                state: TaskState::Running,
                handle,
                ended: false,
                disk_kill: None,
                executor_uid: None,
            };
            h.core.tasks.insert(TaskKey { framework_id: fw.clone(), task_id: TaskId::new(id) }, entry);
        }
        h.core.executor_runs.insert((fw.clone(), exec.clone(), None), run.clone());
        let checks = h.core.disk_checks();
        assert_eq!(checks.len(), 1, "{checks:?}");
        assert_eq!((checks[0].limit, checks[0].executor.as_ref()), (Some(7 << 20), Some(&exec)));
        let over = crate::disk::OverLimit::Entries { limit: 7 << 20 };
        let why = over.to_string();
        let o = crate::disk::Outcome {
            key: checks[0].key.clone(),
            usage: None,
            over: Some(over),
            executor: checks[0].executor.clone(),
        };
        h.core.disk_checked(vec![o]);
        assert_eq!(kills.load(std::sync::atomic::Ordering::Relaxed), 2, "both tasks are killed");
        assert!(h.core.tasks.values().all(|e| e.disk_kill.as_deref() == Some(why.as_str())));
        // Without live tasks only its output is capped.
        assert_eq!(h.core.disk_checks()[0].limit, None);
    }
}
