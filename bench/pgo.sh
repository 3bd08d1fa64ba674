#!/usr/bin/env bash
# Profile-guided release build of breakwater: build an instrumented binary, run it on loopback
# under a training load (plain forwarding, all features with the access log, 500 connections,
# HTTP/2), merge the profile, and build again with it. The profile tells LLVM which branches
# are hot, so the request path is laid out together and cold code (errors, retries, config)
# moves away: fewer instructions and far fewer instruction-cache misses per request (figures in
# bench/README.md, "Profile-guided build"). The Dockerfile ships this build.
#
# Usage: bash bench/pgo.sh        (the optimised binary's path is the last line on stdout)
# Env:
#   CARGO_TARGET_DIR  base build directory (default ./target); the two builds use
#                     $CARGO_TARGET_DIR/pgo-generate and $CARGO_TARGET_DIR/pgo-use
#   OUT               also install the optimised binary at this path
#   TRAIN_SECONDS     seconds of load per training step (default 4)
#   LLVM_PROFDATA     llvm-profdata to merge with (default: rustup's llvm-tools, else the newest
#                     Debian llvm-NN; it must read the raw profiles of rustc's LLVM)
#   NO_INSTALL=1      never run rustup/apt-get; fail if a tool is missing
# Loopback only; every process it starts is stopped by PID on exit.
set -euo pipefail

TRAIN_SECONDS="${TRAIN_SECONDS:-4}"
NO_INSTALL="${NO_INSTALL:-0}"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"

log() { printf '[pgo] %s\n' "$*" >&2; }
die() { printf '[pgo] ERROR: %s\n' "$*" >&2; exit 1; }

# shellcheck source=bench/lib.sh
source "$SCRIPT_DIR/lib.sh"
check_int TRAIN_SECONDS "$TRAIN_SECONDS" 1 120
command -v cargo >/dev/null 2>&1 || die "cargo not found"

HOST="$(rustc -vV | sed -n 's/^host: //p')"
[[ -n "$HOST" ]] || die "cannot read the host triple from rustc -vV"
RUSTC_LLVM="$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"

# llvm-profdata: the one matching rustc (rustup's llvm-tools) is best; a Debian build from
# LLVM 19 on reads the raw profiles of newer LLVMs too (checked at merge time below).
find_profdata() {
    local sysroot candidate
    if [[ -n "${LLVM_PROFDATA:-}" ]]; then
        echo "$LLVM_PROFDATA"
        return
    fi
    sysroot="$(rustc --print sysroot)"
    candidate="$sysroot/lib/rustlib/$HOST/bin/llvm-profdata"
    [[ -x "$candidate" ]] && { echo "$candidate"; return; }
    # Newest Debian llvm-NN first.
    for candidate in $(ls -d /usr/lib/llvm-*/bin/llvm-profdata 2>/dev/null | sort -t- -k2 -n -r); do
        if [[ "$(basename "$(dirname "$(dirname "$candidate")")")" =~ ^llvm-([0-9]+)$ ]] &&
            ((BASH_REMATCH[1] >= 19)); then
            echo "$candidate"
            return
        fi
    done
}
PROFDATA="$(find_profdata)"
if [[ -z "$PROFDATA" ]]; then
    if [[ "$NO_INSTALL" != 1 ]] && command -v rustup >/dev/null 2>&1 &&
        rustup component add llvm-tools >&2 2>/dev/null; then
        PROFDATA="$(find_profdata)"
    fi
    if [[ -z "$PROFDATA" ]]; then
        install_packages llvm-19
        PROFDATA="$(find_profdata)"
    fi
fi
[[ -n "$PROFDATA" && -x "$PROFDATA" ]] ||
    die "no llvm-profdata (rustup component add llvm-tools, or apt-get install llvm-19; or set LLVM_PROFDATA)"
log "llvm-profdata: $PROFDATA (rustc's LLVM: ${RUSTC_LLVM:-unknown})"

need_nginx_wrk
# h2load is optional: without it the HTTP/2 server path is trained less.
HAVE_H2LOAD=0
command -v h2load >/dev/null 2>&1 && HAVE_H2LOAD=1

TARGET_BASE="${CARGO_TARGET_DIR:-$ROOT/target}"
[[ "$TARGET_BASE" == /* ]] || TARGET_BASE="$ROOT/$TARGET_BASE"
GEN_DIR="$TARGET_BASE/pgo-generate"
USE_DIR="$TARGET_BASE/pgo-use"

TMP="$(mktemp -d /tmp/breakwater-pgo.XXXXXX)"
STARTED_PIDS=()
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# An explicit --target keeps RUSTFLAGS off build scripts and proc macros (they would be
# instrumented and write profiles while building), and puts the binary under $HOST/.
build() { # target_dir extra_rustflags
    RUSTFLAGS="${RUSTFLAGS:-} $2" CARGO_TARGET_DIR="$1" \
        cargo build --release --locked --bin breakwater --target "$HOST" \
        --manifest-path "$ROOT/Cargo.toml" >&2
}

log "1/4 instrumented build ($GEN_DIR)"
mkdir -p "$TMP/profiles"
build "$GEN_DIR" "-Cprofile-generate=$TMP/profiles" || die "instrumented build failed"
GEN_BIN="$GEN_DIR/$HOST/release/breakwater"
[[ -x "$GEN_BIN" ]] || die "instrumented binary not found at $GEN_BIN"

log "2/4 training on loopback (${TRAIN_SECONDS}s per step)"
if (($(ulimit -n) < 4096)); then
    ulimit -n 4096 2>/dev/null || log "open-file limit $(ulimit -n): the 500-connection step may see errors"
fi
read -r BACKEND PLAIN PLAIN_ADMIN FEAT FEAT_ADMIN < <(free_ports 5)
mkdir -p "$TMP/backend/tmp"
cat >"$TMP/backend/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $TMP/backend/nginx.pid;
error_log $TMP/backend/error.log warn;
events { worker_connections 4096; }
http {
$(nginx_http_common "$TMP/backend")
    server {
        listen 127.0.0.1:$BACKEND backlog=4096;
        location / { default_type text/plain; return 200 "ok\n"; }
    }
}
EOF
start_nginx backend "$TMP/backend/nginx.conf"
wait_http "http://127.0.0.1:$BACKEND/" 10 "$LAST_PID" || die "backend nginx did not start"

plain_policy "$PLAIN" "$BACKEND" pgo-plain >"$TMP/plain.yaml"
features_policy "$FEAT" "$BACKEND" >"$TMP/features.yaml"

# Each process writes its own profile when it exits (%p: PID).
export LLVM_PROFILE_FILE="$TMP/profiles/breakwater-%p.profraw"
RUST_LOG=warn "$GEN_BIN" run --config "$TMP/plain.yaml" --admin-addr "127.0.0.1:$PLAIN_ADMIN" \
    --workers 1 >"$TMP/plain.log" 2>&1 &
PLAIN_PID=$!
STARTED_PIDS+=("$PLAIN_PID")
RUST_LOG=info "$GEN_BIN" run --config "$TMP/features.yaml" --admin-addr "127.0.0.1:$FEAT_ADMIN" \
    --workers 1 >"$TMP/features.log" 2>&1 &
FEAT_PID=$!
STARTED_PIDS+=("$FEAT_PID")
unset LLVM_PROFILE_FILE
wait_http "http://127.0.0.1:$PLAIN_ADMIN/ready" 20 "$PLAIN_PID" ||
    { tail -n 20 "$TMP/plain.log" >&2; die "instrumented breakwater (plain) did not start"; }
wait_http "http://127.0.0.1:$FEAT_ADMIN/ready" 20 "$FEAT_PID" ||
    { tail -n 20 "$TMP/features.log" >&2; die "instrumented breakwater (features) did not start"; }

train() { # description command...
    log "  $1"
    shift
    timeout --kill-after=5 $((TRAIN_SECONDS + 30)) "$@" >"$TMP/train.out" 2>&1 ||
        { cat "$TMP/train.out" >&2; die "training step failed: $*"; }
}
train "plain, 32 connections" wrk -t1 -c32 -d"${TRAIN_SECONDS}s" "http://127.0.0.1:$PLAIN/"
train "all features + access log, 32 connections" \
    wrk -t1 -c32 -d"${TRAIN_SECONDS}s" "http://127.0.0.1:$FEAT/"
train "plain, 500 connections" wrk -t1 -c500 -d"${TRAIN_SECONDS}s" "http://127.0.0.1:$PLAIN/"
if ((HAVE_H2LOAD)); then
    train "HTTP/2, 32 connections x 10 streams" \
        h2load -c32 -m10 -D "$TRAIN_SECONDS" "http://127.0.0.1:$PLAIN/"
else
    log "  h2load not found: HTTP/2 step skipped"
fi
for admin in "$PLAIN_ADMIN" "$FEAT_ADMIN"; do
    curl -fsS -o /dev/null --max-time 5 "http://127.0.0.1:$admin/metrics" ||
        die "instrumented breakwater did not serve /metrics"
done

# The profile is written at exit: stop both gracefully and wait for them.
for pid in "$PLAIN_PID" "$FEAT_PID"; do kill -TERM "$pid"; done
for pid in "$PLAIN_PID" "$FEAT_PID"; do
    wait "$pid" || die "instrumented breakwater (pid $pid) did not exit cleanly on SIGTERM"
done
STARTED_PIDS=("${STARTED_PIDS[@]:0:1}") # only the backend is left to stop
shopt -s nullglob
profiles=("$TMP"/profiles/breakwater-*.profraw)
shopt -u nullglob
((${#profiles[@]} == 2)) || die "expected 2 raw profiles, found ${#profiles[@]}"

log "3/4 merging ${#profiles[@]} profiles"
mkdir -p "$USE_DIR"
MERGED="$USE_DIR/breakwater.profdata"
"$PROFDATA" merge -o "$MERGED" "${profiles[@]}" >&2 ||
    die "$PROFDATA could not merge the profiles (it must read the raw format of rustc's LLVM ${RUSTC_LLVM:-?}: use rustup's llvm-tools or a newer llvm-NN)"

log "4/4 optimised build ($USE_DIR)"
build "$USE_DIR" "-Cprofile-use=$MERGED" || die "profile-guided build failed"
BIN="$USE_DIR/$HOST/release/breakwater"
[[ -x "$BIN" ]] || die "optimised binary not found at $BIN"
"$BIN" --version >/dev/null || die "the optimised binary does not run"
if [[ -n "${OUT:-}" ]]; then
    install -D -m 0755 "$BIN" "$OUT"
    BIN="$OUT"
fi
log "done: $BIN"
echo "$BIN"
