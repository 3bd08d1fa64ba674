//! Compiled resilience settings: retries, circuit breakers, overload limits, health checks.

use std::time::Duration;

use serde::Serialize;

use super::compile::serialize_duration;
use super::spec::{CircuitBreakerSpec, HealthCheckSpec, Jitter, OverloadSpec, Quantity, RetrySpec};

/// Retry policy.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryConfig {
    /// Attempts in total, the first included.
    pub max_attempts: u32,
    /// First backoff delay.
    #[serde(serialize_with = "serialize_duration")]
    pub backoff_initial: Duration,
    /// Largest backoff delay.
    #[serde(serialize_with = "serialize_duration")]
    pub backoff_max: Duration,
    /// Backoff growth per retry.
    pub backoff_multiplier: f64,
    /// Jitter mode.
    pub jitter: Jitter,
    /// Retry when connecting failed (the request never reached a backend).
    pub on_connect_failure: bool,
    /// Retry when the connection broke before response headers.
    pub on_reset: bool,
    /// Retry when an attempt hit `timeouts.perTry`.
    pub on_timeout: bool,
    /// Retry these response statuses.
    pub status_codes: Vec<u16>,
    /// Retry non-idempotent requests that may have reached a backend.
    pub non_idempotent: bool,
    /// Retries allowed as a share of requests (10 s window).
    pub budget_ratio: f64,
    /// Retries per second always allowed.
    pub budget_min_per_second: u32,
    /// Use a 429/503 `Retry-After` as the delay.
    pub honor_retry_after: bool,
    /// Request bodies up to this size are kept for replay; larger ones are not retried once sent.
    pub max_replay_bytes: u64,
}

impl RetryConfig {
    /// What applies when a policy has no `retry` block: one more attempt, only for requests that
    /// never reached a backend (always safe), within the default budget.
    pub fn implicit() -> Self {
        Self {
            max_attempts: 2,
            on_reset: false,
            on_timeout: false,
            status_codes: Vec::new(),
            ..Self::explicit_defaults()
        }
    }

    fn explicit_defaults() -> Self {
        Self {
            max_attempts: 3,
            backoff_initial: Duration::from_millis(25),
            backoff_max: Duration::from_secs(1),
            backoff_multiplier: 2.0,
            jitter: Jitter::Full,
            on_connect_failure: true,
            on_reset: true,
            on_timeout: true,
            status_codes: vec![502, 503, 504],
            non_idempotent: false,
            budget_ratio: 0.2,
            budget_min_per_second: 10,
            honor_retry_after: true,
            max_replay_bytes: 64 << 10,
        }
    }
}

/// Circuit-breaker policy (per endpoint).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreakerConfig {
    /// Whether breakers run at all.
    pub enabled: bool,
    /// Consecutive failures that open.
    pub failure_threshold: u32,
    /// Failure share over the window that opens.
    pub failure_ratio: f64,
    /// Volume the window needs before the ratio counts.
    pub minimum_requests: u32,
    /// Ratio window.
    #[serde(serialize_with = "serialize_duration")]
    pub window: Duration,
    /// Probe successes that close.
    pub success_threshold: u32,
    /// First open period.
    #[serde(serialize_with = "serialize_duration")]
    pub open_timeout: Duration,
    /// Concurrent probes in half-open.
    pub half_open_max_requests: u32,
    /// Largest share of a policy's endpoints open at once, in percent.
    pub max_ejection_percent: u32,
    /// Statuses counted as failures.
    pub failure_status_codes: Vec<(u16, u16)>,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            failure_threshold: 5,
            failure_ratio: 0.5,
            minimum_requests: 20,
            window: Duration::from_secs(10),
            success_threshold: 2,
            open_timeout: Duration::from_secs(30),
            half_open_max_requests: 1,
            max_ejection_percent: 50,
            failure_status_codes: vec![(500, 599)],
        }
    }
}

impl CircuitBreakerConfig {
    /// Whether a response status counts as a failure.
    pub fn is_failure_status(&self, status: u16) -> bool {
        self.failure_status_codes
            .iter()
            .any(|(lo, hi)| (*lo..=*hi).contains(&status))
    }
}

/// Overload limits per policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OverloadConfig {
    /// Upstream connections across the policy's endpoints.
    pub max_connections: u32,
    /// Requests waiting for an upstream connection.
    pub max_pending_requests: u32,
    /// Requests in flight.
    pub max_concurrent_requests: u32,
}

impl Default for OverloadConfig {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_concurrent_requests: 1024,
        }
    }
}

/// Active health-check policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheckConfig {
    /// Path (and query) probed with GET.
    pub path: String,
    /// Time between probes (jittered ±10%).
    #[serde(serialize_with = "serialize_duration")]
    pub interval: Duration,
    /// Probe timeout.
    #[serde(serialize_with = "serialize_duration")]
    pub timeout: Duration,
    /// Consecutive failed probes that mark an endpoint down.
    pub unhealthy_threshold: u32,
    /// Consecutive passed probes that bring it back.
    pub healthy_threshold: u32,
    /// Statuses that pass, as inclusive ranges.
    pub expected_statuses: Vec<(u16, u16)>,
}

/// Collects field errors while compiling; shared with `compile.rs`.
pub(super) trait Errors {
    fn push(&mut self, path: &str, message: String);
    /// A duration that must be greater than zero (reported at `path` otherwise).
    fn positive_duration(
        &mut self,
        path: &str,
        value: Option<&String>,
        default: Duration,
    ) -> Duration;
}

fn positive(errors: &mut impl Errors, path: &str, value: Option<u32>, default: u32) -> u32 {
    match value {
        Some(0) => {
            errors.push(path, "must be at least 1".to_owned());
            default
        }
        Some(v) => v,
        None => default,
    }
}

fn status_list(errors: &mut impl Errors, path: &str, codes: &[u16]) -> Vec<u16> {
    for (i, code) in codes.iter().enumerate() {
        if !(100..=599).contains(code) {
            errors.push(
                &format!("{path}[{i}]"),
                format!("{code} is not an HTTP status (100-599)"),
            );
        }
    }
    codes.to_vec()
}

pub(super) fn compile_retry(errors: &mut impl Errors, spec: Option<&RetrySpec>) -> RetryConfig {
    let Some(spec) = spec else {
        return RetryConfig::implicit();
    };
    let d = RetryConfig::explicit_defaults();
    let max_attempts = positive(
        errors,
        "spec.retry.maxAttempts",
        spec.max_attempts,
        d.max_attempts,
    );
    if max_attempts > 10 {
        errors.push(
            "spec.retry.maxAttempts",
            format!("{max_attempts} is more than 10 attempts"),
        );
    }
    let backoff = spec.backoff.clone().unwrap_or_default();
    let backoff_initial = errors.positive_duration(
        "spec.retry.backoff.initial",
        backoff.initial.as_ref(),
        d.backoff_initial,
    );
    let backoff_max = errors.positive_duration(
        "spec.retry.backoff.max",
        backoff.max.as_ref(),
        d.backoff_max,
    );
    if backoff_initial > backoff_max {
        errors.push(
            "spec.retry.backoff.initial",
            "is longer than spec.retry.backoff.max".to_owned(),
        );
    }
    let backoff_multiplier = backoff.multiplier.unwrap_or(d.backoff_multiplier);
    if !backoff_multiplier.is_finite() || backoff_multiplier < 1.0 {
        errors.push(
            "spec.retry.backoff.multiplier",
            format!("{backoff_multiplier} must be at least 1.0"),
        );
    }
    let on = spec.retry_on.clone().unwrap_or_default();
    let status_codes = match &on.status_codes {
        Some(codes) => status_list(errors, "spec.retry.retryOn.statusCodes", codes),
        None => d.status_codes.clone(),
    };
    let budget = spec.budget.clone().unwrap_or_default();
    let budget_ratio = budget.ratio.unwrap_or(d.budget_ratio);
    if !(0.0..=1000.0).contains(&budget_ratio) || budget_ratio.is_nan() {
        errors.push(
            "spec.retry.budget.ratio",
            format!("{budget_ratio} must be between 0 and 1000"),
        );
    }
    let max_replay_bytes = match &spec.max_replay_bytes {
        None => d.max_replay_bytes,
        Some(Quantity::Bytes(n)) => *n,
        Some(Quantity::Text(text)) => super::units::parse_size(text).unwrap_or_else(|reason| {
            errors.push("spec.retry.maxReplayBytes", reason);
            d.max_replay_bytes
        }),
    };
    RetryConfig {
        max_attempts,
        backoff_initial,
        backoff_max,
        backoff_multiplier,
        jitter: backoff.jitter.unwrap_or(d.jitter),
        on_connect_failure: on.connect_failure.unwrap_or(d.on_connect_failure),
        on_reset: on.reset.unwrap_or(d.on_reset),
        on_timeout: on.timeout.unwrap_or(d.on_timeout),
        status_codes,
        non_idempotent: spec.non_idempotent.unwrap_or(d.non_idempotent),
        budget_ratio,
        budget_min_per_second: budget
            .min_retries_per_second
            .unwrap_or(d.budget_min_per_second),
        honor_retry_after: spec.honor_retry_after.unwrap_or(d.honor_retry_after),
        max_replay_bytes,
    }
}

pub(super) fn compile_breaker(
    errors: &mut impl Errors,
    spec: Option<&CircuitBreakerSpec>,
) -> CircuitBreakerConfig {
    let d = CircuitBreakerConfig::default();
    let Some(spec) = spec else {
        return d;
    };
    let failure_ratio = spec.failure_ratio.unwrap_or(d.failure_ratio);
    if !(failure_ratio > 0.0 && failure_ratio <= 1.0) {
        errors.push(
            "spec.circuitBreaker.failureRatio",
            format!("{failure_ratio} must be in (0, 1]"),
        );
    }
    let max_ejection_percent = spec.max_ejection_percent.unwrap_or(d.max_ejection_percent);
    if max_ejection_percent > 100 {
        errors.push(
            "spec.circuitBreaker.maxEjectionPercent",
            format!("{max_ejection_percent} is more than 100"),
        );
    }
    let failure_status_codes = match &spec.failure_status_codes {
        None => d.failure_status_codes.clone(),
        Some(codes) => status_list(errors, "spec.circuitBreaker.failureStatusCodes", codes)
            .into_iter()
            .map(|c| (c, c))
            .collect(),
    };
    CircuitBreakerConfig {
        enabled: spec.enabled.unwrap_or(true),
        failure_threshold: positive(
            errors,
            "spec.circuitBreaker.failureThreshold",
            spec.failure_threshold,
            d.failure_threshold,
        ),
        failure_ratio,
        minimum_requests: positive(
            errors,
            "spec.circuitBreaker.minimumRequests",
            spec.minimum_requests,
            d.minimum_requests,
        ),
        window: errors.positive_duration(
            "spec.circuitBreaker.window",
            spec.window.as_ref(),
            d.window,
        ),
        success_threshold: positive(
            errors,
            "spec.circuitBreaker.successThreshold",
            spec.success_threshold,
            d.success_threshold,
        ),
        open_timeout: errors.positive_duration(
            "spec.circuitBreaker.openTimeout",
            spec.open_timeout.as_ref(),
            d.open_timeout,
        ),
        half_open_max_requests: positive(
            errors,
            "spec.circuitBreaker.halfOpenMaxRequests",
            spec.half_open_max_requests,
            d.half_open_max_requests,
        ),
        max_ejection_percent,
        failure_status_codes,
    }
}

pub(super) fn compile_overload(
    errors: &mut impl Errors,
    spec: Option<&OverloadSpec>,
) -> OverloadConfig {
    let d = OverloadConfig::default();
    let Some(spec) = spec else {
        return d;
    };
    OverloadConfig {
        max_connections: positive(
            errors,
            "spec.overload.maxConnections",
            spec.max_connections,
            d.max_connections,
        ),
        max_pending_requests: positive(
            errors,
            "spec.overload.maxPendingRequests",
            spec.max_pending_requests,
            d.max_pending_requests,
        ),
        max_concurrent_requests: positive(
            errors,
            "spec.overload.maxConcurrentRequests",
            spec.max_concurrent_requests,
            d.max_concurrent_requests,
        ),
    }
}

pub(super) fn compile_health_check(
    errors: &mut impl Errors,
    spec: Option<&HealthCheckSpec>,
) -> Option<HealthCheckConfig> {
    let spec = spec?;
    if spec.enabled == Some(false) {
        return None;
    }
    let path = spec.path.clone().unwrap_or_else(|| "/healthz".to_owned());
    if !path.starts_with('/') || path.parse::<http::uri::PathAndQuery>().is_err() {
        errors.push(
            "spec.healthCheck.path",
            format!("{path:?} must be an absolute path such as /healthz"),
        );
    }
    let interval = errors.positive_duration(
        "spec.healthCheck.interval",
        spec.interval.as_ref(),
        Duration::from_secs(5),
    );
    // The default timeout never exceeds the interval, so a short interval alone is valid.
    let timeout = errors.positive_duration(
        "spec.healthCheck.timeout",
        spec.timeout.as_ref(),
        Duration::from_secs(1).min(interval),
    );
    if timeout > interval {
        errors.push(
            "spec.healthCheck.timeout",
            "is longer than spec.healthCheck.interval".to_owned(),
        );
    }
    let expected_statuses = match &spec.expected_statuses {
        None => vec![(200, 399)],
        Some(ranges) => {
            let mut out = Vec::new();
            for (i, range) in ranges.iter().enumerate() {
                match parse_status_range(range) {
                    Some(r) => out.push(r),
                    None => errors.push(
                        &format!("spec.healthCheck.expectedStatuses[{i}]"),
                        format!("{range:?} is not a status or range such as 200-399"),
                    ),
                }
            }
            out
        }
    };
    Some(HealthCheckConfig {
        path,
        interval,
        timeout,
        unhealthy_threshold: positive(
            errors,
            "spec.healthCheck.unhealthyThreshold",
            spec.unhealthy_threshold,
            3,
        ),
        healthy_threshold: positive(
            errors,
            "spec.healthCheck.healthyThreshold",
            spec.healthy_threshold,
            2,
        ),
        expected_statuses,
    })
}

fn parse_status_range(text: &str) -> Option<(u16, u16)> {
    let (lo, hi) = match text.split_once('-') {
        Some((lo, hi)) => (lo.trim().parse().ok()?, hi.trim().parse().ok()?),
        None => {
            let code = text.trim().parse().ok()?;
            (code, code)
        }
    };
    ((100..=599).contains(&lo) && (100..=599).contains(&hi) && lo <= hi).then_some((lo, hi))
}

/// One compiled rate.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateConfig {
    /// Sustained rate.
    pub requests_per_second: f64,
    /// Burst size.
    pub burst: u32,
}

/// How per-client limits identify a client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ClientKeySource {
    /// The client address, IPv6 grouped by the prefix length.
    ClientIp {
        /// IPv6 prefix length.
        ipv6_prefix: u8,
    },
    /// A header (falling back to the address, IPv6 /64, when absent).
    Header(#[serde(serialize_with = "serialize_header_name")] http::HeaderName),
}

fn serialize_header_name<S: serde::Serializer>(
    name: &http::HeaderName,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(name.as_str())
}

/// Compiled rate limits.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitConfig {
    /// Algorithm for every limit of the policy.
    pub algorithm: super::spec::RateLimitAlgorithm,
    /// Policy-wide limit.
    pub global: Option<RateConfig>,
    /// With `scope: Service`, the Service (namespace, name) whose ready endpoints share
    /// `global`; the sidecar divides the rate before the limit is built.
    pub global_service: Option<(String, String)>,
    /// Per-client limit, its key and table bound.
    pub per_client: Option<(RateConfig, ClientKeySource, u32)>,
    /// Count but never reject.
    pub dry_run: bool,
}

fn compile_rate(errors: &mut impl Errors, path: &str, spec: &super::spec::RateSpec) -> RateConfig {
    let rps = spec.requests_per_second;
    if !(rps.is_finite() && rps > 0.0 && rps <= 1_000_000.0) {
        errors.push(
            &format!("{path}.requestsPerSecond"),
            format!("{rps} must be greater than 0 and at most 1000000"),
        );
    }
    let burst = match spec.burst {
        Some(0) => {
            errors.push(&format!("{path}.burst"), "must be at least 1".to_owned());
            1
        }
        Some(b) => b,
        None => (rps.ceil() as u32).max(1),
    };
    RateConfig {
        requests_per_second: rps,
        burst,
    }
}

pub(super) fn compile_rate_limit(
    errors: &mut impl Errors,
    spec: Option<&super::spec::RateLimitSpec>,
    namespace: &str,
) -> Option<RateLimitConfig> {
    let spec = spec?;
    let algorithm = spec.algorithm.unwrap_or_default();
    let global = spec
        .global
        .as_ref()
        .map(|g| compile_rate(errors, "spec.rateLimit.global", g));
    if spec
        .global
        .as_ref()
        .is_some_and(|g| g.key.is_some() || g.max_keys.is_some())
    {
        errors.push(
            "spec.rateLimit.global.key",
            "only per-client limits have a key".to_owned(),
        );
    }
    let global_service = spec.global.as_ref().and_then(|g| {
        match (g.scope.unwrap_or_default(), &g.service) {
            (super::spec::RateScope::Service, Some(name)) if !name.is_empty() => {
                Some((namespace.to_owned(), name.clone()))
            }
            (super::spec::RateScope::Service, _) => {
                errors.push(
                    "spec.rateLimit.global.service",
                    "required with scope: Service (the Service whose ready endpoints share the rate)"
                        .to_owned(),
                );
                None
            }
            (super::spec::RateScope::Instance, Some(_)) => {
                errors.push(
                    "spec.rateLimit.global.service",
                    "only with scope: Service".to_owned(),
                );
                None
            }
            (super::spec::RateScope::Instance, None) => None,
        }
    });
    if spec
        .per_client
        .as_ref()
        .is_some_and(|p| p.scope.is_some() || p.service.is_some())
    {
        errors.push(
            "spec.rateLimit.perClient.scope",
            "only the global limit can be shared by a Service".to_owned(),
        );
    }
    let per_client = spec.per_client.as_ref().map(|p| {
        let rate = compile_rate(errors, "spec.rateLimit.perClient", p);
        let key = match &p.key {
            None => ClientKeySource::ClientIp { ipv6_prefix: 64 },
            Some(key) => match (&key.client_ip, &key.header) {
                (Some(ip), None) => {
                    let prefix = ip.ipv6_prefix.unwrap_or(64);
                    if prefix == 0 || prefix > 128 {
                        errors.push(
                            "spec.rateLimit.perClient.key.clientIp.ipv6Prefix",
                            format!("{prefix} must be between 1 and 128"),
                        );
                    }
                    ClientKeySource::ClientIp {
                        ipv6_prefix: prefix.clamp(1, 128),
                    }
                }
                (None, Some(name)) => match http::HeaderName::from_bytes(name.as_bytes()) {
                    Ok(h) => ClientKeySource::Header(h),
                    Err(_) => {
                        errors.push(
                            "spec.rateLimit.perClient.key.header",
                            format!("invalid header name {name:?}"),
                        );
                        ClientKeySource::ClientIp { ipv6_prefix: 64 }
                    }
                },
                _ => {
                    errors.push(
                        "spec.rateLimit.perClient.key",
                        "set exactly one of clientIp or header".to_owned(),
                    );
                    ClientKeySource::ClientIp { ipv6_prefix: 64 }
                }
            },
        };
        let max_keys = match p.max_keys {
            Some(0) => {
                errors.push(
                    "spec.rateLimit.perClient.maxKeys",
                    "must be at least 1".to_owned(),
                );
                100_000
            }
            Some(n) => n,
            None => 100_000,
        };
        (rate, key, max_keys)
    });
    if global.is_none() && per_client.is_none() {
        errors.push("spec.rateLimit", "set global, perClient or both".to_owned());
    }
    if algorithm == super::spec::RateLimitAlgorithm::SlidingWindow {
        for (path, rate) in [
            ("global", &global),
            ("perClient", &per_client.as_ref().map(|p| p.0.clone())),
        ] {
            if let Some(rate) = rate {
                if rate.burst > crate::ratelimit::MAX_WINDOW_LIMIT {
                    errors.push(
                        &format!("spec.rateLimit.{path}.burst"),
                        format!(
                            "{} is more than {} for SlidingWindow",
                            rate.burst,
                            crate::ratelimit::MAX_WINDOW_LIMIT
                        ),
                    );
                }
            }
        }
    }
    Some(RateLimitConfig {
        algorithm,
        global,
        global_service,
        per_client,
        dry_run: spec.dry_run.unwrap_or(false),
    })
}

impl RateLimitConfig {
    /// The global rate shared by `replicas` ready instances: each admits its share of the rate
    /// and of the burst (at least one request), so the fleet admits about the declared rate.
    pub fn share_global(&mut self, replicas: u32) {
        let replicas = replicas.max(1);
        if let Some(global) = &mut self.global {
            global.requests_per_second /= f64::from(replicas);
            global.burst = global.burst.div_ceil(replicas).max(1);
        }
    }
}
