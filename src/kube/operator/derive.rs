//! What a policy's status should be, as a pure function of the policy and the cluster's
//! Services and EndpointSlices.
//!
//! Validation is the very `compile_policy` the file loader and the sidecar run, so a policy is
//! `Accepted` here exactly when a sidecar would take it.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::config::compile_policy;
use crate::config::spec::{API_VERSION, KIND, PolicyDocument, PolicyMetadata, PortRef};
use crate::kube::{BackendStatus, BackendsStatus, ResiliencePolicy, ResiliencePolicyStatus};

/// Condition type: the spec compiled.
pub const ACCEPTED: &str = "Accepted";
/// Condition type: every backend's reference resolved.
pub const RESOLVED_REFS: &str = "ResolvedRefs";
/// The label EndpointSlices carry naming their Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Condition messages are capped below the API's 32768-byte limit.
const MAX_MESSAGE: usize = 8192;

/// The cluster objects status derivation reads.
pub trait ClusterView {
    /// The Service `namespace/name`, if it exists.
    fn service(&self, namespace: &str, name: &str) -> Option<Arc<Service>>;
    /// The EndpointSlices labelled with Service `namespace/name`.
    fn endpoint_slices(&self, namespace: &str, service: &str) -> Vec<Arc<EndpointSlice>>;
}

/// A condition status change the operator reports as a Kubernetes Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// Condition type.
    pub type_: String,
    /// New status (`True`/`False`).
    pub status: String,
    /// New reason.
    pub reason: String,
    /// New message.
    pub message: String,
}

/// The policy as the file-format document `compile_policy` takes.
pub fn policy_document(policy: &ResiliencePolicy) -> PolicyDocument {
    PolicyDocument {
        api_version: API_VERSION.to_owned(),
        kind: KIND.to_owned(),
        metadata: PolicyMetadata {
            name: policy.metadata.name.clone().unwrap_or_default(),
            namespace: policy.metadata.namespace.clone(),
            labels: policy.metadata.labels.clone().unwrap_or_default(),
            annotations: policy.metadata.annotations.clone().unwrap_or_default(),
        },
        spec: policy.spec.clone(),
    }
}

/// The status the operator wants for `policy`. Conditions keep their `lastTransitionTime`
/// from `current` unless their status flips; flips are stamped `now` (whole seconds, what
/// the API stores, so a re-read compares equal).
pub fn desired_status(
    policy: &ResiliencePolicy,
    cluster: &impl ClusterView,
    current: Option<&ResiliencePolicyStatus>,
    now: Timestamp,
) -> ResiliencePolicyStatus {
    let generation = policy.metadata.generation;
    let namespace = policy.metadata.namespace.as_deref().unwrap_or("default");
    let accepted = match compile_policy(&policy_document(policy)) {
        Ok(_) => (true, "Valid", "the policy is valid".to_owned()),
        Err(errors) => {
            let message = errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            (false, "Invalid", message)
        }
    };
    let mut per_backend = Vec::with_capacity(policy.spec.backends.len());
    let mut unresolved: Vec<(&'static str, String)> = Vec::new();
    for (index, backend) in policy.spec.backends.iter().enumerate() {
        let (ready, total) = match &backend.service {
            Some(service_ref) => {
                let path = format!("spec.backends[{index}].service");
                let ns = service_ref.namespace.as_deref().unwrap_or(namespace);
                match resolve_service(cluster, ns, &service_ref.name, service_ref.port.as_ref()) {
                    Ok(counts) => counts,
                    Err((reason, why)) => {
                        unresolved.push((reason, format!("{path}: {why}")));
                        (0, 0)
                    }
                }
            }
            // URL and DNS backends are resolved by the sidecar at runtime; the operator counts
            // them as one ready endpoint so `ready/total` reads naturally.
            None => (1, 1),
        };
        per_backend.push(BackendStatus {
            name: backend.name.clone(),
            ready_endpoints: ready,
            endpoints: total,
        });
    }
    let resolved = match unresolved.first() {
        None => (
            true,
            "Resolved",
            format!("all {} backends resolved", per_backend.len()),
        ),
        Some((reason, _)) => (
            false,
            *reason,
            unresolved
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        ),
    };
    let now = Time(Timestamp::from_second(now.as_second()).unwrap_or(now));
    let condition = |type_: &str, (ok, reason, message): (bool, &str, String)| {
        let status = if ok { "True" } else { "False" };
        let previous = current.and_then(|s| s.conditions.iter().find(|c| c.type_ == type_));
        let last_transition_time = match previous {
            Some(p) if p.status == status => p.last_transition_time.clone(),
            _ => now.clone(),
        };
        Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message: truncate(message),
            observed_generation: generation,
            last_transition_time,
        }
    };
    let ready = per_backend.iter().filter(|b| b.ready_endpoints > 0).count();
    ResiliencePolicyStatus {
        observed_generation: generation,
        conditions: vec![
            condition(ACCEPTED, accepted),
            condition(RESOLVED_REFS, resolved),
        ],
        backends: Some(BackendsStatus {
            ready: count(ready),
            total: count(per_backend.len()),
            per_backend,
        }),
    }
}

/// Whether writing `desired` would change what `current` shows. Map lists (conditions,
/// backends) compare by key and only for the entries `desired` has: entries of other field
/// managers are theirs, and entries this manager dropped are removed by the apply itself.
pub fn needs_write(
    current: Option<&ResiliencePolicyStatus>,
    desired: &ResiliencePolicyStatus,
) -> bool {
    let Some(current) = current else {
        return true;
    };
    if current.observed_generation != desired.observed_generation {
        return true;
    }
    let conditions_differ = desired.conditions.iter().any(|want| {
        current
            .conditions
            .iter()
            .find(|c| c.type_ == want.type_)
            .is_none_or(|have| have != want)
    });
    let backends_differ = match (&current.backends, &desired.backends) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(have), Some(want)) => {
            have.ready != want.ready
                || have.total != want.total
                || want.per_backend.iter().any(|w| {
                    have.per_backend
                        .iter()
                        .find(|h| h.name == w.name)
                        .is_none_or(|h| h != w)
                })
        }
    };
    conditions_differ || backends_differ
}

/// The condition status changes from `current` to `desired` (a condition appearing counts).
pub fn transitions(
    current: Option<&ResiliencePolicyStatus>,
    desired: &ResiliencePolicyStatus,
) -> Vec<Transition> {
    desired
        .conditions
        .iter()
        .filter(|want| {
            current
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == want.type_))
                .is_none_or(|have| have.status != want.status)
        })
        .map(|c| Transition {
            type_: c.type_.clone(),
            status: c.status.clone(),
            reason: c.reason.clone(),
            message: c.message.clone(),
        })
        .collect()
}

/// Whether `desired` marks the policy accepted.
pub fn is_accepted(status: &ResiliencePolicyStatus) -> bool {
    status
        .conditions
        .iter()
        .any(|c| c.type_ == ACCEPTED && c.status == "True")
}

/// Whether `policy` has a `service:` backend naming Service `namespace/name`.
pub fn references_service(policy: &ResiliencePolicy, namespace: &str, name: &str) -> bool {
    let own = policy.metadata.namespace.as_deref().unwrap_or("default");
    policy.spec.backends.iter().any(|b| {
        b.service
            .as_ref()
            .is_some_and(|s| s.name == name && s.namespace.as_deref().unwrap_or(own) == namespace)
    })
}

/// Ready and total endpoints of a Service port, or why it does not resolve.
fn resolve_service(
    cluster: &impl ClusterView,
    namespace: &str,
    name: &str,
    port: Option<&PortRef>,
) -> Result<(i32, i32), (&'static str, String)> {
    let Some(service) = cluster.service(namespace, name) else {
        return Err((
            "ServiceNotFound",
            format!("Service {namespace}/{name} not found"),
        ));
    };
    let ports = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    let port_name = match port {
        Some(PortRef::Number(number)) => {
            match ports.iter().find(|p| p.port == i32::from(*number)) {
                Some(p) => p.name.clone(),
                None => {
                    return Err((
                        "PortNotFound",
                        format!("Service {namespace}/{name} has no port {number}"),
                    ));
                }
            }
        }
        Some(PortRef::Name(wanted)) => {
            if !ports
                .iter()
                .any(|p| p.name.as_deref() == Some(wanted.as_str()))
            {
                return Err((
                    "PortNotFound",
                    format!("Service {namespace}/{name} has no port named {wanted:?}"),
                ));
            }
            Some(wanted.clone())
        }
        None => match ports {
            [only] => only.name.clone(),
            _ => {
                return Err((
                    "PortNotFound",
                    format!(
                        "Service {namespace}/{name} has {} ports; name one in port",
                        ports.len()
                    ),
                ));
            }
        },
    };
    let mut ready = 0usize;
    let mut total = 0usize;
    for slice in cluster.endpoint_slices(namespace, name) {
        // A slice serves a Service port when it lists a port of that name (the empty name
        // for an unnamed single port); a slice with no ports list serves none.
        let serves = slice.ports.as_ref().is_some_and(|ports| {
            ports
                .iter()
                .any(|p| p.name.as_deref().unwrap_or("") == port_name.as_deref().unwrap_or(""))
        });
        if !serves {
            continue;
        }
        for endpoint in &slice.endpoints {
            total += 1;
            // The API documents an absent `ready` as ready.
            let is_ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            if is_ready {
                ready += 1;
            }
        }
    }
    Ok((count(ready), count(total)))
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn truncate(mut message: String) -> String {
    if message.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;

    #[derive(Default)]
    struct Fake {
        services: Vec<Arc<Service>>,
        slices: Vec<Arc<EndpointSlice>>,
    }

    impl ClusterView for Fake {
        fn service(&self, namespace: &str, name: &str) -> Option<Arc<Service>> {
            self.services
                .iter()
                .find(|s| {
                    s.metadata.namespace.as_deref() == Some(namespace)
                        && s.metadata.name.as_deref() == Some(name)
                })
                .cloned()
        }
        fn endpoint_slices(&self, namespace: &str, service: &str) -> Vec<Arc<EndpointSlice>> {
            self.slices
                .iter()
                .filter(|s| {
                    s.metadata.namespace.as_deref() == Some(namespace)
                        && s.metadata
                            .labels
                            .as_ref()
                            .and_then(|l: &BTreeMap<String, String>| l.get(SERVICE_NAME_LABEL))
                            .map(String::as_str)
                            == Some(service)
                })
                .cloned()
                .collect()
        }
    }

    fn policy(spec: serde_json::Value) -> ResiliencePolicy {
        serde_json::from_value(json!({
            "apiVersion": "breakwater.io/v1alpha1", "kind": "ResiliencePolicy",
            "metadata": {"name": "p", "namespace": "shop", "generation": 4},
            "spec": spec,
        }))
        .unwrap()
    }

    fn fake_with_payments(ready: &[bool]) -> Fake {
        let service: Service = serde_json::from_value(json!({
            "metadata": {"name": "payments", "namespace": "shop"},
            "spec": {"ports": [{"name": "http", "port": 80}]}
        }))
        .unwrap();
        let endpoints: Vec<_> = ready
            .iter()
            .enumerate()
            .map(|(i, r)| json!({"addresses": [format!("10.0.0.{i}")], "conditions": {"ready": r}}))
            .collect();
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "payments-abc", "namespace": "shop",
                         "labels": {SERVICE_NAME_LABEL: "payments"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": endpoints,
        }))
        .unwrap();
        Fake {
            services: vec![Arc::new(service)],
            slices: vec![Arc::new(slice)],
        }
    }

    fn condition<'a>(status: &'a ResiliencePolicyStatus, type_: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn a_valid_policy_with_a_resolved_service_is_accepted_with_counts() {
        let p = policy(json!({"backends": [
            {"name": "payments", "service": {"name": "payments", "port": "http"}},
            {"name": "local", "url": "http://127.0.0.1:3000"},
        ]}));
        let status = desired_status(
            &p,
            &fake_with_payments(&[true, false, true]),
            None,
            Timestamp::now(),
        );
        assert_eq!(status.observed_generation, Some(4));
        assert_eq!(condition(&status, ACCEPTED).status, "True");
        assert_eq!(condition(&status, RESOLVED_REFS).status, "True");
        assert_eq!(condition(&status, ACCEPTED).observed_generation, Some(4));
        let backends = status.backends.unwrap();
        assert_eq!((backends.ready, backends.total), (2, 2));
        assert_eq!(backends.per_backend[0].ready_endpoints, 2);
        assert_eq!(backends.per_backend[0].endpoints, 3);
    }

    #[test]
    fn an_invalid_policy_names_the_field_path() {
        let p = policy(
            json!({"backends": [{"name": "a", "url": "http://127.0.0.1:1"}],
                              "timeouts": {"connect": "banana"}}),
        );
        let status = desired_status(&p, &Fake::default(), None, Timestamp::now());
        let accepted = condition(&status, ACCEPTED);
        assert_eq!(
            (accepted.status.as_str(), accepted.reason.as_str()),
            ("False", "Invalid")
        );
        assert!(
            accepted
                .message
                .contains("spec.timeouts.connect: invalid duration \"banana\""),
            "expected the field path in {:?}",
            accepted.message
        );
    }

    #[test]
    fn a_missing_service_or_port_does_not_resolve() {
        let p = policy(json!({"backends": [
            {"name": "gone", "service": {"name": "gone"}},
            {"name": "payments", "service": {"name": "payments", "port": 9999}},
        ]}));
        let status = desired_status(&p, &fake_with_payments(&[true]), None, Timestamp::now());
        let refs = condition(&status, RESOLVED_REFS);
        assert_eq!(
            (refs.status.as_str(), refs.reason.as_str()),
            ("False", "ServiceNotFound")
        );
        assert!(
            refs.message
                .contains("spec.backends[0].service: Service shop/gone not found"),
            "{}",
            refs.message
        );
        assert!(
            refs.message
                .contains("spec.backends[1].service: Service shop/payments has no port 9999"),
            "{}",
            refs.message
        );
        assert_eq!(status.backends.unwrap().ready, 0);
    }

    #[test]
    fn transition_time_changes_only_when_the_status_flips() {
        let p = policy(json!({"backends": [{"name": "a", "url": "http://127.0.0.1:1"}]}));
        let earlier = Timestamp::from_second(1_000_000).unwrap();
        let first = desired_status(&p, &Fake::default(), None, earlier);
        let later = Timestamp::from_second(2_000_000).unwrap();
        let again = desired_status(&p, &Fake::default(), Some(&first), later);
        assert_eq!(again, first, "an unchanged policy derives the same status");
        assert!(!needs_write(Some(&first), &again));
        assert!(transitions(Some(&first), &again).is_empty());

        let bad = policy(json!({"backends": [{"name": "a", "url": "ftp://x"}]}));
        let flipped = desired_status(&bad, &Fake::default(), Some(&first), later);
        assert_eq!(condition(&flipped, ACCEPTED).last_transition_time.0, later);
        assert_eq!(
            condition(&flipped, RESOLVED_REFS).last_transition_time.0,
            earlier
        );
        assert!(needs_write(Some(&first), &flipped));
        let events = transitions(Some(&first), &flipped);
        assert_eq!(events.len(), 1, "only Accepted flipped: {events:?}");
        assert_eq!(events[0].type_, ACCEPTED);
    }

    #[test]
    fn entries_of_other_managers_do_not_force_a_write() {
        let p = policy(json!({"backends": [{"name": "a", "url": "http://127.0.0.1:1"}]}));
        let desired = desired_status(&p, &Fake::default(), None, Timestamp::now());
        let mut current = desired.clone();
        current.conditions.push(Condition {
            type_: "Other".into(),
            status: "True".into(),
            reason: "Theirs".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: Time(Timestamp::now()),
        });
        assert!(!needs_write(Some(&current), &desired));
        assert!(needs_write(None, &desired));
    }
}
