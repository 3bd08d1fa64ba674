//! Active health checks: one task per endpoint probes it over its own pool and records the verdict.
//!
//! A checker keeps its consecutive counts and its verdict across configuration snapshots: a
//! reconcile hands it new settings through a watch channel instead of restarting it. Verdicts
//! are written under a per-checker gate that stopping also takes, so a probe finishing while its
//! checker is stopped can never overwrite the reset to [`Health::Unknown`].

use std::collections::HashMap;

use crate::sync::lock;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use http::header::{HOST, USER_AGENT};
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use rand::Rng;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::config::resilience::HealthCheckConfig;
use crate::endpoint::{EndpointKey, EndpointState, Health};
use crate::proxy::body::RequestBody;
use crate::proxy::pool::{
    ConnectError, EndpointPool, PoolReturn, SendError, UpstreamBody, UpstreamError,
};

/// `user-agent` of every probe, so backends can tell probes from traffic in their logs.
const PROBE_USER_AGENT: &str = "breakwater-health-check";
/// Response body read to reuse a connection; a larger body costs more than a new connection.
const MAX_DRAIN_BYTES: usize = 64 << 10;
/// Relative jitter of the probe interval (±10%).
const JITTER: f64 = 0.1;
/// Longest wait ever scheduled, so no configured duration can overflow a deadline.
const MAX_WAIT: Duration = Duration::from_secs(24 * 60 * 60);

/// One endpoint to probe.
pub struct HealthTarget {
    /// Identity of the endpoint; one checker runs per key.
    pub key: EndpointKey,
    /// Where verdicts are recorded. The checker keeps only a weak reference and stops once no
    /// one else holds the state.
    pub state: Arc<EndpointState>,
    /// The endpoint's connection pool; probes share its connections with traffic.
    pub pool: Arc<EndpointPool>,
    /// Sent as `Host` (HTTP/1.1) and used in the request URI.
    pub authority: Authority,
    /// Probe settings.
    pub config: Arc<HealthCheckConfig>,
}

/// The running set of checkers, one tokio task per endpoint.
///
/// Dropping it stops every checker, as [`HealthCheckers::stop_all`] does.
#[derive(Default)]
pub struct HealthCheckers {
    checkers: Mutex<HashMap<EndpointKey, Checker>>,
}

/// Why one probe failed.
#[derive(Debug, thiserror::Error)]
enum ProbeFailure {
    /// The endpoint answered with a status outside `expected_statuses`.
    #[error("unexpected status {0}")]
    Status(StatusCode),
    /// No response head within the probe timeout (connecting included).
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// No connection could be made.
    #[error("connect error: {0}")]
    Connect(#[source] ConnectError),
    /// The connection failed during the exchange.
    #[error("request failed: {0}")]
    Send(#[source] UpstreamError),
}

/// A [`HealthTarget`] prepared for probing: everything per probe is built once here.
struct Target {
    state: Weak<EndpointState>,
    pool: Arc<EndpointPool>,
    uri: Uri,
    /// `None` on HTTP/2, where the URI carries the authority.
    host: Option<HeaderValue>,
    config: Arc<HealthCheckConfig>,
}

/// Handle on one running checker.
struct Checker {
    target: watch::Sender<Arc<Target>>,
    gate: Arc<Gate>,
    task: AbortHandle,
}

/// Orders a checker's verdicts against the reset written when it is stopped.
struct Gate {
    open: Mutex<bool>,
}

/// Consecutive probe outcomes and the verdict they led to.
#[derive(Debug, Default)]
struct Tally {
    passes: u32,
    failures: u32,
    verdict: Option<Health>,
}

impl HealthCheckers {
    /// No checkers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the running checkers match `targets` (called after every snapshot swap, off the
    /// request path).
    ///
    /// Starts a checker for each new key; hands an existing key's checker its new config, state
    /// and pool in place, keeping its consecutive counts and verdict; stops checkers whose key is
    /// absent and sets their endpoint back to [`Health::Unknown`], since checks no longer apply.
    /// A checker that stopped by itself is started afresh if its key is still wanted. Must run
    /// inside a tokio runtime; outside one, new checkers cannot start and an error is logged.
    pub fn reconcile(&self, targets: Vec<HealthTarget>) {
        let mut wanted = HashMap::with_capacity(targets.len());
        for target in targets {
            match Target::new(&target) {
                Ok(prepared) => {
                    wanted.insert(target.key, prepared);
                }
                // Unreachable for compiled configs (the path is validated); treated as absent.
                Err(err) => tracing::warn!(
                    policy = %target.key.policy,
                    endpoint = %target.key.address,
                    %err,
                    "cannot build a health-check request; not checking this endpoint"
                ),
            }
        }
        let runtime = Handle::try_current();
        let mut checkers = lock(&self.checkers);
        checkers.retain(|key, checker| {
            let keep = wanted.contains_key(key) && !checker.task.is_finished();
            if !keep {
                checker.stop();
            }
            keep
        });
        for (key, target) in wanted {
            if let Some(checker) = checkers.get(&key) {
                checker.update(target);
                continue;
            }
            match &runtime {
                Ok(runtime) => {
                    let checker = Checker::start(runtime, key.clone(), target);
                    checkers.insert(key, checker);
                }
                Err(err) => tracing::error!(
                    policy = %key.policy,
                    endpoint = %key.address,
                    %err,
                    "no tokio runtime; health checker not started"
                ),
            }
        }
    }

    /// Stops every checker (shutdown) and sets their endpoints back to [`Health::Unknown`], so no
    /// endpoint stays out of rotation with nothing left to bring it back.
    pub fn stop_all(&self) {
        for (_, checker) in lock(&self.checkers).drain() {
            checker.stop();
        }
    }

    /// Number of running checkers (tests, `/health`).
    pub fn len(&self) -> usize {
        lock(&self.checkers)
            .values()
            .filter(|checker| !checker.task.is_finished())
            .count()
    }

    /// Whether no checker runs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for HealthCheckers {
    fn drop(&mut self) {
        self.stop_all();
    }
}

impl Target {
    fn new(target: &HealthTarget) -> Result<Self, http::Error> {
        let pool = &target.pool;
        let uri = Uri::builder()
            .scheme(if pool.is_tls() {
                Scheme::HTTPS
            } else {
                Scheme::HTTP
            })
            .authority(target.authority.clone())
            .path_and_query(target.config.path.as_str())
            .build()?;
        let host = if pool.is_http2() {
            None
        } else {
            Some(HeaderValue::from_str(target.authority.as_str())?)
        };
        Ok(Self {
            state: Arc::downgrade(&target.state),
            pool: Arc::clone(pool),
            uri,
            host,
            config: Arc::clone(&target.config),
        })
    }

    /// Whether an update would change nothing (so the checker need not wake).
    fn same_as(&self, other: &Self) -> bool {
        Weak::ptr_eq(&self.state, &other.state)
            && Arc::ptr_eq(&self.pool, &other.pool)
            && self.uri == other.uri
            && self.host == other.host
            && (Arc::ptr_eq(&self.config, &other.config) || self.config == other.config)
    }

    fn request(&self) -> Request<RequestBody> {
        let mut req = Request::new(RequestBody::empty());
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = if self.pool.is_http2() {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        let headers = req.headers_mut();
        if let Some(host) = &self.host {
            headers.insert(HOST, host.clone());
        }
        headers.insert(USER_AGENT, HeaderValue::from_static(PROBE_USER_AGENT));
        req
    }

    fn passes(&self, status: StatusCode) -> bool {
        let status = status.as_u16();
        self.config
            .expected_statuses
            .iter()
            .any(|&(lo, hi)| (lo..=hi).contains(&status))
    }
}

impl Checker {
    fn start(runtime: &Handle, key: EndpointKey, target: Target) -> Self {
        let (tx, rx) = watch::channel(Arc::new(target));
        let gate = Arc::new(Gate {
            open: Mutex::new(true),
        });
        let task = runtime.spawn(run(key, Arc::clone(&gate), rx));
        Self {
            target: tx,
            gate,
            task: task.abort_handle(),
        }
    }

    fn update(&self, target: Target) {
        self.target.send_if_modified(|current| {
            if current.same_as(&target) {
                return false;
            }
            *current = Arc::new(target);
            true
        });
    }

    fn stop(&self) {
        self.task.abort();
        let state = self.target.borrow().state.upgrade();
        self.gate.close(state.as_deref());
    }
}

impl Gate {
    /// Records `health` unless the checker was stopped; returns whether it is still running.
    fn publish(&self, state: &EndpointState, health: Health) -> bool {
        let open = lock(&self.open);
        if *open {
            state.set_health(health);
        }
        *open
    }

    fn close(&self, state: Option<&EndpointState>) {
        let mut open = lock(&self.open);
        *open = false;
        if let Some(state) = state {
            state.set_health(Health::Unknown);
        }
    }
}

impl Tally {
    /// Counts one probe outcome; returns the new verdict when it changed. Thresholds are read on
    /// every call, so a changed threshold applies to the running count.
    fn record(&mut self, passed: bool, config: &HealthCheckConfig) -> Option<Health> {
        let (count, threshold, verdict) = if passed {
            self.failures = 0;
            self.passes = self.passes.saturating_add(1);
            (self.passes, config.healthy_threshold, Health::Healthy)
        } else {
            self.passes = 0;
            self.failures = self.failures.saturating_add(1);
            (self.failures, config.unhealthy_threshold, Health::Unhealthy)
        };
        if count < threshold || self.verdict == Some(verdict) {
            return None;
        }
        self.verdict = Some(verdict);
        Some(verdict)
    }
}

/// One checker: probes until its endpoint state is gone or it is stopped (aborted, or its
/// settings sender dropped).
async fn run(key: EndpointKey, gate: Arc<Gate>, mut updates: watch::Receiver<Arc<Target>>) {
    let mut target = Arc::clone(&updates.borrow_and_update());
    let mut tally = Tally::default();
    // A random first delay keeps a fleet of proxies from probing a backend in lockstep.
    let mut next = later(
        Instant::now(),
        scaled(target.config.interval, rand::rng().random::<f64>()),
    );
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            changed = updates.changed() => {
                if changed.is_err() {
                    return;
                }
                let update = Arc::clone(&updates.borrow_and_update());
                if update.config.interval != target.config.interval {
                    // A long old interval must not delay the new, shorter one.
                    next = next.min(later(Instant::now(), jittered(update.config.interval)));
                }
                if !Weak::ptr_eq(&update.state, &target.state) {
                    // The state was rebuilt under the same key; it inherits the verdict.
                    if let (Some(verdict), Some(state)) = (tally.verdict, update.state.upgrade()) {
                        if !gate.publish(&state, verdict) {
                            return;
                        }
                    }
                }
                target = update;
                continue;
            }
        }
        if target.state.strong_count() == 0 {
            return;
        }
        let started = Instant::now();
        let outcome = probe(&target).await;
        let Some(state) = target.state.upgrade() else {
            return;
        };
        let before = tally.verdict;
        if let Some(verdict) = tally.record(outcome.is_ok(), &target.config) {
            if !gate.publish(&state, verdict) {
                return;
            }
            log_verdict(&key, before, verdict, &outcome, &tally);
        }
        next = later(started, jittered(target.config.interval));
    }
}

/// One probe: `GET <path>`, pass when the status is expected. The connection goes back to the
/// pool only when the body was read completely within the limits.
async fn probe(target: &Target) -> Result<(), ProbeFailure> {
    let timeout = target.config.timeout;
    let deadline = later(Instant::now(), timeout);
    let (response, pooled) = tokio::time::timeout_at(deadline, exchange(target))
        .await
        .map_err(|_| ProbeFailure::Timeout(timeout))??;
    let status = response.status();
    let drained = tokio::time::timeout_at(deadline, drain(response.into_body()))
        .await
        .unwrap_or(false);
    if let (true, Some(pooled)) = (drained, pooled) {
        pooled.release();
    }
    if target.passes(status) {
        Ok(())
    } else {
        Err(ProbeFailure::Status(status))
    }
}

async fn exchange(
    target: &Target,
) -> Result<(Response<UpstreamBody>, Option<PoolReturn>), ProbeFailure> {
    let mut retried = false;
    loop {
        // Exempt from `overload.maxConnections`: a probe needs at most one connection, and one
        // refused because traffic is busy would mark a working endpoint down.
        let request = target.request();
        let conn = target
            .pool
            .checkout(&request, || true)
            .await
            .map_err(ProbeFailure::Connect)?;
        let reused = conn.reused;
        match conn.send(&target.pool, request).await {
            Ok(exchanged) => return Ok(exchanged),
            // A pooled connection the backend closed since its last use says nothing about the
            // backend's health (a keep-alive timeout close to the interval races every probe);
            // a GET is safe to send once more.
            Err(_) if reused && !retried => retried = true,
            Err(SendError::NotSent(err) | SendError::Failed(err)) => {
                return Err(ProbeFailure::Send(err));
            }
            // `send` sets no deadline of its own (the probe's timeout wraps it), so this is not
            // reached; a timeout is what it would mean.
            Err(SendError::TimedOut) => return Err(ProbeFailure::Timeout(target.config.timeout)),
        }
    }
}

/// Reads and discards a response body; `true` when it ended cleanly within [`MAX_DRAIN_BYTES`].
async fn drain(mut body: UpstreamBody) -> bool {
    let mut read = 0;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return false;
        };
        if let Some(data) = frame.data_ref() {
            read += data.len();
            if read > MAX_DRAIN_BYTES {
                return false;
            }
        }
    }
    true
}

fn log_verdict(
    key: &EndpointKey,
    before: Option<Health>,
    verdict: Health,
    outcome: &Result<(), ProbeFailure>,
    tally: &Tally,
) {
    match (verdict, outcome) {
        (Health::Unhealthy, Err(reason)) => tracing::warn!(
            policy = %key.policy,
            backend = %key.backend,
            endpoint = %key.address,
            %reason,
            failures = tally.failures,
            "endpoint failed its health checks; no new requests until it passes again"
        ),
        (Health::Healthy, _) if before == Some(Health::Unhealthy) => tracing::info!(
            policy = %key.policy,
            backend = %key.backend,
            endpoint = %key.address,
            passes = tally.passes,
            "endpoint passes its health checks again"
        ),
        _ => tracing::debug!(
            policy = %key.policy,
            backend = %key.backend,
            endpoint = %key.address,
            health = ?verdict,
            "first health-check verdict"
        ),
    }
}

/// `interval` jittered by ±[`JITTER`].
fn jittered(interval: Duration) -> Duration {
    scaled(
        interval,
        rand::rng().random_range(1.0 - JITTER..=1.0 + JITTER),
    )
}

fn scaled(duration: Duration, factor: f64) -> Duration {
    Duration::try_from_secs_f64(duration.as_secs_f64() * factor).unwrap_or(duration)
}

fn later(from: Instant, wait: Duration) -> Instant {
    from.checked_add(wait.min(MAX_WAIT)).unwrap_or(from)
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};

    use bytes::Bytes;
    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::config::PolicyId;
    use crate::config::spec::UpstreamProtocol;
    use crate::endpoint::EndpointRegistry;
    use crate::metrics::Metrics;
    use crate::proxy::pool::{ConnSettings, PoolCache};

    const PATH: &str = "/healthz";

    /// One request as the test backend saw it on arrival.
    #[derive(Clone, Debug)]
    struct Seen {
        /// The endpoint's health when the probe arrived: the verdict of all earlier probes.
        health: Option<Health>,
        status: u16,
        path: String,
        host: Option<String>,
        user_agent: Option<String>,
    }

    #[derive(Default)]
    struct Shared {
        status: AtomicU16,
        delay_ms: AtomicU64,
        body_bytes: usize,
        accepted: AtomicUsize,
        seen: Mutex<Vec<Seen>>,
        watched: Mutex<Weak<EndpointState>>,
    }

    /// A loopback HTTP/1.1 backend whose `/healthz` status can be flipped.
    struct Backend {
        addr: SocketAddr,
        shared: Arc<Shared>,
        task: JoinHandle<()>,
    }

    impl Backend {
        async fn start(status: u16, body_bytes: usize) -> anyhow::Result<Self> {
            let shared = Arc::new(Shared {
                status: AtomicU16::new(status),
                body_bytes,
                ..Shared::default()
            });
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let accepting = Arc::clone(&shared);
            let task = tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    accepting.accepted.fetch_add(1, Ordering::SeqCst);
                    let shared = Arc::clone(&accepting);
                    tokio::spawn(async move {
                        let service = service_fn(move |req| answer(Arc::clone(&shared), req));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
            Ok(Self { addr, shared, task })
        }

        /// Records `state`'s health with every request from now on.
        fn watch(&self, state: &Arc<EndpointState>) {
            *lock(&self.shared.watched) = Arc::downgrade(state);
        }

        fn set_status(&self, status: u16) {
            self.shared.status.store(status, Ordering::SeqCst);
        }

        fn set_delay(&self, delay: Duration) {
            let millis = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
            self.shared.delay_ms.store(millis, Ordering::SeqCst);
        }

        fn seen(&self) -> Vec<Seen> {
            lock(&self.shared.seen).clone()
        }

        fn accepted(&self) -> usize {
            self.shared.accepted.load(Ordering::SeqCst)
        }
    }

    impl Drop for Backend {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn answer(
        shared: Arc<Shared>,
        req: Request<hyper::body::Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let status = shared.status.load(Ordering::SeqCst);
        let header = |name: http::header::HeaderName| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let seen = Seen {
            health: lock(&shared.watched).upgrade().map(|s| s.health()),
            status,
            path: req.uri().path().to_owned(),
            host: header(HOST),
            user_agent: header(USER_AGENT),
        };
        lock(&shared.seen).push(seen);
        let delay = shared.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let body = if status == 204 {
            Bytes::new()
        } else {
            Bytes::from(vec![b'x'; shared.body_bytes])
        };
        let mut response = Response::new(Full::new(body));
        *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::IM_A_TEAPOT);
        Ok(response)
    }

    /// Endpoint state and pools as a snapshot build would make them.
    struct World {
        registry: EndpointRegistry,
        pools: PoolCache,
    }

    impl World {
        fn new() -> anyhow::Result<Self> {
            Ok(Self {
                registry: EndpointRegistry::new(Arc::new(Metrics::new()?)),
                pools: PoolCache::default(),
            })
        }

        fn target(
            &self,
            addr: SocketAddr,
            config: &HealthCheckConfig,
        ) -> anyhow::Result<(Arc<EndpointState>, HealthTarget)> {
            let key = EndpointKey {
                policy: PolicyId {
                    namespace: "default".to_owned(),
                    name: "web".to_owned(),
                },
                backend: "app".to_owned(),
                address: addr.to_string(),
            };
            let state = self.registry.get_or_create(key.clone());
            let settings = ConnSettings {
                protocol: UpstreamProtocol::Http1,
                tls: None,
                connect_timeout: Duration::from_secs(1),
            };
            let pool = self.pools.pool(&key.address, &settings)?;
            let target = HealthTarget {
                key,
                state: Arc::clone(&state),
                pool,
                authority: addr.to_string().parse()?,
                config: Arc::new(config.clone()),
            };
            Ok((state, target))
        }
    }

    fn config(
        interval_ms: u64,
        timeout_ms: u64,
        unhealthy_threshold: u32,
        healthy_threshold: u32,
    ) -> HealthCheckConfig {
        HealthCheckConfig {
            path: PATH.to_owned(),
            interval: Duration::from_millis(interval_ms),
            timeout: Duration::from_millis(timeout_ms),
            unhealthy_threshold,
            healthy_threshold,
            expected_statuses: vec![(200, 299)],
        }
    }

    async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn first(seen: &[Seen], health: Health) -> Option<usize> {
        seen.iter().position(|s| s.health == Some(health))
    }

    #[test]
    fn tally_needs_consecutive_outcomes() {
        let config = config(50, 40, 3, 2);
        let mut tally = Tally::default();
        assert_eq!(tally.record(false, &config), None);
        assert_eq!(tally.record(false, &config), None);
        assert_eq!(
            tally.record(true, &config),
            None,
            "a pass resets the failures"
        );
        assert_eq!(tally.record(false, &config), None);
        assert_eq!(tally.record(false, &config), None);
        assert_eq!(tally.record(false, &config), Some(Health::Unhealthy));
        assert_eq!(
            tally.record(false, &config),
            None,
            "the verdict is reported once"
        );
        assert_eq!(tally.record(true, &config), None);
        assert_eq!(tally.record(true, &config), Some(Health::Healthy));
        assert_eq!(tally.record(true, &config), None);
    }

    #[test]
    fn tally_applies_a_lowered_threshold_to_the_running_count() {
        let mut tally = Tally::default();
        assert_eq!(tally.record(false, &config(50, 40, 5, 1)), None);
        assert_eq!(tally.record(false, &config(50, 40, 5, 1)), None);
        assert_eq!(
            tally.record(false, &config(50, 40, 3, 1)),
            Some(Health::Unhealthy),
            "three failures reach the new threshold of three"
        );
    }

    #[test]
    fn delays_stay_within_their_bounds() {
        let interval = Duration::from_millis(1000);
        for _ in 0..1000 {
            let jittered = jittered(interval);
            assert!(
                (Duration::from_millis(900)..=Duration::from_millis(1100)).contains(&jittered),
                "{jittered:?} is within ±10% of {interval:?}"
            );
            let first = scaled(interval, rand::rng().random::<f64>());
            assert!(
                first < interval,
                "first delay {first:?} is below {interval:?}"
            );
        }
        let now = Instant::now();
        assert_eq!(later(now, Duration::MAX), now + MAX_WAIT);
    }

    #[tokio::test]
    async fn marks_down_after_exactly_the_threshold_and_back_up() -> anyhow::Result<()> {
        let backend = Backend::start(503, 2).await?;
        let world = World::new()?;
        let (state, target) = world.target(backend.addr, &config(50, 40, 3, 2))?;
        backend.watch(&state);
        let checkers = HealthCheckers::new();
        checkers.reconcile(vec![target]);
        assert_eq!(checkers.len(), 1, "one checker per target");

        wait_for("a probe arrives after the endpoint went down", || {
            first(&backend.seen(), Health::Unhealthy).is_some()
        })
        .await;
        let seen = backend.seen();
        assert_eq!(
            first(&seen, Health::Unhealthy),
            Some(3),
            "down right after the third failure, not before: {seen:?}"
        );
        assert!(
            seen[..3]
                .iter()
                .all(|s| s.health == Some(Health::Unknown) && s.status == 503),
            "untouched until the verdict: {seen:?}"
        );

        backend.set_status(200);
        wait_for("a probe arrives after the endpoint came back", || {
            first(&backend.seen(), Health::Healthy).is_some()
        })
        .await;
        let seen = backend.seen();
        let first_pass = seen.iter().position(|s| s.status == 200);
        let first_up = first(&seen, Health::Healthy);
        assert_eq!(
            first_up,
            first_pass.map(|i| i + 2),
            "up right after the second pass: {seen:?}"
        );
        assert!(
            seen[3..first_up.unwrap_or(3)]
                .iter()
                .all(|s| s.health == Some(Health::Unhealthy)),
            "down until then: {seen:?}"
        );
        assert_eq!(state.health(), Health::Healthy);
        Ok(())
    }

    #[tokio::test]
    async fn a_refusing_endpoint_is_marked_down() -> anyhow::Result<()> {
        let addr = {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            listener.local_addr()?
        };
        let world = World::new()?;
        let (state, target) = world.target(addr, &config(50, 40, 2, 1))?;
        let checkers = HealthCheckers::new();
        checkers.reconcile(vec![target]);
        wait_for("the refusing endpoint is down", || {
            state.health() == Health::Unhealthy
        })
        .await;
        Ok(())
    }

    #[tokio::test]
    async fn a_probe_slower_than_the_timeout_fails() -> anyhow::Result<()> {
        let backend = Backend::start(200, 2).await?;
        backend.set_delay(Duration::from_millis(500));
        let world = World::new()?;
        let (state, target) = world.target(backend.addr, &config(60, 30, 2, 1))?;
        let checkers = HealthCheckers::new();
        checkers.reconcile(vec![target]);
        wait_for("the slow endpoint is down", || {
            state.health() == Health::Unhealthy
        })
        .await;
        assert!(
            backend.seen().iter().all(|s| s.status == 200),
            "only the delay failed the probes"
        );

        backend.set_delay(Duration::ZERO);
        wait_for("the endpoint is up once it answers in time", || {
            state.health() == Health::Healthy
        })
        .await;
        Ok(())
    }

    #[tokio::test]
    async fn reconcile_keeps_counts_and_verdict_across_a_config_change() -> anyhow::Result<()> {
        let backend = Backend::start(503, 2).await?;
        let world = World::new()?;
        let (state, target) = world.target(backend.addr, &config(300, 100, 4, 1))?;
        backend.watch(&state);
        let checkers = HealthCheckers::new();
        checkers.reconcile(vec![target]);
        wait_for("two failed probes", || backend.seen().len() >= 2).await;

        // The third probe is at least 270 ms away: the new threshold counts the two failures.
        let (_, target) = world.target(backend.addr, &config(50, 40, 3, 1))?;
        checkers.reconcile(vec![target]);
        assert_eq!(checkers.len(), 1, "the checker was updated, not replaced");
        wait_for("a probe arrives after the endpoint went down", || {
            first(&backend.seen(), Health::Unhealthy).is_some()
        })
        .await;
        let seen = backend.seen();
        assert_eq!(
            first(&seen, Health::Unhealthy),
            Some(3),
            "down after the third failure in all, two of them under the old config: {seen:?}"
        );

        let (_, target) = world.target(backend.addr, &config(50, 40, 3, 5))?;
        checkers.reconcile(vec![target]);
        assert_eq!(
            state.health(),
            Health::Unhealthy,
            "the verdict survives the update"
        );
        let probes = backend.seen().len();
        wait_for("two more probes", || backend.seen().len() >= probes + 2).await;
        let seen = backend.seen();
        assert!(
            seen[3..]
                .iter()
                .all(|s| s.health == Some(Health::Unhealthy)),
            "still down under the new config: {seen:?}"
        );
        Ok(())
    }

    #[tokio::test]
    async fn reconcile_without_the_key_stops_the_checker_and_resets_health() -> anyhow::Result<()> {
        let backend = Backend::start(503, 2).await?;
        let world = World::new()?;
        let (state, target) = world.target(backend.addr, &config(50, 40, 1, 1))?;
        let checkers = HealthCheckers::new();
        checkers.reconcile(vec![target]);
        wait_for("the endpoint is down", || {
            state.health() == Health::Unhealthy
        })
        .await;

        checkers.reconcile(Vec::new());
        assert_eq!(checkers.len(), 0, "no checker runs");
        assert!(checkers.is_empty());
        assert_eq!(
            state.health(),
            Health::Unknown,
            "checks no longer apply to the endpoint"
        );
        // A probe already on the wire may still arrive; after that, nothing may.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let probes = backend.seen().len();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            backend.seen().len(),
            probes,
            "no probes after the checker stopped"
        );
        assert_eq!(state.health(), Health::Unknown);
        Ok(())
    }

    #[tokio::test]
    async fn stop_all_stops_every_checker_and_resets_health() -> anyhow::Result<()> {
        let backend = Backend::start(503, 2).await?;
        let world = World::new()?;
        let (state, target) = world.target(backend.addr, &config(50, 40, 1, 1))?;
        let checkers = HealthCheckers::new();
        checkers.reconcile(vec![target]);
        wait_for("the endpoint is down", || {
            state.health() == Health::Unhealthy
        })
        .await;
        checkers.stop_all();
        assert!(checkers.is_empty(), "no checker runs");
        assert_eq!(state.health(), Health::Unknown);
        Ok(())
    }

    #[tokio::test]
    async fn expected_status_ranges_are_honoured() -> anyhow::Result<()> {
        let no_content = Backend::start(204, 0).await?;
        let moved = Backend::start(301, 0).await?;
        let moved_allowed = Backend::start(301, 0).await?;
        let world = World::new()?;
        let (no_content_state, no_content_target) =
            world.target(no_content.addr, &config(50, 40, 1, 1))?;
        let (moved_state, moved_target) = world.target(moved.addr, &config(50, 40, 1, 1))?;
        let mut allowed = config(50, 40, 1, 1);
        allowed.expected_statuses = vec![(200, 299), (301, 302)];
        let (allowed_state, allowed_target) = world.target(moved_allowed.addr, &allowed)?;
        let checkers = HealthCheckers::new();
        checkers.reconcile(vec![no_content_target, moved_target, allowed_target]);
        assert_eq!(checkers.len(), 3, "one checker per endpoint");

        wait_for("every endpoint has a verdict", || {
            [&no_content_state, &moved_state, &allowed_state]
                .iter()
                .all(|s| s.health() != Health::Unknown)
        })
        .await;
        assert_eq!(
            no_content_state.health(),
            Health::Healthy,
            "204 is in 200-299"
        );
        assert_eq!(
            moved_state.health(),
            Health::Unhealthy,
            "301 is not in 200-299"
        );
        assert_eq!(allowed_state.health(), Health::Healthy, "301 is in 301-302");
        Ok(())
    }

    #[tokio::test]
    async fn probes_reuse_one_pooled_connection() -> anyhow::Result<()> {
        let backend = Backend::start(200, 1024).await?;
        let world = World::new()?;
        let (state, target) = world.target(backend.addr, &config(20, 15, 1, 1))?;
        let checkers = HealthCheckers::new();
        checkers.reconcile(vec![target]);
        wait_for("five probes", || backend.seen().len() >= 5).await;
        assert_eq!(
            backend.accepted(),
            1,
            "every probe used the same connection"
        );
        assert_eq!(state.health(), Health::Healthy);
        let seen = backend.seen();
        let authority = backend.addr.to_string();
        for probe in &seen {
            assert_eq!(probe.path, PATH, "probes ask for the configured path");
            assert_eq!(
                probe.host.as_deref(),
                Some(authority.as_str()),
                "Host is the endpoint"
            );
            assert_eq!(probe.user_agent.as_deref(), Some(PROBE_USER_AGENT));
        }
        Ok(())
    }

    #[tokio::test]
    async fn an_oversized_body_passes_but_drops_the_connection() -> anyhow::Result<()> {
        // Large enough that the probe stops reading well before the end.
        let backend = Backend::start(200, 4 * MAX_DRAIN_BYTES).await?;
        let world = World::new()?;
        let (state, target) = world.target(backend.addr, &config(20, 15, 1, 1))?;
        let checkers = HealthCheckers::new();
        checkers.reconcile(vec![target]);
        wait_for("three probes", || backend.seen().len() >= 3).await;
        assert!(
            backend.accepted() >= 3,
            "a connection with an unread body is not reused ({} accepted)",
            backend.accepted()
        );
        assert_eq!(state.health(), Health::Healthy, "the status decides");
        Ok(())
    }

    #[tokio::test]
    async fn a_checker_stops_once_its_endpoint_state_is_dropped() -> anyhow::Result<()> {
        let backend = Backend::start(200, 2).await?;
        let world = World::new()?;
        let (state, target) = world.target(backend.addr, &config(20, 15, 1, 1))?;
        let checkers = HealthCheckers::new();
        checkers.reconcile(vec![target]);
        wait_for("the endpoint is up", || state.health() == Health::Healthy).await;
        drop(state);
        wait_for("the checker stopped by itself", || checkers.is_empty()).await;
        Ok(())
    }
}
