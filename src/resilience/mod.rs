//! Resilience mechanisms: circuit breakers, retry budgets and backoff, active health checks.
//! Pure state machines (breaker, budget, backoff) the forwarding path consults, and the active
//! health checker tasks that feed endpoint health.

pub mod backoff;
pub mod breaker;
pub mod budget;
pub mod health;
