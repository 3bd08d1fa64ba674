//! Pooled upstream HTTP clients, one per distinct connection setting, shared across snapshots so
//! keep-alive pools survive reloads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::ServerName;

use super::body::RequestBody;
use super::tls::{TlsError, client_config};
use crate::config::compile::UpstreamTls;
use crate::config::spec::UpstreamProtocol;

/// How long an unused upstream connection stays pooled. Shorter than the common backend
/// keep-alive timeouts (60 s nginx, 75 s Envoy) so the proxy, not the backend, closes idle
/// connections, which avoids sending a request down a socket the backend is closing.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const POOL_MAX_IDLE_PER_HOST: usize = 256;

/// The hyper client type every upstream uses.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, RequestBody>;

/// What makes two backends' connections interchangeable.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClientKey {
    /// HTTP/1.1 or HTTP/2.
    pub protocol: UpstreamProtocol,
    /// TLS settings, if any.
    pub tls: Option<UpstreamTls>,
    /// Connect timeout.
    pub connect_timeout: Duration,
}

/// A pooled client plus the scheme its URIs use.
pub struct UpstreamClient {
    /// The pooled client.
    pub client: HttpClient,
    /// `http` or `https`.
    pub scheme: http::uri::Scheme,
    /// Whether requests go out as HTTP/2.
    pub http2: bool,
}

/// Clients shared across snapshots, keyed by [`ClientKey`].
#[derive(Default)]
pub struct ClientCache {
    clients: Mutex<HashMap<ClientKey, Weak<UpstreamClient>>>,
}

impl ClientCache {
    /// The client for `key`, reusing a live one (and its pool) when possible.
    pub fn get(&self, key: &ClientKey) -> Result<Arc<UpstreamClient>, TlsError> {
        let mut clients = match self.clients.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(existing) = clients.get(key).and_then(Weak::upgrade) {
            return Ok(existing);
        }
        let client = Arc::new(build(key)?);
        clients.insert(key.clone(), Arc::downgrade(&client));
        clients.retain(|_, weak| weak.strong_count() > 0);
        Ok(client)
    }
}

fn build(key: &ClientKey) -> Result<UpstreamClient, TlsError> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(key.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let http2 = key.protocol == UpstreamProtocol::H2;
    let builder = HttpsConnectorBuilder::new().with_tls_config(client_config(
        key.tls.as_ref().and_then(|t| t.ca_file.as_deref()),
    )?);
    let builder = builder.https_or_http();
    let builder = match &key.tls {
        Some(tls) => {
            let name = ServerName::try_from(tls.server_name.clone()).map_err(|e| {
                TlsError::Rustls(rustls::Error::General(format!(
                    "invalid server name {:?}: {e}",
                    tls.server_name
                )))
            })?;
            builder.with_server_name_resolver(FixedServerNameResolver::new(name))
        }
        None => builder,
    };
    let connector = if http2 {
        builder.enable_http2().wrap_connector(http)
    } else {
        builder.enable_http1().wrap_connector(http)
    };
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .http2_only(http2)
        .build(connector);
    Ok(UpstreamClient {
        client,
        scheme: if key.tls.is_some() {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        },
        http2,
    })
}
