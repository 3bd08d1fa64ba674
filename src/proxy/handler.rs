//! The forwarding path: one request in, one response out.
//!
//! Order of work, top to bottom as a request flows (the one place it is written down):
//! 1. find the listener's policy in the current snapshot (a connection caches it, see
//!    [`ListenerPolicy`]);
//! 2. validate the head (framing, Host, body limit), then rate limits;
//! 3. answer from the response cache, or fetch through it ([`super::caching`]);
//! 4. choose an endpoint (balancer → endpoint admissibility);
//! 5. rewrite headers (hop-by-hop, forwarding, removals);
//! 6. send with the per-try and total timeouts, through the pooled client;
//! 7. classify any failure once ([`ProxyError`]), rewrite the response headers, stream the body.

use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::uri::Authority;
use http::{Request, Response, StatusCode, Uri, Version, header};
use hyper::body::Incoming;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::body::{ClientBody, RequestBody, RequestBodyError, ResponseBody};
use super::conn::{
    ConnShared, HEAD_CL_AND_TE, HEAD_DUPLICATE_CL, HEAD_REPEATED_CHUNKED, HEAD_UNSUPPORTED_TE,
};
use super::error::{MAX_URI_BYTES, ProxyError};
use super::headers::{self, ClientSide, PeerHeaders, PendingFields, RequestAuthority};
use super::pool::{ConnectError, PoolReturn, SendError, UpstreamBody, UpstreamError};
use super::{caching, websocket};
use crate::accesslog;
use crate::clock;
use crate::ratelimit::policy::client_ip;
use crate::resilience::breaker::{BreakerState, Permit};
use crate::snapshot::{ConcurrencySlot, PolicyRuntime, RuntimeEndpoint, Snapshot};
use crate::sync::try_increment_below;
use bytes::Bytes;
use http_body::Body as _;
use http_body_util::BodyExt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// State every connection's requests share.
pub struct ProxyState {
    /// The snapshot in force; swapped whole on every configuration change, through
    /// [`publish`](Self::publish) so that [`ListenerPolicy`] caches see the change.
    pub snapshot: ArcSwap<Snapshot>,
    /// Bumped after every swap of `snapshot`.
    generation: AtomicU64,
    /// Cancelled when the process shuts down (ends WebSocket sessions at the drain deadline).
    pub shutdown: CancellationToken,
    /// Tracks tunnels and connections so shutdown can wait for them.
    pub tasks: TaskTracker,
}

impl ProxyState {
    /// State serving `snapshot`.
    pub fn new(snapshot: Snapshot) -> Self {
        Self {
            snapshot: ArcSwap::from_pointee(snapshot),
            generation: AtomicU64::new(0),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }
    }

    /// Makes `snapshot` the one in force for every request that starts from now on.
    pub fn publish(&self, snapshot: Arc<Snapshot>) {
        self.snapshot.store(snapshot);
        // After the store: a connection that sees the new number is sure to load the new
        // snapshot; one that still sees the old one serves as if it had started just before.
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The policy now serving `listener`, from the snapshot in force.
    pub(super) fn policy_for(&self, listener: SocketAddr) -> Option<Arc<PolicyRuntime>> {
        self.snapshot.load().policy_for_listener(listener).cloned()
    }
}

/// One connection's view of its listener's policy, looked up again only after a
/// configuration change: a look-up in the shared snapshot costs two locked read-modify-writes
/// (the snapshot's borrow and its release) besides the policy's own reference, on every
/// request, while a change is seen here through one plain load.
// Two words: it lives in every connection's task, idle ones included.
pub struct ListenerPolicy {
    /// The [`ProxyState`] generation `policy` was looked up in; `u64::MAX` before the first.
    generation: u64,
    policy: Option<Arc<PolicyRuntime>>,
}

impl Default for ListenerPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl ListenerPolicy {
    /// An empty cache; the first request looks the policy up.
    pub fn new() -> Self {
        Self {
            generation: u64::MAX,
            policy: None,
        }
    }

    /// The policy serving `listener` now; `None` once the listener is no longer configured.
    pub fn current(
        &mut self,
        state: &ProxyState,
        listener: SocketAddr,
    ) -> Option<Arc<PolicyRuntime>> {
        let generation = state.generation.load(Ordering::Acquire);
        if generation != self.generation {
            self.policy = state.policy_for(listener);
            self.generation = generation;
        }
        self.policy.clone()
    }
}

/// What one client connection knows about itself.
pub struct ConnContext {
    /// The client's address.
    pub peer: SocketAddr,
    /// The client's address as text, for the access log (formatted once per connection).
    pub peer_text: Box<str>,
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
pub(super) struct Outcome<'a> {
    /// The endpoint that answered (or failed last); `None` when none was reached.
    pub(super) endpoint: Option<&'a RuntimeEndpoint>,
    /// Attempts sent.
    pub(super) attempts: u32,
    /// The proxy's own error, if it answered with one.
    pub(super) error: Option<ProxyError>,
}

/// Serves one request.
// An `async move` block rather than an `async fn`: an `async fn` moves its arguments into
// locals, so its future holds each of them twice; the block uses its captures in place.
#[allow(clippy::manual_async_fn)]
// Borrowed state and connection: the direct server's requests all run inside the connection's
// task, so they need no reference counts of their own (hyper's service owns two per request).
pub fn handle<'a>(
    state: &'a ProxyState,
    conn: &'a ConnContext,
    req: Request<ClientBody>,
) -> impl std::future::Future<Output = Response<ResponseBody>> + 'a {
    handle_under(state, conn, req, state.policy_for(conn.listener))
}

/// [`handle`] under `policy`, the listener's policy as the caller found it (`None`: the
/// listener is gone, and the request is answered as draining).
#[allow(clippy::manual_async_fn)]
pub fn handle_under<'a>(
    state: &'a ProxyState,
    conn: &'a ConnContext,
    req: Request<ClientBody>,
    policy: Option<Arc<PolicyRuntime>>,
) -> impl std::future::Future<Output = Response<ResponseBody>> + 'a {
    async move {
        let active = conn.shared.start_request();
        let seq = conn.shared.requests_started();
        let started = Instant::now();
        let Some(policy) = policy else {
            let mut response = ProxyError::Draining.to_response();
            response.body_mut().hold_active(active);
            return response;
        };
        // The access log needs the request line after the request is gone; copy it only when logged.
        let logged = accesslog::enabled().then(|| (req.method().clone(), req.uri().clone()));
        // Overload: a cheap counter shared by the policy's requests across snapshots, held until the
        // response body has gone out. The slot keeps the policy for the request.
        let slot = match ConcurrencySlot::enter(policy) {
            Ok(slot) => slot,
            Err(policy) => {
                let (mut response, _) = reject_overloaded(&policy, "max_concurrent_requests");
                policy.unrouted_metrics.count(response.status().as_u16());
                response.body_mut().hold_active(active);
                return response;
            }
        };
        let policy: &PolicyRuntime = &slot;
        let (mut response, outcome) = forward(state, policy, conn, req, seq, started).await;
        let status = response.status().as_u16();
        // Up to the response head: the instant `dispatch` noted when it arrived, if it did.
        let elapsed = match response.body().head_received() {
            Some(received) => received.saturating_duration_since(started),
            None => started.elapsed(),
        };
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
        if let Some((method, uri)) = logged {
            accesslog::record(&accesslog::Entry {
                policy: &policy.label,
                client: &conn.peer_text,
                method: method.as_str(),
                path: uri.path(),
                status,
                duration: elapsed,
                endpoint: outcome.endpoint.map_or("-", |e| e.authority.as_str()),
                attempts: outcome.attempts,
                error: outcome.error.as_ref().map_or("-", ProxyError::cause),
            });
        }
        let body = response.body_mut();
        body.hold_active(active);
        body.hold_slot(slot);
        response
    }
}

/// An error response and its outcome.
pub(super) fn fail<'p>(
    error: ProxyError,
    endpoint: Option<&'p RuntimeEndpoint>,
    attempts: u32,
) -> (Response<ResponseBody>, Outcome<'p>) {
    (
        error.to_response(),
        Outcome {
            endpoint,
            attempts,
            error: Some(error),
        },
    )
}

/// Checks the request against the policy's limits, then answers it from the cache or sends it.
// An `async move` block rather than an `async fn`: an `async fn` moves its arguments into
// locals, so its future holds each of them twice; the block uses its captures in place.
#[allow(clippy::manual_async_fn)]
fn forward<'p>(
    state: &ProxyState,
    policy: &'p PolicyRuntime,
    conn: &ConnContext,
    mut req: Request<ClientBody>,
    seq: u64,
    started: Instant,
) -> impl std::future::Future<Output = (Response<ResponseBody>, Outcome<'p>)> {
    async move {
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
        if flags & HEAD_REPEATED_CHUNKED != 0 {
            return fail(ProxyError::BadRequest("chunked applied twice"), None, 0);
        }
        if flags & HEAD_UNSUPPORTED_TE != 0 {
            return fail(
                ProxyError::NotImplemented("transfer coding other than chunked"),
                None,
                0,
            );
        }
        if req.method() == http::Method::CONNECT {
            // A reverse proxy has no tunnel to open; forwarding it would send `CONNECT /`.
            return fail(ProxyError::NotImplemented("CONNECT"), None, 0);
        }
        if req.uri().path() == "*" && req.method() != http::Method::OPTIONS {
            return fail(
                ProxyError::BadRequest("asterisk-form target is only for OPTIONS"),
                None,
                0,
            );
        }
        if req.uri().path_and_query().map_or(0, |pq| pq.as_str().len()) > MAX_URI_BYTES {
            return fail(ProxyError::UriTooLong, None, 0);
        }
        let authority = match headers::request_authority_for(&req, &conn.peer_headers) {
            Ok(a) => a,
            Err(e) => return fail(e, None, 0),
        };
        let authority = authority.as_ref().map(RequestAuthority::get);
        if let Some(limits) = &policy.rate_limits {
            let ip = client_ip(
                conn.peer_headers.ip,
                req.headers(),
                &config.forwarding.trusted_proxies,
            );
            if let Err(refusal) = limits.check(ip, req.headers(), started) {
                policy
                    .metrics
                    .rate_limit_rejected
                    .with_label_values(&[policy.label.as_str(), refusal.scope.as_str()])
                    .inc();
                if !limits.dry_run {
                    return fail(ProxyError::RateLimited(refusal.headers), None, 0);
                }
            }
        }
        let limit = config.limits.max_request_body_bytes;
        // A body the direct server read with the head is exactly its `Content-Length` long, and
        // that server hands any upgrade over to hyper: neither needs a field look-up. (The
        // check still applies: the connection's read limit dates from its accept, and a reload
        // since may have lowered the policy's.)
        let (length, upgrade) = match req.body() {
            ClientBody::Buffered(data) => (Some(data.len() as u64), false),
            ClientBody::Streaming(_) => (
                content_length_of(req.headers()),
                config.websocket.enabled && headers::is_upgrade_request(&req),
            ),
        };
        if length.is_some_and(|length| length > limit) {
            return fail(ProxyError::BodyTooLarge(limit), None, 0);
        }
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

        let (parts, body) = req.into_parts();
        // Only the direct server reads a body with the head, and only it writes encoded fields
        // (hyper's server takes the map); nothing here reads or removes a response field unless
        // the policy removes some.
        let encode_fields = matches!(body, ClientBody::Buffered(_))
            && config.forwarding.remove_response_headers.is_empty();
        // What a successful unsafe request must invalidate in the cache afterwards.
        let mut invalidate = None;
        if let Some(cache) = &policy.cache {
            let host = authority.map_or("", Authority::as_str);
            let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
            if !upgrade && body.is_end_stream() {
                if let Some(key) = crate::cache::lookup_key(&parts.method, host, path_and_query) {
                    // Boxed: the cache's states would otherwise enlarge every request's future.
                    return Box::pin(caching::serve(
                        state, policy, conn, cache, key, parts, authority,
                    ))
                    .await;
                }
            }
            if !parts.method.is_safe() {
                invalidate = Some((
                    cache,
                    parts.method.clone(),
                    host.to_owned(),
                    path_and_query.to_owned(),
                ));
            }
        }
        // The body, buffered for retries when small enough (its exact size is its
        // `Content-Length`, already parsed). Done here rather than in a function of its own: each
        // nested `async fn` moves the request and its response through one more future.
        let body = match body {
            // Read with the head, within the retry and body limits (see `server.rs`).
            ClientBody::Buffered(data) => AttemptBody::Replayable(data),
            ClientBody::Streaming(body) => match streaming_body(policy, body, limit, upgrade).await
            {
                Ok(body) => body,
                Err(error) => return fail(error, None, 0),
            },
        };
        // One call site: a second `dispatch(..).await` would give this future a second copy of its
        // (large) state.
        let (response, outcome) = dispatch(
            state,
            policy,
            conn,
            parts,
            body,
            authority,
            client_upgrade,
            encode_fields,
            started,
        )
        .await;
        if let Some((cache, method, host, path_and_query)) = invalidate {
            if outcome.error.is_none() && crate::cache::invalidates(&method, response.status()) {
                cache.cache.invalidate(&host, &path_and_query);
            }
        }
        (response, outcome)
    }
}

/// A body streamed by hyper: collected when small enough to keep for retries, else streamed.
async fn streaming_body(
    policy: &PolicyRuntime,
    body: Incoming,
    limit: u64,
    upgrade: bool,
) -> Result<AttemptBody, ProxyError> {
    Ok(if body.is_end_stream() {
        AttemptBody::Replayable(Bytes::new())
    } else if body
        .size_hint()
        .exact()
        .is_some_and(|n| n <= policy.config.retry.max_replay_bytes)
        && !upgrade
    {
        match RequestBody::new(body, limit).collect().await {
            Ok(collected) => AttemptBody::Replayable(collected.to_bytes()),
            Err(RequestBodyError::TooLarge(n)) => return Err(ProxyError::BodyTooLarge(n)),
            Err(RequestBodyError::Client(_)) => return Err(ProxyError::ClientBody),
        }
    } else {
        AttemptBody::Streaming(Some(RequestBody::new(body, limit)))
    })
}

/// Sends a request through the balancer, breakers and retries; streams the response back. With
/// `encode_fields` the response may keep its end-to-end fields encoded for the direct server
/// (`h1::EncodedFields`) rather than in its map.
// An `async move` block rather than an `async fn`: an `async fn` moves its arguments into
// locals, so its future holds each of them twice; the block uses its captures in place. The
// arguments are the request's parts as `forward` has split them: a struct would only be
// unpacked again at once.
#[allow(clippy::manual_async_fn, clippy::too_many_arguments)]
pub(super) fn dispatch<'p>(
    state: &ProxyState,
    policy: &'p PolicyRuntime,
    conn: &ConnContext,
    mut parts: http::request::Parts,
    mut body: AttemptBody,
    authority: Option<&Authority>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    encode_fields: bool,
    started: Instant,
) -> impl std::future::Future<Output = (Response<ResponseBody>, Outcome<'p>)> {
    async move {
        let config = &policy.config;
        let upgrade = client_upgrade.is_some();
        let client_version = parts.version;
        let method = parts.method.clone();
        let retry = &config.retry;
        // A retry may resend only what it can reproduce: no body, or one small enough to keep.
        let idempotent =
            headers::is_idempotent(&method) || parts.headers.contains_key(&IDEMPOTENCY_KEY);
        let client_side = ClientSide {
            peer: &conn.peer_headers,
            tls: conn.tls,
            forwarding: &config.forwarding,
        };
        // The forwarding fields wait beside the head until a client writes or inserts them.
        let mut pending = Some(headers::prepare_request(
            &mut parts.headers,
            client_version,
            authority,
            &client_side,
            upgrade,
        ));
        let sent_key = if upgrade {
            parts.headers.get(header::SEC_WEBSOCKET_KEY).cloned()
        } else {
            None
        };
        // The target as sent upstream; the URI is rebuilt only when it is not already that.
        let path_and_query = |uri: &Uri| {
            uri.path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"))
        };

        let timeouts = &config.timeouts;
        // The request's one clock read at its start (in `handle`) serves the deadline, the
        // retry budget, the pool's idle-age check and the first attempt's send time: a read
        // costs tens of nanoseconds, more than most of what it would be used for.
        let deadline = started + timeouts.request;
        // Converted once: the budget, the first attempt's round trip and the breaker work in
        // integer nanoseconds from here (see `crate::clock`).
        let started_nanos = clock::nanos_since_epoch(started);
        policy.retry_budget.deposit_at(started_nanos);
        let mut tried = Tried::default();
        let mut attempts = 0u32;
        let mut last_endpoint = None;
        loop {
            attempts += 1;
            let Some((index, permit)) = pick_endpoint(policy, &tried) else {
                return fail(no_endpoint(policy), last_endpoint, attempts - 1);
            };
            tried.push(index);
            let endpoint = &policy.endpoints[index];
            last_endpoint = Some(endpoint);

            // The head must outlive the attempt only when a retry may follow a request that *was*
            // sent; a request that never left comes back whole, head included. The direct client
            // writes the head from here without taking it; hyper's take a copy only when it is kept.
            let may_retry = attempts < retry.max_attempts && !upgrade;
            let keep_head =
                may_retry && (retry.on_reset || retry.on_timeout || !retry.status_codes.is_empty());
            if endpoint.pool.is_http2() {
                // HTTP/2 carries scheme and authority as pseudo-headers, taken from the URI.
                parts.uri = match Uri::builder()
                    .scheme(if endpoint.pool.is_tls() {
                        http::uri::Scheme::HTTPS
                    } else {
                        http::uri::Scheme::HTTP
                    })
                    .authority(endpoint.authority.clone())
                    .path_and_query(path_and_query(&parts.uri))
                    .build()
                {
                    Ok(uri) => uri,
                    Err(_) => {
                        return fail(ProxyError::BadRequest("invalid request target"), None, 0);
                    }
                };
            } else if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
                // HTTP/1.1 to an origin server: origin form (RFC 9112 §3.2.1). A target already
                // in that form (nearly every request) is sent as it is.
                parts.uri = Uri::from(path_and_query(&parts.uri));
            }
            parts.version = if endpoint.pool.is_http2() {
                // HTTP/2 carries the authority in the URI; a Host header would be a second source of truth.
                parts.headers.remove(header::HOST);
                Version::HTTP_2
            } else {
                // `prepare_request` set `Host` from the authority, so only a request without one
                // (HTTP/1.0 clients may send none) or a later attempt (an HTTP/2 attempt before
                // this one removed it) can lack it.
                if (authority.is_none() || attempts > 1)
                    && !parts.headers.contains_key(header::HOST)
                {
                    let host = authority.unwrap_or(&endpoint.authority);
                    if let Ok(value) = http::HeaderValue::from_str(host.as_str()) {
                        parts.headers.insert(header::HOST, value);
                    }
                }
                Version::HTTP_11
            };
            let Some(attempt_body) = body.take() else {
                // A streamed body already went out with an earlier attempt: nothing left to resend.
                return fail(ProxyError::UpstreamReset, last_endpoint, attempts - 1);
            };
            let mut attempt_body = Some(attempt_body);

            let (now, now_nanos) = if attempts == 1 {
                (started, started_nanos)
            } else {
                let now = Instant::now();
                (now, clock::nanos_since_epoch(now))
            };
            let remaining = if attempts == 1 {
                timeouts.request
            } else {
                deadline.saturating_duration_since(now)
            };
            let (attempt_timeout, timeout_error) = if timeouts.per_try < remaining {
                (
                    timeouts.per_try,
                    ProxyError::PerTryTimeout(timeouts.per_try),
                )
            } else {
                (remaining, ProxyError::RequestTimeout(timeouts.request))
            };
            let guard = endpoint.state.start_request();
            let sent_nanos = now_nanos;
            // The result lives only inside this block and the backoff is slept after it: a
            // sleep inside the match kept the result and the response alive in the future's
            // state, enlarging it for the (common) wait on the exchange too.
            let delay = 'attempt: {
                let result = exchange(
                    policy,
                    endpoint,
                    &mut parts,
                    &mut pending,
                    &mut attempt_body,
                    keep_head,
                    encode_fields,
                    upgrade,
                    AttemptDeadline {
                        started: now,
                        at: now + attempt_timeout,
                        error: timeout_error,
                    },
                )
                .await;
                match result {
                    Ok((mut response, pool_return)) => {
                        // The direct client noted when the head arrived, for its pool as well.
                        let received = match response.body() {
                            UpstreamBody::H1(body) => body.received(),
                            UpstreamBody::Hyper(_) => Instant::now(),
                        };
                        let received_nanos = clock::nanos_since_epoch(received);
                        let rtt_nanos = received_nanos.saturating_sub(sent_nanos);
                        endpoint.state.observe_latency_at(rtt_nanos, received_nanos);
                        if let Some(histogram) = &endpoint.metrics.upstream_duration {
                            histogram.observe(rtt_nanos as f64 * 1e-9);
                        }
                        let status = response.status().as_u16();
                        let failed = config.circuit_breaker.is_failure_status(status);
                        if failed {
                            endpoint.state.record_failure("status_5xx");
                        } else {
                            endpoint.state.record_success();
                        }
                        record_breaker(policy, endpoint, permit, !failed, received_nanos);
                        if may_retry
                            && retry.status_codes.contains(&status)
                            && (idempotent || retry.non_idempotent)
                            && body.can_replay()
                        {
                            let hinted = retry_after(&response, retry.honor_retry_after);
                            if let Some(delay) =
                                retry_delay(policy, attempts, hinted, deadline, "status")
                            {
                                drop(response);
                                drop(pool_return);
                                drop(guard);
                                break 'attempt delay;
                            }
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
                                            false,
                                        );
                                        let (parts, _) = response.into_parts();
                                        (
                                            Response::from_parts(parts, ResponseBody::empty()),
                                            Outcome {
                                                endpoint: Some(endpoint),
                                                attempts,
                                                error: None,
                                            },
                                        )
                                    }
                                    Err(error) => {
                                        endpoint.state.record_failure(error.cause());
                                        fail(error, Some(endpoint), attempts)
                                    }
                                };
                            }
                        } else if switching {
                            // The client did not ask to switch; a 101 would desynchronise the connection.
                            endpoint.state.record_failure("upstream_protocol");
                            return fail(ProxyError::UpstreamProtocol, Some(endpoint), attempts);
                        }
                        let stripped = match response.body() {
                            UpstreamBody::H1(body) => body.hop_by_hop_stripped(),
                            UpstreamBody::Hyper(_) => false,
                        };
                        headers::prepare_response(
                            response.headers_mut(),
                            client_version,
                            &config.forwarding,
                            false,
                            stripped,
                        );
                        let response = response.map(|body| {
                            ResponseBody::upstream(
                                body,
                                timeouts.idle,
                                guard,
                                pool_return,
                                received,
                            )
                        });
                        return (
                            response,
                            Outcome {
                                endpoint: Some(endpoint),
                                attempts,
                                error: None,
                            },
                        );
                    }
                    Err((error, never_sent)) => {
                        drop(guard);
                        if error.is_endpoint_failure() {
                            endpoint.state.record_failure(error.cause());
                            record_breaker(policy, endpoint, permit, false, clock::now_nanos());
                        } else {
                            // Not the endpoint's fault (client body, overload): no verdict either way.
                            drop(permit);
                        }
                        if never_sent {
                            // Nothing reached the backend: head and body (even a streamed one) can go
                            // elsewhere; the head is still in `parts`.
                            if let Some(unsent) = attempt_body.take() {
                                body.give_back(unsent);
                            }
                        }
                        let retryable = attempts < retry.max_attempts
                            && !upgrade
                            && match &error {
                                ProxyError::ConnectRefused
                                | ProxyError::ConnectFailed
                                | ProxyError::ConnectTimeout(_) => retry.on_connect_failure,
                                ProxyError::UpstreamReset | ProxyError::UpstreamProtocol => {
                                    retry.on_reset
                                        && (never_sent
                                            || (idempotent || retry.non_idempotent)
                                                && body.can_replay())
                                }
                                ProxyError::PerTryTimeout(_) => {
                                    retry.on_timeout
                                        && (idempotent || retry.non_idempotent)
                                        && body.can_replay()
                                }
                                _ => false,
                            };
                        if retryable {
                            if let Some(delay) =
                                retry_delay(policy, attempts, None, deadline, error.cause())
                            {
                                break 'attempt delay;
                            }
                        }
                        return fail(error, Some(endpoint), attempts);
                    }
                }
            };
            tokio::time::sleep(delay).await;
        }
    }
}

/// Idempotency-Key (draft-ietf-httpapi-idempotency-key-header): the client says a replay is safe.
static IDEMPOTENCY_KEY: http::HeaderName = http::HeaderName::from_static("idempotency-key");

/// Attempts per request are capped (config validation allows at most 10).
const MAX_TRIED: usize = 10;

/// Endpoints already tried for one request, without allocating.
#[derive(Default)]
struct Tried {
    indices: [usize; MAX_TRIED],
    len: usize,
}

impl Tried {
    fn push(&mut self, index: usize) {
        if self.len < MAX_TRIED {
            self.indices[self.len] = index;
            self.len += 1;
        }
    }

    fn as_slice(&self) -> &[usize] {
        &self.indices[..self.len]
    }
}

/// A request body across attempts.
pub(super) enum AttemptBody {
    /// Kept in memory: every attempt sends a copy.
    Replayable(Bytes),
    /// Streamed from the client: only one attempt can send it (unless it comes back unsent).
    Streaming(Option<RequestBody>),
}

impl AttemptBody {
    fn take(&mut self) -> Option<RequestBody> {
        match self {
            AttemptBody::Replayable(bytes) if bytes.is_empty() => Some(RequestBody::empty()),
            AttemptBody::Replayable(bytes) => Some(RequestBody::full(bytes.clone())),
            AttemptBody::Streaming(body) => body.take(),
        }
    }

    fn can_replay(&self) -> bool {
        match self {
            AttemptBody::Replayable(_) => true,
            AttemptBody::Streaming(body) => body.is_some(),
        }
    }

    fn give_back(&mut self, unsent: RequestBody) {
        if let AttemptBody::Streaming(slot) = self {
            *slot = Some(unsent);
        }
    }
}

/// Holds one unit of a shared counter, refusing when the counter is at `max`.
struct CountGuard<'a>(&'a AtomicU32);

impl<'a> CountGuard<'a> {
    fn try_new(counter: &'a AtomicU32, max: u32) -> Option<Self> {
        try_increment_below(counter, max).then_some(CountGuard(counter))
    }
}

impl Drop for CountGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn reject_overloaded<'p>(
    policy: &PolicyRuntime,
    limit: &'static str,
) -> (Response<ResponseBody>, Outcome<'p>) {
    policy
        .metrics
        .overload_rejected
        .with_label_values(&[policy.label.as_str(), limit])
        .inc();
    let error = ProxyError::Overloaded(limit);
    (
        error.to_response(),
        Outcome {
            endpoint: None,
            attempts: 0,
            error: Some(error),
        },
    )
}

/// Chooses an endpoint and reserves its breaker admission (a half-open breaker admits only a
/// few probes, so a pick can lose the race and move on).
fn pick_endpoint<'p>(policy: &'p PolicyRuntime, tried: &Tried) -> Option<(usize, PermitGuard<'p>)> {
    let mut skipped = Tried::default();
    for _ in 0..policy.endpoints.len().min(MAX_TRIED) {
        let mut avoid = Tried::default();
        for &i in tried.as_slice().iter().chain(skipped.as_slice()) {
            avoid.push(i);
        }
        let index = policy.balancer.pick(&policy.endpoints, avoid.as_slice())?;
        if skipped.as_slice().contains(&index) {
            return None;
        }
        let endpoint = &policy.endpoints[index];
        let Some(cfg) = &policy.breaker else {
            return Some((index, PermitGuard::none(endpoint)));
        };
        let (permit, transition) = endpoint.state.breaker().try_acquire(cfg);
        if let Some(transition) = transition {
            endpoint.state.note_transition(transition);
        }
        match permit {
            Some(permit) => {
                return Some((
                    index,
                    PermitGuard {
                        endpoint,
                        permit: Some(permit),
                    },
                ));
            }
            None => skipped.push(index),
        }
    }
    None
}

/// A breaker admission that is handed back if its request ends without a verdict (the client
/// went away, the attempt was cancelled): an abandoned half-open probe must not hold its slot.
struct PermitGuard<'p> {
    endpoint: &'p RuntimeEndpoint,
    permit: Option<Permit>,
}

impl<'p> PermitGuard<'p> {
    fn none(endpoint: &'p RuntimeEndpoint) -> Self {
        Self {
            endpoint,
            permit: None,
        }
    }
}

impl Drop for PermitGuard<'_> {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.endpoint.state.breaker().release(permit);
        }
    }
}

/// When an attempt started, when it must be over, and what it fails with then (a per-try or
/// a whole-request timeout).
struct AttemptDeadline {
    started: Instant,
    at: Instant,
    error: ProxyError,
}

/// Reports an attempt's verdict, observed at `now_nanos` ([`crate::clock`]), to the endpoint's
/// breaker, honouring the ejection cap.
fn record_breaker(
    policy: &PolicyRuntime,
    endpoint: &RuntimeEndpoint,
    mut permit: PermitGuard<'_>,
    success: bool,
    now_nanos: u64,
) {
    let (Some(cfg), Some(permit)) = (&policy.breaker, permit.permit.take()) else {
        return;
    };
    let transition = endpoint
        .state
        .breaker()
        .record_at(cfg, permit, success, now_nanos, || {
            policy.ejections.try_eject()
        });
    if let Some(transition) = transition {
        if transition.to == BreakerState::Closed {
            policy.ejections.restore();
        }
        endpoint.state.note_transition(transition);
    }
}

/// 503 for "nothing admissible", telling the client when the next breaker probe is due.
fn no_endpoint(policy: &PolicyRuntime) -> ProxyError {
    let next_probe = policy
        .endpoints
        .iter()
        .filter_map(|e| e.state.breaker().time_until_probe())
        .min()
        .map_or(1, |d| d.as_secs_f64().ceil() as u64);
    ProxyError::NoEndpoint(next_probe)
}

/// The delay before the next attempt, or `None` when no retry may be sent (budget spent, or
/// the delay would pass the request deadline). Counts the retry or the refusal.
fn retry_delay(
    policy: &PolicyRuntime,
    attempts: u32,
    hinted: Option<std::time::Duration>,
    deadline: Instant,
    reason: &'static str,
) -> Option<std::time::Duration> {
    let delay = hinted.unwrap_or_else(|| policy.backoff.delay(attempts, &mut rand::rng()));
    if Instant::now() + delay >= deadline {
        return None;
    }
    if !policy.retry_budget.withdraw() {
        policy
            .metrics
            .retry_budget_exhausted
            .with_label_values(&[policy.label.as_str()])
            .inc();
        return None;
    }
    policy
        .metrics
        .retries
        .with_label_values(&[policy.label.as_str(), reason])
        .inc();
    Some(delay)
}

/// A 429/503 `Retry-After` in seconds (the HTTP-date form is not honoured: clock skew makes it
/// unreliable between machines), when the policy honours it.
fn retry_after(response: &Response<UpstreamBody>, honor: bool) -> Option<std::time::Duration> {
    if !honor || !matches!(response.status().as_u16(), 429 | 503) {
        return None;
    }
    response
        .headers()
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(std::time::Duration::from_secs)
}

fn content_length_of(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| headers::parse_content_length(v.as_bytes()))
}

/// Most pooled connections a request tries before opening a fresh one, when each turns out to
/// have been closed by the backend before the request could be written.
const MAX_STALE_CONNECTIONS: usize = 3;

/// Sends the request in `head`, `pending` and `body` to `endpoint` on a pooled or new connection (see
/// [`Conn::send_parts`] for what `keep_head` keeps). A request that provably never left (its
/// pooled connection was already closed) is resent on another connection, whatever its method.
/// On failure, `true` says the request never left: it is still whole in `head` and `body`.
/// Past `deadline.at` the attempt fails with `deadline.error` (as possibly sent). `upgrade`: the
/// request asks to switch protocols (it kept its `Upgrade` field).
#[allow(clippy::too_many_arguments)]
async fn exchange(
    policy: &PolicyRuntime,
    endpoint: &RuntimeEndpoint,
    head: &mut http::request::Parts,
    pending: &mut Option<PendingFields>,
    body: &mut Option<RequestBody>,
    keep_head: bool,
    encode_fields: bool,
    upgrade: bool,
    deadline: AttemptDeadline,
) -> Result<(Response<UpstreamBody>, Option<PoolReturn>), (ProxyError, bool)> {
    let overload = &policy.config.overload;
    let mut stale = 0;
    loop {
        let may_connect = || {
            let open: usize = policy
                .endpoints
                .iter()
                .map(|e| e.pool.open_connections())
                .sum();
            open < overload.max_connections as usize
        };
        let Some(current) = body.as_ref() else {
            // A streamed body went out with an earlier try and cannot be sent again.
            return Err((ProxyError::UpstreamReset, false));
        };
        // An idle connection of the direct client needs no future and so no timer; anything
        // else (hyper's connections, connecting) is waited for within the deadline.
        let idle = endpoint
            .pool
            .checkout_idle_direct(upgrade, current, deadline.started);
        let conn = match idle {
            Some(conn) => conn,
            None => {
                // Only a request that has to wait for a connection is pending (one that takes an
                // idle connection of the direct client at once never waits).
                let Some(_waiting) =
                    CountGuard::try_new(&policy.shared.pending, overload.max_pending_requests)
                else {
                    return Err((ProxyError::Overloaded("max_pending_requests"), true));
                };
                let checkout =
                    endpoint
                        .pool
                        .checkout_other(upgrade, current, deadline.started, may_connect);
                match tokio::time::timeout_at(deadline.at, checkout).await {
                    Ok(Ok(conn)) => conn,
                    Ok(Err(ConnectError::ConnectionLimit)) => {
                        return Err((ProxyError::Overloaded("max_connections"), true));
                    }
                    Ok(Err(e)) => {
                        return Err((classify_connect(&e, policy.config.timeouts.connect), true));
                    }
                    Err(_) => return Err((deadline.error, false)),
                }
            }
        };
        let reused = conn.reused;
        match conn
            .send_parts(
                &endpoint.pool,
                head,
                pending,
                body,
                keep_head,
                encode_fields,
                Some(deadline.at),
            )
            .await
        {
            Ok(exchanged) => return Ok(exchanged),
            Err(SendError::NotSent(err)) if reused && stale < MAX_STALE_CONNECTIONS => {
                tracing::debug!(endpoint = %endpoint.authority, %err, "pooled connection was closed; resending");
                stale += 1;
            }
            Err(SendError::NotSent(err)) => {
                let error = classify_send(&err);
                tracing::debug!(endpoint = %endpoint.authority, error = %error, detail = %ErrorChain(&err), "upstream exchange failed before sending");
                return Err((error, true));
            }
            Err(SendError::TimedOut) => return Err((deadline.error, false)),
            Err(SendError::Failed(err)) => {
                let error = classify_send(&err);
                tracing::debug!(endpoint = %endpoint.authority, error = %error, detail = %ErrorChain(&err), "upstream exchange failed");
                return Err((error, false));
            }
        }
    }
}

fn classify_connect(err: &ConnectError, connect_timeout: std::time::Duration) -> ProxyError {
    match err {
        ConnectError::Timeout(_) => ProxyError::ConnectTimeout(connect_timeout),
        ConnectError::Refused => ProxyError::ConnectRefused,
        ConnectError::Failed(_) | ConnectError::Handshake(_) => ProxyError::ConnectFailed,
        ConnectError::ConnectionLimit => ProxyError::Overloaded("max_connections"),
    }
}

/// Maps a failed exchange to the one cause it represents: the client's body first (its fault,
/// 400/413), then a malformed response, else a broken connection.
fn classify_send(err: &UpstreamError) -> ProxyError {
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
    if err.is_protocol() {
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
