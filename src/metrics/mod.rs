//! Every metric family Breakwater exports, registered once in a registry the proxy owns.
//!
//! Never the process-global default registry: parallel tests (and several proxies in one
//! process) must not collide.

mod histogram;

use std::sync::{Arc, OnceLock};

use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub use histogram::{HistogramFamily, ShardedHistogram};

/// Latency buckets in seconds, from sub-millisecond loopback hops to the default 15 s request timeout.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0,
    30.0,
];

/// The metric families.
pub struct Metrics {
    registry: Registry,
    /// (name, help, type) of every family, so empty ones are still declared in the exposition.
    declared: Vec<(String, String, &'static str)>,
    /// Requests answered, by policy, backend (`none` when no endpoint was chosen) and status code.
    pub requests: IntCounterVec,
    /// Time from request arrival to response headers, by policy and backend.
    pub request_duration: HistogramFamily,
    /// Time from sending one attempt to its response headers, by policy and backend.
    pub upstream_duration: HistogramFamily,
    /// Failed requests by policy and cause (the same cause as the `x-breakwater-error` header).
    pub errors: IntCounterVec,
    /// 1 when an endpoint is considered healthy, by policy, backend and endpoint.
    pub backend_health: IntGaugeVec,
    /// 0 closed, 1 open, 2 half-open, by policy, backend and endpoint.
    pub circuit_breaker_state: IntGaugeVec,
    /// Breaker transitions by policy, backend, endpoint, target state and reason.
    pub circuit_breaker_transitions: IntCounterVec,
    /// Retries sent, by policy and reason.
    pub retries: IntCounterVec,
    /// Retries refused because the retry budget was spent, by policy.
    pub retry_budget_exhausted: IntCounterVec,
    /// Requests refused by an overload limit, by policy and limit.
    pub overload_rejected: IntCounterVec,
    /// Requests rejected by a rate limit, by policy and scope (also counted in dry-run mode).
    pub rate_limit_rejected: IntCounterVec,
    /// Client keys tracked by per-client rate limits, by policy.
    pub rate_limit_keys: IntGaugeVec,
    /// Idle client keys evicted from per-client tables, by policy.
    pub rate_limit_key_evictions: IntCounterVec,
    /// Client connections open, by policy.
    pub active_connections: IntGaugeVec,
    /// Client connections accepted, by policy.
    pub connections: IntCounterVec,
    /// Client connections refused at accept, by policy and reason.
    pub connections_rejected: IntCounterVec,
    /// WebSocket sessions open, by policy.
    pub websocket_sessions_active: IntGaugeVec,
    /// WebSocket sessions started, by policy.
    pub websocket_sessions: IntCounterVec,
    /// Requests answered from the response cache (`x-cache: HIT`), by policy.
    pub cache_hits: IntCounterVec,
    /// Cacheable requests the backend had to answer (`x-cache: MISS`), by policy.
    pub cache_misses: IntCounterVec,
    /// Stale responses served because the backend failed (`x-cache: STALE`), by policy.
    pub cache_stale_served: IntCounterVec,
    /// Hits that waited for another request's fetch of the same URL, by policy.
    pub cache_coalesced: IntCounterVec,
    /// Entries evicted to make room, by policy.
    pub cache_evictions: IntCounterVec,
    /// Entries held, by policy.
    pub cache_entries: IntGaugeVec,
    /// Bytes held (bodies, headers and bookkeeping), by policy.
    pub cache_bytes: IntGaugeVec,
    /// Configurations applied (the first load included).
    pub config_reloads: IntCounter,
    /// Configurations rejected; the last good one kept serving.
    pub config_reload_failures: IntCounter,
    /// Unix time of the last applied configuration.
    pub config_last_reload_success: IntGauge,
    /// Version of the snapshot currently serving.
    pub config_version: IntGauge,
}

/// What went wrong registering a metric (only possible through a programming error).
#[derive(Debug, thiserror::Error)]
#[error("registering metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

impl Metrics {
    /// Creates the families in a fresh registry.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let counter_vec =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, MetricsError> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let gauge_vec =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec, MetricsError> {
                let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(g.clone()))?;
                Ok(g)
            };
        let histogram_vec =
            |name: &str, help: &str, labels: &[&str]| -> Result<HistogramFamily, MetricsError> {
                let h = HistogramFamily::new(name, help, labels, LATENCY_BUCKETS)?;
                registry.register(Box::new(h.clone()))?;
                Ok(h)
            };
        let metrics = Self {
            requests: counter_vec(
                "proxy_requests_total",
                "Requests answered by the proxy.",
                &["policy", "backend", "code"],
            )?,
            request_duration: histogram_vec(
                "proxy_request_duration_seconds",
                "Time from request arrival to response headers.",
                &["policy", "backend"],
            )?,
            upstream_duration: histogram_vec(
                "proxy_upstream_duration_seconds",
                "Time from sending one upstream attempt to its response headers.",
                &["policy", "backend"],
            )?,
            errors: counter_vec(
                "proxy_errors_total",
                "Requests the proxy answered with an error of its own, by cause.",
                &["policy", "cause"],
            )?,
            backend_health: gauge_vec(
                "backend_health",
                "1 when the endpoint is considered healthy, 0 otherwise.",
                &["policy", "backend", "endpoint"],
            )?,
            circuit_breaker_state: gauge_vec(
                "circuit_breaker_state",
                "Circuit breaker state per endpoint: 0 closed, 1 open, 2 half-open.",
                &["policy", "backend", "endpoint"],
            )?,
            circuit_breaker_transitions: counter_vec(
                "circuit_breaker_transitions_total",
                "Circuit breaker state changes.",
                &["policy", "backend", "endpoint", "to", "reason"],
            )?,
            retries: counter_vec(
                "proxy_retries_total",
                "Retry attempts sent, by the reason the previous attempt failed.",
                &["policy", "reason"],
            )?,
            retry_budget_exhausted: counter_vec(
                "proxy_retry_budget_exhausted_total",
                "Retries not sent because the retry budget was spent.",
                &["policy"],
            )?,
            overload_rejected: counter_vec(
                "proxy_overload_rejected_total",
                "Requests refused by an overload limit.",
                &["policy", "limit"],
            )?,
            rate_limit_rejected: counter_vec(
                "rate_limit_rejected_total",
                "Requests rejected by a rate limit.",
                &["policy", "scope"],
            )?,
            rate_limit_keys: gauge_vec(
                "rate_limit_keys",
                "Client keys tracked by the per-client rate limit.",
                &["policy"],
            )?,
            rate_limit_key_evictions: counter_vec(
                "rate_limit_key_evictions_total",
                "Idle client keys evicted from the per-client rate-limit table.",
                &["policy"],
            )?,
            active_connections: gauge_vec(
                "proxy_active_connections",
                "Client connections currently open.",
                &["policy"],
            )?,
            connections: counter_vec(
                "proxy_connections_total",
                "Client connections accepted.",
                &["policy"],
            )?,
            connections_rejected: counter_vec(
                "proxy_connections_rejected_total",
                "Client connections closed at accept, by reason.",
                &["policy", "reason"],
            )?,
            websocket_sessions_active: gauge_vec(
                "websocket_sessions_active",
                "WebSocket sessions currently open.",
                &["policy"],
            )?,
            websocket_sessions: counter_vec(
                "websocket_sessions_total",
                "WebSocket sessions established.",
                &["policy"],
            )?,
            cache_hits: counter_vec(
                "cache_hits_total",
                "Requests answered from the response cache.",
                &["policy"],
            )?,
            cache_misses: counter_vec(
                "cache_misses_total",
                "Cacheable requests the backend had to answer.",
                &["policy"],
            )?,
            cache_stale_served: counter_vec(
                "cache_stale_served_total",
                "Stale cached responses served because the backend failed.",
                &["policy"],
            )?,
            cache_coalesced: counter_vec(
                "cache_coalesced_total",
                "Cache hits that waited for a concurrent request's fetch of the same URL.",
                &["policy"],
            )?,
            cache_evictions: counter_vec(
                "cache_evictions_total",
                "Cached responses evicted to make room.",
                &["policy"],
            )?,
            cache_entries: gauge_vec("cache_entries", "Cached responses held.", &["policy"])?,
            cache_bytes: gauge_vec(
                "cache_bytes",
                "Bytes held by the response cache.",
                &["policy"],
            )?,
            config_reloads: {
                let c = IntCounter::new("config_reloads_total", "Configurations applied.")?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            config_reload_failures: {
                let c = IntCounter::new(
                    "config_reload_failures_total",
                    "Configurations rejected; the last good configuration kept serving.",
                )?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            config_last_reload_success: {
                let g = IntGauge::new(
                    "config_last_reload_success_timestamp_seconds",
                    "Unix time of the last applied configuration.",
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            config_version: {
                let g = IntGauge::new(
                    "config_version",
                    "Version of the configuration snapshot serving.",
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            registry,
            declared: Vec::new(),
        };
        let mut declared = Vec::new();
        {
            use prometheus::core::Collector;
            let families: [(&dyn Collector, &'static str); 25] = [
                (&metrics.cache_hits, "counter"),
                (&metrics.cache_misses, "counter"),
                (&metrics.cache_stale_served, "counter"),
                (&metrics.cache_coalesced, "counter"),
                (&metrics.cache_evictions, "counter"),
                (&metrics.cache_entries, "gauge"),
                (&metrics.cache_bytes, "gauge"),
                (&metrics.rate_limit_keys, "gauge"),
                (&metrics.rate_limit_key_evictions, "counter"),
                (&metrics.circuit_breaker_transitions, "counter"),
                (&metrics.retries, "counter"),
                (&metrics.retry_budget_exhausted, "counter"),
                (&metrics.overload_rejected, "counter"),
                (&metrics.requests, "counter"),
                (&metrics.request_duration, "histogram"),
                (&metrics.upstream_duration, "histogram"),
                (&metrics.errors, "counter"),
                (&metrics.backend_health, "gauge"),
                (&metrics.circuit_breaker_state, "gauge"),
                (&metrics.rate_limit_rejected, "counter"),
                (&metrics.active_connections, "gauge"),
                (&metrics.connections, "counter"),
                (&metrics.connections_rejected, "counter"),
                (&metrics.websocket_sessions_active, "gauge"),
                (&metrics.websocket_sessions, "counter"),
            ];
            for (collector, kind) in families {
                for desc in collector.desc() {
                    declared.push((desc.fq_name.clone(), desc.help.clone(), kind));
                }
            }
        }
        let metrics = Metrics {
            declared,
            ..metrics
        };
        let build_info = IntGaugeVec::new(
            Opts::new(
                "breakwater_build_info",
                "Always 1; labels carry the version.",
            ),
            &["version"],
        )?;
        metrics.registry.register(Box::new(build_info.clone()))?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Ok(metrics)
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families; an error would leave `buf` short.
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(%err, "encoding metrics");
        }
        let mut text = String::from_utf8(buf).unwrap_or_default();
        // The client library omits families without series; declare them anyway so dashboards
        // and alerts can rely on every family existing from the start.
        for (name, help, kind) in &self.declared {
            if !text.contains(&format!("# TYPE {name} ")) {
                text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            }
        }
        text
    }

    /// The registry, for callers that add families of their own.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

/// Pre-resolved per-backend handles so the request path does no label hashing.
pub struct BackendMetrics {
    policy: String,
    backend: String,
    requests: IntCounterVec,
    by_code: Box<[OnceLock<IntCounter>]>,
    /// Request duration for this backend.
    pub request_duration: Arc<ShardedHistogram>,
    /// Upstream attempt duration for this backend (`None` for the `none` pseudo-backend).
    pub upstream_duration: Option<Arc<ShardedHistogram>>,
}

impl BackendMetrics {
    /// Resolves the handles for `policy` / `backend`.
    pub fn new(metrics: &Metrics, policy: &str, backend: &str) -> Self {
        let mut resolved = Self::unrouted_with(metrics, policy, backend);
        resolved.upstream_duration = Some(
            metrics
                .upstream_duration
                .with_label_values(&[policy, backend]),
        );
        resolved
    }

    /// Handles for requests that never reached a backend (`backend="none"`).
    pub fn unrouted(metrics: &Metrics, policy: &str) -> Self {
        Self::unrouted_with(metrics, policy, "none")
    }

    fn unrouted_with(metrics: &Metrics, policy: &str, backend: &str) -> Self {
        Self {
            policy: policy.to_owned(),
            backend: backend.to_owned(),
            requests: metrics.requests.clone(),
            by_code: (100..600).map(|_| OnceLock::new()).collect(),
            request_duration: metrics
                .request_duration
                .with_label_values(&[policy, backend]),
            upstream_duration: None,
        }
    }

    /// Counts one answered request with `status`.
    pub fn count(&self, status: u16) {
        let Some(slot) = status
            .checked_sub(100)
            .and_then(|i| self.by_code.get(usize::from(i)))
        else {
            return;
        };
        slot.get_or_init(|| {
            self.requests.with_label_values(&[
                self.policy.as_str(),
                self.backend.as_str(),
                &status.to_string(),
            ])
        })
        .inc();
    }
}

/// Pre-resolved per-policy cache handles.
pub struct CacheMetrics {
    /// `cache_hits_total` for the policy.
    pub hits: IntCounter,
    /// `cache_misses_total` for the policy.
    pub misses: IntCounter,
    /// `cache_stale_served_total` for the policy.
    pub stale_served: IntCounter,
    /// `cache_coalesced_total` for the policy.
    pub coalesced: IntCounter,
    /// `cache_evictions_total` for the policy.
    pub evictions: IntCounter,
    /// `cache_entries` for the policy.
    pub entries: IntGauge,
    /// `cache_bytes` for the policy.
    pub bytes: IntGauge,
}

impl CacheMetrics {
    /// Resolves the handles for `policy`.
    pub fn new(metrics: &Metrics, policy: &str) -> Self {
        let label = [policy];
        Self {
            hits: metrics.cache_hits.with_label_values(&label),
            misses: metrics.cache_misses.with_label_values(&label),
            stale_served: metrics.cache_stale_served.with_label_values(&label),
            coalesced: metrics.cache_coalesced.with_label_values(&label),
            evictions: metrics.cache_evictions.with_label_values(&label),
            entries: metrics.cache_entries.with_label_values(&label),
            bytes: metrics.cache_bytes.with_label_values(&label),
        }
    }
}
