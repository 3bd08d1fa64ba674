//! The forwarding path: one request in, one response out.
//!
//! Order of work, top to bottom as a request flows (the one place it is written down):
//! 1. take the current snapshot and find the listener's policy;
//! 2. validate the head (framing, Host, body limit);
//! 3. choose an endpoint (balancer → endpoint admissibility);
//! 4. rewrite headers (hop-by-hop, forwarding, removals);
//! 5. send with the per-try and total timeouts, through the pooled client;
//! 6. classify any failure once ([`ProxyError`]), rewrite the response headers, stream the body.

use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use hyper::body::Incoming;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::body::{RequestBody, RequestBodyError, ResponseBody};
use super::conn::{ConnShared, HEAD_CL_AND_TE, HEAD_DUPLICATE_CL};
use super::error::{MAX_URI_BYTES, ProxyError};
use super::headers::{self, ClientSide, PeerHeaders};
use super::pool::{ConnectError, PoolReturn, SendError};
use super::websocket;
use crate::snapshot::{PolicyRuntime, RuntimeEndpoint, Snapshot};

/// State every connection's requests share.
pub struct ProxyState {
    /// The snapshot in force; swapped whole on every configuration change.
    pub snapshot: ArcSwap<Snapshot>,
    /// Cancelled when the process shuts down (ends WebSocket sessions at the drain deadline).
    pub shutdown: CancellationToken,
    /// Tracks tunnels and connections so shutdown can wait for them.
    pub tasks: TaskTracker,
}

/// What one client connection knows about itself.
pub struct ConnContext {
    /// The client's address.
    pub peer: SocketAddr,
    /// The listener address as configured (the snapshot key).
    pub listener: SocketAddr,
    /// Forwarding-header values for this peer, prepared once.
    pub peer_headers: PeerHeaders,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// Shared with the connection's I/O wrapper.
    pub shared: Arc<ConnShared>,
}

/// What happened to one request, for metrics and the access log.
struct Outcome<'a> {
    endpoint: Option<&'a RuntimeEndpoint>,
    attempts: u32,
    error: Option<ProxyError>,
}

/// Serves one request.
pub async fn handle(
    state: Arc<ProxyState>,
    conn: Arc<ConnContext>,
    req: Request<Incoming>,
) -> Response<ResponseBody> {
    let active = conn.shared.start_request();
    let seq = conn.shared.requests_started();
    let started = Instant::now();
    let policy = {
        let snapshot = state.snapshot.load();
        snapshot.policy_for_listener(conn.listener).cloned()
    };
    let Some(policy) = policy else {
        return ProxyError::Draining
            .to_response()
            .map(|b| b.with_active(active));
    };
    // The access log needs the request line after the request is gone; copy it only when logged.
    let logged = tracing::enabled!(target: "breakwater::access", tracing::Level::INFO)
        .then(|| (req.method().clone(), req.uri().path().to_owned()));
    let (response, outcome) = forward(&state, &policy, &conn, req, seq).await;
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    let backend_metrics = outcome
        .endpoint
        .map_or(&policy.unrouted_metrics, |e| e.metrics.as_ref());
    backend_metrics.count(status);
    backend_metrics
        .request_duration
        .observe(elapsed.as_secs_f64());
    if let Some(error) = &outcome.error {
        policy
            .metrics
            .errors
            .with_label_values(&[policy.label.as_str(), error.cause()])
            .inc();
    }
    if let Some((method, path)) = logged {
        tracing::info!(
            target: "breakwater::access",
            policy = %policy.label,
            client = %conn.peer,
            method = %method,
            path = %path,
            status,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            endpoint = outcome.endpoint.map_or("-", |e| e.authority.as_str()),
            attempts = outcome.attempts,
            error = outcome.error.as_ref().map_or("-", ProxyError::cause),
        );
    }
    response.map(|b| b.with_active(active))
}

async fn forward<'p>(
    state: &ProxyState,
    policy: &'p PolicyRuntime,
    conn: &ConnContext,
    mut req: Request<Incoming>,
    seq: u64,
) -> (Response<ResponseBody>, Outcome<'p>) {
    let fail = |error: ProxyError, endpoint: Option<&'p RuntimeEndpoint>, attempts: u32| {
        (
            error.to_response(),
            Outcome {
                endpoint,
                attempts,
                error: Some(error),
            },
        )
    };
    let config = &policy.config;
    let flags = conn.shared.head_flags(seq);
    if flags & HEAD_CL_AND_TE != 0 {
        return fail(
            ProxyError::BadRequest("both Content-Length and Transfer-Encoding"),
            None,
            0,
        );
    }
    if flags & HEAD_DUPLICATE_CL != 0 {
        return fail(
            ProxyError::BadRequest("more than one Content-Length"),
            None,
            0,
        );
    }
    if req.uri().path_and_query().map_or(0, |pq| pq.as_str().len()) > MAX_URI_BYTES {
        return fail(ProxyError::UriTooLong, None, 0);
    }
    let authority = match headers::request_authority(&req) {
        Ok(a) => a,
        Err(e) => return fail(e, None, 0),
    };
    let limit = config.limits.max_request_body_bytes;
    if let Some(length) = content_length(&req) {
        if length > limit {
            return fail(ProxyError::BodyTooLarge(limit), None, 0);
        }
    }
    let upgrade = config.websocket.enabled && headers::is_upgrade_request(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

    let Some(index) = policy.balancer.pick(&policy.endpoints, &[]) else {
        return fail(ProxyError::NoEndpoint, None, 0);
    };
    let endpoint = &policy.endpoints[index];

    let (mut parts, body) = req.into_parts();
    let client_version = parts.version;
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    parts.uri = match Uri::builder()
        .scheme(if endpoint.pool.is_tls() {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        })
        .authority(endpoint.authority.clone())
        .path_and_query(path_and_query)
        .build()
    {
        Ok(uri) => uri,
        Err(_) => return fail(ProxyError::BadRequest("invalid request target"), None, 0),
    };
    parts.version = if endpoint.pool.is_http2() {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    let client_side = ClientSide {
        peer: &conn.peer_headers,
        tls: conn.tls,
        forwarding: &config.forwarding,
    };
    headers::prepare_request(
        &mut parts.headers,
        client_version,
        authority.as_ref(),
        &client_side,
        upgrade,
    );
    let sent_key = if upgrade {
        parts.headers.get(header::SEC_WEBSOCKET_KEY).cloned()
    } else {
        None
    };
    if endpoint.pool.is_http2() {
        // HTTP/2 carries the authority in the URI; a Host header would be a second source of truth.
        parts.headers.remove(header::HOST);
    }
    let upstream_req = Request::from_parts(parts, RequestBody::new(body, limit));

    let timeouts = &config.timeouts;
    let (attempt_timeout, timeout_error) = if timeouts.per_try < timeouts.request {
        (
            timeouts.per_try,
            ProxyError::PerTryTimeout(timeouts.per_try),
        )
    } else {
        (
            timeouts.request,
            ProxyError::RequestTimeout(timeouts.request),
        )
    };
    let guard = endpoint.state.start_request();
    let sent = Instant::now();
    let result = tokio::time::timeout(
        attempt_timeout,
        exchange(endpoint, upstream_req, timeouts.connect),
    )
    .await;
    let (mut response, pool_return) = match result {
        Err(_) => {
            endpoint.state.record_failure(timeout_error.cause());
            return fail(timeout_error, Some(endpoint), 1);
        }
        Ok(Err(error)) => {
            if error.is_endpoint_failure() {
                endpoint.state.record_failure(error.cause());
            }
            return fail(error, Some(endpoint), 1);
        }
        Ok(Ok(exchanged)) => exchanged,
    };
    let rtt = sent.elapsed();
    endpoint.state.observe_latency(rtt);
    if let Some(histogram) = &endpoint.metrics.upstream_duration {
        histogram.observe(rtt.as_secs_f64());
    }
    if response.status().is_server_error() {
        endpoint.state.record_failure("status_5xx");
    } else {
        endpoint.state.record_success();
    }

    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    if let Some(client_upgrade) = client_upgrade {
        if switching {
            return match websocket::tunnel(
                state,
                policy,
                conn,
                client_upgrade,
                &mut response,
                sent_key.as_ref(),
                guard,
            ) {
                Ok(()) => {
                    headers::prepare_response(
                        response.headers_mut(),
                        client_version,
                        &config.forwarding,
                        true,
                    );
                    let (parts, _) = response.into_parts();
                    (
                        Response::from_parts(parts, ResponseBody::empty()),
                        Outcome {
                            endpoint: Some(endpoint),
                            attempts: 1,
                            error: None,
                        },
                    )
                }
                Err(error) => {
                    endpoint.state.record_failure(error.cause());
                    fail(error, Some(endpoint), 1)
                }
            };
        }
    } else if switching {
        // The client did not ask to switch; a 101 here would desynchronise the connection.
        endpoint.state.record_failure("upstream_protocol");
        return fail(ProxyError::UpstreamProtocol, Some(endpoint), 1);
    }

    headers::prepare_response(
        response.headers_mut(),
        client_version,
        &config.forwarding,
        false,
    );
    let response =
        response.map(|body| ResponseBody::upstream(body, timeouts.idle, guard, pool_return));
    (
        response,
        Outcome {
            endpoint: Some(endpoint),
            attempts: 1,
            error: None,
        },
    )
}

fn content_length<B>(req: &Request<B>) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v: &HeaderValue| v.to_str().ok())
        .and_then(|s| s.parse().ok())
}

/// Most pooled connections a request tries before opening a fresh one, when each turns out to
/// have been closed by the backend before the request could be written.
const MAX_STALE_CONNECTIONS: usize = 3;

/// Sends `req` to `endpoint` on a pooled or new connection. A request that provably never left
/// (its pooled connection was already closed) is resent on another connection, whatever its method.
async fn exchange(
    endpoint: &RuntimeEndpoint,
    mut req: Request<RequestBody>,
    connect_timeout: std::time::Duration,
) -> Result<(Response<Incoming>, Option<PoolReturn>), ProxyError> {
    let mut stale = 0;
    loop {
        let conn = endpoint
            .pool
            .checkout()
            .await
            .map_err(|e| classify_connect(&e, connect_timeout))?;
        let reused = conn.reused;
        match conn.send(&endpoint.pool, req).await {
            Ok(exchanged) => return Ok(exchanged),
            Err(SendError::NotSent(unsent, err)) if reused && stale < MAX_STALE_CONNECTIONS => {
                tracing::debug!(endpoint = %endpoint.authority, %err, "pooled connection was closed; resending");
                stale += 1;
                req = *unsent;
            }
            Err(SendError::NotSent(_, err)) | Err(SendError::Failed(err)) => {
                let error = classify_send(&err);
                tracing::debug!(endpoint = %endpoint.authority, error = %error, detail = %ErrorChain(&err), "upstream exchange failed");
                return Err(error);
            }
        }
    }
}

fn classify_connect(err: &ConnectError, connect_timeout: std::time::Duration) -> ProxyError {
    match err {
        ConnectError::Timeout(_) => ProxyError::ConnectTimeout(connect_timeout),
        ConnectError::Refused => ProxyError::ConnectRefused,
        ConnectError::Failed(_) | ConnectError::Handshake(_) => ProxyError::ConnectFailed,
    }
}

/// Maps a failed exchange to the one cause it represents: the client's body first (its fault,
/// 400/413), then a malformed response, else a broken connection.
fn classify_send(err: &hyper::Error) -> ProxyError {
    let mut source: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(body_err) = e.downcast_ref::<RequestBodyError>() {
            return match body_err {
                RequestBodyError::Client(_) => ProxyError::ClientBody,
                RequestBodyError::TooLarge(limit) => ProxyError::BodyTooLarge(*limit),
            };
        }
        source = e.source();
    }
    if err.is_parse() || err.is_parse_status() || err.is_parse_too_large() {
        ProxyError::UpstreamProtocol
    } else {
        ProxyError::UpstreamReset
    }
}

/// Renders an error with its whole source chain, for debug logs.
struct ErrorChain<'a>(&'a (dyn StdError + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}
