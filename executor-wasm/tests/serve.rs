//! `serve()` against a fake agent: a Unix listener in a temporary directory that speaks the
//! agent's side of `agora_sdk::executor` (`cargo test -p agora-executor-wasm --test serve`).

// A test binary: helpers panic on setup failures like the tests do.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agora_executor_wasm::{serve_with_runtime, Digest, RuntimeConfig, ServeError, WasmRuntime};
use agora_sdk::executor_proto::{
    AgentToExecutor, ExecutorMessage, ExecutorUpdate, WasmLaunch, EXECUTOR_PROTOCOL_VERSION,
};
use agora_sdk::frame::{FrameReader, FrameWriter};
use agora_sdk::proto::{FrameworkId, TaskId, TaskState};
use tempfile::TempDir;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixListener;
use tokio::task::JoinHandle;

/// How long any one wait in these tests may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(60);

/// The bytes of `tests/fixtures/<name>.wat`.
fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(format!("{name}.wat"));
    wat::parse_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The agent's end of one executor connection, with the executor's `serve()` running in a task.
struct FakeAgent {
    dir: TempDir,
    rt: WasmRuntime,
    reader: FrameReader<OwnedReadHalf>,
    writer: FrameWriter<OwnedWriteHalf>,
    serve: JoinHandle<Result<(), ServeError>>,
    /// Every update received, per task, in order.
    updates: HashMap<TaskId, Vec<ExecutorUpdate>>,
    /// `Updates` frames received.
    frames: usize,
}

impl FakeAgent {
    /// Starts `serve()`, reads its Hello and welcomes it.
    async fn start() -> Self {
        let mut agent = Self::connect(|_| {}).await;
        agent
            .send(AgentToExecutor::Welcome {
                framework_id: FrameworkId("fw-1".into()),
                agent_id: None,
                executor_id: "agora-wasm".into(),
            })
            .await;
        agent
    }

    /// Starts `serve()` and reads its Hello, without answering it.
    async fn connect(tweak: impl FnOnce(&mut RuntimeConfig)) -> Self {
        Self::connect_with(tweak, PATIENCE).await
    }

    /// [`Self::connect`] with the executor's recovery timeout.
    async fn connect_with(tweak: impl FnOnce(&mut RuntimeConfig), recovery: Duration) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["cache", "modules", "sandboxes"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        let mut config = RuntimeConfig::new(dir.path().join("cache"));
        config.max_concurrent_tasks = 16;
        config.max_task_memory_bytes = 256 << 20;
        tweak(&mut config);
        let rt = WasmRuntime::new(config).unwrap();
        let socket = dir.path().join("executor.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let serve = tokio::spawn({
            let rt = rt.clone();
            async move { serve_with_runtime(rt, &socket, "ex-1", recovery).await }
        });
        let (stream, _) = tokio::time::timeout(PATIENCE, listener.accept()).await.unwrap().unwrap();
        let (read, write) = stream.into_split();
        let mut reader = FrameReader::new(read);
        let hello = reader.recv::<ExecutorMessage>().await.unwrap().unwrap();
        let ExecutorMessage::Hello { version, executor_id, pid, .. } = hello else { panic!("{hello:?}") };
        assert_eq!(version, EXECUTOR_PROTOCOL_VERSION);
        assert_eq!(executor_id, "ex-1");
        assert_eq!(pid, std::process::id());
        Self { dir, rt, reader, writer: FrameWriter::new(write), serve, updates: HashMap::new(), frames: 0 }
    }

    async fn send(&mut self, msg: AgentToExecutor) {
        self.writer.send(&msg).await.unwrap();
    }

    /// Writes fixture `name` where the agent's artifact cache would have it.
    fn module(&self, name: &str) -> (PathBuf, String) {
        let bytes = fixture(name);
        let path = self.dir.path().join("modules").join(format!("{name}.wasm"));
        if !path.exists() {
            std::fs::write(&path, &bytes).unwrap();
        }
        (path, Digest::of(&bytes).to_string())
    }

    fn sandbox(&self, task: &str) -> PathBuf {
        self.dir.path().join("sandboxes").join(task)
    }

    /// A launch of fixture `name` as task `task`, in a fresh sandbox.
    fn launch(&self, task: &str, name: &str) -> WasmLaunch {
        let (module_path, digest) = self.module(name);
        let sandbox = self.sandbox(task);
        std::fs::create_dir_all(&sandbox).unwrap();
        WasmLaunch {
            task_id: TaskId(task.into()),
            module_path,
            digest,
            args: vec![format!("{name}.wasm")],
            env: Vec::new(),
            stdout: sandbox.join("stdout"),
            stderr: sandbox.join("stderr"),
            sandbox,
            preopens: Vec::new(),
            mem_bytes: 64 << 20,
            cpu_millis: 1000,
            fuel: None,
            timeout: Some(Duration::from_secs(30)),
        }
    }

    fn output(&self, task: &str, file: &str) -> String {
        std::fs::read_to_string(self.sandbox(task).join(file)).unwrap_or_default()
    }

    /// Reads one frame of updates; `false` at the end of the stream.
    async fn recv(&mut self) -> bool {
        let msg = tokio::time::timeout(PATIENCE, self.reader.recv::<ExecutorMessage>())
            .await
            .expect("no update in time")
            .unwrap();
        match msg {
            Some(ExecutorMessage::Updates(updates)) => {
                assert!(!updates.is_empty(), "empty Updates frame");
                self.frames += 1;
                for update in updates {
                    self.updates.entry(update.task_id.clone()).or_default().push(update);
                }
                true
            }
            Some(other) => panic!("unexpected {other:?}"),
            None => false,
        }
    }

    fn states(&self, task: &str) -> Vec<TaskState> {
        self.updates
            .get(&TaskId(task.into()))
            .map(|u| u.iter().map(|u| u.state).collect())
            .unwrap_or_default()
    }

    fn last(&self, task: &str) -> &ExecutorUpdate {
        self.updates
            .get(&TaskId(task.into()))
            .and_then(|u| u.last())
            .unwrap_or_else(|| panic!("no update for {task}"))
    }

    fn has(&self, task: &str, state: TaskState) -> bool {
        self.states(task).contains(&state)
    }

    fn ended(&self, task: &str) -> bool {
        self.states(task).iter().any(|s| s.is_terminal())
    }

    /// Reads updates until every task in `tasks` has ended.
    async fn wait_ended(&mut self, tasks: &[String]) {
        while !tasks.iter().all(|t| self.ended(t)) {
            assert!(self.recv().await, "stream ended; have {:?}", self.updates);
        }
    }

    async fn wait_state(&mut self, task: &str, state: TaskState) {
        while !self.has(task, state) {
            assert!(self.recv().await, "stream ended; have {:?}", self.updates);
        }
    }

    /// Waits for `serve()` to return.
    async fn serve_result(&mut self) -> Result<(), ServeError> {
        tokio::time::timeout(PATIENCE, &mut self.serve).await.expect("serve() did not return").unwrap()
    }
}

trait Terminal {
    fn is_terminal(&self) -> bool;
}

impl Terminal for TaskState {
    fn is_terminal(&self) -> bool {
        matches!(self, TaskState::Finished | TaskState::Failed | TaskState::Killed)
    }
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_world_writes_its_output_and_finishes() {
    let mut agent = FakeAgent::start().await;
    let launch = agent.launch("hello", "hello");
    agent.send(AgentToExecutor::Launch(vec![launch])).await;
    agent.wait_ended(&["hello".into()]).await;

    assert_eq!(agent.states("hello"), [TaskState::Running, TaskState::Finished]);
    let running = &agent.updates[&TaskId("hello".into())][0];
    assert_eq!(running.reason, "task started");
    assert_eq!((running.exit_code, &running.usage), (None, &None));
    let done = agent.last("hello");
    assert_eq!(done.reason, "module exited");
    assert_eq!(done.exit_code, Some(0));
    assert!(done.message.starts_with("exited with code 0 after "), "{done:?}");
    let usage = done.usage.clone().unwrap();
    assert!(usage.fuel.unwrap() > 0, "{usage:?}");
    assert_eq!(usage.peak_mem, Some(64 << 10));
    assert_eq!(agent.output("hello", "stdout").as_bytes(), b"hello from wasm\n");
    assert_eq!(agent.output("hello", "stderr").as_bytes(), b"a warning\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_zero_exit_fails_with_its_code() {
    let mut agent = FakeAgent::start().await;
    let launch = agent.launch("exit3", "exit3");
    agent.send(AgentToExecutor::Launch(vec![launch])).await;
    agent.wait_ended(&["exit3".into()]).await;
    assert_eq!(agent.states("exit3"), [TaskState::Running, TaskState::Failed]);
    let done = agent.last("exit3");
    assert_eq!((done.reason.as_str(), done.exit_code), ("module exited", Some(3)), "{done:?}");
    assert_eq!(agent.output("exit3", "stdout"), "about to fail\n");
}

/// One batch with a spinner (timeout), a memory bomb, a trap, a task with a fuel budget and
/// well-behaved echo tasks: the good ones finish with their own output, the bad ones fail with
/// their reasons.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_batch_fails_only_the_bad_tasks() {
    let mut agent = FakeAgent::start().await;
    let mut batch = Vec::new();
    let mut spinner = agent.launch("spinner", "loop");
    spinner.timeout = Some(Duration::from_secs(1));
    batch.push(spinner);
    let mut bomb = agent.launch("bomb", "membomb");
    bomb.mem_bytes = 16 << 20;
    batch.push(bomb);
    batch.push(agent.launch("trap", "unreachable"));
    let mut hungry = agent.launch("hungry", "loop");
    hungry.fuel = Some(5_000_000);
    batch.push(hungry);
    let echoes = ids("echo", 6);
    for (i, id) in echoes.iter().enumerate() {
        let mut echo = agent.launch(id, "echo");
        echo.args = vec!["echo".into(), format!("task {i}")];
        echo.env = vec![("N".into(), i.to_string())];
        batch.push(echo);
    }
    agent.send(AgentToExecutor::Launch(batch)).await;
    let mut all: Vec<String> = ["spinner", "bomb", "trap", "hungry"].map(String::from).to_vec();
    all.extend(echoes.iter().cloned());
    agent.wait_ended(&all).await;

    for (i, id) in echoes.iter().enumerate() {
        assert_eq!(agent.states(id), [TaskState::Running, TaskState::Finished], "{:?}", agent.updates);
        assert_eq!(agent.output(id, "stdout"), format!("echo\ntask {i}\nN={i}\n"));
    }
    for (task, reason) in [
        ("spinner", "timeout"),
        ("bomb", "memory limit exceeded"),
        ("trap", "trap"),
        ("hungry", "fuel exhausted"),
    ] {
        assert_eq!(agent.states(task), [TaskState::Running, TaskState::Failed], "{task}");
        let done = agent.last(task);
        assert_eq!(done.reason, reason, "{done:?}");
        assert_eq!(done.exit_code, None);
        // Fuel is reported, or unknown: never a stale 0 (wasmtime does not write the count back
        // before a refused `memory.grow` traps).
        assert_ne!(done.usage.as_ref().unwrap().fuel, Some(0), "{done:?}");
        if task != "bomb" {
            assert!(done.usage.as_ref().unwrap().fuel.is_some(), "{done:?}");
        }
    }
    for task in ["spinner", "hungry"] {
        assert!(agent.last(task).usage.as_ref().unwrap().fuel.unwrap() > 1_000_000, "{task}");
    }
    assert!(agent.last("trap").message.contains("unreachable"), "{:?}", agent.last("trap"));
    let bomb = agent.last("bomb");
    assert!(bomb.usage.as_ref().unwrap().peak_mem.unwrap() <= 16 << 20, "{bomb:?}");
}

/// Many launches of one new module in one batch: it is compiled once, every task finishes, and
/// the updates come batched (far fewer frames than updates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_one_module_compiles_it_once() {
    let mut agent = FakeAgent::start().await;
    let tasks = ids("n", 200);
    let batch = tasks.iter().map(|id| agent.launch(id, "noop")).collect();
    let started = Instant::now();
    agent.send(AgentToExecutor::Launch(batch)).await;
    agent.wait_ended(&tasks).await;
    let elapsed = started.elapsed();
    for id in &tasks {
        assert_eq!(agent.states(id), [TaskState::Running, TaskState::Finished], "{id}");
    }
    let stats = agent.rt.cache_stats();
    assert_eq!((stats.compiles, stats.disk_hits), (1, 0), "{stats:?}");
    assert!(agent.frames < 400, "{} frames for 400 updates", agent.frames);
    eprintln!("200 noop launches: {elapsed:?}, {} update frames, {stats:?}", agent.frames);
}

/// For measurements: `cargo test --release -p agora-executor-wasm --test serve -- --ignored
/// --nocapture thousand`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement"]
async fn thousand_noop_launches() {
    let mut agent = FakeAgent::connect(|c| c.max_concurrent_tasks = 128).await;
    agent
        .send(AgentToExecutor::Welcome {
            framework_id: FrameworkId("fw-1".into()),
            agent_id: None,
            executor_id: "agora-wasm".into(),
        })
        .await;
    for round in 0..3 {
        let tasks = ids(&format!("r{round}-"), 1000);
        let batch = tasks.iter().map(|id| agent.launch(id, "noop")).collect();
        let started = Instant::now();
        agent.send(AgentToExecutor::Launch(batch)).await;
        agent.wait_ended(&tasks).await;
        let elapsed = started.elapsed();
        assert!(tasks.iter().all(|t| agent.last(t).state == TaskState::Finished));
        eprintln!(
            "round {round}: 1000 noop launches in {elapsed:?} ({:?}/task), {} frames so far, {:?}",
            elapsed / 1000,
            agent.frames,
            agent.rt.cache_stats()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_ends_a_running_task() {
    let mut agent = FakeAgent::start().await;
    let mut spinner = agent.launch("spinner", "loop");
    spinner.timeout = None;
    agent.send(AgentToExecutor::Launch(vec![spinner])).await;
    agent.wait_state("spinner", TaskState::Running).await;
    // Unknown ids are ignored.
    agent.send(AgentToExecutor::Kill { task_id: TaskId("nobody".into()) }).await;
    let asked = Instant::now();
    agent.send(AgentToExecutor::Kill { task_id: TaskId("spinner".into()) }).await;
    agent.wait_ended(&["spinner".into()]).await;
    assert!(asked.elapsed() < Duration::from_secs(5), "kill took {:?}", asked.elapsed());
    assert_eq!(agent.states("spinner"), [TaskState::Running, TaskState::Killed]);
    assert_eq!(agent.last("spinner").reason, "killed");
    assert!(!agent.updates.contains_key(&TaskId("nobody".into())));
    // A kill of a task that ended is ignored too; the executor keeps serving.
    agent.send(AgentToExecutor::Kill { task_id: TaskId("spinner".into()) }).await;
    let hello = agent.launch("hello", "hello");
    agent.send(AgentToExecutor::Launch(vec![hello])).await;
    agent.wait_ended(&["hello".into()]).await;
    assert_eq!(agent.states("spinner").len(), 2);
    assert_eq!(agent.last("hello").state, TaskState::Finished);
}

/// Tasks that cannot start fail with `launch failed` and no RUNNING; the executor keeps
/// serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_that_cannot_start_fail_without_running() {
    let mut agent = FakeAgent::start().await;
    let mut missing = agent.launch("missing", "hello");
    missing.module_path = agent.dir.path().join("modules/nope.wasm");
    missing.digest = Digest::of(b"nope").to_string();
    let mut garbage = agent.launch("garbage", "hello");
    garbage.module_path = agent.dir.path().join("modules/garbage.wasm");
    std::fs::write(&garbage.module_path, b"not wasm at all").unwrap();
    garbage.digest = Digest::of(b"not wasm at all").to_string();
    let mut mismatch = agent.launch("mismatch", "hello");
    mismatch.digest = Digest::of(b"something else").to_string();
    let mut bad_digest = agent.launch("bad-digest", "hello");
    bad_digest.digest = "xyz".into();
    let mut too_big = agent.launch("too-big", "hello");
    too_big.mem_bytes = 1 << 30;
    let mut no_sandbox = agent.launch("no-sandbox", "hello");
    no_sandbox.sandbox = agent.dir.path().join("absent");
    let mut too_small = agent.launch("too-small", "echo"); // echo's memory is 128 KiB
    too_small.mem_bytes = 64 << 10;
    // No sandbox yet is fine: the outputs create it on the first byte.
    let failing = ["missing", "garbage", "mismatch", "bad-digest", "too-big"];
    let mut batch = vec![missing, garbage, mismatch, bad_digest, too_big, no_sandbox, too_small];
    batch.push(agent.launch("ok", "hello"));
    agent.send(AgentToExecutor::Launch(batch)).await;
    let mut all: Vec<String> = failing.map(String::from).to_vec();
    all.extend(["too-small".into(), "ok".into(), "no-sandbox".into()]);
    agent.wait_ended(&all).await;

    for task in failing {
        assert_eq!(agent.states(task), [TaskState::Failed], "{task}: {:?}", agent.updates);
        let done = agent.last(task);
        assert_eq!(done.reason, "launch failed", "{done:?}");
        assert_eq!((done.exit_code, &done.usage), (None, &None));
    }
    assert!(agent.last("missing").message.contains("nope.wasm"), "{:?}", agent.last("missing"));
    assert!(agent.last("garbage").message.contains("not a WebAssembly"), "{:?}", agent.last("garbage"));
    assert!(agent.last("mismatch").message.contains("sha256"), "{:?}", agent.last("mismatch"));
    assert!(agent.last("too-big").message.contains("exceeds"), "{:?}", agent.last("too-big"));
    // Refused at instantiation: never RUNNING, failed for its memory.
    assert_eq!(agent.states("too-small"), [TaskState::Failed]);
    assert_eq!(agent.last("too-small").reason, "memory limit exceeded");
    assert_eq!(agent.states("ok"), [TaskState::Running, TaskState::Finished]);
    assert_eq!(agent.states("no-sandbox"), [TaskState::Running, TaskState::Finished]);

    // Still serving; the file appearing later is picked up (failed loads are not cached).
    let mut later = agent.launch("later", "hello");
    later.module_path = agent.dir.path().join("modules/later.wasm");
    std::fs::copy(agent.dir.path().join("modules/hello.wasm"), &later.module_path).unwrap();
    agent.send(AgentToExecutor::Launch(vec![later])).await;
    agent.wait_ended(&["later".into()]).await;
    assert_eq!(agent.last("later").state, TaskState::Finished);
}

/// A second launch of a running task id is ignored; a relaunch of a finished id is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_ids_are_unique() {
    let mut agent = FakeAgent::start().await;
    let mut spinner = agent.launch("spinner", "loop");
    spinner.timeout = None;
    agent.send(AgentToExecutor::Launch(vec![spinner.clone()])).await;
    agent.wait_state("spinner", TaskState::Running).await;
    agent.send(AgentToExecutor::Launch(vec![spinner.clone()])).await;
    agent.send(AgentToExecutor::Kill { task_id: TaskId("spinner".into()) }).await;
    agent.wait_ended(&["spinner".into()]).await;
    assert_eq!(agent.states("spinner"), [TaskState::Running, TaskState::Killed]);
    agent.send(AgentToExecutor::Launch(vec![spinner])).await;
    while agent.states("spinner").len() < 3 {
        assert!(agent.recv().await);
    }
    let refused = agent.last("spinner");
    assert_eq!((refused.state, refused.reason.as_str()), (TaskState::Failed, "launch failed"));
    assert!(refused.message.contains("already used"), "{refused:?}");
}

/// More tasks than slots: the rest wait (not RUNNING yet, not failed) until a slot frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_beyond_the_slots_wait_for_one() {
    let mut agent = FakeAgent::connect(|c| c.max_concurrent_tasks = 2).await;
    agent
        .send(AgentToExecutor::Welcome {
            framework_id: FrameworkId("fw-1".into()),
            agent_id: None,
            executor_id: "agora-wasm".into(),
        })
        .await;
    let tasks = ids("spin", 3);
    let batch = spinners(&agent, &tasks);
    agent.send(AgentToExecutor::Launch(batch)).await;
    while tasks.iter().filter(|t| agent.has(t, TaskState::Running)).count() < 2 {
        assert!(agent.recv().await);
    }
    // The third waits for a slot: nothing more arrives meanwhile.
    let more = tokio::time::timeout(Duration::from_millis(500), agent.reader.recv::<ExecutorMessage>()).await;
    assert!(more.is_err(), "{more:?}");
    let waiting = tasks.iter().find(|t| agent.states(t).is_empty()).unwrap().clone();
    let first = tasks.iter().find(|t| **t != waiting).unwrap().clone();
    agent.send(AgentToExecutor::Kill { task_id: TaskId(first.clone()) }).await;
    agent.wait_state(&waiting, TaskState::Running).await;
    for id in &tasks {
        agent.send(AgentToExecutor::Kill { task_id: TaskId(id.clone()) }).await;
    }
    agent.wait_ended(&tasks).await;
    for id in &tasks {
        assert_eq!(agent.states(id), [TaskState::Running, TaskState::Killed], "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_kills_the_tasks_and_returns() {
    let mut agent = FakeAgent::start().await;
    let tasks = ids("spin", 3);
    let batch = spinners(&agent, &tasks);
    agent.send(AgentToExecutor::Launch(batch)).await;
    for id in &tasks {
        agent.wait_state(id, TaskState::Running).await;
    }
    agent.send(AgentToExecutor::Shutdown).await;
    agent.serve_result().await.unwrap();
    // The KILLED updates were sent before the executor closed the socket.
    while agent.recv().await {}
    for id in &tasks {
        assert_eq!(agent.states(id), [TaskState::Running, TaskState::Killed], "{id}");
        assert_eq!(agent.last(id).message, "executor shut down");
    }
}

/// The agent closing the socket does not end the tasks at once: `serve()` waits for it to come
/// back, and only after the recovery timeout cancels them and fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_does_not_come_back_ends_serve_after_the_recovery_timeout() {
    let mut agent = FakeAgent::connect_with(|_| {}, Duration::from_secs(1)).await;
    agent
        .send(AgentToExecutor::Welcome {
            framework_id: FrameworkId("fw-1".into()),
            agent_id: None,
            executor_id: "agora-wasm".into(),
        })
        .await;
    let mut spinner = agent.launch("spinner", "loop");
    spinner.timeout = None;
    agent.send(AgentToExecutor::Launch(vec![spinner])).await;
    agent.wait_state("spinner", TaskState::Running).await;
    let FakeAgent { reader, writer, mut serve, rt: _rt, dir: _dir, .. } = agent;
    let lost = Instant::now();
    drop((reader, writer));
    let result = tokio::time::timeout(PATIENCE, &mut serve).await.expect("serve() did not return").unwrap();
    assert!(lost.elapsed() >= Duration::from_millis(900), "{:?}", lost.elapsed());
    let error = result.unwrap_err();
    assert!(matches!(error, ServeError::Recovery(_)), "{error:?}");
    assert!(error.to_string().contains("recovery timeout"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_executor_stops_with_an_error() {
    let mut agent = FakeAgent::connect(|_| {}).await;
    agent.send(AgentToExecutor::refused("no such executor")).await;
    let error = agent.serve_result().await.unwrap_err();
    assert!(matches!(error, ServeError::Refused(_)), "{error:?}");
    assert!(error.to_string().contains("no such executor"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_frame_stops_serve_with_an_error() {
    let mut agent = FakeAgent::start().await;
    let mut spinner = agent.launch("spinner", "loop");
    spinner.timeout = None;
    agent.send(AgentToExecutor::Launch(vec![spinner])).await;
    agent.wait_state("spinner", TaskState::Running).await;
    agent.writer.get_mut().write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await.unwrap();
    let error = agent.serve_result().await.unwrap_err();
    assert!(matches!(error, ServeError::Malformed(_)), "{error:?}");
    while agent.recv().await {}
    assert_eq!(agent.states("spinner"), [TaskState::Running, TaskState::Killed]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preopens_are_read_write() {
    let mut agent = FakeAgent::start().await;
    let mut launch = agent.launch("files", "files");
    let data = launch.sandbox.join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("in.txt"), "input from the host\n").unwrap();
    launch.preopens = vec![(data.clone(), "/data".into())];
    agent.send(AgentToExecutor::Launch(vec![launch])).await;
    agent.wait_ended(&["files".into()]).await;
    assert_eq!(agent.last("files").state, TaskState::Finished, "{:?}", agent.last("files"));
    assert_eq!(agent.output("files", "stdout"), "input from the host\n");
    assert_eq!(std::fs::read_to_string(data.join("out.txt")).unwrap(), "written by wasm\n");
}

/// Launches of `loop` (spins forever) without a timeout: they end only when killed.
fn spinners(agent: &FakeAgent, tasks: &[String]) -> Vec<WasmLaunch> {
    tasks
        .iter()
        .map(|id| {
            let mut l = agent.launch(id, "loop");
            l.timeout = None;
            l
        })
        .collect()
}
