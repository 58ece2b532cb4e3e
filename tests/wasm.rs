//! Wasm tasks end to end: `agora dev` as a process, `agora run --wasm` as a user types
//! it, the master's artifact store, the agent fetching modules and starting `agora
//! executor-wasm`, and the guest's output and exit code coming back through the CLI.

mod common;

use std::path::{Path, PathBuf};

use common::dev::Dev;

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("executor-wasm/tests/fixtures")
        .join(format!("{name}.wat"))
        .display()
        .to_string()
}

fn example(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/wasm")
        .join(format!("{name}.wat"))
        .display()
        .to_string()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p: PathBuf = dir.join(name);
    std::fs::write(&p, bytes).expect("write");
    p.display().to_string()
}

#[test]
fn wasm_output_exit_codes_args_env_and_dirs() {
    let dev = Dev::start("cpus:4;mem:4GiB");

    // Byte for byte stdout, exit 0.
    let out = dev.agora(&["run", "--wasm", &example("hello"), "--", "big", "world"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from wasm: big world\n", "{}", stderr(&out));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // Both streams, byte for byte.
    let out = dev.agora(&["run", "--quiet", "--wasm", &fixture("hello")]);
    assert_eq!(out.stdout, b"hello from wasm\n");
    assert_eq!(out.stderr, b"a warning\n");
    assert_eq!(out.status.code(), Some(0));

    // proc_exit's code is the CLI's.
    let out = dev.agora(&["run", "--wasm", &fixture("exit")]);
    assert_eq!(out.status.code(), Some(42), "{}", stderr(&out));

    // Explicit args and env only: nothing of the host's environment.
    let out = dev.agora(&[
        "run",
        "--wasm",
        &fixture("echo"),
        "--env",
        "COLOR=blue",
        "--env",
        "N=1",
        "--",
        "x",
        "y z",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "echo.wat\nx\ny z\nCOLOR=blue\nN=1\n",
        "{}",
        stderr(&out)
    );
    assert_eq!(out.status.code(), Some(0));

    // A shipped directory: read in.txt, write out.txt inside the task's own copy.
    let data = tempfile::tempdir().expect("tempdir");
    std::fs::write(data.path().join("in.txt"), "shipped input\n").expect("write");
    let dir_arg = format!("{}::/data", data.path().display());
    let out = dev.agora(&["run", "--wasm", &fixture("files"), "--dir", &dir_arg]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "shipped input\n", "{}", stderr(&out));
    assert_eq!(out.status.code(), Some(0));
    assert!(!data.path().join("out.txt").exists(), "the task wrote into the user's directory");
    let written: Vec<PathBuf> =
        walk(dev.dir.path()).into_iter().filter(|p| p.ends_with("data/out.txt")).collect();
    assert_eq!(written.len(), 1, "out.txt in the sandbox: {written:?}");
    assert_eq!(std::fs::read_to_string(&written[0]).expect("read"), "written by wasm\n");

    // Sandbox: a path outside the preopen, or the agent's own files, cannot be opened: WASI's
    // EPERM (63, what wasmtime answers for a path leaving the preopen), exactly (a crash, a
    // refused launch or another errno is not this refusal). Beside them the positive
    // controls: a file inside the preopen opens (the fixture exits 100), a missing one is
    // ENOENT (44).
    let wasi_errno = [
        ("in.txt", 100),
        ("no-such-file", 44),
        ("../../../../../../etc/passwd", 63),
        ("/etc/passwd", 63),
        ("../agent_id", 63),
    ];
    for (path, want) in wasi_errno {
        // argv[0] is the module's name: the path is argv[1], the one the fixture opens (an
        // extra word here made every case open that word instead, and pass on ENOENT).
        let out = dev.agora(&["run", "--wasm", &fixture("escape"), "--dir", &dir_arg, "--", path]);
        assert_eq!(out.status.code(), Some(want), "opening {path}: {}", stderr(&out));
    }

    // WASI 0.2 command components, detected from the bytes: exit codes through `wasi:cli/run`.
    let out = dev.agora(&["run", "--wasm", &fixture("component_ok")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = dev.agora(&["run", "--wasm", &fixture("component_err")]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));

    // --count works as for native tasks.
    let out =
        dev.agora(&["run", "--wasm", &example("noop"), "--count", "20", "--cpus", "0.05", "--mem", "8MiB"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("20 TASK_FINISHED"), "{}", stderr(&out));

    // Fuel is reported in the task listing.
    let tasks = dev.tasks_json();
    let hello = tasks.iter().find(|t| t["name"] == "hello.wat").expect("hello task");
    assert_eq!(hello["state"], "TASK_FINISHED");
    assert!(hello["usage"]["fuel"].as_u64().is_some_and(|f| f > 0), "{hello}");
    dev.stop();
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return out };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() && !p.is_symlink() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn bad_modules_are_refused_at_upload_and_misbehaving_tasks_fail_with_a_reason() {
    let dev = Dev::start("cpus:4;mem:4GiB");
    let tmp = tempfile::tempdir().expect("tempdir");

    // Refused at upload, nothing launched, a message naming the problem.
    let hello = wat::parse_file(fixture("hello")).expect("wat");
    let cases = [
        (write(tmp.path(), "notwasm.wasm", b"#!/bin/sh\necho hi\n"), "not"),
        (
            write(tmp.path(), "truncated.wasm", &hello[..hello.len() / 2]),
            "invalid WebAssembly: unexpected end-of-file",
        ),
        (fixture("no_start"), "_start"),
        (fixture("unknown_import"), "env"),
    ];
    for (file, needle) in &cases {
        let out = dev.agora(&["run", "--wasm", file]);
        assert_eq!(out.status.code(), Some(125), "{file}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.starts_with("agora: "), "{err}");
        assert!(err.contains(needle), "{file}: {err}");
    }
    assert!(dev.tasks_json().is_empty(), "a refused module launched a task");

    // Misbehaving tasks end with their reason; exit 134 as `wasmtime run` on a trap.
    let limits: [(&[&str], &str); 5] = [
        (&["--timeout", "300ms"], "timeout"),
        (&["--fuel", "5000000"], "fuel exhausted"),
        (&["--mem", "16MiB"], "memory limit exceeded"),
        (&[], "trap"),
        (&[], "trap"),
    ];
    let modules =
        [example("spin"), example("spin"), fixture("membomb"), fixture("recursion"), fixture("unreachable")];
    for ((flags, reason), module) in limits.iter().zip(&modules) {
        let mut args = vec!["run", "--wasm", module.as_str()];
        args.extend_from_slice(flags);
        let out = dev.agora(&args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(134), "{module} {flags:?}: {err}");
        assert!(err.contains(reason), "{module}: {err}");
    }

    // The agent and its executor still serve.
    let out = dev.agora(&["run", "--wasm", &example("hello"), "--", "still", "here"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from wasm: still here\n", "{}", stderr(&out));
    assert_eq!(out.status.code(), Some(0));
    dev.stop();
}

#[test]
fn a_thousand_wasm_tasks_through_a_dev_cluster() {
    let dev = Dev::start_with(&["--agents", "2", "--resources", "cpus:8;mem:16GiB"]);
    let out =
        dev.agora(&["run", "--wasm", &example("noop"), "--count", "1000", "--cpus", "0.01", "--mem", "4MiB"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("1000 tasks in"), "{err}");
    assert!(err.contains("1000 TASK_FINISHED"), "{err}");
    let tasks = dev.tasks_json();
    assert_eq!(tasks.iter().filter(|t| t["state"] == "TASK_FINISHED").count(), 1000);
    dev.stop();
}
