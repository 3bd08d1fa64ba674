//! Open-loop, fixed-rate HTTP/1.1 load generator for the fixed-rate latency rows of
//! `bench/compare.sh`.
//!
//! Request `i` is due at `start + i / rate`. It leaves on an idle keep-alive connection as soon
//! as it is due; when every connection is busy it waits in a backlog. Latency counts from the
//! due time, not from the send, so a stall anywhere (proxy, backend or this tool) shows in the
//! tail instead of quietly lowering the rate (no coordinated omission).
//!
//! Why a tool of our own: on two-CPU machines the load generator shares one CPU with the
//! backend, and at half the proxies' peak rate oha needed most of that CPU. In the rounds where
//! it ran out, the tail measured the generator's own queue, not the proxy. This tool is one
//! thread on raw epoll, with one `write` and usually one `read` per request, and it sleeps with
//! a nanosecond timeout (`epoll_pwait2`, timer slack 1 ns) so that sends leave on time. It
//! reports how late its own sends were, so a generator that falls behind shows in its output.
//!
//! Output: one JSON object in the shape of oha's `--output-format json` (the fields the compare
//! report reads), plus a `loadgen` object with the schedule and send-lag figures.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

mod http;

const USAGE: &str = "usage: breakwater-loadgen --rate REQ_PER_S --connections N --duration SECS \
                     [--grace SECS] [--tick-us MICROS] [--trace CSV_FILE] http://HOST:PORT/PATH";
/// Largest response this tool buffers; anything bigger is a configuration mistake here.
const MAX_RESPONSE: usize = 1 << 20;
const CLOSED: &str = "connection closed by the peer";

#[derive(Debug)]
struct Args {
    addr: SocketAddr,
    request: Vec<u8>,
    rate: f64,
    connections: usize,
    duration: Duration,
    /// How long to wait after the last due time for requests still queued or in flight.
    grace: Duration,
    /// Send in batches at multiples of this many nanoseconds (0: each request at its own time).
    tick_ns: u64,
    /// Where to write every response's due time and latency (CSV, microseconds).
    trace: Option<std::path::PathBuf>,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut tick_us, mut trace) = (0.0, None);
    let (mut rate, mut connections, mut duration, mut grace, mut url) =
        (None, None, None, 5.0, None);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--rate" => rate = Some(number(&value("--rate")?, "--rate")?),
            "--connections" => {
                connections = Some(number(&value("--connections")?, "--connections")?)
            }
            "--duration" => duration = Some(number(&value("--duration")?, "--duration")?),
            "--grace" => grace = number(&value("--grace")?, "--grace")?,
            "--tick-us" => tick_us = number(&value("--tick-us")?, "--tick-us")?,
            "--trace" => trace = Some(value("--trace")?.into()),
            "-h" | "--help" => return Err(USAGE.to_owned()),
            _ if arg.starts_with('-') => return Err(format!("unknown option {arg}\n{USAGE}")),
            _ => url = Some(arg),
        }
    }
    let rate = rate.ok_or(USAGE)?;
    let connections = connections.ok_or(USAGE)?;
    let duration = duration.ok_or(USAGE)?;
    let url = url.ok_or(USAGE)?;
    if !(rate >= 1.0 && rate.is_finite()) {
        return Err(format!("--rate must be at least 1, got {rate}"));
    }
    if !((1.0..=65_536.0).contains(&connections) && connections.fract() == 0.0) {
        return Err(format!(
            "--connections must be a whole number from 1 to 65536, got {connections}"
        ));
    }
    if !(duration > 0.0 && duration <= 86_400.0) {
        return Err(format!(
            "--duration must be between 0 and 86400 seconds, got {duration}"
        ));
    }
    if !((0.0..=1e6).contains(&tick_us) && tick_us.fract() == 0.0) {
        return Err(format!(
            "--tick-us must be a whole number from 0 to 1000000, got {tick_us}"
        ));
    }
    if !(0.0..=600.0).contains(&grace) {
        return Err(format!(
            "--grace must be between 0 and 600 seconds, got {grace}"
        ));
    }
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("only http:// URLs are supported, got {url}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = authority
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority} resolves to no address"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: breakwater-loadgen\r\n\r\n"
    );
    Ok(Args {
        addr,
        request: request.into_bytes(),
        rate,
        connections: connections as usize,
        duration: Duration::from_secs_f64(duration),
        grace: Duration::from_secs_f64(grace),
        tick_ns: tick_us as u64 * 1000,
        trace,
    })
}

fn number(s: &str, name: &str) -> Result<f64, String> {
    s.parse()
        .map_err(|_| format!("{name}: not a number: {s:?}"))
}

/// The epoll instance, with the nanosecond-timeout wait.
struct Epoll(std::os::fd::OwnedFd);

impl Epoll {
    fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; a non-negative result is a new descriptor that we own.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by epoll_create1 and nothing else holds it.
        Ok(Self(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }))
    }

    fn add(&self, stream: &TcpStream, token: usize) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            u64: token as u64,
        };
        // SAFETY: both descriptors are open for the duration of the call; `ev` is valid.
        let rc = unsafe {
            libc::epoll_ctl(
                self.0.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                stream.as_raw_fd(),
                &mut ev,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Waits for events, at most `timeout`. EINTR counts as a wake-up with no events.
    fn wait(&self, events: &mut [libc::epoll_event], timeout: Duration) -> io::Result<usize> {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        let max = events.len().min(i32::MAX as usize) as libc::c_int;
        // SAFETY: epoll_pwait2(epfd, events, maxevents, timeout, sigmask = NULL, sigsetsize);
        // `events` holds `max` entries and `ts` outlives the call.
        let n = unsafe {
            libc::syscall(
                libc::SYS_epoll_pwait2,
                self.0.as_raw_fd(),
                events.as_mut_ptr(),
                max,
                &ts as *const libc::timespec,
                std::ptr::null::<libc::sigset_t>(),
                0usize,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::Interrupted => Ok(0),
                _ => Err(err),
            };
        }
        Ok(n as usize)
    }
}

struct Conn {
    stream: Option<TcpStream>,
    buf: Vec<u8>,
    filled: usize,
    /// Due time (ns from the start) of the request in flight, if any.
    in_flight: Option<u64>,
}

#[derive(Default)]
struct Tally {
    latencies_ns: Vec<u64>,
    /// (due, latency) of every response, kept only for `--trace`.
    trace: Vec<(u64, u64)>,
    /// Due time to send, per request: includes waiting for a free connection, i.e. for the
    /// server under test.
    send_lag_ns: Vec<u64>,
    /// How late this tool woke up for a due request with a connection free: its own delay
    /// (a busy CPU, timer precision), independent of the server.
    wake_late_ns: Vec<u64>,
    status: BTreeMap<u16, u64>,
    errors: BTreeMap<String, u64>,
    max_backlog: u64,
}

impl Tally {
    fn error(&mut self, kind: impl Into<String>) {
        *self.errors.entry(kind.into()).or_default() += 1;
    }
}

fn connect(args: &Args, epoll: &Epoll, token: usize) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(args.addr)?;
    stream.set_nodelay(true)?;
    stream.set_nonblocking(true)?;
    epoll.add(&stream, token)?;
    Ok(stream)
}

/// Puts a connection back on the idle stack, which must not hold it already: a slot there twice
/// would carry two requests at once.
fn release(idle: &mut Vec<usize>, token: usize) {
    debug_assert!(!idle.contains(&token), "connection {token} released twice");
    idle.push(token);
}

/// What one readable event on a connection came to.
enum Readable {
    /// Nothing complete yet.
    Pending,
    /// A whole response; the connection can take the next request.
    Response { status: u16, keep_alive: bool },
    /// The connection is unusable (closed, reset, or a response this tool cannot read).
    Broken(String),
}

fn on_readable(conn: &mut Conn) -> Readable {
    let Some(stream) = conn.stream.as_mut() else {
        return Readable::Pending;
    };
    if conn.filled == conn.buf.len() {
        if conn.buf.len() >= MAX_RESPONSE {
            return Readable::Broken(format!("response larger than {MAX_RESPONSE} bytes"));
        }
        conn.buf.resize(conn.buf.len() * 2, 0);
    }
    match stream.read(&mut conn.buf[conn.filled..]) {
        Ok(0) => return Readable::Broken(CLOSED.to_owned()),
        Ok(n) => conn.filled += n,
        Err(e)
            if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted =>
        {
            return Readable::Pending;
        }
        Err(e) => return Readable::Broken(format!("read: {}", e.kind())),
    }
    if conn.in_flight.is_none() {
        return Readable::Broken("data with no request in flight".to_owned());
    }
    match http::parse_response(&conn.buf[..conn.filled]) {
        http::Parsed::Incomplete => Readable::Pending,
        http::Parsed::Invalid(why) => Readable::Broken(format!("invalid response: {why}")),
        http::Parsed::Complete {
            status,
            len,
            keep_alive,
        } => {
            if len != conn.filled {
                return Readable::Broken("bytes after the response".to_owned());
            }
            conn.filled = 0;
            Readable::Response { status, keep_alive }
        }
    }
}

fn run(args: &Args) -> io::Result<(Tally, u64, u64, Duration)> {
    // Wake-ups on time matter more than the timer coalescing the default 50 µs slack buys.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
    let epoll = Epoll::new()?;
    let mut conns = Vec::with_capacity(args.connections);
    for token in 0..args.connections {
        let stream = connect(args, &epoll, token)
            .map_err(|e| io::Error::new(e.kind(), format!("connect to {}: {e}", args.addr)))?;
        conns.push(Conn {
            stream: Some(stream),
            buf: vec![0; 16 * 1024],
            filled: 0,
            in_flight: None,
        });
    }
    let mut idle: Vec<usize> = (0..args.connections).rev().collect();
    let total = (args.rate * args.duration.as_secs_f64()).floor() as u64;
    let interval_ns = 1e9 / args.rate;
    // With a tick, the schedule releases requests in bursts at tick boundaries (still open
    // loop, latency still counted from the burst's time): fewer wake-ups for this tool.
    let due = |i: u64| {
        let t = (i as f64 * interval_ns) as u64;
        if args.tick_ns == 0 {
            t
        } else {
            t.div_ceil(args.tick_ns) * args.tick_ns
        }
    };
    let deadline_ns = (args.duration + args.grace).as_nanos() as u64;
    let mut tally = Tally {
        latencies_ns: Vec::with_capacity(total as usize),
        send_lag_ns: Vec::with_capacity(total as usize),
        wake_late_ns: Vec::with_capacity(total as usize),
        ..Tally::default()
    };
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; args.connections.min(1024)];
    let (mut next, mut in_flight) = (0u64, 0u64);
    let start = Instant::now();
    let now_ns = || start.elapsed().as_nanos() as u64;
    loop {
        let now = now_ns();
        while next < total && due(next) <= now {
            let Some(token) = idle.pop() else { break };
            let conn = &mut conns[token];
            if conn.stream.is_none() {
                match connect(args, &epoll, token) {
                    Ok(s) => conn.stream = Some(s),
                    Err(e) => {
                        tally.error(format!("connect: {}", e.kind()));
                        release(&mut idle, token);
                        next += 1;
                        continue;
                    }
                }
            }
            let Some(stream) = conn.stream.as_mut() else {
                release(&mut idle, token);
                continue;
            };
            let sent_at = now_ns();
            match stream.write(&args.request) {
                Ok(n) if n == args.request.len() => {
                    tally.send_lag_ns.push(sent_at - due(next));
                    conn.in_flight = Some(due(next));
                    in_flight += 1;
                }
                // A fresh request on an idle keep-alive connection fits the empty send buffer;
                // anything else means the connection is gone.
                Ok(_) => {
                    tally.error("write: partial");
                    conn.stream = None;
                    release(&mut idle, token);
                }
                Err(e) => {
                    tally.error(format!("write: {}", e.kind()));
                    conn.stream = None;
                    release(&mut idle, token);
                }
            }
            next += 1;
        }
        // Requests already due but not sent: every connection was busy.
        let (mut lo, mut hi) = (next, total);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if due(mid) <= now {
                lo = mid + 1
            } else {
                hi = mid
            }
        }
        let due_by_now = lo;
        tally.max_backlog = tally.max_backlog.max(due_by_now.saturating_sub(next));
        if next == total && in_flight == 0 {
            break;
        }
        if now >= deadline_ns {
            break;
        }
        let send_due = next < total && !idle.is_empty();
        let until = if send_due {
            due(next).min(deadline_ns)
        } else {
            deadline_ns
        };
        let n = epoll.wait(&mut events, Duration::from_nanos(until.saturating_sub(now)))?;
        // Only wake-ups at or after the due time say anything: a response can wake it earlier.
        let woke = now_ns();
        if send_due && woke >= until {
            tally.wake_late_ns.push(woke - until);
        }
        for ev in &events[..n] {
            let token = ev.u64 as usize;
            let Some(conn) = conns.get_mut(token) else {
                continue;
            };
            match on_readable(conn) {
                Readable::Pending => {}
                Readable::Response { status, keep_alive } => {
                    let done = now_ns();
                    if let Some(due_at) = conn.in_flight.take() {
                        tally.latencies_ns.push(done.saturating_sub(due_at));
                        if args.trace.is_some() {
                            tally.trace.push((due_at, done.saturating_sub(due_at)));
                        }
                        *tally.status.entry(status).or_default() += 1;
                        in_flight -= 1;
                    }
                    if !keep_alive {
                        conn.stream = None;
                    }
                    release(&mut idle, token);
                }
                Readable::Broken(why) => {
                    // The next request on this slot reconnects. An idle keep-alive connection
                    // the server closed is not an error; anything else is.
                    let was_busy = conn.in_flight.take().is_some();
                    if was_busy || why != CLOSED {
                        tally.error(why);
                    }
                    conn.stream = None;
                    conn.filled = 0;
                    // An idle slot is on the idle stack already.
                    if was_busy {
                        in_flight -= 1;
                        release(&mut idle, token);
                    }
                }
            }
        }
    }
    let elapsed = start.elapsed();
    for _ in 0..in_flight {
        tally.error("no response within the grace period");
    }
    for _ in next..total {
        tally.error("not sent within the grace period");
    }
    Ok((tally, total, next, elapsed))
}

/// The `q` quantile (0..=1) of sorted values, nearest rank; 0 when there are none.
fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn report(args: &Args, mut tally: Tally, due: u64, sent: u64, elapsed: Duration) -> String {
    tally.latencies_ns.sort_unstable();
    tally.send_lag_ns.sort_unstable();
    tally.wake_late_ns.sort_unstable();
    let secs = |ns: u64| ns as f64 / 1e9;
    let responses: u64 = tally.status.values().sum();
    let errors: u64 = tally.errors.values().sum();
    let ok: u64 = tally
        .status
        .iter()
        .filter(|(s, _)| (200..300).contains(*s))
        .map(|(_, n)| n)
        .sum();
    let lat = |q: f64| secs(quantile(&tally.latencies_ns, q));
    let lag = |q: f64| secs(quantile(&tally.send_lag_ns, q));
    // Every latency, to the microsecond, as [value, count] pairs: runs can then be pooled
    // exactly (the percentiles of all requests of several runs, not a median of percentiles).
    let mut histogram = String::new();
    let mut i = 0;
    while i < tally.latencies_ns.len() {
        let us = tally.latencies_ns[i] / 1000;
        let run = tally.latencies_ns[i..].partition_point(|&ns| ns / 1000 == us);
        if !histogram.is_empty() {
            histogram.push(',');
        }
        histogram.push_str(&format!("[{us},{run}]"));
        i += run;
    }
    let status = tally
        .status
        .iter()
        .map(|(s, n)| format!("\"{s}\":{n}"))
        .collect::<Vec<_>>()
        .join(",");
    let errs = tally
        .errors
        .iter()
        .map(|(k, n)| format!("{}:{n}", json_string(k)))
        .collect::<Vec<_>>()
        .join(",");
    let attempts = responses + errors;
    let success = if attempts == 0 {
        0.0
    } else {
        ok as f64 / attempts as f64
    };
    format!(
        concat!(
            "{{\"summary\":{{\"successRate\":{},\"total\":{},\"requestsPerSec\":{}}},",
            "\"latencyPercentiles\":{{\"p50\":{},\"p90\":{},\"p99\":{},\"p99.9\":{},\"p99.99\":{}}},",
            "\"latencyHistogramUs\":[{}],",
            "\"statusCodeDistribution\":{{{}}},\"errorDistribution\":{{{}}},",
            "\"loadgen\":{{\"rate\":{},\"connections\":{},\"due\":{},\"sent\":{},",
            "\"sendLagP50\":{},\"sendLagP99\":{},\"sendLagMax\":{},\"maxBacklog\":{},",
            "\"wakeLateP99\":{},\"wakeLateMax\":{}}}}}"
        ),
        success,
        elapsed.as_secs_f64(),
        responses as f64 / elapsed.as_secs_f64(),
        lat(0.5),
        lat(0.9),
        lat(0.99),
        lat(0.999),
        lat(0.9999),
        histogram,
        status,
        errs,
        args.rate,
        args.connections,
        due,
        sent,
        lag(0.5),
        lag(0.99),
        secs(tally.send_lag_ns.last().copied().unwrap_or(0)),
        tally.max_backlog,
        secs(quantile(&tally.wake_late_ns, 0.99)),
        secs(tally.wake_late_ns.last().copied().unwrap_or(0)),
    )
}

fn main() {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("breakwater-loadgen: {msg}");
            std::process::exit(2);
        }
    };
    match run(&args) {
        Ok((tally, due, sent, elapsed)) => {
            if let Some(path) = &args.trace {
                let mut csv = String::from("due_us,latency_us\n");
                for (due_at, latency) in &tally.trace {
                    csv.push_str(&format!("{},{}\n", due_at / 1000, latency / 1000));
                }
                if let Err(e) = std::fs::write(path, csv) {
                    eprintln!("breakwater-loadgen: cannot write {}: {e}", path.display());
                    std::process::exit(1);
                }
            }
            println!("{}", report(&args, tally, due, sent, elapsed))
        }
        Err(e) => {
            eprintln!("breakwater-loadgen: {e}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Args, String> {
        parse_args(list.iter().map(|s| s.to_string()))
    }

    /// `--rate`, `--connections` and `--duration`, any `extra` options, then the URL.
    fn run_args(
        rate: &str,
        connections: &str,
        duration: &str,
        extra: &[&str],
        url: &str,
    ) -> Result<Args, String> {
        let mut list = vec![
            "--rate",
            rate,
            "--connections",
            connections,
            "--duration",
            duration,
        ];
        list.extend_from_slice(extra);
        list.push(url);
        args(&list)
    }

    #[test]
    fn arguments_are_checked_and_the_request_names_the_authority() {
        let a = run_args("100", "4", "1", &[], "http://127.0.0.1:8080/x").unwrap();
        assert_eq!(a.connections, 4);
        assert_eq!(a.addr, "127.0.0.1:8080".parse().unwrap());
        assert!(
            a.request
                .starts_with(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n")
        );
        assert!(run_args("0", "4", "1", &[], "http://127.0.0.1:1/").is_err());
        assert!(run_args("10", "1.5", "1", &[], "http://127.0.0.1:1/").is_err());
        assert!(run_args("10", "1", "1", &[], "https://127.0.0.1:1/").is_err());
        assert!(args(&["--rate", "10", "--connections", "1", "http://127.0.0.1:1/"]).is_err());
    }

    #[test]
    fn the_report_carries_a_histogram_to_the_microsecond() {
        let a = run_args("10", "1", "1", &[], "http://127.0.0.1:1/").unwrap();
        let mut tally = Tally {
            latencies_ns: vec![5_000, 1_700, 2_100, 1_500],
            ..Tally::default()
        };
        tally.status.insert(200, 4);
        let json = report(&a, tally, 4, 4, Duration::from_secs(1));
        assert!(
            json.contains("\"latencyHistogramUs\":[[1,2],[2,1],[5,1]]"),
            "{json}"
        );
        assert!(
            json.contains("\"statusCodeDistribution\":{\"200\":4}"),
            "{json}"
        );
        assert!(json.contains("\"p50\":0.0000017,"), "{json}");
    }

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(quantile(&v, 0.5), 500);
        assert_eq!(quantile(&v, 0.99), 990);
        assert_eq!(quantile(&v, 0.999), 999);
        assert_eq!(quantile(&v, 1.0), 1000);
        assert_eq!(quantile(&[], 0.99), 0);
    }

    /// A real keep-alive server on loopback that answers after `delay`: the generator must keep
    /// the rate, count every response, and put the server's delay into the latencies.
    fn serve(
        delay: Duration,
        close_every: Option<usize>,
        idle_close: Option<Duration>,
    ) -> SocketAddr {
        use std::io::BufRead;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(64) {
                let Ok(stream) = stream else { return };
                std::thread::spawn(move || {
                    let mut reader = io::BufReader::new(stream.try_clone().unwrap());
                    let mut writer = stream;
                    let mut served = 0;
                    loop {
                        // A server's keep-alive timeout: close without a word when idle.
                        writer.set_read_timeout(idle_close).unwrap();
                        let mut line = String::new();
                        // Read one request head.
                        loop {
                            line.clear();
                            match reader.read_line(&mut line) {
                                Ok(0) | Err(_) => return,
                                Ok(_) if line == "\r\n" => break,
                                Ok(_) => {}
                            }
                        }
                        std::thread::sleep(delay);
                        served += 1;
                        let close = close_every.is_some_and(|n| served % n == 0);
                        let resp = if close {
                            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                        } else if served % 2 == 0 {
                            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
                        } else {
                            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                        };
                        if writer.write_all(resp.as_bytes()).is_err() || close {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    #[test]
    fn a_run_sends_every_due_request_and_measures_from_the_due_time() {
        let addr = serve(Duration::from_millis(5), None, None);
        let a = run_args("400", "8", "0.5", &[], &format!("http://{addr}/")).unwrap();
        let (tally, due, sent, _) = run(&a).unwrap();
        assert_eq!(due, 200);
        assert_eq!(sent, 200);
        assert!(tally.errors.is_empty(), "{:?}", tally.errors);
        assert_eq!(tally.status.get(&200), Some(&200));
        // Eight connections at 400/s are mostly idle: it slept until sends were due.
        assert!(
            tally.wake_late_ns.len() > 100,
            "{} timed wake-ups",
            tally.wake_late_ns.len()
        );
        let mut lat = tally.latencies_ns.clone();
        lat.sort_unstable();
        // Every response took at least the server's 5 ms.
        assert!(quantile(&lat, 0.0) >= 5_000_000, "{}", quantile(&lat, 0.0));
    }

    #[test]
    fn a_backlog_counts_its_wait_and_closed_connections_are_reopened() {
        // One connection, 20 ms per response, 100 requests/s due: the server can do 50/s, so
        // the queue grows and the last requests wait far longer than the service time.
        let addr = serve(Duration::from_millis(20), Some(3), None);
        let a = run_args(
            "100",
            "1",
            "0.3",
            &["--grace", "5"],
            &format!("http://{addr}/"),
        )
        .unwrap();
        let (tally, due, sent, _) = run(&a).unwrap();
        assert_eq!((due, sent), (30, 30));
        assert!(tally.errors.is_empty(), "{:?}", tally.errors);
        assert_eq!(tally.status.get(&200), Some(&30));
        assert!(tally.max_backlog >= 5, "backlog {}", tally.max_backlog);
        let worst = tally.latencies_ns.iter().max().copied().unwrap();
        assert!(worst >= 200_000_000, "worst latency {worst} ns");
    }

    #[test]
    fn idle_connections_the_server_closes_are_reopened_without_errors() {
        // 4 connections at 40/s: each sits idle ~100 ms between requests, and the server
        // closes it after 10 ms of silence. Every closed slot must come back exactly once.
        let addr = serve(Duration::ZERO, None, Some(Duration::from_millis(10)));
        let a = run_args("40", "4", "0.5", &[], &format!("http://{addr}/")).unwrap();
        let (tally, due, sent, _) = run(&a).unwrap();
        assert_eq!((due, sent), (20, 20));
        assert!(tally.errors.is_empty(), "{:?}", tally.errors);
        assert_eq!(tally.status.get(&200), Some(&20));
    }

    #[test]
    fn an_unreachable_server_is_a_clear_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let a = run_args("10", "1", "0.1", &[], &format!("http://{addr}/")).unwrap();
        let err = run(&a).err().expect("connect must fail");
        assert!(err.to_string().contains("connect to"), "{err}");
    }
}
