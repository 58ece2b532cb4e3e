//! Task output for the web UI: the tail of a log when a page loads, then the bytes after an
//! offset at each poll. Both read through [`MasterHandle::task_output`] (the relay `agora logs`
//! uses) without `follow`, and both bound what they read: a page never waits on, nor holds,
//! more than a few chunks of a log however large it grew.

use std::time::Duration;

use agora_sdk::proto::{FrameworkId, OutputStream, TaskId, WireError};
use tokio::io::AsyncReadExt;

use crate::server::MasterHandle;

/// How much of each log the task page shows when it loads.
pub const TAIL: u64 = 16 << 10;
/// The most one poll returns of a log (the page asks again for the rest).
pub const CHUNK: u64 = 64 << 10;
/// How long one read of a log may take before the page gives up on it.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Ends the search for the end of a log (`2^40` bytes: beyond any sandbox).
const MAX_PROBES: u32 = 64;

/// Bytes of a log from `offset` to `next`.
#[derive(Debug, Default)]
pub struct Piece {
    /// Offset of the first byte of `text`.
    pub offset: u64,
    /// Where the next read starts (after the last whole UTF-8 character read).
    pub next: u64,
    /// The bytes, as text (invalid UTF-8 replaced).
    pub text: String,
}

fn timeout() -> WireError {
    WireError::new(agora_sdk::proto::ErrorCode::Internal, "the agent did not send the log in time")
}

/// Reads at most `max` bytes of `stream` from `offset` (fewer at the end of the file).
async fn read(
    master: &MasterHandle,
    task: &TaskId,
    framework: &FrameworkId,
    stream: OutputStream,
    offset: u64,
    max: u64,
) -> Result<Vec<u8>, WireError> {
    let out = master.task_output(task, stream, offset, false).await?;
    if out.framework_id != *framework {
        // `Locate` as an operator finds the first task with this id.
        return Err(WireError::new(
            agora_sdk::proto::ErrorCode::NotFound,
            "another framework's task has the same id; its log is not shown here",
        ));
    }
    let mut bytes = out.buffered.to_vec();
    bytes.truncate(max as usize);
    let rest = max - bytes.len() as u64;
    let mut recv = out.recv.take(rest);
    let read = tokio::time::timeout(READ_TIMEOUT, recv.read_to_end(&mut bytes)).await;
    // Dropping the stream stops the agent's side when `max` cut it short.
    match read {
        Ok(Ok(_)) => Ok(bytes),
        Ok(Err(e)) => Err(WireError::new(agora_sdk::proto::ErrorCode::Internal, format!("log stream: {e}"))),
        Err(_) => Err(timeout()),
    }
}

/// Turns bytes read at `offset` into a [`Piece`]; a character cut at the end is left for the
/// next read.
fn piece(offset: u64, mut bytes: Vec<u8>) -> Piece {
    if let Err(e) = std::str::from_utf8(&bytes) {
        if e.error_len().is_none() {
            bytes.truncate(e.valid_up_to());
        }
    }
    let next = offset + bytes.len() as u64;
    Piece { offset, next, text: String::from_utf8_lossy(&bytes).into_owned() }
}

/// The bytes of a log after `offset`, at most [`CHUNK`].
pub async fn after(
    master: &MasterHandle,
    task: &TaskId,
    framework: &FrameworkId,
    stream: OutputStream,
    offset: u64,
) -> Result<Piece, WireError> {
    Ok(piece(offset, read(master, task, framework, stream, offset, CHUNK).await?))
}

/// The last [`TAIL`] bytes of a log (roughly: a log growing meanwhile may show a little more).
/// The log's length is not part of the protocol, so it is found by asking for one byte at
/// offsets that double, then halving the gap down to a tail's length: a few dozen round trips
/// at most, however long the log.
pub async fn tail(
    master: &MasterHandle,
    task: &TaskId,
    framework: &FrameworkId,
    stream: OutputStream,
) -> Result<Piece, WireError> {
    let has_byte_at =
        |at: u64| async move { read(master, task, framework, stream, at, 1).await.map(|b| !b.is_empty()) };
    // `lo` has a byte (or is 0), `hi` has none.
    let (mut lo, mut hi) = (0u64, TAIL);
    let mut probes = 0;
    while has_byte_at(hi).await? {
        lo = hi;
        hi = hi.saturating_mul(2);
        probes += 1;
        if probes >= MAX_PROBES {
            break;
        }
    }
    while hi - lo > TAIL {
        let mid = lo + (hi - lo) / 2;
        if has_byte_at(mid).await? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    // The length is in (lo, hi] with hi - lo <= TAIL: reading from two tails before `hi`
    // covers the last tail.
    let from = hi.saturating_sub(2 * TAIL);
    let bytes = read(master, task, framework, stream, from, 2 * TAIL + CHUNK).await?;
    let keep = bytes.len().saturating_sub(TAIL as usize);
    let mut start = keep;
    // Start at a character boundary (UTF-8 continuation bytes are 0b10xxxxxx).
    while start < bytes.len() && start > 0 && bytes[start] & 0xC0 == 0x80 {
        start += 1;
    }
    let offset = from + start as u64;
    Ok(piece(offset, bytes[start..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_character_cut_at_the_end_waits_for_the_next_read() {
        let p = piece(10, "ab\u{e9}".as_bytes()[..3].to_vec());
        assert_eq!(p.text, "ab");
        assert_eq!(p.next, 12);
        let p = piece(0, b"a\xffb".to_vec());
        assert_eq!(p.text, "a\u{fffd}b");
        assert_eq!(p.next, 3);
    }
}
