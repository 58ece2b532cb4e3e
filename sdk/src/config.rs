//! `client.toml`: how CLI commands and frameworks find and authenticate to a cluster.
//!
//! ```toml
//! master = "127.0.0.1:5050"     # or several: ["10.0.0.1:5050", "10.0.0.2:5050"]
//! ca = "ca.pem"                  # relative paths are relative to this file
//! [operator]
//! cert = "operator.pem"
//! key = "operator-key.pem"
//! [framework]
//! cert = "framework.pem"
//! key = "framework-key.pem"
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::proto::Role;
use crate::tls::TlsFiles;

/// A configuration that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read {path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("invalid {path}: {err}")]
    Parse { path: PathBuf, err: toml::de::Error },
    #[error("failed to write {path}: {err}")]
    Write { path: PathBuf, err: std::io::Error },
    #[error("{path} has no [{role}] certificate; add one or use a config that has it")]
    NoIdentity { path: PathBuf, role: Role },
    #[error("no cluster given: pass --config FILE, set AGORA_CONFIG, or pass --master ADDR --tls-dir DIR")]
    NoCluster,
    /// The master list (of a file, or of `--master`) is unusable.
    #[error("{origin}: {err}")]
    BadMaster { origin: String, err: crate::masters::MasterListError },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The contents of `client.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// `host:port` of the master, or of several masters separated by commas (the file may
    /// give a string or a list of strings; a list of several is written as a list).
    #[serde(with = "master_list")]
    pub master: String,
    pub ca: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<CertPair>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub framework: Option<CertPair>,
    /// Where this config came from (for error messages and relative paths).
    #[serde(skip)]
    pub source: PathBuf,
}

impl ClientConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|err| ConfigError::Read { path: path.to_path_buf(), err })?;
        let mut cfg: ClientConfig =
            toml::from_str(&text).map_err(|err| ConfigError::Parse { path: path.to_path_buf(), err })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        abs(&mut cfg.ca);
        for pair in [cfg.operator.as_mut(), cfg.framework.as_mut()].into_iter().flatten() {
            abs(&mut pair.cert);
            abs(&mut pair.key);
        }
        cfg.source = path.to_path_buf();
        check_masters(&cfg.master, &format!("{}: master", path.display()))?;
        Ok(cfg)
    }

    /// The standard files of a directory made by `agora tls init`.
    pub fn from_tls_dir(master: &str, dir: &Path) -> Self {
        let pair = |stem: &str| {
            let f = TlsFiles::in_dir(dir, stem);
            Some(CertPair { cert: f.cert, key: f.key })
        };
        ClientConfig {
            master: master.to_string(),
            ca: dir.join("ca.pem"),
            operator: pair("operator"),
            framework: pair("framework"),
            source: dir.to_path_buf(),
        }
    }

    /// Resolves the cluster from explicit flags, a config file, or `AGORA_CONFIG`.
    pub fn resolve(
        config: Option<&Path>,
        master: Option<&str>,
        tls_dir: Option<&Path>,
    ) -> Result<Self, ConfigError> {
        if let Some(m) = master {
            check_masters(m, "--master")?;
        }
        if let Some(path) = config {
            let mut cfg = Self::load(path)?;
            if let Some(m) = master {
                cfg.master = m.to_string();
            }
            return Ok(cfg);
        }
        if let (Some(m), Some(d)) = (master, tls_dir) {
            return Ok(Self::from_tls_dir(m, d));
        }
        if let Some(path) = std::env::var_os("AGORA_CONFIG") {
            let mut cfg = Self::load(Path::new(&path))?;
            if let Some(m) = master {
                cfg.master = m.to_string();
            }
            return Ok(cfg);
        }
        Err(ConfigError::NoCluster)
    }

    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let text = toml::to_string_pretty(self)
            .map_err(|e| ConfigError::Write { path: path.to_path_buf(), err: std::io::Error::other(e) })?;
        std::fs::write(path, text).map_err(|err| ConfigError::Write { path: path.to_path_buf(), err })
    }

    /// The TLS files to act as `role` (operator or framework).
    pub fn identity(&self, role: Role) -> Result<TlsFiles, ConfigError> {
        let pair = match role {
            Role::Framework => self.framework.as_ref(),
            Role::Operator => self.operator.as_ref(),
            _ => None,
        }
        .ok_or_else(|| ConfigError::NoIdentity { path: self.source.clone(), role })?;
        Ok(TlsFiles { ca: self.ca.clone(), cert: pair.cert.clone(), key: pair.key.clone() })
    }

    /// The TLS files for operator calls: the `[operator]` certificate, else the
    /// `[framework]` one. A framework certificate opens an operator session that sees and acts
    /// on its own principal's frameworks only (and what the master's ACLs grant it).
    pub fn operator_identity(&self) -> Result<TlsFiles, ConfigError> {
        self.identity(Role::Operator).or_else(|e| self.identity(Role::Framework).map_err(|_| e))
    }
}

/// Checks a master list; the error names `origin`.
fn check_masters(list: &str, origin: &str) -> Result<(), ConfigError> {
    crate::masters::check_master_list(list)
        .map_err(|err| ConfigError::BadMaster { origin: origin.to_string(), err })
}

/// `master` as a string (`a:5050` or `a:5050,b:5050`) or a list of strings; kept in memory as
/// the comma-separated string every client takes.
mod master_list {
    use serde::{Deserializer, Serialize, Serializer};

    #[derive(Serialize)]
    #[serde(untagged)]
    enum Form {
        One(String),
        Many(Vec<String>),
    }

    pub fn serialize<S: Serializer>(list: &str, s: S) -> Result<S::Ok, S::Error> {
        let entries: Vec<String> = list.split(',').map(|e| e.trim().to_string()).collect();
        if entries.len() == 1 {
            Form::One(list.to_string()).serialize(s)
        } else {
            Form::Many(entries).serialize(s)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        d.deserialize_any(ListVisitor)
    }

    struct ListVisitor;

    impl<'de> serde::de::Visitor<'de> for ListVisitor {
        type Value = String;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a master's \"host:port\" or a list of them")
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<String, A::Error> {
            let mut all: Vec<String> = Vec::new();
            while let Some(e) = seq.next_element::<String>()? {
                if e.contains(',') {
                    return Err(serde::de::Error::custom(format!(
                        "a master in a list is one host:port, not `{e}`"
                    )));
                }
                if all.len() > crate::masters::MAX_MASTERS {
                    return Err(serde::de::Error::custom(format!(
                        "more than {} masters",
                        crate::masters::MAX_MASTERS
                    )));
                }
                all.push(e);
            }
            Ok(all.join(","))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.toml");
        std::fs::write(
            &path,
            "master = \"127.0.0.1:1\"\nca = \"ca.pem\"\n[operator]\ncert = \"o.pem\"\nkey = \"o-key.pem\"\n",
        )
        .unwrap();
        let cfg = ClientConfig::load(&path).unwrap();
        assert_eq!(cfg.ca, dir.path().join("ca.pem"));
        assert!(cfg.identity(Role::Operator).is_ok());
        assert!(matches!(cfg.identity(Role::Framework), Err(ConfigError::NoIdentity { .. })));
        std::fs::write(&path, "master = 5\n").unwrap();
        let e = ClientConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("client.toml") && e.contains("host:port"), "{e}");
    }

    #[test]
    fn a_master_list_parses_round_trips_and_bad_entries_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.toml");
        std::fs::write(&path, "master = [\"127.0.0.1:1\", \"h.example:5050\"]\nca = \"ca.pem\"\n").unwrap();
        let cfg = ClientConfig::load(&path).unwrap();
        assert_eq!(cfg.master, "127.0.0.1:1,h.example:5050");
        let again = dir.path().join("again.toml");
        cfg.save(&again).unwrap();
        let text = std::fs::read_to_string(&again).unwrap();
        assert!(text.contains("master = [") && text.contains("\"h.example:5050\""), "{text}");
        assert_eq!(ClientConfig::load(&again).unwrap().master, cfg.master);
        // A single string stays a string, and may itself be a comma list.
        std::fs::write(&path, "master = \"a:1, b:2\"\nca = \"ca.pem\"\n").unwrap();
        assert_eq!(ClientConfig::load(&path).unwrap().master, "a:1, b:2");
        let one = ClientConfig::from_tls_dir("a:1", dir.path());
        one.save(&again).unwrap();
        assert!(std::fs::read_to_string(&again).unwrap().contains("master = \"a:1\""));
        // Bad entries: the file, the entry and what is wrong.
        std::fs::write(&path, "master = [\"a:1\", \"nohost\"]\nca = \"ca.pem\"\n").unwrap();
        let e = ClientConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("client.toml") && e.contains("`nohost`: no port"), "{e}");
        std::fs::write(&path, "master = []\nca = \"ca.pem\"\n").unwrap();
        let e = ClientConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("no master address"), "{e}");
        std::fs::write(&path, "master = [\"a:1,b:2\"]\nca = \"ca.pem\"\n").unwrap();
        let e = ClientConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("client.toml") && e.contains("one host:port"), "{e}");
        let e = ClientConfig::resolve(None, Some("a:1,b:x"), Some(dir.path())).unwrap_err().to_string();
        assert!(e.starts_with("--master: ") && e.contains("`b:x`"), "{e}");
    }
}
