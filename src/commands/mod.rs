//! One module per subcommand, each a clap `Args` struct with an `execute`.

use std::process::ExitCode;

use clap::Subcommand;

pub mod agent;
pub mod completions;
pub mod demo;
pub mod demo_executor;
pub mod describe;
pub mod dev;
pub mod executor_command;
pub mod executor_wasm;
pub mod files;
pub mod job;
pub mod kill;
pub mod list;
pub mod logs;
pub mod master;
pub mod policy;
pub mod resolve;
pub mod run;
mod run_output;
pub mod run_steps;
pub mod tls;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Start a single-process cluster and run a showcase of Agora.
    Demo(demo::DemoCommand),
    /// Run a master and N agents in one process, for development.
    Dev(dev::DevCommand),
    /// Run a master.
    Master(master::MasterCommand),
    /// Run an agent on this node.
    Agent(agent::AgentCommand),
    /// Run a task (or --count N tasks) on the cluster and stream its output.
    Run(run::RunCommand),
    /// List agents.
    Agents(list::StaleListArgs),
    /// List frameworks.
    Frameworks(list::FrameworksArgs),
    /// List tasks.
    Tasks(list::ListArgs),
    /// List the cluster's masters: address, which one leads, epoch.
    Masters(list::StaleListArgs),
    /// Run a job file (task groups with counts, constraints and restart policies), or show or
    /// stop a running job.
    Job(job::JobCommand),
    /// Show or set the allocation policy: role weights, priorities, quotas.
    Policy(policy::PolicyCommand),
    /// Show everything known of one task, agent or framework (id, unique id prefix or name).
    Describe(describe::DescribeCommand),
    /// Print a task's stdout (or stderr).
    Logs(logs::LogsCommand),
    /// List a task's sandbox, or print one of its files (--cat).
    Files(files::FilesCommand),
    /// Copy a file of a task's sandbox here: `agora cp TASK:PATH LOCAL`.
    Cp(files::CpCommand),
    /// Kill a task.
    Kill(kill::KillCommand),
    /// Make the cluster's certificates.
    Tls(tls::TlsCommand),
    /// Print a shell completion script: `source <(agora completions bash)`.
    Completions(completions::CompletionsCommand),
    /// Internal: the Wasm executor, started by the agent.
    #[command(hide = true)]
    ExecutorWasm(executor_wasm::ExecutorWasmCommand),
    /// Internal: the command executor (native tasks), started by the agent.
    /// Internal: the custom executor of `agora demo`, started by the agent.
    #[command(hide = true)]
    DemoExecutor(demo_executor::DemoExecutorCommand),
    #[command(hide = true, name = "executor-command")]
    NativeExecutor(executor_command::ExecutorCommandCommand),
}

impl Command {
    pub async fn execute(self) -> anyhow::Result<ExitCode> {
        match self {
            Command::Demo(c) => c.execute().await,
            Command::Dev(c) => c.execute().await,
            Command::Master(c) => c.execute().await,
            Command::Agent(c) => c.execute().await,
            Command::Run(c) => c.execute().await,
            Command::Agents(c) => c.execute(list::What::Agents).await,
            Command::Frameworks(c) => c.execute().await,
            Command::Tasks(c) => c.execute(list::What::Tasks, false).await,
            Command::Masters(c) => c.execute(list::What::Masters).await,
            Command::Policy(c) => c.execute().await,
            Command::Job(c) => c.execute().await,
            Command::Describe(c) => c.execute().await,
            Command::Logs(c) => c.execute().await,
            Command::Kill(c) => c.execute().await,
            Command::Files(c) => c.execute().await,
            Command::Cp(c) => c.execute().await,
            Command::Tls(c) => c.execute(),
            Command::Completions(c) => c.execute(),
            Command::ExecutorWasm(c) => c.execute().await,
            Command::NativeExecutor(c) => c.execute().await,
            Command::DemoExecutor(c) => c.execute().await,
        }
    }

    /// Whether a closed stdout may simply end the process (SIGPIPE's default): the client
    /// commands, whose only pipes are the user's. Not the servers, the demo or the executors:
    /// they write to Unix sockets whose peer may go (an executor outlives its agent).
    pub fn dies_on_closed_pipe(&self) -> bool {
        matches!(
            self,
            Command::Run(_)
                | Command::Agents(_)
                | Command::Frameworks(_)
                | Command::Tasks(_)
                | Command::Masters(_)
                | Command::Policy(_)
                | Command::Job(_)
                | Command::Describe(_)
                | Command::Logs(_)
                | Command::Files(_)
                | Command::Cp(_)
                | Command::Kill(_)
                | Command::Tls(_)
                | Command::Completions(_)
        )
    }

    fn is_server(&self) -> bool {
        matches!(
            self,
            Command::Dev(_) | Command::Master(_) | Command::ExecutorWasm(_) | Command::NativeExecutor(_)
        ) || matches!(self, Command::Agent(c) if c.runs_agent())
    }

    /// Worker threads of the async runtime, when the command sets them.
    pub fn worker_threads(&self) -> Option<usize> {
        match self {
            Command::ExecutorWasm(c) => Some(c.worker_threads()),
            _ => None,
        }
    }
}

/// Servers log at info, clients (whose stdout/stderr belong to the user) only warnings.
pub fn init_logging(cmd: &Command, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let default = if cmd.is_server() { "info,quinn=warn,rustls=warn" } else { "warn,quinn=error" };
    let filter = EnvFilter::try_from_env("AGORA_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    // No colour codes when stderr is a file (the agent writes executors' logs to files).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// How client commands find the cluster.
#[derive(clap::Args, Clone, Debug)]
pub struct ClusterArgs {
    /// client.toml naming the master and certificates (also AGORA_CONFIG).
    #[arg(long, env = "AGORA_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// Master address (host:port), or several (`a:5050,b:5050,c:5050`); with --tls-dir
    /// instead of a config file, or overriding the config's.
    #[arg(long, value_parser = master_list)]
    pub master: Option<String>,
    /// Directory made by `agora tls init`.
    #[arg(long)]
    pub tls_dir: Option<std::path::PathBuf>,
}

/// What `agora dev` writes by default, relative to the directory it runs in; client commands
/// run in that directory use it when nothing else names a cluster.
pub const DEV_CLIENT_CONFIG: &str = ".agora-dev/client.toml";

impl ClusterArgs {
    pub fn resolve(&self) -> anyhow::Result<agora_sdk::config::ClientConfig> {
        // `--config` is also AGORA_CONFIG (clap reads the variable into it).
        if self.config.is_none() && self.master.is_none() && self.tls_dir.is_none() {
            let dev = std::path::Path::new(DEV_CLIENT_CONFIG);
            if dev.is_file() {
                eprintln!("agora: using {DEV_CLIENT_CONFIG} of this directory (no --config, AGORA_CONFIG or --master)");
                return Ok(agora_sdk::config::ClientConfig::load(dev)?);
            }
        }
        use agora_sdk::config::{ClientConfig, ConfigError};
        match ClientConfig::resolve(self.config.as_deref(), self.master.as_deref(), self.tls_dir.as_deref()) {
            Err(ConfigError::NoCluster) => anyhow::bail!(
                "no cluster given: pass --config FILE, set AGORA_CONFIG, pass --master ADDR --tls-dir DIR, or run where `agora dev` wrote {DEV_CLIENT_CONFIG}"
            ),
            other => Ok(other?),
        }
    }
}

/// The flags of this process's subcommand as `name → value`, the defaults included (a flag
/// given several times: its values joined by commas), for the master's `/api/v1/state`.
pub fn flags() -> serde_json::Map<String, serde_json::Value> {
    use clap::CommandFactory;
    let cli = crate::Cli::command();
    let Ok(matches) = cli.clone().try_get_matches_from(std::env::args_os()) else {
        return serde_json::Map::new();
    };
    let Some((name, sub)) = matches.subcommand() else { return serde_json::Map::new() };
    let Some(cmd) = cli.find_subcommand(name) else { return serde_json::Map::new() };
    // Arguments only: groups (of flattened structs) answer with their members' names.
    let args: Vec<&str> = cmd.get_arguments().map(|a| a.get_id().as_str()).collect();
    sub.ids()
        .filter(|id| args.contains(&id.as_str()))
        .filter_map(|id| {
            let values = sub.try_get_raw(id.as_str()).ok()??;
            let text = values.map(|v| v.to_string_lossy().into_owned()).collect::<Vec<_>>().join(",");
            Some((id.to_string(), text.into()))
        })
        .collect()
}

/// `--master`: one `host:port` or several separated by commas, checked.
pub fn master_list(s: &str) -> Result<String, agora_sdk::masters::MasterListError> {
    agora_sdk::masters::check_master_list(s).map(|_| s.to_string())
}

/// Waits for Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}
