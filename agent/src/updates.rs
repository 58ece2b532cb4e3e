//! The status-update manager: at-least-once, in-order delivery of task status updates.
//!
//! Like Mesos's, it keeps one stream per task. Only the head of a stream is in flight: it is
//! (re)sent with exponential backoff until the master forwards the framework's acknowledgement
//! for exactly that update (matched by uuid); then the next one goes out. So a framework never
//! sees a task's updates out of order, even across retries and reconnections.
//!
//! This module is sans-IO: time is passed in and updates to send are returned.

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use agora_sdk::proto::TaskStatus;
use rustc_hash::FxHashMap;
use uuid::Uuid;

use crate::tasks::TaskKey;

/// First retry delay of an unacknowledged update.
pub const RETRY_INITIAL: Duration = Duration::from_millis(500);
/// Largest retry delay.
pub const RETRY_MAX: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Stream {
    pending: VecDeque<TaskStatus>,
    /// When the head is due to be (re)sent.
    next_send: Instant,
    /// The delay after the next send.
    backoff: Duration,
}

/// What an acknowledgement did.
#[derive(Debug, PartialEq, Eq)]
pub enum AckOutcome {
    /// The head was acknowledged. `next` is the following update, to send now.
    Acked {
        /// The new head of the stream, if any.
        next: Option<Box<TaskStatus>>,
        /// The acknowledged update was terminal.
        terminal: bool,
    },
    /// No pending head update has this uuid (a duplicate or stale ack).
    Ignored,
}

/// Per-task streams of unacknowledged updates.
#[derive(Debug)]
pub struct UpdateManager {
    /// Hashed: looked up on every update and acknowledgement.
    streams: FxHashMap<TaskKey, Stream>,
    /// Every stream's `next_send`, ordered: the next deadline without a walk over all streams
    /// (that walk ran once per agent event and made 10,000 pending updates quadratic).
    schedule: BTreeSet<(Instant, TaskKey)>,
    initial: Duration,
    max: Duration,
}

impl Default for UpdateManager {
    fn default() -> Self {
        Self::new(RETRY_INITIAL, RETRY_MAX)
    }
}

impl UpdateManager {
    /// A manager retrying after `initial`, doubling up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { streams: FxHashMap::default(), schedule: BTreeSet::new(), initial, max }
    }

    /// Moves `key`'s retry time from `old` to `new` in the schedule.
    fn reschedule(schedule: &mut BTreeSet<(Instant, TaskKey)>, key: &TaskKey, old: Instant, new: Instant) {
        if old != new || !schedule.contains(&(old, key.clone())) {
            schedule.remove(&(old, key.clone()));
            schedule.insert((new, key.clone()));
        }
    }

    /// Queues an update. Returns it when it is now the head of its stream and must be sent
    /// right away; otherwise it waits for the acknowledgement of the ones before it.
    pub fn push(&mut self, key: TaskKey, status: TaskStatus, now: Instant) -> Option<TaskStatus> {
        let initial = self.initial;
        let stream = self.streams.entry(key.clone()).or_insert_with(|| Stream {
            pending: VecDeque::new(),
            next_send: now,
            backoff: initial,
        });
        stream.pending.push_back(status);
        if stream.pending.len() == 1 {
            Self::reschedule(&mut self.schedule, &key, stream.next_send, now + initial);
            stream.next_send = now + initial;
            stream.backoff = (initial * 2).min(self.max);
            stream.pending.front().cloned()
        } else {
            None
        }
    }

    /// Handles an acknowledgement for the update `uuid` of task `key`.
    pub fn ack(&mut self, key: &TaskKey, uuid: Uuid, now: Instant) -> AckOutcome {
        let Some(stream) = self.streams.get_mut(key) else {
            return AckOutcome::Ignored;
        };
        if stream.pending.front().and_then(|s| s.uuid) != Some(uuid) {
            return AckOutcome::Ignored;
        }
        let acked = stream.pending.pop_front();
        let terminal = acked.is_some_and(|s| s.state.is_terminal());
        let next = stream.pending.front().cloned().map(Box::new);
        if next.is_some() {
            Self::reschedule(&mut self.schedule, key, stream.next_send, now + self.initial);
            stream.next_send = now + self.initial;
            stream.backoff = (self.initial * 2).min(self.max);
        } else {
            self.schedule.remove(&(stream.next_send, key.clone()));
            self.streams.remove(key);
        }
        AckOutcome::Acked { next, terminal }
    }

    /// Heads whose retry time has come; each is rescheduled with a doubled delay.
    pub fn due(&mut self, now: Instant) -> Vec<TaskStatus> {
        let mut out = Vec::new();
        let mut later = Vec::new();
        while self.schedule.first().is_some_and(|(t, _)| *t <= now) {
            let Some((_, key)) = self.schedule.pop_first() else { break };
            let Some(stream) = self.streams.get_mut(&key) else { continue };
            if let Some(head) = stream.pending.front() {
                out.push(head.clone());
            }
            stream.next_send = now + stream.backoff;
            stream.backoff = (stream.backoff * 2).min(self.max);
            later.push((stream.next_send, key));
        }
        self.schedule.extend(later);
        out
    }

    /// Every stream's head, for a fresh connection; backoffs start over.
    pub fn resend_all(&mut self, now: Instant) -> Vec<TaskStatus> {
        let mut out = Vec::new();
        self.schedule.clear();
        // In task order, so that a reconnection replays the same way every time.
        let mut keys: Vec<TaskKey> = self.streams.keys().cloned().collect();
        keys.sort();
        for key in keys {
            let Some(stream) = self.streams.get_mut(&key) else { continue };
            if let Some(head) = stream.pending.front() {
                out.push(head.clone());
            }
            stream.next_send = now + self.initial;
            stream.backoff = (self.initial * 2).min(self.max);
            self.schedule.insert((stream.next_send, key));
        }
        out
    }

    /// The terminal update of each stream that holds one behind its head (sent on its own as
    /// [`agora_sdk::proto::AgentMessage::LatestState`] after a fresh connection's heads).
    pub fn latest_behind(&self) -> Vec<TaskStatus> {
        let mut keys: Vec<&TaskKey> = self
            .streams
            .iter()
            .filter(|(_, s)| s.pending.len() > 1 && s.pending.back().is_some_and(|u| u.state.is_terminal()))
            .map(|(k, _)| k)
            .collect();
        keys.sort();
        keys.into_iter().filter_map(|k| self.streams.get(k).and_then(|s| s.pending.back().cloned())).collect()
    }

    /// The earliest retry time, if anything is pending.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.schedule.first().map(|(t, _)| *t)
    }

    /// Whether task `key` has unacknowledged updates.
    pub fn has_pending(&self, key: &TaskKey) -> bool {
        self.streams.contains_key(key)
    }

    /// Number of unacknowledged updates over all tasks.
    pub fn pending_count(&self) -> usize {
        self.streams.values().map(|s| s.pending.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agora_sdk::proto::{FrameworkId, TaskId, TaskState, UpdateSource};

    fn key(t: &str) -> TaskKey {
        TaskKey { framework_id: FrameworkId::new("fw"), task_id: TaskId::new(t) }
    }

    fn status(t: &str, state: TaskState) -> TaskStatus {
        TaskStatus {
            task_id: TaskId::new(t),
            framework_id: FrameworkId::new("fw"),
            agent_id: None,
            state,
            uuid: Some(Uuid::new_v4()),
            source: UpdateSource::Agent,
            reason: agora_sdk::Reason::None,
            message: String::new(),
            exit_code: None,
            signal: None,
            usage: None,
            timestamp_ms: 0,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn resends_with_backoff_until_acked_and_keeps_order() {
        let t0 = Instant::now();
        let mut m = UpdateManager::new(ms(500), ms(2000));
        let running = status("a", TaskState::Running);
        let finished = status("a", TaskState::Finished);
        assert_eq!(m.push(key("a"), running.clone(), t0), Some(running.clone()));
        // Queued behind RUNNING: not sent yet.
        assert_eq!(m.push(key("a"), finished.clone(), t0), None);
        assert_eq!(m.next_deadline(), Some(t0 + ms(500)));
        assert!(m.due(t0 + ms(499)).is_empty());
        // Retries at +500, then +1000 later, +2000 (capped), +2000.
        let mut sends = vec![];
        let mut t = t0;
        for _ in 0..4 {
            t = m.next_deadline().expect("pending");
            let d = m.due(t);
            assert_eq!(d, vec![running.clone()]);
            sends.push(t - t0);
        }
        assert_eq!(sends, vec![ms(500), ms(1500), ms(3500), ms(5500)]);
        // A stale or foreign ack does nothing.
        assert_eq!(m.ack(&key("a"), Uuid::new_v4(), t), AckOutcome::Ignored);
        assert_eq!(m.ack(&key("b"), running.uuid.unwrap_or_default(), t), AckOutcome::Ignored);
        // Acking the head releases the next one.
        let out = m.ack(&key("a"), running.uuid.unwrap_or_default(), t);
        assert_eq!(out, AckOutcome::Acked { next: Some(Box::new(finished.clone())), terminal: false });
        // A duplicate ack of RUNNING is ignored.
        assert_eq!(m.ack(&key("a"), running.uuid.unwrap_or_default(), t), AckOutcome::Ignored);
        assert_eq!(m.next_deadline(), Some(t + ms(500)));
        assert_eq!(m.due(t + ms(500)), vec![finished.clone()]);
        let out = m.ack(&key("a"), finished.uuid.unwrap_or_default(), t);
        assert_eq!(out, AckOutcome::Acked { next: None, terminal: true });
        assert!(!m.has_pending(&key("a")));
        assert_eq!(m.next_deadline(), None);
    }

    /// A minute of withheld acknowledgements: only each task's oldest update is in flight,
    /// retried with doubling delays capped at the maximum; nothing is lost or reordered, and
    /// once the acknowledgements come each task's updates follow in order.
    #[test]
    fn a_minute_of_withheld_acks_keeps_order_and_loses_nothing() {
        let t0 = Instant::now();
        let mut m = UpdateManager::new(RETRY_INITIAL, RETRY_MAX);
        let tasks = ["a", "b", "c"];
        let mut sent: Vec<TaskStatus> = Vec::new();
        let mut queued: Vec<Vec<TaskStatus>> = Vec::new();
        for t in tasks {
            let list = vec![
                status(t, TaskState::Running),
                status(t, TaskState::Killing),
                status(t, TaskState::Killed),
            ];
            for s in &list {
                sent.extend(m.push(key(t), s.clone(), t0));
            }
            queued.push(list);
        }
        assert_eq!(sent.len(), 3, "only the heads go out");
        let mut retries: Vec<Instant> = Vec::new();
        while let Some(t) = m.next_deadline().filter(|t| *t <= t0 + Duration::from_secs(60)) {
            let due = m.due(t);
            assert_eq!(due.len(), 3, "every head, and only the heads");
            for (d, q) in due.iter().zip(&queued) {
                assert_eq!(d, &q[0]);
            }
            retries.push(t);
        }
        let gaps: Vec<Duration> = retries.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.windows(2).all(|g| g[1] == (g[0] * 2).min(RETRY_MAX)), "{gaps:?}");
        assert_eq!(gaps.last(), Some(&RETRY_MAX));
        assert_eq!(m.pending_count(), 9);
        // The acknowledgements come: each releases the next update of its task, in order.
        let now = t0 + Duration::from_secs(61);
        for (t, q) in tasks.iter().zip(&queued) {
            for (i, s) in q.iter().enumerate() {
                let out = m.ack(&key(t), s.uuid.unwrap_or_default(), now);
                let next = q.get(i + 1).cloned().map(Box::new);
                assert_eq!(out, AckOutcome::Acked { next, terminal: i == 2 });
            }
        }
        assert_eq!(m.pending_count(), 0);
        assert_eq!(m.next_deadline(), None);
    }

    #[test]
    fn resend_all_sends_heads_and_resets_backoff() {
        let t0 = Instant::now();
        let mut m = UpdateManager::new(ms(100), ms(1000));
        let a1 = status("a", TaskState::Running);
        let a2 = status("a", TaskState::Failed);
        let b1 = status("b", TaskState::Lost);
        m.push(key("a"), a1.clone(), t0);
        m.push(key("a"), a2, t0);
        m.push(key("b"), b1.clone(), t0);
        for _ in 0..5 {
            let t = m.next_deadline().expect("pending");
            m.due(t);
        }
        let t = t0 + ms(10_000);
        assert_eq!(m.resend_all(t), vec![a1, b1]);
        assert_eq!(m.next_deadline(), Some(t + ms(100)));
        assert_eq!(m.pending_count(), 3);
    }
}
