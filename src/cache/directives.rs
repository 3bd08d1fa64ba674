//! Parsing of the header fields the cache decides on: `Cache-Control`, `Pragma`, `Vary`, `Age`
//! and HTTP dates. Lenient where RFC 9111 allows it, conservative where a misread would store or
//! serve something it must not.

use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderName};

/// RFC 9111 §1.2.2: delta-seconds too large to represent are treated as 2^31 seconds.
const MAX_DELTA_SECONDS: u64 = 1 << 31;

/// The response `Cache-Control` directives a shared cache acts on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ResponseDirectives {
    pub(crate) no_store: bool,
    /// Also set by the qualified form `no-cache="field"`, which we do not implement field by field.
    pub(crate) no_cache: bool,
    /// Also set by the qualified form `private="field"`: the whole response is then not stored.
    pub(crate) private: bool,
    pub(crate) public: bool,
    pub(crate) must_revalidate: bool,
    pub(crate) proxy_revalidate: bool,
    pub(crate) max_age: Option<Duration>,
    pub(crate) s_maxage: Option<Duration>,
}

/// The request `Cache-Control` (and `Pragma`) directives the cache acts on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct RequestDirectives {
    pub(crate) no_store: bool,
    pub(crate) no_cache: bool,
    pub(crate) max_age: Option<Duration>,
    pub(crate) min_fresh: Option<Duration>,
}

impl ResponseDirectives {
    pub(crate) fn parse(headers: &HeaderMap) -> Self {
        let mut d = Self::default();
        for_each_directive(headers, &header::CACHE_CONTROL, |name, value| match name {
            "no-store" => d.no_store = true,
            "no-cache" => d.no_cache = true,
            "private" => d.private = true,
            "public" => d.public = true,
            "must-revalidate" => d.must_revalidate = true,
            "proxy-revalidate" => d.proxy_revalidate = true,
            // RFC 9111 §4.2.1: with duplicates, the first occurrence is used.
            "max-age" => {
                d.max_age.get_or_insert(delta_seconds(value));
            }
            "s-maxage" => {
                d.s_maxage.get_or_insert(delta_seconds(value));
            }
            _ => {}
        });
        d
    }

    /// Whether the response is explicitly allowed in a shared cache even for a request carrying
    /// `Authorization` (RFC 9111 §3.5).
    pub(crate) fn shared_explicitly(&self) -> bool {
        self.public || self.s_maxage.is_some() || self.must_revalidate
    }

    /// Whether a stale copy may never be served without validation: `must-revalidate`,
    /// `proxy-revalidate`, `s-maxage` (which implies `proxy-revalidate` for shared caches,
    /// RFC 9111 §5.2.2.10) and `no-cache`.
    pub(crate) fn forbids_stale(&self) -> bool {
        self.must_revalidate || self.proxy_revalidate || self.s_maxage.is_some() || self.no_cache
    }
}

impl RequestDirectives {
    pub(crate) fn parse(headers: &HeaderMap) -> Self {
        let mut d = Self::default();
        let mut any = false;
        for_each_directive(headers, &header::CACHE_CONTROL, |name, value| {
            any = true;
            match name {
                "no-store" => d.no_store = true,
                "no-cache" => d.no_cache = true,
                "max-age" => {
                    d.max_age.get_or_insert(delta_seconds(value));
                }
                "min-fresh" => {
                    d.min_fresh.get_or_insert(delta_seconds(value));
                }
                _ => {}
            }
        });
        // RFC 9111 §5.4: `Pragma` only counts when the request has no `Cache-Control`.
        if !any {
            for_each_directive(headers, &header::PRAGMA, |name, _| {
                if name == "no-cache" {
                    d.no_cache = true;
                }
            });
        }
        d
    }
}

/// Calls `f(name, value)` for every directive of every `field` line, with the name lowercased
/// and the value unquoted. Commas inside quoted strings do not split.
fn for_each_directive(
    headers: &HeaderMap,
    field: &HeaderName,
    mut f: impl FnMut(&str, Option<&str>),
) {
    for line in headers.get_all(field) {
        // `to_str` accepts visible ASCII only, so slicing at the ASCII bytes below is safe.
        let Ok(line) = line.to_str() else { continue };
        let (mut start, mut quoted, mut escaped) = (0, false, false);
        for (i, b) in line.bytes().enumerate() {
            match b {
                _ if escaped => escaped = false,
                b'\\' if quoted => escaped = true,
                b'"' => quoted = !quoted,
                b',' if !quoted => {
                    directive(&line[start..i], &mut f);
                    start = i + 1;
                }
                _ => {}
            }
        }
        directive(&line[start..], &mut f);
    }
}

fn directive(piece: &str, f: &mut impl FnMut(&str, Option<&str>)) {
    let piece = piece.trim();
    if piece.is_empty() {
        return;
    }
    let (name, value) = match piece.split_once('=') {
        Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
        None => (piece, None),
    };
    f(&name.to_ascii_lowercase(), value);
}

/// A delta-seconds value; a missing or malformed one counts as zero, so that a broken
/// `max-age` makes the response stale rather than fresh.
fn delta_seconds(value: Option<&str>) -> Duration {
    Duration::from_secs(parse_seconds(value).unwrap_or(0))
}

fn parse_seconds(value: Option<&str>) -> Option<u64> {
    let value = value?;
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // All digits: the only parse failure left is overflow.
    Some(
        value
            .parse::<u64>()
            .map_or(MAX_DELTA_SECONDS, |s| s.min(MAX_DELTA_SECONDS)),
    )
}

/// The `Age` field value; absent or malformed counts as zero (RFC 9111 §5.1).
pub(crate) fn age_value(headers: &HeaderMap) -> Duration {
    let value = headers.get(header::AGE).and_then(|v| v.to_str().ok());
    Duration::from_secs(parse_seconds(value.map(str::trim)).unwrap_or(0))
}

/// The first `field` line parsed as an HTTP date, if it is one.
pub(crate) fn http_date(headers: &HeaderMap, field: &HeaderName) -> Option<SystemTime> {
    let value = headers.get(field)?.to_str().ok()?;
    httpdate::parse_http_date(value.trim()).ok()
}

/// The header names listed in `Vary`, lowercased, sorted and deduplicated; `None` for `Vary: *`
/// or a name that is not a valid field name (either way, no request can be matched to it).
pub(crate) fn vary_names(headers: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names = Vec::new();
    for line in headers.get_all(header::VARY) {
        for name in line.as_bytes().split(|&b| b == b',') {
            let name = name.trim_ascii();
            if name.is_empty() {
                continue;
            }
            if name == b"*" {
                return None;
            }
            names.push(HeaderName::from_bytes(name).ok()?);
        }
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    Some(names)
}

/// The request's value of `name` normalised for variant matching (RFC 9111 §4.1): all field
/// lines combined, list elements trimmed and empty ones dropped, lowercased for fields whose
/// values are case-insensitive tokens. `None` when the request lacks the field, which is a
/// different variant from an empty value.
pub(crate) fn normalized_value(headers: &HeaderMap, name: &HeaderName) -> Option<Box<[u8]>> {
    let mut lines = headers.get_all(name).iter().peekable();
    lines.peek()?;
    let fold = matches!(
        name.as_str(),
        "accept" | "accept-encoding" | "accept-language" | "accept-charset"
    );
    let mut out = Vec::new();
    for line in lines {
        for element in line.as_bytes().split(|&b| b == b',') {
            let element = element.trim_ascii();
            if element.is_empty() {
                continue;
            }
            if !out.is_empty() {
                out.push(b',');
            }
            out.extend(
                element
                    .iter()
                    // Whitespace around `;` parameters is insignificant too.
                    .filter(|b| !(fold && b.is_ascii_whitespace()))
                    .map(|&b| if fold { b.to_ascii_lowercase() } else { b }),
            );
        }
    }
    Some(out.into_boxed_slice())
}

/// Weak comparison of two entity tags (RFC 9110 §8.8.3.2): equal opaque tags, `W/` ignored.
pub(crate) fn etags_match_weakly(a: &[u8], b: &[u8]) -> bool {
    fn opaque(tag: &[u8]) -> &[u8] {
        let tag = tag.trim_ascii();
        tag.strip_prefix(b"W/").unwrap_or(tag)
    }
    opaque(a) == opaque(b)
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn response_directives_are_parsed_case_insensitively_and_first_wins() {
        let d = ResponseDirectives::parse(&headers(&[
            (
                "cache-control",
                "Public, MAX-AGE=60, private=\"set-cookie, x\"",
            ),
            ("cache-control", "max-age=5, s-maxage=\"30\""),
        ]));
        assert!(
            d.public && d.private,
            "both flags set, quoted comma not split"
        );
        assert_eq!(
            d.max_age,
            Some(Duration::from_secs(60)),
            "first max-age wins"
        );
        assert_eq!(d.s_maxage, Some(Duration::from_secs(30)));
        assert!(!d.no_store && !d.no_cache);
    }

    #[test]
    fn malformed_and_huge_delta_seconds() {
        let d = ResponseDirectives::parse(&headers(&[(
            "cache-control",
            "max-age=abc, s-maxage=99999999999999999999999",
        )]));
        assert_eq!(d.max_age, Some(Duration::ZERO), "malformed means stale");
        assert_eq!(d.s_maxage, Some(Duration::from_secs(MAX_DELTA_SECONDS)));
    }

    #[test]
    fn pragma_counts_only_without_cache_control() {
        let d = RequestDirectives::parse(&headers(&[("pragma", "no-cache")]));
        assert!(d.no_cache);
        let d = RequestDirectives::parse(&headers(&[
            ("pragma", "no-cache"),
            ("cache-control", "max-age=10"),
        ]));
        assert!(!d.no_cache, "Cache-Control overrides Pragma");
        assert_eq!(d.max_age, Some(Duration::from_secs(10)));
    }

    #[test]
    fn vary_names_are_canonical_and_star_is_none() {
        let names = vary_names(&headers(&[
            ("vary", "Accept-Encoding, accept-language"),
            ("vary", "accept-encoding"),
        ]))
        .expect("no star");
        assert_eq!(
            names,
            vec![header::ACCEPT_ENCODING, header::ACCEPT_LANGUAGE]
        );
        assert_eq!(vary_names(&headers(&[("vary", "accept, *")])), None);
        assert_eq!(vary_names(&HeaderMap::new()), Some(vec![]));
    }

    #[test]
    fn normalized_values_ignore_insignificant_differences() {
        let a = headers(&[("accept-encoding", "GZIP,  br")]);
        let b = headers(&[("accept-encoding", "gzip"), ("accept-encoding", "br,")]);
        let name = header::ACCEPT_ENCODING;
        assert_eq!(normalized_value(&a, &name), normalized_value(&b, &name));
        assert_eq!(
            normalized_value(&a, &name).as_deref(),
            Some(&b"gzip,br"[..])
        );
        assert_eq!(normalized_value(&HeaderMap::new(), &name), None);
        let c = headers(&[("x-tenant", "Acme")]);
        let name = HeaderName::from_static("x-tenant");
        assert_eq!(
            normalized_value(&c, &name).as_deref(),
            Some(&b"Acme"[..]),
            "unknown fields keep their case"
        );
    }

    #[test]
    fn dates_ages_and_etags() {
        let h = headers(&[("date", "Sun, 06 Nov 1994 08:49:37 GMT"), ("age", " 42 ")]);
        assert_eq!(
            http_date(&h, &header::DATE),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777))
        );
        assert_eq!(age_value(&h), Duration::from_secs(42));
        assert_eq!(age_value(&headers(&[("age", "-1")])), Duration::ZERO);
        assert!(etags_match_weakly(b"W/\"a\"", b"\"a\""));
        assert!(!etags_match_weakly(b"\"a\"", b"\"b\""));
    }
}
