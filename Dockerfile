# syntax=docker/dockerfile:1
# Breakwater image: one static-enough binary on a distroless base.
#
#   docker build -t breakwater:dev .
#   docker run --rm breakwater:dev --version
#
# No container engine runs on the project's build machines, so this image is not built by our
# CI. Its build step is `bench/pgo.sh`, the same script the benchmarks build with: a release
# build instrumented for profiling, a short training load on loopback (nginx as the backend,
# wrk as the client), then `cargo build --release --locked` again with that profile. The profile
# cuts instructions per proxied request by about a fifth (bench/README.md, "Profile-guided
# build"). `rustup component add llvm-tools` gives the llvm-profdata matching the image's rustc.
#
# The runtime image has no shell and no package manager, runs as the distroless `nonroot` user
# (UID/GID 65532) and writes nothing to its filesystem, so it works with
# `readOnlyRootFilesystem: true`. It is ~30 MB (glibc + libgcc from distroless/cc, plus the
# binary). Cached cargo registries and the target directory make rebuilds incremental.

FROM rust:1-bookworm AS build
RUN apt-get update && \
    apt-get install -y --no-install-recommends nginx wrk nghttp2-client curl python3 && \
    rm -rf /var/lib/apt/lists/* && \
    rustup component add llvm-tools
WORKDIR /src
# Manifests first: the dependency layer is rebuilt only when they change.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY examples ./examples
COPY crds ./crds
COPY bench ./bench
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    NO_INSTALL=1 OUT=/out/breakwater bash bench/pgo.sh

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/breakwater /usr/local/bin/breakwater
USER 65532:65532
# 8080: the default traffic port of a policy; 9901: the admin port (health, metrics, status page).
EXPOSE 8080 9901
ENTRYPOINT ["/usr/local/bin/breakwater"]
# In a pod the chart passes `sidecar` or `operator`; standalone, mount a policy file:
#   docker run -v $PWD/policy.yaml:/etc/breakwater/policy.yaml:ro breakwater:dev \
#     run --config /etc/breakwater/policy.yaml --admin-addr 0.0.0.0:9901
CMD ["run", "--config", "/etc/breakwater/policy.yaml", "--admin-addr", "0.0.0.0:9901"]
