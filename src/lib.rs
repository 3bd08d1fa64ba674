//! Breakwater: a resilience sidecar proxy.
//!
//! The crate is one library with clear rooms: `config` (the policy model both halves speak),
//! the data plane (`proxy`, `balance`, `endpoint`, `snapshot`), `admin`, `metrics`, and `app`
//! which wires the standalone proxy together, and `kube` (the CRD and its status). The data
//! plane never depends on Kubernetes.

pub mod accesslog;
pub mod admin;
pub mod app;
mod ascii;
pub mod balance;
pub mod cache;
pub mod clock;
pub mod config;
pub mod demo;
pub mod endpoint;
pub mod kube;
pub mod logwriter;
pub mod metrics;
pub mod proxy;
pub mod ratelimit;
pub mod resilience;
pub mod snapshot;
mod sync;
