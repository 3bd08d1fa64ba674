//! Upstream connections: one pool per endpoint and connection setting, shared across snapshots.
//!
//! Built directly on hyper's connection API rather than hyper-util's pooled client: the proxy
//! already knows which endpoint it wants, so there is no key to hash per request, no shared pool
//! map, and no boxed futures; and it learns exactly whether a request was written before a
//! failure (a request that never left can be resent anywhere, whatever its method).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, Response, header};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::body::RequestBody;
use super::h1::{H1Body, H1Conn, H1Error, H1SendError};
use super::headers::PendingFields;
use super::tls::{TlsError, client_config};
use crate::config::compile::UpstreamTls;
use crate::config::spec::UpstreamProtocol;
use crate::sync::{lock, try_shared_entry};

/// How long an unused upstream connection stays pooled. Shorter than common backend keep-alive
/// timeouts (60 s nginx, 75 s Envoy) so the proxy, not the backend, closes idle connections,
/// which avoids writing a request into a socket the backend is closing.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 256;

/// What makes two backends' connections interchangeable.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConnSettings {
    /// HTTP/1.1 or HTTP/2.
    pub protocol: UpstreamProtocol,
    /// TLS settings, if any.
    pub tls: Option<UpstreamTls>,
    /// Connect timeout (TCP and TLS handshake together).
    pub connect_timeout: Duration,
}

/// Why a new connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP + TLS did not finish within the connect timeout.
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    /// The endpoint refused the TCP connection.
    #[error("connection refused")]
    Refused,
    /// Name resolution, routing or the TLS handshake failed.
    #[error("connect failed: {0}")]
    Failed(#[source] io::Error),
    /// The HTTP handshake (HTTP/2 preface) failed.
    #[error("HTTP handshake failed: {0}")]
    Handshake(#[source] hyper::Error),
    /// A new connection would pass `overload.maxConnections`.
    #[error("upstream connection limit reached")]
    ConnectionLimit,
}

/// Why a request could not be exchanged on a connection.
#[derive(Debug)]
pub enum SendError {
    /// The request was never written: it can go elsewhere ([`Conn::send_parts`] leaves it whole
    /// with the caller).
    NotSent(UpstreamError),
    /// The request may have reached the backend.
    Failed(UpstreamError),
    /// The deadline passed before the response head arrived (the request may have reached the
    /// backend).
    TimedOut,
}

/// A failed exchange with a backend, from whichever HTTP client carried it.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// hyper's client (HTTP/2, streamed request bodies, upgrades).
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    /// The direct HTTP/1.1 client (`h1.rs`).
    #[error(transparent)]
    H1(#[from] H1Error),
}

impl UpstreamError {
    /// Whether the backend broke the protocol (a malformed response) rather than the connection.
    pub fn is_protocol(&self) -> bool {
        match self {
            UpstreamError::Hyper(err) => {
                err.is_parse() || err.is_parse_status() || err.is_parse_too_large()
            }
            UpstreamError::H1(err) => err.is_protocol(),
        }
    }
}

/// A backend's response body, from whichever HTTP client carried it.
#[derive(Debug)]
pub enum UpstreamBody {
    /// Read by hyper's client.
    Hyper(Incoming),
    /// Read by the direct HTTP/1.1 client.
    H1(H1Body),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        match self.get_mut() {
            UpstreamBody::Hyper(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(UpstreamError::Hyper))),
            UpstreamBody::H1(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(UpstreamError::H1))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Hyper(body) => body.is_end_stream(),
            UpstreamBody::H1(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Hyper(body) => body.size_hint(),
            UpstreamBody::H1(body) => body.size_hint(),
        }
    }
}

enum Sender {
    H1(http1::SendRequest<RequestBody>),
    H2(http2::SendRequest<RequestBody>),
    /// Boxed: the connection changes hands several times per request (pool, send, response
    /// body, pool again), and a pointer is cheaper to move than its buffers and socket.
    Direct(Box<H1Conn>),
}

/// A connection checked out for one request.
pub struct Conn {
    sender: Sender,
    /// Whether the connection had served requests before (a stale pooled socket is possible).
    pub reused: bool,
}

/// An HTTP/1.1 connection to hand back to its pool once its response body has been read.
pub struct PoolReturn {
    pool: Arc<EndpointPool>,
    sender: http1::SendRequest<RequestBody>,
}

impl PoolReturn {
    /// Puts the connection back for reuse.
    pub fn release(self) {
        self.pool.checkin(self.sender);
    }
}

struct Idle {
    sender: http1::SendRequest<RequestBody>,
    since: Instant,
}

/// Connections to one endpoint with one setting.
pub struct EndpointPool {
    authority: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    http2: bool,
    connect_timeout: Duration,
    /// Idle connections of the direct HTTP/1.1 client, most recently used last, each with the
    /// instant it turns stale (idle for [`POOL_IDLE_TIMEOUT`]): a comparison per checkout
    /// rather than an `Instant` subtraction.
    idle_direct: Mutex<Vec<(Box<H1Conn>, Instant)>>,
    /// Idle hyper HTTP/1.1 connections (streamed bodies, upgrades), most recently used last.
    idle: Mutex<Vec<Idle>>,
    shared_h2: Mutex<Option<http2::SendRequest<RequestBody>>>,
    open: Arc<AtomicUsize>,
}

impl EndpointPool {
    /// Whether requests go out as HTTP/2.
    pub fn is_http2(&self) -> bool {
        self.http2
    }

    /// Whether the connection is TLS (the URI scheme to use).
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Open connections (pooled and busy).
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// A ready connection for `req`: the most recently used idle one, or a new one if
    /// `may_connect` allows. HTTP/1.1 requests whose body is in memory and that ask for no
    /// upgrade get a connection of the direct client (`h1.rs`), others one driven by hyper.
    pub async fn checkout(
        self: &Arc<Self>,
        req: &Request<RequestBody>,
        may_connect: impl FnOnce() -> bool,
    ) -> Result<Conn, ConnectError> {
        let now = Instant::now();
        let upgrade = req.headers().contains_key(header::UPGRADE);
        if let Some(conn) = self.checkout_idle_direct(upgrade, req.body(), now) {
            return Ok(conn);
        }
        self.checkout_other(upgrade, req.body(), now, may_connect)
            .await
    }

    /// Whether a request goes to the direct client: `upgrade` says it asks to switch protocols
    /// (it keeps its `Upgrade` field), which only hyper's client hands over.
    fn takes_direct(&self, upgrade: bool, body: &RequestBody) -> bool {
        !self.http2 && body.is_in_memory() && !upgrade
    }

    /// An idle connection of the direct client for a request held in parts, if the request
    /// can take one and one is left (`now`, an instant the caller has already read, ages
    /// them). No future: the caller need not set a deadline on it. `upgrade`: the request
    /// asks to switch protocols (the caller knows; a look-up in its fields would cost more
    /// than the rest of the checkout).
    pub fn checkout_idle_direct(
        &self,
        upgrade: bool,
        body: &RequestBody,
        now: Instant,
    ) -> Option<Conn> {
        if !self.takes_direct(upgrade, body) {
            return None;
        }
        self.pop_idle_direct(now).map(|conn| Conn {
            sender: Sender::Direct(conn),
            reused: true,
        })
    }

    /// The rest of [`checkout`](Self::checkout), for a request held in parts once
    /// [`checkout_idle_direct`](Self::checkout_idle_direct) found nothing: a new connection
    /// of the direct client, or one of hyper's (idle or new).
    pub async fn checkout_other(
        self: &Arc<Self>,
        upgrade: bool,
        body: &RequestBody,
        now: Instant,
        may_connect: impl FnOnce() -> bool,
    ) -> Result<Conn, ConnectError> {
        if self.takes_direct(upgrade, body) {
            if !may_connect() {
                return Err(ConnectError::ConnectionLimit);
            }
            // Boxed, as below: connecting (TCP, TLS, handshakes) is rare next to reuse, and
            // inline its state would enlarge every request's future, copied on every move.
            let io = Box::pin(self.open_stream_within_timeout()).await?;
            let conn = Box::new(H1Conn::new(io, OpenGuard::new(&self.open)));
            return Ok(Conn {
                sender: Sender::Direct(conn),
                reused: false,
            });
        }
        if self.http2 {
            let existing = lock(&self.shared_h2).clone().filter(|s| !s.is_closed());
            if let Some(sender) = existing {
                return Ok(Conn {
                    sender: Sender::H2(sender),
                    reused: true,
                });
            }
        } else {
            while let Some(mut sender) = self.pop_idle(now) {
                // `ready` resolves at once for a live idle connection and fails for a closed one.
                if sender.ready().await.is_ok() {
                    return Ok(Conn {
                        sender: Sender::H1(sender),
                        reused: true,
                    });
                }
            }
        }
        if !may_connect() {
            return Err(ConnectError::ConnectionLimit);
        }
        Box::pin(self.connect()).await
    }

    fn pop_idle_direct(&self, now: Instant) -> Option<Box<H1Conn>> {
        let mut idle = lock(&self.idle_direct);
        while let Some((mut conn, stale_at)) = idle.pop() {
            if now > stale_at {
                // The stack is ordered by age: everything below is older still.
                idle.clear();
                return None;
            }
            if conn.is_usable() {
                return Some(conn);
            }
        }
        None
    }

    /// Takes back a direct HTTP/1.1 connection whose response ended cleanly; it has been idle
    /// `since` then (its age is what decides whether the backend may have closed it).
    pub(super) fn checkin_h1(&self, conn: Box<H1Conn>, since: Instant) {
        let mut idle = lock(&self.idle_direct);
        if idle.len() < MAX_IDLE_PER_ENDPOINT {
            let stale_at = since.checked_add(POOL_IDLE_TIMEOUT).unwrap_or(since);
            idle.push((conn, stale_at));
        }
    }

    fn pop_idle(&self, now: Instant) -> Option<http1::SendRequest<RequestBody>> {
        let mut idle = lock(&self.idle);
        while let Some(entry) = idle.pop() {
            if now.saturating_duration_since(entry.since) > POOL_IDLE_TIMEOUT {
                // The stack is ordered by age: everything below is older still.
                idle.clear();
                return None;
            }
            if !entry.sender.is_closed() {
                return Some(entry.sender);
            }
        }
        None
    }

    fn checkin(&self, sender: http1::SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = lock(&self.idle);
        if idle.len() >= MAX_IDLE_PER_ENDPOINT {
            return;
        }
        idle.push(Idle {
            sender,
            since: Instant::now(),
        });
    }

    /// Closes idle connections unused for longer than [`POOL_IDLE_TIMEOUT`] (called periodically).
    /// Also closes idle direct connections the backend has closed (hyper's notice on their own).
    pub fn reap(&self) {
        let now = Instant::now();
        lock(&self.idle).retain(|e| {
            !e.sender.is_closed() && now.saturating_duration_since(e.since) <= POOL_IDLE_TIMEOUT
        });
        lock(&self.idle_direct).retain_mut(|(conn, stale_at)| now <= *stale_at && conn.is_usable());
    }

    async fn open_stream_within_timeout(&self) -> Result<MaybeTls, ConnectError> {
        let timeout = self.connect_timeout;
        tokio::time::timeout(timeout, self.open_stream())
            .await
            .map_err(|_| ConnectError::Timeout(timeout))?
    }

    async fn connect(self: &Arc<Self>) -> Result<Conn, ConnectError> {
        let io = self.open_stream_within_timeout().await?;
        let open = Arc::clone(&self.open);
        let sender = if self.http2 {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(30))
                .handshake(TokioIo::new(io))
                .await
                .map_err(ConnectError::Handshake)?;
            spawn_connection(open, conn);
            *lock(&self.shared_h2) = Some(sender.clone());
            Sender::H2(sender)
        } else {
            let (sender, conn) = http1::Builder::new()
                .handshake(TokioIo::new(io))
                .await
                .map_err(ConnectError::Handshake)?;
            spawn_connection(open, conn.with_upgrades());
            Sender::H1(sender)
        };
        Ok(Conn {
            sender,
            reused: false,
        })
    }

    async fn open_stream(&self) -> Result<MaybeTls, ConnectError> {
        let tcp = match self.authority.parse::<SocketAddr>() {
            Ok(addr) => TcpStream::connect(addr).await.map_err(connect_error)?,
            // A host name: resolve per new connection, try each address in turn.
            Err(_) => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address resolved");
                let mut stream = None;
                for addr in tokio::net::lookup_host(self.authority.as_str())
                    .await
                    .map_err(ConnectError::Failed)?
                {
                    match TcpStream::connect(addr).await {
                        Ok(s) => {
                            stream = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                stream.ok_or_else(|| connect_error(last))?
            }
        };
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => Ok(MaybeTls::Plain(tcp)),
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(ConnectError::Failed)?;
                Ok(MaybeTls::Tls(Box::new(tls)))
            }
        }
    }
}

impl Conn {
    /// Sends `req`. On HTTP/1.1 the connection travels with the response (see [`PoolReturn`]).
    pub async fn send(
        self,
        pool: &Arc<EndpointPool>,
        req: Request<RequestBody>,
    ) -> Result<(Response<UpstreamBody>, Option<PoolReturn>), SendError> {
        let (mut head, body) = req.into_parts();
        self.send_parts(
            pool,
            &mut head,
            &mut None,
            &mut Some(body),
            false,
            false,
            None,
        )
        .await
    }

    /// Sends the request `head`, plus the fields `pending` sets aside, with the body in `body`.
    /// The direct client only borrows the head and writes `pending` after it, so with
    /// `keep_head` the head stays intact for another attempt without a copy, and without it the
    /// header map is taken over for the response's fields. hyper's clients take the request
    /// whole: the head is copied (with `pending` inserted) when `keep_head`, else moved out
    /// (taking `pending` into it). A request that was not sent ([`SendError::NotSent`]) is left
    /// whole in `head`, `pending` and `body`. With `encode_fields`, the direct client may
    /// hand the response's fields over encoded for the client (see `h1::EncodedFields`).
    #[allow(clippy::too_many_arguments)]
    pub async fn send_parts(
        self,
        pool: &Arc<EndpointPool>,
        head: &mut http::request::Parts,
        pending: &mut Option<PendingFields>,
        body: &mut Option<RequestBody>,
        keep_head: bool,
        encode_fields: bool,
        deadline: Option<Instant>,
    ) -> Result<(Response<UpstreamBody>, Option<PoolReturn>), SendError> {
        match self.sender {
            Sender::Direct(conn) => {
                let Some(bytes) = body.as_ref().and_then(RequestBody::in_memory) else {
                    // `checkout` gives streamed bodies hyper's client; this is never reached.
                    let err = io::Error::new(io::ErrorKind::Unsupported, "streamed request body");
                    return Err(SendError::NotSent(UpstreamError::H1(err.into())));
                };
                // The direct client keeps its timer with the connection (see `H1Conn::arm`).
                match conn
                    .send(
                        pool,
                        head,
                        pending.as_ref(),
                        &bytes,
                        !keep_head,
                        encode_fields,
                        deadline,
                    )
                    .await
                {
                    Ok(resp) => Ok((resp.map(UpstreamBody::H1), None)),
                    Err(H1SendError::NotSent(err)) => Err(SendError::NotSent(err.into())),
                    Err(H1SendError::Failed(err)) => Err(SendError::Failed(err.into())),
                    Err(H1SendError::TimedOut) => Err(SendError::TimedOut),
                }
            }
            Sender::H1(mut sender) => {
                let req = origin_form(take_request(head, pending, body, keep_head)?);
                let Some(sent) = within(deadline, sender.try_send_request(req)).await else {
                    return Err(SendError::TimedOut);
                };
                match sent {
                    Ok(resp) => Ok((
                        resp.map(UpstreamBody::Hyper),
                        Some(PoolReturn {
                            pool: Arc::clone(pool),
                            sender,
                        }),
                    )),
                    Err(err) => Err(unsent_back(err, head, body, keep_head)),
                }
            }
            Sender::H2(mut sender) => {
                let req = take_request(head, pending, body, keep_head)?;
                let Some(sent) = within(deadline, sender.try_send_request(req)).await else {
                    return Err(SendError::TimedOut);
                };
                match sent {
                    Ok(resp) => Ok((resp.map(UpstreamBody::Hyper), None)),
                    Err(err) => Err(unsent_back(err, head, body, keep_head)),
                }
            }
        }
    }
}

/// `send`'s output, or `None` if `deadline` passes first.
async fn within<T>(deadline: Option<Instant>, send: impl Future<Output = T>) -> Option<T> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, send).await.ok(),
        None => Some(send.await),
    }
}

/// The request for hyper's clients, which take it whole: the head copied when `keep_head`,
/// else moved out of `head`, with the `pending` fields in its map either way.
fn take_request(
    head: &mut http::request::Parts,
    pending: &mut Option<PendingFields>,
    body: &mut Option<RequestBody>,
    keep_head: bool,
) -> Result<Request<RequestBody>, SendError> {
    let Some(body) = body.take() else {
        let err = io::Error::new(io::ErrorKind::InvalidInput, "request body already sent");
        return Err(SendError::NotSent(UpstreamError::H1(err.into())));
    };
    let head = if keep_head {
        let mut copy = copy_head(head);
        if let Some(pending) = pending {
            pending.clone().insert_into(&mut copy.headers);
        }
        copy
    } else {
        // The moved head carries the fields from now on, also if it comes back unsent.
        let mut moved = std::mem::replace(head, Request::new(()).into_parts().0);
        if let Some(pending) = pending.take() {
            pending.insert_into(&mut moved.headers);
        }
        moved
    };
    Ok(Request::from_parts(head, body))
}

/// The error for a failed hyper exchange; a request hyper hands back unsent goes back where it
/// came from.
fn unsent_back(
    mut failed: hyper::client::conn::TrySendError<Request<RequestBody>>,
    head: &mut http::request::Parts,
    body: &mut Option<RequestBody>,
    keep_head: bool,
) -> SendError {
    let unsent = failed.take_message();
    let err = failed.into_error();
    match unsent {
        Some(req) => {
            let (unsent_head, unsent_body) = req.into_parts();
            if !keep_head {
                *head = unsent_head;
            }
            *body = Some(unsent_body);
            SendError::NotSent(err.into())
        }
        None => SendError::Failed(err.into()),
    }
}

/// A copy of a request head for another attempt (method, target, version, fields; no extensions).
pub(super) fn copy_head(parts: &http::request::Parts) -> http::request::Parts {
    let mut head = Request::new(()).into_parts().0;
    head.method = parts.method.clone();
    head.uri = parts.uri.clone();
    head.version = parts.version;
    head.headers = parts.headers.clone();
    head
}

/// HTTP/1.1 to an origin server takes the origin form (`/path?query`, RFC 9112 §3.2.1); hyper's
/// connection API writes whatever target it is given.
fn origin_form(mut req: Request<RequestBody>) -> Request<RequestBody> {
    if req.uri().authority().is_some() {
        let mut parts = http::uri::Parts::default();
        parts.path_and_query = Some(
            req.uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
        );
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
    req
}

fn spawn_connection<F>(open: Arc<AtomicUsize>, conn: F)
where
    F: std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    let open = OpenGuard::new(&open);
    tokio::spawn(async move {
        if let Err(err) = conn.await {
            tracing::debug!(%err, "upstream connection ended with an error");
        }
        drop(open);
    });
}

/// Counts one open connection of a pool for as long as it lives.
pub(super) struct OpenGuard(Arc<AtomicUsize>);

impl OpenGuard {
    fn new(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(open))
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn connect_error(err: io::Error) -> ConnectError {
    match err.kind() {
        io::ErrorKind::ConnectionRefused => ConnectError::Refused,
        io::ErrorKind::TimedOut => ConnectError::Timeout(Duration::ZERO),
        _ => ConnectError::Failed(err),
    }
}

/// Pools and TLS configurations shared across snapshots.
#[derive(Default)]
pub struct PoolCache {
    pools: Mutex<HashMap<(String, ConnSettings), Weak<EndpointPool>>>,
    tls: Mutex<HashMap<Option<std::path::PathBuf>, Weak<ClientConfig>>>,
}

impl PoolCache {
    /// The pool for `authority` with `settings`, reusing a live one (and its connections).
    pub fn pool(
        &self,
        authority: &str,
        settings: &ConnSettings,
    ) -> Result<Arc<EndpointPool>, TlsError> {
        let key = (authority.to_owned(), settings.clone());
        try_shared_entry(&self.pools, key, || self.build_pool(authority, settings))
    }

    fn build_pool(
        &self,
        authority: &str,
        settings: &ConnSettings,
    ) -> Result<EndpointPool, TlsError> {
        let http2 = settings.protocol == UpstreamProtocol::H2;
        let tls = match &settings.tls {
            None => None,
            Some(tls) => {
                let base = self.tls_config(tls)?;
                let mut config = (*base).clone();
                config.alpn_protocols = vec![if http2 {
                    b"h2".to_vec()
                } else {
                    b"http/1.1".to_vec()
                }];
                let name = ServerName::try_from(tls.server_name.clone()).map_err(|e| {
                    TlsError::Rustls(rustls::Error::General(format!(
                        "invalid server name {:?}: {e}",
                        tls.server_name
                    )))
                })?;
                Some((TlsConnector::from(Arc::new(config)), name))
            }
        };
        Ok(EndpointPool {
            authority: authority.to_owned(),
            tls,
            http2,
            connect_timeout: settings.connect_timeout,
            idle_direct: Mutex::new(Vec::new()),
            idle: Mutex::new(Vec::new()),
            shared_h2: Mutex::new(None),
            open: Arc::new(AtomicUsize::new(0)),
        })
    }

    fn tls_config(&self, tls: &UpstreamTls) -> Result<Arc<ClientConfig>, TlsError> {
        try_shared_entry(&self.tls, tls.ca_file.clone(), || {
            client_config(tls.ca_file.as_deref())
        })
    }
}

/// A plain or TLS upstream stream.
pub(super) enum MaybeTls {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl MaybeTls {
    /// Reads once onto the end of `buf`, about `want` bytes (see `recv.rs` for the plain
    /// socket); `Ok(0)` is the end of the stream.
    pub(super) fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        want: usize,
    ) -> Poll<io::Result<usize>> {
        match self {
            MaybeTls::Plain(s) => super::recv::poll_recv_buf(s, cx, buf, want),
            MaybeTls::Tls(s) => {
                buf.reserve(want);
                tokio_util::io::poll_read_buf(Pin::new(s.as_mut()), cx, buf)
            }
        }
    }
}

impl AsyncRead for MaybeTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MaybeTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => super::send::poll_send(s, cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Tls(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::AtomicUsize;

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A backend speaking just enough HTTP/1.1: answers each request on a connection with a
    /// `len`-byte body, and closes every connection `close_after` after its first answer.
    struct Backend {
        addr: SocketAddr,
        accepted: Arc<AtomicUsize>,
        /// Connections the backend has closed on its side.
        closed: Arc<AtomicUsize>,
    }

    struct CountOnDrop(Arc<AtomicUsize>);

    impl Drop for CountOnDrop {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Backend {
        async fn start(len: usize, close_after: Option<Duration>) -> Backend {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let accepted = Arc::new(AtomicUsize::new(0));
            let closed = Arc::new(AtomicUsize::new(0));
            let count = Arc::clone(&accepted);
            let closed_count = Arc::clone(&closed);
            tokio::spawn(async move {
                while let Ok((mut socket, _)) = listener.accept().await {
                    count.fetch_add(1, Ordering::SeqCst);
                    let on_close = CountOnDrop(Arc::clone(&closed_count));
                    tokio::spawn(async move {
                        let _on_close = on_close;
                        let mut buf = vec![0u8; 4096];
                        let mut head = Vec::new();
                        loop {
                            let Ok(n) = socket.read(&mut buf).await else {
                                return;
                            };
                            if n == 0 {
                                return;
                            }
                            head.extend_from_slice(&buf[..n]);
                            while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                                head.drain(..end + 4);
                                let answer =
                                    format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n");
                                let mut out = answer.into_bytes();
                                out.resize(out.len() + len, b'x');
                                if socket.write_all(&out).await.is_err() {
                                    return;
                                }
                                if let Some(after) = close_after {
                                    tokio::time::sleep(after).await;
                                    return;
                                }
                            }
                        }
                    });
                }
            });
            Backend {
                addr,
                accepted,
                closed,
            }
        }
    }

    /// An HTTP/1.1 pool for `addr` with default settings.
    pub(crate) fn pool_for(addr: SocketAddr) -> Arc<EndpointPool> {
        let settings = ConnSettings {
            protocol: UpstreamProtocol::Http1,
            tls: None,
            connect_timeout: Duration::from_secs(1),
        };
        PoolCache::default()
            .pool(&addr.to_string(), &settings)
            .unwrap()
    }

    async fn get(pool: &Arc<EndpointPool>) -> (UpstreamBody, Option<PoolReturn>) {
        let req = Request::get("/").body(RequestBody::empty()).unwrap();
        let conn = pool.checkout(&req, || true).await.unwrap();
        match conn.send(pool, req).await {
            Ok((response, pooled)) => (response.into_body(), pooled),
            Err(_) => panic!("exchange failed"),
        }
    }

    /// One whole exchange, the connection handed back at the end as the proxy does.
    async fn fetch(pool: &Arc<EndpointPool>) -> usize {
        let (body, pooled) = get(pool).await;
        let len = body.collect().await.unwrap().to_bytes().len();
        if let Some(pooled) = pooled {
            pooled.release();
        }
        len
    }

    async fn eventually(what: &str, check: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_body_has_been_read() {
        let backend = Backend::start(100_000, None).await;
        let pool = pool_for(backend.addr);
        for _ in 0..3 {
            assert_eq!(fetch(&pool).await, 100_000);
        }
        assert_eq!(
            backend.accepted.load(Ordering::SeqCst),
            1,
            "one connection, reused"
        );
        assert_eq!(pool.open_connections(), 1);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_the_connection() {
        let backend = Backend::start(1 << 20, None).await;
        let pool = pool_for(backend.addr);
        let (mut body, pooled) = get(&pool).await;
        body.frame().await.unwrap().unwrap();
        drop((body, pooled));
        eventually("the half-read connection to close", || {
            pool.open_connections() == 0
        })
        .await;
        assert_eq!(fetch(&pool).await, 1 << 20);
        assert_eq!(backend.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_idle_connection_the_backend_closed_is_never_handed_out() {
        let backend = Backend::start(10, Some(Duration::ZERO)).await;
        let pool = pool_for(backend.addr);
        fetch(&pool).await;
        eventually("the backend to close its side", || {
            backend.closed.load(Ordering::SeqCst) == 1
        })
        .await;
        // Let the runtime's I/O driver see the FIN (no reap: checkout itself must notice).
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(pool.open_connections(), 1, "still pooled, not yet checked");
        let req = Request::get("/").body(RequestBody::empty()).unwrap();
        let conn = pool.checkout(&req, || true).await.unwrap();
        assert!(
            !conn.reused,
            "the closed pooled connection is not handed out"
        );
        assert_eq!(pool.open_connections(), 1, "the closed one was dropped");
        drop(conn);
        assert_eq!(fetch(&pool).await, 10);
        // The first, the one checked out and dropped unused, and the one `fetch` opened.
        assert_eq!(backend.accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn reaping_closes_idle_connections_the_backend_closed() {
        let backend = Backend::start(10, Some(Duration::ZERO)).await;
        let pool = pool_for(backend.addr);
        fetch(&pool).await;
        assert_eq!(pool.open_connections(), 1);
        eventually("the reaper to drop the closed connection", || {
            pool.reap();
            pool.open_connections() == 0
        })
        .await;
    }

    #[tokio::test]
    async fn upgrade_requests_use_hyper_and_plain_ones_the_direct_client() {
        let backend = Backend::start(10, None).await;
        let pool = pool_for(backend.addr);
        assert_eq!(fetch(&pool).await, 10);
        // An upgrade request cannot use the direct client: a second connection opens.
        let req = Request::get("/")
            .header(header::UPGRADE, "websocket")
            .body(RequestBody::empty())
            .unwrap();
        let conn = pool.checkout(&req, || true).await.unwrap();
        assert!(!conn.reused);
        assert!(matches!(conn.sender, Sender::H1(_)));
        drop(conn);
        let req = Request::get("/").body(RequestBody::empty()).unwrap();
        let conn = pool.checkout(&req, || true).await.unwrap();
        assert!(
            conn.reused,
            "a plain request reuses the idle direct connection"
        );
        assert!(matches!(conn.sender, Sender::Direct(_)));
    }
}
