//! Streaming through the proxy: HTTP/2 (h2c) clients in front of HTTP/1.1 backends, and 10 MiB
//! request and response bodies that must cross the proxy chunk by chunk, never buffered whole.
//!
//! The streaming proofs are causal, not timing-based: the sender holds back everything but the
//! first chunk until the receiver on the far side of the proxy reports that chunk arrived. A
//! proxy that buffers whole bodies never delivers it, and the bounded wait fails the test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

use support::{Backend, BoxResponse, TestProxy, h2c_client, http1_client, policy, send};

/// The streamed body size.
const TOTAL: usize = 10 << 20;
/// The size of each chunk the tests send.
const CHUNK: usize = 64 << 10;
/// How long the first chunk may take to cross the proxy. A buffering proxy never delivers it,
/// so this bound turns "hangs" into a failed assertion.
const FIRST_BYTES: Duration = Duration::from_secs(5);
/// How long a whole 10 MiB transfer may take on loopback.
const WHOLE_BODY: Duration = Duration::from_secs(30);
/// Raises the 10Mi default so a 10 MiB body is within the limit.
const BIG_LIMIT: &str = "  limits: {maxRequestBodyBytes: 20Mi}\n";
/// A small limit for the over-the-limit tests.
const SMALL_LIMIT: u64 = 1 << 20;

/// A body fed chunk by chunk from a channel.
type ChunkBody = UnsyncBoxBody<Bytes, Infallible>;

/// A streaming body and the sender that feeds it; dropping the sender ends the body.
fn channel_body() -> (mpsc::Sender<Bytes>, ChunkBody) {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(chunk)), rx))
    });
    (tx, StreamBody::new(frames).boxed_unsync())
}

/// A client whose request bodies are [`ChunkBody`]s (HTTP/1.1, or h2c with `http2`).
fn streaming_client(http2: bool) -> Client<HttpConnector, ChunkBody> {
    Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .build_http()
}

fn chunk() -> Bytes {
    Bytes::from(vec![b'x'; CHUNK])
}

/// Sends every chunk after the first, then ends the body.
async fn send_rest(tx: mpsc::Sender<Bytes>) {
    for _ in 1..TOTAL / CHUNK {
        tx.send(chunk())
            .await
            .expect("the receiver should keep reading until the body ends");
    }
}

/// What the counting backend saw of one request body.
#[derive(Default)]
struct Received {
    bytes: AtomicUsize,
    version: Mutex<Option<Version>>,
}

/// A backend that reads the whole request body, reports its first bytes on `first`, and
/// answers with the byte count.
async fn counting_backend(first: oneshot::Sender<()>) -> (Backend, Arc<Received>) {
    let first = Arc::new(Mutex::new(Some(first)));
    let received = Arc::new(Received::default());
    let seen = Arc::clone(&received);
    let backend = Backend::start(Arc::new(move |req: Request<Incoming>| -> BoxResponse {
        let first = Arc::clone(&first);
        let seen = Arc::clone(&seen);
        Box::pin(async move {
            *seen.version.lock().unwrap() = Some(req.version());
            let mut body = req.into_body();
            let mut count = 0usize;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    return support::status(499, "request body broke off");
                };
                if let Some(data) = frame.data_ref() {
                    count += data.len();
                    seen.bytes.store(count, Ordering::SeqCst);
                    if !data.is_empty() {
                        if let Some(tx) = first.lock().unwrap().take() {
                            let _ = tx.send(());
                        }
                    }
                }
            }
            Response::new(Full::new(Bytes::from(count.to_string())))
        })
    }))
    .await;
    (backend, received)
}

#[tokio::test]
async fn h2c_client_reaches_an_http1_backend() {
    let versions = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&versions);
    let backend = Backend::start(Arc::new(move |req: Request<Incoming>| -> BoxResponse {
        seen.lock().unwrap().push(req.version());
        Box::pin(async move {
            let path = req.uri().path().to_owned();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            Response::new(Full::new(Bytes::from(format!(
                "{path}:{}",
                String::from_utf8_lossy(&body)
            ))))
        })
    }))
    .await;
    let proxy = TestProxy::start(&policy("h2", &[("app", backend.addr)], "")).await;
    let client = h2c_client();

    let resp = client
        .request(
            Request::post(proxy.url("h2", "/echo"))
                .body(Full::new(Bytes::from_static(b"over h2")))
                .unwrap(),
        )
        .await
        .expect("the proxy should answer an h2c prior-knowledge request");
    assert_eq!(
        resp.version(),
        Version::HTTP_2,
        "the client side should stay HTTP/2"
    );
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "expected 200 from the backend"
    );
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        &body[..],
        b"/echo:over h2",
        "the backend's answer should come back unchanged"
    );

    // Concurrent streams on the one h2 connection, each forwarded as its own HTTP/1.1 request.
    let requests = (0..10).map(|i| {
        let client = client.clone();
        let url = proxy.url("h2", &format!("/n{i}"));
        async move { send(&client, Request::get(url).body(Full::default()).unwrap()).await }
    });
    for (i, answer) in futures_util::future::join_all(requests)
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!(answer.status, 200, "stream {i} should get 200");
        assert_eq!(
            answer.text(),
            format!("/n{i}:"),
            "stream {i} should get its own answer"
        );
    }

    assert_eq!(backend.hits(), 11, "the backend should see all 11 requests");
    let versions = versions.lock().unwrap().clone();
    assert!(
        versions.iter().all(|v| *v == Version::HTTP_11),
        "the backend should see HTTP/1.1 only, saw {versions:?}"
    );
    let headers = backend.last_headers();
    assert_eq!(
        headers
            .get(header::HOST)
            .map(|h| h.to_str().unwrap().to_owned()),
        Some(proxy.addr("h2").to_string()),
        "the backend should get a Host header carrying the client's :authority"
    );
    assert_eq!(
        headers.get_all(header::HOST).iter().count(),
        1,
        "exactly one Host header"
    );
}

/// Streams 10 MiB upstream; the backend must see the first chunk while the client still holds
/// the rest.
async fn request_body_streams(content_length: bool, http2: bool) {
    let (first_tx, first_rx) = oneshot::channel();
    let (backend, received) = counting_backend(first_tx).await;
    let proxy = TestProxy::start(&policy("upload", &[("app", backend.addr)], BIG_LIMIT)).await;

    let (tx, body) = channel_body();
    let mut request = Request::post(proxy.url("upload", "/upload"));
    if content_length {
        request = request.header(header::CONTENT_LENGTH, TOTAL);
    }
    let request = request.body(body).unwrap();
    let client = streaming_client(http2);
    let response = tokio::spawn(async move { client.request(request).await });

    let started = Instant::now();
    tx.send(chunk()).await.unwrap();
    timeout(FIRST_BYTES, first_rx)
        .await
        .expect(
            "the backend should receive the first 64 KiB while the client still holds the other \
             10 MiB (the proxy must stream request bodies, not buffer them)",
        )
        .expect("the backend should signal its first bytes");
    let first_bytes = started.elapsed();
    // The first chunk may reach the backend in pieces (HTTP/2 flow control releases its last
    // byte a moment later); give it a moment, then it must hold exactly that chunk.
    let settle = Instant::now();
    while received.bytes.load(Ordering::SeqCst) < CHUNK && settle.elapsed() < FIRST_BYTES {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(
        received.bytes.load(Ordering::SeqCst),
        CHUNK,
        "the backend cannot have more than the one chunk the client has sent so far"
    );
    send_rest(tx).await;

    let response = timeout(WHOLE_BODY, response)
        .await
        .expect("the upload should finish in time")
        .unwrap()
        .expect("the proxy should answer the upload");
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let elapsed = started.elapsed();
    assert_eq!(
        status,
        StatusCode::OK,
        "expected 200 for a body within the limit"
    );
    assert_eq!(
        String::from_utf8_lossy(&body),
        TOTAL.to_string(),
        "the backend should count exactly 10 MiB"
    );
    assert_eq!(
        *received.version.lock().unwrap(),
        Some(Version::HTTP_11),
        "the backend speaks HTTP/1.1"
    );
    let headers = backend.last_headers();
    if content_length {
        assert_eq!(
            headers
                .get(header::CONTENT_LENGTH)
                .map(|v| v.to_str().unwrap().to_owned()),
            Some(TOTAL.to_string()),
            "a Content-Length request should reach the backend with its length"
        );
    } else if !http2 {
        assert!(
            headers
                .get(header::TRANSFER_ENCODING)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked")),
            "a chunked request should reach the backend chunked: {headers:?}"
        );
    }
    println!(
        "request streaming (content_length={content_length}, h2c={http2}): first 64 KiB at the \
         backend after {first_bytes:?}, 10 MiB done after {elapsed:?}"
    );
}

#[tokio::test]
async fn chunked_request_body_streams_to_the_backend() {
    request_body_streams(false, false).await;
}

#[tokio::test]
async fn content_length_request_body_streams_to_the_backend() {
    request_body_streams(true, false).await;
}

#[tokio::test]
async fn h2c_request_body_streams_to_an_http1_backend() {
    request_body_streams(false, true).await;
}

/// A loopback HTTP/1.1 server whose first response body is fed from `chunks` (with a
/// `Content-Length` header when `content_length` is given); later requests get 409.
async fn streaming_backend(
    chunks: mpsc::Receiver<Bytes>,
    content_length: Option<usize>,
) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let chunks = Arc::new(Mutex::new(Some(chunks)));
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let chunks = Arc::clone(&chunks);
            tokio::spawn(async move {
                let service = service_fn(move |_req: Request<Incoming>| {
                    let rx = chunks.lock().unwrap().take();
                    async move {
                        let Some(rx) = rx else {
                            let mut resp = Response::new(
                                Full::new(Bytes::from_static(b"only one download"))
                                    .map_err(|never| match never {})
                                    .boxed_unsync(),
                            );
                            *resp.status_mut() = StatusCode::CONFLICT;
                            return Ok::<_, Infallible>(resp);
                        };
                        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
                            let chunk = rx.recv().await?;
                            Some((Ok::<_, Infallible>(Frame::data(chunk)), rx))
                        });
                        let mut resp = Response::new(StreamBody::new(frames).boxed_unsync());
                        if let Some(length) = content_length {
                            resp.headers_mut()
                                .insert(header::CONTENT_LENGTH, length.into());
                        }
                        Ok(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, task)
}

/// Streams 10 MiB downstream; the client must see the first chunk while the backend still
/// holds the rest.
async fn response_body_streams(content_length: bool, http2: bool) {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let (backend_addr, backend_task) = streaming_backend(rx, content_length.then_some(TOTAL)).await;
    let proxy = TestProxy::start(&policy("download", &[("app", backend_addr)], "")).await;
    let client = if http2 { h2c_client() } else { http1_client() };

    let started = Instant::now();
    tx.send(chunk()).await.unwrap();
    let response = timeout(
        FIRST_BYTES,
        client.request(
            Request::get(proxy.url("download", "/big"))
                .body(Full::default())
                .unwrap(),
        ),
    )
    .await
    .expect("response headers should arrive while the backend still holds most of the body")
    .expect("the proxy should answer the download");
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "expected 200 from the backend"
    );
    if content_length {
        assert_eq!(
            response
                .headers()
                .get(header::CONTENT_LENGTH)
                .map(|v| v.to_str().unwrap().to_owned()),
            Some(TOTAL.to_string()),
            "the backend's Content-Length should be passed on"
        );
    }
    let mut body = response.into_body();
    let first = timeout(FIRST_BYTES, body.frame())
        .await
        .expect(
            "the client should receive the first bytes while the backend still holds the other \
             10 MiB (the proxy must stream response bodies, not buffer them)",
        )
        .expect("the body should not end before its first bytes")
        .expect("the first frame should not be an error");
    let mut total = first.data_ref().map_or(0, Bytes::len);
    let first_bytes = started.elapsed();
    assert!(
        total > 0 && total <= CHUNK,
        "the first frame should hold part of the one chunk sent so far, got {total} bytes"
    );

    let sender = tokio::spawn(send_rest(tx));
    let rest = timeout(WHOLE_BODY, async {
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("the response body should not break off");
            total += frame.data_ref().map_or(0, Bytes::len);
        }
    })
    .await;
    rest.expect("the download should finish in time");
    sender.await.expect("the backend should take every chunk");
    let elapsed = started.elapsed();
    assert_eq!(total, TOTAL, "the client should receive exactly 10 MiB");
    backend_task.abort();
    println!(
        "response streaming (content_length={content_length}, h2c={http2}): first bytes at the \
         client after {first_bytes:?}, 10 MiB done after {elapsed:?}"
    );
}

#[tokio::test]
async fn chunked_response_body_streams_to_the_client() {
    response_body_streams(false, false).await;
}

#[tokio::test]
async fn content_length_response_body_streams_to_the_client() {
    response_body_streams(true, false).await;
}

#[tokio::test]
async fn response_body_streams_to_an_h2c_client() {
    response_body_streams(false, true).await;
}

/// `limits.maxRequestBodyBytes` of 1 MiB.
fn small_limit_policy(name: &str, backend: SocketAddr) -> String {
    policy(
        name,
        &[("app", backend)],
        &format!("  limits: {{maxRequestBodyBytes: {SMALL_LIMIT}}}\n"),
    )
}

#[tokio::test]
async fn declared_body_over_the_limit_is_413_without_reaching_the_backend() {
    let (first_tx, _first_rx) = oneshot::channel();
    let (backend, received) = counting_backend(first_tx).await;
    let proxy = TestProxy::start(&small_limit_policy("limit", backend.addr)).await;
    let over = SMALL_LIMIT + 1;

    // The head alone declares the size: the proxy must answer without reading the body.
    for expect in ["", "Expect: 100-continue\r\n"] {
        let head = format!(
            "POST /upload HTTP/1.1\r\nHost: limit.test\r\nContent-Length: {over}\r\n{expect}\r\n"
        );
        let answer =
            support::raw_exchange(proxy.addr("limit"), head.as_bytes(), Duration::from_secs(5))
                .await;
        assert!(
            answer.starts_with("HTTP/1.1 413"),
            "Content-Length {over} over a {SMALL_LIMIT}-byte limit ({expect:?}) should get 413 \
             first thing, got:\n{answer}"
        );
        assert!(
            answer.contains("x-breakwater-error: body_too_large"),
            "the 413 should name its cause:\n{answer}"
        );
        assert!(
            !answer.contains("100 Continue"),
            "no 100 Continue for a body that will be refused:\n{answer}"
        );
    }

    // A real client sending the whole body gets the same answer.
    let answer = send(
        &http1_client(),
        Request::post(proxy.url("limit", "/upload"))
            .body(Full::new(Bytes::from(vec![b'x'; over as usize])))
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, 413, "a {over}-byte body should get 413");

    // Exactly at the limit is allowed.
    let answer = send(
        &http1_client(),
        Request::post(proxy.url("limit", "/upload"))
            .body(Full::new(Bytes::from(vec![b'x'; SMALL_LIMIT as usize])))
            .unwrap(),
    )
    .await;
    assert_eq!(
        answer.status, 200,
        "a body of exactly the limit should pass"
    );
    assert_eq!(
        answer.text(),
        SMALL_LIMIT.to_string(),
        "the backend should count the whole body"
    );
    assert_eq!(
        received.bytes.load(Ordering::SeqCst) as u64,
        SMALL_LIMIT,
        "the backend should count the whole body"
    );
    assert_eq!(
        backend.hits(),
        1,
        "only the body within the limit should reach the backend"
    );
}

/// What a client streaming a chunked body over the limit saw.
struct OverLimit {
    /// Everything the proxy sent back.
    answer: String,
    /// Body bytes the client managed to write before the proxy stopped taking them.
    written: usize,
    /// Whether the proxy closed the connection (rather than the read timing out).
    closed: bool,
}

/// Bytes streamed at the proxy in the over-the-limit tests: well past the 1 MiB limit and past
/// what loopback socket buffers absorb, so a proxy that keeps draining is told apart from one
/// that stops reading.
const OVER_LIMIT_STREAM: usize = 32 << 20;

/// Writes a chunked request head and then up to [`OVER_LIMIT_STREAM`] bytes in 64 KiB chunks on
/// a raw socket while reading the answer concurrently.
async fn stream_chunked_over_the_limit(addr: SocketAddr) -> OverLimit {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        let head =
            b"POST /upload HTTP/1.1\r\nHost: limit.test\r\nTransfer-Encoding: chunked\r\n\r\n";
        if write.write_all(head).await.is_err() {
            return 0;
        }
        let mut written = 0;
        let mut frame = format!("{CHUNK:x}\r\n").into_bytes();
        frame.extend_from_slice(&vec![b'x'; CHUNK]);
        frame.extend_from_slice(b"\r\n");
        for _ in 0..OVER_LIMIT_STREAM / CHUNK {
            if write.write_all(&frame).await.is_err() {
                return written;
            }
            written += CHUNK;
        }
        let _ = write.write_all(b"0\r\n\r\n").await;
        written
    });
    let mut out = Vec::new();
    let closed = timeout(Duration::from_secs(10), read.read_to_end(&mut out))
        .await
        .is_ok();
    let written = match timeout(Duration::from_secs(5), writer).await {
        Ok(written) => written.unwrap(),
        // Still blocked on a full socket: the proxy neither reads nor closes.
        Err(_) => OVER_LIMIT_STREAM + 1,
    };
    OverLimit {
        answer: String::from_utf8_lossy(&out).into_owned(),
        written,
        closed,
    }
}

#[tokio::test]
async fn streamed_chunked_body_over_the_limit_is_413() {
    let (first_tx, _first_rx) = oneshot::channel();
    let (backend, received) = counting_backend(first_tx).await;
    let proxy = TestProxy::start(&small_limit_policy("chunked", backend.addr)).await;

    let OverLimit {
        answer,
        written,
        closed,
    } = stream_chunked_over_the_limit(proxy.addr("chunked")).await;
    assert!(
        answer.starts_with("HTTP/1.1 413"),
        "a chunked body passing the {SMALL_LIMIT}-byte limit while the backend is still reading \
         should get 413, got:\n{answer}"
    );
    assert!(
        answer.contains("x-breakwater-error: body_too_large"),
        "the 413 should name its cause:\n{answer}"
    );
    assert!(
        closed,
        "the proxy should close the connection after the 413 (Connection: close)"
    );
    assert!(
        written < OVER_LIMIT_STREAM,
        "the proxy should stop taking the body after the 413, but it read all {written} bytes"
    );
    let at_backend = received.bytes.load(Ordering::SeqCst);
    assert!(
        at_backend as u64 <= SMALL_LIMIT,
        "the backend should never get more than the limit, got {at_backend} bytes"
    );
    println!(
        "chunked over the limit: client wrote {written} body bytes before the proxy closed, \
         backend received {at_backend} bytes, answer: {:?}",
        answer.lines().next().unwrap_or_default()
    );
}

#[tokio::test]
async fn streamed_body_over_the_limit_after_the_backend_answered_is_cut_off() {
    // The backend answers at once and keeps draining the body in the background, recording
    // how the body ended: 1 = a clean end, 2 = broke off.
    let received = Arc::new(AtomicUsize::new(0));
    let ending = Arc::new(AtomicUsize::new(0));
    let (count, end) = (Arc::clone(&received), Arc::clone(&ending));
    let backend = Backend::start(Arc::new(move |req: Request<Incoming>| -> BoxResponse {
        let (count, end) = (Arc::clone(&count), Arc::clone(&end));
        tokio::spawn(async move {
            let mut body = req.into_body();
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => {
                        count.fetch_add(frame.data_ref().map_or(0, Bytes::len), Ordering::SeqCst);
                    }
                    Err(_) => {
                        end.store(2, Ordering::SeqCst);
                        return;
                    }
                }
            }
            end.store(1, Ordering::SeqCst);
        });
        Box::pin(async { support::ok("early answer") })
    }))
    .await;
    let proxy = TestProxy::start(&small_limit_policy("early", backend.addr)).await;

    let OverLimit {
        answer,
        written,
        closed,
    } = stream_chunked_over_the_limit(proxy.addr("early")).await;
    let status_line = answer.lines().next().unwrap_or_default().to_owned();
    assert!(
        status_line.starts_with("HTTP/1.1 200") || status_line.starts_with("HTTP/1.1 413"),
        "the client should get the backend's early 200 (or a 413), got:\n{answer}"
    );
    assert!(
        closed,
        "the proxy should close the client connection once the body passes the limit"
    );
    assert!(
        written < OVER_LIMIT_STREAM,
        "the proxy should stop taking the body once it passes the limit, but it read all \
         {written} bytes"
    );
    let at_backend = received.load(Ordering::SeqCst);
    assert!(
        at_backend as u64 <= SMALL_LIMIT,
        "the backend should never get more than the {SMALL_LIMIT}-byte limit, got {at_backend}"
    );
    let ended = support::eventually(Duration::from_secs(5), || async {
        ending.load(Ordering::SeqCst) != 0
    })
    .await;
    assert!(
        ended,
        "the backend's copy of the body should end once the proxy gives up on it"
    );
    assert_eq!(
        ending.load(Ordering::SeqCst),
        2,
        "a body cut off at the limit must reach the backend as aborted, never as a clean end \
         (the backend got {at_backend} bytes)"
    );
    println!(
        "over the limit after an early answer: client saw {status_line:?} and wrote {written} \
         body bytes; backend received {at_backend} bytes and then an aborted body"
    );
}

#[tokio::test]
#[ignore = "known gap: hyper's HTTP/1 client reports the failed body write instead of the early response; tracked in the issue notes"]
async fn backend_early_answer_without_reading_the_body_reaches_the_client() {
    // A backend that refuses an upload without reading it (auth failure, quota) answers and
    // closes. RFC 9112 §9.5: the sender of a body should watch for that early response; the
    // proxy should pass the backend's answer on, not turn it into a 502.
    let backend = Backend::start(Arc::new(|_req: Request<Incoming>| -> BoxResponse {
        Box::pin(async { support::status(401, "no uploads for you") })
    }))
    .await;
    let proxy = TestProxy::start(&policy("early", &[("app", backend.addr)], "")).await;
    let answer = send(
        &http1_client(),
        Request::post(proxy.url("early", "/upload"))
            .body(Full::new(Bytes::from(vec![b'x'; 1 << 20])))
            .unwrap(),
    )
    .await;
    assert_eq!(
        (answer.status, answer.text()),
        (401, "no uploads for you".to_owned()),
        "the backend's early 401 should reach the client (got x-breakwater-error: {:?})",
        answer.headers.get("x-breakwater-error")
    );
}
