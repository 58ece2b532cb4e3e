//! The agent's artifact cache, and placing fetched files in sandboxes.

use super::*;

// ---------------------------------------------------------------------------------------------
// Artifacts

/// Why an artifact could not be fetched or placed in a sandbox. The text is the message of the
/// task's status update.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The agent is stopping: no fetch is started.
    #[error("the agent is shutting down")]
    ShuttingDown,
    /// The agent had no connection to the master for this long.
    #[error("no connection to the master for {0:?}")]
    NoConnection(Duration),
    /// A file of the cache or the sandbox could not be used.
    #[error("cannot {op} {}: {err}", path.display())]
    File {
        /// What was done (`create`, `open`, `read`, `write`, `stat`).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        err: std::io::Error,
    },
    /// The master did not send the artifact.
    #[error("cannot fetch artifact {digest} from the master: {err}")]
    Fetch {
        /// The artifact.
        digest: Digest,
        /// The cause (boxed: it is large, and rare).
        #[source]
        err: Box<agora_sdk::client::ClientError>,
    },
    /// A file could not be given to the task user.
    #[error("cannot hand {} to the task user: {err}", path.display())]
    Chown {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        err: std::io::Error,
    },
    /// The cached copy's bytes do not hash to the digest asked for (it was removed).
    #[error("artifact {digest} for `{}` does not match its digest (got {got}): refused", path.display())]
    Mismatch {
        /// The digest asked for.
        digest: Digest,
        /// Where the copy was to go.
        path: PathBuf,
        /// The digest of the bytes read.
        got: Digest,
    },
    /// A fetch path is absolute or climbs out of the sandbox.
    #[error("fetch path `{0}` must be relative, without `..`")]
    BadPath(String),
    /// The blocking copy panicked or was cancelled.
    #[error(transparent)]
    Join(#[from] tokio::task::JoinError),
}

impl FetchError {
    fn file<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Self + 'a {
        move |err| FetchError::File { op, path: path.to_path_buf(), err }
    }
}

/// The agent's artifact cache, filled from the master by digest.
#[derive(Debug)]
pub struct Fetcher {
    pub(super) dir: PathBuf,
    pub(super) conn: watch::Receiver<Option<quinn::Connection>>,
    pub(super) inflight: Mutex<HashMap<Digest, Arc<OnceCell<PathBuf>>>>,
    /// Artifacts known to be in the cache: later launches need no file system call.
    pub(super) present: Mutex<HashMap<Digest, PathBuf>>,
    /// When each digest was last asked for, for the cache's LRU eviction (`crate::cache`).
    pub(super) used: Mutex<HashMap<String, std::time::SystemTime>>,
}

impl Fetcher {
    /// A cache in `dir`, fetching over whatever connection `conn` holds.
    pub fn new(dir: PathBuf, conn: watch::Receiver<Option<quinn::Connection>>) -> Self {
        Self {
            dir,
            conn,
            inflight: Mutex::new(HashMap::new()),
            present: Mutex::new(HashMap::new()),
            used: Mutex::new(HashMap::new()),
        }
    }

    /// Digests being fetched now (never evicted).
    pub fn fetching(&self) -> Vec<String> {
        let map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        map.keys().map(|d| d.as_str().to_string()).collect()
    }

    /// When each digest was last asked for since the agent started.
    pub fn last_used(&self) -> HashMap<String, std::time::SystemTime> {
        self.used.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Evicts `digest` with `remove` (which deletes its files) unless it was asked for since
    /// `cutoff` or is being fetched; returns whether it did. A launch asking for it meanwhile
    /// waits for the lock, then finds it gone and fetches it again.
    pub fn evict(&self, digest: &str, cutoff: std::time::SystemTime, remove: &mut dyn FnMut()) -> bool {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        if used.get(digest).is_some_and(|t| *t >= cutoff) {
            return false;
        }
        if self.inflight.lock().unwrap_or_else(|p| p.into_inner()).keys().any(|d| d.as_str() == digest) {
            return false;
        }
        self.present.lock().unwrap_or_else(|p| p.into_inner()).retain(|d, _| d.as_str() != digest);
        used.remove(digest);
        remove();
        true
    }

    /// The local path of `digest` if this agent already holds it (no I/O).
    pub fn cached(&self, digest: &Digest) -> Option<PathBuf> {
        self.present.lock().unwrap_or_else(|p| p.into_inner()).get(digest).cloned()
    }

    pub(super) fn remember(&self, digest: &Digest, path: &Path) {
        self.present.lock().unwrap_or_else(|p| p.into_inner()).insert(digest.clone(), path.to_path_buf());
    }

    pub(super) fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("sha256").join(digest.as_str())
    }

    /// The local path of artifact `digest`, fetching it first if needed. Concurrent callers
    /// for one digest share one fetch; a failed fetch is retried by the next caller.
    pub async fn get(&self, digest: &Digest) -> Result<PathBuf, FetchError> {
        let now = std::time::SystemTime::now();
        self.used.lock().unwrap_or_else(|p| p.into_inner()).insert(digest.as_str().to_string(), now);
        if let Some(path) = self.cached(digest) {
            return Ok(path);
        }
        let path = self.path(digest);
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            self.remember(digest, &path);
            return Ok(path);
        }
        let cell = {
            let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(digest.clone()).or_default().clone()
        };
        let got = cell
            .get_or_try_init(|| async {
                let conn = self.connection().await?;
                if let Some(parent) = path.parent() {
                    tokio::fs::create_dir_all(parent).await.map_err(FetchError::file("create", parent))?;
                }
                let started = Instant::now();
                let size = agora_sdk::artifacts::fetch(&conn, digest, &path, MAX_FETCH_BYTES)
                    .await
                    .map_err(|err| FetchError::Fetch { digest: digest.clone(), err: Box::new(err) })?;
                tracing::info!(%digest, size, elapsed = ?started.elapsed(), "fetched artifact");
                metrics::counter!("agora_agent_artifact_fetches_total").increment(1);
                Ok::<_, FetchError>(path.clone())
            })
            .await
            .cloned();
        if let Ok(path) = &got {
            // Later callers find the file; the cell is not needed any more.
            self.remember(digest, path);
            self.inflight.lock().unwrap_or_else(|p| p.into_inner()).remove(digest);
        }
        got
    }

    pub(super) async fn connection(&self) -> Result<quinn::Connection, FetchError> {
        let mut rx = self.conn.clone();
        let wait = async {
            rx.wait_for(|c| c.as_ref().is_some_and(|c| c.close_reason().is_none())).await.map(|c| c.clone())
        };
        match tokio::time::timeout(FETCH_CONNECT_WAIT, wait).await {
            Ok(Ok(Some(c))) => Ok(c),
            Ok(_) => Err(FetchError::ShuttingDown),
            Err(_) => Err(FetchError::NoConnection(FETCH_CONNECT_WAIT)),
        }
    }
}

/// Gives `dir` and everything below it to `user` (blocking; links are not followed).
pub(super) fn chown_tree(dir: &Path, user: crate::user::TaskUser) -> Result<(), FetchError> {
    let meta = std::fs::symlink_metadata(dir).map_err(FetchError::file("stat", dir))?;
    std::os::unix::fs::lchown(dir, Some(user.uid), Some(user.gid))
        .map_err(|err| FetchError::Chown { path: dir.to_path_buf(), err })?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(dir).map_err(FetchError::file("read", dir))? {
            let entry = entry.map_err(FetchError::file("read", dir))?;
            chown_tree(&entry.path(), user)?;
        }
    }
    Ok(())
}

/// Why a shipped directory could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub(super) enum UnpackError {
    /// It would not fit in what is left of the task's disk: nothing more was written.
    #[error(
        "the shipped directory does not fit in the task's disk: `{name}` would take it past {} \
         ({} already unpacked); ask for more --disk",
        agora_sdk::units::format_size(*budget),
        agora_sdk::units::format_size(*used)
    )]
    TooBig {
        /// The entry that would pass the budget.
        name: String,
        /// The budget, in bytes.
        budget: u64,
        /// What was unpacked before it, in bytes.
        used: u64,
    },
    /// The sandbox is unwritable, or its files cannot be given to the task user.
    #[error(transparent)]
    Failed(#[from] FetchError),
    /// The archive is unreadable.
    #[error("unreadable archive: {0}")]
    Archive(#[source] std::io::Error),
    /// An entry of the archive is unreadable.
    #[error("unreadable archive entry: {0}")]
    Entry(#[source] std::io::Error),
    /// An entry could not be written.
    #[error("cannot unpack into {}: {err}", path.display())]
    Unpack {
        /// The directory unpacked into.
        path: PathBuf,
        /// The cause.
        #[source]
        err: std::io::Error,
    },
}

/// What an archive entry of `size` bytes takes on disk, as the disk check counts it: whole
/// 4 KiB blocks, at least one (so a flood of empty files counts too).
fn entry_cost(size: u64) -> u64 {
    const BLOCK: u64 = 4096;
    size.div_ceil(BLOCK).max(1).saturating_mul(BLOCK)
}

/// Unpacks a tar archive into `dest` (blocking), writing at most `budget` bytes (counted as
/// [`entry_cost`]); returns what it wrote. The entry that would pass the budget is refused
/// before any of it is written: the unpacker stops at the limit, not after it. Entries cannot
/// escape `dest`: the tar crate refuses `..` and absolute paths, and the guest's view is
/// confined to the preopen anyway.
pub(super) fn unpack(archive: &Path, dest: &Path, budget: Option<u64>) -> Result<u64, UnpackError> {
    std::fs::create_dir_all(dest).map_err(FetchError::file("create", dest))?;
    let file = std::fs::File::open(archive).map_err(FetchError::file("open", archive))?;
    let mut ar = tar::Archive::new(std::io::BufReader::new(file));
    ar.set_preserve_permissions(false);
    ar.set_unpack_xattrs(false);
    ar.set_overwrite(true);
    let mut used = 0u64;
    for entry in ar.entries().map_err(UnpackError::Archive)? {
        let mut entry = entry.map_err(UnpackError::Entry)?;
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_dir()) {
            // Links and devices are not shipped: a symlink could point anywhere on the node.
            let name = entry.path().map(|p| p.display().to_string()).unwrap_or_default();
            tracing::debug!(%name, ?kind, "skipping a non-file archive entry");
            continue;
        }
        // The header's size is what the tar crate writes (it reads exactly that many bytes).
        let cost = entry_cost(entry.header().size().unwrap_or(u64::MAX));
        if let Some(budget) = budget {
            if used.saturating_add(cost) > budget {
                let name = entry.path().map(|p| p.display().to_string()).unwrap_or_default();
                return Err(UnpackError::TooBig { name, budget, used });
            }
        }
        used = used.saturating_add(cost);
        entry.unpack_in(dest).map_err(|err| UnpackError::Unpack { path: dest.to_path_buf(), err })?;
    }
    Ok(used)
}

/// Copies fetched artifact `f` from the agent's cache into `sandbox`, hashing the bytes on the
/// way: a copy whose sha256 is not the digest asked for is removed and refused (a corrupted or
/// tampered cache never reaches an executor). The file is the task user's, 0755 or 0644.
pub(super) async fn place_fetched(
    fetcher: &Fetcher,
    f: &FetchInfo,
    sandbox: &Path,
    user: Option<crate::user::TaskUser>,
) -> Result<(), FetchError> {
    let cached = fetcher.get(&f.artifact.digest).await?;
    let rel = relative_path(&f.path)?;
    let dest = sandbox.join(rel);
    let (digest, want, mode) =
        (f.artifact.digest.clone(), dest.clone(), if f.executable { 0o755 } else { 0o644 });
    tokio::task::spawn_blocking(move || -> Result<(), FetchError> {
        use sha2::Digest as _;
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(parent) = want.parent() {
            crate::sandbox::create_sandbox(parent, user).map_err(FetchError::file("create", parent))?;
        }
        let mut src = std::fs::File::open(&cached).map_err(FetchError::file("open", &cached))?;
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&want)
            .map_err(FetchError::file("create", &want))?;
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = src.read(&mut buf).map_err(FetchError::file("read", &cached))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(FetchError::file("write", &want))?;
        }
        let got = Digest::from_hasher(hasher);
        if got != digest {
            drop(out);
            let _ = std::fs::remove_file(&want);
            return Err(FetchError::Mismatch { digest, path: want, got });
        }
        if let Some(u) = user {
            u.chown(&want).map_err(|err| FetchError::Chown { path: want.clone(), err })?;
        }
        Ok(())
    })
    .await??;
    tracing::info!(digest = %f.artifact.digest, path = %dest.display(), "placed a fetched artifact in an executor's sandbox");
    Ok(())
}

/// Cuts `s` to at most `max` bytes, on a character boundary.
pub(super) fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// A path inside a sandbox: relative, without `..`.
pub(super) fn relative_path(p: &str) -> Result<PathBuf, FetchError> {
    let path = Path::new(p);
    if p.is_empty()
        || p.contains('\0')
        || path.is_absolute()
        || path
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir))
    {
        return Err(FetchError::BadPath(p.to_string()));
    }
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    fn archive(dir: &Path, files: &[(&str, usize)]) -> PathBuf {
        let path = dir.join("a.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&path).expect("create"));
        for (name, len) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(*len as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, std::io::repeat(b'x').take(*len as u64)).expect("append");
        }
        b.finish().expect("finish");
        path
    }

    #[test]
    fn unpacking_stops_before_the_entry_that_passes_the_budget() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ar = archive(dir.path(), &[("small", 100), ("big", 3 << 20), ("after", 10)]);
        let dest = dir.path().join("out");
        let err = unpack(&ar, &dest, Some(1 << 20)).expect_err("too big");
        assert!(matches!(&err, UnpackError::TooBig { name, .. } if name == "big"), "{err}");
        assert!(dest.join("small").exists());
        assert!(
            !dest.join("big").exists() && !dest.join("after").exists(),
            "nothing past the limit is written"
        );
        // Within the budget, or without one, everything is unpacked and counted in blocks.
        let dest = dir.path().join("all");
        assert_eq!(unpack(&ar, &dest, Some(4 << 20)).ok(), Some(4096 + (3 << 20) + 4096));
        assert_eq!(std::fs::metadata(dest.join("big")).expect("big").len(), 3 << 20);
        assert!(unpack(&ar, &dir.path().join("free"), None).is_ok());
    }
}

#[cfg(test)]
#[path = "fetch_fuzz.rs"]
mod fuzz;
