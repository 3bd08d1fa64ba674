//! The real `breakwater` binary: `validate` messages and exit codes, `run` serving from a file,
//! graceful drain on SIGTERM, and `run` refusing an invalid file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, header};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::{Instant, timeout};

use support::{Backend, eventually, free_port, http1_client, policy};

const BIN: &str = env!("CARGO_BIN_EXE_breakwater");

/// Two mistakes in one file: a duration that is not one, and a backend URL with a bad scheme.
const BAD_POLICY: &str = "\
apiVersion: breakwater.io/v1alpha1
kind: ResiliencePolicy
metadata:
  name: bad
spec:
  listener: {port: 0, address: 127.0.0.1}
  backends:
    - {name: fine, url: \"http://127.0.0.1:9\"}
    - {name: broken, url: \"ftp://127.0.0.1:21\"}
  timeouts: {connect: banana}
";

const GOOD_POLICY: &str = "\
apiVersion: breakwater.io/v1alpha1
kind: ResiliencePolicy
metadata:
  name: good
spec:
  listener: {port: 0, address: 127.0.0.1}
  backends:
    - {name: app, url: \"http://127.0.0.1:9\"}
";

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs the binary to completion, failing the test if it takes longer than `limit`.
async fn run_to_end(args: &[&str], limit: Duration) -> Output {
    let child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the breakwater binary should start");
    timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("breakwater {args:?} should finish within {limit:?}"))
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn validate_names_every_invalid_field_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(dir.path(), "bad.yaml", BAD_POLICY);
    let good = write(dir.path(), "good.yaml", GOOD_POLICY);

    let out = run_to_end(
        &["validate", bad.to_str().unwrap()],
        Duration::from_secs(10),
    )
    .await;
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "an invalid file should exit 1; stderr:\n{stderr}"
    );
    for field in ["spec.timeouts.connect", "spec.backends[1].url"] {
        let line = stderr.lines().find(|l| l.contains(field));
        assert!(
            line.is_some(),
            "validate should print {field} with its reason; stderr:\n{stderr}"
        );
    }
    assert!(
        stderr.contains("banana") && stderr.contains("ftp"),
        "each error should quote the offending value; stderr:\n{stderr}"
    );
    assert!(
        !text(&out.stdout).contains("valid ("),
        "an invalid file must not be reported valid"
    );

    let out = run_to_end(
        &["validate", good.to_str().unwrap()],
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "a valid file should exit 0; stderr:\n{}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("valid (default/good)"),
        "validate should name the policies it checked; stdout:\n{}",
        text(&out.stdout)
    );

    // Several files: every one is checked, and one bad file fails the run.
    let out = run_to_end(
        &["validate", good.to_str().unwrap(), bad.to_str().unwrap()],
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "one bad file fails the whole run"
    );
    assert!(
        text(&out.stdout).contains("valid (default/good)")
            && text(&out.stderr).contains("spec.timeouts.connect"),
        "both files should be reported"
    );

    let missing = dir.path().join("missing.yaml");
    let out = run_to_end(
        &["validate", missing.to_str().unwrap()],
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "an unreadable file should exit 1"
    );
    assert!(
        text(&out.stderr).contains("missing.yaml"),
        "the unreadable file should be named; stderr:\n{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn run_refuses_an_invalid_file_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(dir.path(), "bad.yaml", BAD_POLICY);
    let out = run_to_end(
        &[
            "run",
            "--config",
            bad.to_str().unwrap(),
            "--admin-addr",
            "127.0.0.1:0",
        ],
        Duration::from_secs(10),
    )
    .await;
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success(),
        "run on an invalid file should exit non-zero; stderr:\n{stderr}"
    );
    for field in ["spec.timeouts.connect", "spec.backends[1].url"] {
        assert!(
            stderr.contains(field),
            "run should name {field} on stderr; stderr:\n{stderr}"
        );
    }
}

/// A GET that reports failure instead of panicking: `(status, connection header, body)`.
async fn try_get(url: &str) -> Result<(u16, Option<String>, String), String> {
    let request = Request::get(url).body(Full::default()).unwrap();
    let resp = timeout(Duration::from_secs(5), http1_client().request(request))
        .await
        .map_err(|_| "no response within 5 s".to_owned())?
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let connection = resp
        .headers()
        .get(header::CONNECTION)
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, connection, text(&body)))
}

/// A running `breakwater run` whose stderr is collected for failure messages.
struct Proxy {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Proxy {
    fn spawn_with_env(args: &[&str], env: &[(&str, &str)]) -> Proxy {
        let mut child = Command::new(BIN)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the breakwater binary should start");
        let log = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&log);
        let stderr = child.stderr.take().unwrap();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Proxy { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Polls `/ready` until 200, failing fast if the process exits.
    async fn wait_ready(&mut self, admin: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "breakwater exited early with {status}; stderr:\n{}",
                    self.log()
                );
            }
            if matches!(try_get(&format!("{admin}/ready")).await, Ok((200, _, _))) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "breakwater should be ready within 15 s; stderr:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Sends SIGTERM and expects a clean exit (status 0) within 10 s.
    async fn terminate_cleanly(&mut self) {
        self.signal("TERM");
        let status = timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("breakwater should exit after SIGTERM")
            .unwrap();
        assert_eq!(status.code(), Some(0), "stderr:\n{}", self.log());
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("the process is running");
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .expect("kill should run");
        assert!(status.success(), "kill -{signal} {pid} should succeed");
    }
}

/// `breakwater run` serving a one-backend policy (`cli`) on free ports, ready.
struct Started {
    proxy: Proxy,
    port: u16,
    traffic: String,
    admin: String,
    /// Holds the policy file.
    _dir: tempfile::TempDir,
}

impl Started {
    /// Starts the binary with `extra` arguments and `env`, and waits for `/ready`.
    async fn run(backend: std::net::SocketAddr, extra: &[&str], env: &[(&str, &str)]) -> Started {
        let port = free_port();
        let admin_port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let config = write(
            dir.path(),
            "policy.yaml",
            &policy("cli", &[("app", backend)], "").replace("port: 0,", &format!("port: {port},")),
        );
        let admin_addr = format!("127.0.0.1:{admin_port}");
        let mut args = vec![
            "run",
            "--config",
            config.to_str().unwrap(),
            "--admin-addr",
            &admin_addr,
        ];
        args.extend_from_slice(extra);
        let mut proxy = Proxy::spawn_with_env(&args, env);
        let admin = format!("http://{admin_addr}");
        proxy.wait_ready(&admin).await;
        Started {
            proxy,
            port,
            traffic: format!("http://127.0.0.1:{port}"),
            admin,
            _dir: dir,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_serves_and_drains_in_flight_requests_on_sigterm() {
    const IN_FLIGHT: usize = 5;
    const BACKEND_DELAY: Duration = Duration::from_secs(1);
    const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

    let backend = Backend::slow("slow", BACKEND_DELAY).await;
    let Started {
        mut proxy,
        port,
        traffic,
        admin,
        _dir,
    } = Started::run(backend.addr, &["--drain-timeout", "10s"], &[]).await;
    let answer = try_get(&format!("{traffic}/warmup")).await;
    assert!(
        matches!(answer, Ok((200, _, ref body)) if body == "slow"),
        "the proxy should serve before the signal, got {answer:?}; stderr:\n{}",
        proxy.log()
    );

    let requests: Vec<_> = (0..IN_FLIGHT)
        .map(|i| {
            let url = format!("{traffic}/inflight/{i}");
            tokio::spawn(async move { try_get(&url).await })
        })
        .collect();
    let arrived = eventually(Duration::from_secs(5), || async {
        backend.hits() == IN_FLIGHT + 1
    })
    .await;
    assert!(
        arrived,
        "all {IN_FLIGHT} requests should reach the backend before the signal"
    );

    let signalled = Instant::now();
    proxy.signal("TERM");

    let not_ready = eventually(Duration::from_secs(2), || async {
        matches!(try_get(&format!("{admin}/ready")).await, Ok((503, _, _)))
    })
    .await;
    let not_ready_after = signalled.elapsed();
    let refused = eventually(Duration::from_secs(2), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
    })
    .await;
    let refused_after = signalled.elapsed();
    let still_in_flight = requests.iter().filter(|r| !r.is_finished()).count();
    assert!(
        not_ready,
        "/ready should turn 503 while the drain runs; stderr:\n{}",
        proxy.log()
    );
    assert!(
        refused,
        "the traffic port should stop accepting during the drain"
    );
    assert!(
        still_in_flight > 0,
        "readiness and the listener should change while requests are still in flight \
         (took {not_ready_after:?} / {refused_after:?}, the backend needs {BACKEND_DELAY:?})"
    );

    for (i, request) in requests.into_iter().enumerate() {
        let answer = request.await.unwrap();
        let (status, connection, body) = answer.unwrap_or_else(|e| {
            panic!(
                "in-flight request {i} should complete, got {e}; stderr:\n{}",
                proxy.log()
            )
        });
        assert_eq!(
            (status, body.as_str()),
            (200, "slow"),
            "in-flight request {i} should get the backend's answer"
        );
        assert_eq!(
            connection.as_deref(),
            Some("close"),
            "in-flight request {i}: a draining HTTP/1 server should say Connection: close"
        );
    }
    let completed_after = signalled.elapsed();

    let status = timeout(DRAIN_TIMEOUT, proxy.child.wait())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "breakwater should exit before the {DRAIN_TIMEOUT:?} drain timeout; stderr:\n{}",
                proxy.log()
            )
        })
        .unwrap();
    let exited_after = signalled.elapsed();
    assert_eq!(
        status.code(),
        Some(0),
        "a graceful shutdown should exit 0; stderr:\n{}",
        proxy.log()
    );
    assert!(
        exited_after < DRAIN_TIMEOUT,
        "the exit should not wait for the drain timeout"
    );
    let log = proxy.log();
    assert!(
        log.contains("listening"),
        "the text log should be written; stderr:\n{log}"
    );
    assert!(
        !log.contains('\x1b'),
        "no terminal colour codes in a log that is not a terminal; stderr:\n{log}"
    );
    println!(
        "SIGTERM drain: /ready 503 within {not_ready_after:?}, port refusing within \
         {refused_after:?} ({still_in_flight} of {IN_FLIGHT} requests still in flight), all \
         {IN_FLIGHT} answered 200 + Connection: close by {completed_after:?}, exit 0 after \
         {exited_after:?} (drain timeout {DRAIN_TIMEOUT:?})"
    );
}

/// The access log: one JSON line per request naming the request, the answer, the endpoint and
/// the attempts, written while the proxy runs (lines go through a writer thread, which must not
/// hold them back until exit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_writes_one_json_line_per_request_while_running() {
    let backend = Backend::text("logged").await;
    let Started {
        mut proxy,
        traffic,
        _dir,
        ..
    } = Started::run(
        backend.addr,
        &["--log-format", "json"],
        &[("RUST_LOG", "warn,breakwater::access=info")],
    )
    .await;
    for i in 0..3 {
        let answer = try_get(&format!("{traffic}/logged/{i}?q=1")).await;
        assert!(
            matches!(answer, Ok((200, _, ref body)) if body == "logged"),
            "{answer:?}"
        );
    }
    let access_lines = || {
        proxy
            .log()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|line| line["target"] == "breakwater::access")
            .collect::<Vec<_>>()
    };
    let written = eventually(Duration::from_secs(5), || async {
        access_lines().len() >= 3
    })
    .await;
    assert!(
        written,
        "three access-log lines should appear while the proxy runs; stderr:\n{}",
        proxy.log()
    );
    let lines = access_lines();
    assert_eq!(lines.len(), 3, "one line per request: {lines:?}");
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["method"], "GET", "{line}");
        assert_eq!(line["path"], format!("/logged/{i}"), "{line}");
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(line["policy"], "default/cli", "{line}");
        assert_eq!(line["endpoint"], backend.addr.to_string(), "{line}");
        assert_eq!(line["attempts"], 1, "{line}");
        assert_eq!(line["error"], "-", "{line}");
        assert!(
            line["duration_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
            "{line}"
        );
    }
    proxy.terminate_cleanly().await;
}

/// With one worker and nothing to log, the proxy runs on one thread: the log writer's thread
/// starts only with a first line. A single-threaded process is cheaper on every system call
/// (the kernel looks descriptors up without taking a reference, glibc skips its cancellation
/// bookkeeping), and the proxy makes four per request.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_proxy_with_one_worker_runs_on_one_thread() {
    let backend = Backend::text("quiet").await;
    let Started {
        mut proxy,
        traffic,
        _dir,
        ..
    } = Started::run(backend.addr, &["--workers", "1"], &[("RUST_LOG", "warn")]).await;
    for _ in 0..20 {
        let answer = try_get(&format!("{traffic}/")).await;
        assert!(
            matches!(answer, Ok((200, _, ref body)) if body == "quiet"),
            "{answer:?}"
        );
    }
    let pid = proxy.child.id().expect("the process is running");
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| {
            let path = task.ok()?.path().join("comm");
            std::fs::read_to_string(path).ok()
        })
        .map(|name| name.trim().to_owned())
        .collect();
    assert_eq!(
        threads.len(),
        1,
        "threads: {threads:?}; stderr:\n{}",
        proxy.log()
    );
    proxy.terminate_cleanly().await;
}

#[test]
fn shipped_examples_validate() {
    let root = env!("CARGO_MANIFEST_DIR");
    for example in ["examples/demo.yaml", "examples/resilience.yaml"] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_breakwater"))
            .arg("validate")
            .arg(format!("{root}/{example}"))
            .output()
            .expect("run breakwater validate");
        assert!(
            output.status.success(),
            "{example} must validate: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
