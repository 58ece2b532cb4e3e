//! Offers: their ids, rescinding them, decline filters, and what a framework does with one
//! (`Accept` with its launch validation, `Decline`).

use super::*;

impl Master {
    pub(super) fn recompute_offered(&mut self, agent: usize) {
        let Some(a) = self.agents.at(agent) else { return };
        let mut offered = Resources::default();
        for o in a.offers.iter().filter_map(|n| self.offers.get(n)) {
            offered.add_assign(&o.resources);
        }
        if let Some(a) = self.agents.at_mut(agent) {
            a.offered = offered;
        }
    }

    /// The number of one of this master's offer ids (`{master_id}-O{n}`, `n` written without
    /// leading zeros), if it is one.
    pub(super) fn offer_no(&self, id: &OfferId) -> Option<u64> {
        let digits = id.as_str().strip_prefix(self.config.master_id.as_str())?.strip_prefix("-O")?;
        if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    }

    /// An outstanding offer by id.
    pub(super) fn offer(&self, id: &OfferId) -> Option<&OfferRecord> {
        self.offers.get(&self.offer_no(id)?)
    }

    /// The ids of these offer numbers, sorted by id.
    pub(super) fn offer_ids<'a>(&self, numbers: impl IntoIterator<Item = &'a u64>) -> Vec<OfferId> {
        let mut text = String::new();
        let mut ids: Vec<OfferId> = numbers
            .into_iter()
            .map(|n| {
                offer_id_text(&mut text, &self.config.master_id, *n);
                OfferId::new(text.as_str())
            })
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Forgets an offer (no allocator call, no message). Returns it if it was outstanding.
    pub(super) fn take_offer(&mut self, offer_id: &OfferId) -> Option<OfferRecord> {
        let n = self.offer_no(offer_id)?;
        let offer = self.offers.remove(&n)?;
        if let Some(agent) = self.agents.at_mut(offer.agent) {
            agent.remove_offer(n);
        }
        if let Some(fw) = self.frameworks.at_mut(offer.framework) {
            fw.offers.remove(&n);
        }
        self.recompute_offered(offer.agent);
        Some(offer)
    }

    /// Takes an offer back: its resources return to the allocator; with `notify`, the holder
    /// is told (`Rescind`) if connected.
    pub(super) fn rescind_offer(&mut self, offer_id: &OfferId, notify: bool) {
        let Some(offer) = self.take_offer(offer_id) else { return };
        if let (Some(f), Some(a)) = (self.frameworks.at(offer.framework), self.agents.at(offer.agent)) {
            self.allocator.recover(&f.id, &a.id, &offer.resources);
        }
        if notify {
            counter!(metrics::OFFERS_RESCINDED).increment(1);
            if let Some(conn) = self.frameworks.at(offer.framework).and_then(Framework::conn) {
                self.send_framework(conn, SchedulerEvent::Rescind { offer_id: offer_id.clone() });
            }
        }
    }

    pub(super) fn rescind_agent_offers(&mut self, agent_id: &AgentId) {
        let ids = match self.agents.get(agent_id) {
            Some(a) => self.offer_ids(&a.offers),
            None => Vec::new(),
        };
        for id in ids {
            self.rescind_offer(&id, true);
        }
    }

    /// Filters `resources` on agent slot `agent` from framework slot `fw` for `d`.
    pub(super) fn add_filter(
        &mut self,
        now: Instant,
        fw: usize,
        agent: usize,
        resources: Resources,
        d: Duration,
    ) {
        if d.is_zero() || resources.is_empty() {
            return;
        }
        let generation = self.frameworks.generation(fw);
        let Some(f) = self.frameworks.at_mut(fw) else { return };
        let expires = after(now, d);
        f.filters.entry(agent).or_default().push(Filter { resources, expires });
        self.filter_expiries.entry(expires).or_default().push((fw, generation, agent));
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn accept(
        &mut self,
        now: Instant,
        conn: ConnId,
        fw: &FrameworkId,
        offer_ids: Vec<OfferId>,
        operations: Vec<Operation>,
        refuse_seconds: Option<f64>,
    ) {
        let tasks: Vec<TaskInfo> = operations
            .into_iter()
            .flat_map(|op| match op {
                Operation::Launch { tasks } => tasks,
            })
            .collect();
        // Every offer must be outstanding, held by this framework and on one agent.
        let mut problem: Option<String> = None;
        let mut seen: HashSet<&OfferId> = HashSet::new();
        let fw_slot = self.frameworks.slot(fw);
        let mut agent: Option<usize> = None;
        if offer_ids.is_empty() {
            problem = Some("the call names no offer".to_string());
        }
        for id in &offer_ids {
            let why = match self.offer(id) {
                None => Some(format!("offer {id} is not outstanding (used, declined or rescinded)")),
                Some(o) if Some(o.framework) != fw_slot => {
                    Some(format!("offer {id} is not held by framework {fw}"))
                }
                Some(_) if !seen.insert(id) => Some(format!("offer {id} is named twice")),
                Some(o) => match agent {
                    Some(a) if a != o.agent => Some(format!(
                        "offer {id} is on agent {} but an earlier one on {}",
                        name(self.agents.at(o.agent).map(|x| &x.id)),
                        name(self.agents.at(a).map(|x| &x.id))
                    )),
                    _ => {
                        agent = Some(o.agent);
                        None
                    }
                },
            };
            if problem.is_none() {
                problem = why;
            }
        }
        let agent = agent.and_then(|a| self.agents.at(a)).map(|a| a.id.clone());
        let held: Vec<OfferId> = offer_ids
            .iter()
            .filter(|id| self.offer(id).is_some_and(|o| Some(o.framework) == fw_slot))
            .cloned()
            .collect();
        let problem = match (problem, &agent) {
            (Some(p), _) => Some(p),
            (None, None) => Some("the call names no offer".to_string()),
            (None, Some(_)) => None,
        };
        if let Some(problem) = problem {
            warn!(framework_id = %fw, problem, "accept with invalid offers");
            for id in &held {
                self.rescind_offer(id, false);
            }
            let ts = self.unix_ms(now);
            for t in tasks {
                counter!(metrics::TASKS_INVALID).increment(1);
                let key = TaskKey::new(fw.clone(), t.task_id.clone());
                let status = master_status(
                    &key,
                    None,
                    TaskState::Dropped,
                    Reason::OfferNoLongerValid,
                    problem.clone(),
                    ts,
                );
                self.send_framework(conn, SchedulerEvent::Update(status));
            }
            self.request_allocation(now);
            return;
        }
        let Some(agent_id) = agent else { return };
        counter!(metrics::OFFERS_ACCEPTED).increment(held.len() as u64);
        let mut remaining = Resources::default();
        for id in &held {
            if let Some(o) = self.take_offer(id) {
                remaining.add_assign(&o.resources);
            }
        }
        let agent_conn = self.agents.get(&agent_id).and_then(Agent::conn);
        let role = self.frameworks.get(fw).map(|f| f.role.clone()).unwrap_or_else(|| "*".into());
        let ts = self.unix_ms(now);
        let mut in_call: HashSet<TaskId> = HashSet::new();
        // The executor each framework executor id names in this call (the first valid one).
        let mut call_executors: HashMap<ExecutorId, ExecutorInfo> = HashMap::new();
        let offered = self.agents.get(&agent_id).map(|a| a.total.clone()).unwrap_or_default();
        for mut task in tasks {
            let checked = crate::validate::task(&mut task, &offered, self.config.max_kill_grace);
            let user_problem = self.check_task_user(fw, &mut task).err();
            let key = TaskKey::new(fw.clone(), task.task_id.clone());
            let tid = &task.task_id;
            let duplicate = !in_call.insert(tid.clone());
            let problem = if let Err(p) = checked {
                Some(p.to_string())
            } else if duplicate {
                Some(format!("task {tid} appears twice in this call"))
            } else if self.tasks.contains_key(&key) {
                Some(format!("task {tid} already exists in framework {fw}"))
            } else if let Some(problem) = kind_problem(&task, &self.known_artifacts) {
                Some(problem)
            } else if agent_conn.is_none() {
                Some(format!("agent {agent_id} is not connected"))
            } else if !task.resources.reserved.is_empty() {
                Some(format!("task {tid} names reserved resources; ask for plain quantities"))
            } else if let Some(e) = user_problem {
                Some(format!("task {tid}: {}", e.message))
            } else {
                None
            };
            // A framework's own executor: the same ExecutorInfo as the one running there (or
            // named earlier in this call); a new one takes its resources with the task's.
            let executor = match &task.kind {
                TaskKind::Executor(e) => Some(&e.executor),
                _ => None,
            };
            // One process per user: a user without one takes the executor's resources again.
            let running = executor
                .and_then(|e| self.executors.get(&agent_id, fw, &e.executor_id, task.user.as_deref()));
            let problem = problem.or_else(|| {
                let e = executor?;
                let earlier = running
                    .or_else(|| self.executors.users_of(&agent_id, fw, &e.executor_id).next())
                    .map(|r| &r.info)
                    .or_else(|| call_executors.get(&e.executor_id));
                match earlier {
                    Some(earlier) => executors::mismatch_problem(tid, &agent_id, e, earlier),
                    None => {
                        call_executors.insert(e.executor_id.clone(), e.clone());
                        None
                    }
                }
            });
            let new_executor = executor.filter(|_| running.is_none());
            let fit = remaining.take_for_role(&role, &task.resources).and_then(|a| {
                let Some(e) = new_executor else { return Some((a, None)) };
                let x = remaining.saturating_sub(&a).take_for_role(&role, &e.resources)?;
                Some((a, Some(x)))
            });
            let problem = problem.or_else(|| match (&fit, new_executor) {
                (Some(_), _) => None,
                (None, None) => Some(format!(
                    "task {tid} asks for {} but the offer has {} left",
                    task.resources, remaining
                )),
                (None, Some(e)) => Some(format!(
                    "task {tid} asks for {} and its new executor {} for {} but the offer has {} left",
                    task.resources, e.executor_id, e.resources, remaining
                )),
            });
            if let Some(problem) = problem {
                warn!(framework_id = %fw, task_id = %tid, agent_id = %agent_id, problem, "invalid launch");
                counter!(metrics::TASKS_INVALID).increment(1);
                let status = master_status(
                    &key,
                    Some(agent_id.clone()),
                    TaskState::Error,
                    Reason::InvalidLaunch,
                    problem,
                    ts,
                );
                self.send_framework(conn, SchedulerEvent::Update(status));
                continue;
            }
            // Served from the role's reservation first, then the unreserved part.
            let Some((allocation, executor_allocation)) = fit else { continue };
            remaining = remaining.saturating_sub(&allocation);
            if let (Some(e), Some(x)) = (new_executor, executor_allocation) {
                remaining = remaining.saturating_sub(&x);
                info!(framework_id = %fw, executor_id = %e.executor_id, agent_id = %agent_id, user = ?task.user, resources = %e.resources, "launching executor");
                if let Some(a) = self.agents.get_mut(&agent_id) {
                    a.used.add_assign(&x);
                }
                let record = ExecutorRecord { info: e.clone(), allocation: x };
                self.executors.insert(&agent_id, fw, task.user.clone(), record);
            }
            info!(framework_id = %fw, task_id = %tid, agent_id = %agent_id, resources = %task.resources, "launching task");
            counter!(metrics::TASKS_LAUNCHED).increment(1);
            let mut record = Task {
                info: task.clone(),
                framework_id: fw.clone(),
                agent_id: agent_id.clone(),
                state: TaskState::Staging,
                allocation: allocation.clone(),
                latest: None,
                pending: Vec::new(),
                kill_requested: false,
                history: Default::default(),
                kill_reason: None,
                ahead: None,
            };
            record.record(TaskState::Staging, &Reason::Launched, self.unix_ms(now));
            self.tasks.insert(key.clone(), record);
            if let Some(a) = self.agents.get_mut(&agent_id) {
                a.tasks.insert(key);
                a.used.add_assign(&allocation);
            }
            if let Some(c) = agent_conn {
                self.send_agent(c, MasterToAgent::RunTask { framework_id: fw.clone(), task });
            }
        }
        if !remaining.is_empty() {
            self.allocator.recover(fw, &agent_id, &remaining);
            if refuse_seconds.is_some() {
                let d = refuse_duration(refuse_seconds, Duration::ZERO);
                if let (Some(f), Some(a)) = (self.frameworks.slot(fw), self.agents.slot(&agent_id)) {
                    self.add_filter(now, f, a, remaining, d);
                }
            }
        }
        self.request_allocation(now);
    }

    pub(super) fn decline(
        &mut self,
        now: Instant,
        fw: &FrameworkId,
        offer_ids: Vec<OfferId>,
        refuse_seconds: Option<f64>,
    ) {
        let d = refuse_duration(refuse_seconds, self.config.default_refuse);
        let fw_slot = self.frameworks.slot(fw);
        for id in offer_ids {
            if self.offer(&id).is_none_or(|o| Some(o.framework) != fw_slot) {
                debug!(framework_id = %fw, offer_id = %id, "decline of an offer not held: ignored");
                continue;
            }
            let Some(offer) = self.take_offer(&id) else { continue };
            let Some(agent) = self.agents.at(offer.agent) else { continue };
            counter!(metrics::OFFERS_DECLINED).increment(1);
            debug!(framework_id = %fw, offer_id = %id, agent_id = %agent.id, refuse = ?d, "offer declined");
            self.allocator.recover(fw, &agent.id, &offer.resources);
            self.add_filter(now, offer.framework, offer.agent, offer.resources, d);
        }
        self.request_allocation(now);
    }
}

/// Writes `{master}-O{n}` (an offer id) into `out` without the formatting machinery.
impl Master {
    /// Fills in a task's effective OS user (its own, else its framework's) and checks it
    /// against the framework principal's ACL grants. The agent gets the effective user.
    fn check_task_user(&self, fw: &FrameworkId, task: &mut TaskInfo) -> Result<(), WireError> {
        let Some(f) = self.frameworks.get(fw) else { return Ok(()) };
        if task.user.is_none() {
            task.user = f.user.clone();
        }
        if let (Some(acls), Some(user)) = (&self.config.acls, &task.user) {
            if let Err(e) = acls.check_task_user(&f.principal, user) {
                counter!(metrics::ACL_DENIALS).increment(1);
                return Err(e);
            }
        }
        if task.user.as_ref().is_some_and(|u| u.is_empty() || u.len() > 64) {
            return Err(WireError::new(ErrorCode::Invalid, "a task user must be 1 to 64 characters"));
        }
        Ok(())
    }
}

pub(super) fn offer_id_text(out: &mut String, master: &str, n: u64) {
    out.clear();
    out.push_str(master);
    out.push_str("-O");
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[i..] {
        out.push(char::from(d));
    }
}

/// What is wrong with a task's executor-specific part, if anything. `known` holds the digests
/// of the artifact store.
fn kind_problem(task: &TaskInfo, known: &FxHashSet<Digest>) -> Option<String> {
    let tid = &task.task_id;
    match &task.kind {
        TaskKind::Command(c) if c.argv.first().is_none_or(|a| a.is_empty()) => {
            Some(format!("task {tid} has an empty command"))
        }
        TaskKind::Command(_) => None,
        TaskKind::Executor(t) => executors::executor_task_problem(tid, t, known),
        TaskKind::Wasm(w) => {
            if let Some(bad) = std::iter::once(&w.module.digest)
                .chain(w.dirs.iter().map(|d| &d.archive.digest))
                .find(|d| !d.is_valid())
            {
                Some(format!("task {tid} names a malformed artifact digest `{bad}`"))
            } else if w.args.is_empty() {
                Some(format!("task {tid} has no argv[0]"))
            } else if !known.contains(&w.module.digest) {
                Some(format!(
                    "task {tid}: module {} is not in the master's artifact store; upload it first",
                    w.module.digest
                ))
            } else if let Some(d) = w.dirs.iter().find(|d| !known.contains(&d.archive.digest)) {
                Some(format!(
                    "task {tid}: archive {} for directory `{}` is not in the master's artifact store; \
                     upload it first",
                    d.archive.digest, d.guest
                ))
            } else {
                w.dirs
                    .iter()
                    .find(|d| !d.guest.starts_with('/') || d.guest.contains('\0'))
                    .map(|d| format!("task {tid}: guest directory `{}` must be an absolute path", d.guest))
            }
        }
    }
}
