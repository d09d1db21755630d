# Container image for ingest-gateway: builds the release binary, then runs it as a non-root user with PostgreSQL 15 server binaries for the embedded mode.
#
#   docker build -t ingest-gateway .
#   docker run --rm ingest-gateway new-key fleet --streams location --device-prefix truck-   # a key, and its line
#   docker run -p 8080:8080 -v ingest-data:/var/lib/ingest-gateway \
#     -v "$PWD/api-keys:/etc/ingest/api-keys:ro" -e INGEST_API_KEYS_FILE=/etc/ingest/api-keys ingest-gateway
#   docker run ... -e DATABASE_URL=postgres://user:pass@db/ingest ingest-gateway            # external PostgreSQL
#   docker compose up --build      # with PostgreSQL, Prometheus and Grafana (docker-compose.yml)
#
# The image listens on every interface of the container, so it needs API keys: without INGEST_API_KEYS_FILE it
# refuses to start, saying so. To take updates from anyone on purpose, set INGEST_ALLOW_ANONYMOUS=true. With keys,
# /metrics, /stats and the status page need the admin token (INGEST_ADMIN_TOKEN_FILE) or INGEST_ADMIN_LISTEN.
#
# A stop drains the queue for up to INGEST_SHUTDOWN_TIMEOUT (30 s): give it time, e.g. `docker stop -t 40`.

FROM rust:1-bookworm AS builder
WORKDIR /src

# Build the dependencies alone first, so that a source change does not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src \
        target/release/.fingerprint/ingest-gateway-* \
        target/release/deps/ingest_gateway-* \
        target/release/deps/libingest_gateway-* \
        target/release/ingest-gateway*

COPY . .
RUN cargo build --release --locked \
    && install -m 0755 target/release/ingest-gateway /usr/local/bin/ingest-gateway


FROM debian:bookworm-slim

# PostgreSQL server binaries for the embedded mode (used when DATABASE_URL is unset). The packaging's default
# cluster is not created: the gateway initialises its own under $INGEST_DATA_DIR/postgres. curl is for the
# HEALTHCHECK.
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates curl postgresql-common; \
    sed -ri 's/^#?\s*create_main_cluster\s*=.*/create_main_cluster = false/' /etc/postgresql-common/createcluster.conf; \
    apt-get install -y --no-install-recommends postgresql-15; \
    rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 ingest \
    && useradd --system --uid 10001 --gid ingest --home-dir /var/lib/ingest-gateway --no-create-home \
        --shell /usr/sbin/nologin ingest \
    && mkdir -p /var/lib/ingest-gateway \
    && chown ingest:ingest /var/lib/ingest-gateway \
    && chmod 0750 /var/lib/ingest-gateway

COPY --from=builder /usr/local/bin/ingest-gateway /usr/local/bin/ingest-gateway

ENV PATH="/usr/lib/postgresql/15/bin:${PATH}" \
    LANG=C.UTF-8 \
    INGEST_LISTEN=0.0.0.0:8080 \
    INGEST_DATA_DIR=/var/lib/ingest-gateway

USER 10001:10001
WORKDIR /var/lib/ingest-gateway
VOLUME ["/var/lib/ingest-gateway"]
EXPOSE 8080

# Healthy means alive (GET /healthz, which needs no token whatever the keys): a container that is alive but not
# ready (database away, replaying, queue nearly full) must not be restarted, which would only lose its place; a
# load balancer asks /readyz for readiness. The start period covers the embedded PostgreSQL's first initdb. With
# another INGEST_LISTEN port, override the check too.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD curl -fsS -o /dev/null http://127.0.0.1:8080/healthz || exit 1

ENTRYPOINT ["ingest-gateway"]
CMD ["serve"]
