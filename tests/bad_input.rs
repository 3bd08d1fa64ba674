//! Malformed client input gets the right 4xx and never reaches a backend as something else.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::{Backend, TestProxy, policy, raw_exchange};

async fn proxy_and_backend(name: &str) -> (TestProxy, Backend) {
    let backend = Backend::text("ok").await;
    let proxy = TestProxy::start(&policy(name, &[("app", backend.addr)], "")).await;
    (proxy, backend)
}

#[tokio::test]
async fn malformed_chunked_body_is_a_400_not_a_502() {
    let (proxy, _backend) = proxy_and_backend("chunks").await;
    let answer = raw_exchange(
        proxy.addr("chunks"),
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 400"),
        "a bad chunk size is the client's fault: {answer}"
    );
    assert!(
        answer.contains("x-breakwater-error: client_body"),
        "the cause header names the client body: {answer}"
    );
}

#[tokio::test]
async fn header_block_over_the_limit_is_431_and_long_uri_is_414() {
    let (proxy, backend) = proxy_and_backend("limits").await;
    let big_header = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let answer = raw_exchange(
        proxy.addr("limits"),
        big_header.as_bytes(),
        Duration::from_secs(3),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "64Ki header limit: {answer}"
    );

    let mut many = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
    for i in 0..120 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let answer = raw_exchange(
        proxy.addr("limits"),
        many.as_bytes(),
        Duration::from_secs(3),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "more than 100 headers: {answer}"
    );

    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "u".repeat(9 * 1024));
    let answer = raw_exchange(
        proxy.addr("limits"),
        long_uri.as_bytes(),
        Duration::from_secs(3),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 414"),
        "URI over 8 KiB: {answer}"
    );
    assert_eq!(backend.hits(), 0, "rejected heads never reach the backend");
}

#[tokio::test]
async fn random_bytes_never_panic_or_reach_the_backend() {
    let (proxy, backend) = proxy_and_backend("noise").await;
    // A fixed-seed generator keeps the test reproducible.
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..50 {
        let mut junk = Vec::with_capacity(256);
        for _ in 0..256 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            junk.push((state & 0xff) as u8);
        }
        let answer = raw_exchange(proxy.addr("noise"), &junk, Duration::from_millis(500)).await;
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
            "garbage gets a 4xx or a closed connection: {answer:?}"
        );
    }
    assert_eq!(backend.hits(), 0);
    // The proxy still serves after all that.
    let ok = support::get(&proxy.url("noise", "/")).await;
    assert_eq!(ok.status, 200);
}
