//! Access control lists (`agora master --acls FILE`): what each principal (the name its client
//! certificate carries) may do. Mesos's model in a smaller file:
//!
//! ```toml
//! [principals.alice]
//! roles = ["analytics"]        # roles it may subscribe frameworks as ("*": the default role)
//! task_users = ["nobody"]      # OS users its tasks may ask to run as
//! upload_quota = "1GiB"        # may upload artifacts, up to this total size
//! [principals.ops]
//! operator = true              # every operator right
//! ```
//!
//! Without a file everything is allowed (the master says so once). With one, anything not
//! granted is denied, with an error naming the principal and the action. Agents are
//! authenticated by their certificate's role and are not subject to the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use agora_sdk::proto::{ErrorCode, WireError};
use serde::Deserialize;

/// An ACL file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AclError {
    /// The file cannot be read.
    #[error("cannot read the ACL file {path}: {err}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        err: std::io::Error,
    },
    /// Not TOML of the documented form (the message names the line).
    #[error("invalid ACL file {path}: {msg}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, and where.
        #[source]
        msg: AclParseError,
    },
}

/// What is wrong with an ACL file's text.
#[derive(Debug, thiserror::Error)]
pub enum AclParseError {
    /// Not TOML of the documented form (toml's message names the line).
    #[error("{}", .0.to_string().trim_end())]
    Toml(#[from] toml::de::Error),
    /// A principal's name is empty.
    #[error("a principal's name is empty")]
    EmptyPrincipal,
    /// A principal lists an empty role.
    #[error("principal `{principal}`: role `` is empty (the default role is `*`)")]
    EmptyRole {
        /// The principal.
        principal: String,
    },
    /// A principal lists an empty task user.
    #[error("principal `{principal}`: an empty task user")]
    EmptyTaskUser {
        /// The principal.
        principal: String,
    },
}

/// One of the operator rights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OperatorRight {
    /// See every framework and task (not only the principal's own).
    ListAll,
    /// Kill any task.
    KillAny,
    /// Read any task's output and sandbox files.
    ReadAny,
    /// Set the allocation policy (weights, quotas: `agora policy set`).
    SetPolicy,
    /// Drain and undrain agents.
    Drain,
}

impl OperatorRight {
    /// The action, as error messages name it.
    pub fn action(self) -> &'static str {
        match self {
            OperatorRight::ListAll => "list other principals' frameworks and tasks",
            OperatorRight::KillAny => "kill other principals' tasks",
            OperatorRight::ReadAny => "read other principals' task output and files",
            OperatorRight::SetPolicy => "set the allocation policy",
            OperatorRight::Drain => "drain or undrain agents",
        }
    }
}

/// The grants of one principal, as the file writes them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    /// Roles its frameworks may subscribe as (`*` is the default role).
    #[serde(default)]
    pub roles: Vec<String>,
    /// OS users its tasks may ask to run as (a task that names none runs as the agent's
    /// `--task-user`, always allowed).
    #[serde(default)]
    pub task_users: Vec<String>,
    /// May upload artifacts (implied by `upload_quota`); without a quota, of any total size.
    #[serde(default)]
    pub upload: bool,
    /// Most bytes of artifacts it may have uploaded in all (a size: `1GiB`).
    #[serde(default, deserialize_with = "size")]
    pub upload_quota: Option<u64>,
    /// Every operator right below.
    #[serde(default)]
    pub operator: bool,
    /// See every framework and task.
    #[serde(default)]
    pub list_all: bool,
    /// Kill any task.
    #[serde(default)]
    pub kill_any: bool,
    /// Read any task's output and files.
    #[serde(default)]
    pub read_any: bool,
    /// `agora policy set`.
    #[serde(default)]
    pub set_policy: bool,
    /// `agora agent drain` / `undrain`.
    #[serde(default)]
    pub drain: bool,
}

fn size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let s = String::deserialize(d)?;
    agora_sdk::units::parse_size(&s).map(Some).map_err(serde::de::Error::custom)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    principals: BTreeMap<String, Grants>,
}

/// The master's ACLs: grants per principal. A principal the file does not name has none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acls {
    principals: BTreeMap<String, Grants>,
}

/// What an upload may add, as [`Acls::upload_limit`] answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadLimit {
    /// Any size.
    Unlimited,
    /// At most this many bytes in all.
    Quota(u64),
}

fn denied(msg: String) -> WireError {
    WireError::new(ErrorCode::Unauthorized, msg)
}

impl Acls {
    /// Reads an ACL file.
    pub fn load(path: &Path) -> Result<Self, AclError> {
        let text =
            std::fs::read_to_string(path).map_err(|err| AclError::Read { path: path.to_path_buf(), err })?;
        Self::parse(&text).map_err(|msg| AclError::Parse { path: path.to_path_buf(), msg })
    }

    /// Parses an ACL file's text; the error names the line.
    pub fn parse(text: &str) -> Result<Self, AclParseError> {
        let file: File = toml::from_str(text)?;
        for (name, g) in &file.principals {
            if name.is_empty() {
                return Err(AclParseError::EmptyPrincipal);
            }
            if g.roles.iter().any(|r| r.is_empty()) {
                return Err(AclParseError::EmptyRole { principal: name.clone() });
            }
            if g.task_users.iter().any(|u| u.is_empty()) {
                return Err(AclParseError::EmptyTaskUser { principal: name.clone() });
            }
        }
        Ok(Acls { principals: file.principals })
    }

    /// An ACL of these grants (for tests and embedding).
    pub fn from_grants(principals: impl IntoIterator<Item = (String, Grants)>) -> Self {
        Acls { principals: principals.into_iter().collect() }
    }

    /// How many principals the file names.
    pub fn len(&self) -> usize {
        self.principals.len()
    }

    /// Whether the file names no principal (then everything but agents is denied).
    pub fn is_empty(&self) -> bool {
        self.principals.is_empty()
    }

    fn grants(&self, principal: &str) -> Option<&Grants> {
        self.principals.get(principal)
    }

    /// May `principal` subscribe a framework as `role`?
    pub fn check_role(&self, principal: &str, role: &str) -> Result<(), WireError> {
        match self.grants(principal) {
            Some(g) if g.roles.iter().any(|r| r == role) => Ok(()),
            _ => Err(denied(format!("principal `{principal}` may not subscribe as role `{role}`"))),
        }
    }

    /// May `principal`'s tasks run as OS user `user`?
    pub fn check_task_user(&self, principal: &str, user: &str) -> Result<(), WireError> {
        match self.grants(principal) {
            Some(g) if g.task_users.iter().any(|u| u == user) => Ok(()),
            _ => Err(denied(format!("principal `{principal}` may not run tasks as user `{user}`"))),
        }
    }

    /// How much `principal` may upload, or why it may not.
    pub fn upload_limit(&self, principal: &str) -> Result<UploadLimit, WireError> {
        match self.grants(principal) {
            Some(Grants { upload_quota: Some(q), .. }) => Ok(UploadLimit::Quota(*q)),
            Some(g) if g.upload => Ok(UploadLimit::Unlimited),
            _ => Err(denied(format!("principal `{principal}` may not upload artifacts"))),
        }
    }

    /// Does `principal` hold operator right `right`?
    pub fn has(&self, principal: &str, right: OperatorRight) -> bool {
        self.grants(principal).is_some_and(|g| {
            g.operator
                || match right {
                    OperatorRight::ListAll => g.list_all,
                    OperatorRight::KillAny => g.kill_any,
                    OperatorRight::ReadAny => g.read_any,
                    OperatorRight::SetPolicy => g.set_policy,
                    OperatorRight::Drain => g.drain,
                }
        })
    }

    /// [`Acls::has`] as a result with the error a peer gets.
    pub fn check(&self, principal: &str, right: OperatorRight) -> Result<(), WireError> {
        if self.has(principal, right) {
            Ok(())
        } else {
            Err(denied(format!("principal `{principal}` may not {}", right.action())))
        }
    }
}

/// The error of an upload that would pass a quota.
pub fn over_quota(principal: &str, size: u64, used: u64, quota: u64) -> WireError {
    use agora_sdk::units::format_size;
    WireError::new(
        ErrorCode::Unauthorized,
        format!(
            "principal `{principal}` may not upload {}: its upload quota is {} and {} is used",
            format_size(size),
            format_size(quota),
            format_size(used)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[principals.alice]
roles = ["analytics"]
task_users = ["nobody"]
upload_quota = "1GiB"
[principals.ops]
operator = true
[principals.viewer]
list_all = true
upload = true
"#;

    #[test]
    fn the_issue_example_grants_what_it_says() {
        let acl = Acls::parse(EXAMPLE).unwrap();
        assert!(acl.check_role("alice", "analytics").is_ok());
        let e = acl.check_role("alice", "etl").unwrap_err();
        assert_eq!(e.code, ErrorCode::Unauthorized);
        assert_eq!(e.message, "principal `alice` may not subscribe as role `etl`");
        assert!(acl.check_role("alice", "*").is_err(), "the default role must be granted too");
        assert!(acl.check_task_user("alice", "nobody").is_ok());
        assert!(acl.check_task_user("alice", "root").unwrap_err().message.contains("user `root`"));
        assert_eq!(acl.upload_limit("alice").unwrap(), UploadLimit::Quota(1 << 30));
        assert_eq!(acl.upload_limit("viewer").unwrap(), UploadLimit::Unlimited);
        assert!(acl.upload_limit("ops").unwrap_err().message.contains("`ops` may not upload"));
        assert!(!acl.has("alice", OperatorRight::ListAll));
        assert!(acl.has("viewer", OperatorRight::ListAll));
        assert!(!acl.has("viewer", OperatorRight::KillAny));
        for r in [
            OperatorRight::ListAll,
            OperatorRight::KillAny,
            OperatorRight::ReadAny,
            OperatorRight::SetPolicy,
            OperatorRight::Drain,
        ] {
            assert!(acl.has("ops", r));
        }
        assert!(acl.check("alice", OperatorRight::Drain).unwrap_err().message.contains("drain"));
    }

    #[test]
    fn an_unknown_principal_has_nothing() {
        let acl = Acls::parse(EXAMPLE).unwrap();
        assert!(acl.check_role("mallory", "*").is_err());
        assert!(acl.upload_limit("mallory").is_err());
        assert!(!acl.has("mallory", OperatorRight::ListAll));
        let empty = Acls::parse("").unwrap();
        assert!(empty.check_role("ops", "*").is_err());
    }

    #[test]
    fn bad_files_are_refused_naming_the_line() {
        let unknown =
            Acls::parse("[principals.a]\nroles = [\"x\"]\nopreator = true\n").unwrap_err().to_string();
        assert!(unknown.contains("line 3"), "{unknown}");
        assert!(unknown.contains("opreator"), "{unknown}");
        let bad_size = Acls::parse("[principals.a]\nupload_quota = \"lots\"\n").unwrap_err().to_string();
        assert!(bad_size.contains("line 2") && bad_size.contains("lots"), "{bad_size}");
        let bare = Acls::parse("[principals.a]\nupload_quota = \"64\"\n").unwrap_err().to_string();
        assert!(bare.contains("64MiB"), "{bare}");
        let top = Acls::parse("[principal.a]\n").unwrap_err().to_string();
        assert!(top.contains("line 1"), "{top}");
        let wrong_type = Acls::parse("[principals.a]\nroles = \"x\"\n").unwrap_err().to_string();
        assert!(wrong_type.contains("line 2"), "{wrong_type}");
        assert!(Acls::parse("[principals.a]\nroles = [\"\"]\n").is_err());
    }
}
