//! TLS hygiene through the real `agora` binary: `tls issue` refuses reserved and existing
//! names, `--days` sets the lifetime, and a certificate `agora tls revoke` lists is refused by
//! a running master over QUIC (the master rereads its list when the file changes).

mod common;

use std::path::Path;
use std::process::{Command, Output};

use agora_sdk::client::{ClientError, Session};
use agora_sdk::proto::{ErrorCode, Role};
use agora_sdk::tls::TlsFiles;
use common::dev::{RealCluster, AGORA};

fn agora(args: &[&str], tls: &Path) -> Output {
    let mut cmd = Command::new(AGORA);
    cmd.args(["tls"]).args(&args[..1]).arg("--dir").arg(tls).args(&args[1..]);
    cmd.output().expect("run agora tls")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn issue_refuses_reserved_and_existing_names_and_honours_days() {
    let dir = RealCluster::prepare();
    let tls = dir.path().join("tls");
    let ca_key = std::fs::read(tls.join("ca-key.pem")).expect("ca key");
    for reserved in ["ca", "master", "operator", "ca-key"] {
        let out = agora(&["issue", "--role", "framework", "--name", reserved], &tls);
        assert!(!out.status.success(), "{reserved}: {out:?}");
        assert!(stderr(&out).contains("reserved"), "{reserved}: {}", stderr(&out));
    }
    assert_eq!(std::fs::read(tls.join("ca-key.pem")).expect("ca key"), ca_key, "the CA key was replaced");

    let out = agora(&["issue", "--role", "framework", "--name", "alice", "--days", "30"], &tls);
    assert!(out.status.success(), "{out:?}");
    let key = std::fs::read(tls.join("alice-key.pem")).expect("key");
    let out = agora(&["issue", "--role", "agent", "--name", "alice"], &tls);
    assert!(!out.status.success(), "{out:?}");
    let err = stderr(&out);
    assert!(err.contains("alice.pem") && err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(tls.join("alice-key.pem")).expect("key"), key, "alice's key was replaced");

    // notAfter: 30 days after notBefore (which is an hour in the past for clock skew).
    let der = agora_sdk::tls::load_certs(&tls.join("alice.pem")).expect("cert").swap_remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("x509");
    let v = cert.validity();
    assert_eq!(v.not_after.timestamp() - v.not_before.timestamp(), 30 * 86_400 + 3600);
    let out = agora(&["issue", "--role", "agent", "--name", "bob", "--days", "0"], &tls);
    assert!(!out.status.success() && stderr(&out).contains("lifetime"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_framework_certificate_is_refused_by_a_running_master() {
    let c = RealCluster::master_only(RealCluster::prepare(), &[]);
    for name in ["rogue", "honest"] {
        let out = agora(&["issue", "--role", "framework", "--name", name], &c.tls);
        assert!(out.status.success(), "{out:?}");
    }
    let rogue = TlsFiles::in_dir(&c.tls, "rogue");
    let honest = TlsFiles::in_dir(&c.tls, "honest");
    let open = Session::connect(&c.addr, &rogue, Role::Framework).await.expect("rogue before its revocation");

    // Revoked after the master started: the master sees the new list on the next connection.
    let out = agora(&["revoke", "rogue"], &c.tls);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("Revoked `rogue`"), "{out:?}");
    match Session::connect(&c.addr, &rogue, Role::Framework).await {
        Err(ClientError::Refused(e)) => {
            assert_eq!(e.code, ErrorCode::Unauthorized);
            assert!(e.message.contains("`rogue`") && e.message.contains("revoked"), "{}", e.message);
        }
        Err(e) => panic!("refused for the wrong reason: {e}"),
        Ok(_) => panic!("a revoked certificate was welcomed"),
    }
    // The connection rogue opened before is cut too (the master's watcher sees the new list).
    let reason = tokio::time::timeout(std::time::Duration::from_secs(20), open.conn.closed())
        .await
        .expect("rogue's open connection closed");
    assert!(reason.to_string().contains("revoked"), "{reason}");
    Session::connect(&c.addr, &honest, Role::Framework).await.expect("another framework still connects");
    // Revoking twice says so and changes nothing.
    let out = agora(&["revoke", "rogue"], &c.tls);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("already"), "{out:?}");
}
