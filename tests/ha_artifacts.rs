//! Artifacts copied between masters (`agora master --etcd`, each master with its own
//! `--work-dir`): standbys copy the leader's uploads into their own stores; after `kill -9` of
//! the leader the new one serves them to agents; a new leader that lacks an indexed artifact
//! fetches it from a standby. Real etcd, real processes.

mod common;

use std::path::Path;
use std::time::Duration;

use agora_master::registry::{EtcdRegistry, Registry};
use agora_sdk::client::{ClientError, Session};
use agora_sdk::proto::*;
use agora_sdk::tls::TlsFiles;
use common::dev::{poll, RealCluster};
use common::etcd::Etcd;
use common::ha::{leads, start_master, start_master_in, start_master_with, wait_leader, HaMaster, CLUSTER};

async fn upload(addr: &str, tls: &Path, name: &str, bytes: &[u8]) -> ArtifactRef {
    let s =
        Session::connect(addr, &TlsFiles::in_dir(tls, "operator"), Role::Operator).await.expect("operator");
    let a = agora_sdk::artifacts::upload_bytes(&s.conn, ArtifactKind::Executable, name, bytes)
        .await
        .expect("upload");
    s.conn.close(0u32.into(), b"bye");
    a
}

/// What an agent fetching `digest` from the master at `addr` receives.
async fn agent_fetch(addr: &str, tls: &Path, digest: &Digest, into: &Path) -> Vec<u8> {
    let s =
        Session::connect(addr, &TlsFiles::in_dir(tls, "agent"), Role::Agent).await.expect("agent session");
    let dest = into.join(format!("fetched-{}", &digest.as_str()[..12]));
    agora_sdk::artifacts::fetch(&s.conn, digest, &dest, 1 << 20).await.expect("fetch from the leader");
    s.conn.close(0u32.into(), b"bye");
    std::fs::read(&dest).expect("fetched file")
}

fn wait_file(what: &str, path: &Path, bytes: &[u8], secs: u64) {
    poll(what, secs, || (std::fs::read(path).ok()? == bytes).then_some(()));
}

/// The artifact index in etcd as the leader of `epoch` sees it.
fn indexed_size(etcd_url: &str, epoch: u64, digest: &Digest) -> Option<u64> {
    let mut reg = EtcdRegistry::connect(&[etcd_url.to_string()], CLUSTER, epoch, Duration::from_secs(5))
        .expect("registry");
    let state = reg.open_epoch().expect("read the registry");
    state.artifacts.get(digest).map(|a| a.size)
}

/// Three masters, three work dirs: an upload to the leader reaches both standbys' stores;
/// after `kill -9` of the leader the new leader serves it to an agent. A master's connection
/// to another master may fetch, nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standbys_copy_uploads_and_the_next_leader_serves_them() {
    let etcd = Etcd::start();
    let dir = RealCluster::prepare();
    let tls = dir.path().join("tls");
    let mut masters: Vec<HaMaster> =
        (0..3).map(|i| start_master(dir.path(), &format!("master{i}"), &etcd.url)).collect();
    let addrs: Vec<String> = masters.iter().map(|m| m.addr.clone()).collect();
    let addr_refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let (li, epoch1) = wait_leader(&addr_refs, &tls, 30).await;

    let script = b"#!/bin/sh\necho copied between masters\n";
    let uploaded = upload(&addrs[li], &tls, "copied.sh", script).await;
    assert!(masters[li].artifact(&uploaded.digest).is_file(), "the leader stored the upload in its own dir");
    for (i, m) in masters.iter().enumerate().filter(|(i, _)| *i != li) {
        wait_file(&format!("standby {i} to copy the upload"), &m.artifact(&uploaded.digest), script, 30);
    }

    // A master-role session: fetches only.
    let mut peer = Session::connect(&addrs[li], &TlsFiles::in_dir(&tls, "master"), Role::Master)
        .await
        .expect("a master may connect to the leader");
    let fetched = dir.path().join("by-master");
    std::fs::create_dir_all(&fetched).expect("dir");
    let dest = fetched.join("copy");
    agora_sdk::artifacts::fetch(&peer.conn, &uploaded.digest, &dest, 1 << 20).await.expect("master fetch");
    assert_eq!(std::fs::read(&dest).expect("copy"), script);
    let e = agora_sdk::artifacts::upload_bytes(&peer.conn, ArtifactKind::Executable, "x.sh", b"#!/bin/sh\n")
        .await
        .expect_err("a master uploaded");
    assert!(matches!(&e, ClientError::Refused(w) if w.message.contains("may not upload")), "{e}");
    peer.writer.send(&OperatorCall::GetAgents).await.expect("send");
    match peer.reader.recv::<OperatorReply>().await {
        Ok(Some(OperatorReply::Error(w))) => {
            assert_eq!(w.code, ErrorCode::Unauthorized);
            assert!(w.message.contains("may only fetch artifacts"), "{}", w.message);
        }
        other => panic!("a master's control-stream call was not refused: {other:?}"),
    }

    // kill -9 of the leader; the new one serves the artifact from its own store.
    masters[li].proc.kill9();
    let rest: Vec<&str> = addr_refs.iter().enumerate().filter(|(i, _)| *i != li).map(|(_, a)| *a).collect();
    let (ni, epoch2) = wait_leader(&rest, &tls, 15).await;
    assert!(epoch2 > epoch1, "{epoch2} is not above {epoch1}");
    let new_leader = rest[ni].to_string();
    assert_eq!(agent_fetch(&new_leader, &tls, &uploaded.digest, dir.path()).await, script);
    assert_eq!(indexed_size(&etcd.url, epoch2, &uploaded.digest), Some(script.len() as u64));
    // A later upload reaches the remaining standby.
    let second = b"#!/bin/sh\necho uploaded after the failover\n";
    let uploaded2 = upload(&new_leader, &tls, "second.sh", second).await;
    let standby =
        masters.iter().enumerate().find(|(i, m)| *i != li && m.addr != new_leader).expect("standby").1;
    wait_file(
        "the remaining standby to copy the second upload",
        &standby.artifact(&uploaded2.digest),
        second,
        30,
    );

    for (i, m) in masters.iter_mut().enumerate() {
        if i != li {
            assert!(m.proc.stop().success(), "{}", m.proc.stderr_text());
        }
    }
}

/// A new leader whose store lacks an indexed artifact (no standby had copied it) fetches it
/// from a standby that has it, within the recovery window, and keeps it in the index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_fetches_what_it_lacks_from_a_standby() {
    let etcd = Etcd::start();
    let dir = RealCluster::prepare();
    let tls = dir.path().join("tls");
    let mut a = start_master(dir.path(), "master-a", &etcd.url);
    wait_leader(&[a.addr.as_str()], &tls, 30).await;
    let script = b"#!/bin/sh\necho recovered from a standby\n";
    let uploaded = upload(&a.addr, &tls, "recovered.sh", script).await;
    let mut b = start_master(dir.path(), "master-b", &etcd.url);
    wait_file("b to copy the upload", &b.artifact(&uploaded.digest), script, 30);
    // b leaves (resigning), a dies: c starts alone, with an empty store, and leads.
    assert!(b.proc.stop().success(), "{}", b.proc.stderr_text());
    a.proc.kill9();
    let c = start_master(dir.path(), "master-c", &etcd.url);
    let (_, epoch_c) = wait_leader(&[c.addr.as_str()], &tls, 15).await;
    assert!(!c.artifact(&uploaded.digest).exists());
    // b comes back as a standby: c fetches the artifact from it.
    let b_work = b.work.clone();
    let mut b = start_master(dir.path(), "master-b", &etcd.url);
    assert_eq!(b.work, b_work);
    wait_file("c to fetch the artifact from b", &c.artifact(&uploaded.digest), script, 30);
    assert_eq!(agent_fetch(&c.addr, &tls, &uploaded.digest, dir.path()).await, script);
    assert_eq!(indexed_size(&etcd.url, epoch_c, &uploaded.digest), Some(script.len() as u64));
    assert!(leads(&b.addr, &tls).await.is_none(), "b must stand by");
    assert!(c.proc.stderr_text().contains("fetched a missing artifact from another master"));
    assert!(b.proc.stop().success());
    let mut c = c;
    assert!(c.proc.stop().success());
}

/// Two masters may still share one work dir (a shared filesystem): the upload is there for
/// both, and the one that takes over serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_masters_sharing_one_work_dir_still_work() {
    let etcd = Etcd::start();
    let dir = RealCluster::prepare();
    let tls = dir.path().join("tls");
    let shared = dir.path().join("shared");
    let mut masters: Vec<HaMaster> =
        (0..2).map(|i| start_master_in(dir.path(), &format!("master{i}"), &shared, &etcd.url)).collect();
    let addrs: Vec<&str> = masters.iter().map(|m| m.addr.as_str()).collect();
    let (li, _) = wait_leader(&addrs, &tls, 30).await;
    let script = b"#!/bin/sh\necho one directory for two masters\n";
    let uploaded = upload(addrs[li], &tls, "shared.sh", script).await;
    let other = addrs[1 - li].to_string();
    masters[li].proc.kill9();
    wait_leader(&[other.as_str()], &tls, 15).await;
    assert_eq!(agent_fetch(&other, &tls, &uploaded.digest, dir.path()).await, script);
    let left = &mut masters[1 - li];
    assert!(!left.proc.stderr_text().contains("cannot copy artifacts"), "{}", left.proc.stderr_text());
    assert!(left.proc.stop().success());
}

/// A bounded store (`--artifact-store-size`): the leader evicts an artifact nothing refers to
/// once its grace is over, from the etcd index and its disk, and the standby that copied it
/// removes its copy too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_the_leader_evicts_leaves_the_index_and_the_standbys() {
    let etcd = Etcd::start();
    let dir = RealCluster::prepare();
    let tls = dir.path().join("tls");
    let bound =
        ["--artifact-store-size", "1B", "--artifact-grace", "2s", "--artifact-evict-interval", "200ms"];
    let mut masters: Vec<HaMaster> = (0..2)
        .map(|i| {
            let name = format!("master{i}");
            start_master_with(dir.path(), &name, &etcd.url, "127.0.0.1:0", &dir.path().join(&name), &bound)
        })
        .collect();
    let addrs: Vec<String> = masters.iter().map(|m| m.addr.clone()).collect();
    let addr_refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let (li, epoch) = wait_leader(&addr_refs, &tls, 30).await;
    let script = b"#!/bin/sh\necho evicted later\n";
    let uploaded = upload(&addrs[li], &tls, "evicted.sh", script).await;
    let standby = &masters[1 - li];
    wait_file("the standby to copy the upload", &standby.artifact(&uploaded.digest), script, 30);
    poll("the leader to evict the unused artifact", 30, || {
        (!masters[li].artifact(&uploaded.digest).exists()).then_some(())
    });
    assert_eq!(indexed_size(&etcd.url, epoch, &uploaded.digest), None, "the index dropped it");
    poll("the standby to drop its copy", 30, || (!standby.artifact(&uploaded.digest).exists()).then_some(()));
    for m in &mut masters {
        assert!(m.proc.stop().success(), "{}", m.proc.stderr_text());
    }
}
