//! `agora dev` as a separate process, and the client commands against it, exactly as a user
//! types them.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const AGORA: &str = env!("CARGO_BIN_EXE_agora");

pub struct Dev {
    child: Child,
    /// client.toml: the framework certificate only (its own principal's tasks).
    pub config: PathBuf,
    /// operator.toml: with the operator certificate (every operator call).
    pub operator: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Dev {
    /// One agent with `resources`.
    pub fn start(resources: &str) -> Dev {
        Self::start_with(&["--agents", "1", "--resources", resources])
    }

    /// `agora dev` with these extra arguments (on loopback, fast allocation).
    pub fn start_with(args: &[&str]) -> Dev {
        let dir = tempfile::tempdir().expect("tempdir");
        let child = Command::new(AGORA)
            .args(["dev", "--listen", "127.0.0.1:0", "--allocation-interval", "200ms"])
            .args(args)
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn agora dev");
        let config = dir.path().join("client.toml");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !config.exists() {
            assert!(Instant::now() < deadline, "agora dev did not write client.toml");
            std::thread::sleep(Duration::from_millis(20));
        }
        let operator = dir.path().join("operator.toml");
        Dev { child, config, operator, dir }
    }

    pub fn agora(&self, args: &[&str]) -> Output {
        Command::new(AGORA)
            .args(args)
            .env("AGORA_CONFIG", &self.config)
            .stdin(Stdio::null())
            .output()
            .expect("run agora")
    }

    pub fn tasks_json(&self) -> Vec<serde_json::Value> {
        let out = self.agora(&["tasks", "-o", "json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).expect("json array")
    }

    pub fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return st;
            }
            assert!(Instant::now() < deadline, "agora dev did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `f` every 20 ms until it gives a value, failing the test after `secs` seconds.
pub fn poll<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {secs} s waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A process this test started: stdout and stderr go to files, and it is stopped (SIGTERM,
/// then SIGKILL) when dropped, so that a failing test leaves nothing behind.
pub struct Proc {
    child: Child,
    pub name: String,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with its output in `dir/NAME.stdout` and `dir/NAME.stderr`.
    pub fn spawn(name: &str, dir: &std::path::Path, cmd: &mut Command) -> Proc {
        let stdout = dir.join(format!("{name}.stdout"));
        let stderr = dir.join(format!("{name}.stderr"));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc { child, name: name.into(), stdout, stderr }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until the process prints a line on stdout that `f` picks (30 s).
    pub fn wait_stdout<T>(&mut self, what: &str, f: impl Fn(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(v) = self.stdout_text().lines().find_map(&f) {
                return v;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("{} exited ({st}) before {what}; stderr: {}", self.name, self.stderr_text());
            }
            assert!(Instant::now() < deadline, "{} did not print {what}: {}", self.name, self.stderr_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Spawns an `agora master` made by `cmd` and waits for the address it listens on. A fixed
    /// address taken for a moment by another test's socket (a port is free for anyone between a
    /// master's exit and its restart there) is tried again, for up to 10 s.
    pub fn spawn_master(
        name: &str,
        dir: &std::path::Path,
        mut cmd: impl FnMut() -> Command,
    ) -> (Proc, String) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut p = Proc::spawn(name, dir, &mut cmd());
            let addr = loop {
                if let Some(a) = p.stdout_text().lines().find_map(|l| {
                    Some(l.strip_prefix("agora master listening on ")?.split_whitespace().next()?.to_string())
                }) {
                    break Some(a);
                }
                if let Ok(Some(_)) = p.child.try_wait() {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            match addr {
                Some(addr) => return (p, addr),
                None if p.stderr_text().contains("Address already in use") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                None => panic!("{name} exited before its address; stderr: {}", p.stderr_text()),
            }
        }
    }

    /// Waits for the process to exit on its own (`secs` seconds).
    pub fn wait(&mut self, secs: u64) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return st;
            }
            assert!(Instant::now() < deadline, "{} did not exit within {secs} s", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL (`kill -9`), and its exit status.
    pub fn kill9(&mut self) -> std::process::ExitStatus {
        if let Ok(Some(st)) = self.child.try_wait() {
            return st;
        }
        let _ = self.child.kill();
        self.child.wait().expect("wait")
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, and its exit status (SIGKILL after 20 s, failing the test).
    pub fn stop(&mut self) -> std::process::ExitStatus {
        if let Ok(Some(st)) = self.child.try_wait() {
            return st;
        }
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("{} did not stop on SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `GET path` over HTTP/1.0 (no chunked body): the status line and the body.
/// `--recovery-timeout 30s` unless the test sets its own: executors of an agent a test stops
/// without killing its tasks end them after that instead of the default 15 minutes.
fn recovery_timeout(agent_args: &[&str]) -> Vec<&'static str> {
    if agent_args.iter().any(|a| a.starts_with("--recovery-timeout")) {
        Vec::new()
    } else {
        vec!["--recovery-timeout", "30s"]
    }
}

pub fn http_get(addr: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to --http");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes()).expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("http response");
    (head.lines().next().unwrap_or_default().to_string(), body.to_string())
}

/// Runs `agora ARGS` with this client.toml.
pub fn agora_with(config: &std::path::Path, args: &[&str]) -> Output {
    Command::new(AGORA)
        .args(args)
        .env("AGORA_CONFIG", config)
        .stdin(Stdio::null())
        .output()
        .expect("run agora")
}

/// The framework identity of a client.toml, for an SDK scheduler in role `role`.
pub fn driver_config(config: &std::path::Path, name: &str, role: &str) -> agora_sdk::scheduler::DriverConfig {
    let cfg = agora_sdk::config::ClientConfig::load(config).expect("client.toml");
    let tls = cfg.identity(agora_sdk::proto::Role::Framework).expect("framework identity");
    let mut d = agora_sdk::scheduler::DriverConfig::new(cfg.master.clone(), tls, name);
    d.framework.role = role.into();
    d.framework.failover_timeout = Duration::from_secs(30);
    d
}

/// The README's real cluster: `agora master` and `agora agent` as separate processes, their
/// certificates from `agora tls init`, and a client.toml written by hand.
pub struct RealCluster {
    pub agent: Option<Proc>,
    pub master: Proc,
    /// host:port of the master (QUIC).
    pub addr: String,
    /// host:port of `--http`, when the master was given one.
    pub http: Option<String>,
    pub config: PathBuf,
    pub tls: PathBuf,
    pub work: PathBuf,
    pub dir: tempfile::TempDir,
}

impl RealCluster {
    /// `agora tls init` in a fresh directory that the task user can pass through.
    pub fn prepare() -> tempfile::TempDir {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        // The agent refuses a work dir below a directory that others cannot pass.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).expect("chmod");
        let out = Command::new(AGORA).args(["tls", "init", "--dir"]).arg(dir.path().join("tls")).output();
        let out = out.expect("tls init");
        assert!(out.status.success(), "tls init: {out:?}");
        dir
    }

    /// A master (`--listen 127.0.0.1:0` plus `master_args`) and one agent (`agent_args`, which
    /// must include `--resources`), registered.
    pub fn start(master_args: &[&str], agent_args: &[&str]) -> RealCluster {
        let mut c = Self::master_only(Self::prepare(), master_args);
        c.start_agent(agent_args);
        c
    }

    pub fn master_only(dir: tempfile::TempDir, master_args: &[&str]) -> RealCluster {
        Self::master_on(dir, "127.0.0.1:0", master_args)
    }

    /// A master listening on `listen` (no agent yet).
    pub fn master_on(dir: tempfile::TempDir, listen: &str, master_args: &[&str]) -> RealCluster {
        let tls = dir.path().join("tls");
        let (mut master, addr) = Proc::spawn_master("master", dir.path(), || {
            let mut c = Command::new(AGORA);
            c.args(["master", "--listen", listen, "--tls-dir"]).arg(&tls).args(master_args);
            c
        });
        let http = if master_args.contains(&"--http") {
            Some(master.wait_stdout("its HTTP address", |l| {
                Some(l.strip_prefix("HTTP: http://")?.split('/').next()?.to_string())
            }))
        } else {
            None
        };
        // client.toml by hand, as the README describes it (paths relative to the file).
        let config = dir.path().join("client.toml");
        std::fs::write(
            &config,
            format!(
                "master = \"{addr}\"\nca = \"tls/ca.pem\"\n[operator]\ncert = \"tls/operator.pem\"\n\
                 key = \"tls/operator-key.pem\"\n[framework]\ncert = \"tls/framework.pem\"\n\
                 key = \"tls/framework-key.pem\"\n"
            ),
        )
        .expect("write client.toml");
        let work = dir.path().join("work");
        RealCluster { agent: None, master, addr, http, config, tls, work, dir }
    }

    pub fn start_agent(&mut self, agent_args: &[&str]) {
        self.start_agent_via(Command::new(AGORA), agent_args)
    }

    /// Starts the agent inside the network namespace `netns` (`ip netns exec`).
    pub fn start_agent_in_netns(&mut self, netns: &str, agent_args: &[&str]) {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns, AGORA]);
        self.start_agent_via(cmd, agent_args)
    }

    /// Kills the master with SIGKILL and starts a new one on the same address with
    /// `master_args` (give it the same `--work-dir` to keep its registry).
    pub fn kill9_and_restart_master(&mut self, master_args: &[&str]) {
        let st = self.master.kill9();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(libc::SIGKILL), "{st}");
        let (master, addr) = Proc::spawn_master("master-restarted", self.dir.path(), || {
            let mut c = Command::new(AGORA);
            c.args(["master", "--listen", &self.addr, "--tls-dir"]).arg(&self.tls).args(master_args);
            c
        });
        self.master = master;
        assert_eq!(addr, self.addr);
    }

    fn start_agent_via(&mut self, mut cmd: Command, agent_args: &[&str]) {
        let agent = Proc::spawn(
            "agent",
            self.dir.path(),
            cmd.args(["agent", "--master", &self.addr, "--tls-dir"])
                .arg(&self.tls)
                .arg("--work-dir")
                .arg(&self.work)
                .args(["--kill-grace", "500ms"])
                .args(recovery_timeout(agent_args))
                .args(agent_args),
        );
        self.agent = Some(agent);
        poll("the agent to register", 30, || {
            let out = self.agora(&["agents", "-o", "json"]);
            let agents: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).ok()?;
            if agents.len() == 1 {
                return Some(());
            }
            if let Some(Ok(Some(st))) = self.agent.as_mut().map(|a| a.child.try_wait()) {
                panic!(
                    "the agent exited ({st}): {}",
                    self.agent.as_ref().map(Proc::stderr_text).unwrap_or_default()
                );
            }
            None
        });
    }

    pub fn agora(&self, args: &[&str]) -> Output {
        agora_with(&self.config, args)
    }

    /// SIGKILLs the agent (its executors and tasks are left as a crash leaves them) and waits
    /// for it to be gone.
    pub fn kill_agent(&mut self) {
        let mut a = self.agent.take().expect("a running agent");
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(a.pid() as i32, libc::SIGKILL) };
        let st = a.wait(10);
        assert!(!st.success(), "the agent survived SIGKILL: {st}");
    }

    /// Runs `agora agent` with this cluster's work dir and `agent_args` until it exits
    /// (`secs` at most): its status and stderr (for an agent that must refuse to start).
    pub fn agent_refusing(&self, agent_args: &[&str], secs: u64) -> (std::process::ExitStatus, String) {
        let mut p = Proc::spawn(
            "agent-refusing",
            self.dir.path(),
            Command::new(AGORA)
                .args(["agent", "--master", &self.addr, "--tls-dir"])
                .arg(&self.tls)
                .arg("--work-dir")
                .arg(&self.work)
                .args(agent_args),
        );
        let st = p.wait(secs);
        (st, p.stderr_text())
    }

    /// A client.toml like this cluster's, naming `master` (e.g. a proxy) instead.
    pub fn config_via(&self, name: &str, master: &str) -> PathBuf {
        let text = std::fs::read_to_string(&self.config).expect("client.toml");
        let text = text.replace(&format!("master = \"{}\"", self.addr), &format!("master = \"{master}\""));
        assert!(text.contains(master), "client.toml names no master: {text}");
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write client.toml");
        path
    }

    /// An SDK framework of role `*` with this cluster's client.toml.
    pub fn framework_config(&self, name: &str) -> agora_sdk::scheduler::DriverConfig {
        driver_config(&self.config, name, "*")
    }

    pub fn tasks_json(&self) -> Vec<serde_json::Value> {
        let out = self.agora(&["tasks", "-o", "json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("json array")
    }

    /// Agent first (it leaves running tasks behind by design: kill them before), then master.
    pub fn stop(mut self) {
        if let Some(mut a) = self.agent.take() {
            let st = a.stop();
            assert!(st.success(), "agora agent exited with {st}: {}", a.stderr_text());
        }
        let st = self.master.stop();
        assert!(st.success(), "agora master exited with {st}: {}", self.master.stderr_text());
    }
}

impl Dev {
    /// The SDK identity of this dev cluster's client.toml, as a framework of `role`.
    pub fn driver_config(&self, name: &str, role: &str) -> agora_sdk::scheduler::DriverConfig {
        driver_config(&self.config, name, role)
    }
}

impl Dev {
    /// Reads `agora dev`'s stdout until a line starting with `prefix`; the rest of that line.
    pub fn stdout_line(&mut self, prefix: &str) -> String {
        use std::io::BufRead;
        let out = self.child.stdout.as_mut().expect("agora dev's stdout");
        let mut r = std::io::BufReader::new(out);
        let mut line = String::new();
        loop {
            line.clear();
            let n = r.read_line(&mut line).expect("read agora dev's stdout");
            assert!(n > 0, "agora dev closed stdout before printing `{prefix}`");
            if let Some(rest) = line.strip_prefix(prefix) {
                return rest.trim_end().to_string();
            }
        }
    }
}
