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
//! When the connection drops the driver reconnects with backoff and re-subscribes with the same
//! framework id (failover), unless [`DriverConfig::reconnect`] is off.

use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::client::{ClientError, Session};
use crate::proto::*;
use crate::tls::TlsFiles;

/// Callbacks of a framework scheduler. Only offers and status updates must be handled.
pub trait Scheduler: Send {
    /// Subscribed (or re-subscribed after failover) with this id.
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

    /// The connection to the master was lost; the driver will try to fail over.
    fn disconnected(&mut self, driver: &Driver) -> impl Future<Output = ()> + Send {
        let _ = driver;
        async {}
    }
}

/// How to reach the master and who this framework is.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    pub master: String,
    pub tls: TlsFiles,
    pub framework: FrameworkInfo,
    /// Acknowledge status updates automatically after `status_update` returns (default).
    pub auto_acknowledge: bool,
    /// Reconnect and fail over when the connection drops (default). Off: `run` returns an error.
    pub reconnect: bool,
    /// A demand to state in the same flight as `Subscribe` (see [`Driver::request`]), so the
    /// first allocation already knows it. `None`: state none (whole-agent offers).
    pub demand: Option<Vec<Demand>>,
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
            },
            auto_acknowledge: true,
            reconnect: true,
            demand: None,
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

enum Control {
    Call(SchedulerCall),
    Stop { teardown: bool },
}

/// Sends calls to the master. Cheap to clone; usable from any task.
#[derive(Clone)]
pub struct Driver {
    tx: mpsc::UnboundedSender<Control>,
    framework_id: Option<FrameworkId>,
    conn: Option<quinn::Connection>,
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
    /// (default 5 s).
    pub fn decline(&self, offer_ids: Vec<OfferId>, refuse_seconds: Option<f64>) {
        self.call(SchedulerCall::Decline { offer_ids, refuse_seconds });
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
    /// without, the framework may fail over within its failover timeout.
    pub fn stop(&self, teardown: bool) {
        let _ = self.tx.send(Control::Stop { teardown });
    }

    /// The current connection to the master (for output streams).
    pub fn connection(&self) -> Option<quinn::Connection> {
        self.conn.clone()
    }
}

/// Runs the scheduler until [`Driver::stop`] or, with `reconnect` off, until the connection
/// fails. The first connection attempt's failure is returned at once.
pub async fn run<S: Scheduler>(config: DriverConfig, scheduler: &mut S) -> Result<(), ClientError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut driver = Driver { tx, framework_id: config.framework.id.clone(), conn: None };
    let mut backoff = Duration::from_millis(100);
    let mut ever_connected = false;
    let mut demand = config.demand.clone();
    loop {
        let session = match Session::connect(&config.master, &config.tls, Role::Framework).await {
            Ok(s) => s,
            Err(e) if !ever_connected || !config.reconnect || matches!(e, ClientError::Refused(_)) => {
                return Err(e)
            }
            Err(e) => {
                warn!(error = %e, "reconnecting to the master");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        ever_connected = true;
        backoff = Duration::from_millis(100);
        match serve(&config, &mut driver, &mut rx, session, scheduler, &mut demand).await {
            Ok(()) => return Ok(()),
            Err(e @ ClientError::Refused(_)) => return Err(e),
            Err(e) if !config.reconnect => return Err(e),
            Err(e) => {
                warn!(error = %e, "lost the master; failing over");
                driver.conn = None;
                scheduler.disconnected(&driver).await;
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

async fn serve<S: Scheduler>(
    config: &DriverConfig,
    driver: &mut Driver,
    rx: &mut mpsc::UnboundedReceiver<Control>,
    mut session: Session,
    scheduler: &mut S,
    demand: &mut Option<Vec<Demand>>,
) -> Result<(), ClientError> {
    let mut info = config.framework.clone();
    info.id = driver.framework_id.clone();
    session.writer.feed(&SchedulerCall::Subscribe(info)).await?;
    if let Some(demands) = demand.clone() {
        session.writer.feed(&SchedulerCall::Request { demands }).await?;
    }
    session.writer.flush().await?;
    // The latest demand sent, so that a failover states it again.
    let remember = |call: &SchedulerCall, demand: &mut Option<Vec<Demand>>| {
        if let SchedulerCall::Request { demands } = call {
            *demand = Some(demands.clone());
        }
    };
    let mut heartbeat = Duration::from_secs(15);
    let mut subscribed = false;
    loop {
        // A master silent for three heartbeats is gone, whatever the transport says.
        let event = tokio::select! {
            ev = tokio::time::timeout(heartbeat * 3, session.reader.recv::<SchedulerEvent>()) => match ev {
                Ok(ev) => ev?,
                Err(_) => return Err(ClientError::Unexpected("no heartbeat from the master".into())),
            },
            ctl = rx.recv() => {
                match ctl {
                    Some(Control::Call(call)) => {
                        let fw = driver.framework_id.clone().unwrap_or_else(|| FrameworkId::new(""));
                        let mut refused = Vec::new();
                        remember(&call, demand);
                        send_call(&mut session, call, &fw, &mut refused).await?;
                        while let Ok(next) = rx.try_recv() {
                            match next {
                                Control::Call(c) => {
                                    remember(&c, demand);
                                    send_call(&mut session, c, &fw, &mut refused).await?
                                }
                                Control::Stop { teardown } => return finish(session, teardown).await,
                            }
                        }
                        session.writer.flush().await?;
                        for status in refused {
                            scheduler.status_update(driver, &status).await;
                        }
                        continue;
                    }
                    Some(Control::Stop { teardown }) => return finish(session, teardown).await,
                    None => return finish(session, false).await,
                }
            }
        };
        let Some(event) = event else {
            return Err(ClientError::Closed);
        };
        match event {
            SchedulerEvent::Subscribed { framework_id, heartbeat_interval } => {
                info!(%framework_id, "subscribed");
                heartbeat = heartbeat_interval.max(Duration::from_millis(100));
                subscribed = true;
                driver.framework_id = Some(framework_id.clone());
                driver.conn = Some(session.conn.clone());
                scheduler.registered(driver, &framework_id).await;
            }
            SchedulerEvent::Offers(offers) => scheduler.resource_offers(driver, offers).await,
            SchedulerEvent::Rescind { offer_id } => scheduler.offer_rescinded(driver, &offer_id).await,
            SchedulerEvent::Update(status) => {
                scheduler.status_update(driver, &status).await;
                if config.auto_acknowledge {
                    driver.acknowledge(&status);
                }
            }
            SchedulerEvent::Error(e) => {
                if !subscribed {
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
        refused.push(TaskStatus {
            task_id: task.task_id,
            framework_id: fw.clone(),
            agent_id: None,
            state: TaskState::Error,
            uuid: None,
            source: UpdateSource::Master,
            reason: "launch too large".into(),
            message: message.clone(),
            exit_code: None,
            signal: None,
            usage: None,
            timestamp_ms: unix_millis(),
        });
    }
    session.writer.feed(&SchedulerCall::Decline { offer_ids, refuse_seconds: None }).await.map_err(Into::into)
}

async fn finish(mut session: Session, teardown: bool) -> Result<(), ClientError> {
    if teardown {
        session.writer.send(&SchedulerCall::Teardown).await?;
    } else {
        session.writer.flush().await?;
    }
    let mut send = session.writer.into_inner();
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
    session.conn.close(0u32.into(), b"bye");
    session.endpoint.wait_idle().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Resources;

    fn task(id: &str, res: &str) -> TaskInfo {
        TaskInfo {
            task_id: TaskId(id.into()),
            name: id.into(),
            resources: Resources::parse(res).unwrap(),
            kind: TaskKind::Command(CommandInfo { argv: vec!["true".into()], shell: false, env: vec![] }),
            kill_grace: None,
        }
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
}
