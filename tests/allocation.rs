//! End-to-end test of demand-aware allocation through the built `agora` binary: the Dominant
//! Resource Fairness paper's example, with two `agora run --count 10` stating their demand.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const AGORA: &str = env!("CARGO_BIN_EXE_agora");

/// Child processes killed (SIGKILL) and reaped when dropped, so that nothing lingers even
/// when an assertion fails.
struct Reaped(Vec<Child>);

impl Reaped {
    fn signal_all(&mut self, sig: i32) {
        for c in &self.0 {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    fn wait_all(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        for c in &mut self.0 {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn agora(config: &PathBuf) -> Command {
    let mut c = Command::new(AGORA);
    c.env("AGORA_CONFIG", config).stdin(Stdio::null());
    c
}

/// RUNNING tasks per task shape (`cpus:1;mem:4GiB` → 3), and how many frameworks hold them.
fn running_by_shape(config: &PathBuf) -> BTreeMap<String, (usize, usize)> {
    let out = agora(config).args(["tasks", "-o", "json"]).output().expect("agora tasks");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tasks: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json array");
    let mut by: BTreeMap<String, (usize, Vec<String>)> = BTreeMap::new();
    for t in tasks.iter().filter(|t| t["state"] == "TASK_RUNNING") {
        let e = by.entry(t["resources"].as_str().unwrap_or_default().to_string()).or_default();
        e.0 += 1;
        let fw = t["framework_id"].as_str().unwrap_or_default().to_string();
        if !e.1.contains(&fw) {
            e.1.push(fw);
        }
    }
    by.into_iter().map(|(k, (n, fws))| (k, (n, fws.len()))).collect()
}

#[test]
fn two_runs_share_one_agent_as_in_the_drf_paper() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Command::new(AGORA)
        .args(["dev", "--listen", "127.0.0.1:0", "--agents", "1", "--resources", "cpus:9;mem:18GiB"])
        // Both runs subscribe (with their demand) within the batching window, so the first
        // allocation sees both: this is the "started together" of the paper's example.
        .args(["--allocation-interval", "5s", "--allocation-batch", "1500ms", "--allocation-slice", "1"])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn agora dev");
    let mut dev = Reaped(vec![dev]);
    let config = dir.path().join("client.toml");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !config.exists() {
        assert!(Instant::now() < deadline, "agora dev did not write client.toml");
        std::thread::sleep(Duration::from_millis(20));
    }

    let run = |cpus: &str, mem: &str| {
        agora(&config)
            .args(["run", "--count", "10", "--cpus", cpus, "--mem", mem, "--", "sleep", "30"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn agora run")
    };
    let mut runs = Reaped(vec![run("1", "4GiB"), run("3", "1GiB")]);

    // Poll until the same (non-empty) picture shows three times in a row.
    let want: BTreeMap<String, (usize, usize)> =
        [("cpus:1;mem:4GiB".to_string(), (3, 1)), ("cpus:3;mem:1GiB".to_string(), (2, 1))].into();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = BTreeMap::new();
    let mut same = 0;
    while same < 3 || last.is_empty() {
        let now = running_by_shape(&config);
        same = if now == last { same + 1 } else { 0 };
        last = now;
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(last, want, "RUNNING tasks per shape (count, frameworks)");

    // Nothing lingers: the runs go first, then the dev cluster kills the tasks.
    runs.signal_all(libc::SIGKILL);
    runs.wait_all(Duration::from_secs(5));
    dev.signal_all(libc::SIGTERM);
    dev.wait_all(Duration::from_secs(20));
}

#[test]
fn an_allocation_slice_of_no_agents_is_refused_with_the_flag_named() {
    let out = Command::new(AGORA)
        .args(["master", "--listen", "127.0.0.1:0", "--allocation-slice", "0"])
        .output()
        .expect("run agora master");
    assert!(!out.status.success(), "a slice of 0 agents was accepted");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--allocation-slice") && stderr.contains("1 or more"), "{stderr}");
}
