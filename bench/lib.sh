# shellcheck shell=bash
# Shared by the benchmark scripts (sourced, not run). The caller defines `die MESSAGE`, sets
# TMP (removed on exit), STARTED_PIDS (processes it started, stopped on exit by PID), and NGINX
# (for start_nginx), and installs `trap cleanup EXIT`.

# free_ports N: N distinct free loopback ports, space separated (all bound at once so they
# are distinct, then released for our servers).
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
PY
}

check_int() { # name value min max
    if ! [[ "$2" =~ ^[0-9]+$ ]] || ((10#$2 < $3 || 10#$2 > $4)); then
        die "$1 must be an integer $3..$4 (got '$2')"
    fi
}

children_of() { # direct children of a PID (nginx workers)
    local pid="$1" c line rest _state ppid
    for c in /proc/[0-9]*/stat; do
        line="$(cat "$c" 2>/dev/null)" || continue
        # field 4 is ppid; comm (field 2) may contain spaces, so cut after ')'
        rest="${line##*) }"
        read -r _state ppid _ <<<"$rest"
        if [[ "$ppid" == "$pid" ]]; then
            c="${c#/proc/}"
            echo "${c%/stat}"
        fi
    done
}

# cleanup: stop every started process (and nginx's workers) by PID, remove TMP, keep the exit
# status.
cleanup() {
    local rc=$?
    set +e
    local pid kids=() p i
    for pid in "${STARTED_PIDS[@]}"; do
        for p in $(children_of "$pid"); do kids+=("$p"); done
    done
    for pid in "${STARTED_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null
    done
    for ((i = 0; i < 50; i++)); do
        local alive=0
        for pid in "${STARTED_PIDS[@]}" "${kids[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive=1
        done
        ((alive)) || break
        sleep 0.1
    done
    for pid in "${STARTED_PIDS[@]}" "${kids[@]}"; do
        kill -KILL "$pid" 2>/dev/null
    done
    for pid in "${STARTED_PIDS[@]}"; do
        wait "$pid" 2>/dev/null
    done
    rm -rf "$TMP"
    exit "$rc"
}

# wait_http URL SECONDS [PID]: poll until the URL answers 2xx, bounded in time.
wait_http() {
    local url="$1" secs="$2" pid="${3:-}" i
    for ((i = 0; i < secs * 10; i++)); do
        if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
            return 2
        fi
        if curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

# proc_tree PID: the PID and its direct children (nginx master + workers).
proc_tree() { echo "$1"; children_of "$1"; }

# cpu_ticks_split PID: "USER SYS" clock ticks (utime, stime) of the process and its direct
# children. /proc/PID/stat already covers every thread of a process; children are added because
# nginx serves from worker processes.
cpu_ticks_split() {
    local user=0 sys=0 p line rest f
    for p in $(proc_tree "$1"); do
        line="$(cat "/proc/$p/stat" 2>/dev/null)" || continue
        rest="${line##*) }"
        # after comm: state(3) ppid(4) ... utime(14) stime(15) -> indices 11,12
        read -r -a f <<<"$rest"
        user=$((user + f[11]))
        sys=$((sys + f[12]))
    done
    echo "$user $sys"
}

# cpu_ticks PID: utime+stime of the process and its direct children, in clock ticks.
cpu_ticks() {
    local user sys
    read -r user sys < <(cpu_ticks_split "$1")
    echo $((user + sys))
}

# peak_rss_kib PID: sum of VmHWM over the process and its direct children.
peak_rss_kib() {
    local total=0 p v
    for p in $(proc_tree "$1"); do
        v="$(awk '/^VmHWM:/ {print $2}' "/proc/$p/status" 2>/dev/null || true)"
        [[ -n "$v" ]] && total=$((total + v))
    done
    echo "$total"
}

nginx_http_common() { # $1 = dir
    cat <<EOF
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    client_body_temp_path $1/tmp/client_body;
    proxy_temp_path $1/tmp/proxy;
    fastcgi_temp_path $1/tmp/fastcgi;
    uwsgi_temp_path $1/tmp/uwsgi;
    scgi_temp_path $1/tmp/scgi;
EOF
}

start_nginx() { # $1 = name, $2 = conf file, $3.. = CPU pinning prefix; sets LAST_PID
    local dir name="$1" conf="$2"
    shift 2
    dir="$(dirname "$conf")"
    "$NGINX" -t -q -p "$dir" -e "$dir/error.log" -c "$conf" >"$dir/test.log" 2>&1 ||
        { cat "$dir/test.log" >&2; die "nginx config for $name is invalid"; }
    "$@" "$NGINX" -p "$dir" -e "$dir/error.log" -c "$conf" >"$dir/stdout.log" 2>&1 &
    LAST_PID=$!
    STARTED_PIDS+=("$LAST_PID")
}

# install_packages PACKAGE...: apt-get install them; dies instead with NO_INSTALL=1 or without
# apt-get. The caller defines `log`.
install_packages() {
    [[ "${NO_INSTALL:-0}" == 1 ]] && die "missing: $* (NO_INSTALL=1 set)"
    command -v apt-get >/dev/null 2>&1 || die "missing: $* and no apt-get to install them"
    log "installing: $*"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "$@" >/dev/null
}

# need_nginx_wrk: sets NGINX, installing nginx, wrk, curl and python3 first if any is missing.
need_nginx_wrk() {
    NGINX="$(command -v nginx || true)"
    [[ -z "$NGINX" && -x /usr/sbin/nginx ]] && NGINX=/usr/sbin/nginx
    local missing=()
    [[ -n "$NGINX" ]] || missing+=(nginx)
    command -v wrk >/dev/null 2>&1 || missing+=(wrk)
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    command -v python3 >/dev/null 2>&1 || missing+=(python3)
    if ((${#missing[@]})); then
        install_packages "${missing[@]}"
        NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
    fi
    [[ -x "$NGINX" ]] || die "nginx not found after install"
    command -v wrk >/dev/null 2>&1 || die "wrk not found after install"
}

# plain_policy LISTEN_PORT BACKEND_PORT [NAME]: plain forwarding, one listener and one backend
# with every other field at its default (forwarding headers included).
plain_policy() {
    cat <<EOF
apiVersion: breakwater.io/v1alpha1
kind: ResiliencePolicy
metadata: {name: ${3:-bench}}
spec:
  listener: {port: $1, address: 127.0.0.1}
  backends:
    - {name: app, url: "http://127.0.0.1:$2"}
EOF
}

# bare_policy LISTEN_PORT BACKEND_PORT [NAME]: plain_policy adding no forwarding headers, the
# same job as an nginx `proxy_pass` or an HAProxy backend without forwarding directives.
bare_policy() {
    plain_policy "$@"
    echo "  forwarding: {addHeaders: []}"
}

# nginx_forwarding_directives: nginx `location` directives adding the forwarding headers
# breakwater adds by default (X-Forwarded-*, Forwarded, Via both ways), for like-for-like runs.
nginx_forwarding_directives() {
    cat <<'EOF'
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $host;
      proxy_set_header X-Forwarded-Port $server_port;
      proxy_set_header Forwarded "for=$remote_addr;host=$host;proto=$scheme";
      proxy_set_header Via "1.1 nginx";
      add_header Via "1.1 nginx";
EOF
}

# features_policy LISTEN_PORT BACKEND_PORT: the "all features on" policy of issue #7 (rate
# limits far above the load, breakers, retries with a budget, health checks), shared by
# compare.sh and instructions.sh so both measure the same configuration.
features_policy() {
    cat <<EOF
apiVersion: breakwater.io/v1alpha1
kind: ResiliencePolicy
metadata: {name: bench-features}
spec:
  listener: {port: $1, address: 127.0.0.1}
  backends:
    - {name: app, url: "http://127.0.0.1:$2"}
  timeouts: {connect: 1s, request: 15s, perTry: 5s, idle: 60s, requestHeader: 10s}
  retry:
    maxAttempts: 3
    backoff: {initial: 25ms, max: 1s, multiplier: 2.0, jitter: Full}
    retryOn: {connectFailure: true, reset: true, timeout: true, statusCodes: [502, 503, 504]}
    budget: {ratio: 0.2, minRetriesPerSecond: 10}
  circuitBreaker:
    enabled: true
    failureThreshold: 5
    failureRatio: 0.5
    minimumRequests: 20
    window: 10s
    successThreshold: 2
    openTimeout: 30s
    halfOpenMaxRequests: 1
    maxEjectionPercent: 50
  overload: {maxConnections: 4096, maxPendingRequests: 4096, maxConcurrentRequests: 4096}
  healthCheck: {path: /healthz, interval: 1s, timeout: 500ms, unhealthyThreshold: 3, healthyThreshold: 2}
  rateLimit:
    algorithm: TokenBucket
    global: {requestsPerSecond: 1000000, burst: 1000000}
    perClient: {requestsPerSecond: 1000000, burst: 1000000, key: {clientIp: {}}}
EOF
}
