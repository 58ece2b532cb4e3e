//! Frameworks and `agora run` follow the master across network partitions and restarts:
//! real QUIC on loopback, with a UDP proxy between the framework and the master to cut the
//! network without restarting anything, and a `kill -9` of the `agora master` process.

use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use agora_sdk::proto::TaskState;
use common::dev::{Proc, RealCluster, AGORA};
use common::proxy::UdpProxy;
use common::{sh_task, wait_for, ProbeFramework, Seen, TestCluster};

/// (a) A cut longer than 3 heartbeats (1 s each here): the driver reports `disconnected`, the
/// master takes the framework for disconnected too; after the heal the driver subscribes
/// again with the same id, the implicit reconciliation reports the running task, and the task
/// launched before the cut delivers its FINISHED exactly once. Acknowledgements are manual, so
/// the RUNNING update left unacknowledged across the cut is one the master sends again: the
/// driver must not deliver it twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_fails_over_to_the_same_id_and_delivers_each_update_once() {
    let cluster = TestCluster::start(1, "cpus:1;mem:256MiB").await;
    let proxy = UdpProxy::start(cluster.master.addr);
    let mut cfg = cluster.framework("cut");
    cfg.master = proxy.addr.to_string();
    cfg.auto_acknowledge = false;
    let mut fw = ProbeFramework::start(cfg).await;
    let id = fw.id.clone().expect("id");
    let offer = fw.offer().await;
    fw.driver().launch(vec![offer.id], vec![sh_task("t1", "sleep 10", "cpus:0.5;mem:64MiB")]);
    let running = fw.update_for("t1", TaskState::Running).await;
    assert!(running.uuid.is_some(), "an agent's update carries a uuid");

    proxy.cut();
    let cut_at = Instant::now();
    fw.until(|s| matches!(s, Seen::Disconnected).then_some(())).await;
    let noticed = cut_at.elapsed();
    assert!(noticed < Duration::from_secs(6), "3 heartbeats of 1 s, noticed after {noticed:?}");
    cluster
        .wait_framework_status(
            "the master to take the silent framework for disconnected",
            &id,
            agora_sdk::FrameworkViewStatus::Disconnected,
        )
        .await;
    proxy.heal();
    let again = fw
        .until(|s| match s {
            Seen::Reregistered(id) => Some(id.clone()),
            Seen::Registered(_) => panic!("a failover must not look like a first registration"),
            _ => None,
        })
        .await;
    assert_eq!(again, id, "subscribed again as another framework");
    fw.driver().acknowledge(&running);

    let mut reconciled = 0;
    let mut running_again = 0;
    let finished = loop {
        match fw.next().await {
            Seen::Update(u) if u.task_id.as_str() == "t1" => match (u.state, u.uuid) {
                (TaskState::Running, None) => reconciled += 1,
                (TaskState::Running, Some(_)) => running_again += 1,
                (TaskState::Finished, _) => break u,
                (s, _) => panic!("unexpected {s} for t1: {u:?}"),
            },
            Seen::Disconnected => panic!("lost the master again"),
            _ => {}
        }
    };
    assert_eq!(reconciled, 1, "one implicit reconciliation answer for the running task");
    assert_eq!(running_again, 0, "the RUNNING sent again by the master was delivered twice");
    assert_eq!(finished.exit_code, Some(0));
    fw.driver().acknowledge(&finished);
    // A duplicate would come within the agent's and master's resend; none may reach us.
    wait_for("the master to finish the task", || async {
        cluster.task_state("t1").await == Some(TaskState::Finished)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    while let Ok((_, seen)) = fw.rx.try_recv() {
        if let Seen::Update(u) = seen {
            assert!(!(u.task_id.as_str() == "t1" && u.state == TaskState::Finished), "FINISHED twice: {u:?}");
        }
    }
    cluster.stop().await;
}

const SCRIPT: &str = "echo a; sleep 6; echo b; exit 3";

/// (b) `agora run` through the proxy, cut for 4 s in the middle (heartbeats of 500 ms, so the
/// driver gives the connection up and fails over): output complete and not repeated, and the
/// task's exit code.
#[test]
fn agora_run_rides_out_a_partition_with_its_output_and_exit_code() {
    let c = RealCluster::start(&["--framework-heartbeat", "500ms"], &["--resources", "cpus:1;mem:256MiB"]);
    let proxy = UdpProxy::start(c.addr.parse().expect("master address"));
    let config = c.config_via("via-proxy.toml", &proxy.addr.to_string());
    let mut run = Proc::spawn(
        "run",
        c.dir.path(),
        Command::new(AGORA).arg("run").arg("--config").arg(&config).args(["--", "sh", "-c", SCRIPT]),
    );
    run.wait_stdout("the task's first line", |l| (l == "a").then_some(()));
    proxy.cut();
    // The partition itself.
    std::thread::sleep(Duration::from_secs(4));
    assert!(run.running(), "agora run gave up during the cut: {}", run.stderr_text());
    proxy.heal();
    let st = run.wait(60);
    assert_eq!(run.stdout_text(), "a\nb\n", "stderr: {}", run.stderr_text());
    assert_eq!(st.code(), Some(3), "stderr: {}", run.stderr_text());
    assert!(
        run.stderr_text().contains("lost the master"),
        "the driver did not fail over (the cut was too short?): {}",
        run.stderr_text()
    );
    c.stop();
}

/// `agora run` attached, `kill -9` of the `agora master` process and a restart on the same
/// address and work dir: the run carries on and ends with its task's exit code.
#[test]
fn agora_run_survives_a_kill_9_of_the_master() {
    let dir = RealCluster::prepare();
    let work = dir.path().join("master-work").to_str().expect("utf-8 path").to_string();
    let master_args = ["--work-dir", work.as_str()];
    let mut c = RealCluster::master_only(dir, &master_args);
    c.start_agent(&["--resources", "cpus:1;mem:256MiB"]);
    let mut run = Proc::spawn(
        "run",
        c.dir.path(),
        Command::new(AGORA).arg("run").arg("--config").arg(&c.config).args(["--", "sh", "-c", SCRIPT]),
    );
    run.wait_stdout("the task's first line", |l| (l == "a").then_some(()));
    c.kill9_and_restart_master(&master_args);
    let st = run.wait(60);
    assert_eq!(run.stdout_text(), "a\nb\n", "stderr: {}", run.stderr_text());
    assert_eq!(st.code(), Some(3), "stderr: {}", run.stderr_text());
    c.stop();
}

/// `agora run --count 3` through a 3 s cut: every task still counted, summary and success.
#[test]
fn agora_run_count_keeps_its_progress_across_a_partition() {
    let c = RealCluster::start(&["--framework-heartbeat", "500ms"], &["--resources", "cpus:1;mem:512MiB"]);
    let proxy = UdpProxy::start(c.addr.parse().expect("master address"));
    let config = c.config_via("via-proxy.toml", &proxy.addr.to_string());
    let mut run = Proc::spawn(
        "run-count",
        c.dir.path(),
        Command::new(AGORA)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .args(["--count", "3", "--cpus", "0.2", "--", "sh", "-c", "sleep 5"]),
    );
    common::dev::poll("the three tasks to run", 30, || {
        let tasks = c.tasks_json();
        (tasks.iter().filter(|t| t["state"] == "TASK_RUNNING").count() == 3).then_some(())
    });
    proxy.cut();
    // The partition itself.
    std::thread::sleep(Duration::from_secs(3));
    assert!(run.running(), "agora run gave up during the cut: {}", run.stderr_text());
    proxy.heal();
    let st = run.wait(60);
    let err = run.stderr_text();
    assert_eq!(st.code(), Some(0), "stderr: {err}");
    assert!(err.contains("3 tasks in") && err.contains("3 TASK_FINISHED"), "no full summary: {err}");
    assert!(err.contains("lost the master"), "the driver did not fail over: {err}");
    c.stop();
}
