//! # agora-agent
//!
//! The Agora agent: one per node. It registers with the master over QUIC + mutual TLS, offers
//! the node's resources, hands the tasks the master sends to executors (the command executor
//! for native processes, the Wasm executor, or a framework's own; it spawns no task itself),
//! runs them as an unprivileged user, delivers their status updates at least once and in
//! order, and serves their output on streams the master opens.
//!
//! A separate crate because the agent is a real boundary: it owns processes and the node's
//! work directory, and it is embedded both by `agora agent` and by `agora dev`.
//!
//! Module map:
//! - [`link`]: the master connection loop (backoff, register, heartbeats, outbox);
//! - [`core`]: the single owner of agent state, free of I/O;
//! - [`executors`]: the executor manager (command, Wasm and framework executors, fetching);
//! - [`command_executor`]: the `agora executor-command` process;
//! - [`tasks`] and [`process`]: the per-task supervisor the command executor runs;
//! - [`user`]: the task user and each framework's group;
//! - [`updates`]: the status-update manager (retries until acknowledged);
//! - [`output`]: task output streams;
//! - [`sandbox`]: work-dir layout, id escaping, checkpoints;
//! - [`checkpoint`]: the agent's state on disk (snapshot and journal) for recovery;
//! - [`cache`]: the bound on the agent's artifact and compiled-module caches;
//! - [`disk`]: disk limits of running tasks and the cap on their output;
//! - [`gc`]: removal of finished sandboxes after `--gc-delay` (sooner on a full disk);
//! - [`resources`]: resource detection;
//! - [`cgroups`]: cgroup v1/v2 isolation of tasks (limits, accounting, cleanup);
//! - [`metrics`]: task resource-usage metrics.

#![warn(missing_docs)]

use std::path::PathBuf;
use std::time::Duration;

use agora_sdk::proto::WireError;
use agora_sdk::tls::{TlsError, TlsFiles};
use agora_sdk::{Attributes, Resources};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub mod cache;
pub mod cgroups;
pub mod checkpoint;
pub mod command_executor;
pub mod core;
pub mod disk;
pub mod epoch;
pub mod executors;
pub mod files;
pub mod gc;
pub mod link;
pub mod metrics;
pub mod output;
pub mod process;
pub mod resources;
pub mod sandbox;
pub mod tasks;
pub mod updates;
pub mod user;

pub use resources::{detect_resources, detect_resources_in};

/// Longest time between SIGTERM and SIGKILL a task may ask for: the agent's absolute ceiling,
/// whatever the master let through (the master cuts a task's `kill_grace` to its
/// `--max-kill-grace`, by default this same 60 s, and refuses a flag above it).
pub const MAX_KILL_GRACE: Duration = Duration::from_secs(60);
/// Default time between SIGTERM and SIGKILL when a task is killed.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(3);

/// How to run an agent.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// `host:port` of the master, or of several separated by commas: the agent registers
    /// with the leader among them and follows it.
    pub master: String,
    /// The agent's certificate (role `agent`), key and the cluster CA.
    pub tls: TlsFiles,
    /// Where sandboxes and checkpoints live.
    pub work_dir: PathBuf,
    /// What to offer; `None` detects it (see [`detect_resources_in`]).
    pub resources: Option<Resources>,
    /// The node's attributes.
    pub attributes: Attributes,
    /// The node's host name, as reported to the master.
    pub hostname: String,
    /// SIGTERM → SIGKILL delay for tasks that do not set their own.
    pub kill_grace: Duration,
    /// Kill every task when the agent shuts down (`agora dev`); otherwise they keep running.
    pub kill_tasks_on_shutdown: bool,
    /// Resource isolation (`--isolation`, `--cgroup-root`, `--cpu-limit`,
    /// `--max-pids-per-task`).
    pub isolation: cgroups::IsolationConfig,
    /// Executors: which binary runs `agora executor-wasm` and `executor-command`, idle
    /// timeout, sizes.
    pub executors: executors::ExecutorsConfig,
    /// `--task-user`: who tasks and executors run as when the agent is root (default
    /// [`user::DEFAULT_TASK_USER`]); the agent refuses to start if the user does not exist.
    pub task_user: String,
    /// What to do with the executors and tasks of an earlier run (`--recover`,
    /// `--executor-reregister-timeout`; the executors' `--recovery-timeout` is in
    /// [`executors::ExecutorsConfig::recovery_timeout`]).
    pub recovery: RecoveryConfig,
    /// Removal of finished sandboxes (`--gc-delay`, `--gc-disk-headroom`, `--gc-interval`).
    pub gc: gc::GcConfig,
    /// Disk limits of tasks (`--disk-check-interval`, `--default-task-disk`,
    /// `--max-output-size`).
    pub disk: disk::DiskConfig,
}

/// `--recover`: what a starting agent does with what an earlier run left.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RecoverMode {
    /// Reconnect to the executors that still run and keep their tasks.
    #[default]
    Reconnect,
    /// Kill every executor and task of the earlier run, remove its checkpoints and start clean.
    Cleanup,
}

impl std::str::FromStr for RecoverMode {
    type Err = cgroups::ParseChoiceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "reconnect" => Ok(Self::Reconnect),
            "cleanup" => Ok(Self::Cleanup),
            _ => Err(cgroups::ParseChoiceError::new("--recover", s, "reconnect, cleanup")),
        }
    }
}

/// How an agent recovers after a restart.
#[derive(Clone, Debug)]
pub struct RecoveryConfig {
    /// Reconnect or clean up.
    pub mode: RecoverMode,
    /// How long a restarted agent waits for each executor of its earlier run to reconnect.
    pub executor_reregister_timeout: Duration,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        Self {
            mode: RecoverMode::Reconnect,
            executor_reregister_timeout: DEFAULT_EXECUTOR_REREGISTER_TIMEOUT,
        }
    }
}

/// Default of `--executor-reregister-timeout`.
pub const DEFAULT_EXECUTOR_REREGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The work directory cannot be created or written.
    #[error("cannot use work directory {path}: {err}")]
    WorkDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        err: std::io::Error,
    },
    /// The task user could not reach its sandboxes below the work dir.
    #[error(
        "tasks run as the task user, which cannot reach the work dir {work_dir}: {dir} is mode {mode:o} \
         (let others pass with `chmod o+x {dir}`, or choose a --work-dir below directories that do)"
    )]
    Unreachable {
        /// The work dir.
        work_dir: PathBuf,
        /// The directory above it that others cannot pass.
        dir: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// The agent id file exists but cannot be read.
    #[error("cannot read the agent id from {path}: {err}")]
    AgentIdFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        err: std::io::Error,
    },
    /// A checkpoint could not be written.
    #[error("cannot write checkpoint {path}: {err}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// The cause.
        err: std::io::Error,
    },
    /// The checkpoints of an earlier run cannot be read: the agent cannot tell what runs.
    #[error(
        "{0}; the agent cannot recover the executors and tasks of its earlier run from it. Start it with \
         `--recover cleanup` to kill everything that run left and start clean"
    )]
    Unrecoverable(checkpoint::CheckpointError),
    /// Writing the checkpoints failed.
    #[error("cannot checkpoint the agent's state: {0}")]
    Checkpointing(checkpoint::CheckpointError),
    /// A `--gc-*` setting is out of range.
    #[error(transparent)]
    Gc(#[from] gc::GcConfigError),
    /// A disk setting is out of range.
    #[error(transparent)]
    Disk(#[from] disk::DiskConfigError),
    /// `--task-user` cannot be used.
    #[error(transparent)]
    TaskUser(#[from] user::UserError),
    /// Isolation was required (`--isolation cgroups`) but cannot be had.
    #[error(transparent)]
    Isolation(#[from] cgroups::IsolationError),
    /// The certificate, key or CA is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The master refused this agent for good (wrong role, version, or unauthorized).
    #[error("the master at {master} refused this agent: {error}")]
    Refused {
        /// The master's address.
        master: String,
        /// Its reason.
        error: WireError,
    },
    /// `--master` is not a usable list of `host:port`.
    #[error("--master {list}: {error}")]
    Masters {
        /// The list given.
        list: String,
        /// What is wrong with it.
        error: agora_sdk::masters::MasterListError,
    },
}

/// Runs an agent until `shutdown` is cancelled (then, with
/// [`AgentConfig::kill_tasks_on_shutdown`], kills its tasks first) or a fatal error occurs.
/// Losing the master is not fatal: the agent reconnects with backoff while tasks keep running.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let layout = sandbox::Layout::new(&config.work_dir);
    config.gc.validate()?;
    config.disk.validate()?;
    agora_sdk::masters::MasterSearch::new(&config.master)
        .map_err(|error| AgentError::Masters { list: config.master.clone(), error })?;
    let task_user = user::TaskUser::for_agent(&config.task_user)?;
    prepare_work_dir(&layout)?;
    // Fail now, naming the file, rather than on every reconnection.
    agora_sdk::transport::client_config(&config.tls)?;
    let id_file = layout.agent_id_file();
    let agent_id = sandbox::read_agent_id(&id_file)
        .map_err(|err| AgentError::AgentIdFile { path: id_file.clone(), err })?;
    let resources = config.resources.clone().unwrap_or_else(|| detect_resources_in(&config.work_dir));
    tracing::info!(
        master = %config.master, work_dir = %config.work_dir.display(), %resources,
        agent_id = ?agent_id.as_ref().map(|a| a.to_string()), "agent starting"
    );
    let isolator = cgroups::Isolator::setup(&config.isolation, &config.work_dir)?;
    let ckpt_dir = checkpoint::dir(&config.work_dir);
    let (mut state, generation) = match (checkpoint::load(&ckpt_dir), config.recovery.mode) {
        (Ok(Some(l)), RecoverMode::Reconnect) => {
            if l.torn_tail {
                tracing::warn!(dir = %ckpt_dir.display(),
                    "the journal ends in a record the agent was writing when it died; it is dropped");
            }
            (l.state, l.generation)
        }
        (Ok(None), RecoverMode::Reconnect) => (checkpoint::State::default(), 0),
        (Err(e), RecoverMode::Reconnect) => return Err(AgentError::Unrecoverable(e)),
        (loaded, RecoverMode::Cleanup) => {
            let (old, generation) = match loaded {
                Ok(Some(l)) => (l.state, l.generation),
                Ok(None) => (checkpoint::State::default(), 0),
                Err(e) => {
                    tracing::warn!(error = %e, "cleaning up after an earlier run whose checkpoints do not load");
                    (checkpoint::salvage(&ckpt_dir), 0)
                }
            };
            cleanup(&config.work_dir, &old, &isolator);
            checkpoint::remove(&ckpt_dir).map_err(AgentError::Checkpointing)?;
            (checkpoint::State::default(), generation)
        }
    };
    let agent_record = checkpoint::AgentRecord {
        hostname: config.hostname.clone(),
        resources: resources.clone(),
        attributes: config.attributes.clone(),
    };
    if state.agent.as_ref().is_some_and(|a| a != &agent_record) {
        tracing::warn!("the agent's host name, resources or attributes changed since its last run");
    }
    state.agent = Some(agent_record);
    let recovered = state.executors.clone();
    let checkpointer = checkpoint::Checkpointer::open(&ckpt_dir, generation, state.clone())
        .map_err(AgentError::Checkpointing)?;
    let info = core::AgentInfo {
        hostname: config.hostname.clone(),
        resources,
        attributes: config.attributes.clone(),
    };
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (exec_tx, mut exec_events) = mpsc::unbounded_channel();
    let (conn_tx, conn_rx) = tokio::sync::watch::channel(None);
    if task_user.is_some() {
        check_reachable(&config.work_dir)?;
    }
    let task_groups = match task_user {
        Some(u) => {
            let file = config.work_dir.join("task-groups.json");
            let groups =
                user::TaskGroups::load(u, user::DEFAULT_FIRST_TASK_GID, user::DEFAULT_TASK_GIDS, &file)
                    .map_err(|err| AgentError::Checkpoint { path: file, err })?;
            Some(std::sync::Arc::new(groups))
        }
        None => None,
    };
    let executors_config =
        executors::ExecutorsConfig { task_groups: task_groups.clone(), ..config.executors.clone() };
    let events_for_recovery = events_tx.clone();
    let executors =
        executors::Executors::start(executors_config, &config.work_dir, isolator.clone(), conn_rx, exec_tx);
    let mut core = core::Core::new(
        info,
        layout.clone(),
        agent_id,
        config.kill_grace,
        isolator.clone(),
        updates::UpdateManager::default(),
        events_tx,
    );
    core.set_executors(executors.clone());
    core.set_task_groups(task_groups);
    core.set_disk_config(config.disk.clone());
    core.set_checkpointer(checkpointer);
    let recovery = if recovered.is_empty() && state.tasks.is_empty() && state.updates.is_empty() {
        None
    } else {
        let tasks = recovered_tasks(&state);
        tracing::info!(
            executors = recovered.len(),
            tasks = tasks.len(),
            unacknowledged_updates = state.updates.values().map(|q| q.len()).sum::<usize>(),
            "recovering the executors and tasks of the agent's earlier run"
        );
        let custom_runs: Vec<_> = recovered
            .values()
            .filter_map(|r| match &r.kind {
                checkpoint::ExecutorKind::Custom { sandbox, .. } => Some((r.key(), sandbox.clone())),
                _ => None,
            })
            .collect();
        let (handles, done) = executors.recover(
            recovered.into_values().collect(),
            tasks,
            &events_for_recovery,
            config.recovery.executor_reregister_timeout,
        );
        core.restore(&state, handles, std::time::Instant::now());
        for (exec, run) in custom_runs {
            core.adopt_executor_run(exec, run);
        }
        Some(done)
    };
    drop(state);
    // Sandboxes of the earlier run that nothing recovered uses, aged by their modification
    // time (the schedule itself is not checkpointed).
    let in_use = core.sandboxes_in_use();
    let frameworks_dir = layout.frameworks_dir();
    let orphans = tokio::task::spawn_blocking(move || gc::orphaned_runs(&frameworks_dir, &in_use))
        .await
        .unwrap_or_default();
    if !orphans.is_empty() {
        tracing::info!(
            sandboxes = orphans.len(),
            "scheduling the unused sandboxes of earlier runs for removal"
        );
    }
    core.schedule_sandboxes(orphans);
    let result = link::drive(
        &config,
        &layout,
        &mut core,
        &mut events,
        &mut exec_events,
        &shutdown,
        &conn_tx,
        recovery,
    )
    .await;
    if config.kill_tasks_on_shutdown {
        executors.shutdown(config.kill_grace * 2 + Duration::from_secs(5)).await;
    }
    // Executors keep running for the agent's next run; the executor manager ends here (and
    // lets go of the isolator and the cgroup root's lock with it).
    executors.detach();
    executors.ended(Duration::from_secs(5)).await;
    if core.live_tasks() == 0 {
        isolator.shutdown();
    }
    match &result {
        Ok(()) => tracing::info!(running_tasks = core.live_tasks(), "agent stopped"),
        Err(e) => tracing::error!(error = %e, "agent failed"),
    }
    result
}

/// The checkpointed tasks still running under an executor, as the executor manager takes them
/// back.
fn recovered_tasks(state: &checkpoint::State) -> Vec<executors::RecoveredTask> {
    use agora_sdk::proto::{TaskKind, TaskState};
    state
        .tasks
        .iter()
        .filter(|(_, t)| !t.ended && !t.state.is_terminal())
        .map(|((fw, id), t)| {
            let native = matches!(t.task.kind, TaskKind::Command(_));
            // Only a process that is provably still the task's may be killed later.
            let process_group = t.pid.filter(|p| native && checkpoint::same_process(*p, t.start_time));
            executors::RecoveredTask {
                key: tasks::TaskKey { framework_id: fw.clone(), task_id: id.clone() },
                executor_id: t.task.kind.executor_id(),
                uid: t.executor_uid,
                running: matches!(t.state, TaskState::Running | TaskState::Killing),
                resources: t.task.resources.clone(),
                process_group,
                cgroup: if native { tasks::cgroup_name_for(&t.run_dir) } else { None },
            }
        })
        .collect()
}

/// `--recover cleanup`: kills everything an earlier run of this agent left: its executors
/// (each with its whole session), their native tasks, anything else started with one of this
/// work dir's executor sockets, and everything in the agent's cgroups. Processes are matched
/// by pid and start time, never by pid alone.
fn cleanup(work_dir: &std::path::Path, old: &checkpoint::State, isolator: &cgroups::Isolator) {
    let mut killed = 0usize;
    for e in old.executors.values() {
        if let Some(pid) = e.pid.filter(|p| checkpoint::same_process(*p, e.start_time)) {
            checkpoint::kill_session(pid);
            killed += 1;
        }
    }
    for t in old.tasks.values() {
        if let Some(pid) = t.pid.filter(|p| checkpoint::same_process(*p, t.start_time)) {
            if let Ok(group) = libc::pid_t::try_from(pid) {
                // SAFETY: kill(2) of the process group of a task this agent started (its pid
                // and start time match the checkpoint).
                unsafe { libc::killpg(group, libc::SIGKILL) };
                killed += 1;
            }
        }
    }
    // Executors the checkpoints do not name (e.g. they could not be read): by the socket
    // they were told to connect to.
    let sockets =
        std::path::absolute(work_dir.join("executors")).unwrap_or_else(|_| work_dir.join("executors"));
    let prefix = format!("{}={}/", agora_sdk::executor_proto::ENV_SOCKET, sockets.display());
    let me = std::process::id();
    for pid in checkpoint::all_pids().into_iter().filter(|p| *p != me) {
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
        if env.split(|b| *b == 0).any(|v| v.starts_with(prefix.as_bytes())) {
            checkpoint::kill_session(pid);
            killed += 1;
        }
    }
    isolator.destroy_all();
    tracing::info!(killed, "--recover cleanup: killed what the agent's earlier run left");
}

/// Tasks and executors run as the task user and reach their sandboxes (and executors their
/// sockets) by absolute path: every directory above the work dir must let others pass (`x`).
fn check_reachable(work_dir: &std::path::Path) -> Result<(), AgentError> {
    use std::os::unix::fs::PermissionsExt;
    let abs = std::path::absolute(work_dir)
        .map_err(|err| AgentError::WorkDir { path: work_dir.to_path_buf(), err })?;
    for dir in abs.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(dir) else { continue };
        if meta.permissions().mode() & 0o001 == 0 {
            return Err(AgentError::Unreachable {
                work_dir: abs.clone(),
                dir: dir.to_path_buf(),
                mode: meta.permissions().mode() & 0o7777,
            });
        }
    }
    Ok(())
}

/// Creates the work directory. It and `frameworks/` are pass-through (0711): tasks reach their
/// own sandbox by name but cannot list anything; the agent's own files in it (checkpoints, the
/// artifact cache) are closed to them.
fn prepare_work_dir(layout: &sandbox::Layout) -> Result<(), AgentError> {
    use std::os::unix::fs::PermissionsExt;
    let werr = |err| AgentError::WorkDir { path: layout.root().to_path_buf(), err };
    std::fs::create_dir_all(layout.frameworks_dir()).map_err(werr)?;
    for dir in [layout.root().to_path_buf(), layout.frameworks_dir()] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(sandbox::PASS_THROUGH))
            .map_err(werr)?;
    }
    let artifacts = layout.root().join("artifacts");
    std::fs::create_dir_all(&artifacts).map_err(werr)?;
    std::fs::set_permissions(&artifacts, std::fs::Permissions::from_mode(0o700)).map_err(werr)?;
    let probe = layout.root().join(".agora-write-test");
    sandbox::write_atomic(&probe, b"ok").map_err(werr)?;
    std::fs::remove_file(&probe).map_err(werr)?;
    Ok(())
}
