//! Frameworks: subscription and failover, disconnection and removal, and the scheduler calls
//! other than `Accept`/`Decline` (request, kill, acknowledge, reconcile, ...).

use super::*;

impl Master {
    pub(super) fn on_framework_call(
        &mut self,
        now: Instant,
        conn: ConnId,
        principal: String,
        mut call: SchedulerCall,
    ) {
        if self.closing.contains(&conn) {
            return;
        }
        if let Err(e) = crate::validate::scheduler_call(&mut call) {
            counter!(metrics::CALLS_INVALID).increment(1);
            warn!(conn, principal, error = %e.message, "invalid scheduler call refused");
            match self.conns.get(&conn) {
                // A subscription that cannot be taken: there is nothing to keep open.
                None => self.close(conn, e.code, e.message),
                Some(_) => self.send_framework(conn, SchedulerEvent::Error(e)),
            }
            return;
        }
        let fw = match self.conns.get(&conn).cloned() {
            None => {
                match call {
                    SchedulerCall::Subscribe(info) => self.subscribe(now, conn, principal, info),
                    _ => self.close(
                        conn,
                        ErrorCode::Unexpected,
                        "the first call of a framework must be Subscribe",
                    ),
                }
                return;
            }
            Some(Peer::Agent(_)) => {
                self.close_peer(now, conn, ErrorCode::Unexpected, "scheduler call on an agent connection");
                return;
            }
            Some(Peer::Framework(fw)) => fw,
        };
        match call {
            SchedulerCall::Subscribe(info) => {
                if info.id.as_ref() == Some(&fw) {
                    self.subscribe(now, conn, principal, info);
                } else {
                    self.close_peer(
                        now,
                        conn,
                        ErrorCode::Unexpected,
                        format!("this connection is already subscribed as framework {fw}"),
                    );
                }
            }
            SchedulerCall::Accept { offer_ids, operations, refuse_seconds } => {
                self.accept(now, conn, &fw, offer_ids, operations, refuse_seconds)
            }
            SchedulerCall::Decline { offer_ids, refuse_seconds } => {
                self.decline(now, &fw, offer_ids, refuse_seconds)
            }
            SchedulerCall::Revive => {
                if let Some(f) = self.frameworks.get_mut(&fw) {
                    info!(framework_id = %fw, "revive");
                    f.filters.clear();
                    f.revive();
                    self.allocator.revive(&fw);
                    self.request_allocation(now);
                }
            }
            SchedulerCall::Suppress => {
                if let Some(f) = self.frameworks.get_mut(&fw) {
                    info!(framework_id = %fw, "suppress");
                    f.suppress();
                    self.allocator.suppress(&fw);
                }
            }
            SchedulerCall::Request { demands } => self.request(now, conn, &fw, demands, Vec::new()),
            SchedulerCall::RequestTasks { demands, task_ids } => {
                self.request(now, conn, &fw, demands, task_ids)
            }
            SchedulerCall::Kill { task_id } => self.framework_kill(now, conn, &fw, task_id),
            SchedulerCall::Acknowledge { agent_id, task_id, uuid } => {
                self.acknowledge(&fw, agent_id, task_id, uuid)
            }
            SchedulerCall::Reconcile { task_ids } => self.reconcile(
                now,
                conn,
                &fw,
                task_ids.into_iter().map(|task_id| ReconcileTask { task_id, agent_id: None }).collect(),
            ),
            SchedulerCall::ReconcileTasks { tasks } => self.reconcile(now, conn, &fw, tasks),
            SchedulerCall::Teardown => {
                info!(framework_id = %fw, "framework teardown");
                self.remove_framework(now, &fw);
                self.close(conn, ErrorCode::NotFound, format!("framework {fw} torn down"));
            }
            SchedulerCall::TeardownBecause { reason } => self.teardown_because(now, conn, &fw, reason),
            SchedulerCall::Heartbeat => {}
            SchedulerCall::Message { agent_id, executor_id, data } => {
                self.scheduler_message(conn, &fw, agent_id, executor_id, data)
            }
            SchedulerCall::ShutdownExecutor { agent_id, executor_id } => {
                self.shutdown_executor(conn, &fw, agent_id, executor_id)
            }
        }
    }

    pub(super) fn subscribe(&mut self, now: Instant, conn: ConnId, principal: String, info: FrameworkInfo) {
        let role = if info.role.is_empty() { "*".to_string() } else { info.role.clone() };
        // A failover keeps the role it was registered with: that is the one to check.
        let kept_role = info.id.as_ref().and_then(|id| self.frameworks.get(id)).map(|f| f.role.clone());
        if let Some(acls) = &self.config.acls {
            let allowed = acls
                .check_role(&principal, kept_role.as_deref().unwrap_or(&role))
                .and_then(|()| info.user.as_ref().map_or(Ok(()), |u| acls.check_task_user(&principal, u)));
            if let Err(e) = allowed {
                warn!(principal, role, error = %e.message, "subscription denied by the ACLs");
                counter!(metrics::ACL_DENIALS).increment(1);
                self.close(conn, e.code, e.message);
                return;
            }
        }
        let id = match info.id {
            None => {
                self.next_framework += 1;
                let id = FrameworkId::new(format!("{}-F{}", self.config.master_id, self.next_framework));
                info!(framework_id = %id, name = %info.name, role, principal, "framework subscribed");
                self.frameworks.insert(
                    id.clone(),
                    Framework {
                        id: id.clone(),
                        name: info.name,
                        role: role.clone(),
                        principal,
                        hostname: info.hostname,
                        failover_timeout: info.failover_timeout,
                        user: info.user.clone(),
                        link: FrameworkLink::Connected(conn),
                        offers: FxHashSet::default(),
                        filters: FxHashMap::default(),
                    },
                );
                self.allocator.add_framework(&id, &role);
                // Written before `Subscribed` goes out: a restarted master knows the id.
                self.persist_framework(&id);
                id
            }
            Some(id) => {
                let Some(fw) = self.frameworks.get(&id) else {
                    self.close(
                        conn,
                        ErrorCode::NotFound,
                        format!(
                            "framework {id} is not registered with this master (torn down, or \
                             removed after its failover timeout); subscribe without an id"
                        ),
                    );
                    return;
                };
                if fw.principal != principal {
                    warn!(framework_id = %id, principal, registered = %fw.principal, "framework failover refused: principal mismatch");
                    self.close(
                        conn,
                        ErrorCode::Unauthorized,
                        format!("framework {id} belongs to principal {}, not {principal}", fw.principal),
                    );
                    return;
                }
                if fw.role != role {
                    warn!(framework_id = %id, role, kept = %fw.role, "a framework cannot change its role on failover; keeping the old one");
                }
                let old = fw.link;
                let offers = self.offer_ids(&fw.offers);
                match old {
                    FrameworkLink::Connected(old_conn) | FrameworkLink::Suppressed(old_conn)
                        if old_conn != conn =>
                    {
                        info!(framework_id = %id, old_conn, conn, "framework failed over");
                        self.close(
                            old_conn,
                            ErrorCode::Unexpected,
                            format!("framework {id} failed over to another connection"),
                        );
                    }
                    FrameworkLink::Connected(_) | FrameworkLink::Suppressed(_) => {}
                    FrameworkLink::Disconnected { deadline } => {
                        info!(framework_id = %id, conn, "framework re-subscribed");
                        if let Some(d) = deadline {
                            self.failover_deadlines.remove(&(d, id.clone()));
                        }
                        self.allocator.activate_framework(&id);
                    }
                }
                if old.conn().is_some_and(|c| c != conn) {
                    // Offers made to the old instance are unknown to the new one.
                    for o in &offers {
                        self.rescind_offer(o, false);
                    }
                }
                if let Some(fw) = self.frameworks.get_mut(&id) {
                    // A new instance knows nothing of the old one's SUPPRESS.
                    fw.link = FrameworkLink::Connected(conn);
                    fw.name = info.name;
                    fw.hostname = info.hostname;
                    fw.failover_timeout = info.failover_timeout;
                    fw.user = info.user.clone();
                }
                self.persist_framework(&id);
                self.allocator.revive(&id);
                id
            }
        };
        self.conns.insert(conn, Peer::Framework(id.clone()));
        self.send_framework(
            conn,
            SchedulerEvent::Subscribed {
                framework_id: id.clone(),
                heartbeat_interval: self.config.framework_heartbeat_interval,
            },
        );
        self.resend_pending(&id, conn);
        self.tell_drains(conn);
        self.request_allocation(now);
    }

    /// Sends every update the framework has not acknowledged (or not received) again.
    pub(super) fn resend_pending(&mut self, fw: &FrameworkId, conn: ConnId) {
        for key in self.framework_task_keys(fw) {
            let Some(task) = self.tasks.get_mut(&key) else { continue };
            for s in &task.pending {
                self.actions
                    .push_back(Action::ToFramework { conn, event: SchedulerEvent::Update(s.clone()) });
            }
            task.pending.retain(|s| s.uuid.is_some());
            self.maybe_complete(&key);
        }
    }

    pub(super) fn framework_disconnected(&mut self, now: Instant, id: &FrameworkId) {
        let Some(fw) = self.frameworks.get(id) else { return };
        let deadline = now.checked_add(fw.failover_timeout);
        info!(framework_id = %id, failover_timeout = ?fw.failover_timeout, "framework disconnected");
        let offers = self.offer_ids(&fw.offers);
        for o in &offers {
            self.rescind_offer(o, false);
        }
        if let Some(fw) = self.frameworks.get_mut(id) {
            fw.link = FrameworkLink::Disconnected { deadline };
        }
        if let Some(d) = deadline {
            self.failover_deadlines.insert((d, id.clone()));
        }
        self.allocator.deactivate_framework(id);
        self.request_allocation(now);
    }

    /// A teardown naming why: the tasks it kills end with that reason.
    fn teardown_because(&mut self, now: Instant, conn: ConnId, fw: &FrameworkId, reason: Reason) {
        let len = reason.as_str().len();
        if reason.is_empty() || len > MAX_TEARDOWN_REASON {
            let message = format!("a teardown reason must have 1 to {MAX_TEARDOWN_REASON} bytes, not {len}");
            warn!(framework_id = %fw, message, "invalid teardown");
            self.send_framework(conn, SchedulerEvent::Error(WireError::new(ErrorCode::Invalid, message)));
            return;
        }
        info!(framework_id = %fw, %reason, "framework teardown");
        for key in self.framework_task_keys(fw) {
            if let Some(task) = self.tasks.get_mut(&key) {
                if !task.state.is_terminal() {
                    task.kill_reason = Some(reason.clone());
                }
            }
        }
        self.remove_framework(now, fw);
        self.close(conn, ErrorCode::NotFound, format!("framework {fw} torn down: {reason}"));
    }

    /// Forgets a framework for good: its offers are taken back and its tasks killed.
    pub(super) fn remove_framework(&mut self, now: Instant, id: &FrameworkId) {
        let Some(fw) = self.frameworks.remove(id) else { return };
        counter!(metrics::FRAMEWORKS_REMOVED).increment(1);
        self.persist(RegistryOp::RemoveFramework(id.clone()));
        self.completed_frameworks.push_back(FrameworkView {
            id: fw.id.clone(),
            name: fw.name.clone(),
            role: fw.role.clone(),
            principal: fw.principal.clone(),
            status: FrameworkViewStatus::Completed,
            used: Resources::default(),
            tasks: 0,
        });
        while self.completed_frameworks.len() > COMPLETED_FRAMEWORKS {
            self.completed_frameworks.pop_front();
        }
        match fw.link {
            FrameworkLink::Connected(conn) | FrameworkLink::Suppressed(conn) => {
                self.conns.remove(&conn);
            }
            FrameworkLink::Disconnected { deadline: Some(d) } => {
                self.failover_deadlines.remove(&(d, id.clone()));
            }
            FrameworkLink::Disconnected { deadline: None } => {}
        }
        for o in &self.offer_ids(&fw.offers) {
            self.take_offer(o);
        }
        self.allocator.remove_framework(id);
        self.demands.remove(id);
        self.removed_frameworks.insert(id.clone());
        let keys = self.framework_task_keys(id);
        let mut agents: BTreeSet<AgentId> = BTreeSet::new();
        for key in &keys {
            if let Some(task) = self.tasks.get_mut(key) {
                task.pending.clear();
                task.ahead = None;
                if !task.state.is_terminal() {
                    agents.insert(task.agent_id.clone());
                }
            }
        }
        for (agent_id, e) in self.executors.remove_framework(id) {
            self.free_executor_resources(now, &agent_id, id, &e);
            agents.insert(agent_id);
        }
        for agent in agents {
            if let Some(conn) = self.agents.get(&agent).and_then(Agent::conn) {
                info!(framework_id = %id, agent_id = %agent, "shutting down framework on agent");
                self.send_agent(conn, MasterToAgent::ShutdownFramework { framework_id: id.clone() });
            }
        }
        for key in &keys {
            self.maybe_complete(key);
        }
        self.request_allocation(now);
    }

    /// A framework's demand (its size was bounded by [`crate::validate::scheduler_call`];
    /// shapes are checked and rounded up to `--min-allocatable` here), with the tasks it is
    /// for when the framework names them.
    pub(super) fn request(
        &mut self,
        now: Instant,
        conn: ConnId,
        fw: &FrameworkId,
        mut demands: Vec<Demand>,
        task_ids: Vec<Vec<TaskId>>,
    ) {
        if let Err(e) = crate::validate::demands(&mut demands, &self.config.allocation.min_allocatable) {
            warn!(framework_id = %fw, message = %e, "invalid request");
            self.send_framework(
                conn,
                SchedulerEvent::Error(WireError::new(ErrorCode::Invalid, e.to_string())),
            );
            return;
        }
        debug!(framework_id = %fw, tasks = demands.iter().map(|d| u64::from(d.count)).sum::<u64>(), "demand stated");
        self.allocator.set_demand(fw, &demands);
        self.state_pending(fw, &demands, task_ids);
        self.request_allocation(now);
    }

    pub(super) fn framework_kill(&mut self, now: Instant, conn: ConnId, fw: &FrameworkId, task_id: TaskId) {
        let key = TaskKey::new(fw.clone(), task_id);
        let reply = match self.tasks.get(&key) {
            Some(t) if !t.state.is_terminal() => {
                self.kill_live_task(now, &key);
                None
            }
            Some(t) => Some(self.reconcile_status(now, t)),
            None => match self.completed.iter().rev().find(|t| t.key() == key) {
                Some(t) => Some(self.reconcile_status(now, t)),
                None => {
                    if self.recovering > 0 && self.pending_kills.len() < MAX_PENDING_KILLS {
                        // It may run on an agent that has not re-registered since the master
                        // restarted: the kill goes to whichever agent reports it.
                        self.pending_kills.insert(key.clone());
                    }
                    Some(self.unknown_task_status(now, &key, None))
                }
            },
        };
        if let Some(status) = reply {
            self.send_framework(conn, SchedulerEvent::Update(status));
        }
    }

    pub(super) fn acknowledge(&mut self, fw: &FrameworkId, agent_id: AgentId, task_id: TaskId, uuid: Uuid) {
        let key = TaskKey::new(fw.clone(), task_id);
        let agent_id = match self.tasks.get_mut(&key) {
            Some(task) => {
                task.pending.retain(|s| s.uuid != Some(uuid));
                task.agent_id.clone()
            }
            None => agent_id,
        };
        if let Some(conn) = self.agents.get(&agent_id).and_then(Agent::conn) {
            self.send_agent(
                conn,
                MasterToAgent::StatusAck { framework_id: fw.clone(), task_id: key.task_id.clone(), uuid },
            );
        }
        self.maybe_complete(&key);
    }

    /// Answers a reconciliation (Mesos `reconcileTasks`): implicit (empty list), every task
    /// of the framework the master knows; explicit, each task's latest state if the master
    /// knows it, else what can be said from its agent (see [`Self::unknown_task_status`]).
    pub(super) fn reconcile(
        &mut self,
        now: Instant,
        conn: ConnId,
        fw: &FrameworkId,
        tasks: Vec<ReconcileTask>,
    ) {
        let statuses: Vec<TaskStatus> = if tasks.is_empty() {
            self.framework_tasks(fw).map(|t| self.reconcile_status(now, t)).collect()
        } else {
            tasks
                .into_iter()
                .map(|t| {
                    let key = TaskKey::new(fw.clone(), t.task_id);
                    match self
                        .tasks
                        .get(&key)
                        .or_else(|| self.completed.iter().rev().find(|t| t.key() == key))
                    {
                        Some(t) => self.reconcile_status(now, t),
                        None => self.unknown_task_status(now, &key, t.agent_id),
                    }
                })
                .collect()
        };
        for s in statuses {
            self.send_framework(conn, SchedulerEvent::Update(s));
        }
    }

    /// The state of a task the master does not know, from what it knows of the agent the
    /// framework names: registered → TASK_GONE (the agent does not run it); unreachable, or
    /// not re-registered since the master restarted → TASK_UNREACHABLE (it may come back);
    /// removed → TASK_GONE; unknown → TASK_UNKNOWN. Without an agent: TASK_UNREACHABLE while
    /// agents are still re-registering after a restart (it may run on one), else
    /// TASK_UNKNOWN. Never TASK_LOST.
    pub(super) fn unknown_task_status(
        &self,
        now: Instant,
        key: &TaskKey,
        agent: Option<AgentId>,
    ) -> TaskStatus {
        let task = &key.task_id;
        let (state, reason, message) = match &agent {
            Some(a) => match self.agents.get(a).map(|a| a.status) {
                Some(AgentStatus::Active { .. } | AgentStatus::Disconnected) => (
                    TaskState::Gone,
                    Reason::ReconciliationTaskNotOnAgent,
                    format!("agent {a} is registered and does not run task {task}"),
                ),
                Some(AgentStatus::Unreachable) => (
                    TaskState::Unreachable,
                    Reason::ReconciliationAgentUnreachable,
                    format!("agent {a} of task {task} is unreachable"),
                ),
                Some(AgentStatus::Recovering) => (
                    TaskState::Unreachable,
                    Reason::AgentRecovering,
                    format!("agent {a} of task {task} has not re-registered since the master restarted"),
                ),
                None if self.gone_agents.contains_key(a) => (
                    TaskState::Gone,
                    Reason::ReconciliationAgentRemoved,
                    format!("agent {a} of task {task} was removed from the cluster"),
                ),
                None => (
                    TaskState::Unknown,
                    Reason::ReconciliationUnknownAgent,
                    format!("the master knows neither task {task} nor agent {a}"),
                ),
            },
            None if self.recovering > 0 => (
                TaskState::Unreachable,
                Reason::AgentRecovering,
                format!(
                    "task {task} is unknown; {} agent(s) have not re-registered since the master restarted",
                    self.recovering
                ),
            ),
            None => (
                TaskState::Unknown,
                Reason::ReconciliationUnknownTask,
                format!("framework {} has no task {task}", key.framework_id),
            ),
        };
        master_status(key, agent, state, reason, message, self.unix_ms(now))
    }
}
