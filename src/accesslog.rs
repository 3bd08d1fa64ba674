//! The access log's own formatter: one line per request, text or JSON, written straight into a
//! reused buffer and handed to the log writer.
//!
//! Access-log events are ordinary `tracing` events (target [`TARGET`], level INFO), so
//! `RUST_LOG` turns them on and off like any other log. What differs is the formatting:
//! through `tracing-subscriber`'s `fmt` layer a line cost about 15,000 instructions (timestamp
//! formatting, ANSI wrappers, `fmt::Write` for every field), a third of the proxy's CPU at
//! full load. This layer formats the handful of field types the handler sends (strings,
//! integers, one float) with no formatting machinery and a timestamp prefix cached per second.

use std::cell::RefCell;
use std::fmt;
use std::io::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, Layer};

/// The `tracing` target of access-log events.
pub const TARGET: &str = "breakwater::access";

/// Writes access-log events as lines to `W`; every other event is left to other layers.
pub struct AccessLogLayer<W> {
    writer: W,
    json: bool,
}

impl<W> AccessLogLayer<W> {
    /// Lines go to `writer`, as JSON objects when `json`, else as `key=value` text in the same
    /// shape as the other log lines.
    pub fn new(writer: W, json: bool) -> Self {
        Self { writer, json }
    }
}

/// Whether an event or span belongs to the access log (for filtering it out of other layers).
pub fn is_access_log(metadata: &tracing::Metadata<'_>) -> bool {
    metadata.target() == TARGET
}

impl<S, W> Layer<S> for AccessLogLayer<W>
where
    S: Subscriber,
    W: for<'w> MakeWriter<'w> + 'static,
{
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if !is_access_log(event.metadata()) {
            return;
        }
        thread_local! {
            static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        }
        LINE.with(|line| {
            let Ok(mut line) = line.try_borrow_mut() else {
                return;
            };
            line.clear();
            format_line(&mut line, event, self.json, SystemTime::now());
            // The writer queues the line for its thread; a full queue drops it (and counts).
            let _ = self.writer.make_writer().write_all(&line);
        });
    }
}

fn format_line(out: &mut Vec<u8>, event: &Event<'_>, json: bool, now: SystemTime) {
    let level = event.metadata().level().as_str();
    if json {
        out.extend_from_slice(b"{\"timestamp\":\"");
        push_timestamp(out, now);
        out.extend_from_slice(b"\",\"level\":\"");
        out.extend_from_slice(level.as_bytes());
        out.push(b'"');
        event.record(&mut Fields { out, json: true });
        out.extend_from_slice(b",\"target\":\"");
        out.extend_from_slice(TARGET.as_bytes());
        out.extend_from_slice(b"\"}\n");
    } else {
        push_timestamp(out, now);
        // `tracing-subscriber`'s layout: the level right-aligned in five columns.
        out.extend_from_slice(&b"      "[..6 - level.len().min(5)]);
        out.extend_from_slice(level.as_bytes());
        out.push(b' ');
        out.extend_from_slice(TARGET.as_bytes());
        out.push(b':');
        event.record(&mut Fields { out, json: false });
        out.push(b'\n');
    }
}

/// Appends each field as ` key=value` (text) or `,"key":value` (JSON).
struct Fields<'a> {
    out: &'a mut Vec<u8>,
    json: bool,
}

impl Fields<'_> {
    fn key(&mut self, field: &Field) {
        if self.json {
            self.out.extend_from_slice(b",\"");
            push_json_escaped(self.out, field.name());
            self.out.extend_from_slice(b"\":");
        } else {
            self.out.push(b' ');
            self.out.extend_from_slice(field.name().as_bytes());
            self.out.push(b'=');
        }
    }

    fn string(&mut self, value: &str) {
        if self.json {
            self.out.push(b'"');
            push_json_escaped(self.out, value);
            self.out.push(b'"');
        } else if !value.is_empty()
            && value
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'=' && b != b'\\')
        {
            self.out.extend_from_slice(value.as_bytes());
        } else {
            // Quoted and escaped only when a bare value could be misread.
            let _ = write!(self.out, "{value:?}");
        }
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.key(field);
        self.string(value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        push_decimal(self.out, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        if value < 0 {
            self.out.push(b'-');
        }
        push_decimal(self.out, value.unsigned_abs());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        self.out
            .extend_from_slice(if value { b"true" } else { b"false" });
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.key(field);
        push_thousandths(self.out, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.key(field);
        let text = format!("{value:?}");
        self.string(&text);
    }
}

/// A non-negative float with three decimals (durations in milliseconds: microsecond
/// resolution); anything else (negative, not finite, huge) through the standard formatter.
fn push_thousandths(out: &mut Vec<u8>, value: f64) {
    if value.is_finite() && (0.0..1e15).contains(&value) {
        // In range: the rounded product fits a u64.
        let thousandths = (value * 1000.0).round() as u64;
        push_decimal(out, thousandths / 1000);
        out.push(b'.');
        let frac = thousandths % 1000;
        out.push(b'0' + (frac / 100) as u8);
        out.push(b'0' + (frac / 10 % 10) as u8);
        out.push(b'0' + (frac % 10) as u8);
    } else if value.is_finite() {
        let _ = write!(out, "{value}");
    } else {
        // JSON has no NaN or infinity; text and JSON both get a readable null.
        out.extend_from_slice(b"null");
    }
}

fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
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
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// Collects written lines.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Sink {
        type Writer = Sink;
        fn make_writer(&'w self) -> Sink {
            self.clone()
        }
    }

    fn logged(json: bool) -> String {
        let sink = Sink::default();
        let subscriber =
            tracing_subscriber::registry().with(AccessLogLayer::new(sink.clone(), json));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(
                target: "breakwater::access",
                policy = "default/web",
                client = "127.0.0.1:5000",
                method = "GET",
                path = "/a b\"c",
                status = 200u16,
                duration_ms = 1.2345,
                endpoint = "10.0.0.1:80",
                attempts = 1u32,
                error = "-",
            );
            tracing::info!(target: "breakwater::other", "not an access line");
        });
        let bytes = sink.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn json_lines_parse_and_carry_every_field_with_its_type() {
        let text = logged(true);
        assert_eq!(text.lines().count(), 1, "only access events: {text}");
        let line: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["target"], TARGET);
        assert_eq!(line["policy"], "default/web");
        assert_eq!(line["path"], "/a b\"c");
        assert_eq!(line["status"], 200);
        assert_eq!(line["duration_ms"], 1.235);
        assert_eq!(line["attempts"], 1);
        let timestamp = line["timestamp"].as_str().unwrap();
        assert_eq!(timestamp.len(), 27, "{timestamp}");
        assert!(timestamp.ends_with('Z'));
    }

    #[test]
    fn text_lines_keep_the_log_layout_and_quote_only_what_needs_it() {
        let text = logged(false);
        let line = text.trim_end();
        let (timestamp, rest) = line.split_at(27);
        assert!(timestamp.ends_with('Z'), "{line}");
        assert_eq!(
            rest,
            "  INFO breakwater::access: policy=default/web client=127.0.0.1:5000 method=GET \
             path=\"/a b\\\"c\" status=200 duration_ms=1.235 endpoint=10.0.0.1:80 attempts=1 error=-"
        );
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
    fn floats_print_three_decimals_and_never_break_json() {
        let show = |v: f64| {
            let mut out = Vec::new();
            push_thousandths(&mut out, v);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(show(0.0), "0.000");
        assert_eq!(show(0.0004), "0.000");
        assert_eq!(show(12.3456), "12.346");
        assert_eq!(show(-1.5), "-1.5");
        assert_eq!(show(f64::NAN), "null");
    }
}
