//! ingest-gateway: takes small JSON updates over HTTP, validates them, holds them in a bounded queue and writes
//! them into PostgreSQL in batches with binary `COPY`.
//!
//! # Layout
//! - [`config`]: every setting, with its default, flag and `INGEST_*` environment variable.
//! - [`telemetry`]: the `tracing` subscriber (text or JSON lines).
//! - [`metrics`]: the one Prometheus registry and the per-stream metric handles.
//! - [`model`]: wire payloads → validated updates; pure, no IO.
//! - [`http`]: the actix-web routes (ingest, stats, metrics, health) and their error mapping.
//! - [`pipeline`]: the bounded queue, the batching rule, the batch writers and the binary `COPY` encoder.
//! - [`db`]: the connection pool, the migrations runner and the embedded PostgreSQL.
//! - [`startup`]: builds everything above and runs it; the only module that knows all others.
//! - [`shutdown`]: the stop sequence: stop HTTP → close queues → writers flush → exit.
//! - [`wal`]: the write-ahead log that makes an acknowledged update survive a crash.

pub mod config;
pub mod db;
pub mod http;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod shutdown;
pub mod startup;
pub mod telemetry;
pub mod wal;
