# Container image for ingest-gateway: builds the release binary, then runs it as a non-root user with PostgreSQL 15 server binaries for the embedded mode.
#
#   docker build -t ingest-gateway .
#   docker run -p 8080:8080 -v ingest-data:/var/lib/ingest-gateway ingest-gateway          # embedded PostgreSQL
#   docker run -p 8080:8080 -e DATABASE_URL=postgres://user:pass@db/ingest ingest-gateway   # external PostgreSQL
#   docker compose up --build      # with PostgreSQL, Prometheus and Grafana (docker-compose.yml)
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

# Healthy means ready (GET /readyz): the database answers, the previous run's log is read back, no queue is above
# 90 % of its capacity and the writers have not failed for longer than INGEST_STALL_TIMEOUT. The start period covers
# the embedded PostgreSQL's first initdb. With another INGEST_LISTEN port, override the check too.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD curl -fsS -o /dev/null http://127.0.0.1:8080/readyz || exit 1

ENTRYPOINT ["ingest-gateway"]
CMD ["serve"]
