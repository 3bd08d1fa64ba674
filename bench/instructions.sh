#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind: breakwater against nginx
# (plain `proxy_pass`, and with the same forwarding headers breakwater adds) in front of the same
# nginx backend. Unlike CPU time, instruction counts barely move with load on the machine, so
# this is the figure to compare revisions by on a shared VM. It counts user-space work only
# (the proxies make the same system calls per request: two reads and two writes).
#
# Usage: bash bench/instructions.sh
# Env:
#   BREAKWATER_BIN   binary to measure (default: the profile-guided build of bench/pgo.sh, the
#                    one the Dockerfile ships; PGO=0: cargo build --release)
#   DURATION         seconds of wrk load per proxy, after a 1 s warm-up (default 5)
#   CONNECTIONS      wrk connections (default 32)
#   BW_POLICY        breakwater's configuration: plain (default; every field at its default, so
#                    it adds the forwarding headers, as nginx-fwd does), bare (plain adding no
#                    forwarding headers, as plain nginx does), features
#                    (issue #7's "all features on": rate limits, breakers, retries with a budget,
#                    health checks) or features-log (the same with the access log on, written
#                    to a file; the log writer thread is counted too)
#   PROFILE_OUT      if set, breakwater's callgrind dump is copied there, for
#                    `callgrind_annotate --inclusive=yes PROFILE_OUT`
# Loopback only; every process it starts is stopped by PID on exit.
set -euo pipefail

DURATION="${DURATION:-5}"
CONNECTIONS="${CONNECTIONS:-32}"
[[ "$DURATION" =~ ^[0-9]+$ ]] && ((DURATION >= 1 && DURATION <= 120)) ||
    { echo "DURATION must be 1-120" >&2; exit 2; }
BW_POLICY="${BW_POLICY:-plain}"
[[ "$BW_POLICY" =~ ^(plain|bare|features|features-log)$ ]] ||
    { echo "BW_POLICY must be plain, bare, features or features-log" >&2; exit 2; }
[[ "$CONNECTIONS" =~ ^[0-9]+$ ]] && ((CONNECTIONS >= 1 && CONNECTIONS <= 1000)) ||
    { echo "CONNECTIONS must be 1-1000" >&2; exit 2; }

root="$(cd "$(dirname "$0")/.." && pwd)"
for tool in nginx wrk valgrind callgrind_control callgrind_annotate curl python3; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install nginx wrk valgrind curl)" >&2; exit 1; }
done
if [[ -z "${BREAKWATER_BIN:-}" ]]; then
    if [[ "${PGO:-1}" == 1 ]]; then
        BREAKWATER_BIN="$(bash "$root/bench/pgo.sh" | tail -n1)"
    else
        (cd "$root" && cargo build --release --locked -q)
        BREAKWATER_BIN="${CARGO_TARGET_DIR:-$root/target}/release/breakwater"
    fi
fi

die() { echo "instructions.sh: $*" >&2; exit 1; }
# shellcheck source=bench/lib.sh
source "$root/bench/lib.sh"
TMP="$(mktemp -d)"
STARTED_PIDS=()
trap cleanup EXIT

read -r backend plain fwd bw admin < <(free_ports 5)

# nginx_head NAME: one nginx process (no master, so callgrind sees the worker) with its own pid
# file, error log and temp paths under TMP; the caller adds the servers and closes `http`.
nginx_head() {
    cat <<EOF
worker_processes 1; master_process off; daemon off;
pid $TMP/$1.pid; error_log $TMP/$1.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  client_body_temp_path $TMP; proxy_temp_path $TMP; fastcgi_temp_path $TMP;
  uwsgi_temp_path $TMP; scgi_temp_path $TMP;
EOF
}

{
    nginx_head backend
    cat <<EOF
  server { listen 127.0.0.1:$backend; location / { return 200 "ok\n"; } } }
EOF
} >"$TMP/backend.conf"
# Two servers: plain, and with the forwarding headers breakwater adds (X-Forwarded-*,
# Forwarded, Via both ways).
{
    nginx_head proxy
    cat <<EOF
  upstream backend { server 127.0.0.1:$backend; keepalive 64; keepalive_requests 1000000; }
  server { listen 127.0.0.1:$plain; location / { proxy_pass http://backend;
      proxy_http_version 1.1; proxy_set_header Connection ""; } }
  server { listen 127.0.0.1:$fwd; location / { proxy_pass http://backend;
      proxy_http_version 1.1; proxy_set_header Connection "";
EOF
    nginx_forwarding_directives
    echo "  } } }"
} >"$TMP/proxy.conf"
if [[ "$BW_POLICY" == plain ]]; then
    plain_policy "$bw" "$backend" >"$TMP/bw.yaml"
elif [[ "$BW_POLICY" == bare ]]; then
    bare_policy "$bw" "$backend" >"$TMP/bw.yaml"
else
    features_policy "$bw" "$backend" >"$TMP/bw.yaml"
fi
bw_log_level=warn
[[ "$BW_POLICY" == features-log ]] && bw_log_level=info

# up URL: waits up to 30 s for URL to answer 2xx.
up() { wait_http "$1" 30 || die "no answer from $1"; }

nginx -p "$TMP" -c "$TMP/backend.conf" -e "$TMP/backend.err" & STARTED_PIDS+=($!)
up "http://127.0.0.1:$backend/"

# Runs wrk against URL while callgrind counts PID (dumping to PREFIX.N); prints the requests
# and the instructions counted for them.
measure() {
    local pid=$1 url=$2 prefix=$3
    wrk -t1 -c"$CONNECTIONS" -d1s "$url" >/dev/null
    callgrind_control -z "$pid" >/dev/null 2>&1
    local requests
    requests=$(timeout $((DURATION + 30)) wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" "$url" |
        awk '/requests in/ {print $1}')
    callgrind_control -d "$pid" >/dev/null 2>&1
    sleep 0.5
    local dump total
    # Each dump goes to PREFIX.N; the newest is this run's.
    dump=$(ls -t "$prefix".* 2>/dev/null | head -1)
    total=$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",","",$1); print $1}')
    echo "$requests $total"
}

valgrind --tool=callgrind --callgrind-out-file="$TMP/nginx.cg" \
    nginx -p "$TMP" -c "$TMP/proxy.conf" -e "$TMP/proxy.err" 2>"$TMP/nginx.vg" & STARTED_PIDS+=($!)
nginx_pid=$!
up "http://127.0.0.1:$plain/"
read -r n_plain i_plain < <(measure "$nginx_pid" "http://127.0.0.1:$plain/" "$TMP/nginx.cg")
read -r n_fwd i_fwd < <(measure "$nginx_pid" "http://127.0.0.1:$fwd/" "$TMP/nginx.cg")

RUST_LOG="$bw_log_level" valgrind --tool=callgrind --callgrind-out-file="$TMP/bw.cg" \
    "$BREAKWATER_BIN" run --config "$TMP/bw.yaml" --admin-addr "127.0.0.1:$admin" --workers 1 \
    >"$TMP/bw.log" 2>&1 & STARTED_PIDS+=($!)
bw_pid=$!
up "http://127.0.0.1:$admin/ready"
read -r n_bw i_bw < <(measure "$bw_pid" "http://127.0.0.1:$bw/" "$TMP/bw.cg")
if [[ -n "${PROFILE_OUT:-}" ]]; then
    cp "$(ls -t "$TMP"/bw.cg.* | head -1)" "$PROFILE_OUT"
fi

echo "breakwater policy: $BW_POLICY"
python3 - "$n_plain" "$i_plain" "$n_fwd" "$i_fwd" "$n_bw" "$i_bw" <<'EOF'
import sys
n_plain, i_plain, n_fwd, i_fwd, n_bw, i_bw = map(int, sys.argv[1:])
rows = [("nginx", n_plain, i_plain), ("nginx-fwd", n_fwd, i_fwd), ("breakwater", n_bw, i_bw)]
print(f"{'proxy':<12}{'requests':>10}{'instructions':>16}{'per request':>13}")
per = {}
for name, n, i in rows:
    per[name] = i / n if n else float("nan")
    print(f"{name:<12}{n:>10}{i:>16}{per[name]:>13.0f}")
print(f"breakwater/nginx     instructions per request: {per['breakwater'] / per['nginx']:.2f} (lower is better)")
print(f"breakwater/nginx-fwd instructions per request: {per['breakwater'] / per['nginx-fwd']:.2f}")
EOF
