//! The master link: connects (with backoff, forever), registers, heartbeats, detects a silent
//! master, moves the core's outbox to the control stream, and accepts the output streams the
//! master opens. One loop owns the [`Core`]; every I/O that may stall (connecting, writing,
//! output streams) runs in a task of its own so the loop never blocks on it.

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use agora_sdk::client::{ClientError, Session};
use agora_sdk::frame::{FrameError, FrameReader, FrameWriter};
use agora_sdk::masters::MasterSearch;
use agora_sdk::proto::{AgentMessage, ErrorCode, MasterToAgent, Role};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::core::Core;
use crate::epoch::{EpochGuard, Verdict};
use crate::output::{self, OutputLookup};
use crate::sandbox::{write_agent_id, Layout};
use crate::tasks::{TaskEvent, TaskKey};
use crate::{AgentConfig, AgentError};

/// First reconnection delay.
pub const CONNECT_INITIAL: Duration = Duration::from_millis(100);
/// Largest reconnection delay.
pub const CONNECT_MAX: Duration = Duration::from_secs(10);
/// How long the master has to answer `Register`.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(15);
/// The master is lost after this many heartbeat intervals without any message.
pub const MISSED_HEARTBEATS: u32 = 3;
/// Bounds applied to the master's heartbeat interval.
const HEARTBEAT_MIN: Duration = Duration::from_millis(100);
const HEARTBEAT_MAX: Duration = Duration::from_secs(3600);
/// How long a shutting-down agent waits to flush its last messages.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Exponential backoff with jitter: each delay is drawn from `[d/2, d]`, `d` doubling from
/// `initial` to `max`.
#[derive(Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    failures: u32,
}

impl Backoff {
    /// A backoff starting at `initial`, capped at `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max, current: initial, failures: 0 }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        self.failures = self.failures.saturating_add(1);
        let half = base / 2;
        let span = u64::try_from((base - half).as_micros()).unwrap_or(u64::MAX).max(1);
        half + Duration::from_micros(cheap_random() % (span + 1))
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Back to the initial delay (after a successful registration).
    pub fn reset(&mut self) {
        self.current = self.initial;
        self.failures = 0;
    }
}

/// Cheap randomness for jitter: std's per-instance random hasher keys.
fn cheap_random() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0),
    );
    h.finish()
}

/// What happened on a live connection.
// Handled one at a time, never stored in bulk: boxing the message would buy nothing.
#[allow(clippy::large_enum_variant)]
enum LinkEvent {
    Message(MasterToAgent),
    HeartbeatDue,
    Lost(String),
}

/// A live, handshaken connection.
struct Connected {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    tx: mpsc::UnboundedSender<AgentMessage>,
    reader: FrameReader<quinn::RecvStream>,
    writer: JoinHandle<Result<(), FrameError>>,
    acceptor: JoinHandle<()>,
    heartbeat: Option<tokio::time::Interval>,
    registered: bool,
    silence_limit: Duration,
    last_heard: tokio::time::Instant,
}

impl Connected {
    fn new(session: Session, lookups: mpsc::Sender<OutputLookup>) -> Self {
        let Session { endpoint, conn, writer, reader, master_id, epoch, .. } = session;
        tracing::info!(%master_id, epoch, remote = %conn.remote_address(), "connected to the master");
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            endpoint,
            acceptor: tokio::spawn(accept_streams(conn.clone(), lookups)),
            conn,
            tx,
            reader,
            writer: tokio::spawn(write_loop(writer, rx)),
            heartbeat: None,
            registered: false,
            silence_limit: REGISTER_TIMEOUT,
            last_heard: tokio::time::Instant::now(),
        }
    }

    fn send(&self, msg: AgentMessage) {
        // A failed send means the writer ended; `next` reports that.
        let _ = self.tx.send(msg);
    }

    fn registered(&mut self, interval: Duration) {
        let interval = interval.clamp(HEARTBEAT_MIN, HEARTBEAT_MAX);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.heartbeat = Some(tick);
        self.registered = true;
        self.silence_limit = interval * MISSED_HEARTBEATS;
    }

    /// The next thing that happens on this connection (cancel-safe).
    async fn next(&mut self) -> LinkEvent {
        let deadline = self.last_heard + self.silence_limit;
        let Connected { reader, writer, heartbeat, silence_limit, .. } = self;
        let heartbeat = async {
            match heartbeat {
                Some(t) => {
                    t.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        let event = tokio::select! {
            r = reader.recv::<MasterToAgent>() => match r {
                Ok(Some(m)) => LinkEvent::Message(m),
                Ok(None) => LinkEvent::Lost("the master closed the control stream".into()),
                Err(e) => LinkEvent::Lost(format!("control stream: {e}")),
            },
            () = heartbeat => LinkEvent::HeartbeatDue,
            () = tokio::time::sleep_until(deadline) => {
                LinkEvent::Lost(format!("no message from the master for {silence_limit:?}"))
            }
            r = writer => LinkEvent::Lost(match r {
                Ok(Ok(())) => "the control stream writer ended".into(),
                Ok(Err(e)) => format!("cannot write to the control stream: {e}"),
                Err(e) => format!("control stream writer failed: {e}"),
            }),
        };
        if matches!(event, LinkEvent::Message(_)) {
            self.last_heard = tokio::time::Instant::now();
        }
        event
    }

    /// Drops the connection at once.
    fn abort(self, reason: &str) {
        self.writer.abort();
        self.acceptor.abort();
        self.conn.close(1u32.into(), reason.as_bytes());
        self.endpoint.close(1u32.into(), reason.as_bytes());
    }

    /// Flushes what was queued, then closes.
    async fn close(self) {
        let Connected { endpoint, conn, tx, writer, acceptor, .. } = self;
        drop(tx);
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, writer).await;
        acceptor.abort();
        conn.close(0u32.into(), b"agent shutting down");
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, endpoint.wait_idle()).await;
    }
}

async fn write_loop(
    mut writer: FrameWriter<quinn::SendStream>,
    mut rx: mpsc::UnboundedReceiver<AgentMessage>,
) -> Result<(), FrameError> {
    while let Some(msg) = rx.recv().await {
        writer.feed(&msg).await?;
        while let Ok(more) = rx.try_recv() {
            writer.feed(&more).await?;
        }
        writer.flush().await?;
    }
    let mut send = writer.into_inner();
    let _ = send.finish();
    Ok(())
}

async fn accept_streams(conn: quinn::Connection, lookups: mpsc::Sender<OutputLookup>) {
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                tokio::spawn(output::serve(send, recv, lookups.clone()));
            }
            Err(e) => {
                tracing::debug!(error = %e, "no more streams from the master");
                return;
            }
        }
    }
}

/// The leader epochs this agent accepts: never lower than the highest it has seen, so that a
/// deposed leader (one that lost its election but has not noticed yet) gets no registration.
#[derive(Debug, Default)]
pub struct EpochFence {
    highest: u64,
}

impl EpochFence {
    /// The highest epoch accepted so far.
    pub fn highest(&self) -> u64 {
        self.highest
    }

    /// Whether the master whose `Welcome` carries `epoch` may be served; remembers it if so.
    pub fn accept_epoch(&mut self, epoch: u64) -> bool {
        if epoch < self.highest {
            return false;
        }
        self.highest = epoch;
        true
    }
}

/// A search for the leader, in a task of its own; it hands the search (with the leader and
/// epoch it learnt) back with its result.
type Connecting = JoinHandle<(MasterSearch, Result<Session, ClientError>)>;

/// The agent's masters and the search among them, while no search task holds it.
struct Masters {
    /// The list as configured (a fresh search, should a search task fail).
    list: MasterSearch,
    idle: Option<MasterSearch>,
}

/// Starts a search for the leader among the agent's masters, refusing epochs below the fence.
fn spawn_connect(cfg: &AgentConfig, masters: &mut Masters, fence: &EpochFence) -> Connecting {
    let mut s = masters.idle.take().unwrap_or_else(|| masters.list.clone());
    s.set_min_epoch(fence.highest());
    let tls = cfg.tls.clone();
    tokio::spawn(async move {
        let r = s.connect(&tls, Role::Agent).await;
        (s, r)
    })
}

/// Errors that retrying cannot fix.
fn fatal(master: &str, e: ClientError) -> Result<ClientError, AgentError> {
    match e {
        ClientError::Tls(e) => Err(AgentError::Tls(e)),
        ClientError::Refused(w) if matches!(w.code, ErrorCode::Unauthorized | ErrorCode::VersionMismatch) => {
            Err(AgentError::Refused { master: master.to_string(), error: w })
        }
        other => Ok(other),
    }
}

async fn opt_next(c: Option<&mut Connected>) -> LinkEvent {
    match c {
        Some(c) => c.next().await,
        None => std::future::pending().await,
    }
}

/// The sandbox collector's step in progress on the blocking pool.
enum GcStep {
    /// The work dir's disk usage was measured.
    Measured(std::io::Result<f64>),
    /// Due sandboxes were removed (how many).
    Removed(usize),
}

/// Starts the next step of sandbox collection on the blocking pool: measuring the disk on a
/// tick, then removing what is due given that measure.
fn gc_step(
    cfg: &AgentConfig,
    layout: &Layout,
    core: &mut Core,
    after: Option<GcStep>,
) -> Option<JoinHandle<GcStep>> {
    match after {
        None => {
            let work_dir = cfg.work_dir.clone();
            Some(tokio::task::spawn_blocking(move || GcStep::Measured(crate::gc::disk_usage(&work_dir))))
        }
        Some(GcStep::Measured(usage)) => {
            let usage = usage.unwrap_or_else(|e| {
                tracing::warn!(work_dir = %cfg.work_dir.display(), error = %e,
                    "cannot measure the work dir's disk; keeping finished sandboxes the full --gc-delay");
                0.0
            });
            let keep = cfg.gc.effective_delay(usage);
            let due = core.take_due_sandboxes(std::time::SystemTime::now(), keep);
            if due.is_empty() {
                return None;
            }
            tracing::debug!(sandboxes = due.len(), disk_usage = usage, ?keep, "removing finished sandboxes");
            let frameworks_dir = layout.frameworks_dir();
            Some(tokio::task::spawn_blocking(move || {
                GcStep::Removed(crate::gc::remove(&frameworks_dir, &due))
            }))
        }
        Some(GcStep::Removed(n)) => {
            metrics::counter!(crate::metrics::SANDBOXES_REMOVED).increment(n as u64);
            if n > 0 {
                tracing::info!(sandboxes = n, "removed finished sandboxes");
            }
            None
        }
    }
}

/// Task events handled in one go (one checkpoint write).
const EVENT_BATCH: usize = 4096;

/// Handles up to `max` task events that are already queued.
fn drain_events(core: &mut Core, events: &mut mpsc::UnboundedReceiver<(TaskKey, TaskEvent)>, max: usize) {
    let now = Instant::now();
    for _ in 0..max {
        match events.try_recv() {
            Ok((key, ev)) => core.task_event(key, ev, now),
            Err(_) => break,
        }
    }
}

async fn opt_recv<T>(
    r: Option<&mut tokio::sync::oneshot::Receiver<T>>,
) -> Result<T, tokio::sync::oneshot::error::RecvError> {
    match r {
        Some(r) => r.await,
        None => std::future::pending().await,
    }
}

async fn opt_join<T>(h: Option<&mut JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match h {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
}

async fn opt_sleep(until: Option<Instant>) {
    match until {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// The link loop. Returns on shutdown (after killing tasks if configured) or a fatal error.
/// With `recovery`, the agent registers only once it fires (its executors are back or given
/// up).
#[allow(clippy::too_many_arguments)] // the agent's one loop: every channel it serves
pub(crate) async fn drive(
    cfg: &AgentConfig,
    layout: &Layout,
    core: &mut Core,
    events: &mut mpsc::UnboundedReceiver<(TaskKey, TaskEvent)>,
    exec_events: &mut mpsc::UnboundedReceiver<crate::executors::ExecutorEvent>,
    shutdown: &CancellationToken,
    conn_watch: &tokio::sync::watch::Sender<Option<quinn::Connection>>,
    mut recovery: Option<tokio::sync::oneshot::Receiver<()>>,
) -> Result<(), AgentError> {
    let (lookup_tx, mut lookups) = mpsc::channel::<OutputLookup>(256);
    let mut backoff = Backoff::new(CONNECT_INITIAL, CONNECT_MAX);
    let mut conn: Option<Connected> = None;
    // The highest leader epoch followed: a lower one is a deposed master.
    let mut epochs = EpochGuard::load(layout.root());
    let list = MasterSearch::new(&cfg.master)
        .map_err(|error| AgentError::Masters { list: cfg.master.clone(), error })?;
    let mut search = Masters { idle: Some(list.clone()), list };
    // Within this process, the search itself refuses epochs below the highest followed.
    let mut fence = EpochFence::default();
    // A restarted agent first learns from its executors what became of its tasks, then
    // registers with them.
    let mut connecting =
        if recovery.is_none() { Some(spawn_connect(cfg, &mut search, &fence)) } else { None };
    let mut retry_at: Option<Instant> = None;
    let gc_interval = cfg.gc.interval.max(Duration::from_millis(10));
    let mut gc_tick = tokio::time::interval_at(tokio::time::Instant::now() + gc_interval, gc_interval);
    gc_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // One collection at a time; a tick during one is skipped.
    let mut gc_job: Option<JoinHandle<GcStep>> = None;
    // Disk limits and output caps of running tasks: one check at a time, like collection.
    let disk_interval = core.disk_check_interval().max(Duration::from_millis(10));
    let mut disk_tick = tokio::time::interval_at(tokio::time::Instant::now() + disk_interval, disk_interval);
    disk_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut disk_job: Option<JoinHandle<Vec<crate::disk::Outcome>>> = None;
    // The caches' bound is kept on the collection tick.
    let mut cache_job: Option<JoinHandle<std::io::Result<crate::cache::Evicted>>> = None;
    let result = loop {
        // Whatever this iteration changed is checkpointed before anything leaves the agent.
        if let Err(e) = core.flush_checkpoint() {
            break Err(AgentError::Checkpointing(e));
        }
        if let Some(c) = &conn {
            for msg in core.take_outbox() {
                c.send(msg);
            }
        }
        let update_deadline = core.next_update_deadline();
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break Ok(()),
            Some((key, ev)) = events.recv() => {
                core.task_event(key, ev, Instant::now());
                // A burst of events is checkpointed with one write.
                drain_events(core, events, EVENT_BATCH);
            }
            Some(ev) = exec_events.recv() => {
                // Task events queued before this one (an executor's updates, ahead of the
                // note that they were handled) are checkpointed in the same batch.
                drain_events(core, events, usize::MAX);
                core.executor_event(ev);
            }
            r = opt_recv(recovery.as_mut()) => {
                recovery = None;
                if r.is_err() {
                    tracing::warn!("the executor manager ended before recovery finished");
                }
                tracing::info!("recovery done: registering with the master");
                connecting = Some(spawn_connect(cfg, &mut search, &fence));
            }
            Some(lookup) = lookups.recv() => {
                let _ = lookup.reply.send(core.lookup_output(&lookup.request));
            }
            ev = opt_next(conn.as_mut()) => {
                let lost = match ev {
                    LinkEvent::Message(msg) => match handle(cfg, layout, core, &mut conn, msg) {
                        Ok(Some(reason)) => Some(reason),
                        Ok(None) => {
                            if conn.as_ref().is_some_and(|c| c.registered) {
                                backoff.reset();
                            }
                            None
                        }
                        Err(e) => break Err(e),
                    },
                    LinkEvent::HeartbeatDue => {
                        if let Some(c) = &conn {
                            c.send(AgentMessage::Heartbeat);
                        }
                        None
                    }
                    LinkEvent::Lost(reason) => Some(reason),
                };
                if let Some(reason) = lost {
                    tracing::warn!(master = %cfg.master, "lost the master: {reason}; tasks keep running");
                    if let Some(c) = conn.take() {
                        c.abort("connection lost");
                    }
                    conn_watch.send_replace(None);
                    core.disconnected();
                    metrics::gauge!("agora_agent_connected").set(0.0);
                    retry_at = Some(Instant::now() + backoff.next_delay());
                }
            }
            res = opt_join(connecting.as_mut()) => {
                connecting = None;
                let res = match res {
                    Ok((s, res)) => {
                        search.idle = Some(s);
                        res
                    }
                    Err(e) => Err(ClientError::Stream(format!("connect task failed: {e}"))),
                };
                let res = res.and_then(|session| {
                    if fence.accept_epoch(session.epoch) {
                        return Ok(session);
                    }
                    session.conn.close(0u32.into(), b"deposed leader: older epoch");
                    let addr = session.conn.remote_address().to_string();
                    Err(ClientError::StaleEpoch { addr, epoch: session.epoch, seen: fence.highest() })
                });
                match res {
                    Ok(session) => match epochs.welcome(&session.master_id) {
                        Ok(Verdict::Stale { epoch, seen }) => {
                            // A deposed leader (cut off from etcd, still running): nothing it
                            // says may be acted on.
                            tracing::warn!(master_id = %session.master_id, epoch, seen,
                                "the master's epoch is older than one already followed (a deposed leader): dropping it");
                            session.conn.close(0u32.into(), b"stale leader epoch");
                            retry_at = Some(Instant::now() + backoff.next_delay());
                        }
                        verdict => {
                            if let Err(e) = verdict {
                                tracing::warn!(error = %e, "following the master without recording its epoch");
                            }
                            conn_watch.send_replace(Some(session.conn.clone()));
                            conn = Some(Connected::new(session, lookup_tx.clone()));
                            core.connected(Instant::now());
                            metrics::gauge!("agora_agent_connected").set(1.0);
                        }
                    },
                    Err(e) => {
                        let e = match fatal(&cfg.master, e) {
                            Ok(e) => e,
                            Err(fatal) => break Err(fatal),
                        };
                        let delay = backoff.next_delay();
                        if backoff.failures() <= 1 {
                            tracing::warn!(master = %cfg.master, retry_in = ?delay, "cannot reach the master: {e}");
                        } else {
                            tracing::info!(master = %cfg.master, attempt = backoff.failures(), retry_in = ?delay,
                                "cannot reach the master: {e}");
                        }
                        retry_at = Some(Instant::now() + delay);
                    }
                }
            }
            () = opt_sleep(retry_at) => {
                retry_at = None;
                connecting = Some(spawn_connect(cfg, &mut search, &fence));
            }
            () = opt_sleep(update_deadline) => core.poll_updates(Instant::now()),
            _ = gc_tick.tick() => {
                if gc_job.is_none() {
                    gc_job = gc_step(cfg, layout, core, None);
                }
                if cache_job.is_none() {
                    cache_job = core.cache_eviction().map(tokio::task::spawn_blocking);
                }
            }
            r = opt_join(cache_job.as_mut()) => {
                cache_job = None;
                match r {
                    Ok(Ok(e)) if !e.digests.is_empty() => {
                        metrics::counter!(crate::metrics::CACHE_EVICTIONS).increment(e.digests.len() as u64);
                        tracing::info!(digests = ?e.digests, freed = e.bytes, left = e.left,
                            "evicted the least recently used artifacts past --cache-size");
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "cannot bound the agent's caches"),
                    Err(e) => tracing::warn!(error = %e, "the cache eviction failed"),
                }
            }
            _ = disk_tick.tick() => {
                if disk_job.is_none() {
                    let checks = core.disk_checks();
                    if !checks.is_empty() {
                        let max = core.max_output_size();
                        disk_job = Some(tokio::task::spawn_blocking(move || crate::disk::check(checks, max)));
                    }
                }
            }
            r = opt_join(disk_job.as_mut()) => {
                disk_job = None;
                match r {
                    Ok(outcomes) => core.disk_checked(outcomes),
                    Err(e) => tracing::warn!(error = %e, "the disk check failed"),
                }
            }
            r = opt_join(gc_job.as_mut()) => {
                gc_job = match r {
                    Ok(step) => gc_step(cfg, layout, core, Some(step)),
                    Err(e) => {
                        tracing::warn!(error = %e, "sandbox collection failed");
                        None
                    }
                };
            }
        }
    };
    if let Some(h) = connecting.take() {
        h.abort();
    }
    if result.is_ok() && cfg.kill_tasks_on_shutdown {
        kill_all(cfg, core, events, conn.as_mut()).await;
    }
    if let Err(e) = core.flush_checkpoint() {
        tracing::error!(error = %e, "cannot checkpoint the agent's last changes");
    }
    if let Some(c) = conn.take() {
        for msg in core.take_outbox() {
            c.send(msg);
        }
        if result.is_ok() {
            c.close().await;
        } else {
            c.abort("agent stopping");
        }
    }
    result
}

/// Handles one master message. `Ok(Some(reason))` means: drop the connection.
fn handle(
    cfg: &AgentConfig,
    layout: &Layout,
    core: &mut Core,
    conn: &mut Option<Connected>,
    msg: MasterToAgent,
) -> Result<Option<String>, AgentError> {
    let now = Instant::now();
    match msg {
        MasterToAgent::Registered { agent_id, heartbeat_interval } => {
            let path = layout.agent_id_file();
            if core.agent_id() != Some(&agent_id) {
                write_agent_id(&path, &agent_id)
                    .map_err(|err| AgentError::Checkpoint { path: path.clone(), err })?;
            }
            tracing::info!(%agent_id, ?heartbeat_interval, "registered with the master");
            core.registered(agent_id);
            if let Some(c) = conn.as_mut() {
                c.registered(heartbeat_interval);
            }
        }
        MasterToAgent::RunTask { framework_id, task } => core.run_task(framework_id, task, now),
        MasterToAgent::KillTask { framework_id, task_id } => core.kill_task(framework_id, task_id, now),
        MasterToAgent::StatusAck { framework_id, task_id, uuid } => {
            core.ack(framework_id, task_id, uuid, now);
        }
        MasterToAgent::HeartbeatAck => {}
        MasterToAgent::ShutdownFramework { framework_id } => {
            tracing::info!(%framework_id, "the master shuts down a framework");
            core.shutdown_framework(&framework_id);
        }
        MasterToAgent::FrameworkMessage { framework_id, executor_id, data } => {
            core.framework_message(framework_id, executor_id, data);
        }
        MasterToAgent::ShutdownExecutor { framework_id, executor_id } => {
            core.shutdown_executor(framework_id, executor_id);
        }
        MasterToAgent::Error(e) => {
            if matches!(e.code, ErrorCode::Unauthorized | ErrorCode::VersionMismatch) {
                return Err(AgentError::Refused { master: cfg.master.clone(), error: e });
            }
            return Ok(Some(format!("the master reported an error: {e}")));
        }
    }
    Ok(None)
}

/// Shutdown with `kill_tasks_on_shutdown`: kill everything, wait (bounded) for the processes
/// to end, and pass their final updates on while still connected.
async fn kill_all(
    cfg: &AgentConfig,
    core: &mut Core,
    events: &mut mpsc::UnboundedReceiver<(TaskKey, TaskEvent)>,
    mut conn: Option<&mut Connected>,
) {
    let live = core.live_tasks();
    if live == 0 {
        return;
    }
    tracing::info!(tasks = live, "killing all tasks before shutting down");
    core.kill_all();
    // Tasks may carry their own grace; the longest sensible wait is bounded anyway.
    let deadline =
        tokio::time::Instant::now() + cfg.kill_grace.max(Duration::from_secs(1)) * 2 + Duration::from_secs(2);
    while core.live_tasks() > 0 {
        tokio::select! {
            Some((key, ev)) = events.recv() => core.task_event(key, ev, Instant::now()),
            ev = opt_next(conn.as_deref_mut()) => {
                match ev {
                    LinkEvent::Message(MasterToAgent::StatusAck { framework_id, task_id, uuid }) => {
                        core.ack(framework_id, task_id, uuid, Instant::now());
                    }
                    LinkEvent::Lost(_) => conn = None,
                    _ => {}
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                tracing::warn!(tasks = core.live_tasks(), "tasks still running at shutdown");
                break;
            }
        }
        if let Err(e) = core.flush_checkpoint() {
            tracing::error!(error = %e, "cannot checkpoint the agent's state");
        }
        if let Some(c) = conn.as_deref() {
            for msg in core.take_outbox() {
                c.send(msg);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let mut base = Duration::from_millis(100);
        for _ in 0..12 {
            let d = b.next_delay();
            assert!(d >= base / 2 && d <= base, "{d:?} not in [{:?}, {base:?}]", base / 2);
            base = (base * 2).min(Duration::from_secs(10));
        }
        assert_eq!(b.failures(), 12);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
