//! `agora master`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use agora_master::core::MasterConfig;
use agora_master::server::{self, ServerConfig};
use agora_sdk::tls::TlsFiles;
use agora_sdk::units::parse_duration;
use clap::Args;
use tokio_util::sync::CancellationToken;

#[derive(Args)]
pub struct MasterCommand {
    /// QUIC address to listen on.
    #[arg(long, default_value = "0.0.0.0:5050")]
    listen: SocketAddr,
    /// Directory made by `agora tls init` (ca.pem, master.pem, master-key.pem).
    #[arg(long)]
    tls_dir: PathBuf,
    /// Read-only HTTP endpoint: /api/v1/state, /metrics (Prometheus), /health.
    #[arg(long)]
    http: Option<SocketAddr>,
    /// Allocation module.
    #[arg(long, default_value = "drf")]
    allocator: String,
    /// Full allocation cycle interval.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    allocation_interval: Duration,
    /// Heartbeat interval told to agents.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    agent_heartbeat: Duration,
    /// An agent silent this long is marked unreachable and its tasks TASK_UNREACHABLE.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    agent_timeout: Duration,
}

pub fn core_config(m: &MasterCommandCore) -> MasterConfig {
    MasterConfig {
        master_id: format!("m{}", &uuid::Uuid::new_v4().simple().to_string()[..6]),
        allocation_interval: m.allocation_interval,
        agent_heartbeat_interval: m.agent_heartbeat,
        agent_timeout: m.agent_timeout,
        ..MasterConfig::default()
    }
}

/// The tunables shared by `master` and `dev`.
pub struct MasterCommandCore {
    pub allocation_interval: Duration,
    pub agent_heartbeat: Duration,
    pub agent_timeout: Duration,
}

impl MasterCommand {
    pub async fn execute(self) -> anyhow::Result<ExitCode> {
        let core = core_config(&MasterCommandCore {
            allocation_interval: self.allocation_interval,
            agent_heartbeat: self.agent_heartbeat,
            agent_timeout: self.agent_timeout,
        });
        if self.http.is_some() {
            // Before the master starts, so that no early metric is lost.
            agora_master::http::prometheus();
        }
        let shutdown = CancellationToken::new();
        let handle = server::spawn(
            ServerConfig {
                listen: self.listen,
                tls: TlsFiles::in_dir(&self.tls_dir, "master"),
                core,
                allocator: self.allocator,
            },
            shutdown.clone(),
        )?;
        eprintln!("agora master listening on {} (QUIC, mutual TLS)", handle.addr);
        if let Some(addr) = self.http {
            let bound = agora_master::http::spawn(addr, handle.clone(), shutdown.clone()).await?;
            eprintln!("HTTP: http://{bound}/api/v1/state and http://{bound}/metrics");
        }
        super::shutdown_signal().await;
        shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(ExitCode::SUCCESS)
    }
}
