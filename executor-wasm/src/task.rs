//! One task: its spec, its store and sandbox, and how it ended.

use std::fmt;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store, StoreContextMut, Trap, UpdateDeadline};
use wasmtime_wasi::cli::OutputFile;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use agora_sdk::Reason;

use crate::digest::Digest;
use crate::error::WasmError;
use crate::runtime::{Inner, Prepared, WasmRuntime, MAX_TABLE_ELEMENTS};
use crate::validate::ModuleInfo;

/// Where a task's module comes from.
#[derive(Clone)]
pub enum ModuleSource {
    /// The module's bytes (validated, then compiled or found in a cache by their sha256).
    Bytes(Arc<[u8]>),
    /// A module loaded earlier ([`WasmRuntime::load`]) or compiled into the disk cache by an
    /// earlier run of this executor.
    Digest(Digest),
}

impl fmt::Debug for ModuleSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            Self::Digest(d) => write!(f, "Digest({d:?})"),
        }
    }
}

/// A directory of the sandbox made visible to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preopen {
    /// Host directory; a relative path is relative to the task's sandbox, and the resolved path
    /// must be inside the sandbox.
    pub host: PathBuf,
    /// The name the guest opens it by, e.g. `/data` or `.`.
    pub guest: String,
    /// Whether the guest may only read.
    pub read_only: bool,
}

/// Everything a Wasm task may use. Anything not declared here the guest does not get: no
/// inherited environment, no network, no directory outside `preopens`, an empty stdin.
#[derive(Debug, Clone)]
pub struct WasmTaskSpec {
    /// The module to run.
    pub module: ModuleSource,
    /// The guest's full argv; by convention `args[0]` is the program name.
    pub args: Vec<String>,
    /// The guest's whole environment.
    pub env: Vec<(String, String)>,
    /// The task's sandbox directory on the host; preopens must resolve inside it.
    pub sandbox: PathBuf,
    /// Directories of the sandbox preopened for the guest.
    pub preopens: Vec<Preopen>,
    /// File the guest's stdout is appended to (relative to the sandbox); `None` discards it.
    pub stdout: Option<PathBuf>,
    /// File the guest's stderr is appended to (relative to the sandbox); `None` discards it.
    pub stderr: Option<PathBuf>,
    /// Cap on the sum of the task's linear memories, in bytes.
    pub memory_limit_bytes: u64,
    /// CPU share in millicores (1000 = one CPU): sets the fuel slice between yields and, when
    /// the runtime has a `fuel_per_cpu_second`, the fuel rate.
    pub cpu_millis: u32,
    /// Total fuel the task may burn; it fails with `fuel exhausted` when spent.
    pub fuel_budget: Option<u64>,
    /// Wall-time limit from the start of instantiation; it fails with `timeout` after it.
    pub timeout: Option<Duration>,
}

impl WasmTaskSpec {
    /// A spec with no args, env, preopens or output, 64 MiB of memory, 1 CPU, no fuel budget and
    /// no timeout.
    pub fn new(module: ModuleSource, sandbox: impl Into<PathBuf>) -> Self {
        Self {
            module,
            args: Vec::new(),
            env: Vec::new(),
            sandbox: sandbox.into(),
            preopens: Vec::new(),
            stdout: None,
            stderr: None,
            memory_limit_bytes: 64 << 20,
            cpu_millis: 1000,
            fuel_budget: None,
            timeout: None,
        }
    }
}

/// Why a task failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// The task's fuel budget ran out.
    FuelExhausted,
    /// The task's wall-time limit passed.
    Timeout,
    /// A memory or table grow (or the initial size) went over the task's limit.
    MemoryLimitExceeded,
    /// A WebAssembly trap: stack overflow, `unreachable`, out-of-bounds access, ...
    Trap,
    /// The task could not be started: module invalid or unknown, sandbox or output unusable.
    LaunchFailed,
}

impl FailureReason {
    /// The task status reason it is reported with.
    pub fn reason(self) -> Reason {
        match self {
            Self::FuelExhausted => Reason::FuelExhausted,
            Self::Timeout => Reason::Timeout,
            Self::MemoryLimitExceeded => Reason::MemoryLimitExceeded,
            Self::Trap => Reason::Trap,
            Self::LaunchFailed => Reason::LaunchFailed,
        }
    }

    /// The reason as shown to users (its [`Reason`]'s text): `fuel exhausted`, `timeout`,
    /// `memory limit exceeded`, `trap`, `launch failed`.
    pub fn as_str(&self) -> &'static str {
        self.reason().static_str().unwrap_or_default()
    }
}

impl From<FailureReason> for Reason {
    fn from(f: FailureReason) -> Reason {
        f.reason()
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a task ended: an exit code or a failure. (Not a status update: those are the wire
/// `agora_sdk::proto::TaskStatus`, which the executor loop in `serve` builds from this.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskEnd {
    /// The guest returned from `_start` (code 0), called `proc_exit(code)`, or a component's
    /// `run` returned `ok` (0) or `err` (1).
    Exited {
        /// The exit code.
        code: i32,
    },
    /// The task was stopped or could not start.
    Failed {
        /// The category.
        reason: FailureReason,
        /// Details: the trap message, the limit, the launch error.
        message: String,
    },
}

/// The result of [`WasmRuntime::run_task`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskOutcome {
    /// Exit code or failure.
    pub status: TaskEnd,
    /// Fuel burnt (≈ WebAssembly instructions executed).
    pub fuel_consumed: u64,
    /// Largest total size of the task's linear memories, in bytes.
    pub peak_memory_bytes: u64,
    /// Wall time from the start of instantiation to the end.
    pub wall_time: Duration,
}

impl TaskOutcome {
    /// The exit code, if the guest exited.
    pub fn exit_code(&self) -> Option<i32> {
        match self.status {
            TaskEnd::Exited { code } => Some(code),
            TaskEnd::Failed { .. } => None,
        }
    }

    /// The failure reason, if the task failed.
    pub fn failure_reason(&self) -> Option<FailureReason> {
        match self.status {
            TaskEnd::Exited { .. } => None,
            TaskEnd::Failed { reason, .. } => Some(reason),
        }
    }

    /// Whether the guest exited with code 0.
    pub fn success(&self) -> bool {
        self.exit_code() == Some(0)
    }

    fn launch_failed(error: &WasmError) -> Self {
        Self {
            status: TaskEnd::Failed { reason: FailureReason::LaunchFailed, message: error.to_string() },
            fuel_consumed: 0,
            peak_memory_bytes: 0,
            wall_time: Duration::ZERO,
        }
    }
}

/// Why the runtime stopped a task from inside the store (carried through wasmtime as the error).
#[derive(Debug)]
enum Kill {
    Timeout(Duration),
    Memory { desired: u64, limit: u64 },
    Table { desired: usize, limit: usize },
}

impl fmt::Display for Kill {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout(d) => write!(f, "wall-time limit of {d:?} reached"),
            Self::Memory { desired, limit } => {
                write!(
                    f,
                    "linear memory would grow to {desired} bytes, over the task's limit of {limit} bytes"
                )
            }
            Self::Table { desired, limit } => {
                write!(f, "table would grow to {desired} elements, over the limit of {limit}")
            }
        }
    }
}

impl std::error::Error for Kill {}

/// The memory limiter of a task: like wasmtime's `StoreLimits` with `trap_on_grow_failure`, but
/// the cap applies to the *sum* of the task's memories (a component has several) and it records
/// the peak.
struct TaskLimiter {
    limit: u64,
    current: u64,
    peak: u64,
}

impl ResourceLimiter for TaskLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|max| desired > max) {
            // Beyond the module's own declared maximum: a normal `memory.grow` failure (-1).
            return Ok(false);
        }
        let grow = (desired as u64).saturating_sub(current as u64);
        let total = self.current.saturating_add(grow);
        if total > self.limit {
            return Err(Kill::Memory { desired: total, limit: self.limit }.into());
        }
        self.current = total;
        self.peak = self.peak.max(total);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|max| desired > max) {
            return Ok(false);
        }
        if desired > MAX_TABLE_ELEMENTS {
            return Err(Kill::Table { desired, limit: MAX_TABLE_ELEMENTS }.into());
        }
        Ok(true)
    }
}

/// Per-task state held in the store beside the WASI context.
struct TaskState {
    limiter: TaskLimiter,
    started: Instant,
    timeout: Option<Duration>,
    fuel_initial: u64,
    /// Fuel per second this task may burn, if the runtime caps the rate.
    fuel_per_second: Option<f64>,
}

/// Store data of a core-module task.
pub(crate) struct P1Host {
    pub(crate) wasi: WasiP1Ctx,
    task: TaskState,
}

/// Store data of a component task.
pub(crate) struct P2Host {
    ctx: WasiCtx,
    table: ResourceTable,
    task: TaskState,
}

impl WasiView for P2Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.ctx, table: &mut self.table }
    }
}

trait HostState: Send + 'static {
    fn task(&mut self) -> &mut TaskState;
}

impl HostState for P1Host {
    fn task(&mut self) -> &mut TaskState {
        &mut self.task
    }
}

impl HostState for P2Host {
    fn task(&mut self) -> &mut TaskState {
        &mut self.task
    }
}

/// A task whose module is loaded and whose sandbox is set up, ready to [`run`](PreparedTask::run).
/// An embedder can report the task running once it has one.
pub struct PreparedTask {
    runtime: Arc<Inner>,
    info: ModuleInfo,
    prepared: Prepared,
    wasi: WasiCtxBuilder,
    spec: WasmTaskSpec,
}

impl fmt::Debug for PreparedTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreparedTask")
            .field("info", &self.info)
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl WasmRuntime {
    /// Runs one task to its end: loads its module, sets up its sandbox, runs it in its own store
    /// under its limits. Never panics on guest behaviour; every way of ending is a
    /// [`TaskOutcome`]. Many tasks may run concurrently on one runtime (spawn each on tokio).
    pub async fn run_task(&self, spec: WasmTaskSpec) -> TaskOutcome {
        match self.prepare_task(spec).await {
            Ok(task) => task.run().await,
            Err(e) => TaskOutcome::launch_failed(&e),
        }
    }

    /// The first half of [`run_task`](Self::run_task): loads the module (compiling it or reading
    /// the disk cache on tokio's blocking pool), checks the spec, opens the preopens and output
    /// files.
    pub async fn prepare_task(&self, spec: WasmTaskSpec) -> Result<PreparedTask, WasmError> {
        let inner = &self.inner;
        if spec.memory_limit_bytes > inner.config.max_task_memory_bytes {
            return Err(WasmError::MemoryLimitTooLarge {
                requested: spec.memory_limit_bytes,
                max: inner.config.max_task_memory_bytes,
            });
        }
        if spec.cpu_millis == 0 {
            return Err(WasmError::InvalidSpec { field: "cpu_millis", reason: "must be at least 1".into() });
        }
        if spec.timeout.is_some_and(|t| t.is_zero()) {
            return Err(WasmError::InvalidSpec { field: "timeout", reason: "must be positive".into() });
        }
        let (info, prepared) = match &spec.module {
            ModuleSource::Bytes(bytes) => inner.clone().load_blocking(bytes.clone()).await?,
            ModuleSource::Digest(digest) => inner.clone().load_digest_blocking(digest.clone()).await?,
        };
        let wasi = wasi_builder(&spec)?;
        Ok(PreparedTask { runtime: inner.clone(), info, prepared, wasi, spec })
    }
}

fn resolve(sandbox: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_owned()
    } else {
        sandbox.join(path)
    }
}

/// A guest output file created on the first byte written (with its directory): most tasks
/// never write to stderr, many never to stdout, and creating files (inodes) dominated the cost
/// of short tasks. A task that writes nothing leaves no file; readers treat that as empty.
#[derive(Clone)]
struct LazyOutput {
    path: Arc<PathBuf>,
    file: Arc<std::sync::OnceLock<Result<OutputFile, OpenOutputError>>>,
}

/// A guest output file that could not be created; kept, and given to every later write.
#[derive(Clone, Debug, thiserror::Error)]
#[error("cannot open {}: {err}", path.display())]
struct OpenOutputError {
    path: Arc<PathBuf>,
    #[source]
    err: Arc<std::io::Error>,
}

impl LazyOutput {
    fn new(path: PathBuf) -> Self {
        Self { path: Arc::new(path), file: Arc::new(std::sync::OnceLock::new()) }
    }

    fn file(&self) -> Result<&OutputFile, OpenOutputError> {
        self.file
            .get_or_init(|| {
                let open = || {
                    if let Some(dir) = self.path.parent() {
                        std::fs::create_dir_all(dir)?;
                    }
                    OpenOptions::new().create(true).append(true).open(&*self.path)
                };
                open()
                    .map(OutputFile::new)
                    .map_err(|err| OpenOutputError { path: self.path.clone(), err: Arc::new(err) })
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

impl wasmtime_wasi::cli::IsTerminal for LazyOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for LazyOutput {
    fn p2_stream(&self) -> Box<dyn wasmtime_wasi::p2::OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl wasmtime_wasi::p2::Pollable for LazyOutput {
    async fn ready(&mut self) {}
}

impl wasmtime_wasi::p2::OutputStream for LazyOutput {
    fn write(&mut self, bytes: bytes::Bytes) -> wasmtime_wasi::p2::StreamResult<()> {
        use wasmtime_wasi::p2::StreamError;
        let mut f =
            self.file().map_err(|e| StreamError::LastOperationFailed(wasmtime::format_err!(e)))?.clone();
        wasmtime_wasi::p2::OutputStream::write(&mut f, bytes)
    }

    fn flush(&mut self) -> wasmtime_wasi::p2::StreamResult<()> {
        match self.file.get() {
            Some(Ok(f)) => wasmtime_wasi::p2::OutputStream::flush(&mut f.clone()),
            _ => Ok(()),
        }
    }

    fn check_write(&mut self) -> wasmtime_wasi::p2::StreamResult<usize> {
        Ok(1 << 20)
    }
}

impl tokio::io::AsyncWrite for LazyOutput {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.file() {
            Ok(f) => std::pin::Pin::new(&mut f.clone()).poll_write(cx, buf),
            Err(e) => std::task::Poll::Ready(Err(std::io::Error::other(e))),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

fn open_output(sandbox: &Path, path: &Path) -> LazyOutput {
    LazyOutput::new(resolve(sandbox, path))
}

/// The deny-by-default WASI context of a task.
fn wasi_builder(spec: &WasmTaskSpec) -> Result<WasiCtxBuilder, WasmError> {
    // Preopens are checked against the real sandbox path; without any, the sandbox need not
    // exist (outputs create it on the first byte written).
    let sandbox = if spec.preopens.is_empty() {
        spec.sandbox.clone()
    } else {
        spec.sandbox
            .canonicalize()
            .map_err(|source| WasmError::Sandbox { path: spec.sandbox.clone(), source })?
    };
    let mut b = WasiCtxBuilder::new();
    // No inherit_*: args, env and stdio are only what the spec says; stdin stays empty.
    b.args(&spec.args).envs(&spec.env).allow_tcp(false).allow_udp(false).allow_ip_name_lookup(false);
    if let Some(path) = &spec.stdout {
        b.stdout(open_output(&sandbox, path));
    }
    if let Some(path) = &spec.stderr {
        b.stderr(open_output(&sandbox, path));
    }
    for preopen in &spec.preopens {
        let wanted = resolve(&sandbox, &preopen.host);
        let host = wanted.canonicalize().map_err(|e| WasmError::Preopen {
            path: wanted.clone(),
            guest: preopen.guest.clone(),
            message: e.to_string(),
        })?;
        if !host.starts_with(&sandbox) {
            return Err(WasmError::PreopenOutsideSandbox { path: host, sandbox });
        }
        let perms = if preopen.read_only { FsPerms::ReadOnly } else { FsPerms::ReadWrite };
        b.preopened_dir(&host, &preopen.guest, perms).map_err(|e| WasmError::Preopen {
            path: host.clone(),
            guest: preopen.guest.clone(),
            message: format!("{e:#}"),
        })?;
    }
    Ok(b)
}

/// Called by wasmtime every epoch tick while the task runs wasm code: enforces the wall-time
/// limit and the fuel rate (sleeping on tokio's timer when the task is ahead of its allowance).
fn on_epoch<T: HostState>(mut cx: StoreContextMut<'_, T>) -> wasmtime::Result<UpdateDeadline> {
    let remaining = cx.get_fuel()?;
    let task = cx.data_mut().task();
    let elapsed = task.started.elapsed();
    let left = match task.timeout {
        Some(limit) if elapsed >= limit => return Err(Kill::Timeout(limit).into()),
        Some(limit) => Some(limit - elapsed),
        None => None,
    };
    if let Some(rate) = task.fuel_per_second {
        let consumed = task.fuel_initial.saturating_sub(remaining) as f64;
        let allowed = rate * elapsed.as_secs_f64();
        if consumed > allowed {
            let mut pause = Duration::from_secs_f64((consumed - allowed) / rate);
            if let Some(left) = left {
                pause = pause.min(left);
            }
            return Ok(UpdateDeadline::YieldCustom(1, Box::pin(tokio::time::sleep(pause))));
        }
    }
    // No yield here: turns are taken at fuel-slice boundaries, sized by `cpus`. Yielding on
    // every tick as well would cut long slices short and pull shares towards equal.
    Ok(UpdateDeadline::Continue(1))
}

fn classify(error: &wasmtime::Error) -> TaskEnd {
    if let Some(exit) = error.downcast_ref::<I32Exit>() {
        return TaskEnd::Exited { code: exit.0 };
    }
    if let Some(kill) = error.downcast_ref::<Kill>() {
        let reason = match kill {
            Kill::Timeout(_) => FailureReason::Timeout,
            Kill::Memory { .. } | Kill::Table { .. } => FailureReason::MemoryLimitExceeded,
        };
        return TaskEnd::Failed { reason, message: kill.to_string() };
    }
    if let Some(trap) = error.downcast_ref::<Trap>() {
        let reason = match trap {
            Trap::OutOfFuel => FailureReason::FuelExhausted,
            Trap::Interrupt => FailureReason::Timeout,
            _ => FailureReason::Trap,
        };
        return TaskEnd::Failed { reason, message: trap.to_string() };
    }
    TaskEnd::Failed { reason: FailureReason::Trap, message: format!("{error:#}") }
}

impl PreparedTask {
    /// What was learnt about the module when it was validated.
    pub fn module_info(&self) -> &ModuleInfo {
        &self.info
    }

    /// Runs the task to its end in its own store.
    pub async fn run(self) -> TaskOutcome {
        self.run_notify(|| {}).await
    }

    /// Like [`run`](Self::run), and calls `started` once the module is instantiated, just
    /// before its entry point (`_start` or `wasi:cli/run`) is called: the moment an embedder
    /// reports the task running. A task that ends before (no slot, instantiation refused, e.g.
    /// by its memory limit) never calls it.
    pub async fn run_notify(mut self, started: impl FnOnce() + Send) -> TaskOutcome {
        let Ok(_slot) = self.runtime.slots.clone().acquire_owned().await else {
            return TaskOutcome::launch_failed(&WasmError::LoadCancelled {
                digest: self.info.digest,
                message: "the runtime is shutting down".into(),
            });
        };
        let config = &self.runtime.config;
        let millis = u64::from(self.spec.cpu_millis);
        let task = TaskState {
            limiter: TaskLimiter { limit: self.spec.memory_limit_bytes, current: 0, peak: 0 },
            started: Instant::now(),
            timeout: self.spec.timeout,
            fuel_initial: self.spec.fuel_budget.unwrap_or(u64::MAX),
            fuel_per_second: config.fuel_per_cpu_second.map(|r| r as f64 * millis as f64 / 1000.0),
        };
        let slice = config.fuel_slice(self.spec.cpu_millis);
        let epochs = config.uses_epochs();
        // Without epochs the wall-time limit is this timer: a computing guest yields at every
        // fuel slice (well under a millisecond) and a guest in a host call waits on tokio, so
        // the timer is looked at within a slice of the limit either way. With epochs the
        // epoch callback ends the task at the limit and the timer is only a backstop.
        let backstop = match self.spec.timeout {
            Some(t) if epochs => Some(t + config.epoch_tick * 10 + Duration::from_millis(100)),
            other => other,
        };
        let engine = self.runtime.engine.clone();
        match self.prepared.clone() {
            Prepared::Core(pre) => {
                let host = P1Host { wasi: self.wasi.build_p1(), task };
                let mut store = Store::new(&engine, host);
                let run = async {
                    configure(&mut store, slice, epochs)?;
                    let instance = pre.instantiate_async(&mut store).await?;
                    started();
                    let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
                    start.call_async(&mut store, ()).await.map(|()| 0)
                };
                let result = with_backstop(backstop, run).await;
                finish(&mut store, result)
            }
            Prepared::Component(pre) => {
                let host = P2Host { ctx: self.wasi.build(), table: ResourceTable::new(), task };
                let mut store = Store::new(&engine, host);
                let run = async {
                    configure(&mut store, slice, epochs)?;
                    let command = pre.instantiate_async(&mut store).await?;
                    started();
                    let result = command.wasi_cli_run().call_run(&mut store).await?;
                    Ok(if result.is_ok() { 0 } else { 1 })
                };
                let result = with_backstop(backstop, run).await;
                finish(&mut store, result)
            }
        }
    }
}

fn configure<T: HostState>(store: &mut Store<T>, slice: u64, epochs: bool) -> wasmtime::Result<()> {
    store.limiter(|h| &mut h.task().limiter as &mut dyn ResourceLimiter);
    // The yield interval first: `set_fuel` splits the fuel into what is injected now and the
    // reserve according to it.
    store.fuel_async_yield_interval(Some(slice))?;
    let fuel = store.data_mut().task().fuel_initial;
    store.set_fuel(fuel)?;
    if epochs {
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(on_epoch::<T>);
    }
    Ok(())
}

/// The wall-time limit (without epochs), or a backstop a little after it (with them: the epoch
/// deadline cannot fire while the guest is blocked in a host call): ends the run whatever the
/// guest is doing.
async fn with_backstop(
    backstop: Option<Duration>,
    run: impl std::future::Future<Output = wasmtime::Result<i32>>,
) -> wasmtime::Result<i32> {
    match backstop {
        None => run.await,
        Some(limit) => match tokio::time::timeout(limit, run).await {
            Ok(result) => result,
            Err(_) => Err(Kill::Timeout(limit).into()),
        },
    }
}

fn finish<T: HostState>(store: &mut Store<T>, result: wasmtime::Result<i32>) -> TaskOutcome {
    let remaining = store.get_fuel().unwrap_or(0);
    let task = store.data_mut().task();
    let status = match result {
        Ok(code) => TaskEnd::Exited { code },
        Err(e) => classify(&e),
    };
    TaskOutcome {
        status,
        fuel_consumed: task.fuel_initial.saturating_sub(remaining),
        peak_memory_bytes: task.limiter.peak,
        wall_time: task.started.elapsed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_reasons_are_reported_as_their_reason_with_the_same_words() {
        for (f, text) in [
            (FailureReason::FuelExhausted, "fuel exhausted"),
            (FailureReason::Timeout, "timeout"),
            (FailureReason::MemoryLimitExceeded, "memory limit exceeded"),
            (FailureReason::Trap, "trap"),
            (FailureReason::LaunchFailed, "launch failed"),
        ] {
            assert_eq!(f.as_str(), text);
            assert_eq!(Reason::from(f).as_str(), text);
            assert_eq!(Reason::from(text), f.reason(), "the text reads back as the same reason");
        }
    }
}
