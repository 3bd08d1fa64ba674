//! Turns spec documents into validated runtime configuration, once, off the request path.
//!
//! Every problem is collected (not just the first) and reported with its field path.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use http::HeaderName;
use ipnet::IpNet;
use serde::Serialize;

use super::error::FieldError;
use super::resilience::{
    self, CircuitBreakerConfig, HealthCheckConfig, OverloadConfig, RateLimitConfig, RetryConfig,
};
use super::spec::{
    API_VERSION, Algorithm, BackendSpec, CacheSpec, ForwardingHeader, KIND, PolicyDocument,
    PortRef, Quantity, ResiliencePolicySpec, UpstreamProtocol,
};
use super::units::{format_duration, parse_duration, parse_size};

/// Namespace and name of a policy: its identity in logs, metrics, state and status.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PolicyId {
    /// Namespace (`default` for files that name none).
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A validated policy: everything the data plane needs, with no parsing left to do.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyConfig {
    /// Identity.
    pub id: PolicyId,
    /// Where to listen.
    pub listener: ListenerConfig,
    /// Where to send traffic, in the order written.
    pub backends: Vec<BackendConfig>,
    /// Endpoint selection.
    pub algorithm: Algorithm,
    /// Time limits.
    pub timeouts: Timeouts,
    /// Request and connection limits.
    pub limits: Limits,
    /// Forwarding-header policy.
    pub forwarding: Forwarding,
    /// WebSocket proxying.
    pub websocket: WebSocketConfig,
    /// Retries.
    pub retry: RetryConfig,
    /// Per-endpoint circuit breakers.
    pub circuit_breaker: CircuitBreakerConfig,
    /// Concurrency limits.
    pub overload: OverloadConfig,
    /// Active health checks (off when absent).
    pub health_check: Option<HealthCheckConfig>,
    /// Rate limits (off when absent).
    pub rate_limit: Option<RateLimitConfig>,
    /// Response cache (off when absent).
    pub cache: Option<CacheSettings>,
}

/// Compiled response-cache bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CacheSettings {
    /// Most entries (variants count separately).
    pub max_entries: u64,
    /// Most bytes held, bodies, headers and bookkeeping together.
    pub max_bytes: u64,
    /// Larger bodies are streamed through but not stored.
    pub max_object_bytes: u64,
    /// How long past expiry a stored response may stand in for a failed backend.
    #[serde(serialize_with = "serialize_duration")]
    pub stale_if_error: Duration,
}

/// A listener address and its optional TLS files.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerConfig {
    /// Socket address to bind.
    pub addr: SocketAddr,
    /// TLS certificate chain and key files.
    pub tls: Option<ListenerTls>,
}

/// PEM files for a TLS listener (read when the snapshot is built, so rotation needs only a reload).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerTls {
    /// Certificate chain.
    pub cert_file: PathBuf,
    /// Private key.
    pub key_file: PathBuf,
}

/// One backend of a policy.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendConfig {
    /// Unique name within the policy.
    pub name: String,
    /// How its endpoints are found.
    pub target: BackendTarget,
    /// Weight of each of its endpoints under `Weighted`.
    pub weight: u32,
    /// Upstream protocol.
    pub protocol: UpstreamProtocol,
    /// TLS towards the backend, if any.
    pub tls: Option<UpstreamTls>,
    /// Whether the policy's health checks apply to this backend.
    pub health_check: bool,
}

/// Where a backend's endpoints come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum BackendTarget {
    /// A single fixed `host:port` (the host is resolved by the connector on each new connection).
    Static {
        /// `host:port` as written.
        authority: String,
    },
    /// A DNS name re-resolved periodically; each address is an endpoint.
    Dns {
        /// Host name.
        host: String,
        /// Port.
        port: u16,
        /// Re-resolution period.
        #[serde(serialize_with = "serialize_duration")]
        refresh: Duration,
    },
    /// A Kubernetes Service (resolved by the cluster config source).
    Service {
        /// Namespace of the Service.
        namespace: String,
        /// Service name.
        name: String,
        /// Port number or name.
        port: ServicePort,
    },
}

/// A Service port by number or name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ServicePort {
    /// By number.
    Number(u16),
    /// By name.
    Name(String),
    /// The Service's only port.
    Only,
}

/// TLS towards a backend.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamTls {
    /// SNI and verified name.
    pub server_name: String,
    /// Custom CA bundle; the web PKI roots when absent.
    pub ca_file: Option<PathBuf>,
}

/// Time limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// TCP/TLS connect.
    #[serde(serialize_with = "serialize_duration")]
    pub connect: Duration,
    /// All attempts together, until response headers.
    #[serde(serialize_with = "serialize_duration")]
    pub request: Duration,
    /// One attempt, until response headers.
    #[serde(serialize_with = "serialize_duration")]
    pub per_try: Duration,
    /// Idle client keep-alive and stalled response bodies.
    #[serde(serialize_with = "serialize_duration")]
    pub idle: Duration,
    /// Reading one request head.
    #[serde(serialize_with = "serialize_duration")]
    pub request_header: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(1),
            request: Duration::from_secs(15),
            per_try: Duration::from_secs(15),
            idle: Duration::from_secs(60),
            request_header: Duration::from_secs(10),
        }
    }
}

/// Request and connection limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Largest request body in bytes.
    pub max_request_body_bytes: u64,
    /// Largest request head in bytes.
    pub max_request_header_bytes: u64,
    /// Concurrent client connections per listener.
    pub max_connections: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_body_bytes: 10 << 20,
            max_request_header_bytes: 64 << 10,
            max_connections: 10_000,
        }
    }
}

/// Forwarding-header policy.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Forwarding {
    /// Peers whose forwarding headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Removed from requests.
    #[serde(serialize_with = "serialize_header_names")]
    pub remove_request_headers: Vec<HeaderName>,
    /// Removed from responses.
    #[serde(serialize_with = "serialize_header_names")]
    pub remove_response_headers: Vec<HeaderName>,
    /// Whether `X-Forwarded-For`/`-Proto`/`-Host`/`-Port` are set on requests.
    pub add_x_forwarded: bool,
    /// Whether `Forwarded` is set on requests.
    pub add_forwarded: bool,
    /// Whether our `Via` hop is appended to requests and responses.
    pub add_via: bool,
}

impl Default for Forwarding {
    /// No trusted proxies, nothing removed, every forwarding header added.
    fn default() -> Self {
        Self {
            trusted_proxies: Vec::new(),
            remove_request_headers: Vec::new(),
            remove_response_headers: Vec::new(),
            add_x_forwarded: true,
            add_forwarded: true,
            add_via: true,
        }
    }
}

/// WebSocket settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WebSocketConfig {
    /// Whether Upgrade requests are proxied (otherwise answered 501... never silently downgraded).
    pub enabled: bool,
    /// Close after this long without bytes in either direction.
    #[serde(serialize_with = "serialize_duration")]
    pub idle_timeout: Duration,
    /// Close after this long in any case.
    #[serde(serialize_with = "serialize_optional_duration")]
    pub max_lifetime: Option<Duration>,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            idle_timeout: Duration::from_secs(300),
            max_lifetime: None,
        }
    }
}

/// The smallest header buffer hyper accepts; smaller limits would be silently raised.
const MIN_HEADER_BYTES: u64 = 8 << 10;
const DEFAULT_PORT: u16 = 8080;
const DEFAULT_DNS_REFRESH: Duration = Duration::from_secs(5);

/// Validates one document and compiles it. `Err` lists every invalid field.
pub fn compile_policy(doc: &PolicyDocument) -> Result<PolicyConfig, Vec<FieldError>> {
    let mut errors = Vec::new();
    if doc.api_version != API_VERSION {
        errors.push(FieldError::new(
            "apiVersion",
            format!("must be {API_VERSION:?}, found {:?}", doc.api_version),
        ));
    }
    if doc.kind != KIND {
        errors.push(FieldError::new(
            "kind",
            format!("must be {KIND:?}, found {:?}", doc.kind),
        ));
    }
    if let Err(reason) = check_dns_label_name(&doc.metadata.name) {
        errors.push(FieldError::new("metadata.name", reason));
    }
    let namespace = doc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let id = PolicyId {
        namespace: namespace.clone(),
        name: doc.metadata.name.clone(),
    };
    let mut ctx = Ctx {
        errors: &mut errors,
    };
    let compiled = compile_spec(&mut ctx, id, &namespace, &doc.spec);
    if errors.is_empty() {
        Ok(compiled)
    } else {
        Err(errors)
    }
}

/// Checks that no two policies claim one listener address; errors name the later policy's field.
pub fn check_listener_conflicts(policies: &[PolicyConfig]) -> Vec<(usize, FieldError)> {
    let mut seen: HashMap<u16, (usize, IpAddr, &PolicyId)> = HashMap::new();
    let mut conflicts = Vec::new();
    for (index, policy) in policies.iter().enumerate() {
        // Port 0 included: listeners are keyed by their configured address.
        let addr = policy.listener.addr;
        if let Some((_, other_ip, other_id)) = seen.get(&addr.port()) {
            // Same port on the same IP, or on a wildcard that overlaps any IP, cannot both bind.
            if *other_ip == addr.ip() || other_ip.is_unspecified() || addr.ip().is_unspecified() {
                conflicts.push((
                    index,
                    FieldError::new(
                        "spec.listener.port",
                        format!("port {} is already used by policy {other_id}", addr.port()),
                    ),
                ));
                continue;
            }
        }
        seen.insert(addr.port(), (index, addr.ip(), &policy.id));
    }
    conflicts
}

struct Ctx<'a> {
    errors: &'a mut Vec<FieldError>,
}

impl resilience::Errors for Ctx<'_> {
    fn push(&mut self, path: &str, message: String) {
        self.error(path, message);
    }

    fn positive_duration(
        &mut self,
        path: &str,
        value: Option<&String>,
        default: Duration,
    ) -> Duration {
        Ctx::positive_duration(self, path, value, default)
    }
}

impl Ctx<'_> {
    fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError::new(path, message));
    }

    fn duration(&mut self, path: &str, value: Option<&String>, default: Duration) -> Duration {
        match value {
            None => default,
            Some(text) => match parse_duration(text) {
                Ok(d) => d,
                Err(reason) => {
                    self.error(path, reason);
                    default
                }
            },
        }
    }

    fn positive_duration(
        &mut self,
        path: &str,
        value: Option<&String>,
        default: Duration,
    ) -> Duration {
        let d = self.duration(path, value, default);
        if d.is_zero() {
            self.error(path, "must be greater than 0");
            return default;
        }
        d
    }

    fn size(&mut self, path: &str, value: Option<&Quantity>, default: u64) -> u64 {
        match value {
            None => default,
            Some(Quantity::Bytes(n)) => *n,
            Some(Quantity::Text(text)) => match parse_size(text) {
                Ok(n) => n,
                Err(reason) => {
                    self.error(path, reason);
                    default
                }
            },
        }
    }
}

/// The cache is off unless `enabled: true`; bounds default to DESIGN's 10,000 entries, 64 MiB
/// and 1 MiB per object.
fn compile_cache(ctx: &mut Ctx<'_>, spec: Option<&CacheSpec>) -> Option<CacheSettings> {
    let spec = spec?;
    let max_entries = spec.max_entries.unwrap_or(10_000);
    if max_entries == 0 {
        ctx.error("spec.cache.maxEntries", "must be at least 1");
    }
    let max_bytes = ctx.size("spec.cache.maxBytes", spec.max_bytes.as_ref(), 64 << 20);
    if max_bytes == 0 {
        ctx.error("spec.cache.maxBytes", "must be at least 1");
    }
    let max_object_bytes = ctx.size(
        "spec.cache.maxObjectBytes",
        spec.max_object_bytes.as_ref(),
        (1 << 20u64).min(max_bytes.max(1)),
    );
    if max_object_bytes == 0 {
        ctx.error("spec.cache.maxObjectBytes", "must be at least 1");
    } else if max_object_bytes > max_bytes {
        ctx.error(
            "spec.cache.maxObjectBytes",
            format!("{max_object_bytes} is larger than spec.cache.maxBytes ({max_bytes})"),
        );
    }
    let stale_if_error = ctx.duration(
        "spec.cache.staleIfError",
        spec.stale_if_error.as_ref(),
        Duration::ZERO,
    );
    spec.enabled.unwrap_or(false).then_some(CacheSettings {
        max_entries,
        max_bytes,
        max_object_bytes,
        stale_if_error,
    })
}

fn compile_spec(
    ctx: &mut Ctx<'_>,
    id: PolicyId,
    namespace: &str,
    spec: &ResiliencePolicySpec,
) -> PolicyConfig {
    let listener = compile_listener(ctx, spec);
    let backends = compile_backends(ctx, namespace, &spec.backends);
    let algorithm = spec
        .load_balancing
        .as_ref()
        .map(|lb| lb.algorithm)
        .unwrap_or_default();
    let timeouts = compile_timeouts(ctx, spec);
    let limits = compile_limits(ctx, spec);
    let forwarding = compile_forwarding(ctx, spec);
    let websocket = compile_websocket(ctx, spec);
    if let Some(selector) = &spec.pod_selector {
        for (i, req) in selector.match_expressions.iter().enumerate() {
            let path = format!("spec.podSelector.matchExpressions[{i}]");
            match req.operator.as_str() {
                "In" | "NotIn" if req.values.is_empty() => ctx.error(
                    format!("{path}.values"),
                    "must not be empty for In and NotIn",
                ),
                "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
                other => ctx.error(
                    format!("{path}.operator"),
                    format!(
                        "unknown operator {other:?}: expected In, NotIn, Exists or DoesNotExist"
                    ),
                ),
            }
        }
    }
    let cache = compile_cache(ctx, spec.cache.as_ref());
    let retry = resilience::compile_retry(ctx, spec.retry.as_ref());
    let circuit_breaker = resilience::compile_breaker(ctx, spec.circuit_breaker.as_ref());
    let overload = resilience::compile_overload(ctx, spec.overload.as_ref());
    let health_check = resilience::compile_health_check(ctx, spec.health_check.as_ref());
    let rate_limit = resilience::compile_rate_limit(ctx, spec.rate_limit.as_ref(), namespace);
    PolicyConfig {
        id,
        listener,
        backends,
        algorithm,
        timeouts,
        limits,
        forwarding,
        websocket,
        retry,
        circuit_breaker,
        overload,
        health_check,
        rate_limit,
        cache,
    }
}

fn compile_listener(ctx: &mut Ctx<'_>, spec: &ResiliencePolicySpec) -> ListenerConfig {
    // Port 0 asks the OS for a free port (tests, ad-hoc runs); `/backends/health` shows it.
    let port = spec.listener.port.unwrap_or(DEFAULT_PORT);
    let ip = match &spec.listener.address {
        None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Some(text) => text.parse().unwrap_or_else(|_| {
            ctx.error(
                "spec.listener.address",
                format!("invalid IP address {text:?}"),
            );
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        }),
    };
    let tls = spec.listener.tls.as_ref().map(|tls| {
        for (field, value) in [("certFile", &tls.cert_file), ("keyFile", &tls.key_file)] {
            if value.trim().is_empty() {
                ctx.error(format!("spec.listener.tls.{field}"), "must name a PEM file");
            }
        }
        ListenerTls {
            cert_file: PathBuf::from(&tls.cert_file),
            key_file: PathBuf::from(&tls.key_file),
        }
    });
    ListenerConfig {
        addr: SocketAddr::new(ip, port),
        tls,
    }
}

fn compile_backends(
    ctx: &mut Ctx<'_>,
    namespace: &str,
    specs: &[BackendSpec],
) -> Vec<BackendConfig> {
    if specs.is_empty() {
        ctx.error("spec.backends", "at least one backend is required");
    }
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut out = Vec::with_capacity(specs.len());
    for (i, backend) in specs.iter().enumerate() {
        let path = format!("spec.backends[{i}]");
        if let Err(reason) = check_dns_label_name(&backend.name) {
            ctx.error(format!("{path}.name"), reason);
        } else if let Some(first) = names.insert(&backend.name, i) {
            ctx.error(
                format!("{path}.name"),
                format!(
                    "duplicate backend name {:?} (also spec.backends[{first}])",
                    backend.name
                ),
            );
        }
        if let Some(compiled) = compile_backend(ctx, &path, namespace, backend) {
            out.push(compiled);
        }
    }
    out
}

fn compile_backend(
    ctx: &mut Ctx<'_>,
    path: &str,
    namespace: &str,
    spec: &BackendSpec,
) -> Option<BackendConfig> {
    let given = [
        spec.url.is_some(),
        spec.dns.is_some(),
        spec.service.is_some(),
    ]
    .iter()
    .filter(|set| **set)
    .count();
    if given != 1 {
        ctx.error(
            path.to_owned(),
            format!("exactly one of url, dns or service must be set (found {given})"),
        );
        return None;
    }
    let weight = spec.weight.unwrap_or(1);
    if weight == 0 {
        ctx.error(format!("{path}.weight"), "must be at least 1");
    }
    let protocol = spec.protocol.unwrap_or_default();
    let mut tls_from_scheme = false;
    let (target, default_server_name) = if let Some(url) = &spec.url {
        let (scheme_is_https, host, port) = match parse_backend_url(url) {
            Ok(parts) => parts,
            Err(reason) => {
                ctx.error(format!("{path}.url"), reason);
                return None;
            }
        };
        tls_from_scheme = scheme_is_https;
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        (BackendTarget::Static { authority }, host)
    } else if let Some(dns) = &spec.dns {
        let (host, port) = match split_host_port(dns) {
            Some(parts) => parts,
            None => {
                ctx.error(
                    format!("{path}.dns"),
                    format!("expected host:port, found {dns:?}"),
                );
                return None;
            }
        };
        let refresh = ctx.positive_duration(
            &format!("{path}.dnsRefresh"),
            spec.dns_refresh.as_ref(),
            DEFAULT_DNS_REFRESH,
        );
        (
            BackendTarget::Dns {
                host: host.clone(),
                port,
                refresh,
            },
            host,
        )
    } else if let Some(service) = &spec.service {
        if let Err(reason) = check_dns_label_name(&service.name) {
            ctx.error(format!("{path}.service.name"), reason);
        }
        let port = match &service.port {
            None => ServicePort::Only,
            Some(PortRef::Number(0)) => {
                ctx.error(
                    format!("{path}.service.port"),
                    "must be between 1 and 65535",
                );
                ServicePort::Only
            }
            Some(PortRef::Number(n)) => ServicePort::Number(*n),
            Some(PortRef::Name(name)) => ServicePort::Name(name.clone()),
        };
        let ns = service
            .namespace
            .clone()
            .unwrap_or_else(|| namespace.to_owned());
        let server_name = format!("{}.{ns}.svc", service.name);
        (
            BackendTarget::Service {
                namespace: ns,
                name: service.name.clone(),
                port,
            },
            server_name,
        )
    } else {
        return None;
    };
    if spec.dns_refresh.is_some() && spec.dns.is_none() {
        ctx.error(format!("{path}.dnsRefresh"), "only applies to dns backends");
    }
    let tls = if tls_from_scheme || spec.tls.is_some() {
        let settings = spec.tls.clone().unwrap_or_default();
        if let Some(name) = &settings.server_name {
            if rustls_pki_types::ServerName::try_from(name.as_str()).is_err() {
                ctx.error(
                    format!("{path}.tls.serverName"),
                    format!("invalid server name {name:?}"),
                );
            }
        }
        Some(UpstreamTls {
            server_name: settings.server_name.unwrap_or(default_server_name),
            ca_file: settings.ca_file.map(PathBuf::from),
        })
    } else {
        None
    };
    if spec
        .url
        .as_deref()
        .is_some_and(|u| u.starts_with("http://"))
        && spec.tls.is_some()
    {
        ctx.error(
            format!("{path}.tls"),
            "an http:// URL cannot use TLS; write https:// instead",
        );
    }
    Some(BackendConfig {
        name: spec.name.clone(),
        target,
        weight: weight.max(1),
        protocol,
        tls,
        health_check: spec.health_check.unwrap_or(true),
    })
}

/// Splits `http(s)://host[:port][/]` into (is_https, host, port).
fn parse_backend_url(url: &str) -> Result<(bool, String, u16), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("invalid URL {url:?}: {e}"))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        Some(other) => {
            return Err(format!(
                "unsupported scheme {other:?} in {url:?}: use http or https"
            ));
        }
        None => return Err(format!("invalid URL {url:?}: expected http://host:port")),
    };
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("invalid URL {url:?}: missing host"))?;
    if uri.path() != "/" && !uri.path().is_empty() || uri.query().is_some() {
        return Err(format!(
            "invalid URL {url:?}: a backend URL has no path or query (requests keep their own)"
        ));
    }
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    if port == 0 {
        return Err(format!("invalid URL {url:?}: port 0"));
    }
    Ok((https, host.trim_matches(['[', ']']).to_owned(), port))
}

fn split_host_port(text: &str) -> Option<(String, u16)> {
    let (host, port) = text.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let host = host.trim_matches(['[', ']']);
    if host.is_empty() || host.contains('/') {
        return None;
    }
    Some((host.to_owned(), port))
}

fn compile_timeouts(ctx: &mut Ctx<'_>, spec: &ResiliencePolicySpec) -> Timeouts {
    let defaults = Timeouts::default();
    let Some(t) = &spec.timeouts else {
        return defaults;
    };
    let connect = ctx.positive_duration(
        "spec.timeouts.connect",
        t.connect.as_ref(),
        defaults.connect,
    );
    let request = ctx.positive_duration(
        "spec.timeouts.request",
        t.request.as_ref(),
        defaults.request,
    );
    let per_try = ctx.positive_duration("spec.timeouts.perTry", t.per_try.as_ref(), request);
    let idle = ctx.positive_duration("spec.timeouts.idle", t.idle.as_ref(), defaults.idle);
    let request_header = ctx.positive_duration(
        "spec.timeouts.requestHeader",
        t.request_header.as_ref(),
        defaults.request_header,
    );
    if per_try > request {
        ctx.error(
            "spec.timeouts.perTry",
            format!(
                "{} is longer than spec.timeouts.request ({})",
                format_duration(per_try),
                format_duration(request)
            ),
        );
    }
    Timeouts {
        connect,
        request,
        per_try,
        idle,
        request_header,
    }
}

fn compile_limits(ctx: &mut Ctx<'_>, spec: &ResiliencePolicySpec) -> Limits {
    let defaults = Limits::default();
    let Some(l) = &spec.limits else {
        return defaults;
    };
    let max_request_body_bytes = ctx.size(
        "spec.limits.maxRequestBodyBytes",
        l.max_request_body_bytes.as_ref(),
        defaults.max_request_body_bytes,
    );
    let max_request_header_bytes = ctx.size(
        "spec.limits.maxRequestHeaderBytes",
        l.max_request_header_bytes.as_ref(),
        defaults.max_request_header_bytes,
    );
    if max_request_header_bytes < MIN_HEADER_BYTES {
        ctx.error("spec.limits.maxRequestHeaderBytes", "must be at least 8Ki");
    }
    let max_connections = l.max_connections.unwrap_or(defaults.max_connections);
    if max_connections == 0 {
        ctx.error("spec.limits.maxConnections", "must be at least 1");
    }
    Limits {
        max_request_body_bytes,
        max_request_header_bytes,
        max_connections,
    }
}

fn compile_forwarding(ctx: &mut Ctx<'_>, spec: &ResiliencePolicySpec) -> Forwarding {
    let Some(f) = &spec.forwarding else {
        return Forwarding::default();
    };
    let mut trusted_proxies = Vec::new();
    for (i, text) in f.trusted_proxies.iter().enumerate() {
        let parsed = text
            .parse::<IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from));
        match parsed {
            Ok(net) => trusted_proxies.push(net.trunc()),
            Err(_) => ctx.error(
                format!("spec.forwarding.trustedProxies[{i}]"),
                format!("invalid CIDR or IP address {text:?}"),
            ),
        }
    }
    let mut header_list = |field: &str, names: &[String]| -> Vec<HeaderName> {
        let mut out = Vec::new();
        for (i, name) in names.iter().enumerate() {
            match HeaderName::from_bytes(name.as_bytes()) {
                Ok(h) => out.push(h),
                Err(_) => ctx.error(
                    format!("spec.forwarding.{field}[{i}]"),
                    format!("invalid header name {name:?}"),
                ),
            }
        }
        out
    };
    let remove_request_headers = header_list("removeRequestHeaders", &f.remove_request_headers);
    let remove_response_headers = header_list("removeResponseHeaders", &f.remove_response_headers);
    let mut forwarding = Forwarding {
        trusted_proxies,
        remove_request_headers,
        remove_response_headers,
        ..Forwarding::default()
    };
    if let Some(families) = &f.add_headers {
        for (i, family) in families.iter().enumerate() {
            if families[..i].contains(family) {
                ctx.error(
                    format!("spec.forwarding.addHeaders[{i}]"),
                    format!("{family:?} is listed twice"),
                );
            }
        }
        forwarding.add_x_forwarded = families.contains(&ForwardingHeader::XForwarded);
        forwarding.add_forwarded = families.contains(&ForwardingHeader::Forwarded);
        forwarding.add_via = families.contains(&ForwardingHeader::Via);
    }
    forwarding
}

fn compile_websocket(ctx: &mut Ctx<'_>, spec: &ResiliencePolicySpec) -> WebSocketConfig {
    let defaults = WebSocketConfig::default();
    let Some(ws) = &spec.websocket else {
        return defaults;
    };
    WebSocketConfig {
        enabled: ws.enabled.unwrap_or(defaults.enabled),
        idle_timeout: ctx.positive_duration(
            "spec.websocket.idleTimeout",
            ws.idle_timeout.as_ref(),
            defaults.idle_timeout,
        ),
        max_lifetime: ws.max_lifetime.as_ref().map(|_| {
            ctx.positive_duration(
                "spec.websocket.maxLifetime",
                ws.max_lifetime.as_ref(),
                Duration::MAX,
            )
        }),
    }
}

/// Kubernetes object names (RFC 1123 labels): lower-case alphanumerics and `-`, at most 63.
fn check_dns_label_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".to_owned());
    }
    let valid = name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.']);
    if valid {
        Ok(())
    } else {
        Err(format!(
            "invalid name {name:?}: use at most 63 lower-case letters, digits, '-' or '.', starting and ending alphanumeric"
        ))
    }
}

pub(super) fn serialize_duration<S: serde::Serializer>(
    d: &Duration,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

fn serialize_optional_duration<S: serde::Serializer>(
    d: &Option<Duration>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&format_duration(*d)),
        None => s.serialize_none(),
    }
}

fn serialize_header_names<S: serde::Serializer>(
    names: &[HeaderName],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(names.iter().map(HeaderName::as_str))
}
