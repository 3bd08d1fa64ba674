//! The operator's admin server: `/health` (liveness), `/ready` (caches synced), `/metrics`.
//!
//! Deliberately separate from the proxy's `crate::admin`, which reads the data plane's
//! snapshot; the operator has none.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::metrics::OperatorMetrics;
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
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    tracing::warn!(%err, "operator admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let admin = Arc::clone(&admin);
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let admin = Arc::clone(&admin);
                async move { Ok::<_, Infallible>(route(&admin, &req)) }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new());
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

fn route(admin: &OperatorAdmin, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD are served here\n",
        );
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    let synced = admin.synced.load(Ordering::Acquire);
    match req.uri().path() {
        "/health" => {
            let body = json!({
                "status": if synced { "ok" } else { "starting" },
                "role": "operator",
                "identity": admin.identity,
                "leader": admin.leadership.is_leader(),
                "caches_synced": synced,
                "uptime_seconds": admin.started.elapsed().as_secs(),
            });
            let mut resp = Response::new(Full::new(Bytes::from(
                serde_json::to_vec_pretty(&body).unwrap_or_default(),
            )));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        "/ready" if synced => text(StatusCode::OK, "ready\n"),
        "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "caches not synced yet\n"),
        "/metrics" => {
            let mut resp = Response::new(Full::new(Bytes::from(admin.metrics.render())));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /health, /ready or /metrics\n",
        ),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
