//! HTTP response cache: an RFC 9111 shared-cache subset. Pure logic and storage, no I/O.
//!
//! # How the request path uses it
//!
//! 1. [`lookup_key`] gives a [`CacheKey`] for `GET` and `HEAD` requests (`None`: not cacheable;
//!    for an unsafe method, call [`Cache::invalidate`] once the backend answered with
//!    [`invalidates`]` == true`).
//! 2. [`Cache::lookup`] answers [`Lookup::Hit`] (serve it), [`Lookup::Revalidate`] (send the
//!    request with the given conditional fields; on `304` call [`Cache::freshen`]),
//!    [`Lookup::Stale`] (forward; serve the stale copy only if the backend fails),
//!    [`Lookup::Miss`] or [`Lookup::Bypass`] (forward).
//! 3. On a miss, [`Cache::join_or_lead`] coalesces concurrent requests: the leader fetches,
//!    followers await its [`LeaderResult`] and check a stored entry with
//!    [`Cache::respond_from`] (it may be another `Vary` variant).
//! 4. With the response head, [`Cache::begin`] decides storability ([`storability`]) and returns
//!    a [`PendingEntry`]; the caller tees body chunks into [`PendingEntry::push`] while
//!    streaming them to the client and calls [`PendingEntry::finish`] at a clean end.
//!
//! Header fields are expected with hop-by-hop fields already removed.
//!
//! # Semantics
//!
//! - Keys: `GET` and `HEAD` share stored entries (only `GET` responses are stored; a `HEAD`
//!   request is answered from them), keyed by lowercased authority and path-and-query. The
//!   scheme is not part of the key: one listener serves one origin. Coalescing keeps `GET` and
//!   `HEAD` apart, since a `HEAD` response has no body to share.
//! - Freshness is explicit only (`s-maxage`, else `max-age`, else `Expires` − `Date`); ages
//!   follow RFC 9111 §4.2.3 and every served response carries `Age`.
//! - `Vary`: variants are keyed by the normalised request values of the named fields; at most
//!   16 variants per URL are kept.
//! - Stale responses are offered only within [`CacheConfig::stale_if_error`] after expiry, and
//!   never for `must-revalidate`, `proxy-revalidate`, `s-maxage` or `no-cache` responses.
//!
//! # Storage
//!
//! Entries are spread over up to 64 shards by a randomly keyed hash of their URL; each shard is a
//! `Mutex` around a map and an LRU list with a fixed share of `max_entries` and `max_bytes`, so
//! the bounds are exact and no lock is global. Each entry is charged its body, header and key
//! bytes plus a fixed overhead. Shards are sized to hold at least two of the largest objects.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Method, StatusCode};
use tokio::time::Instant;

mod coalesce;
mod directives;
mod entry;
mod store;

pub use coalesce::{Coalesce, Follower, LeaderGuard, LeaderResult};
pub use entry::{CachedEntry, NotStorable, PendingEntry, Storable, Timing, storability};

use directives::RequestDirectives;
use store::Store;

/// The cache's bounds and options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    /// The most entries (variants count separately) kept at once; at least 1.
    pub max_entries: u64,
    /// The most bytes (bodies, headers and bookkeeping) kept at once; at least 1.
    pub max_bytes: u64,
    /// Larger bodies are not stored; at least 1 and at most `max_bytes`.
    pub max_object_bytes: u64,
    /// How long after expiry a stored response may still be served if the backend fails
    /// (RFC 5861 `stale-if-error`, set for all responses); zero turns it off.
    pub stale_if_error: Duration,
}

/// Why a [`CacheConfig`] was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    /// `max_entries`, `max_bytes` or `max_object_bytes` is zero.
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    /// No object of `max_object_bytes` could ever be stored.
    #[error("max_object_bytes {max_object_bytes} exceeds max_bytes {max_bytes}")]
    ObjectLargerThanCache {
        /// The configured object cap.
        max_object_bytes: u64,
        /// The configured total.
        max_bytes: u64,
    },
}

/// What a request is looked up (and coalesced) by; see [`lookup_key`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey {
    head: bool,
    primary: Arc<PrimaryKey>,
}

/// The URL part of a key: what stored entries are filed under and invalidated by.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PrimaryKey {
    authority: Box<str>,
    path_and_query: Box<str>,
}

/// The response cache; see the [module documentation](self). Cloning is cheap and clones share
/// the same storage; `Send + Sync`.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    config: CacheConfig,
    store: Store,
    inflight: Arc<coalesce::Inflight>,
    hits: AtomicU64,
    misses: AtomicU64,
    revalidations: AtomicU64,
    stores: AtomicU64,
}

/// The outcome of [`Cache::lookup`].
#[derive(Debug)]
pub enum Lookup {
    /// A fresh stored response: serve it (for `HEAD`, without the body).
    Hit(CachedResponse),
    /// A stored response that must be validated first: forward the request with
    /// [`Revalidation::conditional`] added, then call [`Cache::freshen`] on a `304`.
    Revalidate(Revalidation),
    /// An expired response within the `stale_if_error` window, without validators: forward the
    /// request, and serve this only if the backend fails (error or 5xx).
    Stale(CachedResponse),
    /// Nothing usable stored: forward (coalesced through [`Cache::join_or_lead`]).
    Miss,
    /// The request said `no-store`: forward, and do not store.
    Bypass,
}

/// A stored response to validate before use.
#[derive(Debug)]
pub struct Revalidation {
    /// The stored entry, for [`Cache::freshen`].
    pub entry: Arc<CachedEntry>,
    /// `If-None-Match` and/or `If-Modified-Since` to add to the forwarded request; never
    /// empty.
    pub conditional: HeaderMap,
    /// The stale response to serve if the backend fails, when the entry has expired within
    /// the `stale_if_error` window.
    pub stale: Option<CachedResponse>,
}

/// A response served from the cache.
#[derive(Clone, Debug)]
pub struct CachedResponse {
    /// The stored status.
    pub status: StatusCode,
    /// The stored header fields plus `Age`.
    pub headers: HeaderMap,
    /// The whole stored body (also for `HEAD`: the caller sends none).
    pub body: Bytes,
    /// The current age, also in the `Age` field (in whole seconds).
    pub age: Duration,
}

/// Why [`Cache::freshen`] could not use a `304`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FreshenError {
    /// The 304's `ETag` is not the stored one's: it validates another representation. Repeat
    /// the request without conditional fields.
    #[error("the 304 response validates a different representation")]
    ValidatorMismatch,
}

/// A snapshot of the cache's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups answered with [`Lookup::Hit`].
    pub hits: u64,
    /// Lookups answered with [`Lookup::Miss`] or [`Lookup::Stale`] (the backend is asked).
    pub misses: u64,
    /// Lookups answered with [`Lookup::Revalidate`].
    pub revalidations: u64,
    /// Entries stored, freshened entries included.
    pub stores: u64,
    /// Entries evicted to make room (not replaced, expired or invalidated ones).
    pub evictions: u64,
    /// Entries held now.
    pub entries: u64,
    /// Bytes charged for the entries held now.
    pub bytes: u64,
}

/// The key for a request, or `None` if its method is not cacheable (only `GET` and `HEAD`
/// are). `authority` is lowercased; an empty `path_and_query` means `/`.
pub fn lookup_key(method: &Method, authority: &str, path_and_query: &str) -> Option<CacheKey> {
    let head = match *method {
        Method::GET => false,
        Method::HEAD => true,
        _ => return None,
    };
    Some(CacheKey {
        head,
        primary: Arc::new(PrimaryKey::new(authority, path_and_query)),
    })
}

/// Whether a `method` request answered with `status` invalidates the stored responses for its
/// URL (RFC 9111 §4.4): an unsafe method and a non-error status.
pub fn invalidates(method: &Method, status: StatusCode) -> bool {
    !method.is_safe() && (status.is_success() || status.is_redirection())
}

impl CacheConfig {
    /// The policy defaults: 10,000 entries, 64 MiB, 1 MiB per object, no stale serving.
    pub fn new() -> Self {
        Self {
            max_entries: 10_000,
            max_bytes: 64 << 20,
            max_object_bytes: 1 << 20,
            stale_if_error: Duration::ZERO,
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl CacheKey {
    /// Whether this is a `HEAD` request's key.
    pub fn is_head(&self) -> bool {
        self.head
    }

    /// The lowercased authority.
    pub fn authority(&self) -> &str {
        &self.primary.authority
    }

    /// The path and query.
    pub fn path_and_query(&self) -> &str {
        &self.primary.path_and_query
    }
}

impl PrimaryKey {
    fn new(authority: &str, path_and_query: &str) -> Self {
        let path_and_query = if path_and_query.is_empty() {
            "/"
        } else {
            path_and_query
        };
        Self {
            authority: authority.to_ascii_lowercase().into(),
            path_and_query: path_and_query.into(),
        }
    }
}

impl Cache {
    /// An empty cache with `config`'s bounds.
    pub fn try_new(config: CacheConfig) -> Result<Self, CacheError> {
        for (value, name) in [
            (config.max_entries, "max_entries"),
            (config.max_bytes, "max_bytes"),
            (config.max_object_bytes, "max_object_bytes"),
        ] {
            if value == 0 {
                return Err(CacheError::Zero(name));
            }
        }
        if config.max_object_bytes > config.max_bytes {
            return Err(CacheError::ObjectLargerThanCache {
                max_object_bytes: config.max_object_bytes,
                max_bytes: config.max_bytes,
            });
        }
        Ok(Self {
            inner: Arc::new(Inner {
                store: Store::new(
                    config.max_entries,
                    config.max_bytes,
                    config.max_object_bytes,
                ),
                config,
                inflight: Arc::new(coalesce::Inflight::new()),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                revalidations: AtomicU64::new(0),
                stores: AtomicU64::new(0),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &CacheConfig {
        &self.inner.config
    }

    /// What the cache can do for a request with `key` and `request_headers` at `now`: the
    /// stored variant matching the request, judged by [`respond_from`](Self::respond_from).
    /// Request `no-store` bypasses the cache.
    pub fn lookup(&self, key: &CacheKey, request_headers: &HeaderMap, now: Instant) -> Lookup {
        if RequestDirectives::parse(request_headers).no_store {
            return Lookup::Bypass;
        }
        match self.inner.store.get(&key.primary, request_headers) {
            Some(entry) => self.respond_from(&entry, request_headers, now),
            None => self.miss(),
        }
    }

    /// What `entry` can do for a request with `request_headers` at `now` (RFC 9111 §4):
    ///
    /// - [`Lookup::Miss`] if the entry is another variant, or the request carries
    ///   `Authorization` and the entry was not explicitly shareable;
    /// - [`Lookup::Hit`] if it is fresh, not `no-cache`, and the request's `no-cache`
    ///   (or `Pragma: no-cache`), `max-age` and `min-fresh` accept it;
    /// - otherwise [`Lookup::Revalidate`] if it has a validator, [`Lookup::Stale`] if it
    ///   expired within the `stale_if_error` window, else [`Lookup::Miss`] (an expired entry
    ///   is then dropped; a fresh one is kept, the forwarded response will replace it).
    pub fn respond_from(
        &self,
        entry: &Arc<CachedEntry>,
        request_headers: &HeaderMap,
        now: Instant,
    ) -> Lookup {
        if !entry.matches(request_headers)
            || (request_headers.contains_key(header::AUTHORIZATION) && !entry.shared_explicitly)
        {
            return self.miss();
        }
        let request = RequestDirectives::parse(request_headers);
        let age = entry.age(now);
        let lifetime = entry.freshness_lifetime();
        let fresh = age < lifetime;
        let request_demands_validation = request.no_cache
            || request
                .max_age
                .is_some_and(|max| max.is_zero() || age > max)
            || request
                .min_fresh
                .is_some_and(|min| lifetime.saturating_sub(age) < min);
        if fresh && !entry.no_cache && !request_demands_validation {
            self.inner.hits.fetch_add(1, Ordering::Relaxed);
            return Lookup::Hit(entry.respond(now));
        }
        let window = self.inner.config.stale_if_error;
        let stale = (!fresh
            && !window.is_zero()
            && !entry.forbids_stale
            && !request.no_cache
            && age < lifetime.saturating_add(window))
        .then(|| entry.respond(now));
        let conditional = entry.validators();
        if !conditional.is_empty() {
            self.inner.revalidations.fetch_add(1, Ordering::Relaxed);
            return Lookup::Revalidate(Revalidation {
                entry: entry.clone(),
                conditional,
                stale,
            });
        }
        if let Some(stale) = stale {
            self.inner.misses.fetch_add(1, Ordering::Relaxed);
            return Lookup::Stale(stale);
        }
        if !fresh {
            // Expired past any use, and nothing to revalidate it with.
            self.inner.store.remove_entry(entry);
        }
        self.miss()
    }

    /// Starts storing the response to the request with `key` and `request_headers`: checks
    /// [`storability`] and the announced `Content-Length` against
    /// [`CacheConfig::max_object_bytes`]. `response_headers` may include `Age`; it is folded
    /// into the entry's age.
    pub fn begin(
        &self,
        key: &CacheKey,
        request_headers: &HeaderMap,
        status: StatusCode,
        response_headers: &HeaderMap,
        timing: Timing,
    ) -> Result<PendingEntry, NotStorable> {
        let method = if key.head { Method::HEAD } else { Method::GET };
        let storable = storability(
            &method,
            request_headers,
            status,
            response_headers,
            timing.response_date,
        )?;
        let max_object_bytes = self.inner.config.max_object_bytes;
        let announced = response_headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if announced.is_some_and(|len| len > max_object_bytes) {
            return Err(NotStorable::TooLarge);
        }
        let variant = storable
            .vary()
            .iter()
            .map(|name| {
                (
                    name.clone(),
                    directives::normalized_value(request_headers, name),
                )
            })
            .collect();
        Ok(PendingEntry::new(
            self.clone(),
            key.primary.clone(),
            variant,
            status,
            response_headers.clone(),
            storable,
            timing,
            announced,
            max_object_bytes,
        ))
    }

    /// Updates `entry` with a `304 Not Modified` received at `timing` (RFC 9111 §4.3.4): its
    /// header fields replace the stored ones (except `Content-Length`; `Set-Cookie` is not
    /// kept), freshness is recomputed, the updated entry replaces the stored one, and the
    /// response to serve is returned. If the updated headers forbid storing (`no-store`,
    /// `private`, ...), the entry is removed and the response is still returned, once.
    pub fn freshen(
        &self,
        entry: &Arc<CachedEntry>,
        response_headers: &HeaderMap,
        timing: Timing,
    ) -> Result<CachedResponse, FreshenError> {
        let (updated, storable) = entry
            .freshened(response_headers, timing)
            .ok_or(FreshenError::ValidatorMismatch)?;
        let response = updated.respond(timing.response_time);
        if storable && self.insert(Arc::new(updated)) {
            return Ok(response);
        }
        self.inner.store.remove_entry(entry);
        Ok(response)
    }

    /// Removes every stored response for the URL (all variants); how many there were. Call it
    /// when [`invalidates`] says so.
    pub fn invalidate(&self, authority: &str, path_and_query: &str) -> u64 {
        self.inner
            .store
            .remove_key(&PrimaryKey::new(authority, path_and_query))
    }

    /// Joins the fetch already under way for `key`, or becomes its leader. A new leader should
    /// look the key up once more before fetching: a previous leader may have just stored it.
    pub fn join_or_lead(&self, key: &CacheKey) -> Coalesce {
        self.inner.inflight.join_or_lead(key)
    }

    /// Keys with a fetch under way.
    pub fn inflight(&self) -> usize {
        self.inner.inflight.len()
    }

    /// The counters and current size.
    pub fn stats(&self) -> CacheStats {
        let inner = &*self.inner;
        CacheStats {
            hits: inner.hits.load(Ordering::Relaxed),
            misses: inner.misses.load(Ordering::Relaxed),
            revalidations: inner.revalidations.load(Ordering::Relaxed),
            stores: inner.stores.load(Ordering::Relaxed),
            evictions: inner.store.evictions.load(Ordering::Relaxed),
            entries: inner.store.entries.load(Ordering::Relaxed),
            bytes: inner.store.bytes.load(Ordering::Relaxed),
        }
    }

    fn insert(&self, entry: Arc<CachedEntry>) -> bool {
        let stored = self.inner.store.insert(entry);
        if stored {
            self.inner.stores.fetch_add(1, Ordering::Relaxed);
        }
        stored
    }

    fn miss(&self) -> Lookup {
        self.inner.misses.fetch_add(1, Ordering::Relaxed);
        Lookup::Miss
    }
}

impl fmt::Debug for Cache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("config", &self.inner.config)
            .field("stats", &self.stats())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use http::HeaderValue;
    use tokio::time::advance;

    use super::*;

    const BODY: &[u8] = b"hello, cache";

    type Fields<'a> = &'a [(&'a str, &'a str)];

    fn wall(offset_secs: i64) -> SystemTime {
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        if offset_secs >= 0 {
            base + Duration::from_secs(offset_secs.unsigned_abs())
        } else {
            base - Duration::from_secs(offset_secs.unsigned_abs())
        }
    }

    fn date(offset_secs: i64) -> String {
        httpdate::fmt_http_date(wall(offset_secs))
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                header::HeaderName::from_bytes(name.as_bytes()).expect("valid name"),
                HeaderValue::from_str(value).expect("valid value"),
            );
        }
        map
    }

    fn config(max_entries: u64, max_bytes: u64, max_object_bytes: u64) -> CacheConfig {
        CacheConfig {
            max_entries,
            max_bytes,
            max_object_bytes,
            stale_if_error: Duration::ZERO,
        }
    }

    fn cache() -> Cache {
        Cache::try_new(CacheConfig::default()).expect("valid config")
    }

    fn get(path: &str) -> CacheKey {
        lookup_key(&Method::GET, "Example.COM", path).expect("GET is cacheable")
    }

    /// A response that arrived now, with the wall clock at `wall(0)`, for a request sent now.
    fn arrived_now() -> Timing {
        let now = Instant::now();
        Timing {
            request_time: now,
            response_time: now,
            response_date: wall(0),
        }
    }

    fn store_with(
        cache: &Cache,
        key: &CacheKey,
        request: &HeaderMap,
        status: StatusCode,
        response: &HeaderMap,
        body: &[u8],
        timing: Timing,
    ) -> Result<Arc<CachedEntry>, NotStorable> {
        let mut pending = cache.begin(key, request, status, response, timing)?;
        for chunk in body.chunks(5) {
            if !pending.push(&Bytes::copy_from_slice(chunk)) {
                break;
            }
        }
        pending.finish()
    }

    /// Stores a 200 with `BODY` for a plain request, arriving now.
    fn store(cache: &Cache, key: &CacheKey, response: &[(&str, &str)]) -> Result<(), NotStorable> {
        store_with(
            cache,
            key,
            &HeaderMap::new(),
            StatusCode::OK,
            &headers(response),
            BODY,
            arrived_now(),
        )
        .map(drop)
    }

    fn hit(lookup: Lookup) -> CachedResponse {
        match lookup {
            Lookup::Hit(response) => response,
            other => panic!("expected a hit, got {other:?}"),
        }
    }

    fn lookup(cache: &Cache, key: &CacheKey, request: &[(&str, &str)]) -> Lookup {
        cache.lookup(key, &headers(request), Instant::now())
    }

    #[tokio::test(start_paused = true)]
    async fn max_age_hit_then_expiry() {
        let cache = cache();
        let key = get("/a?x=1");
        let d = date(0);
        store(
            &cache,
            &key,
            &[("cache-control", "max-age=60"), ("date", &d)],
        )
        .expect("storable");

        let response = hit(lookup(&cache, &key, &[]));
        assert_eq!(response.status, StatusCode::OK);
        assert_eq!(response.body, Bytes::from_static(BODY));
        assert_eq!(response.headers["age"], "0");

        advance(Duration::from_secs(59)).await;
        let response = hit(lookup(&cache, &key, &[]));
        assert_eq!(response.age, Duration::from_secs(59));
        assert_eq!(response.headers["age"], "59");

        advance(Duration::from_secs(1)).await;
        assert!(
            matches!(lookup(&cache, &key, &[]), Lookup::Miss),
            "expired at exactly max-age, and without validators it is a miss"
        );
        assert_eq!(cache.stats().entries, 0, "the useless entry is dropped");
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses, stats.stores), (2, 1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn s_maxage_beats_max_age_and_max_age_beats_expires() {
        let cache = cache();
        let key = get("/s");
        let expires = date(1000);
        store(
            &cache,
            &key,
            &[
                ("cache-control", "max-age=10, s-maxage=100"),
                ("expires", &expires),
            ],
        )
        .expect("storable");
        advance(Duration::from_secs(50)).await;
        hit(lookup(&cache, &key, &[]));
        advance(Duration::from_secs(50)).await;
        assert!(matches!(lookup(&cache, &key, &[]), Lookup::Miss));

        let storable = storability(
            &Method::GET,
            &HeaderMap::new(),
            StatusCode::OK,
            &headers(&[("cache-control", "max-age=10"), ("expires", &expires)]),
            wall(0),
        )
        .expect("storable");
        assert_eq!(
            storable.freshness_lifetime(),
            Duration::from_secs(10),
            "max-age beats Expires"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn expires_minus_date_is_the_lifetime() {
        let cache = cache();
        let key = get("/e");
        let (d, expires) = (date(-30), date(90));
        store(&cache, &key, &[("date", &d), ("expires", &expires)]).expect("storable");
        // Lifetime 120 s; generated 30 s ago by the Date, so 90 s of freshness remain.
        let response = hit(lookup(&cache, &key, &[]));
        assert_eq!(response.age, Duration::from_secs(30));
        advance(Duration::from_secs(89)).await;
        hit(lookup(&cache, &key, &[]));
        advance(Duration::from_secs(1)).await;
        assert!(matches!(lookup(&cache, &key, &[]), Lookup::Miss));

        // Without Date, the arrival time stands in for it.
        let storable = storability(
            &Method::GET,
            &HeaderMap::new(),
            StatusCode::OK,
            &headers(&[("expires", &date(45))]),
            wall(0),
        )
        .expect("storable");
        assert_eq!(storable.freshness_lifetime(), Duration::from_secs(45));

        // An invalid Expires means already expired: stored only with a validator.
        assert_eq!(
            store(&cache, &get("/e0"), &[("expires", "0")]),
            Err(NotStorable::Unusable)
        );
        store(&cache, &get("/e0"), &[("expires", "0"), ("etag", "\"v1\"")])
            .expect("stale on arrival but revalidatable");
        assert!(matches!(
            lookup(&cache, &get("/e0"), &[]),
            Lookup::Revalidate(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn age_follows_rfc_9111_section_4_2_3() {
        let cache = cache();
        let request_time = Instant::now();
        advance(Duration::from_secs(2)).await;
        let timing = Timing {
            request_time,
            response_time: Instant::now(),
            response_date: wall(0),
        };
        // Apparent age 10 (Date 10 s before arrival) beats corrected Age 5 + 2 s delay.
        let d = date(-10);
        let response = headers(&[("cache-control", "max-age=100"), ("date", &d), ("age", "5")]);
        let key = get("/age");
        store_with(
            &cache,
            &key,
            &HeaderMap::new(),
            StatusCode::OK,
            &response,
            BODY,
            timing,
        )
        .expect("storable");
        advance(Duration::from_secs(5)).await;
        let served = hit(lookup(&cache, &key, &[]));
        assert_eq!(
            served.age,
            Duration::from_secs(15),
            "10 initial + 5 resident"
        );
        assert_eq!(served.headers["age"], "15");
        assert_eq!(
            served.headers.get_all("age").iter().count(),
            1,
            "the upstream Age is replaced"
        );

        // Corrected Age 30 + 2 s delay beats apparent age 10.
        let key = get("/age2");
        let response = headers(&[
            ("cache-control", "max-age=100"),
            ("date", &d),
            ("age", "30"),
        ]);
        store_with(
            &cache,
            &key,
            &HeaderMap::new(),
            StatusCode::OK,
            &response,
            BODY,
            timing,
        )
        .expect("storable");
        // Resident since the response arrived, 5 s ago.
        assert_eq!(
            hit(lookup(&cache, &key, &[])).age,
            Duration::from_secs(37),
            "30 + 2 delay + 5 resident"
        );
    }

    #[test]
    fn private_responses_and_credentials_are_never_stored() {
        let cache = cache();
        let key = get("/p");
        let cases: [(Fields, Fields, NotStorable); 8] = [
            (
                &[],
                &[("cache-control", "no-store, max-age=60")],
                NotStorable::NoStore,
            ),
            (
                &[],
                &[("cache-control", "private, max-age=60")],
                NotStorable::Private,
            ),
            (
                &[],
                &[("cache-control", "max-age=60, private=\"x-user\"")],
                NotStorable::Private,
            ),
            (
                &[],
                &[
                    ("cache-control", "public, max-age=60"),
                    ("set-cookie", "s=1"),
                ],
                NotStorable::SetCookie,
            ),
            (
                &[("authorization", "Bearer t")],
                &[("cache-control", "max-age=60")],
                NotStorable::Authorization,
            ),
            (
                &[("cache-control", "no-store")],
                &[("cache-control", "max-age=60")],
                NotStorable::RequestNoStore,
            ),
            (
                &[],
                &[("vary", "*"), ("cache-control", "max-age=60")],
                NotStorable::VaryStar,
            ),
            (&[], &[("etag", "\"v\"")], NotStorable::NoExplicitFreshness),
        ];
        for (request, response, reason) in cases {
            let result = store_with(
                &cache,
                &key,
                &headers(request),
                StatusCode::OK,
                &headers(response),
                BODY,
                arrived_now(),
            );
            assert_eq!(
                result.err(),
                Some(reason),
                "request {request:?} response {response:?}"
            );
        }
        for status in [206, 302, 500, 503] {
            let status = StatusCode::from_u16(status).expect("valid status");
            let response = headers(&[("cache-control", "max-age=60")]);
            let result = storability(&Method::GET, &HeaderMap::new(), status, &response, wall(0));
            assert_eq!(result.err(), Some(NotStorable::Status), "{status}");
        }
        let head = lookup_key(&Method::HEAD, "example.com", "/p").expect("HEAD is cacheable");
        assert_eq!(
            store(&cache, &head, &[("cache-control", "max-age=60")]),
            Err(NotStorable::Method),
            "HEAD responses have no body to store"
        );
        assert_eq!(cache.stats().entries, 0);
    }

    #[test]
    fn authorization_is_served_only_from_explicitly_shared_responses() {
        let cache = cache();
        let auth = headers(&[("authorization", "Bearer t")]);
        for (path, cache_control) in [
            ("/public", "public, max-age=60"),
            ("/shared", "s-maxage=60"),
            ("/revalidate", "must-revalidate, max-age=60"),
        ] {
            let response = headers(&[("cache-control", cache_control)]);
            store_with(
                &cache,
                &get(path),
                &auth,
                StatusCode::OK,
                &response,
                BODY,
                arrived_now(),
            )
            .expect("explicitly shareable");
            hit(cache.lookup(&get(path), &auth, Instant::now()));
        }
        store(&cache, &get("/plain"), &[("cache-control", "max-age=60")]).expect("storable");
        hit(lookup(&cache, &get("/plain"), &[]));
        assert!(
            matches!(
                cache.lookup(&get("/plain"), &auth, Instant::now()),
                Lookup::Miss
            ),
            "a credentialed request is not served a response not marked shareable"
        );
    }

    #[test]
    fn unsafe_methods_invalidate_and_head_is_served_from_get() {
        let cache = cache();
        store(&cache, &get("/item/1"), &[("cache-control", "max-age=60")]).expect("storable");
        store(&cache, &get("/item/2"), &[("cache-control", "max-age=60")]).expect("storable");
        let head = lookup_key(&Method::HEAD, "example.com", "/item/1").expect("cacheable");
        assert!(head.is_head());
        assert_eq!(
            hit(lookup(&cache, &head, &[])).body,
            Bytes::from_static(BODY)
        );

        assert_eq!(lookup_key(&Method::POST, "example.com", "/item/1"), None);
        assert!(invalidates(&Method::POST, StatusCode::CREATED));
        assert!(invalidates(&Method::DELETE, StatusCode::NO_CONTENT));
        assert!(!invalidates(
            &Method::PUT,
            StatusCode::INTERNAL_SERVER_ERROR
        ));
        assert!(!invalidates(&Method::GET, StatusCode::OK));
        assert_eq!(cache.invalidate("EXAMPLE.com", "/item/1"), 1);
        assert!(matches!(lookup(&cache, &get("/item/1"), &[]), Lookup::Miss));
        hit(lookup(&cache, &get("/item/2"), &[]));
        assert_eq!(cache.invalidate("example.com", "/item/1"), 0);
        assert_eq!(cache.stats().entries, 1);
    }

    #[test]
    fn vary_keeps_variants_apart() {
        let cache = cache();
        let key = get("/v");
        let response = headers(&[("cache-control", "max-age=60"), ("vary", "Accept-Encoding")]);
        for (encoding, body) in [("gzip", &b"gzipped"[..]), ("br", &b"brotli"[..])] {
            let request = headers(&[("accept-encoding", encoding)]);
            store_with(
                &cache,
                &key,
                &request,
                StatusCode::OK,
                &response,
                body,
                arrived_now(),
            )
            .expect("storable");
        }
        assert_eq!(cache.stats().entries, 2, "both variants coexist");
        assert_eq!(
            hit(lookup(&cache, &key, &[("accept-encoding", "GZIP")])).body,
            Bytes::from_static(b"gzipped"),
            "normalised: case does not matter"
        );
        assert_eq!(
            hit(lookup(&cache, &key, &[("accept-encoding", "br")])).body,
            Bytes::from_static(b"brotli")
        );
        assert!(matches!(lookup(&cache, &key, &[]), Lookup::Miss));
        assert!(matches!(
            lookup(&cache, &key, &[("accept-encoding", "gzip, br")]),
            Lookup::Miss
        ));

        // The same variant again replaces the stored one.
        let request = headers(&[("accept-encoding", "gzip")]);
        store_with(
            &cache,
            &key,
            &request,
            StatusCode::OK,
            &response,
            b"gzipped v2",
            arrived_now(),
        )
        .expect("storable");
        assert_eq!(cache.stats().entries, 2);
        assert_eq!(
            hit(lookup(&cache, &key, &[("accept-encoding", "gzip")])).body,
            Bytes::from_static(b"gzipped v2")
        );
        assert_eq!(cache.invalidate("example.com", "/v"), 2, "all variants go");
    }

    #[test]
    fn variants_per_url_are_capped() {
        let cache = cache();
        let key = get("/ua");
        let response = headers(&[("cache-control", "max-age=60"), ("vary", "user-agent")]);
        for n in 0..store::MAX_VARIANTS + 4 {
            let request = headers(&[("user-agent", &format!("agent {n}"))]);
            store_with(
                &cache,
                &key,
                &request,
                StatusCode::OK,
                &response,
                BODY,
                arrived_now(),
            )
            .expect("storable");
        }
        assert_eq!(cache.stats().entries, store::MAX_VARIANTS as u64);
        assert!(matches!(
            lookup(&cache, &key, &[("user-agent", "agent 0")]),
            Lookup::Miss
        ));
        hit(lookup(&cache, &key, &[("user-agent", "agent 19")]));
    }

    #[test]
    fn request_no_cache_revalidates_with_validators() {
        let cache = cache();
        let key = get("/r");
        let modified = date(-3600);
        store(
            &cache,
            &key,
            &[
                ("cache-control", "max-age=60"),
                ("etag", "W/\"v1\""),
                ("last-modified", &modified),
            ],
        )
        .expect("storable");
        for request in [
            &[("cache-control", "no-cache")][..],
            &[("pragma", "no-cache")][..],
            &[("cache-control", "max-age=0")][..],
            &[("cache-control", "min-fresh=120")][..],
        ] {
            let Lookup::Revalidate(revalidation) = lookup(&cache, &key, request) else {
                panic!("{request:?} must revalidate");
            };
            assert_eq!(revalidation.conditional["if-none-match"], "W/\"v1\"");
            assert_eq!(
                revalidation.conditional["if-modified-since"],
                modified.as_str()
            );
            assert!(
                revalidation.stale.is_none(),
                "no stale fallback for a fresh entry"
            );
        }
        hit(lookup(&cache, &key, &[("cache-control", "max-age=10")]));
        assert!(matches!(
            lookup(&cache, &key, &[("cache-control", "no-store")]),
            Lookup::Bypass
        ));
        // A `no-cache` response is stored but never served without validation.
        let key = get("/nc");
        store(
            &cache,
            &key,
            &[("cache-control", "no-cache"), ("etag", "\"n\"")],
        )
        .expect("no-cache with a validator is stored");
        assert!(matches!(lookup(&cache, &key, &[]), Lookup::Revalidate(_)));
        assert_eq!(cache.stats().revalidations, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn not_modified_freshens_the_entry() {
        let cache = cache();
        let key = get("/f");
        let d = date(0);
        store(
            &cache,
            &key,
            &[
                ("cache-control", "max-age=10"),
                ("etag", "\"v1\""),
                ("date", &d),
                ("content-type", "text/plain"),
                ("content-length", &BODY.len().to_string()),
            ],
        )
        .expect("storable");
        advance(Duration::from_secs(20)).await;
        let Lookup::Revalidate(revalidation) = lookup(&cache, &key, &[]) else {
            panic!("expired with an ETag: revalidate");
        };
        assert_eq!(revalidation.conditional["if-none-match"], "\"v1\"");

        let mismatch = headers(&[("etag", "\"v2\""), ("cache-control", "max-age=100")]);
        assert_eq!(
            cache
                .freshen(&revalidation.entry, &mismatch, arrived_now())
                .err(),
            Some(FreshenError::ValidatorMismatch)
        );

        let later = date(20);
        let not_modified = headers(&[
            ("cache-control", "max-age=100"),
            ("etag", "\"v1\""),
            ("date", &later),
            ("x-revision", "2"),
            ("content-length", "0"),
        ]);
        let timing = Timing {
            response_date: wall(20),
            ..arrived_now()
        };
        let response = cache
            .freshen(&revalidation.entry, &not_modified, timing)
            .expect("same validator");
        assert_eq!(response.age, Duration::ZERO, "age restarts from the 304");
        assert_eq!(response.body, Bytes::from_static(BODY), "the stored body");
        assert_eq!(response.headers["x-revision"], "2", "new fields are added");
        assert_eq!(
            response.headers["content-type"], "text/plain",
            "old fields stay"
        );
        assert_eq!(
            response.headers["content-length"],
            BODY.len().to_string().as_str(),
            "Content-Length is never updated"
        );
        assert_eq!(response.headers["cache-control"], "max-age=100");

        advance(Duration::from_secs(99)).await;
        let served = hit(lookup(&cache, &key, &[]));
        assert_eq!(served.headers["x-revision"], "2");
        assert_eq!(cache.stats().entries, 1, "replaced, not added");

        // A 304 that now forbids storing removes the entry but is still served once.
        advance(Duration::from_secs(1)).await;
        let Lookup::Revalidate(revalidation) = lookup(&cache, &key, &[]) else {
            panic!("expired again");
        };
        let no_store = headers(&[("cache-control", "no-store")]);
        cache
            .freshen(&revalidation.entry, &no_store, arrived_now())
            .expect("same representation");
        assert_eq!(cache.stats().entries, 0);
    }

    #[test]
    fn entry_bound_evicts_the_least_recently_used() {
        let cache = Cache::try_new(config(3, 1 << 20, 1 << 10)).expect("valid config");
        assert_eq!(cache.inner.store.shard_count(), 1, "small: one shard");
        for path in ["/1", "/2", "/3"] {
            store(&cache, &get(path), &[("cache-control", "max-age=60")]).expect("storable");
        }
        hit(lookup(&cache, &get("/1"), &[]));
        store(&cache, &get("/4"), &[("cache-control", "max-age=60")]).expect("storable");
        assert!(
            matches!(lookup(&cache, &get("/2"), &[]), Lookup::Miss),
            "/2 was the least recently used"
        );
        for path in ["/1", "/3", "/4"] {
            hit(lookup(&cache, &get(path), &[]));
        }
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.evictions), (3, 1));
        cache.inner.store.assert_consistent();
    }

    #[test]
    fn byte_bound_evicts_the_least_recently_used() {
        let body = vec![b'x'; 1000];
        let response = headers(&[("cache-control", "max-age=60")]);
        let put = |cache: &Cache, path: &str| {
            store_with(
                cache,
                &get(path),
                &HeaderMap::new(),
                StatusCode::OK,
                &response,
                &body,
                arrived_now(),
            )
            .expect("storable")
        };
        let cache = Cache::try_new(config(100, 3000, 1500)).expect("valid config");
        assert_eq!(cache.inner.store.shard_count(), 1);
        let charge = put(&cache, "/1").charge;
        assert!(
            2 * charge <= 3000 && 3 * charge > 3000,
            "two entries of {charge} bytes fit, three do not"
        );
        put(&cache, "/2");
        hit(lookup(&cache, &get("/1"), &[]));
        put(&cache, "/3");
        assert!(
            matches!(lookup(&cache, &get("/2"), &[]), Lookup::Miss),
            "/2 was the least recently used"
        );
        hit(lookup(&cache, &get("/1"), &[]));
        hit(lookup(&cache, &get("/3"), &[]));
        let stats = cache.stats();
        assert_eq!(
            (stats.entries, stats.bytes, stats.evictions),
            (2, 2 * charge, 1)
        );
        cache.inner.store.assert_consistent();
    }

    #[test]
    fn objects_over_the_cap_are_aborted() {
        let cache = Cache::try_new(config(10, 10_000, 100)).expect("valid config");
        let key = get("/big");
        let response = headers(&[("cache-control", "max-age=60")]);
        let mut pending = cache
            .begin(
                &key,
                &HeaderMap::new(),
                StatusCode::OK,
                &response,
                arrived_now(),
            )
            .expect("storable head");
        assert!(pending.push(&Bytes::from(vec![0; 60])));
        assert!(!pending.push(&Bytes::from(vec![0; 60])), "past the cap");
        assert!(pending.is_aborted());
        assert!(!pending.push(&Bytes::from_static(b"x")), "stays aborted");
        assert_eq!(pending.finish().err(), Some(NotStorable::TooLarge));

        let announced = headers(&[("cache-control", "max-age=60"), ("content-length", "101")]);
        assert_eq!(
            cache
                .begin(
                    &key,
                    &HeaderMap::new(),
                    StatusCode::OK,
                    &announced,
                    arrived_now()
                )
                .err(),
            Some(NotStorable::TooLarge),
            "an announced length over the cap is refused up front"
        );
        let short = headers(&[("cache-control", "max-age=60"), ("content-length", "50")]);
        let mut pending = cache
            .begin(
                &key,
                &HeaderMap::new(),
                StatusCode::OK,
                &short,
                arrived_now(),
            )
            .expect("storable head");
        assert!(pending.push(&Bytes::from(vec![0; 20])));
        assert_eq!(pending.finish().err(), Some(NotStorable::Incomplete));

        let mut pending = cache
            .begin(
                &key,
                &HeaderMap::new(),
                StatusCode::OK,
                &response,
                arrived_now(),
            )
            .expect("storable head");
        assert!(
            pending.push(&Bytes::from(vec![0; 100])),
            "exactly the cap fits"
        );
        pending.finish().expect("stored");
        assert_eq!(cache.stats().entries, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn stale_if_error_window() {
        let cache = Cache::try_new(CacheConfig {
            stale_if_error: Duration::from_secs(30),
            ..CacheConfig::default()
        })
        .expect("valid config");
        let plain = get("/plain");
        let tagged = get("/tagged");
        let strict = get("/strict");
        store(&cache, &plain, &[("cache-control", "max-age=10")]).expect("storable");
        store(
            &cache,
            &tagged,
            &[("cache-control", "max-age=10"), ("etag", "\"t\"")],
        )
        .expect("storable");
        store(
            &cache,
            &strict,
            &[
                ("cache-control", "max-age=10, must-revalidate"),
                ("etag", "\"s\""),
            ],
        )
        .expect("storable");

        advance(Duration::from_secs(25)).await;
        let Lookup::Stale(stale) = lookup(&cache, &plain, &[]) else {
            panic!("expired 15 s ago, within the 30 s window");
        };
        assert_eq!(stale.headers["age"], "25");
        let Lookup::Revalidate(revalidation) = lookup(&cache, &tagged, &[]) else {
            panic!("expired with a validator: revalidate");
        };
        assert!(revalidation.stale.is_some(), "with a stale fallback");
        let Lookup::Revalidate(revalidation) = lookup(&cache, &strict, &[]) else {
            panic!("expired with a validator: revalidate");
        };
        assert!(
            revalidation.stale.is_none(),
            "must-revalidate forbids stale"
        );
        let Lookup::Revalidate(revalidation) =
            lookup(&cache, &tagged, &[("cache-control", "no-cache")])
        else {
            panic!("revalidate");
        };
        assert!(
            revalidation.stale.is_none(),
            "the client refused unvalidated"
        );

        advance(Duration::from_secs(15)).await;
        assert!(
            matches!(lookup(&cache, &plain, &[]), Lookup::Miss),
            "past the window"
        );
        let Lookup::Revalidate(revalidation) = lookup(&cache, &tagged, &[]) else {
            panic!("revalidate");
        };
        assert!(revalidation.stale.is_none(), "past the window");
    }

    #[tokio::test(start_paused = true)]
    async fn stale_is_off_by_default() {
        let cache = cache();
        let key = get("/x");
        store(&cache, &key, &[("cache-control", "max-age=10")]).expect("storable");
        advance(Duration::from_secs(11)).await;
        assert!(matches!(lookup(&cache, &key, &[]), Lookup::Miss));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 8)]
    async fn concurrent_misses_make_one_leader_and_followers_get_its_entry() {
        const TASKS: usize = 100;
        let cache = cache();
        let key = get("/hot");
        let joined = Arc::new(tokio::sync::Barrier::new(TASKS));
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let (cache, key, joined) = (cache.clone(), key.clone(), joined.clone());
                tokio::spawn(async move {
                    let role = cache.join_or_lead(&key);
                    // Everyone has joined before the leader finishes, so none can come late.
                    joined.wait().await;
                    match role {
                        Coalesce::Leader(guard) => {
                            let entry = store_with(
                                &cache,
                                &key,
                                &HeaderMap::new(),
                                StatusCode::OK,
                                &headers(&[("cache-control", "max-age=60")]),
                                BODY,
                                Timing::received_now(Instant::now()),
                            )
                            .expect("storable");
                            guard.stored(entry.clone());
                            (true, entry)
                        }
                        Coalesce::Follower(follower) => match follower.await {
                            LeaderResult::Stored(entry) => (false, entry),
                            other => panic!("followers get the stored entry, got {other:?}"),
                        },
                    }
                })
            })
            .collect();
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.expect("task"));
        }
        let leaders: Vec<_> = results.iter().filter(|(leader, _)| *leader).collect();
        assert_eq!(leaders.len(), 1, "exactly one leader among {TASKS}");
        let stored = &leaders[0].1;
        assert!(
            results.iter().all(|(_, entry)| Arc::ptr_eq(entry, stored)),
            "every follower got the leader's entry"
        );
        hit(cache.respond_from(stored, &HeaderMap::new(), Instant::now()));
        assert_eq!(cache.inflight(), 0, "the fetch is over");
        assert_eq!(cache.stats().stores, 1, "one backend response stored");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 8)]
    async fn concurrent_stores_stay_within_bounds() {
        let cache = Cache::try_new(config(200, 1 << 20, 4096)).expect("valid config");
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let cache = cache.clone();
                tokio::spawn(async move {
                    for n in 0..2_000 {
                        let key = get(&format!("/{}", (t * 7 + n) % 500));
                        match n % 4 {
                            0 => {
                                cache.invalidate("example.com", key.path_and_query());
                            }
                            1 => {
                                lookup(&cache, &key, &[]);
                            }
                            _ => {
                                store(&cache, &key, &[("cache-control", "max-age=60")])
                                    .expect("storable");
                            }
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
        let entries = cache.inner.store.assert_consistent();
        assert!(entries <= 200, "{entries} entries over the bound of 200");
        assert!(cache.stats().evictions > 0, "the bound was reached");
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_leader_releases_followers() {
        let cache = cache();
        let key = get("/flaky");
        let Coalesce::Leader(guard) = cache.join_or_lead(&key) else {
            panic!("first is the leader");
        };
        let followers: Vec<_> = (0..10)
            .map(|_| match cache.join_or_lead(&key) {
                Coalesce::Follower(follower) => tokio::spawn(follower),
                Coalesce::Leader(_) => panic!("the key is being fetched"),
            })
            .collect();
        tokio::task::yield_now().await;
        drop(guard);
        for follower in followers {
            assert!(matches!(
                follower.await.expect("follower task"),
                LeaderResult::Abandoned
            ));
        }
        assert_eq!(cache.inflight(), 0);

        let Coalesce::Leader(guard) = cache.join_or_lead(&key) else {
            panic!("a new fetch gets a new leader");
        };
        let Coalesce::Follower(follower) = cache.join_or_lead(&key) else {
            panic!("follower");
        };
        guard.not_stored();
        assert!(matches!(follower.await, LeaderResult::NotStored));
        // GET and HEAD fetches are separate: a HEAD response has no body to share.
        let head = lookup_key(&Method::HEAD, "example.com", "/flaky").expect("cacheable");
        let (Coalesce::Leader(_get), Coalesce::Leader(_head)) =
            (cache.join_or_lead(&key), cache.join_or_lead(&head))
        else {
            panic!("both lead");
        };
    }

    #[test]
    fn followers_check_the_leaders_variant() {
        let cache = cache();
        let key = get("/vary");
        let response = headers(&[("cache-control", "max-age=60"), ("vary", "accept-language")]);
        let entry = store_with(
            &cache,
            &key,
            &headers(&[("accept-language", "de")]),
            StatusCode::OK,
            &response,
            BODY,
            arrived_now(),
        )
        .expect("storable");
        let now = Instant::now();
        hit(cache.respond_from(&entry, &headers(&[("accept-language", "de")]), now));
        assert!(matches!(
            cache.respond_from(&entry, &headers(&[("accept-language", "fr")]), now),
            Lookup::Miss
        ));
    }

    #[test]
    fn config_is_validated() {
        assert_eq!(
            Cache::try_new(config(0, 10, 1)).err(),
            Some(CacheError::Zero("max_entries"))
        );
        assert_eq!(
            Cache::try_new(config(1, 0, 1)).err(),
            Some(CacheError::Zero("max_bytes"))
        );
        assert_eq!(
            Cache::try_new(config(1, 10, 11)).err(),
            Some(CacheError::ObjectLargerThanCache {
                max_object_bytes: 11,
                max_bytes: 10
            })
        );
        let cache = cache();
        assert_eq!(
            cache.inner.store.shard_count(),
            32,
            "64 MiB over 2 × 1 MiB objects"
        );
    }
}
