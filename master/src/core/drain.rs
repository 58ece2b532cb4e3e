//! Drains: an operator takes an agent out of service (`agora agent drain`, Nomad's `node
//! drain`, Mesos's maintenance). The agent gets no new offers (its outstanding ones are
//! rescinded and it leaves the allocator), every framework is told with the deadline so that
//! a scheduler can move its work, and at the deadline the tasks still running on it are
//! killed with reason [`Reason::AgentDrained`] (unless the operator chose not to kill). The
//! drain is kept in the agent's registry record, so a restarted master or a new leader keeps
//! draining it, with the same deadline.

use super::*;
use crate::state::Drain;

impl Master {
    /// Drains an agent (an operator's `DrainAgent`); draining it again replaces the deadline
    /// and `kill`. A deadline above [`MAX_DRAIN_DEADLINE`] is refused; an unknown agent is
    /// `NotFound`. The change is queued for the registry: the driver answers once it is written.
    pub fn drain_agent(
        &mut self,
        now: Instant,
        id: &AgentId,
        deadline: Option<Duration>,
        kill: bool,
    ) -> Result<(), WireError> {
        if let Some(d) = deadline.filter(|d| *d > MAX_DRAIN_DEADLINE) {
            return Err(WireError::new(
                ErrorCode::Invalid,
                format!(
                    "a drain deadline of {}s is too long: at most {} days",
                    d.as_secs(),
                    MAX_DRAIN_DEADLINE.as_secs() / 86_400
                ),
            ));
        }
        if !self.agents.contains_key(id) {
            return Err(WireError::new(ErrorCode::NotFound, format!("no agent {id}")));
        }
        let deadline_unix_ms = deadline
            .map(|d| self.unix_ms(now).saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)));
        let view = DrainView { deadline_unix_ms, kill };
        info!(agent_id = %id, ?deadline, kill, "draining agent");
        self.start_drain(now, id, deadline.map(|d| after(now, d)), view);
        self.persist_agent_as_is(id);
        Ok(())
    }

    /// Ends an agent's drain (an operator's `UndrainAgent`): it is offered again and
    /// frameworks are told. `Ok` when it was not draining; an unknown agent is `NotFound`.
    pub fn undrain_agent(&mut self, now: Instant, id: &AgentId) -> Result<(), WireError> {
        let Some(agent) = self.agents.get_mut(id) else {
            return Err(WireError::new(ErrorCode::NotFound, format!("no agent {id}")));
        };
        let Some(drain) = agent.drain.take() else { return Ok(()) };
        let status = agent.status;
        info!(agent_id = %id, "drain of agent called off");
        if let Some(d) = drain.deadline {
            self.drain_deadlines.remove(&(d, id.clone()));
        }
        // Back into the allocator if it was there before the drain took it out (registered
        // with this master); others join when they register again.
        if matches!(status, AgentStatus::Active { .. } | AgentStatus::Disconnected) {
            self.attach_agent(id);
        }
        self.persist_agent_as_is(id);
        self.tell_frameworks(SchedulerEvent::AgentUndrained { agent_id: id.clone() });
        self.request_allocation(now);
        Ok(())
    }

    /// Puts an agent under `view`'s drain: out of the allocator, its offers rescinded, every
    /// framework told; its tasks are killed at `deadline` (if `view.kill`).
    pub(super) fn start_drain(
        &mut self,
        now: Instant,
        id: &AgentId,
        deadline: Option<Instant>,
        view: DrainView,
    ) {
        let Some(agent) = self.agents.get_mut(id) else { return };
        let old = agent.drain.replace(Drain { deadline, view: view.clone() });
        if let Some(d) = old.and_then(|o| o.deadline) {
            self.drain_deadlines.remove(&(d, id.clone()));
        }
        if let Some(d) = deadline {
            self.drain_deadlines.insert((d, id.clone()));
        }
        self.rescind_agent_offers(id);
        self.detach_agent(id);
        self.tell_frameworks(SchedulerEvent::AgentDraining {
            agent_id: id.clone(),
            deadline_unix_ms: view.deadline_unix_ms,
        });
        self.request_allocation(now);
    }

    /// Runs the drain deadlines due at `now`.
    pub(super) fn drain_deadlines_due(&mut self, now: Instant) {
        while let Some((t, id)) = self.drain_deadlines.first().cloned() {
            if t > now {
                break;
            }
            self.drain_deadlines.remove(&(t, id.clone()));
            let kill = self.agents.get(&id).and_then(|a| a.drain.as_ref()).is_some_and(|d| d.view.kill);
            info!(agent_id = %id, kill, "drain deadline passed");
            if kill {
                self.kill_drained_tasks(now, &id);
            }
        }
    }

    /// Kills the live tasks of an agent whose drain deadline passed (and whose drain kills):
    /// at the deadline, and for the tasks it reports when it registers again after it.
    pub(super) fn kill_drained_tasks_if_due(&mut self, now: Instant, id: &AgentId) {
        let due = self
            .agents
            .get(id)
            .and_then(|a| a.drain.as_ref())
            .is_some_and(|d| d.view.kill && d.deadline.is_some_and(|t| t <= now));
        if due {
            self.kill_drained_tasks(now, id);
        }
    }

    fn kill_drained_tasks(&mut self, now: Instant, id: &AgentId) {
        let live: Vec<TaskKey> = self
            .agents
            .get(id)
            .map(|a| self.live_tasks(a.tasks.iter()).map(Task::key).collect())
            .unwrap_or_default();
        for key in live {
            if let Some(task) = self.tasks.get_mut(&key) {
                task.kill_reason = Some(Reason::AgentDrained);
            }
            self.kill_live_task(now, &key);
        }
    }

    /// Tells a framework that just subscribed which agents drain.
    pub(super) fn tell_drains(&mut self, conn: ConnId) {
        let events: Vec<SchedulerEvent> = self
            .agents
            .values()
            .filter_map(|a| {
                let d = a.drain.as_ref()?;
                Some(SchedulerEvent::AgentDraining {
                    agent_id: a.id.clone(),
                    deadline_unix_ms: d.view.deadline_unix_ms,
                })
            })
            .collect();
        for event in events {
            self.send_framework(conn, event);
        }
    }

    /// Sends `event` to every connected framework.
    fn tell_frameworks(&mut self, event: SchedulerEvent) {
        let conns: Vec<ConnId> = self.frameworks.values().filter_map(Framework::conn).collect();
        for conn in conns {
            self.send_framework(conn, event.clone());
        }
    }

    /// Takes back the drain an agent's registry record holds (after a restart or failover),
    /// its deadline counted from the wall clock.
    pub(super) fn recover_drain(&mut self, now: Instant, id: &AgentId, view: &DrainView) {
        let deadline = view.deadline_unix_ms.map(|ms| {
            let left = ms.saturating_sub(self.unix_ms(now));
            after(now, Duration::from_millis(left))
        });
        info!(agent_id = %id, deadline_unix_ms = ?view.deadline_unix_ms, kill = view.kill, "agent drain recovered from the registry");
        if let Some(agent) = self.agents.get_mut(id) {
            agent.drain = Some(Drain { deadline, view: view.clone() });
        }
        if let Some(d) = deadline {
            self.drain_deadlines.insert((d, id.clone()));
        }
    }

    /// The status an operator sees: `draining` / `drained` (no live task left) for an active
    /// agent under a drain, else its connection status.
    pub(super) fn agent_status(&self, a: &Agent) -> AgentViewStatus {
        match (&a.drain, a.status) {
            (Some(_), AgentStatus::Active { .. }) => {
                if self.live_tasks(a.tasks.iter()).next().is_some() {
                    AgentViewStatus::Draining
                } else {
                    AgentViewStatus::Drained
                }
            }
            (_, status) => status.view(),
        }
    }
}
