//! `breakwater sidecar`: the Kubernetes config source.
//!
//! It reads its own pod's labels, watches the namespace's `ResiliencePolicy` objects and the
//! EndpointSlices of every Service their `service:` backends name, and pushes each resulting
//! configuration into the same controller and forwarding loop `breakwater run` uses
//! ([`crate::app::start_pushed`]). See `docs/ARCHITECTURE.md` ("The sidecar's config source").
//!
//! Every watch restart is applied atomically (the `Init` … `InitDone` block replaces the whole
//! set), bursts of events are coalesced for [`SidecarOptions::debounce`], and while the API
//! server is unreachable the last good snapshot keeps serving.

pub mod endpoints;
pub mod index;
pub mod selector;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::kube::api::Api;
use ::kube::runtime::WatchStreamExt;
use ::kube::runtime::watcher::{self, Event};
use ::kube::{Client, Resource};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use prometheus::IntGauge;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use index::{Conflict, Derived, Index, Invalid, ServiceKey};

use crate::app::{self, ApplyError, PushedOptions, RunningProxy, SourceUpdate, StartError};
use crate::config::{PolicyConfig, PolicyId};
use crate::kube::ResiliencePolicy;
use crate::metrics::{Metrics, MetricsError};
use crate::snapshot::Resolutions;

/// The label EndpointSlices carry naming their Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// How long one pod GET (the reachability probe) may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest wait between restarts of a watch that keeps failing while the server answers.
const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);

/// Settings for [`start`].
#[derive(Clone, Debug)]
pub struct SidecarOptions {
    /// The pod's namespace (downward API `POD_NAMESPACE`): policies are watched here.
    pub namespace: String,
    /// The pod's name (downward API `POD_NAME`): its labels select policies.
    pub pod_name: String,
    /// Where the admin server listens.
    pub admin_addr: SocketAddr,
    /// How long a burst of changes is collected before one snapshot is compiled.
    pub debounce: Duration,
    /// How often, while the API server is unreachable, one GET of the pod probes it; also how
    /// often the health metrics are refreshed.
    pub probe_interval: Duration,
    /// After the first sync, how long a configuration waits for a newly referenced Service's
    /// EndpointSlices to be listed before it is published without them.
    pub sync_grace: Duration,
    /// How often idle upstream connections are reaped and `dns:` backends re-resolved.
    pub tick_interval: Duration,
}

impl SidecarOptions {
    /// Defaults for pod `pod_name` in `namespace`: admin on `127.0.0.1:9901`, 50 ms debounce,
    /// 1 s probes, 1 s sync grace, 1 s ticks.
    pub fn new(namespace: impl Into<String>, pod_name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            pod_name: pod_name.into(),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 9901)),
            debounce: Duration::from_millis(50),
            probe_interval: Duration::from_secs(1),
            sync_grace: Duration::from_secs(1),
            tick_interval: Duration::from_secs(1),
        }
    }
}

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    /// The proxy (admin port, metrics) could not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The source's metrics could not be registered.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
}

/// A running sidecar: the proxy plus the task that feeds it from the cluster.
pub struct Sidecar {
    proxy: RunningProxy,
    stop: CancellationToken,
    source: JoinHandle<()>,
}

impl Sidecar {
    /// The proxy being fed (listener and admin addresses, config version).
    pub fn proxy(&self) -> &RunningProxy {
        &self.proxy
    }

    /// Stops watching, then shuts the proxy down gracefully (see [`RunningProxy::shutdown`]).
    pub async fn shutdown(self, delay: Duration, drain_timeout: Duration) {
        self.stop.cancel();
        let _ = self.source.await;
        self.proxy.shutdown(delay, drain_timeout).await;
    }
}

/// Starts the proxy (admin server up, no policies, `/ready` failing) and the config source
/// that talks to the API server through `client`. Never fails because the API server is
/// unreachable: the source keeps retrying and reports `config_source_up 0` meanwhile.
pub async fn start(client: Client, options: SidecarOptions) -> Result<Sidecar, SidecarError> {
    let metrics = Arc::new(Metrics::new()?);
    let source_metrics = SourceMetrics::register(&metrics)?;
    let (updates_tx, updates_rx) = mpsc::channel(1);
    let proxy = app::start_pushed(
        PushedOptions {
            admin_addr: options.admin_addr,
            tick_interval: options.tick_interval,
        },
        metrics,
        updates_rx,
    )
    .await?;
    let stop = CancellationToken::new();
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let source = Source {
        index: Index::new(options.namespace.clone()),
        client,
        options,
        updates: updates_tx,
        events_tx,
        policy_watch: None,
        slice_watches: BTreeMap::new(),
        failing: BTreeSet::new(),
        listing: BTreeSet::new(),
        restarts: BTreeMap::new(),
        pod_known: false,
        probing: false,
        published: None,
        waiting_since: None,
        reported_invalid: HashMap::new(),
        reported_conflicts: BTreeSet::new(),
        metrics: source_metrics,
    };
    let source = tokio::spawn(source.run(events_rx, stop.clone()));
    Ok(Sidecar {
        proxy,
        stop,
        source,
    })
}

/// The config source's own metric families, in the proxy's registry.
struct SourceMetrics {
    up: IntGauge,
    last_sync: IntGauge,
    conflicted: IntGauge,
    invalid: IntGauge,
}

impl SourceMetrics {
    fn register(metrics: &Metrics) -> Result<Self, MetricsError> {
        let gauge = |name: &str, help: &str| -> Result<IntGauge, MetricsError> {
            let g = IntGauge::new(name, help).map_err(MetricsError::from)?;
            metrics
                .registry()
                .register(Box::new(g.clone()))
                .map_err(MetricsError::from)?;
            Ok(g)
        };
        Ok(Self {
            up: gauge(
                "config_source_up",
                "1 while the Kubernetes API server answers and every watch is in sync, 0 otherwise.",
            )?,
            last_sync: gauge(
                "config_last_sync_timestamp_seconds",
                "Unix time the config source was last known to be in sync with the API server.",
            )?,
            conflicted: gauge(
                "config_policies_conflicted",
                "Policies selecting this pod left out because an older policy has their listener port.",
            )?,
            invalid: gauge(
                "config_policies_invalid",
                "Policies selecting this pod that do not compile (their last good version, if any, keeps serving).",
            )?,
        })
    }
}

/// Which watch an event came from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum WatchId {
    Policies,
    Slices(ServiceKey),
}

/// One watch event, with `Init` … `InitDone` already folded into `Replace`.
#[derive(Debug)]
enum Change<K> {
    Replace(Vec<K>),
    Apply(K),
    Delete(K),
    Failed(String),
}

#[derive(Debug)]
enum SourceEvent {
    // Boxed: objects are large next to the other variants.
    Policies(Box<Change<ResiliencePolicy>>),
    Slices(ServiceKey, Box<Change<EndpointSlice>>),
    /// The pod GET answered (labels) or failed.
    Pod(Result<BTreeMap<String, String>, String>),
}

/// A watch task, aborted when dropped.
struct WatchTask(JoinHandle<()>);

impl Drop for WatchTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The source's state; runs on its own task.
struct Source {
    client: Client,
    options: SidecarOptions,
    index: Index,
    updates: mpsc::Sender<SourceUpdate>,
    events_tx: mpsc::UnboundedSender<SourceEvent>,
    policy_watch: Option<WatchTask>,
    slice_watches: BTreeMap<ServiceKey, WatchTask>,
    /// Watches whose last word was an error; restarted once the API server answers a probe.
    failing: BTreeSet<WatchId>,
    /// Watches (re)started and not yet listed.
    listing: BTreeSet<WatchId>,
    /// Per restarted watch: the current restart delay and the earliest next restart.
    restarts: BTreeMap<WatchId, (Duration, Instant)>,
    pod_known: bool,
    probing: bool,
    /// What the data plane serves now.
    published: Option<(Vec<PolicyConfig>, Resolutions)>,
    /// Since when a publication waits for a Service's first list.
    waiting_since: Option<Instant>,
    reported_invalid: HashMap<PolicyId, Option<i64>>,
    reported_conflicts: BTreeSet<(PolicyId, PolicyId)>,
    metrics: SourceMetrics,
}

impl Source {
    async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<SourceEvent>,
        stop: CancellationToken,
    ) {
        self.metrics.up.set(0);
        self.probe();
        let mut due: Option<Instant> = None;
        let mut tick = tokio::time::interval(self.options.probe_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                event = events.recv() => {
                    let Some(event) = event else { return };
                    if self.handle(event) {
                        // Coalesce: the first change of a burst sets the deadline (which may
                        // only move earlier, e.g. when a list a publication waits for arrives).
                        let soon = Instant::now() + self.options.debounce;
                        due = Some(due.map_or(soon, |d| d.min(soon)));
                    }
                }
                _ = sleep_until(due), if due.is_some() => {
                    due = self.publish().await;
                }
                _ = tick.tick() => {
                    if !self.pod_known || !self.failing.is_empty() {
                        self.probe();
                    }
                    self.report_health();
                }
            }
        }
    }

    /// Folds one event into the index; true when the derived configuration may have changed.
    fn handle(&mut self, event: SourceEvent) -> bool {
        match event {
            SourceEvent::Pod(Ok(labels)) => {
                self.probing = false;
                self.pod_known = true;
                let changed = self.index.set_pod_labels(labels);
                if self.policy_watch.is_none() {
                    self.policy_watch = Some(self.watch_policies());
                    self.listing.insert(WatchId::Policies);
                }
                // The API server answers again: restart failing watches with a fresh list
                // instead of waiting out their backoff; the list replaces what they held. A
                // watch that keeps failing although the server answers (RBAC, a bad object) is
                // restarted with a growing delay, so it never turns into a list loop.
                let now = Instant::now();
                let failing: Vec<WatchId> = self.failing.iter().cloned().collect();
                for id in failing {
                    let (delay, not_before) = self
                        .restarts
                        .get(&id)
                        .copied()
                        .unwrap_or((Duration::ZERO, now));
                    if not_before > now {
                        continue;
                    }
                    self.failing.remove(&id);
                    let delay = (delay * 2).clamp(self.options.probe_interval, MAX_RESTART_DELAY);
                    self.restarts.insert(id.clone(), (delay, now + delay));
                    tracing::info!(watch = ?id, "API server reachable; restarting the watch with a fresh list");
                    match &id {
                        WatchId::Policies => self.policy_watch = Some(self.watch_policies()),
                        WatchId::Slices(key) => {
                            if !self.slice_watches.contains_key(key) {
                                continue;
                            }
                            let task = self.watch_slices(key);
                            self.slice_watches.insert(key.clone(), task);
                        }
                    }
                    self.listing.insert(id);
                }
                self.report_health();
                changed
            }
            SourceEvent::Pod(Err(err)) => {
                self.probing = false;
                if self.failing.is_empty() && self.pod_known {
                    tracing::warn!(%err, "cannot reach the API server");
                } else {
                    tracing::debug!(%err, "API server still unreachable");
                }
                false
            }
            SourceEvent::Policies(change) => {
                let changed = match *change {
                    Change::Replace(all) => {
                        self.index.replace_policies(all);
                        self.listing.remove(&WatchId::Policies);
                        self.restarts.remove(&WatchId::Policies);
                        true
                    }
                    Change::Apply(policy) => {
                        self.index.apply_policy(policy);
                        true
                    }
                    Change::Delete(policy) => {
                        self.index.delete_policy(&policy);
                        true
                    }
                    Change::Failed(err) => {
                        self.watch_failed(WatchId::Policies, &err);
                        return false;
                    }
                };
                self.failing.remove(&WatchId::Policies);
                self.report_health();
                changed
            }
            SourceEvent::Slices(key, change) => {
                if !self.slice_watches.contains_key(&key) {
                    // A late event of a watch already stopped.
                    return false;
                }
                let id = WatchId::Slices(key.clone());
                match *change {
                    Change::Replace(all) => {
                        self.index.replace_slices(&key, all);
                        self.listing.remove(&id);
                        self.restarts.remove(&id);
                    }
                    Change::Apply(slice) => self.index.apply_slice(&key, slice),
                    Change::Delete(slice) => self.index.delete_slice(&key, &slice),
                    Change::Failed(err) => {
                        self.watch_failed(id, &err);
                        return false;
                    }
                }
                self.failing.remove(&id);
                self.report_health();
                true
            }
        }
    }

    fn watch_failed(&mut self, id: WatchId, err: &str) {
        if self.failing.insert(id.clone()) {
            tracing::warn!(watch = ?id, %err, "watch failed; serving the last good configuration while retrying");
        }
        self.report_health();
    }

    /// Compiles what the index holds and hands it to the data plane if it changed. Returns
    /// when to try again, if a publication had to wait.
    async fn publish(&mut self) -> Option<Instant> {
        let derived = self.index.derive();
        self.reconcile_slice_watches(&derived.services);
        self.report_policies(&derived);
        if !self.index.synced(&derived.services) {
            let Some(_) = &self.published else {
                // Nothing serves yet; the missing lists trigger the next attempt.
                return None;
            };
            let since = *self.waiting_since.get_or_insert_with(Instant::now);
            let until = since + self.options.sync_grace;
            if Instant::now() < until {
                return Some(until);
            }
        }
        self.waiting_since = None;
        let candidate = (derived.configs, derived.resolutions);
        if self.published.as_ref() == Some(&candidate) {
            return None;
        }
        let (configs, resolutions) = candidate;
        let (reply, answer) = oneshot::channel();
        let update = SourceUpdate {
            configs: configs.clone(),
            resolutions: resolutions.clone(),
            reply,
        };
        if self.updates.send(update).await.is_err() {
            return None;
        }
        match answer.await {
            Ok(Ok(version)) => {
                tracing::debug!(version, policies = configs.len(), "published");
                self.index.accept(&configs);
                self.published = Some((configs, resolutions));
                self.mark_synced();
                None
            }
            Ok(Err(err)) => {
                // Leave the policy at fault out (its last accepted version stands in) and try
                // again at once, so one bad policy never holds the others back.
                let culprit = match &err {
                    ApplyError::Build(build) => Some(build.policy.name.clone()),
                    ApplyError::Bind(bind) => configs
                        .iter()
                        .find(|c| c.listener.addr == bind.addr)
                        .map(|c| c.id.name.clone()),
                };
                match culprit {
                    Some(name) => {
                        tracing::error!(policy = %name, %err, "policy could not be put into service; its previous version (if any) keeps serving");
                        self.index.reject(&name);
                        Some(Instant::now())
                    }
                    None => None,
                }
            }
            Err(_) => None,
        }
    }

    fn reconcile_slice_watches(&mut self, services: &BTreeSet<ServiceKey>) {
        let stale: Vec<ServiceKey> = self
            .slice_watches
            .keys()
            .filter(|k| !services.contains(*k))
            .cloned()
            .collect();
        for key in stale {
            tracing::info!(service = %key, "no policy refers to the Service any more; stopping its watch");
            self.slice_watches.remove(&key);
            let id = WatchId::Slices(key.clone());
            self.failing.remove(&id);
            self.listing.remove(&id);
            self.restarts.remove(&id);
            self.index.forget_service(&key);
        }
        for key in services {
            if !self.slice_watches.contains_key(key) {
                tracing::info!(service = %key, "watching the Service's EndpointSlices");
                let task = self.watch_slices(key);
                self.slice_watches.insert(key.clone(), task);
                self.listing.insert(WatchId::Slices(key.clone()));
            }
        }
    }

    fn report_policies(&mut self, derived: &Derived) {
        for invalid in &derived.invalid {
            let seen = self.reported_invalid.get(&invalid.policy);
            if seen != Some(&invalid.generation) {
                let errors: Vec<String> = invalid.errors.iter().map(ToString::to_string).collect();
                tracing::error!(
                    policy = %invalid.policy,
                    serving_previous = invalid.serving_previous,
                    "policy rejected: {}",
                    errors.join("; ")
                );
                self.reported_invalid
                    .insert(invalid.policy.clone(), invalid.generation);
            }
        }
        self.reported_invalid
            .retain(|id, _| derived.invalid.iter().any(|i| &i.policy == id));
        let conflicts: BTreeSet<(PolicyId, PolicyId)> = derived
            .conflicted
            .iter()
            .map(|c| (c.policy.clone(), c.winner.clone()))
            .collect();
        for conflict in &derived.conflicted {
            if !self
                .reported_conflicts
                .contains(&(conflict.policy.clone(), conflict.winner.clone()))
            {
                tracing::warn!(
                    policy = %conflict.policy,
                    winner = %conflict.winner,
                    port = conflict.port,
                    "policy ignored: an older policy selecting this pod uses the same listener port"
                );
            }
        }
        self.reported_conflicts = conflicts;
        self.metrics
            .invalid
            .set(i64::try_from(derived.invalid.len()).unwrap_or(i64::MAX));
        self.metrics
            .conflicted
            .set(i64::try_from(derived.conflicted.len()).unwrap_or(i64::MAX));
    }

    /// `config_source_up` and, while up, the last-sync timestamp.
    fn report_health(&mut self) {
        let up = self.pod_known
            && self.policy_watch.is_some()
            && self.failing.is_empty()
            && self.listing.is_empty()
            && self.published.is_some();
        self.metrics.up.set(i64::from(up));
        if up {
            self.mark_synced();
        }
    }

    fn mark_synced(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.metrics
            .last_sync
            .set(i64::try_from(now).unwrap_or(i64::MAX));
    }

    /// GETs the pod (labels, and proof the API server answers), once at a time.
    fn probe(&mut self) {
        if self.probing {
            return;
        }
        self.probing = true;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.options.namespace);
        let name = self.options.pod_name.clone();
        let tx = self.events_tx.clone();
        tokio::spawn(async move {
            let result = match tokio::time::timeout(PROBE_TIMEOUT, pods.get(&name)).await {
                Ok(Ok(pod)) => Ok(pod.metadata.labels.unwrap_or_default()),
                Ok(Err(err)) => Err(format!("getting pod {name}: {err}")),
                Err(_) => Err(format!("getting pod {name}: timed out")),
            };
            let _ = tx.send(SourceEvent::Pod(result));
        });
    }

    fn watch_policies(&self) -> WatchTask {
        let api: Api<ResiliencePolicy> =
            Api::namespaced(self.client.clone(), &self.options.namespace);
        spawn_watch(
            api,
            watcher::Config::default(),
            self.events_tx.clone(),
            |change| SourceEvent::Policies(Box::new(change)),
        )
    }

    fn watch_slices(&self, key: &ServiceKey) -> WatchTask {
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &key.namespace);
        let config =
            watcher::Config::default().labels(&format!("{SERVICE_NAME_LABEL}={}", key.name));
        let key = key.clone();
        spawn_watch(api, config, self.events_tx.clone(), move |change| {
            SourceEvent::Slices(key.clone(), Box::new(change))
        })
    }
}

/// Runs a kube-runtime watcher (with its default exponential backoff) and forwards its events,
/// buffering a (re)list until `InitDone` so it arrives as one `Replace`.
fn spawn_watch<K>(
    api: Api<K>,
    config: watcher::Config,
    tx: mpsc::UnboundedSender<SourceEvent>,
    wrap: impl Fn(Change<K>) -> SourceEvent + Send + 'static,
) -> WatchTask
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    WatchTask(tokio::spawn(async move {
        let mut stream = watcher::watcher(api, config).default_backoff().boxed();
        let mut buffer = Vec::new();
        while let Some(item) = stream.next().await {
            let change = match item {
                Ok(Event::Init) => {
                    buffer.clear();
                    continue;
                }
                Ok(Event::InitApply(object)) => {
                    buffer.push(object);
                    continue;
                }
                Ok(Event::InitDone) => Change::Replace(std::mem::take(&mut buffer)),
                Ok(Event::Apply(object)) => Change::Apply(object),
                Ok(Event::Delete(object)) => Change::Delete(object),
                Err(err) => Change::Failed(err.to_string()),
            };
            if tx.send(wrap(change)).is_err() {
                return;
            }
        }
    }))
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
