//! Agora's Wasm executor library: runs WebAssembly tasks with fuel-metered CPU, hard memory
//! limits, wall-time deadlines and deny-by-default WASI (the Wasm part of ARCHITECTURE.md).
//!
//! One [`WasmRuntime`] per executor process holds one wasmtime `Engine` (async, fuel, pooling
//! allocator; epoch interruption and its ticker thread only with a fuel rate), WASI linked once, and the module
//! caches: an in-memory map of linked modules and a compiled-module cache on disk keyed by the
//! module's sha256 and the engine's compatibility hash (`<cache>/<engine hash>/<sha256>.cwasm`),
//! so a module is compiled once per agent and later launches only deserialize it.
//!
//! Each task runs in its own `Store` ([`WasmRuntime::run_task`]) and ends with a
//! [`TaskOutcome`]: an exit code, or a [`FailureReason`] (`fuel exhausted`, `timeout`,
//! `memory limit exceeded`, `trap`, `launch failed`) with a message, plus the fuel it burnt and
//! its peak memory.
//!
//! # CPU: fuel slices and the fuel rate
//!
//! Every task burns fuel (≈ one unit per WebAssembly instruction). A task with `m` millicores
//! yields to the executor every `fuel_slice_per_cpu × m / 1000` fuel
//! ([`RuntimeConfig::fuel_slice_per_cpu`], capped at 16 CPUs' worth), so when tasks contend for
//! the executor's threads they take turns with slices in proportion to their `cpus`. The epoch
//! callback deliberately does not yield as well: a yield every tick would cut long slices short
//! and pull the shares towards equal. With
//! [`RuntimeConfig::fuel_per_cpu_second`] set, each task is additionally held to a rate of
//! `fuel_per_cpu_second × m / 1000` fuel per second of wall time: every epoch tick compares the
//! fuel it burnt with its allowance and a task running ahead sleeps until it is back on it. An
//! optional total budget ([`WasmTaskSpec::fuel_budget`]) ends the task with `fuel exhausted`.
//!
//! # Wall time
//!
//! A task's `timeout` is a tokio timer around its run, looked at whenever the task yields: at
//! every fuel slice while it computes (well under a millisecond), at once while it waits in a
//! host call. So no epoch interruption is compiled in by default: it would add a check to every
//! loop back-edge and function entry on top of the fuel one (see BENCHMARKS.md, "Wasm compute
//! speed"). It is on only with a fuel rate, which needs the epoch tick.
//!
//! # Memory
//!
//! [`WasmTaskSpec::memory_limit_bytes`] caps the *sum* of the task's linear memories, checked
//! when they are created and on every grow; a refused grow traps (it does not return -1), and
//! the task fails with `memory limit exceeded`. The pooling allocator's per-memory cap is
//! [`RuntimeConfig::max_task_memory_bytes`]; a task asking for more is refused at launch.
//!
//! # Validation
//!
//! [`validate`] needs no engine and is cheap; its checks live in the `agora-wasm-validate` crate so
//! that the master's artifact store can run them at upload time without building wasmtime.

mod digest;
mod error;
mod runtime;
pub mod serve;
mod task;
mod validate;

pub use agora_wasm_validate::ModuleError;
pub use digest::Digest;
pub use error::WasmError;
pub use runtime::{CacheStats, RuntimeConfig, WasmRuntime, MAX_SLICE_CPUS};
pub use serve::{serve, serve_with_runtime, ServeConfig, ServeError};
pub use task::{FailureReason, ModuleSource, Preopen, PreparedTask, TaskEnd, TaskOutcome, WasmTaskSpec};
pub use validate::{
    detect_kind, validate, ModuleInfo, ModuleKind, WASI_P1_FUNCTIONS, WASI_P1_MODULE, WASI_P2_PACKAGES,
};
