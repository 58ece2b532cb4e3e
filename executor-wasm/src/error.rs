//! The error type of this crate.

use std::io;
use std::path::PathBuf;

use crate::digest::Digest;

/// Why a module could not be accepted, loaded or launched.
///
/// Every variant names the failing module, import, path or value so that the message can be shown
/// to a user as is (e.g. by `agora run --wasm` at upload time).
#[derive(Debug, thiserror::Error)]
pub enum WasmError {
    /// The bytes are not a WebAssembly command Agora can run (not Wasm, invalid, not a command,
    /// or importing what Agora does not provide).
    #[error(transparent)]
    Module(#[from] agora_wasm_validate::ModuleError),
    /// Compiling a validated module failed.
    #[error("failed to compile module {digest}: {message}")]
    Compile {
        /// The module's sha256.
        digest: Digest,
        /// Wasmtime's message.
        message: String,
    },
    /// Linking the module against Agora's WASI failed (e.g. an import with the wrong type).
    #[error("failed to link module {digest} against WASI: {message}")]
    Link {
        /// The module's sha256.
        digest: Digest,
        /// Wasmtime's message.
        message: String,
    },
    /// A task referred to a module by digest that is neither loaded nor in the compiled cache.
    #[error("module {digest} is not loaded and not in the compiled-module cache")]
    UnknownModule {
        /// The digest the task asked for.
        digest: Digest,
    },
    /// A digest string that is not 64 hex digits.
    #[error("invalid module digest `{value}`: expected 64 hex digits, optionally prefixed by `sha256:`")]
    BadDigest {
        /// The string given.
        value: String,
    },
    /// Reading or writing the compiled-module cache failed.
    #[error("compiled-module cache I/O on {path}: {source}")]
    CacheIo {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The task's sandbox directory could not be resolved.
    #[error("task sandbox {path} is not usable: {source}")]
    Sandbox {
        /// The sandbox directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A preopened directory resolves to a path outside the task's sandbox.
    #[error("preopen {path} is outside the task sandbox {sandbox}")]
    PreopenOutsideSandbox {
        /// The resolved host path.
        path: PathBuf,
        /// The task's sandbox directory.
        sandbox: PathBuf,
    },
    /// A preopened directory could not be opened.
    #[error("cannot preopen {path} as `{guest}`: {message}")]
    Preopen {
        /// The host path.
        path: PathBuf,
        /// The guest path it was to appear at.
        guest: String,
        /// The OS or WASI message.
        message: String,
    },
    /// The stdout or stderr file could not be created.
    #[error("cannot open output file {path}: {source}")]
    Output {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The task asks for more memory than the engine's pooling allocator can hold.
    #[error("memory limit of {requested} bytes exceeds this executor's maximum of {max} bytes per task")]
    MemoryLimitTooLarge {
        /// The task's limit.
        requested: u64,
        /// [`RuntimeConfig::max_task_memory_bytes`](crate::RuntimeConfig::max_task_memory_bytes).
        max: u64,
    },
    /// A task spec field with an unusable value.
    #[error("invalid task spec: `{field}`: {reason}")]
    InvalidSpec {
        /// The field's name.
        field: &'static str,
        /// Why it is unusable.
        reason: String,
    },
    /// The engine could not be created from the runtime configuration.
    #[error("cannot create the Wasm engine: {message}")]
    Engine {
        /// Wasmtime's message.
        message: String,
    },
    /// The epoch ticker thread could not be started.
    #[error("cannot start the epoch ticker thread: {source}")]
    Ticker {
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A blocking compile or cache load was cancelled (the runtime is shutting down).
    #[error("loading module {digest} was cancelled: {message}")]
    LoadCancelled {
        /// The module's sha256.
        digest: Digest,
        /// Tokio's message.
        message: String,
    },
}
