//! `breakwater operator`: validates every ResiliencePolicy in the cluster, resolves its
//! Service references, and writes `status` — the single writer, leader-elected on a Lease.
//!
//! Every replica watches ResiliencePolicies, Services and EndpointSlices cluster-wide into
//! reflector stores (so a follower's caches are warm when it takes over) and derives each
//! policy's status with [`derive::desired_status`]. Only the replica holding the Lease
//! writes: status by server-side apply with one field manager, and an Event per condition
//! flip. A write happens only when the derived status differs from what the policy shows,
//! so the watch event a write causes finds nothing left to do.
//!
//! With [`OperatorOptions::webhook`] set, every replica also serves the sidecar injection
//! webhook ([`webhook`]), independently of the Lease.

pub mod admin;
pub mod derive;
pub mod metrics;
pub mod webhook;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ::kube::api::{Patch, PatchParams};
use ::kube::runtime::WatchStreamExt;
use ::kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use ::kube::runtime::reflector::{self, ObjectRef, Store};
use ::kube::runtime::watcher::{self, Event};
use ::kube::{Api, Client, Resource};
use futures_util::FutureExt;
use futures_util::stream::{BoxStream, StreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use serde_json::json;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::admin::OperatorAdmin;
use self::derive::{ClusterView, SERVICE_NAME_LABEL};
use self::metrics::OperatorMetrics;
use self::webhook::{RunningWebhook, WebhookError, WebhookOptions};
use crate::config::spec::{API_VERSION, KIND};
use crate::kube::lease::{Leadership, LeaseElector, LeaseOptions};
use crate::kube::{ResiliencePolicy, ResiliencePolicyStatus};
use crate::metrics::MetricsError;

/// The field manager of every status write (one for all replicas: they take turns).
pub const FIELD_MANAGER: &str = "breakwater-operator";
/// The default Lease name.
pub const LEASE_NAME: &str = "breakwater-operator";
/// The default Lease duration.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
/// Events longer than this (the API's 1 kB note limit) are cut.
const MAX_NOTE: usize = 1000;

/// How to run the operator.
#[derive(Clone, Debug)]
pub struct OperatorOptions {
    /// Admin server address (`/health`, `/ready`, `/metrics`); port 0 picks one.
    pub admin_addr: SocketAddr,
    /// The Lease to contend for.
    pub lease: LeaseOptions,
    /// Field manager of status writes.
    pub field_manager: String,
    /// Every policy is re-derived this often even without changes.
    pub resync_period: Duration,
    /// A failed status write is retried after this long.
    pub retry_delay: Duration,
    /// The sidecar injection webhook; `None` serves none.
    pub webhook: Option<WebhookOptions>,
}

/// Why the operator could not start or stopped.
#[derive(Debug, Error)]
pub enum OperatorError {
    /// The admin address could not be bound.
    #[error("binding the operator admin server to {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The metric families could not be registered.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// The injection webhook could not start.
    #[error("starting the injection webhook")]
    Webhook(#[from] WebhookError),
    /// A watch stream ended (they are meant to run forever).
    #[error("the watch of {0} ended")]
    WatchEnded(&'static str),
    /// An operator task panicked.
    #[error("an operator task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// A started operator; dropping it aborts its tasks without releasing the Lease (as a crash
/// would), [`RunningOperator::shutdown`] releases it.
pub struct RunningOperator {
    admin_addr: SocketAddr,
    admin: Arc<OperatorAdmin>,
    metrics: Arc<OperatorMetrics>,
    stop: CancellationToken,
    controller: Option<JoinHandle<Result<(), OperatorError>>>,
    elector: Option<JoinHandle<()>>,
    admin_task: Option<JoinHandle<()>>,
    webhook: Option<RunningWebhook>,
}

/// The resources the operator watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Watched {
    Policies,
    Services,
    EndpointSlices,
}

/// What one watch event asks the controller to look at.
enum Trigger {
    Policy(ObjectRef<ResiliencePolicy>),
    Service { namespace: String, name: String },
    Synced(Watched),
    WatchError(Watched),
    Nothing,
}

/// Policies waiting to be reconciled.
#[derive(Default)]
struct Dirty {
    all: bool,
    policies: HashSet<ObjectRef<ResiliencePolicy>>,
}

/// The control loop's state.
struct Controller {
    client: Client,
    options: OperatorOptions,
    policies: Store<ResiliencePolicy>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    leadership: Leadership,
    metrics: Arc<OperatorMetrics>,
    admin: Arc<OperatorAdmin>,
    recorder: Recorder,
    /// Whether each known policy was last derived accepted (for `operator_policies`).
    accepted: HashMap<ObjectRef<ResiliencePolicy>, bool>,
    /// The status last written per policy, with the policy's resourceVersion before the
    /// write: until the watch delivers the written version, this is the current status.
    written: HashMap<ObjectRef<ResiliencePolicy>, (Option<String>, ResiliencePolicyStatus)>,
    retry: HashSet<ObjectRef<ResiliencePolicy>>,
    retry_at: Option<Instant>,
}

/// Looks Services and their EndpointSlices up in the reflector stores.
struct StoreView<'a> {
    services: &'a Store<Service>,
    slices: &'a Store<EndpointSlice>,
}

/// How one reconcile ended (the `result` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Written,
    Unchanged,
    NotLeader,
}

impl OperatorOptions {
    /// Defaults for a replica called `identity` with its Lease in `namespace`: Lease
    /// `breakwater-operator` of 15 s, admin on `0.0.0.0:9901`, resync every 5 minutes, no
    /// webhook.
    pub fn new(identity: impl Into<String>, namespace: impl Into<String>) -> Self {
        OperatorOptions {
            admin_addr: SocketAddr::from(([0, 0, 0, 0], 9901)),
            lease: LeaseOptions {
                name: LEASE_NAME.to_owned(),
                namespace: namespace.into(),
                identity: identity.into(),
                duration: DEFAULT_LEASE_DURATION,
            },
            field_manager: FIELD_MANAGER.to_owned(),
            resync_period: Duration::from_secs(300),
            retry_delay: Duration::from_secs(1),
            webhook: None,
        }
    }
}

impl Watched {
    fn as_str(self) -> &'static str {
        match self {
            Watched::Policies => "resiliencepolicies",
            Watched::Services => "services",
            Watched::EndpointSlices => "endpointslices",
        }
    }
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Written => "written",
            Outcome::Unchanged => "unchanged",
            Outcome::NotLeader => "not_leader",
        }
    }
}

impl ClusterView for StoreView<'_> {
    fn service(&self, namespace: &str, name: &str) -> Option<Arc<Service>> {
        self.services.get(&ObjectRef::new(name).within(namespace))
    }

    fn endpoint_slices(&self, namespace: &str, service: &str) -> Vec<Arc<EndpointSlice>> {
        self.slices.state_filter(|slice| {
            slice.metadata.namespace.as_deref() == Some(namespace)
                && service_of_slice(slice) == Some(service)
        })
    }
}

/// Binds the admin server (and the webhook, if configured), starts the Lease elector, the
/// watches and the control loop.
pub async fn start(
    client: Client,
    options: OperatorOptions,
) -> Result<RunningOperator, OperatorError> {
    let metrics = Arc::new(OperatorMetrics::new()?);
    let webhook = match options.webhook.clone() {
        Some(webhook_options) => Some(webhook::start(webhook_options, Arc::clone(&metrics)).await?),
        None => None,
    };
    let listener = TcpListener::bind(options.admin_addr)
        .await
        .map_err(|source| OperatorError::Bind {
            addr: options.admin_addr,
            source,
        })?;
    let admin_addr = listener
        .local_addr()
        .map_err(|source| OperatorError::Bind {
            addr: options.admin_addr,
            source,
        })?;
    let stop = CancellationToken::new();
    let (elector, leadership) = LeaseElector::new(client.clone(), options.lease.clone());
    let admin = Arc::new(OperatorAdmin {
        metrics: Arc::clone(&metrics),
        leadership: leadership.clone(),
        synced: false.into(),
        identity: options.lease.identity.clone(),
        started: Instant::now(),
    });
    let admin_task = tokio::spawn(admin::serve(listener, Arc::clone(&admin), stop.clone()));
    let elector = tokio::spawn(elector.run(stop.clone()));
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: FIELD_MANAGER.to_owned(),
            instance: Some(options.lease.identity.clone()),
        },
    );
    let (policies, policy_writer) = reflector::store::<ResiliencePolicy>();
    let (services, service_writer) = reflector::store::<Service>();
    let (slices, slice_writer) = reflector::store::<EndpointSlice>();
    let triggers: Vec<BoxStream<'static, Trigger>> = vec![
        reflector::reflector(
            policy_writer,
            watcher::watcher(
                Api::<ResiliencePolicy>::all(client.clone()),
                watcher::Config::default(),
            )
            .default_backoff(),
        )
        .map(|event| {
            classify(Watched::Policies, event, |p: &ResiliencePolicy| {
                Trigger::Policy(ObjectRef::from_obj(p))
            })
        })
        .boxed(),
        reflector::reflector(
            service_writer,
            watcher::watcher(
                Api::<Service>::all(client.clone()),
                watcher::Config::default(),
            )
            .default_backoff(),
        )
        .map(|event| {
            classify(Watched::Services, event, |s: &Service| Trigger::Service {
                namespace: s.metadata.namespace.clone().unwrap_or_default(),
                name: s.metadata.name.clone().unwrap_or_default(),
            })
        })
        .boxed(),
        reflector::reflector(
            slice_writer,
            watcher::watcher(
                Api::<EndpointSlice>::all(client.clone()),
                watcher::Config::default(),
            )
            .default_backoff(),
        )
        .map(|event| {
            classify(
                Watched::EndpointSlices,
                event,
                |s: &EndpointSlice| match service_of_slice(s) {
                    Some(name) => Trigger::Service {
                        namespace: s.metadata.namespace.clone().unwrap_or_default(),
                        name: name.to_owned(),
                    },
                    None => Trigger::Nothing,
                },
            )
        })
        .boxed(),
    ];
    let controller = Controller {
        client,
        options,
        policies,
        services,
        slices,
        leadership,
        metrics: Arc::clone(&metrics),
        admin: Arc::clone(&admin),
        recorder,
        accepted: HashMap::new(),
        written: HashMap::new(),
        retry: HashSet::new(),
        retry_at: None,
    };
    let controller = tokio::spawn(controller.run(triggers, stop.clone()));
    Ok(RunningOperator {
        admin_addr,
        admin,
        metrics,
        stop,
        controller: Some(controller),
        elector: Some(elector),
        admin_task: Some(admin_task),
        webhook,
    })
}

impl RunningOperator {
    /// Where the admin server listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Whether this replica currently holds the Lease.
    pub fn is_leader(&self) -> bool {
        self.admin.leadership.is_leader()
    }

    /// Whether every cache completed its first list (what `/ready` reports).
    pub fn is_synced(&self) -> bool {
        self.admin.synced.load(Ordering::Acquire)
    }

    /// The metric families.
    pub fn metrics(&self) -> &OperatorMetrics {
        &self.metrics
    }

    /// Where the injection webhook listens, if it runs.
    pub fn webhook_addr(&self) -> Option<SocketAddr> {
        self.webhook.as_ref().map(RunningWebhook::addr)
    }

    /// Resolves when the control loop ends on its own (a watch ended or a task failed).
    pub async fn finished(&mut self) -> Result<(), OperatorError> {
        match self.controller.as_mut() {
            Some(task) => {
                let result = task.await;
                self.controller = None;
                result.map_err(OperatorError::Task)?
            }
            None => std::future::pending().await,
        }
    }

    /// Stops writing, releases the Lease (so another replica takes over at once) and stops
    /// the watches, the admin server and the webhook.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(webhook) = self.webhook.take() {
            webhook.shutdown().await;
        }
        for task in [self.elector.take(), self.admin_task.take()]
            .into_iter()
            .flatten()
        {
            let _ = task.await;
        }
        if let Some(task) = self.controller.take() {
            let _ = task.await;
        }
    }
}

impl Drop for RunningOperator {
    fn drop(&mut self) {
        for task in [self.elector.take(), self.admin_task.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
        if let Some(task) = self.controller.take() {
            task.abort();
        }
    }
}

impl Controller {
    async fn run(
        mut self,
        triggers: Vec<BoxStream<'static, Trigger>>,
        stop: CancellationToken,
    ) -> Result<(), OperatorError> {
        let mut triggers = futures_util::stream::select_all(triggers);
        let mut synced: HashSet<Watched> = HashSet::new();
        let mut dirty = Dirty::default();
        let mut leadership = self.leadership.clone();
        let mut elector_alive = true;
        let mut was_leader = false;
        let mut resync = tokio::time::interval(self.options.resync_period);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.reset();
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(()),
                changed = leadership.changed(), if elector_alive => {
                    elector_alive = changed.is_ok();
                }
                trigger = triggers.next() => {
                    let Some(trigger) = trigger else {
                        return Err(OperatorError::WatchEnded("the cluster"));
                    };
                    self.note(trigger, &mut dirty, &mut synced);
                    // Take whatever else is already waiting, so a burst is one batch.
                    for _ in 0..1024 {
                        match triggers.next().now_or_never() {
                            Some(Some(trigger)) => self.note(trigger, &mut dirty, &mut synced),
                            _ => break,
                        }
                    }
                }
                _ = sleep_until_opt(self.retry_at) => {
                    self.retry_at = None;
                    dirty.policies.extend(self.retry.drain());
                }
                _ = resync.tick() => dirty.all = true,
            }
            let leader = self.leadership.is_leader();
            self.metrics.leader.set(i64::from(leader));
            if leader && !was_leader {
                // A new leader checks everything: the previous one may have died mid-way.
                dirty.all = true;
            }
            was_leader = leader;
            if synced.len() == 3 && !self.admin.synced.load(Ordering::Acquire) {
                tracing::info!("operator caches synced");
                self.admin.synced.store(true, Ordering::Release);
                self.metrics.synced.set(1);
                dirty.all = true;
            }
            if synced.len() == 3 && (dirty.all || !dirty.policies.is_empty()) {
                self.process(std::mem::take(&mut dirty)).await;
            }
        }
    }

    /// Records what a watch event means for which policies.
    fn note(&mut self, trigger: Trigger, dirty: &mut Dirty, synced: &mut HashSet<Watched>) {
        match trigger {
            Trigger::Policy(policy) => {
                dirty.policies.insert(policy);
            }
            Trigger::Service { namespace, name } => {
                let affected = self
                    .policies
                    .state_filter(|p| derive::references_service(p, &namespace, &name));
                dirty
                    .policies
                    .extend(affected.iter().map(|p| ObjectRef::from_obj(p.as_ref())));
            }
            Trigger::Synced(watched) => {
                // A (re-)list replaced the store wholesale: anything may have changed.
                synced.insert(watched);
                dirty.all = true;
            }
            Trigger::WatchError(watched) => {
                self.metrics
                    .watch_errors
                    .with_label_values(&[watched.as_str()])
                    .inc();
            }
            Trigger::Nothing => {}
        }
    }

    async fn process(&mut self, dirty: Dirty) {
        let refs: Vec<ObjectRef<ResiliencePolicy>> = if dirty.all {
            let all: Vec<_> = self
                .policies
                .state()
                .iter()
                .map(|p| ObjectRef::from_obj(p.as_ref()))
                .collect();
            let known: HashSet<_> = all.iter().cloned().collect();
            self.accepted.retain(|r, _| known.contains(r));
            self.written.retain(|r, _| known.contains(r));
            all
        } else {
            dirty.policies.into_iter().collect()
        };
        for policy in refs {
            match self.reconcile(&policy).await {
                Ok(outcome) => {
                    self.metrics
                        .reconciles
                        .with_label_values(&[outcome.label()])
                        .inc();
                }
                Err(err) => {
                    tracing::warn!(policy = %policy, %err, "writing policy status failed; will retry");
                    self.metrics.reconciles.with_label_values(&["error"]).inc();
                    self.retry.insert(policy);
                    self.retry_at
                        .get_or_insert_with(|| Instant::now() + self.options.retry_delay);
                }
            }
        }
        let accepted = self.accepted.values().filter(|a| **a).count();
        let rejected = self.accepted.len() - accepted;
        let gauge = |label: &str, n: usize| {
            self.metrics
                .policies
                .with_label_values(&[label])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        };
        gauge("true", accepted);
        gauge("false", rejected);
    }

    async fn reconcile(
        &mut self,
        key: &ObjectRef<ResiliencePolicy>,
    ) -> Result<Outcome, ::kube::Error> {
        let Some(policy) = self.policies.get(key) else {
            self.accepted.remove(key);
            self.written.remove(key);
            return Ok(Outcome::Unchanged);
        };
        let current = match self.written.get(key) {
            Some((version, status)) if *version == policy.metadata.resource_version => {
                Some(status.clone())
            }
            _ => {
                self.written.remove(key);
                policy.status.clone()
            }
        };
        let view = StoreView {
            services: &self.services,
            slices: &self.slices,
        };
        let desired = derive::desired_status(&policy, &view, current.as_ref(), Timestamp::now());
        self.accepted
            .insert(key.clone(), derive::is_accepted(&desired));
        if !derive::needs_write(current.as_ref(), &desired) {
            return Ok(Outcome::Unchanged);
        }
        // Checked right before the write: a replica whose lease ran out writes nothing more.
        if !self.leadership.is_leader() {
            return Ok(Outcome::NotLeader);
        }
        let namespace = policy.metadata.namespace.as_deref().unwrap_or("default");
        let name = policy.metadata.name.as_deref().unwrap_or_default();
        let api: Api<ResiliencePolicy> = Api::namespaced(self.client.clone(), namespace);
        let body = json!({"apiVersion": API_VERSION, "kind": KIND, "status": desired});
        api.patch_status(
            name,
            &PatchParams::apply(&self.options.field_manager).force(),
            &Patch::Apply(&body),
        )
        .await?;
        self.metrics.status_writes.inc();
        tracing::debug!(policy = %key, "status written");
        let transitions = derive::transitions(current.as_ref(), &desired);
        self.written.insert(
            key.clone(),
            (policy.metadata.resource_version.clone(), desired),
        );
        let reference = policy.object_ref(&());
        for transition in transitions {
            self.publish(&transition, &reference).await;
        }
        Ok(Outcome::Written)
    }

    async fn publish(
        &self,
        transition: &derive::Transition,
        reference: &k8s_openapi::api::core::v1::ObjectReference,
    ) {
        let mut note = format!(
            "{} is {}: {}",
            transition.type_, transition.status, transition.message
        );
        if note.len() > MAX_NOTE {
            let mut end = MAX_NOTE;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
        }
        let event = KubeEvent {
            type_: if transition.status == "True" {
                EventType::Normal
            } else {
                EventType::Warning
            },
            reason: transition.reason.clone(),
            note: Some(note),
            action: if transition.type_ == derive::ACCEPTED {
                "Validate".to_owned()
            } else {
                "ResolveRefs".to_owned()
            },
            secondary: None,
        };
        match self.recorder.publish(&event, reference).await {
            Ok(()) => self
                .metrics
                .events
                .with_label_values(&[transition.type_.as_str()])
                .inc(),
            // Events are best effort: the status already says it.
            Err(err) => tracing::warn!(%err, "publishing an event failed"),
        }
    }
}

/// Maps one reflector event to what the controller must look at.
fn classify<K>(
    watched: Watched,
    event: Result<Event<K>, watcher::Error>,
    on_change: impl Fn(&K) -> Trigger,
) -> Trigger {
    match event {
        Ok(Event::Apply(object) | Event::Delete(object)) => on_change(&object),
        // A (re-)list is applied to the store at once when it completes.
        Ok(Event::Init | Event::InitApply(_)) => Trigger::Nothing,
        Ok(Event::InitDone) => Trigger::Synced(watched),
        Err(err) => {
            tracing::warn!(resource = watched.as_str(), %err, "watch error; retrying with backoff");
            Trigger::WatchError(watched)
        }
    }
}

fn service_of_slice(slice: &EndpointSlice) -> Option<&str> {
    slice
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
        .map(String::as_str)
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
