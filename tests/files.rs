//! `agora files` and `agora cp` against `agora dev` (real processes): a task's sandbox listed,
//! a file printed and copied, a Wasm task's preopen browsable; paths and links that lead out of
//! the sandbox refused.

mod common;

use common::dev::Dev;

fn task_id(dev: &Dev, name: &str) -> String {
    let tasks = dev.tasks_json();
    let t = tasks.iter().find(|t| t["name"] == name).unwrap_or_else(|| panic!("no task {name}: {tasks:?}"));
    t["id"].as_str().expect("id").to_string()
}

#[test]
fn a_tasks_sandbox_is_listed_read_and_copied_and_nothing_outside_it() {
    let dev = Dev::start("cpus:2;mem:1GiB");
    let script = "mkdir -p out && echo result-bytes > out/result.txt && ln -s /etc/shadow out/escape \
                  && ln -s ../../../../../../../../../etc/passwd out/up && ln -s result.txt out/alias";
    let out = dev.agora(&["run", "--name", "writer", "--shell", "--", script]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let id = task_id(&dev, "writer");

    let out = dev.agora(&["files", &id, "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let root: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json");
    let names: Vec<&str> = root.iter().filter_map(|e| e["name"].as_str()).collect();
    assert!(names.contains(&"stdout") && names.contains(&"out"), "{names:?}");
    assert!(root.iter().any(|e| e["name"] == "out" && e["kind"] == "dir"), "{root:?}");

    let out = dev.agora(&["files", &id, "out"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("result.txt") && table.contains("escape") && table.contains("link"), "{table}");

    let out = dev.agora(&["files", &id, "out/result.txt", "--cat"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "result-bytes\n");
    let out = dev.agora(&["files", &id, "out/alias", "--cat"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "result-bytes\n",
        "a link inside the sandbox is followed"
    );

    let dest = dev.dir.path().join("copies");
    std::fs::create_dir(&dest).expect("mkdir");
    let out = dev.agora(&["cp", &format!("{id}:out/result.txt"), &dest.to_string_lossy()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(dest.join("result.txt")).expect("copied"), "result-bytes\n");

    // Out of the sandbox: by link (absolute or climbing), by `..`, by an absolute path.
    for (path, expect) in [
        ("out/escape", "outside the sandbox"),
        ("out/up", "outside the sandbox"),
        ("../../x", "`..` is not allowed"),
        ("/etc/passwd", "relative to the sandbox"),
    ] {
        let out = dev.agora(&["files", &id, path, "--cat"]);
        assert!(!out.status.success(), "{path} was served: {}", String::from_utf8_lossy(&out.stdout));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{path}: {err}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("root:"), "{path} leaked");
    }
    let out = dev.agora(&["cp", &format!("{id}:out/escape"), &dest.to_string_lossy()]);
    assert!(!out.status.success());
    assert!(!dest.join("escape").exists(), "a refused copy left a file");
    let out = dev.agora(&["files", "no-such-task"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no-such-task"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = dev.agora(&["cp", "justapath", "x"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected TASK:PATH"));

    // A Wasm task's preopen (`--dir LOCAL::/data`) is in its sandbox under mnt/data.
    let local = dev.dir.path().join("shipped");
    std::fs::create_dir(&local).expect("mkdir");
    std::fs::write(local.join("input.txt"), "shipped").expect("write");
    let wat = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/wasm/hello.wat");
    let dir_arg = format!("{}::/data", local.display());
    let out = dev.agora(&["run", "--name", "wasmy", "--wasm", wat, "--dir", &dir_arg, "--", "x"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let id = task_id(&dev, "wasmy");
    let out = dev.agora(&["files", &id, "mnt/data/input.txt", "--cat"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "shipped", "{}", String::from_utf8_lossy(&out.stderr));
}

/// `agora run --wasm … --dir LOCAL::GUEST --sync-back`: what the module wrote in its preopen
/// comes back into LOCAL when it ends.
#[test]
fn sync_back_copies_what_a_wasm_task_wrote_into_its_dir() {
    let dev = Dev::start("cpus:2;mem:1GiB");
    let local = dev.dir.path().join("data");
    std::fs::create_dir(&local).expect("mkdir");
    std::fs::write(local.join("in.txt"), "input from the host\n").expect("write");
    let wat = concat!(env!("CARGO_MANIFEST_DIR"), "/executor-wasm/tests/fixtures/files.wat");
    let dir_arg = format!("{}::/data", local.display());
    let out = dev.agora(&["run", "--wasm", wat, "--dir", &dir_arg, "--sync-back"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "input from the host\n");
    assert_eq!(std::fs::read_to_string(local.join("out.txt")).expect("synced back"), "written by wasm\n");
    assert!(err.contains("--sync-back /data: 2 file(s)"), "{err}");
    // Without a --dir there is nothing to sync: refused as usage.
    let out = dev.agora(&["run", "--wasm", wat, "--sync-back"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}
