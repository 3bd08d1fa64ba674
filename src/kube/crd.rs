//! The `ResiliencePolicy` CustomResourceDefinition, generated from the Rust types.
//!
//! `crds/resiliencepolicy.yaml` is this module's output (`breakwater crd`), checked in and
//! compared against the types by `tests/crd.rs`.

use ::kube::CustomResourceExt;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use thiserror::Error;

use crate::config::spec::ResiliencePolicy;

/// The CRD could not be rendered as YAML.
#[derive(Debug, Error)]
#[error("rendering the CustomResourceDefinition as YAML")]
pub struct CrdError(#[source] serde_saphyr::ser_error::Error);

/// The `resiliencepolicies.breakwater.io` CustomResourceDefinition.
pub fn crd() -> CustomResourceDefinition {
    ResiliencePolicy::crd()
}

/// [`crd`] as one YAML document, the form `kubectl apply -f` takes and `crds/` holds.
pub fn crd_yaml() -> Result<String, CrdError> {
    serde_saphyr::to_string(&crd()).map_err(CrdError)
}
