//! Capped exponential backoff with jitter, the delay a retry waits before its next attempt.
//!
//! The un-jittered delay before retry `n` (1-based) is `min(max, initial × multiplier^(n-1))`;
//! jitter then spreads it so that clients that failed together do not retry together.

use std::time::Duration;

use rand::Rng;

/// How a delay is spread around its base value `d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JitterMode {
    /// Uniform in `[0, d]`: the best at de-synchronising clients, the shortest on average.
    Full,
    /// Uniform in `[d/2, d]`: keeps at least half the backoff.
    Equal,
    /// Exactly `d`.
    None,
}

/// A validated backoff schedule; build it with [`Backoff::try_new`].
#[derive(Clone, Debug, PartialEq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    multiplier: f64,
    jitter: JitterMode,
}

/// Why a backoff configuration was rejected.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BackoffError {
    /// The initial delay is zero, so the delay would never grow.
    #[error("initial backoff must be greater than zero")]
    ZeroInitial,
    /// The cap is zero.
    #[error("maximum backoff must be greater than zero")]
    ZeroMax,
    /// The initial delay is above the cap.
    #[error("initial backoff {initial:?} must not exceed the maximum {max:?}")]
    InitialExceedsMax {
        /// The configured initial delay.
        initial: Duration,
        /// The configured cap.
        max: Duration,
    },
    /// The multiplier is below 1.0, NaN or infinite.
    #[error("backoff multiplier must be a finite number of at least 1.0, got {0}")]
    InvalidMultiplier(f64),
}

impl Backoff {
    /// Validating constructor (like linkerd's exp-backoff `try_new`): `initial` and `max` must be
    /// non-zero with `initial <= max`, and `multiplier` finite and at least 1.0.
    pub fn try_new(
        initial: Duration,
        max: Duration,
        multiplier: f64,
        jitter: JitterMode,
    ) -> Result<Self, BackoffError> {
        if max.is_zero() {
            return Err(BackoffError::ZeroMax);
        }
        if initial.is_zero() {
            return Err(BackoffError::ZeroInitial);
        }
        if initial > max {
            return Err(BackoffError::InitialExceedsMax { initial, max });
        }
        if !multiplier.is_finite() || multiplier < 1.0 {
            return Err(BackoffError::InvalidMultiplier(multiplier));
        }
        Ok(Self {
            initial,
            max,
            multiplier,
            jitter,
        })
    }

    /// The delay before the first retry.
    pub fn initial(&self) -> Duration {
        self.initial
    }

    /// The cap on every delay.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The growth factor between consecutive retries.
    pub fn multiplier(&self) -> f64 {
        self.multiplier
    }

    /// How delays are jittered.
    pub fn jitter(&self) -> JitterMode {
        self.jitter
    }

    /// Un-jittered delay before retry number `retry` (1-based: the delay before the 2nd attempt
    /// is retry 1; 0 is treated as 1): `min(max, initial × multiplier^(retry-1))`. Never
    /// overflows or panics, however large `retry` is.
    pub fn base_delay(&self, retry: u32) -> Duration {
        let exponent = f64::from(retry.saturating_sub(1));
        // Nanoseconds rather than seconds so integral results (25ms × 2^3) come out exact.
        let nanos = self.initial.as_nanos() as f64 * self.multiplier.powf(exponent);
        if nanos.is_finite() && nanos < self.max.as_nanos() as f64 {
            // The float-to-int cast saturates, and the `min` keeps rounding from crossing the cap.
            Duration::from_nanos(nanos.round() as u64).min(self.max)
        } else {
            self.max
        }
    }

    /// The delay before retry number `retry` (as in [`Backoff::base_delay`]), jittered by this
    /// schedule's [`JitterMode`] with randomness drawn from `rng`.
    pub fn delay<R: Rng + ?Sized>(&self, retry: u32, rng: &mut R) -> Duration {
        let base = self.base_delay(retry);
        // Delays beyond u64 nanoseconds (584 years) only arise from absurd caps; clamping is fine.
        let nanos = u64::try_from(base.as_nanos()).unwrap_or(u64::MAX);
        match self.jitter {
            JitterMode::Full => Duration::from_nanos(rng.random_range(0..=nanos)),
            JitterMode::Equal => {
                let half = nanos / 2;
                Duration::from_nanos(half + rng.random_range(0..=nanos - half))
            }
            JitterMode::None => base,
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    use super::*;

    const DRAWS: usize = 10_000;

    fn backoff(jitter: JitterMode) -> Backoff {
        Backoff::try_new(
            Duration::from_millis(25),
            Duration::from_secs(1),
            2.0,
            jitter,
        )
        .expect("the design's default backoff is valid")
    }

    #[test]
    fn base_delay_grows_geometrically_then_caps() {
        let backoff = backoff(JitterMode::None);
        let expected = [25, 50, 100, 200, 400, 800, 1000, 1000];
        for (retry, millis) in (1..).zip(expected) {
            assert_eq!(
                backoff.base_delay(retry),
                Duration::from_millis(millis),
                "retry {retry} should wait {millis}ms"
            );
        }
        assert_eq!(
            backoff.base_delay(0),
            backoff.base_delay(1),
            "retry 0 is treated as the first retry"
        );
    }

    #[test]
    fn base_delay_handles_fractional_and_unit_multipliers() {
        let backoff = Backoff::try_new(
            Duration::from_millis(100),
            Duration::from_secs(1),
            1.5,
            JitterMode::None,
        )
        .expect("valid");
        assert_eq!(backoff.base_delay(2), Duration::from_millis(150));
        assert_eq!(backoff.base_delay(3), Duration::from_millis(225));

        let constant = Backoff::try_new(
            Duration::from_millis(100),
            Duration::from_secs(1),
            1.0,
            JitterMode::None,
        )
        .expect("valid");
        assert_eq!(
            constant.base_delay(u32::MAX),
            Duration::from_millis(100),
            "a multiplier of 1.0 keeps the delay constant"
        );
    }

    #[test]
    fn base_delay_does_not_overflow_for_huge_retry_numbers() {
        for max in [Duration::from_secs(1), Duration::MAX] {
            let backoff =
                Backoff::try_new(Duration::from_millis(25), max, 1000.0, JitterMode::Full)
                    .expect("valid");
            assert_eq!(
                backoff.base_delay(u32::MAX),
                max,
                "retry u32::MAX must saturate at the cap"
            );
            let mut rng = SmallRng::seed_from_u64(7);
            assert!(backoff.delay(u32::MAX, &mut rng) <= max);
        }
    }

    #[test]
    fn full_jitter_stays_within_zero_and_base() {
        let backoff = backoff(JitterMode::Full);
        let mut rng = SmallRng::seed_from_u64(1);
        for retry in 1..=8 {
            let base = backoff.base_delay(retry);
            for _ in 0..DRAWS {
                let delay = backoff.delay(retry, &mut rng);
                assert!(
                    delay <= base,
                    "full jitter {delay:?} must be within [0, {base:?}]"
                );
            }
        }
    }

    #[test]
    fn equal_jitter_stays_within_half_and_base() {
        let backoff = backoff(JitterMode::Equal);
        let mut rng = SmallRng::seed_from_u64(2);
        for retry in 1..=8 {
            let base = backoff.base_delay(retry);
            for _ in 0..DRAWS {
                let delay = backoff.delay(retry, &mut rng);
                assert!(
                    base / 2 <= delay && delay <= base,
                    "equal jitter {delay:?} must be within [{:?}, {base:?}]",
                    base / 2
                );
            }
        }
    }

    #[test]
    fn no_jitter_is_exactly_the_base_delay() {
        let backoff = backoff(JitterMode::None);
        let mut rng = SmallRng::seed_from_u64(3);
        for retry in 1..=8 {
            for _ in 0..100 {
                assert_eq!(backoff.delay(retry, &mut rng), backoff.base_delay(retry));
            }
        }
    }

    #[test]
    fn full_jitter_mean_is_about_half_the_base() {
        let backoff = backoff(JitterMode::Full);
        let mut rng = SmallRng::seed_from_u64(4);
        let base = backoff.base_delay(4).as_secs_f64();
        let total: f64 = (0..DRAWS)
            .map(|_| backoff.delay(4, &mut rng).as_secs_f64())
            .sum();
        let mean = total / DRAWS as f64;
        assert!(
            (0.45 * base..=0.55 * base).contains(&mean),
            "full jitter mean {mean}s should be about half of {base}s"
        );
    }

    #[test]
    fn jitter_actually_varies() {
        let mut rng = SmallRng::seed_from_u64(5);
        for mode in [JitterMode::Full, JitterMode::Equal] {
            let backoff = backoff(mode);
            let first = backoff.delay(3, &mut rng);
            assert!(
                (0..100).any(|_| backoff.delay(3, &mut rng) != first),
                "{mode:?} jitter must spread delays"
            );
        }
    }

    #[test]
    fn try_new_rejects_bad_input() {
        let ms = Duration::from_millis;
        assert_eq!(
            Backoff::try_new(ms(25), Duration::ZERO, 2.0, JitterMode::Full),
            Err(BackoffError::ZeroMax)
        );
        assert_eq!(
            Backoff::try_new(Duration::ZERO, ms(25), 2.0, JitterMode::Full),
            Err(BackoffError::ZeroInitial)
        );
        assert_eq!(
            Backoff::try_new(ms(2000), ms(1000), 2.0, JitterMode::Full),
            Err(BackoffError::InitialExceedsMax {
                initial: ms(2000),
                max: ms(1000)
            })
        );
        for multiplier in [0.5, -1.0, 0.0, f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(
                Backoff::try_new(ms(25), ms(1000), multiplier, JitterMode::Full),
                Err(BackoffError::InvalidMultiplier(multiplier)),
                "multiplier {multiplier} must be rejected"
            );
        }
        assert!(
            matches!(
                Backoff::try_new(ms(25), ms(1000), f64::NAN, JitterMode::Full),
                Err(BackoffError::InvalidMultiplier(m)) if m.is_nan()
            ),
            "a NaN multiplier must be rejected"
        );
    }

    #[test]
    fn try_new_accepts_edge_values() {
        let ms = Duration::from_millis;
        let backoff =
            Backoff::try_new(ms(500), ms(500), 1.0, JitterMode::Equal).expect("initial == max");
        assert_eq!(backoff.initial(), ms(500));
        assert_eq!(backoff.max(), ms(500));
        assert_eq!(backoff.multiplier(), 1.0);
        assert_eq!(backoff.jitter(), JitterMode::Equal);
    }
}
