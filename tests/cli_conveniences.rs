//! End-to-end tests of the CLI's conveniences against `agora dev` and `agora master`
//! processes: `agora describe`, id prefixes and task names, the `.agora-dev/client.toml` of the
//! current directory, quiet exits on a closed pipe, shell completions, errors that name their
//! address or cause once, and `/api/v1/state`'s master fields.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::dev::{Dev, AGORA};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(out: Output) -> Output {
    assert!(out.status.success(), "status {}; stderr: {}", out.status, text(&out.stderr));
    out
}

fn json(out: Output) -> serde_json::Value {
    serde_json::from_slice(&ok(out).stdout).expect("json")
}

/// The id of the task named `name` (the first listed).
fn task_id(dev: &Dev, name: &str) -> String {
    let tasks = dev.tasks_json();
    let t = tasks.iter().find(|t| t["name"] == name).unwrap_or_else(|| panic!("no task {name}: {tasks:?}"));
    t["id"].as_str().expect("id").to_string()
}

#[test]
fn describe_prefixes_and_names() {
    let dev = Dev::start("cpus:2;mem:1GiB");
    let out = dev.agora(&["run", "--name", "hello", "--", "sh", "-c", "echo hi; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    for _ in 0..2 {
        ok(dev.agora(&["run", "--name", "twin", "--", "true"]));
    }
    let hello = task_id(&dev, "hello");

    // A task, by a prefix of its id: everything, and its state changes in order.
    let d = json(dev.agora(&["describe", "task", &hello[..hello.len() - 3], "-o", "json"]));
    assert_eq!(d["id"], hello.as_str());
    assert_eq!(d["exit_code"], 3);
    assert_eq!(d["reason"], "command exited");
    assert_eq!(d["executor_id"], "agora-command");
    assert_eq!(d["agent"]["hostname"], "agent-0");
    assert_eq!(d["framework"]["id"], d["framework_id"]);
    assert!(d["usage"].is_object(), "{d}");
    let states: Vec<&str> = d["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|h| h["state"].as_str().expect("state"))
        .collect();
    assert_eq!(states, ["TASK_STAGING", "TASK_RUNNING", "TASK_FAILED"], "{d}");
    let times: Vec<u64> = d["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|h| h["timestamp_ms"].as_u64().expect("ms"))
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");

    // By its name, as a table.
    let table = text(&ok(dev.agora(&["describe", "task", "hello"])).stdout);
    for want in ["State:      TASK_FAILED", "Exit:       code 3", "State changes", "TASK_STAGING", "agent-0"]
    {
        assert!(table.contains(want), "no `{want}` in\n{table}");
    }

    // The agent (by hostname) and the framework (by a prefix of its id), with their tasks.
    let a = json(dev.agora(&["describe", "agent", "agent-0", "-o", "json"]));
    assert_eq!(a["task_list"].as_array().map(Vec::len), Some(3), "{a}");
    assert!(a["resources"].as_str().is_some_and(|r| r.contains("cpus:2")), "{a}");
    let fw = d["framework_id"].as_str().expect("framework id");
    let f = json(dev.agora(&["describe", "framework", fw, "-o", "json"]));
    assert_eq!(f["id"], fw, "{f}");
    assert_eq!(f["task_list"].as_array().map(Vec::len), Some(1), "{f}");
    // By its name (`agora run` names its framework after the task).
    let table = text(&ok(dev.agora(&["describe", "framework", "agora-run hello"])).stdout);
    assert!(table.contains("Role:") && table.contains(&hello), "{table}");

    // Logs by a unique name and by a prefix.
    assert_eq!(ok(dev.agora(&["logs", "hello"])).stdout, b"hi\n");
    assert_eq!(ok(dev.agora(&["logs", &hello[..7]])).stdout, b"hi\n");

    // An ambiguous prefix (or name) names its candidates; an unknown id is not found.
    let twins: Vec<String> = dev
        .tasks_json()
        .iter()
        .filter(|t| t["name"] == "twin")
        .map(|t| t["id"].as_str().expect("id").into())
        .collect();
    assert_eq!(twins.len(), 2);
    for cmd in [&["logs", "twin"][..], &["kill", "twin"], &["describe", "task", "twin"]] {
        let out = dev.agora(cmd);
        assert_eq!(out.status.code(), Some(1), "{cmd:?}");
        let err = text(&out.stderr);
        assert!(
            err.contains("ambiguous") && twins.iter().all(|t| err.contains(t.as_str())),
            "{cmd:?}: {err}"
        );
    }
    for cmd in [
        &["logs", "nope"][..],
        &["kill", "nope"],
        &["describe", "task", "nope"],
        &["describe", "agent", "nope"],
    ] {
        let out = dev.agora(cmd);
        assert_eq!(out.status.code(), Some(1), "{cmd:?}");
        let err = text(&out.stderr);
        assert!(err.contains("not found") && !err.contains("refused"), "{cmd:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }

    // Kill by a prefix.
    let runner = Command::new(AGORA)
        .args(["run", "--name", "napper", "--", "sleep", "60"])
        .env("AGORA_CONFIG", &dev.config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn run");
    let napper = common::dev::poll("napper running", 20, || {
        dev.tasks_json()
            .into_iter()
            .find(|t| t["name"] == "napper" && t["state"] == "TASK_RUNNING")
            .map(|t| t["id"].as_str().expect("id").to_string())
    });
    let out = ok(dev.agora(&["kill", &napper[..8]]));
    assert_eq!(text(&out.stdout), format!("kill requested for {napper}\n"));
    let status = runner.wait_with_output().expect("wait run");
    assert_eq!(status.status.code(), Some(128 + 15), "{}", text(&status.stderr));
    let d = json(dev.agora(&["describe", "task", &napper, "-o", "json"]));
    let last = d["history"].as_array().and_then(|h| h.last()).cloned().expect("a change");
    assert_eq!(last["state"], "TASK_KILLED", "{d}");
    dev.stop();
}

#[test]
fn the_dev_config_of_the_current_directory_is_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(AGORA)
        .args(["dev", "--listen", "127.0.0.1:0", "--agents", "1", "--resources", "cpus:1;mem:256MiB"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn agora dev");
    let config = dir.path().join(".agora-dev/client.toml");
    common::dev::poll("client.toml", 30, || config.exists().then_some(()));
    let agora = |cwd: &Path, args: &[&str]| {
        Command::new(AGORA)
            .args(args)
            .current_dir(cwd)
            .env_remove("AGORA_CONFIG")
            .output()
            .expect("run agora")
    };
    let out = ok(agora(dir.path(), &["agents"]));
    assert!(text(&out.stdout).contains("agent-0"), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(".agora-dev/client.toml"), "{err}");
    // Elsewhere nothing names a cluster.
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let out = agora(elsewhere.path(), &["agents"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("AGORA_CONFIG"), "{}", text(&out.stderr));
    // Something else named wins, without the note.
    let other = tempfile::tempdir().expect("tempdir");
    let out = Command::new(AGORA)
        .args(["agents", "--master", "127.0.0.1:1", "--tls-dir"])
        .arg(other.path())
        .current_dir(dir.path())
        .env_remove("AGORA_CONFIG")
        .output()
        .expect("run agora");
    assert_eq!(out.status.code(), Some(1));
    assert!(!text(&out.stderr).contains(".agora-dev"), "{}", text(&out.stderr));

    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "agora dev did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `agora args` with its stdout a pipe nobody reads any more.
fn into_closed_pipe(config: &Path, args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    Command::new(AGORA)
        .args(args)
        .env("AGORA_CONFIG", config)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run agora")
}

#[test]
fn a_closed_pipe_ends_commands_quietly_and_completions_are_generated() {
    use std::os::unix::process::ExitStatusExt;
    let dev = Dev::start("cpus:1;mem:256MiB");
    ok(dev.agora(&["run", "--name", "talker", "--", "sh", "-c", "seq 1 20000"]));
    for args in [
        &["tasks", "-o", "json"][..],
        &["agents"],
        &["describe", "task", "talker"],
        &["logs", "talker"],
        &["completions", "bash"],
    ] {
        let out = into_closed_pipe(&dev.config, args);
        // Killed by SIGPIPE as `cat` would be: no panic (101), not a word on stderr.
        assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{args:?}: {}", out.status);
        assert_eq!(text(&out.stderr), "", "{args:?}");
    }
    for (shell, marker) in [("bash", "complete -F"), ("zsh", "#compdef agora"), ("fish", "complete -c agora")]
    {
        let out = ok(dev.agora(&["completions", shell]));
        let script = text(&out.stdout);
        assert!(script.contains(marker) && script.contains("describe"), "{shell}: {}", &script[..200]);
    }
    let out = dev.agora(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));
    dev.stop();
}

#[test]
fn errors_name_their_address_and_cause_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = dir.path().join("tls");
    ok(Command::new(AGORA).args(["tls", "init", "--dir"]).arg(&tls).output().expect("tls init"));
    let master = |args: &[&str]| {
        Command::new(AGORA)
            .args(["master", "--tls-dir"])
            .arg(&tls)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("run agora master")
    };
    // Both listening addresses, taken.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let taken = udp.local_addr().expect("addr").to_string();
    let out = master(&["--listen", &taken]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains(&format!("cannot listen on {taken}")), "{}", text(&out.stderr));
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp");
    let taken = tcp.local_addr().expect("addr").to_string();
    let out = master(&["--listen", "127.0.0.1:0", "--http", &taken]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains(&format!("cannot listen on {taken}")), "{}", text(&out.stderr));

    // Another cluster's CA, on either side: said once.
    let dev = Dev::start("cpus:1;mem:256MiB");
    let cfg = std::fs::read_to_string(&dev.config).expect("client.toml");
    let addr =
        cfg.lines().find_map(|l| l.strip_prefix("master = ")).expect("master").trim_matches('"').to_string();
    let mixed = dir.path().join("mixed");
    std::fs::create_dir(&mixed).expect("mkdir");
    std::fs::copy(dev.dir.path().join("tls/ca.pem"), mixed.join("ca.pem")).expect("ca");
    for f in ["operator.pem", "operator-key.pem"] {
        std::fs::copy(tls.join(f), mixed.join(f)).expect("copy");
    }
    for (what, tls_dir) in [("foreign CA", &tls), ("foreign certificate", &mixed)] {
        let out = Command::new(AGORA)
            .args(["tasks", "--master", &addr, "--tls-dir"])
            .arg(tls_dir)
            .env_remove("AGORA_CONFIG")
            .output()
            .expect("run agora");
        assert_eq!(out.status.code(), Some(1), "{what}");
        let err = text(&out.stderr);
        assert_eq!(err.matches("certificate not signed by this cluster's CA").count(), 1, "{what}: {err}");
        assert_eq!(err.lines().count(), 1, "{what}: {err}");
    }
    dev.stop();
}

#[test]
fn the_state_endpoint_names_the_master() {
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp");
    let http = tcp.local_addr().expect("addr").to_string();
    drop(tcp);
    let dev = Dev::start_with(&["--agents", "1", "--resources", "cpus:1;mem:256MiB", "--http", &http]);
    let (status, body) = common::dev::poll("/api/v1/state", 20, || {
        std::net::TcpStream::connect(&http).ok()?;
        Some(common::dev::http_get(&http, "/api/v1/state"))
    });
    assert!(status.contains("200"), "{status}");
    let state: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(state["version"], env!("CARGO_PKG_VERSION"));
    assert!(state["master_id"].as_str().is_some_and(|id| !id.is_empty()), "{state}");
    assert_eq!(state["flags"]["http"], http.as_str());
    assert_eq!(state["flags"]["allocation_interval"], "200ms");
    assert_eq!(state["flags"]["agents"], "1");
    assert_eq!(state["agents"].as_array().map(Vec::len), Some(1));
    dev.stop();
}
