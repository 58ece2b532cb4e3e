//! Connection admission: the accept loop, the handshake and the agent/framework peers (part of the server, split from `server.rs` by section).

use super::*;

/// Accepts connections until `shutdown`; `standby` (with `--etcd`) is what this master reads
/// for peers while it stands by. Peers whose certificate is in `revoked` are refused, leader
/// or standby alike.
pub(super) async fn accept_loop(
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

/// Answers every bulk stream of a stale session with a refusal in the reply type its request
/// expects.
pub(super) async fn refuse_streams(conn: quinn::Connection, leader: Option<String>) {
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

pub(super) fn app_code(code: ErrorCode) -> quinn::VarInt {
    quinn::VarInt::from_u32(code.close_code())
}

pub(super) fn frame_error(e: &FrameError) -> WireError {
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
pub(super) async fn refuse_hello(conn: quinn::Connection, err: WireError) {
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
pub(super) struct Access {
    pub(super) principal: String,
    /// The certificate's role.
    pub(super) cert_role: Role,
    pub(super) acls: Option<Arc<Acls>>,
    /// The bounds on its bulk streams (timeouts).
    pub(super) limits: PeerLimits,
}

impl Access {
    /// Does the session hold `right`? Without `--acls`, an operator certificate holds every
    /// right and a framework certificate none (it sees and acts on its own frameworks only).
    pub(super) fn may(&self, right: OperatorRight) -> bool {
        match &self.acls {
            Some(acls) => acls.has(&self.principal, right),
            None => self.cert_role == Role::Operator,
        }
    }

    pub(super) fn check(&self, right: OperatorRight) -> Result<(), WireError> {
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
    pub(super) fn upload(&self) -> Result<Option<u64>, WireError> {
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
    pub(super) fn reader(&self) -> Requester {
        if self.may(OperatorRight::ReadAny) {
            Requester::Operator
        } else {
            Requester::Principal(self.principal.clone())
        }
    }
}

/// Whether a session `hello` may be opened with a certificate of role `cert`: the same role,
/// or an operator session of a framework certificate (its principal's own frameworks only).
pub(super) fn session_allowed(hello: Role, cert: Role) -> bool {
    hello == cert || (hello == Role::Operator && cert == Role::Framework)
}

/// Why a connection's handshake failed. Its text is logged and is the connection's close
/// reason; a peer that was refused also had the [`WireError`] in a `Refused` reply.
#[derive(Debug, thiserror::Error)]
pub(super) enum HandshakeError {
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
pub(super) async fn handshake(
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

pub(super) async fn serve_connection(
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
pub(super) trait Peer: serde::de::DeserializeOwned + Send + 'static {
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
pub(super) async fn serve_peer<In, Out>(
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
