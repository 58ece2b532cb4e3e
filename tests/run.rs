//! `agora run` as a newcomer meets it, end to end against a real cluster (`agora dev`, or a
//! master and an agent as separate processes): the task id on stderr, Ctrl-C, `--detach`, the
//! reason a limit ended a task, units and exit codes.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::dev::{poll, Dev, RealCluster, AGORA};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn task_by_id(dev: &Dev, id: &str) -> Option<serde_json::Value> {
    dev.tasks_json().into_iter().find(|t| t["id"] == id)
}

fn running_task_named(dev: &Dev, name: &str) -> String {
    poll(&format!("{name} RUNNING"), 30, || {
        let t = dev.tasks_json().into_iter().find(|t| t["name"] == name && t["state"] == "TASK_RUNNING")?;
        Some(t["id"].as_str()?.to_string())
    })
}

/// What a task id may be made of.
fn id_chars(id: &str) -> bool {
    !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[test]
fn interrupting_an_attached_run_kills_its_task_at_once() {
    let dev = Dev::start("cpus:2;mem:1GiB");
    for (signal, code) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let name = format!("nap{code}");
        let run = Command::new(AGORA)
            .args(["run", "--name", &name, "--", "sleep", "60"])
            .env("AGORA_CONFIG", &dev.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn agora run");
        let id = running_task_named(&dev, &name);
        let signalled = Instant::now();
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(run.id() as i32, signal) };
        let out = run.wait_with_output().expect("wait for agora run");
        assert_eq!(out.status.code(), Some(code), "{}", stderr(&out));
        assert!(stderr(&out).contains("interrupted"), "{}", stderr(&out));
        // Killed with the run's reason, within the 2 s the issue asks (not the 30 s failover
        // timeout a vanished run would leave it running for).
        let t = loop {
            let t = task_by_id(&dev, &id).expect("the task is listed");
            if t["state"] != "TASK_RUNNING" {
                break t;
            }
            assert!(signalled.elapsed() < Duration::from_secs(2), "{id} still running 2 s after the signal");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(
            (t["state"].as_str(), t["reason"].as_str()),
            (Some("TASK_KILLED"), Some("run interrupted")),
            "{t}"
        );
    }
    assert!(dev.stop().success());
}

#[test]
fn detach_prints_the_ids_and_leaves_the_tasks_running() {
    let dev = Dev::start("cpus:2;mem:1GiB");
    let out = dev.agora(&["run", "--detach", "--count", "2", "--name", "napper", "--", "sleep", "60"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    assert_eq!(ids.len(), 2, "one id per line: {ids:?}");
    // RUNNING when it returned, and still after the run's connection is long gone.
    for id in &ids {
        assert!(id.starts_with("napper-") && id_chars(id), "{id}");
        assert_eq!(task_by_id(&dev, id).expect("listed")["state"], "TASK_RUNNING");
    }
    std::thread::sleep(Duration::from_secs(3));
    for id in &ids {
        assert_eq!(task_by_id(&dev, id).expect("listed")["state"], "TASK_RUNNING", "{id}");
        let out = dev.agora(&["kill", id]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    // The kill reaches the tasks, and the master shows TASK_KILLED although nobody
    // acknowledges the TASK_KILLING before it (the detached run's framework is away for its
    // failover timeout, and the agent sends a task's updates in order): the agent tells the
    // master the newest state meanwhile.
    for id in &ids {
        poll(&format!("{id} TASK_KILLED"), 20, || {
            let t = task_by_id(&dev, id)?;
            (t["state"] == "TASK_KILLED").then_some(())
        });
    }
    // Its resources are free again: the agent's 2 cpus fit a task of 2 cpus.
    let out = dev.agora(&["run", "-q", "--cpus", "2", "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // A task that never ran is reported as attached (125, the reason), its id printed all the same.
    let out = dev.agora(&["run", "-d", "--", "/nonexistent/program"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1, "{}", stderr(&out));
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    assert!(stderr(&out).contains("TASK_FAILED") || stderr(&out).contains("TASK_ERROR"), "{}", stderr(&out));
    assert!(dev.stop().success());
}

#[test]
fn the_task_id_comes_from_the_first_word_and_is_printed_on_stderr() {
    let dev = Dev::start("cpus:2;mem:1GiB");
    let out = dev.agora(&["run", "--shell", "--", "echo hi && true"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(out.stdout, b"hi\n");
    let err = stderr(&out);
    let first = err.lines().next().unwrap_or_default();
    let id = first.strip_prefix("agora: task ").unwrap_or_else(|| panic!("no id line: {err}"));
    assert!(id.starts_with("echo-") && id_chars(id), "{id}");
    assert!(task_by_id(&dev, id).is_some(), "{id} is listed");

    // A path, metacharacters: only the name's first word, sanitized.
    let out = dev.agora(&["run", "--shell", "--", "/bin/true&&ls *; x=$(echo)"]);
    let err = stderr(&out);
    let id = err.lines().next().and_then(|l| l.strip_prefix("agora: task ")).expect("id line");
    assert!(id.starts_with("true-") && id_chars(id), "{id}");

    // --count: one line for all of them; -q: none.
    let out = dev.agora(&["run", "--count", "3", "--", "true"]);
    assert!(
        stderr(&out).lines().next().is_some_and(|l| l.starts_with("agora: 3 tasks true-")),
        "{}",
        stderr(&out)
    );
    let out = dev.agora(&["run", "-q", "--", "true"]);
    assert_eq!((out.status.code(), out.stderr.as_slice()), (Some(0), &b""[..]));
    assert!(dev.stop().success());
}

#[test]
fn sizes_and_durations_need_a_unit_and_local_errors_are_not_125() {
    let dev = Dev::start("cpus:2;mem:1GiB");
    for (args, hint) in [
        (&["run", "--mem", "64", "--", "true"][..], "`64MiB`"),
        (&["run", "--disk", "512", "--", "true"][..], "`512MiB`"),
        (&["run", "--wasm", "x.wasm", "--timeout", "2"][..], "`2s`"),
    ] {
        let out = dev.agora(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(hint), "{args:?}: {}", stderr(&out));
    }
    let out = dev.agora(&["run", "--count", "0", "--", "true"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // Bytes, when unmistakable.
    let out = dev.agora(&["run", "-q", "--mem", "67108864", "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // A local file that is not there: an error of ours (1), not a task that never ran (125).
    let out = dev.agora(&["run", "--wasm", "/nonexistent/app.wasm"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("cannot read /nonexistent/app.wasm"), "{}", stderr(&out));
    assert!(dev.stop().success());
}

#[test]
fn a_task_ended_by_its_memory_limit_says_so() {
    if !common::root_or_skip("cgroups need root") {
        return;
    }
    let c = RealCluster::start(&[], &["--resources", "cpus:1;mem:512MiB"]);
    let out = c.agora(&[
        "run",
        "--mem",
        "32MiB",
        "--name",
        "hog",
        "--",
        "sh",
        "-c",
        "head -c 300000000 /dev/zero | tail > /dev/null",
    ]);
    let err = stderr(&out);
    // The shell's own code for its OOM-killed child, passed through, and the reason told.
    assert_eq!(out.status.code(), Some(137), "{err}");
    let why =
        err.lines().find(|l| l.contains("TASK_FAILED")).unwrap_or_else(|| panic!("no reason line: {err}"));
    assert!(why.starts_with("agora: task hog-") && why.contains("memory limit exceeded"), "{why}");
    // With --count, the summary counts the reason, not `signal 9` or `exit 137`.
    let out = c.agora(&[
        "run",
        "--count",
        "2",
        "--mem",
        "32MiB",
        "--",
        "sh",
        "-c",
        "head -c 300000000 /dev/zero | tail > /dev/null",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("failures: memory limit exceeded ×2"), "{}", stderr(&out));
    c.stop();
}

#[test]
fn a_task_lost_after_it_ran_is_not_reported_as_never_run() {
    if !common::root_or_skip("the agent's cleanup kills task users' processes") {
        return;
    }
    let mut c = RealCluster::start(&[], &["--resources", "cpus:1;mem:512MiB"]);
    let run = Command::new(AGORA)
        .args(["run", "--name", "doomed", "--", "sleep", "60"])
        .env("AGORA_CONFIG", &c.config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn agora run");
    poll("doomed RUNNING", 30, || {
        c.tasks_json().into_iter().find(|t| t["name"] == "doomed" && t["state"] == "TASK_RUNNING")
    });
    // The agent dies and comes back without the task (its earlier run cleaned up): TASK_GONE.
    c.kill_agent();
    c.start_agent(&["--resources", "cpus:1;mem:512MiB", "--recover", "cleanup"]);
    let out = run.wait_with_output().expect("wait for agora run");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("TASK_GONE"), "{err}");
    c.stop();
}
