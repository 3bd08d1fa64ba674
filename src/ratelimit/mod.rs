//! Rate limiting: token-bucket and sliding-window limiters, a bounded per-client table of them,
//! and the IETF `RateLimit` header fields. Pure data structures: no I/O, no HTTP types.
//!
//! - [`TokenBucket`]: lock-free GCRA, `burst` requests back-to-back then one every `1/rate`.
//! - [`SlidingWindow`]: exact, never more than `limit` admissions in any window of its length.
//! - [`KeyedLimiter`]: one limiter per [`ClientKey`], sharded, at most `max_keys` entries; only
//!   idle clients are ever evicted, and newcomers that find no room share an overflow limiter.
//! - [`RateLimitHeaders`]: `RateLimit-Policy`, `RateLimit` and `Retry-After` for a [`Decision`].
//!
//! Every limiter takes the current time as an argument (read it once per request with
//! [`Instant::now`]) and measures it on tokio's clock from its own epoch, so paused-time tests
//! control it. Limiters are `Send + Sync` and meant to be shared through an `Arc` handed in at
//! construction: hyper clones services per connection, and a limit must not be cloned with them.

use std::time::Duration;

use tokio::time::Instant;

pub mod headers;
pub mod keyed;
pub mod policy;
pub mod sliding_window;
pub mod token_bucket;

pub use headers::{RATELIMIT, RATELIMIT_POLICY, RETRY_AFTER, RateLimitHeaders};
pub use keyed::{ClientKey, KeyedLimiter, MAX_HEADER_KEY_BYTES};
pub use sliding_window::{MAX_WINDOW_LIMIT, SlidingWindow};
pub use token_bucket::TokenBucket;

/// The longest refill time or window accepted: about a century. Keeps every sum of times (in
/// nanoseconds since a limiter's epoch) far from `u64` overflow.
pub const MAX_SPAN: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// What a limiter decided about one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The request is admitted and has been counted.
    Allow {
        /// How many more requests would be admitted at this same instant.
        remaining: u32,
        /// Time until the limiter is back to its full quota if nothing else arrives: a token
        /// bucket is full again, a sliding window has let every admission in it expire.
        reset: Duration,
    },
    /// The request is rejected; nothing was counted.
    Deny {
        /// Time from `now` until a request would be admitted, unless others take the quota
        /// first. Never zero.
        retry_after: Duration,
    },
}

/// A limiter's policy as advertised to clients: at most `limit` requests per `window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    /// Quota units (requests) per window.
    pub limit: u32,
    /// The window; never zero.
    pub window: Duration,
}

/// A rate limiter for one stream of requests.
pub trait Limiter: Send + Sync {
    /// Admits and counts one request at `now`, or rejects it without counting anything.
    fn try_acquire(&self, now: Instant) -> Decision;

    /// Whether the limiter is back to its initial state at `now`: from here on it behaves exactly
    /// like a [fresh](Limiter::fresh) one, so it can be dropped and re-created without handing
    /// anyone extra quota.
    fn is_idle(&self, now: Instant) -> bool;

    /// A new limiter with the same policy, in its initial (full) state, with `now` as its epoch.
    fn fresh(&self, now: Instant) -> Self
    where
        Self: Sized;

    /// The policy, for the `RateLimit-Policy` header.
    fn quota(&self) -> Quota;
}

/// Either limiter, chosen at run time (the policy's `algorithm`).
#[derive(Debug)]
pub enum AnyLimiter {
    /// See [`TokenBucket`].
    TokenBucket(TokenBucket),
    /// See [`SlidingWindow`].
    SlidingWindow(SlidingWindow),
}

/// Why a limiter, table or header configuration was rejected.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RateLimitError {
    /// The rate is not a finite number in (0, 1e9] requests per second.
    #[error("rate must be a finite number of requests per second in (0, 1e9], got {0}")]
    InvalidRate(f64),
    /// A token bucket needs room for at least one request.
    #[error("burst must be at least 1")]
    ZeroBurst,
    /// A sliding window needs to admit at least one request.
    #[error("limit must be at least 1")]
    ZeroLimit,
    /// A sliding window remembers one timestamp per admission in the window, so its limit is
    /// capped at [`MAX_WINDOW_LIMIT`].
    #[error("sliding-window limit {limit} exceeds the maximum {max}")]
    LimitTooLarge {
        /// The configured limit.
        limit: u32,
        /// [`MAX_WINDOW_LIMIT`].
        max: u32,
    },
    /// A sliding window of zero length limits nothing.
    #[error("window must be greater than zero")]
    ZeroWindow,
    /// The bucket's refill time (`burst / rate`) or the window exceeds [`MAX_SPAN`].
    #[error("refill time or window {0:?} exceeds the maximum of 100 years")]
    SpanTooLong(Duration),
    /// A keyed table needs room for at least one key.
    #[error("max_keys must be at least 1")]
    ZeroMaxKeys,
    /// Policy names go into a structured-field String: printable ASCII, not empty.
    #[error("policy name must be non-empty printable ASCII, got {0:?}")]
    InvalidPolicyName(String),
}

impl Decision {
    /// Whether the request was admitted.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
}

impl Limiter for AnyLimiter {
    fn try_acquire(&self, now: Instant) -> Decision {
        match self {
            AnyLimiter::TokenBucket(l) => l.try_acquire(now),
            AnyLimiter::SlidingWindow(l) => l.try_acquire(now),
        }
    }

    fn is_idle(&self, now: Instant) -> bool {
        match self {
            AnyLimiter::TokenBucket(l) => l.is_idle(now),
            AnyLimiter::SlidingWindow(l) => l.is_idle(now),
        }
    }

    fn fresh(&self, now: Instant) -> Self {
        match self {
            AnyLimiter::TokenBucket(l) => AnyLimiter::TokenBucket(l.fresh(now)),
            AnyLimiter::SlidingWindow(l) => AnyLimiter::SlidingWindow(l.fresh(now)),
        }
    }

    fn quota(&self) -> Quota {
        match self {
            AnyLimiter::TokenBucket(l) => l.quota(),
            AnyLimiter::SlidingWindow(l) => l.quota(),
        }
    }
}

impl From<TokenBucket> for AnyLimiter {
    fn from(limiter: TokenBucket) -> Self {
        AnyLimiter::TokenBucket(limiter)
    }
}

impl From<SlidingWindow> for AnyLimiter {
    fn from(limiter: SlidingWindow) -> Self {
        AnyLimiter::SlidingWindow(limiter)
    }
}

/// `now` in nanoseconds since `epoch`; a reading from before the epoch (a caller that read the
/// clock just before the limiter was created) counts as the epoch itself.
/// How many of `tasks` × `tries` acquisitions `limiter` admits when the tasks start together
/// on a multi-threaded runtime (the limiters' race tests).
#[cfg(test)]
pub(crate) async fn admitted_concurrently<L: Limiter + 'static>(
    limiter: std::sync::Arc<L>,
    tasks: usize,
    tries: usize,
) -> u32 {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    let allowed = Arc::new(AtomicU32::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(tasks));
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let (limiter, allowed, barrier) = (limiter.clone(), allowed.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                for i in 0..tries {
                    if limiter.try_acquire(Instant::now()).is_allowed() {
                        allowed.fetch_add(1, Ordering::Relaxed);
                    }
                    if i % 16 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();
    for handle in handles {
        handle.await.expect("acquiring task");
    }
    allowed.load(Ordering::Relaxed)
}

fn nanos_since(epoch: Instant, now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use tokio::time::advance;

    use super::*;

    #[test]
    fn limiters_are_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<TokenBucket>();
        assert_send_sync::<SlidingWindow>();
        assert_send_sync::<AnyLimiter>();
        assert_send_sync::<KeyedLimiter<AnyLimiter>>();
    }

    #[tokio::test(start_paused = true)]
    async fn any_limiter_dispatches_to_the_chosen_algorithm() {
        let bucket = AnyLimiter::from(TokenBucket::try_new(1.0, 2).expect("valid bucket"));
        let window = AnyLimiter::from(
            SlidingWindow::try_new(2, Duration::from_secs(10)).expect("valid window"),
        );
        for limiter in [&bucket, &window] {
            let now = Instant::now();
            assert!(limiter.is_idle(now), "a new limiter is idle");
            assert!(limiter.try_acquire(now).is_allowed());
            assert!(limiter.try_acquire(now).is_allowed());
            assert!(
                !limiter.try_acquire(now).is_allowed(),
                "the third is over quota"
            );
            assert!(!limiter.is_idle(now), "a used limiter is not idle");
            let fresh = limiter.fresh(now);
            assert!(fresh.is_idle(now), "fresh() starts full");
            assert_eq!(fresh.quota(), limiter.quota(), "fresh() keeps the policy");
        }
        advance(Duration::from_secs(1)).await;
        assert!(
            bucket.try_acquire(Instant::now()).is_allowed(),
            "1/s refill"
        );
        assert!(
            !window.try_acquire(Instant::now()).is_allowed(),
            "the window still holds both admissions"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn clock_readings_before_the_epoch_count_as_the_epoch() {
        let before = Instant::now();
        advance(Duration::from_secs(1)).await;
        assert_eq!(nanos_since(Instant::now(), before), 0);
        assert_eq!(nanos_since(before, Instant::now()), 1_000_000_000);
    }
}
