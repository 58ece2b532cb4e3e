//! The certificates this master refuses: the `revoked.txt` of its TLS directory (beside
//! `ca.pem`), which `agora tls revoke` writes. Read at start (a malformed list stops the
//! master) and read again whenever the file changes, without a restart: seen at the next
//! connection, and by a watcher every [`WATCH_INTERVAL`], which also closes the connections
//! already open with a newly revoked certificate. A list that turns malformed while the
//! master runs is ignored (the previous one stays in force) with a warning.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use agora_sdk::proto::ErrorCode;
use agora_sdk::tls::{self, TlsError, TlsFiles, REVOKED_FILE};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How often the watcher looks at the file (one `stat`).
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// What identifies one version of the file: modification time and length.
type Stamp = Option<(SystemTime, u64)>;

/// The revocation list of a master, reloaded when its file changes.
#[derive(Debug)]
pub struct Revocations {
    path: PathBuf,
    state: Mutex<(Stamp, HashMap<String, String>)>,
    /// Bumped at every reload that changed the list.
    generation: watch::Sender<u64>,
}

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

impl Revocations {
    /// The list beside `files.ca`; a missing file revokes nothing.
    pub fn for_tls(files: &TlsFiles) -> Result<Self, TlsError> {
        let path = files.ca.with_file_name(REVOKED_FILE);
        Self::open(&path)
    }

    /// The list at `path`; a missing file revokes nothing.
    pub fn open(path: &Path) -> Result<Self, TlsError> {
        let before = stamp(path);
        let serials = tls::load_revoked(path)?;
        if !serials.is_empty() {
            info!(path = %path.display(), revoked = serials.len(), "revocation list loaded");
        }
        let (generation, _) = watch::channel(0);
        Ok(Revocations { path: path.to_path_buf(), state: Mutex::new((before, serials)), generation })
    }

    /// How many serials are revoked now.
    pub fn len(&self) -> usize {
        self.reload_if_changed();
        self.state.lock().map_or(0, |s| s.1.len())
    }

    /// Whether no serial is revoked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rereads the file if its stamp changed since the last read.
    fn reload_if_changed(&self) {
        let now = stamp(&self.path);
        let Ok(mut state) = self.state.lock() else { return };
        if state.0 == now {
            return;
        }
        match tls::load_revoked(&self.path) {
            Ok(serials) => {
                info!(path = %self.path.display(), revoked = serials.len(), "revocation list reloaded");
                *state = (now, serials);
                self.generation.send_modify(|g| *g += 1);
            }
            Err(e) => {
                // Keep what was in force; try again when the file changes once more.
                warn!(error = %e, "revocation list not reloaded; the previous one stays in force");
                state.0 = now;
            }
        }
    }

    /// If the DER certificate `der` is revoked, its serial and what the list says of it.
    pub fn check(&self, der: &[u8]) -> Option<(String, String)> {
        self.reload_if_changed();
        let serial = tls::serial_of(der).ok()?;
        let state = self.state.lock().ok()?;
        state.1.get(&serial).map(|note| (serial, note.clone()))
    }

    /// Rereads the file every [`WATCH_INTERVAL`] until `shutdown`, so that [`Self::guard`]s
    /// learn of new revocations even when nobody connects.
    pub async fn watch(self: std::sync::Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => self.reload_if_changed(),
            }
        }
    }

    /// Closes `conn` once its certificate is revoked (checked at every change of the list);
    /// returns when the connection closes.
    pub async fn guard(self: std::sync::Arc<Self>, conn: quinn::Connection) {
        let mut changes = self.generation.subscribe();
        loop {
            tokio::select! {
                _ = conn.closed() => return,
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if let Some(why) = self.refusal(&conn) {
                        info!(remote = %conn.remote_address(), reason = %why, "connection closed");
                        conn.close(quinn::VarInt::from_u32(ErrorCode::Unauthorized.close_code()), why.as_bytes());
                        return;
                    }
                }
            }
        }
    }

    /// If the client certificate of `conn` is revoked, the reason to refuse it.
    pub fn refusal(&self, conn: &quinn::Connection) -> Option<String> {
        let leaf = agora_sdk::transport::peer_certificate(conn).ok()?;
        let (serial, note) = self.check(&leaf)?;
        let who = tls::identity_of(&leaf)
            .map(|id| format!("`{}` ({})", id.principal, id.role))
            .unwrap_or_else(|_| "this certificate".into());
        let note = note.split_whitespace().next().map(|n| format!(", revoked as `{n}`")).unwrap_or_default();
        Some(format!("certificate of {who} is revoked (serial {serial}{note})"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agora_sdk::proto::Role;

    #[test]
    fn reloads_when_the_file_changes_and_keeps_the_old_list_when_malformed() {
        let dir = tempfile::tempdir().expect("tempdir");
        tls::init(dir.path(), "fw", false).expect("init");
        tls::issue(dir.path(), Role::Framework, "bob", "bob").expect("issue");
        let der = tls::load_certs(&dir.path().join("bob.pem")).expect("cert").swap_remove(0);
        let list = Revocations::for_tls(&TlsFiles::in_dir(dir.path(), "master")).expect("open");
        assert!(list.check(&der).is_none());
        tls::revoke(dir.path(), "bob").expect("revoke");
        let (serial, note) = list.check(&der).expect("revoked after reload");
        assert_eq!(serial, tls::serial_of(&der).expect("serial"));
        assert!(note.starts_with("bob "), "{note}");
        // A broken list (longer, so its stamp differs) leaves bob revoked.
        let path = dir.path().join(REVOKED_FILE);
        let mut text = std::fs::read_to_string(&path).expect("read");
        text.push_str("not-hex x\n");
        std::fs::write(&path, text).expect("write");
        assert!(list.check(&der).is_some());
        // A malformed list at start is an error naming the line.
        let e = Revocations::open(&path).expect_err("malformed");
        assert!(e.to_string().contains("line 4"), "{e}");
    }
}
