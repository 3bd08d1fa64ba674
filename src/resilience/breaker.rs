//! Per-endpoint circuit breaker: an explicit `Closed` / `Open` / `HalfOpen` state machine, no I/O.
//!
//! The request path only consults cheap atomics: in `Closed`, admission is one atomic load and a
//! successful outcome is a few relaxed atomic updates of a bucketed sliding window. The mutex is
//! taken only for transitions (rare) and for half-open probe bookkeeping.
//!
//! Every transition bumps a generation that is packed with the state into one atomic word (the
//! *phase*). A [`Permit`] remembers the phase it was issued in, so an outcome that completes after
//! the breaker moved on (a request admitted while `Closed` that finishes after the breaker opened,
//! a probe from an earlier half-open period) is recognised as stale and ignored.

use std::fmt;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rand::Rng;
use serde::Serialize;

use crate::clock;

/// Buckets in the sliding window; each covers `window / BUCKETS`.
const BUCKETS: usize = 10;
/// The open period never grows beyond this multiple of `open_timeout` (before jitter).
const OPEN_PERIOD_CAP: u32 = 10;
/// 2^4 = 16 already exceeds the cap, so more doublings never matter.
const MAX_DOUBLINGS: u32 = 4;
/// Relative jitter applied to every open period (±10%).
const JITTER: f64 = 0.1;
/// Low bits of the phase word that hold the state; the rest is the generation.
const STATE_BITS: u32 = 2;
const STATE_MASK: u64 = (1 << STATE_BITS) - 1;
/// A window writer whose clock reading lags a bucket's tag by up to this many buckets is stale.
const STALE_WRITER_BUCKETS: u32 = 1 << 16;

/// Validated breaker settings (built by config compilation elsewhere).
///
/// Counts of zero (`failure_threshold`, `success_threshold`, `half_open_max_requests`) are
/// treated as one, so a breaker can never get stuck.
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker (default 5).
    pub failure_threshold: u32,
    /// Share of failures over `window` that opens the breaker (default 0.5), in (0, 1].
    pub failure_ratio: f64,
    /// Outcomes the window must hold before `failure_ratio` counts (default 20).
    pub minimum_requests: u32,
    /// Sliding window for the ratio (default 10s). A changed window takes full effect after one
    /// window has passed.
    pub window: Duration,
    /// Successful probes in half-open that close the breaker (default 2).
    pub success_threshold: u32,
    /// First open period (default 30s); doubles per consecutive trip, capped at
    /// 10 × `open_timeout`, then jittered by ±10%.
    pub open_timeout: Duration,
    /// Concurrent probes admitted in half-open (default 1).
    pub half_open_max_requests: u32,
}

/// The state of a breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Traffic flows. Exits to `Open` on `failure_threshold` consecutive failures, or on a failure
    /// share of at least `failure_ratio` once the window holds `minimum_requests` outcomes —
    /// unless the caller's ejection check refuses.
    Closed,
    /// Traffic is rejected. Exits to `HalfOpen` when the first request arrives after the (growing,
    /// jittered) open period has elapsed; that request becomes the first probe.
    Open,
    /// Up to `half_open_max_requests` probes at a time. Exits to `Closed` after
    /// `success_threshold` successful probes, back to `Open` (with a longer period) on the first
    /// failed probe.
    HalfOpen,
}

/// Why a transition happened (metric label `reason`, logs, `/backends/health`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TransitionReason {
    /// `Closed` → `Open`: `failure_threshold` failures in a row.
    ConsecutiveFailures,
    /// `Closed` → `Open`: the failure share over the window reached `failure_ratio`.
    FailureRatio,
    /// `Open` → `HalfOpen`: the open period elapsed and a probe was admitted.
    OpenTimeoutElapsed,
    /// `HalfOpen` → `Closed`: `success_threshold` probes succeeded.
    ProbeSucceeded,
    /// `HalfOpen` → `Open`: a probe failed.
    ProbeFailed,
}

/// One state change, returned to the caller so it can update metrics and log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// State before.
    pub from: BreakerState,
    /// State after.
    pub to: BreakerState,
    /// Why.
    pub reason: TransitionReason,
}

/// Admission for one request. Hand it back exactly once, to [`Breaker::record`] with the
/// outcome or to [`Breaker::release`] if there is none; a probe permit that is dropped instead
/// keeps its half-open slot until the breaker next changes state.
#[derive(Debug)]
#[must_use = "a permit must be given back to `Breaker::record` or `Breaker::release`"]
pub struct Permit {
    probe: bool,
    phase: u64,
}

/// A per-endpoint circuit breaker. `Send + Sync`; meant to live in the endpoint's shared state.
pub struct Breaker {
    /// Zero of the breaker's clock, in [`crate::clock`] nanoseconds (tokio's clock, so
    /// paused-time tests control it).
    base_nanos: u64,
    /// Generation << `STATE_BITS` | state. Written only under `probes`, with `Release`, after the
    /// fields below that describe the new phase.
    phase: AtomicU64,
    /// While `Open`: nanoseconds since `base` at which a probe may be admitted.
    open_until: AtomicU64,
    /// Mirror of `Probes::in_flight` for the lock-free gate.
    probes_in_flight: AtomicU32,
    /// Consecutive trips; 0 while `Closed`.
    trips: AtomicU32,
    /// Reason code of the last transition to `Open` (0 while `Closed`).
    last_trip: AtomicU8,
    /// Failures since the last success, while `Closed`.
    consecutive_failures: AtomicU32,
    window: SlidingWindow,
    probes: Mutex<Probes>,
}

/// Half-open bookkeeping, guarded by the breaker's mutex (which also serialises transitions).
#[derive(Debug, Default)]
struct Probes {
    in_flight: u32,
    successes: u32,
}

/// Outcome counts over the last `window`, in `BUCKETS` buckets that each cover `window / BUCKETS`.
///
/// Every counter word packs the bucket index it belongs to (low 32 bits of it, upper half) with
/// a count (lower half), so a stale bucket is reset by the first writer of a newer one with a
/// single compare-and-swap and readers simply skip words that are older than the window.
#[derive(Default)]
struct SlidingWindow {
    requests: [AtomicU64; BUCKETS],
    failures: [AtomicU64; BUCKETS],
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            failure_ratio: 0.5,
            minimum_requests: 20,
            window: Duration::from_secs(10),
            success_threshold: 2,
            open_timeout: Duration::from_secs(30),
            half_open_max_requests: 1,
        }
    }
}

impl BreakerState {
    /// Value of the `circuit_breaker_state` gauge: 0 closed, 1 open, 2 half-open.
    pub fn as_gauge(&self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::Open => 1,
            Self::HalfOpen => 2,
        }
    }

    /// The snake_case name, as serialised.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }

    fn code(self) -> u64 {
        match self {
            Self::Closed => 0,
            Self::Open => 1,
            Self::HalfOpen => 2,
        }
    }

    fn of_phase(phase: u64) -> Self {
        match phase & STATE_MASK {
            1 => Self::Open,
            2 => Self::HalfOpen,
            _ => Self::Closed,
        }
    }
}

impl TransitionReason {
    /// The snake_case name, as serialised and used for the metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::ConsecutiveFailures => "consecutive_failures",
            Self::FailureRatio => "failure_ratio",
            Self::OpenTimeoutElapsed => "open_timeout_elapsed",
            Self::ProbeSucceeded => "probe_succeeded",
            Self::ProbeFailed => "probe_failed",
        }
    }

    fn code(self) -> u8 {
        match self {
            Self::ConsecutiveFailures => 1,
            Self::FailureRatio => 2,
            Self::OpenTimeoutElapsed => 3,
            Self::ProbeSucceeded => 4,
            Self::ProbeFailed => 5,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::ConsecutiveFailures),
            2 => Some(Self::FailureRatio),
            3 => Some(Self::OpenTimeoutElapsed),
            4 => Some(Self::ProbeSucceeded),
            5 => Some(Self::ProbeFailed),
            _ => None,
        }
    }
}

impl Permit {
    /// Whether this request is a half-open probe (callers may want to skip retries for it).
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    fn normal(phase: u64) -> Self {
        Self {
            probe: false,
            phase,
        }
    }
}

impl Breaker {
    /// A closed breaker with no history.
    pub fn new() -> Self {
        Self {
            base_nanos: clock::now_nanos(),
            phase: AtomicU64::new(BreakerState::Closed.code()),
            open_until: AtomicU64::new(0),
            probes_in_flight: AtomicU32::new(0),
            trips: AtomicU32::new(0),
            last_trip: AtomicU8::new(0),
            consecutive_failures: AtomicU32::new(0),
            window: SlidingWindow::default(),
            probes: Mutex::new(Probes::default()),
        }
    }

    /// Cheap gate for the balancer (lock-free atomics only): true in `Closed`; in `Open` only
    /// once the open period has elapsed (the request would become a probe); in `HalfOpen` while
    /// fewer than `half_open_max_requests` probes are outstanding. Advisory: only
    /// [`try_acquire`](Self::try_acquire) reserves.
    pub fn admits(&self, cfg: &BreakerConfig) -> bool {
        match BreakerState::of_phase(self.phase.load(Ordering::Acquire)) {
            BreakerState::Closed => true,
            BreakerState::Open => self.now_nanos() >= self.open_until.load(Ordering::Relaxed),
            BreakerState::HalfOpen => {
                self.probes_in_flight.load(Ordering::Relaxed) < max_probes(cfg)
            }
        }
    }

    /// Reserves admission for one request. `Closed` → a normal permit (one atomic load). `Open`
    /// past its deadline → moves to `HalfOpen` (the transition is the second element) and returns
    /// a probe permit. `HalfOpen` with a free probe slot → a probe permit. Otherwise `None`.
    pub fn try_acquire(&self, cfg: &BreakerConfig) -> (Option<Permit>, Option<Transition>) {
        let phase = self.phase.load(Ordering::Acquire);
        match BreakerState::of_phase(phase) {
            BreakerState::Closed => return (Some(Permit::normal(phase)), None),
            BreakerState::Open if self.now_nanos() < self.open_until.load(Ordering::Relaxed) => {
                return (None, None);
            }
            BreakerState::HalfOpen
                if self.probes_in_flight.load(Ordering::Relaxed) >= max_probes(cfg) =>
            {
                return (None, None);
            }
            _ => {}
        }

        let mut probes = self.lock();
        // Re-read under the lock: another request may have transitioned in the meantime.
        let mut phase = self.phase.load(Ordering::Acquire);
        let mut transition = None;
        match BreakerState::of_phase(phase) {
            BreakerState::Closed => return (Some(Permit::normal(phase)), None),
            BreakerState::Open => {
                if self.now_nanos() < self.open_until.load(Ordering::Relaxed) {
                    return (None, None);
                }
                let (next, half_open) = self.half_open(&mut probes, phase);
                phase = next;
                transition = Some(half_open);
            }
            BreakerState::HalfOpen => {}
        }
        if probes.in_flight >= max_probes(cfg) {
            return (None, transition);
        }
        probes.in_flight += 1;
        self.probes_in_flight
            .store(probes.in_flight, Ordering::Relaxed);
        (Some(Permit { probe: true, phase }), transition)
    }

    /// Records the outcome of a request admitted with `permit`; returns the transition it caused.
    ///
    /// `Closed`: updates the consecutive-failure count and the sliding window, and opens on
    /// consecutive failures or on the failure ratio — but only if `may_open()` (the caller's
    /// max-ejection check, called at most once and only when the breaker would open) agrees;
    /// otherwise it stays closed and keeps counting. `may_open` runs under the breaker's mutex, so
    /// it must not call this breaker's `try_acquire`, `record` or `release` (the read-only
    /// accessors are lock-free and fine). `HalfOpen`: a failed probe reopens at once with a longer
    /// period; `success_threshold` successful probes close it and reset the trip count and window.
    /// A permit from an earlier phase is stale: its outcome is ignored.
    pub fn record(
        &self,
        cfg: &BreakerConfig,
        permit: Permit,
        success: bool,
        may_open: impl FnOnce() -> bool,
    ) -> Option<Transition> {
        self.record_at(cfg, permit, success, clock::now_nanos(), may_open)
    }

    /// [`record`](Self::record) for an outcome observed at `now_nanos` ([`crate::clock`]): the
    /// proxy passes the instant it already read when the response arrived (a clock read costs
    /// more than the rest of a successful record).
    pub fn record_at(
        &self,
        cfg: &BreakerConfig,
        permit: Permit,
        success: bool,
        now_nanos: u64,
        may_open: impl FnOnce() -> bool,
    ) -> Option<Transition> {
        let phase = self.phase.load(Ordering::Acquire);
        if phase != permit.phase {
            return None;
        }
        match BreakerState::of_phase(phase) {
            BreakerState::Closed => {
                self.record_closed(cfg, phase, success, self.since_base(now_nanos), may_open)
            }
            BreakerState::HalfOpen if permit.probe => self.record_probe(cfg, phase, success),
            // No permit is ever issued in `Open`.
            _ => None,
        }
    }

    /// Gives back a permit whose request produced no outcome (e.g. it was cancelled), freeing
    /// its probe slot if it still holds one.
    pub fn release(&self, permit: Permit) {
        if !permit.probe || self.phase.load(Ordering::Acquire) != permit.phase {
            return;
        }
        let mut probes = self.lock();
        if self.phase.load(Ordering::Acquire) == permit.phase {
            self.probe_done(&mut probes);
        }
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        BreakerState::of_phase(self.phase.load(Ordering::Acquire))
    }

    /// Time until the next probe is admitted while `Open` (zero once due), `None` otherwise —
    /// for `Retry-After` and `/backends/health`.
    pub fn time_until_probe(&self) -> Option<Duration> {
        if self.state() != BreakerState::Open {
            return None;
        }
        let until = self.open_until.load(Ordering::Relaxed);
        Some(Duration::from_nanos(until.saturating_sub(self.now_nanos())))
    }

    /// The reason of the last transition to `Open`, if currently `Open` or `HalfOpen`.
    pub fn last_trip_reason(&self) -> Option<TransitionReason> {
        if self.state() == BreakerState::Closed {
            return None;
        }
        TransitionReason::from_code(self.last_trip.load(Ordering::Relaxed))
    }

    /// Consecutive trips (0 while closed): the open period is `open_timeout × 2^(trips-1)`,
    /// capped at 10 × `open_timeout`, jittered by ±10%.
    pub fn trips(&self) -> u32 {
        self.trips.load(Ordering::Relaxed)
    }

    fn record_closed(
        &self,
        cfg: &BreakerConfig,
        phase: u64,
        success: bool,
        now: u64,
        may_open: impl FnOnce() -> bool,
    ) -> Option<Transition> {
        self.window.record(cfg, now, success);
        if success {
            // Skip the store when already zero: successes are the hot path and a store would
            // bounce the cache line between cores for nothing.
            if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
                self.consecutive_failures.store(0, Ordering::Relaxed);
            }
            return None;
        }
        let consecutive = self
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let reason = if consecutive >= cfg.failure_threshold.max(1) {
            TransitionReason::ConsecutiveFailures
        } else if self.window.ratio_reached(cfg, now) {
            TransitionReason::FailureRatio
        } else {
            return None;
        };

        let mut probes = self.lock();
        // Several failures may cross the threshold at once; only the first one trips.
        if self.phase.load(Ordering::Acquire) != phase || !may_open() {
            return None;
        }
        Some(self.open(&mut probes, cfg, phase, reason))
    }

    fn record_probe(&self, cfg: &BreakerConfig, phase: u64, success: bool) -> Option<Transition> {
        let mut probes = self.lock();
        if self.phase.load(Ordering::Acquire) != phase {
            return None;
        }
        self.probe_done(&mut probes);
        if !success {
            return Some(self.open(&mut probes, cfg, phase, TransitionReason::ProbeFailed));
        }
        probes.successes = probes.successes.saturating_add(1);
        if probes.successes < cfg.success_threshold.max(1) {
            return None;
        }
        Some(self.close(&mut probes, phase))
    }

    fn probe_done(&self, probes: &mut Probes) {
        probes.in_flight = probes.in_flight.saturating_sub(1);
        self.probes_in_flight
            .store(probes.in_flight, Ordering::Relaxed);
    }

    /// Moves to `Open` for the next (longer) period. Caller holds the lock.
    fn open(
        &self,
        probes: &mut Probes,
        cfg: &BreakerConfig,
        from: u64,
        reason: TransitionReason,
    ) -> Transition {
        let trips = self.trips.load(Ordering::Relaxed).saturating_add(1);
        let period = open_period(cfg, trips);
        let until = self
            .now_nanos()
            .saturating_add(u64::try_from(period.as_nanos()).unwrap_or(u64::MAX));
        self.trips.store(trips, Ordering::Relaxed);
        self.open_until.store(until, Ordering::Relaxed);
        self.last_trip.store(reason.code(), Ordering::Relaxed);
        self.reset_probes(probes);
        self.publish(from, BreakerState::Open, reason)
    }

    /// Moves to `HalfOpen` with no probe out yet. Caller holds the lock.
    fn half_open(&self, probes: &mut Probes, from: u64) -> (u64, Transition) {
        self.reset_probes(probes);
        let transition = self.publish(
            from,
            BreakerState::HalfOpen,
            TransitionReason::OpenTimeoutElapsed,
        );
        (self.phase.load(Ordering::Relaxed), transition)
    }

    /// Moves to `Closed` with a clean slate. Caller holds the lock.
    fn close(&self, probes: &mut Probes, from: u64) -> Transition {
        self.trips.store(0, Ordering::Relaxed);
        self.last_trip.store(0, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.window.reset();
        self.reset_probes(probes);
        self.publish(from, BreakerState::Closed, TransitionReason::ProbeSucceeded)
    }

    fn reset_probes(&self, probes: &mut Probes) {
        *probes = Probes::default();
        self.probes_in_flight.store(0, Ordering::Relaxed);
    }

    /// Stores the next phase; `Release` makes the fields written before it visible to anyone
    /// who `Acquire`-loads the new phase.
    fn publish(&self, from: u64, to: BreakerState, reason: TransitionReason) -> Transition {
        let generation = (from >> STATE_BITS).wrapping_add(1);
        self.phase
            .store((generation << STATE_BITS) | to.code(), Ordering::Release);
        Transition {
            from: BreakerState::of_phase(from),
            to,
            reason,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Probes> {
        // Nothing panics while the lock is held except a caller's `may_open`, and that runs before
        // any field changes, so the data is consistent even if poisoned.
        self.probes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now_nanos(&self) -> u64 {
        self.since_base(clock::now_nanos())
    }

    /// Nanoseconds from the breaker's base to `at_nanos` (0 for an instant before it).
    fn since_base(&self, at_nanos: u64) -> u64 {
        at_nanos.saturating_sub(self.base_nanos)
    }
}

impl Default for Breaker {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("state", &self.state())
            .field("trips", &self.trips())
            .field(
                "probes_in_flight",
                &self.probes_in_flight.load(Ordering::Relaxed),
            )
            .field(
                "consecutive_failures",
                &self.consecutive_failures.load(Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

impl SlidingWindow {
    /// Counts one outcome in the bucket of `now` (lock-free).
    fn record(&self, cfg: &BreakerConfig, now: u64, success: bool) {
        let index = bucket_index(cfg, now);
        let slot = (index % BUCKETS as u64) as usize;
        // Only the low 32 bits are kept as the tag; wrapping is handled by `bump` and `counts`.
        let tag = index as u32;
        bump(&self.requests[slot], tag);
        if !success {
            bump(&self.failures[slot], tag);
        }
    }

    /// (requests, failures) over the window ending at `now`.
    fn counts(&self, cfg: &BreakerConfig, now: u64) -> (u64, u64) {
        let current = bucket_index(cfg, now) as u32;
        let sum = |words: &[AtomicU64; BUCKETS]| -> u64 {
            words
                .iter()
                .map(|word| unpack(word.load(Ordering::Relaxed)))
                .filter(|&(tag, _)| (current.wrapping_sub(tag) as usize) < BUCKETS)
                .map(|(_, count)| u64::from(count))
                .sum()
        };
        let requests = sum(&self.requests);
        // Read separately from `requests`, so a concurrent writer may be seen in one only.
        let failures = sum(&self.failures).min(requests);
        (requests, failures)
    }

    /// Whether the window holds at least `minimum_requests` outcomes and a failure share of at
    /// least `failure_ratio`.
    fn ratio_reached(&self, cfg: &BreakerConfig, now: u64) -> bool {
        let (requests, failures) = self.counts(cfg, now);
        requests > 0
            && requests >= u64::from(cfg.minimum_requests)
            && failures as f64 / requests as f64 >= cfg.failure_ratio
    }

    fn reset(&self) {
        for word in self.requests.iter().chain(&self.failures) {
            word.store(0, Ordering::Relaxed);
        }
    }
}

/// Adds one to a packed (tag, count) word, first resetting it if it holds an older bucket.
fn bump(word: &AtomicU64, tag: u32) {
    // The closure returns `None` only to drop a stale outcome, which needs no handling.
    let _ = word.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |packed| {
        let (stored, count) = unpack(packed);
        if stored == tag {
            return Some(pack(tag, count.saturating_add(1)));
        }
        // A writer that read the clock long ago must not wipe a newer bucket's counts. The bound
        // (rather than "any tag ahead of ours") keeps a slot idle for ~2^32 buckets writable.
        if count != 0 && stored.wrapping_sub(tag) < STALE_WRITER_BUCKETS {
            return None;
        }
        Some(pack(tag, 1))
    });
}

fn pack(tag: u32, count: u32) -> u64 {
    (u64::from(tag) << 32) | u64::from(count)
}

fn unpack(packed: u64) -> (u32, u32) {
    ((packed >> 32) as u32, packed as u32)
}

/// Index of the window bucket containing `now` (nanoseconds since the breaker's base).
fn bucket_index(cfg: &BreakerConfig, now: u64) -> u64 {
    let width = u64::try_from(cfg.window.as_nanos() / BUCKETS as u128).unwrap_or(u64::MAX);
    now / width.max(1)
}

fn max_probes(cfg: &BreakerConfig) -> u32 {
    cfg.half_open_max_requests.max(1)
}

/// `open_timeout × 2^(trips-1)`, capped at 10 × `open_timeout`, then jittered by ±10%.
///
/// Jitter comes after the cap so endpoints that keep tripping together still spread out.
fn open_period(cfg: &BreakerConfig, trips: u32) -> Duration {
    let doublings = trips.saturating_sub(1).min(MAX_DOUBLINGS);
    let cap = cfg.open_timeout.saturating_mul(OPEN_PERIOD_CAP);
    let period = cfg.open_timeout.saturating_mul(1 << doublings).min(cap);
    let factor = rand::rng().random_range(1.0 - JITTER..=1.0 + JITTER);
    Duration::try_from_secs_f64(period.as_secs_f64() * factor).unwrap_or(period)
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::sync::Arc;

    use tokio::time::advance;

    use super::*;

    /// Runs one request through a breaker that must admit it.
    fn outcome(breaker: &Breaker, cfg: &BreakerConfig, success: bool) -> Option<Transition> {
        let (permit, transition) = breaker.try_acquire(cfg);
        assert_eq!(
            transition, None,
            "a closed breaker admits without transitions"
        );
        let permit = permit.expect("a closed breaker admits every request");
        breaker.record(cfg, permit, success, || true)
    }

    /// Opens a closed breaker through consecutive failures.
    fn trip(breaker: &Breaker, cfg: &BreakerConfig) -> Transition {
        for _ in 1..cfg.failure_threshold {
            assert_eq!(outcome(breaker, cfg, false), None);
        }
        outcome(breaker, cfg, false).expect("the last consecutive failure opens the breaker")
    }

    /// Waits out the open period and takes the first probe.
    async fn first_probe(breaker: &Breaker, cfg: &BreakerConfig) -> Permit {
        let wait = breaker
            .time_until_probe()
            .expect("an open breaker reports when it probes");
        advance(wait).await;
        let (permit, transition) = breaker.try_acquire(cfg);
        assert_eq!(
            transition,
            Some(Transition {
                from: BreakerState::Open,
                to: BreakerState::HalfOpen,
                reason: TransitionReason::OpenTimeoutElapsed,
            }),
            "the first request after the open period half-opens the breaker"
        );
        let permit = permit.expect("the half-opening request is a probe");
        assert!(permit.is_probe(), "the half-opening request is a probe");
        permit
    }

    fn assert_within_jitter(actual: Duration, nominal: Duration) {
        let low = nominal.mul_f64(1.0 - JITTER);
        let high = nominal.mul_f64(1.0 + JITTER);
        assert!(
            actual >= low && actual <= high,
            "expected an open period within ±10% of {nominal:?}, got {actual:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_not_before() {
        let cfg = BreakerConfig::default();
        let breaker = Breaker::new();
        for n in 1..cfg.failure_threshold {
            assert_eq!(
                outcome(&breaker, &cfg, false),
                None,
                "failure {n} keeps it closed"
            );
            assert_eq!(breaker.state(), BreakerState::Closed);
        }
        let transition = outcome(&breaker, &cfg, false);
        assert_eq!(
            transition,
            Some(Transition {
                from: BreakerState::Closed,
                to: BreakerState::Open,
                reason: TransitionReason::ConsecutiveFailures,
            }),
            "the fifth consecutive failure opens the breaker"
        );
        assert_eq!(breaker.state(), BreakerState::Open);
        assert_eq!(breaker.trips(), 1);
        assert_eq!(
            breaker.last_trip_reason(),
            Some(TransitionReason::ConsecutiveFailures)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_consecutive_count() {
        let cfg = BreakerConfig::default();
        let breaker = Breaker::new();
        for _ in 0..3 {
            for _ in 1..cfg.failure_threshold {
                assert_eq!(outcome(&breaker, &cfg, false), None);
            }
            assert_eq!(outcome(&breaker, &cfg, true), None);
        }
        assert_eq!(
            breaker.state(),
            BreakerState::Closed,
            "four failures then a success never reach five in a row (15 outcomes < minimum)"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_failure_ratio_with_minimum_volume() {
        let cfg = BreakerConfig::default();
        let breaker = Breaker::new();
        // 20 outcomes, every other one a failure: the ratio reaches 0.5 exactly on the 20th.
        for _ in 0..9 {
            assert_eq!(outcome(&breaker, &cfg, true), None);
            assert_eq!(outcome(&breaker, &cfg, false), None);
        }
        assert_eq!(outcome(&breaker, &cfg, true), None);
        assert_eq!(
            outcome(&breaker, &cfg, false),
            Some(Transition {
                from: BreakerState::Closed,
                to: BreakerState::Open,
                reason: TransitionReason::FailureRatio,
            }),
            "10 failures in 20 outcomes reach the 0.5 ratio"
        );
        assert_eq!(
            breaker.last_trip_reason(),
            Some(TransitionReason::FailureRatio)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn does_not_open_on_ratio_below_minimum_requests() {
        let cfg = BreakerConfig::default();
        let breaker = Breaker::new();
        // 19 outcomes, 16 of them failures, never five in a row.
        for i in 0..19 {
            let success = i % 5 == 4;
            assert_eq!(outcome(&breaker, &cfg, success), None);
        }
        assert_eq!(
            breaker.state(),
            BreakerState::Closed,
            "19 outcomes are below minimum_requests = 20, whatever the ratio"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failures_inside_the_window_count() {
        let cfg = BreakerConfig::default();
        let breaker = Breaker::new();
        for _ in 0..9 {
            outcome(&breaker, &cfg, true);
            outcome(&breaker, &cfg, false);
        }
        advance(cfg.window / 2).await;
        outcome(&breaker, &cfg, true);
        assert_eq!(
            outcome(&breaker, &cfg, false).map(|t| t.reason),
            Some(TransitionReason::FailureRatio),
            "outcomes half a window old still count towards the ratio"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failures_older_than_the_window_expire() {
        let cfg = BreakerConfig::default();
        let breaker = Breaker::new();
        for _ in 0..9 {
            outcome(&breaker, &cfg, true);
            outcome(&breaker, &cfg, false);
        }
        advance(cfg.window).await;
        // Had the 18 old outcomes still counted, the first new pair would reach 20 at 0.5.
        for pair in 0..9 {
            assert_eq!(outcome(&breaker, &cfg, true), None);
            assert_eq!(
                outcome(&breaker, &cfg, false),
                None,
                "pair {pair}: outcomes older than the window no longer count"
            );
        }
        assert_eq!(outcome(&breaker, &cfg, true), None);
        assert_eq!(
            outcome(&breaker, &cfg, false).map(|t| t.reason),
            Some(TransitionReason::FailureRatio),
            "20 fresh outcomes at 0.5 open the breaker"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn rejects_while_open() {
        let cfg = BreakerConfig::default();
        let breaker = Breaker::new();
        trip(&breaker, &cfg);
        let (permit, transition) = breaker.try_acquire(&cfg);
        assert!(permit.is_none(), "an open breaker admits nothing");
        assert_eq!(transition, None);
        assert!(!breaker.admits(&cfg), "an open breaker's gate is shut");
        advance(Duration::from_secs(20)).await;
        assert!(
            breaker.try_acquire(&cfg).0.is_none(),
            "still open after 20s (the first period is at least 27s)"
        );
        assert!(!breaker.admits(&cfg));
        assert_eq!(breaker.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn half_opens_after_the_jittered_open_timeout() {
        let cfg = BreakerConfig::default();
        let breaker = Breaker::new();
        trip(&breaker, &cfg);
        let wait = breaker
            .time_until_probe()
            .expect("open breakers report a wait");
        assert_within_jitter(wait, cfg.open_timeout);

        advance(wait - Duration::from_millis(1)).await;
        assert!(
            !breaker.admits(&cfg),
            "not admitted 1ms before the deadline"
        );
        assert!(breaker.try_acquire(&cfg).0.is_none());
        assert_eq!(breaker.time_until_probe(), Some(Duration::from_millis(1)));

        advance(Duration::from_millis(1)).await;
        assert!(
            breaker.admits(&cfg),
            "admitted once the open period elapsed"
        );
        assert_eq!(
            breaker.state(),
            BreakerState::Open,
            "admits() alone does not transition"
        );
        let _probe = first_probe(&breaker, &cfg).await;
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert_eq!(breaker.time_until_probe(), None);
        assert_eq!(
            breaker.last_trip_reason(),
            Some(TransitionReason::ConsecutiveFailures),
            "half-open still reports why it tripped"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn admits_only_half_open_max_requests_probes() {
        let cfg = BreakerConfig {
            half_open_max_requests: 2,
            success_threshold: 3,
            ..BreakerConfig::default()
        };
        let breaker = Breaker::new();
        trip(&breaker, &cfg);
        let first = first_probe(&breaker, &cfg).await;
        assert!(breaker.admits(&cfg), "one of two probe slots is free");
        let (second, transition) = breaker.try_acquire(&cfg);
        let second = second.expect("the second probe slot is free");
        assert!(second.is_probe());
        assert_eq!(transition, None);
        assert!(!breaker.admits(&cfg), "both probe slots are taken");
        assert!(breaker.try_acquire(&cfg).0.is_none(), "no third probe");

        assert_eq!(breaker.record(&cfg, first, true, || true), None);
        assert!(breaker.admits(&cfg), "a recorded probe frees its slot");
        let third = breaker
            .try_acquire(&cfg)
            .0
            .expect("the freed slot is reusable");
        assert!(!breaker.admits(&cfg));
        assert_eq!(breaker.record(&cfg, second, true, || true), None);
        assert_eq!(
            breaker.record(&cfg, third, true, || true).map(|t| t.to),
            Some(BreakerState::Closed)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn closes_after_success_threshold_probes() {
        let cfg = BreakerConfig {
            window: Duration::from_secs(600),
            ..BreakerConfig::default()
        };
        let breaker = Breaker::new();
        trip(&breaker, &cfg);
        let probe = first_probe(&breaker, &cfg).await;
        assert_eq!(
            breaker.record(&cfg, probe, true, || true),
            None,
            "one success of two keeps it half-open"
        );
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        let probe = breaker.try_acquire(&cfg).0.expect("a second probe");
        assert_eq!(
            breaker.record(&cfg, probe, true, || true),
            Some(Transition {
                from: BreakerState::HalfOpen,
                to: BreakerState::Closed,
                reason: TransitionReason::ProbeSucceeded,
            }),
            "the second successful probe closes it"
        );
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(breaker.trips(), 0, "closing resets the trip count");
        assert_eq!(breaker.last_trip_reason(), None);
        assert_eq!(breaker.time_until_probe(), None);
        assert!(breaker.admits(&cfg));

        // The 5 failures that tripped it are still inside the 10-minute window; had the window
        // not been reset, 15 more outcomes with 7 failures would reach 20 at a 0.6 ratio.
        for i in 0..15 {
            assert_eq!(
                outcome(&breaker, &cfg, i % 2 == 0),
                None,
                "closing reset the window"
            );
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(
            trip(&breaker, &cfg).reason,
            TransitionReason::ConsecutiveFailures
        );
        let wait = breaker.time_until_probe().expect("open again");
        assert_within_jitter(wait, cfg.open_timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probe_reopens_with_a_longer_period_capped_at_ten_times() {
        let cfg = BreakerConfig::default();
        let breaker = Breaker::new();
        trip(&breaker, &cfg);
        let mut previous = breaker.time_until_probe().expect("open");
        assert_within_jitter(previous, cfg.open_timeout);
        for trips in 2..=8u32 {
            let probe = first_probe(&breaker, &cfg).await;
            assert_eq!(
                breaker.record(&cfg, probe, false, || false),
                Some(Transition {
                    from: BreakerState::HalfOpen,
                    to: BreakerState::Open,
                    reason: TransitionReason::ProbeFailed,
                }),
                "a failed probe reopens at once, whatever the ejection check says"
            );
            assert_eq!(breaker.trips(), trips);
            assert_eq!(
                breaker.last_trip_reason(),
                Some(TransitionReason::ProbeFailed)
            );
            let wait = breaker.time_until_probe().expect("open");
            let nominal = (cfg.open_timeout * 2u32.pow(trips - 1)).min(cfg.open_timeout * 10);
            assert_within_jitter(wait, nominal);
            if trips == 2 {
                let growth = wait.as_secs_f64() / previous.as_secs_f64();
                assert!(
                    (0.9 * 2.0 / 1.1..=1.1 * 2.0 / 0.9).contains(&growth),
                    "the second period is about twice the first, got ×{growth}"
                );
            }
            previous = wait;
        }
        assert!(
            previous <= cfg.open_timeout.mul_f64(10.0 * (1.0 + JITTER)),
            "the period is capped at 10× open_timeout (plus jitter), got {previous:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn may_open_false_keeps_it_closed() {
        let cfg = BreakerConfig::default();
        let breaker = Breaker::new();
        let asked = Cell::new(0);
        let refuse = || {
            asked.set(asked.get() + 1);
            false
        };
        for _ in 0..10 {
            let permit = breaker.try_acquire(&cfg).0.expect("closed");
            assert_eq!(breaker.record(&cfg, permit, false, refuse), None);
        }
        assert_eq!(
            breaker.state(),
            BreakerState::Closed,
            "the ejection check refused every trip"
        );
        assert_eq!(
            asked.get(),
            6,
            "asked only once the threshold was reached (failures 5 to 10)"
        );
        let permit = breaker.try_acquire(&cfg).0.expect("closed");
        assert_eq!(
            breaker
                .record(&cfg, permit, false, || true)
                .map(|t| t.reason),
            Some(TransitionReason::ConsecutiveFailures),
            "counting went on, so the next allowed failure opens it"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stale_closed_permits_do_not_touch_probe_accounting() {
        let cfg = BreakerConfig::default();
        let breaker = Breaker::new();
        let late_failure = breaker.try_acquire(&cfg).0.expect("closed");
        let late_success = breaker.try_acquire(&cfg).0.expect("closed");
        let late_cancel = breaker.try_acquire(&cfg).0.expect("closed");
        trip(&breaker, &cfg);
        assert_eq!(
            breaker.record(&cfg, late_failure, false, || true),
            None,
            "an outcome admitted before the trip is ignored while open"
        );
        assert_eq!(breaker.trips(), 1, "a stale failure does not re-trip");

        let probe = first_probe(&breaker, &cfg).await;
        assert!(!breaker.admits(&cfg), "the only probe slot is taken");
        assert_eq!(
            breaker.record(&cfg, late_success, true, || true),
            None,
            "a stale success is no probe success"
        );
        breaker.release(late_cancel);
        assert!(
            !breaker.admits(&cfg),
            "stale permits neither free nor consume the probe slot"
        );
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert_eq!(
            breaker.record(&cfg, probe, true, || true),
            None,
            "only one real probe succeeded so far (threshold 2)"
        );
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn stale_probe_permits_from_an_earlier_half_open_are_ignored() {
        let cfg = BreakerConfig {
            half_open_max_requests: 2,
            ..BreakerConfig::default()
        };
        let breaker = Breaker::new();
        trip(&breaker, &cfg);
        let old_probe = first_probe(&breaker, &cfg).await;
        let failing = breaker.try_acquire(&cfg).0.expect("second probe slot");
        assert_eq!(
            breaker
                .record(&cfg, failing, false, || true)
                .map(|t| t.reason),
            Some(TransitionReason::ProbeFailed)
        );

        let probe = first_probe(&breaker, &cfg).await;
        assert_eq!(
            breaker.record(&cfg, old_probe, true, || true),
            None,
            "a probe from the previous half-open period is stale"
        );
        let second = breaker
            .try_acquire(&cfg)
            .0
            .expect("one of two slots was free");
        assert!(
            !breaker.admits(&cfg),
            "the stale probe did not free a slot of this period"
        );
        assert_eq!(
            breaker.record(&cfg, probe, true, || true),
            None,
            "the stale success did not count: this is the first of two"
        );
        assert_eq!(
            breaker.record(&cfg, second, true, || true).map(|t| t.to),
            Some(BreakerState::Closed)
        );

        // A probe outstanding when the breaker closed is stale in `Closed` too.
        trip(&breaker, &cfg);
        let first = first_probe(&breaker, &cfg).await;
        let second = breaker.try_acquire(&cfg).0.expect("second probe slot");
        let third = breaker.try_acquire(&cfg);
        assert!(third.0.is_none(), "only two probes");
        assert_eq!(breaker.record(&cfg, first, true, || true), None);
        let closer = breaker.try_acquire(&cfg).0.expect("the freed slot");
        assert_eq!(
            breaker.record(&cfg, closer, true, || true).map(|t| t.to),
            Some(BreakerState::Closed)
        );
        assert_eq!(
            breaker.record(&cfg, second, false, || true),
            None,
            "a late probe failure after closing is ignored"
        );
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn release_frees_a_probe_slot() {
        let cfg = BreakerConfig::default();
        let breaker = Breaker::new();
        trip(&breaker, &cfg);
        let probe = first_probe(&breaker, &cfg).await;
        assert!(!breaker.admits(&cfg));
        breaker.release(probe);
        assert!(breaker.admits(&cfg), "a released probe frees its slot");
        assert_eq!(
            breaker.state(),
            BreakerState::HalfOpen,
            "releasing is no outcome"
        );
        let (again, transition) = breaker.try_acquire(&cfg);
        assert!(again.expect("the slot is free again").is_probe());
        assert_eq!(transition, None);

        // Releasing a closed permit is a no-op.
        let cfg = BreakerConfig::default();
        let closed = Breaker::new();
        closed.release(closed.try_acquire(&cfg).0.expect("closed"));
        assert_eq!(closed.state(), BreakerState::Closed);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_successes_leave_it_closed() {
        const TASKS: u64 = 16;
        const REQUESTS: u64 = 1_000;
        // A long window so the whole run lands inside it, however slow the machine.
        let cfg = Arc::new(BreakerConfig {
            window: Duration::from_secs(3_600),
            ..BreakerConfig::default()
        });
        let breaker = Arc::new(Breaker::new());
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let cfg = Arc::clone(&cfg);
                let breaker = Arc::clone(&breaker);
                tokio::spawn(async move {
                    for _ in 0..REQUESTS {
                        let permit = breaker.try_acquire(&cfg).0.expect("closed");
                        assert_eq!(breaker.record(&cfg, permit, true, || true), None);
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("recording task panicked");
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(
            breaker.window.counts(&cfg, breaker.now_nanos()),
            (TASKS * REQUESTS, 0),
            "no concurrent outcome was lost"
        );
    }

    #[test]
    fn window_writers_with_an_old_clock_do_not_wipe_newer_buckets() {
        let word = AtomicU64::new(0);
        bump(&word, 25);
        bump(&word, 25);
        bump(&word, 15);
        assert_eq!(unpack(word.load(Ordering::Relaxed)), (25, 2));
        bump(&word, 35);
        assert_eq!(unpack(word.load(Ordering::Relaxed)), (35, 1));
        word.store(pack(u32::MAX - 5, 3), Ordering::Relaxed);
        bump(&word, 4);
        assert_eq!(
            unpack(word.load(Ordering::Relaxed)),
            (4, 1),
            "a tag that wrapped around is newer"
        );
    }

    #[test]
    fn names_and_gauge_values() {
        assert_eq!(BreakerState::Closed.as_gauge(), 0);
        assert_eq!(BreakerState::Open.as_gauge(), 1);
        assert_eq!(BreakerState::HalfOpen.as_gauge(), 2);
        for state in [
            BreakerState::Closed,
            BreakerState::Open,
            BreakerState::HalfOpen,
        ] {
            assert_eq!(
                serde_json::to_value(state).expect("serialisable"),
                state.as_str()
            );
        }
        for reason in [
            TransitionReason::ConsecutiveFailures,
            TransitionReason::FailureRatio,
            TransitionReason::OpenTimeoutElapsed,
            TransitionReason::ProbeSucceeded,
            TransitionReason::ProbeFailed,
        ] {
            assert_eq!(
                serde_json::to_value(reason).expect("serialisable"),
                reason.as_str()
            );
            assert_eq!(TransitionReason::from_code(reason.code()), Some(reason));
        }
    }

    #[test]
    fn breaker_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Breaker>();
        assert_send_sync::<Permit>();
    }
}
