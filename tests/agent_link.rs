//! End-to-end: a real agent against a tiny fake master (quinn server with the cluster's mTLS).
//! (Here rather than in the agent crate: its tasks run under `agora executor-command`, the
//! built binary.)

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_agent::{AgentConfig, AgentError};
use agora_sdk::frame::{FrameReader, FrameWriter};
use agora_sdk::proto::*;
use agora_sdk::tls::TlsFiles;
use agora_sdk::{Attributes, Resources};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

struct FakeMaster {
    endpoint: quinn::Endpoint,
}

/// One agent connection as the fake master sees it. Heartbeats are answered automatically
/// (unless `mute`), everything else is handed to the test.
struct AgentConn {
    conn: quinn::Connection,
    tx: mpsc::UnboundedSender<MasterToAgent>,
    rx: mpsc::UnboundedReceiver<AgentMessage>,
    heartbeats: Arc<AtomicUsize>,
    mute: Arc<AtomicBool>,
    acked: HashSet<uuid::Uuid>,
}

impl FakeMaster {
    fn start(tls_dir: &Path) -> Self {
        let cfg =
            agora_sdk::transport::server_config(&TlsFiles::in_dir(tls_dir, "master")).expect("server config");
        let addr: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        Self { endpoint: quinn::Endpoint::server(cfg, addr).expect("endpoint") }
    }

    fn addr(&self) -> String {
        self.endpoint.local_addr().expect("local addr").to_string()
    }

    /// Accepts a connection and answers its Hello with `reply`.
    async fn accept_with(&self, reply: HelloReply) -> AgentConn {
        let incoming = tokio::time::timeout(WAIT, self.endpoint.accept())
            .await
            .expect("agent connects in time")
            .expect("endpoint open");
        let conn = incoming.await.expect("handshake");
        let (send, recv) = conn.accept_bi().await.expect("control stream");
        let mut reader = FrameReader::new(recv);
        let mut writer = FrameWriter::new(send);
        let hello: Hello = reader.recv().await.expect("hello frame").expect("hello");
        assert_eq!(hello, Hello::new(Role::Agent));
        writer.send(&reply).await.expect("reply");
        let (tx, mut to_agent) = mpsc::unbounded_channel::<MasterToAgent>();
        let (from_agent, rx) = mpsc::unbounded_channel();
        let heartbeats = Arc::new(AtomicUsize::new(0));
        let mute = Arc::new(AtomicBool::new(false));
        tokio::spawn(async move {
            while let Some(m) = to_agent.recv().await {
                if writer.send(&m).await.is_err() {
                    return;
                }
            }
        });
        let (hb, mu, acks) = (heartbeats.clone(), mute.clone(), tx.clone());
        tokio::spawn(async move {
            while let Ok(Some(m)) = reader.recv::<AgentMessage>().await {
                if mu.load(Ordering::SeqCst) {
                    continue;
                }
                if m == AgentMessage::Heartbeat {
                    hb.fetch_add(1, Ordering::SeqCst);
                    let _ = acks.send(MasterToAgent::HeartbeatAck);
                } else if from_agent.send(m).is_err() {
                    return;
                }
            }
        });
        AgentConn { conn, tx, rx, heartbeats, mute, acked: HashSet::new() }
    }

    async fn accept(&self) -> AgentConn {
        self.accept_with(HelloReply::Welcome { version: PROTOCOL_VERSION, master_id: "m".into(), epoch: 1 })
            .await
    }
}

impl AgentConn {
    fn send(&self, m: MasterToAgent) {
        self.tx.send(m).expect("writer alive");
    }

    async fn recv(&mut self) -> AgentMessage {
        tokio::time::timeout(WAIT, self.rx.recv()).await.expect("message in time").expect("open")
    }

    /// The next status update, skipping retries of already acknowledged ones (they may cross
    /// our acknowledgement).
    async fn status(&mut self) -> TaskStatus {
        loop {
            match self.recv().await {
                AgentMessage::StatusUpdate(s) if s.uuid.is_some_and(|u| self.acked.contains(&u)) => {}
                // The newest state behind an unacknowledged one: for the master's view only.
                AgentMessage::LatestState(_) => {}
                AgentMessage::StatusUpdate(s) => return s,
                other => panic!("expected a status update, got {other:?}"),
            }
        }
    }

    fn ack(&mut self, s: &TaskStatus) {
        self.acked.extend(s.uuid);
        self.send(MasterToAgent::StatusAck {
            framework_id: s.framework_id.clone(),
            task_id: s.task_id.clone(),
            uuid: s.uuid.expect("agent updates carry a uuid"),
        });
    }

    async fn output(&self, req: OutputRequest) -> Result<Vec<u8>, WireError> {
        output(&self.conn, req).await
    }
}

/// Reads a task's output as the master would.
async fn output(conn: &quinn::Connection, req: OutputRequest) -> Result<Vec<u8>, WireError> {
    {
        let (send, recv) = conn.open_bi().await.expect("open stream");
        let mut w = FrameWriter::new(send);
        w.send(&StreamRequest::Output(req)).await.expect("request");
        let mut r = FrameReader::new(recv);
        match r.recv::<OutputReply>().await.expect("reply frame").expect("reply") {
            OutputReply::Streaming => {}
            OutputReply::Error(e) => return Err(e),
        }
        let (mut recv, buffered) = r.into_parts();
        let mut out = buffered.to_vec();
        out.extend(recv.read_to_end(1 << 20).await.expect("stream bytes"));
        Ok(out)
    }
}

/// Like [`output`], reporting the first bytes through `first` as soon as they arrive.
async fn output_reporting_first(
    conn: &quinn::Connection,
    req: OutputRequest,
    first: tokio::sync::oneshot::Sender<Vec<u8>>,
) -> Result<Vec<u8>, WireError> {
    let (send, recv) = conn.open_bi().await.expect("open stream");
    let mut w = FrameWriter::new(send);
    w.send(&StreamRequest::Output(req)).await.expect("request");
    let mut r = FrameReader::new(recv);
    match r.recv::<OutputReply>().await.expect("reply frame").expect("reply") {
        OutputReply::Streaming => {}
        OutputReply::Error(e) => return Err(e),
    }
    let (mut recv, buffered) = r.into_parts();
    let mut out = buffered.to_vec();
    let mut first = Some(first);
    let mut buf = [0u8; 4096];
    loop {
        if !out.is_empty() {
            if let Some(tx) = first.take() {
                let _ = tx.send(out.clone());
            }
        }
        match recv.read(&mut buf).await.expect("stream bytes") {
            Some(n) => out.extend_from_slice(&buf[..n]),
            None => return Ok(out),
        }
    }
}

fn config(dir: &Path, master: String) -> AgentConfig {
    AgentConfig {
        master,
        tls: TlsFiles::in_dir(&dir.join("tls"), "agent"),
        work_dir: dir.join("work"),
        resources: Some(Resources::parse("cpus:2;mem:1GiB").expect("resources")),
        attributes: Attributes::parse("rack:r1").expect("attributes"),
        hostname: "node-1".into(),
        kill_grace: Duration::from_secs(3),
        kill_tasks_on_shutdown: true,
        isolation: agora_agent::cgroups::IsolationConfig::default(),
        executors: agora_agent::executors::ExecutorsConfig {
            executor_program: Some(env!("CARGO_BIN_EXE_agora").into()),
            ..agora_agent::executors::ExecutorsConfig::default()
        },
        task_user: agora_agent::user::DEFAULT_TASK_USER.into(),
        recovery: agora_agent::RecoveryConfig::default(),
        gc: agora_agent::gc::GcConfig::default(),
        disk: agora_agent::disk::DiskConfig::default(),
    }
}

fn shell_task(id: &str, script: &str) -> TaskInfo {
    TaskInfo {
        task_id: TaskId::new(id),
        name: id.into(),
        resources: Resources::cpus(100),
        kind: TaskKind::Command(CommandInfo { argv: vec![script.into()], shell: true, env: vec![] }),
        kill_grace: Some(Duration::from_secs(1)),
        user: None,
    }
}

#[tokio::test]
async fn register_run_retry_stream_reconnect() {
    let dir = tempfile::tempdir().expect("tempdir");
    agora_sdk::tls::init(&dir.path().join("tls"), "fw", false).expect("tls init");
    let master = FakeMaster::start(&dir.path().join("tls"));
    let cfg = config(dir.path(), master.addr());
    let work = cfg.work_dir.clone();
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(agora_agent::run(cfg, shutdown.clone()));

    // Registration; the id is checkpointed.
    let mut a = master.accept().await;
    match a.recv().await {
        AgentMessage::Register { agent_id, hostname, resources, attributes, tasks } => {
            assert_eq!(agent_id, None);
            assert_eq!(hostname, "node-1");
            assert_eq!(resources, Resources::parse("cpus:2;mem:1GiB").expect("resources"));
            assert_eq!(attributes.to_string(), "rack:r1");
            assert!(tasks.is_empty());
        }
        other => panic!("expected Register, got {other:?}"),
    }
    a.send(MasterToAgent::Registered {
        agent_id: AgentId::new("agent-7"),
        heartbeat_interval: Duration::from_millis(200),
    });
    let id_file = work.join("agent_id");
    let deadline = Instant::now() + WAIT;
    while std::fs::read_to_string(&id_file).ok().as_deref() != Some("agent-7\n") {
        assert!(Instant::now() < deadline, "agent_id file never written");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A task: RUNNING is resent until acknowledged, then FINISHED follows.
    let fw = FrameworkId::new("fw-1");
    a.send(MasterToAgent::RunTask { framework_id: fw.clone(), task: shell_task("t1", "echo hi") });
    let running = a.status().await;
    assert_eq!(running.state, TaskState::Running);
    assert_eq!(running.agent_id, Some(AgentId::new("agent-7")));
    assert_eq!(running.source, UpdateSource::Agent);
    let again = a.status().await;
    assert_eq!(again.uuid, running.uuid, "the same update is retried");
    a.ack(&running);
    let finished = a.status().await;
    assert_eq!((finished.state, finished.exit_code), (TaskState::Finished, Some(0)));
    assert!(a.heartbeats.load(Ordering::SeqCst) >= 1, "heartbeats flow");

    // Output, after the task ended, with and without follow; unknown tasks are refused.
    let req = OutputRequest {
        task_id: TaskId::new("t1"),
        framework_id: Some(fw.clone()),
        stream: OutputStream::Stdout,
        offset: 0,
        follow: false,
    };
    assert_eq!(a.output(req.clone()).await.as_deref(), Ok(&b"hi\n"[..]));
    let followed =
        tokio::time::timeout(WAIT, a.output(OutputRequest { follow: true, offset: 1, ..req.clone() }))
            .await
            .expect("follow of a finished task ends");
    assert_eq!(followed.as_deref(), Ok(&b"i\n"[..]));
    let unknown = a.output(OutputRequest { task_id: TaskId::new("ghost"), ..req.clone() }).await;
    assert_eq!(unknown.map_err(|e| e.code), Err(ErrorCode::NotFound));

    // The master goes silent: the agent gives up on it, reconnects, re-registers with its id
    // and the task whose terminal update is still unacknowledged, and resends that update.
    a.mute.store(true, Ordering::SeqCst);
    let mut b = master.accept().await;
    match b.recv().await {
        AgentMessage::Register { agent_id, tasks, .. } => {
            assert_eq!(agent_id, Some(AgentId::new("agent-7")));
            assert_eq!(tasks.len(), 1);
            assert_eq!((tasks[0].task.task_id.as_str(), tasks[0].state), ("t1", TaskState::Finished));
        }
        other => panic!("expected Register, got {other:?}"),
    }
    let resent = b.status().await;
    assert_eq!(resent.uuid, finished.uuid);
    b.send(MasterToAgent::Registered {
        agent_id: AgentId::new("agent-7"),
        heartbeat_interval: Duration::from_millis(200),
    });
    b.ack(&resent);

    // A long task with streaming output, killed on request.
    let script = "echo start; sleep 30";
    b.send(MasterToAgent::RunTask { framework_id: fw.clone(), task: shell_task("t2", script) });
    let running = b.status().await;
    assert_eq!(running.state, TaskState::Running);
    b.ack(&running);
    let follow = OutputRequest { task_id: TaskId::new("t2"), follow: true, ..req.clone() };
    let conn = b.conn.clone();
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let reader = tokio::spawn(async move { output_reporting_first(&conn, follow, first_tx).await });
    let first = tokio::time::timeout(WAIT, first_rx).await.expect("output in time").expect("first bytes");
    assert_eq!(first, b"start\n", "the output streams while the task runs");
    assert!(!reader.is_finished(), "a followed stream stays open while the task runs");
    b.send(MasterToAgent::KillTask { framework_id: fw.clone(), task_id: TaskId::new("t2") });
    let killing = b.status().await;
    assert_eq!(killing.state, TaskState::Killing);
    b.ack(&killing);
    let killed = b.status().await;
    assert_eq!((killed.state, killed.reason.as_str()), (TaskState::Killed, "killed"));
    b.ack(&killed);
    let out = tokio::time::timeout(WAIT, reader).await.expect("stream ends").expect("join");
    assert_eq!(out.as_deref(), Ok(&b"start\n"[..]));

    // Killing an unknown task answers TASK_LOST.
    b.send(MasterToAgent::KillTask { framework_id: fw.clone(), task_id: TaskId::new("nope") });
    let lost = b.status().await;
    assert_eq!((lost.state, lost.reason.as_str()), (TaskState::Lost, "unknown task"));

    shutdown.cancel();
    let result = tokio::time::timeout(WAIT, agent).await.expect("agent stops").expect("join");
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn refused_agent_stops_and_unreachable_master_is_retried() {
    let dir = tempfile::tempdir().expect("tempdir");
    agora_sdk::tls::init(&dir.path().join("tls"), "fw", false).expect("tls init");

    // The master's endpoint refuses the agent's connections at first (QUIC-level refusals,
    // answered at once): the agent retries, each time after a longer delay (backoff from
    // 100 ms, doubling, each delay drawn from [d/2, d]), and does not give up.
    let server = agora_sdk::transport::server_config(&TlsFiles::in_dir(&dir.path().join("tls"), "master"))
        .expect("server config");
    let master = FakeMaster {
        endpoint: quinn::Endpoint::server(server, "127.0.0.1:0".parse().expect("addr")).expect("endpoint"),
    };
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(agora_agent::run(config(dir.path(), master.addr()), shutdown.clone()));
    let mut attempts = Vec::new();
    for _ in 0..4 {
        let incoming = tokio::time::timeout(WAIT, master.endpoint.accept())
            .await
            .expect("the agent tries again")
            .expect("endpoint open");
        attempts.push(Instant::now());
        incoming.refuse();
    }
    assert!(!agent.is_finished(), "a refused connection is not fatal");
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    for (gap, least) in gaps.iter().zip([50, 100, 200]) {
        assert!(*gap >= Duration::from_millis(least), "retried too soon (no backoff): {gaps:?}");
    }
    // Then the master answers, refusing the agent itself: that is fatal.
    let refusal = WireError::new(ErrorCode::Unauthorized, "not welcome");
    let _conn = master.accept_with(HelloReply::Refused(refusal.clone())).await;
    let result = tokio::time::timeout(WAIT, agent).await.expect("agent stops").expect("join");
    match result {
        Err(AgentError::Refused { error, .. }) => assert_eq!(error, refusal),
        other => panic!("expected a refusal, got {other:?}"),
    }

    // An unreadable certificate is fatal and names the file.
    let mut cfg = config(dir.path(), master.addr());
    cfg.tls.cert = dir.path().join("missing.pem");
    let err = agora_agent::run(cfg, CancellationToken::new()).await.expect_err("fatal");
    assert!(err.to_string().contains("missing.pem"), "{err}");
}
