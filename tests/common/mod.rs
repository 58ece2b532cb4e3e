//! A real cluster in the test process: the QUIC master and agents on loopback, real processes.

#![allow(dead_code)]

pub mod dev;
pub mod etcd;
pub mod ha;
pub mod proxy;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use agora_master::core::MasterConfig;
use agora_master::server::{self, MasterHandle, ServerConfig};
use agora_sdk::proto::*;
use agora_sdk::scheduler::{self, Driver, DriverConfig, Scheduler};
use agora_sdk::tls::TlsFiles;
use agora_sdk::{Attributes, Resources};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub master: MasterHandle,
    pub shutdown: CancellationToken,
    pub agents: Vec<(CancellationToken, JoinHandle<()>)>,
}

pub fn fast_master() -> MasterConfig {
    MasterConfig {
        master_id: "t".into(),
        allocation_interval: Duration::from_millis(100),
        agent_heartbeat_interval: Duration::from_millis(200),
        agent_timeout: Duration::from_secs(1),
        framework_heartbeat_interval: Duration::from_secs(1),
        framework_timeout: Some(Duration::from_secs(3)),
        ..MasterConfig::default()
    }
}

impl TestCluster {
    pub async fn start(agents: usize, resources: &str) -> TestCluster {
        Self::start_with(agents, resources, fast_master()).await
    }

    pub async fn start_with(agents: usize, resources: &str, core: MasterConfig) -> TestCluster {
        if let Ok(f) = std::env::var("AGORA_LOG") {
            let _ = tracing_subscriber::fmt().with_env_filter(f).with_test_writer().try_init();
        }
        let dir = tempfile::tempdir().expect("tempdir");
        agora_sdk::tls::init(&dir.path().join("tls"), "tester", false).expect("tls init");
        let shutdown = CancellationToken::new();
        let master = server::spawn(
            ServerConfig {
                listen: ([127, 0, 0, 1], 0).into(),
                tls: TlsFiles::in_dir(&dir.path().join("tls"), "master"),
                core,
                allocator: "drf".into(),
                work_dir: dir.path().join("master"),
                max_artifact_size: agora_master::artifacts::DEFAULT_MAX_ARTIFACT_SIZE,
                eviction: agora_master::artifacts::EvictionConfig::default(),
                limits: Default::default(),
            },
            shutdown.clone(),
        )
        .expect("master");
        let mut c = TestCluster { dir, master, shutdown, agents: Vec::new() };
        for i in 0..agents {
            c.add_agent(i, resources);
        }
        c.wait_agents(agents).await;
        c
    }

    pub fn tls(&self, stem: &str) -> TlsFiles {
        TlsFiles::in_dir(&self.dir.path().join("tls"), stem)
    }

    pub fn add_agent(&mut self, i: usize, resources: &str) {
        self.add_agent_with(i, resources, executors_config());
    }

    pub fn add_agent_with(
        &mut self,
        i: usize,
        resources: &str,
        wasm: agora_agent::executors::ExecutorsConfig,
    ) {
        self.add_agent_full(i, resources, Attributes::default(), wasm);
    }

    /// An agent with attributes, e.g. `rack:r1;blocks:{b1,b2}`.
    pub fn add_agent_attributed(&mut self, i: usize, resources: &str, attributes: &str) {
        let attributes = Attributes::parse(attributes).expect("attributes");
        self.add_agent_full(i, resources, attributes, executors_config());
    }

    fn add_agent_full(
        &mut self,
        i: usize,
        resources: &str,
        attributes: Attributes,
        wasm: agora_agent::executors::ExecutorsConfig,
    ) {
        self.add_agent_configured(i, resources, attributes, wasm, true);
    }

    /// An agent configured as `agora agent` is: its tasks are not killed when it stops.
    pub fn add_production_agent(&mut self, i: usize, resources: &str) {
        self.add_agent_configured(i, resources, Attributes::default(), executors_config(), false);
    }

    fn add_agent_configured(
        &mut self,
        i: usize,
        resources: &str,
        attributes: Attributes,
        wasm: agora_agent::executors::ExecutorsConfig,
        kill_tasks_on_shutdown: bool,
    ) {
        let token = CancellationToken::new();
        let config = agora_agent::AgentConfig {
            master: self.master.addr.to_string(),
            tls: self.tls("agent"),
            work_dir: self.agent_dir(i),
            resources: Some(Resources::parse(resources).expect("resources")),
            attributes,
            hostname: format!("agent-{i}"),
            kill_grace: Duration::from_millis(500),
            kill_tasks_on_shutdown,
            isolation: agora_agent::cgroups::IsolationConfig::default(),
            executors: wasm,
            task_user: agora_agent::user::DEFAULT_TASK_USER.into(),
            recovery: agora_agent::RecoveryConfig::default(),
            gc: agora_agent::gc::GcConfig::default(),
            disk: agora_agent::disk::DiskConfig::default(),
        };
        let t = token.clone();
        let h = tokio::spawn(async move {
            // An agent that cannot start fails its test by never registering; say why.
            if let Err(e) = agora_agent::run(config, t).await {
                let _ = std::io::Write::write_all(
                    &mut std::io::stderr(),
                    format!("agent-{i} stopped: {e}\n").as_bytes(),
                );
            }
        });
        self.agents.push((token, h));
    }

    /// An agent on a runtime of its own, so that the test can make it vanish at once: no
    /// goodbye, no heartbeats, like a machine losing power.
    pub fn add_vanishing_agent(&self, name: &str, resources: &str) -> VanishingAgent {
        let config = agora_agent::AgentConfig {
            master: self.master.addr.to_string(),
            tls: self.tls("agent"),
            work_dir: self.dir.path().join(name),
            resources: Some(Resources::parse(resources).expect("resources")),
            attributes: Attributes::default(),
            hostname: name.to_string(),
            kill_grace: Duration::from_millis(500),
            kill_tasks_on_shutdown: false,
            isolation: agora_agent::cgroups::IsolationConfig::default(),
            executors: executors_config(),
            task_user: agora_agent::user::DEFAULT_TASK_USER.into(),
            recovery: agora_agent::RecoveryConfig::default(),
            gc: agora_agent::gc::GcConfig::default(),
            disk: agora_agent::disk::DiskConfig::default(),
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        rt.spawn(async move {
            let _ = agora_agent::run(config, CancellationToken::new()).await;
        });
        VanishingAgent { rt }
    }

    pub fn agent_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("agent-{i}"))
    }

    pub async fn wait_agents(&self, n: usize) {
        wait_for("agents to register", || async {
            self.master
                .agents()
                .await
                .iter()
                .filter(|a| a.status == agora_sdk::AgentViewStatus::Active)
                .count()
                >= n
        })
        .await;
    }

    pub fn framework(&self, name: &str) -> DriverConfig {
        let mut cfg = DriverConfig::new(self.master.addr.to_string(), self.tls("framework"), name);
        cfg.framework.failover_timeout = Duration::from_secs(5);
        cfg
    }

    pub async fn task_state(&self, id: &str) -> Option<TaskState> {
        self.master.tasks().await.into_iter().find(|t| t.id.as_str() == id).map(|t| t.state)
    }

    /// Waits (20 s) until the master lists framework `id` with `status`; `what` names the wait.
    pub async fn wait_framework_status(
        &self,
        what: &str,
        id: &FrameworkId,
        status: agora_sdk::FrameworkViewStatus,
    ) {
        wait_for(what, || async {
            self.master.frameworks().await.iter().any(|f| f.id == *id && f.status == status)
        })
        .await;
    }

    pub async fn stop(self) {
        for (t, h) in self.agents {
            t.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
        }
        self.shutdown.cancel();
    }
}

pub struct VanishingAgent {
    rt: tokio::runtime::Runtime,
}

impl VanishingAgent {
    pub fn vanish(self) {
        self.rt.shutdown_background();
    }
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether a root-only test (or root-only part of a test) can run: true as root. Otherwise
/// writes `skipped: <test> needs root (<why>)` to stderr and returns false, or fails the test
/// under `AGORA_REQUIRE_ROOT_TESTS=1` (CI), where nothing that needs root may skip. As root,
/// the caller must then fail when the facility cannot be set up, never skip.
/// (agent/tests/cgroups.rs has a copy: another crate's tests.)
pub fn root_or_skip(why: &str) -> bool {
    if is_root() {
        return true;
    }
    let test = std::thread::current().name().unwrap_or("this test").to_string();
    assert!(
        std::env::var("AGORA_REQUIRE_ROOT_TESTS").as_deref() != Ok("1"),
        "{test} needs root ({why}), and AGORA_REQUIRE_ROOT_TESTS=1 forbids skipping it"
    );
    // Straight to the process's stderr: `eprintln!` is captured (and hidden) like `println!`.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("skipped: {test} needs root ({why})\n").as_bytes(),
    );
    count_skip();
    false
}

/// Root-only tests this test binary skipped; counted on one line when it exits.
static SKIPPED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

extern "C" fn report_skips() {
    let n = SKIPPED.load(std::sync::atomic::Ordering::Relaxed);
    let binary =
        std::env::current_exe().ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!(
            "{n} root-only test(s) of {} skipped: not root (as root they run, and AGORA_REQUIRE_ROOT_TESTS=1 forbids skipping)\n",
            binary.unwrap_or_default()
        )
        .as_bytes(),
    );
}

/// Counts a skip; the first one arranges the count line at exit.
fn count_skip() {
    if SKIPPED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0 {
        // SAFETY: registers a plain extern "C" function with no captured state.
        unsafe { libc::atexit(report_skips) };
    }
}

/// Polls `f` until true, failing the test after 20 s.
pub async fn wait_for<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a [`Probe`] scheduler saw.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // test plumbing; moved once through a channel
pub enum Seen {
    Registered(FrameworkId),
    /// The driver lost the master.
    Disconnected,
    /// The driver subscribed again, with this id.
    Reregistered(FrameworkId),
    Offers(Vec<Offer>),
    Rescinded(OfferId),
    Update(TaskStatus),
    Error(WireError),
    Message {
        agent_id: AgentId,
        executor_id: ExecutorId,
        data: Vec<u8>,
    },
    ExecutorExited {
        agent_id: AgentId,
        executor_id: ExecutorId,
        message: String,
    },
    AgentDraining {
        agent_id: AgentId,
        deadline_unix_ms: Option<u64>,
    },
    AgentUndrained(AgentId),
}

/// A scheduler that reports everything to the test, which drives it through the `Driver`.
pub struct Probe {
    tx: mpsc::UnboundedSender<(Driver, Seen)>,
}

impl Probe {
    /// A probe reporting to `tx` (for a framework a test runs itself).
    pub fn new(tx: mpsc::UnboundedSender<(Driver, Seen)>) -> Probe {
        Probe { tx }
    }
}

impl Scheduler for Probe {
    async fn registered(&mut self, d: &Driver, id: &FrameworkId) {
        let _ = self.tx.send((d.clone(), Seen::Registered(id.clone())));
    }
    async fn disconnected(&mut self, d: &Driver) {
        let _ = self.tx.send((d.clone(), Seen::Disconnected));
    }
    async fn reregistered(&mut self, d: &Driver, id: &FrameworkId) {
        let _ = self.tx.send((d.clone(), Seen::Reregistered(id.clone())));
    }
    async fn resource_offers(&mut self, d: &Driver, offers: Vec<Offer>) {
        let _ = self.tx.send((d.clone(), Seen::Offers(offers)));
    }
    async fn offer_rescinded(&mut self, d: &Driver, id: &OfferId) {
        let _ = self.tx.send((d.clone(), Seen::Rescinded(id.clone())));
    }
    async fn status_update(&mut self, d: &Driver, st: &TaskStatus) {
        let _ = self.tx.send((d.clone(), Seen::Update(st.clone())));
    }
    async fn error(&mut self, d: &Driver, e: &WireError) {
        let _ = self.tx.send((d.clone(), Seen::Error(e.clone())));
    }
    async fn framework_message(&mut self, d: &Driver, agent: &AgentId, executor: &ExecutorId, data: &[u8]) {
        let seen =
            Seen::Message { agent_id: agent.clone(), executor_id: executor.clone(), data: data.to_vec() };
        let _ = self.tx.send((d.clone(), seen));
    }
    async fn executor_exited(&mut self, d: &Driver, agent: &AgentId, executor: &ExecutorId, message: &str) {
        let seen = Seen::ExecutorExited {
            agent_id: agent.clone(),
            executor_id: executor.clone(),
            message: message.into(),
        };
        let _ = self.tx.send((d.clone(), seen));
    }
    async fn agent_draining(&mut self, d: &Driver, agent: &AgentId, deadline_unix_ms: Option<u64>) {
        let _ = self.tx.send((d.clone(), Seen::AgentDraining { agent_id: agent.clone(), deadline_unix_ms }));
    }
    async fn agent_undrained(&mut self, d: &Driver, agent: &AgentId) {
        let _ = self.tx.send((d.clone(), Seen::AgentUndrained(agent.clone())));
    }
}

/// A framework under test control.
pub struct ProbeFramework {
    pub rx: mpsc::UnboundedReceiver<(Driver, Seen)>,
    pub driver: Option<Driver>,
    pub id: Option<FrameworkId>,
    /// Every offer seen and not yet used, declined or rescinded.
    pub held: Vec<Offer>,
    pub run: JoinHandle<Result<(), agora_sdk::client::ClientError>>,
}

impl ProbeFramework {
    pub async fn start(cfg: DriverConfig) -> ProbeFramework {
        let (tx, rx) = mpsc::unbounded_channel();
        let run = tokio::spawn(async move { scheduler::run(cfg, &mut Probe { tx }).await });
        let mut p = ProbeFramework { rx, driver: None, id: None, held: Vec::new(), run };
        match p.next().await {
            Seen::Registered(id) => p.id = Some(id),
            other => panic!("expected Registered, got {other:?}"),
        }
        p
    }

    pub fn driver(&self) -> &Driver {
        self.driver.as_ref().expect("driver")
    }

    pub async fn next(&mut self) -> Seen {
        let (d, s) = tokio::time::timeout(Duration::from_secs(20), self.rx.recv())
            .await
            .expect("timed out waiting for a scheduler event")
            .expect("scheduler stopped");
        self.driver = Some(d);
        match &s {
            Seen::Offers(o) => self.held.extend(o.iter().cloned()),
            Seen::Rescinded(id) => self.held.retain(|o| &o.id != id),
            _ => {}
        }
        s
    }

    /// Declines every offer held so far.
    pub fn decline_held(&mut self, refuse_seconds: f64) {
        let ids: Vec<OfferId> = self.held.drain(..).map(|o| o.id).collect();
        if !ids.is_empty() {
            self.driver().decline(ids, Some(refuse_seconds));
        }
    }

    /// Skips events until `f` picks one (20 s limit).
    pub async fn until<T>(&mut self, mut f: impl FnMut(&Seen) -> Option<T>) -> T {
        loop {
            let s = self.next().await;
            if let Some(t) = f(&s) {
                return t;
            }
        }
    }

    pub async fn offer(&mut self) -> Offer {
        self.until(|s| match s {
            Seen::Offers(o) => o.first().cloned(),
            _ => None,
        })
        .await
    }

    pub async fn update_for(&mut self, task: &str, state: TaskState) -> TaskStatus {
        self.until(|s| match s {
            Seen::Update(u) if u.task_id.as_str() == task && u.state == state => Some(u.clone()),
            Seen::Update(u) if u.task_id.as_str() == task && u.state.is_terminal() => {
                panic!(
                    "task {task} ended {} ({}: {}) while waiting for {state}",
                    u.state, u.reason, u.message
                )
            }
            _ => None,
        })
        .await
    }
}

pub fn sh_task(id: &str, script: &str, resources: &str) -> TaskInfo {
    TaskInfo {
        task_id: TaskId(id.into()),
        name: id.into(),
        resources: Resources::parse(resources).expect("resources"),
        kind: TaskKind::Command(CommandInfo { argv: vec![script.into()], shell: true, env: vec![] }),
        kill_grace: Some(Duration::from_millis(500)),
        user: None,
    }
}

/// Wasm executors are the built `agora` binary (the test binary cannot be one).
/// The executors' recovery timeout in tests (see [`executors_config`]).
pub const TEST_RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);

pub fn executors_config() -> agora_agent::executors::ExecutorsConfig {
    agora_agent::executors::ExecutorsConfig {
        executor_program: Some(env!("CARGO_BIN_EXE_agora").into()),
        // Executors of an agent a test stops without killing its tasks wait this long for it
        // to come back, then end their tasks: long enough for the restart tests, short enough
        // that no test leaves executors behind for the default 15 minutes.
        recovery_timeout: TEST_RECOVERY_TIMEOUT,
        ..Default::default()
    }
}

/// A Wasm command that sleeps `secs` seconds (WASI `poll_oneoff` on a relative clock), then
/// returns (exit 0).
pub fn sleeper_wat(secs: u64) -> String {
    format!(
        r#"(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    ;; subscription at 0: userdata 0, tag 0 (clock), clock id 1 (monotonic) at 16,
    ;; timeout (ns) at 24, precision at 32, flags 0 (relative) at 40; the event at 64.
    (i32.store8 (i32.const 8) (i32.const 0))
    (i32.store (i32.const 16) (i32.const 1))
    (i64.store (i32.const 24) (i64.const {ns}))
    (i64.store (i32.const 32) (i64.const 1000000))
    (i32.store16 (i32.const 40) (i32.const 0))
    (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))))"#,
        ns = secs * 1_000_000_000
    )
}

/// Uploads `bytes` to the master at `addr` as a framework with `tls`.
pub async fn upload_artifact(
    addr: &str,
    tls: &TlsFiles,
    kind: ArtifactKind,
    name: &str,
    bytes: &[u8],
) -> ArtifactRef {
    let session = agora_sdk::client::Session::connect(addr, tls, Role::Framework).await.expect("connect");
    let r = agora_sdk::artifacts::upload_bytes(&session.conn, kind, name, bytes).await.expect("upload");
    session.conn.close(0u32.into(), b"done");
    r
}

/// A Wasm task of `module` with `cpus:0.1;mem:16MiB`, its id as its one argument, run as the
/// agent's task user (set `user` with struct update syntax for another).
pub fn wasm_task(id: &str, module: &ArtifactRef) -> TaskInfo {
    TaskInfo {
        task_id: TaskId(id.into()),
        name: id.into(),
        resources: Resources::parse("cpus:0.1;mem:16MiB").expect("resources"),
        kind: TaskKind::Wasm(Box::new(WasmInfo {
            module: module.clone(),
            args: vec![id.into()],
            env: vec![],
            dirs: vec![],
            fuel: None,
            timeout: None,
        })),
        kill_grace: None,
        user: None,
    }
}

/// The executor's pid in a task's RUNNING message: the first number in it (a Wasm task's) or
/// the echo executor's `pid=<n>`.
pub fn pid_of(status: &TaskStatus) -> u32 {
    status
        .message
        .split_whitespace()
        .find_map(|w| w.strip_prefix("pid=").unwrap_or(w).parse().ok())
        .unwrap_or_else(|| panic!("no pid in {:?}", status.message))
}

/// Process `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// An example program beside the test binaries, built (or found up to date) with the same
/// profile: a lone `cargo test --test NAME` does not build examples, and a stale one would
/// test old code.
pub fn example(name: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_agora"));
    let path = bin.parent().expect("target dir").join("examples").join(name);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if !built.iter().any(|b| b == name) {
        let mut cargo = std::process::Command::new(env!("CARGO"));
        cargo.args(["build", "--example", name]).current_dir(env!("CARGO_MANIFEST_DIR"));
        if !cfg!(debug_assertions) {
            cargo.arg("--release");
        }
        let status = cargo.status().expect("cargo build --example");
        assert!(status.success(), "cannot build the {name} example");
        built.push(name.to_string());
    }
    path
}
