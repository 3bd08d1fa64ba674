//! The checked-in CRD matches the Rust types, is structural, and admits the example policies.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use serde_json::Value;

const CHECKED_IN: &str = "crds/resiliencepolicy.yaml";
const REGENERATE: &str = "cargo run -- crd > crds/resiliencepolicy.yaml";

fn generated() -> Value {
    serde_json::to_value(breakwater::kube::crd()).unwrap()
}

fn schema() -> Value {
    generated()["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

#[test]
fn checked_in_crd_is_current() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(CHECKED_IN);
    let on_disk = std::fs::read_to_string(&path).unwrap();
    let fresh = breakwater::kube::crd_yaml().unwrap();
    assert!(
        on_disk == fresh,
        "{CHECKED_IN} is stale against the Rust types; regenerate it with `{REGENERATE}`"
    );
    // What kubectl reads back must be the CRD itself, not just similar text.
    let parsed: Value = serde_saphyr::from_str(&on_disk).unwrap();
    assert_eq!(
        parsed,
        generated(),
        "{CHECKED_IN} does not parse back into the CRD"
    );
}

#[test]
fn crd_names_scope_and_subresources() {
    let crd = generated();
    assert_eq!(crd["metadata"]["name"], "resiliencepolicies.breakwater.io");
    let spec = &crd["spec"];
    assert_eq!(spec["group"], "breakwater.io");
    assert_eq!(spec["scope"], "Namespaced");
    assert_eq!(spec["names"]["kind"], "ResiliencePolicy");
    assert_eq!(spec["names"]["shortNames"], serde_json::json!(["rp"]));
    assert_eq!(
        spec["names"]["categories"],
        serde_json::json!(["breakwater"])
    );
    let version = &spec["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert_eq!(
        version["subresources"]["status"],
        serde_json::json!({}),
        "the status subresource must be on, so only /status writes change status"
    );
    let columns: Vec<(&str, &str)> = version["additionalPrinterColumns"]
        .as_array()
        .expect("printer columns")
        .iter()
        .map(|c| (c["name"].as_str().unwrap(), c["jsonPath"].as_str().unwrap()))
        .collect();
    for (name, path) in [
        (
            "Accepted",
            ".status.conditions[?(@.type==\"Accepted\")].status",
        ),
        ("Ready", ".status.backends.ready"),
        ("Age", ".metadata.creationTimestamp"),
    ] {
        assert!(
            columns.contains(&(name, path)),
            "expected printer column {name} at {path}, found {columns:?}"
        );
    }
}

/// Collects every way `schema` (at `path`) breaks the structural-schema rules.
fn structural_violations(path: &str, schema: &Value, out: &mut Vec<String>) {
    let Some(object) = schema.as_object() else {
        out.push(format!("{path}: schema is not an object"));
        return;
    };
    let int_or_string = object.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    let preserve = object.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if !object.contains_key("type") && !int_or_string && !preserve {
        out.push(format!("{path}: no type"));
    }
    if object.contains_key("$ref") {
        out.push(format!("{path}: $ref is not allowed"));
    }
    for combinator in ["anyOf", "oneOf", "allOf", "not"] {
        if object.contains_key(combinator) && !int_or_string {
            out.push(format!("{path}: untyped {combinator}"));
        }
    }
    if object.get("additionalProperties").is_some() && object.contains_key("properties") {
        out.push(format!(
            "{path}: properties and additionalProperties together"
        ));
    }
    if let Some(properties) = object.get("properties").and_then(Value::as_object) {
        for (name, child) in properties {
            structural_violations(&format!("{path}.{name}"), child, out);
        }
    }
    if let Some(items) = object.get("items") {
        structural_violations(&format!("{path}[]"), items, out);
    }
    if let Some(Value::Object(_)) = object.get("additionalProperties") {
        structural_violations(&format!("{path}{{}}"), &object["additionalProperties"], out);
    }
}

#[test]
fn schema_is_structural() {
    let mut violations = Vec::new();
    structural_violations("", &schema(), &mut violations);
    assert!(
        violations.is_empty(),
        "the CRD schema must be structural: {violations:#?}"
    );
}

#[test]
fn schema_carries_bounds_enums_patterns_and_cel_rules() {
    let schema = schema();
    let spec = &schema["properties"]["spec"]["properties"];
    let timeouts = &spec["timeouts"];
    assert!(
        timeouts["properties"]["perTry"]["pattern"].is_string(),
        "durations carry a pattern"
    );
    let rules = timeouts["x-kubernetes-validations"].to_string();
    assert!(
        rules.contains("duration(self.perTry) <= duration("),
        "perTry <= request is a CEL rule: {rules}"
    );
    let backend = &spec["backends"]["items"];
    assert!(
        backend["x-kubernetes-validations"]
            .to_string()
            .contains("has(self.url), has(self.dns), has(self.service)"),
        "exactly one of url/dns/service is a CEL rule"
    );
    assert_eq!(spec["backends"]["minItems"], 1);
    assert!(
        spec["backends"].get("default").is_none(),
        "a default of [] would contradict minItems and make the API server reject the CRD"
    );
    assert_eq!(
        spec["loadBalancing"]["properties"]["algorithm"]["enum"],
        serde_json::json!([
            "RoundRobin",
            "Random",
            "Weighted",
            "LeastConnections",
            "PeakEwma"
        ])
    );
    let breaker = &spec["circuitBreaker"]["properties"];
    assert_eq!(breaker["maxEjectionPercent"]["maximum"], 100.0);
    assert_eq!(breaker["failureThreshold"]["minimum"], 1.0);
    let size = &spec["limits"]["properties"]["maxRequestBodyBytes"];
    assert_eq!(
        size["x-kubernetes-int-or-string"], true,
        "sizes are int-or-string"
    );
    assert!(size["pattern"].is_string(), "size strings carry a pattern");
    let conditions = &schema["properties"]["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(
        conditions["x-kubernetes-list-map-keys"],
        serde_json::json!(["type"])
    );
}

/// A small OpenAPI validator for what our schema uses: types, unknown fields (which the API
/// server would prune), enums, bounds, patterns and int-or-string. CEL rules are not evaluated.
fn validate(path: &str, schema: &Value, value: &Value, out: &mut Vec<String>) {
    if value.is_null() {
        if schema["nullable"] != Value::Bool(true) {
            out.push(format!("{path}: null is not allowed"));
        }
        return;
    }
    if schema["x-kubernetes-int-or-string"] == Value::Bool(true) {
        match value {
            Value::Number(n) if n.is_i64() || n.is_u64() => {}
            Value::String(_) => {}
            other => out.push(format!("{path}: {other} is neither integer nor string")),
        }
    } else {
        let ok = match schema["type"].as_str() {
            Some("object") => value.is_object(),
            Some("array") => value.is_array(),
            Some("string") => value.is_string(),
            Some("integer") => value.is_i64() || value.is_u64(),
            Some("number") => value.is_number(),
            Some("boolean") => value.is_boolean(),
            other => {
                out.push(format!("{path}: schema type {other:?}"));
                return;
            }
        };
        if !ok {
            out.push(format!("{path}: {value} is not of type {}", schema["type"]));
            return;
        }
    }
    if let (Some(allowed), false) = (schema["enum"].as_array(), value.is_null()) {
        if !allowed.contains(value) {
            out.push(format!("{path}: {value} is not one of {allowed:?}"));
        }
    }
    if let (Some(min), Some(n)) = (schema["minimum"].as_f64(), value.as_f64()) {
        if n < min || (schema["exclusiveMinimum"] == Value::Bool(true) && n <= min) {
            out.push(format!("{path}: {n} is below the minimum {min}"));
        }
    }
    if let (Some(max), Some(n)) = (schema["maximum"].as_f64(), value.as_f64()) {
        if n > max {
            out.push(format!("{path}: {n} is above the maximum {max}"));
        }
    }
    if let (Some(pattern), Some(text)) = (schema["pattern"].as_str(), value.as_str()) {
        if !regex::Regex::new(pattern).unwrap().is_match(text) {
            out.push(format!("{path}: {text:?} does not match {pattern}"));
        }
    }
    match value {
        Value::Object(fields) => {
            let properties = schema["properties"].as_object();
            for (name, field) in fields {
                match properties.and_then(|p| p.get(name)) {
                    Some(child) => validate(&format!("{path}.{name}"), child, field, out),
                    None if schema["additionalProperties"].is_object() => validate(
                        &format!("{path}.{name}"),
                        &schema["additionalProperties"],
                        field,
                        out,
                    ),
                    None => out.push(format!("{path}.{name}: unknown field (would be pruned)")),
                }
            }
            for required in schema["required"].as_array().into_iter().flatten() {
                if !fields.contains_key(required.as_str().unwrap()) {
                    out.push(format!("{path}: missing required {required}"));
                }
            }
        }
        Value::Array(items) => {
            if let Some(min) = schema["minItems"].as_u64() {
                if (items.len() as u64) < min {
                    out.push(format!("{path}: fewer than {min} items"));
                }
            }
            for (index, item) in items.iter().enumerate() {
                validate(&format!("{path}[{index}]"), &schema["items"], item, out);
            }
        }
        _ => {}
    }
}

#[test]
fn example_policies_validate_against_the_crd_schema() {
    let schema = schema();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut paths = Vec::new();
    for dir in ["examples", "manifests/examples"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            // manifests/examples also holds plain Kubernetes objects (the demo app).
            if name.ends_with(".yaml") && (dir == "examples" || name.starts_with("policy-")) {
                paths.push(path);
            }
        }
    }
    let mut checked = 0;
    for path in paths {
        let text = std::fs::read_to_string(&path).unwrap();
        breakwater::config::load_policies(&text, &path.display().to_string())
            .unwrap_or_else(|e| panic!("{} should load: {e}", path.display()));
        let documents: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
        for document in documents.into_iter().filter(|d| !d.is_null()) {
            let mut errors = Vec::new();
            // metadata is the API server's ObjectMeta, not part of our schema.
            validate(
                "spec",
                &schema["properties"]["spec"],
                &document["spec"],
                &mut errors,
            );
            assert!(
                errors.is_empty(),
                "{} should pass the CRD schema: {errors:#?}",
                path.display()
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 5,
        "expected the example policies (examples/ and manifests/examples/), checked {checked}"
    );
}

#[test]
fn the_schema_check_rejects_what_the_api_server_would() {
    let schema = schema();
    let bad = serde_json::json!({
        "backends": [{"name": "a", "url": "ftp://x", "weight": 0}],
        "timeouts": {"connect": "30"},
        "loadBalancing": {"algorithm": "Fastest"},
        "limits": {"maxRequestBodyBytes": "1.5Mi"},
        "typo": true
    });
    let mut errors = Vec::new();
    validate("spec", &schema["properties"]["spec"], &bad, &mut errors);
    for expected in [
        "spec.backends[0].url",
        "spec.backends[0].weight",
        "spec.timeouts.connect",
        "spec.loadBalancing.algorithm",
        "spec.limits.maxRequestBodyBytes",
        "spec.typo",
    ] {
        assert!(
            errors.iter().any(|e| e.starts_with(expected)),
            "expected an error at {expected} in {errors:#?}"
        );
    }
}

#[test]
fn crd_subcommand_prints_the_checked_in_file() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .arg("crd")
        .output()
        .unwrap();
    assert!(output.status.success(), "breakwater crd should succeed");
    let on_disk =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(CHECKED_IN)).unwrap();
    assert!(
        String::from_utf8(output.stdout).unwrap() == on_disk,
        "`breakwater crd` output differs from {CHECKED_IN}; regenerate it with `{REGENERATE}`"
    );
}
