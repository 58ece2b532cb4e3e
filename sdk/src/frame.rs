//! Length-delimited postcard frames with an explicit maximum size, over any byte stream
//! (QUIC streams, Unix sockets).

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

/// Largest control frame accepted (1 MiB). Bulk data never goes in frames.
pub const MAX_FRAME: usize = 1 << 20;

/// A frame that could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame larger than the {max} byte limit")]
    TooLarge { max: usize },
    #[error("malformed frame: {0}")]
    Malformed(#[from] postcard::Error),
    #[error("stream error: {0}")]
    Io(std::io::Error),
}

fn codec(max: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().length_field_type::<u32>().max_frame_length(max).new_codec()
}

fn map_io(e: std::io::Error, max: usize) -> FrameError {
    // LengthDelimitedCodec reports an oversized frame as InvalidData.
    if e.kind() == std::io::ErrorKind::InvalidData && e.to_string().contains("frame size too big") {
        FrameError::TooLarge { max }
    } else {
        FrameError::Io(e)
    }
}

/// Reads frames.
pub struct FrameReader<R> {
    inner: FramedRead<R, LengthDelimitedCodec>,
    max: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(read: R) -> Self {
        Self::with_max(read, MAX_FRAME)
    }

    pub fn with_max(read: R, max: usize) -> Self {
        Self { inner: FramedRead::new(read, codec(max)), max }
    }

    /// The next message, or `None` at a clean end of stream.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        match self.inner.next().await {
            None => Ok(None),
            Some(Err(e)) => Err(map_io(e, self.max)),
            Some(Ok(buf)) => Ok(Some(postcard::from_bytes(&buf)?)),
        }
    }

    /// Gives back the underlying reader with any bytes already buffered past the last frame.
    pub fn into_parts(self) -> (R, bytes::BytesMut) {
        let parts = self.inner.into_parts();
        (parts.io, parts.read_buf)
    }
}

/// Writes frames.
pub struct FrameWriter<W> {
    inner: FramedWrite<W, LengthDelimitedCodec>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(write: W) -> Self {
        Self { inner: FramedWrite::new(write, codec(MAX_FRAME)) }
    }

    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        let bytes = encode(msg)?;
        self.inner.send(bytes).await.map_err(|e| map_io(e, MAX_FRAME))
    }

    /// Queues a message without flushing (for batches); call [`Self::flush`] after.
    pub async fn feed<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        let bytes = encode(msg)?;
        self.inner.feed(bytes).await.map_err(|e| map_io(e, MAX_FRAME))
    }

    pub async fn flush(&mut self) -> Result<(), FrameError> {
        SinkExt::<Bytes>::flush(&mut self.inner).await.map_err(|e| map_io(e, MAX_FRAME))
    }

    pub fn get_mut(&mut self) -> &mut W {
        self.inner.get_mut()
    }

    pub fn into_inner(self) -> W {
        self.inner.into_inner()
    }
}

/// Encodes one message body (without the length prefix).
pub fn encode<T: Serialize>(msg: &T) -> Result<Bytes, FrameError> {
    let v = postcard::to_stdvec(msg)?;
    if v.len() > MAX_FRAME {
        return Err(FrameError::TooLarge { max: MAX_FRAME });
    }
    Ok(Bytes::from(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{AgentMessage, Hello, Role, PROTOCOL_VERSION};
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn round_trip_and_limits() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut w = FrameWriter::new(a);
        let mut r = FrameReader::new(b);
        let hello = Hello { version: PROTOCOL_VERSION, role: Role::Agent };
        w.send(&hello).await.unwrap();
        assert_eq!(r.recv::<Hello>().await.unwrap(), Some(hello));

        // Garbage body: decodes as an error, not a panic.
        let mut raw = w.into_inner();
        raw.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await.unwrap();
        assert!(matches!(r.recv::<AgentMessage>().await, Err(FrameError::Malformed(_))));

        // Oversized length prefix: refused before reading the body.
        raw.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        assert!(matches!(r.recv::<AgentMessage>().await, Err(FrameError::TooLarge { .. })));
    }

    /// Every decoder that reads bytes from the network must turn garbage into an error, never
    /// a panic or a huge allocation: random buffers and bit-flipped valid messages.
    #[test]
    fn decoders_survive_garbage() {
        use crate::proto::*;
        fn all(buf: &[u8]) {
            let _ = postcard::from_bytes::<Hello>(buf);
            let _ = postcard::from_bytes::<HelloReply>(buf);
            let _ = postcard::from_bytes::<AgentMessage>(buf);
            let _ = postcard::from_bytes::<MasterToAgent>(buf);
            let _ = postcard::from_bytes::<SchedulerCall>(buf);
            let _ = postcard::from_bytes::<SchedulerEvent>(buf);
            let _ = postcard::from_bytes::<OperatorCall>(buf);
            let _ = postcard::from_bytes::<OperatorReply>(buf);
            let _ = postcard::from_bytes::<OutputRequest>(buf);
            let _ = postcard::from_bytes::<OutputReply>(buf);
        }
        // xorshift: deterministic, no dependency.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let task = TaskInfo {
            task_id: TaskId("t".into()),
            name: "n".into(),
            resources: crate::Resources::parse("cpus:1;mem:1GiB;ports:[1-2]").unwrap(),
            kind: TaskKind::Command(CommandInfo { argv: vec!["true".into()], shell: false, env: vec![] }),
            kill_grace: None,
        };
        let valid = [
            postcard::to_stdvec(&SchedulerCall::Accept {
                offer_ids: vec![OfferId("o".into())],
                operations: vec![Operation::Launch { tasks: vec![task.clone()] }],
                refuse_seconds: Some(1.0),
            })
            .unwrap(),
            postcard::to_stdvec(&MasterToAgent::RunTask { framework_id: FrameworkId("f".into()), task })
                .unwrap(),
        ];
        for i in 0..20_000 {
            let len = (next() % 64) as usize;
            let buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            all(&buf);
            let mut m = valid[i % valid.len()].clone();
            let at = (next() as usize) % m.len();
            m[at] ^= 1 << (next() % 8);
            all(&m);
            all(&m[..at]);
        }
    }
}
