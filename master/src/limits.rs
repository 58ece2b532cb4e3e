//! What bounds the master's memory and shares it fairly between peers that do not trust each
//! other: per-connection outboxes bounded in bytes (a peer that does not read its stream is
//! disconnected, not buffered), connections and bulk streams per principal, and idle and total
//! timeouts on bulk streams.
//!
//! The server ([`crate::server`]) applies them; nothing here knows the core.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};

/// Default bound of a framework's (or another non-agent peer's) outbox: 8 MiB.
pub const DEFAULT_OUTBOX_BYTES: usize = 8 << 20;
/// Default bound of an agent's outbox: 64 MiB. Launch bursts go to agents as batches of
/// `RunTask`s (about 1 KiB a task): 64 MiB holds ~60,000 tasks not yet taken by a slow agent.
pub const DEFAULT_AGENT_OUTBOX_BYTES: usize = 64 << 20;
/// Default limit of connections open at once per framework or operator principal.
pub const DEFAULT_CONNECTIONS_PER_PRINCIPAL: usize = 64;
/// Default limit of bulk streams (uploads, output, files) open at once per framework or
/// operator principal.
pub const DEFAULT_STREAMS_PER_PRINCIPAL: usize = 256;
/// Default time a bulk stream may make no progress on the peer's side.
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default longest life of an upload, a fetch or an output/files read that does not follow.
pub const DEFAULT_STREAM_TOTAL_TIMEOUT: Duration = Duration::from_secs(600);

/// The server's bounds on what peers may hold of it (`agora master` flags).
#[derive(Clone, Debug)]
pub struct PeerLimits {
    /// Bytes queued for a framework (or operator) connection that it has not read yet; past
    /// them it is disconnected (`--max-outbox`).
    pub outbox_bytes: usize,
    /// The same for agents (`--max-agent-outbox`).
    pub agent_outbox_bytes: usize,
    /// Connections open at once per framework or operator principal; agents and masters are
    /// trusted and not counted (`--max-connections-per-principal`).
    pub connections_per_principal: usize,
    /// Bulk streams open at once per framework or operator principal
    /// (`--max-streams-per-principal`).
    pub streams_per_principal: usize,
    /// A bulk stream whose peer neither sends (uploads) nor takes (fetches, output, files)
    /// bytes for this long is cut (`--stream-idle-timeout`).
    pub stream_idle_timeout: Duration,
    /// An upload, fetch, or output/files read that does not follow is cut after this long
    /// (`--stream-total-timeout`).
    pub stream_total_timeout: Duration,
    /// Validations of new Wasm modules run at once (`--max-validations`).
    pub validations: usize,
}

impl Default for PeerLimits {
    fn default() -> Self {
        PeerLimits {
            outbox_bytes: DEFAULT_OUTBOX_BYTES,
            agent_outbox_bytes: DEFAULT_AGENT_OUTBOX_BYTES,
            connections_per_principal: DEFAULT_CONNECTIONS_PER_PRINCIPAL,
            streams_per_principal: DEFAULT_STREAMS_PER_PRINCIPAL,
            stream_idle_timeout: DEFAULT_STREAM_IDLE_TIMEOUT,
            stream_total_timeout: DEFAULT_STREAM_TOTAL_TIMEOUT,
            validations: crate::artifacts::DEFAULT_MAX_VALIDATIONS,
        }
    }
}

/// Counts what each principal holds open (connections, or streams), up to a limit.
#[derive(Debug, Default)]
pub struct PrincipalCounts {
    held: Mutex<HashMap<String, usize>>,
}

/// One unit a principal holds; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    counts: Arc<PrincipalCounts>,
    principal: String,
}

impl PrincipalCounts {
    /// Takes one unit for `principal` if it holds fewer than `max`; `Err` with how many it
    /// holds otherwise.
    pub fn try_take(self: &Arc<Self>, principal: &str, max: usize) -> Result<Slot, usize> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let n = held.entry(principal.to_string()).or_insert(0);
        if *n >= max {
            return Err(*n);
        }
        *n += 1;
        Ok(Slot { counts: self.clone(), principal: principal.to_string() })
    }

    /// How many units `principal` holds.
    pub fn held(&self, principal: &str) -> usize {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.get(principal).copied().unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.counts.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.principal) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.principal);
            }
        }
    }
}

/// Messages (not yet encoded) that may wait for a connection's writer per byte of its outbox
/// bound: one per 256 bytes (32,768 for the default 8 MiB). The writer encodes them into the
/// byte-bounded [`OutboxSink`]; this bound catches a core that produces faster than a
/// connection's writer encodes, for a peer that does not read, without measuring messages.
pub const OUTBOX_BYTES_PER_MESSAGE: usize = 256;

/// A channel whose sender counts the messages the receiver has not taken yet, up to `max`
/// (one atomic add per message).
pub struct CountedSender<T> {
    tx: mpsc::UnboundedSender<T>,
    queued: Arc<AtomicUsize>,
    max: usize,
    /// Set once the bound was passed: every later message is dropped.
    tripped: Arc<std::sync::atomic::AtomicBool>,
}

impl<T> Clone for CountedSender<T> {
    fn clone(&self) -> Self {
        CountedSender {
            tx: self.tx.clone(),
            queued: self.queued.clone(),
            max: self.max,
            tripped: self.tripped.clone(),
        }
    }
}

/// The receiving end of a [`CountedSender`].
pub struct CountedReceiver<T> {
    rx: mpsc::UnboundedReceiver<T>,
    queued: Arc<AtomicUsize>,
}

/// Why a [`CountedSender::send`] did not queue its message.
#[derive(Debug, PartialEq, Eq)]
pub enum SendRefused {
    /// This message would pass the bound (returned once: the channel is tripped).
    Overflow { max: usize },
    /// Tripped earlier, or the receiver is gone.
    Dropped,
}

/// A channel bounded at `max` messages waiting.
pub fn counted<T>(max: usize) -> (CountedSender<T>, CountedReceiver<T>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let tripped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    (CountedSender { tx, queued: queued.clone(), max, tripped }, CountedReceiver { rx, queued })
}

impl<T> CountedSender<T> {
    /// Queues `msg` unless the receiver has `max` waiting.
    pub fn send(&self, msg: T) -> Result<(), SendRefused> {
        if self.tripped.load(Ordering::Relaxed) {
            return Err(SendRefused::Dropped);
        }
        if self.queued.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            let first = !self.tripped.swap(true, Ordering::Relaxed);
            return Err(if first { SendRefused::Overflow { max: self.max } } else { SendRefused::Dropped });
        }
        self.tx.send(msg).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            SendRefused::Dropped
        })
    }

    /// Queues `msg` whatever the bound (a close the writer must see).
    pub fn send_always(&self, msg: T) {
        self.queued.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(msg).is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl<T> CountedReceiver<T> {
    pub async fn recv(&mut self) -> Option<T> {
        let m = self.rx.recv().await;
        if m.is_some() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
        }
        m
    }

    pub fn try_recv(&mut self) -> Option<T> {
        let m = self.rx.try_recv().ok();
        if m.is_some() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
        }
        m
    }
}

/// The writing end of a connection's outbox: an `AsyncWrite` that never waits. What is
/// written is queued for the connection's pump (which writes it to the QUIC stream as fast as
/// the peer takes it) and counted in bytes; a write that would take the queue past its bound
/// fails with [`io::ErrorKind::OutOfMemory`] instead. Counting costs one atomic add per flushed
/// batch: frames are encoded once, by the writer, and never measured again.
pub struct OutboxSink {
    tx: mpsc::UnboundedSender<Bytes>,
    queued: Arc<AtomicUsize>,
    max: usize,
}

/// The pump's end of an outbox.
pub struct OutboxPump {
    pub rx: mpsc::UnboundedReceiver<Bytes>,
    queued: Arc<AtomicUsize>,
}

/// A new outbox bounded at `max` bytes.
pub fn outbox(max: usize) -> (OutboxSink, OutboxPump) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    (OutboxSink { tx, queued: queued.clone(), max }, OutboxPump { rx, queued })
}

impl OutboxSink {
    /// Bytes queued and not yet taken by the QUIC stream.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// The bound.
    pub fn max(&self) -> usize {
        self.max
    }
}

impl OutboxPump {
    /// Says that `n` queued bytes went to the QUIC stream.
    pub fn taken(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::Relaxed);
    }
}

impl AsyncWrite for OutboxSink {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let before = self.queued.fetch_add(buf.len(), Ordering::Relaxed);
        if before + buf.len() > self.max {
            self.queued.fetch_sub(buf.len(), Ordering::Relaxed);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("outbox over {} bytes ({before} queued)", self.max),
            )));
        }
        if self.tx.send(Bytes::copy_from_slice(buf)).is_err() {
            self.queued.fetch_sub(buf.len(), Ordering::Relaxed);
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A stream cut when its peer makes no progress for `idle`, or (with a deadline) when it is
/// still going at the deadline: a read or write then fails with [`io::ErrorKind::TimedOut`].
/// Progress (any byte) restarts the idle clock, not the deadline.
pub struct Idle<T> {
    inner: T,
    idle: Duration,
    deadline: Option<Instant>,
    total: Duration,
    timer: Pin<Box<Sleep>>,
    /// Whether the timer runs (armed at the first pending poll after progress).
    armed: bool,
}

impl<T> Idle<T> {
    /// `inner` cut after `idle` without progress (`Duration::MAX`: never).
    pub fn new(inner: T, idle: Duration) -> Self {
        Idle {
            inner,
            idle,
            deadline: None,
            total: Duration::ZERO,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed: false,
        }
    }

    /// `inner` cut after `idle` without progress, or `total` from now.
    pub fn with_total(inner: T, idle: Duration, total: Duration) -> Self {
        Idle { deadline: Some(Instant::now() + total), total, ..Self::new(inner, idle) }
    }

    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    pub fn into_inner(self) -> T {
        self.inner
    }

    fn past_deadline(&self) -> Option<io::Error> {
        let late = self.deadline.is_some_and(|d| Instant::now() >= d);
        late.then(|| {
            io::Error::new(io::ErrorKind::TimedOut, format!("the stream lasted longer than {:?}", self.total))
        })
    }

    /// After a ready poll: progress, unless the deadline has passed.
    fn progress<R>(&mut self, r: io::Result<R>) -> Poll<io::Result<R>> {
        self.armed = false;
        match (self.past_deadline(), r) {
            (Some(e), Ok(_)) => Poll::Ready(Err(e)),
            (_, r) => Poll::Ready(r),
        }
    }

    /// After a pending poll: fails once the peer has been idle too long, or at the deadline.
    fn check(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        if !self.armed {
            // No idle bound that fits in an `Instant` and no deadline: never cut.
            let at = match (Instant::now().checked_add(self.idle), self.deadline) {
                (Some(a), Some(d)) => a.min(d),
                (Some(a), None) => a,
                (None, Some(d)) => d,
                (None, None) => return Poll::Pending,
            };
            self.armed = true;
            self.timer.as_mut().reset(at);
        }
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(self.past_deadline().unwrap_or_else(|| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the peer made no progress for {:?}", self.idle),
                )
            })),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Idle<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => this.progress(r),
            Poll::Pending => this.check(cx).map(Err),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Idle<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(r) => this.progress(r),
            Poll::Pending => this.check(cx).map(Err),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Ready(r) => this.progress(r),
            Poll::Pending => this.check(cx).map(Err),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn a_principal_gets_at_most_its_limit_and_slots_come_back() {
        let counts = Arc::new(PrincipalCounts::default());
        let a = counts.try_take("alice", 2).expect("first");
        let _b = counts.try_take("alice", 2).expect("second");
        assert_eq!(counts.try_take("alice", 2).err(), Some(2));
        let _c = counts.try_take("bob", 2).expect("another principal");
        drop(a);
        assert!(counts.try_take("alice", 2).is_ok());
    }

    #[tokio::test]
    async fn an_outbox_refuses_bytes_past_its_bound_and_counts_what_is_taken() {
        let (mut sink, mut pump) = outbox(10);
        sink.write_all(b"12345678").await.expect("fits");
        assert_eq!(sink.queued(), 8);
        assert_eq!(sink.write_all(b"abc").await.expect_err("over").kind(), io::ErrorKind::OutOfMemory);
        let Some(b) = pump.rx.recv().await else { panic!("queued bytes") };
        pump.taken(b.len());
        sink.write_all(b"abc").await.expect("room again");
    }

    #[test]
    fn a_counted_channel_trips_once_past_its_bound() {
        let (tx, mut rx) = counted(2);
        tx.send(1).expect("1");
        tx.send(2).expect("2");
        assert_eq!(tx.send(3), Err(SendRefused::Overflow { max: 2 }));
        assert_eq!(rx.try_recv(), Some(1));
        assert_eq!(tx.send(4), Err(SendRefused::Dropped), "tripped for good");
    }

    #[tokio::test]
    async fn an_idle_reader_times_out_and_progress_restarts_the_clock() {
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut idle = Idle::new(rx, Duration::from_millis(100));
        let mut buf = [0u8; 4];
        tx.write_all(b"ab").await.expect("write");
        assert_eq!(idle.read(&mut buf).await.expect("data"), 2);
        let err = idle.read(&mut buf).await.expect_err("idle");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("no progress"), "{err}");
    }

    #[tokio::test]
    async fn a_trickling_reader_is_cut_at_its_deadline() {
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut idle = Idle::with_total(rx, Duration::from_millis(500), Duration::from_millis(300));
        let mut buf = [0u8; 4];
        let err = loop {
            tx.write_all(b"a").await.expect("write");
            match idle.read(&mut buf).await {
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("longer than"), "{err}");
    }
}
