//! `agora agent drain` on a real cluster (`agora master` and `agora agent` as separate
//! processes, an SDK framework): the framework is told with the deadline, the agent offers
//! nothing while it drains, its task ends KILLED with reason `agent drained` at the deadline,
//! `agora agents` shows the drain, and `agora agent undrain` brings the offers back.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agora_sdk::proto::*;
use common::dev::RealCluster;
use common::*;

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() as u64
}

/// The one agent of `agora agents -o json`.
fn agent_json(c: &RealCluster) -> serde_json::Value {
    let out = c.agora(&["agents", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let agents: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json array");
    assert_eq!(agents.len(), 1, "{agents:?}");
    agents[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_agent_is_told_offers_nothing_and_its_task_is_killed_at_the_deadline() {
    let c = RealCluster::start(&[], &["--resources", "cpus:2;mem:1GiB"]);
    let mut fw = ProbeFramework::start(c.framework_config("drain")).await;
    let offer = fw.offer().await;
    fw.held.clear();
    let agent = offer.agent_id.clone();
    fw.driver().launch(vec![offer.id], vec![sh_task("t", "exec sleep 120", "cpus:0.1;mem:16MiB")]);
    fw.update_for("t", TaskState::Running).await;

    // Bad input is refused with a clear error.
    let out = c.agora(&["agent", "drain", "no-such-agent", "--deadline", "2s"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no agent no-such-agent"), "{out:?}");

    let before = unix_ms();
    let out = c.agora(&["agent", "drain", agent.as_str(), "--deadline", "2s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let after = unix_ms();
    let json = agent_json(&c);
    assert_eq!(json["status"], "draining", "{json}");
    assert_eq!(json["drain"]["kill"], true, "{json}");

    // Told with the deadline; from then on no offer from the agent; the task ends KILLED.
    let mut deadline = None;
    let killed = loop {
        match fw.next().await {
            Seen::AgentDraining { agent_id, deadline_unix_ms } => {
                assert_eq!(agent_id, agent);
                let d = deadline_unix_ms.expect("a deadline");
                assert!((before + 2000..=after + 2000).contains(&d), "{before} {d} {after}");
                deadline = Some(d);
            }
            Seen::Offers(o) if deadline.is_some() => panic!("offers from a draining agent: {o:?}"),
            Seen::Update(u) if u.task_id.as_str() == "t" && u.state.is_terminal() => break u,
            _ => {}
        }
    };
    assert!(deadline.is_some(), "the framework was not told of the drain");
    assert_eq!((killed.state, &killed.reason), (TaskState::Killed, &Reason::AgentDrained), "{killed:?}");
    // Still nothing offered for a few allocation cycles; the agent reads as drained.
    let quiet = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(seen) = tokio::time::timeout_at(quiet, fw.next()).await {
        assert!(!matches!(seen, Seen::Offers(_)), "offers from a drained agent: {seen:?}");
    }
    let json = agent_json(&c);
    assert_eq!(json["status"], "drained", "{json}");
    assert_eq!(json["drain"]["deadline_unix_ms"], deadline.expect("deadline"), "{json}");
    let out = c.agora(&["agents"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("drained"), "{out:?}");

    // Undrained: told, and offered again.
    let out = c.agora(&["agent", "undrain", agent.as_str()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    fw.until(|s| matches!(s, Seen::AgentUndrained(a) if *a == agent).then_some(())).await;
    let offer = fw.offer().await;
    assert_eq!(offer.agent_id, agent);
    let json = agent_json(&c);
    assert_eq!((&json["status"], &json["drain"]), (&"active".into(), &serde_json::Value::Null), "{json}");
    c.stop();
}

/// A drain is in the registry before `agora agent drain` returns: a master killed with
/// SIGKILL comes back still draining the agent, with the same deadline, and offers nothing
/// from it to a framework that subscribes (which is told of the drain).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_outlives_a_kill_9_of_the_master() {
    let dir = RealCluster::prepare();
    let work = dir.path().join("master-work").to_str().expect("utf-8").to_string();
    let master_args = ["--work-dir", work.as_str()];
    let mut c = RealCluster::master_only(dir, &master_args);
    c.start_agent(&["--resources", "cpus:1;mem:256MiB"]);
    let agent = agent_json(&c)["id"].as_str().expect("agent id").to_string();
    let out = c.agora(&["agent", "drain", &agent, "--deadline", "1h", "--no-kill"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let drain = agent_json(&c)["drain"].clone();
    assert_eq!(drain["kill"], false, "{drain}");

    c.kill9_and_restart_master(&master_args);
    common::dev::poll("the agent to re-register", 30, || {
        let out = c.agora(&["agents", "-o", "json"]);
        let agents: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).ok()?;
        (agents.len() == 1 && agents[0]["status"] == "drained").then_some(())
    });
    assert_eq!(agent_json(&c)["drain"], drain);
    let mut fw = ProbeFramework::start(c.framework_config("after")).await;
    let told = fw
        .until(|s| match s {
            Seen::AgentDraining { agent_id, deadline_unix_ms } => Some((agent_id.clone(), *deadline_unix_ms)),
            _ => None,
        })
        .await;
    assert_eq!(told, (AgentId::new(agent.as_str()), drain["deadline_unix_ms"].as_u64()));
    let quiet = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(seen) = tokio::time::timeout_at(quiet, fw.next()).await {
        assert!(!matches!(seen, Seen::Offers(_)), "offers from a drained agent: {seen:?}");
    }
    c.stop();
}
