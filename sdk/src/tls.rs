//! The cluster's certificates: a CA that signs every peer, and peer certificates that name a
//! role (subject OU) and a principal (subject CN). `agora tls init` writes them with rcgen.

use std::fs;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::proto::Role;

/// Every Agora client connects to the master under this TLS name, whatever its address; the
/// master's certificate carries it (plus `localhost` and the loopback addresses).
pub const MASTER_SERVER_NAME: &str = "agora-master";

/// A certificate problem.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("failed to read {path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("failed to write {path}: {err}")]
    Write { path: PathBuf, err: std::io::Error },
    #[error("{path} holds no usable {what}")]
    Pem { path: PathBuf, what: &'static str },
    #[error("{path} already exists; remove the directory or pass --force to replace the cluster CA")]
    Exists { path: PathBuf },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("invalid TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("peer presented no client certificate")]
    NoPeerCertificate,
    #[error("peer certificate is unreadable: {0}")]
    BadPeerCertificate(String),
    #[error("peer certificate names no Agora role (expected OU=master|agent|framework|operator)")]
    NoRole,
}

/// Who a peer is, read from its verified certificate.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    pub role: Role,
    pub principal: String,
}

/// Paths of one peer's certificate, key and the cluster CA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// The standard names `agora tls init` uses: `<dir>/<stem>.pem`, `<dir>/<stem>-key.pem`.
    pub fn in_dir(dir: &Path, stem: &str) -> Self {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}-key.pem")),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|err| TlsError::Read { path: path.to_path_buf(), err })
}

fn write(path: &Path, data: &str, secret: bool) -> Result<(), TlsError> {
    let werr = |err| TlsError::Write { path: path.to_path_buf(), err };
    fs::write(path, data).map_err(werr)?;
    if secret {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(werr)?;
    }
    Ok(())
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&data).filter_map(Result::ok).collect();
    if certs.is_empty() {
        return Err(TlsError::Pem { path: path.to_path_buf(), what: "certificate" });
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = read(path)?;
    PrivateKeyDer::from_pem_slice(&data)
        .map_err(|_| TlsError::Pem { path: path.to_path_buf(), what: "private key" })
}

/// Reads role and principal from a DER certificate (OU and CN of its subject).
pub fn identity_of(der: &[u8]) -> Result<Identity, TlsError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::BadPeerCertificate(e.to_string()))?;
    let subject = cert.subject();
    let role = subject
        .iter_organizational_unit()
        .filter_map(|a| a.as_str().ok())
        .find_map(|s| s.parse::<Role>().ok())
        .ok_or(TlsError::NoRole)?;
    let principal =
        subject.iter_common_name().filter_map(|a| a.as_str().ok()).next().unwrap_or("").to_string();
    Ok(Identity { role, principal })
}

/// What `tls init` made.
#[derive(Debug)]
pub struct InitReport {
    pub dir: PathBuf,
    pub files: Vec<PathBuf>,
}

fn leaf_params(role: Role, principal: &str) -> Result<CertificateParams, TlsError> {
    let mut sans = vec![format!("{principal}.{role}.agora")];
    if role == Role::Master {
        sans.push(MASTER_SERVER_NAME.to_string());
        sans.push("localhost".to_string());
    }
    let mut params = CertificateParams::new(sans)?;
    if role == Role::Master {
        params.subject_alt_names.push(SanType::IpAddress(Ipv4Addr::LOCALHOST.into()));
        params.subject_alt_names.push(SanType::IpAddress(Ipv6Addr::LOCALHOST.into()));
    }
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Agora");
    dn.push(DnType::OrganizationalUnitName, role.as_str());
    dn.push(DnType::CommonName, principal);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    Ok(params)
}

/// Creates a cluster CA and one certificate each for a master, an agent, a framework principal
/// and an operator in `dir`. Refuses to replace an existing CA unless `force`.
pub fn init(dir: &Path, framework_principal: &str, force: bool) -> Result<InitReport, TlsError> {
    let ca_path = dir.join("ca.pem");
    if ca_path.exists() && !force {
        return Err(TlsError::Exists { path: ca_path });
    }
    fs::create_dir_all(dir).map_err(|err| TlsError::Write { path: dir.to_path_buf(), err })?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Agora");
    dn.push(DnType::CommonName, "Agora cluster CA");
    ca_params.distinguished_name = dn;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    ca_params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    write(&ca_path, &ca_cert.pem(), false)?;
    write(&dir.join("ca-key.pem"), &ca_key.serialize_pem(), true)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let mut files = vec![ca_path, dir.join("ca-key.pem")];
    for (role, principal, stem) in [
        (Role::Master, "master", "master"),
        (Role::Agent, "agent", "agent"),
        (Role::Framework, framework_principal, "framework"),
        (Role::Operator, "operator", "operator"),
    ] {
        files.extend(issue_with(&issuer, dir, role, principal, stem)?);
    }
    Ok(InitReport { dir: dir.to_path_buf(), files })
}

fn issue_with(
    issuer: &Issuer<'_, KeyPair>,
    dir: &Path,
    role: Role,
    principal: &str,
    stem: &str,
) -> Result<Vec<PathBuf>, TlsError> {
    let key = KeyPair::generate()?;
    let cert = leaf_params(role, principal)?.signed_by(&key, issuer)?;
    let files = TlsFiles::in_dir(dir, stem);
    write(&files.cert, &cert.pem(), false)?;
    write(&files.key, &key.serialize_pem(), true)?;
    Ok(vec![files.cert, files.key])
}

/// Issues one more certificate signed by the CA in `dir` (`ca.pem`, `ca-key.pem`).
pub fn issue(dir: &Path, role: Role, principal: &str, stem: &str) -> Result<Vec<PathBuf>, TlsError> {
    let ca_pem = String::from_utf8_lossy(&read(&dir.join("ca.pem"))?).into_owned();
    let key_path = dir.join("ca-key.pem");
    let key_pem = String::from_utf8_lossy(&read(&key_path)?).into_owned();
    let ca_key = KeyPair::from_pem(&key_pem).map_err(|_| TlsError::Pem { path: key_path, what: "CA key" })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    issue_with(&issuer, dir, role, principal, stem)
}

/// A certificate signed by a CA that is not this cluster's (for tests of refusal).
#[doc(hidden)]
pub fn foreign_identity(dir: &Path, role: Role) -> Result<TlsFiles, TlsError> {
    init(dir, "intruder", true)?;
    Ok(TlsFiles::in_dir(dir, role.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_names_roles() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), "analytics", false).unwrap();
        let der = &load_certs(&dir.path().join("framework.pem")).unwrap()[0];
        assert_eq!(
            identity_of(der).unwrap(),
            Identity { role: Role::Framework, principal: "analytics".into() }
        );
        assert!(matches!(init(dir.path(), "x", false), Err(TlsError::Exists { .. })));
        issue(dir.path(), Role::Agent, "node7", "node7").unwrap();
        let der = &load_certs(&dir.path().join("node7.pem")).unwrap()[0];
        assert_eq!(identity_of(der).unwrap().principal, "node7");
    }
}
