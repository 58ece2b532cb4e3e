//! Starting one executor process and relaying its frames.

use super::*;

/// Why an executor could not be started or ended before its relay did. The text is the
/// message of its tasks' status updates.
#[derive(Debug, thiserror::Error)]
pub(super) enum SpawnError {
    /// The framework executor's sandbox could not be created.
    #[error("cannot create the executor's sandbox {}: {err}", path.display())]
    Sandbox {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    /// A file it asked for could not be fetched or placed.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// A log file could not be created.
    #[error("cannot create {}: {err}", path.display())]
    Log {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    /// A log file could not be given to the task user.
    #[error("cannot hand {} to the task user: {err}", path.display())]
    Chown {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    /// The log file could not be shared between stdout and stderr.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The program could not be started.
    #[error("cannot start {}: {err}", program.display())]
    Start {
        program: PathBuf,
        #[source]
        err: std::io::Error,
    },
    /// The process could not be put in its cgroup (it was killed).
    #[error("cannot place the executor in its cgroup: {0}")]
    Cgroup(#[source] crate::cgroups::CgroupError),
    /// The process waiting for its cgroup could not be let go.
    #[error("cannot release the executor: {0}")]
    Release(#[source] std::io::Error),
    /// The process ended before it connected.
    #[error("the executor exited before connecting ({0})")]
    ExitedEarly(String),
    /// Another process connected to the executor's socket.
    #[error("a process other than the executor ({0:?}) connected to its socket")]
    Impostor(Option<i32>),
    /// The socket failed.
    #[error("cannot accept the executor's connection: {0}")]
    Accept(#[source] std::io::Error),
    /// An adopted executor did not come back within its recovery timeout.
    #[error("the executor did not reconnect after the agent restarted (waited {0:?})")]
    NoReconnect(Duration),
    /// A new executor did not connect in time.
    #[error("the executor did not connect within {0:?}")]
    NoConnect(Duration),
    /// The executor speaks another protocol version (it was told so).
    #[error("executor protocol {0}, agent speaks {EXECUTOR_PROTOCOL_VERSION}")]
    Version(u32),
    /// The executor's first frame was not `Hello`.
    #[error("the executor did not start with hello: {0:?}")]
    NoHello(Box<ExecutorMessage>),
    /// The executor closed its socket before `Hello`.
    #[error("the executor closed its socket before hello")]
    ClosedBeforeHello,
    /// The executor's `Hello` could not be read.
    #[error("executor hello: {0}")]
    Hello(#[source] FrameError),
    /// No `Hello` in time.
    #[error("the executor did not say hello")]
    HelloTimeout,
    /// The `Welcome` could not be sent.
    #[error("cannot welcome the executor: {0}")]
    Welcome(#[source] FrameError),
}

/// An executor that outlived the agent's restart: its process, and how long it has to
/// reconnect.
pub(super) struct Adopted {
    pub(super) pid: u32,
    pub(super) start_time: Option<u64>,
    pub(super) timeout: Duration,
}

/// The executor's process: the agent's child, or one adopted after a restart (not a child:
/// watched through `/proc`, its start time guarding against pid reuse).
enum ExecProcess {
    Child(tokio::process::Child),
    Adopted { pid: u32, start_time: Option<u64> },
}

impl ExecProcess {
    fn kill(&mut self) {
        match self {
            ExecProcess::Child(c) => {
                let _ = c.start_kill();
            }
            ExecProcess::Adopted { pid, start_time } => {
                if crate::checkpoint::same_process(*pid, *start_time) {
                    crate::checkpoint::kill_session(*pid);
                }
            }
        }
    }

    async fn wait(&mut self) -> String {
        match self {
            ExecProcess::Child(c) => describe(c.wait().await),
            ExecProcess::Adopted { pid, start_time } => {
                while crate::checkpoint::same_process(*pid, *start_time) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                "ended".into()
            }
        }
    }
}

/// Starting one executor process (or adopting one) and then relaying its frames.
pub(super) struct ExecutorSpawn {
    /// Set for an executor of an earlier run of the agent: nothing is started, it reconnects.
    pub(super) adopted: Option<Adopted>,
    pub(super) program: PathBuf,
    /// Cancelled when the agent stops without shutting executors down: the connection closes.
    pub(super) detached: CancellationToken,
    /// The built-in command executor (it stays the agent's user and kills its own tasks).
    pub(super) command: bool,
    pub(super) args: Vec<String>,
    /// Extra environment (the `AGORA_EXECUTOR_*` variables, a framework executor's own).
    pub(super) env: Vec<(String, String)>,
    /// A framework executor's sandbox: created for the task user, the fetched files put there,
    /// the working directory. `None` for the built-in executors.
    pub(super) cwd: Option<PathBuf>,
    pub(super) fetch: Vec<FetchInfo>,
    pub(super) fetcher: Arc<Fetcher>,
    pub(super) user: Option<crate::user::TaskUser>,
    pub(super) log: PathBuf,
    pub(super) listener: UnixListener,
    pub(super) socket: PathBuf,
    pub(super) cgroup: Option<Arc<Mutex<Cgroup>>>,
    pub(super) exec: ExecKey,
    pub(super) serial: u64,
    pub(super) manager: mpsc::UnboundedSender<ManagerCmd>,
}

impl ExecutorSpawn {
    /// Whether this is the built-in command executor.
    pub(super) fn is_command(&self) -> bool {
        self.command
    }

    pub(super) async fn run(self) {
        let prepared = if self.adopted.is_some() { Ok(()) } else { self.prepare().await };
        let (reason, why) = match prepared {
            Err(e) => (Reason::FetchFailed, e.to_string()),
            Ok(()) => match self.serve().await.map_err(|e| e.to_string()) {
                Ok(why) | Err(why) => {
                    let tail = log_tail(&self.log);
                    let why =
                        if tail.is_empty() { why } else { format!("{why}; executor log ends with: {tail}") };
                    (Reason::ExecutorTerminated, why)
                }
            },
        };
        if self.detached.is_cancelled() {
            // The agent stopped and leaves the executor to its next run: its socket path and
            // checkpoint stay.
            return;
        }
        let _ = std::fs::remove_file(&self.socket);
        let _ =
            self.manager.send(ManagerCmd::Gone { exec: self.exec.clone(), serial: self.serial, reason, why });
    }

    /// A framework executor's sandbox and the files it asked for.
    pub(super) async fn prepare(&self) -> Result<(), SpawnError> {
        if let Some(dir) = &self.cwd {
            crate::sandbox::create_sandbox(dir, self.user)
                .map_err(|err| SpawnError::Sandbox { path: dir.clone(), err })?;
            for f in &self.fetch {
                place_fetched(&self.fetcher, f, dir, self.user).await?;
            }
        }
        Ok(())
    }

    /// Returns why the executor ended.
    pub(super) async fn serve(&self) -> Result<String, SpawnError> {
        let (mut child, pid) = match &self.adopted {
            Some(a) => (ExecProcess::Adopted { pid: a.pid, start_time: a.start_time }, a.pid),
            None => {
                let child = self.spawn_child().await?;
                let pid = child.id().unwrap_or(0);
                (ExecProcess::Child(child), pid)
            }
        };
        self.relay(&mut child, pid).await
    }

    /// Starts the executor process (in its cgroup, if it has one).
    async fn spawn_child(&self) -> Result<tokio::process::Child, SpawnError> {
        let open = |path: &Path| {
            use std::os::unix::fs::OpenOptionsExt;
            let f =
                std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path);
            f.map_err(|err| SpawnError::Log { path: path.to_path_buf(), err })
        };
        let log = open(&self.log)?;
        // A framework's executor writes `stdout` and `stderr` in its sandbox (`agora logs` of
        // its tasks); the built-in ones one log file.
        let out = match &self.cwd {
            Some(dir) => {
                let path = dir.join("stdout");
                let f = open(&path)?;
                if let Some(u) = self.user {
                    u.chown(&path).map_err(|err| SpawnError::Chown { path: path.clone(), err })?;
                    u.chown(&self.log).map_err(|err| SpawnError::Chown { path: self.log.clone(), err })?;
                }
                f
            }
            None => log.try_clone()?,
        };
        let gated = self.cgroup.is_some();
        let mut cmd = if gated {
            tokio::process::Command::from(crate::cgroups::gated_command(&self.program))
        } else {
            tokio::process::Command::new(&self.program)
        };
        // Executors get only what they are given (the agent's environment may hold secrets);
        // the built-in ones keep the agent's log filter.
        cmd.env_clear();
        if self.cwd.is_none() {
            cmd.env("PATH", crate::tasks::TASK_PATH);
            if let Ok(filter) = std::env::var("AGORA_LOG") {
                cmd.env("AGORA_LOG", filter);
            }
        }
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(if gated { Stdio::piped() } else { Stdio::null() })
            .stdout(out)
            .stderr(log);
        // Executors outlive the agent (a restarted agent adopts them): never killed when the
        // agent drops its handle, and in a session of their own (so also a process group of
        // their own: what they fork goes with them), out of reach of a signal to the agent's
        // process group or terminal. No parent-death signal.
        // The command executor stays the agent's user (it creates cgroups and switches users
        // for its tasks); the Wasm executor and a framework's own run as the task user.
        let user = if self.is_command() { None } else { self.user };
        if let Some(u) = user {
            cmd.uid(u.uid).gid(u.gid);
        }
        // SAFETY: setsid and prctl only, between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                crate::user::no_new_privs_in_child()
            });
        }
        let mut child =
            cmd.spawn().map_err(|err| SpawnError::Start { program: self.program.clone(), err })?;
        let pid = child.id().unwrap_or(0);
        let _ = self.manager.send(ManagerCmd::Spawned { exec: self.exec.clone(), serial: self.serial, pid });
        if let (Some(group), Some(mut gate)) = (&self.cgroup, child.stdin.take()) {
            let placed = group.lock().unwrap_or_else(|p| p.into_inner()).add_process(pid);
            if let Err(e) = placed {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(SpawnError::Cgroup(e));
            }
            gate.write_all(b"\n").await.map_err(SpawnError::Release)?;
        }
        Ok(child)
    }

    /// Waits for the executor's connection and relays its frames until it ends.
    async fn relay(&self, child: &mut ExecProcess, pid: u32) -> Result<String, SpawnError> {
        let wait = self.adopted.as_ref().map_or(EXECUTOR_START_TIMEOUT, |a| a.timeout);
        let deadline = Instant::now() + wait;
        let stream = loop {
            let accepted = tokio::select! {
                () = self.detached.cancelled() => return Ok("the agent stopped".into()),
                r = tokio::time::timeout_at(deadline, self.listener.accept()) => r,
                status = child.wait() => {
                    return Err(SpawnError::ExitedEarly(status));
                }
            };
            match accepted {
                Ok(Ok((s, _))) => {
                    // Only the process the agent started may speak for the executor.
                    let peer = s.peer_cred().ok().and_then(|c| c.pid());
                    if peer.is_some_and(|p| p.unsigned_abs() != pid) {
                        if self.adopted.is_some() {
                            tracing::warn!(executor_id = %self.exec.1, ?peer, expected = pid,
                                "a process other than the executor connected to its socket; ignoring it");
                            continue;
                        }
                        child.kill();
                        return Err(SpawnError::Impostor(peer));
                    }
                    break s;
                }
                Ok(Err(e)) => return Err(SpawnError::Accept(e)),
                Err(_) => {
                    child.kill();
                    return Err(if self.adopted.is_some() {
                        SpawnError::NoReconnect(wait)
                    } else {
                        SpawnError::NoConnect(wait)
                    });
                }
            }
        };
        let (r, w) = stream.into_split();
        let (mut reader, mut writer) = (FrameReader::new(r), FrameWriter::new(w));
        let hello = tokio::time::timeout(EXECUTOR_START_TIMEOUT, reader.recv::<ExecutorMessage>()).await;
        let (exec_pid, resume) = match hello {
            Ok(Ok(Some(ExecutorMessage::Hello { version, pid: exec_pid, resume, .. }))) => {
                if version != EXECUTOR_PROTOCOL_VERSION {
                    let e = SpawnError::Version(version);
                    let _ = writer.send(&AgentToExecutor::refused(e.to_string())).await;
                    if self.adopted.is_some() {
                        child.kill();
                    }
                    return Err(e);
                }
                (exec_pid, resume)
            }
            Ok(Ok(Some(other))) => return Err(SpawnError::NoHello(Box::new(other))),
            Ok(Ok(None)) => return Err(SpawnError::ClosedBeforeHello),
            Ok(Err(e)) => return Err(SpawnError::Hello(e)),
            Err(_) => return Err(SpawnError::HelloTimeout),
        };
        writer
            .send(&AgentToExecutor::Welcome {
                framework_id: self.exec.0.clone(),
                agent_id: self
                    .env
                    .iter()
                    .find(|(k, _)| k == ENV_AGENT_ID)
                    .map(|(_, v)| AgentId::new(v.clone()))
                    .filter(|a| !a.as_str().is_empty()),
                executor_id: self.exec.1.to_string(),
            })
            .await
            .map_err(SpawnError::Welcome)?;
        let (tx, mut rx) = mpsc::unbounded_channel::<AgentToExecutor>();
        let _ = self.manager.send(ManagerCmd::Started {
            exec: self.exec.clone(),
            serial: self.serial,
            pid: if exec_pid != 0 { exec_pid } else { pid },
            to_executor: tx,
            resume,
        });
        let write_loop = async move {
            let mut unsendable = Vec::new();
            while let Some(msg) = rx.recv().await {
                let mut shutdown = matches!(msg, AgentToExecutor::Shutdown);
                feed_split(&mut writer, msg, &mut unsendable).await?;
                while let Ok(more) = rx.try_recv() {
                    shutdown |= matches!(more, AgentToExecutor::Shutdown);
                    feed_split(&mut writer, more, &mut unsendable).await?;
                }
                writer.flush().await?;
                if !unsendable.is_empty() {
                    let updates = unsendable.drain(..).map(launch_too_large).collect();
                    let _ = self.manager.send(ManagerCmd::Updates {
                        exec: self.exec.clone(),
                        serial: self.serial,
                        updates,
                    });
                }
                if shutdown {
                    return Ok(true);
                }
            }
            Ok::<_, FrameError>(false)
        };
        let read_loop = async {
            let mut budget = MessageBudget::default();
            loop {
                match reader.recv::<ExecutorMessage>().await {
                    Ok(Some(ExecutorMessage::Updates(updates))) => {
                        let _ = self.manager.send(ManagerCmd::Updates {
                            exec: self.exec.clone(),
                            serial: self.serial,
                            updates,
                        });
                    }
                    Ok(Some(ExecutorMessage::FrameworkMessage(data))) => {
                        if !budget.take(data.len(), Instant::now()) {
                            tracing::warn!(framework_id = %self.exec.0, executor_id = %self.exec.1,
                                "dropping a framework message: the executor sends more than {} per second",
                                MESSAGES_PER_SECOND);
                        } else if data.len() > agora_sdk::proto::MAX_FRAMEWORK_MESSAGE {
                            tracing::warn!(framework_id = %self.exec.0, executor_id = %self.exec.1, bytes = data.len(),
                                "dropping an executor's framework message larger than the limit");
                        } else {
                            let _ = self.manager.send(ManagerCmd::FromExecutor {
                                exec: self.exec.clone(),
                                serial: self.serial,
                                data,
                            });
                        }
                    }
                    Ok(Some(ExecutorMessage::Hello { .. })) => {
                        tracing::warn!(executor_id = %self.exec.1, "unexpected second hello from an executor")
                    }
                    Ok(None) => return "the executor closed its socket".to_string(),
                    Err(e) => return format!("executor socket: {e}"),
                }
            }
        };
        tokio::pin!(write_loop);
        tokio::pin!(read_loop);
        let mut writing = true;
        // Told to shut down, it has this long to end its tasks and exit; then it is killed.
        let grace = if self.is_command() {
            crate::MAX_KILL_GRACE + Duration::from_secs(10)
        } else {
            EXECUTOR_SHUTDOWN_GRACE
        };
        let mut deadline = None;
        let ended = loop {
            tokio::select! {
                w = &mut write_loop, if writing => {
                    writing = false;
                    match w {
                        Err(e) => break format!("cannot write to the executor: {e}"),
                        Ok(true) => deadline = Some(Instant::now() + grace),
                        Ok(false) => {}
                    }
                }
                why = &mut read_loop => break why,
                // Dropping the socket is the message; the executor ends by itself.
                () = self.detached.cancelled() => return Ok("the agent stopped".into()),
                () = sleep_until_opt(deadline) => {
                    child.kill();
                    break format!("it did not exit within {grace:?} of being shut down and was killed");
                }
            }
        };
        // The socket is closed or broken: the executor exits by itself; make sure of it.
        let status = match tokio::time::timeout(grace, child.wait()).await {
            Ok(s) => s,
            Err(_) => {
                child.kill();
                child.wait().await
            }
        };
        // Whatever it forked and left behind goes with it.
        if let Ok(group) = libc::pid_t::try_from(pid) {
            if group > 0 {
                // SAFETY: kill(2) of the process group the agent created for this executor.
                unsafe { libc::killpg(group, libc::SIGKILL) };
            }
        }
        Ok(format!("{ended} ({status})"))
    }
}

/// Queues `msg` for the executor. A batch of launches too large for one frame goes out in
/// several that each fit, in order; a single launch that cannot fit at all is left in
/// `unsendable` for the caller to fail, and the executor carries on.
pub(super) async fn feed_split<W: tokio::io::AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    msg: AgentToExecutor,
    unsendable: &mut Vec<TaskId>,
) -> Result<(), FrameError> {
    match msg {
        AgentToExecutor::Launch(list) => {
            let unfit = writer.feed_list(list, LIST_BUDGET, AgentToExecutor::Launch).await?;
            unsendable.extend(unfit.into_iter().map(|l| l.task_id));
        }
        AgentToExecutor::LaunchCommands(list) => {
            let unfit = writer.feed_list(list, LIST_BUDGET, AgentToExecutor::LaunchCommands).await?;
            unsendable.extend(unfit.into_iter().map(|l| l.task_id));
        }
        AgentToExecutor::LaunchTasks(list) => {
            let unfit = writer.feed_list(list, LIST_BUDGET, AgentToExecutor::LaunchTasks).await?;
            unsendable.extend(unfit.into_iter().map(|l| l.task_id));
        }
        other => writer.feed(&other).await?,
    }
    Ok(())
}

pub(super) fn launch_too_large(task_id: TaskId) -> ExecutorUpdate {
    ExecutorUpdate {
        seq: 0,
        task_id,
        state: TaskState::Failed,
        reason: Reason::LaunchFailed,
        message: format!("the task's launch does not fit in one executor frame ({MAX_FRAME} bytes)"),
        exit_code: None,
        signal: None,
        pid: None,
        usage: None,
    }
}

pub(super) fn describe(status: std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exit status {c}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => "ended".into(),
        },
        Err(e) => format!("cannot wait for it: {e}"),
    }
}

/// The last line or so of an executor's log, for the reason of the tasks it took down.
pub(super) fn log_tail(path: &Path) -> String {
    let Ok(mut f) = std::fs::File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(400);
    let mut buf = Vec::new();
    use std::io::Seek;
    if f.seek(std::io::SeekFrom::Start(start)).is_err() || f.read_to_end(&mut buf).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&buf);
    text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string()
}

/// Framework messages an executor may send per second (at most once: the rest are dropped, so
/// one executor cannot flood its agent, the master and its scheduler).
pub(super) const MESSAGES_PER_SECOND: u32 = 200;
/// Bytes of framework messages an executor may send per second.
pub(super) const MESSAGE_BYTES_PER_SECOND: usize = 4 << 20;

/// A one-second window of an executor's framework messages.
#[derive(Debug, Default)]
pub(super) struct MessageBudget {
    window: Option<Instant>,
    count: u32,
    bytes: usize,
}

impl MessageBudget {
    /// Whether a message of `len` bytes still fits this second's budget (and counts it).
    pub(super) fn take(&mut self, len: usize, now: Instant) -> bool {
        if self.window.is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1)) {
            *self = Self { window: Some(now), count: 0, bytes: 0 };
        }
        if self.count >= MESSAGES_PER_SECOND || self.bytes + len > MESSAGE_BYTES_PER_SECOND {
            return false;
        }
        self.count += 1;
        self.bytes += len;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_executor_cannot_flood_with_framework_messages() {
        let mut b = MessageBudget::default();
        let t0 = Instant::now();
        let sent = (0..1000).filter(|_| b.take(10, t0)).count();
        assert_eq!(sent, MESSAGES_PER_SECOND as usize);
        assert!(b.take(10, t0 + Duration::from_secs(1)), "a new second, a new budget");
        let mut b = MessageBudget::default();
        let big = 64 << 10;
        let sent = (0..1000).filter(|_| b.take(big, t0)).count();
        assert_eq!(sent, MESSAGE_BYTES_PER_SECOND / big);
    }
}
