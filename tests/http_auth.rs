//! The master's HTTP endpoint behind the operator's token (`agora master --http-token-file`,
//! the `http-token` of `agora tls init`): `/health` open, everything else 401 without the
//! token, the browser's way in (form or `?token=` → HttpOnly cookie), a non-loopback `--http`
//! without a token refused, and no task's environment or arguments in what it serves.

mod common;

use std::io::{Read, Write};
use std::process::Command;

use common::dev::{RealCluster, AGORA};

/// One HTTP/1.1 exchange: the status line, the headers (lowercase names) and the body.
fn exchange(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("http response");
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("status");
    (status, head.to_ascii_lowercase(), body.to_string())
}

fn with_token(c: &RealCluster) -> (String, String) {
    let http = c.http.clone().expect("--http");
    let token = std::fs::read_to_string(c.tls.join("http-token")).expect("token").trim().to_string();
    (http, token)
}

fn start(agent: bool) -> RealCluster {
    let dir = RealCluster::prepare();
    let token = dir.path().join("tls/http-token");
    let token = token.to_str().expect("utf-8 path").to_string();
    let mut c =
        RealCluster::master_on(dir, "127.0.0.1:0", &["--http", "127.0.0.1:0", "--http-token-file", &token]);
    if agent {
        c.start_agent(&["--resources", "cpus:2;mem:1GiB"]);
    }
    c
}

#[test]
fn everything_but_health_needs_the_operator_token() {
    let c = start(false);
    let (http, token) = with_token(&c);
    let bearer = format!("Bearer {token}");
    assert_eq!(exchange(&http, "GET", "/health", &[], "").0, 200);
    for path in ["/api/v1/state", "/metrics", "/", "/tasks", "/agents", "/ui/api/overview", "/ui/ui.js"] {
        let (status, head, _) = exchange(&http, "GET", path, &[], "");
        assert_eq!(status, 401, "{path} without a token");
        assert!(head.contains("www-authenticate: bearer"), "{head}");
        let (status, _, _) =
            exchange(&http, "GET", path, &[("Authorization", "Bearer not-the-token-at-all")], "");
        assert_eq!(status, 401, "{path} with a wrong token");
        let (status, _, _) = exchange(&http, "GET", path, &[("Authorization", &bearer)], "");
        assert_eq!(status, 200, "{path} with the token");
    }
    // A browser: the sign-in form, then a cookie from the form or from ?token=.
    let (status, _, body) = exchange(&http, "GET", "/tasks", &[("Accept", "text/html")], "");
    assert!(status == 401 && body.contains("<form method=\"post\" action=\"/login\""), "{body}");
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let (status, head, _) = exchange(&http, "POST", "/login", &form, "token=wrong-wrong-wrong-wrong");
    assert!(status == 401 && !head.contains("set-cookie"), "a wrong token gets no cookie: {head}");
    let (status, head, _) = exchange(&http, "POST", "/login", &form, &format!("token={token}"));
    assert_eq!(status, 303);
    assert!(head.contains(&format!("set-cookie: agora_token={token}; httponly")), "{head}");
    let (status, head, _) = exchange(&http, "GET", &format!("/tasks?token={token}"), &[], "");
    assert_eq!(status, 303);
    assert!(head.contains("location: /tasks\r\n") && head.contains("httponly"), "{head}");
    let cookie = format!("other=1; agora_token={token}");
    assert_eq!(exchange(&http, "GET", "/tasks", &[("Cookie", &cookie)], "").0, 200);
    assert_eq!(exchange(&http, "GET", "/tasks", &[("Cookie", "agora_token=nope-nope-nope-nope")], "").0, 401);
}

#[test]
fn a_network_http_address_without_a_token_is_refused() {
    let dir = RealCluster::prepare();
    let out = Command::new(AGORA)
        .args(["master", "--listen", "127.0.0.1:0", "--http", "0.0.0.0:0", "--tls-dir"])
        .arg(dir.path().join("tls"))
        .output()
        .expect("agora master");
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a loopback address") && err.contains("--http-token-file"), "{err}");
    // A token file others can read is refused too.
    let token = dir.path().join("tls/http-token");
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o644)).expect("chmod");
    let out = Command::new(AGORA)
        .args(["master", "--listen", "127.0.0.1:0", "--http", "0.0.0.0:0", "--http-token-file"])
        .arg(&token)
        .arg("--tls-dir")
        .arg(dir.path().join("tls"))
        .output()
        .expect("agora master");
    assert!(!out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"), "{out:?}");
}

#[test]
fn task_environment_and_arguments_are_never_served() {
    let c = start(true);
    let (http, token) = with_token(&c);
    let bearer = format!("Bearer {token}");
    let out = c.agora(&[
        "run",
        "--env",
        "DB_PASSWORD=env-value-hunter2",
        "--",
        "sh",
        "-c",
        "test -n \"$DB_PASSWORD\"; exit 0",
        "arg-secret-swordfish",
    ]);
    assert!(out.status.success(), "{out:?}");
    let (status, _, state) = exchange(&http, "GET", "/api/v1/state", &[("Authorization", &bearer)], "");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&state).expect("json");
    let task = &v["tasks"][0];
    assert!(task["id"].is_string(), "{state}");
    let page = format!(
        "/tasks/{}?framework={}",
        task["id"].as_str().expect("id"),
        task["framework_id"].as_str().expect("framework")
    );
    let (status, _, page) = exchange(&http, "GET", &page, &[("Authorization", &bearer)], "");
    assert_eq!(status, 200, "{page}");
    for served in [&state, &page] {
        for secret in ["env-value-hunter2", "arg-secret-swordfish", "test -n"] {
            assert!(!served.contains(secret), "`{secret}` served: {served}");
        }
    }
}
