//! Sandbox collection: run directories released when nothing points into them, scheduled,
//! and handed out for removal once old enough.

use super::*;

impl Core {
    /// An executor's run directory nobody may start in any more: scheduled for removal unless
    /// its executor still runs or a task record still points into it (then it is considered
    /// again when that task is forgotten).
    pub(super) fn release_run(&mut self, run: PathBuf) {
        if self.executor_runs.values().any(|r| r == &run) {
            return;
        }
        // Only reached for framework and Wasm executors' tasks whose run ended: rare, so the
        // walk over the tasks is not on the hot path of native tasks.
        if self.tasks.values().any(|e| e.run_dir.starts_with(&run)) {
            return;
        }
        self.schedule_sandbox(run);
    }

    pub(super) fn schedule_sandbox(&mut self, dir: PathBuf) {
        tracing::debug!(dir = %dir.display(), "sandbox scheduled for removal");
        self.gc.schedule(dir, SystemTime::now());
        metrics::gauge!(crate::metrics::SANDBOXES_SCHEDULED).set(self.gc.len() as f64);
    }

    /// Every sandbox a task or executor of this core uses (a task's run, the run of the
    /// executor it shares): what a restarted agent must not collect.
    pub fn sandboxes_in_use(&self) -> std::collections::HashSet<PathBuf> {
        let mut out: std::collections::HashSet<PathBuf> = self.executor_runs.values().cloned().collect();
        for e in self.tasks.values() {
            if matches!(e.task.kind, TaskKind::Wasm(_)) {
                out.extend(wasm_run_of(&e.run_dir));
            }
            out.insert(e.run_dir.clone());
        }
        out
    }

    /// Schedules sandboxes found unused since `since` (a restarted agent's leftovers).
    pub fn schedule_sandboxes(&mut self, dirs: impl IntoIterator<Item = (PathBuf, SystemTime)>) {
        for (dir, since) in dirs {
            self.gc.schedule(dir, since);
        }
        metrics::gauge!(crate::metrics::SANDBOXES_SCHEDULED).set(self.gc.len() as f64);
    }

    /// Takes the sandboxes due for removal at `now` when finished ones are kept `keep`.
    pub fn take_due_sandboxes(&mut self, now: SystemTime, keep: Duration) -> Vec<PathBuf> {
        let due = self.gc.due(now, keep);
        for dir in &due {
            self.collected.insert(dir.clone());
        }
        if !due.is_empty() {
            metrics::gauge!(crate::metrics::SANDBOXES_SCHEDULED).set(self.gc.len() as f64);
        }
        due
    }

    /// A framework executor that outlived the agent's last run, with no live task recorded,
    /// keeps its run directory: its next tasks share it, and it is collected when it ends.
    pub fn adopt_executor_run(&mut self, exec: executors::ExecKey, run: PathBuf) {
        self.executor_runs.entry(exec).or_insert(run);
    }
}
