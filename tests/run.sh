#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, then every test.
# Installs what it needs on a fresh machine (Rust components, varnishtest, chromium, kubernetes-validate, cargo-fuzz).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    rustup component add rustfmt clippy
fi

# tests/varnishtest.rs drives tests/vtc/*.vtc through varnishtest and fails without it. Only
# /usr/bin/varnishtest is used (the varnishd daemon the package also installs is not). The
# package lists are refreshed only when the install fails without it.
# tests/status_page.rs renders the admin status page in headless Chromium.
packages=()
[[ -x /usr/bin/varnishtest ]] || packages+=(varnish)
[[ -x /usr/bin/chromium ]] || packages+=(chromium)
if ((${#packages[@]})); then
    echo "--- installing ${packages[*]}"
    sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    apt_get() { "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -qq "$@"; }
    apt_get install -y "${packages[@]}" >/dev/null ||
        { apt_get update && apt_get install -y "${packages[@]}" >/dev/null; }
fi

# tests/manifests.rs validates manifests/ and the CRD against the Kubernetes schemas offline;
# tests/webhook.rs validates the pods the injection webhook patches the same way.
if ! python3 -m kubernetes_validate --version >/dev/null 2>&1; then
    echo "--- installing kubernetes-validate"
    python3 -m pip install --quiet kubernetes-validate
fi

echo "--- cargo fmt --check"
cargo fmt --all -- --check
echo "--- cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings
echo "--- cargo test"
cargo test --all-targets --locked

# bench/loadgen (the fixed-rate load generator of bench/compare.sh) is its own small crate.
echo "--- bench/loadgen: fmt, clippy, tests"
cargo fmt --manifest-path bench/loadgen/Cargo.toml -- --check
cargo clippy --manifest-path bench/loadgen/Cargo.toml --all-targets --locked -- -D warnings
cargo test --manifest-path bench/loadgen/Cargo.toml --locked

# Time-boxed fuzzing of the policy parser and the header code (see tests/fuzz/README.md): a
# smoke run on an unoptimised build (it compiles in a fraction of the time of an optimised
# one); FUZZ_SECONDS=0 skips it, long runs are documented in the README.
FUZZ_SECONDS="${FUZZ_SECONDS:-20}"
if [[ "$FUZZ_SECONDS" != 0 ]]; then
    command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
    for target in policy_parser request_head; do
        echo "--- cargo fuzz run $target (${FUZZ_SECONDS}s)"
        cargo fuzz run --dev --fuzz-dir tests/fuzz --sanitizer none "$target" -- \
            -max_total_time="$FUZZ_SECONDS" -print_final_stats=1
    done
fi
