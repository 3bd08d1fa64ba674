//! The sidecar injection webhook over real TLS: the fixture AdmissionReviews of
//! `tests/fixtures/admission/` are POSTed to the operator's webhook server by a client that
//! trusts only a test CA. Returned JSON patches are applied to the fixture pods, which must
//! then deserialise as Pods with the sidecar and pass `kubernetes-validate --strict`; a second
//! review of a patched pod must be a no-op. Also: HTTP errors, dry runs, metrics, certificate
//! rotation, and the webhook inside a running operator.
//!
//! kube serialises `AdmissionResponse.patch` as a JSON array of bytes (the API server accepts
//! that as well as base64), so that is what these tests decode.
//!
//! Needs `kubernetes-validate` like `tests/manifests.rs` (`pip install kubernetes-validate`;
//! `tests/run.sh` installs it): without it the validation test fails and says so.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use breakwater::kube::inject::{self, InjectionConfig};
use breakwater::kube::operator::metrics::OperatorMetrics;
use breakwater::kube::operator::webhook::{
    self, MAX_REVIEW_BYTES, MUTATE_PODS_PATH, RunningWebhook, WebhookError, WebhookOptions,
};
use breakwater::kube::operator::{self, OperatorOptions};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::{Container, Pod};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::{Value, json};
use support::apiserver::ApiServer;
use support::{eventually, get, metric_sum};

const WAIT: Duration = Duration::from_secs(10);
/// The name the API server calls the webhook by (the chart's Service), plus loopback.
const SERVICE_DNS: &str = "breakwater-operator.breakwater-system.svc";

type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A private CA and a serving certificate signed by it, as PEM.
struct Pki {
    ca: String,
    cert: String,
    key: String,
}

/// A webhook serving the certificate in `dir`, with its own metrics.
struct Harness {
    webhook: RunningWebhook,
    metrics: Arc<OperatorMetrics>,
    dir: tempfile::TempDir,
}

/// What one review POST got back.
struct Answer {
    status: StatusCode,
    allow: Option<String>,
    body: Bytes,
}

impl Pki {
    fn new() -> Pki {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![SERVICE_DNS.to_owned(), "127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        Pki {
            ca: ca.pem(),
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    fn write(&self, dir: &Path) {
        // Written beside and renamed into place, as the kubelet swaps Secret files.
        for (name, text) in [("tls.crt", &self.cert), ("tls.key", &self.key)] {
            let tmp = dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, dir.join(name)).unwrap();
        }
    }

    /// An HTTPS client (HTTP/2 and HTTP/1.1 by ALPN) that trusts only this CA.
    fn client(&self) -> HttpsClient {
        self.client_with(true)
    }

    /// A TLS client configuration that trusts only this CA.
    fn tls_config(&self) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.ca.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
    }

    fn client_with(&self, http2: bool) -> HttpsClient {
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(self.tls_config())
            .https_only();
        let connector = if http2 {
            builder.enable_all_versions().build()
        } else {
            builder.enable_http1().build()
        };
        Client::builder(TokioExecutor::new()).build(connector)
    }
}

impl Pki {
    /// Sends `bytes` over a fresh TLS connection to `addr` and returns the first response
    /// head (up to the blank line) as text.
    async fn raw_exchange(&self, addr: SocketAddr, bytes: &[u8]) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let config = self.tls_config();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(SERVICE_DNS).unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .expect("TLS handshake with the webhook");
        tls.write_all(bytes).await.unwrap();
        let mut head = Vec::new();
        let mut chunk = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tokio::time::timeout(WAIT, tls.read(&mut chunk))
                .await
                .expect("a response within the wait")
                .unwrap();
            assert!(n > 0, "connection closed before a response head: {head:?}");
            head.extend_from_slice(&chunk[..n]);
        }
        String::from_utf8_lossy(&head).into_owned()
    }
}

impl Harness {
    /// Starts a webhook on loopback with `pki`'s certificate (written first unless `None`)
    /// and the default sidecar, checking the files every 50 ms.
    async fn start(pki: Option<&Pki>) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        if let Some(pki) = pki {
            pki.write(dir.path());
        }
        let metrics = Arc::new(OperatorMetrics::new().unwrap());
        let webhook = webhook::start(options(dir.path()), Arc::clone(&metrics))
            .await
            .expect("webhook starts");
        Harness {
            webhook,
            metrics,
            dir,
        }
    }

    fn url(&self, path: &str) -> String {
        url(self.webhook.addr(), path)
    }

    /// `webhook_requests_total{result}`.
    fn count(&self, result: &str) -> f64 {
        metric_sum(
            &self.metrics.render(),
            "webhook_requests_total",
            &[("result", result)],
        )
    }
}

fn options(dir: &Path) -> WebhookOptions {
    let mut options = WebhookOptions::new(dir.join("tls.crt"), dir.join("tls.key"));
    options.addr = "127.0.0.1:0".parse().unwrap();
    options.reload_interval = Duration::from_millis(50);
    options
}

fn url(addr: SocketAddr, path: &str) -> String {
    format!("https://127.0.0.1:{}{path}", addr.port())
}

fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/admission")
        .join(name)
}

fn fixture(name: &str) -> Value {
    let path = fixture_path(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

async fn send(client: &HttpsClient, method: Method, url: &str, body: Vec<u8>) -> Answer {
    let req = Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = client
        .request(req)
        .await
        .expect("the webhook should answer over TLS");
    let status = resp.status();
    let allow = resp
        .headers()
        .get("allow")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        allow,
        body,
    }
}

/// POSTs `review` to `/mutate-pods` and returns the response's `response` object, after
/// checking the envelope and that `uid` is the request's.
async fn review(client: &HttpsClient, addr: SocketAddr, review: &Value) -> Value {
    let answer = send(
        client,
        Method::POST,
        &url(addr, MUTATE_PODS_PATH),
        serde_json::to_vec(review).unwrap(),
    )
    .await;
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "a review should be answered 200, got {}: {}",
        answer.status,
        String::from_utf8_lossy(&answer.body)
    );
    let reply: Value = serde_json::from_slice(&answer.body).expect("the answer is JSON");
    assert_eq!(reply["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(reply["kind"], "AdmissionReview");
    let response = reply["response"].clone();
    assert_eq!(
        response["uid"], review["request"]["uid"],
        "the response uid must be the request's"
    );
    assert_eq!(
        response["allowed"], true,
        "the webhook never blocks a pod: {response}"
    );
    response
}

/// The JSON patch of a response, if it has one.
fn patch_of(response: &Value) -> Option<json_patch::Patch> {
    let patch = response.get("patch")?;
    assert_eq!(response["patchType"], "JSONPatch");
    let bytes: Vec<u8> = serde_json::from_value(patch.clone())
        .unwrap_or_else(|e| panic!("patch should be an array of bytes ({e}): {patch}"));
    Some(serde_json::from_slice(&bytes).expect("the patch is an RFC 6902 JSON patch"))
}

/// `review`'s object with `patch` applied.
fn patched_object(review: &Value, patch: &json_patch::Patch) -> Value {
    let mut object = review["request"]["object"].clone();
    json_patch::patch(&mut object, patch).expect("the patch applies to the pod it was made for");
    object
}

/// `review` again, about `object`, under a new uid (what a reinvocation looks like).
fn review_of(review: &Value, object: Value, uid: &str) -> Value {
    let mut again = review.clone();
    again["request"]["object"] = object;
    again["request"]["uid"] = json!(uid);
    again
}

fn sidecar(pod: &Pod) -> Container {
    let containers = &pod.spec.as_ref().expect("a pod spec").containers;
    let sidecars: Vec<_> = containers
        .iter()
        .filter(|c| c.name == inject::CONTAINER_NAME)
        .collect();
    assert_eq!(sidecars.len(), 1, "exactly one breakwater container");
    assert_eq!(
        containers.last().map(|c| c.name.as_str()),
        Some(inject::CONTAINER_NAME),
        "the sidecar is appended after the app's containers"
    );
    sidecars[0].clone()
}

/// `kubernetes-validate --strict` against the 1.33 schemas, as `tests/manifests.rs` runs it.
fn kubernetes_validate(files: &[PathBuf]) -> std::process::Output {
    support::kubernetes_validate()
        .args(files)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "kubernetes-validate could not run ({e}): install it with \
                 `pip install kubernetes-validate` (tests/run.sh does this)"
            )
        })
}

#[tokio::test]
async fn annotated_pods_get_the_sidecar_and_a_second_review_is_a_no_op() {
    let pki = Pki::new();
    let harness = Harness::start(Some(&pki)).await;
    let client = pki.client();
    let addr = harness.webhook.addr();
    let out = tempfile::tempdir().unwrap();
    let mut validate = Vec::new();

    // (fixture, traffic port, requests, limits)
    let cases = [
        (
            "annotated-pod.json",
            8080,
            json!({"cpu": "20m", "memory": "16Mi"}),
            json!({"memory": "64Mi"}),
        ),
        (
            "annotated-pod-with-overrides.json",
            9090,
            json!({"cpu": "100m", "memory": "32Mi"}),
            json!({"cpu": "500m", "memory": "128Mi"}),
        ),
    ];
    for (name, port, requests, limits) in cases {
        let request = fixture(name);
        let response = review(&client, addr, &request).await;
        assert!(
            response.get("warnings").is_none(),
            "{name}: no warnings expected, got {}",
            response["warnings"]
        );
        let patch = patch_of(&response).unwrap_or_else(|| panic!("{name}: a patch expected"));
        let object = patched_object(&request, &patch);
        let pod: Pod = serde_json::from_value(object.clone())
            .unwrap_or_else(|e| panic!("{name}: the patched object is not a Pod: {e}"));

        let annotations = pod.metadata.annotations.clone().unwrap();
        assert_eq!(
            annotations.get(inject::INJECTED).map(String::as_str),
            Some(env!("CARGO_PKG_VERSION")),
            "{name}: injected pods are marked with the version"
        );
        assert_eq!(
            annotations.get(inject::INJECT).map(String::as_str),
            Some("true"),
            "{name}: the pod's own annotations stay"
        );
        let app = &pod.spec.as_ref().unwrap().containers[0];
        assert_eq!(app.name, "app", "{name}: the app container stays first");
        assert_eq!(
            serde_json::to_value(app).unwrap(),
            request["request"]["object"]["spec"]["containers"][0],
            "{name}: the app container is untouched"
        );

        let sidecar = serde_json::to_value(sidecar(&pod)).unwrap();
        assert_eq!(
            sidecar["image"],
            format!(
                "ghcr.io/breakwater/breakwater:{}",
                env!("CARGO_PKG_VERSION")
            )
        );
        assert_eq!(
            sidecar["args"],
            json!(["sidecar", "--admin-addr", "0.0.0.0:9901"])
        );
        assert_eq!(
            sidecar["env"],
            json!([
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            ])
        );
        assert_eq!(
            sidecar["ports"],
            json!([{"name": "http", "containerPort": port}, {"name": "admin", "containerPort": 9901}]),
            "{name}: traffic and admin ports"
        );
        assert_eq!(
            sidecar["readinessProbe"],
            json!({"httpGet": {"path": "/ready", "port": "admin"}, "periodSeconds": 5})
        );
        assert_eq!(
            sidecar["livenessProbe"],
            json!({"httpGet": {"path": "/health", "port": "admin"}, "periodSeconds": 10})
        );
        assert_eq!(
            sidecar["resources"],
            json!({"requests": requests, "limits": limits}),
            "{name}: resources"
        );
        assert_eq!(
            sidecar["securityContext"],
            json!({
                "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"},
            })
        );

        // The patched pod, reviewed again (reinvocation, or a replayed request): no patch.
        let again = review(
            &client,
            addr,
            &review_of(&request, object.clone(), "second-pass"),
        )
        .await;
        assert!(
            patch_of(&again).is_none(),
            "{name}: a second review of the injected pod must not patch it: {again}"
        );
        assert!(again.get("warnings").is_none(), "{name}: {again}");

        let file = out.path().join(name.replace(".json", ".yaml"));
        std::fs::write(&file, serde_json::to_vec_pretty(&object).unwrap()).unwrap();
        validate.push(file);
    }
    assert_eq!(harness.count("injected"), 2.0);
    assert_eq!(harness.count("already_injected"), 2.0);

    // The patched pods are valid Pods for the 1.33 API.
    let output = kubernetes_validate(&validate);
    assert!(
        output.status.success(),
        "kubernetes-validate rejected a patched pod:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // ...and the check would notice an invalid sidecar (a misspelt field, under --strict).
    let mut broken: Value = serde_json::from_slice(&std::fs::read(&validate[0]).unwrap()).unwrap();
    broken["spec"]["containers"][1]["readinessprobe"] = json!({});
    let file = out.path().join("broken.yaml");
    std::fs::write(&file, serde_json::to_vec(&broken).unwrap()).unwrap();
    assert!(
        !kubernetes_validate(&[file]).status.success(),
        "a pod with an unknown container field must be rejected"
    );
}

#[tokio::test]
async fn the_injected_container_is_the_hand_written_demo_sidecar() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("manifests/examples/demo-app.yaml")).unwrap();
    let documents: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
    let deployment = documents
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("the demo Deployment");
    let by_hand = deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == inject::CONTAINER_NAME)
        .expect("the demo's breakwater container")
        .clone();

    let request = fixture("annotated-pod.json");
    let pod: Pod = serde_json::from_value(request["request"]["object"].clone()).unwrap();
    let inject::Plan::Inject { container, .. } = inject::plan(&InjectionConfig::default(), &pod)
    else {
        panic!("the annotated fixture should be injected");
    };
    assert_eq!(
        serde_json::to_value(&container).unwrap(),
        by_hand,
        "the injected sidecar should be exactly manifests/examples/demo-app.yaml's"
    );
}

#[tokio::test]
async fn pods_that_do_not_ask_or_already_have_the_sidecar_are_left_alone() {
    let pki = Pki::new();
    let harness = Harness::start(Some(&pki)).await;
    let client = pki.client();
    for name in ["plain-pod.json", "injected-pod.json", "update-pod.json"] {
        let response = review(&client, harness.webhook.addr(), &fixture(name)).await;
        assert!(
            patch_of(&response).is_none(),
            "{name}: no patch expected: {response}"
        );
        assert!(
            response.get("warnings").is_none(),
            "{name}: no warnings expected: {response}"
        );
    }
    assert_eq!(harness.count("skipped"), 2.0, "plain pod and UPDATE");
    assert_eq!(harness.count("already_injected"), 1.0);
    assert_eq!(harness.count("injected"), 0.0);
}

#[tokio::test]
async fn invalid_annotations_admit_the_pod_without_the_sidecar_and_say_why() {
    let pki = Pki::new();
    let harness = Harness::start(Some(&pki)).await;
    let response = review(
        &pki.client(),
        harness.webhook.addr(),
        &fixture("bad-annotation.json"),
    )
    .await;
    assert!(
        patch_of(&response).is_none(),
        "an invalid pod is admitted unchanged: {response}"
    );
    assert_eq!(
        response["warnings"],
        json!([
            "breakwater.io/proxy-port: \"http\" is not a port number (1-65535); sidecar not injected",
            "breakwater.io/proxy-memory: \"lots\" is not a quantity (e.g. 100m, 0.5, 64Mi); sidecar not injected",
        ])
    );
    assert_eq!(harness.count("invalid"), 1.0);
    assert_eq!(harness.count("injected"), 0.0);
}

#[tokio::test]
async fn dry_runs_get_the_patch_but_are_not_counted_as_injections() {
    let pki = Pki::new();
    let harness = Harness::start(Some(&pki)).await;
    let request = fixture("dry-run.json");
    assert_eq!(request["request"]["dryRun"], true);
    let response = review(&pki.client(), harness.webhook.addr(), &request).await;
    let patch = patch_of(&response).expect("a dry run sees the patch a real request would get");
    let pod: Pod = serde_json::from_value(patched_object(&request, &patch)).unwrap();
    sidecar(&pod);
    assert_eq!(
        harness.count("injected"),
        0.0,
        "a dry run is not an injection"
    );
    assert_eq!(harness.count("dry_run"), 1.0);
}

#[tokio::test]
async fn requests_that_are_not_reviews_get_clear_http_errors() {
    let pki = Pki::new();
    let harness = Harness::start(Some(&pki)).await;
    for http2 in [false, true] {
        let client = pki.client_with(http2);
        let path = harness.url(MUTATE_PODS_PATH);

        let answer = send(&client, Method::POST, &path, b"{not json".to_vec()).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST);
        let text = String::from_utf8_lossy(&answer.body);
        assert!(
            text.starts_with("the request body is not an AdmissionReview: "),
            "a malformed body is named as such: {text}"
        );

        let no_request = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"});
        let answer = send(
            &client,
            Method::POST,
            &path,
            serde_json::to_vec(&no_request).unwrap(),
        )
        .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST);
        assert_eq!(answer.body, "the AdmissionReview has no request\n");

        if http2 {
            // HTTP/2 takes an early answer to a request still sending its body in its stride.
            let answer = send(
                &client,
                Method::POST,
                &path,
                vec![b' '; MAX_REVIEW_BYTES + 1],
            )
            .await;
            assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
        } else {
            // Over HTTP/1 the server answers from the head alone; a client still writing the
            // body could see the connection reset before it reads that answer, so send none.
            let head = format!(
                "POST {MUTATE_PODS_PATH} HTTP/1.1\r\nhost: webhook\r\ncontent-length: {}\r\n\r\n",
                MAX_REVIEW_BYTES + 1
            );
            let answer = pki
                .raw_exchange(harness.webhook.addr(), head.as_bytes())
                .await;
            assert!(
                answer.starts_with("HTTP/1.1 413 "),
                "an announced oversized body is refused from the head: {answer}"
            );
        }

        let answer = send(&client, Method::GET, &path, Vec::new()).await;
        assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(answer.allow.as_deref(), Some("POST"));

        let answer = send(&client, Method::POST, &harness.url("/mutate"), Vec::new()).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND);
        assert_eq!(
            answer.body,
            "not found; the webhook serves POST /mutate-pods\n"
        );
    }
    assert_eq!(
        harness.count("error"),
        6.0,
        "malformed, request-less and oversized reviews, twice"
    );
}

#[tokio::test]
async fn a_rotated_certificate_is_served_to_new_connections() {
    let old = Pki::new();
    let harness = Harness::start(Some(&old)).await;
    let request = fixture("plain-pod.json");
    review(&old.client(), harness.webhook.addr(), &request).await;

    let new = Pki::new();
    new.write(harness.dir.path());
    let url = harness.url(MUTATE_PODS_PATH);
    let body = serde_json::to_vec(&request).unwrap();
    let rotated = eventually(WAIT, || async {
        // A fresh client is a fresh connection, so a fresh handshake.
        let req = Request::post(&url)
            .body(Full::new(Bytes::from(body.clone())))
            .unwrap();
        new.client().request(req).await.is_ok()
    })
    .await;
    assert!(
        rotated,
        "a client trusting only the new CA should connect within {WAIT:?}"
    );
    let req = Request::post(&url)
        .body(Full::new(Bytes::from(body.clone())))
        .unwrap();
    assert!(
        old.client().request(req).await.is_err(),
        "the old certificate is no longer served"
    );
    review(&new.client(), harness.webhook.addr(), &request).await;
    let loads = metric_sum(
        &harness.metrics.render(),
        "webhook_certificate_reloads_total",
        &[("result", "loaded")],
    );
    assert_eq!(loads, 2.0, "the first load and the rotation");
}

#[tokio::test]
async fn an_unusable_new_certificate_keeps_the_previous_one() {
    let pki = Pki::new();
    let harness = Harness::start(Some(&pki)).await;
    // The new certificate with the old key: a pair that does not belong together.
    let other = Pki::new();
    std::fs::write(harness.dir.path().join("tls.crt"), &other.cert).unwrap();
    let failed = eventually(WAIT, || async {
        metric_sum(
            &harness.metrics.render(),
            "webhook_certificate_reloads_total",
            &[("result", "failed")],
        ) == 1.0
    })
    .await;
    assert!(failed, "the mismatched pair should be tried and refused");
    review(
        &pki.client(),
        harness.webhook.addr(),
        &fixture("plain-pod.json"),
    )
    .await;
}

#[tokio::test]
async fn the_webhook_waits_for_a_certificate_that_is_not_mounted_yet() {
    let harness = Harness::start(None).await;
    let pki = Pki::new();
    let url = harness.url(MUTATE_PODS_PATH);
    let body = serde_json::to_vec(&fixture("plain-pod.json")).unwrap();
    let req = || {
        Request::post(&url)
            .body(Full::new(Bytes::from(body.clone())))
            .unwrap()
    };
    assert!(
        pki.client().request(req()).await.is_err(),
        "no certificate yet: the handshake fails"
    );
    pki.write(harness.dir.path());
    let served = eventually(WAIT, || async { pki.client().request(req()).await.is_ok() }).await;
    assert!(
        served,
        "the certificate should be picked up within {WAIT:?}"
    );
}

#[tokio::test]
async fn a_present_but_broken_certificate_fails_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Pki::new(), Pki::new());
    std::fs::write(dir.path().join("tls.crt"), &a.cert).unwrap();
    std::fs::write(dir.path().join("tls.key"), &b.key).unwrap();
    let metrics = Arc::new(OperatorMetrics::new().unwrap());
    let err = webhook::start(options(dir.path()), Arc::clone(&metrics))
        .await
        .err()
        .expect("a key that does not match the certificate is an error");
    assert!(matches!(err, WebhookError::Tls(_)), "{err:?}");

    std::fs::write(dir.path().join("tls.key"), "not a key").unwrap();
    let err = webhook::start(options(dir.path()), metrics)
        .await
        .err()
        .expect("an unreadable key is an error");
    assert!(matches!(err, WebhookError::Tls(_)), "{err:?}");
}

#[tokio::test]
async fn every_operator_replica_serves_the_webhook() {
    let server = ApiServer::start().await;
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    pki.write(dir.path());
    let mut replicas = Vec::new();
    for identity in ["replica-a", "replica-b"] {
        let mut options = OperatorOptions::new(identity, "default");
        options.admin_addr = "127.0.0.1:0".parse().unwrap();
        options.webhook = Some(self::options(dir.path()));
        replicas.push(
            operator::start(server.client_as(identity), options)
                .await
                .expect("operator with webhook starts"),
        );
    }
    let request = fixture("annotated-pod.json");
    for replica in &replicas {
        let addr = replica.webhook_addr().expect("the webhook runs");
        let response = review(&pki.client(), addr, &request).await;
        assert!(patch_of(&response).is_some(), "every replica injects");
        let metrics = get(&format!("http://{}/metrics", replica.admin_addr())).await;
        assert_eq!(
            metric_sum(
                &metrics.text(),
                "webhook_requests_total",
                &[("result", "injected")]
            ),
            1.0,
            "the operator's /metrics counts its webhook's injections"
        );
    }
    for replica in replicas {
        replica.shutdown().await;
    }
}
