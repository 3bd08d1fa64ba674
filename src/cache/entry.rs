//! What may be stored (RFC 9111 §3), stored entries with their freshness and age (§4.2), and the
//! body being collected for a new entry.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use tokio::time::Instant;

use super::directives::{self, RequestDirectives, ResponseDirectives};
use super::{Cache, PrimaryKey};

/// Bookkeeping charged to every entry on top of its body and header bytes: the key, the maps,
/// the LRU links and the `Arc`.
const ENTRY_OVERHEAD: u64 = 256;
/// Charged per header field on top of its name and value.
const HEADER_OVERHEAD: u64 = 32;

/// Why a response is not stored. [`as_str`](Self::as_str) gives a stable label for logs and
/// metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NotStorable {
    /// Only responses to `GET` are stored (`HEAD` requests are served from them).
    Method,
    /// The request said `Cache-Control: no-store`.
    RequestNoStore,
    /// The status code is not one this cache stores.
    Status,
    /// The response said `no-store`.
    NoStore,
    /// The response said `private`: not for a shared cache.
    Private,
    /// The response sets a cookie, which belongs to one client.
    SetCookie,
    /// `Vary: *` (or an unparseable `Vary`): no later request can be matched to it.
    VaryStar,
    /// The request carried `Authorization` and the response was not explicitly shareable
    /// (`public`, `s-maxage` or `must-revalidate`, RFC 9111 §3.5).
    Authorization,
    /// No `s-maxage`, `max-age` or `Expires` (this cache applies no heuristic freshness), and
    /// no `no-cache` either.
    NoExplicitFreshness,
    /// The response can never be used: it is stale on arrival or always needs revalidation, and
    /// it has no validator (`ETag` or `Last-Modified`) to revalidate with.
    Unusable,
    /// The body is (or was announced to be) larger than
    /// [`CacheConfig::max_object_bytes`](super::CacheConfig::max_object_bytes), or the entry
    /// does not fit its shard of the cache at all.
    TooLarge,
    /// The body received differs from its `Content-Length`: it was cut short.
    Incomplete,
}

/// A response that may be stored, as judged by [`storability`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Storable {
    freshness_lifetime: Duration,
    vary: Vec<HeaderName>,
}

/// When the exchange that produced a response happened, for the age calculation of RFC 9111
/// §4.2.3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// When the request was sent to the backend (`request_time`).
    pub request_time: Instant,
    /// When the response head was received (`response_time`).
    pub response_time: Instant,
    /// The wall clock at `response_time`, compared with the response's `Date`.
    pub response_date: SystemTime,
}

/// A stored response: immutable, shared through an `Arc`; [`Cache::freshen`] replaces it with
/// an updated copy.
pub struct CachedEntry {
    pub(super) key: Arc<PrimaryKey>,
    /// The normalised request values of the fields named in `Vary`, sorted by name.
    pub(super) variant: Vec<(HeaderName, Option<Box<[u8]>>)>,
    status: StatusCode,
    /// Without `Age`, which is computed on every use.
    headers: HeaderMap,
    body: Bytes,
    freshness_lifetime: Duration,
    corrected_initial_age: Duration,
    response_time: Instant,
    pub(super) no_cache: bool,
    pub(super) forbids_stale: bool,
    pub(super) shared_explicitly: bool,
    pub(super) charge: u64,
}

/// A response being stored: feed it the body with [`push`](Self::push), then call
/// [`finish`](Self::finish) once the body has ended without error (drop it otherwise).
pub struct PendingEntry {
    cache: Cache,
    key: Arc<PrimaryKey>,
    variant: Vec<(HeaderName, Option<Box<[u8]>>)>,
    status: StatusCode,
    headers: HeaderMap,
    storable: Storable,
    timing: Timing,
    body: BytesMut,
    expected_len: Option<u64>,
    max_object_bytes: u64,
    aborted: bool,
}

/// The response-side decision of RFC 9111 §3 for a shared cache: whether the response to a
/// `method` request with `request_headers` may be stored, and for how long it is fresh.
///
/// Stored are responses to `GET` with status 200, 203, 204, 300, 301, 308, 404, 405, 410, 414
/// or 501 and explicit freshness (`s-maxage`, else `max-age`, else `Expires` − `Date`) or
/// `no-cache`. Never stored: `no-store` (request or response), `private`, `Set-Cookie`,
/// `Vary: *`, responses to requests with `Authorization` unless `public`, `s-maxage` or
/// `must-revalidate`, and responses that could never be used (stale on arrival or `no-cache`,
/// without a validator). `now` is the wall clock when the response arrived; it stands in for a
/// missing `Date`. The body size is checked by [`Cache::begin`] and [`PendingEntry`].
pub fn storability(
    method: &Method,
    request_headers: &HeaderMap,
    status: StatusCode,
    response_headers: &HeaderMap,
    now: SystemTime,
) -> Result<Storable, NotStorable> {
    if method != Method::GET {
        return Err(NotStorable::Method);
    }
    if RequestDirectives::parse(request_headers).no_store {
        return Err(NotStorable::RequestNoStore);
    }
    let (storable, directives) = evaluate(status, response_headers, now)?;
    if request_headers.contains_key(header::AUTHORIZATION) && !directives.shared_explicitly() {
        return Err(NotStorable::Authorization);
    }
    Ok(storable)
}

/// The checks that depend on the response alone; shared by [`storability`] and freshening.
fn evaluate(
    status: StatusCode,
    headers: &HeaderMap,
    now: SystemTime,
) -> Result<(Storable, ResponseDirectives), NotStorable> {
    if !matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    ) {
        return Err(NotStorable::Status);
    }
    let directives = ResponseDirectives::parse(headers);
    if directives.no_store {
        return Err(NotStorable::NoStore);
    }
    if directives.private {
        return Err(NotStorable::Private);
    }
    if headers.contains_key(header::SET_COOKIE) {
        return Err(NotStorable::SetCookie);
    }
    let vary = directives::vary_names(headers).ok_or(NotStorable::VaryStar)?;
    let freshness_lifetime = match (directives.s_maxage, directives.max_age) {
        (Some(lifetime), _) | (None, Some(lifetime)) => lifetime,
        (None, None) if headers.contains_key(header::EXPIRES) => {
            // An invalid `Expires` (such as "0") means already expired (RFC 9111 §5.3).
            let expires = directives::http_date(headers, &header::EXPIRES);
            let date = directives::http_date(headers, &header::DATE).unwrap_or(now);
            expires
                .and_then(|expires| expires.duration_since(date).ok())
                .unwrap_or(Duration::ZERO)
        }
        (None, None) if directives.no_cache => Duration::ZERO,
        (None, None) => return Err(NotStorable::NoExplicitFreshness),
    };
    let has_validator =
        headers.contains_key(header::ETAG) || headers.contains_key(header::LAST_MODIFIED);
    if (freshness_lifetime.is_zero() || directives.no_cache) && !has_validator {
        return Err(NotStorable::Unusable);
    }
    Ok((
        Storable {
            freshness_lifetime,
            vary,
        },
        directives,
    ))
}

impl NotStorable {
    /// A short stable label, e.g. `"no-store"`.
    pub fn as_str(self) -> &'static str {
        match self {
            NotStorable::Method => "method",
            NotStorable::RequestNoStore => "request-no-store",
            NotStorable::Status => "status",
            NotStorable::NoStore => "no-store",
            NotStorable::Private => "private",
            NotStorable::SetCookie => "set-cookie",
            NotStorable::VaryStar => "vary-star",
            NotStorable::Authorization => "authorization",
            NotStorable::NoExplicitFreshness => "no-explicit-freshness",
            NotStorable::Unusable => "unusable",
            NotStorable::TooLarge => "too-large",
            NotStorable::Incomplete => "incomplete",
        }
    }
}

impl fmt::Display for NotStorable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Storable {
    /// How long the response is fresh from its generation (RFC 9111 §4.2.1).
    pub fn freshness_lifetime(&self) -> Duration {
        self.freshness_lifetime
    }

    /// The request header names the response varies on, lowercased and sorted.
    pub fn vary(&self) -> &[HeaderName] {
        &self.vary
    }
}

impl Timing {
    /// A response that arrives now for a request sent at `request_time`.
    pub fn received_now(request_time: Instant) -> Self {
        Self {
            request_time,
            response_time: Instant::now(),
            response_date: SystemTime::now(),
        }
    }
}

impl CachedEntry {
    /// Builds an entry; `headers` may still carry `Age`, which is folded into the initial age.
    pub(super) fn new(
        key: Arc<PrimaryKey>,
        variant: Vec<(HeaderName, Option<Box<[u8]>>)>,
        status: StatusCode,
        mut headers: HeaderMap,
        body: Bytes,
        freshness_lifetime: Duration,
        timing: Timing,
    ) -> Self {
        // RFC 9111 §4.2.3.
        let date = directives::http_date(&headers, &header::DATE).unwrap_or(timing.response_date);
        let apparent_age = timing
            .response_date
            .duration_since(date)
            .unwrap_or(Duration::ZERO);
        let response_delay = timing
            .response_time
            .saturating_duration_since(timing.request_time);
        let corrected_age_value = directives::age_value(&headers) + response_delay;
        let corrected_initial_age = apparent_age.max(corrected_age_value);
        headers.remove(header::AGE);
        let response = ResponseDirectives::parse(&headers);
        let header_bytes: u64 = headers
            .iter()
            .map(|(name, value)| (name.as_str().len() + value.len()) as u64 + HEADER_OVERHEAD)
            .sum();
        let key_bytes = (key.authority.len() + key.path_and_query.len()) as u64;
        let variant_bytes: u64 = variant
            .iter()
            .map(|(name, value)| {
                (name.as_str().len() + value.as_ref().map_or(0, |v| v.len())) as u64
            })
            .sum();
        let charge = body.len() as u64 + header_bytes + key_bytes + variant_bytes + ENTRY_OVERHEAD;
        Self {
            key,
            variant,
            status,
            headers,
            body,
            freshness_lifetime,
            corrected_initial_age,
            response_time: timing.response_time,
            no_cache: response.no_cache,
            forbids_stale: response.forbids_stale(),
            shared_explicitly: response.shared_explicitly(),
            charge,
        }
    }

    /// The stored status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stored header fields, without `Age`.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The stored body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The freshness lifetime (RFC 9111 §4.2.1).
    pub fn freshness_lifetime(&self) -> Duration {
        self.freshness_lifetime
    }

    /// The current age at `now` (RFC 9111 §4.2.3): the corrected initial age plus the time
    /// the entry has been resident.
    pub fn age(&self, now: Instant) -> Duration {
        self.corrected_initial_age + now.saturating_duration_since(self.response_time)
    }

    /// Whether the entry is fresh at `now` (its age is below its freshness lifetime).
    pub fn is_fresh(&self, now: Instant) -> bool {
        self.age(now) < self.freshness_lifetime
    }

    /// Whether the entry matches the request's values of the fields it varies on.
    pub(super) fn matches(&self, request_headers: &HeaderMap) -> bool {
        self.variant
            .iter()
            .all(|(name, value)| directives::normalized_value(request_headers, name) == *value)
    }

    /// The header fields for a conditional request that revalidates this entry (RFC 9111
    /// §4.3.1): `If-None-Match` from `ETag`, `If-Modified-Since` from `Last-Modified`.
    pub(super) fn validators(&self) -> HeaderMap {
        let mut conditional = HeaderMap::new();
        if let Some(etag) = self.headers.get(header::ETAG) {
            conditional.insert(header::IF_NONE_MATCH, etag.clone());
        }
        if let Some(modified) = self.headers.get(header::LAST_MODIFIED) {
            conditional.insert(header::IF_MODIFIED_SINCE, modified.clone());
        }
        conditional
    }

    /// The response to send for this entry at `now`, with `Age` set.
    pub(super) fn respond(&self, now: Instant) -> super::CachedResponse {
        let age = self.age(now);
        let mut headers = self.headers.clone();
        headers.insert(header::AGE, HeaderValue::from(age.as_secs()));
        super::CachedResponse {
            status: self.status,
            headers,
            body: self.body.clone(),
            age,
        }
    }

    /// This entry updated by the header fields of a `304 Not Modified` (RFC 9111 §4.3.4), or
    /// `None` if the 304 is for a different representation (its `ETag` differs).
    /// The second value says whether the result may still be stored.
    pub(super) fn freshened(
        &self,
        not_modified: &HeaderMap,
        timing: Timing,
    ) -> Option<(CachedEntry, bool)> {
        if let (Some(new), Some(old)) = (
            not_modified.get(header::ETAG),
            self.headers.get(header::ETAG),
        ) {
            if !directives::etags_match_weakly(new.as_bytes(), old.as_bytes()) {
                return None;
            }
        }
        let mut headers = self.headers.clone();
        for name in not_modified.keys() {
            // The stored body stays, so its length does; a cookie is never stored.
            if name == header::CONTENT_LENGTH || name == header::SET_COOKIE {
                continue;
            }
            headers.remove(name);
            for value in not_modified.get_all(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        let (lifetime, storable) = match evaluate(self.status, &headers, timing.response_date) {
            Ok((storable, _)) => (storable.freshness_lifetime, true),
            Err(_) => (Duration::ZERO, false),
        };
        let entry = CachedEntry::new(
            self.key.clone(),
            self.variant.clone(),
            self.status,
            headers,
            self.body.clone(),
            lifetime,
            timing,
        );
        Some((entry, storable))
    }
}

impl fmt::Debug for CachedEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedEntry")
            .field("authority", &self.key.authority)
            .field("path_and_query", &self.key.path_and_query)
            .field("status", &self.status)
            .field("body_len", &self.body.len())
            .field("freshness_lifetime", &self.freshness_lifetime)
            .field("corrected_initial_age", &self.corrected_initial_age)
            .finish_non_exhaustive()
    }
}

impl PendingEntry {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        cache: Cache,
        key: Arc<PrimaryKey>,
        variant: Vec<(HeaderName, Option<Box<[u8]>>)>,
        status: StatusCode,
        headers: HeaderMap,
        storable: Storable,
        timing: Timing,
        expected_len: Option<u64>,
        max_object_bytes: u64,
    ) -> Self {
        // Reserve what was announced, but never more than the cap.
        let reserve = expected_len.unwrap_or(0).min(max_object_bytes);
        Self {
            cache,
            key,
            variant,
            status,
            headers,
            storable,
            timing,
            body: BytesMut::with_capacity(usize::try_from(reserve).unwrap_or(0)),
            expected_len,
            max_object_bytes,
            aborted: false,
        }
    }

    /// Appends a body chunk. Returns `false` once the body has grown past the object cap: the
    /// buffered bytes are released and the entry will not be stored, so the caller can stop
    /// feeding it (and keep streaming the body to the client).
    pub fn push(&mut self, chunk: &Bytes) -> bool {
        if self.aborted {
            return false;
        }
        if (self.body.len() + chunk.len()) as u64 > self.max_object_bytes {
            self.aborted = true;
            self.body = BytesMut::new();
            return false;
        }
        self.body.extend_from_slice(chunk);
        true
    }

    /// Whether [`push`](Self::push) has given up on this entry.
    pub fn is_aborted(&self) -> bool {
        self.aborted
    }

    /// Stores the entry (replacing the stored variant it matches) and returns it, for
    /// [`LeaderGuard::stored`](super::LeaderGuard::stored). Call only once the body ended
    /// cleanly. Fails with [`NotStorable::TooLarge`] if the body passed the cap or the entry
    /// cannot fit, and [`NotStorable::Incomplete`] if it is shorter or longer than its
    /// `Content-Length`.
    pub fn finish(self) -> Result<Arc<CachedEntry>, NotStorable> {
        if self.aborted {
            return Err(NotStorable::TooLarge);
        }
        if self
            .expected_len
            .is_some_and(|len| len != self.body.len() as u64)
        {
            return Err(NotStorable::Incomplete);
        }
        let entry = Arc::new(CachedEntry::new(
            self.key,
            self.variant,
            self.status,
            self.headers,
            self.body.freeze(),
            self.storable.freshness_lifetime,
            self.timing,
        ));
        if self.cache.insert(entry.clone()) {
            Ok(entry)
        } else {
            Err(NotStorable::TooLarge)
        }
    }
}

impl fmt::Debug for PendingEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingEntry")
            .field("authority", &self.key.authority)
            .field("path_and_query", &self.key.path_and_query)
            .field("status", &self.status)
            .field("buffered", &self.body.len())
            .field("aborted", &self.aborted)
            .finish_non_exhaustive()
    }
}
