//! Emulated agents: each is one real QUIC connection (mutual TLS, all through one client
//! endpoint, all presenting the one agent certificate: the master lets agents share a
//! principal) speaking the agent protocol: `Hello`, `Register` (again with its id after a
//! reconnection, reporting its live tasks), a `Heartbeat` at the interval `Registered`
//! gives, and for each `RunTask` a TASK_RUNNING update, then TASK_FINISHED once RUNNING is
//! acknowledged (one update of a task in flight at a time, retried until acknowledged, as the
//! real agent's wire rules have it). No processes are started.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_sdk::frame::{FrameReader, FrameWriter};
use agora_sdk::proto::*;
use agora_sdk::tls::{TlsFiles, MASTER_SERVER_NAME};
use agora_sdk::{Attributes, Resources};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Tasks one emulated agent keeps at once; a `RunTask` beyond is answered TASK_FAILED.
const MAX_TASKS: usize = 4096;
/// How long a handshake (QUIC + hello) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnection backoff, as the real agent's (`agora_agent::link`): 100 ms doubling to 10 s.
const BACKOFF_INITIAL: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// The master is lost after this many heartbeat intervals without a message (the agent's rule).
const MISSED_HEARTBEATS: u32 = 3;
/// First retry of an unacknowledged update (the agent's `RETRY_INITIAL`); checked at each
/// heartbeat, so never sooner than one interval.
const RETRY_INITIAL: Duration = Duration::from_millis(500);

/// Counters shared by every emulated agent (read by the phases).
#[derive(Debug, Default)]
pub struct Stats {
    /// `Registered` answers received (first registrations and re-registrations).
    pub registrations: AtomicU64,
    /// Agents registered right now.
    pub registered: AtomicU64,
    /// Handshakes that failed or timed out (refused, master down, …).
    pub connect_failures: AtomicU64,
    /// Registered connections that ended (master gone, idle, error).
    pub lost: AtomicU64,
    /// Of those, given up because the master fell silent for three heartbeat intervals (the
    /// agent's rule) rather than closed by it.
    pub silences: AtomicU64,
    /// `Error` messages from the master.
    pub errors: AtomicU64,
    pub heartbeats: AtomicU64,
    pub run_tasks: AtomicU64,
    /// Updates sent again for want of an acknowledgement.
    pub retries: AtomicU64,
}

/// The swarm's settings.
#[derive(Clone, Debug)]
pub struct SwarmConfig {
    pub agents: usize,
    pub master: SocketAddr,
    /// The agent certificate every emulated agent presents.
    pub tls: TlsFiles,
    pub resources: Resources,
    /// Handshakes in progress at once (the generator's own bound).
    pub connecting: usize,
}

/// Starts every emulated agent; they run until `stop`.
pub fn start(cfg: &SwarmConfig, stats: Arc<Stats>, stop: CancellationToken) -> anyhow::Result<()> {
    let mut endpoint = quinn::Endpoint::client(([127, 0, 0, 1], 0).into())?;
    endpoint.set_default_client_config(agora_sdk::transport::client_config(&cfg.tls)?);
    let gate = Arc::new(Semaphore::new(cfg.connecting.max(1)));
    for i in 0..cfg.agents {
        let agent = Emulated {
            hostname: format!("swarm-{i}"),
            resources: cfg.resources.clone(),
            id: None,
            tasks: HashMap::new(),
        };
        let (endpoint, gate, stats, stop, master) =
            (endpoint.clone(), gate.clone(), stats.clone(), stop.clone(), cfg.master);
        tokio::spawn(async move {
            tokio::select! {
                () = agent.run(endpoint, master, gate, &stats) => {}
                () = stop.cancelled() => {}
            }
        });
    }
    Ok(())
}

/// A task's update in flight.
struct Pending {
    status: TaskStatus,
    sent: Instant,
    delay: Duration,
}

/// A task the agent "runs": its info (reported on re-registration) and its unacknowledged
/// update.
struct Task {
    framework_id: FrameworkId,
    info: TaskInfo,
    state: TaskState,
    pending: Option<Pending>,
}

struct Emulated {
    hostname: String,
    resources: Resources,
    id: Option<AgentId>,
    tasks: HashMap<TaskId, Task>,
}

type Writer = FrameWriter<quinn::SendStream>;

impl Emulated {
    async fn run(
        mut self,
        endpoint: quinn::Endpoint,
        master: SocketAddr,
        gate: Arc<Semaphore>,
        stats: &Stats,
    ) {
        let mut backoff = BACKOFF_INITIAL;
        loop {
            let session = {
                let _permit = gate.acquire().await;
                tokio::time::timeout(CONNECT_TIMEOUT, handshake(&endpoint, master)).await
            };
            let (conn, writer, reader) = match session {
                Ok(Ok(s)) => s,
                _ => {
                    stats.connect_failures.fetch_add(1, Relaxed);
                    tokio::time::sleep(jitter(backoff)).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            let registered = self.serve(writer, reader, stats).await;
            conn.close(1u32.into(), b"emulated agent reconnects");
            if registered {
                backoff = BACKOFF_INITIAL;
                stats.lost.fetch_add(1, Relaxed);
                stats.registered.fetch_sub(1, Relaxed);
            }
            tokio::time::sleep(jitter(backoff)).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Registers and serves one connection until it is lost; whether it got registered.
    async fn serve(
        &mut self,
        mut writer: Writer,
        mut reader: FrameReader<quinn::RecvStream>,
        stats: &Stats,
    ) -> bool {
        let tasks = self
            .tasks
            .values()
            .filter(|t| !t.state.is_terminal())
            .map(|t| TaskReport {
                framework_id: t.framework_id.clone(),
                task: t.info.clone(),
                state: t.state,
            })
            .collect();
        let register = AgentMessage::Register {
            agent_id: self.id.clone(),
            hostname: self.hostname.clone(),
            resources: self.resources.clone(),
            attributes: Attributes::default(),
            tasks,
        };
        if writer.send(&register).await.is_err() {
            return false;
        }
        let mut registered = false;
        let mut interval = Duration::from_secs(15);
        let mut last_heard = Instant::now();
        let mut tick = tokio::time::interval(interval);
        tick.tick().await;
        loop {
            let msg = tokio::select! {
                m = reader.recv::<MasterToAgent>() => match m {
                    Ok(Some(m)) => m,
                    _ => return registered,
                },
                _ = tick.tick() => {
                    if last_heard.elapsed() > interval * MISSED_HEARTBEATS {
                        if registered {
                            stats.silences.fetch_add(1, Relaxed);
                        }
                        return registered;
                    }
                    if registered {
                        stats.heartbeats.fetch_add(1, Relaxed);
                        if writer.send(&AgentMessage::Heartbeat).await.is_err() || !self.retry(&mut writer, stats).await {
                            return registered;
                        }
                    }
                    continue;
                }
            };
            last_heard = Instant::now();
            match msg {
                MasterToAgent::Registered { agent_id, heartbeat_interval } => {
                    self.id = Some(agent_id);
                    interval = heartbeat_interval.max(Duration::from_millis(100));
                    tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    if !registered {
                        registered = true;
                        stats.registered.fetch_add(1, Relaxed);
                        stats.registrations.fetch_add(1, Relaxed);
                    }
                    // Every unacknowledged update goes again on a new connection.
                    for t in self.tasks.values_mut() {
                        if let Some(p) = &mut t.pending {
                            p.sent = Instant::now() - p.delay;
                        }
                    }
                    if !self.retry(&mut writer, stats).await {
                        return registered;
                    }
                }
                MasterToAgent::RunTask { framework_id, task } => {
                    stats.run_tasks.fetch_add(1, Relaxed);
                    let state =
                        if self.tasks.len() < MAX_TASKS { TaskState::Running } else { TaskState::Failed };
                    let status = self.status(&framework_id, &task.task_id, state);
                    if writer.send(&AgentMessage::StatusUpdate(status.clone())).await.is_err() {
                        return registered;
                    }
                    if state == TaskState::Running {
                        let pending = Some(Pending { status, sent: Instant::now(), delay: RETRY_INITIAL });
                        self.tasks
                            .insert(task.task_id.clone(), Task { framework_id, info: task, state, pending });
                    }
                }
                MasterToAgent::StatusAck { task_id, uuid, .. } => {
                    let Some(t) = self.tasks.get_mut(&task_id) else { continue };
                    if t.pending.as_ref().and_then(|p| p.status.uuid) != Some(uuid) {
                        continue;
                    }
                    let acked = t.pending.take().map(|p| p.status.state);
                    if acked.is_some_and(TaskState::is_terminal) {
                        self.tasks.remove(&task_id);
                        continue;
                    }
                    // RUNNING was acknowledged: the task's end follows (FINISHED, or KILLED if
                    // a kill came first).
                    let end =
                        if t.state == TaskState::Killed { TaskState::Killed } else { TaskState::Finished };
                    t.state = end;
                    let fw = t.framework_id.clone();
                    let status = self.status(&fw, &task_id, end);
                    if writer.send(&AgentMessage::StatusUpdate(status.clone())).await.is_err() {
                        return registered;
                    }
                    if let Some(t) = self.tasks.get_mut(&task_id) {
                        t.pending = Some(Pending { status, sent: Instant::now(), delay: RETRY_INITIAL });
                    }
                }
                MasterToAgent::KillTask { framework_id, task_id } => {
                    if let Some(t) = self.tasks.get_mut(&task_id) {
                        // Killed before RUNNING's acknowledgement: the state shows at once, the
                        // update follows in order.
                        t.state = TaskState::Killed;
                        let status = self.status(&framework_id, &task_id, TaskState::Killed);
                        if writer.send(&AgentMessage::LatestState(status)).await.is_err() {
                            return registered;
                        }
                    }
                }
                MasterToAgent::ShutdownFramework { framework_id } => {
                    self.tasks.retain(|_, t| t.framework_id != framework_id);
                }
                MasterToAgent::Error(e) => {
                    stats.errors.fetch_add(1, Relaxed);
                    tracing::warn!(hostname = %self.hostname, error = %e.message, "master error");
                    if !registered {
                        // An id the master refuses: start over as a new agent.
                        self.id = None;
                        self.tasks.clear();
                        return false;
                    }
                }
                MasterToAgent::HeartbeatAck
                | MasterToAgent::FrameworkMessage { .. }
                | MasterToAgent::ShutdownExecutor { .. } => {}
            }
        }
    }

    /// Sends again the updates whose retry time came; `false` when the stream broke.
    async fn retry(&mut self, writer: &mut Writer, stats: &Stats) -> bool {
        let now = Instant::now();
        for t in self.tasks.values_mut() {
            let Some(p) = &mut t.pending else { continue };
            if now.duration_since(p.sent) < p.delay {
                continue;
            }
            stats.retries.fetch_add(1, Relaxed);
            if writer.feed(&AgentMessage::StatusUpdate(p.status.clone())).await.is_err() {
                return false;
            }
            p.sent = now;
            p.delay = (p.delay * 2).min(BACKOFF_MAX);
        }
        writer.flush().await.is_ok()
    }

    fn status(&self, framework_id: &FrameworkId, task_id: &TaskId, state: TaskState) -> TaskStatus {
        TaskStatus {
            task_id: task_id.clone(),
            framework_id: framework_id.clone(),
            agent_id: self.id.clone(),
            state,
            uuid: Some(uuid::Uuid::new_v4()),
            source: UpdateSource::Executor,
            reason: if state == TaskState::Finished { Reason::CommandExited } else { Reason::None },
            message: String::new(),
            exit_code: (state == TaskState::Finished).then_some(0),
            signal: None,
            usage: None,
            timestamp_ms: unix_millis(),
        }
    }
}

/// Opens a connection through the shared endpoint and says hello as an agent.
async fn handshake(
    endpoint: &quinn::Endpoint,
    master: SocketAddr,
) -> anyhow::Result<(quinn::Connection, Writer, FrameReader<quinn::RecvStream>)> {
    let conn = endpoint.connect(master, MASTER_SERVER_NAME)?.await?;
    let (send, recv) = conn.open_bi().await?;
    let mut writer = FrameWriter::new(send);
    let mut reader = FrameReader::new(recv);
    writer.send(&Hello::new(Role::Agent)).await?;
    match reader.recv::<HelloReply>().await? {
        Some(HelloReply::Welcome { .. }) => Ok((conn, writer, reader)),
        other => anyhow::bail!("hello answered {other:?}"),
    }
}

/// A delay drawn from `[d/2, d]`.
fn jitter(d: Duration) -> Duration {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |t| t.subsec_nanos());
    d / 2 + (d / 2).mul_f64(f64::from(nanos % 1000) / 1000.0)
}
