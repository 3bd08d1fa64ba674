//! The operator's admin server: `/health` (liveness), `/ready` (caches synced), `/metrics`.
//!
//! Its routes are its own (the proxy's `crate::admin` routes read the data plane's snapshot,
//! which the operator has none of); the serving loop and response helpers are shared.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::metrics::OperatorMetrics;
use crate::admin;
use crate::kube::lease::Leadership;

/// What the operator's admin endpoints read.
pub struct OperatorAdmin {
    /// The metric families.
    pub metrics: Arc<OperatorMetrics>,
    /// Whether this replica leads.
    pub leadership: Leadership,
    /// Set once every cache completed its first list.
    pub synced: AtomicBool,
    /// This replica's identity.
    pub identity: String,
    /// Process start, for `uptime_seconds`.
    pub started: Instant,
}

/// Serves the admin API on `listener` until `stop` is cancelled.
pub async fn serve(listener: TcpListener, admin: Arc<OperatorAdmin>, stop: CancellationToken) {
    admin::serve_routes(listener, stop, move |req| route(&admin, req)).await;
}

fn route(admin: &OperatorAdmin, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if let Some(refused) = admin::reject_non_get(req) {
        return refused;
    }
    let synced = admin.synced.load(Ordering::Acquire);
    match req.uri().path() {
        "/health" => admin::json_response(
            StatusCode::OK,
            &json!({
                "status": if synced { "ok" } else { "starting" },
                "role": "operator",
                "identity": admin.identity,
                "leader": admin.leadership.is_leader(),
                "caches_synced": synced,
                "uptime_seconds": admin.started.elapsed().as_secs(),
            }),
        ),
        "/ready" if synced => admin::text(StatusCode::OK, "ready\n"),
        "/ready" => admin::text(StatusCode::SERVICE_UNAVAILABLE, "caches not synced yet\n"),
        "/metrics" => admin::metrics_response(admin.metrics.render()),
        _ => admin::text(
            StatusCode::NOT_FOUND,
            "not found; try /health, /ready or /metrics\n",
        ),
    }
}
