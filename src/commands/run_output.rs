//! `agora run`'s output: the relay of a task's stdout/stderr to the run's own (following the
//! master across reconnections) and `--sync-back`, which copies a task's directories back
//! when it ends. Split from `run.rs` by section.

use std::time::Duration;

use agora_sdk::proto::*;
use agora_sdk::scheduler::Driver;

/// How often an output stream that the master refuses (its agent not back yet after a master
/// restart) is asked for again, and how many times.
const OUTPUT_RETRY: Duration = Duration::from_millis(500);
const OUTPUT_RETRIES: u32 = 60;

/// Most files and bytes `--sync-back` copies (a task may write far more than anyone wants).
const SYNC_MAX_FILES: u64 = 10_000;
const SYNC_MAX_BYTES: u64 = 4 << 30;
/// Deepest directory `--sync-back` descends into.
const SYNC_MAX_DEPTH: usize = 32;

/// Copies directory `remote` of `task`'s sandbox into `local`: directories made, files
/// written (replacing what is there), links and special files skipped; bounded in files,
/// bytes and depth. Each file goes to a temporary name first and is renamed once whole.
/// Returns the files and bytes copied.
pub(super) async fn sync_back(
    driver: &Driver,
    task: &TaskId,
    remote: &str,
    local: &std::path::Path,
) -> Result<(u64, u64), String> {
    let conn = driver.connection().ok_or("the run is no longer connected to the master")?;
    let conn = &conn;
    let (mut files, mut bytes) = (0u64, 0u64);
    let mut todo = vec![(remote.to_string(), local.to_path_buf(), 0usize)];
    while let Some((dir, into, depth)) = todo.pop() {
        tokio::fs::create_dir_all(&into)
            .await
            .map_err(|e| format!("cannot create {}: {e}", into.display()))?;
        let (entries, truncated) =
            agora_sdk::client::list_sandbox(conn, task, &dir).await.map_err(|e| e.to_string())?;
        if truncated {
            eprintln!(
                "agora: --sync-back: {dir} has more entries than one listing holds; the rest is not copied"
            );
        }
        for e in entries {
            if e.name.is_empty() || e.name == "." || e.name == ".." || e.name.contains('/') {
                continue;
            }
            let (path, dest) = (format!("{dir}/{}", e.name), into.join(&e.name));
            match e.kind {
                FileKind::Dir if depth < SYNC_MAX_DEPTH => todo.push((path, dest, depth + 1)),
                FileKind::File => {
                    if files >= SYNC_MAX_FILES || bytes.saturating_add(e.size) > SYNC_MAX_BYTES {
                        return Err(format!(
                            "stopped at {SYNC_MAX_FILES} files or {} GiB; {files} file(s) copied",
                            SYNC_MAX_BYTES >> 30
                        ));
                    }
                    let (size, mut body) = agora_sdk::client::read_sandbox_file(conn, task, &path)
                        .await
                        .map_err(|e| format!("{path}: {e}"))?;
                    let tmp = into.join(format!(".{}.agora-sync", e.name));
                    let mut out = tokio::fs::File::create(&tmp)
                        .await
                        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
                    let n = tokio::io::copy(&mut body, &mut out).await.map_err(|e| format!("{path}: {e}"))?;
                    drop(out);
                    if n != size {
                        let _ = tokio::fs::remove_file(&tmp).await;
                        return Err(format!("{path}: got {n} of {size} bytes"));
                    }
                    tokio::fs::rename(&tmp, &dest)
                        .await
                        .map_err(|e| format!("cannot write {}: {e}", dest.display()))?;
                    files += 1;
                    bytes += n;
                }
                _ => {}
            }
        }
    }
    Ok((files, bytes))
}

/// Copies one of a task's output streams to ours. When the stream breaks (the connection to
/// the master lost, the master restarted, the relay from the agent cut), it is opened again at
/// the byte offset already written, on the driver's next connection, so the output is
/// complete and not repeated. Ends at the stream's end, when our own output fails, or when
/// the driver stopped.
pub(super) async fn relay_output(driver: Driver, task_id: TaskId, which: OutputStream, follow: bool) {
    let mut written: u64 = 0;
    let mut conn = driver.connection();
    let mut refusals = 0;
    loop {
        let c = match conn.take() {
            Some(c) if c.close_reason().is_none() => c,
            stale => match driver.next_connection(stale.as_ref()).await {
                Some(c) => c,
                None => return,
            },
        };
        match agora_sdk::client::open_output(&c, &task_id, which, written, follow).await {
            Ok(mut r) => match copy_counting(&mut r, which, &mut written).await {
                Copied::End | Copied::OurSide => return,
                Copied::Broke(e) => {
                    tracing::warn!(error = %e, offset = written, "output stream broke; resuming");
                }
            },
            Err(agora_sdk::client::ClientError::Refused(e)) => {
                // The task or its agent is not known (yet) to a master that just restarted.
                refusals += 1;
                if refusals > OUTPUT_RETRIES {
                    tracing::warn!(error = %e.message, "cannot open the task's output");
                    return;
                }
                tracing::debug!(error = %e.message, "output not available yet");
                tokio::time::sleep(OUTPUT_RETRY).await;
            }
            Err(e) => tracing::debug!(error = %e, "cannot open the task's output; retrying"),
        }
        if c.close_reason().is_none() {
            // The connection is fine (the relay broke): pause, then ask again on it.
            tokio::time::sleep(OUTPUT_RETRY).await;
        }
        conn = Some(c);
    }
}

/// How a copy of an output stream ended.
enum Copied {
    /// The stream's end: every byte is written.
    End,
    /// Writing our own stdout/stderr failed: nothing more to do.
    OurSide,
    /// Reading broke; the bytes before are written.
    Broke(std::io::Error),
}

async fn copy_counting(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
    which: OutputStream,
    written: &mut u64,
) -> Copied {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut out: std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>> = match which {
        OutputStream::Stdout => Box::pin(tokio::io::stdout()),
        OutputStream::Stderr => Box::pin(tokio::io::stderr()),
    };
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) => return if out.flush().await.is_ok() { Copied::End } else { Copied::OurSide },
            Ok(n) => n,
            Err(e) => return Copied::Broke(e),
        };
        if out.write_all(&buf[..n]).await.is_err() || out.flush().await.is_err() {
            return Copied::OurSide;
        }
        *written += n as u64;
    }
}
