#!/usr/bin/env bash
# Benchmark harness: breakwater vs nginx as a reverse proxy in front of the
# same fast nginx backend, on 127.0.0.1 only. See bench/README.md.
#
# Usage: bash bench/run.sh
# Env:
#   DURATION        seconds of load per measured run (default 10)
#   ROUNDS          interleaved rounds per proxy (default 3)
#   WARMUP          seconds of unmeasured load per proxy before round 1 (default 2, 0 = off)
#   CONNECTIONS     wrk connections (default 32)
#   BREAKWATER_BIN  use this binary instead of `cargo build --release`
#   ONLY_NGINX=1    skip breakwater entirely (build, start, measure)
#   BASELINE=1      also measure the backend directly (no proxy), as a reference row
#   NO_INSTALL=1    never run apt-get; fail if nginx/wrk are missing
#   PIN=0           do not pin CPUs (default on 2+ CPUs: proxies on the last CPU, backend and
#                   wrk on the others, so the proxy under test never competes for its core)
set -euo pipefail

DURATION="${DURATION:-10}"
ROUNDS="${ROUNDS:-3}"
WARMUP="${WARMUP:-2}"
CONNECTIONS="${CONNECTIONS:-32}"
ONLY_NGINX="${ONLY_NGINX:-0}"
NO_INSTALL="${NO_INSTALL:-0}"
BASELINE="${BASELINE:-0}"
WRK_THREADS=1
PIN="${PIN:-1}"
PIN_PROXY=()
PIN_LOAD=()
if [[ "$PIN" == 1 ]] && command -v taskset >/dev/null 2>&1 && (($(nproc) >= 2)); then
    LAST_CPU=$(($(nproc) - 1))
    PIN_PROXY=(taskset -c "$LAST_CPU")
    PIN_LOAD=(taskset -c "0-$((LAST_CPU - 1))")
fi

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
RESULTS_DIR="$SCRIPT_DIR/results"

log() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] ERROR: %s\n' "$*" >&2; exit 1; }

# shellcheck source=bench/lib.sh
source "$SCRIPT_DIR/lib.sh"

check_int DURATION "$DURATION" 1 300
check_int ROUNDS "$ROUNDS" 1 20
check_int WARMUP "$WARMUP" 0 60
check_int CONNECTIONS "$CONNECTIONS" 1 1000

# ---------------------------------------------------------------------------
# Dependencies
# ---------------------------------------------------------------------------
need_nginx_wrk
OHA="$(command -v oha || true)"
CLK_TCK="$(getconf CLK_TCK)"

# ---------------------------------------------------------------------------
# Process bookkeeping and cleanup
# ---------------------------------------------------------------------------
TMP="$(mktemp -d /tmp/breakwater-bench.XXXXXX)"
STARTED_PIDS=()

trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------
# Ports: ask the kernel for free loopback ports (all held open at once so
# they are distinct), then release them for our servers.
# ---------------------------------------------------------------------------
read -r BACKEND_PORT NGINX_PORT BW_PORT ADMIN_PORT NGINX_FWD_PORT < <(free_ports 5)
log "ports: backend=$BACKEND_PORT nginx-proxy=$NGINX_PORT nginx-fwd=$NGINX_FWD_PORT breakwater=$BW_PORT admin=$ADMIN_PORT"

nginx_common() { # $1 = dir
    cat <<EOF
worker_processes 1;
daemon off;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 4096; }
EOF
}

# ---------------------------------------------------------------------------
# Backend: nginx returning "ok\n"
# ---------------------------------------------------------------------------
B="$TMP/backend"
mkdir -p "$B/tmp"
{
    nginx_common "$B"
    echo "http {"
    nginx_http_common "$B"
    cat <<EOF
    server {
        listen 127.0.0.1:$BACKEND_PORT backlog=4096;
        location / {
            default_type text/plain;
            return 200 "ok\n";
        }
    }
}
EOF
} >"$B/nginx.conf"
start_nginx backend "$B/nginx.conf" "${PIN_LOAD[@]}"
BACKEND_PID=$LAST_PID
wait_http "http://127.0.0.1:$BACKEND_PORT/" 10 "$BACKEND_PID" ||
    { cat "$B/error.log" >&2 2>/dev/null || true; die "backend nginx did not become ready"; }

# ---------------------------------------------------------------------------
# Peer proxy: nginx with keepalive upstream
# ---------------------------------------------------------------------------
P="$TMP/nginx-proxy"
mkdir -p "$P/tmp"
{
    nginx_common "$P"
    echo "http {"
    nginx_http_common "$P"
    cat <<EOF
    upstream backend {
        server 127.0.0.1:$BACKEND_PORT;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT backlog=4096;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
    # The same proxy doing the header work breakwater's default policy does: X-Forwarded-*,
    # RFC 7239 Forwarded, Via both ways, the client's Host kept. This is the like-for-like peer.
    server {
        listen 127.0.0.1:$NGINX_FWD_PORT backlog=4096;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
EOF
    nginx_forwarding_directives
    cat <<EOF
        }
    }
}
EOF
} >"$P/nginx.conf"
start_nginx nginx-proxy "$P/nginx.conf" "${PIN_PROXY[@]}"
NGINX_PID=$LAST_PID
wait_http "http://127.0.0.1:$NGINX_PORT/" 10 "$NGINX_PID" ||
    { cat "$P/error.log" >&2 2>/dev/null || true; die "nginx peer proxy did not become ready"; }
[[ "$(curl -fsS --max-time 2 "http://127.0.0.1:$NGINX_PORT/")" == "ok" ]] ||
    die "nginx peer proxy did not return the backend's body"

# ---------------------------------------------------------------------------
# breakwater
# ---------------------------------------------------------------------------
PROXIES=()
declare -A PROXY_PID PROXY_PORT
if [[ "$BASELINE" == 1 ]]; then
    PROXIES+=(backend)
    PROXY_PID[backend]=$BACKEND_PID
    PROXY_PORT[backend]=$BACKEND_PORT
fi
PROXIES+=(nginx nginx-fwd)
PROXY_PID[nginx]=$NGINX_PID
PROXY_PORT[nginx]=$NGINX_PORT
# One nginx process serves both peer configurations (two server blocks, one worker).
PROXY_PID[nginx-fwd]=$NGINX_PID
PROXY_PORT[nginx-fwd]=$NGINX_FWD_PORT
BW_VERSION="(skipped)"

if [[ "$ONLY_NGINX" != 1 ]]; then
    if [[ -n "${BREAKWATER_BIN:-}" ]]; then
        BIN="$BREAKWATER_BIN"
    else
        command -v cargo >/dev/null 2>&1 || die "cargo not found (set BREAKWATER_BIN or ONLY_NGINX=1)"
        log "building breakwater (cargo build --release)"
        (cd "$ROOT" && cargo build --release --bin breakwater) >&2 ||
            die "cargo build --release failed"
        TD="${CARGO_TARGET_DIR:-target}"
        [[ "$TD" == /* ]] || TD="$ROOT/$TD"
        BIN="$TD/release/breakwater"
    fi
    [[ -x "$BIN" ]] || die "breakwater binary not found or not executable: $BIN"
    BW_VERSION="$( (timeout 5 "$BIN" --version 2>/dev/null || true) | sed -n 1p)"

    plain_policy "$BW_PORT" "$BACKEND_PORT" >"$TMP/bw.yaml"
    RUST_LOG=warn "${PIN_PROXY[@]}" "$BIN" run --config "$TMP/bw.yaml" --admin-addr "127.0.0.1:$ADMIN_PORT" --workers 1 \
        >"$TMP/bw.log" 2>&1 &
    BW_PID=$!
    STARTED_PIDS+=("$BW_PID")
    rc=0
    wait_http "http://127.0.0.1:$ADMIN_PORT/ready" 10 "$BW_PID" || rc=$?
    if ((rc != 0)); then
        log "---- breakwater output (last 40 lines) ----"
        tail -n 40 "$TMP/bw.log" >&2 || true
        log "-------------------------------------------"
        if ((rc == 2)); then
            die "breakwater exited before becoming ready (binary: $BIN)"
        fi
        die "breakwater did not report ready on http://127.0.0.1:$ADMIN_PORT/ready within 10 s (binary: $BIN)"
    fi
    body="$(curl -sS --max-time 2 "http://127.0.0.1:$BW_PORT/" 2>&1 || true)"
    [[ "$body" == "ok" ]] ||
        die "breakwater is ready but GET / through it did not return the backend's 'ok' (got: ${body:0:200})"
    PROXIES+=(breakwater)
    PROXY_PID[breakwater]=$BW_PID
    PROXY_PORT[breakwater]=$BW_PORT
fi

# ---------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------
WRK_TIMEOUT=$((DURATION + 30))
RAW="$TMP/rounds.tsv"
: >"$RAW"

run_wrk() { # $1 = port, $2 = duration, $3 = output file
    timeout --kill-after=5 "$WRK_TIMEOUT" \
        "${PIN_LOAD[@]}" wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"$2"s --latency "http://127.0.0.1:$1/" >"$3" 2>&1 ||
        { cat "$3" >&2; die "wrk failed against port $1"; }
}

if ((WARMUP > 0)); then
    for name in "${PROXIES[@]}"; do
        log "warm-up $name (${WARMUP}s)"
        run_wrk "${PROXY_PORT[$name]}" "$WARMUP" "$TMP/warmup-$name.txt"
    done
fi

for ((r = 1; r <= ROUNDS; r++)); do
    for name in "${PROXIES[@]}"; do
        pid="${PROXY_PID[$name]}"
        kill -0 "$pid" 2>/dev/null || die "$name (pid $pid) is no longer running"
        out="$TMP/wrk-$name-$r.txt"
        log "round $r/$ROUNDS: $name (${DURATION}s, ${CONNECTIONS} connections)"
        t0="$(cpu_ticks "$pid")"
        run_wrk "${PROXY_PORT[$name]}" "$DURATION" "$out"
        t1="$(cpu_ticks "$pid")"
        rss="$(peak_rss_kib "$pid")"
        kill -0 "$pid" 2>/dev/null || die "$name (pid $pid) died during round $r"
        printf '%s\t%d\t%d\t%d\t%s\n' "$name" "$r" "$((t1 - t0))" "$rss" "$out" >>"$RAW"
    done
done

OHA_OUT=""
if [[ -n "$OHA" ]]; then
    for name in "${PROXIES[@]}"; do
        log "oha cross-check: $name (${DURATION}s)"
        oha_file="$TMP/oha-$name.txt"
        if timeout --kill-after=5 "$WRK_TIMEOUT" "$OHA" -z "${DURATION}s" -c "$CONNECTIONS" --no-tui \
            "http://127.0.0.1:${PROXY_PORT[$name]}/" >"$oha_file" 2>&1; then
            OHA_OUT+=$'\n'"---- oha cross-check: $name ----"$'\n'"$(head -n 40 "$oha_file")"
        else
            log "oha failed against $name (ignored)"
        fi
    done
fi

# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------
mkdir -p "$RESULTS_DIR"
WRK_VERSION="$( (wrk --version 2>&1 || true) | awk 'NR == 1 {print $1, $2}')"
NGINX_VERSION="$("$NGINX" -v 2>&1 || true)"
HEADER="breakwater benchmark  $(date -u +%Y-%m-%dT%H:%M:%SZ)
host: $(nproc) CPUs, $(uname -sr); $NGINX_VERSION; $WRK_VERSION
breakwater: $BW_VERSION
load: wrk -t$WRK_THREADS -c$CONNECTIONS -d${DURATION}s --latency, ${ROUNDS} interleaved round(s), warm-up ${WARMUP}s
backend: nginx 1 worker, return 200 \"ok\\n\"; proxies: nginx 1 worker (upstream keepalive 64; nginx-fwd = the same adding breakwater's forwarding headers) vs breakwater --workers 1
CPU: utime+stime from /proc (process + child processes), CLK_TCK=$CLK_TCK
pinning: ${PIN_PROXY[*]:-none} for the proxies, ${PIN_LOAD[*]:-none} for backend and wrk"

REPORT="$(python3 - "$RAW" "$CLK_TCK" <<'PY'
import re, statistics, sys

raw_path, clk = sys.argv[1], int(sys.argv[2])
UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}

def to_ms(s):
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", s.strip())
    if not m:
        raise ValueError(f"unparseable latency {s!r}")
    return float(m.group(1)) * UNIT[m.group(2)]

def parse_wrk(path):
    text = open(path).read()
    d = {}
    m = re.search(r"Requests/sec:\s+([0-9.]+)", text)
    if not m:
        raise SystemExit(f"could not parse Requests/sec from {path}:\n{text}")
    d["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in ([0-9.]+\w+),", text)
    d["requests"] = int(m.group(1))
    for pct in ("50", "99"):
        m = re.search(rf"^\s*{pct}(?:\.0+)?%\s+(\S+)", text, re.M)
        d["p" + pct] = to_ms(m.group(1))
    errs = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        errs += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        errs += int(m.group(1))
    d["errors"] = errs
    return d

rows = []
for line in open(raw_path):
    name, rnd, ticks, rss, path = line.rstrip("\n").split("\t")
    d = parse_wrk(path)
    cpu_s = int(ticks) / clk
    d.update(name=name, round=int(rnd), cpu_s=cpu_s, rss_mib=int(rss) / 1024,
             rpc=(d["requests"] / cpu_s) if cpu_s > 0 else float("nan"))
    rows.append(d)

order = []
for r in rows:
    if r["name"] not in order:
        order.append(r["name"])

med = {}
for n in order:
    rs = [r for r in rows if r["name"] == n]
    med[n] = {k: statistics.median(r[k] for r in rs)
              for k in ("rps", "p50", "p99", "rpc", "cpu_s")}
    med[n]["rss_mib"] = max(r["rss_mib"] for r in rs)
    med[n]["errors"] = sum(r["errors"] for r in rs)

out = []
hdr = f"{'proxy':<12}{'req/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'req/CPU-s':>12}{'CPU s':>8}{'peak RSS MiB':>14}{'errors':>8}"
out.append("medians over rounds")
out.append(hdr)
out.append("-" * len(hdr))
for n in order:
    m = med[n]
    out.append(f"{n:<12}{m['rps']:>12.0f}{m['p50']:>10.3f}{m['p99']:>10.3f}{m['rpc']:>12.0f}"
               f"{m['cpu_s']:>8.2f}{m['rss_mib']:>14.1f}{m['errors']:>8d}")
for peer in ("nginx", "nginx-fwd"):
    if peer not in med or "breakwater" not in med:
        continue
    a, b = med["breakwater"], med[peer]
    # Ratios within each round (the runs closest in time) are less exposed to drift in the
    # machine's speed than the ratio of the medians; both are shown.
    per_round = [
        ra["rpc"] / rb["rpc"]
        for ra in rows if ra["name"] == "breakwater"
        for rb in rows if rb["name"] == peer and rb["round"] == ra["round"] and rb["rpc"] > 0
    ]
    label = f"breakwater/{peer}"
    out.append("")
    out.append(f"{label:<21}req/CPU-s ratio: {a['rpc'] / b['rpc']:.3f}  (higher is better)"
               + (f"; median of per-round ratios {statistics.median(per_round):.3f}"
                  f" (range {min(per_round):.2f}-{max(per_round):.2f})" if per_round else ""))
    out.append(f"{label:<21}p99 ratio:       {a['p99'] / b['p99']:.3f}  (lower is better)")
    out.append(f"{label:<21}req/s ratio:     {a['rps'] / b['rps']:.3f}")
out.append("")
out.append("per round")
out.append(f"{'round':<7}{'proxy':<12}{'req/s':>12}{'requests':>11}{'p50 ms':>10}{'p99 ms':>10}{'CPU s':>8}{'req/CPU-s':>12}{'errors':>8}")
for r in sorted(rows, key=lambda r: (r["round"], order.index(r["name"]))):
    out.append(f"{r['round']:<7}{r['name']:<12}{r['rps']:>12.0f}{r['requests']:>11d}{r['p50']:>10.3f}"
               f"{r['p99']:>10.3f}{r['cpu_s']:>8.2f}{r['rpc']:>12.0f}{r['errors']:>8d}")
if any(r["errors"] for r in rows):
    out.append("")
    out.append("WARNING: some runs had socket errors or non-2xx responses (see 'errors').")
print("\n".join(out))
PY
)"

{
    echo "$HEADER"
    echo
    echo "$REPORT"
    if [[ -n "$OHA_OUT" ]]; then echo "$OHA_OUT"; fi
} | tee "$RESULTS_DIR/latest.txt"
log "written to ${RESULTS_DIR#"$ROOT"/}/latest.txt"
