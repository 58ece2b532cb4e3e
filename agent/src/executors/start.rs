//! Starting executor processes and taking back those of the agent's previous run: who each
//! runs as, its Wasm cache and module, its socket, its cgroup, and why starting one failed.

use super::*;

/// Why the agent could not start an executor, or place what its task needs; the task it was
/// for fails with this as its message.
#[derive(Debug, thiserror::Error)]
pub(super) enum StartError {
    /// The framework's task group could not be found or made.
    #[error("no group for framework {framework}: {source}")]
    NoGroup { framework: FrameworkId, source: std::io::Error },
    /// The framework id cannot name a directory.
    #[error(transparent)]
    Id(#[from] crate::sandbox::IdError),
    /// A file system call failed: `what` names it, with its path.
    #[error("cannot {what} {}: {source}", path.display())]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    /// The agent's own binary (which runs the built-in executors) cannot be found.
    #[error("cannot find the agora binary: {0}")]
    NoBinary(std::io::Error),
    /// The isolation spec for the command executor could not be written.
    #[error("cannot describe the isolation for the command executor: {0}")]
    Isolation(#[from] serde_json::Error),
    /// The executor's cgroup could not be made.
    #[error("cannot create the executor's cgroup: {0}")]
    Cgroup(#[from] crate::cgroups::CgroupError),
}

impl StartError {
    fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Self + 'a {
        move |source| StartError::Io { what, path: path.to_path_buf(), source }
    }
}

/// Starting and recovering executors.
impl Manager {
    /// Who executor `exec` runs as: the uid of its key (the task user when its tasks name
    /// no user) with its framework's group as its only group; the command executor's key has
    /// no uid and this is the task user, to whom its socket belongs.
    pub(super) fn user_for(&self, exec: &ExecKey) -> Result<Option<crate::user::TaskUser>, StartError> {
        let fw = &exec.0;
        match &self.config.task_groups {
            Some(g) => g
                .for_framework(fw.as_str())
                .map(|u| Some(crate::user::TaskUser { uid: exec.2.unwrap_or(u.uid), gid: u.gid }))
                .map_err(|source| StartError::NoGroup { framework: fw.clone(), source }),
            None => Ok(None),
        }
    }

    /// The Wasm cache directory of `exec`'s framework and user (compiled modules, and the
    /// modules its executor may read): `framework-<fw>` for the task user, as before users of
    /// their own, and `framework-<fw>+uid<uid>` for another user (`+` never occurs in an
    /// escaped id, so no framework's name can take another's directory). Compiled modules are
    /// code the executor loads: one user's executor never loads what another's wrote.
    pub(super) fn framework_cache(&self, exec: &ExecKey) -> Result<PathBuf, StartError> {
        let mut name = crate::sandbox::path_component("framework", exec.0.as_str())?;
        if let (Some(uid), Some(g)) = (exec.2, &self.config.task_groups) {
            if uid != g.task_uid() {
                name.push_str(&format!("+uid{uid}"));
            }
        }
        Ok(self.cache_dir.join(name))
    }

    /// Where `exec`'s Wasm executor reads launch `l`'s module: a hard link (or, across file
    /// systems, a copy) of the cached artifact in its framework's and user's own directory,
    /// made once per framework, user and module.
    pub(super) fn framework_module(&mut self, exec: &ExecKey, l: &WasmLaunch) -> Result<PathBuf, StartError> {
        let owner = (exec.0.clone(), exec.2);
        // The hot path of every Wasm launch: no lookup beyond this when the module is placed.
        if let Some(p) = self.modules.get(&owner).and_then(|m| m.get(&l.digest)) {
            return Ok(p.clone());
        }
        let dir = self.framework_cache(exec)?.join("modules");
        crate::sandbox::create_sandbox(&dir, self.user_for(exec)?).map_err(StartError::io("create", &dir))?;
        let dest = dir.join(&l.digest);
        if !dest.exists() {
            if let Err(e) = std::fs::hard_link(&l.module_path, &dest) {
                tracing::debug!(error = %e, "cannot link a module for the executor; copying it");
                std::fs::copy(&l.module_path, &dest).map_err(StartError::io("copy the module to", &dest))?;
            }
        }
        self.modules.entry(owner).or_default().insert(l.digest.clone(), dest.clone());
        Ok(dest)
    }

    /// Listens on `socket` for executor `exec` (replacing a stale socket file there).
    pub(super) fn bind(&self, socket: &Path, exec: &ExecKey) -> Result<UnixListener, StartError> {
        {
            use std::os::unix::fs::DirBuilderExt;
            let dir = socket.parent().unwrap_or(&self.dir);
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(crate::sandbox::PASS_THROUGH)
                .create(dir)
                .map_err(StartError::io("create", dir))?;
        }
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).map_err(StartError::io("listen on", socket))?;
        // Only the executor's user may connect (and the peer's pid is checked on accept).
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600));
        if let Some(u) = self.user_for(exec)? {
            u.chown(socket).map_err(StartError::io("give the task user the socket", socket))?;
        }
        Ok(listener)
    }

    /// See [`super::Executors::recover`].
    pub(super) fn recover(
        &mut self,
        records: Vec<ExecutorRecord>,
        tasks: Vec<(RecoveredTask, NewSlot)>,
        timeout: Duration,
        done: tokio::sync::oneshot::Sender<()>,
    ) {
        let mut by_exec: HashMap<ExecKey, Vec<(RecoveredTask, NewSlot)>> = HashMap::new();
        for (t, slot) in tasks {
            by_exec
                .entry((t.key.framework_id.clone(), t.executor_id.clone(), t.uid))
                .or_default()
                .push((t, slot));
        }
        let mut gone = Vec::new();
        for rec in records {
            let exec = rec.key();
            self.next_serial = self.next_serial.max(rec.serial);
            let tasks = by_exec.remove(&exec).unwrap_or_default();
            let kind = match &rec.kind {
                ExecutorKind::Wasm => ExecKind::Wasm,
                ExecutorKind::Command => ExecKind::Command,
                ExecutorKind::Custom { info, sandbox } => {
                    ExecKind::Custom { info: info.clone(), sandbox: sandbox.clone() }
                }
            };
            let limits =
                self.isolator.limits_for(&executor_resources(&kind, tasks.iter().map(|(t, _)| &t.resources)));
            let cgroup = rec
                .cgroup
                .as_deref()
                .and_then(|n| self.isolator.adopt(n, limits))
                .map(|g| Arc::new(Mutex::new(g)));
            let mut slots = HashMap::new();
            for (t, NewSlot { events, done }) in tasks {
                let leftovers = Leftovers { process_group: t.process_group, cgroup: t.cgroup };
                let slot = TaskSlot {
                    resources: t.resources,
                    events,
                    done,
                    killing: false,
                    running: t.running,
                    leftovers,
                };
                slots.insert(t.key.task_id, slot);
            }
            let alive = rec.pid.is_some_and(|p| crate::checkpoint::same_process(p, rec.start_time));
            let listener = if alive { Some(self.bind(&rec.socket, &exec)) } else { None };
            let idle_since = slots.is_empty().then(Instant::now);
            let state = if matches!(listener, Some(Ok(_))) {
                Lifecycle::Recovering { pending: Pending::default(), idle_since }
            } else {
                // Not coming back: handled as gone below, before anything else.
                Lifecycle::Starting(Pending::default())
            };
            self.executors.insert(
                exec.clone(),
                Executor {
                    serial: rec.serial,
                    kind,
                    pid: rec.pid,
                    state,
                    tasks: slots,
                    cgroup: cgroup.clone(),
                    resize: false,
                    socket: rec.socket.clone(),
                    log: rec.log.clone(),
                    start_time: rec.start_time,
                    seen_seq: rec.acked_seq,
                    acked_seq: rec.acked_seq,
                },
            );
            match listener {
                Some(Ok(listener)) => {
                    let Some(pid) = rec.pid else { continue };
                    self.recovering += 1;
                    let agent_id = self.agent_id.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    let spawn = ExecutorSpawn {
                        adopted: Some(Adopted { pid, start_time: rec.start_time, timeout }),
                        detached: self.detach.clone(),
                        command: matches!(rec.kind, ExecutorKind::Command),
                        program: PathBuf::new(),
                        args: Vec::new(),
                        env: vec![(
                            ENV_AGENT_ID.into(),
                            agent_id.as_ref().map(|a| a.to_string()).unwrap_or_default(),
                        )],
                        cwd: None,
                        fetch: Vec::new(),
                        fetcher: self.fetcher.clone(),
                        user: self.user_for(&exec).ok().flatten(),
                        log: rec.log.clone(),
                        listener,
                        socket: rec.socket.clone(),
                        cgroup,
                        exec: exec.clone(),
                        serial: rec.serial,
                        manager: self.tx.clone(),
                    };
                    tracing::info!(framework_id = %exec.0, executor_id = %exec.1, pid, ?timeout,
                        "waiting for an executor of the agent's previous run to reconnect");
                    tokio::spawn(spawn.run());
                }
                Some(Err(why)) => {
                    if let Some(pid) = rec.pid {
                        crate::checkpoint::kill_session(pid);
                    }
                    gone.push((exec, rec.serial, why.to_string()));
                }
                None => gone.push((
                    exec,
                    rec.serial,
                    "the executor did not outlive the agent's restart".to_string(),
                )),
            }
        }
        let mut launches = HashMap::new();
        for (exec, serial, why) in gone {
            tracing::warn!(framework_id = %exec.0, executor_id = %exec.1, "{why}");
            self.handle(
                ManagerCmd::Gone { exec, serial, reason: Reason::ExecutorTerminated, why },
                &mut launches,
            );
        }
        // Tasks of executors without a checkpoint (never started, or gone already).
        let mut leftovers = Vec::new();
        for (_, tasks) in by_exec {
            for (t, slot) in tasks {
                leftovers.push(Leftovers { process_group: t.process_group, cgroup: t.cgroup });
                let slot = TaskSlot {
                    resources: t.resources,
                    events: slot.events,
                    done: slot.done,
                    killing: false,
                    running: t.running,
                    leftovers: Leftovers::default(),
                };
                slot.end(
                    &t.key.framework_id,
                    &t.key.task_id,
                    failed(
                        Reason::ExecutorTerminated,
                        "its executor is gone after the agent restarted".into(),
                    ),
                );
            }
        }
        if !leftovers.is_empty() {
            kill_leftovers(&self.isolator, leftovers);
        }
        self.resize_groups();
        if self.recovering == 0 {
            let _ = done.send(());
        } else {
            self.recovery_done = Some(done);
        }
    }

    pub(super) fn start_executor(&mut self, exec: &ExecKey, kind: ExecKind) -> Result<(), StartError> {
        self.next_serial += 1;
        let serial = self.next_serial;
        let fw = &exec.0;
        let program = match &self.config.executor_program {
            Some(p) => p.clone(),
            None => std::env::current_exe().map_err(StartError::NoBinary)?,
        };
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(crate::sandbox::PASS_THROUGH)
                .create(&self.dir)
                .map_err(StartError::io("create", &self.dir))?;
        }
        let socket = socket_path(&self.dir, serial);
        let listener = self.bind(&socket, exec)?;
        let user = self.user_for(exec)?;
        let agent_id = self.agent_id.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let recovery_secs =
            self.config.recovery_timeout.min(agora_sdk::executor_link::MAX_RECOVERY_TIMEOUT).as_secs().max(1);
        let mut env: Vec<(String, String)> = vec![
            (ENV_SOCKET.into(), socket.display().to_string()),
            (ENV_EXECUTOR_ID.into(), exec.1.to_string()),
            (ENV_FRAMEWORK_ID.into(), fw.to_string()),
            (ENV_AGENT_ID.into(), agent_id.as_ref().map(|a| a.to_string()).unwrap_or_default()),
            (ENV_RECOVERY_TIMEOUT.into(), recovery_secs.to_string()),
        ];
        let (program, args, cgroup, cwd, fetch) = match &kind {
            ExecKind::Wasm => {
                // Compiled modules are code the executor loads: the cache is per framework and
                // owned by the task user, never shared between frameworks.
                let cache = self.framework_cache(exec)?;
                crate::sandbox::create_sandbox(&cache, user).map_err(StartError::io("create", &cache))?;
                let args: Vec<String> = vec![
                    "executor-wasm".into(),
                    "--socket".into(),
                    socket.display().to_string(),
                    "--executor-id".into(),
                    format!("{fw}/{serial}"),
                    "--cache-dir".into(),
                    cache.display().to_string(),
                    "--max-tasks".into(),
                    self.config.max_tasks_per_executor.to_string(),
                    "--threads".into(),
                    self.config.executor_threads.to_string(),
                    "--recovery-timeout".into(),
                    recovery_secs.to_string(),
                ];
                (program, args, true, None, Vec::new())
            }
            ExecKind::Command => {
                let mut args: Vec<String> = vec![
                    "executor-command".into(),
                    "--socket".into(),
                    socket.display().to_string(),
                    "--executor-id".into(),
                    format!("{fw}/{serial}"),
                    "--recovery-timeout".into(),
                    recovery_secs.to_string(),
                ];
                if let Some(spec) = self.isolator.spec() {
                    args.push("--isolation".into());
                    args.push(serde_json::to_string(&spec)?);
                }
                if let Some(u) = user {
                    args.push("--task-uid".into());
                    args.push(u.uid.to_string());
                    args.push("--task-gid".into());
                    args.push(u.gid.to_string());
                }
                (program, args, false, None, Vec::new())
            }
            ExecKind::Custom { info, sandbox } => {
                env.push((ENV_SANDBOX.into(), sandbox.display().to_string()));
                env.push(("HOME".into(), sandbox.display().to_string()));
                env.push(("PATH".into(), crate::tasks::TASK_PATH.into()));
                env.extend(info.command.env.iter().cloned());
                let (prog, args) = if info.command.shell {
                    (
                        "/bin/sh".into(),
                        vec!["-c".to_string(), info.command.argv.first().cloned().unwrap_or_default()],
                    )
                } else {
                    let first = info.command.argv.first().cloned().unwrap_or_default();
                    let prog = if first.contains('/') { sandbox.join(&first) } else { PathBuf::from(first) };
                    (prog, info.command.argv.iter().skip(1).cloned().collect())
                };
                (prog, args, true, Some(sandbox.clone()), info.fetch.clone())
            }
        };
        let cgroup = if cgroup {
            let name = format!("executor-{serial}");
            let limits = self.isolator.limits_for(&executor_resources(&kind, std::iter::empty()));
            self.isolator.create(&name, limits)?.map(|g| Arc::new(Mutex::new(g)))
        } else {
            None
        };
        let log = match &cwd {
            Some(dir) => dir.join("stderr"),
            None => self.dir.join(format!("{serial}.log")),
        };
        let spawn = ExecutorSpawn {
            adopted: None,
            detached: self.detach.clone(),
            command: matches!(kind, ExecKind::Command),
            program,
            args,
            env,
            cwd,
            fetch,
            fetcher: self.fetcher.clone(),
            user,
            log: log.clone(),
            listener,
            socket: socket.clone(),
            cgroup: cgroup.clone(),
            exec: exec.clone(),
            serial,
            manager: self.tx.clone(),
        };
        tokio::spawn(spawn.run());
        self.executors.insert(
            exec.clone(),
            Executor {
                serial,
                kind,
                pid: None,
                state: Lifecycle::Starting(Pending::default()),
                tasks: HashMap::new(),
                cgroup,
                resize: false,
                socket,
                log,
                start_time: None,
                seen_seq: 0,
                acked_seq: 0,
            },
        );
        self.checkpoint(exec);
        Ok(())
    }
}
