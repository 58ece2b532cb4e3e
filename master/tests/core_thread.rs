//! The master's core runs on a thread of its own (named `agora-core`), not on a worker of the
//! runtime that serves connections, and the thread ends with the master. Its own test binary:
//! no other master of the process has a core thread to confuse the count.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use agora_master::core::MasterConfig;
use agora_master::server::{self, ServerConfig};
use agora_sdk::client::OperatorClient;
use agora_sdk::config::{CertPair, ClientConfig};
use agora_sdk::tls::TlsFiles;
use tokio_util::sync::CancellationToken;

/// How many threads of this process are named `agora-core`.
fn core_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "agora-core"))
        .count()
}

/// On a single-threaded test runtime the master still answers: the connection tasks run here,
/// the core there.
#[tokio::test]
async fn the_core_runs_on_its_own_thread_and_ends_with_the_master() {
    assert_eq!(core_threads(), 0);
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    agora_sdk::tls::init(&tls, "tester", false).unwrap();
    let shutdown = CancellationToken::new();
    let master = server::spawn(
        ServerConfig {
            listen: ([127, 0, 0, 1], 0).into(),
            tls: TlsFiles::in_dir(&tls, "master"),
            core: MasterConfig { master_id: "t".into(), ..MasterConfig::default() },
            allocator: "drf".into(),
            work_dir: dir.path().join("master"),
            max_artifact_size: agora_master::artifacts::DEFAULT_MAX_ARTIFACT_SIZE,
            eviction: agora_master::artifacts::EvictionConfig::default(),
            limits: Default::default(),
        },
        shutdown.clone(),
    )
    .unwrap();
    // The core starts once the master has opened its registry (in the background).
    let deadline = Instant::now() + Duration::from_secs(10);
    while core_threads() == 0 {
        assert!(Instant::now() < deadline, "no core thread");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(core_threads(), 1, "the core has a thread of its own");
    let config = ClientConfig {
        master: master.addr.to_string(),
        ca: tls.join("ca.pem"),
        operator: Some(CertPair { cert: tls.join("operator.pem"), key: tls.join("operator-key.pem") }),
        framework: None,
        source: dir.path().join("client.toml"),
    };
    let mut op = OperatorClient::connect(&config).await.unwrap();
    assert!(op.agents().await.unwrap().is_empty(), "the core answers an operator call");

    shutdown.cancel();
    let deadline = Instant::now() + Duration::from_secs(10);
    while core_threads() > 0 {
        assert!(Instant::now() < deadline, "the core's thread outlived the master");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
