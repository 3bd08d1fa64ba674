//! The admin server: health, readiness, metrics, per-endpoint state, the effective config and a
//! status page, on its own port so it is never reachable through a traffic listener.

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

use crate::endpoint::Health;
use crate::metrics::Metrics;
use crate::proxy::handler::ProxyState;

/// What the admin endpoints read.
pub struct AdminState {
    /// The data plane's state (snapshot).
    pub proxy: Arc<ProxyState>,
    /// The metric families.
    pub metrics: Arc<Metrics>,
    /// Set once the first configuration is serving.
    pub ready: AtomicBool,
    /// Set when shutdown begins; readiness fails first so load balancers stop sending.
    pub draining: AtomicBool,
    /// Process start, for `uptime_seconds`.
    pub started: Instant,
}

/// Serves the admin API on `listener` until `stop` is cancelled.
pub async fn serve(listener: TcpListener, admin: Arc<AdminState>, stop: CancellationToken) {
    serve_routes(listener, stop, move |req| route(&admin, req)).await;
}

/// Serves `route` over HTTP/1.1 and HTTP/2 on `listener` until `stop` is cancelled; open
/// connections then finish their requests. Shared by the proxy's and the operator's admin
/// servers, which differ only in their routes.
pub async fn serve_routes<R>(listener: TcpListener, stop: CancellationToken, route: R)
where
    R: Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let route = Arc::new(route);
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    tracing::warn!(%err, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let route = Arc::clone(&route);
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let response = route(&req);
                async move { Ok::<_, Infallible>(response) }
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

/// `405` with `Allow: GET, HEAD` for any other method; admin endpoints only read.
pub fn reject_non_get(req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    if req.method() == Method::GET || req.method() == Method::HEAD {
        return None;
    }
    let mut resp = text(
        StatusCode::METHOD_NOT_ALLOWED,
        "only GET and HEAD are served here\n",
    );
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    Some(resp)
}

/// The Prometheus text exposition `body` with its content type.
pub fn metrics_response(body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

fn route(admin: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if let Some(refused) = reject_non_get(req) {
        return refused;
    }
    match req.uri().path() {
        "/health" => json_response(StatusCode::OK, &health(admin)),
        "/ready" => ready(admin),
        "/metrics" => metrics_response(admin.metrics.render()),
        "/backends/health" => json_response(StatusCode::OK, &backends(admin)),
        "/config" => {
            let snapshot = admin.proxy.snapshot.load();
            let policies: Vec<_> = snapshot.policies.iter().map(|p| &p.config).collect();
            json_response(
                StatusCode::OK,
                &json!({"version": snapshot.version, "policies": policies}),
            )
        }
        "/" => {
            let mut resp = Response::new(Full::new(Bytes::from_static(INDEX_HTML.as_bytes())));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            resp
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; see / for the admin endpoints\n",
        ),
    }
}

/// The status page: a self-contained HTML page (no external assets) that renders `/health` and
/// `/backends/health` and refreshes itself, like HAProxy's stats page.
const INDEX_HTML: &str = include_str!("status.html");

fn health(admin: &AdminState) -> serde_json::Value {
    let snapshot = admin.proxy.snapshot.load();
    let mut total = 0u64;
    let mut healthy = 0u64;
    for (_, endpoint) in snapshot.endpoints() {
        total += 1;
        if endpoint.state.health() != Health::Unhealthy
            && endpoint.state.breaker().state() != crate::resilience::breaker::BreakerState::Open
        {
            healthy += 1;
        }
    }
    let status = if admin.draining.load(Ordering::Acquire) {
        "draining"
    } else if !admin.ready.load(Ordering::Acquire) {
        "starting"
    } else if total > 0 && healthy == 0 {
        "unavailable"
    } else if healthy < total {
        "degraded"
    } else {
        "ok"
    };
    json!({
        "status": status,
        "uptime_seconds": admin.started.elapsed().as_secs(),
        "config_version": snapshot.version,
        "policies": snapshot.policies.len(),
        "backends": {"healthy": healthy, "total": total},
        "features": {
            "circuit_breaker": snapshot.policies.iter().any(|p| p.breaker.is_some()),
            "rate_limiting": snapshot.policies.iter().any(|p| p.rate_limits.is_some()),
            "health_checks": snapshot.policies.iter().any(|p| p.config.health_check.is_some()),
            "retries": snapshot.policies.iter().any(|p| p.config.retry.max_attempts > 1),
            "websocket": snapshot.policies.iter().any(|p| p.config.websocket.enabled),
        },
    })
}

fn ready(admin: &AdminState) -> Response<Full<Bytes>> {
    if admin.draining.load(Ordering::Acquire) {
        text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else if admin.ready.load(Ordering::Acquire) {
        text(StatusCode::OK, "ready\n")
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "no configuration applied yet\n",
        )
    }
}

fn backends(admin: &AdminState) -> serde_json::Value {
    let snapshot = admin.proxy.snapshot.load();
    let policies: Vec<_> = snapshot
        .policies
        .iter()
        .map(|p| {
            json!({
                "policy": p.label,
                "listener": p.config.listener.addr.to_string(),
                "algorithm": p.balancer.algorithm(),
                "endpoints": p.endpoints.iter().map(|e| e.state.report()).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({"version": snapshot.version, "policies": policies})
}

/// A plain-text response.
pub fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// A pretty-printed JSON response.
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
