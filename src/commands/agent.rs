//! `agora agent` (run an agent on this node), `agora agent drain AGENT [--deadline 5m]
//! [--no-kill]` and `agora agent undrain AGENT` (operator calls: take an agent out of service
//! and back).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use agora_agent::cgroups::{CpuLimit, IsolationConfig, IsolationMode, DEFAULT_MAX_PIDS_PER_TASK};
use agora_sdk::client::OperatorClient;
use agora_sdk::proto::{AgentId, MAX_DRAIN_DEADLINE};
use agora_sdk::tls::TlsFiles;
use agora_sdk::units::{parse_duration, parse_size};
use agora_sdk::{Attributes, Resources};
use clap::builder::TypedValueParser as _;
use clap::{Args, Subcommand};
use tokio_util::sync::CancellationToken;

use super::ClusterArgs;

// The flags run an agent; a subcommand (drain, undrain) is an operator call instead, and then
// the agent's required flags are not asked for.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct AgentCommand {
    #[command(subcommand)]
    action: Option<AgentAction>,
    /// Master address (host:port), or several masters: `a:5050,b:5050,c:5050`.
    // `Option` only so that a subcommand may go without it: required otherwise.
    #[arg(long, required = true, value_parser = super::master_list)]
    master: Option<String>,
    /// Resources to offer, e.g. "cpus:4;mem:8GiB;disk:20GiB;ports:[31000-32000]"
    /// (default: detected: all cores, memory less a reserve).
    #[arg(long, value_parser = Resources::parse)]
    resources: Option<Resources>,
    /// Attributes, e.g. "rack:r1;zone:a;blocks:{b17,b42}".
    #[arg(long, value_parser = Attributes::parse, default_value = "")]
    attributes: Attributes,
    /// Where sandboxes, the agent id and checkpoints live.
    #[arg(long, default_value = "/var/lib/agora/agent")]
    work_dir: PathBuf,
    /// Directory with ca.pem and this agent's certificate.
    #[arg(long, required = true)]
    tls_dir: Option<PathBuf>,
    /// Certificate name in --tls-dir (NAME.pem, NAME-key.pem).
    #[arg(long, default_value = "agent")]
    cert_name: String,
    /// Host name reported to the master.
    #[arg(long)]
    hostname: Option<String>,
    /// Time between SIGTERM and SIGKILL when a task is killed.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    kill_grace: Duration,
    /// Task isolation: "auto" uses cgroups (v1 or v2) where available and otherwise warns once
    /// and runs tasks without limits; "cgroups" refuses to start without them; "none" disables it.
    #[arg(long, default_value = "auto", value_name = "auto|cgroups|none")]
    isolation: IsolationMode,
    /// Cgroup path (as in /proc/self/cgroup, e.g. /agora) under which the agent creates its
    /// tasks' cgroups, in every hierarchy (default: <agent's own cgroup>/agora-<id>).
    #[arg(long, value_name = "PATH")]
    cgroup_root: Option<PathBuf>,
    /// "hard": a CFS quota of `cpus` on top of the CPU weight; "soft": weight only (idle CPU may
    /// be used beyond `cpus`).
    #[arg(long, default_value = "hard", value_name = "hard|soft")]
    cpu_limit: CpuLimit,
    /// Maximum number of processes and threads of one task (0: no limit).
    #[arg(long, default_value_t = DEFAULT_MAX_PIDS_PER_TASK)]
    max_pids_per_task: u64,
    /// On cgroup v1, make sure a cgroup hierarchy mounted with the kernel's "favordynmods"
    /// option exists (the agent mounts one at /run/agora/cgroup-favordynmods if none does):
    /// moving each new task into its cgroups then no longer waits for RCU grace periods, at
    /// the price of slightly slower fork and exit host-wide. Needs Linux 6.0; nothing is done on
    /// cgroup v2.
    #[arg(long, default_value = "on", value_name = "on|off", action = clap::ArgAction::Set,
        value_parser = clap::builder::PossibleValuesParser::new(["on", "off"]).map(|v| v == "on"))]
    cgroup_favordynmods: bool,
    /// The unprivileged user tasks and executors run as (when the agent is root; the agent
    /// refuses to start if it does not exist).
    #[arg(long, default_value = agora_agent::user::DEFAULT_TASK_USER)]
    task_user: String,
    /// What to do with the executors and tasks an earlier run of this agent left: "reconnect"
    /// takes them back (they keep running across an agent restart or upgrade); "cleanup" kills
    /// them all, removes the checkpoints and starts clean (needed when the checkpoints cannot
    /// be read).
    #[arg(long, default_value = "reconnect", value_name = "reconnect|cleanup")]
    recover: agora_agent::RecoverMode,
    /// How long executors keep their tasks while the agent is away, waiting for it to come back;
    /// then they kill their tasks and exit.
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    recovery_timeout: Duration,
    /// How long a restarted agent waits for the executors of its earlier run to reconnect;
    /// the tasks of those that do not are failed and killed.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    executor_reregister_timeout: Duration,
    /// How long the sandbox of a finished task (its output and files) is kept after its end
    /// was acknowledged; less when the disk fills up (see --gc-disk-headroom).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    gc_delay: Duration,
    /// Fraction of the work dir's disk to keep free (0 to 1): finished sandboxes are kept
    /// --gc-delay × max(0, 1 − headroom − disk usage), so a disk that fills up removes them sooner.
    #[arg(long, default_value_t = agora_agent::gc::DEFAULT_DISK_HEADROOM, value_parser = parse_headroom)]
    gc_disk_headroom: f64,
    /// How often finished sandboxes that are due are removed.
    #[arg(long, default_value = "1m", value_parser = parse_duration, hide = true)]
    gc_interval: Duration,
    /// How often the sandbox of every running task is measured against its `disk` (a task
    /// over it is killed with reason `disk limit exceeded`) and its output capped.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    disk_check_interval: Duration,
    /// The disk limit of a task that asks for no `disk`, e.g. `10GiB` (default: such tasks
    /// are not limited; their output is still capped).
    #[arg(long, value_parser = parse_size)]
    default_task_disk: Option<u64>,
    /// Most bytes kept of each of a task's output streams (stdout, stderr): past it the head
    /// is dropped and the last half kept; offsets do not change.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    max_output_size: u64,
    /// Most bytes of fetched artifacts (modules, executors, directory archives) and compiled
    /// Wasm modules the agent keeps; past it the least recently used that no running task
    /// needs are removed (fetched again when needed). 0: no bound.
    #[arg(long, default_value = "2GiB", value_parser = parse_size)]
    cache_size: u64,
    /// A cached artifact asked for this recently is never evicted.
    #[arg(long, default_value = "1m", value_parser = parse_duration, hide = true)]
    cache_grace: Duration,
}

#[derive(Subcommand)]
enum AgentAction {
    /// Drain an agent: it gets no new offers, frameworks are told (with the deadline, so that
    /// they can move their work), and the tasks still running on it at the deadline are
    /// killed with reason `agent drained`. Kept by the master across restarts and failovers.
    Drain(DrainArgs),
    /// Call off an agent's drain: it is offered again.
    Undrain(UndrainArgs),
}

#[derive(Args)]
struct DrainArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// The agent's id (as `agora agents` lists it).
    agent: String,
    /// When the tasks still running on the agent are killed, e.g. `5m` (at most 30 days).
    /// Without it nothing is killed: the agent only stops getting offers.
    #[arg(long, value_parser = parse_drain_deadline)]
    deadline: Option<Duration>,
    /// Leave the tasks running at the deadline (frameworks are still told it).
    #[arg(long)]
    no_kill: bool,
}

#[derive(Args)]
struct UndrainArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// The agent's id (as `agora agents` lists it).
    agent: String,
}

/// `--deadline`: a duration of at most [`MAX_DRAIN_DEADLINE`] (the master's bound).
fn parse_drain_deadline(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s).map_err(|e| e.to_string())?;
    if d > MAX_DRAIN_DEADLINE {
        return Err(format!("at most {} days", MAX_DRAIN_DEADLINE.as_secs() / 86_400));
    }
    Ok(d)
}

/// An agent id given on the command line.
fn agent_id(s: &str) -> anyhow::Result<AgentId> {
    let s = s.trim();
    anyhow::ensure!(!s.is_empty(), "the agent id is empty (see `agora agents`)");
    Ok(AgentId::new(s))
}

impl AgentAction {
    async fn execute(self) -> anyhow::Result<ExitCode> {
        match self {
            AgentAction::Drain(a) => {
                let id = agent_id(&a.agent)?;
                let mut client = OperatorClient::connect(&a.cluster.resolve()?).await?;
                client.drain_agent(&id, a.deadline, !a.no_kill).await?;
                client.close();
                match (a.deadline, a.no_kill) {
                    (None, _) => println!("agent {id} draining: no new offers, no deadline"),
                    (Some(d), false) => println!(
                        "agent {id} draining: no new offers; tasks still running in {}s are killed",
                        d.as_secs_f64()
                    ),
                    (Some(d), true) => println!(
                        "agent {id} draining: no new offers; deadline in {}s, tasks left running",
                        d.as_secs_f64()
                    ),
                }
            }
            AgentAction::Undrain(a) => {
                let id = agent_id(&a.agent)?;
                let mut client = OperatorClient::connect(&a.cluster.resolve()?).await?;
                client.undrain_agent(&id).await?;
                client.close();
                println!("agent {id} no longer draining");
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// `--gc-disk-headroom`: a fraction between 0 and 1.
fn parse_headroom(s: &str) -> Result<f64, String> {
    let v: f64 =
        s.trim().parse().map_err(|_| format!("not a number: {s:?} (give a fraction such as 0.1)"))?;
    let config = agora_agent::gc::GcConfig { disk_headroom: v, ..agora_agent::gc::GcConfig::default() };
    config.validate().map_err(|e| e.to_string())?;
    Ok(v)
}

impl AgentCommand {
    /// Whether this runs an agent (rather than an operator call such as `agora agent drain`).
    pub fn runs_agent(&self) -> bool {
        self.action.is_none()
    }

    pub async fn execute(self) -> anyhow::Result<ExitCode> {
        if let Some(action) = self.action {
            return action.execute().await;
        }
        // clap requires both without a subcommand.
        let (Some(master), Some(tls_dir)) = (self.master, self.tls_dir) else {
            anyhow::bail!("agora agent needs --master and --tls-dir");
        };
        let shutdown = CancellationToken::new();
        let config = agora_agent::AgentConfig {
            master,
            tls: TlsFiles::in_dir(&tls_dir, &self.cert_name),
            work_dir: self.work_dir,
            resources: self.resources,
            attributes: self.attributes,
            hostname: self.hostname.unwrap_or_else(agora_sdk::scheduler::hostname),
            kill_grace: self.kill_grace,
            kill_tasks_on_shutdown: false,
            isolation: IsolationConfig {
                mode: self.isolation,
                cgroup_root: self.cgroup_root,
                cpu_limit: self.cpu_limit,
                max_pids_per_task: self.max_pids_per_task,
                favordynmods: self.cgroup_favordynmods,
            },
            executors: agora_agent::executors::ExecutorsConfig {
                recovery_timeout: self.recovery_timeout,
                ..agora_agent::executors::ExecutorsConfig::default()
            },
            task_user: self.task_user.clone(),
            recovery: agora_agent::RecoveryConfig {
                mode: self.recover,
                executor_reregister_timeout: self.executor_reregister_timeout,
            },
            gc: agora_agent::gc::GcConfig {
                delay: self.gc_delay,
                disk_headroom: self.gc_disk_headroom,
                interval: self.gc_interval,
            },
            disk: agora_agent::disk::DiskConfig {
                check_interval: self.disk_check_interval,
                default_task_disk: self.default_task_disk,
                max_output_size: self.max_output_size,
                cache_size: (self.cache_size > 0).then_some(self.cache_size),
                cache_grace: self.cache_grace,
            },
        };
        let token = shutdown.clone();
        let mut agent = tokio::spawn(agora_agent::run(config, token));
        tokio::select! {
            _ = super::shutdown_signal() => {
                shutdown.cancel();
                (&mut agent).await??;
            }
            r = &mut agent => r??,
        }
        Ok(ExitCode::SUCCESS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        agent: AgentCommand,
    }

    #[test]
    fn cgroup_favordynmods_is_on_unless_turned_off() {
        let parse = |extra: &[&str]| {
            let args = ["agora", "--master", "m:5050", "--tls-dir", "/t"].iter().chain(extra);
            Cli::try_parse_from(args).map(|c| c.agent.cgroup_favordynmods)
        };
        assert_eq!(parse(&[]).ok(), Some(true));
        assert_eq!(parse(&["--cgroup-favordynmods", "off"]).ok(), Some(false));
        assert_eq!(parse(&["--cgroup-favordynmods=on"]).ok(), Some(true));
        assert!(parse(&["--cgroup-favordynmods", "1"]).is_err());
    }
}
