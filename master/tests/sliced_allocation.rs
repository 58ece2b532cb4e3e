//! Allocation cycles in slices through the QUIC server, on a multi-threaded runtime (where the
//! server runs the slices and the registry writes under `block_in_place`): the offers of each
//! slice go out as their own `Offers` event, and the cycle runs to its end.

// Test helpers outside `#[test]` functions fail loudly too.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use agora_master::core::MasterConfig;
use agora_master::server::{self, ServerConfig};
use agora_master::testing::framework_info;
use agora_sdk::client::Session;
use agora_sdk::proto::*;
use agora_sdk::tls::TlsFiles;
use agora_sdk::{Attributes, Resources};
use tokio_util::sync::CancellationToken;

const AGENTS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sliced_cycle_sends_each_slice_s_offers_as_they_are_decided() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    agora_sdk::tls::init(&tls, "tester", false).unwrap();
    let shutdown = CancellationToken::new();
    let master = server::spawn(
        ServerConfig {
            listen: ([127, 0, 0, 1], 0).into(),
            tls: TlsFiles::in_dir(&tls, "master"),
            core: MasterConfig {
                master_id: "t".into(),
                allocation_interval: Duration::from_millis(50),
                allocation_slice: 1,
                ..MasterConfig::default()
            },
            allocator: "drf".into(),
            // A redb registry: its writes run under `block_in_place` too.
            work_dir: dir.path().join("master"),
            max_artifact_size: agora_master::artifacts::DEFAULT_MAX_ARTIFACT_SIZE,
            eviction: agora_master::artifacts::EvictionConfig::default(),
            limits: Default::default(),
        },
        shutdown.clone(),
    )
    .unwrap();
    let addr = master.addr.to_string();
    let deadline = Instant::now() + Duration::from_secs(20);

    let mut agents = Vec::new();
    for i in 0..AGENTS {
        let mut agent = Session::connect(&addr, &TlsFiles::in_dir(&tls, "agent"), Role::Agent).await.unwrap();
        agent
            .writer
            .send(&AgentMessage::Register {
                agent_id: None,
                hostname: format!("host{i}"),
                resources: Resources::parse("cpus:4;mem:4GiB").unwrap(),
                attributes: Attributes::default(),
                tasks: vec![],
            })
            .await
            .unwrap();
        loop {
            let msg = tokio::time::timeout_at(deadline.into(), agent.reader.recv::<MasterToAgent>())
                .await
                .expect("registered in time")
                .unwrap()
                .expect("the master keeps the connection");
            if let MasterToAgent::Registered { .. } = msg {
                break;
            }
        }
        agents.push(agent);
    }

    let mut fw =
        Session::connect(&addr, &TlsFiles::in_dir(&tls, "framework"), Role::Framework).await.unwrap();
    let info = framework_info(None, "sliced", Duration::from_secs(60));
    fw.writer.send(&SchedulerCall::Subscribe(info)).await.unwrap();
    // Slices of one agent: one `Offers` event per agent, every agent offered once.
    let mut offered = BTreeSet::new();
    while offered.len() < AGENTS {
        let event = tokio::time::timeout_at(deadline.into(), fw.reader.recv::<SchedulerEvent>())
            .await
            .expect("offers in time")
            .unwrap()
            .expect("the master keeps the connection");
        if let SchedulerEvent::Offers(offers) = event {
            assert_eq!(offers.len(), 1, "one slice's offers per event: {offers:?}");
            assert!(offered.insert(offers[0].agent_id.clone()), "offered twice: {offers:?}");
        }
    }
    shutdown.cancel();
}
