//! `agora tls init --dir D` and `agora tls issue`.

use std::path::PathBuf;
use std::process::ExitCode;

use agora_sdk::proto::Role;
use clap::{Args, Subcommand};

#[derive(Args)]
pub struct TlsCommand {
    #[command(subcommand)]
    action: TlsAction,
}

#[derive(Subcommand)]
enum TlsAction {
    /// Create a cluster CA and certificates for a master, agents, a framework and an operator.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Principal of the framework certificate.
        #[arg(long, default_value = "default")]
        framework_principal: String,
        /// Replace an existing CA (every certificate it signed stops working).
        #[arg(long)]
        force: bool,
    },
    /// Issue one more certificate signed by the CA in DIR (e.g. one per agent or framework).
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        role: Role,
        /// Principal (CN); the files are DIR/NAME.pem and DIR/NAME-key.pem.
        #[arg(long)]
        name: String,
    },
}

impl TlsCommand {
    pub fn execute(self) -> anyhow::Result<ExitCode> {
        match self.action {
            TlsAction::Init { dir, framework_principal, force } => {
                let report = agora_sdk::tls::init(&dir, &framework_principal, force)?;
                println!("Created the cluster CA and certificates in {}:", report.dir.display());
                for f in report.files {
                    println!("  {}", f.display());
                }
                println!("Keep ca-key.pem safe: it signs every peer of this cluster.");
            }
            TlsAction::Issue { dir, role, name } => {
                if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
                    anyhow::bail!("invalid certificate name `{name}`");
                }
                for f in agora_sdk::tls::issue(&dir, role, &name, &name)? {
                    println!("{}", f.display());
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}
