//! What the sidecar knows about the cluster, and the configuration derived from it.
//!
//! The index is plain state fed by watch events (whole-set replacements after a (re)list,
//! single applies and deletes); [`Index::derive`] turns it into the policies this pod serves and
//! the addresses of their `service:` backends. No I/O happens here, so it is tested with
//! synthetic events.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::endpoints;
use super::selector;
use crate::config::FieldError;
use crate::config::compile::{BackendTarget, PolicyConfig, PolicyId, compile_policy};
use crate::config::spec::{API_VERSION, KIND, PolicyDocument, PolicyMetadata};
use crate::kube::ResiliencePolicy;
use crate::snapshot::Resolutions;

/// A Service whose EndpointSlices are watched.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
}

impl std::fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A policy that selects this pod but does not compile.
#[derive(Clone, Debug, PartialEq)]
pub struct Invalid {
    /// The policy.
    pub policy: PolicyId,
    /// Its `metadata.generation` (what a report is deduplicated by).
    pub generation: Option<i64>,
    /// Every invalid field.
    pub errors: Vec<FieldError>,
    /// Whether its last accepted configuration keeps serving in its place.
    pub serving_previous: bool,
}

/// A policy that lost its listener port to an older one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// The policy left out.
    pub policy: PolicyId,
    /// The older policy that keeps the port.
    pub winner: PolicyId,
    /// The contested port.
    pub port: u16,
}

/// What this pod should serve now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Derived {
    /// The policies to serve, oldest first (creation time, then name).
    pub configs: Vec<PolicyConfig>,
    /// Addresses of every `service:` backend of `configs`.
    pub resolutions: Resolutions,
    /// The Services `configs` refer to (whose EndpointSlices must be watched).
    pub services: BTreeSet<ServiceKey>,
    /// Selecting policies that do not compile.
    pub invalid: Vec<Invalid>,
    /// Selecting policies left out because an older one has their port.
    pub conflicted: Vec<Conflict>,
}

#[derive(Debug, Default)]
struct ServiceSlices {
    synced: bool,
    slices: BTreeMap<String, EndpointSlice>,
}

/// The sidecar's view: its pod's labels, the namespace's policies, the watched Services'
/// EndpointSlices, and which policy versions were accepted or rejected by the data plane.
#[derive(Debug)]
pub struct Index {
    namespace: String,
    pod_labels: Option<BTreeMap<String, String>>,
    policies: Option<BTreeMap<String, ResiliencePolicy>>,
    services: BTreeMap<ServiceKey, ServiceSlices>,
    /// The configuration of each policy in the last applied snapshot.
    accepted: HashMap<String, PolicyConfig>,
    /// Policy generations the data plane could not put into service.
    rejected: HashMap<String, Option<i64>>,
}

impl Index {
    /// An empty index for a pod in `namespace`.
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            pod_labels: None,
            policies: None,
            services: BTreeMap::new(),
            accepted: HashMap::new(),
            rejected: HashMap::new(),
        }
    }

    /// Records the pod's labels; true when they changed.
    pub fn set_pod_labels(&mut self, labels: BTreeMap<String, String>) -> bool {
        let changed = self.pod_labels.as_ref() != Some(&labels);
        self.pod_labels = Some(labels);
        changed
    }

    /// Replaces every policy (after a list): policies missing from `all` are gone.
    pub fn replace_policies(&mut self, all: Vec<ResiliencePolicy>) {
        let all: BTreeMap<String, ResiliencePolicy> =
            all.into_iter().map(|p| (name_of(&p), p)).collect();
        self.accepted.retain(|name, _| all.contains_key(name));
        self.rejected.retain(|name, _| all.contains_key(name));
        self.policies = Some(all);
    }

    /// Adds or updates one policy.
    pub fn apply_policy(&mut self, policy: ResiliencePolicy) {
        self.policies
            .get_or_insert_default()
            .insert(name_of(&policy), policy);
    }

    /// Removes one policy (and what was remembered about it).
    pub fn delete_policy(&mut self, policy: &ResiliencePolicy) {
        let name = name_of(policy);
        if let Some(policies) = &mut self.policies {
            policies.remove(&name);
        }
        self.accepted.remove(&name);
        self.rejected.remove(&name);
    }

    /// Replaces every EndpointSlice of `service` (after a list); the Service counts as synced.
    pub fn replace_slices(&mut self, service: &ServiceKey, all: Vec<EndpointSlice>) {
        let entry = self.services.entry(service.clone()).or_default();
        entry.slices = all.into_iter().map(|s| (slice_name(&s), s)).collect();
        entry.synced = true;
    }

    /// Adds or updates one EndpointSlice of `service`.
    pub fn apply_slice(&mut self, service: &ServiceKey, slice: EndpointSlice) {
        self.services
            .entry(service.clone())
            .or_default()
            .slices
            .insert(slice_name(&slice), slice);
    }

    /// Removes one EndpointSlice of `service`.
    pub fn delete_slice(&mut self, service: &ServiceKey, slice: &EndpointSlice) {
        if let Some(entry) = self.services.get_mut(service) {
            entry.slices.remove(&slice_name(slice));
        }
    }

    /// Forgets a Service no policy refers to any more.
    pub fn forget_service(&mut self, service: &ServiceKey) {
        self.services.remove(service);
    }

    /// Whether the pod labels and the policy list are known and every Service in `services`
    /// has been listed: the point where a first configuration may be published.
    pub fn synced(&self, services: &BTreeSet<ServiceKey>) -> bool {
        self.pod_labels.is_some()
            && self.policies.is_some()
            && services
                .iter()
                .all(|s| self.services.get(s).is_some_and(|e| e.synced))
    }

    /// Remembers the configurations of a snapshot the data plane applied.
    pub fn accept(&mut self, configs: &[PolicyConfig]) {
        self.accepted = configs
            .iter()
            .map(|c| (c.id.name.clone(), c.clone()))
            .collect();
    }

    /// Marks the current generation of policy `name` as one the data plane rejected; until its
    /// next generation, its last accepted configuration stands in for it.
    pub fn reject(&mut self, name: &str) {
        let generation = self
            .policies
            .as_ref()
            .and_then(|p| p.get(name))
            .and_then(|p| p.metadata.generation);
        self.rejected.insert(name.to_owned(), generation);
    }

    /// The policies this pod serves and the addresses of their `service:` backends.
    pub fn derive(&self) -> Derived {
        let mut derived = Derived::default();
        let (Some(labels), Some(policies)) = (&self.pod_labels, &self.policies) else {
            return derived;
        };
        let mut candidates: Vec<(Option<&Time>, PolicyConfig)> = Vec::new();
        for (name, policy) in policies {
            let id = PolicyId {
                namespace: policy
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| self.namespace.clone()),
                name: name.clone(),
            };
            let generation = policy.metadata.generation;
            let compiled = match selector::selects(policy.spec.pod_selector.as_ref(), labels) {
                Ok(false) => continue,
                Ok(true) => compile_policy(&document_of(policy, &id)),
                Err(error) => Err(vec![error]),
            };
            let previous = self.accepted.get(name);
            let config = match compiled {
                Ok(config) if self.rejected.get(name) != Some(&generation) => Some(config),
                Ok(_) => previous.cloned(),
                Err(errors) => {
                    derived.invalid.push(Invalid {
                        policy: id,
                        generation,
                        errors,
                        serving_previous: previous.is_some(),
                    });
                    previous.cloned()
                }
            };
            if let Some(config) = config {
                candidates.push((policy.metadata.creation_timestamp.as_ref(), config));
            }
        }
        // Oldest first; the name breaks ties (creation times have one-second resolution).
        candidates.sort_by(|(a, x), (b, y)| a.cmp(b).then_with(|| x.id.name.cmp(&y.id.name)));
        for (_, config) in candidates {
            let addr = config.listener.addr;
            let taken = derived.configs.iter().find(|w| {
                let other = w.listener.addr;
                other.port() == addr.port()
                    && (other.ip() == addr.ip()
                        || other.ip().is_unspecified()
                        || addr.ip().is_unspecified())
            });
            if let Some(winner) = taken {
                derived.conflicted.push(Conflict {
                    policy: config.id.clone(),
                    winner: winner.id.clone(),
                    port: addr.port(),
                });
                continue;
            }
            derived.configs.push(config);
        }
        for config in &mut derived.configs {
            // A Service-scoped global limit: this sidecar admits its share of the fleet's rate.
            if let Some((namespace, name)) = config
                .rate_limit
                .as_ref()
                .and_then(|r| r.global_service.clone())
            {
                let key = ServiceKey { namespace, name };
                let replicas = self
                    .services
                    .get(&key)
                    .map_or(0, |s| endpoints::ready_count(s.slices.values()));
                if let Some(limits) = &mut config.rate_limit {
                    limits.share_global(u32::try_from(replicas).unwrap_or(u32::MAX));
                }
                derived.services.insert(key);
            }
            for backend in &config.backends {
                let BackendTarget::Service {
                    namespace,
                    name,
                    port,
                } = &backend.target
                else {
                    continue;
                };
                let key = ServiceKey {
                    namespace: namespace.clone(),
                    name: name.clone(),
                };
                let addresses = self
                    .services
                    .get(&key)
                    .map(|s| endpoints::resolve(s.slices.values(), port))
                    .unwrap_or_default();
                derived
                    .resolutions
                    .insert((config.id.clone(), backend.name.clone()), addresses);
                derived.services.insert(key);
            }
        }
        derived
    }
}

fn name_of(policy: &ResiliencePolicy) -> String {
    policy.metadata.name.clone().unwrap_or_default()
}

fn slice_name(slice: &EndpointSlice) -> String {
    slice.metadata.name.clone().unwrap_or_default()
}

/// The file-format document for a cluster object, so both compile through the same code.
fn document_of(policy: &ResiliencePolicy, id: &PolicyId) -> PolicyDocument {
    PolicyDocument {
        api_version: API_VERSION.to_owned(),
        kind: KIND.to_owned(),
        metadata: PolicyMetadata {
            name: id.name.clone(),
            namespace: Some(id.namespace.clone()),
            labels: policy.metadata.labels.clone().unwrap_or_default(),
            annotations: BTreeMap::new(),
        },
        spec: policy.spec.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use serde_json::json;

    use super::*;

    fn policy(
        name: &str,
        created: &str,
        generation: i64,
        spec: serde_json::Value,
    ) -> ResiliencePolicy {
        serde_json::from_value(json!({
            "apiVersion": API_VERSION, "kind": KIND,
            "metadata": {"name": name, "namespace": "shop", "generation": generation,
                         "creationTimestamp": created},
            "spec": spec,
        }))
        .unwrap()
    }

    fn service_policy(name: &str, created: &str, port: u16) -> ResiliencePolicy {
        policy(
            name,
            created,
            1,
            json!({"listener": {"port": port},
                   "backends": [{"name": "pay", "service": {"name": "payments", "port": "http"}}]}),
        )
    }

    fn slice(name: &str, ips: &[(&str, bool)]) -> EndpointSlice {
        serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "payments"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": ips.iter().map(|(ip, ready)| json!({
                "addresses": [ip], "conditions": {"ready": ready}
            })).collect::<Vec<_>>(),
        }))
        .unwrap()
    }

    fn payments() -> ServiceKey {
        ServiceKey {
            namespace: "shop".into(),
            name: "payments".into(),
        }
    }

    fn index_with_labels(pairs: &[(&str, &str)]) -> Index {
        let mut index = Index::new("shop");
        index.set_pod_labels(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        );
        index
    }

    fn names(derived: &Derived) -> Vec<&str> {
        derived.configs.iter().map(|c| c.id.name.as_str()).collect()
    }

    fn addresses(derived: &Derived, policy: &str) -> Vec<SocketAddr> {
        derived
            .resolutions
            .get(&(
                PolicyId {
                    namespace: "shop".into(),
                    name: policy.into(),
                },
                "pay".into(),
            ))
            .cloned()
            .unwrap_or_default()
    }

    #[test]
    fn nothing_is_derived_or_synced_before_labels_and_policies_are_known() {
        let mut index = Index::new("shop");
        assert!(!index.synced(&BTreeSet::new()));
        index.replace_policies(vec![service_policy("a", "2026-01-01T00:00:00Z", 8080)]);
        assert!(index.derive().configs.is_empty(), "no labels yet");
        index.set_pod_labels(BTreeMap::new());
        let derived = index.derive();
        assert_eq!(names(&derived), ["a"]);
        assert!(
            !index.synced(&derived.services),
            "the Service was not listed yet"
        );
        index.replace_slices(&payments(), vec![]);
        assert!(index.synced(&derived.services));
    }

    #[test]
    fn service_backends_resolve_through_slices_and_a_relist_replaces_them() {
        let mut index = index_with_labels(&[]);
        index.replace_policies(vec![service_policy("a", "2026-01-01T00:00:00Z", 8080)]);
        index.replace_slices(
            &payments(),
            vec![
                slice("s1", &[("10.0.0.1", true), ("10.0.0.2", false)]),
                slice("s2", &[("10.0.0.3", true)]),
            ],
        );
        assert_eq!(
            addresses(&index.derive(), "a"),
            [
                "10.0.0.1:8080".parse().unwrap(),
                "10.0.0.3:8080".parse().unwrap()
            ]
        );
        index.apply_slice(&payments(), slice("s1", &[("10.0.0.1", false)]));
        assert_eq!(
            addresses(&index.derive(), "a"),
            ["10.0.0.3:8080".parse().unwrap()]
        );
        // A relist without s2 (deleted while disconnected) drops its endpoints.
        index.replace_slices(&payments(), vec![slice("s1", &[("10.0.0.1", true)])]);
        assert_eq!(
            addresses(&index.derive(), "a"),
            ["10.0.0.1:8080".parse().unwrap()]
        );
        index.delete_slice(&payments(), &slice("s1", &[]));
        assert!(addresses(&index.derive(), "a").is_empty());
    }

    #[test]
    fn policies_not_selecting_the_pod_are_ignored() {
        let mut index = index_with_labels(&[("app", "shop")]);
        let mut other = service_policy("other", "2026-01-01T00:00:00Z", 8080);
        other.spec.pod_selector =
            serde_json::from_value(json!({"matchLabels": {"app": "cart"}})).unwrap();
        let mut mine = service_policy("mine", "2026-01-01T00:00:00Z", 8081);
        mine.spec.pod_selector = serde_json::from_value(
            json!({"matchExpressions": [{"key": "app", "operator": "In", "values": ["shop"]}]}),
        )
        .unwrap();
        index.replace_policies(vec![other, mine]);
        assert_eq!(names(&index.derive()), ["mine"]);
    }

    #[test]
    fn the_oldest_policy_keeps_a_contested_port_then_the_name_decides() {
        let mut index = index_with_labels(&[]);
        index.replace_policies(vec![
            service_policy("aa-newer", "2026-01-02T00:00:00Z", 8080),
            service_policy("zz-older", "2026-01-01T00:00:00Z", 8080),
            service_policy("b-same-time", "2026-01-01T00:00:00Z", 8080),
            service_policy("other-port", "2026-01-03T00:00:00Z", 8081),
        ]);
        let derived = index.derive();
        assert_eq!(names(&derived), ["b-same-time", "other-port"]);
        let losers: Vec<(&str, &str)> = derived
            .conflicted
            .iter()
            .map(|c| (c.policy.name.as_str(), c.winner.name.as_str()))
            .collect();
        assert_eq!(
            losers,
            [("zz-older", "b-same-time"), ("aa-newer", "b-same-time")]
        );
    }

    #[test]
    fn an_invalid_update_keeps_the_accepted_configuration_until_deleted() {
        let mut index = index_with_labels(&[]);
        index.replace_policies(vec![service_policy("a", "2026-01-01T00:00:00Z", 8080)]);
        let good = index.derive();
        index.accept(&good.configs);
        let bad = policy(
            "a",
            "2026-01-01T00:00:00Z",
            2,
            json!({"listener": {"port": 9000}, "backends": [{"name": "pay", "url": "ftp://x"}]}),
        );
        index.apply_policy(bad.clone());
        let derived = index.derive();
        assert_eq!(
            derived.configs, good.configs,
            "the previous configuration keeps serving"
        );
        assert_eq!(derived.invalid.len(), 1);
        assert!(derived.invalid[0].serving_previous);
        assert!(
            derived.invalid[0]
                .errors
                .iter()
                .any(|e| e.path == "spec.backends[0].url"),
            "the error names the field: {:?}",
            derived.invalid[0].errors
        );
        index.delete_policy(&bad);
        assert!(index.derive().configs.is_empty());
        // Recreated invalid: nothing to fall back on.
        index.apply_policy(bad);
        let derived = index.derive();
        assert!(derived.configs.is_empty());
        assert!(!derived.invalid[0].serving_previous);
    }

    #[test]
    fn a_rejected_generation_falls_back_until_the_next_generation() {
        let mut index = index_with_labels(&[]);
        index.replace_policies(vec![service_policy("a", "2026-01-01T00:00:00Z", 8080)]);
        let good = index.derive();
        index.accept(&good.configs);
        let mut moved = service_policy("a", "2026-01-01T00:00:00Z", 8081);
        moved.metadata.generation = Some(2);
        index.apply_policy(moved.clone());
        assert_eq!(index.derive().configs[0].listener.addr.port(), 8081);
        index.reject("a");
        assert_eq!(index.derive().configs, good.configs);
        moved.metadata.generation = Some(3);
        index.apply_policy(moved);
        assert_eq!(index.derive().configs[0].listener.addr.port(), 8081);
    }

    #[test]
    fn a_relist_drops_policies_deleted_while_disconnected() {
        let mut index = index_with_labels(&[]);
        index.replace_policies(vec![
            service_policy("a", "2026-01-01T00:00:00Z", 8080),
            service_policy("b", "2026-01-01T00:00:00Z", 8081),
        ]);
        index.accept(&index.derive().configs);
        index.replace_policies(vec![service_policy("b", "2026-01-01T00:00:00Z", 8081)]);
        assert_eq!(names(&index.derive()), ["b"]);
    }
}
