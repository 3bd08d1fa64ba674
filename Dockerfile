# syntax=docker/dockerfile:1
# Breakwater image: one static-enough binary on a distroless base.
#
#   docker build -t breakwater:dev .
#   docker run --rm breakwater:dev --version
#
# No container engine runs on the project's build machines, so this image is not built by our
# CI; the file is kept simple: its build step is exactly `cargo build --release --locked`.
#
# The runtime image has no shell and no package manager, runs as the distroless `nonroot` user
# (UID/GID 65532) and writes nothing to its filesystem, so it works with
# `readOnlyRootFilesystem: true`. It is ~30 MB (glibc + libgcc from distroless/cc, plus the
# binary). Cached cargo registries and the target directory make rebuilds incremental.

FROM rust:1-bookworm AS build
WORKDIR /src
# Manifests first: the dependency layer is rebuilt only when they change.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY examples ./examples
COPY crds ./crds
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin breakwater && \
    install -D -m 0755 target/release/breakwater /out/breakwater

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
