//! Moving artifacts (Wasm modules, directory archives) to and from the master's
//! content-addressed store, each on a bulk stream of its own (see [`UploadRequest`] and
//! [`StreamRequest::Fetch`] for the exchange).
//!
//! Frameworks and operators [`upload`]; agents [`fetch`]. Both sides hash what they send or
//! receive: a fetched artifact is only put in place once its size and sha256 match.

use std::io;
use std::path::{Path, PathBuf};

use sha2::Digest as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::client::ClientError;
use crate::frame::{FrameReader, FrameWriter};
use crate::proto::{
    ArtifactKind, ArtifactRef, Digest, FetchReply, StreamRequest, UploadReply, UploadRequest,
};

/// Read and write granularity.
const CHUNK: usize = 64 * 1024;

/// An artifact that could not be read, sent or received intact.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("cannot {op} {}: {err}", path.display())]
    File { op: &'static str, path: PathBuf, err: io::Error },
    #[error("artifact {digest} is {size} bytes, over the {max} byte limit of this fetch")]
    TooLarge { digest: Digest, size: u64, max: u64 },
    #[error("artifact {digest}: the master sent {got} of the announced {expected} bytes")]
    Short { digest: Digest, got: u64, expected: u64 },
    #[error("artifact {digest}: the master sent more than the announced {expected} bytes")]
    Long { digest: Digest, expected: u64 },
    #[error("artifact {expected}: the bytes received hash to {actual}")]
    Mismatch { expected: Digest, actual: Digest },
    #[error("`{0}` is not a sha256 digest (64 lowercase hex digits)")]
    BadDigest(Digest),
}

fn file_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ClientError + 'a {
    move |err| ArtifactError::File { op, path: path.to_path_buf(), err }.into()
}

fn stream_err(e: impl std::fmt::Display) -> ClientError {
    ClientError::Stream(e.to_string())
}

/// Hashes the file at `path` (streaming, off the async threads): its digest and size.
pub async fn digest_file(path: &Path) -> Result<ArtifactRef, ClientError> {
    let owned = path.to_path_buf();
    let r = tokio::task::spawn_blocking(move || -> io::Result<ArtifactRef> {
        use std::io::Read as _;
        let mut file = std::fs::File::open(&owned)?;
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let mut size = 0u64;
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        Ok(ArtifactRef { digest: Digest::from_hasher(hasher), size })
    })
    .await
    .map_err(|e| ArtifactError::File {
        op: "hash",
        path: path.to_path_buf(),
        err: io::Error::other(e),
    })?;
    r.map_err(file_err("read", path))
}

/// Uploads the file at `path` to the master's artifact store as `kind`, shown as `name` in the
/// master's logs and errors. The file is hashed first; its bytes are sent only when the master
/// does not hold them already. The master's refusal (not Wasm, over its size limit, ...) comes
/// back as [`ClientError::Refused`] with the master's message.
pub async fn upload(
    conn: &quinn::Connection,
    kind: ArtifactKind,
    name: &str,
    path: &Path,
) -> Result<ArtifactRef, ClientError> {
    let artifact = digest_file(path).await?;
    let file = tokio::fs::File::open(path).await.map_err(file_err("open", path))?;
    // A file that changes after hashing is sent as it was then, or refused by the master's check.
    send_upload(conn, kind, name, &artifact, file.take(artifact.size)).await?;
    Ok(artifact)
}

/// Like [`upload`], from memory.
pub async fn upload_bytes(
    conn: &quinn::Connection,
    kind: ArtifactKind,
    name: &str,
    bytes: &[u8],
) -> Result<ArtifactRef, ClientError> {
    let artifact = ArtifactRef { digest: Digest::of(bytes), size: bytes.len() as u64 };
    send_upload(conn, kind, name, &artifact, bytes).await?;
    Ok(artifact)
}

async fn send_upload<R: AsyncRead + Unpin>(
    conn: &quinn::Connection,
    kind: ArtifactKind,
    name: &str,
    artifact: &ArtifactRef,
    mut body: R,
) -> Result<(), ClientError> {
    let (send, recv) = conn.open_bi().await?;
    let mut w = FrameWriter::new(send);
    let mut r = FrameReader::new(recv);
    let req =
        UploadRequest { kind, digest: artifact.digest.clone(), size: artifact.size, name: name.to_string() };
    w.send(&StreamRequest::Upload(req)).await?;
    match r.recv::<UploadReply>().await? {
        Some(UploadReply::Present) => {
            let _ = w.into_inner().finish();
            return Ok(());
        }
        Some(UploadReply::Send) => {}
        Some(UploadReply::Error(e)) => return Err(ClientError::Refused(e)),
        Some(other) => return Err(ClientError::Unexpected(format!("{other:?} before the bytes were sent"))),
        None => return Err(ClientError::Closed),
    }
    let mut send = w.into_inner();
    let sent = copy(&mut body, &mut send).await;
    if sent.is_ok() {
        let _ = send.finish();
    }
    // The master answers even when it stopped reading early (e.g. a check failed): its answer
    // says more than the failed write.
    match r.recv::<UploadReply>().await {
        Ok(Some(UploadReply::Stored)) => sent.map(|_| ()),
        Ok(Some(UploadReply::Error(e))) => Err(ClientError::Refused(e)),
        Ok(Some(other)) => Err(ClientError::Unexpected(format!("{other:?} after the bytes were sent"))),
        Ok(None) => Err(sent.err().unwrap_or(ClientError::Closed)),
        Err(e) => Err(sent.err().unwrap_or(ClientError::Frame(e))),
    }
}

/// Copies `from` into the stream; errors of the source are file errors, of the stream stream
/// errors.
async fn copy<R: AsyncRead + Unpin>(from: &mut R, to: &mut quinn::SendStream) -> Result<u64, ClientError> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = from
            .read(&mut buf)
            .await
            .map_err(|err| ClientError::Stream(format!("reading the upload: {err}")))?;
        if n == 0 {
            return Ok(total);
        }
        to.write_all(&buf[..n]).await.map_err(stream_err)?;
        total += n as u64;
    }
}

/// Fetches the artifact `digest` from the master's store into `dest` (an agent's call). The
/// bytes go to a temporary file next to `dest`, which is renamed into place only when the size
/// and sha256 match; a refused, short, oversized (over `max_size`) or corrupt transfer leaves
/// no file. Returns the size. An unknown digest is [`ClientError::Refused`] with code
/// [`ErrorCode::NotFound`](crate::proto::ErrorCode::NotFound).
pub async fn fetch(
    conn: &quinn::Connection,
    digest: &Digest,
    dest: &Path,
    max_size: u64,
) -> Result<u64, ClientError> {
    if !digest.is_valid() {
        return Err(ArtifactError::BadDigest(digest.clone()).into());
    }
    let (send, recv) = conn.open_bi().await?;
    let mut w = FrameWriter::new(send);
    w.send(&StreamRequest::Fetch { digest: digest.clone() }).await?;
    let _ = w.into_inner().finish();
    let mut r = FrameReader::new(recv);
    let size = match r.recv::<FetchReply>().await? {
        Some(FetchReply::Sending { size }) => size,
        Some(FetchReply::Error(e)) => return Err(ClientError::Refused(e)),
        None => return Err(ClientError::Closed),
    };
    let (mut recv, buffered) = r.into_parts();
    if size > max_size {
        let _ = recv.stop(0u32.into());
        return Err(ArtifactError::TooLarge { digest: digest.clone(), size, max: max_size }.into());
    }
    let body = std::io::Cursor::new(buffered.freeze()).chain(recv);
    let tmp = temp_path(dest);
    let result = receive(body, digest, size, &tmp).await;
    let result = match result {
        Ok(()) => tokio::fs::rename(&tmp, dest).await.map_err(file_err("rename", &tmp)),
        Err(e) => Err(e),
    };
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result.map(|()| size)
}

/// `.<dest name>.<random>.part` in `dest`'s directory (same file system: the rename is atomic).
fn temp_path(dest: &Path) -> PathBuf {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let unique = uuid::Uuid::new_v4().simple().to_string();
    dest.with_file_name(format!(".{name}.{}.part", &unique[..12]))
}

async fn receive<R: AsyncRead + Unpin>(
    body: R,
    digest: &Digest,
    size: u64,
    tmp: &Path,
) -> Result<(), ClientError> {
    let mut file = tokio::fs::File::create(tmp).await.map_err(file_err("create", tmp))?;
    let mut body = body.take(size.saturating_add(1));
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    loop {
        let n = body.read(&mut buf).await.map_err(stream_err)?;
        if n == 0 {
            break;
        }
        got += n as u64;
        if got > size {
            return Err(ArtifactError::Long { digest: digest.clone(), expected: size }.into());
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).await.map_err(file_err("write", tmp))?;
    }
    if got < size {
        return Err(ArtifactError::Short { digest: digest.clone(), got, expected: size }.into());
    }
    let actual = Digest::from_hasher(hasher);
    if actual != *digest {
        return Err(ArtifactError::Mismatch { expected: digest.clone(), actual }.into());
    }
    file.sync_all().await.map_err(file_err("sync", tmp))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn receive_checks_size_and_digest_and_temp_names_stay_beside_dest() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = b"hello artifact".to_vec();
        let d = Digest::of(&bytes);
        let tmp = dir.path().join("t");
        receive(&bytes[..], &d, bytes.len() as u64, &tmp).await.unwrap();
        assert_eq!(std::fs::read(&tmp).unwrap(), bytes);
        let e = receive(&bytes[..5], &d, bytes.len() as u64, &tmp).await.unwrap_err();
        assert!(matches!(e, ClientError::Artifact(ArtifactError::Short { got: 5, .. })), "{e}");
        let e = receive(&bytes[..], &d, 5, &tmp).await.unwrap_err();
        assert!(matches!(e, ClientError::Artifact(ArtifactError::Long { expected: 5, .. })), "{e}");
        let mut bad = bytes.clone();
        bad[0] ^= 1;
        let e = receive(&bad[..], &d, bytes.len() as u64, &tmp).await.unwrap_err();
        assert!(matches!(e, ClientError::Artifact(ArtifactError::Mismatch { .. })), "{e}");

        let dest = dir.path().join("module.wasm");
        let t = temp_path(&dest);
        assert_eq!(t.parent(), dest.parent());
        assert!(t.file_name().unwrap().to_string_lossy().starts_with(".module.wasm."));

        let path = dir.path().join("f");
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(digest_file(&path).await.unwrap(), ArtifactRef { digest: d, size: bytes.len() as u64 });
    }
}
