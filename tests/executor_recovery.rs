//! The built-in executors outlive their agent (executor protocol v3 recovery): the real
//! `agora executor-command` and `agora executor-wasm` processes against a test-owned Unix
//! listener playing the agent. When the agent goes away their tasks keep running (native
//! processes, Wasm tasks in wasmtime) and their updates are kept; when it comes back at the same
//! socket path they reconnect with what they still run and send again, with their numbers, the
//! updates it had not acknowledged; after the recovery timeout, or when the agent refuses them,
//! they kill their tasks and exit non-zero.
//!
//! No root needed: the executors run without `--isolation` and `--task-uid`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use agora_sdk::executor_proto::{
    AgentToExecutor, CommandLaunch, ExecutorMessage, ExecutorUpdate, Resume, WasmLaunch,
};
use agora_sdk::frame::{FrameReader, FrameWriter};
use agora_sdk::proto::{CommandInfo, FrameworkId, TaskId, TaskState};
use agora_sdk::Resources;
use common::wait_for;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixListener;

const AGORA: &str = env!("CARGO_BIN_EXE_agora");
/// How long any one wait may take before the test fails.
const WAIT: Duration = Duration::from_secs(30);

/// The agent's side: a listener at the executor's socket path, which can go away and come back.
struct FakeAgent {
    dir: tempfile::TempDir,
    listener: Option<UnixListener>,
    /// Native task pids seen, killed when the test ends (a failing test leaves nothing behind).
    pids: Vec<i32>,
}

/// One executor connection, after its `Hello`.
struct Conn {
    reader: FrameReader<OwnedReadHalf>,
    writer: FrameWriter<OwnedWriteHalf>,
    hello: ExecutorMessage,
}

/// An executor process with its log.
struct Executor {
    child: tokio::process::Child,
    log: PathBuf,
}

impl FakeAgent {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = UnixListener::bind(dir.path().join("executor.sock")).expect("bind");
        Self { dir, listener: Some(listener), pids: Vec::new() }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("executor.sock")
    }

    /// The agent dies: nobody listens at the socket path any more.
    fn vanish(&mut self) {
        self.listener = None;
        std::fs::remove_file(self.socket()).expect("remove the socket");
    }

    /// A new agent listens at the same path.
    fn come_back(&mut self) {
        self.listener = Some(UnixListener::bind(self.socket()).expect("bind again"));
    }

    async fn accept(&self) -> Conn {
        let listener = self.listener.as_ref().expect("the agent is here");
        let (stream, _) = tokio::time::timeout(WAIT, listener.accept())
            .await
            .expect("the executor connects")
            .expect("accept");
        let (r, w) = stream.into_split();
        let mut reader = FrameReader::new(r);
        let hello = tokio::time::timeout(WAIT, reader.recv()).await.expect("hello in time").expect("hello");
        Conn { reader, writer: FrameWriter::new(w), hello: hello.expect("hello, not EOF") }
    }

    /// Accepts the executor's first connection and welcomes it.
    async fn welcomed(&self) -> Conn {
        let mut conn = self.accept().await;
        assert!(
            matches!(conn.hello, ExecutorMessage::Hello { resume: None, .. }),
            "a first Hello resumes nothing: {:?}",
            conn.hello
        );
        conn.welcome().await;
        conn
    }

    fn spawn(&self, args: &[&str], recovery_secs: u64) -> Executor {
        let log = self.dir.path().join(format!("{}.log", args[0]));
        let child = tokio::process::Command::new(AGORA)
            .args(args)
            .arg("--socket")
            .arg(self.socket())
            .args(["--executor-id", "ex-1", "--recovery-timeout", &recovery_secs.to_string()])
            .env("AGORA_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the executor");
        Executor { child, log }
    }

    fn command_executor(&self, recovery_secs: u64) -> Executor {
        self.spawn(&["executor-command"], recovery_secs)
    }

    fn wasm_executor(&self, recovery_secs: u64) -> Executor {
        let cache = self.dir.path().join("cache");
        std::fs::create_dir_all(&cache).expect("cache dir");
        let cache = cache.display().to_string();
        self.spawn(&["executor-wasm", "--cache-dir", &cache], recovery_secs)
    }

    /// A native task running `script` in `sh -c`.
    fn command(&self, id: &str, script: &str) -> CommandLaunch {
        let executor_dir = self.dir.path().join("executors").join(id);
        std::fs::create_dir_all(&executor_dir).expect("executor dir");
        CommandLaunch {
            task_id: TaskId::new(id),
            command: CommandInfo { argv: vec![script.into()], shell: true, env: vec![] },
            resources: Resources::parse("cpus:0.1;mem:32MiB").expect("resources"),
            sandbox: self.sandbox(id),
            checkpoint: executor_dir.join("task.json"),
            kill_grace: Duration::from_secs(1),
            run_as: None,
        }
    }

    fn sandbox(&self, id: &str) -> PathBuf {
        self.dir.path().join("executors").join(id).join("run")
    }

    /// The state in a native task's checkpoint.
    fn checkpointed_state(&self, id: &str) -> Option<TaskState> {
        let path = self.dir.path().join("executors").join(id).join("task.json");
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        serde_json::from_value(json["state"].clone()).ok()
    }

    /// A Wasm task running `tests/fixtures/<fixture>.wat` of the Wasm executor.
    fn wasm(&self, id: &str, fixture: &str) -> WasmLaunch {
        let wat = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("executor-wasm/tests/fixtures")
            .join(format!("{fixture}.wat"));
        let bytes = wat::parse_file(&wat).expect("fixture");
        let module = self.dir.path().join(format!("{fixture}.wasm"));
        std::fs::write(&module, &bytes).expect("module");
        let sandbox = self.sandbox(id);
        std::fs::create_dir_all(&sandbox).expect("sandbox");
        WasmLaunch {
            task_id: TaskId::new(id),
            module_path: module,
            digest: agora_executor_wasm::Digest::of(&bytes).to_string(),
            args: vec![fixture.into()],
            env: vec![],
            stdout: sandbox.join("stdout"),
            stderr: sandbox.join("stderr"),
            sandbox,
            preopens: vec![],
            mem_bytes: 64 << 20,
            cpu_millis: 1000,
            fuel: None,
            timeout: None,
        }
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        for pid in &self.pids {
            // SAFETY: kill(2) of a task process group this test started (through the executor).
            unsafe { libc::kill(-*pid, libc::SIGKILL) };
        }
    }
}

impl Conn {
    async fn send(&mut self, m: AgentToExecutor) {
        self.writer.send(&m).await.expect("send to the executor");
    }

    async fn welcome(&mut self) {
        self.send(AgentToExecutor::Welcome {
            framework_id: FrameworkId::new("fw-1"),
            agent_id: None,
            executor_id: "ex-1".into(),
        })
        .await;
    }

    /// The resume of a reconnecting executor's `Hello`.
    fn resume(&self) -> &Resume {
        match &self.hello {
            ExecutorMessage::Hello { resume: Some(r), .. } => r,
            other => panic!("expected a resuming Hello, got {other:?}"),
        }
    }

    /// The next `n` updates.
    async fn updates(&mut self, n: usize) -> Vec<ExecutorUpdate> {
        let mut got = Vec::new();
        while got.len() < n {
            let frame = tokio::time::timeout(WAIT, self.reader.recv()).await;
            match frame.expect("updates in time").expect("a frame") {
                Some(ExecutorMessage::Updates(u)) => got.extend(u),
                other => panic!("expected updates, got {other:?} after {got:?}"),
            }
        }
        assert_eq!(got.len(), n, "more updates than expected: {got:?}");
        got
    }

    /// Reads to the end of the stream; returns the updates on the way.
    async fn until_closed(&mut self) -> Vec<ExecutorUpdate> {
        let mut got = Vec::new();
        loop {
            let frame = tokio::time::timeout(WAIT, self.reader.recv()).await.expect("the executor closes");
            match frame {
                Ok(Some(ExecutorMessage::Updates(u))) => got.extend(u),
                Ok(None) | Err(_) => return got,
                Ok(Some(other)) => panic!("unexpected {other:?}"),
            }
        }
    }
}

impl Executor {
    async fn exit(&mut self) -> std::process::ExitStatus {
        tokio::time::timeout(WAIT, self.child.wait()).await.expect("the executor exits").expect("wait")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Whether a process exists (and is not a zombie).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

fn seqs(updates: &[ExecutorUpdate]) -> Vec<u64> {
    updates.iter().map(|u| u.seq).collect()
}

fn running_pid(agent: &mut FakeAgent, u: &ExecutorUpdate) -> i32 {
    assert_eq!(u.state, TaskState::Running, "{u:?}");
    let pid = i32::try_from(u.pid.expect("RUNNING carries the pid")).expect("pid");
    agent.pids.push(pid);
    pid
}

/// (a) The agent goes away: the task's process stays; a new agent at the same path gets the
/// executor back within seconds, with the task in its `Resume` and RUNNING (never acknowledged)
/// sent again with its number; launches and shutdown work on the new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_executor_keeps_its_task_and_resends_what_was_not_acked() {
    let mut agent = FakeAgent::new();
    let mut executor = agent.command_executor(60);
    let mut conn = agent.welcomed().await;
    conn.send(AgentToExecutor::LaunchCommands(vec![agent.command("t", "sleep 120")])).await;
    let got = conn.updates(1).await;
    assert_eq!(seqs(&got), [1]);
    let pid = running_pid(&mut agent, &got[0]);

    drop(conn);
    agent.vanish();
    assert!(alive(pid), "the task outlives the connection");
    let gone = Instant::now();
    agent.come_back();
    let mut conn = agent.accept().await;
    assert!(gone.elapsed() < Duration::from_secs(10), "reconnected after {:?}", gone.elapsed());
    assert_eq!(conn.resume(), &Resume { tasks: vec![TaskId::new("t")], last_seq: 1 });
    conn.welcome().await;
    let again = conn.updates(1).await;
    assert_eq!(again, got, "RUNNING again, with its number and pid");
    assert!(alive(pid));

    conn.send(AgentToExecutor::LaunchCommands(vec![agent.command("u", "exit 0")])).await;
    let got = conn.updates(2).await;
    assert_eq!(seqs(&got), [2, 3]);
    assert_eq!((got[1].task_id.as_str(), got[1].state), ("u", TaskState::Finished));
    conn.send(AgentToExecutor::Shutdown).await;
    let last = conn.until_closed().await;
    assert_eq!(
        last.iter().map(|u| (u.seq, u.task_id.as_str(), u.state)).collect::<Vec<_>>(),
        [(4, "t", TaskState::Killed)]
    );
    assert!(executor.exit().await.success());
    assert!(!alive(pid));
}

/// (b) What the agent acknowledged is not sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_executor_does_not_resend_what_was_acked() {
    let mut agent = FakeAgent::new();
    let mut executor = agent.command_executor(60);
    let mut conn = agent.welcomed().await;
    conn.send(AgentToExecutor::LaunchCommands(vec![agent.command("t", "sleep 120")])).await;
    let got = conn.updates(1).await;
    let pid = running_pid(&mut agent, &got[0]);
    conn.send(AgentToExecutor::Acked { seq: 1 }).await;
    drop(conn);
    // The same agent, still listening: the executor comes back on its own.
    let mut conn = agent.accept().await;
    assert_eq!(conn.resume(), &Resume { tasks: vec![TaskId::new("t")], last_seq: 1 });
    conn.welcome().await;
    conn.send(AgentToExecutor::LaunchCommands(vec![agent.command("u", "exit 0")])).await;
    let got = conn.updates(2).await;
    assert_eq!(
        got.iter().map(|u| (u.seq, u.task_id.as_str(), u.state)).collect::<Vec<_>>(),
        [(2, "u", TaskState::Running), (3, "u", TaskState::Finished)],
        "the acknowledged RUNNING of t is not sent again"
    );
    assert!(alive(pid));
    conn.send(AgentToExecutor::Shutdown).await;
    conn.until_closed().await;
    assert!(executor.exit().await.success());
}

/// (c) A task that ends while the agent is away: its FAILED update, exit code 7, comes after
/// the reconnect with the next number, and the `Resume` no longer lists it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_task_ending_while_the_agent_is_away_is_reported_after_the_reconnect() {
    let mut agent = FakeAgent::new();
    let mut executor = agent.command_executor(60);
    let mut conn = agent.welcomed().await;
    let waiter = "while [ ! -e go ]; do sleep 0.05; done; exit 7";
    conn.send(AgentToExecutor::LaunchCommands(vec![
        agent.command("t", "sleep 120"),
        agent.command("x", waiter),
    ]))
    .await;
    let got = conn.updates(2).await;
    let pids: Vec<i32> = got.iter().map(|u| running_pid(&mut agent, u)).collect();
    let x_pid = pids[got.iter().position(|u| u.task_id.as_str() == "x").expect("x")];
    drop(conn);
    agent.vanish();
    std::fs::write(agent.sandbox("x").join("go"), b"").expect("go");
    wait_for("x to end", || {
        let state = agent.checkpointed_state("x");
        async move { state == Some(TaskState::Failed) && !alive(x_pid) }
    })
    .await;
    agent.come_back();
    let mut conn = agent.accept().await;
    assert_eq!(conn.resume(), &Resume { tasks: vec![TaskId::new("t")], last_seq: 3 });
    conn.welcome().await;
    let again = conn.updates(3).await;
    assert_eq!(seqs(&again), [1, 2, 3]);
    assert_eq!(again[..2], got[..]);
    let x = &again[2];
    assert_eq!((x.task_id.as_str(), x.state, x.exit_code), ("x", TaskState::Failed, Some(7)), "{x:?}");
    conn.send(AgentToExecutor::Shutdown).await;
    conn.until_closed().await;
    assert!(executor.exit().await.success());
}

/// (d) No agent within the recovery timeout: the executor kills its tasks and exits non-zero,
/// saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_executor_kills_its_tasks_after_the_recovery_timeout() {
    let mut agent = FakeAgent::new();
    let mut executor = agent.command_executor(2);
    let mut conn = agent.welcomed().await;
    // A task that forks: its whole process group goes.
    let script = "sleep 120 & echo $! > bg.pid; sleep 120";
    conn.send(AgentToExecutor::LaunchCommands(vec![agent.command("t", script)])).await;
    let got = conn.updates(1).await;
    let pid = running_pid(&mut agent, &got[0]);
    let bg_file = agent.sandbox("t").join("bg.pid");
    wait_for("the background pid", || {
        let ok = std::fs::read_to_string(&bg_file).is_ok_and(|s| s.trim().parse::<i32>().is_ok());
        async move { ok }
    })
    .await;
    let bg: i32 = std::fs::read_to_string(&bg_file).expect("bg.pid").trim().parse().expect("pid");
    drop(conn);
    agent.vanish();
    let gone = Instant::now();
    assert!(alive(pid));
    let status = executor.exit().await;
    assert!(gone.elapsed() >= Duration::from_millis(1900), "exited after {:?}", gone.elapsed());
    assert!(!status.success(), "{status:?}");
    assert!(!alive(pid) && !alive(bg), "no task process is left behind");
    let log = executor.log();
    assert!(log.contains("recovery timeout"), "{log}");
}

/// (e) The agent came back clean and does not know the executor: it refuses the resumed
/// handshake; the executor kills its tasks and exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_executor_refused_on_resume_kills_its_tasks() {
    let mut agent = FakeAgent::new();
    let mut executor = agent.command_executor(60);
    let mut conn = agent.welcomed().await;
    conn.send(AgentToExecutor::LaunchCommands(vec![agent.command("t", "sleep 120")])).await;
    let got = conn.updates(1).await;
    let pid = running_pid(&mut agent, &got[0]);
    drop(conn);
    let mut conn = agent.accept().await;
    assert_eq!(conn.resume().tasks, [TaskId::new("t")]);
    conn.send(AgentToExecutor::refused("unknown executor ex-1")).await;
    let status = executor.exit().await;
    assert!(!status.success(), "{status:?}");
    assert!(!alive(pid), "the task was killed");
    let log = executor.log();
    assert!(log.contains("unknown executor ex-1"), "{log}");
}

/// (a, c) The Wasm executor: its tasks keep executing while the agent is away; one that exits
/// meanwhile is reported after the reconnect, after the RUNNING updates sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasm_executor_keeps_its_tasks_and_reports_what_ended_meanwhile() {
    let mut agent = FakeAgent::new();
    let mut executor = agent.wasm_executor(60);
    let mut conn = agent.welcomed().await;
    conn.send(AgentToExecutor::Launch(vec![agent.wasm("s", "sleep"), agent.wasm("x", "sleep_exit7")])).await;
    let got = conn.updates(2).await;
    assert_eq!(seqs(&got), [1, 2]);
    assert!(got.iter().all(|u| u.state == TaskState::Running), "{got:?}");
    drop(conn);
    agent.vanish();
    // x sleeps 2 s, writes `done` and exits 7: while nobody listens.
    let out = agent.sandbox("x").join("stdout");
    wait_for("x to finish its sleep", || {
        let done = std::fs::read_to_string(&out).is_ok_and(|s| s == "done\n");
        async move { done }
    })
    .await;
    agent.come_back();
    let mut conn = agent.accept().await;
    assert_eq!(conn.resume(), &Resume { tasks: vec![TaskId::new("s")], last_seq: 3 });
    conn.welcome().await;
    let again = conn.updates(3).await;
    assert_eq!(again[..2], got[..], "the RUNNING updates again, with their numbers");
    let x = &again[2];
    assert_eq!(
        (x.seq, x.task_id.as_str(), x.state, x.exit_code),
        (3, "x", TaskState::Failed, Some(7)),
        "{x:?}"
    );

    // Acknowledged updates are not sent again; the executor carries on.
    conn.send(AgentToExecutor::Acked { seq: 3 }).await;
    conn.send(AgentToExecutor::Launch(vec![agent.wasm("h", "hello")])).await;
    let got = conn.updates(2).await;
    assert_eq!(
        got.iter().map(|u| (u.seq, u.task_id.as_str(), u.state)).collect::<Vec<_>>(),
        [(4, "h", TaskState::Running), (5, "h", TaskState::Finished)]
    );
    conn.send(AgentToExecutor::Shutdown).await;
    let last = conn.until_closed().await;
    assert_eq!(
        last.iter().map(|u| (u.seq, u.task_id.as_str(), u.state)).collect::<Vec<_>>(),
        [(6, "s", TaskState::Killed)]
    );
    assert!(executor.exit().await.success());
}

/// (d) The Wasm executor without its agent past the recovery timeout: tasks cancelled, exit
/// non-zero with a clear log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasm_executor_gives_up_after_the_recovery_timeout() {
    let mut agent = FakeAgent::new();
    let mut executor = agent.wasm_executor(2);
    let mut conn = agent.welcomed().await;
    conn.send(AgentToExecutor::Launch(vec![agent.wasm("s", "sleep")])).await;
    assert_eq!(conn.updates(1).await[0].state, TaskState::Running);
    drop(conn);
    agent.vanish();
    let gone = Instant::now();
    let status = executor.exit().await;
    assert!(gone.elapsed() >= Duration::from_millis(1900), "exited after {:?}", gone.elapsed());
    assert!(!status.success(), "{status:?}");
    let log = executor.log();
    assert!(log.contains("recovery timeout") && log.contains("cancelling every task"), "{log}");
}

/// A bad recovery timeout is refused at startup, naming what is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_recovery_timeout_is_refused_at_startup() {
    let agent = FakeAgent::new();
    let out = std::process::Command::new(AGORA)
        .args(["executor-command", "--executor-id", "ex-1", "--recovery-timeout", "15m", "--socket"])
        .arg(agent.socket())
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--recovery-timeout") && err.contains("whole number of seconds"), "{err}");
    let out = std::process::Command::new(AGORA)
        .args(["executor-command", "--executor-id", "ex-1", "--socket"])
        .arg(agent.socket())
        .env(agora_sdk::executor_proto::ENV_RECOVERY_TIMEOUT, "soon")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("AGORA_RECOVERY_TIMEOUT") && err.contains("whole number of seconds"), "{err}");
}
