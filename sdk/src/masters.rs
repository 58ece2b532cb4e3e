//! Several masters: the list a client is given (`--master a:5050,b:5050`, or a list in
//! `client.toml`) and the search for the leader among them.
//!
//! Every client (the SDK scheduler driver, the operator client of the CLI, the agent) connects
//! through [`MasterSearch::connect`]: it tries the last leader it knew first, then the others in
//! list order; a standby's [`NotLeader`](crate::proto::HelloReply::NotLeader) with the leader's address sends it there
//! (at most [`MAX_REDIRECTS`] times per search, to an address that need not be in the list);
//! a master that does not answer within [`NEXT_MASTER_AFTER`] gets company: the next master is
//! tried alongside it, so one dead address costs half a second rather than the full handshake
//! timeout. When no master leads, the error names what each one said. Backoff between searches
//! is the caller's: the driver and the agent have their own, and [`MasterSearch::connect_patiently`]
//! is the CLI's.
//!
//! Fencing: a search remembers the highest epoch a leader's `Welcome` carried
//! ([`MasterSearch::accept_epoch`]) and drops a master whose `Welcome` carries a lower one (a
//! deposed leader that has not noticed yet), going on to the next.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};

use crate::client::{ClientError, Session};
use crate::proto::Role;
use crate::tls::TlsFiles;

/// Most masters a list may name.
pub const MAX_MASTERS: usize = 16;
/// Longest `host:port` accepted (in a list, or from a standby naming the leader).
pub const MAX_ADDRESS_LEN: usize = 255;
/// Most `NotLeader` redirects one search follows.
pub const MAX_REDIRECTS: usize = 4;
/// How long a search waits for one master's answer before trying the next one alongside.
pub const NEXT_MASTER_AFTER: Duration = Duration::from_millis(500);
/// Searches [`MasterSearch::connect_patiently`] makes while masters answer but none leads
/// (an election in progress), with a pause doubling from [`PATIENT_PAUSE`] between them.
pub const PATIENT_SEARCHES: u32 = 4;
/// The first pause of [`MasterSearch::connect_patiently`].
pub const PATIENT_PAUSE: Duration = Duration::from_millis(500);

/// A master list that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MasterListError {
    /// Nothing was given.
    #[error("no master address given")]
    Empty,
    /// More than [`MAX_MASTERS`] entries.
    #[error("{count} master addresses given; at most {MAX_MASTERS} are accepted")]
    TooMany {
        /// How many were given.
        count: usize,
    },
    /// One entry is not `host:port`.
    #[error("bad master address `{entry}`: {why} (expected host:port, e.g. 10.0.0.1:5050)")]
    Bad {
        /// The entry (cut to [`MAX_ADDRESS_LEN`] characters).
        entry: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// Checks one `host:port` entry (a name, an IPv4 address, or `[IPv6]`, and a port 1–65535).
pub fn check_master(entry: &str) -> Result<(), MasterListError> {
    let bad = |why| MasterListError::Bad { entry: entry.chars().take(MAX_ADDRESS_LEN).collect(), why };
    if entry.is_empty() {
        return Err(bad("empty entry (two commas in a row, or a comma at an end?)"));
    }
    if entry.len() > MAX_ADDRESS_LEN {
        return Err(bad("longer than 255 bytes"));
    }
    if entry.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("contains whitespace or control characters"));
    }
    let Some((host, port)) = entry.rsplit_once(':') else {
        return Err(bad("no port"));
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let bracketed = host.starts_with('[') && host.ends_with(']') && host.len() > 2;
    if host.contains(':') && !bracketed {
        return Err(bad("an IPv6 address goes in brackets: [::1]:5050"));
    }
    if (host.starts_with('[') || host.ends_with(']')) && !bracketed {
        return Err(bad("unbalanced brackets"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(bad("the port is not a number from 1 to 65535")),
    }
}

/// The masters of a cluster found through etcd, as Mesos clients find theirs through
/// ZooKeeper: `etcd://HOST:PORT[,HOST:PORT…]/CLUSTER` names etcd's client endpoints and the
/// cluster name the masters were given (`agora master --etcd … --cluster-name CLUSTER`). A
/// search reads the masters registered there, and the leader, before it starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdMasters {
    /// etcd's client URLs (`http://HOST:PORT`).
    pub endpoints: Vec<String>,
    /// The cluster name (the key prefix `/agora/CLUSTER/`).
    pub cluster: String,
}

/// The scheme of a master address found through etcd.
pub const ETCD_SCHEME: &str = "etcd://";

impl EtcdMasters {
    /// Parses `etcd://h1:2379,h2:2379/CLUSTER`; `None` when `s` is not of that form.
    pub fn parse(s: &str) -> Option<Result<Self, MasterListError>> {
        let rest = s.trim().strip_prefix(ETCD_SCHEME)?;
        let bad = |why| MasterListError::Bad { entry: s.chars().take(MAX_ADDRESS_LEN).collect(), why };
        let Some((hosts, cluster)) = rest.split_once('/') else {
            return Some(Err(bad("an etcd:// address ends with /CLUSTER, the masters' --cluster-name")));
        };
        let cluster_ok = !cluster.is_empty()
            && cluster.len() <= 64
            && cluster.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
        if !cluster_ok {
            return Some(Err(bad("the cluster name after the / is 1 to 64 letters, digits, '-', '_', '.'")));
        }
        Some(parse_masters(hosts).map(|hosts| EtcdMasters {
            endpoints: hosts.iter().map(|h| format!("http://{h}")).collect(),
            cluster: cluster.to_string(),
        }))
    }
}

impl std::fmt::Display for EtcdMasters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hosts: Vec<&str> = self.endpoints.iter().map(|e| e.trim_start_matches("http://")).collect();
        write!(f, "{ETCD_SCHEME}{}/{}", hosts.join(","), self.cluster)
    }
}

/// Checks what `--master` or client.toml's `master` may hold: a list of `host:port`, or an
/// [`EtcdMasters`] address.
pub fn check_master_list(list: &str) -> Result<(), MasterListError> {
    match EtcdMasters::parse(list) {
        Some(r) => r.map(drop),
        None => parse_masters(list).map(drop),
    }
}

/// Parses `a:5050,b:5050,c:5050` (spaces around entries allowed; duplicates dropped).
pub fn parse_masters(list: &str) -> Result<Vec<String>, MasterListError> {
    let entries: Vec<&str> = list.split(',').map(str::trim).collect();
    if entries.len() > MAX_MASTERS {
        return Err(MasterListError::TooMany { count: entries.len() });
    }
    if entries.iter().all(|e| e.is_empty()) {
        return Err(MasterListError::Empty);
    }
    let mut out: Vec<String> = Vec::with_capacity(entries.len());
    for e in entries {
        check_master(e)?;
        if !out.iter().any(|o| o == e) {
            out.push(e.to_string());
        }
    }
    Ok(out)
}

/// Finds and follows the leader among a list of masters; remembers the last leader and the
/// highest epoch seen across searches (keep one per client for its whole life).
#[derive(Clone, Debug)]
pub struct MasterSearch {
    masters: Vec<String>,
    leader: Option<String>,
    epoch: u64,
    /// Where the list comes from when it is read from etcd at each search.
    etcd: Option<EtcdMasters>,
}

impl MasterSearch {
    /// A search over `list` (`host:port`, or several separated by commas), or over the masters
    /// registered in etcd (`etcd://h1:2379,h2:2379/CLUSTER`, see [`EtcdMasters`]).
    pub fn new(list: &str) -> Result<Self, MasterListError> {
        if let Some(etcd) = EtcdMasters::parse(list) {
            let etcd = etcd?;
            if !cfg!(feature = "etcd") {
                return Err(MasterListError::Bad {
                    entry: list.chars().take(MAX_ADDRESS_LEN).collect(),
                    why: "etcd:// addresses need agora-sdk's `etcd` feature (the agora binary has it)",
                });
            }
            return Ok(MasterSearch { masters: Vec::new(), leader: None, epoch: 0, etcd: Some(etcd) });
        }
        Ok(MasterSearch { masters: parse_masters(list)?, leader: None, epoch: 0, etcd: None })
    }

    /// The masters of the list, in order (from etcd: as the last search read them).
    pub fn masters(&self) -> &[String] {
        &self.masters
    }

    /// The masters to try: the list, or those registered in etcd now (the leader first;
    /// the list read before is kept when etcd cannot be read and one was read before).
    pub async fn candidates(&mut self) -> Result<Vec<String>, ClientError> {
        #[cfg(feature = "etcd")]
        if let Some(etcd) = &self.etcd {
            match etcd_discovery::read(etcd).await {
                Ok((masters, leader)) => {
                    self.masters = masters;
                    if leader.is_some() {
                        self.leader = leader;
                    }
                }
                Err(e) if self.masters.is_empty() => {
                    return Err(ClientError::NoLeader { tried: vec![(etcd.to_string(), e.to_string())] });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the masters from etcd; trying the ones read before")
                }
            }
        }
        Ok(self.masters.clone())
    }

    /// The address of the last leader this search connected to (it may be outside the list:
    /// a standby named it).
    pub fn leader(&self) -> Option<&str> {
        self.leader.as_deref()
    }

    /// The highest leader epoch seen (0 before the first `Welcome`).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Raises the lowest epoch accepted (an epoch remembered elsewhere, e.g. on disk).
    pub fn set_min_epoch(&mut self, epoch: u64) {
        self.epoch = self.epoch.max(epoch);
    }

    /// Whether a master whose `Welcome` carries `epoch` may be served: not when a higher
    /// epoch was seen before (it is a deposed leader). Remembers `epoch` when it is accepted.
    pub fn accept_epoch(&mut self, epoch: u64) -> bool {
        if epoch < self.epoch {
            return false;
        }
        self.epoch = epoch;
        true
    }

    /// The order of one search: the last leader, then the list.
    fn order(&self) -> VecDeque<String> {
        let mut order: VecDeque<String> = self.leader.iter().cloned().collect();
        order.extend(self.masters.iter().filter(|m| Some(*m) != self.leader.as_ref()).cloned());
        order
    }

    /// One search: connects to the leader and says hello as `role`. The error, when none
    /// leads, is the only master's own (a list of one), else [`ClientError::NoLeader`] naming
    /// what each said. A refusal ([`ClientError::Refused`]: wrong role, another protocol) or
    /// unusable local TLS files end the search at once.
    pub async fn connect(&mut self, files: &TlsFiles, role: Role) -> Result<Session, ClientError> {
        if self.etcd.is_some() {
            self.candidates().await?;
        }
        let mut queue = self.order();
        let mut started: HashSet<String> = HashSet::new();
        let mut failures: Vec<(String, ClientError)> = Vec::new();
        let mut redirects = 0;
        let mut pending = FuturesUnordered::new();
        let mut next_at = tokio::time::Instant::now();
        loop {
            if !queue.is_empty() && (pending.is_empty() || tokio::time::Instant::now() >= next_at) {
                let Some(addr) = queue.pop_front() else { continue };
                if started.insert(addr.clone()) {
                    let files = files.clone();
                    pending.push(async move {
                        let r = Session::connect(&addr, &files, role).await;
                        (addr, r)
                    });
                    next_at = tokio::time::Instant::now() + NEXT_MASTER_AFTER;
                }
                continue;
            }
            if pending.is_empty() {
                break;
            }
            let (addr, result) = tokio::select! {
                Some(done) = pending.next() => done,
                () = tokio::time::sleep_until(next_at), if !queue.is_empty() => continue,
            };
            // Whatever came back, the next master need not wait for the stagger.
            next_at = tokio::time::Instant::now();
            match result {
                Ok(session) => {
                    if self.accept_epoch(session.epoch) {
                        tracing::debug!(master = %addr, epoch = session.epoch, "connected to the leader");
                        self.leader = Some(addr);
                        return Ok(session);
                    }
                    tracing::warn!(master = %addr, epoch = session.epoch, seen = self.epoch,
                        "a master leads an older epoch than one seen before (a deposed leader); dropping it");
                    session.conn.close(0u32.into(), b"deposed leader: older epoch");
                    let (epoch, seen) = (session.epoch, self.epoch);
                    failures.push((addr.clone(), ClientError::StaleEpoch { addr, epoch, seen }));
                }
                Err(ClientError::NotLeader { addr: peer, leader }) => {
                    if self.leader.as_deref() == Some(&addr) {
                        self.leader = None;
                    }
                    match &leader {
                        Some(l) if check_master(l).is_err() => {
                            tracing::warn!(master = %addr, "a standby named an unusable leader address; ignored");
                        }
                        Some(l) if !started.contains(l) && redirects < MAX_REDIRECTS => {
                            redirects += 1;
                            tracing::debug!(master = %addr, leader = %l, "not the leader; following");
                            queue.retain(|q| q != l);
                            queue.push_front(l.clone());
                        }
                        _ => {}
                    }
                    failures.push((addr, ClientError::NotLeader { addr: peer, leader }));
                }
                Err(e @ (ClientError::Tls(_) | ClientError::Refused(_) | ClientError::Config(_))) => {
                    return Err(e)
                }
                Err(e) => {
                    if self.leader.as_deref() == Some(&addr) {
                        self.leader = None;
                    }
                    failures.push((addr, e));
                }
            }
        }
        if failures.len() == 1 {
            if let Some((_, e)) = failures.pop() {
                return Err(e);
            }
        }
        Err(ClientError::NoLeader {
            tried: failures.into_iter().map(|(addr, e)| (addr, e.to_string())).collect(),
        })
    }

    /// [`MasterSearch::connect`], searching again (up to [`PATIENT_SEARCHES`] times, with
    /// pauses) while masters answer but none leads yet: a leader election in progress. For
    /// one-shot clients (the CLI); long-lived ones have their own backoff.
    pub async fn connect_patiently(&mut self, files: &TlsFiles, role: Role) -> Result<Session, ClientError> {
        let mut pause = PATIENT_PAUSE;
        let mut searches = 1;
        loop {
            match self.connect(files, role).await {
                Err(e) if searches < PATIENT_SEARCHES && electing(&e) => {
                    tracing::debug!(error = %e, ?pause, "no leader yet; searching again");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                    searches += 1;
                }
                other => return other,
            }
        }
    }
}

/// Reading the masters of a cluster from etcd (the keys `agora master --etcd` writes: one
/// record per running master under `/agora/CLUSTER/masters/`, the leader's under
/// `/agora/CLUSTER/leader`; each `{"id": …, "address": "host:port"}`).
#[cfg(feature = "etcd")]
mod etcd_discovery {
    use std::time::Duration;

    use super::{check_master, EtcdMasters, MAX_MASTERS};

    /// How long reading etcd may take, connection included.
    const TIMEOUT: Duration = Duration::from_secs(3);

    /// Why the masters could not be read from etcd.
    #[derive(Debug, thiserror::Error)]
    pub(super) enum DiscoveryError {
        /// etcd did not answer in time.
        #[error("etcd did not answer within {0:?}")]
        Timeout(Duration),
        /// etcd could not be reached or refused the reads.
        #[error("cannot read the masters from etcd: {0}")]
        Etcd(#[source] etcd_client::Error),
        /// No master has registered (with a valid address).
        #[error("no master is registered in etcd under {prefix}")]
        NoneRegistered {
            /// The cluster's key prefix.
            prefix: String,
        },
    }

    #[derive(serde::Deserialize)]
    struct Member {
        address: String,
    }

    fn address(value: &[u8]) -> Option<String> {
        let m: Member = serde_json::from_slice(value).ok()?;
        check_master(&m.address).ok().map(|()| m.address)
    }

    /// The masters registered (at most [`MAX_MASTERS`], the leader first) and the leader's
    /// address.
    pub(super) async fn read(etcd: &EtcdMasters) -> Result<(Vec<String>, Option<String>), DiscoveryError> {
        let opts = etcd_client::ConnectOptions::new().with_connect_timeout(TIMEOUT).with_timeout(TIMEOUT);
        let prefix = format!("/agora/{}/", etcd.cluster);
        let read = async {
            let mut client = etcd_client::Client::connect(&etcd.endpoints, Some(opts)).await?;
            let leader = client.get(format!("{prefix}leader"), None).await?;
            let opts = etcd_client::GetOptions::new().with_prefix().with_limit(MAX_MASTERS as i64);
            let members = client.get(format!("{prefix}masters/"), Some(opts)).await?;
            Ok::<_, etcd_client::Error>((leader, members))
        };
        let (leader, members) = tokio::time::timeout(TIMEOUT, read)
            .await
            .map_err(|_| DiscoveryError::Timeout(TIMEOUT))?
            .map_err(DiscoveryError::Etcd)?;
        let leader = leader.kvs().first().and_then(|kv| address(kv.value()));
        let mut masters: Vec<String> = leader.iter().cloned().collect();
        for kv in members.kvs() {
            if let Some(a) = address(kv.value()) {
                if !masters.contains(&a) {
                    masters.push(a);
                }
            }
        }
        if masters.is_empty() {
            return Err(DiscoveryError::NoneRegistered { prefix });
        }
        masters.truncate(MAX_MASTERS);
        Ok((masters, leader))
    }
}

/// Whether a failed search met standbys that know no leader (an election in progress).
fn electing(e: &ClientError) -> bool {
    match e {
        ClientError::NotLeader { leader: None, .. } => true,
        ClientError::NoLeader { tried } => tried.iter().any(|(_, why)| why.contains("not the leader")),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Hello, HelloReply, PROTOCOL_VERSION};

    #[test]
    fn etcd_addresses_parse_and_bad_ones_are_named() {
        let e = EtcdMasters::parse("etcd://10.0.0.1:2379, e2:2379/prod").unwrap().unwrap();
        assert_eq!(e.endpoints, ["http://10.0.0.1:2379", "http://e2:2379"]);
        assert_eq!(e.cluster, "prod");
        assert_eq!(e.to_string(), "etcd://10.0.0.1:2379,e2:2379/prod");
        assert!(EtcdMasters::parse("a:5050,b:5050").is_none());
        let bad = |s: &str| check_master_list(s).unwrap_err().to_string();
        assert!(bad("etcd://e1:2379").contains("ends with /CLUSTER"), "{}", bad("etcd://e1:2379"));
        assert!(bad("etcd://e1:2379/").contains("cluster name"));
        assert!(bad("etcd://e1:2379/a/b").contains("cluster name"));
        assert!(bad("etcd://e1/prod").contains("no port"), "{}", bad("etcd://e1/prod"));
        assert!(check_master_list("etcd://e1:2379/prod").is_ok());
        assert!(check_master_list("a:1,b:2").is_ok());
    }

    #[test]
    fn lists_parse_and_bad_entries_are_named() {
        assert_eq!(parse_masters("a:5050").unwrap(), ["a:5050"]);
        assert_eq!(
            parse_masters("10.0.0.1:5050, b.example:5051,[::1]:5052,a.b:1,10.0.0.1:5050").unwrap(),
            ["10.0.0.1:5050", "b.example:5051", "[::1]:5052", "a.b:1"]
        );
        assert_eq!(parse_masters("").unwrap_err(), MasterListError::Empty);
        assert_eq!(parse_masters(" , ").unwrap_err(), MasterListError::Empty);
        let bad = |s: &str| parse_masters(s).unwrap_err().to_string();
        assert!(bad("a:5050,,b:5050").contains("empty entry"), "{}", bad("a:5050,,b:5050"));
        assert!(bad("a:5050,b").contains("`b`: no port"), "{}", bad("a:5050,b"));
        assert!(bad("a:0").contains("port"));
        assert!(bad("a:99999").contains("port"));
        assert!(bad("a:x").contains("port"));
        assert!(bad(":5050").contains("no host"));
        assert!(bad("::1:5050").contains("brackets"));
        assert!(bad("[::1:5050").contains("brackets"));
        assert!(bad("a b:5050").contains("whitespace"));
        let long = format!("{}:1", "h".repeat(300));
        let e = bad(&long);
        assert!(e.contains("longer than 255") && e.len() < 400, "{e}");
        let many = vec!["a:1"; MAX_MASTERS + 1].join(",");
        assert!(matches!(parse_masters(&many), Err(MasterListError::TooMany { count: 17 })));
    }

    #[test]
    fn the_last_leader_goes_first_and_epochs_only_rise() {
        let mut s = MasterSearch::new("a:1,b:2,c:3").unwrap();
        assert_eq!(s.order(), ["a:1", "b:2", "c:3"]);
        s.leader = Some("c:3".into());
        assert_eq!(s.order(), ["c:3", "a:1", "b:2"]);
        s.leader = Some("elsewhere:4".into());
        assert_eq!(s.order(), ["elsewhere:4", "a:1", "b:2", "c:3"]);
        assert!(s.accept_epoch(3));
        assert!(s.accept_epoch(3), "the same leader again");
        assert!(!s.accept_epoch(2), "a deposed leader");
        assert_eq!(s.epoch(), 3);
        s.set_min_epoch(7);
        assert!(!s.accept_epoch(6));
        s.set_min_epoch(1);
        assert_eq!(s.epoch(), 7);
    }

    /// A fake master on loopback: answers every `Hello` with `reply` and keeps the connection
    /// open until the client closes it. Its address, and the task serving it.
    fn fake_master(tls: &std::path::Path, reply: HelloReply) -> (String, tokio::task::JoinHandle<()>) {
        let cfg = crate::transport::server_config(&TlsFiles::in_dir(tls, "master")).unwrap();
        let endpoint = quinn::Endpoint::server(cfg, ([127, 0, 0, 1], 0).into()).unwrap();
        let addr = endpoint.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let reply = reply.clone();
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    let Ok((send, recv)) = conn.accept_bi().await else { return };
                    let mut w = crate::frame::FrameWriter::new(send);
                    let mut r = crate::frame::FrameReader::new(recv);
                    if let Ok(Some(Hello { .. })) = r.recv::<Hello>().await {
                        let _ = w.send(&reply).await;
                    }
                    conn.closed().await;
                });
            }
        });
        (addr, task)
    }

    fn welcome(epoch: u64) -> HelloReply {
        HelloReply::Welcome { version: PROTOCOL_VERSION, master_id: format!("fake-{epoch}"), epoch }
    }

    /// A loopback port nothing listens on.
    fn dead_addr() -> String {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().to_string()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lower_epoch_is_refused_and_the_search_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        crate::tls::init(dir.path(), "tester", false).unwrap();
        let files = TlsFiles::in_dir(dir.path(), "framework");
        let (new, _a) = fake_master(dir.path(), welcome(5));
        let (old, _b) = fake_master(dir.path(), welcome(3));
        // The search the driver keeps across reconnections: it saw epoch 5 once.
        let mut search = MasterSearch::new(&new).unwrap();
        let s = search.connect(&files, Role::Framework).await.unwrap();
        assert_eq!((s.epoch, search.epoch()), (5, 5));
        s.conn.close(0u32.into(), b"");
        // Now the deposed leader comes first and still says Welcome: refused, the next leads.
        let mut search = MasterSearch { masters: vec![old.clone(), new.clone()], ..search };
        search.leader = Some(old.clone());
        let s = search.connect(&files, Role::Framework).await.unwrap();
        assert_eq!(s.epoch, 5);
        assert_eq!(search.leader(), Some(new.as_str()));
        s.conn.close(0u32.into(), b"");
        // Alone, the deposed leader is refused with an error that says so.
        let mut alone = MasterSearch::new(&old).unwrap();
        alone.set_min_epoch(search.epoch());
        match alone.connect(&files, Role::Framework).await {
            Err(ClientError::StaleEpoch { epoch: 3, seen: 5, .. }) => {}
            Err(e) => panic!("expected a stale epoch refusal, got {e}"),
            Ok(s) => panic!("the deposed leader was accepted (epoch {})", s.epoch),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn standbys_redirect_to_the_leader_and_failures_are_each_named() {
        let dir = tempfile::tempdir().unwrap();
        crate::tls::init(dir.path(), "tester", false).unwrap();
        let files = TlsFiles::in_dir(dir.path(), "operator");
        let (leader, _l) = fake_master(dir.path(), welcome(2));
        let (standby, _s) = fake_master(dir.path(), HelloReply::NotLeader { leader: Some(leader.clone()) });
        let (lost, _n) = fake_master(dir.path(), HelloReply::NotLeader { leader: None });
        let (liar, _x) =
            fake_master(dir.path(), HelloReply::NotLeader { leader: Some("not an address".into()) });
        // The leader is outside the list: the standby's redirect is followed.
        let dead = dead_addr();
        let mut search = MasterSearch::new(&format!("{dead},{standby}")).unwrap();
        let s = search.connect(&files, Role::Operator).await.unwrap();
        assert_eq!(s.epoch, 2);
        assert_eq!(search.leader(), Some(leader.as_str()));
        s.conn.close(0u32.into(), b"");
        // No leader anywhere: each master's answer is in the error.
        let mut search = MasterSearch::new(&format!("{lost},{liar}")).unwrap();
        let e = search.connect(&files, Role::Operator).await.err().expect("no leader").to_string();
        assert!(e.contains(&lost) && e.contains(&liar) && e.contains("not the leader"), "{e}");
        // Standbys pointing at each other: the redirects stop.
        let (a, _a) = fake_master(dir.path(), HelloReply::NotLeader { leader: Some(lost.clone()) });
        let mut search = MasterSearch::new(&a).unwrap();
        let e = search.connect_patiently(&files, Role::Operator).await.err().expect("no leader");
        assert!(matches!(&e, ClientError::NoLeader { tried } if tried.len() == 2), "{e}");
    }
}
