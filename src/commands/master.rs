//! `agora master`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use std::collections::BTreeMap;

use agora_master::allocator::{self, AllocatorOptions};
use agora_master::core::{MasterConfig, FRAMEWORK_MISSED_HEARTBEATS};
use agora_master::ha::HaConfig;
use agora_master::server::{self, ServerConfig};
use agora_sdk::tls::TlsFiles;
use agora_sdk::units::{parse_duration, parse_size};
use agora_sdk::Resources;
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
    /// Read-only HTTP endpoint: the web UI at /, /api/v1/state, /metrics (Prometheus), /health.
    /// All but /health need the token of --http-token-file; without one it must be loopback.
    #[arg(long)]
    http: Option<SocketAddr>,
    /// The operator's HTTP token (the `http-token` file `agora tls init` writes; mode 0600):
    /// sent as `Authorization: Bearer TOKEN`, or typed once into the web UI's sign-in form.
    #[arg(long, requires = "http")]
    http_token_file: Option<PathBuf>,
    /// The master's directory: its registry (`registry.redb`: frameworks, agents, the
    /// artifact index and an operator's allocation policy, so that a restarted master takes
    /// its cluster back) and the artifact store. Default: a fresh temporary directory, removed at exit, so nothing survives a
    /// restart.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Largest Wasm module or directory archive accepted, e.g. `64MiB`.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    max_artifact_size: u64,
    /// Most bytes the artifact store keeps; past it the least recently used artifacts that no
    /// live task or executor refers to (and not stored or used in the last --artifact-grace)
    /// are evicted, from the index first (standbys follow). 0: no bound.
    #[arg(long, default_value = "10GiB", value_parser = parse_size)]
    artifact_store_size: u64,
    /// An artifact stored or used this recently is never evicted.
    #[arg(long, default_value = "10m", value_parser = parse_duration, hide = true)]
    artifact_grace: Duration,
    /// How often the artifact store is checked against --artifact-store-size.
    #[arg(long, default_value = "30s", value_parser = parse_duration, hide = true)]
    artifact_evict_interval: Duration,
    /// Longest grace between SIGTERM and SIGKILL a framework may give its tasks; a longer
    /// `kill_grace` is cut to this (at most 60s: agents keep that absolute ceiling too).
    #[arg(long, default_value = "60s", value_parser = parse_kill_grace)]
    max_kill_grace: Duration,
    #[command(flatten)]
    peer_limits: PeerLimitArgs,
    #[command(flatten)]
    allocation: AllocationArgs,
    /// Heartbeat interval told to agents; an agent gives a silent master up after three.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    agent_heartbeat: Duration,
    /// An agent silent this long is marked unreachable and its tasks TASK_UNREACHABLE
    /// (shorter silences change nothing).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    agent_timeout: Duration,
    /// After a restart, agents the registry knows must re-register within this time; later
    /// they are removed (their tasks TASK_GONE) and refused if they come back.
    #[arg(long, default_value = "10min", value_parser = parse_duration)]
    agent_reregister_timeout: Duration,
    #[command(flatten)]
    framework: FrameworkLivenessArgs,
    /// Run as one of several masters: etcd's client URLs, comma-separated (e.g.
    /// `http://10.0.0.1:2379,http://10.0.0.2:2379`). The masters elect a leader through an
    /// etcd lease and keep the registry in etcd; the others stand by and answer every peer
    /// with the leader's address. Without it the master runs alone on `registry.redb`.
    /// With it `--work-dir` holds only the artifact store, each master its own: standbys copy
    /// the leader's artifacts (a directory shared by every master also works).
    #[arg(long, value_parser = parse_etcd)]
    etcd: Option<EtcdEndpoints>,
    /// The cluster's name (with `--etcd`): its etcd key prefix and the stable part of ids.
    #[arg(long, default_value = "agora", requires = "etcd", value_parser = parse_cluster_name)]
    cluster_name: String,
    /// The etcd lease's time to live (with `--etcd`, whole seconds): a dead leader is replaced
    /// about this long after it died; a leader that cannot renew it for half of it steps down.
    #[arg(long, default_value = "3s", requires = "etcd", value_parser = parse_lease_ttl)]
    etcd_lease_ttl: Duration,
    /// `host:port` peers reach this master at, which standbys tell them (with `--etcd`).
    /// Default: the listen address; required when that is unspecified (0.0.0.0 or [::]).
    #[arg(long, requires = "etcd")]
    advertise: Option<String>,
    /// ACL file (TOML): what each principal (its client certificate's name) may do — the
    /// roles it may subscribe as (`roles`), the OS users its tasks may run as (`task_users`),
    /// uploads (`upload`, `upload_quota = "1GiB"`), operator rights (`operator = true`, or
    /// `list_all`, `kill_any`, `read_any`, `set_policy`, `drain`). Anything not granted is
    /// denied. Without it everything is allowed (one warning at start). See
    /// docs/operations.md, "Access control".
    #[arg(long, value_name = "FILE")]
    acls: Option<PathBuf>,
}

/// etcd's client URLs (one flag value, comma-separated).
#[derive(Clone, Debug)]
pub struct EtcdEndpoints(pub Vec<String>);

fn parse_etcd(s: &str) -> Result<EtcdEndpoints, String> {
    agora_master::ha::parse_endpoints(s).map(EtcdEndpoints).map_err(|e| e.to_string())
}

fn parse_cluster_name(s: &str) -> Result<String, String> {
    agora_master::ha::check_cluster_name(s).map(|()| s.to_string()).map_err(|e| e.to_string())
}

fn parse_lease_ttl(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(1) || d > Duration::from_secs(300) {
        return Err(format!("invalid --etcd-lease-ttl `{s}`: between 1s and 5min"));
    }
    Ok(d)
}

/// How the master and its frameworks notice each other gone (shared by `master` and `dev`).
#[derive(Args, Clone, Debug)]
pub struct FrameworkLivenessArgs {
    /// Heartbeat interval told to frameworks: the master and each framework send one this
    /// often, and either takes the other for gone after 3 silent intervals (a framework's
    /// failover timeout then starts; the SDK driver reconnects, to a new leader after a
    /// failover).
    #[arg(long, default_value = "1s", value_parser = parse_heartbeat)]
    pub framework_heartbeat: Duration,
}

fn parse_heartbeat(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(100) || d > Duration::from_secs(60) {
        return Err(format!("invalid --framework-heartbeat `{s}`: between 100ms and 60s"));
    }
    Ok(d)
}

/// An `--allocation-slice` that is not a count of agents.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a number of agents (1 or more)")]
pub struct SliceError(String);

/// `--allocation-slice`: a count of agents, at least 1.
fn parse_slice(s: &str) -> Result<usize, SliceError> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(SliceError(s.to_string())),
    }
}

/// The allocation flags shared by `master` and `dev`.
#[derive(Args, Clone, Debug)]
pub struct AllocationArgs {
    /// Allocation module (built-ins: drf, priority).
    #[arg(long, default_value = "drf")]
    pub allocator: String,
    /// Full allocation cycle interval.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub allocation_interval: Duration,
    /// Events that free or ask for resources are batched this long before an allocation runs.
    #[arg(long, default_value = "2ms", value_parser = parse_duration)]
    pub allocation_batch: Duration,
    /// Agents one step of an allocation cycle considers: a cycle over more agents runs in
    /// slices, with the events queued meanwhile (status updates, accepts) handled between them.
    #[arg(long, default_value_t = agora_master::core::DEFAULT_ALLOCATION_SLICE, value_parser = parse_slice)]
    pub allocation_slice: usize,
    /// Role weights for DRF, e.g. `analytics=2,web=1` (missing roles weigh 1).
    #[arg(long, value_parser = parse_weights)]
    pub weights: Option<BTreeMap<String, f64>>,
    /// Role priorities for `--allocator priority`, e.g. `analytics=10,web=1` (missing: 0).
    #[arg(long, value_parser = parse_priorities)]
    pub priorities: Option<BTreeMap<String, i64>>,
    /// Guaranteed resources of a role, e.g. `analytics=cpus:4;mem:8GiB` (repeatable).
    #[arg(long = "quota", value_parser = parse_quota)]
    pub quotas: Vec<(String, Resources)>,
    /// Most resources a role may hold, e.g. `web=cpus:16` (repeatable).
    #[arg(long = "quota-limit", value_parser = parse_quota_limit)]
    pub quota_limits: Vec<(String, Resources)>,
    /// Smallest offer worth sending: alternatives separated by `|`, e.g. `cpus:0.01|mem:32MiB`.
    #[arg(long, default_value = "cpus:0.01", value_parser = parse_min_allocatable)]
    pub min_allocatable: MinAllocatable,
    /// Rescind offers not answered within this time (e.g. `30s`); default: never.
    #[arg(long, value_parser = parse_duration)]
    pub offer_timeout: Option<Duration>,
}

fn parse_weights(s: &str) -> Result<BTreeMap<String, f64>, String> {
    allocator::parse_weights(s).map_err(|e| e.to_string())
}

fn parse_priorities(s: &str) -> Result<BTreeMap<String, i64>, String> {
    allocator::parse_priorities(s).map_err(|e| e.to_string())
}

fn parse_quota(s: &str) -> Result<(String, Resources), String> {
    allocator::parse_role_resources("--quota", s).map_err(|e| e.to_string())
}

fn parse_quota_limit(s: &str) -> Result<(String, Resources), String> {
    allocator::parse_role_resources("--quota-limit", s).map_err(|e| e.to_string())
}

/// The alternatives of `--min-allocatable`.
#[derive(Clone, Debug)]
pub struct MinAllocatable(pub Vec<Resources>);

fn parse_min_allocatable(s: &str) -> Result<MinAllocatable, String> {
    allocator::parse_min_allocatable(s).map(MinAllocatable).map_err(|e| e.to_string())
}

fn role_map(flag: &str, entries: &[(String, Resources)]) -> anyhow::Result<BTreeMap<String, Resources>> {
    let mut out = BTreeMap::new();
    for (role, r) in entries {
        if out.insert(role.clone(), r.clone()).is_some() {
            anyhow::bail!("role {role} is given twice in {flag}");
        }
    }
    Ok(out)
}

/// The core configuration for these tunables.
pub fn core_config(m: &MasterCommandCore) -> anyhow::Result<MasterConfig> {
    let a = &m.allocation;
    let guarantees = role_map("--quota", &a.quotas)?;
    let limits = role_map("--quota-limit", &a.quota_limits)?;
    for (role, g) in &guarantees {
        if let Some(l) = limits.get(role) {
            if g.capped_by(l, &l.kinds()) != *g {
                anyhow::bail!("--quota {role}={g} is above --quota-limit {role}={l}");
            }
        }
    }
    Ok(MasterConfig {
        master_id: format!("m{}", &uuid::Uuid::new_v4().simple().to_string()[..6]),
        allocation_interval: a.allocation_interval,
        allocation_batch: a.allocation_batch,
        allocation_slice: a.allocation_slice,
        agent_heartbeat_interval: m.agent_heartbeat,
        agent_timeout: m.agent_timeout,
        agent_reregister_timeout: m.agent_reregister_timeout,
        framework_heartbeat_interval: m.framework.framework_heartbeat,
        framework_timeout: Some(m.framework.framework_heartbeat * FRAMEWORK_MISSED_HEARTBEATS),
        offer_timeout: a.offer_timeout,
        allocation: AllocatorOptions {
            role_weights: a.weights.clone().unwrap_or_default(),
            role_priorities: a.priorities.clone().unwrap_or_default(),
            quota_guarantees: guarantees,
            quota_limits: limits,
            min_allocatable: a.min_allocatable.0.clone(),
        },
        ..MasterConfig::default()
    })
}

/// The tunables shared by `master` and `dev`.
pub struct MasterCommandCore {
    pub allocation: AllocationArgs,
    pub agent_heartbeat: Duration,
    pub agent_timeout: Duration,
    pub agent_reregister_timeout: Duration,
    pub framework: FrameworkLivenessArgs,
}

impl MasterCommand {
    pub async fn execute(self) -> anyhow::Result<ExitCode> {
        let mut core = core_config(&MasterCommandCore {
            allocation: self.allocation.clone(),
            agent_heartbeat: self.agent_heartbeat,
            agent_timeout: self.agent_timeout,
            agent_reregister_timeout: self.agent_reregister_timeout,
            framework: self.framework.clone(),
        })?;
        core.max_kill_grace = self.max_kill_grace;
        // Checked before anything starts: a master that would serve its cluster to the network.
        let http_auth = match self.http {
            Some(addr) => {
                let token = self.http_token_file.as_deref().map(agora_master::http::auth::read_token_file);
                Some(agora_master::http::auth::HttpAuth::for_addr(addr, token.transpose()?.as_deref())?)
            }
            None => None,
        };
        if let Some(path) = &self.acls {
            core.acls = Some(std::sync::Arc::new(agora_master::acl::Acls::load(path)?));
        }
        if self.http.is_some() {
            // Before the master starts, so that no early metric is lost.
            agora_master::http::prometheus();
        }
        // Held until the master stops: a temporary work dir is removed at exit.
        let (work_dir, _temp_work_dir) = match self.work_dir {
            Some(d) => (d, None),
            None => {
                let t = tempfile::Builder::new().prefix("agora-master-").tempdir()?;
                tracing::warn!(
                    work_dir = %t.path().display(),
                    "no --work-dir: using a temporary directory; a restarted master will not know this cluster's frameworks, agents or artifacts"
                );
                (t.path().to_path_buf(), Some(t))
            }
        };
        let shutdown = CancellationToken::new();
        let config = ServerConfig {
            listen: self.listen,
            tls: TlsFiles::in_dir(&self.tls_dir, "master"),
            core,
            allocator: self.allocation.allocator,
            work_dir,
            max_artifact_size: self.max_artifact_size,
            eviction: agora_master::artifacts::EvictionConfig {
                max_bytes: (self.artifact_store_size > 0).then_some(self.artifact_store_size),
                grace: self.artifact_grace,
                interval: self.artifact_evict_interval,
            },
            limits: self.peer_limits.limits(),
        };
        let handle = match self.etcd {
            None => server::spawn(config, shutdown.clone())?,
            Some(EtcdEndpoints(endpoints)) => {
                let advertise = match self.advertise {
                    Some(a) => a,
                    None if self.listen.ip().is_unspecified() => anyhow::bail!(
                        "--listen {} is not an address peers can reach: give --advertise HOST:PORT",
                        self.listen
                    ),
                    None => String::new(),
                };
                let ha = HaConfig {
                    endpoints,
                    cluster: self.cluster_name,
                    lease_ttl: self.etcd_lease_ttl,
                    advertise,
                };
                server::spawn_ha(config, ha, &allocator::Registry::builtin(), shutdown.clone()).await?
            }
        };
        // On stdout, as `agora dev` prints its own: stderr carries only the diagnostics, in the
        // format --log-format asks for (a plain line there breaks every JSON log reader).
        println!("agora master listening on {} (QUIC, mutual TLS)", handle.addr);
        if let (Some(addr), Some(auth)) = (self.http, http_auth) {
            let flags = super::flags();
            let bound =
                agora_master::http::spawn_with_auth(addr, handle.clone(), flags, auth, shutdown.clone())
                    .await?;
            println!("HTTP: http://{bound}/api/v1/state and http://{bound}/metrics; web UI: http://{bound}/");
        }
        tokio::select! {
            () = super::shutdown_signal() => {}
            why = handle.failed() => {
                shutdown.cancel();
                anyhow::bail!("the master stopped: {why}");
            }
        }
        shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(ExitCode::SUCCESS)
    }
}

/// `--max-kill-grace`: at most the agents' own ceiling, [`agora_agent::MAX_KILL_GRACE`] (a
/// longer one would be cut by every agent anyway).
fn parse_kill_grace(s: &str) -> Result<Duration, String> {
    let cap = agora_agent::MAX_KILL_GRACE;
    match parse_duration(s) {
        Ok(d) if d > cap => Err(format!(
            "invalid --max-kill-grace `{s}`: at most {}s (agents cut any grace to that)",
            cap.as_secs()
        )),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("invalid --max-kill-grace `{s}`: {e}")),
    }
}

#[cfg(test)]
mod kill_grace_tests {
    use super::*;

    #[test]
    fn max_kill_grace_is_at_most_the_agents_ceiling() {
        assert_eq!(parse_kill_grace("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_kill_grace("2s"), Ok(Duration::from_secs(2)));
        let e = parse_kill_grace("3000000000s").unwrap_err();
        assert!(e.contains("at most 60s"), "{e}");
    }
}

/// Bounds on what one peer may hold of the master (see `agora_master::limits`).
#[derive(Args)]
pub struct PeerLimitArgs {
    /// Bytes queued for a framework or operator connection that it has not read; a peer that
    /// lets more pile up (it does not read its stream) is disconnected, not buffered.
    #[arg(long, default_value = "8MiB", value_parser = parse_size)]
    max_outbox: u64,
    /// The same for agents (launch bursts go to agents in batches: keep it large).
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    max_agent_outbox: u64,
    /// Connections open at once per framework or operator principal (agents are not counted);
    /// more are refused with an error naming the limit.
    #[arg(long, default_value_t = agora_master::limits::DEFAULT_CONNECTIONS_PER_PRINCIPAL)]
    max_connections_per_principal: usize,
    /// Bulk streams (uploads, task output, sandbox files) open at once per framework or
    /// operator principal, over all its connections; more are refused.
    #[arg(long, default_value_t = agora_master::limits::DEFAULT_STREAMS_PER_PRINCIPAL)]
    max_streams_per_principal: usize,
    /// A bulk stream (upload, fetch, output, files) whose peer sends or takes no byte for this
    /// long is cut.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    stream_idle_timeout: Duration,
    /// An upload, an artifact fetch or a read of output or files that does not follow is cut
    /// after this long.
    #[arg(long, default_value = "10min", value_parser = parse_duration)]
    stream_total_timeout: Duration,
    /// Validations of new Wasm modules run at once (each holds its module in memory); more
    /// uploads wait their turn.
    #[arg(long, default_value_t = agora_master::artifacts::DEFAULT_MAX_VALIDATIONS)]
    max_validations: usize,
}

impl PeerLimitArgs {
    fn limits(&self) -> agora_master::limits::PeerLimits {
        agora_master::limits::PeerLimits {
            outbox_bytes: usize::try_from(self.max_outbox).unwrap_or(usize::MAX),
            agent_outbox_bytes: usize::try_from(self.max_agent_outbox).unwrap_or(usize::MAX),
            connections_per_principal: self.max_connections_per_principal,
            streams_per_principal: self.max_streams_per_principal,
            stream_idle_timeout: self.stream_idle_timeout,
            stream_total_timeout: self.stream_total_timeout,
            validations: self.max_validations,
        }
    }
}
