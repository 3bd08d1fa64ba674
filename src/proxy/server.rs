//! HTTP/1.1 from clients on plain TCP for the common request: a complete head, no body or a
//! small one that arrived with it, no upgrade. Everything else is handed to hyper's server
//! connection, which takes over the connection (bytes already read included) for the rest of
//! its life.
//!
//! Why not hyper for everything: hyper's server connection allocates an 8 KiB read buffer and an
//! 8 KiB write buffer up front and keeps both for the connection's whole life, so 10,000 idle
//! keep-alive connections cost ~230 MiB; here an idle connection holds no buffer at all, only
//! its socket and task. Serving the request in the connection's own task, with the head parsed
//! in place and the response written with one `write`, also costs fewer instructions than
//! hyper's dispatcher (see `bench/README.md`).
//!
//! What is handed over, and why it is safe to do so at any request boundary: a head that is not
//! complete in the first read (slow clients get hyper's handling and `ConnIo`'s 408), any
//! head `httparse` rejects or that exceeds the header limit (hyper answers 400/431), HTTP/1.0,
//! `CONNECT`, asterisk-form targets, `Transfer-Encoding`, repeated or invalid `Content-Length`,
//! a body larger than what may be kept for retries or still missing after `requestHeader`,
//! `Expect`, and `Upgrade`. Nothing has been consumed from the byte stream when that happens.

use std::cell::RefCell;
use std::future::{Future, poll_fn};
use std::io;
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::LocalKey;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use smallvec::SmallVec;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::body::ClientBody;
use super::h1::{EncodedFields, take_front};
use super::headers::{list_has_token, parse_content_length};
use super::recv::{TryRecv, poll_recv_buf, try_recv_into};
use super::send::send_all;
use crate::ascii::{eq_lower, push_decimal, push_hex};

/// Most header fields accepted in a request head (hyper's default too).
const MAX_HEADERS: usize = 100;
/// Longest request target served here; hyper answers 414 above its own limit.
const MAX_TARGET_BYTES: usize = 65_534;
/// Header fields the proxy adds to a forwarded request (`X-Forwarded-For/-Proto/-Host/-Port`,
/// `Forwarded`, `Via`, and `Host` for clients that sent none).
const ADDED_REQUEST_HEADERS: usize = 7;
/// First read for a request: nginx's `client_header_buffer_size`, and the largest size the
/// allocator serves from its fast path.
const FIRST_READ: usize = 1024;
/// Later reads while the socket keeps filling the buffer: hyper's initial buffer size.
const READ_CHUNK: usize = 8 * 1024;
/// Most bytes read in one go before the request at the front is looked at.
const MAX_FILL: usize = 64 * 1024;
/// Response bytes gathered before a write (head plus the body frames at hand).
const WRITE_GATHER: usize = 64 * 1024;
/// Body frames at least this large are written from their own buffer rather than copied.
const COPY_LIMIT: usize = 16 * 1024;

/// Response buffers kept per thread for reuse; the pool holds at most this many...
const MAX_SPARE_BUFFERS: usize = 64;
/// ...each at most this large (a buffer grown by a big response goes back to the allocator).
const MAX_SPARE_CAPACITY: usize = 16 * 1024;

thread_local! {
    /// Response buffers of connections gone idle, lent to the next response written on this
    /// thread: an idle connection holds no buffer, and a busy one does not allocate one per
    /// response.
    static SPARE_BUFFERS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// One item from this thread's `spares`, if any (none while the thread is being torn down).
fn take_spare<T: 'static>(spares: &'static LocalKey<RefCell<Vec<T>>>) -> Option<T> {
    spares
        .try_with(|spares| spares.borrow_mut().pop())
        .ok()
        .flatten()
}

/// Keeps `item` in this thread's `spares` if they hold fewer than `limit` (else it is freed).
fn keep_spare<T: 'static>(spares: &'static LocalKey<RefCell<Vec<T>>>, limit: usize, item: T) {
    let _ = spares.try_with(|spares| {
        let mut spares = spares.borrow_mut();
        if spares.len() < limit {
            spares.push(item);
        }
    });
}

/// A response buffer from this thread's spares, or a new (unallocated) one.
pub(super) fn borrow_buffer() -> Vec<u8> {
    take_spare(&SPARE_BUFFERS).unwrap_or_default()
}

/// Gives a response buffer back to this thread's spares (or frees it when they are full).
pub(super) fn return_buffer(mut buffer: Vec<u8>) {
    if buffer.capacity() == 0 || buffer.capacity() > MAX_SPARE_CAPACITY {
        return;
    }
    buffer.clear();
    keep_spare(&SPARE_BUFFERS, MAX_SPARE_BUFFERS, buffer);
}

/// Request read buffers kept per thread for reuse, at most this many...
const MAX_SPARE_READ_BUFFERS: usize = 64;
/// ...each at most this large.
const MAX_SPARE_READ_CAPACITY: usize = 16 * 1024;

thread_local! {
    /// Read buffers of connections gone idle, lent to the next connection on this thread that
    /// has bytes to read: an idle connection holds no buffer, and a busy one does not allocate
    /// and free one per request.
    static SPARE_READ_BUFFERS: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// Gives a connection's emptied read buffer back to this thread's spares (or frees it when
/// they are full or it grew large).
fn return_read_buffer(mut buffer: BytesMut) {
    if buffer.capacity() == 0 || buffer.capacity() > MAX_SPARE_READ_CAPACITY {
        return;
    }
    buffer.clear();
    keep_spare(&SPARE_READ_BUFFERS, MAX_SPARE_READ_BUFFERS, buffer);
}

/// Header maps kept per thread for reuse, at most this many...
const MAX_SPARE_MAPS: usize = 64;
/// ...each with room for at most this many fields (a map grown by a large head is freed).
const MAX_SPARE_MAP_FIELDS: usize = 64;

thread_local! {
    /// Header maps of responses already written, cleared, lent to the next request head parsed
    /// on this thread. With the direct client the request's map carries the response's fields
    /// back, so a request usually allocates no map at all; idle connections hold none.
    static SPARE_MAPS: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
}

/// An empty header map with room for `fields`: a spare one from this thread, or a new one.
fn borrow_header_map(fields: usize) -> HeaderMap {
    match take_spare(&SPARE_MAPS) {
        Some(mut map) => {
            map.reserve(fields);
            map
        }
        None => HeaderMap::with_capacity(fields),
    }
}

/// Clears `map` and keeps it for a later request on this thread (or frees it when the spares
/// are full or it grew large).
fn return_header_map(mut map: HeaderMap) {
    if map.capacity() == 0 || map.capacity() > MAX_SPARE_MAP_FIELDS {
        return;
    }
    map.clear();
    keep_spare(&SPARE_MAPS, MAX_SPARE_MAPS, map);
}

/// What a connection may do on this path.
#[derive(Clone, Copy, Debug)]
pub struct DirectLimits {
    /// Largest request head (`limits.maxRequestHeaderBytes`).
    pub max_head_bytes: usize,
    /// Largest body read with its head and handed over whole: what may be kept for retries and
    /// is within the body limit.
    pub max_buffered_body: u64,
    /// How long a keep-alive connection may sit with no request (`timeouts.idle`).
    pub idle: Duration,
    /// How long the rest of a small body may take to follow its head
    /// (`timeouts.requestHeader`); then hyper takes over, still waiting.
    pub head_timeout: Duration,
}

/// How a directly served connection ended.
pub enum Ended {
    /// Closed (by either side, an idle timeout, a drain or an error).
    Closed,
    /// A request this path does not serve arrived: hyper takes over from here, reading
    /// `buffered` (what was already read, untouched) before the rest of `stream`.
    Handover {
        /// The client connection.
        stream: TcpStream,
        /// Bytes already read from it.
        buffered: Bytes,
    },
}

/// A response body that may carry its head's end-to-end fields already encoded, for the
/// direct server to write as they are (see [`EncodedFields`]).
pub trait CarriesEncodedFields {
    /// The encoded fields, if the body carries them; they belong in the head before any field
    /// of the response's own map.
    fn take_encoded_fields(&mut self) -> Option<EncodedFields> {
        None
    }

    /// When the response head arrived from the backend, if it came from one: a response
    /// written out without waiting leaves the connection idle from about then, so the idle
    /// deadline needs no clock read of its own.
    fn head_received(&self) -> Option<Instant> {
        None
    }
}

/// Serves HTTP/1.1 requests on `stream` through `service` until the connection ends or a request
/// needs hyper. `stop` drains: an idle connection closes at once, a busy one after its response
/// (which then says `Connection: close`).
pub async fn serve<S, F, B>(
    mut stream: TcpStream,
    limits: DirectLimits,
    stop: &CancellationToken,
    mut service: S,
) -> Ended
where
    S: FnMut(Request<ClientBody>) -> F,
    F: Future<Output = Response<B>>,
    B: Body<Data = Bytes> + CarriesEncodedFields + Unpin,
{
    let mut read = BytesMut::new();
    let mut write = Vec::new();
    let mut stopped = pin!(stop.cancelled());
    // One timer for the connection's life: going idle moves the deadline, and the timer is
    // re-armed only when it fires early, so a request cycle does not touch the timer wheel.
    let mut deadline = Instant::now() + limits.idle;
    // Out of line: inline, its 112 bytes took tokio's task cell for the connection past a
    // 3 KiB allocator size class (512 bytes more per connection, idle ones included).
    let mut timer = Box::pin(tokio::time::sleep_until(deadline));
    // The timer and the drain signal are polled with this waker, and again only after it was
    // woken: an idle wait costs one readiness poll and two atomic operations, not a lock in
    // the cancellation token and a timer poll per request.
    let signal = Arc::new(Signal {
        fired: AtomicBool::new(true),
        task: AtomicWaker::new(),
    });
    let signal_waker = Waker::from(Arc::clone(&signal));
    // The task waker `signal.task` holds, if any: registering the same one again every idle
    // wait would cost two atomic operations for nothing. A wake takes it out (and sets `fired`).
    let mut registered: Option<Waker> = None;
    // Whether this task's waker is registered for the client socket's reads, with no event
    // since (see `poll_fill_armed`): the watch over a request registers it, and the idle wait
    // after the response then needs no registration of its own.
    let mut armed = false;
    loop {
        if read.is_empty() {
            // Idle: hold no buffers, only the socket.
            return_read_buffer(std::mem::take(&mut read));
            return_buffer(std::mem::take(&mut write));
            let woke = poll_fn(|cx| {
                match poll_fill_armed(&mut stream, &mut read, cx, &mut armed) {
                    Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(IdleWake::Close),
                    Poll::Ready(Ok(_)) => return Poll::Ready(IdleWake::Readable),
                    Poll::Pending => {}
                }
                // A plain load first: the swap is a locked instruction, and rarely needed.
                let fired = signal.fired.load(Ordering::Acquire)
                    && signal.fired.swap(false, Ordering::AcqRel);
                if fired {
                    // The wake that set `fired` took the registered waker.
                    registered = None;
                }
                if !registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    signal.task.register(cx.waker());
                    registered = Some(cx.waker().clone());
                }
                // Polled after registering, so a wake from either is never missed.
                if fired {
                    let mut signal_cx = Context::from_waker(&signal_waker);
                    if stopped.as_mut().poll(&mut signal_cx).is_ready() {
                        return Poll::Ready(IdleWake::Close);
                    }
                    while timer.as_mut().poll(&mut signal_cx).is_ready() {
                        // Fired: a real expiry, or the armed instant of a deadline since moved.
                        if Instant::now() >= deadline {
                            return Poll::Ready(IdleWake::Close);
                        }
                        timer.as_mut().reset(deadline);
                    }
                }
                Poll::Pending
            })
            .await;
            if woke == IdleWake::Close {
                return Ended::Closed;
            }
        }
        let (request, client_close) = match parse_request(&mut read, &limits) {
            Some(Parsed::Request { request, close }) => (request, close),
            Some(Parsed::Invalid) => {
                let _ = stream.write_all(BAD_REQUEST).await;
                let _ = stream.shutdown().await;
                return Ended::Closed;
            }
            // Clients often send the body with a write of its own; it usually follows within
            // microseconds. Wait for it as long as a head may take, then let hyper carry on.
            Some(Parsed::NeedBody { total }) => {
                // These reads may take the registration the watch left.
                armed = false;
                let rest = tokio::time::timeout(limits.head_timeout, async {
                    while read.len() < total {
                        match poll_fn(|cx| poll_fill(&mut stream, &mut read, cx)).await {
                            Ok(0) | Err(_) => return false,
                            Ok(_) => {}
                        }
                    }
                    true
                })
                .await;
                match rest {
                    Ok(true) => continue,
                    Ok(false) => return Ended::Closed,
                    Err(_) => {
                        return Ended::Handover {
                            stream,
                            buffered: read.freeze(),
                        };
                    }
                }
            }
            None => {
                return Ended::Handover {
                    stream,
                    buffered: read.freeze(),
                };
            }
        };
        let is_head = request.method() == Method::HEAD;
        let mut response = pin!(service(request));
        // hyper's server drops the request when the client goes away mid-request; so does this
        // (a cancelled request releases its upstream connection and its slot). Bytes that
        // arrive instead (a pipelined request) are kept, and watching stops.
        let mut watching = read.is_empty();
        let response = poll_fn(|cx| {
            if let Poll::Ready(response) = response.as_mut().poll(cx) {
                return Poll::Ready(Some(response));
            }
            if watching {
                match poll_fill_armed(&mut stream, &mut read, cx, &mut armed) {
                    Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(None),
                    Poll::Ready(Ok(_)) => watching = false,
                    Poll::Pending => {}
                }
            }
            Poll::Pending
        })
        .await;
        let Some(mut response) = response else {
            return Ended::Closed;
        };
        // A drain that began while the request was served: this response is the last.
        let draining = signal.fired.load(Ordering::Acquire)
            && stopped
                .as_mut()
                .poll(&mut Context::from_waker(&signal_waker))
                .is_ready();
        let close = client_close || draining;
        if write.capacity() == 0 {
            write = borrow_buffer();
        }
        let written = write_response(&mut stream, &mut write, &mut response, is_head, close).await;
        // The request counted as in flight until its response had gone out.
        drop(response);
        let idle_since = match written {
            Ok(Written {
                keep_alive: true,
                idle_since,
            }) if !close => idle_since,
            Ok(_) => {
                let _ = stream.shutdown().await;
                return Ended::Closed;
            }
            Err(_) => return Ended::Closed,
        };
        deadline = idle_since.unwrap_or_else(Instant::now) + limits.idle;
    }
}

/// Reads what the client sent into `read` once the socket is readable; no buffer is taken
/// (from this thread's spares, or allocated) while it is not. The first read asks for
/// [`FIRST_READ`] bytes (most heads fit, and the allocator serves that size from its fast
/// path); a read that fills that is followed by larger ones until the socket has nothing more,
/// up to [`MAX_FILL`]. A short read clears the socket's readiness (see `recv.rs`), which saves
/// a read that would only say "nothing more".
fn poll_fill(
    stream: &mut TcpStream,
    read: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    std::task::ready!(stream.poll_read_ready(cx))?;
    lend_read_buffer(read);
    let mut total = 0;
    loop {
        let want = if read.is_empty() {
            FIRST_READ
        } else {
            READ_CHUNK
        };
        match poll_recv_buf(stream, cx, read, want) {
            Poll::Ready(Ok(n)) => {
                total += n;
                // A short read (or end of stream) drained the socket for now.
                if n == 0 || n < want || read.len() >= MAX_FILL {
                    return Poll::Ready(Ok(total));
                }
            }
            // What was read is served first; the error shows again on the next read.
            Poll::Ready(Err(_)) if total > 0 => return Poll::Ready(Ok(total)),
            Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
            Poll::Pending if total > 0 => return Poll::Ready(Ok(total)),
            Poll::Pending => {
                if read.is_empty() {
                    // The readiness was stale: wait holding nothing.
                    return_read_buffer(std::mem::take(read));
                }
                return Poll::Pending;
            }
        }
    }
}

/// Gives an idle connection (`read` without capacity) one of this thread's spare read
/// buffers, if there is one; once bytes are there to read, not before.
fn lend_read_buffer(read: &mut BytesMut) {
    if read.capacity() == 0 {
        if let Some(spare) = take_spare(&SPARE_READ_BUFFERS) {
            *read = spare;
        }
    }
}

/// [`poll_fill`] for a task that may have registered its waker for the socket's reads already:
/// `armed` says it has, and that no readiness event came since (a poll that returned `Pending`
/// registered it; tokio sets the readiness bits before it wakes, and only a read that found
/// nothing clears them). While armed, the socket is looked at through those bits alone: no
/// readiness lock is taken and nothing is registered again, and with nothing to read the
/// registration in place is what will wake the task.
fn poll_fill_armed(
    stream: &mut TcpStream,
    read: &mut BytesMut,
    cx: &mut Context<'_>,
    armed: &mut bool,
) -> Poll<io::Result<usize>> {
    if *armed {
        let want = if read.is_empty() {
            FIRST_READ
        } else {
            READ_CHUNK
        };
        let got = try_recv_into(stream, want, |bytes| {
            lend_read_buffer(read);
            read.reserve(want);
            read.extend_from_slice(bytes);
        });
        match got {
            TryRecv::NotReadable => return Poll::Pending,
            TryRecv::Read(n) if n < want => {
                *armed = false;
                return Poll::Ready(Ok(n));
            }
            TryRecv::Read(n) => {
                // Filled what was asked: read on as `poll_fill` would. What was read is served
                // first; an error shows again on the next read.
                return match poll_fill(stream, read, cx) {
                    Poll::Ready(Ok(more)) => {
                        *armed = false;
                        Poll::Ready(Ok(n + more))
                    }
                    Poll::Ready(Err(_)) => {
                        *armed = false;
                        Poll::Ready(Ok(n))
                    }
                    Poll::Pending => Poll::Ready(Ok(n)),
                };
            }
            TryRecv::Failed(err) => {
                *armed = false;
                return Poll::Ready(Err(err));
            }
            TryRecv::Unknown => *armed = false,
        }
    }
    let polled = poll_fill(stream, read, cx);
    *armed = polled.is_pending();
    polled
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum IdleWake {
    Readable,
    Close,
}

/// Wakes the connection's task for its idle timer or a drain, and remembers that it did.
struct Signal {
    fired: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake();
    }
}

// Returned once per request and destructured at once: boxing the request would cost an
// allocation per request to save a move.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    Request {
        request: Request<ClientBody>,
        /// The client asked to close after this response.
        close: bool,
    },
    /// Consumed from the stream but not representable (target or field the `http` types
    /// refuse): answered 400 and the connection closed.
    Invalid,
    /// The head is complete and its body small enough, but not all of it has arrived: `total`
    /// bytes (head and body) are needed. Nothing was consumed.
    NeedBody { total: usize },
}

thread_local! {
    /// The target most requests name: its clone is a few copies.
    static ROOT_TARGET: Uri = Uri::from_static("/");
}

/// hyper's answer to a head it cannot parse.
const BAD_REQUEST: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// Takes one request (head and body) off the front of `read`, or `None` — leaving `read`
/// untouched — when it is not one this path serves.
fn parse_request(read: &mut BytesMut, limits: &DirectLimits) -> Option<Parsed> {
    // Offsets into `read`: the fields are copied out once the whole request is known to be
    // served here (until then `read` must stay untouched). Uninitialised until pushed: a
    // zeroed array of 100 was 200 stores a request.
    let mut fields: SmallVec<[[usize; 4]; MAX_HEADERS]> = SmallVec::new();
    let mut content_length = None;
    let mut close = false;
    let (len, method, target) = {
        // Uninitialised slots: zeroing 100 of them per request shows up in profiles.
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_request_with_uninit_headers(
            &mut request,
            read,
            &mut slots,
        );
        let Ok(httparse::Status::Complete(len)) = parsed else {
            return None;
        };
        if len > limits.max_head_bytes || request.version != Some(1) {
            return None;
        }
        let method = Method::from_bytes(request.method?.as_bytes()).ok()?;
        let path = request.path?;
        if method == Method::CONNECT || path == "*" || path.len() > MAX_TARGET_BYTES {
            return None;
        }
        let base = read.as_ptr() as usize;
        for h in request.headers.iter() {
            let name = h.name.as_bytes();
            match name.len() {
                // Content-Length: one valid value (hyper merges equal repeats, but the proxy
                // answers those 400 through `ConnIo`'s head inspection on hyper's path).
                14 if eq_lower(name, b"content-length") => {
                    if content_length.is_some() {
                        return None;
                    }
                    content_length = Some(parse_content_length(h.value)?);
                }
                17 if eq_lower(name, b"transfer-encoding") => return None,
                6 if eq_lower(name, b"expect") => return None,
                7 if eq_lower(name, b"upgrade") => return None,
                10 if eq_lower(name, b"connection") => {
                    if list_has_token(h.value, b"upgrade") {
                        return None;
                    }
                    close |= list_has_token(h.value, b"close");
                }
                _ => {}
            }
            let name_at = h.name.as_ptr() as usize - base;
            let value_at = h.value.as_ptr() as usize - base;
            fields.push([
                name_at,
                name_at + h.name.len(),
                value_at,
                value_at + h.value.len(),
            ]);
        }
        let target_at = path.as_ptr() as usize - base;
        (len, method, target_at..target_at + path.len())
    };
    let body_len = content_length.unwrap_or(0);
    if body_len > limits.max_buffered_body {
        return None;
    }
    let total = usize::try_from(body_len).ok()?.checked_add(len)?;
    if read.len() < total {
        return Some(Parsed::NeedBody { total });
    }
    // From here on the request is consumed: what fails now is answered 400, as hyper would.
    // Target and field values are copied out, not shared: a shared slice of `read` would turn
    // it into a reference-counted buffer, and every slice and every drop would then be an
    // atomic operation; a small copy is cheaper, and `read` stays this connection's own.
    let head = &read[..len];
    let target = &head[target];
    let uri = if target == b"/" {
        // Cloned, not parsed again: `from_static` runs the parser on every call.
        ROOT_TARGET.with(Uri::clone)
    } else {
        match Uri::try_from(target) {
            Ok(uri) => uri,
            Err(_) => {
                read.advance(total);
                return Some(Parsed::Invalid);
            }
        }
    };
    // Room for the forwarding headers the proxy adds, so the map is not grown per request.
    let mut headers = borrow_header_map(fields.len() + ADDED_REQUEST_HEADERS);
    for &[name_start, name_end, value_start, value_end] in &fields {
        // httparse has checked names are tokens and values hold no control bytes, so these
        // conversions agree with it; a disagreement is still answered, never unwrapped.
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&head[name_start..name_end]),
            HeaderValue::from_bytes(&head[value_start..value_end]),
        ) else {
            read.advance(total);
            return Some(Parsed::Invalid);
        };
        headers.append(name, value);
    }
    // A large body is shared rather than copied; the head is skipped first, so the rest of
    // `read` is not shared with it.
    read.advance(len);
    let body_bytes = total - len;
    let body = take_front(read, body_bytes, body_bytes < COPY_LIMIT);
    let mut request = Request::new(ClientBody::Buffered(body));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Some(Parsed::Request { request, close })
}

/// How a response body is delimited on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// No body may follow (HEAD, 1xx, 204, 304).
    None,
    Length(u64),
    Chunked,
}

/// How a response went out.
struct Written {
    /// The connection may carry another request.
    keep_alive: bool,
    /// When the connection became idle, if that is known without reading the clock: the
    /// instant the backend's head arrived, for a response written without waiting for
    /// anything (its body at hand, the socket taking every write at once).
    idle_since: Option<Instant>,
}

/// Writes `response` to the client.
///
/// The response is only borrowed, and dropped by the caller once written (with it the guards
/// that count the request as in flight): moving a response of a few hundred bytes into this
/// future and apart again costs a copy each time.
async fn write_response<B>(
    stream: &mut TcpStream,
    out: &mut Vec<u8>,
    response: &mut Response<B>,
    is_head: bool,
    close: bool,
) -> io::Result<Written>
where
    B: Body<Data = Bytes> + CarriesEncodedFields + Unpin,
{
    let status = response.status();
    let headers = std::mem::take(response.headers_mut());
    let body = response.body_mut();
    let encoded = body.take_encoded_fields();
    let received = body.head_received();
    let mut waited = false;
    let bodiless = is_head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if bodiless {
        Framing::None
    } else if let Some(n) = body.size_hint().exact() {
        Framing::Length(n)
    } else if let Some(n) = declared_length(&headers) {
        Framing::Length(n)
    } else {
        Framing::Chunked
    };
    out.clear();
    // Enough for the usual head, so it is not grown field by field.
    out.reserve(256 + 64 * headers.len() + encoded.as_ref().map_or(0, |e| e.lines.len()));
    let close = encode_head(out, status, encoded.as_ref(), &headers, framing, close);
    if let Some(encoded) = encoded {
        encoded.recycle();
    }
    // Written out: the map (and the upstream head its values point into) is done with.
    return_header_map(headers);
    let mut body = Pin::new(body);
    let expected = match framing {
        Framing::None => {
            waited |= send_all(stream, out).await?;
            // The body is left unread: for these responses there is none to send.
            return Ok(Written {
                keep_alive: !close,
                idle_since: received.filter(|_| !waited),
            });
        }
        Framing::Length(n) => Some(n),
        Framing::Chunked => None,
    };
    let mut sent = 0u64;
    while !body.is_end_stream() {
        // Frames already at hand go out with the head (or the previous frame) in one write;
        // only a frame that must be waited for flushes what is gathered first.
        let frame = match poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                waited = true;
                if !out.is_empty() {
                    send_all(stream, out).await?;
                    out.clear();
                }
                poll_fn(|cx| body.as_mut().poll_frame(cx)).await
            }
        };
        let Some(frame) = frame else { break };
        let Ok(frame) = frame else {
            // A broken upstream body cannot be finished honestly: cut the connection so the
            // client sees a truncated message, as hyper does.
            return Err(io::Error::other("response body failed"));
        };
        let Ok(data) = frame.into_data() else {
            // Trailers: the proxy does not forward `Trailer`, so neither are they sent.
            continue;
        };
        if data.is_empty() {
            continue;
        }
        sent += data.len() as u64;
        if let Some(n) = expected {
            if sent > n {
                return Err(io::Error::other("response body longer than its length"));
            }
        } else {
            push_hex(out, data.len());
            out.extend_from_slice(b"\r\n");
        }
        if data.len() >= COPY_LIMIT {
            if !out.is_empty() {
                waited |= send_all(stream, out).await?;
                out.clear();
            }
            waited |= send_all(stream, &data).await?;
        } else {
            out.extend_from_slice(&data);
        }
        if expected.is_none() {
            out.extend_from_slice(b"\r\n");
        }
        if out.len() >= WRITE_GATHER {
            waited |= send_all(stream, out).await?;
            out.clear();
        }
    }
    match expected {
        Some(n) if sent < n => {
            if !out.is_empty() {
                send_all(stream, out).await?;
            }
            return Err(io::Error::other("response body shorter than its length"));
        }
        Some(_) => {}
        None => out.extend_from_slice(b"0\r\n\r\n"),
    }
    if !out.is_empty() {
        waited |= send_all(stream, out).await?;
        out.clear();
    }
    Ok(Written {
        keep_alive: !close,
        idle_since: received.filter(|_| !waited),
    })
}

/// The single valid `Content-Length` of a response head, if it has one.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    let first = parse_content_length(values.next()?.as_bytes())?;
    values
        .all(|v| parse_content_length(v.as_bytes()) == Some(first))
        .then_some(first)
}

/// Writes the status line and header section, `encoded` fields (written as they are: they
/// carry no framing or `Connection` field) before those of `headers`; returns whether the
/// connection closes after this response (asked by `close`, or by a `Connection: close` the
/// response carries).
fn encode_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    encoded: Option<&EncodedFields>,
    headers: &HeaderMap,
    framing: Framing,
    mut close: bool,
) -> bool {
    if status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let mut has_date = false;
    if let Some(encoded) = encoded {
        out.extend_from_slice(&encoded.lines);
        has_date = encoded.has_date;
    }
    let mut says_close = false;
    for (name, value) in headers {
        // Framing is this connection's own; a HEAD response keeps the length a GET would have.
        if *name == header::TRANSFER_ENCODING
            || (*name == header::CONTENT_LENGTH
                && (framing != Framing::None || status_forbids_length(status)))
        {
            continue;
        }
        if *name == header::DATE {
            has_date = true;
        } else if *name == header::CONNECTION && list_has_token(value.as_bytes(), b"close") {
            says_close = true;
            close = true;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::None => {}
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    if close && !says_close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if !has_date {
        out.extend_from_slice(b"date: ");
        push_date(out);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    close
}

fn status_forbids_length(status: StatusCode) -> bool {
    status.is_informational() || status == StatusCode::NO_CONTENT
}

/// An IMF-fixdate for the `Date` header, formatted once a second per thread.
fn push_date(out: &mut Vec<u8>) {
    thread_local! {
        static CACHED: RefCell<(u64, Vec<u8>)> = const { RefCell::new((u64::MAX, Vec::new())) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != second || cached.1.is_empty() {
            cached.1.clear();
            cached
                .1
                .extend_from_slice(httpdate::fmt_http_date(now).as_bytes());
            cached.0 = second;
        }
        out.extend_from_slice(&cached.1);
    });
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use http_body::Frame;
    use http_body_util::Full;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    use super::*;

    const LIMITS: DirectLimits = DirectLimits {
        max_head_bytes: 8 * 1024,
        max_buffered_body: 1024,
        idle: Duration::from_secs(30),
        head_timeout: Duration::from_secs(10),
    };

    /// A response body of scripted frames, of unknown length, that makes the writer wait
    /// (returns `Pending` once) before every frame after the first.
    struct Frames {
        frames: VecDeque<Result<Frame<Bytes>, io::Error>>,
        wait: bool,
    }

    impl Frames {
        fn new(frames: Vec<Result<Frame<Bytes>, io::Error>>) -> Self {
            Self {
                frames: frames.into(),
                wait: false,
            }
        }
    }

    impl CarriesEncodedFields for Frames {}
    impl CarriesEncodedFields for Full<Bytes> {}

    impl Body for Frames {
        type Data = Bytes;
        type Error = io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
            if self.wait {
                self.wait = false;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.wait = true;
            Poll::Ready(self.frames.pop_front())
        }
    }

    /// Serves one accepted connection with `service`; the client side is returned.
    async fn connect<S, F, B>(
        limits: DirectLimits,
        stop: CancellationToken,
        service: S,
    ) -> (TcpStream, JoinHandle<Ended>)
    where
        S: FnMut(Request<ClientBody>) -> F + Send + 'static,
        F: Future<Output = Response<B>> + Send,
        B: Body<Data = Bytes> + CarriesEncodedFields + Send + Unpin,
        B::Error: Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            serve(stream, limits, &stop, service).await
        });
        (TcpStream::connect(addr).await.unwrap(), server)
    }

    /// Echoes method, target and body, with an exact length.
    fn echo(req: Request<ClientBody>) -> impl Future<Output = Response<Full<Bytes>>> {
        let body = match req.body() {
            ClientBody::Buffered(data) => data.clone(),
            ClientBody::Streaming(_) => Bytes::from_static(b"streaming?"),
        };
        let text = format!(
            "{} {} {}",
            req.method(),
            req.uri(),
            String::from_utf8_lossy(&body)
        );
        async move { Response::new(Full::new(Bytes::from(text))) }
    }

    async fn read_to_end(client: &mut TcpStream) -> String {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut out))
            .await
            .expect("the server closes the connection")
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    /// Reads until `count` complete responses framed by `content-length` have arrived.
    async fn read_responses(client: &mut TcpStream, count: usize) -> Vec<String> {
        let mut buf = Vec::new();
        let mut responses = Vec::new();
        while responses.len() < count {
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut chunk))
                .await
                .expect("response in time")
                .unwrap();
            assert!(n > 0, "connection closed after {responses:?}");
            buf.extend_from_slice(&chunk[..n]);
            loop {
                let text = String::from_utf8_lossy(&buf).into_owned();
                let Some(end) = text.find("\r\n\r\n") else {
                    break;
                };
                let length: usize = text[..end]
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |v| v.parse().unwrap());
                if buf.len() < end + 4 + length {
                    break;
                }
                responses.push(text[..end + 4 + length].to_owned());
                buf.drain(..end + 4 + length);
            }
        }
        responses
    }

    #[test]
    fn spare_response_buffers_are_bounded_in_number_and_size() {
        for _ in 0..MAX_SPARE_BUFFERS + 10 {
            return_buffer(Vec::with_capacity(512));
        }
        return_buffer(Vec::with_capacity(MAX_SPARE_CAPACITY + 1));
        let kept = SPARE_BUFFERS.with_borrow(Vec::len);
        assert_eq!(kept, MAX_SPARE_BUFFERS);
        let mut buffer = borrow_buffer();
        assert!(buffer.is_empty() && buffer.capacity() >= 512);
        buffer.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        return_buffer(buffer);
        for _ in 0..MAX_SPARE_BUFFERS {
            let buffer = borrow_buffer();
            assert!(buffer.is_empty(), "a lent buffer starts empty");
            assert!(buffer.capacity() <= MAX_SPARE_CAPACITY);
        }
        assert_eq!(
            borrow_buffer().capacity(),
            0,
            "no spares left: a new, unallocated buffer"
        );
    }

    #[test]
    fn spare_read_buffers_are_bounded_in_number_and_size_and_lent_empty() {
        for _ in 0..MAX_SPARE_READ_BUFFERS + 10 {
            let mut buffer = BytesMut::with_capacity(FIRST_READ);
            buffer.extend_from_slice(b"GET / HTTP/1.1\r\n");
            return_read_buffer(buffer);
        }
        return_read_buffer(BytesMut::with_capacity(MAX_SPARE_READ_CAPACITY + 1));
        assert_eq!(
            SPARE_READ_BUFFERS.with_borrow(Vec::len),
            MAX_SPARE_READ_BUFFERS
        );
        for _ in 0..MAX_SPARE_READ_BUFFERS {
            let buffer = take_spare(&SPARE_READ_BUFFERS).unwrap();
            assert!(buffer.is_empty(), "a lent buffer starts empty");
            assert!(
                buffer.capacity() >= FIRST_READ && buffer.capacity() <= MAX_SPARE_READ_CAPACITY
            );
        }
        assert!(take_spare(&SPARE_READ_BUFFERS).is_none());
    }

    #[test]
    fn spare_header_maps_are_bounded_and_lent_empty() {
        let filled = || {
            let mut map = HeaderMap::with_capacity(8);
            map.insert(header::SERVER, HeaderValue::from_static("backend"));
            map.append(header::VIA, HeaderValue::from_static("1.1 breakwater"));
            map
        };
        for _ in 0..MAX_SPARE_MAPS + 10 {
            return_header_map(filled());
        }
        return_header_map(HeaderMap::with_capacity(MAX_SPARE_MAP_FIELDS * 4));
        assert_eq!(SPARE_MAPS.with_borrow(Vec::len), MAX_SPARE_MAPS);
        for _ in 0..MAX_SPARE_MAPS {
            let map = borrow_header_map(20);
            assert!(map.is_empty(), "a lent map starts empty: {map:?}");
            assert!(map.capacity() >= 20, "room for the fields asked for");
            assert!(map.capacity() <= MAX_SPARE_MAP_FIELDS * 2);
        }
        assert!(SPARE_MAPS.with_borrow(Vec::is_empty));
        assert!(
            borrow_header_map(4).capacity() >= 4,
            "no spares left: a new map"
        );
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order_with_their_bodies() {
        let (mut client, _server) = connect(LIMITS, CancellationToken::new(), echo).await;
        client
            .write_all(
                b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\n\r\n\
                  POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello\
                  GET /c HTTP/1.1\r\nHost: h\r\n\r\n",
            )
            .await
            .unwrap();
        let responses = read_responses(&mut client, 3).await;
        assert!(
            responses[0].starts_with("HTTP/1.1 200 OK\r\n"),
            "{responses:?}"
        );
        assert!(responses[0].contains("\r\ndate: "), "{}", responses[0]);
        assert!(
            responses[0].ends_with("\r\n\r\nGET /a?x=1 "),
            "{}",
            responses[0]
        );
        assert!(
            responses[1].contains("content-length: 13\r\n"),
            "{}",
            responses[1]
        );
        assert!(responses[1].ends_with("POST /b hello"), "{}", responses[1]);
        assert!(responses[2].ends_with("GET /c "), "{}", responses[2]);
        // Keep-alive: the connection still serves.
        client
            .write_all(b"GET /d HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        assert!(read_responses(&mut client, 1).await[0].ends_with("GET /d "));
    }

    #[tokio::test]
    async fn large_and_small_bodies_arrive_whole_with_what_follows_them() {
        // One body above the copy limit (kept as a shared part of the read buffer) and small
        // ones (copied out), pipelined, so each request's bytes must end exactly where the
        // next begins.
        let limits = DirectLimits {
            max_buffered_body: 64 * 1024,
            ..LIMITS
        };
        let (mut client, server) = connect(limits, CancellationToken::new(), echo).await;
        let large: String = (0..COPY_LIMIT + 100)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let mut wire = format!(
            "POST /large HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\n\r\n{large}",
            large.len()
        );
        wire.push_str("POST /small HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nxyz");
        wire.push_str("GET /x%20y?q=1 HTTP/1.1\r\nHost: h\r\n\r\n");
        client.write_all(wire.as_bytes()).await.unwrap();
        let responses = read_responses(&mut client, 3).await;
        assert!(
            responses[0].ends_with(&format!("POST /large {large}")),
            "{}",
            &responses[0][..200.min(responses[0].len())]
        );
        assert!(
            responses[1].ends_with("POST /small xyz"),
            "{}",
            responses[1]
        );
        assert!(
            responses[2].ends_with("GET /x%20y?q=1 "),
            "{}",
            responses[2]
        );
        assert!(!server.is_finished(), "served here, no hand-over");
    }

    #[tokio::test]
    async fn heads_larger_than_the_first_read_are_still_served_directly() {
        let (mut client, server) = connect(LIMITS, CancellationToken::new(), echo).await;
        let cookie = "c".repeat(5_000);
        client
            .write_all(
                format!(
                    "POST /big HTTP/1.1\r\nHost: h\r\nCookie: {cookie}\r\nContent-Length: 4\r\n\r\nbody"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        let responses = read_responses(&mut client, 1).await;
        assert!(responses[0].ends_with("POST /big body"), "{responses:?}");
        assert!(
            !server.is_finished(),
            "no hand-over: the connection is still served here"
        );
    }

    #[tokio::test]
    async fn bodies_of_unknown_length_are_chunked_and_bodiless_responses_send_none() {
        let (mut client, _server) = connect(LIMITS, CancellationToken::new(), |req| {
            let path = req.uri().path().to_owned();
            async move {
                let frames = match path.as_str() {
                    "/chunked" => vec![
                        Ok(Frame::data(Bytes::from_static(b"hello "))),
                        Ok(Frame::data(Bytes::new())),
                        Ok(Frame::data(Bytes::from(vec![b'x'; 20_000]))),
                        Ok(Frame::trailers(HeaderMap::new())),
                    ],
                    _ => vec![Ok(Frame::data(Bytes::from_static(b"ignored")))],
                };
                let mut response = Response::new(Frames::new(frames));
                match path.as_str() {
                    "/no-content" => *response.status_mut() = StatusCode::NO_CONTENT,
                    "/head" => {
                        response
                            .headers_mut()
                            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("7"));
                    }
                    _ => {}
                }
                response
            }
        })
        .await;
        client
            .write_all(
                b"GET /chunked HTTP/1.1\r\nHost: h\r\n\r\n\
                  GET /no-content HTTP/1.1\r\nHost: h\r\n\r\n\
                  HEAD /head HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
            )
            .await
            .unwrap();
        let text = read_to_end(&mut client).await;
        let (chunked_head, rest) = text.split_once("\r\n\r\n").expect("a head");
        assert!(
            chunked_head.contains("\r\ntransfer-encoding: chunked\r\n"),
            "{chunked_head}"
        );
        let expected_body = format!(
            "6\r\nhello \r\n4e20\r\n{}\r\n0\r\n\r\nHTTP/1.1 204",
            "x".repeat(20_000)
        );
        assert!(
            rest.starts_with(&expected_body),
            "chunks, then the last chunk, then the next response ({} bytes)",
            rest.len()
        );
        let rest = &text[text.find("HTTP/1.1 204").expect("204 follows")..];
        let (no_content, head) = rest.split_at(rest.find("HTTP/1.1 200").expect("HEAD's 200"));
        assert!(!no_content.contains("content-length"), "{no_content}");
        assert!(no_content.ends_with("\r\n\r\n"), "{no_content}");
        assert!(head.contains("content-length: 7\r\n"), "{head}");
        assert!(head.contains("connection: close\r\n"), "{head}");
        assert!(
            head.ends_with("\r\n\r\n"),
            "no body after a HEAD response: {head}"
        );
    }

    #[tokio::test]
    async fn requests_this_path_does_not_serve_are_handed_over_with_every_byte() {
        let cases: [&[u8]; 8] = [
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\npart",
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2000\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ];
        // A body still missing is waited for this long before hyper takes over.
        let limits = DirectLimits {
            head_timeout: Duration::from_millis(100),
            ..LIMITS
        };
        for bytes in cases {
            let (mut client, server) = connect(limits, CancellationToken::new(), echo).await;
            client.write_all(bytes).await.unwrap();
            let Ended::Handover {
                mut stream,
                buffered,
            } = server.await.unwrap()
            else {
                panic!("served directly: {}", String::from_utf8_lossy(bytes));
            };
            assert_eq!(
                &buffered[..],
                bytes,
                "what was read is handed over untouched"
            );
            // The rest of the stream follows what was buffered.
            client.write_all(b"more").await.unwrap();
            let mut more = [0u8; 4];
            stream.read_exact(&mut more).await.unwrap();
            assert_eq!(&more, b"more");
        }
    }

    #[tokio::test]
    async fn a_body_written_after_its_head_is_waited_for() {
        let (mut client, server) = connect(LIMITS, CancellationToken::new(), echo).await;
        client
            .write_all(b"POST /later HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        client.write_all(b"hello").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        client.write_all(b" world").await.unwrap();
        let responses = read_responses(&mut client, 1).await;
        assert!(
            responses[0].ends_with("POST /later hello world"),
            "{responses:?}"
        );
        assert!(!server.is_finished(), "served here, not handed over");
    }

    #[tokio::test]
    async fn a_request_served_directly_can_be_followed_by_one_handed_over() {
        let (mut client, server) = connect(LIMITS, CancellationToken::new(), echo).await;
        client
            .write_all(b"GET /first HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        assert!(read_responses(&mut client, 1).await[0].ends_with("GET /first "));
        let chunked = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        client.write_all(chunked).await.unwrap();
        let Ended::Handover { buffered, .. } = server.await.unwrap() else {
            panic!("the chunked request must be handed over");
        };
        assert_eq!(&buffered[..], &chunked[..]);
    }

    #[tokio::test]
    async fn a_client_that_leaves_mid_request_cancels_it() {
        let dropped = Arc::new(AtomicBool::new(false));
        struct SetOnDrop(Arc<AtomicBool>);
        impl Drop for SetOnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let flag = Arc::clone(&dropped);
        let (mut client, server) = connect(LIMITS, CancellationToken::new(), move |_req| {
            let guard = SetOnDrop(Arc::clone(&flag));
            async move {
                tokio::time::sleep(Duration::from_secs(30)).await;
                drop(guard);
                Response::new(Full::new(Bytes::new()))
            }
        })
        .await;
        client
            .write_all(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(client);
        let ended = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server notices")
            .unwrap();
        assert!(matches!(ended, Ended::Closed));
        assert!(dropped.load(Ordering::SeqCst), "the request was dropped");
    }

    #[tokio::test]
    async fn after_a_watched_request_the_idle_wait_sees_the_next_request_and_the_close() {
        // A service that answers later: the request is watched (the client socket's read
        // interest is registered) and the idle wait after it relies on that registration.
        let slow = |req: Request<ClientBody>| {
            let answer = echo(req);
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                answer.await
            }
        };
        let (mut client, server) = connect(LIMITS, CancellationToken::new(), slow).await;
        for path in ["/first", "/second", "/third"] {
            client
                .write_all(format!("GET {path} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let response = read_responses(&mut client, 1).await.remove(0);
            assert!(response.ends_with(&format!("GET {path} ")), "{response}");
            // Idle for a while: the next request arrives while the server waits.
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        drop(client);
        let ended = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server sees the idle client leave")
            .unwrap();
        assert!(matches!(ended, Ended::Closed));
    }

    #[tokio::test]
    async fn idle_connections_close_after_the_idle_timeout_and_on_drain() {
        let limits = DirectLimits {
            idle: Duration::from_millis(200),
            ..LIMITS
        };
        let (mut client, _server) = connect(limits, CancellationToken::new(), echo).await;
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        let started = Instant::now();
        let text = read_to_end(&mut client).await;
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        assert!(started.elapsed() >= Duration::from_millis(150));

        let stop = CancellationToken::new();
        let (mut client, server) = connect(LIMITS, stop.clone(), echo).await;
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        read_responses(&mut client, 1).await;
        stop.cancel();
        assert!(matches!(server.await.unwrap(), Ended::Closed));
        assert_eq!(read_to_end(&mut client).await, "");
    }

    /// A body that says when its (pretend) backend head arrived.
    struct Stamped<B> {
        inner: B,
        received: Instant,
    }

    impl<B: Unpin> CarriesEncodedFields for Stamped<B> {
        fn head_received(&self) -> Option<Instant> {
            Some(self.received)
        }
    }

    impl<B: Body<Data = Bytes> + Unpin> Body for Stamped<B> {
        type Data = Bytes;
        type Error = B::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
            Pin::new(&mut self.inner).poll_frame(cx)
        }

        fn is_end_stream(&self) -> bool {
            self.inner.is_end_stream()
        }

        fn size_hint(&self) -> http_body::SizeHint {
            self.inner.size_hint()
        }
    }

    #[tokio::test]
    async fn the_idle_time_counts_from_the_heads_arrival_only_when_nothing_waited() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut stream, _) = listener.accept().await.unwrap();
        let stamp = Instant::now();
        let mut out = Vec::new();
        // Written at once: idle since the head arrived.
        let mut at_once = Response::new(Stamped {
            inner: Full::new(Bytes::from_static(b"at once")),
            received: stamp,
        });
        let written = write_response(&mut stream, &mut out, &mut at_once, false, false)
            .await
            .unwrap();
        assert!(written.keep_alive);
        assert_eq!(written.idle_since, Some(stamp));
        // A body that had to be waited for: idle from when it was written, which the server
        // reads from the clock.
        let mut waited = Response::new(Stamped {
            inner: Frames::new(vec![
                Ok(Frame::data(Bytes::from_static(b"after "))),
                Ok(Frame::data(Bytes::from_static(b"waiting"))),
            ]),
            received: stamp,
        });
        let written = write_response(&mut stream, &mut out, &mut waited, false, true)
            .await
            .unwrap();
        assert!(!written.keep_alive, "asked to close");
        assert_eq!(written.idle_since, None);
        drop(stream);
        let text = read_to_end(&mut client).await;
        assert!(text.contains("\r\n\r\nat once"), "{text}");
        assert!(text.contains("waiting"), "{text}");
    }

    #[tokio::test]
    async fn a_drain_during_a_request_closes_after_its_response() {
        let stop = CancellationToken::new();
        let trigger = stop.clone();
        let (mut client, _server) = connect(LIMITS, stop, move |_req| {
            let trigger = trigger.clone();
            async move {
                trigger.cancel();
                Response::new(Full::new(Bytes::from_static(b"done")))
            }
        })
        .await;
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        let text = read_to_end(&mut client).await;
        assert!(text.contains("connection: close\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\ndone"), "{text}");
    }

    #[tokio::test]
    async fn broken_or_short_bodies_cut_the_connection() {
        // `/short` declares ten bytes and sends three; anything else breaks after three.
        let service = |req: Request<ClientBody>| {
            let short = req.uri().path() == "/short";
            async move {
                if short {
                    let mut response = Response::new(Frames::new(vec![Ok(Frame::data(
                        Bytes::from_static(b"abc"),
                    ))]));
                    response
                        .headers_mut()
                        .insert(header::CONTENT_LENGTH, HeaderValue::from_static("10"));
                    response
                } else {
                    Response::new(Frames::new(vec![
                        Ok(Frame::data(Bytes::from_static(b"abc"))),
                        Err(io::Error::other("upstream reset")),
                    ]))
                }
            }
        };
        let (mut client, _server) = connect(LIMITS, CancellationToken::new(), service).await;
        client
            .write_all(b"GET /broken HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        let text = read_to_end(&mut client).await;
        assert!(text.ends_with("3\r\nabc\r\n"), "no last chunk: {text}");

        let (mut client, _server) = connect(LIMITS, CancellationToken::new(), service).await;
        client
            .write_all(b"GET /short HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        let text = read_to_end(&mut client).await;
        assert!(text.contains("content-length: 10\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nabc"), "{text}");
    }

    #[tokio::test]
    async fn a_target_the_uri_type_refuses_is_answered_400() {
        let (mut client, server) = connect(LIMITS, CancellationToken::new(), echo).await;
        client
            .write_all(b"GET http://[bad/ HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        let text = read_to_end(&mut client).await;
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
        assert!(matches!(server.await.unwrap(), Ended::Closed));
    }
}
