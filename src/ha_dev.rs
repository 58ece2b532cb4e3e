//! `agora dev --masters 3`: an etcd on loopback, three `agora master --etcd` processes (one
//! leads, two stand by) and the agents in this process, registering with the list of three.
//!
//! The masters are child processes of `agora dev` (this same binary): leader election lives in
//! `agora master --etcd URLS --cluster-name NAME`, and a master that loses its lease steps down
//! as a whole process, which an embedded master sharing this process could not do cleanly.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use agora_sdk::config::ClientConfig;
use anyhow::Context;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cluster::{spawn_agents, write_client_configs, ClusterSpec};

/// The etcd cluster name the dev masters share.
pub const CLUSTER_NAME: &str = "agora-dev";
/// How long etcd and the masters have to come up, and the agents to register.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `agora dev --masters N`.
pub struct HaCluster {
    /// The masters' addresses, in start order.
    pub masters: Vec<SocketAddr>,
    /// The client.toml written (all masters listed).
    pub client_path: PathBuf,
    /// Cancels the agents.
    pub shutdown: CancellationToken,
    agents: Vec<JoinHandle<()>>,
    master_procs: Vec<Child>,
    etcd: Child,
}

/// The `etcd` on the PATH, or an error naming the package that has it.
fn find_etcd() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
        .context("agora dev --masters 3 needs etcd on the PATH for leader election (Debian/Ubuntu: `apt-get install etcd-server`)")
}

/// A free loopback TCP port (bound, then released for the child to take).
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free loopback port")?;
    Ok(l.local_addr()?.port())
}

/// A child whose stdout and stderr go to `log` in the dev dir; killed if dropped.
fn spawn_logged(cmd: &mut Command, log: &Path, stdout_piped: bool) -> anyhow::Result<Child> {
    let file = std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let out = if stdout_piped { Stdio::piped() } else { Stdio::from(file.try_clone()?) };
    cmd.stdin(Stdio::null()).stdout(out).stderr(Stdio::from(file)).kill_on_drop(true);
    Ok(cmd.spawn()?)
}

impl HaCluster {
    /// Starts etcd, `n` masters (`master_args` added to each: the dev's allocation and
    /// liveness flags) and the agents; returns once every agent has registered with the
    /// leader, client.toml written.
    pub async fn start(spec: ClusterSpec, n: usize, master_args: Vec<String>) -> anyhow::Result<HaCluster> {
        let etcd_bin = find_etcd()?;
        let dir = &spec.dir;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let dir = dir.canonicalize().with_context(|| format!("cannot resolve {}", dir.display()))?;
        let tls_dir = dir.join("tls");
        if !tls_dir.join("ca.pem").exists() {
            agora_sdk::tls::init(&tls_dir, "default", false)?;
        }
        let (client_port, peer_port) = (free_port()?, free_port()?);
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd = spawn_logged(
            Command::new(&etcd_bin)
                .arg("--name")
                .arg(CLUSTER_NAME)
                .arg("--data-dir")
                .arg(dir.join("etcd"))
                .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
                .arg("--initial-cluster")
                .arg(format!("{CLUSTER_NAME}={peer_url}")),
            &dir.join("etcd.log"),
            false,
        )
        .with_context(|| format!("cannot start {}", etcd_bin.display()))?;
        let deadline = Instant::now() + START_TIMEOUT;
        while tokio::net::TcpStream::connect(("127.0.0.1", client_port)).await.is_err() {
            if let Some(st) = etcd.try_wait()? {
                anyhow::bail!("etcd exited ({st}); see {}", dir.join("etcd.log").display());
            }
            if Instant::now() > deadline {
                anyhow::bail!("etcd did not listen on {client_url} within {START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let exe = std::env::current_exe().context("cannot find the agora binary to start masters")?;
        let mut master_procs = Vec::new();
        let mut masters = Vec::new();
        for i in 0..n {
            // The given port and the next ones; port 0: each its own free port.
            let mut listen = spec.listen;
            if listen.port() != 0 {
                let port = u16::try_from(usize::from(listen.port()) + i).context("--listen port too high")?;
                listen.set_port(port);
            }
            let log = dir.join(format!("master-{i}.log"));
            let mut child = spawn_logged(
                Command::new(&exe)
                    .arg("master")
                    .arg("--listen")
                    .arg(listen.to_string())
                    .arg("--tls-dir")
                    .arg(&tls_dir)
                    .arg("--work-dir")
                    .arg(dir.join(format!("master-{i}")))
                    .args(["--etcd", &client_url, "--cluster-name", CLUSTER_NAME])
                    .args(&master_args),
                &log,
                true,
            )?;
            let addr = listening_on(&mut child, deadline)
                .await
                .with_context(|| format!("master {i} did not start; see {}", log.display()))?;
            masters.push(addr);
            master_procs.push(child);
        }
        let list = masters.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
        let shutdown = CancellationToken::new();
        let agents = spawn_agents(&spec, &dir, &tls_dir, &list, &shutdown);
        let client = ClientConfig::from_tls_dir(&list, &tls_dir);
        let cluster =
            HaCluster { masters, client_path: dir.join("client.toml"), shutdown, agents, master_procs, etcd };
        if let Err(e) = wait_agents(&client, spec.agents, deadline).await {
            cluster.stop().await;
            return Err(e);
        }
        write_client_configs(&client, &dir)?;
        Ok(cluster)
    }

    /// Stops the agents (killing their tasks), then the masters, then etcd.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        for a in self.agents.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(10), a).await;
        }
        for child in self.master_procs.iter_mut().chain(std::iter::once(&mut self.etcd)) {
            terminate(child).await;
        }
    }
}

/// SIGTERM, then SIGKILL after 10 s.
async fn terminate(child: &mut Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on our own child, which has not been reaped (id() is Some).
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// The address a started `agora master` prints on stdout.
async fn listening_on(child: &mut Child, deadline: Instant) -> anyhow::Result<SocketAddr> {
    let out = child.stdout.take().context("no stdout")?;
    let mut lines = tokio::io::BufReader::new(out).lines();
    let found = tokio::time::timeout_at(deadline.into(), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(rest) = line.strip_prefix("agora master listening on ") {
                let addr = rest.split_whitespace().next().unwrap_or_default();
                return Ok(Some(addr.parse::<SocketAddr>()?));
            }
        }
        anyhow::Ok(None)
    })
    .await;
    // Keep draining stdout so that the master never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    match found {
        Ok(Ok(Some(addr))) => Ok(addr),
        Ok(Ok(None)) => match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
            Ok(Ok(st)) => anyhow::bail!("it exited before listening ({st})"),
            _ => anyhow::bail!("it closed its stdout before listening"),
        },
        Ok(Err(e)) => Err(e),
        Err(_) => anyhow::bail!("it did not listen within {START_TIMEOUT:?}"),
    }
}

/// Waits until `n` agents are active at the leader.
async fn wait_agents(client: &ClientConfig, n: usize, deadline: Instant) -> anyhow::Result<()> {
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        match agora_sdk::client::OperatorClient::connect(client).await {
            Ok(mut c) => {
                let agents = c.agents().await;
                c.close();
                match agents {
                    Ok(a)
                        if a.iter().filter(|a| a.status == agora_sdk::AgentViewStatus::Active).count()
                            >= n =>
                    {
                        return Ok(())
                    }
                    Ok(a) => last = format!("{} of {n} agents registered", a.len()),
                    Err(e) => last = e.to_string(),
                }
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the cluster did not come up within {START_TIMEOUT:?}: {last}")
}
