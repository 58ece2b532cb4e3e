//! The Wasm executor's life cycle on a real in-process cluster (QUIC on loopback, the built
//! `agora` binary as the executor): one executor per framework holding many tasks, neighbours
//! unharmed by a misbehaving task, kill, idle exit and restart, and an executor dying under its
//! tasks.

mod common;

use std::path::Path;
use std::time::Duration;

use agora_sdk::proto::*;
use common::*;

async fn upload(c: &TestCluster, name: &str, wat_path: &Path) -> ArtifactRef {
    let bytes = wat::parse_file(wat_path).expect("wat");
    let session =
        agora_sdk::client::Session::connect(&c.master.addr.to_string(), &c.tls("framework"), Role::Framework)
            .await
            .expect("connect");
    let r = agora_sdk::artifacts::upload_bytes(&session.conn, ArtifactKind::WasmModule, name, &bytes)
        .await
        .expect("upload");
    session.conn.close(0u32.into(), b"done");
    r
}

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("executor-wasm/tests/fixtures").join(format!("{name}.wat"))
}

/// A Wasm task of `module` with a wall-clock timeout.
fn timed(task: TaskInfo, timeout: Duration) -> TaskInfo {
    let TaskKind::Wasm(mut w) = task.kind else { unreachable!("a Wasm task") };
    w.timeout = Some(timeout);
    TaskInfo { kind: TaskKind::Wasm(w), ..task }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_executor_holds_many_tasks_and_exits_when_idle() {
    let mut c = TestCluster::start(0, "cpus:4;mem:4GiB").await;
    let wasm = agora_agent::executors::ExecutorsConfig {
        idle_timeout: Duration::from_millis(800),
        ..executors_config()
    };
    c.add_agent_with(0, "cpus:4;mem:4GiB", wasm);
    c.wait_agents(1).await;
    let hello = upload(&c, "hello", &fixture("hello")).await;
    let spin = upload(&c, "loop", &fixture("loop")).await;
    let bomb = upload(&c, "membomb", &fixture("membomb")).await;
    let trap = upload(&c, "unreachable", &fixture("unreachable")).await;

    let mut fw = ProbeFramework::start(c.framework("wasm")).await;
    let offer = fw.offer().await;
    let tasks = vec![
        wasm_task("hello-1", &hello),
        timed(wasm_task("spin", &spin), Duration::from_millis(400)),
        wasm_task("bomb", &bomb),
        wasm_task("trap", &trap),
        wasm_task("hello-2", &hello),
        wasm_task("forever", &spin),
    ];
    fw.held.clear();
    fw.driver().launch(vec![offer.id], tasks);

    let mut pids = Vec::new();
    let mut ends = std::collections::BTreeMap::new();
    let mut killed = false;
    while ends.len() < 6 {
        if let Seen::Update(u) = fw.next().await {
            if u.state == TaskState::Running {
                pids.push(pid_of(&u));
                if u.task_id.as_str() == "forever" && !killed {
                    killed = true;
                    fw.driver().kill(u.task_id.clone());
                }
            }
            if u.state.is_terminal() {
                ends.insert(u.task_id.to_string(), (u.state, u.reason.clone(), u.exit_code));
            }
        }
    }
    pids.dedup();
    assert_eq!(pids.len(), 1, "all tasks of the framework run in one executor: {pids:?}");
    assert_eq!(ends["hello-1"], (TaskState::Finished, "module exited".into(), Some(0)));
    assert_eq!(ends["hello-2"], (TaskState::Finished, "module exited".into(), Some(0)));
    assert_eq!(ends["spin"].0, TaskState::Failed);
    assert_eq!(ends["spin"].1, "timeout");
    assert_eq!(ends["bomb"].1, "memory limit exceeded");
    assert_eq!(ends["trap"].1, "trap");
    assert_eq!(ends["forever"].0, TaskState::Killed);

    // The neighbours' output is whole.
    let run_dir = common_task_dir(&c, "hello-2");
    assert_eq!(std::fs::read(run_dir.join("stdout")).expect("stdout"), b"hello from wasm\n");

    // Idle: the executor exits; the next task starts a new one.
    let pid = pids[0];
    wait_for("the idle executor to exit", || async move { !alive(pid) }).await;
    let offer = fw.offer().await;
    fw.held.clear();
    fw.driver().launch(vec![offer.id], vec![wasm_task("hello-3", &hello)]);
    let running = fw.update_for("hello-3", TaskState::Running).await;
    assert_ne!(pid_of(&running), pid, "a new executor");
    fw.update_for("hello-3", TaskState::Finished).await;
    c.stop().await;
}

/// The sandbox of a task of the only framework on agent 0.
fn common_task_dir(c: &TestCluster, task: &str) -> std::path::PathBuf {
    let fws = c.agent_dir(0).join("frameworks");
    let fw = std::fs::read_dir(&fws).expect("frameworks").flatten().next().expect("one framework").path();
    // Wasm tasks live in their framework's Wasm executor's run: executors/agora-wasm/runs/<run>/tasks.
    let runs = fw.join("executors").join("agora-wasm").join("runs");
    let run = std::fs::read_dir(&runs).expect("runs").flatten().next().expect("one run").path();
    run.join("tasks").join(task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executor_dying_fails_its_tasks_and_the_agent_carries_on() {
    let c = TestCluster::start(1, "cpus:4;mem:4GiB").await;
    let spin = upload(&c, "loop", &fixture("loop")).await;
    let hello = upload(&c, "hello", &fixture("hello")).await;
    let mut fw = ProbeFramework::start(c.framework("wasm")).await;
    let offer = fw.offer().await;
    fw.held.clear();
    fw.driver().launch(vec![offer.id], vec![wasm_task("spin-a", &spin), wasm_task("spin-b", &spin)]);
    let running = fw.update_for("spin-a", TaskState::Running).await;
    let pid = pid_of(&running);
    // As root (only: elsewhere a skip line), the Wasm executor runs as the task user, never as
    // root, in a cgroup sized to its tasks (2 × 16 MiB) plus its own overhead.
    if root_or_skip("task user, executor cgroup") {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap_or_default();
        assert_eq!(uid.split_whitespace().collect::<Vec<_>>(), ["65534"; 4], "Uid: {uid}");
        let want = 2 * (16 << 20) + agora_agent::executors::EXECUTOR_OVERHEAD_MEM;
        let file = memory_limit_file(pid).unwrap_or_else(|| {
            panic!("the executor (pid {pid}) is in no memory cgroup of the agent's: {:?}", cgroups_of(pid))
        });
        wait_for("the executor's cgroup to be sized to its tasks", || {
            let file = file.clone();
            async move {
                std::fs::read_to_string(&file).ok().and_then(|t| t.trim().parse::<u64>().ok()) == Some(want)
            }
        })
        .await
    }
    // SAFETY: kill(2) of the executor process this test's agent started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    // Both end, in whichever order the agent reports them.
    let mut ends = std::collections::BTreeMap::new();
    while ends.len() < 2 {
        if let Seen::Update(u) = fw.next().await {
            if u.state.is_terminal() {
                ends.insert(u.task_id.to_string(), u);
            }
        }
    }
    for st in ends.values() {
        assert_eq!(st.state, TaskState::Failed, "{st:?}");
        assert_eq!(st.reason, "executor terminated", "{st:?}");
        assert!(st.message.contains("signal 9"), "{}", st.message);
    }
    let offer = fw.offer().await;
    fw.held.clear();
    fw.driver().launch(vec![offer.id], vec![wasm_task("after", &hello)]);
    fw.update_for("after", TaskState::Finished).await;
    c.stop().await;
}

fn cgroups_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default()
}

/// The memory limit file of the executor's own cgroup (v1 `memory.limit_in_bytes` or v2
/// `memory.max`), if it is in one the agent made.
fn memory_limit_file(pid: u32) -> Option<std::path::PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        // The agent's executor groups: <agent root agora-…>/executor-<n>.
        let mut parts = path.rsplit('/');
        let (leaf, root) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
        if !(leaf.starts_with("executor-") && root.starts_with("agora-")) {
            continue;
        }
        if controllers.split(',').any(|c| c == "memory") {
            return Some(
                Path::new("/sys/fs/cgroup/memory")
                    .join(path.trim_start_matches('/'))
                    .join("memory.limit_in_bytes"),
            );
        }
        if controllers.is_empty() {
            return Some(Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/')).join("memory.max"));
        }
    }
    None
}
