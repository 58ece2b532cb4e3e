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

pub mod cgroups;
pub mod command_executor;
pub mod core;
pub mod executors;
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

/// Longest time between SIGTERM and SIGKILL a task may ask for.
pub const MAX_KILL_GRACE: Duration = Duration::from_secs(30);
/// Default time between SIGTERM and SIGKILL when a task is killed.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(3);

/// How to run an agent.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// `host:port` of the master.
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
}

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
}

/// Runs an agent until `shutdown` is cancelled (then, with
/// [`AgentConfig::kill_tasks_on_shutdown`], kills its tasks first) or a fatal error occurs.
/// Losing the master is not fatal: the agent reconnects with backoff while tasks keep running.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let layout = sandbox::Layout::new(&config.work_dir);
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
    let result =
        link::drive(&config, &layout, &mut core, &mut events, &mut exec_events, &shutdown, &conn_tx).await;
    if config.kill_tasks_on_shutdown {
        executors.shutdown();
    } else {
        executors.detach();
    }
    if core.live_tasks() == 0 {
        isolator.shutdown();
    }
    match &result {
        Ok(()) => tracing::info!(running_tasks = core.live_tasks(), "agent stopped"),
        Err(e) => tracing::error!(error = %e, "agent failed"),
    }
    result
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
