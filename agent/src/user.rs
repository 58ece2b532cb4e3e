//! The unprivileged user tasks and executors run as (`agora agent --task-user`, default
//! `nobody`). An agent running as root never starts a task, a Wasm executor or a framework's
//! executor as root: they get the task user's uid and gid, no supplementary groups and
//! `no_new_privs`. An agent that is not root cannot switch users: its tasks run as its own user,
//! after one warning line.
//!
//! Each framework gets a group of its own on the agent ([`TaskGroups`]): its tasks and
//! executors run as the task user *with that group as their only group*, and its sandboxes are
//! `root:<group>` mode 0770. A task of one framework therefore cannot open another framework's
//! sandbox, even by exact path, and cannot inspect its processes through `/proc` (the kernel
//! lets a process trace or read another's `/proc` entries only when their groups match too).
//! Signals are the one thing the shared uid still allows; per-framework users (from the ACLs)
//! close that.

use std::ffi::CString;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Default `--task-user`.
pub const DEFAULT_TASK_USER: &str = "nobody";

/// A user to run as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskUser {
    /// The user id.
    pub uid: u32,
    /// Its primary group id (the only group the task gets).
    pub gid: u32,
}

/// Why `--task-user` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// No such user on this node.
    #[error("--task-user `{0}`: no such user on this node (create it, or name another)")]
    Unknown(String),
    /// The name names root.
    #[error("--task-user `{0}` is root (uid 0): tasks never run as root")]
    Root(String),
    /// The name cannot be looked up.
    #[error("--task-user `{name}`: {err}")]
    Lookup {
        /// The name.
        name: String,
        /// The cause.
        err: io::Error,
    },
}

/// Why a task cannot run as the user it names, or as its framework's group. The text is the
/// message of its TASK_ERROR.
#[derive(Debug, thiserror::Error)]
pub enum TaskUserError {
    /// A bare number names a uid, not a user.
    #[error("task user `{name}`: name a user of this node, not a uid")]
    Uid {
        /// The name the task gave.
        name: String,
    },
    /// The user is root.
    #[error("task user `{name}` is root (uid 0): tasks never run as root")]
    Root {
        /// The name the task gave.
        name: String,
    },
    /// No such user on this node.
    #[error("task user `{name}`: no such user on this node")]
    Unknown {
        /// The name the task gave.
        name: String,
    },
    /// The user database could not be read.
    #[error("task user `{name}`: {err}")]
    Lookup {
        /// The name the task gave.
        name: String,
        /// The cause.
        #[source]
        err: io::Error,
    },
    /// The agent is not root: it cannot switch users.
    #[error("task user `{name}`: this agent does not run as root and cannot switch users")]
    NotRoot {
        /// The name the task gave.
        name: String,
    },
    /// The framework's group (`--task-groups`) could not be made.
    #[error("no group for framework {framework}: {err}")]
    Group {
        /// The framework.
        framework: String,
        /// The cause.
        #[source]
        err: io::Error,
    },
}

impl TaskUser {
    /// Looks `name` up in the user database (a number is taken as a uid).
    pub fn lookup(name: &str) -> Result<Self, UserError> {
        let cname = CString::new(name).map_err(|_| UserError::Unknown(name.to_string()))?;
        let mut buf = vec![0u8; 16 * 1024];
        // SAFETY: passwd is plain old data; all-zero is a valid value.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer points at live, writable memory of the given size; getpwnam_r
        // writes the strings it returns into `buf`, which outlives their (unused) use.
        let rc = unsafe {
            libc::getpwnam_r(cname.as_ptr(), &mut pwd, buf.as_mut_ptr().cast(), buf.len(), &mut result)
        };
        let user = if rc == 0 && !result.is_null() {
            Self { uid: pwd.pw_uid, gid: pwd.pw_gid }
        } else if let Ok(uid) = name.parse::<u32>() {
            Self { uid, gid: uid }
        } else if rc != 0 {
            return Err(UserError::Lookup { name: name.into(), err: io::Error::from_raw_os_error(rc) });
        } else {
            return Err(UserError::Unknown(name.to_string()));
        };
        if user.uid == 0 {
            return Err(UserError::Root(name.to_string()));
        }
        Ok(user)
    }

    /// The user a task asks to run as (`TaskInfo::user`): it must exist on this node by name
    /// and must not be root. The error is for the task's status message.
    pub fn lookup_requested(name: &str) -> Result<Self, TaskUserError> {
        let numeric = !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit());
        let name = name.to_string();
        match Self::lookup(&name) {
            // A bare number is a uid to --task-user; a task names a user that exists.
            Ok(_) if numeric => Err(TaskUserError::Uid { name }),
            Ok(u) => Ok(u),
            Err(UserError::Root(_)) => Err(TaskUserError::Root { name }),
            Err(UserError::Unknown(_)) => Err(TaskUserError::Unknown { name }),
            Err(UserError::Lookup { err, .. }) => Err(TaskUserError::Lookup { name, err }),
        }
    }

    /// What `--task-user NAME` means for this agent: the user when the agent is root (it must
    /// exist and must not be root); `None` when the agent is not root, after one warning.
    pub fn for_agent(name: &str) -> Result<Option<Self>, UserError> {
        if !is_root() {
            // SAFETY: getuid has no preconditions.
            let uid = unsafe { libc::getuid() };
            tracing::warn!(
                task_user = name,
                uid,
                "the agent is not running as root: tasks and executors run as the agent's own user \
                 (uid {uid}), not as --task-user, and nothing of the agent's is closed to them"
            );
            return Ok(None);
        }
        Self::lookup(name).map(Some)
    }

    /// Gives `path` to this user (and its group).
    pub fn chown(&self, path: &Path) -> io::Result<()> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
    }

    /// Gives `path`'s group to this user's group (the owner stays the agent).
    pub fn chgrp(&self, path: &Path) -> io::Result<()> {
        std::os::unix::fs::chown(path, None, Some(self.gid))
    }

    /// Drops to this user in a freshly forked child, before `exec`: no supplementary groups,
    /// then the group, then the user. Async-signal-safe (system calls only).
    ///
    /// # Safety
    /// Only call between `fork` and `exec` (e.g. from `CommandExt::pre_exec`).
    pub unsafe fn switch_in_child(&self) -> io::Result<()> {
        // SAFETY: plain system calls on integers; a null list with length 0 clears the groups.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(self.gid) != 0
                || libc::setuid(self.uid) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// First group id handed to frameworks (`--task-gids`'s default start): high enough to stay
/// clear of the groups of ordinary systems.
pub const DEFAULT_FIRST_TASK_GID: u32 = 1_900_000_000;
/// How many framework groups the default range holds.
pub const DEFAULT_TASK_GIDS: u32 = 100_000_000;

/// The group of each framework on this agent, allocated in order from a range and kept in
/// the work dir (`task-groups.json`, written atomically) so that a restarted agent gives a
/// framework the group its files already have.
#[derive(Debug)]
pub struct TaskGroups {
    user: TaskUser,
    first: u32,
    count: u32,
    file: std::path::PathBuf,
    map: std::sync::Mutex<std::collections::BTreeMap<String, u32>>,
}

impl TaskGroups {
    /// Groups for `user`'s tasks from `first` (at most `count` frameworks), kept in `file`.
    pub fn load(user: TaskUser, first: u32, count: u32, file: &Path) -> io::Result<Self> {
        let map = match std::fs::read(file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", file.display()))
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Default::default(),
            Err(e) => return Err(e),
        };
        Ok(Self { user, first, count, file: file.to_path_buf(), map: std::sync::Mutex::new(map) })
    }

    /// The task user's uid (tasks and executors that name no user of their own run as it).
    pub fn task_uid(&self) -> u32 {
        self.user.uid
    }

    /// Who `framework`'s tasks and executors run as: the task user with the framework's group.
    pub fn for_framework(&self, framework: &str) -> io::Result<TaskUser> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&gid) = map.get(framework) {
            return Ok(TaskUser { uid: self.user.uid, gid });
        }
        let n = u32::try_from(map.len()).unwrap_or(u32::MAX);
        if n >= self.count {
            return Err(io::Error::other(format!(
                "all {} framework groups of this agent are in use",
                self.count
            )));
        }
        let gid = self.first.saturating_add(n);
        map.insert(framework.to_string(), gid);
        let data = serde_json::to_vec(&*map).map_err(io::Error::other)?;
        crate::sandbox::write_atomic(&self.file, &data)?;
        Ok(TaskUser { uid: self.user.uid, gid })
    }
}

/// Sets `no_new_privs` in a freshly forked child: neither it nor anything it executes can gain
/// privileges (set-uid binaries, file capabilities).
///
/// # Safety
/// Only call between `fork` and `exec`.
pub unsafe fn no_new_privs_in_child() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_framework_gets_a_group_of_its_own_kept_across_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("task-groups.json");
        let user = TaskUser { uid: 65534, gid: 65534 };
        let g = TaskGroups::load(user, 1000, 2, &file).expect("load");
        let a = g.for_framework("fw-a").expect("a");
        let b = g.for_framework("fw-b").expect("b");
        assert_eq!((a.uid, a.gid, b.gid), (65534, 1000, 1001));
        assert_eq!(g.for_framework("fw-a").expect("a again").gid, 1000);
        assert!(g.for_framework("fw-c").is_err(), "the range is full");
        let again = TaskGroups::load(user, 1000, 2, &file).expect("reload");
        assert_eq!(again.for_framework("fw-b").expect("b").gid, 1001);
    }

    #[test]
    fn lookup() {
        assert!(matches!(TaskUser::lookup("root"), Err(UserError::Root(_))));
        assert!(matches!(TaskUser::lookup("no-such-user-agora"), Err(UserError::Unknown(_))));
        assert!(matches!(TaskUser::lookup("0"), Err(UserError::Root(_))));
        assert_eq!(TaskUser::lookup("4242").ok(), Some(TaskUser { uid: 4242, gid: 4242 }));
    }
}
