//! Frameworks' own executors on a real cluster: the `echo_executor` example (built with the
//! tests) uploaded through the artifact store, fetched by the agent, started as the task user,
//! running many tasks in one process, exchanging framework messages, crashing.

mod common;

use std::path::{Path, PathBuf};

use agora_sdk::proto::*;
use agora_sdk::Resources;
use common::*;

fn echo_executor() -> PathBuf {
    example("echo_executor")
}

async fn upload_executor(c: &TestCluster) -> ArtifactRef {
    let session =
        agora_sdk::client::Session::connect(&c.master.addr.to_string(), &c.tls("framework"), Role::Framework)
            .await
            .expect("connect");
    let r = agora_sdk::artifacts::upload(
        &session.conn,
        ArtifactKind::Executable,
        "echo_executor",
        &echo_executor(),
    )
    .await
    .expect("upload");
    session.conn.close(0u32.into(), b"done");
    r
}

fn echo_info(artifact: &ArtifactRef) -> ExecutorInfo {
    ExecutorInfo {
        executor_id: ExecutorId::new("echo"),
        name: "echo".into(),
        command: CommandInfo { argv: vec!["./echo_executor".into()], shell: false, env: vec![] },
        resources: Resources::parse("cpus:0.1;mem:64MiB").expect("resources"),
        fetch: vec![FetchInfo { artifact: artifact.clone(), path: "echo_executor".into(), executable: true }],
    }
}

fn echo_task(id: &str, artifact: &ArtifactRef, data: &str) -> TaskInfo {
    TaskInfo {
        task_id: TaskId::new(id),
        name: id.into(),
        resources: Resources::parse("cpus:0.1;mem:16MiB").expect("resources"),
        kind: TaskKind::Executor(Box::new(ExecutorTask { executor: echo_info(artifact), data: data.into() })),
        kill_grace: None,
        user: None,
    }
}

/// `pid=<n>` in an echo executor's RUNNING message.
fn pid_in(status: &TaskStatus) -> u32 {
    status
        .message
        .split_whitespace()
        .find_map(|w| w.strip_prefix("pid="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {:?}", status.message))
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// Real and effective uid and gid of a process, from `/proc/<pid>/status`.
fn ids_of(pid: u32) -> (u32, u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| -> u32 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in status of {pid}"))
    };
    (field("Uid:"), field("Gid:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_share_one_executor_that_talks_to_its_scheduler_and_fails_its_tasks_when_it_crashes() {
    let c = TestCluster::start(1, "cpus:4;mem:4GiB").await;
    let artifact = upload_executor(&c).await;
    let mut fw = ProbeFramework::start(c.framework("echo")).await;
    let offer = fw.offer().await;
    let agent = offer.agent_id.clone();
    fw.held.clear();
    let tasks = vec![
        echo_task("quick", &artifact, ""),
        echo_task("sleep-1", &artifact, "sleep"),
        echo_task("sleep-2", &artifact, "sleep"),
        echo_task("sleep-3", &artifact, "sleep"),
    ];
    fw.driver().launch(vec![offer.id], tasks);
    // One loop sees every update (waiting for one task must not skip another's).
    let mut running = std::collections::BTreeMap::new();
    let mut finished = None;
    while running.len() < 4 || finished.is_none() {
        if let Seen::Update(u) = fw.next().await {
            match u.state {
                TaskState::Running => {
                    running.insert(u.task_id.to_string(), pid_in(&u));
                }
                TaskState::Finished if u.task_id.as_str() == "quick" => finished = Some(u),
                s => panic!("unexpected {s} for {}: {}", u.task_id, u.message),
            }
        }
    }
    let pids: Vec<u32> = running.values().copied().collect();
    let pid = pids[0];
    assert!(pids.iter().all(|p| *p == pid), "every task runs in one executor process: {pids:?}");
    let finished = finished.expect("quick finished");
    assert!(finished.message.starts_with("count="), "{}", finished.message);
    assert!(alive(pid));
    // The task user and the executor's cgroup need root (skipped, with a line, elsewhere).
    let root = root_or_skip("task user, executor cgroup");
    if root {
        let (uid, gid) = ids_of(pid);
        assert_ne!(uid, 0, "a framework's executor never runs as root");
        assert_eq!(uid, 65534, "it runs as the task user (nobody)");
        assert!(gid >= agora_agent::user::DEFAULT_FIRST_TASK_GID, "with its framework's own group: {gid}");
    }
    // Its sandbox holds the fetched binary with the execute bit, and is the framework's alone.
    let sandbox = c.agent_dir(0).join("frameworks");
    let binary = find_file(&sandbox, "echo_executor").expect("the fetched executor in its sandbox");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&binary).expect("binary").permissions().mode();
        assert_eq!(mode & 0o111, 0o111, "executable: {mode:o}");
        let dir_mode =
            std::fs::metadata(binary.parent().expect("sandbox")).expect("sandbox").permissions().mode();
        assert_eq!(dir_mode & 0o007, 0, "no access for others: {dir_mode:o}");
    }

    // The operator's view names each task's executor.
    let views = c.master.tasks().await;
    let sleeping = views.iter().find(|t| t.id.as_str() == "sleep-1").expect("listed");
    assert_eq!(sleeping.executor_id, ExecutorId::new("echo"));
    if root {
        // The executor's cgroup holds its own memory plus its running tasks' (3 × 16 MiB).
        let limit = || memory_limit(pid);
        wait_for("the executor's cgroup to be sized", || async move { limit() == Some((64 + 3 * 16) << 20) })
            .await;
    }

    // Kill one: its neighbours run on in the same process.
    fw.driver().kill(TaskId::new("sleep-1"));
    let killed = fw.update_for("sleep-1", TaskState::Killed).await;
    assert_eq!(killed.reason, "killed");
    assert!(alive(pid));
    if root {
        // Resized as tasks come and go.
        let limit = || memory_limit(pid);
        wait_for("the executor's cgroup to shrink", || async move { limit() == Some((64 + 2 * 16) << 20) })
            .await;
    }

    // Framework messages both ways, and the cap.
    fw.driver()
        .send_framework_message(agent.clone(), ExecutorId::new("echo"), b"ping".to_vec())
        .expect("send");
    let reply = fw
        .until(|s| match s {
            Seen::Message { agent_id, executor_id, data } => {
                Some((agent_id.clone(), executor_id.clone(), data.clone()))
            }
            _ => None,
        })
        .await;
    assert_eq!(reply, (agent.clone(), ExecutorId::new("echo"), b"pong echo tasks=4".to_vec()));
    let too_big = vec![0u8; MAX_FRAMEWORK_MESSAGE + 1];
    let err =
        fw.driver().send_framework_message(agent.clone(), ExecutorId::new("echo"), too_big).unwrap_err();
    assert_eq!(err.size, MAX_FRAMEWORK_MESSAGE + 1);
    // A message to an executor that does not run is dropped, not an error to anyone.
    fw.driver()
        .send_framework_message(agent.clone(), ExecutorId::new("nobody-here"), b"x".to_vec())
        .expect("send");

    // A crash: every unfinished task fails with the reason and the exit status.
    let offer = next_offer(&mut fw).await;
    fw.held.clear();
    fw.driver().launch(vec![offer.id], vec![echo_task("crash", &artifact, "crash")]);
    // (The executor's end and its tasks' updates may come in any order.)
    let mut failed = std::collections::BTreeMap::new();
    let mut exited = None;
    while failed.len() < 3 || exited.is_none() {
        match fw.next().await {
            Seen::Update(u) if u.state.is_terminal() => {
                failed.insert(u.task_id.to_string(), u);
            }
            Seen::ExecutorExited { executor_id, message, .. } => exited = Some((executor_id, message)),
            _ => {}
        }
    }
    for id in ["sleep-2", "sleep-3", "crash"] {
        let f = &failed[id];
        assert_eq!((f.state, f.reason.as_str()), (TaskState::Failed, "executor terminated"), "{id}");
        assert!(f.message.contains("exit status 3"), "{id}: {}", f.message);
    }
    let exited = exited.expect("exited");
    assert_eq!(exited.0, ExecutorId::new("echo"));
    assert!(exited.1.contains("exit status 3"), "{}", exited.1);
    wait_for("the crashed executor to be gone", || async move { !alive(pid) }).await;

    // The agent carries on: the next task starts a new executor.
    let offer = next_offer(&mut fw).await;
    fw.held.clear();
    fw.driver().launch(vec![offer.id], vec![echo_task("after", &artifact, "")]);
    let running = fw.update_for("after", TaskState::Running).await;
    assert_ne!(pid_in(&running), pid);
    let done = fw.update_for("after", TaskState::Finished).await;
    assert_eq!(done.message, "count=1", "a new process counts from the start");

    // Shut down by its framework: the process ends.
    let new_pid = pid_in(&running);
    fw.driver().shutdown_executor(agent, ExecutorId::new("echo"));
    wait_for("the executor to be shut down", || async move { !alive(new_pid) }).await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executor_binary_that_does_not_match_its_digest_is_refused() {
    let c = TestCluster::start(1, "cpus:4;mem:4GiB").await;
    let artifact = upload_executor(&c).await;
    // The agent's cache holds other bytes under the digest (a corrupted or tampered cache).
    let cached = c.agent_dir(0).join("artifacts").join("sha256").join(artifact.digest.as_str());
    std::fs::create_dir_all(cached.parent().expect("dir")).expect("cache dir");
    std::fs::write(&cached, b"#!/bin/sh\necho pwned > /tmp/agora-pwned\n").expect("tamper");
    let mut fw = ProbeFramework::start(c.framework("echo")).await;
    let offer = fw.offer().await;
    fw.held.clear();
    fw.driver().launch(vec![offer.id], vec![echo_task("t", &artifact, "")]);
    let failed = fw
        .until(|s| match s {
            Seen::Update(u) if u.state.is_terminal() => Some(u.clone()),
            _ => None,
        })
        .await;
    assert_eq!((failed.state, failed.reason.as_str()), (TaskState::Failed, "fetch failed"), "{failed:?}");
    assert!(failed.message.contains("does not match its digest"), "{}", failed.message);
    assert!(find_file(&c.agent_dir(0).join("frameworks"), "echo_executor").is_none(), "nothing was placed");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_executor_infos_and_non_executables_are_refused() {
    let c = TestCluster::start(1, "cpus:4;mem:4GiB").await;
    let session =
        agora_sdk::client::Session::connect(&c.master.addr.to_string(), &c.tls("framework"), Role::Framework)
            .await
            .expect("connect");
    let err =
        agora_sdk::artifacts::upload_bytes(&session.conn, ArtifactKind::Executable, "notes.txt", b"hello")
            .await
            .expect_err("not an executable");
    assert!(err.to_string().contains("not an executable"), "{err}");
    session.conn.close(0u32.into(), b"done");

    let artifact = upload_executor(&c).await;
    let mut fw = ProbeFramework::start(c.framework("echo")).await;
    let offer = fw.offer().await;
    fw.held.clear();
    let mut reserved = echo_task("reserved", &artifact, "");
    let mut escape = echo_task("escape", &artifact, "");
    if let TaskKind::Executor(t) = &mut reserved.kind {
        t.executor.executor_id = ExecutorId::new("agora-command");
    }
    if let TaskKind::Executor(t) = &mut escape.kind {
        t.executor.fetch[0].path = "../../escape".into();
    }
    fw.driver().launch(vec![offer.id], vec![reserved, escape]);
    for id in ["reserved", "escape"] {
        let u = fw
            .until(|s| match s {
                Seen::Update(u) if u.task_id.as_str() == id => Some(u.clone()),
                _ => None,
            })
            .await;
        assert_eq!(u.state, TaskState::Error, "{id}: {u:?}");
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executors_end_with_their_framework_and_a_deaf_one_is_killed_after_its_grace_period() {
    let c = TestCluster::start(1, "cpus:4;mem:4GiB").await;
    let artifact = upload_executor(&c).await;

    // A framework that tears down takes its idle executor with it.
    let mut fw = ProbeFramework::start(c.framework("echo")).await;
    let offer = fw.offer().await;
    fw.held.clear();
    fw.driver().launch(vec![offer.id], vec![echo_task("one", &artifact, "")]);
    let pid = pid_in(&fw.update_for("one", TaskState::Running).await);
    fw.update_for("one", TaskState::Finished).await;
    assert!(alive(pid), "an idle executor of its own stays while its framework is there");
    fw.driver().stop(true);
    wait_for("the executor to end with its framework", || async move { !alive(pid) }).await;

    // An executor that ignores the shutdown is killed after the grace period.
    let mut fw = ProbeFramework::start(c.framework("deaf")).await;
    let offer = fw.offer().await;
    fw.held.clear();
    fw.driver().launch(vec![offer.id], vec![echo_task("stubborn", &artifact, "stubborn")]);
    let running = fw.update_for("stubborn", TaskState::Running).await;
    let pid = pid_in(&running);
    fw.update_for("stubborn", TaskState::Finished).await;
    let asked = std::time::Instant::now();
    fw.driver().shutdown_executor(running.agent_id.clone().expect("agent"), ExecutorId::new("echo"));
    let exited = fw
        .until(|s| match s {
            Seen::ExecutorExited { message, .. } => Some(message.clone()),
            _ => None,
        })
        .await;
    assert!(exited.contains("did not exit within"), "{exited}");
    assert!(asked.elapsed() >= std::time::Duration::from_secs(5), "not before the grace period");
    assert!(!alive(pid));
    c.stop().await;
}

/// The memory limit of `pid`'s cgroup (v1 `memory.limit_in_bytes` or v2 `memory.max`).
fn memory_limit(pid: u32) -> Option<u64> {
    let groups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    for line in groups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let file = if controllers.split(',').any(|c| c == "memory") {
            format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")
        } else if controllers.is_empty() {
            format!("/sys/fs/cgroup{path}/memory.max")
        } else {
            continue;
        };
        if let Some(v) = std::fs::read_to_string(&file).ok().and_then(|v| v.trim().parse().ok()) {
            return Some(v);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_executor_framework_example_runs_against_a_dev_cluster() {
    let dev = common::dev::Dev::start_with(&["--agents", "2", "--resources", "cpus:2;mem:2GiB"]);
    let out = std::process::Command::new(example("executor_framework"))
        .arg("--config")
        .arg(&dev.config)
        .args(["--tasks", "20", "--executor"])
        .arg(echo_executor())
        .output()
        .expect("run executor_framework");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let summary = stdout.lines().last().unwrap_or_default();
    let executors: usize = summary
        .strip_prefix("summary: 20 tasks finished in ")
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected summary: {summary}\n{stdout}"));
    assert!((1..=2).contains(&executors), "{summary}");
    assert!(summary.ends_with(&format!("; {executors} messages answered")), "{summary}");
    dev.stop();
}

/// An offer held from earlier events (skipped while waiting for others), or the next one.
async fn next_offer(fw: &mut ProbeFramework) -> Offer {
    match fw.held.pop() {
        Some(o) => {
            fw.decline_held(0.0);
            o
        }
        None => fw.offer().await,
    }
}

/// A file named `name` below `dir`, if any.
fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, name) {
                return Some(found);
            }
        } else if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
    }
    None
}
