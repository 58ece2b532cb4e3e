//! The master's QUIC layer: accepts connections, checks certificates and the protocol handshake,
//! moves frames between peers and the sans-IO [`Master`] core, relays task output streams and
//! serves artifact uploads and fetches from the [`ArtifactStore`].
//!
//! One task owns the core (`run_core`); every connection has a reader task that turns frames
//! into [`Event`]s and a writer task that drains that connection's outbox. Nothing is shared
//! behind locks: connection tasks talk to the core through `Command`s.

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

use crate::allocator;
use crate::artifacts::{ArtifactError, ArtifactStore};
use crate::core::{Action, ConnId, Event, Master, MasterConfig, OutputLocation, Requester};
use crate::metrics;
use crate::registry::{ArtifactRecord, RedbRegistry, Registry, RegistryError, RegistryOp, REGISTRY_FILE};

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
}

/// Queries answered by the core task.
enum Query {
    Agents(oneshot::Sender<Vec<AgentView>>),
    Frameworks(oneshot::Sender<Vec<FrameworkView>>),
    CompletedFrameworks(oneshot::Sender<Vec<FrameworkView>>),
    Tasks(oneshot::Sender<Vec<TaskView>>),
    Kill(TaskId, oneshot::Sender<Result<(), WireError>>),
    Locate(Requester, TaskId, oneshot::Sender<Result<(OutputLocation, quinn::Connection), WireError>>),
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
    Attach { conn: ConnId, quic: quinn::Connection, outbox: mpsc::UnboundedSender<Outgoing> },
    Event(Event),
    Query(Query),
    ArtifactStored(ArtifactRecord),
}

/// A running master. Dropping it does not stop it: cancel the token given to [`spawn`].
#[derive(Clone)]
pub struct MasterHandle {
    pub addr: SocketAddr,
    /// This incarnation's master id (`{cluster}-{epoch}` from the registry).
    pub master_id: String,
    core: CoreClient,
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

impl MasterHandle {
    /// Waits until the master stops by itself because its registry cannot be written (it can
    /// no longer keep its promises to peers); returns why. Pending forever otherwise.
    pub async fn failed(&self) -> String {
        let mut rx = self.fatal.clone();
        loop {
            if let Some(why) = rx.borrow_and_update().clone() {
                return why;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    pub async fn agents(&self) -> Vec<AgentView> {
        self.core.ask(Query::Agents).await.unwrap_or_default()
    }

    pub async fn frameworks(&self) -> Vec<FrameworkView> {
        self.core.ask(Query::Frameworks).await.unwrap_or_default()
    }

    pub async fn tasks(&self) -> Vec<TaskView> {
        self.core.ask(Query::Tasks).await.unwrap_or_default()
    }
}

/// Binds the QUIC endpoint and starts the master with a built-in allocator. Runs until
/// `shutdown` is cancelled.
pub fn spawn(config: ServerConfig, shutdown: CancellationToken) -> Result<MasterHandle, ServerError> {
    spawn_with_registry(config, &allocator::Registry::builtin(), shutdown)
}

/// Like [`spawn`], choosing `config.allocator` from `registry` (built-ins plus the
/// allocators an embedder registered).
pub fn spawn_with_registry(
    config: ServerConfig,
    registry: &allocator::Registry,
    shutdown: CancellationToken,
) -> Result<MasterHandle, ServerError> {
    let alloc = registry.create(&config.allocator, &config.core.allocation)?;
    let server_cfg = server_config(&config.tls)?;
    let mut reg = RedbRegistry::open(&config.work_dir.join(REGISTRY_FILE))?;
    let state = reg.open_epoch()?;
    let mut core_cfg = config.core.clone();
    core_cfg.master_id = state.master_id();
    let endpoint = quinn::Endpoint::server(server_cfg, config.listen)
        .map_err(|err| ServerError::Bind { addr: config.listen, err })?;
    let addr = endpoint.local_addr().map_err(|err| ServerError::Bind { addr: config.listen, err })?;
    let store = ArtifactStore::open(&config.work_dir.join("artifacts"), config.max_artifact_size)?;
    let (tx, rx) = mpsc::unbounded_channel();
    let now = Instant::now();
    let mut core = Master::with_allocator(core_cfg, alloc, now);
    core.set_unix_time(now, unix_millis());
    core.recover(now, &state);
    // The artifact index: the registry's records checked against the files (a file is
    // published before its record is written, so a crash in between leaves a file without a
    // record, adopted here; a record whose file is missing or of another size is dropped).
    let files: HashMap<Digest, u64> = store.list()?.into_iter().map(|a| (a.digest, a.size)).collect();
    let mut fixes = Vec::new();
    for (digest, record) in &state.artifacts {
        if files.get(digest) != Some(&record.size) {
            warn!(%digest, size = record.size, "artifact in the registry has no file of its size: dropping it from the index");
            fixes.push(RegistryOp::RemoveArtifact(digest.clone()));
        }
    }
    for (digest, size) in &files {
        if state.artifacts.get(digest).is_none_or(|r| r.size != *size) {
            fixes.push(RegistryOp::PutArtifact(ArtifactRecord {
                digest: digest.clone(),
                kind: None,
                size: *size,
            }));
        }
        core.artifact_stored(digest.clone());
    }
    reg.apply(&fixes)?;
    info!(dir = %store.root().display(), artifacts = store.len(), "artifact store open");
    info!(registry = %reg.location(), epoch = state.epoch, frameworks = state.frameworks.len(),
        agents = state.agents.len(), "registry open");
    let master_id = state.master_id();
    info!(%addr, %master_id, allocator = %config.allocator, "master listening");
    let (fatal_tx, fatal) = watch::channel(None);
    tokio::spawn(run_core(core, Box::new(reg), rx, fatal_tx, shutdown.clone()).in_current_span());
    let store = Arc::new(store);
    let me = Arc::new(MasterView {
        id: master_id.clone(),
        address: addr.to_string(),
        leader: true,
        epoch: state.epoch,
    });
    tokio::spawn(accept_loop(endpoint, tx.clone(), me, store, shutdown).in_current_span());
    Ok(MasterHandle { addr, master_id, core: CoreClient(tx), fatal })
}

/// Writes the core's pending registry changes (in order, one transaction). On failure the
/// master stops: the actions of this step (replies promising what was not recorded) are
/// dropped with it.
fn persist(core: &mut Master, reg: &mut dyn Registry) -> Result<(), RegistryError> {
    let ops: Vec<RegistryOp> = std::iter::from_fn(|| core.poll_registry_op()).collect();
    reg.apply(&ops)
}

async fn run_core(
    mut core: Master,
    mut reg: Box<dyn Registry>,
    mut rx: mpsc::UnboundedReceiver<Command>,
    fatal: watch::Sender<Option<String>>,
    shutdown: CancellationToken,
) {
    let mut conns: HashMap<ConnId, (quinn::Connection, mpsc::UnboundedSender<Outgoing>)> = HashMap::new();
    loop {
        let deadline = core.poll_timeout();
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = sleep => core.handle_timeout(Instant::now()),
            cmd = rx.recv() => {
                let Some(cmd) = cmd else { break };
                apply(&mut core, reg.as_mut(), &mut conns, cmd);
                // Take whatever else is queued before flushing actions: batches under load.
                for _ in 0..1024 {
                    match rx.try_recv() {
                        Ok(cmd) => apply(&mut core, reg.as_mut(), &mut conns, cmd),
                        Err(_) => break,
                    }
                }
            }
        }
        if let Err(e) = persist(&mut core, reg.as_mut()) {
            tracing::error!(error = %e, "the registry cannot be written: the master stops");
            let _ = fatal.send(Some(e.to_string()));
            shutdown.cancel();
            break;
        }
        while let Some(action) = core.poll_action() {
            let (conn, out) = match action {
                Action::ToAgent { conn, msg } => (conn, Outgoing::Agent(msg)),
                Action::ToFramework { conn, event } => (conn, Outgoing::Framework(event)),
                Action::Close { conn, error } => (conn, Outgoing::Close(error)),
            };
            if let Some((_, outbox)) = conns.get(&conn) {
                let _ = outbox.send(out);
            }
        }
    }
    for (_, (quic, _)) in conns {
        quic.close(0u32.into(), b"master shutting down");
    }
}

fn apply(
    core: &mut Master,
    reg: &mut dyn Registry,
    conns: &mut HashMap<ConnId, (quinn::Connection, mpsc::UnboundedSender<Outgoing>)>,
    cmd: Command,
) {
    let now = Instant::now();
    match cmd {
        Command::Attach { conn, quic, outbox } => {
            conns.insert(conn, (quic, outbox));
        }
        Command::ArtifactStored(record) => {
            // Indexed now; a failure here leaves the file, adopted at the next start.
            if let Err(e) = reg.apply(&[RegistryOp::PutArtifact(record.clone())]) {
                warn!(digest = %record.digest, error = %e, "cannot index an artifact in the registry");
            }
            core.artifact_stored(record.digest);
        }
        Command::Event(ev) => {
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
            Query::Kill(id, tx) => {
                let _ = tx.send(core.kill_task(now, &id));
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

async fn accept_loop(
    endpoint: quinn::Endpoint,
    core: mpsc::UnboundedSender<Command>,
    me: Arc<MasterView>,
    store: Arc<ArtifactStore>,
    shutdown: CancellationToken,
) {
    let next_id = Arc::new(AtomicU64::new(1));
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            i = endpoint.accept() => match i { Some(i) => i, None => break },
        };
        let conn_id = next_id.fetch_add(1, Ordering::Relaxed);
        let core = core.clone();
        let me = me.clone();
        let store = store.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => serve_connection(conn_id, conn, core, me, store, shutdown).await,
                // Includes clients without a certificate signed by the cluster CA.
                Err(e) => info!(%remote, error = %e, "connection refused during handshake"),
            }
        });
    }
    endpoint.close(0u32.into(), b"master shutting down");
    endpoint.wait_idle().await;
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

async fn handshake(
    conn: &quinn::Connection,
    master_id: &str,
    epoch: u64,
) -> Result<(Identity, FrameWriter<SendStream>, FrameReader<RecvStream>), String> {
    let identity = peer_identity(conn).map_err(|e| e.to_string())?;
    let (send, recv) = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| "no control stream opened in time".to_string())?
        .map_err(|e| e.to_string())?;
    let mut writer = FrameWriter::new(send);
    let mut reader = FrameReader::new(recv);
    let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.recv::<Hello>())
        .await
        .map_err(|_| "no hello in time".to_string())?;
    let refuse = |e: WireError| e;
    let verdict = match hello {
        Ok(Some(h)) if h.version != PROTOCOL_VERSION => Err(refuse(WireError::new(
            ErrorCode::VersionMismatch,
            format!(
                "protocol version {} is not supported (this master speaks {PROTOCOL_VERSION})",
                h.version
            ),
        ))),
        Ok(Some(h)) if h.role != identity.role => Err(WireError::new(
            ErrorCode::Unauthorized,
            format!("certificate of `{}` is for role {}, not {}", identity.principal, identity.role, h.role),
        )),
        Ok(Some(h)) if h.role == Role::Master => {
            Err(WireError::new(ErrorCode::Unauthorized, "masters do not connect to masters"))
        }
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(WireError::new(ErrorCode::Unexpected, "stream closed before hello")),
        Err(e) => Err(frame_error(&e)),
    };
    match verdict {
        Ok(()) => {
            writer
                .send(&HelloReply::Welcome {
                    version: PROTOCOL_VERSION,
                    master_id: master_id.to_string(),
                    epoch,
                })
                .await
                .map_err(|e| e.to_string())?;
            Ok((identity, writer, reader))
        }
        Err(err) => {
            let _ = writer.send(&HelloReply::Refused(err.clone())).await;
            let mut s = writer.into_inner();
            let _ = s.finish();
            let _ = tokio::time::timeout(Duration::from_millis(200), s.stopped()).await;
            conn.close(app_code(err.code), err.message.as_bytes());
            Err(err.message)
        }
    }
}

async fn serve_connection(
    id: ConnId,
    conn: quinn::Connection,
    core: mpsc::UnboundedSender<Command>,
    me: Arc<MasterView>,
    store: Arc<ArtifactStore>,
    shutdown: CancellationToken,
) {
    let remote = conn.remote_address();
    let (identity, writer, reader) = match handshake(&conn, &me.id, me.epoch).await {
        Ok(x) => x,
        Err(why) => {
            info!(%remote, conn = id, reason = %why, "connection refused");
            conn.close(app_code(ErrorCode::Unauthorized), why.as_bytes());
            return;
        }
    };
    let span = tracing::info_span!("conn", conn = id, role = %identity.role, principal = %identity.principal);
    async move {
        debug!(%remote, "connected");
        // Bulk streams: task output and uploads from frameworks and operators, fetches from agents.
        let who = match identity.role {
            Role::Framework => Some(Requester::Framework(id)),
            Role::Operator => Some(Requester::Operator),
            Role::Agent | Role::Master => None,
        };
        tokio::spawn(accept_streams(conn.clone(), identity.role, who, core.clone(), store).in_current_span());
        match identity.role {
            Role::Agent => {
                serve_peer::<AgentMessage, MasterToAgent>(id, conn, identity, writer, reader, core, shutdown)
                    .await
            }
            Role::Framework => {
                serve_peer::<SchedulerCall, SchedulerEvent>(
                    id, conn, identity, writer, reader, core, shutdown,
                )
                .await
            }
            Role::Operator => serve_operator(conn, writer, reader, core, &me, shutdown).await,
            Role::Master => {}
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

async fn serve_peer<In, Out>(
    id: ConnId,
    conn: quinn::Connection,
    identity: Identity,
    mut writer: FrameWriter<SendStream>,
    mut reader: FrameReader<RecvStream>,
    core: mpsc::UnboundedSender<Command>,
    shutdown: CancellationToken,
) where
    In: Peer<Out = Out>,
    Out: Serialize + Send + Sync + 'static,
{
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Outgoing>();
    if core.send(Command::Attach { conn: id, quic: conn.clone(), outbox: out_tx.clone() }).is_err() {
        return;
    }
    // Writer: drains the outbox, batching frames into one flush.
    let wconn = conn.clone();
    let writer_task = tokio::spawn(
        async move {
            while let Some(first) = out_rx.recv().await {
                let mut next = Some(first);
                let mut n = 0;
                while let Some(o) = next.take() {
                    match o {
                        Outgoing::Close(err) => {
                            let _ = writer.send(&In::error(err.clone())).await;
                            let mut s = writer.into_inner();
                            let _ = s.finish();
                            let _ = tokio::time::timeout(Duration::from_millis(200), s.stopped()).await;
                            wconn.close(app_code(err.code), err.message.as_bytes());
                            return;
                        }
                        other => {
                            if let Some(m) = In::unwrap_out(other) {
                                if feed_split::<In>(&mut writer, m).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    n += 1;
                    if n < 256 {
                        next = out_rx.try_recv().ok();
                    }
                }
                if writer.flush().await.is_err() {
                    return;
                }
            }
        }
        .in_current_span(),
    );
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = reader.recv::<In>() => m,
        };
        match msg {
            Ok(Some(m)) => {
                if core.send(Command::Event(In::event(id, &identity.principal, m))).is_err() {
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
                let _ = out_tx.send(Outgoing::Close(err));
                break;
            }
        }
    }
    let _ = core.send(Command::Event(In::disconnected(id)));
    drop(out_tx);
    let _ = tokio::time::timeout(Duration::from_secs(1), writer_task).await;
    conn.close(0u32.into(), b"bye");
}

async fn serve_operator(
    conn: quinn::Connection,
    mut writer: FrameWriter<SendStream>,
    mut reader: FrameReader<RecvStream>,
    core: mpsc::UnboundedSender<Command>,
    me: &MasterView,
    shutdown: CancellationToken,
) {
    let core = CoreClient(core);
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
                OperatorReply::Frameworks(core.ask(Query::Frameworks).await.unwrap_or_default())
            }
            Ok(Some(OperatorCall::GetCompletedFrameworks)) => {
                OperatorReply::Frameworks(core.ask(Query::CompletedFrameworks).await.unwrap_or_default())
            }
            // One master: itself, the leader.
            Ok(Some(OperatorCall::GetMasters)) => OperatorReply::Masters(vec![me.clone()]),
            Ok(Some(OperatorCall::GetTasks)) => {
                OperatorReply::Tasks(core.ask(Query::Tasks).await.unwrap_or_default())
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

/// Queues `m`; a list too large for one frame goes in several messages that each fit (in
/// order). A message that does not fit otherwise is an error, which drops the connection.
async fn feed_split<P: Peer>(writer: &mut FrameWriter<SendStream>, m: P::Out) -> Result<(), FrameError> {
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

/// Serves the bulk streams a peer opens, each in its own task: task output (frameworks and
/// operators, `who`), artifact uploads (frameworks and operators) and artifact fetches (agents).
async fn accept_streams(
    conn: quinn::Connection,
    role: Role,
    who: Option<Requester>,
    core: mpsc::UnboundedSender<Command>,
    store: Arc<ArtifactStore>,
) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        let core = core.clone();
        let who = who.clone();
        let store = store.clone();
        tokio::spawn(
            async move {
                if let Err(e) = serve_stream(send, recv, role, who, core, store).await {
                    debug!(error = %e, "bulk stream ended with an error");
                }
            }
            .in_current_span(),
        );
    }
}

/// Sends one reply frame and finishes the stream.
async fn reply_and_finish<T: Serialize>(mut w: FrameWriter<SendStream>, reply: &T) -> Result<(), String> {
    w.send(reply).await.map_err(|e| e.to_string())?;
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
) -> Result<(), String> {
    let w = FrameWriter::new(send);
    let mut r = FrameReader::new(recv);
    let req = match tokio::time::timeout(HANDSHAKE_TIMEOUT, r.recv::<StreamRequest>()).await {
        Ok(Ok(Some(req))) => req,
        Ok(Err(e)) => {
            reply_and_finish(w, &OutputReply::Error(frame_error(&e))).await?;
            return Err(e.to_string());
        }
        _ => return Err("no stream request".into()),
    };
    match req {
        StreamRequest::Output(req) => match who {
            Some(who) => relay_output(w, r, req, who, core).await,
            None => reply_and_finish(w, &OutputReply::Error(not_allowed(role, "read task output"))).await,
        },
        StreamRequest::Upload(req) if matches!(role, Role::Framework | Role::Operator) => {
            serve_upload(w, r, req, core, &store).await
        }
        StreamRequest::Upload(_) => {
            reply_and_finish(w, &UploadReply::Error(not_allowed(role, "upload artifacts"))).await
        }
        StreamRequest::Fetch { digest } if role == Role::Agent => serve_fetch(w, &digest, &store).await,
        StreamRequest::Fetch { .. } => {
            reply_and_finish(w, &FetchReply::Error(not_allowed(role, "fetch artifacts"))).await
        }
    }
}

fn artifact_error(e: &ArtifactError) -> WireError {
    WireError::new(e.code(), e.to_string())
}

/// One upload: `Present` or `Send`, then the bytes into the store, then `Stored` or an error.
/// The core learns of the digest before the uploader hears of it, so a launch that follows
/// the reply finds it.
async fn serve_upload(
    mut w: FrameWriter<SendStream>,
    r: FrameReader<RecvStream>,
    req: UploadRequest,
    core: mpsc::UnboundedSender<Command>,
    store: &ArtifactStore,
) -> Result<(), String> {
    let present = match store.check(&req) {
        Ok(()) => store.check_present(&req).await,
        Err(e) => Err(e),
    };
    match present {
        Ok(true) => {
            counter!(metrics::ARTIFACT_UPLOADS, "outcome" => "present").increment(1);
            let record = ArtifactRecord { digest: req.digest.clone(), kind: Some(req.kind), size: req.size };
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
    w.send(&UploadReply::Send).await.map_err(|e| e.to_string())?;
    let (recv, buffered) = r.into_parts();
    let body = tokio::io::AsyncReadExt::chain(std::io::Cursor::new(buffered.freeze()), recv);
    let reply = match store.store(&req, body).await {
        Ok(artifact) => {
            info!(digest = %artifact.digest, size = artifact.size, name = %req.name, "artifact stored");
            let record =
                ArtifactRecord { digest: artifact.digest, kind: Some(req.kind), size: artifact.size };
            let _ = core.send(Command::ArtifactStored(record));
            UploadReply::Stored
        }
        Err(e) => {
            info!(name = %req.name, error = %e, "artifact refused");
            UploadReply::Error(artifact_error(&e))
        }
    };
    reply_and_finish(w, &reply).await
}

/// One fetch: `Sending { size }` then exactly `size` bytes, or an error.
async fn serve_fetch(
    w: FrameWriter<SendStream>,
    digest: &Digest,
    store: &ArtifactStore,
) -> Result<(), String> {
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
    w.send(&FetchReply::Sending { size }).await.map_err(|e| e.to_string())?;
    let mut send = w.into_inner();
    let mut file = tokio::io::AsyncReadExt::take(file, size);
    let sent = tokio::io::copy(&mut file, &mut send).await.map_err(|e| e.to_string())?;
    if sent != size {
        // The agent checks size and digest anyway; a reset makes the failure plain.
        let _ = send.reset(0u32.into());
        return Err(format!("artifact {digest} shrank to {sent} of {size} bytes while being sent"));
    }
    let _ = send.finish();
    counter!(metrics::ARTIFACT_FETCHES).increment(1);
    debug!(%digest, size, "artifact sent");
    Ok(())
}

/// Relays one output stream: client → master → agent, bytes back the same way.
async fn relay_output(
    mut w: FrameWriter<SendStream>,
    r: FrameReader<RecvStream>,
    req: OutputRequest,
    who: Requester,
    core: mpsc::UnboundedSender<Command>,
) -> Result<(), String> {
    // The client sends nothing after its request; its side stays open as long as the relay.
    let _client_recv = r;
    let (tx, rx) = oneshot::channel();
    core.send(Command::Query(Query::Locate(who, req.task_id.clone(), tx))).map_err(|_| "master stopping")?;
    let (loc, agent) = match rx.await.map_err(|_| "master stopping")? {
        Ok(x) => x,
        Err(e) => {
            let _ = w.send(&OutputReply::Error(e)).await;
            let _ = w.into_inner().finish();
            return Ok(());
        }
    };
    let (asend, arecv) = agent.open_bi().await.map_err(|e| e.to_string())?;
    let mut aw = FrameWriter::new(asend);
    aw.send(&StreamRequest::Output(OutputRequest { framework_id: Some(loc.framework_id), ..req }))
        .await
        .map_err(|e| e.to_string())?;
    let mut ar = FrameReader::new(arecv);
    let reply = ar.recv::<OutputReply>().await.map_err(|e| e.to_string())?;
    let reply = reply.unwrap_or_else(|| {
        OutputReply::Error(WireError::new(ErrorCode::Internal, "agent closed the stream"))
    });
    let streaming = matches!(reply, OutputReply::Streaming);
    w.send(&reply).await.map_err(|e| e.to_string())?;
    let mut client = w.into_inner();
    if streaming {
        let (mut agent_recv, buffered) = ar.into_parts();
        client.write_all(&buffered).await.map_err(|e| e.to_string())?;
        // A client that goes away makes the write fail; then stop the agent's side too.
        if let Err(e) = tokio::io::copy(&mut agent_recv, &mut client).await {
            let _ = agent_recv.stop(0u32.into());
            // Reset, not finish: a client must not take a broken relay (the agent gone) for
            // the end of the output; it resumes from its offset instead.
            let _ = client.reset(app_code(ErrorCode::Internal));
            return Err(e.to_string());
        }
    }
    let _ = client.finish();
    Ok(())
}
