//! The core's side of the artifact store: which digests tasks may name, which are in use
//! (and may not be evicted), and every principal's upload quota.

use super::*;

impl Master {
    /// Records that the artifact store holds `digest` (at startup and after each upload), so
    /// Wasm tasks naming it may launch.
    pub fn artifact_stored(&mut self, digest: Digest) {
        self.known_artifacts.insert(digest);
    }

    /// The digests live tasks (modules, directory archives, executor files) and launched
    /// executors refer to: the artifact store must keep them.
    pub fn artifacts_in_use(&self) -> FxHashSet<Digest> {
        let mut out = FxHashSet::default();
        let fetches =
            |info: &ExecutorInfo| info.fetch.iter().map(|f| f.artifact.digest.clone()).collect::<Vec<_>>();
        for t in self.tasks.values() {
            match &t.info.kind {
                TaskKind::Command(_) => {}
                TaskKind::Wasm(w) => {
                    out.insert(w.module.digest.clone());
                    out.extend(w.dirs.iter().map(|d| d.archive.digest.clone()));
                }
                TaskKind::Executor(e) => out.extend(fetches(&e.executor)),
            }
        }
        for r in self.executors.all() {
            out.extend(fetches(&r.info));
        }
        out
    }

    /// The artifact store may evict `digest` (its least recently used unreferenced artifact):
    /// `false` when a live task or executor refers to it after all (it stays), otherwise
    /// launches naming it are refused from now on until it is uploaded again.
    pub fn artifact_evicted(&mut self, digest: &Digest) -> bool {
        if self.artifacts_in_use().contains(digest) {
            return false;
        }
        self.known_artifacts.remove(digest);
        // Its bytes leave its uploader's quota usage.
        self.uploads.remove(digest);
        true
    }

    /// Counts an indexed artifact against its uploader's quota. The first uploader keeps it:
    /// `record.uploader` is set to the one already known, if any (a later upload of the same
    /// bytes is answered `Present` and costs nothing).
    pub fn artifact_uploaded(&mut self, record: &mut crate::registry::ArtifactRecord) {
        match self.uploads.get(&record.digest) {
            Some((who, _)) => record.uploader = Some(who.clone()),
            None => {
                if let Some(who) = &record.uploader {
                    self.uploads.insert(record.digest.clone(), (who.clone(), record.size));
                }
            }
        }
    }

    /// Forgets artifacts no longer in the store (their bytes leave their uploader's usage).
    pub fn artifacts_lost(&mut self, digests: &[Digest]) {
        for d in digests {
            self.uploads.remove(d);
        }
    }

    /// Bytes of the artifacts `principal` uploaded (first), with its uploads under way.
    pub fn upload_usage(&self, principal: &str) -> u64 {
        let stored: u64 = self.uploads.values().filter(|(who, _)| who == principal).map(|(_, s)| *s).sum();
        stored.saturating_add(self.uploads_pending.get(principal).copied().unwrap_or(0))
    }

    /// Reserves `size` bytes of `principal`'s upload `quota` for an upload about to be taken,
    /// or refuses it (see [`crate::acl::over_quota`]). Give it back with
    /// [`Master::release_upload`] once the upload is stored or failed.
    pub fn reserve_upload(&mut self, principal: &str, size: u64, quota: u64) -> Result<(), WireError> {
        let used = self.upload_usage(principal);
        if used.saturating_add(size) > quota {
            counter!(metrics::ACL_DENIALS).increment(1);
            return Err(crate::acl::over_quota(principal, size, used, quota));
        }
        *self.uploads_pending.entry(principal.to_string()).or_default() += size;
        Ok(())
    }

    /// Gives back a reservation of [`Master::reserve_upload`].
    pub fn release_upload(&mut self, principal: &str, size: u64) {
        if let Some(p) = self.uploads_pending.get_mut(principal) {
            *p = p.saturating_sub(size);
            if *p == 0 {
                self.uploads_pending.remove(principal);
            }
        }
    }
}
