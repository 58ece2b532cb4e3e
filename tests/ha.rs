//! High availability of the master: several `agora master --etcd` processes on loopback with a
//! real etcd; the registry in etcd and its fence; one leader, standbys answering `NotLeader`;
//! failover on `kill -9` of the leader; a leader cut off from etcd steps down before another
//! is elected.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use agora_master::ha::{Attempt, Election, HaConfig};
use agora_master::registry::{
    AgentRecord, AgentStanding, ArtifactRecord, EtcdRegistry, FrameworkRecord, Registry, RegistryError,
    RegistryOp,
};
use agora_sdk::client::{ClientError, Session};
use agora_sdk::proto::*;
use agora_sdk::tls::TlsFiles;
use agora_sdk::Resources;
use common::dev::{Proc, RealCluster, AGORA};
use common::etcd::{Etcd, TcpProxy};
use common::ha::{ask, operator_call, settled_leader, start_master, Answer, HaMaster};
use common::{sh_task, wait_for, ProbeFramework, Seen};

fn framework(n: u32) -> FrameworkRecord {
    FrameworkRecord {
        id: FrameworkId::new(format!("rt-1-F{n}")),
        name: format!("fw{n}"),
        role: "web".into(),
        principal: "alice".into(),
        hostname: "h".into(),
        failover_timeout: Duration::from_secs(60),
    }
}

fn agent(n: u32) -> AgentRecord {
    AgentRecord {
        id: AgentId::new(format!("rt-1-A{n}")),
        hostname: format!("host{n}"),
        principal: "agent".into(),
        resources: Resources::parse("cpus:2;mem:1GiB").expect("resources"),
        attributes: Default::default(),
        standing: AgentStanding::Admitted,
        // Some drained agents: etcd keeps their drains.
        drain: n
            .is_multiple_of(7)
            .then_some(agora_sdk::proto::DrainView { deadline_unix_ms: None, kill: false }),
    }
}

fn ha_config(etcd: &str, cluster: &str, advertise: &str) -> HaConfig {
    HaConfig {
        endpoints: vec![etcd.to_string()],
        cluster: cluster.into(),
        lease_ttl: Duration::from_secs(1),
        advertise: advertise.into(),
    }
}

/// The registry in etcd: a round trip (with a batch larger than one etcd transaction), and
/// the fence: once the leader's lease is gone its registry refuses every write, and the next
/// leader reads what the first wrote, under a higher epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_registry_round_trips_and_fences_a_deposed_leader() {
    let etcd = Etcd::start();
    let eps = vec![etcd.url.clone()];
    let mut a = Election::connect(&ha_config(&etcd.url, "rt", "127.0.0.1:1")).await.expect("connect a");
    let _a_alive = a.new_lease().await.expect("lease a");
    let Attempt::Won { epoch } = a.try_lead().await.expect("campaign a") else { panic!("a alone must win") };
    assert!(epoch > 0);

    let mut reg = EtcdRegistry::connect(&eps, "rt", epoch, Duration::from_secs(5)).expect("registry");
    let state = reg.open_epoch().expect("open");
    assert_eq!((state.epoch, state.cluster.as_str()), (epoch, "rt"));
    assert_eq!(state.master_id(), format!("rt-{epoch}"));
    assert!(state.frameworks.is_empty() && state.agents.is_empty());
    let mut ops = vec![
        RegistryOp::PutFramework(framework(1)),
        RegistryOp::PutFramework(framework(2)),
        RegistryOp::PutArtifact(ArtifactRecord {
            digest: Digest::parse(&"ab".repeat(32)).expect("digest"),
            kind: None,
            size: 7,
            uploader: None,
        }),
    ];
    // More than one transaction's worth (etcd takes at most 128 operations in one), and more
    // than one page of reading.
    ops.extend((0..2100).map(|n| RegistryOp::PutAgent(agent(n))));
    reg.apply(&ops).expect("apply");
    reg.apply(&[RegistryOp::RemoveFramework(framework(2).id), RegistryOp::RemoveAgent(agent(0).id)])
        .expect("apply removals");

    // A registry of another epoch is refused at once.
    let mut wrong =
        EtcdRegistry::connect(&eps, "rt", epoch + 1000, Duration::from_secs(5)).expect("registry");
    let err = wrong.open_epoch().expect_err("not the leader's epoch");
    assert!(matches!(err, RegistryError::Fenced { .. }), "{err:?}");

    let mut b = Election::connect(&ha_config(&etcd.url, "rt", "127.0.0.1:2")).await.expect("connect b");
    let _b_alive = b.new_lease().await.expect("lease b");
    match b.try_lead().await.expect("campaign b") {
        Attempt::Lost { leader, .. } => assert_eq!(leader.as_deref(), Some("127.0.0.1:1")),
        other => panic!("b won while a leads: {other:?}"),
    }

    // a loses its lease: its registry can no longer write.
    a.resign().await;
    let err = reg.apply(&[RegistryOp::PutFramework(framework(3))]).expect_err("a deposed leader wrote");
    assert!(matches!(err, RegistryError::Fenced { .. }), "{err:?}");

    let Attempt::Won { epoch: epoch2 } = b.try_lead().await.expect("campaign b") else {
        panic!("b must win once a resigned")
    };
    assert!(epoch2 > epoch, "epochs must grow: {epoch} then {epoch2}");
    let mut reg2 = EtcdRegistry::connect(&eps, "rt", epoch2, Duration::from_secs(5)).expect("registry");
    let state = reg2.open_epoch().expect("open");
    assert_eq!(state.epoch, epoch2);
    assert_eq!(state.frameworks.values().cloned().collect::<Vec<_>>(), vec![framework(1)]);
    assert_eq!(state.agents.len(), 2099);
    assert!(!state.agents.contains_key(&agent(0).id));
    assert_eq!(state.agents.get(&agent(2099).id), Some(&agent(2099)));
    assert_eq!(state.artifacts.len(), 1);
    reg2.apply(&[RegistryOp::PutFramework(framework(4))]).expect("the new leader writes");
    let err = reg.apply(&[RegistryOp::PutFramework(framework(5))]).expect_err("the old leader wrote");
    assert!(matches!(err, RegistryError::Fenced { .. }), "{err:?}");
    drop((reg, reg2, wrong));
}

/// Three masters, one etcd: exactly one leads, the standbys name it, `GetMasters` lists all
/// three; `kill -9` of the leader: another takes over with a higher epoch, the agent (pointed
/// at the new leader) re-registers with its running task and the framework re-subscribes
/// with its id and gets offers. Prints the failover times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_masters_one_leader_and_failover_on_kill_9() {
    let etcd = Etcd::start();
    let dir = RealCluster::prepare();
    let tls = dir.path().join("tls");
    let mut masters: Vec<HaMaster> =
        (0..3).map(|i| start_master(dir.path(), &format!("master{i}"), &etcd.url)).collect();
    let addrs: Vec<String> = masters.iter().map(|m| m.addr.clone()).collect();
    let addr_refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let mut first = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while first.is_none() {
        assert!(Instant::now() < deadline, "no leader named by both standbys within 30 s");
        first = settled_leader(&addr_refs, &tls).await;
        if first.is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let (li, epoch1) = first.expect("leader");
    let leader = addrs[li].clone();

    let OperatorReply::Masters(list) = operator_call(&leader, &tls, OperatorCall::GetMasters).await else {
        panic!("GetMasters must answer Masters")
    };
    assert_eq!(list.len(), 3, "{list:?}");
    let mut listed: Vec<&str> = list.iter().map(|m| m.address.as_str()).collect();
    listed.sort_unstable();
    let mut expected = addr_refs.clone();
    expected.sort_unstable();
    assert_eq!(listed, expected);
    let leaders: Vec<&MasterView> = list.iter().filter(|m| m.leader).collect();
    assert_eq!(leaders.len(), 1, "{list:?}");
    assert_eq!((leaders[0].address.as_str(), leaders[0].epoch), (leader.as_str(), epoch1));
    assert!(list.iter().filter(|m| !m.leader).all(|m| m.epoch == 0), "{list:?}");

    // An agent and a framework with a running task, on the leader.
    let work = dir.path().join("agent");
    let agent_cmd = |master: &str| {
        let mut c = Command::new(AGORA);
        c.args(["agent", "--master", master, "--tls-dir"]).arg(&tls).arg("--work-dir").arg(&work).args([
            "--resources",
            "cpus:2;mem:512MiB",
            "--kill-grace",
            "500ms",
            "--recovery-timeout",
            "30s",
        ]);
        c
    };
    let mut agent = Proc::spawn("agent", dir.path(), &mut agent_cmd(&leader));
    let mut cfg =
        agora_sdk::scheduler::DriverConfig::new(leader.clone(), TlsFiles::in_dir(&tls, "framework"), "ha");
    cfg.framework.failover_timeout = Duration::from_secs(120);
    let mut fw = ProbeFramework::start(cfg.clone()).await;
    let fw_id = fw.id.clone().expect("framework id");
    let offer = fw.offer().await;
    fw.driver().launch(vec![offer.id], vec![sh_task("t1", "sleep 300", "cpus:0.5;mem:64MiB")]);
    fw.update_for("t1", TaskState::Running).await;

    // An artifact uploaded to the leader (into its own store; the standbys copy it).
    let script = b"#!/bin/sh\necho from the artifact store\n";
    let uploaded = {
        let s = Session::connect(&leader, &TlsFiles::in_dir(&tls, "operator"), Role::Operator)
            .await
            .expect("operator");
        agora_sdk::artifacts::upload_bytes(&s.conn, ArtifactKind::Executable, "probe.sh", script)
            .await
            .expect("upload")
    };
    for i in (0..3).filter(|i| *i != li) {
        let copy = dir.path().join(format!("master{i}/artifacts/sha256")).join(uploaded.digest.as_str());
        common::dev::poll("the standbys to copy the artifact", 30, || copy.is_file().then_some(()));
    }

    // kill -9 of the leader.
    let killed = Instant::now();
    masters[li].proc.kill9();
    fw.run.abort();
    let rest: Vec<&str> = addr_refs.iter().enumerate().filter(|(i, _)| *i != li).map(|(_, a)| *a).collect();
    let mut second = None;
    let deadline = killed + Duration::from_secs(15);
    while second.is_none() {
        assert!(Instant::now() < deadline, "no new leader 15 s after kill -9 of the old one");
        second = settled_leader(&rest, &tls).await;
        if second.is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let to_leader = killed.elapsed();
    let (ni, epoch2) = second.expect("new leader");
    let new_leader = rest[ni].to_string();
    assert!(epoch2 > epoch1, "the new leader's epoch {epoch2} is not above {epoch1}");

    // The agent follows (the client side of following NotLeader is not this test's): restarted
    // against the new leader with the same work dir, it re-registers with its task.
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGKILL) };
    agent.wait(10);
    let mut agent = Proc::spawn("agent-again", dir.path(), &mut agent_cmd(&new_leader));
    wait_for("the agent to re-register with the new leader", || {
        let (new_leader, tls) = (&new_leader, &tls);
        async move {
            matches!(operator_call(new_leader, tls, OperatorCall::GetAgents).await,
                OperatorReply::Agents(a) if a.len() == 1 && a[0].status == agora_sdk::AgentViewStatus::Active)
        }
    })
    .await;
    let to_agent = killed.elapsed();
    cfg.master = new_leader.clone();
    cfg.framework.id = Some(fw_id.clone());
    let mut fw = ProbeFramework::start(cfg).await;
    assert_eq!(fw.id.as_ref(), Some(&fw_id), "the framework came back under another id");
    fw.offer().await;
    let to_offer = killed.elapsed();
    let OperatorReply::Tasks(tasks) = operator_call(&new_leader, &tls, OperatorCall::GetTasks).await else {
        panic!("GetTasks must answer Tasks")
    };
    let t1 = tasks.iter().find(|t| t.id.as_str() == "t1").expect("t1 on the new leader");
    assert_eq!(t1.state, TaskState::Running, "{t1:?}");
    // The new leader kept the artifact in its index (it had copied its file as a standby).
    let mut reg =
        EtcdRegistry::connect(std::slice::from_ref(&etcd.url), "hatest", epoch2, Duration::from_secs(5))
            .expect("registry");
    let state = reg.open_epoch().expect("read the registry");
    assert_eq!(state.artifacts.get(&uploaded.digest).map(|a| a.size), Some(script.len() as u64));
    drop(reg);
    println!(
        "HA failover (kill -9 of the leader, lease TTL 1 s): new leader after {to_leader:?}, \
         agent re-registered after {to_agent:?} (agent restarted by the test), first offer after {to_offer:?}"
    );

    fw.driver().kill(TaskId::new("t1"));
    fw.until(|s| {
        matches!(s, Seen::Update(u) if u.task_id.as_str() == "t1" && u.state.is_terminal()).then_some(())
    })
    .await;
    let st = agent.stop();
    assert!(st.success(), "agent: {st} {}", agent.stderr_text());
    for m in &mut masters {
        m.proc.stop();
    }
}

/// The leader cut off from etcd (through a TCP proxy only it uses): it steps down before the
/// other master is elected (by the logs' clocks, on this one machine), closes its peers'
/// connections, and after the cut heals it stands by and names the new leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_etcd_steps_down_before_another_is_elected() {
    let etcd = Etcd::start();
    let proxy = TcpProxy::start(etcd.addr);
    let dir = RealCluster::prepare();
    let tls = dir.path().join("tls");
    let mut a = start_master(dir.path(), "master-a", &proxy.url());
    wait_for("a to lead", || {
        let (addr, tls) = (&a.addr, &tls);
        async move { matches!(ask(addr, tls).await, Answer::Leader(_)) }
    })
    .await;
    let Answer::Leader(epoch_a) = ask(&a.addr, &tls).await else { panic!("a leads") };
    let mut b = start_master(dir.path(), "master-b", &etcd.url);
    wait_for("b to stand by naming a", || {
        let (addr, tls, want) = (&b.addr, &tls, Some(a.addr.clone()));
        async move { ask(addr, tls).await == Answer::Standby(want) }
    })
    .await;
    // A peer connected to a: its connection must end when a steps down.
    let mut peer = Session::connect(&a.addr, &TlsFiles::in_dir(&tls, "operator"), Role::Operator)
        .await
        .expect("operator on a");

    proxy.cut();
    let cut = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(15), peer.reader.recv::<OperatorReply>()).await;
    assert!(
        matches!(ended, Ok(Ok(None)) | Ok(Err(_))),
        "a peer of the deposed leader stayed connected: {ended:?}"
    );
    let mut epoch_b = 0;
    let deadline = cut + Duration::from_secs(15);
    while epoch_b == 0 {
        assert!(Instant::now() < deadline, "b did not take over within 15 s");
        match ask(&b.addr, &tls).await {
            Answer::Leader(e) => epoch_b = e,
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    println!("HA partition: the other master leads {:?} after the cut", cut.elapsed());
    assert!(epoch_b > epoch_a, "{epoch_b} is not above {epoch_a}");
    assert!(!matches!(ask(&a.addr, &tls).await, Answer::Leader(_)), "two leaders at once");

    // Log times: a's step-down comes before b's election.
    let stamp = |text: String, what: &str| -> String {
        text.lines()
            .find(|l| l.contains(what))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("no `{what}` in the log: {text}"))
            .to_string()
    };
    let stepped_down = stamp(a.proc.stderr_text(), "stepping down");
    let elected_b = stamp(b.proc.stderr_text(), "elected leader");
    assert!(stepped_down < elected_b, "a stepped down at {stepped_down}, b was elected at {elected_b}");

    proxy.heal();
    wait_for("a to stand by naming b", || {
        let (addr, tls, want) = (&a.addr, &tls, Some(b.addr.clone()));
        async move { ask(addr, tls).await == Answer::Standby(want) }
    })
    .await;
    a.proc.stop();
    b.proc.stop();
}

/// An agent never follows a master whose epoch is below one it already followed (a deposed
/// leader still running): here a master started from an older copy of its registry, whose
/// epoch is therefore lower. The agent drops it, and so does the same agent restarted (the
/// epoch is kept in its work dir).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refuses_a_master_with_an_older_epoch() {
    let dir = RealCluster::prepare();
    let tls = dir.path().join("tls");
    let mwork = dir.path().join("master-work");
    let master = |name: &str, listen: &str| {
        Proc::spawn_master(name, dir.path(), || {
            let mut c = Command::new(AGORA);
            c.args(["master", "--listen", listen, "--tls-dir"]).arg(&tls).arg("--work-dir").arg(&mwork);
            c
        })
    };
    // Epoch 1 (its registry copied aside), epoch 2, then epoch 3 with the agent.
    let (mut m1, addr) = master("master1", "127.0.0.1:0");
    assert!(m1.stop().success());
    let registry = mwork.join("registry.redb");
    std::fs::copy(&registry, dir.path().join("registry-epoch1.redb")).expect("copy the registry");
    let (mut m2, _) = master("master2", &addr);
    assert!(m2.stop().success());
    let (mut m3, _) = master("master3", &addr);
    let work = dir.path().join("agent");
    let agent_cmd = || {
        let mut c = Command::new(AGORA);
        c.args(["agent", "--master", &addr, "--tls-dir"])
            .arg(&tls)
            .arg("--work-dir")
            .arg(&work)
            .args(["--resources", "cpus:1;mem:256MiB"]);
        c
    };
    let mut agent = Proc::spawn("agent", dir.path(), &mut agent_cmd());
    let epoch_file = work.join(agora_agent::epoch::EPOCH_FILE);
    common::dev::poll("the agent to record epoch 3", 30, || {
        let text = std::fs::read_to_string(&epoch_file).ok()?;
        text.trim().ends_with(" 3").then_some(())
    });

    // The master comes back from the older registry: epoch 2.
    m3.kill9();
    std::fs::copy(dir.path().join("registry-epoch1.redb"), &registry).expect("restore the registry");
    let (_m4, _) = master("master4", &addr);
    // Refused by the leader search (within the process) or by the epoch file (after a restart).
    let refused = |a: &Proc| a.stderr_text().contains("deposed leader");
    common::dev::poll("the agent to drop the master of epoch 2", 60, || refused(&agent).then_some(()));
    let OperatorReply::Agents(agents) = operator_call(&addr, &tls, OperatorCall::GetAgents).await else {
        panic!("GetAgents must answer Agents")
    };
    assert!(agents.is_empty(), "the agent registered with a deposed master: {agents:?}");
    assert!(std::fs::read_to_string(&epoch_file).expect("epoch file").trim().ends_with(" 3"));

    // Restarted, it remembers.
    agent.kill9();
    let agent = Proc::spawn("agent-again", dir.path(), &mut agent_cmd());
    common::dev::poll("the restarted agent to drop the master of epoch 2", 60, || {
        refused(&agent).then_some(())
    });
    let OperatorReply::Agents(agents) = operator_call(&addr, &tls, OperatorCall::GetAgents).await else {
        panic!("GetAgents must answer Agents")
    };
    assert!(agents.is_empty(), "the restarted agent registered with a deposed master: {agents:?}");
}

/// `agora … --allow-stale`: a standby lists the registered framework (and the agents, the
/// masters) from etcd, marked stale; without the flag the same command reaches the leader; a
/// stale session serves nothing else (KillTask, GetTasks, bulk streams refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_serves_stale_listings_only_when_asked() {
    let etcd = Etcd::start();
    let dir = RealCluster::prepare();
    let tls = dir.path().join("tls");
    let masters: Vec<HaMaster> =
        (0..2).map(|i| start_master(dir.path(), &format!("master{i}"), &etcd.url)).collect();
    let addrs: Vec<&str> = masters.iter().map(|m| m.addr.as_str()).collect();
    let mut settled = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while settled.is_none() {
        assert!(Instant::now() < deadline, "no leader named by the standby within 30 s");
        settled = settled_leader(&addrs, &tls).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (li, _) = settled.expect("leader");
    let (leader, standby) = (addrs[li].to_string(), addrs[1 - li].to_string());
    let cfg = agora_sdk::scheduler::DriverConfig::new(
        leader.clone(),
        TlsFiles::in_dir(&tls, "framework"),
        "stale-fw",
    );
    let fw = ProbeFramework::start(cfg).await;
    let fw_id = fw.id.clone().expect("framework id");

    let cli = |args: Vec<String>| {
        let tls = tls.clone();
        tokio::task::spawn_blocking(move || {
            Command::new(AGORA).args(&args).arg("--tls-dir").arg(&tls).output().expect("run agora")
        })
    };
    let list = |what: &str, stale: bool| {
        let mut args = vec![what.to_string(), "-o".into(), "json".into(), "--master".into(), standby.clone()];
        if stale {
            args.push("--allow-stale".into());
        }
        cli(args)
    };
    let parse = |out: &std::process::Output| -> Vec<serde_json::Value> {
        assert!(out.status.success(), "agora failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("a JSON array")
    };

    let out = list("frameworks", true).await.expect("agora");
    let fws = parse(&out);
    assert_eq!(fws.len(), 1, "{fws:?}");
    assert_eq!((fws[0]["id"].as_str(), fws[0]["name"].as_str()), (Some(fw_id.as_str()), Some("stale-fw")));
    assert_eq!(fws[0]["stale"], true);
    assert_eq!(fws[0]["status"], "registered");
    let note = String::from_utf8_lossy(&out.stderr);
    assert!(note.contains("stale read from standby") && note.contains(&standby), "{note}");
    assert!(note.contains(&format!("the leader is {leader}")), "{note}");

    // Without the flag: the standby sends the CLI to the leader, whose answer is live.
    let out = list("frameworks", false).await.expect("agora");
    let fws = parse(&out);
    assert_eq!(fws.len(), 1, "{fws:?}");
    assert_eq!(fws[0]["status"], "active");
    assert!(fws[0].get("stale").is_none(), "{fws:?}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("stale"));

    let masters_json = parse(&list("masters", true).await.expect("agora"));
    assert_eq!(masters_json.len(), 2, "{masters_json:?}");
    assert!(masters_json.iter().any(|m| m["leader"] == true && m["address"] == leader.as_str()));
    assert!(parse(&list("agents", true).await.expect("agora")).is_empty());
    // `tasks` has no --allow-stale.
    let out = cli(vec!["tasks".into(), "--allow-stale".into(), "--master".into(), standby.clone()])
        .await
        .expect("agora");
    assert!(!out.status.success());

    // The stale session itself: listings only.
    let mut s =
        Session::connect_allowing_stale(&standby, &TlsFiles::in_dir(&tls, "operator"), Role::Operator)
            .await
            .expect("stale session");
    let from = s.stale.clone().expect("a standby's session is stale");
    assert_eq!(from.leader.as_deref(), Some(leader.as_str()));
    for call in [OperatorCall::KillTask { task_id: TaskId::new("t1") }, OperatorCall::GetTasks] {
        s.writer.send(&call).await.expect("send");
        match s.reader.recv::<OperatorReply>().await.expect("reply") {
            Some(OperatorReply::Error(e)) => {
                assert_eq!(e.code, ErrorCode::Unauthorized);
                assert!(e.message.contains("standby") && e.message.contains(&leader), "{}", e.message);
            }
            other => panic!("{call:?} through a stale session was not refused: {other:?}"),
        }
    }
    s.writer.send(&OperatorCall::GetFrameworks).await.expect("send");
    assert!(matches!(
        s.reader.recv::<OperatorReply>().await.expect("reply"),
        Some(OperatorReply::Frameworks(f)) if f.len() == 1
    ));
    let e = agora_sdk::artifacts::upload_bytes(&s.conn, ArtifactKind::Executable, "x.sh", b"#!/bin/sh\n")
        .await
        .expect_err("a stale session took an upload");
    assert!(matches!(&e, ClientError::Refused(w) if w.message.contains("standby")), "{e}");
    // The leader ignores the flag: an ordinary session.
    let s = Session::connect_allowing_stale(&leader, &TlsFiles::in_dir(&tls, "operator"), Role::Operator)
        .await
        .expect("leader session");
    assert!(s.stale.is_none());
    drop(fw);
}

/// Bad high-availability flags are refused with a message naming what is wrong.
#[test]
fn bad_ha_flags_are_refused_naming_them() {
    let dir = RealCluster::prepare();
    let tls = dir.path().join("tls");
    let run = |args: &[&str]| {
        let out = Command::new(AGORA)
            .args(["master", "--tls-dir"])
            .arg(&tls)
            .args(args)
            .output()
            .expect("run agora master");
        assert!(!out.status.success(), "{args:?} was accepted");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let err = run(&["--listen", "127.0.0.1:0", "--etcd", "ftp://x"]);
    assert!(err.contains("invalid --etcd"), "{err}");
    let err = run(&["--listen", "127.0.0.1:0", "--etcd", "http://127.0.0.1:1", "--cluster-name", "a/b"]);
    assert!(err.contains("invalid cluster name"), "{err}");
    let err = run(&["--listen", "127.0.0.1:0", "--etcd", "http://127.0.0.1:1", "--etcd-lease-ttl", "10min"]);
    assert!(err.contains("--etcd-lease-ttl"), "{err}");
    let err = run(&["--listen", "0.0.0.0:0", "--etcd", "http://127.0.0.1:1"]);
    assert!(err.contains("--advertise"), "{err}");
    // HA flags without --etcd make no sense.
    let err = run(&["--listen", "127.0.0.1:0", "--cluster-name", "prod"]);
    assert!(err.contains("--etcd"), "{err}");
}
