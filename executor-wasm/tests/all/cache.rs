use std::sync::Arc;

use agora_executor_wasm::{CacheStats, Digest, FailureReason, ModuleSource, WasmRuntime, WasmTaskSpec};

use crate::{fixture, test_config, Harness};

#[tokio::test]
async fn a_module_is_compiled_once_then_served_from_memory() {
    let h = Harness::new();
    for _ in 0..3 {
        assert!(h.run(h.spec("hello")).await.success());
    }
    assert_eq!(h.rt.cache_stats(), CacheStats { memory_hits: 2, disk_hits: 0, compiles: 1 });
    let digest = Digest::of(&fixture("hello"));
    let path = h.rt.cache_path(&digest);
    assert_eq!(path, h.cache.path().join(h.rt.engine_hash()).join(format!("{digest}.cwasm")));
    assert!(path.is_file());
    assert_eq!(h.rt.engine_hash().len(), 16);
}

#[tokio::test]
async fn a_new_runtime_deserializes_instead_of_compiling() {
    let cache = tempfile::tempdir().unwrap();
    let sandbox = tempfile::tempdir().unwrap();
    let bytes: Arc<[u8]> = Arc::from(fixture("hello"));
    let digest = Digest::of(&bytes);
    {
        let rt = WasmRuntime::new(test_config(cache.path())).unwrap();
        let info = rt.load(&bytes).unwrap();
        assert_eq!(info.digest, digest);
        assert_eq!(rt.cache_stats().compiles, 1);
    }
    let rt = WasmRuntime::new(test_config(cache.path())).unwrap();
    // By digest alone: the bytes are not needed once compiled.
    let mut spec = WasmTaskSpec::new(ModuleSource::Digest(digest), sandbox.path());
    spec.stdout = Some("out".into());
    let outcome = rt.run_task(spec).await;
    assert!(outcome.success(), "{outcome:?}");
    assert_eq!(std::fs::read_to_string(sandbox.path().join("out")).unwrap(), "hello from wasm\n");
    assert_eq!(rt.cache_stats(), CacheStats { memory_hits: 0, disk_hits: 1, compiles: 0 });
    // By bytes, now from memory.
    let outcome = rt.run_task(WasmTaskSpec::new(ModuleSource::Bytes(bytes), sandbox.path())).await;
    assert!(outcome.success(), "{outcome:?}");
    assert_eq!(rt.cache_stats(), CacheStats { memory_hits: 1, disk_hits: 1, compiles: 0 });
    // Same engine configuration, same directory.
    assert_eq!(rt.engine_hash(), WasmRuntime::new(test_config(cache.path())).unwrap().engine_hash());
}

#[tokio::test]
async fn an_unknown_digest_fails_at_launch() {
    let h = Harness::new();
    let digest = Digest::of(b"never loaded");
    let outcome =
        h.rt.run_task(WasmTaskSpec::new(ModuleSource::Digest(digest.clone()), h.sandbox.path())).await;
    assert_eq!(outcome.failure_reason(), Some(FailureReason::LaunchFailed));
    let agora_executor_wasm::TaskEnd::Failed { message, .. } = outcome.status else { unreachable!() };
    assert_eq!(message, format!("module {digest} is not loaded and not in the compiled-module cache"));
}

#[tokio::test]
async fn a_corrupt_cache_file_is_replaced() {
    let cache = tempfile::tempdir().unwrap();
    let bytes = fixture("hello");
    let digest = Digest::of(&bytes);
    let path = {
        let rt = WasmRuntime::new(test_config(cache.path())).unwrap();
        rt.load(&bytes).unwrap();
        rt.cache_path(&digest)
    };
    std::fs::write(&path, b"garbage").unwrap();
    let rt = WasmRuntime::new(test_config(cache.path())).unwrap();
    rt.load(&bytes).unwrap();
    assert_eq!(rt.cache_stats(), CacheStats { memory_hits: 0, disk_hits: 0, compiles: 1 });
    assert!(std::fs::metadata(&path).unwrap().len() > 1000);
    rt.forget(&digest);
    assert!(!rt.is_loaded(&digest));
    rt.load_cached(&digest).unwrap();
    assert_eq!(rt.cache_stats().disk_hits, 1);
}
