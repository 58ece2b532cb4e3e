//! `agora dev`: a master and N agents in this process, on loopback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use agora_sdk::units::parse_duration;
use agora_sdk::{Attributes, Resources};
use clap::Args;

use super::master::{core_config, AllocationArgs, FrameworkLivenessArgs, MasterCommandCore};
use crate::cluster::{Cluster, ClusterSpec};

#[derive(Args)]
pub struct DevCommand {
    /// Directory for certificates, agent work dirs and client.toml.
    #[arg(long, default_value = ".agora-dev")]
    dir: PathBuf,
    /// Number of agents.
    #[arg(long, default_value_t = 1)]
    agents: usize,
    /// Resources of each agent (default: this machine's, divided between the agents).
    #[arg(long, value_parser = Resources::parse)]
    resources: Option<Resources>,
    /// Attributes of one agent, e.g. `rack:r1;blocks:{b1,b2}` (repeat: the first for agent 0,
    /// the next for agent 1, ...; agents without one have none).
    #[arg(long = "agent-attributes", value_parser = Attributes::parse)]
    agent_attributes: Vec<Attributes>,
    /// QUIC address of the master (loopback; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:5050")]
    listen: SocketAddr,
    /// Read-only HTTP endpoint: /api/v1/state, /metrics (Prometheus), /health.
    #[arg(long)]
    http: Option<SocketAddr>,
    /// How long the sandbox of a finished task is kept (less when the disk fills up).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    gc_delay: Duration,
    /// How often the agents remove the sandboxes that are due (for tests).
    #[arg(long, default_value = "1m", value_parser = parse_duration, hide = true)]
    gc_interval: Duration,
    #[command(flatten)]
    allocation: AllocationArgs,
    #[command(flatten)]
    framework: FrameworkLivenessArgs,
}

impl DevCommand {
    pub async fn execute(self) -> anyhow::Result<ExitCode> {
        if self.agents == 0 || self.agents > 64 {
            anyhow::bail!("--agents must be between 1 and 64 (got {})", self.agents);
        }
        if self.agent_attributes.len() > self.agents {
            anyhow::bail!(
                "{} --agent-attributes for {} agent(s): give at most one per agent",
                self.agent_attributes.len(),
                self.agents
            );
        }
        if !self.listen.ip().is_loopback() {
            anyhow::bail!(
                "agora dev listens on loopback only (got {}); use `agora master` for a real cluster",
                self.listen
            );
        }
        let core = core_config(&MasterCommandCore {
            allocation: self.allocation.clone(),
            agent_heartbeat: Duration::from_secs(1),
            agent_timeout: Duration::from_secs(10),
            agent_reregister_timeout: Duration::from_secs(600),
            framework: self.framework.clone(),
        })?;
        if self.http.is_some() {
            // Before the master starts, so that no early metric is lost.
            agora_master::http::prometheus();
        }
        let cluster = Cluster::start(ClusterSpec {
            dir: self.dir,
            listen: self.listen,
            agents: self.agents,
            resources: self.resources,
            attributes: self.agent_attributes,
            allocator: self.allocation.allocator,
            core,
            max_artifact_size: agora_master::artifacts::DEFAULT_MAX_ARTIFACT_SIZE,
            gc: agora_agent::gc::GcConfig {
                delay: self.gc_delay,
                interval: self.gc_interval,
                ..agora_agent::gc::GcConfig::default()
            },
        })
        .await?;
        if let Some(addr) = self.http {
            let bound =
                agora_master::http::spawn(addr, cluster.master.clone(), cluster.shutdown.clone()).await?;
            println!("HTTP: http://{bound}/api/v1/state and http://{bound}/metrics");
        }
        println!(
            "Agora dev cluster ready: master {} with {} agent(s).\nNext, in another shell:\n  export AGORA_CONFIG={}\n  agora run -- echo hello\n  agora tasks\nPress Ctrl-C to stop.",
            cluster.master.addr,
            self.agents,
            cluster.client_path.display()
        );
        super::shutdown_signal().await;
        eprintln!("stopping: killing tasks and shutting down agents and master");
        cluster.stop().await;
        Ok(ExitCode::SUCCESS)
    }
}
