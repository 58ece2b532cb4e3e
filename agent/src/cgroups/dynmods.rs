//! `favordynmods` on cgroup v1: cheaper moves of freshly spawned tasks into their groups
//! (`--cgroup-favordynmods`, on by default).
//!
//! # What the option does, and why a hierarchy of its own
//! Moving a process into a cgroup (`cgroup.procs`) write-locks the kernel's
//! `cgroup_threadgroup_rwsem`. By default that per-CPU rwsem favours its readers (every fork,
//! exit and exec), and each write lock waits for an RCU grace period: about half a millisecond
//! per move, paid once per hierarchy a task is placed in. A cgroup root mounted with
//! `favordynmods` (Linux ≥ 6.0 on v1) keeps the rwsem in its writer-friendly mode for as long as
//! the root exists (from Linux 6.18 it also switches moves to a per-thread-group lock, for good),
//! at the price of slightly slower forks and exits. The rwsem and the switch are *global*: one
//! root with the option is enough for moves into every hierarchy.
//!
//! The hierarchies the agent's groups live in cannot get the option themselves: on this kernel
//! (checked on 6.18) `mount -o remount,cpu,favordynmods` of an existing v1 hierarchy is refused
//! ("option or name mismatch", `EINVAL`), and mounting the same controllers again at another
//! point yields the existing super-block with the new option silently ignored ("new mount
//! options do not match the existing superblock, will be ignored"). So the agent mounts a
//! named v1 hierarchy without controllers, `name=agora_favordynmods`, with `favordynmods` at
//! [`DEFAULT_DIR`]; task groups stay where they always were (their paths, recovery and the
//! command executor's view are unchanged). When some cgroup mount already carries the option
//! (an earlier agent's, or the administrator's), nothing is mounted.
//!
//! # Who unmounts
//! Nobody, like the `/sys/fs/cgroup` mounts: the mount holds no group and no task, is shared by
//! every agent of the host (one that exits cannot tell whether another still relies on it), and
//! removing it would not turn the kernel's switch off again anyway (one-way from 6.18). An administrator who wants it gone
//! unmounts it while no agent runs, and starts agents with `--cgroup-favordynmods off`.
//!
//! # cgroup v2
//! Nothing is done: the option would have to go on the host's `cgroup2` mount (`mount -o
//! remount,favordynmods /sys/fs/cgroup`), which belongs to the init system and affects the
//! whole host. An administrator can do that (or use a kernel built with
//! `CONFIG_CGROUP_FAVOR_DYNMODS`).

use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::detect::{self, Mount};

/// Where the agent mounts its `favordynmods` hierarchy.
pub const DEFAULT_DIR: &str = "/run/agora/cgroup-favordynmods";
/// The name of that hierarchy (`name=` mount option; v1 names are host-wide).
pub const HIERARCHY_NAME: &str = "agora_favordynmods";
/// The mount's options: no controllers, the name, and the option.
pub const MOUNT_OPTIONS: &str = "none,name=agora_favordynmods,favordynmods";

/// How `favordynmods` came to be in effect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Favor {
    /// A cgroup mount with the option was there already (mount point).
    Existing(PathBuf),
    /// The agent mounted its hierarchy here.
    Mounted(PathBuf),
}

/// Why `favordynmods` could not be put in effect (the agent goes on without it).
#[derive(Debug, thiserror::Error)]
pub enum DynmodsError {
    /// `/proc/self/mountinfo` could not be read.
    #[error("cannot read /proc/self/mountinfo: {0}")]
    Mountinfo(#[source] io::Error),
    /// The mount point (or the lock file next to it) could not be made.
    #[error("cannot prepare {path}: {err}")]
    Prepare {
        /// The directory or file.
        path: PathBuf,
        /// The cause.
        #[source]
        err: io::Error,
    },
    /// The kernel refused the mount (`EINVAL`: older than Linux 6.0 or no cgroup v1 support;
    /// `EPERM`: not root or in a container without `CAP_SYS_ADMIN`).
    #[error("cannot mount a cgroup hierarchy with -o {MOUNT_OPTIONS} at {path}: {err}")]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// The cause.
        #[source]
        err: io::Error,
    },
    /// The mount succeeded but mountinfo does not show the option (a hierarchy of that name
    /// existed already without it, and the kernel ignored the option); it was unmounted again.
    #[error("the cgroup hierarchy mounted at {0} does not have favordynmods (a hierarchy named agora_favordynmods exists without it)")]
    NotApplied(PathBuf),
}

/// The mount point of a cgroup (v1 or v2) mount whose super-block has `favordynmods`.
pub fn existing(mounts: &[Mount]) -> Option<&Path> {
    mounts.iter().find(|m| m.options.iter().any(|o| o == "favordynmods")).map(|m| m.point.as_path())
}

/// Makes sure a cgroup root with `favordynmods` exists: reuses one listed in mountinfo, or
/// mounts the agent's named hierarchy at `dir` (created if needed). Several agents starting at
/// once are serialised by a lock file next to `dir`, so only one of them mounts.
pub fn ensure(dir: &Path) -> Result<Favor, DynmodsError> {
    let mounts = read_mounts()?;
    if let Some(point) = existing(&mounts) {
        return Ok(Favor::Existing(point.to_path_buf()));
    }
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(prepare(parent))?;
    }
    let lock_path = dir.with_extension("lock");
    let lock = File::create(&lock_path).map_err(prepare(&lock_path))?;
    flock(&lock).map_err(prepare(&lock_path))?;
    // Another agent may have mounted while this one waited for the lock.
    let mounts = read_mounts()?;
    if let Some(point) = existing(&mounts) {
        return Ok(Favor::Existing(point.to_path_buf()));
    }
    std::fs::create_dir_all(dir).map_err(prepare(dir))?;
    mount(dir).map_err(|err| DynmodsError::Mount { path: dir.to_path_buf(), err })?;
    let mounts = read_mounts()?;
    let ours = mounts.iter().rev().find(|m| m.point == dir && m.fstype == "cgroup");
    if ours.is_some_and(|m| m.options.iter().any(|o| o == "favordynmods")) {
        Ok(Favor::Mounted(dir.to_path_buf()))
    } else {
        let _ = unmount(dir);
        Err(DynmodsError::NotApplied(dir.to_path_buf()))
    }
}

/// The error for `path` that could not be made.
fn prepare(path: &Path) -> impl FnOnce(io::Error) -> DynmodsError + '_ {
    move |err| DynmodsError::Prepare { path: path.to_path_buf(), err }
}

fn read_mounts() -> Result<Vec<Mount>, DynmodsError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(DynmodsError::Mountinfo)?;
    Ok(detect::parse_mountinfo(&text))
}

fn c_path(path: &Path) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Blocks until `file` is locked exclusively (released when it is closed).
fn flock(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: the descriptor is open for the duration of the call.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn mount(dir: &Path) -> io::Result<()> {
    let target = c_path(dir)?;
    let options =
        std::ffi::CString::new(MOUNT_OPTIONS).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let (source, fstype) = (c"cgroup", c"cgroup");
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), flags, options.as_ptr().cast())
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn unmount(dir: &Path) -> io::Result<()> {
    let target = c_path(dir)?;
    // SAFETY: `target` is a valid NUL-terminated string.
    if unsafe { libc::umount(target.as_ptr()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_existing_mount_with_the_option_is_found_in_either_version() {
        let v1 = detect::parse_mountinfo(
            "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
             46 27 0:40 / /run/agora/cgroup-favordynmods rw,nosuid - cgroup cgroup rw,favordynmods,name=agora_favordynmods\n",
        );
        assert_eq!(existing(&v1), Some(Path::new("/run/agora/cgroup-favordynmods")));
        let v2 = detect::parse_mountinfo(
            "30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate,favordynmods\n",
        );
        assert_eq!(existing(&v2), Some(Path::new("/sys/fs/cgroup")));
        // Mount-point options (left of " - ") do not count, nor other file systems.
        let none = detect::parse_mountinfo(
            "32 31 0:29 / /sys/fs/cgroup/cpu rw,favordynmods - cgroup cgroup rw,cpu\n\
             40 31 0:9 / /x rw - tmpfs tmpfs rw,favordynmods\n",
        );
        assert_eq!(existing(&none), None);
        assert!(MOUNT_OPTIONS.contains(&format!("name={HIERARCHY_NAME}")));
    }
}
