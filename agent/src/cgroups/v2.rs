//! cgroup v2: one unified hierarchy; task groups are children of the agent's root, whose
//! `cgroup.subtree_control` enables the controllers for them. Groups are driven through
//! cgroups-rs controllers over an [`AgentHierarchy`] rooted at the agent's root (cgroups-rs's own
//! `V2` is hard-wired to `/sys/fs/cgroup`).

use std::path::PathBuf;
use std::time::Duration;

use cgroups_rs::fs::cpu::CpuController;
use cgroups_rs::fs::error::ErrorKind as RsErrorKind;
use cgroups_rs::fs::memory::MemController;
use cgroups_rs::fs::pid::PidController;
use cgroups_rs::fs::{Cgroup as RsCgroup, Controller};

use super::fs::{self, CgroupError};
use super::hierarchy::{self, set, AgentHierarchy};
use super::{CgroupManager, CgroupStats, CgroupVersion, Limits, CFS_PERIOD_US};

/// Task groups below one root of the unified hierarchy.
#[derive(Clone, Debug)]
pub struct V2Manager {
    root: PathBuf,
    controllers: Vec<String>,
    rs: AgentHierarchy,
}

impl V2Manager {
    /// A manager for groups below `root`, whose `cgroup.subtree_control` enables `controllers`
    /// (only `cpu`, `memory` and `pids` are used).
    pub fn new(root: PathBuf, controllers: Vec<String>) -> Self {
        let rs = AgentHierarchy::v2(root.clone(), controllers.clone());
        Self { root, controllers, rs }
    }

    fn group(&self, name: &str) -> Result<RsCgroup, CgroupError> {
        self.rs.group(name)
    }
}

/// `cpu.weight` (1..=10000) from v1-style shares (2..=262144), the conversion runc and the
/// kernel documentation use: 1024 shares (one CPU) is weight 39, …
pub fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

impl CgroupManager for V2Manager {
    fn version(&self) -> CgroupVersion {
        CgroupVersion::V2
    }

    fn paths(&self, name: &str) -> Vec<PathBuf> {
        vec![self.root.join(name)]
    }

    fn create(&self, name: &str) -> Result<(), CgroupError> {
        let cg = self.group(name)?;
        if !self.root.exists() {
            // Swept by another agent starting next to this one: re-delegate. Direct: cgroups-rs
            // only enables controllers inside `Cgroup::create`, from the controller list of the
            // hard-wired `/sys/fs/cgroup`, ignoring write errors.
            fs::create_dir(&self.root)?;
            let enable = self.controllers.iter().map(|c| format!("+{c}")).collect::<Vec<_>>().join(" ");
            fs::write(&self.root, "cgroup.subtree_control", &enable)?;
        }
        hierarchy::create(&cg)
    }

    fn apply(&self, name: &str, limits: &Limits) -> Result<(), CgroupError> {
        let cg = self.group(name)?;
        if let Some(cpu) = cg.controller_of::<CpuController>() {
            let dir = cpu.path();
            let weight = shares_to_weight(limits.cpu_shares());
            // cgroups-rs writes `cpu.weight` as given on v2 (the conversion is the caller's).
            set(dir, "cpu.weight", weight)?;
            let quota = limits.cfs_quota_us().map_or(-1, |q| i64::try_from(q).unwrap_or(i64::MAX));
            let line =
                format!("{} {CFS_PERIOD_US}", if quota > 0 { quota.to_string() } else { "max".into() });
            set(dir, "cpu.max", line)?;
        }
        if let Some(mem) = cg.controller_of::<MemController>() {
            let dir = mem.path();
            let max = limits.mem_bytes.map_or(-1, |b| i64::try_from(b).unwrap_or(i64::MAX));
            let shown = if max < 0 { "max".to_string() } else { max.to_string() };
            set(dir, "memory.max", shown)?;
            // Absent without swap accounting (CONFIG_MEMCG_SWAP off): nothing to disallow then.
            if dir.join("memory.swap.max").exists() {
                set(dir, "memory.swap.max", 0)?;
            }
            // A task is one unit: on OOM the kernel kills all of it, not one random process.
            // Direct: cgroups-rs 0.5 has no setter for it, and its generic `attrs` ignore errors.
            if dir.join("memory.oom.group").exists() {
                fs::write(dir, "memory.oom.group", "1")?;
            }
        }
        hierarchy::apply_pids_limit(&cg, limits.pids)?;
        Ok(())
    }

    fn add_process(&self, name: &str, pid: u32) -> Result<(), CgroupError> {
        hierarchy::add_process(&self.group(name)?, pid)
    }

    fn stats(&self, name: &str) -> Result<CgroupStats, CgroupError> {
        let cg = self.group(name)?;
        let mut s = CgroupStats::default();
        if let Some(cpu) = cg.controller_of::<CpuController>() {
            let stat = cpu.cpu().stat;
            s.cpu_time = fs::key_in(cpu.path(), "cpu.stat", &stat, "usage_usec")?.map(Duration::from_micros);
            s.throttled =
                fs::key_in(cpu.path(), "cpu.stat", &stat, "throttled_usec")?.map(Duration::from_micros);
        }
        if let Some(mem) = cg.controller_of::<MemController>() {
            let m = mem.memory_stat();
            s.mem_current = Some(m.usage_in_bytes);
            // memory.peak exists since Linux 5.19; cgroups-rs reads a missing one as 0, which
            // a group that ran anything cannot have used.
            s.mem_peak = Some(m.max_usage_in_bytes).filter(|&p| p > 0);
            // Direct: cgroups-rs 0.5 does not read memory.events (its v2 `memory_stat` reports
            // no OOM kills and no limit hits at all).
            let dir = mem.path();
            s.mem_limit_hits = fs::read_key(dir, "memory.events", "max")?;
            s.oom_kills = fs::read_key(dir, "memory.events", "oom_kill")?;
        }
        if let Some(pids) = cg.controller_of::<PidController>() {
            let dir = pids.path();
            s.pids_current = hierarchy::read_optional(dir, "pids.current", pids.get_pid_current())?;
            s.pids_limit_hits = hierarchy::read_optional(dir, "pids.events", pids.get_pid_events())?;
        }
        Ok(s)
    }

    fn procs(&self, name: &str) -> Result<Vec<u32>, CgroupError> {
        Ok(hierarchy::procs(&self.group(name)?))
    }

    fn kill(&self, name: &str) -> Result<(), CgroupError> {
        let cg = self.group(name)?;
        // cgroup.kill (Linux 5.14) kills every process of the group atomically, forks included;
        // cgroups-rs reports `InvalidOperation` on older kernels.
        match cg.kill() {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == &RsErrorKind::InvalidOperation => {
                super::kill_listed(&hierarchy::procs(&cg));
                Ok(())
            }
            Err(e) => Err(CgroupError::Write {
                path: self.root.join(name).join("cgroup.kill"),
                value: "1".into(),
                err: hierarchy::os_error(&e),
            }),
        }
    }

    fn remove(&self, name: &str) -> Result<(), CgroupError> {
        hierarchy::remove(&self.group(name)?)
    }

    fn groups(&self) -> Vec<String> {
        fs::child_groups(&self.root)
    }

    fn roots(&self) -> Vec<PathBuf> {
        vec![self.root.clone()]
    }

    fn spec(&self) -> Option<super::ManagerSpec> {
        Some(super::ManagerSpec::V2 { root: self.root.clone(), controllers: self.controllers.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn fake_group(dir: &Path) {
        for (f, content) in [
            ("cgroup.procs", ""),
            ("cpu.weight", "100\n"),
            ("cpu.max", "max 100000\n"),
            ("cpu.stat", "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\nnr_periods 30\nnr_throttled 9\nthrottled_usec 1200000\n"),
            ("memory.max", "max\n"),
            ("memory.swap.max", "max\n"),
            ("memory.oom.group", "0\n"),
            ("memory.current", "4096\n"),
            ("memory.peak", "134217728\n"),
            ("memory.events", "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 1\n"),
            ("pids.max", "max\n"),
            ("pids.current", "1\n"),
            ("pids.events", "max 0\n"),
        ] {
            std::fs::write(dir.join(f), content).expect("write fake file");
        }
    }

    fn read(dir: &Path, f: &str) -> String {
        std::fs::read_to_string(dir.join(f)).expect("read").trim().to_string()
    }

    fn all() -> Vec<String> {
        ["cpu", "memory", "pids"].iter().map(|c| c.to_string()).collect()
    }

    #[test]
    fn weights_follow_runc() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(0), 1);
    }

    #[test]
    fn applies_limits_and_reads_usage() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("agora-1");
        std::fs::create_dir(&root).expect("mkdir");
        std::fs::write(root.join("cgroup.subtree_control"), "").expect("write");
        let m = V2Manager::new(root, all());
        m.create("task-1").expect("create");
        let dir = m.paths("task-1").remove(0);
        fake_group(&dir);
        let limits = Limits { cpu_millis: 500, cpu_quota: true, mem_bytes: Some(64 << 20), pids: Some(1024) };
        m.apply("task-1", &limits).expect("apply");
        assert_eq!(read(&dir, "cpu.weight"), "20");
        assert_eq!(read(&dir, "cpu.max"), "50000 100000");
        assert_eq!(read(&dir, "memory.max"), "67108864");
        assert_eq!(read(&dir, "memory.swap.max"), "0");
        assert_eq!(read(&dir, "memory.oom.group"), "1");
        assert_eq!(read(&dir, "pids.max"), "1024");
        let soft = Limits { cpu_millis: 2000, cpu_quota: false, mem_bytes: None, pids: None };
        m.apply("task-1", &soft).expect("resize");
        assert_eq!(read(&dir, "cpu.max"), "max 100000");
        assert_eq!(read(&dir, "memory.max"), "max");
        assert_eq!(read(&dir, "pids.max"), "max");

        let s = m.stats("task-1").expect("stats");
        assert_eq!(s.cpu_time, Some(Duration::from_millis(2500)));
        assert_eq!(s.throttled, Some(Duration::from_millis(1200)));
        assert_eq!((s.mem_current, s.mem_peak), (Some(4096), Some(128 << 20)));
        assert_eq!((s.mem_limit_hits, s.oom_kills), (Some(12), Some(1)));
        assert_eq!((s.pids_current, s.pids_limit_hits), (Some(1), Some(0)));

        m.add_process("task-1", 77).expect("add");
        assert_eq!(m.procs("task-1").expect("procs"), vec![77]);
        // cgroup.kill is used where the kernel has it.
        std::fs::write(dir.join("cgroup.kill"), "").expect("write");
        m.kill("task-1").expect("kill");
        assert_eq!(read(&dir, "cgroup.kill"), "1");
    }

    #[test]
    fn controllers_not_enabled_are_left_alone() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let m = V2Manager::new(tmp.path().to_path_buf(), vec!["memory".into()]);
        m.create("t").expect("create");
        let dir = m.paths("t").remove(0);
        std::fs::write(dir.join("memory.max"), "max\n").expect("write");
        let limits = Limits { cpu_millis: 500, cpu_quota: true, mem_bytes: Some(1 << 20), pids: Some(8) };
        m.apply("t", &limits).expect("only memory.max is written");
        assert_eq!(read(&dir, "memory.max"), "1048576");
        assert!(!dir.join("cpu.max").exists() && !dir.join("pids.max").exists());
        std::fs::remove_file(dir.join("memory.max")).expect("rm");
        m.remove("t").expect("remove");
        assert!(!dir.exists());
    }
}
