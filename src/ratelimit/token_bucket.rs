//! Token bucket as GCRA: one atomic "theoretical arrival time", updated by compare-and-swap.
//!
//! # Semantics
//!
//! A bucket holds up to `burst` tokens and starts full; it refills continuously at `rate` tokens
//! per second. A request takes one whole token or is denied, taking nothing. So from full,
//! `burst` requests are admitted back-to-back, then one every `1/rate`; a bucket left alone for
//! `burst / rate` is full again. Over any interval of length `Δ` at most `burst + ⌊Δ × rate⌋`
//! requests are admitted.
//!
//! `1/rate` is kept as a whole number of nanoseconds `T` (rounded to the nearest), which is exact
//! for every rate dividing 1e9 (5/s is exactly 200 ms).
//!
//! # Algorithm
//!
//! The Generic Cell Rate Algorithm keeps one number, the theoretical arrival time `TAT` (in
//! nanoseconds since the bucket's epoch): the time at which the bucket would be full again. With
//! `τ = (burst − 1) × T`, a request at `t` is admitted iff `max(TAT, t) − t ≤ τ`, and then
//! `TAT ← max(TAT, t) + T`. The tokens left are `⌊(burst × T − (TAT − t)) / T⌋`; a denial can
//! retry after `max(TAT, t) − t − τ`. `TAT ≤ t` is exactly a full bucket: the idle state.
//!
//! # Concurrency
//!
//! Lock-free: a decision is a load and, when admitting, one compare-and-swap (retried if another
//! request got in between); denials write nothing. Admissions are thus totally ordered by the
//! atomic's modification order and each one is judged against the state its predecessors left,
//! so there is no race excess: for admissions `i..=j` in that order, with the clock readings
//! `tᵢ` and `tⱼ` their callers passed, `j − i + 1 ≤ burst + (tⱼ − tᵢ) × rate`. The only slack is
//! the callers' clock: a caller that read the clock `δ` before its compare-and-swap is judged as
//! of its reading, so in real time an interval of length `Δ` admits at most
//! `burst + (Δ + δ) × rate`. `try_acquire` never blocks, so `δ` is a few instructions unless the
//! thread is descheduled in between.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::{Decision, Limiter, MAX_SPAN, Quota, RateLimitError, nanos_since};

/// The highest rate accepted: one request per nanosecond.
const MAX_RATE: f64 = 1e9;

/// A lock-free token bucket; see the [module documentation](self) for the exact semantics.
/// Build it with [`TokenBucket::try_new`], share it through an `Arc`.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: u32,
    /// `T`: nanoseconds per token.
    interval: u64,
    /// `τ = (burst − 1) × T`: how far `TAT` may run ahead of `now` for a request to pass.
    tolerance: u64,
    /// `burst × T`: the time to refill from empty.
    span: u64,
    epoch: Instant,
    /// `TAT`, in nanoseconds since `epoch`.
    tat: AtomicU64,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens refilled at `rate_per_second`, with the current time as
    /// its epoch. The rate must be finite and in (0, 1e9], `burst` at least 1, and the refill
    /// time `burst / rate` at most [`MAX_SPAN`].
    pub fn try_new(rate_per_second: f64, burst: u32) -> Result<Self, RateLimitError> {
        if !(rate_per_second.is_finite() && rate_per_second > 0.0 && rate_per_second <= MAX_RATE) {
            return Err(RateLimitError::InvalidRate(rate_per_second));
        }
        if burst == 0 {
            return Err(RateLimitError::ZeroBurst);
        }
        let max_span = u64::try_from(MAX_SPAN.as_nanos()).unwrap_or(u64::MAX);
        let interval = (1e9 / rate_per_second).round();
        // Compare in floating point first so that the conversions below cannot saturate.
        let span = interval * f64::from(burst);
        if span > max_span as f64 {
            let refill = Duration::try_from_secs_f64(span / 1e9).unwrap_or(Duration::MAX);
            return Err(RateLimitError::SpanTooLong(refill));
        }
        // In range by the checks above: at least 1 (rate ≤ 1e9), at most MAX_SPAN.
        let interval = interval as u64;
        let span = interval.saturating_mul(u64::from(burst));
        Ok(Self {
            rate: rate_per_second,
            burst,
            interval,
            tolerance: span - interval,
            span,
            epoch: Instant::now(),
            tat: AtomicU64::new(0),
        })
    }

    /// The configured rate, in requests per second.
    pub fn rate_per_second(&self) -> f64 {
        self.rate
    }

    /// The bucket's capacity: requests admitted back-to-back from full.
    pub fn burst(&self) -> u32 {
        self.burst
    }
}

impl Limiter for TokenBucket {
    fn try_acquire(&self, now: Instant) -> Decision {
        let t = nanos_since(self.epoch, now);
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let start = tat.max(t);
            let ahead = start - t;
            if ahead > self.tolerance {
                return Decision::Deny {
                    retry_after: Duration::from_nanos(ahead - self.tolerance),
                };
            }
            let next = start.saturating_add(self.interval);
            // Relaxed suffices: the decision rests on this one atomic's modification order, and
            // no other memory is published through it.
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    // `next − t ≤ τ + T = span`, so this cannot underflow.
                    let ahead = next - t;
                    let remaining = (self.span - ahead) / self.interval;
                    return Decision::Allow {
                        remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
                        reset: Duration::from_nanos(ahead),
                    };
                }
                Err(actual) => tat = actual,
            }
        }
    }

    fn is_idle(&self, now: Instant) -> bool {
        self.tat.load(Ordering::Relaxed) <= nanos_since(self.epoch, now)
    }

    fn fresh(&self, now: Instant) -> Self {
        Self {
            rate: self.rate,
            burst: self.burst,
            interval: self.interval,
            tolerance: self.tolerance,
            span: self.span,
            epoch: now,
            tat: AtomicU64::new(0),
        }
    }

    /// `burst` requests per refill time `burst / rate`. A client that keeps to it (never more
    /// than `burst` in any such window) is never denied.
    fn quota(&self) -> Quota {
        Quota {
            limit: self.burst,
            window: Duration::from_nanos(self.span),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::time::advance;

    use super::*;

    fn bucket(rate: f64, burst: u32) -> TokenBucket {
        TokenBucket::try_new(rate, burst).expect("valid bucket")
    }

    #[tokio::test(start_paused = true)]
    async fn burst_back_to_back_then_one_per_interval() {
        let bucket = bucket(5.0, 10);
        let now = Instant::now();
        let decisions: Vec<_> = (0..30).map(|_| bucket.try_acquire(now)).collect();
        let allowed = decisions.iter().filter(|d| d.is_allowed()).count();
        assert_eq!(
            allowed, 10,
            "30 back-to-back requests admit exactly the burst"
        );
        for (i, decision) in decisions.iter().take(10).enumerate() {
            assert_eq!(
                *decision,
                Decision::Allow {
                    remaining: 9 - i as u32,
                    reset: Duration::from_millis(200 * (i as u64 + 1)),
                },
                "request {i}: remaining counts down, reset grows by 200 ms"
            );
        }
        for decision in &decisions[10..] {
            assert_eq!(
                *decision,
                Decision::Deny {
                    retry_after: Duration::from_millis(200)
                },
                "the next token arrives 200 ms after the burst"
            );
        }

        for round in 0..20 {
            advance(Duration::from_millis(199)).await;
            assert_eq!(
                bucket.try_acquire(Instant::now()),
                Decision::Deny {
                    retry_after: Duration::from_millis(1)
                },
                "round {round}: 1 ms before the next token"
            );
            advance(Duration::from_millis(1)).await;
            let now = Instant::now();
            assert_eq!(
                bucket.try_acquire(now),
                Decision::Allow {
                    remaining: 0,
                    reset: Duration::from_secs(2)
                },
                "round {round}: exactly one token every 200 ms"
            );
            assert_eq!(
                bucket.try_acquire(now),
                Decision::Deny {
                    retry_after: Duration::from_millis(200)
                },
                "round {round}: and only one"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn refills_continuously_up_to_the_burst() {
        let bucket = bucket(5.0, 10);
        while bucket.try_acquire(Instant::now()).is_allowed() {}
        advance(Duration::from_millis(700)).await;
        let now = Instant::now();
        assert_eq!(
            bucket.try_acquire(now),
            Decision::Allow {
                remaining: 2,
                reset: Duration::from_millis(1500)
            },
            "700 ms refill 3.5 tokens: this one and 2 more"
        );
        assert!(bucket.try_acquire(now).is_allowed());
        assert!(bucket.try_acquire(now).is_allowed());
        assert_eq!(
            bucket.try_acquire(now),
            Decision::Deny {
                retry_after: Duration::from_millis(100)
            },
            "the half token left needs 100 ms more"
        );

        advance(Duration::from_secs(3600)).await;
        let now = Instant::now();
        assert!(bucket.is_idle(now), "a bucket left alone is full again");
        let allowed = (0..100)
            .filter(|_| bucket.try_acquire(now).is_allowed())
            .count();
        assert_eq!(
            allowed, 10,
            "an hour of refill is still capped at the burst"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_exactly_when_full() {
        let bucket = bucket(5.0, 10);
        assert!(bucket.is_idle(Instant::now()), "starts full");
        for _ in 0..3 {
            assert!(bucket.try_acquire(Instant::now()).is_allowed());
        }
        advance(Duration::from_millis(599)).await;
        assert!(!bucket.is_idle(Instant::now()), "one token short at 599 ms");
        advance(Duration::from_millis(1)).await;
        assert!(
            bucket.is_idle(Instant::now()),
            "three tokens back after 600 ms"
        );
        let early = bucket.try_acquire(Instant::now() - Duration::from_secs(1));
        assert!(
            early.is_allowed(),
            "a reading from before the epoch is clamped to it (no underflow)"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn fresh_restarts_full_with_the_same_policy() {
        let bucket = bucket(2.0, 3);
        while bucket.try_acquire(Instant::now()).is_allowed() {}
        advance(Duration::from_secs(10)).await;
        let fresh = bucket.fresh(Instant::now());
        assert_eq!(fresh.rate_per_second(), 2.0);
        assert_eq!(fresh.burst(), 3);
        let allowed = (0..10)
            .filter(|_| fresh.try_acquire(Instant::now()).is_allowed())
            .count();
        assert_eq!(allowed, 3);
        assert_eq!(
            fresh.quota(),
            Quota {
                limit: 3,
                window: Duration::from_millis(1500)
            },
            "3 requests per 1.5 s refill time"
        );
    }

    #[test]
    fn rejects_invalid_settings() {
        for rate in [0.0, -1.0, f64::INFINITY, 2e9] {
            assert_eq!(
                TokenBucket::try_new(rate, 1).err(),
                Some(RateLimitError::InvalidRate(rate)),
                "rate {rate} must be rejected"
            );
        }
        assert!(matches!(
            TokenBucket::try_new(f64::NAN, 1),
            Err(RateLimitError::InvalidRate(r)) if r.is_nan()
        ));
        assert_eq!(
            TokenBucket::try_new(1.0, 0).err(),
            Some(RateLimitError::ZeroBurst)
        );
        assert!(matches!(
            TokenBucket::try_new(1e-9, 10),
            Err(RateLimitError::SpanTooLong(_))
        ));
        assert!(
            TokenBucket::try_new(1e9, u32::MAX).is_ok(),
            "the extremes that fit are accepted"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 8)]
    async fn concurrent_requests_never_exceed_the_allowance() {
        const TASKS: usize = 64;
        const TRIES: usize = 200;
        const BURST: u32 = 100;
        // One token per 1000 s: during the test the allowance is the burst, exactly.
        let bucket = Arc::new(bucket(0.001, BURST));
        assert_eq!(
            crate::ratelimit::admitted_concurrently(bucket, TASKS, TRIES).await,
            BURST,
            "{TASKS} tasks × {TRIES} tries must admit exactly the burst: no race excess, no loss"
        );
    }
}
