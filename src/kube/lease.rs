//! Leader election on a `coordination.k8s.io/v1` Lease, guarded by resourceVersion.
//!
//! One replica holds the Lease and renews it every third of its duration; the others read it
//! and take it over only after it went unrenewed for a whole duration, measured on their own
//! clock from when they last saw it change (so clock skew between nodes does not matter).
//! Every write is a `replace` carrying the resourceVersion that was read, so two replicas
//! racing for an expired Lease cannot both win: the loser gets `409 Conflict` and stays a
//! follower. A holder considers itself leader only until `duration` after it *sent* its last
//! successful renewal, which is before any follower can have started counting; when a renewal
//! fails it keeps retrying, and stops leading the moment that deadline passes.
//!
//! Why not `kube-lease-manager`: it detects competing holders through server-side-apply
//! field-ownership conflicts, which the in-process test API server does not model; a
//! resourceVersion-guarded replace is the mechanism client-go uses and is checkable there.

use std::time::Duration;

use ::kube::Api;
use ::kube::api::{ObjectMeta, PostParams};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use thiserror::Error;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Which Lease to contend for, and as whom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseOptions {
    /// Lease name, e.g. `breakwater-operator`.
    pub name: String,
    /// Namespace the Lease lives in (the operator's own, from `POD_NAMESPACE`).
    pub namespace: String,
    /// This replica's identity (`POD_NAME`, or the host name); written as `holderIdentity`.
    pub identity: String,
    /// How long a holder may go without renewing before others take over.
    pub duration: Duration,
}

/// A replica's view of whether it leads; cheap to clone and to check.
#[derive(Clone, Debug)]
pub struct Leadership {
    until: watch::Receiver<Option<Instant>>,
}

/// The Lease could not be read or written.
#[derive(Debug, Error)]
pub enum LeaseError {
    /// The API request failed.
    #[error("lease {namespace}/{name}: {source}")]
    Api {
        /// Lease namespace.
        namespace: String,
        /// Lease name.
        name: String,
        /// What the client said.
        #[source]
        source: ::kube::Error,
    },
    /// The API request took longer than the time left to act on its answer.
    #[error("lease {namespace}/{name}: request timed out")]
    Timeout {
        /// Lease namespace.
        namespace: String,
        /// Lease name.
        name: String,
    },
}

/// Contends for a Lease until stopped; see the module docs for the protocol.
pub struct LeaseElector {
    api: Api<Lease>,
    options: LeaseOptions,
    until: watch::Sender<Option<Instant>>,
    observed: Option<Observed>,
}

/// The last version of someone else's Lease this replica saw, and when it first saw it.
struct Observed {
    resource_version: Option<String>,
    at: Instant,
}

/// What one attempt to acquire or renew ended with.
enum Attempt {
    /// This replica holds the Lease until the given instant.
    Leading(Instant),
    /// Someone else holds it (or won the race for it).
    Following,
}

impl LeaseOptions {
    /// How often the holder renews: a third of the duration.
    pub fn renew_period(&self) -> Duration {
        self.duration / 3
    }

    /// How often followers look at the Lease: a tenth of the duration, at least 50 ms, so
    /// a takeover happens at most a fifth of a duration after the Lease expired.
    pub fn retry_period(&self) -> Duration {
        (self.duration / 10).max(Duration::from_millis(50))
    }

    fn duration_seconds(&self) -> i32 {
        let secs = self.duration.as_secs_f64().ceil();
        // Lease durations are seconds in the API; anything absurdly large is clamped.
        if secs >= f64::from(i32::MAX) {
            i32::MAX
        } else {
            (secs as i32).max(1)
        }
    }
}

impl Leadership {
    /// True while this replica holds the Lease and its last renewal has not run out.
    pub fn is_leader(&self) -> bool {
        self.until
            .borrow()
            .is_some_and(|until| Instant::now() < until)
    }

    /// Waits until leadership may have changed (acquired, renewed, lost); `Err` once the
    /// elector is gone, after which [`Leadership::is_leader`] stays false.
    pub async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        self.until.changed().await
    }

    /// A view that never leads (for replicas that must not write).
    pub fn never() -> Leadership {
        let (_, until) = watch::channel(None);
        Leadership { until }
    }
}

impl LeaseElector {
    /// An elector for `options` over `api` (namespaced to `options.namespace`), and the
    /// leadership view it publishes to.
    pub fn new(client: ::kube::Client, options: LeaseOptions) -> (LeaseElector, Leadership) {
        let api = Api::namespaced(client, &options.namespace);
        let (until, rx) = watch::channel(None);
        let elector = LeaseElector {
            api,
            options,
            until,
            observed: None,
        };
        (elector, Leadership { until: rx })
    }

    /// Contends for the Lease until `stop` is cancelled; then, if leading, releases it (clears
    /// `holderIdentity`) so another replica takes over without waiting for it to expire.
    pub async fn run(mut self, stop: CancellationToken) {
        loop {
            let attempt = tokio::time::timeout(
                self.options.renew_period().max(Duration::from_millis(100)),
                self.try_acquire_or_renew(),
            )
            .await
            .unwrap_or_else(|_| {
                Err(LeaseError::Timeout {
                    namespace: self.options.namespace.clone(),
                    name: self.options.name.clone(),
                })
            });
            let next = match attempt {
                Ok(Attempt::Leading(until)) => {
                    if !self.leading_now() {
                        tracing::info!(identity = %self.options.identity, lease = %self.options.name, "acquired the lease: leading");
                    }
                    self.until.send_replace(Some(until));
                    Instant::now() + self.options.renew_period()
                }
                Ok(Attempt::Following) => {
                    if self.until.borrow().is_some() {
                        tracing::warn!(identity = %self.options.identity, "lost the lease: following");
                        self.until.send_replace(None);
                    }
                    Instant::now() + self.options.retry_period()
                }
                Err(err) => {
                    // Keep leading until the last renewal runs out; retry soon.
                    tracing::warn!(%err, "lease request failed");
                    Instant::now() + self.options.retry_period()
                }
            };
            let wake = match *self.until.borrow() {
                Some(until) if until < next => until,
                _ => next,
            };
            tokio::select! {
                _ = stop.cancelled() => {
                    self.release().await;
                    return;
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
            if self.until.borrow().is_some() && !self.leading_now() {
                tracing::warn!(identity = %self.options.identity, "lease renewal overdue: stopped leading");
                self.until.send_replace(None);
            }
        }
    }

    fn leading_now(&self) -> bool {
        self.until
            .borrow()
            .is_some_and(|until| Instant::now() < until)
    }

    fn api_error(&self, source: ::kube::Error) -> LeaseError {
        LeaseError::Api {
            namespace: self.options.namespace.clone(),
            name: self.options.name.clone(),
            source,
        }
    }

    async fn try_acquire_or_renew(&mut self) -> Result<Attempt, LeaseError> {
        // Validity counts from before the request, so it ends no later than any follower's
        // expiry clock (which starts when it sees the renewed Lease).
        let sent = Instant::now();
        let valid_until = sent + self.options.duration;
        let now = MicroTime(Timestamp::now());
        let current = self
            .api
            .get_opt(&self.options.name)
            .await
            .map_err(|e| self.api_error(e))?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.options.name.clone()),
                    namespace: Some(self.options.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.options.identity.clone()),
                    lease_duration_seconds: Some(self.options.duration_seconds()),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Leading(valid_until)),
                Err(err) if is_conflict(&err) => Ok(Attempt::Following),
                Err(err) => Err(self.api_error(err)),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let mine = holder.as_deref() == Some(self.options.identity.as_str());
        if !mine {
            let version = lease.metadata.resource_version.clone();
            let seen_before = self
                .observed
                .as_ref()
                .is_some_and(|o| o.resource_version == version);
            if !seen_before {
                // Counted from when the answer arrived, not from when the request left: the
                // holder may have renewed while the request was in flight, and its validity
                // runs from before that renewal was sent.
                self.observed = Some(Observed {
                    resource_version: version,
                    at: Instant::now(),
                });
            }
            let held_for = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.options.duration, Duration::from_secs);
            let expired = self
                .observed
                .as_ref()
                .is_some_and(|o| sent >= o.at + held_for);
            if holder.is_some() && !expired {
                return Ok(Attempt::Following);
            }
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
            spec.holder_identity = Some(self.options.identity.clone());
        }
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(self.options.duration_seconds());
        // `replace` sends the resourceVersion read above: a concurrent writer makes this 409.
        match self
            .api
            .replace(&self.options.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                self.observed = None;
                Ok(Attempt::Leading(valid_until))
            }
            Err(err) if is_conflict(&err) => Ok(Attempt::Following),
            Err(err) => Err(self.api_error(err)),
        }
    }

    async fn release(&mut self) {
        if !self.leading_now() {
            self.until.send_replace(None);
            return;
        }
        // Stop leading before the write, so nothing is written after the release.
        self.until.send_replace(None);
        let result = async {
            let Some(mut lease) = self.api.get_opt(&self.options.name).await? else {
                return Ok(());
            };
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() != Some(self.options.identity.as_str()) {
                return Ok(());
            }
            spec.holder_identity = None;
            self.api
                .replace(&self.options.name, &PostParams::default(), &lease)
                .await
                .map(|_| ())
        };
        match tokio::time::timeout(self.options.renew_period(), result).await {
            Ok(Ok(())) => tracing::info!(identity = %self.options.identity, "released the lease"),
            Ok(Err(err)) => tracing::warn!(%err, "releasing the lease failed; it will expire"),
            Err(_) => tracing::warn!("releasing the lease timed out; it will expire"),
        }
    }
}

fn is_conflict(err: &::kube::Error) -> bool {
    matches!(err, ::kube::Error::Api(status) if status.code == 409)
}
