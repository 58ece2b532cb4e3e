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

/// Keeps `leader` at the leader's address while this master stands by and knows it (`None`
/// while it leads or knows no leader), until `serving` goes.
async fn standby_leader(mut serving: watch::Receiver<Serving>, leader: watch::Sender<Option<String>>) {
    loop {
        let now = match &*serving.borrow_and_update() {
            Serving::Standby { leader } => leader.clone(),
            Serving::Leader(_) => None,
        };
        leader.send_if_modified(|l| {
            let changed = *l != now;
            *l = now;
            changed
        });
        if serving.changed().await.is_err() {
            return;
        }
    }
}

/// The candidate's life: take a lease, try to lead, lead until the lease cannot be vouched
/// for (or the registry refuses a write), step down, again; until `shutdown`.
#[allow(clippy::too_many_arguments)]
async fn campaign(
    mut election: Election,
    ha_cfg: HaConfig,
    config: ServerConfig,
    registry: allocator::Registry,
    store: Arc<ArtifactStore>,
    addr: SocketAddr,
    serving: watch::Sender<Serving>,
    shutdown: CancellationToken,
) {
    let retry = Duration::from_millis(500);
    // Consecutive failures to reach etcd: the first is a warning, the rest (every `retry`
    // while etcd is away) only debug lines.
    let mut failures = 0u32;
    'lease: while !shutdown.is_cancelled() {
        let mut alive = match election.new_lease().await {
            Ok(a) => {
                failures = 0;
                a
            }
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    warn!(error = %e, "cannot take an etcd lease; standing by and trying again");
                } else {
                    debug!(error = %e, failures, "cannot take an etcd lease; trying again");
                }
                serving.send_replace(Serving::Standby { leader: None });
                tokio::select! { _ = shutdown.cancelled() => break, _ = tokio::time::sleep(retry) => {} }
                continue;
            }
        };
        loop {
            if !*alive.borrow() {
                continue 'lease;
            }
            let attempt = tokio::select! {
                _ = shutdown.cancelled() => break 'lease,
                a = election.try_lead() => a,
            };
            match attempt {
                Err(e) => {
                    failures += 1;
                    if failures == 1 {
                        warn!(error = %e, "cannot campaign; standing by and trying again");
                    } else {
                        debug!(error = %e, failures, "cannot campaign; trying again");
                    }
                    serving.send_replace(Serving::Standby { leader: None });
                    tokio::select! { _ = shutdown.cancelled() => break 'lease, _ = tokio::time::sleep(retry) => {} }
                }
                Ok(Attempt::Lost { leader, revision }) => {
                    failures = 0;
                    if !matches!(&*serving.borrow(), Serving::Standby { leader: l } if *l == leader) {
                        info!(leader = leader.as_deref().unwrap_or("?"), "standby: another master leads");
                        serving.send_replace(Serving::Standby { leader });
                    }
                    let ttl = election.ttl();
                    tokio::select! {
                        _ = shutdown.cancelled() => break 'lease,
                        _ = alive.changed() => {}
                        _ = election.wait_change(revision, ttl) => {}
                    }
                }
                Ok(Attempt::Won { epoch }) => {
                    failures = 0;
                    info!(epoch, "elected leader");
                    let members = Some((election.members(), election.me().id.clone()));
                    let endpoints = ha_cfg.endpoints.clone();
                    let cluster = ha_cfg.cluster.clone();
                    let timeout = election.ttl().max(Duration::from_secs(1));
                    let reg = EtcdRegistry::connect(&endpoints, &cluster, epoch, timeout);
                    let term = reg.map_err(ServerError::from).and_then(|reg| {
                        start_term(
                            &config,
                            &registry,
                            Box::new(reg),
                            &store,
                            addr,
                            members,
                            shutdown.child_token(),
                        )
                    });
                    let term = match term {
                        Ok(t) => Arc::new(t),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot start leading; resigning");
                            election.resign().await;
                            tokio::select! { _ = shutdown.cancelled() => break 'lease, _ = tokio::time::sleep(retry) => {} }
                            continue 'lease;
                        }
                    };
                    serving.send_replace(Serving::Leader(term.clone()));
                    let why = tokio::select! {
                        _ = shutdown.cancelled() => None,
                        _ = alive.wait_for(|a| !*a) => Some("the etcd lease cannot be vouched for".to_string()),
                        why = wait_fatal(term.fatal.clone()) => Some(why),
                    };
                    // Stop acting first, then tell newcomers.
                    term.stop.cancel();
                    serving.send_replace(Serving::Standby { leader: None });
                    match why {
                        None => break 'lease,
                        Some(why) => {
                            warn!(epoch, reason = %why, "stepping down: no longer the leader");
                            counter!(metrics::STEP_DOWNS).increment(1);
                            election.resign().await;
                            continue 'lease;
                        }
                    }
                }
            }
        }
    }
    // Leaving: give the lease up so that a standby takes over now, not after the TTL.
    election.resign().await;
}

/// Starts a core task on `reg`: opens the registry's epoch, recovers from it, reconciles the
/// artifact index with the store. `members` (with `--etcd`): every master of the cluster and
/// this one's member id; a store that lacks an indexed artifact then fetches it from them in
/// the background ([`replication::recover`]).
#[allow(clippy::too_many_arguments)]
fn start_term(
    config: &ServerConfig,
    registry: &allocator::Registry,
    mut reg: Box<dyn Registry>,
    store: &Arc<ArtifactStore>,
    addr: SocketAddr,
    members: Option<(ha::Members, String)>,
    stop: CancellationToken,
) -> Result<Term, ServerError> {
    let alloc = registry.create(&config.allocator, &config.core.allocation)?;
    let state = reg.open_epoch()?;
    let mut core_cfg = config.core.clone();
    core_cfg.master_id = state.master_id();
    let (tx, rx) = mpsc::unbounded_channel();
    let now = Instant::now();
    let mut core = Master::with_allocator(core_cfg, alloc, now);
    core.set_unix_time(now, unix_millis());
    core.recover(now, &state);
    // The artifact index: the registry's records checked against the files (a file is
    // published before its record is written, so a crash in between leaves a file without a
    // record, adopted here; a record whose file is of another size is dropped, and so is one
    // whose file is missing, unless other masters may have it: then it is fetched first).
    let files: HashMap<Digest, u64> = store.list()?.into_iter().map(|a| (a.digest, a.size)).collect();
    let mut fixes = Vec::new();
    let mut missing = Vec::new();
    for (digest, record) in &state.artifacts {
        core.artifact_uploaded(&mut record.clone());
        match files.get(digest) {
            Some(size) if *size == record.size => {
                // Indexed with a kind only once it passed that kind's checks.
                if let Some(kind) = record.kind {
                    store.note_valid(digest, kind);
                }
            }
            None if members.is_some() => missing.push(record.clone()),
            _ => {
                warn!(%digest, size = record.size, "artifact in the registry has no file of its size: dropping it from the index");
                fixes.push(RegistryOp::RemoveArtifact(digest.clone()));
            }
        }
    }
    for (digest, size) in &files {
        if state.artifacts.get(digest).is_none_or(|r| r.size != *size) {
            fixes.push(RegistryOp::PutArtifact(ArtifactRecord {
                digest: digest.clone(),
                kind: None,
                size: *size,
                uploader: None,
            }));
        }
        core.artifact_stored(digest.clone());
    }
    reg.apply(&fixes)?;
    info!(dir = %store.root().display(), artifacts = store.len(), "artifact store open");
    info!(registry = %reg.location(), epoch = state.epoch, frameworks = state.frameworks.len(),
        agents = state.agents.len(), "registry open");
    let (fatal_tx, fatal) = watch::channel(None);
    tokio::spawn(run_core(core, reg, rx, fatal_tx, stop.clone()).in_current_span());
    if let (Some((members, me)), false) = (&members, missing.is_empty()) {
        let (found, lost) = (tx.clone(), tx.clone());
        tokio::spawn(
            replication::recover(
                missing,
                members.clone(),
                me.clone(),
                config.tls.clone(),
                store.clone(),
                move |record| {
                    let _ = found.send(Command::ArtifactStored(record));
                },
                move |digests| {
                    let _ = lost.send(Command::ArtifactsLost(digests));
                },
                stop.clone(),
            )
            .in_current_span(),
        );
    }
    if let Some(max) = config.eviction.max_bytes {
        tokio::spawn(
            evict_artifacts(store.clone(), tx.clone(), max, config.eviction.clone(), stop.clone())
                .in_current_span(),
        );
    }
    let me =
        MasterView { id: state.master_id(), address: addr.to_string(), leader: true, epoch: state.epoch };
    let acls = config.core.acls.clone();
    Ok(Term { core: CoreClient(tx), me, members: members.map(|(m, _)| m), stop, fatal, acls })
}

/// The leader's bound on its artifact store: every `cfg.interval`, the least recently used
/// artifacts past `max` bytes that nothing refers to are evicted, each first from the core
/// (which may still refuse: a launch came in) and the registry's index (so standbys and the
/// next leader agree), then from the disk. Ends with the term.
async fn evict_artifacts(
    store: Arc<ArtifactStore>,
    core: mpsc::UnboundedSender<Command>,
    max: u64,
    cfg: crate::artifacts::EvictionConfig,
    stop: CancellationToken,
) {
    let interval = cfg.interval.max(Duration::from_millis(10));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let (tx, rx) = oneshot::channel();
        if core.send(Command::ArtifactsInUse(tx)).is_err() {
            return;
        }
        let Ok(keep) = rx.await else { return };
        let (s, grace) = (store.clone(), cfg.grace);
        let found = tokio::task::spawn_blocking(move || {
            s.eviction_candidates(max, &keep, grace, std::time::SystemTime::now())
        })
        .await;
        let candidates = match found {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                warn!(error = %e, "cannot look for artifacts to evict");
                continue;
            }
            Err(e) => {
                warn!(error = %e, "the artifact eviction failed");
                continue;
            }
        };
        for a in candidates {
            let (tx, rx) = oneshot::channel();
            if core.send(Command::EvictArtifact(a.digest.clone(), tx)).is_err() {
                return;
            }
            if !rx.await.unwrap_or(false) {
                continue;
            }
            match store.remove(&a.digest).await {
                Ok(_) => {
                    counter!(crate::metrics::ARTIFACTS_EVICTED).increment(1);
                    info!(digest = %a.digest, size = a.size, "evicted an unused artifact past --artifact-store-size");
                }
                Err(e) => warn!(digest = %a.digest, error = %e, "cannot remove an evicted artifact"),
            }
        }
    }
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

/// Accepts connections until `shutdown`; `standby` (with `--etcd`) is what this master reads
/// for peers while it stands by. Peers whose certificate is in `revoked` are refused, leader
/// or standby alike.
async fn accept_loop(
    endpoint: quinn::Endpoint,
    serving: watch::Receiver<Serving>,
    store: Arc<ArtifactStore>,
    standby: Option<Arc<StandbyReads>>,
    admission: Arc<Admission>,
    revoked: Arc<Revocations>,
    shutdown: CancellationToken,
) {
    let next_id = Arc::new(AtomicU64::new(1));
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            i = endpoint.accept() => match i { Some(i) => i, None => break },
        };
        let conn_id = next_id.fetch_add(1, Ordering::Relaxed);
        let serving = serving.clone();
        let store = store.clone();
        let standby = standby.clone();
        let shutdown = shutdown.clone();
        let admission = admission.clone();
        let revoked = revoked.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(conn) => conn,
                // Includes clients without a certificate signed by the cluster CA.
                Err(e) => {
                    info!(%remote, error = %e, "connection refused during handshake");
                    return;
                }
            };
            if let Some(why) = revoked.refusal(&conn) {
                info!(%remote, reason = %why, "connection refused");
                return refuse_hello(conn, WireError::new(ErrorCode::Unauthorized, why)).await;
            }
            // Cut when its certificate is revoked later.
            tokio::spawn(revoked.clone().guard(conn.clone()));
            // What this master is when the peer says hello decides how it is served.
            let now = serving.borrow().clone();
            match now {
                Serving::Leader(term) if !term.stop.is_cancelled() => {
                    serve_connection(conn_id, conn, term, store, admission).await
                }
                // Stepping down this very moment: no Welcome from a term that ended.
                Serving::Leader(_) => not_leader(conn, None, store, standby, admission, shutdown).await,
                Serving::Standby { leader } => {
                    not_leader(conn, leader, store, standby, admission, shutdown).await
                }
            }
        });
    }
    endpoint.close(0u32.into(), b"master shutting down");
    endpoint.wait_idle().await;
}

/// The master id a standby gives in the `Welcome` it sends another master (epoch 0: it leads
/// nothing).
const STANDBY_MASTER_ID: &str = "standby";

/// Most records of one kind a standby lists on a stale session.
const MAX_STALE_RECORDS: usize = 100_000;

/// What a standby reads without leading (`--etcd`): the cluster's masters and its registry in
/// etcd, for stale listings.
struct StandbyReads {
    members: ha::Members,
    /// This master's member id.
    me: String,
}

/// Whom a standby serves rather than sending away.
enum Guest {
    /// Another master: artifact fetches only.
    Master,
    /// An operator that accepts stale listings.
    StaleOperator,
}

/// A standby's whole conversation: `Hello` → `NotLeader { leader }`, then the connection closes.
/// Two exceptions, each checked against the peer's certificate: another master is welcomed
/// for artifact fetches only (a new leader recovers the artifacts it lacks from standbys), and
/// an operator whose hello allows stale answers gets `Stale` and the listings this master can
/// read itself.
async fn not_leader(
    conn: quinn::Connection,
    leader: Option<String>,
    store: Arc<ArtifactStore>,
    standby: Option<Arc<StandbyReads>>,
    admission: Arc<Admission>,
    shutdown: CancellationToken,
) {
    let remote = conn.remote_address();
    let answer = async {
        let (send, recv) = conn.accept_bi().await?;
        let mut writer = FrameWriter::new(send);
        let mut reader = FrameReader::new(recv);
        let hello = reader.recv::<Hello>().await?;
        let certified = peer_identity(&conn).ok().map(|id| id.role);
        let guest = match (hello, &standby) {
            (Some(h), _) if h.version != PROTOCOL_VERSION || Some(h.role) != certified => None,
            (Some(h), _) if h.role == Role::Master => Some(Guest::Master),
            (Some(h), Some(reads)) if h.role == Role::Operator && h.allow_stale => {
                let stale = HelloReply::Stale { master_id: reads.me.clone(), leader: leader.clone() };
                writer.send(&stale).await?;
                Some(Guest::StaleOperator)
            }
            _ => None,
        };
        if let Some(guest) = guest {
            if matches!(guest, Guest::Master) {
                let welcome = HelloReply::Welcome {
                    version: PROTOCOL_VERSION,
                    master_id: STANDBY_MASTER_ID.into(),
                    epoch: 0,
                };
                writer.send(&welcome).await?;
            }
            return Ok(Some((guest, writer, reader)));
        }
        writer.send(&HelloReply::NotLeader { leader: leader.clone() }).await?;
        let mut s = writer.into_inner();
        let _ = s.finish();
        let _ = tokio::time::timeout(Duration::from_millis(500), s.stopped()).await;
        Ok::<_, HandshakeError>(None)
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, answer).await {
        Ok(Ok(Some((Guest::Master, writer, reader)))) => {
            debug!(%remote, "standby: serving artifact fetches to another master");
            // Nothing but fetches: no core behind this connection.
            let (no_core, _) = mpsc::unbounded_channel();
            let access = Access {
                principal: "master".into(),
                cert_role: Role::Master,
                acls: None,
                limits: admission.limits.clone(),
            };
            let streams = accept_streams(conn.clone(), Role::Master, None, no_core, store, access, admission);
            tokio::spawn(streams.in_current_span());
            serve_master_peer(conn, writer, reader, shutdown).await;
            return;
        }
        Ok(Ok(Some((Guest::StaleOperator, writer, reader)))) => {
            if let Some(reads) = standby {
                debug!(%remote, "standby: serving stale listings to an operator");
                serve_stale(conn, writer, reader, &reads, leader, shutdown).await;
            }
            return;
        }
        Ok(Ok(None)) => {
            debug!(%remote, leader = leader.as_deref().unwrap_or("?"), "standby: told a peer where the leader is")
        }
        Ok(Err(e)) => debug!(%remote, error = %e, "standby: hello failed"),
        Err(_) => debug!(%remote, "standby: no hello in time"),
    }
    conn.close(0u32.into(), b"not the leader");
}

/// Why a stale session serves no such call.
fn stale_refusal(what: &str, leader: &Option<String>) -> WireError {
    let leader = leader.as_deref().map(|l| format!("; the leader is {l}")).unwrap_or_default();
    WireError::new(
        ErrorCode::Unauthorized,
        format!(
            "this master is a standby: on an --allow-stale session it only lists agents, frameworks and masters, it does not {what}{leader}"
        ),
    )
}

/// A standby's stale session with an operator: `GetAgents`, `GetFrameworks` and `GetMasters`
/// answered from etcd (the registry as the leader last wrote it, no live state: statuses are
/// `registered` or `unreachable`, resources in use and task counts 0); every other call and
/// every bulk stream refused.
async fn serve_stale(
    conn: quinn::Connection,
    mut writer: FrameWriter<SendStream>,
    mut reader: FrameReader<RecvStream>,
    reads: &StandbyReads,
    leader: Option<String>,
    shutdown: CancellationToken,
) {
    tokio::spawn(refuse_streams(conn.clone(), leader.clone()).in_current_span());
    let etcd_error = |e: HaError| OperatorReply::Error(WireError::new(ErrorCode::Internal, e.to_string()));
    loop {
        let call = tokio::select! {
            _ = shutdown.cancelled() => break,
            c = reader.recv::<OperatorCall>() => c,
        };
        let reply = match call {
            Ok(Some(OperatorCall::GetAgents)) => match reads.members.agents(MAX_STALE_RECORDS).await {
                Ok(agents) => OperatorReply::Agents(agents.iter().filter_map(stale_agent).collect()),
                Err(e) => etcd_error(e),
            },
            Ok(Some(OperatorCall::GetFrameworks)) => {
                match reads.members.frameworks(MAX_STALE_RECORDS).await {
                    Ok(fws) => OperatorReply::Frameworks(fws.iter().map(stale_framework).collect()),
                    Err(e) => etcd_error(e),
                }
            }
            Ok(Some(OperatorCall::GetMasters)) => match reads.members.list().await {
                Ok(list) => OperatorReply::Masters(list),
                Err(e) => etcd_error(e),
            },
            Ok(Some(OperatorCall::GetPendingTasks)) => OperatorReply::Error(stale_refusal(
                "list pending tasks (only the leader knows the frameworks' demands)",
                &leader,
            )),
            Ok(Some(OperatorCall::GetTasks)) => OperatorReply::Error(stale_refusal(
                "list tasks (they are not in the registry: agents report them to the leader)",
                &leader,
            )),
            Ok(Some(OperatorCall::GetCompletedFrameworks)) => OperatorReply::Error(stale_refusal(
                "list completed frameworks (only the leader remembers them)",
                &leader,
            )),
            Ok(Some(OperatorCall::KillTask { .. })) => {
                OperatorReply::Error(stale_refusal("kill tasks", &leader))
            }
            Ok(Some(OperatorCall::GetPolicy)) => OperatorReply::Error(stale_refusal(
                "show the allocation policy (the leader's flags may be in force)",
                &leader,
            )),
            Ok(Some(OperatorCall::SetPolicy(_))) => {
                OperatorReply::Error(stale_refusal("set the allocation policy", &leader))
            }
            Ok(Some(OperatorCall::GetTaskHistory { .. })) => {
                OperatorReply::Error(stale_refusal("show a task's history", &leader))
            }
            Ok(Some(OperatorCall::DrainAgent { .. } | OperatorCall::UndrainAgent { .. })) => {
                OperatorReply::Error(stale_refusal("drain or undrain agents", &leader))
            }
            Ok(None) | Err(FrameError::Io(_)) => break,
            Err(e) => {
                let err = frame_error(&e);
                let _ = writer.send(&OperatorReply::Error(err.clone())).await;
                conn.close(app_code(err.code), err.message.as_bytes());
                return;
            }
        };
        if send_in_parts(&mut writer, reply).await.is_err() {
            break;
        }
    }
    conn.close(0u32.into(), b"bye");
}

/// An agent of the registry as a stale listing shows it (`None`: gone, not listed).
fn stale_agent(a: &AgentRecord) -> Option<AgentView> {
    let status = match a.standing {
        AgentStanding::Admitted => AgentViewStatus::Registered,
        AgentStanding::Unreachable { .. } => AgentViewStatus::Unreachable,
        AgentStanding::Gone { .. } => return None,
    };
    Some(AgentView {
        id: a.id.clone(),
        hostname: a.hostname.clone(),
        resources: a.resources.clone(),
        used: Default::default(),
        attributes: a.attributes.clone(),
        status,
        tasks: 0,
        drain: a.drain.clone(),
    })
}

/// A framework of the registry as a stale listing shows it.
fn stale_framework(f: &FrameworkRecord) -> FrameworkView {
    FrameworkView {
        id: f.id.clone(),
        name: f.name.clone(),
        role: f.role.clone(),
        principal: f.principal.clone(),
        status: FrameworkViewStatus::Registered,
        used: Default::default(),
        tasks: 0,
    }
}

/// Answers every bulk stream of a stale session with a refusal in the reply type its request
/// expects.
async fn refuse_streams(conn: quinn::Connection, leader: Option<String>) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        let leader = leader.clone();
        tokio::spawn(async move {
            let w = FrameWriter::new(send);
            let mut r = FrameReader::new(recv);
            let req = tokio::time::timeout(HANDSHAKE_TIMEOUT, r.recv::<StreamRequest>()).await;
            let _ = match req {
                Ok(Ok(Some(StreamRequest::Output(_)))) => {
                    reply_and_finish(w, &OutputReply::Error(stale_refusal("read task output", &leader))).await
                }
                Ok(Ok(Some(StreamRequest::Upload(_)))) => {
                    reply_and_finish(w, &UploadReply::Error(stale_refusal("take uploads", &leader))).await
                }
                Ok(Ok(Some(StreamRequest::Fetch { .. }))) => {
                    reply_and_finish(w, &FetchReply::Error(stale_refusal("serve artifacts", &leader))).await
                }
                Ok(Ok(Some(StreamRequest::Files(_)))) => {
                    reply_and_finish(w, &FilesReply::Error(stale_refusal("read task sandboxes", &leader)))
                        .await
                }
                _ => Ok(()),
            };
        });
    }
}

fn app_code(code: ErrorCode) -> quinn::VarInt {
    quinn::VarInt::from_u32(code.close_code())
}

fn frame_error(e: &FrameError) -> WireError {
    match e {
        FrameError::TooLarge { max } => {
            WireError::new(ErrorCode::TooLarge, format!("frame larger than {max} bytes"))
        }
        FrameError::Malformed(err) => {
            WireError::new(ErrorCode::Malformed, format!("malformed message: {err}"))
        }
        FrameError::Io(err) => WireError::new(ErrorCode::Internal, format!("stream error: {err}")),
    }
}

/// Answers a peer's `Hello` with `Refused(err)` (the reason its client shows) and closes the
/// connection with it.
async fn refuse_hello(conn: quinn::Connection, err: WireError) {
    let answer = async {
        let (send, recv) = conn.accept_bi().await.ok()?;
        let mut writer = FrameWriter::new(send);
        let mut reader = FrameReader::new(recv);
        let _ = reader.recv::<Hello>().await;
        let _ = writer.send(&HelloReply::Refused(err.clone())).await;
        let mut s = writer.into_inner();
        let _ = s.finish();
        let _ = tokio::time::timeout(Duration::from_millis(200), s.stopped()).await;
        Some(())
    };
    let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, answer).await;
    conn.close(app_code(err.code), err.message.as_bytes());
}

/// What a connection may do: its certificate's principal and role, the role it opened its
/// session as (a framework certificate may open an operator session, restricted to its own
/// frameworks), and the ACLs.
#[derive(Clone)]
struct Access {
    principal: String,
    /// The certificate's role.
    cert_role: Role,
    acls: Option<Arc<Acls>>,
    /// The bounds on its bulk streams (timeouts).
    limits: PeerLimits,
}

impl Access {
    /// Does the session hold `right`? Without `--acls`, an operator certificate holds every
    /// right and a framework certificate none (it sees and acts on its own frameworks only).
    fn may(&self, right: OperatorRight) -> bool {
        match &self.acls {
            Some(acls) => acls.has(&self.principal, right),
            None => self.cert_role == Role::Operator,
        }
    }

    fn check(&self, right: OperatorRight) -> Result<(), WireError> {
        if self.may(right) {
            return Ok(());
        }
        counter!(metrics::ACL_DENIALS).increment(1);
        let why =
            if self.acls.is_none() { " (a framework certificate; use an operator certificate)" } else { "" };
        Err(WireError::new(
            ErrorCode::Unauthorized,
            format!("principal `{}` may not {}{why}", self.principal, right.action()),
        ))
    }

    /// How much the principal may upload (`None`: no limit), or why not at all.
    fn upload(&self) -> Result<Option<u64>, WireError> {
        match &self.acls {
            None => Ok(None),
            Some(acls) => match acls.upload_limit(&self.principal) {
                Ok(UploadLimit::Unlimited) => Ok(None),
                Ok(UploadLimit::Quota(q)) => Ok(Some(q)),
                Err(e) => {
                    counter!(metrics::ACL_DENIALS).increment(1);
                    Err(e)
                }
            },
        }
    }

    /// Who reads task output and files on an operator session.
    fn reader(&self) -> Requester {
        if self.may(OperatorRight::ReadAny) {
            Requester::Operator
        } else {
            Requester::Principal(self.principal.clone())
        }
    }
}

/// Whether a session `hello` may be opened with a certificate of role `cert`: the same role,
/// or an operator session of a framework certificate (its principal's own frameworks only).
fn session_allowed(hello: Role, cert: Role) -> bool {
    hello == cert || (hello == Role::Operator && cert == Role::Framework)
}

/// Why a connection's handshake failed. Its text is logged and is the connection's close
/// reason; a peer that was refused also had the [`WireError`] in a `Refused` reply.
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    /// The peer's certificate cannot be read.
    #[error(transparent)]
    Identity(#[from] TlsError),
    /// The peer opened no control stream within the handshake timeout.
    #[error("no control stream opened in time")]
    NoStream,
    /// The connection failed before the control stream was open.
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    /// The peer sent no hello within the handshake timeout.
    #[error("no hello in time")]
    NoHello,
    /// The `Welcome` could not be sent.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The master refused the session.
    #[error("{}", .0.message)]
    Refused(WireError),
}

/// A connection's hello and the master's answer: `Welcome` if the certificate allows the
/// session's role, the version is ours and `admission` lets the principal open one more
/// connection. Returns the certificate's identity, the role of the session the peer opened and
/// the connection slot it holds while open.
#[allow(clippy::type_complexity)]
async fn handshake(
    conn: &quinn::Connection,
    master_id: &str,
    epoch: u64,
    admission: &Admission,
) -> Result<(Identity, Role, Option<Slot>, FrameWriter<SendStream>, FrameReader<RecvStream>), HandshakeError>
{
    let identity = peer_identity(conn)?;
    let (send, recv) = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| HandshakeError::NoStream)??;
    let mut writer = FrameWriter::new(send);
    let mut reader = FrameReader::new(recv);
    let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.recv::<Hello>())
        .await
        .map_err(|_| HandshakeError::NoHello)?;
    let refuse = |e: WireError| e;
    let verdict = match hello {
        Ok(Some(h)) if h.version != PROTOCOL_VERSION => Err(refuse(WireError::new(
            ErrorCode::VersionMismatch,
            format!(
                "protocol version {} is not supported (this master speaks {PROTOCOL_VERSION})",
                h.version
            ),
        ))),
        Ok(Some(h)) if !session_allowed(h.role, identity.role) => Err(WireError::new(
            ErrorCode::Unauthorized,
            format!("certificate of `{}` is for role {}, not {}", identity.principal, identity.role, h.role),
        )),
        Ok(Some(h)) => admission.connection(&identity).map(|slot| (h.role, slot)),
        Ok(None) => Err(WireError::new(ErrorCode::Unexpected, "stream closed before hello")),
        Err(e) => Err(frame_error(&e)),
    };
    match verdict {
        Ok((session, slot)) => {
            writer
                .send(&HelloReply::Welcome {
                    version: PROTOCOL_VERSION,
                    master_id: master_id.to_string(),
                    epoch,
                })
                .await?;
            Ok((identity, session, slot, writer, reader))
        }
        Err(err) => {
            let _ = writer.send(&HelloReply::Refused(err.clone())).await;
            let mut s = writer.into_inner();
            let _ = s.finish();
            let _ = tokio::time::timeout(Duration::from_millis(200), s.stopped()).await;
            conn.close(app_code(err.code), err.message.as_bytes());
            Err(HandshakeError::Refused(err))
        }
    }
}

async fn serve_connection(
    id: ConnId,
    conn: quinn::Connection,
    term: Arc<Term>,
    store: Arc<ArtifactStore>,
    admission: Arc<Admission>,
) {
    let core = term.core.0.clone();
    let shutdown = term.stop.clone();
    let remote = conn.remote_address();
    let (identity, session, _slot, writer, reader) =
        match handshake(&conn, &term.me.id, term.me.epoch, &admission).await {
            Ok(x) => x,
            Err(e) => {
                let why = e.to_string();
                info!(%remote, conn = id, reason = %why, "connection refused");
                conn.close(app_code(ErrorCode::Unauthorized), why.as_bytes());
                return;
            }
        };
    let span = tracing::info_span!("conn", conn = id, role = %identity.role, principal = %identity.principal);
    async move {
        debug!(%remote, "connected");
        // Bulk streams: task output and uploads from frameworks and operators, fetches from agents.
        let access = Access {
            principal: identity.principal.clone(),
            cert_role: identity.role,
            acls: term.acls.clone(),
            limits: admission.limits.clone(),
        };
        let who = match session {
            Role::Framework => Some(Requester::Framework(id)),
            Role::Operator => Some(access.reader()),
            Role::Agent | Role::Master => None,
        };
        let streams = accept_streams(
            conn.clone(),
            session,
            who,
            core.clone(),
            store,
            access.clone(),
            admission.clone(),
        );
        tokio::spawn(streams.in_current_span());
        let limits = &admission.limits;
        match session {
            Role::Agent => {
                let max = (limits.agent_outbox_bytes, EVENTS_IN_CORE_PER_AGENT);
                serve_peer::<AgentMessage, MasterToAgent>(
                    id, conn, identity, writer, reader, core, max, shutdown,
                )
                .await
            }
            Role::Framework => {
                let max = (limits.outbox_bytes, EVENTS_IN_CORE_PER_CONNECTION);
                serve_peer::<SchedulerCall, SchedulerEvent>(
                    id, conn, identity, writer, reader, core, max, shutdown,
                )
                .await
            }
            Role::Operator => serve_operator(conn, writer, reader, core, &term, &access, shutdown).await,
            Role::Master => serve_master_peer(conn, writer, reader, shutdown).await,
        }
        debug!("disconnected");
    }
    .instrument(span)
    .await
}

/// Per-role glue between frames and core events.
trait Peer: serde::de::DeserializeOwned + Send + 'static {
    type Out: Serialize + Send + Sync + 'static;
    fn event(conn: ConnId, principal: &str, msg: Self) -> Event;
    fn disconnected(conn: ConnId) -> Event;
    fn unwrap_out(o: Outgoing) -> Option<Self::Out>;
    fn error(e: WireError) -> Self::Out;
    /// What a list message to the peer carries, for [`FrameWriter::feed_list`].
    type Item: Serialize + Send;
    /// A message that carries a list which may outgrow a frame, as the list and the variant
    /// that wraps it; `Err` gives any other message back.
    #[allow(clippy::type_complexity)]
    fn list(out: Self::Out) -> Result<(Vec<Self::Item>, fn(Vec<Self::Item>) -> Self::Out), Self::Out> {
        Err(out)
    }
}

impl Peer for AgentMessage {
    type Out = MasterToAgent;
    /// Nothing to the agent is a list.
    type Item = ();
    fn event(conn: ConnId, principal: &str, msg: Self) -> Event {
        Event::Agent { conn, principal: principal.to_string(), msg }
    }
    fn disconnected(conn: ConnId) -> Event {
        Event::AgentDisconnected { conn }
    }
    fn unwrap_out(o: Outgoing) -> Option<MasterToAgent> {
        match o {
            Outgoing::Agent(m) => Some(m),
            _ => None,
        }
    }
    fn error(e: WireError) -> MasterToAgent {
        MasterToAgent::Error(e)
    }
}

impl Peer for SchedulerCall {
    type Out = SchedulerEvent;
    type Item = Offer;
    fn event(conn: ConnId, principal: &str, call: Self) -> Event {
        Event::Framework { conn, principal: principal.to_string(), call }
    }
    fn disconnected(conn: ConnId) -> Event {
        Event::FrameworkDisconnected { conn }
    }
    fn unwrap_out(o: Outgoing) -> Option<SchedulerEvent> {
        match o {
            Outgoing::Framework(m) => Some(m),
            _ => None,
        }
    }
    fn error(e: WireError) -> SchedulerEvent {
        SchedulerEvent::Error(e)
    }
    fn list(out: SchedulerEvent) -> Result<(Vec<Offer>, fn(Vec<Offer>) -> SchedulerEvent), SchedulerEvent> {
        match out {
            // Offers of thousands of agents at once.
            SchedulerEvent::Offers(offers) => Ok((offers, SchedulerEvent::Offers)),
            other => Err(other),
        }
    }
}

/// Serves an agent's or a framework's control stream: frames in become core events; the core's
/// messages go out through an outbox bounded at `max_outbox` bytes; at most `in_core_share`
/// of its messages wait in the core's queue. A peer that does not read
/// its stream while its outbox grows past the bound is disconnected (logged, counted in
/// [`metrics::SLOW_PEERS_DISCONNECTED`]) rather than buffered.
#[allow(clippy::too_many_arguments)]
async fn serve_peer<In, Out>(
    id: ConnId,
    conn: quinn::Connection,
    identity: Identity,
    writer: FrameWriter<SendStream>,
    mut reader: FrameReader<RecvStream>,
    core: mpsc::UnboundedSender<Command>,
    (max_outbox, in_core_share): (usize, usize),
    shutdown: CancellationToken,
) where
    In: Peer<Out = Out>,
    Out: Serialize + Send + Sync + 'static,
{
    let (out_tx, mut out_rx) =
        limits::counted::<Outgoing>((max_outbox / limits::OUTBOX_BYTES_PER_MESSAGE).max(1024));
    if core.send(Command::Attach { conn: id, quic: conn.clone(), outbox: out_tx.clone() }).is_err() {
        return;
    }
    // The pump: writes encoded frames to the QUIC stream as fast as the peer takes them. It
    // hands the stream back when the outbox closes (to finish it after a last error frame).
    let (sink, mut pump) = limits::outbox(max_outbox);
    let mut pump_task = tokio::spawn(async move {
        let mut send = writer.into_inner();
        while let Some(chunk) = pump.rx.recv().await {
            let n = chunk.len();
            send.write_chunk(chunk).await.ok()?;
            pump.taken(n);
        }
        Some(send)
    });
    // Writer: drains the outbox, encoding frames (once) into the byte-bounded sink, batching
    // them into one flush.
    let wconn = conn.clone();
    let writer_task = tokio::spawn(
        async move {
            let mut writer = FrameWriter::new(sink);
            // Why the writer stopped: the peer does not read (its outbox is full), or a close.
            let overflow = |writer: &FrameWriter<limits::OutboxSink>, e: &FrameError| {
                let FrameError::Io(err) = e else { return };
                if err.kind() == std::io::ErrorKind::OutOfMemory {
                    slow_peer(&wconn, &format!("{} bytes", writer.get_ref().max()));
                }
            };
            while let Some(first) = out_rx.recv().await {
                let mut next = Some(first);
                let mut n = 0;
                while let Some(o) = next.take() {
                    match o {
                        Outgoing::Close(err) => {
                            let _ = writer.send(&In::error(err.clone())).await;
                            drop(writer);
                            // The error frame reaches a peer that reads; one that does not is
                            // closed anyway.
                            if let Ok(Ok(Some(mut s))) =
                                tokio::time::timeout(Duration::from_secs(1), &mut pump_task).await
                            {
                                let _ = s.finish();
                                let _ = tokio::time::timeout(Duration::from_millis(200), s.stopped()).await;
                            }
                            pump_task.abort();
                            wconn.close(app_code(err.code), err.message.as_bytes());
                            return;
                        }
                        other => {
                            if let Some(m) = In::unwrap_out(other) {
                                if let Err(e) = feed_split::<In, _>(&mut writer, m).await {
                                    overflow(&writer, &e);
                                    pump_task.abort();
                                    return;
                                }
                            }
                        }
                    }
                    n += 1;
                    if n < 256 {
                        next = out_rx.try_recv();
                    }
                }
                if let Err(e) = writer.flush().await {
                    overflow(&writer, &e);
                    pump_task.abort();
                    return;
                }
            }
            drop(writer);
            let _ = tokio::time::timeout(Duration::from_secs(1), &mut pump_task).await;
            pump_task.abort();
        }
        .in_current_span(),
    );
    let in_core = Arc::new(tokio::sync::Semaphore::new(in_core_share));
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = reader.recv::<In>() => m,
        };
        match msg {
            Ok(Some(m)) => {
                // Acquired in the select's branch below: waiting for it still listens to shutdown.
                let permit = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    p = in_core.clone().acquire_owned() => p.ok(),
                };
                if core.send(Command::Event(In::event(id, &identity.principal, m), permit)).is_err() {
                    break;
                }
            }
            Ok(None) => break,
            Err(FrameError::Io(e)) => {
                debug!(error = %e, "control stream ended");
                break;
            }
            Err(e) => {
                // Malformed or oversized: answer, close this connection only.
                let err = frame_error(&e);
                warn!(error = %err.message, "bad frame from peer; closing its connection");
                out_tx.send_always(Outgoing::Close(err));
                break;
            }
        }
    }
    let _ = core.send(Command::Event(In::disconnected(id), None));
    drop(out_tx);
    let _ = tokio::time::timeout(Duration::from_secs(1), writer_task).await;
    conn.close(0u32.into(), b"bye");
}

async fn serve_operator(
    conn: quinn::Connection,
    mut writer: FrameWriter<SendStream>,
    mut reader: FrameReader<RecvStream>,
    core: mpsc::UnboundedSender<Command>,
    term: &Term,
    access: &Access,
    shutdown: CancellationToken,
) {
    let core = CoreClient(core);
    let list_all = access.may(OperatorRight::ListAll);
    let mine = |fws: Vec<FrameworkView>| -> Vec<FrameworkView> {
        if list_all {
            fws
        } else {
            fws.into_iter().filter(|f| f.principal == access.principal).collect()
        }
    };
    loop {
        let call = tokio::select! {
            _ = shutdown.cancelled() => break,
            c = reader.recv::<OperatorCall>() => c,
        };
        let reply = match call {
            Ok(Some(OperatorCall::GetAgents)) => {
                OperatorReply::Agents(core.ask(Query::Agents).await.unwrap_or_default())
            }
            Ok(Some(OperatorCall::GetFrameworks)) => {
                OperatorReply::Frameworks(mine(core.ask(Query::Frameworks).await.unwrap_or_default()))
            }
            Ok(Some(OperatorCall::GetCompletedFrameworks)) => OperatorReply::Frameworks(mine(
                core.ask(Query::CompletedFrameworks).await.unwrap_or_default(),
            )),
            Ok(Some(OperatorCall::GetMasters)) => match &term.members {
                // One master: itself, the leader.
                None => OperatorReply::Masters(vec![term.me.clone()]),
                Some(members) => match members.list().await {
                    Ok(list) => OperatorReply::Masters(list),
                    Err(e) => OperatorReply::Error(WireError::new(ErrorCode::Internal, e.to_string())),
                },
            },
            Ok(Some(OperatorCall::GetTasks)) => {
                let tasks = core.ask(Query::Tasks).await.unwrap_or_default();
                if list_all {
                    OperatorReply::Tasks(tasks)
                } else {
                    // The principal's frameworks, live and completed.
                    let mut own = mine(core.ask(Query::Frameworks).await.unwrap_or_default());
                    own.extend(mine(core.ask(Query::CompletedFrameworks).await.unwrap_or_default()));
                    let own: std::collections::HashSet<FrameworkId> = own.into_iter().map(|f| f.id).collect();
                    OperatorReply::Tasks(
                        tasks.into_iter().filter(|t| own.contains(&t.framework_id)).collect(),
                    )
                }
            }
            Ok(Some(OperatorCall::GetPendingTasks)) => {
                let pending = core.ask(Query::PendingTasks).await.unwrap_or_default();
                if list_all {
                    OperatorReply::PendingTasks(pending)
                } else {
                    // Only what the principal's own live frameworks wait for.
                    let own = mine(core.ask(Query::Frameworks).await.unwrap_or_default());
                    let own: std::collections::HashSet<FrameworkId> = own.into_iter().map(|f| f.id).collect();
                    OperatorReply::PendingTasks(
                        pending.into_iter().filter(|p| own.contains(&p.framework_id)).collect(),
                    )
                }
            }
            Ok(Some(OperatorCall::GetPolicy)) => match core.ask(Query::Policy).await {
                Some((policy, source)) => OperatorReply::Policy { policy, source: source.to_string() },
                None => break,
            },
            Ok(Some(OperatorCall::SetPolicy(_))) if !access.may(OperatorRight::SetPolicy) => {
                OperatorReply::Error(access.check(OperatorRight::SetPolicy).err().unwrap_or_else(denied))
            }
            Ok(Some(OperatorCall::SetPolicy(policy))) => {
                match core.ask(|tx| Query::SetPolicy(policy, tx)).await {
                    Some(Ok(())) => OperatorReply::Ok,
                    Some(Err(e)) => OperatorReply::Error(e),
                    None => break,
                }
            }
            Ok(Some(OperatorCall::GetTaskHistory { framework_id, .. }))
                if !list_all
                    && !core
                        .ask(|tx| Query::Owns(access.principal.clone(), framework_id.clone(), tx))
                        .await
                        .unwrap_or(false) =>
            {
                OperatorReply::Error(access.check(OperatorRight::ListAll).err().unwrap_or_else(denied))
            }
            Ok(Some(OperatorCall::GetTaskHistory { framework_id, task_id })) => {
                let key = TaskKey::new(framework_id, task_id);
                match core.ask(|tx| Query::TaskHistory(key.clone(), tx)).await {
                    Some(Some(h)) => OperatorReply::TaskHistory(h),
                    Some(None) => OperatorReply::Error(WireError::new(
                        ErrorCode::NotFound,
                        format!("no task {} of framework {}", key.task_id, key.framework_id),
                    )),
                    None => break,
                }
            }
            Ok(Some(OperatorCall::DrainAgent { .. } | OperatorCall::UndrainAgent { .. }))
                if !access.may(OperatorRight::Drain) =>
            {
                OperatorReply::Error(access.check(OperatorRight::Drain).err().unwrap_or_else(denied))
            }
            Ok(Some(OperatorCall::DrainAgent { agent_id, deadline, kill })) => {
                match core.ask(|tx| Query::Drain(agent_id, Some((deadline, kill)), tx)).await {
                    Some(Ok(())) => OperatorReply::Ok,
                    Some(Err(e)) => OperatorReply::Error(e),
                    None => break,
                }
            }
            Ok(Some(OperatorCall::UndrainAgent { agent_id })) => {
                match core.ask(|tx| Query::Drain(agent_id, None, tx)).await {
                    Some(Ok(())) => OperatorReply::Ok,
                    Some(Err(e)) => OperatorReply::Error(e),
                    None => break,
                }
            }
            Ok(Some(OperatorCall::KillTask { task_id })) if !access.may(OperatorRight::KillAny) => {
                match core.ask(|tx| Query::KillOwn(access.principal.clone(), task_id, tx)).await {
                    Some(Ok(())) => OperatorReply::Ok,
                    Some(Err(e)) => OperatorReply::Error(e),
                    None => break,
                }
            }
            Ok(Some(OperatorCall::KillTask { task_id })) => {
                match core.ask(|tx| Query::Kill(task_id, tx)).await {
                    Some(Ok(())) => OperatorReply::Ok,
                    Some(Err(e)) => OperatorReply::Error(e),
                    None => break,
                }
            }
            Ok(None) | Err(FrameError::Io(_)) => break,
            Err(e) => {
                let err = frame_error(&e);
                let _ = writer.send(&OperatorReply::Error(err.clone())).await;
                conn.close(app_code(err.code), err.message.as_bytes());
                return;
            }
        };
        if send_in_parts(&mut writer, reply).await.is_err() {
            break;
        }
    }
    conn.close(0u32.into(), b"bye");
}

/// The error of a check that unexpectedly passed (never sent: each caller checked first).
fn denied() -> WireError {
    WireError::new(ErrorCode::Unauthorized, "denied")
}

/// Queues `m`; a list too large for one frame goes in several messages that each fit (in
/// order). A message that does not fit otherwise is an error, which drops the connection.
async fn feed_split<P: Peer, W: tokio::io::AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    m: P::Out,
) -> Result<(), FrameError> {
    let fits = match P::list(m) {
        Ok((items, wrap)) => writer.feed_list(items, LIST_BUDGET, wrap).await?.is_empty(),
        Err(m) => match writer.feed(&m).await {
            Err(FrameError::TooLarge { .. }) => false,
            done => return done,
        },
    };
    if fits {
        return Ok(());
    }
    tracing::error!(max = MAX_FRAME, "a message to a peer does not fit in a frame");
    Err(FrameError::TooLarge { max: MAX_FRAME })
}

/// Sends a reply; a list too large for one frame goes as `…Part` replies ending with the list's
/// own variant (the client puts them back together).
async fn send_in_parts(writer: &mut FrameWriter<SendStream>, reply: OperatorReply) -> Result<(), FrameError> {
    use agora_sdk::frame::in_parts;
    let replies = match reply {
        OperatorReply::Agents(a) => in_parts(a, OperatorReply::AgentsPart, OperatorReply::Agents),
        OperatorReply::Frameworks(f) => in_parts(f, OperatorReply::FrameworksPart, OperatorReply::Frameworks),
        OperatorReply::Tasks(t) => in_parts(t, OperatorReply::TasksPart, OperatorReply::Tasks),
        other => vec![other],
    };
    for r in &replies {
        writer.feed(r).await?;
    }
    writer.flush().await
}

/// Another master's connection, open for artifact fetches only (its bulk streams, see
/// [`crate::replication`]): nothing may come on its control stream. Ends when the peer closes
/// it, or with `shutdown`.
async fn serve_master_peer(
    conn: quinn::Connection,
    writer: FrameWriter<SendStream>,
    mut reader: FrameReader<RecvStream>,
    shutdown: CancellationToken,
) {
    let got = tokio::select! {
        _ = shutdown.cancelled() => None,
        // Whatever arrives: no message on it is served (postcard cannot skip an unknown one,
        // so it may also come out as malformed).
        m = reader.recv::<serde::de::IgnoredAny>() => match m {
            Ok(None) | Err(FrameError::Io(_)) => None,
            Ok(Some(_)) | Err(_) => Some(()),
        },
    };
    if got.is_some() {
        let err = WireError::new(
            ErrorCode::Unauthorized,
            "master connections may only fetch artifacts; nothing is served on their control stream",
        );
        info!(remote = %conn.remote_address(), "a master sent a call on its control stream; closing its connection");
        let mut writer = writer;
        let _ = writer.send(&OperatorReply::Error(err.clone())).await;
        let mut s = writer.into_inner();
        let _ = s.finish();
        let _ = tokio::time::timeout(Duration::from_millis(200), s.stopped()).await;
        conn.close(app_code(err.code), err.message.as_bytes());
        return;
    }
    conn.close(0u32.into(), b"bye");
}

/// Serves the bulk streams a peer opens, each in its own task: task output (frameworks and
/// operators, `who`), artifact uploads (frameworks and operators) and artifact fetches (agents
/// and other masters).
///
/// A framework or operator principal holds at most `--max-streams-per-principal` of them at
/// once (over all its connections); more are refused with an error in the reply type the
/// request expects.
async fn accept_streams(
    conn: quinn::Connection,
    role: Role,
    who: Option<Requester>,
    core: mpsc::UnboundedSender<Command>,
    store: Arc<ArtifactStore>,
    access: Access,
    admission: Arc<Admission>,
) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        let slot = match admission.stream(role, &access.principal) {
            Ok(slot) => slot,
            Err(err) => {
                tokio::spawn(refuse_stream(send, recv, err).in_current_span());
                continue;
            }
        };
        let core = core.clone();
        let who = who.clone();
        let store = store.clone();
        let access = access.clone();
        tokio::spawn(
            async move {
                let _slot = slot;
                if let Err(e) = serve_stream(send, recv, role, who, core, store, &access).await {
                    debug!(error = %e, "bulk stream ended with an error");
                }
            }
            .in_current_span(),
        );
    }
}

/// Answers a bulk stream with `err` in the reply type its request expects.
async fn refuse_stream(send: SendStream, recv: RecvStream, err: WireError) {
    let w = FrameWriter::new(send);
    let mut r = FrameReader::new(recv);
    let _ = match tokio::time::timeout(HANDSHAKE_TIMEOUT, r.recv::<StreamRequest>()).await {
        Ok(Ok(Some(StreamRequest::Output(_)))) => reply_and_finish(w, &OutputReply::Error(err)).await,
        Ok(Ok(Some(StreamRequest::Upload(_)))) => reply_and_finish(w, &UploadReply::Error(err)).await,
        Ok(Ok(Some(StreamRequest::Fetch { .. }))) => reply_and_finish(w, &FetchReply::Error(err)).await,
        Ok(Ok(Some(StreamRequest::Files(_)))) => reply_and_finish(w, &FilesReply::Error(err)).await,
        _ => Ok(()),
    };
}

/// Why a bulk stream ended before it was served to its end. Logged only: the peer has had
/// its reply already, or sees its stream reset.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    /// A frame could not be read or written.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The peer sent no request within the handshake timeout, or closed the stream.
    #[error("no stream request")]
    NoRequest,
    /// The core is gone.
    #[error("master stopping")]
    Stopping,
    /// A stream to the task's agent could not be opened.
    #[error(transparent)]
    Agent(#[from] quinn::ConnectionError),
    /// Copying bytes between the agent and the client failed.
    #[error(transparent)]
    Relay(#[from] std::io::Error),
    /// Sending an artifact's bytes failed.
    #[error("artifact {digest}: {err}")]
    Send {
        digest: Digest,
        #[source]
        err: std::io::Error,
    },
    /// An artifact's file held fewer bytes than its size.
    #[error("artifact {digest} shrank to {sent} of {size} bytes while being sent")]
    Shrank { digest: Digest, sent: u64, size: u64 },
}

/// Sends one reply frame and finishes the stream.
async fn reply_and_finish<T: Serialize>(
    mut w: FrameWriter<SendStream>,
    reply: &T,
) -> Result<(), StreamError> {
    w.send(reply).await?;
    let _ = w.into_inner().finish();
    Ok(())
}

fn not_allowed(role: Role, what: &str) -> WireError {
    WireError::new(ErrorCode::Unauthorized, format!("{role} connections may not {what}"))
}

/// Reads a bulk stream's [`StreamRequest`] and serves it if the peer's role may.
async fn serve_stream(
    send: SendStream,
    recv: RecvStream,
    role: Role,
    who: Option<Requester>,
    core: mpsc::UnboundedSender<Command>,
    store: Arc<ArtifactStore>,
    access: &Access,
) -> Result<(), StreamError> {
    let limits = &access.limits;
    let w = FrameWriter::new(send);
    let mut r = FrameReader::new(recv);
    let req = match tokio::time::timeout(HANDSHAKE_TIMEOUT, r.recv::<StreamRequest>()).await {
        Ok(Ok(Some(req))) => req,
        Ok(Err(e)) => {
            reply_and_finish(w, &OutputReply::Error(frame_error(&e))).await?;
            return Err(e.into());
        }
        _ => return Err(StreamError::NoRequest),
    };
    match req {
        StreamRequest::Output(req) => match who {
            Some(who) => relay_output(w, r, req, who, core, limits).await,
            None => reply_and_finish(w, &OutputReply::Error(not_allowed(role, "read task output"))).await,
        },
        StreamRequest::Upload(req) if matches!(role, Role::Framework | Role::Operator) => {
            match access.upload() {
                Ok(quota) => serve_upload(w, r, req, core, &store, access, quota).await,
                Err(e) => reply_and_finish(w, &UploadReply::Error(e)).await,
            }
        }
        StreamRequest::Upload(_) => {
            reply_and_finish(w, &UploadReply::Error(not_allowed(role, "upload artifacts"))).await
        }
        // Masters copy each other's artifacts (see crate::replication).
        StreamRequest::Fetch { digest } if matches!(role, Role::Agent | Role::Master) => {
            serve_fetch(w, &digest, &store, limits).await
        }
        StreamRequest::Fetch { .. } => {
            reply_and_finish(w, &FetchReply::Error(not_allowed(role, "fetch artifacts"))).await
        }
        StreamRequest::Files(req) => match who {
            Some(who) => {
                let task_id = req.task_id.clone();
                let forward = |fw| StreamRequest::Files(FilesRequest { framework_id: Some(fw), ..req });
                // A sandbox read never follows: its whole life is bounded.
                let total = Some(limits.stream_total_timeout);
                let streams = |r: &FilesReply| matches!(r, FilesReply::Sending { .. });
                relay_to_agent(w, r, task_id, who, core, forward, FilesReply::Error, streams, limits, total)
                    .await
            }
            None => reply_and_finish(w, &FilesReply::Error(not_allowed(role, "read task sandboxes"))).await,
        },
    }
}

fn artifact_error(e: &ArtifactError) -> WireError {
    WireError::new(e.code(), e.to_string())
}

/// One upload: `Present` or `Send`, then the bytes into the store, then `Stored` or an error.
/// The core learns of the digest before the uploader hears of it, so a launch that follows
/// the reply finds it. With a `quota` (`--acls`), the declared size is reserved against the
/// principal's before any byte is taken, and refused past it.
async fn serve_upload(
    mut w: FrameWriter<SendStream>,
    r: FrameReader<RecvStream>,
    req: UploadRequest,
    core: mpsc::UnboundedSender<Command>,
    store: &ArtifactStore,
    access: &Access,
    quota: Option<u64>,
) -> Result<(), StreamError> {
    let (principal, limits) = (access.principal.as_str(), &access.limits);
    let uploader = Some(principal.to_string());
    let present = match store.check(&req) {
        Ok(()) => store.check_present(&req).await,
        Err(e) => Err(e),
    };
    match present {
        Ok(true) => {
            counter!(metrics::ARTIFACT_UPLOADS, "outcome" => "present").increment(1);
            let record =
                ArtifactRecord { digest: req.digest.clone(), kind: Some(req.kind), size: req.size, uploader };
            let _ = core.send(Command::ArtifactStored(record));
            return reply_and_finish(w, &UploadReply::Present).await;
        }
        Ok(false) => {}
        Err(e) => {
            counter!(metrics::ARTIFACT_UPLOADS, "outcome" => "rejected").increment(1);
            info!(name = %req.name, error = %e, "artifact refused");
            return reply_and_finish(w, &UploadReply::Error(artifact_error(&e))).await;
        }
    }
    if let Some(quota) = quota {
        let (tx, rx) = oneshot::channel();
        let reserve = Query::ReserveUpload(principal.to_string(), req.size, quota, tx);
        core.send(Command::Query(reserve)).map_err(|_| StreamError::Stopping)?;
        if let Err(e) = rx.await.map_err(|_| StreamError::Stopping)? {
            counter!(metrics::ARTIFACT_UPLOADS, "outcome" => "rejected").increment(1);
            info!(name = %req.name, error = %e.message, "artifact refused");
            return reply_and_finish(w, &UploadReply::Error(e)).await;
        }
    }
    // Given back however the upload ends (after `ArtifactStored`, which counts it instead).
    let release = |core: &mpsc::UnboundedSender<Command>| {
        if quota.is_some() {
            let _ = core.send(Command::Query(Query::ReleaseUpload(principal.to_string(), req.size)));
        }
    };
    if let Err(e) = w.send(&UploadReply::Send).await {
        release(&core);
        return Err(e.into());
    }
    let (recv, buffered) = r.into_parts();
    // An uploader that sends nothing for the idle timeout, or is not done by the total one, is
    // cut (the store then refuses the upload and removes what it received).
    let recv = Idle::with_total(recv, limits.stream_idle_timeout, limits.stream_total_timeout);
    let body = tokio::io::AsyncReadExt::chain(std::io::Cursor::new(buffered.freeze()), recv);
    let reply = match store.store(&req, body).await {
        Ok(artifact) => {
            info!(digest = %artifact.digest, size = artifact.size, name = %req.name, "artifact stored");
            let record = ArtifactRecord {
                digest: artifact.digest,
                kind: Some(req.kind),
                size: artifact.size,
                uploader,
            };
            let _ = core.send(Command::ArtifactStored(record));
            UploadReply::Stored
        }
        Err(e) => {
            info!(name = %req.name, error = %e, "artifact refused");
            UploadReply::Error(artifact_error(&e))
        }
    };
    release(&core);
    reply_and_finish(w, &reply).await
}

/// One fetch: `Sending { size }` then exactly `size` bytes, or an error.
async fn serve_fetch(
    w: FrameWriter<SendStream>,
    digest: &Digest,
    store: &ArtifactStore,
    limits: &PeerLimits,
) -> Result<(), StreamError> {
    let (file, size) = match store.open_read(digest).await {
        Ok(Some(x)) => x,
        Ok(None) => {
            let err = WireError::new(
                ErrorCode::NotFound,
                format!("artifact {digest} is not in the master's artifact store"),
            );
            return reply_and_finish(w, &FetchReply::Error(err)).await;
        }
        Err(e) => return reply_and_finish(w, &FetchReply::Error(artifact_error(&e))).await,
    };
    let mut w = w;
    w.send(&FetchReply::Sending { size }).await?;
    // A fetcher that takes nothing for the idle timeout, or is not done by the total one, is cut.
    let mut send = Idle::with_total(w.into_inner(), limits.stream_idle_timeout, limits.stream_total_timeout);
    let mut file = tokio::io::AsyncReadExt::take(file, size);
    let sent = match tokio::io::copy(&mut file, &mut send).await {
        Ok(n) => n,
        Err(e) => {
            let _ = send.get_mut().reset(app_code(ErrorCode::Unexpected));
            return Err(StreamError::Send { digest: digest.clone(), err: e });
        }
    };
    let mut send = send.into_inner();
    if sent != size {
        // The agent checks size and digest anyway; a reset makes the failure plain.
        let _ = send.reset(0u32.into());
        return Err(StreamError::Shrank { digest: digest.clone(), sent, size });
    }
    let _ = send.finish();
    counter!(metrics::ARTIFACT_FETCHES).increment(1);
    debug!(%digest, size, "artifact sent");
    Ok(())
}

/// Relays a task's output from its agent (see [`relay_to_agent`]).
async fn relay_output(
    w: FrameWriter<SendStream>,
    r: FrameReader<RecvStream>,
    req: OutputRequest,
    who: Requester,
    core: mpsc::UnboundedSender<Command>,
    limits: &PeerLimits,
) -> Result<(), StreamError> {
    let task_id = req.task_id.clone();
    // Following output lasts as long as the task: only reads to the end now are bounded.
    let total = (!req.follow).then_some(limits.stream_total_timeout);
    let forward = |fw| StreamRequest::Output(OutputRequest { framework_id: Some(fw), ..req });
    let streams = |r: &OutputReply| matches!(r, OutputReply::Streaming);
    relay_to_agent(w, r, task_id, who, core, forward, OutputReply::Error, streams, limits, total).await
}

/// Relays one bulk request about a task to its agent: finds the task (`who` must be allowed to
/// see it), sends the request `forward` makes (the task's framework id filled in) on a new
/// stream to the agent, and passes the agent's reply frame back, then — when `streams` says the
/// reply announces bytes — the bytes after it. A relay the agent breaks resets the client's
/// stream (never a clean finish a client could take for the end of the data). A client that
/// takes no bytes for the idle timeout is cut, and so is a relay still going after `total`.
#[allow(clippy::too_many_arguments)]
async fn relay_to_agent<Rep: Serialize + serde::de::DeserializeOwned>(
    mut w: FrameWriter<SendStream>,
    r: FrameReader<RecvStream>,
    task_id: TaskId,
    who: Requester,
    core: mpsc::UnboundedSender<Command>,
    forward: impl FnOnce(FrameworkId) -> StreamRequest,
    error: fn(WireError) -> Rep,
    streams: fn(&Rep) -> bool,
    limits: &PeerLimits,
    total: Option<Duration>,
) -> Result<(), StreamError> {
    // The client sends nothing after its request; its side stays open as long as the relay.
    let _client_recv = r;
    let (tx, rx) = oneshot::channel();
    core.send(Command::Query(Query::Locate(who, task_id, tx))).map_err(|_| StreamError::Stopping)?;
    let (loc, agent) = match rx.await.map_err(|_| StreamError::Stopping)? {
        Ok(x) => x,
        Err(e) => {
            let _ = w.send(&error(e)).await;
            let _ = w.into_inner().finish();
            return Ok(());
        }
    };
    let (asend, arecv) = agent.open_bi().await?;
    let mut aw = FrameWriter::new(asend);
    aw.send(&forward(loc.framework_id)).await?;
    let mut ar = FrameReader::new(arecv);
    let reply = ar.recv::<Rep>().await?;
    let reply =
        reply.unwrap_or_else(|| error(WireError::new(ErrorCode::Internal, "agent closed the stream")));
    let streaming = streams(&reply);
    w.send(&reply).await?;
    let idle = limits.stream_idle_timeout;
    let mut client = match total {
        Some(total) => Idle::with_total(w.into_inner(), idle, total),
        None => Idle::new(w.into_inner(), idle),
    };
    if streaming {
        let (agent_recv, buffered) = ar.into_parts();
        // Without follow the agent's side is bounded too: an agent that stalls ends the relay.
        let mut agent_recv = match total {
            Some(total) => Idle::with_total(agent_recv, idle, total),
            None => Idle::new(agent_recv, Duration::MAX),
        };
        tokio::io::AsyncWriteExt::write_all(&mut client, &buffered).await?;
        // A client that goes away makes the write fail; then stop the agent's side too.
        if let Err(e) = tokio::io::copy(&mut agent_recv, &mut client).await {
            let _ = agent_recv.get_mut().stop(0u32.into());
            // Reset, not finish: a client must not take a broken relay (the agent gone) for
            // the end of the output; it resumes from its offset instead.
            let _ = client.get_mut().reset(app_code(ErrorCode::Internal));
            return Err(e.into());
        }
    }
    let _ = client.into_inner().finish();
    Ok(())
}
