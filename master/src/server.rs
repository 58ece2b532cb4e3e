//! The master's QUIC layer: accepts connections, checks certificates and the protocol handshake,
//! moves frames between peers and the sans-IO [`Master`] core, and relays task output streams.
//!
//! One task owns the core (`run_core`); every connection has a reader task that turns frames
//! into [`Event`]s and a writer task that drains that connection's outbox. Nothing is shared
//! behind locks: connection tasks talk to the core through `Command`s.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_sdk::frame::{FrameError, FrameReader, FrameWriter};
use agora_sdk::proto::*;
use agora_sdk::tls::{Identity, TlsError, TlsFiles};
use agora_sdk::transport::{peer_identity, server_config};
use quinn::{RecvStream, SendStream};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::allocator;
use crate::core::{Action, ConnId, Event, Master, MasterConfig, OutputLocation, Requester};

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
}

/// Settings of a master server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub tls: TlsFiles,
    pub core: MasterConfig,
    pub allocator: String,
}

/// Queries answered by the core task.
enum Query {
    Agents(oneshot::Sender<Vec<AgentView>>),
    Frameworks(oneshot::Sender<Vec<FrameworkView>>),
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
}

/// A running master. Dropping it does not stop it: cancel the token given to [`spawn`].
#[derive(Clone)]
pub struct MasterHandle {
    pub addr: SocketAddr,
    commands: mpsc::UnboundedSender<Command>,
}

impl MasterHandle {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Query) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Query(make(tx))).ok()?;
        rx.await.ok()
    }

    pub async fn agents(&self) -> Vec<AgentView> {
        self.ask(Query::Agents).await.unwrap_or_default()
    }

    pub async fn frameworks(&self) -> Vec<FrameworkView> {
        self.ask(Query::Frameworks).await.unwrap_or_default()
    }

    pub async fn tasks(&self) -> Vec<TaskView> {
        self.ask(Query::Tasks).await.unwrap_or_default()
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
    let endpoint = quinn::Endpoint::server(server_cfg, config.listen)
        .map_err(|err| ServerError::Bind { addr: config.listen, err })?;
    let addr = endpoint.local_addr().map_err(|err| ServerError::Bind { addr: config.listen, err })?;
    let (tx, rx) = mpsc::unbounded_channel();
    let mut core = Master::with_allocator(config.core.clone(), alloc, Instant::now());
    core.set_unix_time(Instant::now(), unix_millis());
    let master_id = config.core.master_id.clone();
    info!(%addr, allocator = %config.allocator, "master listening");
    tokio::spawn(run_core(core, rx, shutdown.clone()).in_current_span());
    tokio::spawn(accept_loop(endpoint, tx.clone(), master_id, shutdown).in_current_span());
    Ok(MasterHandle { addr, commands: tx })
}

async fn run_core(mut core: Master, mut rx: mpsc::UnboundedReceiver<Command>, shutdown: CancellationToken) {
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
                apply(&mut core, &mut conns, cmd);
                // Take whatever else is queued before flushing actions: batches under load.
                for _ in 0..1024 {
                    match rx.try_recv() {
                        Ok(cmd) => apply(&mut core, &mut conns, cmd),
                        Err(_) => break,
                    }
                }
            }
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
    conns: &mut HashMap<ConnId, (quinn::Connection, mpsc::UnboundedSender<Outgoing>)>,
    cmd: Command,
) {
    let now = Instant::now();
    match cmd {
        Command::Attach { conn, quic, outbox } => {
            conns.insert(conn, (quic, outbox));
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
    master_id: String,
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
        let master_id = master_id.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => serve_connection(conn_id, conn, core, master_id, shutdown).await,
                // Includes clients without a certificate signed by the cluster CA.
                Err(e) => info!(%remote, error = %e, "connection refused during handshake"),
            }
        });
    }
    endpoint.close(0u32.into(), b"master shutting down");
    endpoint.wait_idle().await;
}

fn app_code(code: ErrorCode) -> quinn::VarInt {
    quinn::VarInt::from_u32(match code {
        ErrorCode::VersionMismatch => 1,
        ErrorCode::Unauthorized => 2,
        ErrorCode::Malformed => 3,
        ErrorCode::TooLarge => 4,
        ErrorCode::Unexpected => 5,
        ErrorCode::NotFound => 6,
        ErrorCode::Invalid => 7,
        ErrorCode::Internal => 8,
    })
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
                .send(&HelloReply::Welcome { version: PROTOCOL_VERSION, master_id: master_id.to_string() })
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
    master_id: String,
    shutdown: CancellationToken,
) {
    let remote = conn.remote_address();
    let (identity, writer, reader) = match handshake(&conn, &master_id).await {
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
            Role::Operator => serve_operator(conn, writer, reader, core, shutdown).await,
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
    fn requester(conn: ConnId) -> Option<Requester>;
}

impl Peer for AgentMessage {
    type Out = MasterToAgent;
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
    fn requester(_: ConnId) -> Option<Requester> {
        None
    }
}

impl Peer for SchedulerCall {
    type Out = SchedulerEvent;
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
    fn requester(conn: ConnId) -> Option<Requester> {
        Some(Requester::Framework(conn))
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
                                if writer.feed(&m).await.is_err() {
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
    // Output streams opened by frameworks.
    if let Some(who) = In::requester(id) {
        tokio::spawn(accept_output_streams(conn.clone(), who, core.clone()).in_current_span());
    }
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
    shutdown: CancellationToken,
) {
    tokio::spawn(accept_output_streams(conn.clone(), Requester::Operator, core.clone()).in_current_span());
    let handle = MasterHandle { addr: conn.remote_address(), commands: core };
    loop {
        let call = tokio::select! {
            _ = shutdown.cancelled() => break,
            c = reader.recv::<OperatorCall>() => c,
        };
        let reply = match call {
            Ok(Some(OperatorCall::GetAgents)) => OperatorReply::Agents(handle.agents().await),
            Ok(Some(OperatorCall::GetFrameworks)) => OperatorReply::Frameworks(handle.frameworks().await),
            Ok(Some(OperatorCall::GetTasks)) => OperatorReply::Tasks(handle.tasks().await),
            Ok(Some(OperatorCall::KillTask { task_id })) => {
                match handle.ask(|tx| Query::Kill(task_id, tx)).await {
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
        if writer.send(&reply).await.is_err() {
            break;
        }
    }
    conn.close(0u32.into(), b"bye");
}

async fn accept_output_streams(
    conn: quinn::Connection,
    who: Requester,
    core: mpsc::UnboundedSender<Command>,
) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        let core = core.clone();
        let who = who.clone();
        tokio::spawn(
            async move {
                if let Err(e) = relay_output(send, recv, who, core).await {
                    debug!(error = %e, "output stream ended with an error");
                }
            }
            .in_current_span(),
        );
    }
}

/// Relays one output stream: client → master → agent, bytes back the same way.
async fn relay_output(
    send: SendStream,
    recv: RecvStream,
    who: Requester,
    core: mpsc::UnboundedSender<Command>,
) -> Result<(), String> {
    let mut w = FrameWriter::new(send);
    let mut r = FrameReader::new(recv);
    let req = match tokio::time::timeout(HANDSHAKE_TIMEOUT, r.recv::<StreamRequest>()).await {
        Ok(Ok(Some(StreamRequest::Output(req)))) => req,
        Ok(Ok(Some(_))) => {
            // Upload and Fetch streams are served by the artifact store (not wired yet).
            let err = WireError::new(ErrorCode::Unexpected, "this stream kind is not served here");
            let _ = w.send(&OutputReply::Error(err)).await;
            return Err("unsupported stream".into());
        }
        Ok(Err(e)) => {
            let _ = w.send(&OutputReply::Error(frame_error(&e))).await;
            return Err(e.to_string());
        }
        _ => return Err("no output request".into()),
    };
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
            return Err(e.to_string());
        }
    }
    let _ = client.finish();
    Ok(())
}
