//! The operator's metric families, in a registry of their own (never the global one).

use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::metrics::MetricsError;

/// Results `operator_reconciles_total` counts.
pub const RESULTS: &[&str] = &["written", "unchanged", "not_leader", "error"];

/// Results `webhook_requests_total` counts: the injection outcomes, plus `dry_run` (every
/// dry-run review, whatever its outcome, so dry runs never count as injections).
pub const WEBHOOK_RESULTS: &[&str] = &[
    "injected",
    "skipped",
    "already_injected",
    "invalid",
    "error",
    "dry_run",
];

/// Everything the operator counts.
pub struct OperatorMetrics {
    registry: Registry,
    /// 1 while this replica holds the Lease.
    pub leader: IntGauge,
    /// Reconciles by result (`written`, `unchanged`, `not_leader`, `error`).
    pub reconciles: IntCounterVec,
    /// Successful status writes.
    pub status_writes: IntCounter,
    /// Policies by whether they are accepted (`accepted="true|false"`), as last derived.
    pub policies: IntGaugeVec,
    /// Kubernetes Events published, by condition type.
    pub events: IntCounterVec,
    /// Watch stream errors, by resource.
    pub watch_errors: IntCounterVec,
    /// 1 once the policy, Service and EndpointSlice caches completed their first list.
    pub synced: IntGauge,
    /// Injection webhook reviews by result (see [`WEBHOOK_RESULTS`]).
    pub webhook_requests: IntCounterVec,
    /// Webhook certificate (re)loads from disk, by result (`loaded`, `failed`).
    pub webhook_certificate_reloads: IntCounterVec,
}

impl OperatorMetrics {
    /// Creates the families in a fresh registry.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let leader = IntGauge::new("operator_leader", "1 while this replica holds the lease")?;
        let reconciles = IntCounterVec::new(
            Opts::new("operator_reconciles_total", "Policy reconciles by result"),
            &["result"],
        )?;
        let status_writes = IntCounter::new(
            "operator_status_writes_total",
            "Status writes (server-side apply) that succeeded",
        )?;
        let policies = IntGaugeVec::new(
            Opts::new(
                "operator_policies",
                "Policies known, by whether they are accepted",
            ),
            &["accepted"],
        )?;
        let events = IntCounterVec::new(
            Opts::new(
                "operator_events_total",
                "Kubernetes Events published, by condition type",
            ),
            &["type"],
        )?;
        let watch_errors = IntCounterVec::new(
            Opts::new("operator_watch_errors_total", "Watch errors, by resource"),
            &["resource"],
        )?;
        let synced = IntGauge::new(
            "operator_caches_synced",
            "1 once every watched resource completed its first list",
        )?;
        let webhook_requests = IntCounterVec::new(
            Opts::new(
                "webhook_requests_total",
                "Sidecar injection reviews answered, by result",
            ),
            &["result"],
        )?;
        let webhook_certificate_reloads = IntCounterVec::new(
            Opts::new(
                "webhook_certificate_reloads_total",
                "Webhook serving certificate loads from disk, by result",
            ),
            &["result"],
        )?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(status_writes.clone()))?;
        registry.register(Box::new(policies.clone()))?;
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(watch_errors.clone()))?;
        registry.register(Box::new(synced.clone()))?;
        registry.register(Box::new(webhook_requests.clone()))?;
        registry.register(Box::new(webhook_certificate_reloads.clone()))?;
        for result in RESULTS {
            reconciles.with_label_values(&[*result]);
        }
        for accepted in ["true", "false"] {
            policies.with_label_values(&[accepted]);
        }
        for result in WEBHOOK_RESULTS {
            webhook_requests.with_label_values(&[*result]);
        }
        for result in ["loaded", "failed"] {
            webhook_certificate_reloads.with_label_values(&[result]);
        }
        Ok(OperatorMetrics {
            registry,
            leader,
            reconciles,
            status_writes,
            policies,
            events,
            watch_errors,
            synced,
            webhook_requests,
            webhook_certificate_reloads,
        })
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(%err, "encoding operator metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// The registry, for callers that add families of their own.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}
