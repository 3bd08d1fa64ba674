//! The admin API over a real socket: `/health`, `/ready`, `/backends/health`, `/config`, error
//! statuses, and `/metrics` parsed strictly as Prometheus text exposition format 0.0.4.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::Value;

use support::{
    Answer, Backend, BoxResponse, TestProxy, eventually, get, http1_client, policy, send,
};

/// Two backends, explicit values for a few settings so `/config` can be checked against them.
async fn two_backend_proxy() -> (Backend, Backend, TestProxy) {
    let alpha = Backend::text("alpha").await;
    let beta = Backend::text("beta").await;
    let proxy = TestProxy::start(&policy(
        "admin",
        &[("alpha", alpha.addr), ("beta", beta.addr)],
        "  timeouts: {connect: 250ms, idle: 90s}\n  limits: {maxRequestBodyBytes: 2Mi}\n",
    ))
    .await;
    (alpha, beta, proxy)
}

fn json(answer: &Answer) -> Value {
    serde_json::from_slice(&answer.body)
        .unwrap_or_else(|e| panic!("expected a JSON body ({e}), got:\n{}", answer.text()))
}

fn content_type(answer: &Answer) -> String {
    answer
        .headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn health_and_ready_summarise_the_proxy() {
    let (_alpha, _beta, proxy) = two_backend_proxy().await;

    let answer = get(&proxy.admin_url("/health")).await;
    assert_eq!(answer.status, 200, "/health should answer 200");
    assert_eq!(content_type(&answer), "application/json", "/health is JSON");
    let health = json(&answer);
    assert_eq!(
        health["status"], "ok",
        "every endpoint is usable, so status should be ok: {health:#}"
    );
    assert!(
        health["uptime_seconds"].is_u64(),
        "uptime_seconds should be a whole number of seconds: {health:#}"
    );
    assert_eq!(
        health["backends"]["total"], 2,
        "two endpoints configured: {health:#}"
    );
    assert_eq!(
        health["backends"]["healthy"], 2,
        "both endpoints usable: {health:#}"
    );
    for feature in ["circuit_breaker", "rate_limiting", "health_checks"] {
        assert!(
            health["features"][feature].is_boolean(),
            "features.{feature} should be a boolean: {health:#}"
        );
    }

    let ready = get(&proxy.admin_url("/ready")).await;
    assert_eq!(
        ready.status,
        200,
        "/ready should be 200 once the configuration serves: {}",
        ready.text()
    );
}

#[tokio::test]
async fn backends_health_lists_every_endpoint() {
    let (alpha, beta, proxy) = two_backend_proxy().await;
    // One request on each endpoint (round robin) so latency has been observed.
    for _ in 0..2 {
        assert_eq!(get(&proxy.url("admin", "/")).await.status, 200);
    }

    let report = Arc::new(std::sync::Mutex::new(Value::Null));
    let settled = eventually(Duration::from_secs(2), || {
        let url = proxy.admin_url("/backends/health");
        let report = Arc::clone(&report);
        async move {
            let fresh = json(&get(&url).await);
            let idle = fresh["policies"][0]["endpoints"]
                .as_array()
                .is_some_and(|eps| eps.iter().all(|e| e["in_flight"] == 0));
            *report.lock().unwrap() = fresh;
            idle
        }
    })
    .await;
    let report = report.lock().unwrap().clone();
    assert!(
        settled,
        "in_flight should drop to 0 once the responses are read: {report:#}"
    );
    let policy = &report["policies"][0];
    assert_eq!(
        policy["policy"], "default/admin",
        "policy label: {report:#}"
    );
    let endpoints = policy["endpoints"].as_array().expect("endpoints array");
    assert_eq!(endpoints.len(), 2, "one entry per endpoint: {report:#}");
    let expected = [("alpha", alpha.addr), ("beta", beta.addr)];
    for (endpoint, (name, addr)) in endpoints.iter().zip(expected) {
        assert_eq!(endpoint["backend"], name, "backend name: {endpoint:#}");
        assert_eq!(
            endpoint["address"],
            addr.to_string(),
            "endpoint address: {endpoint:#}"
        );
        assert!(
            ["unknown", "healthy", "unhealthy"]
                .contains(&endpoint["health"].as_str().unwrap_or("")),
            "health should be a known state: {endpoint:#}"
        );
        assert!(
            ["closed", "open", "half_open"]
                .contains(&endpoint["circuit_breaker"].as_str().unwrap_or("")),
            "circuit_breaker should be a known state: {endpoint:#}"
        );
        assert_eq!(endpoint["in_flight"], 0, "nothing in flight: {endpoint:#}");
        let latency = endpoint["latency_ewma_ms"]
            .as_f64()
            .unwrap_or_else(|| panic!("latency_ewma_ms should be a number: {endpoint:#}"));
        assert!(
            latency > 0.0 && latency < 10_000.0,
            "latency_ewma_ms should be a positive estimate: {endpoint:#}"
        );
        assert_eq!(
            endpoint["recent_failures"].as_array().map(Vec::len),
            Some(0),
            "recent_failures should be an empty list: {endpoint:#}"
        );
    }
}

#[tokio::test]
async fn config_returns_the_effective_configuration() {
    let (alpha, beta, proxy) = two_backend_proxy().await;
    let answer = get(&proxy.admin_url("/config")).await;
    assert_eq!(answer.status, 200, "/config should answer 200");
    assert_eq!(content_type(&answer), "application/json", "/config is JSON");
    let config = json(&answer);
    assert_eq!(config["version"], 1, "first configuration: {config:#}");
    let policies = config["policies"].as_array().expect("policies array");
    assert_eq!(policies.len(), 1, "one policy: {config:#}");
    let policy = &policies[0];
    assert_eq!(policy["id"]["name"], "admin", "{policy:#}");
    assert_eq!(policy["id"]["namespace"], "default", "{policy:#}");
    assert_eq!(
        policy["listener"]["addr"], "127.0.0.1:0",
        "the configured listener: {policy:#}"
    );
    let backends = policy["backends"].as_array().expect("backends array");
    assert_eq!(
        backends
            .iter()
            .map(|b| b["name"].as_str().unwrap_or("").to_owned())
            .collect::<Vec<_>>(),
        ["alpha", "beta"],
        "backends in the order written: {policy:#}"
    );
    let text = serde_json::to_string(&backends).unwrap();
    for addr in [alpha.addr, beta.addr] {
        assert!(
            text.contains(&addr.to_string()),
            "backend address {addr} should appear: {policy:#}"
        );
    }
    // Written values, compiled...
    assert_eq!(policy["timeouts"]["connect"], "250ms", "{policy:#}");
    assert_eq!(policy["timeouts"]["idle"], "90s", "{policy:#}");
    assert_eq!(
        policy["limits"]["maxRequestBodyBytes"],
        2 << 20,
        "2Mi compiled to bytes: {policy:#}"
    );
    // ...and defaults filled in: the effective configuration, not the file.
    assert_eq!(policy["timeouts"]["request"], "15s", "default: {policy:#}");
    assert_eq!(policy["algorithm"], "RoundRobin", "default: {policy:#}");
}

#[tokio::test]
async fn unknown_paths_are_404_and_other_methods_405() {
    let (_alpha, _beta, proxy) = two_backend_proxy().await;
    for path in ["/nope", "/health/x", "/metricsx"] {
        let answer = get(&proxy.admin_url(path)).await;
        assert_eq!(answer.status, 404, "{path} should be 404");
    }
    let client = http1_client();
    for method in [Method::POST, Method::PUT, Method::DELETE] {
        for path in ["/health", "/config", "/ready"] {
            let answer = send(
                &client,
                Request::builder()
                    .method(method.clone())
                    .uri(proxy.admin_url(path))
                    .body(Full::new(Bytes::from_static(b"{}")))
                    .unwrap(),
            )
            .await;
            assert_eq!(answer.status, 405, "{method} {path} should be 405");
            let allow = answer
                .headers
                .get(header::ALLOW)
                .map(|v| v.to_str().unwrap().to_owned());
            assert!(
                allow.as_deref().is_some_and(|a| a.contains("GET")),
                "a 405 should list the allowed methods, got {allow:?}"
            );
        }
    }
}

/// The families every exposition must declare, with their types.
const REQUIRED_FAMILIES: &[(&str, &str)] = &[
    ("proxy_requests_total", "counter"),
    ("proxy_request_duration_seconds", "histogram"),
    ("proxy_upstream_duration_seconds", "histogram"),
    ("backend_health", "gauge"),
    ("circuit_breaker_state", "gauge"),
    ("rate_limit_rejected_total", "counter"),
    ("config_reload_failures_total", "counter"),
    ("proxy_active_connections", "gauge"),
];

#[tokio::test]
async fn metrics_are_valid_prometheus_text_and_count_every_request() {
    let backend = Backend::start(Arc::new(|req: Request<Incoming>| -> BoxResponse {
        let missing = req.uri().path() == "/missing";
        Box::pin(async move {
            if missing {
                support::status(404, "missing")
            } else {
                support::ok("here")
            }
        })
    }))
    .await;
    let proxy = TestProxy::start(&policy("metered", &[("app", backend.addr)], "")).await;
    let client = http1_client();
    let (found, missing) = (5, 2);
    for i in 0..found + missing {
        let path = if i < found { "/found" } else { "/missing" };
        let answer = send(
            &client,
            Request::get(proxy.url("metered", path))
                .body(Full::default())
                .unwrap(),
        )
        .await;
        assert_eq!(answer.status, if i < found { 200 } else { 404 });
    }

    let answer = get(&proxy.admin_url("/metrics")).await;
    assert_eq!(answer.status, 200, "/metrics should answer 200");
    assert!(
        content_type(&answer).starts_with("text/plain; version=0.0.4"),
        "text exposition content type, got {:?}",
        content_type(&answer)
    );
    let text = answer.text();
    let families = parse_exposition(&text)
        .unwrap_or_else(|e| panic!("/metrics should be valid Prometheus text: {e}\n{text}"));

    for (name, kind) in REQUIRED_FAMILIES {
        if *name == "rate_limit_rejected_total" {
            // Checked on its own below (it has no samples yet).
            continue;
        }
        let family = families
            .get(*name)
            .unwrap_or_else(|| panic!("{name} should be exported:\n{text}"));
        assert_eq!(family.kind, *kind, "{name} should be a {kind}");
    }

    let policy = "default/metered";
    let requests = &families["proxy_requests_total"];
    let total: f64 = requests.samples.iter().map(|s| s.value).sum();
    assert_eq!(
        total,
        f64::from(found + missing),
        "proxy_requests_total should equal the {} requests sent:\n{text}",
        found + missing
    );
    for (code, count) in [("200", found), ("404", missing)] {
        let counted: f64 = requests
            .samples
            .iter()
            .filter(|s| {
                s.label("code") == Some(code)
                    && s.label("policy") == Some(policy)
                    && s.label("backend") == Some("app")
            })
            .map(|s| s.value)
            .sum();
        assert_eq!(
            counted,
            f64::from(count),
            "{count} requests answered {code}:\n{text}"
        );
    }
    for histogram in [
        "proxy_request_duration_seconds",
        "proxy_upstream_duration_seconds",
    ] {
        let count: f64 = families[histogram]
            .samples
            .iter()
            .filter(|s| s.name == format!("{histogram}_count"))
            .map(|s| s.value)
            .sum();
        assert_eq!(
            count,
            f64::from(found + missing),
            "{histogram}_count should equal the requests sent:\n{text}"
        );
    }
    let endpoint = backend.addr.to_string();
    let health = families["backend_health"]
        .samples
        .iter()
        .find(|s| s.label("endpoint") == Some(endpoint.as_str()))
        .unwrap_or_else(|| panic!("backend_health should have the endpoint {endpoint}:\n{text}"));
    assert_eq!(health.value, 1.0, "the endpoint is healthy");
    let breaker = families["circuit_breaker_state"]
        .samples
        .iter()
        .find(|s| s.label("endpoint") == Some(endpoint.as_str()))
        .unwrap_or_else(|| panic!("circuit_breaker_state should have {endpoint}:\n{text}"));
    assert_eq!(breaker.value, 0.0, "the breaker is closed");
    assert_eq!(
        families["config_reload_failures_total"].samples[0].value, 0.0,
        "no reload has failed"
    );
    let active = families["proxy_active_connections"]
        .samples
        .iter()
        .find(|s| s.label("policy") == Some(policy))
        .unwrap_or_else(|| panic!("proxy_active_connections should have {policy}:\n{text}"));
    assert!(
        active.value >= 1.0 && active.value <= f64::from(found + missing),
        "the client's keep-alive connection is open, got {}",
        active.value
    );
}

#[tokio::test]
async fn metrics_declare_every_family_even_before_its_first_sample() {
    // A dashboard or alert on `rate_limit_rejected_total` needs the family to exist before the
    // first rejection; at least its HELP and TYPE lines must be there.
    let backend = Backend::text("ok").await;
    let proxy = TestProxy::start(&policy("declared", &[("app", backend.addr)], "")).await;
    assert_eq!(get(&proxy.url("declared", "/")).await.status, 200);
    let text = get(&proxy.admin_url("/metrics")).await.text();
    let families = parse_exposition(&text)
        .unwrap_or_else(|e| panic!("/metrics should be valid Prometheus text: {e}\n{text}"));
    let missing: Vec<&str> = REQUIRED_FAMILIES
        .iter()
        .filter(|(name, kind)| families.get(*name).is_none_or(|f| f.kind != *kind))
        .map(|(name, _)| *name)
        .collect();
    assert!(
        missing.is_empty(),
        "every required family should be declared with # HELP and # TYPE; missing {missing:?}:\n{text}"
    );
}

#[test]
fn the_exposition_parser_is_strict() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\"} 3\n\
                # HELP h H.\n# TYPE h histogram\nh_bucket{le=\"0.5\"} 1\nh_bucket{le=\"+Inf\"} 2\n\
                h_sum 0.7\nh_count 2\n";
    let families = parse_exposition(good).expect("a valid exposition");
    assert_eq!(families["a_total"].samples[0].label("y"), Some("q\""));
    assert_eq!(families["h"].samples.len(), 4);
    let bad = [
        ("no TYPE", "# HELP a A.\na 1\n"),
        ("no HELP", "# TYPE a gauge\na 1\n"),
        ("undeclared sample", "# HELP a A.\n# TYPE a gauge\nb 1\n"),
        ("bad value", "# HELP a A.\n# TYPE a gauge\na one\n"),
        (
            "bad label name",
            "# HELP a A.\n# TYPE a gauge\na{1x=\"v\"} 1\n",
        ),
        ("unquoted label", "# HELP a A.\n# TYPE a gauge\na{x=v} 1\n"),
        ("bad metric name", "# HELP a A.\n# TYPE a gauge\n1a 1\n"),
        ("unknown type", "# HELP a A.\n# TYPE a meter\na 1\n"),
        (
            "duplicate series",
            "# HELP a A.\n# TYPE a gauge\na 1\na 2\n",
        ),
        ("negative counter", "# HELP a A.\n# TYPE a counter\na -1\n"),
        (
            "histogram without +Inf",
            "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",
        ),
        (
            "decreasing buckets",
            "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
        ),
        ("no final newline", "# HELP a A.\n# TYPE a gauge\na 1"),
        (
            "family declared twice",
            "# HELP a A.\n# TYPE a gauge\na 1\n# HELP a A.\n# TYPE a gauge\na{x=\"y\"} 1\n",
        ),
    ];
    for (what, text) in bad {
        assert!(
            parse_exposition(text).is_err(),
            "the parser should reject {what}:\n{text}"
        );
    }
}

/// One metric family of a text exposition.
#[derive(Debug)]
struct Family {
    kind: String,
    samples: Vec<Sample>,
}

/// One sample line.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Sample {
    fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses Prometheus text format 0.0.4 strictly: every family has `# HELP` and `# TYPE` before
/// its samples, samples of a family are contiguous and belong to it (`_bucket`/`_sum`/`_count`
/// for histograms and summaries), names, labels and values are well formed, no series repeats,
/// counters are non-negative, and histogram buckets are cumulative up to `+Inf` == `_count`.
fn parse_exposition(text: &str) -> Result<BTreeMap<String, Family>, String> {
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("the exposition must end with a line feed".to_owned());
    }
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut helped: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    let mut closed: HashSet<String> = HashSet::new();
    let mut series: HashSet<String> = HashSet::new();
    for (index, line) in text.lines().enumerate() {
        let at = |msg: String| format!("line {}: {msg}: {line:?}", index + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            let keyword = words.next().unwrap_or("");
            if keyword != "HELP" && keyword != "TYPE" {
                continue; // A plain comment.
            }
            let name = words.next().unwrap_or("");
            let rest = words.next().unwrap_or("");
            if !valid_metric_name(name) {
                return Err(at(format!("invalid metric name {name:?}")));
            }
            if current.as_deref() != Some(name) {
                if let Some(previous) = current.take() {
                    closed.insert(previous);
                }
                if closed.contains(name) {
                    return Err(at(format!("family {name} declared again")));
                }
                current = Some(name.to_owned());
            }
            if keyword == "HELP" {
                if !helped.insert(name.to_owned()) {
                    return Err(at(format!("second HELP for {name}")));
                }
                check_help_escapes(rest).map_err(at)?;
            } else {
                if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&rest) {
                    return Err(at(format!("unknown type {rest:?}")));
                }
                if families.contains_key(name) {
                    return Err(at(format!("second TYPE for {name}")));
                }
                families.insert(
                    name.to_owned(),
                    Family {
                        kind: rest.to_owned(),
                        samples: Vec::new(),
                    },
                );
            }
            continue;
        }
        let sample = parse_sample(line).map_err(at)?;
        let Some(family_name) = current.clone() else {
            return Err(at("sample before any # HELP / # TYPE".to_owned()));
        };
        let Some(family) = families.get_mut(&family_name) else {
            return Err(at(format!("family {family_name} has no # TYPE")));
        };
        if !helped.contains(&family_name) {
            return Err(at(format!("family {family_name} has no # HELP")));
        }
        let belongs = match family.kind.as_str() {
            "histogram" => ["_bucket", "_sum", "_count"]
                .iter()
                .any(|suffix| sample.name == format!("{family_name}{suffix}")),
            "summary" => {
                sample.name == family_name
                    || ["_sum", "_count"]
                        .iter()
                        .any(|suffix| sample.name == format!("{family_name}{suffix}"))
            }
            _ => sample.name == family_name,
        };
        if !belongs {
            return Err(at(format!(
                "sample {} does not belong to the declared family {family_name} ({})",
                sample.name, family.kind
            )));
        }
        if family.kind == "counter" && (sample.value.is_nan() || sample.value < 0.0) {
            return Err(at("a counter must be a non-negative number".to_owned()));
        }
        let mut key_labels = sample.labels.clone();
        key_labels.sort();
        if !series.insert(format!("{}{key_labels:?}", sample.name)) {
            return Err(at("duplicate series".to_owned()));
        }
        family.samples.push(sample);
    }
    for (name, family) in &families {
        if !helped.contains(name) {
            return Err(format!("family {name} has # TYPE but no # HELP"));
        }
        if family.kind == "histogram" {
            check_histogram(name, family)?;
        }
    }
    if let Some(name) = helped.iter().find(|n| !families.contains_key(*n)) {
        return Err(format!("family {name} has # HELP but no # TYPE"));
    }
    Ok(families)
}

/// A label set without `le`.
type Labels = Vec<(String, String)>;
/// `(upper bound, cumulative count)` per bucket, and the `_count` sample.
type Buckets = (Vec<(f64, f64)>, Option<f64>);

/// Buckets cumulative in `le` order, ending at `+Inf` equal to `_count`, per label set.
fn check_histogram(name: &str, family: &Family) -> Result<(), String> {
    let mut groups: BTreeMap<Labels, Buckets> = BTreeMap::new();
    for sample in &family.samples {
        let mut labels: Vec<_> = sample
            .labels
            .iter()
            .filter(|(n, _)| n != "le")
            .cloned()
            .collect();
        labels.sort();
        let group = groups.entry(labels).or_default();
        if sample.name.ends_with("_bucket") {
            let le = sample
                .label("le")
                .ok_or_else(|| format!("{name}: a bucket without le"))?;
            let bound = parse_float(le).ok_or_else(|| format!("{name}: invalid le {le:?}"))?;
            group.0.push((bound, sample.value));
        } else if sample.name.ends_with("_count") {
            group.1 = Some(sample.value);
        }
    }
    for (labels, (mut buckets, count)) in groups {
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        if buckets.last().map(|b| b.0) != Some(f64::INFINITY) {
            return Err(format!("{name}{labels:?}: no le=\"+Inf\" bucket"));
        }
        if buckets.windows(2).any(|w| w[1].1 < w[0].1) {
            return Err(format!("{name}{labels:?}: buckets are not cumulative"));
        }
        if count != buckets.last().map(|b| b.1) {
            return Err(format!("{name}{labels:?}: +Inf bucket differs from _count"));
        }
    }
    Ok(())
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).unwrap_or(line.len());
    let name = &line[..name_end];
    if !valid_metric_name(name) {
        return Err(format!("invalid metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        loop {
            match chars.peek() {
                Some((i, '}')) => {
                    rest = &after[i + 1..];
                    break;
                }
                Some(_) => {}
                None => return Err("unterminated label set".to_owned()),
            }
            let start = chars.peek().map_or(0, |(i, _)| *i);
            let mut end = start;
            while let Some((i, c)) = chars.peek() {
                if *c == '=' {
                    break;
                }
                end = i + c.len_utf8();
                chars.next();
            }
            let label = &after[start..end];
            if !valid_label_name(label) {
                return Err(format!("invalid label name {label:?}"));
            }
            if labels.iter().any(|(n, _)| n == label) {
                return Err(format!("label {label} repeated"));
            }
            if chars.next().map(|(_, c)| c) != Some('=')
                || chars.next().map(|(_, c)| c) != Some('"')
            {
                return Err(format!("label {label}: expected =\"value\""));
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '"')) => break,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        other => return Err(format!("invalid escape {other:?} in label {label}")),
                    },
                    Some((_, '\n')) | None => {
                        return Err(format!("unterminated value of label {label}"));
                    }
                    Some((_, c)) => value.push(c),
                }
            }
            labels.push((label.to_owned(), value));
            match chars.peek() {
                Some((_, ',')) => {
                    chars.next();
                }
                Some((_, '}')) => {}
                _ => return Err(format!("expected , or }} after label {label}")),
            }
        }
    }
    let rest = rest
        .strip_prefix(' ')
        .ok_or("expected a space before the value")?;
    let mut fields = rest.split(' ');
    let value_text = fields.next().unwrap_or("");
    let value = parse_float(value_text).ok_or_else(|| format!("invalid value {value_text:?}"))?;
    if let Some(timestamp) = fields.next() {
        timestamp
            .parse::<i64>()
            .map_err(|_| format!("invalid timestamp {timestamp:?}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing fields after the timestamp".to_owned());
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// A Go `ParseFloat` style value: decimal or scientific, `+Inf`, `-Inf`, `NaN`.
fn parse_float(text: &str) -> Option<f64> {
    match text {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ if text
            .bytes()
            .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b))
            && text.bytes().any(|b| b.is_ascii_digit()) =>
        {
            text.parse().ok()
        }
        _ => None,
    }
}

fn valid_metric_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_' || b == b':')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
}

fn valid_label_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    !name.starts_with("__")
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// HELP text may only escape `\\` and `\n`.
fn check_help_escapes(help: &str) -> Result<(), String> {
    let mut chars = help.chars();
    while let Some(c) = chars.next() {
        if c == '\\' && !matches!(chars.next(), Some('\\' | 'n')) {
            return Err("invalid escape in HELP text".to_owned());
        }
    }
    Ok(())
}
