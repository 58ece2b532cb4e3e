//! `agora tls init --dir D`, `agora tls issue` and `agora tls revoke`.

use std::path::PathBuf;
use std::process::ExitCode;

use agora_sdk::proto::Role;
use agora_sdk::tls::Revoked;
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
        /// Lifetime of the master, agent, framework and operator certificates, in days.
        #[arg(long, default_value_t = agora_sdk::tls::DEFAULT_LEAF_DAYS)]
        days: u32,
        /// Lifetime of the cluster CA, in days.
        #[arg(long, default_value_t = agora_sdk::tls::DEFAULT_CA_DAYS)]
        ca_days: u32,
    },
    /// Issue one more certificate signed by the CA in DIR (e.g. one per agent or framework).
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        role: Role,
        /// Principal (CN); the files are DIR/NAME.pem and DIR/NAME-key.pem. Never replaced:
        /// an existing NAME is an error, and the names `tls init` uses are reserved.
        #[arg(long)]
        name: String,
        /// Lifetime of the certificate, in days.
        #[arg(long, default_value_t = agora_sdk::tls::DEFAULT_LEAF_DAYS)]
        days: u32,
    },
    /// Revoke the certificate DIR/NAME.pem: its serial goes into DIR/revoked.txt. Copy that
    /// file into the master's TLS directory: the master refuses revoked certificates from
    /// their next connection (it rereads the file when it changes).
    Revoke {
        #[arg(long)]
        dir: PathBuf,
        /// The certificate's name (as given to `tls issue --name`).
        name: String,
    },
}

impl TlsCommand {
    pub fn execute(self) -> anyhow::Result<ExitCode> {
        match self.action {
            TlsAction::Init { dir, framework_principal, force, days, ca_days } => {
                let lifetimes = agora_sdk::tls::Lifetimes { ca_days, leaf_days: days };
                let report = agora_sdk::tls::init_with(&dir, &framework_principal, force, lifetimes)?;
                println!("Created the cluster CA and certificates in {}:", report.dir.display());
                for f in report.files {
                    println!("  {}", f.display());
                }
                println!(
                    "Keep ca-key.pem safe, on this machine only (never on a master, agent or \
                     client): it signs every peer of this cluster."
                );
            }
            TlsAction::Issue { dir, role, name, days } => {
                agora_sdk::tls::check_name(&name)?;
                for f in agora_sdk::tls::issue_days(&dir, role, &name, &name, days)? {
                    println!("{}", f.display());
                }
            }
            TlsAction::Revoke { dir, name } => match agora_sdk::tls::revoke(&dir, &name)? {
                Revoked::Added { serial, list } => {
                    println!("Revoked `{name}` (serial {serial}) in {}.", list.display());
                    println!("Copy it to the master's TLS directory (every master, with --etcd).");
                }
                Revoked::Already { serial, list } => {
                    println!("`{name}` (serial {serial}) was already revoked in {}.", list.display());
                }
            },
        }
        Ok(ExitCode::SUCCESS)
    }
}
