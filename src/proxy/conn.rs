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
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

const HEADER_TIMEOUT_RESPONSE: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nx-breakwater-error: request_header_timeout\r\ncontent-length: 58\r\nconnection: close\r\n\r\nrequest head not received in time (timeouts.requestHeader)\n";

/// State shared between a connection's I/O wrapper and the requests served on it.
#[derive(Debug, Default)]
pub struct ConnShared {
    /// Whether a [`ConnIo`] reads this connection. Only its idle and head timers use the
    /// request counts, so requests are counted from then on (the direct server keeps its own
    /// timers and hands a connection to a `ConnIo` only between requests).
    tracked: AtomicBool,
    active: AtomicU32,
    started: AtomicU64,
    upgraded: AtomicBool,
    http2: AtomicBool,
    /// Set once any request head on this connection had framing flags (keeps the common check lock-free).
    any_head_flags: AtomicBool,
    /// (request sequence number, flags) of flagged heads.
    head_flags: Mutex<Vec<(u64, u8)>>,
    /// The connection's reader, parked while a request was in progress: the last request to
    /// finish wakes it so the idle clock starts even if the client sends nothing more.
    idle_waker: AtomicWaker,
}

/// `Content-Length` and `Transfer-Encoding` both present (hyper silently drops the length).
pub const HEAD_CL_AND_TE: u8 = 1;
/// More than one `Content-Length` field (hyper silently merges equal ones).
pub const HEAD_DUPLICATE_CL: u8 = 2;
/// A transfer coding other than `chunked` (hyper accepts `gzip, chunked` and would let the
/// proxy drop the coding with the hop-by-hop header): answered 501.
pub const HEAD_UNSUPPORTED_TE: u8 = 4;
/// `chunked` applied more than once (RFC 9112 §6.1 forbids it): answered 400.
pub const HEAD_REPEATED_CHUNKED: u8 = 8;

impl ConnShared {
    /// Counts a request as started; it ends when the returned guard is dropped (after its body).
    /// `None`, counting nothing, until a [`ConnIo`] reads the connection: on the direct
    /// server's connections that saves some seven atomic read-modify-writes a request (the
    /// counts up and down, the guard's reference count, the idle waker's hand-off).
    pub fn start_request(self: &Arc<Self>) -> Option<ActiveRequest> {
        if !self.tracked.load(Ordering::Acquire) {
            return None;
        }
        self.active.fetch_add(1, Ordering::AcqRel);
        self.started.fetch_add(1, Ordering::AcqRel);
        Some(ActiveRequest(Arc::clone(self)))
    }

    /// Framing flags recorded for the request with sequence number `seq` (1-based), if any.
    pub fn head_flags(&self, seq: u64) -> u8 {
        if !self.any_head_flags.load(Ordering::Acquire) {
            return 0;
        }
        self.head_flags
            .lock()
            .map(|flags| flags.iter().find(|(s, _)| *s == seq).map_or(0, |(_, f)| *f))
            .unwrap_or(0)
    }

    fn record_head_flags(&self, seq: u64, flags: u8) {
        if let Ok(mut all) = self.head_flags.lock() {
            // A connection that keeps sending malformed heads is closed after the first 400;
            // the bound only guards against a pathological pipeline.
            if all.len() < 64 {
                all.push((seq, flags));
            }
        }
        self.any_head_flags.store(true, Ordering::Release);
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
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(waker) = self.0.idle_waker.take() {
                waker.wake();
            }
        }
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
        // The deadline in force and the instant the timer is armed for: extending a deadline
        // only moves `deadline`, and the timer is re-armed when it fires early, so the common
        // request cycle touches the timer wheel not at all.
        deadline: Instant,
        armed: Instant,
        shared: Arc<ConnShared>,
        phase: Phase,
        seen_started: u64,
        idle: Duration,
        header: Duration,
        pending_408: &'static [u8],
        timed_out: bool,
        heads: HeadTracker,
        // Bytes read from the stream before this wrapper took it over (see `server.rs`):
        // returned first, and inspected like any other read.
        prefix: Bytes,
    }
}

impl<S> ConnIo<S> {
    /// Wraps a freshly accepted stream.
    pub fn new(inner: S, shared: Arc<ConnShared>, idle: Duration, header: Duration) -> Self {
        shared.tracked.store(true, Ordering::Release);
        let now = Instant::now();
        Self {
            inner,
            timer: tokio::time::sleep_until(now + idle),
            deadline: now + idle,
            armed: now + idle,
            shared,
            phase: Phase::Idle,
            seen_started: 0,
            idle,
            header,
            pending_408: &[],
            timed_out: false,
            heads: HeadTracker::default(),
            prefix: Bytes::new(),
        }
    }

    /// Returns `prefix` — bytes already read from the stream — before reading on.
    pub fn with_prefix(mut self, prefix: Bytes) -> Self {
        self.prefix = prefix;
        self
    }
}

/// Reads from `prefix` while it lasts, then from `inner`.
fn poll_read_prefixed<S: AsyncRead>(
    prefix: &mut Bytes,
    inner: Pin<&mut S>,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    if prefix.is_empty() {
        return inner.poll_read(cx, buf);
    }
    let n = prefix.len().min(buf.remaining());
    buf.put_slice(&prefix.split_to(n));
    Poll::Ready(Ok(()))
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
            return poll_read_prefixed(this.prefix, this.inner, cx, buf);
        }
        let started = shared.started.load(Ordering::Acquire);
        if shared.active.load(Ordering::Acquire) > 0 {
            *this.phase = Phase::Busy;
            *this.seen_started = started;
        } else if *this.phase == Phase::Busy || started != *this.seen_started {
            // The last request finished: the keep-alive idle clock starts now.
            *this.phase = Phase::Idle;
            *this.seen_started = started;
            set_deadline(
                this.timer.as_mut(),
                this.armed,
                this.deadline,
                Instant::now() + *this.idle,
            );
            this.heads.resync(started);
        }
        let before = buf.filled().len();
        let result = poll_read_prefixed(this.prefix, this.inner.as_mut(), cx, buf);
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
                    this.heads.feed(&buf.filled()[before..], shared);
                    // A head that arrived whole is served at once: only a partial one needs the
                    // (shorter) head deadline.
                    if this.heads.head_incomplete() {
                        *this.phase = Phase::ReadingHead;
                        set_deadline(
                            this.timer.as_mut(),
                            this.armed,
                            this.deadline,
                            Instant::now() + *this.header,
                        );
                    }
                    return result;
                }
                if !shared.http2.load(Ordering::Acquire) {
                    this.heads.feed(&buf.filled()[before..], shared);
                }
                return result;
            }
            Poll::Ready(_) => return result,
            Poll::Pending => {}
        }
        if *this.phase == Phase::Busy {
            shared.idle_waker.register(cx.waker());
            // The request may have finished between the check above and the registration.
            if shared.active.load(Ordering::Acquire) == 0 {
                cx.waker().wake_by_ref();
            }
            return Poll::Pending;
        }
        loop {
            if this.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // Fired: real expiry, or the armed instant of a deadline that was since extended.
            if Instant::now() >= *this.deadline {
                break;
            }
            *this.armed = *this.deadline;
            this.timer.as_mut().reset(*this.deadline);
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

/// Runs raw client bytes through the head tracker and returns the framing flags of every
/// request head found, in order (for fuzzing and tests; the proxy feeds it from `ConnIo`).
pub fn inspect_heads(bytes: &[u8]) -> Vec<(u64, u8)> {
    let shared = ConnShared::default();
    let mut tracker = HeadTracker::default();
    // Feed in two pieces so the split-head path is exercised too.
    let (first, second) = bytes.split_at(bytes.len() / 2);
    tracker.feed(first, &shared);
    tracker.feed(second, &shared);
    shared
        .head_flags
        .lock()
        .map(|f| f.clone())
        .unwrap_or_default()
}

/// Largest head prefix kept for inspection; hyper enforces the real header limit.
const MAX_INSPECTED_HEAD: usize = 64 << 10;

/// Follows the HTTP/1 byte stream from the client (heads and `Content-Length` bodies) to find
/// framing that hyper normalises away before a request reaches the proxy, and records it against
/// the request's sequence number — pipelined requests included.
///
/// Chunked bodies are followed (chunk sizes, data, trailers; hyper does the decoding) so a
/// request pipelined behind one is inspected too. Anything this cannot follow (a head or chunk
/// line hyper will reject) pauses tracking until the connection is idle again; tracking then
/// resumes in step with hyper's request count.
#[derive(Debug, Default)]
struct HeadTracker {
    state: Track,
    pending: Vec<u8>,
    heads: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Track {
    #[default]
    Head,
    Body(u64),
    Chunked(Chunk),
    Lost,
}

/// Where the tracker is inside a chunked body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk-size line: the size so far, whether a digit was seen, and whether the
    /// extensions part (after `;`) has begun.
    Size {
        size: u64,
        digits: bool,
        ext: bool,
        len: u16,
    },
    /// Skipping chunk data.
    Data(u64),
    /// Expecting the CRLF after chunk data (`true` once the CR was seen).
    DataEnd(bool),
    /// Reading trailer lines after the last chunk: bytes on the current line so far.
    Trailer(u16),
}

/// Longest chunk-size line (with extensions) or trailer line followed; hyper's own limits are
/// lower, so a longer one is rejected by hyper anyway.
const MAX_CHUNK_LINE: u16 = 8 << 10;

impl Chunk {
    const START: Chunk = Chunk::Size {
        size: 0,
        digits: false,
        ext: false,
        len: 0,
    };

    /// Advances over `bytes`; returns how many were consumed and the next state, `None` when
    /// the body ended (`Some(Err(()))`: the framing is invalid).
    fn advance(mut self, bytes: &[u8]) -> (usize, Result<Option<Chunk>, ()>) {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            self = match self {
                Chunk::Data(remaining) => {
                    let take = usize::try_from(remaining)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len() - i);
                    i += take;
                    let left = remaining - take as u64;
                    if left == 0 {
                        Chunk::DataEnd(false)
                    } else {
                        Chunk::Data(left)
                    }
                }
                Chunk::DataEnd(cr) => {
                    i += 1;
                    match (b, cr) {
                        (b'\r', false) => Chunk::DataEnd(true),
                        (b'\n', _) => Chunk::START,
                        _ => return (i, Err(())),
                    }
                }
                Chunk::Size {
                    size,
                    digits,
                    ext,
                    len,
                } => {
                    i += 1;
                    if len >= MAX_CHUNK_LINE {
                        return (i, Err(()));
                    }
                    let len = len + 1;
                    match b {
                        b'\n' if digits && size == 0 => Chunk::Trailer(0),
                        b'\n' if digits => Chunk::Data(size),
                        b'\n' => return (i, Err(())),
                        b'\r' | b';' | b' ' | b'\t' => Chunk::Size {
                            size,
                            digits,
                            ext: true,
                            len,
                        },
                        _ if ext => Chunk::Size {
                            size,
                            digits,
                            ext,
                            len,
                        },
                        _ => {
                            let Some(digit) = (b as char).to_digit(16) else {
                                return (i, Err(()));
                            };
                            let Some(size) = size
                                .checked_mul(16)
                                .and_then(|s| s.checked_add(u64::from(digit)))
                            else {
                                return (i, Err(()));
                            };
                            Chunk::Size {
                                size,
                                digits: true,
                                ext,
                                len,
                            }
                        }
                    }
                }
                Chunk::Trailer(len) => {
                    i += 1;
                    match b {
                        // An empty line ends the trailers and the body.
                        b'\n' if len == 0 => return (i, Ok(None)),
                        b'\n' => Chunk::Trailer(0),
                        // A CR alone does not start the line's content.
                        b'\r' if len == 0 => Chunk::Trailer(0),
                        _ if len >= MAX_CHUNK_LINE => return (i, Err(())),
                        _ => Chunk::Trailer(len + 1),
                    }
                }
            };
        }
        (i, Ok(Some(self)))
    }
}

/// Moves the deadline; the timer is re-armed only when the deadline comes earlier than it.
fn set_deadline(timer: Pin<&mut Sleep>, armed: &mut Instant, deadline: &mut Instant, at: Instant) {
    *deadline = at;
    if at < *armed {
        *armed = at;
        timer.reset(at);
    }
}

impl HeadTracker {
    /// Whether a request head has begun but not ended (or the stream cannot be followed).
    fn head_incomplete(&self) -> bool {
        self.state == Track::Lost || !self.pending.is_empty()
    }

    /// Back in step after every request in flight finished.
    fn resync(&mut self, requests_started: u64) {
        if self.state == Track::Lost || self.heads != requests_started {
            self.state = Track::Head;
            self.pending.clear();
            self.heads = requests_started;
        }
    }

    fn feed(&mut self, mut bytes: &[u8], shared: &ConnShared) {
        loop {
            match self.state {
                Track::Lost => return,
                Track::Body(remaining) => {
                    let take = usize::try_from(remaining)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len());
                    bytes = &bytes[take..];
                    let left = remaining - take as u64;
                    self.state = if left == 0 {
                        Track::Head
                    } else {
                        Track::Body(left)
                    };
                    if left > 0 || bytes.is_empty() {
                        return;
                    }
                }
                Track::Chunked(chunk) => {
                    let (used, next) = chunk.advance(bytes);
                    bytes = &bytes[used..];
                    match next {
                        Ok(Some(chunk)) => {
                            self.state = Track::Chunked(chunk);
                            return;
                        }
                        Ok(None) => self.state = Track::Head,
                        Err(()) => {
                            self.state = Track::Lost;
                            return;
                        }
                    }
                    if bytes.is_empty() {
                        return;
                    }
                }
                Track::Head => {
                    if self.pending.is_empty() {
                        // Empty lines between pipelined requests are allowed (RFC 9112 §2.2).
                        let skip = bytes
                            .iter()
                            .take_while(|b| **b == b'\r' || **b == b'\n')
                            .count();
                        bytes = &bytes[skip..];
                        if bytes.is_empty() {
                            return;
                        }
                    }
                    // Fast path: the whole head is in this read, nothing is copied.
                    let from_pending = !self.pending.is_empty();
                    if from_pending {
                        if self.pending.len() + bytes.len() > MAX_INSPECTED_HEAD {
                            self.state = Track::Lost;
                            return;
                        }
                        self.pending.extend_from_slice(bytes);
                    }
                    let data: &[u8] = if from_pending { &self.pending } else { bytes };
                    match judge_head(data) {
                        HeadVerdict::Partial => {
                            if !from_pending {
                                self.pending.extend_from_slice(bytes);
                            }
                            return;
                        }
                        HeadVerdict::Invalid => {
                            self.state = Track::Lost;
                            return;
                        }
                        HeadVerdict::Complete { len, flags, body } => {
                            self.heads += 1;
                            if flags != 0 {
                                shared.record_head_flags(self.heads, flags);
                            }
                            self.state = match body {
                                BodyFraming::None => Track::Head,
                                BodyFraming::Length(n) => Track::Body(n),
                                BodyFraming::Chunked => Track::Chunked(Chunk::START),
                                BodyFraming::Unknown => Track::Lost,
                            };
                            if from_pending {
                                // Rare (a head split across reads): continue on the remainder.
                                let rest = self.pending.split_off(len);
                                self.pending.clear();
                                return self.feed(&rest, shared);
                            }
                            bytes = &bytes[len..];
                            if bytes.is_empty() {
                                return;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Fast path for the common head: complete, and naming neither `Content-Length` nor
/// `Transfer-Encoding` (so no body and nothing to flag). `None` sends the head to the full parser.
fn judge_simple_head(data: &[u8]) -> Option<HeadVerdict> {
    let mut line_start = 0;
    let mut first_line = true;
    while let Some(offset) = data[line_start..].iter().position(|b| *b == b'\n') {
        let line = &data[line_start..line_start + offset];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        line_start += offset + 1;
        if line.is_empty() {
            return (!first_line).then_some(HeadVerdict::Complete {
                len: line_start,
                flags: 0,
                body: BodyFraming::None,
            });
        }
        if !first_line {
            let starts = |name: &[u8]| {
                line.len() >= name.len() && line[..name.len()].eq_ignore_ascii_case(name)
            };
            if starts(b"content-length") || starts(b"transfer-encoding") {
                return None;
            }
        }
        first_line = false;
    }
    None
}

enum BodyFraming {
    None,
    Length(u64),
    Chunked,
    Unknown,
}

enum HeadVerdict {
    Partial,
    Invalid,
    Complete {
        len: usize,
        flags: u8,
        body: BodyFraming,
    },
}

fn judge_head(data: &[u8]) -> HeadVerdict {
    if let Some(verdict) = judge_simple_head(data) {
        return verdict;
    }
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(data) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return HeadVerdict::Partial,
        // hyper rejects what httparse rejects; nothing to add.
        Err(_) => return HeadVerdict::Invalid,
    };
    let mut content_lengths = 0;
    let mut length = None;
    let mut transfer_encoding = false;
    let mut flags = 0;
    // The codings in order across every Transfer-Encoding field; only a final `chunked` frames
    // a body hyper accepts.
    let mut chunked_count = 0;
    let mut last_is_chunked = false;
    for h in request.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            content_lengths += 1;
            length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok());
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = true;
            for coding in h.value.split(|b| *b == b',') {
                let coding = coding.trim_ascii();
                if coding.is_empty() {
                    continue;
                }
                last_is_chunked = coding.eq_ignore_ascii_case(b"chunked");
                if last_is_chunked {
                    chunked_count += 1;
                } else {
                    flags |= HEAD_UNSUPPORTED_TE;
                }
            }
        }
    }
    if chunked_count > 1 {
        flags |= HEAD_REPEATED_CHUNKED;
    }
    if content_lengths > 0 && transfer_encoding {
        flags |= HEAD_CL_AND_TE;
    }
    if content_lengths > 1 {
        flags |= HEAD_DUPLICATE_CL;
    }
    let body = if transfer_encoding {
        // hyper decodes a body whose last coding is chunked; anything else it rejects.
        if last_is_chunked && request.version == Some(1) {
            BodyFraming::Chunked
        } else {
            BodyFraming::Unknown
        }
    } else if content_lengths > 0 && length.is_none() {
        BodyFraming::Unknown
    } else {
        match length {
            Some(0) | None => BodyFraming::None,
            Some(n) => BodyFraming::Length(n),
        }
    };
    HeadVerdict::Complete { len, flags, body }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judged(head: &[u8]) -> (usize, u8, Option<u64>) {
        match judge_head(head) {
            HeadVerdict::Complete { len, flags, body } => (
                len,
                flags,
                match body {
                    BodyFraming::None => Some(0),
                    BodyFraming::Length(n) => Some(n),
                    BodyFraming::Chunked | BodyFraming::Unknown => None,
                },
            ),
            HeadVerdict::Partial => panic!("partial"),
            HeadVerdict::Invalid => panic!("invalid"),
        }
    }

    #[test]
    fn simple_and_full_parsers_agree_on_framing() {
        let get = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nNEXT";
        assert_eq!(judged(get), (get.len() - 4, 0, Some(0)));
        let post = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(judged(post), (post.len() - 5, 0, Some(5)));
        let both = b"POST / HTTP/1.1\r\nHost: a\r\ncontent-length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(judged(both), (both.len(), HEAD_CL_AND_TE, None));
        let dup = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nCONTENT-LENGTH: 1\r\n\r\nx";
        assert_eq!(judged(dup).1, HEAD_DUPLICATE_CL);
        assert!(matches!(
            judge_head(b"GET / HTTP/1.1\r\nHost: a\r\n"),
            HeadVerdict::Partial
        ));
    }

    #[test]
    fn transfer_codings_other_than_one_final_chunked_are_flagged() {
        let head =
            |te: &str| format!("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: {te}\r\n\r\n");
        assert_eq!(judged(head("chunked").as_bytes()).1, 0);
        assert_eq!(judged(head("Chunked").as_bytes()).1, 0);
        assert_eq!(
            judged(head("gzip, chunked").as_bytes()).1,
            HEAD_UNSUPPORTED_TE
        );
        assert_eq!(
            judged(head("chunked, chunked").as_bytes()).1,
            HEAD_REPEATED_CHUNKED
        );
    }

    #[test]
    fn heads_pipelined_behind_a_chunked_body_are_still_judged() {
        let stream = b"POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\na\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\nPOST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /c HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx";
        assert_eq!(
            inspect_heads(stream),
            vec![(2, HEAD_CL_AND_TE), (3, HEAD_DUPLICATE_CL)],
            "the second and third requests are found after the chunked body"
        );
        // Every split point gives the same answer.
        for split in 1..stream.len() {
            let shared = ConnShared::default();
            let mut tracker = HeadTracker::default();
            tracker.feed(&stream[..split], &shared);
            tracker.feed(&stream[split..], &shared);
            let flags = shared
                .head_flags
                .lock()
                .map(|f| f.clone())
                .unwrap_or_default();
            assert_eq!(
                flags,
                vec![(2, HEAD_CL_AND_TE), (3, HEAD_DUPLICATE_CL)],
                "split at {split}"
            );
        }
    }

    #[test]
    fn malformed_chunk_lines_stop_tracking() {
        let stream = b"POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nGET /b HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx";
        let shared = ConnShared::default();
        let mut tracker = HeadTracker::default();
        tracker.feed(stream, &shared);
        assert_eq!(
            tracker.state,
            Track::Lost,
            "hyper rejects the body; nothing more to follow"
        );
    }
}
