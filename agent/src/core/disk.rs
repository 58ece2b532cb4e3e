//! The agent core's side of the disk isolator: which sandboxes the periodic check walks, with
//! what limit, what it does with the outcomes, and the caches' eviction.

use super::*;

impl Core {
    /// The running command and Wasm tasks whose sandboxes the disk check looks at (a
    /// framework executor's tasks share its sandbox and are not checked).
    /// Tasks that ended since the last call are in once more, without a limit, for their
    /// output's sake. A framework executor's sandbox, shared by its tasks, is held to the sum
    /// of its own `disk` and its live tasks' (the agent's default when that is 0; Mesos's
    /// container limit), and without live tasks its output is still capped.
    pub fn disk_checks(&mut self) -> Vec<crate::disk::Check> {
        let ended = std::mem::take(&mut self.ended_outputs)
            .into_iter()
            .map(|(key, sandbox)| crate::disk::Check { key, sandbox, limit: None, executor: None });
        let mut shared: HashMap<executors::ExecKey, u64> = HashMap::new();
        for (k, e) in &self.tasks {
            if let (TaskKind::Executor(x), false, None) = (&e.task.kind, e.ended, &e.disk_kill) {
                let sum = shared
                    .entry((k.framework_id.clone(), x.executor.executor_id.clone(), e.executor_uid))
                    .or_insert(x.executor.resources.disk);
                *sum = sum.saturating_add(e.task.resources.disk);
            }
        }
        // Keyed by the executor id, for the log lines only.
        let executors: Vec<_> = self
            .executor_runs
            .iter()
            .map(|(exec @ (fw, id, _), run)| crate::disk::Check {
                key: TaskKey { framework_id: fw.clone(), task_id: TaskId::new(id.as_str()) },
                sandbox: run.clone(),
                limit: shared.get(exec).and_then(|d| self.disk.limit_for(*d)),
                executor: Some(id.clone()),
            })
            .collect();
        self.tasks
            .iter()
            .filter(|(_, e)| !e.ended && e.disk_kill.is_none())
            .filter(|(_, e)| matches!(e.task.kind, TaskKind::Command(_) | TaskKind::Wasm(_)))
            .map(|(k, e)| crate::disk::Check {
                key: k.clone(),
                sandbox: e.run_dir.clone(),
                limit: self.disk.limit_for(e.task.resources.disk),
                executor: None,
            })
            .chain(ended)
            .chain(executors)
            .collect()
    }

    /// What the disk check found: tasks over their limit are killed, and end TASK_FAILED with
    /// reason [`Reason::DiskLimitExceeded`].
    pub fn disk_checked(&mut self, outcomes: Vec<crate::disk::Outcome>) {
        for o in outcomes {
            let Some(why) = o.over.map(|w| w.to_string()) else { continue };
            if let Some(id) = o.executor {
                self.executor_over_disk(o.key.framework_id, id, why);
                continue;
            }
            let Some(e) = self.tasks.get_mut(&o.key) else { continue };
            if e.ended || e.disk_kill.is_some() {
                continue;
            }
            tracing::warn!(task_id = %o.key.task_id, framework_id = %o.key.framework_id,
                usage = ?o.usage, "killing a task over its disk limit: {why}");
            metrics::counter!(crate::metrics::TASK_DISK_LIMIT_KILLS).increment(1);
            e.disk_kill = Some(why);
            e.handle.kill();
        }
    }

    /// A framework executor's sandbox is over the limit of it and its tasks: every live task
    /// of it is killed (ending `disk limit exceeded`) and the executor shut down.
    pub(super) fn executor_over_disk(&mut self, fw: FrameworkId, id: ExecutorId, why: String) {
        let mut killed = 0;
        for (k, e) in &mut self.tasks {
            let mine = matches!(&e.task.kind, TaskKind::Executor(x) if x.executor.executor_id == id);
            if k.framework_id == fw && mine && !e.ended && e.disk_kill.is_none() {
                e.disk_kill = Some(why.clone());
                e.handle.kill();
                killed += 1;
            }
        }
        if killed == 0 {
            return;
        }
        tracing::warn!(framework_id = %fw, executor_id = %id, tasks = killed,
            "killing the tasks of an executor whose sandbox is over its disk limit, and the executor: {why}");
        metrics::counter!(crate::metrics::TASK_DISK_LIMIT_KILLS).increment(killed);
        if let Some(support) = &self.executors {
            support.shutdown_executor(fw, id);
        }
    }

    /// The work of bounding the agent's caches (`--cache-size`), keeping what live tasks use;
    /// `None` without a bound or executors.
    pub fn cache_eviction(
        &self,
    ) -> Option<impl FnOnce() -> std::io::Result<crate::cache::Evicted> + Send + 'static> {
        let max = self.disk.cache_size?;
        let executors = self.executors.as_ref()?;
        let keep = self
            .tasks
            .values()
            .filter(|e| !e.ended)
            .flat_map(|e| crate::cache::digests_of(&e.task))
            .collect();
        Some(executors.cache_eviction(keep, max, self.disk.cache_grace))
    }

    /// How often the disk check runs.
    pub fn disk_check_interval(&self) -> Duration {
        self.disk.check_interval
    }

    /// Most bytes kept of each output stream of a task.
    pub fn max_output_size(&self) -> u64 {
        self.disk.max_output_size
    }
}
