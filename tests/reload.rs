//! Hot reload of the policy file: under keep-alive load, with an invalid edit, with a listener
//! that moves to another port, and with a port that cannot be bound.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::time::{Instant, timeout};

use support::{Backend, TestProxy, eventually, free_port, get, http1_client, metric_value, policy};

/// Replaces the policy file the way editors and ConfigMap volumes do (write aside, rename
/// over), so the proxy never reads a half-written file.
fn replace_policy(path: &Path, yaml: &str) {
    let staging = path.with_extension("yaml.new");
    std::fs::write(&staging, yaml).unwrap();
    std::fs::rename(&staging, path).unwrap();
}

async fn scrape(proxy: &TestProxy) -> String {
    get(&proxy.admin_url("/metrics")).await.text()
}

async fn reload_failures(proxy: &TestProxy) -> f64 {
    metric_value(&scrape(proxy).await, "config_reload_failures_total")
        .expect("config_reload_failures_total should be exported")
}

/// One request of the load: when it was sent and finished (since the test began), and what
/// came back (`Ok(body)` for a 200, `Err(reason)` otherwise).
struct Exchange {
    sent: Duration,
    done: Duration,
    outcome: Result<String, String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_under_keep_alive_load_loses_no_request() {
    const CLIENTS: usize = 4;
    const RUN: Duration = Duration::from_secs(3);
    const RELOAD_AT: Duration = Duration::from_millis(1500);
    const SWITCH_WITHIN: Duration = Duration::from_secs(2);

    let old = Backend::text("old").await;
    let new = Backend::text("new").await;
    let proxy = TestProxy::start(&policy("live", &[("old", old.addr)], "")).await;
    let url = proxy.url("live", "/work");
    let began = Instant::now();

    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                // One client per task: its pool keeps one connection alive for every request.
                let client = http1_client();
                let mut log = Vec::new();
                while began.elapsed() < RUN {
                    let sent = began.elapsed();
                    let request = Request::get(&url).body(Full::default()).unwrap();
                    let outcome = match timeout(Duration::from_secs(5), async {
                        let resp = client.request(request).await.map_err(|e| e.to_string())?;
                        let status = resp.status();
                        let body = resp
                            .into_body()
                            .collect()
                            .await
                            .map_err(|e| e.to_string())?
                            .to_bytes();
                        let body = String::from_utf8_lossy(&body).into_owned();
                        if status == 200 {
                            Ok(body)
                        } else {
                            Err(format!("status {status}: {body}"))
                        }
                    })
                    .await
                    {
                        Ok(outcome) => outcome,
                        Err(_) => Err("no answer within 5 s".to_owned()),
                    };
                    log.push(Exchange {
                        sent,
                        done: began.elapsed(),
                        outcome,
                    });
                }
                log
            })
        })
        .collect();

    tokio::time::sleep_until(began + RELOAD_AT).await;
    replace_policy(
        &proxy.config_path,
        &policy("live", &[("new", new.addr)], ""),
    );
    let written = began.elapsed();

    let mut log = Vec::new();
    for client in clients {
        log.extend(client.await.expect("client task should not panic"));
    }

    let failures: Vec<String> = log
        .iter()
        .filter_map(|e| {
            e.outcome
                .as_ref()
                .err()
                .map(|err| format!("sent at {:?}: {err}", e.sent))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "no request should fail across the reload; {} of {} failed, first: {:?}",
        failures.len(),
        log.len(),
        &failures[..failures.len().min(5)]
    );
    let body = |e: &Exchange| e.outcome.as_deref().unwrap_or_default().to_owned();
    assert!(
        log.iter()
            .filter(|e| e.done < written)
            .all(|e| body(e) == "old"),
        "nothing should reach the new backend before the file changed"
    );
    let first_new = log
        .iter()
        .filter(|e| body(e) == "new")
        .map(|e| e.done)
        .min()
        .expect("the new backend should take traffic after the reload");
    let switch = first_new.saturating_sub(written);
    assert!(
        switch <= SWITCH_WITHIN,
        "the new backend should take traffic within {SWITCH_WITHIN:?} of the write, took {switch:?}"
    );
    let late_old: Vec<Duration> = log
        .iter()
        .filter(|e| e.sent > written + SWITCH_WITHIN && body(e) == "old")
        .map(|e| e.sent)
        .collect();
    assert!(
        late_old.is_empty(),
        "requests sent more than {SWITCH_WITHIN:?} after the write should all go to the new \
         backend; old answered requests sent at {late_old:?}"
    );
    assert_eq!(
        old.hits() + new.hits(),
        log.len(),
        "every request should reach exactly one backend once"
    );

    let metrics = scrape(&proxy).await;
    let counted: f64 = ["old", "new"]
        .iter()
        .filter_map(|b| {
            metric_value(
                &metrics,
                &format!(
                    "proxy_requests_total{{backend=\"{b}\",code=\"200\",policy=\"default/live\"}}"
                ),
            )
        })
        .sum();
    assert_eq!(
        counted,
        log.len() as f64,
        "proxy_requests_total should count every request once:\n{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, "config_reload_failures_total"),
        Some(0.0),
        "the reload should not count as a failure"
    );
    assert_eq!(
        proxy.proxy().config_version(),
        2,
        "exactly one reload applied"
    );
    let connections =
        metric_value(&metrics, "proxy_connections_total{policy=\"default/live\"}").unwrap_or(0.0);
    println!(
        "reload under load: {} requests from {CLIENTS} keep-alive clients ({} old, {} new), \
         0 failed; file written at {written:?}, first answer from the new backend {switch:?} \
         later; {connections} client connections accepted in total",
        log.len(),
        old.hits(),
        new.hits()
    );
    // A proxy that closed every connection at the reload would show 2 × CLIENTS.
    assert!(
        connections < (2 * CLIENTS) as f64,
        "keep-alive connections should survive the reload ({CLIENTS} clients opened \
         {connections} connections)"
    );
}

#[tokio::test]
async fn invalid_edit_keeps_the_old_configuration_serving() {
    let old = Backend::text("old").await;
    let new = Backend::text("new").await;
    let proxy = TestProxy::start(&policy(
        "guarded",
        &[("old", old.addr)],
        "  timeouts: {connect: 1s}\n",
    ))
    .await;
    assert_eq!(reload_failures(&proxy).await, 0.0, "no failure yet");

    // Had it been accepted, this edit would also have moved traffic to `new`.
    replace_policy(
        &proxy.config_path,
        &policy(
            "guarded",
            &[("new", new.addr)],
            "  timeouts: {connect: banana}\n",
        ),
    );
    let counted = eventually(Duration::from_secs(3), || async {
        reload_failures(&proxy).await >= 1.0
    })
    .await;
    assert!(
        counted,
        "the rejected edit should increment config_reload_failures_total within 3 s"
    );
    assert_eq!(
        reload_failures(&proxy).await,
        1.0,
        "the poller should count one rejected file once, not on every poll"
    );
    for _ in 0..5 {
        let answer = get(&proxy.url("guarded", "/")).await;
        assert_eq!(
            (answer.status, answer.text()),
            (200, "old".to_owned()),
            "the last good configuration should keep serving"
        );
    }
    assert_eq!(new.hits(), 0, "the rejected backend must get no traffic");
    assert_eq!(
        proxy.proxy().config_version(),
        1,
        "the version should not move"
    );

    let err = proxy
        .proxy()
        .reload()
        .await
        .expect_err("an explicit reload of the invalid file should fail");
    let message = err.to_string();
    assert!(
        message.contains("spec.timeouts.connect") && message.contains("banana"),
        "the reload error should name the field and the value, got: {message}"
    );
    assert_eq!(
        reload_failures(&proxy).await,
        2.0,
        "the explicit reload is a second rejection"
    );
    let config: serde_json::Value =
        serde_json::from_slice(&get(&proxy.admin_url("/config")).await.body).unwrap();
    assert_eq!(
        config["policies"][0]["timeouts"]["connect"], "1s",
        "/config should still show the serving configuration"
    );

    // Fixing the file recovers without a restart.
    replace_policy(
        &proxy.config_path,
        &policy(
            "guarded",
            &[("new", new.addr)],
            "  timeouts: {connect: 2s}\n",
        ),
    );
    let moved = eventually(Duration::from_secs(3), || async {
        get(&proxy.url("guarded", "/")).await.text() == "new"
    })
    .await;
    assert!(
        moved,
        "a corrected file should be applied within 3 s of the write"
    );
    assert_eq!(proxy.proxy().config_version(), 2, "one more version");
}

async fn connect_refused(addr: SocketAddr) -> bool {
    matches!(
        tokio::net::TcpStream::connect(addr).await,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

#[tokio::test]
async fn listener_port_change_adds_the_new_listener_and_removes_the_old() {
    let backend = Backend::text("moved").await;
    let yaml = policy("moving", &[("app", backend.addr)], "");
    let proxy = TestProxy::start(&yaml).await;
    let old_addr = proxy.addr("moving");
    assert_eq!(get(&proxy.url("moving", "/")).await.status, 200);

    let port = free_port();
    replace_policy(
        &proxy.config_path,
        &yaml.replace("port: 0,", &format!("port: {port},")),
    );
    let version = proxy
        .proxy()
        .reload()
        .await
        .expect("moving the listener should be accepted");
    assert_eq!(version, 2, "one reload applied");
    let new_addr = proxy.addr("moving");
    assert_eq!(
        new_addr,
        SocketAddr::from(([127, 0, 0, 1], port)),
        "the policy should now listen on the new port"
    );
    let answer = get(&proxy.url("moving", "/")).await;
    assert_eq!(
        (answer.status, answer.text()),
        (200, "moved".to_owned()),
        "the new listener should serve"
    );
    let removed = eventually(Duration::from_secs(2), || connect_refused(old_addr)).await;
    assert!(
        removed,
        "the old port {old_addr} should refuse new connections after the reload"
    );
}

#[tokio::test]
async fn reload_to_a_taken_port_is_rejected_and_the_old_listener_keeps_serving() {
    let backend = Backend::text("stays").await;
    let yaml = policy("pinned", &[("app", backend.addr)], "");
    let proxy = TestProxy::start(&yaml).await;
    let old_addr = proxy.addr("pinned");
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = taken.local_addr().unwrap().port();

    replace_policy(
        &proxy.config_path,
        &yaml.replace("port: 0,", &format!("port: {port},")),
    );
    let err = proxy
        .proxy()
        .reload()
        .await
        .expect_err("a listener port that is in use cannot be applied");
    assert!(
        err.to_string().contains(&port.to_string()),
        "the error should name the address, got: {err}"
    );
    assert_eq!(proxy.addr("pinned"), old_addr, "the old listener stays");
    let answer = get(&proxy.url("pinned", "/")).await;
    assert_eq!(
        (answer.status, answer.text()),
        (200, "stays".to_owned()),
        "the old listener should keep serving"
    );
    assert!(
        reload_failures(&proxy).await >= 1.0,
        "the rejected reload should be counted"
    );
    drop(taken);
}

/// Writes `request` on `stream` and reads its response.
async fn exchange_on(stream: &mut tokio::net::TcpStream, request: &str) -> String {
    use tokio::io::AsyncWriteExt;
    stream.write_all(request.as_bytes()).await.unwrap();
    support::read_response(stream, Duration::from_secs(5)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_body_limit_applies_to_connections_opened_before_the_reload() {
    let backend = Backend::text("stored").await;
    let limit = |bytes: u32| format!("  limits: {{maxRequestBodyBytes: {bytes}}}\n");
    let proxy = TestProxy::start(&policy("uploads", &[("app", backend.addr)], &limit(4096))).await;
    let post = |bytes: usize| {
        format!(
            "POST /upload HTTP/1.1\r\nHost: uploads.test\r\nContent-Length: {bytes}\r\n\r\n{}",
            "x".repeat(bytes)
        )
    };
    // One keep-alive connection across the reload: the server on it reads bodies with their
    // head up to the limit it was opened under.
    let mut kept = tokio::net::TcpStream::connect(proxy.addr("uploads"))
        .await
        .unwrap();
    let before = exchange_on(&mut kept, &post(100)).await;
    assert!(before.starts_with("HTTP/1.1 200"), "{before}");

    replace_policy(
        &proxy.config_path,
        &policy("uploads", &[("app", backend.addr)], &limit(50)),
    );
    let reloaded = eventually(Duration::from_secs(3), || async {
        proxy.proxy().config_version() == 2
    })
    .await;
    assert!(reloaded, "the new limit should be applied within 3 s");

    let over = exchange_on(&mut kept, &post(100)).await;
    assert!(
        over.starts_with("HTTP/1.1 413"),
        "a 100-byte body over the new 50-byte limit should get 413 on the old connection:\n{over}"
    );
    let mut fresh = tokio::net::TcpStream::connect(proxy.addr("uploads"))
        .await
        .unwrap();
    let under = exchange_on(&mut fresh, &post(40)).await;
    assert!(under.starts_with("HTTP/1.1 200"), "{under}");
    assert_eq!(
        backend.hits(),
        2,
        "the refused body never reached the backend"
    );
}
