//! The plain-YAML install (`manifests/`) and the CRD validate against the Kubernetes 1.33 API
//! schemas offline, with `kubernetes-validate --strict` (unknown fields rejected). The example
//! policies are checked against the CRD schema and `breakwater validate` in `tests/crd.rs`.
//!
//! Needs `kubernetes-validate` (`pip install kubernetes-validate`; `tests/run.sh` installs it):
//! without it the test fails and says so.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};

use support::kubernetes_validate;

/// Every Kubernetes object file we ship: manifests (not the policies, which are custom
/// resources) and the CRD itself.
fn shipped_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("crds/resiliencepolicy.yaml")];
    for dir in ["manifests", "manifests/examples"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".yaml") && !name.starts_with("policy-") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

#[test]
fn manifests_and_crd_validate_against_the_kubernetes_schemas() {
    let files = shipped_files();
    assert!(
        files.len() >= 5,
        "expected the CRD, operator, webhook, sidecar RBAC and demo app, found {files:?}"
    );
    let output = kubernetes_validate()
        .args(&files)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "kubernetes-validate could not run ({e}): install it with \
                 `pip install kubernetes-validate` (tests/run.sh does this)"
            )
        });
    assert!(
        output.status.success(),
        "kubernetes-validate rejected a shipped manifest:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_validator_rejects_an_invalid_manifest() {
    // Guards the check above against a validator that accepts anything.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {replicas: two, selector: {}, template: {}}\n",
    )
    .unwrap();
    let status = kubernetes_validate()
        .arg(&bad)
        .output()
        .expect("kubernetes-validate runs (see the other test for how to install it)")
        .status;
    assert!(!status.success(), "an invalid Deployment must be rejected");
}

#[test]
fn every_manifest_uses_the_same_image_and_the_sidecar_role_only_reads() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let version = env!("CARGO_PKG_VERSION");
    let expected = format!("image: ghcr.io/breakwater/breakwater:{version}");
    for path in shipped_files() {
        let text = std::fs::read_to_string(&path).unwrap();
        for line in text
            .lines()
            .filter(|l| l.trim_start().starts_with("image:"))
        {
            let image = line.trim();
            if image.contains("breakwater") {
                assert_eq!(
                    image,
                    expected,
                    "{}: the Breakwater image should match the crate version",
                    path.display()
                );
            }
        }
        // Also where it is an argument (the operator's --sidecar-image).
        for (at, _) in text.match_indices("ghcr.io/breakwater/breakwater:") {
            let rest = &text[at..];
            let image = rest.split_whitespace().next().unwrap_or(rest);
            assert_eq!(
                image,
                format!("ghcr.io/breakwater/breakwater:{version}"),
                "{}: the Breakwater image should match the crate version",
                path.display()
            );
        }
    }
    let rbac = std::fs::read_to_string(root.join("manifests/sidecar-rbac.yaml")).unwrap();
    for verb in ["create", "update", "patch", "delete"] {
        assert!(
            !rbac.contains(&format!("\"{verb}\"")),
            "sidecars need only get/list/watch, found {verb}"
        );
    }
}
