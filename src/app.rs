//! Wires the proxy together: config source → compile → snapshot → listeners, plus the admin
//! server, hot reload, DNS refresh and graceful shutdown.
//!
//! Two config sources feed the same [`Controller`]: the policy file (`breakwater run`, see
//! [`start`]) and pushed updates (the Kubernetes sidecar, see [`start_pushed`]). Either way one
//! controller compiles snapshots and swaps them into the one forwarding loop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::config::compile::BackendTarget;
use crate::config::file::{FileSource, Fingerprint};
use crate::config::{ConfigError, PolicyConfig, PolicyId};
use crate::metrics::{Metrics, MetricsError};
use crate::proxy::handler::ProxyState;
use crate::proxy::listener::{BindError, Listeners};
use crate::resilience::health::{HealthCheckers, HealthTarget};
use crate::snapshot::{BuildError, Resolutions, Snapshot, SnapshotBuilder};
use crate::sync::lock;

/// How long one DNS lookup may take before the previous addresses are kept.
const DNS_TIMEOUT: Duration = Duration::from_secs(2);

/// Settings for [`start`].
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    /// The policy file.
    pub config: PathBuf,
    /// Where the admin server listens.
    pub admin_addr: SocketAddr,
    /// How often the file is checked for changes.
    pub reload_interval: Duration,
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The initial configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The initial configuration could not be applied.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// The admin port could not be bound.
    #[error("cannot listen on admin address {addr}: {source}")]
    AdminBind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Metric registration failed.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
}

/// Why a valid configuration could not be put into service.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A referenced file (TLS) could not be used.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// A listener could not be bound.
    #[error(transparent)]
    Bind(#[from] BindError),
}

/// Why a reload was rejected (the previous configuration keeps serving).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// Invalid file.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Valid file that could not be applied.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// The proxy is shutting down.
    #[error("the proxy is shutting down")]
    Stopped,
}

type ReloadReply = oneshot::Sender<Result<u64, ReloadError>>;

/// Settings for [`start_pushed`].
#[derive(Clone, Debug)]
pub struct PushedOptions {
    /// Where the admin server listens.
    pub admin_addr: SocketAddr,
    /// How often idle upstream connections are reaped and DNS backends re-resolved.
    pub tick_interval: Duration,
}

/// A complete configuration pushed by an external source (the Kubernetes sidecar).
///
/// `resolutions` carries the addresses of every `service:` backend; `dns:` backends are still
/// resolved by the controller. Each update replaces the previous one as a whole.
#[derive(Debug)]
pub struct SourceUpdate {
    /// Every policy to serve, already compiled.
    pub configs: Vec<PolicyConfig>,
    /// Addresses of the `service:` backends, keyed by policy and backend name.
    pub resolutions: Resolutions,
    /// Answered with the version serving afterwards, or why the update was not applied (the
    /// previous snapshot keeps serving then).
    pub reply: oneshot::Sender<Result<u64, ApplyError>>,
}

/// A running standalone proxy.
pub struct RunningProxy {
    admin_addr: SocketAddr,
    admin: Arc<AdminState>,
    state: Arc<ProxyState>,
    listeners: Arc<Mutex<Listeners>>,
    reload_tx: mpsc::Sender<ReloadReply>,
    control_stop: CancellationToken,
    admin_stop: CancellationToken,
    control: JoinHandle<()>,
}

/// Loads the configuration, binds every listener and the admin port, and starts serving.
pub async fn start(options: ProxyOptions) -> Result<RunningProxy, StartError> {
    let metrics = Arc::new(Metrics::new()?);
    let source = FileSource::new(&options.config);
    let (configs, fingerprint) = source.load()?;
    let (_, updates) = mpsc::channel(1);
    launch(
        options.admin_addr,
        options.reload_interval,
        metrics,
        Some(source),
        updates,
        Some((configs, fingerprint)),
    )
    .await
}

/// Starts the proxy with no policies and the admin server, then serves whatever `updates`
/// pushes. `/ready` fails until the first update has been handled.
pub async fn start_pushed(
    options: PushedOptions,
    metrics: Arc<Metrics>,
    updates: mpsc::Receiver<SourceUpdate>,
) -> Result<RunningProxy, StartError> {
    launch(
        options.admin_addr,
        options.tick_interval,
        metrics,
        None,
        updates,
        None,
    )
    .await
}

/// What [`start`] and [`start_pushed`] have in common: the admin server, the controller and
/// (for the file source) the initial configuration.
async fn launch(
    admin_addr: SocketAddr,
    interval: Duration,
    metrics: Arc<Metrics>,
    source: Option<FileSource>,
    updates: mpsc::Receiver<SourceUpdate>,
    initial: Option<(Vec<PolicyConfig>, Fingerprint)>,
) -> Result<RunningProxy, StartError> {
    let state = Arc::new(ProxyState::new(Snapshot::empty()));
    let admin_listener =
        TcpListener::bind(admin_addr)
            .await
            .map_err(|source| StartError::AdminBind {
                addr: admin_addr,
                source,
            })?;
    let admin_addr = admin_listener.local_addr().unwrap_or(admin_addr);
    let admin = Arc::new(AdminState {
        proxy: Arc::clone(&state),
        metrics: Arc::clone(&metrics),
        ready: false.into(),
        draining: false.into(),
        started: Instant::now(),
    });
    let listeners = Arc::new(Mutex::new(Listeners::new(Arc::clone(&state))));
    let mut controller = Controller {
        source,
        builder: SnapshotBuilder::new(Arc::clone(&metrics)),
        listeners: Arc::clone(&listeners),
        state: Arc::clone(&state),
        metrics,
        admin: Arc::clone(&admin),
        configs: Vec::new(),
        fingerprint: None,
        failed_fingerprint: None,
        resolutions: HashMap::new(),
        pushed: HashMap::new(),
        next_dns: None,
        version: 0,
        health: Arc::new(HealthCheckers::new()),
    };
    if let Some((configs, fingerprint)) = initial {
        controller.resolutions = resolve_dns(&configs, &HashMap::new()).await;
        controller.apply(configs)?;
        controller.fingerprint = Some(fingerprint);
        controller.schedule_dns();
        admin.ready.store(true, Ordering::Release);
    }

    let admin_stop = CancellationToken::new();
    tokio::spawn(admin::serve(
        admin_listener,
        Arc::clone(&admin),
        admin_stop.clone(),
    ));
    tracing::info!(%admin_addr, "admin server listening");

    let (reload_tx, reload_rx) = mpsc::channel(8);
    let control_stop = CancellationToken::new();
    let control = tokio::spawn(controller.run(interval, reload_rx, updates, control_stop.clone()));
    Ok(RunningProxy {
        admin_addr,
        admin,
        state,
        listeners,
        reload_tx,
        control_stop,
        admin_stop,
        control,
    })
}

impl RunningProxy {
    /// The bound admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The bound traffic address of a policy (useful when the file asks for port 0).
    pub fn listener_addr(&self, policy: &str) -> Option<SocketAddr> {
        let snapshot = self.state.snapshot.load();
        let configured = snapshot
            .policies
            .iter()
            .find(|p| p.config.id.name == policy || p.label == policy)?
            .config
            .listener
            .addr;
        lock(&self.listeners).local_addr(configured)
    }

    /// The snapshot version serving now.
    pub fn config_version(&self) -> u64 {
        self.state.snapshot.load().version
    }

    /// Re-reads the file now (as SIGHUP does). `Ok` carries the version serving afterwards.
    pub async fn reload(&self) -> Result<u64, ReloadError> {
        let (tx, rx) = oneshot::channel();
        self.reload_tx
            .send(tx)
            .await
            .map_err(|_| ReloadError::Stopped)?;
        rx.await.map_err(|_| ReloadError::Stopped)?
    }

    /// Graceful shutdown: readiness fails, after `delay` listeners stop accepting, in-flight
    /// requests finish (HTTP/1 responses carry `Connection: close`, HTTP/2 gets GOAWAY) until
    /// `drain_timeout`, then whatever is left (WebSocket tunnels included) is closed.
    pub async fn shutdown(self, delay: Duration, drain_timeout: Duration) {
        self.admin.draining.store(true, Ordering::Release);
        tracing::info!("shutting down: readiness now fails");
        tokio::time::sleep(delay).await;
        self.control_stop.cancel();
        let _ = self.control.await;
        lock(&self.listeners).stop_all();
        self.state.tasks.close();
        if tokio::time::timeout(drain_timeout, self.state.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                ?drain_timeout,
                "drain deadline reached; closing remaining connections"
            );
            self.state.shutdown.cancel();
            let _ = tokio::time::timeout(Duration::from_millis(500), self.state.tasks.wait()).await;
        }
        self.state.shutdown.cancel();
        self.admin_stop.cancel();
        tracing::info!("shutdown complete");
    }
}

/// Owns the configuration lifecycle; runs on its own task, never on the request path.
struct Controller {
    /// The policy file; `None` when configuration is pushed instead.
    source: Option<FileSource>,
    builder: SnapshotBuilder,
    listeners: Arc<Mutex<Listeners>>,
    state: Arc<ProxyState>,
    metrics: Arc<Metrics>,
    admin: Arc<AdminState>,
    configs: Vec<PolicyConfig>,
    fingerprint: Option<Fingerprint>,
    failed_fingerprint: Option<Fingerprint>,
    /// Every run-time resolution the snapshot is built with: DNS answers plus `pushed`.
    resolutions: Resolutions,
    /// `service:` backend addresses from the last pushed update.
    pushed: Resolutions,
    next_dns: Option<Instant>,
    version: u64,
    health: Arc<HealthCheckers>,
}

impl Controller {
    async fn run(
        mut self,
        interval: Duration,
        mut reloads: mpsc::Receiver<ReloadReply>,
        mut updates: mpsc::Receiver<SourceUpdate>,
        stop: CancellationToken,
    ) {
        let mut updates_open = self.source.is_none();
        loop {
            let forced = tokio::select! {
                _ = stop.cancelled() => {
                    self.health.stop_all();
                    return;
                }
                _ = tokio::time::sleep(interval) => None,
                request = reloads.recv() => match request {
                    Some(reply) => Some(reply),
                    None => return,
                },
                update = updates.recv(), if updates_open => {
                    match update {
                        Some(update) => self.push(update).await,
                        None => updates_open = false,
                    }
                    continue;
                }
            };
            let outcome = self.check_file(forced.is_some()).await;
            // Idle upstream connections past their pool timeout are closed here, off the request path.
            let snapshot = self.state.snapshot.load();
            for (_, endpoint) in snapshot.endpoints() {
                endpoint.pool.reap();
            }
            // Idle rate-limit keys go too; the table size and evictions become metrics.
            for policy in &snapshot.policies {
                if let Some(cache) = &policy.cache {
                    cache.report();
                }
                if let Some((keys, evicted)) = policy.rate_limits.as_ref().and_then(|l| l.sweep()) {
                    let label = [policy.label.as_str()];
                    self.metrics
                        .rate_limit_keys
                        .with_label_values(&label)
                        .set(keys as i64);
                    self.metrics
                        .rate_limit_key_evictions
                        .with_label_values(&label)
                        .inc_by(evicted);
                }
            }
            drop(snapshot);
            if let Some(reply) = forced {
                let _ = reply.send(outcome.map(|_| self.version));
            }
            if self.next_dns.is_some_and(|at| at <= Instant::now()) {
                let mut resolved = resolve_dns(&self.configs, &self.resolutions).await;
                resolved.extend(self.pushed.clone());
                self.schedule_dns();
                if resolved != self.resolutions {
                    tracing::info!("DNS answers changed; rebuilding endpoints");
                    let previous = std::mem::replace(&mut self.resolutions, resolved);
                    if let Err(err) = self.apply(self.configs.clone()) {
                        tracing::error!(%err, "applying new DNS answers failed; keeping the previous endpoints");
                        self.resolutions = previous;
                    }
                }
            }
        }
    }

    /// Applies a pushed configuration; on error the previous snapshot keeps serving.
    async fn push(&mut self, update: SourceUpdate) {
        let SourceUpdate {
            configs,
            resolutions: pushed,
            reply,
        } = update;
        let mut resolutions = resolve_dns(&configs, &self.resolutions).await;
        resolutions.extend(pushed.clone());
        let outcome = if configs == self.configs && resolutions == self.resolutions {
            Ok(self.version)
        } else {
            let previous = std::mem::replace(&mut self.resolutions, resolutions);
            match self.apply(configs) {
                Ok(()) => {
                    self.pushed = pushed;
                    self.schedule_dns();
                    tracing::info!(version = self.version, "configuration applied");
                    Ok(self.version)
                }
                Err(err) => {
                    self.resolutions = previous;
                    self.metrics.config_reload_failures.inc();
                    tracing::error!(
                        "configuration rejected, the last good configuration keeps serving: {err}"
                    );
                    Err(err)
                }
            }
        };
        // The source only pushes after a full sync, so the first update ends the wait.
        self.admin.ready.store(true, Ordering::Release);
        let _ = reply.send(outcome);
    }

    /// Reloads the file if it (or a file it names) changed, or unconditionally when `forced`.
    async fn check_file(&mut self, forced: bool) -> Result<(), ReloadError> {
        let Some(source) = self.source.clone() else {
            return Ok(());
        };
        if !forced {
            match source.fingerprint(&self.configs) {
                Ok(fp) if Some(fp) == self.fingerprint || Some(fp) == self.failed_fingerprint => {
                    return Ok(());
                }
                Ok(_) => {}
                Err(err) => {
                    // A missing file mid-rename is normal for atomic replaces; report it once.
                    if self.failed_fingerprint.is_none() {
                        tracing::warn!(%err, "cannot read the config file; keeping the last good configuration");
                    }
                    return Err(err.into());
                }
            }
        }
        let result = match source.load() {
            Ok((configs, fingerprint)) => {
                if configs == self.configs {
                    self.fingerprint = Some(fingerprint);
                    self.failed_fingerprint = None;
                    return Ok(());
                }
                let resolutions = resolve_dns(&configs, &self.resolutions).await;
                let previous = std::mem::replace(&mut self.resolutions, resolutions);
                match self.apply(configs) {
                    Ok(()) => {
                        self.fingerprint = Some(fingerprint);
                        self.failed_fingerprint = None;
                        self.schedule_dns();
                        tracing::info!(version = self.version, "configuration reloaded");
                        Ok(())
                    }
                    Err(err) => {
                        self.resolutions = previous;
                        self.failed_fingerprint = Some(fingerprint);
                        Err(ReloadError::from(err))
                    }
                }
            }
            Err(err) => {
                self.failed_fingerprint = source.fingerprint(&self.configs).ok();
                Err(ReloadError::from(err))
            }
        };
        if let Err(err) = &result {
            self.metrics.config_reload_failures.inc();
            tracing::error!(
                "configuration rejected, the last good configuration keeps serving: {err}"
            );
        }
        result
    }

    /// Builds and swaps in a snapshot for `configs`; on error nothing changes.
    fn apply(&mut self, configs: Vec<PolicyConfig>) -> Result<(), ApplyError> {
        let version = self.version + 1;
        let snapshot = self.builder.build(version, &configs, &self.resolutions)?;
        let mut listeners = lock(&self.listeners);
        let prepared = listeners.prepare(&snapshot)?;
        let snapshot = Arc::new(snapshot);
        self.state.publish(Arc::clone(&snapshot));
        listeners.commit(&snapshot, prepared);
        drop(listeners);
        self.health.reconcile(health_targets(&snapshot));
        self.version = version;
        self.configs = configs;
        self.metrics.config_reloads.inc();
        self.metrics
            .config_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.metrics
            .config_last_reload_success
            .set(i64::try_from(now).unwrap_or(i64::MAX));
        Ok(())
    }

    fn schedule_dns(&mut self) {
        let refresh = self
            .configs
            .iter()
            .flat_map(|p| &p.backends)
            .filter_map(|b| match b.target {
                BackendTarget::Dns { refresh, .. } => Some(refresh),
                _ => None,
            })
            .min();
        self.next_dns = refresh.map(|r| Instant::now() + r);
    }
}

/// Resolves every `dns:` backend. A failed lookup keeps the previous answer: stale addresses
/// beat none while DNS is briefly unavailable.
async fn resolve_dns(configs: &[PolicyConfig], previous: &Resolutions) -> Resolutions {
    let mut out = HashMap::new();
    for policy in configs {
        for backend in &policy.backends {
            let BackendTarget::Dns { host, port, .. } = &backend.target else {
                continue;
            };
            let key = (policy.id.clone(), backend.name.clone());
            let lookup =
                tokio::time::timeout(DNS_TIMEOUT, tokio::net::lookup_host((host.as_str(), *port)))
                    .await;
            match lookup {
                Ok(Ok(addrs)) => {
                    let mut addrs: Vec<SocketAddr> = addrs.collect();
                    addrs.sort();
                    addrs.dedup();
                    out.insert(key, addrs);
                }
                Ok(Err(err)) => {
                    warn_dns(&policy.id, &backend.name, host, &err.to_string());
                    if let Some(old) = previous.get(&key) {
                        out.insert(key, old.clone());
                    }
                }
                Err(_) => {
                    warn_dns(&policy.id, &backend.name, host, "timed out");
                    if let Some(old) = previous.get(&key) {
                        out.insert(key, old.clone());
                    }
                }
            }
        }
    }
    out
}

fn warn_dns(policy: &PolicyId, backend: &str, host: &str, reason: &str) {
    tracing::warn!(%policy, backend, host, reason, "DNS lookup failed; keeping previous addresses");
}

/// Every endpoint that the snapshot's health-check settings cover.
fn health_targets(snapshot: &Snapshot) -> Vec<HealthTarget> {
    let mut targets = Vec::new();
    for policy in &snapshot.policies {
        let Some(config) = &policy.config.health_check else {
            continue;
        };
        let config = Arc::new(config.clone());
        for endpoint in &policy.endpoints {
            let checked = policy
                .config
                .backends
                .get(endpoint.backend_index)
                .is_some_and(|b| b.health_check);
            if checked {
                targets.push(HealthTarget {
                    key: endpoint.state.key().clone(),
                    state: Arc::clone(&endpoint.state),
                    pool: Arc::clone(&endpoint.pool),
                    authority: endpoint.authority.clone(),
                    config: Arc::clone(&config),
                });
            }
        }
    }
    targets
}
