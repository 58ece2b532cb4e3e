//! A real etcd (Debian's `etcd-server`, `/usr/bin/etcd`) for tests: one member or a cluster on
//! free loopback ports in temporary directories, with a short Raft tick so that leases as short as a second
//! are honoured; stopped (and its directory removed) when dropped. Plus a TCP proxy on
//! loopback that can be cut, to partition one master from etcd.

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::dev::Proc;

/// The etcd binary (`AGORA_TEST_ETCD` overrides it).
pub fn etcd_binary() -> String {
    std::env::var("AGORA_TEST_ETCD").unwrap_or_else(|_| "/usr/bin/etcd".into())
}

/// A free TCP port on 127.0.0.1 (the OS picks it; released for the caller to bind).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// One running etcd member.
pub struct Etcd {
    pub proc: Proc,
    /// Its client URL, e.g. `http://127.0.0.1:40123`.
    pub url: String,
    /// Its client address.
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    /// Its command line, to start it again on the same ports and data ([`Etcd::restart`]).
    args: Vec<String>,
    restarts: u32,
}

impl Etcd {
    /// Starts a one-member etcd and waits until it serves clients (30 s).
    pub fn start() -> Etcd {
        let mut members = Self::start_cluster(1);
        members.pop().expect("one member")
    }

    /// Starts an etcd cluster of `n` members (each on its own ports and data directory) and
    /// waits until every member serves clients (30 s).
    pub fn start_cluster(n: usize) -> Vec<Etcd> {
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("member{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members: Vec<Etcd> = ports
            .iter()
            .enumerate()
            .map(|(i, &(client, peer))| {
                let dir = tempfile::tempdir().expect("tempdir");
                let url = format!("http://127.0.0.1:{client}");
                let peer_url = format!("http://127.0.0.1:{peer}");
                let data = dir.path().join("data").to_string_lossy().into_owned();
                let args: Vec<String> = [
                    "--name",
                    &format!("member{i}"),
                    "--data-dir",
                    &data,
                    "--listen-client-urls",
                    &url,
                    "--advertise-client-urls",
                    &url,
                    "--listen-peer-urls",
                    &peer_url,
                    "--initial-advertise-peer-urls",
                    &peer_url,
                    "--initial-cluster",
                    &initial,
                    // 10 ms ticks: etcd's shortest lease is 1.5 election timeouts (here 150 ms),
                    // so a 1 s lease stays 1 s.
                    "--heartbeat-interval",
                    "10",
                    "--election-timeout",
                    "100",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                let proc =
                    Proc::spawn(&format!("etcd{i}"), dir.path(), Command::new(etcd_binary()).args(&args));
                Etcd {
                    proc,
                    url,
                    addr: format!("127.0.0.1:{client}").parse().expect("addr"),
                    dir,
                    args,
                    restarts: 0,
                }
            })
            .collect();
        for m in &mut members {
            m.wait_ready();
        }
        members
    }

    /// The client URLs of `members`, comma-separated (as `--etcd` takes them).
    pub fn urls(members: &[Etcd]) -> String {
        members.iter().map(|m| m.url.as_str()).collect::<Vec<_>>().join(",")
    }

    /// Whether this member is the etcd cluster's Raft leader (its maintenance status, through
    /// etcd's JSON gateway).
    pub fn is_raft_leader(&self) -> bool {
        use std::io::{Read, Write};
        let mut conn = TcpStream::connect(self.addr).expect("connect to etcd");
        conn.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let body = "{}";
        write!(
            conn,
            "POST /v3/maintenance/status HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("send the status request");
        let mut text = String::new();
        conn.read_to_string(&mut text).expect("read the status");
        let json = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
        let v: serde_json::Value =
            serde_json::from_str(json).unwrap_or_else(|e| panic!("etcd status {text}: {e}"));
        let member = v["header"]["member_id"].as_str().expect("member_id");
        v["leader"].as_str().expect("leader") == member
    }

    /// `kill -9` of this member.
    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    /// Starts this member again on its ports and data directory (after [`Etcd::kill9`]) and
    /// waits until it serves clients.
    pub fn restart(&mut self) {
        self.proc.kill9();
        self.restarts += 1;
        let name = format!("{}-again{}", self.proc.name, self.restarts);
        self.proc = Proc::spawn(&name, self.dir.path(), Command::new(etcd_binary()).args(&self.args));
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.proc.stderr_text().contains("ready to serve client requests") {
            assert!(self.proc.running(), "etcd exited: {}", self.proc.stderr_text());
            assert!(Instant::now() < deadline, "etcd did not start: {}", self.proc.stderr_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A TCP proxy on loopback to one target; [`TcpProxy::cut`] closes every connection through
/// it and refuses new ones until [`TcpProxy::heal`]. Plain threads.
pub struct TcpProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl TcpProxy {
    /// Forwards to `target` from a fresh port on 127.0.0.1.
    pub fn start(target: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("proxy address");
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(Mutex::new(Vec::new()));
        let (c, s, o) = (cut.clone(), stop.clone(), open.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        if c.load(Ordering::SeqCst) {
                            drop(client);
                            continue;
                        }
                        let Ok(upstream) = TcpStream::connect(target) else { continue };
                        let mut open = o.lock().expect("lock");
                        for s in [&client, &upstream] {
                            if let Ok(s) = s.try_clone() {
                                open.push(s);
                            }
                        }
                        pipe(&client, &upstream);
                        pipe(&upstream, &client);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        TcpProxy { addr, cut, stop, open }
    }

    /// The URL to give an etcd client.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in self.open.lock().expect("lock").drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Accepts connections again.
    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cut();
    }
}

/// Copies `from` → `to` in a thread until either side closes.
fn pipe(from: &TcpStream, to: &TcpStream) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else { return };
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}
