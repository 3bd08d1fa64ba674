#!/usr/bin/env bash
# Memory of the per-client rate-limit table under 1,000,000 distinct client addresses sent
# through a trusted X-Forwarded-For. Loopback only, bounded in time. See bench/README.md.
#
# Env: BREAKWATER_BIN (default: cargo build --release), MAX_KEYS (default 10000),
#      REQUESTS (default 1000000), MAX_SECONDS (default 120)
set -euo pipefail
MAX_KEYS="${MAX_KEYS:-10000}"
REQUESTS="${REQUESTS:-1000000}"
MAX_SECONDS="${MAX_SECONDS:-120}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
command -v wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
command -v nginx >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq nginx >/dev/null; }
BIN="${BREAKWATER_BIN:-}"
if [[ -z "$BIN" ]]; then
    (cd "$ROOT" && cargo build --release --quiet)
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/breakwater"
fi
TMP="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$TMP"; }
trap cleanup EXIT
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
BACKEND=$(port); PROXY=$(port); ADMIN=$(port)
mkdir -p "$TMP/nginx/logs"
cat >"$TMP/nginx/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $TMP/nginx/nginx.pid; error_log $TMP/nginx/error.log;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$BACKEND; location / { return 200 "ok\n"; } } }
CONF
nginx -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" & PIDS+=($!)
cat >"$TMP/bw.yaml" <<YAML
apiVersion: breakwater.io/v1alpha1
kind: ResiliencePolicy
metadata: {name: memory}
spec:
  listener: {port: $PROXY, address: 127.0.0.1}
  backends: [{name: app, url: "http://127.0.0.1:$BACKEND"}]
  forwarding: {trustedProxies: ["127.0.0.1/32"]}
  rateLimit:
    # A slow refill keeps every key busy (not idle) for minutes: the table must hold its bound.
    perClient: {requestsPerSecond: 0.01, burst: 5, maxKeys: $MAX_KEYS}
YAML
RUST_LOG=warn "$BIN" run --config "$TMP/bw.yaml" --admin-addr "127.0.0.1:$ADMIN" --workers 1 & BW=$!; PIDS+=($BW)
for _ in $(seq 100); do curl -fs "127.0.0.1:$ADMIN/ready" >/dev/null && break; sleep 0.1; done
rss() { awk -v k="$1" '$1==k":" {print $2}' "/proc/$BW/status"; }
BEFORE=$(rss VmRSS)
# Each request carries the next address of 10.0.0.0/8 + 100.64.0.0/10: all distinct.
cat >"$TMP/xff.lua" <<'LUA'
local n = 0
init = function(args) n = tonumber(args[1]) or 0 end
request = function()
  n = n + 1
  local a, b, c = math.floor(n / 65536) % 256, math.floor(n / 256) % 256, n % 256
  wrk.headers["X-Forwarded-For"] = string.format("10.%d.%d.%d", a, b, c)
  return wrk.format("GET", "/")
end
LUA
START=$(date +%s)
SENT=0
while (( SENT < REQUESTS && $(date +%s) - START < MAX_SECONDS )); do
    OUT=$(wrk -t1 -c32 -d5s -s "$TMP/xff.lua" "http://127.0.0.1:$PROXY/" -- "$SENT")
    SENT=$((SENT + $(echo "$OUT" | awk '/requests in/ {print $1}')))
done
sleep 1.5  # one sweep tick
METRICS=$(curl -fs "127.0.0.1:$ADMIN/metrics")
KEYS=$(echo "$METRICS" | awk '/^rate_limit_keys\{/ {print $2}')
EVICTED=$(echo "$METRICS" | awk '/^rate_limit_key_evictions_total\{/ {print $2}')
printf 'requests sent:          %s (distinct X-Forwarded-For addresses: %s)\n' "$SENT" "$SENT"
printf 'maxKeys:                %s\n' "$MAX_KEYS"
printf 'keys tracked at end:    %s\n' "${KEYS:-?}"
printf 'idle keys evicted:      %s\n' "${EVICTED:-?}"
printf 'RSS before / after:     %s KiB / %s KiB\n' "$BEFORE" "$(rss VmRSS)"
printf 'peak RSS (VmHWM):       %s KiB\n' "$(rss VmHWM)"
