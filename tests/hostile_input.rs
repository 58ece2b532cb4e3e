//! A hostile framework against a real master over QUIC (the security work's wire validation): every input from
//! the wire is validated on receipt. Each case is refused with a clear error (a `WireError` on
//! the framework's stream, or `TASK_ERROR` naming the task), bounded, or clamped, and the
//! master keeps answering everybody else.

mod common;

use std::time::{Duration, Instant};

use agora_master::core::MasterConfig;
use agora_master::validate::{MAX_DEMAND_TASKS, MAX_RECONCILE_TASKS};
use agora_sdk::client::Session;
use agora_sdk::proto::*;
use agora_sdk::resources::PortRange;
use agora_sdk::Resources;
use common::*;

/// How long an operator call may take while a hostile framework is at work. A liveness
/// check, not a performance figure: the frozen master of the issue took minutes; a healthy
/// one answers in milliseconds.
const ANSWERED_WITHIN: Duration = Duration::from_secs(2);

/// A framework speaking raw frames: it can send what the SDK's driver never would.
struct RawFramework {
    s: Session,
    id: FrameworkId,
}

impl RawFramework {
    async fn subscribe(c: &TestCluster, name: &str) -> RawFramework {
        let mut s = Session::connect(&c.master.addr.to_string(), &c.tls("framework"), Role::Framework)
            .await
            .expect("framework session");
        s.writer
            .send(&SchedulerCall::Subscribe(FrameworkInfo {
                user: None,
                id: None,
                name: name.into(),
                role: "*".into(),
                failover_timeout: Duration::from_secs(5),
                hostname: "hostile".into(),
            }))
            .await
            .expect("subscribe");
        let mut raw = RawFramework { s, id: FrameworkId::new("") };
        raw.id = raw
            .until(|e| match e {
                SchedulerEvent::Subscribed { framework_id, .. } => Some(framework_id.clone()),
                _ => None,
            })
            .await;
        raw
    }

    async fn send(&mut self, call: &SchedulerCall) {
        self.s.writer.send(call).await.expect("send a call");
    }

    /// Skips events until `f` picks one (20 s limit), answering the master's heartbeats (a
    /// silent framework is taken for gone).
    async fn until<T>(&mut self, mut f: impl FnMut(&SchedulerEvent) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let e = tokio::time::timeout(left, self.s.reader.recv::<SchedulerEvent>())
                .await
                .expect("timed out waiting for an event from the master")
                .expect("read an event")
                .expect("the master closed the framework's stream");
            if matches!(e, SchedulerEvent::Heartbeat) {
                self.send(&SchedulerCall::Heartbeat).await;
            }
            if let Some(t) = f(&e) {
                return t;
            }
        }
    }

    async fn error(&mut self) -> WireError {
        self.until(|e| match e {
            SchedulerEvent::Error(e) => Some(e.clone()),
            _ => None,
        })
        .await
    }

    async fn offer(&mut self) -> Offer {
        self.until(|e| match e {
            SchedulerEvent::Offers(o) => o.first().cloned(),
            _ => None,
        })
        .await
    }

    async fn update(&mut self, task: &str) -> TaskStatus {
        self.until(|e| match e {
            SchedulerEvent::Update(u) if u.task_id.as_str() == task => Some(u.clone()),
            _ => None,
        })
        .await
    }

    /// The connection is still served: an implicit reconciliation is answered (a heartbeat
    /// call gets nothing back, so a kill of an unknown task is used: it answers an update).
    async fn still_served(&mut self) {
        self.send(&SchedulerCall::Kill { task_id: TaskId::new("never-launched") }).await;
        let u = self.update("never-launched").await;
        assert!(u.state.is_terminal() || u.state == TaskState::Unknown, "{u:?}");
    }
}

/// Asks for the agents over a fresh operator connection and returns how long the answer took.
async fn operator_agents(c: &TestCluster) -> (usize, Duration) {
    let started = Instant::now();
    let mut s = Session::connect(&c.master.addr.to_string(), &c.tls("operator"), Role::Operator)
        .await
        .expect("operator session");
    s.writer.send(&OperatorCall::GetAgents).await.expect("send");
    let reply = tokio::time::timeout(Duration::from_secs(60), s.reader.recv::<OperatorReply>())
        .await
        .expect("the master answers an operator within a minute")
        .expect("read")
        .expect("a reply");
    let n = match reply {
        OperatorReply::Agents(a) | OperatorReply::AgentsPart(a) => a.len(),
        other => panic!("unexpected reply {other:?}"),
    };
    let took = started.elapsed();
    eprintln!("operator GetAgents answered in {took:?} (connection included)");
    (n, took)
}

fn task(id: &str, resources: Resources) -> TaskInfo {
    TaskInfo {
        user: None,
        task_id: TaskId::new(id),
        name: id.into(),
        resources,
        kind: TaskKind::Command(CommandInfo { argv: vec!["true".into()], shell: false, env: vec![] }),
        kill_grace: None,
    }
}

fn res(s: &str) -> Resources {
    Resources::parse(s).expect("resources")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_request_is_refused_and_operators_keep_being_answered() {
    let c = TestCluster::start(1, "cpus:4;mem:4GiB;ports:[31000-32000]").await;
    let mut fw = RawFramework::subscribe(&c, "hostile").await;
    // Without a demand it is offered the whole agent first.
    let whole = fw.offer().await;

    // The request of the issue: one byte of memory, u32::MAX times. It froze the core.
    fw.send(&SchedulerCall::Request { demands: vec![Demand { resources: res("mem:1B"), count: u32::MAX }] })
        .await;
    let (n, took) = operator_agents(&c).await;
    assert_eq!(n, 1);
    assert!(took < ANSWERED_WITHIN, "an operator call took {took:?} during a hostile Request");
    let e = fw.error().await;
    assert_eq!(e.code, ErrorCode::Invalid);
    assert!(e.message.contains(&format!("at most {MAX_DEMAND_TASKS}")), "{}", e.message);

    // The largest demand allowed, of the smallest shape: rounded up to --min-allocatable, so
    // each slice is worth offering and one cycle gives a bounded number of them.
    fw.send(&SchedulerCall::Decline { offer_ids: vec![whole.id], refuse_seconds: Some(0.0) }).await;
    fw.send(&SchedulerCall::Request {
        demands: vec![Demand { resources: res("mem:1B"), count: MAX_DEMAND_TASKS as u32 }],
    })
    .await;
    let offer = fw.offer().await;
    assert!(offer.resources.cpus >= 10, "slices carry the minimum CPU: {}", offer.resources);
    let (_, took) = operator_agents(&c).await;
    assert!(took < ANSWERED_WITHIN, "an operator call took {took:?} after a huge demand");

    // A backwards port range makes any shape "fit" forever: refused.
    let backwards = Resources { ports: vec![PortRange { begin: 31500, end: 0 }], ..res("cpus:1") };
    fw.send(&SchedulerCall::Request { demands: vec![Demand { resources: backwards, count: 1 }] }).await;
    let e = fw.error().await;
    assert!(e.message.contains("31500-0 is backwards"), "{}", e.message);
    fw.still_served().await;
    let (_, took) = operator_agents(&c).await;
    assert!(took < ANSWERED_WITHIN, "an operator call took {took:?} after the hostile calls");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tasks_get_task_error_naming_the_task() {
    let c = TestCluster::start(1, "cpus:4;mem:4GiB;ports:[31000-32000]").await;
    let mut fw = RawFramework::subscribe(&c, "hostile").await;
    let offer = fw.offer().await;
    let mut backwards = task("backwards", res("cpus:0.1;mem:16MiB"));
    backwards.resources.ports = vec![PortRange { begin: 31500, end: 0 }];
    let mut zero_timeout = task("wasm-forever", res("cpus:0.1;mem:16MiB"));
    zero_timeout.kind = TaskKind::Wasm(Box::new(WasmInfo {
        module: ArtifactRef { digest: Digest::of(b"m"), size: 1 },
        args: vec!["m".into()],
        env: vec![],
        dirs: vec![],
        fuel: None,
        timeout: Some(Duration::MAX),
    }));
    let tasks = vec![
        task("nomem", res("cpus:1")),
        task("nocpu", res("mem:64MiB")),
        task("nothing", Resources::default()),
        backwards,
        zero_timeout,
        task("bell\u{7}", res("cpus:0.1;mem:16MiB")),
    ];
    fw.send(&SchedulerCall::Accept {
        offer_ids: vec![offer.id],
        operations: vec![Operation::Launch { tasks }],
        refuse_seconds: Some(f64::NAN),
    })
    .await;
    for (id, says) in [
        ("nomem", "mem > 0"),
        ("nocpu", "cpus > 0"),
        ("nothing", "no cpus and no mem"),
        ("backwards", "31500-0 is backwards"),
        ("wasm-forever", "over the limit"),
        ("bell\u{7}", "control character"),
    ] {
        let u = fw.update(id).await;
        assert_eq!((u.state, u.reason.as_str()), (TaskState::Error, "invalid launch"), "{id}: {u:?}");
        assert!(u.message.contains(says), "{id}: {}", u.message);
    }
    fw.still_served().await;

    // Calls wrong as a whole: a WireError, and the connection stays.
    fw.send(&SchedulerCall::Kill { task_id: TaskId::new("../../etc/passwd") }).await;
    assert!(fw.error().await.message.contains("path separator"));
    fw.send(&SchedulerCall::Reconcile { task_ids: vec![TaskId::new("t"); MAX_RECONCILE_TASKS + 1] }).await;
    let e = fw.error().await;
    assert!(e.message.contains(&format!("at most {MAX_RECONCILE_TASKS}")), "{}", e.message);
    fw.still_served().await;
    let (_, took) = operator_agents(&c).await;
    assert!(took < ANSWERED_WITHIN, "{took:?}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_kill_grace_is_cut_to_the_masters_bound() {
    if !root_or_skip("command tasks run under the agent's executors") {
        return;
    }
    let cap = Duration::from_secs(2);
    let c =
        TestCluster::start_with(1, "cpus:4;mem:4GiB", MasterConfig { max_kill_grace: cap, ..fast_master() })
            .await;
    // Where the tasks (which may run as an unprivileged user) write their pids.
    let pids_dir = tempfile::tempdir().expect("tempdir");
    let pids = pids_dir.path().to_path_buf();
    std::fs::set_permissions(&pids, std::os::unix::fs::PermissionsExt::from_mode(0o777)).expect("chmod");
    // Ignores SIGTERM and asks for 3e9 s between SIGTERM and SIGKILL.
    let stubborn = |id: &str| {
        let script =
            format!("trap '' TERM; echo $$ > {}/{id}; while true; do sleep 0.1; done", pids.display());
        TaskInfo {
            kill_grace: Some(Duration::from_secs(3_000_000_000)),
            ..sh_task(id, &script, "cpus:0.1;mem:16MiB")
        }
    };
    let mut fw = ProbeFramework::start(c.framework("stubborn")).await;
    let offer = fw.offer().await;
    fw.driver().launch(vec![offer.id], vec![stubborn("t1"), stubborn("t2")]);
    // Both RUNNING, in whichever order.
    let mut running = std::collections::BTreeSet::new();
    while running.len() < 2 {
        let id = fw
            .until(|s| match s {
                Seen::Update(u) if u.state == TaskState::Running => Some(u.task_id.to_string()),
                Seen::Update(u) if u.state.is_terminal() => panic!("{u:?}"),
                _ => None,
            })
            .await;
        running.insert(id);
    }

    // Bound of these checks: well under the agent's own ceiling (60 s), so that passing shows
    // the master's cut. Not a performance figure.
    let bound = Duration::from_secs(20);
    let killed = Instant::now();
    fw.driver().kill(TaskId::new("t1"));
    let u = fw.update_for("t1", TaskState::Killed).await;
    assert!(killed.elapsed() < bound, "t1 took {:?} to be killed: {u:?}", killed.elapsed());

    // Its framework torn down: the other one goes too, within the cap.
    let pid: u32 = common::dev::poll("t2's pid", 10, || {
        std::fs::read_to_string(pids.join("t2")).ok().and_then(|s| s.trim().parse().ok())
    });
    let torn = Instant::now();
    fw.driver().stop(true);
    common::dev::poll("t2's process to end after its framework's teardown", bound.as_secs(), || {
        (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    });
    assert!(torn.elapsed() < bound);
    c.stop().await;
}
