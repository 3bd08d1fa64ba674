//! Kubernetes integration: the `ResiliencePolicy` custom resource, its status, the CRD, the
//! sidecar's config source (`sidecar`), and the leader-elected operator that writes that
//! status (`operator`, `lease`).
//!
//! Inside this module the external crate is always written `::kube`, so it never reads as this
//! module. The data plane (`proxy`, `resilience`, `balance`, `ratelimit`, `cache`) never
//! imports anything from here.

pub mod crd;
pub mod lease;
pub mod operator;
pub mod sidecar;
pub mod status;

pub use crate::config::spec::ResiliencePolicy;
pub use crd::{crd, crd_yaml};
pub use status::{BackendStatus, BackendsStatus, ResiliencePolicyStatus};
