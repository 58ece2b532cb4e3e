//! `agora kill TASK`.

use std::process::ExitCode;

use agora_sdk::client::OperatorClient;
use agora_sdk::proto::TaskId;
use clap::Args;

use super::ClusterArgs;

#[derive(Args)]
pub struct KillCommand {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Task id.
    task: String,
}

impl KillCommand {
    pub async fn execute(self) -> anyhow::Result<ExitCode> {
        let cfg = self.cluster.resolve()?;
        let mut client = OperatorClient::connect(&cfg).await?;
        client.kill(&TaskId(self.task.clone())).await?;
        client.close();
        println!("kill requested for {}", self.task);
        Ok(ExitCode::SUCCESS)
    }
}
