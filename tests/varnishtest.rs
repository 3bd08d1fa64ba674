//! Black-box protocol tests: every `tests/vtc/*.vtc` file runs under varnishtest against the
//! real `breakwater` binary, with a scripted backend that asserts the exact forwarded bytes.
//!
//! Per file: pick a free port for the vtc's `server s1`, write a policy whose one backend is that
//! port (listener and admin on port 0, so the proxy's own ports can never collide), start the
//! binary, learn its bound addresses from its JSON log, poll `/ready`, then run
//! `varnishtest -D proxy_addr=... -D proxy_port=... -D backend_port=... FILE`. The proxy is
//! killed by PID afterwards and must not have panicked or exited on its own.
//!
//! `BREAKWATER_BIN=/path/to/breakwater` runs the suite against another build (the release
//! binary, say); `VTC_FILTER=substring` runs only files whose name contains it;
//! `VTC_DIR=known-failing` runs that sub-directory instead (files that document open proxy
//! bugs). See `tests/vtc/README.md`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const VARNISHTEST: &str = "/usr/bin/varnishtest";

/// Files run concurrently. Each has its own proxy and ports; more than this only makes the
/// two-core CI machine slower and the timeouts inside the vtc files tighter.
const PARALLEL: usize = 3;

/// A port picked for `server s1` can be taken by someone else before varnishtest binds it; such
/// a run is repeated with fresh ports (the proxy's own ports are bound by the proxy, race-free).
const ATTEMPTS: usize = 3;

/// What varnishtest prints when `server -listen` cannot bind its port.
const BIND_FAILURE: &str = "cannot be resolved: bind";

/// The policy every file runs against; the vtc files rely on these values (see the README).
/// Breakers and health checks are off so one file's deliberate failures cannot eject the single
/// backend; short timeouts make a request that wrongly reaches a finished `server s1` fail fast.
fn policy(backend_port: u16) -> String {
    format!(
        "apiVersion: breakwater.io/v1alpha1
kind: ResiliencePolicy
metadata: {{name: vtc, namespace: test}}
spec:
  listener: {{port: 0, address: 127.0.0.1}}
  backends:
    - {{name: s1, url: \"http://127.0.0.1:{backend_port}\"}}
  timeouts: {{connect: 1s, perTry: 3s, request: 3s, idle: 10s, requestHeader: 5s}}
  circuitBreaker: {{enabled: false}}
  limits: {{maxRequestBodyBytes: 1Ki}}
"
    )
}

#[test]
fn vtc_files_pass_against_the_binary() {
    assert!(
        Path::new(VARNISHTEST).exists(),
        "{VARNISHTEST} is missing: install varnish: apt-get install -y varnish; tests/run.sh does this"
    );
    let files = vtc_files();
    assert!(!files.is_empty(), "no tests/vtc/*.vtc files found");
    let binary = std::env::var_os("BREAKWATER_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_breakwater")),
        PathBuf::from,
    );
    assert!(binary.exists(), "no binary at {}", binary.display());

    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..PARALLEL.min(files.len()) {
            scope.spawn(|| {
                loop {
                    let index = next.fetch_add(1, Ordering::SeqCst);
                    let Some(file) = files.get(index) else { break };
                    let started = Instant::now();
                    let result = run_file(&binary, file);
                    let name = file.file_name().unwrap().to_string_lossy().into_owned();
                    eprintln!(
                        "vtc {name}: {} in {:.1}s",
                        if result.is_ok() { "ok" } else { "FAILED" },
                        started.elapsed().as_secs_f64()
                    );
                    if let Err(report) = result {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("=== {name}\n{report}"));
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} vtc files failed (binary {}):\n{}",
        failures.len(),
        files.len(),
        binary.display(),
        failures.join("\n")
    );
}

/// `tests/vtc/*.vtc` (or `tests/vtc/$VTC_DIR/*.vtc`), sorted; sub-directories are not entered,
/// so `known-failing/` stays out of the default run.
fn vtc_files() -> Vec<PathBuf> {
    let mut dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vtc");
    if let Ok(sub) = std::env::var("VTC_DIR") {
        dir.push(sub);
    }
    let filter = std::env::var("VTC_FILTER").unwrap_or_default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("reading {}: {err}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file() && path.extension().is_some_and(|e| e == "vtc"))
        .filter(|path| {
            path.file_name()
                .is_some_and(|name| name.to_string_lossy().contains(&filter))
        })
        .collect();
    files.sort();
    files
}

fn run_file(binary: &Path, file: &Path) -> Result<(), String> {
    let mut report = String::new();
    for attempt in 1..=ATTEMPTS {
        match run_once(binary, file) {
            Ok(()) => return Ok(()),
            Err(Failure::BackendPortTaken(output)) if attempt < ATTEMPTS => {
                report.push_str(&format!(
                    "attempt {attempt}: backend port taken, retrying\n{output}\n"
                ));
            }
            Err(Failure::BackendPortTaken(output) | Failure::Other(output)) => {
                report.push_str(&output);
                return Err(report);
            }
        }
    }
    Err(report)
}

enum Failure {
    BackendPortTaken(String),
    Other(String),
}

fn run_once(binary: &Path, file: &Path) -> Result<(), Failure> {
    let backend_port = free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("policy.yaml");
    std::fs::write(&config, policy(backend_port)).expect("write policy");
    let mut proxy = Proxy::start(binary, &config).map_err(Failure::Other)?;

    let output = Command::new(VARNISHTEST)
        .arg("-t")
        .arg("30")
        .arg("-D")
        .arg(format!("proxy_addr={}", proxy.listener.ip()))
        .arg("-D")
        .arg(format!("proxy_port={}", proxy.listener.port()))
        .arg("-D")
        .arg(format!("backend_port={backend_port}"))
        .arg(file)
        .stdin(Stdio::null())
        .output()
        .map_err(|err| Failure::Other(format!("running {VARNISHTEST}: {err}")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    // A proxy that died (a panic under `panic = "abort"`) or logged a panic fails the file even
    // when every scripted exchange passed.
    let exited = proxy.child.try_wait().ok().flatten();
    proxy.stop();
    let log = proxy.log.lock().unwrap().join("\n");
    let panicked = log.contains("panicked");
    if output.status.success() && exited.is_none() && !panicked {
        return Ok(());
    }
    let mut report = format!("varnishtest exit: {}\n{text}\n", output.status);
    if let Some(status) = exited {
        report.push_str(&format!("the proxy exited during the test: {status}\n"));
    }
    if panicked {
        report.push_str("the proxy logged a panic\n");
    }
    report.push_str(&format!("--- proxy log (stderr)\n{log}\n"));
    if text.contains(BIND_FAILURE) {
        Err(Failure::BackendPortTaken(report))
    } else {
        Err(Failure::Other(report))
    }
}

/// A loopback port that was free a moment ago (bind port 0, note it, release it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("bind an ephemeral port")
}

/// The running binary; killed by PID when dropped, so a failing assertion never leaks it.
struct Proxy {
    child: Child,
    listener: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proxy {
    fn start(binary: &Path, config: &Path) -> Result<Proxy, String> {
        let mut child = Command::new(binary)
            .args(["--log-format", "json", "run", "--config"])
            .arg(config)
            .args(["--admin-addr", "127.0.0.1:0", "--workers", "2"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|err| format!("starting {}: {err}", binary.display()))?;
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let lines = Arc::clone(&log);
        // Keeps draining stderr for the proxy's whole life, so its log never blocks on a full
        // pipe; the two bound addresses are sent back as they appear.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = bound_addr(&line) {
                    let _ = tx.send(addr);
                }
                lines.lock().unwrap().push(line);
            }
        });
        let mut proxy = Proxy {
            child,
            listener: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut admin = None;
        let mut listener = None;
        while admin.is_none() || listener.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(("admin", addr)) => admin = Some(addr),
                Ok((_, addr)) => listener = Some(addr),
                Err(_) => return Err(proxy.startup_failure("no listening addresses logged")),
            }
        }
        proxy.listener = listener.expect("listener address");
        let admin = admin.expect("admin address");
        // The listener is bound once it is logged; readiness is the proxy's own verdict that
        // the configuration is applied.
        while !ready(admin) {
            if Instant::now() >= deadline {
                return Err(proxy.startup_failure("/ready never answered 200"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(proxy)
    }

    fn startup_failure(&mut self, what: &str) -> String {
        self.stop();
        format!(
            "proxy startup: {what}\n--- proxy log (stderr)\n{}",
            self.log.lock().unwrap().join("\n")
        )
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `("admin", addr)` or `("listener", addr)` from one JSON log line, if it announces a bind.
fn bound_addr(line: &str) -> Option<(&'static str, SocketAddr)> {
    let event: serde_json::Value = serde_json::from_str(line).ok()?;
    let field = |name: &str| event.get(name)?.as_str()?.parse::<SocketAddr>().ok();
    match event.get("message")?.as_str()? {
        "admin server listening" => Some(("admin", field("admin_addr")?)),
        "listening" => Some(("listener", field("local_addr")?)),
        _ => None,
    }
}

fn ready(admin: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&admin, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /ready HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200")
}
