//! Data streams: output, artifact upload and fetch, files (part of the server, split from `server.rs` by section).

use super::*;

/// Serves the bulk streams a peer opens, each in its own task: task output (frameworks and
/// operators, `who`), artifact uploads (frameworks and operators) and artifact fetches (agents
/// and other masters).
///
/// A framework or operator principal holds at most `--max-streams-per-principal` of them at
/// once (over all its connections); more are refused with an error in the reply type the
/// request expects.
pub(super) async fn accept_streams(
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
pub(super) async fn refuse_stream(send: SendStream, recv: RecvStream, err: WireError) {
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
pub(super) enum StreamError {
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
pub(super) async fn reply_and_finish<T: Serialize>(
    mut w: FrameWriter<SendStream>,
    reply: &T,
) -> Result<(), StreamError> {
    w.send(reply).await?;
    let _ = w.into_inner().finish();
    Ok(())
}

pub(super) fn not_allowed(role: Role, what: &str) -> WireError {
    WireError::new(ErrorCode::Unauthorized, format!("{role} connections may not {what}"))
}

/// Reads a bulk stream's [`StreamRequest`] and serves it if the peer's role may.
pub(super) async fn serve_stream(
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

pub(super) fn artifact_error(e: &ArtifactError) -> WireError {
    WireError::new(e.code(), e.to_string())
}

/// One upload: `Present` or `Send`, then the bytes into the store, then `Stored` or an error.
/// The core learns of the digest before the uploader hears of it, so a launch that follows
/// the reply finds it. With a `quota` (`--acls`), the declared size is reserved against the
/// principal's before any byte is taken, and refused past it.
pub(super) async fn serve_upload(
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
pub(super) async fn serve_fetch(
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
pub(super) async fn relay_output(
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
pub(super) async fn relay_to_agent<Rep: Serialize + serde::de::DeserializeOwned>(
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
