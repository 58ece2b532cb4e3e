//! Which agents' cgroup roots are in use.
//!
//! An agent that made its own root (`agora-<hash of the work dir>`) holds an exclusive `flock` on
//! `<lock dir>/agora-<hash>.lock` for as long as it uses that root. Before removing the root of
//! another agent that seems gone, the sweep at start takes the same lock without waiting: a live
//! agent's root (even one whose only task group is still empty, between `mkdir` and moving the
//! task in) is never touched. Locks are per open file, so agents of one process (`agora dev`,
//! tests) exclude each other too, and the kernel drops the lock of an agent that dies.
//!
//! The file is unlinked by whoever holds the lock when done with it. Whoever takes a lock checks
//! afterwards that the path still names the file it locked, and starts again otherwise (the
//! usual pattern for lock files that get removed).

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The host-wide directory of root locks: `/run/agora/cgroups` for root, a per-user directory
/// under the temp dir otherwise.
pub fn lock_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        PathBuf::from("/run/agora/cgroups")
    } else {
        std::env::temp_dir().join(format!("agora-cgroups-{uid}"))
    }
}

/// A held lock on one root's name; released (and its file removed) on drop.
#[derive(Debug)]
pub struct RootLock {
    _file: File,
    path: PathBuf,
}

impl RootLock {
    /// Takes the lock on root `name`, waiting up to `wait` for a holder to let go (an agent of
    /// the same work dir shutting down, or a sweep). Errors say who holds it.
    pub fn acquire(dir: &Path, name: &str, wait: Duration) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{name}.lock"));
        let deadline = Instant::now() + wait;
        loop {
            match Self::try_take(&path)? {
                Some(lock) => return Ok(lock),
                None if Instant::now() >= deadline => {
                    return Err(io::Error::new(
                        io::ErrorKind::WouldBlock,
                        format!(
                            "{} is locked: another agent with the same work directory is running",
                            path.display()
                        ),
                    ));
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Takes the lock on root `name` if nobody holds it: `Ok(None)` means the root is in use.
    pub fn try_unused(dir: &Path, name: &str) -> io::Result<Option<Self>> {
        Self::try_take(&dir.join(format!("{name}.lock")))
    }

    fn try_take(path: &Path) -> io::Result<Option<Self>> {
        for _ in 0..100 {
            let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => return Ok(None),
                Err(TryLockError::Error(e)) => return Err(e),
            }
            // The previous holder may have unlinked the file between our open and our lock.
            let held = file.metadata()?;
            match std::fs::metadata(path) {
                Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => {
                    return Ok(Some(Self { _file: file, path: path.to_path_buf() }));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other(format!("{} keeps being replaced", path.display())))
    }
}

impl Drop for RootLock {
    fn drop(&mut self) {
        // Unlink while still holding the lock; the lock goes with the file descriptor.
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_root_is_in_use_until_dropped() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("locks");
        let a = RootLock::acquire(&dir, "agora-1", Duration::ZERO).expect("first");
        assert!(RootLock::try_unused(&dir, "agora-1").expect("try").is_none(), "held lock seen as unused");
        let e = RootLock::acquire(&dir, "agora-1", Duration::from_millis(50)).expect_err("second");
        assert!(e.to_string().contains("another agent with the same work directory"), "{e}");
        assert!(RootLock::try_unused(&dir, "agora-2").expect("try").is_some(), "other name");
        drop(a);
        assert!(!dir.join("agora-1.lock").exists(), "lock file left");
        let sweep = RootLock::try_unused(&dir, "agora-1").expect("try").expect("unused after drop");
        // An agent starting while a sweep holds the lock waits for it.
        let waiter = std::thread::spawn({
            let dir = dir.clone();
            move || RootLock::acquire(&dir, "agora-1", Duration::from_secs(5)).map(|_| ())
        });
        std::thread::sleep(Duration::from_millis(60));
        drop(sweep);
        waiter.join().expect("join").expect("acquired after the sweep");
    }
}
