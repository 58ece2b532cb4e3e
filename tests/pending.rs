//! Tasks that wait for resources are visible, end to end against `agora dev`: `agora tasks`
//! (table and JSON), `agora describe task`, `/api/v1/state` and the UI's task list show them
//! `TASK_PENDING` with why they wait (`waiting: needs cpus:0.5, largest free cpus:0.2`), the
//! waiting `agora run` says so once on stderr, and the task runs once resources free up.

use std::process::{Command, Stdio};

mod common;

use common::dev::{http_get, poll, Dev, AGORA};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_task_that_waits_for_resources_is_listed_pending_with_the_reason_and_runs_when_they_free_up() {
    let mut dev =
        Dev::start_with(&["--agents", "1", "--resources", "cpus:1;mem:1GiB", "--http", "127.0.0.1:0"]);
    let http = dev.stdout_line("HTTP: http://");
    let http = http.split('/').next().expect("address").to_string();

    // A task bigger than any agent is refused at once (it could never run).
    let out = dev.agora(&["run", "--cpus", "2", "--", "true"]);
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    assert!(stderr(&out).contains("no agent can ever fit"), "{}", stderr(&out));

    // A hog holds 0.8 of the agent's 1 cpu; a task of 0.5 must wait for it.
    let out = dev.agora(&["run", "--detach", "--cpus", "0.8", "--name", "hog", "--", "sleep", "600"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let hog = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let waiter = Command::new(AGORA)
        .args(["run", "--cpus", "0.5", "--name", "waiter", "--", "echo", "ran at last"])
        .env("AGORA_CONFIG", &dev.config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn agora run");

    let reason = "waiting: needs cpus:0.5, largest free cpus:0.2";
    let pending = poll("the waiting task listed TASK_PENDING", 30, || {
        dev.tasks_json().into_iter().find(|t| t["state"] == "TASK_PENDING" && t["reason"] == reason)
    });
    let id = pending["id"].as_str().expect("the run names its task").to_string();
    assert!(id.starts_with("waiter-"), "{pending}");
    assert_eq!(
        (pending["resources"].as_str(), pending["count"].as_u64()),
        (Some("cpus:0.5;mem:64MiB"), Some(1))
    );

    let out = dev.agora(&["tasks"]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let row = table.lines().find(|l| l.starts_with(&id)).unwrap_or_else(|| panic!("no row {id}:\n{table}"));
    assert!(row.contains("TASK_PENDING") && row.ends_with(reason), "{row}");

    // describe, with a prefix of the id as everywhere.
    let out = dev.agora(&["describe", "task", &id[..id.len() - 2]]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("TASK_PENDING"), "{text}");
    assert!(text.contains("Waiting:") && text.contains("needs cpus:0.5, largest free cpus:0.2"), "{text}");

    // /api/v1/state and the UI's task list.
    let (_, body) = http_get(&http, "/api/v1/state");
    let state: serde_json::Value = serde_json::from_str(&body).expect("state json");
    let listed = state["pending_tasks"].as_array().expect("pending_tasks");
    assert!(listed.iter().any(|p| p["id"] == id.as_str() && p["reason"] == reason), "{listed:?}");
    let (_, page) = http_get(&http, "/tasks");
    assert!(page.contains("Waiting for resources") && page.contains(&id) && page.contains(reason), "{page}");

    // The hog ends: the waiter runs, and said why it waited once.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let out = dev.agora(&["kill", &hog]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = waiter.wait_with_output().expect("wait for agora run");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ran at last\n");
    let err = stderr(&out);
    let said: Vec<&str> = err.lines().filter(|l| l.contains("waiting:")).collect();
    assert_eq!(said, [format!("agora: task {id} {reason}")], "{err}");
    assert!(dev.tasks_json().iter().all(|t| t["state"] != "TASK_PENDING"), "nothing pending any more");
    assert!(dev.stop().success());
}
