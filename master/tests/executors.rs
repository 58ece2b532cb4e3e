//! Frameworks' own executors through a real master over QUIC on loopback, with a fake agent:
//! the executor's binary is uploaded as an `Executable` (non-executables are refused), a task
//! naming the executor reaches the agent, framework messages travel both ways (oversized
//! ones refused), and a shutdown goes to the agent whose exit report reaches the framework.

// Test helpers outside `#[test]` functions fail loudly too.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use agora_master::core::MasterConfig;
use agora_master::server::{self, ServerConfig};
use agora_sdk::artifacts;
use agora_sdk::client::{ClientError, OperatorClient, Session};
use agora_sdk::config::{CertPair, ClientConfig};
use agora_sdk::proto::*;
use agora_sdk::tls::TlsFiles;
use agora_sdk::{Attributes, Resources};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        agora_sdk::tls::init(&dir.path().join("tls"), "tester", false).unwrap();
        Fixture { dir }
    }

    fn tls(&self, stem: &str) -> TlsFiles {
        TlsFiles::in_dir(&self.dir.path().join("tls"), stem)
    }

    fn master(&self) -> (SocketAddr, CancellationToken) {
        let shutdown = CancellationToken::new();
        let handle = server::spawn(
            ServerConfig {
                listen: ([127, 0, 0, 1], 0).into(),
                tls: self.tls("master"),
                core: MasterConfig {
                    master_id: "t".into(),
                    allocation_interval: Duration::from_millis(50),
                    ..MasterConfig::default()
                },
                allocator: "drf".into(),
                work_dir: self.dir.path().join("master"),
                max_artifact_size: 1 << 20,
                eviction: agora_master::artifacts::EvictionConfig::default(),
                limits: Default::default(),
            },
            shutdown.clone(),
        )
        .unwrap();
        (handle.addr, shutdown)
    }

    async fn connect(&self, addr: SocketAddr, role: Role) -> Session {
        let stem = match role {
            Role::Agent => "agent",
            Role::Framework => "framework",
            Role::Operator => "operator",
            Role::Master => "master",
        };
        Session::connect(&addr.to_string(), &self.tls(stem), role).await.unwrap()
    }
}

/// The next scheduler event `pick` accepts (others are skipped).
async fn next_event<T>(fw: &mut Session, mut pick: impl FnMut(SchedulerEvent) -> Option<T>) -> T {
    let wait = async {
        loop {
            match fw.reader.recv::<SchedulerEvent>().await.unwrap() {
                Some(e) => {
                    if let Some(t) = pick(e) {
                        return t;
                    }
                }
                None => panic!("framework connection closed"),
            }
        }
    };
    tokio::time::timeout(WAIT, wait).await.expect("scheduler event in time")
}

/// The next master message to the agent `pick` accepts (heartbeat acks and the like skipped).
async fn next_to_agent<T>(agent: &mut Session, mut pick: impl FnMut(MasterToAgent) -> Option<T>) -> T {
    let wait = async {
        loop {
            match agent.reader.recv::<MasterToAgent>().await.unwrap() {
                Some(m) => {
                    if let Some(t) = pick(m) {
                        return t;
                    }
                }
                None => panic!("agent connection closed"),
            }
        }
    };
    tokio::time::timeout(WAIT, wait).await.expect("agent message in time")
}

#[tokio::test]
async fn an_executor_is_launched_messaged_and_shut_down_over_quic() {
    let fx = Fixture::new();
    let (addr, shutdown) = fx.master();
    let mut fw = fx.connect(addr, Role::Framework).await;

    // The executor's program: a script is fine, plain text is not.
    let script = b"#!/bin/sh\nexec sleep 1000\n".to_vec();
    let exe =
        artifacts::upload_bytes(&fw.conn, ArtifactKind::Executable, "my-executor", &script).await.unwrap();
    let e = match artifacts::upload_bytes(&fw.conn, ArtifactKind::Executable, "readme", b"hello").await {
        Err(ClientError::Refused(e)) => e,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert_eq!(e.code, ErrorCode::Invalid);
    assert_eq!(
        e.message,
        "readme: not an executable (an ELF binary or a `#!` script); it starts with \"hell\""
    );

    let mut agent = fx.connect(addr, Role::Agent).await;
    agent
        .writer
        .send(&AgentMessage::Register {
            agent_id: None,
            hostname: "fake".into(),
            resources: Resources::parse("cpus:2;mem:1GiB").unwrap(),
            attributes: Attributes::default(),
            tasks: vec![],
        })
        .await
        .unwrap();
    let agent_id = next_to_agent(&mut agent, |m| {
        if let MasterToAgent::Registered { agent_id, .. } = m {
            Some(agent_id)
        } else {
            None
        }
    })
    .await;
    let info = FrameworkInfo {
        id: None,
        name: "executor-test".into(),
        role: "*".into(),
        failover_timeout: Duration::from_secs(60),
        hostname: "h".into(),
        user: None,
    };
    fw.writer.send(&SchedulerCall::Subscribe(info)).await.unwrap();
    let framework_id = next_event(&mut fw, |e| {
        if let SchedulerEvent::Subscribed { framework_id, .. } = e {
            Some(framework_id)
        } else {
            None
        }
    })
    .await;
    let offer =
        next_event(&mut fw, |e| if let SchedulerEvent::Offers(o) = e { o.into_iter().next() } else { None })
            .await;
    assert_eq!(offer.resources, Resources::parse("cpus:2;mem:1GiB").unwrap());

    let executor = ExecutorInfo {
        executor_id: ExecutorId::new("e1"),
        name: "my executor".into(),
        command: CommandInfo { argv: vec!["./my-executor".into()], shell: false, env: vec![] },
        resources: Resources::parse("cpus:0.5;mem:128MiB").unwrap(),
        fetch: vec![FetchInfo { artifact: exe.clone(), path: "my-executor".into(), executable: true }],
    };
    let task = TaskInfo {
        task_id: TaskId::new("t1"),
        name: "t1".into(),
        resources: Resources::parse("cpus:1;mem:256MiB").unwrap(),
        kind: TaskKind::Executor(Box::new(ExecutorTask {
            executor: executor.clone(),
            data: b"work".to_vec(),
        })),
        kill_grace: None,
        user: None,
    };
    fw.writer
        .send(&SchedulerCall::Accept {
            offer_ids: vec![offer.id],
            operations: vec![Operation::Launch { tasks: vec![task.clone()] }],
            refuse_seconds: Some(3600.0),
        })
        .await
        .unwrap();
    let (run_fw, run) = next_to_agent(&mut agent, |m| match m {
        MasterToAgent::RunTask { framework_id, task } => Some((framework_id, task)),
        _ => None,
    })
    .await;
    assert_eq!(run_fw, framework_id);
    assert_eq!(run, task);

    // The operator sees the executor's resources as used.
    let tls = fx.dir.path().join("tls");
    let config = ClientConfig {
        master: addr.to_string(),
        ca: tls.join("ca.pem"),
        operator: Some(CertPair { cert: tls.join("operator.pem"), key: tls.join("operator-key.pem") }),
        framework: None,
        source: fx.dir.path().join("client.toml"),
    };
    let mut op = OperatorClient::connect(&config).await.unwrap();
    let agents = op.agents().await.unwrap();
    assert_eq!(agents[0].used, Resources::parse("cpus:1.5;mem:384MiB").unwrap());
    let tasks = op.tasks().await.unwrap();
    assert_eq!(tasks[0].executor_id, ExecutorId::new("e1"));

    // Scheduler → executor, under the connection's framework id.
    fw.writer
        .send(&SchedulerCall::Message {
            agent_id: agent_id.clone(),
            executor_id: ExecutorId::new("e1"),
            data: b"ping".to_vec(),
        })
        .await
        .unwrap();
    let relayed = next_to_agent(&mut agent, |m| match m {
        m @ MasterToAgent::FrameworkMessage { .. } => Some(m),
        _ => None,
    })
    .await;
    assert_eq!(
        relayed,
        MasterToAgent::FrameworkMessage {
            framework_id: framework_id.clone(),
            executor_id: ExecutorId::new("e1"),
            data: b"ping".to_vec()
        }
    );
    // Too large: refused, the connection stays.
    fw.writer
        .send(&SchedulerCall::Message {
            agent_id: agent_id.clone(),
            executor_id: ExecutorId::new("e1"),
            data: vec![0; MAX_FRAMEWORK_MESSAGE + 1],
        })
        .await
        .unwrap();
    let e = next_event(&mut fw, |e| if let SchedulerEvent::Error(e) = e { Some(e) } else { None }).await;
    assert_eq!(e.code, ErrorCode::TooLarge);
    assert_eq!(
        e.message,
        format!(
            "framework message of {} bytes to executor e1 is over the limit of {MAX_FRAMEWORK_MESSAGE} bytes",
            MAX_FRAMEWORK_MESSAGE + 1
        )
    );
    // To an agent that does not exist.
    fw.writer
        .send(&SchedulerCall::Message {
            agent_id: AgentId::new("t-A99"),
            executor_id: ExecutorId::new("e1"),
            data: vec![],
        })
        .await
        .unwrap();
    let e = next_event(&mut fw, |e| if let SchedulerEvent::Error(e) = e { Some(e) } else { None }).await;
    assert_eq!(e, WireError::new(ErrorCode::NotFound, "no agent t-A99"));

    // Executor → scheduler.
    agent
        .writer
        .send(&AgentMessage::FrameworkMessage {
            framework_id: framework_id.clone(),
            executor_id: ExecutorId::new("e1"),
            data: b"pong".to_vec(),
        })
        .await
        .unwrap();
    let m = next_event(&mut fw, |e| matches!(e, SchedulerEvent::Message { .. }).then_some(e)).await;
    assert_eq!(
        m,
        SchedulerEvent::Message {
            agent_id: agent_id.clone(),
            executor_id: ExecutorId::new("e1"),
            data: b"pong".to_vec()
        }
    );

    // Shutdown: relayed; the exit report frees the executor's resources and reaches the
    // framework.
    fw.writer
        .send(&SchedulerCall::ShutdownExecutor {
            agent_id: agent_id.clone(),
            executor_id: ExecutorId::new("e1"),
        })
        .await
        .unwrap();
    let m =
        next_to_agent(&mut agent, |m| matches!(m, MasterToAgent::ShutdownExecutor { .. }).then_some(m)).await;
    assert_eq!(
        m,
        MasterToAgent::ShutdownExecutor {
            framework_id: framework_id.clone(),
            executor_id: ExecutorId::new("e1")
        }
    );
    agent
        .writer
        .send(&AgentMessage::ExecutorExited {
            framework_id: framework_id.clone(),
            executor_id: ExecutorId::new("e1"),
            message: "shut down".into(),
        })
        .await
        .unwrap();
    let m = next_event(&mut fw, |e| matches!(e, SchedulerEvent::ExecutorExited { .. }).then_some(e)).await;
    assert_eq!(
        m,
        SchedulerEvent::ExecutorExited {
            agent_id: agent_id.clone(),
            executor_id: ExecutorId::new("e1"),
            message: "shut down".into()
        }
    );
    let agents = op.agents().await.unwrap();
    assert_eq!(agents[0].used, Resources::parse("cpus:1;mem:256MiB").unwrap());
    shutdown.cancel();
}
