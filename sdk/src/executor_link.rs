//! An executor's side of surviving its agent (the recovery of [`crate::executor_proto`]), in one
//! place for every executor: the built-in command and Wasm executors and the runtime of
//! frameworks' own executors ([`crate::executor`]).
//!
//! - [`Outbox`] numbers task updates (`seq` from 1, one more per update, per executor
//!   process), keeps each until the agent's [`AgentToExecutor::Acked`] covers it and gives back
//!   the unacknowledged ones, in order, for a resend.
//! - [`Link`] shares an outbox between whoever produces updates and one writer task per
//!   connection to the agent ([`Link::connect`]): the writer sends every update in order, the
//!   unacknowledged ones again first after a reconnect; it also knows which tasks still run (for
//!   the [`Resume`] of a reconnect) and carries framework messages.
//! - [`reconnect`] connects to the agent's socket again after it closed without
//!   [`AgentToExecutor::Shutdown`], about every second until the recovery timeout.
//! - [`recovery_timeout_from_env`] and [`parse_recovery_timeout`] read the recovery timeout.
//!
//! ## The bound
//!
//! The agent acknowledges updates once it has checkpointed them, so normally only the updates
//! of the last moments wait in an outbox. [`OutboxLimits`] caps what may wait (a count and a
//! size, both far above what a working agent lets pile up). At the cap an outbox refuses
//! nothing — an update is never dropped — but [`Link::has_room`] turns false: executors then
//! stop taking new task events (their tasks keep running; the events wait in the executor's
//! own queues) and the SDK's driver makes senders wait, until an `Acked` frees room. While the
//! agent is away nothing is acknowledged, so a long absence with many tasks ending fills the
//! outbox and the rest wait the same way; they are numbered and sent once room frees after the
//! reconnect. An update may go past the cap only by what the executor produces while handling
//! one message from the agent (e.g. launches of one frame that fail at once).

use std::collections::{BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::executor_proto::{
    handshake, AgentReader, AgentToExecutor, AgentWriter, ExecutorMessage, ExecutorUpdate, HandshakeError,
    Resume, Welcomed, DEFAULT_RECOVERY_TIMEOUT, ENV_RECOVERY_TIMEOUT,
};
use crate::frame::{FrameError, MAX_FRAME};
use crate::proto::{TaskId, TaskState, WireError};

/// Updates an outbox holds by default before producers wait ([`OutboxLimits::max_updates`]).
pub const DEFAULT_OUTBOX_UPDATES: usize = 65_536;
/// Bytes of updates an outbox holds by default before producers wait
/// ([`OutboxLimits::max_bytes`]).
pub const DEFAULT_OUTBOX_BYTES: usize = 64 << 20;
/// Framework messages queued for the agent before a sender waits.
pub const MAX_QUEUED_MESSAGES: usize = 256;
/// Longest wait between two attempts of [`reconnect`].
pub const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(2);
/// How long one attempt of [`reconnect`] waits for the agent's answer to `Hello`.
pub const RECONNECT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest recovery timeout accepted (a week), so that a deadline never overflows.
pub const MAX_RECOVERY_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// Updates taken per write (split further into frames by size).
const WRITE_BATCH: usize = 4096;
/// Room in a frame for an `Updates` message's enum tag and list length.
const UPDATES_BUDGET: usize = MAX_FRAME - 16;
/// What an update costs in an outbox beyond its texts (the bound is approximate on purpose).
const UPDATE_OVERHEAD: usize = 128;

/// How much an [`Outbox`] holds before [`Outbox::is_full`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutboxLimits {
    /// Unacknowledged updates.
    pub max_updates: usize,
    /// Their approximate size in bytes (texts plus a fixed overhead each).
    pub max_bytes: usize,
}

impl Default for OutboxLimits {
    fn default() -> Self {
        Self { max_updates: DEFAULT_OUTBOX_UPDATES, max_bytes: DEFAULT_OUTBOX_BYTES }
    }
}

impl OutboxLimits {
    /// The default limits, with room for at least `per_task` updates of each of `tasks` tasks
    /// (an executor that may run many tasks at once).
    pub fn for_tasks(tasks: usize, per_task: usize) -> Self {
        let mut limits = Self::default();
        limits.max_updates = limits.max_updates.max(tasks.saturating_mul(per_task));
        limits
    }
}

/// The updates an executor has numbered and the agent has not acknowledged yet, oldest first.
#[derive(Debug)]
pub struct Outbox {
    pending: VecDeque<ExecutorUpdate>,
    last_seq: u64,
    bytes: usize,
    limits: OutboxLimits,
}

impl Outbox {
    /// An empty outbox; the first update gets number 1.
    pub fn new(limits: OutboxLimits) -> Self {
        Self { pending: VecDeque::new(), last_seq: 0, bytes: 0, limits }
    }

    /// Numbers `update` (the next sequence number, whatever `seq` it had) and keeps it until it
    /// is acknowledged. Never refuses: producers check [`Self::is_full`] first (see the module
    /// docs). Returns its number.
    pub fn push(&mut self, mut update: ExecutorUpdate) -> u64 {
        self.last_seq += 1;
        update.seq = self.last_seq;
        self.bytes += cost(&update);
        self.pending.push_back(update);
        self.last_seq
    }

    /// Forgets every update numbered `seq` or lower; returns how many. A number above the last
    /// one used acknowledges everything.
    pub fn ack(&mut self, seq: u64) -> usize {
        let mut n = 0;
        while self.pending.front().is_some_and(|u| u.seq <= seq) {
            if let Some(u) = self.pending.pop_front() {
                self.bytes -= cost(&u);
                n += 1;
            }
        }
        n
    }

    /// The highest number used so far (0: none).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The highest number acknowledged (every update up to it is forgotten).
    pub fn acked(&self) -> u64 {
        self.pending.front().map_or(self.last_seq, |u| u.seq - 1)
    }

    /// The unacknowledged updates, in order: what a resend sends.
    pub fn unacked(&self) -> impl ExactSizeIterator<Item = &ExecutorUpdate> + '_ {
        self.pending.iter()
    }

    /// The unacknowledged updates numbered above `seq`, in order.
    pub fn after(&self, seq: u64) -> impl Iterator<Item = &ExecutorUpdate> + '_ {
        let skip = usize::try_from(seq.saturating_sub(self.acked())).unwrap_or(usize::MAX);
        self.pending.iter().skip(skip)
    }

    /// How many updates wait for an acknowledgement.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether no update waits for an acknowledgement.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Whether the outbox is at its limits: producers wait for an acknowledgement.
    pub fn is_full(&self) -> bool {
        self.pending.len() >= self.limits.max_updates || self.bytes >= self.limits.max_bytes
    }
}

fn cost(u: &ExecutorUpdate) -> usize {
    UPDATE_OVERHEAD + u.task_id.as_str().len() + u.reason.as_str().len() + u.message.len()
}

/// How long after its writer failed a connection's reader may take to see the socket closed
/// too, before the executor stops waiting for it (it may still hold acknowledgements).
pub const READER_GRACE: Duration = Duration::from_secs(5);

/// Whether an update ends its task.
fn is_terminal(state: TaskState) -> bool {
    matches!(state, TaskState::Finished | TaskState::Failed | TaskState::Killed | TaskState::Error)
}

/// [`Link::push`] after [`Link::close`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the executor's link to the agent is closed")]
pub struct LinkClosed;

/// An executor's outbox, shared by the producers of updates and the writer task of the current
/// connection to the agent. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Link {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    /// Wakes the writer: something to send, a new connection or the close. Waiters register
    /// before they look at the state, so `notify_waiters` loses nothing.
    wake: Notify,
    /// Wakes producers waiting for room.
    room: Notify,
}

#[derive(Debug)]
struct State {
    outbox: Outbox,
    /// Tasks launched and not ended (as far as the updates say).
    running: BTreeSet<TaskId>,
    /// Framework messages for the agent, each after the update it followed.
    messages: VecDeque<(u64, Vec<u8>)>,
    /// The highest number handed to the current connection's writer.
    sent: u64,
    /// The current connection (0: none). Each [`Link::connect`] makes a new one.
    conn: u64,
    connected: bool,
    closed: bool,
}

impl Link {
    /// A link with an empty outbox, not connected.
    pub fn new(limits: OutboxLimits) -> Self {
        let state = State {
            outbox: Outbox::new(limits),
            running: BTreeSet::new(),
            messages: VecDeque::new(),
            sent: 0,
            conn: 0,
            connected: false,
            closed: false,
        };
        Self { inner: Arc::new(Inner { state: Mutex::new(state), wake: Notify::new(), room: Notify::new() }) }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; a poisoned lock still holds consistent state.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that `task_id` was launched: it is listed in [`Resume`] until its terminal update.
    pub fn launched(&self, task_id: TaskId) {
        self.state().running.insert(task_id);
    }

    /// Whether `task_id` was launched and has not ended (as the updates say).
    pub fn is_running(&self, task_id: &TaskId) -> bool {
        self.state().running.contains(task_id)
    }

    /// Numbers `update`, keeps it until acknowledged and has it sent (now, or after a
    /// reconnect). Never waits and never refuses for room: callers check [`Self::has_room`]
    /// (see the module docs). Returns its number.
    pub fn push(&self, update: ExecutorUpdate) -> Result<u64, LinkClosed> {
        let seq = {
            let mut s = self.state();
            if s.closed {
                return Err(LinkClosed);
            }
            if is_terminal(update.state) {
                s.running.remove(&update.task_id);
            }
            s.outbox.push(update)
        };
        self.inner.wake.notify_waiters();
        Ok(seq)
    }

    /// [`Self::push`] once the outbox has room (waits for an acknowledgement while it is full).
    pub async fn push_when_room(&self, update: ExecutorUpdate) -> Result<u64, LinkClosed> {
        loop {
            let room = self.inner.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let s = self.state();
                if s.closed {
                    return Err(LinkClosed);
                }
                if !s.outbox.is_full() {
                    drop(s);
                    return self.push(update);
                }
            }
            room.await;
        }
    }

    /// Whether producers may push more updates (the outbox is below its limits).
    pub fn has_room(&self) -> bool {
        !self.state().outbox.is_full()
    }

    /// Queues a framework message for the agent, after the updates pushed before it. Waits
    /// while [`MAX_QUEUED_MESSAGES`] are queued. Framework messages are delivered at most once:
    /// while no agent is connected, this one is dropped (`Ok(false)`).
    pub async fn send_message(&self, data: Vec<u8>) -> Result<bool, LinkClosed> {
        loop {
            let room = self.inner.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let mut s = self.state();
                if s.closed {
                    return Err(LinkClosed);
                }
                if !s.connected {
                    return Ok(false);
                }
                if s.messages.len() < MAX_QUEUED_MESSAGES {
                    let after = s.outbox.last_seq();
                    s.messages.push_back((after, data));
                    drop(s);
                    self.inner.wake.notify_waiters();
                    return Ok(true);
                }
            }
            room.await;
        }
    }

    /// The agent acknowledged every update up to `seq`: they are forgotten.
    pub fn ack(&self, seq: u64) {
        let forgotten = {
            let mut s = self.state();
            if seq > s.outbox.last_seq() {
                tracing::warn!(seq, last = s.outbox.last_seq(), "the agent acknowledged updates never sent");
            }
            s.outbox.ack(seq)
        };
        if forgotten > 0 {
            self.inner.room.notify_waiters();
        }
    }

    /// What a reconnecting executor says it has: the tasks still running and its last number.
    pub fn resume(&self) -> Resume {
        let s = self.state();
        Resume { tasks: s.running.iter().cloned().collect(), last_seq: s.outbox.last_seq() }
    }

    /// The highest number used so far (0: none).
    pub fn last_seq(&self) -> u64 {
        self.state().outbox.last_seq()
    }

    /// How many updates wait for the agent's acknowledgement.
    pub fn unacked(&self) -> usize {
        self.state().outbox.len()
    }

    /// Starts the writer of a new connection to the agent: it sends every unacknowledged update
    /// (again, with its number) in order, then whatever is pushed, until [`Self::disconnect`],
    /// [`Self::close`] or a write error. The previous connection's writer stops.
    pub fn connect(&self, writer: AgentWriter) -> JoinHandle<Result<(), FrameError>> {
        let conn = {
            let mut s = self.state();
            s.conn += 1;
            s.connected = true;
            s.sent = s.outbox.acked();
            s.messages.clear();
            s.conn
        };
        self.inner.wake.notify_waiters();
        tokio::spawn(write_loop(self.clone(), writer, conn))
    }

    /// The connection is gone: its writer stops; updates are kept for the next one and
    /// framework messages not sent yet are dropped.
    pub fn disconnect(&self) {
        {
            let mut s = self.state();
            s.connected = false;
            s.conn += 1;
            s.messages.clear();
        }
        self.inner.wake.notify_waiters();
        self.inner.room.notify_waiters();
    }

    /// The executor is stopping: the writer sends what is queued and ends; pushes fail from now
    /// on.
    pub fn close(&self) {
        self.state().closed = true;
        self.inner.wake.notify_waiters();
        self.inner.room.notify_waiters();
    }

    /// Whether a connection's writer is current.
    pub fn is_connected(&self) -> bool {
        self.state().connected
    }
}

/// What a writer sends, in order.
enum Out {
    Updates(Vec<ExecutorUpdate>),
    Message(Vec<u8>),
}

/// Takes what there is to send on connection `conn` (`None`: stop).
fn take(link: &Link, conn: u64) -> Option<Vec<Out>> {
    let mut s = link.state();
    if s.conn != conn {
        return None;
    }
    let mut out = Vec::new();
    let mut updates = Vec::new();
    let mut taken = 0;
    loop {
        let limit = s.messages.front().map_or(s.outbox.last_seq(), |m| m.0);
        let sent = s.sent;
        for u in s.outbox.after(sent).take_while(|u| u.seq <= limit).take(WRITE_BATCH - taken) {
            updates.push(u.clone());
        }
        taken += updates.len();
        if let Some(last) = updates.last() {
            s.sent = last.seq;
            out.push(Out::Updates(std::mem::take(&mut updates)));
        }
        if taken >= WRITE_BATCH {
            break;
        }
        match s.messages.front() {
            Some((after, _)) if *after <= s.sent => {
                if let Some((_, data)) = s.messages.pop_front() {
                    out.push(Out::Message(data));
                }
            }
            _ => break,
        }
    }
    if out.is_empty() && s.closed {
        return None;
    }
    Some(out)
}

async fn write_loop(link: Link, mut writer: AgentWriter, conn: u64) -> Result<(), FrameError> {
    loop {
        let woken = link.inner.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let Some(out) = take(&link, conn) else { return Ok(()) };
        if out.is_empty() {
            woken.await;
            continue;
        }
        let mut messages = false;
        for item in out {
            match item {
                Out::Updates(updates) => {
                    for one in writer.feed_list(updates, UPDATES_BUDGET, ExecutorMessage::Updates).await? {
                        tracing::error!(task_id = %one.task_id, "update too large to send; dropped");
                    }
                }
                Out::Message(data) => {
                    messages = true;
                    writer.feed(&ExecutorMessage::FrameworkMessage(data)).await?;
                }
            }
        }
        writer.flush().await?;
        if messages {
            link.inner.room.notify_waiters();
        }
    }
}

/// What [`Connection::next`] got from the agent.
#[derive(Debug)]
pub enum Received {
    /// A message (never `Acked`: the connection hands those to the link).
    Message(AgentToExecutor),
    /// The connection is gone without `Shutdown`: the socket closed or failed (the error, if
    /// any), or stopped taking writes.
    Lost(Option<std::io::Error>),
    /// A frame that does not decode (or is too large): a protocol error.
    Malformed(FrameError),
}

/// One connection to the agent for executors that read it in their own loop (the built-in
/// ones): its reader and the link's writer task for it.
pub struct Connection {
    reader: AgentReader,
    writer: JoinHandle<Result<(), FrameError>>,
    writing: bool,
    /// Once the writer failed, the reader gets [`READER_GRACE`] to see the socket closed.
    grace: Option<Instant>,
}

impl Connection {
    /// Starts `link`'s writer on `writer` (unacknowledged updates go first) and reads `reader`.
    pub fn new(link: &Link, reader: AgentReader, writer: AgentWriter) -> Self {
        Self { reader, writer: link.connect(writer), writing: true, grace: None }
    }

    /// The agent's next message; `Acked` is applied to `link` here. Cancel-safe.
    pub async fn next(&mut self, link: &Link) -> Received {
        loop {
            tokio::select! {
                frame = self.reader.recv::<AgentToExecutor>() => match frame {
                    Ok(Some(AgentToExecutor::Acked { seq })) => link.ack(seq),
                    Ok(Some(message)) => return Received::Message(message),
                    Ok(None) => return Received::Lost(None),
                    Err(FrameError::Io(error)) => return Received::Lost(Some(error)),
                    Err(error) => return Received::Malformed(error),
                },
                written = &mut self.writer, if self.writing => {
                    self.writing = false;
                    match written {
                        Ok(Ok(())) => tracing::debug!("update writer stopped"),
                        Ok(Err(error)) => tracing::info!(%error, "cannot write to the agent"),
                        Err(error) => tracing::warn!(%error, "update writer failed"),
                    }
                    self.grace = Some(Instant::now() + READER_GRACE);
                }
                () = sleep_until_opt(self.grace) => {
                    tracing::info!("the agent's socket does not take writes any more");
                    return Received::Lost(None);
                }
            }
        }
    }

    /// [`Self::next`] on `conn`, or never while there is none.
    pub async fn next_opt(conn: &mut Option<Connection>, link: &Link) -> Received {
        match conn {
            Some(c) => c.next(link).await,
            None => std::future::pending().await,
        }
    }

    /// The executor stops: `link` is closed and what it still holds for the agent is sent,
    /// waiting at most `patience`.
    pub async fn finish(mut self, link: &Link, patience: Duration) {
        link.close();
        if !self.writing {
            return;
        }
        match tokio::time::timeout(patience, &mut self.writer).await {
            Ok(Ok(Err(error))) => tracing::debug!(%error, "final updates not sent"),
            Ok(_) => {}
            Err(_) => {
                tracing::warn!("the agent did not take the final updates in time");
                self.writer.abort();
            }
        }
    }
}

/// Sleeps until `at`, or forever.
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A [`reconnect`] under way (see [`Link::reconnect`]).
pub type Reconnecting = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<(AgentReader, AgentWriter, Welcomed), ReconnectError>> + Send,
    >,
>;

impl Link {
    /// The connection was lost: disconnects and starts [`reconnect`]ing to `socket` with this
    /// link's [`Resume`], for at most `timeout` from now. Poll it with [`reconnecting`].
    pub fn reconnect(&self, socket: PathBuf, executor_id: String, timeout: Duration) -> Reconnecting {
        self.disconnect();
        let link = self.clone();
        let deadline = Instant::now() + timeout;
        Box::pin(reconnect(socket, executor_id, deadline, timeout, move || link.resume()))
    }
}

/// Awaits the reconnect under way, or never while there is none.
pub async fn reconnecting(
    away: &mut Option<Reconnecting>,
) -> Result<(AgentReader, AgentWriter, Welcomed), ReconnectError> {
    match away {
        Some(f) => {
            let r = f.as_mut().await;
            *away = None;
            r
        }
        None => std::future::pending().await,
    }
}

/// Why [`reconnect`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum ReconnectError {
    /// The agent did not come back within the recovery timeout.
    #[error("the agent did not come back within the recovery timeout ({0:?})")]
    TimedOut(Duration),
    /// The agent came back but does not know this executor (it started clean).
    #[error("the agent refused the reconnecting executor: {}", .0.message)]
    Refused(WireError),
}

/// Connects to the agent's socket again after the connection closed without `Shutdown`: the
/// first attempt after a short pause, then about every second (jittered, at most
/// [`MAX_RECONNECT_DELAY`] apart), each saying `Hello` with the [`Resume`] that `resume` gives
/// at that moment, until `deadline` (the moment the connection was lost plus the recovery
/// timeout). Returns the new connection once the agent says `Welcome`; a `Refused` ends the
/// attempts; anything else (no socket, nobody listening, no answer within
/// [`RECONNECT_HANDSHAKE_TIMEOUT`], a connection closed) is tried again.
pub async fn reconnect(
    socket: PathBuf,
    executor_id: String,
    deadline: Instant,
    timeout: Duration,
    mut resume: impl FnMut() -> Resume,
) -> Result<(AgentReader, AgentWriter, Welcomed), ReconnectError> {
    tracing::info!(socket = %socket.display(), ?timeout, "connection to the agent lost: keeping the tasks and connecting again");
    let mut attempt: u32 = 0;
    loop {
        let delay = reconnect_delay(attempt);
        attempt = attempt.saturating_add(1);
        let at = Instant::now() + delay;
        if at >= deadline {
            tokio::time::sleep_until(deadline).await;
            return Err(ReconnectError::TimedOut(timeout));
        }
        tokio::time::sleep_until(at).await;
        let wait = RECONNECT_HANDSHAKE_TIMEOUT.min(deadline.saturating_duration_since(Instant::now()));
        let r = resume();
        let tried = tokio::time::timeout(wait, handshake(&socket, &executor_id, Some(r.clone()))).await;
        match tried {
            Ok(Ok(connected)) => {
                tracing::info!(
                    attempts = attempt,
                    tasks = r.tasks.len(),
                    last_seq = r.last_seq,
                    "reconnected to the agent"
                );
                return Ok(connected);
            }
            Ok(Err(HandshakeError::Refused(e))) => return Err(ReconnectError::Refused(e)),
            Ok(Err(e)) => tracing::debug!(attempt, error = %e, "the agent is not back yet"),
            Err(_) => tracing::debug!(attempt, "the agent did not answer Hello in time"),
        }
        if Instant::now() >= deadline {
            return Err(ReconnectError::TimedOut(timeout));
        }
    }
}

/// The pause before attempt `n` of [`reconnect`]: ~0.25 s, then ~1 s, growing to ~2 s, each
/// with up to a quarter of jitter so that many executors do not knock at once.
fn reconnect_delay(n: u32) -> Duration {
    let base = match n {
        0 => Duration::from_millis(250),
        1..=3 => Duration::from_secs(1),
        4..=7 => Duration::from_millis(1500),
        _ => MAX_RECONNECT_DELAY,
    };
    let quarter = u64::try_from(base.as_millis() / 4).unwrap_or(1).max(1);
    let jitter = u64::try_from(uuid::Uuid::new_v4().as_u128() % u128::from(quarter)).unwrap_or(0);
    (base - Duration::from_millis(quarter) + Duration::from_millis(jitter)).min(MAX_RECONNECT_DELAY)
}

/// Why a recovery timeout cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecoveryTimeoutError {
    /// Not a whole number of seconds.
    #[error("recovery timeout {0:?} is not a whole number of seconds")]
    NotSeconds(String),
    /// Longer than [`MAX_RECOVERY_TIMEOUT`].
    #[error("recovery timeout of {0} seconds is longer than the maximum ({max} seconds)", max = MAX_RECOVERY_TIMEOUT.as_secs())]
    TooLong(u64),
    /// The environment variable is not UTF-8.
    #[error("environment variable {ENV_RECOVERY_TIMEOUT} is not UTF-8")]
    NotUtf8,
}

/// A recovery timeout in whole seconds (0: kill the tasks as soon as the agent is lost).
pub fn parse_recovery_timeout(s: &str) -> Result<Duration, RecoveryTimeoutError> {
    let secs: u64 = s.trim().parse().map_err(|_| RecoveryTimeoutError::NotSeconds(s.to_string()))?;
    let d = Duration::from_secs(secs);
    if d > MAX_RECOVERY_TIMEOUT {
        return Err(RecoveryTimeoutError::TooLong(secs));
    }
    Ok(d)
}

/// The recovery timeout from [`ENV_RECOVERY_TIMEOUT`] ([`DEFAULT_RECOVERY_TIMEOUT`] when it is
/// not set).
pub fn recovery_timeout_from_env() -> Result<Duration, RecoveryTimeoutError> {
    recovery_timeout_from(std::env::var_os(ENV_RECOVERY_TIMEOUT))
}

/// [`recovery_timeout_from_env`] with the variable's value given.
pub fn recovery_timeout_from(value: Option<std::ffi::OsString>) -> Result<Duration, RecoveryTimeoutError> {
    match value {
        None => Ok(DEFAULT_RECOVERY_TIMEOUT),
        Some(v) => parse_recovery_timeout(v.to_str().ok_or(RecoveryTimeoutError::NotUtf8)?),
    }
}

/// What the agent's message asks of the link, for executors' read loops: `Acked` is handled
/// here (`None` comes back), anything else is returned.
pub fn take_ack(link: &Link, message: AgentToExecutor) -> Option<AgentToExecutor> {
    match message {
        AgentToExecutor::Acked { seq } => {
            link.ack(seq);
            None
        }
        other => Some(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(task: &str, state: TaskState) -> ExecutorUpdate {
        ExecutorUpdate {
            seq: 0,
            task_id: TaskId::new(task),
            state,
            reason: "r".into(),
            message: "m".into(),
            exit_code: None,
            signal: None,
            pid: None,
            usage: None,
        }
    }

    fn seqs<'a>(it: impl Iterator<Item = &'a ExecutorUpdate>) -> Vec<u64> {
        it.map(|u| u.seq).collect()
    }

    #[test]
    fn outbox_numbers_from_one_and_forgets_what_is_acked() {
        let mut o = Outbox::new(OutboxLimits::default());
        assert_eq!((o.last_seq(), o.acked(), o.len()), (0, 0, 0));
        let mut u = update("a", TaskState::Running);
        u.seq = 99; // whatever it had
        assert_eq!(o.push(u), 1);
        assert_eq!(o.push(update("a", TaskState::Finished)), 2);
        assert_eq!(o.push(update("b", TaskState::Running)), 3);
        assert_eq!(seqs(o.unacked()), [1, 2, 3]);
        assert_eq!(o.ack(0), 0);
        assert_eq!(o.ack(2), 2);
        assert_eq!((o.acked(), o.last_seq()), (2, 3));
        assert_eq!(seqs(o.unacked()), [3]);
        assert_eq!(o.unacked().next().map(|u| u.task_id.as_str()), Some("b"));
        // An old acknowledgement changes nothing; numbering goes on.
        assert_eq!(o.ack(1), 0);
        assert_eq!(o.push(update("c", TaskState::Running)), 4);
        assert_eq!(seqs(o.after(3)), [4]);
        assert_eq!(seqs(o.after(0)), [3, 4]);
        // Beyond the last number: everything.
        assert_eq!(o.ack(1000), 2);
        assert!(o.is_empty());
        assert_eq!((o.acked(), o.last_seq()), (4, 4));
        assert_eq!(o.push(update("d", TaskState::Running)), 5);
    }

    #[test]
    fn outbox_bound_counts_updates_and_bytes_and_never_drops() {
        let mut o = Outbox::new(OutboxLimits { max_updates: 3, max_bytes: usize::MAX });
        for _ in 0..3 {
            assert!(!o.is_full());
            o.push(update("a", TaskState::Running));
        }
        assert!(o.is_full());
        // Past the bound it still keeps what it is given.
        o.push(update("a", TaskState::Finished));
        assert_eq!(seqs(o.unacked()), [1, 2, 3, 4]);
        o.ack(2);
        assert!(!o.is_full());

        let mut o = Outbox::new(OutboxLimits { max_updates: usize::MAX, max_bytes: 1000 });
        let mut big = update("a", TaskState::Failed);
        big.message = "x".repeat(900);
        o.push(big);
        assert!(o.is_full());
        o.ack(1);
        assert!(!o.is_full());
        assert_eq!(o.bytes, 0);
        assert!(OutboxLimits::for_tasks(1 << 20, 2).max_updates >= 2 << 20);
        assert_eq!(OutboxLimits::for_tasks(1, 2), OutboxLimits::default());
    }

    #[test]
    fn link_tracks_running_tasks_for_the_resume() {
        let link = Link::new(OutboxLimits::default());
        link.launched(TaskId::new("a"));
        link.launched(TaskId::new("b"));
        link.push(update("a", TaskState::Running)).unwrap();
        link.push(update("b", TaskState::Running)).unwrap();
        link.push(update("a", TaskState::Failed)).unwrap();
        // An update of a task never launched does not make it running.
        link.push(update("z", TaskState::Running)).unwrap();
        assert_eq!(link.resume(), Resume { tasks: vec![TaskId::new("b")], last_seq: 4 });
        assert!(link.is_running(&TaskId::new("b")));
        link.ack(3);
        assert_eq!(link.unacked(), 1);
        link.close();
        assert_eq!(link.push(update("b", TaskState::Killed)), Err(LinkClosed));
    }

    #[test]
    fn recovery_timeouts_are_whole_seconds() {
        assert_eq!(parse_recovery_timeout("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_recovery_timeout(" 0 "), Ok(Duration::ZERO));
        for bad in ["", "-1", "1.5", "15m", "x"] {
            let e = parse_recovery_timeout(bad).unwrap_err();
            assert!(e.to_string().contains("whole number of seconds"), "{e}");
        }
        assert!(matches!(parse_recovery_timeout("99999999999"), Err(RecoveryTimeoutError::TooLong(_))));
        assert_eq!(recovery_timeout_from(None), Ok(DEFAULT_RECOVERY_TIMEOUT));
        assert_eq!(recovery_timeout_from(Some("7".into())), Ok(Duration::from_secs(7)));
        {
            use std::os::unix::ffi::OsStringExt;
            let e = recovery_timeout_from(Some(std::ffi::OsString::from_vec(vec![0xff]))).unwrap_err();
            assert!(e.to_string().contains(ENV_RECOVERY_TIMEOUT), "{e}");
        }
    }

    #[test]
    fn reconnect_delays_stay_short_and_jittered() {
        for n in 0..20 {
            let d = reconnect_delay(n);
            assert!(d > Duration::from_millis(150) && d <= MAX_RECONNECT_DELAY, "{n}: {d:?}");
        }
        assert!(reconnect_delay(0) < Duration::from_millis(300));
        assert!(reconnect_delay(1) >= Duration::from_millis(750));
    }

    /// The writer sends everything unacknowledged again, in order, on each new connection, and
    /// framework messages after the updates that came before them.
    async fn next(r: &mut crate::frame::FrameReader<tokio::net::unix::OwnedReadHalf>) -> ExecutorMessage {
        let fut = r.recv::<ExecutorMessage>();
        tokio::time::timeout(Duration::from_secs(10), fut).await.unwrap().unwrap().unwrap()
    }

    #[tokio::test]
    async fn each_connection_resends_what_is_unacked_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let link = Link::new(OutboxLimits::default());
        link.push(update("a", TaskState::Running)).unwrap();
        link.push(update("a", TaskState::Finished)).unwrap();
        // Not connected: messages are dropped (at most once).
        assert_eq!(link.send_message(b"lost".to_vec()).await, Ok(false));

        let connect = || async {
            let client = tokio::net::UnixStream::connect(&path).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            let (_r, w) = client.into_split();
            let (sr, _sw) = server.into_split();
            (crate::frame::FrameWriter::new(w), crate::frame::FrameReader::new(sr), _r, _sw)
        };
        let (w, mut r, _keep_r, _keep_w) = connect().await;
        let writer = link.connect(w);
        let mut got = Vec::new();
        while got.len() < 2 {
            match next(&mut r).await {
                ExecutorMessage::Updates(u) => got.extend(u),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(seqs(got.iter()), [1, 2]);
        link.push(update("b", TaskState::Running)).unwrap();
        assert_eq!(link.send_message(b"hi".to_vec()).await, Ok(true));
        link.push(update("b", TaskState::Finished)).unwrap();
        let mut order = Vec::new();
        while order.len() < 3 {
            match next(&mut r).await {
                ExecutorMessage::Updates(u) => order.extend(u.into_iter().map(|u| format!("u{}", u.seq))),
                ExecutorMessage::FrameworkMessage(m) => order.push(String::from_utf8(m).unwrap()),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(order, ["u3", "hi", "u4"]);

        // Lost; 1 and 2 acknowledged meanwhile, 5 made while away.
        link.disconnect();
        tokio::time::timeout(Duration::from_secs(10), writer).await.unwrap().unwrap().unwrap();
        link.ack(2);
        link.push(update("c", TaskState::Running)).unwrap();
        let (w, mut r, _keep_r2, _keep_w2) = connect().await;
        let writer = link.connect(w);
        let mut got = Vec::new();
        while got.len() < 3 {
            match next(&mut r).await {
                ExecutorMessage::Updates(u) => got.extend(u),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(seqs(got.iter()), [3, 4, 5], "the unacknowledged ones again, with their numbers");
        assert_eq!(got[0].task_id.as_str(), "b");
        // Close: the writer sends the rest, then ends.
        link.push(update("c", TaskState::Killed)).unwrap();
        link.close();
        tokio::time::timeout(Duration::from_secs(10), writer).await.unwrap().unwrap().unwrap();
        match next(&mut r).await {
            ExecutorMessage::Updates(u) => assert_eq!(seqs(u.iter()), [6]),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn push_when_room_waits_for_an_ack() {
        let link = Link::new(OutboxLimits { max_updates: 1, max_bytes: usize::MAX });
        link.push(update("a", TaskState::Running)).unwrap();
        assert!(!link.has_room());
        let waiting = tokio::spawn({
            let link = link.clone();
            async move { link.push_when_room(update("a", TaskState::Finished)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "no room: it waits");
        link.ack(1);
        assert_eq!(tokio::time::timeout(Duration::from_secs(10), waiting).await.unwrap().unwrap(), Ok(2));
    }

    #[tokio::test]
    async fn reconnect_gives_up_at_the_deadline_or_on_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let started = Instant::now();
        let timeout = Duration::from_millis(600);
        let r = reconnect(path.clone(), "ex".into(), started + timeout, timeout, Resume::default).await;
        assert!(matches!(r, Err(ReconnectError::TimedOut(t)) if t == timeout), "{:?}", r.err());
        assert!(started.elapsed() >= timeout);

        // The agent is back but does not know the executor.
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let agent = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, w) = s.into_split();
            let mut r = crate::frame::FrameReader::new(r);
            let mut w = crate::frame::FrameWriter::new(w);
            let hello: ExecutorMessage = r.recv().await.unwrap().unwrap();
            w.send(&AgentToExecutor::refused("unknown executor")).await.unwrap();
            hello
        });
        let resume = || Resume { tasks: vec![TaskId::new("t")], last_seq: 7 };
        let deadline = Instant::now() + Duration::from_secs(10);
        let r = reconnect(path, "ex".into(), deadline, Duration::from_secs(10), resume).await;
        assert!(
            matches!(&r, Err(ReconnectError::Refused(e)) if e.message == "unknown executor"),
            "{:?}",
            r.err()
        );
        match agent.await.unwrap() {
            ExecutorMessage::Hello { resume: Some(r), executor_id, .. } => {
                assert_eq!(executor_id, "ex");
                assert_eq!(r, Resume { tasks: vec![TaskId::new("t")], last_seq: 7 });
            }
            other => panic!("{other:?}"),
        }
    }
}
