//! The master's QUIC layer: accepts connections, checks certificates and the protocol handshake,
//! moves frames between peers and the sans-IO [`Master`] core, relays task output streams and
//! serves artifact uploads and fetches from the [`ArtifactStore`].
//!
//! One task owns the core (`run_core`); every connection has a reader task that turns frames
//! into [`Event`]s and a writer task that drains that connection's outbox. Nothing is shared
//! behind locks: connection tasks talk to the core through `Command`s.
//!
//! What a peer may hold of the master is bounded ([`crate::limits`]): a connection's messages
//! in the core's queue (32 at a time for a framework, a core step's 1024 for an agent), its
//! outbox (messages waiting for its writer, then encoded bytes waiting for the QUIC stream,
//! both bounded; past them the peer is disconnected), its principal's connections and bulk
//! streams, and each bulk stream's idle and total time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::metrics::counter;
use agora_sdk::frame::{FrameError, FrameReader, FrameWriter, LIST_BUDGET, MAX_FRAME};
use agora_sdk::proto::*;
use agora_sdk::tls::{Identity, TlsError, TlsFiles};
use agora_sdk::transport::{peer_identity, server_config};
use quinn::{RecvStream, SendStream};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::acl::{Acls, OperatorRight, UploadLimit};
use crate::allocator;
use crate::artifacts::{ArtifactError, ArtifactStore};
use crate::core::{Action, ConnId, Event, Master, MasterConfig, OutputLocation, Requester};
use crate::ha::{self, Attempt, Election, HaConfig, HaError};
use crate::limits::{self, Idle, PeerLimits, PrincipalCounts, Slot};
use crate::metrics;
use crate::registry::{
    AgentRecord, AgentStanding, ArtifactRecord, EtcdRegistry, FrameworkRecord, RedbRegistry, Registry,
    RegistryError, RegistryOp, REGISTRY_FILE,
};
use crate::replication;
use crate::revocation::Revocations;

mod connections;
mod operator;
mod standby;
mod streams;
mod term;
use connections::*;
use operator::*;
use standby::*;
use streams::*;
use term::*;

/// Messages of one framework connection that may wait in the core's queue at once (and be
/// handled in one step of the core): the connection's reader waits (and QUIC's flow control
/// holds the peer) beyond that, so a flooding framework cannot queue unbounded work ahead of
/// every other peer and operator call. Launches are not slowed: one `Accept` carries many tasks.
const EVENTS_IN_CORE_PER_CONNECTION: usize = 32;

/// The same for an agent: a trusted part of the cluster that sends one `StatusUpdate` per
/// message (three per task at tens of thousands of tasks a second), so its share is a whole
/// step of the core (the 1024 commands `run_core` takes before sending replies).
const EVENTS_IN_CORE_PER_AGENT: usize = 1024;

/// How long a new connection may take to open its control stream and say hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the master could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot listen on {addr}: {err}")]
    Bind { addr: SocketAddr, err: std::io::Error },
    #[error(transparent)]
    Allocator(#[from] allocator::RegistryError),
    #[error(transparent)]
    Artifacts(#[from] ArtifactError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Ha(#[from] HaError),
}

/// Settings of a master server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub tls: TlsFiles,
    pub core: MasterConfig,
    pub allocator: String,
    /// The master's own directory: the artifact store is `<work_dir>/artifacts`, the registry
    /// (frameworks, agents, artifact index, kept across restarts) `<work_dir>/registry.redb`.
    /// `core.master_id` is replaced by the registry's `{cluster}-{epoch}`.
    pub work_dir: PathBuf,
    /// Largest artifact (Wasm module, directory archive) accepted, in bytes
    /// ([`crate::artifacts::DEFAULT_MAX_ARTIFACT_SIZE`] by default).
    pub max_artifact_size: u64,
    /// The bound on the artifact store (`--artifact-store-size`).
    pub eviction: crate::artifacts::EvictionConfig,
    /// Bounds on what each peer may hold of the master: outbox bytes, connections and bulk
    /// streams per principal, bulk stream timeouts, validations at once.
    pub limits: PeerLimits,
}

/// The per-principal counts of the whole server, with its limits.
struct Admission {
    limits: PeerLimits,
    connections: Arc<PrincipalCounts>,
    streams: Arc<PrincipalCounts>,
}

impl Admission {
    fn new(limits: PeerLimits) -> Arc<Self> {
        Arc::new(Admission { limits, connections: Arc::default(), streams: Arc::default() })
    }

    /// Whether the role's connections and streams are counted: frameworks and operators are;
    /// agents and other masters are trusted parts of the cluster (and all agents may share one
    /// principal).
    fn counted(role: Role) -> bool {
        matches!(role, Role::Framework | Role::Operator)
    }

    /// A slot for a new connection of `identity`, or the error that refuses it.
    fn connection(&self, identity: &Identity) -> Result<Option<Slot>, WireError> {
        if !Self::counted(identity.role) {
            return Ok(None);
        }
        let max = self.limits.connections_per_principal;
        match self.connections.try_take(&identity.principal, max) {
            Ok(slot) => Ok(Some(slot)),
            Err(held) => {
                counter!(metrics::PEERS_REFUSED, "what" => "connection").increment(1);
                warn!(principal = %identity.principal, role = %identity.role, held, max,
                    "connection refused: the principal's connection limit is reached");
                Err(WireError::new(
                    ErrorCode::TooLarge,
                    format!(
                        "principal `{}` already has {held} connections open, the master's limit (--max-connections-per-principal {max})",
                        identity.principal
                    ),
                ))
            }
        }
    }

    /// A slot for a new bulk stream of `principal` (`None` for uncounted roles), or the error
    /// that refuses it.
    fn stream(&self, role: Role, principal: &str) -> Result<Option<Slot>, WireError> {
        if !Self::counted(role) {
            return Ok(None);
        }
        let max = self.limits.streams_per_principal;
        match self.streams.try_take(principal, max) {
            Ok(slot) => Ok(Some(slot)),
            Err(held) => {
                counter!(metrics::PEERS_REFUSED, "what" => "stream").increment(1);
                debug!(%principal, held, max, "bulk stream refused: the principal's stream limit is reached");
                Err(WireError::new(
                    ErrorCode::TooLarge,
                    format!(
                        "principal `{principal}` already has {held} bulk streams open, the master's limit (--max-streams-per-principal {max})"
                    ),
                ))
            }
        }
    }
}

/// Queries answered by the core task.
enum Query {
    Agents(oneshot::Sender<Vec<AgentView>>),
    Frameworks(oneshot::Sender<Vec<FrameworkView>>),
    CompletedFrameworks(oneshot::Sender<Vec<FrameworkView>>),
    Tasks(oneshot::Sender<Vec<TaskView>>),
    PendingTasks(oneshot::Sender<Vec<PendingTaskView>>),
    Kill(TaskId, oneshot::Sender<Result<(), WireError>>),
    TaskHistory(TaskKey, oneshot::Sender<Option<Vec<TaskTransition>>>),
    Policy(oneshot::Sender<(AllocationPolicy, &'static str)>),
    /// Answered once the registry has it.
    SetPolicy(AllocationPolicy, oneshot::Sender<Result<(), WireError>>),
    /// Drain (with a deadline and whether to kill) or undrain (`None`); answered once the
    /// registry has it.
    Drain(AgentId, Option<(Option<Duration>, bool)>, oneshot::Sender<Result<(), WireError>>),
    Locate(Requester, TaskId, oneshot::Sender<Result<(OutputLocation, quinn::Connection), WireError>>),
    /// Kill a task of this principal's frameworks only.
    KillOwn(String, TaskId, oneshot::Sender<Result<(), WireError>>),
    /// Whether a framework belongs to a principal.
    Owns(String, FrameworkId, oneshot::Sender<bool>),
    /// Reserve bytes of a principal's upload quota (principal, size, quota).
    ReserveUpload(String, u64, u64, oneshot::Sender<Result<(), WireError>>),
    /// Give a reservation back.
    ReleaseUpload(String, u64),
}

/// What a connection's writer sends.
enum Outgoing {
    Agent(MasterToAgent),
    Framework(SchedulerEvent),
    Close(WireError),
}

/// Messages to the core task. Moved once through a channel, so the size spread between
/// variants costs nothing worth a heap allocation per message.
#[allow(clippy::large_enum_variant)]
enum Command {
    Attach {
        conn: ConnId,
        quic: quinn::Connection,
        outbox: limits::CountedSender<Outgoing>,
    },
    /// A peer's event, with the permit it holds in its connection's share of the core's queue
    /// (given back once the core has handled it).
    Event(Event, Option<tokio::sync::OwnedSemaphorePermit>),
    Query(Query),
    ArtifactStored(ArtifactRecord),
    /// Indexed artifacts that no master could send this one (see [`replication::recover`]).
    ArtifactsLost(Vec<Digest>),
    /// What live tasks and executors refer to (kept by eviction).
    ArtifactsInUse(oneshot::Sender<std::collections::HashSet<Digest>>),
    /// Evict this artifact unless something refers to it now: `true` once the core and the
    /// registry's index forgot it (the file may then go).
    EvictArtifact(Digest, oneshot::Sender<bool>),
}

/// A running master. Dropping it does not stop it: cancel the token given to [`spawn`].
#[derive(Clone)]
pub struct MasterHandle {
    pub addr: SocketAddr,
    /// The master id of the incarnation started first (`{cluster}-{epoch}` from the registry);
    /// with `--etcd`, this master's member id (it may not lead).
    pub master_id: String,
    serving: watch::Receiver<Serving>,
    fatal: watch::Receiver<Option<String>>,
}

/// Asks the core task questions (the handle's and operator connections' way in).
#[derive(Clone)]
struct CoreClient(mpsc::UnboundedSender<Command>);

impl CoreClient {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Query) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.0.send(Command::Query(make(tx))).ok()?;
        rx.await.ok()
    }
}

/// One term of leadership: a core task with the registry it writes. It ends when `stop` is
/// cancelled (the master shuts down or steps down): the core stops at once and every peer
/// connection of the term is closed.
struct Term {
    core: CoreClient,
    /// This master as `GetMasters` shows it.
    me: MasterView,
    /// Every master of the cluster, with `--etcd`.
    members: Option<ha::Members>,
    stop: CancellationToken,
    /// Set when the core stopped by itself (its registry cannot be written).
    fatal: watch::Receiver<Option<String>>,
    /// `--acls` (`None`: everything allowed).
    acls: Option<Arc<Acls>>,
}

/// What the accept loop does with a new connection.
#[derive(Clone)]
enum Serving {
    /// Serve it.
    Leader(Arc<Term>),
    /// Answer its `Hello` with `NotLeader` naming the leader (if known) and close it.
    Standby { leader: Option<String> },
}

impl MasterHandle {
    /// Waits until the master stops by itself because its registry cannot be written (it can
    /// no longer keep its promises to peers); returns why. Pending forever otherwise (and
    /// always with `--etcd`, where such a master steps down and campaigns again).
    pub async fn failed(&self) -> String {
        wait_fatal(self.fatal.clone()).await
    }

    fn core(&self) -> Option<CoreClient> {
        match &*self.serving.borrow() {
            Serving::Leader(t) => Some(t.core.clone()),
            Serving::Standby { .. } => None,
        }
    }

    /// Whether this master leads now.
    pub fn is_leader(&self) -> bool {
        self.core().is_some()
    }

    /// The agents (none while a standby).
    pub async fn agents(&self) -> Vec<AgentView> {
        let Some(core) = self.core() else { return Vec::new() };
        core.ask(Query::Agents).await.unwrap_or_default()
    }

    /// The frameworks (none while a standby).
    pub async fn frameworks(&self) -> Vec<FrameworkView> {
        let Some(core) = self.core() else { return Vec::new() };
        core.ask(Query::Frameworks).await.unwrap_or_default()
    }

    /// The tasks (none while a standby).
    pub async fn tasks(&self) -> Vec<TaskView> {
        let Some(core) = self.core() else { return Vec::new() };
        core.ask(Query::Tasks).await.unwrap_or_default()
    }

    /// The tasks that wait for resources, with why (none while a standby).
    pub async fn pending_tasks(&self) -> Vec<PendingTaskView> {
        let Some(core) = self.core() else { return Vec::new() };
        core.ask(Query::PendingTasks).await.unwrap_or_default()
    }

    /// A task's last state changes, oldest first (`None`: unknown, or a standby).
    pub async fn task_history(
        &self,
        framework_id: &FrameworkId,
        task_id: &TaskId,
    ) -> Option<Vec<TaskTransition>> {
        let core = self.core()?;
        let key = TaskKey::new(framework_id.clone(), task_id.clone());
        core.ask(|tx| Query::TaskHistory(key, tx)).await.flatten()
    }
}

/// A task's output as the agent streams it to an operator ([`MasterHandle::task_output`]).
pub struct TaskOutput {
    /// The framework the task belongs to.
    pub framework_id: FrameworkId,
    /// Bytes the agent sent along with its reply; they come before `recv`'s.
    pub buffered: bytes::BytesMut,
    /// The rest of the output; it finishes at its end (without `follow`: the end of the file
    /// now).
    pub recv: RecvStream,
    /// Our side of the stream: dropping it early would end the request.
    _send: SendStream,
}

/// A task's sandbox as the agent answers an operator's [`FilesRequest`]
/// ([`MasterHandle::task_files`]).
pub struct TaskFiles {
    /// The framework the task belongs to.
    pub framework_id: FrameworkId,
    /// A listing, or `Sending { size }` with the file's bytes in `buffered` then `recv`.
    pub reply: FilesReply,
    /// Bytes the agent sent along with its reply; they come before `recv`'s.
    pub buffered: bytes::BytesMut,
    pub recv: RecvStream,
    /// Our side of the stream: dropping it early would end the request.
    pub send: SendStream,
}

impl MasterHandle {
    /// Finds `task_id`'s agent (as an operator) and opens a bulk stream to it.
    async fn open_to_task_agent(
        &self,
        task_id: &TaskId,
    ) -> Result<(OutputLocation, FrameWriter<SendStream>, RecvStream), WireError> {
        let stopping = || WireError::new(ErrorCode::Internal, "master stopping");
        let core =
            self.core().ok_or_else(|| WireError::new(ErrorCode::Unexpected, "this master is a standby"))?;
        let (loc, agent) = core
            .ask(|tx| Query::Locate(Requester::Operator, task_id.clone(), tx))
            .await
            .ok_or_else(stopping)??;
        let (send, recv) = agent
            .open_bi()
            .await
            .map_err(|e| WireError::new(ErrorCode::Internal, format!("agent stream: {e}")))?;
        Ok((loc, FrameWriter::new(send), recv))
    }

    /// Lists directory `path` of a task's sandbox, or (`read`) opens file `path`, on its agent,
    /// as an operator (`agora files`; the first task with this id when several frameworks
    /// reuse it). The agent's refusal (no such file, a path outside the sandbox) is the error.
    pub async fn task_files(&self, task_id: &TaskId, path: &str, read: bool) -> Result<TaskFiles, WireError> {
        let io =
            |e: &dyn std::fmt::Display| WireError::new(ErrorCode::Internal, format!("agent stream: {e}"));
        let (loc, mut w, recv) = self.open_to_task_agent(task_id).await?;
        let req = FilesRequest {
            task_id: task_id.clone(),
            framework_id: Some(loc.framework_id.clone()),
            path: path.to_string(),
            read,
        };
        w.send(&StreamRequest::Files(req)).await.map_err(|e| io(&e))?;
        let mut r = FrameReader::new(recv);
        match r.recv::<FilesReply>().await.map_err(|e| io(&e))? {
            Some(FilesReply::Error(e)) => Err(e),
            Some(reply) => {
                let (recv, buffered) = r.into_parts();
                Ok(TaskFiles { framework_id: loc.framework_id, reply, buffered, recv, send: w.into_inner() })
            }
            None => Err(WireError::new(ErrorCode::Internal, "agent closed the stream")),
        }
    }

    /// Opens a task's `stdout` or `stderr` from `offset` on its agent, as an operator reads it
    /// (`agora logs`; the first task with this id when several frameworks reuse it).
    pub async fn task_output(
        &self,
        task_id: &TaskId,
        stream: OutputStream,
        offset: u64,
        follow: bool,
    ) -> Result<TaskOutput, WireError> {
        let io =
            |e: &dyn std::fmt::Display| WireError::new(ErrorCode::Internal, format!("agent stream: {e}"));
        let (loc, mut w, recv) = self.open_to_task_agent(task_id).await?;
        let req = OutputRequest {
            task_id: task_id.clone(),
            framework_id: Some(loc.framework_id.clone()),
            stream,
            offset,
            follow,
        };
        w.send(&StreamRequest::Output(req)).await.map_err(|e| io(&e))?;
        let mut r = FrameReader::new(recv);
        match r.recv::<OutputReply>().await.map_err(|e| io(&e))? {
            Some(OutputReply::Streaming) => {
                let (recv, buffered) = r.into_parts();
                Ok(TaskOutput { framework_id: loc.framework_id, buffered, recv, _send: w.into_inner() })
            }
            Some(OutputReply::Error(e)) => Err(e),
            None => Err(WireError::new(ErrorCode::Internal, "agent closed the stream")),
        }
    }
}

async fn wait_fatal(mut rx: watch::Receiver<Option<String>>) -> String {
    loop {
        if let Some(why) = rx.borrow_and_update().clone() {
            return why;
        }
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Binds the QUIC endpoint and starts the master with a built-in allocator. Runs until
/// `shutdown` is cancelled.
pub fn spawn(config: ServerConfig, shutdown: CancellationToken) -> Result<MasterHandle, ServerError> {
    spawn_with_registry(config, &allocator::Registry::builtin(), shutdown)
}

/// Says once, at start, whether ACLs are in force: without `--acls` every principal may do
/// everything, and an operator should know.
fn log_acl_mode(config: &ServerConfig) {
    match &config.core.acls {
        None => warn!(
            "no --acls given: every principal may subscribe as any role, run tasks as any user, \
             upload artifacts, and (with an operator certificate) use every operator call"
        ),
        Some(acls) => info!(principals = acls.len(), "ACLs in force: anything they do not grant is denied"),
    }
}

/// Binds the QUIC endpoint.
fn bind(config: &ServerConfig) -> Result<(quinn::Endpoint, SocketAddr), ServerError> {
    let server_cfg = server_config(&config.tls)?;
    let endpoint = quinn::Endpoint::server(server_cfg, config.listen)
        .map_err(|err| ServerError::Bind { addr: config.listen, err })?;
    let addr = endpoint.local_addr().map_err(|err| ServerError::Bind { addr: config.listen, err })?;
    Ok((endpoint, addr))
}

/// Like [`spawn`], choosing `config.allocator` from `registry` (built-ins plus the
/// allocators an embedder registered).
pub fn spawn_with_registry(
    config: ServerConfig,
    registry: &allocator::Registry,
    shutdown: CancellationToken,
) -> Result<MasterHandle, ServerError> {
    // Checked before anything is opened: a bad allocator name leaves no file behind.
    registry.create(&config.allocator, &config.core.allocation)?;
    let (endpoint, addr) = bind(&config)?;
    let revoked = Arc::new(Revocations::for_tls(&config.tls)?);
    tokio::spawn(revoked.clone().watch(shutdown.clone()));
    log_acl_mode(&config);
    let reg = RedbRegistry::open(&config.work_dir.join(REGISTRY_FILE))?;
    let store = Arc::new(
        ArtifactStore::open(&config.work_dir.join("artifacts"), config.max_artifact_size)?
            .with_max_validations(config.limits.validations),
    );
    // One term for the life of the process: a registry that fails stops the whole master.
    let term = start_term(&config, registry, Box::new(reg), &store, addr, None, shutdown.clone())?;
    let master_id = term.me.id.clone();
    info!(%addr, %master_id, allocator = %config.allocator, "master listening");
    let fatal = term.fatal.clone();
    let (_serving_tx, serving) = watch::channel(Serving::Leader(Arc::new(term)));
    let admission = Admission::new(config.limits.clone());
    tokio::spawn(
        accept_loop(endpoint, serving.clone(), store, None, admission, revoked, shutdown).in_current_span(),
    );
    Ok(MasterHandle { addr, master_id, serving, fatal })
}

/// Binds the QUIC endpoint and starts a master among several (`--etcd`): it campaigns for the
/// leadership, serves while it leads, steps down when it can no longer vouch for its lease
/// and campaigns again; while a standby it answers every `Hello` with `NotLeader`.
pub async fn spawn_ha(
    config: ServerConfig,
    ha_cfg: HaConfig,
    registry: &allocator::Registry,
    shutdown: CancellationToken,
) -> Result<MasterHandle, ServerError> {
    registry.create(&config.allocator, &config.core.allocation)?;
    let (endpoint, addr) = bind(&config)?;
    let revoked = Arc::new(Revocations::for_tls(&config.tls)?);
    tokio::spawn(revoked.clone().watch(shutdown.clone()));
    log_acl_mode(&config);
    let mut ha_cfg = ha_cfg;
    if ha_cfg.advertise.is_empty() {
        ha_cfg.advertise = addr.to_string();
    }
    // Every master has its own store, kept in step by `replication`; several may still share
    // one directory (a shared filesystem): opened shared, no master wipes another's uploads.
    let store = Arc::new(
        ArtifactStore::open_shared(&config.work_dir.join("artifacts"), config.max_artifact_size)?
            .with_max_validations(config.limits.validations),
    );
    let election = Election::connect(&ha_cfg).await?;
    let master_id = election.me().id.clone();
    info!(%addr, advertise = %ha_cfg.advertise, member = %master_id, cluster = %ha_cfg.cluster,
        lease_ttl = ?election.ttl(), "master listening as a candidate");
    let (serving_tx, serving) = watch::channel(Serving::Standby { leader: None });
    let standby = Arc::new(StandbyReads { members: election.members(), me: master_id.clone() });
    let admission = Admission::new(config.limits.clone());
    tokio::spawn(
        accept_loop(
            endpoint,
            serving.clone(),
            store.clone(),
            Some(standby),
            admission,
            revoked,
            shutdown.clone(),
        )
        .in_current_span(),
    );
    // A standby copies the leader's artifacts into its own store.
    let (leader_tx, leader_rx) = watch::channel(None);
    tokio::spawn(standby_leader(serving.clone(), leader_tx));
    tokio::spawn(
        replication::follow_leader(
            leader_rx,
            election.members(),
            config.tls.clone(),
            store.clone(),
            config.eviction.max_bytes.map(|_| config.eviction.grace),
            shutdown.clone(),
        )
        .in_current_span(),
    );
    let registry = registry.clone();
    tokio::spawn(
        campaign(election, ha_cfg, config, registry, store, addr, serving_tx, shutdown).in_current_span(),
    );
    let (_fatal_tx, fatal) = watch::channel(None);
    Ok(MasterHandle { addr, master_id, serving, fatal })
}

/// Writes the core's pending registry changes (in order, one transaction). On failure the
/// master stops: the actions of this step (replies promising what was not recorded) are
/// dropped with it.
///
/// A write waits for the disk or, with etcd, a network round trip on this thread: it runs
/// under [`off_the_worker`], so the runtime's other tasks (the QUIC I/O) do not wait behind it.
/// A step without changes writes nothing and costs nothing here.
fn persist(core: &mut Master, reg: &mut dyn Registry) -> Result<(), RegistryError> {
    let ops: Vec<RegistryOp> = std::iter::from_fn(|| core.poll_registry_op()).collect();
    if ops.is_empty() {
        return reg.apply(&ops);
    }
    off_the_worker(|| reg.apply(&ops))
}

/// Runs a heavy step of the core (an allocation slice, a registry write) under
/// `tokio::task::block_in_place` on a multi-threaded runtime: the worker's other tasks (the
/// QUIC connections' readers and writers) move to another thread meanwhile instead of
/// waiting for it. On a current-thread runtime (where `block_in_place` panics) it simply runs.
/// Only around heavy steps: the hand-over costs a thread wake-up, which messages must not pay.
fn off_the_worker<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// `core.handle_timeout(now)`, with an allocation slice due run off the worker (see
/// [`off_the_worker`]); timers alone (heartbeats, deadlines) run as they are.
fn handle_timeout(core: &mut Master, now: Instant) {
    if core.allocation_due(now) {
        off_the_worker(|| core.handle_timeout(now));
    } else {
        core.handle_timeout(now);
    }
}

async fn run_core(
    mut core: Master,
    mut reg: Box<dyn Registry>,
    mut rx: mpsc::UnboundedReceiver<Command>,
    fatal: watch::Sender<Option<String>>,
    shutdown: CancellationToken,
) {
    let mut conns: HashMap<ConnId, (quinn::Connection, limits::CountedSender<Outgoing>)> = HashMap::new();
    // Replies that promise what this step's registry write records.
    let mut after_write: Vec<oneshot::Sender<Result<(), WireError>>> = Vec::new();
    // The queue permits of this step's peer events, given back once its actions are out: a
    // connection's share of one step is its permits, however fast its reader refills them.
    let mut held: Vec<tokio::sync::OwnedSemaphorePermit> = Vec::new();
    loop {
        if core.allocation_in_progress() {
            // The next slice of an allocation cycle is due at once (no trip through the timer
            // wheel, whose millisecond ticks would add up over a cycle's slices). First the
            // runtime runs what queued behind the last slice (readers push their events), then
            // those events are handled and answered, then the slice runs: no event waits more
            // than one slice.
            tokio::task::yield_now().await;
            if shutdown.is_cancelled() {
                break;
            }
            let mut taken = 0usize;
            let mut closed = false;
            while taken < 1024 {
                match rx.try_recv() {
                    Ok(cmd) => {
                        taken += 1;
                        apply(&mut core, reg.as_mut(), &mut conns, &mut after_write, hold(cmd, &mut held));
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            if taken > 0 && !finish_step(&mut core, reg.as_mut(), &conns, &mut after_write, &fatal, &shutdown)
            {
                break;
            }
            held.clear();
            if closed {
                break;
            }
            handle_timeout(&mut core, Instant::now());
        } else {
            let deadline = core.poll_timeout();
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = sleep => handle_timeout(&mut core, Instant::now()),
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { break };
                    apply(&mut core, reg.as_mut(), &mut conns, &mut after_write, hold(cmd, &mut held));
                    // Take whatever else is queued before flushing actions: batches under load.
                    for _ in 0..1024 {
                        match rx.try_recv() {
                            Ok(cmd) => {
                                apply(&mut core, reg.as_mut(), &mut conns, &mut after_write, hold(cmd, &mut held))
                            }
                            Err(_) => break,
                        }
                    }
                }
            }
        }
        if !finish_step(&mut core, reg.as_mut(), &conns, &mut after_write, &fatal, &shutdown) {
            break;
        }
        held.clear();
    }
    for (_, (quic, _)) in conns {
        quic.close(0u32.into(), b"master shutting down");
    }
}

/// Ends a step of the core: writes its registry changes, then answers the calls that waited
/// for them and carries out its actions. False: the master stops (the registry cannot be
/// written, or it stepped down meanwhile); what the step decided is then not carried out.
fn finish_step(
    core: &mut Master,
    reg: &mut dyn Registry,
    conns: &HashMap<ConnId, (quinn::Connection, limits::CountedSender<Outgoing>)>,
    after_write: &mut Vec<oneshot::Sender<Result<(), WireError>>>,
    fatal: &watch::Sender<Option<String>>,
    shutdown: &CancellationToken,
) -> bool {
    if let Err(e) = persist(core, reg) {
        for tx in after_write.drain(..) {
            let _ = tx.send(Err(WireError::new(
                ErrorCode::Internal,
                format!("the registry cannot be written: {e}"),
            )));
        }
        tracing::error!(error = %e, "the registry cannot be written: the master stops");
        let _ = fatal.send(Some(e.to_string()));
        shutdown.cancel();
        return false;
    }
    // Stepped down while writing: what this step decided is not ours to carry out.
    if shutdown.is_cancelled() {
        return false;
    }
    for tx in after_write.drain(..) {
        let _ = tx.send(Ok(()));
    }
    while let Some(action) = core.poll_action() {
        let (conn, out) = match action {
            Action::ToAgent { conn, msg } => (conn, Outgoing::Agent(msg)),
            Action::ToFramework { conn, event } => (conn, Outgoing::Framework(event)),
            Action::Close { conn, error } => (conn, Outgoing::Close(error)),
        };
        if let Some((quic, outbox)) = conns.get(&conn) {
            let sent = match out {
                close @ Outgoing::Close(_) => {
                    outbox.send_always(close);
                    Ok(())
                }
                out => outbox.send(out),
            };
            if let Err(limits::SendRefused::Overflow { max }) = sent {
                // The writer is this far behind: the peer does not read its stream.
                slow_peer(quic, &format!("{max} messages"));
            }
        }
    }
    true
}

/// Keeps a peer event's queue permit in `held` (until the step's actions are out).
fn hold(cmd: Command, held: &mut Vec<tokio::sync::OwnedSemaphorePermit>) -> Command {
    match cmd {
        Command::Event(ev, Some(permit)) => {
            held.push(permit);
            Command::Event(ev, None)
        }
        other => other,
    }
}

/// Disconnects a peer that does not read its stream (its outbox passed its bound, `what`),
/// saying so in the log, a metric and the close reason.
fn slow_peer(quic: &quinn::Connection, what: &str) {
    let role = peer_identity(quic).map(|i| i.role.to_string()).unwrap_or_else(|_| "unknown".into());
    counter!(metrics::SLOW_PEERS_DISCONNECTED, "role" => role).increment(1);
    warn!(remote = %quic.remote_address(), outbox = what,
        "the peer does not read its stream: its outbox is over its bound; disconnecting it");
    let why = format!("disconnected: more than {what} queued that the peer did not read (--max-outbox)");
    quic.close(app_code(ErrorCode::TooLarge), why.as_bytes());
}

fn apply(
    core: &mut Master,
    reg: &mut dyn Registry,
    conns: &mut HashMap<ConnId, (quinn::Connection, limits::CountedSender<Outgoing>)>,
    after_write: &mut Vec<oneshot::Sender<Result<(), WireError>>>,
    cmd: Command,
) {
    let now = Instant::now();
    match cmd {
        Command::Attach { conn, quic, outbox } => {
            conns.insert(conn, (quic, outbox));
        }
        Command::ArtifactStored(mut record) => {
            core.artifact_uploaded(&mut record);
            // Indexed now; a failure here leaves the file, adopted at the next start.
            if let Err(e) = reg.apply(&[RegistryOp::PutArtifact(record.clone())]) {
                warn!(digest = %record.digest, error = %e, "cannot index an artifact in the registry");
            }
            core.artifact_stored(record.digest);
        }
        Command::ArtifactsInUse(tx) => {
            let _ = tx.send(core.artifacts_in_use().into_iter().collect());
        }
        Command::EvictArtifact(digest, tx) => {
            let evicted = core.artifact_evicted(&digest);
            let ok = evicted
                && match reg.apply(&[RegistryOp::RemoveArtifact(digest.clone())]) {
                    Ok(()) => true,
                    Err(e) => {
                        warn!(%digest, error = %e, "cannot drop an evicted artifact from the registry's index; keeping it");
                        core.artifact_stored(digest);
                        false
                    }
                };
            let _ = tx.send(ok);
        }
        Command::ArtifactsLost(digests) => {
            core.artifacts_lost(&digests);
            let ops: Vec<RegistryOp> = digests.into_iter().map(RegistryOp::RemoveArtifact).collect();
            if let Err(e) = reg.apply(&ops) {
                warn!(error = %e, "cannot drop lost artifacts from the registry's index");
            }
        }
        Command::Event(ev, _permit) => {
            let gone = match &ev {
                Event::AgentDisconnected { conn } | Event::FrameworkDisconnected { conn } => Some(*conn),
                _ => None,
            };
            core.handle(now, ev);
            if let Some(c) = gone {
                conns.remove(&c);
            }
        }
        Command::Query(q) => match q {
            Query::Agents(tx) => {
                let _ = tx.send(core.agents());
            }
            Query::Frameworks(tx) => {
                let _ = tx.send(core.frameworks());
            }
            Query::CompletedFrameworks(tx) => {
                let _ = tx.send(core.completed_frameworks());
            }
            Query::Tasks(tx) => {
                let _ = tx.send(core.tasks());
            }
            Query::PendingTasks(tx) => {
                let _ = tx.send(core.pending_tasks());
            }
            Query::Kill(id, tx) => {
                let _ = tx.send(core.kill_task(now, &id));
            }
            Query::KillOwn(principal, id, tx) => {
                let _ = tx.send(core.kill_task_of(now, &id, Some(&principal)));
            }
            Query::Owns(principal, fw, tx) => {
                let _ = tx.send(core.framework_principal_is(&fw, &principal));
            }
            Query::ReserveUpload(principal, size, quota, tx) => {
                let _ = tx.send(core.reserve_upload(&principal, size, quota));
            }
            Query::ReleaseUpload(principal, size) => core.release_upload(&principal, size),
            Query::TaskHistory(key, tx) => {
                let _ = tx.send(core.task_history(&key));
            }
            Query::Policy(tx) => {
                let _ = tx.send(core.policy());
            }
            Query::SetPolicy(policy, tx) => match core.set_policy(&policy) {
                Ok(()) => after_write.push(tx),
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            },
            Query::Drain(id, drain, tx) => {
                let r = match drain {
                    Some((deadline, kill)) => core.drain_agent(now, &id, deadline, kill),
                    None => core.undrain_agent(now, &id),
                };
                match r {
                    Ok(()) => after_write.push(tx),
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            }
            Query::Locate(who, id, tx) => {
                let r = core.locate_output(&who, &id).and_then(|loc| {
                    conns.get(&loc.agent_conn).map(|(q, _)| (loc, q.clone())).ok_or_else(|| {
                        WireError::new(ErrorCode::NotFound, "the task's agent is not connected")
                    })
                });
                let _ = tx.send(r);
            }
        },
    }
}
