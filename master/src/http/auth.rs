//! Who may read the HTTP endpoint. `/health` is open to all. Everything else (the web UI,
//! `/api/v1/state`, `/metrics`) is open only on a loopback address without a token; with a
//! token (`agora master --http-token-file`, the `http-token` file `agora tls init` writes)
//! every request must show it: `Authorization: Bearer TOKEN` for scripts and Prometheus, or
//! the `agora_token` cookie a browser gets once it typed the token into the login form (or
//! opened a page with `?token=TOKEN`). A non-loopback address without a token is refused
//! ([`HttpAuth::for_addr`]): the endpoint lists every task and framework of the cluster.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};

/// The cookie that carries the token for browsers.
pub const COOKIE: &str = "agora_token";
/// Shortest token accepted from a token file.
pub const MIN_TOKEN_LEN: usize = 16;
/// Largest token file read (a token is one line).
const MAX_TOKEN_FILE: u64 = 4096;

/// Why the HTTP endpoint cannot start with these settings.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(
        "--http {0} is not a loopback address and no --http-token-file was given: the endpoint \
         shows every task and framework of the cluster, so it needs the operator's token there \
         (`agora tls init` writes one, `http-token`), or listen on 127.0.0.1"
    )]
    OpenOnNetwork(SocketAddr),
    #[error("cannot read the HTTP token file {path}: {err}")]
    Read { path: String, err: std::io::Error },
    #[error("HTTP token file {path} is readable by others (mode {mode:o}): `chmod 600 {path}`")]
    Exposed { path: String, mode: u32 },
    #[error("HTTP token file {path} holds no usable token (one line of at least {MIN_TOKEN_LEN} visible characters)")]
    Bad { path: String },
}

/// The endpoint's access rule.
#[derive(Clone, Debug)]
pub struct HttpAuth {
    /// `None`: open (loopback only).
    token: Option<Arc<str>>,
}

impl HttpAuth {
    /// Requests need `token` (wherever the endpoint listens).
    pub fn token(token: &str) -> Self {
        HttpAuth { token: Some(token.into()) }
    }

    /// The rule for listening on `addr`: a token when given, open on loopback without one, and
    /// [`AuthError::OpenOnNetwork`] otherwise.
    pub fn for_addr(addr: SocketAddr, token: Option<&str>) -> Result<Self, AuthError> {
        match token {
            Some(t) => Ok(Self::token(t)),
            None if addr.ip().is_loopback() => Ok(HttpAuth { token: None }),
            None => Err(AuthError::OpenOnNetwork(addr)),
        }
    }

    /// Whether requests need the token.
    pub fn required(&self) -> bool {
        self.token.is_some()
    }

    fn accepts(&self, candidate: &str) -> bool {
        self.token.as_deref().is_some_and(|t| constant_time_eq(t.as_bytes(), candidate.as_bytes()))
    }
}

/// Reads a token file: its first line, trimmed; the file must not be readable by group or
/// others (as ssh treats private keys).
pub fn read_token_file(path: &Path) -> Result<String, AuthError> {
    use std::io::Read as _;
    use std::os::unix::fs::PermissionsExt as _;
    let name = path.display().to_string();
    let rerr = |err| AuthError::Read { path: name.clone(), err };
    let file = std::fs::File::open(path).map_err(rerr)?;
    let mode = file.metadata().map_err(rerr)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(AuthError::Exposed { path: name, mode });
    }
    let mut text = String::new();
    file.take(MAX_TOKEN_FILE).read_to_string(&mut text).map_err(rerr)?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.len() < MIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AuthError::Bad { path: name });
    }
    Ok(token.to_string())
}

/// Compares without stopping at the first difference (the time taken says nothing of how
/// much of a guess was right; only the length may show).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn cookie(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

#[derive(serde::Deserialize)]
struct TokenParam {
    token: Option<String>,
}

fn token_param(uri: &Uri) -> Option<String> {
    Query::<TokenParam>::try_from_uri(uri).ok()?.0.token
}

/// A redirect to `to` that hands the browser its cookie.
fn with_cookie(auth: &HttpAuth, to: &str) -> Response {
    let token = auth.token.as_deref().unwrap_or("");
    let cookie = format!("{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/");
    let mut r = (StatusCode::SEE_OTHER, [(header::LOCATION, to)]).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// What a request without the token gets: a login form for browsers, a short text otherwise.
fn unauthorized(headers: &HeaderMap, wrong: bool) -> Response {
    let html =
        headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("text/html"));
    let challenge = [(header::WWW_AUTHENTICATE, "Bearer realm=\"agora\"")];
    if html {
        let note = if wrong { "<p class=\"error\">That token is not this master's.</p>" } else { "" };
        let page = format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>Agora: sign in</title>\
             <link rel=\"stylesheet\" href=\"/ui/ui.css\"></head><body><main><h1>Agora</h1>\
             <p>This master's web UI needs the operator's HTTP token (the <code>http-token</code> \
             file <code>agora tls init</code> wrote).</p>{note}\
             <form method=\"post\" action=\"/login\"><input type=\"password\" name=\"token\" \
             autocomplete=\"current-password\" autofocus> <button type=\"submit\">Sign in</button>\
             </form></main></body></html>"
        );
        (StatusCode::UNAUTHORIZED, challenge, Html(page)).into_response()
    } else {
        let text = "the operator's HTTP token is required: Authorization: Bearer TOKEN\n";
        (StatusCode::UNAUTHORIZED, challenge, text).into_response()
    }
}

/// `POST /login` with the form field `token`: the cookie and a redirect to `/`, or the form
/// again.
pub async fn login(auth: HttpAuth, headers: HeaderMap, body: Bytes) -> Response {
    if !auth.required() {
        return (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
    }
    // The form body is a query string: decoded by the same code as `?token=`.
    let uri = std::str::from_utf8(&body).ok().and_then(|b| format!("/?{b}").parse::<Uri>().ok());
    match uri.and_then(|u| token_param(&u)) {
        Some(t) if auth.accepts(&t) => with_cookie(&auth, "/"),
        _ => unauthorized(&headers, true),
    }
}

/// The middleware in front of every route but `/health` and `/login`.
pub async fn require(State(auth): State<HttpAuth>, req: Request, next: Next) -> Response {
    if !auth.required() || matches!(req.uri().path(), "/health" | "/login") {
        return next.run(req).await;
    }
    let headers = req.headers();
    if bearer(headers).is_some_and(|t| auth.accepts(t)) || cookie(headers).any(|t| auth.accepts(t)) {
        return next.run(req).await;
    }
    if let Some(t) = token_param(req.uri()) {
        if req.method() == Method::GET && auth.accepts(&t) {
            // The token leaves the address bar: the same page, without its query.
            let path = req.uri().path().to_string();
            return with_cookie(&auth, &path);
        }
        return unauthorized(headers, true);
    }
    unauthorized(headers, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_open_the_network_needs_a_token() {
        assert!(!HttpAuth::for_addr(([127, 0, 0, 1], 80).into(), None).unwrap().required());
        assert!(!HttpAuth::for_addr("[::1]:80".parse().unwrap(), None).unwrap().required());
        let e = HttpAuth::for_addr(([0, 0, 0, 0], 80).into(), None).unwrap_err();
        assert!(e.to_string().contains("--http-token-file"), "{e}");
        assert!(HttpAuth::for_addr(([10, 0, 0, 1], 80).into(), Some("t")).unwrap().required());
        // A token given for loopback is required there too.
        assert!(HttpAuth::for_addr(([127, 0, 0, 1], 80).into(), Some("t")).unwrap().required());
    }

    #[test]
    fn compares_whole_tokens() {
        assert!(constant_time_eq(b"abcdef", b"abcdef"));
        assert!(!constant_time_eq(b"abcdef", b"abcdeg"));
        assert!(!constant_time_eq(b"abcdef", b"abcde"));
        assert!(!constant_time_eq(b"", b"a"));
    }

    #[test]
    fn token_files_must_be_private_and_long_enough() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        std::fs::write(&path, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_token_file(&path).unwrap(), "0123456789abcdef0123");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(read_token_file(&path), Err(AuthError::Exposed { mode: 0o644, .. })));
        std::fs::write(&path, "short\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(read_token_file(&path), Err(AuthError::Bad { .. })));
    }
}
