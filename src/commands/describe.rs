//! `agora describe task|agent|framework ID [-o json]`: everything the master knows of one
//! record. A task: its state, reason, message, exit, resources, usage, executor, agent,
//! framework and its last state changes; an agent: its attributes, resources, use, status and
//! tasks; a framework: its role, principal, status, use and tasks. `ID` may be a unique prefix
//! of an id or a unique name (see [`super::resolve`]).

use std::process::ExitCode;

use agora_sdk::client::OperatorClient;
use agora_sdk::proto::{AgentView, FrameworkView, PendingTaskView, TaskTransition, TaskView};
use agora_sdk::units::format_size;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::list::Format;
use super::resolve::resolve;
use super::ClusterArgs;
use crate::output;

#[derive(Args)]
pub struct DescribeCommand {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// A task: state, exit, resources, usage, executor, agent, framework, state changes.
    Task(DescribeArgs),
    /// An agent: attributes, resources and use, status, tasks.
    Agent(DescribeArgs),
    /// A framework: role, principal, status, use, tasks.
    Framework(DescribeArgs),
}

#[derive(Args)]
struct DescribeArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Id, unique prefix of an id, or unique name (hostname for an agent).
    id: String,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    format: Format,
}

impl DescribeCommand {
    pub async fn execute(self) -> anyhow::Result<ExitCode> {
        let (args, kind) = match &self.what {
            What::Task(a) => (a, Kind::Task),
            What::Agent(a) => (a, Kind::Agent),
            What::Framework(a) => (a, Kind::Framework),
        };
        let cfg = args.cluster.resolve()?;
        let mut client = OperatorClient::connect(&cfg).await?;
        let described = describe(&mut client, kind, &args.id).await;
        client.close();
        let (json, text) = described?;
        match args.format {
            Format::Json => println!("{}", serde_json::to_string_pretty(&json)?),
            Format::Table => print!("{text}"),
        }
        Ok(ExitCode::SUCCESS)
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Task,
    Agent,
    Framework,
}

/// The record `id` names, as JSON and as text.
async fn describe(client: &mut OperatorClient, kind: Kind, id: &str) -> anyhow::Result<(Value, String)> {
    let tasks = client.tasks().await?;
    let agents = client.agents().await?;
    let mut frameworks = client.frameworks().await?;
    frameworks.extend(client.completed_frameworks().await?);
    Ok(match kind {
        Kind::Task => {
            let task = match resolve(&tasks, id, true) {
                Ok(t) => t,
                Err(e) => {
                    // Not launched yet: a task that waits for resources.
                    let pending = client.pending_tasks().await.unwrap_or_default();
                    return match pending_named(&pending, id) {
                        Some(p) => Ok(pending_description(p)),
                        None => Err(e.into()),
                    };
                }
            };
            let history = client.task_history(&task.framework_id, &task.id).await?;
            let agent = agents.iter().find(|a| a.id == task.agent_id);
            let framework = frameworks.iter().find(|f| f.id == task.framework_id);
            (task_json(task, agent, framework, &history), task_text(task, agent, framework, &history))
        }
        Kind::Agent => {
            let agent = resolve(&agents, id, true)?;
            let mine: Vec<TaskView> = tasks.iter().filter(|t| t.agent_id == agent.id).cloned().collect();
            let mut json = agora_sdk::json::agent_json(agent);
            json["task_list"] = mine.iter().map(super::list::task_json).collect();
            let fields = vec![
                ("Agent", agent.id.to_string()),
                ("Hostname", agent.hostname.clone()),
                ("Status", agent.status.to_string()),
                ("Resources", agent.resources.to_string()),
                ("Used", or_dash(agent.used.to_string())),
                ("Attributes", or_dash(agent.attributes.to_string())),
                ("Live tasks", agent.tasks.to_string()),
            ];
            (json, with_tasks(fields, &mine))
        }
        Kind::Framework => {
            let fw = resolve(&frameworks, id, true)?;
            let mine: Vec<TaskView> = tasks.iter().filter(|t| t.framework_id == fw.id).cloned().collect();
            let mut json = agora_sdk::json::framework_json(fw);
            json["task_list"] = mine.iter().map(super::list::task_json).collect();
            let fields = vec![
                ("Framework", fw.id.to_string()),
                ("Name", fw.name.clone()),
                ("Role", fw.role.clone()),
                ("Principal", fw.principal.clone()),
                ("Status", fw.status.to_string()),
                ("Used", or_dash(fw.used.to_string())),
                ("Live tasks", fw.tasks.to_string()),
            ];
            (json, with_tasks(fields, &mine))
        }
    })
}

/// A task as JSON: the listing's form, its agent's and framework's, and its history.
fn task_json(
    t: &TaskView,
    agent: Option<&AgentView>,
    framework: Option<&FrameworkView>,
    history: &[TaskTransition],
) -> Value {
    let mut v = super::list::task_json(t);
    v["agent"] = agent.map(agora_sdk::json::agent_json).unwrap_or(Value::Null);
    v["framework"] = framework.map(agora_sdk::json::framework_json).unwrap_or(Value::Null);
    v["history"] = history
        .iter()
        .map(|h| {
            json!({
                "state": h.state.as_str(),
                "reason": h.reason,
                "timestamp_ms": h.timestamp_ms,
                "time": agora_sdk::units::format_unix_ms(h.timestamp_ms),
            })
        })
        .collect();
    v
}

fn task_text(
    t: &TaskView,
    agent: Option<&AgentView>,
    framework: Option<&FrameworkView>,
    history: &[TaskTransition],
) -> String {
    let exit = match (t.exit_code, t.signal) {
        (_, Some(s)) => format!("signal {s}"),
        (Some(c), _) => format!("code {c}"),
        _ => "-".into(),
    };
    let agent = match agent {
        Some(a) => format!("{} ({}, {})", a.id, a.hostname, a.status),
        None => t.agent_id.to_string(),
    };
    let framework = match framework {
        Some(f) => format!("{} ({}, role {}, {})", f.id, f.name, f.role, f.status),
        None => t.framework_id.to_string(),
    };
    let fields = vec![
        ("Task", t.id.to_string()),
        ("Name", t.name.clone()),
        ("State", t.state.to_string()),
        ("Reason", or_dash(t.reason.to_string())),
        ("Message", or_dash(t.message.clone())),
        ("Exit", exit),
        ("Resources", t.resources.to_string()),
        ("Usage", usage(t)),
        ("Executor", t.executor_id.to_string()),
        ("Agent", agent),
        ("Framework", framework),
    ];
    let mut out = fields_text(&fields);
    out.push_str("\nState changes (the last 16):\n");
    let rows = history
        .iter()
        .map(|h| {
            vec![agora_sdk::units::format_unix_ms(h.timestamp_ms), h.state.to_string(), h.reason.to_string()]
        })
        .collect();
    out.push_str(&indent(&output::table(&["TIME (UTC)", "STATE", "REASON"], rows)));
    out
}

/// The waiting task `id` names: its id, else a unique prefix of one.
fn pending_named<'a>(pending: &'a [PendingTaskView], id: &str) -> Option<&'a PendingTaskView> {
    let named = |exact: bool| -> Vec<&'a PendingTaskView> {
        pending
            .iter()
            .filter(|p| {
                p.task_id.as_ref().is_some_and(|t| {
                    if exact {
                        t.as_str() == id
                    } else {
                        t.as_str().starts_with(id)
                    }
                })
            })
            .collect()
    };
    match (named(true).as_slice(), named(false).as_slice()) {
        ([p], _) | ([], [p]) => Some(p),
        _ => None,
    }
}

/// A task that waits for resources, as JSON and text: state `TASK_PENDING` and why it waits.
fn pending_description(p: &PendingTaskView) -> (Value, String) {
    let fields = vec![
        ("Task", p.task_id.as_ref().map(ToString::to_string).unwrap_or_default()),
        ("State", agora_sdk::json::PENDING_STATE.to_string()),
        ("Waiting", p.reason.strip_prefix("waiting: ").unwrap_or(&p.reason).to_string()),
        ("Resources", p.resources.to_string()),
        ("Framework", format!("{} ({}, role {})", p.framework_id, p.framework_name, p.role)),
    ];
    (agora_sdk::json::pending_task_json(p), fields_text(&fields))
}

/// What a task used, in words (`-` when nothing is known).
fn usage(t: &TaskView) -> String {
    let Some(u) = &t.usage else { return "-".into() };
    let mut parts = Vec::new();
    if let Some(d) = u.cpu_time {
        parts.push(format!("cpu {:.2}s", d.as_secs_f64()));
    }
    if let Some(d) = u.throttled {
        parts.push(format!("throttled {:.2}s", d.as_secs_f64()));
    }
    if let Some(m) = u.peak_mem {
        parts.push(format!("peak mem {}", format_size(m)));
    }
    if let Some(m) = u.mem_current {
        parts.push(format!("mem {}", format_size(m)));
    }
    if let Some(f) = u.fuel {
        parts.push(format!("fuel {f}"));
    }
    or_dash(parts.join(", "))
}

/// Fields, then the tasks' table (or a line saying there are none).
fn with_tasks(fields: Vec<(&str, String)>, tasks: &[TaskView]) -> String {
    let mut out = fields_text(&fields);
    if tasks.is_empty() {
        out.push_str("\nTasks: none\n");
    } else {
        out.push_str("\nTasks:\n");
        out.push_str(&indent(&output::tasks_table(tasks)));
    }
    out
}

/// `Name:  value` lines, values aligned.
fn fields_text(fields: &[(&str, String)]) -> String {
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    fields.iter().map(|(k, v)| format!("{:width$}  {v}\n", format!("{k}:"))).collect()
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

fn or_dash(s: String) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn fields_align() {
        let text = super::fields_text(&[("Task", "t1".into()), ("Resources", "cpus:1".into())]);
        assert_eq!(text, "Task:       t1\nResources:  cpus:1\n");
    }
}
