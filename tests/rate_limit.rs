//! Rate limits end to end: per-client keys, 429 answers with their headers, dry run, trusted
//! forwarding chains, sliding windows.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::{Answer, Backend, TestProxy, http1_client, policy, send};

async fn get_with(url: &str, headers: &[(&str, &str)]) -> Answer {
    let mut req = Request::get(url);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    send(&http1_client(), req.body(Full::new(Bytes::new())).unwrap()).await
}

#[tokio::test]
async fn per_client_token_bucket_keyed_on_a_header() {
    let backend = Backend::text("ok").await;
    let extra = "  rateLimit:\n    perClient: {requestsPerSecond: 5, burst: 10, key: {header: X-Api-Key}}\n";
    let proxy = TestProxy::start(&policy("rl", &[("app", backend.addr)], extra)).await;
    let url = proxy.url("rl", "/");

    let mut allowed = 0;
    let mut refused = Vec::new();
    for _ in 0..30 {
        let answer = get_with(&url, &[("x-api-key", "alice")]).await;
        match answer.status {
            200 => allowed += 1,
            429 => refused.push(answer),
            other => panic!("only 200 or 429 expected, got {other}"),
        }
    }
    assert!(
        (10..=12).contains(&allowed),
        "burst 10 (+ refill while sending): {allowed} allowed"
    );
    let first = &refused[0];
    let retry_after: u64 = first.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1, "Retry-After in whole seconds, at least 1");
    assert!(
        first.headers["ratelimit-policy"]
            .to_str()
            .unwrap()
            .contains("q=10"),
        "RateLimit-Policy names the quota: {:?}",
        first.headers
    );
    assert!(
        first.headers["ratelimit"].to_str().unwrap().contains("r=0"),
        "no requests remain"
    );
    assert_eq!(first.headers["x-breakwater-error"], "rate_limited");

    let other = get_with(&url, &[("x-api-key", "bob")]).await;
    assert_eq!(other.status, 200, "another key has its own bucket");

    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = get_with(&url, &[("x-api-key", "alice")]).await;
    assert_eq!(
        later.status, 200,
        "two seconds later the key is served again"
    );

    let metrics = support::get(&proxy.admin_url("/metrics")).await.text();
    let rejected = support::metric_value(
        &metrics,
        "rate_limit_rejected_total{policy=\"default/rl\",scope=\"per_client\"}",
    );
    assert_eq!(
        rejected,
        Some(refused.len() as f64),
        "every 429 is counted:\n{metrics}"
    );
}

#[tokio::test]
async fn dry_run_counts_but_never_rejects() {
    let backend = Backend::text("ok").await;
    let extra = "  rateLimit:\n    global: {requestsPerSecond: 1, burst: 2}\n    dryRun: true\n";
    let proxy = TestProxy::start(&policy("dry", &[("app", backend.addr)], extra)).await;
    for _ in 0..6 {
        assert_eq!(support::get(&proxy.url("dry", "/")).await.status, 200);
    }
    let metrics = support::get(&proxy.admin_url("/metrics")).await.text();
    let counted = support::metric_value(
        &metrics,
        "rate_limit_rejected_total{policy=\"default/dry\",scope=\"global\"}",
    );
    assert_eq!(
        counted,
        Some(4.0),
        "4 of 6 would have been refused:\n{metrics}"
    );
    assert_eq!(backend.hits(), 6);
}

#[tokio::test]
async fn clients_behind_a_trusted_proxy_are_told_apart() {
    let backend = Backend::text("ok").await;
    let extra = "  forwarding: {trustedProxies: [\"127.0.0.1/32\"]}\n  rateLimit:\n    perClient: {requestsPerSecond: 0.1, burst: 1}\n";
    let proxy = TestProxy::start(&policy("xff", &[("app", backend.addr)], extra)).await;
    let url = proxy.url("xff", "/");
    assert_eq!(
        get_with(&url, &[("x-forwarded-for", "203.0.113.1")])
            .await
            .status,
        200
    );
    assert_eq!(
        get_with(&url, &[("x-forwarded-for", "203.0.113.1")])
            .await
            .status,
        429
    );
    assert_eq!(
        get_with(&url, &[("x-forwarded-for", "203.0.113.2")])
            .await
            .status,
        200,
        "a different client behind the same trusted proxy has its own bucket"
    );
}

#[tokio::test]
async fn sliding_window_admits_at_most_the_limit_per_window() {
    let backend = Backend::text("ok").await;
    let extra = "  rateLimit:\n    algorithm: SlidingWindow\n    global: {requestsPerSecond: 3, burst: 3}\n";
    let proxy = TestProxy::start(&policy("sw", &[("app", backend.addr)], extra)).await;
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..5 {
            v.push(support::get(&proxy.url("sw", "/")).await.status);
        }
        v
    };
    assert_eq!(statuses, vec![200, 200, 200, 429, 429], "3 per 1 s window");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        support::get(&proxy.url("sw", "/")).await.status,
        200,
        "the window slid on"
    );
}
