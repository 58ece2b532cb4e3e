//! End-to-end tests of the built `agora` binary: `agora dev` in the background, the client
//! commands against it, exactly as a user types them.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::dev::{Dev, AGORA};

fn tasks_json(dev: &Dev) -> Vec<serde_json::Value> {
    dev.tasks_json()
}

#[test]
fn run_streams_output_and_passes_the_exit_code() {
    let dev = Dev::start("cpus:2;mem:1GiB");
    let out = dev.agora(&["run", "--", "sh", "-c", "echo hello; exit 3"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    assert_eq!(out.status.code(), Some(3), "stderr: {}", String::from_utf8_lossy(&out.stderr));

    // Byte for byte, both streams, and success (-q: without the task id line).
    let out = dev.agora(&["run", "-q", "--", "sh", "-c", "printf 'a\\0b'; printf 'e' >&2"]);
    assert_eq!(out.stdout, b"a\0b");
    assert_eq!(out.stderr, b"e");
    assert_eq!(out.status.code(), Some(0));

    // A signal becomes 128+N.
    let out = dev.agora(&["run", "--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(out.status.code(), Some(137));

    // A task that never ran: non-zero and one line of reason.
    let out = dev.agora(&["run", "--quiet", "--", "/nonexistent/program"]);
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("TASK_FAILED") || err.contains("TASK_ERROR"), "{err}");

    // Too big for the cluster: refused with a reason, not left waiting.
    let out = dev.agora(&["run", "--cpus", "64", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no agent can ever fit"), "{out:?}");

    // -o json lists every task seen so far with the contract's fields.
    let tasks = tasks_json(&dev);
    let hello = tasks.iter().find(|t| t["exit_code"] == 3).expect("the exit-3 task");
    for key in ["id", "name", "framework_id", "agent_id", "state", "exit_code", "reason"] {
        assert!(hello.get(key).is_some(), "missing {key} in {hello}");
    }
    assert_eq!(hello["state"], "TASK_FAILED");

    // Logs after the fact.
    let id = hello["id"].as_str().expect("id");
    let out = dev.agora(&["logs", id]);
    assert_eq!(out.stdout, b"hello\n");

    let st = dev.stop();
    assert!(st.success(), "agora dev exited with {st}");
}

#[test]
fn count_kill_and_listing() {
    let dev = Dev::start("cpus:2;mem:1GiB");
    let out = dev.agora(&["run", "--count", "20", "--cpus", "0.1", "--mem", "16MiB", "--", "true"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary = String::from_utf8_lossy(&out.stderr);
    assert!(summary.contains("20 tasks") && summary.contains("20 TASK_FINISHED"), "{summary}");

    // A long task, killed from another shell.
    let runner = Command::new(AGORA)
        .args(["run", "--name", "napper", "--", "sleep", "60"])
        .env("AGORA_CONFIG", &dev.config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn run");
    let deadline = Instant::now() + Duration::from_secs(20);
    let id = loop {
        let running =
            tasks_json(&dev).into_iter().find(|t| t["name"] == "napper" && t["state"] == "TASK_RUNNING");
        if let Some(t) = running {
            break t["id"].as_str().expect("id").to_string();
        }
        assert!(Instant::now() < deadline, "napper never ran");
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = dev.agora(&["kill", &id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status = runner.wait_with_output().expect("wait run");
    assert_eq!(status.status.code(), Some(128 + 15), "{}", String::from_utf8_lossy(&status.stderr));

    let agents = dev.agora(&["agents", "-o", "json"]);
    let agents: Vec<serde_json::Value> = serde_json::from_slice(&agents.stdout).expect("json");
    assert_eq!(agents.len(), 1);
    for key in ["id", "hostname", "resources", "attributes"] {
        assert!(agents[0].get(key).is_some(), "missing {key}");
    }
    let fws = dev.agora(&["frameworks", "-o", "json"]);
    let fws: Vec<serde_json::Value> = serde_json::from_slice(&fws.stdout).expect("json");
    for key in ["id", "name", "role", "principal"] {
        assert!(fws.iter().all(|f| f.get(key).is_some()), "missing {key}");
    }
    let table = dev.agora(&["tasks"]);
    assert!(String::from_utf8_lossy(&table.stdout).starts_with("ID"), "table header");
    dev.stop();
}

#[test]
fn bad_input_gets_a_clear_error() {
    // Away from any `.agora-dev/client.toml` (the client commands use the current directory's).
    let cwd = tempfile::tempdir().expect("tempdir");
    let run = |args: &[&str], cfg: Option<&Path>| {
        let mut c = Command::new(AGORA);
        c.args(args).env_remove("AGORA_CONFIG").current_dir(cwd.path());
        if let Some(p) = cfg {
            c.env("AGORA_CONFIG", p);
        }
        c.output().expect("run")
    };
    let out = run(&["run", "--cpus", "lots", "--", "true"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cpus"));
    let out = run(&["run", "--mem", "12XB", "--", "true"], None);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["tasks"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("AGORA_CONFIG"));
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("client.toml");
    std::fs::write(&bad, "master = [").expect("write");
    let out = run(&["tasks"], Some(&bad));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("client.toml"));
    // Nobody listening: a bounded wait and a message that says so.
    agora_sdk_tls_init(dir.path());
    let started = Instant::now();
    let tls = dir.path().join("tls");
    let out = run(
        &["run", "--master", "127.0.0.1:1", "--tls-dir", tls.to_str().expect("utf-8"), "--", "true"],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no answer from the master"), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(15));
    let out = run(
        &["agent", "--master", "127.0.0.1:1", "--tls-dir", "/nonexistent", "--resources", "cpus:x"],
        None,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cpus:x"));
    // --cgroup-favordynmods takes on or off, and says so.
    let out = run(
        &["agent", "--master", "127.0.0.1:1", "--tls-dir", "/nonexistent", "--cgroup-favordynmods", "yes"],
        None,
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid value 'yes' for '--cgroup-favordynmods") && err.contains("on, off"),
        "{err}"
    );
}

fn agora_sdk_tls_init(dir: &Path) {
    let out =
        Command::new(AGORA).args(["tls", "init", "--dir"]).arg(dir.join("tls")).output().expect("tls init");
    assert!(out.status.success(), "{out:?}");
    // A second init refuses to replace the CA.
    let again =
        Command::new(AGORA).args(["tls", "init", "--dir"]).arg(dir.join("tls")).output().expect("tls init");
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
}

#[test]
fn an_agent_refuses_a_task_user_that_does_not_exist_or_is_root() {
    if !common::root_or_skip("an agent that is not root runs tasks as itself and checks no task user") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    for (user, says) in [("no-such-user-agora", "no such user"), ("root", "tasks never run as root")] {
        let out = Command::new(AGORA)
            .args(["agent", "--master", "127.0.0.1:9", "--task-user", user, "--work-dir"])
            .arg(dir.path().join("work"))
            .arg("--tls-dir")
            .arg(dir.path().join("tls"))
            .stdin(Stdio::null())
            .output()
            .expect("run agora agent");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{user}: {err}");
        assert!(err.contains(says) && err.contains(user), "{user}: {err}");
    }
}
