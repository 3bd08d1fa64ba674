//! The sidecar injection webhook: HTTPS `POST /mutate-pods`, answering `AdmissionReview`s
//! with [`crate::kube::inject`].
//!
//! It runs on every operator replica (it needs neither the Lease nor the caches), so the
//! API server can reach whichever replica its Service picks. The serving certificate is
//! re-read from disk every [`WebhookOptions::reload_interval`] and swapped in when the files
//! changed, because cert-manager and the kubelet rotate Secret files in place; connections
//! opened afterwards get the new certificate.

use std::convert::Infallible;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::kube::core::DynamicObject;
use ::kube::core::admission::AdmissionReview;
use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::metrics::OperatorMetrics;
use crate::kube::inject::{self, InjectError, InjectionConfig};
use crate::proxy::tls::{self, TlsError};

/// The path the MutatingWebhookConfiguration calls.
pub const MUTATE_PODS_PATH: &str = "/mutate-pods";
/// The default listen address (`--webhook-addr`).
pub const DEFAULT_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 9443));
/// The largest review body read. A pod is at most ~1.5 MiB (etcd's object limit), and a CREATE
/// review carries it once.
pub const MAX_REVIEW_BYTES: usize = 3 * 1024 * 1024;
/// How long a client may take for the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request head, and then its body. The API server
/// gives up on the webhook after its `timeoutSeconds` (at most 30 s) anyway.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How to serve the webhook.
#[derive(Clone, Debug)]
pub struct WebhookOptions {
    /// Listen address; port 0 picks one.
    pub addr: SocketAddr,
    /// PEM certificate chain (leaf first), e.g. a `kubernetes.io/tls` Secret's `tls.crt`.
    pub cert_file: PathBuf,
    /// PEM private key of the leaf, e.g. the Secret's `tls.key`.
    pub key_file: PathBuf,
    /// How often the files are checked for a new certificate.
    pub reload_interval: Duration,
    /// What the injected sidecar looks like.
    pub injection: InjectionConfig,
}

/// Why the webhook could not start.
#[derive(Debug, Error)]
pub enum WebhookError {
    /// The listen address could not be bound.
    #[error("binding the webhook server to {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The certificate files exist but are not a usable certificate and key.
    #[error("loading the webhook certificate")]
    Tls(#[from] TlsError),
    /// The injection settings are inconsistent.
    #[error(transparent)]
    Config(#[from] InjectError),
}

/// A serving webhook; dropping it stops it at once, [`RunningWebhook::shutdown`] lets open
/// connections finish their requests.
pub struct RunningWebhook {
    addr: SocketAddr,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// What the request handler reads.
struct State {
    injection: InjectionConfig,
    metrics: Arc<OperatorMetrics>,
}

/// The serving certificate, shared by every handshake and replaced by the reload task.
struct CertStore {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: ArcSwapOption<CertifiedKey>,
    /// The file contents last tried, so an unchanged (or still broken) pair is neither
    /// parsed nor logged again.
    seen: Mutex<Option<(Vec<u8>, Vec<u8>)>>,
}

/// What one look at the certificate files found.
enum Reload {
    Unchanged,
    Loaded,
    /// A file could not be read (not mounted yet, or mid-rotation).
    Unreadable(std::io::Error),
    /// The files changed but are not a usable pair; the previous certificate stays.
    Invalid(TlsError),
}

/// Why a review request got no review back (the single place mapping errors to statuses).
#[derive(Debug, Error)]
enum BadRequest {
    #[error("the request body exceeds {MAX_REVIEW_BYTES} bytes")]
    TooLarge,
    #[error("the request body did not arrive within {READ_TIMEOUT:?}")]
    Timeout,
    #[error("reading the request body failed: {0}")]
    Body(String),
    #[error("the request body is not an AdmissionReview: {0}")]
    Malformed(serde_json::Error),
    #[error(transparent)]
    NoRequest(InjectError),
}

impl WebhookOptions {
    /// Defaults with the certificate in `cert_file`/`key_file`: listen on `0.0.0.0:9443`,
    /// check the files every 10 s, the default sidecar.
    pub fn new(cert_file: impl Into<PathBuf>, key_file: impl Into<PathBuf>) -> Self {
        WebhookOptions {
            addr: DEFAULT_ADDR,
            cert_file: cert_file.into(),
            key_file: key_file.into(),
            reload_interval: Duration::from_secs(10),
            injection: InjectionConfig::default(),
        }
    }
}

impl RunningWebhook {
    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and reloading; open connections finish the request they are in.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

impl Drop for RunningWebhook {
    fn drop(&mut self) {
        self.stop.cancel();
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("loaded", &self.current.load().is_some())
            .finish()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // None (no certificate yet) aborts the handshake; with `failurePolicy: Ignore` the
        // API server then admits the pod unchanged.
        self.current.load_full()
    }
}

impl CertStore {
    async fn reload(&self) -> Reload {
        let (cert, key) = match (
            tokio::fs::read(&self.cert_file).await,
            tokio::fs::read(&self.key_file).await,
        ) {
            (Ok(cert), Ok(key)) => (cert, key),
            (Err(err), _) | (_, Err(err)) => return Reload::Unreadable(err),
        };
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.as_ref().is_some_and(|(c, k)| *c == cert && *k == key) {
            return Reload::Unchanged;
        }
        let parsed = tls::certified_key_from_pem(&self.cert_file, &cert, &self.key_file, &key);
        *seen = Some((cert, key));
        match parsed {
            Ok(certified) => {
                self.current.store(Some(Arc::new(certified)));
                Reload::Loaded
            }
            Err(err) => Reload::Invalid(err),
        }
    }
}

impl BadRequest {
    fn status(&self) -> StatusCode {
        match self {
            BadRequest::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            BadRequest::Timeout => StatusCode::REQUEST_TIMEOUT,
            BadRequest::Body(_) | BadRequest::Malformed(_) | BadRequest::NoRequest(_) => {
                StatusCode::BAD_REQUEST
            }
        }
    }
}

/// Checks the injection settings, binds `options.addr`, loads the certificate and serves.
/// Certificate files that do not exist yet are not an error (a Secret mounted `optional`
/// may appear later): handshakes fail until they do. Files that exist but do not hold a
/// matching certificate and key are.
pub async fn start(
    options: WebhookOptions,
    metrics: Arc<OperatorMetrics>,
) -> Result<RunningWebhook, WebhookError> {
    options.injection.validate()?;
    let store = Arc::new(CertStore {
        cert_file: options.cert_file.clone(),
        key_file: options.key_file.clone(),
        current: ArcSwapOption::empty(),
        seen: Mutex::new(None),
    });
    match store.reload().await {
        Reload::Loaded | Reload::Unchanged => {
            metrics
                .webhook_certificate_reloads
                .with_label_values(&["loaded"])
                .inc();
        }
        Reload::Unreadable(err) => tracing::warn!(
            cert = %options.cert_file.display(),
            key = %options.key_file.display(),
            %err,
            "webhook certificate not readable yet; TLS handshakes fail until it is"
        ),
        Reload::Invalid(err) => return Err(err.into()),
    }
    let config =
        tls::server_config_with_resolver(Arc::clone(&store) as Arc<dyn ResolvesServerCert>)?;
    let listener = TcpListener::bind(options.addr)
        .await
        .map_err(|source| WebhookError::Bind {
            addr: options.addr,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| WebhookError::Bind {
        addr: options.addr,
        source,
    })?;
    let stop = CancellationToken::new();
    let state = Arc::new(State {
        injection: options.injection,
        metrics: Arc::clone(&metrics),
    });
    let server = tokio::spawn(serve(
        listener,
        TlsAcceptor::from(config),
        state,
        stop.clone(),
    ));
    let reloader = tokio::spawn(watch_certificate(
        store,
        options.reload_interval,
        metrics,
        stop.clone(),
    ));
    tracing::info!(%addr, path = MUTATE_PODS_PATH, "injection webhook serving");
    Ok(RunningWebhook {
        addr,
        stop,
        tasks: vec![server, reloader],
    })
}

/// Re-reads the certificate files every `interval` until `stop`.
async fn watch_certificate(
    store: Arc<CertStore>,
    interval: Duration,
    metrics: Arc<OperatorMetrics>,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.reset();
    let mut unreadable_logged = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match store.reload().await {
            Reload::Unchanged => unreadable_logged = false,
            Reload::Loaded => {
                unreadable_logged = false;
                tracing::info!(cert = %store.cert_file.display(), "webhook certificate loaded");
                metrics
                    .webhook_certificate_reloads
                    .with_label_values(&["loaded"])
                    .inc();
            }
            Reload::Invalid(err) => {
                unreadable_logged = false;
                tracing::warn!(%err, "the new webhook certificate is unusable; keeping the previous one");
                metrics
                    .webhook_certificate_reloads
                    .with_label_values(&["failed"])
                    .inc();
            }
            Reload::Unreadable(err) if !unreadable_logged => {
                unreadable_logged = true;
                tracing::warn!(cert = %store.cert_file.display(), %err, "webhook certificate not readable");
            }
            Reload::Unreadable(_) => {}
        }
    }
}

/// Accepts TLS connections on `listener` and serves HTTP/1.1 and HTTP/2 on them until `stop`.
async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<State>,
    stop: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    tracing::warn!(%err, "webhook accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let state = Arc::clone(&state);
        let stop = stop.clone();
        tokio::spawn(async move {
            let stream =
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(err)) => {
                        tracing::debug!(%peer, %err, "webhook TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "webhook TLS handshake timed out");
                        return;
                    }
                };
            let service = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(READ_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

/// Routes one request: `POST /mutate-pods` gets a review, anything else a plain-text error.
async fn handle(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() != MUTATE_PODS_PATH {
        return text(
            StatusCode::NOT_FOUND,
            format!("not found; the webhook serves POST {MUTATE_PODS_PATH}\n"),
        );
    }
    if req.method() != Method::POST {
        let mut resp = text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{MUTATE_PODS_PATH} takes POST with an AdmissionReview\n"),
        );
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return resp;
    }
    match review(state, req).await {
        Ok(resp) => resp,
        Err(err) => {
            tracing::warn!(%err, "webhook request rejected");
            state
                .metrics
                .webhook_requests
                .with_label_values(&["error"])
                .inc();
            text(err.status(), format!("{err}\n"))
        }
    }
}

/// Reads the review, answers it, counts it (dry runs only as `dry_run`).
async fn review(
    state: &State,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, BadRequest> {
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|len| len > MAX_REVIEW_BYTES as u64) {
        return Err(BadRequest::TooLarge);
    }
    let body = tokio::time::timeout(
        READ_TIMEOUT,
        Limited::new(req.into_body(), MAX_REVIEW_BYTES).collect(),
    )
    .await
    .map_err(|_| BadRequest::Timeout)?
    .map_err(|err| {
        if err.is::<LengthLimitError>() {
            BadRequest::TooLarge
        } else {
            BadRequest::Body(err.to_string())
        }
    })?
    .to_bytes();
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_slice(&body).map_err(BadRequest::Malformed)?;
    let pod = review
        .request
        .as_ref()
        .and_then(|r| r.object.as_ref())
        .map(|o| {
            let meta = &o.metadata;
            let name = meta.name.as_deref().or(meta.generate_name.as_deref());
            format!(
                "{}/{}",
                meta.namespace.as_deref().unwrap_or(""),
                name.unwrap_or("")
            )
        })
        .unwrap_or_default();
    let mutation = inject::review(&state.injection, review).map_err(BadRequest::NoRequest)?;
    let label = if mutation.dry_run {
        "dry_run"
    } else {
        mutation.outcome.label()
    };
    let warnings = mutation.response.warnings.clone().unwrap_or_default();
    match mutation.outcome {
        inject::Outcome::Injected | inject::Outcome::Invalid | inject::Outcome::Error => {
            tracing::info!(%pod, result = mutation.outcome.label(), dry_run = mutation.dry_run, ?warnings, "injection review");
        }
        inject::Outcome::Skipped | inject::Outcome::AlreadyInjected => {
            tracing::debug!(%pod, result = mutation.outcome.label(), dry_run = mutation.dry_run, "injection review");
        }
    }
    // Serialising our own types cannot fail in practice; if it did, the API server would
    // apply the failure policy (Ignore) to the 500.
    let body = match serde_json::to_vec(&mutation.into_review()) {
        Ok(body) => body,
        Err(err) => {
            tracing::error!(%err, "encoding the AdmissionReview response");
            state
                .metrics
                .webhook_requests
                .with_label_values(&["error"])
                .inc();
            return Ok(text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding the response failed\n".to_owned(),
            ));
        }
    };
    state
        .metrics
        .webhook_requests
        .with_label_values(&[label])
        .inc();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
