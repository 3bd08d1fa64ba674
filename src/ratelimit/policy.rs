//! A policy's rate limits as the request path uses them: built from compiled settings, shared
//! across snapshots while the settings stay the same.

use std::net::IpAddr;
use std::time::Duration;

use http::HeaderMap;
use ipnet::IpNet;
use tokio::time::Instant;

use super::{
    AnyLimiter, ClientKey, Decision, KeyedLimiter, RateLimitError, RateLimitHeaders, SlidingWindow,
    TokenBucket,
};
use crate::config::resilience::{ClientKeySource, RateConfig, RateLimitConfig};
use crate::config::spec::RateLimitAlgorithm;

/// Which limit refused a request (the `scope` metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The policy-wide limit.
    Global,
    /// The per-client limit.
    PerClient,
}

impl Scope {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Global => "global",
            Scope::PerClient => "per_client",
        }
    }
}

/// A refusal: which limit, and the headers the 429 carries.
#[derive(Clone, Debug)]
pub struct Refusal {
    /// The limit that refused.
    pub scope: Scope,
    /// `Retry-After`, `RateLimit-Policy`, `RateLimit`.
    pub headers: Vec<(&'static str, String)>,
}

/// The limits of one policy.
pub struct PolicyLimits {
    global: Option<(AnyLimiter, RateLimitHeaders)>,
    per_client: Option<(KeyedLimiter<AnyLimiter>, RateLimitHeaders, ClientKeySource)>,
    /// Count but never reject.
    pub dry_run: bool,
    reported_evictions: std::sync::atomic::AtomicU64,
}

fn limiter(algorithm: RateLimitAlgorithm, rate: &RateConfig) -> Result<AnyLimiter, RateLimitError> {
    Ok(match algorithm {
        RateLimitAlgorithm::TokenBucket => {
            AnyLimiter::from(TokenBucket::try_new(rate.requests_per_second, rate.burst)?)
        }
        RateLimitAlgorithm::SlidingWindow => AnyLimiter::from(SlidingWindow::try_new(
            rate.burst,
            Duration::from_secs_f64(f64::from(rate.burst) / rate.requests_per_second),
        )?),
    })
}

impl PolicyLimits {
    /// Builds the limiters for `config`.
    pub fn try_new(config: &RateLimitConfig) -> Result<Self, RateLimitError> {
        use super::Limiter as _;
        let global = match &config.global {
            Some(rate) => {
                let l = limiter(config.algorithm, rate)?;
                let headers = RateLimitHeaders::try_new("global", l.quota())?;
                Some((l, headers))
            }
            None => None,
        };
        let per_client = match &config.per_client {
            Some((rate, key, max_keys)) => {
                let l = limiter(config.algorithm, rate)?;
                let headers = RateLimitHeaders::try_new("per-client", l.quota())?;
                let table = KeyedLimiter::try_new(l, *max_keys as usize)?;
                Some((table, headers, key.clone()))
            }
            None => None,
        };
        Ok(Self {
            global,
            per_client,
            dry_run: config.dry_run,
            reported_evictions: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Admits or refuses one request from `client_ip` with `headers` that arrived at `now` (an
    /// instant the caller has already read: a clock read costs more than a token bucket's
    /// arithmetic). The per-client limit is consulted first so one noisy client cannot spend
    /// the global allowance of everyone else.
    pub fn check(
        &self,
        client_ip: IpAddr,
        headers: &HeaderMap,
        now: Instant,
    ) -> Result<(), Refusal> {
        if let Some((table, rl_headers, source)) = &self.per_client {
            let key = match source {
                ClientKeySource::ClientIp { ipv6_prefix } => ClientKey::ip(client_ip, *ipv6_prefix),
                ClientKeySource::Header(name) => match headers.get(name) {
                    Some(value) => ClientKey::header(value.as_bytes()),
                    None => ClientKey::ip(client_ip, 64),
                },
            };
            let decision = table.try_acquire(&key, now);
            if let Decision::Deny { .. } = decision {
                return Err(Refusal {
                    scope: Scope::PerClient,
                    headers: rl_headers.for_decision(&decision),
                });
            }
        }
        if let Some((limiter, rl_headers)) = &self.global {
            use super::Limiter as _;
            let decision = limiter.try_acquire(now);
            if let Decision::Deny { .. } = decision {
                return Err(Refusal {
                    scope: Scope::Global,
                    headers: rl_headers.for_decision(&decision),
                });
            }
        }
        Ok(())
    }

    /// Drops idle per-client entries; returns (keys tracked, evictions since the last call).
    pub fn sweep(&self) -> Option<(usize, u64)> {
        let (table, _, _) = self.per_client.as_ref()?;
        table.sweep(Instant::now());
        let total = table.evictions();
        let before = self
            .reported_evictions
            .swap(total, std::sync::atomic::Ordering::Relaxed);
        Some((table.len(), total.saturating_sub(before)))
    }
}

/// The client address for rate limiting: the peer, or — when the peer is a trusted proxy — the
/// right-most address in `X-Forwarded-For` that is not itself a trusted proxy.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    if !trusted.iter().any(|net| net.contains(&peer)) {
        return peer;
    }
    let mut client = peer;
    let values: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    for value in values.iter().rev() {
        for hop in value.rsplit(',') {
            let Ok(ip) = hop.trim().parse::<IpAddr>() else {
                return client;
            };
            client = ip;
            if !trusted.iter().any(|net| net.contains(&ip)) {
                return client;
            }
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ip_walks_trusted_hops_from_the_right() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "203.0.113.9, 10.0.0.7".parse().unwrap());
        let peer: IpAddr = "10.1.1.1".parse().unwrap();
        assert_eq!(
            client_ip(peer, &h, &trusted),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        let stranger: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(
            client_ip(stranger, &h, &trusted),
            stranger,
            "untrusted peers are the client"
        );
        h.insert("x-forwarded-for", "garbage, 10.0.0.7".parse().unwrap());
        assert_eq!(
            client_ip(peer, &h, &trusted),
            "10.0.0.7".parse::<IpAddr>().unwrap()
        );
    }
}
