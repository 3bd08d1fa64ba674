//! Load balancing over real loopback backends: round-robin and weighted shares, least-connections
//! and PeakEWMA steering new requests away from an endpoint that holds requests in flight, and
//! the answer when every endpoint refuses connections.

// Panicking on a broken fixture is how a test fails; clippy only exempts `#[test]` bodies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use support::{
    Answer, Backend, Handler, TestProxy, eventually, get, http1_client, ok, policy, send,
};

/// Upper bound for any single wait in this file, so a regression fails instead of hanging.
const WAIT: Duration = Duration::from_secs(5);

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn load_balancing(algorithm: &str) -> String {
    format!("  loadBalancing: {{algorithm: {algorithm}}}\n")
}

/// A policy whose backends carry explicit weights.
fn weighted_policy(name: &str, backends: &[(&str, SocketAddr, u32)]) -> String {
    let mut yaml = format!(
        "apiVersion: breakwater.io/v1alpha1\nkind: ResiliencePolicy\nmetadata:\n  name: {name}\nspec:\n  listener: {{port: 0, address: 127.0.0.1}}\n  backends:\n"
    );
    for (backend, addr, weight) in backends {
        yaml.push_str(&format!(
            "    - {{name: {backend}, url: \"http://{addr}\", weight: {weight}}}\n"
        ));
    }
    yaml.push_str(&load_balancing("Weighted"));
    yaml
}

fn get_request(url: &str) -> Request<Full<Bytes>> {
    Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("request")
}

/// Sends `count` sequential GETs on one keep-alive client; every one must be answered 200.
async fn sequential_gets(client: &HttpClient, url: &str, count: usize) {
    for i in 0..count {
        let answer = send(client, get_request(url)).await;
        assert_eq!(
            answer.status, 200,
            "request {i} to {url} should be answered 200"
        );
    }
}

/// A backend that answers `/hold` only once `release` turns true (reporting each arrival on
/// `arrived` first) and everything else at once, with `name` as the body.
struct HoldingBackend {
    backend: Backend,
    arrived: mpsc::UnboundedReceiver<()>,
    release: watch::Sender<bool>,
}

impl HoldingBackend {
    async fn start(name: &'static str) -> HoldingBackend {
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
                ok(name)
            })
        });
        HoldingBackend {
            backend: Backend::start(handler).await,
            arrived,
            release,
        }
    }

    fn release(&self) {
        self.release.send_replace(true);
    }
}

/// Starts a `/hold` request in the background.
fn spawn_hold(client: &HttpClient, url: String) -> JoinHandle<Answer> {
    let client = client.clone();
    tokio::spawn(async move { send(&client, get_request(&url)).await })
}

/// In-flight count per backend name, from `/backends/health`.
async fn in_flight(proxy: &TestProxy) -> Vec<(String, u64)> {
    let body = get(&proxy.admin_url("/backends/health")).await.text();
    let json: serde_json::Value = serde_json::from_str(&body).expect("/backends/health is JSON");
    json["policies"][0]["endpoints"]
        .as_array()
        .expect("endpoints array")
        .iter()
        .map(|e| {
            (
                e["backend"].as_str().expect("backend name").to_owned(),
                e["in_flight"].as_u64().expect("in_flight count"),
            )
        })
        .collect()
}

async fn join_all(handles: Vec<JoinHandle<Answer>>) {
    for handle in handles {
        let answer = tokio::time::timeout(WAIT, handle)
            .await
            .expect("held request should finish once released")
            .expect("held request task should not panic");
        assert_eq!(
            answer.status, 200,
            "a released /hold request should be answered 200"
        );
    }
}

#[tokio::test]
async fn round_robin_splits_thirty_requests_ten_each() {
    // Explicitly configured and by default (no `loadBalancing` at all).
    for (label, extra) in [
        ("explicit", load_balancing("RoundRobin")),
        ("default", String::new()),
    ] {
        let a = Backend::text("a").await;
        let b = Backend::text("b").await;
        let c = Backend::text("c").await;
        let proxy = TestProxy::start(&policy(
            "rr",
            &[("a", a.addr), ("b", b.addr), ("c", c.addr)],
            &extra,
        ))
        .await;
        sequential_gets(&http1_client(), &proxy.url("rr", "/x"), 30).await;
        assert_eq!(
            [a.hits(), b.hits(), c.hits()],
            [10, 10, 10],
            "round robin ({label}) should split 30 requests exactly 10/10/10"
        );
    }
}

#[tokio::test]
async fn weighted_one_to_three_splits_four_hundred_requests_by_weight() {
    let a = Backend::text("a").await;
    let b = Backend::text("b").await;
    let proxy = TestProxy::start(&weighted_policy(
        "weighted",
        &[("a", a.addr, 1), ("b", b.addr, 3)],
    ))
    .await;
    sequential_gets(&http1_client(), &proxy.url("weighted", "/x"), 400).await;
    let (hits_a, hits_b) = (a.hits(), b.hits());
    assert_eq!(
        hits_a + hits_b,
        400,
        "every request should reach exactly one backend"
    );
    assert!(
        (90..=110).contains(&hits_a) && (270..=330).contains(&hits_b),
        "weights 1:3 should split 400 requests within ±10% of 100/300, got {hits_a}/{hits_b}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_avoids_the_endpoint_holding_requests() {
    let mut a = HoldingBackend::start("a").await;
    let mut b = HoldingBackend::start("b").await;
    let proxy = TestProxy::start(&policy(
        "least",
        &[("a", a.backend.addr), ("b", b.backend.addr)],
        &load_balancing("LeastConnections"),
    ))
    .await;
    let client = http1_client();
    let hold_url = proxy.url("least", "/hold");

    // Six held requests, each started only once the previous one is held: least-connections
    // must alternate, leaving exactly three in flight on each endpoint.
    let mut handles = Vec::new();
    let (mut held_a, mut held_b) = (0, 0);
    for _ in 0..6 {
        handles.push(spawn_hold(&client, hold_url.clone()));
        tokio::time::timeout(WAIT, async {
            tokio::select! {
                _ = a.arrived.recv() => held_a += 1,
                _ = b.arrived.recv() => held_b += 1,
            }
        })
        .await
        .expect("each /hold request should reach a backend");
    }
    assert_eq!(
        (held_a, held_b),
        (3, 3),
        "least-connections should alternate six held requests 3/3"
    );

    // Empty b: it now has nothing in flight while a still holds three.
    b.release();
    let proxy_ref = &proxy;
    let settled = eventually(WAIT, || async move {
        in_flight(proxy_ref).await == [("a".to_owned(), 3), ("b".to_owned(), 0)]
    })
    .await;
    assert!(
        settled,
        "after releasing b, /backends/health should show a=3 and b=0 in flight, got {:?}",
        in_flight(&proxy).await
    );

    let (before_a, before_b) = (a.backend.hits(), b.backend.hits());
    sequential_gets(&client, &proxy.url("least", "/x"), 20).await;
    let (to_a, to_b) = (a.backend.hits() - before_a, b.backend.hits() - before_b);
    assert!(
        to_b >= 18,
        "at least 18 of 20 new requests should go to b (a holds 3 in flight), got a={to_a} b={to_b}"
    );

    a.release();
    join_all(handles).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_avoids_the_endpoint_holding_requests() {
    // Releasing held requests on an endpoint feeds their (long) latency into its estimate, which
    // would make PeakEWMA avoid it for a different reason. So the requests are held while `a` is
    // the only backend, and `b` is added by a reload: endpoint state (in-flight count included)
    // survives reloads, so `a` keeps its three in-flight requests and `b` starts fresh.
    let mut a = HoldingBackend::start("a").await;
    let b = Backend::text("b").await;
    let proxy = TestProxy::start(&policy(
        "ewma",
        &[("a", a.backend.addr)],
        &load_balancing("PeakEwma"),
    ))
    .await;
    let client = http1_client();
    let mut handles = Vec::new();
    for _ in 0..3 {
        handles.push(spawn_hold(&client, proxy.url("ewma", "/hold")));
        tokio::time::timeout(WAIT, a.arrived.recv())
            .await
            .expect("each /hold request should reach a");
    }

    let two_backends = policy(
        "ewma",
        &[("a", a.backend.addr), ("b", b.addr)],
        &load_balancing("PeakEwma"),
    );
    let staged = proxy.config_path.with_extension("staged");
    std::fs::write(&staged, two_backends).expect("write new policy");
    std::fs::rename(&staged, &proxy.config_path).expect("replace policy atomically");
    proxy
        .proxy()
        .reload()
        .await
        .expect("the two-backend policy should load");
    assert_eq!(
        in_flight(&proxy).await,
        [("a".to_owned(), 3), ("b".to_owned(), 0)],
        "after the reload a should still hold 3 requests in flight and b none"
    );

    let (before_a, before_b) = (a.backend.hits(), b.hits());
    sequential_gets(&client, &proxy.url("ewma", "/x"), 20).await;
    let (to_a, to_b) = (a.backend.hits() - before_a, b.hits() - before_b);
    assert!(
        to_b >= 18,
        "at least 18 of 20 new requests should go to b (a holds 3 in flight), got a={to_a} b={to_b}"
    );

    a.release();
    join_all(handles).await;
}

#[tokio::test]
async fn every_endpoint_refusing_answers_502_connect_refused() {
    // Bound but never listening: refused for the rest of the run, and no other test can take them.
    let refusing: Vec<SocketAddr> = (0..2).map(|_| support::refusing_addr()).collect();
    let proxy = TestProxy::start(&policy(
        "refused",
        &[("a", refusing[0]), ("b", refusing[1])],
        "",
    ))
    .await;
    // Four requests: round robin tries each endpoint twice.
    for i in 0..4 {
        let answer = get(&proxy.url("refused", "/x")).await;
        assert_eq!(
            answer.status, 502,
            "request {i}: every endpoint refusing should give 502"
        );
        assert_eq!(
            answer
                .headers
                .get("x-breakwater-error")
                .and_then(|v| v.to_str().ok()),
            Some("connect_refused"),
            "request {i}: the cause header should say connect_refused"
        );
    }
}
