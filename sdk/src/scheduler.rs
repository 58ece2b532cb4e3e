//! The framework side: implement [`Scheduler`] and hand it to [`run`].
//!
//! ```no_run
//! use agora_sdk::scheduler::{run, Driver, DriverConfig, Scheduler};
//! use agora_sdk::{Offer, TaskStatus};
//!
//! struct Greedy;
//!
//! impl Scheduler for Greedy {
//!     async fn resource_offers(&mut self, driver: &Driver, offers: Vec<Offer>) {
//!         for offer in offers {
//!             driver.decline(vec![offer.id], Some(30.0)); // not hungry
//!         }
//!     }
//!     async fn status_update(&mut self, driver: &Driver, status: &TaskStatus) {
//!         println!("{} is {}", status.task_id, status.state);
//!     }
//! }
//!
//! # async fn example(cfg: DriverConfig) -> Result<(), agora_sdk::client::ClientError> {
//! run(cfg, &mut Greedy).await
//! # }
//! ```
//!
//! Calls on the [`Driver`] are queued and sent in order as soon as the callback returns; the
//! driver is `Clone` so tasks spawned from callbacks can keep using it. Status updates are
//! acknowledged after `status_update` returns unless [`DriverConfig::auto_acknowledge`] is off.
//! When the connection drops (or the master falls silent) the driver reconnects with backoff
//! and re-subscribes with the same framework id (failover), unless [`DriverConfig::reconnect`]
//! is off; see [`run`] and, for calls made meanwhile, [`Driver`].

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::client::{ClientError, Session};
use crate::masters::MasterSearch;
use crate::proto::*;
use crate::tls::TlsFiles;

/// Callbacks of a framework scheduler. Only offers and status updates must be handled.
///
/// Callbacks run one at a time on the driver's task and should return promptly (spawn long
/// work): the driver sends its heartbeats between them, and the master takes a framework
/// silent for 3 heartbeat intervals (6 s with `agora master`'s default) for gone.
pub trait Scheduler: Send {
    /// Subscribed with this id, the first time this driver subscribed (a later subscription
    /// after a lost connection calls [`Scheduler::reregistered`] instead).
    fn registered(&mut self, driver: &Driver, framework_id: &FrameworkId) -> impl Future<Output = ()> + Send {
        let _ = (driver, framework_id);
        async {}
    }

    /// New offers. Use them with [`Driver::launch`] / [`Driver::accept`], or
    /// [`Driver::decline`] them: unanswered offers hold resources other frameworks could use.
    fn resource_offers(&mut self, driver: &Driver, offers: Vec<Offer>) -> impl Future<Output = ()> + Send;

    /// An offer is no longer valid (its agent left, or it timed out).
    fn offer_rescinded(&mut self, driver: &Driver, offer_id: &OfferId) -> impl Future<Output = ()> + Send {
        let _ = (driver, offer_id);
        async {}
    }

    /// A task changed state.
    fn status_update(&mut self, driver: &Driver, status: &TaskStatus) -> impl Future<Output = ()> + Send;

    /// The master reported an error about a call.
    fn error(&mut self, driver: &Driver, error: &WireError) -> impl Future<Output = ()> + Send {
        let _ = driver;
        warn!(code = ?error.code, message = %error.message, "master reported an error");
        async {}
    }

    /// A message from one of this framework's executors (see [`Driver::send_framework_message`]).
    fn framework_message(
        &mut self,
        driver: &Driver,
        agent_id: &AgentId,
        executor_id: &ExecutorId,
        data: &[u8],
    ) -> impl Future<Output = ()> + Send {
        let _ = (driver, agent_id, executor_id, data);
        async {}
    }

    /// One of this framework's own executors ended; its unfinished tasks were failed with
    /// reason `executor terminated` (their updates come as usual).
    fn executor_exited(
        &mut self,
        driver: &Driver,
        agent_id: &AgentId,
        executor_id: &ExecutorId,
        message: &str,
    ) -> impl Future<Output = ()> + Send {
        let _ = (driver, agent_id, executor_id, message);
        async {}
    }

    /// An operator drains this agent (`agora agent drain`): it gets no new offers, and at
    /// `deadline_unix_ms` (Unix time in ms; `None`: no deadline) the tasks still running on
    /// it are killed with reason [`Reason::AgentDrained`] unless the operator chose not to
    /// kill them. Move work elsewhere before then. Called when the drain starts or changes,
    /// and after each subscription for every agent still draining.
    fn agent_draining(
        &mut self,
        driver: &Driver,
        agent_id: &AgentId,
        deadline_unix_ms: Option<u64>,
    ) -> impl Future<Output = ()> + Send {
        let _ = (driver, agent_id, deadline_unix_ms);
        async {}
    }

    /// The drain of this agent was called off (`agora agent undrain`): it is offered again.
    fn agent_undrained(&mut self, driver: &Driver, agent_id: &AgentId) -> impl Future<Output = ()> + Send {
        let _ = (driver, agent_id);
        async {}
    }

    /// The connection to the master was lost (a transport error, the master closed it, or it
    /// was silent for [`MISSED_HEARTBEATS`] heartbeat intervals). Every offer received so far
    /// is void. The driver reconnects and subscribes again with the same framework id
    /// ([`Scheduler::reregistered`]); meanwhile calls are handled as [`Driver`] describes.
    fn disconnected(&mut self, driver: &Driver) -> impl Future<Output = ()> + Send {
        let _ = driver;
        async {}
    }

    /// Subscribed again with the same framework id after [`Scheduler::disconnected`] (to the
    /// same master, to a restarted one, or to a new leader). An implicit reconciliation follows: the latest
    /// state of every live task comes as status updates. Tasks launched just before the loss
    /// may be unknown to the master: reconcile them explicitly ([`Driver::reconcile`]).
    fn reregistered(
        &mut self,
        driver: &Driver,
        framework_id: &FrameworkId,
    ) -> impl Future<Output = ()> + Send {
        let _ = (driver, framework_id);
        async {}
    }
}

/// How to reach the master and who this framework is.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// `host:port` of the master, or of several separated by commas: the driver connects to
    /// the leader among them and follows it (see [`crate::masters`]).
    pub master: String,
    pub tls: TlsFiles,
    pub framework: FrameworkInfo,
    /// Acknowledge status updates automatically after `status_update` returns (default).
    pub auto_acknowledge: bool,
    /// Reconnect and fail over when the connection drops (default), for as long as
    /// `framework.failover_timeout`. Off: `run` returns the error.
    pub reconnect: bool,
    /// A demand to state in the same flight as `Subscribe` (see [`Driver::request`]), so the
    /// first allocation already knows it. `None`: state none (whole-agent offers).
    pub demand: Option<Vec<Demand>>,
    /// The tasks `demand` names (see [`Driver::request_tasks`]); empty: none.
    pub demand_task_ids: Vec<Vec<TaskId>>,
}

impl DriverConfig {
    pub fn new(master: impl Into<String>, tls: TlsFiles, name: impl Into<String>) -> Self {
        DriverConfig {
            master: master.into(),
            tls,
            framework: FrameworkInfo {
                id: None,
                name: name.into(),
                role: "*".into(),
                failover_timeout: Duration::from_secs(60),
                hostname: hostname(),
                user: None,
            },
            auto_acknowledge: true,
            reconnect: true,
            demand: None,
            demand_task_ids: Vec::new(),
        }
    }
}

/// Takes tasks from the front of `queue`, in order, while they fit in `offered`; stops at the
/// first that does not (first-fit in queue order, so tasks keep their order). The usual body of
/// [`Scheduler::resource_offers`] for a framework with a queue of like tasks.
pub fn take_fitting(
    offered: &crate::Resources,
    queue: &mut std::collections::VecDeque<TaskInfo>,
) -> Vec<TaskInfo> {
    let mut left = offered.clone();
    let mut batch = Vec::new();
    while let Some(rest) = queue.front().and_then(|t| left.checked_sub(&t.resources)) {
        left = rest;
        batch.extend(queue.pop_front());
    }
    batch
}

/// This machine's host name (best effort).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// A framework message larger than [`MAX_FRAMEWORK_MESSAGE`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a framework message of {size} bytes is larger than the limit of {MAX_FRAMEWORK_MESSAGE} bytes")]
pub struct MessageTooLarge {
    /// The message's size.
    pub size: usize,
}

/// Calls the driver keeps while it is disconnected (kills, explicit reconciliations and
/// executor shutdowns), sent in order once it has subscribed again. A call beyond this many
/// is refused: [`Scheduler::error`] names it.
pub const MAX_HELD_CALLS: usize = 1024;
/// How many status update uuids the driver remembers, to deliver an update the master sends
/// again (after a failover, or an agent's retry) only once.
pub const DEDUP_WINDOW: usize = 4096;
/// Heartbeat intervals of silence after which the driver gives a connection up.
pub const MISSED_HEARTBEATS: u32 = 3;
/// First pause between reconnection attempts; it doubles up to [`BACKOFF_MAX`], with jitter.
pub const BACKOFF_MIN: Duration = Duration::from_millis(250);
/// Longest pause between reconnection attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a new connection may wait for `Subscribed`.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds on the heartbeat interval a master announces (a hostile or broken value must not
/// make the driver spin or never notice a dead master).
const HEARTBEAT_MIN: Duration = Duration::from_millis(100);
const HEARTBEAT_MAX: Duration = Duration::from_secs(60);
/// Most queued calls sent in one write before the driver looks at the master again.
const MAX_BATCH: usize = 1024;

enum Control {
    Call(SchedulerCall),
    Stop(Ending),
}

/// How [`run`] ends on the framework's request.
#[derive(Clone, Debug)]
enum Ending {
    /// The framework may fail over within its failover timeout.
    Leave,
    /// Teardown; with a reason, the killed tasks carry it.
    Teardown(Option<Reason>),
}

/// The uuids of the latest status updates delivered, bounded (oldest forgotten first), each
/// with whether its acknowledgement went out.
#[derive(Debug)]
struct RecentUpdates {
    order: VecDeque<Uuid>,
    acked: HashMap<Uuid, bool>,
    cap: usize,
}

impl RecentUpdates {
    fn new(cap: usize) -> Self {
        Self { order: VecDeque::new(), acked: HashMap::new(), cap: cap.max(1) }
    }

    /// Records a delivered update; false when it was delivered before (a duplicate).
    fn first_sight(&mut self, uuid: Uuid) -> bool {
        if self.acked.contains_key(&uuid) {
            return false;
        }
        self.acked.insert(uuid, false);
        self.order.push_back(uuid);
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.acked.remove(&old);
            }
        }
        true
    }

    fn mark_acked(&mut self, uuid: Uuid) {
        if let Some(a) = self.acked.get_mut(&uuid) {
            *a = true;
        }
    }

    fn acked(&self, uuid: Uuid) -> bool {
        self.acked.get(&uuid).copied().unwrap_or(false)
    }
}

/// What the driver carries from one connection to the next.
struct Carry {
    /// The latest demand, stated again after each subscription.
    demand: Option<Vec<Demand>>,
    /// The tasks the latest demand names ([`Driver::request_tasks`]).
    demand_ids: Vec<Vec<TaskId>>,
    /// The latest of SUPPRESS / REVIVE was SUPPRESS: stated again after each subscription.
    suppressed: bool,
    /// Calls made while disconnected, for the next subscription.
    held: VecDeque<SchedulerCall>,
    seen: RecentUpdates,
    /// Subscribed at least once (a later subscription is a re-registration).
    ever_subscribed: bool,
    /// Subscribed on the current connection.
    connected: bool,
    /// When the last subscribed connection was lost (the failover timeout runs from there).
    lost_at: Option<Instant>,
}

impl Carry {
    /// Keeps what a call changes of the state stated again after a failover.
    fn note(&mut self, call: &SchedulerCall) {
        match call {
            SchedulerCall::Request { demands } => {
                self.demand = Some(demands.clone());
                self.demand_ids.clear();
            }
            SchedulerCall::RequestTasks { demands, task_ids } => {
                self.demand = Some(demands.clone());
                self.demand_ids = task_ids.clone();
            }
            SchedulerCall::Suppress => self.suppressed = true,
            SchedulerCall::Revive => self.suppressed = false,
            SchedulerCall::Acknowledge { uuid, .. } => self.seen.mark_acked(*uuid),
            _ => {}
        }
    }
}

/// Sends calls to the master. Cheap to clone; usable from any task.
///
/// # While disconnected
///
/// The methods never block. Between losing the master and subscribing again, the driver:
/// - keeps kills, explicit reconciliations and executor shutdowns (at most
///   [`MAX_HELD_CALLS`]; the next one is refused through [`Scheduler::error`]) and sends them,
///   in order, right after the next `Subscribed`;
/// - keeps the latest demand ([`Driver::request`]) and suppress/revive state, and states them
///   again with the subscription;
/// - answers a launch ([`Driver::launch`], [`Driver::accept`]) at once with TASK_DROPPED
///   (reason [`Reason::MasterDisconnected`]) for each of its tasks: its offers are void;
/// - drops declines (void offers), framework messages (at most once) and acknowledgements
///   (the master sends every unacknowledged update again after the subscription, and the
///   driver acknowledges that copy).
#[derive(Clone)]
pub struct Driver {
    tx: mpsc::UnboundedSender<Control>,
    framework_id: Option<FrameworkId>,
    conn: watch::Receiver<Option<quinn::Connection>>,
}

impl Driver {
    fn call(&self, call: SchedulerCall) {
        // Fails only after `run` returned; calls then have nowhere to go.
        let _ = self.tx.send(Control::Call(call));
    }

    /// The framework's id, once subscribed.
    pub fn framework_id(&self) -> Option<&FrameworkId> {
        self.framework_id.as_ref()
    }

    /// Launches tasks on offers (all from one agent).
    pub fn launch(&self, offer_ids: Vec<OfferId>, tasks: Vec<TaskInfo>) {
        self.accept(offer_ids, vec![Operation::Launch { tasks }], None);
    }

    /// Accepts offers with operations; with `refuse_seconds` the unused rest is filtered.
    pub fn accept(&self, offer_ids: Vec<OfferId>, operations: Vec<Operation>, refuse_seconds: Option<f64>) {
        self.call(SchedulerCall::Accept { offer_ids, operations, refuse_seconds });
    }

    /// Declines offers; they are not re-offered to this framework for `refuse_seconds`
    /// (default 5 s). More than [`MAX_OFFER_IDS`] offers (one `Offers` event may hold more)
    /// go out as several calls, each within the master's bound.
    pub fn decline(&self, offer_ids: Vec<OfferId>, refuse_seconds: Option<f64>) {
        if offer_ids.len() <= MAX_OFFER_IDS {
            self.call(SchedulerCall::Decline { offer_ids, refuse_seconds });
            return;
        }
        for chunk in offer_ids.chunks(MAX_OFFER_IDS) {
            self.call(SchedulerCall::Decline { offer_ids: chunk.to_vec(), refuse_seconds });
        }
    }

    pub fn revive(&self) {
        self.call(SchedulerCall::Revive);
    }

    pub fn suppress(&self) {
        self.call(SchedulerCall::Suppress);
    }

    /// States the framework's pending demand (`count` tasks of each shape); it replaces the
    /// previous one, so lower it as tasks launch. Offers are then sized to what the framework
    /// can use. The driver states the latest demand again after a failover.
    pub fn request(&self, demands: Vec<Demand>) {
        self.call(SchedulerCall::Request { demands });
    }

    /// [`request`](Self::request) naming the tasks that wait: `task_ids[i]` are those of
    /// `demands[i]`. Operators see them pending (`agora tasks`) with why they wait; the first
    /// [`MAX_PENDING_IDS`] are kept.
    pub fn request_tasks(&self, demands: Vec<Demand>, mut task_ids: Vec<Vec<TaskId>>) {
        let mut left = MAX_PENDING_IDS;
        for ids in &mut task_ids {
            ids.truncate(left);
            left -= ids.len();
        }
        self.call(SchedulerCall::RequestTasks { demands, task_ids });
    }

    pub fn kill(&self, task_id: TaskId) {
        self.call(SchedulerCall::Kill { task_id });
    }

    /// Sends `data` to one of this framework's executors on `agent_id`: at most once (a message
    /// for an executor that is not running is dropped), at most [`MAX_FRAMEWORK_MESSAGE`] bytes.
    pub fn send_framework_message(
        &self,
        agent_id: AgentId,
        executor_id: ExecutorId,
        data: Vec<u8>,
    ) -> Result<(), MessageTooLarge> {
        if data.len() > MAX_FRAMEWORK_MESSAGE {
            return Err(MessageTooLarge { size: data.len() });
        }
        self.call(SchedulerCall::Message { agent_id, executor_id, data });
        Ok(())
    }

    /// Shuts one of this framework's executors down on `agent_id`; its tasks are killed.
    pub fn shutdown_executor(&self, agent_id: AgentId, executor_id: ExecutorId) {
        self.call(SchedulerCall::ShutdownExecutor { agent_id, executor_id });
    }

    /// Asks for the state of these tasks (all of the framework's tasks when empty).
    pub fn reconcile(&self, task_ids: Vec<TaskId>) {
        self.call(SchedulerCall::Reconcile { task_ids });
    }

    /// Acknowledges an update (only needed with `auto_acknowledge` off).
    pub fn acknowledge(&self, status: &TaskStatus) {
        if let (Some(agent_id), Some(uuid)) = (status.agent_id.clone(), status.uuid) {
            self.call(SchedulerCall::Acknowledge { agent_id, task_id: status.task_id.clone(), uuid });
        }
    }

    /// Ends `run`. With `teardown` the master kills all tasks and forgets the framework;
    /// without, the framework may fail over within its failover timeout. While disconnected
    /// the teardown cannot reach the master: it removes the framework after its failover
    /// timeout.
    pub fn stop(&self, teardown: bool) {
        let _ = self.tx.send(Control::Stop(if teardown { Ending::Teardown(None) } else { Ending::Leave }));
    }

    /// Ends `run` with a teardown whose killed tasks end with `reason` (e.g. `run interrupted`)
    /// rather than `killed`; cut to [`MAX_TEARDOWN_REASON`] bytes. As [`Driver::stop`] otherwise.
    pub fn stop_because(&self, reason: impl Into<Reason>) {
        let mut reason = reason.into();
        let text = reason.as_str();
        if text.len() > MAX_TEARDOWN_REASON {
            let mut end = MAX_TEARDOWN_REASON;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            reason = Reason::parse(&text[..end]);
        }
        let _ = self.tx.send(Control::Stop(Ending::Teardown(Some(reason))));
    }

    /// The current connection to the master (for output streams), while subscribed.
    pub fn connection(&self) -> Option<quinn::Connection> {
        self.conn.borrow().clone()
    }

    /// Waits until the driver is subscribed on a connection other than `after` (for a stream
    /// that broke with `after`: the driver's next connection). `None` once [`run`] returned.
    pub async fn next_connection(&self, after: Option<&quinn::Connection>) -> Option<quinn::Connection> {
        let old = after.map(quinn::Connection::stable_id);
        let mut rx = self.conn.clone();
        let found = rx.wait_for(|c| c.as_ref().is_some_and(|c| Some(c.stable_id()) != old)).await;
        found.ok().and_then(|c| c.clone())
    }
}

/// Runs the scheduler until [`Driver::stop`], or until the master is given up.
///
/// The first connection's failure is returned at once. After that, when the connection is
/// lost (a transport error, the master closing it, or [`MISSED_HEARTBEATS`] heartbeat
/// intervals without a word from the master), the driver calls [`Scheduler::disconnected`],
/// reconnects with capped exponential backoff and jitter, and subscribes again with its
/// framework id ([`Scheduler::reregistered`]). Each attempt searches the master list for the
/// leader ([`MasterSearch::connect`]: the last leader first, following a standby's redirect)
/// and refuses a master whose epoch is lower than one seen before (a deposed leader). It
/// gives up, returning the error, when the
/// master refuses the id (unknown framework, another principal), when it could not subscribe
/// again within the framework's failover timeout ([`ClientError::FailoverExpired`]), or at
/// once with [`DriverConfig::reconnect`] off.
///
/// After every subscription the driver asks for an implicit reconciliation (the state of
/// all the framework's live tasks), and it sends `Heartbeat` every interval the master names.
/// Updates carrying a uuid reach [`Scheduler::status_update`] once even when the master
/// sends them again (the driver remembers the last [`DEDUP_WINDOW`]); a duplicate is still
/// acknowledged when its first copy was.
pub async fn run<S: Scheduler>(config: DriverConfig, scheduler: &mut S) -> Result<(), ClientError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (conn_tx, conn_rx) = watch::channel(None);
    let mut driver = Driver { tx, framework_id: config.framework.id.clone(), conn: conn_rx };
    let mut carry = Carry {
        demand: config.demand.clone(),
        demand_ids: config.demand_task_ids.clone(),
        suppressed: false,
        held: VecDeque::new(),
        seen: RecentUpdates::new(DEDUP_WINDOW),
        ever_subscribed: false,
        connected: false,
        lost_at: None,
    };
    let failover = config.framework.failover_timeout;
    let mut backoff = BACKOFF_MIN;
    let mut search = MasterSearch::new(&config.master)?;
    loop {
        // The first connection waits out a leader election (standbys that know no leader
        // yet); later ones have the failover loop's backoff.
        let first = !carry.ever_subscribed;
        let (search, tls) = (&mut search, &config.tls);
        let connect = async move {
            if first {
                search.connect_patiently(tls, Role::Framework).await
            } else {
                search.connect(tls, Role::Framework).await
            }
        };
        let Some(connected) = offline(connect, &mut rx, &mut carry, &driver, scheduler).await else {
            return Ok(());
        };
        let error = match connected {
            Ok(session) => {
                let conn = session.conn.clone();
                match serve(&config, &mut driver, &conn_tx, &mut rx, session, scheduler, &mut carry).await {
                    Ok(()) => {
                        conn_tx.send_replace(None);
                        return Ok(());
                    }
                    Err(e) => {
                        // Given up: streams opened on it (task output) must notice and move
                        // to the next connection rather than wait on a dead one.
                        conn.close(0u32.into(), b"connection given up");
                        e
                    }
                }
            }
            Err(e) => e,
        };
        if refuses_the_framework(&error) || !config.reconnect || !carry.ever_subscribed {
            conn_tx.send_replace(None);
            return Err(error);
        }
        if std::mem::take(&mut carry.connected) {
            warn!(error = %error, "lost the master; failing over");
            conn_tx.send_replace(None);
            carry.lost_at = Some(Instant::now());
            backoff = BACKOFF_MIN;
            scheduler.disconnected(&driver).await;
        } else {
            debug!(error = %error, "the master is still unreachable");
        }
        let lost_for = carry.lost_at.map_or(Duration::ZERO, |t| t.elapsed());
        let Some(left) = failover.checked_sub(lost_for).filter(|d| !d.is_zero()) else {
            warn!(?failover, "could not subscribe again within the failover timeout; giving up");
            return Err(ClientError::FailoverExpired { after: failover });
        };
        let pause = jittered(backoff).min(left);
        if offline(tokio::time::sleep(pause), &mut rx, &mut carry, &driver, scheduler).await.is_none() {
            return Ok(());
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Between a half and the whole of `d`, at random (so that many frameworks that lost one
/// master do not all come back in the same instant).
fn jittered(d: Duration) -> Duration {
    let r = (Uuid::new_v4().as_u128() % 1000) as u32;
    d / 2 + d / 2 * r / 1000
}

/// Whether retrying cannot help: the master refused this framework (an unknown id, another
/// principal), speaks another protocol, or the local TLS files are unusable.
fn refuses_the_framework(e: &ClientError) -> bool {
    match e {
        ClientError::Refused(w) => {
            matches!(w.code, ErrorCode::NotFound | ErrorCode::Unauthorized | ErrorCode::VersionMismatch)
        }
        ClientError::Tls(_) | ClientError::Config(_) => true,
        _ => false,
    }
}

/// Drives `fut` (a connection attempt, a pause) while taking the framework's calls as a
/// disconnected driver does. `None`: the framework stopped the driver meanwhile.
async fn offline<F: Future, S: Scheduler>(
    fut: F,
    rx: &mut mpsc::UnboundedReceiver<Control>,
    carry: &mut Carry,
    driver: &Driver,
    scheduler: &mut S,
) -> Option<F::Output> {
    tokio::pin!(fut);
    loop {
        tokio::select! {
            out = &mut fut => return Some(out),
            ctl = rx.recv() => match ctl {
                Some(Control::Call(call)) => hold(call, carry, driver, scheduler).await,
                Some(Control::Stop(ending)) => {
                    if matches!(ending, Ending::Teardown(_)) {
                        warn!("stopped while disconnected: the teardown cannot reach the master, which \
                               removes the framework after its failover timeout");
                    }
                    return None;
                }
                None => return None,
            },
        }
    }
}

/// A call made while no subscribed connection exists (see [`Driver`]).
async fn hold<S: Scheduler>(call: SchedulerCall, carry: &mut Carry, driver: &Driver, scheduler: &mut S) {
    carry.note(&call);
    match call {
        SchedulerCall::Accept { operations, .. } => {
            let fw = driver.framework_id.clone().unwrap_or_else(|| FrameworkId::new(""));
            for task in operations.into_iter().flat_map(|Operation::Launch { tasks }| tasks) {
                let status = local_status(
                    &fw,
                    task.task_id,
                    TaskState::Dropped,
                    Reason::MasterDisconnected,
                    "the driver was not connected to the master: the launch was not sent and its \
                     offers are void"
                        .into(),
                );
                scheduler.status_update(driver, &status).await;
            }
        }
        SchedulerCall::Reconcile { ref task_ids } if task_ids.is_empty() => {
            // Every subscription is followed by an implicit reconciliation anyway.
        }
        call @ (SchedulerCall::Kill { .. }
        | SchedulerCall::Reconcile { .. }
        | SchedulerCall::ShutdownExecutor { .. }) => {
            if carry.held.len() < MAX_HELD_CALLS {
                carry.held.push_back(call);
            } else {
                let message = format!(
                    "the driver is disconnected and already holds {MAX_HELD_CALLS} calls; this one \
                     was dropped: {}",
                    describe(&call)
                );
                scheduler.error(driver, &WireError::new(ErrorCode::TooLarge, message)).await;
            }
        }
        other => debug!(call = describe(&other), "dropped while disconnected"),
    }
}

/// A call in a few words, for logs and errors.
fn describe(call: &SchedulerCall) -> String {
    match call {
        SchedulerCall::Kill { task_id } => format!("kill of task {task_id}"),
        SchedulerCall::Reconcile { task_ids } => format!("reconciliation of {} tasks", task_ids.len()),
        SchedulerCall::ShutdownExecutor { agent_id, executor_id } => {
            format!("shutdown of executor {executor_id} on agent {agent_id}")
        }
        SchedulerCall::Acknowledge { task_id, .. } => format!("acknowledgement for task {task_id}"),
        SchedulerCall::Decline { offer_ids, .. } => format!("decline of {} offers", offer_ids.len()),
        SchedulerCall::Message { executor_id, .. } => format!("message to executor {executor_id}"),
        other => format!("{other:?}").chars().take(40).collect(),
    }
}

/// A status update the driver makes itself (no uuid: nothing to acknowledge).
fn local_status(
    fw: &FrameworkId,
    task_id: TaskId,
    state: TaskState,
    reason: Reason,
    message: String,
) -> TaskStatus {
    TaskStatus {
        task_id,
        framework_id: fw.clone(),
        agent_id: None,
        state,
        uuid: None,
        source: UpdateSource::Master,
        reason,
        message,
        exit_code: None,
        signal: None,
        usage: None,
        timestamp_ms: unix_millis(),
    }
}

/// What a batch of queued calls came to.
enum Batch {
    /// Sent; launches too large to send come back as TASK_ERROR updates.
    Sent(Vec<TaskStatus>),
    /// The framework stopped the driver (with teardown or not).
    Stop(Ending),
}

/// Sends `first` and whatever else is queued (up to [`MAX_BATCH`]) in one write.
async fn send_batch(
    session: &mut Session,
    first: Control,
    rx: &mut mpsc::UnboundedReceiver<Control>,
    carry: &mut Carry,
    fw: &FrameworkId,
) -> Result<Batch, ClientError> {
    let mut refused = Vec::new();
    let mut next = Some(first);
    let mut n = 0;
    while let Some(ctl) = next.take() {
        match ctl {
            Control::Call(call) => {
                carry.note(&call);
                send_call(session, call, fw, &mut refused).await?;
            }
            Control::Stop(ending) => return Ok(Batch::Stop(ending)),
        }
        n += 1;
        if n < MAX_BATCH {
            next = rx.try_recv().ok();
        }
    }
    session.writer.flush().await?;
    Ok(Batch::Sent(refused))
}

/// The error a connection ended with: the master's refusal when it closed the connection
/// with one (an unknown or foreign framework id), else `fallback`.
async fn ended(session: &Session, fallback: ClientError) -> ClientError {
    // The master sends its error, then closes: give the close a moment to arrive.
    let reason = match session.conn.close_reason() {
        Some(r) => r,
        None => match tokio::time::timeout(Duration::from_millis(500), session.conn.closed()).await {
            Ok(r) => r,
            Err(_) => return fallback,
        },
    };
    if let quinn::ConnectionError::ApplicationClosed(close) = &reason {
        if let Some(code) = ErrorCode::from_close_code(close.error_code.into_inner()) {
            if matches!(code, ErrorCode::NotFound | ErrorCode::Unauthorized) {
                let message = String::from_utf8_lossy(&close.reason).into_owned();
                return ClientError::Refused(WireError::new(code, message));
            }
        }
    }
    match fallback {
        ClientError::Closed => ClientError::Connection(reason),
        other => other,
    }
}

async fn serve<S: Scheduler>(
    config: &DriverConfig,
    driver: &mut Driver,
    conn_tx: &watch::Sender<Option<quinn::Connection>>,
    rx: &mut mpsc::UnboundedReceiver<Control>,
    mut session: Session,
    scheduler: &mut S,
    carry: &mut Carry,
) -> Result<(), ClientError> {
    let mut info = config.framework.clone();
    info.id = driver.framework_id.clone();
    session.writer.feed(&SchedulerCall::Subscribe(info)).await?;
    if let Some(demands) = carry.demand.clone() {
        let call = if carry.demand_ids.is_empty() {
            SchedulerCall::Request { demands }
        } else {
            SchedulerCall::RequestTasks { demands, task_ids: carry.demand_ids.clone() }
        };
        session.writer.feed(&call).await?;
    }
    if carry.suppressed {
        session.writer.feed(&SchedulerCall::Suppress).await?;
    }
    session.writer.flush().await?;
    // Some once subscribed on this connection.
    let mut heartbeat: Option<Duration> = None;
    let mut quiet_until = Instant::now() + SUBSCRIBE_TIMEOUT;
    let mut next_beat = Instant::now() + HEARTBEAT_MAX;
    loop {
        let hb_now = heartbeat;
        let silent = move || ClientError::Silent {
            after: hb_now.map_or(SUBSCRIBE_TIMEOUT, |hb| hb * MISSED_HEARTBEATS),
        };
        let event = tokio::select! {
            ev = session.reader.recv::<SchedulerEvent>() => ev,
            () = tokio::time::sleep_until(quiet_until.into()) => {
                // After a long callback the deadline may pass with the master's events
                // waiting to be read: only an empty stream is silence.
                match futures::FutureExt::now_or_never(session.reader.recv::<SchedulerEvent>()) {
                    Some(ev) => ev,
                    None => return Err(silent()),
                }
            }
            () = tokio::time::sleep_until(next_beat.into()), if heartbeat.is_some() => {
                let beat = session.writer.send(&SchedulerCall::Heartbeat);
                match tokio::time::timeout_at(quiet_until.into(), beat).await {
                    Ok(r) => r?,
                    Err(_) => return Err(silent()),
                }
                next_beat += heartbeat.unwrap_or(HEARTBEAT_MAX);
                continue;
            }
            ctl = rx.recv() => {
                let Some(ctl) = ctl else { return finish(session, Ending::Leave).await };
                if heartbeat.is_none() {
                    // Not subscribed on this connection yet.
                    match ctl {
                        Control::Call(call) => hold(call, carry, driver, scheduler).await,
                        Control::Stop(ending) => return finish(session, ending).await,
                    }
                    continue;
                }
                let fw = driver.framework_id.clone().unwrap_or_else(|| FrameworkId::new(""));
                let batch = send_batch(&mut session, ctl, rx, carry, &fw);
                match tokio::time::timeout_at(quiet_until.into(), batch).await {
                    Err(_) => return Err(silent()),
                    Ok(Err(e)) => return Err(e),
                    Ok(Ok(Batch::Stop(ending))) => return finish(session, ending).await,
                    Ok(Ok(Batch::Sent(refused))) => {
                        for status in refused {
                            scheduler.status_update(driver, &status).await;
                        }
                    }
                }
                continue;
            }
        };
        let event = match event {
            Ok(Some(event)) => event,
            Ok(None) => return Err(ended(&session, ClientError::Closed).await),
            Err(e) => return Err(ended(&session, e.into()).await),
        };
        // A master silent for this long is gone, whatever the transport says.
        quiet_until = Instant::now() + heartbeat.map_or(SUBSCRIBE_TIMEOUT, |hb| hb * MISSED_HEARTBEATS);
        match event {
            SchedulerEvent::Subscribed { framework_id, heartbeat_interval } => {
                let hb = heartbeat_interval.clamp(HEARTBEAT_MIN, HEARTBEAT_MAX);
                heartbeat = Some(hb);
                next_beat = Instant::now() + hb;
                quiet_until = Instant::now() + hb * MISSED_HEARTBEATS;
                driver.framework_id = Some(framework_id.clone());
                // What was asked while disconnected, then the implicit reconciliation.
                let held: Vec<SchedulerCall> = carry.held.drain(..).collect();
                let flight = async {
                    for call in &held {
                        session.writer.feed(call).await?;
                    }
                    session.writer.feed(&SchedulerCall::Reconcile { task_ids: Vec::new() }).await?;
                    session.writer.flush().await
                };
                match tokio::time::timeout_at(quiet_until.into(), flight).await {
                    Ok(r) => r?,
                    Err(_) => return Err(silent()),
                }
                carry.connected = true;
                carry.lost_at = None;
                conn_tx.send_replace(Some(session.conn.clone()));
                if std::mem::replace(&mut carry.ever_subscribed, true) {
                    info!(%framework_id, "subscribed again");
                    scheduler.reregistered(driver, &framework_id).await;
                } else {
                    info!(%framework_id, "subscribed");
                    scheduler.registered(driver, &framework_id).await;
                }
            }
            SchedulerEvent::Offers(offers) => scheduler.resource_offers(driver, offers).await,
            SchedulerEvent::Rescind { offer_id } => scheduler.offer_rescinded(driver, &offer_id).await,
            SchedulerEvent::Update(status) => match status.uuid {
                Some(uuid) if !carry.seen.first_sight(uuid) => {
                    debug!(task_id = %status.task_id, %uuid, "update delivered before; acknowledging it again");
                    if config.auto_acknowledge || carry.seen.acked(uuid) {
                        driver.acknowledge(&status);
                    }
                }
                _ => {
                    scheduler.status_update(driver, &status).await;
                    if config.auto_acknowledge {
                        driver.acknowledge(&status);
                    }
                }
            },
            SchedulerEvent::Error(e) => {
                if heartbeat.is_none() {
                    // Refused before subscription (unknown framework id, bad principal, …).
                    return Err(ClientError::Refused(e));
                }
                scheduler.error(driver, &e).await;
            }
            SchedulerEvent::Heartbeat => debug!("heartbeat"),
            SchedulerEvent::Message { agent_id, executor_id, data } => {
                scheduler.framework_message(driver, &agent_id, &executor_id, &data).await
            }
            SchedulerEvent::ExecutorExited { agent_id, executor_id, message } => {
                scheduler.executor_exited(driver, &agent_id, &executor_id, &message).await
            }
            SchedulerEvent::AgentDraining { agent_id, deadline_unix_ms } => {
                scheduler.agent_draining(driver, &agent_id, deadline_unix_ms).await
            }
            SchedulerEvent::AgentUndrained { agent_id } => scheduler.agent_undrained(driver, &agent_id).await,
        }
    }
}

/// Queues `call`. An ACCEPT too large for one frame is not sent (the session would fail):
/// its offers are declined instead and each of its tasks comes back to the scheduler as
/// TASK_ERROR in `refused`, saying to launch fewer tasks per offer.
async fn send_call(
    session: &mut Session,
    call: SchedulerCall,
    fw: &FrameworkId,
    refused: &mut Vec<TaskStatus>,
) -> Result<(), ClientError> {
    let max = match session.writer.feed(&call).await {
        Err(crate::frame::FrameError::TooLarge { max }) => max,
        other => return other.map_err(Into::into),
    };
    let SchedulerCall::Accept { offer_ids, operations, .. } = call else {
        return Err(crate::frame::FrameError::TooLarge { max }.into());
    };
    let tasks: Vec<TaskInfo> = operations
        .into_iter()
        .flat_map(|op| match op {
            Operation::Launch { tasks } => tasks,
        })
        .collect();
    warn!(tasks = tasks.len(), max, "an ACCEPT does not fit in one message; declining its offers");
    let message = format!(
        "the ACCEPT launching these {} tasks is larger than the {max}-byte message limit; \
         launch fewer tasks per ACCEPT (its offers were declined)",
        tasks.len()
    );
    for task in tasks {
        refused.push(local_status(
            fw,
            task.task_id,
            TaskState::Error,
            Reason::LaunchTooLarge,
            message.clone(),
        ));
    }
    session.writer.feed(&SchedulerCall::Decline { offer_ids, refuse_seconds: None }).await.map_err(Into::into)
}

/// How long [`finish`] lets the endpoint send its close before returning.
const CLOSE_GRACE: Duration = Duration::from_millis(20);

async fn finish(mut session: Session, ending: Ending) -> Result<(), ClientError> {
    match ending {
        Ending::Teardown(None) => session.writer.send(&SchedulerCall::Teardown).await?,
        Ending::Teardown(Some(reason)) => {
            session.writer.send(&SchedulerCall::TeardownBecause { reason }).await?
        }
        Ending::Leave => session.writer.flush().await?,
    }
    let mut send = session.writer.into_inner();
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
    session.conn.close(0u32.into(), b"bye");
    // The close frame leaves at the endpoint's next poll; the draining period after it (three
    // probe timeouts, ~85 ms on loopback) protects nothing the master still needs (the teardown
    // was acknowledged above), so it is not waited out in full: short-lived clients such as
    // `agora run` would pay it on every run.
    let _ = tokio::time::timeout(CLOSE_GRACE, session.endpoint.wait_idle()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Resources;

    #[test]
    fn a_decline_of_more_offers_than_one_call_may_name_is_split() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (_conn_tx, conn) = watch::channel(None);
        let driver = Driver { tx, framework_id: None, conn };
        let ids: Vec<OfferId> = (0..MAX_OFFER_IDS * 2 + 5).map(|i| OfferId::new(format!("o{i}"))).collect();
        driver.decline(ids.clone(), Some(3.0));
        let mut sent = Vec::new();
        while let Ok(Control::Call(SchedulerCall::Decline { offer_ids, refuse_seconds })) = rx.try_recv() {
            assert!(offer_ids.len() <= MAX_OFFER_IDS, "{} ids in one call", offer_ids.len());
            assert_eq!(refuse_seconds, Some(3.0));
            sent.extend(offer_ids);
        }
        assert_eq!(sent, ids, "every offer declined once, in order");
    }

    fn task(id: &str, res: &str) -> TaskInfo {
        TaskInfo {
            task_id: TaskId(id.into()),
            name: id.into(),
            resources: Resources::parse(res).unwrap(),
            kind: TaskKind::Command(CommandInfo { argv: vec!["true".into()], shell: false, env: vec![] }),
            kill_grace: None,
            user: None,
        }
    }

    #[test]
    fn recent_updates_deliver_each_uuid_once_within_the_window() {
        let mut seen = RecentUpdates::new(3);
        let u = |n: u128| Uuid::from_u128(n);
        assert!(seen.first_sight(u(1)));
        assert!(!seen.first_sight(u(1)), "a redelivered update is a duplicate");
        assert!(!seen.acked(u(1)));
        seen.mark_acked(u(1));
        assert!(seen.acked(u(1)));
        assert!(seen.first_sight(u(2)));
        assert!(seen.first_sight(u(3)));
        assert!(!seen.first_sight(u(2)));
        // A fourth uuid pushes the oldest out: the window stays bounded.
        assert!(seen.first_sight(u(4)));
        assert_eq!(seen.order.len(), 3);
        assert_eq!(seen.acked.len(), 3);
        assert!(!seen.acked(u(1)), "forgotten");
        assert!(seen.first_sight(u(1)), "an update older than the window is delivered again");
        assert!(!seen.first_sight(u(4)));
        // Acknowledging an unknown uuid changes nothing.
        seen.mark_acked(u(99));
        assert!(!seen.acked(u(99)));
    }

    #[test]
    fn carry_keeps_demand_suppression_and_acknowledgements() {
        let mut carry = Carry {
            demand: None,
            demand_ids: Vec::new(),
            suppressed: false,
            held: VecDeque::new(),
            seen: RecentUpdates::new(8),
            ever_subscribed: true,
            connected: false,
            lost_at: None,
        };
        let uuid = Uuid::from_u128(7);
        assert!(carry.seen.first_sight(uuid));
        carry.note(&SchedulerCall::Suppress);
        carry.note(&SchedulerCall::Request { demands: vec![] });
        carry.note(&SchedulerCall::Acknowledge {
            agent_id: AgentId::new("a"),
            task_id: TaskId::new("t"),
            uuid,
        });
        assert!(carry.suppressed);
        assert_eq!(carry.demand, Some(vec![]));
        assert!(carry.seen.acked(uuid));
        carry.note(&SchedulerCall::Revive);
        assert!(!carry.suppressed);
    }

    #[test]
    fn backoff_jitter_stays_between_half_and_whole() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(4));
            assert!(d >= Duration::from_secs(2) && d <= Duration::from_secs(4), "{d:?}");
        }
    }

    #[test]
    fn only_refusals_of_the_framework_end_the_failover() {
        let refused = |code| ClientError::Refused(WireError::new(code, "x"));
        assert!(refuses_the_framework(&refused(ErrorCode::NotFound)));
        assert!(refuses_the_framework(&refused(ErrorCode::Unauthorized)));
        assert!(!refuses_the_framework(&refused(ErrorCode::Internal)));
        assert!(!refuses_the_framework(&ClientError::Closed));
        assert!(!refuses_the_framework(&ClientError::Silent { after: Duration::from_secs(3) }));
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_close_code(code.close_code().into()), Some(code));
        }
        assert_eq!(ErrorCode::from_close_code(0), None);
    }

    #[test]
    fn take_fitting_keeps_queue_order_and_stops_at_the_first_misfit() {
        let mut q: std::collections::VecDeque<TaskInfo> =
            [task("a", "cpus:1"), task("b", "cpus:1"), task("c", "cpus:2"), task("d", "cpus:0.5")].into();
        let got = take_fitting(&Resources::parse("cpus:2.5;mem:1GiB").unwrap(), &mut q);
        let ids: Vec<&str> = got.iter().map(|t| t.task_id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(q.len(), 2);
        assert!(take_fitting(&Resources::parse("cpus:1").unwrap(), &mut q).is_empty());
    }

    /// A fake master for the driver: each connection gets `Welcome` with the epoch `epoch`
    /// holds, then `Subscribed` for each `Subscribe` (counted in `subscribes`). With
    /// `one_session`, the first subscribed connection is closed after a moment and later
    /// connections are refused: the master died.
    fn fake_master(
        tls: &std::path::Path,
        epoch: std::sync::Arc<std::sync::atomic::AtomicU64>,
        subscribes: std::sync::Arc<std::sync::atomic::AtomicU32>,
        one_session: bool,
    ) -> String {
        use std::sync::atomic::Ordering;
        let cfg = crate::transport::server_config(&TlsFiles::in_dir(tls, "master")).unwrap();
        let endpoint = quinn::Endpoint::server(cfg, ([127, 0, 0, 1], 0).into()).unwrap();
        let addr = endpoint.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let mut served = false;
            while let Some(incoming) = endpoint.accept().await {
                if one_session && served {
                    incoming.refuse();
                    continue;
                }
                served = true;
                let (epoch, subscribes) = (epoch.clone(), subscribes.clone());
                let Ok(conn) = incoming.await else { continue };
                let serve = async move {
                    let Ok((send, recv)) = conn.accept_bi().await else { return };
                    let mut w = crate::frame::FrameWriter::new(send);
                    let mut r = crate::frame::FrameReader::new(recv);
                    let Ok(Some(Hello { .. })) = r.recv::<Hello>().await else { return };
                    let epoch = epoch.load(Ordering::SeqCst);
                    let welcome = HelloReply::Welcome {
                        version: PROTOCOL_VERSION,
                        master_id: format!("m-{epoch}"),
                        epoch,
                    };
                    if w.send(&welcome).await.is_err() {
                        return;
                    }
                    while let Ok(Some(call)) = r.recv::<SchedulerCall>().await {
                        if let SchedulerCall::Subscribe(_) = call {
                            subscribes.fetch_add(1, Ordering::SeqCst);
                            let ev = SchedulerEvent::Subscribed {
                                framework_id: FrameworkId::new("fw-1"),
                                heartbeat_interval: Duration::from_secs(1),
                            };
                            let _ = w.send(&ev).await;
                            if one_session {
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                conn.close(0u32.into(), b"master dies");
                                return;
                            }
                        }
                    }
                };
                tokio::spawn(serve);
            }
        });
        addr
    }

    /// Counts subscriptions and re-subscriptions.
    struct Counting(mpsc::UnboundedSender<&'static str>);

    impl Scheduler for Counting {
        async fn registered(&mut self, _: &Driver, _: &FrameworkId) {
            let _ = self.0.send("registered");
        }
        async fn reregistered(&mut self, _: &Driver, _: &FrameworkId) {
            let _ = self.0.send("reregistered");
        }
        async fn resource_offers(&mut self, _: &Driver, _: Vec<Offer>) {}
        async fn status_update(&mut self, _: &Driver, _: &TaskStatus) {}
    }

    async fn next(rx: &mut mpsc::UnboundedReceiver<&'static str>) -> Option<&'static str> {
        tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.ok().flatten()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_driver_refuses_a_deposed_leader_and_fails_over_to_the_new_one() {
        use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        crate::tls::init(dir.path(), "tester", false).unwrap();
        // The leader of epoch 5, which dies after the first subscription...
        let (a_subs, b_subs) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let a = fake_master(dir.path(), Arc::new(AtomicU64::new(5)), a_subs.clone(), true);
        // ...and a master still welcoming with the older epoch 3 (deposed, unaware).
        let b_epoch = Arc::new(AtomicU64::new(3));
        let b = fake_master(dir.path(), b_epoch.clone(), b_subs.clone(), false);
        let mut cfg =
            DriverConfig::new(format!("{a},{b}"), TlsFiles::in_dir(dir.path(), "framework"), "fenced");
        cfg.framework.failover_timeout = Duration::from_secs(60);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let run = tokio::spawn(async move { run(cfg, &mut Counting(tx)).await });
        assert_eq!(next(&mut rx).await, Some("registered"));
        assert_eq!(a_subs.load(Ordering::SeqCst), 1);
        // The driver keeps searching: B's Welcome (epoch 3) is refused every time, so it
        // never gets a Subscribe. Give it several rounds.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(b_subs.load(Ordering::SeqCst), 0, "the driver subscribed with a deposed leader");
        assert!(!run.is_finished(), "the driver gave up: {:?}", run.await);
        // B wins a newer election: the driver subscribes with it.
        b_epoch.store(6, Ordering::SeqCst);
        assert_eq!(next(&mut rx).await, Some("reregistered"));
        assert_eq!(b_subs.load(Ordering::SeqCst), 1);
        run.abort();
    }
}
