//! Disk limits on a real cluster (`agora master` and `agora agent` as separate processes): a
//! task writing far more than its `--disk` is killed with reason `disk limit exceeded` while
//! the agent carries on; output past the agent's `--max-output-size` keeps its tail, which
//! `agora logs` shows; a shipped `--dir` larger than the task's disk is refused before it is
//! unpacked whole.

mod common;

use common::dev::RealCluster;

const AGENT: &[&str] = &[
    "--resources",
    "cpus:2;mem:1GiB;disk:20GiB",
    "--disk-check-interval",
    "200ms",
    "--max-output-size",
    "512KiB",
];

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn task<'a>(tasks: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    tasks.iter().find(|t| t["name"] == name).unwrap_or_else(|| panic!("no task {name}: {tasks:?}"))
}

#[test]
fn a_task_over_its_disk_is_killed_and_the_agent_carries_on() {
    let c = RealCluster::start(&[], AGENT);
    // 200 MiB into a sandbox of 1 MiB, then waiting to be caught.
    let out = c.agora(&[
        "run",
        "--disk",
        "1MiB",
        "--name",
        "filler",
        "--",
        "sh",
        "-c",
        "head -c 209715200 /dev/zero > big; sleep 60",
    ]);
    let err = stderr(&out);
    assert_ne!(out.status.code(), Some(0), "{err}");
    let why =
        err.lines().find(|l| l.contains("TASK_FAILED")).unwrap_or_else(|| panic!("no reason line: {err}"));
    assert!(why.contains("disk limit exceeded"), "{why}");
    let tasks = c.tasks_json();
    let t = task(&tasks, "filler");
    assert_eq!(
        (t["state"].as_str(), t["reason"].as_str()),
        (Some("TASK_FAILED"), Some("disk limit exceeded")),
        "{t}"
    );
    let msg = t["message"].as_str().unwrap_or_default();
    assert!(msg.contains("more than its disk limit of 1MiB"), "the message gives usage and limit: {msg}");

    // The agent carries on: the next task runs.
    let out = c.agora(&["run", "--disk", "1MiB", "--", "echo", "still here"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "still here\n");
    c.stop();
}

#[test]
fn output_past_the_cap_keeps_its_tail_and_logs_show_it() {
    let c = RealCluster::start(&[], AGENT);
    // About 3 MiB of numbered lines, then a pause for a check while the task still runs.
    let script = "i=0; while [ $i -lt 60000 ]; do echo \"line $i ......................................\"; \
                  i=$((i+1)); done; echo done-marker; sleep 1";
    let out = c.agora(&["run", "--name", "chatty", "--", "sh", "-c", script]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let tasks = c.tasks_json();
    let id = task(&tasks, "chatty")["id"].as_str().expect("id").to_string();
    let out = c.agora(&["logs", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = &out.stdout;
    assert!(!text.contains(&0), "the dropped head is not sent as zeros");
    assert!(text.len() <= 512 << 10, "at most the cap is kept: {} bytes", text.len());
    assert!(text.len() >= 128 << 10, "a good part of the tail is kept: {} bytes", text.len());
    let text = String::from_utf8_lossy(text);
    assert!(text.ends_with("line 59999 ......................................\ndone-marker\n"), "the tail");
    assert!(!text.contains("\nline 0 ") && !text.starts_with("line 0 "), "the head is gone");
    // On the agent the file keeps its length, holding only the tail.
    let file = walk(&c.work).into_iter().find(|p| {
        p.file_name().is_some_and(|n| n == "stdout")
            && std::fs::read(p).is_ok_and(|b| b.ends_with(b"done-marker\n"))
    });
    let file = file.expect("the task's stdout");
    let meta = std::fs::metadata(&file).expect("stat");
    use std::os::unix::fs::MetadataExt;
    assert!(meta.len() > 2 << 20, "offsets are unchanged: {} bytes long", meta.len());
    assert!(meta.blocks() * 512 <= 512 << 10, "{} bytes allocated", meta.blocks() * 512);
    c.stop();
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn a_shipped_directory_bigger_than_the_task_s_disk_is_refused() {
    let c = RealCluster::start(&[], AGENT);
    let local = c.dir.path().join("shipped");
    std::fs::create_dir(&local).expect("mkdir");
    std::fs::write(local.join("small.txt"), "small").expect("write");
    std::fs::write(local.join("big.bin"), vec![7u8; 3 << 20]).expect("write");
    let wat = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/wasm/hello.wat");
    let dir_arg = format!("{}::/data", local.display());
    let out = c.agora(&["run", "--name", "shipper", "--wasm", wat, "--disk", "1MiB", "--dir", &dir_arg]);
    let err = stderr(&out);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("disk limit exceeded"), "{err}");
    let tasks = c.tasks_json();
    let t = task(&tasks, "shipper");
    assert_eq!(t["reason"].as_str(), Some("disk limit exceeded"), "{t}");
    assert!(t["message"].as_str().unwrap_or_default().contains("does not fit in the task's disk"), "{t}");
    // Nothing of the big file was written.
    assert!(
        !walk(&c.work).iter().any(|p| p.file_name().is_some_and(|n| n == "big.bin")),
        "the unpacker stopped before the entry past the limit"
    );
    // With room it runs.
    let out = c.agora(&["run", "--name", "fits", "--wasm", wat, "--disk", "8MiB", "--dir", &dir_arg]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    c.stop();
}

/// Digests in the agent's artifact cache and compiled-module cache.
fn cached(work: &std::path::Path) -> (Vec<String>, Vec<String>) {
    let names = |d: std::path::PathBuf| -> Vec<String> {
        std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().trim_end_matches(".cwasm").to_string())
            .filter(|n| n.len() == 64)
            .collect()
    };
    let compiled = std::fs::read_dir(work.join("wasm-cache"))
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|e| names(e.path()))
        .collect();
    (names(work.join("artifacts/sha256")), compiled)
}

#[test]
fn the_agent_cache_evicts_unreferenced_artifacts_and_never_a_running_task_s() {
    let mut args = AGENT.to_vec();
    args.extend(["--cache-size", "1B", "--cache-grace", "1ms", "--gc-interval", "200ms"]);
    let c = RealCluster::start(&[], &args);
    let sleep = concat!(env!("CARGO_MANIFEST_DIR"), "/executor-wasm/tests/fixtures/sleep.wat");
    let hello = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/wasm/hello.wat");
    let mut sleeper = common::dev::Proc::spawn(
        "sleeper",
        c.dir.path(),
        std::process::Command::new(common::dev::AGORA)
            .env("AGORA_CONFIG", &c.config)
            .args(["run", "--name", "sleeper", "--wasm", sleep]),
    );
    common::dev::poll("the sleeper to run", 30, || {
        c.tasks_json().iter().any(|t| t["name"] == "sleeper" && t["state"] == "TASK_RUNNING").then_some(())
    });
    let (arts, _) = cached(&c.work);
    assert_eq!(arts.len(), 1, "the sleeper's module: {arts:?}");
    let kept = arts[0].clone();

    // A finished task's module goes at the next tick: the cache is over its (tiny) size.
    let out = c.agora(&["run", "--name", "hello1", "--wasm", hello, "--", "one"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    common::dev::poll("the finished task's module to be evicted", 30, || {
        let (arts, compiled) = cached(&c.work);
        (arts == [kept.as_str()] && compiled.iter().all(|d| d == &kept)).then_some(())
    });
    // The running task's stays, tick after tick.
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(cached(&c.work).0, [kept.as_str()], "a referenced artifact is never evicted");
    // An evicted module is fetched again when a task needs it.
    let out = c.agora(&["run", "--name", "hello2", "--wasm", hello, "--", "two"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from wasm: two\n");

    // Once the sleeper ends, its module is unreferenced and goes too.
    let id = c.tasks_json().iter().find(|t| t["name"] == "sleeper").expect("sleeper")["id"]
        .as_str()
        .expect("id")
        .to_string();
    assert!(c.agora(&["kill", &id]).status.success());
    sleeper.wait(30);
    common::dev::poll("every module to be evicted", 30, || cached(&c.work).0.is_empty().then_some(()));
    c.stop();
}

fn stored(master_work: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(master_work.join("artifacts/sha256"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn the_master_store_evicts_unreferenced_artifacts_and_never_a_live_task_s() {
    let dir = RealCluster::prepare();
    let mwork = dir.path().join("mwork");
    let mwork_arg = mwork.display().to_string();
    let master_args = [
        "--work-dir",
        &mwork_arg,
        "--artifact-store-size",
        "1B",
        // Long enough for an upload to be launched (shorter would race the launch).
        "--artifact-grace",
        "2s",
        "--artifact-evict-interval",
        "200ms",
    ];
    let mut c = RealCluster::master_only(dir, &master_args);
    c.start_agent(AGENT);
    let sleep = concat!(env!("CARGO_MANIFEST_DIR"), "/executor-wasm/tests/fixtures/sleep.wat");
    let hello = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/wasm/hello.wat");
    let mut sleeper = common::dev::Proc::spawn(
        "sleeper",
        c.dir.path(),
        std::process::Command::new(common::dev::AGORA)
            .env("AGORA_CONFIG", &c.config)
            .args(["run", "--name", "sleeper", "--wasm", sleep]),
    );
    common::dev::poll("the sleeper to run", 30, || {
        c.tasks_json().iter().any(|t| t["name"] == "sleeper" && t["state"] == "TASK_RUNNING").then_some(())
    });
    let kept = stored(&mwork);
    assert_eq!(kept.len(), 1, "the sleeper's module: {kept:?}");

    let out = c.agora(&["run", "--name", "hello1", "--wasm", hello, "--", "one"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    common::dev::poll("the finished task's module to be evicted", 30, || {
        (stored(&mwork) == kept).then_some(())
    });
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(stored(&mwork), kept, "a live task's artifact is never evicted");
    // Evicted means forgotten by the master too: the next run uploads it again and runs.
    let out = c.agora(&["run", "--name", "hello2", "--wasm", hello, "--", "two"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from wasm: two\n");

    let id = c.tasks_json().iter().find(|t| t["name"] == "sleeper").expect("sleeper")["id"]
        .as_str()
        .expect("id")
        .to_string();
    assert!(c.agora(&["kill", &id]).status.success());
    sleeper.wait(30);
    common::dev::poll("every artifact to be evicted", 30, || stored(&mwork).is_empty().then_some(()));
    c.stop();
}

/// Writes 200 MiB into `fill.bin` in its first preopen, then sleeps.
const FILLER_WAT: &str = r#"(module
  (import "wasi_snapshot_preview1" "path_open" (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 2)
  (data (i32.const 100) "fill.bin")
  (func (export "_start")
    (local $fd i32)
    (local $e i32)
    (local $i i32)
    (local.set $e (call $path_open (i32.const 3) (i32.const 0) (i32.const 100) (i32.const 8)
      (i32.const 9) (i64.const 64) (i64.const 0) (i32.const 0) (i32.const 0)))
    (if (local.get $e) (then (call $proc_exit (local.get $e))))
    (local.set $fd (i32.load (i32.const 0)))
    (i32.store (i32.const 16) (i32.const 65536))
    (i32.store (i32.const 20) (i32.const 65536))
    (block $done
      (loop $more
        (br_if $done (i32.ge_u (local.get $i) (i32.const 3200)))
        (drop (call $fd_write (local.get $fd) (i32.const 16) (i32.const 1) (i32.const 28)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $more)))
    (i32.store (i32.const 48) (i32.const 1))
    (i64.store (i32.const 56) (i64.const 1000000000))
    (loop $forever
      (drop (call $poll (i32.const 32) (i32.const 128) (i32.const 1) (i32.const 256)))
      (br $forever))))
"#;

/// A Wasm task's preopens are in its sandbox: writing past its disk there gets it killed.
#[test]
fn a_wasm_task_filling_its_preopen_is_killed() {
    let c = RealCluster::start(&[], AGENT);
    let wat = c.dir.path().join("filler.wat");
    std::fs::write(&wat, FILLER_WAT).expect("write the module");
    let local = c.dir.path().join("data");
    std::fs::create_dir(&local).expect("mkdir");
    let dir_arg = format!("{}::/data", local.display());
    let wat = wat.display().to_string();
    let out = c.agora(&["run", "--name", "wfill", "--wasm", &wat, "--disk", "1MiB", "--dir", &dir_arg]);
    let err = stderr(&out);
    assert_ne!(out.status.code(), Some(0), "{err}");
    let tasks = c.tasks_json();
    let t = task(&tasks, "wfill");
    assert_eq!(
        (t["state"].as_str(), t["reason"].as_str()),
        (Some("TASK_FAILED"), Some("disk limit exceeded")),
        "{t}"
    );
    c.stop();
}
