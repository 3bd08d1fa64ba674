//! The access log: one line per request, text or JSON, formatted straight from the request's
//! facts into a reused buffer and handed to the log writer.
//!
//! Whether lines are written is decided like any other log: the `tracing` target [`TARGET`] at
//! INFO, so `RUST_LOG` turns it on and off. How they are written is this module's: through
//! `tracing-subscriber`'s `fmt` layer a line cost about 15,000 instructions (timestamp
//! formatting, ANSI wrappers, `fmt::Write` for every field, a dynamic visitor), a third of the
//! proxy's CPU at full load. Here the handler passes an [`Entry`] of plain fields, the
//! timestamp prefix is formatted once a second, and the line goes to the binary's
//! [`LineWriter`] when one is installed ([`install`]). Without one (the library used on its
//! own, tests) the entry is emitted as an ordinary `tracing` event with the same fields.

use std::cell::RefCell;
use std::io::Write as _;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::ascii::push_decimal;
use crate::logwriter::LineWriter;

/// The `tracing` target of access-log lines.
pub const TARGET: &str = "breakwater::access";

/// Where formatted lines go once the binary has set up its log writer.
struct Sink {
    writer: LineWriter,
    json: bool,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Sends access-log lines to `writer`, as JSON objects when `json`, else as `key=value` text
/// in the same layout as the other log lines. The first call wins; later ones return false.
pub fn install(writer: LineWriter, json: bool) -> bool {
    SINK.set(Sink { writer, json }).is_ok()
}

/// Whether access-log lines are wanted (`RUST_LOG` enables `breakwater::access` at INFO).
pub fn enabled() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::INFO)
}

/// One request, as the access log reports it.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// `namespace/name` of the policy.
    pub policy: &'a str,
    /// The client's address.
    pub client: &'a str,
    /// The request method.
    pub method: &'a str,
    /// The request path (no query string).
    pub path: &'a str,
    /// The status sent to the client.
    pub status: u16,
    /// From the request head to the response head.
    pub duration: Duration,
    /// The endpoint that answered (or failed last), `-` for none.
    pub endpoint: &'a str,
    /// Attempts sent upstream.
    pub attempts: u32,
    /// The proxy's error cause, `-` for none.
    pub error: &'a str,
}

/// Writes one access-log line for `entry` (call only when [`enabled`]).
pub fn record(entry: &Entry<'_>) {
    let Some(sink) = SINK.get() else {
        tracing::info!(
            target: TARGET,
            policy = entry.policy,
            client = entry.client,
            method = entry.method,
            path = entry.path,
            status = entry.status,
            duration_ms = entry.duration.as_secs_f64() * 1000.0,
            endpoint = entry.endpoint,
            attempts = entry.attempts,
            error = entry.error,
        );
        return;
    };
    thread_local! {
        static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    LINE.with(|line| {
        let Ok(mut line) = line.try_borrow_mut() else {
            return;
        };
        line.clear();
        format_line(&mut line, entry, sink.json, SystemTime::now());
        sink.writer.write_line(&line);
    });
}

/// The constant runs of a line's layout, between the values. Each run (separator, key, `=` or
/// `":"`, quotes) goes out as one copy: per-copy overhead, not bytes, is what a line costs.
struct Layout {
    /// Before the timestamp.
    open: &'static [u8],
    /// After the timestamp, up to the policy value.
    policy: &'static [u8],
    client: &'static [u8],
    method: &'static [u8],
    path: &'static [u8],
    status: &'static [u8],
    duration: &'static [u8],
    endpoint: &'static [u8],
    attempts: &'static [u8],
    error: &'static [u8],
    /// After the last value, newline included.
    close: &'static [u8],
    json: bool,
}

/// `tracing-subscriber`'s text layout: the level right-aligned in five columns, then the target.
const TEXT: Layout = Layout {
    open: b"",
    policy: b"  INFO breakwater::access: policy=",
    client: b" client=",
    method: b" method=",
    path: b" path=",
    status: b" status=",
    duration: b" duration_ms=",
    endpoint: b" endpoint=",
    attempts: b" attempts=",
    error: b" error=",
    close: b"\n",
    json: false,
};

/// One JSON object per line; text values are quoted, numbers are not.
const JSON: Layout = Layout {
    open: b"{\"timestamp\":\"",
    policy: b"\",\"level\":\"INFO\",\"policy\":\"",
    client: b"\",\"client\":\"",
    method: b"\",\"method\":\"",
    path: b"\",\"path\":\"",
    status: b"\",\"status\":",
    duration: b",\"duration_ms\":",
    endpoint: b",\"endpoint\":\"",
    attempts: b"\",\"attempts\":",
    error: b",\"error\":\"",
    close: b"\",\"target\":\"breakwater::access\"}\n",
    json: true,
};

/// The line for `entry` at `now`, newline included.
fn format_line(out: &mut Vec<u8>, entry: &Entry<'_>, json: bool, now: SystemTime) {
    let layout = if json { &JSON } else { &TEXT };
    out.reserve(
        LINE_OVERHEAD
            + entry.policy.len()
            + entry.client.len()
            + entry.method.len()
            + entry.path.len()
            + entry.endpoint.len()
            + entry.error.len(),
    );
    out.extend_from_slice(layout.open);
    push_timestamp(out, now);
    out.extend_from_slice(layout.policy);
    push_text(out, entry.policy, layout.json);
    out.extend_from_slice(layout.client);
    push_text(out, entry.client, layout.json);
    out.extend_from_slice(layout.method);
    push_text(out, entry.method, layout.json);
    out.extend_from_slice(layout.path);
    push_text(out, entry.path, layout.json);
    out.extend_from_slice(layout.status);
    push_decimal(out, u64::from(entry.status));
    out.extend_from_slice(layout.duration);
    push_millis(out, entry.duration);
    out.extend_from_slice(layout.endpoint);
    push_text(out, entry.endpoint, layout.json);
    out.extend_from_slice(layout.attempts);
    push_decimal(out, u64::from(entry.attempts));
    out.extend_from_slice(layout.error);
    push_text(out, entry.error, layout.json);
    out.extend_from_slice(layout.close);
}

/// Room for a line's timestamp, keys, numbers and punctuation, beyond its text values.
const LINE_OVERHEAD: usize = 224;

/// A text value: in JSON escaped inside the layout's quotes; in text bare, or quoted and
/// escaped only when a bare value could be misread.
fn push_text(out: &mut Vec<u8>, value: &str, json: bool) {
    if json {
        if value.bytes().all(json_plain) {
            out.extend_from_slice(value.as_bytes());
        } else {
            push_json_escaped(out, value);
        }
    } else if !value.is_empty() && value.bytes().all(is_bare) {
        out.extend_from_slice(value.as_bytes());
    } else {
        let _ = write!(out, "{value:?}");
    }
}

/// Per byte: [`BARE`] in text values, [`JSON_PLAIN`] in JSON strings.
static BYTE_CLASS: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let byte = b as u8;
        let special = byte == b'"' || byte == b'\\';
        if byte > b' ' && byte < 0x7f && byte != b'=' && !special {
            table[b] |= BARE;
        }
        if byte >= 0x20 && !special {
            table[b] |= JSON_PLAIN;
        }
        b += 1;
    }
    table
};
const BARE: u8 = 1;
const JSON_PLAIN: u8 = 2;

/// Whether a text value may hold `b` unquoted: visible ASCII except `"`, `=` and `\`.
/// A table look-up: the comparisons it replaces cost about 16 instructions a byte, as the
/// compiler did not vectorise them, and each line checks about a hundred bytes.
#[inline]
fn is_bare(b: u8) -> bool {
    BYTE_CLASS[usize::from(b)] & BARE != 0
}

/// Whether `b` goes into a JSON string as it is.
#[inline]
fn json_plain(b: u8) -> bool {
    BYTE_CLASS[usize::from(b)] & JSON_PLAIN != 0
}

/// Milliseconds with three decimals (microsecond resolution), formatted with integers.
fn push_millis(out: &mut Vec<u8>, duration: Duration) {
    let micros = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
    push_decimal(out, micros / 1000);
    out.push(b'.');
    let frac = micros % 1000;
    out.push(b'0' + (frac / 100) as u8);
    out.push(b'0' + (frac / 10 % 10) as u8);
    out.push(b'0' + (frac % 10) as u8);
}

fn push_json_escaped(out: &mut Vec<u8>, value: &str) {
    for &b in value.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..=0x1f => {
                let _ = write!(out, "\\u{b:04x}");
            }
            _ => out.push(b),
        }
    }
}

/// RFC 3339 UTC with microseconds (`2026-12-06T07:49:42.835740Z`), as `tracing-subscriber`
/// writes it; the part up to the seconds is formatted once a second per thread.
fn push_timestamp(out: &mut Vec<u8>, now: SystemTime) {
    thread_local! {
        static PREFIX: RefCell<(u64, [u8; 20])> = const { RefCell::new((u64::MAX, [0; 20])) };
    }
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    PREFIX.with(|prefix| {
        let mut prefix = prefix.borrow_mut();
        if prefix.0 != secs {
            prefix.1 = date_time_prefix(secs);
            prefix.0 = secs;
        }
        out.extend_from_slice(&prefix.1);
    });
    let micros = since_epoch.subsec_micros();
    let mut digits = [b'0'; 6];
    let mut rest = micros;
    for digit in digits.iter_mut().rev() {
        *digit = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    out.extend_from_slice(&digits);
    out.push(b'Z');
}

/// `YYYY-MM-DDTHH:MM:SS.` for `secs` since the Unix epoch (proleptic Gregorian calendar).
fn date_time_prefix(secs: u64) -> [u8; 20] {
    let days = secs / 86_400;
    let of_day = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    let mut out = *b"0000-00-00T00:00:00.";
    let put = |out: &mut [u8; 20], at: usize, value: u64, width: usize| {
        let mut value = value;
        for i in (at..at + width).rev() {
            out[i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(&mut out, 0, year.min(9999), 4);
    put(&mut out, 5, month, 2);
    put(&mut out, 8, day, 2);
    put(&mut out, 11, of_day / 3600, 2);
    put(&mut out, 14, of_day / 60 % 60, 2);
    put(&mut out, 17, of_day % 60, 2);
    out
}

/// Days since 1970-01-01 to (year, month, day): Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENTRY: Entry<'static> = Entry {
        policy: "default/web",
        client: "127.0.0.1:5000",
        method: "GET",
        path: "/a b\"c",
        status: 200,
        duration: Duration::from_micros(1_234_567),
        endpoint: "10.0.0.1:80",
        attempts: 1,
        error: "-",
    };

    fn line(json: bool) -> String {
        let mut out = Vec::new();
        format_line(
            &mut out,
            &ENTRY,
            json,
            UNIX_EPOCH + Duration::from_micros(1_796_543_382_835_740),
        );
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn json_lines_parse_and_carry_every_field_with_its_type() {
        let text = line(true);
        assert!(
            text.ends_with("}\n") && text.matches('\n').count() == 1,
            "{text}"
        );
        let line: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(line["timestamp"], "2026-12-06T07:49:42.835740Z");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["target"], TARGET);
        assert_eq!(line["policy"], "default/web");
        assert_eq!(line["client"], "127.0.0.1:5000");
        assert_eq!(line["method"], "GET");
        assert_eq!(line["path"], "/a b\"c");
        assert_eq!(line["status"], 200);
        assert_eq!(line["duration_ms"], 1234.567);
        assert_eq!(line["endpoint"], "10.0.0.1:80");
        assert_eq!(line["attempts"], 1);
        assert_eq!(line["error"], "-");
    }

    #[test]
    fn text_lines_keep_the_log_layout_and_quote_only_what_needs_it() {
        assert_eq!(
            line(false),
            "2026-12-06T07:49:42.835740Z  INFO breakwater::access: policy=default/web \
             client=127.0.0.1:5000 method=GET path=\"/a b\\\"c\" status=200 duration_ms=1234.567 \
             endpoint=10.0.0.1:80 attempts=1 error=-\n"
        );
    }

    #[test]
    fn bare_and_json_plain_bytes_are_exactly_the_documented_sets() {
        for b in 0..=u8::MAX {
            let visible = (b'!'..=b'~').contains(&b);
            assert_eq!(is_bare(b), visible && !b"\"=\\".contains(&b), "byte {b:#x}");
            assert_eq!(
                json_plain(b),
                b >= 0x20 && !b"\"\\".contains(&b),
                "byte {b:#x}"
            );
        }
    }

    #[test]
    fn control_bytes_are_escaped_in_json() {
        let mut out = Vec::new();
        push_json_escaped(&mut out, "a\u{1}\n\\\"");
        assert_eq!(String::from_utf8(out).unwrap(), "a\\u0001\\n\\\\\\\"");
    }

    #[test]
    fn timestamps_match_the_calendar() {
        let at = |secs: u64, micros: u64| {
            let mut out = Vec::new();
            push_timestamp(
                &mut out,
                UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros),
            );
            String::from_utf8(out).unwrap()
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(at(1_796_543_382, 835_740), "2026-12-06T07:49:42.835740Z");
        assert_eq!(at(4_107_542_399, 999_999), "2100-02-28T23:59:59.999999Z");
    }

    #[test]
    fn durations_print_milliseconds_with_three_decimals() {
        let show = |d: Duration| {
            let mut out = Vec::new();
            push_millis(&mut out, d);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(show(Duration::ZERO), "0.000");
        assert_eq!(show(Duration::from_nanos(400)), "0.000");
        assert_eq!(show(Duration::from_micros(12_345)), "12.345");
        assert_eq!(show(Duration::from_secs(90)), "90000.000");
    }
}
