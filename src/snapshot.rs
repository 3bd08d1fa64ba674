//! The immutable runtime snapshot every request reads: compiled policies joined with their
//! endpoints' shared state, upstream clients, TLS acceptors and pre-resolved metric handles.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use http::uri::Authority;
use tokio_rustls::TlsAcceptor;

use crate::balance::{Balancer, Candidate};
use crate::cache::{Cache, CacheConfig, CacheError};
use crate::config::compile::{BackendTarget, CacheSettings, PolicyConfig};
use crate::config::spec::Jitter;
use crate::config::{FieldError, PolicyId};
use crate::endpoint::{EndpointKey, EndpointRegistry, EndpointState};
use crate::metrics::{BackendMetrics, CacheMetrics, Metrics};
use crate::proxy::pool::{ConnSettings, EndpointPool, PoolCache};
use crate::proxy::tls;
use crate::ratelimit::policy::PolicyLimits;
use crate::resilience::backoff::{Backoff, JitterMode};
use crate::resilience::breaker::{BreakerConfig, BreakerState};
use crate::resilience::budget::{DEFAULT_TTL, RetryBudget};
use crate::sync::{shared_entry, try_increment_below, try_shared_entry};

/// Addresses found for backends whose endpoints are discovered at run time (DNS, Kubernetes),
/// keyed by policy and backend name.
pub type Resolutions = HashMap<(PolicyId, String), Vec<SocketAddr>>;

/// Everything the data plane serves, swapped atomically as one unit.
pub struct Snapshot {
    /// Increases with every applied configuration.
    pub version: u64,
    /// One entry per policy, in configuration order.
    pub policies: Vec<Arc<PolicyRuntime>>,
}

impl Snapshot {
    /// A snapshot that serves nothing (before the first configuration).
    pub fn empty() -> Self {
        Self {
            version: 0,
            policies: Vec::new(),
        }
    }

    /// The policy bound to the listener configured as `addr`.
    pub fn policy_for_listener(&self, addr: SocketAddr) -> Option<&Arc<PolicyRuntime>> {
        // A handful of listeners at most: a linear scan beats hashing.
        self.policies
            .iter()
            .find(|p| p.config.listener.addr == addr)
    }

    /// Every endpoint of every policy.
    pub fn endpoints(&self) -> impl Iterator<Item = (&PolicyRuntime, &RuntimeEndpoint)> {
        self.policies
            .iter()
            .flat_map(|p| p.endpoints.iter().map(move |e| (p.as_ref(), e)))
    }
}

/// One policy ready to serve.
pub struct PolicyRuntime {
    /// The validated configuration.
    pub config: PolicyConfig,
    /// `namespace/name`, the `policy` metric label.
    pub label: String,
    /// All endpoints of all backends, in backend order.
    pub endpoints: Vec<RuntimeEndpoint>,
    /// Chooses among `endpoints`.
    pub balancer: Balancer,
    /// TLS for the listener, if configured.
    pub tls_acceptor: Option<TlsAcceptor>,
    /// Metrics for requests that never reached a backend.
    pub unrouted_metrics: BackendMetrics,
    /// Breaker settings, `None` when breakers are off.
    pub breaker: Option<Arc<BreakerConfig>>,
    /// Cap on simultaneously open breakers (`maxEjectionPercent`).
    pub ejections: EjectionBudget,
    /// The policy's retry budget (shared across snapshots while its settings stay the same).
    pub retry_budget: Arc<RetryBudget>,
    /// Backoff between attempts.
    pub backoff: Backoff,
    /// Counters that span snapshots.
    pub shared: Arc<PolicyState>,
    /// Rate limits (shared across snapshots while their settings stay the same).
    pub rate_limits: Option<Arc<PolicyLimits>>,
    /// The response cache (shared across snapshots while its settings stay the same).
    pub cache: Option<Arc<PolicyCache>>,
    /// The metric families (for rare-path label lookups).
    pub metrics: Arc<Metrics>,
}

/// A policy's response cache with its metric handles.
pub struct PolicyCache {
    /// The stored responses.
    pub cache: Cache,
    /// Pre-resolved metric handles.
    pub metrics: CacheMetrics,
    /// Evictions already added to `cache_evictions_total`.
    reported_evictions: AtomicU64,
}

impl PolicyCache {
    fn try_new(settings: &CacheSettings, metrics: CacheMetrics) -> Result<Self, CacheError> {
        let cache = Cache::try_new(CacheConfig {
            max_entries: settings.max_entries,
            max_bytes: settings.max_bytes,
            max_object_bytes: settings.max_object_bytes,
            stale_if_error: settings.stale_if_error,
        })?;
        Ok(Self {
            cache,
            metrics,
            reported_evictions: AtomicU64::new(0),
        })
    }

    /// Brings the size gauges and the eviction counter up to date (off the request path).
    pub fn report(&self) {
        let stats = self.cache.stats();
        self.metrics
            .entries
            .set(i64::try_from(stats.entries).unwrap_or(i64::MAX));
        self.metrics
            .bytes
            .set(i64::try_from(stats.bytes).unwrap_or(i64::MAX));
        let before = self
            .reported_evictions
            .swap(stats.evictions, Ordering::Relaxed);
        self.metrics
            .evictions
            .inc_by(stats.evictions.saturating_sub(before));
    }
}

/// One endpoint as the request path sees it.
pub struct RuntimeEndpoint {
    /// Shared, reload-surviving state.
    pub state: Arc<EndpointState>,
    /// Connections to this endpoint (shared across snapshots while the settings stay the same).
    pub pool: Arc<EndpointPool>,
    /// Where requests are sent (`ip:port` or `host:port`).
    pub authority: Authority,
    /// Index into the policy's backends.
    pub backend_index: usize,
    /// Metric handles for this endpoint's backend.
    pub metrics: Arc<BackendMetrics>,
    /// The policy's breaker settings, `None` when breakers are off.
    pub breaker: Option<Arc<BreakerConfig>>,
}

impl Candidate for RuntimeEndpoint {
    fn state(&self) -> &EndpointState {
        &self.state
    }

    fn admissible(&self) -> bool {
        self.state.is_admissible(self.breaker.as_deref())
    }
}

/// Per-policy counters that must survive snapshot swaps (requests in flight span them).
#[derive(Debug, Default)]
pub struct PolicyState {
    /// Requests in flight (for `overload.maxConcurrentRequests`).
    pub in_flight: AtomicU32,
    /// Requests waiting for an upstream connection (for `overload.maxPendingRequests`).
    pub pending: AtomicU32,
}

/// One request counted against its policy's `overload.maxConcurrentRequests` until it is
/// dropped (with the response body, so a request counts until its last byte went out). It
/// holds the request's own reference to its policy, through which the request reaches the
/// policy meanwhile, so the count costs no reference of its own.
pub struct ConcurrencySlot(Arc<PolicyRuntime>);

impl ConcurrencySlot {
    /// Takes a slot for a request under `policy`; the policy back when all slots are taken.
    pub fn enter(policy: Arc<PolicyRuntime>) -> Result<Self, Arc<PolicyRuntime>> {
        let max = policy.config.overload.max_concurrent_requests;
        if try_increment_below(&policy.shared.in_flight, max) {
            Ok(Self(policy))
        } else {
            Err(policy)
        }
    }
}

impl std::ops::Deref for ConcurrencySlot {
    type Target = PolicyRuntime;

    fn deref(&self) -> &PolicyRuntime {
        &self.0
    }
}

impl std::fmt::Debug for ConcurrencySlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ConcurrencySlot")
            .field(&self.0.label)
            .finish()
    }
}

impl Drop for ConcurrencySlot {
    fn drop(&mut self) {
        self.0.shared.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How many of a policy's endpoints may have an open breaker at once.
#[derive(Debug)]
pub struct EjectionBudget {
    open: AtomicU32,
    max: u32,
}

impl EjectionBudget {
    /// Grants one more ejection if the cap allows it.
    pub fn try_eject(&self) -> bool {
        try_increment_below(&self.open, self.max)
    }

    /// One ejected endpoint closed again.
    pub fn restore(&self) {
        let _ = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }
}

/// Why a snapshot could not be built from otherwise valid configuration.
#[derive(Debug, thiserror::Error)]
#[error("policy {policy}: {error}")]
pub struct BuildError {
    /// The policy at fault.
    pub policy: PolicyId,
    /// The field and reason.
    pub error: FieldError,
}

/// Builds snapshots, carrying endpoint state and upstream pools from one to the next.
pub struct SnapshotBuilder {
    metrics: Arc<Metrics>,
    registry: EndpointRegistry,
    pools: PoolCache,
    policy_states: Mutex<HashMap<PolicyId, Weak<PolicyState>>>,
    budgets: Mutex<HashMap<(PolicyId, u64, u32), Weak<RetryBudget>>>,
    limits: Mutex<HashMap<(PolicyId, String), Weak<PolicyLimits>>>,
    caches: Mutex<HashMap<(PolicyId, String), Weak<PolicyCache>>>,
}

impl SnapshotBuilder {
    /// A builder reporting into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            registry: EndpointRegistry::new(Arc::clone(&metrics)),
            pools: PoolCache::default(),
            policy_states: Mutex::new(HashMap::new()),
            budgets: Mutex::new(HashMap::new()),
            limits: Mutex::new(HashMap::new()),
            caches: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// Joins `configs` with run-time state. Reads TLS files; never touches the network.
    pub fn build(
        &self,
        version: u64,
        configs: &[PolicyConfig],
        resolved: &Resolutions,
    ) -> Result<Snapshot, BuildError> {
        let policies = configs
            .iter()
            .map(|config| self.build_policy(config, resolved).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Snapshot { version, policies })
    }

    fn build_policy(
        &self,
        config: &PolicyConfig,
        resolved: &Resolutions,
    ) -> Result<PolicyRuntime, BuildError> {
        let label = config.id.to_string();
        let fail = |path: String, reason: String| BuildError {
            policy: config.id.clone(),
            error: FieldError::new(path, reason),
        };
        let tls_acceptor = match &config.listener.tls {
            Some(files) => Some(TlsAcceptor::from(
                tls::server_config(&files.cert_file, &files.key_file)
                    .map_err(|e| fail("spec.listener.tls".to_owned(), e.to_string()))?,
            )),
            None => None,
        };
        let cb = &config.circuit_breaker;
        let breaker = cb.enabled.then(|| {
            Arc::new(BreakerConfig {
                failure_threshold: cb.failure_threshold,
                failure_ratio: cb.failure_ratio,
                minimum_requests: cb.minimum_requests,
                window: cb.window,
                success_threshold: cb.success_threshold,
                open_timeout: cb.open_timeout,
                half_open_max_requests: cb.half_open_max_requests,
            })
        });
        let retry = &config.retry;
        let backoff = Backoff::try_new(
            retry.backoff_initial,
            retry.backoff_max,
            retry.backoff_multiplier,
            match retry.jitter {
                Jitter::Full => JitterMode::Full,
                Jitter::Equal => JitterMode::Equal,
                Jitter::None => JitterMode::None,
            },
        )
        .map_err(|e| fail("spec.retry.backoff".to_owned(), e.to_string()))?;
        let retry_budget = shared_entry(
            &self.budgets,
            (
                config.id.clone(),
                retry.budget_ratio.to_bits(),
                retry.budget_min_per_second,
            ),
            || RetryBudget::new(retry.budget_ratio, retry.budget_min_per_second, DEFAULT_TTL),
        );
        let shared = shared_entry(&self.policy_states, config.id.clone(), PolicyState::default);
        let rate_limits = match &config.rate_limit {
            None => None,
            Some(limits) => {
                // Settings are compared by their rendering: equal settings share the limiters
                // (and so the clients' state) across reloads.
                let key = (config.id.clone(), format!("{limits:?}"));
                Some(
                    try_shared_entry(&self.limits, key, || PolicyLimits::try_new(limits))
                        .map_err(|e| fail("spec.rateLimit".to_owned(), e.to_string()))?,
                )
            }
        };
        let cache = match &config.cache {
            None => None,
            Some(settings) => {
                // As for rate limits: equal settings keep the stored responses across reloads.
                let key = (config.id.clone(), format!("{settings:?}"));
                Some(
                    try_shared_entry(&self.caches, key, || {
                        PolicyCache::try_new(settings, CacheMetrics::new(&self.metrics, &label))
                    })
                    .map_err(|e| fail("spec.cache".to_owned(), e.to_string()))?,
                )
            }
        };
        let mut endpoints = Vec::new();
        let mut weights = Vec::new();
        for (index, backend) in config.backends.iter().enumerate() {
            let settings = ConnSettings {
                protocol: backend.protocol,
                tls: backend.tls.clone(),
                connect_timeout: config.timeouts.connect,
            };
            let metrics = Arc::new(BackendMetrics::new(&self.metrics, &label, &backend.name));
            let addresses: Vec<String> = match &backend.target {
                BackendTarget::Static { authority } => vec![authority.clone()],
                BackendTarget::Dns { .. } | BackendTarget::Service { .. } => resolved
                    .get(&(config.id.clone(), backend.name.clone()))
                    .map(|addrs| addrs.iter().map(SocketAddr::to_string).collect())
                    .unwrap_or_default(),
            };
            for address in addresses {
                let authority: Authority = address.parse().map_err(|e| {
                    fail(
                        format!("spec.backends[{index}]"),
                        format!("invalid address {address:?}: {e}"),
                    )
                })?;
                let pool = self
                    .pools
                    .pool(&address, &settings)
                    .map_err(|e| fail(format!("spec.backends[{index}].tls"), e.to_string()))?;
                let state = self.registry.get_or_create(EndpointKey {
                    policy: config.id.clone(),
                    backend: backend.name.clone(),
                    address,
                });
                endpoints.push(RuntimeEndpoint {
                    state,
                    pool,
                    authority,
                    backend_index: index,
                    metrics: Arc::clone(&metrics),
                    breaker: breaker.clone(),
                });
                weights.push(backend.weight);
            }
        }
        let already_open = endpoints
            .iter()
            .filter(|e| e.state.breaker().state() != BreakerState::Closed)
            .count() as u32;
        let max_ejections = match cb.max_ejection_percent {
            0 => 0,
            // At least one endpoint may always be ejected, so a lone endpoint can still fail fast.
            pct => (endpoints.len() as u32 * pct / 100).max(1),
        };
        Ok(PolicyRuntime {
            ejections: EjectionBudget {
                open: AtomicU32::new(already_open),
                max: max_ejections,
            },
            breaker,
            retry_budget,
            backoff,
            shared,
            rate_limits,
            cache,
            balancer: Balancer::new(config.algorithm, &weights),
            unrouted_metrics: BackendMetrics::unrouted(&self.metrics, &label),
            label,
            endpoints,
            tls_acceptor,
            config: config.clone(),
            metrics: Arc::clone(&self.metrics),
        })
    }
}
