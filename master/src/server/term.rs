//! The high-availability term driver: standing by, campaigning, starting and evicting a term (part of the server, split from `server.rs` by section).

use super::*;

/// Keeps `leader` at the leader's address while this master stands by and knows it (`None`
/// while it leads or knows no leader), until `serving` goes.
pub(super) async fn standby_leader(
    mut serving: watch::Receiver<Serving>,
    leader: watch::Sender<Option<String>>,
) {
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
pub(super) async fn campaign(
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
pub(super) fn start_term(
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
pub(super) async fn evict_artifacts(
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
