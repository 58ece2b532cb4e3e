//! The replicated registry: the records of [`super::redb`] kept in etcd under the cluster's key
//! prefix, for several masters of which one leads (`agora master --etcd`).
//!
//! Layout under `/agora/<cluster>/`: `leader` (the elected master, see [`crate::ha`]),
//! `masters/<id>` (every running master, each on its own lease) and
//! `registry/{frameworks,agents,artifacts}/<id>` (JSON records, as in the redb file).
//!
//! The epoch is the create revision of the `leader` key of the election this master won: etcd
//! revisions only grow, so every new leader has a higher epoch than all before it. Every write
//! is a transaction that compares the `leader` key's create revision with this epoch: once the
//! leader key is gone (the lease expired) or belongs to another master, the transaction fails
//! and [`Registry::apply`] returns [`RegistryError::Fenced`], so a deposed leader never writes.
//!
//! The [`Registry`] trait is synchronous (the core's driver writes before it acts); the etcd
//! client is asynchronous, so the registry owns a small runtime of its own and blocks the
//! calling thread while a request runs there, bounded by a timeout.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{
    AgentRecord, ArtifactRecord, FrameworkRecord, Registry, RegistryError, RegistryOp, RegistryState,
};

/// Most operations in one etcd transaction (etcd refuses more than `--max-txn-ops`, 128 by
/// default). A larger batch is written in several transactions, each fenced.
pub const MAX_TXN_OPS: usize = 100;

/// Records read per request when loading the registry.
pub(crate) const PAGE: i64 = 1000;

/// The end of the range of keys that start with `prefix` (its last byte one more; prefixes
/// here end with `/`, never with 0xff).
pub(crate) fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

/// The keys of one cluster in etcd.
#[derive(Clone, Debug)]
pub struct EtcdKeys {
    prefix: String,
}

impl EtcdKeys {
    /// The keys of cluster `cluster` (`/agora/<cluster>/…`).
    pub fn new(cluster: &str) -> Self {
        EtcdKeys { prefix: format!("/agora/{cluster}/") }
    }

    /// The whole cluster's prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The elected leader's key (on its lease).
    pub fn leader(&self) -> String {
        format!("{}leader", self.prefix)
    }

    /// The prefix of the running masters' keys.
    pub fn masters(&self) -> String {
        format!("{}masters/", self.prefix)
    }

    /// The registry's prefix.
    pub fn registry(&self) -> String {
        format!("{}registry/", self.prefix)
    }

    /// The prefix of one registry table's records (`frameworks`, `agents`, `artifacts`).
    pub fn table(&self, table: &str) -> String {
        format!("{}registry/{table}/", self.prefix)
    }

    fn record(&self, table: &str, id: &str) -> String {
        format!("{}registry/{table}/{id}", self.prefix)
    }
}

/// The registry in etcd, fenced by the leader key's create revision.
pub struct EtcdRegistry {
    rt: Option<tokio::runtime::Runtime>,
    client: Client,
    keys: EtcdKeys,
    cluster: String,
    endpoints: String,
    epoch: i64,
    timeout: Duration,
}

impl std::fmt::Debug for EtcdRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdRegistry")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.keys.prefix)
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl Drop for EtcdRegistry {
    fn drop(&mut self) {
        // Dropping a runtime inside another one's task is refused; let it wind down aside.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Connection options for every etcd client of the master: requests never hang longer than
/// `timeout`.
pub(crate) fn connect_options(timeout: Duration) -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_timeout(timeout)
        .with_keep_alive(timeout, timeout)
}

impl EtcdRegistry {
    /// Connects to etcd (`endpoints`, e.g. `http://127.0.0.1:2379`) for cluster `cluster`, as
    /// the leader elected at revision `epoch`. Requests fail after `timeout`.
    pub fn connect(
        endpoints: &[String],
        cluster: &str,
        epoch: u64,
        timeout: Duration,
    ) -> Result<Self, RegistryError> {
        let keys = EtcdKeys::new(cluster);
        let location = format!("etcd {} {}", endpoints.join(","), keys.prefix);
        let open_err = |reason: String| RegistryError::Open { path: PathBuf::from(&location), reason };
        let epoch = i64::try_from(epoch).map_err(|_| open_err(format!("epoch {epoch} is out of range")))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("agora-etcd-registry")
            .enable_all()
            .build()
            .map_err(|e| open_err(format!("cannot start its runtime: {e}")))?;
        let eps = endpoints.to_vec();
        let client =
            block_on(&rt, timeout, async move { Client::connect(eps, Some(connect_options(timeout))).await })
                .and_then(|r| r.map_err(EtcdError::from))
                .map_err(|e| open_err(e.to_string()))?;
        Ok(EtcdRegistry {
            rt: Some(rt),
            client,
            keys,
            cluster: cluster.to_string(),
            endpoints: endpoints.join(","),
            epoch,
            timeout,
        })
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(self.location())
    }

    /// Runs the request `call` makes on the registry's runtime, for at most the timeout. A
    /// request that met an etcd member it cannot reach (dead, in a cluster of several) is
    /// made again, reaching another member: every request here is a read or a fenced,
    /// idempotent transaction, so a repeat is harmless.
    fn run<T, F, Fut>(&self, mut call: F) -> Result<T, EtcdError>
    where
        T: Send + 'static,
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, etcd_client::Error>> + Send,
    {
        let Some(rt) = self.rt.as_ref() else { return Err(EtcdError::Closed) };
        let give_up = tokio::time::Instant::now() + self.timeout.saturating_sub(RETRY_PAUSE);
        block_on(rt, self.timeout, async move {
            loop {
                match call().await {
                    Err(e) if member_unreachable(&e) && tokio::time::Instant::now() < give_up => {
                        tracing::debug!(error = %e, "an etcd member is unreachable: asking again");
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                    other => return other,
                }
            }
        })?
        .map_err(EtcdError::from)
    }

    fn decode<T: DeserializeOwned>(
        &self,
        what: &'static str,
        key: &[u8],
        value: &[u8],
    ) -> Result<T, RegistryError> {
        serde_json::from_slice(value).map_err(|e| RegistryError::Corrupt {
            path: self.path(),
            what,
            key: String::from_utf8_lossy(key).chars().take(100).collect(),
            reason: e.to_string(),
        })
    }

    /// The create revision of the current leader key (0: no leader).
    fn leader_revision(&self) -> Result<i64, EtcdError> {
        let kv = self.client.kv_client();
        let key = self.keys.leader();
        let resp = self.run(move || {
            let (mut kv, key) = (kv.clone(), key.clone());
            async move { kv.get(key, None).await }
        })?;
        Ok(resp.kvs().first().map_or(0, |kv| kv.create_revision()))
    }

    fn txn_op(&self, op: &RegistryOp) -> TxnOp {
        fn put<T: Serialize>(key: String, v: &T) -> TxnOp {
            // Records are plain data: encoding cannot fail.
            TxnOp::put(key, serde_json::to_vec(v).unwrap_or_default(), None)
        }
        match op {
            RegistryOp::PutFramework(f) => put(self.keys.record("frameworks", f.id.as_str()), f),
            RegistryOp::RemoveFramework(id) => {
                TxnOp::delete(self.keys.record("frameworks", id.as_str()), None)
            }
            RegistryOp::PutAgent(a) => put(self.keys.record("agents", a.id.as_str()), a),
            RegistryOp::RemoveAgent(id) => TxnOp::delete(self.keys.record("agents", id.as_str()), None),
            RegistryOp::PutArtifact(a) => put(self.keys.record("artifacts", a.digest.as_str()), a),
            RegistryOp::RemoveArtifact(d) => TxnOp::delete(self.keys.record("artifacts", d.as_str()), None),
            RegistryOp::PutPolicy(p) => put(self.keys.record("policy", "current"), p),
        }
    }
}

/// The pause before a request that met an unreachable etcd member is made again.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Whether `e` says the etcd member the request went to could not be reached (rather than
/// etcd refusing the request): the connection failed, or gRPC's `UNAVAILABLE` (code 14).
fn member_unreachable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => s.code() as i32 == 14,
        _ => false,
    }
}

/// Why a request to etcd has no answer. The registry's errors carry its text as their reason.
#[derive(Debug, thiserror::Error)]
enum EtcdError {
    /// The registry was closed (its runtime is gone).
    #[error("the registry is closed")]
    Closed,
    /// No answer within the registry's timeout.
    #[error("no answer from etcd within {0:?}")]
    Timeout(Duration),
    /// The runtime dropped the request (it is shutting down).
    #[error("the etcd request was dropped")]
    Dropped,
    /// etcd refused the request, or could not be reached.
    #[error(transparent)]
    Etcd(#[from] etcd_client::Error),
}

/// Runs `fut` on `rt` and waits for it on this thread (which may belong to another runtime:
/// the future never needs it), for at most `timeout`.
fn block_on<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    timeout: Duration,
    fut: impl Future<Output = T> + Send + 'static,
) -> Result<T, EtcdError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(tokio::time::timeout(timeout, fut).await);
    });
    match rx.recv() {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(_)) => Err(EtcdError::Timeout(timeout)),
        Err(_) => Err(EtcdError::Dropped),
    }
}

impl Registry for EtcdRegistry {
    /// Checks that this master still leads (the leader key has the create revision it was
    /// elected at) and reads the registry; the epoch is that revision. Leadership itself is
    /// won before, by [`crate::ha`].
    fn open_epoch(&mut self) -> Result<RegistryState, RegistryError> {
        let open_err = |s: &Self, reason: String| RegistryError::Open { path: s.path(), reason };
        let kv = self.client.kv_client();
        let leader = self.keys.leader();
        let prefix = self.keys.registry();
        let (leader_rev, records) = self
            .run(move || {
                let (mut kv, leader, prefix) = (kv.clone(), leader.clone(), prefix.clone());
                async move {
                    // One revision for both reads: the registry as the leader key vouches for it.
                    let first = kv.get(leader, None).await?;
                    let rev = first.header().map_or(0, |h| h.revision());
                    let leader_rev = first.kvs().first().map_or(0, |kv| kv.create_revision());
                    // In pages, all at that revision: a large registry fits no single message.
                    let end = prefix_end(&prefix);
                    let mut records = Vec::new();
                    let mut from = prefix.into_bytes();
                    loop {
                        let opts =
                            GetOptions::new().with_range(end.clone()).with_limit(PAGE).with_revision(rev);
                        let mut page = kv.get(from.clone(), Some(opts)).await?;
                        let more = page.more();
                        let kvs = page.take_kvs();
                        let Some(last) = kvs.last() else { break };
                        from = last.key().to_vec();
                        from.push(0);
                        records.extend(kvs);
                        if !more {
                            break;
                        }
                    }
                    Ok((leader_rev, records))
                }
            })
            .map_err(|e| open_err(self, e.to_string()))?;
        if leader_rev != self.epoch {
            return Err(RegistryError::Fenced {
                path: self.path(),
                found: u64::try_from(leader_rev).unwrap_or(0),
                ours: u64::try_from(self.epoch).unwrap_or(0),
            });
        }
        let mut state = RegistryState {
            epoch: u64::try_from(self.epoch).unwrap_or(0),
            cluster: self.cluster.clone(),
            ..RegistryState::default()
        };
        let prefix = self.keys.registry();
        for kv in &records {
            let key = kv.key();
            let rest = key.strip_prefix(prefix.as_bytes()).unwrap_or(key);
            if rest.starts_with(b"frameworks/") {
                let f: FrameworkRecord = self.decode("framework", key, kv.value())?;
                state.frameworks.insert(f.id.clone(), f);
            } else if rest.starts_with(b"agents/") {
                let a: AgentRecord = self.decode("agent", key, kv.value())?;
                state.agents.insert(a.id.clone(), a);
            } else if rest.starts_with(b"artifacts/") {
                let a: ArtifactRecord = self.decode("artifact", key, kv.value())?;
                state.artifacts.insert(a.digest.clone(), a);
            } else if rest == b"policy/current" {
                state.policy = Some(self.decode("allocation policy", key, kv.value())?);
            }
        }
        Ok(state)
    }

    fn apply(&mut self, ops: &[RegistryOp]) -> Result<(), RegistryError> {
        for chunk in ops.chunks(MAX_TXN_OPS) {
            let txn = Txn::new()
                .when([Compare::create_revision(self.keys.leader(), CompareOp::Equal, self.epoch)])
                .and_then(chunk.iter().map(|op| self.txn_op(op)).collect::<Vec<_>>());
            let kv = self.client.kv_client();
            let resp = self
                .run(move || {
                    let (mut kv, txn) = (kv.clone(), txn.clone());
                    async move { kv.txn(txn).await }
                })
                .map_err(|e| RegistryError::Write { path: self.path(), reason: e.to_string() })?;
            if !resp.succeeded() {
                let found = self.leader_revision().unwrap_or(0);
                return Err(RegistryError::Fenced {
                    path: self.path(),
                    found: u64::try_from(found).unwrap_or(0),
                    ours: u64::try_from(self.epoch).unwrap_or(0),
                });
            }
        }
        Ok(())
    }

    fn location(&self) -> String {
        format!("etcd {} {}", self.endpoints, self.keys.prefix)
    }
}
