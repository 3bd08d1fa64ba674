//! Instants as `u64` nanoseconds since one process-wide epoch.
//!
//! The request path reads the clock twice (request head, response head) and uses each instant
//! for several things: the latency estimate, the latency histogram, the retry budget's window,
//! the breaker's window. Converting each instant once and working in integers from there saves
//! an `Instant` subtraction (which normalises seconds and nanoseconds) and `Duration`'s `u128`
//! arithmetic at every use.

use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::Instant;

/// How far before its first use the epoch is put. Instants read before the first call (a
/// request's start, or a paused test clock that began earlier) still land after it, so no
/// conversion ever saturates at zero in practice.
const EPOCH_LEAD: Duration = Duration::from_secs(24 * 60 * 60);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(|| {
        let now = Instant::now();
        now.checked_sub(EPOCH_LEAD).unwrap_or(now)
    })
}

/// Nanoseconds from the epoch to `at` (0 for an instant before it). Uses tokio's clock, so
/// paused-time tests control it.
pub fn nanos_since_epoch(at: Instant) -> u64 {
    duration_nanos(at.saturating_duration_since(epoch()))
}

/// [`nanos_since_epoch`] of now.
pub fn now_nanos() -> u64 {
    nanos_since_epoch(Instant::now())
}

/// `d` in nanoseconds, saturating at `u64::MAX` (about 584 years), without `u128` arithmetic.
pub fn duration_nanos(d: Duration) -> u64 {
    d.as_secs()
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::from(d.subsec_nanos()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_nanos_matches_u128_and_saturates() {
        for d in [
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::new(3, 999_999_999),
            Duration::from_secs(86_400 * 365),
            Duration::from_nanos(u64::MAX),
        ] {
            assert_eq!(u128::from(duration_nanos(d)), d.as_nanos(), "{d:?}");
        }
        assert_eq!(duration_nanos(Duration::MAX), u64::MAX);
        assert_eq!(
            duration_nanos(Duration::from_nanos(u64::MAX) + Duration::from_nanos(1)),
            u64::MAX
        );
    }

    #[test]
    fn instants_convert_in_order_and_by_their_distance() {
        let earlier = Instant::now();
        let later = earlier + Duration::from_millis(1500);
        let (a, b) = (nanos_since_epoch(earlier), nanos_since_epoch(later));
        assert!(
            a > 0,
            "an instant read before the epoch's first use is after it"
        );
        assert_eq!(b - a, 1_500_000_000);
        assert!(now_nanos() >= a);
    }
}
