//! Resource isolation with Linux control groups, v1 and v2 (detected at start).
//!
//! Every native task runs in its own group below the agent's root group, with a CPU weight and
//! (by default) a CFS quota from `cpus`, a hard memory limit of `mem` without swap, and a pids
//! limit. The group's own accounting says how the task ended (OOM kills, pids-limit hits) and
//! what it used (CPU, throttling, memory).
//!
//! # Layout and delegation
//! The agent's root is `<own group>/agora-<hash of the work dir>` in each hierarchy it uses
//! (`cpu`, `cpuacct`, `memory`, `pids`; on v1 each has its own path for the agent's group, read
//! from `/proc/self/cgroup`), or exactly `--cgroup-root` when given. Task groups are
//! `<root>/task-<run id>`; an executor may get `<root>/executor-…` sized to the sum of its tasks
//! and resized with [`Cgroup::resize`]. Nothing is created outside that subtree and no process
//! other than the agent's own children (and, on v2, the agent itself into a leaf below its own
//! group) is ever moved. On v1 the agent also makes sure some cgroup root is mounted with
//! `favordynmods` (by default; [`dynmods`]), which makes those moves cheaper host-wide; that
//! hierarchy holds none of the agent's groups.
//!
//! # Placing a process before it runs user code
//! `pre_exec` would force std from `posix_spawn` to fork+exec, and `CLONE_INTO_CGROUP` is not
//! reachable from std. Instead the task is spawned (still with `posix_spawn`) through a gate:
//! `/bin/sh -c 'read -r _ || exit 125; exec "$0" "$@" </dev/null' PROGRAM ARGS…` with a pipe on
//! stdin. The shell blocks on the pipe; the agent writes the pid to `cgroup.procs` in every
//! hierarchy and only then writes one newline ([`admit`]). Should the agent fail or die first,
//! the shell reads end-of-file and exits 125 without running anything. The cost is one extra
//! `exec` of `/bin/sh` (about a millisecond); the user program's `argv[0]` becomes its resolved
//! path.
//!
//! # cgroups-rs, and what is done directly
//! Groups are driven through cgroups-rs 0.5 (`cgroups_rs::fs`): [`hierarchy::AgentHierarchy`]
//! is a custom `Hierarchy` that hands out only the `cpu`, `cpuacct`, `memory` and `pids`
//! controllers the agent uses, each rooted at the agent's root in its hierarchy (cgroups-rs's
//! own `V2` is hard-wired to `/sys/fs/cgroup`, its `V1` takes every mounted controller at its
//! mount point). [`V1Manager`] and [`V2Manager`] (one per version, behind the
//! [`CgroupManager`] seam) load a `Cgroup` over it per operation and use its controllers:
//! `Controller::create`, `add_task_by_tgid`, `Cgroup::procs`, `Cgroup::delete`,
//! `Cgroup::kill` (v2 `cgroup.kill`), `CpuController::{set_shares, set_cfs_period,
//! set_cfs_quota, set_cfs_quota_and_period, cpu}`, `MemController::{set_limit,
//! set_memswap_limit, set_swappiness, memory_stat}`, `CpuAcctController::cpuacct` and
//! `PidController::{set_pid_max, get_pid_current, get_pid_events}`. The unit tests run these
//! managers against temp directories that mimic cgroupfs.
//!
//! Around cgroups-rs ([`hierarchy`]):
//! - Removal: `Cgroup::delete` deletes only the leaf it is given (and on v2 with one `rmdir`,
//!   no retries), so every directory of the group still there afterwards is removed with
//!   [`fs::remove_tree`]; a group is gone from every hierarchy or the removal fails.
//! - Setters open control files with `File::create`: a file that does not exist is reported
//!   (`ENOENT`, naming file and value) instead of created, and errors carry the OS error that
//!   cgroups-rs keeps only as a debug-formatted cause.
//! - Reads that cgroups-rs reports as 0 when a file is missing (`memory_stat`) are taken as
//!   best effort; v2 `memory.peak` 0 (absent before Linux 5.19) is reported as unknown.
//!
//! Direct cgroupfs access ([`fs`]) remains only where cgroups-rs 0.5 has no API or would do the
//! wrong thing: v2 `memory.events` (OOM kills and limit hits; not read by cgroups-rs at all),
//! v2 `memory.oom.group` (no setter; its generic `attrs` ignore write errors), v2 delegation
//! at start and re-delegation of a swept root (`cgroup.controllers`, `cgroup.subtree_control`,
//! moving the agent into a leaf on `EBUSY`; cgroups-rs only enables controllers inside
//! `Cgroup::create`, from `/sys/fs/cgroup`'s list, ignoring errors), creating the agent's own
//! root directories, and listing and removing groups by directory (leftover task groups at
//! start, roots of vanished agents, the agent's roots at shutdown: cgroups-rs cannot list a
//! group's children). cgroups-rs `unwrap`s while parsing some files (`memory.oom_control`,
//! `memory.numa_stat`); the kernel's own content parses.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use agora_sdk::Resources;

pub mod config;
pub mod detect;
pub mod dynmods;
pub mod fs;
pub mod hierarchy;
pub mod liveness;
pub mod pool;
pub mod v1;
pub mod v2;

pub use config::{CpuLimit, IsolationConfig, IsolationMode, ParseChoiceError};
pub use fs::CgroupError;
pub use v1::{V1Hierarchy, V1Manager};
pub use v2::V2Manager;

/// CFS period used for quotas (100 ms, the kernel default).
pub const CFS_PERIOD_US: u64 = 100_000;
/// Smallest memory limit a task (or executor) group gets, whatever it asked for: the master
/// refuses tasks without memory, and this floor (Mesos's `MIN_MEMORY`) keeps one that arrives
/// anyway, e.g. from a master of an older version, from running without a limit.
pub const MIN_TASK_MEM: u64 = 32 << 20;
/// Smallest CPU share (and hard quota) a group gets, in millicores (Mesos's `MIN_CPUS`, 0.01):
/// a task that asked for no CPU still runs under a quota.
pub const MIN_TASK_CPUS: u64 = 10;
/// Default `--max-pids-per-task`.
pub const DEFAULT_MAX_PIDS_PER_TASK: u64 = 1024;
/// Exit status of the gate shell when it was never released.
pub const GATE_NOT_RELEASED: i32 = 125;
/// The gate (see the module documentation).
pub const GATE_SCRIPT: &str = r#"read -r _ || exit 125; exec "$0" "$@" </dev/null"#;
/// The leaf a v2 agent moves itself into when its own group must delegate controllers.
const V2_AGENT_LEAF: &str = "agora-agent";

/// How long an agent waits at start for the lock on its cgroup root (held by an agent of the
/// same work dir that is still shutting down, or briefly by another agent's sweep).
const ROOT_LOCK_WAIT: Duration = Duration::from_secs(3);

/// The limits of one group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// CPU in millicores (the weight; the quota too with `cpu_quota`).
    pub cpu_millis: u64,
    /// Enforce a CFS quota of `cpu_millis`.
    pub cpu_quota: bool,
    /// Hard memory limit; `None` for none (a task that asked for no memory).
    pub mem_bytes: Option<u64>,
    /// Maximum number of processes and threads; `None` for none.
    pub pids: Option<u64>,
}

impl Limits {
    /// v1 `cpu.shares`: 1024 per CPU, at least 2.
    pub fn cpu_shares(&self) -> u64 {
        (self.cpu_millis.saturating_mul(1024) / 1000).clamp(2, 262_144)
    }

    /// CFS quota per [`CFS_PERIOD_US`], if any: `cpus` × period, at least 1 ms (the kernel's
    /// minimum). A task with no CPU at all gets only the minimum weight, no quota.
    pub fn cfs_quota_us(&self) -> Option<u64> {
        (self.cpu_quota && self.cpu_millis > 0)
            .then(|| (self.cpu_millis.saturating_mul(CFS_PERIOD_US) / 1000).max(1000))
    }
}

/// What a group's own accounting says (`None`: not available on this kernel or controller).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupStats {
    /// CPU time of every process that ran in the group.
    pub cpu_time: Option<Duration>,
    /// Time held back by the CFS quota.
    pub throttled: Option<Duration>,
    /// Memory charged now.
    pub mem_current: Option<u64>,
    /// Most memory ever charged.
    pub mem_peak: Option<u64>,
    /// How often the memory limit was hit (v1 `failcnt`, v2 `memory.events max`).
    pub mem_limit_hits: Option<u64>,
    /// Processes the OOM killer ended because of the group's limit.
    pub oom_kills: Option<u64>,
    /// Processes now.
    pub pids_current: Option<u64>,
    /// Forks refused by the pids limit.
    pub pids_limit_hits: Option<u64>,
}

/// cgroup version in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupVersion {
    /// Legacy hierarchies, one per controller set.
    V1,
    /// The unified hierarchy.
    V2,
}

/// The seam between the isolator and a cgroup version: groups named by one path component below
/// the agent's root(s). Implemented on cgroups-rs by [`V1Manager`] and [`V2Manager`].
pub trait CgroupManager: Send + Sync + fmt::Debug {
    /// The version this manager drives.
    fn version(&self) -> CgroupVersion;
    /// The directories of group `name` (one per hierarchy on v1).
    fn paths(&self, name: &str) -> Vec<PathBuf>;
    /// Creates group `name` (in every hierarchy used).
    fn create(&self, name: &str) -> Result<(), CgroupError>;
    /// Sets (or changes) the group's limits.
    fn apply(&self, name: &str, limits: &Limits) -> Result<(), CgroupError>;
    /// Moves process `pid` into the group (in every hierarchy used).
    fn add_process(&self, name: &str, pid: u32) -> Result<(), CgroupError>;
    /// The group's accounting.
    fn stats(&self, name: &str) -> Result<CgroupStats, CgroupError>;
    /// The processes in the group.
    fn procs(&self, name: &str) -> Result<Vec<u32>, CgroupError>;
    /// Sends SIGKILL to every process in the group.
    fn kill(&self, name: &str) -> Result<(), CgroupError> {
        kill_listed(&self.procs(name)?);
        Ok(())
    }
    /// Removes the group and anything below it (every hierarchy); gone already is fine.
    fn remove(&self, name: &str) -> Result<(), CgroupError>;
    /// Renames group `from` (which must never have held a process) to `to`, in every
    /// hierarchy; a group named `to` must not exist. Only v1 groups can be renamed.
    fn rename(&self, from: &str, to: &str) -> Result<(), CgroupError> {
        let _ = from;
        Err(CgroupError::Create { path: to.into(), err: std::io::Error::from_raw_os_error(libc::ENOTSUP) })
    }
    /// The groups below the agent's root(s).
    fn groups(&self) -> Vec<String>;
    /// The agent's root directories.
    fn roots(&self) -> Vec<PathBuf>;
    /// How to build the same manager in another process (the command executor); `None` for
    /// managers that only exist in tests.
    fn spec(&self) -> Option<ManagerSpec> {
        None
    }
}

/// A [`CgroupManager`] described for another process of the agent's (the command executor,
/// which creates its tasks' groups itself).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ManagerSpec {
    /// v1: each hierarchy's controllers and the agent's root in it.
    V1(Vec<(Vec<String>, PathBuf)>),
    /// v2: the agent's root and the controllers enabled below it.
    V2 {
        /// The agent's root group.
        root: PathBuf,
        /// Controllers enabled in its `cgroup.subtree_control`.
        controllers: Vec<String>,
    },
}

/// An [`Isolator`] described for another process (see [`Isolator::spec`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IsolationSpec {
    /// The groups' manager.
    pub manager: ManagerSpec,
    /// `--cpu-limit`.
    pub cpu_limit: CpuLimit,
    /// `--max-pids-per-task`.
    pub max_pids: u64,
}

/// SIGKILLs each pid (gone already is fine).
pub(crate) fn kill_listed(pids: &[u32]) {
    for &pid in pids {
        if let Ok(pid) = libc::pid_t::try_from(pid) {
            // SAFETY: kill has no memory-safety preconditions; the pid was read from a group of
            // the agent's own subtree.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Why isolation could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    /// No usable cgroup hierarchy (with `--isolation cgroups`).
    #[error("cgroup isolation is unavailable: {reason}")]
    Unavailable {
        /// Why.
        #[source]
        reason: SetupError,
    },
}

/// Why cgroup isolation cannot be set up on this host.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A file of `/proc` could not be read.
    #[error("cannot read {path}: {err}")]
    Read {
        /// The file.
        path: &'static str,
        /// The cause.
        #[source]
        err: std::io::Error,
    },
    /// No hierarchy fits.
    #[error(transparent)]
    NoHierarchy(#[from] detect::NoHierarchy),
    /// Another agent of this host holds the cgroup root's lock.
    #[error(transparent)]
    Locked(std::io::Error),
    /// The agent's root could not be created or is not writable.
    #[error("{err}{}", if *.not_root { "; the agent is not running as root" } else { "" })]
    Root {
        /// The cause.
        #[source]
        err: CgroupError,
        /// Whether the agent is not root (the likely reason).
        not_root: bool,
    },
}

#[derive(Debug)]
struct Active {
    manager: Arc<dyn CgroupManager>,
    cpu_limit: CpuLimit,
    max_pids: u64,
    /// Remove the roots at shutdown (the agent made them; not for `--cgroup-root`).
    remove_roots: bool,
    /// Fresh groups made ahead of time (the command executor's, v1).
    pool: Option<pool::Pool>,
    /// Held while the agent uses roots it made, so that no other agent's sweep removes them.
    /// Declared after the manager: dropped (unlocked) only after the roots are gone.
    _lock: Option<liveness::RootLock>,
}

impl Active {
    /// Removes the agent's roots if it made them and no task group holding a process is left
    /// in them (empty groups, e.g. the fresh or not yet removed groups of a command executor that
    /// died, are removed first).
    fn remove_roots_if_unused(&self) {
        if !self.remove_roots {
            return;
        }
        for name in self.manager.groups() {
            if self.manager.procs(&name).is_ok_and(|p| p.is_empty()) {
                let _ = self.manager.remove(&name);
            }
        }
        if !self.manager.groups().is_empty() {
            return;
        }
        for root in self.manager.roots() {
            if let Err(e) = fs::remove_tree(&root) {
                tracing::warn!(error = %e, "cannot remove the agent's cgroup");
            }
        }
    }
}

impl Drop for Active {
    /// An agent dropped without [`Isolator::shutdown`] (e.g. an embedded agent whose runtime
    /// ends) leaves nothing behind either.
    fn drop(&mut self) {
        self.remove_roots_if_unused();
    }
}

/// The agent's isolation: cgroups or nothing. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Isolator {
    active: Option<Arc<Active>>,
}

impl Isolator {
    /// No isolation.
    pub fn none() -> Self {
        Self { active: None }
    }

    /// Isolation through `manager` (tests, or a caller that detected the hierarchy itself).
    pub fn with_manager(manager: Arc<dyn CgroupManager>, cpu_limit: CpuLimit, max_pids: u64) -> Self {
        Self {
            active: Some(Arc::new(Active {
                manager,
                cpu_limit,
                max_pids,
                remove_roots: false,
                pool: None,
                _lock: None,
            })),
        }
    }

    /// Sets isolation up as configured, for the agent whose work dir is `work_dir`: detects the
    /// hierarchy, creates the agent's root, and removes groups left empty by a previous run.
    /// With [`IsolationMode::Auto`] an unusable host is reported in one warning line and the
    /// agent runs without isolation; with [`IsolationMode::Cgroups`] it is an error.
    pub fn setup(config: &IsolationConfig, work_dir: &Path) -> Result<Self, IsolationError> {
        if config.mode == IsolationMode::None {
            tracing::info!("resource isolation disabled (--isolation none): tasks run without limits");
            return Ok(Self::none());
        }
        match setup_cgroups(config, work_dir) {
            Ok(active) => {
                if active.remove_roots {
                    sweep_stale_roots(&active.manager.roots());
                }
                let me = Self { active: Some(Arc::new(active)) };
                me.cleanup_leftovers();
                Ok(me)
            }
            Err(reason) if config.mode == IsolationMode::Auto => {
                tracing::warn!(
                    "cgroup isolation unavailable: {reason}; running tasks WITHOUT resource limits \
                     (--isolation auto; use --isolation cgroups to refuse to start instead)"
                );
                Ok(Self::none())
            }
            Err(reason) => Err(IsolationError::Unavailable { reason }),
        }
    }

    /// The description another process uses to create groups under this isolator's root
    /// ([`Self::attach`]); `None` without isolation.
    pub fn spec(&self) -> Option<IsolationSpec> {
        let active = self.active.as_ref()?;
        Some(IsolationSpec {
            manager: active.manager.spec()?,
            cpu_limit: active.cpu_limit,
            max_pids: active.max_pids,
        })
    }

    /// An isolator over the root another process of the agent set up (no sweeping, no lock,
    /// nothing removed when it ends): the command executor's.
    pub fn attach(spec: &IsolationSpec) -> Self {
        Self::with_manager(Self::manager_of(spec), spec.cpu_limit, spec.max_pids)
    }

    /// [`Self::attach`] with a pool of `fresh` groups created ahead of time, and used groups
    /// removed on the pool's thread ([`pool`]; v1 only, elsewhere the same as `attach`). Call
    /// [`Self::shutdown`] at the end to finish the removals and remove the fresh groups.
    pub fn attach_pooled(spec: &IsolationSpec, fresh: usize) -> Self {
        let manager = Self::manager_of(spec);
        let pool = (fresh > 0 && manager.version() == CgroupVersion::V1)
            .then(|| pool::Pool::start(manager.clone(), fresh));
        Self {
            active: Some(Arc::new(Active {
                manager,
                cpu_limit: spec.cpu_limit,
                max_pids: spec.max_pids,
                remove_roots: false,
                pool,
                _lock: None,
            })),
        }
    }

    fn manager_of(spec: &IsolationSpec) -> Arc<dyn CgroupManager> {
        let manager: Arc<dyn CgroupManager> = match &spec.manager {
            ManagerSpec::V1(hs) => Arc::new(V1Manager::new(
                hs.iter()
                    .map(|(controllers, root)| V1Hierarchy {
                        controllers: controllers.clone(),
                        root: root.clone(),
                    })
                    .collect(),
            )),
            ManagerSpec::V2 { root, controllers } => {
                Arc::new(V2Manager::new(root.clone(), controllers.clone()))
            }
        };
        manager
    }

    /// Kills everything in the existing group `name` and removes it (a task's group left by a
    /// command executor that died). Nothing to do without isolation or when it is gone.
    pub fn destroy_existing(&self, name: &str) -> Result<(), CgroupError> {
        let Some(active) = &self.active else { return Ok(()) };
        let manager = active.manager.clone();
        if manager.paths(name).iter().all(|p| !p.exists()) {
            return Ok(());
        }
        let limits = self.limits_for(&Resources::default());
        Cgroup { manager, name: name.to_string(), limits }.destroy()
    }

    /// The existing group `name` of an executor or task that outlived the agent's restart,
    /// taken over as it is (nothing removed or reset); `None` without isolation or when the
    /// group is gone.
    pub fn adopt(&self, name: &str, limits: Limits) -> Option<Cgroup> {
        let active = self.active.as_ref()?;
        let manager = active.manager.clone();
        if manager.paths(name).iter().all(|p| !p.exists()) {
            return None;
        }
        Some(Cgroup { manager, name: name.to_string(), limits })
    }

    /// Kills everything in every group below the agent's root(s) and removes the groups
    /// (`--recover cleanup`: nothing of an earlier run may survive).
    pub fn destroy_all(&self) {
        let Some(active) = &self.active else { return };
        for name in active.manager.groups() {
            if let Err(e) = self.destroy_existing(&name) {
                tracing::warn!(cgroup = %name, error = %e, "cannot clean up a cgroup of an earlier run");
            }
        }
    }

    /// Whether tasks get cgroups.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// The manager, when active.
    pub fn manager(&self) -> Option<&Arc<dyn CgroupManager>> {
        self.active.as_ref().map(|a| &a.manager)
    }

    /// The limits for `resources` (a task's, or the sum of an executor's tasks), never below
    /// [`MIN_TASK_CPUS`] and [`MIN_TASK_MEM`].
    pub fn limits_for(&self, resources: &Resources) -> Limits {
        let (cpu_limit, max_pids) =
            self.active.as_ref().map_or((CpuLimit::Hard, 0), |a| (a.cpu_limit, a.max_pids));
        Limits {
            cpu_millis: resources.cpus.max(MIN_TASK_CPUS),
            cpu_quota: cpu_limit == CpuLimit::Hard,
            mem_bytes: Some(resources.mem.max(MIN_TASK_MEM)),
            pids: (max_pids > 0).then_some(max_pids),
        }
    }

    /// Creates group `name` with `limits`; `Ok(None)` without isolation. A group that cannot be
    /// set up completely is removed again.
    pub fn create(&self, name: &str, limits: Limits) -> Result<Option<Cgroup>, CgroupError> {
        let Some(active) = &self.active else {
            return Ok(None);
        };
        let manager = active.manager.clone();
        if let Some(pool) = &active.pool {
            if let Some(fresh) = pool.take() {
                // A fresh group renamed: no mkdir here. A stale group of the same name makes the
                // rename fail (EEXIST), and the group is made on the spot below.
                match manager.rename(&fresh, name) {
                    Ok(()) => {
                        if let Err(e) = manager.apply(name, &limits) {
                            let _ = manager.remove(name);
                            return Err(e);
                        }
                        return Ok(Some(Cgroup { manager, name: name.to_string(), limits }));
                    }
                    Err(e) => {
                        tracing::debug!(cgroup = %name, error = %e, "cannot take a fresh cgroup; creating one");
                        if !pool.remove_later(fresh.clone()) {
                            let _ = manager.remove(&fresh);
                        }
                    }
                }
            }
        }
        // A stale group of the same name (e.g. after a crash) would carry old accounting.
        manager.remove(name)?;
        manager.create(name)?;
        if let Err(e) = manager.apply(name, &limits) {
            let _ = manager.remove(name);
            return Err(e);
        }
        Ok(Some(Cgroup { manager, name: name.to_string(), limits }))
    }

    /// Ends a task's group: kills whatever is left in it and waits for it to empty, as
    /// [`Cgroup::destroy`] does, then removes it: on the pool's thread when there is one (the
    /// task's end is not held up by `rmdir`), here otherwise.
    pub fn retire(&self, cgroup: Cgroup) -> Result<(), CgroupError> {
        cgroup.empty()?;
        if let Some(pool) = self.active.as_ref().and_then(|a| a.pool.as_ref()) {
            if pool.remove_later(cgroup.name.clone()) {
                return Ok(());
            }
        }
        cgroup.manager.remove(&cgroup.name)
    }

    /// Removes groups below the agent's root(s) that hold no process: their tasks are gone
    /// (e.g. the agent was restarted). Groups with processes are left alone for recovery.
    pub fn cleanup_leftovers(&self) {
        let Some(active) = &self.active else { return };
        let m = &active.manager;
        for name in m.groups() {
            match m.procs(&name) {
                Ok(pids) if pids.is_empty() => match m.remove(&name) {
                    Ok(()) => tracing::info!(cgroup = %name, "removed a leftover task cgroup"),
                    Err(e) => {
                        tracing::warn!(cgroup = %name, error = %e, "cannot remove a leftover task cgroup")
                    }
                },
                Ok(pids) => tracing::warn!(cgroup = %name, processes = pids.len(),
                    "a task cgroup from an earlier run still has processes; leaving it alone"),
                Err(e) => tracing::warn!(cgroup = %name, error = %e, "cannot inspect a leftover cgroup"),
            }
        }
    }

    /// At agent shutdown: removes the agent's root groups when the agent created them and no
    /// task group is left in them.
    pub fn shutdown(&self) {
        if let Some(active) = &self.active {
            if let Some(pool) = &active.pool {
                pool.stop();
            }
            active.remove_roots_if_unused();
        }
    }
}

/// One group (a task's or an executor's).
#[derive(Clone, Debug)]
pub struct Cgroup {
    manager: Arc<dyn CgroupManager>,
    name: String,
    limits: Limits,
}

impl Cgroup {
    /// The group's name below the agent's root.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its directories (one per hierarchy on v1).
    pub fn paths(&self) -> Vec<PathBuf> {
        self.manager.paths(&self.name)
    }

    /// Its current limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Moves `pid` into the group.
    pub fn add_process(&self, pid: u32) -> Result<(), CgroupError> {
        self.manager.add_process(&self.name, pid)
    }

    /// Changes the limits (an executor whose tasks come and go). Shrinking memory below what
    /// the group uses fails (`EBUSY` on v1) and leaves the old limit.
    pub fn resize(&mut self, limits: Limits) -> Result<(), CgroupError> {
        self.manager.apply(&self.name, &limits)?;
        self.limits = limits;
        Ok(())
    }

    /// The group's accounting.
    pub fn stats(&self) -> Result<CgroupStats, CgroupError> {
        self.manager.stats(&self.name)
    }

    /// Kills every process left in the group, waits (up to about 2 s) for it to empty, and
    /// removes it from every hierarchy. Blocking.
    pub fn destroy(&self) -> Result<(), CgroupError> {
        self.empty()?;
        self.manager.remove(&self.name)
    }

    /// Kills every process left in the group and waits (up to about 2 s) for it to empty.
    fn empty(&self) -> Result<(), CgroupError> {
        let mut left = self.manager.procs(&self.name)?;
        for _ in 0..200 {
            if left.is_empty() {
                break;
            }
            self.manager.kill(&self.name)?;
            std::thread::sleep(Duration::from_millis(10));
            left = self.manager.procs(&self.name)?;
        }
        if !left.is_empty() {
            let path = self.paths().into_iter().next().unwrap_or_default();
            return Err(CgroupError::Busy { path, pids: left });
        }
        Ok(())
    }
}

/// A command that runs `program` behind the start gate (add the program's arguments to it).
/// Spawn it with `stdin(Stdio::piped())` and release it with [`admit`].
pub fn gated_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("/bin/sh");
    c.arg("-c").arg(GATE_SCRIPT).arg(program);
    c
}

/// Why a gated process could not be admitted.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// The process could not be moved into its group.
    #[error("cannot place process {pid} in its cgroup: {err}")]
    Place {
        /// The process.
        pid: u32,
        /// The cause.
        err: CgroupError,
    },
    /// The gate could not be opened.
    #[error("cannot release process {pid} after placing it in its cgroup: {err}")]
    Release {
        /// The process.
        pid: u32,
        /// The cause.
        err: std::io::Error,
    },
    /// The child was not spawned with a piped stdin.
    #[error("process {pid} was spawned without the gate pipe on stdin")]
    NoGate {
        /// The process.
        pid: u32,
    },
}

/// Places the gated `child` in `cgroup`, then lets it run its program. On error the gate is
/// closed unopened (the shell exits 125); the caller still reaps the child.
pub fn admit(child: &mut Child, cgroup: &Cgroup) -> Result<(), AdmitError> {
    let pid = child.id();
    let mut gate = child.stdin.take().ok_or(AdmitError::NoGate { pid })?;
    cgroup.add_process(pid).map_err(|err| AdmitError::Place { pid, err })?;
    gate.write_all(b"\n").map_err(|err| AdmitError::Release { pid, err })
}

fn setup_cgroups(config: &IsolationConfig, work_dir: &Path) -> Result<Active, SetupError> {
    let read =
        |path: &'static str| std::fs::read_to_string(path).map_err(|err| SetupError::Read { path, err });
    let mounts = detect::parse_mountinfo(&read("/proc/self/mountinfo")?);
    let mut own = detect::parse_proc_cgroup(&read("/proc/self/cgroup")?);
    // Another agent of this process (`agora dev`) may already have moved it into the v2 leaf.
    if let Some(p) = own.v2.as_mut() {
        if let Some(parent) = p.strip_suffix(&format!("/{V2_AGENT_LEAF}")) {
            *p = if parent.is_empty() { "/".to_string() } else { parent.to_string() };
        }
    }
    let explicit = config.cgroup_root.as_deref();
    let plan = detect::plan(&mounts, &own, explicit)?;
    let leaf = agent_group_name(work_dir);
    let lock = match explicit {
        Some(_) => None,
        None => match liveness::RootLock::acquire(&liveness::lock_dir(), &leaf, ROOT_LOCK_WAIT) {
            Ok(lock) => Some(lock),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Err(SetupError::Locked(e)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot lock the agent's cgroup root; other agents of this host \
                    will not clean up after this one");
                None
            }
        },
    };
    let root_of = |base: &Path| if explicit.is_some() { base.to_path_buf() } else { base.join(&leaf) };
    let not_root = !is_root();
    let root_err = |err| SetupError::Root { err, not_root };
    let manager: Arc<dyn CgroupManager> = match plan {
        detect::Plan::V1(hierarchies) => {
            let mut hs = Vec::new();
            for (controllers, base) in hierarchies {
                let root = root_of(&base);
                fs::create_dir(&root).map_err(root_err)?;
                check_writable(&root).map_err(root_err)?;
                hs.push(V1Hierarchy { controllers, root });
            }
            let used: Vec<&str> = hs.iter().flat_map(|h| h.controllers.iter().map(String::as_str)).collect();
            for (c, what) in
                [("pids", "--max-pids-per-task is not enforced"), ("cpuacct", "CPU time comes from rusage")]
            {
                if !used.contains(&c) {
                    tracing::warn!("the cgroup v1 {c} controller is not mounted: {what}");
                }
            }
            if config.favordynmods {
                favor_dynmods(Path::new(dynmods::DEFAULT_DIR));
            }
            Arc::new(V1Manager::new(hs))
        }
        detect::Plan::V2 { mount, base } => {
            if config.favordynmods {
                tracing::debug!(
                    "--cgroup-favordynmods: nothing is done on cgroup v2 (see the dynmods module)"
                );
            }
            let root = root_of(&base);
            let controllers = setup_v2(&mount, &base, &root, explicit.is_none()).map_err(root_err)?;
            Arc::new(V2Manager::new(root, controllers))
        }
    };
    tracing::info!(version = ?manager.version(), roots = ?manager.roots(), cpu_limit = %config.cpu_limit,
        max_pids_per_task = config.max_pids_per_task, "cgroup isolation enabled");
    Ok(Active {
        manager,
        cpu_limit: config.cpu_limit,
        max_pids: config.max_pids_per_task,
        remove_roots: explicit.is_none(),
        pool: None,
        _lock: lock,
    })
}

/// `--cgroup-favordynmods on` with cgroup v1: puts `favordynmods` in effect, or says in one
/// warning why not (the agent works the same without it, with slower task launches).
fn favor_dynmods(dir: &Path) {
    match dynmods::ensure(dir) {
        Ok(dynmods::Favor::Existing(point)) => {
            tracing::info!(mount = %point.display(), "cgroup favordynmods already in effect")
        }
        Ok(dynmods::Favor::Mounted(point)) => {
            tracing::info!(mount = %point.display(), "mounted a cgroup v1 hierarchy with favordynmods \
                (faster task launches)")
        }
        Err(e) => tracing::warn!(error = %e, "cgroup favordynmods not in effect: tasks are moved into \
            their cgroups the slower way (--cgroup-favordynmods off silences this)"),
    }
}

/// v2 delegation: the controllers must be enabled in `base`'s and the root's
/// `cgroup.subtree_control`. A non-root group holding processes cannot enable them (the
/// no-internal-processes rule): when the agent's own group is `base`, it first moves itself into
/// the leaf `base/agora-agent` (inside its own subtree). Returns the controllers enabled.
fn setup_v2(mount: &Path, base: &Path, root: &Path, own_group: bool) -> Result<Vec<String>, CgroupError> {
    let available = fs::read(base, "cgroup.controllers")?;
    let wanted: Vec<String> = ["cpu", "memory", "pids"]
        .iter()
        .filter(|c| available.split_whitespace().any(|a| a == **c))
        .map(|c| c.to_string())
        .collect();
    if !wanted.iter().any(|c| c == "memory") || !wanted.iter().any(|c| c == "cpu") {
        return Err(CgroupError::Parse {
            path: base.join("cgroup.controllers"),
            what: "a controller list with cpu and memory",
            content: available,
        });
    }
    let enable = wanted.iter().map(|c| format!("+{c}")).collect::<Vec<_>>().join(" ");
    let enabled = fs::read(base, "cgroup.subtree_control")?;
    let missing = wanted.iter().any(|c| !enabled.split_whitespace().any(|e| e == c));
    if missing && base != mount {
        if let Err(e) = fs::write(base, "cgroup.subtree_control", &enable) {
            let busy =
                matches!(&e, CgroupError::Write { err, .. } if err.raw_os_error() == Some(libc::EBUSY));
            if !(busy && own_group) {
                return Err(e);
            }
            let leaf = base.join(V2_AGENT_LEAF);
            fs::create_dir(&leaf)?;
            fs::write(&leaf, "cgroup.procs", &std::process::id().to_string())?;
            tracing::info!(cgroup = %leaf.display(), "moved the agent into a leaf of its own cgroup (v2 delegation)");
            fs::write(base, "cgroup.subtree_control", &enable)?;
        }
    } else if missing {
        fs::write(base, "cgroup.subtree_control", &enable)?;
    }
    fs::create_dir(root)?;
    fs::write(root, "cgroup.subtree_control", &enable)?;
    Ok(wanted)
}

/// Removes the roots of agents that are gone (`agora-<16 hex>` next to `roots`, in the agent's
/// own group, so inside its subtree): a root whose agent holds no [`liveness`] lock and whose
/// task groups all hold no process, together with those groups. They are left by agents that
/// vanished without shutting down and never came back with the same work directory (e.g. test
/// processes); an agent restarted with its work directory cleans its own root instead
/// ([`Isolator::cleanup_leftovers`]). A live neighbour's root is never touched, even between
/// creating a task group and moving the task into it: the sweep holds the root's lock while it
/// removes it, and skips any root whose lock is held.
fn sweep_stale_roots(roots: &[PathBuf]) {
    let is_agent_root = |n: &str| {
        n.strip_prefix("agora-").is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
    };
    let unused = |dir: &Path| fs::procs(dir).is_ok_and(|p| p.is_empty());
    let locks = liveness::lock_dir();
    let mut removed = 0;
    for root in roots {
        let Some(parent) = root.parent() else { continue };
        for name in fs::child_groups(parent) {
            let dir = parent.join(&name);
            if !is_agent_root(&name) || &dir == root || !unused(&dir) {
                continue;
            }
            let _lock = match liveness::RootLock::try_unused(&locks, &name) {
                Ok(Some(lock)) => lock,
                Ok(None) => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot tell whether another agent's cgroup is in use");
                    continue;
                }
            };
            let groups = fs::child_groups(&dir);
            if groups.iter().all(|g| unused(&dir.join(g)) && fs::child_groups(&dir.join(g)).is_empty())
                && fs::remove_tree(&dir).is_ok()
            {
                removed += 1;
            }
        }
    }
    if removed > 0 {
        tracing::info!(removed, "removed the cgroups of agents that are gone");
    }
}

/// `agora-<16 hex digits>`: FNV-1a of the work directory, so that several agents of one host or
/// process (`agora dev`) each own a subtree, stable across restarts of the same agent.
pub fn agent_group_name(work_dir: &Path) -> String {
    let path = std::fs::canonicalize(work_dir).unwrap_or_else(|_| work_dir.to_path_buf());
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in path.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("agora-{h:016x}")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn check_writable(dir: &Path) -> Result<(), CgroupError> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| CgroupError::InvalidName(dir.display().to_string()))?;
    // SAFETY: `c` is a valid NUL-terminated string.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0 {
        Ok(())
    } else {
        Err(CgroupError::Create { path: dir.to_path_buf(), err: std::io::Error::last_os_error() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_from_resources() {
        let iso = Isolator::with_manager(
            Arc::new(V2Manager::new("/nonexistent".into(), vec![])),
            CpuLimit::Hard,
            64,
        );
        let l = iso.limits_for(&Resources { cpus: 500, mem: 64 << 20, ..Resources::default() });
        assert_eq!(l, Limits { cpu_millis: 500, cpu_quota: true, mem_bytes: Some(64 << 20), pids: Some(64) });
        assert_eq!((l.cpu_shares(), l.cfs_quota_us()), (512, Some(50_000)));
        // Zero-sized (`--mem 0`, `cpus: 0`): the documented floor, never no limit at all.
        let none = iso.limits_for(&Resources::default());
        assert_eq!(
            (none.mem_bytes, none.cfs_quota_us(), none.cpu_shares()),
            (Some(MIN_TASK_MEM), Some(1000), 10)
        );
        let tiny = Limits { cpu_millis: 1, ..l };
        assert_eq!(tiny.cfs_quota_us(), Some(1000));
        let soft = Isolator::with_manager(Arc::new(V2Manager::new("/x".into(), vec![])), CpuLimit::Soft, 0);
        let l = soft.limits_for(&Resources::cpus(2000));
        assert_eq!((l.cfs_quota_us(), l.pids), (None, None));
    }

    #[test]
    fn flags_parse() {
        assert_eq!("cgroups".parse::<IsolationMode>().ok(), Some(IsolationMode::Cgroups));
        assert_eq!("soft".parse::<CpuLimit>().ok(), Some(CpuLimit::Soft));
        let e = "maybe".parse::<IsolationMode>().expect_err("invalid").to_string();
        assert_eq!(e, "invalid --isolation `maybe`: expected one of auto, cgroups, none");
        assert_eq!(IsolationMode::default().to_string(), "auto");
    }

    #[test]
    fn agent_group_names_are_stable_and_distinct() {
        let a = agent_group_name(Path::new("/nonexistent/agent-0"));
        assert_eq!(a, agent_group_name(Path::new("/nonexistent/agent-0")));
        assert_ne!(a, agent_group_name(Path::new("/nonexistent/agent-1")));
        assert!(fs::check_name(&a).is_ok() && a.len() == "agora-".len() + 16);
    }

    #[test]
    fn v2_delegation_against_a_fake_tree() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let base = tmp.path().join("system.slice/agora.service");
        std::fs::create_dir_all(&base).expect("mkdir");
        std::fs::write(base.join("cgroup.controllers"), "cpuset cpu io memory pids\n").expect("write");
        std::fs::write(base.join("cgroup.subtree_control"), "\n").expect("write");
        let root = base.join("agora-x");
        // The real root's files appear on mkdir; pre-create the one the setup writes.
        std::fs::create_dir(&root).expect("mkdir");
        std::fs::write(root.join("cgroup.subtree_control"), "").expect("write");
        let ctls = setup_v2(tmp.path(), &base, &root, true).expect("setup");
        assert_eq!(ctls, vec!["cpu", "memory", "pids"]);
        let read = |p: &Path| std::fs::read_to_string(p.join("cgroup.subtree_control")).expect("read");
        assert_eq!(read(&base), "+cpu +memory +pids");
        assert_eq!(read(&root), "+cpu +memory +pids");
        // Without memory there is nothing to isolate with.
        std::fs::write(base.join("cgroup.controllers"), "cpu pids\n").expect("write");
        let e = setup_v2(tmp.path(), &base, &root, true).expect_err("no memory").to_string();
        assert!(e.contains("cgroup.controllers") && e.contains("cpu and memory"), "{e}");
    }

    #[test]
    fn isolator_without_cgroups_creates_nothing() {
        let iso = Isolator::none();
        assert!(!iso.is_active());
        assert!(iso.create("task-x", iso.limits_for(&Resources::cpus(100))).expect("ok").is_none());
        iso.cleanup_leftovers();
        iso.shutdown();
    }
}
