//! The per-process runtime: one engine, the epoch ticker, the module caches.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tokio::sync::Semaphore;
use wasmtime::component::{Component, Linker as ComponentLinker};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, Linker, Module, PoolingAllocationConfig, Precompiled,
};
use wasmtime_wasi::p2::bindings::CommandPre;

use crate::digest::Digest;
use crate::error::WasmError;
use crate::task::{P1Host, P2Host};
use crate::validate::{validate, ModuleInfo, ModuleKind};

/// Core instances a component task may use (a WASI 0.2 command built by `wasm-tools component
/// new` holds the program, the preview 1 adapter and a few shims).
const CORE_INSTANCES_PER_TASK: u32 = 16;
/// Linear memories per task (a component has its program's and the adapter's).
const MEMORIES_PER_TASK: u32 = 4;
/// Tables per task.
const TABLES_PER_TASK: u32 = 8;
/// The largest table any task may have (elements); also the per-task table limit.
pub(crate) const MAX_TABLE_ELEMENTS: usize = 100_000;
/// The fuel slice of a task stops growing with its `cpus` at this many CPUs.
pub const MAX_SLICE_CPUS: u64 = 16;
/// WebAssembly 32-bit memories cannot exceed 4 GiB.
const WASM32_MAX_MEMORY: u64 = 4 << 30;

/// How the process-wide [`WasmRuntime`] is built.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Directory of the compiled-module cache (created if missing). Compiled modules live in
    /// `<cache_dir>/<engine hash>/<sha256>.cwasm`.
    pub cache_dir: PathBuf,
    /// Tasks that may run at once. Sizes the pooling allocator: `max_concurrent_tasks` ×
    /// (16 core instances, 4 memories, 8 tables, 1 async stack). Tasks beyond this wait for a
    /// slot. Default 128.
    pub max_concurrent_tasks: u32,
    /// The largest memory limit a task may ask for, in bytes; the pooling allocator's
    /// `max_memory_size`. At most 4 GiB (wasm32). Default 4 GiB.
    pub max_task_memory_bytes: u64,
    /// Use the pooling allocator (default). Each memory slot reserves 4 GiB + 32 MiB guard of
    /// *virtual* address space up front (128 tasks × 4 memories ≈ 2 TiB of the 128 TiB a
    /// process has); physical memory is only what the guests touch. Turn off where virtual
    /// address space is limited (e.g. `ulimit -v`).
    pub pooling: bool,
    /// Period of the epoch ticker (which runs only with [`Self::fuel_per_cpu_second`]): the
    /// granularity of the fuel-rate check. Default 10 ms.
    pub epoch_tick: Duration,
    /// Fuel a task with 1 CPU (1000 millicores) runs between two yields to the executor; a task
    /// with `m` millicores runs `fuel_slice_per_cpu × m / 1000`, at least 10,000 and at most
    /// [`MAX_SLICE_CPUS`] × `fuel_slice_per_cpu` (tasks above 16 CPUs share as if they had 16).
    /// Under contention tasks take turns, so CPU is shared in proportion to `cpus`. Default
    /// 2,000,000: 0.2–0.7 ms on this machine (optimized wasm burns 3–12 × 10^9 fuel/s). Keep it
    /// small: while a task runs its slice the tokio worker serves nothing else, and a current-
    /// thread runtime looks at timers, I/O and wakes from other threads only every 31–61 turns.
    pub fuel_slice_per_cpu: u64,
    /// Optional hard CPU cap: a task with `m` millicores may consume at most
    /// `fuel_per_cpu_second × m / 1000` fuel per second of wall time. It is checked every epoch
    /// tick (setting it turns the engine's epoch interruption and ticker on, which costs
    /// compute-bound code time), so a task may run up to one tick ahead; a task running ahead of its allowance
    /// sleeps on tokio's timer until it is back on it. `None` (default) is work-conserving:
    /// idle CPU is used by whoever runs.
    pub fuel_per_cpu_second: Option<u64>,
    /// Maximum WebAssembly stack in bytes; deeper recursion traps with "call stack exhausted".
    /// Default 512 KiB.
    pub max_wasm_stack_bytes: usize,
}

impl RuntimeConfig {
    /// Defaults with the compiled-module cache in `cache_dir`.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            max_concurrent_tasks: 128,
            max_task_memory_bytes: WASM32_MAX_MEMORY,
            pooling: true,
            epoch_tick: Duration::from_millis(10),
            fuel_slice_per_cpu: 2_000_000,
            fuel_per_cpu_second: None,
            max_wasm_stack_bytes: 512 << 10,
        }
    }

    /// Whether the engine counts epochs: only to hold tasks to [`Self::fuel_per_cpu_second`].
    pub fn uses_epochs(&self) -> bool {
        self.fuel_per_cpu_second.is_some()
    }

    /// The fuel a task with `cpu_millis` millicores runs between two yields.
    pub fn fuel_slice(&self, cpu_millis: u32) -> u64 {
        let base = self.fuel_slice_per_cpu.max(1);
        (base.saturating_mul(u64::from(cpu_millis)) / 1000).clamp(10_000, base.saturating_mul(MAX_SLICE_CPUS))
    }

    /// The wasmtime configuration this runtime uses (exposed so benchmarks can build a
    /// comparable engine, e.g. without fuel).
    pub fn engine_config(&self) -> Result<Config, WasmError> {
        if self.max_task_memory_bytes > WASM32_MAX_MEMORY {
            return Err(WasmError::Engine {
                message: format!(
                    "max_task_memory_bytes {} exceeds the 4 GiB a wasm32 memory can hold",
                    self.max_task_memory_bytes
                ),
            });
        }
        if self.max_concurrent_tasks == 0 {
            return Err(WasmError::Engine { message: "max_concurrent_tasks must be at least 1".into() });
        }
        let mut config = Config::new();
        config
            .consume_fuel(true)
            // Epochs only for the fuel rate: every loop back-edge and function entry pays for
            // the epoch check as well as the fuel one (a tight loop ran 1.5× slower with both).
            // Wall-time limits are checked where tasks yield anyway, at every fuel slice.
            .epoch_interruption(self.uses_epochs())
            .wasm_component_model(true)
            .max_wasm_stack(self.max_wasm_stack_bytes)
            // The async (fiber) stack must hold the wasm stack plus host frames.
            .async_stack_size(self.max_wasm_stack_bytes + (1 << 20));
        if self.pooling {
            let n = self.max_concurrent_tasks;
            let mut pool = PoolingAllocationConfig::new();
            pool.total_component_instances(n)
                .total_core_instances(n.saturating_mul(CORE_INSTANCES_PER_TASK))
                .total_memories(n.saturating_mul(MEMORIES_PER_TASK))
                .total_tables(n.saturating_mul(TABLES_PER_TASK))
                .total_stacks(n)
                .total_gc_heaps(n)
                .max_core_instances_per_component(CORE_INSTANCES_PER_TASK)
                .max_memories_per_component(MEMORIES_PER_TASK)
                .max_tables_per_component(TABLES_PER_TASK)
                .table_elements(MAX_TABLE_ELEMENTS)
                .max_memory_size(usize::try_from(self.max_task_memory_bytes).unwrap_or(usize::MAX));
            config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        }
        Ok(config)
    }
}

/// Counters of the module caches, for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Loads served from the in-memory map of linked modules.
    pub memory_hits: u64,
    /// Loads served by deserializing a compiled module from the disk cache.
    pub disk_hits: u64,
    /// Loads that compiled the module (and wrote it to the disk cache).
    pub compiles: u64,
}

#[derive(Default)]
struct Counters {
    memory_hits: AtomicU64,
    disk_hits: AtomicU64,
    compiles: AtomicU64,
}

/// A module compiled, linked against WASI and ready to instantiate.
#[derive(Clone)]
pub(crate) enum Prepared {
    Core(wasmtime::InstancePre<P1Host>),
    Component(CommandPre<P2Host>),
}

pub(crate) struct Inner {
    pub(crate) engine: Engine,
    pub(crate) config: RuntimeConfig,
    core_linker: Linker<P1Host>,
    component_linker: ComponentLinker<P2Host>,
    engine_hash: String,
    modules: Mutex<HashMap<Digest, (ModuleInfo, Prepared)>>,
    /// Held while loading from disk or compiling, so that N tasks launched at once with a new
    /// module compile it once (the others then find it in memory).
    load_lock: Mutex<()>,
    counters: Counters,
    pub(crate) slots: Arc<Semaphore>,
    ticker: Option<Ticker>,
}

struct Ticker {
    stop: Option<mpsc::Sender<()>>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Drop for Ticker {
    fn drop(&mut self) {
        // Dropping the sender wakes the ticker at once.
        self.stop.take();
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// The Wasm runtime of one executor process: one wasmtime [`Engine`] (async, fuel, epochs,
/// pooling allocator), WASI linked once, an epoch ticker thread, and the module caches.
///
/// Cheap to clone (a handle); the ticker stops when the last clone is dropped. Tasks are run with
/// [`WasmRuntime::run_task`], each in its own `Store`, concurrently on the caller's tokio runtime.
#[derive(Clone)]
pub struct WasmRuntime {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for WasmRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmRuntime")
            .field("config", &self.inner.config)
            .field("engine_hash", &self.inner.engine_hash)
            .finish_non_exhaustive()
    }
}

/// Feeds `Hash` output into sha256 so the engine's compatibility hash is stable across processes
/// (std's `DefaultHasher` is not promised to be).
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn finish(&self) -> u64 {
        let digest = self.0.clone().finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_le_bytes(first)
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

impl WasmRuntime {
    /// Builds the engine, links WASI, creates the cache directory and starts the epoch ticker
    /// (with a fuel rate only).
    pub fn new(config: RuntimeConfig) -> Result<Self, WasmError> {
        let engine = Engine::new(&config.engine_config()?)
            .map_err(|e| WasmError::Engine { message: format!("{e:#}") })?;

        let mut core_linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut core_linker, |h: &mut P1Host| &mut h.wasi)
            .map_err(|e| WasmError::Engine { message: format!("linking WASI preview 1: {e:#}") })?;
        let mut component_linker = ComponentLinker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut component_linker)
            .map_err(|e| WasmError::Engine { message: format!("linking WASI 0.2: {e:#}") })?;

        let mut hasher = Sha256Hasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let engine_hash = format!("{:016x}", hasher.finish());
        let dir = config.cache_dir.join(&engine_hash);
        std::fs::create_dir_all(&dir).map_err(|source| WasmError::CacheIo { path: dir.clone(), source })?;

        let ticker =
            if config.uses_epochs() { Some(start_ticker(&engine, config.epoch_tick)?) } else { None };
        let slots = Arc::new(Semaphore::new(config.max_concurrent_tasks as usize));
        Ok(Self {
            inner: Arc::new(Inner {
                engine,
                config,
                core_linker,
                component_linker,
                engine_hash,
                modules: Mutex::new(HashMap::new()),
                load_lock: Mutex::new(()),
                counters: Counters::default(),
                slots,
                ticker,
            }),
        })
    }

    /// The engine (for embedders that need to build something alongside, e.g. benchmarks).
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// The configuration this runtime was built with.
    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// The engine's compatibility hash as 16 hex digits: the cache subdirectory name. Compiled
    /// modules from another wasmtime version or configuration land in another directory.
    pub fn engine_hash(&self) -> &str {
        &self.inner.engine_hash
    }

    /// Where the compiled form of `digest` is (or would be) cached.
    pub fn cache_path(&self, digest: &Digest) -> PathBuf {
        self.inner.config.cache_dir.join(&self.inner.engine_hash).join(format!("{digest}.cwasm"))
    }

    /// The cache counters so far.
    pub fn cache_stats(&self) -> CacheStats {
        let c = &self.inner.counters;
        CacheStats {
            memory_hits: c.memory_hits.load(Ordering::Relaxed),
            disk_hits: c.disk_hits.load(Ordering::Relaxed),
            compiles: c.compiles.load(Ordering::Relaxed),
        }
    }

    /// Drops a module from the in-memory map (its compiled file stays on disk).
    pub fn forget(&self, digest: &Digest) {
        self.inner.modules.lock().unwrap_or_else(PoisonError::into_inner).remove(digest);
    }

    /// Whether a module is in the in-memory map.
    pub fn is_loaded(&self, digest: &Digest) -> bool {
        self.inner.modules.lock().unwrap_or_else(PoisonError::into_inner).contains_key(digest)
    }

    /// Validates, compiles (or loads from the disk cache) and links a module so that tasks can
    /// refer to it by digest. Blocking (compiling a large module takes long): from async code use
    /// [`WasmRuntime::load_async`].
    pub fn load(&self, bytes: &[u8]) -> Result<ModuleInfo, WasmError> {
        self.inner.load(bytes).map(|(info, _)| info)
    }

    /// [`WasmRuntime::load`] on tokio's blocking pool.
    pub async fn load_async(&self, bytes: Arc<[u8]>) -> Result<ModuleInfo, WasmError> {
        self.inner.clone().load_blocking(bytes).await.map(|(info, _)| info)
    }

    /// Loads a module that was compiled earlier (by this process or a previous one with the same
    /// engine) from the disk cache. Blocking.
    pub fn load_cached(&self, digest: &Digest) -> Result<ModuleInfo, WasmError> {
        self.inner.load_digest(digest).map(|(info, _)| info)
    }
}

fn start_ticker(engine: &Engine, tick: Duration) -> Result<Ticker, WasmError> {
    let (stop, rx) = mpsc::channel::<()>();
    let engine = engine.clone();
    let handle = thread::Builder::new()
        .name("agora-wasm-epoch".into())
        .spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(tick) {
                engine.increment_epoch();
            }
        })
        .map_err(|source| WasmError::Ticker { source })?;
    Ok(Ticker { stop: Some(stop), handle: Some(handle) })
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.ticker.take();
    }
}

impl Inner {
    fn memory_lookup(&self, digest: &Digest) -> Option<(ModuleInfo, Prepared)> {
        let hit = self.modules.lock().unwrap_or_else(PoisonError::into_inner).get(digest).cloned();
        if hit.is_some() {
            self.counters.memory_hits.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }

    fn remember(&self, info: &ModuleInfo, prepared: &Prepared) {
        self.modules
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(info.digest.clone(), (info.clone(), prepared.clone()));
    }

    fn cache_file(&self, digest: &Digest) -> PathBuf {
        self.config.cache_dir.join(&self.engine_hash).join(format!("{digest}.cwasm"))
    }

    /// Looks in memory, then on disk, then compiles.
    pub(crate) fn load(&self, bytes: &[u8]) -> Result<(ModuleInfo, Prepared), WasmError> {
        let digest = Digest::of(bytes);
        if let Some(hit) = self.memory_lookup(&digest) {
            return Ok(hit);
        }
        let info = validate(bytes)?;
        let _loading = self.load_lock.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(hit) = self.memory_lookup(&digest) {
            return Ok(hit);
        }
        if let Some(prepared) = self.load_from_disk(&digest)? {
            self.counters.disk_hits.fetch_add(1, Ordering::Relaxed);
            self.remember(&info, &prepared);
            return Ok((info, prepared));
        }
        let prepared = self.compile(&info, bytes)?;
        self.counters.compiles.fetch_add(1, Ordering::Relaxed);
        self.remember(&info, &prepared);
        Ok((info, prepared))
    }

    /// Looks in memory, then on disk.
    pub(crate) fn load_digest(&self, digest: &Digest) -> Result<(ModuleInfo, Prepared), WasmError> {
        if let Some(hit) = self.memory_lookup(digest) {
            return Ok(hit);
        }
        let _loading = self.load_lock.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(hit) = self.memory_lookup(digest) {
            return Ok(hit);
        }
        let Some(prepared) = self.load_from_disk(digest)? else {
            return Err(WasmError::UnknownModule { digest: digest.clone() });
        };
        self.counters.disk_hits.fetch_add(1, Ordering::Relaxed);
        let kind = match prepared {
            Prepared::Core(_) => ModuleKind::CoreModule,
            Prepared::Component(_) => ModuleKind::Component,
        };
        // The original bytes are gone; what is known of them is what the compiled form says.
        let imports = match &prepared {
            Prepared::Core(pre) => {
                pre.module().imports().map(|i| format!("{}::{}", i.module(), i.name())).collect()
            }
            Prepared::Component(_) => Vec::new(),
        };
        let info = ModuleInfo { kind, digest: digest.clone(), size_bytes: 0, imports };
        self.remember(&info, &prepared);
        Ok((info, prepared))
    }

    pub(crate) async fn load_blocking(
        self: Arc<Self>,
        bytes: Arc<[u8]>,
    ) -> Result<(ModuleInfo, Prepared), WasmError> {
        // Fast path without a thread hop.
        let digest = Digest::of(&bytes);
        if let Some(hit) = self.memory_lookup(&digest) {
            return Ok(hit);
        }
        tokio::task::spawn_blocking(move || self.load(&bytes))
            .await
            .map_err(|e| WasmError::LoadCancelled { digest, message: e.to_string() })?
    }

    pub(crate) async fn load_digest_blocking(
        self: Arc<Self>,
        digest: Digest,
    ) -> Result<(ModuleInfo, Prepared), WasmError> {
        if let Some(hit) = self.memory_lookup(&digest) {
            return Ok(hit);
        }
        let wanted = digest.clone();
        tokio::task::spawn_blocking(move || self.load_digest(&wanted))
            .await
            .map_err(|e| WasmError::LoadCancelled { digest, message: e.to_string() })?
    }

    fn load_from_disk(&self, digest: &Digest) -> Result<Option<Prepared>, WasmError> {
        let path = self.cache_file(digest);
        let kind = match Engine::detect_precompiled_file(&path) {
            Ok(Some(kind)) => kind,
            Ok(None) => {
                tracing::warn!(path = %path.display(), "compiled-module cache file is not a wasmtime artifact; removing it");
                let _ = std::fs::remove_file(&path);
                return Ok(None);
            }
            Err(_) if !path.exists() => return Ok(None),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "unreadable compiled-module cache file; removing it");
                let _ = std::fs::remove_file(&path);
                return Ok(None);
            }
        };
        // SAFETY: the file is in this runtime's own cache directory, keyed by the engine's
        // compatibility hash, and was written only by `write_cache` below from wasmtime's own
        // serialization of a module compiled by this engine configuration (written to a
        // temporary file and renamed into place, so it is never seen half-written). Wasmtime
        // still checks its header and compatibility before using it.
        let loaded = match kind {
            Precompiled::Module => unsafe { Module::deserialize_file(&self.engine, &path) }
                .and_then(|module| self.core_linker.instantiate_pre(&module))
                .map(Prepared::Core),
            Precompiled::Component => unsafe { Component::deserialize_file(&self.engine, &path) }
                .and_then(|component| self.component_linker.instantiate_pre(&component))
                .and_then(CommandPre::new)
                .map(Prepared::Component),
        };
        match loaded {
            Ok(prepared) => Ok(Some(prepared)),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "cannot use cached compiled module; removing it");
                let _ = std::fs::remove_file(&path);
                Ok(None)
            }
        }
    }

    fn compile(&self, info: &ModuleInfo, bytes: &[u8]) -> Result<Prepared, WasmError> {
        let digest = &info.digest;
        let compile_err =
            |e: wasmtime::Error| WasmError::Compile { digest: digest.clone(), message: format!("{e:#}") };
        let link_err =
            |e: wasmtime::Error| WasmError::Link { digest: digest.clone(), message: format!("{e:#}") };
        let (prepared, serialized) = match info.kind {
            ModuleKind::CoreModule => {
                let module = Module::new(&self.engine, bytes).map_err(compile_err)?;
                let serialized = module.serialize().map_err(compile_err)?;
                (Prepared::Core(self.core_linker.instantiate_pre(&module).map_err(link_err)?), serialized)
            }
            ModuleKind::Component => {
                let component = Component::new(&self.engine, bytes).map_err(compile_err)?;
                let serialized = component.serialize().map_err(compile_err)?;
                let pre = self.component_linker.instantiate_pre(&component).map_err(link_err)?;
                (Prepared::Component(CommandPre::new(pre).map_err(link_err)?), serialized)
            }
        };
        let path = self.cache_file(digest);
        // A cache that cannot be written costs a recompile next time, not the task.
        if let Err(e) = write_atomically(&path, &serialized) {
            tracing::warn!(error = %e, "cannot write compiled module to the cache");
        }
        Ok(prepared)
    }
}

/// Writes `bytes` to a temporary file next to `path`, syncs it and renames it into place, so
/// readers see either no file or the whole file.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), WasmError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|source| WasmError::CacheIo { path: dir.to_owned(), source })?;
    let io_err = |source| WasmError::CacheIo { path: path.to_owned(), source };
    let mut tmp =
        tempfile::Builder::new().prefix(".tmp-").suffix(".cwasm").tempfile_in(dir).map_err(io_err)?;
    tmp.write_all(bytes).map_err(io_err)?;
    tmp.as_file().sync_all().map_err(io_err)?;
    tmp.persist(path).map_err(|e| io_err(e.error))?;
    Ok(())
}
