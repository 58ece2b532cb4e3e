//! Agents: registration and re-registration (with the tasks they report), heartbeats and
//! deadlines, disconnection and becoming unreachable.

use super::*;

impl Master {
    pub(super) fn set_agent_deadline(&mut self, id: &AgentId, deadline: Option<Instant>) {
        let Some(agent) = self.agents.get_mut(id) else { return };
        if let Some(old) = agent.deadline.take() {
            self.agent_deadlines.remove(&(old, id.clone()));
        }
        if let Some(d) = deadline {
            agent.deadline = Some(d);
            self.agent_deadlines.insert((d, id.clone()));
        }
    }

    pub(super) fn on_agent_message(
        &mut self,
        now: Instant,
        conn: ConnId,
        principal: String,
        mut msg: AgentMessage,
    ) {
        if self.closing.contains(&conn) {
            return;
        }
        if let Err(e) = crate::validate::agent_message(&mut msg) {
            warn!(conn, principal, error = %e.message, "invalid agent message refused");
            match msg {
                // Books cannot be kept on a registration that is wrong.
                AgentMessage::Register { .. } | AgentMessage::TaskReports(_) => {
                    self.close_peer(now, conn, e.code, e.message)
                }
                _ => self.send_agent(conn, MasterToAgent::Error(e)),
            }
            return;
        }
        match self.conns.get(&conn).cloned() {
            None => match msg {
                AgentMessage::Register { agent_id, hostname, resources, attributes, tasks } => {
                    let tasks = match self.pending_reports.remove(&conn) {
                        Some(mut earlier) => {
                            earlier.extend(tasks);
                            earlier
                        }
                        None => tasks,
                    };
                    self.register_agent(
                        now, conn, principal, agent_id, hostname, resources, attributes, tasks,
                    )
                }
                AgentMessage::TaskReports(reports) => {
                    let pending = self.pending_reports.entry(conn).or_default();
                    if pending.len().saturating_add(reports.len()) > MAX_REPORTED_TASKS {
                        self.close(
                            conn,
                            ErrorCode::TooLarge,
                            format!("an agent may report at most {MAX_REPORTED_TASKS} tasks"),
                        );
                    } else {
                        pending.extend(reports);
                    }
                }
                _ => {
                    self.close(conn, ErrorCode::Unexpected, "the first message of an agent must be Register")
                }
            },
            Some(Peer::Framework(_)) => {
                self.close_peer(now, conn, ErrorCode::Unexpected, "agent message on a framework connection")
            }
            Some(Peer::Agent(id)) => {
                let deadline = after(now, self.config.agent_timeout);
                self.set_agent_deadline(&id, Some(deadline));
                match msg {
                    AgentMessage::Register { .. } | AgentMessage::TaskReports(_) => self.close_peer(
                        now,
                        conn,
                        ErrorCode::Unexpected,
                        format!("agent {id} is already registered on this connection"),
                    ),
                    AgentMessage::Heartbeat => self.send_agent(conn, MasterToAgent::HeartbeatAck),
                    AgentMessage::StatusUpdate(status) => self.on_status_update(now, &id, conn, status),
                    AgentMessage::LatestState(status) => self.on_latest_state(now, &id, status),
                    AgentMessage::FrameworkMessage { framework_id, executor_id, data } => {
                        self.on_executor_message(&id, framework_id, executor_id, data)
                    }
                    AgentMessage::ExecutorExited { framework_id, executor_id, message } => {
                        self.on_executor_exited(now, &id, framework_id, executor_id, message)
                    }
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn register_agent(
        &mut self,
        now: Instant,
        conn: ConnId,
        principal: String,
        agent_id: Option<AgentId>,
        hostname: String,
        resources: Resources,
        attributes: Attributes,
        reports: Vec<TaskReport>,
    ) {
        let id = match agent_id {
            Some(id) if id.as_str().is_empty() => {
                self.close(conn, ErrorCode::Invalid, "re-registration with an empty agent id");
                return;
            }
            Some(id) if self.gone_agents.contains_key(&id) => {
                // As Mesos does with an agent marked gone: it may not come back under this
                // id (its tasks were reported gone); it shuts down, and joins again as a new
                // agent once its work dir's id is cleared.
                warn!(agent_id = %id, hostname, "a removed agent tried to re-register: refused");
                self.close(
                    conn,
                    ErrorCode::Unauthorized,
                    format!(
                        "agent {id} was removed from the cluster (it did not re-register within {:?} \
                         after the master restarted) and its tasks were reported gone; remove the \
                         agent's saved id (agent_id in its work dir) to join as a new agent",
                        self.config.agent_reregister_timeout
                    ),
                );
                return;
            }
            Some(id) => id,
            None => {
                self.next_agent += 1;
                AgentId::new(format!("{}-A{}", self.config.master_id, self.next_agent))
            }
        };
        match self.agents.get(&id) {
            Some(agent) if agent.principal != principal => {
                warn!(agent_id = %id, principal, registered = %agent.principal, "agent principal mismatch");
                self.close(
                    conn,
                    ErrorCode::Unauthorized,
                    format!("agent {id} is registered by principal {}, not {principal}", agent.principal),
                );
                return;
            }
            Some(agent) => {
                info!(agent_id = %id, hostname, conn, status = agent.status.view().as_str(), "agent re-registered");
                if agent.status == AgentStatus::Recovering {
                    self.recovering = self.recovering.saturating_sub(1);
                }
                if let AgentStatus::Active { conn: old } = agent.status {
                    if old != conn {
                        self.close(
                            old,
                            ErrorCode::Unexpected,
                            format!("agent {id} registered again on another connection"),
                        );
                    }
                }
            }
            None => {
                info!(agent_id = %id, hostname, conn, tasks = reports.len(), "agent registered");
                self.agents.insert(id.clone(), Agent::new(id.clone(), principal));
            }
        }
        // Resources may have changed: take back its offers and re-enter it into the allocator
        // with the reported state.
        self.rescind_agent_offers(&id);
        self.detach_agent(&id);
        if let Some(agent) = self.agents.get_mut(&id) {
            agent.hostname = hostname;
            agent.total = resources;
            agent.attributes = attributes;
            agent.status = AgentStatus::Active { conn };
        }
        self.conns.insert(conn, Peer::Agent(id.clone()));
        self.persist_agent(&id, AgentStanding::Admitted);
        self.set_agent_deadline(&id, Some(after(now, self.config.agent_timeout)));
        self.send_agent(
            conn,
            MasterToAgent::Registered {
                agent_id: id.clone(),
                heartbeat_interval: self.config.agent_heartbeat_interval,
            },
        );
        self.adopt_reported_tasks(now, &id, conn, reports);
        self.sync_executors(&id);
        self.recompute_used(&id);
        self.attach_agent(&id);
        // Drained past its deadline while away (or before a restart): what it still runs goes.
        self.kill_drained_tasks_if_due(now, &id);
        self.request_allocation(now);
    }

    /// Takes an agent and its tasks out of the allocator.
    pub(super) fn detach_agent(&mut self, id: &AgentId) {
        let Some(agent) = self.agents.get(id) else { return };
        if !agent.attached {
            return;
        }
        let held: Vec<(FrameworkId, Resources)> = self
            .live_tasks(agent.tasks.iter())
            .map(|t| (t.framework_id.clone(), t.allocation.clone()))
            .chain(self.executors.on_agent(id).map(|((fw, _, _), e)| (fw.clone(), e.allocation.clone())))
            .collect();
        for (fw, r) in held {
            self.allocator.recover(&fw, id, &r);
        }
        self.allocator.remove_agent(id);
        if let Some(agent) = self.agents.get_mut(id) {
            agent.attached = false;
        }
    }

    /// Puts an agent and its live tasks into the allocator (not while it drains: it offers
    /// nothing then).
    pub(super) fn attach_agent(&mut self, id: &AgentId) {
        let Some(agent) = self.agents.get(id) else { return };
        if agent.attached || agent.drain.is_some() {
            return;
        }
        self.allocator.add_agent(id, &agent.total);
        let held: Vec<(FrameworkId, Resources)> = self
            .live_tasks(agent.tasks.iter())
            .map(|t| (t.framework_id.clone(), t.allocation.clone()))
            .chain(self.executors.on_agent(id).map(|((fw, _, _), e)| (fw.clone(), e.allocation.clone())))
            .collect();
        for (fw, r) in held {
            self.allocator.allocated(&fw, id, &r);
        }
        if let Some(agent) = self.agents.get_mut(id) {
            agent.attached = true;
        }
    }

    /// Brings the master's view of an agent's tasks in line with what it reports.
    pub(super) fn adopt_reported_tasks(
        &mut self,
        now: Instant,
        id: &AgentId,
        conn: ConnId,
        reports: Vec<TaskReport>,
    ) {
        let mut reported: HashSet<TaskKey> = HashSet::new();
        let mut shutdown: BTreeSet<FrameworkId> = BTreeSet::new();
        for r in reports {
            let key = TaskKey::new(r.framework_id.clone(), r.task.task_id.clone());
            if key.task_id.as_str().is_empty() || !reported.insert(key.clone()) {
                warn!(agent_id = %id, task_id = %key.task_id, "agent reported an unnamed or duplicate task");
                continue;
            }
            // A framework this master removed, or (after a restart) one its registry does
            // not hold: nobody will ever manage these tasks.
            let orphan = self.removed_frameworks.contains(&key.framework_id)
                || (self.recovered && !self.frameworks.contains_key(&key.framework_id));
            if orphan && !r.state.is_terminal() {
                shutdown.insert(key.framework_id.clone());
            }
            let killed_while_away = self.pending_kills.remove(&key);
            if killed_while_away && !r.state.is_terminal() {
                info!(agent_id = %id, task_id = %key.task_id, framework_id = %key.framework_id,
                    "killing a task its framework killed while the agent was re-registering");
                self.send_agent(
                    conn,
                    MasterToAgent::KillTask {
                        framework_id: key.framework_id.clone(),
                        task_id: key.task_id.clone(),
                    },
                );
            }
            let unix_ms = self.unix_ms(now);
            match self.tasks.get_mut(&key) {
                Some(task) if task.agent_id != *id => {
                    warn!(agent_id = %id, task_id = %key.task_id, framework_id = %key.framework_id,
                        known_on = %task.agent_id, "agent reported a task known on another agent");
                }
                Some(task) => {
                    let old = task.state;
                    let kill = task.kill_requested;
                    if r.state.is_terminal() || old == r.state {
                        // Terminal states arrive as the agent's own (retried) updates.
                    } else if let Err(e) = task.state.transition(r.state) {
                        warn!(agent_id = %id, task_id = %key.task_id, framework_id = %key.framework_id,
                            known = %old, reported = %r.state, "agent runs a task the master considers over ({e}): killing it");
                        self.send_agent(
                            conn,
                            MasterToAgent::KillTask {
                                framework_id: key.framework_id.clone(),
                                task_id: key.task_id.clone(),
                            },
                        );
                        continue;
                    } else {
                        task.record(r.state, &Reason::AgentReregistered, unix_ms);
                        // Back from a partition: RUNNING again, unless the framework killed
                        // it meanwhile (then the kill below goes out and KILLED follows).
                        if old == TaskState::Unreachable && !kill {
                            let status = master_status(
                                &key,
                                Some(id.clone()),
                                r.state,
                                Reason::AgentReregistered,
                                format!("agent {id} re-registered and reports the task {}", r.state),
                                self.unix_ms(now),
                            );
                            if let Some(task) = self.tasks.get_mut(&key) {
                                task.latest = Some(status.clone());
                            }
                            self.deliver(&key, status);
                        }
                    }
                    if kill && !r.state.is_terminal() {
                        self.send_agent(
                            conn,
                            MasterToAgent::KillTask {
                                framework_id: key.framework_id.clone(),
                                task_id: key.task_id.clone(),
                            },
                        );
                    }
                }
                None => {
                    let completed = self.completed_index.contains_key(&key);
                    debug!(agent_id = %id, task_id = %key.task_id, framework_id = %key.framework_id, state = %r.state, "adopting reported task");
                    // A reported task holds its flat request (taken from the unreserved
                    // part first); reservations are re-attributed as tasks come and go.
                    let allocation = r.task.resources.flatten();
                    let mut task = Task {
                        info: r.task,
                        framework_id: key.framework_id.clone(),
                        agent_id: id.clone(),
                        state: r.state,
                        allocation,
                        latest: None,
                        pending: Vec::new(),
                        kill_requested: completed || killed_while_away,
                        history: Default::default(),
                        kill_reason: None,
                        ahead: None,
                    };
                    // What happened before this master knew it is the agent's to tell.
                    task.record(r.state, &Reason::ReportedByAgent, unix_ms);
                    self.tasks.insert(key.clone(), task);
                    if let Some(agent) = self.agents.get_mut(id) {
                        agent.tasks.insert(key.clone());
                    }
                    if completed && !r.state.is_terminal() {
                        warn!(agent_id = %id, task_id = %key.task_id, framework_id = %key.framework_id,
                            "agent runs a task that already completed: killing it");
                        self.send_agent(
                            conn,
                            MasterToAgent::KillTask {
                                framework_id: key.framework_id.clone(),
                                task_id: key.task_id.clone(),
                            },
                        );
                    }
                }
            }
        }
        for fw in shutdown {
            self.send_agent(conn, MasterToAgent::ShutdownFramework { framework_id: fw });
        }
        let missing: Vec<TaskKey> = self
            .agents
            .get(id)
            .map(|a| {
                self.live_tasks(a.tasks.iter()).map(Task::key).filter(|k| !reported.contains(k)).collect()
            })
            .unwrap_or_default();
        for key in missing {
            warn!(agent_id = %id, task_id = %key.task_id, framework_id = %key.framework_id, "task not reported by re-registered agent");
            self.master_update(
                now,
                &key,
                TaskState::Gone,
                Reason::TaskNotReported,
                format!("agent {id} re-registered without task {}", key.task_id),
            );
        }
    }

    pub(super) fn agent_disconnected(&mut self, now: Instant, id: &AgentId) {
        info!(agent_id = %id, "agent disconnected");
        self.rescind_agent_offers(id);
        if let Some(agent) = self.agents.get_mut(id) {
            if matches!(agent.status, AgentStatus::Active { .. }) {
                agent.status = AgentStatus::Disconnected;
            }
        }
        self.request_allocation(now);
    }

    pub(super) fn agent_timed_out(&mut self, now: Instant, id: &AgentId) {
        let Some(agent) = self.agents.get_mut(id) else { return };
        agent.deadline = None;
        let status = agent.status;
        if status == AgentStatus::Unreachable {
            return;
        }
        if status == AgentStatus::Recovering {
            self.remove_unregistered_agent(now, id);
            return;
        }
        warn!(agent_id = %id, timeout = ?self.config.agent_timeout, "agent timed out: unreachable");
        counter!(metrics::AGENTS_UNREACHABLE_EVENTS).increment(1);
        if let AgentStatus::Active { conn } = status {
            self.close(
                conn,
                ErrorCode::Unexpected,
                format!(
                    "agent {id} sent nothing for {:?} and is marked unreachable; register again",
                    self.config.agent_timeout
                ),
            );
        }
        self.rescind_agent_offers(id);
        self.detach_agent(id);
        // Its executors are considered gone (their resources were recovered by the detach);
        // those with live tasks are adopted again if it comes back with them.
        for (fw, e) in self.executors.remove_agent(id) {
            info!(agent_id = %id, framework_id = %fw, executor_id = %e.info.executor_id, "agent unreachable: forgetting its executor");
            if let Some(agent) = self.agents.get_mut(id) {
                agent.used = agent.used.saturating_sub(&e.allocation);
            }
        }
        if let Some(agent) = self.agents.get_mut(id) {
            agent.status = AgentStatus::Unreachable;
        }
        self.persist_agent(id, AgentStanding::Unreachable { since_ms: self.unix_ms(now) });
        let live: Vec<TaskKey> = self
            .agents
            .get(id)
            .map(|a| self.live_tasks(a.tasks.iter()).map(Task::key).collect())
            .unwrap_or_default();
        for key in live {
            self.master_update(
                now,
                &key,
                TaskState::Unreachable,
                Reason::AgentUnreachable,
                format!("agent {id} sent nothing for {:?}", self.config.agent_timeout),
            );
        }
        self.request_allocation(now);
    }
}

impl Master {
    /// Removes an agent recovered from the registry that did not re-register within the agent
    /// re-register timeout: it is marked gone (its tasks answer TASK_GONE to reconciliation,
    /// and it is refused if it comes back). It never re-registered with this master, so it
    /// holds no offers, filters or known tasks.
    fn remove_unregistered_agent(&mut self, now: Instant, id: &AgentId) {
        warn!(agent_id = %id, timeout = ?self.config.agent_reregister_timeout,
            "agent did not re-register after the master restarted: removing it");
        counter!(metrics::AGENTS_REMOVED).increment(1);
        self.recovering = self.recovering.saturating_sub(1);
        let since_ms = self.unix_ms(now);
        self.persist_agent(id, AgentStanding::Gone { since_ms });
        if let Some(d) = self.agents.remove(id).and_then(|a| a.drain).and_then(|d| d.deadline) {
            self.drain_deadlines.remove(&(d, id.clone()));
        }
        self.gone_agents.insert(id.clone(), since_ms);
        while self.gone_agents.len() > MAX_GONE_AGENTS {
            let Some(oldest) =
                self.gone_agents.iter().min_by_key(|(id, t)| (**t, (*id).clone())).map(|(id, _)| id.clone())
            else {
                break;
            };
            self.gone_agents.remove(&oldest);
            self.persist(RegistryOp::RemoveAgent(oldest));
        }
    }
}
