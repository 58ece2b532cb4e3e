//! The master's artifact store over real QUIC on loopback: uploads (checks, dedup, limits),
//! fetches by agents, role checks, persistence across a restart, and the core's refusal of a
//! Wasm launch whose module is not stored.

// Test helpers outside `#[test]` functions fail loudly too.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use agora_master::core::{Action, Event, Master, MasterConfig};
use agora_master::server::{self, ServerConfig};
use agora_sdk::artifacts::{self, ArtifactError};
use agora_sdk::client::{ClientError, Session};
use agora_sdk::frame::{FrameReader, FrameWriter};
use agora_sdk::proto::*;
use agora_sdk::tls::TlsFiles;
use agora_sdk::{Attributes, Resources};
use tokio_util::sync::CancellationToken;

const HELLO_WAT: &str = r#"
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 8) "hello\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 8))
    (i32.store (i32.const 4) (i32.const 6))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 20)))))
"#;

fn hello_wasm() -> Vec<u8> {
    wat::parse_str(HELLO_WAT).unwrap()
}

/// A temp dir with the cluster's certificates; masters get work dirs inside it.
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

    fn master(&self, max_artifact_size: u64) -> (SocketAddr, CancellationToken) {
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
                max_artifact_size,
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

fn refused(r: Result<impl std::fmt::Debug, ClientError>) -> WireError {
    match r {
        Err(ClientError::Refused(e)) => e,
        other => panic!("expected a refusal from the master, got {other:?}"),
    }
}

/// An upload by hand: the first reply, and (after `Send`) the bytes and the final reply.
async fn raw_upload(conn: &quinn::Connection, req: UploadRequest, bytes: &[u8]) -> Vec<UploadReply> {
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut w = FrameWriter::new(send);
    let mut r = FrameReader::new(recv);
    w.send(&StreamRequest::Upload(req)).await.unwrap();
    let first = r.recv::<UploadReply>().await.unwrap().unwrap();
    let mut replies = vec![first.clone()];
    if first == UploadReply::Send {
        let mut send = w.into_inner();
        // The master may stop reading early (overrun): that is its answer, not a test failure.
        let _ = send.write_all(bytes).await;
        let _ = send.finish();
        replies.push(r.recv::<UploadReply>().await.unwrap().unwrap());
    }
    replies
}

fn upload_req(kind: ArtifactKind, name: &str, bytes: &[u8]) -> UploadRequest {
    UploadRequest { kind, digest: Digest::of(bytes), size: bytes.len() as u64, name: name.into() }
}

#[tokio::test]
async fn uploads_are_checked_deduplicated_and_fetched_by_agents() {
    let fx = Fixture::new();
    let (addr, shutdown) = fx.master(2 << 20);
    let fw = fx.connect(addr, Role::Framework).await;
    let agent = fx.connect(addr, Role::Agent).await;
    let op = fx.connect(addr, Role::Operator).await;

    // A valid WASI command module: stored.
    let wasm = hello_wasm();
    let path = fx.dir.path().join("hello.wasm");
    std::fs::write(&path, &wasm).unwrap();
    let module = artifacts::upload(&fw.conn, ArtifactKind::WasmModule, "hello.wasm", &path).await.unwrap();
    assert_eq!(module, ArtifactRef { digest: Digest::of(&wasm), size: wasm.len() as u64 });
    assert!(fx.dir.path().join("master/artifacts/sha256").join(module.digest.as_str()).is_file());

    // The same again: present at once, no bytes asked for.
    let replies = raw_upload(&fw.conn, upload_req(ArtifactKind::WasmModule, "hello.wasm", &wasm), &[]).await;
    assert_eq!(replies, vec![UploadReply::Present]);
    assert_eq!(
        artifacts::upload_bytes(&op.conn, ArtifactKind::WasmModule, "again.wasm", &wasm).await.unwrap(),
        module
    );

    // Not Wasm.
    let e =
        refused(artifacts::upload_bytes(&fw.conn, ArtifactKind::WasmModule, "run.sh", b"#!/bin/sh\n").await);
    assert_eq!(e.code, ErrorCode::Invalid);
    assert!(e.message.starts_with("run.sh: not a WebAssembly module"), "{}", e.message);
    assert!(e.message.contains("magic"), "{}", e.message);

    // An import Agora does not provide.
    let bad = wat::parse_str(
        r#"(module (import "env" "host_exec" (func)) (memory (export "memory") 1) (func (export "_start")))"#,
    )
    .unwrap();
    let e = refused(artifacts::upload_bytes(&fw.conn, ArtifactKind::WasmModule, "evil.wasm", &bad).await);
    assert!(e.message.starts_with("evil.wasm: "), "{}", e.message);
    assert!(e.message.contains("env::host_exec"), "{}", e.message);

    // A library, not a command.
    let lib = wat::parse_str(r#"(module (func (export "add")))"#).unwrap();
    let e = refused(artifacts::upload_bytes(&fw.conn, ArtifactKind::WasmModule, "lib.wasm", &lib).await);
    assert!(e.message.contains("_start"), "{}", e.message);

    // Bytes that do not hash to the declared digest.
    let archive = b"pretend this is a tar archive".to_vec();
    let lie = UploadRequest {
        digest: Digest::of(b"something else"),
        ..upload_req(ArtifactKind::Archive, "data.tar", &archive)
    };
    let replies = raw_upload(&fw.conn, lie, &archive).await;
    match &replies[..] {
        [UploadReply::Send, UploadReply::Error(e)] => {
            assert_eq!(e.code, ErrorCode::Invalid);
            assert!(e.message.starts_with("data.tar: the bytes hash to"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    // More bytes than declared.
    let mut long = upload_req(ArtifactKind::Archive, "long.tar", &archive);
    long.size -= 1;
    let replies = raw_upload(&fw.conn, long, &archive).await;
    assert!(
        matches!(&replies[..], [UploadReply::Send, UploadReply::Error(e)] if e.code == ErrorCode::TooLarge),
        "{replies:?}"
    );

    // Over the master's limit: refused before any byte is sent.
    let big = vec![7u8; 3 << 20];
    let replies = raw_upload(&fw.conn, upload_req(ArtifactKind::Archive, "big.tar", &big), &[]).await;
    match &replies[..] {
        [UploadReply::Error(e)] => {
            assert_eq!(e.code, ErrorCode::TooLarge);
            assert_eq!(e.message, "big.tar is 3MiB, over the master's 2MiB artifact limit");
        }
        other => panic!("{other:?}"),
    }

    // An archive: only size and digest are checked.
    let archive_ref =
        artifacts::upload_bytes(&op.conn, ArtifactKind::Archive, "data.tar", &archive).await.unwrap();

    // Agents fetch identical bytes.
    let dest = fx.dir.path().join("fetched.wasm");
    let n = artifacts::fetch(&agent.conn, &module.digest, &dest, 1 << 20).await.unwrap();
    assert_eq!(n, wasm.len() as u64);
    assert_eq!(std::fs::read(&dest).unwrap(), wasm);
    let dest2 = fx.dir.path().join("fetched.tar");
    artifacts::fetch(&agent.conn, &archive_ref.digest, &dest2, 1 << 20).await.unwrap();
    assert_eq!(std::fs::read(&dest2).unwrap(), archive);

    // Unknown digest: NotFound, and no file.
    let missing = fx.dir.path().join("missing");
    let e = refused(artifacts::fetch(&agent.conn, &Digest::of(b"nope"), &missing, 1 << 20).await);
    assert_eq!(e.code, ErrorCode::NotFound);
    // Over the fetcher's own limit: refused, no file.
    let r = artifacts::fetch(&agent.conn, &module.digest, &missing, 10).await;
    assert!(matches!(r, Err(ClientError::Artifact(ArtifactError::TooLarge { .. }))), "{r:?}");
    let leftovers: Vec<_> = std::fs::read_dir(fx.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') || n == "missing")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Roles: frameworks and operators do not fetch; agents do not upload.
    let e = refused(artifacts::fetch(&fw.conn, &module.digest, &missing, 1 << 20).await);
    assert_eq!(e.code, ErrorCode::Unauthorized);
    let e = refused(artifacts::fetch(&op.conn, &module.digest, &missing, 1 << 20).await);
    assert_eq!(e.code, ErrorCode::Unauthorized);
    let e = refused(artifacts::upload_bytes(&agent.conn, ArtifactKind::Archive, "x.tar", b"x").await);
    assert_eq!(e.code, ErrorCode::Unauthorized);
    assert!(!missing.exists());

    // The connections are still fine after all those refusals.
    artifacts::fetch(&agent.conn, &module.digest, &dest, 1 << 20).await.unwrap();
    shutdown.cancel();
}

/// A fake agent and a framework on real connections: launches one Wasm task naming `module`
/// and reports whether the master sent it to the agent (`Ok`) or refused it (`Err(message)`).
async fn launch_wasm(fx: &Fixture, addr: SocketAddr, module: &ArtifactRef) -> Result<(), String> {
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
    let mut fw = fx.connect(addr, Role::Framework).await;
    let info = FrameworkInfo {
        id: None,
        name: "wasm-test".into(),
        role: "*".into(),
        failover_timeout: Duration::from_secs(60),
        hostname: "h".into(),
        user: None,
    };
    fw.writer.send(&SchedulerCall::Subscribe(info)).await.unwrap();
    let offer = loop {
        match fw.reader.recv::<SchedulerEvent>().await.unwrap() {
            Some(SchedulerEvent::Offers(o)) if !o.is_empty() => break o[0].clone(),
            Some(_) => {}
            None => panic!("framework connection closed"),
        }
    };
    let task = TaskInfo {
        task_id: TaskId::new("w1"),
        name: "hello".into(),
        resources: Resources::parse("cpus:1;mem:64MiB").unwrap(),
        kind: TaskKind::Wasm(Box::new(WasmInfo {
            module: module.clone(),
            args: vec!["hello.wasm".into()],
            env: vec![],
            dirs: vec![],
            fuel: None,
            timeout: None,
        })),
        kill_grace: None,
        user: None,
    };
    fw.writer
        .send(&SchedulerCall::Accept {
            offer_ids: vec![offer.id],
            operations: vec![Operation::Launch { tasks: vec![task] }],
            refuse_seconds: None,
        })
        .await
        .unwrap();
    let outcome = async {
        loop {
            tokio::select! {
                m = agent.reader.recv::<MasterToAgent>() => match m.unwrap() {
                    Some(MasterToAgent::RunTask { .. }) => return Ok(()),
                    Some(_) => {}
                    None => panic!("agent connection closed"),
                },
                e = fw.reader.recv::<SchedulerEvent>() => match e.unwrap() {
                    Some(SchedulerEvent::Update(s)) if s.state == TaskState::Error => return Err(s.message),
                    Some(_) => {}
                    None => panic!("framework connection closed"),
                },
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), outcome).await.expect("launch outcome in time")
}

#[tokio::test]
async fn the_store_survives_a_restart_and_launches_need_stored_modules() {
    let fx = Fixture::new();
    let wasm = hello_wasm();
    let (addr, shutdown) = fx.master(64 << 20);
    let fw = fx.connect(addr, Role::Framework).await;
    let unknown = ArtifactRef { digest: Digest::of(b"never uploaded"), size: 3 };
    let e = launch_wasm(&fx, addr, &unknown).await.unwrap_err();
    assert_eq!(
        e,
        format!("task w1: module {} is not in the master's artifact store; upload it first", unknown.digest)
    );
    let module =
        artifacts::upload_bytes(&fw.conn, ArtifactKind::WasmModule, "hello.wasm", &wasm).await.unwrap();
    // Known to the core as soon as the upload is answered.
    launch_wasm(&fx, addr, &module).await.unwrap();
    shutdown.cancel();
    // The first master is gone (it closed our connection on its way out) before the next one
    // opens the same work dir.
    let closed =
        tokio::time::timeout(Duration::from_secs(10), fw.conn.closed()).await.expect("closed in time");
    assert!(matches!(closed, quinn::ConnectionError::ApplicationClosed(_)), "{closed:?}");
    drop(fw);

    // A new master on the same work dir: the artifact is there, for fetches and launches.
    let (addr, shutdown) = fx.master(64 << 20);
    let agent = fx.connect(addr, Role::Agent).await;
    let dest = fx.dir.path().join("after-restart.wasm");
    artifacts::fetch(&agent.conn, &module.digest, &dest, 64 << 20).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), wasm);
    launch_wasm(&fx, addr, &module).await.unwrap();
    let fw = fx.connect(addr, Role::Framework).await;
    let replies = raw_upload(&fw.conn, upload_req(ArtifactKind::WasmModule, "hello.wasm", &wasm), &[]).await;
    assert_eq!(replies, vec![UploadReply::Present]);
    shutdown.cancel();
}

/// The sans-IO core alone: a Wasm launch naming a module or a directory archive the store
/// does not hold is TASK_ERROR `invalid launch`; once stored, the same launch goes out.
#[test]
fn the_core_refuses_wasm_launches_of_unknown_artifacts() {
    let t0 = Instant::now();
    let mut m =
        Master::new(MasterConfig { agent_timeout: Duration::from_secs(3600), ..MasterConfig::default() }, t0);
    let mut now = t0;
    let (agent, fw) = (1, 2);
    m.handle(
        now,
        Event::Agent {
            conn: agent,
            principal: "a".into(),
            msg: AgentMessage::Register {
                agent_id: None,
                hostname: "h".into(),
                resources: Resources::parse("cpus:8;mem:8GiB").unwrap(),
                attributes: Attributes::default(),
                tasks: vec![],
            },
        },
    );
    let info = FrameworkInfo {
        id: None,
        name: "f".into(),
        role: "*".into(),
        failover_timeout: Duration::from_secs(60),
        hostname: "h".into(),
        user: None,
    };
    m.handle(now, Event::Framework { conn: fw, principal: "f".into(), call: SchedulerCall::Subscribe(info) });

    let next_offer = |m: &mut Master, now: &mut Instant| -> Offer {
        for _ in 0..100 {
            while let Some(a) = m.poll_action() {
                if let Action::ToFramework { event: SchedulerEvent::Offers(o), .. } = a {
                    if let Some(o) = o.into_iter().next() {
                        return o;
                    }
                }
            }
            *now = m.poll_timeout().unwrap_or(*now).max(*now);
            m.handle_timeout(*now);
        }
        panic!("no offer");
    };
    let module = ArtifactRef { digest: Digest::of(b"module"), size: 6 };
    let archive = ArtifactRef { digest: Digest::of(b"archive"), size: 7 };
    let wasm_task = |id: &str| TaskInfo {
        task_id: TaskId::new(id),
        name: id.into(),
        resources: Resources::parse("cpus:1;mem:64MiB").unwrap(),
        kind: TaskKind::Wasm(Box::new(WasmInfo {
            module: module.clone(),
            args: vec!["m.wasm".into()],
            env: vec![],
            dirs: vec![DirMount { archive: archive.clone(), guest: "/data".into() }],
            fuel: None,
            timeout: None,
        })),
        kill_grace: None,
        user: None,
    };
    let launch = |m: &mut Master, now: &mut Instant, id: &str| -> Result<(), String> {
        let offer = next_offer(m, now);
        m.handle(
            *now,
            Event::Framework {
                conn: fw,
                principal: "f".into(),
                call: SchedulerCall::Accept {
                    offer_ids: vec![offer.id],
                    operations: vec![Operation::Launch { tasks: vec![wasm_task(id)] }],
                    refuse_seconds: Some(0.0),
                },
            },
        );
        let mut result = None;
        while let Some(a) = m.poll_action() {
            match a {
                Action::ToAgent { msg: MasterToAgent::RunTask { task, .. }, .. }
                    if task.task_id.as_str() == id =>
                {
                    result = Some(Ok(()));
                }
                Action::ToFramework { event: SchedulerEvent::Update(s), .. }
                    if s.state == TaskState::Error =>
                {
                    assert_eq!(s.reason, "invalid launch");
                    result = Some(Err(s.message));
                }
                _ => {}
            }
        }
        result.expect("a launch outcome")
    };

    let e = launch(&mut m, &mut now, "t1").unwrap_err();
    assert_eq!(
        e,
        format!("task t1: module {} is not in the master's artifact store; upload it first", module.digest)
    );
    m.artifact_stored(module.digest.clone());
    let e = launch(&mut m, &mut now, "t2").unwrap_err();
    assert!(
        e.contains(archive.digest.as_str()) && e.contains("/data") && e.contains("upload it first"),
        "{e}"
    );
    m.artifact_stored(archive.digest.clone());
    launch(&mut m, &mut now, "t3").unwrap();
}
