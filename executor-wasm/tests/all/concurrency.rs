use std::path::Path;
use std::time::Duration;

use agora_executor_wasm::FailureReason;

use crate::Harness;

fn subdir(h: &Harness, name: &str) -> std::path::PathBuf {
    let dir = h.sandbox.path().join(name);
    std::fs::create_dir(&dir).unwrap();
    dir
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file)).unwrap_or_default()
}

/// On a single-threaded executor, a spinning task and a memory bomb do not keep well-behaved
/// neighbours from finishing: tasks yield every fuel slice.
#[tokio::test(flavor = "current_thread")]
async fn misbehaving_tasks_do_not_stop_their_neighbours() {
    let h = Harness::new();
    let mut loop_spec = h.spec_in("loop", &subdir(&h, "loop"));
    // Long enough that the neighbours finish well before it on a loaded machine: that they
    // all end while it still spins is what shows they did not wait for it.
    loop_spec.timeout = Some(Duration::from_secs(8));
    let mut bomb_spec = h.spec_in("membomb", &subdir(&h, "bomb"));
    bomb_spec.memory_limit_bytes = 16 << 20;
    let spinner = tokio::spawn({
        let rt = h.rt.clone();
        async move { rt.run_task(loop_spec).await }
    });
    let bomb = tokio::spawn({
        let rt = h.rt.clone();
        async move { rt.run_task(bomb_spec).await }
    });
    let mut good = Vec::new();
    for i in 0..6 {
        let dir = subdir(&h, &format!("echo{i}"));
        let mut spec = h.spec_in("echo", &dir);
        spec.args = vec!["echo".into(), format!("task {i}")];
        let rt = h.rt.clone();
        good.push((dir, tokio::spawn(async move { rt.run_task(spec).await })));
    }
    for (i, (dir, handle)) in good.into_iter().enumerate() {
        let outcome = handle.await.unwrap();
        assert!(outcome.success(), "{outcome:?}");
        assert_eq!(read(&dir, "stdout"), format!("echo\ntask {i}\n"));
    }
    assert!(!spinner.is_finished(), "the spinner should still be running");
    let bomb = bomb.await.unwrap();
    assert_eq!(bomb.failure_reason(), Some(FailureReason::MemoryLimitExceeded), "{bomb:?}");
    let spinner = spinner.await.unwrap();
    assert_eq!(spinner.failure_reason(), Some(FailureReason::Timeout), "{spinner:?}");
}

/// More tasks than pool slots at once on a multi-threaded runtime: they queue for a slot and
/// all finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_share_one_runtime() {
    let h = Harness::new(); // 16 slots
    let mut handles = Vec::new();
    for i in 0..64 {
        let dir = subdir(&h, &format!("t{i}"));
        let mut spec = h.spec_in("echo", &dir);
        spec.args = vec!["echo".into(), i.to_string()];
        let rt = h.rt.clone();
        handles.push((i, dir, tokio::spawn(async move { rt.run_task(spec).await })));
    }
    for (i, dir, handle) in handles {
        let outcome = handle.await.unwrap();
        assert!(outcome.success(), "{outcome:?}");
        assert_eq!(read(&dir, "stdout"), format!("echo\n{i}\n"));
    }
    let stats = h.rt.cache_stats();
    // Launched all at once, the module is still compiled only once.
    assert_eq!(stats, agora_executor_wasm::CacheStats { memory_hits: 63, disk_hits: 0, compiles: 1 });
}

/// Two spinning tasks on one thread share it in proportion to their `cpus`: the task with
/// 3 CPUs gets fuel slices 3× as large, so it burns about 3× the fuel in the same wall time.
#[tokio::test(flavor = "current_thread")]
async fn contending_tasks_share_cpu_in_proportion_to_cpus() {
    let h = Harness::new();
    // Loaded first so that both start together (a compile on the blocking pool would hold one
    // back while the other runs alone).
    h.rt.load(&crate::fixture("loop")).unwrap();
    let spawn = |name: &str, cpu_millis: u32| {
        let mut spec = h.spec_in("loop", &subdir(&h, name));
        spec.cpu_millis = cpu_millis;
        spec.timeout = Some(Duration::from_millis(600));
        let rt = h.rt.clone();
        tokio::spawn(async move { rt.run_task(spec).await })
    };
    let small = spawn("small", 1000);
    let large = spawn("large", 3000);
    let (small, large) = (small.await.unwrap(), large.await.unwrap());
    assert_eq!(small.failure_reason(), Some(FailureReason::Timeout), "{small:?}");
    assert_eq!(large.failure_reason(), Some(FailureReason::Timeout), "{large:?}");
    let ratio = large.fuel_consumed as f64 / small.fuel_consumed as f64;
    assert!((2.0..4.5).contains(&ratio), "fuel ratio {ratio:.2}: {small:?} {large:?}");
}
