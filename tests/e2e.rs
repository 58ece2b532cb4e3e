//! End-to-end tests of the built `agora` binary for what the other suites reach only through
//! the library: `agora demo`, the README's real cluster (separate `agora master` and `agora
//! agent` processes, `agora tls init`/`issue` certificates, a hand-written client.toml), key
//! file modes, `agora logs -f`/`--stderr`, `--http`, the wiring of the allocation and isolation
//! flags, `--log-format json`, and the SDK driver failing over on its own.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use agora_sdk::proto::{TaskId, TaskState};
use common::dev::{http_get, poll, Dev, Proc, RealCluster, AGORA};
use common::proxy::UdpProxy;
use common::{sh_task, ProbeFramework, Seen};

// ---------------------------------------------------------------------------------------------
// The demo, certificates, the README's real cluster.

#[test]
fn demo_runs_every_framework_to_the_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(AGORA).arg("demo").current_dir(dir.path()).output().expect("agora demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "agora demo: {}\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "Agora demo: a master and two agents in this process, talking QUIC with mutual TLS on loopback.",
        "(and wasm-noop-0..19: 20 of 20 TASK_FINISHED)",
        "  etl-3     stdout: rows=3000",
        "  ml-eval   stdout: accuracy=0.93",
        "  wasm-hello stdout: hello from wasm: offers and fuel",
        "  ml-crash  stderr: segment 7 is corrupt",
    ] {
        assert!(text.lines().any(|l| l == line), "no line `{line}` in:\n{text}");
    }
    // 10 etl + 5 ml + 24 wasm + 6 custom; the failures are ml's two, wasm's trap, fuel and
    // memory cases; ml-forever is killed.
    let summary = text.lines().find(|l| l.starts_with("45 tasks in ")).unwrap_or_else(|| panic!("{text}"));
    assert!(summary.ends_with("s: 39 finished, 5 failed, 1 killed."), "{summary}");
    for (task, state) in [
        ("custom-alpha", "TASK_FINISHED"),
        ("ml-crash", "TASK_FAILED"),
        ("ml-forever", "TASK_KILLED"),
        ("wasm-membomb", "TASK_FAILED"),
        ("wasm-spin", "TASK_FAILED"),
    ] {
        let row =
            text.lines().find(|l| l.starts_with(&format!("{task} "))).unwrap_or_else(|| panic!("{text}"));
        assert_eq!(row.split_whitespace().nth(2), Some(state), "{row}");
    }
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

#[test]
fn tls_init_and_issue_write_private_keys_0600_and_certificates_readable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = dir.path().join("tls");
    let out = Command::new(AGORA).args(["tls", "init", "--dir"]).arg(&tls).output().expect("tls init");
    assert!(out.status.success(), "{out:?}");
    for (role, name) in [("agent", "node7"), ("framework", "batch"), ("operator", "alice")] {
        let out = Command::new(AGORA)
            .args(["tls", "issue", "--dir"])
            .arg(&tls)
            .args(["--role", role, "--name", name])
            .output()
            .expect("tls issue");
        assert!(out.status.success(), "{out:?}");
        // It prints the two files it wrote.
        let printed: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect();
        let want = [tls.join(format!("{name}.pem")), tls.join(format!("{name}-key.pem"))];
        let want: Vec<String> = want.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(printed, want);
    }
    let mut keys = Vec::new();
    let mut certs = Vec::new();
    for e in std::fs::read_dir(&tls).expect("read tls dir") {
        let p = e.expect("entry").path();
        let name = p.file_name().expect("name").to_string_lossy().into_owned();
        if name.ends_with("-key.pem") {
            assert_eq!(mode(&p), 0o600, "{name} is {:o}", mode(&p));
            keys.push(name);
        } else if name.ends_with(".pem") {
            // Certificates are public: readable by others, and not 0600.
            assert_eq!(mode(&p) & 0o044, 0o044, "{name} is {:o}", mode(&p));
            certs.push(name);
        }
    }
    keys.sort();
    certs.sort();
    assert_eq!(
        keys,
        [
            "agent-key.pem",
            "alice-key.pem",
            "batch-key.pem",
            "ca-key.pem",
            "framework-key.pem",
            "master-key.pem",
            "node7-key.pem",
            "operator-key.pem"
        ]
    );
    assert_eq!(
        certs,
        [
            "agent.pem",
            "alice.pem",
            "batch.pem",
            "ca.pem",
            "framework.pem",
            "master.pem",
            "node7.pem",
            "operator.pem"
        ]
    );
}

/// The README's "A real cluster", as written (loopback and a port of its own instead of
/// 0.0.0.0:5050, and the issued certificate actually used by the agent).
#[test]
fn real_cluster_as_in_the_readme() {
    let dir = RealCluster::prepare();
    let tls = dir.path().join("tls");
    let out = Command::new(AGORA)
        .args(["tls", "issue", "--dir"])
        .arg(&tls)
        .args(["--role", "agent", "--name", "node7"])
        .output()
        .expect("tls issue");
    assert!(out.status.success(), "{out:?}");
    let mut c = RealCluster::master_only(dir, &[]);
    c.start_agent(&[
        "--cert-name",
        "node7",
        "--hostname",
        "node7",
        "--resources",
        "cpus:4;mem:8GiB;disk:20GiB;ports:[31000-32000]",
        "--attributes",
        "rack:r1;zone:a",
    ]);
    let agents: Vec<serde_json::Value> =
        serde_json::from_slice(&c.agora(&["agents", "-o", "json"]).stdout).expect("agents json");
    assert_eq!(agents.len(), 1, "{agents:?}");
    assert_eq!(agents[0]["hostname"], "node7");
    assert_eq!(agents[0]["resources"], "cpus:4;mem:8GiB;disk:20GiB;ports:[31000-32000]", "{agents:?}");
    assert_eq!(agents[0]["attributes"], "rack:r1;zone:a", "{agents:?}");

    let out = c.agora(&["run", "--", "sh", "-c", "echo hello; exit 3"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n", "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(3));
    let tasks = c.tasks_json();
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(tasks[0]["state"], "TASK_FAILED");
    assert_eq!(tasks[0]["exit_code"], 3);
    assert_eq!(tasks[0]["agent_id"], agents[0]["id"]);
    let fws: Vec<serde_json::Value> =
        serde_json::from_slice(&c.agora(&["frameworks", "-o", "json"]).stdout).expect("frameworks json");
    assert_eq!(fws.len(), 1);
    // The principal comes from `tls init`'s framework certificate.
    assert_eq!(fws[0]["principal"], "default");
    c.stop();
}

// ---------------------------------------------------------------------------------------------
// `agora logs -f` and `--stderr`, `--http`.

/// A directory the task user can read, for a file that lets a task go on.
fn world_readable_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    d
}

fn task_named(tasks: &[serde_json::Value], name: &str) -> Option<serde_json::Value> {
    tasks.iter().find(|t| t["name"] == name).cloned()
}

#[test]
fn logs_follow_streams_until_the_task_ends_and_stderr_is_separate() {
    let dev = Dev::start("cpus:1;mem:256MiB");
    let gate = world_readable_dir();
    let go = gate.path().join("go");
    let script = format!(
        "echo out1; echo err1 >&2; while [ ! -e {} ]; do sleep 0.02; done; echo out2; echo err2 >&2",
        go.display()
    );
    let mut runner = Proc::spawn(
        "run",
        dev.dir.path(),
        Command::new(AGORA)
            .env("AGORA_CONFIG", &dev.config)
            .args(["run", "--name", "chatty", "--", "sh", "-c", &script]),
    );
    let id = poll("the task to run", 30, || {
        let t = task_named(&dev.tasks_json(), "chatty")?;
        (t["state"] == "TASK_RUNNING").then(|| t["id"].as_str().expect("id").to_string())
    });
    let follow = |name: &str, extra: &[&str]| {
        Proc::spawn(
            name,
            dev.dir.path(),
            Command::new(AGORA).env("AGORA_CONFIG", &dev.config).args(["logs", &id, "-f"]).args(extra),
        )
    };
    let mut out = follow("logs-out", &[]);
    let mut err = follow("logs-err", &["--stderr"]);
    // The first lines arrive while the task still runs (it waits for the gate).
    out.wait_stdout("out1", |l| (l == "out1").then_some(()));
    err.wait_stdout("err1", |l| (l == "err1").then_some(()));
    assert_eq!(task_named(&dev.tasks_json(), "chatty").expect("task")["state"], "TASK_RUNNING");
    std::fs::write(&go, b"").expect("open the gate");
    // The followers end by themselves when the task does, with everything it wrote.
    assert!(out.wait(30).success(), "{}", out.stderr_text());
    assert!(err.wait(30).success(), "{}", err.stderr_text());
    assert_eq!(out.stdout_text(), "out1\nout2\n");
    assert_eq!(err.stdout_text(), "err1\nerr2\n");
    assert!(runner.wait(30).success());
    // After the fact, without -f.
    assert_eq!(dev.agora(&["logs", &id, "--stderr"]).stdout, b"err1\nerr2\n");
    assert_eq!(dev.agora(&["logs", &id]).stdout, b"out1\nout2\n");
    dev.stop();
}

fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {metrics}"))
}

#[test]
fn dev_http_flag_serves_health_state_and_metrics() {
    let mut dev =
        Dev::start_with(&["--agents", "1", "--resources", "cpus:1;mem:256MiB", "--http", "127.0.0.1:0"]);
    let http = dev.stdout_line("HTTP: http://");
    let http = http.split('/').next().expect("address").to_string();
    assert_eq!(http_get(&http, "/health"), ("HTTP/1.0 200 OK".into(), "ok\n".into()));
    let out = dev.agora(&["run", "--name", "seen", "--", "true"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let (status, body) = http_get(&http, "/api/v1/state");
    assert_eq!(status, "HTTP/1.0 200 OK");
    let state: serde_json::Value = serde_json::from_str(&body).expect("state json");
    assert_eq!(state["agents"].as_array().expect("agents").len(), 1, "{state}");
    let tasks = state["tasks"].as_array().expect("tasks");
    assert_eq!(tasks.len(), 1, "{state}");
    assert_eq!(tasks[0]["name"], "seen");
    assert_eq!(tasks[0]["state"], "TASK_FINISHED");

    let (status, metrics) = http_get(&http, "/metrics");
    assert_eq!(status, "HTTP/1.0 200 OK");
    assert_eq!(metric(&metrics, "agora_master_tasks_launched_total"), 1.0, "{metrics}");
    assert_eq!(metric(&metrics, r#"agora_master_tasks_terminal_total{state="TASK_FINISHED"}"#), 1.0);
    assert_eq!(metric(&metrics, "agora_master_agents_active"), 1.0);
    let st = dev.stop();
    assert!(st.success(), "{st}");
}

#[test]
fn master_http_flag_serves_health_state_and_metrics() {
    let c = RealCluster::start(&["--http", "127.0.0.1:0"], &["--resources", "cpus:1;mem:256MiB"]);
    let http = c.http.clone().expect("--http address");
    assert_eq!(http_get(&http, "/health"), ("HTTP/1.0 200 OK".into(), "ok\n".into()));
    let out = c.agora(&["run", "--name", "seen", "--", "sh", "-c", "exit 4"]);
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    let (_, body) = http_get(&http, "/api/v1/state");
    let state: serde_json::Value = serde_json::from_str(&body).expect("state json");
    assert_eq!(state["tasks"][0]["state"], "TASK_FAILED", "{state}");
    let (_, metrics) = http_get(&http, "/metrics");
    assert_eq!(metric(&metrics, "agora_master_tasks_launched_total"), 1.0, "{metrics}");
    assert_eq!(metric(&metrics, r#"agora_master_tasks_terminal_total{state="TASK_FAILED"}"#), 1.0);
    assert_eq!(metric(&metrics, "agora_master_agents_active"), 1.0);
    c.stop();
}

// ---------------------------------------------------------------------------------------------
// Allocation flags, through `agora dev` and SDK frameworks.

fn cpus(o: &agora_sdk::proto::Offer) -> u64 {
    o.resources.flatten().cpus
}

/// Every offer `fw` holds: seen (also while waiting for other events, or delivered and not
/// yet read), not used and not rescinded.
fn pending_offers(fw: &mut ProbeFramework) -> Vec<agora_sdk::proto::Offer> {
    while let Ok((_, s)) = fw.rx.try_recv() {
        match s {
            Seen::Offers(o) => fw.held.extend(o),
            Seen::Rescinded(id) => fw.held.retain(|o| o.id != id),
            _ => {}
        }
    }
    fw.held.clone()
}

/// Launches `tasks` on `offer` and waits until each runs.
async fn launch_running(fw: &mut ProbeFramework, offer: &agora_sdk::proto::Offer, tasks: &[(&str, &str)]) {
    let infos = tasks.iter().map(|(id, r)| sh_task(id, "sleep 30", r)).collect();
    fw.driver().launch(vec![offer.id.clone()], infos);
    fw.held.retain(|o| o.id != offer.id);
    // In whatever order their updates come.
    let mut waiting: std::collections::BTreeSet<&str> = tasks.iter().map(|(id, _)| *id).collect();
    while !waiting.is_empty() {
        let running = fw
            .until(|s| match s {
                Seen::Update(u) if u.state == TaskState::Running => Some(u.task_id.as_str().to_string()),
                Seen::Update(u) if u.state.is_terminal() => {
                    panic!("{} ended {}: {}", u.task_id, u.state, u.message)
                }
                _ => None,
            })
            .await;
        waiting.remove(running.as_str());
    }
}

/// Which of two frameworks is offered something first (0 or 1), and that offer.
async fn first_offered(a: &mut ProbeFramework, b: &mut ProbeFramework) -> (usize, agora_sdk::proto::Offer) {
    loop {
        let (who, seen) = tokio::select! {
            s = a.next() => (0, s),
            s = b.next() => (1, s),
        };
        if let Seen::Offers(o) = seen {
            return (who, o[0].clone());
        }
    }
}

async fn kill_and_wait(fw: &mut ProbeFramework, id: &str) {
    fw.driver().kill(TaskId(id.into()));
    fw.update_for(id, TaskState::Killed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocator_priority_serves_the_higher_priority_role_first() {
    let dev = Dev::start_with(&[
        "--agents",
        "1",
        "--resources",
        "cpus:4;mem:1GiB",
        "--allocator",
        "priority",
        "--priorities",
        "hi=10,lo=1",
    ]);
    let mut lo = ProbeFramework::start(dev.driver_config("lo", "lo")).await;
    let whole = lo.offer().await;
    assert_eq!(cpus(&whole), 4000);
    let mut hi = ProbeFramework::start(dev.driver_config("hi", "hi")).await;
    launch_running(&mut lo, &whole, &[("lo-1", "cpus:1;mem:16MiB")]).await;
    let rest = hi.offer().await;
    assert_eq!(cpus(&rest), 3000);
    launch_running(&mut hi, &rest, &[("hi-1", "cpus:3;mem:16MiB")]).await;
    // hi holds 3 of 4 CPUs, lo 1. lo's CPU comes free: DRF would offer it to lo (the lower
    // share); priority offers it to hi.
    kill_and_wait(&mut lo, "lo-1").await;
    let (who, freed) = first_offered(&mut hi, &mut lo).await;
    assert_eq!((who, cpus(&freed)), (0, 1000), "the freed CPU went to lo: {freed:?}");
    assert_eq!(pending_offers(&mut lo), vec![], "lo got an offer before hi");
    kill_and_wait(&mut hi, "hi-1").await;
    dev.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drf_weights_favour_the_heavier_role() {
    let dev =
        Dev::start_with(&["--agents", "1", "--resources", "cpus:4;mem:1GiB", "--weights", "heavy=3,light=1"]);
    let mut heavy = ProbeFramework::start(dev.driver_config("heavy", "heavy")).await;
    let whole = heavy.offer().await;
    assert_eq!(cpus(&whole), 4000);
    let mut light = ProbeFramework::start(dev.driver_config("light", "light")).await;
    launch_running(&mut heavy, &whole, &[("h-1", "cpus:2;mem:16MiB")]).await;
    let rest = light.offer().await;
    assert_eq!(cpus(&rest), 2000);
    launch_running(&mut light, &rest, &[("l-1", "cpus:1;mem:16MiB"), ("l-2", "cpus:1;mem:16MiB")]).await;
    // heavy holds 2 of 4 CPUs (share 0.5, weighted 0.167), light 1 after the kill (0.25):
    // unweighted DRF would offer the freed CPU to light, weighted DRF to heavy.
    kill_and_wait(&mut light, "l-1").await;
    let (who, freed) = first_offered(&mut heavy, &mut light).await;
    assert_eq!((who, cpus(&freed)), (0, 1000), "the freed CPU went to light: {freed:?}");
    assert_eq!(pending_offers(&mut light), vec![], "light got an offer before heavy");
    kill_and_wait(&mut light, "l-2").await;
    kill_and_wait(&mut heavy, "h-1").await;
    dev.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_guarantee_is_kept_free_for_its_role() {
    let dev =
        Dev::start_with(&["--agents", "1", "--resources", "cpus:4;mem:1GiB", "--quota", "analytics=cpus:3"]);
    // Alone on the cluster, a framework of another role is offered only what the guarantee
    // leaves.
    let mut other = ProbeFramework::start(dev.driver_config("other", "web")).await;
    let o = other.offer().await;
    assert_eq!(cpus(&o), 1000);
    let mut analytics = ProbeFramework::start(dev.driver_config("analytics", "analytics")).await;
    let a = analytics.offer().await;
    assert_eq!(cpus(&a), 3000);
    dev.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_limit_caps_what_a_role_is_offered() {
    let dev =
        Dev::start_with(&["--agents", "1", "--resources", "cpus:4;mem:1GiB", "--quota-limit", "web=cpus:1"]);
    let mut web = ProbeFramework::start(dev.driver_config("web", "web")).await;
    let o = web.offer().await;
    assert_eq!(cpus(&o), 1000);
    launch_running(&mut web, &o, &[("w-1", "cpus:1;mem:16MiB")]).await;
    // The other three CPUs are free, and go to another role, never to web.
    let mut other = ProbeFramework::start(dev.driver_config("other", "batch")).await;
    let b = other.offer().await;
    assert_eq!(cpus(&b), 3000);
    assert_eq!(pending_offers(&mut web), vec![], "web was offered beyond its limit");
    kill_and_wait(&mut web, "w-1").await;
    dev.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_allocatable_keeps_crumbs_from_being_offered() {
    let dev =
        Dev::start_with(&["--agents", "1", "--resources", "cpus:2;mem:1GiB", "--min-allocatable", "cpus:1"]);
    let mut a = ProbeFramework::start(dev.driver_config("a", "*")).await;
    let whole = a.offer().await;
    assert_eq!(cpus(&whole), 2000);
    launch_running(&mut a, &whole, &[("big", "cpus:1.5;mem:16MiB")]).await;
    let mut b = ProbeFramework::start(dev.driver_config("b", "*")).await;
    // Half a CPU is free, below the minimum: five allocation cycles (200 ms) offer nothing.
    let quiet = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            if let Seen::Offers(o) = b.next().await {
                return o;
            }
        }
    })
    .await;
    assert!(quiet.is_err(), "a crumb was offered: {quiet:?}");
    assert_eq!(pending_offers(&mut a), vec![], "a crumb was offered to a");
    kill_and_wait(&mut a, "big").await;
    // The whole agent, not its crumb, once the task ends.
    let o = b.offer().await;
    assert_eq!(cpus(&o), 2000);
    dev.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offer_timeout_rescinds_an_unanswered_offer() {
    let dev =
        Dev::start_with(&["--agents", "1", "--resources", "cpus:1;mem:256MiB", "--offer-timeout", "1s"]);
    let mut fw = ProbeFramework::start(dev.driver_config("idle", "*")).await;
    let o = fw.offer().await;
    let got = Instant::now();
    let rescinded = fw
        .until(|s| match s {
            Seen::Rescinded(id) => Some(id.clone()),
            _ => None,
        })
        .await;
    assert_eq!(rescinded, o.id);
    let after = got.elapsed();
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(5),
        "rescinded after {after:?}"
    );
    assert!(fw.held.is_empty());
    dev.stop();
}

// ---------------------------------------------------------------------------------------------
// Isolation flags of `agora agent` (root: the agent runs tasks as `nobody` in cgroups).

/// controller → cgroup path, from /proc/PID/cgroup text (v2's line under "").
fn cgroups(text: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for l in text.lines() {
        let mut parts = l.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        for c in ctrls.split(',') {
            m.insert(c.to_string(), path.to_string());
        }
    }
    m
}

/// A task that prints its /proc/self/cgroup and then sleeps: its `agora run`, its id and
/// its cgroups.
fn task_cgroups(c: &RealCluster, name: &str, cpus: &str) -> (Proc, String, BTreeMap<String, String>) {
    let runner = Proc::spawn(
        &format!("run-{name}"),
        c.dir.path(),
        Command::new(AGORA).env("AGORA_CONFIG", &c.config).args([
            "run",
            "--name",
            name,
            "--cpus",
            cpus,
            "--",
            "sh",
            "-c",
            "cat /proc/self/cgroup; echo END; sleep 30",
        ]),
    );
    let id = poll("the task to run", 30, || {
        let t = task_named(&c.tasks_json(), name)?;
        (t["state"] == "TASK_RUNNING").then(|| t["id"].as_str().expect("id").to_string())
    });
    let text = poll("the task's cgroups", 30, || {
        let out = String::from_utf8_lossy(&c.agora(&["logs", &id]).stdout).into_owned();
        out.contains("END\n").then_some(out)
    });
    (runner, id, cgroups(&text))
}

fn kill_task(c: &RealCluster, mut runner: Proc, id: &str) {
    let out = c.agora(&["kill", id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(runner.wait(30).code(), Some(128 + 15));
}

fn is_v2(cg: &BTreeMap<String, String>) -> bool {
    cg.len() == 1 && cg.contains_key("")
}

/// (quota, period) of the cgroup's CFS bandwidth; quota None for none.
fn cfs(cg: &BTreeMap<String, String>) -> (Option<u64>, u64) {
    let read =
        |p: String| std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p}: {e}")).trim().to_string();
    if is_v2(cg) {
        let max = read(format!("/sys/fs/cgroup{}/cpu.max", cg[""]));
        let (q, p) = max.split_once(' ').expect("cpu.max");
        (q.parse().ok(), p.parse().expect("period"))
    } else {
        let dir = format!("/sys/fs/cgroup/cpu{}", cg["cpu"]);
        let q: i64 = read(format!("{dir}/cpu.cfs_quota_us")).parse().expect("quota");
        (u64::try_from(q).ok(), read(format!("{dir}/cpu.cfs_period_us")).parse().expect("period"))
    }
}

#[test]
fn cpu_limit_hard_sets_a_cfs_quota_and_soft_none() {
    if !common::root_or_skip("cgroups need root") {
        return;
    }
    for (limit, want_quota) in [("hard", true), ("soft", false)] {
        let c = RealCluster::start(&[], &["--resources", "cpus:2;mem:512MiB", "--cpu-limit", limit]);
        let (runner, id, cg) = task_cgroups(&c, "cfs", "0.5");
        let (quota, period) = cfs(&cg);
        if want_quota {
            assert_eq!(quota, Some(period / 2), "--cpu-limit hard, 0.5 CPU: {cg:?}");
        } else {
            assert_eq!(quota, None, "--cpu-limit soft: {cg:?}");
        }
        kill_task(&c, runner, &id);
        c.stop();
    }
}

/// Removes a cgroup directory and those below it, in every hierarchy, when dropped.
struct CgroupCleanup(String);

impl Drop for CgroupCleanup {
    fn drop(&mut self) {
        fn rm(p: &std::path::Path) {
            if let Ok(entries) = std::fs::read_dir(p) {
                for e in entries.flatten() {
                    if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        rm(&e.path());
                    }
                }
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::fs::remove_dir(p).is_err() && p.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let rel = self.0.trim_start_matches('/');
        let mut roots = vec![std::path::PathBuf::from("/sys/fs/cgroup")];
        if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
            roots.extend(entries.flatten().map(|e| e.path()));
        }
        for r in roots {
            let p = r.join(rel);
            if p.is_dir() {
                rm(&p);
            }
        }
    }
}

#[test]
fn cgroup_root_puts_task_cgroups_under_it() {
    if !common::root_or_skip("cgroups need root") {
        return;
    }
    let root = format!("/agora-test-{}", uuid::Uuid::new_v4().simple());
    let _cleanup = CgroupCleanup(root.clone());
    let c = RealCluster::start(&[], &["--resources", "cpus:1;mem:512MiB", "--cgroup-root", &root]);
    let (runner, id, cg) = task_cgroups(&c, "rooted", "0.1");
    let controllers: &[&str] = if is_v2(&cg) { &[""] } else { &["cpu", "memory", "pids"] };
    for ctrl in controllers {
        let path = &cg[*ctrl];
        assert!(path.starts_with(&format!("{root}/")), "{ctrl}: {path} is not under {root}");
        let last = path.rsplit('/').next().expect("name");
        assert!(last.starts_with("task-"), "{ctrl}: {path}");
    }
    kill_task(&c, runner, &id);
    c.stop();
}

#[test]
fn isolation_none_runs_tasks_in_no_task_cgroup() {
    if !common::root_or_skip("the agent checks isolation as root") {
        return;
    }
    let c = RealCluster::start(&[], &["--resources", "cpus:1;mem:512MiB", "--isolation", "none"]);
    let agent_cg = cgroups(
        &std::fs::read_to_string(format!("/proc/{}/cgroup", c.agent.as_ref().expect("agent").pid()))
            .expect("agent cgroup"),
    );
    let (runner, id, cg) = task_cgroups(&c, "free", "0.1");
    // In the agent's own groups: nothing of Agora's below them.
    assert_eq!(cg, agent_cg);
    for path in cg.values() {
        assert!(
            !path.split('/').any(|p| p.starts_with("task-") || p.starts_with("agora-")),
            "{path} in {cg:?}"
        );
    }
    kill_task(&c, runner, &id);
    c.stop();
}

#[test]
fn max_pids_per_task_fails_a_fork_bomb_with_process_limit_reached() {
    if !common::root_or_skip("cgroups need root") {
        return;
    }
    let c = RealCluster::start(&[], &["--resources", "cpus:1;mem:512MiB", "--max-pids-per-task", "8"]);
    let out = c.agora(&[
        "run",
        "--name",
        "bomb",
        "--",
        "sh",
        "-c",
        "i=0; while [ $i -lt 64 ]; do sleep 2 & i=$((i+1)); done; wait",
    ]);
    assert_ne!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let t = task_named(&c.tasks_json(), "bomb").expect("the task");
    assert_eq!(t["state"], "TASK_FAILED", "{t}");
    assert_eq!(t["reason"], "process limit reached", "{t}");
    c.stop();
}

// ---------------------------------------------------------------------------------------------
// --log-format json.

#[test]
fn log_format_json_makes_every_stderr_line_json() {
    let mut c = RealCluster::start(
        &["--log-format", "json"],
        &["--log-format", "json", "--resources", "cpus:1;mem:256MiB"],
    );
    let out = c.agora(&["run", "--", "true"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Stopped, so that their shutdown lines are read too.
    let mut agent = c.agent.take().expect("agent");
    assert!(agent.stop().success());
    assert!(c.master.stop().success());
    for (who, text) in [("master", c.master.stderr_text()), ("agent", agent.stderr_text())] {
        let lines: Vec<&str> = text.lines().collect();
        assert!(!lines.is_empty(), "the {who} logged nothing");
        for l in &lines {
            let v: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{who} stderr line is not JSON ({e}): {l}"));
            assert!(v["level"].is_string() && v["fields"].is_object(), "{who}: {l}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The SDK driver fails over on its own when the master goes silent.

/// Subscribes through the relay, silences it, and expects the driver to give the connection
/// up within `notice` (a new connection attempt), then to re-subscribe with the same id once
/// the relay forwards again.
async fn fails_over_through(
    master: std::net::SocketAddr,
    mut cfg: agora_sdk::scheduler::DriverConfig,
    notice: Duration,
) -> (ProbeFramework, UdpProxy) {
    let relay = UdpProxy::start(master);
    cfg.master = relay.addr.to_string();
    cfg.framework.failover_timeout = Duration::from_secs(60);
    let mut fw = ProbeFramework::start(cfg).await;
    let id = fw.id.clone().expect("id");
    relay.cut();
    let silenced = Instant::now();
    let deadline = silenced + notice;
    while relay.initials() == 0 {
        assert!(Instant::now() < deadline, "the driver did not notice the silent master within {notice:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let noticed = silenced.elapsed();
    relay.heal();
    let again = fw
        .until(|s| match s {
            Seen::Reregistered(id) => Some(id.clone()),
            _ => None,
        })
        .await;
    assert_eq!(again, id, "re-subscribed as another framework");
    eprintln!("noticed the silent master after {noticed:?}; re-subscribed as {again}");
    (fw, relay)
}

/// The driver against a master whose framework heartbeat is 1 s: three missed heartbeats
/// and it reconnects, and fails over to the same framework id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_driver_fails_over_after_heartbeat_loss() {
    let cluster = common::TestCluster::start(1, "cpus:1;mem:256MiB").await;
    let cfg = cluster.framework("failover");
    let (mut fw, _relay) = fails_over_through(cluster.master.addr, cfg, Duration::from_secs(6)).await;
    // The same framework, connected, and offered resources again.
    let fws = cluster.master.frameworks().await;
    assert_eq!(fws.len(), 1, "{fws:?}");
    assert_eq!(Some(&fws[0].id), fw.id.as_ref());
    let o = fw.offer().await;
    assert_eq!(cpus(&o), 1000);
    cluster.stop().await;
}

/// The same against the `agora master` binary, as a framework meets it.
/// (`--framework-heartbeat` defaults to 1 s: a silent master is given up after 3 s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_driver_notices_a_silent_agora_master_within_seconds() {
    let c = RealCluster::start(&[], &["--resources", "cpus:1;mem:256MiB"]);
    let master: std::net::SocketAddr = c.addr.parse().expect("addr");
    let _fw = fails_over_through(master, c.framework_config("failover"), Duration::from_secs(9)).await;
    c.stop();
}

/// A master restarted on the same address and work dir: the driver reconnects and re-subscribes
/// with its id, which the master knows from its registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_driver_fails_over_to_a_restarted_master() {
    let dir = RealCluster::prepare();
    let work = dir.path().join("master-work");
    let work = work.to_str().expect("utf-8").to_string();
    let mut c = RealCluster::master_only(dir, &["--work-dir", &work]);
    let mut fw = ProbeFramework::start(c.framework_config("restart")).await;
    let id = fw.id.clone().expect("id");
    let addr = c.addr.clone();
    assert!(c.master.stop().success());
    c.master = Proc::spawn(
        "master-2",
        c.dir.path(),
        Command::new(AGORA).args(["master", "--listen", &addr, "--work-dir", &work, "--tls-dir"]).arg(&c.tls),
    );
    let again = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match fw.rx.recv().await {
                Some((_, Seen::Reregistered(id))) => return Some(id),
                Some(_) => continue,
                None => return None,
            }
        }
    })
    .await
    .expect("no re-subscription within 30 s");
    let Some(again) = again else {
        panic!("the driver gave up: {:?}", (&mut fw.run).await);
    };
    assert_eq!(again, id);
    c.stop();
}
