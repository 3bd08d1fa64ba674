//! Resilience over real loopback backends: retries (bounded by attempts, idempotency and the
//! retry budget), circuit breakers (opening, the max-ejection cap, the fast all-down answer),
//! per-try timeouts steering to a fast endpoint, overload limits, and "nothing lost" when a
//! backend is killed mid-load (and, with health checks, restarted).
//!
//! Also two regressions: a half-open probe whose client disconnects must not leave the breaker
//! half-open for good, and `maxConcurrentRequests` counts a request until its response body has
//! ended (not just until its response head).

// Panicking on a broken fixture is how a test fails; clippy only exempts `#[test]` bodies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use support::{
    Answer, Backend, Handler, KillableBackend, TestProxy, eventually, get, http1_client,
    metric_sum, ok, policy, send, status,
};

/// Upper bound for any single wait in this file, so a regression fails instead of hanging.
const WAIT: Duration = Duration::from_secs(5);

fn get_request(url: &str) -> Request<Full<Bytes>> {
    Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("request")
}

fn post_request(
    url: &str,
    body: &'static str,
    idempotency_key: Option<&str>,
) -> Request<Full<Bytes>> {
    let mut builder = Request::post(url);
    if let Some(key) = idempotency_key {
        builder = builder.header("idempotency-key", key);
    }
    builder
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("request")
}

fn header<'a>(answer: &'a Answer, name: &str) -> Option<&'a str> {
    answer.headers.get(name).and_then(|v| v.to_str().ok())
}

use support::refusing_addr;

/// A backend that answers every request with `code`.
async fn always(code: u16) -> Backend {
    Backend::start(Arc::new(move |_req| {
        Box::pin(async move { status(code, "failing") })
    }))
    .await
}

/// A backend that answers 200 with the request body it received (so a replayed POST can be
/// seen to carry its body).
async fn echo() -> Backend {
    Backend::start(Arc::new(|req: Request<Incoming>| {
        Box::pin(async move {
            let body = req
                .into_body()
                .collect()
                .await
                .expect("request body")
                .to_bytes();
            http::Response::new(Full::new(body))
        })
    }))
    .await
}

/// The `/metrics` exposition.
async fn scrape(proxy: &TestProxy) -> String {
    let answer = get(&proxy.admin_url("/metrics")).await;
    assert_eq!(answer.status, 200, "/metrics should answer 200");
    answer.text()
}

/// The endpoints of the (only) policy in `/backends/health`.
async fn endpoint_reports(proxy: &TestProxy) -> Vec<Value> {
    let answer = get(&proxy.admin_url("/backends/health")).await;
    assert_eq!(answer.status, 200, "/backends/health should answer 200");
    let json: Value = serde_json::from_str(&answer.text()).expect("/backends/health is JSON");
    json["policies"][0]["endpoints"]
        .as_array()
        .expect("endpoints array")
        .clone()
}

/// The `/backends/health` entry for `addr`.
async fn endpoint_report(proxy: &TestProxy, addr: SocketAddr) -> Value {
    let address = addr.to_string();
    endpoint_reports(proxy)
        .await
        .into_iter()
        .find(|e| e["address"] == address.as_str())
        .unwrap_or_else(|| panic!("/backends/health should list endpoint {address}"))
}

/// `circuit_breaker_state` of the endpoint at `addr` (0 closed, 1 open, 2 half-open).
fn breaker_gauge(metrics: &str, policy: &str, addr: SocketAddr) -> f64 {
    let endpoint = addr.to_string();
    metric_sum(
        metrics,
        "circuit_breaker_state",
        &[
            ("policy", &format!("default/{policy}")),
            ("endpoint", &endpoint),
        ],
    )
}

/// Sums `family` over every series of policy `default/<policy>` that also carries `labels`.
fn policy_metric(metrics: &str, family: &str, policy: &str, labels: &[(&str, &str)]) -> f64 {
    let policy_label = format!("default/{policy}");
    let mut all = vec![("policy", policy_label.as_str())];
    all.extend_from_slice(labels);
    metric_sum(metrics, family, &all)
}

// ---------------------------------------------------------------------------------------------
// 1. Breakers plus retries keep a mixed set fully available.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_and_refusing_endpoints_are_routed_around_and_the_failing_one_ejected() {
    let failing = always(503).await;
    let refusing = refusing_addr();
    let healthy_a = Backend::text("a").await;
    let healthy_b = Backend::text("b").await;
    let proxy = TestProxy::start(&policy(
        "mixed",
        &[
            ("failing", failing.addr),
            ("refusing", refusing),
            ("a", healthy_a.addr),
            ("b", healthy_b.addr),
        ],
        "  retry: {}\n  circuitBreaker: {failureThreshold: 5, openTimeout: 30s}\n",
    ))
    .await;
    let url = proxy.url("mixed", "/x");
    let backend_hits = || failing.hits() + healthy_a.hits() + healthy_b.hits();
    let started = Instant::now();

    // Phase 1, sequential: until the failing endpoint's breaker is seen open (checked after
    // every request), so the hits it took before and after the transition can be told apart.
    let client = http1_client();
    let mut sent = 0usize;
    let mut open_at = None;
    while sent < 200 {
        let answer = send(&client, get_request(&url)).await;
        assert_eq!(
            answer.status,
            200,
            "request {sent} should succeed through retries, got {} {:?}",
            answer.status,
            answer.text()
        );
        sent += 1;
        if breaker_gauge(&scrape(&proxy).await, "mixed", failing.addr) == 1.0 {
            open_at = Some((failing.hits(), backend_hits()));
            break;
        }
    }
    let (failing_at_open, total_at_open) = open_at.unwrap_or_else(|| {
        panic!("the always-503 endpoint's breaker should open within {sent} requests")
    });

    // Phase 2: the rest of the 1000 requests from 8 concurrent keep-alive clients.
    let remaining = 1000 - sent;
    let tasks: Vec<JoinHandle<Vec<u16>>> = (0..8)
        .map(|t| {
            let url = url.clone();
            let count = remaining / 8 + usize::from(t < remaining % 8);
            tokio::spawn(async move {
                let client = http1_client();
                let mut statuses = Vec::with_capacity(count);
                for _ in 0..count {
                    statuses.push(send(&client, get_request(&url)).await.status);
                }
                statuses
            })
        })
        .collect();
    let mut answered = sent;
    for task in tasks {
        let statuses = tokio::time::timeout(WAIT, task)
            .await
            .expect("the load should finish in time")
            .expect("load task should not panic");
        answered += statuses.len();
        assert!(
            statuses.iter().all(|&s| s == 200),
            "every request should be answered 200 once the breaker is open, got {:?}",
            statuses.iter().filter(|&&s| s != 200).collect::<Vec<_>>()
        );
    }
    assert_eq!(answered, 1000, "1000 requests should have been answered");

    let after_open_failing = failing.hits() - failing_at_open;
    let after_open_total = backend_hits() - total_at_open;
    assert!(
        after_open_failing * 100 <= after_open_total * 5,
        "after its breaker opened the 503 endpoint should get at most 5% of attempts, got \
         {after_open_failing} of {after_open_total}"
    );
    assert!(
        failing.hits() * 100 <= backend_hits() * 5,
        "over the whole run the 503 endpoint should get at most 5% of attempts, got {} of {}",
        failing.hits(),
        backend_hits()
    );

    let metrics = scrape(&proxy).await;
    assert_eq!(
        breaker_gauge(&metrics, "mixed", failing.addr),
        1.0,
        "circuit_breaker_state should read 1 (open) for the 503 endpoint"
    );
    assert_eq!(
        breaker_gauge(&metrics, "mixed", healthy_a.addr)
            + breaker_gauge(&metrics, "mixed", healthy_b.addr),
        0.0,
        "the healthy endpoints' breakers should stay closed"
    );
    let report = endpoint_report(&proxy, failing.addr).await;
    assert_eq!(
        report["circuit_breaker"], "open",
        "/backends/health should show the 503 endpoint open: {report}"
    );
    assert!(
        matches!(
            report["breaker_trip_reason"].as_str(),
            Some("consecutive_failures" | "failure_ratio")
        ),
        "/backends/health should say why the 503 endpoint's breaker tripped: {report}"
    );
    assert!(
        report["next_probe_in_ms"].as_u64().is_some_and(|ms| ms > 0),
        "/backends/health should show when the open breaker next probes: {report}"
    );
    let refusing_report = endpoint_report(&proxy, refusing).await;
    assert_eq!(
        refusing_report["circuit_breaker"], "open",
        "the refusing endpoint's breaker should be open too (2 of 4 is within 50%): {refusing_report}"
    );
    eprintln!(
        "mixed: breaker open after {sent} requests; 503 endpoint hits {} (after open {after_open_failing} of \
         {after_open_total}); total backend hits {}; {:?}",
        failing.hits(),
        backend_hits(),
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Non-idempotent requests.

#[tokio::test]
async fn post_that_reached_a_backend_is_not_retried() {
    let first = always(503).await;
    let second = always(503).await;
    let proxy = TestProxy::start(&policy(
        "post",
        &[("first", first.addr), ("second", second.addr)],
        "  retry: {}\n",
    ))
    .await;
    let answer = send(
        &http1_client(),
        post_request(&proxy.url("post", "/pay"), "order=1", None),
    )
    .await;
    assert_eq!(
        answer.status, 503,
        "a POST answered 503 by the backend should be passed through, not retried"
    );
    assert_eq!(
        first.hits() + second.hits(),
        1,
        "a POST that reached a backend should be sent exactly once (first={}, second={})",
        first.hits(),
        second.hits()
    );
    let metrics = scrape(&proxy).await;
    assert_eq!(
        policy_metric(&metrics, "proxy_retries_total", "post", &[]),
        0.0,
        "no retry should be counted for the POST"
    );
}

#[tokio::test]
async fn post_with_idempotency_key_is_retried_on_another_endpoint() {
    let failing = always(503).await;
    let healthy = echo().await;
    let proxy = TestProxy::start(&policy(
        "keyed",
        &[("failing", failing.addr), ("healthy", healthy.addr)],
        "  retry: {}\n",
    ))
    .await;
    let client = http1_client();
    for i in 0..2 {
        let key = format!("key-{i}");
        let answer = send(
            &client,
            post_request(&proxy.url("keyed", "/pay"), "order=1", Some(&key)),
        )
        .await;
        assert_eq!(
            answer.status, 200,
            "POST {i} with an Idempotency-Key should be retried onto the healthy endpoint"
        );
        assert_eq!(
            answer.text(),
            "order=1",
            "the retried POST {i} should carry its body"
        );
    }
    assert!(
        failing.hits() >= 1,
        "round robin should have sent at least one keyed POST to the 503 endpoint first"
    );
    assert_eq!(
        healthy.hits(),
        2,
        "each keyed POST should end on the healthy endpoint exactly once"
    );
    assert!(
        failing.hits() + healthy.hits() > 2,
        "keyed POSTs should take more attempts than requests (failing={}, healthy={})",
        failing.hits(),
        healthy.hits()
    );
    let metrics = scrape(&proxy).await;
    assert!(
        policy_metric(
            &metrics,
            "proxy_retries_total",
            "keyed",
            &[("reason", "status")]
        ) >= 1.0,
        "proxy_retries_total{{reason=\"status\"}} should count the keyed POST retries"
    );
}

#[tokio::test]
async fn post_whose_connection_was_refused_is_retried_even_without_a_retry_block() {
    let refusing = refusing_addr();
    let healthy = echo().await;
    // No `retry:` block: the implicit policy still retries what never reached a backend.
    let proxy = TestProxy::start(&policy(
        "refused",
        &[("refusing", refusing), ("healthy", healthy.addr)],
        "",
    ))
    .await;
    let client = http1_client();
    for i in 0..3 {
        let answer = send(
            &client,
            post_request(&proxy.url("refused", "/pay"), "order=2", None),
        )
        .await;
        assert_eq!(
            answer.status,
            200,
            "POST {i}: a refused connection never reached a backend, so it should be retried: {:?}",
            answer.text()
        );
        assert_eq!(
            answer.text(),
            "order=2",
            "POST {i} should arrive with its body"
        );
        assert_eq!(
            healthy.hits(),
            i + 1,
            "the healthy endpoint should get exactly one attempt per POST"
        );
    }
    let metrics = scrape(&proxy).await;
    assert!(
        policy_metric(
            &metrics,
            "proxy_retries_total",
            "refused",
            &[("reason", "connect_refused")]
        ) >= 1.0,
        "proxy_retries_total{{reason=\"connect_refused\"}} should count the retried POSTs"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. The retry budget stops a retry storm.

#[tokio::test]
async fn retry_budget_caps_the_extra_load_when_every_endpoint_fails() {
    let backends = [always(503).await, always(503).await, always(503).await];
    // Short backoff keeps the run well inside the budget's 10 s window.
    let proxy = TestProxy::start(&policy(
        "storm",
        &[
            ("a", backends[0].addr),
            ("b", backends[1].addr),
            ("c", backends[2].addr),
        ],
        "  retry: {maxAttempts: 3, backoff: {initial: 2ms, max: 10ms}}\n  circuitBreaker: {enabled: false}\n",
    ))
    .await;
    let hits = || backends.iter().map(Backend::hits).sum::<usize>();
    let client = http1_client();
    let url = proxy.url("storm", "/x");
    let started = Instant::now();
    let mut hits_after_100 = 0;
    for i in 0..500 {
        let answer = send(&client, get_request(&url)).await;
        assert_eq!(
            answer.status, 503,
            "request {i}: every endpoint answers 503, so the client should get 503"
        );
        if i == 99 {
            hits_after_100 = hits();
        }
    }
    let elapsed = started.elapsed();
    let total = hits();
    let tail_ratio = (total - hits_after_100) as f64 / 400.0;
    let overall_ratio = total as f64 / 500.0;
    eprintln!(
        "storm: {total} backend hits for 500 requests (overall {overall_ratio:.3}, last 400 \
         {tail_ratio:.3}) in {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(9),
        "the storm run should stay inside one budget window (10 s), took {elapsed:?}"
    );
    assert!(
        tail_ratio <= 1.3,
        "once the reserve is spent, backend attempts per request should be at most 1.3 \
         (ratio 0.2), got {tail_ratio:.3} over requests 101-500"
    );
    assert!(
        overall_ratio < 1.5,
        "backend attempts per request over the whole run should stay under 1.5, got \
         {overall_ratio:.3} ({total} hits)"
    );
    let metrics = scrape(&proxy).await;
    assert!(
        policy_metric(&metrics, "proxy_retry_budget_exhausted_total", "storm", &[]) > 0.0,
        "proxy_retry_budget_exhausted_total should count refused retries"
    );
    let retries = policy_metric(&metrics, "proxy_retries_total", "storm", &[]);
    assert_eq!(
        retries as usize + 500,
        total,
        "backend hits should be the 500 requests plus proxy_retries_total"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Everything ejected: answer fast.

#[tokio::test]
async fn all_endpoints_ejected_answers_503_no_endpoint_fast() {
    let (a, b) = (refusing_addr(), refusing_addr());
    let proxy = TestProxy::start(&policy(
        "down",
        &[("a", a), ("b", b)],
        "  circuitBreaker: {failureThreshold: 2, openTimeout: 30s, maxEjectionPercent: 100}\n",
    ))
    .await;
    let client = http1_client();
    let url = proxy.url("down", "/x");
    let mut warm_up = Vec::new();
    for _ in 0..10 {
        let answer = send(&client, get_request(&url)).await;
        let cause = header(&answer, "x-breakwater-error").map(str::to_owned);
        warm_up.push((answer.status, cause.clone()));
        if cause.as_deref() == Some("no_endpoint") {
            break;
        }
    }
    assert_eq!(
        warm_up.last().and_then(|(_, c)| c.as_deref()),
        Some("no_endpoint"),
        "within 10 warm-up requests both breakers should open and the proxy answer no_endpoint: \
         {warm_up:?}"
    );
    for report in endpoint_reports(&proxy).await {
        assert_eq!(
            report["circuit_breaker"], "open",
            "both endpoints' breakers should be open: {report}"
        );
    }

    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let started = Instant::now();
        let answer = send(&client, get_request(&url)).await;
        let elapsed = started.elapsed();
        slowest = slowest.max(elapsed);
        assert_eq!(
            answer.status, 503,
            "request {i}: all ejected should answer 503"
        );
        assert_eq!(
            header(&answer, "x-breakwater-error"),
            Some("no_endpoint"),
            "request {i}: the cause header should say no_endpoint"
        );
        let retry_after = header(&answer, "retry-after")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("request {i}: a numeric Retry-After header is expected"));
        assert!(
            (1..=40).contains(&retry_after),
            "request {i}: Retry-After should be the time to the next probe (about 30 s), got \
             {retry_after}"
        );
        assert!(
            elapsed < Duration::from_millis(50),
            "request {i}: the all-down answer should take under 50 ms, took {elapsed:?}"
        );
    }
    eprintln!("all-down: warm-up {warm_up:?}; slowest of 20 no_endpoint answers {slowest:?}");
}

// ---------------------------------------------------------------------------------------------
// 5. The max-ejection cap.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_ejection_percent_caps_open_breakers() {
    let bad = [always(503).await, always(503).await, always(503).await];
    let good = Backend::text("good").await;
    let proxy = TestProxy::start(&policy(
        "cap",
        &[
            ("bad1", bad[0].addr),
            ("bad2", bad[1].addr),
            ("bad3", bad[2].addr),
            ("good", good.addr),
        ],
        "  circuitBreaker: {maxEjectionPercent: 50, failureThreshold: 3}\n",
    ))
    .await;
    let client = http1_client();
    let url = proxy.url("cap", "/x");
    let mut max_ejected = 0;
    for batch in 0..30 {
        // Ten concurrent requests per batch, so breakers cross their threshold concurrently.
        let handles: Vec<JoinHandle<Answer>> = (0..10)
            .map(|_| {
                let (client, url) = (client.clone(), url.clone());
                tokio::spawn(async move { send(&client, get_request(&url)).await })
            })
            .collect();
        for handle in handles {
            let answer = tokio::time::timeout(WAIT, handle)
                .await
                .expect("request should finish in time")
                .expect("request task should not panic");
            assert!(
                answer.status == 200 || answer.status == 503,
                "batch {batch}: expected 200 or a passed-through 503, got {}",
                answer.status
            );
        }
        let reports = endpoint_reports(&proxy).await;
        let ejected: Vec<String> = reports
            .iter()
            .filter(|e| e["circuit_breaker"] != "closed")
            .map(|e| format!("{}={}", e["backend"], e["circuit_breaker"]))
            .collect();
        max_ejected = max_ejected.max(ejected.len());
        assert!(
            ejected.len() <= 2,
            "after batch {batch} (of 10 requests) at most 2 of 4 endpoints (50%) should be \
             open or half-open, got {ejected:?}"
        );
        let metrics = scrape(&proxy).await;
        let gauges = [bad[0].addr, bad[1].addr, bad[2].addr, good.addr]
            .iter()
            .filter(|&&addr| breaker_gauge(&metrics, "cap", addr) != 0.0)
            .count();
        assert!(
            gauges <= 2,
            "after batch {batch} at most 2 circuit_breaker_state gauges should be non-zero, got {gauges}"
        );
    }
    let reports = endpoint_reports(&proxy).await;
    let open = reports
        .iter()
        .filter(|e| e["circuit_breaker"] == "open")
        .count();
    assert!(
        open >= 1,
        "at least one failing endpoint should be open at the end: {reports:?}"
    );
    let good_report = endpoint_report(&proxy, good.addr).await;
    assert_eq!(
        good_report["circuit_breaker"], "closed",
        "the healthy endpoint's breaker should stay closed"
    );
    let metrics = scrape(&proxy).await;
    let opened = policy_metric(
        &metrics,
        "circuit_breaker_transitions_total",
        "cap",
        &[("to", "open")],
    );
    assert!(
        opened <= 2.0,
        "at most 2 transitions to open should have happened, got {opened}"
    );
    eprintln!("cap: max ejected at once {max_ejected}, open at the end {open}");
}

// ---------------------------------------------------------------------------------------------
// Breaker lifecycle: an abandoned half-open probe.

/// Sets a flag when dropped (a handler future cancelled because the proxy gave up on it).
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_probe_abandoned_by_its_client_does_not_wedge_the_breaker() {
    // 0: answer 503; 1: hold the request forever (reporting arrival); 2: answer 200.
    let mode = Arc::new(AtomicU8::new(0));
    let cancelled = Arc::new(AtomicBool::new(false));
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
    let handler: Handler = {
        let (mode, cancelled) = (Arc::clone(&mode), Arc::clone(&cancelled));
        Arc::new(move |_req| {
            let mode = mode.load(Ordering::SeqCst);
            let (cancelled, arrived_tx) = (Arc::clone(&cancelled), arrived_tx.clone());
            Box::pin(async move {
                match mode {
                    0 => status(503, "failing"),
                    1 => {
                        let _flag = DropFlag(cancelled);
                        let _ = arrived_tx.send(());
                        std::future::pending().await
                    }
                    _ => ok("recovered"),
                }
            })
        })
    };
    let backend = Backend::start(handler).await;
    let proxy = TestProxy::start(&policy(
        "probe",
        &[("only", backend.addr)],
        "  timeouts: {perTry: 10s, request: 10s}\n  circuitBreaker: {failureThreshold: 1, successThreshold: 1, openTimeout: 200ms}\n",
    ))
    .await;
    let url = proxy.url("probe", "/x");

    let first = get(&url).await;
    assert_eq!(
        first.status, 503,
        "the failing backend's 503 should pass through"
    );
    let report = endpoint_report(&proxy, backend.addr).await;
    assert_eq!(
        report["circuit_breaker"], "open",
        "one failure should open the breaker (failureThreshold 1): {report}"
    );

    // Once the open period is over, the next request is the half-open probe: hold it.
    mode.store(1, Ordering::SeqCst);
    let proxy_ref = &proxy;
    let addr = backend.addr;
    assert!(
        eventually(WAIT, || async move {
            endpoint_report(proxy_ref, addr).await["next_probe_in_ms"] == 0
        })
        .await,
        "the open period (200 ms ±10%) should elapse"
    );
    let mut probe = tokio::net::TcpStream::connect(proxy.addr("probe"))
        .await
        .expect("connect to the proxy");
    tokio::io::AsyncWriteExt::write_all(&mut probe, b"GET /probe HTTP/1.1\r\nHost: probe\r\n\r\n")
        .await
        .expect("send the probe request");
    tokio::time::timeout(WAIT, arrived.recv())
        .await
        .expect("the probe request should reach the backend");
    let report = endpoint_report(&proxy, backend.addr).await;
    assert_eq!(
        report["circuit_breaker"], "half_open",
        "with the probe in flight the breaker should be half-open: {report}"
    );

    // The client goes away: the proxy abandons the probe (the backend sees it cancelled).
    drop(probe);
    let flag = Arc::clone(&cancelled);
    assert!(
        eventually(WAIT, || {
            let flag = Arc::clone(&flag);
            async move { flag.load(Ordering::SeqCst) }
        })
        .await,
        "the proxy should abandon the upstream probe once its client disconnected"
    );

    // The backend is fine now. The abandoned probe gave no verdict, so the breaker must admit
    // another probe (at once, or after another open period) and close on its success.
    mode.store(2, Ordering::SeqCst);
    let url_ref = &url;
    let recovered = eventually(Duration::from_secs(3), || async move {
        get(url_ref).await.status == 200
    })
    .await;
    assert!(
        recovered,
        "after a half-open probe's client disconnected, the endpoint should be probed again and \
         recover within 3 s; it stays {} (backend hits {})",
        endpoint_report(&proxy, backend.addr).await,
        backend.hits()
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Per-try timeout steers to the fast endpoint.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_retries_a_slow_endpoint_on_the_fast_one() {
    let slow = Backend::slow("slow", Duration::from_secs(2)).await;
    let fast = Backend::text("fast").await;
    let proxy = TestProxy::start(&policy(
        "steer",
        &[("slow", slow.addr), ("fast", fast.addr)],
        "  loadBalancing: {algorithm: RoundRobin}\n  timeouts: {perTry: 200ms, request: 3s}\n  retry: {maxAttempts: 3}\n",
    ))
    .await;
    let client = http1_client();
    let url = proxy.url("steer", "/x");
    let mut slowest = Duration::ZERO;
    for i in 0..10 {
        let started = Instant::now();
        let answer = send(&client, get_request(&url)).await;
        let elapsed = started.elapsed();
        slowest = slowest.max(elapsed);
        assert_eq!(
            (answer.status, answer.text().as_str()),
            (200, "fast"),
            "request {i} should get 200 from the fast endpoint"
        );
        assert!(
            elapsed < Duration::from_secs(1),
            "request {i} should be answered within 1 s, took {elapsed:?}"
        );
    }
    assert!(
        slow.hits() >= 1,
        "round robin should have tried the slow endpoint at least once"
    );
    let metrics = scrape(&proxy).await;
    assert!(
        policy_metric(
            &metrics,
            "proxy_retries_total",
            "steer",
            &[("reason", "per_try_timeout")]
        ) >= 1.0,
        "proxy_retries_total{{reason=\"per_try_timeout\"}} should count the steered attempts"
    );
    eprintln!(
        "steer: slowest of 10 {slowest:?}; slow endpoint tried {} times",
        slow.hits()
    );
}

// ---------------------------------------------------------------------------------------------
// 7. Overload.

/// A backend that answers `/hold` only once released (reporting each arrival first) and
/// everything else at once.
struct HoldingBackend {
    backend: Backend,
    arrived: mpsc::UnboundedReceiver<()>,
    release: watch::Sender<bool>,
}

impl HoldingBackend {
    async fn start() -> HoldingBackend {
        let (arrived_tx, arrived) = mpsc::unbounded_channel();
        let (release, release_rx) = watch::channel(false);
        let handler: Handler = Arc::new(move |req: Request<Incoming>| {
            let hold = req.uri().path() == "/hold";
            let arrived_tx = arrived_tx.clone();
            let mut release_rx = release_rx.clone();
            Box::pin(async move {
                if hold {
                    let _ = arrived_tx.send(());
                    let _ = release_rx.wait_for(|released| *released).await;
                }
                ok("held")
            })
        });
        HoldingBackend {
            backend: Backend::start(handler).await,
            arrived,
            release,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_requests_rejects_the_third_request() {
    let mut holding = HoldingBackend::start().await;
    let proxy = TestProxy::start(&policy(
        "overload",
        &[("holding", holding.backend.addr)],
        "  overload: {maxConcurrentRequests: 2}\n",
    ))
    .await;
    let client = http1_client();
    let held: Vec<JoinHandle<Answer>> = (0..2)
        .map(|_| {
            let (client, url) = (client.clone(), proxy.url("overload", "/hold"));
            tokio::spawn(async move { send(&client, get_request(&url)).await })
        })
        .collect();
    for _ in 0..2 {
        tokio::time::timeout(WAIT, holding.arrived.recv())
            .await
            .expect("both held requests should reach the backend");
    }

    let rejected = send(&client, get_request(&proxy.url("overload", "/x"))).await;
    assert_eq!(
        rejected.status, 503,
        "the 3rd concurrent request should be rejected with 503"
    );
    assert_eq!(
        header(&rejected, "x-breakwater-error"),
        Some("overloaded"),
        "the rejection should carry x-breakwater-error: overloaded"
    );
    assert_eq!(
        header(&rejected, "x-breakwater-limit"),
        Some("max_concurrent_requests"),
        "the rejection should name the limit in x-breakwater-limit"
    );
    assert!(
        header(&rejected, "retry-after").is_some(),
        "the overload rejection should carry Retry-After"
    );
    assert_eq!(
        holding.backend.hits(),
        2,
        "the rejected request should never reach the backend"
    );
    let metrics = scrape(&proxy).await;
    assert_eq!(
        policy_metric(
            &metrics,
            "proxy_overload_rejected_total",
            "overload",
            &[("limit", "max_concurrent_requests")]
        ),
        1.0,
        "proxy_overload_rejected_total{{limit=\"max_concurrent_requests\"}} should count the rejection"
    );

    holding.release.send_replace(true);
    for handle in held {
        let answer = tokio::time::timeout(WAIT, handle)
            .await
            .expect("held request should finish once released")
            .expect("held request task should not panic");
        assert_eq!(
            answer.status, 200,
            "a released request should be answered 200"
        );
    }
    let after = send(&client, get_request(&proxy.url("overload", "/x"))).await;
    assert_eq!(
        after.status, 200,
        "once the held requests finished, a new request should be admitted"
    );
}

/// A raw HTTP/1.1 backend: `/stream` gets its response head and the first half of a 10-byte
/// body at once and the rest only once `release` turns true; anything else gets a whole 200.
async fn streaming_backend() -> (SocketAddr, watch::Sender<bool>, JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (release, release_rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut release_rx = release_rx.clone();
            connections.spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    // The path, whether the target came in origin-form or absolute-form.
                    let target = head.split(' ').nth(1).unwrap_or_default();
                    let path = target
                        .strip_prefix("http://")
                        .map_or(target, |rest| rest.find('/').map_or("/", |i| &rest[i..]));
                    let written = if path == "/stream" {
                        let first = stream
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello")
                            .await;
                        let _ = release_rx.wait_for(|released| *released).await;
                        match first {
                            Ok(()) => stream.write_all(b"world").await,
                            Err(e) => Err(e),
                        }
                    } else {
                        stream
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await
                    };
                    if written.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, release, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_requests_counts_a_request_until_its_response_body_ends() {
    let (addr, release, backend) = streaming_backend().await;
    let proxy = TestProxy::start(&policy(
        "streaming",
        &[("streaming", addr)],
        "  overload: {maxConcurrentRequests: 2}\n",
    ))
    .await;
    let client = http1_client();
    // Two requests whose response heads arrived but whose bodies are still streaming.
    let mut streaming = Vec::new();
    for i in 0..2 {
        let response = tokio::time::timeout(
            WAIT,
            client.request(get_request(&proxy.url("streaming", "/stream"))),
        )
        .await
        .expect("the streaming response head should arrive")
        .expect("streaming request should get a response");
        assert_eq!(
            response.status(),
            200,
            "streaming request {i} should get 200"
        );
        streaming.push(response);
    }

    let third = send(&client, get_request(&proxy.url("streaming", "/x"))).await;
    release.send_replace(true);
    for (i, response) in streaming.into_iter().enumerate() {
        let body = tokio::time::timeout(WAIT, response.into_body().collect())
            .await
            .expect("the released body should end")
            .expect("the released body should arrive whole")
            .to_bytes();
        assert_eq!(
            &body[..],
            b"helloworld",
            "streaming body {i} should arrive whole"
        );
    }
    backend.abort();
    assert_eq!(
        (third.status, header(&third, "x-breakwater-limit")),
        (503, Some("max_concurrent_requests")),
        "two requests are still in flight while their response bodies stream, so a 3rd \
         concurrent request should be rejected by maxConcurrentRequests: 2"
    );
}

// ---------------------------------------------------------------------------------------------
// 8. Nothing lost when a backend dies under load.

/// What the client side of a load run saw.
#[derive(Debug, Default)]
struct LoadTally {
    sent: usize,
    ok: usize,
    non_200: Vec<(u16, String)>,
    errors: Vec<String>,
}

/// Runs `tasks` keep-alive clients GETting `url` until `stop` is set (or `limit` passes).
fn spawn_load(
    url: String,
    tasks: usize,
    stop: Arc<AtomicBool>,
    limit: Duration,
) -> Vec<JoinHandle<LoadTally>> {
    (0..tasks)
        .map(|_| {
            let (url, stop) = (url.clone(), Arc::clone(&stop));
            tokio::spawn(async move {
                let client = http1_client();
                let deadline = Instant::now() + limit;
                let mut tally = LoadTally::default();
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    tally.sent += 1;
                    let response =
                        match tokio::time::timeout(WAIT, client.request(get_request(&url))).await {
                            Ok(Ok(response)) => response,
                            Ok(Err(err)) => {
                                tally.errors.push(format!("request: {err:?}"));
                                continue;
                            }
                            Err(_) => {
                                tally.errors.push("no response within 5 s".to_owned());
                                continue;
                            }
                        };
                    let code = response.status().as_u16();
                    match response.into_body().collect().await {
                        Ok(_) if code == 200 => tally.ok += 1,
                        Ok(body) => tally
                            .non_200
                            .push((code, String::from_utf8_lossy(&body.to_bytes()).into_owned())),
                        Err(err) => tally.errors.push(format!("body: {err:?}")),
                    }
                }
                tally
            })
        })
        .collect()
}

async fn collect_load(handles: Vec<JoinHandle<LoadTally>>) -> LoadTally {
    let mut total = LoadTally::default();
    for handle in handles {
        let tally = tokio::time::timeout(Duration::from_secs(15), handle)
            .await
            .expect("load task should end")
            .expect("load task should not panic");
        total.sent += tally.sent;
        total.ok += tally.ok;
        total.non_200.extend(tally.non_200);
        total.errors.extend(tally.errors);
    }
    total
}

fn assert_nothing_lost(tally: &LoadTally, metrics: &str, policy: &str) {
    assert!(
        tally.errors.is_empty(),
        "no client request should fail ({} of {} did): {:?}",
        tally.errors.len(),
        tally.sent,
        &tally.errors[..tally.errors.len().min(5)]
    );
    assert!(
        tally.non_200.is_empty(),
        "every client request should be answered 200 ({} of {} were not): {:?}",
        tally.non_200.len(),
        tally.sent,
        &tally.non_200[..tally.non_200.len().min(5)]
    );
    assert_eq!(
        tally.ok, tally.sent,
        "every client request should get exactly one (200) response"
    );
    let counted = policy_metric(metrics, "proxy_requests_total", policy, &[("code", "200")]);
    assert_eq!(
        counted as usize, tally.ok,
        "proxy_requests_total{{code=\"200\"}} should equal the client's success count"
    );
    let non_200 = metric_sum(metrics, "proxy_requests_total", &[]) - counted;
    assert_eq!(
        non_200, 0.0,
        "proxy_requests_total should count no other status"
    );
}

/// Backend handler answering 200 with its name.
fn named(name: &'static str) -> Handler {
    Arc::new(move |_req| Box::pin(async move { ok(name) }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_a_backend_under_load_loses_no_request() {
    // The victim takes a few milliseconds per request, so the kill catches requests in flight.
    let mut victim = KillableBackend::start(Arc::new(|_req| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_millis(3)).await;
            ok("victim")
        })
    }))
    .await;
    let b = KillableBackend::start(named("b")).await;
    let c = KillableBackend::start(named("c")).await;
    let proxy = TestProxy::start(&policy(
        "lost",
        &[("victim", victim.addr), ("b", b.addr), ("c", c.addr)],
        "  retry: {}\n",
    ))
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_load(
        proxy.url("lost", "/x"),
        4,
        Arc::clone(&stop),
        Duration::from_secs(4),
    );

    // Kill only once the victim has demonstrably taken traffic (bounded), ~0.7 s into the run.
    let victim_hits = Arc::clone(&victim.hits);
    assert!(
        eventually(WAIT, || {
            let hits = Arc::clone(&victim_hits);
            async move { hits.load(Ordering::SeqCst) >= 50 }
        })
        .await,
        "the victim should take traffic before it is killed"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    victim.kill().await;
    let victim_at_kill = victim.hits();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    stop.store(true, Ordering::SeqCst);
    let tally = collect_load(load).await;

    let metrics = scrape(&proxy).await;
    let retries = policy_metric(&metrics, "proxy_retries_total", "lost", &[]);
    let by_reason: Vec<String> = metrics
        .lines()
        .filter(|l| l.starts_with("proxy_retries_total{"))
        .map(str::to_owned)
        .collect();
    let hits = victim.hits() + b.hits() + c.hits();
    eprintln!(
        "killed backend: {} requests, {} ok, {} failed; victim hits {} (at kill \
         {victim_at_kill}); backend hits {hits}; retries {by_reason:?}",
        tally.sent,
        tally.ok,
        tally.errors.len() + tally.non_200.len(),
        victim.hits(),
    );
    assert_nothing_lost(&tally, &metrics, "lost");
    assert_eq!(
        victim.hits(),
        victim_at_kill,
        "the killed backend should receive nothing after it died"
    );
    assert!(
        b.hits() > 0 && c.hits() > 0,
        "the surviving backends should carry the load"
    );
    // Backends saw every answered request once, plus at most one attempt per counted retry
    // (an attempt cut off by the kill may or may not have been counted by the victim).
    assert!(
        hits >= tally.ok && hits <= tally.ok + retries as usize,
        "backend request counters ({hits}) should equal the client's successes ({}) plus at most \
         the retries ({retries})",
        tally.ok
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_backend_takes_traffic_again_after_restart_and_health_checks() {
    let mut victim = KillableBackend::start(named("victim")).await;
    let b = KillableBackend::start(named("b")).await;
    let c = KillableBackend::start(named("c")).await;
    let victim_addr = victim.addr;
    // Breakers off: health checks alone decide whether the dead endpoint takes traffic (an open
    // breaker would keep it out for `openTimeout` whatever the checks say, by design).
    let proxy = TestProxy::start(&policy(
        "revive",
        &[("victim", victim.addr), ("b", b.addr), ("c", c.addr)],
        "  retry: {}\n  circuitBreaker: {enabled: false}\n  healthCheck: {path: /healthz, interval: 100ms, timeout: 100ms, unhealthyThreshold: 2, healthyThreshold: 1}\n",
    ))
    .await;
    let proxy_ref = &proxy;
    let health_of = |addr: SocketAddr| async move {
        endpoint_report(proxy_ref, addr).await["health"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        eventually(WAIT, || async {
            endpoint_reports(proxy_ref)
                .await
                .iter()
                .all(|e| e["health"] == "healthy")
        })
        .await,
        "every endpoint should be marked healthy by its first checks: {:?}",
        endpoint_reports(&proxy).await
    );

    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_load(
        proxy.url("revive", "/x"),
        4,
        Arc::clone(&stop),
        Duration::from_secs(8),
    );
    let victim_hits = Arc::clone(&victim.hits);
    assert!(
        eventually(WAIT, || {
            let hits = Arc::clone(&victim_hits);
            async move { hits.load(Ordering::SeqCst) >= 50 }
        })
        .await,
        "the victim should take traffic before it is killed"
    );
    victim.kill().await;
    let killed_at = Instant::now();

    let marked_down = eventually(Duration::from_secs(3), || async {
        health_of(victim_addr).await == "unhealthy"
    })
    .await;
    let down_after = killed_at.elapsed();
    if !marked_down {
        stop.store(true, Ordering::SeqCst);
        let _ = collect_load(load).await;
        panic!(
            "the killed endpoint should be marked unhealthy by 2 failed checks (100 ms apart), \
             /backends/health says {:?}",
            endpoint_report(&proxy, victim_addr).await
        );
    }
    // Once marked down, traffic should avoid it: no more refused attempts to retry.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = |m: &str| {
        policy_metric(
            m,
            "proxy_retries_total",
            "revive",
            &[("reason", "connect_refused")],
        )
    };
    let refused_before = refused(&scrape(&proxy).await);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let refused_after = refused(&scrape(&proxy).await);

    // Restart on the same port.
    let listener = TcpListener::bind(victim_addr)
        .await
        .expect("rebind the killed backend's port");
    let revived = KillableBackend::start_on(listener, named("victim"));
    let restarted_at = Instant::now();
    let revived_hits = Arc::clone(&revived.hits);
    let takes_traffic = eventually(Duration::from_secs(3), || {
        let hits = Arc::clone(&revived_hits);
        async move { hits.load(Ordering::SeqCst) >= 10 }
    })
    .await;
    let back_after = restarted_at.elapsed();
    let health_now = health_of(victim_addr).await;
    stop.store(true, Ordering::SeqCst);
    let tally = collect_load(load).await;
    let metrics = scrape(&proxy).await;
    eprintln!(
        "revive: {} requests, {} ok; marked down {down_after:?} after the kill; refused retries \
         while down {refused_before} -> {refused_after}; traffic back {back_after:?} after the \
         restart (revived hits {}, probes {})",
        tally.sent,
        tally.ok,
        revived.hits(),
        revived.probes.load(Ordering::SeqCst)
    );
    assert!(
        takes_traffic,
        "the restarted backend should take traffic again once a health check passes \
         (healthyThreshold 1, interval 100 ms); health is {health_now:?}, hits {}",
        revived.hits()
    );
    assert_eq!(
        health_now, "healthy",
        "the restarted endpoint should be marked healthy"
    );
    assert_eq!(
        refused_after, refused_before,
        "while marked unhealthy the dead endpoint should get no traffic (no refused attempts)"
    );
    assert_nothing_lost(&tally, &metrics, "revive");
}
