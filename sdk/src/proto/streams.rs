//! Output, artifact and file streams (part of [`crate::proto`]).

use serde::{Deserialize, Serialize};

use super::*;

/// Which output file of a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// First frame of every bulk stream a peer opens (client → master, agent → master,
/// master → agent): what the stream is for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamRequest {
    /// A task's stdout or stderr; answered with [`OutputReply`] then raw bytes.
    Output(OutputRequest),
    /// Store an artifact (operators and frameworks); answered with [`UploadReply`].
    Upload(UploadRequest),
    /// Read an artifact (agents); answered with [`FetchReply`] then exactly `size` raw bytes.
    Fetch { digest: Digest },
    /// List a directory of a task's sandbox or read a file of it (frameworks for their own
    /// tasks, operators; relayed by the master to the agent); answered with [`FilesReply`].
    Files(FilesRequest),
}

/// Longest sandbox path a [`FilesRequest`] may name.
pub const MAX_SANDBOX_PATH: usize = 1024;
/// Most entries one [`FilesReply::Listing`] carries (the rest is cut, `truncated` set).
pub const MAX_LISTING: usize = 1000;

/// A directory or file of a task's sandbox: `path` is relative to the sandbox (`""` is the
/// sandbox itself), plain names only (no `..`, not absolute); symbolic links are followed only
/// while they stay inside the sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilesRequest {
    pub task_id: TaskId,
    /// Filled in by the master when it forwards the request to the agent.
    pub framework_id: Option<FrameworkId>,
    pub path: String,
    /// Read the file (`Sending` then its bytes) rather than list the directory.
    pub read: bool,
}

/// The answer to a [`FilesRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FilesReply {
    /// The directory's entries, by name (at most [`MAX_LISTING`]).
    Listing {
        entries: Vec<FileEntry>,
        truncated: bool,
    },
    /// The file follows: exactly `size` raw bytes, then the stream finishes.
    Sending {
        size: u64,
    },
    Error(WireError),
}

/// One entry of a sandbox directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
    /// Last modification, Unix milliseconds.
    pub modified_ms: u64,
}

/// What a sandbox entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
    /// A symbolic link (not followed in listings).
    Link,
    Other,
}

impl FileKind {
    /// `file`, `dir`, `link` or `other`.
    pub fn as_str(self) -> &'static str {
        match self {
            FileKind::File => "file",
            FileKind::Dir => "dir",
            FileKind::Link => "link",
            FileKind::Other => "other",
        }
    }
}

/// Puts an artifact into the master's content-addressed store. The master answers at once with
/// [`UploadReply::Present`] when it holds the digest already (nothing more is sent), or with
/// [`UploadReply::Send`]; the client then sends exactly `size` raw bytes and finishes its side,
/// and the master answers [`UploadReply::Stored`] once the bytes hash to `digest` and pass the
/// checks for `kind`, or [`UploadReply::Error`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadRequest {
    pub kind: ArtifactKind,
    pub digest: Digest,
    pub size: u64,
    /// Shown in logs and errors (e.g. the local file name).
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UploadReply {
    Present,
    Send,
    Stored,
    Error(WireError),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FetchReply {
    Sending { size: u64 },
    Error(WireError),
}

/// Opens a bulk stream for a task's output. Sent as [`StreamRequest::Output`] on a new
/// bidirectional stream (client → master, and master → agent); the answer is one [`OutputReply`] frame followed by
/// the raw bytes until the stream finishes. With `follow`, the stream stays open until the
/// task is terminal and every byte was sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputRequest {
    pub task_id: TaskId,
    /// Filled in by the master when it forwards the request to the agent.
    pub framework_id: Option<FrameworkId>,
    pub stream: OutputStream,
    pub offset: u64,
    pub follow: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutputReply {
    Streaming,
    Error(WireError),
}
