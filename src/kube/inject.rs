//! Sidecar injection: the pure mutation behind the operator's `/mutate-pods` webhook.
//!
//! A Pod CREATE whose pod carries `breakwater.io/inject: "true"` gets the `breakwater`
//! container (the one `manifests/examples/demo-app.yaml` adds by hand) and the
//! `breakwater.io/injected` annotation, as an RFC 6902 JSON patch. Everything else is allowed
//! unchanged. Problems are never a reason to block a pod: a pod whose annotations are invalid
//! is allowed *without* the sidecar, and the response's `warnings` say why (kubectl prints
//! them), which is the spirit of the webhook's `failurePolicy: Ignore`.

use std::collections::BTreeMap;

use ::kube::core::DynamicObject;
use ::kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, Pod, PodSpec, Probe, ResourceRequirements, SeccompProfile,
    SecurityContext,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use thiserror::Error;

/// Every annotation this module reads or writes starts with this.
pub const ANNOTATION_PREFIX: &str = "breakwater.io/";
/// `"true"` asks for the sidecar; `"false"` or absent does not.
pub const INJECT: &str = "breakwater.io/inject";
/// Set on injected pods to the injecting operator's version; its presence makes a second
/// pass a no-op.
pub const INJECTED: &str = "breakwater.io/injected";
/// The sidecar's traffic port (its container port `http`); it must be the `listener.port` of
/// the policies that select the pod.
pub const PROXY_PORT: &str = "breakwater.io/proxy-port";
/// The sidecar's CPU request.
pub const PROXY_CPU: &str = "breakwater.io/proxy-cpu";
/// The sidecar's memory request.
pub const PROXY_MEMORY: &str = "breakwater.io/proxy-memory";
/// The sidecar's CPU limit.
pub const PROXY_CPU_LIMIT: &str = "breakwater.io/proxy-cpu-limit";
/// The sidecar's memory limit.
pub const PROXY_MEMORY_LIMIT: &str = "breakwater.io/proxy-memory-limit";
/// The injected container's name; a pod that already has a container of this name (injected
/// earlier, or added by hand) is left alone.
pub const CONTAINER_NAME: &str = "breakwater";
/// The user and group the image runs as (the distroless `nonroot` user).
pub const SIDECAR_UID: i64 = 65532;

/// The annotations this module understands; other `breakwater.io/` ones earn a warning.
const KNOWN_ANNOTATIONS: &[&str] = &[
    INJECT,
    INJECTED,
    PROXY_PORT,
    PROXY_CPU,
    PROXY_MEMORY,
    PROXY_CPU_LIMIT,
    PROXY_MEMORY_LIMIT,
];

/// What every injected sidecar looks like; the pod's annotations override the port and the
/// resources.
#[derive(Clone, Debug, PartialEq)]
pub struct InjectionConfig {
    /// The sidecar image.
    pub image: String,
    /// `imagePullPolicy` (`Always`, `IfNotPresent`, `Never`); `None` leaves the cluster's
    /// default.
    pub image_pull_policy: Option<String>,
    /// The admin port (`/health`, `/ready`, `/metrics`), container port `admin`; the probes use it.
    pub admin_port: u16,
    /// The traffic port (container port `http`) unless `breakwater.io/proxy-port` says otherwise.
    pub proxy_port: u16,
    /// Requests and limits unless the `breakwater.io/proxy-{cpu,memory}[-limit]` annotations
    /// say otherwise.
    pub resources: ResourceRequirements,
    /// Arguments appended after `sidecar --admin-addr 0.0.0.0:<admin port>`.
    pub extra_args: Vec<String>,
    /// The version written to `breakwater.io/injected`.
    pub version: String,
}

/// Why an [`InjectionConfig`] or an `AdmissionReview` cannot be used.
#[derive(Debug, Error)]
pub enum InjectError {
    /// The review has no `request` (the API server always sends one).
    #[error("the AdmissionReview has no request")]
    NoRequest,
    /// The injection settings are inconsistent.
    #[error("invalid sidecar injection settings: {0}")]
    Config(String),
}

/// What the webhook did with one review (the `result` label of `webhook_requests_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The sidecar was added.
    Injected,
    /// Not asked for, not a Pod, or not a CREATE.
    Skipped,
    /// Asked for, but the pod already has the sidecar.
    AlreadyInjected,
    /// Asked for, but an annotation (or the pod) is invalid: allowed without the sidecar.
    Invalid,
    /// The review could not be handled (unreadable object): allowed unchanged.
    Error,
}

/// The answer to one review.
#[derive(Debug)]
pub struct Mutation {
    /// The response to send back (always `allowed`).
    pub response: AdmissionResponse,
    /// What happened.
    pub outcome: Outcome,
    /// Whether the request was a dry run (the caller must then cause no side effects).
    pub dry_run: bool,
}

/// What to do with one pod.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// Not asked for: `breakwater.io/inject` absent or `"false"`.
    Skip,
    /// The sidecar is already there (a `breakwater` container or `breakwater.io/injected`).
    AlreadyInjected,
    /// Asked for, but not possible as annotated: one warning per problem.
    Invalid(Vec<String>),
    /// Add `container`; `warnings` did not block it.
    Inject {
        /// The sidecar container.
        container: Box<Container>,
        /// Things the user should know (e.g. a port name another container also uses).
        warnings: Vec<String>,
    },
}

/// A quantity parsed for comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Nanos(u128);

impl Default for InjectionConfig {
    /// The sidecar of `manifests/examples/demo-app.yaml`: this version's image, admin 9901,
    /// traffic 8080, 20m CPU and 16Mi memory requested, a 64Mi memory limit.
    fn default() -> Self {
        let quantities = |pairs: &[(&str, &str)]| -> BTreeMap<String, Quantity> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned())))
                .collect()
        };
        InjectionConfig {
            image: format!(
                "ghcr.io/breakwater/breakwater:{}",
                env!("CARGO_PKG_VERSION")
            ),
            image_pull_policy: None,
            admin_port: 9901,
            proxy_port: 8080,
            resources: ResourceRequirements {
                requests: Some(quantities(&[("cpu", "20m"), ("memory", "16Mi")])),
                limits: Some(quantities(&[("memory", "64Mi")])),
                ..ResourceRequirements::default()
            },
            extra_args: Vec::new(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }
}

impl InjectionConfig {
    /// Checks what the API server would otherwise reject on every injected pod: ports,
    /// pull policy, quantities, and requests above limits.
    pub fn validate(&self) -> Result<(), InjectError> {
        let fail = |msg: String| Err(InjectError::Config(msg));
        if self.image.trim().is_empty() {
            return fail("the sidecar image is empty".to_owned());
        }
        if let Some(policy) = &self.image_pull_policy {
            if !["Always", "IfNotPresent", "Never"].contains(&policy.as_str()) {
                return fail(format!(
                    "image pull policy {policy:?} is not Always, IfNotPresent or Never"
                ));
            }
        }
        if self.admin_port == 0 || self.proxy_port == 0 {
            return fail("ports must be between 1 and 65535".to_owned());
        }
        if self.admin_port == self.proxy_port {
            return fail(format!(
                "the proxy port and the admin port are both {}",
                self.admin_port
            ));
        }
        for (kind, map) in [
            ("request", &self.resources.requests),
            ("limit", &self.resources.limits),
        ] {
            for (name, quantity) in map.iter().flatten() {
                if let Err(reason) = parse_quantity(&quantity.0) {
                    return fail(format!("{name} {kind} {:?} {reason}", quantity.0));
                }
            }
        }
        if let Some((name, request, limit)) = request_above_limit(&self.resources) {
            return fail(format!(
                "the {name} request {request} exceeds the {name} limit {limit}"
            ));
        }
        Ok(())
    }

    /// The sidecar container for `proxy_port` and `resources`.
    fn container(&self, proxy_port: u16, resources: ResourceRequirements) -> Container {
        let field_env = |name: &str, path: &str| EnvVar {
            name: name.to_owned(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: path.to_owned(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        };
        let port = |name: &str, number: u16| ContainerPort {
            name: Some(name.to_owned()),
            container_port: i32::from(number),
            ..ContainerPort::default()
        };
        let probe = |path: &str, period: i32| Probe {
            http_get: Some(HTTPGetAction {
                path: Some(path.to_owned()),
                port: IntOrString::String("admin".to_owned()),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(period),
            ..Probe::default()
        };
        let mut args = vec![
            "sidecar".to_owned(),
            "--admin-addr".to_owned(),
            format!("0.0.0.0:{}", self.admin_port),
        ];
        args.extend(self.extra_args.iter().cloned());
        Container {
            name: CONTAINER_NAME.to_owned(),
            image: Some(self.image.clone()),
            image_pull_policy: self.image_pull_policy.clone(),
            args: Some(args),
            // What `breakwater sidecar` reads to find its own pod (and so its labels).
            env: Some(vec![
                field_env("POD_NAME", "metadata.name"),
                field_env("POD_NAMESPACE", "metadata.namespace"),
            ]),
            ports: Some(vec![
                port("http", proxy_port),
                port("admin", self.admin_port),
            ]),
            readiness_probe: Some(probe("/ready", 5)),
            liveness_probe: Some(probe("/health", 10)),
            resources: Some(resources),
            // Set on the container, not the pod: the app's own settings stay untouched, and
            // the sidecar passes the `restricted` Pod Security Standard whatever the pod says.
            security_context: Some(SecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(SIDECAR_UID),
                run_as_group: Some(SIDECAR_UID),
                allow_privilege_escalation: Some(false),
                read_only_root_filesystem: Some(true),
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".to_owned()]),
                    ..Capabilities::default()
                }),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".to_owned(),
                    ..SeccompProfile::default()
                }),
                ..SecurityContext::default()
            }),
            ..Container::default()
        }
    }
}

impl Outcome {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Injected => "injected",
            Outcome::Skipped => "skipped",
            Outcome::AlreadyInjected => "already_injected",
            Outcome::Invalid => "invalid",
            Outcome::Error => "error",
        }
    }
}

impl Mutation {
    /// The `AdmissionReview` to send back.
    pub fn into_review(self) -> AdmissionReview<DynamicObject> {
        self.response.into_review()
    }
}

/// Answers one `AdmissionReview`. Only a review without a request is an error (the caller
/// answers `400`); every other review gets an `allowed` response, with a patch when the
/// sidecar is to be injected. Dry runs get the same answer (their [`Mutation::dry_run`] is
/// set so the caller counts nothing).
pub fn review(
    config: &InjectionConfig,
    review: AdmissionReview<DynamicObject>,
) -> Result<Mutation, InjectError> {
    let request: AdmissionRequest<DynamicObject> =
        review.try_into().map_err(|_| InjectError::NoRequest)?;
    Ok(mutate(config, &request))
}

/// Answers one admission request; see [`review`].
pub fn mutate(config: &InjectionConfig, request: &AdmissionRequest<DynamicObject>) -> Mutation {
    let allowed = AdmissionResponse::from(request);
    let answer = |response, outcome| Mutation {
        response,
        outcome,
        dry_run: request.dry_run,
    };
    let is_pod = request.kind.group.is_empty()
        && request.kind.version == "v1"
        && request.kind.kind == "Pod"
        && request.sub_resource.is_none();
    // Containers cannot be added to an existing pod, so only CREATE is ever mutated.
    if !is_pod || request.operation != Operation::Create {
        return answer(allowed, Outcome::Skipped);
    }
    let Some(object) = &request.object else {
        return answer(
            with_warnings(
                allowed,
                vec!["breakwater: the request has no pod".to_owned()],
            ),
            Outcome::Error,
        );
    };
    // Most pods do not ask: answer those without converting the whole object.
    let asks = object
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(INJECT));
    if !asks {
        return answer(allowed, Outcome::Skipped);
    }
    let pod: Pod = match serde_json::to_value(object).and_then(serde_json::from_value) {
        Ok(pod) => pod,
        Err(err) => {
            let warning = format!("breakwater: the pod could not be read ({err}); not injected");
            return answer(with_warnings(allowed, vec![warning]), Outcome::Error);
        }
    };
    match plan(config, &pod) {
        Plan::Skip => answer(allowed, Outcome::Skipped),
        Plan::AlreadyInjected => answer(allowed, Outcome::AlreadyInjected),
        Plan::Invalid(warnings) => answer(with_warnings(allowed, warnings), Outcome::Invalid),
        Plan::Inject {
            container,
            warnings,
        } => {
            let patched = injection_patch(&container, &config.version)
                .map_err(|e| e.to_string())
                .and_then(|patch| allowed.clone().with_patch(patch).map_err(|e| e.to_string()));
            match patched {
                Ok(response) => answer(with_warnings(response, warnings), Outcome::Injected),
                Err(err) => {
                    let warning = format!("breakwater: building the patch failed ({err})");
                    answer(with_warnings(allowed, vec![warning]), Outcome::Error)
                }
            }
        }
    }
}

/// Decides what to do with `pod`: whether it asks for the sidecar, already has it, or what
/// makes its annotations unusable.
pub fn plan(config: &InjectionConfig, pod: &Pod) -> Plan {
    let empty = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    match annotations.get(INJECT).map(|v| v.trim()) {
        None => return Plan::Skip,
        Some(v) if v.eq_ignore_ascii_case("false") => return Plan::Skip,
        Some(v) if v.eq_ignore_ascii_case("true") => {}
        Some(v) => {
            return Plan::Invalid(vec![not_injected(
                INJECT,
                &format!("{v:?} is not \"true\" or \"false\""),
            )]);
        }
    }
    let Some(spec) = pod.spec.as_ref() else {
        return Plan::Invalid(vec![not_injected(INJECT, "the pod has no spec")]);
    };
    if annotations.contains_key(INJECTED)
        || spec.containers.iter().any(|c| c.name == CONTAINER_NAME)
    {
        return Plan::AlreadyInjected;
    }

    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    if spec.host_network == Some(true) {
        problems.push(not_injected(
            INJECT,
            "hostNetwork pods are not injected (the sidecar's ports would be the node's)",
        ));
    }
    let proxy_port = proxy_port(config, annotations, &mut problems);
    let resources = resources(config, annotations, &mut problems);
    port_clashes(
        config,
        spec,
        proxy_port,
        annotations,
        &mut problems,
        &mut warnings,
    );
    for key in annotations.keys() {
        if key.starts_with(ANNOTATION_PREFIX) && !KNOWN_ANNOTATIONS.contains(&key.as_str()) {
            warnings.push(format!("breakwater: unknown annotation {key} ignored"));
        }
    }

    if !problems.is_empty() {
        return Plan::Invalid(problems);
    }
    Plan::Inject {
        container: Box::new(config.container(proxy_port, resources)),
        warnings,
    }
}

/// The traffic port: `breakwater.io/proxy-port`, or the configured one.
fn proxy_port(
    config: &InjectionConfig,
    annotations: &BTreeMap<String, String>,
    problems: &mut Vec<String>,
) -> u16 {
    let Some(text) = annotations.get(PROXY_PORT).map(|v| v.trim()) else {
        return config.proxy_port;
    };
    match text.parse::<u16>() {
        Ok(port) if port == config.admin_port => {
            problems.push(not_injected(
                PROXY_PORT,
                &format!("{port} is the sidecar's admin port"),
            ));
        }
        Ok(port) if port > 0 => return port,
        _ => problems.push(not_injected(
            PROXY_PORT,
            &format!("{text:?} is not a port number (1-65535)"),
        )),
    }
    config.proxy_port
}

/// The configured resources with the `breakwater.io/proxy-{cpu,memory}[-limit]` overrides.
fn resources(
    config: &InjectionConfig,
    annotations: &BTreeMap<String, String>,
    problems: &mut Vec<String>,
) -> ResourceRequirements {
    let mut resources = config.resources.clone();
    // Which annotation set each (kind, resource), to name it if request and limit disagree.
    let mut set_by: BTreeMap<(&str, &str), &str> = BTreeMap::new();
    for (key, kind, resource) in [
        (PROXY_CPU, "request", "cpu"),
        (PROXY_MEMORY, "request", "memory"),
        (PROXY_CPU_LIMIT, "limit", "cpu"),
        (PROXY_MEMORY_LIMIT, "limit", "memory"),
    ] {
        let Some(text) = annotations.get(key).map(|v| v.trim()) else {
            continue;
        };
        if let Err(reason) = parse_quantity(text) {
            problems.push(not_injected(key, &format!("{text:?} {reason}")));
            continue;
        }
        let map = if kind == "request" {
            &mut resources.requests
        } else {
            &mut resources.limits
        };
        map.get_or_insert_with(BTreeMap::new)
            .insert(resource.to_owned(), Quantity(text.to_owned()));
        set_by.insert((kind, resource), key);
    }
    // The API server rejects a pod whose request exceeds its limit: do not create one.
    if let Some((resource, request, limit)) = request_above_limit(&resources) {
        let key = set_by
            .get(&("request", resource))
            .or_else(|| set_by.get(&("limit", resource)))
            .copied()
            .unwrap_or(INJECT);
        problems.push(not_injected(
            key,
            &format!("the {resource} request {request} exceeds the limit {limit}"),
        ));
    }
    resources
}

/// Ports of the pod's other containers that the sidecar's would collide with.
fn port_clashes(
    config: &InjectionConfig,
    spec: &PodSpec,
    proxy_port: u16,
    annotations: &BTreeMap<String, String>,
    problems: &mut Vec<String>,
    warnings: &mut Vec<String>,
) {
    // The sidecar shares the pod's network namespace: a port another container declares
    // would fail to bind in one of the two. Native sidecars (restartable init containers)
    // run alongside too; ordinary init containers have exited by then.
    let neighbours = spec.containers.iter().chain(
        spec.init_containers
            .iter()
            .flatten()
            .filter(|c| c.restart_policy.as_deref() == Some("Always")),
    );
    let port_key = if annotations.contains_key(PROXY_PORT) {
        PROXY_PORT
    } else {
        INJECT
    };
    for container in neighbours {
        for port in container.ports.iter().flatten() {
            let tcp = port.protocol.as_deref().is_none_or(|p| p == "TCP");
            if tcp && port.container_port == i32::from(proxy_port) {
                problems.push(not_injected(
                    port_key,
                    &format!(
                        "port {proxy_port} is already declared by container {:?}; set {PROXY_PORT}",
                        container.name
                    ),
                ));
            }
            if tcp && port.container_port == i32::from(config.admin_port) {
                problems.push(not_injected(
                    INJECT,
                    &format!(
                        "the sidecar's admin port {} is already declared by container {:?}",
                        config.admin_port, container.name
                    ),
                ));
            }
            // Not fatal, but a Service naming the port may then miss the sidecar.
            if let Some(name) = port
                .name
                .as_deref()
                .filter(|n| ["http", "admin"].contains(n))
            {
                warnings.push(format!(
                    "breakwater: container {:?} also names a port {name:?}; a Service targetPort {name:?} may reach it instead of the sidecar",
                    container.name
                ));
            }
        }
    }
}

/// The JSON patch that appends `container` to `spec.containers` and marks the pod with
/// `breakwater.io/injected: <version>`. The pod must have annotations (it has
/// `breakwater.io/inject`) and containers (every valid pod does).
pub fn injection_patch(container: &Container, version: &str) -> Result<Patch, serde_json::Error> {
    let container = serde_json::to_value(container)?;
    Ok(Patch(vec![
        PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(["spec", "containers", "-"]),
            value: container,
        }),
        PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(["metadata", "annotations", INJECTED]),
            value: serde_json::Value::String(version.to_owned()),
        }),
    ]))
}

fn with_warnings(mut response: AdmissionResponse, warnings: Vec<String>) -> AdmissionResponse {
    if !warnings.is_empty() {
        response.warnings = Some(warnings);
    }
    response
}

fn not_injected(annotation: &str, reason: &str) -> String {
    format!("{annotation}: {reason}; sidecar not injected")
}

/// The first resource whose request exceeds its limit (the API server rejects such a pod):
/// `(name, request, limit)`. Unparseable quantities are reported elsewhere.
fn request_above_limit(resources: &ResourceRequirements) -> Option<(&str, &str, &str)> {
    let (requests, limits) = (resources.requests.as_ref()?, resources.limits.as_ref()?);
    requests.iter().find_map(|(name, request)| {
        let limit = limits.get(name)?;
        let above = parse_quantity(&request.0).ok()? > parse_quantity(&limit.0).ok()?;
        above.then_some((name.as_str(), request.0.as_str(), limit.0.as_str()))
    })
}

/// Parses a non-negative Kubernetes quantity (`100m`, `0.5`, `64Mi`, `1e3`, `2G`) into
/// nano-units, rounded up. The error completes "`"<text>"` …".
fn parse_quantity(text: &str) -> Result<Nanos, &'static str> {
    const NOT_A_QUANTITY: &str = "is not a quantity (e.g. 100m, 0.5, 64Mi)";
    const TOO_LARGE: &str = "is too large";
    let unsigned = text.strip_prefix('+').unwrap_or(text);
    if unsigned.starts_with('-') {
        return Err("must not be negative");
    }
    let number_len = unsigned
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(unsigned.len());
    let (number, suffix) = unsigned.split_at(number_len);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return Err(NOT_A_QUANTITY);
    }
    // Nano-units per unit of the number, as a fraction `scale / divisor`.
    let pow10 = |exp: u32| 10u128.checked_pow(exp).ok_or(TOO_LARGE);
    let (scale, divisor): (u128, u128) = match suffix {
        "n" => (1, 1),
        "u" => (pow10(3)?, 1),
        "m" => (pow10(6)?, 1),
        "" => (pow10(9)?, 1),
        "k" => (pow10(12)?, 1),
        "M" => (pow10(15)?, 1),
        "G" => (pow10(18)?, 1),
        "T" => (pow10(21)?, 1),
        "P" => (pow10(24)?, 1),
        "E" => (pow10(27)?, 1),
        "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => {
            let power = match suffix {
                "Ki" => 1,
                "Mi" => 2,
                "Gi" => 3,
                "Ti" => 4,
                "Pi" => 5,
                _ => 6,
            };
            (1024u128.pow(power) * pow10(9)?, 1)
        }
        _ => {
            let exponent = suffix
                .strip_prefix(['e', 'E'])
                .filter(|e| !e.is_empty())
                .and_then(|e| e.parse::<i32>().ok())
                .ok_or(NOT_A_QUANTITY)?;
            let nano_exponent = exponent.checked_add(9).ok_or(TOO_LARGE)?;
            if nano_exponent >= 0 {
                (pow10(nano_exponent.unsigned_abs())?, 1)
            } else {
                (1, pow10(nano_exponent.unsigned_abs())?)
            }
        }
    };
    let digits = format!("{whole}{fraction}");
    let mantissa: u128 = if digits.len() > 38 {
        return Err(TOO_LARGE);
    } else {
        digits.parse().map_err(|_| NOT_A_QUANTITY)?
    };
    let numerator = mantissa.checked_mul(scale).ok_or(TOO_LARGE)?;
    let fraction_len = u32::try_from(fraction.len()).map_err(|_| TOO_LARGE)?;
    let denominator = divisor.checked_mul(pow10(fraction_len)?).ok_or(TOO_LARGE)?;
    Ok(Nanos(numerator.div_ceil(denominator)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(annotations: &[(&str, &str)]) -> Pod {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "web", "namespace": "shop",
                "annotations": annotations.iter().map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v))).collect::<serde_json::Map<_, _>>(),
            },
            "spec": {"containers": [{"name": "app", "image": "app:1",
                                     "ports": [{"name": "web", "containerPort": 3000}]}]},
        }))
        .unwrap()
    }

    fn injected(plan: Plan) -> (Container, Vec<String>) {
        match plan {
            Plan::Inject {
                container,
                warnings,
            } => (*container, warnings),
            other => panic!("expected an injection, got {other:?}"),
        }
    }

    fn invalid(plan: Plan) -> Vec<String> {
        match plan {
            Plan::Invalid(problems) => problems,
            other => panic!("expected invalid annotations, got {other:?}"),
        }
    }

    fn resource(container: &Container, kind: &str, name: &str) -> Option<String> {
        let resources = container.resources.as_ref()?;
        let map = if kind == "requests" {
            resources.requests.as_ref()
        } else {
            resources.limits.as_ref()
        };
        map?.get(name).map(|q| q.0.clone())
    }

    #[test]
    fn quantities_parse_like_kubernetes() {
        let nanos = |text| parse_quantity(text).map(|n| n.0);
        assert_eq!(nanos("1"), Ok(1_000_000_000));
        assert_eq!(nanos("100m"), Ok(100_000_000));
        assert_eq!(nanos("0.5"), Ok(500_000_000));
        assert_eq!(nanos(".5"), Ok(500_000_000));
        assert_eq!(nanos("5."), Ok(5_000_000_000));
        assert_eq!(nanos("+2"), Ok(2_000_000_000));
        assert_eq!(nanos("64Mi"), Ok(64 * 1024 * 1024 * 1_000_000_000));
        assert_eq!(nanos("1.5Gi"), Ok(1536 * 1024 * 1024 * 1_000_000_000));
        assert_eq!(nanos("2k"), Ok(2_000 * 1_000_000_000));
        assert_eq!(nanos("1e3"), Ok(1_000 * 1_000_000_000));
        assert_eq!(nanos("1E"), Ok(10u128.pow(27)));
        assert_eq!(nanos("5e-3"), Ok(5_000_000));
        assert_eq!(nanos("1e-12"), Ok(1), "sub-nano values round up");
        assert_eq!(nanos("250n"), Ok(250));
        assert_eq!(nanos("3u"), Ok(3_000));
        assert_eq!(nanos("0"), Ok(0));
        assert!(parse_quantity("64Mi").unwrap() > parse_quantity("64M").unwrap());
        for bad in [
            "", "lots", "Mi", "1.2.3", "1 Mi", " 1", "1MiB", "1e", "1ee3", "0x10", "1K", "1mi",
            "1e3.5",
        ] {
            assert_eq!(
                parse_quantity(bad),
                Err("is not a quantity (e.g. 100m, 0.5, 64Mi)"),
                "{bad:?} should not parse"
            );
        }
        assert_eq!(parse_quantity("-1"), Err("must not be negative"));
        assert_eq!(parse_quantity("1e40"), Err("is too large"));
        assert_eq!(
            parse_quantity("99999999999999999999999999999999999999999"),
            Err("is too large")
        );
        assert_eq!(parse_quantity("999999999999Ei"), Err("is too large"));
    }

    #[test]
    fn the_default_config_is_valid_and_inconsistent_ones_are_not() {
        InjectionConfig::default().validate().unwrap();
        let same_ports = InjectionConfig {
            proxy_port: 9901,
            ..InjectionConfig::default()
        };
        assert!(same_ports.validate().is_err());
        let bad_policy = InjectionConfig {
            image_pull_policy: Some("Sometimes".to_owned()),
            ..InjectionConfig::default()
        };
        assert!(bad_policy.validate().is_err());
        let mut config = InjectionConfig::default();
        if let Some(requests) = config.resources.requests.as_mut() {
            requests.insert("memory".to_owned(), Quantity("128Mi".to_owned()));
        }
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("memory request 128Mi exceeds the memory limit 64Mi"),
            "{err}"
        );
        let mut bad_limit = InjectionConfig::default();
        bad_limit.resources.limits = Some(BTreeMap::from([(
            "cpu".to_owned(),
            Quantity("fast".to_owned()),
        )]));
        assert!(bad_limit.validate().is_err());
    }

    #[test]
    fn only_pods_that_ask_are_injected() {
        let config = InjectionConfig::default();
        assert_eq!(plan(&config, &pod(&[])), Plan::Skip);
        assert_eq!(plan(&config, &pod(&[(INJECT, "false")])), Plan::Skip);
        assert_eq!(plan(&config, &pod(&[(INJECT, "FALSE")])), Plan::Skip);
        let (container, warnings) = injected(plan(&config, &pod(&[(INJECT, "true")])));
        assert_eq!(container.name, CONTAINER_NAME);
        assert!(warnings.is_empty(), "{warnings:?}");
        injected(plan(&config, &pod(&[(INJECT, " True ")])));
        let problems = invalid(plan(&config, &pod(&[(INJECT, "yes")])));
        assert_eq!(
            problems,
            [r#"breakwater.io/inject: "yes" is not "true" or "false"; sidecar not injected"#]
        );
    }

    #[test]
    fn injected_pods_are_left_alone() {
        let config = InjectionConfig::default();
        assert_eq!(
            plan(&config, &pod(&[(INJECT, "true"), (INJECTED, "0.1.0")])),
            Plan::AlreadyInjected
        );
        let mut by_hand = pod(&[(INJECT, "true")]);
        if let Some(spec) = by_hand.spec.as_mut() {
            spec.containers.push(Container {
                name: CONTAINER_NAME.to_owned(),
                ..Container::default()
            });
        }
        assert_eq!(plan(&config, &by_hand), Plan::AlreadyInjected);
    }

    #[test]
    fn the_proxy_port_annotation_sets_the_http_port() {
        let config = InjectionConfig::default();
        let (container, _) = injected(plan(
            &config,
            &pod(&[(INJECT, "true"), (PROXY_PORT, "9090")]),
        ));
        let ports: Vec<(Option<String>, i32)> = container
            .ports
            .unwrap()
            .into_iter()
            .map(|p| (p.name, p.container_port))
            .collect();
        assert_eq!(
            ports,
            [
                (Some("http".to_owned()), 9090),
                (Some("admin".to_owned()), 9901)
            ]
        );
        for (bad, reason) in [
            ("0", r#""0" is not a port number (1-65535)"#),
            ("65536", r#""65536" is not a port number (1-65535)"#),
            ("-1", r#""-1" is not a port number (1-65535)"#),
            ("http", r#""http" is not a port number (1-65535)"#),
            ("", r#""" is not a port number (1-65535)"#),
            ("9901", "9901 is the sidecar's admin port"),
        ] {
            let problems = invalid(plan(&config, &pod(&[(INJECT, "true"), (PROXY_PORT, bad)])));
            assert_eq!(
                problems,
                [format!(
                    "breakwater.io/proxy-port: {reason}; sidecar not injected"
                )],
                "proxy-port {bad:?}"
            );
        }
    }

    #[test]
    fn resource_annotations_override_requests_and_limits() {
        let config = InjectionConfig::default();
        let (container, _) = injected(plan(
            &config,
            &pod(&[
                (INJECT, "true"),
                (PROXY_CPU, "100m"),
                (PROXY_MEMORY, "32Mi"),
                (PROXY_CPU_LIMIT, "1"),
                (PROXY_MEMORY_LIMIT, "128Mi"),
            ]),
        ));
        assert_eq!(
            resource(&container, "requests", "cpu").as_deref(),
            Some("100m")
        );
        assert_eq!(
            resource(&container, "requests", "memory").as_deref(),
            Some("32Mi")
        );
        assert_eq!(resource(&container, "limits", "cpu").as_deref(), Some("1"));
        assert_eq!(
            resource(&container, "limits", "memory").as_deref(),
            Some("128Mi")
        );

        // Defaults stay where no annotation says otherwise.
        let (container, _) = injected(plan(&config, &pod(&[(INJECT, "true"), (PROXY_CPU, "50m")])));
        assert_eq!(
            resource(&container, "requests", "cpu").as_deref(),
            Some("50m")
        );
        assert_eq!(
            resource(&container, "requests", "memory").as_deref(),
            Some("16Mi")
        );
        assert_eq!(
            resource(&container, "limits", "memory").as_deref(),
            Some("64Mi")
        );
        assert_eq!(resource(&container, "limits", "cpu"), None);
    }

    #[test]
    fn bad_resource_annotations_are_named() {
        let config = InjectionConfig::default();
        let problems = invalid(plan(
            &config,
            &pod(&[(INJECT, "true"), (PROXY_MEMORY, "lots"), (PROXY_CPU, "-1")]),
        ));
        assert_eq!(
            problems,
            [
                r#"breakwater.io/proxy-cpu: "-1" must not be negative; sidecar not injected"#,
                r#"breakwater.io/proxy-memory: "lots" is not a quantity (e.g. 100m, 0.5, 64Mi); sidecar not injected"#,
            ]
        );
        // A request above the (default) limit would make the API server reject the pod.
        let problems = invalid(plan(
            &config,
            &pod(&[(INJECT, "true"), (PROXY_MEMORY, "128Mi")]),
        ));
        assert_eq!(
            problems,
            [
                "breakwater.io/proxy-memory: the memory request 128Mi exceeds the limit 64Mi; sidecar not injected"
            ]
        );
        let problems = invalid(plan(
            &config,
            &pod(&[(INJECT, "true"), (PROXY_MEMORY_LIMIT, "8Mi")]),
        ));
        assert_eq!(
            problems,
            [
                "breakwater.io/proxy-memory-limit: the memory request 16Mi exceeds the limit 8Mi; sidecar not injected"
            ]
        );
    }

    #[test]
    fn port_clashes_block_and_name_clashes_warn() {
        let config = InjectionConfig::default();
        let mut clash = pod(&[(INJECT, "true")]);
        if let Some(spec) = clash.spec.as_mut() {
            spec.containers[0].ports = Some(vec![ContainerPort {
                name: Some("http".to_owned()),
                container_port: 8080,
                ..ContainerPort::default()
            }]);
        }
        let problems = invalid(plan(&config, &clash));
        assert_eq!(
            problems,
            [
                r#"breakwater.io/inject: port 8080 is already declared by container "app"; set breakwater.io/proxy-port; sidecar not injected"#
            ]
        );
        if let Some(annotations) = clash.metadata.annotations.as_mut() {
            annotations.insert(PROXY_PORT.to_owned(), "8081".to_owned());
        }
        let (_, warnings) = injected(plan(&config, &clash));
        assert_eq!(
            warnings,
            [
                r#"breakwater: container "app" also names a port "http"; a Service targetPort "http" may reach it instead of the sidecar"#
            ]
        );
        // UDP on the same number does not clash.
        if let Some(spec) = clash.spec.as_mut() {
            spec.containers[0].ports = Some(vec![ContainerPort {
                container_port: 9901,
                protocol: Some("UDP".to_owned()),
                ..ContainerPort::default()
            }]);
        }
        injected(plan(&config, &clash));
        if let Some(spec) = clash.spec.as_mut() {
            spec.containers[0].ports = Some(vec![ContainerPort {
                container_port: 9901,
                ..ContainerPort::default()
            }]);
        }
        let problems = invalid(plan(&config, &clash));
        assert_eq!(
            problems,
            [
                r#"breakwater.io/inject: the sidecar's admin port 9901 is already declared by container "app"; sidecar not injected"#
            ]
        );
    }

    #[test]
    fn host_network_pods_and_unknown_annotations() {
        let config = InjectionConfig::default();
        let mut host = pod(&[(INJECT, "true")]);
        if let Some(spec) = host.spec.as_mut() {
            spec.host_network = Some(true);
        }
        assert_eq!(invalid(plan(&config, &host)).len(), 1);
        let (_, warnings) = injected(plan(
            &config,
            &pod(&[
                (INJECT, "true"),
                ("breakwater.io/proxy-prot", "9090"),
                ("other.io/x", "y"),
            ]),
        ));
        assert_eq!(
            warnings,
            ["breakwater: unknown annotation breakwater.io/proxy-prot ignored"]
        );
    }

    #[test]
    fn the_patch_appends_the_container_and_marks_the_pod() {
        let config = InjectionConfig::default();
        let original = pod(&[(INJECT, "true")]);
        let (container, _) = injected(plan(&config, &original));
        let patch = injection_patch(&container, "9.9.9").unwrap();
        let mut doc = serde_json::to_value(&original).unwrap();
        json_patch::patch(&mut doc, &patch).unwrap();
        let patched: Pod = serde_json::from_value(doc).unwrap();
        let names: Vec<_> = patched
            .spec
            .as_ref()
            .unwrap()
            .containers
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(names, ["app", "breakwater"]);
        assert_eq!(
            patched
                .metadata
                .annotations
                .as_ref()
                .unwrap()
                .get(INJECTED)
                .map(String::as_str),
            Some("9.9.9")
        );
        assert_eq!(plan(&config, &patched), Plan::AlreadyInjected);
    }
}
