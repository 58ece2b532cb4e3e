//! cgroup v1: one hierarchy per mounted controller set (`cpu`, `cpuacct`, `memory`, `pids`, or
//! co-mounted ones such as `cpu,cpuacct`), each with the agent's root at its own path. Groups are
//! driven through cgroups-rs controllers over an [`AgentHierarchy`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use cgroups_rs::fs::cpu::CpuController;
use cgroups_rs::fs::memory::MemController;
use cgroups_rs::fs::{Cgroup as RsCgroup, Controller};

use super::fs::{self, CgroupError};
use super::hierarchy::{self, set, AgentHierarchy};
use super::{CgroupManager, CgroupStats, CgroupVersion, Limits, CFS_PERIOD_US};

/// One v1 hierarchy the agent uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct V1Hierarchy {
    /// The controllers of this hierarchy the agent uses (a subset of `cpu`, `cpuacct`,
    /// `memory`, `pids`).
    pub controllers: Vec<String>,
    /// The agent's root group in this hierarchy, e.g. `/sys/fs/cgroup/memory/<own>/agora-…`.
    pub root: PathBuf,
}

/// Task groups in every v1 hierarchy the agent uses, and only those: unlike cgroups-rs 0.5's own
/// `V1` hierarchy, which creates a group in every mounted hierarchy (freezer, devices, …) and
/// deletes only the leaf, what is created here is exactly what [`CgroupManager::remove`]
/// removes.
#[derive(Clone, Debug)]
pub struct V1Manager {
    hierarchies: Vec<V1Hierarchy>,
    rs: AgentHierarchy,
}

impl V1Manager {
    /// A manager over `hierarchies` (each hierarchy's root must exist to create groups).
    pub fn new(hierarchies: Vec<V1Hierarchy>) -> Self {
        let rs =
            AgentHierarchy::v1(hierarchies.iter().map(|h| (h.controllers.clone(), h.root.clone())).collect());
        Self { hierarchies, rs }
    }

    /// The hierarchies.
    pub fn hierarchies(&self) -> &[V1Hierarchy] {
        &self.hierarchies
    }

    fn apply_memory(mem: &MemController, limit: Option<u64>) -> Result<(), CgroupError> {
        let dir = mem.path();
        let value = limit.map_or(-1, |b| i64::try_from(b).unwrap_or(i64::MAX));
        let set_limit = || set(dir, "memory.limit_in_bytes", value);
        let set_memsw = || set(dir, "memory.memsw.limit_in_bytes", value);
        if dir.join("memory.memsw.limit_in_bytes").exists() {
            // memsw (memory+swap) must never be below the memory limit: when the limit grows,
            // raise memsw first; when it shrinks, lower the memory limit first.
            // Read alone: `memory_stat()` reads ~25 files for this one value.
            let current = std::fs::read_to_string(dir.join("memory.limit_in_bytes"))
                .ok()
                .and_then(|t| t.trim().parse::<i64>().ok())
                .unwrap_or(0);
            let current = u64::try_from(current).unwrap_or(u64::MAX);
            if limit.unwrap_or(u64::MAX) > current {
                set_memsw()?;
                set_limit()?;
            } else {
                set_limit()?;
                set_memsw()?;
            }
        } else {
            set_limit()?;
            // Without swap accounting (swapaccount=0) the best v1 offers is not swapping this
            // group's pages at all; the kernel may refuse it (e.g. under use_hierarchy), which
            // is not worth failing a task for.
            if let Err(e) = set(dir, "memory.swappiness", 0) {
                tracing::debug!(error = %e, "cannot set memory.swappiness");
            }
        }
        Ok(())
    }

    fn group(&self, name: &str) -> Result<RsCgroup, CgroupError> {
        self.rs.group(name)
    }
}

impl CgroupManager for V1Manager {
    fn version(&self) -> CgroupVersion {
        CgroupVersion::V1
    }

    fn paths(&self, name: &str) -> Vec<PathBuf> {
        self.hierarchies.iter().map(|h| h.root.join(name)).collect()
    }

    fn create(&self, name: &str) -> Result<(), CgroupError> {
        hierarchy::create(&self.group(name)?)
    }

    fn apply(&self, name: &str, limits: &Limits) -> Result<(), CgroupError> {
        let cg = self.group(name)?;
        if let Some(cpu) = cg.controller_of::<CpuController>() {
            let dir = cpu.path();
            let shares = limits.cpu_shares();
            set(dir, "cpu.shares", shares)?;
            set(dir, "cpu.cfs_period_us", CFS_PERIOD_US)?;
            let quota = limits.cfs_quota_us().map_or(-1, |q| i64::try_from(q).unwrap_or(i64::MAX));
            set(dir, "cpu.cfs_quota_us", quota)?;
        }
        if let Some(mem) = cg.controller_of::<MemController>() {
            Self::apply_memory(mem, limits.mem_bytes)?;
        }
        hierarchy::apply_pids_limit(&cg, limits.pids)?;
        Ok(())
    }

    fn add_process(&self, name: &str, pid: u32) -> Result<(), CgroupError> {
        hierarchy::add_process(&self.group(name)?, pid)
    }

    /// Reads the eight files the task's end needs (`cpuacct.usage`, `cpu.stat`,
    /// `memory.{usage_in_bytes,max_usage_in_bytes,failcnt,oom_control}`, `pids.{current,events}`)
    /// directly: cgroups-rs's `cpuacct()`, `cpu()` and `memory_stat()` read every file of their
    /// controller (~30, `memory.numa_stat` and `memory.stat` included) to return these values.
    /// Same results: counters missing or unparsable read as 0 (as cgroups-rs reads them), a
    /// missing `cpu.stat` key or pids file is unknown, a pids file that does not parse is an
    /// error.
    fn stats(&self, name: &str) -> Result<CgroupStats, CgroupError> {
        fs::check_name(name)?;
        let mut s = CgroupStats::default();
        for h in &self.hierarchies {
            let dir = h.root.join(name);
            for c in &h.controllers {
                match c.as_str() {
                    "cpuacct" => s.cpu_time = Some(Duration::from_nanos(counter(&dir, "cpuacct.usage"))),
                    "cpu" => {
                        let stat = std::fs::read_to_string(dir.join("cpu.stat")).unwrap_or_default();
                        s.throttled =
                            fs::key_in(&dir, "cpu.stat", &stat, "throttled_time")?.map(Duration::from_nanos);
                    }
                    "memory" => {
                        s.mem_current = Some(counter(&dir, "memory.usage_in_bytes"));
                        s.mem_peak = Some(counter(&dir, "memory.max_usage_in_bytes"));
                        s.mem_limit_hits = Some(counter(&dir, "memory.failcnt"));
                        // `oom_kill` in memory.oom_control exists since Linux 4.13 (0 before).
                        let oom = std::fs::read_to_string(dir.join("memory.oom_control")).unwrap_or_default();
                        s.oom_kills = Some(fs::flat_key(&oom, "oom_kill").ok().flatten().unwrap_or(0));
                    }
                    "pids" => {
                        s.pids_current = pids_number(&dir, "pids.current", |t| t.trim().parse().ok())?;
                        // `max <n>`: forks refused by pids.max.
                        s.pids_limit_hits = pids_number(&dir, "pids.events", |t| {
                            t.split_whitespace().nth(1).and_then(|n| n.parse().ok())
                        })?;
                    }
                    _ => {}
                }
            }
        }
        Ok(s)
    }

    fn procs(&self, name: &str) -> Result<Vec<u32>, CgroupError> {
        Ok(hierarchy::procs(&self.group(name)?))
    }

    fn remove(&self, name: &str) -> Result<(), CgroupError> {
        hierarchy::remove(&self.group(name)?)
    }

    /// `rename(2)` in each hierarchy (cgroup v1 renames a group within its parent).
    fn rename(&self, from: &str, to: &str) -> Result<(), CgroupError> {
        fs::check_name(from)?;
        fs::check_name(to)?;
        for h in &self.hierarchies {
            let target = h.root.join(to);
            std::fs::rename(h.root.join(from), &target)
                .map_err(|err| CgroupError::Create { path: target, err })?;
        }
        Ok(())
    }

    fn groups(&self) -> Vec<String> {
        let mut all: Vec<String> = self.hierarchies.iter().flat_map(|h| fs::child_groups(&h.root)).collect();
        all.sort();
        all.dedup();
        all
    }

    fn roots(&self) -> Vec<PathBuf> {
        self.hierarchies.iter().map(|h| h.root.clone()).collect()
    }

    fn spec(&self) -> Option<super::ManagerSpec> {
        Some(super::ManagerSpec::V1(
            self.hierarchies.iter().map(|h| (h.controllers.clone(), h.root.clone())).collect(),
        ))
    }
}

/// A v1 counter as cgroups-rs reads it: 0 when the file is missing or does not parse.
fn counter(dir: &Path, file: &str) -> u64 {
    std::fs::read_to_string(dir.join(file)).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0)
}

/// A pids file: `Ok(None)` if it does not exist, a parse error naming it if `parse` fails.
fn pids_number(
    dir: &Path,
    file: &str,
    parse: impl Fn(&str) -> Option<u64>,
) -> Result<Option<u64>, CgroupError> {
    let Some(text) = fs::read_optional(dir, file)? else { return Ok(None) };
    parse(&text).map(Some).ok_or(CgroupError::Parse { path: dir.join(file), what: "a number", content: text })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mimics the v1 files of one group in `dir`.
    fn fake_group(dir: &Path, controllers: &[&str]) {
        let mut files: Vec<(&str, &str)> = vec![("cgroup.procs", "")];
        for c in controllers {
            files.extend(match *c {
                "cpu" => vec![
                    ("cpu.shares", "1024\n"),
                    ("cpu.cfs_period_us", "100000\n"),
                    ("cpu.cfs_quota_us", "-1\n"),
                    ("cpu.stat", "nr_periods 40\nnr_throttled 12\nthrottled_time 1500000000\n"),
                ],
                "cpuacct" => vec![("cpuacct.usage", "2500000000\n")],
                "memory" => vec![
                    ("memory.limit_in_bytes", "9223372036854771712\n"),
                    ("memory.memsw.limit_in_bytes", "9223372036854771712\n"),
                    ("memory.usage_in_bytes", "1048576\n"),
                    ("memory.max_usage_in_bytes", "67108864\n"),
                    ("memory.failcnt", "31\n"),
                    ("memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n"),
                ],
                "pids" => vec![("pids.max", "max\n"), ("pids.current", "3\n"), ("pids.events", "max 7\n")],
                _ => vec![],
            });
        }
        for (f, content) in files {
            std::fs::write(dir.join(f), content).expect("write fake file");
        }
    }

    fn read(dir: &Path, f: &str) -> String {
        std::fs::read_to_string(dir.join(f)).expect("read").trim().to_string()
    }

    fn manager(tmp: &Path) -> V1Manager {
        let h = |ctl: &[&str], sub: &str| V1Hierarchy {
            controllers: ctl.iter().map(|c| c.to_string()).collect(),
            root: tmp.join(sub).join("agora-1"),
        };
        // cpu and cpuacct co-mounted, memory nested deeper (as on the CI machines), pids apart.
        V1Manager::new(vec![
            h(&["cpu", "cpuacct"], "cpu,cpuacct"),
            h(&["memory"], "memory/process_api/x"),
            h(&["pids"], "pids"),
        ])
    }

    #[test]
    fn creates_applies_and_reads_in_every_hierarchy() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let m = manager(tmp.path());
        m.create("task-1").expect("create");
        let paths = m.paths("task-1");
        assert_eq!(paths.len(), 3);
        assert!(paths.iter().all(|p| p.is_dir()));
        fake_group(&paths[0], &["cpu", "cpuacct"]);
        fake_group(&paths[1], &["memory"]);
        fake_group(&paths[2], &["pids"]);

        let limits = Limits { cpu_millis: 500, cpu_quota: true, mem_bytes: Some(256 << 20), pids: Some(64) };
        m.apply("task-1", &limits).expect("apply");
        assert_eq!(read(&paths[0], "cpu.shares"), "512");
        assert_eq!(read(&paths[0], "cpu.cfs_period_us"), "100000");
        assert_eq!(read(&paths[0], "cpu.cfs_quota_us"), "50000");
        assert_eq!(read(&paths[1], "memory.limit_in_bytes"), "268435456");
        assert_eq!(read(&paths[1], "memory.memsw.limit_in_bytes"), "268435456");
        assert_eq!(read(&paths[2], "pids.max"), "64");

        // Resizing up (an executor gaining a task) and soft CPU.
        let bigger = Limits { cpu_millis: 1500, cpu_quota: false, mem_bytes: Some(1 << 30), pids: None };
        m.apply("task-1", &bigger).expect("resize");
        assert_eq!(read(&paths[0], "cpu.shares"), "1536");
        assert_eq!(read(&paths[0], "cpu.cfs_quota_us"), "-1");
        assert_eq!(read(&paths[1], "memory.limit_in_bytes"), "1073741824");
        assert_eq!(read(&paths[1], "memory.memsw.limit_in_bytes"), "1073741824");
        assert_eq!(read(&paths[2], "pids.max"), "max");

        m.add_process("task-1", 4242).expect("add");
        assert!(paths.iter().all(|p| read(p, "cgroup.procs") == "4242"));
        assert_eq!(m.procs("task-1").expect("procs"), vec![4242]);

        let s = m.stats("task-1").expect("stats");
        assert_eq!(s.cpu_time, Some(Duration::from_millis(2500)));
        assert_eq!(s.throttled, Some(Duration::from_millis(1500)));
        assert_eq!((s.mem_current, s.mem_peak), (Some(1 << 20), Some(64 << 20)));
        assert_eq!((s.mem_limit_hits, s.oom_kills), (Some(31), Some(1)));
        assert_eq!((s.pids_current, s.pids_limit_hits), (Some(3), Some(7)));
        assert_eq!(m.groups(), vec!["task-1".to_string()]);
    }

    #[test]
    fn missing_controller_file_is_an_error_naming_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let m = manager(tmp.path());
        m.create("t").expect("create");
        let limits = Limits { cpu_millis: 100, cpu_quota: true, mem_bytes: None, pids: None };
        let err = m.apply("t", &limits).expect_err("no cpu files").to_string();
        assert!(err.starts_with("failed to write 102 to ") && err.contains("cpu.shares"), "{err}");
        assert!(m.create("../escape").is_err());
    }

    #[test]
    fn remove_cleans_every_hierarchy() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let m = manager(tmp.path());
        m.create("t").expect("create");
        // Empty directories behave like cgroups for rmdir (control files are not real files).
        std::fs::create_dir(m.paths("t")[1].join("nested")).expect("nested group");
        m.remove("t").expect("remove");
        assert!(m.paths("t").iter().all(|p| !p.exists()));
        assert!(m.groups().is_empty());
        m.remove("t").expect("idempotent");
    }
}
