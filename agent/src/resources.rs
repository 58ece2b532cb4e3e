//! Detecting what this node can offer when `--resources` is not given, with Mesos's reserves
//! for the operating system and the agent itself.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use agora_sdk::Resources;

const GIB: u64 = 1 << 30;

/// This node's resources, with the disk measured at the current directory. Prefer
/// [`detect_resources_in`] with the agent's work directory.
pub fn detect_resources() -> Resources {
    detect_resources_in(Path::new("."))
}

/// This node's resources:
/// - `cpus`: the online cores;
/// - `mem`: total memory minus `max(1 GiB, 10 %)` (half of it on nodes with at most 2 GiB);
/// - `disk`: free space of the file system holding `work_dir` minus `max(5 GiB, 10 %)` (half of
///   it when that leaves nothing).
pub fn detect_resources_in(work_dir: &Path) -> Resources {
    Resources {
        cpus: online_cpus().saturating_mul(1000),
        mem: whole_mib(usable_mem(total_memory())),
        disk: whole_mib(usable_disk(free_disk(work_dir))),
        ..Resources::default()
    }
}

fn online_cpus() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    match u64::try_from(n) {
        Ok(n) if n > 0 => n,
        _ => std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(1),
    }
}

/// Rounds down to a whole MiB, so that the text form (`mem:10856MiB`) is exact.
fn whole_mib(bytes: u64) -> u64 {
    bytes & !((1 << 20) - 1)
}

fn total_memory() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let (pages, size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    u64::try_from(pages).unwrap_or(0).saturating_mul(u64::try_from(size).unwrap_or(0))
}

fn free_disk(path: &Path) -> u64 {
    fs_space(path).map(|s| s.avail).unwrap_or(0)
}

/// Size and free space of a file system, bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FsSpace {
    /// Its size.
    pub total: u64,
    /// What an unprivileged user may still write.
    pub avail: u64,
}

/// `statvfs(2)` of the file system holding `path`.
pub(crate) fn fs_space(path: &Path) -> std::io::Result<FsSpace> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs is plain old data; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated string and `st` a live, writable local.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The field types differ between targets (u32 on some 32-bit ones).
    #[allow(clippy::useless_conversion)]
    let (blocks, avail, frsize) = (u64::from(st.f_blocks), u64::from(st.f_bavail), u64::from(st.f_frsize));
    Ok(FsSpace { total: blocks.saturating_mul(frsize), avail: avail.saturating_mul(frsize) })
}

fn usable_mem(total: u64) -> u64 {
    if total > 2 * GIB {
        total - (total / 10).max(GIB)
    } else {
        total / 2
    }
}

fn usable_disk(free: u64) -> u64 {
    let reserve = (free / 10).max(5 * GIB);
    if free > reserve {
        free - reserve
    } else {
        free / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserves() {
        assert_eq!(usable_mem(16 * GIB), 16 * GIB - 16 * GIB / 10);
        assert_eq!(usable_mem(4 * GIB), 3 * GIB);
        assert_eq!(usable_mem(GIB), GIB / 2);
        assert_eq!(usable_disk(100 * GIB), 90 * GIB);
        assert_eq!(usable_disk(20 * GIB), 15 * GIB);
        assert_eq!(usable_disk(4 * GIB), 2 * GIB);
    }

    #[test]
    fn detects_something() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = detect_resources_in(dir.path());
        assert!(r.cpus >= 1000);
        assert!(r.mem > 0);
        assert!(detect_resources().cpus >= 1000);
    }
}
