//! Ids as the user types them (as Nomad takes them): a whole id, a unique prefix of one, or,
//! where a command allows it, a unique name. Resolved on the client against the master's
//! listings, so that an unknown id answers "not found" and an ambiguous prefix names its
//! candidates instead of reaching the master.

use agora_sdk::proto::{AgentView, FrameworkView, TaskView};

/// How many candidates an ambiguity error names.
const SHOWN_CANDIDATES: usize = 10;

/// Why an id the user typed names no single record.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    #[error("no {kind} `{query}` (not found)")]
    NotFound { kind: &'static str, query: String },
    #[error("empty {kind} id")]
    Empty { kind: &'static str },
    #[error("`{query}` is ambiguous: it matches {} {kind}s: {}", .candidates.len(), shown(.candidates))]
    Ambiguous { kind: &'static str, query: String, candidates: Vec<String> },
}

/// The first [`SHOWN_CANDIDATES`] candidates, and how many more there are.
fn shown(candidates: &[String]) -> String {
    let mut s = candidates.iter().take(SHOWN_CANDIDATES).cloned().collect::<Vec<_>>().join(", ");
    if candidates.len() > SHOWN_CANDIDATES {
        s.push_str(&format!(" and {} more", candidates.len() - SHOWN_CANDIDATES));
    }
    s
}

/// What the resolution knows of one kind of record.
pub trait Named {
    /// `task`, `agent`, `framework`: for messages.
    const KIND: &'static str;
    fn id(&self) -> &str;
    /// What tells two records apart (a task id is unique within its framework only).
    fn key(&self) -> String {
        self.id().to_string()
    }
    /// The name a user may give instead of an id.
    fn name(&self) -> &str;
    /// How an ambiguity error shows it.
    fn candidate(&self) -> String;
}

impl Named for TaskView {
    const KIND: &'static str = "task";
    fn id(&self) -> &str {
        self.id.as_str()
    }
    fn key(&self) -> String {
        format!("{}/{}", self.framework_id, self.id)
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn candidate(&self) -> String {
        format!("{} ({}, framework {}, {})", self.id, self.name, self.framework_id, self.state)
    }
}

impl Named for AgentView {
    const KIND: &'static str = "agent";
    fn id(&self) -> &str {
        self.id.as_str()
    }
    fn name(&self) -> &str {
        &self.hostname
    }
    fn candidate(&self) -> String {
        format!("{} ({})", self.id, self.hostname)
    }
}

impl Named for FrameworkView {
    const KIND: &'static str = "framework";
    fn id(&self) -> &str {
        self.id.as_str()
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn candidate(&self) -> String {
        format!("{} ({}, {})", self.id, self.name, self.status)
    }
}

/// Finds the one record `query` names in `items`: a whole id first, then a prefix of ids,
/// then (`by_name`) a whole name. Records with the same [`Named::key`] count once (the first
/// listed: the master lists a live task before a completed one with the same key).
pub fn resolve<'a, T: Named>(items: &'a [T], query: &str, by_name: bool) -> Result<&'a T, ResolveError> {
    if query.is_empty() {
        return Err(ResolveError::Empty { kind: T::KIND });
    }
    let tiers: [&dyn Fn(&T) -> bool; 3] =
        [&|t| t.id() == query, &|t| t.id().starts_with(query), &|t| by_name && t.name() == query];
    for matches in tiers {
        let mut found: Vec<&T> = Vec::new();
        for t in items.iter().filter(|t| matches(t)) {
            if !found.iter().any(|f| f.key() == t.key()) {
                found.push(t);
            }
        }
        match found.as_slice() {
            [] => continue,
            [one] => return Ok(one),
            many => {
                return Err(ResolveError::Ambiguous {
                    kind: T::KIND,
                    query: query.to_string(),
                    candidates: many.iter().map(|t| t.candidate()).collect(),
                })
            }
        }
    }
    Err(ResolveError::NotFound { kind: T::KIND, query: query.to_string() })
}

#[cfg(test)]
mod tests {
    use agora_sdk::proto::*;
    use agora_sdk::Resources;

    use super::*;

    fn task(fw: &str, id: &str, name: &str, state: TaskState) -> TaskView {
        TaskView {
            id: TaskId::new(id),
            name: name.into(),
            framework_id: FrameworkId::new(fw),
            agent_id: AgentId::new("a1"),
            state,
            resources: Resources::cpus(100),
            exit_code: None,
            signal: None,
            reason: Reason::None,
            message: String::new(),
            usage: None,
            executor_id: ExecutorId::new(COMMAND_EXECUTOR_ID),
        }
    }

    #[test]
    fn whole_ids_prefixes_and_names() {
        let tasks = vec![
            task("f1", "abc123", "web", TaskState::Running),
            task("f1", "abd456", "db", TaskState::Running),
            task("f1", "abc", "short", TaskState::Finished),
        ];
        // A whole id wins over the longer ids it prefixes.
        assert_eq!(resolve(&tasks, "abc", false).map(|t| t.name.as_str()), Ok("short"));
        assert_eq!(resolve(&tasks, "abc1", false).map(|t| t.name.as_str()), Ok("web"));
        assert_eq!(resolve(&tasks, "abd", false).map(|t| t.name.as_str()), Ok("db"));
        let Err(ResolveError::Ambiguous { candidates, .. }) = resolve(&tasks, "ab", false) else {
            panic!("`ab` is ambiguous")
        };
        assert_eq!(candidates.len(), 3);
        assert!(candidates[0].starts_with("abc123 (web, framework f1, TASK_RUNNING)"), "{candidates:?}");
        assert_eq!(resolve(&tasks, "db", true).map(|t| t.id.as_str()), Ok("abd456"));
        assert_eq!(
            resolve(&tasks, "db", false).map(|t| t.id.as_str()),
            Err(ResolveError::NotFound { kind: "task", query: "db".into() })
        );
        assert_eq!(resolve(&tasks, "", true).err(), Some(ResolveError::Empty { kind: "task" }));
    }

    #[test]
    fn one_key_counts_once_and_frameworks_tell_ids_apart() {
        // A live task and its completed namesake (same framework): the live one.
        let tasks =
            vec![task("f1", "t1", "a", TaskState::Running), task("f1", "t1", "a", TaskState::Finished)];
        assert_eq!(resolve(&tasks, "t", false).map(|t| t.state), Ok(TaskState::Running));
        // The same id in two frameworks is ambiguous even when typed whole.
        let tasks =
            vec![task("f1", "t1", "a", TaskState::Running), task("f2", "t1", "b", TaskState::Running)];
        let err = resolve(&tasks, "t1", false).expect_err("ambiguous");
        assert!(err.to_string().contains("matches 2 tasks"), "{err}");
    }

    #[test]
    fn long_candidate_lists_are_cut() {
        let tasks: Vec<TaskView> =
            (0..25).map(|i| task("f1", &format!("t{i:02}"), "n", TaskState::Running)).collect();
        let err = resolve(&tasks, "t", false).expect_err("ambiguous").to_string();
        assert!(err.contains("matches 25 tasks") && err.ends_with("and 15 more"), "{err}");
    }
}
