//! `agora agents | frameworks | tasks [-o table|json]`.

use std::process::ExitCode;

use agora_sdk::client::OperatorClient;
use clap::Args;

use super::ClusterArgs;
use crate::output;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

pub enum What {
    Agents,
    Frameworks,
    Tasks,
}

#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    format: Format,
}

impl ListArgs {
    pub async fn execute(self, what: What) -> anyhow::Result<ExitCode> {
        let cfg = self.cluster.resolve()?;
        let mut client = OperatorClient::connect(&cfg).await?;
        let (json, table) = match what {
            What::Agents => {
                let v = client.agents().await?;
                (v.iter().map(agora_sdk::json::agent_json).collect::<Vec<_>>(), output::agents_table(&v))
            }
            What::Frameworks => {
                let v = client.frameworks().await?;
                (v.iter().map(agora_sdk::json::framework_json).collect(), output::frameworks_table(&v))
            }
            What::Tasks => {
                let v = client.tasks().await?;
                (v.iter().map(agora_sdk::json::task_json).collect(), output::tasks_table(&v))
            }
        };
        client.close();
        match self.format {
            Format::Json => println!("{}", serde_json::to_string_pretty(&serde_json::Value::Array(json))?),
            Format::Table => print!("{table}"),
        }
        Ok(ExitCode::SUCCESS)
    }
}
