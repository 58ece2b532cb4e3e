//! Length-delimited postcard frames with an explicit maximum size, over any byte stream
//! (QUIC streams, Unix sockets).
//!
//! # Lists larger than a frame
//!
//! A message never exceeds [`MAX_FRAME`]; a list that may (thousands of tasks, offers, launches,
//! updates) is cut by one mechanism, [`chunk_by_size`]: runs of items whose encodings add up
//! to at most a budget ([`LIST_BUDGET`] leaves room for what surrounds the list), in order. The
//! runs go out in one of two shapes, by what the receiver needs:
//!
//! - **Independent messages** ([`FrameWriter::feed_list`]): each run is a whole message of the
//!   list's own variant, because the receiver handles every item on its own (offers, launch
//!   batches, executor updates). Items that fit in no frame by themselves are handed back.
//! - **Parts, then the final message** ([`in_parts`]): every run but the last goes in the
//!   list's `…Part` message (or, for agent registration, `TaskReports`), the last one in the
//!   message that normally carries the whole list (`Agents`, `Frameworks`, `Tasks`,
//!   `Register`); the receiver gathers parts until that final message, which is the only one
//!   that acts. A list that fits is just the final message, as before the split existed.
//!
//! This is chunking on the control stream, not a bulk stream of its own: the lists are
//! control data that is ordered with the messages around it (a registration's reports must
//! arrive before the `Register` they belong to, launches before the kills that follow), and a
//! second stream would need its own ordering and end-of-list signal, which the final message
//! already is.

use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};

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

/// Writes frames: each message is encoded straight into one buffer behind its length prefix
/// (no per-message allocation), and the buffer goes to the stream on [`Self::flush`] or when it
/// grows past [`WRITE_CHUNK`].
pub struct FrameWriter<W> {
    io: W,
    buf: BytesMut,
}

/// Buffered bytes that make [`FrameWriter::feed`] write out before returning.
pub const WRITE_CHUNK: usize = 64 << 10;

/// A postcard output that appends to a `BytesMut` it borrows.
struct Append<'a>(&'a mut BytesMut);

impl postcard::ser_flavors::Flavor for Append<'_> {
    type Output = ();

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.put_u8(data);
        Ok(())
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(write: W) -> Self {
        Self { io: write, buf: BytesMut::with_capacity(4096) }
    }

    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        self.append(msg)?;
        self.flush().await
    }

    /// Queues a message without flushing (for batches); call [`Self::flush`] after.
    pub async fn feed<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        self.append(msg)?;
        if self.buf.len() >= WRITE_CHUNK {
            self.io.write_all_buf(&mut self.buf).await.map_err(FrameError::Io)?;
        }
        Ok(())
    }

    fn append<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        let start = self.buf.len();
        self.buf.put_u32(0);
        let encoded = postcard::serialize_with_flavor(msg, Append(&mut self.buf));
        let len = self.buf.len() - start - 4;
        if let Err(e) = encoded {
            self.buf.truncate(start);
            return Err(e.into());
        }
        if len > MAX_FRAME {
            self.buf.truncate(start);
            return Err(FrameError::TooLarge { max: MAX_FRAME });
        }
        self.buf[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(())
    }

    /// Queues `items` as messages `wrap(run)`, one per run of [`chunk_by_size`] within
    /// `budget` (one message when the list fits; an empty list is one empty message). Returns
    /// the items too large for a frame on their own (nothing of them is queued); the caller
    /// decides what that means.
    pub async fn feed_list<T: Serialize, M: Serialize>(
        &mut self,
        items: Vec<T>,
        budget: usize,
        wrap: impl Fn(Vec<T>) -> M,
    ) -> Result<Vec<T>, FrameError> {
        let mut unfit = Vec::new();
        for run in chunk_by_size(items, budget) {
            if let [one] = run.as_slice() {
                if !fits(one, budget) {
                    unfit.extend(run);
                    continue;
                }
            }
            self.feed(&wrap(run)).await?;
        }
        Ok(unfit)
    }

    pub async fn flush(&mut self) -> Result<(), FrameError> {
        self.io.write_all_buf(&mut self.buf).await.map_err(FrameError::Io)?;
        self.io.flush().await.map_err(FrameError::Io)
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.io
    }

    pub fn get_ref(&self) -> &W {
        &self.io
    }

    /// The stream; frames fed but not flushed are dropped.
    pub fn into_inner(self) -> W {
        self.io
    }
}

/// How many bytes `msg` encodes to, without encoding it (`None` if it cannot be encoded).
pub fn encoded_len<T: Serialize>(msg: &T) -> Option<usize> {
    postcard::experimental::serialized_size(msg).ok()
}

/// Room left in a frame for what surrounds a list (enum tags, length prefixes, other fields).
pub const LIST_BUDGET: usize = MAX_FRAME - (64 << 10);

/// Whether `item` encodes within `budget` bytes.
pub fn fits<T: Serialize>(item: &T, budget: usize) -> bool {
    encoded_len(item).is_some_and(|n| n <= budget)
}

/// Splits `items` into runs whose encodings each add up to at most `budget` bytes, in order, so
/// that a list too large for one frame goes out in several (see the module docs). An item
/// larger than `budget` on its own is a run of its own (its frame will be refused with a clear
/// error, unless the caller checks [`fits`] first). Always at least one run.
pub fn chunk_by_size<T: Serialize>(items: Vec<T>, budget: usize) -> Vec<Vec<T>> {
    let mut runs = Vec::new();
    let mut run = Vec::new();
    let mut size = 0usize;
    for item in items {
        let len = encoded_len(&item).unwrap_or(usize::MAX);
        if !run.is_empty() && size.saturating_add(len) > budget {
            runs.push(std::mem::take(&mut run));
            size = 0;
        }
        size = size.saturating_add(len);
        run.push(item);
    }
    if !run.is_empty() || runs.is_empty() {
        runs.push(run);
    }
    runs
}

/// A list as its `…Part` messages then its final message (see the module docs): every run of
/// [`chunk_by_size`] within [`LIST_BUDGET`] but the last goes through `part`, the last (empty
/// for an empty list) through `last`.
pub fn in_parts<T: Serialize, M>(
    items: Vec<T>,
    part: impl FnMut(Vec<T>) -> M,
    last: impl FnOnce(Vec<T>) -> M,
) -> Vec<M> {
    let mut runs = chunk_by_size(items, LIST_BUDGET);
    let tail = runs.pop().unwrap_or_default();
    runs.into_iter().map(part).chain(std::iter::once(last(tail))).collect()
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
    use crate::proto::{AgentMessage, Hello, Role};
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn round_trip_and_limits() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut w = FrameWriter::new(a);
        let mut r = FrameReader::new(b);
        let hello = Hello::new(Role::Agent);
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

    /// Frames fed in bulk (past the write chunk) arrive whole and in order; an oversized
    /// message is refused without disturbing the frames around it.
    #[tokio::test]
    async fn batches_and_oversized_messages() {
        let (a, b) = tokio::io::duplex(1 << 12);
        let mut w = FrameWriter::new(a);
        let mut r = FrameReader::new(b);
        let n = 20_000u32;
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(v) = r.recv::<(u32, String)>().await.unwrap() {
                got.push(v);
            }
            got
        });
        for i in 0..n {
            w.feed(&(i, format!("message {i}"))).await.unwrap();
            if i == 7 {
                let huge = (0u32, "x".repeat(MAX_FRAME + 1));
                assert!(matches!(w.feed(&huge).await, Err(FrameError::TooLarge { .. })));
            }
        }
        w.flush().await.unwrap();
        drop(w);
        let got = reader.await.unwrap();
        assert_eq!(got.len(), n as usize);
        assert!(got.iter().enumerate().all(|(i, (j, m))| *j as usize == i && *m == format!("message {i}")));
    }

    #[test]
    fn lists_split_by_encoded_size() {
        let items: Vec<String> = (0..1000).map(|i| "x".repeat(i % 50)).collect();
        let runs = chunk_by_size(items.clone(), 1000);
        assert!(runs.len() > 1);
        assert!(runs.iter().all(|r| r.iter().map(|s| s.len() + 1).sum::<usize>() <= 1000));
        assert_eq!(runs.concat(), items);
        assert_eq!(chunk_by_size(Vec::<String>::new(), 10), vec![Vec::<String>::new()]);
        let big = vec!["a".to_string(), "b".repeat(100), "c".to_string()];
        assert_eq!(
            chunk_by_size(big.clone(), 10),
            vec![vec![big[0].clone()], vec![big[1].clone()], vec![big[2].clone()]]
        );
    }

    /// The two shapes a long list goes out in: independent messages that each fit (items too
    /// large for any frame handed back), and parts followed by the final message.
    #[tokio::test]
    async fn long_lists_go_as_messages_or_parts_that_fit() {
        let items: Vec<String> = (0..3000).map(|i| format!("{i:0>600}")).collect();
        let mut with_giant = items.clone();
        with_giant.insert(1234, "x".repeat(MAX_FRAME));
        let mut w = FrameWriter::new(Vec::new());
        let unfit = w.feed_list(with_giant, LIST_BUDGET, |run| run).await.expect("fed");
        assert_eq!(unfit, vec!["x".repeat(MAX_FRAME)]);
        w.flush().await.expect("flush");
        let bytes = w.into_inner();
        let mut r = FrameReader::new(bytes.as_slice());
        let mut runs = Vec::new();
        while let Some(run) = r.recv::<Vec<String>>().await.expect("every frame fits") {
            runs.push(run);
        }
        assert!(runs.len() > 1);
        assert_eq!(runs.concat(), items);

        let parts = in_parts(items.clone(), |run| (false, run), |run| (true, run));
        assert!(
            parts.len() > 1 && parts.iter().rev().skip(1).all(|(last, _)| !last) && parts[parts.len() - 1].0
        );
        assert_eq!(parts.into_iter().flat_map(|(_, run)| run).collect::<Vec<_>>(), items);
        assert_eq!(
            in_parts(Vec::<String>::new(), |run| (false, run), |run| (true, run)),
            vec![(true, vec![])]
        );
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
            user: None,
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
