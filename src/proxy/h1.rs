//! HTTP/1.1 to backends for requests whose body is already in memory (no body, or one kept for
//! replay): the common case, handled without hyper's client connection.
//!
//! hyper's client runs each connection in its own task and hands every request to it through a
//! channel, then parses the response into fresh buffers; under callgrind that was about a third
//! of the proxy's user-space instructions per request. Here the request's own task writes the
//! head and body with one write, parses the response head in place with `httparse` (header
//! values are slices of the read buffer, not copies) and reads the body through the same
//! connection, which the body hands back to its pool when it ends cleanly.
//!
//! Requests that stream their body or ask for a protocol upgrade still go through hyper (see
//! `pool.rs`): sending a streamed body while watching for an early response needs a full-duplex
//! connection driver, and upgrades need hyper's `OnUpgrade` plumbing.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWrite;
use tokio::time::{Instant, Sleep};
use tokio_util::io::poll_read_buf;

use super::headers::{
    HOP_CONNECTION, HOP_TRANSFER_ENCODING, PendingFields, hop_by_hop_index, hop_by_hop_index_raw,
    parse_content_length,
};
use super::pool::{EndpointPool, MaybeTls, OpenGuard};
use super::server::{borrow_buffer, return_buffer};
use crate::ascii::{eq_lower, push_decimal};

/// Most header fields accepted in a response head (hyper's default too).
const MAX_HEADERS: usize = 100;
/// Largest response head accepted; nginx's default `proxy_buffer_size` is 4–8 KiB.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest chunk-size line (with extensions) and largest trailer section accepted.
const MAX_CHUNK_LINE_BYTES: usize = 4 * 1024;
const MAX_TRAILER_BYTES: usize = 16 * 1024;
/// Read buffer growth: small for heads and short bodies, larger while a long body streams.
const READ_CHUNK: usize = 8 * 1024;
/// Body data up to this size is copied out of the connection's buffer rather than shared.
const COPY_BODY_BYTES: usize = 2 * 1024;
const LARGE_READ_CHUNK: usize = 32 * 1024;
/// Bodies up to this size are copied behind the head so the request leaves in one write.
const COALESCE_BODY_BYTES: usize = 16 * 1024;

/// Why an exchange on an HTTP/1.1 connection failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    /// Reading or writing the socket failed.
    #[error("upstream connection: {0}")]
    Io(#[from] io::Error),
    /// The backend closed the connection before the response was complete.
    #[error("upstream closed the connection before the response was complete")]
    Closed,
    /// The response broke HTTP/1.1's syntax or framing rules.
    #[error("malformed upstream response: {0}")]
    Malformed(&'static str),
}

impl H1Error {
    /// Whether the backend sent something that is not valid HTTP/1.1 (rather than a broken connection).
    pub fn is_protocol(&self) -> bool {
        matches!(self, H1Error::Malformed(_))
    }
}

/// An exchange that failed, and whether the request could have reached the backend.
pub enum H1SendError {
    /// Not a byte was written: the request can go elsewhere.
    NotSent(H1Error),
    /// The request (or part of it) was written.
    Failed(H1Error),
    /// The deadline passed before the response head was complete (the request may have been
    /// written).
    TimedOut,
}

/// One HTTP/1.1 connection to a backend, owned by whoever is using it: the pool while idle, the
/// request while it sends, the response body while it is read.
pub struct H1Conn {
    io: MaybeTls,
    read: BytesMut,
    write: Vec<u8>,
    /// Where each header field of the response head being parsed sits in `read`; kept across
    /// requests so parsing allocates and zeroes nothing.
    fields: Vec<FieldOffsets>,
    /// The deadline of the request in flight, kept from one request to the next (see
    /// [`ConnTimer`]).
    timer: Option<ConnTimer>,
    _open: OpenGuard,
}

/// Name start, name end, value start, value end.
type FieldOffsets = [usize; 4];

/// A connection's timer, kept from one request to the next. A fresh tokio timer per request
/// takes the timer wheel's lock twice (to insert and to remove) and a handful of atomic
/// operations; even moving a registered one (`Sleep::reset`) costs three. Deadlines mostly
/// only move later, so a later one is just noted: the timer goes off at the earlier instant it
/// was set to, sees the deadline has moved, and is set again then, once per timeout period
/// rather than once per request.
struct ConnTimer {
    sleep: Pin<Box<Sleep>>,
    /// The deadline in force; the sleep is set to it or to an earlier instant.
    deadline: Instant,
}

impl ConnTimer {
    fn new(deadline: Instant) -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
            deadline,
        }
    }

    /// Makes `deadline` the one in force.
    fn set(&mut self, deadline: Instant) {
        if deadline < self.sleep.deadline() {
            self.sleep.as_mut().reset(deadline);
        }
        self.deadline = deadline;
    }

    /// Ready once the deadline in force has passed.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            ready!(self.sleep.as_mut().poll(cx));
            if self.sleep.deadline() >= self.deadline {
                return Poll::Ready(());
            }
            // Went off at an earlier request's deadline: wait for this one's.
            self.sleep.as_mut().reset(self.deadline);
        }
    }
}

/// How the response body is delimited (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

impl H1Conn {
    /// Wraps a freshly connected stream; `open` counts it against its pool until dropped.
    pub(super) fn new(io: MaybeTls, open: OpenGuard) -> Self {
        Self {
            io,
            read: BytesMut::new(),
            write: Vec::new(),
            fields: Vec::new(),
            timer: None,
            _open: open,
        }
    }

    /// Sets the connection's timer to `deadline` (made on first use). It is polled only while
    /// the socket is not ready, so an exchange that never waits costs no timer work at all.
    fn arm(&mut self, deadline: Instant) {
        match &mut self.timer {
            Some(timer) => timer.set(deadline),
            None => self.timer = Some(ConnTimer::new(deadline)),
        }
    }

    /// Whether an idle connection can still carry a request: the backend has neither closed it
    /// nor sent anything unasked. Costs no system call unless the socket became readable.
    pub(super) fn is_usable(&mut self) -> bool {
        if !self.read.is_empty() {
            return false;
        }
        match &mut self.io {
            // `try_read_buf` reads only if the socket was seen readable (a closed or chatty
            // backend) and otherwise answers `WouldBlock` from the readiness bits alone. A
            // readiness poll would also answer that, but only after locking the socket's waiter
            // list to store a waker this check does not want.
            MaybeTls::Plain(tcp) => matches!(
                tcp.try_read_buf(&mut self.read),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock
            ),
            // TLS may hold records (a close_notify) that only a read reveals.
            MaybeTls::Tls(_) => {
                self.read.reserve(64);
                let mut cx = Context::from_waker(Waker::noop());
                matches!(
                    poll_read_buf(Pin::new(&mut self.io), &mut cx, &mut self.read),
                    Poll::Pending
                )
            }
        }
    }

    /// Sends `head` (then the `pending` fields) and `body` and reads the response head, all
    /// before `deadline` if one is given. The head is only borrowed, so it
    /// stays with the caller for another attempt without a copy; with `reuse_head_map` its
    /// header map, once written out, is taken over (cleared) for the response's fields instead
    /// of allocating another. The connection travels on inside the response body, which returns
    /// it to `pool` once the body has been read to its end on a connection that stays open.
    /// With `encode_fields` the response's end-to-end fields may come encoded for the client
    /// rather than in its map (see [`EncodedFields`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn send(
        mut self: Box<Self>,
        pool: &Arc<EndpointPool>,
        head: &mut http::request::Parts,
        pending: Option<&PendingFields>,
        body: &Bytes,
        reuse_head_map: bool,
        encode_fields: bool,
        deadline: Option<Instant>,
    ) -> Result<Response<H1Body>, H1SendError> {
        let is_head = head.method == Method::HEAD;
        encode_request(&mut self.write, head, pending, body.len());
        let separate_body = body.len() > COALESCE_BODY_BYTES;
        if !separate_body {
            self.write.extend_from_slice(body);
        }
        if let Some(deadline) = deadline {
            self.arm(deadline);
        }
        let timed = deadline.is_some();
        let H1Conn {
            io, write, timer, ..
        } = &mut *self;
        let mut timer = timer_if(timer, timed);
        // The first write tells whether anything left: if it fails, the request can go elsewhere.
        let mut written = 0;
        step_sent(
            write_timed(io, timer.as_deref_mut(), write, &mut written, true).await,
            true,
        )?;
        step_sent(
            write_timed(io, timer.as_deref_mut(), write, &mut written, false).await,
            false,
        )?;
        if separate_body {
            step_sent(
                write_timed(io, timer.as_deref_mut(), body, &mut 0, false).await,
                false,
            )?;
        }
        let flushed = std::future::poll_fn(|cx| {
            let flush = Pin::new(&mut *io).poll_flush(cx);
            poll_timed(timer.as_deref_mut(), cx, flush)
        })
        .await;
        step_sent(flushed, false)?;
        let headers = if reuse_head_map {
            let mut headers = std::mem::take(&mut head.headers);
            headers.clear();
            headers
        } else {
            HeaderMap::new()
        };
        self.read_response(pool, is_head, headers, encode_fields, timed)
            .await
    }

    async fn read_response(
        mut self: Box<Self>,
        pool: &Arc<EndpointPool>,
        is_head: bool,
        mut headers: HeaderMap,
        encode_fields: bool,
        timed: bool,
    ) -> Result<Response<H1Body>, H1SendError> {
        loop {
            let parsed = parse_head(
                &mut self.read,
                &mut self.fields,
                &mut headers,
                encode_fields && !is_head,
            );
            if let Some(head) = parsed.map_err(H1SendError::Failed)? {
                let status = head.status.as_u16();
                // Interim responses (100 Continue, 103 Early Hints) are not forwarded; 101 is
                // final: the connection now speaks another protocol and is never reused.
                if (100..200).contains(&status) && status != 101 {
                    headers = head.headers;
                    headers.clear();
                    continue;
                }
                let (framing, keep_alive) = framing(&head, is_head).map_err(H1SendError::Failed)?;
                let received = Instant::now();
                let encoded = head.encoded;
                let mut response = Response::new(());
                *response.status_mut() = head.status;
                *response.version_mut() = head.version;
                *response.headers_mut() = head.headers;
                let reusable = keep_alive && framing != Framing::UntilClose && status != 101;
                let mut body = H1Body::new(self, Arc::clone(pool), framing, reusable, received);
                body.hop_by_hop_stripped = head.hop.stripped;
                body.encoded = encoded;
                return Ok(response.map(|()| body));
            }
            if self.read.len() >= MAX_HEAD_BYTES {
                return Err(H1SendError::Failed(H1Error::Malformed(
                    "response head too large",
                )));
            }
            let conn = &mut *self;
            let read = std::future::poll_fn(|cx| {
                let read = conn.io.poll_read_into(cx, &mut conn.read, READ_CHUNK);
                poll_timed(timer_if(&mut conn.timer, timed), cx, read)
            })
            .await;
            match read {
                Some(Ok(0)) => return Err(H1SendError::Failed(H1Error::Closed)),
                Some(Ok(_)) => {}
                Some(Err(err)) => return Err(H1SendError::Failed(err.into())),
                None => return Err(H1SendError::TimedOut),
            }
        }
    }
}

/// `op`'s result, or while it is pending the connection's timer: `None` once the deadline
/// has passed. The timer is polled only after `op`, so a socket that is ready costs no timer
/// work.
fn poll_timed<T>(
    timer: Option<&mut ConnTimer>,
    cx: &mut Context<'_>,
    op: Poll<T>,
) -> Poll<Option<T>> {
    if let Poll::Ready(value) = op {
        return Poll::Ready(Some(value));
    }
    match timer {
        Some(timer) => timer.poll(cx).map(|()| None),
        None => Poll::Pending,
    }
}

/// A timed write or flush of the request as the exchange's result: a failure is `NotSent`
/// only on the `first` write, before any byte can have left.
fn step_sent(step: Option<io::Result<()>>, first: bool) -> Result<(), H1SendError> {
    match step {
        Some(Ok(())) => Ok(()),
        Some(Err(err)) if first => Err(H1SendError::NotSent(err.into())),
        Some(Err(err)) => Err(H1SendError::Failed(err.into())),
        None => Err(H1SendError::TimedOut),
    }
}

/// The connection's timer when this exchange has a deadline (an earlier request's timer,
/// still set to its deadline, must not cut one that has none).
fn timer_if(timer: &mut Option<ConnTimer>, timed: bool) -> Option<&mut ConnTimer> {
    if timed { timer.as_mut() } else { None }
}

/// Writes `buf` from `*at` on, advancing `at` (after the first successful write only, with
/// `once`); `None` once the deadline has passed.
async fn write_timed(
    io: &mut MaybeTls,
    mut timer: Option<&mut ConnTimer>,
    buf: &[u8],
    at: &mut usize,
    once: bool,
) -> Option<io::Result<()>> {
    std::future::poll_fn(|cx| {
        while *at < buf.len() {
            let write = Pin::new(&mut *io).poll_write(cx, &buf[*at..]);
            match ready!(poll_timed(timer.as_deref_mut(), cx, write)) {
                Some(Ok(0)) => return Poll::Ready(Some(Err(io::ErrorKind::WriteZero.into()))),
                Some(Ok(n)) => {
                    *at += n;
                    if once {
                        break;
                    }
                }
                Some(Err(err)) => return Poll::Ready(Some(Err(err))),
                None => return Poll::Ready(None),
            }
        }
        Poll::Ready(Some(Ok(())))
    })
    .await
}

/// Writes the request line and header section into `out` (cleared first). The message framing
/// is the proxy's own: a body in memory has a known length, so any `Content-Length` or
/// `Transfer-Encoding` the head carries is replaced by the actual length.
fn encode_request(
    out: &mut Vec<u8>,
    head: &http::request::Parts,
    pending: Option<&PendingFields>,
    body_len: usize,
) {
    out.clear();
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    let target = head
        .uri
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    out.extend_from_slice(if target.is_empty() { "/" } else { target }.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let skip_length = body_len > 0;
    for (name, value) in &head.headers {
        if name == header::TRANSFER_ENCODING || (skip_length && name == header::CONTENT_LENGTH) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in pending.into_iter().flat_map(PendingFields::iter) {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if body_len > 0 {
        out.extend_from_slice(b"content-length: ");
        push_decimal(out, body_len as u64);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A response head's end-to-end fields encoded for the client, as the backend sent them (names
/// in their own letter case), without the hop-by-hop fields and `Content-Length` (the direct
/// server frames the body itself). The direct server writes them behind its status line, so a
/// response nothing reads the fields of skips building a header map only to encode it again:
/// per field a name look-up, a shared slice of the head (two atomic operations) and a hash
/// insertion.
#[derive(Debug)]
pub struct EncodedFields {
    /// `name: value\r\n` for each field, in the order received.
    pub lines: Vec<u8>,
    /// Whether a `Date` field is among them.
    pub has_date: bool,
}

impl EncodedFields {
    /// Gives the buffer back to this thread's spares.
    pub fn recycle(self) {
        return_buffer(self.lines);
    }
}

struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    hop: HopFields,
    /// The fields, when they were encoded rather than put in `headers` (left empty).
    encoded: Option<EncodedFields>,
}

/// Parses one response head off the front of `buf`; `None` while it is incomplete. The fields go
/// into `spare`, an empty map whose allocations the head takes over (an interim response hands
/// back an empty map with them). With `encode`, a response that has a body, does not name fields
/// in `Connection`, does not switch protocols and is not a 429 or 503 gets its fields as
/// [`EncodedFields`] instead. Answers without a body of their own (204, 304, and any answer to
/// `HEAD`, for which the caller leaves `encode` off) keep the map: the direct server passes on
/// the `Content-Length` they may carry.
fn parse_head(
    buf: &mut BytesMut,
    fields: &mut Vec<FieldOffsets>,
    spare: &mut HeaderMap,
    encode: bool,
) -> Result<Option<Head>, H1Error> {
    // Offsets into `buf`: names and values become slices of the head once it is split off.
    fields.clear();
    let (len, code, minor) = {
        // Uninitialised slots: zeroing 100 header slots per response showed up in profiles.
        let mut slots =
            [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            buf,
            &mut slots,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(H1Error::Malformed("too many header fields"));
            }
            Err(_) => return Err(H1Error::Malformed("invalid response head")),
        };
        let base = buf.as_ptr() as usize;
        for h in response.headers.iter() {
            let name = h.name.as_ptr() as usize - base;
            let value = h.value.as_ptr() as usize - base;
            fields.push([name, name + h.name.len(), value, value + h.value.len()]);
        }
        (
            len,
            response.code.unwrap_or(0),
            response.version.unwrap_or(1),
        )
    };
    let status = StatusCode::from_u16(code).map_err(|_| H1Error::Malformed("invalid status"))?;
    let version = if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // 429 and 503 answers may carry a `Retry-After` a retry decision reads from the map.
    if encode && !matches!(code, 100..=199 | 204 | 304 | 429 | 503) {
        // The fields are copied out, so the head need not be split off as shared bytes (a
        // reference count taken and dropped): it is read in place and then skipped.
        let head = &buf[..len];
        let mut hop = HopFields::default();
        let mut lines = borrow_buffer();
        lines.reserve(head.len());
        let mut has_date = false;
        for &[name_start, name_end, value_start, value_end] in fields.iter() {
            // httparse checked the bytes against the same rules as `HeaderName` and
            // `HeaderValue`: a token for the name, no control characters but tab in the value.
            let name = &head[name_start..name_end];
            let value = &head[value_start..value_end];
            match hop_by_hop_index_raw(name) {
                None if eq_lower(name, b"content-length") => {
                    hop.note_content_length(value);
                }
                None => {
                    has_date |= eq_lower(name, b"date");
                    lines.extend_from_slice(name);
                    lines.extend_from_slice(b": ");
                    lines.extend_from_slice(value);
                    lines.extend_from_slice(b"\r\n");
                }
                Some(index) => hop.note(index, value),
            }
        }
        if !hop.connection_names_fields {
            buf.advance(len);
            return Ok(Some(Head {
                status,
                version,
                headers: std::mem::take(spare),
                hop,
                encoded: Some(EncodedFields { lines, has_date }),
            }));
        }
        // The fields `Connection` names must go too: the map and the general stripping decide.
        return_buffer(lines);
    }
    let head = buf.split_to(len).freeze();
    // One more for the `Via` the proxy appends on the way back.
    let mut headers = std::mem::take(spare);
    headers.reserve(fields.len() + 1);
    let mut hop = HopFields::default();
    for offsets in fields.iter() {
        let (name, value) = field(&head, offsets)?;
        // Hop-by-hop fields describe this connection only: what framing needs is noted, and
        // they never enter the map the client will see (no insertion now, no removal later).
        match hop_by_hop_index(&name) {
            None => {
                if name == header::CONTENT_LENGTH {
                    hop.note_content_length(value.as_bytes());
                }
                headers.append(name, value);
            }
            Some(index) => hop.note(index, value.as_bytes()),
        }
    }
    // `Connection` naming other fields, or a protocol switch: rare, and the general stripping
    // (which keeps `Upgrade` for a 101) decides. The map is built again with every field.
    if hop.connection_names_fields || code == 101 {
        headers.clear();
        for offsets in fields.iter() {
            let (name, value) = field(&head, offsets)?;
            headers.append(name, value);
        }
        hop.stripped = false;
    }
    Ok(Some(Head {
        status,
        version,
        headers,
        hop,
        encoded: None,
    }))
}

/// The field at `offsets` of `head`, its value sharing the head's bytes.
fn field(head: &Bytes, offsets: &FieldOffsets) -> Result<(HeaderName, HeaderValue), H1Error> {
    let &[name_start, name_end, value_start, value_end] = offsets;
    let name = HeaderName::from_bytes(&head[name_start..name_end])
        .map_err(|_| H1Error::Malformed("invalid header name"))?;
    let value = HeaderValue::from_maybe_shared(head.slice(value_start..value_end))
        .map_err(|_| H1Error::Malformed("invalid header value"))?;
    Ok((name, value))
}

/// What a response's hop-by-hop fields said, noted while they were left out of its map.
#[derive(Debug)]
struct HopFields {
    /// `Connection` lists `close`.
    close: bool,
    /// `Connection` lists `keep-alive`.
    keep_alive: bool,
    /// `Connection` lists anything else (a field to remove, or `upgrade`).
    connection_names_fields: bool,
    /// `Transfer-Encoding` is present.
    transfer_encoding: bool,
    /// The last coding of the last `Transfer-Encoding` field is `chunked`.
    chunked_last: bool,
    /// Every hop-by-hop field was left out of the map (false: the map has them all, and
    /// the general stripping must run).
    stripped: bool,
    /// A `Content-Length` field is present.
    has_length: bool,
    /// The one length its values agree on.
    length: Option<u64>,
    /// Why its values are unusable: one is not a number, or two differ.
    length_error: Option<&'static str>,
}

impl Default for HopFields {
    fn default() -> Self {
        Self {
            close: false,
            keep_alive: false,
            connection_names_fields: false,
            transfer_encoding: false,
            chunked_last: false,
            stripped: true,
            has_length: false,
            length: None,
            length_error: None,
        }
    }
}

impl HopFields {
    /// Notes what the hop-by-hop field at `index` of the list says about framing, if anything.
    fn note(&mut self, index: usize, value: &[u8]) {
        match index {
            HOP_CONNECTION => self.note_connection(value),
            HOP_TRANSFER_ENCODING => self.note_transfer_encoding(value),
            _ => {}
        }
    }

    fn note_connection(&mut self, value: &[u8]) {
        for token in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
            if eq_lower(token, b"close") {
                self.close = true;
            } else if eq_lower(token, b"keep-alive") {
                self.keep_alive = true;
            } else if !token.is_empty() {
                self.connection_names_fields = true;
            }
        }
    }

    fn note_content_length(&mut self, value: &[u8]) {
        self.has_length = true;
        if self.length_error.is_some() {
            return;
        }
        for part in value.split(|b| *b == b',') {
            let Some(n) = parse_content_length(part) else {
                self.length_error = Some("invalid content-length");
                return;
            };
            if self.length.is_some_and(|l| l != n) {
                self.length_error = Some("conflicting content-length values");
                return;
            }
            self.length = Some(n);
        }
    }

    fn note_transfer_encoding(&mut self, value: &[u8]) {
        self.transfer_encoding = true;
        self.chunked_last = value
            .rsplit(|b| *b == b',')
            .next()
            .is_some_and(|last| eq_lower(last.trim_ascii(), b"chunked"));
    }
}

/// The body's framing (RFC 9112 §6.3) and whether the connection may carry another request.
fn framing(head: &Head, is_head_request: bool) -> Result<(Framing, bool), H1Error> {
    let hop = &head.hop;
    let mut keep_alive = if head.version == Version::HTTP_11 {
        !hop.close
    } else {
        hop.keep_alive
    };
    let status = head.status.as_u16();
    if is_head_request || status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok((Framing::Length(0), keep_alive));
    }
    if hop.transfer_encoding {
        // Both framings present is a smuggling vector: honour Transfer-Encoding, never reuse.
        if hop.has_length {
            keep_alive = false;
        }
        return Ok((
            if hop.chunked_last {
                Framing::Chunked
            } else {
                Framing::UntilClose
            },
            keep_alive,
        ));
    }
    if let Some(error) = hop.length_error {
        return Err(H1Error::Malformed(error));
    }
    Ok((
        hop.length.map_or(Framing::UntilClose, Framing::Length),
        keep_alive,
    ))
}

#[derive(Clone, Copy, Debug)]
enum BodyState {
    /// Bytes still to come of a `Content-Length` body.
    Length(u64),
    /// Expecting a chunk-size line.
    ChunkSize,
    /// Bytes still to come of the current chunk.
    ChunkData(u64),
    /// Expecting the CRLF after a chunk's data.
    ChunkEnd,
    /// Expecting the trailer section (possibly empty) after the last chunk.
    Trailers,
    /// Everything until the backend closes the connection.
    UntilClose,
    Done,
}

/// A response body read straight off its HTTP/1.1 connection.
pub struct H1Body {
    conn: Option<Box<H1Conn>>,
    pool: Option<Arc<EndpointPool>>,
    state: BodyState,
    reusable: bool,
    /// The response's map was built without its hop-by-hop fields.
    hop_by_hop_stripped: bool,
    /// The response's fields, when they came encoded rather than in its map.
    encoded: Option<EncodedFields>,
    /// When the response head was complete.
    received: Instant,
    /// Reading the body had to wait for the backend at least once.
    waited: bool,
}

impl std::fmt::Debug for H1Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Body")
            .field("state", &self.state)
            .field("reusable", &self.reusable)
            .finish_non_exhaustive()
    }
}

/// What the bytes already buffered allow the decoder to do next.
enum Step {
    Data(Bytes),
    Trailers(HeaderMap),
    /// The state moved on without producing a frame.
    Again,
    NeedMore,
}

impl H1Body {
    fn new(
        conn: Box<H1Conn>,
        pool: Arc<EndpointPool>,
        framing: Framing,
        reusable: bool,
        received: Instant,
    ) -> Self {
        let state = match framing {
            Framing::Length(0) => BodyState::Done,
            Framing::Length(n) => BodyState::Length(n),
            Framing::Chunked => BodyState::ChunkSize,
            Framing::UntilClose => BodyState::UntilClose,
        };
        let mut body = Self {
            conn: Some(conn),
            pool: Some(pool),
            state,
            reusable,
            hop_by_hop_stripped: false,
            encoded: None,
            received,
            waited: false,
        };
        if matches!(body.state, BodyState::Done) {
            // A body that is already over may never be polled: hand the connection back now.
            body.finish();
        }
        body
    }

    /// Whether the response head this body belongs to has no hop-by-hop fields left: they
    /// were noted and left out as it was parsed, so stripping them again can be skipped.
    pub fn hop_by_hop_stripped(&self) -> bool {
        self.hop_by_hop_stripped
    }

    /// When the response head was complete (read once here, for the caller's latency figures
    /// and the connection's idle age alike).
    pub fn received(&self) -> Instant {
        self.received
    }

    /// The response's end-to-end fields, when they came encoded for the client rather than in
    /// its map (which then holds only what the proxy added).
    pub fn take_encoded_fields(&mut self) -> Option<EncodedFields> {
        self.encoded.take()
    }

    /// The body ended: the connection goes back to its pool if it can carry another request.
    fn finish(&mut self) {
        self.state = BodyState::Done;
        let (Some(conn), Some(pool)) = (self.conn.take(), self.pool.take()) else {
            return;
        };
        // Bytes beyond the end of the response were never asked for: the connection is unusable.
        if self.reusable && conn.read.is_empty() {
            // Idle from the head's arrival if the body came with it; else from now.
            let since = if self.waited {
                Instant::now()
            } else {
                self.received
            };
            pool.checkin_h1(conn, since);
        }
    }

    fn fail(&mut self, err: H1Error) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        self.conn = None;
        self.state = BodyState::Done;
        Poll::Ready(Some(Err(err)))
    }
}

/// The first `len` bytes of `buf`, taken off it: copied with `copy`, so the connection's
/// buffer is not turned into a shared one whose every slice and drop is an atomic operation
/// (for the small bodies most messages carry a copy is cheaper); else split off and shared.
pub(super) fn take_front(buf: &mut BytesMut, len: usize, copy: bool) -> Bytes {
    if copy {
        let data = Bytes::copy_from_slice(&buf[..len]);
        buf.advance(len);
        data
    } else {
        buf.split_to(len).freeze()
    }
}

/// Decodes what `buf` holds in `state`, advancing both.
fn step(state: &mut BodyState, buf: &mut BytesMut) -> Result<Step, H1Error> {
    match *state {
        BodyState::Done => Ok(Step::Again),
        BodyState::Length(remaining) | BodyState::ChunkData(remaining) => {
            if buf.is_empty() {
                return Ok(Step::NeedMore);
            }
            let take = usize::try_from(remaining)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            let data = take_front(buf, take, take <= COPY_BODY_BYTES);
            let left = remaining - take as u64;
            *state = match (*state, left) {
                (BodyState::Length(_), 0) => BodyState::Done,
                (BodyState::Length(_), _) => BodyState::Length(left),
                (_, 0) => BodyState::ChunkEnd,
                (_, _) => BodyState::ChunkData(left),
            };
            Ok(Step::Data(data))
        }
        BodyState::UntilClose => {
            if buf.is_empty() {
                return Ok(Step::NeedMore);
            }
            Ok(Step::Data(take_front(
                buf,
                buf.len(),
                buf.len() <= COPY_BODY_BYTES,
            )))
        }
        BodyState::ChunkSize => match httparse::parse_chunk_size(buf) {
            Ok(httparse::Status::Complete((used, size))) => {
                buf.advance(used);
                *state = if size == 0 {
                    BodyState::Trailers
                } else {
                    BodyState::ChunkData(size)
                };
                Ok(Step::Again)
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_CHUNK_LINE_BYTES => Ok(Step::NeedMore),
            _ => Err(H1Error::Malformed("invalid chunk size line")),
        },
        BodyState::ChunkEnd => {
            if buf.len() < 2 {
                return Ok(Step::NeedMore);
            }
            if &buf[..2] != b"\r\n" {
                return Err(H1Error::Malformed("chunk data not followed by CRLF"));
            }
            buf.advance(2);
            *state = BodyState::ChunkSize;
            Ok(Step::Again)
        }
        BodyState::Trailers => match parse_trailers(buf)? {
            Some((used, trailers)) => {
                buf.advance(used);
                *state = BodyState::Done;
                Ok(Step::Trailers(trailers))
            }
            None => Ok(Step::NeedMore),
        },
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let this = self.get_mut();
        loop {
            if matches!(this.state, BodyState::Done) {
                return Poll::Ready(None);
            }
            let Some(conn) = this.conn.as_mut() else {
                return this.fail(H1Error::Closed);
            };
            match step(&mut this.state, &mut conn.read) {
                Err(err) => return this.fail(err),
                Ok(Step::Again) => {}
                Ok(Step::Data(data)) => {
                    if matches!(this.state, BodyState::Done) {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Step::Trailers(trailers)) => {
                    this.finish();
                    return Poll::Ready(
                        (!trailers.is_empty()).then(|| Ok(Frame::trailers(trailers))),
                    );
                }
                Ok(Step::NeedMore) => {
                    let wanted = match this.state {
                        BodyState::Length(n) | BodyState::ChunkData(n) => n,
                        BodyState::UntilClose => u64::MAX,
                        _ => 0,
                    };
                    let chunk = if wanted > READ_CHUNK as u64 {
                        LARGE_READ_CHUNK
                    } else {
                        READ_CHUNK
                    };
                    let read = conn.io.poll_read_into(cx, &mut conn.read, chunk);
                    let Poll::Ready(read) = read else {
                        this.waited = true;
                        return Poll::Pending;
                    };
                    match read {
                        Err(err) => return this.fail(err.into()),
                        Ok(0) if matches!(this.state, BodyState::UntilClose) => {
                            this.conn = None;
                            this.state = BodyState::Done;
                            return Poll::Ready(None);
                        }
                        Ok(0) => return this.fail(H1Error::Closed),
                        Ok(_) => {}
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, BodyState::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            BodyState::Done => SizeHint::with_exact(0),
            BodyState::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

/// Parses the trailer section after the last chunk: `None` while incomplete.
fn parse_trailers(buf: &[u8]) -> Result<Option<(usize, HeaderMap)>, H1Error> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::parse_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete((used, fields))) => {
            let mut trailers = HeaderMap::new();
            for field in fields {
                let name = HeaderName::from_bytes(field.name.as_bytes())
                    .map_err(|_| H1Error::Malformed("invalid trailer name"))?;
                let value = HeaderValue::from_bytes(field.value)
                    .map_err(|_| H1Error::Malformed("invalid trailer value"))?;
                trailers.append(name, value);
            }
            Ok(Some((used, trailers)))
        }
        Ok(httparse::Status::Partial) if buf.len() < MAX_TRAILER_BYTES => Ok(None),
        Ok(httparse::Status::Partial) => Err(H1Error::Malformed("trailer section too large")),
        Err(_) => Err(H1Error::Malformed("invalid trailer section")),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::proxy::body::RequestBody;
    use crate::proxy::pool::tests::pool_for;
    use crate::proxy::pool::{Conn, SendError, UpstreamBody};
    use http::Request;

    /// What the scripted backend does after writing one response.
    #[derive(Clone, Copy, PartialEq)]
    enum Then {
        KeepOpen,
        Close,
    }

    type Script = Arc<Mutex<std::vec::IntoIter<(&'static [u8], Then)>>>;

    /// A backend that answers the n-th request it reads (on any connection) with the n-th
    /// scripted response, byte for byte, and records every request as it arrived.
    struct Scripted {
        addr: SocketAddr,
        accepted: Arc<AtomicUsize>,
        requests: Arc<Mutex<Vec<Vec<u8>>>>,
    }

    impl Scripted {
        async fn start(script: Vec<(&'static [u8], Then)>) -> Scripted {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let accepted = Arc::new(AtomicUsize::new(0));
            let requests = Arc::new(Mutex::new(Vec::new()));
            let script = Arc::new(Mutex::new(script.into_iter()));
            let (count, seen) = (Arc::clone(&accepted), Arc::clone(&requests));
            tokio::spawn(async move {
                while let Ok((socket, _)) = listener.accept().await {
                    count.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(serve(socket, Arc::clone(&script), Arc::clone(&seen)));
                }
            });
            Scripted {
                addr,
                accepted,
                requests,
            }
        }

        fn request(&self, n: usize) -> String {
            String::from_utf8_lossy(&self.requests.lock().unwrap()[n]).into_owned()
        }
    }

    async fn serve(mut socket: TcpStream, script: Script, seen: Arc<Mutex<Vec<Vec<u8>>>>) {
        let mut buf = Vec::new();
        loop {
            // One request: the head, then as many bytes as its Content-Length says.
            let head_end = loop {
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break end + 4;
                }
                let mut chunk = [0u8; 4096];
                match socket.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
            let body_len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            while buf.len() < head_end + body_len {
                let mut chunk = [0u8; 4096];
                match socket.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            seen.lock()
                .unwrap()
                .push(buf.drain(..head_end + body_len).collect());
            let Some((response, then)) = script.lock().unwrap().next() else {
                return;
            };
            if socket.write_all(response).await.is_err() || then == Then::Close {
                return;
            }
        }
    }

    async fn exchange(
        pool: &Arc<EndpointPool>,
        req: Request<RequestBody>,
    ) -> Result<(Response<UpstreamBody>, bool), SendError> {
        let conn: Conn = pool.checkout(&req, || true).await.unwrap();
        let reused = conn.reused;
        let (response, pool_return) = conn.send(pool, req).await?;
        assert!(
            pool_return.is_none(),
            "direct connections return themselves"
        );
        assert!(matches!(response.body(), UpstreamBody::H1(_)));
        Ok((response, reused))
    }

    fn get(path: &str) -> Request<RequestBody> {
        Request::get(path).body(RequestBody::empty()).unwrap()
    }

    async fn text(response: Response<UpstreamBody>) -> String {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_chunked_body_with_extensions_and_trailers_is_decoded_and_the_connection_reused() {
        let backend = Scripted::start(vec![
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: abc\r\n\r\n",
                Then::KeepOpen,
            ),
            (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", Then::KeepOpen),
        ])
        .await;
        let pool = pool_for(backend.addr);
        let (response, _) = exchange(&pool, get("/")).await.ok().unwrap();
        let collected = response.into_body().collect().await.unwrap();
        assert_eq!(
            collected
                .trailers()
                .and_then(|t| t.get("x-checksum"))
                .unwrap(),
            "abc"
        );
        assert_eq!(&collected.to_bytes()[..], b"hello world");
        let (response, reused) = exchange(&pool, get("/")).await.ok().unwrap();
        assert!(reused);
        assert_eq!(text(response).await, "ok");
        assert_eq!(backend.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn bodies_above_and_below_the_copy_size_arrive_whole_on_a_reused_connection() {
        let large: Vec<u8> = (0..COPY_BODY_BYTES + 1000)
            .map(|i| b'a' + (i % 26) as u8)
            .collect();
        let mut by_length =
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", large.len()).into_bytes();
        by_length.extend_from_slice(&large);
        let mut chunked = format!(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n",
            large.len()
        )
        .into_bytes();
        chunked.extend_from_slice(&large);
        chunked.extend_from_slice(b"\r\n3\r\nxyz\r\n0\r\n\r\n");
        let by_length: &'static [u8] = Box::leak(by_length.into_boxed_slice());
        let chunked: &'static [u8] = Box::leak(chunked.into_boxed_slice());
        let backend = Scripted::start(vec![
            (by_length, Then::KeepOpen),
            (chunked, Then::KeepOpen),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                Then::KeepOpen,
            ),
        ])
        .await;
        let pool = pool_for(backend.addr);
        let (response, _) = exchange(&pool, get("/")).await.ok().unwrap();
        assert_eq!(text(response).await.as_bytes(), &large[..]);
        let (response, reused) = exchange(&pool, get("/")).await.ok().unwrap();
        assert!(reused);
        let mut expected = large.clone();
        expected.extend_from_slice(b"xyz");
        assert_eq!(text(response).await.as_bytes(), &expected[..]);
        let (response, reused) = exchange(&pool, get("/")).await.ok().unwrap();
        assert!(reused);
        assert_eq!(text(response).await, "ok");
        assert_eq!(backend.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn interim_responses_are_skipped() {
        let backend = Scripted::start(vec![(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </style.css>\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 4\r\nx-final: yes\r\n\r\ndone",
            Then::KeepOpen,
        )])
        .await;
        let pool = pool_for(backend.addr);
        let (response, _) = exchange(&pool, get("/")).await.ok().unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        assert!(response.headers().get("link").is_none());
        assert_eq!(response.headers()["x-final"], "yes");
        assert_eq!(text(response).await, "done");
    }

    #[tokio::test]
    async fn a_head_response_has_no_body_whatever_its_content_length() {
        let backend = Scripted::start(vec![
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n",
                Then::KeepOpen,
            ),
            (b"HTTP/1.1 204 No Content\r\n\r\n", Then::KeepOpen),
        ])
        .await;
        let pool = pool_for(backend.addr);
        let head = Request::head("/").body(RequestBody::empty()).unwrap();
        let (response, _) = exchange(&pool, head).await.ok().unwrap();
        assert_eq!(response.headers()["content-length"], "1000");
        assert!(response.body().is_end_stream());
        let (response, reused) = exchange(&pool, get("/")).await.ok().unwrap();
        assert!(reused, "the connection went back to the pool at once");
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        assert!(response.body().is_end_stream());
    }

    #[tokio::test]
    async fn a_body_delimited_by_close_is_read_to_the_end_and_the_connection_not_reused() {
        let backend = Scripted::start(vec![
            (b"HTTP/1.0 200 OK\r\n\r\nall of it", Then::Close),
            (
                b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\nx",
                Then::Close,
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\ny",
                Then::KeepOpen,
            ),
        ])
        .await;
        let pool = pool_for(backend.addr);
        let (response, _) = exchange(&pool, get("/")).await.ok().unwrap();
        assert_eq!(text(response).await, "all of it");
        let (response, reused) = exchange(&pool, get("/")).await.ok().unwrap();
        assert!(!reused);
        assert_eq!(text(response).await, "x");
        let (response, reused) = exchange(&pool, get("/")).await.ok().unwrap();
        assert!(
            !reused,
            "`connection: close` kept the connection out of the pool"
        );
        assert_eq!(text(response).await, "y");
        assert_eq!(backend.accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn bytes_after_the_response_keep_the_connection_out_of_the_pool() {
        let backend = Scripted::start(vec![
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokGARBAGE",
                Then::KeepOpen,
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                Then::KeepOpen,
            ),
        ])
        .await;
        let pool = pool_for(backend.addr);
        let (response, _) = exchange(&pool, get("/")).await.ok().unwrap();
        assert_eq!(text(response).await, "ok");
        let (_, reused) = exchange(&pool, get("/")).await.ok().unwrap();
        assert!(!reused);
        assert_eq!(backend.accepted.load(Ordering::SeqCst), 2);
    }

    async fn poll_once(timer: &mut ConnTimer) -> Poll<()> {
        std::future::poll_fn(|cx| Poll::Ready(timer.poll(cx))).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_moved_later_goes_off_at_the_new_deadline_and_one_moved_earlier_at_that() {
        let start = Instant::now();
        let ms = Duration::from_millis;
        let mut timer = ConnTimer::new(start + ms(10));
        timer.set(start + ms(30));
        tokio::time::sleep_until(start + ms(20)).await;
        assert!(
            poll_once(&mut timer).await.is_pending(),
            "went off at the old deadline"
        );
        tokio::time::sleep_until(start + ms(30)).await;
        assert!(
            poll_once(&mut timer).await.is_ready(),
            "the new deadline passed"
        );
        // Moved on again after going off: the same, from the instant it went off at.
        timer.set(start + ms(100));
        timer.set(start + ms(50));
        tokio::time::sleep_until(start + ms(40)).await;
        assert!(poll_once(&mut timer).await.is_pending());
        tokio::time::sleep_until(start + ms(50)).await;
        assert!(
            poll_once(&mut timer).await.is_ready(),
            "the latest deadline set rules"
        );

        let mut timer = ConnTimer::new(start + ms(200));
        timer.set(start + ms(60));
        tokio::time::sleep_until(start + ms(60)).await;
        assert!(
            poll_once(&mut timer).await.is_ready(),
            "an earlier deadline is armed at once"
        );
    }

    /// Parses `raw` as one complete response head, its fields encoded for the client if `encode`.
    fn parse(raw: &[u8], encode: bool) -> Head {
        let mut buf = BytesMut::from(raw);
        parse_head(&mut buf, &mut Vec::new(), &mut HeaderMap::new(), encode)
            .expect("a valid head")
            .expect("a complete head")
    }

    fn framing_of(head: &Head) -> Result<(Framing, bool), String> {
        framing(head, false).map_err(|e| e.to_string())
    }

    #[test]
    fn encoded_fields_keep_the_backends_spelling_and_order_without_hop_by_hop_or_length() {
        let head = parse(
            b"HTTP/1.1 200 OK\r\nServer: raw/1\r\nCONNECTION: keep-alive\r\n\
              DATE: Mon, 01 Jan 2001 00:00:00 GMT\r\nKeep-Alive: timeout=5\r\n\
              Content-Length: 2\r\nX-Mixed-Case:  a b \r\nX-Empty:\r\nproxy-connection: x\r\n\r\nok",
            true,
        );
        let encoded = head.encoded.as_ref().expect("fields encoded");
        assert_eq!(
            String::from_utf8_lossy(&encoded.lines),
            "Server: raw/1\r\nDATE: Mon, 01 Jan 2001 00:00:00 GMT\r\nX-Mixed-Case: a b\r\n\
             X-Empty: \r\n"
        );
        assert!(encoded.has_date, "the backend's Date is noted");
        assert!(head.headers.is_empty(), "nothing goes into the map");
        assert_eq!(framing_of(&head), Ok((Framing::Length(2), true)));

        // Bare LF line ends (which httparse accepts) go out as CRLF.
        let head = parse(b"HTTP/1.1 200 OK\nServer: x\nContent-Length: 0\n\n", true);
        let encoded = head.encoded.as_ref().expect("fields encoded");
        assert_eq!(encoded.lines, b"Server: x\r\n");
        assert!(!encoded.has_date);

        // Both framings: the length is left out (Transfer-Encoding decides) and the
        // connection is not reused.
        let head = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\nX-A: 1\r\n\r\n",
            true,
        );
        assert_eq!(head.encoded.as_ref().expect("encoded").lines, b"X-A: 1\r\n");
        assert_eq!(framing_of(&head), Ok((Framing::Chunked, false)));
    }

    #[test]
    fn fields_go_into_the_map_when_they_cannot_be_passed_on_as_they_are() {
        for raw in [
            // `Connection` names a field, which must go too.
            &b"HTTP/1.1 200 OK\r\nConnection: x-internal\r\nX-Internal: 1\r\nContent-Length: 0\r\n\r\n"[..],
            // No body of their own, but a Content-Length the client may need.
            b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
            // Interim answers and protocol switches.
            b"HTTP/1.1 100 Continue\r\nX-A: 1\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            // Their Retry-After may decide a retry.
            b"HTTP/1.1 503 Busy\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 429 Slow Down\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n",
        ] {
            let head = parse(raw, true);
            assert!(
                head.encoded.is_none(),
                "{} should have been put in the map",
                String::from_utf8_lossy(raw)
            );
            assert!(!head.headers.is_empty(), "{}", String::from_utf8_lossy(raw));
        }
        assert!(
            parse(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n", false)
                .encoded
                .is_none()
        );
    }

    /// Encoding changes where the fields go, never what reaches the client or how the body is
    /// framed: the encoded lines hold what the map holds minus `Content-Length`, in order, and
    /// framing (and its errors) come out the same.
    #[test]
    fn encoded_and_mapped_heads_agree_on_fields_and_framing() {
        for raw in [
            &b"HTTP/1.1 200 OK\r\nServer: s\r\nContent-Length: 3\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\nContent-Length: 3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 502 Bad\r\nX-Why: 1\r\nConnection: close\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nX-A: 1\r\n\r\n",
        ] {
            let text = String::from_utf8_lossy(raw);
            let encoded = parse(raw, true);
            let mapped = parse(raw, false);
            assert_eq!(framing_of(&encoded), framing_of(&mapped), "{text}");
            let mut expected = Vec::new();
            for (name, value) in &mapped.headers {
                if name != header::CONTENT_LENGTH {
                    expected.push(format!(
                        "{name}: {}",
                        String::from_utf8_lossy(value.as_bytes())
                    ));
                }
            }
            let lines = &encoded.encoded.as_ref().expect("encoded").lines;
            let got: Vec<String> = String::from_utf8_lossy(lines)
                .split_terminator("\r\n")
                .map(str::to_ascii_lowercase)
                .collect();
            let expected: Vec<String> = expected.iter().map(|l| l.to_ascii_lowercase()).collect();
            assert_eq!(got, expected, "{text}");
        }
    }

    #[tokio::test]
    async fn malformed_responses_are_protocol_errors() {
        for response in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 1e3\r\n\r\n",
            b"NOT HTTP AT ALL\r\n\r\n",
            b"HTTP/1.1 99 Odd\r\n\r\n",
        ] {
            let backend = Scripted::start(vec![(response, Then::KeepOpen)]).await;
            let pool = pool_for(backend.addr);
            match exchange(&pool, get("/")).await {
                Err(SendError::Failed(err)) => assert!(
                    err.is_protocol(),
                    "{}: {err}",
                    String::from_utf8_lossy(response)
                ),
                _ => panic!("{} was accepted", String::from_utf8_lossy(response)),
            }
        }
    }

    #[tokio::test]
    async fn a_bad_chunk_and_a_cut_off_body_fail_the_body() {
        let backend = Scripted::start(vec![
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
                Then::KeepOpen,
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
                Then::Close,
            ),
        ])
        .await;
        let pool = pool_for(backend.addr);
        let (response, _) = exchange(&pool, get("/")).await.ok().unwrap();
        let err = response.into_body().collect().await.unwrap_err();
        assert!(err.is_protocol(), "{err}");
        let (response, _) = exchange(&pool, get("/")).await.ok().unwrap();
        let err = response.into_body().collect().await.unwrap_err();
        assert!(!err.is_protocol(), "{err}");
        assert_eq!(pool.open_connections(), 0);
    }

    #[tokio::test]
    async fn the_request_goes_out_in_origin_form_with_its_true_length() {
        let backend = Scripted::start(vec![
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
                Then::KeepOpen,
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
                Then::KeepOpen,
            ),
        ])
        .await;
        let pool = pool_for(backend.addr);
        let post = Request::post("http://example.com/a/b?c=1")
            .header("host", "example.com")
            .header("content-length", "999")
            .header("x-custom", "v")
            .body(RequestBody::full(Bytes::from_static(b"hello")))
            .unwrap();
        exchange(&pool, post).await.ok().unwrap();
        let big = Bytes::from(vec![b'z'; COALESCE_BODY_BYTES + 1]);
        let put = Request::put("/big")
            .body(RequestBody::full(big.clone()))
            .unwrap();
        exchange(&pool, put).await.ok().unwrap();
        assert_eq!(
            backend.request(0),
            "POST /a/b?c=1 HTTP/1.1\r\nhost: example.com\r\nx-custom: v\r\ncontent-length: 5\r\n\r\nhello"
        );
        let second = backend.request(1);
        assert!(
            second.starts_with(&format!(
                "PUT /big HTTP/1.1\r\ncontent-length: {}\r\n\r\nzzz",
                big.len()
            )),
            "{second}"
        );
        assert_eq!(
            second.len(),
            second.find("\r\n\r\n").unwrap() + 4 + big.len()
        );
    }

    #[tokio::test]
    async fn a_request_on_a_reset_connection_comes_back_unsent() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = pool_for(listener.local_addr().unwrap());
        let accept = tokio::spawn(async move { listener.accept().await.unwrap().0 });
        let req = Request::post("/once")
            .header("x-kept", "yes")
            .body(RequestBody::full(Bytes::from_static(b"payload")))
            .unwrap();
        let conn = pool.checkout(&req, || true).await.unwrap();
        // The backend resets the connection (not a clean close): the first write fails outright.
        let server_side = accept.await.unwrap();
        server_side.set_zero_linger().unwrap();
        drop(server_side);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (mut head, body) = req.into_parts();
        let mut body = Some(body);
        // Not kept (`keep_head` false): a request that never left is whole all the same.
        match conn
            .send_parts(&pool, &mut head, &mut None, &mut body, false, false, None)
            .await
        {
            Err(SendError::NotSent(err)) => {
                assert_eq!(head.uri, "/once");
                assert_eq!(head.headers["x-kept"], "yes");
                let body = body.expect("the body stays with the caller");
                assert_eq!(body.in_memory().unwrap(), "payload");
                assert!(!err.is_protocol(), "{err}");
            }
            Err(SendError::Failed(err)) => panic!("reported as possibly sent: {err}"),
            Err(SendError::TimedOut) => panic!("timed out without a deadline"),
            Ok(_) => panic!("a reset connection answered"),
        }
    }

    /// Sends a bodiless GET for `path` on a connection from `pool` with `deadline`.
    async fn get_within(
        pool: &Arc<EndpointPool>,
        path: &str,
        deadline: Instant,
    ) -> (bool, Result<String, &'static str>) {
        let req = Request::get(path)
            .body(RequestBody::full(Bytes::new()))
            .unwrap();
        let conn = pool.checkout(&req, || true).await.unwrap();
        let reused = conn.reused;
        let (mut head, body) = req.into_parts();
        let sent = conn
            .send_parts(
                pool,
                &mut head,
                &mut None,
                &mut Some(body),
                false,
                false,
                Some(deadline),
            )
            .await;
        let text = match sent {
            Ok((response, _)) => Ok(text(response).await),
            Err(SendError::TimedOut) => Err("timed out"),
            Err(SendError::NotSent(_) | SendError::Failed(_)) => Err("failed"),
        };
        (reused, text)
    }

    #[tokio::test]
    async fn the_connections_timer_cuts_a_late_answer_and_serves_the_next_requests() {
        // `/slow` is answered after 2 s, anything else at once, on connections kept open.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = pool_for(listener.local_addr().unwrap());
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let mut chunk = [0u8; 1024];
                        let Ok(n) = socket.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            continue;
                        };
                        let slow = buf.starts_with(b"GET /slow ");
                        buf.drain(..end + 4);
                        if slow {
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        }
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if socket.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let far = |secs| Instant::now() + Duration::from_secs(secs);
        assert_eq!(
            get_within(&pool, "/a", far(5)).await,
            (false, Ok("ok".into()))
        );
        // The same connection, its timer moved later...
        assert_eq!(
            get_within(&pool, "/b", far(10)).await,
            (true, Ok("ok".into()))
        );
        // ...and earlier: a late answer is cut at the deadline, not at the earlier ones.
        let started = std::time::Instant::now();
        let cut = get_within(&pool, "/slow", Instant::now() + Duration::from_millis(150)).await;
        let waited = started.elapsed();
        assert_eq!(cut, (true, Err("timed out")));
        assert!(
            waited >= Duration::from_millis(140) && waited < Duration::from_millis(1500),
            "cut after {waited:?}"
        );
        // The cut connection is gone; a new one (with a timer of its own) carries on.
        assert_eq!(
            get_within(&pool, "/c", far(5)).await,
            (false, Ok("ok".into()))
        );
        assert_eq!(
            get_within(&pool, "/d", far(5)).await,
            (true, Ok("ok".into()))
        );
    }
}
