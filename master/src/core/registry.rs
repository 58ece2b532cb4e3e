//! The core and its registry: state taken back from an earlier incarnation at start, and
//! the operations that keep the registry (frameworks, agents' standing, the policy) current.

use super::*;

impl Master {
    /// Loads what the registry of an earlier incarnation holds; call once, before any event.
    /// Frameworks are kept as disconnected (their failover timeout counts from `now`); agents
    /// that were admitted await re-registration until `agent_reregister_timeout`, those that
    /// were unreachable stay so, and gone ones are refused if they come back.
    pub fn recover(&mut self, now: Instant, state: &RegistryState) {
        self.recovered = true;
        if let Some(policy) = &state.policy {
            let set = crate::allocator::policy_options(policy, &self.config.allocation)
                .map_err(crate::allocator::PolicyError::from)
                .and_then(|o| self.allocator.set_options(&o).map(|()| o));
            match set {
                Ok(options) => {
                    info!(weights = %policy.weights, priorities = %policy.priorities, quotas = ?policy.quotas,
                        quota_limits = ?policy.quota_limits,
                        "allocation policy from the registry (set by an operator; it wins over the flags)");
                    self.config.allocation = options;
                    self.policy_from_registry = true;
                }
                Err(e) => {
                    warn!(error = %e, "the registry's allocation policy cannot be used: keeping the flags'")
                }
            }
        }
        for f in state.frameworks.values() {
            let deadline = now.checked_add(f.failover_timeout);
            info!(framework_id = %f.id, name = %f.name, "framework recovered from the registry: awaiting re-subscription");
            self.frameworks.insert(
                f.id.clone(),
                Framework {
                    id: f.id.clone(),
                    name: f.name.clone(),
                    role: f.role.clone(),
                    principal: f.principal.clone(),
                    hostname: f.hostname.clone(),
                    failover_timeout: f.failover_timeout,
                    // Told again when it re-subscribes.
                    user: None,
                    link: FrameworkLink::Disconnected { deadline },
                    offers: FxHashSet::default(),
                    filters: FxHashMap::default(),
                },
            );
            self.allocator.add_framework(&f.id, &f.role);
            self.allocator.deactivate_framework(&f.id);
            if let Some(d) = deadline {
                self.failover_deadlines.insert((d, f.id.clone()));
            }
        }
        for a in state.agents.values() {
            let status = match a.standing {
                AgentStanding::Gone { since_ms } => {
                    self.gone_agents.insert(a.id.clone(), since_ms);
                    continue;
                }
                AgentStanding::Admitted => AgentStatus::Recovering,
                AgentStanding::Unreachable { .. } => AgentStatus::Unreachable,
            };
            let mut agent = Agent::new(a.id.clone(), a.principal.clone());
            agent.hostname = a.hostname.clone();
            agent.total = a.resources.clone();
            agent.attributes = a.attributes.clone();
            agent.status = status;
            agent.standing = a.standing;
            self.agents.insert(a.id.clone(), agent);
            if let Some(drain) = &a.drain {
                self.recover_drain(now, &a.id, drain);
            }
            if status == AgentStatus::Recovering {
                self.recovering += 1;
                let deadline = after(now, self.config.agent_reregister_timeout);
                self.set_agent_deadline(&a.id, Some(deadline));
            }
        }
        info!(
            frameworks = state.frameworks.len(),
            agents = self.agents.len(),
            awaiting = self.recovering,
            gone = self.gone_agents.len(),
            "master state recovered from the registry"
        );
    }

    /// The next change for the registry. A driver writes every pending one (in order) before
    /// it carries out the actions of the same step: replies such as `Subscribed` and
    /// `Registered` promise what these changes record.
    pub fn poll_registry_op(&mut self) -> Option<RegistryOp> {
        self.registry_ops.pop_front()
    }

    pub(super) fn persist(&mut self, op: RegistryOp) {
        self.registry_ops.push_back(op);
    }

    pub(super) fn persist_framework(&mut self, id: &FrameworkId) {
        let Some(f) = self.frameworks.get(id) else { return };
        let record = FrameworkRecord {
            id: f.id.clone(),
            name: f.name.clone(),
            role: f.role.clone(),
            principal: f.principal.clone(),
            hostname: f.hostname.clone(),
            failover_timeout: f.failover_timeout,
        };
        self.persist(RegistryOp::PutFramework(record));
    }

    /// Records an agent with its new standing (and its drain).
    pub(super) fn persist_agent(&mut self, id: &AgentId, standing: AgentStanding) {
        let Some(a) = self.agents.get_mut(id) else { return };
        a.standing = standing;
        let record = AgentRecord {
            id: a.id.clone(),
            hostname: a.hostname.clone(),
            principal: a.principal.clone(),
            resources: a.total.clone(),
            attributes: a.attributes.clone(),
            standing,
            drain: a.drain.as_ref().map(|d| d.view.clone()),
        };
        self.persist(RegistryOp::PutAgent(record));
    }

    /// Records an agent again with its standing unchanged (its drain changed).
    pub(super) fn persist_agent_as_is(&mut self, id: &AgentId) {
        let Some(standing) = self.agents.get(id).map(|a| a.standing) else { return };
        self.persist_agent(id, standing);
    }
}
