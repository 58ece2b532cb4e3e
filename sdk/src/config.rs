//! `client.toml`: how CLI commands and frameworks find and authenticate to a cluster.
//!
//! ```toml
//! master = "127.0.0.1:5050"
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
    /// `host:port` of the master.
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
        assert!(e.contains("client.toml"), "{e}");
    }
}
