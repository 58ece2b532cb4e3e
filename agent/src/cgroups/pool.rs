//! Fresh task groups made ahead of time, and used ones removed after the task's end, on a
//! thread of their own (the command executor's), so that neither the `mkdir` of a group in every
//! hierarchy (with the kernel populating its control files) nor its `rmdir` (memcg offlining,
//! the cgroup lock) sits on a task's launch or exit path.
//!
//! Only never-used groups are handed out: a group that held a task is removed, never reused
//! (v1 cannot reset all of a group's accounting, e.g. `oom_kill` in `memory.oom_control` or
//! `throttled_time`). A fresh group is created as `pool-<uuid>` with the kernel's defaults and
//! renamed to the task's name when a task takes it (v1 groups can be renamed within their parent;
//! v2 groups cannot, so v2 has no pool); the task's limits are then written exactly as for a
//! group created on the spot. When the pool is empty a task's group is created on the spot.

use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::CgroupManager;

/// Name prefix of the fresh groups (a group below the agent's root that is never a task's).
pub const POOL_PREFIX: &str = "pool-";

enum Job {
    /// Create fresh groups until there are as many as the pool's size.
    Refill,
    /// Remove a used (emptied) group.
    Remove(String),
    /// Finish the removals queued so far, remove the fresh groups, stop.
    Stop,
}

/// Fresh groups and the thread that makes them and removes used ones.
pub struct Pool {
    fresh: Arc<Mutex<Vec<String>>>,
    jobs: Mutex<mpsc::Sender<Job>>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("fresh", &lock(&self.fresh).len()).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Pool {
    /// Starts the thread, which at once creates `size` fresh groups through `manager`.
    pub fn start(manager: Arc<dyn CgroupManager>, size: usize) -> Self {
        let fresh = Arc::new(Mutex::new(Vec::with_capacity(size)));
        let (tx, rx) = mpsc::channel();
        let shared = fresh.clone();
        let worker = std::thread::Builder::new()
            .name("cgroup-pool".into())
            .spawn(move || run(manager.as_ref(), &shared, size, &rx));
        let worker = match worker {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the cgroup pool thread: task cgroups are made on the spot");
                None
            }
        };
        let _ = tx.send(Job::Refill);
        Self { fresh, jobs: Mutex::new(tx), worker: Mutex::new(worker) }
    }

    /// A fresh group's name, if one is ready (and a refill is asked for).
    pub fn take(&self) -> Option<String> {
        let name = lock(&self.fresh).pop();
        if name.is_some() {
            let _ = lock(&self.jobs).send(Job::Refill);
        }
        name
    }

    /// Queues the removal of the emptied group `name`; `false` if the thread is gone (the caller
    /// removes it itself).
    pub fn remove_later(&self, name: String) -> bool {
        lock(&self.jobs).send(Job::Remove(name)).is_ok()
    }

    /// Finishes the queued removals, removes the fresh groups and stops the thread (blocking).
    /// Later removals are the caller's.
    pub fn stop(&self) {
        let _ = lock(&self.jobs).send(Job::Stop);
        if let Some(worker) = lock(&self.worker).take() {
            let _ = worker.join();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(manager: &dyn CgroupManager, fresh: &Mutex<Vec<String>>, size: usize, jobs: &mpsc::Receiver<Job>) {
    let remove = |name: &str| {
        if let Err(e) = manager.remove(name) {
            tracing::warn!(cgroup = %name, error = %e, "cannot remove the task's cgroup");
        }
    };
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Remove(name) => remove(&name),
            Job::Refill => {
                while lock(fresh).len() < size {
                    let name = format!("{POOL_PREFIX}{}", uuid::Uuid::new_v4().simple());
                    match manager.create(&name) {
                        Ok(()) => lock(fresh).push(name),
                        Err(e) => {
                            tracing::debug!(error = %e, "cannot create a fresh cgroup for the pool");
                            break;
                        }
                    }
                }
            }
            Job::Stop => break,
        }
    }
    // Nothing is queued after `Stop` but a removal racing with it; take it too.
    while let Ok(job) = jobs.try_recv() {
        if let Job::Remove(name) = job {
            remove(&name);
        }
    }
    for name in std::mem::take(&mut *lock(fresh)) {
        remove(&name);
    }
}
