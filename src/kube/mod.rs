//! Kubernetes integration: the `ResiliencePolicy` custom resource, its status, the CRD, the
//! sidecar's config source (`sidecar`), the leader-elected operator that writes that status
//! (`operator`, `lease`), and the sidecar injection its webhook serves (`inject`).
//!
//! Inside this module the external crate is always written `::kube`, so it never reads as this
//! module. The data plane (`proxy`, `resilience`, `balance`, `ratelimit`, `cache`) never
//! imports anything from here.

pub mod crd;
pub mod inject;
pub mod lease;
pub mod operator;
pub mod sidecar;
pub mod status;

pub use crate::config::spec::ResiliencePolicy;
pub use crd::{crd, crd_yaml};
pub use status::{BackendStatus, BackendsStatus, ResiliencePolicyStatus};
