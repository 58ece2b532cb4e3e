//! Garbage collection of finished sandboxes.
//!
//! A task's sandbox (its output, the files it wrote) outlives the task so that `agora logs`
//! and people debugging a failure can read it; it is removed `--gc-delay` after the task's
//! record is gone (its terminal update acknowledged), as Mesos does with `--gc_delay`. When
//! the work dir's disk fills up the delay shrinks (Mesos's `--gc_disk_headroom`): with the
//! disk `usage` (0–1) used, sandboxes are kept `delay × max(0, 1 − headroom − usage)`, so a
//! full disk removes finished sandboxes at once. At most [`MAX_SCHEDULED`] finished sandboxes
//! wait; past that the oldest goes first, whatever its age, so the bookkeeping is bounded
//! even at tens of thousands of tasks per second.
//!
//! Nothing of this is checkpointed: a restarted agent schedules the sandboxes it finds on disk
//! that no recovered task or executor uses ([`orphaned_runs`]), aged by their modification
//! time.

use std::collections::{HashSet, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Most finished sandboxes waiting for removal; past it the oldest is removed first.
pub const MAX_SCHEDULED: usize = 100_000;
/// How often the agent looks at the disk and removes what is due.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
/// `--gc-delay` when none is given.
pub const DEFAULT_DELAY: Duration = Duration::from_secs(60 * 60);
/// `--gc-disk-headroom` when none is given.
pub const DEFAULT_DISK_HEADROOM: f64 = 0.1;

/// How sandboxes are collected.
#[derive(Clone, Debug, PartialEq)]
pub struct GcConfig {
    /// How long a finished sandbox is kept when the disk has room (`--gc-delay`).
    pub delay: Duration,
    /// Fraction of the disk to keep free (`--gc-disk-headroom`, 0–1).
    pub disk_headroom: f64,
    /// How often due sandboxes are removed.
    pub interval: Duration,
}

impl Default for GcConfig {
    fn default() -> Self {
        Self { delay: DEFAULT_DELAY, disk_headroom: DEFAULT_DISK_HEADROOM, interval: DEFAULT_INTERVAL }
    }
}

/// Why a GC setting was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GcConfigError {
    /// The headroom is not a fraction.
    #[error("--gc-disk-headroom must be between 0 and 1, not {0}")]
    Headroom(f64),
}

impl GcConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), GcConfigError> {
        if !(0.0..=1.0).contains(&self.disk_headroom) {
            return Err(GcConfigError::Headroom(self.disk_headroom));
        }
        Ok(())
    }

    /// How long finished sandboxes are kept with `usage` (0–1) of the disk used.
    pub fn effective_delay(&self, usage: f64) -> Duration {
        let usage = if usage.is_finite() { usage.clamp(0.0, 1.0) } else { 0.0 };
        let factor = (1.0 - self.disk_headroom - usage).max(0.0);
        self.delay.mul_f64(factor)
    }
}

/// Finished sandboxes waiting for removal, oldest first.
#[derive(Debug, Default)]
pub struct Scheduled {
    queue: VecDeque<(SystemTime, PathBuf)>,
}

impl Scheduled {
    /// `dir` is no longer used since `since`. Entries are expected in roughly increasing
    /// `since` order (task ends); an older one is placed where it belongs.
    pub fn schedule(&mut self, dir: PathBuf, since: SystemTime) {
        let at = self.queue.partition_point(|(t, _)| *t <= since);
        self.queue.insert(at, (since, dir));
    }

    /// Number of sandboxes waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether none is waiting.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Takes the sandboxes due at `now` when they are kept `keep`, and the oldest ones beyond
    /// [`MAX_SCHEDULED`].
    pub fn due(&mut self, now: SystemTime, keep: Duration) -> Vec<PathBuf> {
        let mut out = Vec::new();
        while self.queue.len() > MAX_SCHEDULED {
            if let Some((_, dir)) = self.queue.pop_front() {
                out.push(dir);
            }
        }
        while let Some((since, _)) = self.queue.front() {
            let due = since.checked_add(keep).is_none_or(|t| t <= now);
            if !due {
                break;
            }
            if let Some((_, dir)) = self.queue.pop_front() {
                out.push(dir);
            }
        }
        out
    }

    /// Forgets a directory that is in use again (never happens for task runs, whose
    /// directories are unique; kept for executors' runs).
    pub fn unschedule(&mut self, dir: &Path) {
        self.queue.retain(|(_, d)| d != dir);
    }
}

/// The sandboxes most recently handed to removal (at most [`MAX_COLLECTED`]), so that a
/// request for a finished task's output can tell "removed by garbage collection" from a task
/// that never wrote any.
#[derive(Debug, Default)]
pub struct Collected {
    order: VecDeque<PathBuf>,
    set: HashSet<PathBuf>,
}

/// Most removed sandboxes remembered by [`Collected`].
pub const MAX_COLLECTED: usize = 10_000;

impl Collected {
    /// Remembers `dir` as removed.
    pub fn insert(&mut self, dir: PathBuf) {
        if self.set.insert(dir.clone()) {
            self.order.push_back(dir);
        }
        while self.order.len() > MAX_COLLECTED {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }

    /// Whether `dir` was removed (recently enough to be remembered).
    pub fn contains(&self, dir: &Path) -> bool {
        self.set.contains(dir)
    }
}

/// Fraction (0–1) of the file system holding `path` that is used, as `df` counts it for an
/// unprivileged user.
pub fn disk_usage(path: &Path) -> io::Result<f64> {
    let space = crate::resources::fs_space(path)?;
    if space.total == 0 {
        return Ok(0.0);
    }
    Ok(1.0 - space.avail as f64 / space.total as f64)
}

/// Every run directory under `frameworks_dir` (`<fw>/executors/<x>/runs/<run>`, and each
/// Wasm task's `<run>/tasks/<task>` inside a run that is in use) that is not in `in_use`,
/// with its modification time: what a restarted agent schedules for removal.
pub fn orphaned_runs(frameworks_dir: &Path, in_use: &HashSet<PathBuf>) -> Vec<(PathBuf, SystemTime)> {
    let mut out = Vec::new();
    for fw in subdirs(frameworks_dir) {
        for exec in subdirs(&fw.join("executors")) {
            for run in subdirs(&exec.join("runs")) {
                if in_use.contains(&run) {
                    for task in subdirs(&run.join("tasks")) {
                        if !in_use.contains(&task) {
                            let t = modified(&task);
                            out.push((task, t));
                        }
                    }
                } else {
                    let t = modified(&run);
                    out.push((run, t));
                }
            }
        }
    }
    out.sort_by_key(|(_, t)| *t);
    out
}

/// Removes `dirs` and then the directories above them left empty, up to (not including)
/// `frameworks_dir` (see `prune_empty_parents` for what stays). Returns how many sandboxes were removed; failures are logged, never fatal.
pub fn remove(frameworks_dir: &Path, dirs: &[PathBuf]) -> usize {
    let mut removed = 0;
    for dir in dirs {
        if !dir.starts_with(frameworks_dir) || dir == frameworks_dir {
            tracing::warn!(dir = %dir.display(), "not removing a directory outside the sandboxes");
            continue;
        }
        match std::fs::remove_dir_all(dir) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a finished sandbox");
                continue;
            }
        }
        prune_empty_parents(frameworks_dir, dir);
    }
    removed
}

/// Removes the parents of `dir` that only held it: `runs/`, then the executor directory when
/// nothing but a finished task's `task.json` is left, then the framework's. A parent that
/// still holds anything else, or a Wasm run's `tasks/`, stops the walk.
fn prune_empty_parents(frameworks_dir: &Path, dir: &Path) {
    let mut cur = dir.parent();
    while let Some(p) = cur {
        // A Wasm run's `tasks/` belongs to the run: the next Wasm task of that run is created
        // in it, so it goes only with its run.
        if p == frameworks_dir
            || !p.starts_with(frameworks_dir)
            || p.file_name().is_some_and(|n| n == "tasks")
        {
            break;
        }
        let entries: Vec<_> = match std::fs::read_dir(p) {
            Ok(rd) => rd.filter_map(Result::ok).map(|e| e.file_name()).collect(),
            Err(_) => break,
        };
        // A native task's executor directory keeps `task.json` next to `runs/`; with the
        // runs gone it belongs to a finished task (the caller only removes unused runs) —
        // unless a task of the same id was launched again a moment ago and has not created
        // its run yet: a recent `task.json` is left alone.
        let only_checkpoint = entries.len() == 1 && entries[0] == "task.json";
        if only_checkpoint && !recently_modified(&p.join("task.json")) {
            let _ = std::fs::remove_file(p.join("task.json"));
        } else if !entries.is_empty() {
            break;
        }
        if std::fs::remove_dir(p).is_err() {
            break;
        }
        cur = p.parent();
    }
}

/// Modified within the last minute (or of unknown age).
fn recently_modified(file: &Path) -> bool {
    let age = std::fs::metadata(file).and_then(|m| m.modified()).map(|t| t.elapsed());
    !matches!(age, Ok(Ok(age)) if age >= Duration::from_secs(60))
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn modified(dir: &Path) -> SystemTime {
    std::fs::metadata(dir).and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delay_shrinks_as_the_disk_fills() {
        let c = GcConfig { delay: Duration::from_secs(1000), disk_headroom: 0.1, interval: DEFAULT_INTERVAL };
        assert_eq!(c.effective_delay(0.0), Duration::from_secs(900));
        assert_eq!(c.effective_delay(0.5), Duration::from_secs(400));
        assert_eq!(c.effective_delay(0.9), Duration::ZERO);
        assert_eq!(c.effective_delay(1.5), Duration::ZERO);
        assert_eq!(c.effective_delay(f64::NAN), Duration::from_secs(900));
        assert!(c.validate().is_ok());
        let bad = GcConfig { disk_headroom: 1.5, ..c };
        assert_eq!(bad.validate(), Err(GcConfigError::Headroom(1.5)));
    }

    #[test]
    fn due_takes_the_old_enough_in_order_and_bounds_the_queue() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut s = Scheduled::default();
        s.schedule("/w/frameworks/b".into(), t0 + Duration::from_secs(10));
        s.schedule("/w/frameworks/a".into(), t0);
        s.schedule("/w/frameworks/c".into(), t0 + Duration::from_secs(20));
        let keep = Duration::from_secs(100);
        assert!(s.due(t0 + Duration::from_secs(99), keep).is_empty());
        assert_eq!(
            s.due(t0 + Duration::from_secs(110), keep),
            [PathBuf::from("/w/frameworks/a"), PathBuf::from("/w/frameworks/b")]
        );
        assert_eq!(s.len(), 1);
        s.unschedule(Path::new("/w/frameworks/c"));
        assert!(s.is_empty());

        for i in 0..(MAX_SCHEDULED + 5) {
            s.schedule(PathBuf::from(format!("/x/{i}")), t0 + Duration::from_secs(i as u64));
        }
        let over = s.due(t0, keep);
        assert_eq!(over.len(), 5, "the oldest beyond the bound go first");
        assert_eq!(over[0], PathBuf::from("/x/0"));
        assert_eq!(s.len(), MAX_SCHEDULED);
    }

    #[test]
    fn orphans_are_runs_not_in_use_and_removal_prunes_empty_parents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fws = dir.path().join("frameworks");
        let native = fws.join("fw1/executors/t1");
        let old_run = native.join("runs/r1");
        std::fs::create_dir_all(&old_run).expect("mkdir");
        std::fs::write(old_run.join("stdout"), b"x").expect("write");
        std::fs::write(native.join("task.json"), b"{}").expect("write");
        let old = SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(native.join("task.json"))
            .and_then(|f| f.set_modified(old))
            .expect("age task.json");
        let wasm_run = fws.join("fw1/executors/agora-wasm/runs/r2");
        let live_task = wasm_run.join("tasks/live");
        let done_task = wasm_run.join("tasks/done");
        std::fs::create_dir_all(&live_task).expect("mkdir");
        std::fs::create_dir_all(&done_task).expect("mkdir");
        let in_use: HashSet<PathBuf> = [wasm_run.clone(), live_task.clone()].into_iter().collect();
        let found: Vec<PathBuf> = orphaned_runs(&fws, &in_use).into_iter().map(|(p, _)| p).collect();
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found.contains(&old_run) && found.contains(&done_task), "{found:?}");

        assert_eq!(remove(&fws, &found), 2);
        assert!(!native.exists(), "the finished task's directory went with its last run");
        assert!(live_task.exists() && !done_task.exists());
        // The last finished task of a live Wasm run leaves the run's `tasks/` in place.
        assert_eq!(remove(&fws, std::slice::from_ref(&live_task)), 1);
        assert!(wasm_run.join("tasks").is_dir(), "a live run's tasks/ stays");
        assert!(fws.join("fw1").exists(), "the framework still has a live executor");
        // Never outside the sandboxes.
        assert_eq!(remove(&fws, &[dir.path().to_path_buf()]), 0);
        assert!(dir.path().exists());
    }
}
