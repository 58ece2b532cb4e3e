//! The command executor: runs one task as a native process in its sandbox and supervises it.
//!
//! [`launch`] starts a supervisor (a tokio task) that creates the sandbox, spawns the process in
//! its own process group with stdout/stderr going straight to files (so the process does not
//! depend on the agent staying alive), checkpoints `task.json`, and reports [`TaskEvent`]s in
//! order: `Running`, possibly `Killing`, then exactly one `Terminated`. Nothing here talks to the
//! master; the agent core turns events into status updates.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agora_sdk::proto::{
    unix_millis, CommandInfo, Digest, FrameworkId, TaskId, TaskInfo, TaskKind, TaskState, Usage,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::cgroups::{self, Cgroup, CgroupStats, Isolator, Limits};
use crate::metrics::{UsageReporter, TASK_ISOLATION_FAILURES};
use crate::process::{signal_name, ChildProcess, ExitInfo};
use crate::sandbox::{write_checkpoint, write_first_checkpoint, Layout, TaskCheckpoint};

/// `PATH` every task starts with.
pub const TASK_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// How often a running task's cgroup is sampled for the agent's metrics.
pub const USAGE_SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
pub use agora_sdk::proto::TaskKey;
use agora_sdk::Reason;

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
    /// Machine-friendly reason: [`Reason::CommandExited`], [`Reason::KilledBySignal`],
    /// [`Reason::Killed`], [`Reason::FailedToStart`], [`Reason::MemoryLimitExceeded`],
    /// [`Reason::ProcessLimitReached`], [`Reason::IsolationFailed`], … (an executor's own).
    pub reason: Reason,
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
            reason: failure.reason,
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
            (TaskState::Killed, Reason::Killed, format!("killed on request; the command {detail}"))
        } else if oom && !success {
            let limit =
                cgroup.and_then(|(_, l)| l.mem_bytes).map_or_else(String::new, |b| format!(" of {b} bytes"));
            let message = format!(
                "the task reached its memory limit{limit} and the kernel's OOM killer ended it (command {detail})"
            );
            (TaskState::Failed, Reason::MemoryLimitExceeded, message)
        } else if pids_hit && !success {
            let limit = cgroup.and_then(|(_, l)| l.pids).map_or_else(String::new, |p| format!(" of {p}"));
            let message =
                format!("the task reached its process limit{limit}: forks were refused (command {detail})");
            (TaskState::Failed, Reason::ProcessLimitReached, message)
        } else {
            match (exit.code, exit.signal) {
                (Some(0), _) => (TaskState::Finished, Reason::CommandExited, format!("command {detail}")),
                (Some(_), _) => (TaskState::Failed, Reason::CommandExited, format!("command {detail}")),
                (None, _) => (TaskState::Failed, Reason::KilledBySignal, format!("command {detail}")),
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
        Self { state, reason, message, exit_code: exit.code, signal: exit.signal, usage: Some(usage) }
    }
}

/// Why a task never ran: the reason and message of its TASK_FAILED.
#[derive(Debug)]
struct StartFailure {
    reason: Reason,
    message: String,
}

impl StartFailure {
    fn spawn(message: String) -> Self {
        Self { reason: Reason::FailedToStart, message }
    }

    fn isolation(message: String) -> Self {
        metrics::counter!(TASK_ISOLATION_FAILURES).increment(1);
        Self { reason: Reason::IsolationFailed, message }
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
    let isolator = spec.isolator.clone();
    let reaped = tokio::task::spawn_blocking(move || {
        let exit = child.reap();
        // Read the group's accounting before anything else happens to it, then kill whatever
        // escaped the process group (setsid) and remove the group from every hierarchy (the
        // `rmdir`s on the command executor's pool thread, after the task's end is reported).
        let stats = cgroup.map(|cg| {
            let stats = cg.stats();
            let limits = *cg.limits();
            if let Err(e) = isolator.retire(cg) {
                tracing::warn!(%task_id, error = %e, "cannot clean up the task's cgroup");
            }
            (stats, limits)
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
            reason: if killed { Reason::Killed } else { Reason::UnknownExit },
            message: format!("cannot reap process {pid}: {e}"),
            exit_code: None,
            signal: None,
            usage: None,
        },
        Err(e) => Termination {
            state: TaskState::Failed,
            reason: Reason::UnknownExit,
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
/// blocking pool). The child joins its cgroup and drops to the task user between `clone` and
/// `exec` ([`Spawn`]), so no user code ever runs unconfined or as root.
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
    let spawn = Spawn::new(cmd, dir, &spec.framework_id, &spec.task.task_id)
        .map_err(|e| fail(StartFailure::spawn(e.to_string())))?;
    let stdin = File::open("/dev/null")
        .map_err(|e| fail(StartFailure::spawn(format!("cannot open /dev/null: {e}"))))?;
    let pid = {
        use std::os::fd::AsRawFd;
        let stdio = [stdin.as_raw_fd(), stdout.as_raw_fd(), stderr.as_raw_fd()];
        let procs: Vec<libc::c_int> = procs.iter().map(AsRawFd::as_raw_fd).collect();
        spawn.spawn(stdio, &procs, spec.user)
    };
    let pid = pid.map_err(|e| {
        let program = cmd.argv.first().map(String::as_str).unwrap_or("");
        let what = if cmd.shell { "/bin/sh".to_string() } else { format!("`{program}`") };
        if e.stage == SpawnStage::Confine && !procs.is_empty() {
            fail(StartFailure::isolation(format!(
                "cannot run {what} in its cgroup as the task user: {} (the task was not started)",
                e.error
            )))
        } else {
            fail(StartFailure::spawn(format!("cannot run {what}: {}", e.error)))
        }
    })?;
    drop((procs, stdin, stdout, stderr));
    Ok((ChildProcess::from_pid(pid), cgroup))
}

/// Which step of a spawn failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SpawnStage {
    /// Before anything of the task's confinement: the stack, `clone`, the process group, stdio,
    /// the working directory.
    Setup = 1,
    /// Joining the cgroup, dropping to the task user, `no_new_privs`.
    Confine = 2,
    /// `execve` itself (a missing or non-executable program).
    Exec = 3,
}

/// Why a command cannot be turned into a process to spawn.
#[derive(Debug, thiserror::Error)]
enum CommandError {
    /// An argument, variable or path holds a NUL byte.
    #[error("{0:?} contains a NUL byte")]
    Nul(String),
    /// The command has no argv.
    #[error("empty command")]
    Empty,
    /// A bare program name is on no directory of the task's PATH.
    #[error("cannot run `{program}`: not found in PATH ({path})")]
    NotFound {
        /// The program name.
        program: String,
        /// The PATH searched.
        path: String,
    },
}

/// A spawn that failed: the program never ran.
#[derive(Debug)]
struct SpawnError {
    stage: SpawnStage,
    error: std::io::Error,
}

/// A task's process, prepared before it is spawned: program, `argv`, environment and working
/// directory as C strings, so that the child allocates nothing.
///
/// [`Spawn::spawn`] starts it the way `posix_spawn` does — `clone(CLONE_VM | CLONE_VFORK)`, the
/// child running on a stack of its own in the executor's memory until it execs — rather than
/// with `fork`: a fork copies the page tables of the (multi-threaded) executor and makes its
/// threads fault on copy-on-write pages until the child execs, which was most of the kernel time
/// of a native launch (`copy_page_range`, `unmap_page_range`, `do_wp_page`). Between `clone` and
/// `exec` the child makes only raw system calls on values prepared here ([`child_main`]): it
/// resets signal handlers, takes its own process group, its stdio and working directory, writes
/// `0` (itself) into each of its group's `cgroup.procs` (opened by the parent), drops to the
/// task user and sets `no_new_privs`. Any failure ends the child before `exec`: no user code
/// ever runs unconfined or as root. A task cannot move itself out again: the cgroup files
/// belong to root.
struct Spawn {
    program: std::ffi::CString,
    cwd: std::ffi::CString,
    /// Owns what `argv` and `envp` point to.
    _strings: Vec<std::ffi::CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
}

impl Spawn {
    /// The process to run for `cmd`: the sandbox as working directory and a clean environment
    /// (`PATH`, `HOME`, the command's own variables, then `AGORA_*`; a later value of a name
    /// replaces an earlier one).
    fn new(cmd: &CommandInfo, sandbox: &Path, fw: &FrameworkId, task: &TaskId) -> Result<Self, CommandError> {
        use std::ffi::{CString, OsStr, OsString};
        use std::os::unix::ffi::{OsStrExt, OsStringExt};
        let c = |s: &OsStr| {
            CString::new(s.as_bytes()).map_err(|_| CommandError::Nul(s.to_string_lossy().into_owned()))
        };
        let (first, rest) = cmd.argv.split_first().ok_or(CommandError::Empty)?;
        let (program, args): (CString, Vec<CString>) = if cmd.shell {
            (
                c(OsStr::new("/bin/sh"))?,
                vec![c(OsStr::new("/bin/sh"))?, c(OsStr::new("-c"))?, c(first.as_ref())?],
            )
        } else {
            let mut args = vec![c(first.as_ref())?];
            for a in rest {
                args.push(c(a.as_ref())?);
            }
            (c(resolve_program(first, &cmd.env)?.as_os_str())?, args)
        };
        let mut env = std::collections::BTreeMap::<OsString, OsString>::new();
        env.insert("PATH".into(), TASK_PATH.into());
        env.insert("HOME".into(), sandbox.into());
        for (k, v) in &cmd.env {
            env.insert(k.into(), v.into());
        }
        env.insert("AGORA_SANDBOX".into(), sandbox.into());
        env.insert("AGORA_TASK_ID".into(), task.as_str().into());
        env.insert("AGORA_FRAMEWORK_ID".into(), fw.as_str().into());
        let mut vars = Vec::with_capacity(env.len());
        for (k, v) in env {
            let mut kv = k.into_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            vars.push(c(OsStr::from_bytes(&kv))?);
        }
        let argv = args.iter().map(|a| a.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
        let envp = vars.iter().map(|v| v.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
        let mut strings = args;
        strings.extend(vars);
        Ok(Self { program, cwd: c(sandbox.as_os_str())?, _strings: strings, argv, envp })
    }

    /// Spawns the process with `stdio` as its fds 0, 1 and 2, in its own process group, joined
    /// to the groups whose `cgroup.procs` are open as `procs`, as `user`. Returns its pid (and
    /// process-group id) once it has exec'd; on an error the child has been reaped.
    fn spawn(
        &self,
        stdio: [libc::c_int; 3],
        procs: &[libc::c_int],
        user: Option<crate::user::TaskUser>,
    ) -> Result<libc::pid_t, SpawnError> {
        use std::sync::atomic::Ordering;
        let setup = |error| SpawnError { stage: SpawnStage::Setup, error };
        let args = ChildArgs {
            program: self.program.as_ptr(),
            argv: self.argv.as_ptr(),
            envp: self.envp.as_ptr(),
            cwd: self.cwd.as_ptr(),
            stdio,
            procs,
            user,
            stage: std::sync::atomic::AtomicI32::new(0),
            errno: std::sync::atomic::AtomicI32::new(0),
        };
        let stack = ChildStack::new().map_err(setup)?;
        // SAFETY: `clone` with CLONE_VM | CLONE_VFORK suspends this thread until the child has
        // exec'd or exited, so `args` and the stack outlive the child's use of them; the child
        // runs `child_main` only, which makes raw system calls and touches nothing but `args`
        // and its own stack. All signals are blocked around the clone so that no handler of
        // this process runs on the child's side of the shared memory before it resets them.
        let pid = unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            let pid = libc::clone(
                child_main,
                stack.top(),
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                std::ptr::from_ref(&args).cast_mut().cast(),
            );
            let error = std::io::Error::last_os_error();
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            if pid < 0 {
                return Err(setup(error));
            }
            pid
        };
        drop(stack);
        let stage = match args.stage.load(Ordering::Acquire) {
            0 => return Ok(pid),
            s if s == SpawnStage::Confine as i32 => SpawnStage::Confine,
            s if s == SpawnStage::Exec as i32 => SpawnStage::Exec,
            _ => SpawnStage::Setup,
        };
        // The child exited without exec'ing: reap it.
        loop {
            let mut status = 0;
            // SAFETY: waitpid on our own child with a valid status pointer.
            let r = unsafe { libc::waitpid(pid, &mut status, 0) };
            if r >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break;
            }
        }
        Err(SpawnError {
            stage,
            error: std::io::Error::from_raw_os_error(args.errno.load(Ordering::Acquire)),
        })
    }
}

/// What the child of [`Spawn::spawn`] reads, and where it says what failed.
struct ChildArgs<'a> {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    stdio: [libc::c_int; 3],
    procs: &'a [libc::c_int],
    user: Option<crate::user::TaskUser>,
    /// The [`SpawnStage`] that failed (0: none; the child exec'd).
    stage: std::sync::atomic::AtomicI32,
    errno: std::sync::atomic::AtomicI32,
}

/// The child's stack: mapped per spawn, with a guard page below it.
struct ChildStack {
    base: *mut libc::c_void,
    len: usize,
}

impl ChildStack {
    const SIZE: usize = 64 * 1024;

    fn new() -> std::io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(4096);
        let len = Self::SIZE + page;
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let stack = Self { base, len };
        // SAFETY: the lowest page of our own mapping.
        if unsafe { libc::mprotect(base, page, libc::PROT_NONE) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stack)
    }

    /// The initial stack pointer (stacks grow down; the mapping is page-aligned).
    fn top(&self) -> *mut libc::c_void {
        // SAFETY: one past the end of the mapping.
        unsafe { self.base.cast::<u8>().add(self.len).cast() }
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no longer used (the child has exec'd or exited).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// The child of [`Spawn::spawn`], between `clone` and `exec`, sharing the executor's memory:
/// raw system calls only (no allocation, no locks, no glibc `set*id`, which would signal the
/// executor's threads), on the values of `arg` (a [`ChildArgs`]).
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    use std::sync::atomic::Ordering;
    // SAFETY: `arg` is the parent's `ChildArgs`, alive while the parent waits in `clone`.
    let a = unsafe { &*arg.cast::<ChildArgs<'_>>() };
    let fail = |stage: SpawnStage| -> libc::c_int {
        // SAFETY: errno is this thread's (the suspended parent thread's TLS, which it does not
        // read before reading `a.errno`); _exit ends the child without running anything.
        unsafe {
            a.errno.store(*libc::__errno_location(), Ordering::Release);
            a.stage.store(stage as i32, Ordering::Release);
            libc::_exit(127)
        }
    };
    // SAFETY: system calls on prepared integers and C strings.
    unsafe {
        // No handler of the executor's may run in the child: every caught signal goes back to
        // its default (exec would do it too, but only at exec); SIGPIPE too, as std does.
        for sig in 1..=64 {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
                continue;
            }
            if old.sa_sigaction != libc::SIG_DFL
                && (old.sa_sigaction != libc::SIG_IGN || sig == libc::SIGPIPE)
            {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        if libc::setpgid(0, 0) != 0 {
            return fail(SpawnStage::Setup);
        }
        for (target, &fd) in (0..).zip(a.stdio.iter()) {
            let r = if fd == target { libc::fcntl(fd, libc::F_SETFD, 0) } else { libc::dup2(fd, target) };
            if r < 0 {
                return fail(SpawnStage::Setup);
            }
        }
        if libc::chdir(a.cwd) != 0 {
            return fail(SpawnStage::Setup);
        }
        for &fd in a.procs {
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return fail(SpawnStage::Confine);
            }
        }
        if let Some(u) = a.user {
            // A null list with length 0 clears the supplementary groups.
            if libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
                || libc::syscall(libc::SYS_setgid, u.gid) != 0
                || libc::syscall(libc::SYS_setuid, u.uid) != 0
            {
                return fail(SpawnStage::Confine);
            }
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return fail(SpawnStage::Confine);
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        libc::execve(a.program, a.argv, a.envp);
    }
    fail(SpawnStage::Exec)
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

/// Finds a bare program name on the task's PATH (its own `PATH` env, else the default): the
/// child of [`Spawn::spawn`] calls `execve`, which searches nothing, and must not search itself
/// (it may not allocate).
fn resolve_program(program: &str, env: &[(String, String)]) -> Result<std::path::PathBuf, CommandError> {
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
    Err(CommandError::NotFound { program: program.to_string(), path: path.to_string() })
}

/// Why the agent refuses a task before launching it (the master checked it too; the agent does
/// not rely on that). The text is the message of the task's TASK_ERROR.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidTask {
    /// A command task has no argv.
    #[error("the command is empty")]
    EmptyCommand,
    /// A command task's program name is empty.
    #[error("the program name is empty")]
    EmptyProgram,
    /// An argument holds a NUL byte.
    #[error("argument {0:?} contains a NUL byte")]
    NulArgument(String),
    /// An environment variable's name is empty or holds `=` or NUL.
    #[error("invalid environment variable name {0:?}")]
    EnvName(String),
    /// An environment variable's value holds a NUL byte.
    #[error("environment variable {0} contains a NUL byte")]
    NulEnvValue(String),
    /// A Wasm task's module digest is malformed.
    #[error("malformed module digest `{0}`")]
    ModuleDigest(Digest),
    /// A Wasm task has no argv[0].
    #[error("a Wasm task needs argv[0]")]
    NoArgv0,
    /// A shipped directory's digest is malformed.
    #[error("malformed directory digest `{0}`")]
    DirectoryDigest(Digest),
    /// A guest directory is relative or climbs with `..`.
    #[error("guest directory `{0}` must be an absolute path without `..`")]
    GuestDir(String),
    /// A framework executor's id is empty or starts with `agora-`.
    #[error("executor id `{0}` is empty or reserved")]
    ReservedExecutorId(String),
    /// A framework executor's id cannot be a directory name.
    #[error(transparent)]
    ExecutorId(#[from] crate::sandbox::IdError),
    /// A framework executor has no command.
    #[error("executor {0} has no command")]
    NoExecutorCommand(String),
    /// A framework executor's program name holds a NUL byte.
    #[error("executor {0}: the program name contains a NUL byte")]
    NulExecutorProgram(String),
    /// A framework executor asks for more files than [`agora_sdk::proto::MAX_EXECUTOR_FETCHES`].
    #[error("executor {id} asks for {n} files (at most {})", agora_sdk::proto::MAX_EXECUTOR_FETCHES)]
    TooManyFetches {
        /// The executor.
        id: String,
        /// How many files it asks for.
        n: usize,
    },
    /// A file a framework executor fetches has a malformed digest.
    #[error("executor {id}: malformed digest `{digest}`")]
    FetchDigest {
        /// The executor.
        id: String,
        /// The digest.
        digest: Digest,
    },
    /// A file a framework executor fetches would land outside its sandbox.
    #[error("fetch path `{0}` must be relative, without `..`")]
    FetchPath(String),
}

/// Checks a command before launching it; the error is the message of a TASK_ERROR.
pub fn validate(task: &TaskInfo) -> Result<(), InvalidTask> {
    let cmd = match &task.kind {
        TaskKind::Command(cmd) => cmd,
        TaskKind::Wasm(info) => return crate::executors::validate(info),
        TaskKind::Executor(t) => return crate::executors::validate_executor(&t.executor),
    };
    let Some(first) = cmd.argv.first() else {
        return Err(InvalidTask::EmptyCommand);
    };
    if first.is_empty() {
        return Err(InvalidTask::EmptyProgram);
    }
    validate_args_env(&cmd.argv, &cmd.env)
}

/// Arguments and environment a process (or a WASI guest) can be given: no NUL bytes, variable
/// names non-empty and without `=`.
pub(crate) fn validate_args_env(args: &[String], env: &[(String, String)]) -> Result<(), InvalidTask> {
    if let Some(a) = args.iter().find(|a| a.contains('\0')) {
        return Err(InvalidTask::NulArgument(a.clone()));
    }
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(InvalidTask::EnvName(k.clone()));
        }
        if v.contains('\0') {
            return Err(InvalidTask::NulEnvValue(k.clone()));
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
            // RUNNING is the task's first checkpoint: written in place (one inode fewer).
            let first = state == TaskState::Running;
            tokio::task::spawn_blocking(move || {
                if first {
                    write_first_checkpoint(&p, &data)
                } else {
                    write_checkpoint(&p, &data)
                }
            })
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
            user: None,
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
        assert_eq!((t.state, &t.reason), (TaskState::Failed, &Reason::MemoryLimitExceeded));
        assert!(t.message.contains("67108864 bytes"), "{}", t.message);
        let u = t.usage.expect("usage");
        assert_eq!((u.cpu_time, u.peak_mem), (Some(Duration::from_secs(2)), Some(64 << 20)));
        assert_eq!((u.throttled, u.mem_current), (Some(Duration::from_secs(1)), Some(4096)));
        let t = Termination::from_exit(exit(None, Some(libc::SIGKILL)), false, Some((&oom, &limits)));
        assert_eq!(t.reason, Reason::MemoryLimitExceeded);
        // A child was OOM-killed but the task coped: it finished.
        let t = Termination::from_exit(exit(Some(0), None), false, Some((&oom, &limits)));
        assert_eq!((t.state, t.reason.as_str()), (TaskState::Finished, "command exited"));
        // A kill on request stays a kill.
        let t = Termination::from_exit(exit(None, Some(libc::SIGTERM)), true, Some((&oom, &limits)));
        assert_eq!(t.state, TaskState::Killed);
        let pids = CgroupStats { pids_limit_hits: Some(3), ..CgroupStats::default() };
        let t = Termination::from_exit(exit(Some(2), None), false, Some((&pids, &limits)));
        assert_eq!((t.state, &t.reason), (TaskState::Failed, &Reason::ProcessLimitReached));
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
        // The typed errors keep the texts TASK_ERROR messages always had.
        assert_eq!(validate(&t).unwrap_err().to_string(), "invalid environment variable name \"A=B\"");
        assert_eq!(
            validate_args_env(&["a\0b".into()], &[]).unwrap_err().to_string(),
            "argument \"a\\0b\" contains a NUL byte"
        );
        assert_eq!(
            validate_args_env(&[], &[("K".into(), "v\0".into())]).unwrap_err().to_string(),
            "environment variable K contains a NUL byte"
        );
        assert_eq!(
            resolve_program("no-such-program-here", &[("PATH".into(), "/nonexistent".into())])
                .unwrap_err()
                .to_string(),
            "cannot run `no-such-program-here`: not found in PATH (/nonexistent)"
        );
    }

    fn is_zombie(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
            .unwrap_or(true)
    }
}
