//! Retry budget: retries may be at most a `ratio` of recent requests plus a small reserve.
//!
//! In the spirit of tower's `TpsBudget` and linkerd's retry budgets. One [`RetryBudget`] is
//! shared (through an `Arc`) by every request of a policy: each original request
//! [deposits](RetryBudget::deposit), each retry must [withdraw](RetryBudget::withdraw) first.
//!
//! # Semantics
//!
//! Time since the budget was created (on tokio's clock, so paused-time tests control it) is cut
//! into buckets of `ttl / 10`. The *window* is the current bucket and the nine before it, so it
//! covers between `0.9 × ttl` and `ttl` of the past: an event stops counting between `0.9 × ttl`
//! and `ttl` after it happened. With `D` deposits and `W` withdrawals in the window, and
//! `reserve = min_per_second × ttl_seconds`, a withdrawal succeeds exactly when, counting itself,
//!
//! ```text
//! W ≤ ratio × D + reserve        (equivalently: ratio × D + reserve − W_before ≥ 1)
//! ```
//!
//! and is otherwise rolled back, leaving the budget as it was. So at every withdrawal the window
//! holds at most `ratio × D + reserve` retries. The reserve is a per-window allowance, not a
//! per-second refill: it can be spent in one burst, and it comes back as the withdrawals that
//! used it expire. In steady state the retry rate is at most `ratio` × the request rate plus
//! `min_per_second`.
//!
//! Arithmetic is fixed-point in millionths of a retry, so the ratio is honoured to 1e-6 without
//! float rounding (100 deposits at ratio 0.2 allow exactly 20 retries).
//!
//! # Concurrency
//!
//! The budget is lock-free. Each bucket's counter is one `AtomicU64` packing the bucket's epoch
//! with its count, so a stale bucket is reset and counted in a single compare-and-swap and no
//! increment is ever lost to a reset. A withdrawal counts itself first, then sums the window
//! and, if that overspends, takes its count back.
//!
//! - Calls that agree on the current bucket all increment the same atomic, so the one whose
//!   read of it comes last in that atomic's modification order sees every other's increment: the
//!   limit is exact, never overspent.
//! - Calls that disagree about the current bucket (one straddles a bucket boundary, or its thread
//!   was descheduled between reading the clock and counting) can miss each other's increments.
//!   Every missed increment belongs to a `withdraw` call in progress at the same moment, so the
//!   window overspends by at most `P − 1` retries, where `P` is the number of `withdraw` calls in
//!   progress at once; `withdraw` never blocks or awaits, so `P` is at most the number of threads
//!   calling it (the runtime's worker threads).
//! - A withdrawal that is about to be rolled back is briefly visible to others, so concurrent
//!   calls may also be *denied* spuriously, by the same bound; that errs on the safe side.
//!
//! Counts saturate at 2^24 − 1 per bucket: extra deposits are dropped and extra withdrawals
//! denied, both conservative.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::{duration_nanos, now_nanos};

/// The window length used when a policy does not choose one.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// Buckets per window: the window's resolution.
const BUCKETS: u64 = 10;
/// Shorter windows are clamped up to this, so a bucket is at least a millisecond.
const MIN_TTL: Duration = Duration::from_millis(10);
/// The largest ratio accepted (validation rejects more; this is the defensive clamp).
const MAX_RATIO: f64 = 1000.0;
/// Fixed-point units per retry.
const SCALE: u128 = 1_000_000;
/// Low bits of a packed counter hold the count, high bits the bucket epoch.
const COUNT_BITS: u32 = 24;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
/// Epochs are bucket indices modulo 2^40 (35 years of 1 ms buckets) and compared with wrapping.
const EPOCH_MASK: u64 = u64::MAX >> COUNT_BITS;

/// A retry budget shared by all requests of a policy: lock-free, `Send + Sync`, meant to live in
/// an `Arc`. See the [module documentation](self) for the exact semantics and the race bound.
pub struct RetryBudget {
    ratio: f64,
    min_per_second: u32,
    ttl: Duration,
    /// `ratio` in millionths.
    ratio_units: u128,
    /// `min_per_second × ttl` in millionths of a retry.
    reserve_units: u128,
    bucket_nanos: u64,
    /// Creation, in [`crate::clock`] nanoseconds: bucket 0 starts here.
    origin_nanos: u64,
    slots: [Slot; BUCKETS as usize],
}

/// The deposits and withdrawals of the bucket currently mapped to one ring position.
#[derive(Default)]
struct Slot {
    deposits: Counter,
    withdrawals: Counter,
}

/// A count tagged with the epoch (bucket index) it belongs to, packed in one atomic.
#[derive(Default)]
struct Counter(AtomicU64);

impl RetryBudget {
    /// A budget allowing retries up to `ratio` × the requests of the last `ttl` plus
    /// `min_per_second × ttl` (in seconds). `ratio` should be in `[0, 1000]` (validated by the
    /// config); it is clamped defensively, NaN counting as 0. A `ttl` under 10 ms is raised to
    /// 10 ms. The window starts now, on tokio's clock.
    pub fn new(ratio: f64, min_per_second: u32, ttl: Duration) -> Self {
        let ratio = if ratio.is_nan() {
            0.0
        } else {
            ratio.clamp(0.0, MAX_RATIO)
        };
        let ttl = ttl.max(MIN_TTL);
        let ttl_nanos = ttl.as_nanos();
        // `ratio` is at most 1000, so the rounded product fits easily.
        let ratio_units = (ratio * SCALE as f64).round() as u128;
        // Saturating: only a ttl of many millennia could get near the limit.
        let reserve_units = u128::from(min_per_second).saturating_mul(ttl_nanos) / 1_000;
        Self {
            ratio,
            min_per_second,
            ttl,
            ratio_units,
            reserve_units,
            // At least 1 ms, as `ttl` is at least `MIN_TTL`.
            bucket_nanos: (duration_nanos(ttl) / BUCKETS).max(1),
            origin_nanos: now_nanos(),
            slots: Default::default(),
        }
    }

    /// Records one original request (a deposit), earning `ratio` retries for the next `ttl`.
    pub fn deposit(&self) {
        self.deposit_at(now_nanos());
    }

    /// [`deposit`](Self::deposit) for a request that started at `now_nanos` (an instant the
    /// caller has already read and converted, see [`crate::clock`]).
    pub fn deposit_at(&self, now_nanos: u64) {
        let bucket = self.bucket_at(now_nanos);
        // A saturated bucket drops the deposit, which can only make the budget stricter.
        let _ = self.slot(bucket).deposits.increment(bucket);
    }

    /// Tries to spend one retry: `true` if it fits the budget (and is now counted), `false` when
    /// the budget is exhausted (and nothing is counted).
    pub fn withdraw(&self) -> bool {
        let bucket = self.current_bucket();
        let counter = &self.slot(bucket).withdrawals;
        let Some(epoch) = counter.increment(bucket) else {
            return false;
        };
        let (deposits, withdrawals) = self.window_totals(bucket);
        if withdrawals * SCALE <= self.allowance_units(deposits) {
            true
        } else {
            counter.decrement(epoch);
            false
        }
    }

    /// Retries currently available: `ratio × D + reserve − W` over the window, never negative.
    /// A withdrawal needs at least 1.0.
    pub fn available(&self) -> f64 {
        let (deposits, withdrawals) = self.window_totals(self.current_bucket());
        let units = self
            .allowance_units(deposits)
            .saturating_sub(withdrawals * SCALE);
        units as f64 / SCALE as f64
    }

    /// `ratio × deposits + reserve`, in millionths of a retry.
    fn allowance_units(&self, deposits: u128) -> u128 {
        self.ratio_units * deposits + self.reserve_units
    }

    /// Index of the bucket `now` falls in, counted from the budget's creation.
    fn current_bucket(&self) -> u64 {
        self.bucket_at(now_nanos())
    }

    /// Index of the bucket the instant `at_nanos` ([`crate::clock`]) falls in.
    fn bucket_at(&self, at_nanos: u64) -> u64 {
        at_nanos.saturating_sub(self.origin_nanos) / self.bucket_nanos
    }

    fn slot(&self, bucket: u64) -> &Slot {
        // The full index (not the wrapped epoch) picks the slot, so ten consecutive buckets
        // always land in ten distinct slots, even across an epoch wrap.
        &self.slots[(bucket % BUCKETS) as usize]
    }

    /// `(deposits, withdrawals)` summed over the window ending at `bucket`.
    fn window_totals(&self, bucket: u64) -> (u128, u128) {
        self.slots
            .iter()
            .fold((0, 0), |(deposits, withdrawals), slot| {
                (
                    deposits + u128::from(slot.deposits.count_in_window(bucket)),
                    withdrawals + u128::from(slot.withdrawals.count_in_window(bucket)),
                )
            })
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("ratio", &self.ratio)
            .field("min_per_second", &self.min_per_second)
            .field("ttl", &self.ttl)
            .field("available", &self.available())
            .finish()
    }
}

impl Counter {
    /// Counts one event in `bucket`, resetting the counter first if it holds an expired bucket.
    /// Returns the epoch the event was counted under, or `None` if that count is saturated.
    fn increment(&self, bucket: u64) -> Option<u64> {
        let epoch = bucket & EPOCH_MASK;
        let mut current = self.0.load(Ordering::Relaxed);
        loop {
            let (stored, count) = unpack(current);
            // A caller whose clock read is stale finds a newer epoch here. Resetting would wipe
            // that newer bucket's events, so the event joins it and merely expires a bit later.
            // A zero count carries no epoch worth keeping (it is also the initial state).
            let next = if count > 0 && (stored == epoch || newer(stored, epoch)) {
                if count == COUNT_MASK {
                    return None;
                }
                current + 1
            } else {
                pack(epoch, 1)
            };
            // Relaxed suffices: the budget's guarantee rests on each counter's own modification
            // order, and no other memory is published through it.
            match self
                .0
                .compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(unpack(next).0),
                Err(actual) => current = actual,
            }
        }
    }

    /// Takes back one event counted under `epoch`, unless the counter has since moved on (then
    /// the event expired along with its bucket and there is nothing to take back).
    fn decrement(&self, epoch: u64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |current| {
                let (stored, count) = unpack(current);
                (stored == epoch && count > 0).then(|| current - 1)
            });
    }

    /// The count, if its bucket is in the window ending at `bucket`, else 0.
    fn count_in_window(&self, bucket: u64) -> u64 {
        let (stored, count) = unpack(self.0.load(Ordering::Relaxed));
        let epoch = bucket & EPOCH_MASK;
        let behind = epoch.wrapping_sub(stored) & EPOCH_MASK;
        if behind < BUCKETS || newer(stored, epoch) {
            count
        } else {
            0
        }
    }
}

/// Whether `stored` is a later bucket than `epoch` (written after a later clock read), in serial
/// number arithmetic: "later" means less than half the epoch space ahead.
fn newer(stored: u64, epoch: u64) -> bool {
    let distance = stored.wrapping_sub(epoch) & EPOCH_MASK;
    distance != 0 && distance <= EPOCH_MASK / 2
}

fn pack(epoch: u64, count: u64) -> u64 {
    (epoch << COUNT_BITS) | count
}

fn unpack(packed: u64) -> (u64, u64) {
    (packed >> COUNT_BITS, packed & COUNT_MASK)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicU32;

    use rand::SeedableRng;
    use rand::rngs::SmallRng;
    use tokio::sync::Mutex;
    use tokio::time::{Instant, advance};

    use super::*;
    use crate::resilience::backoff::{Backoff, JitterMode};

    /// Withdraws until denied (with a safety cap), returning how many succeeded.
    fn drain(budget: &RetryBudget) -> u32 {
        let mut granted = 0;
        while granted < 1_000_000 && budget.withdraw() {
            granted += 1;
        }
        granted
    }

    #[test]
    fn budget_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<RetryBudget>();
    }

    #[tokio::test(start_paused = true)]
    async fn ratio_allows_that_share_of_deposits() {
        let budget = RetryBudget::new(0.2, 0, DEFAULT_TTL);
        assert!(!budget.withdraw(), "no deposits and no reserve: no retry");
        for _ in 0..100 {
            budget.deposit();
        }
        assert_eq!(budget.available(), 20.0);
        assert_eq!(
            drain(&budget),
            20,
            "100 requests at ratio 0.2 allow 20 retries"
        );
        assert_eq!(budget.available(), 0.0);
        assert!(!budget.withdraw(), "the budget stays exhausted");
    }

    #[tokio::test(start_paused = true)]
    async fn ratio_is_exact_where_floats_would_round_down() {
        // 0.57 × 100 is 56.999… in f64.
        let budget = RetryBudget::new(0.57, 0, DEFAULT_TTL);
        for _ in 0..100 {
            budget.deposit();
        }
        assert_eq!(drain(&budget), 57, "0.57 × 100 deposits allow 57 retries");
    }

    #[tokio::test(start_paused = true)]
    async fn reserve_alone_allows_min_per_second_times_ttl() {
        let budget = RetryBudget::new(0.2, 10, DEFAULT_TTL);
        assert_eq!(budget.available(), 100.0);
        assert_eq!(
            drain(&budget),
            100,
            "10/s over a 10 s window, with no requests"
        );

        let short = RetryBudget::new(0.0, 10, Duration::from_millis(2500));
        assert_eq!(drain(&short), 25, "10/s over a 2.5 s window");
    }

    #[tokio::test(start_paused = true)]
    async fn reserve_and_ratio_add_up() {
        let budget = RetryBudget::new(0.5, 1, DEFAULT_TTL);
        for _ in 0..10 {
            budget.deposit();
        }
        assert_eq!(drain(&budget), 15, "0.5 × 10 deposits + 1/s × 10 s reserve");
    }

    #[tokio::test(start_paused = true)]
    async fn denied_withdrawal_leaves_the_budget_untouched() {
        let budget = RetryBudget::new(0.5, 0, DEFAULT_TTL);
        for _ in 0..3 {
            budget.deposit();
        }
        assert!(budget.withdraw());
        assert_eq!(budget.available(), 0.5);
        assert!(!budget.withdraw(), "half a retry is not enough");
        assert_eq!(budget.available(), 0.5, "a denial must be rolled back");
        budget.deposit();
        assert!(
            budget.withdraw(),
            "the half retry plus a new deposit make one"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn budget_slides_and_recovers_after_ttl() {
        let budget = RetryBudget::new(0.5, 0, DEFAULT_TTL);
        for _ in 0..10 {
            budget.deposit();
        }
        assert_eq!(drain(&budget), 5);

        advance(Duration::from_secs(5)).await;
        for _ in 0..10 {
            budget.deposit();
        }
        assert_eq!(
            drain(&budget),
            5,
            "20 deposits and 5 earlier withdrawals in the window leave 5"
        );

        advance(Duration::from_secs(5)).await;
        assert_eq!(
            budget.available(),
            0.0,
            "the first batch's deposits and withdrawals expired together"
        );

        advance(Duration::from_secs(5)).await;
        assert_eq!(budget.available(), 0.0, "everything expired");
        for _ in 0..4 {
            budget.deposit();
        }
        assert_eq!(drain(&budget), 2, "spent retries no longer count");
    }

    #[tokio::test(start_paused = true)]
    async fn reserve_comes_back_when_its_withdrawals_expire() {
        let budget = RetryBudget::new(0.2, 5, DEFAULT_TTL);
        assert_eq!(drain(&budget), 50);
        advance(Duration::from_secs(5)).await;
        assert_eq!(
            drain(&budget),
            0,
            "the reserve is per window, not refilled per second"
        );
        advance(Duration::from_secs(5)).await;
        assert_eq!(drain(&budget), 50, "after ttl the reserve is whole again");
    }

    #[tokio::test(start_paused = true)]
    async fn events_expire_between_nine_tenths_and_full_ttl() {
        let budget = RetryBudget::new(1.0, 0, DEFAULT_TTL);
        advance(Duration::from_millis(500)).await;
        budget.deposit();
        // The deposit was made half-way through bucket 0 (which ends at 1 s).
        advance(Duration::from_millis(9_499)).await;
        assert_eq!(budget.available(), 1.0, "still counted at 9.999 s");
        advance(Duration::from_millis(1)).await;
        assert_eq!(budget.available(), 0.0, "expired with its bucket at 10 s");
    }

    #[tokio::test(start_paused = true)]
    async fn long_idle_periods_do_not_resurrect_old_counts() {
        let budget = RetryBudget::new(1.0, 0, DEFAULT_TTL);
        for _ in 0..10 {
            budget.deposit();
        }
        for hours in [1, 24, 24 * 365] {
            advance(Duration::from_secs(3600 * hours)).await;
            assert_eq!(budget.available(), 0.0, "after {hours} h nothing is left");
            budget.deposit();
            assert!(budget.withdraw());
            assert!(!budget.withdraw());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn new_clamps_out_of_range_inputs() {
        for (ratio, expected) in [(f64::NAN, 0), (-1.0, 0), (5000.0, 1000)] {
            let budget = RetryBudget::new(ratio, 0, DEFAULT_TTL);
            budget.deposit();
            assert_eq!(drain(&budget), expected, "ratio {ratio} per deposit");
        }
        let tiny = RetryBudget::new(0.0, 100, Duration::ZERO);
        assert_eq!(
            drain(&tiny),
            1,
            "a zero ttl is raised to 10 ms: 100/s × 10 ms = 1 retry"
        );
    }

    #[test]
    fn counters_survive_an_epoch_wrap() {
        let counter = Counter::default();
        let last = EPOCH_MASK; // the last epoch before wrapping to 0
        assert_eq!(counter.increment(last), Some(last));
        let wrapped = last + 1;
        assert_eq!(
            counter.count_in_window(wrapped),
            1,
            "one bucket later, across the wrap, still in the window"
        );
        assert_eq!(counter.count_in_window(last + BUCKETS), 0, "expired");
        assert_eq!(
            counter.increment(wrapped + BUCKETS - 1),
            Some((wrapped + BUCKETS - 1) & EPOCH_MASK),
            "a new bucket resets the old count"
        );
        assert_eq!(counter.count_in_window(wrapped + BUCKETS - 1), 1);
    }

    #[test]
    fn stale_clock_reads_count_in_the_newer_bucket() {
        let counter = Counter::default();
        // Buckets 15 and 25 share a slot; a thread that read the clock in 15 may arrive late.
        assert_eq!(counter.increment(25), Some(25));
        assert_eq!(
            counter.increment(15),
            Some(25),
            "an increment with an older clock reading must not wipe the newer count"
        );
        assert_eq!(counter.count_in_window(25), 2);
        assert_eq!(
            counter.count_in_window(15),
            2,
            "a lagging reader still sees it"
        );
        counter.decrement(15);
        assert_eq!(counter.count_in_window(25), 2, "wrong epoch: no rollback");
        counter.decrement(25);
        assert_eq!(counter.count_in_window(25), 1);
    }

    #[test]
    fn saturated_counter_denies_instead_of_wrapping() {
        let counter = Counter(AtomicU64::new(pack(3, COUNT_MASK)));
        assert_eq!(counter.increment(3), None);
        assert_eq!(counter.count_in_window(3), COUNT_MASK);
    }

    /// What the retry storm did, shared by its request tasks.
    struct Storm {
        /// `(sent at, is a retry)` for every attempt.
        attempts: Mutex<Vec<(Instant, bool)>>,
        first_denial: Mutex<Option<Instant>>,
    }

    #[tokio::test(start_paused = true)]
    async fn retry_storm_is_held_to_the_ratio_once_the_reserve_is_spent() {
        const REQUESTS: u32 = 500;
        const MAX_RETRIES: u32 = 2;
        let budget = Arc::new(RetryBudget::new(0.2, 10, DEFAULT_TTL));
        let backoff = Backoff::try_new(
            Duration::from_millis(25),
            Duration::from_secs(1),
            2.0,
            JitterMode::Full,
        )
        .expect("valid backoff");
        let storm = Arc::new(Storm {
            attempts: Mutex::new(Vec::new()),
            first_denial: Mutex::new(None),
        });
        let start = Instant::now();

        // 500 requests evenly over one second against a backend that always fails, each run as
        // a retry layer would: deposit, attempt, then per retry ask the budget, back off, retry.
        let tasks: Vec<_> = (0..REQUESTS)
            .map(|i| {
                let (budget, backoff, storm) = (budget.clone(), backoff.clone(), storm.clone());
                tokio::spawn(async move {
                    let mut rng = SmallRng::seed_from_u64(u64::from(i));
                    tokio::time::sleep_until(start + Duration::from_millis(2 * u64::from(i))).await;
                    budget.deposit();
                    storm.attempts.lock().await.push((Instant::now(), false));
                    for retry in 1..=MAX_RETRIES {
                        if !budget.withdraw() {
                            storm
                                .first_denial
                                .lock()
                                .await
                                .get_or_insert(Instant::now());
                            break;
                        }
                        tokio::time::sleep(backoff.delay(retry, &mut rng)).await;
                        storm.attempts.lock().await.push((Instant::now(), true));
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("request task");
        }

        let attempts = storm.attempts.lock().await.clone();
        let retries = attempts.iter().filter(|(_, retry)| *retry).count();
        let cap = 0.2 * f64::from(REQUESTS) + 10.0 * DEFAULT_TTL.as_secs_f64();
        assert!(
            retries as f64 <= cap,
            "{retries} retries must stay within 0.2 × 500 + 10/s × 10 s = {cap}"
        );
        assert!(
            retries as f64 >= cap - 1.0,
            "{retries} retries: the budget should be spent, not hoarded (cap {cap})"
        );

        // After the reserve is gone, attempts per original request approach 1 + ratio; without
        // a budget they would be 1 + MAX_RETRIES = 3.
        let spent_at = storm
            .first_denial
            .lock()
            .await
            .expect("the storm must exhaust the reserve");
        let ratio_between = |from: Instant, to: Instant| {
            let in_range = attempts.iter().filter(|(at, _)| from <= *at && *at < to);
            let (originals, retries) =
                in_range.fold(
                    (0u32, 0u32),
                    |(o, r), (_, retry)| {
                        if *retry { (o, r + 1) } else { (o + 1, r) }
                    },
                );
            (
                originals,
                f64::from(originals + retries) / f64::from(originals),
            )
        };
        let end = start + Duration::from_secs(2);
        let (originals, overall) = ratio_between(spent_at, end);
        assert!(
            originals > 400,
            "the reserve should last only the first ~10% of requests, {originals} came after"
        );
        assert!(
            overall <= 1.3,
            "after the reserve is spent, attempts/requests {overall:.3} must stay ≤ 1.3"
        );
        // ...and not only on average: every 100 ms slice stays under it too, once the retries
        // the reserve paid for (still backing off when it ran out) have been sent.
        let settled = spent_at + backoff.base_delay(1) + backoff.base_delay(2);
        let mut from = settled;
        while from + Duration::from_millis(100) <= start + Duration::from_secs(1) {
            let to = from + Duration::from_millis(100);
            let (_, slice) = ratio_between(from, to);
            assert!(
                slice <= 1.3,
                "attempts/requests {slice:.3} in the 100 ms from {:?} must stay ≤ 1.3",
                from - start
            );
            from = to;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 8)]
    async fn concurrent_withdrawals_stay_within_the_documented_bound() {
        const WORKERS: u32 = 8;
        const TASKS: usize = 64;
        const ROUNDS: u32 = 100;
        let budget = Arc::new(RetryBudget::new(0.1, 0, DEFAULT_TTL));
        let granted = Arc::new(AtomicU32::new(0));
        let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let (budget, granted, barrier) = (budget.clone(), granted.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    for round in 0..ROUNDS {
                        budget.deposit();
                        for _ in 0..2 {
                            if budget.withdraw() {
                                granted.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        if round % 10 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("withdrawing task");
        }

        let granted = granted.load(Ordering::Relaxed);
        let limit = (TASKS as u32 * ROUNDS) / 10;
        let bound = limit + (WORKERS - 1);
        assert!(
            granted <= bound,
            "{granted} concurrent withdrawals must not exceed {limit} + {} (threads − 1)",
            WORKERS - 1
        );
        let leftover = drain(&budget);
        assert!(
            (limit..=bound).contains(&(granted + leftover)),
            "{granted} granted + {leftover} left must be in {limit}..={bound}: no loss, no excess"
        );
    }
}
