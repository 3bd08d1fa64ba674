//! The policy model: spec types (file format and CRD schema), validation and compilation.

pub mod compile;
pub mod error;
pub mod file;
pub mod resilience;
pub mod schema;
pub mod spec;
pub mod units;

pub use compile::{PolicyConfig, PolicyId, compile_policy};
pub use error::{ConfigError, FieldError};
pub use spec::{PolicyDocument, ResiliencePolicySpec};

/// Parses YAML text holding one or more `ResiliencePolicy` documents (`---` separated).
///
/// Empty documents are skipped. Shape errors carry the field path (`spec.listener.port`).
pub fn parse_documents(text: &str, origin: &str) -> Result<Vec<PolicyDocument>, ConfigError> {
    let values: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(text).map_err(|e| ConfigError::Syntax {
            origin: origin.to_owned(),
            message: e.to_string(),
        })?;
    let mut docs = Vec::new();
    for (index, value) in values.into_iter().enumerate() {
        if value.is_null() {
            continue;
        }
        let doc: PolicyDocument = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            ConfigError::Syntax {
                origin: format!("{origin} document {}", index + 1),
                message: if path == "." {
                    e.into_inner().to_string()
                } else {
                    format!("{path}: {}", e.into_inner())
                },
            }
        })?;
        docs.push(doc);
    }
    Ok(docs)
}

/// Parses and compiles every policy in `text`, checking cross-policy rules (listener conflicts).
///
/// `Err` carries every invalid field of every document, each tagged with its document.
pub fn load_policies(text: &str, origin: &str) -> Result<Vec<PolicyConfig>, ConfigError> {
    let docs = parse_documents(text, origin)?;
    if docs.is_empty() {
        return Err(ConfigError::Invalid {
            origin: origin.to_owned(),
            errors: vec![FieldError::new("", "no ResiliencePolicy document found")],
        });
    }
    let mut errors = Vec::new();
    let mut policies = Vec::new();
    let mut labels = Vec::new();
    for (index, doc) in docs.iter().enumerate() {
        let label = format!(
            "document {} ({}/{})",
            index + 1,
            doc.metadata.namespace.as_deref().unwrap_or("default"),
            doc.metadata.name
        );
        match compile_policy(doc) {
            Ok(policy) => {
                if let Some(first) = policies
                    .iter()
                    .position(|p: &PolicyConfig| p.id == policy.id)
                {
                    errors.push(FieldError {
                        document: Some(label.clone()),
                        ..FieldError::new(
                            "metadata.name",
                            format!(
                                "policy {} is defined twice (also {})",
                                policy.id, labels[first]
                            ),
                        )
                    });
                }
                policies.push(policy);
                labels.push(label);
            }
            Err(errs) => errors.extend(errs.into_iter().map(|e| FieldError {
                document: Some(label.clone()),
                ..e
            })),
        }
    }
    for (index, conflict) in compile::check_listener_conflicts(&policies) {
        errors.push(FieldError {
            document: Some(labels[index].clone()),
            ..conflict
        });
    }
    if errors.is_empty() {
        Ok(policies)
    } else {
        Err(ConfigError::Invalid {
            origin: origin.to_owned(),
            errors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = "apiVersion: breakwater.io/v1alpha1\nkind: ResiliencePolicy\n";

    fn errors_of(yaml: &str) -> Vec<String> {
        match load_policies(yaml, "test.yaml") {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid { errors, .. }) => errors
                .iter()
                .map(|e| format!("{}: {}", e.path, e.message))
                .collect(),
            Err(other) => vec![other.to_string()],
        }
    }

    #[test]
    fn the_smallest_policy_is_one_backend_with_every_default() {
        let yaml = format!(
            "{HEAD}metadata: {{name: tiny}}\nspec:\n  backends: [{{name: app, url: \"http://127.0.0.1:3000\"}}]\n"
        );
        let policies = load_policies(&yaml, "t").unwrap();
        let p = &policies[0];
        assert_eq!(p.id.to_string(), "default/tiny");
        assert_eq!(p.listener.addr.port(), 8080);
        assert_eq!(p.timeouts, compile::Timeouts::default());
        assert_eq!(p.retry, resilience::RetryConfig::implicit());
        assert!(p.circuit_breaker.enabled, "breakers are on by default");
        assert!(
            p.health_check.is_none(),
            "health checks need a path: off unless asked for"
        );
    }

    #[test]
    fn every_bad_field_is_reported_with_its_path() {
        let yaml = format!(
            "{HEAD}metadata: {{name: bad}}\nspec:\n  backends:\n    - {{name: a, url: \"http://127.0.0.1:1\"}}\n    - {{name: b, url: \"ftp://x\"}}\n  timeouts: {{connect: banana, perTry: 20s, request: 10s}}\n  retry: {{maxAttempts: 0, backoff: {{multiplier: 0.5}}}}\n  circuitBreaker: {{failureRatio: 1.5, maxEjectionPercent: 101}}\n  healthCheck: {{path: healthz, expectedStatuses: [\"200-199\"]}}\n  rateLimit: {{perClient: {{requestsPerSecond: 0, key: {{header: \"bad header\"}}}}}}\n  cache: {{enabled: true, maxBytes: 1Ki, maxObjectBytes: 2Ki, staleIfError: soon}}\n  forwarding: {{addHeaders: [Via, XForwarded, Via]}}\n"
        );
        let errors = errors_of(&yaml);
        for expected in [
            "spec.backends[1].url: unsupported scheme",
            "spec.timeouts.connect: invalid duration \"banana\"",
            "spec.timeouts.perTry: 20s is longer than spec.timeouts.request (10s)",
            "spec.retry.maxAttempts: must be at least 1",
            "spec.retry.backoff.multiplier",
            "spec.circuitBreaker.failureRatio",
            "spec.circuitBreaker.maxEjectionPercent",
            "spec.healthCheck.path",
            "spec.healthCheck.expectedStatuses[0]",
            "spec.rateLimit.perClient.requestsPerSecond",
            "spec.rateLimit.perClient.key.header: invalid header name",
            "spec.cache.maxObjectBytes: 2048 is larger than spec.cache.maxBytes (1024)",
            "spec.cache.staleIfError: invalid duration",
            "spec.forwarding.addHeaders[2]: Via is listed twice",
        ] {
            assert!(
                errors.iter().any(|e| e.starts_with(expected)),
                "expected an error starting {expected:?} in {errors:#?}"
            );
        }
    }

    #[test]
    fn shape_errors_carry_the_field_path() {
        let yaml = format!(
            "{HEAD}metadata: {{name: shape}}\nspec:\n  listener: {{port: 70000}}\n  backends: []\n"
        );
        let errors = errors_of(&yaml);
        assert!(errors[0].contains("spec.listener.port"), "{errors:?}");
        let yaml = format!("{HEAD}metadata: {{name: typo}}\nspec:\n  backend: []\n");
        let errors = errors_of(&yaml);
        assert!(
            errors[0].contains("unknown field `backend`"),
            "typos are caught: {errors:?}"
        );
        let yaml = format!(
            "{HEAD}metadata: {{name: family}}\nspec:\n  backends: [{{name: app, url: \"http://127.0.0.1:3000\"}}]\n  forwarding: {{addHeaders: [XForwardedFor]}}\n"
        );
        let errors = errors_of(&yaml);
        assert!(
            errors[0].contains("spec.forwarding.addHeaders") && errors[0].contains("XForwardedFor"),
            "an unknown header family names the field and the value: {errors:?}"
        );
    }

    #[test]
    fn add_headers_selects_the_forwarding_families() {
        let policy = |families: &str| {
            let yaml = format!(
                "{HEAD}metadata: {{name: fwd}}\nspec:\n  backends: [{{name: app, url: \"http://127.0.0.1:3000\"}}]\n{families}"
            );
            let forwarding = &load_policies(&yaml, "t").unwrap()[0].forwarding;
            (
                forwarding.add_x_forwarded,
                forwarding.add_forwarded,
                forwarding.add_via,
            )
        };
        assert_eq!(policy(""), (true, true, true), "all three by default");
        assert_eq!(
            policy("  forwarding: {trustedProxies: [10.0.0.0/8]}\n"),
            (true, true, true),
            "a forwarding block without addHeaders keeps all three"
        );
        assert_eq!(
            policy("  forwarding: {addHeaders: []}\n"),
            (false, false, false)
        );
        assert_eq!(
            policy("  forwarding: {addHeaders: [Via, Forwarded]}\n"),
            (false, true, true)
        );
    }

    #[test]
    fn multi_document_files_check_names_and_ports_across_documents() {
        let doc = |name: &str, port: u16| {
            format!(
                "{HEAD}metadata: {{name: {name}}}\nspec:\n  listener: {{port: {port}}}\n  backends: [{{name: app, url: \"http://127.0.0.1:3000\"}}]\n"
            )
        };
        let ok = format!("{}---\n{}", doc("one", 8080), doc("two", 8081));
        assert_eq!(load_policies(&ok, "t").unwrap().len(), 2);
        let clash = format!("{}---\n{}", doc("one", 8080), doc("two", 8080));
        let errors = errors_of(&clash);
        assert!(
            errors
                .iter()
                .any(|e| e.contains("port 8080 is already used by policy default/one")),
            "{errors:?}"
        );
        let twice = format!("{}---\n{}", doc("one", 8080), doc("one", 8081));
        assert!(
            errors_of(&twice)
                .iter()
                .any(|e| e.contains("defined twice"))
        );
    }

    #[test]
    fn service_scoped_limits_name_their_service_and_share_the_rate() {
        let spec = |rate: &str| {
            format!(
                "{HEAD}metadata: {{name: p, namespace: shop}}\nspec:\n  backends: [{{name: a, url: \"http://127.0.0.1:1\"}}]\n  rateLimit: {rate}\n"
            )
        };
        let errors = errors_of(&spec("{global: {requestsPerSecond: 10, scope: Service}}"));
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("spec.rateLimit.global.service: required")),
            "{errors:?}"
        );
        let errors = errors_of(&spec("{global: {requestsPerSecond: 10, service: web}}"));
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("spec.rateLimit.global.service: only with scope: Service")),
            "{errors:?}"
        );
        let errors = errors_of(&spec(
            "{perClient: {requestsPerSecond: 10, scope: Service, service: web}}",
        ));
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("spec.rateLimit.perClient.scope")),
            "{errors:?}"
        );

        let text =
            spec("{global: {requestsPerSecond: 9, burst: 10, scope: Service, service: web}}");
        let policies = load_policies(&text, "test").expect("valid");
        let mut limits = policies[0].rate_limit.clone().expect("rate limit");
        assert_eq!(
            limits.global_service,
            Some(("shop".to_owned(), "web".to_owned())),
            "the Service is looked up in the policy's namespace"
        );
        limits.share_global(3);
        let global = limits.global.expect("global");
        assert_eq!((global.requests_per_second, global.burst), (3.0, 4));
        let mut none_ready = policies[0].rate_limit.clone().expect("rate limit");
        none_ready.share_global(0);
        assert_eq!(
            none_ready.global.expect("global").burst,
            10,
            "no ready replica known: the whole rate"
        );
    }
}
