//! `agora dev` as a separate process, and the client commands against it, exactly as a user
//! types them.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const AGORA: &str = env!("CARGO_BIN_EXE_agora");

pub struct Dev {
    child: Child,
    pub config: PathBuf,
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
        Dev { child, config, dir }
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
