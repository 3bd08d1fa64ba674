//! The policy model: spec types (file format and CRD schema), validation and compilation.

pub mod compile;
pub mod error;
pub mod file;
pub mod resilience;
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
