//! A UDP proxy on loopback for QUIC tests: it forwards datagrams both ways between clients
//! and one target (the master), each client through a socket of its own, and can be cut
//! (everything dropped, both ways) and healed, to make a network partition without
//! restarting anything. Plain threads, so sync and async tests can use it alike.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the proxy's threads look at the stop flag.
const POLL: Duration = Duration::from_millis(50);

#[derive(Default)]
struct Flags {
    cut: AtomicBool,
    stop: AtomicBool,
    /// QUIC Initial packets (new connection attempts) from clients while cut.
    initials: AtomicUsize,
    /// Datagrams forwarded, both ways.
    forwarded: AtomicUsize,
}

pub struct UdpProxy {
    /// Where clients send (point their `master` here).
    pub addr: SocketAddr,
    flags: Arc<Flags>,
    thread: Option<JoinHandle<()>>,
}

impl UdpProxy {
    /// Forwards to `target` from a fresh port on 127.0.0.1.
    pub fn start(target: SocketAddr) -> UdpProxy {
        let front = UdpSocket::bind("127.0.0.1:0").expect("bind the proxy");
        front.set_read_timeout(Some(POLL)).expect("read timeout");
        let addr = front.local_addr().expect("proxy address");
        let flags = Arc::new(Flags::default());
        let f = flags.clone();
        let thread = std::thread::spawn(move || front_loop(front, target, f));
        UdpProxy { addr, flags, thread: Some(thread) }
    }

    /// Drops every datagram, both ways, until [`UdpProxy::heal`].
    pub fn cut(&self) {
        self.flags.initials.store(0, Ordering::SeqCst);
        self.flags.cut.store(true, Ordering::SeqCst);
    }

    /// Forwards again.
    pub fn heal(&self) {
        self.flags.cut.store(false, Ordering::SeqCst);
    }

    /// New QUIC connection attempts (Initial packets) that clients sent since the last cut.
    pub fn initials(&self) -> usize {
        self.flags.initials.load(Ordering::SeqCst)
    }

    /// Datagrams forwarded so far, both ways.
    pub fn forwarded(&self) -> usize {
        self.flags.forwarded.load(Ordering::SeqCst)
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.flags.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn front_loop(front: UdpSocket, target: SocketAddr, flags: Arc<Flags>) {
    let mut backs: HashMap<SocketAddr, UdpSocket> = HashMap::new();
    let mut threads = Vec::new();
    let mut buf = vec![0u8; 65536];
    while !flags.stop.load(Ordering::SeqCst) {
        // Timeouts, and ICMP errors for an earlier datagram (a client gone), are not the end.
        let Ok((n, from)) = front.recv_from(&mut buf) else { continue };
        if flags.cut.load(Ordering::SeqCst) {
            // Long header (0x80) of type Initial (0x30 bits zero) in QUIC v1.
            if n > 0 && buf[0] & 0x80 != 0 && buf[0] & 0x30 == 0 {
                flags.initials.fetch_add(1, Ordering::SeqCst);
            }
            continue;
        }
        let back = match backs.entry(from) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let back = UdpSocket::bind("127.0.0.1:0").expect("bind a proxy back socket");
                back.connect(target).expect("connect to the target");
                back.set_read_timeout(Some(POLL)).expect("read timeout");
                let (b, f) = (back.try_clone().expect("clone"), front.try_clone().expect("clone"));
                let fl = flags.clone();
                threads.push(std::thread::spawn(move || back_loop(b, f, from, fl)));
                e.insert(back)
            }
        };
        if back.send(&buf[..n]).is_ok() {
            flags.forwarded.fetch_add(1, Ordering::SeqCst);
        }
    }
    for t in threads {
        let _ = t.join();
    }
}

/// Target → one client.
fn back_loop(back: UdpSocket, front: UdpSocket, client: SocketAddr, flags: Arc<Flags>) {
    let mut buf = vec![0u8; 65536];
    while !flags.stop.load(Ordering::SeqCst) {
        let Ok(n) = back.recv(&mut buf) else { continue };
        if !flags.cut.load(Ordering::SeqCst) && front.send_to(&buf[..n], client).is_ok() {
            flags.forwarded.fetch_add(1, Ordering::SeqCst);
        }
    }
}
