//! Native command tasks under `agora executor-command` on a real cluster, as root with cgroups:
//! the executor is their parent; exit codes, signals, the kill grace period, the OOM and pids
//! reasons stay right; and a task runs as the task user, cannot read another framework's
//! sandbox, the agent's checkpoints or any key, and cannot move itself out of its cgroup.
//!
//! These need root (cgroups, switching users). Elsewhere they skip with a line on stderr;
//! with `AGORA_REQUIRE_ROOT_TESTS=1` (CI) a skip is a failure.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agora_sdk::proto::*;
use common::*;

fn task(id: &str, script: &str, resources: &str, env: &[(&str, String)]) -> TaskInfo {
    let mut t = sh_task(id, script, resources);
    if let TaskKind::Command(c) = &mut t.kind {
        c.env = env.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    }
    t
}

/// Waits for each named task's terminal update.
async fn terminal(fw: &mut ProbeFramework, ids: &[&str]) -> BTreeMap<String, TaskStatus> {
    let mut out = BTreeMap::new();
    while out.len() < ids.len() {
        if let Seen::Update(u) = fw.next().await {
            if u.state.is_terminal() && ids.contains(&u.task_id.as_str()) {
                out.insert(u.task_id.to_string(), u);
            }
        }
    }
    out
}

/// The only run directory of `task` of the framework `fw` on agent 0.
fn sandbox_of(c: &TestCluster, fw: &FrameworkId, task: &str) -> PathBuf {
    let runs = c.agent_dir(0).join("frameworks").join(fw.as_str()).join("executors").join(task).join("runs");
    std::fs::read_dir(&runs).expect("runs").flatten().next().expect("one run").path()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_tasks_under_the_executor_keep_their_exit_codes_signals_and_limit_reasons() {
    if !root_or_skip("cgroups, task users") {
        return;
    }
    let c = TestCluster::start(1, "cpus:8;mem:8GiB").await;
    let mut fw = ProbeFramework::start(c.framework("cmd")).await;
    let offer = fw.offer().await;
    fw.held.clear();
    let mut stubborn =
        task("stubborn", "trap '' TERM; echo ready; while :; do sleep 0.05; done", "cpus:0.1;mem:32MiB", &[]);
    stubborn.kill_grace = Some(Duration::from_millis(400));
    let tasks = vec![
        task("exit7", "echo out; echo err >&2; exit 7", "cpus:0.1;mem:32MiB", &[]),
        task("ok", "cat /proc/self/cgroup; echo ppid=$PPID", "cpus:0.1;mem:32MiB", &[]),
        task("signal", "kill -9 $$", "cpus:0.1;mem:32MiB", &[]),
        task("oom", "head -c 300000000 /dev/zero | tail > /dev/null", "cpus:0.5;mem:32MiB", &[]),
        task(
            "forks",
            "i=0; while [ $i -lt 1100 ]; do sleep 5 & i=$((i+1)); done; wait",
            "cpus:0.5;mem:512MiB",
            &[],
        ),
        stubborn,
    ];
    fw.driver().launch(vec![offer.id], tasks);
    // One loop sees every update (waiting for one task must not skip another's end).
    let names = ["exit7", "ok", "signal", "oom", "forks", "stubborn"];
    let sandbox =
        |c: &TestCluster, fw: &ProbeFramework| sandbox_of(c, fw.id.as_ref().expect("id"), "stubborn");
    let mut ends = BTreeMap::new();
    let mut running = None;
    let mut started = None;
    while ends.len() < names.len() {
        let seen = tokio::time::timeout(Duration::from_millis(50), fw.next()).await;
        if let Ok(Seen::Update(u)) = seen {
            if u.state.is_terminal() {
                ends.insert(u.task_id.to_string(), u);
            } else if u.task_id.as_str() == "stubborn" && u.state == TaskState::Running {
                running = Some(u);
            }
        }
        if started.is_none() && running.is_some() && read(&sandbox(&c, &fw).join("stdout")).contains("ready")
        {
            started = Some(Instant::now());
            fw.driver().kill(TaskId::new("stubborn"));
        }
    }
    let running = running.expect("stubborn ran");
    let started = started.expect("stubborn was killed");
    let waited = started.elapsed();

    let e = &ends["exit7"];
    assert_eq!((e.state, e.reason.as_str(), e.exit_code), (TaskState::Failed, "command exited", Some(7)));
    let dir = sandbox_of(&c, fw.id.as_ref().expect("id"), "exit7");
    assert_eq!((read(&dir.join("stdout")), read(&dir.join("stderr"))), ("out\n".into(), "err\n".into()));

    let ok = &ends["ok"];
    assert_eq!((ok.state, ok.exit_code), (TaskState::Finished, Some(0)));
    let out = read(&sandbox_of(&c, fw.id.as_ref().expect("id"), "ok").join("stdout"));
    assert!(out.contains("/task-"), "the task runs in its own cgroup: {out}");
    let ppid: u32 =
        out.lines().find_map(|l| l.strip_prefix("ppid=")).and_then(|p| p.parse().ok()).expect("ppid");
    let parent = std::fs::read(format!("/proc/{ppid}/cmdline")).unwrap_or_default();
    let parent = String::from_utf8_lossy(&parent).replace('\0', " ");
    assert!(parent.contains("executor-command"), "the command executor is the task's parent: {parent}");
    assert_ne!(ppid, std::process::id(), "not the agent");

    let s = &ends["signal"];
    assert_eq!(
        (s.state, s.reason.as_str(), s.signal),
        (TaskState::Failed, "killed by signal", Some(libc::SIGKILL))
    );

    let oom = &ends["oom"];
    assert_eq!((oom.state, oom.reason.as_str()), (TaskState::Failed, "memory limit exceeded"), "{oom:?}");

    let forks = &ends["forks"];
    assert_eq!(
        (forks.state, forks.reason.as_str()),
        (TaskState::Failed, "process limit reached"),
        "{forks:?}"
    );

    let k = &ends["stubborn"];
    assert_eq!((k.state, k.signal), (TaskState::Killed, Some(libc::SIGKILL)), "{k:?}");
    assert!(waited >= Duration::from_millis(400), "SIGKILL only after the grace period ({waited:?})");
    assert!(running.message.starts_with("process "), "{}", running.message);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_executor_that_dies_leaves_no_task_running() {
    if !root_or_skip("cgroups, task users") {
        return;
    }
    let c = TestCluster::start(1, "cpus:8;mem:8GiB").await;
    let mut fw = ProbeFramework::start(c.framework("cmd")).await;
    let offer = fw.offer().await;
    fw.held.clear();
    // The task forks a child that leaves its process group: only the cgroup still holds it.
    let script = "setsid sleep 300 & echo $! > bg.pid; echo $$ > me.pid; sleep 300";
    fw.driver().launch(vec![offer.id], vec![task("victim", script, "cpus:0.1;mem:32MiB", &[])]);
    fw.update_for("victim", TaskState::Running).await;
    let dir = sandbox_of(&c, fw.id.as_ref().expect("id"), "victim");
    let pid_file = |name: &str| {
        let p = dir.join(name);
        move || {
            let p = p.clone();
            async move { read(&p).trim().parse::<i32>().is_ok() }
        }
    };
    wait_for("the task's pids", pid_file("bg.pid")).await;
    wait_for("the task's pids", pid_file("me.pid")).await;
    let me: i32 = read(&dir.join("me.pid")).trim().parse().expect("pid");
    let bg: i32 = read(&dir.join("bg.pid")).trim().parse().expect("pid");
    let status = std::fs::read_to_string(format!("/proc/{me}/status")).expect("status");
    let ppid: i32 = status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("ppid");
    // SAFETY: kill(2) of the command executor this test's agent started.
    unsafe { libc::kill(ppid, libc::SIGKILL) };
    let end = terminal(&mut fw, &["victim"]).await;
    let v = &end["victim"];
    assert_eq!((v.state, v.reason.as_str()), (TaskState::Failed, "executor terminated"), "{v:?}");
    let gone = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
            .unwrap_or(true)
    };
    wait_for("the task's processes to be gone", || async move { gone(me) && gone(bg) }).await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_task_runs_unprivileged_and_cannot_reach_what_is_not_its_own() {
    if !root_or_skip("cgroups, task users") {
        return;
    }
    let c = TestCluster::start(1, "cpus:8;mem:8GiB").await;
    let work = c.agent_dir(0);
    let tls = c.dir.path().join("tls");

    // Framework A keeps a secret in its sandbox.
    let mut a = ProbeFramework::start(c.framework("a")).await;
    let offer = a.offer().await;
    a.held.clear();
    a.driver().launch(
        vec![offer.id],
        vec![task("secret", "echo s3cret > secret.txt; sleep 30", "cpus:0.1;mem:32MiB", &[])],
    );
    a.update_for("secret", TaskState::Running).await;
    // Leave the rest of the agent to B.
    a.decline_held(3600.0);
    a.driver().suppress();
    let a_id = a.id.clone().expect("a");
    let a_sandbox = sandbox_of(&c, &a_id, "secret");
    wait_for("the secret", || {
        let p = a_sandbox.join("secret.txt");
        async move { read(&p) == "s3cret\n" }
    })
    .await;

    // Framework B's task tries everything it should not be able to do, and one thing it
    // should (its own sandbox) as a positive control. Each line says what happened.
    let script = r#"
        echo "uid=$(id -u) gid=$(id -g) groups=$(id -G)"
        echo mine > mine.txt && echo "own=$(cat mine.txt)"
        try() { name=$1; shift; if "$@" >/dev/null 2>&1; then echo "$name=OPEN"; else echo "$name=closed"; fi; }
        try sandbox cat "$A_SANDBOX/secret.txt"
        try list-frameworks ls "$WORK/frameworks"
        try list-work ls "$WORK"
        try task-json cat "$A_TASK_JSON"
        try groups-file cat "$WORK/task-groups.json"
        try agent-id cat "$WORK/agent_id"
        try artifacts ls "$WORK/artifacts"
        try pos-ca-cert cat "$TLS/ca.pem"
        try pos-own-proc ls /proc/self/cwd/
        try pos-a-alive kill -0 "$A_PID"
        try agent-key cat "$TLS/agent-key.pem"
        try ca-key cat "$TLS/ca-key.pem"
        try framework-key cat "$TLS/framework-key.pem"
        try proc-cwd ls "/proc/$A_PID/cwd/"
        try proc-environ cat "/proc/$A_PID/environ"
        for line in $(cat /proc/self/cgroup); do
            path=${line#*:*:}; ctrl=${line#*:}; ctrl=${ctrl%%:*}
            case "$ctrl" in ""|*memory*|*pids*|*cpu*) ;; *) continue ;; esac
            base=/sys/fs/cgroup/$ctrl; [ -z "$ctrl" ] && base=/sys/fs/cgroup
            [ -d "$base" ] || base=/sys/fs/cgroup/unified
            try "escape-$ctrl" sh -c "echo $$ > '$base$path/../cgroup.procs'"
            try "escape-root-$ctrl" sh -c "echo $$ > '$base/cgroup.procs'"
        done
        echo done
    "#;
    let a_pid =
        std::fs::read_to_string(a_sandbox.parent().expect("runs").parent().expect("ex").join("task.json"))
            .ok()
            .and_then(|j| serde_json::from_str::<serde_json::Value>(&j).ok())
            .and_then(|v| v["pid"].as_u64())
            .expect("the secret task's pid in its checkpoint");
    let env = [
        ("A_SANDBOX", a_sandbox.display().to_string()),
        ("WORK", work.display().to_string()),
        ("TLS", tls.display().to_string()),
        (
            "A_TASK_JSON",
            a_sandbox.parent().expect("runs").parent().expect("ex").join("task.json").display().to_string(),
        ),
        ("A_PID", a_pid.to_string()),
    ];
    let mut b = ProbeFramework::start(c.framework("b")).await;
    let offer = b.offer().await;
    b.held.clear();
    b.driver().launch(vec![offer.id], vec![task("probe", script, "cpus:0.1;mem:64MiB", &env)]);
    let end = terminal(&mut b, &["probe"]).await;
    assert_eq!(end["probe"].state, TaskState::Finished, "{:?}", end["probe"]);
    let out = read(&sandbox_of(&c, b.id.as_ref().expect("b"), "probe").join("stdout"));
    eprintln!("the probe reported:\n{out}");
    let lines: BTreeMap<&str, &str> = out.lines().filter_map(|l| l.split_once('=')).collect();
    assert!(out.ends_with("done\n"), "{out}");
    assert_eq!(lines.get("own"), Some(&"mine"), "positive control: its own sandbox works\n{out}");
    let ids = lines.get("uid").copied().unwrap_or_default();
    assert!(ids.starts_with("65534 gid="), "runs as nobody: {ids}");
    let gid: u32 = ids
        .split("gid=")
        .nth(1)
        .and_then(|g| g.split_whitespace().next())
        .and_then(|g| g.parse().ok())
        .expect("gid");
    assert!(gid >= agora_agent::user::DEFAULT_FIRST_TASK_GID, "its framework's own group: {gid}");
    assert!(out.contains(&format!("groups={gid}\n")), "no other group: {out}");
    let mut escapes = 0;
    for (what, how) in &lines {
        if ["uid", "own"].contains(what) {
            continue;
        }
        if what.starts_with("pos-") {
            // Positive controls: the paths are right and reachable where they should be (the
            // public CA certificate, its own /proc entry; signals are the one thing a shared
            // uid still allows, until per-framework users).
            assert_eq!(*how, "OPEN", "{what}\n{out}");
            continue;
        }
        assert_eq!(*how, "closed", "{what} must be closed to another framework's task\n{out}");
        escapes += usize::from(what.starts_with("escape"));
    }
    assert!(escapes >= 2, "the cgroup escape attempts ran: {out}");
    // The positive control on the other side: A's own task still sees its secret.
    assert_eq!(read(&a_sandbox.join("secret.txt")), "s3cret\n");
    a.driver().kill(TaskId::new("secret"));
    terminal(&mut a, &["secret"]).await;
    c.stop().await;
}
