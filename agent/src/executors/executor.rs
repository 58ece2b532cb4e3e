//! One executor process as the manager keeps it: where it is in its life (`Lifecycle`: starting
//! with queued work, recovering, connected, idle since), its tasks, cgroup and checkpoint record.

use super::*;

/// Work for an executor that has not said hello yet, sent in this order once it does.
#[derive(Default)]
pub(super) struct Pending {
    /// Launches.
    pub(super) launches: Vec<LaunchItem>,
    /// Kills of those tasks (after the launches, so that it knows them).
    pub(super) kills: Vec<TaskId>,
    /// Its framework asked for a shutdown.
    pub(super) shutdown: bool,
}

/// After reconnecting to a restarted agent: the tasks the executor still runs and its last
/// update number. Once every update up to that number is handled, the tasks it neither runs
/// nor reported ended are failed.
pub(super) struct Reconcile {
    pub(super) running: std::collections::HashSet<TaskId>,
    pub(super) last_seq: u64,
}

/// Where an executor process is in its life. Work queues only while it is not connected;
/// only a connected executor has a channel and something to reconcile; an executor without
/// tasks is idle since a time (the built-in ones are shut down after the idle timeout). A
/// starting executor is never idle: it was started for a task.
pub(super) enum Lifecycle {
    /// Spawned by this agent, waiting for its hello.
    Starting(Pending),
    /// Adopted after the agent's restart, waiting for it to connect again.
    Recovering { pending: Pending, idle_since: Option<Instant> },
    /// Connected: frames go straight to it.
    Ready {
        to_executor: mpsc::UnboundedSender<AgentToExecutor>,
        /// Set after it reconnected to the restarted agent, until reconciled.
        reconcile: Option<Reconcile>,
        idle_since: Option<Instant>,
    },
}

pub(super) struct Executor {
    pub(super) serial: u64,
    pub(super) kind: ExecKind,
    pub(super) pid: Option<u32>,
    pub(super) state: Lifecycle,
    pub(super) tasks: HashMap<TaskId, TaskSlot>,
    pub(super) cgroup: Option<Arc<Mutex<Cgroup>>>,
    /// The task set changed since the cgroup was last sized.
    pub(super) resize: bool,
    /// Its socket and log (checkpointed).
    pub(super) socket: PathBuf,
    pub(super) log: PathBuf,
    /// Its process's start time, against pid reuse.
    pub(super) start_time: Option<u64>,
    /// The highest update number handled, and the highest the core acknowledged to it.
    pub(super) seen_seq: u64,
    pub(super) acked_seq: u64,
}

impl Executor {
    /// Its channel, once connected.
    pub(super) fn sender(&self) -> Option<&mpsc::UnboundedSender<AgentToExecutor>> {
        match &self.state {
            Lifecycle::Ready { to_executor, .. } => Some(to_executor),
            Lifecycle::Starting(_) | Lifecycle::Recovering { .. } => None,
        }
    }

    /// Since when it has had no task.
    pub(super) fn idle_since(&self) -> Option<Instant> {
        match &self.state {
            Lifecycle::Starting(_) => None,
            Lifecycle::Recovering { idle_since, .. } | Lifecycle::Ready { idle_since, .. } => *idle_since,
        }
    }

    /// Adopted after the agent's restart and not reconnected yet.
    pub(super) fn recovering(&self) -> bool {
        matches!(self.state, Lifecycle::Recovering { .. })
    }

    /// Marks it idle from now if it has no task (and was not idle already).
    pub(super) fn note_if_idle(&mut self) {
        if !self.tasks.is_empty() {
            return;
        }
        if let Lifecycle::Recovering { idle_since, .. } | Lifecycle::Ready { idle_since, .. } =
            &mut self.state
        {
            idle_since.get_or_insert_with(Instant::now);
        }
    }

    /// Gives it task `launch`: sent now if it is connected (through `launches`, one frame per
    /// executor and batch), else queued for its hello.
    pub(super) fn take_launch(
        &mut self,
        exec: &ExecKey,
        launch: LaunchItem,
        launches: &mut HashMap<ExecKey, Vec<LaunchItem>>,
    ) {
        match &mut self.state {
            Lifecycle::Starting(pending) | Lifecycle::Recovering { pending, .. } => {
                pending.launches.push(launch);
            }
            Lifecycle::Ready { .. } => launches.entry(exec.clone()).or_default().push(launch),
        }
        if let Lifecycle::Recovering { idle_since, .. } | Lifecycle::Ready { idle_since, .. } =
            &mut self.state
        {
            *idle_since = None;
        }
    }

    /// Asks it to shut down: at once, or as soon as it says hello.
    pub(super) fn request_shutdown(&mut self) {
        match &mut self.state {
            Lifecycle::Ready { to_executor, .. } => {
                let _ = to_executor.send(AgentToExecutor::Shutdown);
            }
            Lifecycle::Starting(pending) | Lifecycle::Recovering { pending, .. } => pending.shutdown = true,
        }
    }

    pub(super) fn record(&self, exec: &ExecKey) -> ExecutorRecord {
        ExecutorRecord {
            framework_id: exec.0.clone(),
            executor_id: exec.1.clone(),
            uid: exec.2,
            kind: match &self.kind {
                ExecKind::Wasm => ExecutorKind::Wasm,
                ExecKind::Command => ExecutorKind::Command,
                ExecKind::Custom { info, sandbox } => {
                    ExecutorKind::Custom { info: info.clone(), sandbox: sandbox.clone() }
                }
            },
            serial: self.serial,
            pid: self.pid,
            start_time: self.start_time,
            socket: self.socket.clone(),
            cgroup: self
                .cgroup
                .as_ref()
                .map(|g| g.lock().unwrap_or_else(|p| p.into_inner()).name().to_string()),
            log: self.log.clone(),
            acked_seq: self.acked_seq,
        }
    }
}
