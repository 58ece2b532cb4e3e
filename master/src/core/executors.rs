//! Frameworks' own executors, as the master sees them: what makes a `TaskKind::Executor`
//! launch valid, and the executors the master launched with the resources they hold.
//!
//! As in Mesos, an executor's resources are separate from its tasks': the first task that
//! names an executor on an agent takes the executor's resources from the offer on top of its
//! own, and they stay allocated (to the framework, for DRF, and in the agent's used
//! resources) until the agent reports the executor exited, the agent is lost (unreachable)
//! or the framework is removed. The built-in executors (`agora-command`, `agora-wasm`) are
//! not tracked here: their cost is inside their tasks' resources.

use std::collections::{BTreeMap, HashSet};
use std::path::{Component, Path};
use std::time::Instant;

use ::metrics::counter;

use agora_sdk::proto::*;
use agora_sdk::Resources;
use rustc_hash::{FxHashMap, FxHashSet};
use tracing::{debug, info};

use super::{ConnId, Master};
use crate::metrics;
use crate::state::Framework;

/// Longest executor id, bytes.
pub const MAX_EXECUTOR_ID_LEN: usize = 128;
/// Longest executor name, bytes.
pub const MAX_EXECUTOR_NAME_LEN: usize = 256;
/// Longest fetch path, bytes.
pub const MAX_FETCH_PATH_LEN: usize = 255;
/// Executor ids starting with this are the built-in executors'.
pub const RESERVED_PREFIX: &str = "agora-";

/// An executor the master launched (the first task naming it on its agent was sent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ExecutorRecord {
    pub info: ExecutorInfo,
    /// What it holds of the agent (taken from the offer, labelled like a task's allocation).
    pub allocation: Resources,
}

/// Which executor process a record stands for on an agent: the framework, the executor id
/// and the OS user its tasks run as (`None`: the agent's `--task-user`). The agent starts one
/// process per framework, executor id and user, so a second user's tasks under the same
/// executor id start a second process: it takes the executor's resources from the offer
/// again.
pub(crate) type ExecutorKey = (FrameworkId, ExecutorId, Option<String>);

/// The executors the master launched, by agent, then by framework, executor id and user.
///
/// The agent reports an executor's end once the last user's process of it ended, so the
/// master frees every user's record of that executor then. Until then a user's record whose
/// process ended early keeps its resources held (more is held than used, never less); that
/// user's next task of the executor starts a new process under the same record.
#[derive(Debug, Default)]
pub(crate) struct Executors {
    by_agent: FxHashMap<AgentId, BTreeMap<ExecutorKey, ExecutorRecord>>,
}

impl Executors {
    /// The record of one user's process of an executor.
    pub(crate) fn get(
        &self,
        agent: &AgentId,
        fw: &FrameworkId,
        id: &ExecutorId,
        user: Option<&str>,
    ) -> Option<&ExecutorRecord> {
        self.by_agent.get(agent)?.get(&(fw.clone(), id.clone(), user.map(str::to_owned)))
    }

    /// The records of an executor on `agent`, whatever their user.
    pub(crate) fn users_of<'a>(
        &'a self,
        agent: &AgentId,
        fw: &'a FrameworkId,
        id: &'a ExecutorId,
    ) -> impl Iterator<Item = &'a ExecutorRecord> + 'a {
        let first = (fw.clone(), id.clone(), None);
        self.by_agent
            .get(agent)
            .into_iter()
            .flat_map(move |m| m.range(first.clone()..))
            .take_while(move |((f, i, _), _)| f == fw && i == id)
            .map(|(_, r)| r)
    }

    /// Every executor record, of every agent.
    pub(crate) fn all(&self) -> impl Iterator<Item = &ExecutorRecord> + '_ {
        self.by_agent.values().flat_map(|m| m.values())
    }

    pub(crate) fn insert(
        &mut self,
        agent: &AgentId,
        fw: &FrameworkId,
        user: Option<String>,
        record: ExecutorRecord,
    ) {
        let id = record.info.executor_id.clone();
        self.by_agent.entry(agent.clone()).or_default().insert((fw.clone(), id, user), record);
    }

    /// Forgets one record.
    pub(crate) fn remove(&mut self, agent: &AgentId, key: &ExecutorKey) -> Option<ExecutorRecord> {
        let on_agent = self.by_agent.get_mut(agent)?;
        let record = on_agent.remove(key);
        if on_agent.is_empty() {
            self.by_agent.remove(agent);
        }
        record
    }

    /// Forgets every user's record of an executor on `agent`.
    pub(crate) fn remove_all_users(
        &mut self,
        agent: &AgentId,
        fw: &FrameworkId,
        id: &ExecutorId,
    ) -> Vec<ExecutorRecord> {
        let Some(on_agent) = self.by_agent.get_mut(agent) else { return Vec::new() };
        let keys: Vec<ExecutorKey> = on_agent
            .range((fw.clone(), id.clone(), None)..)
            .take_while(|((f, i, _), _)| f == fw && i == id)
            .map(|(k, _)| k.clone())
            .collect();
        let out = keys.iter().filter_map(|k| on_agent.remove(k)).collect();
        if on_agent.is_empty() {
            self.by_agent.remove(agent);
        }
        out
    }

    /// Every executor record on `agent`, with its key.
    pub(crate) fn on_agent<'a>(
        &'a self,
        agent: &AgentId,
    ) -> impl Iterator<Item = (&'a ExecutorKey, &'a ExecutorRecord)> + 'a {
        self.by_agent.get(agent).into_iter().flat_map(|m| m.iter())
    }

    /// Forgets every executor on `agent`; returns them with their framework.
    pub(crate) fn remove_agent(&mut self, agent: &AgentId) -> Vec<(FrameworkId, ExecutorRecord)> {
        self.by_agent
            .remove(agent)
            .map(|m| m.into_iter().map(|((fw, _, _), r)| (fw, r)).collect())
            .unwrap_or_default()
    }

    /// Forgets every executor of `fw`; returns them with their agent, by agent id.
    pub(crate) fn remove_framework(&mut self, fw: &FrameworkId) -> Vec<(AgentId, ExecutorRecord)> {
        let mut out = Vec::new();
        for (agent, m) in &mut self.by_agent {
            let keys: Vec<ExecutorKey> = m.keys().filter(|(f, _, _)| f == fw).cloned().collect();
            for key in keys {
                if let Some(r) = m.remove(&key) {
                    out.push((agent.clone(), r));
                }
            }
        }
        self.by_agent.retain(|_, m| !m.is_empty());
        out.sort_by(|a, b| (&a.0, &a.1.info.executor_id).cmp(&(&b.0, &b.1.info.executor_id)));
        out
    }

    /// What the executors of `fw` hold, all agents together.
    pub(crate) fn framework_used(&self, fw: &FrameworkId) -> Resources {
        let mut used = Resources::default();
        for m in self.by_agent.values() {
            for ((f, _, _), r) in m {
                if f == fw {
                    used.add_assign(&r.allocation);
                }
            }
        }
        used
    }

    /// How many executors are tracked, all agents together.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_agent.values().map(BTreeMap::len).sum()
    }
}

/// Executor handling of the core: launches are in `accept`, the rest is here.
impl Master {
    /// Brings the executors known on a (re-)registered agent in line with its reported tasks
    /// (the agent is detached from the allocator): an executor runs there if a live task of
    /// it does. Executors with no live task are forgotten (the agent ends idle executors
    /// itself, and one that restarted has none); those of reported tasks the master did not
    /// know (an agent back from unreachable, a restarted master) are adopted with their
    /// resources.
    pub(super) fn sync_executors(&mut self, agent_id: &AgentId) {
        let Some(agent) = self.agents.get(agent_id) else { return };
        let mut backed: BTreeMap<ExecutorKey, ExecutorInfo> = BTreeMap::new();
        for t in self.live_tasks(agent.tasks.iter()) {
            if let TaskKind::Executor(e) = &t.info.kind {
                backed
                    .entry((t.framework_id.clone(), e.executor.executor_id.clone(), t.info.user.clone()))
                    .or_insert_with(|| e.executor.clone());
            }
        }
        let stale: Vec<ExecutorKey> = self
            .executors
            .on_agent(agent_id)
            .map(|(k, _)| k.clone())
            .filter(|k| !backed.contains_key(k))
            .collect();
        for key in stale {
            let (fw, id, user) = &key;
            debug!(agent_id = %agent_id, framework_id = %fw, executor_id = %id, ?user, "executor without live tasks on re-registration: forgotten");
            self.executors.remove(agent_id, &key);
        }
        for ((fw, id, user), info) in backed {
            if self.executors.get(agent_id, &fw, &id, user.as_deref()).is_none() {
                debug!(agent_id = %agent_id, framework_id = %fw, executor_id = %id, ?user, "adopting reported executor");
                let allocation = info.resources.flatten();
                self.executors.insert(agent_id, &fw, user, ExecutorRecord { info, allocation });
            }
        }
    }

    /// Forgets every user's record of an executor and frees what they held; how many there
    /// were.
    pub(super) fn release_executor(
        &mut self,
        now: Instant,
        agent_id: &AgentId,
        fw: &FrameworkId,
        id: &ExecutorId,
    ) -> usize {
        let records = self.executors.remove_all_users(agent_id, fw, id);
        for record in &records {
            self.free_executor_resources(now, agent_id, fw, record);
        }
        records.len()
    }

    pub(super) fn free_executor_resources(
        &mut self,
        now: Instant,
        agent_id: &AgentId,
        fw: &FrameworkId,
        e: &ExecutorRecord,
    ) {
        debug!(agent_id = %agent_id, framework_id = %fw, executor_id = %e.info.executor_id, resources = %e.allocation, "executor resources freed");
        if let Some(agent) = self.agents.get_mut(agent_id) {
            agent.used = agent.used.saturating_sub(&e.allocation);
            if agent.attached {
                self.allocator.recover(fw, agent_id, &e.allocation);
            }
        }
        self.request_allocation(now);
    }

    /// The agent reports that one of a framework's own executors ended.
    pub(super) fn on_executor_exited(
        &mut self,
        now: Instant,
        agent_id: &AgentId,
        framework_id: FrameworkId,
        executor_id: ExecutorId,
        message: String,
    ) {
        let known = self.release_executor(now, agent_id, &framework_id, &executor_id);
        info!(agent_id = %agent_id, framework_id = %framework_id, executor_id = %executor_id, records = known, message, "executor exited");
        if executor_id.as_str().starts_with(RESERVED_PREFIX) {
            return;
        }
        if let Some(conn) = self.frameworks.get(&framework_id).and_then(Framework::conn) {
            self.send_framework(
                conn,
                SchedulerEvent::ExecutorExited { agent_id: agent_id.clone(), executor_id, message },
            );
        }
    }

    /// An executor's message for its scheduler: passed on at most once, dropped when it is
    /// too large or nobody is there to take it.
    pub(super) fn on_executor_message(
        &mut self,
        agent_id: &AgentId,
        framework_id: FrameworkId,
        executor_id: ExecutorId,
        data: Vec<u8>,
    ) {
        if data.len() > MAX_FRAMEWORK_MESSAGE {
            debug!(agent_id = %agent_id, framework_id = %framework_id, executor_id = %executor_id, size = data.len(),
                "framework message over {MAX_FRAMEWORK_MESSAGE} bytes dropped");
            return;
        }
        let Some(conn) = self.frameworks.get(&framework_id).and_then(Framework::conn) else {
            debug!(agent_id = %agent_id, framework_id = %framework_id, executor_id = %executor_id,
                "framework message for an unknown or disconnected framework dropped");
            return;
        };
        counter!(metrics::FRAMEWORK_MESSAGES, "direction" => "to_scheduler").increment(1);
        self.send_framework(conn, SchedulerEvent::Message { agent_id: agent_id.clone(), executor_id, data });
    }

    /// The connection of an active agent, or the error for a scheduler call that names
    /// another.
    pub(super) fn active_agent_conn(&self, agent_id: &AgentId) -> Result<ConnId, WireError> {
        match self.agents.get(agent_id) {
            None => Err(WireError::new(ErrorCode::NotFound, format!("no agent {agent_id}"))),
            Some(a) => a.conn().ok_or_else(|| {
                WireError::new(ErrorCode::NotFound, format!("agent {agent_id} is {}", a.status.view()))
            }),
        }
    }

    /// A scheduler's message for one of its executors (the framework is the caller's).
    pub(super) fn scheduler_message(
        &mut self,
        conn: ConnId,
        fw: &FrameworkId,
        agent_id: AgentId,
        executor_id: ExecutorId,
        data: Vec<u8>,
    ) {
        if data.len() > MAX_FRAMEWORK_MESSAGE {
            let message = format!(
                "framework message of {} bytes to executor {executor_id} is over the limit of \
                 {MAX_FRAMEWORK_MESSAGE} bytes",
                data.len()
            );
            debug!(framework_id = %fw, message, "framework message refused");
            self.send_framework(conn, SchedulerEvent::Error(WireError::new(ErrorCode::TooLarge, message)));
            return;
        }
        match self.active_agent_conn(&agent_id) {
            Err(e) => {
                debug!(framework_id = %fw, agent_id = %agent_id, error = %e, "framework message refused");
                self.send_framework(conn, SchedulerEvent::Error(e));
            }
            Ok(agent_conn) => {
                counter!(metrics::FRAMEWORK_MESSAGES, "direction" => "to_executor").increment(1);
                self.send_agent(
                    agent_conn,
                    MasterToAgent::FrameworkMessage { framework_id: fw.clone(), executor_id, data },
                );
            }
        }
    }

    /// A scheduler asks for one of its executors to be shut down (its resources are freed
    /// when the agent reports it exited).
    pub(super) fn shutdown_executor(
        &mut self,
        conn: ConnId,
        fw: &FrameworkId,
        agent_id: AgentId,
        executor_id: ExecutorId,
    ) {
        match self.active_agent_conn(&agent_id) {
            Err(e) => self.send_framework(conn, SchedulerEvent::Error(e)),
            Ok(agent_conn) => {
                info!(framework_id = %fw, agent_id = %agent_id, executor_id = %executor_id, "shutting down executor");
                self.send_agent(
                    agent_conn,
                    MasterToAgent::ShutdownExecutor { framework_id: fw.clone(), executor_id },
                );
            }
        }
    }
}

/// What is wrong with a resource request (a task's or an executor's), if anything; `who`
/// names it in the message (`task t1`, `task t1: executor e`).
pub(crate) fn resources_problem(who: &str, r: &Resources) -> Option<String> {
    if r.cpus == 0 && r.mem == 0 {
        Some(format!("{who} asks for no cpus and no mem"))
    } else if !r.reserved.is_empty() {
        Some(format!("{who} names reserved resources; ask for plain quantities"))
    } else {
        None
    }
}

/// What is wrong with an executor id, if anything.
pub(crate) fn executor_id_problem(id: &str) -> Option<String> {
    if id.is_empty() {
        Some("executor id is empty".to_string())
    } else if id.len() > MAX_EXECUTOR_ID_LEN {
        Some(format!("executor id is {} bytes, over the limit of {MAX_EXECUTOR_ID_LEN}", id.len()))
    } else if !id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        Some(format!("executor id {id:?} may contain only letters, digits, `.`, `_` and `-`"))
    } else if id == "." || id == ".." {
        Some(format!("executor id `{id}` is not a valid name"))
    } else if id.starts_with(RESERVED_PREFIX) {
        Some(format!(
            "executor id `{id}` is reserved (ids starting `{RESERVED_PREFIX}` name built-in executors)"
        ))
    } else {
        None
    }
}

/// What is wrong with a fetch destination, if anything; else the path by its components (so
/// `a/./b` and `a/b` are the same destination).
fn fetch_path(path: &str) -> Result<Vec<&str>, &'static str> {
    if path.is_empty() {
        return Err("is empty");
    }
    if path.len() > MAX_FETCH_PATH_LEN {
        return Err("is longer than 255 bytes");
    }
    if path.contains('\0') {
        return Err("contains a NUL byte");
    }
    let mut parts = Vec::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(p) => parts.push(p.to_str().unwrap_or_default()),
            Component::CurDir => {}
            Component::ParentDir => return Err("has a `..` component"),
            Component::RootDir | Component::Prefix(_) => return Err("must be relative to the sandbox"),
        }
    }
    if parts.is_empty() {
        return Err("names no file");
    }
    Ok(parts)
}

/// What is wrong with the executor part of task `tid`, if anything. `known` holds the digests
/// of the artifact store: every fetched artifact must be there.
pub(crate) fn executor_task_problem(
    tid: &TaskId,
    t: &ExecutorTask,
    known: &FxHashSet<Digest>,
) -> Option<String> {
    let e = &t.executor;
    let id = e.executor_id.as_str();
    if let Some(p) = executor_id_problem(id) {
        return Some(format!("task {tid}: {p}"));
    }
    let who = format!("task {tid}: executor {id}");
    if e.name.len() > MAX_EXECUTOR_NAME_LEN {
        return Some(format!(
            "{who} has a name of {} bytes, over the limit of {MAX_EXECUTOR_NAME_LEN}",
            e.name.len()
        ));
    }
    let c = &e.command;
    if c.argv.first().is_none_or(|a| a.is_empty()) {
        return Some(format!("{who} has an empty command"));
    }
    if let Some(i) = c.argv.iter().position(|a| a.contains('\0')) {
        return Some(format!("{who}: argument {i} of its command contains a NUL byte"));
    }
    for (name, value) in &c.env {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            return Some(format!(
                "{who}: environment variable name {name:?} is empty or contains `=` or NUL"
            ));
        }
        if value.contains('\0') {
            return Some(format!("{who}: environment variable {name} contains a NUL byte"));
        }
    }
    if e.fetch.len() > MAX_EXECUTOR_FETCHES {
        return Some(format!(
            "{who} asks for {} fetches, over the limit of {MAX_EXECUTOR_FETCHES}",
            e.fetch.len()
        ));
    }
    let mut destinations: HashSet<Vec<&str>> = HashSet::new();
    for f in &e.fetch {
        let digest = &f.artifact.digest;
        if !digest.is_valid() {
            return Some(format!(
                "{who}: fetch to {:?} names a malformed artifact digest `{digest}`",
                f.path
            ));
        }
        let parts = match fetch_path(&f.path) {
            Ok(parts) => parts,
            Err(why) => return Some(format!("{who}: fetch path {:?} {why}", f.path)),
        };
        if !known.contains(digest) {
            return Some(format!(
                "{who}: artifact {digest} for `{}` is not in the master's artifact store; upload it first",
                f.path
            ));
        }
        if !destinations.insert(parts) {
            return Some(format!("{who} fetches two files to `{}`", f.path));
        }
    }
    if let Some(p) = resources_problem(&who, &e.resources) {
        return Some(p);
    }
    if t.data.len() > MAX_TASK_DATA {
        return Some(format!(
            "task {tid} carries {} bytes of data, over the limit of {MAX_TASK_DATA}",
            t.data.len()
        ));
    }
    None
}

/// The problem of a task naming `info` when `earlier` (an executor running on the agent, or
/// named by an earlier task of the same call) has the same id.
pub(crate) fn mismatch_problem(
    tid: &TaskId,
    agent: &AgentId,
    info: &ExecutorInfo,
    earlier: &ExecutorInfo,
) -> Option<String> {
    (info != earlier).then(|| {
        format!(
            "task {tid}: executor {} on agent {agent} is already running with a different ExecutorInfo",
            info.executor_id
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use agora_sdk::proto::{ArtifactRef, CommandInfo, FetchInfo};

    fn digest(n: u8) -> Digest {
        Digest::of(&[n])
    }

    fn exec(id: &str) -> ExecutorTask {
        ExecutorTask {
            executor: ExecutorInfo {
                executor_id: ExecutorId::new(id),
                name: "my executor".into(),
                command: CommandInfo {
                    argv: vec!["./exec".into()],
                    shell: false,
                    env: vec![("A".into(), "1".into())],
                },
                resources: Resources::parse("cpus:0.1;mem:32MiB").unwrap(),
                fetch: vec![FetchInfo {
                    artifact: ArtifactRef { digest: digest(1), size: 1 },
                    path: "exec".into(),
                    executable: true,
                }],
            },
            data: vec![1, 2, 3],
        }
    }

    fn problem(t: &ExecutorTask) -> Option<String> {
        let known: FxHashSet<Digest> = [digest(1), digest(2)].into_iter().collect();
        executor_task_problem(&TaskId::new("t1"), t, &known)
    }

    fn with(f: impl FnOnce(&mut ExecutorTask)) -> Option<String> {
        let mut t = exec("e1");
        f(&mut t);
        problem(&t)
    }

    #[test]
    fn a_valid_executor_task_passes() {
        assert_eq!(problem(&exec("e1")), None);
        assert_eq!(problem(&exec("A.b_c-9")), None);
        assert_eq!(problem(&exec(&"x".repeat(128))), None);
        assert_eq!(with(|t| t.executor.fetch[0].path = "./bin/./exec".into()), None);
        assert_eq!(with(|t| t.data = vec![0; MAX_TASK_DATA]), None);
    }

    #[test]
    fn executor_ids_are_checked() {
        let p = |id: &str| problem(&exec(id)).unwrap();
        assert_eq!(p(""), "task t1: executor id is empty");
        assert_eq!(p(&"x".repeat(129)), "task t1: executor id is 129 bytes, over the limit of 128");
        assert_eq!(
            p("a/b"),
            "task t1: executor id \"a/b\" may contain only letters, digits, `.`, `_` and `-`"
        );
        assert_eq!(p("é"), "task t1: executor id \"é\" may contain only letters, digits, `.`, `_` and `-`");
        assert_eq!(p("."), "task t1: executor id `.` is not a valid name");
        assert_eq!(p(".."), "task t1: executor id `..` is not a valid name");
        assert_eq!(
            p("agora-command"),
            "task t1: executor id `agora-command` is reserved (ids starting `agora-` name built-in executors)"
        );
    }

    #[test]
    fn executor_name_command_and_env_are_checked() {
        assert_eq!(
            with(|t| t.executor.name = "n".repeat(257)).unwrap(),
            "task t1: executor e1 has a name of 257 bytes, over the limit of 256"
        );
        assert_eq!(with(|t| t.executor.name = "n".repeat(256)), None);
        assert_eq!(
            with(|t| t.executor.command.argv.clear()).unwrap(),
            "task t1: executor e1 has an empty command"
        );
        assert_eq!(
            with(|t| t.executor.command.argv = vec![String::new(), "x".into()]).unwrap(),
            "task t1: executor e1 has an empty command"
        );
        assert_eq!(
            with(|t| t.executor.command.argv.push("a\0b".into())).unwrap(),
            "task t1: executor e1: argument 1 of its command contains a NUL byte"
        );
        assert_eq!(
            with(|t| t.executor.command.env.push((String::new(), "v".into()))).unwrap(),
            "task t1: executor e1: environment variable name \"\" is empty or contains `=` or NUL"
        );
        assert_eq!(
            with(|t| t.executor.command.env.push(("A=B".into(), "v".into()))).unwrap(),
            "task t1: executor e1: environment variable name \"A=B\" is empty or contains `=` or NUL"
        );
        assert_eq!(
            with(|t| t.executor.command.env.push(("B".into(), "v\0".into()))).unwrap(),
            "task t1: executor e1: environment variable B contains a NUL byte"
        );
    }

    #[test]
    fn fetches_are_checked() {
        let fetch = |path: &str, d: Digest| FetchInfo {
            artifact: ArtifactRef { digest: d, size: 1 },
            path: path.into(),
            executable: false,
        };
        let path_problem = |path: &str| with(|t| t.executor.fetch.push(fetch(path, digest(2)))).unwrap();
        assert_eq!(path_problem(""), "task t1: executor e1: fetch path \"\" is empty");
        assert_eq!(
            path_problem("/etc/passwd"),
            "task t1: executor e1: fetch path \"/etc/passwd\" must be relative to the sandbox"
        );
        assert_eq!(
            path_problem("a/../../b"),
            "task t1: executor e1: fetch path \"a/../../b\" has a `..` component"
        );
        assert_eq!(path_problem("a\0b"), "task t1: executor e1: fetch path \"a\\0b\" contains a NUL byte");
        assert_eq!(path_problem("./."), "task t1: executor e1: fetch path \"./.\" names no file");
        let long = "p".repeat(256);
        assert_eq!(
            path_problem(&long),
            format!("task t1: executor e1: fetch path {long:?} is longer than 255 bytes")
        );
        assert_eq!(with(|t| t.executor.fetch.push(fetch(&"p".repeat(255), digest(2)))), None);
        assert_eq!(path_problem("./exec"), "task t1: executor e1 fetches two files to `./exec`");
        assert_eq!(
            with(|t| t.executor.fetch.push(fetch("other", digest(3)))).unwrap(),
            format!(
                "task t1: executor e1: artifact {} for `other` is not in the master's artifact store; upload it first",
                digest(3)
            )
        );
        let bad: Digest = serde_json::from_str("\"../x\"").unwrap();
        assert_eq!(
            with(|t| t.executor.fetch.push(fetch("other", bad))).unwrap(),
            "task t1: executor e1: fetch to \"other\" names a malformed artifact digest `../x`"
        );
        assert_eq!(
            with(|t| t.executor.fetch = (0..65).map(|i| fetch(&format!("f{i}"), digest(2))).collect())
                .unwrap(),
            "task t1: executor e1 asks for 65 fetches, over the limit of 64"
        );
        assert_eq!(
            with(|t| t.executor.fetch = (0..64).map(|i| fetch(&format!("f{i}"), digest(2))).collect()),
            None
        );
    }

    #[test]
    fn executor_resources_and_data_are_checked() {
        assert_eq!(
            with(|t| t.executor.resources = Resources::parse("disk:1GiB").unwrap()).unwrap(),
            "task t1: executor e1 asks for no cpus and no mem"
        );
        assert_eq!(
            with(|t| t.executor.resources = Resources::parse("cpus(web):1").unwrap()).unwrap(),
            "task t1: executor e1 names reserved resources; ask for plain quantities"
        );
        assert_eq!(
            with(|t| t.data = vec![0; MAX_TASK_DATA + 1]).unwrap(),
            format!("task t1 carries {} bytes of data, over the limit of {MAX_TASK_DATA}", MAX_TASK_DATA + 1)
        );
    }

    #[test]
    fn a_different_executor_info_is_a_mismatch() {
        let agent = AgentId::new("m-A1");
        let a = exec("e1").executor;
        assert_eq!(mismatch_problem(&TaskId::new("t2"), &agent, &a, &a.clone()), None);
        let mut b = a.clone();
        b.resources = Resources::parse("cpus:0.2;mem:32MiB").unwrap();
        assert_eq!(
            mismatch_problem(&TaskId::new("t2"), &agent, &b, &a).unwrap(),
            "task t2: executor e1 on agent m-A1 is already running with a different ExecutorInfo"
        );
    }

    #[test]
    fn the_table_tracks_by_agent_and_framework() {
        let mut t = Executors::default();
        let (a1, a2) = (AgentId::new("a1"), AgentId::new("a2"));
        let (f1, f2) = (FrameworkId::new("f1"), FrameworkId::new("f2"));
        let rec = |id: &str, cpus: u64| ExecutorRecord {
            info: ExecutorInfo { executor_id: ExecutorId::new(id), ..exec(id).executor },
            allocation: Resources::cpus(cpus),
        };
        t.insert(&a1, &f1, None, rec("e1", 100));
        t.insert(&a2, &f1, None, rec("e1", 200));
        t.insert(&a1, &f2, None, rec("e1", 400));
        assert_eq!(t.len(), 3);
        assert_eq!(t.framework_used(&f1), Resources::cpus(300));
        assert_eq!(t.on_agent(&a1).count(), 2);
        assert!(t.get(&a1, &f2, &ExecutorId::new("e1"), None).is_some());
        assert!(t.get(&a2, &f2, &ExecutorId::new("e1"), None).is_none());
        let gone = t.remove_framework(&f1);
        assert_eq!(gone.iter().map(|(a, _)| a.clone()).collect::<Vec<_>>(), vec![a1.clone(), a2.clone()]);
        assert_eq!(t.len(), 1);
        let key = (f2.clone(), ExecutorId::new("e1"), None);
        assert_eq!(t.remove(&a1, &key).map(|r| r.allocation), Some(Resources::cpus(400)));
        assert_eq!(t.len(), 0);
        t.insert(&a2, &f2, None, rec("e2", 1));
        assert_eq!(t.remove_agent(&a2).len(), 1);
        assert!(t.remove_agent(&a2).is_empty());
    }

    /// One record per user's process; the users of one executor are found together, next to
    /// another executor id whose name sorts right after it.
    #[test]
    fn the_table_tracks_each_users_process() {
        let mut t = Executors::default();
        let a = AgentId::new("a1");
        let f = FrameworkId::new("f1");
        let rec = |id: &str, cpus: u64| ExecutorRecord {
            info: ExecutorInfo { executor_id: ExecutorId::new(id), ..exec(id).executor },
            allocation: Resources::cpus(cpus),
        };
        let (e1, e10) = (ExecutorId::new("e1"), ExecutorId::new("e10"));
        t.insert(&a, &f, Some("bob".into()), rec("e1", 1));
        t.insert(&a, &f, None, rec("e1", 2));
        t.insert(&a, &f, Some("alice".into()), rec("e1", 4));
        t.insert(&a, &f, Some("alice".into()), rec("e10", 8));
        assert_eq!(t.len(), 4);
        assert_eq!(t.framework_used(&f), Resources::cpus(15));
        assert_eq!(t.get(&a, &f, &e1, Some("bob")).map(|r| r.allocation.cpus), Some(1));
        assert_eq!(t.get(&a, &f, &e1, None).map(|r| r.allocation.cpus), Some(2));
        assert!(t.get(&a, &f, &e10, Some("bob")).is_none());
        assert_eq!(t.users_of(&a, &f, &e1).map(|r| r.allocation.cpus).sum::<u64>(), 7);
        assert_eq!(t.users_of(&a, &f, &e10).count(), 1);
        let gone = t.remove_all_users(&a, &f, &e1);
        assert_eq!(gone.iter().map(|r| r.allocation.cpus).sum::<u64>(), 7);
        assert_eq!(t.len(), 1);
        assert!(t.remove_all_users(&a, &f, &e1).is_empty());
        assert_eq!(t.remove_all_users(&a, &f, &e10).len(), 1);
        assert_eq!(t.len(), 0);
    }
}
