//! Lists larger than one frame, over real QUIC on loopback: an agent that re-registers with
//! thousands of tasks (its reports go ahead of `Register` in several messages), and an operator
//! listing them all (the reply comes in parts). Either used to exceed the 1 MiB frame limit at a
//! few thousand Wasm tasks: the agent could not register, `agora tasks` failed.

// Test helpers outside `#[test]` functions fail loudly too.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use agora_master::core::MasterConfig;
use agora_master::server::{self, ServerConfig};
use agora_sdk::client::{OperatorClient, Session};
use agora_sdk::config::{CertPair, ClientConfig};
use agora_sdk::frame::{encode, MAX_FRAME};
use agora_sdk::proto::*;
use agora_sdk::tls::TlsFiles;
use agora_sdk::{Attributes, Resources};
use tokio_util::sync::CancellationToken;

const TASKS: usize = 12_000;

fn report(i: usize) -> TaskReport {
    TaskReport {
        framework_id: FrameworkId::new("fw-with-a-rather-long-framework-identifier"),
        task: TaskInfo {
            task_id: TaskId::new(format!("wasm-task-{i:06}")),
            name: "wasm-task".into(),
            resources: Resources { cpus: 1, mem: 1 << 20, ..Resources::default() },
            kind: TaskKind::Wasm(Box::new(WasmInfo {
                module: ArtifactRef { digest: Digest::of(b"module"), size: 6 },
                args: vec!["module.wasm".into(), "--some".into(), "arguments".into()],
                env: vec![("KEY".into(), "value".into())],
                dirs: vec![],
                fuel: None,
                timeout: None,
            })),
            kill_grace: None,
            user: None,
        },
        state: TaskState::Running,
    }
}

/// A master on loopback with fresh certificates in a temp dir (kept alive by the caller).
fn start_master() -> (tempfile::TempDir, String, CancellationToken) {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    agora_sdk::tls::init(&tls, "tester", false).unwrap();
    let shutdown = CancellationToken::new();
    let master = server::spawn(
        ServerConfig {
            listen: ([127, 0, 0, 1], 0).into(),
            tls: TlsFiles::in_dir(&tls, "master"),
            core: MasterConfig {
                master_id: "t".into(),
                allocation_interval: Duration::from_millis(50),
                ..MasterConfig::default()
            },
            allocator: "drf".into(),
            work_dir: dir.path().join("master"),
            max_artifact_size: agora_master::artifacts::DEFAULT_MAX_ARTIFACT_SIZE,
            eviction: agora_master::artifacts::EvictionConfig::default(),
            limits: Default::default(),
        },
        shutdown.clone(),
    )
    .unwrap();
    let addr = master.addr.to_string();
    (dir, addr, shutdown)
}

#[tokio::test]
async fn an_agent_with_thousands_of_tasks_registers_and_the_operator_lists_them_all() {
    let (dir, addr, shutdown) = start_master();
    let tls = dir.path().join("tls");

    // What the agent's core sends on reconnection: reports in runs that fit, then Register.
    let reports: Vec<TaskReport> = (0..TASKS).map(report).collect();
    assert!(encode(&reports).is_err(), "the test must exceed one frame ({MAX_FRAME} bytes)");
    let mut runs = agora_sdk::frame::chunk_by_size(reports, agora_sdk::frame::LIST_BUDGET);
    let last = runs.pop().unwrap();
    assert!(!runs.is_empty());
    let mut agent = Session::connect(&addr, &TlsFiles::in_dir(&tls, "agent"), Role::Agent).await.unwrap();
    for run in runs {
        agent.writer.feed(&AgentMessage::TaskReports(run)).await.unwrap();
    }
    agent
        .writer
        .send(&AgentMessage::Register {
            agent_id: Some(AgentId::new("busy-agent")),
            hostname: "busy".into(),
            resources: Resources::parse("cpus:20000;mem:64GiB").unwrap(),
            attributes: Attributes::default(),
            tasks: last,
        })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let msg = tokio::time::timeout_at(deadline.into(), agent.reader.recv::<MasterToAgent>())
            .await
            .expect("registered in time")
            .unwrap()
            .expect("the master keeps the connection");
        match msg {
            MasterToAgent::Registered { agent_id, .. } => {
                assert_eq!(agent_id, AgentId::new("busy-agent"));
                break;
            }
            MasterToAgent::Error(e) => panic!("refused: {e:?}"),
            _ => {}
        }
    }

    let config = ClientConfig {
        master: addr.clone(),
        ca: tls.join("ca.pem"),
        operator: Some(CertPair { cert: tls.join("operator.pem"), key: tls.join("operator-key.pem") }),
        framework: None,
        source: dir.path().join("client.toml"),
    };
    let mut op = OperatorClient::connect(&config).await.unwrap();
    let tasks = op.tasks().await.unwrap();
    assert_eq!(tasks.len(), TASKS, "every reported task is listed");
    assert!(tasks.iter().all(|t| t.state == TaskState::Running && t.agent_id == AgentId::new("busy-agent")));
    // Exactly the reported tasks, each once.
    let mut ids: Vec<&str> = tasks.iter().map(|t| t.id.as_str()).collect();
    ids.sort_unstable();
    let expected: Vec<String> = (0..TASKS).map(|i| report(i).task.task_id.to_string()).collect();
    assert!(ids.iter().eq(expected.iter()), "the listing is not exactly the {TASKS} reported tasks");
    assert!(encode(&OperatorReply::Tasks(tasks)).is_err(), "the listing itself exceeds one frame");
    // The connection is still good for the next call.
    assert_eq!(op.agents().await.unwrap().len(), 1);

    // Reports after registration are a protocol error on that connection only: the master
    // says why (an Error message, or the same reason as the connection's close reason when the
    // close overtakes the message).
    agent.writer.send(&AgentMessage::TaskReports(vec![report(0)])).await.unwrap();
    let why = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match agent.reader.recv::<MasterToAgent>().await {
                Ok(Some(MasterToAgent::Error(e))) => {
                    assert_eq!(e.code, ErrorCode::Unexpected, "{e:?}");
                    return e.message;
                }
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => match agent.conn.close_reason() {
                    Some(quinn::ConnectionError::ApplicationClosed(c)) => {
                        assert_eq!(c.error_code, quinn::VarInt::from_u32(5), "Unexpected: {c:?}");
                        return String::from_utf8_lossy(&c.reason).into_owned();
                    }
                    other => panic!("the stream ended without the master's reason: {other:?}"),
                },
            }
        }
    })
    .await
    .expect("closed in time");
    assert_eq!(why, "agent busy-agent is already registered on this connection");
    assert_eq!(op.agents().await.unwrap().len(), 1, "the master still serves");
    shutdown.cancel();
}

/// Offers too large for one frame together (agents with large attribute sets) reach the
/// framework in several events instead of dropping its connection.
#[tokio::test]
async fn offers_larger_than_a_frame_arrive_in_several_events() {
    let (dir, addr, shutdown) = start_master();
    let tls = dir.path().join("tls");
    // Three agents, each holding 60,000 data blocks: ~420 KB of attributes per offer.
    let blocks = (0..60_000).map(|i| format!("b{i}")).collect::<Vec<_>>().join(",");
    let attributes = Attributes::parse(&format!("blocks:{{{blocks}}}")).unwrap();
    let mut agents = Vec::new();
    for i in 0..3 {
        let mut a = Session::connect(&addr, &TlsFiles::in_dir(&tls, "agent"), Role::Agent).await.unwrap();
        a.writer
            .send(&AgentMessage::Register {
                agent_id: None,
                hostname: format!("data-{i}"),
                resources: Resources::parse("cpus:8;mem:16GiB").unwrap(),
                attributes: attributes.clone(),
                tasks: vec![],
            })
            .await
            .unwrap();
        match a.reader.recv::<MasterToAgent>().await.unwrap() {
            Some(MasterToAgent::Registered { .. }) => {}
            other => panic!("not registered: {other:?}"),
        }
        agents.push(a);
    }
    let mut fw =
        Session::connect(&addr, &TlsFiles::in_dir(&tls, "framework"), Role::Framework).await.unwrap();
    fw.writer
        .send(&SchedulerCall::Subscribe(FrameworkInfo {
            id: None,
            name: "reader".into(),
            role: "*".into(),
            failover_timeout: Duration::from_secs(60),
            hostname: "h".into(),
            user: None,
        }))
        .await
        .unwrap();
    let (mut offered, mut events) = (std::collections::HashSet::new(), 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while offered.len() < 3 {
        let ev = tokio::time::timeout_at(deadline.into(), fw.reader.recv::<SchedulerEvent>())
            .await
            .expect("offers in time")
            .unwrap()
            .expect("the framework's connection stays up");
        if let SchedulerEvent::Offers(o) = ev {
            events += 1;
            assert!(o.iter().all(|o| o.attributes == attributes));
            offered.extend(o.into_iter().map(|o| o.agent_id));
        }
    }
    assert!(events >= 2, "three offers cannot fit in one frame");
    shutdown.cancel();
}

/// A framework that accepts more tasks in one ACCEPT than one message holds gets each of them
/// back as TASK_ERROR with the reason, and its session carries on (it used to end with a frame
/// error).
#[tokio::test]
async fn an_accept_too_large_for_one_message_fails_its_tasks_not_the_framework() {
    use agora_sdk::scheduler::{run, Driver, DriverConfig, Scheduler};
    let (dir, addr, shutdown) = start_master();
    let tls = dir.path().join("tls");
    let mut agent = Session::connect(&addr, &TlsFiles::in_dir(&tls, "agent"), Role::Agent).await.unwrap();
    agent
        .writer
        .send(&AgentMessage::Register {
            agent_id: None,
            hostname: "big".into(),
            resources: Resources::parse("cpus:100000;mem:1TiB").unwrap(),
            attributes: Attributes::default(),
            tasks: vec![],
        })
        .await
        .unwrap();

    struct Greedy {
        launched: usize,
        errors: Vec<TaskStatus>,
    }
    impl Scheduler for Greedy {
        async fn resource_offers(&mut self, driver: &Driver, offers: Vec<Offer>) {
            if self.launched > 0 {
                return driver.decline(offers.iter().map(|o| o.id.clone()).collect(), None);
            }
            let tasks: Vec<TaskInfo> = (0..TASKS).map(|i| report(i).task).collect();
            self.launched = tasks.len();
            driver.launch(offers.iter().map(|o| o.id.clone()).collect(), tasks);
        }
        async fn status_update(&mut self, driver: &Driver, st: &TaskStatus) {
            self.errors.push(st.clone());
            if self.errors.len() == self.launched {
                driver.stop(true);
            }
        }
    }
    let mut s = Greedy { launched: 0, errors: Vec::new() };
    let config = DriverConfig::new(addr.clone(), TlsFiles::in_dir(&tls, "framework"), "greedy");
    tokio::time::timeout(Duration::from_secs(30), run(config, &mut s))
        .await
        .expect("in time")
        .expect("the framework's session ends cleanly");
    // Every launched task, once each, as TASK_ERROR with the reason.
    assert_eq!(s.errors.len(), TASKS);
    for e in &s.errors {
        assert_eq!((e.state, e.reason.as_str()), (TaskState::Error, "launch too large"), "{e:?}");
        assert!(e.message.contains("launch fewer tasks per ACCEPT"), "{}", e.message);
    }
    let mut ids: Vec<&str> = s.errors.iter().map(|e| e.task_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), TASKS, "an update per task, none twice");
    shutdown.cancel();
}
