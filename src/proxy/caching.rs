//! The response cache on the request path: hits, coalesced misses, revalidation and
//! stale-if-error around [`dispatch`](super::handler::dispatch). The caching rules themselves
//! live in [`crate::cache`]; this module only moves requests and responses through them.
//!
//! Every response to a cacheable request carries `x-cache`: `HIT` (served from the cache,
//! also after a successful revalidation or by waiting for a concurrent fetch), `MISS` (the
//! backend answered) or `STALE` (the backend failed and an expired copy stood in).

use std::time::SystemTime;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Response, StatusCode, request};
use tokio::time::Instant;

use super::body::{CacheFill, ResponseBody};
use super::error::ProxyError;
use super::handler::{AttemptBody, ConnContext, Outcome, ProxyState, dispatch, fail};
use super::pool::copy_head;
use crate::cache::{
    CacheKey, CachedResponse, Coalesce, LeaderGuard, LeaderResult, Lookup, Revalidation, Timing,
};
use crate::snapshot::{PolicyCache, PolicyRuntime};

/// The response header naming how the cache answered.
static X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// How often a request waits for another's fetch before fetching itself, when those fetches
/// keep failing (each failure releases the waiters one round).
const MAX_COALESCE_ROUNDS: usize = 3;

/// What a fetch may do with the backend's answer.
#[derive(Default)]
struct Fetch {
    /// The coalescing leadership to report through, if this request leads.
    leader: Option<LeaderGuard>,
    /// An expired copy to serve if the backend fails.
    stale: Option<CachedResponse>,
    /// A stored entry to validate with conditional fields.
    revalidation: Option<Revalidation>,
    /// Whether the response may be stored (false for a request that said `no-store`).
    store: bool,
}

/// Answers a bodiless `GET` or `HEAD` request of a policy with a cache.
pub(super) async fn serve<'p>(
    state: &ProxyState,
    policy: &'p PolicyRuntime,
    conn: &ConnContext,
    cache: &'p PolicyCache,
    key: CacheKey,
    parts: request::Parts,
    authority: Option<&Authority>,
) -> (Response<ResponseBody>, Outcome<'p>) {
    let request_headers = parts.headers.clone();
    let fetch = match cache.cache.lookup(&key, &request_headers, Instant::now()) {
        Lookup::Hit(hit) => return hit_response(cache, &key, &request_headers, hit),
        Lookup::Bypass => Fetch::default(),
        Lookup::Stale(stale) => Fetch {
            stale: Some(stale),
            store: true,
            ..Fetch::default()
        },
        Lookup::Revalidate(revalidation) => Fetch {
            revalidation: Some(revalidation),
            store: true,
            ..Fetch::default()
        },
        Lookup::Miss => match coalesce(policy, cache, &key, &request_headers).await {
            Coalesced::Served(answer) => return *answer,
            Coalesced::Lead(leader) => Fetch {
                leader: Some(leader),
                store: true,
                ..Fetch::default()
            },
            Coalesced::Alone => Fetch {
                store: true,
                ..Fetch::default()
            },
        },
    };
    fetch_and_store(
        state,
        policy,
        conn,
        cache,
        &key,
        parts,
        &request_headers,
        authority,
        fetch,
    )
    .await
}

/// How a missed request got on.
enum Coalesced<'p> {
    /// Another request's fetch answered it (boxed: the other variants are small).
    Served(Box<(Response<ResponseBody>, Outcome<'p>)>),
    /// It fetches for everyone waiting on the key.
    Lead(LeaderGuard),
    /// It fetches for itself only.
    Alone,
}

/// Joins the fetch under way for `key`, or leads one.
async fn coalesce<'p>(
    policy: &'p PolicyRuntime,
    cache: &'p PolicyCache,
    key: &CacheKey,
    request_headers: &HeaderMap,
) -> Coalesced<'p> {
    let deadline = Instant::now() + policy.config.timeouts.request;
    for _ in 0..MAX_COALESCE_ROUNDS {
        let follower = match cache.cache.join_or_lead(key) {
            Coalesce::Leader(leader) => {
                // A leader that finished just before may have stored it; look once more.
                if let Lookup::Hit(hit) = cache.cache.lookup(key, request_headers, Instant::now()) {
                    drop(leader);
                    return Coalesced::Served(Box::new(hit_response(
                        cache,
                        key,
                        request_headers,
                        hit,
                    )));
                }
                return Coalesced::Lead(leader);
            }
            Coalesce::Follower(follower) => follower,
        };
        let Ok(result) = tokio::time::timeout_at(deadline, follower).await else {
            return Coalesced::Served(Box::new(fail(
                ProxyError::RequestTimeout(policy.config.timeouts.request),
                None,
                0,
            )));
        };
        match result {
            LeaderResult::Stored(entry) => {
                return match cache
                    .cache
                    .respond_from(&entry, request_headers, Instant::now())
                {
                    Lookup::Hit(hit) => {
                        cache.metrics.coalesced.inc();
                        Coalesced::Served(Box::new(hit_response(cache, key, request_headers, hit)))
                    }
                    // Another variant, or not shareable with this request.
                    _ => Coalesced::Alone,
                };
            }
            LeaderResult::NotStored => return Coalesced::Alone,
            // The leader's fetch failed or was cancelled: try again, someone may lead anew.
            LeaderResult::Abandoned => {
                if let Lookup::Hit(hit) = cache.cache.lookup(key, request_headers, Instant::now()) {
                    return Coalesced::Served(Box::new(hit_response(
                        cache,
                        key,
                        request_headers,
                        hit,
                    )));
                }
            }
        }
    }
    Coalesced::Alone
}

/// Asks the backend (conditionally, when revalidating), then serves, freshens or stores.
#[allow(clippy::too_many_arguments)]
async fn fetch_and_store<'p>(
    state: &ProxyState,
    policy: &'p PolicyRuntime,
    conn: &ConnContext,
    cache: &'p PolicyCache,
    key: &CacheKey,
    parts: request::Parts,
    request_headers: &HeaderMap,
    authority: Option<&Authority>,
    fetch: Fetch,
) -> (Response<ResponseBody>, Outcome<'p>) {
    let Fetch {
        leader,
        stale,
        revalidation,
        store,
    } = fetch;
    // A revalidation whose 304 turns out to validate another representation is repeated
    // unconditionally: keep the head for that.
    let mut unconditional = revalidation.as_ref().map(|_| copy_head(&parts));
    let mut head = parts;
    if let Some(revalidation) = &revalidation {
        // The cache's validators replace the client's own: a 304 must be about the stored entry.
        head.headers.remove(header::IF_NONE_MATCH);
        head.headers.remove(header::IF_MODIFIED_SINCE);
        for (name, value) in &revalidation.conditional {
            head.headers.insert(name.clone(), value.clone());
        }
    }
    let mut request_time = Instant::now();
    let mut exchanged = send(state, policy, conn, head, authority).await;
    let stale = stale.or_else(|| revalidation.as_ref().and_then(|r| r.stale.clone()));
    if let Some(stale) = stale {
        let (response, outcome) = &exchanged;
        if outcome.error.is_some() || response.status().is_server_error() {
            cache.metrics.stale_served.inc();
            let attempts = outcome.attempts;
            return (
                cached_response(stale, key.is_head(), "STALE"),
                Outcome {
                    endpoint: None,
                    attempts,
                    error: None,
                },
            );
        }
    }
    if let Some(revalidation) = &revalidation {
        if exchanged.0.status() == StatusCode::NOT_MODIFIED && exchanged.1.error.is_none() {
            let timing = timing_since(request_time);
            match cache
                .cache
                .freshen(&revalidation.entry, exchanged.0.headers(), timing)
            {
                Ok(fresh) => {
                    let attempts = exchanged.1.attempts;
                    let (response, _) = hit_response(cache, key, request_headers, fresh);
                    return (
                        response,
                        Outcome {
                            endpoint: exchanged.1.endpoint,
                            attempts,
                            error: None,
                        },
                    );
                }
                Err(_) => {
                    if let Some(head) = unconditional.take() {
                        drop(exchanged);
                        request_time = Instant::now();
                        exchanged = send(state, policy, conn, head, authority).await;
                    }
                }
            }
        }
    }
    let (mut response, outcome) = exchanged;
    cache.metrics.misses.inc();
    if store && outcome.error.is_none() && !key.is_head() {
        match cache.cache.begin(
            key,
            request_headers,
            response.status(),
            response.headers(),
            timing_since(request_time),
        ) {
            Ok(pending) => {
                response =
                    response.map(|body| body.with_cache_fill(CacheFill::new(pending, leader)));
            }
            Err(_) => {
                if let Some(leader) = leader {
                    leader.not_stored();
                }
            }
        }
    }
    // Otherwise a leader still held is dropped here: its followers fetch for themselves.
    response
        .headers_mut()
        .insert(X_CACHE.clone(), HeaderValue::from_static("MISS"));
    (response, outcome)
}

/// Sends a bodiless request through the attempt loop.
async fn send<'p>(
    state: &ProxyState,
    policy: &'p PolicyRuntime,
    conn: &ConnContext,
    head: request::Parts,
    authority: Option<&Authority>,
) -> (Response<ResponseBody>, Outcome<'p>) {
    dispatch(
        state,
        policy,
        conn,
        head,
        AttemptBody::Replayable(Bytes::new()),
        authority,
        None,
        // The cache stores the response's fields from its map.
        false,
        // The fetch's own start: a follower may have waited on its leader before this.
        Instant::now(),
    )
    .await
}

/// The exchange timing for a response whose head arrived just now.
fn timing_since(request_time: Instant) -> Timing {
    Timing {
        request_time,
        response_time: Instant::now(),
        response_date: SystemTime::now(),
    }
}

/// Serves a stored response, or `304` when the client's own validators match it.
fn hit_response<'p>(
    cache: &PolicyCache,
    key: &CacheKey,
    request_headers: &HeaderMap,
    hit: CachedResponse,
) -> (Response<ResponseBody>, Outcome<'p>) {
    cache.metrics.hits.inc();
    let response = if hit.status == StatusCode::OK && not_modified(request_headers, &hit.headers) {
        let mut headers = hit.headers;
        headers.remove(header::CONTENT_LENGTH);
        let mut response = Response::new(ResponseBody::empty());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        *response.headers_mut() = headers;
        response
            .headers_mut()
            .insert(X_CACHE.clone(), HeaderValue::from_static("HIT"));
        response
    } else {
        cached_response(hit, key.is_head(), "HIT")
    };
    (
        response,
        Outcome {
            endpoint: None,
            attempts: 0,
            error: None,
        },
    )
}

/// A stored response as a response (without its body for `HEAD`).
fn cached_response(
    cached: CachedResponse,
    head: bool,
    x_cache: &'static str,
) -> Response<ResponseBody> {
    let body = if head {
        ResponseBody::empty()
    } else {
        ResponseBody::full(cached.body)
    };
    let mut response = Response::new(body);
    *response.status_mut() = cached.status;
    *response.headers_mut() = cached.headers;
    response
        .headers_mut()
        .insert(X_CACHE.clone(), HeaderValue::from_static(x_cache));
    response
}

/// RFC 9110 §13.1.1 and §13.1.3 for a `GET`/`HEAD`: `If-None-Match` (weak comparison) when
/// present, else `If-Modified-Since` against `Last-Modified`.
fn not_modified(request: &HeaderMap, stored: &HeaderMap) -> bool {
    if request.contains_key(header::IF_NONE_MATCH) {
        let tags = || {
            request
                .get_all(header::IF_NONE_MATCH)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
        };
        // `*` matches any current representation, with or without an ETag.
        if tags().any(|tag| tag.trim() == "*") {
            return true;
        }
        let Some(etag) = stored.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let opaque = |tag: &str| tag.trim().trim_start_matches("W/").to_owned();
        let stored_tag = opaque(etag);
        return tags().any(|tag| opaque(tag) == stored_tag);
    }
    let since = request
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    let modified = stored
        .get(header::LAST_MODIFIED)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    matches!((since, modified), (Some(since), Some(modified)) if modified <= since)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("valid name"),
                HeaderValue::from_str(value).expect("valid value"),
            );
        }
        map
    }

    #[test]
    fn if_none_match_compares_weakly_and_accepts_lists_and_star() {
        let stored = headers(&[("etag", "\"v1\"")]);
        for request in ["\"v1\"", "W/\"v1\"", "\"v0\", \"v1\"", "*"] {
            assert!(
                not_modified(&headers(&[("if-none-match", request)]), &stored),
                "If-None-Match: {request} should match ETag \"v1\""
            );
        }
        assert!(!not_modified(
            &headers(&[("if-none-match", "\"v2\"")]),
            &stored
        ));
        assert!(
            !not_modified(&headers(&[("if-none-match", "\"v1\"")]), &HeaderMap::new()),
            "nothing matches a response without an ETag"
        );
    }

    #[test]
    fn if_modified_since_is_ignored_when_if_none_match_is_present() {
        let stored = headers(&[
            ("etag", "\"v1\""),
            ("last-modified", "Mon, 02 Jan 2023 00:00:00 GMT"),
        ]);
        let newer = "Tue, 03 Jan 2023 00:00:00 GMT";
        assert!(not_modified(
            &headers(&[("if-modified-since", newer)]),
            &stored
        ));
        assert!(!not_modified(
            &headers(&[("if-modified-since", "Sun, 01 Jan 2023 00:00:00 GMT")]),
            &stored
        ));
        assert!(!not_modified(
            &headers(&[("if-none-match", "\"v2\""), ("if-modified-since", newer)]),
            &stored
        ));
    }
}
