use std::time::{Duration, Instant};

use agora_executor_wasm::{FailureReason, TaskEnd, WasmError};

use crate::Harness;

#[tokio::test]
async fn fuel_budget_ends_an_infinite_loop() {
    let h = Harness::new();
    let mut spec = h.spec("loop");
    spec.fuel_budget = Some(5_000_000);
    let outcome = h.run(spec).await;
    assert_eq!(outcome.failure_reason(), Some(FailureReason::FuelExhausted), "{outcome:?}");
    assert_eq!(outcome.failure_reason().unwrap().as_str(), "fuel exhausted");
    assert_eq!(outcome.fuel_consumed, 5_000_000);
}

#[tokio::test]
async fn wall_timeout_ends_an_infinite_loop() {
    let h = Harness::new();
    let mut spec = h.spec("loop");
    spec.timeout = Some(Duration::from_millis(300));
    let started = Instant::now();
    let outcome = h.run(spec).await;
    let elapsed = started.elapsed();
    assert_eq!(outcome.failure_reason(), Some(FailureReason::Timeout), "{outcome:?}");
    assert_eq!(outcome.failure_reason().unwrap().as_str(), "timeout");
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    assert!(outcome.fuel_consumed > 1_000_000, "{outcome:?}");
}

#[tokio::test]
async fn memory_grow_bomb_fails_with_memory_limit_exceeded() {
    let h = Harness::new();
    let mut spec = h.spec("membomb");
    spec.memory_limit_bytes = 8 << 20;
    let outcome = h.run(spec).await;
    let TaskEnd::Failed { reason, message } = &outcome.status else { panic!("{outcome:?}") };
    assert_eq!(*reason, FailureReason::MemoryLimitExceeded);
    assert_eq!(reason.as_str(), "memory limit exceeded");
    assert!(message.contains("over the task's limit of 8388608 bytes"), "{message}");
    // 64 KiB initial + 1 MiB steps, never above 8 MiB.
    assert_eq!(outcome.peak_memory_bytes, (64 << 10) + (7 << 20));
}

#[tokio::test]
async fn an_initial_memory_over_the_limit_fails_at_instantiation() {
    let h = Harness::new();
    let mut spec = h.spec("echo"); // declares 2 pages = 128 KiB
    spec.memory_limit_bytes = 64 << 10;
    let outcome = h.run(spec).await;
    assert_eq!(outcome.failure_reason(), Some(FailureReason::MemoryLimitExceeded), "{outcome:?}");
}

#[tokio::test]
async fn a_limit_beyond_the_pool_is_refused_at_launch() {
    let h = Harness::new();
    let mut spec = h.spec("hello");
    spec.memory_limit_bytes = 1 << 30;
    let err = h.rt.prepare_task(spec).await.unwrap_err();
    assert!(
        matches!(err, WasmError::MemoryLimitTooLarge { requested, max } if requested == 1 << 30 && max == 256 << 20)
    );
}

#[tokio::test]
async fn fuel_consumed_is_reported() {
    let h = Harness::new();
    let outcome = h.run(h.spec("spin")).await;
    assert!(outcome.success(), "{outcome:?}");
    // 2,000,000 iterations of a 6-instruction loop body.
    assert!((8_000_000..20_000_000).contains(&outcome.fuel_consumed), "{outcome:?}");
}

#[tokio::test]
async fn fuel_rate_holds_a_task_to_its_cpus() {
    // 100M fuel per CPU-second; the task spins until it has burnt 40M fuel. Unthrottled that
    // takes 3-15 ms here (optimized wasm burns 3-12e9 fuel/s). The rate is checked every 2 ms
    // tick, so a task may run one tick (up to ~25M fuel) ahead of its allowance; the floors
    // below allow for that burst.
    const RATE: u64 = 100_000_000;
    const BUDGET: u64 = 40_000_000;
    let h = Harness::with_config(|c| {
        c.fuel_per_cpu_second = Some(RATE);
        c.epoch_tick = Duration::from_millis(2);
    });
    let run = |cpu_millis| {
        let mut spec = h.spec("loop");
        spec.cpu_millis = cpu_millis;
        spec.fuel_budget = Some(BUDGET);
        h.run(spec)
    };
    let one_cpu = run(1000).await;
    assert_eq!(one_cpu.failure_reason(), Some(FailureReason::FuelExhausted), "{one_cpu:?}");
    assert_eq!(one_cpu.fuel_consumed, BUDGET);
    // Nominally 400 ms.
    assert!(one_cpu.wall_time >= Duration::from_millis(150), "{one_cpu:?}");

    let four_cpus = run(4000).await;
    assert_eq!(four_cpus.failure_reason(), Some(FailureReason::FuelExhausted), "{four_cpus:?}");
    // Nominally 100 ms.
    assert!(four_cpus.wall_time >= Duration::from_millis(30), "{four_cpus:?}");
    assert!(four_cpus.wall_time * 2 < one_cpu.wall_time, "4 CPUs {four_cpus:?} vs 1 CPU {one_cpu:?}");
}
