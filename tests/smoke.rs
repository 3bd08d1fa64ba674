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
