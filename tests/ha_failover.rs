//! The master group failing over with work under way, real etcd and real processes: `kill -9`
//! of the leader while 50 tasks run and a framework launches more (nothing lost, nothing
//! launched twice, every agent and the framework back on the new leader); `agora run`
//! streaming across a failover; a three-member etcd losing a member; the whole cluster (etcd
//! and every master) restarted.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use agora_sdk::proto::*;
use agora_sdk::scheduler::DriverConfig;
use agora_sdk::tls::TlsFiles;
use agora_sdk::Resources;
use common::dev::{Proc, RealCluster, AGORA};
use common::etcd::Etcd;
use common::ha::{self, HaMaster};
use common::{sh_task, ProbeFramework, Seen};

/// Three masters on one etcd (one member or a cluster), and agents given the list of the three.
struct Group {
    tls: PathBuf,
    masters: Vec<HaMaster>,
    agents: Vec<Proc>,
    /// Last: the processes above write into it.
    dir: tempfile::TempDir,
}

impl Group {
    fn start(etcd_urls: &str) -> Group {
        let dir = RealCluster::prepare();
        let tls = dir.path().join("tls");
        let masters = (0..3)
            .map(|i| {
                let work = dir.path().join(format!("master{i}-work"));
                ha::start_master_on(dir.path(), &format!("master{i}"), etcd_urls, "127.0.0.1:0", &work)
            })
            .collect();
        Group { tls, masters, agents: Vec::new(), dir }
    }

    fn addrs(&self) -> Vec<&str> {
        self.masters.iter().map(|m| m.addr.as_str()).collect()
    }

    /// `a,b,c`, as `--master` takes it.
    fn list(&self) -> String {
        self.addrs().join(",")
    }

    /// The settled leader (`secs` at most): its address and epoch.
    async fn leader(&self, secs: u64) -> (String, u64) {
        let (i, epoch) = ha::wait_settled_leader(&self.addrs(), &self.tls, secs).await;
        (self.masters[i].addr.clone(), epoch)
    }

    /// The settled leader among the masters still running.
    async fn leader_among_living(&mut self, secs: u64) -> (String, u64) {
        let living: Vec<String> =
            self.masters.iter_mut().filter_map(|m| m.proc.running().then(|| m.addr.clone())).collect();
        let refs: Vec<&str> = living.iter().map(String::as_str).collect();
        let (i, epoch) = ha::wait_settled_leader(&refs, &self.tls, secs).await;
        (living[i].clone(), epoch)
    }

    fn start_agent(&mut self, resources: &str) {
        let i = self.agents.len();
        self.spawn_agent(i, &format!("agent{i}"), &self.list(), resources);
    }

    /// Starts agent `i` (its work dir `agent{i}`) as process `name`, given `masters`.
    fn spawn_agent(&mut self, i: usize, name: &str, masters: &str, resources: &str) {
        let p = Proc::spawn(
            name,
            self.dir.path(),
            Command::new(AGORA)
                .args(["agent", "--master", masters, "--tls-dir"])
                .arg(&self.tls)
                .arg("--work-dir")
                .arg(self.dir.path().join(format!("agent{i}")))
                .args(["--resources", resources, "--kill-grace", "500ms", "--recovery-timeout", "60s"]),
        );
        if i < self.agents.len() {
            self.agents[i] = p;
        } else {
            self.agents.push(p);
        }
    }

    /// Starts master `i` again on its address and work dir (after it was killed).
    fn restart_master(&mut self, i: usize, etcd_urls: &str) {
        let m = &self.masters[i];
        let (addr, work, name) = (m.addr.clone(), m.work.clone(), format!("{}-again", m.proc.name));
        self.masters[i] = ha::start_master_on(self.dir.path(), &name, etcd_urls, &addr, &work);
        assert_eq!(self.masters[i].addr, addr);
    }

    /// Waits until the master at `addr` lists `n` agents, all active.
    async fn active_agents(&self, addr: &str, n: usize, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let agents = ha::agents(addr, &self.tls).await;
            if agents.len() == n && agents.iter().all(|a| a.status == agora_sdk::AgentViewStatus::Active) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{addr} lists {agents:?}, not {n} active agents, after {secs} s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// An SDK framework given the list of masters, with a 2 min failover timeout.
    fn framework_config(&self, name: &str) -> DriverConfig {
        let mut cfg = DriverConfig::new(self.list(), TlsFiles::in_dir(&self.tls, "framework"), name);
        cfg.framework.failover_timeout = Duration::from_secs(120);
        cfg
    }

    /// A directory every task may write to, and a script that leaves one file per launch of
    /// a task in it (`TASK_ID.PID`), then sleeps.
    fn launch_log(&self) -> (PathBuf, String) {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.dir.path().join("launches");
        std::fs::create_dir(&dir).expect("mkdir launches");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let script = format!("touch {}/$AGORA_TASK_ID.$$; exec sleep 600", dir.display());
        (dir, script)
    }
}

impl Drop for Group {
    /// A failing test shows what the masters and agents logged last.
    fn drop(&mut self) {
        if std::thread::panicking() {
            for p in self.masters.iter().map(|m| &m.proc).chain(&self.agents) {
                let text = p.stderr_text();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("---- {} (last {} lines)", p.name, tail.len());
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// How many times each task was launched, from the files its launches left in `dir`.
fn launches(dir: &Path) -> BTreeMap<String, usize> {
    let mut n = BTreeMap::new();
    for e in std::fs::read_dir(dir).expect("read launches") {
        let name = e.expect("entry").file_name().to_string_lossy().into_owned();
        let task = name.rsplit_once('.').map_or(name.clone(), |(t, _)| t.to_string());
        *n.entry(task).or_insert(0) += 1;
    }
    n
}

/// Launches as many tasks of `ids` (`per_task` each) as `offer` holds; the ids launched.
fn launch_into(
    fw: &ProbeFramework,
    offer: &Offer,
    ids: &mut Vec<String>,
    script: &str,
    per_task: &str,
) -> Vec<String> {
    let need = Resources::parse(per_task).expect("resources");
    let mut left = offer.resources.clone();
    let mut batch = Vec::new();
    while let (Some(_), Some(rest)) = (ids.last(), left.checked_sub(&need)) {
        left = rest;
        batch.push(ids.pop().expect("an id"));
    }
    let tasks = batch.iter().map(|id| sh_task(id, script, per_task)).collect();
    fw.driver().launch(vec![offer.id.clone()], tasks);
    batch
}

/// Reads the framework's events for `d` (offers go to `held`).
async fn drain(fw: &mut ProbeFramework, d: Duration) {
    let until = Instant::now() + d;
    while let Ok(Some((driver, seen))) = tokio::time::timeout_at(until.into(), fw.rx.recv()).await {
        fw.driver = Some(driver);
        if let Seen::Offers(o) = seen {
            fw.held.extend(o);
        }
    }
}

/// Reconciles `ids` every second until `settled` holds for each one's latest state; those
/// states.
async fn reconcile_until(
    fw: &mut ProbeFramework,
    ids: &BTreeSet<String>,
    secs: u64,
    settled: impl Fn(&str, TaskState) -> bool,
) -> BTreeMap<String, TaskState> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut latest: BTreeMap<String, TaskState> = BTreeMap::new();
    loop {
        let open: Vec<TaskId> = ids
            .iter()
            .filter(|id| !latest.get(*id).is_some_and(|s| settled(id, *s)))
            .map(|id| TaskId::new(id.as_str()))
            .collect();
        if open.is_empty() {
            return latest;
        }
        assert!(Instant::now() < deadline, "not settled after {secs} s: {latest:?}");
        fw.driver().reconcile(open);
        let round = Instant::now() + Duration::from_secs(1);
        while let Ok(Some((d, seen))) = tokio::time::timeout_at(round.into(), fw.rx.recv()).await {
            fw.driver = Some(d);
            if let Seen::Update(u) = seen {
                latest.insert(u.task_id.as_str().to_string(), u.state);
            }
        }
    }
}

/// `kill -9` of the leader while 50 tasks run on two agents and the framework is launching
/// more: a new leader; both agents (given the list of masters) re-register with it by
/// themselves; the framework (SDK, same list) re-subscribes under its id and gets offers;
/// every task that ran still runs; a task launched into the dying leader either runs or is
/// reported unknown; no task was launched twice. Prints the failover times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_leader_under_load_loses_no_task_and_launches_none_twice() {
    let etcd = Etcd::start();
    let mut g = Group::start(&etcd.url);
    let (leader, epoch1) = g.leader(30).await;
    g.start_agent("cpus:4;mem:2GiB");
    g.start_agent("cpus:4;mem:2GiB");
    g.active_agents(&leader, 2, 30).await;
    let (log, script) = g.launch_log();
    let per_task = "cpus:0.1;mem:16MiB";

    let mut fw = ProbeFramework::start(g.framework_config("ha-load")).await;
    let fw_id = fw.id.clone().expect("framework id");
    let mut to_launch: Vec<String> = (0..50).rev().map(|i| format!("t{i:02}")).collect();
    let mut running = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while running.len() < 50 {
        assert!(Instant::now() < deadline, "only {} of 50 tasks running after 60 s", running.len());
        match fw.next().await {
            Seen::Offers(offers) => {
                for o in &offers {
                    launch_into(&fw, o, &mut to_launch, &script, per_task);
                }
                fw.held.clear();
            }
            Seen::Update(u) if u.state == TaskState::Running => {
                running.insert(u.task_id.as_str().to_string());
            }
            Seen::Update(u) if u.state.is_terminal() => {
                panic!("{} ended {}: {} {}", u.task_id, u.state, u.reason, u.message)
            }
            _ => {}
        }
    }

    // The framework launches more, and the leader dies with the launch in flight.
    let offer = fw.offer().await;
    let mut more: Vec<String> = (0..5).rev().map(|i| format!("x{i}")).collect();
    let in_flight = launch_into(&fw, &offer, &mut more, &script, per_task);
    assert!(!in_flight.is_empty(), "the offer held no task: {offer:?}");
    let li = g.masters.iter().position(|m| m.addr == leader).expect("the leader");
    let killed = Instant::now();
    g.masters[li].proc.kill9();

    let (new_leader, epoch2) = g.leader_among_living(15).await;
    let to_leader = killed.elapsed();
    assert!(epoch2 > epoch1, "the new leader's epoch {epoch2} is not above {epoch1}");
    g.active_agents(&new_leader, 2, 30).await;
    let to_agents = killed.elapsed();
    let id = fw
        .until(|s| match s {
            Seen::Reregistered(id) => Some(id.clone()),
            Seen::Registered(id) => panic!("the framework registered anew as {id}"),
            _ => None,
        })
        .await;
    assert_eq!(id, fw_id, "the framework came back under another id");
    fw.offer().await;
    let to_offer = killed.elapsed();

    // Every task: the 50 run, each launched once; each of the launch in flight runs (once)
    // or is unknown to the new leader (never launched).
    let mut ids: BTreeSet<String> = running.clone();
    ids.extend(in_flight.iter().cloned());
    let states = reconcile_until(&mut fw, &ids, 30, |id, s| {
        if id.starts_with('t') {
            s == TaskState::Running
        } else {
            matches!(s, TaskState::Running | TaskState::Unknown) || s.is_terminal()
        }
    })
    .await;
    let launched = launches(&log);
    for id in &ids {
        let n = launched.get(id).copied().unwrap_or(0);
        match states[id] {
            TaskState::Running => assert_eq!(n, 1, "{id} runs after {n} launches"),
            other => assert_eq!(n, 0, "{id} is {other} on the new leader but was launched {n} times"),
        }
    }
    assert!(launched.keys().all(|k| ids.contains(k)), "unexpected launches: {launched:?}");
    let listed = ha::tasks(&new_leader, &g.tls).await;
    let listed_running = listed.iter().filter(|t| t.state == TaskState::Running).count();
    let expected_running = states.values().filter(|s| **s == TaskState::Running).count();
    assert_eq!(listed_running, expected_running, "{listed:?}");
    let lost = running.iter().filter(|t| states[*t] != TaskState::Running).count();
    println!(
        "HA failover under load (kill -9 of the leader, lease TTL 1 s, 2 agents, 50 tasks, \
         {} launched in flight of which {} ran): new leader after {to_leader:?}, all agents \
         re-registered after {to_agents:?}, first offer after {to_offer:?}, tasks lost: {lost}",
        in_flight.len(),
        in_flight.iter().filter(|t| states[*t] == TaskState::Running).count(),
    );

    // Teardown kills every task; then the agents stop.
    fw.driver().stop(true);
    let deadline = Instant::now() + Duration::from_secs(30);
    while ha::tasks(&new_leader, &g.tls).await.iter().any(|t| !t.state.is_terminal()) {
        assert!(Instant::now() < deadline, "tasks still running 30 s after teardown");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for a in &mut g.agents {
        let st = a.stop();
        assert!(st.success(), "agent: {st} {}", a.stderr_text());
    }
    drop(etcd);
}

/// `agora run` given the list of masters (client.toml) streams its task's output across a
/// `kill -9` of the leader, every line once and in order, and exits with the task's code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agora_run_keeps_streaming_across_a_failover_and_exits_with_the_task_code() {
    let etcd = Etcd::start();
    let mut g = Group::start(&etcd.url);
    let (leader, _) = g.leader(30).await;
    g.start_agent("cpus:2;mem:1GiB");
    g.active_agents(&leader, 1, 30).await;
    let config = ha::client_toml(g.dir.path(), &g.addrs());
    let script = "i=0; while [ $i -lt 50 ]; do i=$((i+1)); echo line$i; sleep 0.1; done; exit 7";
    let mut run = Proc::spawn(
        "agora-run",
        g.dir.path(),
        Command::new(AGORA)
            .env("AGORA_CONFIG", &config)
            .args(["run", "--cpus", "0.1", "--mem", "32MiB", "--", "sh", "-c", script]),
    );
    common::dev::poll("agora run to stream line3", 30, || {
        run.stdout_text().contains("line3\n").then_some(())
    });
    let li = g.masters.iter().position(|m| m.addr == leader).expect("the leader");
    g.masters[li].proc.kill9();
    let st = run.wait(60);
    assert_eq!(st.code(), Some(7), "agora run: {st}: {}", run.stderr_text());
    let expected: String = (1..=50).map(|i| format!("line{i}\n")).collect();
    assert_eq!(run.stdout_text(), expected, "stderr: {}", run.stderr_text());
    let (new_leader, _) = g.leader_among_living(15).await;
    assert_ne!(new_leader, leader);
    for a in &mut g.agents {
        assert!(a.stop().success(), "agent: {}", a.stderr_text());
    }
}

/// A three-member etcd loses its Raft leader (`kill -9`): the masters, given all three endpoints, keep
/// a leader, running tasks keep running, a new framework registers and launches; the member
/// comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_member_etcd_losing_a_member_keeps_the_cluster_working() {
    let mut members = Etcd::start_cluster(3);
    let mut g = Group::start(&Etcd::urls(&members));
    let (leader, epoch) = g.leader(30).await;
    g.start_agent("cpus:2;mem:1GiB");
    g.active_agents(&leader, 1, 30).await;
    let mut fw = ProbeFramework::start(g.framework_config("before")).await;
    let offer = fw.offer().await;
    fw.driver().launch(vec![offer.id], vec![sh_task("t1", "exec sleep 600", "cpus:0.1;mem:16MiB")]);
    fw.update_for("t1", TaskState::Running).await;
    // The rest of the agent is for the framework to come.
    fw.driver().suppress();
    drain(&mut fw, Duration::from_millis(500)).await;
    fw.decline_held(600.0);

    // The member that leads etcd's Raft: its loss is felt (an etcd election).
    let raft_leader = members.iter().position(Etcd::is_raft_leader).expect("an etcd member leads");
    members[raft_leader].kill9();
    let lost = Instant::now();
    // Longer than the lease (1 s) several times over: a leader that could not keep its lease
    // through the other members would have stepped down by now.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (leader2, epoch2) = g.leader(15).await;
    println!(
        "etcd member lost: the leader {} (epoch {epoch} → {epoch2}) {:?} later",
        if leader2 == leader && epoch2 == epoch { "stayed" } else { "changed" },
        lost.elapsed()
    );
    assert_eq!(
        (leader2.as_str(), epoch2),
        (leader.as_str(), epoch),
        "the leader changed on losing one etcd member"
    );
    // A registry write (a new framework) and a launch go through.
    let mut fw2 = ProbeFramework::start(g.framework_config("after")).await;
    let offer = fw2.offer().await;
    fw2.driver().launch(vec![offer.id], vec![sh_task("t2", "exec sleep 600", "cpus:0.1;mem:16MiB")]);
    fw2.update_for("t2", TaskState::Running).await;
    let frameworks = match ha::operator_call(&leader2, &g.tls, OperatorCall::GetFrameworks).await {
        OperatorReply::Frameworks(f) => f,
        other => panic!("GetFrameworks answered {other:?}"),
    };
    assert_eq!(frameworks.len(), 2, "{frameworks:?}");
    let tasks = ha::tasks(&leader2, &g.tls).await;
    assert!(tasks.iter().all(|t| t.state == TaskState::Running) && tasks.len() == 2, "{tasks:?}");

    members[raft_leader].restart();
    fw.driver().stop(true);
    fw2.driver().stop(true);
    let deadline = Instant::now() + Duration::from_secs(30);
    while ha::tasks(&leader2, &g.tls).await.iter().any(|t| !t.state.is_terminal()) {
        assert!(Instant::now() < deadline, "tasks still running 30 s after teardown");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for a in &mut g.agents {
        assert!(a.stop().success(), "agent: {}", a.stderr_text());
    }
}

/// The whole control plane restarted: etcd and all three masters `kill -9`ed and started
/// again (same addresses, data and work dirs) while the agent and its task stay up. A leader
/// with a higher epoch lists every framework (both, from the registry in etcd), the agent
/// re-registers with its running task, and the framework re-subscribes under its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_control_plane_restarted_recovers_every_framework() {
    let mut etcd = Etcd::start();
    let mut g = Group::start(&etcd.url);
    let (leader, epoch1) = g.leader(30).await;
    g.start_agent("cpus:2;mem:1GiB");
    g.active_agents(&leader, 1, 30).await;
    let mut a = ProbeFramework::start(g.framework_config("with-task")).await;
    let a_id = a.id.clone().expect("id");
    let offer = a.offer().await;
    a.driver().launch(vec![offer.id], vec![sh_task("a1", "exec sleep 600", "cpus:0.1;mem:16MiB")]);
    a.update_for("a1", TaskState::Running).await;
    let b = ProbeFramework::start(g.framework_config("idle")).await;
    let b_id = b.id.clone().expect("id");
    a.run.abort();
    b.run.abort();

    for m in &mut g.masters {
        m.proc.kill9();
    }
    etcd.restart();
    for i in 0..g.masters.len() {
        g.restart_master(i, &etcd.url.clone());
    }
    let (leader, epoch2) = g.leader(30).await;
    assert!(epoch2 > epoch1, "epoch {epoch2} after the restart is not above {epoch1}");
    g.active_agents(&leader, 1, 60).await;
    let listed = match ha::operator_call(&leader, &g.tls, OperatorCall::GetFrameworks).await {
        OperatorReply::Frameworks(f) => f,
        other => panic!("GetFrameworks answered {other:?}"),
    };
    let ids: BTreeSet<&str> = listed.iter().map(|f| f.id.as_str()).collect();
    assert_eq!(ids, BTreeSet::from([a_id.as_str(), b_id.as_str()]), "{listed:?}");
    let tasks = ha::tasks(&leader, &g.tls).await;
    assert!(
        tasks.len() == 1 && tasks[0].id.as_str() == "a1" && tasks[0].state == TaskState::Running,
        "{tasks:?}"
    );

    let mut cfg = g.framework_config("with-task");
    cfg.framework.id = Some(a_id.clone());
    let mut a = ProbeFramework::start(cfg).await;
    assert_eq!(a.id.as_ref(), Some(&a_id), "the framework came back under another id");
    let states =
        reconcile_until(&mut a, &BTreeSet::from(["a1".to_string()]), 30, |_, s| s == TaskState::Running)
            .await;
    assert_eq!(states["a1"], TaskState::Running);
    a.driver().stop(true);
    let deadline = Instant::now() + Duration::from_secs(30);
    while ha::tasks(&leader, &g.tls).await.iter().any(|t| !t.state.is_terminal()) {
        assert!(Instant::now() < deadline, "tasks still running 30 s after teardown");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for ag in &mut g.agents {
        assert!(ag.stop().success(), "agent: {}", ag.stderr_text());
    }
}

/// `agora policy set` (the CLI given the list of masters): a policy the master cannot read is
/// refused naming the entry; a good one is recorded in etcd, and after `kill -9` of the
/// leader the new leader has it in force (source `registry`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_policy_outlives_a_failover() {
    let etcd = Etcd::start();
    let mut g = Group::start(&etcd.url);
    let (leader, _) = g.leader(30).await;
    let config = ha::client_toml(g.dir.path(), &g.addrs());
    let agora = |args: &[&str]| common::dev::agora_with(&config, args);
    let policy_json = || {
        let out = agora(&["policy", "-o", "json"]);
        assert!(out.status.success(), "agora policy: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")
    };
    assert_eq!(policy_json()["source"], "flags");

    let out = agora(&["policy", "set", "--weights", "analytics=abc"]);
    assert!(!out.status.success(), "a weight that is no number was accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid weight `abc` for role analytics"), "{err}");

    let out =
        agora(&["policy", "set", "--weights", "analytics=2,web=1", "--quota", "analytics=cpus:1;mem:64MiB"]);
    assert!(out.status.success(), "agora policy set: {}", String::from_utf8_lossy(&out.stderr));
    let before = policy_json();
    assert_eq!(before["source"], "registry");
    assert_eq!(before["weights"], "analytics=2,web=1");
    assert_eq!(before["quotas"][0], "analytics=cpus:1;mem:64MiB");

    let li = g.masters.iter().position(|m| m.addr == leader).expect("the leader");
    g.masters[li].proc.kill9();
    let (new_leader, _) = g.leader_among_living(15).await;
    assert_ne!(new_leader, leader);
    assert_eq!(policy_json(), before, "the new leader has another policy");
}

/// Agents, the SDK and the CLI given etcd instead of a list (`etcd://HOST:PORT/CLUSTER`, as
/// Mesos's `zk://`): they read the masters registered there and find the leader, and follow
/// a failover; a malformed address or an etcd that does not answer is a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_find_the_masters_through_etcd() {
    let etcd = Etcd::start();
    let mut g = Group::start(&etcd.url);
    let (leader, _) = g.leader(30).await;
    let via_etcd = format!("etcd://{}/{}", etcd.addr, ha::CLUSTER);
    g.spawn_agent(0, "agent0", &via_etcd, "cpus:2;mem:1GiB");
    g.active_agents(&leader, 1, 30).await;
    let config = ha::client_toml(g.dir.path(), &[]);
    let text = std::fs::read_to_string(&config).expect("client.toml");
    std::fs::write(&config, text.replace("master = []", &format!("master = \"{via_etcd}\""))).expect("write");
    let agora = |args: &[&str]| common::dev::agora_with(&config, args);
    let out = agora(&["masters", "-o", "json"]);
    assert!(out.status.success(), "agora masters: {}", String::from_utf8_lossy(&out.stderr));
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(listed.iter().any(|m| m["leader"] == true && m["address"] == leader.as_str()), "{listed:?}");

    let mut cfg = DriverConfig::new(via_etcd.clone(), TlsFiles::in_dir(&g.tls, "framework"), "via-etcd");
    cfg.framework.failover_timeout = Duration::from_secs(120);
    let mut fw = ProbeFramework::start(cfg).await;
    let fw_id = fw.id.clone().expect("id");
    fw.offer().await;

    let li = g.masters.iter().position(|m| m.addr == leader).expect("the leader");
    g.masters[li].proc.kill9();
    let (new_leader, _) = g.leader_among_living(15).await;
    g.active_agents(&new_leader, 1, 30).await;
    let id = fw
        .until(|s| match s {
            Seen::Reregistered(id) => Some(id.clone()),
            _ => None,
        })
        .await;
    assert_eq!(id, fw_id);
    let out = agora(&["agents", "-o", "json"]);
    assert!(out.status.success(), "agora agents: {}", String::from_utf8_lossy(&out.stderr));

    let bad = common::dev::agora_with(&config, &["agents", "--master", &format!("etcd://{}", etcd.addr)]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("ends with /CLUSTER"), "{err}");
    let dead = format!("etcd://127.0.0.1:{}/{}", common::etcd::free_port(), ha::CLUSTER);
    let bad = common::dev::agora_with(&config, &["agents", "--master", &dead]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("etcd"), "{err}");
    fw.run.abort();
    for a in &mut g.agents {
        assert!(a.stop().success(), "agent: {}", a.stderr_text());
    }
}
