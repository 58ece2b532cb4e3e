//! The few direct cgroupfs operations the agent keeps beside cgroups-rs (see the module
//! documentation of [`super`] for which and why), and [`CgroupError`], whose messages name the
//! file, the value and the OS error.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A failed cgroupfs operation.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Writing a control file failed (`EBUSY` for a limit below current usage, `EINVAL` for an
    /// out-of-range value, `ENOENT` for a controller that is not enabled…).
    #[error("failed to write {value} to {}: {err}", path.display())]
    Write {
        /// The control file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// The cause.
        err: io::Error,
    },
    /// Reading a control file failed.
    #[error("failed to read {}: {err}", path.display())]
    Read {
        /// The control file.
        path: PathBuf,
        /// The cause.
        err: io::Error,
    },
    /// A control file holds something unexpected.
    #[error("cannot parse {} as {what}: {content:?}", path.display())]
    Parse {
        /// The control file.
        path: PathBuf,
        /// What was expected.
        what: &'static str,
        /// What it holds.
        content: String,
    },
    /// A cgroup directory could not be created.
    #[error("failed to create cgroup {}: {err}", path.display())]
    Create {
        /// The cgroup directory.
        path: PathBuf,
        /// The cause.
        err: io::Error,
    },
    /// A cgroup directory could not be removed.
    #[error("failed to remove cgroup {}: {err}", path.display())]
    Remove {
        /// The cgroup directory.
        path: PathBuf,
        /// The cause.
        err: io::Error,
    },
    /// Processes survived repeated SIGKILLs (they may be stuck in the kernel, state D).
    #[error("cgroup {} still holds processes {pids:?} after killing them", path.display())]
    Busy {
        /// The cgroup directory.
        path: PathBuf,
        /// What is left.
        pids: Vec<u32>,
    },
    /// A group name that is not a single plain path component.
    #[error(
        "invalid cgroup name {0:?}: must be one path component of [A-Za-z0-9._-], not starting with a dot"
    )]
    InvalidName(String),
}

/// Writes `value` to the control file `dir/file` (`O_WRONLY|O_TRUNC`, never creating it, like
/// runc: a missing file means a missing controller and must be an error).
pub fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    let result = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .and_then(|mut f| f.write_all(value.as_bytes()));
    result.map_err(|err| CgroupError::Write { path, value: value.to_string(), err })
}

/// Reads the control file `dir/file`.
pub fn read(dir: &Path, file: &str) -> Result<String, CgroupError> {
    let path = dir.join(file);
    std::fs::read_to_string(&path).map_err(|err| CgroupError::Read { path, err })
}

/// Reads `dir/file` if it exists (`Ok(None)` otherwise: an optional kernel feature).
pub fn read_optional(dir: &Path, file: &str) -> Result<Option<String>, CgroupError> {
    match std::fs::read_to_string(dir.join(file)) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(CgroupError::Read { path: dir.join(file), err }),
    }
}

/// Reads `key` from a flat keyed file (`key value` lines: `memory.events`); `None` if the file
/// or the key is absent.
pub fn read_key(dir: &Path, file: &str, key: &str) -> Result<Option<u64>, CgroupError> {
    let Some(s) = read_optional(dir, file)? else {
        return Ok(None);
    };
    key_in(dir, file, &s, key)
}

/// Looks `key` up in the text of the flat keyed file `dir/file` (as read by cgroups-rs: empty if
/// absent); `None` if the key is absent.
pub fn key_in(dir: &Path, file: &str, text: &str, key: &str) -> Result<Option<u64>, CgroupError> {
    flat_key(text, key).map_err(|BadLine(content)| CgroupError::Parse {
        path: dir.join(file),
        what: "`key value` lines",
        content,
    })
}

/// A line of flat keyed text whose value is not a number: the line.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a `key value` line")]
pub struct BadLine(pub String);

/// Looks `key` up in flat keyed text; the error is the offending line.
pub fn flat_key(text: &str, key: &str) -> Result<Option<u64>, BadLine> {
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        if parts.next() == Some(key) {
            return match parts.next().map(str::parse::<u64>) {
                Some(Ok(v)) => Ok(Some(v)),
                _ => Err(BadLine(line.to_string())),
            };
        }
    }
    Ok(None)
}

/// The pids listed in `dir/cgroup.procs` (empty if the group is gone).
pub fn procs(dir: &Path) -> Result<Vec<u32>, CgroupError> {
    let Some(s) = read_optional(dir, "cgroup.procs")? else {
        return Ok(Vec::new());
    };
    Ok(s.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Creates the cgroup directory `path` and any missing parents.
pub fn create_dir(path: &Path) -> Result<(), CgroupError> {
    std::fs::create_dir_all(path).map_err(|err| CgroupError::Create { path: path.to_path_buf(), err })
}

/// Removes the cgroup directory `path` and every group below it, deepest first. A group that is
/// already gone is not an error. `rmdir` of a cgroup can fail with `EBUSY` for a moment after its
/// last process exited, so each removal is retried a few times with a growing delay (as runc
/// does).
pub fn remove_tree(path: &Path) -> Result<(), CgroupError> {
    let entries = match std::fs::read_dir(path) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(CgroupError::Remove { path: path.to_path_buf(), err }),
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&entry.path())?;
        }
    }
    let mut delay = Duration::from_millis(5);
    for attempt in 0.. {
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if attempt < 6 && e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(delay);
                delay *= 2;
            }
            Err(err) => return Err(CgroupError::Remove { path: path.to_path_buf(), err }),
        }
    }
    Ok(())
}

/// The subdirectories (child groups) of `path`; empty if it does not exist.
pub fn child_groups(path: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(path) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// Checks that `name` is one plain path component, so that a group can never escape the
/// agent's subtree.
pub fn check_name(name: &str) -> Result<(), CgroupError> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(CgroupError::InvalidName(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_keys_and_numbers() {
        let text = "nr_periods 10\nnr_throttled 2\nthrottled_time 12345\n";
        assert_eq!(flat_key(text, "throttled_time"), Ok(Some(12345)));
        assert_eq!(flat_key(text, "nope"), Ok(None));
        assert_eq!(flat_key("max x\n", "max"), Err(BadLine("max x".to_string())));
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("memory.events"), "max 3\noom_kill 1\n").expect("write");
        std::fs::write(dir.path().join("bad"), "max x\n").expect("write");
        assert_eq!(read_key(dir.path(), "memory.events", "oom_kill").ok(), Some(Some(1)));
        assert_eq!(read_key(dir.path(), "missing", "max").ok(), Some(None));
        let err = read_key(dir.path(), "bad", "max").expect_err("not a number").to_string();
        assert!(err.contains("bad") && err.contains("`key value` lines"), "{err}");
        assert_eq!(key_in(dir.path(), "cpu.stat", "", "usage_usec").ok(), Some(None));
    }

    #[test]
    fn writes_never_create_files_and_name_path_and_value() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = write(dir.path(), "memory.max", "268435456").expect_err("no such file").to_string();
        assert!(err.starts_with("failed to write 268435456 to "), "{err}");
        assert!(err.contains("memory.max"), "{err}");
        std::fs::write(dir.path().join("memory.max"), "9223372036854771712\n").expect("write");
        write(dir.path(), "memory.max", "1024").expect("write");
        assert_eq!(std::fs::read_to_string(dir.path().join("memory.max")).ok().as_deref(), Some("1024"));
    }

    #[test]
    fn names_stay_inside_the_subtree() {
        assert!(check_name("task-0f3c").is_ok());
        for bad in ["", ".", "..", "a/b", ".hidden", "a b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
