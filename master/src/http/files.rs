//! A task's sandbox in the web UI (Mesos's sandbox browser): `/tasks/{id}/files?path=DIR`
//! lists a directory, `/tasks/{id}/file?path=FILE` shows a file of at most [`VIEW_MAX`] as
//! plain text and `&download=1` streams any file as an attachment. Everything goes through
//! [`MasterHandle::task_files`], the relay `agora files` and `agora cp` use; the agent keeps
//! paths inside the sandbox.

use std::pin::Pin;
use std::task::{Context, Poll};

use agora_sdk::proto::{ErrorCode, FileEntry, FilesReply, FrameworkId, TaskId, WireError};
use axum::body::Body;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncRead, ReadBuf};

use crate::server::{MasterHandle, TaskFiles};

/// The largest file the browser is shown inline; larger ones are downloaded.
pub const VIEW_MAX: u64 = 1 << 20;
/// How long the agent may take to answer (a page never hangs on an agent that went silent).
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// [`MasterHandle::task_files`], bounded by [`ANSWER_TIMEOUT`].
async fn ask(master: &MasterHandle, task: &TaskId, path: &str, read: bool) -> Result<TaskFiles, WireError> {
    tokio::time::timeout(ANSWER_TIMEOUT, master.task_files(task, path, read))
        .await
        .map_err(|_| WireError::new(ErrorCode::Internal, "the agent did not answer in time"))?
}

/// A directory of the sandbox: its entries and whether the agent cut the listing.
pub struct Listing {
    pub entries: Vec<FileEntry>,
    pub truncated: bool,
}

/// `another framework's task has the same id` when `files` belongs to another framework
/// (`Locate` as an operator finds the first task with an id).
fn check_framework(files: &TaskFiles, framework: &FrameworkId) -> Result<(), WireError> {
    if files.framework_id != *framework {
        return Err(WireError::new(
            ErrorCode::NotFound,
            "another framework's task has the same id; its sandbox is not shown here",
        ));
    }
    Ok(())
}

/// Lists directory `path` (`""`: the sandbox) of a task.
pub async fn list(
    master: &MasterHandle,
    task: &TaskId,
    framework: &FrameworkId,
    path: &str,
) -> Result<Listing, WireError> {
    let files = ask(master, task, path, false).await?;
    check_framework(&files, framework)?;
    match files.reply {
        FilesReply::Listing { entries, truncated } => Ok(Listing { entries, truncated }),
        _ => Err(WireError::new(ErrorCode::Internal, "the agent did not answer with a listing")),
    }
}

/// An open file of a sandbox: its size and its bytes, read as the response body streams.
pub struct Download {
    pub size: u64,
    reader: Pin<Box<dyn AsyncRead + Send>>,
    /// Kept open while the body streams (dropping it would end the request).
    _send: quinn::SendStream,
}

impl AsyncRead for Download {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.reader.as_mut().poll_read(cx, buf)
    }
}

/// Opens file `path` of a task.
pub async fn open(
    master: &MasterHandle,
    task: &TaskId,
    framework: &FrameworkId,
    path: &str,
) -> Result<Download, WireError> {
    let files = ask(master, task, path, true).await?;
    check_framework(&files, framework)?;
    let FilesReply::Sending { size } = files.reply else {
        return Err(WireError::new(ErrorCode::Internal, "the agent did not send the file"));
    };
    let head = std::io::Cursor::new(files.buffered.freeze());
    // Exactly `size` bytes: nothing the agent might send after them.
    let body = tokio::io::AsyncReadExt::take(tokio::io::AsyncReadExt::chain(head, files.recv), size);
    Ok(Download { size, reader: Box::pin(body), _send: files.send })
}

/// The name a download is saved as: the path's last part, letters, digits, `.`, `_` and `-`
/// only (it goes into a header).
pub fn file_name(path: &str) -> String {
    let last = path.rsplit('/').next().unwrap_or_default();
    let name: String = last
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
        .collect();
    if name.trim_matches('.').is_empty() {
        "file".into()
    } else {
        name
    }
}

/// The response for a file: inline plain text (never HTML a task wrote, `nosniff`), or an
/// attachment streamed as the agent sends it.
pub fn respond(d: Download, path: &str, download: bool) -> Response {
    let size = d.size;
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(d));
    let disposition = if download {
        format!("attachment; filename=\"{}\"", file_name(path))
    } else {
        format!("inline; filename=\"{}\"", file_name(path))
    };
    let content_type = if download { "application/octet-stream" } else { "text/plain; charset=utf-8" };
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, content_type.to_string()),
            (header::CONTENT_LENGTH, size.to_string()),
            (header::CONTENT_DISPOSITION, disposition),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    #[test]
    fn download_names_are_header_safe() {
        assert_eq!(super::file_name("out/hello.wav"), "hello.wav");
        assert_eq!(super::file_name("a\"b\r\n.txt"), "a_b__.txt");
        assert_eq!(super::file_name(".."), "file");
        assert_eq!(super::file_name(""), "file");
    }
}
