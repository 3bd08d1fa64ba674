//! The `RateLimit-Policy`, `RateLimit` and `Retry-After` response fields for a [`Decision`], in
//! the structured-field form of draft-ietf-httpapi-ratelimit-headers-08 and later.
//!
//! ```text
//! RateLimit-Policy: "<name>";q=<limit>;w=<window seconds>
//! RateLimit: "<name>";r=<remaining>;t=<seconds until reset>
//! Retry-After: <seconds>                                   (denials only)
//! ```
//!
//! Seconds are whole (the draft has no sub-second precision) and always rounded up, so a client
//! that waits what it is told never arrives early, and a window advertised as `w` is never
//! shorter than the real one: `q` per `w` stays a rate the limiter admits. On a denial `t` and
//! `Retry-After` name the same moment, as the draft asks, and are at least 1. Field names are
//! lowercase, ready for `http::HeaderName::from_static`.

use std::time::Duration;

use super::{Decision, Quota, RateLimitError};

/// The `RateLimit-Policy` field name.
pub const RATELIMIT_POLICY: &str = "ratelimit-policy";
/// The `RateLimit` field name.
pub const RATELIMIT: &str = "ratelimit";
/// The `Retry-After` field name.
pub const RETRY_AFTER: &str = "retry-after";

/// Formats the rate-limit fields of one named policy. Build it once per policy (it validates
/// and pre-formats), then call [`for_decision`](Self::for_decision) per response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimitHeaders {
    /// The name as a structured-field String: quoted and escaped.
    name: String,
    /// The whole `RateLimit-Policy` value.
    policy: String,
}

impl RateLimitHeaders {
    /// Fields for the policy `name` with `quota` (from [`Limiter::quota`](super::Limiter::quota)).
    /// `name` must be non-empty printable ASCII (`"` and `\` are escaped).
    pub fn try_new(name: &str, quota: Quota) -> Result<Self, RateLimitError> {
        if name.is_empty() || !name.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
            return Err(RateLimitError::InvalidPolicyName(name.to_owned()));
        }
        let mut quoted = String::with_capacity(name.len() + 2);
        quoted.push('"');
        for c in name.chars() {
            if c == '"' || c == '\\' {
                quoted.push('\\');
            }
            quoted.push(c);
        }
        quoted.push('"');
        // A window is never zero, but a sub-second one must not be advertised as `w=0`.
        let window = ceil_secs(quota.window).max(1);
        let policy = format!("{quoted};q={};w={window}", quota.limit);
        Ok(Self {
            name: quoted,
            policy,
        })
    }

    /// The `RateLimit-Policy` field alone.
    pub fn policy(&self) -> (&'static str, String) {
        (RATELIMIT_POLICY, self.policy.clone())
    }

    /// The fields for a response after `decision`: `RateLimit-Policy` and `RateLimit`, plus
    /// `Retry-After` when the request was denied.
    pub fn for_decision(&self, decision: &Decision) -> Vec<(&'static str, String)> {
        match *decision {
            Decision::Allow { remaining, reset } => vec![
                self.policy(),
                (
                    RATELIMIT,
                    format!("{};r={remaining};t={}", self.name, ceil_secs(reset)),
                ),
            ],
            Decision::Deny { retry_after } => {
                let secs = ceil_secs(retry_after).max(1);
                vec![
                    self.policy(),
                    (RATELIMIT, format!("{};r=0;t={secs}", self.name)),
                    (RETRY_AFTER, secs.to_string()),
                ]
            }
        }
    }
}

/// Whole seconds, rounded up.
fn ceil_secs(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;
    use crate::ratelimit::{Limiter, SlidingWindow, TokenBucket};

    fn headers(name: &str, limit: u32, window: Duration) -> RateLimitHeaders {
        RateLimitHeaders::try_new(name, Quota { limit, window }).expect("valid policy")
    }

    fn fields(pairs: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
        pairs.iter().map(|&(n, v)| (n, v.to_owned())).collect()
    }

    #[test]
    fn allow_carries_policy_and_remaining() {
        let headers = headers("per-client", 100, Duration::from_secs(60));
        let decision = Decision::Allow {
            remaining: 42,
            reset: Duration::from_millis(12_300),
        };
        assert_eq!(
            headers.for_decision(&decision),
            fields(&[
                (RATELIMIT_POLICY, "\"per-client\";q=100;w=60"),
                (RATELIMIT, "\"per-client\";r=42;t=13"),
            ]),
            "t rounds 12.3 s up"
        );
    }

    #[test]
    fn deny_adds_retry_after_rounded_up_and_at_least_one() {
        let headers = headers("global", 10, Duration::from_secs(2));
        for (retry_after, secs) in [
            (Duration::from_nanos(1), "1"),
            (Duration::from_millis(200), "1"),
            (Duration::from_secs(1), "1"),
            (Duration::from_millis(1_001), "2"),
            (Duration::from_secs(2), "2"),
        ] {
            let decision = Decision::Deny { retry_after };
            assert_eq!(
                headers.for_decision(&decision),
                fields(&[
                    (RATELIMIT_POLICY, "\"global\";q=10;w=2"),
                    (RATELIMIT, &format!("\"global\";r=0;t={secs}")),
                    (RETRY_AFTER, secs),
                ]),
                "retry after {retry_after:?}: t and Retry-After agree"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn policies_of_both_limiters() {
        let bucket = TokenBucket::try_new(5.0, 10).expect("valid bucket");
        let headers = RateLimitHeaders::try_new("api", bucket.quota()).expect("valid policy");
        assert_eq!(
            headers.policy(),
            (RATELIMIT_POLICY, "\"api\";q=10;w=2".to_owned()),
            "a bucket advertises its burst per refill time"
        );
        let decision = bucket.try_acquire(Instant::now());
        assert_eq!(
            headers.for_decision(&decision)[1],
            (RATELIMIT, "\"api\";r=9;t=1".to_owned()),
            "200 ms to refill rounds up to 1 s"
        );

        let fast = TokenBucket::try_new(100.0, 20).expect("valid bucket");
        let headers = RateLimitHeaders::try_new("fast", fast.quota()).expect("valid policy");
        assert_eq!(
            headers.policy().1,
            "\"fast\";q=20;w=1",
            "a 200 ms refill time is advertised as 1 s, never 0"
        );

        let window = SlidingWindow::try_new(100, Duration::from_secs(60)).expect("valid window");
        let headers = RateLimitHeaders::try_new("window", window.quota()).expect("valid policy");
        assert_eq!(headers.policy().1, "\"window\";q=100;w=60");
    }

    #[test]
    fn names_are_escaped_or_rejected() {
        let headers = headers(r#"a "b" \c"#, 1, Duration::from_secs(1));
        assert_eq!(headers.policy().1, r#""a \"b\" \\c";q=1;w=1"#);
        for bad in ["", "tab\there", "naïve", "new\nline"] {
            assert_eq!(
                RateLimitHeaders::try_new(
                    bad,
                    Quota {
                        limit: 1,
                        window: Duration::from_secs(1)
                    }
                ),
                Err(RateLimitError::InvalidPolicyName(bad.to_owned())),
                "{bad:?} is not a structured-field string"
            );
        }
    }
}
