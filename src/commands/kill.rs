//! `agora kill TASK`: a task id or a unique prefix of one.

use std::process::ExitCode;

use agora_sdk::client::OperatorClient;
use clap::Args;

use super::resolve::resolve;
use super::ClusterArgs;

#[derive(Args)]
pub struct KillCommand {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Task id, or a unique prefix of one.
    task: String,
}

impl KillCommand {
    pub async fn execute(self) -> anyhow::Result<ExitCode> {
        let cfg = self.cluster.resolve()?;
        let mut client = OperatorClient::connect(&cfg).await?;
        let tasks = client.tasks().await?;
        let id = resolve(&tasks, &self.task, false)?.id.clone();
        client.kill(&id).await?;
        client.close();
        println!("kill requested for {id}");
        Ok(ExitCode::SUCCESS)
    }
}
