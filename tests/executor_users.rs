//! Wasm executors and frameworks' own executors run as their tasks' users: one process per
//! framework, executor id and user on an agent (as Mesos runs an executor as its user). Real
//! clusters, real executor processes: their uids are read from `/proc/<pid>/status`. Switching
//! users needs root; without it every test says it skips (and fails under
//! `AGORA_REQUIRE_ROOT_TESTS=1`).
//!
//! The users are the node's `daemon` and `games`, as in `tests/acl.rs` (no ACL file here:
//! every user is allowed by the master, the agent still refuses root and unknown users).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use agora_sdk::proto::*;
use agora_sdk::Resources;
use common::dev::{poll, RealCluster};
use common::*;

const USER_A: &str = "daemon";
const USER_B: &str = "games";
/// `--task-user`'s default.
const NOBODY: u32 = 65534;

fn uid_of_user(name: &str) -> u32 {
    agora_agent::user::TaskUser::lookup(name).expect("a user of this node").uid
}

fn wasm_task_as(id: &str, module: &ArtifactRef, user: Option<&str>) -> TaskInfo {
    TaskInfo { user: user.map(str::to_string), ..wasm_task(id, module) }
}

fn echo_task(id: &str, artifact: &ArtifactRef, user: Option<&str>) -> TaskInfo {
    let executor = ExecutorInfo {
        executor_id: ExecutorId::new("echo"),
        name: "echo".into(),
        command: CommandInfo { argv: vec!["./echo_executor".into()], shell: false, env: vec![] },
        resources: Resources::parse("cpus:0.1;mem:64MiB").expect("resources"),
        fetch: vec![FetchInfo { artifact: artifact.clone(), path: "echo_executor".into(), executable: true }],
    };
    TaskInfo {
        task_id: TaskId::new(id),
        name: id.into(),
        resources: Resources::parse("cpus:0.1;mem:16MiB").expect("resources"),
        kind: TaskKind::Executor(Box::new(ExecutorTask { executor, data: "sleep".into() })),
        kill_grace: None,
        user: user.map(str::to_string),
    }
}

/// Real uid, real gid, supplementary groups (the framework's group is the primary one) and
/// `NoNewPrivs` of a process.
fn ids_of(pid: u32) -> (u32, u32, String, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {name} in status of {pid}"))
    };
    let first = |v: String| -> u32 { v.split_whitespace().next().and_then(|x| x.parse().ok()).expect("id") };
    (first(field("Uid:")), first(field("Gid:")), field("Groups:"), field("NoNewPrivs:"))
}

/// Launches `tasks` on one offer and returns each task's RUNNING, or its terminal update when
/// it never ran.
async fn launch_all(fw: &mut ProbeFramework, tasks: Vec<TaskInfo>) -> BTreeMap<String, TaskStatus> {
    let n = tasks.len();
    let offer = fw.offer().await;
    fw.held.clear();
    fw.driver().launch(vec![offer.id], tasks);
    let mut out = BTreeMap::new();
    while out.len() < n {
        if let Seen::Update(u) = fw.next().await {
            if u.state == TaskState::Running || u.state.is_terminal() {
                out.entry(u.task_id.to_string()).or_insert(u);
            }
        }
    }
    out
}

/// Two users of one framework on one agent: two Wasm executor processes, each as its user with
/// the framework's group only and `no_new_privs`; tasks of one user share its process; tasks
/// naming no user go to the task user's; root and unknown users are refused naming the user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasm_tasks_of_two_users_run_in_two_executors_as_those_users() {
    if !root_or_skip("switching executor users") {
        return;
    }
    let c = TestCluster::start(1, "cpus:4;mem:4GiB").await;
    let addr = c.master.addr.to_string();
    let module = wat::parse_str(sleeper_wat(600)).expect("wat");
    let module =
        upload_artifact(&addr, &c.tls("framework"), ArtifactKind::WasmModule, "sleeper", &module).await;
    let mut fw = ProbeFramework::start(c.framework("users")).await;
    let seen = launch_all(
        &mut fw,
        vec![
            wasm_task_as("a1", &module, Some(USER_A)),
            wasm_task_as("a2", &module, Some(USER_A)),
            wasm_task_as("b1", &module, Some(USER_B)),
            wasm_task_as("n1", &module, None),
            wasm_task_as("root", &module, Some("root")),
            wasm_task_as("ghost", &module, Some("no-such-user-agora")),
        ],
    )
    .await;
    for id in ["a1", "a2", "b1", "n1"] {
        assert_eq!(seen[id].state, TaskState::Running, "{id}: {}: {}", seen[id].reason, seen[id].message);
    }
    let (a1, a2, b1, n1) =
        (pid_of(&seen["a1"]), pid_of(&seen["a2"]), pid_of(&seen["b1"]), pid_of(&seen["n1"]));
    assert_eq!(a1, a2, "one user's tasks share its executor");
    assert!(a1 != b1 && a1 != n1 && b1 != n1, "one executor per user: {a1} {b1} {n1}");
    let (ua, ga, groups_a, nnp_a) = ids_of(a1);
    let (ub, gb, groups_b, nnp_b) = ids_of(b1);
    let (un, gn, _, _) = ids_of(n1);
    assert_eq!((ua, ub, un), (uid_of_user(USER_A), uid_of_user(USER_B), NOBODY));
    assert!(ga >= agora_agent::user::DEFAULT_FIRST_TASK_GID, "the framework's group: {ga}");
    assert_eq!((ga, gb, gn), (ga, ga, ga), "every user's executor has its framework's group");
    assert_eq!((groups_a.as_str(), groups_b.as_str()), ("", ""), "no supplementary groups");
    assert_eq!((nnp_a.as_str(), nnp_b.as_str()), ("1", "1"));

    // Each user's executor has a Wasm cache of its own (compiled modules are code it loads),
    // the task user's where it always was.
    let cache = c.agent_dir(0).join("wasm-cache");
    let mut dirs: Vec<String> = std::fs::read_dir(&cache)
        .expect("wasm-cache")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    assert_eq!(dirs.len(), 3, "{dirs:?}");
    for uid in [uid_of_user(USER_A), uid_of_user(USER_B)] {
        assert!(dirs.iter().any(|d| d.ends_with(&format!("+uid{uid}"))), "{dirs:?}");
    }
    // Its socket is its user's alone.
    let sockets: Vec<(u32, u32)> = std::fs::read_dir(c.agent_dir(0).join("executors"))
        .expect("executors dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".sock"))
        .map(|e| {
            use std::os::unix::fs::MetadataExt;
            let m = e.metadata().expect("socket");
            (m.uid(), m.mode() & 0o777)
        })
        .collect();
    for uid in [ua, ub, un] {
        assert!(sockets.contains(&(uid, 0o600)), "a socket of uid {uid}, mode 0600: {sockets:?}");
    }

    // Root and unknown users: the task errs naming the user, no executor is started.
    assert_eq!((seen["root"].state, seen["root"].reason.as_str()), (TaskState::Error, "invalid task user"));
    assert!(seen["root"].message.contains("`root` is root (uid 0)"), "{}", seen["root"].message);
    assert_eq!((seen["ghost"].state, seen["ghost"].reason.as_str()), (TaskState::Error, "invalid task user"));
    assert!(
        seen["ghost"].message.contains("task user `no-such-user-agora`: no such user on this node"),
        "{}",
        seen["ghost"].message
    );

    // A kill reaches the right process; the other user's tasks keep running.
    fw.driver().kill(TaskId::new("b1"));
    fw.update_for("b1", TaskState::Killed).await;
    assert!(alive(a1), "the other user's executor is unharmed");
    fw.driver().stop(true);
    c.stop().await;
}

/// A framework's own executor for a task naming a user runs as that user, beside the same
/// executor id's process for the task user: two sandboxes, two processes, the framework's
/// group, and the executor sees its own id and its own sandbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_framework_executor_runs_as_its_tasks_user() {
    if !root_or_skip("switching executor users") {
        return;
    }
    let c = TestCluster::start(1, "cpus:4;mem:4GiB").await;
    let addr = c.master.addr.to_string();
    let bytes = std::fs::read(example("echo_executor")).expect("echo_executor");
    let artifact =
        upload_artifact(&addr, &c.tls("framework"), ArtifactKind::Executable, "echo_executor", &bytes).await;
    let mut fw = ProbeFramework::start(c.framework("echo-users")).await;
    let seen = launch_all(
        &mut fw,
        vec![
            echo_task("as-a", &artifact, Some(USER_A)),
            echo_task("as-a-too", &artifact, Some(USER_A)),
            echo_task("as-nobody", &artifact, None),
            echo_task("as-root", &artifact, Some("root")),
        ],
    )
    .await;
    for id in ["as-a", "as-a-too", "as-nobody"] {
        assert_eq!(seen[id].state, TaskState::Running, "{id}: {}: {}", seen[id].reason, seen[id].message);
    }
    let (a, a_too, n) = (pid_of(&seen["as-a"]), pid_of(&seen["as-a-too"]), pid_of(&seen["as-nobody"]));
    assert_eq!(a, a_too, "one process per user");
    assert_ne!(a, n, "another user's process of the same executor id");
    let (ua, ga, groups, nnp) = ids_of(a);
    let (un, gn, _, _) = ids_of(n);
    assert_eq!((ua, un), (uid_of_user(USER_A), NOBODY));
    assert_eq!(ga, gn, "both with the framework's group");
    assert_eq!((groups.as_str(), nnp.as_str()), ("", "1"), "no supplementary groups, no_new_privs");
    assert_eq!(
        (seen["as-root"].state, seen["as-root"].reason.as_str()),
        (TaskState::Error, "invalid task user")
    );

    // Each process has a sandbox of its own, and sees the framework's executor id.
    let environ = |pid: u32| -> HashMap<String, String> {
        std::fs::read(format!("/proc/{pid}/environ"))
            .expect("environ")
            .split(|b| *b == 0)
            .filter_map(|kv| {
                let kv = String::from_utf8_lossy(kv);
                kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect()
    };
    let (env_a, env_n) = (environ(a), environ(n));
    assert_eq!(env_a["AGORA_EXECUTOR_ID"], "echo");
    assert_eq!(env_n["AGORA_EXECUTOR_ID"], "echo");
    assert_ne!(env_a["AGORA_SANDBOX"], env_n["AGORA_SANDBOX"], "two sandboxes");
    assert_ne!(env_a["AGORA_EXECUTOR_SOCKET"], env_n["AGORA_EXECUTOR_SOCKET"], "two sockets");

    // A framework shutting its executor down ends every user's process of it.
    fw.driver().stop(true);
    poll("both executor processes to end", 30, || (!alive(a) && !alive(n)).then_some(()));
    c.stop().await;
}

/// Two users' Wasm executors outlive a `kill -9` of their agent; the restarted agent takes each
/// back under its own key (the checkpoint carries the user): same processes, no new RUNNING,
/// then FINISHED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executors_of_two_users_are_taken_back_after_an_agent_restart() {
    if !root_or_skip("switching executor users") {
        return;
    }
    let agent = ["--resources", "cpus:4;mem:2GiB"];
    let mut c = RealCluster::start(&[], &agent);
    let cfg = agora_sdk::config::ClientConfig::load(&c.config).expect("client.toml");
    let tls = cfg.identity(Role::Framework).expect("framework identity");
    let module = wat::parse_str(sleeper_wat(10)).expect("wat");
    let module = upload_artifact(&c.addr, &tls, ArtifactKind::WasmModule, "sleeper", &module).await;
    let mut fw = ProbeFramework::start(c.framework_config("recovery-users")).await;
    let seen = launch_all(
        &mut fw,
        vec![wasm_task_as("a", &module, Some(USER_A)), wasm_task_as("b", &module, Some(USER_B))],
    )
    .await;
    let (a, b) = (pid_of(&seen["a"]), pid_of(&seen["b"]));
    assert_ne!(a, b);
    assert_eq!((ids_of(a).0, ids_of(b).0), (uid_of_user(USER_A), uid_of_user(USER_B)));

    c.kill_agent();
    std::thread::sleep(Duration::from_millis(500));
    assert!(alive(a) && alive(b), "executors outlive their agent");
    c.start_agent(&agent);
    poll("the restarted agent's registration", 30, || {
        let log = c.agent.as_ref().map(|a| a.stderr_text()).unwrap_or_default();
        log.contains("registered with the master").then_some(())
    });
    // Both reconnected under their own keys: each task finishes in its own process (a
    // process taken back under the wrong key would be refused and its task failed).
    let mut ends = BTreeMap::new();
    while ends.len() < 2 {
        if let Seen::Update(u) = fw.next().await {
            if u.state.is_terminal() {
                ends.insert(u.task_id.to_string(), (u.state, u.exit_code, u.message.clone()));
            } else if u.state == TaskState::Running {
                assert_eq!(pid_of(&u), if u.task_id.as_str() == "a" { a } else { b }, "the same process");
            }
        }
    }
    for id in ["a", "b"] {
        assert_eq!((ends[id].0, ends[id].1), (TaskState::Finished, Some(0)), "{id}: {}", ends[id].2);
    }
    let log = c.agent.as_ref().map(|a| a.stderr_text()).unwrap_or_default();
    assert_eq!(log.matches("executor reconnected after the agent restarted").count(), 2, "{log}");
    c.stop();
}
