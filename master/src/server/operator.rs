//! The operator (CLI) sessions and master-to-master peers (part of the server, split from `server.rs` by section).

use super::*;

pub(super) async fn serve_operator(
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
pub(super) fn denied() -> WireError {
    WireError::new(ErrorCode::Unauthorized, "denied")
}

/// Queues `m`; a list too large for one frame goes in several messages that each fit (in
/// order). A message that does not fit otherwise is an error, which drops the connection.
pub(super) async fn feed_split<P: Peer, W: tokio::io::AsyncWrite + Unpin>(
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
pub(super) async fn send_in_parts(
    writer: &mut FrameWriter<SendStream>,
    reply: OperatorReply,
) -> Result<(), FrameError> {
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
pub(super) async fn serve_master_peer(
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
