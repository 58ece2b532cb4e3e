//! The master's read-only HTTP endpoint for browsers, scripts and Prometheus:
//! `GET /api/v1/state` (version, master id, address and flags, then agents, frameworks and
//! tasks as JSON, as Mesos's `/state`), `GET /metrics` (Prometheus text),
//! `GET /health`, and the web UI: `/` (overview with pictures), `/agents`, `/agents/{id}`,
//! `/frameworks`, `/tasks` (filters, pages), `/tasks/{id}` (with the tail of its output), kept
//! current by a small embedded script polling `/ui/api/...`. It reads the core through the
//! same [`MasterHandle`] queries as the CLI.
//!
//! `/health` is open; everything else needs the operator's token unless the endpoint listens
//! on loopback without one (see [`auth`]). Nothing secret is served: task views carry no
//! command line, arguments or environment.

pub mod auth;
mod files;
mod history;
mod logs;
mod ui;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use agora_sdk::proto::{FrameworkId, OutputStream, TaskId, TaskView};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use maud::Markup;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::server::MasterHandle;

/// Installs the process-wide Prometheus recorder once; later calls get the same handle.
/// `None` when another recorder was installed first.
pub fn prometheus() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| match PrometheusBuilder::new().install_recorder() {
            Ok(h) => {
                crate::metrics::describe();
                Some(h)
            }
            Err(e) => {
                warn!(error = %e, "metrics recorder not installed; /metrics will be empty");
                None
            }
        })
        .clone()
}

#[derive(Clone)]
struct AppState {
    master: MasterHandle,
    metrics: Option<PrometheusHandle>,
    history: history::History,
    /// The master's flags (name → value), shown by `/api/v1/state`.
    flags: Arc<serde_json::Map<String, serde_json::Value>>,
}

/// Binds `addr` and serves until `shutdown`; returns the bound address. `/api/v1/state` shows
/// no flags: see [`spawn_with_flags`]. No token: `addr` must be loopback (see [`spawn_with_auth`]).
pub async fn spawn(
    addr: SocketAddr,
    master: MasterHandle,
    shutdown: CancellationToken,
) -> Result<SocketAddr, std::io::Error> {
    spawn_with_flags(addr, master, serde_json::Map::new(), shutdown).await
}

/// [`spawn`], `/api/v1/state` showing `flags` (as Mesos's `/state` does: name → value, the
/// defaults included).
pub async fn spawn_with_flags(
    addr: SocketAddr,
    master: MasterHandle,
    flags: serde_json::Map<String, serde_json::Value>,
    shutdown: CancellationToken,
) -> Result<SocketAddr, std::io::Error> {
    let auth = auth::HttpAuth::for_addr(addr, None).map_err(std::io::Error::other)?;
    spawn_with_auth(addr, master, flags, auth, shutdown).await
}

/// [`spawn_with_flags`] with an access rule: build it with [`auth::HttpAuth::for_addr`], which
/// refuses a non-loopback address without a token.
pub async fn spawn_with_auth(
    addr: SocketAddr,
    master: MasterHandle,
    flags: serde_json::Map<String, serde_json::Value>,
    auth: auth::HttpAuth,
    shutdown: CancellationToken,
) -> Result<SocketAddr, std::io::Error> {
    // Named here: the caller's error carries no address, and the QUIC one's does.
    let named =
        |e: std::io::Error| std::io::Error::new(e.kind(), format!("cannot listen on {addr} (HTTP): {e}"));
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(named)?;
    let local = listener.local_addr().map_err(named)?;
    let history = history::History::default();
    history.spawn_sampler(master.clone(), shutdown.clone());
    let app = Router::new()
        .route("/api/v1/state", get(state))
        .route("/metrics", get(metrics))
        .route("/health", get(|| async { "ok\n" }))
        .route("/", get(overview))
        .route("/agents", get(agents))
        .route("/agents/{id}", get(agent))
        .route("/frameworks", get(frameworks))
        .route("/tasks", get(tasks))
        .route("/tasks/{id}", get(task))
        .route("/tasks/{id}/files", get(task_files))
        .route("/tasks/{id}/file", get(task_file))
        .route("/ui/ui.css", get(|| async { static_file("text/css; charset=utf-8", include_str!("ui.css")) }))
        .route(
            "/ui/ui.js",
            get(|| async { static_file("text/javascript; charset=utf-8", include_str!("ui.js")) }),
        )
        .route("/ui/api/overview", get(overview_api))
        .route("/ui/api/tasks/{id}", get(task_api))
        .with_state(AppState { master, metrics: prometheus(), history, flags: Arc::new(flags) })
        .route(
            "/login",
            post({
                let auth = auth.clone();
                move |headers, body| auth::login(auth.clone(), headers, body)
            }),
        )
        .layer(axum::middleware::from_fn_with_state(auth.clone(), auth::require));
    let access = if auth.required() { "operator token required" } else { "open: loopback" };
    info!(addr = %local, access, "HTTP endpoint listening (web UI at /, /api/v1/state, /metrics)");
    tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned());
        if let Err(e) = serve.await {
            warn!(error = %e, "HTTP endpoint stopped");
        }
    });
    Ok(local)
}

async fn state(State(s): State<AppState>) -> impl IntoResponse {
    let agents = s.master.agents().await;
    let frameworks = s.master.frameworks().await;
    let tasks = s.master.tasks().await;
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "master_id": s.master.master_id,
        "address": s.master.addr.to_string(),
        "flags": *s.flags,
        "agents": agents.iter().map(agora_sdk::json::agent_json).collect::<Vec<_>>(),
        "frameworks": frameworks.iter().map(agora_sdk::json::framework_json).collect::<Vec<_>>(),
        "tasks": tasks.iter().map(agora_sdk::json::task_json).collect::<Vec<_>>(),
        "pending_tasks": s.master.pending_tasks().await.iter().map(agora_sdk::json::pending_task_json).collect::<Vec<_>>(),
    }))
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    match &s.metrics {
        Some(h) => (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4")], h.render()),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain")],
            "metrics recorder unavailable\n".to_string(),
        ),
    }
}

fn static_file(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "max-age=300")], body).into_response()
}

fn html(m: Markup) -> Response {
    Html(m.into_string()).into_response()
}

fn not_found(what: String) -> Response {
    (StatusCode::NOT_FOUND, Html(ui::not_found(&what).into_string())).into_response()
}

async fn overview(State(s): State<AppState>) -> Response {
    let (agents, frameworks, tasks) =
        (s.master.agents().await, s.master.frameworks().await, s.master.tasks().await);
    html(ui::overview(s.master.is_leader(), &agents, &frameworks, &tasks, history::charts(&s.history)))
}

async fn agents(State(s): State<AppState>) -> Response {
    html(ui::agents(&s.master.agents().await))
}

async fn agent(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    let agents = s.master.agents().await;
    let Some(a) = agents.iter().find(|a| a.id.as_str() == id) else {
        return not_found(format!("No agent {id}."));
    };
    let tasks = s.master.tasks().await;
    let mine: Vec<&TaskView> = tasks.iter().filter(|t| t.agent_id == a.id).collect();
    html(ui::agent(a, &mine))
}

async fn frameworks(State(s): State<AppState>) -> Response {
    let (frameworks, agents) = (s.master.frameworks().await, s.master.agents().await);
    html(ui::frameworks(&frameworks, &agents))
}

async fn tasks(State(s): State<AppState>, Query(filter): Query<ui::TaskFilter>) -> Response {
    let (tasks, pending) = tokio::join!(s.master.tasks(), s.master.pending_tasks());
    html(ui::tasks(&tasks, &pending, &filter))
}

/// `?framework=` of a task's page and API (tasks of several frameworks may share an id).
#[derive(Debug, Default, serde::Deserialize)]
struct TaskQuery {
    #[serde(default)]
    framework: String,
    /// Where the page's stdout and stderr end (the API sends what follows).
    stdout: Option<u64>,
    stderr: Option<u64>,
}

/// The task `id` (of `framework` when given), or the page that says why there is none (boxed:
/// a response is large and this is not a hot path).
fn find_task(tasks: Vec<TaskView>, id: &str, framework: &str) -> Result<TaskView, Box<Response>> {
    let matching: Vec<&TaskView> = tasks
        .iter()
        .filter(|t| t.id.as_str() == id && (framework.is_empty() || t.framework_id.as_str() == framework))
        .collect();
    match matching.len() {
        0 => Err(Box::new(not_found(format!("No task {id}.")))),
        1 => Ok(matching[0].clone()),
        _ => Err(Box::new(html(ui::ambiguous(id, &matching)))),
    }
}

async fn task(State(s): State<AppState>, Path(id): Path<String>, Query(q): Query<TaskQuery>) -> Response {
    let t = match find_task(s.master.tasks().await, &id, &q.framework) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    let (stdout, stderr, history, sandbox) = tokio::join!(
        logs::tail(&s.master, &t.id, &t.framework_id, OutputStream::Stdout),
        logs::tail(&s.master, &t.id, &t.framework_id, OutputStream::Stderr),
        s.master.task_history(&t.framework_id, &t.id),
        files::list(&s.master, &t.id, &t.framework_id, ""),
    );
    html(ui::task(&t, &history.unwrap_or_default(), stdout, stderr, sandbox))
}

/// `?framework=&path=` of the sandbox pages, and `download=1` for a file as an attachment.
#[derive(Debug, Default, serde::Deserialize)]
struct FileQuery {
    #[serde(default)]
    framework: String,
    #[serde(default)]
    path: String,
    #[serde(default)]
    download: Option<String>,
}

/// `/tasks/{id}/files`: a directory of the task's sandbox.
async fn task_files(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
) -> Response {
    let t = match find_task(s.master.tasks().await, &id, &q.framework) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    let listing = files::list(&s.master, &t.id, &t.framework_id, &q.path).await;
    html(ui::files(&t, &q.path, listing))
}

/// `/tasks/{id}/file`: a file of the task's sandbox, shown (at most [`files::VIEW_MAX`]) or
/// downloaded.
async fn task_file(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
) -> Response {
    let t = match find_task(s.master.tasks().await, &id, &q.framework) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    let download = q.download.as_deref().is_some_and(|d| !d.is_empty() && d != "0");
    match files::open(&s.master, &t.id, &t.framework_id, &q.path).await {
        Ok(d) if !download && d.size > files::VIEW_MAX => {
            html(ui::too_large(&t, &q.path, d.size, files::VIEW_MAX))
        }
        Ok(d) => files::respond(d, &q.path, download),
        Err(e) => {
            let status = match e.code {
                agora_sdk::proto::ErrorCode::NotFound => StatusCode::NOT_FOUND,
                agora_sdk::proto::ErrorCode::Invalid => StatusCode::BAD_REQUEST,
                _ => StatusCode::BAD_GATEWAY,
            };
            (status, Html(ui::not_found(&format!("{}: {}", q.path, e.message)).into_string())).into_response()
        }
    }
}

/// What the overview's script refreshes: task counts by state.
async fn overview_api(State(s): State<AppState>) -> Response {
    let tasks = s.master.tasks().await;
    Json(json!({ "total": tasks.len(), "counts": ui::counts(&tasks).into_iter().map(|(k, n)| (k.to_string(), json!(n))).collect::<serde_json::Map<_, _>>() })).into_response()
}

/// What the task page's script refreshes: the task's state, reason, exit, usage, and the
/// output after the offsets it has.
async fn task_api(State(s): State<AppState>, Path(id): Path<String>, Query(q): Query<TaskQuery>) -> Response {
    let t = match find_task(s.master.tasks().await, &id, &q.framework) {
        Ok(t) => t,
        Err(_) => {
            return (StatusCode::NOT_FOUND, Json(json!({ "error": format!("no task {id}") }))).into_response()
        }
    };
    let piece = |stream, offset: Option<u64>| {
        let (master, task, fw): (&MasterHandle, &TaskId, &FrameworkId) = (&s.master, &t.id, &t.framework_id);
        async move {
            match offset {
                None => Value::Null,
                Some(o) => match logs::after(master, task, fw, stream, o).await {
                    Ok(p) => json!({ "offset": p.offset, "next": p.next, "text": p.text }),
                    Err(e) => json!({ "error": e.message }),
                },
            }
        }
    };
    let (stdout, stderr) =
        tokio::join!(piece(OutputStream::Stdout, q.stdout), piece(OutputStream::Stderr, q.stderr));
    Json(json!({
        "state": t.state.as_str(),
        "terminal": t.state.is_terminal(),
        "reason": t.reason,
        "message": t.message,
        "exit": ui::exit_text(&t),
        "usage": ui::usage_text(&t.usage).into_iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>(),
        "stdout": stdout,
        "stderr": stderr,
    }))
    .into_response()
}
