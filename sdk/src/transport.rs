//! QUIC endpoints with mutual TLS: every peer shows a certificate signed by the cluster CA.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::proto::ALPN;
use crate::tls::{identity_of, load_certs, load_key, Identity, TlsError, TlsFiles};

/// QUIC keep-alive: sent often enough that NATs and the idle timer never fire on a live peer.
pub const KEEP_ALIVE: Duration = Duration::from_secs(4);
/// A peer silent for this long (no packets at all, not even keep-alives) is gone.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(files: &TlsFiles) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(&files.ca)? {
        roots.add(c)?;
    }
    Ok(roots)
}

/// The transport settings every Agora endpoint uses.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE));
    // IdleTimeout from a VarInt counts milliseconds.
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
        IDLE_TIMEOUT.as_millis() as u32
    ))));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1024));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(16));
    t
}

/// Server side (the master): requires a client certificate signed by the cluster CA.
pub fn server_config(files: &TlsFiles) -> Result<quinn::ServerConfig, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(files)?), provider())
        .build()
        .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(transport_config()));
    Ok(cfg)
}

/// Client side: trusts only the cluster CA and presents its own certificate.
pub fn client_config(files: &TlsFiles) -> Result<quinn::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(files)?)
        .with_client_auth_cert(load_certs(&files.cert)?, load_key(&files.key)?)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(transport_config()));
    Ok(cfg)
}

/// A client endpoint on an ephemeral port of the right address family for `peer`.
pub fn client_endpoint(files: &TlsFiles, peer: SocketAddr) -> Result<quinn::Endpoint, std::io::Error> {
    let bind: SocketAddr =
        if peer.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    let mut ep = quinn::Endpoint::client(bind)?;
    let cfg = client_config(files).map_err(std::io::Error::other)?;
    ep.set_default_client_config(cfg);
    Ok(ep)
}

/// The verified identity of the peer of a connection (server side).
pub fn peer_identity(conn: &quinn::Connection) -> Result<Identity, TlsError> {
    identity_of(&peer_certificate(conn)?)
}

/// The verified certificate of the peer of a connection (server side), DER.
pub fn peer_certificate(
    conn: &quinn::Connection,
) -> Result<rustls_pki_types::CertificateDer<'static>, TlsError> {
    let any = conn.peer_identity().ok_or(TlsError::NoPeerCertificate)?;
    let mut certs = any
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .map_err(|_| TlsError::NoPeerCertificate)?;
    if certs.is_empty() {
        return Err(TlsError::NoPeerCertificate);
    }
    Ok(certs.swap_remove(0))
}
