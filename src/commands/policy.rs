//! `agora policy [-o table|json]` and `agora policy set [--weights …] [--priorities …]
//! [--quota …]… [--quota-limit …]…`: the allocation policy at run time.
//!
//! A policy set here replaces the whole policy (what is not given is cleared), is recorded in
//! the master's registry before the command returns (so it survives restarts, and failovers to
//! another master), and wins over the masters' `--weights`/`--priorities`/`--quota`/
//! `--quota-limit` flags from then on.

use std::process::ExitCode;

use agora_sdk::client::OperatorClient;
use agora_sdk::proto::AllocationPolicy;
use clap::{Args, Subcommand};

use super::list::Format;
use super::ClusterArgs;

#[derive(Args)]
pub struct PolicyCommand {
    #[command(subcommand)]
    action: Option<PolicyAction>,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    format: Format,
}

#[derive(Subcommand)]
enum PolicyAction {
    /// Replace the whole policy (what is not given is cleared). Recorded in the registry, it
    /// wins over the masters' flags from then on.
    Set(SetArgs),
}

#[derive(Args)]
struct SetArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Role weights for DRF, e.g. `analytics=2,web=1` (missing roles weigh 1).
    #[arg(long, default_value = "")]
    weights: String,
    /// Role priorities for the priority allocator, e.g. `prod=10,batch=1` (missing: 0).
    #[arg(long, default_value = "")]
    priorities: String,
    /// Guaranteed minimum of one role, e.g. `analytics=cpus:4;mem:8GiB` (repeat for more).
    #[arg(long = "quota")]
    quotas: Vec<String>,
    /// Maximum of one role, e.g. `batch=cpus:16` (repeat for more).
    #[arg(long = "quota-limit")]
    quota_limits: Vec<String>,
}

impl PolicyCommand {
    pub async fn execute(self) -> anyhow::Result<ExitCode> {
        match self.action {
            Some(PolicyAction::Set(set)) => {
                let policy = AllocationPolicy {
                    weights: set.weights,
                    priorities: set.priorities,
                    quotas: set.quotas,
                    quota_limits: set.quota_limits,
                };
                // The master reads it the same way; asking first spares a round trip.
                agora_master::allocator::policy_options(&policy, &Default::default())?;
                let mut client = OperatorClient::connect(&set.cluster.resolve()?).await?;
                client.set_policy(policy).await?;
                client.close();
                println!("allocation policy set");
            }
            None => {
                let mut client = OperatorClient::connect(&self.cluster.resolve()?).await?;
                let (policy, source) = client.policy().await?;
                client.close();
                match self.format {
                    Format::Json => {
                        let v = serde_json::json!({
                            "source": source,
                            "weights": policy.weights,
                            "priorities": policy.priorities,
                            "quotas": policy.quotas,
                            "quota_limits": policy.quota_limits,
                        });
                        println!("{}", serde_json::to_string_pretty(&v)?);
                    }
                    Format::Table => print!("{}", table(&policy, &source)),
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// One line per part, `-` for an empty one.
fn table(p: &AllocationPolicy, source: &str) -> String {
    let or_dash = |s: String| if s.is_empty() { "-".to_string() } else { s };
    format!(
        "source       {source}\nweights      {}\npriorities   {}\nquota        {}\nquota-limit  {}\n",
        or_dash(p.weights.clone()),
        or_dash(p.priorities.clone()),
        or_dash(p.quotas.join(" ")),
        or_dash(p.quota_limits.join(" ")),
    )
}
