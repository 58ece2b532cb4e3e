//! The agent's view of the cgroup hierarchies as a cgroups-rs [`Hierarchy`], and the group
//! operations both versions share, done through cgroups-rs controllers.
//!
//! cgroups-rs's own hierarchies do not fit the agent: `V2` is hard-wired to `/sys/fs/cgroup`
//! and `V1` hands out every mounted controller (freezer, devices, …) rooted at each mount point.
//! [`AgentHierarchy`] instead hands out exactly the controllers the agent uses, each rooted at
//! the agent's root group in its hierarchy (per controller on v1: memory may sit in a nested
//! group while cpu and pids sit at the top), which also lets the unit tests point it at temp
//! directories that mimic cgroupfs.

use std::collections::HashSet;
use std::error::Error as _;
use std::io;
use std::path::{Path, PathBuf};

use cgroups_rs::fs::cpu::CpuController;
use cgroups_rs::fs::cpuacct::CpuAcctController;
use cgroups_rs::fs::error::{Error as RsError, ErrorKind as RsErrorKind};
use cgroups_rs::fs::memory::MemController;
use cgroups_rs::fs::pid::PidController;
use cgroups_rs::fs::{Cgroup as RsCgroup, Controller, Hierarchy, MaxValue, Subsystem};
use cgroups_rs::CgroupPid;

use super::fs::{self, CgroupError};

/// The controllers of the agent's root groups, for cgroups-rs.
#[derive(Clone, Debug)]
pub struct AgentHierarchy {
    v2: bool,
    /// (controllers, the agent's root group of the hierarchy holding them).
    roots: Vec<(Vec<String>, PathBuf)>,
}

impl AgentHierarchy {
    /// v1: one entry per hierarchy, with the controllers used there (of `cpu`, `cpuacct`,
    /// `memory`, `pids`).
    pub fn v1(roots: Vec<(Vec<String>, PathBuf)>) -> Self {
        Self { v2: false, roots }
    }

    /// v2: the agent's root in the unified hierarchy, whose `cgroup.subtree_control` enables
    /// `controllers` (of `cpu`, `memory`, `pids`).
    pub fn v2(root: PathBuf, controllers: Vec<String>) -> Self {
        Self { v2: true, roots: vec![(controllers, root)] }
    }

    /// A handle on group `name` below the roots (not created by this).
    pub fn group(&self, name: &str) -> Result<RsCgroup, CgroupError> {
        fs::check_name(name)?;
        Ok(RsCgroup::load(Box::new(self.clone()), name))
    }
}

impl Hierarchy for AgentHierarchy {
    fn subsystems(&self) -> Vec<Subsystem> {
        let mut subs = Vec::new();
        for (controllers, root) in &self.roots {
            let (point, base) = (root.clone(), root.clone());
            for c in controllers {
                subs.push(match c.as_str() {
                    "cpu" => Subsystem::Cpu(CpuController::new(point.clone(), base.clone(), self.v2)),
                    "cpuacct" if !self.v2 => {
                        Subsystem::CpuAcct(CpuAcctController::new(point.clone(), base.clone()))
                    }
                    "memory" => Subsystem::Mem(MemController::new(point.clone(), base.clone(), self.v2)),
                    "pids" => Subsystem::Pid(PidController::new(point.clone(), base.clone(), self.v2)),
                    _ => continue,
                });
            }
        }
        subs
    }

    fn root(&self) -> PathBuf {
        // Used by cgroups-rs on v2 only (delete, kill), where there is exactly one root.
        self.roots.first().map(|(_, r)| r.clone()).unwrap_or_default()
    }

    fn root_control_group(&self) -> RsCgroup {
        RsCgroup::load(Box::new(self.clone()), "")
    }

    fn parent_control_group(&self, path: &str) -> RsCgroup {
        let parent = Path::new(path).parent().map(Path::to_path_buf).unwrap_or_default();
        RsCgroup::load(Box::new(self.clone()), parent)
    }

    fn v2(&self) -> bool {
        self.v2
    }
}

/// The group's controllers, one per directory (co-mounted v1 controllers and all v2
/// controllers share one).
pub fn distinct_controllers(cg: &RsCgroup) -> Vec<&dyn Controller> {
    let mut seen = HashSet::new();
    cg.subsystems()
        .iter()
        .map(Subsystem::to_controller)
        .filter(|c| seen.insert(c.path().to_path_buf()))
        .collect()
}

/// The group's directories (one per hierarchy).
pub fn paths(cg: &RsCgroup) -> Vec<PathBuf> {
    distinct_controllers(cg).iter().map(|c| c.path().to_path_buf()).collect()
}

/// Creates the group's directory in every hierarchy with cgroups-rs's `Controller::create`
/// (what `Cgroup::create` does on v1; on v2 `Cgroup::create` would read the controller list from
/// the hard-wired `/sys/fs/cgroup` and write it into the parent's `cgroup.subtree_control`,
/// ignoring errors: the agent delegates its root itself at start). Nothing half-made is left.
pub fn create(cg: &RsCgroup) -> Result<(), CgroupError> {
    for c in distinct_controllers(cg) {
        if let Err(e) = c.create() {
            let _ = remove(cg);
            return Err(CgroupError::Create { path: c.path().to_path_buf(), err: os_error(&e) });
        }
    }
    Ok(())
}

/// Moves process `pid` into the group in every hierarchy (`cgroup.procs`).
pub fn add_process(cg: &RsCgroup, pid: u32) -> Result<(), CgroupError> {
    for c in distinct_controllers(cg) {
        let path = c.path().join("cgroup.procs");
        c.add_task_by_tgid(&CgroupPid::from(u64::from(pid))).map_err(|e| CgroupError::Write {
            path,
            value: pid.to_string(),
            err: os_error(&e),
        })?;
    }
    Ok(())
}

/// The processes in the group, in any hierarchy (none if it is gone).
pub fn procs(cg: &RsCgroup) -> Vec<u32> {
    cg.procs().into_iter().filter_map(|p| u32::try_from(p.pid).ok()).filter(|&p| p != 0).collect()
}

/// Removes the group, and anything below it, from every hierarchy; gone already is fine.
///
/// `Cgroup::delete` is tried first, but cgroups-rs 0.5 deletes only the leaf it was given, and
/// on v2 with a single `rmdir` without the retries a just-emptied group needs; so every directory
/// of the group that is still there afterwards is removed here, deepest first, with retries
/// ([`fs::remove_tree`]).
pub fn remove(cg: &RsCgroup) -> Result<(), CgroupError> {
    if let Err(e) = if cg.exists() { cg.delete() } else { Ok(()) } {
        tracing::debug!(cgroup = cg.path(), error = %e, "cgroups-rs could not delete the cgroup; removing it directly");
    }
    let mut first = None;
    for path in paths(cg) {
        if let Err(e) = fs::remove_tree(&path) {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// Sets the control file `dir/file` to `value`: one open (`O_WRONLY`, never `O_CREAT`) and one
/// write ([`fs::write`]). cgroups-rs's setters open with `File::create`: in a directory that is
/// no cgroup a missing controller would go unnoticed, and checking first costs a path lookup
/// per file on every launch. Like runc, a missing file is reported as such (`ENOENT`).
pub fn set(dir: &Path, file: &str, value: impl ToString) -> Result<(), CgroupError> {
    fs::write(dir, file, &value.to_string())
}

/// A cgroups-rs read of `dir/file`: `Ok(None)` if the file does not exist (an optional kernel
/// feature), the OS error otherwise.
pub fn read_optional<T>(
    dir: &Path,
    file: &str,
    r: cgroups_rs::fs::error::Result<T>,
) -> Result<Option<T>, CgroupError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == &RsErrorKind::ParseError => {
            let content = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
            Err(CgroupError::Parse { path: dir.join(file), what: "a number", content })
        }
        Err(e) => match os_error(&e) {
            err if err.kind() == io::ErrorKind::NotFound => Ok(None),
            err => Err(CgroupError::Read { path: dir.join(file), err }),
        },
    }
}

/// The OS error a cgroups-rs error was caused by (its `Display` shows only its `Debug` form), or
/// the error itself when it has none.
pub fn os_error(e: &RsError) -> io::Error {
    match e.source().and_then(|s| s.downcast_ref::<io::Error>()) {
        Some(io) => match io.raw_os_error() {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(io.kind(), io.to_string()),
        },
        None => io::Error::other(e.to_string()),
    }
}

/// Writes `pids.max` (no value: `max`), the same file and spelling on v1 and v2.
pub fn apply_pids_limit(cg: &RsCgroup, pids: Option<u64>) -> Result<(), CgroupError> {
    if let Some(ctl) = cg.controller_of::<PidController>() {
        let max = pids.map_or(MaxValue::Max, |p| MaxValue::Value(i64::try_from(p).unwrap_or(i64::MAX)));
        set(ctl.path(), "pids.max", max)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cgroups_rs::fs::cpuacct::CpuAcctController;

    fn names(h: &AgentHierarchy) -> Vec<String> {
        h.subsystems().iter().map(Subsystem::controller_name).collect()
    }

    #[test]
    fn only_the_agents_controllers_each_at_its_own_root() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (cpu, mem) = (tmp.path().join("cpu,cpuacct/agora-1"), tmp.path().join("memory/nested/agora-1"));
        let h = AgentHierarchy::v1(vec![
            (vec!["cpu".into(), "cpuacct".into()], cpu.clone()),
            (vec!["memory".into(), "freezer".into()], mem.clone()),
        ]);
        assert_eq!(names(&h), vec!["cpu", "cpuacct", "memory"]);
        let cg = h.group("task-1").expect("group");
        assert_eq!(paths(&cg), vec![cpu.join("task-1"), mem.join("task-1")]);
        assert!(cg.controller_of::<CpuAcctController>().is_some());
        assert!(h.group("../x").is_err());
        // v2: one directory, no cpuacct, the root is the agent's (not /sys/fs/cgroup).
        let v2 = AgentHierarchy::v2(
            tmp.path().join("agora-2"),
            vec!["cpu".into(), "cpuacct".into(), "pids".into()],
        );
        assert_eq!(names(&v2), vec!["cpu", "pids"]);
        assert_eq!(v2.root(), tmp.path().join("agora-2"));
        assert_eq!(paths(&v2.group("t").expect("group")), vec![tmp.path().join("agora-2/t")]);
    }

    #[test]
    fn errors_keep_the_os_error_and_missing_files_are_none() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let h = AgentHierarchy::v1(vec![(vec!["pids".into()], tmp.path().to_path_buf())]);
        let cg = h.group("t").expect("group");
        create(&cg).expect("create");
        let pids = cg.controller_of::<PidController>().expect("pids");
        let dir = pids.path();
        let missing = pids.get_pid_current().expect_err("no pids.current");
        assert_eq!(os_error(&missing).raw_os_error(), Some(libc::ENOENT));
        assert_eq!(read_optional(dir, "pids.current", pids.get_pid_current()).ok(), Some(None));
        std::fs::write(dir.join("pids.current"), "x\n").expect("write");
        let e = read_optional(dir, "pids.current", pids.get_pid_current()).expect_err("parse").to_string();
        assert!(e.contains("pids.current") && e.contains("a number"), "{e}");
        // A setter never creates a missing control file.
        let e = set(dir, "pids.max", 8).expect_err("no pids.max").to_string();
        assert!(
            e.starts_with("failed to write 8 to ") && e.ends_with("No such file or directory (os error 2)"),
            "{e}"
        );
        assert!(!dir.join("pids.max").exists());
        // Empty directories behave like cgroups for rmdir (control files are not real files).
        std::fs::remove_file(dir.join("pids.current")).expect("rm");
        remove(&cg).expect("remove");
        assert!(!dir.exists() && procs(&cg).is_empty());
    }
}
