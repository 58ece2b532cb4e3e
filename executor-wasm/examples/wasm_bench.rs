//! Wasm executor micro-benchmarks, figures in BENCHMARKS.md.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-wasm cargo run --release -p agora-executor-wasm --example wasm_bench
//! ```
//!
//! Prints, for small fixture modules:
//! - cold load (validate + compile + write the disk cache) and disk-cache load (deserialize +
//!   link) of `hello`, p50;
//! - cached instantiate of `noop` with the runtime's engine (pooling allocator) and with the
//!   same configuration on the on-demand allocator, p50 — wasmtime alone, a new `Store` with a
//!   WASI context, fuel set, `instantiate_async`;
//! - a whole `run_task` of `noop` (module in memory, no output files), p50: the executor's own
//!   cost per task;
//! - compute speed: `fib(30)` (call-heavy) and `mix(20M)` (loop-heavy) on engines that differ
//!   only in fuel and epoch interruption (neither, epochs only, fuel only, fuel + epochs),
//!   median of 7; and `_start` of both through the library's `run_task` against a bare engine
//!   with fuel (the issue's 1.25× bound), median of 7.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_executor_wasm::{Digest, ModuleSource, RuntimeConfig, WasmRuntime, WasmTaskSpec};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, Linker, Module, Store};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::WasiCtxBuilder;

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn fixture(name: &str) -> BenchResult<Vec<u8>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(format!("{name}.wat"));
    Ok(wat::parse_file(path)?)
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let idx = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[idx]
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

/// p50 and p99 of `iters` instantiations of `noop` on `engine`, wasmtime alone.
async fn instantiate_p50(engine: &Engine, noop: &[u8], iters: usize) -> BenchResult<(Duration, Duration)> {
    let module = Module::new(engine, noop)?;
    let mut linker: Linker<WasiP1Ctx> = Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_async(&mut linker, |cx| cx)?;
    let pre = linker.instantiate_pre(&module)?;
    let mut samples = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = Instant::now();
        let mut store = Store::new(engine, WasiCtxBuilder::new().build_p1());
        store.set_fuel(u64::MAX)?;
        store.set_epoch_deadline(1 << 40);
        let instance = pre.instantiate_async(&mut store).await?;
        std::hint::black_box(instance);
        drop(store);
        samples.push(start.elapsed());
    }
    Ok((percentile(&mut samples, 0.5), percentile(&mut samples, 0.99)))
}

/// Median wall time of `func(arg)` of fixture `name` over `runs` runs on an engine built from
/// `config`, and the fuel one run burns.
async fn kernel_median(
    config: &Config,
    fuel: bool,
    (name, func, arg): (&str, &str, i32),
    runs: usize,
) -> BenchResult<(Duration, u64)> {
    let engine = Engine::new(config)?;
    let module = Module::new(&engine, fixture(name)?)?;
    let linker: Linker<()> = Linker::new(&engine);
    let pre = linker.instantiate_pre(&module)?;
    let mut samples = Vec::with_capacity(runs);
    let mut fuel_used = 0;
    for _ in 0..runs {
        let mut store = Store::new(&engine, ());
        store.set_epoch_deadline(1 << 40);
        if fuel {
            // As the runtime does for a 1-CPU task.
            store.fuel_async_yield_interval(Some(RuntimeConfig::new("/").fuel_slice_per_cpu))?;
            store.set_fuel(u64::MAX)?;
        }
        let instance = pre.instantiate_async(&mut store).await?;
        let kernel = instance.get_typed_func::<i32, i32>(&mut store, func)?;
        let start = Instant::now();
        let value = kernel.call_async(&mut store, arg).await?;
        samples.push(start.elapsed());
        std::hint::black_box(value);
        if fuel {
            fuel_used = u64::MAX - store.get_fuel()?;
        }
    }
    Ok((percentile(&mut samples, 0.5), fuel_used))
}

async fn bench() -> BenchResult<()> {
    let cache = tempfile::tempdir()?;
    let sandbox = tempfile::tempdir()?;
    let config = RuntimeConfig::new(cache.path());
    let rt = WasmRuntime::new(config.clone())?;
    let hello = fixture("hello")?;
    let noop = fixture("noop")?;
    let hello_digest = Digest::of(&hello);
    println!(
        "wasmtime 48, engine hash {}, pooling allocator for {} tasks",
        rt.engine_hash(),
        config.max_concurrent_tasks
    );
    println!("module sizes: hello {} B, noop {} B", hello.len(), noop.len());

    // Cold load: validate + compile + serialize + atomic write.
    let mut cold = Vec::new();
    for _ in 0..30 {
        rt.forget(&hello_digest);
        let _ = std::fs::remove_file(rt.cache_path(&hello_digest));
        let start = Instant::now();
        rt.load(&hello)?;
        cold.push(start.elapsed());
    }
    // Disk-cache load: deserialize + link.
    let mut warm = Vec::new();
    for _ in 0..200 {
        rt.forget(&hello_digest);
        let start = Instant::now();
        rt.load(&hello)?;
        warm.push(start.elapsed());
    }
    println!(
        "compile (cold load of `hello`: validate+compile+cache write) p50: {}",
        us(percentile(&mut cold, 0.5))
    );
    println!("disk-cache load of `hello` (deserialize+link) p50: {}", us(percentile(&mut warm, 0.5)));

    let iters = 20_000;
    let (pool_p50, pool_p99) = instantiate_p50(rt.engine(), &noop, iters).await?;
    println!("cached instantiate `noop`, pooling allocator: p50 {} p99 {}", us(pool_p50), us(pool_p99));
    let mut on_demand = config.engine_config()?;
    on_demand.allocation_strategy(InstanceAllocationStrategy::OnDemand);
    let (od_p50, od_p99) = instantiate_p50(&Engine::new(&on_demand)?, &noop, iters).await?;
    println!("cached instantiate `noop`, on-demand allocator: p50 {} p99 {}", us(od_p50), us(od_p99));

    // The executor's whole per-task path, module in memory.
    let noop_bytes: Arc<[u8]> = Arc::from(noop);
    rt.load(&noop_bytes)?;
    let noop_digest = Digest::of(&noop_bytes);
    let mut runs = Vec::with_capacity(iters);
    for _ in 0..iters {
        let spec = WasmTaskSpec::new(ModuleSource::Digest(noop_digest.clone()), sandbox.path());
        let start = Instant::now();
        let outcome = rt.run_task(spec).await;
        runs.push(start.elapsed());
        assert!(outcome.success(), "{outcome:?}");
    }
    println!(
        "run_task(`noop`) end to end (prepare + store + instantiate + _start): p50 {} p99 {}",
        us(percentile(&mut runs, 0.5)),
        us(percentile(&mut runs, 0.99))
    );

    // Compute speed: the same kernels on engines that differ only in fuel and epoch
    // interruption (the runtime's configuration otherwise, on-demand allocation), wasmtime
    // alone; then through the library's whole task path, against the bare engine with fuel.
    let mut base = config.engine_config()?;
    base.allocation_strategy(InstanceAllocationStrategy::OnDemand);
    let engine_with = |fuel: bool, epochs: bool| {
        let mut c = base.clone();
        c.consume_fuel(fuel).epoch_interruption(epochs);
        c
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for kernel in [("fib", "fib", 30), ("compute", "mix", 20_000_000), ("tight", "count", 400_000_000)] {
        let (neither, _) = kernel_median(&engine_with(false, false), false, kernel, 7).await?;
        let (epochs, _) = kernel_median(&engine_with(false, true), false, kernel, 7).await?;
        let (fuel_only, fuel) = kernel_median(&engine_with(true, false), true, kernel, 7).await?;
        let (both, _) = kernel_median(&engine_with(true, true), true, kernel, 7).await?;
        println!(
            "{}({}): neither {:.1} ms; epochs only {:.1} ms; fuel only {:.1} ms; fuel + epochs {:.1} ms \
             ({fuel} fuel); fuel + epochs / fuel only {:.3}",
            kernel.1,
            kernel.2,
            ms(neither),
            ms(epochs),
            ms(fuel_only),
            ms(both),
            both.as_secs_f64() / fuel_only.as_secs_f64()
        );
    }
    // `_start` running the kernel: the library's `run_task` (the executor's path: spec checks,
    // WASI context, store, fuel slices, timeout timer) against a bare engine with fuel
    // instantiating the same module and calling `_start`.
    for (name, bytes) in [
        ("fib(30)", wat::parse_str(FIB_30)?),
        ("mix(20M)", wat::parse_str(MIX_20M)?),
        ("count(400M)", fixture("tight")?),
    ] {
        let bytes: Arc<[u8]> = Arc::from(bytes);
        rt.load(&bytes)?;
        let digest = Digest::of(&bytes);
        let mut through = Vec::new();
        for _ in 0..7 {
            let mut spec = WasmTaskSpec::new(ModuleSource::Digest(digest.clone()), sandbox.path());
            spec.cpu_millis = 1000;
            spec.timeout = Some(Duration::from_secs(60));
            let start = Instant::now();
            let outcome = rt.run_task(spec).await;
            through.push(start.elapsed());
            assert!(outcome.success(), "{outcome:?}");
        }
        let bare = start_median(&engine_with(true, false), &bytes, 7).await?;
        let lib = percentile(&mut through, 0.5);
        println!(
            "_start of {name}: run_task {:.1} ms; bare engine with fuel {:.1} ms; ratio {:.3}",
            ms(lib),
            ms(bare),
            lib.as_secs_f64() / bare.as_secs_f64()
        );
    }
    Ok(())
}

const FIB_30: &str = r#"(module
  (memory (export "memory") 1)
  (func $fib (param $n i32) (result i32)
    (if (result i32) (i32.lt_u (local.get $n) (i32.const 2))
      (then (local.get $n))
      (else (i32.add (call $fib (i32.sub (local.get $n) (i32.const 1)))
                     (call $fib (i32.sub (local.get $n) (i32.const 2)))))))
  (func (export "_start") (drop (call $fib (i32.const 30)))))"#;

const MIX_20M: &str = r#"(module
  (memory (export "memory") 1)
  (func $mix (param $n i32) (result i32)
    (local $x i32)
    (local.set $x (i32.const 0x9e3779b9))
    (block $done
      (loop $round
        (br_if $done (i32.eqz (local.get $n)))
        (local.set $x (i32.xor (local.get $x) (i32.shl (local.get $x) (i32.const 13))))
        (local.set $x (i32.xor (local.get $x) (i32.shr_u (local.get $x) (i32.const 17))))
        (local.set $x (i32.xor (local.get $x) (i32.shl (local.get $x) (i32.const 5))))
        (local.set $x (i32.mul (local.get $x) (i32.const 0x2545f491)))
        (local.set $n (i32.sub (local.get $n) (i32.const 1)))
        (br $round)))
    (local.get $x))
  (func (export "_start") (drop (call $mix (i32.const 20000000)))))"#;

/// Median wall time of instantiating `module` and calling its `_start` on a bare engine built
/// from `config` with fuel (yielding at the runtime's 1-CPU slice), over `runs` runs.
async fn start_median(config: &Config, module: &[u8], runs: usize) -> BenchResult<Duration> {
    let engine = Engine::new(config)?;
    let module = Module::new(&engine, module)?;
    let linker: Linker<()> = Linker::new(&engine);
    let pre = linker.instantiate_pre(&module)?;
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        let mut store = Store::new(&engine, ());
        store.fuel_async_yield_interval(Some(RuntimeConfig::new("/").fuel_slice_per_cpu))?;
        store.set_fuel(u64::MAX)?;
        let instance = pre.instantiate_async(&mut store).await?;
        let f = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
        f.call_async(&mut store, ()).await?;
        samples.push(start.elapsed());
    }
    Ok(percentile(&mut samples, 0.5))
}

fn main() -> BenchResult<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(bench())
}
