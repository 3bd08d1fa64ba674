//! The `ResiliencePolicy` spec types: the file format and (later) the CRD schema, as users write them.
//!
//! Everything here is *unvalidated* user input: durations and sizes are kept as written and only
//! turned into runtime values by [`crate::config::compile`], which reports every problem with its
//! field path.
//!
//! The same types are the CRD schema: `#[schemars(...)]` attributes add what the API server
//! can check before anything reaches a sidecar (patterns, bounds, enums, CEL rules between
//! fields). They only narrow what [`crate::config::compile`] accepts, never widen it.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::schema::{DURATION_PATTERN, int_or_string, size_quantity, without_default};

/// The API group and version every policy document must declare.
pub const API_VERSION: &str = "breakwater.io/v1alpha1";
/// The kind every policy document must declare.
pub const KIND: &str = "ResiliencePolicy";

/// One `ResiliencePolicy` document as it appears in a YAML file (the same shape `kubectl apply` takes).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyDocument {
    /// Must be [`API_VERSION`].
    pub api_version: String,
    /// Must be [`KIND`].
    pub kind: String,
    /// Name and namespace identify the policy in logs, metrics and status.
    pub metadata: PolicyMetadata,
    /// The desired behaviour.
    #[serde(default)]
    pub spec: ResiliencePolicySpec,
}

/// The subset of Kubernetes object metadata a policy file uses.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyMetadata {
    /// Policy name; required.
    #[serde(default)]
    pub name: String,
    /// Namespace; `default` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Labels are accepted (and ignored by the data plane) so cluster manifests load unchanged.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations are accepted and ignored, as for labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A byte size written as a plain number of bytes or a string with a suffix (`64Ki`, `10Mi`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(untagged)]
#[schemars(transform = size_quantity)]
pub enum Quantity {
    /// Plain bytes.
    Bytes(u64),
    /// A number with a binary (`Ki`, `Mi`, `Gi`) or decimal (`k`, `M`, `G`) suffix.
    Text(String),
}

/// What a policy asks of the proxy. Every field has a default, so the smallest policy is one backend.
// The `CustomResource` derive generates the `ResiliencePolicy` root type (metadata, this spec and
// `crate::kube::ResiliencePolicyStatus`). It has to sit on the spec type itself because the file
// format and the cluster share this one type; only `crate::kube` uses the root.
// Two printer columns share `type_ = "integer"`, which clippy mistakes for a repeated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema, CustomResource)]
#[kube(
    group = "breakwater.io",
    version = "v1alpha1",
    kind = "ResiliencePolicy",
    namespaced,
    shortname = "rp",
    category = "breakwater",
    status = "crate::kube::ResiliencePolicyStatus",
    derive = "PartialEq",
    doc = "Timeouts, retries, circuit breakers, health checks and rate limits that Breakwater sidecars apply in front of a set of backends.",
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status",
        description = "Whether the spec is valid"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.backends.ready",
        description = "Backends with at least one ready endpoint"
    ),
    printcolumn(
        name = "Backends",
        type_ = "integer",
        json_path = ".status.backends.total",
        description = "Backends in the spec",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResiliencePolicySpec {
    /// Which pods' sidecars apply this policy (cluster only; empty selects every pod in the namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelectorSpec>,
    /// Where the proxy listens for this policy's traffic.
    #[serde(default)]
    pub listener: ListenerSpec,
    /// Where traffic goes. At least one backend is required.
    // A map list keyed by name: names stay unique and server-side apply merges by backend.
    #[serde(default)]
    #[schemars(
        transform = without_default,
        length(min = 1, max = 100),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"])
    )]
    pub backends: Vec<BackendSpec>,
    /// How an endpoint is chosen for each request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancing: Option<LoadBalancingSpec>,
    /// Time limits for connecting, for each attempt, for the whole request and for idle clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<TimeoutsSpec>,
    /// Retries with backoff and a budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    /// Per-endpoint circuit breaking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerSpec>,
    /// Concurrency limits per backend set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overload: Option<OverloadSpec>,
    /// Active HTTP health checks of every endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckSpec>,
    /// Request rate limits, global and per client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    /// Shared HTTP response cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSpec>,
    /// WebSocket (HTTP/1.1 Upgrade) proxying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub websocket: Option<WebSocketSpec>,
    /// Limits on request sizes and connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsSpec>,
    /// Forwarding headers and header removal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forwarding: Option<ForwardingSpec>,
}

/// A Kubernetes label selector.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelectorSpec {
    /// Labels that must all be present with these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    /// Set-based requirements, all of which must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirementSpec>,
}

/// One set-based label requirement (`In`, `NotIn`, `Exists`, `DoesNotExist`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelectorRequirementSpec {
    /// The label key.
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    #[schemars(extend("enum" = ["In", "NotIn", "Exists", "DoesNotExist"]))]
    pub operator: String,
    /// Values for `In` / `NotIn`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// The traffic listener of a policy.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerSpec {
    /// TCP port; default 8080. 0 lets the OS choose a free port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// IP address to bind; default `0.0.0.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Serve TLS (ALPN h2 and http/1.1) with this certificate chain and key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTlsSpec>,
}

/// PEM files for a TLS listener.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerTlsSpec {
    /// PEM certificate chain, leaf first.
    pub cert_file: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
}

/// One backend: exactly one of `url`, `dns` or `service`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "[has(self.url), has(self.dns), has(self.service)].filter(x, x).size() == 1",
    "message": "exactly one of url, dns or service must be set"
}]))]
pub struct BackendSpec {
    /// Name used in metrics, logs and `/backends/health`; unique within the policy.
    pub name: String,
    /// A static `http://` or `https://` URL (scheme, host and port only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^https?://"))]
    pub url: Option<String>,
    /// `host:port` re-resolved every `dnsRefresh`; every address is an endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<String>,
    /// A Kubernetes Service, resolved through its EndpointSlices (cluster only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRefSpec>,
    /// Relative share for the `Weighted` algorithm, applied to each endpoint of this backend; default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub weight: Option<u32>,
    /// `Http1` (default) or `H2` (prior knowledge on plain TCP, ALPN over TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<UpstreamProtocol>,
    /// TLS towards this backend (implied by an `https://` URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<BackendTlsSpec>,
    /// How often `dns` backends are re-resolved; default 5s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN), length(max = 32))]
    pub dns_refresh: Option<String>,
    /// `false` exempts this backend's endpoints from `spec.healthCheck`; default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<bool>,
}

/// A reference to a Kubernetes Service port.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceRefSpec {
    /// Service name.
    #[schemars(pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    pub name: String,
    /// Namespace; defaults to the policy's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Port number or port name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortRef>,
}

/// A Service port given by number or by name.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(untagged)]
#[schemars(transform = int_or_string)]
pub enum PortRef {
    /// Port number.
    Number(u16),
    /// Port name.
    Name(String),
}

/// Upstream HTTP protocol.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, Hash, JsonSchema)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with pooled keep-alive connections.
    #[default]
    Http1,
    /// HTTP/2.
    H2,
}

/// TLS settings towards a backend.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendTlsSpec {
    /// PEM bundle of CAs to trust instead of the built-in web PKI roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// Name sent as SNI and verified in the certificate; defaults to the URL or DNS host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

/// Load-balancing settings.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancingSpec {
    /// The algorithm; default `RoundRobin`.
    #[serde(default)]
    pub algorithm: Algorithm,
}

/// Load-balancing algorithms.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
pub enum Algorithm {
    /// Each endpoint in turn.
    #[default]
    RoundRobin,
    /// Uniformly at random.
    Random,
    /// Smooth weighted round robin over endpoint weights.
    Weighted,
    /// The endpoint with the fewest requests in flight.
    LeastConnections,
    /// Power of two choices over peak-EWMA latency times load.
    PeakEwma,
}

/// Timeouts; each is a duration string.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.perTry) || duration(self.perTry) <= duration(has(self.request) ? self.request : '15s')",
    "message": "perTry must not be longer than request (default 15s)",
    "fieldPath": ".perTry"
}]))]
pub struct TimeoutsSpec {
    /// TCP (and TLS) connect to an endpoint; default 1s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN), length(max = 32))]
    pub connect: Option<String>,
    /// Whole request until the response headers, all attempts together; default 15s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN), length(max = 32))]
    pub request: Option<String>,
    /// One attempt until its response headers; default: the request timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN), length(max = 32))]
    pub per_try: Option<String>,
    /// Idle keep-alive client connections, and response bodies that stop moving; default 60s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN), length(max = 32))]
    pub idle: Option<String>,
    /// Time a client has to send a complete request head; default 10s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN), length(max = 32))]
    pub request_header: Option<String>,
}

/// Retry settings.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetrySpec {
    /// Attempts in total, first one included; default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10))]
    pub max_attempts: Option<u32>,
    /// Backoff between attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<BackoffSpec>,
    /// Which failures are retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on: Option<RetryOnSpec>,
    /// Retry non-idempotent requests that may have reached a backend; default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub non_idempotent: Option<bool>,
    /// Retry budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudgetSpec>,
    /// Use a backend's `Retry-After` as the delay; default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub honor_retry_after: Option<bool>,
    /// Request bodies up to this size are kept so they can be replayed; default 64Ki.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_replay_bytes: Option<Quantity>,
}

/// Exponential backoff.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "duration(has(self.initial) ? self.initial : '25ms') <= duration(has(self.max) ? self.max : '1s')",
    "message": "initial must not be longer than max (defaults 25ms and 1s)",
    "fieldPath": ".initial"
}]))]
pub struct BackoffSpec {
    /// First delay; default 25ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN), length(max = 32))]
    pub initial: Option<String>,
    /// Largest delay; default 1s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN), length(max = 32))]
    pub max: Option<String>,
    /// Growth per attempt; default 2.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.0))]
    pub multiplier: Option<f64>,
    /// `Full` (default), `Equal` or `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<Jitter>,
}

/// Jitter modes.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
pub enum Jitter {
    /// Uniform in `[0, delay]`.
    #[default]
    Full,
    /// Uniform in `[delay/2, delay]`.
    Equal,
    /// Exactly `delay`.
    None,
}

/// Retry conditions.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryOnSpec {
    /// Connect refused or failed; default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_failure: Option<bool>,
    /// Connection reset before response headers; default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset: Option<bool>,
    /// Per-try timeout; default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<bool>,
    /// Response statuses that are retried; default 502, 503, 504.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(range(min = 100, max = 599)))]
    pub status_codes: Option<Vec<u16>>,
}

/// Retry budget.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudgetSpec {
    /// Retries allowed as a share of requests; default 0.2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1000.0))]
    pub ratio: Option<f64>,
    /// Floor of retries per second; default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_retries_per_second: Option<u32>,
}

/// Circuit breaker settings, per endpoint.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreakerSpec {
    /// `false` turns breakers off; default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Consecutive failures that open the breaker; default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub failure_threshold: Option<u32>,
    /// Failure share over `window` that opens it; default 0.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0), extend("exclusiveMinimum" = true))]
    pub failure_ratio: Option<f64>,
    /// Requests the window must hold before the ratio counts; default 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub minimum_requests: Option<u32>,
    /// Sliding window for the ratio; default 10s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN), length(max = 32))]
    pub window: Option<String>,
    /// Successful probes that close it; default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub success_threshold: Option<u32>,
    /// Time spent open before probing; default 30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN), length(max = 32))]
    pub open_timeout: Option<String>,
    /// Concurrent probes in half-open; default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub half_open_max_requests: Option<u32>,
    /// Largest share of a backend set that may be open at once; default 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub max_ejection_percent: Option<u32>,
    /// Response statuses counted as failures; default 500–599.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(range(min = 100, max = 599)))]
    pub failure_status_codes: Option<Vec<u16>>,
}

/// Overload limits per backend set.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OverloadSpec {
    /// Upstream connections; default 1024.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection; default 1024.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_pending_requests: Option<u32>,
    /// Requests in flight; default 1024.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_concurrent_requests: Option<u32>,
}

/// Active health checks.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.timeout) || duration(self.timeout) <= duration(has(self.interval) ? self.interval : '5s')",
    "message": "timeout must not be longer than interval (default 5s)",
    "fieldPath": ".timeout"
}]))]
pub struct HealthCheckSpec {
    /// `false` turns checks off; default true when the block is present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Path probed with GET; default `/healthz`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^/"))]
    pub path: Option<String>,
    /// Time between probes (jittered); default 5s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN), length(max = 32))]
    pub interval: Option<String>,
    /// Probe timeout; default 1s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN), length(max = 32))]
    pub timeout: Option<String>,
    /// Failed probes that mark an endpoint down; default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub unhealthy_threshold: Option<u32>,
    /// Passed probes that bring it back; default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub healthy_threshold: Option<u32>,
    /// Statuses that pass, as codes or ranges (`"200-399"`, the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_statuses: Option<Vec<String>>,
}

/// Rate limiting.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.global) || has(self.perClient)",
    "message": "set global, perClient or both"
}]))]
pub struct RateLimitSpec {
    /// `TokenBucket` (default) or `SlidingWindow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<RateLimitAlgorithm>,
    /// One limit for the whole policy (this proxy instance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global: Option<RateSpec>,
    /// One limit per client key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_client: Option<RateSpec>,
    /// Count rejections but never reject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,
}

/// Rate-limit algorithms.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, Hash, JsonSchema)]
pub enum RateLimitAlgorithm {
    /// `burst` requests at once, then `requestsPerSecond` (GCRA).
    #[default]
    TokenBucket,
    /// At most `burst` requests in any window of `burst / requestsPerSecond` seconds.
    SlidingWindow,
}

/// One rate.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateSpec {
    /// Sustained rate.
    #[schemars(range(min = 0.0, max = 1_000_000.0), extend("exclusiveMinimum" = true))]
    pub requests_per_second: f64,
    /// Burst size; default: the rate rounded up (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub burst: Option<u32>,
    /// Client key (per-client only); default the client IP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<ClientKeySpec>,
    /// Most client keys tracked at once (per-client only); default 100000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_keys: Option<u32>,
    /// Whose rate this is (global only): `Instance` (default) — each proxy admits the whole
    /// rate; `Service` — the rate is for the whole fleet and each sidecar admits its share,
    /// divided by the ready endpoints of `service` (cluster only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<RateScope>,
    /// With `scope: Service`: the Service (in the policy's namespace) whose ready endpoints
    /// share the rate — usually the one in front of the pods this policy selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub service: Option<String>,
}

/// Who a global rate limit is for.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, Hash, JsonSchema)]
pub enum RateScope {
    /// Each proxy instance admits the whole rate.
    #[default]
    Instance,
    /// The rate is shared by the ready replicas of a Service.
    Service,
}

/// What identifies a client: `{clientIp: {}}` or `{header: X-Api-Key}`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.clientIp) != has(self.header)",
    "message": "set exactly one of clientIp or header"
}]))]
pub struct ClientKeySpec {
    /// The client address (through `forwarding.trustedProxies`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<ClientIpKeySpec>,
    /// A request header; requests without it fall back to the client address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
}

/// Client-address keying.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientIpKeySpec {
    /// IPv6 clients are grouped by this prefix length; default 64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 128))]
    pub ipv6_prefix: Option<u8>,
}

/// Response cache.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CacheSpec {
    /// Turn the cache on; default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Entry bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_entries: Option<u64>,
    /// Total byte bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<Quantity>,
    /// Per-object byte bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_object_bytes: Option<Quantity>,
    /// How long after expiry a stored response may still be served when the backend fails or
    /// no endpoint is admissible (RFC 5861 `stale-if-error`); default `0s`, off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN), length(max = 32))]
    pub stale_if_error: Option<String>,
}

/// WebSocket proxying.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WebSocketSpec {
    /// Proxy Upgrade requests; default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Close a session after this long without traffic either way; default 5m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN), length(max = 32))]
    pub idle_timeout: Option<String>,
    /// Close a session after this long in any case; default unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN), length(max = 32))]
    pub max_lifetime: Option<String>,
}

/// Request limits.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitsSpec {
    /// Largest request body; default 10Mi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_body_bytes: Option<Quantity>,
    /// Largest request header block; default 64Ki.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_header_bytes: Option<Quantity>,
    /// Concurrent client connections on this listener; default 10000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_connections: Option<u32>,
}

/// Forwarding headers.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ForwardingSpec {
    /// CIDRs whose `X-Forwarded-For` / `Forwarded` are believed and extended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<String>,
    /// Request headers removed before forwarding.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove_request_headers: Vec<String>,
    /// Response headers removed before answering.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove_response_headers: Vec<String>,
    /// The forwarding headers the proxy adds; default all three. A family left out is
    /// forwarded as the client sent it, neither added nor replaced (so the backend must not
    /// believe it); `[]` adds none, as nginx and HAProxy do unless configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub add_headers: Option<Vec<ForwardingHeader>>,
}

/// A family of forwarding headers the proxy can add.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
pub enum ForwardingHeader {
    /// `X-Forwarded-For`, `-Proto`, `-Host` and `-Port`.
    XForwarded,
    /// RFC 7239 `Forwarded`.
    Forwarded,
    /// `Via`, on requests and on responses.
    Via,
}
