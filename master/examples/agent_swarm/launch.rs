//! The frameworks: real SDK scheduler drivers over QUIC. One launcher runs `L` small tasks on
//! the emulated agents, at most `in_flight` at a time, each on its own held offer, and times
//! ACCEPT → first TASK_RUNNING and → TASK_FINISHED; the others (`--frameworks` minus one)
//! decline every offer with a filter, as idle frameworks of a shared cluster do.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agora_sdk::proto::*;
use agora_sdk::scheduler::{Driver, Scheduler};
use agora_sdk::Resources;

/// How long an idle framework's decline keeps an agent from it.
pub const IDLE_REFUSE_SECONDS: f64 = 30.0;
/// The launcher's decline of an offer it cannot use (a filter, so that the master does not
/// offer it straight back in a loop).
const EXCESS_REFUSE_SECONDS: f64 = 5.0;
/// Offers the launcher holds at most (the rest are declined without a filter).
const MAX_HELD: usize = 4096;

/// The launcher's outcome.
#[derive(Debug, Default)]
pub struct Launched {
    pub to_running: Vec<Duration>,
    pub to_finished: Vec<Duration>,
    /// Tasks that ended other than TASK_FINISHED.
    pub failed: usize,
    pub elapsed: Duration,
    /// Offers received, subscriptions (a reconnection subscribes again) and errors the master
    /// sent: where a run that launched nothing went wrong.
    pub offers: usize,
    pub subscriptions: usize,
    pub errors: usize,
}

/// Launches `total` tasks, `in_flight` at most at a time.
pub struct Launcher {
    total: usize,
    in_flight_max: usize,
    next: usize,
    in_flight: usize,
    held: Vec<Offer>,
    sent: HashMap<TaskId, Instant>,
    running: std::collections::HashSet<TaskId>,
    started: Option<Instant>,
    pub out: Launched,
}

impl Launcher {
    pub fn new(total: usize, in_flight_max: usize) -> Self {
        Launcher {
            total,
            in_flight_max: in_flight_max.max(1),
            next: 0,
            in_flight: 0,
            held: Vec::new(),
            sent: HashMap::new(),
            running: Default::default(),
            started: None,
            out: Launched::default(),
        }
    }

    fn task(i: usize) -> TaskInfo {
        TaskInfo {
            task_id: TaskId(format!("swarm-{i}")),
            name: "emulated".into(),
            resources: Resources { cpus: 100, mem: 32 << 20, ..Default::default() },
            kind: TaskKind::Command(CommandInfo { argv: vec!["true".into()], shell: false, env: vec![] }),
            kill_grace: None,
            user: None,
        }
    }

    fn pump(&mut self, driver: &Driver) {
        if self.total == 0 {
            driver.stop(true);
            return;
        }
        while self.next < self.total && self.in_flight < self.in_flight_max {
            let Some(offer) = self.held.pop() else { return };
            let t = Self::task(self.next);
            if offer.resources.checked_sub(&t.resources).is_none() {
                driver.decline(vec![offer.id], Some(EXCESS_REFUSE_SECONDS));
                continue;
            }
            self.next += 1;
            self.in_flight += 1;
            self.sent.insert(t.task_id.clone(), Instant::now());
            driver.launch(vec![offer.id], vec![t]);
        }
    }
}

impl Scheduler for Launcher {
    async fn registered(&mut self, _driver: &Driver, _framework_id: &FrameworkId) {
        self.out.subscriptions += 1;
    }

    async fn reregistered(&mut self, _driver: &Driver, _framework_id: &FrameworkId) {
        self.out.subscriptions += 1;
    }

    async fn error(&mut self, _driver: &Driver, error: &WireError) {
        self.out.errors += 1;
        eprintln!("  launcher: master error {}", error.message);
    }

    async fn resource_offers(&mut self, driver: &Driver, offers: Vec<Offer>) {
        self.started.get_or_insert_with(Instant::now);
        self.out.offers += offers.len();
        for o in offers {
            if self.held.len() < MAX_HELD && self.next < self.total {
                self.held.push(o);
            } else {
                driver.decline(vec![o.id], Some(EXCESS_REFUSE_SECONDS));
            }
        }
        self.pump(driver);
    }

    async fn status_update(&mut self, driver: &Driver, st: &TaskStatus) {
        let Some(sent) = self.sent.get(&st.task_id).copied() else { return };
        match st.state {
            // Updates come at least once: a task's first RUNNING counts.
            TaskState::Running if self.running.insert(st.task_id.clone()) => {
                self.out.to_running.push(sent.elapsed());
            }
            s if s.is_terminal() => {
                self.sent.remove(&st.task_id);
                self.out.to_finished.push(sent.elapsed());
                self.in_flight -= 1;
                if s != TaskState::Finished {
                    self.out.failed += 1;
                }
                if self.out.to_finished.len() == self.total {
                    self.out.elapsed = self.started.map(|s| s.elapsed()).unwrap_or_default();
                    driver.acknowledge(st);
                    driver.stop(true);
                    return;
                }
                self.pump(driver);
            }
            _ => {}
        }
    }
}

/// A framework that wants nothing: declines every offer with a filter.
pub struct Idle;

impl Scheduler for Idle {
    async fn resource_offers(&mut self, driver: &Driver, offers: Vec<Offer>) {
        // One `Offers` event may carry more offers than one DECLINE may name (the master
        // refuses a call with more than `MAX_OFFER_IDS`, and the offers would stay held).
        let ids: Vec<OfferId> = offers.into_iter().map(|o| o.id).collect();
        for chunk in ids.chunks(agora_master::validate::MAX_OFFER_IDS) {
            driver.decline(chunk.to_vec(), Some(IDLE_REFUSE_SECONDS));
        }
    }

    async fn status_update(&mut self, _driver: &Driver, _st: &TaskStatus) {}
}

/// The `p` quantile of sorted durations.
pub fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
