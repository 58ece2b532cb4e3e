//! Finding the cgroup hierarchies and the agent's own place in them, from the text of
//! `/proc/self/mountinfo` and `/proc/self/cgroup` (pure functions, tested with samples).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The controllers the agent uses.
pub const CONTROLLERS: [&str; 4] = ["cpu", "cpuacct", "memory", "pids"];

/// A cgroup file-system mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// The path inside the hierarchy that is mounted (`/` unless in a container).
    pub root: String,
    /// Where it is mounted.
    pub point: PathBuf,
    /// `cgroup` (v1) or `cgroup2`.
    pub fstype: String,
    /// Super-block options: the controllers of a v1 mount.
    pub options: Vec<String>,
}

/// Cgroup mounts listed in mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            let (root, point) = (left.get(3)?, left.get(4)?);
            let (fstype, options) = (right.first()?, right.get(2)?);
            if *fstype != "cgroup" && *fstype != "cgroup2" {
                return None;
            }
            Some(Mount {
                root: unescape(root),
                point: PathBuf::from(unescape(point)),
                fstype: fstype.to_string(),
                options: options.split(',').map(str::to_string).collect(),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The process's cgroups from `/proc/self/cgroup`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcCgroups {
    /// v1: controller → path.
    pub v1: HashMap<String, String>,
    /// v2: the `0::` path.
    pub v2: Option<String>,
}

/// Parses `/proc/self/cgroup` text (`4:memory:/process_api/…`, `2:cpu,cpuacct:/`, `0::/`).
pub fn parse_proc_cgroup(text: &str) -> ProcCgroups {
    let mut out = ProcCgroups::default();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_id), Some(ctls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if ctls.is_empty() {
            out.v2 = Some(path.to_string());
        } else {
            for c in ctls.split(',') {
                out.v1.insert(c.to_string(), path.to_string());
            }
        }
    }
    out
}

/// Where the agent's cgroups go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// v1: one entry per distinct hierarchy: the controllers used there and the group the
    /// agent's root is created in (its own group, or `--cgroup-root`).
    V1(Vec<(Vec<String>, PathBuf)>),
    /// v2: the group the agent's root is created in.
    V2 {
        /// The mount point of the unified hierarchy.
        mount: PathBuf,
        /// The agent's own group (or `--cgroup-root`) as a directory.
        base: PathBuf,
    },
}

/// The directory of cgroup `path` in a hierarchy mounted as `mount` (which may show only a
/// sub-tree, `mount.root`, as inside a container).
fn dir_in(mount: &Mount, path: &str) -> PathBuf {
    let root = mount.root.trim_end_matches('/');
    let rel = path.strip_prefix(root).filter(|r| r.is_empty() || r.starts_with('/')).unwrap_or(path);
    let rel = rel.trim_start_matches('/');
    if rel.is_empty() {
        mount.point.clone()
    } else {
        mount.point.join(rel)
    }
}

/// Why no cgroup hierarchy fits the agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoHierarchy {
    /// Nothing of type `cgroup` or `cgroup2` is mounted.
    #[error("no cgroup file system is mounted")]
    NothingMounted,
    /// v1 lacks memory or cpu, and there is no v2 mount.
    #[error("the cgroup v1 memory and cpu controllers are not mounted and there is no cgroup v2 mount")]
    NoControllers,
}

/// Decides between v1 and v2 and where the agent's groups go. v1 is used when its `memory`
/// and `cpu` controllers are mounted (a hybrid host's empty cgroup2 mount is ignored); v2 when a
/// `cgroup2` mount exists and no v1 hierarchy holds them. `explicit` is `--cgroup-root`, a
/// cgroup path (as in `/proc/self/cgroup`) used in every hierarchy. The error says why nothing
/// fits.
pub fn plan(mounts: &[Mount], own: &ProcCgroups, explicit: Option<&Path>) -> Result<Plan, NoHierarchy> {
    let v1_mount = |c: &str| mounts.iter().find(|m| m.fstype == "cgroup" && m.options.iter().any(|o| o == c));
    if v1_mount("memory").is_some() && v1_mount("cpu").is_some() {
        let mut hierarchies: Vec<(Vec<String>, PathBuf)> = Vec::new();
        for c in CONTROLLERS {
            let Some(m) = v1_mount(c) else { continue };
            let path = match explicit {
                Some(p) => p.to_string_lossy().into_owned(),
                None => own.v1.get(c).cloned().unwrap_or_else(|| "/".to_string()),
            };
            let dir = dir_in(m, &path);
            match hierarchies.iter_mut().find(|(_, d)| *d == dir) {
                Some((ctls, _)) => ctls.push(c.to_string()),
                None => hierarchies.push((vec![c.to_string()], dir)),
            }
        }
        return Ok(Plan::V1(hierarchies));
    }
    if let Some(m) = mounts.iter().find(|m| m.fstype == "cgroup2") {
        let path = match explicit {
            Some(p) => p.to_string_lossy().into_owned(),
            None => own.v2.clone().unwrap_or_else(|| "/".to_string()),
        };
        return Ok(Plan::V2 { mount: m.point.clone(), base: dir_in(m, &path) });
    }
    if mounts.is_empty() {
        Err(NoHierarchy::NothingMounted)
    } else {
        Err(NoHierarchy::NoControllers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO_V1: &str = "\
25 30 0:23 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
26 25 0:24 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
27 25 0:25 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
28 25 0:26 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
29 25 0:27 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
30 25 0:28 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
31 25 0:29 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const CGROUP_V1: &str = "\
9:name=systemd:/
8:pids:/
6:freezer:/
4:memory:/process_api/08a6
2:cpuacct:/
1:cpu:/
0::/
";

    #[test]
    fn v1_with_memory_nested_and_the_rest_at_the_root() {
        let mounts = parse_mountinfo(MOUNTINFO_V1);
        assert_eq!(mounts.len(), 6);
        let own = parse_proc_cgroup(CGROUP_V1);
        assert_eq!(own.v1.get("memory").map(String::as_str), Some("/process_api/08a6"));
        assert_eq!(own.v2.as_deref(), Some("/"));
        let Ok(Plan::V1(h)) = plan(&mounts, &own, None) else { panic!("v1 expected") };
        assert_eq!(
            h,
            vec![
                (vec!["cpu".to_string()], PathBuf::from("/sys/fs/cgroup/cpu")),
                (vec!["cpuacct".to_string()], PathBuf::from("/sys/fs/cgroup/cpuacct")),
                (vec!["memory".to_string()], PathBuf::from("/sys/fs/cgroup/memory/process_api/08a6")),
                (vec!["pids".to_string()], PathBuf::from("/sys/fs/cgroup/pids")),
            ]
        );
        let Ok(Plan::V1(h)) = plan(&mounts, &own, Some(Path::new("/agora"))) else { panic!("v1") };
        assert!(h.iter().all(|(_, d)| d.ends_with("agora")), "{h:?}");
    }

    #[test]
    fn comounted_controllers_share_a_directory_and_containers_see_a_subtree() {
        let mi = "\
40 30 0:33 /docker/abc /sys/fs/cgroup/cpu,cpuacct ro - cgroup cgroup rw,cpu,cpuacct
41 30 0:34 /docker/abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory
";
        let own = parse_proc_cgroup("3:cpu,cpuacct:/docker/abc\n2:memory:/docker/abc/inner\n");
        let Ok(Plan::V1(h)) = plan(&parse_mountinfo(mi), &own, None) else { panic!("v1") };
        assert_eq!(
            h,
            vec![
                (vec!["cpu".to_string(), "cpuacct".to_string()], PathBuf::from("/sys/fs/cgroup/cpu,cpuacct")),
                (vec!["memory".to_string()], PathBuf::from("/sys/fs/cgroup/memory/inner")),
            ]
        );
    }

    #[test]
    fn pure_v2_and_nothing() {
        let mi = "30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let own = parse_proc_cgroup("0::/system.slice/agora.service\n");
        assert_eq!(
            plan(&parse_mountinfo(mi), &own, None),
            Ok(Plan::V2 {
                mount: PathBuf::from("/sys/fs/cgroup"),
                base: PathBuf::from("/sys/fs/cgroup/system.slice/agora.service")
            })
        );
        assert!(plan(&[], &own, None).is_err());
        assert_eq!(unescape(r"/a\040b"), "/a b");
    }
}
