//! The benchmark programs keep compiling and running: `examples/bench_launch` at tiny sizes,
//! native and Wasm, through its embedded cluster (the `agora` binary beside it as the
//! executors). No timing is asserted — figures come from release runs (BENCHMARKS.md) — only
//! that every kind reports all its tasks RUNNING and FINISHED.

mod common;

use common::*;

#[test]
fn bench_launch_runs_native_and_wasm_at_small_sizes() {
    let out = std::process::Command::new(example("bench_launch"))
        .args(["--kind", "both", "--latency-tasks", "3", "--throughput-tasks", "12", "--isolation", "none"])
        .output()
        .expect("run bench_launch");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench_launch failed ({}):\n{stdout}\n{stderr}", out.status);
    assert!(!stdout.contains("INVALID RUN"), "a task did not run or finish:\n{stdout}\n{stderr}");
    for line in [
        "baseline posix_spawn(true)",
        "native true, one at a time   n=3 ",
        "native true, all at once     n=12 ",
        "wasm noop, one at a time     n=3 ",
        "wasm noop, all at once       n=12 ",
    ] {
        assert!(stdout.contains(line), "no `{line}` line in:\n{stdout}\n{stderr}");
    }
}

#[test]
fn bench_launch_compute_runs_both_kernels_beside_the_bare_engine() {
    let out = std::process::Command::new(example("bench_launch"))
        .args(["--kind", "compute", "--compute-runs", "1", "--isolation", "none"])
        .output()
        .expect("run bench_launch");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench_launch --kind compute failed ({}):\n{stdout}\n{stderr}", out.status);
    for kernel in ["count(400M)", "fib(32)"] {
        for cpus in ["--cpus 1:", "--cpus 2:"] {
            let line = stdout.lines().find(|l| l.starts_with(kernel) && l.contains(cpus));
            let line = line.unwrap_or_else(|| panic!("no {kernel} {cpus} line in:\n{stdout}\n{stderr}"));
            assert!(line.contains("bare wasmtime with fuel p50") && line.contains("ratio"), "{line}");
        }
    }
}
