//! An embedded cluster: a master and N agents in this process, on loopback. Used by
//! `agora dev` and `agora demo`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agora_master::core::MasterConfig;
use agora_master::server::{self, MasterHandle, ServerConfig};
use agora_sdk::config::ClientConfig;
use agora_sdk::tls::TlsFiles;
use agora_sdk::{Attributes, Resources};
use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct ClusterSpec {
    pub dir: PathBuf,
    pub listen: SocketAddr,
    pub agents: usize,
    pub resources: Option<Resources>,
    pub attributes: Vec<Attributes>,
    pub allocator: String,
    pub core: MasterConfig,
    /// Largest artifact the master stores.
    pub max_artifact_size: u64,
    /// How the agents collect finished sandboxes.
    pub gc: agora_agent::gc::GcConfig,
}

pub struct Cluster {
    pub master: MasterHandle,
    pub client: ClientConfig,
    pub client_path: PathBuf,
    pub shutdown: CancellationToken,
    agents: Vec<JoinHandle<()>>,
}

impl Cluster {
    /// Starts the cluster and returns once every agent has registered.
    pub async fn start(spec: ClusterSpec) -> anyhow::Result<Cluster> {
        let dir = &spec.dir;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let dir = dir.canonicalize().with_context(|| format!("cannot resolve {}", dir.display()))?;
        let tls_dir = dir.join("tls");
        if !tls_dir.join("ca.pem").exists() {
            agora_sdk::tls::init(&tls_dir, "default", false)?;
        }
        let shutdown = CancellationToken::new();
        let master = server::spawn(
            ServerConfig {
                listen: spec.listen,
                tls: TlsFiles::in_dir(&tls_dir, "master"),
                core: spec.core.clone(),
                allocator: spec.allocator.clone(),
                work_dir: dir.join("master"),
                max_artifact_size: spec.max_artifact_size,
                eviction: agora_master::artifacts::EvictionConfig::default(),
                limits: Default::default(),
            },
            shutdown.clone(),
        )?;
        let agents = spawn_agents(&spec, &dir, &tls_dir, &master.addr.to_string(), &shutdown);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let up = master
                .agents()
                .await
                .iter()
                .filter(|a| a.status == agora_sdk::AgentViewStatus::Active)
                .count();
            if up >= spec.agents {
                break;
            }
            if Instant::now() > deadline {
                shutdown.cancel();
                anyhow::bail!("only {up} of {} agents registered within 30 s", spec.agents);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let client = ClientConfig::from_tls_dir(&master.addr.to_string(), &tls_dir);
        let client_path = write_client_configs(&client, &dir)?;
        Ok(Cluster { master, client, client_path, shutdown, agents })
    }

    /// Stops agents (killing their tasks) and the master.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for a in self.agents {
            let _ = tokio::time::timeout(Duration::from_secs(10), a).await;
        }
    }
}

/// Starts `spec.agents` agents in this process, registering with `masters` (one `host:port`
/// or several, comma-separated), their work dirs in `dir`.
pub fn spawn_agents(
    spec: &ClusterSpec,
    dir: &Path,
    tls_dir: &Path,
    masters: &str,
    shutdown: &CancellationToken,
) -> Vec<JoinHandle<()>> {
    let each = match &spec.resources {
        Some(r) => r.clone(),
        None => split(&agora_agent::detect_resources(), spec.agents),
    };
    let mut agents = Vec::new();
    for i in 0..spec.agents {
        let config = agora_agent::AgentConfig {
            master: masters.to_string(),
            tls: TlsFiles::in_dir(tls_dir, "agent"),
            work_dir: dir.join(format!("agent-{i}")),
            resources: Some(each.clone()),
            attributes: spec.attributes.get(i).cloned().unwrap_or_default(),
            hostname: format!("agent-{i}"),
            kill_grace: Duration::from_secs(3),
            kill_tasks_on_shutdown: true,
            // Isolated where the host allows it; otherwise one warning line.
            isolation: agora_agent::cgroups::IsolationConfig::default(),
            // An embedded cluster stops its tasks when it exits; one that is killed (-9)
            // leaves executors that wait a minute for a restart on the same dir, then end
            // their tasks, rather than the 15 minutes a production agent's get.
            executors: agora_agent::executors::ExecutorsConfig {
                recovery_timeout: Duration::from_secs(60),
                ..Default::default()
            },
            task_user: agora_agent::user::DEFAULT_TASK_USER.into(),
            recovery: agora_agent::RecoveryConfig::default(),
            gc: spec.gc.clone(),
            disk: agora_agent::disk::DiskConfig::default(),
        };
        let token = shutdown.clone();
        agents.push(tokio::spawn(async move {
            if let Err(e) = agora_agent::run(config, token).await {
                tracing::error!(error = %e, "agent {i} stopped");
            }
        }));
    }
    agents
}

/// Name of the config `agora dev` writes with the operator certificate, next to client.toml.
pub const OPERATOR_CONFIG: &str = "operator.toml";

/// Writes a dev cluster's two configs in `dir`: `operator.toml` (operator and framework
/// certificates: every operator call) first, then `client.toml` (the framework certificate
/// only: runs tasks, and lists, kills and reads its own principal's). Returns client.toml.
pub fn write_client_configs(full: &ClientConfig, dir: &Path) -> anyhow::Result<PathBuf> {
    write_client(full, &dir.join(OPERATOR_CONFIG))?;
    let client = ClientConfig { operator: None, ..full.clone() };
    let path = dir.join("client.toml");
    write_client(&client, &path)?;
    Ok(path)
}

/// Writes client.toml atomically, so that a waiting script never reads half a file.
pub fn write_client(cfg: &ClientConfig, path: &Path) -> anyhow::Result<()> {
    let tmp = path.with_extension("toml.tmp");
    cfg.save(&tmp)?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Divides detected resources between `n` agents on one machine.
fn split(total: &Resources, n: usize) -> Resources {
    let n = n.max(1) as u64;
    Resources {
        cpus: (total.cpus / n).max(100),
        // Whole MiB, so that the text form stays exact.
        mem: (total.mem / n) & !((1 << 20) - 1),
        disk: (total.disk / n) & !((1 << 20) - 1),
        ports: total.ports.clone(),
        scalars: total.scalars.iter().map(|(k, v)| (k.clone(), v / n)).collect(),
        reserved: Default::default(),
    }
}
