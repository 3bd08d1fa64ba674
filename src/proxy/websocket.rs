//! WebSocket (HTTP/1.1 Upgrade) tunnels: after the 101, bytes are copied both ways without
//! parsing frames, bounded by an idle timeout, an optional lifetime and process shutdown.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use http::{Response, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::error::ProxyError;
use super::handler::{ConnContext, ProxyState};
use super::pool::UpstreamBody;
use crate::clock::now_nanos;
use crate::endpoint::InFlightGuard;
use crate::snapshot::PolicyRuntime;

const WEBSOCKET_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Checks the upstream's 101 and, if it is valid, spawns the tunnel between the two upgraded
/// connections. The in-flight guard lives as long as the tunnel.
pub fn tunnel(
    state: &ProxyState,
    policy: &PolicyRuntime,
    conn: &ConnContext,
    client_upgrade: OnUpgrade,
    response: &mut Response<UpstreamBody>,
    sent_key: Option<&http::HeaderValue>,
    guard: InFlightGuard,
) -> Result<(), ProxyError> {
    // The handshake key went upstream unchanged, so the upstream's accept value can be checked.
    if let Some(key) = sent_key {
        let expected = accept_value(key.as_bytes());
        let accepted = response
            .headers()
            .get(header::SEC_WEBSOCKET_ACCEPT)
            .is_some_and(|v| v.as_bytes() == expected.as_bytes());
        if !accepted {
            return Err(ProxyError::UpgradeFailed(
                "missing or wrong Sec-WebSocket-Accept",
            ));
        }
    }
    let upstream_upgrade = hyper::upgrade::on(response);
    conn.shared.mark_upgraded();
    let websocket = policy.config.websocket;
    let active = policy
        .metrics
        .websocket_sessions_active
        .with_label_values(&[policy.label.as_str()]);
    policy
        .metrics
        .websocket_sessions
        .with_label_values(&[policy.label.as_str()])
        .inc();
    let shutdown = state.shutdown.clone();
    state.tasks.spawn(async move {
        let _guard = guard;
        let (client, upstream) = match tokio::join!(client_upgrade, upstream_upgrade) {
            (Ok(c), Ok(u)) => (c, u),
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(error = %e, "websocket upgrade did not complete");
                return;
            }
        };
        active.inc();
        let last_activity = Arc::new(AtomicU64::new(now_nanos()));
        let mut client = Activity::new(TokioIo::new(client), Arc::clone(&last_activity));
        let mut upstream = Activity::new(TokioIo::new(upstream), Arc::clone(&last_activity));
        let started = Instant::now();
        let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
        tokio::pin!(copy);
        let idle_nanos = u64::try_from(websocket.idle_timeout.as_nanos()).unwrap_or(u64::MAX);
        let reason = loop {
            let idle_deadline = Instant::now()
                + std::time::Duration::from_nanos(
                    (last_activity.load(Ordering::Relaxed) + idle_nanos).saturating_sub(now_nanos()),
                );
            let deadline = match websocket.max_lifetime {
                Some(max) => idle_deadline.min(started + max),
                None => idle_deadline,
            };
            tokio::select! {
                result = &mut copy => break match result {
                    Ok(_) => "closed",
                    Err(_) => "error",
                },
                _ = tokio::time::sleep_until(deadline) => {
                    if websocket.max_lifetime.is_some_and(|max| started.elapsed() >= max) {
                        break "max_lifetime";
                    }
                    if now_nanos().saturating_sub(last_activity.load(Ordering::Relaxed)) >= idle_nanos {
                        break "idle_timeout";
                    }
                }
                _ = shutdown.cancelled() => break "shutdown",
            }
        };
        active.dec();
        tracing::debug!(reason, "websocket session ended");
    });
    Ok(())
}

/// `base64(SHA-1(key + GUID))` (RFC 6455 §4.2.2).
pub fn accept_value(key: &[u8]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key);
    ctx.update(WEBSOCKET_GUID);
    base64(ctx.finish().as_ref())
}

fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// An I/O stream that stamps the time of every byte moved.
struct Activity<S> {
    inner: S,
    last: Arc<AtomicU64>,
}

impl<S> Activity<S> {
    fn new(inner: S, last: Arc<AtomicU64>) -> Self {
        Self { inner, last }
    }

    fn touch(&self) {
        self.last.store(now_nanos(), Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Activity<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Activity<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_value_matches_rfc_6455_example() {
        assert_eq!(
            accept_value(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
