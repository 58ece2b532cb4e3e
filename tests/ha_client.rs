//! Several masters, client side: the real `agora` binary (CLI, `agora run`, `agora agent`) and
//! an SDK framework given a list of masters find the leader: past a dead address, and through a
//! standby's `NotLeader` redirect (a fake standby on loopback, speaking the real protocol).

mod common;

use std::time::Duration;

use agora_sdk::frame::{FrameReader, FrameWriter};
use agora_sdk::proto::*;
use agora_sdk::scheduler::{self, Driver, Scheduler};
use agora_sdk::tls::TlsFiles;
use common::dev::{agora_with, driver_config, RealCluster, AGORA};
use tokio::sync::mpsc;

/// A loopback UDP port nothing listens on (bound, then released).
fn dead_addr() -> String {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.local_addr().expect("addr").to_string()
}

/// A client.toml like the cluster's, naming `master` (a TOML value: a string or a list).
fn config_with(c: &RealCluster, name: &str, master_toml: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(&c.config).expect("client.toml");
    let text = text.replace(&format!("master = \"{}\"", c.addr), &format!("master = {master_toml}"));
    let path = c.dir.path().join(name);
    std::fs::write(&path, text).expect("write client.toml");
    path
}

/// A fake standby: answers every `Hello` with `NotLeader { leader }`, as a standby master does.
fn fake_standby(tls: &std::path::Path, leader: Option<String>) -> (String, tokio::task::JoinHandle<()>) {
    let cfg = agora_sdk::transport::server_config(&TlsFiles::in_dir(tls, "master")).expect("tls");
    let endpoint = quinn::Endpoint::server(cfg, ([127, 0, 0, 1], 0).into()).expect("endpoint");
    let addr = endpoint.local_addr().expect("addr").to_string();
    let task = tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let leader = leader.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                let Ok((send, recv)) = conn.accept_bi().await else { return };
                let (mut w, mut r) = (FrameWriter::new(send), FrameReader::new(recv));
                if let Ok(Some(Hello { .. })) = r.recv::<Hello>().await {
                    let _ = w.send(&HelloReply::NotLeader { leader }).await;
                }
                let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
            });
        }
    });
    (addr, task)
}

/// Runs `agora ARGS` with `config` off the async runtime (the fake standby serves meanwhile).
async fn agora(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    let (config, args): (std::path::PathBuf, Vec<String>) =
        (config.to_path_buf(), args.iter().map(|s| s.to_string()).collect());
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        agora_with(&config, &args)
    })
    .await
    .expect("agora")
}

fn json(out: &std::process::Output) -> Vec<serde_json::Value> {
    assert!(out.status.success(), "agora failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("a JSON array")
}

/// An SDK framework that reports its subscription and declines every offer.
struct Subscriber(mpsc::UnboundedSender<FrameworkId>);

impl Scheduler for Subscriber {
    async fn registered(&mut self, _: &Driver, id: &FrameworkId) {
        let _ = self.0.send(id.clone());
    }
    async fn resource_offers(&mut self, driver: &Driver, offers: Vec<Offer>) {
        driver.decline(offers.into_iter().map(|o| o.id).collect(), Some(60.0));
    }
    async fn status_update(&mut self, _: &Driver, _: &TaskStatus) {}
}

/// Subscribes an SDK framework through `config`; its id, checked against `agora frameworks`.
async fn sdk_framework_subscribes(config: &std::path::Path, name: &str) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let cfg = driver_config(config, name, "*");
    let run = tokio::spawn(async move { scheduler::run(cfg, &mut Subscriber(tx)).await });
    let id = tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("{name}: no subscription within 30 s"))
        .unwrap_or_else(|| panic!("{name}: the driver gave up"));
    let fws = json(&agora(config, &["frameworks", "-o", "json"]).await);
    assert!(
        fws.iter().any(|f| f["id"] == id.as_str() && f["name"] == name),
        "{name} ({id}) not in agora frameworks: {fws:?}"
    );
    run.abort();
}

/// Lists the agents through `config` until one is active (the agent found the leader).
async fn one_active_agent(config: &std::path::Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let agents = json(&agora(config, &["agents", "-o", "json"]).await);
        if agents.len() == 1 && agents[0]["status"] == "active" {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "no active agent: {agents:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `agora run -- echo TEXT` through `config`: TEXT on stdout and exit 0.
async fn run_echo(config: &std::path::Path, text: &str) {
    let out = agora(config, &["run", "--cpus", "0.1", "--mem", "32MiB", "--", "echo", text]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "agora run: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{text}\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_first_master_is_passed_over_by_every_client() {
    let mut c = RealCluster::master_only(RealCluster::prepare(), &[]);
    let real = c.addr.clone();
    let dead = dead_addr();
    // The agent: --master with the dead address first.
    c.addr = format!("{dead},{real}");
    c.start_agent(&["--resources", "cpus:1;mem:256MiB"]);
    c.addr = real.clone();
    let config = config_with(&c, "list.toml", &format!("[\"{dead}\", \"{real}\"]"));
    one_active_agent(&config).await;
    let masters = json(&agora(&config, &["masters", "-o", "json"]).await);
    assert_eq!(masters.len(), 1, "{masters:?}");
    assert_eq!(masters[0]["address"], real.as_str());
    assert_eq!(masters[0]["leader"], true);
    assert!(masters[0]["epoch"].as_u64().is_some_and(|e| e >= 1), "{masters:?}");
    assert!(masters[0]["id"].as_str().is_some_and(|id| !id.is_empty()), "{masters:?}");
    // The table names it the leader.
    let out = agora(&config, &["masters"]).await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && table.contains(&real) && table.contains("leader"), "{table}");
    run_echo(&config, "past-the-dead-one").await;
    sdk_framework_subscribes(&config, "listed").await;
    // The same list as a flag, with --tls-dir instead of a config file.
    let out = std::process::Command::new(AGORA)
        .args(["tasks", "-o", "json", "--master", &format!("{dead},{real}"), "--tls-dir"])
        .arg(&c.tls)
        .env_remove("AGORA_CONFIG")
        .output()
        .expect("agora tasks");
    let tasks = json(&out);
    assert!(tasks.iter().any(|t| t["state"] == "TASK_FINISHED"), "{tasks:?}");
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_follow_a_standby_to_the_leader() {
    let mut c = RealCluster::master_only(RealCluster::prepare(), &[]);
    let real = c.addr.clone();
    let (standby, _fake) = fake_standby(&c.tls, Some(real.clone()));
    // Only the standby is listed: every client must take its word for the leader.
    c.addr = standby.clone();
    let agent_started = {
        // start_agent polls with blocking commands: off the runtime that serves the fake.
        let mut c2 = c;
        tokio::task::spawn_blocking(move || {
            c2.start_agent(&["--resources", "cpus:1;mem:256MiB"]);
            c2
        })
        .await
        .expect("agent")
    };
    let mut c = agent_started;
    c.addr = real.clone();
    let config = config_with(&c, "standby.toml", &format!("\"{standby}\""));
    one_active_agent(&config).await;
    let masters = json(&agora(&config, &["masters", "-o", "json"]).await);
    assert_eq!(masters.len(), 1, "{masters:?}");
    assert_eq!(
        (masters[0]["address"].as_str(), masters[0]["leader"].as_bool()),
        (Some(real.as_str()), Some(true))
    );
    run_echo(&config, "redirected").await;
    sdk_framework_subscribes(&config, "redirected").await;
    // A standby that knows no leader, and a dead master: the error names both.
    let (lost, _lost) = fake_standby(&c.tls, None);
    let dead = dead_addr();
    let bad = config_with(&c, "noleader.toml", &format!("[\"{lost}\", \"{dead}\"]"));
    let out = agora(&bad, &["agents"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&lost) && err.contains(&dead) && err.contains("not the leader"), "{err}");
    tokio::task::spawn_blocking(move || c.stop()).await.expect("stop");
}

#[test]
fn bad_master_lists_are_refused_naming_the_entry() {
    let c = RealCluster::master_only(RealCluster::prepare(), &[]);
    // The flag: a usage error (exit 2) naming the entry.
    let out = std::process::Command::new(AGORA)
        .args(["agents", "--master", &format!("{},nohost", c.addr), "--tls-dir"])
        .arg(&c.tls)
        .env_remove("AGORA_CONFIG")
        .output()
        .expect("agora agents");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("`nohost`: no port"), "{err}");
    let out = std::process::Command::new(AGORA)
        .args(["agent", "--master", "a:1,,b:2", "--tls-dir"])
        .arg(&c.tls)
        .output()
        .expect("agora agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("empty entry"), "{err}");
    // client.toml: the file, the entry, what is wrong.
    let config = config_with(&c, "bad.toml", &format!("[\"{}\", \"h:99999\"]", c.addr));
    let out = agora_with(&config, &["agents"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("bad.toml") && err.contains("`h:99999`") && err.contains("port"), "{err}");
    c.stop();
}

/// `agora dev --masters 3`: etcd and three masters electing a leader; `agora masters` lists
/// the three with exactly one leader, and a task runs.
#[test]
fn dev_with_three_masters_lists_them_with_one_leader() {
    let mut dev = common::dev::Dev::start_with(&["--masters", "3", "--resources", "cpus:1;mem:256MiB"]);
    let out = dev.agora(&["masters", "-o", "json"]);
    let masters = json(&out);
    assert_eq!(masters.len(), 3, "{masters:?}");
    assert_eq!(masters.iter().filter(|m| m["leader"] == true).count(), 1, "{masters:?}");
    let cfg = agora_sdk::config::ClientConfig::load(&dev.config).expect("client.toml");
    assert_eq!(cfg.master.split(',').count(), 3, "client.toml lists the three: {}", cfg.master);
    let out = dev.agora(&["run", "--cpus", "0.1", "--mem", "32MiB", "--", "echo", "ha"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ha\n");
    let _ = dev.stdout_line("Agora dev cluster ready");
    assert!(dev.stop().success());
}
