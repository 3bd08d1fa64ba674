//! A client connection's I/O wrapper that enforces the request-head and idle keep-alive timeouts.
//!
//! hyper's own `header_read_timeout` closes the socket silently and also covers idle keep-alive
//! time, so one knob would serve two purposes and the slow client would never learn why. This
//! wrapper tells them apart: with no request in progress, a connection that has sent nothing is
//! *idle* (closed quietly after `timeouts.idle`), one that has sent part of a head is *slow*
//! (answered `408` after `timeouts.requestHeader`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

const HEADER_TIMEOUT_RESPONSE: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nx-breakwater-error: request_header_timeout\r\ncontent-length: 58\r\nconnection: close\r\n\r\nrequest head not received in time (timeouts.requestHeader)\n";

/// State shared between a connection's I/O wrapper and the requests served on it.
#[derive(Debug, Default)]
pub struct ConnShared {
    active: AtomicU32,
    started: AtomicU64,
    upgraded: AtomicBool,
    http2: AtomicBool,
    /// Framing problems found in the raw head of request number `value >> 8` (flags in the low byte).
    head_flags: AtomicU64,
}

/// `Content-Length` and `Transfer-Encoding` both present (hyper silently drops the length).
pub const HEAD_CL_AND_TE: u8 = 1;
/// More than one `Content-Length` field (hyper silently merges equal ones).
pub const HEAD_DUPLICATE_CL: u8 = 2;

impl ConnShared {
    /// Counts a request as started; it ends when the returned guard is dropped (after its body).
    pub fn start_request(self: &Arc<Self>) -> ActiveRequest {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.started.fetch_add(1, Ordering::AcqRel);
        ActiveRequest(Arc::clone(self))
    }

    /// Framing flags recorded for the request with sequence number `seq` (1-based), if any.
    pub fn head_flags(&self, seq: u64) -> u8 {
        let packed = self.head_flags.load(Ordering::Acquire);
        if packed >> 8 == seq {
            (packed & 0xff) as u8
        } else {
            0
        }
    }

    /// Sequence number of the most recently started request.
    pub fn requests_started(&self) -> u64 {
        self.started.load(Ordering::Acquire)
    }

    /// The connection now carries a tunnel (WebSocket); head and idle timers no longer apply.
    pub fn mark_upgraded(&self) {
        self.upgraded.store(true, Ordering::Release);
    }

    /// The connection speaks HTTP/2 (known from ALPN or the preface).
    pub fn mark_http2(&self) {
        self.http2.store(true, Ordering::Release);
    }
}

/// One request in progress on a connection.
#[derive(Debug)]
pub struct ActiveRequest(Arc<ConnShared>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Nothing received since the last request started (or the connection opened).
    Idle,
    /// Part of a request head has arrived.
    ReadingHead,
    /// At least one request is being served.
    Busy,
}

pin_project! {
    /// `S` with the head and idle timeouts applied.
    pub struct ConnIo<S> {
        #[pin]
        inner: S,
        #[pin]
        timer: Sleep,
        shared: Arc<ConnShared>,
        phase: Phase,
        seen_started: u64,
        idle: Duration,
        header: Duration,
        pending_408: &'static [u8],
        timed_out: bool,
        head: Vec<u8>,
        head_inspected: bool,
    }
}

impl<S> ConnIo<S> {
    /// Wraps a freshly accepted stream.
    pub fn new(inner: S, shared: Arc<ConnShared>, idle: Duration, header: Duration) -> Self {
        Self {
            inner,
            timer: tokio::time::sleep_until(Instant::now() + idle),
            shared,
            phase: Phase::Idle,
            seen_started: 0,
            idle,
            header,
            pending_408: &[],
            timed_out: false,
            head: Vec::new(),
            head_inspected: false,
        }
    }
}

impl<S: AsyncRead + AsyncWrite> AsyncRead for ConnIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut this = self.project();
        if *this.timed_out {
            return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
        }
        let shared = &**this.shared;
        if shared.upgraded.load(Ordering::Acquire) {
            return this.inner.poll_read(cx, buf);
        }
        let now = Instant::now();
        let started = shared.started.load(Ordering::Acquire);
        if shared.active.load(Ordering::Acquire) > 0 {
            *this.phase = Phase::Busy;
            *this.seen_started = started;
        } else if *this.phase == Phase::Busy || started != *this.seen_started {
            // The last request finished: the keep-alive idle clock starts now.
            *this.phase = Phase::Idle;
            *this.seen_started = started;
            this.timer.as_mut().reset(now + *this.idle);
        }
        let before = buf.filled().len();
        let result = this.inner.as_mut().poll_read(cx, buf);
        match &result {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                if *this.phase == Phase::Idle {
                    if *this.seen_started == 0
                        && buf.filled()[before..].starts_with(b"PRI * HTTP/2")
                    {
                        shared.mark_http2();
                    }
                    // HTTP/2 control frames (PING, SETTINGS) arrive on idle connections too:
                    // only HTTP/1 bytes mean a request head has begun.
                    if shared.http2.load(Ordering::Acquire) {
                        return result;
                    }
                    *this.phase = Phase::ReadingHead;
                    this.timer.as_mut().reset(now + *this.header);
                    this.head.clear();
                    *this.head_inspected = false;
                }
                if *this.phase == Phase::ReadingHead && !*this.head_inspected {
                    *this.head_inspected = inspect_head(
                        this.head,
                        &buf.filled()[before..],
                        shared,
                        *this.seen_started + 1,
                    );
                }
                return result;
            }
            Poll::Ready(_) => return result,
            Poll::Pending => {}
        }
        if *this.phase == Phase::Busy || this.timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        // A deadline passed with no request in progress.
        *this.timed_out = true;
        if *this.phase == Phase::ReadingHead && !shared.http2.load(Ordering::Acquire) {
            tracing::debug!("request head timeout: answering 408");
            *this.pending_408 = HEADER_TIMEOUT_RESPONSE;
            // Best effort: the client is already misbehaving; a full send buffer just drops it.
            while !this.pending_408.is_empty() {
                match this.inner.as_mut().poll_write(cx, this.pending_408) {
                    Poll::Ready(Ok(n)) if n > 0 => *this.pending_408 = &this.pending_408[n..],
                    _ => break,
                }
            }
            let _ = this.inner.as_mut().poll_flush(cx);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head timeout",
            )));
        }
        // Idle keep-alive connection: a clean end of stream lets hyper close it quietly.
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite> AsyncWrite for ConnIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Largest head prefix kept for inspection; hyper enforces the real header limit.
const MAX_INSPECTED_HEAD: usize = 64 << 10;

/// Looks at a raw HTTP/1 request head for framing that hyper normalises away before the
/// request reaches the proxy, and records it against request number `seq`.
/// Returns true once the head has been judged (complete, unparsable or too large).
fn inspect_head(pending: &mut Vec<u8>, chunk: &[u8], shared: &ConnShared, seq: u64) -> bool {
    // Fast path: the whole head arrived in one read (the common case), nothing is copied.
    let bytes: &[u8] = if pending.is_empty() {
        chunk
    } else {
        if pending.len() + chunk.len() > MAX_INSPECTED_HEAD {
            pending.clear();
            return true;
        }
        pending.extend_from_slice(chunk);
        pending
    };
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {
            let mut content_lengths = 0;
            let mut transfer_encoding = false;
            for h in request.headers.iter() {
                if h.name.eq_ignore_ascii_case("content-length") {
                    content_lengths += 1;
                } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                    transfer_encoding = true;
                }
            }
            let mut flags = 0;
            if content_lengths > 0 && transfer_encoding {
                flags |= HEAD_CL_AND_TE;
            }
            if content_lengths > 1 {
                flags |= HEAD_DUPLICATE_CL;
            }
            if flags != 0 {
                shared
                    .head_flags
                    .store(seq << 8 | u64::from(flags), Ordering::Release);
            }
            pending.clear();
            true
        }
        Ok(httparse::Status::Partial) => {
            if pending.is_empty() {
                pending.extend_from_slice(chunk);
            }
            false
        }
        // hyper rejects what httparse rejects; nothing to add.
        Err(_) => {
            pending.clear();
            true
        }
    }
}
