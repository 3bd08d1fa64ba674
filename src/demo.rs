//! In-process demo backends for `breakwater demo`: one healthy, one that fails now and then,
//! one slow. Real HTTP servers on loopback, so the proxy in front of them is the real thing.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// How a demo backend behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DemoBehaviour {
    /// Always 200.
    Healthy,
    /// 503 for roughly one request in five, in bursts, like a struggling instance.
    Flaky,
    /// 200 after 300 ms.
    Slow,
}

/// Starts a demo backend on `addr`; returns the bound address.
pub async fn spawn_backend(
    addr: SocketAddr,
    name: &'static str,
    behaviour: DemoBehaviour,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let counter = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    async move { Ok::<_, Infallible>(respond(name, behaviour, n, &req).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(local)
}

async fn respond(
    name: &str,
    behaviour: DemoBehaviour,
    n: u64,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    let (status, delay) = match behaviour {
        DemoBehaviour::Healthy => (StatusCode::OK, Duration::ZERO),
        // Fails requests 40..=59 of every 100: a burst that a breaker can see.
        DemoBehaviour::Flaky if (40..60).contains(&(n % 100)) => {
            (StatusCode::SERVICE_UNAVAILABLE, Duration::ZERO)
        }
        DemoBehaviour::Flaky => (StatusCode::OK, Duration::ZERO),
        DemoBehaviour::Slow => (StatusCode::OK, Duration::from_millis(300)),
    };
    tokio::time::sleep(delay).await;
    let forwarded_for = req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    let body = format!(
        "{{\"backend\":\"{name}\",\"request\":{n},\"path\":{:?},\"status\":{},\"x_forwarded_for\":{forwarded_for:?}}}\n",
        req.uri().path(),
        status.as_u16()
    );
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}
