//! Integration tests of the Wasm executor library, one binary (`cargo test -p agora-executor-wasm`).
//! Fixtures are WAT files in `tests/fixtures`, compiled with the `wat` crate.

// A test binary: helpers panic on setup failures like the tests do.
#![allow(clippy::unwrap_used)]

mod cache;
mod concurrency;
mod limits;
mod run;
mod sandbox;
mod validate;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agora_executor_wasm::{ModuleSource, RuntimeConfig, TaskOutcome, WasmRuntime, WasmTaskSpec};
use tempfile::TempDir;

/// The bytes of `tests/fixtures/<name>.wat`.
pub fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(format!("{name}.wat"));
    wat::parse_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A runtime sized for tests, with its own cache directory.
pub struct Harness {
    pub cache: TempDir,
    pub sandbox: TempDir,
    pub rt: WasmRuntime,
}

pub fn test_config(cache: &Path) -> RuntimeConfig {
    let mut config = RuntimeConfig::new(cache);
    config.max_concurrent_tasks = 16;
    config.max_task_memory_bytes = 256 << 20;
    config
}

impl Default for Harness {
    fn default() -> Self {
        Self::with_config(|_| {})
    }
}

impl Harness {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_config(tweak: impl FnOnce(&mut RuntimeConfig)) -> Self {
        let cache = tempfile::tempdir().unwrap();
        let sandbox = tempfile::tempdir().unwrap();
        let mut config = test_config(cache.path());
        tweak(&mut config);
        let rt = WasmRuntime::new(config).unwrap();
        Self { cache, sandbox, rt }
    }

    /// A spec running fixture `name` in the sandbox with stdout/stderr to files there.
    pub fn spec(&self, name: &str) -> WasmTaskSpec {
        self.spec_in(name, self.sandbox.path())
    }

    pub fn spec_in(&self, name: &str, sandbox: &Path) -> WasmTaskSpec {
        let mut spec = WasmTaskSpec::new(ModuleSource::Bytes(Arc::from(fixture(name))), sandbox);
        spec.args = vec![format!("{name}.wasm")];
        spec.stdout = Some(PathBuf::from("stdout"));
        spec.stderr = Some(PathBuf::from("stderr"));
        spec.timeout = Some(Duration::from_secs(20));
        spec
    }

    pub fn output(&self, file: &str) -> String {
        std::fs::read_to_string(self.sandbox.path().join(file)).unwrap_or_default()
    }

    pub async fn run(&self, spec: WasmTaskSpec) -> TaskOutcome {
        self.rt.run_task(spec).await
    }
}
