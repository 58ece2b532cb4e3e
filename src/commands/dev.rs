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
use crate::ha_dev::HaCluster;

#[derive(Args)]
pub struct DevCommand {
    /// Directory for certificates, agent work dirs and client.toml.
    #[arg(long, default_value = ".agora-dev")]
    dir: PathBuf,
    /// Number of agents.
    #[arg(long, default_value_t = 1)]
    agents: usize,
    /// Number of masters: 1 (in this process), or 3 (an etcd from the PATH on loopback and
    /// three `agora master --etcd` processes electing a leader; client.toml lists all three).
    #[arg(long, default_value_t = 1)]
    masters: usize,
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
    /// Read-only HTTP endpoint: the web UI at /, /api/v1/state, /metrics (Prometheus), /health
    /// (no authentication yet: keep it on loopback or behind a proxy).
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
    /// ACL file of the master, as `agora master --acls` (one master only). client.toml
    /// carries the framework certificate (principal `default`), operator.toml the operator
    /// certificate (principal `operator`); `agora tls issue` makes more.
    #[arg(long, value_name = "FILE")]
    acls: Option<std::path::PathBuf>,
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
        if self.masters != 1 && self.masters != 3 {
            anyhow::bail!("--masters must be 1 or 3 (got {})", self.masters);
        }
        let core = core_config(&MasterCommandCore {
            allocation: self.allocation.clone(),
            agent_heartbeat: Duration::from_secs(1),
            agent_timeout: Duration::from_secs(10),
            agent_reregister_timeout: Duration::from_secs(600),
            framework: self.framework.clone(),
        })?;
        let mut core = core;
        if let Some(path) = &self.acls {
            if self.masters > 1 {
                anyhow::bail!("--acls is for one master; give each `agora master --etcd` its own --acls");
            }
            core.acls = Some(std::sync::Arc::new(agora_master::acl::Acls::load(path)?));
        }
        if self.http.is_some() {
            // Before the master starts, so that no early metric is lost.
            agora_master::http::prometheus();
        }
        let spec = ClusterSpec {
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
        };
        if self.masters > 1 {
            if self.http.is_some() {
                anyhow::bail!(
                    "--http is for one master; with --masters 3 each master is a process of its own"
                );
            }
            let cluster = HaCluster::start(spec, self.masters, master_args()).await?;
            let list: Vec<String> = cluster.masters.iter().map(ToString::to_string).collect();
            println!(
                "Agora dev cluster ready: masters {} (one leads, elected through etcd) with {} agent(s).\nNext, in another shell:\n  export AGORA_CONFIG={}\n  agora masters\n  agora run -- echo hello\nOperator calls (drain, policy, every principal's tasks): AGORA_CONFIG={}\nPress Ctrl-C to stop.",
                list.join(", "),
                self.agents,
                cluster.client_path.display(),
                cluster.client_path.with_file_name(crate::cluster::OPERATOR_CONFIG).display()
            );
            super::shutdown_signal().await;
            eprintln!("stopping: killing tasks and shutting down agents, masters and etcd");
            cluster.stop().await;
            return Ok(ExitCode::SUCCESS);
        }
        let cluster = Cluster::start(spec).await?;
        if let Some(addr) = self.http {
            let bound = agora_master::http::spawn_with_flags(
                addr,
                cluster.master.clone(),
                super::flags(),
                cluster.shutdown.clone(),
            )
            .await?;
            println!("HTTP: http://{bound}/api/v1/state and http://{bound}/metrics; web UI: http://{bound}/");
        }
        println!(
            "Agora dev cluster ready: master {} with {} agent(s).\nNext, in another shell:\n  export AGORA_CONFIG={}\n  agora run -- echo hello\n  agora tasks\nOperator calls (drain, policy, every principal's tasks): AGORA_CONFIG={}\nPress Ctrl-C to stop.",
            cluster.master.addr,
            self.agents,
            cluster.client_path.display(),
            cluster.client_path.with_file_name(crate::cluster::OPERATOR_CONFIG).display()
        );
        super::shutdown_signal().await;
        eprintln!("stopping: killing tasks and shutting down agents and master");
        cluster.stop().await;
        Ok(ExitCode::SUCCESS)
    }
}

/// The flags of this `agora dev` that the masters take (allocation and framework liveness),
/// as given, plus the agent liveness a dev cluster uses.
fn master_args() -> Vec<String> {
    let mut names = std::collections::HashSet::new();
    for cmd in [
        <AllocationArgs as clap::Args>::augment_args(clap::Command::new("a")),
        <FrameworkLivenessArgs as clap::Args>::augment_args(clap::Command::new("f")),
    ] {
        names.extend(cmd.get_arguments().filter_map(|a| a.get_long().map(str::to_string)));
    }
    let mut out: Vec<String> =
        ["--agent-heartbeat", "1s", "--agent-timeout", "10s", "--agent-reregister-timeout", "10min"]
            .map(String::from)
            .into();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let Some(flag) = a.strip_prefix("--") else { continue };
        let (name, inline) = match flag.split_once('=') {
            Some((n, _)) => (n, true),
            None => (flag, false),
        };
        if names.contains(name) {
            out.push(a.clone());
            if !inline {
                out.extend(args.next());
            }
        }
    }
    out
}
