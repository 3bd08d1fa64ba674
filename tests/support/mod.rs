//! Shared test fixtures: real loopback backends, a real proxy started from a real policy file,
//! and real HTTP clients. Every server binds port 0 first, then serves (no readiness sleeps).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use breakwater::app::{self, ProxyOptions, RunningProxy};
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub mod apiserver;

/// A boxed response future, so backends can be written as closures.
pub type BoxResponse = Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>>;
/// What a backend does with a request.
pub type Handler = Arc<dyn Fn(Request<Incoming>) -> BoxResponse + Send + Sync>;

/// A real HTTP/1.1 + h2c server on loopback that counts and records what it receives.
pub struct Backend {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Requests received.
    pub hits: Arc<AtomicUsize>,
    /// Headers of every request received, in order.
    pub seen: Arc<Mutex<Vec<HeaderMap>>>,
    /// TCP connections accepted.
    pub connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Backend {
    /// Starts a backend answering with `handler`.
    pub async fn start(handler: Handler) -> Backend {
        Self::start_on(
            TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind backend"),
            handler,
        )
        .await
    }

    /// Starts a backend on an already bound listener (to restart on a known port).
    pub async fn start_on(listener: TcpListener, handler: Handler) -> Backend {
        let addr = listener.local_addr().expect("backend addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (hits2, seen2, connections2) = (
            Arc::clone(&hits),
            Arc::clone(&seen),
            Arc::clone(&connections),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                connections2.fetch_add(1, Ordering::SeqCst);
                let handler = Arc::clone(&handler);
                let hits = Arc::clone(&hits2);
                let seen = Arc::clone(&seen2);
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        hits.fetch_add(1, Ordering::SeqCst);
                        seen.lock().unwrap().push(req.headers().clone());
                        let fut = handler(req);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Backend {
            addr,
            hits,
            seen,
            connections,
            task,
        }
    }

    /// A backend that answers `200` with `body`.
    pub async fn text(body: &'static str) -> Backend {
        Self::start(Arc::new(move |_req| Box::pin(async move { ok(body) }))).await
    }

    /// A backend that answers `200` with `body` after `delay`.
    pub async fn slow(body: &'static str, delay: Duration) -> Backend {
        Self::start(Arc::new(move |_req| {
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                ok(body)
            })
        }))
        .await
    }

    /// Requests received so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Headers of the most recent request.
    pub fn last_headers(&self) -> HeaderMap {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("backend saw no request")
    }

    /// Stops accepting (open connections end when their tasks notice).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A `200 OK` with a text body.
pub fn ok(body: &'static str) -> Response<Full<Bytes>> {
    Response::new(Full::new(Bytes::from_static(body.as_bytes())))
}

/// A response with `status` and a text body.
pub fn status(code: u16, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = ok(body);
    *resp.status_mut() = StatusCode::from_u16(code).expect("valid status");
    resp
}

/// A running proxy plus the temporary policy file it watches.
pub struct TestProxy {
    /// The proxy.
    pub proxy: Option<RunningProxy>,
    /// The policy file (rewrite it to test reloads).
    pub config_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestProxy {
    /// Writes `yaml` to a fresh file and starts a proxy on it (admin on an ephemeral port).
    pub async fn start(yaml: &str) -> TestProxy {
        Self::try_start(yaml).await.expect("proxy should start")
    }

    /// Like [`TestProxy::start`] but returns the start error.
    pub async fn try_start(yaml: &str) -> Result<TestProxy, app::StartError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("policy.yaml");
        std::fs::write(&config_path, yaml).expect("write policy");
        let proxy = app::start(ProxyOptions {
            config: config_path.clone(),
            admin_addr: "127.0.0.1:0".parse().expect("addr"),
            reload_interval: Duration::from_millis(100),
        })
        .await?;
        Ok(TestProxy {
            proxy: Some(proxy),
            config_path,
            _dir: dir,
        })
    }

    /// The running proxy.
    pub fn proxy(&self) -> &RunningProxy {
        self.proxy.as_ref().expect("proxy running")
    }

    /// The traffic address of policy `name`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.proxy()
            .listener_addr(name)
            .expect("policy listener bound")
    }

    /// `http://<listener of name><path>`.
    pub fn url(&self, name: &str, path: &str) -> String {
        format!("http://{}{path}", self.addr(name))
    }

    /// `http://<admin><path>`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy().admin_addr())
    }
}

/// A minimal policy named `name` on an ephemeral port with the given backends and extra spec
/// lines (indented two spaces under `spec:`).
pub fn policy(name: &str, backends: &[(&str, SocketAddr)], extra: &str) -> String {
    let mut yaml = format!(
        "apiVersion: breakwater.io/v1alpha1\nkind: ResiliencePolicy\nmetadata:\n  name: {name}\nspec:\n  listener: {{port: 0, address: 127.0.0.1}}\n  backends:\n"
    );
    for (backend, addr) in backends {
        yaml.push_str(&format!(
            "    - {{name: {backend}, url: \"http://{addr}\"}}\n"
        ));
    }
    yaml.push_str(extra);
    yaml
}

/// An HTTP/1.1 keep-alive client.
pub fn http1_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An HTTP/2 prior-knowledge (h2c) client.
pub fn h2c_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A finished response: status, headers and the whole body.
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Answer {
    /// The body as UTF-8 text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// GETs `url` with a fresh HTTP/1.1 client.
pub async fn get(url: &str) -> Answer {
    send(
        &http1_client(),
        Request::get(url)
            .body(Full::new(Bytes::new()))
            .expect("request"),
    )
    .await
}

/// Sends `req` and collects the answer.
pub async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Answer {
    let resp = client
        .request(req)
        .await
        .expect("request should get a response");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("response body")
        .to_bytes();
    Answer {
        status,
        headers,
        body,
    }
}

/// Polls `check` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends raw bytes on a fresh connection and reads until the server closes or `timeout`.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8], timeout: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(timeout, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A loopback port that was free a moment ago: bind port 0, note the port, release it. For the
/// few places (a policy file, a CLI flag) that must name a port before the proxy binds it.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("bind an ephemeral port")
}

/// The value of the sample `series` (name plus labels exactly as rendered, e.g.
/// `config_reload_failures_total` or `up{job="x"}`) in a Prometheus text exposition.
pub fn metric_value(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Reads one HTTP/1 response (head plus a `Content-Length` body, none if absent) from `stream`
/// and returns it as text. Panics if the stream ends or `timeout` passes first. Bytes after the
/// response, if any arrived in the same reads, are included.
pub async fn read_response(stream: &mut tokio::net::TcpStream, timeout: Duration) -> String {
    use tokio::io::AsyncReadExt;
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                let body_len = head
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if buf.len() >= head_end + 4 + body_len {
                    return String::from_utf8_lossy(&buf).into_owned();
                }
            }
            let n = stream.read(&mut chunk).await.expect("read response");
            assert!(
                n > 0,
                "connection closed before a complete response: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .expect("a complete response should arrive in time")
}

/// The sum of every sample of family `name` whose labels include all of `labels` (label order in
/// the exposition does not matter); 0 when none matches.
pub fn metric_sum(exposition: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    exposition
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (label_text, value) = match rest.strip_prefix('{') {
                Some(inner) => inner.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            let matches = labels.iter().all(|(key, want)| {
                label_text.split(',').any(|pair| {
                    pair.split_once('=')
                        .is_some_and(|(k, v)| k == *key && v.trim_matches('"') == *want)
                })
            });
            matches
                .then(|| value.split_whitespace().next()?.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// A backend that can be killed outright: `kill` closes its listener (new connections are
/// refused) and aborts every open connection (requests in flight are cut off), like a crashed
/// process. Requests to `/healthz` are counted in `probes`, everything else in `hits`.
pub struct KillableBackend {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Requests received, health-check probes (`/healthz`) excluded.
    pub hits: Arc<AtomicUsize>,
    /// `/healthz` requests received.
    pub probes: Arc<AtomicUsize>,
    /// Set by [`KillableBackend::kill`]: a connection task that a worker thread is still
    /// polling then drops its request unanswered and uncounted, as a dead process would.
    /// (A lock rather than an atomic: a request that saw the backend alive has been counted
    /// by the time `kill` holds the write lock.)
    dead: Arc<std::sync::RwLock<bool>>,
    task: JoinHandle<()>,
}

impl KillableBackend {
    /// Starts one on a fresh loopback port.
    pub async fn start(handler: Handler) -> KillableBackend {
        Self::start_on(
            TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind backend"),
            handler,
        )
    }

    /// Starts one on an already bound listener (to restart on a known port).
    pub fn start_on(listener: TcpListener, handler: Handler) -> KillableBackend {
        let addr = listener.local_addr().expect("backend addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let probes = Arc::new(AtomicUsize::new(0));
        let dead = Arc::new(std::sync::RwLock::new(false));
        let (hits2, probes2, dead2) = (Arc::clone(&hits), Arc::clone(&probes), Arc::clone(&dead));
        let task = tokio::spawn(async move {
            // Dropping this set (when the task is aborted) aborts every connection task.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                while connections.try_join_next().is_some() {}
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let handler = Arc::clone(&handler);
                let (hits, probes, dead) =
                    (Arc::clone(&hits2), Arc::clone(&probes2), Arc::clone(&dead2));
                connections.spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let alive = {
                            let dead = dead.read().unwrap_or_else(|e| e.into_inner());
                            if !*dead {
                                let counter = if req.uri().path() == "/healthz" {
                                    &probes
                                } else {
                                    &hits
                                };
                                counter.fetch_add(1, Ordering::SeqCst);
                            }
                            !*dead
                        };
                        let fut = handler(req);
                        async move {
                            if !alive {
                                // An error makes hyper drop the connection without answering.
                                return Err(std::io::Error::other("backend killed"));
                            }
                            Ok(fut.await)
                        }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        KillableBackend {
            addr,
            hits,
            probes,
            dead,
            task,
        }
    }

    /// Requests received so far (probes excluded).
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Kills it: once this returns the listening socket is closed, and every open connection
    /// has been told to abort (each closes as soon as the runtime polls its task).
    pub async fn kill(&mut self) {
        *self.dead.write().unwrap_or_else(|e| e.into_inner()) = true;
        self.task.abort();
        if !self.task.is_finished() {
            let _ = (&mut self.task).await;
        }
    }
}

impl Drop for KillableBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A loopback address that refuses connections for the rest of the test process: the port is
/// bound (so no other test's listener can take it) but never listened on, so every connect is
/// answered with a reset. The socket is deliberately kept open until the process exits.
pub fn refusing_addr() -> SocketAddr {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    let addr = socket
        .local_addr()
        .expect("local addr")
        .as_socket()
        .expect("an IP socket");
    std::mem::forget(socket);
    addr
}

/// `kubernetes-validate --strict --quiet` against the Kubernetes 1.33 schemas, run through the
/// interpreter so no PATH shim is needed (`tests/run.sh` installs it); add the files to check.
pub fn kubernetes_validate() -> std::process::Command {
    let mut command = std::process::Command::new("python3");
    command.args([
        "-m",
        "kubernetes_validate",
        "--kubernetes-version",
        "1.33.0",
        "--strict",
        "--quiet",
    ]);
    command
}
