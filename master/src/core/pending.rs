//! Tasks that wait for resources: the demands frameworks stated (`Request`, `RequestTasks`),
//! shown to operators as pending with why they wait, computed against the agents' free
//! resources at the time of asking (a task that waits is otherwise invisible: it is no task
//! of the master's until it is launched).

use super::*;

/// A framework's stated demand, with the tasks it names per entry.
pub(super) type StatedDemand = Vec<(Demand, Vec<TaskId>)>;

impl Master {
    /// Keeps a framework's stated demand for the pending listing (bounded: at most each
    /// entry's count of ids, [`MAX_PENDING_IDS`] in all).
    pub(super) fn state_pending(
        &mut self,
        fw: &FrameworkId,
        demands: &[Demand],
        mut task_ids: Vec<Vec<TaskId>>,
    ) {
        let mut left = MAX_PENDING_IDS;
        task_ids.resize_with(demands.len(), Vec::new);
        let stated: StatedDemand = demands
            .iter()
            .zip(task_ids)
            .filter(|(d, _)| d.count > 0)
            .map(|(d, mut ids)| {
                ids.truncate((d.count as usize).min(left));
                left -= ids.len();
                (d.clone(), ids)
            })
            .collect();
        if stated.is_empty() {
            self.demands.remove(fw);
        } else {
            self.demands.insert(fw.clone(), stated);
        }
    }

    /// The tasks of stated demands that wait, by framework (at most [`MAX_PENDING_IDS`]
    /// entries): a named task once launched is no longer pending.
    pub fn pending_tasks(&self) -> Vec<PendingTaskView> {
        let mut fws: Vec<&FrameworkId> = self.demands.keys().collect();
        fws.sort();
        let mut out = Vec::new();
        for fw in fws {
            let (Some(f), Some(stated)) = (self.frameworks.get(fw), self.demands.get(fw)) else { continue };
            for (demand, ids) in stated {
                let reason = self.pending_reason(f, &demand.resources);
                let view = |task_id: Option<TaskId>, count: u32| PendingTaskView {
                    task_id,
                    count,
                    framework_id: fw.clone(),
                    framework_name: f.name.clone(),
                    role: f.role.clone(),
                    resources: demand.resources.clone(),
                    reason: reason.clone(),
                };
                let waiting: Vec<&TaskId> = ids
                    .iter()
                    .filter(|id| !self.tasks.contains_key(&TaskKey::new(fw.clone(), (*id).clone())))
                    .collect();
                for id in &waiting {
                    out.push(view(Some((*id).clone()), 1));
                }
                let unnamed = demand.count.saturating_sub(u32::try_from(ids.len()).unwrap_or(u32::MAX));
                if unnamed > 0 {
                    out.push(view(None, unnamed));
                }
                if out.len() >= MAX_PENDING_IDS {
                    out.truncate(MAX_PENDING_IDS);
                    return out;
                }
            }
        }
        out
    }

    /// Why a task of `need` of framework `f` waits, in one line starting `waiting: `.
    fn pending_reason(&self, f: &Framework, need: &Resources) -> String {
        let offered_here =
            f.offers.iter().any(|n| self.offers.get(n).is_some_and(|o| o.resources.contains(need)));
        if offered_here {
            return "waiting: offered to its framework, not launched yet".into();
        }
        if f.conn().is_none() {
            return "waiting: its framework is disconnected".into();
        }
        if f.suppressed() {
            return "waiting: its framework suppressed its offers".into();
        }
        let up: Vec<&Agent> = self
            .agents
            .values()
            .filter(|a| matches!(a.status, AgentStatus::Active { .. }) && a.attached && a.drain.is_none())
            .collect();
        if up.is_empty() {
            return "waiting: no agent takes tasks (none registered, or all draining)".into();
        }
        let free: Vec<Resources> =
            up.iter().map(|a| a.total.saturating_sub(&a.used).for_role(&f.role)).collect();
        let short: Vec<String> = kinds_of(need)
            .into_iter()
            .filter(|part| !free.iter().any(|r| r.contains(part)))
            .map(|part| {
                let largest = free.iter().map(|r| project(r, &part)).max_by_key(amount).unwrap_or_default();
                format!("needs {}, largest free {}", part, shown(&largest, &part))
            })
            .collect();
        if !short.is_empty() {
            return format!("waiting: {}", short.join("; "));
        }
        if !free.iter().any(|r| r.contains(need)) {
            return format!("waiting: needs {need} on one agent; no agent has all of it free");
        }
        let unoffered = up.iter().any(|a| {
            a.total.saturating_sub(&a.used).saturating_sub(&a.offered).for_role(&f.role).contains(need)
        });
        if !unoffered {
            return "waiting: the free resources are held in offers to other frameworks".into();
        }
        if let Some(limit) = self.config.allocation.quota_limits.get(&f.role) {
            let mut held = Resources::default();
            for g in self.frameworks.values().filter(|g| g.role == f.role) {
                for t in self.framework_tasks(&g.id).filter(|t| !t.state.is_terminal()) {
                    held.add_assign(&t.info.resources);
                }
            }
            let after = held.add(need).flatten();
            if after.capped_by(limit, &limit.kinds()) != after {
                return format!(
                    "waiting: role {} would exceed its quota limit {limit} (it holds {held})",
                    f.role
                );
            }
        }
        "waiting: resources are free; the next allocation offers them".into()
    }
}

/// `need` split into one part per kind (cpus, mem, disk, ports, each custom scalar).
fn kinds_of(need: &Resources) -> Vec<Resources> {
    let mut parts = Vec::new();
    let one = |f: &dyn Fn(&mut Resources)| {
        let mut r = Resources::default();
        f(&mut r);
        r
    };
    if need.cpus > 0 {
        parts.push(one(&|r| r.cpus = need.cpus));
    }
    if need.mem > 0 {
        parts.push(one(&|r| r.mem = need.mem));
    }
    if need.disk > 0 {
        parts.push(one(&|r| r.disk = need.disk));
    }
    if !need.ports.is_empty() {
        parts.push(one(&|r| r.ports = need.ports.clone()));
    }
    for (k, v) in need.scalars.iter().filter(|(_, v)| **v > 0) {
        parts.push(one(&|r| {
            r.scalars.insert(k.clone(), *v);
        }));
    }
    parts
}

/// The kinds of `r` that `like` has.
fn project(r: &Resources, like: &Resources) -> Resources {
    let flat = r.flatten();
    Resources {
        cpus: if like.cpus > 0 { flat.cpus } else { 0 },
        mem: if like.mem > 0 { flat.mem } else { 0 },
        disk: if like.disk > 0 { flat.disk } else { 0 },
        ports: if like.ports.is_empty() { Vec::new() } else { flat.ports.clone() },
        scalars: flat.scalars.into_iter().filter(|(k, _)| like.scalars.contains_key(k)).collect(),
        reserved: BTreeMap::new(),
    }
}

/// How much of its one kind a projection holds (to pick the largest).
fn amount(r: &Resources) -> u64 {
    let ports: u64 = r.ports.iter().map(|p| u64::from(p.end.saturating_sub(p.begin)) + 1).sum();
    r.cpus + r.mem + r.disk + ports + r.scalars.values().sum::<u64>()
}

/// `largest` as text, `cpus:0` rather than nothing when none is free.
fn shown(largest: &Resources, part: &Resources) -> String {
    if !largest.is_empty() {
        return largest.to_string();
    }
    let kind = part.to_string();
    let name = kind.split(':').next().unwrap_or("none");
    format!("{name}:0")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(s: &str) -> Resources {
        Resources::parse(s).expect("resources")
    }

    #[test]
    fn parts_and_largest_free_read_as_the_issue_writes_them() {
        let need = res("cpus:0.5;mem:64MiB;gpus:1");
        let parts: Vec<String> = kinds_of(&need).iter().map(ToString::to_string).collect();
        assert_eq!(parts, ["cpus:0.5", "mem:64MiB", "gpus:1"]);
        let free = [res("cpus:0.2;mem:1GiB"), res("cpus:0.1;mem:2GiB")];
        let cpus = &kinds_of(&need)[0];
        let largest = free.iter().map(|r| project(r, cpus)).max_by_key(amount).unwrap_or_default();
        assert_eq!(shown(&largest, cpus), "cpus:0.2");
        let gpus = &kinds_of(&need)[2];
        let none = free.iter().map(|r| project(r, gpus)).max_by_key(amount).unwrap_or_default();
        assert_eq!(shown(&none, gpus), "gpus:0");
    }
}
