//! Traffic listeners: bind, accept, serve connections (HTTP/1.1 and HTTP/2, plain or TLS), and
//! follow configuration changes by adding and removing listeners without touching the others.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::body::ClientBody;
use super::conn::{ConnIo, ConnShared};
use super::handler::{ConnContext, ListenerPolicy, ProxyState, handle, handle_under};
use super::headers::PeerHeaders;
use super::server::{self, DirectLimits, Ended};
use crate::snapshot::{PolicyRuntime, Snapshot};

/// Kernel accept queue length.
const BACKLOG: i32 = 1024;
/// Pause after an accept error (e.g. out of file descriptors) so the loop cannot spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// A listener address that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    /// The configured address.
    pub addr: SocketAddr,
    /// The OS error.
    #[source]
    pub source: std::io::Error,
}

/// Sockets bound for a snapshot that is about to be applied.
pub struct Prepared {
    bound: Vec<(SocketAddr, TcpListener)>,
}

struct Running {
    local_addr: SocketAddr,
    stop: CancellationToken,
}

/// The set of running listeners, keyed by configured address.
pub struct Listeners {
    state: Arc<ProxyState>,
    running: HashMap<SocketAddr, Running>,
}

impl Listeners {
    /// No listeners yet.
    pub fn new(state: Arc<ProxyState>) -> Self {
        Self {
            state,
            running: HashMap::new(),
        }
    }

    /// Binds every listener `snapshot` needs that is not running yet. Nothing is served from
    /// these sockets until [`Listeners::commit`], so a failed bind leaves everything as it was.
    pub fn prepare(&self, snapshot: &Snapshot) -> Result<Prepared, BindError> {
        let mut bound = Vec::new();
        for policy in &snapshot.policies {
            let addr = policy.config.listener.addr;
            if self.running.contains_key(&addr) {
                continue;
            }
            let listener = bind(addr).map_err(|source| BindError { addr, source })?;
            bound.push((addr, listener));
        }
        Ok(Prepared { bound })
    }

    /// Starts the prepared listeners and stops those `snapshot` no longer has; a stopped
    /// listener's connections finish their in-flight requests and then close.
    pub fn commit(&mut self, snapshot: &Snapshot, prepared: Prepared) {
        for (addr, listener) in prepared.bound {
            let local_addr = listener.local_addr().unwrap_or(addr);
            let stop = self.state.shutdown.child_token();
            tracing::info!(%local_addr, "listening");
            self.state.tasks.spawn(accept_loop(
                listener,
                addr,
                Arc::clone(&self.state),
                stop.clone(),
            ));
            self.running.insert(addr, Running { local_addr, stop });
        }
        self.running.retain(|addr, running| {
            let keep = snapshot.policy_for_listener(*addr).is_some();
            if !keep {
                tracing::info!(local_addr = %running.local_addr, "listener removed");
                running.stop.cancel();
            }
            keep
        });
    }

    /// The bound address of the listener configured as `configured` (differs for port 0).
    pub fn local_addr(&self, configured: SocketAddr) -> Option<SocketAddr> {
        self.running.get(&configured).map(|r| r.local_addr)
    }

    /// Stops accepting everywhere; connections drain gracefully.
    pub fn stop_all(&mut self) {
        for running in self.running.values() {
            running.stop.cancel();
        }
        self.running.clear();
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    // Restarting on a port still in TIME_WAIT must not fail.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

async fn accept_loop(
    listener: TcpListener,
    configured: SocketAddr,
    state: Arc<ProxyState>,
    stop: CancellationToken,
) {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(err) => {
                tracing::warn!(%err, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        let Some(policy) = state.policy_for(configured) else {
            continue;
        };
        let limit = policy.config.limits.max_connections as usize;
        if open.load(Ordering::Acquire) >= limit {
            // Closing at once tells the client to go elsewhere; leaving it in the backlog would
            // only make it wait for a slot that may never come.
            policy
                .metrics
                .connections_rejected
                .with_label_values(&[policy.label.as_str(), "max_connections"])
                .inc();
            drop(stream);
            continue;
        }
        open.fetch_add(1, Ordering::AcqRel);
        let open = Arc::clone(&open);
        let state_for_conn = Arc::clone(&state);
        let stop = stop.clone();
        state.tasks.spawn(async move {
            serve_connection(stream, peer, configured, policy, state_for_conn, stop).await;
            open.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    configured: SocketAddr,
    policy: Arc<PolicyRuntime>,
    state: Arc<ProxyState>,
    stop: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let local_port = stream.local_addr().map_or(configured.port(), |a| a.port());
    let metrics = &policy.metrics;
    metrics
        .connections
        .with_label_values(&[policy.label.as_str()])
        .inc();
    let gauge = metrics
        .active_connections
        .with_label_values(&[policy.label.as_str()]);
    gauge.inc();
    let shared = Arc::new(ConnShared::default());
    let timeouts = policy.config.timeouts;
    let ctx = |tls: bool| {
        Arc::new(ConnContext {
            peer,
            peer_text: peer.to_string().into_boxed_str(),
            listener: configured,
            peer_headers: PeerHeaders::new(peer, local_port),
            tls,
            shared: Arc::clone(&shared),
        })
    };
    match &policy.tls_acceptor {
        Some(acceptor) => {
            // Boxed: a TLS session's state is large and only TLS connections need it.
            Box::pin(async {
                let handshake =
                    tokio::time::timeout(timeouts.request_header, acceptor.accept(stream)).await;
                match handshake {
                    Ok(Ok(tls)) => {
                        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                            shared.mark_http2();
                        }
                        let io = ConnIo::new(
                            tls,
                            Arc::clone(&shared),
                            timeouts.idle,
                            timeouts.request_header,
                        );
                        serve(io, &policy, state, ctx(true), stop).await;
                    }
                    Ok(Err(err)) => tracing::debug!(%peer, %err, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            })
            .await;
        }
        None => {
            let limits = DirectLimits {
                max_head_bytes: usize::try_from(policy.config.limits.max_request_header_bytes)
                    .unwrap_or(usize::MAX),
                max_buffered_body: policy
                    .config
                    .retry
                    .max_replay_bytes
                    .min(policy.config.limits.max_request_body_bytes),
                idle: timeouts.idle,
                head_timeout: timeouts.request_header,
            };
            let direct_ctx = ctx(false);
            let (state_ref, ctx_ref) = (&*state, &*direct_ctx);
            let mut listener_policy = ListenerPolicy::new();
            // Each request's future is boxed: the connection's task then stays small while idle
            // (the handler's future is about 3 KiB).
            let ended = server::serve(stream, limits, &stop, |req| {
                let policy = listener_policy.current(state_ref, ctx_ref.listener);
                Box::pin(handle_under(state_ref, ctx_ref, req, policy))
            })
            .await;
            if let Ended::Handover { stream, buffered } = ended {
                let io = ConnIo::new(
                    stream,
                    Arc::clone(&shared),
                    timeouts.idle,
                    timeouts.request_header,
                )
                .with_prefix(buffered);
                // Boxed so the hyper connection's state is not part of every connection's task.
                Box::pin(serve(io, &policy, state, direct_ctx, stop)).await;
            }
        }
    }
    gauge.dec();
}

async fn serve<IO>(
    io: IO,
    policy: &PolicyRuntime,
    state: Arc<ProxyState>,
    ctx: Arc<ConnContext>,
    stop: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let header_bytes =
        usize::try_from(policy.config.limits.max_request_header_bytes).unwrap_or(usize::MAX);
    builder
        .http1()
        .timer(TokioTimer::new())
        // Head and idle timeouts are enforced by `ConnIo`, which can answer 408.
        .header_read_timeout(None)
        .keep_alive(true)
        .max_buf_size(header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(1024);
    // The request future is boxed per request: hyper keeps a slot the size of the service's
    // future for the whole life of a connection, and the handler's is about 3 KiB (6.4 KiB when
    // this was measured: boxed, an idle keep-alive connection cost 22.7 KiB instead of 29 KiB
    // with bench/connections.sh, 10,000 connections, for ~1.3% more instructions per request).
    let service = service_fn(move |req| {
        let state = Arc::clone(&state);
        let ctx = Arc::clone(&ctx);
        Box::pin(async move {
            Ok::<_, Infallible>(handle(&state, &ctx, req.map(ClientBody::Streaming)).await)
        })
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(Box::pin(io)), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = stop.cancelled() => {
            // HTTP/1: finish the current response with `Connection: close`; HTTP/2: GOAWAY.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(err) = result {
        tracing::debug!(%err, "client connection ended with an error");
    }
}
