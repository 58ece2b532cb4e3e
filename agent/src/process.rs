//! Low-level child process handling: wait for a child's exit *without* reaping it (so its pid,
//! which is also its process-group id, cannot be reused while we may still signal the group),
//! signal its whole process group, then reap it with `wait4` to get the exit status and resource
//! usage.
//!
//! Exit is detected with a pidfd registered in tokio's reactor (Linux ≥ 5.3); where pidfds are
//! unavailable a small dedicated thread blocks in `waitid(WNOWAIT)` instead (not the tokio
//! blocking pool, which a thousand long-running tasks would exhaust).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use agora_sdk::proto::Usage;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// How a reaped process ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Terminating signal, if a signal killed it.
    pub signal: Option<i32>,
    /// CPU time and peak memory from `wait4`'s rusage.
    pub usage: Usage,
}

/// A spawned child that this module waits for and reaps (never `std::process::Child::wait`).
#[derive(Debug)]
pub struct ChildProcess {
    pid: libc::pid_t,
    reaped: bool,
}

impl ChildProcess {
    /// Takes over a child spawned with [`std::process::Command`] in its own process group
    /// (`process_group(0)`), so that its pid is its process-group id.
    pub fn adopt(child: std::process::Child) -> io::Result<Self> {
        let pid = libc::pid_t::try_from(child.id())
            .map_err(|_| io::Error::other(format!("pid {} out of range", child.id())))?;
        // Dropping a std Child neither waits nor kills: the pid stays ours to reap.
        drop(child);
        Ok(Self { pid, reaped: false })
    }

    /// Takes over child `pid`, spawned by this process in its own process group (its pid is its
    /// process-group id) with `SIGCHLD` as its exit signal, and not waited for yet.
    pub(crate) fn from_pid(pid: libc::pid_t) -> Self {
        Self { pid, reaped: false }
    }

    /// The child's pid (and process-group id).
    pub fn pid(&self) -> u32 {
        self.pid.unsigned_abs()
    }

    /// Resolves when the child has exited; it stays a zombie until [`Self::reap`].
    pub async fn exited(&self) -> io::Result<()> {
        match pidfd_open(self.pid) {
            // SAFETY: `fd` is an open pidfd owned by the AsyncFd for its whole life.
            Ok(fd) => match unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) } {
                Ok(afd) => {
                    // A pidfd turns readable when the process exits and stays readable.
                    let _guard = afd.readable().await?;
                    return Ok(());
                }
                Err(e) => tracing::debug!(pid = self.pid, error = %e, "pidfd not pollable"),
            },
            Err(e) => tracing::debug!(pid = self.pid, error = %e, "pidfd_open unavailable"),
        }
        let pid = self.pid;
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new().name(format!("agora-wait-{pid}")).stack_size(64 * 1024).spawn(
            move || {
                let _ = tx.send(wait_exit_blocking(pid));
            },
        )?;
        rx.await.map_err(|_| io::Error::other("exit waiter thread died"))?
    }

    /// Sends `signal` to the child's whole process group. A group that is already gone is not
    /// an error. Does nothing once the child is reaped (its pid may belong to someone else).
    pub fn signal_group(&self, signal: libc::c_int) -> io::Result<()> {
        if self.reaped {
            return Ok(());
        }
        // SAFETY: killpg has no memory-safety preconditions; the group id is our unreaped
        // child's pid, so it cannot name a foreign group.
        let r = unsafe { libc::killpg(self.pid, signal) };
        if r == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ESRCH) {
            Ok(())
        } else {
            Err(err)
        }
    }

    /// Reaps the child (blocks until it exits: call after [`Self::exited`]).
    pub fn reap(&mut self) -> io::Result<ExitInfo> {
        let mut status: libc::c_int = 0;
        // SAFETY: rusage is plain old data; all-zero is a valid value.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: both out-pointers point at live, writable locals.
            let r = unsafe { libc::wait4(self.pid, &mut status, 0, &mut ru) };
            if r == self.pid {
                break;
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINTR) {
                return Err(err);
            }
        }
        self.reaped = true;
        let (code, signal) = if libc::WIFEXITED(status) {
            (Some(libc::WEXITSTATUS(status)), None)
        } else if libc::WIFSIGNALED(status) {
            (None, Some(libc::WTERMSIG(status)))
        } else {
            (None, None)
        };
        let cpu = timeval(ru.ru_utime) + timeval(ru.ru_stime);
        let peak = u64::try_from(ru.ru_maxrss).unwrap_or(0).saturating_mul(1024);
        Ok(ExitInfo {
            code,
            signal,
            usage: Usage { cpu_time: Some(cpu), peak_mem: Some(peak), ..Usage::default() },
        })
    }
}

fn timeval(tv: libc::timeval) -> Duration {
    let secs = u64::try_from(tv.tv_sec).unwrap_or(0);
    let micros = u32::try_from(tv.tv_usec).unwrap_or(0).min(999_999);
    Duration::new(secs, micros * 1000)
}

fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: a plain syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(fd).map_err(|_| io::Error::other("pidfd out of range"))?;
    // SAFETY: the kernel just returned this fd to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn wait_exit_blocking(pid: libc::pid_t) -> io::Result<()> {
    let id = libc::id_t::try_from(pid).map_err(|_| io::Error::other("negative pid"))?;
    loop {
        // SAFETY: siginfo_t is plain old data; all-zero is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a live, writable local.
        let r = unsafe { libc::waitid(libc::P_PID, id, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if r == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

/// A human name for a signal number, e.g. `SIGKILL`.
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        _ => return format!("signal {sig}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    fn spawn(script: &str) -> ChildProcess {
        let child = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .process_group(0)
            .spawn()
            .expect("spawn sh");
        ChildProcess::adopt(child).expect("adopt")
    }

    #[tokio::test]
    async fn exit_code_and_usage() {
        let mut c = spawn("exit 7");
        c.exited().await.expect("exited");
        let info = c.reap().expect("reap");
        assert_eq!(info.code, Some(7));
        assert_eq!(info.signal, None);
        assert!(info.usage.peak_mem.unwrap_or(0) > 0);
        // Signalling after reaping is a no-op.
        c.signal_group(libc::SIGKILL).expect("no-op");
    }

    #[tokio::test]
    async fn pidfd_is_pollable_where_available() {
        let mut c = spawn("exit 0");
        let Ok(fd) = pidfd_open(c.pid) else {
            return; // old kernel or seccomp: the thread fallback is used instead
        };
        // SAFETY: `fd` is an open pidfd owned by the AsyncFd.
        let afd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.expect("register");
        let ready = tokio::time::timeout(Duration::from_secs(10), afd.readable()).await;
        assert!(ready.is_ok_and(|g| g.is_ok()), "pidfd never became readable");
        assert_eq!(c.reap().expect("reap").code, Some(0));
    }

    #[tokio::test]
    async fn fallback_waiter_and_signal() {
        let mut c = spawn("sleep 30");
        c.signal_group(libc::SIGKILL).expect("kill");
        let pid = c.pid;
        tokio::task::spawn_blocking(move || wait_exit_blocking(pid)).await.expect("join").expect("waitid");
        let info = c.reap().expect("reap");
        assert_eq!(info.signal, Some(libc::SIGKILL));
        assert_eq!(signal_name(libc::SIGKILL), "SIGKILL");
    }
}
