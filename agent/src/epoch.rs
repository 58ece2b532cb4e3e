//! The highest master epoch this agent has seen, kept in its work dir (`WORK/master_epoch`), so
//! that neither the agent nor a restarted agent ever follows a deposed leader.
//!
//! With several masters (`agora master --etcd`) each leader has an epoch, higher than every
//! earlier leader's; a master id is `{cluster}-{epoch}`. A master of the same cluster that
//! welcomes the agent with a lower epoch than one it already followed is a deposed leader (cut
//! off from etcd, still running): the agent drops that connection and tries again. A master of
//! another cluster name starts the count afresh.

use std::path::{Path, PathBuf};

/// The file, in the agent's work dir.
pub const EPOCH_FILE: &str = "master_epoch";

/// What a master's welcome means for this agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Follow it (its epoch is the highest seen, now recorded).
    Follow,
    /// A deposed leader.
    Stale {
        /// The master's epoch.
        epoch: u64,
        /// The higher epoch already followed.
        seen: u64,
    },
}

/// Why the epoch file cannot be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot record the master's epoch in {path}: {err}")]
pub struct EpochError {
    path: PathBuf,
    #[source]
    err: std::io::Error,
}

/// The highest epoch seen per cluster (only the latest cluster is kept).
#[derive(Debug)]
pub struct EpochGuard {
    path: PathBuf,
    cluster: String,
    epoch: u64,
}

/// Splits a master id `{cluster}-{epoch}`; `None` for an id of another shape.
pub fn split_master_id(id: &str) -> Option<(&str, u64)> {
    let (cluster, epoch) = id.rsplit_once('-')?;
    Some((cluster, epoch.parse().ok()?))
}

impl EpochGuard {
    /// Reads `work_dir/master_epoch`; a missing or unreadable file counts as nothing seen (the
    /// file is advisory: it only ever makes the agent more careful).
    pub fn load(work_dir: &Path) -> Self {
        let path = work_dir.join(EPOCH_FILE);
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let (cluster, epoch) = text
            .trim()
            .split_once(' ')
            .and_then(|(c, e)| Some((c.chars().take(128).collect::<String>(), e.parse::<u64>().ok()?)))
            .unwrap_or_default();
        EpochGuard { path, cluster, epoch }
    }

    /// The highest epoch seen of the latest cluster.
    pub fn highest(&self) -> (&str, u64) {
        (&self.cluster, self.epoch)
    }

    /// Judges a welcome from master `master_id`, recording a higher epoch (before the agent
    /// acts on anything that master says).
    pub fn welcome(&mut self, master_id: &str) -> Result<Verdict, EpochError> {
        let Some((cluster, epoch)) = split_master_id(master_id) else { return Ok(Verdict::Follow) };
        if cluster == self.cluster {
            if epoch < self.epoch {
                return Ok(Verdict::Stale { epoch, seen: self.epoch });
            }
            if epoch == self.epoch {
                return Ok(Verdict::Follow);
            }
        }
        let tmp = self.path.with_extension("tmp");
        let write = std::fs::write(&tmp, format!("{cluster} {epoch}\n"))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        write.map_err(|err| EpochError { path: self.path.clone(), err })?;
        self.cluster = cluster.to_string();
        self.epoch = epoch;
        Ok(Verdict::Follow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lower_epoch_of_the_same_cluster_is_refused_even_after_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut g = EpochGuard::load(dir.path());
        assert_eq!(g.welcome("prod-7").expect("welcome"), Verdict::Follow);
        assert_eq!(g.welcome("prod-7").expect("welcome"), Verdict::Follow);
        assert_eq!(g.welcome("prod-5").expect("welcome"), Verdict::Stale { epoch: 5, seen: 7 });
        let mut g = EpochGuard::load(dir.path());
        assert_eq!(g.highest(), ("prod", 7));
        assert_eq!(g.welcome("prod-6").expect("welcome"), Verdict::Stale { epoch: 6, seen: 7 });
        assert_eq!(g.welcome("prod-12").expect("welcome"), Verdict::Follow);
        // Another cluster (a fresh registry) starts the count again.
        assert_eq!(g.welcome("m1a2b3c-1").expect("welcome"), Verdict::Follow);
        assert_eq!(EpochGuard::load(dir.path()).highest(), ("m1a2b3c", 1));
    }

    #[test]
    fn a_damaged_file_or_odd_master_id_counts_as_nothing_seen() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(EPOCH_FILE), b"\xff\xfe garbage").expect("write");
        let mut g = EpochGuard::load(dir.path());
        assert_eq!(g.highest(), ("", 0));
        assert_eq!(g.welcome("no-epoch-here").expect("welcome"), Verdict::Follow);
        assert_eq!(g.welcome("t").expect("welcome"), Verdict::Follow);
    }
}
