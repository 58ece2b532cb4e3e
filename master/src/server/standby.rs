//! A standby master: refusals that name the leader and the stale reads it serves (part of the server, split from `server.rs` by section).

use super::*;

/// The master id a standby gives in the `Welcome` it sends another master (epoch 0: it leads
/// nothing).
pub(super) const STANDBY_MASTER_ID: &str = "standby";

/// Most records of one kind a standby lists on a stale session.
pub(super) const MAX_STALE_RECORDS: usize = 100_000;

/// What a standby reads without leading (`--etcd`): the cluster's masters and its registry in
/// etcd, for stale listings.
pub(super) struct StandbyReads {
    pub(super) members: ha::Members,
    /// This master's member id.
    pub(super) me: String,
}

/// Whom a standby serves rather than sending away.
pub(super) enum Guest {
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
pub(super) async fn not_leader(
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
pub(super) fn stale_refusal(what: &str, leader: &Option<String>) -> WireError {
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
pub(super) async fn serve_stale(
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
pub(super) fn stale_agent(a: &AgentRecord) -> Option<AgentView> {
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
pub(super) fn stale_framework(f: &FrameworkRecord) -> FrameworkView {
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
