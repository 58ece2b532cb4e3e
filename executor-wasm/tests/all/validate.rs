use agora_executor_wasm::{validate, ModuleError, ModuleKind, WasmError};

use crate::fixture;

#[test]
fn accepts_a_wasip1_command() {
    let bytes = fixture("hello");
    let info = validate(&bytes).unwrap();
    assert_eq!(info.kind, ModuleKind::CoreModule);
    assert_eq!(info.size_bytes, bytes.len());
    assert_eq!(info.imports, vec!["wasi_snapshot_preview1::fd_write".to_owned()]);
    assert_eq!(info.digest, agora_executor_wasm::Digest::of(&bytes));
}

#[test]
fn accepts_a_wasi_p2_command_component() {
    let info = validate(&fixture("component_ok")).unwrap();
    assert_eq!(info.kind, ModuleKind::Component);
}

#[test]
fn rejects_bytes_that_are_not_wasm() {
    let err = validate(b"#!/bin/sh\necho hello\n").unwrap_err();
    assert!(matches!(err, WasmError::Module(ModuleError::NotWasm { .. })), "{err:?}");
    assert_eq!(err.to_string(), "not a WebAssembly module or component: missing the `\\0asm` magic number");
    let err = validate(b"").unwrap_err();
    assert!(matches!(err, WasmError::Module(ModuleError::NotWasm { .. })), "{err:?}");
}

#[test]
fn rejects_a_truncated_module() {
    let bytes = fixture("hello");
    for len in [8, bytes.len() / 2, bytes.len() - 1] {
        let err = validate(&bytes[..len]).unwrap_err();
        assert!(
            matches!(
                err,
                WasmError::Module(ModuleError::Invalid { .. }) | WasmError::Module(ModuleError::NoStart)
            ),
            "{len}: {err:?}"
        );
    }
    let err = validate(&bytes[..bytes.len() / 2]).unwrap_err();
    assert!(err.to_string().starts_with("invalid WebAssembly: "), "{err}");
    assert!(err.to_string().contains("offset"), "{err}");
}

#[test]
fn rejects_a_module_without_start() {
    let err = validate(&fixture("no_start")).unwrap_err();
    assert!(matches!(err, WasmError::Module(ModuleError::NoStart)), "{err:?}");
    assert!(err.to_string().contains("no `_start`"), "{err}");
}

#[test]
fn rejects_an_unknown_import_naming_it() {
    let err = validate(&fixture("unknown_import")).unwrap_err();
    assert_eq!(err.to_string(), "import `env::foo` is not provided: Agora offers WASI preview 1 only");
}

#[test]
fn rejects_a_component_importing_beyond_wasi_p2() {
    let err = validate(&fixture("component_http")).unwrap_err();
    assert!(
        matches!(&err, WasmError::Module(ModuleError::UnsupportedComponentImport { name }) if name == "wasi:http/types@0.2.0")
    );
    assert!(err.to_string().starts_with("import `wasi:http/types@0.2.0` is not provided"), "{err}");
}

#[test]
fn every_fixture_that_should_validate_does() {
    for name in [
        "hello",
        "echo",
        "exit",
        "files",
        "escape",
        "loop",
        "membomb",
        "recursion",
        "unreachable",
        "spin",
        "fib",
        "compute",
        "noop",
    ] {
        validate(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}
