use std::path::PathBuf;

use agora_executor_wasm::{FailureReason, Preopen, TaskEnd, WasmError};

use crate::Harness;

fn data_preopen(read_only: bool) -> Preopen {
    Preopen { host: PathBuf::from("data"), guest: "/data".into(), read_only }
}

#[tokio::test]
async fn reads_and_writes_a_preopened_directory() {
    let h = Harness::new();
    let data = h.sandbox.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("in.txt"), "input from the host\n").unwrap();
    let mut spec = h.spec("files");
    spec.preopens = vec![data_preopen(false)];
    let outcome = h.run(spec).await;
    assert_eq!(outcome.exit_code(), Some(0), "{outcome:?}");
    assert_eq!(h.output("stdout"), "input from the host\n");
    assert_eq!(std::fs::read_to_string(data.join("out.txt")).unwrap(), "written by wasm\n");
}

#[tokio::test]
async fn a_read_only_preopen_refuses_writes() {
    let h = Harness::new();
    let data = h.sandbox.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("in.txt"), "x\n").unwrap();
    let mut spec = h.spec("files");
    spec.preopens = vec![data_preopen(true)];
    let outcome = h.run(spec).await;
    // Reading worked, creating out.txt did not (a WASI errno, not 0).
    assert_eq!(h.output("stdout"), "x\n");
    assert!(matches!(outcome.exit_code(), Some(code) if code != 0), "{outcome:?}");
    assert!(!data.join("out.txt").exists());
}

/// Runs `escape` (opens argv[1] relative to the first preopen) and returns its exit code:
/// 100 if the open succeeded, else the WASI errno.
async fn try_open(h: &Harness, preopens: Vec<Preopen>, path: &str) -> i32 {
    let mut spec = h.spec("escape");
    spec.args = vec!["escape".into(), path.into()];
    spec.preopens = preopens;
    let outcome = h.run(spec).await;
    outcome.exit_code().unwrap_or_else(|| panic!("{outcome:?}"))
}

#[tokio::test]
async fn paths_outside_the_preopens_cannot_be_opened() {
    let h = Harness::new();
    let data = h.sandbox.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("inside.txt"), "ok").unwrap();
    std::fs::write(h.sandbox.path().join("outside.txt"), "secret").unwrap();
    std::os::unix::fs::symlink("/etc", data.join("etc-link")).unwrap();
    std::os::unix::fs::symlink("../outside.txt", data.join("up-link")).unwrap();

    assert_eq!(try_open(&h, vec![data_preopen(false)], "inside.txt").await, 100, "control");
    for path in ["../outside.txt", "/etc/passwd", "etc-link/passwd", "up-link", "data/../../outside.txt"] {
        let code = try_open(&h, vec![data_preopen(false)], path).await;
        assert_ne!(code, 100, "{path} was opened");
        assert_ne!(code, 0, "{path}");
    }
}

#[tokio::test]
async fn without_preopens_no_file_is_reachable() {
    let h = Harness::new();
    std::fs::write(h.sandbox.path().join("agent-state.json"), "{}").unwrap();
    for path in ["agent-state.json", "/etc/passwd", "."] {
        let code = try_open(&h, Vec::new(), path).await;
        assert_eq!(code, 8, "{path}: expected EBADF (fd 3 is not open)");
    }
}

#[tokio::test]
async fn a_preopen_outside_the_sandbox_is_refused() {
    let h = Harness::new();
    let mut spec = h.spec("hello");
    spec.preopens = vec![Preopen { host: PathBuf::from("/etc"), guest: "/etc".into(), read_only: true }];
    let err = h.rt.prepare_task(spec.clone()).await.unwrap_err();
    assert!(
        matches!(&err, WasmError::PreopenOutsideSandbox { path, .. } if path == &PathBuf::from("/etc")),
        "{err:?}"
    );

    spec.preopens = vec![Preopen { host: PathBuf::from(".."), guest: "/up".into(), read_only: true }];
    let outcome = h.run(spec).await;
    let TaskEnd::Failed { reason, message } = &outcome.status else { panic!("{outcome:?}") };
    assert_eq!(*reason, FailureReason::LaunchFailed);
    assert!(message.contains("is outside the task sandbox"), "{message}");
}
