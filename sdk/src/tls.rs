//! The cluster's certificates: a CA that signs every peer, and peer certificates that name a
//! role (subject OU) and a principal (subject CN). `agora tls init` writes them with rcgen.

use std::collections::HashMap;
use std::fs;
use std::io::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// Default lifetime of a peer certificate (`agora tls init` / `issue --days`): one year.
pub const DEFAULT_LEAF_DAYS: u32 = 365;
/// Default lifetime of the cluster CA (`agora tls init --ca-days`): ten years.
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// Longest lifetime accepted for any certificate (100 years).
pub const MAX_DAYS: u32 = 36_500;
/// The revocation list `agora tls revoke` appends to, beside `ca.pem`; the master reads the one
/// in its own TLS directory.
pub const REVOKED_FILE: &str = "revoked.txt";
/// The operator's bearer token for the master's HTTP endpoint (`agora master
/// --http-token-file`), written 0600 by `agora tls init` beside the certificates.
pub const HTTP_TOKEN_FILE: &str = "http-token";
/// Certificate names `agora tls issue` refuses: the files `agora tls init` writes (`ca.pem`,
/// `ca-key.pem`, `master.pem`, …) and the principals they stand for.
pub const RESERVED_NAMES: &[&str] = &["ca", "ca-key", "master", "agent", "framework", "operator"];
/// Longest certificate name (file stem and principal) `agora tls issue` accepts.
pub const MAX_NAME_LEN: usize = 64;

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
    #[error("{path} already exists: refusing to overwrite it (choose another name, or revoke the old certificate with `agora tls revoke` and remove its files first)")]
    FileExists { path: PathBuf },
    #[error("invalid certificate name `{name}`: {why}")]
    BadName { name: String, why: &'static str },
    #[error("invalid certificate lifetime of {days} days (1 to {MAX_DAYS})")]
    BadDays { days: u32 },
    #[error("revocation list {path}, line {line}: {why}")]
    BadRevocationList {
        path: PathBuf,
        line: usize,
        #[source]
        why: RevokedLineError,
    },
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

/// Writes a new file, never replacing one: a key (`secret`) is created 0600, so it is never
/// readable by others, not even between its creation and its first byte.
fn write(path: &Path, data: &str, secret: bool) -> Result<(), TlsError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(|err| match err.kind() {
            std::io::ErrorKind::AlreadyExists => TlsError::FileExists { path: path.to_path_buf() },
            _ => TlsError::Write { path: path.to_path_buf(), err },
        })?;
    file.write_all(data.as_bytes()).map_err(|err| TlsError::Write { path: path.to_path_buf(), err })
}

/// Removes a file `init --force` replaces (absent is fine).
fn remove(path: &Path) -> Result<(), TlsError> {
    match fs::remove_file(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(TlsError::Write { path: path.to_path_buf(), err })
        }
        _ => Ok(()),
    }
}

/// Checks a name for `agora tls issue`: it becomes the file stem and the principal, so only
/// `[A-Za-z0-9._-]`, not starting with `.` or `-`, not reserved, not ending in `-key` (the
/// certificate of `x-key` would be the key file of `x`).
pub fn check_name(name: &str) -> Result<(), TlsError> {
    let bad = |why| Err(TlsError::BadName { name: name.to_string(), why });
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return bad("it must have 1 to 64 characters");
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return bad("only letters, digits, `.`, `_` and `-` are allowed");
    }
    if name.starts_with(['.', '-']) {
        return bad("it must not start with `.` or `-`");
    }
    if RESERVED_NAMES.contains(&name) {
        return bad("it is reserved for the files `agora tls init` writes");
    }
    if name.ends_with("-key") {
        return bad("names ending in `-key` would collide with another certificate's key file");
    }
    Ok(())
}

fn check_days(days: u32) -> Result<(), TlsError> {
    if days == 0 || days > MAX_DAYS {
        return Err(TlsError::BadDays { days });
    }
    Ok(())
}

/// Validity of a new certificate: from an hour ago (clocks differ a little) for `days` days.
fn validity(params: &mut CertificateParams, days: u32) {
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + Duration::from_secs(u64::from(days) * 86_400)).into();
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

fn leaf_params(role: Role, principal: &str, days: u32) -> Result<CertificateParams, TlsError> {
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
    validity(&mut params, days);
    Ok(params)
}

/// Lifetimes of the certificates `init` makes, in days.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetimes {
    /// The cluster CA ([`DEFAULT_CA_DAYS`]).
    pub ca_days: u32,
    /// The master, agent, framework and operator certificates ([`DEFAULT_LEAF_DAYS`]).
    pub leaf_days: u32,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Lifetimes { ca_days: DEFAULT_CA_DAYS, leaf_days: DEFAULT_LEAF_DAYS }
    }
}

/// The peers `init` issues a certificate for: role, principal (`None`: the framework principal
/// given) and file stem.
const INIT_PEERS: [(Role, Option<&str>, &str); 4] = [
    (Role::Master, Some("master"), "master"),
    (Role::Agent, Some("agent"), "agent"),
    (Role::Framework, None, "framework"),
    (Role::Operator, Some("operator"), "operator"),
];

/// Creates a cluster CA and one certificate each for a master, an agent, a framework principal
/// and an operator in `dir`, with the default [`Lifetimes`]. Refuses to replace an existing CA
/// unless `force`.
pub fn init(dir: &Path, framework_principal: &str, force: bool) -> Result<InitReport, TlsError> {
    init_with(dir, framework_principal, force, Lifetimes::default())
}

/// [`init`] with chosen lifetimes.
pub fn init_with(
    dir: &Path,
    framework_principal: &str,
    force: bool,
    lifetimes: Lifetimes,
) -> Result<InitReport, TlsError> {
    check_days(lifetimes.ca_days)?;
    check_days(lifetimes.leaf_days)?;
    let ca_path = dir.join("ca.pem");
    if ca_path.exists() && !force {
        return Err(TlsError::Exists { path: ca_path });
    }
    fs::create_dir_all(dir).map_err(|err| TlsError::Write { path: dir.to_path_buf(), err })?;
    if force {
        remove(&ca_path)?;
        remove(&dir.join("ca-key.pem"))?;
        remove(&dir.join(HTTP_TOKEN_FILE))?;
        for (_, _, stem) in INIT_PEERS {
            let files = TlsFiles::in_dir(dir, stem);
            remove(&files.cert)?;
            remove(&files.key)?;
        }
    }
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Agora");
    dn.push(DnType::CommonName, "Agora cluster CA");
    ca_params.distinguished_name = dn;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca_params, lifetimes.ca_days);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    write(&ca_path, &ca_cert.pem(), false)?;
    write(&dir.join("ca-key.pem"), &ca_key.serialize_pem(), true)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let mut files = vec![ca_path, dir.join("ca-key.pem")];
    for (role, principal, stem) in INIT_PEERS {
        let principal = principal.unwrap_or(framework_principal);
        files.extend(issue_with(&issuer, dir, role, principal, stem, lifetimes.leaf_days)?);
    }
    let token_path = dir.join(HTTP_TOKEN_FILE);
    write(&token_path, &format!("{}\n", new_token()), true)?;
    files.push(token_path);
    Ok(InitReport { dir: dir.to_path_buf(), files })
}

/// 256 bits from the system's random source (two v4 UUIDs carry 244 random bits), as hex.
fn new_token() -> String {
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

fn issue_with(
    issuer: &Issuer<'_, KeyPair>,
    dir: &Path,
    role: Role,
    principal: &str,
    stem: &str,
    days: u32,
) -> Result<Vec<PathBuf>, TlsError> {
    let files = TlsFiles::in_dir(dir, stem);
    // Checked before anything is written: no half-issued pair next to an old one.
    for path in [&files.cert, &files.key] {
        if path.exists() {
            return Err(TlsError::FileExists { path: path.clone() });
        }
    }
    let key = KeyPair::generate()?;
    let cert = leaf_params(role, principal, days)?.signed_by(&key, issuer)?;
    write(&files.cert, &cert.pem(), false)?;
    write(&files.key, &key.serialize_pem(), true)?;
    Ok(vec![files.cert, files.key])
}

/// Issues one more certificate signed by the CA in `dir` (`ca.pem`, `ca-key.pem`), valid for
/// [`DEFAULT_LEAF_DAYS`]. Never replaces a file: an existing `stem.pem` or `stem-key.pem` is
/// [`TlsError::FileExists`].
pub fn issue(dir: &Path, role: Role, principal: &str, stem: &str) -> Result<Vec<PathBuf>, TlsError> {
    issue_days(dir, role, principal, stem, DEFAULT_LEAF_DAYS)
}

/// [`issue`], valid for `days` days.
pub fn issue_days(
    dir: &Path,
    role: Role,
    principal: &str,
    stem: &str,
    days: u32,
) -> Result<Vec<PathBuf>, TlsError> {
    check_days(days)?;
    let ca_pem = String::from_utf8_lossy(&read(&dir.join("ca.pem"))?).into_owned();
    let key_path = dir.join("ca-key.pem");
    let key_pem = String::from_utf8_lossy(&read(&key_path)?).into_owned();
    let ca_key = KeyPair::from_pem(&key_pem).map_err(|_| TlsError::Pem { path: key_path, what: "CA key" })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    issue_with(&issuer, dir, role, principal, stem, days)
}

/// The serial number of a DER certificate, lowercase hex without separators (what
/// `openssl x509 -serial` prints, in lowercase).
pub fn serial_of(der: &[u8]) -> Result<String, TlsError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::BadPeerCertificate(e.to_string()))?;
    Ok(normal_serial(&hex::encode(cert.raw_serial())))
}

/// One spelling per serial: lowercase, no `:`, no leading zeros (DER pads with a zero byte,
/// people copy `openssl` output with or without it).
fn normal_serial(hex: &str) -> String {
    let s = hex.replace(':', "").to_ascii_lowercase();
    let t = s.trim_start_matches('0');
    if t.is_empty() {
        "0".into()
    } else {
        t.to_string()
    }
}

/// What [`revoke`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Revoked {
    /// The serial was appended to the list.
    Added { serial: String, list: PathBuf },
    /// The list already had it.
    Already { serial: String, list: PathBuf },
}

/// Revokes the certificate `dir/NAME.pem`: appends its serial to `dir/revoked.txt` (a line
/// `SERIAL NAME UNIX_SECONDS`). The master refuses certificates listed in the `revoked.txt` of
/// its own TLS directory.
pub fn revoke(dir: &Path, name: &str) -> Result<Revoked, TlsError> {
    if name == "ca" {
        return Err(TlsError::BadName {
            name: name.into(),
            why: "the CA cannot be revoked: make a new cluster CA (`agora tls init --force`)",
        });
    }
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        return Err(TlsError::BadName { name: name.into(), why: "it must be a file name in the directory" });
    }
    let cert_path = dir.join(format!("{name}.pem"));
    let der = load_certs(&cert_path)?.swap_remove(0);
    let serial = serial_of(&der)?;
    let list = dir.join(REVOKED_FILE);
    let known = load_revoked(&list)?;
    if known.contains_key(&serial) {
        return Ok(Revoked::Already { serial, list });
    }
    let werr = |err| TlsError::Write { path: list.clone(), err };
    let mut file = fs::OpenOptions::new().append(true).create(true).mode(0o644).open(&list).map_err(werr)?;
    let mut text = String::new();
    if known.is_empty() && file.metadata().map_err(werr)?.len() == 0 {
        text.push_str(
            "# Certificates revoked with `agora tls revoke`: serial (hex), name, unix time.\n\
             # Copy this file to the master's TLS directory: it refuses these certificates.\n",
        );
    }
    let at = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    text.push_str(&format!("{serial} {name} {at}\n"));
    file.write_all(text.as_bytes()).map_err(werr)?;
    Ok(Revoked::Added { serial, list })
}

/// Most serials a revocation list may hold (a bound on what the master keeps in memory).
pub const MAX_REVOKED: usize = 100_000;

/// What is wrong with one line of a revocation list.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RevokedLineError {
    /// The line does not start with a hexadecimal serial (of at most 64 digits).
    #[error("`{serial}` is not a hexadecimal serial number")]
    NotASerial {
        /// The line's first word.
        serial: String,
    },
    /// The list holds more than [`MAX_REVOKED`] serials.
    #[error("more than {MAX_REVOKED} serials")]
    TooMany,
}

/// Reads a revocation list: one certificate a line, its serial (hex) first, then anything
/// (`revoke` writes the name and the time); blank lines and `#` comments skipped. Returns
/// serial → the rest of its line, or the line number (from 1) and what is wrong.
pub fn parse_revoked(text: &str) -> Result<HashMap<String, String>, (usize, RevokedLineError)> {
    let mut serials = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (serial, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let hexits = serial.replace(':', "");
        if hexits.is_empty() || hexits.len() > 64 || !hexits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err((i + 1, RevokedLineError::NotASerial { serial: serial.to_string() }));
        }
        let serial = normal_serial(&hexits);
        if serials.len() >= MAX_REVOKED {
            return Err((i + 1, RevokedLineError::TooMany));
        }
        serials.insert(serial, rest.trim().to_string());
    }
    Ok(serials)
}

/// Reads the revocation list at `path`; a missing file is an empty list.
pub fn load_revoked(path: &Path) -> Result<HashMap<String, String>, TlsError> {
    match fs::read_to_string(path) {
        Ok(text) => parse_revoked(&text).map_err(|(line, why)| TlsError::BadRevocationList {
            path: path.to_path_buf(),
            line,
            why,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashMap::new()),
        Err(err) => Err(TlsError::Read { path: path.to_path_buf(), err }),
    }
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

    fn not_after_days(path: &Path) -> i64 {
        let der = &load_certs(path).unwrap()[0];
        let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
        let v = cert.validity();
        (v.not_after.timestamp() - v.not_before.timestamp() - 3600) / 86_400
    }

    #[test]
    fn lifetimes_are_honoured() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), "fw", false).unwrap();
        assert_eq!(not_after_days(&dir.path().join("ca.pem")), i64::from(DEFAULT_CA_DAYS));
        assert_eq!(not_after_days(&dir.path().join("agent.pem")), i64::from(DEFAULT_LEAF_DAYS));
        issue_days(dir.path(), Role::Framework, "short", "short", 7).unwrap();
        assert_eq!(not_after_days(&dir.path().join("short.pem")), 7);
        let other = tempfile::tempdir().unwrap();
        init_with(other.path(), "fw", false, Lifetimes { ca_days: 20, leaf_days: 2 }).unwrap();
        assert_eq!(not_after_days(&other.path().join("ca.pem")), 20);
        assert_eq!(not_after_days(&other.path().join("master.pem")), 2);
        assert!(matches!(
            issue_days(dir.path(), Role::Agent, "z", "z", 0),
            Err(TlsError::BadDays { days: 0 })
        ));
    }

    #[test]
    fn keys_are_0600_and_nothing_is_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), "fw", false).unwrap();
        issue(dir.path(), Role::Agent, "node1", "node1").unwrap();
        for key in ["ca-key.pem", "master-key.pem", "operator-key.pem", "node1-key.pem", HTTP_TOKEN_FILE] {
            let mode = fs::metadata(dir.path().join(key)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{key}");
        }
        let before = fs::read(dir.path().join("node1-key.pem")).unwrap();
        let err = issue(dir.path(), Role::Agent, "node1", "node1").unwrap_err();
        assert!(matches!(&err, TlsError::FileExists { path } if path.ends_with("node1.pem")), "{err}");
        assert_eq!(fs::read(dir.path().join("node1-key.pem")).unwrap(), before);
        // A stray key alone is not replaced either, and no certificate is written beside it.
        fs::write(dir.path().join("lone-key.pem"), "x").unwrap();
        let err = issue(dir.path(), Role::Agent, "lone", "lone").unwrap_err();
        assert!(matches!(&err, TlsError::FileExists { path } if path.ends_with("lone-key.pem")), "{err}");
        assert!(!dir.path().join("lone.pem").exists());
        // --force replaces the whole set, keys still 0600.
        let old_ca = fs::read(dir.path().join("ca-key.pem")).unwrap();
        init(dir.path(), "fw", true).unwrap();
        assert_ne!(fs::read(dir.path().join("ca-key.pem")).unwrap(), old_ca);
        let mode = fs::metadata(dir.path().join("ca-key.pem")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn reserved_and_malformed_names_are_refused() {
        for bad in [
            "ca",
            "ca-key",
            "master",
            "operator",
            "agent",
            "framework",
            "x-key",
            "",
            ".hidden",
            "-x",
            "a/b",
            "é",
        ] {
            assert!(matches!(check_name(bad), Err(TlsError::BadName { .. })), "{bad:?}");
        }
        assert!(check_name(&"a".repeat(MAX_NAME_LEN + 1)).is_err());
        for good in ["node7", "alice", "team.batch_2", "ops-1"] {
            check_name(good).unwrap();
        }
    }

    #[test]
    fn revoke_appends_serials_once() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), "fw", false).unwrap();
        issue(dir.path(), Role::Framework, "bob", "bob").unwrap();
        let serial = serial_of(&load_certs(&dir.path().join("bob.pem")).unwrap()[0]).unwrap();
        let list = dir.path().join(REVOKED_FILE);
        assert_eq!(
            revoke(dir.path(), "bob").unwrap(),
            Revoked::Added { serial: serial.clone(), list: list.clone() }
        );
        assert_eq!(
            revoke(dir.path(), "bob").unwrap(),
            Revoked::Already { serial: serial.clone(), list: list.clone() }
        );
        let parsed = load_revoked(&list).unwrap();
        assert_eq!(parsed.len(), 1);
        assert!(parsed[&serial].starts_with("bob "));
        assert!(matches!(revoke(dir.path(), "ca"), Err(TlsError::BadName { .. })));
        assert!(matches!(revoke(dir.path(), "nobody"), Err(TlsError::Read { .. })));
        // openssl's spelling (colons, upper case, a sign byte) is the same serial.
        let spelled = format!("00:{}", serial.to_uppercase());
        assert!(parse_revoked(&spelled).unwrap().contains_key(&serial));
        assert_eq!(parse_revoked("# c\n\nzz x").unwrap_err().0, 3);
    }
}
