//! Cluster tests over real QUIC sockets on loopback with real processes: the offer loop end to
//! end, kills, filters, agent loss, framework failover, and refusal of bad peers.

mod common;

use std::time::Duration;

use agora_sdk::client::{ClientError, Session};
use agora_sdk::frame::{FrameReader, FrameWriter};
use agora_sdk::proto::*;
use agora_sdk::tls::TlsFiles;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_finish_and_nonzero_exit() {
    let cluster = TestCluster::start(1, "cpus:2;mem:1GiB").await;
    let mut fw = ProbeFramework::start(cluster.framework("t1")).await;
    let offer = fw.offer().await;
    assert_eq!(offer.resources.cpus, 2000);
    fw.driver().launch(
        vec![offer.id],
        vec![
            sh_task("ok", "echo hello", "cpus:0.5;mem:64MiB"),
            sh_task("bad", "echo oops >&2; exit 3", "cpus:0.5;mem:64MiB"),
        ],
    );
    let mut ended = std::collections::HashMap::new();
    let mut running = std::collections::HashSet::new();
    while ended.len() < 2 {
        if let Seen::Update(u) = fw.next().await {
            if u.state == TaskState::Running {
                running.insert(u.task_id.clone());
            }
            if u.state.is_terminal() {
                ended.insert(u.task_id.as_str().to_string(), u);
            }
        }
    }
    assert_eq!(running.len(), 2, "both tasks were reported running first");
    let ok = &ended["ok"];
    assert_eq!(ok.state, TaskState::Finished);
    assert_eq!(ok.exit_code, Some(0));
    assert!(ok.uuid.is_some(), "agent updates carry a uuid");
    let bad = &ended["bad"];
    assert_eq!(bad.state, TaskState::Failed);
    assert_eq!(bad.exit_code, Some(3));
    // Output is readable through the master after the task ended.
    let conn = fw.driver().connection().expect("connected");
    let mut out =
        agora_sdk::client::open_output(&conn, &TaskId("bad".into()), OutputStream::Stderr, 0, false)
            .await
            .expect("output");
    let mut buf = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut out, &mut buf).await.expect("read");
    assert_eq!(buf, b"oops\n");
    // Resources came back: declining the partial offers, the whole agent is offered again.
    let again = loop {
        fw.decline_held(0.0);
        let o = fw.offer().await;
        if o.resources.cpus == 2000 {
            break o;
        }
    };
    assert_eq!(again.resources.mem, 1 << 30);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_launch_is_task_error() {
    let cluster = TestCluster::start(1, "cpus:1;mem:256MiB").await;
    let mut fw = ProbeFramework::start(cluster.framework("t2")).await;
    let offer = fw.offer().await;
    fw.driver().launch(vec![offer.id], vec![sh_task("huge", "true", "cpus:8;mem:64MiB")]);
    let st = fw
        .until(|s| match s {
            Seen::Update(u) if u.task_id.as_str() == "huge" => Some(u.clone()),
            _ => None,
        })
        .await;
    assert_eq!(st.state, TaskState::Error, "{st:?}");
    assert!(!st.message.is_empty());
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_a_running_task() {
    let cluster = TestCluster::start(1, "cpus:1;mem:256MiB").await;
    let mut fw = ProbeFramework::start(cluster.framework("t3")).await;
    let offer = fw.offer().await;
    fw.driver().launch(vec![offer.id], vec![sh_task("sleeper", "sleep 60", "cpus:0.5;mem:32MiB")]);
    fw.update_for("sleeper", TaskState::Running).await;
    fw.driver().kill(TaskId("sleeper".into()));
    let st = fw.update_for("sleeper", TaskState::Killed).await;
    assert!(st.signal.is_some(), "{st:?}");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decline_filter_hides_agent_from_that_framework_only() {
    let cluster = TestCluster::start(1, "cpus:1;mem:256MiB").await;
    let mut a = ProbeFramework::start(cluster.framework("a")).await;
    let offer = a.offer().await;
    a.driver().decline(vec![offer.id], Some(3.0));
    let declined_at = std::time::Instant::now();
    // The other framework gets the agent while the filter holds.
    let mut b = ProbeFramework::start(cluster.framework("b")).await;
    let ob = b.offer().await;
    assert_eq!(ob.agent_id, offer.agent_id);
    b.driver().decline(vec![ob.id], Some(60.0));
    // `a` sees nothing of it before its filter ends, then gets it back.
    let again = a.offer().await;
    assert!(
        declined_at.elapsed() >= Duration::from_millis(2900),
        "re-offered after {:?}",
        declined_at.elapsed()
    );
    assert_eq!(again.agent_id, offer.agent_id);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_loss_rescinds_offers_and_makes_tasks_unreachable() {
    let mut cluster = TestCluster::start(1, "cpus:1;mem:256MiB").await;
    let lost = cluster.add_vanishing_agent("agent-lost", "cpus:1;mem:256MiB");
    cluster.wait_agents(2).await;
    let mut fw = ProbeFramework::start(cluster.framework("t5")).await;
    // Take the vanishing agent with a task; hold agent-0's offer.
    let mut offers = Vec::new();
    while offers.len() < 2 {
        if let Seen::Offers(o) = fw.next().await {
            offers.extend(o);
        }
    }
    let on_lost = offers.iter().find(|o| o.hostname == "agent-lost").expect("offer").clone();
    let on_0 = offers.iter().find(|o| o.hostname == "agent-0").expect("offer").clone();
    fw.driver().launch(vec![on_lost.id], vec![sh_task("far", "sleep 3", "cpus:0.5;mem:32MiB")]);
    fw.update_for("far", TaskState::Running).await;
    // agent-0 shuts down: its outstanding offer is rescinded.
    let (t0, h0) = cluster.agents.remove(0);
    t0.cancel();
    let _ = h0.await;
    let rescinded = fw
        .until(|s| match s {
            Seen::Rescinded(id) => Some(id.clone()),
            _ => None,
        })
        .await;
    assert_eq!(rescinded, on_0.id);
    // The other agent stops answering at once: past the timeout its tasks are unreachable.
    lost.vanish();
    let st = fw.update_for("far", TaskState::Unreachable).await;
    assert_eq!(st.source, UpdateSource::Master);
    let agents = cluster.master.agents().await;
    assert!(
        agents
            .iter()
            .any(|a| a.hostname == "agent-lost" && a.status == agora_sdk::AgentViewStatus::Unreachable),
        "{agents:?}"
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framework_failover_within_and_past_timeout() {
    let cluster = TestCluster::start(1, "cpus:2;mem:512MiB").await;
    let mut cfg = cluster.framework("failover");
    cfg.framework.failover_timeout = Duration::from_secs(2);
    let mut fw = ProbeFramework::start(cfg.clone()).await;
    let id = fw.id.clone().expect("id");
    let offer = fw.offer().await;
    // The task's shell becomes the sleep: the pid it writes is the task's process.
    let task = sh_task("long", "echo $$ > pid; exec sleep 60", "cpus:0.5;mem:32MiB");
    fw.driver().launch(vec![offer.id], vec![task]);
    fw.update_for("long", TaskState::Running).await;
    let runs = cluster.agent_dir(0).join("frameworks").join(id.as_str()).join("executors/long/runs");
    let pid_file = || {
        let run = std::fs::read_dir(&runs).ok()?.flatten().next()?.path();
        std::fs::read_to_string(run.join("pid")).ok()?.trim().parse::<i32>().ok()
    };
    wait_for("the task to write its pid", || async { pid_file().is_some() }).await;
    let pid = pid_file().expect("pid");
    // Disconnect without teardown, come back within the timeout with the same id.
    fw.driver().stop(false);
    let _ = fw.run.await;
    cluster
        .wait_framework_status(
            "the master to see the framework disconnected",
            &id,
            agora_sdk::FrameworkViewStatus::Disconnected,
        )
        .await;
    assert_eq!(cluster.task_state("long").await, Some(TaskState::Running));
    assert!(alive(pid), "the task's process runs on while its framework is away");
    cfg.framework.id = Some(id.clone());
    let mut fw2 = ProbeFramework::start(cfg.clone()).await;
    assert_eq!(fw2.id.as_ref(), Some(&id));
    fw2.driver().reconcile(vec![TaskId("long".into())]);
    // (The RUNNING update the first instance did not acknowledge may come first, resent.)
    let st = fw2
        .until(|s| match s {
            Seen::Update(u) if u.task_id.as_str() == "long" && u.uuid.is_none() => Some(u.clone()),
            _ => None,
        })
        .await;
    assert_eq!(st.state, TaskState::Running, "reconciliation answer: {st:?}");
    assert!(alive(pid));
    // Leave again and stay away past the timeout: the task is killed (KILLED, not lost or
    // forgotten) and its process is gone.
    fw2.driver().stop(false);
    let _ = fw2.run.await;
    wait_for("the orphaned task to end", || async {
        cluster.task_state("long").await.is_none_or(|s| s.is_terminal())
    })
    .await;
    assert_eq!(cluster.task_state("long").await, Some(TaskState::Killed));
    wait_for("the orphaned task's process to be gone", || async { !alive(pid) }).await;
    // And the framework is gone: re-subscribing with its id is refused.
    let r = agora_sdk::scheduler::run(cfg, &mut NoOp).await;
    assert!(matches!(r, Err(ClientError::Refused(_))), "{r:?}");
    cluster.stop().await;
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

struct NoOp;
impl agora_sdk::scheduler::Scheduler for NoOp {
    async fn resource_offers(&mut self, _: &agora_sdk::scheduler::Driver, _: Vec<Offer>) {}
    async fn status_update(&mut self, _: &agora_sdk::scheduler::Driver, _: &TaskStatus) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_without_a_valid_certificate_are_refused() {
    let cluster = TestCluster::start(1, "cpus:1;mem:256MiB").await;
    let addr = cluster.master.addr.to_string();
    // A certificate signed by another CA: the master's TLS refuses it (the client trusts the
    // master: the cluster's CA). Whether the client sees that during its handshake or on its
    // first read, it is the master's close with the TLS reason, not a timeout.
    let other = tempfile::tempdir().expect("tempdir");
    let foreign = agora_sdk::tls::foreign_identity(other.path(), Role::Framework).expect("foreign");
    let intruder = TlsFiles { ca: cluster.tls("framework").ca, ..foreign.clone() };
    match Session::connect(&addr, &intruder, Role::Framework).await {
        Err(ClientError::ForeignCa { detail, .. }) => {
            assert!(detail.contains("invalid peer certificate"), "{detail}")
        }
        other => panic!("expected the master's TLS refusal, got {:?}", other.err()),
    }
    // And a client of the other CA refuses the master (its certificate is not of its CA).
    match Session::connect(&addr, &foreign, Role::Framework).await {
        Err(e @ ClientError::ForeignCa { .. }) => {
            let text = e.to_string();
            assert!(text.contains("invalid peer certificate"), "{text}");
            assert_eq!(text.matches("certificate not signed by this cluster's CA").count(), 1, "{text}");
        }
        other => panic!("expected the client's TLS refusal, got {:?}", other.err()),
    }
    // An agent certificate cannot act as a framework, nor a framework as an agent.
    match Session::connect(&addr, &cluster.tls("agent"), Role::Framework).await {
        Err(ClientError::Refused(e)) => {
            assert_eq!(e.code, ErrorCode::Unauthorized);
            assert!(e.message.contains("is for role agent, not framework"), "{}", e.message);
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("agent certificate accepted as framework"),
    }
    match Session::connect(&addr, &cluster.tls("framework"), Role::Agent).await {
        Err(ClientError::Refused(e)) => {
            assert_eq!(e.code, ErrorCode::Unauthorized);
            assert!(e.message.contains("is for role framework, not agent"), "{}", e.message);
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("framework certificate accepted as agent"),
    }
    // The cluster still serves.
    let mut fw = ProbeFramework::start(cluster.framework("still-fine")).await;
    fw.offer().await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_frame_closes_only_its_own_connection() {
    let cluster = TestCluster::start(1, "cpus:1;mem:256MiB").await;
    let mut good = ProbeFramework::start(cluster.framework("good")).await;
    let offer = good.offer().await;
    // A framework that sends garbage after the handshake.
    let s = Session::connect(&cluster.master.addr.to_string(), &cluster.tls("framework"), Role::Framework)
        .await
        .expect("connect");
    let Session { conn, writer, reader, .. } = s;
    let mut raw = writer.into_inner();
    raw.write_all(&[0, 0, 0, 4, 0xde, 0xad, 0xbe, 0xef]).await.expect("write");
    let mut reader: FrameReader<_> = reader;
    let reply = reader.recv::<SchedulerEvent>().await;
    assert!(
        matches!(reply, Ok(Some(SchedulerEvent::Error(ref e))) if e.code == ErrorCode::Malformed),
        "{reply:?}"
    );
    let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await.expect("closed");
    match reason {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, quinn::VarInt::from_u32(3), "Malformed: {c:?}");
            assert!(String::from_utf8_lossy(&c.reason).starts_with("malformed message"), "{c:?}");
        }
        other => panic!("{other:?}"),
    }
    // An oversized frame too.
    let s = Session::connect(&cluster.master.addr.to_string(), &cluster.tls("framework"), Role::Framework)
        .await
        .expect("connect");
    let mut raw = s.writer.into_inner();
    raw.write_all(&(64u32 << 20).to_be_bytes()).await.expect("write");
    let reason = tokio::time::timeout(Duration::from_secs(5), s.conn.closed()).await.expect("closed");
    let max = agora_sdk::frame::MAX_FRAME;
    match reason {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, quinn::VarInt::from_u32(4), "TooLarge: {c:?}");
            assert_eq!(String::from_utf8_lossy(&c.reason), format!("frame larger than {max} bytes"));
        }
        other => panic!("{other:?}"),
    }
    let _ = FrameWriter::new(raw);
    // The good framework is unaffected and can still launch.
    good.driver().launch(vec![offer.id], vec![sh_task("after", "true", "cpus:0.1;mem:16MiB")]);
    good.update_for("after", TaskState::Finished).await;
    cluster.stop().await;
}

/// One HTTP/1.1 GET over a plain socket; returns (status line, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("http response");
    (head.lines().next().unwrap_or_default().to_string(), body.to_string())
}

/// Metrics are process-wide, and the other tests of this binary run beside this one: their
/// values are exact only in a process of its own, so the test runs itself again, alone.
#[test]
fn http_state_and_metrics() {
    const CHILD: &str = "AGORA_TEST_METRICS_ALONE";
    if std::env::var_os(CHILD).is_none() {
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", "http_state_and_metrics", "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .expect("run the test alone");
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && text.contains("1 passed"), "{text}");
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(http_state_and_metrics_alone());
}

async fn http_state_and_metrics_alone() {
    let cluster = TestCluster::start(1, "cpus:1;mem:256MiB").await;
    let http = agora_master::http::spawn(
        ([127, 0, 0, 1], 0).into(),
        cluster.master.clone(),
        cluster.shutdown.clone(),
    )
    .await
    .expect("http");
    let mut fw = ProbeFramework::start(cluster.framework("web")).await;
    let offer = fw.offer().await;
    fw.driver().launch(vec![offer.id], vec![sh_task("seen", "true", "cpus:0.1;mem:16MiB")]);
    fw.update_for("seen", TaskState::Finished).await;
    let (status, body) = http_get(http, "/api/v1/state").await;
    assert!(status.contains("200"), "{status}");
    // Chunked or not, the JSON object is the body's outermost braces.
    let json = &body[body.find('{').expect("json")..=body.rfind('}').expect("json")];
    let state: serde_json::Value = serde_json::from_str(json).expect("state json");
    assert_eq!(state["agents"][0]["hostname"], "agent-0");
    assert_eq!(state["frameworks"][0]["name"], "web");
    assert!(state["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .any(|t| t["id"] == "seen" && t["state"] == "TASK_FINISHED"));
    let (status, metrics) = http_get(http, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    // Values, not just names: one agent, one framework, one offer taken for one task that ended.
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {metrics}"))
    };
    for (name, want) in [
        ("agora_master_tasks_launched_total", 1.0),
        (r#"agora_master_tasks_terminal_total{state="TASK_FINISHED"}"#, 1.0),
        ("agora_master_offers_accepted_total", 1.0),
        ("agora_master_agents_active", 1.0),
        ("agora_master_frameworks_active", 1.0),
    ] {
        assert_eq!(value(name), want, "{name} in {metrics}");
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_keeps_its_id() {
    // As `agora agent` runs: tasks are not killed on purpose when the agent stops.
    let mut cluster = TestCluster::start(0, "cpus:1;mem:256MiB").await;
    cluster.add_production_agent(0, "cpus:1;mem:256MiB");
    cluster.wait_agents(1).await;
    let before = cluster.master.agents().await;
    assert_eq!(before.len(), 1);
    // The agent writes its id when the master's answer arrives, a moment after the master
    // counts it as registered.
    let id_path = cluster.agent_dir(0).join("agent_id");
    wait_for("the agent to write its id", || async { id_path.exists() }).await;
    // A task runs when the agent stops.
    let mut fw = ProbeFramework::start(cluster.framework("f")).await;
    let offer = fw.offer().await;
    fw.held.clear();
    fw.driver()
        .launch(vec![offer.id], vec![sh_task("t", "echo $$ > pid; exec sleep 300", "cpus:0.5;mem:32MiB")]);
    fw.update_for("t", TaskState::Running).await;
    let runs = cluster
        .agent_dir(0)
        .join("frameworks")
        .join(fw.id.as_ref().expect("id").as_str())
        .join("executors/t/runs");
    let pid_file =
        std::fs::read_dir(&runs).expect("runs").flatten().next().expect("a run").path().join("pid");
    wait_for("the task's pid", || {
        let p = pid_file.clone();
        async move { std::fs::read_to_string(&p).is_ok_and(|s| s.trim().parse::<i32>().is_ok()) }
    })
    .await;
    let pid: i32 = std::fs::read_to_string(&pid_file).expect("pid").trim().parse().expect("pid");
    let (token, handle) = cluster.agents.remove(0);
    token.cancel();
    let _ = handle.await;
    wait_for("the agent to be seen gone", || async {
        cluster.master.agents().await.iter().all(|a| a.status != agora_sdk::AgentViewStatus::Active)
    })
    .await;
    // The task's executor outlives its agent and keeps the task running.
    let alive = move || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
            .unwrap_or(false)
    };
    assert!(alive(), "the task ended with its agent");
    let id_file = std::fs::read_to_string(cluster.agent_dir(0).join("agent_id")).expect("agent_id file");
    assert_eq!(id_file.trim(), before[0].id.as_str());
    // The stopped agent let go of its cgroup root's lock (a restart in the same process gets
    // it at once instead of waiting for it and running without isolation).
    let lock_dir = agora_agent::cgroups::liveness::lock_dir();
    let root = agora_agent::cgroups::agent_group_name(&cluster.agent_dir(0));
    if lock_dir.join(format!("{root}.lock")).exists() {
        let free = agora_agent::cgroups::liveness::RootLock::try_unused(&lock_dir, &root).expect("lock");
        assert!(free.is_some(), "the stopped agent still holds its cgroup root's lock");
    }
    // The restarted agent takes the executor and its task back and re-registers as itself.
    cluster.add_production_agent(0, "cpus:1;mem:256MiB");
    cluster.wait_agents(1).await;
    let after = cluster.master.agents().await;
    assert_eq!(after.len(), 1, "re-registered, not registered anew: {after:?}");
    assert_eq!(after[0].id, before[0].id);
    // Still running, the same process, and no new update about it.
    wait_for("the master to see the task running again", || async {
        cluster.task_state("t").await == Some(TaskState::Running)
    })
    .await;
    assert!(alive(), "the same process runs after the restart");
    assert_eq!(std::fs::read_to_string(&pid_file).expect("pid").trim().parse::<i32>().ok(), Some(pid));
    while let Ok(Some((_, s))) = tokio::time::timeout(Duration::from_millis(500), fw.rx.recv()).await {
        if let Seen::Update(u) = s {
            assert!(
                u.task_id.as_str() != "t" || u.state == TaskState::Running,
                "unexpected update after the restart: {u:?}"
            );
        }
    }
    fw.driver().kill(TaskId::new("t"));
    fw.update_for("t", TaskState::Killed).await;
    wait_for("the task's process to end when killed", || async move { !alive() }).await;
    cluster.stop().await;
}
