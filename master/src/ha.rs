//! Several masters, one leader: leader election, membership and fencing through etcd
//! (`agora master --etcd`).
//!
//! Every master holds an etcd lease of `--etcd-lease-ttl` and keeps it alive; on it hang its
//! membership key (`/agora/<cluster>/masters/<id>`, what `agora masters` lists) and, for the
//! leader, the leader key (`/agora/<cluster>/leader`). A master becomes leader by creating the
//! leader key in a transaction that requires it to be absent; the key's create revision is the
//! leader's epoch. The others watch the key and try again as soon as it goes (the leader's
//! lease expired or was revoked).
//!
//! A leader that cannot confirm its lease (a keep-alive unanswered for half the TTL, or etcd
//! answering that the lease is gone) steps down at once: well
//! before the lease can expire on etcd's side, so before any other master can be elected. Its
//! registry writes are fenced on the leader key anyway ([`crate::registry::EtcdRegistry`]).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use agora_sdk::proto::MasterView;
use etcd_client::{Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{debug, warn};

pub use crate::registry::etcd::EtcdKeys;
use crate::registry::etcd::{connect_options, prefix_end, PAGE};
use crate::registry::{AgentRecord, ArtifactRecord, FrameworkRecord};

/// Why the etcd side of high availability failed.
#[derive(Debug, thiserror::Error)]
pub enum HaError {
    /// An etcd request failed or timed out.
    #[error("etcd ({endpoints}): {what}: {reason}")]
    Etcd { endpoints: String, what: &'static str, reason: String },
    /// A bad `--cluster-name`.
    #[error("invalid cluster name `{0}`: 1 to 64 letters, digits, `-`, `_` or `.`")]
    ClusterName(String),
    /// A bad `--etcd` list.
    #[error(
        "invalid --etcd `{0}`: give one or more URLs such as http://127.0.0.1:2379, separated by commas"
    )]
    Endpoints(String),
}

/// Settings of a master among several.
#[derive(Clone, Debug)]
pub struct HaConfig {
    /// etcd's client URLs.
    pub endpoints: Vec<String>,
    /// The cluster's name: the etcd key prefix and the stable part of master ids.
    pub cluster: String,
    /// The lease's time to live (whole seconds, at least 1; etcd may raise it).
    pub lease_ttl: Duration,
    /// `host:port` that peers reach this master at (what standbys name as the leader).
    pub advertise: String,
}

/// Checks a cluster name: it becomes part of etcd keys and of every id the master makes.
pub fn check_cluster_name(name: &str) -> Result<(), HaError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(HaError::ClusterName(name.chars().take(80).collect()))
    }
}

/// Splits and checks `--etcd` (comma-separated URLs).
pub fn parse_endpoints(s: &str) -> Result<Vec<String>, HaError> {
    let eps: Vec<String> = s.split(',').map(|e| e.trim().to_string()).filter(|e| !e.is_empty()).collect();
    let ok = !eps.is_empty()
        && eps.len() <= 16
        && eps.iter().all(|e| (e.starts_with("http://") || e.starts_with("https://")) && e.len() < 256);
    if ok {
        Ok(eps)
    } else {
        Err(HaError::Endpoints(s.chars().take(200).collect()))
    }
}

/// A master's membership record (`masters/<id>`), also the leader key's value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// Unique per master process.
    pub id: String,
    /// `host:port` peers connect to.
    pub address: String,
}

/// The outcome of one try at leadership.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// This master leads from now on, with this epoch.
    Won { epoch: u64 },
    /// Another master leads (`leader`: its address, if readable); `revision` is where to
    /// watch from.
    Lost { leader: Option<String>, revision: i64 },
}

/// One master's side of the election.
pub struct Election {
    client: Client,
    keys: EtcdKeys,
    endpoints: String,
    me: MemberRecord,
    ttl: Duration,
    lease: Option<i64>,
}

impl std::fmt::Debug for Election {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Election").field("me", &self.me).field("lease", &self.lease).finish()
    }
}

impl Election {
    /// Connects to etcd. Requests fail after the lease's TTL (at least a second).
    pub async fn connect(cfg: &HaConfig) -> Result<Self, HaError> {
        check_cluster_name(&cfg.cluster)?;
        let ttl = Duration::from_secs(cfg.lease_ttl.as_secs_f64().ceil().max(1.0) as u64);
        let endpoints = cfg.endpoints.join(",");
        let client =
            Client::connect(&cfg.endpoints, Some(connect_options(request_timeout(ttl)))).await.map_err(
                |e| HaError::Etcd { endpoints: endpoints.clone(), what: "connect", reason: e.to_string() },
            )?;
        let me =
            MemberRecord { id: uuid::Uuid::new_v4().simple().to_string(), address: cfg.advertise.clone() };
        Ok(Election { client, keys: EtcdKeys::new(&cfg.cluster), endpoints, me, ttl, lease: None })
    }

    fn err(&self, what: &'static str) -> impl Fn(etcd_client::Error) -> HaError + '_ {
        move |e| HaError::Etcd { endpoints: self.endpoints.clone(), what, reason: e.to_string() }
    }

    /// The lease's time to live as etcd granted it.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// This master's membership record.
    pub fn me(&self) -> &MemberRecord {
        &self.me
    }

    /// The cluster's operator view (every master, which leads).
    pub fn members(&self) -> Members {
        Members { client: self.client.clone(), keys: self.keys.clone(), endpoints: self.endpoints.clone() }
    }

    /// Takes a new lease, puts the membership key on it and keeps it alive in a task of its
    /// own. The receiver turns `false` (for good) once the lease cannot be vouched for.
    pub async fn new_lease(&mut self) -> Result<watch::Receiver<bool>, HaError> {
        let asked_at = Instant::now();
        let grant = self
            .client
            .lease_grant(self.ttl.as_secs() as i64, None)
            .await
            .map_err(self.err("lease grant"))?;
        let id = grant.id();
        self.ttl = Duration::from_secs(grant.ttl().max(1) as u64);
        self.lease = Some(id);
        let record = serde_json::to_vec(&self.me).unwrap_or_default();
        let key = format!("{}{}", self.keys.masters(), self.me.id);
        self.client
            .put(key, record, Some(PutOptions::new().with_lease(id)))
            .await
            .map_err(self.err("membership"))?;
        let (alive_tx, alive) = watch::channel(true);
        let lease_client = self.client.lease_client();
        tokio::spawn(keep_alive(lease_client, id, self.ttl, asked_at, alive_tx));
        Ok(alive)
    }

    /// Tries once to become leader: creates the leader key on our lease if it is absent.
    pub async fn try_lead(&mut self) -> Result<Attempt, HaError> {
        let Some(lease) = self.lease else {
            return Err(HaError::Etcd {
                endpoints: self.endpoints.clone(),
                what: "campaign",
                reason: "no lease".into(),
            });
        };
        let key = self.keys.leader();
        let value = serde_json::to_vec(&self.me).unwrap_or_default();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), value, Some(PutOptions::new().with_lease(lease)))])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.client.txn(txn).await.map_err(self.err("campaign"))?;
        let revision = resp.header().map_or(0, |h| h.revision());
        if resp.succeeded() {
            // The put is the transaction's only write: its revision is the key's create revision.
            return Ok(Attempt::Won { epoch: u64::try_from(revision).unwrap_or(0) });
        }
        let leader = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .and_then(|kv| serde_json::from_slice::<MemberRecord>(kv.value()).ok())
                .map(|m| m.address),
            _ => None,
        });
        Ok(Attempt::Lost { leader, revision })
    }

    /// Waits until the leader key changes after `revision` (or `max` passes, or the watch
    /// fails: the caller tries again either way).
    pub async fn wait_change(&mut self, revision: i64, max: Duration) {
        let opts = etcd_client::WatchOptions::new().with_start_revision(revision + 1);
        let watched = async {
            let mut stream = match self.client.watch(self.keys.leader(), Some(opts)).await {
                Ok(s) => s,
                Err(e) => {
                    debug!(error = %e, "cannot watch the leader key");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    return;
                }
            };
            while let Ok(Some(resp)) = stream.message().await {
                if resp.events().iter().any(|e| e.event_type() == EventType::Delete) || resp.canceled() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(max, watched).await;
    }

    /// Gives the lease up (the leader key and the membership key go with it), so that another
    /// master is elected at once rather than after the TTL. Best effort.
    pub async fn resign(&mut self) {
        if let Some(id) = self.lease.take() {
            match tokio::time::timeout(Duration::from_secs(1), self.client.lease_revoke(id)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => debug!(error = %e, "cannot revoke the lease"),
                Err(_) => debug!("cannot revoke the lease: no answer in time"),
            }
        }
    }
}

/// How long one etcd request may take.
fn request_timeout(ttl: Duration) -> Duration {
    ttl.max(Duration::from_secs(1))
}

/// Keeps lease `id` alive; sets `alive` to false and returns once it cannot be vouched for:
/// no keep-alive confirmed for half the TTL (counted from when the confirmed one was sent,
/// which is before etcd renewed it), or etcd saying the lease is gone. A keep-alive stream
/// that breaks (the etcd member it went to died, in a cluster of several) is opened again,
/// reaching another member, for as long as the lease is still vouched for.
async fn keep_alive(
    mut client: etcd_client::LeaseClient,
    id: i64,
    ttl: Duration,
    granted_at: Instant,
    alive: watch::Sender<bool>,
) {
    let tick = (ttl / 4).max(Duration::from_millis(50));
    let grace = ttl / 2;
    let mut confirmed = granted_at;
    let mut next = Instant::now();
    let why = loop {
        if confirmed.elapsed() > grace {
            break format!("no keep-alive confirmed for {:?}", confirmed.elapsed());
        }
        let broken = tokio::select! {
            r = keep_alive_stream(&mut client, id, tick, grace, &mut confirmed, &mut next) => r,
            _ = alive.closed() => break String::new(),
        };
        match broken {
            Broken::Lost(why) => break why,
            Broken::Stream(why) if confirmed.elapsed() > grace => break why,
            Broken::Stream(why) => {
                debug!(lease = id, reason = %why, "the keep-alive stream broke; opening another");
                tokio::time::sleep(Duration::from_millis(20)).await;
                next = Instant::now();
            }
        }
    };
    if !why.is_empty() {
        warn!(lease = id, reason = %why, "the etcd lease is lost");
    }
    alive.send_replace(false);
}

/// How one keep-alive stream ended.
enum Broken {
    /// The lease cannot be vouched for any more.
    Lost(String),
    /// The stream failed: another may do.
    Stream(String),
}

/// One keep-alive stream: a keep-alive every `tick` from `next` on, `confirmed` moved to the
/// sending time of every answered one; returns when the stream breaks or the lease is lost.
async fn keep_alive_stream(
    client: &mut etcd_client::LeaseClient,
    id: i64,
    tick: Duration,
    grace: Duration,
    confirmed: &mut Instant,
    next: &mut Instant,
) -> Broken {
    let (mut keeper, mut stream) = match tokio::time::timeout(tick, client.keep_alive(id)).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return Broken::Stream(format!("cannot keep the lease alive: {e}")),
        Err(_) => return Broken::Stream("opening the keep-alive stream is stuck".into()),
    };
    let mut sent: VecDeque<Instant> = VecDeque::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until((*next).into()) => {
                if confirmed.elapsed() > grace {
                    return Broken::Lost(format!("no keep-alive confirmed for {:?}", confirmed.elapsed()));
                }
                let at = Instant::now();
                match tokio::time::timeout(tick, keeper.keep_alive()).await {
                    Ok(Ok(())) => {
                        sent.push_back(at);
                        // Answers come in order; more than this outstanding means none come.
                        if sent.len() > 64 {
                            sent.pop_front();
                        }
                    }
                    Ok(Err(e)) => return Broken::Stream(format!("keep-alive failed: {e}")),
                    Err(_) => return Broken::Stream("keep-alive stuck".to_string()),
                }
                *next += tick;
            }
            m = stream.message() => match m {
                Ok(Some(r)) if r.ttl() > 0 => {
                    if let Some(at) = sent.pop_front() {
                        *confirmed = at;
                    }
                }
                Ok(Some(_)) => return Broken::Lost("etcd says the lease expired".to_string()),
                Ok(None) => return Broken::Stream("keep-alive stream ended".to_string()),
                Err(e) => return Broken::Stream(format!("keep-alive stream failed: {e}")),
            },
        }
    }
}

/// Lists the masters of a cluster (for `GetMasters`).
#[derive(Clone)]
pub struct Members {
    client: Client,
    keys: EtcdKeys,
    endpoints: String,
}

impl Members {
    /// Every registered master, the leader flagged with its epoch (the others' epoch is 0).
    pub async fn list(&self) -> Result<Vec<MasterView>, HaError> {
        let err = |what| {
            move |e: etcd_client::Error| HaError::Etcd {
                endpoints: self.endpoints.clone(),
                what,
                reason: e.to_string(),
            }
        };
        let mut kv = self.client.kv_client();
        let leader = kv.get(self.keys.leader(), None).await.map_err(err("leader"))?;
        let (leader, epoch) = leader
            .kvs()
            .first()
            .and_then(|kv| {
                let m = serde_json::from_slice::<MemberRecord>(kv.value()).ok()?;
                Some((Some(m.id), u64::try_from(kv.create_revision()).unwrap_or(0)))
            })
            .unwrap_or((None, 0));
        let members = kv
            .get(self.keys.masters(), Some(GetOptions::new().with_prefix().with_limit(1000)))
            .await
            .map_err(err("masters"))?;
        Ok(members
            .kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice::<MemberRecord>(kv.value()).ok())
            .map(|m| {
                let leads = leader.as_deref() == Some(m.id.as_str());
                MasterView {
                    id: m.id,
                    address: m.address,
                    leader: leads,
                    epoch: if leads { epoch } else { 0 },
                }
            })
            .collect())
    }
}

impl Members {
    /// The artifact index as etcd holds it now (at most `max` records, in digest order): a
    /// read that needs no leadership, for standbys keeping their stores in step
    /// ([`crate::replication`]).
    pub async fn artifacts(&self, max: usize) -> Result<Vec<ArtifactRecord>, HaError> {
        self.records("artifacts", "artifact index", max).await
    }

    /// The registry's frameworks as etcd holds them now (at most `max`): for a standby's stale
    /// listings (`--allow-stale`).
    pub async fn frameworks(&self, max: usize) -> Result<Vec<FrameworkRecord>, HaError> {
        self.records("frameworks", "frameworks", max).await
    }

    /// The registry's agents as etcd holds them now (at most `max`): for a standby's stale
    /// listings (`--allow-stale`).
    pub async fn agents(&self, max: usize) -> Result<Vec<AgentRecord>, HaError> {
        self.records("agents", "agents", max).await
    }

    /// At most `max` records of registry table `table`, in key order, all read at one revision,
    /// in pages. Records that do not decode are skipped (the leader reports them).
    async fn records<T: DeserializeOwned>(
        &self,
        table: &str,
        what: &'static str,
        max: usize,
    ) -> Result<Vec<T>, HaError> {
        let err = |e: etcd_client::Error| HaError::Etcd {
            endpoints: self.endpoints.clone(),
            what,
            reason: e.to_string(),
        };
        let mut kv = self.client.kv_client();
        let prefix = self.keys.table(table);
        let end = prefix_end(&prefix);
        let mut from = prefix.into_bytes();
        let mut out = Vec::new();
        let mut revision = 0;
        while out.len() < max {
            let limit = PAGE.min(i64::try_from(max - out.len()).unwrap_or(PAGE));
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(limit);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let mut page = kv.get(from.clone(), Some(opts)).await.map_err(err)?;
            if revision == 0 {
                revision = page.header().map_or(0, |h| h.revision());
            }
            let more = page.more();
            let kvs = page.take_kvs();
            let Some(last) = kvs.last() else { break };
            from = last.key().to_vec();
            from.push(0);
            out.extend(kvs.iter().filter_map(|kv| serde_json::from_slice::<T>(kv.value()).ok()));
            if !more {
                break;
            }
        }
        out.truncate(max);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_endpoints_are_urls_separated_by_commas() {
        assert_eq!(
            parse_endpoints("http://a:2379, https://b:2379").expect("two"),
            vec!["http://a:2379".to_string(), "https://b:2379".to_string()]
        );
        for bad in ["", ",", "a:2379", "ftp://a", &format!("http://{}", "a".repeat(300))] {
            let err = parse_endpoints(bad).expect_err(bad);
            assert!(err.to_string().contains("--etcd"), "{err}");
        }
        let many = vec!["http://a:1"; 17].join(",");
        assert!(parse_endpoints(&many).is_err(), "17 endpoints");
    }

    #[test]
    fn cluster_names_are_short_and_plain() {
        for ok in ["agora", "prod-eu.1", "a_b"] {
            check_cluster_name(ok).expect(ok);
        }
        for bad in ["", "a/b", "a b", "ü", &"x".repeat(65)] {
            let err = check_cluster_name(bad).expect_err(bad);
            assert!(err.to_string().contains("invalid cluster name"), "{err}");
        }
    }

    #[test]
    fn keys_live_under_the_cluster_prefix() {
        let k = EtcdKeys::new("prod");
        assert_eq!(k.leader(), "/agora/prod/leader");
        assert_eq!(k.masters(), "/agora/prod/masters/");
        assert_eq!(k.registry(), "/agora/prod/registry/");
        assert!(EtcdKeys::new("prod2").leader() != k.leader());
    }
}
