//! The simplest end-to-end path: a client, the proxy from a real policy file, a backend.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::{Backend, TestProxy, get, policy};

#[tokio::test]
async fn forwards_a_get_and_reports_it() {
    let backend = Backend::text("hello").await;
    let proxy = TestProxy::start(&policy("smoke", &[("app", backend.addr)], "")).await;
    let answer = get(&proxy.url("smoke", "/x")).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.text(), "hello");
    assert_eq!(backend.hits(), 1);
    let metrics = get(&proxy.admin_url("/metrics")).await.text();
    assert!(
        metrics.contains(
            "proxy_requests_total{backend=\"app\",code=\"200\",policy=\"default/smoke\"} 1"
        ),
        "metrics should count the request:\n{metrics}"
    );
}

#[tokio::test]
async fn upstream_connections_are_reused() {
    let backend = Backend::text("pooled").await;
    let proxy = TestProxy::start(&policy("reuse", &[("app", backend.addr)], "")).await;
    let client = support::http1_client();
    for _ in 0..20 {
        let answer = support::send(
            &client,
            http::Request::get(proxy.url("reuse", "/"))
                .body(http_body_util::Full::default())
                .unwrap(),
        )
        .await;
        assert_eq!(answer.text(), "pooled");
    }
    // Bodies of known length end with their last data frame; the connection must still go
    // back to the pool rather than being closed after each response.
    let opened = backend
        .connections
        .load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(backend.hits(), 20);
    assert_eq!(
        opened, 1,
        "20 sequential requests should share one upstream connection"
    );
}

#[tokio::test]
async fn http1_upstream_requests_use_the_origin_form_target() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A raw backend that records the request line exactly as it arrives.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<String>();
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = stream.read(&mut buf).await.unwrap();
        let head = String::from_utf8_lossy(&buf[..n]).into_owned();
        let _ = tx.send(head.lines().next().unwrap_or_default().to_owned());
        stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .unwrap();
    });
    let proxy = TestProxy::start(&policy("origin", &[("raw", addr)], "")).await;
    let answer = get(&proxy.url("origin", "/some/path?q=1")).await;
    assert_eq!(answer.status, 200);
    let request_line = rx.await.unwrap();
    assert_eq!(
        request_line, "GET /some/path?q=1 HTTP/1.1",
        "backends must see the origin form, never an absolute URL"
    );
    server.await.unwrap();
}
