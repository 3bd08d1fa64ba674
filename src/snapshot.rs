//! The immutable runtime snapshot every request reads: compiled policies joined with their
//! endpoints' shared state, upstream clients, TLS acceptors and pre-resolved metric handles.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use http::uri::Authority;
use tokio_rustls::TlsAcceptor;

use crate::balance::{Balancer, Candidate};
use crate::config::compile::{BackendTarget, PolicyConfig};
use crate::config::{FieldError, PolicyId};
use crate::endpoint::{EndpointKey, EndpointRegistry, EndpointState};
use crate::metrics::{BackendMetrics, Metrics};
use crate::proxy::pool::{ConnSettings, EndpointPool, PoolCache};
use crate::proxy::tls;

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
    /// The metric families (for rare-path label lookups).
    pub metrics: Arc<Metrics>,
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
}

impl Candidate for RuntimeEndpoint {
    fn state(&self) -> &EndpointState {
        &self.state
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
}

impl SnapshotBuilder {
    /// A builder reporting into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            registry: EndpointRegistry::new(Arc::clone(&metrics)),
            pools: PoolCache::default(),
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
                });
                weights.push(backend.weight);
            }
        }
        Ok(PolicyRuntime {
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
