# fleetwatch: the engine (`fleetwatch`) and the device simulator (`fleetwatch-sim`) in one image.
#
#   docker build -t fleetwatch .
#   docker run --rm -p 8080:8080 -v fleetwatch-data:/var/lib/fleetwatch \
#     -e FLEETWATCH_AMQP_URL=amqp://guest:guest@rabbitmq:5672/%2f fleetwatch
#   docker run --rm fleetwatch fleetwatch-sim --target http --http-url http://engine:8080 ...
#
# Stages: `chef` (Rust + Node, cargo-chef), `planner` (dependency recipe from the manifests),
# `builder` (dependencies first, in a layer that only changes when Cargo.toml/Cargo.lock do; then
# the web page's npm packages, into npm's cache; then the workspace), `runtime` (Debian slim, non-root).
# Works with the classic builder and BuildKit alike.

ARG RUST_IMAGE=rust:1-bookworm

# --- chef: toolchain, Node for build.rs (`npm ci` in web/), cargo-chef -------------------------
FROM ${RUST_IMAGE} AS chef
RUN apt-get update \
 && apt-get install -y --no-install-recommends nodejs npm \
 && rm -rf /var/lib/apt/lists/*
RUN cargo install cargo-chef --locked --version ^0.1
WORKDIR /src

# --- planner: a recipe of the workspace's manifests and lock file only --------------------------
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

# --- builder ---------------------------------------------------------------------------------
FROM chef AS builder
# 1. Dependencies (cached until Cargo.toml / Cargo.lock change).
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --recipe-path recipe.json
# 2. The map page's npm packages, into npm's cache (a layer cached until web/package*.json
#    change): build.rs installs them into its OUT_DIR with `npm ci --prefer-offline`, which then
#    takes them from this cache instead of the registry.
COPY web/package.json web/package-lock.json /tmp/web/
RUN cd /tmp/web && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error \
 && rm -rf /tmp/web
# 3. The workspace.
COPY . .
RUN cargo build --release --locked --bins \
 && mkdir -p /out \
 && cp target/release/fleetwatch target/release/fleetwatch-sim /out/ \
 && strip --strip-debug /out/fleetwatch /out/fleetwatch-sim

# --- runtime ---------------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 fleetwatch \
 && useradd --system --uid 10001 --gid fleetwatch --home-dir /var/lib/fleetwatch --shell /usr/sbin/nologin fleetwatch \
 && mkdir -p /var/lib/fleetwatch \
 && chown fleetwatch:fleetwatch /var/lib/fleetwatch

COPY --from=builder /out/fleetwatch /out/fleetwatch-sim /usr/local/bin/

ENV FLEETWATCH_HTTP_ADDR=0.0.0.0:8080 \
    FLEETWATCH_DATA_DIR=/var/lib/fleetwatch \
    FLEETWATCH_LOG_FORMAT=json

VOLUME ["/var/lib/fleetwatch"]
EXPOSE 8080
USER fleetwatch:fleetwatch
WORKDIR /var/lib/fleetwatch

# No curl in the slim image: bash's /dev/tcp sends a plain HTTP/1.0 GET /api/health and the
# first line of the answer must carry status 200.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${FLEETWATCH_HTTP_ADDR##*:} && printf 'GET /api/health HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && read -r status <&3 && [[ $status == *' 200 '* ]]"]

# The engine by default; `docker run IMAGE fleetwatch-sim ...` runs the simulator instead.
CMD ["fleetwatch"]
