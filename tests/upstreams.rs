//! Listener TLS, TLS and HTTP/2 upstreams, and DNS-resolved backends, over real sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Version};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use support::{Backend, TestProxy, get, ok, policy};
use tokio::net::TcpListener;

/// A private CA and a leaf for `localhost` / `127.0.0.1`, written as PEM files.
struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
}

impl Pki {
    fn new() -> Pki {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &ca)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("cert.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), leaf_key.serialize_pem()).unwrap();
        Pki {
            ca_pem: ca.pem(),
            dir,
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn client_config(&self) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
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

    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let certs = CertificateDer::pem_file_iter(self.path("cert.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(self.path("key.pem")).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

#[tokio::test]
async fn tls_listener_negotiates_h2_and_http1_with_alpn() {
    let pki = Pki::new();
    let backend = Backend::text("over tls").await;
    let extra = format!(
        "  listener: {{port: 0, address: 127.0.0.1, tls: {{certFile: {}, keyFile: {}}}}}\n",
        pki.path("cert.pem"),
        pki.path("key.pem")
    );
    // The fixture's listener line is replaced by one with TLS.
    let yaml = policy("tls", &[("app", backend.addr)], "")
        .replace("  listener: {port: 0, address: 127.0.0.1}\n", &extra);
    let proxy = TestProxy::start(&yaml).await;
    let port = proxy.addr("tls").port();

    for (alpn_h2, expected) in [(true, Version::HTTP_2), (false, Version::HTTP_11)] {
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(pki.client_config())
            .https_only();
        let connector = if alpn_h2 {
            builder.enable_http2().build()
        } else {
            builder.enable_http1().build()
        };
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
        let resp = client
            .request(
                Request::get(format!("https://localhost:{port}/"))
                    .body(Full::default())
                    .unwrap(),
            )
            .await
            .expect("TLS request through the proxy");
        assert_eq!(resp.version(), expected, "ALPN should select {expected:?}");
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "over tls");
    }
    let headers = backend.last_headers();
    assert_eq!(
        headers["x-forwarded-proto"], "https",
        "a TLS client is reported as https"
    );
}

#[tokio::test]
async fn https_backend_is_verified_against_the_configured_ca() {
    let pki = Pki::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config());
    let server = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(ok("secure backend"))
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    let yaml = format!(
        "apiVersion: breakwater.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {{name: up}}\nspec:\n  listener: {{port: 0, address: 127.0.0.1}}\n  backends:\n    - {{name: secure, url: \"https://localhost:{port}\", tls: {{caFile: {}}}}}\n",
        pki.path("ca.pem")
    );
    let proxy = TestProxy::start(&yaml).await;
    let answer = get(&proxy.url("up", "/")).await;
    assert_eq!(answer.status, 200, "trusted backend: {}", answer.text());
    assert_eq!(answer.text(), "secure backend");

    // Without the CA the web PKI roots do not trust the private CA: the connect fails (502).
    let untrusted = yaml.replace(&format!(", tls: {{caFile: {}}}", pki.path("ca.pem")), "");
    let proxy = TestProxy::start(&untrusted).await;
    let answer = get(&proxy.url("up", "/")).await;
    assert_eq!(
        answer.status, 502,
        "an untrusted certificate must not be accepted"
    );
    assert_eq!(answer.headers["x-breakwater-error"], "connect_failed");
    server.abort();
}

#[tokio::test]
async fn h2_upstream_gets_http2_requests() {
    let versions = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&versions);
    let backend = Backend::start(Arc::new(move |req| {
        seen.lock().unwrap().push(req.version());
        Box::pin(async { ok("h2 backend") })
    }))
    .await;
    let yaml = format!(
        "apiVersion: breakwater.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {{name: h2}}\nspec:\n  listener: {{port: 0, address: 127.0.0.1}}\n  backends:\n    - {{name: grpcish, url: \"http://{}\", protocol: H2}}\n",
        backend.addr
    );
    let proxy = TestProxy::start(&yaml).await;
    for _ in 0..3 {
        let answer = get(&proxy.url("h2", "/")).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.text(), "h2 backend");
    }
    assert_eq!(
        *versions.lock().unwrap(),
        vec![Version::HTTP_2; 3],
        "an H2 backend must receive HTTP/2 requests"
    );
}

#[tokio::test]
async fn dns_backend_resolves_each_address_as_an_endpoint() {
    // `localhost` may resolve to 127.0.0.1 and ::1: a dual-stack listener answers both.
    let listener = match TcpListener::bind("[::]:0").await {
        Ok(l) => l,
        Err(_) => TcpListener::bind("127.0.0.1:0").await.unwrap(),
    };
    let port = listener.local_addr().unwrap().port();
    let backend = Backend::start_on(
        listener,
        Arc::new(|_req| Box::pin(async { ok("resolved") })),
    )
    .await;
    let yaml = format!(
        "apiVersion: breakwater.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {{name: dns}}\nspec:\n  listener: {{port: 0, address: 127.0.0.1}}\n  backends:\n    - {{name: named, dns: \"localhost:{port}\", dnsRefresh: 200ms}}\n"
    );
    let proxy = TestProxy::start(&yaml).await;
    for _ in 0..4 {
        let answer = get(&proxy.url("dns", "/")).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    assert_eq!(backend.hits(), 4);
    let health: serde_json::Value =
        serde_json::from_slice(&get(&proxy.admin_url("/backends/health")).await.body).unwrap();
    let endpoints = health["policies"][0]["endpoints"].as_array().unwrap();
    assert!(
        endpoints
            .iter()
            .any(|e| e["address"] == format!("127.0.0.1:{port}") && e["backend"] == "named"),
        "the resolved address should be an endpoint: {endpoints:?}"
    );
}

#[tokio::test]
async fn unresolvable_dns_backend_answers_503_no_endpoint() {
    let yaml = "apiVersion: breakwater.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: {name: nodns}\nspec:\n  listener: {port: 0, address: 127.0.0.1}\n  backends:\n    - {name: ghost, dns: \"does-not-exist.invalid:80\"}\n";
    let proxy = TestProxy::start(yaml).await;
    let started = std::time::Instant::now();
    let answer = get(&proxy.url("nodns", "/")).await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.headers["x-breakwater-error"], "no_endpoint");
    assert!(
        answer.headers.contains_key("retry-after"),
        "503 must carry Retry-After"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_millis(200),
        "no endpoint must fail fast"
    );
}
