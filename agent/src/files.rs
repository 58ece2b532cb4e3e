//! A task's sandbox, browsed by its framework or an operator (`agora files`, `agora cp`):
//! list a directory, read a file. The agent runs as root and the sandbox belongs to the task,
//! which may plant symbolic links anywhere: every path is opened with `openat2(2)` and
//! `RESOLVE_BENEATH` from the sandbox directory, so nothing outside it can be reached, whatever
//! the task did to its files (no check-then-open race).

use std::ffi::CString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use agora_sdk::frame::FrameWriter;
use agora_sdk::proto::{
    ErrorCode, FileEntry, FileKind, FilesReply, FilesRequest, WireError, MAX_LISTING, MAX_SANDBOX_PATH,
};
use tokio::io::AsyncReadExt;

/// Why a sandbox path a peer sent is refused (the text is sent back to it).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Longer than [`MAX_SANDBOX_PATH`].
    #[error("a sandbox path is at most {MAX_SANDBOX_PATH} bytes")]
    TooLong,
    /// Holds a NUL byte.
    #[error("a sandbox path has no NUL byte")]
    Nul,
    /// Climbs with `..`.
    #[error("`{0}`: `..` is not allowed")]
    Parent(String),
    /// Absolute.
    #[error("`{0}`: the path is relative to the sandbox")]
    Absolute(String),
}

/// Checks a sandbox path: relative, plain names (no `..`, no root), bounded.
pub fn check_path(path: &str) -> Result<(), PathError> {
    if path.len() > MAX_SANDBOX_PATH {
        return Err(PathError::TooLong);
    }
    if path.contains('\0') {
        return Err(PathError::Nul);
    }
    for c in Path::new(path).components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err(PathError::Parent(path.to_string())),
            Component::RootDir | Component::Prefix(_) => return Err(PathError::Absolute(path.to_string())),
        }
    }
    Ok(())
}

/// Opens `rel` beneath the directory `root` (`flags`: `O_RDONLY`, maybe `O_DIRECTORY`).
fn open_beneath(root: &Path, rel: &str, flags: i32) -> io::Result<OwnedFd> {
    let root_c = CString::new(root.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: open(2) of a NUL-terminated path; the fd is owned below.
    let dir = unsafe { libc::open(root_c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if dir < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd of ours.
    let dir = unsafe { OwnedFd::from_raw_fd(dir) };
    let rel = if rel.is_empty() { "." } else { rel };
    let rel_c = CString::new(rel).map_err(io::Error::other)?;
    // SAFETY: `open_how` is plain integers; all zero is its "nothing asked" value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC | libc::O_NOCTTY) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    use std::os::fd::AsRawFd;
    // SAFETY: openat2(2) with a valid dirfd, a NUL-terminated path and an `open_how` of the
    // size passed; the returned fd is owned below.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            rel_c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd of ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn modified_ms(m: &std::fs::Metadata) -> u64 {
    m.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The entries of directory `rel` of `sandbox`, by name (at most [`MAX_LISTING`]).
pub fn list(sandbox: &Path, rel: &str) -> io::Result<(Vec<FileEntry>, bool)> {
    let dir = open_beneath(sandbox, rel, libc::O_RDONLY | libc::O_DIRECTORY)?;
    use std::os::fd::AsRawFd;
    // The opened directory itself (a magic link that names it; nothing is resolved again).
    let at = std::path::PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    let mut entries = Vec::new();
    let mut truncated = false;
    for e in std::fs::read_dir(&at)? {
        let e = e?;
        if entries.len() == MAX_LISTING {
            truncated = true;
            break;
        }
        let meta = std::fs::symlink_metadata(e.path())?;
        let ft = meta.file_type();
        let kind = if ft.is_symlink() {
            FileKind::Link
        } else if ft.is_dir() {
            FileKind::Dir
        } else if ft.is_file() {
            FileKind::File
        } else {
            FileKind::Other
        };
        entries.push(FileEntry {
            name: e.file_name().to_string_lossy().into_owned(),
            kind,
            size: meta.len(),
            modified_ms: modified_ms(&meta),
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((entries, truncated))
}

/// Opens regular file `rel` of `sandbox` for reading: the file and its size.
pub fn open_file(sandbox: &Path, rel: &str) -> io::Result<(std::fs::File, u64)> {
    let fd = open_beneath(sandbox, rel, libc::O_RDONLY | libc::O_NONBLOCK)?;
    let file = std::fs::File::from(fd);
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    Ok((file, meta.len()))
}

fn io_error(req: &FilesRequest, e: &io::Error) -> WireError {
    let code = match e.kind() {
        io::ErrorKind::NotFound => ErrorCode::NotFound,
        io::ErrorKind::InvalidInput => ErrorCode::Invalid,
        _ if e.raw_os_error() == Some(libc::EXDEV) => ErrorCode::Invalid,
        _ if e.raw_os_error() == Some(libc::ENOTDIR) => ErrorCode::Invalid,
        _ => ErrorCode::Internal,
    };
    let why = if e.raw_os_error() == Some(libc::EXDEV) {
        "it leads outside the sandbox".to_string()
    } else {
        e.to_string()
    };
    WireError::new(
        code,
        format!("{} of task {}: {why}", if req.path.is_empty() { "." } else { &req.path }, req.task_id),
    )
}

/// Serves one files request on `send`, for the task whose sandbox is `sandbox`.
pub async fn serve(send: quinn::SendStream, req: FilesRequest, sandbox: std::path::PathBuf) {
    let mut w = FrameWriter::new(send);
    if let Err(why) = check_path(&req.path) {
        let _ = w.send(&FilesReply::Error(WireError::new(ErrorCode::Invalid, why.to_string()))).await;
        let _ = w.into_inner().finish();
        return;
    }
    let (path, root) = (req.path.clone(), sandbox.clone());
    if !req.read {
        let listed = tokio::task::spawn_blocking(move || list(&root, &path)).await;
        let reply = match listed {
            Ok(Ok((entries, truncated))) => FilesReply::Listing { entries, truncated },
            Ok(Err(e)) => FilesReply::Error(io_error(&req, &e)),
            Err(e) => FilesReply::Error(WireError::new(ErrorCode::Internal, e.to_string())),
        };
        let _ = w.send(&reply).await;
        let _ = w.into_inner().finish();
        return;
    }
    let opened = tokio::task::spawn_blocking(move || open_file(&root, &path)).await;
    let (file, size) = match opened {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            let _ = w.send(&FilesReply::Error(io_error(&req, &e))).await;
            let _ = w.into_inner().finish();
            return;
        }
        Err(e) => {
            let _ = w.send(&FilesReply::Error(WireError::new(ErrorCode::Internal, e.to_string()))).await;
            let _ = w.into_inner().finish();
            return;
        }
    };
    if w.send(&FilesReply::Sending { size }).await.is_err() {
        return;
    }
    let mut send = w.into_inner();
    // Exactly `size` bytes: a file that grows meanwhile is cut, one that shrinks ends early
    // (the reader sees a short body).
    let mut body = tokio::fs::File::from_std(file).take(size);
    match tokio::io::copy(&mut body, &mut send).await {
        Ok(_) => {
            let _ = send.finish();
        }
        Err(e) => {
            tracing::debug!(task_id = %req.task_id, error = %e, "sandbox file stream ended early");
            let _ = send.reset(0u32.into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_relative_and_plain() {
        assert!(check_path("").is_ok() && check_path("out/a.wav").is_ok() && check_path("./x").is_ok());
        assert!(check_path("../x").unwrap_err().to_string().contains(".."));
        assert!(check_path("a/../../x").is_err());
        assert!(check_path("/etc/passwd").unwrap_err().to_string().contains("relative"));
        assert!(check_path(&"a".repeat(MAX_SANDBOX_PATH + 1)).is_err());
    }

    #[test]
    fn nothing_outside_the_sandbox_is_reached() {
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::write(outside.path().join("secret"), b"key").expect("write");
        let sandbox = tempfile::tempdir().expect("tempdir");
        let s = sandbox.path();
        std::fs::create_dir(s.join("out")).expect("mkdir");
        std::fs::write(s.join("out/data"), b"hello").expect("write");
        std::os::unix::fs::symlink(outside.path().join("secret"), s.join("abs")).expect("symlink");
        std::os::unix::fs::symlink("../../../../../../../../etc/passwd", s.join("rel")).expect("symlink");
        std::os::unix::fs::symlink(outside.path(), s.join("dirlink")).expect("symlink");
        std::os::unix::fs::symlink("out/data", s.join("inside")).expect("symlink");

        let (entries, truncated) = list(s, "").expect("list");
        let names: Vec<(&str, FileKind)> = entries.iter().map(|e| (e.name.as_str(), e.kind)).collect();
        assert!(!truncated);
        assert_eq!(
            names,
            [
                ("abs", FileKind::Link),
                ("dirlink", FileKind::Link),
                ("inside", FileKind::Link),
                ("out", FileKind::Dir),
                ("rel", FileKind::Link)
            ]
        );
        let (mut f, size) = open_file(s, "out/data").expect("open");
        let mut text = String::new();
        std::io::Read::read_to_string(&mut f, &mut text).expect("read");
        assert_eq!((text.as_str(), size), ("hello", 5));
        assert!(open_file(s, "inside").is_ok(), "a link that stays inside is followed");
        for escape in ["abs", "rel", "dirlink/secret"] {
            let e = open_file(s, escape).expect_err(escape);
            assert_eq!(e.raw_os_error(), Some(libc::EXDEV), "{escape}: {e}");
        }
        assert!(list(s, "dirlink").is_err());
        assert_eq!(open_file(s, "out").expect_err("a dir").kind(), io::ErrorKind::InvalidInput);
    }
}
