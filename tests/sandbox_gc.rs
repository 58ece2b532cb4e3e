//! Sandbox garbage collection on a real cluster (`agora master` and `agora agent` as separate
//! processes): a finished task's sandbox is removed `--gc-delay` after its end was
//! acknowledged while a running task's stays, `agora logs` of a removed sandbox says so, and a
//! restarted agent removes the sandboxes its earlier runs left that no recovered task uses.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::dev::{poll, Proc, RealCluster, AGORA};
use std::process::Command;

const AGENT: &[&str] = &["--resources", "cpus:2;mem:1GiB", "--gc-delay", "1s", "--gc-interval", "200ms"];

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_dir()).collect())
        .unwrap_or_default()
}

/// Every run directory in the agent's work dir: `frameworks/<fw>/executors/<x>/runs/<run>`.
fn runs(work: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for fw in subdirs(&work.join("frameworks")) {
        for exec in subdirs(&fw.join("executors")) {
            out.extend(subdirs(&exec.join("runs")));
        }
    }
    out
}

fn set_mtime(dir: &Path, t: SystemTime) {
    std::fs::File::open(dir).and_then(|f| f.set_modified(t)).expect("set the directory's mtime");
}

/// `agora run --name sleeper -- sleep 120` in the background, running: the process, the task
/// id and its sandbox (the only run directory while it is alone).
fn start_sleeper(c: &RealCluster) -> (Proc, String, PathBuf) {
    let run = Proc::spawn(
        "sleeper",
        c.dir.path(),
        Command::new(AGORA)
            .env("AGORA_CONFIG", &c.config)
            .args(["run", "--name", "sleeper", "--", "sleep", "120"]),
    );
    let id = poll("the sleeper to run", 30, || {
        let tasks = c.tasks_json();
        let t = tasks.iter().find(|t| t["name"] == "sleeper" && t["state"] == "TASK_RUNNING")?;
        Some(t["id"].as_str().expect("id").to_string())
    });
    let found = runs(&c.work);
    assert_eq!(found.len(), 1, "the sleeper's sandbox alone: {found:?}");
    (run, id, found[0].clone())
}

fn stop_sleeper(c: &RealCluster, mut run: Proc, id: &str) {
    let out = c.agora(&["kill", id]);
    assert!(out.status.success(), "agora kill: {out:?}");
    run.wait(30);
}

/// `agora run -- echo hi`: its sandbox is removed about a second after it finished, the
/// running sleeper's stays, and `agora logs` of the removed one says it was collected.
#[test]
fn a_finished_sandbox_is_removed_after_the_delay_and_a_running_one_stays() {
    let c = RealCluster::start(&[], AGENT);
    let (sleeper_run, sleeper_id, sleeper) = start_sleeper(&c);

    // The echo's sandbox may go a second after `agora run` returns: watch for it meanwhile.
    let seen: Arc<Mutex<Option<PathBuf>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (seen, stop, work) = (seen.clone(), stop.clone(), c.work.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let echo = runs(&work)
                    .into_iter()
                    .find(|r| std::fs::read(r.join("stdout")).is_ok_and(|b| b == b"hi\n"));
                if let Some(r) = echo {
                    *seen.lock().expect("lock") = Some(r);
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let out = c.agora(&["run", "--", "echo", "hi"]);
    assert!(out.status.success(), "agora run: {out:?}");
    assert_eq!(out.stdout, b"hi\n");
    // Written before FINISHED, so the watcher found it unless it was removed at once.
    poll("the watcher to see the echo's sandbox", 10, || seen.lock().expect("lock").clone());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    watcher.join().expect("watcher");
    let echo = seen.lock().expect("lock").clone().expect("the echo's sandbox");
    assert_ne!(echo, sleeper);

    poll("the finished task's sandbox to be removed", 20, || (!echo.exists()).then_some(()));
    assert!(sleeper.is_dir(), "the running task's sandbox was removed");
    assert!(std::fs::read_dir(&sleeper).expect("read").next().is_some(), "the running sandbox was emptied");

    let tasks = c.tasks_json();
    let id = tasks.iter().find(|t| t["name"] == "echo").expect("the echo task")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let logs = c.agora(&["logs", &id]);
    let err = String::from_utf8_lossy(&logs.stderr);
    assert!(!logs.status.success(), "logs of a removed sandbox succeeded: {logs:?}");
    assert!(err.contains("removed by garbage collection"), "unclear error: {err}");

    stop_sleeper(&c, sleeper_run, &sleeper_id);
    c.stop();
}

/// A restarted agent schedules the run directories of its earlier runs that no recovered task
/// uses: a stale one is removed (with its now empty parents), the sandbox of a task that kept
/// running across the restart stays.
#[test]
fn a_restarted_agent_removes_stale_sandboxes_and_keeps_recovered_ones() {
    let mut c = RealCluster::start(&[], AGENT);
    let (sleeper_run, sleeper_id, sleeper) = start_sleeper(&c);
    c.agent.take().expect("agent").stop();

    let stale_task = c.work.join("frameworks/old-framework/executors/old-task");
    let stale = stale_task.join("runs/0b7a3c1e-0000-4000-8000-000000000000");
    std::fs::create_dir_all(&stale).expect("mkdir");
    std::fs::write(stale.join("stdout"), b"left over\n").expect("write");
    std::fs::write(stale_task.join("task.json"), b"{}").expect("write");
    let old = SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(stale_task.join("task.json"))
        .and_then(|f| f.set_modified(old))
        .expect("age task.json");
    // Older than the stale run: had the recovered task's sandbox been scheduled, it would be
    // removed no later than the stale one.
    set_mtime(&sleeper, old);
    set_mtime(&stale, SystemTime::now());

    c.start_agent(AGENT);
    // The run goes first, then the parents it leaves empty: wait for the last of them.
    let old_framework = c.work.join("frameworks/old-framework");
    poll("the stale sandbox and its empty parents to be removed", 20, || {
        (!old_framework.exists()).then_some(())
    });
    assert!(!stale.exists());
    assert!(sleeper.is_dir(), "the recovered task's sandbox was removed");

    stop_sleeper(&c, sleeper_run, &sleeper_id);
    c.stop();
}

/// `--gc-disk-headroom` is a fraction: anything else is refused naming the flag.
#[test]
fn a_headroom_outside_zero_to_one_is_refused() {
    for bad in ["1.5", "-0.1", "lots", "NaN"] {
        let out = Command::new(AGORA)
            .args(["agent", "--master", "127.0.0.1:1", "--tls-dir", "/nonexistent"])
            .arg(format!("--gc-disk-headroom={bad}"))
            .output()
            .expect("run agora agent");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {err}");
        assert!(err.contains("--gc-disk-headroom"), "{bad}: {err}");
    }
}
