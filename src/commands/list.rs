//! `agora agents | frameworks | tasks | masters [-o table|json]`.

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
    Frameworks { all: bool },
    Tasks,
    Masters,
}

#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    format: Format,
}

/// `agora frameworks`: [`ListArgs`] and `--all`.
#[derive(Args)]
pub struct FrameworksArgs {
    #[command(flatten)]
    list: ListArgs,
    /// Also list the frameworks that ended since the master started (status `completed`; the
    /// last 100).
    #[arg(long)]
    all: bool,
}

impl FrameworksArgs {
    pub async fn execute(self) -> anyhow::Result<ExitCode> {
        self.list.execute(What::Frameworks { all: self.all }).await
    }
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
            What::Frameworks { all } => {
                let mut v = client.frameworks().await?;
                if all {
                    v.extend(client.completed_frameworks().await?);
                }
                (v.iter().map(agora_sdk::json::framework_json).collect(), output::frameworks_table(&v))
            }
            What::Tasks => {
                let v = client.tasks().await?;
                (v.iter().map(task_json).collect(), output::tasks_table(&v))
            }
            What::Masters => {
                let v = client.masters().await?;
                (v.iter().map(agora_sdk::json::master_json).collect(), output::masters_table(&v))
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

/// A task as JSON: the SDK's form, plus the executor that runs it (`agora-command`,
/// `agora-wasm` or the framework's own executor id).
fn task_json(t: &agora_sdk::proto::TaskView) -> serde_json::Value {
    let mut v = agora_sdk::json::task_json(t);
    if let Some(o) = v.as_object_mut() {
        o.entry("executor_id").or_insert_with(|| t.executor_id.as_str().into());
    }
    v
}

#[cfg(test)]
mod tests {
    use agora_sdk::proto::*;
    use agora_sdk::Resources;

    #[test]
    fn task_json_names_the_executor() {
        let t = TaskView {
            id: TaskId::new("t1"),
            name: "t1".into(),
            framework_id: FrameworkId::new("m-F1"),
            agent_id: AgentId::new("m-A1"),
            state: TaskState::Running,
            resources: Resources::cpus(1000),
            exit_code: None,
            signal: None,
            reason: String::new(),
            message: String::new(),
            usage: None,
            executor_id: ExecutorId::new("my-exec"),
        };
        let v = super::task_json(&t);
        assert_eq!(v["executor_id"], "my-exec");
        assert_eq!(v["id"], "t1");
    }
}
