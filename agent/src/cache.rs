//! The bound on the agent's caches (`--cache-size`): fetched artifacts
//! (`WORK/artifacts/sha256/<digest>`) and the modules the Wasm executor compiled from them
//! (`WORK/wasm-cache/<engine>/<digest>.cwasm`), counted together. When they hold more, the
//! least recently used digests go first (artifact and compiled module together), never one a
//! live task refers to (its module, shipped directories or executor files), one being fetched,
//! or one used within [`RECENT`] (a launch may have been handed its path and not opened it
//! yet). What is evicted is fetched again from the master when a task needs it.
//!
//! "Used" is the agent's own record of when a launch last asked for the digest, and for
//! digests not asked for since the agent started, the file's modification time.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use agora_sdk::proto::{TaskInfo, TaskKind};

/// Default of `--cache-size`.
pub const DEFAULT_CACHE_SIZE: u64 = 2 << 30;
/// A digest used this recently is never evicted.
pub const RECENT: Duration = Duration::from_secs(60);

/// The digests a task refers to (what its launch fetches).
pub fn digests_of(task: &TaskInfo) -> Vec<String> {
    match &task.kind {
        TaskKind::Command(_) => Vec::new(),
        TaskKind::Wasm(w) => std::iter::once(w.module.digest.as_str().to_string())
            .chain(w.dirs.iter().map(|d| d.archive.digest.as_str().to_string()))
            .collect(),
        TaskKind::Executor(e) => {
            e.executor.fetch.iter().map(|f| f.artifact.digest.as_str().to_string()).collect()
        }
    }
}

/// One cached file.
#[derive(Clone, Debug)]
struct Cached {
    path: PathBuf,
    digest: String,
    bytes: u64,
    modified: SystemTime,
}

fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Every cached file below `artifacts` (`sha256/<digest>`) and `compiled`
/// (`<engine>/<digest>.cwasm`). Partial downloads and anything else are left out (and alone).
fn scan(artifacts: &Path, compiled: &Path) -> io::Result<Vec<Cached>> {
    let mut out = Vec::new();
    let mut add = |dir: &Path, strip: &str| -> io::Result<()> {
        let rd = match std::fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(digest) = name.strip_suffix(strip) else { continue };
            let Ok(meta) = entry.metadata() else { continue };
            if !is_digest(digest) || !meta.is_file() {
                continue;
            }
            use std::os::unix::fs::MetadataExt;
            out.push(Cached {
                path: entry.path(),
                digest: digest.to_string(),
                bytes: meta.blocks() * 512,
                modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            });
        }
        Ok(())
    };
    add(&artifacts.join("sha256"), "")?;
    if let Ok(engines) = std::fs::read_dir(compiled) {
        for e in engines.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                add(&e.path(), ".cwasm")?;
            }
        }
    }
    Ok(out)
}

/// What an eviction did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Evicted {
    /// The digests removed (artifact and compiled module alike).
    pub digests: Vec<String>,
    /// Bytes freed.
    pub bytes: u64,
    /// Bytes still cached.
    pub left: u64,
}

/// Brings the caches below `max` bytes (blocking): least recently used digests first (by
/// `used`, else the newest modification time of their files), skipping those in `keep` and
/// those used since `cutoff`. Each digest goes through `evict_one(digest, remove)`,
/// which calls `remove` (deleting its files) and returns `true` unless it must stay after all
/// (the fetcher's last word: a launch asked for it meanwhile).
pub fn evict(
    artifacts: &Path,
    compiled: &Path,
    max: u64,
    keep: &HashSet<String>,
    used: &HashMap<String, SystemTime>,
    cutoff: SystemTime,
    mut evict_one: impl FnMut(&str, &mut dyn FnMut()) -> bool,
) -> io::Result<Evicted> {
    let files = scan(artifacts, compiled)?;
    let total: u64 = files.iter().map(|f| f.bytes).sum();
    let mut out = Evicted { left: total, ..Evicted::default() };
    if total <= max {
        return Ok(out);
    }
    let mut by_digest: HashMap<String, (SystemTime, u64, Vec<PathBuf>)> = HashMap::new();
    for f in files {
        let e = by_digest.entry(f.digest.clone()).or_insert((SystemTime::UNIX_EPOCH, 0, Vec::new()));
        e.0 = e.0.max(f.modified);
        e.1 += f.bytes;
        e.2.push(f.path);
    }
    let mut candidates: Vec<(SystemTime, String, u64, Vec<PathBuf>)> = by_digest
        .into_iter()
        .map(|(d, (modified, bytes, paths))| (used.get(&d).copied().unwrap_or(modified), d, bytes, paths))
        .filter(|(last, d, _, _)| !keep.contains(d) && *last < cutoff)
        .collect();
    candidates.sort();
    for (_, digest, bytes, paths) in candidates {
        if out.left <= max {
            break;
        }
        let mut remove = || {
            for p in &paths {
                match std::fs::remove_file(p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => tracing::warn!(path = %p.display(), error = %e, "cannot evict a cached file"),
                }
            }
        };
        if !evict_one(&digest, &mut remove) {
            continue;
        }
        out.left = out.left.saturating_sub(bytes);
        out.bytes += bytes;
        out.digests.push(digest);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(path: &Path, len: usize, age: Duration) {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, vec![1u8; len]).expect("write");
        let f = std::fs::File::options().write(true).open(path).expect("open");
        f.set_modified(SystemTime::now() - age).expect("mtime");
    }

    #[test]
    fn least_recently_used_unreferenced_digests_go_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (arts, compiled) = (dir.path().join("artifacts"), dir.path().join("wasm-cache"));
        let d = |c: char| c.to_string().repeat(64);
        let hour = Duration::from_secs(3600);
        // a: oldest but referenced; b: old, with its compiled module; c: newer; e: used lately.
        put(&arts.join("sha256").join(d('a')), 100 << 10, hour * 5);
        put(&arts.join("sha256").join(d('b')), 100 << 10, hour * 4);
        put(&compiled.join("engine1").join(format!("{}.cwasm", d('b'))), 100 << 10, hour * 4);
        put(&arts.join("sha256").join(d('c')), 100 << 10, hour * 3);
        put(&arts.join("sha256").join(d('e')), 100 << 10, hour * 6);
        // Not a digest (a partial download): never counted nor touched.
        put(&arts.join("sha256").join(format!("{}.part", d('f'))), 500 << 10, hour * 9);
        let keep: HashSet<String> = [d('a')].into();
        let used: HashMap<String, SystemTime> = [(d('e'), SystemTime::now())].into();
        let mut forgotten = Vec::new();
        let now = SystemTime::now();
        let out = evict(&arts, &compiled, 300 << 10, &keep, &used, now - RECENT, |x, remove| {
            forgotten.push(x.to_string());
            remove();
            true
        })
        .expect("evict");
        assert_eq!(out.digests, vec![d('b')], "{out:?}");
        assert_eq!(forgotten, out.digests);
        assert!(out.left <= 300 << 10, "{out:?}");
        assert!(!arts.join("sha256").join(d('b')).exists());
        assert!(!compiled.join("engine1").join(format!("{}.cwasm", d('b'))).exists());
        for c in ['a', 'c', 'e'] {
            assert!(arts.join("sha256").join(d(c)).exists(), "{c} stays");
        }
        assert!(arts.join("sha256").join(format!("{}.part", d('f'))).exists());
        // Down to nothing: everything unreferenced and not recent goes, oldest first.
        let all = |_: &str, remove: &mut dyn FnMut()| {
            remove();
            true
        };
        let out = evict(&arts, &compiled, 0, &keep, &used, now - RECENT, all).expect("evict");
        assert_eq!(out.digests, vec![d('c')]);
        assert!(arts.join("sha256").join(d('a')).exists() && arts.join("sha256").join(d('e')).exists());
        // Under the bound nothing is touched.
        let out = evict(&arts, &compiled, 1 << 30, &HashSet::new(), &HashMap::new(), now - RECENT, all)
            .expect("evict");
        assert!(out.digests.is_empty());
    }
}
