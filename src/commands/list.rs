//! `agora agents | frameworks | tasks | masters [-o table|json]`, and `--allow-stale` on
//! `agents`, `frameworks` and `masters`: the first master of the list that answers serves the
//! listing, a standby from the registry in etcd (marked stale: a note on stderr and, with
//! `-o json`, `"stale": true` in every object).

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

/// The listings a standby may answer: [`ListArgs`] and `--allow-stale`.
#[derive(Args)]
pub struct StaleListArgs {
    #[command(flatten)]
    list: ListArgs,
    /// Accept an answer from a standby master (the first of --master that answers, leader or
    /// not): it lists what the registry in etcd holds, which may lag the leader and has no
    /// live state (statuses `registered`/`unreachable`, nothing in use, no task counts). Marked
    /// on stderr and, with -o json, by `"stale": true` in every object.
    #[arg(long)]
    allow_stale: bool,
}

impl StaleListArgs {
    pub async fn execute(self, what: What) -> anyhow::Result<ExitCode> {
        self.list.execute(what, self.allow_stale).await
    }
}

/// `agora frameworks`: [`StaleListArgs`] and `--all`.
#[derive(Args)]
pub struct FrameworksArgs {
    #[command(flatten)]
    list: StaleListArgs,
    /// Also list the frameworks that ended since the master started (status `completed`; the
    /// last 100). Only the leader remembers them.
    #[arg(long)]
    all: bool,
}

impl FrameworksArgs {
    pub async fn execute(self) -> anyhow::Result<ExitCode> {
        self.list.execute(What::Frameworks { all: self.all }).await
    }
}

impl ListArgs {
    /// Lists `what` from the leader or, with `allow_stale`, from whichever master answers first.
    pub async fn execute(self, what: What, allow_stale: bool) -> anyhow::Result<ExitCode> {
        let cfg = self.cluster.resolve()?;
        let mut client = if allow_stale {
            OperatorClient::connect_allowing_stale(&cfg).await?
        } else {
            OperatorClient::connect(&cfg).await?
        };
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
                // Tasks that wait for resources, after the others (a master that cannot list
                // them leaves them out).
                let pending = client.pending_tasks().await.unwrap_or_default();
                let mut json: Vec<serde_json::Value> = v.iter().map(task_json).collect();
                json.extend(pending.iter().map(agora_sdk::json::pending_task_json));
                (json, output::tasks_table_with_pending(&v, &pending))
            }
            What::Masters => {
                let v = client.masters().await?;
                (v.iter().map(agora_sdk::json::master_json).collect(), output::masters_table(&v))
            }
        };
        client.close();
        let mut json = json;
        if let Some(from) = client.stale() {
            eprintln!("{}", stale_note(client.master_id(), from));
            mark_stale(&mut json);
        }
        match self.format {
            Format::Json => println!("{}", serde_json::to_string_pretty(&serde_json::Value::Array(json))?),
            Format::Table => print!("{table}"),
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// The stderr note of a stale listing.
fn stale_note(standby: &str, from: &agora_sdk::client::StaleSource) -> String {
    let leader = from.leader.as_deref().map(|l| format!("; the leader is {l}")).unwrap_or_default();
    format!(
        "note: stale read from standby {standby} at {}: the registry as the leader last wrote it, without live state{leader}",
        from.address
    )
}

/// Adds `"stale": true` to every object of a listing (additive: the array stays an array).
fn mark_stale(items: &mut [serde_json::Value]) {
    for item in items {
        if let Some(o) = item.as_object_mut() {
            o.insert("stale".into(), true.into());
        }
    }
}

/// A task as JSON: the SDK's form, plus the executor that runs it (`agora-command`,
/// `agora-wasm` or the framework's own executor id).
pub fn task_json(t: &agora_sdk::proto::TaskView) -> serde_json::Value {
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
            reason: Reason::None,
            message: String::new(),
            usage: None,
            executor_id: ExecutorId::new("my-exec"),
        };
        let v = super::task_json(&t);
        assert_eq!(v["executor_id"], "my-exec");
        assert_eq!(v["id"], "t1");
    }

    #[test]
    fn stale_listings_are_marked() {
        let mut items = vec![serde_json::json!({"id": "f1"}), serde_json::json!({"id": "f2"})];
        super::mark_stale(&mut items);
        assert!(items.iter().all(|i| i["stale"] == true));
        let from = agora_sdk::client::StaleSource { address: "b:5050".into(), leader: Some("a:5050".into()) };
        assert_eq!(
            super::stale_note("m2", &from),
            "note: stale read from standby m2 at b:5050: the registry as the leader last wrote it, without live state; the leader is a:5050"
        );
    }
}
