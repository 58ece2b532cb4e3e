//! `agora job run|status|stop` end to end against `agora dev` (real processes): groups with
//! counts, attribute constraints and a restart policy; a bad job file refused naming its line;
//! status and stop of a running job.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::dev::{Dev, AGORA};

/// A directory every task may write to (tasks run as an unprivileged user).
fn shared_dir(dev: &Dev) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let d = dev.dir.path().join("shared");
    std::fs::create_dir_all(&d).expect("mkdir");
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    d
}

fn write_job(dev: &Dev, name: &str, text: &str) -> String {
    let path = dev.dir.path().join(name);
    std::fs::write(&path, text).expect("write the job file");
    path.to_string_lossy().into_owned()
}

#[test]
fn a_job_runs_its_groups_places_by_constraint_and_retries_failures() {
    let dev = Dev::start_with(&[
        "--agents",
        "2",
        "--resources",
        "cpus:1;mem:512MiB",
        "--agent-attributes",
        "rack:r1;blocks:{b17,b42}",
        "--agent-attributes",
        "rack:r2",
    ]);
    let shared = shared_dir(&dev);
    let flag = shared.join("flaky-ran-once");
    let job = write_job(
        &dev,
        "job.toml",
        &format!(
            r#"
name = "nightly"
[[group]]
name = "extract"
count = 3
cpus = 0.1
mem = "32MiB"
command = ["true"]

[[group]]
name = "placed"
count = 2
cpus = 0.1
mem = "32MiB"
command = ["sh", "-c", "echo $AGORA_TASK_ID >> {shared}/placed"]
constraints = ["rack == r1", "blocks contains b17"]

[[group]]
name = "flaky"
cpus = 0.1
mem = "32MiB"
command = ["sh", "-c", "test -e {flag} || {{ touch {flag}; exit 3; }}"]
restart = {{ attempts = 2, delay = "200ms" }}
"#,
            shared = shared.display(),
            flag = flag.display()
        ),
    );
    let out = dev.agora(&["job", "run", &job]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "agora job run: {err}");
    assert!(err.contains("job nightly: 6 finished, 0 failed, 1 retried"), "{err}");
    // The placed tasks ran on the r1 agent only.
    let tasks = dev.tasks_json();
    let r1: Vec<&serde_json::Value> = tasks.iter().filter(|t| t["name"] == "placed").collect();
    assert_eq!(r1.len(), 2, "{tasks:?}");
    let agents: serde_json::Value =
        serde_json::from_slice(&dev.agora(&["agents", "-o", "json"]).stdout).expect("agents json");
    let r1_agent = agents
        .as_array()
        .expect("array")
        .iter()
        .find(|a| a["attributes"].to_string().contains("r1"))
        .map(|a| a["id"].clone())
        .expect("the r1 agent");
    assert!(r1.iter().all(|t| t["agent_id"] == r1_agent), "placed off r1: {r1:?} (r1 is {r1_agent})");

    // A group that keeps failing: its attempts spent, the job fails.
    let failing = write_job(
        &dev,
        "failing.toml",
        "name = \"broken\"\n[[group]]\nname = \"fails\"\ncpus = 0.1\nmem = \"32MiB\"\ncommand = [\"false\"]\nrestart = { attempts = 1, delay = \"100ms\" }\n",
    );
    let out = dev.agora(&["job", "run", &failing]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("0 finished, 1 failed, 1 retried"), "{err}");

    // A bad file: refused before anything runs, naming the line.
    let bad = write_job(&dev, "bad.toml", "name = \"x\"\n[[group]]\nname = \"g\"\ncpus = 0.1\nmem = \"32MiB\"\ncommand = [\"true\"]\ncolour = \"red\"\n");
    let out = dev.agora(&["job", "run", &bad]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("bad.toml:7:") && err.contains("colour"), "{err}");
}

#[test]
fn a_running_job_shows_its_status_and_stops() {
    let dev = Dev::start("cpus:2;mem:1GiB");
    let job = write_job(
        &dev,
        "long.toml",
        "name = \"long\"\n[[group]]\nname = \"sleepers\"\ncount = 2\ncpus = 0.1\nmem = \"32MiB\"\ncommand = [\"sleep\", \"600\"]\nrestart = { attempts = 3 }\n",
    );
    let mut run = Command::new(AGORA)
        .args(["job", "run", &job])
        .env("AGORA_CONFIG", &dev.config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("agora job run");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = dev.agora(&["job", "status", "long", "-o", "json"]);
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
            if v["groups"]["sleepers"]["TASK_RUNNING"] == 2 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the job's tasks are not running: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = dev.agora(&["job", "stop", "long"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("kill requested for 2 task(s)"));
    // Killed tasks are not restarted: the run ends, failed.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = run.try_wait().expect("wait") {
            break st;
        }
        assert!(Instant::now() < deadline, "agora job run did not end after agora job stop");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(run.stderr.as_mut().expect("stderr"), &mut err).expect("read");
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("0 finished, 2 failed, 0 retried"), "{err}");
    let out = dev.agora(&["job", "status", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no running job named nope"));
}
