//! Allocation driving: what the allocator is asked each cycle and how its decisions become
//! offers sent to frameworks.
//!
//! A cycle fixes its agents and their order when it starts (every agent the master knows, in
//! id order) and runs in slices of at most [`MasterConfig::allocation_slice`] of them, one slice
//! per `handle_timeout`, each slice's offers sent with it. Between slices the driver hands
//! the core whatever arrived (status updates, accepts, declines), so none waits behind more
//! than one slice. Each agent of the cycle is considered once, in its slice:
//!
//! - an agent that registers during a cycle is not in it: its registration asks for an
//!   allocation, which runs as the next cycle, once this one is over;
//! - an agent that is removed before its slice is skipped (its slot is checked by generation,
//!   so a slot reused by another agent is skipped too); whether an agent is connected and
//!   attached is read when its slice runs: one that disconnected is skipped, one that came
//!   back (same id, reconnected) is considered as it is then;
//! - what an agent has free is read when its slice runs, so resources freed by events between
//!   slices are offered in this cycle if the agent's slice is still to come.

use super::offers::offer_id_text;
use super::*;

/// An allocation cycle under way.
#[derive(Debug)]
pub(super) struct Cycle {
    /// `(slot, generation)` of every agent known when the cycle started, in id order.
    agents: Vec<(usize, u32)>,
    /// How many of `agents` the slices so far considered.
    done: usize,
    /// How many of those were connected (for the gauges, set when the cycle ends).
    active: usize,
    /// The instant of the last slice: the next one is due from then (at once).
    due: Instant,
}

impl Cycle {
    pub(super) fn due(&self) -> Instant {
        self.due
    }
}

impl Master {
    /// Starts a cycle: fixes its agents and their order (see the module's comment).
    pub(super) fn start_cycle(&mut self, now: Instant) {
        counter!(metrics::ALLOCATION_RUNS).increment(1);
        // Slots only: the records themselves are read slice by slice.
        let agents = self.agents.order_with_generations();
        gauge!(metrics::FRAMEWORKS_ACTIVE)
            .set(self.frameworks.values().filter(|f| f.conn().is_some()).count() as f64);
        gauge!(metrics::TASKS_KNOWN).set(self.tasks.len() as f64);
        if self.allocator.sliced() {
            self.allocator.begin_cycle(now);
        }
        self.cycle = Some(Cycle { agents, done: 0, active: 0, due: now });
    }

    /// Runs the next slice of the cycle under way (the whole cycle for an allocator that does
    /// not take slices), and ends the cycle after its last slice.
    pub(super) fn allocate_slice(&mut self, now: Instant) {
        let Some(mut cycle) = self.cycle.take() else { return };
        let sliced = self.allocator.sliced();
        let size = if sliced { self.config.allocation_slice.max(1) } else { usize::MAX };
        let start = cycle.done.min(cycle.agents.len());
        let end = start.saturating_add(size).min(cycle.agents.len());
        cycle.done = end;
        cycle.due = now;
        let mut candidates = Vec::with_capacity(end - start);
        // Agent slot of each candidate, in the same order.
        let mut candidate_slots: Vec<usize> = Vec::with_capacity(end - start);
        for &(slot, generation) in &cycle.agents[start..end] {
            if self.agents.generation(slot) != generation {
                continue;
            }
            let Some(a) = self.agents.at(slot) else { continue };
            if a.conn().is_none() {
                continue;
            }
            cycle.active += 1;
            if !a.attached {
                continue;
            }
            let available = a.available();
            if is_allocatable(&available, &self.config.allocation.min_allocatable) {
                candidates.push(Candidate { agent: &a.id, available });
                candidate_slots.push(slot);
            }
        }
        let frameworks = &self.frameworks;
        let agents = &self.agents;
        // Allocators ask about agents mostly in candidate order, passing the candidate's own
        // id: the agent is recognised by address at the cursor, else looked up by hash.
        let cursor = Cell::new(0usize);
        let eligible = |fw: &FrameworkId, agent: &AgentId, r: &Resources| {
            let Some(f) = frameworks.get(fw) else { return false };
            if f.conn().is_none() || f.suppressed() {
                return false;
            }
            if f.filters.is_empty() {
                return true;
            }
            let c = cursor.get();
            let at_cursor = [c, c + 1].into_iter().find_map(|i| {
                let slot = *candidate_slots.get(i)?;
                agents.at(slot).filter(|a| std::ptr::eq(&a.id, agent)).map(|_| (i, slot))
            });
            let slot = match at_cursor {
                Some((i, slot)) => {
                    cursor.set(i);
                    Some(slot)
                }
                None => agents.slot(agent),
            };
            !slot.is_some_and(|s| f.filtered(s, r, now))
        };
        let decisions = self.allocator.allocate(now, &candidates, &eligible);
        drop(candidates);
        if end < cycle.agents.len() {
            self.cycle = Some(cycle);
        } else {
            gauge!(metrics::AGENTS_ACTIVE).set(cycle.active as f64);
            gauge!(metrics::AGENTS_INACTIVE).set(self.agents.len().saturating_sub(cycle.active) as f64);
            if sliced {
                self.allocator.end_cycle();
            }
        }

        // One `Offers` event per framework, sent in framework id order. Frameworks are looked
        // up once per decision, and each batch is sized before it is filled.
        let fw_slots: Vec<Option<usize>> =
            decisions.iter().map(|d| self.frameworks.slot(&d.framework)).collect();
        let mut per_framework = vec![0u32; self.frameworks.slot_count()];
        for s in fw_slots.iter().flatten() {
            per_framework[*s] += 1;
        }
        const NO_BATCH: u32 = u32::MAX;
        let mut batch_of = vec![NO_BATCH; per_framework.len()];
        let mut batches: Vec<(usize, ConnId, Vec<Offer>)> = Vec::new();
        self.offers.reserve(decisions.len());
        let mut id_text = String::new();
        // Allocators decide agent by agent, mostly in candidate order: the agent of a decision
        // is looked for at the candidate cursor first (one id comparison), then by hash.
        let mut cursor = 0usize;
        for (d, fw_slot) in decisions.into_iter().zip(fw_slots) {
            let at_cursor = [cursor, cursor + 1].into_iter().find(|&i| {
                candidate_slots.get(i).and_then(|&s| self.agents.at(s)).is_some_and(|a| a.id == d.agent)
            });
            let agent_slot = match at_cursor {
                Some(i) => {
                    cursor = i;
                    candidate_slots.get(i).copied()
                }
                None => self.agents.slot(&d.agent),
            };
            let fw = fw_slot.and_then(|s| self.frameworks.at_mut(s));
            let conn = fw.as_deref().and_then(Framework::conn);
            let role_ok = fw.as_deref().is_some_and(|f| fits_role(&d.resources, &f.role));
            let worth = is_allocatable(&d.resources, &self.config.allocation.min_allocatable);
            // One lookup of the agent: connected, attached, and the decision fits what is
            // still free (earlier decisions of this cycle are already counted as offered).
            let agent = agent_slot.and_then(|s| self.agents.at_mut(s)).filter(|a| {
                a.conn().is_some() && a.attached && quick::contains(&a.available(), &d.resources)
            });
            let (Some(agent), Some(fw), Some(agent_slot), Some(fw_slot), true, Some(conn), true) =
                (agent, fw, agent_slot, fw_slot, role_ok, conn, worth)
            else {
                warn!(framework_id = %d.framework, agent_id = %d.agent, allocator = self.allocator.name(),
                    "allocator decision not applicable: ignored");
                self.allocator.recover(&d.framework, &d.agent, &d.resources);
                continue;
            };
            self.next_offer += 1;
            let n = self.next_offer;
            offer_id_text(&mut id_text, &self.config.master_id, n);
            let id = OfferId::new(id_text.as_str());
            agent.add_offer(n);
            quick::add_assign(&mut agent.offered, &d.resources);
            fw.offers.insert(n);
            if let Some(t) = self.config.offer_timeout {
                self.offer_deadlines.insert((after(now, t), id.clone()));
            }
            debug!(framework_id = %d.framework, agent_id = %d.agent, offer_id = %id, resources = %d.resources, "offer");
            self.offers.insert(
                n,
                OfferRecord { framework: fw_slot, agent: agent_slot, resources: d.resources.clone() },
            );
            let offer = Offer {
                id,
                framework_id: d.framework,
                agent_id: d.agent,
                hostname: agent.hostname.clone(),
                resources: d.resources,
                attributes: agent.attributes.clone(),
            };
            let batch = match batch_of[fw_slot] {
                NO_BATCH => {
                    batch_of[fw_slot] = batches.len() as u32;
                    batches.push((fw_slot, conn, Vec::with_capacity(per_framework[fw_slot] as usize)));
                    batches.len() - 1
                }
                b => b as usize,
            };
            batches[batch].2.push(offer);
        }
        let frameworks = &self.frameworks;
        batches.sort_unstable_by(|a, b| {
            let id = |slot: usize| frameworks.at(slot).map(|f| &f.id);
            id(a.0).cmp(&id(b.0))
        });
        for (_, conn, offers) in batches {
            counter!(metrics::OFFERS_SENT).increment(offers.len() as u64);
            // One event however many agents: the server splits one too large for a frame.
            self.send_framework(conn, SchedulerEvent::Offers(offers));
        }
        gauge!(metrics::OFFERS_OUTSTANDING).set(self.offers.len() as f64);
    }
}
