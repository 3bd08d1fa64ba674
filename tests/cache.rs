//! The response cache end to end: hits that never reach the backend, what is never stored,
//! `Vary`, coalesced misses, revalidation, invalidation, stale-if-error and the metrics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use support::{
    Answer, Backend, KillableBackend, TestProxy, get, http1_client, metric_value, policy, send,
};

/// A backend whose answers depend on the path; every body carries a serial number, so a body
/// seen twice was served from the cache.
fn origin() -> support::Handler {
    let serial = Arc::new(AtomicUsize::new(0));
    Arc::new(move |req: Request<Incoming>| {
        let n = serial.fetch_add(1, Ordering::SeqCst) + 1;
        let path = req.uri().path().to_owned();
        let accept_encoding = req
            .headers()
            .get("accept-encoding")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let if_none_match = req.headers().get("if-none-match").cloned();
        Box::pin(async move {
            let mut builder = Response::builder();
            let cache_control = match path.as_str() {
                "/no-store" => "no-store",
                "/private" => "private, max-age=60",
                "/short" => "max-age=1",
                "/etag" => "no-cache",
                _ => "max-age=60",
            };
            builder = builder.header("cache-control", cache_control);
            match path.as_str() {
                "/cookie" => builder = builder.header("set-cookie", "session=1"),
                "/vary" => builder = builder.header("vary", "Accept-Encoding"),
                "/etag" => {
                    builder = builder.header("etag", "\"v1\"");
                    if if_none_match.is_some_and(|v| v == "\"v1\"") {
                        return builder
                            .status(StatusCode::NOT_MODIFIED)
                            .body(Full::new(Bytes::new()))
                            .unwrap();
                    }
                }
                "/slow" => tokio::time::sleep(Duration::from_millis(300)).await,
                _ => {}
            }
            let body = format!("{path} #{n} {accept_encoding}");
            builder.body(Full::new(Bytes::from(body))).unwrap()
        })
    })
}

/// Request header fields to add.
type Headers<'a> = &'a [(&'a str, &'a str)];

const CACHE: &str = "  cache: {enabled: true}\n";

async fn request(method: &str, url: &str, headers: &[(&str, &str)]) -> Answer {
    let mut req = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    send(&http1_client(), req.body(Full::new(Bytes::new())).unwrap()).await
}

fn x_cache(answer: &Answer) -> &str {
    answer
        .headers
        .get("x-cache")
        .map_or("<none>", |v| v.to_str().unwrap())
}

#[tokio::test]
async fn a_fresh_response_is_served_from_the_cache_without_the_backend() {
    let backend = Backend::start(origin()).await;
    let proxy = TestProxy::start(&policy("c", &[("app", backend.addr)], CACHE)).await;
    let url = proxy.url("c", "/page?x=1");

    let first = get(&url).await;
    assert_eq!(
        (first.status, x_cache(&first)),
        (200, "MISS"),
        "the first GET goes to the backend"
    );
    let second = get(&url).await;
    assert_eq!(
        (second.status, x_cache(&second)),
        (200, "HIT"),
        "the second GET of a max-age=60 response is a hit"
    );
    assert_eq!(second.body, first.body, "a hit serves the stored body");
    assert!(
        second.headers.contains_key("age"),
        "hits carry Age: {:?}",
        second.headers
    );
    assert_eq!(backend.hits(), 1, "the hit never reached the backend");

    let head = request("HEAD", &url, &[]).await;
    assert_eq!(
        (head.status, x_cache(&head)),
        (200, "HIT"),
        "HEAD is answered from the GET"
    );
    assert!(head.body.is_empty(), "no body for HEAD");
    assert_eq!(backend.hits(), 1);

    let other_query = get(&proxy.url("c", "/page?x=2")).await;
    assert_eq!(
        x_cache(&other_query),
        "MISS",
        "the query is part of the key"
    );

    let conditional = request("GET", &url, &[("if-none-match", "*")]).await;
    assert_eq!(
        conditional.status, 304,
        "a matching client validator gets 304"
    );
    assert_eq!(backend.hits(), 2);

    let metrics = get(&proxy.admin_url("/metrics")).await.text();
    assert_eq!(
        metric_value(&metrics, "cache_hits_total{policy=\"default/c\"}"),
        Some(3.0),
        "GET, HEAD and the 304 were hits:\n{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, "cache_misses_total{policy=\"default/c\"}"),
        Some(2.0),
    );
}

#[tokio::test]
async fn private_and_uncacheable_responses_are_never_served_from_the_cache() {
    let backend = Backend::start(origin()).await;
    let proxy = TestProxy::start(&policy("c", &[("app", backend.addr)], CACHE)).await;
    let cases: [(&str, &str, Headers); 5] = [
        ("no-store response", "/no-store", &[]),
        ("private response", "/private", &[]),
        ("Set-Cookie response", "/cookie", &[]),
        (
            "request with Authorization",
            "/authorized",
            &[("authorization", "Bearer secret")],
        ),
        (
            "request no-store",
            "/request-no-store",
            &[("cache-control", "no-store")],
        ),
    ];
    for (what, path, headers) in cases {
        let before = backend.hits();
        let first = request("GET", &proxy.url("c", path), headers).await;
        let second = request("GET", &proxy.url("c", path), headers).await;
        assert_eq!(
            (first.status, second.status),
            (200, 200),
            "{what}: both answered"
        );
        assert_eq!(
            backend.hits() - before,
            2,
            "{what}: both requests reach the backend"
        );
        assert_ne!(first.body, second.body, "{what}: never the stored body");
        assert_eq!(x_cache(&second), "MISS", "{what}");
    }

    // POST is never answered from the cache, even for a URL with a fresh entry.
    let url = proxy.url("c", "/posted");
    assert_eq!(x_cache(&get(&url).await), "MISS");
    let before = backend.hits();
    let posted = request("POST", &url, &[]).await;
    assert_eq!(posted.status, 200);
    assert_eq!(backend.hits() - before, 1, "POST reaches the backend");
    assert!(
        !posted.headers.contains_key("x-cache"),
        "POST is not a cache lookup"
    );
    // ... and it invalidates the URL's stored response.
    let after = get(&url).await;
    assert_eq!(
        x_cache(&after),
        "MISS",
        "a successful POST invalidates the URL"
    );
}

#[tokio::test]
async fn vary_keeps_one_variant_per_request_value() {
    let backend = Backend::start(origin()).await;
    let proxy = TestProxy::start(&policy("c", &[("app", backend.addr)], CACHE)).await;
    let url = proxy.url("c", "/vary");
    let gzip = request("GET", &url, &[("accept-encoding", "gzip")]).await;
    let br = request("GET", &url, &[("accept-encoding", "br")]).await;
    assert_eq!((x_cache(&gzip), x_cache(&br)), ("MISS", "MISS"));
    let gzip_again = request("GET", &url, &[("accept-encoding", "gzip")]).await;
    let br_again = request("GET", &url, &[("accept-encoding", "br")]).await;
    assert_eq!(
        (x_cache(&gzip_again), x_cache(&br_again)),
        ("HIT", "HIT"),
        "both variants are kept"
    );
    assert_eq!(gzip_again.body, gzip.body);
    assert_eq!(br_again.body, br.body);
    assert!(gzip.text().ends_with("gzip") && br.text().ends_with("br"));
    assert_eq!(backend.hits(), 2, "one backend request per variant");
}

#[tokio::test]
async fn concurrent_identical_misses_make_one_backend_request() {
    let backend = Backend::start(origin()).await;
    let proxy = TestProxy::start(&policy("c", &[("app", backend.addr)], CACHE)).await;
    let url = proxy.url("c", "/slow");
    let client = http1_client();
    let requests = (0..100).map(|_| {
        let client = client.clone();
        let url = url.clone();
        tokio::spawn(async move {
            send(
                &client,
                Request::get(url).body(Full::new(Bytes::new())).unwrap(),
            )
            .await
        })
    });
    let answers = futures_util::future::join_all(requests).await;
    let mut bodies = std::collections::HashSet::new();
    for answer in answers {
        let answer = answer.expect("request task");
        assert_eq!(answer.status, 200);
        bodies.insert(answer.body);
    }
    assert_eq!(
        backend.hits(),
        1,
        "100 concurrent misses → 1 backend request"
    );
    assert_eq!(bodies.len(), 1, "everyone got the one response");
    let metrics = get(&proxy.admin_url("/metrics")).await.text();
    let coalesced =
        metric_value(&metrics, "cache_coalesced_total{policy=\"default/c\"}").unwrap_or(0.0);
    assert!(
        coalesced >= 1.0,
        "the waiting requests are counted as coalesced:\n{metrics}"
    );
}

#[tokio::test]
async fn no_cache_responses_are_revalidated_with_their_etag() {
    let backend = Backend::start(origin()).await;
    let proxy = TestProxy::start(&policy("c", &[("app", backend.addr)], CACHE)).await;
    let url = proxy.url("c", "/etag");
    let first = get(&url).await;
    assert_eq!(x_cache(&first), "MISS");
    let second = get(&url).await;
    assert_eq!(
        (second.status, x_cache(&second)),
        (200, "HIT"),
        "a 304 from the backend turns into the stored 200"
    );
    assert_eq!(second.body, first.body);
    assert_eq!(backend.hits(), 2, "every use is validated");
    assert_eq!(
        backend.last_headers()["if-none-match"],
        "\"v1\"",
        "the cache sent the stored validator"
    );
}

#[tokio::test]
async fn a_request_saying_no_cache_goes_to_the_backend() {
    let backend = Backend::start(origin()).await;
    let proxy = TestProxy::start(&policy("c", &[("app", backend.addr)], CACHE)).await;
    let url = proxy.url("c", "/page");
    get(&url).await;
    let reloaded = request("GET", &url, &[("cache-control", "no-cache")]).await;
    assert_eq!(x_cache(&reloaded), "MISS");
    assert_eq!(
        backend.hits(),
        2,
        "no-cache makes the cache ask the backend"
    );
    let after = get(&url).await;
    assert_eq!(x_cache(&after), "HIT");
    assert_eq!(
        after.body, reloaded.body,
        "the refetched response replaced the entry"
    );
}

#[tokio::test]
async fn stale_if_error_serves_the_expired_copy_while_the_backend_is_down() {
    let mut backend = KillableBackend::start(origin()).await;
    let extra = "  cache: {enabled: true, staleIfError: 60s}\n  retry: {maxAttempts: 1}\n";
    let proxy = TestProxy::start(&policy("c", &[("app", backend.addr)], extra)).await;
    let url = proxy.url("c", "/short");
    let first = get(&url).await;
    assert_eq!((first.status, x_cache(&first)), (200, "MISS"));
    backend.kill().await;
    // Let the max-age=1 entry expire (Age counts whole seconds).
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let stale = get(&url).await;
    assert_eq!(
        (stale.status, x_cache(&stale)),
        (200, "STALE"),
        "the backend is down: the expired copy stands in"
    );
    assert_eq!(stale.body, first.body);
    let metrics = get(&proxy.admin_url("/metrics")).await.text();
    assert_eq!(
        metric_value(&metrics, "cache_stale_served_total{policy=\"default/c\"}"),
        Some(1.0)
    );

    // Without stale-if-error the same outage is an error.
    let mut plain_backend = KillableBackend::start(origin()).await;
    let plain = TestProxy::start(&policy(
        "p",
        &[("app", plain_backend.addr)],
        "  cache: {enabled: true}\n  retry: {maxAttempts: 1}\n",
    ))
    .await;
    let url = plain.url("p", "/short");
    assert_eq!(get(&url).await.status, 200);
    plain_backend.kill().await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        get(&url).await.status,
        502,
        "no stale serving unless configured"
    );
}

#[tokio::test]
async fn entries_survive_a_reload_that_keeps_the_cache_settings() {
    let backend = Backend::start(origin()).await;
    let yaml = policy("c", &[("app", backend.addr)], CACHE);
    let proxy = TestProxy::start(&yaml).await;
    let url = proxy.url("c", "/page");
    get(&url).await;
    // Same cache settings, another timeout: a new snapshot with the same cache.
    let edited = yaml.clone() + "  timeouts: {request: 20s}\n";
    std::fs::write(&proxy.config_path, edited).unwrap();
    let reloaded = support::eventually(Duration::from_secs(5), || async {
        let config = get(&proxy.admin_url("/config")).await.text();
        config.contains("20s")
    })
    .await;
    assert!(
        reloaded,
        "the edit was applied: {}\n{}",
        get(&proxy.admin_url("/config")).await.text(),
        get(&proxy.admin_url("/metrics")).await.text()
    );
    let after = get(&url).await;
    assert_eq!(
        x_cache(&after),
        "HIT",
        "the stored response outlived the reload"
    );
    assert_eq!(backend.hits(), 1);
}
