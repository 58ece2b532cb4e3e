//! ACLs (`agora master --acls`): a real master and agent on loopback, frameworks and operator
//! sessions with certificates of several principals.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_master::acl::Acls;
use agora_master::core::MasterConfig;
use agora_sdk::client::{ClientError, OperatorClient, Session};
use agora_sdk::config::{CertPair, ClientConfig};
use agora_sdk::proto::*;
use agora_sdk::scheduler::{self, DriverConfig};
use common::*;

const ACLS: &str = r#"
[principals.alice]
roles = ["analytics"]
task_users = ["daemon", "root"]
upload_quota = "1MiB"
[principals.bob]
roles = ["*"]
[principals.ops]
operator = true
"#;

fn acl_master(text: &str) -> MasterConfig {
    MasterConfig { acls: Some(Arc::new(Acls::parse(text).expect("acls"))), ..fast_master() }
}

/// A cluster with `ACLS`, one agent, and certificates for alice and bob (frameworks) and ops
/// (operator).
async fn cluster() -> TestCluster {
    let c = TestCluster::start_with(1, "cpus:4;mem:2GiB", acl_master(ACLS)).await;
    issue(&c);
    c
}

fn issue(c: &TestCluster) {
    let dir = c.dir.path().join("tls");
    for (role, name) in [(Role::Framework, "alice"), (Role::Framework, "bob"), (Role::Operator, "ops")] {
        agora_sdk::tls::issue(&dir, role, name, name).expect("issue");
    }
}

fn framework(c: &TestCluster, principal: &str, name: &str, role: &str) -> DriverConfig {
    let mut cfg = DriverConfig::new(c.master.addr.to_string(), c.tls(principal), name);
    cfg.framework.role = role.into();
    cfg.framework.failover_timeout = Duration::from_secs(30);
    cfg
}

/// A client config with only a framework certificate (as `agora dev`'s client.toml), or
/// only an operator one.
fn client(c: &TestCluster, stem: &str, role: Role) -> ClientConfig {
    let files = c.tls(stem);
    let pair = Some(CertPair { cert: files.cert, key: files.key });
    let (operator, framework) = if role == Role::Operator { (pair, None) } else { (None, pair) };
    ClientConfig {
        master: c.master.addr.to_string(),
        ca: files.ca,
        operator,
        framework,
        source: c.dir.path().join("client.toml"),
    }
}

/// Runs a framework that the master must refuse; its error.
async fn refused(cfg: DriverConfig) -> WireError {
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let mut probe = Probe::new(tx);
    let run = scheduler::run(cfg, &mut probe);
    match tokio::time::timeout(Duration::from_secs(20), run).await.expect("refused in time") {
        Err(ClientError::Refused(e)) => e,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn refusal(e: ClientError) -> WireError {
    match e {
        ClientError::Refused(w) => w,
        other => panic!("expected a refusal, got {other}"),
    }
}

/// An offer already held (the master may re-offer what a task freed before the framework has
/// read that task's last update), else the next one.
async fn held_or_next_offer(fw: &mut ProbeFramework) -> Offer {
    match fw.held.first().cloned() {
        Some(offer) => offer,
        None => fw.offer().await,
    }
}

/// Launches one task on the first offer; its terminal update.
async fn launch(fw: &mut ProbeFramework, task: TaskInfo) -> TaskStatus {
    let offer = held_or_next_offer(fw).await;
    fw.held.clear();
    let id = task.task_id.clone();
    fw.driver().launch(vec![offer.id], vec![task]);
    fw.until(|s| match s {
        Seen::Update(u) if u.task_id == id && u.state.is_terminal() => Some(u.clone()),
        _ => None,
    })
    .await
}

/// Launches a long task on the first offer and waits until it runs.
async fn start_sleeper(fw: &mut ProbeFramework, id: &str) {
    let offer = held_or_next_offer(fw).await;
    fw.held.clear();
    fw.driver().launch(vec![offer.id], vec![sh_task(id, "echo hi; sleep 600", "cpus:0.1;mem:32MiB")]);
    fw.update_for(id, TaskState::Running).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_role_not_granted_is_denied_naming_principal_and_action() {
    let c = cluster().await;
    let e = refused(framework(&c, "alice", "etl-job", "etl")).await;
    assert_eq!(e.code, ErrorCode::Unauthorized);
    assert!(e.message.contains("principal `alice` may not subscribe as role `etl`"), "{}", e.message);
    // The default role is a role like any other: alice was not granted it.
    let e = refused(framework(&c, "alice", "no-role", "*")).await;
    assert!(e.message.contains("may not subscribe as role `*`"), "{}", e.message);
    // A principal the file does not name has no grant at all.
    let e = refused(framework(&c, "framework", "tester", "*")).await;
    assert!(e.message.contains("principal `tester`"), "{}", e.message);
    // A framework user that is not granted is refused at subscription.
    let mut cfg = framework(&c, "alice", "as-games", "analytics");
    cfg.framework.user = Some("games".into());
    let e = refused(cfg).await;
    assert!(e.message.contains("principal `alice` may not run tasks as user `games`"), "{}", e.message);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_granted_role_works_and_task_users_are_checked_by_master_and_agent() {
    let c = cluster().await;
    let mut alice = ProbeFramework::start(framework(&c, "alice", "analytics-job", "analytics")).await;
    // Not granted: refused by the master before any agent sees it.
    let mut t = sh_task("as-games", "true", "cpus:0.1;mem:32MiB");
    t.user = Some("games".into());
    let st = launch(&mut alice, t).await;
    assert_eq!((st.state, st.reason.as_str()), (TaskState::Error, "invalid launch"));
    assert!(st.message.contains("principal `alice` may not run tasks as user `games`"), "{}", st.message);
    if root_or_skip("switching task users") {
        // Granted, and a real user of the node: the task runs as that user.
        let mut t = sh_task("as-daemon", "[ \"$(id -un)\" = daemon ]", "cpus:0.1;mem:32MiB");
        t.user = Some("daemon".into());
        let st = launch(&mut alice, t).await;
        assert_eq!(st.state, TaskState::Finished, "{}: {}", st.reason, st.message);
        // Granted by a careless ACL, still refused by the agent: never root.
        let mut t = sh_task("as-root", "true", "cpus:0.1;mem:32MiB");
        t.user = Some("root".into());
        let st = launch(&mut alice, t).await;
        assert_eq!((st.state, st.reason.as_str()), (TaskState::Error, "invalid task user"));
        assert!(st.message.contains("root (uid 0)"), "{}", st.message);
    }
    alice.driver().stop(true);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_past_the_quota_is_refused() {
    let c = cluster().await;
    let script = |fill: u8| {
        let mut b = b"#!/bin/sh\n#".to_vec();
        b.resize(600 * 1024, fill);
        b
    };
    let alice = Session::connect(&c.master.addr.to_string(), &c.tls("alice"), Role::Framework).await.unwrap();
    let up = |bytes: Vec<u8>| {
        let conn = alice.conn.clone();
        async move { agora_sdk::artifacts::upload_bytes(&conn, ArtifactKind::Executable, "a.sh", &bytes).await }
    };
    up(script(b'a')).await.expect("600 KiB of a 1 MiB quota");
    // The same bytes again cost nothing: they are present.
    up(script(b'a')).await.expect("present");
    let e = refusal(up(script(b'b')).await.expect_err("past the quota"));
    assert_eq!(e.code, ErrorCode::Unauthorized);
    assert!(
        e.message.contains("principal `alice` may not upload") && e.message.contains("quota"),
        "{}",
        e.message
    );
    // bob may not upload at all.
    let bob = Session::connect(&c.master.addr.to_string(), &c.tls("bob"), Role::Framework).await.unwrap();
    let e = agora_sdk::artifacts::upload_bytes(&bob.conn, ArtifactKind::Executable, "b.sh", b"#!/bin/sh\n")
        .await
        .expect_err("bob has no upload grant");
    assert!(refusal(e).message.contains("principal `bob` may not upload artifacts"));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_non_operator_sees_and_acts_on_its_own_frameworks_only() {
    let c = cluster().await;
    let mut alice = ProbeFramework::start(framework(&c, "alice", "alice-job", "analytics")).await;
    let mut bob = ProbeFramework::start(framework(&c, "bob", "bob-job", "*")).await;
    start_sleeper(&mut alice, "alice-task").await;
    start_sleeper(&mut bob, "bob-task").await;

    // alice's framework certificate, as in a client.toml without the operator certificate.
    let mut me = OperatorClient::connect(&client(&c, "alice", Role::Framework)).await.expect("alice session");
    let fws = me.frameworks().await.unwrap();
    assert_eq!(fws.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(), ["alice-job"]);
    let tasks = me.tasks().await.unwrap();
    assert_eq!(tasks.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), ["alice-task"]);
    let e = refusal(me.kill(&TaskId::new("bob-task")).await.expect_err("not hers"));
    assert!(e.message.contains("principal `alice` may not kill other principals' tasks"), "{}", e.message);
    let e = refusal(
        me.output(&TaskId::new("bob-task"), OutputStream::Stdout, false).await.err().expect("not hers"),
    );
    assert!(e.message.contains("principal `alice` may not read other principals'"), "{}", e.message);
    let e = refusal(
        me.task_history(bob.id.as_ref().unwrap(), &TaskId::new("bob-task")).await.expect_err("not hers"),
    );
    assert!(e.message.contains("principal `alice` may not list"), "{}", e.message);
    // Operator rights: none of them.
    let agent = me.agents().await.unwrap()[0].id.clone();
    let e = refusal(me.drain_agent(&agent, None, false).await.expect_err("no drain right"));
    assert!(e.message.contains("principal `alice` may not drain or undrain agents"), "{}", e.message);
    let (policy, _) = me.policy().await.unwrap();
    let e = refusal(me.set_policy(policy.clone()).await.expect_err("no policy right"));
    assert!(e.message.contains("may not set the allocation policy"), "{}", e.message);
    // Her own task: she may read and kill it.
    assert!(me.output(&TaskId::new("alice-task"), OutputStream::Stdout, false).await.is_ok());
    me.kill(&TaskId::new("alice-task")).await.expect("her own task");
    alice.update_for("alice-task", TaskState::Killed).await;

    // An operator certificate of a principal the file does not name holds no right either.
    let mut nobody = OperatorClient::connect(&client(&c, "operator", Role::Operator)).await.unwrap();
    assert!(nobody.frameworks().await.unwrap().is_empty());
    assert!(nobody.kill(&TaskId::new("bob-task")).await.is_err());

    // ops (operator = true) sees everything and may kill bob's task.
    let mut ops = OperatorClient::connect(&client(&c, "ops", Role::Operator)).await.expect("ops session");
    assert_eq!(ops.frameworks().await.unwrap().len(), 2);
    assert!(ops.tasks().await.unwrap().iter().any(|t| t.id.as_str() == "bob-task"));
    assert!(ops.output(&TaskId::new("bob-task"), OutputStream::Stdout, false).await.is_ok());
    ops.drain_agent(&agent, None, false).await.expect("ops may drain");
    ops.undrain_agent(&agent).await.expect("ops may undrain");
    ops.set_policy(policy).await.expect("ops may set the policy");
    ops.kill(&TaskId::new("bob-task")).await.expect("ops may kill any task");
    bob.update_for("bob-task", TaskState::Killed).await;
    alice.driver().stop(true);
    bob.driver().stop(true);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failover_from_another_principal_is_refused() {
    let c = cluster().await;
    let alice = ProbeFramework::start(framework(&c, "alice", "alice-job", "analytics")).await;
    let id = alice.id.clone().unwrap();
    // bob names alice's framework id (the role check passes: bob may use `*`... and alice's
    // role is checked for the failover, which bob does not hold either way).
    let mut cfg = framework(&c, "bob", "hijack", "*");
    cfg.framework.id = Some(id.clone());
    let e = refused(cfg).await;
    assert_eq!(e.code, ErrorCode::Unauthorized);
    assert!(e.message.contains("bob") && e.message.contains("analytics"), "{}", e.message);
    // With the role granted too, the principal still has to match.
    let both = ACLS.replace("roles = [\"*\"]", "roles = [\"*\", \"analytics\"]");
    let c2 = TestCluster::start_with(1, "cpus:1;mem:1GiB", acl_master(&both)).await;
    issue(&c2);
    let alice2 = ProbeFramework::start(framework(&c2, "alice", "alice-job", "analytics")).await;
    let mut cfg = framework(&c2, "bob", "hijack", "analytics");
    cfg.framework.id = alice2.id.clone();
    let e = refused(cfg).await;
    assert!(e.message.contains("belongs to principal alice, not bob"), "{}", e.message);
    alice.driver().stop(true);
    alice2.driver().stop(true);
    c2.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_acls_everything_is_allowed_and_a_framework_certificate_sees_its_own() {
    let c = TestCluster::start(1, "cpus:2;mem:1GiB").await;
    issue(&c);
    // Any role, any granted-or-not user name is the master's to pass.
    let mut alice = ProbeFramework::start(framework(&c, "alice", "alice-job", "whatever")).await;
    let mut t = sh_task("t", "true", "cpus:0.1;mem:32MiB");
    t.user = Some("nobody".into());
    let st = launch(&mut alice, t).await;
    assert_eq!(st.state, TaskState::Finished, "{}: {}", st.reason, st.message);
    let _bob = ProbeFramework::start(framework(&c, "bob", "bob-job", "*")).await;
    // Without ACLs a framework certificate still holds no operator right.
    let mut me = OperatorClient::connect(&client(&c, "alice", Role::Framework)).await.unwrap();
    assert_eq!(me.frameworks().await.unwrap().len(), 1);
    let agent = me.agents().await.unwrap()[0].id.clone();
    assert!(me.drain_agent(&agent, None, false).await.is_err());
    let mut op = OperatorClient::connect(&client(&c, "operator", Role::Operator)).await.unwrap();
    assert_eq!(op.frameworks().await.unwrap().len(), 2);
    alice.driver().stop(true);
    c.stop().await;
}

/// `agora master` as a user starts it: one warning line without `--acls`; a bad file refused
/// naming its line.
#[test]
fn agora_master_warns_once_without_acls_and_refuses_a_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    agora_sdk::tls::init(&tls, "default", false).unwrap();
    let master = |extra: &[&str]| {
        let mut cmd = Command::new(common::dev::AGORA);
        cmd.args(["master", "--listen", "127.0.0.1:0", "--tls-dir"])
            .arg(&tls)
            .arg("--work-dir")
            .arg(dir.path().join("work"))
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    };
    let mut child = master(&[]).spawn().expect("agora master");
    let mut lines = Vec::new();
    let reader = BufReader::new(child.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    for line in reader.lines() {
        let line = line.unwrap();
        let done = line.contains("master listening");
        lines.push(line);
        if done || Instant::now() > deadline {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let warnings: Vec<&String> = lines.iter().filter(|l| l.contains("no --acls given")).collect();
    assert_eq!(warnings.len(), 1, "{lines:#?}");
    assert!(warnings[0].contains("WARN"), "{}", warnings[0]);

    let bad = dir.path().join("acls.toml");
    std::fs::write(&bad, "[principals.alice]\nroles = [\"a\"]\noprator = true\n").unwrap();
    let out = master(&["--acls", bad.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("acls.toml") && err.contains("line 3") && err.contains("oprator"), "{err}");
}

/// `agora dev` writes client.toml without the operator certificate (a framework principal's
/// own view) and operator.toml with it.
#[test]
fn agora_dev_keeps_the_operator_certificate_out_of_client_toml() {
    let dev = common::dev::Dev::start("cpus:1;mem:256MiB");
    let client = std::fs::read_to_string(&dev.config).unwrap();
    assert!(!client.contains("[operator]") && client.contains("[framework]"), "{client}");
    let operator = std::fs::read_to_string(&dev.operator).unwrap();
    assert!(operator.contains("[operator]"), "{operator}");
    let out = dev.agora(&["run", "--cpus", "0.1", "--mem", "32MiB", "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    // The framework certificate lists its own tasks but holds no operator right.
    assert_eq!(dev.tasks_json().len(), 1);
    let agents = common::dev::agora_with(&dev.operator, &["agents", "-o", "json"]);
    let agents: Vec<serde_json::Value> = serde_json::from_slice(&agents.stdout).unwrap();
    let agent = agents[0]["id"].as_str().unwrap().to_string();
    let out = dev.agora(&["agent", "drain", &agent]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("principal `default` may not drain or undrain agents"), "{err}");
    let out = common::dev::agora_with(&dev.operator, &["agent", "drain", &agent, "--no-kill"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
