//! Artifacts copied between masters (`--etcd`): every master keeps its own store, so no
//! shared filesystem is needed.
//!
//! A standby keeps its store in step with the leader's: every [`SYNC_INTERVAL`] (and as soon
//! as it learns of a new leader) it reads the artifact index from etcd, which needs no
//! leadership, and fetches each digest its store lacks from the leader, with its own master
//! certificate, over the agents' [`StreamRequest::Fetch`](agora_sdk::proto::StreamRequest)
//! exchange (a master may open nothing else on another master). The bytes are checked (size,
//! sha256) and published as uploads are. At most [`MAX_FETCHES_PER_ROUND`] fetches per round,
//! one at a time; failures back off up to [`MAX_BACKOFF`]; the election never waits for any of
//! it.
//!
//! A new leader whose store lacks a digest of the index (uploaded just before the old leader
//! died, before this master copied it) fetches it in the background from the other masters
//! still registered in etcd (standbys serve fetches to masters too), for at most
//! [`RECOVERY_WINDOW`]; what it cannot get by then is dropped from the index, each digest
//! logged.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_sdk::client::{ClientError, Session};
use agora_sdk::proto::{Digest, Role};
use agora_sdk::tls::TlsFiles;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::artifacts::{ArtifactError, ArtifactStore};
use crate::ha::{HaError, Members};
use crate::registry::ArtifactRecord;

/// How often a standby compares its store with the index.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// Most artifacts a standby fetches in one round (one at a time); the rest wait for the next.
pub const MAX_FETCHES_PER_ROUND: usize = 16;

/// Most index records read per round: far more artifacts than a cluster keeps.
pub const MAX_INDEX_RECORDS: usize = 100_000;

/// Longest wait between rounds after failures (doubling from [`SYNC_INTERVAL`]).
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How long a new leader tries to fetch the indexed artifacts its store lacks before it drops
/// them from the index.
pub const RECOVERY_WINDOW: Duration = Duration::from_secs(30);

/// How long a digest the leader refused (not in its store, over this master's size limit) is
/// left alone before it is asked for again.
const REFUSED_RETRY: Duration = Duration::from_secs(30);

/// Most refused digests remembered (forgotten all at once beyond it).
const MAX_REFUSED: usize = 10_000;

/// Why a round of copying stopped.
#[derive(Debug, thiserror::Error)]
enum CopyError {
    #[error(transparent)]
    Index(#[from] HaError),
    #[error("cannot connect to the master at {addr} to fetch artifacts: {err}")]
    Connect { addr: String, err: ClientError },
    #[error("fetching artifact {digest} from the master at {addr} failed: {err}")]
    Fetch { addr: String, digest: Digest, err: ClientError },
    #[error("the master at {addr} refused artifact {digest}: {err}")]
    Refused { addr: String, digest: Digest, err: ClientError },
    #[error(transparent)]
    Store(#[from] ArtifactError),
}

impl CopyError {
    /// The kind of failure, for logging each kind once rather than every round.
    fn kind(&self) -> &'static str {
        match self {
            CopyError::Index(_) => "index",
            CopyError::Connect { .. } => "connect",
            CopyError::Fetch { .. } => "fetch",
            CopyError::Refused { .. } => "refused",
            CopyError::Store(_) => "store",
        }
    }
}

/// How long one fetch may take: a minute, plus a second per MiB of the largest artifact the
/// store takes (a peer that stalls a transfer cannot hold the copier forever).
fn fetch_timeout(max_size: u64) -> Duration {
    Duration::from_secs(60u64.saturating_add(max_size >> 20))
}

/// Fetches `digest` over `conn` (a master-role session with another master) into `store`.
/// Returns whether this call added it.
async fn fetch_one(
    store: &ArtifactStore,
    conn: &quinn::Connection,
    addr: &str,
    digest: &Digest,
) -> Result<bool, CopyError> {
    let tmp = store.fetch_path(digest);
    let limit = fetch_timeout(store.max_size());
    let fetched =
        tokio::time::timeout(limit, agora_sdk::artifacts::fetch(conn, digest, &tmp, store.max_size())).await;
    let fetched = match fetched {
        Ok(r) => r,
        Err(_) => {
            // The abandoned fetch leaves its partial file beside `tmp`.
            remove_partial(&tmp).await;
            Err(ClientError::Stream(format!("no complete transfer within {limit:?}")))
        }
    };
    match fetched {
        Ok(_) => Ok(store.publish_fetched(&tmp, digest).await?),
        Err(err @ (ClientError::Refused(_) | ClientError::Artifact(_))) => {
            Err(CopyError::Refused { addr: addr.to_string(), digest: digest.clone(), err })
        }
        Err(err) => Err(CopyError::Fetch { addr: addr.to_string(), digest: digest.clone(), err }),
    }
}

/// Removes the partial files of an abandoned fetch into `dest` (the SDK's fetch writes
/// `.<dest name>.<random>.part` beside it).
async fn remove_partial(dest: &std::path::Path) {
    let (Some(dir), Some(name)) = (dest.parent(), dest.file_name()) else { return };
    let prefix = format!(".{}.", name.to_string_lossy());
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else { return };
    while let Ok(Some(entry)) = entries.next_entry().await {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = tokio::fs::remove_file(entry.path()).await;
        }
    }
}

/// A master-role session with another master, for fetches only.
async fn connect(addr: &str, tls: &TlsFiles) -> Result<Session, CopyError> {
    Session::connect(addr, tls, Role::Master)
        .await
        .map_err(|err| CopyError::Connect { addr: addr.to_string(), err })
}

fn close(session: Option<Session>) {
    if let Some(s) = session {
        s.conn.close(0u32.into(), b"done fetching");
    }
}

/// A standby's copier: what it knows between rounds.
struct Follower {
    members: Members,
    tls: TlsFiles,
    store: Arc<ArtifactStore>,
    /// Digests known to be in the store (files never change once published, and are removed
    /// only by this follower's pruning, which forgets them here): spares a file system check
    /// per indexed digest per round.
    have: HashSet<Digest>,
    /// Digests the leader refused, and when.
    refused: HashMap<Digest, Instant>,
    /// The session with the leader at this address.
    session: Option<(String, Session)>,
    /// The kind of the last failure, logged once until a round succeeds.
    last_failure: Option<&'static str>,
    /// With a bounded store (`--artifact-store-size`): stored artifacts the leader's index
    /// no longer holds (it evicted them) and older than this are removed here too.
    prune: Option<Duration>,
}

impl Follower {
    /// One round: reads the index, fetches what the store lacks (at most
    /// [`MAX_FETCHES_PER_ROUND`]) from the leader at `leader`.
    async fn round(&mut self, leader: &str) -> Result<usize, CopyError> {
        let index = self.members.artifacts(MAX_INDEX_RECORDS).await?;
        if self.have.len() > MAX_INDEX_RECORDS {
            self.have.clear();
        }
        // Only a complete index says what the leader dropped.
        if let (Some(grace), true) = (self.prune, index.len() < MAX_INDEX_RECORDS) {
            let indexed: HashSet<Digest> = index.iter().map(|r| r.digest.clone()).collect();
            self.prune(&indexed, grace).await;
        }
        let now = Instant::now();
        self.refused.retain(|_, at| now.duration_since(*at) < REFUSED_RETRY);
        let mut missing = Vec::new();
        for record in index {
            if missing.len() >= MAX_FETCHES_PER_ROUND {
                break;
            }
            if self.have.contains(&record.digest) || self.refused.contains_key(&record.digest) {
                continue;
            }
            if self.store.contains(&record.digest) {
                self.have.insert(record.digest);
            } else {
                missing.push(record.digest);
            }
        }
        if missing.is_empty() {
            return Ok(0);
        }
        if self.session.as_ref().is_none_or(|(a, _)| a != leader) {
            close(self.session.take().map(|(_, s)| s));
            let s = connect(leader, &self.tls).await?;
            self.session = Some((leader.to_string(), s));
        }
        let Some((_, session)) = self.session.as_ref() else { return Ok(0) };
        let conn = session.conn.clone();
        let mut copied = 0;
        for digest in missing {
            match fetch_one(&self.store, &conn, leader, &digest).await {
                Ok(_) => {
                    copied += 1;
                    self.have.insert(digest);
                }
                Err(e @ CopyError::Refused { .. }) => {
                    if self.refused.len() >= MAX_REFUSED {
                        self.refused.clear();
                    }
                    self.refused.insert(digest, Instant::now());
                    self.failed(&e);
                }
                Err(e) => {
                    // The session may be broken: a new one next round.
                    close(self.session.take().map(|(_, s)| s));
                    return Err(e);
                }
            }
        }
        Ok(copied)
    }

    /// Removes stored artifacts not in `indexed` whose file is older than `grace` (an
    /// artifact is published before it is indexed: a young one may be on its way in).
    async fn prune(&mut self, indexed: &HashSet<Digest>, grace: Duration) {
        let store = self.store.clone();
        let indexed = indexed.clone();
        let stale = tokio::task::spawn_blocking(move || {
            let Ok(stored) = store.list() else { return Vec::new() };
            stored
                .into_iter()
                .filter(|a| !indexed.contains(&a.digest))
                .filter(|a| {
                    store
                        .path(&a.digest)
                        .and_then(|p| std::fs::metadata(p).ok()?.modified().ok()?.elapsed().ok())
                        .is_some_and(|age| age > grace)
                })
                .map(|a| a.digest)
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for digest in stale {
            self.have.remove(&digest);
            match self.store.remove(&digest).await {
                Ok(true) => info!(%digest, "removed an artifact the leader evicted"),
                Ok(false) => {}
                Err(e) => warn!(%digest, error = %e, "cannot remove an artifact the leader evicted"),
            }
        }
    }

    fn failed(&mut self, e: &CopyError) {
        if self.last_failure != Some(e.kind()) {
            warn!(error = %e, "cannot copy artifacts from the leader; trying again");
            self.last_failure = Some(e.kind());
        } else {
            debug!(error = %e, "cannot copy artifacts from the leader");
        }
    }
}

/// A standby's copier: runs until `shutdown`. `leader` is the leader's address while this
/// master stands by and knows it, `None` otherwise (leading, or the leader unknown).
pub(crate) async fn follow_leader(
    mut leader: watch::Receiver<Option<String>>,
    members: Members,
    tls: TlsFiles,
    store: Arc<ArtifactStore>,
    prune: Option<Duration>,
    shutdown: CancellationToken,
) {
    let mut f = Follower {
        members,
        tls,
        store,
        have: HashSet::new(),
        refused: HashMap::new(),
        session: None,
        last_failure: None,
        prune,
    };
    let mut delay = SYNC_INTERVAL;
    loop {
        let now = leader.borrow_and_update().clone();
        match now {
            Some(addr) => match f.round(&addr).await {
                Ok(n) => {
                    if n > 0 {
                        info!(leader = %addr, artifacts = n, "copied artifacts from the leader");
                    }
                    if f.last_failure.take().is_some() {
                        info!(leader = %addr, "copying artifacts from the leader works again");
                    }
                    delay = SYNC_INTERVAL;
                }
                Err(e) => {
                    f.failed(&e);
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
            },
            None => {
                close(f.session.take().map(|(_, s)| s));
                delay = SYNC_INTERVAL;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
            // A new leader (or none): a round at once, with no back-off from the old one.
            changed = leader.changed() => {
                if changed.is_err() {
                    break;
                }
                delay = SYNC_INTERVAL;
            }
        }
    }
    close(f.session.take().map(|(_, s)| s));
}

/// A new leader's recovery of indexed artifacts its store lacks: fetched from the other
/// masters registered in etcd (`me` is this master's member id) for at most
/// [`RECOVERY_WINDOW`]; `stored` is told of each one fetched (or found in the store, an upload
/// in the meantime), `lost` of those still missing at the end. Stops quietly with `stop` (the
/// next leader takes over).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn recover(
    missing: Vec<ArtifactRecord>,
    members: Members,
    me: String,
    tls: TlsFiles,
    store: Arc<ArtifactStore>,
    stored: impl Fn(ArtifactRecord) + Send + 'static,
    lost: impl FnOnce(Vec<Digest>) + Send + 'static,
    stop: CancellationToken,
) {
    let deadline = Instant::now() + RECOVERY_WINDOW;
    let shown: Vec<&str> = missing.iter().map(|r| r.digest.as_str()).collect();
    warn!(count = missing.len(), digests = ?shown, window = ?RECOVERY_WINDOW,
        "indexed artifacts missing from this master's store: fetching them from the other masters");
    let mut pending = missing;
    let mut last_failure = None;
    let span = tracing::info_span!("recover-artifacts");
    async {
        loop {
            pending.retain(|r| {
                let here = store.contains(&r.digest);
                if here {
                    stored(r.clone());
                }
                !here
            });
            if pending.is_empty() || Instant::now() >= deadline {
                break;
            }
            let peers = match members.list().await {
                Ok(list) => list.into_iter().filter(|m| m.id != me).map(|m| m.address).collect(),
                Err(e) => {
                    log_once(&mut last_failure, &CopyError::from(e));
                    Vec::new()
                }
            };
            for addr in peers {
                if let Err(e) = recover_from(&addr, &tls, &store, &mut pending, &stored, deadline).await {
                    log_once(&mut last_failure, &e);
                }
                if pending.is_empty() || Instant::now() >= deadline {
                    break;
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(SYNC_INTERVAL) => {}
            }
        }
        if stop.is_cancelled() {
            return;
        }
        if pending.is_empty() {
            info!("every indexed artifact is in this master's store again");
        } else {
            let digests: Vec<Digest> = pending.into_iter().map(|r| r.digest).collect();
            let shown: Vec<&str> = digests.iter().map(Digest::as_str).collect();
            warn!(count = digests.len(), digests = ?shown,
                "no other master could send these indexed artifacts: dropping them from the index");
            lost(digests);
        }
    }
    .instrument(span)
    .await
}

/// Fetches from the master at `addr` every pending artifact it has, until `deadline`.
async fn recover_from(
    addr: &str,
    tls: &TlsFiles,
    store: &ArtifactStore,
    pending: &mut Vec<ArtifactRecord>,
    stored: &impl Fn(ArtifactRecord),
    deadline: Instant,
) -> Result<(), CopyError> {
    let session = connect(addr, tls).await?;
    let mut result = Ok(());
    let mut i = 0;
    while i < pending.len() && Instant::now() < deadline {
        match fetch_one(store, &session.conn, addr, &pending[i].digest).await {
            Ok(_) => {
                let record = pending.swap_remove(i);
                info!(digest = %record.digest, from = addr, "fetched a missing artifact from another master");
                stored(record);
            }
            // This master lacks it too: try the next digest.
            Err(CopyError::Refused { .. }) => i += 1,
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    close(Some(session));
    result
}

fn log_once(last: &mut Option<&'static str>, e: &CopyError) {
    if *last != Some(e.kind()) {
        warn!(error = %e, "cannot fetch a missing artifact; trying again");
        *last = Some(e.kind());
    } else {
        debug!(error = %e, "cannot fetch a missing artifact");
    }
}
