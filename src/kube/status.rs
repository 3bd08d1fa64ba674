//! `ResiliencePolicy.status`: written only by the operator, by server-side apply.

use ::kube::KubeSchema;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use serde::{Deserialize, Serialize};

/// What the operator last observed about a policy.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResiliencePolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted` (the spec compiled) and `ResolvedRefs` (every backend resolved).
    // A map list keyed by `type`, so server-side apply merges conditions of different owners
    // instead of one manager's list replacing the other's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Ready and total backends, overall and per backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backends: Option<BackendsStatus>,
}

/// Backend readiness of one policy.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendsStatus {
    /// Backends with at least one ready endpoint.
    #[schemars(range(min = 0))]
    pub ready: i32,
    /// Backends in the spec.
    #[schemars(range(min = 0))]
    pub total: i32,
    /// One entry per backend, keyed by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub per_backend: Vec<BackendStatus>,
}

/// Endpoint readiness of one backend.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendStatus {
    /// The backend's name in the spec.
    pub name: String,
    /// Endpoints that take traffic.
    #[schemars(range(min = 0))]
    pub ready_endpoints: i32,
    /// Endpoints known, ready or not.
    #[schemars(range(min = 0))]
    pub endpoints: i32,
}
