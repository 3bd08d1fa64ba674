//! The file config source: one YAML file of policies, reloaded when it (or a file it names) changes.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::compile::{BackendTarget, PolicyConfig};
use super::error::{ConfigError, FieldError};

/// A policy file on disk.
#[derive(Clone, Debug)]
pub struct FileSource {
    path: PathBuf,
}

/// What a reload check compares: the file's bytes and the identity of every file the policies name.
///
/// Content (not mtime) is hashed for the policy file itself because Kubernetes ConfigMap volumes
/// and many editors replace files through renames that can keep a coarse mtime unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fingerprint(u64);

impl FileSource {
    /// A source reading `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The file this source reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads, validates and compiles the file. The standalone source has no cluster, so
    /// `service:` backends and Service-scoped rate limits are rejected here with their field
    /// path.
    pub fn load(&self) -> Result<(Vec<PolicyConfig>, Fingerprint), ConfigError> {
        let text = std::fs::read_to_string(&self.path).map_err(|source| ConfigError::Read {
            path: self.path.display().to_string(),
            source,
        })?;
        let origin = self.path.display().to_string();
        let policies = super::load_policies(&text, &origin)?;
        let mut errors = Vec::new();
        for policy in &policies {
            for (i, backend) in policy.backends.iter().enumerate() {
                if matches!(backend.target, BackendTarget::Service { .. }) {
                    errors.push(FieldError {
                        document: Some(format!("policy {}", policy.id)),
                        ..FieldError::new(
                            format!("spec.backends[{i}].service"),
                            "service backends need the Kubernetes sidecar (breakwater sidecar); use url or dns with breakwater run",
                        )
                    });
                }
            }
            if policy
                .rate_limit
                .as_ref()
                .is_some_and(|r| r.global_service.is_some())
            {
                errors.push(FieldError {
                    document: Some(format!("policy {}", policy.id)),
                    ..FieldError::new(
                        "spec.rateLimit.global.scope",
                        "scope: Service needs the Kubernetes sidecar to count the Service's ready replicas; use scope: Instance with breakwater run",
                    )
                });
            }
        }
        if !errors.is_empty() {
            return Err(ConfigError::Invalid { origin, errors });
        }
        let fingerprint = fingerprint_of(&text, &policies);
        Ok((policies, fingerprint))
    }

    /// A cheap check whether a reload could change anything: reads the file and stats the files
    /// the last good policies referenced.
    pub fn fingerprint(&self, last_good: &[PolicyConfig]) -> Result<Fingerprint, ConfigError> {
        let text = std::fs::read_to_string(&self.path).map_err(|source| ConfigError::Read {
            path: self.path.display().to_string(),
            source,
        })?;
        Ok(fingerprint_of(&text, last_good))
    }
}

fn fingerprint_of(text: &str, policies: &[PolicyConfig]) -> Fingerprint {
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    for path in referenced_files(policies) {
        path.hash(&mut hasher);
        if let Ok(meta) = std::fs::metadata(path) {
            meta.len().hash(&mut hasher);
            meta.modified()
                .ok()
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .hash(&mut hasher);
        }
    }
    Fingerprint(hasher.finish())
}

fn referenced_files(policies: &[PolicyConfig]) -> impl Iterator<Item = &Path> {
    policies.iter().flat_map(|p| {
        let listener = p
            .listener
            .tls
            .iter()
            .flat_map(|t| [t.cert_file.as_path(), t.key_file.as_path()]);
        let upstream = p
            .backends
            .iter()
            .filter_map(|b| b.tls.as_ref().and_then(|t| t.ca_file.as_deref()));
        listener.chain(upstream)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(spec: &str) -> Vec<String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.yaml");
        let text = format!(
            "apiVersion: breakwater.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {{name: p}}\nspec:\n{spec}"
        );
        std::fs::write(&path, text).expect("write");
        match FileSource::new(&path).load() {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid { errors, .. }) => {
                errors.iter().map(|e| e.path.clone()).collect()
            }
            Err(other) => vec![other.to_string()],
        }
    }

    #[test]
    fn cluster_only_features_are_refused_without_a_cluster() {
        assert_eq!(
            load("  backends: [{name: a, service: {name: web, port: http}}]\n"),
            vec!["spec.backends[0].service"]
        );
        assert_eq!(
            load(
                "  backends: [{name: a, url: \"http://127.0.0.1:1\"}]\n  rateLimit: {global: {requestsPerSecond: 5, scope: Service, service: web}}\n"
            ),
            vec!["spec.rateLimit.global.scope"]
        );
        assert!(
            load("  backends: [{name: a, url: \"http://127.0.0.1:1\"}]\n  rateLimit: {global: {requestsPerSecond: 5}}\n").is_empty(),
            "an instance-scoped limit runs anywhere"
        );
    }
}
