//! Per-endpoint state (in-flight count, latency EWMA, counters, health) and the registry that
//! keeps it across configuration snapshots.
//!
//! State is keyed by (policy, backend, address). A snapshot holds `Arc`s to the states it uses;
//! the registry only holds `Weak`s, so an endpoint that no snapshot uses any more is freed (and
//! its metric series removed) as soon as the last in-flight request on it completes.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec};
use serde::Serialize;

use crate::clock::{duration_nanos, now_nanos};
use crate::config::PolicyId;
use crate::metrics::Metrics;
use crate::resilience::breaker::{
    Breaker, BreakerConfig, BreakerState, Transition, TransitionReason,
};
use crate::sync::shared_entry;

/// How long an idle endpoint's latency estimate takes to decay (PeakEWMA's time constant): ten
/// seconds, in nanoseconds.
const EWMA_DECAY_NANOS: f64 = 10e9;
/// Weight of each new (faster) sample in the moving average.
const EWMA_WEIGHT: f64 = 0.2;
/// Latency assumed for an endpoint that has not answered yet, so new endpoints are tried but
/// not flooded.
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Failures remembered per endpoint for `/backends/health`.
const RECENT_FAILURES: usize = 8;

/// Identity of an endpoint's state.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    /// The policy it serves.
    pub policy: PolicyId,
    /// The backend it belongs to.
    pub backend: String,
    /// `host:port` or `ip:port`.
    pub address: String,
}

/// Health as seen by active checks (or assumed before any).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// No check has run (or checks are off): traffic is allowed.
    Unknown = 0,
    /// The last checks passed.
    Healthy = 1,
    /// The last checks failed: no traffic.
    Unhealthy = 2,
}

/// One failure, kept for operators.
#[derive(Clone, Debug, Serialize)]
pub struct FailureRecord {
    /// Seconds since the proxy started.
    pub at_seconds: f64,
    /// The error cause label.
    pub cause: &'static str,
}

/// Shared, lock-free (on the request path) state of one endpoint.
pub struct EndpointState {
    key: EndpointKey,
    /// Requests started and requests finished: what is in flight is their difference, so a
    /// request costs one locked increment at each end rather than three in all.
    requests: AtomicU64,
    finished: AtomicU64,
    failures: AtomicU64,
    consecutive_failures: AtomicU32,
    health: AtomicU8,
    /// Peak-EWMA latency estimate in nanoseconds, stored as f64 bits.
    rtt_estimate: AtomicU64,
    /// Nanoseconds since [`epoch`] of the last estimate update.
    rtt_stamp: AtomicU64,
    recent_failures: Mutex<VecDeque<FailureRecord>>,
    breaker: Breaker,
    health_gauge: IntGauge,
    breaker_gauge: IntGauge,
    transitions: IntCounterVec,
    gauges: (IntGaugeVec, IntGaugeVec),
}

impl EndpointState {
    fn new(key: EndpointKey, metrics: &Metrics) -> Self {
        let labels = [
            key.policy.to_string(),
            key.backend.clone(),
            key.address.clone(),
        ];
        let labels = [labels[0].as_str(), labels[1].as_str(), labels[2].as_str()];
        let health_gauge = metrics.backend_health.with_label_values(&labels);
        health_gauge.set(1);
        let breaker_gauge = metrics.circuit_breaker_state.with_label_values(&labels);
        breaker_gauge.set(BreakerState::Closed.as_gauge());
        Self {
            key,
            finished: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            health: AtomicU8::new(Health::Unknown as u8),
            rtt_estimate: AtomicU64::new((DEFAULT_RTT.as_nanos() as f64).to_bits()),
            rtt_stamp: AtomicU64::new(now_nanos()),
            recent_failures: Mutex::new(VecDeque::with_capacity(RECENT_FAILURES)),
            breaker: Breaker::new(),
            health_gauge,
            breaker_gauge,
            transitions: metrics.circuit_breaker_transitions.clone(),
            gauges: (
                metrics.backend_health.clone(),
                metrics.circuit_breaker_state.clone(),
            ),
        }
    }

    /// Identity.
    pub fn key(&self) -> &EndpointKey {
        &self.key
    }

    /// Whether the balancer may send a new request here: not marked down by health checks, and
    /// (with breakers on) a breaker that admits traffic. A cheap, lock-free gate.
    pub fn is_admissible(&self, breaker: Option<&BreakerConfig>) -> bool {
        self.health() != Health::Unhealthy && breaker.is_none_or(|cfg| self.breaker.admits(cfg))
    }

    /// The endpoint's circuit breaker.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// Publishes a breaker transition: gauge, transition counter, and one log line.
    pub fn note_transition(&self, transition: Transition) {
        self.breaker_gauge.set(transition.to.as_gauge());
        let policy = self.key.policy.to_string();
        self.transitions
            .with_label_values(&[
                policy.as_str(),
                self.key.backend.as_str(),
                self.key.address.as_str(),
                transition.to.as_str(),
                transition.reason.as_str(),
            ])
            .inc();
        match transition.to {
            BreakerState::Open => tracing::warn!(
                policy = %policy,
                backend = %self.key.backend,
                endpoint = %self.key.address,
                reason = transition.reason.as_str(),
                probe_in_ms = self.breaker.time_until_probe().map_or(0, |d| d.as_millis() as u64),
                "circuit breaker opened"
            ),
            _ => tracing::info!(
                policy = %policy,
                backend = %self.key.backend,
                endpoint = %self.key.address,
                from = transition.from.as_str(),
                to = transition.to.as_str(),
                reason = transition.reason.as_str(),
                "circuit breaker transition"
            ),
        }
    }

    /// Current health.
    pub fn health(&self) -> Health {
        match self.health.load(Ordering::Relaxed) {
            1 => Health::Healthy,
            2 => Health::Unhealthy,
            _ => Health::Unknown,
        }
    }

    /// Records a health-check verdict.
    pub fn set_health(&self, health: Health) {
        self.health.store(health as u8, Ordering::Relaxed);
        self.health_gauge
            .set(i64::from(health != Health::Unhealthy));
    }

    /// Requests currently in flight here.
    pub fn in_flight(&self) -> u32 {
        // `finished` first: every request it counts was counted in `requests` before, so the
        // difference never goes below zero (it may include requests started meanwhile).
        let finished = self.finished.load(Ordering::Acquire);
        let started = self.requests.load(Ordering::Relaxed);
        u32::try_from(started.saturating_sub(finished)).unwrap_or(u32::MAX)
    }

    /// Marks one request as started; the guard ends it when dropped.
    pub fn start_request(self: &Arc<Self>) -> InFlightGuard {
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlightGuard {
            endpoint: Arc::clone(self),
        }
    }

    /// Records a completed attempt's time to response headers (feeds PeakEWMA).
    pub fn observe_latency(&self, rtt: Duration) {
        self.observe_latency_at(duration_nanos(rtt), now_nanos());
    }

    /// [`observe_latency`](Self::observe_latency) for an answer that took `rtt_nanos` and arrived
    /// at `at_nanos` (see [`crate::clock`]; the caller has converted both already).
    pub fn observe_latency_at(&self, rtt_nanos: u64, at_nanos: u64) {
        let rtt = rtt_nanos as f64;
        let current = self.decayed_estimate(at_nanos);
        // Peak-sensitive: a slow answer is believed at once, fast ones pull the estimate down slowly.
        let next = if rtt > current {
            rtt
        } else {
            current * (1.0 - EWMA_WEIGHT) + rtt * EWMA_WEIGHT
        };
        self.rtt_estimate.store(next.to_bits(), Ordering::Relaxed);
        self.rtt_stamp.store(at_nanos, Ordering::Relaxed);
    }

    /// The estimate decays towards zero while nothing is observed, so an endpoint that was slow
    /// once is eventually tried (and measured) again.
    fn decayed_estimate(&self, now: u64) -> f64 {
        let estimate = f64::from_bits(self.rtt_estimate.load(Ordering::Relaxed));
        let elapsed = now.saturating_sub(self.rtt_stamp.load(Ordering::Relaxed)) as f64;
        estimate * decay_factor(elapsed / EWMA_DECAY_NANOS)
    }

    /// Latency estimate in seconds (as `/backends/health` shows it).
    pub fn latency_estimate(&self) -> Duration {
        Duration::from_nanos(self.decayed_estimate(now_nanos()) as u64)
    }

    /// PeakEWMA load: estimated latency times outstanding work.
    pub fn load_cost(&self) -> f64 {
        self.decayed_estimate(now_nanos()) * f64::from(self.in_flight() + 1)
    }

    /// Records a successful exchange.
    pub fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// Records a failed exchange and its cause.
    pub fn record_failure(&self, cause: &'static str) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut recent) = self.recent_failures.lock() {
            if recent.len() == RECENT_FAILURES {
                recent.pop_front();
            }
            recent.push_back(FailureRecord {
                at_seconds: Duration::from_nanos(now_nanos()).as_secs_f64(),
                cause,
            });
        }
    }

    /// A point-in-time view for `/backends/health`.
    pub fn report(&self) -> EndpointReport {
        EndpointReport {
            address: self.key.address.clone(),
            backend: self.key.backend.clone(),
            health: self.health(),
            circuit_breaker: self.breaker.state(),
            breaker_trip_reason: self.breaker.last_trip_reason(),
            next_probe_in_ms: self
                .breaker
                .time_until_probe()
                .map(|d| d.as_millis() as u64),
            in_flight: self.in_flight(),
            requests_total: self.requests.load(Ordering::Relaxed),
            failures_total: self.failures.load(Ordering::Relaxed),
            consecutive_failures: self.consecutive_failures.load(Ordering::Relaxed),
            latency_ewma_ms: self.latency_estimate().as_secs_f64() * 1000.0,
            recent_failures: self
                .recent_failures
                .lock()
                .map(|r| r.iter().cloned().collect())
                .unwrap_or_default(),
        }
    }
}

impl Drop for EndpointState {
    fn drop(&mut self) {
        let policy = self.key.policy.to_string();
        let labels = [
            policy.as_str(),
            self.key.backend.as_str(),
            self.key.address.as_str(),
        ];
        // The series may already be gone if a reload re-created it; nothing to do then.
        let _ = self.gauges.0.remove_label_values(&labels);
        let _ = self.gauges.1.remove_label_values(&labels);
    }
}

/// `/backends/health` entry for one endpoint.
#[derive(Clone, Debug, Serialize)]
pub struct EndpointReport {
    /// `host:port`.
    pub address: String,
    /// Backend name.
    pub backend: String,
    /// Health.
    pub health: Health,
    /// Breaker state.
    pub circuit_breaker: BreakerState,
    /// Why the breaker last opened (while open or half-open).
    pub breaker_trip_reason: Option<TransitionReason>,
    /// Milliseconds until the breaker admits a probe (while open).
    pub next_probe_in_ms: Option<u64>,
    /// Requests in flight.
    pub in_flight: u32,
    /// Requests sent since the endpoint appeared.
    pub requests_total: u64,
    /// Failed exchanges since the endpoint appeared.
    pub failures_total: u64,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// Peak-EWMA latency estimate.
    pub latency_ewma_ms: f64,
    /// The last few failures.
    pub recent_failures: Vec<FailureRecord>,
}

/// Ends one in-flight request when dropped (so response bodies count until fully sent).
pub struct InFlightGuard {
    endpoint: Arc<EndpointState>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        // Release: whoever sees this finish also sees its start (see `in_flight`).
        self.endpoint.finished.fetch_add(1, Ordering::Release);
    }
}

/// Keeps endpoint state alive across snapshots, keyed by [`EndpointKey`].
pub struct EndpointRegistry {
    metrics: Arc<Metrics>,
    states: Mutex<HashMap<EndpointKey, Weak<EndpointState>>>,
}

impl EndpointRegistry {
    /// An empty registry reporting into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            states: Mutex::new(HashMap::new()),
        }
    }

    /// The state for `key`, shared with any live snapshot, or fresh state if none holds it.
    /// Called only while building a snapshot, never on the request path.
    pub fn get_or_create(&self, key: EndpointKey) -> Arc<EndpointState> {
        shared_entry(&self.states, key.clone(), || {
            EndpointState::new(key, &self.metrics)
        })
    }
}

/// `e^-x` for `x >= 0`. Between two requests `x` is tiny (microseconds over the ten-second decay),
/// where the series' first three terms are exact to within `x³/6 < 2.5e-12` and cost a few
/// instructions against `exp`'s hundred, on every answered request.
fn decay_factor(x: f64) -> f64 {
    if x < 1.0 / 4096.0 {
        1.0 - x + x * x * 0.5
    } else {
        (-x).exp()
    }
}

#[cfg(test)]
mod tests {
    use super::decay_factor;

    #[test]
    fn decay_factor_matches_exp_on_both_sides_of_the_series_cut() {
        let cut: f64 = 1.0 / 4096.0;
        for x in [
            0.0,
            1e-9,
            1e-6,
            1e-4,
            cut * 0.999,
            cut,
            cut * 1.001,
            0.01,
            1.0,
            30.0,
        ] {
            let exact = (-x).exp();
            let got = decay_factor(x);
            assert!(
                ((got - exact) / exact).abs() < 1e-11,
                "x = {x}: {got} against {exact}"
            );
        }
        // Monotone across the cut: a longer silence never yields a larger estimate.
        assert!(decay_factor(cut * 0.999_999) >= decay_factor(cut));
    }
}
