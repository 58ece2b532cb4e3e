//! The master under test: a child process running this example in its hidden `--serve-master`
//! mode (so that `/proc/<pid>` measures the master alone), or, for the smoke test, a master
//! spawned in this process. Either can be stopped and started again on the same address from
//! the same registry (`<work_dir>/registry.redb`).

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use agora_master::core::MasterConfig;
use agora_master::server::{self, ServerConfig};
use agora_sdk::tls::TlsFiles;
use tokio_util::sync::CancellationToken;

/// The line the serving child prints once it listens, followed by its address.
const LISTENING: &str = "LISTENING ";

/// Why the master could not be started or measured.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error("cannot start the master child process: {0}")]
    Spawn(std::io::Error),
    #[error("the master child ended before it listened: {0}")]
    NoAddress(String),
    #[error("cannot start the master: {0}")]
    Server(#[from] server::ServerError),
}

/// What the master is started with.
#[derive(Clone, Debug)]
pub struct MasterSpec {
    /// `<tls>/master.pem`, … as `agora tls init` writes them.
    pub tls: PathBuf,
    /// The master's work dir (its redb registry survives a restart).
    pub work_dir: PathBuf,
    /// Told to agents: they heartbeat this often.
    pub heartbeat: Duration,
}

impl MasterSpec {
    fn config(&self, listen: SocketAddr) -> ServerConfig {
        ServerConfig {
            listen,
            tls: TlsFiles::in_dir(&self.tls, "master"),
            core: MasterConfig { agent_heartbeat_interval: self.heartbeat, ..MasterConfig::default() },
            allocator: "drf".into(),
            work_dir: self.work_dir.clone(),
            max_artifact_size: agora_master::artifacts::DEFAULT_MAX_ARTIFACT_SIZE,
            eviction: agora_master::artifacts::EvictionConfig::default(),
            limits: Default::default(),
        }
    }
}

/// A running master.
pub enum MasterProc {
    /// This example re-executed with `--serve-master`.
    Child { child: Child, addr: SocketAddr },
    /// In this process (the smoke test): its figures include the generator's.
    InProcess { shutdown: CancellationToken, addr: SocketAddr },
}

impl MasterProc {
    /// Starts a master on `listen` (port 0: a free one).
    pub async fn start(spec: &MasterSpec, listen: SocketAddr, child: bool) -> Result<Self, MasterError> {
        if child {
            return Self::start_child(spec, listen);
        }
        // After a stop, the previous master may still hold the registry for a moment.
        let mut tries = 0;
        loop {
            let shutdown = CancellationToken::new();
            match server::spawn(spec.config(listen), shutdown.clone()) {
                Ok(handle) => return Ok(MasterProc::InProcess { shutdown, addr: handle.addr }),
                Err(e) if tries < 100 => {
                    tries += 1;
                    tracing::debug!(error = %e, "master not started yet; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn start_child(spec: &MasterSpec, listen: SocketAddr) -> Result<Self, MasterError> {
        let exe = std::env::current_exe().map_err(MasterError::Spawn)?;
        let mut child = Command::new(exe)
            .arg("--serve-master")
            .arg(listen.to_string())
            .arg(&spec.tls)
            .arg(&spec.work_dir)
            .arg(spec.heartbeat.as_millis().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(MasterError::Spawn)?;
        let stdout = child.stdout.take().ok_or_else(|| MasterError::NoAddress("no stdout".into()))?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map_err(MasterError::Spawn)?;
        let addr = line
            .strip_prefix(LISTENING)
            .and_then(|a| a.trim().parse().ok())
            .ok_or_else(|| MasterError::NoAddress(format!("first line `{}`", line.trim())))?;
        Ok(MasterProc::Child { child, addr })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        match self {
            MasterProc::Child { addr, .. } | MasterProc::InProcess { addr, .. } => *addr,
        }
    }

    /// The process to measure.
    pub fn pid(&self) -> u32 {
        match self {
            MasterProc::Child { child, .. } => child.id(),
            MasterProc::InProcess { .. } => std::process::id(),
        }
    }

    /// Stops it the hard way (SIGKILL: a crash) or, in process, by cancelling it.
    pub fn kill(self) {
        match self {
            MasterProc::Child { mut child, .. } => {
                let _ = child.kill();
                let _ = child.wait();
            }
            MasterProc::InProcess { shutdown, .. } => shutdown.cancel(),
        }
    }
}

/// The hidden `--serve-master LISTEN TLS_DIR WORK_DIR HEARTBEAT_MS` mode: serves until killed.
pub fn serve(args: &[String]) -> anyhow::Result<()> {
    let [listen, tls, work_dir, heartbeat] = args else {
        anyhow::bail!("usage: --serve-master LISTEN TLS_DIR WORK_DIR HEARTBEAT_MS");
    };
    let spec = MasterSpec {
        tls: tls.into(),
        work_dir: work_dir.into(),
        heartbeat: Duration::from_millis(heartbeat.parse()?),
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let handle = server::spawn(spec.config(listen.parse()?), CancellationToken::new())?;
        println!("{LISTENING}{}", handle.addr);
        let reason = handle.failed().await;
        anyhow::bail!("the master failed: {reason}")
    })
}

/// Resident memory of a process (`VmRSS`), in bytes.
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// CPU time a process used so far (user + system, `/proc/<pid>/stat`).
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces: split what follows its closing parenthesis,
    // where field 3 (the state) is at index 0, so utime (field 14) at 11 and stime at 12.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    let ticks = field(11) + field(12);
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

/// A dir for the run's certificates and the master's work dir.
pub fn prepare(dir: &Path) -> anyhow::Result<MasterSpec> {
    let tls = dir.join("tls");
    agora_sdk::tls::init(&tls, "swarm", false)?;
    Ok(MasterSpec { tls, work_dir: dir.join("master"), heartbeat: Duration::from_secs(1) })
}
