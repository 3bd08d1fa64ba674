//! Request and response bodies: streamed frame by frame, never buffered whole.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::conn::ActiveRequest;
use super::h1::EncodedFields;
use super::pool::{PoolReturn, UpstreamBody, UpstreamError};
use super::server::CarriesEncodedFields;
use crate::cache::{LeaderGuard, PendingEntry};
use crate::endpoint::InFlightGuard;
use crate::snapshot::ConcurrencySlot;

/// A client's request body as a server connection hands it over.
pub enum ClientBody {
    /// Streamed from the client by hyper's server connection.
    Streaming(Incoming),
    /// Read whole together with its head (the direct HTTP/1.1 server; empty for no body).
    Buffered(Bytes),
}

impl ClientBody {
    /// Whether no body bytes will follow.
    pub fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Streaming(body) => body.is_end_stream(),
            ClientBody::Buffered(data) => data.is_empty(),
        }
    }
}

/// Why a client's request body could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    /// The client's body broke off or was malformed (bad chunking, early close).
    #[error("client request body: {0}")]
    Client(#[source] hyper::Error),
    /// The body passed `limits.maxRequestBodyBytes`.
    #[error("request body exceeds {0} bytes")]
    TooLarge(u64),
}

pin_project! {
    /// A request body on its way upstream: the client's stream, counted against the body limit,
    /// or nothing (health checks, bodiless requests built by the proxy).
    pub struct RequestBody {
        #[pin]
        kind: RequestKind,
    }
}

pin_project! {
    #[project = RequestKindProj]
    enum RequestKind {
        Empty,
        Full { data: Option<Bytes> },
        Streaming {
            #[pin]
            inner: Incoming,
            received: u64,
            limit: u64,
        },
    }
}

impl RequestBody {
    /// Wraps `inner`, failing once more than `limit` bytes arrive.
    pub fn new(inner: Incoming, limit: u64) -> Self {
        Self {
            kind: RequestKind::Streaming {
                inner,
                received: 0,
                limit,
            },
        }
    }

    /// No body.
    pub fn empty() -> Self {
        Self {
            kind: RequestKind::Empty,
        }
    }

    /// A body held in memory (so it can be sent again on a retry).
    pub fn full(data: Bytes) -> Self {
        Self {
            kind: RequestKind::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    /// The whole body, if it is in memory (empty for no body); `None` for a streamed one.
    pub fn in_memory(&self) -> Option<Bytes> {
        match &self.kind {
            RequestKind::Empty => Some(Bytes::new()),
            RequestKind::Full { data } => Some(data.clone().unwrap_or_default()),
            RequestKind::Streaming { .. } => None,
        }
    }

    /// Whether the body is in memory (or absent) rather than streamed from the client.
    pub fn is_in_memory(&self) -> bool {
        !matches!(self.kind, RequestKind::Streaming { .. })
    }
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            RequestKind::Empty => f.write_str("RequestBody::Empty"),
            RequestKind::Full { data } => write!(
                f,
                "RequestBody::Full({} bytes)",
                data.as_ref().map_or(0, Bytes::len)
            ),
            RequestKind::Streaming {
                received, limit, ..
            } => f
                .debug_struct("RequestBody::Streaming")
                .field("received", received)
                .field("limit", limit)
                .finish(),
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project().kind.project() {
            RequestKindProj::Empty => Poll::Ready(None),
            RequestKindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            RequestKindProj::Streaming {
                inner,
                received,
                limit,
            } => match ready!(inner.poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        *received += data.len() as u64;
                        if *received > *limit {
                            return Poll::Ready(Some(Err(RequestBodyError::TooLarge(*limit))));
                        }
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Some(Err(err)) => Poll::Ready(Some(Err(RequestBodyError::Client(err)))),
                None => Poll::Ready(None),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Empty => true,
            RequestKind::Full { data } => data.is_none(),
            RequestKind::Streaming { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Empty => SizeHint::with_exact(0),
            RequestKind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            RequestKind::Streaming { inner, .. } => inner.size_hint(),
        }
    }
}

/// Why a response body stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ResponseBodyError {
    /// The upstream connection broke mid-body.
    #[error("upstream response body: {0}")]
    Upstream(#[source] UpstreamError),
    /// No bytes moved for `timeouts.idle`.
    #[error("upstream response body idle for longer than timeouts.idle")]
    Idle,
}

pin_project! {
    /// A response on its way to the client: either the backend's stream or a body the proxy wrote.
    ///
    /// It carries the guards that count the request as in flight (on the endpoint and on the
    /// client connection) so both end only when the last byte has been handed to the client.
    pub struct ResponseBody {
        #[pin]
        kind: Kind,
        endpoint_guard: Option<InFlightGuard>,
        active: Option<ActiveRequest>,
        slot: Option<ConcurrencySlot>,
        pool_return: Option<PoolReturn>,
        fill: Option<Box<CacheFill>>,
    }
}

/// A response being copied into the cache as it streams to the client. Stored only when the
/// body ends cleanly; the coalescing leader (if any) then hands the entry to its followers, and
/// dropping the fill early (error, client gone) releases them to fetch for themselves.
pub struct CacheFill {
    pending: PendingEntry,
    leader: Option<LeaderGuard>,
}

impl CacheFill {
    /// Tees into `pending`, reporting to `leader` at the end.
    pub fn new(pending: PendingEntry, leader: Option<LeaderGuard>) -> Self {
        Self { pending, leader }
    }

    /// Feeds a data chunk; false when the entry was given up (grew past the object cap).
    fn push(&mut self, data: &Bytes) -> bool {
        self.pending.push(data)
    }

    /// The body ended cleanly: store the entry and tell the followers.
    fn finish(self) {
        let Self { pending, leader } = self;
        match (pending.finish(), leader) {
            (Ok(entry), Some(leader)) => leader.stored(entry),
            (Err(_), Some(leader)) => leader.not_stored(),
            (_, None) => {}
        }
    }

    /// The entry cannot be stored: release the followers to fetch for themselves.
    fn give_up(self) {
        if let Some(leader) = self.leader {
            leader.not_stored();
        }
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind {
        Full { data: Option<Bytes> },
        Upstream {
            #[pin]
            inner: UpstreamBody,
            // Created only once the body actually has to wait: most responses never do.
            idle_timer: Option<Pin<Box<Sleep>>>,
            idle: Duration,
            last_progress: Instant,
        },
    }
}

impl CarriesEncodedFields for ResponseBody {
    fn take_encoded_fields(&mut self) -> Option<EncodedFields> {
        match &mut self.kind {
            Kind::Upstream {
                inner: UpstreamBody::H1(body),
                ..
            } => body.take_encoded_fields(),
            _ => None,
        }
    }

    fn head_received(&self) -> Option<Instant> {
        ResponseBody::head_received(self)
    }
}

impl ResponseBody {
    /// A complete body written by the proxy.
    pub fn full(data: impl Into<Bytes>) -> Self {
        let data = data.into();
        Self {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
            },
            endpoint_guard: None,
            active: None,
            slot: None,
            pool_return: None,
            fill: None,
        }
    }

    /// An empty body.
    pub fn empty() -> Self {
        Self::full(Bytes::new())
    }

    /// The backend's body, failing if it stalls for `idle`. Its upstream connection (if any)
    /// goes back to the pool once the body has been read to the end. `received` is when the
    /// response head arrived (the idle clock starts there).
    pub fn upstream(
        inner: UpstreamBody,
        idle: Duration,
        endpoint_guard: InFlightGuard,
        pool_return: Option<PoolReturn>,
        received: Instant,
    ) -> Self {
        // A response without a body may never be polled: release its connection now.
        let pool_return = match pool_return {
            Some(ret) if inner.is_end_stream() => {
                ret.release();
                None
            }
            other => other,
        };
        Self {
            kind: Kind::Upstream {
                inner,
                idle_timer: None,
                idle,
                last_progress: received,
            },
            endpoint_guard: Some(endpoint_guard),
            active: None,
            slot: None,
            pool_return,
            fill: None,
        }
    }

    /// Copies the body into the cache as it streams (see [`CacheFill`]).
    pub fn with_cache_fill(mut self, fill: CacheFill) -> Self {
        match &self.kind {
            // A body written whole by the proxy, or already over: store it right away.
            Kind::Full { data } => {
                let mut fill = fill;
                if data.as_ref().is_none_or(|d| fill.push(d)) {
                    fill.finish();
                } else {
                    fill.give_up();
                }
            }
            Kind::Upstream { inner, .. } if inner.is_end_stream() => fill.finish(),
            Kind::Upstream { .. } => self.fill = Some(Box::new(fill)),
        }
        self
    }

    /// When the backend's response head arrived, for a body not yet read from (the proxy's own
    /// bodies have none).
    pub fn head_received(&self) -> Option<Instant> {
        match &self.kind {
            Kind::Upstream { last_progress, .. } => Some(*last_progress),
            Kind::Full { .. } => None,
        }
    }

    /// Keeps the request counted against the policy's concurrency limit until this body is done.
    /// In place: a response is a few hundred bytes, and moving it costs a copy each time.
    pub fn hold_slot(&mut self, slot: ConcurrencySlot) {
        self.slot = Some(slot);
    }

    /// Keeps the client connection's request count, if it keeps one, until this body is done
    /// (in place, as [`Self::hold_slot`]).
    pub fn hold_active(&mut self, active: Option<ActiveRequest>) {
        self.active = active;
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = ResponseBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        match this.kind.project() {
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Upstream {
                inner,
                idle_timer,
                idle,
                last_progress,
            } => {
                let mut inner = inner;
                match inner.as_mut().poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        // Progress only matters while a timer exists; it is re-armed when it fires.
                        if idle_timer.is_some() {
                            *last_progress = Instant::now();
                        }
                        if let (Some(fill), Some(data)) = (this.fill.as_mut(), frame.data_ref()) {
                            if !fill.push(data) {
                                if let Some(fill) = this.fill.take() {
                                    fill.give_up();
                                }
                            }
                        }
                        // hyper stops polling once `is_end_stream` says so: a body of known
                        // length ends with its last data frame, not with a final `None`.
                        if inner.is_end_stream() {
                            this.endpoint_guard.take();
                            if let Some(ret) = this.pool_return.take() {
                                ret.release();
                            }
                            if let Some(fill) = this.fill.take() {
                                fill.finish();
                            }
                        }
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    Poll::Ready(Some(Err(err))) => {
                        // A cut-short body is never stored; followers fetch for themselves.
                        this.fill.take();
                        return Poll::Ready(Some(Err(ResponseBodyError::Upstream(err))));
                    }
                    Poll::Ready(None) => {
                        this.endpoint_guard.take();
                        if let Some(ret) = this.pool_return.take() {
                            ret.release();
                        }
                        if let Some(fill) = this.fill.take() {
                            fill.finish();
                        }
                        return Poll::Ready(None);
                    }
                    Poll::Pending => {}
                }
                let timer = idle_timer.get_or_insert_with(|| {
                    *last_progress = Instant::now();
                    Box::pin(tokio::time::sleep_until(*last_progress + *idle))
                });
                loop {
                    ready!(timer.as_mut().poll(cx));
                    let deadline = *last_progress + *idle;
                    if deadline <= Instant::now() {
                        this.fill.take();
                        return Poll::Ready(Some(Err(ResponseBodyError::Idle)));
                    }
                    timer.as_mut().reset(deadline);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full { data } => data.is_none(),
            Kind::Upstream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Upstream { inner, .. } => inner.size_hint(),
        }
    }
}
