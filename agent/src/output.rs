//! Task output streams: the master opens a bidirectional stream per request, sends one
//! [`OutputRequest`] frame, and gets one [`OutputReply`] frame followed by the raw bytes of the
//! task's `stdout` or `stderr` file from the requested offset. With `follow` the stream stays
//! open until the task's process has ended and every byte was sent.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use agora_sdk::frame::{FrameReader, FrameWriter};
use agora_sdk::proto::{
    ErrorCode, FilesReply, FilesRequest, OutputReply, OutputRequest, OutputStream, StreamRequest, WireError,
};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};

/// How often a followed file is polled for new bytes while its task runs.
pub const FOLLOW_POLL: Duration = Duration::from_millis(25);
/// How long the master has to send its request after opening a stream.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CHUNK: usize = 64 * 1024;

/// Where a task's output is and whether it is complete.
#[derive(Clone, Debug)]
pub struct OutputTarget {
    /// The output file.
    pub path: PathBuf,
    /// `true` once the task's process has ended (nothing more will be written).
    pub done: watch::Receiver<bool>,
    /// The agent's garbage collection removed this sandbox (a missing file is then reported
    /// as removed, not served as empty output).
    pub collected: bool,
}

impl OutputTarget {
    /// A target whose task is over.
    pub fn finished(path: PathBuf) -> Self {
        Self { path, done: watch::channel(true).1, collected: false }
    }
}

/// A request to the agent core: where is this output?
#[derive(Debug)]
pub struct OutputLookup {
    /// The request as received.
    pub request: OutputRequest,
    /// Where to send the answer (`None`: unknown task).
    pub reply: oneshot::Sender<Option<OutputTarget>>,
}

/// Copies `target`'s file from `offset` to `out`. Without `follow` it stops at end of file;
/// with it, it keeps polling until the task is done and the file is drained. A file that does
/// not exist yet counts as empty. Offsets are those of the whole stream: a file whose head was
/// dropped (`--max-output-size`) keeps its length, and the dropped part is skipped, so what is
/// sent is always a contiguous run of real output, possibly after a gap. Returns the number of
/// bytes written.
pub async fn copy_output<W: AsyncWrite + Unpin>(
    out: &mut W,
    mut target: OutputTarget,
    offset: u64,
    follow: bool,
) -> io::Result<u64> {
    let mut file: Option<tokio::fs::File> = None;
    let mut pos = offset;
    let mut written = 0u64;
    let mut buf = vec![0u8; CHUNK];
    let mut writer_gone = false;
    loop {
        // Sample "done" before reading: if it was already set, this read sees every byte.
        let finished = writer_gone || *target.done.borrow_and_update();
        if file.is_none() {
            match tokio::fs::File::open(&target.path).await {
                Ok(mut f) => {
                    f.seek(io::SeekFrom::Start(pos)).await?;
                    file = Some(f);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        if let Some(f) = file.as_mut() {
            loop {
                // The head of a file past --max-output-size is a hole (see `crate::disk`): it
                // reads as nothing, not as zeros. A reader whose offset lies there, or that
                // fell behind the cap while following, goes on from the first byte kept.
                let start = crate::disk::next_data(f, pos);
                f.seek(io::SeekFrom::Start(start)).await?;
                pos = start;
                let n = f.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                // The head may have been dropped while this was read: not a byte of the new
                // hole is sent.
                let kept = crate::disk::next_data(f, pos);
                let skip = usize::try_from(kept - pos).unwrap_or(usize::MAX).min(n);
                out.write_all(&buf[skip..n]).await?;
                written += (n - skip) as u64;
                pos = (pos + n as u64).max(kept);
                f.seek(io::SeekFrom::Start(pos)).await?;
            }
            out.flush().await?;
        }
        if !follow || finished {
            return Ok(written);
        }
        tokio::select! {
            changed = target.done.changed() => writer_gone = changed.is_err(),
            () = tokio::time::sleep(FOLLOW_POLL) => {}
        }
    }
}

/// Serves one output stream opened by the master: reads the request, asks the agent core
/// (through `lookups`) where the output is, replies, and streams. Errors end only this stream.
pub async fn serve(
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    lookups: mpsc::Sender<OutputLookup>,
) {
    let mut reader = FrameReader::new(recv);
    let request = match tokio::time::timeout(REQUEST_TIMEOUT, reader.recv::<StreamRequest>()).await {
        Ok(Ok(Some(StreamRequest::Output(r)))) => r,
        Ok(Ok(Some(StreamRequest::Files(r)))) => {
            drop(reader);
            serve_files(send, r, lookups).await;
            return;
        }
        Ok(Ok(Some(other))) => {
            tracing::warn!(?other, "the master opened a stream this agent does not serve");
            let reply = OutputReply::Error(WireError::new(
                ErrorCode::Unexpected,
                "agents serve output and files streams only",
            ));
            let _ = reply_and_finish(send, &reply).await;
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "malformed output request");
            let reply = OutputReply::Error(WireError::new(ErrorCode::Malformed, e.to_string()));
            let _ = reply_and_finish(send, &reply).await;
            return;
        }
        Err(_) => {
            tracing::warn!("output stream opened without a request");
            let _ = send.reset(0u32.into());
            return;
        }
    };
    drop(reader);
    let (tx, rx) = oneshot::channel();
    let target = match lookups.send(OutputLookup { request: request.clone(), reply: tx }).await {
        Ok(()) => rx.await.ok().flatten(),
        Err(_) => None,
    };
    let file = match request.stream {
        OutputStream::Stdout => "stdout",
        OutputStream::Stderr => "stderr",
    };
    let Some(mut target) = target else {
        let msg = format!("task {} is unknown on this agent", request.task_id);
        tracing::debug!(task_id = %request.task_id, "output request for an unknown task");
        let _ = reply_and_finish(send, &OutputReply::Error(WireError::new(ErrorCode::NotFound, msg))).await;
        return;
    };
    if target.collected && matches!(tokio::fs::try_exists(&target.path).await, Ok(false)) {
        let msg = format!(
            "the sandbox of task {} was removed by garbage collection (finished sandboxes are kept for the \
             agent's --gc-delay, less when its disk fills up)",
            request.task_id
        );
        tracing::debug!(task_id = %request.task_id, "output request for a removed sandbox");
        let _ = reply_and_finish(send, &OutputReply::Error(WireError::new(ErrorCode::NotFound, msg))).await;
        return;
    }
    target.path = target.path.join(file);
    let mut writer = FrameWriter::new(send);
    if writer.send(&OutputReply::Streaming).await.is_err() {
        return;
    }
    let mut send = writer.into_inner();
    // The reader going away ends the stream even while we wait for new output.
    let stopped = send.stopped();
    let copied = tokio::select! {
        r = copy_output(&mut send, target, request.offset, request.follow) => r,
        _ = stopped => Err(io::Error::new(io::ErrorKind::BrokenPipe, "reader stopped the stream")),
    };
    match copied {
        Ok(n) => {
            tracing::debug!(task_id = %request.task_id, file, bytes = n, "output stream complete");
            let _ = send.finish();
        }
        Err(e) => {
            tracing::debug!(task_id = %request.task_id, file, error = %e, "output stream ended early");
            let _ = send.reset(0u32.into());
        }
    }
}

/// A files request: the task's sandbox found through the core as for its output, then
/// [`crate::files::serve`].
async fn serve_files(send: quinn::SendStream, req: FilesRequest, lookups: mpsc::Sender<OutputLookup>) {
    let request = OutputRequest {
        task_id: req.task_id.clone(),
        framework_id: req.framework_id.clone(),
        stream: OutputStream::Stdout,
        offset: 0,
        follow: false,
    };
    let (tx, rx) = oneshot::channel();
    let target = match lookups.send(OutputLookup { request, reply: tx }).await {
        Ok(()) => rx.await.ok().flatten(),
        Err(_) => None,
    };
    let missing = match &target {
        None => Some(format!("task {} is unknown on this agent", req.task_id)),
        Some(t) if t.collected && matches!(tokio::fs::try_exists(&t.path).await, Ok(false)) => {
            Some(format!("the sandbox of task {} was removed by garbage collection", req.task_id))
        }
        Some(_) => None,
    };
    match (target, missing) {
        (Some(t), None) => crate::files::serve(send, req, t.path).await,
        (_, why) => {
            let why = why.unwrap_or_default();
            let mut w = FrameWriter::new(send);
            let _ = w.send(&FilesReply::Error(WireError::new(ErrorCode::NotFound, why))).await;
            let _ = w.into_inner().finish();
        }
    }
}

async fn reply_and_finish(send: quinn::SendStream, reply: &OutputReply) -> io::Result<()> {
    let mut writer = FrameWriter::new(send);
    writer.send(reply).await.map_err(io::Error::other)?;
    let mut send = writer.into_inner();
    send.finish().map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test]
    async fn reads_from_offset_without_follow() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("stdout");
        std::fs::write(&path, b"hello world").expect("write");
        let mut out = Vec::new();
        let n = copy_output(&mut out, OutputTarget::finished(path.clone()), 6, false).await.expect("copy");
        assert_eq!((n, out.as_slice()), (5, &b"world"[..]));
        // A missing file is empty.
        let mut out = Vec::new();
        let n = copy_output(&mut out, OutputTarget::finished(dir.path().join("nope")), 0, false)
            .await
            .expect("copy");
        assert_eq!(n, 0);
    }

    #[tokio::test]
    async fn follow_waits_for_the_end_of_the_task() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("stdout");
        let (done_tx, done) = watch::channel(false);
        let target = OutputTarget { path: path.clone(), done, collected: false };
        let copier = tokio::spawn(async move {
            let mut out = Vec::new();
            copy_output(&mut out, target, 0, true).await.map(|_| out)
        });
        // The file appears late and grows while followed.
        tokio::time::sleep(Duration::from_millis(60)).await;
        let mut f = std::fs::File::create(&path).expect("create");
        f.write_all(b"one\n").expect("write");
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(!copier.is_finished());
        f.write_all(b"two\n").expect("write");
        done_tx.send_replace(true);
        let out = tokio::time::timeout(Duration::from_secs(5), copier)
            .await
            .expect("finishes once done")
            .expect("join")
            .expect("copy");
        assert_eq!(out, b"one\ntwo\n");
    }

    #[tokio::test]
    async fn a_capped_file_reads_as_its_tail_at_unchanged_offsets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("stdout");
        let mut f = std::fs::File::create(&path).expect("create");
        for i in 0..32u32 {
            f.write_all(format!("{i:065535}\n").as_bytes()).expect("write");
        }
        f.sync_all().expect("sync");
        let dropped = crate::disk::cap_output(&path, 1 << 20).expect("cap");
        assert!(dropped > 0);
        // From the start: the dropped head is skipped, not sent as zeros.
        let mut out = Vec::new();
        let n = copy_output(&mut out, OutputTarget::finished(path.clone()), 0, false).await.expect("copy");
        assert_eq!(n, out.len() as u64);
        assert_eq!(out.len() as u64, (32u64 << 16) - dropped);
        assert!(!out.contains(&0), "no zeros from the hole");
        assert!(out.ends_with(format!("{:065535}\n", 31).as_bytes()), "the tail is kept");
        // From an offset in the kept part: exactly the bytes from there.
        let at = (31u64 << 16) + 65530;
        let mut out = Vec::new();
        copy_output(&mut out, OutputTarget::finished(path), at, false).await.expect("copy");
        assert_eq!(out, b"00031\n");
    }
}
