//! The `breakwater` command line: parses arguments, sets up logging and the runtime, and calls
//! into the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use breakwater::accesslog;
use breakwater::app::{self, ProxyOptions, RunningProxy};
use breakwater::config::{self, ConfigError};
use breakwater::demo::{DemoBehaviour, spawn_backend};
use breakwater::kube::sidecar::{self, SidecarOptions};
use breakwater::logwriter::{LineWriter, WriterGuard};
use clap::{Parser, Subcommand, ValueEnum};
use k8s_openapi::api::core::v1::ResourceRequirements;

/// mimalloc rather than the system allocator: per-request buffers (hyper's 8 KiB read buffers
/// among them) are allocated and freed at a fraction of glibc's cost; measured in
/// `bench/README.md`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The policy `breakwater demo` runs when no --config is given.
const DEMO_POLICY: &str = include_str!("../examples/demo.yaml");

#[derive(Parser, Debug)]
#[command(
    name = "breakwater",
    version,
    about = "A resilience sidecar proxy: timeouts, retries, circuit breakers and rate limits in front of your service."
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "BREAKWATER_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy from a local policy file (hot-reloaded on change and on SIGHUP).
    Run(RunArgs),
    /// Check policy files offline; exit 1 listing every error with its field path.
    Validate {
        /// Files holding one or more ResiliencePolicy documents.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Run in a pod: watch ResiliencePolicies selecting this pod and their Services'
    /// EndpointSlices (in-cluster config or KUBECONFIG); policies are applied as they change.
    Sidecar(SidecarArgs),
    /// Print the ResiliencePolicy CustomResourceDefinition as YAML (what crds/ holds).
    Crd,
    /// Start local demo backends (healthy, flaky, slow) and the proxy in front of them.
    Demo {
        /// Policy file; defaults to the embedded examples/demo.yaml.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Run the cluster operator: validates every ResiliencePolicy and writes its status
    /// (leader-elected on a Lease, so several replicas are safe), and serves the sidecar
    /// injection webhook when given --webhook-cert and --webhook-key.
    Operator(Box<OperatorArgs>),
}

#[derive(clap::Args, Debug)]
struct OperatorArgs {
    /// Admin server address (/health, /ready, /metrics).
    #[arg(long, default_value = "0.0.0.0:9901", env = "BREAKWATER_ADMIN_ADDR")]
    admin_addr: SocketAddr,
    /// How long the leader may go without renewing its Lease before another replica takes over.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    lease_duration: Duration,
    /// Namespace of the Lease (the operator's own); defaults to the client's namespace.
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Name of the Lease.
    #[arg(long, default_value = breakwater::kube::operator::LEASE_NAME)]
    lease_name: String,
    /// This replica's identity in the Lease; defaults to the host name.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Address of the sidecar injection webhook (HTTPS, POST /mutate-pods). The webhook runs
    /// only when --webhook-cert and --webhook-key are given.
    #[arg(long, default_value = "0.0.0.0:9443")]
    webhook_addr: SocketAddr,
    /// PEM certificate chain the webhook serves (e.g. a kubernetes.io/tls Secret's tls.crt);
    /// re-read when it changes. Without it the webhook is off.
    #[arg(long, requires = "webhook_key")]
    webhook_cert: Option<PathBuf>,
    /// PEM private key of --webhook-cert (e.g. the Secret's tls.key).
    #[arg(long, requires = "webhook_cert")]
    webhook_key: Option<PathBuf>,
    /// Image of injected sidecars.
    #[arg(long, default_value = concat!("ghcr.io/breakwater/breakwater:", env!("CARGO_PKG_VERSION")))]
    sidecar_image: String,
    /// imagePullPolicy of injected sidecars; unset leaves the cluster's default.
    #[arg(long, value_parser = ["Always", "IfNotPresent", "Never"])]
    sidecar_image_pull_policy: Option<String>,
    /// Traffic port (container port `http`) of injected sidecars, unless the pod's
    /// breakwater.io/proxy-port annotation says otherwise.
    #[arg(long, default_value_t = 8080)]
    sidecar_proxy_port: u16,
    /// Admin port (container port `admin`, probes, /metrics) of injected sidecars.
    #[arg(long, default_value_t = 9901)]
    sidecar_admin_port: u16,
    /// Resources of injected sidecars as a Kubernetes ResourceRequirements in JSON; the pod's
    /// breakwater.io/proxy-{cpu,memory}[-limit] annotations override single values.
    /// [default: {"requests":{"cpu":"20m","memory":"16Mi"},"limits":{"memory":"64Mi"}}]
    #[arg(long, value_parser = parse_resources)]
    sidecar_resources: Option<ResourceRequirements>,
    /// An argument appended to injected sidecars' command line (repeat it for more), e.g.
    /// --sidecar-arg=--log-format --sidecar-arg=json.
    #[arg(long = "sidecar-arg", allow_hyphen_values = true)]
    sidecar_args: Vec<String>,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Policy file (one or more ResiliencePolicy YAML documents).
    #[arg(long, short = 'c', env = "BREAKWATER_CONFIG")]
    config: PathBuf,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(clap::Args, Debug)]
struct SidecarArgs {
    /// This pod's name (downward API: metadata.name).
    #[arg(long, env = "POD_NAME")]
    pod_name: String,
    /// This pod's namespace (downward API: metadata.namespace); policies are watched here.
    #[arg(long, env = "POD_NAMESPACE")]
    pod_namespace: String,
    /// How long a burst of cluster changes is collected before one snapshot is compiled.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    debounce: Duration,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(clap::Args, Debug)]
struct CommonArgs {
    /// Admin server address (/health, /ready, /metrics, /backends/health, /config).
    #[arg(long, default_value = "127.0.0.1:9901", env = "BREAKWATER_ADMIN_ADDR")]
    admin_addr: SocketAddr,
    /// Worker threads (default: one per CPU).
    #[arg(long, env = "BREAKWATER_WORKERS")]
    workers: Option<usize>,
    /// How long in-flight requests may take to finish after SIGTERM.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Time between failing readiness and closing listeners on SIGTERM (lets load balancers notice).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    shutdown_delay: Duration,
    /// How often the policy file is checked for changes (`run`), and the period of the maintenance
    /// tick: idle upstream connections reaped, rate-limit and cache metrics refreshed.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    reload_interval: Duration,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    config::units::parse_duration(text)
}

fn parse_resources(text: &str) -> Result<ResourceRequirements, String> {
    serde_json::from_str(text).map_err(|e| format!("not a ResourceRequirements object: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Held to the end of `main`: dropping it writes out the lines still queued.
    let _log_writer = match init_tracing(cli.log_format) {
        Ok(writer) => writer,
        Err(err) => {
            eprintln!("error: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Validate { files } => return validate(&files),
        Command::Crd => print_crd(),
        Command::Run(args) => run_blocking(args.common, |common| async move {
            let proxy = app::start(options(args.config, &common)).await?;
            serve_until_signal(proxy, &common).await
        }),
        Command::Sidecar(args) => run_blocking(args.common, |common| async move {
            let client = kube::Client::try_default()
                .await
                .context("creating the Kubernetes client (in-cluster config or KUBECONFIG)")?;
            let mut options = SidecarOptions::new(args.pod_namespace, args.pod_name);
            options.admin_addr = common.admin_addr;
            options.debounce = args.debounce;
            options.tick_interval = common.reload_interval;
            let sidecar = sidecar::start(client, options).await?;
            wait_for_signal().await?;
            sidecar
                .shutdown(common.shutdown_delay, common.drain_timeout)
                .await;
            Ok(())
        }),
        Command::Demo { config, common } => {
            run_blocking(common, |common| async move { demo(config, &common).await })
        }
        Command::Operator(args) => run_operator(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Log lines (the access log among them: one per request) go to stderr through a writer
/// thread that writes whatever has gathered in one call (`logwriter`), instead of one
/// `write(2)` per line on the request path. If more than 16 MiB wait to be written (stderr's
/// reader has stalled) lines are dropped rather than stall the proxy, as Envoy's access log
/// does; dropped lines are reported on exit.
fn init_tracing(format: LogFormat) -> anyhow::Result<LogWriter> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // The writer's thread starts with the first line (none while nothing is logged).
    let (writer, guard) = LineWriter::new(std::io::stderr());
    // Colours only for a person at a terminal: never into files, `kubectl logs` or collectors.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    // Access-log lines are formatted by `accesslog` and written straight to the same writer:
    // through the `fmt` layer a line cost a third of the proxy's CPU at full load.
    let json = matches!(format, LogFormat::Json);
    accesslog::install(writer.clone(), json);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(writer.clone());
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
    Ok(LogWriter {
        guard: Some(guard),
        writer,
    })
}

/// Writes out the pending log lines when dropped, and says how many lines were dropped.
struct LogWriter {
    guard: Option<WriterGuard>,
    writer: LineWriter,
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        // Joins the writer thread: every line logged so far is out before the count below.
        self.guard.take();
        let dropped = self.writer.dropped_lines();
        if dropped > 0 {
            eprintln!("breakwater: {dropped} log lines were dropped (the log writer fell behind)");
        }
    }
}

fn run_blocking<F, Fut>(common: CommonArgs, body: F) -> anyhow::Result<()>
where
    F: FnOnce(CommonArgs) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    // One worker needs no work stealing: the current-thread scheduler skips its cross-thread
    // queues and wake-ups, which is measurably cheaper per request.
    let mut runtime = match common.workers {
        Some(0) => anyhow::bail!("--workers must be at least 1"),
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(workers) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(workers);
            builder
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    runtime.enable_all();
    let runtime = runtime.build().context("starting the async runtime")?;
    runtime.block_on(body(common))
}

fn options(config: PathBuf, common: &CommonArgs) -> ProxyOptions {
    ProxyOptions {
        config,
        admin_addr: common.admin_addr,
        reload_interval: common.reload_interval,
    }
}

async fn serve_until_signal(proxy: RunningProxy, common: &CommonArgs) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the configuration");
                // Errors are logged and counted by the reload itself.
                let _ = proxy.reload().await;
            }
        }
    }
    proxy
        .shutdown(common.shutdown_delay, common.drain_timeout)
        .await;
    Ok(())
}

/// Waits for SIGTERM or SIGINT (SIGHUP is ignored: the cluster is the configuration).
async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => tracing::info!("SIGHUP ignored: the sidecar follows the cluster"),
        }
    }
}

async fn demo(config: Option<PathBuf>, common: &CommonArgs) -> anyhow::Result<()> {
    let backends = [
        ("healthy", 9001, DemoBehaviour::Healthy),
        ("flaky", 9002, DemoBehaviour::Flaky),
        ("slow", 9003, DemoBehaviour::Slow),
    ];
    for (name, port, behaviour) in backends {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        spawn_backend(addr, name, behaviour)
            .await
            .with_context(|| {
                format!("starting the {name} demo backend on {addr} (is the port free?)")
            })?;
    }
    let path = match config {
        Some(path) => path,
        None => {
            let path =
                std::env::temp_dir().join(format!("breakwater-demo-{}.yaml", std::process::id()));
            std::fs::write(&path, DEMO_POLICY)
                .with_context(|| format!("writing {}", path.display()))?;
            path
        }
    };
    let proxy = app::start(options(path.clone(), common)).await?;
    let listener = proxy
        .listener_addr("demo")
        .map_or_else(|| "the policy's listener".to_owned(), |a| a.to_string());
    let admin = proxy.admin_addr();
    println!(
        "\nBreakwater demo is running.\n\
         \n  policy file:     {}\n\
         \n  try:             curl -s http://{listener}/hello\n\
         \x20                  for i in $(seq 20); do curl -s -o /dev/null -w '%{{http_code}} ' http://{listener}/; done; echo\n\
         \n  endpoints:       curl -s http://{admin}/backends/health\n\
         \x20 metrics:         curl -s http://{admin}/metrics | grep ^proxy_\n\
         \x20 health:          curl -s http://{admin}/health\n\
         \n  backends:        healthy 127.0.0.1:9001, flaky 127.0.0.1:9002 (503 bursts), slow 127.0.0.1:9003 (300 ms)\n\
         \n  Ctrl-C stops it.\n",
        path.display()
    );
    serve_until_signal(proxy, common).await
}

fn run_operator(args: OperatorArgs) -> anyhow::Result<()> {
    use breakwater::kube::inject::InjectionConfig;
    use breakwater::kube::operator::webhook::WebhookOptions;
    use breakwater::kube::operator::{self, OperatorOptions};
    use tokio::signal::unix::{SignalKind, signal};
    anyhow::ensure!(
        args.lease_duration >= Duration::from_secs(1),
        "--lease-duration must be at least 1s (Lease durations are whole seconds)"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let client = kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API (in-cluster config or kubeconfig)")?;
        let namespace = args
            .lease_namespace
            .unwrap_or_else(|| client.default_namespace().to_owned());
        let identity = args.identity.unwrap_or_else(host_name);
        let mut options = OperatorOptions::new(identity, namespace);
        options.admin_addr = args.admin_addr;
        options.lease.duration = args.lease_duration;
        options.lease.name = args.lease_name;
        if let (Some(cert), Some(key)) = (args.webhook_cert, args.webhook_key) {
            let mut webhook = WebhookOptions::new(cert, key);
            webhook.addr = args.webhook_addr;
            let defaults = InjectionConfig::default();
            webhook.injection = InjectionConfig {
                image: args.sidecar_image,
                image_pull_policy: args.sidecar_image_pull_policy,
                admin_port: args.sidecar_admin_port,
                proxy_port: args.sidecar_proxy_port,
                resources: args.sidecar_resources.unwrap_or(defaults.resources),
                extra_args: args.sidecar_args,
                version: defaults.version,
            };
            options.webhook = Some(webhook);
        } else {
            tracing::info!("no --webhook-cert/--webhook-key: the injection webhook is off");
        }
        let mut running = operator::start(client, options).await?;
        tracing::info!(admin = %running.admin_addr(), webhook = ?running.webhook_addr(), "operator started");
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            result = running.finished() => return result.context("the operator stopped"),
        }
        running.shutdown().await;
        Ok(())
    })
}

/// The host name (a pod's name when `POD_NAME` is not set), or a per-process fallback.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("breakwater-operator-{}", std::process::id()))
}

fn print_crd() -> anyhow::Result<()> {
    print!("{}", breakwater::kube::crd_yaml()?);
    Ok(())
}

fn validate(files: &[PathBuf]) -> ExitCode {
    let mut failed = false;
    for file in files {
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(err) => {
                eprintln!("{}: cannot read: {err}", file.display());
                failed = true;
                continue;
            }
        };
        match config::load_policies(&text, &file.display().to_string()) {
            Ok(policies) => {
                let names: Vec<String> = policies.iter().map(|p| p.id.to_string()).collect();
                println!("{}: valid ({})", file.display(), names.join(", "));
            }
            Err(ConfigError::Invalid { origin, errors }) => {
                failed = true;
                for error in errors {
                    eprintln!("{origin}: {error}");
                }
            }
            Err(err) => {
                failed = true;
                eprintln!("{err}");
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
