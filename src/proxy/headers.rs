//! Request validation, hop-by-hop stripping and forwarding headers (`X-Forwarded-*`, RFC 7239
//! `Forwarded`, `Via`).

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Method, Request, Version};

use super::error::ProxyError;
use crate::ascii::eq_lower;
use crate::config::compile::Forwarding;

/// Headers that describe one connection, never the message (RFC 9110 §7.6.1), plus the
/// proxy-specific ones no backend should see.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// [`hop_by_hop_index`] of `Connection`.
pub(crate) const HOP_CONNECTION: usize = 0;
/// [`hop_by_hop_index`] of `Transfer-Encoding`.
pub(crate) const HOP_TRANSFER_ENCODING: usize = 7;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// What the proxy knows about the client side of a request.
#[derive(Clone, Copy, Debug)]
pub struct ClientSide<'a> {
    /// The connection's peer, with its header values prepared once per connection.
    pub peer: &'a PeerHeaders,
    /// Whether the client connection is TLS.
    pub tls: bool,
    /// Trust and removal settings.
    pub forwarding: &'a Forwarding,
}

/// Forwarding-header values that depend only on the client connection, built once per
/// connection so requests clone them instead of formatting and allocating.
#[derive(Debug)]
pub struct PeerHeaders {
    /// The peer address (IPv4-mapped IPv6 shown as IPv4).
    pub ip: IpAddr,
    /// The peer address as a header value (`X-Forwarded-For` from an untrusted peer).
    ip_value: HeaderValue,
    /// The listener port as a header value (`X-Forwarded-Port`).
    port_value: HeaderValue,
    /// `for=<ip>` as RFC 7239 writes it.
    forwarded_for: String,
    /// The first valid `Host` the connection's requests named. A client names the same host on
    /// every request of a connection, so that one is parsed and copied once per connection,
    /// and requests borrow it. Set once, so reading it takes no lock and no reference count.
    first_host: OnceLock<Authority>,
    /// `Forwarded` for an untrusted client naming `first_host`, built on first use.
    first_forwarded: OnceLock<Option<HeaderValue>>,
}

/// The authority a request is for.
#[derive(Debug)]
pub enum RequestAuthority<'c> {
    /// The connection's first `Host`, named again.
    Connection(&'c Authority),
    /// Another one: from an absolute-form target, or a `Host` the connection had not named first.
    Own(Authority),
}

impl RequestAuthority<'_> {
    /// The authority.
    pub fn get(&self) -> &Authority {
        match self {
            RequestAuthority::Connection(authority) => authority,
            RequestAuthority::Own(authority) => authority,
        }
    }
}

impl PeerHeaders {
    /// Prepares the values for a connection from `peer` to local port `local_port`.
    pub fn new(peer: SocketAddr, local_port: u16) -> Self {
        let ip = canonical_ip(peer.ip());
        let forwarded_for = match ip {
            IpAddr::V4(v4) => format!("for={v4}"),
            IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
        };
        Self {
            ip,
            ip_value: HeaderValue::from_str(&ip.to_string())
                .unwrap_or(HeaderValue::from_static("unknown")),
            port_value: HeaderValue::from(local_port),
            forwarded_for,
            first_host: OnceLock::new(),
            first_forwarded: OnceLock::new(),
        }
    }
}

/// Checks the request head and returns the authority the request is for.
///
/// Rejects (400) what hyper lets through but a proxy must not forward: a missing `Host` on
/// HTTP/1.1, duplicate `Host`, an unparsable `Host`. An absolute-form target wins over `Host`
/// (RFC 9112 §3.2.2), and `Host` is rewritten to match so the backend sees one answer.
pub fn request_authority<B>(req: &Request<B>) -> Result<Option<Authority>, ProxyError> {
    Ok(authority_of(req, None)?.map(|authority| match authority {
        RequestAuthority::Connection(authority) => authority.clone(),
        RequestAuthority::Own(authority) => authority,
    }))
}

/// [`request_authority`] for a request of `peer`'s connection: its first valid `Host` is kept
/// with the connection, and a request naming the same value again borrows it unparsed.
pub fn request_authority_for<'c, B>(
    req: &Request<B>,
    peer: &'c PeerHeaders,
) -> Result<Option<RequestAuthority<'c>>, ProxyError> {
    authority_of(req, Some(peer))
}

fn authority_of<'c, B>(
    req: &Request<B>,
    peer: Option<&'c PeerHeaders>,
) -> Result<Option<RequestAuthority<'c>>, ProxyError> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest("duplicate Host header"));
    }
    if let (Some(value), Some(peer), None) = (host, peer, req.uri().authority()) {
        if let Some(first) = peer
            .first_host
            .get()
            .filter(|first| first.as_str().as_bytes() == value.as_bytes())
        {
            return Ok(Some(RequestAuthority::Connection(first)));
        }
    }
    let from_host = match host {
        Some(value) => Some(
            // The authority parser accepts only URI characters, so no `to_str` pass first.
            Authority::try_from(value.as_bytes())
                .ok()
                .filter(|a| is_plain_host_port(a.as_str().as_bytes()))
                .ok_or(ProxyError::BadRequest("invalid Host header"))?,
        ),
        None => None,
    };
    if let Some(authority) = req.uri().authority() {
        if authority.as_str().as_bytes().contains(&b'@') {
            return Err(ProxyError::BadRequest("userinfo in request target"));
        }
        return Ok(Some(RequestAuthority::Own(authority.clone())));
    }
    match (req.version(), from_host, peer) {
        (Version::HTTP_11, None, _) => Err(ProxyError::BadRequest("missing Host header")),
        (_, None, _) => Ok(None),
        (_, Some(authority), None) => Ok(Some(RequestAuthority::Own(authority))),
        (_, Some(authority), Some(peer)) => Ok(match peer.first_host.set(authority) {
            // Set just now, so present.
            Ok(()) => peer.first_host.get().map(RequestAuthority::Connection),
            Err(authority) => Some(RequestAuthority::Own(authority)),
        }),
    }
}

/// Whether a parsed authority is `host[:port]` with a host: no userinfo (`@`), and not just a
/// port. Byte checks: `Authority::host` searches for `@` from the end as text, and this runs for
/// every request.
fn is_plain_host_port(authority: &[u8]) -> bool {
    authority.first().is_some_and(|&b| b != b':') && !authority.contains(&b'@')
}

/// Whether the request asks to switch protocols (`Connection: upgrade` plus `Upgrade`).
pub fn is_upgrade_request<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_has_token(req.headers(), "upgrade")
}

/// Whether a `Connection` field lists `token` (lower-case; matched in any case).
pub(crate) fn connection_has_token(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| list_has_token(v.as_bytes(), token.as_bytes()))
}

/// Whether a comma-separated field value lists `token` (lower-case; matched in any case). Works
/// on bytes: the tokens that matter are ASCII, and this runs for every response.
pub(crate) fn list_has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| eq_lower(t.trim_ascii(), token))
}

/// A `Content-Length` value: decimal digits only (RFC 9110 §8.6; no sign, no list), surrounding
/// whitespace ignored, few enough digits to fit a u64.
pub(crate) fn parse_content_length(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || value.len() > 19 {
        return None;
    }
    value.iter().try_fold(0u64, |n, b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

/// Removes hop-by-hop headers: the fixed list and every header `Connection` names.
/// With `keep_upgrade`, `Upgrade` and `Connection: upgrade` survive (WebSocket handshakes).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the (few) fields present finds which hop-by-hop names there are, whether
    // `Connection` names any field beyond its usual options, and whether `TE` is just
    // `trailers`; only then are hashed look-ups and removals made. Most responses carry just
    // `Connection: keep-alive`, which costs one removal.
    let mut present = 0u16;
    let mut connection_names_fields = false;
    let mut te_other_than_trailers = false;
    for (name, value) in headers.iter() {
        let Some(i) = hop_by_hop_index(name) else {
            continue;
        };
        present |= 1 << i;
        match i {
            0 => {
                connection_names_fields |= value
                    .as_bytes()
                    .split(|b| *b == b',')
                    .any(|token| !is_connection_option(token.trim_ascii(), keep_upgrade));
            }
            // `TE: trailers` is end-to-end in practice (gRPC needs it on HTTP/2 upstreams).
            5 => te_other_than_trailers |= !eq_lower(value.as_bytes(), b"trailers"),
            _ => {}
        }
    }
    if present == 0 {
        if keep_upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        return;
    }
    let te_trailers_only = !te_other_than_trailers;
    if connection_names_fields {
        // Fields named by `Connection` (other than the fixed list and the usual `close` /
        // `keep-alive` options, which name no field to remove beyond it).
        let mut named: Vec<HeaderName> = Vec::new();
        for value in headers.get_all(header::CONNECTION) {
            for token in value
                .as_bytes()
                .split(|b| *b == b',')
                .map(<[u8]>::trim_ascii)
            {
                if is_connection_option(token, keep_upgrade) {
                    continue;
                }
                let Ok(token) = std::str::from_utf8(token) else {
                    continue;
                };
                if !headers.contains_key(token) {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                    named.push(name);
                }
            }
        }
        for name in named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) == 0
            || (keep_upgrade && (name == header::UPGRADE || name == header::CONNECTION))
            || (te_trailers_only && name == header::TE)
        {
            continue;
        }
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// A `Connection` token that names no field to remove: empty, `close`, `keep-alive`, and
/// `upgrade` when the upgrade is kept.
fn is_connection_option(token: &[u8], keep_upgrade: bool) -> bool {
    token.is_empty()
        || eq_lower(token, b"close")
        || eq_lower(token, b"keep-alive")
        || (keep_upgrade && eq_lower(token, b"upgrade"))
}

/// The position of `name` in [`HOP_BY_HOP`]. Dispatches on the length first, so the usual
/// end-to-end names cost one comparison of lengths (this runs for every header of every
/// message).
pub(crate) fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    let name = name.as_str();
    hop_by_hop_candidates(name.len())
        .iter()
        .copied()
        .find(|&i| HOP_BY_HOP[i].as_str() == name)
}

/// [`hop_by_hop_index`] for a field name as it came off the wire, in any letter case.
pub(crate) fn hop_by_hop_index_raw(name: &[u8]) -> Option<usize> {
    hop_by_hop_candidates(name.len())
        .iter()
        .copied()
        .find(|&i| eq_lower(name, HOP_BY_HOP[i].as_str().as_bytes()))
}

/// The entries of [`HOP_BY_HOP`] whose names are `len` bytes long.
fn hop_by_hop_candidates(len: usize) -> &'static [usize] {
    match len {
        10 => &[0, 1],
        16 => &[2],
        19 => &[3],
        18 => &[4],
        2 => &[5],
        7 => &[6, 8],
        17 => &[7],
        _ => &[],
    }
}

/// Rewrites a request's headers for forwarding. The forwarding fields an untrusted client
/// gets, and `Via`, come back set aside ([`PendingFields`]) rather than in the map.
pub fn prepare_request(
    headers: &mut HeaderMap,
    version: Version,
    authority: Option<&Authority>,
    client: &ClientSide<'_>,
    upgrade: bool,
) -> PendingFields {
    strip_hop_by_hop(headers, upgrade);
    for name in &client.forwarding.remove_request_headers {
        headers.remove(name);
    }
    let forwarding = client.forwarding;
    // The `Host` value sent on, which `X-Forwarded-Host` repeats (a clone, no copy; taken only
    // when that field is added: even a clone is a reference count taken and dropped).
    let mut host = None;
    // The connection's own first `Host` is handed out (`request_authority_for`) only for a
    // request whose `Host` field named it byte for byte: unless that field was just removed or
    // its value is wanted for `X-Forwarded-Host`, there is nothing to look up or set.
    let host_field_is_authority = |authority: &Authority| {
        !forwarding.add_x_forwarded
            && forwarding.remove_request_headers.is_empty()
            && client
                .peer
                .first_host
                .get()
                .is_some_and(|first| std::ptr::eq(first, authority))
    };
    if let Some(authority) = authority.filter(|a| !host_field_is_authority(a)) {
        let sent = headers
            .get(header::HOST)
            .filter(|h| h.as_bytes() == authority.as_str().as_bytes());
        match sent {
            Some(value) => host = forwarding.add_x_forwarded.then(|| value.clone()),
            None => {
                if let Ok(value) = HeaderValue::from_str(authority.as_str()) {
                    host = forwarding.add_x_forwarded.then(|| value.clone());
                    headers.insert(header::HOST, value);
                }
            }
        }
    }
    let mut pending = PendingFields {
        fields: Default::default(),
        via: forwarding.add_via.then(|| via_value(version)),
    };
    if !forwarding.add_x_forwarded && !forwarding.add_forwarded {
        return pending;
    }
    let peer = client.peer;
    let trusted = forwarding
        .trusted_proxies
        .iter()
        .any(|net| net.contains(&peer.ip));
    let proto = if client.tls { "https" } else { "http" };
    if !trusted {
        // Whatever an untrusted client claimed in a family we add goes; the proxy's own values
        // are set aside rather than inserted (hashed into the map here, only to be iterated out
        // again). A family we do not add passes through as sent.
        if has_forwarding_fields(headers) {
            for (i, name) in PENDING_NAMES.iter().enumerate() {
                if adds_pending(forwarding, i) {
                    headers.remove(*name);
                }
            }
        }
        let x_forwarded = forwarding.add_x_forwarded;
        pending.fields = [
            x_forwarded.then(|| peer.ip_value.clone()),
            x_forwarded.then(|| HeaderValue::from_static(proto)),
            host.filter(|_| x_forwarded),
            x_forwarded.then(|| peer.port_value.clone()),
            forwarding
                .add_forwarded
                .then(|| untrusted_forwarded(peer, authority, proto))
                .flatten(),
        ];
        return pending;
    }
    if forwarding.add_x_forwarded {
        extend_x_forwarded(headers, peer, proto, host);
    }
    if forwarding.add_forwarded {
        let forwarded = forwarded_text(peer, authority, proto, Some(headers));
        set(headers, &FORWARDED, forwarded);
    }
    pending
}

/// `X-Forwarded-*` for a trusted peer: its `For` chain extended with the peer, the rest kept
/// when present.
fn extend_x_forwarded(
    headers: &mut HeaderMap,
    peer: &PeerHeaders,
    proto: &'static str,
    host: Option<HeaderValue>,
) {
    let mut chain = None::<String>;
    for value in headers.get_all(&X_FORWARDED_FOR) {
        if let Ok(text) = value.to_str() {
            let chain = chain.get_or_insert_with(|| String::with_capacity(64));
            chain.push_str(text.trim());
            chain.push_str(", ");
        }
    }
    match chain {
        Some(mut chain) => {
            let _ = write!(chain, "{}", peer.ip);
            set(headers, &X_FORWARDED_FOR, chain);
        }
        None => {
            headers.insert(&X_FORWARDED_FOR, peer.ip_value.clone());
        }
    }
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !headers.contains_key(&X_FORWARDED_HOST) {
        // `Host` was set from the authority above: reuse its value instead of copying again.
        if let Some(host) = host {
            headers.insert(&X_FORWARDED_HOST, host);
        }
    }
    if !headers.contains_key(&X_FORWARDED_PORT) {
        headers.insert(&X_FORWARDED_PORT, peer.port_value.clone());
    }
}

/// `Forwarded` for an untrusted client: our hop alone, which depends only on the connection
/// and the authority, so for the connection's first `Host` it is built once and kept.
fn untrusted_forwarded(
    peer: &PeerHeaders,
    authority: Option<&Authority>,
    proto: &str,
) -> Option<HeaderValue> {
    let build = |authority| owned_value(forwarded_text(peer, authority, proto, None));
    let Some(authority) = authority else {
        return build(None);
    };
    match peer.first_host.get() {
        // Bytes, not `Authority`'s case-insensitive equality: `host=` repeats what was sent.
        Some(first) if first.as_str() == authority.as_str() => peer
            .first_forwarded
            .get_or_init(|| build(Some(authority)))
            .clone(),
        _ => build(Some(authority)),
    }
}

/// RFC 7239 `Forwarded`: our hop appended to the chain in `trusted_chain` (a trusted peer's
/// request), otherwise alone.
fn forwarded_text(
    peer: &PeerHeaders,
    authority: Option<&Authority>,
    proto: &str,
    trusted_chain: Option<&HeaderMap>,
) -> String {
    // Sized for the usual value (a quoted host included) so it is allocated once.
    let mut forwarded = String::with_capacity(
        peer.forwarded_for.len() + authority.map_or(0, |a| a.as_str().len() + 8) + 13,
    );
    if let Some(headers) = trusted_chain {
        for value in headers.get_all(&FORWARDED) {
            if let Ok(text) = value.to_str() {
                forwarded.push_str(text.trim());
                forwarded.push_str(", ");
            }
        }
    }
    forwarded.push_str(&peer.forwarded_for);
    if let Some(authority) = authority {
        forwarded.push_str(";host=");
        push_forwarded_value(&mut forwarded, authority.as_str());
    }
    forwarded.push_str(";proto=");
    forwarded.push_str(proto);
    forwarded
}

/// Whether the map holds a field the proxy sets for an untrusted client. One pass over the
/// names, by length first: there are usually none, and removing an absent name costs a hash.
fn has_forwarding_fields(headers: &HeaderMap) -> bool {
    headers.keys().any(|name| {
        let name = name.as_str();
        match name.len() {
            9 | 15..=17 => PENDING_NAMES.iter().any(|pending| pending.as_str() == name),
            _ => false,
        }
    })
}

/// Forwarding fields computed for a request but not in its map: the direct client writes them
/// after the map's own fields, and [`insert_into`](Self::insert_into) puts them in the map for
/// hyper's clients. Set aside because inserting hashes each name into the map only for it to be
/// iterated out again; for an untrusted client (the usual case) each of them replaces whatever
/// the client sent, and the map holds none of those names any more.
#[derive(Clone, Debug)]
pub struct PendingFields {
    /// Values replacing the field of the same name in [`PENDING_NAMES`] (untrusted clients).
    fields: [Option<HeaderValue>; 5],
    /// Our `Via` hop, appended after any the request carries (unless `Via` is not added).
    via: Option<HeaderValue>,
}

/// The names of [`PendingFields::fields`], in order.
static PENDING_NAMES: [&HeaderName; 5] = [
    &X_FORWARDED_FOR,
    &X_FORWARDED_PROTO,
    &X_FORWARDED_HOST,
    &X_FORWARDED_PORT,
    &FORWARDED,
];

/// Whether `forwarding` adds the family of `PENDING_NAMES[i]`.
fn adds_pending(forwarding: &Forwarding, i: usize) -> bool {
    if i < 4 {
        forwarding.add_x_forwarded
    } else {
        forwarding.add_forwarded
    }
}

impl PendingFields {
    /// Each field as it goes on the wire, `Via` last.
    pub fn iter(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        PENDING_NAMES
            .iter()
            .zip(&self.fields)
            .filter_map(|(name, value)| Some((*name, value.as_ref()?)))
            .chain(self.via.as_ref().map(|via| (&header::VIA, via)))
    }

    /// Puts the fields into `headers`, for a client that sends the map itself.
    pub fn insert_into(self, headers: &mut HeaderMap) {
        for (name, value) in PENDING_NAMES.iter().zip(self.fields) {
            if let Some(value) = value {
                headers.insert(*name, value);
            }
        }
        if let Some(via) = self.via {
            headers.append(header::VIA, via);
        }
    }
}

/// Rewrites a response's headers before it goes back to the client. `stripped`: the map has
/// no hop-by-hop fields already (the direct client leaves them out as it parses).
pub fn prepare_response(
    headers: &mut HeaderMap,
    version: Version,
    forwarding: &Forwarding,
    upgrade: bool,
    stripped: bool,
) {
    if !stripped {
        strip_hop_by_hop(headers, upgrade);
    }
    for name in &forwarding.remove_response_headers {
        headers.remove(name);
    }
    if forwarding.add_via {
        headers.append(header::VIA, via_value(version));
    }
}

/// Methods whose requests have no body unless one is framed explicitly.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Our `Via` hop for a message received as `version`.
fn via_value(version: Version) -> HeaderValue {
    HeaderValue::from_static(match version {
        Version::HTTP_10 => "1.0 breakwater",
        Version::HTTP_2 => "2 breakwater",
        Version::HTTP_3 => "3 breakwater",
        _ => "1.1 breakwater",
    })
}

/// Sets `name` to `value` without copying it (or removes the header if the value is invalid).
fn set(headers: &mut HeaderMap, name: &HeaderName, value: String) {
    match owned_value(value) {
        Some(v) => {
            headers.insert(name, v);
        }
        None => {
            headers.remove(name);
        }
    }
}

/// `value` as a header value without copying it (`None` if it is not a valid one).
fn owned_value(value: String) -> Option<HeaderValue> {
    // Through a boxed slice: `Bytes` takes a `Vec` with spare capacity only by allocating a
    // shared header for it, while trimming the spare capacity of a nearly full allocation is
    // free in the allocator.
    HeaderValue::from_maybe_shared(bytes::Bytes::from(value.into_bytes().into_boxed_slice())).ok()
}

/// Appends a `Forwarded` parameter value, quoted when it is not a plain token (RFC 7239 §4).
fn push_forwarded_value(out: &mut String, value: &str) {
    // A `match` rather than a search of the symbol list for every byte (hosts are mostly
    // dots and colons).
    let is_token = !value.is_empty()
        && value.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        });
    if is_token {
        out.push_str(value);
        return;
    }
    out.push('"');
    for c in value.chars() {
        if c == '\\' || c == '"' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// IPv4-mapped IPv6 peers (dual-stack sockets) are reported as the IPv4 address they are.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::IpNet;

    fn forwarding(trusted: &[&str]) -> Forwarding {
        Forwarding {
            trusted_proxies: trusted
                .iter()
                .map(|t| t.parse::<IpNet>().unwrap())
                .collect(),
            ..Forwarding::default()
        }
    }

    fn client<'a>(peer: &'a PeerHeaders, fwd: &'a Forwarding) -> ClientSide<'a> {
        ClientSide {
            peer,
            tls: false,
            forwarding: fwd,
        }
    }

    fn peer(addr: &str) -> PeerHeaders {
        PeerHeaders::new(addr.parse().unwrap(), 8080)
    }

    #[test]
    fn content_length_values_are_plain_decimals() {
        assert_eq!(parse_content_length(b"0"), Some(0));
        assert_eq!(parse_content_length(b" 42 "), Some(42));
        assert_eq!(parse_content_length(b"+1"), None);
        assert_eq!(parse_content_length(b"1,1"), None);
        assert_eq!(parse_content_length(b""), None);
        assert_eq!(parse_content_length(b"99999999999999999999"), None);
    }

    #[test]
    fn families_not_added_pass_through_on_both_client_paths() {
        let fwd = Forwarding {
            add_x_forwarded: false,
            add_via: false,
            ..forwarding(&[])
        };
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        h.insert("forwarded", HeaderValue::from_static("for=6.6.6.6"));
        let pending = prepare_request(
            &mut h,
            Version::HTTP_11,
            None,
            &client(&peer("192.0.2.7:5555"), &fwd),
            false,
        );
        // The direct client writes what `iter` yields after the map: only `Forwarded`.
        let names: Vec<_> = pending.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["forwarded"]);
        pending.insert_into(&mut h);
        assert_eq!(
            h["x-forwarded-for"], "6.6.6.6",
            "kept as the client sent it"
        );
        assert_eq!(h["forwarded"], "for=192.0.2.7;proto=http", "replaced");
        assert!(!h.contains_key("via") && !h.contains_key("x-forwarded-proto"));

        let mut response = HeaderMap::new();
        prepare_response(&mut response, Version::HTTP_11, &fwd, false, true);
        assert!(response.is_empty(), "no Via on the response: {response:?}");
    }

    #[test]
    fn untrusted_peer_replaces_spoofed_forwarding_headers() {
        let fwd = forwarding(&[]);
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        h.insert("forwarded", HeaderValue::from_static("for=6.6.6.6"));
        let authority: Authority = "shop.example:8080".parse().unwrap();
        prepare_request(
            &mut h,
            Version::HTTP_11,
            Some(&authority),
            &client(&peer("192.0.2.7:5555"), &fwd),
            false,
        )
        .insert_into(&mut h);
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "shop.example:8080");
        assert_eq!(h["x-forwarded-port"], "8080");
        assert_eq!(
            h["forwarded"],
            "for=192.0.2.7;host=\"shop.example:8080\";proto=http"
        );
        assert_eq!(h["via"], "1.1 breakwater");
    }

    #[test]
    fn pending_fields_write_out_what_they_insert_and_replace_spoofed_ones() {
        let fwd = forwarding(&[]);
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-port", HeaderValue::from_static("1"));
        h.insert("via", HeaderValue::from_static("1.0 upstream-proxy"));
        let authority: Authority = "shop.example".parse().unwrap();
        h.insert(header::HOST, HeaderValue::from_static("shop.example"));
        let pending = prepare_request(
            &mut h,
            Version::HTTP_11,
            Some(&authority),
            &client(&peer("192.0.2.7:5555"), &fwd),
            false,
        );
        // Set aside: the spoofed field is gone from the map and ours are not in it yet.
        assert!(!h.contains_key("x-forwarded-port"));
        assert!(!h.contains_key("x-forwarded-for"));
        let written: Vec<(String, String)> = pending
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        let mut inserted = h.clone();
        pending.insert_into(&mut inserted);
        for (name, value) in &written {
            assert!(
                inserted.get_all(name).iter().any(|v| v == value.as_str()),
                "{name}: {value} written but not inserted"
            );
        }
        assert_eq!(
            written.last().unwrap(),
            &("via".to_owned(), "1.1 breakwater".to_owned())
        );
        assert_eq!(written.len(), 6, "{written:?}");
        assert_eq!(
            inserted.get_all("via").iter().collect::<Vec<_>>(),
            ["1.0 upstream-proxy", "1.1 breakwater"],
            "our hop is appended after the client's"
        );
        assert_eq!(inserted["x-forwarded-port"], "8080");
        assert_eq!(
            inserted.len(),
            written.len() + 2,
            "host and the client's via besides"
        );
    }

    #[test]
    fn trusted_peer_chain_is_extended() {
        let fwd = forwarding(&["10.0.0.0/8"]);
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        h.insert("forwarded", HeaderValue::from_static("for=203.0.113.9"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        prepare_request(
            &mut h,
            Version::HTTP_2,
            None,
            &client(&peer("10.1.2.3:4000"), &fwd),
            false,
        )
        .insert_into(&mut h);
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["forwarded"], "for=203.0.113.9, for=10.1.2.3;proto=http");
        assert_eq!(h["via"], "2 breakwater");
    }

    #[test]
    fn ipv6_peers_are_quoted_in_forwarded() {
        let fwd = forwarding(&[]);
        let mut h = HeaderMap::new();
        prepare_request(
            &mut h,
            Version::HTTP_11,
            None,
            &client(&peer("[2001:db8::1]:443"), &fwd),
            false,
        )
        .insert_into(&mut h);
        assert_eq!(h["forwarded"], "for=\"[2001:db8::1]\";proto=http");
        assert_eq!(h["x-forwarded-for"], "2001:db8::1");
    }

    #[test]
    fn connection_listed_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("close, x-secret, Keep-Alive"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("gzip"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "only x-kept should survive: {h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn te_trailers_and_upgrade_survive_when_wanted() {
        let mut h = HeaderMap::new();
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn te_goes_unless_every_value_is_trailers_and_plain_options_name_nothing() {
        let mut h = HeaderMap::new();
        h.append("te", HeaderValue::from_static("trailers"));
        h.append("te", HeaderValue::from_static("gzip"));
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, , close"),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key("te"), "{h:?}");
        assert!(!h.contains_key("connection"), "{h:?}");
        assert_eq!(h.len(), 1, "{h:?}");

        let mut h = HeaderMap::new();
        h.append("te", HeaderValue::from_static("Trailers"));
        h.append("te", HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.get_all("te").iter().count(), 2);
    }

    #[test]
    fn a_connections_host_is_parsed_once_and_its_rules_still_hold() {
        let peer = peer("192.0.2.7:5555");
        let with_hosts = |hosts: &[&str]| {
            let mut builder = Request::builder().uri("/");
            for host in hosts {
                builder = builder.header("host", *host);
            }
            builder.body(()).unwrap()
        };
        let first = request_authority_for(&with_hosts(&["Shop.example:8080"]), &peer).unwrap();
        assert_eq!(first.as_ref().unwrap().get().as_str(), "Shop.example:8080");
        assert!(
            matches!(first, Some(RequestAuthority::Connection(_))),
            "kept with the connection"
        );
        let again = request_authority_for(&with_hosts(&["Shop.example:8080"]), &peer).unwrap();
        assert!(
            matches!(again, Some(RequestAuthority::Connection(a)) if a.as_str() == "Shop.example:8080"),
            "borrowed again"
        );
        // Another host later on the same connection is checked and answered on its own.
        let other = request_authority_for(&with_hosts(&["other.example"]), &peer).unwrap();
        assert!(
            matches!(&other, Some(RequestAuthority::Own(a)) if a.as_str() == "other.example"),
            "{other:?}"
        );
        // The cache never vouches for anything but the very same single value.
        assert!(matches!(
            request_authority_for(&with_hosts(&["Shop.example:8080", "x"]), &peer),
            Err(ProxyError::BadRequest("duplicate Host header"))
        ));
        assert!(matches!(
            request_authority_for(&with_hosts(&["user@shop.example"]), &peer),
            Err(ProxyError::BadRequest("invalid Host header"))
        ));
        let absolute = Request::builder()
            .uri("http://real.example/x")
            .header("host", "Shop.example:8080")
            .body(())
            .unwrap();
        assert_eq!(
            request_authority_for(&absolute, &peer)
                .unwrap()
                .unwrap()
                .get()
                .as_str(),
            "real.example",
            "an absolute-form target still wins"
        );
        // The connection's own authority, named by the request's `Host`: left as sent; if a
        // policy removes `Host`, the authority is set again.
        let bare = Forwarding {
            add_x_forwarded: false,
            add_forwarded: false,
            add_via: false,
            ..Forwarding::default()
        };
        let removing_host = Forwarding {
            remove_request_headers: vec![header::HOST],
            ..bare.clone()
        };
        for (fwd, sent) in [
            (&bare, "Shop.example:8080"),
            (&removing_host, "Shop.example:8080"),
        ] {
            let req = with_hosts(&[sent]);
            let found = request_authority_for(&req, &peer).unwrap().unwrap();
            let authority = found.get();
            assert!(matches!(found, RequestAuthority::Connection(_)));
            let mut h = req.headers().clone();
            prepare_request(
                &mut h,
                Version::HTTP_11,
                Some(authority),
                &client(&peer, fwd),
                false,
            )
            .insert_into(&mut h);
            assert_eq!(h.get_all(header::HOST).iter().count(), 1);
            assert_eq!(h[header::HOST], sent);
        }
        // `Forwarded` is kept per authority as sent, case included.
        let fwd = forwarding(&[]);
        let forwarded_for = |host: &str| {
            let authority: Authority = host.parse().unwrap();
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_str(host).unwrap());
            request_authority_for(&with_hosts(&[host]), &peer).unwrap();
            prepare_request(
                &mut h,
                Version::HTTP_11,
                Some(&authority),
                &client(&peer, &fwd),
                false,
            )
            .insert_into(&mut h);
            h["forwarded"].to_str().unwrap().to_owned()
        };
        assert_eq!(
            forwarded_for("a.example"),
            "for=192.0.2.7;host=a.example;proto=http"
        );
        assert_eq!(
            forwarded_for("a.example"),
            "for=192.0.2.7;host=a.example;proto=http"
        );
        assert_eq!(
            forwarded_for("A.example"),
            "for=192.0.2.7;host=A.example;proto=http"
        );
    }

    #[test]
    fn host_rules() {
        let req = Request::builder()
            .uri("/")
            .header("host", "a")
            .header("host", "b")
            .body(())
            .unwrap();
        assert!(matches!(
            request_authority(&req),
            Err(ProxyError::BadRequest("duplicate Host header"))
        ));
        let req = Request::builder().uri("/").body(()).unwrap();
        assert!(matches!(
            request_authority(&req),
            Err(ProxyError::BadRequest("missing Host header"))
        ));
        let req = Request::builder()
            .uri("/")
            .version(Version::HTTP_10)
            .body(())
            .unwrap();
        assert!(matches!(request_authority(&req), Ok(None)));
        let req = Request::builder()
            .uri("http://real.example/x")
            .header("host", "other.example")
            .body(())
            .unwrap();
        assert_eq!(
            request_authority(&req).unwrap().unwrap().as_str(),
            "real.example"
        );
        let req = Request::builder()
            .uri("/")
            .header("host", "bad host")
            .body(())
            .unwrap();
        assert!(request_authority(&req).is_err());
        for (host, ok) in [
            ("example.com", true),
            ("example.com:8080", true),
            ("[2001:db8::1]:443", true),
            ("user@example.com", false),
            (":8080", false),
        ] {
            let req = Request::builder()
                .uri("/")
                .header("host", host)
                .body(())
                .unwrap();
            assert_eq!(request_authority(&req).is_ok(), ok, "{host}");
        }
    }

    #[test]
    fn forwarded_values_are_quoted_unless_tokens() {
        for (value, expected) in [
            ("example.com", "example.com"),
            ("a!#$%&'*+-.^_`|~z", "a!#$%&'*+-.^_`|~z"),
            ("example.com:8080", "\"example.com:8080\""),
            ("[2001:db8::1]", "\"[2001:db8::1]\""),
            ("a\"b", "\"a\\\"b\""),
        ] {
            let mut out = String::new();
            push_forwarded_value(&mut out, value);
            assert_eq!(out, expected, "{value}");
        }
    }

    #[test]
    fn hop_by_hop_index_finds_every_listed_name_and_nothing_else() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name), Some(i), "{name}");
        }
        for other in ["content-type", "x-keep-alive", "connections", "tee", "host"] {
            let name = HeaderName::from_static(other);
            assert_eq!(hop_by_hop_index(&name), None, "{other}");
            assert_eq!(hop_by_hop_index_raw(other.as_bytes()), None, "{other}");
        }
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            let upper = name.as_str().to_ascii_uppercase();
            assert_eq!(hop_by_hop_index_raw(upper.as_bytes()), Some(i), "{upper}");
            assert_eq!(
                hop_by_hop_index_raw(name.as_str().as_bytes()),
                Some(i),
                "{name}"
            );
        }
    }
}
