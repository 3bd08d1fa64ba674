//! The admin status page, rendered by a real headless Chromium against a running proxy with a
//! failing backend: the endpoint rows and the open breaker must be in the rendered DOM, and a
//! screenshot is taken.
//!
//! Needs `/usr/bin/chromium` (`apt-get install -y chromium`; `tests/run.sh` installs it). Without
//! it the test fails and says so, rather than passing without having looked.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use support::{Backend, TestProxy, get, policy, refusing_addr};

const CHROMIUM: &str = "/usr/bin/chromium";

/// Runs headless Chromium on `url` with `args`, bounded in time; returns stdout.
async fn chromium(url: &str, args: &[&str], profile: &Path) -> String {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: install it with `apt-get install -y chromium` (tests/run.sh does this)"
    );
    let user_data_dir = format!("--user-data-dir={}", profile.display());
    let child = tokio::process::Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            // Lets the page's scripts run (fetch and render) before the DOM is dumped.
            "--virtual-time-budget=5000",
            &user_data_dir,
        ])
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start chromium");
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("chromium finished within 60 s")
        .expect("chromium ran");
    assert!(
        output.status.success(),
        "chromium failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn the_status_page_shows_endpoints_and_the_open_breaker() {
    let good = Backend::text("ok").await;
    let bad = refusing_addr();
    let extra = "  retry: {maxAttempts: 1}\n  circuitBreaker: {failureThreshold: 2, openTimeout: 60s, maxEjectionPercent: 100}\n";
    let proxy =
        TestProxy::start(&policy("shop", &[("good", good.addr), ("bad", bad)], extra)).await;

    // Round robin sends every other request to the refusing endpoint until its breaker opens.
    for _ in 0..8 {
        get(&proxy.url("shop", "/")).await;
    }
    let state = get(&proxy.admin_url("/backends/health")).await.text();
    assert!(
        state.contains("\"open\""),
        "the failing endpoint's breaker should be open before rendering: {state}"
    );

    let page = get(&proxy.admin_url("/")).await;
    assert_eq!(page.status, 200);
    assert!(
        page.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html"),
        "the status page is HTML"
    );
    let html = page.text();
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "the page loads no external assets"
    );

    let profile = tempfile::tempdir().unwrap();
    let dom = chromium(&proxy.admin_url("/"), &["--dump-dom"], profile.path()).await;
    let bad_row = format!("data-endpoint=\"{bad}\"");
    let good_row = format!("data-endpoint=\"{}\"", good.addr);
    for expected in [
        "data-policy=\"default/shop\"",
        &bad_row,
        &good_row,
        "data-breaker=\"open\"",
        "data-breaker=\"closed\"",
    ] {
        assert!(
            dom.contains(expected),
            "the rendered page should contain {expected}:\n{dom}"
        );
    }
    // The open breaker is on the failing endpoint's row.
    let row = dom
        .split("<tr")
        .find(|row| row.contains(&bad_row))
        .expect("a row for the failing endpoint");
    assert!(
        row.contains("data-breaker=\"open\"") && row.contains("connect_refused"),
        "the failing endpoint's row shows the open breaker and the last failure: {row}"
    );

    let shot_dir = tempfile::tempdir().unwrap();
    let shot = shot_dir.path().join("status.png");
    let screenshot = format!("--screenshot={}", shot.display());
    chromium(
        &proxy.admin_url("/"),
        &[&screenshot, "--window-size=1280,720"],
        profile.path(),
    )
    .await;
    let png = std::fs::read(&shot).expect("chromium wrote the screenshot");
    if let Ok(dir) = std::env::var("STATUS_PAGE_SCREENSHOT") {
        let _ = std::fs::write(dir, &png);
    }
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot ({} bytes)",
        png.len()
    );
}
