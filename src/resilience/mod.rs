//! Resilience mechanisms: circuit breakers, retry budgets and backoff, active health checks.
//! Pure state machines here; the forwarding path consults them.

pub mod backoff;
pub mod breaker;
pub mod budget;
