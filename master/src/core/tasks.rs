//! Tasks and status updates: applying a task's new state, forwarding updates to frameworks
//! until they are acknowledged, retiring completed tasks, kills and reconciliation answers.

use super::*;

impl Master {
    pub(super) fn live_tasks<'a>(
        &'a self,
        keys: impl Iterator<Item = &'a TaskKey> + 'a,
    ) -> impl Iterator<Item = &'a Task> + 'a {
        keys.filter_map(|k| self.tasks.get(k)).filter(|t| !t.state.is_terminal())
    }

    /// The framework's tasks that are not completed.
    pub(super) fn framework_tasks<'a>(&'a self, fw: &FrameworkId) -> impl Iterator<Item = &'a Task> + 'a {
        self.tasks.of_framework(fw)
    }

    pub(super) fn framework_task_keys(&self, fw: &FrameworkId) -> Vec<TaskKey> {
        self.framework_tasks(fw).map(Task::key).collect()
    }

    pub(super) fn recompute_used(&mut self, agent_id: &AgentId) {
        let Some(agent) = self.agents.get(agent_id) else { return };
        let mut used = Resources::default();
        for t in self.live_tasks(agent.tasks.iter()) {
            used.add_assign(&t.allocation);
        }
        for (_, e) in self.executors.on_agent(agent_id) {
            used.add_assign(&e.allocation);
        }
        if let Some(agent) = self.agents.get_mut(agent_id) {
            agent.used = used;
        }
    }

    /// Applies `status` to a task and, when the task just ended, returns its resources. An
    /// invalid move changes nothing and is the caller's to report (an unknown task is no error:
    /// nothing to apply it to).
    pub(super) fn apply_status(
        &mut self,
        now: Instant,
        key: &TaskKey,
        status: &TaskStatus,
    ) -> Result<(), InvalidTransition> {
        let unix_ms = self.unix_ms(now);
        let Some(task) = self.tasks.get_mut(key) else { return Ok(()) };
        let was_terminal = task.state.is_terminal();
        task.state.transition(status.state)?;
        task.latest = Some(status.clone());
        task.record(status.state, &status.reason, unix_ms);
        if status.state.is_terminal() && !was_terminal {
            let agent_id = task.agent_id.clone();
            let resources = task.allocation.clone();
            debug!(task_id = %key.task_id, framework_id = %key.framework_id, agent_id = %agent_id, state = %status.state, "task ended");
            counter!(metrics::TASKS_TERMINAL, "state" => status.state.as_str()).increment(1);
            // Incremental: recomputing walks every task of the agent, quadratic under load.
            if let Some(agent) = self.agents.get_mut(&agent_id) {
                agent.used = agent.used.saturating_sub(&resources);
            }
            if self.agents.get(&agent_id).is_some_and(|a| a.attached) {
                self.allocator.recover(&key.framework_id, &agent_id, &resources);
            }
            self.request_allocation(now);
        }
        Ok(())
    }

    /// Sends an update about a known task to its framework, keeping it pending until it is
    /// acknowledged (uuid) or delivered (no uuid). Updates of removed frameworks are
    /// acknowledged to the agent directly.
    pub(super) fn deliver(&mut self, key: &TaskKey, status: TaskStatus) {
        let Some(task) = self.tasks.get_mut(key) else { return };
        match self.frameworks.get(&key.framework_id) {
            None => {
                if let Some(uuid) = status.uuid {
                    let agent_conn = self.agents.get(&task.agent_id).and_then(Agent::conn);
                    if let Some(conn) = agent_conn {
                        self.actions.push_back(Action::ToAgent {
                            conn,
                            msg: MasterToAgent::StatusAck {
                                framework_id: key.framework_id.clone(),
                                task_id: key.task_id.clone(),
                                uuid,
                            },
                        });
                    }
                }
            }
            Some(fw) => {
                let conn = fw.conn();
                if status.uuid.is_some() {
                    if !task.pending.iter().any(|p| p.uuid == status.uuid) {
                        task.pending.push(status.clone());
                    }
                } else if conn.is_none() {
                    task.pending.push(status.clone());
                }
                if let Some(conn) = conn {
                    self.actions
                        .push_back(Action::ToFramework { conn, event: SchedulerEvent::Update(status) });
                }
            }
        }
        self.maybe_complete(key);
    }

    /// Moves a terminal task whose updates were all acknowledged to the completed list.
    pub(super) fn maybe_complete(&mut self, key: &TaskKey) {
        let done = self
            .tasks
            .get(key)
            .is_some_and(|t| t.state.is_terminal() && t.pending.is_empty() && t.ahead.is_none());
        if !done {
            return;
        }
        let Some(task) = self.tasks.remove(key) else { return };
        if let Some(agent) = self.agents.get_mut(&task.agent_id) {
            agent.tasks.remove(key);
        }
        *self.completed_index.entry(key.clone()).or_insert(0) += 1;
        self.completed.push_back(task);
        while self.completed.len() > COMPLETED_TASKS {
            if let Some(old) = self.completed.pop_front() {
                let k = old.key();
                if let Some(n) = self.completed_index.get_mut(&k) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.completed_index.remove(&k);
                    }
                }
            }
        }
    }

    /// A master-made update for a known task: applied (if the transition is valid) and sent.
    pub(super) fn master_update(
        &mut self,
        now: Instant,
        key: &TaskKey,
        state: TaskState,
        reason: Reason,
        message: String,
    ) {
        let Some(task) = self.tasks.get(key) else { return };
        let status =
            master_status(key, Some(task.agent_id.clone()), state, reason, message, self.unix_ms(now));
        if let Err(e) = self.apply_status(now, key, &status) {
            // E.g. a task that ended meanwhile: the master has nothing to say about it.
            debug!(task_id = %key.task_id, framework_id = %key.framework_id, reason = %status.reason, "master update not sent: {e}");
            return;
        }
        self.deliver(key, status);
    }

    /// The latest status of a task as a reconciliation answer (no uuid).
    pub(super) fn reconcile_status(&self, now: Instant, task: &Task) -> TaskStatus {
        match &task.latest {
            Some(s) => TaskStatus { state: task.state, uuid: None, ..s.clone() },
            None => master_status(
                &task.key(),
                Some(task.agent_id.clone()),
                task.state,
                Reason::Reconciliation,
                String::new(),
                self.unix_ms(now),
            ),
        }
    }

    /// Asks the agent of a live task to kill it (or remembers to, if it is away).
    pub(super) fn kill_live_task(&mut self, now: Instant, key: &TaskKey) {
        let Some(task) = self.tasks.get_mut(key) else { return };
        task.kill_requested = true;
        let agent_id = task.agent_id.clone();
        let state = task.state;
        let status = self.agents.get(&agent_id).map(|a| a.status);
        info!(task_id = %key.task_id, framework_id = %key.framework_id, agent_id = %agent_id, "killing task");
        match status {
            Some(AgentStatus::Active { conn }) => self.send_agent(
                conn,
                MasterToAgent::KillTask {
                    framework_id: key.framework_id.clone(),
                    task_id: key.task_id.clone(),
                },
            ),
            Some(AgentStatus::Unreachable) if state == TaskState::Unreachable => {
                // Tell the framework again where the task stands; the kill goes out if the
                // agent comes back.
                let status = master_status(
                    key,
                    Some(agent_id.clone()),
                    TaskState::Unreachable,
                    Reason::AgentUnreachable,
                    format!("agent {agent_id} is unreachable; the task is killed if it comes back"),
                    self.unix_ms(now),
                );
                self.deliver(key, status);
            }
            _ => {}
        }
    }

    pub(super) fn on_status_update(
        &mut self,
        now: Instant,
        agent_id: &AgentId,
        conn: ConnId,
        mut status: TaskStatus,
    ) {
        counter!(metrics::STATUS_UPDATES).increment(1);
        status.agent_id = Some(agent_id.clone());
        let key = TaskKey::new(status.framework_id.clone(), status.task_id.clone());
        let ack = |s: &TaskStatus| {
            s.uuid.map(|uuid| Action::ToAgent {
                conn,
                msg: MasterToAgent::StatusAck {
                    framework_id: s.framework_id.clone(),
                    task_id: s.task_id.clone(),
                    uuid,
                },
            })
        };
        let Some(task) = self.tasks.get(&key) else {
            if self.completed_index.contains_key(&key) || !self.frameworks.contains_key(&key.framework_id) {
                // Already acknowledged, or nobody left to acknowledge it: stop the retries.
                debug!(agent_id = %agent_id, task_id = %key.task_id, framework_id = %key.framework_id, state = %status.state, "acknowledging update of a completed task or removed framework");
                self.actions.extend(ack(&status));
            } else {
                warn!(agent_id = %agent_id, task_id = %key.task_id, framework_id = %key.framework_id, state = %status.state, "status update for an unknown task dropped");
            }
            return;
        };
        if task.agent_id != *agent_id {
            warn!(agent_id = %agent_id, task_id = %key.task_id, framework_id = %key.framework_id, known_on = %task.agent_id, "status update from the wrong agent dropped");
            return;
        }
        if let Some(ahead) = task.ahead {
            if status.uuid != Some(ahead) {
                // An earlier update, in its turn: the framework gets it, the state stays the
                // newer one already shown.
                debug!(agent_id = %agent_id, task_id = %key.task_id, framework_id = %key.framework_id, state = %status.state, "status update behind the state shown");
                self.deliver(&key, status);
                return;
            }
        }
        // Killed by the master (its agent's drain, its framework's teardown with a reason):
        // the update says so, not the executor's generic reason.
        if let (TaskState::Killed, Some(reason)) = (status.state, &task.kill_reason) {
            status.reason = reason.clone();
        }
        if let Err(e) = self.apply_status(now, &key, &status) {
            warn!(agent_id = %agent_id, task_id = %key.task_id, framework_id = %key.framework_id, from = %e.from, to = %e.to, "{e}: update dropped");
            // Acknowledge it so the agent stops retrying an update nobody will take.
            self.actions.extend(ack(&status));
            return;
        }
        debug!(agent_id = %agent_id, task_id = %key.task_id, framework_id = %key.framework_id, state = %status.state, "status update");
        if let Some(task) = self.tasks.get_mut(&key) {
            if task.ahead.is_some() && task.ahead == status.uuid {
                task.ahead = None;
            }
        }
        self.deliver(&key, status);
    }

    /// An agent's notice of a task's newest update while an earlier one awaits its framework's
    /// acknowledgement ([`AgentMessage::LatestState`]): its state is shown (and a terminal
    /// task's resources freed) now; the framework gets nothing until the update itself comes
    /// in its turn. Without it a detached run's killed task would stay TASK_KILLING for as
    /// long as nobody acknowledges the KILLING update (the framework's failover timeout).
    pub(super) fn on_latest_state(&mut self, now: Instant, agent_id: &AgentId, mut status: TaskStatus) {
        let key = TaskKey::new(status.framework_id.clone(), status.task_id.clone());
        let Some(task) = self.tasks.get(&key) else { return };
        if task.agent_id != *agent_id || status.uuid.is_none() {
            return;
        }
        if task.pending.iter().any(|p| p.uuid == status.uuid) {
            // The update itself was already here.
            return;
        }
        status.agent_id = Some(agent_id.clone());
        if let (TaskState::Killed, Some(reason)) = (status.state, &task.kill_reason) {
            status.reason = reason.clone();
        }
        if let Err(e) = self.apply_status(now, &key, &status) {
            // Its update, when it comes in its turn, is refused (and acknowledged) the same way.
            debug!(agent_id = %agent_id, task_id = %key.task_id, framework_id = %key.framework_id, "newest state not shown: {e}");
            return;
        }
        debug!(agent_id = %agent_id, task_id = %key.task_id, framework_id = %key.framework_id, state = %status.state, "newest state ahead of its update");
        if let Some(task) = self.tasks.get_mut(&key) {
            task.ahead = status.uuid;
        }
    }
}
