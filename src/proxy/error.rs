//! Every way a proxied request can fail, and the one place that maps a failure to a status,
//! body, cause header and metric label.

use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};

use super::body::ResponseBody;
use crate::config::units::format_duration;

/// Response header naming the cause of an error the proxy generated itself.
pub const ERROR_HEADER: &str = "x-breakwater-error";

/// Longest request target forwarded (as Envoy and nginx default to about this much).
pub const MAX_URI_BYTES: usize = 8 << 10;

/// A failure the proxy answers on behalf of the backend (or the client's own fault).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    /// No endpoint can take the request (none configured, resolved, or admissible); the value
    /// is when to try again, in seconds (until the next breaker probe).
    #[error("no endpoint available")]
    NoEndpoint(u64),
    /// A rate limit refused the request; the headers tell the client when to come back.
    #[error("rate limited")]
    RateLimited(Vec<(&'static str, String)>),
    /// An overload limit (`overload.*`) refused the request.
    #[error("overloaded: {0} reached")]
    Overloaded(&'static str),
    /// TCP/TLS connect did not finish in `timeouts.connect`.
    #[error("upstream connect timed out (timeouts.connect={})", format_duration(*.0))]
    ConnectTimeout(Duration),
    /// The endpoint refused the connection.
    #[error("upstream connection refused")]
    ConnectRefused,
    /// Connecting failed otherwise (unreachable, DNS, TLS handshake).
    #[error("upstream connect failed")]
    ConnectFailed,
    /// The connection broke before a complete response head arrived.
    #[error("upstream connection reset")]
    UpstreamReset,
    /// The endpoint answered with something that is not valid HTTP.
    #[error("invalid upstream response")]
    UpstreamProtocol,
    /// One attempt took longer than `timeouts.perTry`.
    #[error("upstream attempt timed out (timeouts.perTry={})", format_duration(*.0))]
    PerTryTimeout(Duration),
    /// The request took longer than `timeouts.request`.
    #[error("request timed out (timeouts.request={})", format_duration(*.0))]
    RequestTimeout(Duration),
    /// The client's request body broke off or was malformed.
    #[error("malformed or aborted request body")]
    ClientBody,
    /// The request body exceeded `limits.maxRequestBodyBytes`.
    #[error("request body larger than limits.maxRequestBodyBytes ({0} bytes)")]
    BodyTooLarge(u64),
    /// The request target is longer than [`MAX_URI_BYTES`].
    #[error("request target longer than {MAX_URI_BYTES} bytes")]
    UriTooLong,
    /// The request head is not acceptable for forwarding.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The request uses something a reverse proxy does not implement (a transfer coding
    /// other than `chunked`, `CONNECT`).
    #[error("not implemented: {0}")]
    NotImplemented(&'static str),
    /// A WebSocket upgrade failed on the upstream side.
    #[error("upstream refused the upgrade: {0}")]
    UpgradeFailed(&'static str),
    /// The proxy is shutting down or the listener was removed.
    #[error("proxy is draining")]
    Draining,
}

impl ProxyError {
    /// The status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoEndpoint(_) | ProxyError::Overloaded(_) | ProxyError::Draining => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::ConnectTimeout(_)
            | ProxyError::PerTryTimeout(_)
            | ProxyError::RequestTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ConnectRefused
            | ProxyError::ConnectFailed
            | ProxyError::UpstreamReset
            | ProxyError::UpstreamProtocol
            | ProxyError::UpgradeFailed(_) => StatusCode::BAD_GATEWAY,
            ProxyError::ClientBody | ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::UriTooLong => StatusCode::URI_TOO_LONG,
            ProxyError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
        }
    }

    /// The stable cause label: `x-breakwater-error` value and `proxy_errors_total{cause}`.
    pub fn cause(&self) -> &'static str {
        match self {
            ProxyError::NoEndpoint(_) => "no_endpoint",
            ProxyError::Overloaded(_) => "overloaded",
            ProxyError::ConnectTimeout(_) => "connect_timeout",
            ProxyError::ConnectRefused => "connect_refused",
            ProxyError::ConnectFailed => "connect_failed",
            ProxyError::UpstreamReset => "upstream_reset",
            ProxyError::UpstreamProtocol => "upstream_protocol",
            ProxyError::PerTryTimeout(_) => "per_try_timeout",
            ProxyError::RequestTimeout(_) => "request_timeout",
            ProxyError::ClientBody => "client_body",
            ProxyError::BodyTooLarge(_) => "body_too_large",
            ProxyError::UriTooLong => "uri_too_long",
            ProxyError::RateLimited(_) => "rate_limited",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::NotImplemented(_) => "not_implemented",
            ProxyError::UpgradeFailed(_) => "upgrade_failed",
            ProxyError::Draining => "draining",
        }
    }

    /// Whether the failure says something about the endpoint's health (not the client's fault).
    pub fn is_endpoint_failure(&self) -> bool {
        matches!(
            self,
            ProxyError::ConnectTimeout(_)
                | ProxyError::ConnectRefused
                | ProxyError::ConnectFailed
                | ProxyError::UpstreamReset
                | ProxyError::UpstreamProtocol
                | ProxyError::PerTryTimeout(_)
                | ProxyError::UpgradeFailed(_)
        )
    }

    /// The response: status, a one-line text body, the cause header, and `Retry-After` on 503.
    pub fn to_response(&self) -> Response<ResponseBody> {
        let mut response = Response::new(ResponseBody::full(format!("{self}\n")));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(ERROR_HEADER, HeaderValue::from_static(self.cause()));
        match self {
            ProxyError::NoEndpoint(seconds) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from((*seconds).max(1)));
            }
            ProxyError::Overloaded(limit) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                headers.insert("x-breakwater-limit", HeaderValue::from_static(limit));
            }
            ProxyError::Draining => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ProxyError::RateLimited(fields) => {
                for (name, value) in fields {
                    if let Ok(value) = HeaderValue::from_str(value) {
                        headers.insert(*name, value);
                    }
                }
            }
            _ => {}
        }
        if matches!(
            self,
            ProxyError::ClientBody
                | ProxyError::BadRequest(_)
                | ProxyError::NotImplemented(_)
                | ProxyError::BodyTooLarge(_)
                | ProxyError::UriTooLong
        ) {
            // The rest of the request stream is unreliable; never reuse the connection.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}
