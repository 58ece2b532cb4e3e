//! What operators see and do through the core: agent, framework and task listings, task
//! history, kills by an operator, and where a task's output may be read.

use super::*;

impl Master {
    /// Every known agent, by id.
    pub fn agents(&self) -> Vec<AgentView> {
        self.agents
            .values()
            .map(|a| AgentView {
                id: a.id.clone(),
                hostname: a.hostname.clone(),
                resources: a.total.clone(),
                used: a.used.clone(),
                attributes: a.attributes.clone(),
                status: self.agent_status(a),
                tasks: self.live_tasks(a.tasks.iter()).count() as u64,
                drain: a.drain.as_ref().map(|d| d.view.clone()),
            })
            .collect()
    }

    /// Every registered framework, by id.
    pub fn frameworks(&self) -> Vec<FrameworkView> {
        self.frameworks
            .values()
            .map(|f| {
                let mut used = Resources::default();
                let mut tasks = 0u64;
                for t in self.framework_tasks(&f.id).filter(|t| !t.state.is_terminal()) {
                    used.add_assign(&t.info.resources);
                    tasks += 1;
                }
                used.add_assign(&self.executors.framework_used(&f.id).flatten());
                FrameworkView {
                    id: f.id.clone(),
                    name: f.name.clone(),
                    role: f.role.clone(),
                    principal: f.principal.clone(),
                    status: f.status(),
                    used,
                    tasks,
                }
            })
            .collect()
    }

    /// The last frameworks removed (torn down or past their failover timeout) since this
    /// master started, oldest first, with status `completed` (kept in memory only).
    /// Whether framework `fw` (live, or among the completed ones) belongs to `principal`.
    pub fn framework_principal_is(&self, fw: &FrameworkId, principal: &str) -> bool {
        match self.frameworks.get(fw) {
            Some(f) => f.principal == principal,
            None => self.completed_frameworks.iter().any(|f| f.id == *fw && f.principal == principal),
        }
    }

    pub fn completed_frameworks(&self) -> Vec<FrameworkView> {
        self.completed_frameworks.iter().cloned().collect()
    }

    /// Every known task, including the last completed ones, sorted by framework and task id
    /// (a completed task comes after a live one with the same id).
    pub fn tasks(&self) -> Vec<TaskView> {
        let mut out: Vec<(TaskView, bool, usize)> = self
            .tasks
            .values()
            .map(|t| (t.view(), false, 0))
            .chain(self.completed.iter().enumerate().map(|(i, t)| (t.view(), true, i)))
            .collect();
        out.sort_by(|a, b| {
            (&a.0.framework_id, &a.0.id, a.1, a.2).cmp(&(&b.0.framework_id, &b.0.id, b.1, b.2))
        });
        out.into_iter().map(|(v, _, _)| v).collect()
    }

    /// A task's last state changes, oldest first (live tasks first, then the latest
    /// completed one with that key); `None` when the master does not know it.
    pub fn task_history(&self, key: &TaskKey) -> Option<Vec<TaskTransition>> {
        let task = self.tasks.get(key).or_else(|| self.completed.iter().rev().find(|t| t.key() == *key))?;
        Some(task.history.iter().cloned().collect())
    }

    /// Operator kill: the same path as a framework's KILL.
    pub fn kill_task(&mut self, now: Instant, task_id: &TaskId) -> Result<(), WireError> {
        self.kill_task_of(now, task_id, None)
    }

    /// [`Master::kill_task`] for an operator session restricted to `owner`'s frameworks
    /// (`None`: any task). A task of another principal is refused, not killed.
    pub fn kill_task_of(
        &mut self,
        now: Instant,
        task_id: &TaskId,
        owner: Option<&str>,
    ) -> Result<(), WireError> {
        if let Some(p) = owner {
            let theirs = |t: &&Task| t.info.task_id == *task_id;
            let all: Vec<&Task> = self.tasks.values().chain(self.completed.iter()).filter(theirs).collect();
            if !all.is_empty() && all.iter().all(|t| !self.framework_principal_is(&t.framework_id, p)) {
                return Err(WireError::new(
                    ErrorCode::Unauthorized,
                    format!("principal `{p}` may not kill other principals' tasks (task {task_id})"),
                ));
            }
        }
        let live: Vec<TaskKey> = self
            .tasks
            .values()
            .filter(|t| t.info.task_id == *task_id)
            .filter(|t| owner.is_none_or(|p| self.framework_principal_is(&t.framework_id, p)))
            .map(Task::key)
            .collect();
        let running: Vec<&TaskKey> =
            live.iter().filter(|k| self.tasks.get(k).is_some_and(|t| !t.state.is_terminal())).collect();
        match running.as_slice() {
            [key] => {
                let key = (*key).clone();
                self.kill_live_task(now, &key);
                Ok(())
            }
            [] => {
                let done = self
                    .tasks
                    .values()
                    .chain(self.completed.iter().rev())
                    .find(|t| t.info.task_id == *task_id);
                match done {
                    Some(t) => Err(WireError::new(
                        ErrorCode::Invalid,
                        format!("task {task_id} is already {}", t.state),
                    )),
                    None => Err(WireError::new(ErrorCode::NotFound, format!("no task {task_id}"))),
                }
            }
            many => Err(WireError::new(
                ErrorCode::Invalid,
                format!(
                    "task id {task_id} is used by {} frameworks ({}); kill it from its framework",
                    many.len(),
                    many.iter().map(|k| k.framework_id.as_str()).collect::<Vec<_>>().join(", ")
                ),
            )),
        }
    }

    /// Where to read a task's output, if `who` may read it (frameworks: only their own tasks).
    pub fn locate_output(&self, who: &Requester, task_id: &TaskId) -> Result<OutputLocation, WireError> {
        let mut matching =
            self.tasks.values().chain(self.completed.iter().rev()).filter(|t| t.info.task_id == *task_id);
        let task = match who {
            Requester::Operator => matching.next(),
            Requester::Principal(p) => {
                let all: Vec<&Task> = matching.collect();
                match all.iter().find(|t| self.framework_principal_is(&t.framework_id, p)) {
                    Some(t) => Some(*t),
                    None if all.is_empty() => None,
                    None => {
                        return Err(WireError::new(
                            ErrorCode::Unauthorized,
                            format!("principal `{p}` may not read other principals' task output and files (task {task_id})"),
                        ))
                    }
                }
            }
            Requester::Framework(conn) => {
                let Some(Peer::Framework(fw)) = self.conns.get(conn) else {
                    return Err(WireError::new(
                        ErrorCode::Unauthorized,
                        "this connection is not a subscribed framework",
                    ));
                };
                let all: Vec<&Task> = matching.collect();
                match all.iter().find(|t| t.framework_id == *fw) {
                    Some(t) => Some(*t),
                    None if all.is_empty() => None,
                    None => {
                        return Err(WireError::new(
                            ErrorCode::Unauthorized,
                            format!("task {task_id} belongs to another framework"),
                        ))
                    }
                }
            }
        };
        let task = task.ok_or_else(|| WireError::new(ErrorCode::NotFound, format!("no task {task_id}")))?;
        let conn = self.agents.get(&task.agent_id).and_then(Agent::conn).ok_or_else(|| {
            WireError::new(
                ErrorCode::NotFound,
                format!("agent {} of task {task_id} is not connected", task.agent_id),
            )
        })?;
        Ok(OutputLocation {
            agent_conn: conn,
            agent_id: task.agent_id.clone(),
            framework_id: task.framework_id.clone(),
        })
    }
}
