//! The command executor: runs one task as a native process in its sandbox and supervises it.
//!
//! [`launch`] starts a supervisor (a tokio task) that creates the sandbox, spawns the process in
//! its own process group with stdout/stderr going straight to files (so the process does not
//! depend on the agent staying alive), checkpoints `task.json`, and reports [`TaskEvent`]s in
//! order: `Running`, possibly `Killing`, then exactly one `Terminated`. Nothing here talks to the
//! master; the agent core turns events into status updates.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use agora_sdk::proto::{unix_millis, CommandInfo, FrameworkId, TaskId, TaskInfo, TaskKind, TaskState, Usage};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::cgroups::{self, Cgroup, CgroupStats, Isolator, Limits};
use crate::metrics::{UsageReporter, TASK_ISOLATION_FAILURES};
use crate::process::{signal_name, ChildProcess, ExitInfo};
use crate::sandbox::{write_checkpoint, Layout, TaskCheckpoint};

/// `PATH` every task starts with.
pub const TASK_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// How often a running task's cgroup is sampled for the agent's metrics.
pub const USAGE_SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// Reason of a task ended by its cgroup's memory limit.
pub const REASON_MEMORY_LIMIT: &str = "memory limit exceeded";
/// Reason of a failed task that hit its cgroup's process limit.
pub const REASON_PROCESS_LIMIT: &str = "process limit reached";
/// Reason of a task that could not be given its cgroup (it never ran).
pub const REASON_ISOLATION_FAILED: &str = "isolation failed";

/// Identifies a task on this agent: task ids are unique within a framework.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskKey {
    /// The owning framework.
    pub framework_id: FrameworkId,
    /// The task.
    pub task_id: TaskId,
}

/// Everything a supervisor needs to run one task.
#[derive(Clone, Debug)]
pub struct LaunchSpec {
    /// Owner of the task.
    pub framework_id: FrameworkId,
    /// The task.
    pub task: TaskInfo,
    /// `WORK/frameworks/<fw>/executors/<task>` (holds `task.json`).
    pub executor_dir: PathBuf,
    /// The sandbox of this run (created by the supervisor).
    pub run_dir: PathBuf,
    /// SIGTERM → SIGKILL delay when killed.
    pub kill_grace: Duration,
    /// Gives the task its cgroup (or nothing, without isolation).
    pub isolator: Isolator,
    /// The user the task runs as (`None`: the agent's own, when it is not root).
    pub user: Option<crate::user::TaskUser>,
}

impl LaunchSpec {
    /// The key of the task.
    pub fn key(&self) -> TaskKey {
        TaskKey { framework_id: self.framework_id.clone(), task_id: self.task.task_id.clone() }
    }
}

/// What a supervisor reports, in this order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskEvent {
    /// The process was spawned.
    Running {
        /// Its pid (and process-group id); a framework executor's pid for its tasks.
        pid: u32,
        /// What the executor said, if it said something (framework executors).
        message: Option<String>,
    },
    /// A kill was requested and SIGTERM sent to the process group.
    Killing,
    /// The task is over; its process group has been cleaned up.
    Terminated(Termination),
}

/// The final word on a task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Termination {
    /// FINISHED, FAILED or KILLED.
    pub state: TaskState,
    /// Machine-friendly reason: `command exited`, `killed by signal`, `killed`, `failed to start`,
    /// `memory limit exceeded`, `process limit reached`, `isolation failed`.
    pub reason: String,
    /// Human detail.
    pub message: String,
    /// Exit code, if the process exited.
    pub exit_code: Option<i32>,
    /// Terminating signal, if one killed the process.
    pub signal: Option<i32>,
    /// Resource usage, if the process ran.
    pub usage: Option<Usage>,
}

impl Termination {
    fn failed_to_start(failure: StartFailure) -> Self {
        Self {
            state: TaskState::Failed,
            reason: failure.reason.into(),
            message: failure.message,
            exit_code: None,
            signal: None,
            usage: None,
        }
    }

    /// How the task ended, from its exit status and, with isolation, its cgroup's accounting:
    /// an OOM kill in the group makes an unsuccessful task `memory limit exceeded`, a refused
    /// fork `process limit reached` (the signal or exit code alone cannot tell).
    fn from_exit(exit: ExitInfo, killed: bool, cgroup: Option<(&CgroupStats, &Limits)>) -> Self {
        let detail = match (exit.code, exit.signal) {
            (Some(c), _) => format!("exited with status {c}"),
            (None, Some(s)) => format!("killed by {}", signal_name(s)),
            (None, None) => "ended in an unknown way".to_string(),
        };
        let success = exit.code == Some(0);
        let oom = cgroup.is_some_and(|(s, _)| s.oom_kills.unwrap_or(0) > 0);
        let pids_hit = cgroup.is_some_and(|(s, _)| s.pids_limit_hits.unwrap_or(0) > 0);
        let (state, reason, message) = if killed {
            (TaskState::Killed, "killed", format!("killed on request; the command {detail}"))
        } else if oom && !success {
            let limit =
                cgroup.and_then(|(_, l)| l.mem_bytes).map_or_else(String::new, |b| format!(" of {b} bytes"));
            let message = format!(
                "the task reached its memory limit{limit} and the kernel's OOM killer ended it (command {detail})"
            );
            (TaskState::Failed, REASON_MEMORY_LIMIT, message)
        } else if pids_hit && !success {
            let limit = cgroup.and_then(|(_, l)| l.pids).map_or_else(String::new, |p| format!(" of {p}"));
            let message =
                format!("the task reached its process limit{limit}: forks were refused (command {detail})");
            (TaskState::Failed, REASON_PROCESS_LIMIT, message)
        } else {
            match (exit.code, exit.signal) {
                (Some(0), _) => (TaskState::Finished, "command exited", format!("command {detail}")),
                (Some(_), _) => (TaskState::Failed, "command exited", format!("command {detail}")),
                (None, _) => (TaskState::Failed, "killed by signal", format!("command {detail}")),
            }
        };
        let mut usage = exit.usage;
        if let Some((s, _)) = cgroup {
            // The group saw every process of the task, not only the waited-for ones.
            usage.cpu_time = s.cpu_time.or(usage.cpu_time);
            usage.peak_mem = s.mem_peak.or(usage.peak_mem);
            usage.throttled = s.throttled;
            usage.mem_current = s.mem_current;
        }
        Self {
            state,
            reason: reason.into(),
            message,
            exit_code: exit.code,
            signal: exit.signal,
            usage: Some(usage),
        }
    }
}

/// Why a task never ran: the reason and message of its TASK_FAILED.
#[derive(Debug)]
struct StartFailure {
    reason: &'static str,
    message: String,
}

impl StartFailure {
    fn spawn(message: String) -> Self {
        Self { reason: "failed to start", message }
    }

    fn isolation(message: String) -> Self {
        metrics::counter!(TASK_ISOLATION_FAILURES).increment(1);
        Self { reason: REASON_ISOLATION_FAILED, message }
    }
}

/// The agent's handle on a running supervisor.
pub struct TaskHandle {
    kill: Kill,
    /// Turns `true` once the task's process has ended (its output files are complete).
    pub done: watch::Receiver<bool>,
}

enum Kill {
    /// A supervisor task watching a token (native tasks).
    Token(CancellationToken),
    /// A message to whoever runs the task (the Wasm executor manager).
    Call(Box<dyn Fn() + Send + Sync>),
}

impl std::fmt::Debug for TaskHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskHandle").field("done", &*self.done.borrow()).finish_non_exhaustive()
    }
}

impl TaskHandle {
    /// A handle whose [`Self::kill`] calls `kill` (which must be idempotent), for tasks run by
    /// something other than a supervisor task of their own.
    pub(crate) fn with_kill(kill: Box<dyn Fn() + Send + Sync>, done: watch::Receiver<bool>) -> Self {
        Self { kill: Kill::Call(kill), done }
    }

    /// Asks the supervisor to kill the task (SIGTERM to the group, SIGKILL after the grace
    /// period). Idempotent.
    pub fn kill(&self) {
        match &self.kill {
            Kill::Token(t) => t.cancel(),
            Kill::Call(f) => f(),
        }
    }
}

/// Sink for supervisor events (the agent core's queue).
pub type EventSender = mpsc::UnboundedSender<(TaskKey, TaskEvent)>;

/// Starts supervising `spec` on the current tokio runtime. Events go to `events`.
pub fn launch(spec: LaunchSpec, events: EventSender) -> TaskHandle {
    let kill = CancellationToken::new();
    let (done_tx, done) = watch::channel(false);
    let token = kill.clone();
    tokio::spawn(async move {
        let key = spec.key();
        let emit = |ev: TaskEvent| {
            // The core outlives supervisors except at shutdown, when nobody listens anyway.
            let _ = events.send((key.clone(), ev));
        };
        let end = supervise(&spec, &token, &emit).await;
        tracing::info!(
            task_id = %spec.task.task_id, framework_id = %spec.framework_id,
            state = %end.state, exit_code = ?end.exit_code, signal = ?end.signal,
            "task ended: {}", end.message
        );
        checkpoint(&spec, None, end.state).await;
        done_tx.send_replace(true);
        emit(TaskEvent::Terminated(end));
    });
    TaskHandle { kill: Kill::Token(kill), done }
}

async fn supervise(spec: &LaunchSpec, kill: &CancellationToken, emit: &impl Fn(TaskEvent)) -> Termination {
    let prepared = {
        let spec = spec.clone();
        tokio::task::spawn_blocking(move || prepare_and_spawn(&spec)).await
    };
    let (mut child, cgroup) = match prepared {
        Ok(Ok(started)) => started,
        Ok(Err(failure)) => return Termination::failed_to_start(failure),
        Err(e) => return Termination::failed_to_start(StartFailure::spawn(format!("launcher failed: {e}"))),
    };
    let pid = child.pid();
    tracing::info!(task_id = %spec.task.task_id, framework_id = %spec.framework_id, pid,
        sandbox = %spec.run_dir.display(), cgroup = cgroup.as_ref().map(Cgroup::name), "task started");
    checkpoint(spec, Some(pid), TaskState::Running).await;
    emit(TaskEvent::Running { pid, message: None });

    let mut reporter = UsageReporter::default();
    let (wait, killed) = {
        let waiting = wait_or_kill(spec, &child, kill, emit);
        tokio::pin!(waiting);
        let start = tokio::time::Instant::now() + USAGE_SAMPLE_INTERVAL;
        let mut samples = tokio::time::interval_at(start, USAGE_SAMPLE_INTERVAL);
        loop {
            tokio::select! {
                r = &mut waiting => break r,
                _ = samples.tick(), if cgroup.is_some() => {
                    // A handful of small reads of in-memory cgroupfs files: no blocking thread
                    // needed.
                    match cgroup.as_ref().map(Cgroup::stats) {
                        Some(Ok(s)) => reporter.sample(&s),
                        Some(Err(e)) => tracing::debug!(task_id = %spec.task.task_id, error = %e,
                            "cannot sample the task's cgroup"),
                        None => {}
                    }
                }
            }
        }
    };
    if let Err(e) = wait {
        tracing::error!(task_id = %spec.task.task_id, pid, error = %e, "cannot wait for the task's exit; reaping");
    }
    // Like a container being destroyed: nothing of the task's process group outlives it.
    signal(&child, libc::SIGKILL, spec);
    let task_id = spec.task.task_id.clone();
    let reaped = tokio::task::spawn_blocking(move || {
        let exit = child.reap();
        // Read the group's accounting before anything else happens to it, then kill whatever
        // escaped the process group (setsid) and remove the group from every hierarchy.
        let stats = cgroup.map(|cg| {
            let stats = cg.stats();
            if let Err(e) = cg.destroy() {
                tracing::warn!(%task_id, error = %e, "cannot clean up the task's cgroup");
            }
            (stats, *cg.limits())
        });
        (exit, stats)
    })
    .await;
    let reaped = reaped.map(|(exit, stats)| {
        let stats = stats.and_then(|(s, limits)| match s {
            Ok(s) => Some((s, limits)),
            Err(e) => {
                tracing::warn!(task_id = %spec.task.task_id, error = %e, "cannot read the task's cgroup accounting");
                None
            }
        });
        reporter.finish(stats.as_ref().map(|(s, _)| s));
        (exit, stats)
    });
    match reaped {
        Ok((Ok(exit), stats)) => Termination::from_exit(exit, killed, stats.as_ref().map(|(s, l)| (s, l))),
        Ok((Err(e), _)) => Termination {
            state: if killed { TaskState::Killed } else { TaskState::Failed },
            reason: if killed { "killed" } else { "unknown exit" }.into(),
            message: format!("cannot reap process {pid}: {e}"),
            exit_code: None,
            signal: None,
            usage: None,
        },
        Err(e) => Termination {
            state: TaskState::Failed,
            reason: "unknown exit".into(),
            message: format!("reaper failed: {e}"),
            exit_code: None,
            signal: None,
            usage: None,
        },
    }
}

/// Waits for the process to exit; on a kill request, SIGTERM then (after the grace period)
/// SIGKILL to its group. Returns the wait result and whether a kill was requested.
async fn wait_or_kill(
    spec: &LaunchSpec,
    child: &ChildProcess,
    kill: &CancellationToken,
    emit: &impl Fn(TaskEvent),
) -> (std::io::Result<()>, bool) {
    let pid = child.pid();
    let exited = child.exited();
    tokio::pin!(exited);
    let mut killed = false;
    let wait = tokio::select! {
        r = &mut exited => r,
        () = kill.cancelled() => {
            killed = true;
            emit(TaskEvent::Killing);
            checkpoint(spec, Some(pid), TaskState::Killing).await;
            signal(child, libc::SIGTERM, spec);
            tokio::select! {
                r = &mut exited => r,
                () = tokio::time::sleep(spec.kill_grace) => {
                    signal(child, libc::SIGKILL, spec);
                    exited.await
                }
            }
        }
    };
    (wait, killed)
}

fn signal(child: &ChildProcess, sig: libc::c_int, spec: &LaunchSpec) {
    if let Err(e) = child.signal_group(sig) {
        tracing::warn!(task_id = %spec.task.task_id, pid = child.pid(), signal = %signal_name(sig),
            error = %e, "cannot signal the task's process group");
    }
}

/// Creates the sandbox and the task's cgroup, and spawns the process (blocking: run on the
/// blocking pool). The child joins its cgroup and drops to the task user between `fork` and
/// `exec` ([`confine_in_child`]), so no user code ever runs unconfined or as root.
fn prepare_and_spawn(spec: &LaunchSpec) -> Result<(ChildProcess, Option<Cgroup>), StartFailure> {
    let TaskKind::Command(cmd) = &spec.task.kind else {
        return Err(StartFailure::spawn("not a command task".into()));
    };
    let dir = &spec.run_dir;
    crate::sandbox::create_sandbox(dir, spec.user)
        .map_err(|e| StartFailure::spawn(format!("cannot create sandbox {}: {e}", dir.display())))?;
    let open = |name: &str| {
        let path = dir.join(name);
        let file = File::create(&path)
            .map_err(|e| StartFailure::spawn(format!("cannot create {}: {e}", path.display())))?;
        if let Some(u) = spec.user {
            u.chown(&path).map_err(|e| {
                StartFailure::spawn(format!("cannot hand {} to the task user: {e}", path.display()))
            })?;
        }
        Ok(file)
    };
    let (stdout, stderr) = (open("stdout")?, open("stderr")?);
    let cgroup = if spec.isolator.is_active() {
        let limits = spec.isolator.limits_for(&spec.task.resources);
        let name = cgroup_name(spec);
        spec.isolator.create(&name, limits).map_err(|e| {
            StartFailure::isolation(format!(
                "cannot create the task's cgroup (the task was not started): {e}"
            ))
        })?
    } else {
        None
    };
    let fail = |f: StartFailure| {
        if let Some(cg) = &cgroup {
            if let Err(e) = cg.destroy() {
                tracing::warn!(task_id = %spec.task.task_id, error = %e, "cannot remove the task's cgroup");
            }
        }
        f
    };
    // The group's `cgroup.procs` files, opened here (close-on-exec) for the child to write to.
    let mut procs = Vec::new();
    for path in cgroup.as_ref().map(Cgroup::paths).unwrap_or_default() {
        let file = path.join("cgroup.procs");
        match std::fs::OpenOptions::new().write(true).open(&file) {
            Ok(f) => procs.push(std::os::fd::OwnedFd::from(f)),
            Err(e) => {
                return Err(fail(StartFailure::isolation(format!(
                    "cannot open {}: {e} (the task was not started)",
                    file.display()
                ))))
            }
        }
    }
    let mut command = build_command(cmd, dir, &spec.framework_id, &spec.task.task_id)
        .map_err(|m| fail(StartFailure::spawn(m)))?;
    command.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
    confine_in_child(&mut command, &procs, spec.user);
    let child = command.spawn().map_err(|e| {
        let program = cmd.argv.first().map(String::as_str).unwrap_or("");
        let what = if cmd.shell { "/bin/sh".to_string() } else { format!("`{program}`") };
        if !procs.is_empty() && e.raw_os_error().is_some_and(|c| c != libc::ENOENT && c != libc::EACCES) {
            fail(StartFailure::isolation(format!(
                "cannot run {what} in its cgroup as the task user: {e} (the task was not started)"
            )))
        } else {
            fail(StartFailure::spawn(format!("cannot run {what}: {e}")))
        }
    })?;
    drop(procs);
    let child = ChildProcess::adopt(child).map_err(|e| fail(StartFailure::spawn(e.to_string())))?;
    Ok((child, cgroup))
}

/// Between `fork` and `exec`, the child writes `0` (itself) into each of its group's
/// `cgroup.procs` (`procs`, opened by the parent), drops to `user` and sets `no_new_privs`. Any
/// failure fails the spawn: the program never runs. A task cannot move itself out again: the
/// cgroup files belong to root.
fn confine_in_child(
    command: &mut Command,
    procs: &[std::os::fd::OwnedFd],
    user: Option<crate::user::TaskUser>,
) {
    use std::os::fd::AsRawFd;
    let fds: Vec<libc::c_int> = procs.iter().map(|f| f.as_raw_fd()).collect();
    // SAFETY: the closure only makes system calls (write, setgroups, setgid, setuid, prctl) on
    // values prepared before the fork; it neither allocates nor takes locks.
    unsafe {
        command.pre_exec(move || {
            for &fd in &fds {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(u) = user {
                u.switch_in_child()?;
            }
            crate::user::no_new_privs_in_child()
        });
    }
}

/// `task-<run id>`: unique per run, one path component.
fn cgroup_name(spec: &LaunchSpec) -> String {
    cgroup_name_for(&spec.run_dir).unwrap_or_else(|| format!("task-{}", uuid::Uuid::new_v4()))
}

/// The cgroup of the native task whose sandbox is `run_dir` (`task-<run id>`), if the run id
/// can name one.
pub fn cgroup_name_for(run_dir: &Path) -> Option<String> {
    let run = run_dir.file_name().and_then(|n| n.to_str()).filter(|n| cgroups::fs::check_name(n).is_ok())?;
    Some(format!("task-{run}"))
}

/// The process to run for `cmd`: own process group, sandbox as working directory, a clean
/// environment.
fn build_command(
    cmd: &CommandInfo,
    sandbox: &Path,
    fw: &FrameworkId,
    task: &TaskId,
) -> Result<Command, String> {
    let (first, rest) = cmd.argv.split_first().ok_or_else(|| "empty command".to_string())?;
    let mut command = if cmd.shell {
        let mut c = Command::new("/bin/sh");
        c.arg("-c").arg(first);
        c
    } else {
        let mut c = Command::new(resolve_program(first, &cmd.env)?);
        c.arg0(first).args(rest);
        c
    };
    command.process_group(0).current_dir(sandbox).env_clear();
    command.env("PATH", TASK_PATH).env("HOME", sandbox);
    for (k, v) in &cmd.env {
        command.env(k, v);
    }
    command
        .env("AGORA_SANDBOX", sandbox)
        .env("AGORA_TASK_ID", task.as_str())
        .env("AGORA_FRAMEWORK_ID", fw.as_str());
    Ok(command)
}

/// Finds a bare program name on the task's PATH (its own `PATH` env, else the default), so that
/// std spawns it by absolute path: with `PATH` in a cleared environment and a name to look up,
/// std would leave `posix_spawn` for fork+exec, which costs tens of milliseconds from a large
/// agent process.
fn resolve_program(program: &str, env: &[(String, String)]) -> Result<std::path::PathBuf, String> {
    if program.contains('/') {
        return Ok(program.into());
    }
    let path = env.iter().rev().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_str()).unwrap_or(TASK_PATH);
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(program);
        if let Ok(meta) = std::fs::metadata(&candidate) {
            use std::os::unix::fs::PermissionsExt;
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Ok(candidate);
            }
        }
    }
    Err(format!("cannot run `{program}`: not found in PATH ({path})"))
}

/// Checks a command before launching it; the error is the message of a TASK_ERROR.
pub fn validate(task: &TaskInfo) -> Result<(), String> {
    let cmd = match &task.kind {
        TaskKind::Command(cmd) => cmd,
        TaskKind::Wasm(info) => return crate::executors::validate(info),
        TaskKind::Executor(t) => return crate::executors::validate_executor(&t.executor),
    };
    let Some(first) = cmd.argv.first() else {
        return Err("the command is empty".into());
    };
    if first.is_empty() {
        return Err("the program name is empty".into());
    }
    validate_args_env(&cmd.argv, &cmd.env)
}

/// Arguments and environment a process (or a WASI guest) can be given: no NUL bytes, variable
/// names non-empty and without `=`.
pub(crate) fn validate_args_env(args: &[String], env: &[(String, String)]) -> Result<(), String> {
    if let Some(a) = args.iter().find(|a| a.contains('\0')) {
        return Err(format!("argument {a:?} contains a NUL byte"));
    }
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(format!("invalid environment variable name {k:?}"));
        }
        if v.contains('\0') {
            return Err(format!("environment variable {k} contains a NUL byte"));
        }
    }
    Ok(())
}

async fn checkpoint(spec: &LaunchSpec, pid: Option<u32>, state: TaskState) {
    let record = TaskCheckpoint {
        framework_id: spec.framework_id.clone(),
        task: spec.task.clone(),
        run_dir: spec.run_dir.clone(),
        pid,
        state,
        updated_ms: unix_millis(),
    };
    let path = Layout::task_checkpoint(&spec.executor_dir);
    let result = match serde_json::to_vec_pretty(&record) {
        Ok(data) => {
            let p = path.clone();
            tokio::task::spawn_blocking(move || write_checkpoint(&p, &data))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        }
        Err(e) => Err(std::io::Error::other(e)),
    };
    if let Err(e) = result {
        tracing::warn!(task_id = %spec.task.task_id, path = %path.display(), error = %e,
            "cannot write the task checkpoint");
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use agora_sdk::Resources;
    use std::time::Instant;

    pub(crate) fn command_task(id: &str, script: &str) -> TaskInfo {
        TaskInfo {
            task_id: TaskId::new(id),
            name: id.into(),
            resources: Resources::cpus(100),
            kind: TaskKind::Command(CommandInfo {
                argv: vec![script.into()],
                shell: true,
                env: vec![("GREETING".into(), "hello".into())],
            }),
            kill_grace: None,
        }
    }

    struct Run {
        spec: LaunchSpec,
        handle: TaskHandle,
        rx: mpsc::UnboundedReceiver<(TaskKey, TaskEvent)>,
        _dir: tempfile::TempDir,
    }

    fn start(task: TaskInfo, grace: Duration) -> Run {
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = Layout::new(dir.path());
        let fw = FrameworkId::new("fw-1");
        let executor_dir = layout.executor_dir(&fw, &task.task_id).expect("ids");
        let run_dir = Layout::run_dir(&executor_dir, uuid::Uuid::new_v4());
        let spec = LaunchSpec {
            framework_id: fw,
            task,
            executor_dir,
            run_dir,
            kill_grace: grace,
            isolator: Isolator::none(),
            user: None,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = launch(spec.clone(), tx);
        Run { spec, handle, rx, _dir: dir }
    }

    async fn next(run: &mut Run) -> TaskEvent {
        let (key, ev) = tokio::time::timeout(Duration::from_secs(10), run.rx.recv())
            .await
            .expect("event in time")
            .expect("event");
        assert_eq!(key, run.spec.key());
        ev
    }

    async fn terminated(run: &mut Run) -> Termination {
        match next(run).await {
            TaskEvent::Terminated(t) => t,
            other => panic!("expected Terminated, got {other:?}"),
        }
    }

    fn read(run: &Run, name: &str) -> String {
        std::fs::read_to_string(run.spec.run_dir.join(name)).expect("output file")
    }

    #[tokio::test]
    async fn failing_command_reports_exit_code_and_output() {
        let mut run = start(command_task("t1", "echo hi; echo err >&2; exit 3"), Duration::from_secs(3));
        assert!(matches!(next(&mut run).await, TaskEvent::Running { .. }));
        let t = terminated(&mut run).await;
        assert_eq!(t.state, TaskState::Failed);
        assert_eq!(t.reason, "command exited");
        assert_eq!(t.exit_code, Some(3));
        assert_eq!(t.signal, None);
        assert!(t.usage.and_then(|u| u.cpu_time).is_some());
        assert_eq!(read(&run, "stdout"), "hi\n");
        assert_eq!(read(&run, "stderr"), "err\n");
        assert!(*run.handle.done.borrow());
        let cp: TaskCheckpoint = serde_json::from_slice(
            &std::fs::read(Layout::task_checkpoint(&run.spec.executor_dir)).expect("task.json"),
        )
        .expect("json");
        assert_eq!(cp.state, TaskState::Failed);
        assert_eq!(cp.task.task_id, TaskId::new("t1"));
    }

    #[tokio::test]
    async fn environment_and_working_directory() {
        let script = "echo \"$GREETING $AGORA_TASK_ID $AGORA_FRAMEWORK_ID\"; \
                      [ \"$(pwd -P)\" = \"$(cd \"$AGORA_SANDBOX\" && pwd -P)\" ] && [ \"$HOME\" = \"$AGORA_SANDBOX\" ] && echo $PATH";
        let mut run = start(command_task("env", script), Duration::from_secs(3));
        assert!(matches!(next(&mut run).await, TaskEvent::Running { .. }));
        let t = terminated(&mut run).await;
        assert_eq!((t.state, t.exit_code), (TaskState::Finished, Some(0)));
        assert_eq!(read(&run, "stdout"), format!("hello env fw-1\n{TASK_PATH}\n"));
    }

    #[tokio::test]
    async fn missing_program_fails_to_start() {
        let mut task = command_task("nope", "");
        task.kind = TaskKind::Command(CommandInfo {
            argv: vec!["/definitely/not/a/program".into(), "x".into()],
            shell: false,
            env: vec![],
        });
        let mut run = start(task, Duration::from_secs(3));
        let t = terminated(&mut run).await;
        assert_eq!(t.state, TaskState::Failed);
        assert_eq!(t.reason, "failed to start");
        assert!(t.message.contains("/definitely/not/a/program"), "{}", t.message);
    }

    #[tokio::test]
    async fn kill_terminates_the_whole_process_group() {
        let grace = Duration::from_secs(2);
        let mut run = start(command_task("k", "sleep 30 & echo $! > bg.pid; sleep 30"), grace);
        let TaskEvent::Running { pid, .. } = next(&mut run).await else { panic!("not running") };
        // Wait until the background sleep is there.
        let bg_file = run.spec.run_dir.join("bg.pid");
        let deadline = Instant::now() + Duration::from_secs(5);
        let bg: i32 = loop {
            if let Some(p) = std::fs::read_to_string(&bg_file).ok().and_then(|s| s.trim().parse().ok()) {
                break p;
            }
            assert!(Instant::now() < deadline, "background pid never written");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let started = Instant::now();
        run.handle.kill();
        run.handle.kill();
        assert_eq!(next(&mut run).await, TaskEvent::Killing);
        let t = terminated(&mut run).await;
        assert!(started.elapsed() < grace + Duration::from_secs(1));
        assert_eq!(t.state, TaskState::Killed);
        assert_eq!(t.reason, "killed");
        assert_eq!(t.signal, Some(libc::SIGTERM));
        // Nothing of the group is left (the background sleep was reparented, so poll briefly).
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            // SAFETY: signal 0 only checks for existence.
            let alive = unsafe { libc::kill(bg, 0) } == 0 && !is_zombie(bg);
            // SAFETY: as above.
            let group = unsafe { libc::killpg(pid as i32, 0) } == 0;
            if !alive && !group {
                break;
            }
            assert!(Instant::now() < deadline, "process group {pid} survived the kill");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn sigterm_ignoring_task_is_killed_after_grace() {
        let grace = Duration::from_millis(300);
        let mut run =
            start(command_task("stubborn", "trap '' TERM; echo ready; while :; do sleep 0.05; done"), grace);
        assert!(matches!(next(&mut run).await, TaskEvent::Running { .. }));
        let deadline = Instant::now() + Duration::from_secs(5);
        while read(&run, "stdout").is_empty() {
            assert!(Instant::now() < deadline, "never ready");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let started = Instant::now();
        run.handle.kill();
        assert_eq!(next(&mut run).await, TaskEvent::Killing);
        let t = terminated(&mut run).await;
        assert!(started.elapsed() >= grace);
        assert!(started.elapsed() < grace + Duration::from_secs(2));
        assert_eq!((t.state, t.signal), (TaskState::Killed, Some(libc::SIGKILL)));
    }

    #[tokio::test]
    async fn signal_death_is_reported() {
        let mut run = start(command_task("sig", "kill -9 $$"), Duration::from_secs(3));
        assert!(matches!(next(&mut run).await, TaskEvent::Running { .. }));
        let t = terminated(&mut run).await;
        assert_eq!(t.state, TaskState::Failed);
        assert_eq!(t.reason, "killed by signal");
        assert_eq!((t.exit_code, t.signal), (None, Some(libc::SIGKILL)));
    }

    #[test]
    fn cgroup_accounting_decides_the_reason() {
        let exit = |code: Option<i32>, signal: Option<i32>| ExitInfo {
            code,
            signal,
            usage: Usage { cpu_time: Some(Duration::from_millis(5)), peak_mem: Some(1), ..Usage::default() },
        };
        let limits = Limits { cpu_millis: 500, cpu_quota: true, mem_bytes: Some(64 << 20), pids: Some(32) };
        let oom = CgroupStats {
            cpu_time: Some(Duration::from_secs(2)),
            throttled: Some(Duration::from_secs(1)),
            mem_peak: Some(64 << 20),
            mem_current: Some(4096),
            oom_kills: Some(1),
            ..CgroupStats::default()
        };
        let t = Termination::from_exit(exit(Some(137), None), false, Some((&oom, &limits)));
        assert_eq!((t.state, t.reason.as_str()), (TaskState::Failed, REASON_MEMORY_LIMIT));
        assert!(t.message.contains("67108864 bytes"), "{}", t.message);
        let u = t.usage.expect("usage");
        assert_eq!((u.cpu_time, u.peak_mem), (Some(Duration::from_secs(2)), Some(64 << 20)));
        assert_eq!((u.throttled, u.mem_current), (Some(Duration::from_secs(1)), Some(4096)));
        let t = Termination::from_exit(exit(None, Some(libc::SIGKILL)), false, Some((&oom, &limits)));
        assert_eq!(t.reason, REASON_MEMORY_LIMIT);
        // A child was OOM-killed but the task coped: it finished.
        let t = Termination::from_exit(exit(Some(0), None), false, Some((&oom, &limits)));
        assert_eq!((t.state, t.reason.as_str()), (TaskState::Finished, "command exited"));
        // A kill on request stays a kill.
        let t = Termination::from_exit(exit(None, Some(libc::SIGTERM)), true, Some((&oom, &limits)));
        assert_eq!(t.state, TaskState::Killed);
        let pids = CgroupStats { pids_limit_hits: Some(3), ..CgroupStats::default() };
        let t = Termination::from_exit(exit(Some(2), None), false, Some((&pids, &limits)));
        assert_eq!((t.state, t.reason.as_str()), (TaskState::Failed, REASON_PROCESS_LIMIT));
        assert!(t.message.contains("limit of 32"), "{}", t.message);
        // Without a cgroup the signal says nothing about memory.
        let t = Termination::from_exit(exit(None, Some(libc::SIGKILL)), false, None);
        assert_eq!(t.reason, "killed by signal");
        assert_eq!(t.usage.and_then(|u| u.cpu_time), Some(Duration::from_millis(5)));
    }

    #[test]
    fn validation() {
        assert!(validate(&command_task("ok", "true")).is_ok());
        assert!(validate(&command_task("empty", "")).is_err());
        let mut t = command_task("env", "true");
        t.kind = TaskKind::Command(CommandInfo {
            argv: vec!["true".into()],
            shell: false,
            env: vec![("A=B".into(), "x".into())],
        });
        assert!(validate(&t).is_err());
    }

    fn is_zombie(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
            .unwrap_or(true)
    }
}
