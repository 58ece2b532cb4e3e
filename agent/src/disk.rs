//! Disk limits of running tasks, checked periodically as Mesos's `disk/du` isolator does.
//!
//! Every `--disk-check-interval` the agent walks the sandbox of each running command or Wasm
//! task on its blocking pool ([`check`]):
//! - first each output file (`stdout`, `stderr`) larger than `--max-output-size` loses its
//!   head ([`cap_output`]): the bytes before the last half of the cap are deallocated in place
//!   (`fallocate(PUNCH_HOLE)`), so the file keeps its length and every later byte its offset.
//!   A task writes straight to these files and an output follower reads them by offset; a
//!   hole keeps both simple: nothing is renamed under either, and a reader whose offset lies
//!   in the dropped head goes on from the first byte kept (see [`crate::output::copy_output`]);
//! - then the sandbox's allocated size is measured ([`sandbox_usage`]: like `du`, blocks
//!   actually allocated, links not followed, one file system, hard links counted once, at most
//!   [`MAX_WALK_ENTRIES`] entries) and compared with the task's `disk`. A sandbox over its
//!   limit (or with more entries than a walk may visit) gets its task killed; the task ends
//!   TASK_FAILED with reason [`Reason::DiskLimitExceeded`](agora_sdk::Reason::DiskLimitExceeded) and a message giving the
//!   usage and the limit.
//!
//! A Wasm task's shipped directories are unpacked inside its sandbox (`mnt/`), so they count
//! too, and their unpacking already stops at the limit (`executors::fetch::unpack`).
//!
//! A task without a `disk` resource is limited by `--default-task-disk` when the agent has
//! one, and not at all otherwise (Mesos's behaviour). Its output is capped either way.
//! Tasks of frameworks' own executors share their executor's sandbox: it is held to the sum
//! of the executor's `disk` and its live tasks' (Mesos's container limit), and over it every
//! task of the executor is killed and the executor shut down.
//!
//! The check is periodic: a task can overshoot its limit by what it writes in one interval
//! before it is killed. A filesystem quota would be exact; this works on any file system.

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agora_sdk::proto::TaskKey;
use agora_sdk::units::format_size;

/// Default of `--disk-check-interval`.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// Default of `--max-output-size` (per stream).
pub const DEFAULT_MAX_OUTPUT_SIZE: u64 = 64 << 20;
/// Smallest `--max-output-size`: the head is dropped in whole [`PUNCH_ALIGN`] pieces.
pub const MIN_OUTPUT_SIZE: u64 = 4 * PUNCH_ALIGN;
/// Most entries (files, directories, links) one sandbox walk visits. A sandbox with more is
/// over its limit whatever their size: the walk's cost stays bounded and a task cannot hide
/// its bytes behind a million empty files.
pub const MAX_WALK_ENTRIES: u64 = 200_000;
/// Holes are punched in multiples of this (a multiple of every common block size), so a
/// partly punched block never reads as zeros.
const PUNCH_ALIGN: u64 = 64 << 10;
/// The output files of a sandbox.
pub const OUTPUT_FILES: [&str; 2] = ["stdout", "stderr"];

/// How the agent limits its tasks' disk (`--disk-check-interval`, `--default-task-disk`,
/// `--max-output-size`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// How often every running task's sandbox is measured.
    pub check_interval: Duration,
    /// The limit of a task that asks for no `disk` (`None`: no limit).
    pub default_task_disk: Option<u64>,
    /// Most bytes kept of each of a task's output streams; the head goes first.
    pub max_output_size: u64,
    /// Most bytes of fetched artifacts and compiled modules kept (`--cache-size`; `None`: no
    /// bound), see [`crate::cache`].
    pub cache_size: Option<u64>,
    /// A cached digest asked for this recently is never evicted (default
    /// [`crate::cache::RECENT`]; shorter in tests).
    pub cache_grace: Duration,
}

impl Default for DiskConfig {
    fn default() -> Self {
        Self {
            check_interval: DEFAULT_CHECK_INTERVAL,
            default_task_disk: None,
            max_output_size: DEFAULT_MAX_OUTPUT_SIZE,
            cache_size: Some(crate::cache::DEFAULT_CACHE_SIZE),
            cache_grace: crate::cache::RECENT,
        }
    }
}

/// A `--max-output-size` or `--disk-check-interval` out of range.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiskConfigError {
    /// The output cap is too small to keep anything useful.
    #[error("--max-output-size must be at least {} (it is {})", format_size(MIN_OUTPUT_SIZE), format_size(*.0))]
    OutputSize(u64),
    /// A zero interval would walk sandboxes in a loop.
    #[error("--disk-check-interval must be more than zero")]
    Interval,
}

impl DiskConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), DiskConfigError> {
        if self.max_output_size < MIN_OUTPUT_SIZE {
            return Err(DiskConfigError::OutputSize(self.max_output_size));
        }
        if self.check_interval.is_zero() {
            return Err(DiskConfigError::Interval);
        }
        Ok(())
    }

    /// The disk limit of a task asking for `disk` bytes (0: none asked).
    pub fn limit_for(&self, disk: u64) -> Option<u64> {
        if disk > 0 {
            Some(disk)
        } else {
            self.default_task_disk
        }
    }
}

/// What one sandbox walk found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes allocated on disk (what `du` reports).
    pub bytes: u64,
    /// Entries visited.
    pub entries: u64,
    /// The walk stopped at [`MAX_WALK_ENTRIES`]: there is more.
    pub truncated: bool,
}

/// Measures what `dir` takes on disk, as `du -s` would: allocated blocks of everything below
/// it, symbolic links not followed, other file systems (mounts) not entered, hard-linked files
/// counted once. Stops after `max_entries` entries. Entries that vanish meanwhile are skipped.
pub fn sandbox_usage(dir: &Path, max_entries: u64) -> io::Result<Usage> {
    let root = std::fs::symlink_metadata(dir)?;
    let dev = root.dev();
    let mut usage = Usage { bytes: root.blocks() * 512, entries: 1, truncated: false };
    let mut linked: HashSet<u64> = HashSet::new();
    let mut stack: Vec<PathBuf> = if root.is_dir() { vec![dir.to_path_buf()] } else { Vec::new() };
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) if d != dir && e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let Ok(entry) = entry else { continue };
            if usage.entries >= max_entries {
                usage.truncated = true;
                return Ok(usage);
            }
            usage.entries += 1;
            let Ok(meta) = std::fs::symlink_metadata(entry.path()) else { continue };
            if meta.dev() != dev {
                continue;
            }
            if meta.nlink() > 1 && !meta.is_dir() && !linked.insert(meta.ino()) {
                continue;
            }
            usage.bytes = usage.bytes.saturating_add(meta.blocks() * 512);
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(usage)
}

/// Keeps output file `path` within `max` bytes on disk: when more is allocated, the bytes
/// before the last `max / 2` are deallocated (a hole; the file keeps its length). Returns the
/// bytes dropped now. A missing file, or anything that is not a plain file with one link (a
/// task may replace its output by a link to something else), is left alone.
pub fn cap_output(path: &Path, max: u64) -> io::Result<u64> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let file = match std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        // A symbolic link (ELOOP) or a FIFO without reader (ENXIO): not an output file.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENXIO)) => return Ok(0),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.is_file() || meta.nlink() != 1 || meta.blocks() * 512 <= max {
        return Ok(0);
    }
    let fd = file.as_raw_fd();
    let end = meta.len().saturating_sub(max / 2) / PUNCH_ALIGN * PUNCH_ALIGN;
    // SAFETY: plain system calls on a descriptor this function owns.
    let start = unsafe { libc::lseek(fd, 0, libc::SEEK_DATA) };
    let start = if start < 0 { meta.len() } else { start as u64 };
    if end <= start {
        return Ok(0);
    }
    let len = libc::off_t::try_from(end).map_err(io::Error::other)?;
    // SAFETY: as above.
    let r = unsafe { libc::fallocate(fd, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 0, len) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(end - start)
}

/// Where the first byte still stored at or after `offset` is in `file` (the start of the data
/// after a dropped head); `offset` itself on file systems without holes.
/// It moves the descriptor's file position: the caller seeks before it reads again.
pub fn next_data(file: &impl std::os::unix::io::AsRawFd, offset: u64) -> u64 {
    let Ok(off) = libc::off_t::try_from(offset) else { return offset };
    // SAFETY: a plain system call on a borrowed descriptor.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, libc::SEEK_DATA) };
    if r < 0 {
        // ENXIO: only a hole (or nothing) from there; other errors: no hole support.
        return offset;
    }
    (r as u64).max(offset)
}

/// One running task's sandbox to look at.
#[derive(Clone, Debug)]
pub struct Check {
    /// The task.
    pub key: TaskKey,
    /// Its sandbox.
    pub sandbox: PathBuf,
    /// Its disk limit (`None`: only its output is capped).
    pub limit: Option<u64>,
    /// The sandbox is that of this framework executor (of `key`'s framework), shared by its
    /// tasks: over the limit, they all go with it.
    pub executor: Option<agora_sdk::proto::ExecutorId>,
}

/// What [`check`] found for one task.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The task.
    pub key: TaskKey,
    /// The sandbox's size, when it was measured.
    pub usage: Option<Usage>,
    /// `Some(why)` when the task is over its limit and must be killed.
    pub over: Option<OverLimit>,
    /// As in [`Check::executor`].
    pub executor: Option<agora_sdk::proto::ExecutorId>,
}

/// Caps the output of each task in `checks` and measures the sandboxes that have a limit
/// (blocking: run on the blocking pool).
pub fn check(checks: Vec<Check>, max_output: u64) -> Vec<Outcome> {
    checks
        .into_iter()
        .map(|c| {
            for name in OUTPUT_FILES {
                let path = c.sandbox.join(name);
                match cap_output(&path, max_output) {
                    Ok(0) => {}
                    Ok(n) => {
                        metrics::counter!(crate::metrics::OUTPUT_BYTES_DROPPED).increment(n);
                        tracing::debug!(task_id = %c.key.task_id, file = name, dropped = n,
                            "dropped the head of a task's output past --max-output-size");
                    }
                    Err(e) => tracing::warn!(task_id = %c.key.task_id, path = %path.display(), error = %e,
                        "cannot drop the head of a task's output"),
                }
            }
            let Some(limit) = c.limit else {
                return Outcome { key: c.key, usage: None, over: None, executor: c.executor };
            };
            match sandbox_usage(&c.sandbox, MAX_WALK_ENTRIES) {
                Ok(u) => {
                    let over = verdict(&u, limit);
                    Outcome { key: c.key, usage: Some(u), over, executor: c.executor }
                }
                Err(e) => {
                    if e.kind() != io::ErrorKind::NotFound {
                        tracing::warn!(task_id = %c.key.task_id, sandbox = %c.sandbox.display(), error = %e,
                            "cannot measure a task's sandbox");
                    }
                    Outcome { key: c.key, usage: None, over: None, executor: c.executor }
                }
            }
        })
        .collect()
}

/// How a task's sandbox breaks its disk limit. The text is the message of the task's
/// TASK_FAILED.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OverLimit {
    /// The walk stopped at [`MAX_WALK_ENTRIES`]: too many entries to measure.
    #[error(
        "the task's sandbox holds more than {MAX_WALK_ENTRIES} files and directories (its disk limit is {})",
        format_size(*limit)
    )]
    Entries {
        /// The task's disk limit, in bytes.
        limit: u64,
    },
    /// The sandbox takes more than the limit.
    #[error("the task's sandbox uses {} on disk, more than its disk limit of {}", format_size(*used), format_size(*limit))]
    Bytes {
        /// What it takes, in bytes.
        used: u64,
        /// The task's disk limit, in bytes.
        limit: u64,
    },
}

/// How a task whose sandbox is `u` breaks `limit`, if it does.
pub fn verdict(u: &Usage, limit: u64) -> Option<OverLimit> {
    if u.truncated {
        Some(OverLimit::Entries { limit })
    } else if u.bytes > limit {
        Some(OverLimit::Bytes { used: u.bytes, limit })
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(path: &Path, len: usize) {
        let mut f = std::fs::File::create(path).expect("create");
        let chunk = vec![b'x'; 64 << 10];
        let mut left = len;
        while left > 0 {
            let n = left.min(chunk.len());
            f.write_all(&chunk[..n]).expect("write");
            left -= n;
        }
        f.sync_all().expect("sync");
    }

    #[test]
    fn usage_counts_allocated_bytes_once_and_follows_no_link() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sb = dir.path().join("sb");
        std::fs::create_dir_all(sb.join("a/b")).expect("mkdir");
        write(&sb.join("a/b/big"), 1 << 20);
        std::fs::hard_link(sb.join("a/b/big"), sb.join("again")).expect("link");
        // A link to something large outside is not followed.
        write(&dir.path().join("outside"), 2 << 20);
        std::os::unix::fs::symlink(dir.path().join("outside"), sb.join("out")).expect("symlink");
        std::os::unix::fs::symlink(dir.path(), sb.join("up")).expect("symlink");
        let u = sandbox_usage(&sb, MAX_WALK_ENTRIES).expect("usage");
        assert!(!u.truncated);
        assert!(u.bytes >= 1 << 20 && u.bytes < (3 << 20) / 2, "{u:?}");
        assert_eq!(verdict(&u, 1 << 20).is_some(), u.bytes > 1 << 20);
        assert!(verdict(&u, 4 << 20).is_none());
        // A sparse file counts what it allocates, not its length.
        let f = std::fs::File::create(sb.join("sparse")).expect("create");
        f.set_len(1 << 30).expect("set_len");
        assert!(sandbox_usage(&sb, MAX_WALK_ENTRIES).expect("usage").bytes < 2 << 20);
    }

    #[test]
    fn a_walk_stops_at_its_entry_cap_and_that_breaks_any_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        for i in 0..20 {
            std::fs::File::create(dir.path().join(format!("f{i}"))).expect("create");
        }
        let u = sandbox_usage(dir.path(), 10).expect("usage");
        assert!(u.truncated && u.entries == 10, "{u:?}");
        let msg = verdict(&u, 1 << 30).expect("over").to_string();
        assert!(msg.contains("more than"), "{msg}");
    }

    #[test]
    fn capped_output_keeps_its_tail_and_offsets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("stdout");
        // Distinct bytes per 64 KiB piece, to tell which part is kept.
        let mut f = std::fs::File::create(&path).expect("create");
        for i in 0..64u8 {
            f.write_all(&vec![b'a' + (i % 26); 64 << 10]).expect("write");
        }
        f.sync_all().expect("sync");
        let len = 64u64 << 16;
        let max = 1u64 << 20;
        let dropped = cap_output(&path, max).expect("cap");
        assert!(dropped > 0, "the head goes");
        let meta = std::fs::metadata(&path).expect("stat");
        assert_eq!(meta.len(), len, "the file keeps its length");
        assert!(meta.blocks() * 512 <= max, "{} bytes allocated", meta.blocks() * 512);
        let file = std::fs::File::open(&path).expect("open");
        let start = next_data(&file, 0);
        assert_eq!(start, dropped);
        assert!(len - start >= max / 2, "at least half the cap is kept");
        let bytes = std::fs::read(&path).expect("read");
        assert_eq!(bytes[bytes.len() - 1], b'a' + (63 % 26), "the tail is intact");
        assert_eq!(bytes[start as usize], b'a' + ((start >> 16) % 26) as u8, "offsets are unchanged");
        // Under the cap: nothing more goes; a link is never touched.
        assert_eq!(cap_output(&path, max).expect("cap"), 0);
        std::os::unix::fs::symlink(&path, dir.path().join("stderr")).expect("symlink");
        assert_eq!(cap_output(&dir.path().join("stderr"), 1).expect("cap"), 0);
        assert_eq!(cap_output(&dir.path().join("missing"), 1).expect("cap"), 0);
    }

    #[test]
    fn config_bounds() {
        assert!(DiskConfig::default().validate().is_ok());
        let small = DiskConfig { max_output_size: 1000, ..DiskConfig::default() };
        assert_eq!(small.validate(), Err(DiskConfigError::OutputSize(1000)));
        let cfg = DiskConfig { default_task_disk: Some(5), ..DiskConfig::default() };
        assert_eq!((cfg.limit_for(0), cfg.limit_for(7)), (Some(5), Some(7)));
        assert_eq!(DiskConfig::default().limit_for(0), None);
    }

    /// By hand: what one walk of a sandbox at the entry cap costs
    /// (`cargo test -p agora-agent --lib disk::tests::walk_cost -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn walk_cost() {
        let dir = tempfile::tempdir().expect("tempdir");
        for d in 0..200 {
            let sub = dir.path().join(format!("d{d}"));
            std::fs::create_dir(&sub).expect("mkdir");
            for f in 0..1000 {
                std::fs::File::create(sub.join(format!("f{f}"))).expect("create");
            }
        }
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let u = sandbox_usage(dir.path(), MAX_WALK_ENTRIES).expect("usage");
            println!("{} entries (truncated: {}) walked in {:?}", u.entries, u.truncated, t.elapsed());
        }
    }
}
