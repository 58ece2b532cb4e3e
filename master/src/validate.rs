//! Validation of everything a peer sends, on receipt, before the core acts on it.
//!
//! Frameworks are not trusted (see ARCHITECTURE.md, "Trust"): every size, count, duration and
//! name they control is checked or bounded here, in one place, so that the core's handlers
//! can rely on their input. Agents are trusted more but their messages are checked the same
//! way (a bug or a stale agent must not corrupt the master's books).
//!
//! What happens to bad input:
//! - a call that is wrong as a whole (too many entries, a malformed id, a bad demand) is
//!   refused with a [`WireError`] of code `Invalid` sent on the peer's stream; the connection
//!   stays open and no other peer is affected;
//! - a task that is wrong (zero-sized, bad resources, a timeout out of bounds) ends
//!   `TASK_ERROR` with reason `invalid launch` and a message naming the task, as in Mesos;
//! - durations a framework chooses are clamped to the master's bounds (`kill_grace` to
//!   `--max-kill-grace`, `failover_timeout` to [`MAX_FAILOVER_TIMEOUT`]); filter lengths are
//!   clamped by [`crate::core::refuse_duration`].
//!
//! The frame size ([`agora_sdk::frame::MAX_FRAME`], 1 MiB) bounds every message; the limits
//! below bound what one message may make the master do.

use std::time::Duration;

use agora_sdk::proto::{
    AgentMessage, CommandInfo, Demand, ErrorCode, FrameworkInfo, SchedulerCall, TaskId, TaskInfo, TaskKind,
    TaskStatus, WireError,
};
use agora_sdk::resources::{valid_role, ResourceError};
use agora_sdk::Resources;

/// Longest id (framework, task, executor, agent, offer), in bytes once escaped as an agent's
/// path component (a byte outside `[A-Za-z0-9_.-]` counts three).
pub const MAX_ID_LEN: usize = 255;
/// Longest free-text name (task, framework, executor name; hostname).
pub const MAX_NAME_LEN: usize = 1024;
/// Most tasks one `Accept` may launch.
pub const MAX_TASKS_PER_ACCEPT: usize = 10_000;
/// Most operations in one `Accept`.
pub const MAX_OPERATIONS: usize = 1024;
/// Most offer ids in one `Accept` or `Decline` (the SDK's constant: its driver splits longer
/// declines by it).
pub const MAX_OFFER_IDS: usize = agora_sdk::proto::MAX_OFFER_IDS;
/// Most tasks one explicit reconciliation may name (each is answered with an update).
pub const MAX_RECONCILE_TASKS: usize = 100_000;
/// Most arguments of a command or Wasm task.
pub const MAX_ARGS: usize = 4096;
/// Most environment variables of a command or Wasm task.
pub const MAX_ENV: usize = 4096;
/// Most directories shipped with one Wasm task.
pub const MAX_DIRS: usize = 64;
/// Most attributes an agent may declare.
pub const MAX_ATTRIBUTES: usize = 256;
/// Most entries of one `Request` (distinct task shapes).
pub const MAX_DEMAND_ENTRIES: usize = 1024;
/// Most tasks one `Request` may ask for in all (it replaces the previous demand, so this is
/// also the framework's total pending demand).
pub const MAX_DEMAND_TASKS: u64 = 100_000;
/// Longest failover timeout a framework may ask for (longer is cut to this).
pub const MAX_FAILOVER_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);
/// Longest wall-time limit of a Wasm task (longer is refused: the executor adds margins to it).
pub const MAX_WASM_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);
/// Default of `agora master --max-kill-grace`: the longest grace between SIGTERM and SIGKILL a
/// task may ask for (longer is cut to it). Agents also apply their own absolute ceiling,
/// `agora_agent::MAX_KILL_GRACE`.
pub const DEFAULT_MAX_KILL_GRACE: Duration = Duration::from_secs(60);

fn invalid(message: impl ToString) -> WireError {
    WireError::new(ErrorCode::Invalid, message.to_string())
}

/// The length of `id` as an agent's path component (see `agora_agent::sandbox::path_component`).
fn escaped_len(id: &str) -> usize {
    id.bytes()
        .enumerate()
        .map(
            |(i, b)| {
                if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && i > 0) {
                    1
                } else {
                    3
                }
            },
        )
        .sum()
}

/// Why an id, a name, a role or a count a peer sent is refused. The text is what the peer
/// reads in its `Invalid` error (or in a task's `TASK_ERROR`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// An id is empty.
    #[error("a {kind} id is empty")]
    EmptyId {
        /// What the id names (`task`, `agent`, ...).
        kind: &'static str,
    },
    /// An id is over [`MAX_ID_LEN`] escaped bytes.
    #[error("{kind} id `{prefix}…` is too long (at most {MAX_ID_LEN} bytes)")]
    IdTooLong {
        /// What the id names.
        kind: &'static str,
        /// Its first characters.
        prefix: String,
    },
    /// An id has a control character or a path separator, or is `.`/`..`.
    #[error("{kind} id {prefix:?} has a control character or a path separator, or is `.`/`..`")]
    IdNotAPathComponent {
        /// What the id names.
        kind: &'static str,
        /// Its first characters.
        prefix: String,
    },
    /// A name is over [`MAX_NAME_LEN`] bytes.
    #[error("{kind} `{prefix}…` is too long (at most {MAX_NAME_LEN} bytes)")]
    NameTooLong {
        /// What the name is (`task name`, `hostname`, ...).
        kind: &'static str,
        /// Its first characters.
        prefix: String,
    },
    /// A name has a control character.
    #[error("{kind} {prefix:?} has a control character")]
    NameControl {
        /// What the name is.
        kind: &'static str,
        /// Its first characters.
        prefix: String,
    },
    /// A list is longer than its limit.
    #[error("{n} {what} (at most {max})")]
    TooMany {
        /// What the list holds.
        what: &'static str,
        /// How many it holds.
        n: usize,
        /// The limit.
        max: usize,
    },
    /// A framework's role is not a valid role name.
    #[error("role {prefix:?} is not valid: letters, digits, `_`, `-`, `.` or `/` (at most 64)")]
    Role {
        /// The role's first characters.
        prefix: String,
    },
}

/// Why one task of an `Accept` is refused: the message of its `TASK_ERROR`.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TaskError {
    /// The task id is empty.
    #[error("a task has an empty task id")]
    EmptyId,
    /// The task id is not a valid id.
    #[error(transparent)]
    Id(InputError),
    /// A name or a count of the task is refused.
    #[error("task {task}: {error}")]
    Input {
        /// The task.
        task: TaskId,
        /// What is wrong.
        #[source]
        error: InputError,
    },
    /// The task's resources are malformed.
    #[error("task {task}: {error}")]
    Resources {
        /// The task.
        task: TaskId,
        /// What is wrong.
        #[source]
        error: ResourceError,
    },
    /// The task's executor's resources are malformed.
    #[error("task {task}: executor: {error}")]
    ExecutorResources {
        /// The task.
        task: TaskId,
        /// What is wrong.
        #[source]
        error: ResourceError,
    },
    /// A count of the task's executor's command is over its limit.
    #[error("task {task}: executor: {error}")]
    ExecutorInput {
        /// The task.
        task: TaskId,
        /// What is wrong.
        #[source]
        error: InputError,
    },
    /// The task asks for neither cpus nor mem.
    #[error("task {task} asks for no cpus and no mem")]
    Empty {
        /// The task.
        task: TaskId,
    },
    /// The task lacks cpus or mem where the agent offers them.
    #[error("task {task} asks for {asked}: a task needs cpus > 0 and mem > 0 (it runs under both limits)")]
    Unlimited {
        /// The task.
        task: TaskId,
        /// What it asks for (`nothing` when empty).
        asked: String,
    },
    /// A Wasm task's timeout is zero.
    #[error("task {task}: a Wasm timeout must be positive")]
    ZeroTimeout {
        /// The task.
        task: TaskId,
    },
    /// A Wasm task's timeout is over [`MAX_WASM_TIMEOUT`].
    #[error("task {task}: a Wasm timeout of {secs}s is over the limit of {}s", MAX_WASM_TIMEOUT.as_secs())]
    TimeoutTooLong {
        /// The task.
        task: TaskId,
        /// The timeout asked for, in whole seconds.
        secs: u64,
    },
}

/// Why a `Request`'s demand is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DemandError {
    /// An entry's resources are malformed.
    #[error("demand entry {entry}: {error}")]
    Resources {
        /// The entry's index.
        entry: usize,
        /// What is wrong.
        #[source]
        error: ResourceError,
    },
    /// An entry is empty or names reserved resources.
    #[error("demand entry {entry} ({shape}) must be a non-empty shape of plain quantities")]
    NotPlain {
        /// The entry's index.
        entry: usize,
        /// The shape asked for.
        shape: Resources,
    },
}

/// Checks an id a peer chose or echoes: non-empty, at most [`MAX_ID_LEN`] escaped bytes, no
/// control characters, no path separator, not `.` or `..`.
pub fn id(kind: &'static str, id: &str) -> Result<(), InputError> {
    if id.is_empty() {
        return Err(InputError::EmptyId { kind });
    }
    if escaped_len(id) > MAX_ID_LEN {
        return Err(InputError::IdTooLong { kind, prefix: prefix(id) });
    }
    if id.chars().any(|c| c.is_control() || c == '/' || c == '\\') || id == "." || id == ".." {
        return Err(InputError::IdNotAPathComponent { kind, prefix: prefix(id) });
    }
    Ok(())
}

/// Checks a free-text name: at most [`MAX_NAME_LEN`] bytes, no control characters (names are
/// printed on operators' terminals).
pub fn name(kind: &'static str, name: &str) -> Result<(), InputError> {
    if name.len() > MAX_NAME_LEN {
        return Err(InputError::NameTooLong { kind, prefix: prefix(name) });
    }
    if name.chars().any(char::is_control) {
        return Err(InputError::NameControl { kind, prefix: prefix(name) });
    }
    Ok(())
}

/// The first characters of `s`, for messages.
fn prefix(s: &str) -> String {
    s.chars().take(40).collect()
}

fn too_many(what: &'static str, n: usize, max: usize) -> Result<(), InputError> {
    if n > max {
        return Err(InputError::TooMany { what, n, max });
    }
    Ok(())
}

/// How much one `Request` may ask for: entries and tasks in all (shapes are checked against
/// the master's minimum by the core, which knows the flag).
fn demand_size(demands: &[Demand]) -> Result<(), WireError> {
    too_many("demand entries", demands.len(), MAX_DEMAND_ENTRIES).map_err(invalid)?;
    let total: u64 = demands.iter().map(|d| u64::from(d.count)).sum();
    if total > MAX_DEMAND_TASKS {
        return Err(invalid(format!("a Request asks for {total} tasks (at most {MAX_DEMAND_TASKS} in all)")));
    }
    Ok(())
}

/// Checks and normalises a scheduler call before the core sees it (see the module doc).
/// Per-task problems of an `Accept` are left to [`task`], which the core runs for each task so
/// that each one ends with its own `TASK_ERROR`.
pub fn scheduler_call(call: &mut SchedulerCall) -> Result<(), WireError> {
    match call {
        SchedulerCall::Subscribe(info) => framework_info(info).map_err(invalid),
        SchedulerCall::Accept { offer_ids, operations, .. } => {
            too_many("offer ids", offer_ids.len(), MAX_OFFER_IDS).map_err(invalid)?;
            too_many("operations", operations.len(), MAX_OPERATIONS).map_err(invalid)?;
            let tasks: usize = operations
                .iter()
                .map(|op| match op {
                    agora_sdk::proto::Operation::Launch { tasks } => tasks.len(),
                })
                .sum();
            too_many("tasks in one Accept", tasks, MAX_TASKS_PER_ACCEPT).map_err(invalid)?;
            offer_ids.iter().try_for_each(|o| id("offer", o.as_str())).map_err(invalid)
        }
        SchedulerCall::Decline { offer_ids, .. } => {
            too_many("offer ids", offer_ids.len(), MAX_OFFER_IDS).map_err(invalid)?;
            offer_ids.iter().try_for_each(|o| id("offer", o.as_str())).map_err(invalid)
        }
        // Shapes are checked against the master's minimum by the core (it knows the flag).
        SchedulerCall::Request { demands } => demand_size(demands),
        SchedulerCall::RequestTasks { demands, task_ids } => {
            demand_size(demands)?;
            too_many("task id lists", task_ids.len(), demands.len()).map_err(invalid)?;
            let named: usize = task_ids.iter().map(Vec::len).sum();
            too_many("named pending tasks", named, agora_sdk::proto::MAX_PENDING_IDS).map_err(invalid)?;
            task_ids.iter().flatten().try_for_each(|t| id("task", t.as_str())).map_err(invalid)
        }
        SchedulerCall::Kill { task_id } => id("task", task_id.as_str()).map_err(invalid),
        SchedulerCall::Acknowledge { agent_id, task_id, .. } => {
            id("agent", agent_id.as_str()).and_then(|()| id("task", task_id.as_str())).map_err(invalid)
        }
        SchedulerCall::Reconcile { task_ids } => {
            too_many("tasks to reconcile", task_ids.len(), MAX_RECONCILE_TASKS).map_err(invalid)?;
            task_ids.iter().try_for_each(|t| id("task", t.as_str())).map_err(invalid)
        }
        SchedulerCall::ReconcileTasks { tasks } => {
            too_many("tasks to reconcile", tasks.len(), MAX_RECONCILE_TASKS).map_err(invalid)?;
            tasks
                .iter()
                .try_for_each(|t| {
                    id("task", t.task_id.as_str())?;
                    t.agent_id.as_ref().map_or(Ok(()), |a| id("agent", a.as_str()))
                })
                .map_err(invalid)
        }
        SchedulerCall::Message { agent_id, executor_id, .. }
        | SchedulerCall::ShutdownExecutor { agent_id, executor_id } => id("agent", agent_id.as_str())
            .and_then(|()| id("executor", executor_id.as_str()))
            .map_err(invalid),
        SchedulerCall::TeardownBecause { reason } => {
            name("teardown reason", reason.as_str()).map_err(invalid)
        }
        SchedulerCall::Revive
        | SchedulerCall::Suppress
        | SchedulerCall::Teardown
        | SchedulerCall::Heartbeat => Ok(()),
    }
}

/// Checks a subscription: names, role, and the failover timeout (cut to
/// [`MAX_FAILOVER_TIMEOUT`]).
pub fn framework_info(info: &mut FrameworkInfo) -> Result<(), InputError> {
    if let Some(f) = &info.id {
        id("framework", f.as_str())?;
    }
    name("framework name", &info.name)?;
    name("hostname", &info.hostname)?;
    if !info.role.is_empty() && info.role != "*" && !valid_role(&info.role) {
        return Err(InputError::Role { prefix: prefix(&info.role) });
    }
    info.failover_timeout = info.failover_timeout.min(MAX_FAILOVER_TIMEOUT);
    Ok(())
}

/// Checks one task of an `Accept` and normalises it: its id, name, resources (normalised; a
/// task needs `cpus` > 0 and `mem` > 0 wherever the agent offers that kind, so it always
/// runs under both limits), its command or module, and its durations (`kill_grace` cut to
/// `max_kill_grace`; a Wasm timeout of zero or over [`MAX_WASM_TIMEOUT`] refused). `offered`
/// is the agent's total resources. The error is the message of the task's `TASK_ERROR`.
pub fn task(task: &mut TaskInfo, offered: &Resources, max_kill_grace: Duration) -> Result<(), TaskError> {
    if task.task_id.as_str().is_empty() {
        return Err(TaskError::EmptyId);
    }
    id("task", task.task_id.as_str()).map_err(TaskError::Id)?;
    let tid = task.task_id.clone();
    let input = |error| TaskError::Input { task: tid.clone(), error };
    name("task name", &task.name).map_err(input)?;
    task.resources.normalize_wire().map_err(|error| TaskError::Resources { task: tid.clone(), error })?;
    let r = &task.resources;
    if r.cpus == 0 && r.mem == 0 {
        return Err(TaskError::Empty { task: tid });
    }
    if (r.cpus == 0 && offered.cpus > 0) || (r.mem == 0 && offered.mem > 0) {
        let asked = if r.is_empty() { "nothing".to_string() } else { r.to_string() };
        return Err(TaskError::Unlimited { task: tid, asked });
    }
    if let Some(g) = task.kill_grace {
        task.kill_grace = Some(g.min(max_kill_grace));
    }
    match &task.kind {
        TaskKind::Command(c) => command(c).map_err(input),
        // The executor id is checked by the core (`executor_id_problem`: a stricter charset).
        TaskKind::Executor(e) => {
            name("executor name", &e.executor.name).map_err(input)?;
            e.executor
                .resources
                .clone()
                .normalize_wire()
                .map_err(|error| TaskError::ExecutorResources { task: tid.clone(), error })?;
            command(&e.executor.command)
                .map_err(|error| TaskError::ExecutorInput { task: tid.clone(), error })
        }
        TaskKind::Wasm(w) => {
            too_many("arguments", w.args.len(), MAX_ARGS).map_err(input)?;
            too_many("environment variables", w.env.len(), MAX_ENV).map_err(input)?;
            too_many("directories", w.dirs.len(), MAX_DIRS).map_err(input)?;
            match w.timeout {
                Some(t) if t.is_zero() => Err(TaskError::ZeroTimeout { task: tid }),
                Some(t) if t > MAX_WASM_TIMEOUT => {
                    Err(TaskError::TimeoutTooLong { task: tid, secs: t.as_secs() })
                }
                _ => Ok(()),
            }
        }
    }
}

fn command(c: &CommandInfo) -> Result<(), InputError> {
    too_many("arguments", c.argv.len(), MAX_ARGS)?;
    too_many("environment variables", c.env.len(), MAX_ENV)
}

/// Checks a `Request`'s shapes against the master's minimum allocatable resources (`min`,
/// alternatives as in `--min-allocatable`): a shape that is not a non-empty set of plain
/// quantities is refused; one smaller than every alternative is **rounded up** to the first
/// one (kind by kind), so that every slice given for it is worth offering. Zero counts are
/// dropped. (Resources are fixed-point: no NaN, infinite or negative quantity can arrive.)
pub fn demands(demands: &mut Vec<Demand>, min: &[Resources]) -> Result<(), DemandError> {
    demands.retain(|d| d.count > 0);
    for (i, d) in demands.iter_mut().enumerate() {
        d.resources.normalize_wire().map_err(|error| DemandError::Resources { entry: i, error })?;
        if !d.resources.reserved.is_empty() || d.resources.is_empty() {
            return Err(DemandError::NotPlain { entry: i, shape: d.resources.clone() });
        }
        if let Some(first) = min.first() {
            if !min.iter().any(|m| d.resources.contains(m)) {
                let r = &mut d.resources;
                r.cpus = r.cpus.max(first.cpus);
                r.mem = r.mem.max(first.mem);
                r.disk = r.disk.max(first.disk);
                for (k, v) in &first.scalars {
                    let e = r.scalars.entry(k.clone()).or_insert(0);
                    *e = (*e).max(*v);
                }
            }
        }
    }
    Ok(())
}

/// Checks and normalises an agent's message: ids and names, its resources (normalised;
/// backwards port ranges refused), attribute count, the tasks it reports; a status update's
/// (or latest state's) reason and message are cut to the executor protocol's bounds.
pub fn agent_message(msg: &mut AgentMessage) -> Result<(), WireError> {
    match msg {
        AgentMessage::Register { agent_id, hostname, resources, attributes, tasks } => {
            if let Some(a) = agent_id {
                id("agent", a.as_str()).map_err(invalid)?;
            }
            name("hostname", hostname).map_err(invalid)?;
            resources.normalize_wire().map_err(|e| invalid(format!("agent resources: {e}")))?;
            too_many("attributes", attributes.0.len(), MAX_ATTRIBUTES).map_err(invalid)?;
            reports(tasks)
        }
        AgentMessage::TaskReports(tasks) => reports(tasks),
        AgentMessage::StatusUpdate(status) | AgentMessage::LatestState(status) => {
            status_update(status);
            Ok(())
        }
        AgentMessage::FrameworkMessage { framework_id, executor_id, .. }
        | AgentMessage::ExecutorExited { framework_id, executor_id, .. } => {
            id("framework", framework_id.as_str())
                .and_then(|()| id("executor", executor_id.as_str()))
                .map_err(invalid)
        }
        AgentMessage::Heartbeat => Ok(()),
    }
}

fn reports(tasks: &mut [agora_sdk::proto::TaskReport]) -> Result<(), WireError> {
    for t in tasks {
        t.task
            .resources
            .normalize_wire()
            .map_err(|e| invalid(format!("reported task {}: {e}", t.task.task_id)))?;
    }
    Ok(())
}

/// Cuts an agent's free text to the bounds executors already keep to (its reason is cut to
/// [`agora_sdk::executor_proto::MAX_REASON_LEN`] as it is read: see [`agora_sdk::Reason`]).
fn status_update(status: &mut TaskStatus) {
    use agora_sdk::executor_proto::MAX_MESSAGE_LEN;
    truncate(&mut status.message, MAX_MESSAGE_LEN);
}

fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agora_sdk::proto::*;
    use agora_sdk::resources::PortRange;

    fn res(s: &str) -> Resources {
        Resources::parse(s).unwrap()
    }

    fn cmd_task(id: &str, r: &str) -> TaskInfo {
        TaskInfo {
            user: None,
            task_id: TaskId::new(id),
            name: id.into(),
            resources: res(r),
            kind: TaskKind::Command(CommandInfo { argv: vec!["true".into()], shell: false, env: vec![] }),
            kill_grace: None,
        }
    }

    /// The typed errors say exactly what the string errors before them said: frameworks and
    /// operators match on these texts.
    #[test]
    fn error_texts_are_unchanged() {
        let agent = res("cpus:4;mem:4GiB");
        let text = |r: Result<(), TaskError>| r.unwrap_err().to_string();
        assert_eq!(id("task", "").unwrap_err().to_string(), "a task id is empty");
        assert_eq!(
            id("agent", "a/b").unwrap_err().to_string(),
            "agent id \"a/b\" has a control character or a path separator, or is `.`/`..`"
        );
        assert_eq!(
            name("task name", "x\u{7}").unwrap_err().to_string(),
            "task name \"x\\u{7}\" has a control character"
        );
        assert_eq!(too_many("offer ids", 5, 4).unwrap_err().to_string(), "5 offer ids (at most 4)");
        assert_eq!(
            text(task(&mut cmd_task("t1", "cpus:1"), &agent, DEFAULT_MAX_KILL_GRACE)),
            format!(
                "task t1 asks for {}: a task needs cpus > 0 and mem > 0 (it runs under both limits)",
                res("cpus:1")
            )
        );
        let mut long = cmd_task("t2", "cpus:1;mem:1GiB");
        long.name = "n".repeat(MAX_NAME_LEN + 1);
        assert_eq!(
            text(task(&mut long, &agent, DEFAULT_MAX_KILL_GRACE)),
            format!("task t2: task name `{}…` is too long (at most {MAX_NAME_LEN} bytes)", "n".repeat(40))
        );
        let mut empty = vec![Demand { resources: Resources::default(), count: 1 }];
        assert_eq!(
            demands(&mut empty, &[]).unwrap_err().to_string(),
            format!(
                "demand entry 0 ({}) must be a non-empty shape of plain quantities",
                Resources::default()
            )
        );
    }

    #[test]
    fn ids_are_bounded_and_cannot_be_paths() {
        assert!(id("task", "web-1.a_b").is_ok());
        for bad in ["", ".", "..", "a/b", "a\\b", "a\nb", "x\u{1b}[2J", &"a".repeat(256), &"%".repeat(86)] {
            assert!(id("task", bad).is_err(), "{bad:?}");
        }
        assert!(name("task name", "a name with spaces").is_ok());
        assert!(name("task name", "bell\u{7}").is_err());
        assert!(name("task name", &"n".repeat(MAX_NAME_LEN + 1)).is_err());
    }

    #[test]
    fn zero_sized_tasks_are_refused_naming_the_task() {
        let agent = res("cpus:4;mem:4GiB");
        let e = task(&mut cmd_task("t1", "cpus:1"), &agent, DEFAULT_MAX_KILL_GRACE).unwrap_err().to_string();
        assert!(e.contains("task t1") && e.contains("mem > 0"), "{e}");
        let e =
            task(&mut cmd_task("t2", "mem:1GiB"), &agent, DEFAULT_MAX_KILL_GRACE).unwrap_err().to_string();
        assert!(e.contains("task t2") && e.contains("cpus > 0"), "{e}");
        assert!(task(&mut cmd_task("t3", "cpus:1;mem:1GiB"), &agent, DEFAULT_MAX_KILL_GRACE).is_ok());
        // An agent without memory to offer cannot give a memory limit either.
        assert!(task(&mut cmd_task("t4", "cpus:1"), &res("cpus:4"), DEFAULT_MAX_KILL_GRACE).is_ok());
    }

    #[test]
    fn task_resources_are_normalised_and_backwards_ports_refused() {
        let agent = res("cpus:4;mem:4GiB;ports:[1-65535]");
        let mut t = cmd_task("p", "cpus:1;mem:1GiB");
        t.resources.ports = vec![PortRange { begin: 31500, end: 0 }];
        let e = task(&mut t, &agent, DEFAULT_MAX_KILL_GRACE).unwrap_err().to_string();
        assert!(e.contains("task p") && e.contains("31500-0 is backwards"), "{e}");
        t.resources.ports = vec![PortRange { begin: 20, end: 30 }, PortRange { begin: 10, end: 19 }];
        task(&mut t, &agent, DEFAULT_MAX_KILL_GRACE).unwrap();
        assert_eq!(t.resources.ports, vec![PortRange { begin: 10, end: 30 }]);
    }

    #[test]
    fn durations_are_clamped_or_refused() {
        let agent = res("cpus:4;mem:4GiB");
        let mut t = cmd_task("g", "cpus:1;mem:1GiB");
        t.kill_grace = Some(Duration::from_secs(3_000_000_000));
        task(&mut t, &agent, Duration::from_secs(60)).unwrap();
        assert_eq!(t.kill_grace, Some(Duration::from_secs(60)));
        let wasm = |timeout| TaskInfo {
            kind: TaskKind::Wasm(Box::new(WasmInfo {
                module: ArtifactRef { digest: Digest::of(b"m"), size: 1 },
                args: vec!["m".into()],
                env: vec![],
                dirs: vec![],
                fuel: None,
                timeout,
            })),
            ..cmd_task("w", "cpus:1;mem:1GiB")
        };
        assert!(task(&mut wasm(Some(Duration::MAX)), &agent, DEFAULT_MAX_KILL_GRACE)
            .unwrap_err()
            .to_string()
            .contains("over the limit"));
        assert!(task(&mut wasm(Some(Duration::ZERO)), &agent, DEFAULT_MAX_KILL_GRACE).is_err());
        assert!(task(&mut wasm(Some(Duration::from_secs(5))), &agent, DEFAULT_MAX_KILL_GRACE).is_ok());
        let mut info = FrameworkInfo {
            user: None,
            id: None,
            name: "f".into(),
            role: "*".into(),
            failover_timeout: Duration::MAX,
            hostname: "h".into(),
        };
        framework_info(&mut info).unwrap();
        assert_eq!(info.failover_timeout, MAX_FAILOVER_TIMEOUT);
        info.role = "bad role".into();
        assert!(framework_info(&mut info).is_err());
        // Filters: NaN and negative mean none, anything huge is a year at most.
        let year = Duration::from_secs(365 * 24 * 3600);
        assert_eq!(crate::core::refuse_duration(Some(f64::NAN), year), Duration::ZERO);
        assert_eq!(crate::core::refuse_duration(Some(-1.0), year), Duration::ZERO);
        assert_eq!(crate::core::refuse_duration(Some(f64::INFINITY), year), year);
        assert_eq!(crate::core::refuse_duration(Some(1e300), year), year);
    }

    #[test]
    fn demands_are_bounded_and_rounded_up_to_the_minimum() {
        let mut hostile =
            SchedulerCall::Request { demands: vec![Demand { resources: res("mem:1B"), count: u32::MAX }] };
        let e = scheduler_call(&mut hostile).unwrap_err();
        assert_eq!(e.code, ErrorCode::Invalid);
        assert!(e.message.contains("at most 100000"), "{}", e.message);
        let mut many = SchedulerCall::Request {
            demands: vec![Demand { resources: res("cpus:1"), count: 1 }; MAX_DEMAND_ENTRIES + 1],
        };
        assert!(scheduler_call(&mut many).is_err());
        let min = vec![res("cpus:0.01"), res("mem:32MiB")];
        let mut d = vec![
            Demand { resources: res("mem:1B"), count: 10 },
            Demand { resources: res("cpus:1"), count: 0 },
            Demand { resources: res("mem:64MiB"), count: 1 },
        ];
        demands(&mut d, &min).unwrap();
        assert_eq!(d.len(), 2, "zero counts dropped");
        assert_eq!(d[0].resources, res("cpus:0.01;mem:1B"), "rounded up to the first alternative");
        assert_eq!(d[1].resources, res("mem:64MiB"), "already allocatable: kept");
        let mut backwards = vec![Demand {
            resources: Resources { ports: vec![PortRange { begin: 31500, end: 0 }], ..Default::default() },
            count: 1,
        }];
        assert!(demands(&mut backwards, &min).unwrap_err().to_string().contains("backwards"));
        let mut empty = vec![Demand { resources: Resources::default(), count: 1 }];
        assert!(demands(&mut empty, &min).is_err());
    }

    #[test]
    fn lists_in_calls_are_capped() {
        let launch = |n| SchedulerCall::Accept {
            offer_ids: vec![OfferId::new("o")],
            operations: vec![Operation::Launch { tasks: vec![cmd_task("t", "cpus:1;mem:1MiB"); n] }],
            refuse_seconds: None,
        };
        assert!(scheduler_call(&mut launch(MAX_TASKS_PER_ACCEPT)).is_ok());
        assert!(scheduler_call(&mut launch(MAX_TASKS_PER_ACCEPT + 1)).is_err());
        let mut rec = SchedulerCall::Reconcile { task_ids: vec![TaskId::new("t"); MAX_RECONCILE_TASKS + 1] };
        assert!(scheduler_call(&mut rec).is_err());
        let mut dec = SchedulerCall::Decline {
            offer_ids: vec![OfferId::new("o"); super::MAX_OFFER_IDS + 1],
            refuse_seconds: None,
        };
        assert!(scheduler_call(&mut dec).is_err());
        let mut kill = SchedulerCall::Kill { task_id: TaskId::new("../../etc") };
        assert!(scheduler_call(&mut kill).is_err());
    }

    #[test]
    fn agent_registrations_are_normalised() {
        let mut reg = AgentMessage::Register {
            agent_id: None,
            hostname: "h".into(),
            resources: Resources { ports: vec![PortRange { begin: 31500, end: 0 }], ..res("cpus:1") },
            attributes: Default::default(),
            tasks: vec![],
        };
        assert!(agent_message(&mut reg).unwrap_err().message.contains("backwards"));
        let mut up = AgentMessage::StatusUpdate(TaskStatus {
            task_id: TaskId::new("t"),
            framework_id: FrameworkId::new("f"),
            agent_id: None,
            state: TaskState::Failed,
            uuid: None,
            source: UpdateSource::Agent,
            reason: "é".repeat(1000).into(),
            message: String::new(),
            exit_code: None,
            signal: None,
            usage: None,
            timestamp_ms: 0,
        });
        agent_message(&mut up).unwrap();
        let AgentMessage::StatusUpdate(s) = up else { unreachable!() };
        assert!(s.reason.as_str().len() <= agora_sdk::executor_proto::MAX_REASON_LEN);
    }
}
