//! Time limits against real loopback peers: connect, per-try and total request timeouts towards
//! backends that hang in different ways, and the request-head and idle keep-alive timeouts
//! towards slow or idle clients. Elapsed times are measured with `std::time::Instant` and must
//! land within ±100 ms of the configured limit.

// Panicking on a broken fixture is how a test fails; clippy only exempts `#[test]` bodies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use support::{Answer, Backend, TestProxy, get, http1_client, policy, read_response, send};

/// Allowed distance between a measured elapsed time and the configured limit.
const SLACK: Duration = Duration::from_millis(100);
/// Upper bound for waits that should end much sooner, so a regression fails instead of hanging.
const WAIT: Duration = Duration::from_secs(5);

fn timeouts(fields: &str) -> String {
    format!("  timeouts: {{{fields}}}\n")
}

fn cause(answer: &Answer) -> Option<&str> {
    answer
        .headers
        .get("x-breakwater-error")
        .and_then(|v| v.to_str().ok())
}

/// GETs `url` with a fresh client; returns the answer and how long it took.
async fn timed_get(url: &str) -> (Answer, Duration) {
    let started = Instant::now();
    let answer = tokio::time::timeout(WAIT, get(url))
        .await
        .expect("the proxy should answer before the test's own deadline");
    (answer, started.elapsed())
}

fn assert_near(elapsed: Duration, limit: Duration, what: &str) {
    assert!(
        elapsed + SLACK >= limit && elapsed <= limit + SLACK,
        "{what}: expected within {limit:?} ± {SLACK:?}, took {elapsed:?}"
    );
}

/// A loopback listener whose accept queue is full, so the kernel drops further SYNs and new
/// connects hang (until the client's SYN retransmits give up). Returns the address and what
/// must stay alive to keep it that way.
async fn blackhole_listener() -> (SocketAddr, socket2::Socket, Vec<TcpStream>) {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .expect("socket");
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    // Backlog 0: Linux queues one completed connection, then drops SYNs. Never accepted.
    socket.listen(0).expect("listen");
    let addr = socket
        .local_addr()
        .expect("addr")
        .as_socket()
        .expect("inet addr");
    let mut fillers = Vec::new();
    for _ in 0..8 {
        match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => fillers.push(stream),
            Ok(Err(err)) => panic!("filling the accept queue failed: {err}"),
            // This connect hangs: the queue is full and SYNs are being dropped.
            Err(_) => return (addr, socket, fillers),
        }
    }
    panic!(
        "8 connects to a listen(0) socket all completed: this kernel does not drop SYNs on a \
         full accept queue, so the blackhole trick does not work here"
    );
}

/// A backend that accepts TCP connections and then neither reads nor writes; the sockets are
/// held open until the returned task is aborted.
async fn silent_tcp_backend() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    (addr, task)
}

/// A backend whose handler never completes (the HTTP server reads the request, never answers).
async fn never_answering_backend() -> Backend {
    Backend::start(std::sync::Arc::new(|_req| {
        Box::pin(std::future::pending::<
            http::Response<http_body_util::Full<bytes::Bytes>>,
        >())
    }))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_against_a_blackhole_answers_504() {
    let (addr, _listener, _fillers) = blackhole_listener().await;
    let proxy = TestProxy::start(&policy(
        "connect",
        &[("hole", addr)],
        // One attempt: by default a connect failure is retried once, which would double the wait.
        &format!(
            "{}  retry: {{maxAttempts: 1}}\n",
            timeouts("connect: 300ms, request: 2s")
        ),
    ))
    .await;
    let (answer, elapsed) = timed_get(&proxy.url("connect", "/x")).await;
    assert_eq!(answer.status, 504, "a connect timeout should answer 504");
    assert_eq!(cause(&answer), Some("connect_timeout"), "the cause header");
    assert_near(
        elapsed,
        Duration::from_millis(300),
        "connect timeout of 300ms",
    );
    eprintln!("connect timeout 300ms: answered after {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_against_a_backend_that_never_answers() {
    let backend = never_answering_backend().await;
    let proxy = TestProxy::start(&policy(
        "pertry",
        &[("mute", backend.addr)],
        &timeouts("perTry: 300ms, request: 2s"),
    ))
    .await;
    let (answer, elapsed) = timed_get(&proxy.url("pertry", "/x")).await;
    assert_eq!(answer.status, 504, "a per-try timeout should answer 504");
    assert_eq!(cause(&answer), Some("per_try_timeout"), "the cause header");
    assert_near(
        elapsed,
        Duration::from_millis(300),
        "per-try timeout of 300ms",
    );
    assert_eq!(
        backend.hits(),
        1,
        "the backend should have received the request once"
    );
    eprintln!("per-try timeout 300ms: answered after {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_against_a_backend_that_never_answers() {
    let backend = never_answering_backend().await;
    let proxy = TestProxy::start(&policy(
        "total",
        &[("mute", backend.addr)],
        &timeouts("request: 400ms"),
    ))
    .await;
    let (answer, elapsed) = timed_get(&proxy.url("total", "/x")).await;
    assert_eq!(answer.status, 504, "a request timeout should answer 504");
    assert_eq!(cause(&answer), Some("request_timeout"), "the cause header");
    assert_near(
        elapsed,
        Duration::from_millis(400),
        "request timeout of 400ms",
    );
    eprintln!("request timeout 400ms: answered after {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_that_accepts_and_never_reads_does_not_hang_the_client() {
    let (addr, task) = silent_tcp_backend().await;
    let proxy = TestProxy::start(&policy(
        "silent",
        &[("silent", addr)],
        &timeouts("request: 500ms"),
    ))
    .await;
    let (answer, elapsed) = timed_get(&proxy.url("silent", "/x")).await;
    task.abort();
    assert_eq!(answer.status, 504, "a silent backend should end in 504");
    assert_eq!(cause(&answer), Some("request_timeout"), "the cause header");
    assert_near(
        elapsed,
        Duration::from_millis(500),
        "request timeout of 500ms",
    );
    eprintln!("silent TCP backend, request 500ms: answered after {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_head_gets_408_while_a_normal_client_is_served() {
    let backend = Backend::text("ok").await;
    let proxy = TestProxy::start(&policy(
        "slowhead",
        &[("app", backend.addr)],
        &timeouts("requestHeader: 300ms, idle: 10s"),
    ))
    .await;
    let addr = proxy.addr("slowhead");
    let url = proxy.url("slowhead", "/fast");

    let slow = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let started = Instant::now();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write partial head");
        let mut out = Vec::new();
        let closed = tokio::time::timeout(WAIT, stream.read_to_end(&mut out)).await;
        (
            closed,
            String::from_utf8_lossy(&out).into_owned(),
            started.elapsed(),
        )
    };
    let normal = async {
        let client = http1_client();
        let mut worst = Duration::ZERO;
        // Spread over the slow client's 300 ms wait; the pause paces requests, it waits for nothing.
        for i in 0..10 {
            let started = Instant::now();
            let request = http::Request::get(url.as_str())
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .expect("request");
            let answer = send(&client, request).await;
            assert_eq!(answer.status, 200, "normal request {i} should be served");
            worst = worst.max(started.elapsed());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        worst
    };
    let ((closed, response, elapsed), worst) = tokio::join!(slow, normal);

    assert!(
        matches!(closed, Ok(Ok(_))),
        "the proxy should close the slow connection, got {closed:?} after {elapsed:?}"
    );
    assert!(
        response.starts_with("HTTP/1.1 408"),
        "the slow client should get a 408 first:\n{response}"
    );
    assert!(
        response
            .to_ascii_lowercase()
            .contains("x-breakwater-error: request_header_timeout"),
        "the 408 should carry its cause:\n{response}"
    );
    assert_near(
        elapsed,
        Duration::from_millis(300),
        "request-head timeout of 300ms",
    );
    assert!(
        worst < Duration::from_millis(100),
        "a normal client in parallel should stay fast, slowest request took {worst:?}"
    );
    assert_eq!(
        backend.hits(),
        10,
        "only the normal client's requests reach the backend"
    );
    eprintln!(
        "requestHeader 300ms: 408 + close after {elapsed:?}; parallel client worst {worst:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connection_is_closed_quietly() {
    let backend = Backend::text("ok").await;
    let proxy = TestProxy::start(&policy(
        "idle",
        &[("app", backend.addr)],
        &timeouts("idle: 300ms, requestHeader: 5s"),
    ))
    .await;
    let mut stream = TcpStream::connect(proxy.addr("idle"))
        .await
        .expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write request");
    let response = read_response(&mut stream, WAIT).await;
    let idle_since = Instant::now();
    assert!(
        response.starts_with("HTTP/1.1 200"),
        "the keep-alive request should be served:\n{response}"
    );
    assert!(
        !response.to_ascii_lowercase().contains("connection: close"),
        "the connection should be kept alive after the response:\n{response}"
    );

    let mut after = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut after)).await;
    let elapsed = idle_since.elapsed();
    assert!(
        matches!(closed, Ok(Ok(_))),
        "the proxy should close the idle keep-alive connection ~300ms after the response; \
         read_to_end gave {closed:?} after {elapsed:?} (Err(Elapsed) = still open)"
    );
    assert!(
        after.is_empty(),
        "an idle close should send nothing (no 408), got {:?}",
        String::from_utf8_lossy(&after)
    );
    assert_near(elapsed, Duration::from_millis(300), "idle timeout of 300ms");
    eprintln!("idle 300ms after a response: closed after {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_that_never_sends_is_closed_quietly_after_idle() {
    let backend = Backend::text("ok").await;
    let proxy = TestProxy::start(&policy(
        "idle-new",
        &[("app", backend.addr)],
        &timeouts("idle: 300ms, requestHeader: 5s"),
    ))
    .await;
    let mut stream = TcpStream::connect(proxy.addr("idle-new"))
        .await
        .expect("connect");
    let started = Instant::now();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(WAIT, stream.read_to_end(&mut out)).await;
    let elapsed = started.elapsed();
    assert!(
        matches!(closed, Ok(Ok(_))),
        "the proxy should close a connection that never sends, got {closed:?}"
    );
    assert!(
        out.is_empty(),
        "a connection that sent nothing should be closed without a response, got {:?}",
        String::from_utf8_lossy(&out)
    );
    assert_near(elapsed, Duration::from_millis(300), "idle timeout of 300ms");
    assert_eq!(backend.hits(), 0, "nothing should reach the backend");
    eprintln!("idle 300ms on a silent new connection: closed after {elapsed:?}");
}

/// A raw backend that sends response headers and half the body, then stalls with the socket open.
async fn stalling_backend() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = vec![0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf!")
                .await;
            held.push(stream);
        }
    });
    (addr, task)
}

#[tokio::test]
async fn a_response_body_that_stalls_is_aborted_at_the_idle_timeout() {
    let (backend, _task) = stalling_backend().await;
    let proxy = TestProxy::start(&policy(
        "stall",
        &[("app", backend)],
        &timeouts("idle: 300ms, request: 5s"),
    ))
    .await;
    let mut stream = TcpStream::connect(proxy.addr("stall"))
        .await
        .expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let started = Instant::now();
    let mut got = Vec::new();
    let ended = tokio::time::timeout(WAIT, stream.read_to_end(&mut got)).await;
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&got);
    assert!(
        ended.is_ok(),
        "the proxy must not hold a stalled body open forever"
    );
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "headers were already sent: {text}"
    );
    assert!(
        text.ends_with("half!"),
        "the client must see a short body (never padded or completed): {text:?}"
    );
    assert_near(elapsed, Duration::from_millis(300), "stalled body abort");
}
