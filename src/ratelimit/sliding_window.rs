//! Exact sliding-window limiter: it remembers the times of the admissions still in its window.
//!
//! # Semantics
//!
//! At most `limit` requests are admitted in any half-open interval `[s, s + window)`, for every
//! `s`; equivalently, two admissions `limit` apart are always at least `window` apart. It is
//! exact the other way too: a request at `now` is admitted iff fewer than `limit` admissions
//! happened in `(now − window, now]`, so nothing the rule allows is ever denied. (A closed
//! interval of length `window` can hold `limit + 1` admissions, the first and last exactly
//! `window` apart.)
//!
//! That is the guarantee the common approximations lack: weighting the previous fixed window's
//! count (the nginx / Cloudflare estimate) admits more than `limit` in some windows when traffic
//! is uneven, and summing `k` sub-window counters is exact only at sub-window granularity.
//!
//! - Allowed: `remaining` is `limit` minus the admissions now in the window (this one included);
//!   `reset` is `window`, when this admission, the newest, leaves it.
//! - Denied: `retry_after` is the time until the oldest admission in the window leaves it.
//!
//! # Memory
//!
//! One `u64` per admission in the window, allocated as admissions arrive and never more than
//! `limit` of them: at most `8 × limit` bytes, hence [`MAX_WINDOW_LIMIT`]. An idle limiter holds
//! none of them in use.
//!
//! # Concurrency
//!
//! One small mutex per limiter, held for a few comparisons and a push, so decisions are exact
//! under concurrency. Callers' clock readings can reach the lock out of order; a reading older
//! than the newest recorded admission is taken as that admission's time (moved forward, never
//! back), which keeps the record sorted and the guarantee intact for recorded times. A recorded
//! time lies between the caller's clock reading and the moment it took the lock.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::{Decision, Limiter, MAX_SPAN, Quota, RateLimitError, nanos_since};

/// The largest `limit` a [`SlidingWindow`] accepts, bounding its memory to 80 KB.
pub const MAX_WINDOW_LIMIT: u32 = 10_000;

/// An exact sliding-window limiter; see the [module documentation](self) for the semantics.
/// Build it with [`SlidingWindow::try_new`], share it through an `Arc`.
pub struct SlidingWindow {
    limit: u32,
    window: Duration,
    window_nanos: u64,
    epoch: Instant,
    /// Times of the admissions in the window, oldest first, in nanoseconds since `epoch`.
    admitted: Mutex<VecDeque<u64>>,
}

impl SlidingWindow {
    /// A limiter admitting at most `limit` requests in any window of length `window`, with the
    /// current time as its epoch. `limit` must be in `1..=MAX_WINDOW_LIMIT`, `window` non-zero
    /// and at most [`MAX_SPAN`].
    pub fn try_new(limit: u32, window: Duration) -> Result<Self, RateLimitError> {
        if limit == 0 {
            return Err(RateLimitError::ZeroLimit);
        }
        if limit > MAX_WINDOW_LIMIT {
            return Err(RateLimitError::LimitTooLarge {
                limit,
                max: MAX_WINDOW_LIMIT,
            });
        }
        if window.is_zero() {
            return Err(RateLimitError::ZeroWindow);
        }
        if window > MAX_SPAN {
            return Err(RateLimitError::SpanTooLong(window));
        }
        Ok(Self::with_epoch(limit, window, Instant::now()))
    }

    /// The most requests admitted in any window.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// The window's length.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Builds a limiter from settings already validated.
    fn with_epoch(limit: u32, window: Duration, epoch: Instant) -> Self {
        Self {
            limit,
            window,
            // At most MAX_SPAN, so it fits.
            window_nanos: u64::try_from(window.as_nanos()).unwrap_or(u64::MAX),
            epoch,
            admitted: Mutex::new(VecDeque::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<u64>> {
        // Every update leaves the record sorted and within the limit, so a panic elsewhere while
        // the lock was held cannot have broken it: recover instead of propagating the poison.
        self.admitted.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Limiter for SlidingWindow {
    fn try_acquire(&self, now: Instant) -> Decision {
        let mut admitted = self.lock();
        let t = nanos_since(self.epoch, now).max(admitted.back().copied().unwrap_or(0));
        while admitted
            .front()
            .is_some_and(|&oldest| t - oldest >= self.window_nanos)
        {
            admitted.pop_front();
        }
        let limit = self.limit as usize;
        if admitted.len() < limit {
            if admitted.len() == admitted.capacity() {
                // Grow geometrically but never past `limit`: this record is the limiter's memory
                // bound, and most clients never come near their limit.
                let extra = admitted.len().max(4).min(limit - admitted.len());
                admitted.reserve_exact(extra);
            }
            admitted.push_back(t);
            Decision::Allow {
                remaining: self.limit - u32::try_from(admitted.len()).unwrap_or(self.limit),
                reset: self.window,
            }
        } else {
            // Not expired, so `oldest > t − window` and the wait is positive.
            let oldest = admitted.front().copied().unwrap_or(t);
            let leaves = oldest.saturating_add(self.window_nanos);
            Decision::Deny {
                retry_after: Duration::from_nanos(leaves - t),
            }
        }
    }

    fn is_idle(&self, now: Instant) -> bool {
        let t = nanos_since(self.epoch, now);
        self.lock()
            .back()
            .is_none_or(|&newest| t.saturating_sub(newest) >= self.window_nanos)
    }

    fn fresh(&self, now: Instant) -> Self {
        Self::with_epoch(self.limit, self.window, now)
    }

    fn quota(&self) -> Quota {
        Quota {
            limit: self.limit,
            window: self.window,
        }
    }
}

impl fmt::Debug for SlidingWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlidingWindow")
            .field("limit", &self.limit)
            .field("window", &self.window)
            .field("recorded", &self.lock().len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    use tokio::time::advance;

    use super::*;

    fn window(limit: u32, window: Duration) -> SlidingWindow {
        SlidingWindow::try_new(limit, window).expect("valid window")
    }

    fn allow(remaining: u32, reset: Duration) -> Decision {
        Decision::Allow { remaining, reset }
    }

    fn deny(retry_after: Duration) -> Decision {
        Decision::Deny { retry_after }
    }

    #[tokio::test(start_paused = true)]
    async fn admits_limit_per_window_and_retries_when_the_oldest_leaves() {
        let sec = Duration::from_secs(1);
        let ms = Duration::from_millis;
        let limiter = window(3, sec);
        let now = Instant::now();
        assert_eq!(limiter.try_acquire(now), allow(2, sec));
        assert_eq!(limiter.try_acquire(now), allow(1, sec));
        assert_eq!(limiter.try_acquire(now), allow(0, sec));
        assert_eq!(
            limiter.try_acquire(now),
            deny(sec),
            "full: the oldest leaves in 1 s"
        );
        advance(ms(400)).await;
        assert_eq!(limiter.try_acquire(Instant::now()), deny(ms(600)));
        advance(ms(600)).await;
        assert_eq!(
            limiter.try_acquire(Instant::now()),
            allow(2, sec),
            "admissions exactly one window old have left it"
        );

        // Staggered admissions free up one at a time.
        advance(ms(300)).await;
        assert_eq!(limiter.try_acquire(Instant::now()), allow(1, sec));
        advance(ms(300)).await;
        assert_eq!(limiter.try_acquire(Instant::now()), allow(0, sec));
        assert_eq!(limiter.try_acquire(Instant::now()), deny(ms(400)));
        advance(ms(399)).await;
        assert_eq!(limiter.try_acquire(Instant::now()), deny(ms(1)));
        advance(ms(1)).await;
        assert_eq!(limiter.try_acquire(Instant::now()), allow(0, sec));
        assert_eq!(
            limiter.try_acquire(Instant::now()),
            deny(ms(300)),
            "the next oldest was admitted 700 ms ago"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_limit_in_any_window_with_random_arrivals() {
        const LIMIT: usize = 10;
        const WINDOW: Duration = Duration::from_secs(1);
        let limiter = window(LIMIT as u32, WINDOW);
        let mut rng = SmallRng::seed_from_u64(0x5eed_0001);
        let mut admitted: Vec<Instant> = Vec::new();
        let mut denied = 0;
        for _ in 0..20_000 {
            // Bursts (same instant), busy stretches and lulls; whole milliseconds, so many
            // arrivals land exactly one window after an earlier admission.
            let gap = match rng.random_range(0..10) {
                0..=2 => 0,
                3..=8 => rng.random_range(1..=80),
                _ => rng.random_range(80..=1_500),
            };
            advance(Duration::from_millis(gap)).await;
            let now = Instant::now();
            let in_window: Vec<Instant> = admitted
                .iter()
                .rev()
                .take_while(|&&at| now - at < WINDOW)
                .copied()
                .collect();
            match limiter.try_acquire(now) {
                Decision::Allow { remaining, reset } => {
                    assert!(
                        in_window.len() < LIMIT,
                        "admitted with {} already in the window",
                        in_window.len()
                    );
                    assert_eq!(remaining as usize, LIMIT - in_window.len() - 1);
                    assert_eq!(reset, WINDOW);
                    admitted.push(now);
                }
                Decision::Deny { retry_after } => {
                    denied += 1;
                    assert_eq!(
                        in_window.len(),
                        LIMIT,
                        "denied only when the window is full (exact, not conservative)"
                    );
                    let oldest = in_window[LIMIT - 1];
                    assert_eq!(
                        retry_after,
                        oldest + WINDOW - now,
                        "retry when the oldest admission in the window leaves it"
                    );
                }
            }
        }

        // Brute force over every window that starts at an admission: a window holding the most
        // admissions can always be slid right until it starts at one, so these are all we need.
        let mut fullest = 0;
        for (i, &start) in admitted.iter().enumerate() {
            let count = admitted[i..]
                .iter()
                .take_while(|&&at| at - start < WINDOW)
                .count();
            assert!(
                count <= LIMIT,
                "{count} admissions in the window starting at admission {i}, limit {LIMIT}"
            );
            fullest = fullest.max(count);
        }
        assert_eq!(
            fullest, LIMIT,
            "the arrivals should push the limiter to its limit"
        );
        assert!(
            denied > 1_000,
            "the arrivals should be denied often, got {denied}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn out_of_order_clock_readings_are_moved_forward() {
        let limiter = window(2, Duration::from_secs(1));
        let early = Instant::now();
        advance(Duration::from_millis(500)).await;
        assert!(limiter.try_acquire(Instant::now()).is_allowed());
        // A caller that read the clock before the previous admission is recorded as of it.
        assert!(limiter.try_acquire(early).is_allowed());
        advance(Duration::from_millis(999)).await;
        assert_eq!(
            limiter.try_acquire(Instant::now()),
            deny(Duration::from_millis(1)),
            "both admissions count from 500 ms"
        );
        advance(Duration::from_millis(1)).await;
        assert_eq!(
            limiter.try_acquire(Instant::now()),
            allow(1, Duration::from_secs(1))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_once_the_newest_admission_has_left() {
        let limiter = window(5, Duration::from_secs(2));
        assert!(limiter.is_idle(Instant::now()), "starts empty");
        limiter.try_acquire(Instant::now());
        advance(Duration::from_secs(1)).await;
        limiter.try_acquire(Instant::now());
        advance(Duration::from_millis(1_999)).await;
        assert!(
            !limiter.is_idle(Instant::now()),
            "the newest is still in the window"
        );
        advance(Duration::from_millis(1)).await;
        assert!(limiter.is_idle(Instant::now()));
        assert_eq!(
            limiter.try_acquire(Instant::now()),
            allow(4, Duration::from_secs(2)),
            "an idle limiter behaves like a fresh one"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn memory_grows_with_use_up_to_the_limit() {
        let limiter = window(1_000, Duration::from_secs(60));
        limiter.try_acquire(Instant::now());
        assert!(limiter.lock().capacity() < 16, "a light user holds little");
        for _ in 0..5_000 {
            limiter.try_acquire(Instant::now());
        }
        let record = limiter.lock();
        assert_eq!(record.len(), 1_000);
        assert!(
            record.capacity() <= 1_000,
            "capacity {} must stay within the limit",
            record.capacity()
        );
    }

    #[test]
    fn rejects_invalid_settings() {
        let sec = Duration::from_secs(1);
        assert_eq!(
            SlidingWindow::try_new(0, sec).err(),
            Some(RateLimitError::ZeroLimit)
        );
        assert_eq!(
            SlidingWindow::try_new(MAX_WINDOW_LIMIT + 1, sec).err(),
            Some(RateLimitError::LimitTooLarge {
                limit: MAX_WINDOW_LIMIT + 1,
                max: MAX_WINDOW_LIMIT
            })
        );
        assert_eq!(
            SlidingWindow::try_new(1, Duration::ZERO).err(),
            Some(RateLimitError::ZeroWindow)
        );
        let too_long = MAX_SPAN + sec;
        assert_eq!(
            SlidingWindow::try_new(1, too_long).err(),
            Some(RateLimitError::SpanTooLong(too_long))
        );
        assert!(SlidingWindow::try_new(MAX_WINDOW_LIMIT, MAX_SPAN).is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 8)]
    async fn concurrent_requests_never_exceed_the_limit() {
        const TASKS: usize = 64;
        const TRIES: usize = 200;
        const LIMIT: u32 = 100;
        let limiter = Arc::new(window(LIMIT, Duration::from_secs(3600)));
        assert_eq!(
            crate::ratelimit::admitted_concurrently(limiter, TASKS, TRIES).await,
            LIMIT,
            "{TASKS} tasks × {TRIES} tries must admit exactly the limit"
        );
    }
}
