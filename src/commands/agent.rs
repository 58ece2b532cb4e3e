//! `agora agent`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use agora_sdk::tls::TlsFiles;
use agora_sdk::units::parse_duration;
use agora_sdk::{Attributes, Resources};
use clap::Args;
use tokio_util::sync::CancellationToken;

#[derive(Args)]
pub struct AgentCommand {
    /// Master address (host:port).
    #[arg(long)]
    master: String,
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
    #[arg(long)]
    tls_dir: PathBuf,
    /// Certificate name in --tls-dir (NAME.pem, NAME-key.pem).
    #[arg(long, default_value = "agent")]
    cert_name: String,
    /// Host name reported to the master.
    #[arg(long)]
    hostname: Option<String>,
    /// Time between SIGTERM and SIGKILL when a task is killed.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    kill_grace: Duration,
}

impl AgentCommand {
    pub async fn execute(self) -> anyhow::Result<ExitCode> {
        let shutdown = CancellationToken::new();
        let config = agora_agent::AgentConfig {
            master: self.master,
            tls: TlsFiles::in_dir(&self.tls_dir, &self.cert_name),
            work_dir: self.work_dir,
            resources: self.resources,
            attributes: self.attributes,
            hostname: self.hostname.unwrap_or_else(agora_sdk::scheduler::hostname),
            kill_grace: self.kill_grace,
            kill_tasks_on_shutdown: false,
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
