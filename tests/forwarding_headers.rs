//! What crosses the proxy in headers: forwarding headers as the backend sees them, trust of a
//! client's forwarding chain, hop-by-hop stripping in both directions, configured removals, and
//! request heads that must be rejected (400) before anything reaches a backend.

// Panicking on a broken fixture is how a test fails; clippy only exempts `#[test]` bodies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use support::{
    Backend, Handler, TestProxy, get, h2c_client, http1_client, policy, raw_exchange, send,
};

/// Longest wait for a raw exchange; responses normally arrive in milliseconds.
const RAW_WAIT: Duration = Duration::from_secs(3);

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// All values of `name`, in order.
fn header_values(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect()
}

/// The HTTP status codes in a raw response stream, in order (one per response).
fn statuses(raw: &str) -> Vec<u16> {
    raw.match_indices("HTTP/1.1 ")
        .filter_map(|(at, _)| raw.get(at + 9..at + 12))
        .filter_map(|code| code.parse().ok())
        .collect()
}

/// A backend answering `200 ok` that records every request path it is sent.
async fn path_recording_backend() -> (Backend, Arc<Mutex<Vec<String>>>) {
    let paths = Arc::new(Mutex::new(Vec::new()));
    let recorded = Arc::clone(&paths);
    let handler: Handler = Arc::new(move |req: Request<Incoming>| {
        recorded.lock().unwrap().push(req.uri().path().to_owned());
        Box::pin(async { support::ok("ok") })
    });
    (Backend::start(handler).await, paths)
}

#[tokio::test]
async fn backend_sees_forwarding_headers_describing_the_client() {
    let backend = Backend::text("ok").await;
    let proxy = TestProxy::start(&policy("fwd", &[("app", backend.addr)], "")).await;
    let port = proxy.addr("fwd").port();
    let authority = format!("127.0.0.1:{port}");

    let answer = get(&proxy.url("fwd", "/x")).await;
    assert_eq!(answer.status, 200, "the request should be forwarded");
    assert_eq!(
        header_values(&answer.headers, "via"),
        ["1.1 breakwater"],
        "the client should see the proxy's Via hop on the response"
    );

    let seen = backend.last_headers();
    assert_eq!(
        header_values(&seen, "x-forwarded-for"),
        ["127.0.0.1"],
        "X-Forwarded-For should be the client's address, once"
    );
    assert_eq!(
        header(&seen, "x-forwarded-proto"),
        Some("http"),
        "X-Forwarded-Proto"
    );
    assert_eq!(
        header(&seen, "x-forwarded-host"),
        Some(authority.as_str()),
        "X-Forwarded-Host should be the Host the client asked for"
    );
    assert_eq!(
        header(&seen, "x-forwarded-port"),
        Some(port.to_string().as_str()),
        "X-Forwarded-Port should be the listener port"
    );
    assert_eq!(
        header_values(&seen, "forwarded"),
        [format!("for=127.0.0.1;host=\"{authority}\";proto=http")],
        "Forwarded (RFC 7239) should carry for, a quoted host and proto"
    );
    assert_eq!(
        header_values(&seen, "via"),
        ["1.1 breakwater"],
        "Via on the request"
    );
    assert_eq!(
        header(&seen, "host"),
        Some(authority.as_str()),
        "Host should stay what the client sent, not the backend address"
    );
}

#[tokio::test]
async fn h2c_client_is_described_as_http2_in_via() {
    let backend = Backend::text("ok").await;
    let proxy = TestProxy::start(&policy("fwd-h2", &[("app", backend.addr)], "")).await;
    let authority = proxy.addr("fwd-h2").to_string();
    let request = Request::get(proxy.url("fwd-h2", "/x"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let answer = send(&h2c_client(), request).await;
    assert_eq!(answer.status, 200, "an h2c request should be forwarded");
    assert_eq!(
        header_values(&answer.headers, "via"),
        ["2 breakwater"],
        "the response Via should name the client's HTTP/2 hop"
    );
    let seen = backend.last_headers();
    assert_eq!(
        header_values(&seen, "via"),
        ["2 breakwater"],
        "request Via for HTTP/2"
    );
    assert_eq!(
        header(&seen, "x-forwarded-host"),
        Some(authority.as_str()),
        "X-Forwarded-Host should come from the :authority"
    );
    assert_eq!(
        header(&seen, "host"),
        Some(authority.as_str()),
        "an HTTP/1.1 backend should get Host from the client's :authority"
    );
}

fn spoofing_request(url: &str) -> Request<Full<Bytes>> {
    Request::get(url)
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "evil.example")
        .header("x-forwarded-port", "443")
        .header("forwarded", "for=6.6.6.6")
        .body(Full::new(Bytes::new()))
        .expect("request")
}

#[tokio::test]
async fn untrusted_peer_cannot_spoof_forwarding_headers() {
    let backend = Backend::text("ok").await;
    let proxy = TestProxy::start(&policy("untrusted", &[("app", backend.addr)], "")).await;
    let port = proxy.addr("untrusted").port();
    let authority = format!("127.0.0.1:{port}");
    let answer = send(
        &http1_client(),
        spoofing_request(&proxy.url("untrusted", "/x")),
    )
    .await;
    assert_eq!(answer.status, 200, "the request should be forwarded");

    let seen = backend.last_headers();
    assert_eq!(
        header_values(&seen, "x-forwarded-for"),
        ["127.0.0.1"],
        "an untrusted peer's X-Forwarded-For should be replaced by its own address"
    );
    assert_eq!(
        header(&seen, "x-forwarded-proto"),
        Some("http"),
        "spoofed proto replaced"
    );
    assert_eq!(
        header(&seen, "x-forwarded-host"),
        Some(authority.as_str()),
        "spoofed X-Forwarded-Host replaced"
    );
    assert_eq!(
        header(&seen, "x-forwarded-port"),
        Some(port.to_string().as_str()),
        "spoofed X-Forwarded-Port replaced"
    );
    assert_eq!(
        header_values(&seen, "forwarded"),
        [format!("for=127.0.0.1;host=\"{authority}\";proto=http")],
        "an untrusted peer's Forwarded chain should be discarded"
    );
}

#[tokio::test]
async fn trusted_peer_chain_is_extended() {
    let backend = Backend::text("ok").await;
    let proxy = TestProxy::start(&policy(
        "trusted",
        &[("app", backend.addr)],
        "  forwarding: {trustedProxies: [\"127.0.0.1/32\"]}\n",
    ))
    .await;
    let authority = proxy.addr("trusted").to_string();
    let answer = send(
        &http1_client(),
        spoofing_request(&proxy.url("trusted", "/x")),
    )
    .await;
    assert_eq!(answer.status, 200, "the request should be forwarded");

    let seen = backend.last_headers();
    assert_eq!(
        header_values(&seen, "x-forwarded-for"),
        ["6.6.6.6, 127.0.0.1"],
        "a trusted peer's X-Forwarded-For should be extended with the peer"
    );
    assert_eq!(
        header(&seen, "x-forwarded-proto"),
        Some("https"),
        "a trusted peer's X-Forwarded-Proto should be kept"
    );
    assert_eq!(
        header(&seen, "x-forwarded-host"),
        Some("evil.example"),
        "a trusted peer's X-Forwarded-Host should be kept"
    );
    assert_eq!(
        header(&seen, "x-forwarded-port"),
        Some("443"),
        "a trusted peer's X-Forwarded-Port should be kept"
    );
    assert_eq!(
        header_values(&seen, "forwarded"),
        [format!(
            "for=6.6.6.6, for=127.0.0.1;host=\"{authority}\";proto=http"
        )],
        "a trusted peer's Forwarded chain should be extended with our hop"
    );

    // Several X-Forwarded-For fields are one list (RFC 9110 §5.3), in order.
    let request = Request::get(proxy.url("trusted", "/y"))
        .header("x-forwarded-for", "1.1.1.1")
        .header("x-forwarded-for", "2.2.2.2, 3.3.3.3")
        .body(Full::new(Bytes::new()))
        .expect("request");
    assert_eq!(send(&http1_client(), request).await.status, 200);
    assert_eq!(
        header_values(&backend.last_headers(), "x-forwarded-for"),
        ["1.1.1.1, 2.2.2.2, 3.3.3.3, 127.0.0.1"],
        "split X-Forwarded-For fields should be joined in order, then extended"
    );
}

#[tokio::test]
async fn add_headers_empty_forwards_the_clients_fields_as_sent_and_adds_none() {
    let backend = Backend::text("ok").await;
    let proxy = TestProxy::start(&policy(
        "bare",
        &[("app", backend.addr)],
        "  forwarding: {addHeaders: []}\n",
    ))
    .await;
    let answer = send(&http1_client(), spoofing_request(&proxy.url("bare", "/x"))).await;
    assert_eq!(answer.status, 200, "the request should be forwarded");
    assert!(
        answer.headers.get("via").is_none(),
        "no Via hop should be added to the response: {:?}",
        answer.headers
    );

    let seen = backend.last_headers();
    for (name, sent) in [
        ("x-forwarded-for", "6.6.6.6"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-port", "443"),
        ("forwarded", "for=6.6.6.6"),
    ] {
        assert_eq!(
            header_values(&seen, name),
            [sent],
            "{name} should pass through exactly as the client sent it"
        );
    }
    assert!(
        seen.get("via").is_none(),
        "no Via hop should be added to the request"
    );

    // Without client fields, the backend sees none at all.
    assert_eq!(get(&proxy.url("bare", "/y")).await.status, 200);
    let seen = backend.last_headers();
    for name in [
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "forwarded",
        "via",
    ] {
        assert!(
            seen.get(name).is_none(),
            "{name} should not be added: {seen:?}"
        );
    }
}

#[tokio::test]
async fn add_headers_subset_replaces_only_the_families_it_names() {
    let backend = Backend::text("ok").await;
    let proxy = TestProxy::start(&policy(
        "xff-only",
        &[("app", backend.addr)],
        "  forwarding: {addHeaders: [XForwarded]}\n",
    ))
    .await;
    let port = proxy.addr("xff-only").port();
    let answer = send(
        &http1_client(),
        spoofing_request(&proxy.url("xff-only", "/x")),
    )
    .await;
    assert_eq!(answer.status, 200, "the request should be forwarded");
    assert!(
        answer.headers.get("via").is_none(),
        "Via is not in the list"
    );

    let seen = backend.last_headers();
    assert_eq!(
        header_values(&seen, "x-forwarded-for"),
        ["127.0.0.1"],
        "the X-Forwarded family is added, so the untrusted client's value is replaced"
    );
    assert_eq!(
        header(&seen, "x-forwarded-port"),
        Some(port.to_string().as_str())
    );
    assert_eq!(
        header_values(&seen, "forwarded"),
        ["for=6.6.6.6"],
        "Forwarded is not in the list, so it passes through as sent"
    );
    assert!(seen.get("via").is_none(), "Via is not in the list");

    // A trusted peer with only Via and Forwarded added: its X-Forwarded-For is not extended.
    let backend = Backend::text("ok").await;
    let proxy = TestProxy::start(&policy(
        "via-fwd",
        &[("app", backend.addr)],
        "  forwarding: {trustedProxies: [\"127.0.0.1/32\"], addHeaders: [Via, Forwarded]}\n",
    ))
    .await;
    let authority = proxy.addr("via-fwd").to_string();
    let answer = send(
        &http1_client(),
        spoofing_request(&proxy.url("via-fwd", "/x")),
    )
    .await;
    assert_eq!(header_values(&answer.headers, "via"), ["1.1 breakwater"]);
    let seen = backend.last_headers();
    assert_eq!(header_values(&seen, "x-forwarded-for"), ["6.6.6.6"]);
    assert_eq!(
        header_values(&seen, "forwarded"),
        [format!(
            "for=6.6.6.6, for=127.0.0.1;host=\"{authority}\";proto=http"
        )]
    );
    assert_eq!(header_values(&seen, "via"), ["1.1 breakwater"]);
}

#[tokio::test]
async fn hop_by_hop_request_headers_never_reach_the_backend() {
    let backend = Backend::text("ok").await;
    let proxy = TestProxy::start(&policy("hop", &[("app", backend.addr)], "")).await;
    let raw = raw_exchange(
        proxy.addr("hop"),
        b"GET /hop HTTP/1.1\r\nHost: hop.example\r\n\
          Connection: close, x-secret\r\nConnection: X-Other\r\n\
          X-Secret: 1\r\nX-Other: 2\r\n\
          Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: gzip\r\n\
          Proxy-Authorization: Basic Zm9vOmJhcg==\r\nX-Kept: yes\r\n\r\n",
        RAW_WAIT,
    )
    .await;
    assert_eq!(
        statuses(&raw),
        [200],
        "the request should be forwarded once:\n{raw}"
    );
    let seen = backend.last_headers();
    for name in [
        "x-secret",
        "x-other",
        "keep-alive",
        "proxy-connection",
        "te",
        "proxy-authorization",
    ] {
        assert!(
            !seen.contains_key(name),
            "hop-by-hop header {name} should not reach the backend: {seen:?}"
        );
    }
    let connection = header_values(&seen, "connection")
        .join(",")
        .to_ascii_lowercase();
    assert!(
        !connection.contains("x-secret") && !connection.contains("x-other"),
        "the client's Connection tokens should not reach the backend, got {connection:?}"
    );
    assert_eq!(
        header(&seen, "x-kept"),
        Some("yes"),
        "end-to-end headers should be forwarded"
    );
}

/// A raw backend that answers every request with exactly `response` (so hop-by-hop headers
/// are on the wire as written, whatever an HTTP library would do with them).
async fn raw_backend(response: &'static [u8]) -> (std::net::SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind raw backend");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // One response per complete request head (these requests have no body).
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        if stream.write_all(response).await.is_err() {
                            return;
                        }
                    }
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn hop_by_hop_response_headers_never_reach_the_client() {
    let (addr, task) = raw_backend(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: x-internal\r\nX-Internal: 1\r\n\
          Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nX-Visible: yes\r\n\r\nok",
    )
    .await;
    let proxy = TestProxy::start(&policy("hop-resp", &[("app", addr)], "")).await;
    let answer = get(&proxy.url("hop-resp", "/x")).await;
    task.abort();
    assert_eq!(
        answer.status, 200,
        "the backend's response should be relayed"
    );
    assert_eq!(answer.text(), "ok");
    for name in ["x-internal", "keep-alive", "proxy-authenticate"] {
        assert!(
            !answer.headers.contains_key(name),
            "hop-by-hop response header {name} should not reach the client: {:?}",
            answer.headers
        );
    }
    let connection = header_values(&answer.headers, "connection").join(",");
    assert!(
        !connection.contains("x-internal"),
        "the backend's Connection tokens should not reach the client, got {connection:?}"
    );
    assert_eq!(
        header(&answer.headers, "x-visible"),
        Some("yes"),
        "end-to-end response headers should be relayed"
    );
}

/// The common case, where `Connection` names no field: the proxy's own HTTP/1.1 client leaves
/// hop-by-hop fields out while it parses, and still frames the body by them.
#[tokio::test]
async fn hop_by_hop_response_headers_are_dropped_when_connection_names_no_field() {
    let (addr, task) = raw_backend(
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\
          Proxy-Connection: keep-alive\r\nProxy-Authenticate: Basic\r\nTrailer: x-sum\r\n\
          Transfer-Encoding: chunked\r\nUpgrade: h2c\r\nTE: trailers\r\nX-Visible: yes\r\n\r\n\
          2\r\nok\r\n1\r\n!\r\n0\r\n\r\n",
    )
    .await;
    let proxy = TestProxy::start(&policy("hop-plain", &[("app", addr)], "")).await;
    // Twice: the second answer comes over the pooled connection the chunked body ended cleanly on.
    for round in 0..2 {
        let answer = get(&proxy.url("hop-plain", "/x")).await;
        assert_eq!(
            answer.status, 200,
            "round {round}: the response should be relayed"
        );
        assert_eq!(
            answer.text(),
            "ok!",
            "round {round}: the chunked body, decoded"
        );
        for name in [
            "keep-alive",
            "proxy-connection",
            "proxy-authenticate",
            "trailer",
            "upgrade",
            "te",
        ] {
            assert!(
                !answer.headers.contains_key(name),
                "round {round}: hop-by-hop response header {name} reached the client: {:?}",
                answer.headers
            );
        }
        let connection = header_values(&answer.headers, "connection").join(",");
        assert!(
            !connection.contains("keep-alive"),
            "round {round}: the backend's Connection field reached the client: {connection:?}"
        );
        assert_eq!(header(&answer.headers, "x-visible"), Some("yes"));
    }
    task.abort();
}

/// The fields of a response nothing needs to read are passed on as the backend spelled them,
/// in its order, with the proxy's own framing, `Via` and no second `Date`; a policy that
/// removes response fields still has them removed.
#[tokio::test]
async fn response_fields_reach_the_client_as_the_backend_wrote_them() {
    let (addr, task) = raw_backend(
        b"HTTP/1.1 200 OK\r\nServer: raw/1\r\nCONNECTION: keep-alive\r\n\
          DATE: Mon, 01 Jan 2001 00:00:00 GMT\r\nKeep-Alive: timeout=5\r\n\
          Content-Length: 2\r\nX-Mixed-Case: A b\r\nset-cookie: a=1\r\nSet-Cookie: b=2\r\n\r\nok",
    )
    .await;
    let extra = "  forwarding:\n    removeResponseHeaders: [x-mixed-case]\n";
    let passed = TestProxy::start(&policy("as-written", &[("app", addr)], "")).await;
    let removed = TestProxy::start(&policy("removing", &[("app", addr)], extra)).await;
    let request = b"GET /x HTTP/1.1\r\nHost: example\r\nConnection: close\r\n\r\n";
    let raw = raw_exchange(passed.addr("as-written"), request, RAW_WAIT).await;
    let stripped_raw = raw_exchange(removed.addr("removing"), request, RAW_WAIT).await;
    task.abort();

    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete response");
    assert_eq!(body, "ok", "{raw}");
    let lines: Vec<&str> = head.split("\r\n").collect();
    assert_eq!(lines[0], "HTTP/1.1 200 OK", "{raw}");
    assert_eq!(
        lines[1..5],
        [
            "Server: raw/1",
            "DATE: Mon, 01 Jan 2001 00:00:00 GMT",
            "X-Mixed-Case: A b",
            "set-cookie: a=1",
        ],
        "end-to-end fields as the backend wrote them: {raw}"
    );
    assert_eq!(lines[5], "Set-Cookie: b=2", "{raw}");
    let named = |name: &str| {
        lines[1..]
            .iter()
            .filter(|l| {
                l.split_once(':')
                    .is_some_and(|(n, _)| n.eq_ignore_ascii_case(name))
            })
            .count()
    };
    assert_eq!(named("date"), 1, "the backend's Date only: {raw}");
    assert_eq!(named("content-length"), 1, "{raw}");
    assert!(lines.contains(&"content-length: 2"), "{raw}");
    assert_eq!(named("keep-alive"), 0, "hop-by-hop field relayed: {raw}");
    assert!(lines.contains(&"via: 1.1 breakwater"), "{raw}");
    assert!(
        lines.contains(&"connection: close"),
        "the proxy's own Connection only: {raw}"
    );
    assert_eq!(named("connection"), 1, "{raw}");

    let (head, body) = stripped_raw
        .split_once("\r\n\r\n")
        .expect("a complete response");
    assert_eq!(body, "ok", "{stripped_raw}");
    assert!(
        !head.to_ascii_lowercase().contains("x-mixed-case"),
        "removeResponseHeaders still applies: {stripped_raw}"
    );
    assert!(
        head.to_ascii_lowercase().contains("server: raw/1"),
        "{stripped_raw}"
    );
}

#[tokio::test]
async fn configured_header_removals_apply_in_both_directions() {
    let handler: Handler = Arc::new(|_req: Request<Incoming>| {
        Box::pin(async {
            let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
            let headers = response.headers_mut();
            headers.insert("server", "leaky/1.0".parse().expect("value"));
            headers.insert("x-powered-by", "php".parse().expect("value"));
            headers.insert("x-kept-response", "yes".parse().expect("value"));
            response
        })
    });
    let backend = Backend::start(handler).await;
    let proxy = TestProxy::start(&policy(
        "removals",
        &[("app", backend.addr)],
        "  forwarding:\n    removeRequestHeaders: [X-Remove-Me, cookie]\n    removeResponseHeaders: [Server, x-powered-by]\n",
    ))
    .await;
    let request = Request::get(proxy.url("removals", "/x"))
        .header("x-remove-me", "secret")
        .header("cookie", "session=1")
        .header("x-kept-request", "yes")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let answer = send(&http1_client(), request).await;
    assert_eq!(answer.status, 200, "the request should be forwarded");

    let seen = backend.last_headers();
    for name in ["x-remove-me", "cookie"] {
        assert!(
            !seen.contains_key(name),
            "removeRequestHeaders should remove {name} (names match case-insensitively): {seen:?}"
        );
    }
    assert_eq!(
        header(&seen, "x-kept-request"),
        Some("yes"),
        "other request headers kept"
    );
    for name in ["server", "x-powered-by"] {
        assert!(
            !answer.headers.contains_key(name),
            "removeResponseHeaders should remove {name}: {:?}",
            answer.headers
        );
    }
    assert_eq!(
        header(&answer.headers, "x-kept-response"),
        Some("yes"),
        "other response headers kept"
    );
}

/// Sends `request` raw to a fresh proxy and asserts one `400` answer with nothing forwarded.
async fn assert_rejected_before_forwarding(name: &str, request: &[u8], why: &str) {
    let (backend, paths) = path_recording_backend().await;
    let proxy = TestProxy::start(&policy(name, &[("app", backend.addr)], "")).await;
    let raw = raw_exchange(proxy.addr(name), request, RAW_WAIT).await;
    assert_eq!(
        statuses(&raw),
        [400],
        "{why}: expected exactly one 400 response, got:\n{raw}"
    );
    assert_eq!(
        backend.hits(),
        0,
        "{why}: nothing should reach the backend, it saw {:?}",
        paths.lock().unwrap()
    );
}

#[tokio::test]
async fn content_length_with_chunked_is_rejected() {
    assert_rejected_before_forwarding(
        "cl-te",
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "Content-Length together with Transfer-Encoding: chunked",
    )
    .await;
}

#[tokio::test]
async fn duplicate_host_is_rejected() {
    assert_rejected_before_forwarding(
        "two-hosts",
        b"GET /x HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
        "two Host headers",
    )
    .await;
}

#[tokio::test]
async fn missing_host_on_http11_is_rejected() {
    assert_rejected_before_forwarding(
        "no-host",
        b"GET /x HTTP/1.1\r\nUser-Agent: raw\r\n\r\n",
        "HTTP/1.1 request without Host",
    )
    .await;
}

#[tokio::test]
async fn duplicate_content_length_is_rejected() {
    assert_rejected_before_forwarding(
        "two-cl-same",
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        "two equal Content-Length headers",
    )
    .await;
    assert_rejected_before_forwarding(
        "two-cl-differ",
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        "two different Content-Length headers",
    )
    .await;
}

#[tokio::test]
async fn pipelined_requests_are_each_forwarded_once() {
    // The baseline for the smuggling tests below: two honest pipelined requests, two responses,
    // two backend requests.
    let (backend, paths) = path_recording_backend().await;
    let proxy = TestProxy::start(&policy("pipeline", &[("app", backend.addr)], "")).await;
    let raw = raw_exchange(
        proxy.addr("pipeline"),
        b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        RAW_WAIT,
    )
    .await;
    assert_eq!(
        statuses(&raw),
        [200, 200],
        "two pipelined requests, two answers:\n{raw}"
    );
    assert_eq!(
        *paths.lock().unwrap(),
        ["/one", "/two"],
        "the backend should see each pipelined request exactly once, in order"
    );
}

#[tokio::test]
async fn request_smuggled_behind_cl_te_is_never_forwarded() {
    // CL.TE: a reader trusting Content-Length (40) sees one request whose body hides
    // `GET /smuggled`; a reader trusting chunked sees an empty body and then a second request.
    // The proxy must reject the ambiguous request and close, so `/smuggled` goes nowhere.
    let (backend, paths) = path_recording_backend().await;
    let proxy = TestProxy::start(&policy("smuggle", &[("app", backend.addr)], "")).await;
    let raw = raw_exchange(
        proxy.addr("smuggle"),
        b"POST /first HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n\
          0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        RAW_WAIT,
    )
    .await;
    assert_eq!(
        statuses(&raw),
        [400],
        "the ambiguous request should get one 400 and the connection should close:\n{raw}"
    );
    assert!(
        raw.to_ascii_lowercase().contains("connection: close"),
        "the 400 should announce the close:\n{raw}"
    );
    assert!(
        paths.lock().unwrap().is_empty(),
        "neither the ambiguous nor the smuggled request should reach the backend, it saw {:?}",
        paths.lock().unwrap()
    );
}

/// Sends an honest `GET /first` and, pipelined behind it in the same write, `second`; asserts
/// the first is answered 200, the second 400, and only `/first` reaches the backend.
async fn assert_pipelined_second_rejected(name: &str, second: &[u8], why: &str) {
    let (backend, paths) = path_recording_backend().await;
    let proxy = TestProxy::start(&policy(name, &[("app", backend.addr)], "")).await;
    let mut bytes = b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    bytes.extend_from_slice(second);
    let raw = raw_exchange(proxy.addr(name), &bytes, RAW_WAIT).await;
    assert_eq!(
        *paths.lock().unwrap(),
        ["/first"],
        "{why}: only the first, well-framed request should reach the backend; client got:\n{raw}"
    );
    assert_eq!(
        statuses(&raw),
        [200, 400],
        "{why}: the first request should be answered 200 and the second 400:\n{raw}"
    );
}

#[tokio::test]
async fn cl_te_on_a_pipelined_second_request_is_rejected() {
    // The framing checks must hold for every request on a connection, including one that
    // arrives in the same TCP segment as the request before it.
    assert_pipelined_second_rejected(
        "pipe-cl-te",
        b"POST /ambiguous HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n\
          0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        "pipelined CL+TE",
    )
    .await;
}

#[tokio::test]
async fn duplicate_content_length_on_a_pipelined_second_request_is_rejected() {
    assert_pipelined_second_rejected(
        "pipe-two-cl",
        b"POST /ambiguous HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
        "pipelined duplicate Content-Length",
    )
    .await;
}

#[tokio::test]
async fn cl_te_on_a_later_keep_alive_request_is_rejected() {
    // Same connection, but the second request is written only after the first was answered.
    let (backend, paths) = path_recording_backend().await;
    let proxy = TestProxy::start(&policy("ka-cl-te", &[("app", backend.addr)], "")).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr("ka-cl-te"))
        .await
        .expect("connect");
    stream
        .write_all(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let first = support::read_response(&mut stream, RAW_WAIT).await;
    assert_eq!(
        statuses(&first),
        [200],
        "the first request should be answered:\n{first}"
    );
    stream
        .write_all(
            b"POST /ambiguous HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        )
        .await
        .expect("write");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(RAW_WAIT, stream.read_to_end(&mut rest)).await;
    let rest = String::from_utf8_lossy(&rest);
    assert_eq!(
        statuses(&rest),
        [400],
        "the ambiguous keep-alive request should get 400:\n{rest}"
    );
    assert_eq!(
        *paths.lock().unwrap(),
        ["/first"],
        "only the first request should reach the backend"
    );
}
