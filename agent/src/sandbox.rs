//! The agent's work directory: where sandboxes live, how ids become path components, and the
//! small checkpoint files (`agent_id`, per-task `task.json`) written atomically.
//!
//! Layout (Mesos's):
//!
//! ```text
//! WORK/agent_id
//! WORK/frameworks/<fw>/executors/<task>/task.json
//! WORK/frameworks/<fw>/executors/<task>/runs/<run uuid>/{stdout,stderr}
//! ```

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use agora_sdk::proto::{AgentId, ExecutorId, FrameworkId, TaskId, TaskInfo, TaskState};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Longest file name most Linux file systems accept.
const MAX_COMPONENT: usize = 255;

/// An id that cannot be used as a directory name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    /// The id is empty.
    #[error("{kind} id is empty")]
    Empty {
        /// `framework` or `task`.
        kind: &'static str,
    },
    /// The escaped id is longer than a file name may be.
    #[error("{kind} id `{id}` is too long for a file name ({len} bytes escaped, at most {MAX_COMPONENT})")]
    TooLong {
        /// `framework` or `task`.
        kind: &'static str,
        /// The id as given.
        id: String,
        /// Its escaped length.
        len: usize,
    },
}

/// Turns an id into one safe path component: bytes outside `[A-Za-z0-9_.-]` become `%XX`, as does
/// a leading dot (so `.`, `..` and hidden names cannot occur). The mapping is injective, so two
/// different ids never share a directory.
pub fn path_component(kind: &'static str, id: &str) -> Result<String, IdError> {
    if id.is_empty() {
        return Err(IdError::Empty { kind });
    }
    let mut out = String::with_capacity(id.len());
    for (i, b) in id.bytes().enumerate() {
        let plain = b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && i > 0);
        if plain {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.len() > MAX_COMPONENT {
        return Err(IdError::TooLong { kind, id: id.to_string(), len: out.len() });
    }
    Ok(out)
}

/// Paths inside the agent's work directory.
#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// A layout rooted at `work_dir`.
    pub fn new(work_dir: impl Into<PathBuf>) -> Self {
        Self { root: work_dir.into() }
    }

    /// The work directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the master-assigned agent id is kept.
    pub fn agent_id_file(&self) -> PathBuf {
        self.root.join("agent_id")
    }

    /// Parent of all framework directories.
    pub fn frameworks_dir(&self) -> PathBuf {
        self.root.join("frameworks")
    }

    /// `WORK/frameworks/<fw>/executors/<task>`: one per task (the command executor runs one
    /// task), holding `task.json` and the runs.
    pub fn executor_dir(&self, fw: &FrameworkId, task: &TaskId) -> Result<PathBuf, IdError> {
        Ok(self
            .frameworks_dir()
            .join(path_component("framework", fw.as_str())?)
            .join("executors")
            .join(path_component("task", task.as_str())?))
    }

    /// `WORK/frameworks/<fw>/executors/<executor id>`: a framework's own executor (or a
    /// built-in one), holding its runs.
    pub fn named_executor_dir(&self, fw: &FrameworkId, executor: &ExecutorId) -> Result<PathBuf, IdError> {
        Ok(self
            .frameworks_dir()
            .join(path_component("framework", fw.as_str())?)
            .join("executors")
            .join(path_component("executor", executor.as_str())?))
    }

    /// The sandbox of one run of a task.
    pub fn run_dir(executor_dir: &Path, run: Uuid) -> PathBuf {
        executor_dir.join("runs").join(run.to_string())
    }

    /// The task checkpoint inside an executor directory.
    pub fn task_checkpoint(executor_dir: &Path) -> PathBuf {
        executor_dir.join("task.json")
    }
}

/// What the agent checkpoints about a task, enough to find and adopt it after a restart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskCheckpoint {
    /// Owner of the task.
    pub framework_id: FrameworkId,
    /// The task as launched.
    pub task: TaskInfo,
    /// The sandbox of the current run.
    pub run_dir: PathBuf,
    /// Process id (and process-group id) of the task's process, once spawned.
    pub pid: Option<u32>,
    /// The latest state the agent gave the task.
    pub state: TaskState,
    /// When this checkpoint was written (Unix milliseconds).
    pub updated_ms: u64,
}

/// Writes `data` to `path` atomically: a temporary file in the same directory, fsync, rename.
/// Survives a power loss; for state that matters after a reboot (the agent id).
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    write_replace(path, data, true)
}

/// Like [`write_atomic`] without the fsync: survives a crash of the agent (the page cache
/// outlives it), not of the machine, which the tasks would not survive either. Task
/// checkpoints use this: an fsync per task state change costs more than the spawn itself.
pub fn write_checkpoint(path: &Path, data: &[u8]) -> io::Result<()> {
    write_replace(path, data, false)
}

/// The first checkpoint of a file that does not exist yet, written straight into it: one inode
/// and no rename, where [`write_checkpoint`] makes a temporary file and renames it (on a busy
/// ext4 every new inode is a search of the inode bitmap). A reader finds no file, or for the
/// moment of the one `write` an empty one; an existing file (a task relaunched in the same
/// directory) is never truncated, but replaced as by [`write_checkpoint`].
pub fn write_first_checkpoint(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let created = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path);
    match created {
        Ok(mut f) => f.write_all(data).inspect_err(|_| {
            let _ = std::fs::remove_file(path);
        }),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => write_checkpoint(path, data),
        Err(e) => Err(e),
    }
}

fn write_replace(path: &Path, data: &[u8], durable: bool) -> io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", Uuid::new_v4().simple()));
    let result = (|| {
        // Checkpoints are the agent's: closed to tasks, which run as another user.
        let mut f = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?
        };
        f.write_all(data)?;
        if durable {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Directory mode of everything on the way to a sandbox: tasks may pass through (to their own
/// sandbox, whose name they are given) but not list what is there.
pub const PASS_THROUGH: u32 = 0o711;

/// Creates `dir` and every missing parent with mode [`PASS_THROUGH`], then makes `dir` itself
/// the sandbox of `user`'s framework: owned by the agent, group `user.gid`, mode 0770 (the
/// framework's tasks and executors write there; nobody else, same uid or not, gets in).
/// Without a user (an agent that is not root) `dir` is 0700 and the agent's.
pub fn create_sandbox(dir: &Path, user: Option<crate::user::TaskUser>) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(PASS_THROUGH).create(dir)?;
    match user {
        Some(u) => {
            u.chgrp(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o770))
        }
        None => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)),
    }
}

/// Reads the agent id file: `Ok(None)` when there is none (first start) or it is empty.
pub fn read_agent_id(path: &Path) -> io::Result<Option<AgentId>> {
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let id = s.trim();
            Ok((!id.is_empty()).then(|| AgentId::new(id)))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes the agent id file atomically.
pub fn write_agent_id(path: &Path, id: &AgentId) -> io::Result<()> {
    write_atomic(path, format!("{id}\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_escaped_injectively() {
        assert_eq!(path_component("task", "web-1.a_b").as_deref(), Ok("web-1.a_b"));
        assert_eq!(path_component("task", "..").as_deref(), Ok("%2E."));
        assert_eq!(path_component("task", ".").as_deref(), Ok("%2E"));
        assert_eq!(path_component("task", "a/b").as_deref(), Ok("a%2Fb"));
        assert_eq!(path_component("task", "a%2Fb").as_deref(), Ok("a%252Fb"));
        assert_eq!(path_component("task", "nul\0").as_deref(), Ok("nul%00"));
        assert_eq!(path_component("task", ""), Err(IdError::Empty { kind: "task" }));
        assert!(matches!(path_component("task", &"/".repeat(100)), Err(IdError::TooLong { .. })));
        for id in ["../../etc", "a/../../b", "/abs"] {
            let c = path_component("task", id).unwrap_or_default();
            assert!(!c.contains('/') && c != ".." && !c.starts_with('.'), "{id} -> {c}");
        }
    }

    #[test]
    fn first_checkpoint_in_place_then_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("task.json");
        write_first_checkpoint(&path, b"{\"state\":\"running\"}").expect("first");
        assert_eq!(std::fs::read(&path).expect("read"), b"{\"state\":\"running\"}");
        // An existing file is replaced whole, never truncated and rewritten.
        write_first_checkpoint(&path, b"{}").expect("again");
        assert_eq!(std::fs::read(&path).expect("read"), b"{}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 1);
    }

    #[test]
    fn agent_id_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = Layout::new(dir.path());
        let path = layout.agent_id_file();
        assert_eq!(read_agent_id(&path).ok(), Some(None));
        write_agent_id(&path, &AgentId::new("a-17")).expect("write");
        assert_eq!(read_agent_id(&path).ok(), Some(Some(AgentId::new("a-17"))));
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("read_dir")
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        assert_eq!(names.len(), 1);
    }
}
