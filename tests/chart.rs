//! The Helm chart (`charts/breakwater`) keeps the intent of the plain install in `manifests/`:
//! the same CRD, RBAC rules, image, args, env, probes, resources and security contexts, the
//! same injection webhook (wired to the server's route and port), and a dashboard that only
//! queries metric families the proxy exports.
//!
//! No `helm` binary runs here, so the chart is checked by parsing its files: literal YAML blocks
//! of the templates (which must not contain template actions), blocks rendered for the default
//! values by the few template constructs they use (`render_block`), `values.yaml`,
//! `Chart.yaml` and the dashboard JSON. `charts/breakwater/README.md`
//! says how to run `helm lint` and `helm template` where Helm is installed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> PathBuf {
    root().join("charts/breakwater")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn yaml(path: &Path) -> Value {
    serde_saphyr::from_str(&read(path))
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()))
}

/// The documents of a multi-document YAML file.
fn yaml_documents(path: &Path) -> Vec<Value> {
    serde_saphyr::from_multiple(&read(path))
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()))
}

fn values() -> Value {
    yaml(&chart().join("values.yaml"))
}

/// The documents of kind `kind` in a manifest file, in file order.
fn manifest_objects(file: &str, kind: &str) -> Vec<Value> {
    yaml_documents(&root().join(file))
        .into_iter()
        .filter(|doc| doc["kind"] == kind)
        .collect()
}

/// The operator Deployment of `manifests/operator.yaml`.
fn manifest_operator_deployment() -> Value {
    let mut deployments = manifest_objects("manifests/operator.yaml", "Deployment");
    assert_eq!(deployments.len(), 1, "one operator Deployment");
    deployments.remove(0)
}

/// Every top-level `rules:` block of `text`, parsed, in order. The blocks must be literal YAML:
/// what the test compares is what Helm renders.
fn rules_blocks(text: &str, what: &str) -> Vec<Value> {
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim_end() != "rules:" {
            i += 1;
            continue;
        }
        let mut block = String::from("rules:\n");
        i += 1;
        while i < lines.len() && (lines[i].starts_with(' ') || lines[i].trim().is_empty()) {
            block.push_str(lines[i]);
            block.push('\n');
            i += 1;
        }
        assert!(
            !block.contains("{{"),
            "{what}: a rules block must be literal YAML, found a template action in\n{block}"
        );
        let parsed: Value = serde_saphyr::from_str(&block)
            .unwrap_or_else(|e| panic!("{what}: rules block is not YAML ({e}):\n{block}"));
        assert!(
            parsed["rules"].is_array(),
            "{what}: rules should be a list:\n{block}"
        );
        blocks.push(parsed["rules"].clone());
    }
    blocks
}

/// The literal start of the block under the line `header` (e.g. `"          args:"`): its more
/// indented lines up to the first template action, parsed as the value of that key. The part
/// after the first action is what `values.yaml` fills in.
fn literal_block_prefix(text: &str, header: &str, what: &str) -> Value {
    let indent = header.len() - header.trim_start().len();
    let mut lines = text.lines().skip_while(|line| *line != header);
    assert!(lines.next().is_some(), "{what}: no line `{header}`");
    let mut block = format!("{}\n", header.trim());
    for line in lines {
        let line_indent = line.len() - line.trim_start().len();
        if line.contains("{{") || (!line.trim().is_empty() && line_indent <= indent) {
            break;
        }
        block.push_str(line);
        block.push('\n');
    }
    let parsed: Value = serde_saphyr::from_str(&block)
        .unwrap_or_else(|e| panic!("{what}: `{header}` block is not YAML ({e}):\n{block}"));
    parsed[header.trim().trim_end_matches(':')].clone()
}

/// The release the plain manifests correspond to: `helm install breakwater -n breakwater-system`.
const RELEASE_NAMESPACE: &str = "breakwater-system";

/// The value at `path` (`.Values.a.b`, `.Release.Namespace`, or a template variable of
/// `variables`) for the default values.
fn template_value(path: &str, variables: &[(&str, Value)], what: &str) -> Value {
    if let Some((_, value)) = variables.iter().find(|(name, _)| *name == path) {
        return value.clone();
    }
    if path == ".Release.Namespace" {
        return RELEASE_NAMESPACE.into();
    }
    let Some(rest) = path.strip_prefix(".Values.") else {
        panic!("{what}: the test cannot evaluate `{path}`");
    };
    let mut value = values();
    for key in rest.split('.') {
        value = value[key].clone();
    }
    value
}

/// Helm's truthiness: empty strings, lists and maps, false, 0 and null are false.
fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// One `{{ ... }}` expression: a value or an `include`, piped through `quote` / `toJson`.
fn render_expression(expr: &str, variables: &[(&str, Value)], what: &str) -> String {
    let mut stages = expr.split('|').map(str::trim);
    let head = stages.next().unwrap_or_default();
    let mut value = match head {
        r#"include "breakwater.image" ."# => {
            let values = values();
            let tag = match values["image"]["tag"].as_str().unwrap() {
                "" => yaml(&chart().join("Chart.yaml"))["appVersion"].clone(),
                tag => tag.into(),
            };
            Value::String(format!(
                "{}:{}",
                values["image"]["repository"].as_str().unwrap(),
                tag.as_str().unwrap()
            ))
        }
        r#"include "breakwater.webhook.secretName" ."# => "breakwater-webhook-tls".into(),
        r#"include "breakwater.operator.fullname" ."# => "breakwater-operator".into(),
        path => template_value(path, variables, what),
    };
    for stage in stages {
        value = match stage {
            "quote" => Value::String(serde_json::to_string(&plain(&value)).unwrap()),
            "toJson" => Value::String(serde_json::to_string(&value).unwrap()),
            other => panic!("{what}: the test cannot evaluate `| {other}`"),
        };
    }
    plain(&value)
}

/// A value as a template prints it.
fn plain(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The block under the line `header` (its more indented lines) as Helm renders it with the
/// default values, parsed as the value of that key. Understands what the operator's templates
/// use there: `if`/`with`/`range` over a value (only false ones may guard a body that uses `.`),
/// `end`, and expressions `render_expression` knows; anything else fails the test. The block
/// ends at a less indented line or an `end` that closes a block opened before `header`.
fn render_block(text: &str, header: &str, variables: &[(&str, Value)], what: &str) -> Value {
    let indent_of = |line: &str| line.len() - line.trim_start().len();
    let indent = indent_of(header);
    let mut lines = text.lines().skip_while(|line| *line != header);
    assert!(lines.next().is_some(), "{what}: no line `{header}`");
    let control = regex::Regex::new(r"^\{\{-?\s*(if|with|range)\s+(.+?)\s*-?\}\}$").unwrap();
    let expression = regex::Regex::new(r"\{\{-?\s*(.+?)\s*-?\}\}").unwrap();
    let end = regex::Regex::new(r"^\{\{-?\s*end\s*-?\}\}$").unwrap();
    let mut open: Vec<bool> = Vec::new();
    let mut block = format!("{}\n", header.trim());
    for line in lines {
        let trimmed = line.trim();
        if !trimmed.is_empty() && !trimmed.starts_with("{{") && indent_of(line) <= indent {
            break;
        }
        if let Some(captures) = control.captures(trimmed) {
            let on = truthy(&template_value(&captures[2], variables, what));
            assert!(
                !on || &captures[1] == "if",
                "{what}: `{trimmed}` has a non-empty default; the test cannot render its body"
            );
            open.push(on);
            continue;
        }
        if end.is_match(trimmed) {
            if open.pop().is_none() {
                break;
            }
            continue;
        }
        if open.iter().any(|on| !on) || trimmed.starts_with('#') {
            continue;
        }
        let rendered = expression.replace_all(line, |captures: &regex::Captures| {
            render_expression(&captures[1], variables, what)
        });
        block.push_str(&rendered);
        block.push('\n');
    }
    let parsed: Value = serde_saphyr::from_str(&block)
        .unwrap_or_else(|e| panic!("{what}: `{header}` does not render to YAML ({e}):\n{block}"));
    parsed[header.trim().trim_end_matches(':')].clone()
}

/// Adds `protocol: TCP` to every port of a list (the chart spells out the default).
fn with_tcp(ports: &Value) -> Value {
    ports
        .as_array()
        .unwrap()
        .iter()
        .map(|port| {
            let mut port = port.clone();
            port["protocol"] = "TCP".into();
            port
        })
        .collect()
}

#[test]
fn the_chart_crd_is_the_repository_crd() {
    let ours = read(&root().join("crds/resiliencepolicy.yaml"));
    let charted = read(&chart().join("crds/resiliencepolicy.yaml"));
    assert!(
        ours == charted,
        "charts/breakwater/crds/resiliencepolicy.yaml differs from crds/resiliencepolicy.yaml; \
         copy it: cp crds/resiliencepolicy.yaml charts/breakwater/crds/"
    );
}

#[test]
fn chart_version_and_app_version_are_the_crate_version() {
    let chart_yaml = yaml(&chart().join("Chart.yaml"));
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(chart_yaml["apiVersion"], "v2");
    assert_eq!(chart_yaml["name"], "breakwater");
    assert_eq!(
        chart_yaml["version"], version,
        "Chart.yaml version should be the crate version"
    );
    assert_eq!(
        chart_yaml["appVersion"], version,
        "Chart.yaml appVersion should be the crate version"
    );
}

#[test]
fn operator_rbac_rules_are_those_of_the_plain_manifests() {
    let template = read(&chart().join("templates/rbac.yaml"));
    let charted = rules_blocks(&template, "templates/rbac.yaml");
    let expected: Vec<Value> = ["ClusterRole", "Role"]
        .iter()
        .flat_map(|kind| manifest_objects("manifests/operator.yaml", kind))
        .map(|object| object["rules"].clone())
        .collect();
    assert_eq!(
        expected.len(),
        2,
        "manifests/operator.yaml: a ClusterRole and a Lease Role"
    );
    assert_eq!(
        charted, expected,
        "templates/rbac.yaml rules (ClusterRole, then the Lease Role) differ from manifests/operator.yaml"
    );
}

#[test]
fn sidecar_rbac_rules_are_those_of_the_plain_manifests() {
    let template = read(&chart().join("templates/sidecar-rbac.yaml"));
    let charted = rules_blocks(&template, "templates/sidecar-rbac.yaml");
    let expected: Vec<Value> = manifest_objects("manifests/sidecar-rbac.yaml", "Role")
        .into_iter()
        .map(|object| object["rules"].clone())
        .collect();
    assert_eq!(expected.len(), 1, "manifests/sidecar-rbac.yaml: one Role");
    assert_eq!(
        charted, expected,
        "templates/sidecar-rbac.yaml rules differ from manifests/sidecar-rbac.yaml"
    );
    // The default binding is the one the plain manifest makes.
    let binding = &manifest_objects("manifests/sidecar-rbac.yaml", "RoleBinding")[0];
    assert_eq!(
        values()["sidecarRbac"]["serviceAccountName"],
        binding["subjects"][0]["name"]
    );
    assert_eq!(values()["sidecarRbac"]["namespaces"], serde_json::json!([]));
}

#[test]
fn default_image_is_the_manifests_image() {
    let values = values();
    let chart_yaml = yaml(&chart().join("Chart.yaml"));
    let repository = values["image"]["repository"]
        .as_str()
        .expect("image.repository");
    // An empty tag means the chart's appVersion (see `breakwater.image` in _helpers.tpl).
    let tag = match values["image"]["tag"].as_str().expect("image.tag") {
        "" => chart_yaml["appVersion"].as_str().expect("appVersion"),
        tag => tag,
    };
    let charted = format!("{repository}:{tag}");
    let deployment = manifest_operator_deployment();
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["image"], charted,
        "values.yaml image defaults differ from manifests/operator.yaml"
    );
    assert_eq!(
        charted,
        format!(
            "ghcr.io/breakwater/breakwater:{}",
            env!("CARGO_PKG_VERSION")
        )
    );
    let helpers = read(&chart().join("templates/_helpers.tpl"));
    assert!(
        helpers.contains(".Values.image.tag | default .Chart.AppVersion"),
        "the image helper should default the tag to appVersion"
    );
    let deployment_template = read(&chart().join("templates/deployment.yaml"));
    assert!(deployment_template.contains(r#"image: {{ include "breakwater.image" . | quote }}"#));
}

#[test]
fn operator_deployment_defaults_are_those_of_the_plain_manifests() {
    let values = values();
    let operator = &values["operator"];
    let deployment = manifest_operator_deployment();
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let template = read(&chart().join("templates/deployment.yaml"));
    let what = "templates/deployment.yaml";

    assert_eq!(operator["replicas"], deployment["spec"]["replicas"]);
    assert_eq!(operator["replicas"], 2);
    assert_eq!(operator["resources"], container["resources"]);
    assert_eq!(operator["podSecurityContext"], pod["securityContext"]);
    assert_eq!(operator["securityContext"], container["securityContext"]);
    assert!(template.contains("- name: operator"));

    // Args, env, ports and the certificate mount, rendered for the default values.
    assert_eq!(
        render_block(&template, "          args:", &[], what),
        container["args"],
        "args differ from the manifest"
    );
    for optional in ["leaseDuration", "leaseName"] {
        assert_eq!(
            operator["leaderElection"][optional], "",
            "leaderElection.{optional} adds args: empty by default, as in the manifest"
        );
    }
    assert_eq!(operator["extraArgs"], serde_json::json!([]));
    assert_eq!(
        render_block(&template, "          env:", &[], what),
        container["env"]
    );
    assert_eq!(operator["extraEnv"], serde_json::json!([]));
    assert_eq!(
        render_block(&template, "          ports:", &[], what),
        with_tcp(&container["ports"])
    );
    assert_eq!(
        render_block(&template, "          volumeMounts:", &[], what),
        container["volumeMounts"]
    );
    assert_eq!(
        render_block(&template, "      volumes:", &[], what),
        pod["volumes"]
    );

    // Probes: the literal httpGet plus the timing from values.yaml.
    for probe in ["livenessProbe", "readinessProbe"] {
        let mut charted = literal_block_prefix(&template, &format!("          {probe}:"), what);
        for (key, value) in operator[probe].as_object().expect("probe timing in values") {
            charted[key] = value.clone();
        }
        assert_eq!(
            charted, container[probe],
            "{probe} differs from the manifest"
        );
    }

    // The PodDisruptionBudget.
    let pdb = &manifest_objects("manifests/operator.yaml", "PodDisruptionBudget")[0];
    assert_eq!(operator["podDisruptionBudget"]["enabled"], true);
    assert_eq!(
        operator["podDisruptionBudget"]["minAvailable"],
        pdb["spec"]["minAvailable"]
    );
}

#[test]
fn the_operator_service_is_that_of_the_plain_manifests() {
    let template = read(&chart().join("templates/service.yaml"));
    let service = &manifest_objects("manifests/operator.yaml", "Service")[0];
    assert_eq!(
        render_block(&template, "  ports:", &[], "templates/service.yaml"),
        with_tcp(&service["spec"]["ports"])
    );
}

/// The injection webhook: on by default with `failurePolicy: Ignore`, registered exactly as
/// `manifests/webhook.yaml` registers it, and every hop from the API server to the server's
/// route lines up: webhook config → Service port → container port → `--webhook-addr`, path →
/// `MUTATE_PODS_PATH`, Secret → mount → `--webhook-cert`/`--webhook-key`.
#[test]
fn the_webhook_is_wired_from_the_api_server_to_the_server_route() {
    use breakwater::kube::inject::InjectionConfig;
    use breakwater::kube::operator::webhook::{DEFAULT_ADDR, MUTATE_PODS_PATH};

    let values = values();
    let webhook_values = &values["webhook"];
    assert_eq!(webhook_values["enabled"], true);
    assert_eq!(
        webhook_values["failurePolicy"], "Ignore",
        "a webhook outage must not block pod creation by default"
    );
    assert_eq!(webhook_values["certManager"]["enabled"], false);

    // The registration renders to the plain manifest's (which has no caBundle: the chart's is
    // generated at install time).
    let what = "templates/webhook.yaml";
    let template = read(&chart().join("templates/webhook.yaml"));
    let variables = [
        ("$operator", Value::from("breakwater-operator")),
        ("$caBundle", Value::from("")),
    ];
    let charted = render_block(&template, "webhooks:", &variables, what);
    let manifest = &manifest_objects("manifests/webhook.yaml", "MutatingWebhookConfiguration")[0];
    assert_eq!(
        charted, manifest["webhooks"],
        "{what} webhooks differ from manifests/webhook.yaml"
    );
    assert_eq!(manifest["metadata"]["name"], "breakwater-operator");
    let hook = &charted[0];
    assert_eq!(hook["failurePolicy"], "Ignore");
    assert_eq!(
        hook["sideEffects"], "NoneOnDryRun",
        "dry runs have no side effects"
    );
    assert_eq!(hook["admissionReviewVersions"], serde_json::json!(["v1"]));
    assert_eq!(
        hook["rules"],
        serde_json::json!([{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                            "resources": ["pods"], "scope": "Namespaced"}])
    );
    let timeout = hook["timeoutSeconds"].as_u64().unwrap();
    assert!(
        (1..=10).contains(&timeout),
        "a short timeout, got {timeout}"
    );
    let service_ref = &hook["clientConfig"]["service"];
    assert_eq!(
        service_ref["path"], MUTATE_PODS_PATH,
        "the path the API server calls is the server's route"
    );
    assert!(template.contains("caBundle: {{ . }}") && template.contains("genCA"));
    assert!(template.contains("cert-manager.io/inject-ca-from"));
    assert!(template.contains(r#"lookup "v1" "Secret" .Release.Namespace $secretName"#));

    // API server → Service port → container port → --webhook-addr.
    let service = &manifest_objects("manifests/operator.yaml", "Service")[0];
    assert_eq!(service_ref["name"], service["metadata"]["name"]);
    assert_eq!(service_ref["namespace"], service["metadata"]["namespace"]);
    let service_port = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == service_ref["port"])
        .expect("the Service has the port the webhook config calls");
    let deployment = manifest_operator_deployment();
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let container_port = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == service_port["targetPort"])
        .expect("the container has the Service's target port");
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let flag = |name: &str| -> &str {
        let at = args.iter().position(|a| *a == name);
        at.and_then(|i| args.get(i + 1))
            .copied()
            .unwrap_or_else(|| panic!("the operator should get {name}"))
    };
    let addr: std::net::SocketAddr = flag("--webhook-addr").parse().unwrap();
    assert_eq!(
        addr, DEFAULT_ADDR,
        "the chart listens where the binary does by default"
    );
    assert_eq!(container_port["containerPort"], u64::from(addr.port()));

    // Secret → volume → mount → --webhook-cert / --webhook-key.
    let volume = &pod["volumes"][0];
    assert_eq!(volume["secret"]["secretName"], "breakwater-webhook-tls");
    assert_eq!(volume["secret"]["optional"], true);
    let mount = &container["volumeMounts"][0];
    assert_eq!(mount["name"], volume["name"]);
    let dir = mount["mountPath"].as_str().unwrap();
    assert_eq!(flag("--webhook-cert"), format!("{dir}/tls.crt"));
    assert_eq!(flag("--webhook-key"), format!("{dir}/tls.key"));
    let helpers = read(&chart().join("templates/_helpers.tpl"));
    assert!(helpers.contains(r#"printf "%s-webhook-tls" (include "breakwater.fullname" .)"#));

    // The injected sidecar's defaults are the binary's (and so demo-app.yaml's).
    let defaults = InjectionConfig::default();
    let sidecar = &webhook_values["sidecar"];
    assert_eq!(
        sidecar["resources"],
        serde_json::to_value(&defaults.resources).unwrap()
    );
    assert_eq!(sidecar["proxyPort"], u64::from(defaults.proxy_port));
    assert_eq!(sidecar["extraArgs"], serde_json::json!([]));
    assert_eq!(flag("--sidecar-image"), defaults.image);
    assert_eq!(
        flag("--sidecar-image-pull-policy"),
        values["image"]["pullPolicy"]
    );
}

#[test]
fn values_parse_and_optional_parts_are_off_by_default() {
    let values = values();
    assert_eq!(values["monitoring"]["serviceMonitor"]["enabled"], false);
    assert_eq!(values["monitoring"]["podMonitor"]["enabled"], false);
    assert_eq!(values["dashboard"]["enabled"], false);
    assert_eq!(values["dashboard"]["labels"]["grafana_dashboard"], "1");
    let security = &values["operator"]["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let pod_security = &values["operator"]["podSecurityContext"];
    assert_eq!(pod_security["runAsNonRoot"], true);
    assert_eq!(pod_security["runAsUser"], 65532);
    assert_eq!(pod_security["seccompProfile"]["type"], "RuntimeDefault");
}

#[test]
fn monitors_need_their_flag_and_the_prometheus_operator_api() {
    for (file, flag) in [
        ("servicemonitor.yaml", ".Values.monitoring.serviceMonitor"),
        ("podmonitor.yaml", ".Values.monitoring.podMonitor"),
    ] {
        let text = read(&chart().join("templates").join(file));
        assert!(
            text.contains(&format!("{{{{- with {flag} }}}}"))
                && text.contains(
                    r#"{{- if and .enabled ($.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") }}"#
                ),
            "{file} should render only with its flag and the monitoring.coreos.com/v1 API"
        );
    }
    let dashboard = read(&chart().join("templates/dashboard-configmap.yaml"));
    assert!(dashboard.contains("{{- if .Values.dashboard.enabled }}"));
    assert!(dashboard.contains(r#".Files.Get "dashboards/breakwater.json""#));
}

/// Template actions open and close in pairs, and every block (`if`, `range`, `with`, `define`,
/// `block`) has its `end`: a cheap syntax guard where no `helm lint` runs.
#[test]
fn template_actions_are_balanced() {
    let opener = regex::Regex::new(r"\{\{-?\s*(if|range|with|define|block)\b").unwrap();
    let end = regex::Regex::new(r"\{\{-?\s*end\b").unwrap();
    let mut checked = 0;
    for entry in std::fs::read_dir(chart().join("templates")).unwrap() {
        let path = entry.unwrap().path();
        let text = read(&path);
        let name = path.display();
        assert_eq!(
            text.matches("{{").count(),
            text.matches("}}").count(),
            "{name}: unbalanced {{{{ }}}}"
        );
        assert_eq!(
            opener.find_iter(&text).count(),
            end.find_iter(&text).count(),
            "{name}: every if/range/with/define needs its end"
        );
        checked += 1;
    }
    assert!(checked >= 10, "expected every template, checked {checked}");
}

/// Metric names a PromQL expression refers to: identifiers that are not functions, aggregation
/// operators, keywords, label names (`by (...)`, `{...}`), strings, durations or variables.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const RESERVED: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "atan2",
        "inf",
        "nan",
        "start",
        "end",
    ];
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let bytes = expr.as_bytes();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // Skips from an opening delimiter at `i` to just past its match, stepping over strings.
    let skip_group = |mut i: usize, open: u8, close: u8| -> usize {
        let mut depth = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'"' | b'\'' | b'`' => {
                    let quote = bytes[i];
                    i += 1;
                    while i < bytes.len() && bytes[i] != quote {
                        i += if bytes[i] == b'\\' { 2 } else { 1 };
                    }
                }
                b if b == open => depth += 1,
                b if b == close => {
                    depth -= 1;
                    if depth == 0 {
                        return i + 1;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        i
    };
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'"' | b'\'' | b'`' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'{' => i = skip_group(i, b'{', b'}'),
            b'[' => i = skip_group(i, b'[', b']'),
            b'$' => {
                i += 1;
                if bytes.get(i) == Some(&b'{') {
                    i = skip_group(i, b'{', b'}');
                } else {
                    while i < bytes.len() && is_ident(bytes[i]) {
                        i += 1;
                    }
                }
            }
            b'0'..=b'9' | b'.' => {
                while i < bytes.len() && (is_ident(bytes[i]) || bytes[i] == b'.') {
                    i += 1;
                }
            }
            b if b.is_ascii_alphabetic() || b == b'_' || b == b':' => {
                let start = i;
                while i < bytes.len() && is_ident(bytes[i]) {
                    i += 1;
                }
                let ident = &expr[start..i];
                let mut next = i;
                while next < bytes.len() && bytes[next].is_ascii_whitespace() {
                    next += 1;
                }
                let followed_by_paren = bytes.get(next) == Some(&b'(');
                if LABEL_LISTS.contains(&ident) {
                    if followed_by_paren {
                        i = skip_group(next, b'(', b')');
                    }
                } else if !followed_by_paren && !RESERVED.contains(&ident) {
                    names.insert(ident.to_owned());
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// The PromQL of a Grafana variable query: `label_values(SELECTOR, label)` → `SELECTOR`.
fn variable_promql(query: &str) -> String {
    let query = query.trim();
    match query
        .strip_prefix("label_values(")
        .and_then(|rest| rest.strip_suffix(')'))
    {
        Some(args) => match args.rsplit_once(',') {
            Some((selector, _label)) => selector.to_owned(),
            None => String::new(), // label_values(label): no metric
        },
        None => query.to_owned(),
    }
}

/// Every PromQL expression of a dashboard: panel targets (rows included) and variable queries.
fn dashboard_queries(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(expr)) = map.get("expr") {
                out.push(expr.clone());
            }
            if map.get("type") == Some(&Value::String("query".into())) {
                for query in [map.get("definition"), map.get("query")]
                    .into_iter()
                    .flatten()
                {
                    let text = match query {
                        Value::String(text) => Some(text.as_str()),
                        Value::Object(object) => object.get("query").and_then(Value::as_str),
                        _ => None,
                    };
                    if let Some(text) = text {
                        out.push(variable_promql(text));
                    }
                }
            }
            for child in map.values() {
                dashboard_queries(child, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|item| dashboard_queries(item, out)),
        _ => {}
    }
}

/// The series names the proxy exposes: every `# TYPE` family, histograms as their
/// `_bucket`/`_sum`/`_count` series.
fn exported_series() -> BTreeSet<String> {
    let text = breakwater::metrics::Metrics::new().unwrap().render();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            panic!("malformed TYPE line: {line}");
        };
        match kind {
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            "summary" => {
                names.insert(name.to_owned());
                names.insert(format!("{name}_sum"));
                names.insert(format!("{name}_count"));
            }
            _ => {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

#[test]
fn the_metric_name_extractor_finds_metrics_and_skips_the_rest() {
    let names = |expr: &str| metric_names(expr).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (le, backend) (rate(proxy_request_duration_seconds_bucket{policy=~"$policy", code!~"5.."}[$__rate_interval])))"#
        ),
        ["proxy_request_duration_seconds_bucket"]
    );
    assert_eq!(
        names(
            "sum(rate(a_total[5m])) by (policy) / on (policy) group_left (x) sum without (code) (b) or vector(0)"
        ),
        ["a_total", "b"]
    );
    assert_eq!(
        names("count(circuit_breaker_state{endpoint=\"a}b\"} == 1) offset 1h"),
        ["circuit_breaker_state"]
    );
    assert_eq!(
        variable_promql(r#"label_values(proxy_requests_total{namespace=~"$namespace"}, policy)"#),
        r#"proxy_requests_total{namespace=~"$namespace"}"#
    );
    // A typo is caught: the name is not an exported family.
    let exported = exported_series();
    assert!(
        !metric_names("rate(proxy_request_total[1m])")
            .iter()
            .all(|name| exported.contains(name))
    );
}

#[test]
fn dashboard_queries_only_metric_families_the_proxy_exports() {
    let path = chart().join("dashboards/breakwater.json");
    let dashboard: Value = serde_json::from_str(&read(&path))
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    assert_eq!(dashboard["uid"], "breakwater");
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    assert!(
        queries.len() >= 15,
        "expected the dashboard's queries, found {queries:?}"
    );

    let exported = exported_series();
    let mut used = BTreeSet::new();
    for query in &queries {
        for name in metric_names(query) {
            assert!(
                exported.contains(&name),
                "the dashboard queries `{name}`, which the proxy does not export (in `{query}`)"
            );
            used.insert(name);
        }
    }
    // What the dashboard is for: traffic, errors, latency, breakers, health, retries, limits.
    for family in [
        "proxy_requests_total",
        "proxy_errors_total",
        "proxy_request_duration_seconds_bucket",
        "circuit_breaker_state",
        "backend_health",
        "proxy_retries_total",
        "proxy_retry_budget_exhausted_total",
        "rate_limit_rejected_total",
    ] {
        assert!(
            used.contains(family),
            "the dashboard has no panel on {family}"
        );
    }
}
