//! Several `agora master --etcd` processes on loopback for the high-availability tests: start
//! one, ask each who leads, wait for a settled leader, call the operator API.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use agora_sdk::client::{ClientError, Session};
use agora_sdk::proto::*;
use agora_sdk::tls::TlsFiles;

use super::dev::{Proc, AGORA};

/// The etcd key prefix of the test clusters.
pub const CLUSTER: &str = "hatest";

/// One `agora master --etcd` process.
pub struct HaMaster {
    pub proc: Proc,
    /// `host:port` it listens on.
    pub addr: String,
    /// Its `--work-dir`.
    pub work: PathBuf,
}

/// [`start_master_on`] a fresh port, with the work dir `dir/NAME`.
pub fn start_master(dir: &Path, name: &str, etcd_urls: &str) -> HaMaster {
    start_master_on(dir, name, etcd_urls, "127.0.0.1:0", &dir.join(name))
}

/// [`start_master_on`] a fresh port, with the work dir `work`.
pub fn start_master_in(dir: &Path, name: &str, work: &Path, etcd_urls: &str) -> HaMaster {
    start_master_on(dir, name, etcd_urls, "127.0.0.1:0", work)
}

impl HaMaster {
    /// Where this master's artifact store keeps `digest` (see `ArtifactStore::path`).
    pub fn artifact(&self, digest: &Digest) -> PathBuf {
        self.work.join("artifacts/sha256").join(digest.as_str())
    }
}

/// Starts `agora master --etcd ETCD_URLS` named `name` in `dir` (certificates in `dir/tls`),
/// listening on `listen` (`127.0.0.1:0` for a fresh port), with its work dir `work`, a 1 s
/// lease and a 200 ms allocation interval.
pub fn start_master_on(dir: &Path, name: &str, etcd_urls: &str, listen: &str, work: &Path) -> HaMaster {
    start_master_with(dir, name, etcd_urls, listen, work, &[])
}

/// [`start_master_on`] with more flags.
pub fn start_master_with(
    dir: &Path,
    name: &str,
    etcd_urls: &str,
    listen: &str,
    work: &Path,
    extra: &[&str],
) -> HaMaster {
    let (proc, addr) = Proc::spawn_master(name, dir, || {
        let mut c = Command::new(AGORA);
        c.args(["master", "--listen", listen, "--tls-dir"])
            .arg(dir.join("tls"))
            .arg("--work-dir")
            .arg(work)
            .args(["--etcd", etcd_urls, "--cluster-name", CLUSTER, "--etcd-lease-ttl", "1s"])
            .args(["--allocation-interval", "200ms"])
            .args(extra);
        c
    });
    HaMaster { proc, addr, work: work.to_path_buf() }
}

/// What a master says to a new operator connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Welcome, with its epoch (the master id's suffix).
    Leader(u64),
    Standby(Option<String>),
    Down,
}

/// Asks the master at `addr` with the operator identity in `tls`.
pub async fn ask(addr: &str, tls: &Path) -> Answer {
    match Session::connect(addr, &TlsFiles::in_dir(tls, "operator"), Role::Operator).await {
        Ok(s) => {
            let epoch = s.master_id.rsplit_once('-').and_then(|(_, e)| e.parse().ok()).expect("epoch in id");
            s.conn.close(0u32.into(), b"bye");
            Answer::Leader(epoch)
        }
        Err(ClientError::NotLeader { leader, .. }) => Answer::Standby(leader),
        Err(_) => Answer::Down,
    }
}

/// The leader among `addrs` once exactly one welcomes and every other names it; panics if
/// two welcome at once.
pub async fn settled_leader(addrs: &[&str], tls: &Path) -> Option<(usize, u64)> {
    let mut leader = None;
    let mut answers = Vec::new();
    for (i, a) in addrs.iter().enumerate() {
        let ans = ask(a, tls).await;
        if let Answer::Leader(e) = ans {
            if leader.is_some() {
                panic!("two masters welcome at once: {addrs:?}");
            }
            leader = Some((i, e));
        }
        answers.push(ans);
    }
    let (i, e) = leader?;
    let named =
        answers.iter().enumerate().all(|(j, a)| j == i || *a == Answer::Standby(Some(addrs[i].to_string())));
    named.then_some((i, e))
}

/// The epoch of the master at `addr` if it leads now.
pub async fn leads(addr: &str, tls: &Path) -> Option<u64> {
    match ask(addr, tls).await {
        Answer::Leader(e) => Some(e),
        _ => None,
    }
}

/// Waits until one of `addrs` leads (`secs` at most; the others need not know yet): its
/// index and epoch.
pub async fn wait_leader(addrs: &[&str], tls: &Path, secs: u64) -> (usize, u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        for (i, a) in addrs.iter().enumerate() {
            if let Some(e) = leads(a, tls).await {
                return (i, e);
            }
        }
        assert!(Instant::now() < deadline, "none of {addrs:?} leads after {secs} s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (`secs` at most) for [`settled_leader`] among `addrs`: its index and epoch.
pub async fn wait_settled_leader(addrs: &[&str], tls: &Path, secs: u64) -> (usize, u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(l) = settled_leader(addrs, tls).await {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "no leader named by every other master of {addrs:?} within {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One operator call to the master at `addr` (the parts of a paged `Agents` reply joined).
pub async fn operator_call(addr: &str, tls: &Path, call: OperatorCall) -> OperatorReply {
    let mut s =
        Session::connect(addr, &TlsFiles::in_dir(tls, "operator"), Role::Operator).await.expect("operator");
    s.writer.send(&call).await.expect("send");
    let mut parts = Vec::new();
    loop {
        match s.reader.recv::<OperatorReply>().await.expect("reply").expect("a reply") {
            OperatorReply::AgentsPart(p) => parts.extend(p),
            OperatorReply::Agents(mut a) => {
                parts.append(&mut a);
                return OperatorReply::Agents(parts);
            }
            other => return other,
        }
    }
}

/// The agents the master at `addr` lists.
pub async fn agents(addr: &str, tls: &Path) -> Vec<AgentView> {
    match operator_call(addr, tls, OperatorCall::GetAgents).await {
        OperatorReply::Agents(a) => a,
        other => panic!("GetAgents answered {other:?}"),
    }
}

/// The tasks the master at `addr` lists.
pub async fn tasks(addr: &str, tls: &Path) -> Vec<TaskView> {
    match operator_call(addr, tls, OperatorCall::GetTasks).await {
        OperatorReply::Tasks(t) => t,
        other => panic!("GetTasks answered {other:?}"),
    }
}

/// A client.toml in `dir` listing `masters` (certificates in `dir/tls`).
pub fn client_toml(dir: &Path, masters: &[&str]) -> PathBuf {
    let list = masters.iter().map(|m| format!("\"{m}\"")).collect::<Vec<_>>().join(", ");
    let path = dir.join("client.toml");
    std::fs::write(
        &path,
        format!(
            "master = [{list}]\nca = \"tls/ca.pem\"\n[operator]\ncert = \"tls/operator.pem\"\n\
             key = \"tls/operator-key.pem\"\n[framework]\ncert = \"tls/framework.pem\"\n\
             key = \"tls/framework-key.pem\"\n"
        ),
    )
    .expect("write client.toml");
    path
}
