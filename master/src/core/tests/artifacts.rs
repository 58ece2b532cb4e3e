//! The artifact store as the core sees it: eviction and upload quotas.

use super::executors::{exec_task, executor_info};
use super::*;

#[test]
fn a_referenced_artifact_is_never_evicted_and_an_evicted_one_refuses_launches() {
    let mut h = Harness::with_executor_binary();
    let bin = Digest::of(b"#!/bin/sh\n");
    let (s, offer) = h.offered("cpus:4;mem:4GiB");
    let e = executor_info("e1", "cpus:0.5;mem:512MiB");
    let acts = h.call(s.fc, accept(&offer, vec![exec_task("t1", "cpus:1;mem:1GiB", &e)], None));
    assert_eq!(run_tasks(&acts, s.ac).len(), 1);
    let leftover = single_offer(&h.advance(5 * MS), s.fc);
    assert!(h.m.artifacts_in_use().contains(&bin));
    assert!(!h.m.artifact_evicted(&bin), "its executor and task refer to it");
    // The task ends; its executor still runs and still refers to it.
    h.finish(&s, "t1");
    assert!(!h.m.artifact_evicted(&bin), "the executor refers to it");
    h.agent(
        s.ac,
        AgentMessage::ExecutorExited {
            framework_id: s.fw.clone(),
            executor_id: ExecutorId::new("e1"),
            message: "exit status 0".into(),
        },
    );
    assert!(h.m.artifacts_in_use().is_empty());
    assert!(h.m.artifact_evicted(&bin));
    // Evicted: a launch naming it is refused until it is uploaded again.
    let acts = h.call(s.fc, accept(&leftover, vec![exec_task("t2", "cpus:1;mem:1GiB", &e)], None));
    assert!(run_tasks(&acts, s.ac).is_empty(), "{acts:#?}");
    assert!(!updates(&acts, s.fc).is_empty(), "the framework is told: {acts:#?}");
}

#[test]
fn upload_quotas_count_first_uploaders_and_reservations() {
    let mut m =
        Master::new(MasterConfig { master_id: "m".into(), ..MasterConfig::default() }, Instant::now());
    let record = |d: &str, who: Option<&str>, size| crate::registry::ArtifactRecord {
        digest: Digest::parse(&d.repeat(32)).expect("digest"),
        kind: None,
        size,
        uploader: who.map(String::from),
    };
    let mut a = record("ab", Some("alice"), 600);
    m.artifact_uploaded(&mut a);
    assert_eq!(m.upload_usage("alice"), 600);
    // The same bytes sent again by bob stay alice's (and cost bob nothing).
    let mut again = record("ab", Some("bob"), 600);
    m.artifact_uploaded(&mut again);
    assert_eq!(again.uploader.as_deref(), Some("alice"), "the index keeps the first uploader");
    assert_eq!(m.upload_usage("bob"), 0);
    // Reservations count until given back; past the quota is refused naming the principal.
    assert!(m.reserve_upload("alice", 300, 1000).is_ok());
    let e = m.reserve_upload("alice", 200, 1000).unwrap_err();
    assert_eq!(e.code, ErrorCode::Unauthorized);
    assert!(e.message.contains("principal `alice` may not upload"), "{}", e.message);
    m.release_upload("alice", 300);
    assert!(m.reserve_upload("alice", 400, 1000).is_ok());
    // A lost artifact leaves its uploader's usage.
    m.release_upload("alice", 400);
    m.artifacts_lost(&[a.digest.clone()]);
    assert_eq!(m.upload_usage("alice"), 0);
}
