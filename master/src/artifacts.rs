//! The master's content-addressed artifact store: Wasm modules and shipped-directory archives,
//! kept as `<root>/sha256/<hex digest>` (the server roots it at `<work_dir>/artifacts`).
//!
//! An upload is written to a temporary file under `<root>/tmp` while it is hashed, refused as
//! soon as it goes past its declared size, checked (size, sha256, and for a Wasm module the
//! executor's own validator), then published with a hard link, which never replaces a file:
//! concurrent uploads of one digest agree on one file. An artifact is never changed once
//! published, so readers need no coordination with writers.
//!
//! Nothing here touches the master core: the server runs these calls in each stream's own task
//! and tells the core which digests exist.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use ::metrics::{counter, gauge};
use agora_sdk::proto::{ArtifactKind, ArtifactRef, Digest, ErrorCode, UploadRequest};
use agora_sdk::units::format_size;
use sha2::Digest as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tracing::{debug, warn};

use crate::metrics;

/// Largest artifact a master accepts unless configured otherwise (64 MiB).
pub const DEFAULT_MAX_ARTIFACT_SIZE: u64 = 64 << 20;

/// Default of `--artifact-store-size`.
pub const DEFAULT_STORE_SIZE: u64 = 10 << 30;

/// The bound on the store (`agora master --artifact-store-size`): past it, the least recently
/// used artifacts that no live task or executor refers to, and that were not stored or used
/// within `grace`, are evicted (from the core, the registry's index, then the disk).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EvictionConfig {
    /// Most bytes kept (`None`: no bound).
    pub max_bytes: Option<u64>,
    /// An artifact stored or used this recently stays (an upload is followed by its launch).
    pub grace: std::time::Duration,
    /// How often the store is checked.
    pub interval: std::time::Duration,
}

impl Default for EvictionConfig {
    fn default() -> Self {
        Self {
            max_bytes: Some(DEFAULT_STORE_SIZE),
            grace: std::time::Duration::from_secs(600),
            interval: std::time::Duration::from_secs(30),
        }
    }
}
/// Validations of Wasm modules (each reads the whole module into memory) run at once unless
/// configured otherwise ([`ArtifactStore::with_max_validations`]).
pub const DEFAULT_MAX_VALIDATIONS: usize = 2;

/// Read and write granularity of uploads.
const CHUNK: usize = 64 * 1024;

/// Longest artifact name shown in messages (names come from peers).
const MAX_NAME_CHARS: usize = 200;

/// Why an artifact was refused or could not be stored. The messages name the artifact and the
/// problem, and go to the uploader as they are.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("`{shown}` is not a sha256 digest (64 lowercase hex digits)")]
    BadDigest {
        /// The digest as sent (shortened).
        shown: String,
    },
    #[error("{name} is {}, over the master's {} artifact limit", format_size(*size), format_size(*max))]
    TooLarge { name: String, size: u64, max: u64 },
    #[error("{name}: more than the declared {declared} bytes were sent")]
    Overrun { name: String, declared: u64 },
    #[error("{name}: the upload ended after {got} of the declared {declared} bytes")]
    Truncated { name: String, got: u64, declared: u64 },
    #[error("{name}: the bytes hash to {actual}, not to the declared {declared}")]
    DigestMismatch { name: String, declared: Digest, actual: Digest },
    #[error("{name}: {source}")]
    InvalidModule { name: String, source: agora_wasm_validate::ModuleError },
    #[error("{name}: not an executable (an ELF binary or a `#!` script); it starts with {head}")]
    NotExecutable {
        name: String,
        /// Its first bytes, escaped for the message.
        head: String,
    },
    #[error("{name}: receiving the upload failed: {err}")]
    Receive { name: String, err: io::Error },
    #[error("artifact store: cannot {op} {}: {err}", path.display())]
    Io { op: &'static str, path: PathBuf, err: io::Error },
}

impl ArtifactError {
    /// The wire error code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ArtifactError::BadDigest { .. } => ErrorCode::Malformed,
            ArtifactError::TooLarge { .. } | ArtifactError::Overrun { .. } => ErrorCode::TooLarge,
            ArtifactError::Truncated { .. }
            | ArtifactError::DigestMismatch { .. }
            | ArtifactError::InvalidModule { .. }
            | ArtifactError::NotExecutable { .. } => ErrorCode::Invalid,
            ArtifactError::Receive { .. } => ErrorCode::Unexpected,
            ArtifactError::Io { .. } => ErrorCode::Internal,
        }
    }

    fn bad_digest(digest: &Digest) -> Self {
        ArtifactError::BadDigest { shown: digest.as_str().chars().take(80).collect() }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ArtifactError + 'a {
    move |err| ArtifactError::Io { op, path: path.to_path_buf(), err }
}

/// A peer-supplied name made fit for messages and logs: no control characters, bounded length,
/// and never empty.
fn display_name(req: &UploadRequest) -> String {
    let name: String =
        req.name.chars().take(MAX_NAME_CHARS).map(|c| if c.is_control() { '?' } else { c }).collect();
    if name.trim().is_empty() {
        format!("artifact {}", req.digest)
    } else {
        name
    }
}

/// In a store several masters share, a temporary file untouched this long is a leftover of an
/// interrupted upload (uploads write continuously), removed when a master opens the store.
pub const SHARED_TMP_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// The content-addressed store. Shared by the stream tasks behind an `Arc`; every method takes
/// `&self` (the file system is the only state, plus counters).
#[derive(Debug)]
pub struct ArtifactStore {
    root: PathBuf,
    objects: PathBuf,
    tmp: PathBuf,
    max_size: u64,
    count: AtomicUsize,
    next_tmp: AtomicU64,
    /// When each artifact was last stored, found present by an upload or read, since the
    /// master started (older uses: the file's modification time), for LRU eviction. One entry
    /// per stored artifact at most.
    used: std::sync::Mutex<std::collections::HashMap<Digest, std::time::SystemTime>>,
    /// The index of validation results: the kinds each stored digest passed the checks of
    /// (at upload, from the registry's record, or at a first presence check), so that
    /// "already present?" is answered without reading the file again.
    validated: Mutex<HashMap<Digest, HashSet<ArtifactKind>>>,
    /// Bounds the validations running at once (each holds a whole module in memory).
    validations: tokio::sync::Semaphore,
}

impl ArtifactStore {
    /// Opens (creating if needed) the store rooted at `root`, removes temporary files left by
    /// an interrupted upload, and counts the artifacts present. Blocking: call at startup.
    pub fn open(root: &Path, max_size: u64) -> Result<Self, ArtifactError> {
        Self::open_with(root, max_size, false)
    }

    /// Like [`ArtifactStore::open`], for a directory several masters share (`--etcd` on a
    /// shared filesystem): another master may be receiving an upload, so only temporary
    /// files untouched for [`SHARED_TMP_MAX_AGE`] are removed.
    pub fn open_shared(root: &Path, max_size: u64) -> Result<Self, ArtifactError> {
        Self::open_with(root, max_size, true)
    }

    fn open_with(root: &Path, max_size: u64, shared: bool) -> Result<Self, ArtifactError> {
        let objects = root.join("sha256");
        let tmp = root.join("tmp");
        std::fs::create_dir_all(&objects).map_err(io_err("create", &objects))?;
        if shared {
            std::fs::create_dir_all(&tmp).map_err(io_err("create", &tmp))?;
            let entries = std::fs::read_dir(&tmp).map_err(io_err("list", &tmp))?;
            for entry in entries.flatten() {
                let stale = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > SHARED_TMP_MAX_AGE);
                if stale {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        } else {
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp).map_err(io_err("clean", &tmp))?;
            }
            std::fs::create_dir_all(&tmp).map_err(io_err("create", &tmp))?;
        }
        let store = ArtifactStore {
            root: root.to_path_buf(),
            objects,
            tmp,
            max_size,
            count: AtomicUsize::new(0),
            next_tmp: AtomicU64::new(0),
            used: std::sync::Mutex::new(std::collections::HashMap::new()),
            validated: Mutex::new(HashMap::new()),
            validations: tokio::sync::Semaphore::new(DEFAULT_MAX_VALIDATIONS),
        };
        let n = store.list()?.len();
        store.count.store(n, Ordering::Relaxed);
        gauge!(metrics::ARTIFACTS_STORED).set(n as f64);
        Ok(store)
    }

    /// Runs at most `n` (at least 1) validations of new artifacts at once; the others wait.
    pub fn with_max_validations(mut self, n: usize) -> Self {
        self.validations = tokio::sync::Semaphore::new(n.max(1));
        self
    }

    /// Records that the artifact `digest` passed the checks of `kind` (e.g. from the
    /// registry's index, written only after they passed), so that presence checks trust it.
    pub fn note_valid(&self, digest: &Digest, kind: ArtifactKind) {
        let mut index = self.validated.lock().unwrap_or_else(|e| e.into_inner());
        index.entry(digest.clone()).or_default().insert(kind);
    }

    /// Whether the index says `digest` passed the checks of `kind`.
    fn known_valid(&self, digest: &Digest, kind: ArtifactKind) -> bool {
        let index = self.validated.lock().unwrap_or_else(|e| e.into_inner());
        index.get(digest).is_some_and(|k| k.contains(&kind))
    }

    /// Runs the checks of `kind` on the file at `path` (see [`validate_kind`]); a Wasm module
    /// waits for one of the bounded validation slots.
    async fn validate(&self, kind: ArtifactKind, path: &Path, name: String) -> Result<(), ArtifactError> {
        let _slot = match kind {
            ArtifactKind::WasmModule => Some(self.validations.acquire().await.ok()),
            _ => None,
        };
        validate_kind(kind, path, name).await
    }

    /// The directory the store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Largest artifact accepted, in bytes.
    pub fn max_size(&self) -> u64 {
        self.max_size
    }

    /// The artifacts present, read from the directory (files whose names are not digests are
    /// ignored). Blocking: meant for startup.
    pub fn list(&self) -> Result<Vec<ArtifactRef>, ArtifactError> {
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&self.objects).map_err(io_err("list", &self.objects))?;
        for entry in entries {
            let entry = entry.map_err(io_err("list", &self.objects))?;
            let file_name = entry.file_name();
            // Only names this store writes: 64 lowercase hex digits.
            let Some(digest) =
                file_name.to_str().and_then(|n| Digest::parse(n).ok().filter(|d| d.as_str() == n))
            else {
                continue;
            };
            match entry.metadata() {
                Ok(m) if m.is_file() => out.push(ArtifactRef { digest, size: m.len() }),
                Ok(_) => {}
                Err(err) => warn!(path = %entry.path().display(), error = %err, "unreadable artifact"),
            }
        }
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(out)
    }

    /// How many artifacts the store holds.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where the artifact `digest` is (or would be) kept; `None` for a malformed digest, which
    /// never names a file.
    pub fn path(&self, digest: &Digest) -> Option<PathBuf> {
        digest.is_valid().then(|| self.objects.join(digest.as_str()))
    }

    /// Whether the store holds `digest`.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_some_and(|p| p.is_file())
    }

    /// The size of the artifact `digest`, if the store holds it.
    pub fn size(&self, digest: &Digest) -> Option<u64> {
        let meta = std::fs::metadata(self.path(digest)?).ok()?;
        meta.is_file().then_some(meta.len())
    }

    /// Checks an upload request before any byte is received: a well-formed digest and a size
    /// within the limit.
    pub fn check(&self, req: &UploadRequest) -> Result<(), ArtifactError> {
        if !req.digest.is_valid() {
            return Err(ArtifactError::bad_digest(&req.digest));
        }
        if req.size > self.max_size {
            return Err(ArtifactError::TooLarge {
                name: display_name(req),
                size: req.size,
                max: self.max_size,
            });
        }
        Ok(())
    }

    /// Checks that the artifact already stored under `req.digest` passes the checks of
    /// `req.kind` (the store is keyed by content, so the same bytes may have come as another
    /// kind). `Ok(false)` when the store does not hold the digest.
    ///
    /// Answered from the index when the digest passed the checks of that kind before (the
    /// common case: every upload is validated once); otherwise the file is validated once, in
    /// a bounded validation slot, and the result remembered.
    pub async fn check_present(&self, req: &UploadRequest) -> Result<bool, ArtifactError> {
        let path = self.path(&req.digest).ok_or_else(|| ArtifactError::bad_digest(&req.digest))?;
        if !tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok(false);
        }
        self.touch(&req.digest);
        if self.known_valid(&req.digest, req.kind) {
            return Ok(true);
        }
        let _slot = match req.kind {
            ArtifactKind::WasmModule => Some(self.validations.acquire().await.ok()),
            _ => None,
        };
        // Another presence check may have validated it while this one waited.
        if !self.known_valid(&req.digest, req.kind) {
            validate_kind(req.kind, &path, display_name(req)).await?;
            self.note_valid(&req.digest, req.kind);
        }
        Ok(true)
    }

    /// Records a use of `digest` (it is in the store) for LRU eviction.
    fn touch(&self, digest: &Digest) {
        let now = std::time::SystemTime::now();
        self.used.lock().unwrap_or_else(|p| p.into_inner()).insert(digest.clone(), now);
    }

    /// The artifacts to evict to bring the store to at most `max` bytes, least recently used
    /// first: never one in `keep` (what live tasks and executors refer to) nor one stored or
    /// used within `grace` of `now` (an upload is followed by its launch). Blocking.
    pub fn eviction_candidates(
        &self,
        max: u64,
        keep: &std::collections::HashSet<Digest>,
        grace: std::time::Duration,
        now: std::time::SystemTime,
    ) -> Result<Vec<ArtifactRef>, ArtifactError> {
        let stored = self.list()?;
        let mut total: u64 = stored.iter().map(|a| a.size).sum();
        if total <= max {
            return Ok(Vec::new());
        }
        let used = self.used.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let recent = now.checked_sub(grace).unwrap_or(std::time::UNIX_EPOCH);
        let mut candidates: Vec<(std::time::SystemTime, ArtifactRef)> = stored
            .into_iter()
            .filter(|a| !keep.contains(&a.digest))
            .filter_map(|a| {
                let modified = self.path(&a.digest).and_then(|p| std::fs::metadata(p).ok()?.modified().ok());
                let last = used.get(&a.digest).copied().or(modified)?;
                (last < recent).then_some((last, a))
            })
            .collect();
        candidates.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.digest.cmp(&b.1.digest)));
        let mut out = Vec::new();
        for (_, a) in candidates {
            if total <= max {
                break;
            }
            total = total.saturating_sub(a.size);
            out.push(a);
        }
        Ok(out)
    }

    /// Removes the artifact `digest` (evicted; the core and the registry's index forgot it
    /// first). A reader that opened it keeps reading it. Returns whether it was there.
    pub async fn remove(&self, digest: &Digest) -> Result<bool, ArtifactError> {
        let path = self.path(digest).ok_or_else(|| ArtifactError::bad_digest(digest))?;
        self.used.lock().unwrap_or_else(|p| p.into_inner()).remove(digest);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {
                let n = self.count.fetch_sub(1, Ordering::Relaxed).saturating_sub(1);
                gauge!(metrics::ARTIFACTS_STORED).set(n as f64);
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("remove", &path)(e)),
        }
    }

    /// Receives the bytes of `req` from `body` (exactly `req.size` of them, then end of stream),
    /// verifies them and publishes the artifact. Storing a digest that is already present is
    /// fine (the first copy stays).
    pub async fn store<R: AsyncRead + Unpin>(
        &self,
        req: &UploadRequest,
        body: R,
    ) -> Result<ArtifactRef, ArtifactError> {
        let result = match self.check(req) {
            Ok(()) => {
                let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
                let tmp = self.tmp.join(format!("{}.{}.{n}.part", req.digest, std::process::id()));
                let r = self.receive(req, &tmp, body).await;
                if r.is_err() {
                    let _ = tokio::fs::remove_file(&tmp).await;
                }
                r
            }
            Err(e) => Err(e),
        };
        if result.is_err() {
            counter!(metrics::ARTIFACT_UPLOADS, "outcome" => "rejected").increment(1);
        }
        result
    }

    async fn receive<R: AsyncRead + Unpin>(
        &self,
        req: &UploadRequest,
        tmp: &Path,
        body: R,
    ) -> Result<ArtifactRef, ArtifactError> {
        let name = display_name(req);
        let mut file = tokio::fs::File::create(tmp).await.map_err(io_err("create", tmp))?;
        let mut hasher = sha2::Sha256::new();
        // One byte past the declared size is enough to know the sender overran it.
        let mut body = body.take(req.size.saturating_add(1));
        let mut buf = vec![0u8; CHUNK];
        let mut got: u64 = 0;
        loop {
            let n = body
                .read(&mut buf)
                .await
                .map_err(|err| ArtifactError::Receive { name: name.clone(), err })?;
            if n == 0 {
                break;
            }
            got += n as u64;
            if got > req.size {
                return Err(ArtifactError::Overrun { name, declared: req.size });
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n]).await.map_err(io_err("write", tmp))?;
        }
        if got < req.size {
            return Err(ArtifactError::Truncated { name, got, declared: req.size });
        }
        let actual = Digest::from_hasher(hasher);
        if actual != req.digest {
            return Err(ArtifactError::DigestMismatch { name, declared: req.digest.clone(), actual });
        }
        file.sync_all().await.map_err(io_err("sync", tmp))?;
        drop(file);
        self.validate(req.kind, tmp, name.clone()).await?;
        let dest = self.objects.join(actual.as_str());
        let new = publish(tmp, &dest).await?;
        self.touch(&actual);
        if new {
            let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
            gauge!(metrics::ARTIFACTS_STORED).set(n as f64);
            counter!(metrics::ARTIFACT_BYTES).increment(req.size);
        }
        self.note_valid(&actual, req.kind);
        counter!(metrics::ARTIFACT_UPLOADS, "outcome" => "stored").increment(1);
        debug!(digest = %actual, size = req.size, name, new, "artifact stored");
        Ok(ArtifactRef { digest: actual, size: req.size })
    }

    /// A fresh path in the store's temporary directory for an artifact fetched from another
    /// master (see [`crate::replication`]); [`ArtifactStore::publish_fetched`] puts it in place.
    pub fn fetch_path(&self, digest: &Digest) -> PathBuf {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        self.tmp.join(format!("{digest}.{}.{n}.fetched", std::process::id()))
    }

    /// Publishes the file at `fetched` (a [`ArtifactStore::fetch_path`] whose size and sha256
    /// the fetch verified against `digest`) the way uploads are published, and removes it.
    /// Returns whether this call added the artifact (another copy may have won).
    pub async fn publish_fetched(&self, fetched: &Path, digest: &Digest) -> Result<bool, ArtifactError> {
        let dest = self.path(digest).ok_or_else(|| ArtifactError::bad_digest(digest))?;
        let size = tokio::fs::metadata(fetched).await.map_err(io_err("stat", fetched))?.len();
        let published = publish(fetched, &dest).await;
        let _ = tokio::fs::remove_file(fetched).await;
        let new = published?;
        self.touch(digest);
        if new {
            let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
            gauge!(metrics::ARTIFACTS_STORED).set(n as f64);
            counter!(metrics::ARTIFACT_BYTES).increment(size);
        }
        debug!(%digest, size, new, "fetched artifact stored");
        Ok(new)
    }

    /// Opens the artifact `digest` for reading, with its size; `None` when the store does not
    /// hold it.
    pub async fn open_read(&self, digest: &Digest) -> Result<Option<(tokio::fs::File, u64)>, ArtifactError> {
        let path = self.path(digest).ok_or_else(|| ArtifactError::bad_digest(digest))?;
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("open", &path)(e)),
        };
        let size = file.metadata().await.map_err(io_err("stat", &path))?.len();
        self.touch(digest);
        Ok(Some((file, size)))
    }
}

/// Runs the checks of `kind` on the file at `path`: a Wasm module is validated, an executable
/// must look like one; archives are not looked into.
async fn validate_kind(kind: ArtifactKind, path: &Path, name: String) -> Result<(), ArtifactError> {
    match kind {
        ArtifactKind::WasmModule => validate_module(path, name).await,
        ArtifactKind::Executable => validate_executable(path, name).await,
        ArtifactKind::Archive => Ok(()),
    }
}

/// Whether a file starting with `head` is something an agent can execute: an ELF binary
/// (`\x7fELF`) or a script with an interpreter line (`#!`).
pub fn looks_executable(head: &[u8]) -> bool {
    head.starts_with(b"\x7fELF") || head.starts_with(b"#!")
}

/// Checks that the file at `path` starts like an executable ([`looks_executable`]).
async fn validate_executable(path: &Path, name: String) -> Result<(), ArtifactError> {
    let mut file = tokio::fs::File::open(path).await.map_err(io_err("open", path))?;
    let mut head = [0u8; 4];
    let mut got = 0;
    while got < head.len() {
        let n = file.read(&mut head[got..]).await.map_err(io_err("read", path))?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let head = &head[..got];
    if looks_executable(head) {
        return Ok(());
    }
    let shown = if head.is_empty() {
        "nothing (it is empty)".to_string()
    } else {
        format!("\"{}\"", head.escape_ascii())
    };
    Err(ArtifactError::NotExecutable { name, head: shown })
}

/// Runs the Wasm validator (`agora-wasm-validate`, the executor's own checks) on the file at
/// `path`, off the async threads.
async fn validate_module(path: &Path, name: String) -> Result<(), ArtifactError> {
    let owned = path.to_path_buf();
    let verdict = tokio::task::spawn_blocking(move || {
        std::fs::read(&owned).map(|bytes| agora_wasm_validate::validate(&bytes).map(|_| ()))
    })
    .await
    .map_err(|e| ArtifactError::Io {
        op: "validate",
        path: path.to_path_buf(),
        err: io::Error::other(e),
    })?;
    match verdict {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(ArtifactError::InvalidModule { name, source }),
        Err(err) => Err(ArtifactError::Io { op: "read", path: path.to_path_buf(), err }),
    }
}

/// Moves the verified temporary file `tmp` to `dest`. A hard link never replaces an existing
/// file, so of concurrent uploads of one digest exactly one publishes; returns whether this one
/// did. Where hard links are not supported, an atomic rename (the content is the same anyway).
async fn publish(tmp: &Path, dest: &Path) -> Result<bool, ArtifactError> {
    let new = match tokio::fs::hard_link(tmp, dest).await {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
        Err(e) => {
            debug!(error = %e, "hard link failed; renaming instead");
            let existed = tokio::fs::try_exists(dest).await.unwrap_or(false);
            tokio::fs::rename(tmp, dest).await.map_err(io_err("rename", tmp))?;
            return Ok(!existed);
        }
    };
    let _ = tokio::fs::remove_file(tmp).await;
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_store_keeps_another_masters_upload_in_progress() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = ArtifactStore::open_shared(dir.path(), 1 << 20).expect("open");
        let part = first.tmp.join("in-progress.part");
        std::fs::write(&part, b"half").expect("write");
        let old = first.tmp.join("abandoned.part");
        std::fs::write(&old, b"old").expect("write");
        let long_ago = std::time::SystemTime::now() - SHARED_TMP_MAX_AGE - std::time::Duration::from_secs(60);
        std::fs::File::options().write(true).open(&old).expect("open").set_modified(long_ago).expect("mtime");
        let _second = ArtifactStore::open_shared(dir.path(), 1 << 20).expect("second master");
        assert!(part.exists(), "a second master wiped an upload in progress");
        assert!(!old.exists(), "an abandoned temporary file was kept");
        // A store of one master cleans everything, as before.
        let _alone = ArtifactStore::open(dir.path(), 1 << 20).expect("open alone");
        assert!(!part.exists());
    }

    fn req(kind: ArtifactKind, name: &str, bytes: &[u8]) -> UploadRequest {
        UploadRequest { kind, digest: Digest::of(bytes), size: bytes.len() as u64, name: name.into() }
    }

    fn module() -> Vec<u8> {
        wat::parse_str(
            r#"(module
                 (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
                 (memory (export "memory") 1)
                 (func (export "_start")))"#,
        )
        .unwrap()
    }

    fn tmp_files(store: &ArtifactStore) -> usize {
        std::fs::read_dir(&store.tmp).unwrap().count()
    }

    #[tokio::test]
    async fn stores_checks_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("artifacts");
        let store = ArtifactStore::open(&root, 1024).unwrap();
        assert!(store.is_empty());

        let wasm = module();
        let r = req(ArtifactKind::WasmModule, "hello.wasm", &wasm);
        let stored = store.store(&r, &wasm[..]).await.unwrap();
        assert_eq!(stored, ArtifactRef { digest: r.digest.clone(), size: wasm.len() as u64 });
        assert!(store.contains(&r.digest));
        assert_eq!(store.size(&r.digest), Some(wasm.len() as u64));
        assert_eq!(std::fs::read(store.path(&r.digest).unwrap()).unwrap(), wasm);
        // Again: fine, still one artifact.
        store.store(&r, &wasm[..]).await.unwrap();
        assert_eq!(store.len(), 1);
        assert!(store.check_present(&r).await.unwrap());

        // Not Wasm, as a module: named problem; as an archive: fine.
        let text = b"#!/bin/sh\necho hi\n".to_vec();
        let e = store.store(&req(ArtifactKind::WasmModule, "hi.sh", &text), &text[..]).await.unwrap_err();
        assert!(e.to_string().starts_with("hi.sh: not a WebAssembly module"), "{e}");
        assert_eq!(e.code(), ErrorCode::Invalid);
        let archive = req(ArtifactKind::Archive, "data.tar", &text);
        store.store(&archive, &text[..]).await.unwrap();
        // The same bytes claimed as a module are checked even though they are present.
        let as_module = UploadRequest { kind: ArtifactKind::WasmModule, ..archive.clone() };
        assert!(store.check_present(&as_module).await.is_err());

        // Size and digest problems.
        let short = req(ArtifactKind::Archive, "short", b"abcdef");
        let e = store.store(&short, &b"abc"[..]).await.unwrap_err();
        assert!(matches!(e, ArtifactError::Truncated { got: 3, declared: 6, .. }), "{e}");
        let e = store.store(&short, &b"abcdefgh"[..]).await.unwrap_err();
        assert!(matches!(e, ArtifactError::Overrun { declared: 6, .. }), "{e}");
        let e = store.store(&short, &b"abcdeX"[..]).await.unwrap_err();
        assert!(matches!(e, ArtifactError::DigestMismatch { .. }), "{e}");
        let big = vec![0u8; 2048];
        let e = store.store(&req(ArtifactKind::Archive, "big.tar", &big), &big[..]).await.unwrap_err();
        assert_eq!(e.to_string(), "big.tar is 2KiB, over the master's 1KiB artifact limit");
        assert_eq!(tmp_files(&store), 0, "failed uploads leave no temporary file");
        assert_eq!(store.len(), 2);

        // Reopened: the same artifacts.
        drop(store);
        let store = ArtifactStore::open(&root, 1024).unwrap();
        assert_eq!(store.len(), 2);
        let listed: Vec<Digest> = store.list().unwrap().into_iter().map(|a| a.digest).collect();
        assert!(listed.contains(&r.digest) && listed.contains(&archive.digest));
    }

    #[tokio::test]
    async fn executables_must_be_elf_or_scripts() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path(), 1024).unwrap();
        let script = b"#!/bin/sh\nexec ./run\n".to_vec();
        let r = req(ArtifactKind::Executable, "my-executor", &script);
        assert_eq!(store.store(&r, &script[..]).await.unwrap().digest, r.digest);
        let elf = b"\x7fELF\x02\x01\x01\x00rest".to_vec();
        let r = req(ArtifactKind::Executable, "my-executor.bin", &elf);
        store.store(&r, &elf[..]).await.unwrap();
        assert_eq!(store.len(), 2);

        let text = b"hello world".to_vec();
        let e = store.store(&req(ArtifactKind::Executable, "notes.txt", &text), &text[..]).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "notes.txt: not an executable (an ELF binary or a `#!` script); it starts with \"hell\""
        );
        assert_eq!(e.code(), ErrorCode::Invalid);
        let e = store.store(&req(ArtifactKind::Executable, "empty", b""), &b""[..]).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "empty: not an executable (an ELF binary or a `#!` script); it starts with nothing (it is empty)"
        );
        let bin = b"\x7fEL".to_vec();
        let e = store.store(&req(ArtifactKind::Executable, "cut", &bin), &bin[..]).await.unwrap_err();
        assert!(e.to_string().ends_with("it starts with \"\\x7fEL\""), "{e}");
        assert_eq!(tmp_files(&store), 0, "refused executables leave no temporary file");
        assert_eq!(store.len(), 2);

        // Bytes already stored as an archive are checked when claimed as an executable.
        let archive = req(ArtifactKind::Archive, "data.tar", &text);
        store.store(&archive, &text[..]).await.unwrap();
        let as_exe = UploadRequest { kind: ArtifactKind::Executable, ..archive.clone() };
        assert!(matches!(store.check_present(&as_exe).await, Err(ArtifactError::NotExecutable { .. })));
        let script_ref = req(ArtifactKind::Executable, "again", &script);
        assert!(store.check_present(&script_ref).await.unwrap());
        assert!(looks_executable(b"#!") && !looks_executable(b"#") && !looks_executable(b"\x7fELX"));
    }

    #[tokio::test]
    async fn concurrent_uploads_of_one_digest_agree() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(ArtifactStore::open(dir.path(), 1 << 20).unwrap());
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let r = req(ArtifactKind::Archive, "data.tar", &bytes);
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (store, r, bytes) = (store.clone(), r.clone(), bytes.clone());
            tasks.push(tokio::spawn(async move { store.store(&r, &bytes[..]).await }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(store.len(), 1);
        assert_eq!(std::fs::read(store.path(&r.digest).unwrap()).unwrap(), bytes);
        assert_eq!(tmp_files(&store), 0);
    }

    #[tokio::test]
    async fn fetched_artifacts_are_published_like_uploads() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path(), 1024).unwrap();
        let bytes = b"#!/bin/sh\necho fetched\n".to_vec();
        let digest = Digest::of(&bytes);
        let tmp = store.fetch_path(&digest);
        assert_eq!(tmp.parent(), Some(store.tmp.as_path()));
        assert_ne!(tmp, store.fetch_path(&digest), "every fetch gets its own path");
        std::fs::write(&tmp, &bytes).unwrap();
        assert!(store.publish_fetched(&tmp, &digest).await.unwrap());
        assert_eq!(std::fs::read(store.path(&digest).unwrap()).unwrap(), bytes);
        assert_eq!(store.len(), 1);
        assert_eq!(tmp_files(&store), 0);
        // A second copy (two masters sharing a store) changes nothing.
        let again = store.fetch_path(&digest);
        std::fs::write(&again, &bytes).unwrap();
        assert!(!store.publish_fetched(&again, &digest).await.unwrap());
        assert_eq!((store.len(), tmp_files(&store)), (1, 0));
    }

    #[test]
    fn malformed_digests_name_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path(), 1024).unwrap();
        let evil: Digest = serde_json::from_str("\"../../etc/passwd\"").unwrap();
        assert!(store.path(&evil).is_none());
        assert!(!store.contains(&evil));
        let r = UploadRequest { kind: ArtifactKind::Archive, digest: evil, size: 1, name: "x".into() };
        assert_eq!(store.check(&r).unwrap_err().code(), ErrorCode::Malformed);
    }

    #[tokio::test]
    async fn eviction_takes_the_least_recently_used_unreferenced_and_not_recent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ArtifactStore::open(dir.path(), 1 << 20).expect("open");
        let mut refs = Vec::new();
        for (i, age) in [(0u8, 5u64), (1, 4), (2, 3), (3, 0)] {
            let bytes = vec![i; 1000];
            let req = UploadRequest {
                digest: Digest::of(&bytes),
                size: 1000,
                kind: ArtifactKind::Archive,
                name: format!("a{i}"),
            };
            let a = store.store(&req, &bytes[..]).await.expect("store");
            refs.push((a, age));
        }
        // Ages by hand: uses recorded in memory win over the files' times.
        let now = std::time::SystemTime::now();
        {
            let mut used = store.used.lock().expect("lock");
            for (a, age) in &refs {
                used.insert(a.digest.clone(), now - std::time::Duration::from_secs(3600 * age));
            }
        }
        let keep: std::collections::HashSet<Digest> = [refs[0].0.digest.clone()].into();
        let grace = std::time::Duration::from_secs(600);
        // Room for two: the oldest unreferenced (a1) goes, then a2; a0 is kept, a3 is recent.
        let out = store.eviction_candidates(2000, &keep, grace, now).expect("candidates");
        assert_eq!(
            out.iter().map(|a| a.digest.clone()).collect::<Vec<_>>(),
            vec![refs[1].0.digest.clone(), refs[2].0.digest.clone()]
        );
        let out = store.eviction_candidates(3000, &keep, grace, now).expect("candidates");
        assert_eq!(out.len(), 1);
        assert!(store.eviction_candidates(4000, &keep, grace, now).expect("candidates").is_empty());
        // Removal: the file and its count go; a second removal finds nothing.
        assert!(store.remove(&refs[1].0.digest).await.expect("remove"));
        assert!(!store.contains(&refs[1].0.digest) && store.len() == 3);
        assert!(!store.remove(&refs[1].0.digest).await.expect("remove"));
    }

    #[tokio::test]
    async fn presence_is_answered_from_the_index_and_validated_once_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("artifacts");
        let store = ArtifactStore::open(&root, 1 << 20).unwrap();
        let wasm = module();
        let r = req(ArtifactKind::WasmModule, "hello.wasm", &wasm);
        store.store(&r, &wasm[..]).await.unwrap();
        // The file is not read again: damage it in place and the index still answers.
        let path = store.path(&r.digest).unwrap();
        std::fs::write(&path, b"not wasm").unwrap();
        assert!(store.check_present(&r).await.unwrap(), "answered from the index");
        // A reopened store has an empty index: the file is validated (and found damaged).
        let reopened = ArtifactStore::open(&root, 1 << 20).unwrap();
        assert_eq!(reopened.check_present(&r).await.unwrap_err().code(), ErrorCode::Invalid);
        // What the registry's index vouches for is trusted as the upload was.
        reopened.note_valid(&r.digest, ArtifactKind::WasmModule);
        assert!(reopened.check_present(&r).await.unwrap());
        // Another kind is checked on its own.
        let as_exe = UploadRequest { kind: ArtifactKind::Executable, ..r.clone() };
        assert_eq!(reopened.check_present(&as_exe).await.unwrap_err().code(), ErrorCode::Invalid);
    }
}
