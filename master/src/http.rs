//! The master's read-only HTTP endpoint for browsers, scripts and Prometheus:
//! `GET /api/v1/state` (version, master id, address and flags, then agents, frameworks and
//! tasks as JSON, as Mesos's `/state`), `GET /metrics` (Prometheus text),
//! `GET /health`. It reads the core through the same [`MasterHandle`] queries as the CLI.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;
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
    /// The master's flags (name → value), shown by `/api/v1/state`.
    flags: Arc<serde_json::Map<String, serde_json::Value>>,
}

/// Binds `addr` and serves until `shutdown`; returns the bound address. `/api/v1/state` shows
/// no flags: see [`spawn_with_flags`].
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
    // Named here: the caller's error carries no address, and the QUIC one's does.
    let named =
        |e: std::io::Error| std::io::Error::new(e.kind(), format!("cannot listen on {addr} (HTTP): {e}"));
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(named)?;
    let local = listener.local_addr().map_err(named)?;
    let app = Router::new()
        .route("/api/v1/state", get(state))
        .route("/metrics", get(metrics))
        .route("/health", get(|| async { "ok\n" }))
        .with_state(AppState { master, metrics: prometheus(), flags: Arc::new(flags) });
    info!(addr = %local, "HTTP endpoint listening (/api/v1/state, /metrics)");
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
