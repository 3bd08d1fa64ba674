#!/usr/bin/env bash
# Memory and connection-count check (issue #7 targets): the proxy's RSS idle, with N idle
# keep-alive client connections open, and whether C concurrent connections under load see any
# error. Loopback only, bounded in time; ends only the processes it started.
#
# Usage: bash bench/connections.sh
# Env:
#   BREAKWATER_BIN   binary to run (default: cargo build --release, then target/release/breakwater)
#   IDLE             idle keep-alive connections to open (default 10000)
#   CONCURRENT       wrk connections for the load check (default 1000)
#   DURATION         seconds of load (default 10)
set -euo pipefail
IDLE="${IDLE:-10000}"
CONCURRENT="${CONCURRENT:-1000}"
DURATION="${DURATION:-10}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TMP="$(mktemp -d)"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT
ulimit -n $((IDLE + CONCURRENT + 4096)) 2>/dev/null || { echo "cannot raise the fd limit" >&2; exit 1; }

BIN="${BREAKWATER_BIN:-}"
if [[ -z "$BIN" ]]; then
    (cd "$ROOT" && cargo build --release --bin breakwater) >&2
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/breakwater"
fi

read -r BACKEND_PORT PROXY_PORT ADMIN_PORT < <(python3 -c '
import socket
s = [socket.socket() for _ in range(3)]
for x in s: x.bind(("127.0.0.1", 0))
print(*[x.getsockname()[1] for x in s])')

# Backend: a tiny keep-alive HTTP server (nginx when present, else python's).
if command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]]; then
    NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
    mkdir -p "$TMP/nginx"
    cat >"$TMP/nginx/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $TMP/nginx/pid; error_log $TMP/nginx/error.log;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$BACKEND_PORT backlog=4096; location / { return 200 "ok\n"; } } }
CONF
    "$NGINX" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" -e "$TMP/nginx/error.log" &
    PIDS+=($!)
else
    echo "nginx is needed for the backend (apt-get install -y nginx)" >&2
    exit 1
fi

cat >"$TMP/policy.yaml" <<YAML
apiVersion: breakwater.io/v1alpha1
kind: ResiliencePolicy
metadata: {name: conns}
spec:
  listener: {port: $PROXY_PORT, address: 127.0.0.1}
  backends: [{name: app, url: "http://127.0.0.1:$BACKEND_PORT"}]
  limits: {maxConnections: $((IDLE + CONCURRENT + 100))}
  overload: {maxConcurrentRequests: $((CONCURRENT * 2)), maxPendingRequests: $((CONCURRENT * 2)), maxConnections: 4096}
YAML
RUST_LOG=warn "$BIN" run --config "$TMP/policy.yaml" --admin-addr "127.0.0.1:$ADMIN_PORT" --workers 1 \
    >"$TMP/bw.log" 2>&1 &
BW=$!
PIDS+=("$BW")
for _ in $(seq 100); do
    curl -fsS "http://127.0.0.1:$ADMIN_PORT/ready" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -fsS "http://127.0.0.1:$PROXY_PORT/" >/dev/null || { cat "$TMP/bw.log" >&2; exit 1; }
rss() { awk '/^VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$BW/status"; }
echo "idle RSS after one request: $(rss) MiB"

# N idle keep-alive connections, each having sent one request (so the proxy holds a served,
# idle HTTP/1.1 connection, not just an accepted socket).
python3 - "$PROXY_PORT" "$IDLE" "$BW" <<'PY' &
import asyncio, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
async def one(i, held):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await w.drain()
    head = await r.readuntil(b"\r\n\r\n")
    await r.readexactly(int(head.split(b"content-length: ")[1].split(b"\r\n")[0]))
    held.append(w)
async def main():
    held = []
    sem = asyncio.Semaphore(500)
    async def guarded(i):
        async with sem:
            await one(i, held)
    await asyncio.gather(*(guarded(i) for i in range(n)))
    print(f"{len(held)} idle connections open", flush=True)
    await asyncio.sleep(30)
asyncio.run(main())
PY
HOLDER=$!
PIDS+=("$HOLDER")
for _ in $(seq 600); do
    open=$(ls "/proc/$BW/fd" 2>/dev/null | wc -l)
    ((open >= IDLE)) && break
    sleep 0.1
done
sleep 1
echo "RSS with $IDLE idle keep-alive connections: $(rss) MiB ($(ls /proc/$BW/fd | wc -l) fds)"
kill "$HOLDER" 2>/dev/null || true
wait "$HOLDER" 2>/dev/null || true

out="$(wrk -t2 -c"$CONCURRENT" -d"${DURATION}s" "http://127.0.0.1:$PROXY_PORT/" 2>&1)"
echo "$out" | grep -E 'Requests/sec|requests in|Socket errors|Non-2xx' || true
echo "$out" | grep -qE 'Socket errors|Non-2xx' && echo "ERRORS with $CONCURRENT connections" || echo "$CONCURRENT concurrent connections: zero errors"
echo "peak RSS: $(awk '/^VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$BW/status") MiB"
