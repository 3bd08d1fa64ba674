//! Load-balancing algorithms over a policy's endpoints.
//!
//! Balancers are built once per snapshot and are lock-free: round robin and the weighted
//! schedule use one atomic cursor, the rest read the endpoints' atomic counters. A single
//! endpoint is chosen without touching either.

use std::sync::atomic::{AtomicUsize, Ordering};

use rand::Rng;

use crate::config::spec::Algorithm;
use crate::endpoint::EndpointState;

/// Longest precomputed weighted schedule; larger weight sums are scaled down proportionally.
const MAX_SCHEDULE: u64 = 4096;
/// Endpoint sets up to this size are scanned fully for least-connections; larger ones use two choices.
const FULL_SCAN_LIMIT: usize = 16;

/// Anything the balancer can choose among.
pub trait Candidate {
    /// The endpoint's shared state.
    fn state(&self) -> &EndpointState;
    /// Whether it may take a new request now (health, breaker).
    fn admissible(&self) -> bool;
}

/// Chooses an endpoint per request.
#[derive(Debug)]
pub struct Balancer {
    algorithm: Algorithm,
    cursor: AtomicUsize,
    /// Smooth weighted round robin, unrolled: endpoint indices in the order nginx's SWRR visits them.
    schedule: Vec<u32>,
}

impl Balancer {
    /// A balancer for endpoints with these `weights` (used by `Weighted` only).
    pub fn new(algorithm: Algorithm, weights: &[u32]) -> Self {
        let schedule = if algorithm == Algorithm::Weighted {
            smooth_weighted_schedule(weights)
        } else {
            Vec::new()
        };
        Self {
            algorithm,
            cursor: AtomicUsize::new(0),
            schedule,
        }
    }

    /// The algorithm in use.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Picks an admissible endpoint, preferring ones not in `tried`; `None` when none is admissible.
    pub fn pick<C: Candidate>(&self, endpoints: &[C], tried: &[usize]) -> Option<usize> {
        self.pick_filtered(endpoints, |i| !tried.contains(&i))
            .or_else(|| self.pick_filtered(endpoints, |_| true))
    }

    fn pick_filtered<C: Candidate>(
        &self,
        endpoints: &[C],
        allowed: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = endpoints.len();
        if n == 0 {
            return None;
        }
        let eligible = |i: usize| allowed(i) && endpoints[i].admissible();
        // A sidecar usually fronts one endpoint, the app beside it: every algorithm would
        // choose it, so the shared cursor (a locked read-modify-write) is left alone.
        if n == 1 {
            return eligible(0).then_some(0);
        }
        match self.algorithm {
            Algorithm::RoundRobin => {
                let start = self.cursor.fetch_add(1, Ordering::Relaxed);
                (0..n).map(|k| (start + k) % n).find(|&i| eligible(i))
            }
            Algorithm::Random => {
                let start = rand::rng().random_range(0..n);
                (0..n).map(|k| (start + k) % n).find(|&i| eligible(i))
            }
            Algorithm::Weighted => {
                let len = self.schedule.len();
                if len == 0 {
                    return None;
                }
                let start = self.cursor.fetch_add(1, Ordering::Relaxed);
                (0..len)
                    .map(|k| self.schedule[(start + k) % len] as usize)
                    .find(|&i| i < n && eligible(i))
            }
            Algorithm::LeastConnections => {
                if n > FULL_SCAN_LIMIT {
                    return self.two_choices(endpoints, &eligible, |e| f64::from(e.in_flight()));
                }
                // Rotate the scan start so ties spread instead of always hitting the first endpoint.
                let start = self.cursor.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|k| (start + k) % n)
                    .filter(|&i| eligible(i))
                    .min_by_key(|&i| endpoints[i].state().in_flight())
            }
            Algorithm::PeakEwma => self.two_choices(endpoints, &eligible, EndpointState::load_cost),
        }
    }

    /// Power of two choices: two distinct random eligible endpoints, the cheaper one wins.
    fn two_choices<C: Candidate>(
        &self,
        endpoints: &[C],
        eligible: &impl Fn(usize) -> bool,
        cost: impl Fn(&EndpointState) -> f64,
    ) -> Option<usize> {
        let n = endpoints.len();
        let mut rng = rand::rng();
        let first_start = rng.random_range(0..n);
        let a = (0..n)
            .map(|k| (first_start + k) % n)
            .find(|&i| eligible(i))?;
        // A second, different eligible endpoint, starting from an independent random offset.
        let offset = if n > 1 { rng.random_range(1..n) } else { 0 };
        let b = (0..n)
            .map(|k| (a + offset + k) % n)
            .find(|&i| i != a && eligible(i));
        match b {
            Some(b) if cost(endpoints[b].state()) < cost(endpoints[a].state()) => Some(b),
            _ => Some(a),
        }
    }
}

/// nginx's smooth weighted round robin, run once to produce a fixed visiting order.
fn smooth_weighted_schedule(weights: &[u32]) -> Vec<u32> {
    if weights.is_empty() {
        return Vec::new();
    }
    let divisor = weights.iter().copied().fold(0, gcd).max(1);
    let mut scaled: Vec<u64> = weights
        .iter()
        .map(|&w| u64::from(w.max(1) / divisor))
        .collect();
    let total: u64 = scaled.iter().sum();
    if total > MAX_SCHEDULE {
        for w in &mut scaled {
            *w = (*w * MAX_SCHEDULE / total).max(1);
        }
    }
    let total: i64 = scaled.iter().map(|&w| w as i64).sum();
    let mut current = vec![0i64; scaled.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, w) in scaled.iter().enumerate() {
            current[i] += *w as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        schedule.push(best as u32);
    }
    schedule
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::compile::PolicyId;
    use crate::endpoint::{EndpointKey, EndpointRegistry, Health};
    use crate::metrics::Metrics;
    use std::sync::Arc;

    struct Only(Arc<EndpointState>);

    impl Candidate for Only {
        fn state(&self) -> &EndpointState {
            &self.0
        }
        fn admissible(&self) -> bool {
            self.0.is_admissible(None)
        }
    }

    #[test]
    fn a_lone_endpoint_is_chosen_while_admissible_without_moving_the_cursor() {
        let registry = EndpointRegistry::new(Arc::new(Metrics::new().unwrap()));
        let only = [Only(registry.get_or_create(EndpointKey {
            policy: PolicyId {
                namespace: "default".into(),
                name: "lone".into(),
            },
            backend: "app".into(),
            address: "127.0.0.1:1".into(),
        }))];
        for algorithm in [
            Algorithm::RoundRobin,
            Algorithm::Random,
            Algorithm::Weighted,
            Algorithm::LeastConnections,
            Algorithm::PeakEwma,
        ] {
            let balancer = Balancer::new(algorithm, &[3]);
            only[0].0.set_health(Health::Healthy);
            for _ in 0..3 {
                assert_eq!(balancer.pick(&only, &[]), Some(0), "{algorithm:?}");
                // Already tried: the second pass still offers it (a retry may go back to it).
                assert_eq!(balancer.pick(&only, &[0]), Some(0), "{algorithm:?}");
            }
            assert_eq!(balancer.cursor.load(Ordering::Relaxed), 0, "{algorithm:?}");
            only[0].0.set_health(Health::Unhealthy);
            assert_eq!(balancer.pick(&only, &[]), None, "{algorithm:?}");
        }
    }

    #[test]
    fn smooth_schedule_interleaves_by_weight() {
        assert_eq!(
            smooth_weighted_schedule(&[5, 1, 1]),
            vec![0, 0, 1, 0, 2, 0, 0]
        );
        assert_eq!(smooth_weighted_schedule(&[1, 3]), vec![1, 0, 1, 1]);
        assert_eq!(smooth_weighted_schedule(&[2, 2]), vec![0, 1]);
    }

    #[test]
    fn huge_weights_are_scaled_not_unrolled() {
        let schedule = smooth_weighted_schedule(&[1_000_000, 1]);
        assert!(
            schedule.len() as u64 <= MAX_SCHEDULE + 1,
            "{}",
            schedule.len()
        );
        assert!(
            schedule.contains(&1),
            "the light endpoint must still appear"
        );
    }
}
