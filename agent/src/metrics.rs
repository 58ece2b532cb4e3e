//! Agent metrics about task resource usage (names `agora_agent_<name>_<unit|total>`).
//!
//! Per-task figures are not labelled with task ids (unbounded cardinality): they are
//! aggregated over the agent's tasks as counters, gauges and histograms.

use std::time::Duration;

use crate::cgroups::CgroupStats;

/// CPU seconds used by tasks (counted in microseconds so that the counter stays an integer).
pub const TASK_CPU_MICROSECONDS: &str = "agora_agent_task_cpu_microseconds_total";
/// Microseconds tasks were held back by their CPU quota.
pub const TASK_THROTTLED_MICROSECONDS: &str = "agora_agent_task_throttled_microseconds_total";
/// Memory charged to running tasks' cgroups now.
pub const TASKS_MEMORY_BYTES: &str = "agora_agent_tasks_memory_bytes";
/// Peak memory of each ended task.
pub const TASK_PEAK_MEMORY_BYTES: &str = "agora_agent_task_peak_memory_bytes";
/// Tasks that ended because of their memory limit.
pub const TASK_OOM_KILLS: &str = "agora_agent_task_oom_kills_total";
/// Tasks that hit their process limit.
pub const TASK_PIDS_LIMIT_HITS: &str = "agora_agent_task_pids_limit_hits_total";
/// Tasks that could not be given their cgroup.
pub const TASK_ISOLATION_FAILURES: &str = "agora_agent_task_isolation_failures_total";
/// Finished sandboxes removed by garbage collection.
pub const SANDBOXES_REMOVED: &str = "agora_agent_sandboxes_removed_total";
/// Tasks killed because their sandbox outgrew their disk limit.
pub const TASK_DISK_LIMIT_KILLS: &str = "agora_agent_task_disk_limit_kills_total";
/// Bytes of task output dropped (the head of files past `--max-output-size`).
pub const OUTPUT_BYTES_DROPPED: &str = "agora_agent_output_bytes_dropped_total";
/// Artifacts evicted from the agent's cache (`--cache-size`).
pub const CACHE_EVICTIONS: &str = "agora_agent_cache_evictions_total";
/// Finished sandboxes waiting for removal.
pub const SANDBOXES_SCHEDULED: &str = "agora_agent_sandboxes_scheduled";

/// Feeds the agent's aggregate metrics from successive samples of one task's cgroup: counters
/// grow by what the task used since the previous sample, the memory gauge moves by its change.
#[derive(Debug, Default)]
pub struct UsageReporter {
    cpu: Duration,
    throttled: Duration,
    mem: u64,
}

impl UsageReporter {
    /// Accounts a new sample of the task's cgroup.
    pub fn sample(&mut self, s: &CgroupStats) {
        if let Some(cpu) = s.cpu_time {
            let delta = cpu.saturating_sub(self.cpu);
            metrics::counter!(TASK_CPU_MICROSECONDS).increment(micros(delta));
            self.cpu = self.cpu.max(cpu);
        }
        if let Some(t) = s.throttled {
            let delta = t.saturating_sub(self.throttled);
            metrics::counter!(TASK_THROTTLED_MICROSECONDS).increment(micros(delta));
            self.throttled = self.throttled.max(t);
        }
        if let Some(m) = s.mem_current {
            let g = metrics::gauge!(TASKS_MEMORY_BYTES);
            if m >= self.mem {
                g.increment((m - self.mem) as f64);
            } else {
                g.decrement((self.mem - m) as f64);
            }
            self.mem = m;
        }
    }

    /// The task ended: its memory leaves the gauge; its peak and limit events are recorded.
    pub fn finish(mut self, last: Option<&CgroupStats>) {
        if let Some(s) = last {
            self.sample(&CgroupStats { mem_current: None, ..*s });
            if let Some(p) = s.mem_peak {
                metrics::histogram!(TASK_PEAK_MEMORY_BYTES).record(p as f64);
            }
            if s.oom_kills.unwrap_or(0) > 0 {
                metrics::counter!(TASK_OOM_KILLS).increment(1);
            }
            if s.pids_limit_hits.unwrap_or(0) > 0 {
                metrics::counter!(TASK_PIDS_LIMIT_HITS).increment(1);
            }
        }
        metrics::gauge!(TASKS_MEMORY_BYTES).decrement(self.mem as f64);
        self.mem = 0;
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
