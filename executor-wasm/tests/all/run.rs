use std::sync::Arc;

use agora_executor_wasm::{FailureReason, ModuleSource, TaskEnd, WasmTaskSpec};

use crate::{fixture, Harness};

#[tokio::test]
async fn hello_writes_stdout_and_stderr_to_files() {
    let h = Harness::new();
    let outcome = h.run(h.spec("hello")).await;
    assert_eq!(outcome.status, TaskEnd::Exited { code: 0 });
    assert!(outcome.success());
    assert_eq!(h.output("stdout"), "hello from wasm\n");
    assert_eq!(h.output("stderr"), "a warning\n");
    assert!(outcome.fuel_consumed > 0, "{outcome:?}");
    assert_eq!(outcome.peak_memory_bytes, 64 << 10);
}

#[tokio::test]
async fn args_and_only_the_declared_env_reach_the_guest() {
    let h = Harness::new();
    let mut spec = h.spec("echo");
    spec.args = vec!["echo".into(), "hello".into(), "world wide".into()];
    spec.env = vec![("GREETING".into(), "hi".into()), ("EMPTY".into(), String::new())];
    let outcome = h.run(spec).await;
    assert_eq!(outcome.exit_code(), Some(0), "{outcome:?}");
    assert_eq!(h.output("stdout"), "echo\nhello\nworld wide\nGREETING=hi\nEMPTY=\n");
}

#[tokio::test]
async fn no_host_environment_is_inherited() {
    let h = Harness::new();
    let mut spec = h.spec("echo");
    spec.args = vec!["echo".into()];
    let outcome = h.run(spec).await;
    assert_eq!(outcome.exit_code(), Some(0), "{outcome:?}");
    // PATH, HOME, CARGO_* are all set in this process; none reaches the guest.
    assert_eq!(h.output("stdout"), "echo\n");
}

#[tokio::test]
async fn proc_exit_sets_the_exit_code() {
    let h = Harness::new();
    let outcome = h.run(h.spec("exit")).await;
    assert_eq!(outcome.status, TaskEnd::Exited { code: 42 });
    assert!(!outcome.success());
}

#[tokio::test]
async fn unreachable_fails_with_the_trap_message() {
    let h = Harness::new();
    let outcome = h.run(h.spec("unreachable")).await;
    assert_eq!(outcome.failure_reason(), Some(FailureReason::Trap), "{outcome:?}");
    let TaskEnd::Failed { message, .. } = &outcome.status else { unreachable!() };
    assert!(message.contains("wasm `unreachable` instruction executed"), "{message}");
}

#[tokio::test]
async fn unbounded_recursion_fails_with_stack_exhausted() {
    let h = Harness::new();
    let outcome = h.run(h.spec("recursion")).await;
    assert_eq!(outcome.failure_reason(), Some(FailureReason::Trap), "{outcome:?}");
    let TaskEnd::Failed { message, .. } = &outcome.status else { unreachable!() };
    assert!(message.contains("call stack exhausted"), "{message}");
}

#[tokio::test]
async fn bad_modules_fail_at_launch_with_the_validation_message() {
    let h = Harness::new();
    let hello = fixture("hello");
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"MZ\x90\x00not wasm".to_vec(), "not a WebAssembly module or component"),
        (hello[..hello.len() / 2].to_vec(), "invalid WebAssembly"),
        (fixture("no_start"), "no `_start`"),
        (fixture("unknown_import"), "import `env::foo` is not provided"),
    ];
    for (bytes, expected) in cases {
        let spec = WasmTaskSpec::new(ModuleSource::Bytes(Arc::from(bytes)), h.sandbox.path());
        let outcome = h.run(spec).await;
        let TaskEnd::Failed { reason, message } = &outcome.status else { panic!("{outcome:?}") };
        assert_eq!(*reason, FailureReason::LaunchFailed);
        assert!(message.contains(expected), "{message} should contain {expected}");
    }
    // ... and the runtime still serves.
    let outcome = h.run(h.spec("hello")).await;
    assert!(outcome.success(), "{outcome:?}");
}

#[tokio::test]
async fn components_run_and_map_run_result_to_exit_code() {
    let h = Harness::new();
    let ok = h.run(h.spec("component_ok")).await;
    assert_eq!(ok.status, TaskEnd::Exited { code: 0 });
    let err = h.run(h.spec("component_err")).await;
    assert_eq!(err.status, TaskEnd::Exited { code: 1 });
}

#[tokio::test]
async fn components_reach_wasi_p2_imports() {
    let h = Harness::new();
    let info = agora_executor_wasm::validate(&fixture("component_exit")).unwrap();
    assert_eq!(info.imports, vec!["wasi:cli/exit@0.2.0".to_owned()]);
    let outcome = h.run(h.spec("component_exit")).await;
    assert_eq!(outcome.status, TaskEnd::Exited { code: 1 }, "{outcome:?}");
}

#[tokio::test]
async fn a_task_can_be_prepared_then_run() {
    let h = Harness::new();
    let prepared = h.rt.prepare_task(h.spec("hello")).await.unwrap();
    assert_eq!(prepared.module_info().imports.len(), 1);
    let outcome = prepared.run().await;
    assert!(outcome.success());
    assert_eq!(h.output("stdout"), "hello from wasm\n");
}
