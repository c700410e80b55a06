# syntax=docker/dockerfile:1
#
# keywatch's image: `docker build -t keywatch .` (docker-compose.yml builds it).
# The binary is the entrypoint: `docker run keywatch replay -`, `... token NAME`;
# with no arguments it runs the service (`keywatch run`).

# ---------------------------------------------------------------- build ---
FROM rust:1.95-bookworm AS builder

# rdkafka (default-features = false, features tokio + libz) builds librdkafka
# from source with its own ./configure (mklove) and make: a C/C++ toolchain,
# make, pkg-config and zlib's headers. No cmake (no cmake-build feature) and
# no OpenSSL (no ssl feature; HTTPS and SMTP TLS use rustls). The rust image
# already has all of these; naming them keeps the build honest if it changes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        build-essential pkg-config zlib1g-dev python3 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# The workspace: the root package and every member of [workspace] members
# (tests/compose.rs checks this list against Cargo.toml).
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY detectors ./detectors
COPY sim ./sim
COPY ingest ./ingest
COPY storage ./storage
COPY alerting ./alerting

# Caches survive between builds (BuildKit); the binary is copied out of the
# cached target directory so the next stage can take it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin keywatch \
    && cp target/release/keywatch /usr/local/bin/keywatch

# -------------------------------------------------------------- runtime ---
FROM debian:bookworm-slim

# ca-certificates for HTTPS receivers and SMTP over TLS; libz (zlib1g) is
# already in the base image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Non-root. /var/lib/keywatch is its home and the Parquet lake's volume
# (a new named volume takes this ownership).
RUN groupadd --system --gid 10001 keywatch \
    && useradd --system --uid 10001 --gid keywatch --home-dir /var/lib/keywatch \
        --shell /usr/sbin/nologin keywatch \
    && mkdir -p /var/lib/keywatch /etc/keywatch \
    && chown keywatch:keywatch /var/lib/keywatch

COPY --from=builder /usr/local/bin/keywatch /usr/local/bin/keywatch
COPY keywatch.example.toml /etc/keywatch/keywatch.example.toml

USER keywatch:keywatch
WORKDIR /var/lib/keywatch
# In a container the feed must listen beyond loopback to be published.
ENV KEYWATCH__FEED__LISTEN=0.0.0.0:8787 \
    KEYWATCH__PIPELINE__PARQUET_DIR=/var/lib/keywatch/lake
EXPOSE 8787

ENTRYPOINT ["keywatch"]
CMD ["run"]
