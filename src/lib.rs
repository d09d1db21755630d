//! ingest-gateway: takes small JSON updates over HTTP, validates them, makes them durable and writes them into
//! PostgreSQL in batches with binary `COPY`.
//!
//! # Layout
//! The modules follow the trip an update takes. Imports point one way: `http → keys_file, intake, model,
//! secret_files`; `tcp → keys_file, intake, model`; `keys_file → model`; `intake → wal, pipeline, model, db,
//! secret_files`; `pipeline → model, db`; `model`, `db`, `wal` and `secret_files` import none of these. Three
//! modules serve the layers: `config` (imported by `http`, `tcp`, `keys_file`, `intake` and `telemetry`),
//! `metrics` (by `http`, `tcp`, `intake` and `pipeline`) and `support` (by any); `config` and `support` import
//! nothing of the crate, `metrics` only `model` (the tracker protocols and reasons its counters are labelled by).
//! Only `startup` sees everything.
//! - [`config`]: every setting, with its default, flag and `INGEST_*` environment variable.
//! - [`telemetry`]: the `tracing` subscriber (text or JSON lines).
//! - [`metrics`]: the one Prometheus registry and the per-stream metric handles.
//! - [`http`]: the transport: routes, headers, API keys at the door (access, scopes) and rate limits, body, gzip,
//!   parse and validate, then hand over to the intake and map its answer to a status. Knows nothing of the log or
//!   the queue.
//! - [`tcp`]: the hardware trackers' transport (Teltonika, GT06): TCP listeners, one task per device connection, a
//!   trait each binary protocol implements, acknowledgements sent once the records are durable. Like `http`, it
//!   hands over to the intake and reads with the model.
//! - [`keys_file`]: the API keys file both transports read: each key's hash, scope and rate, and the tracker units
//!   (`imeis=`) it lets connect.
//! - [`model`]: wire payloads → validated updates; pure, no IO.
//! - [`intake`]: transport-agnostic `submit(updates, ack)`; the accepting gate and the durability backends
//!   (memory, the write-ahead log, NATS JetStream with its shard consumers) and the feed that replays the log into
//!   the queue.
//! - [`wal`]: the write-ahead log itself: segments, frames, group commit, recovery. Imports nothing of the crate.
//! - [`pipeline`]: the bounded queue, the batching rule, the batch writers (reading from a `Source`) and the
//!   binary `COPY` encoder; one opaque `Delivery` carries a batch's checkpoints and commits.
//! - [`db`]: the connection pool, migrations, the time partitions, the embedded PostgreSQL, the committed positions
//!   of the log and of JetStream (`positions`), the JetStream shard leases (advisory locks) and the connection
//!   string with its TLS to PostgreSQL.
//! - [`secret_files`]: the files that grant access or hold secrets, refused when others may write them.
//! - [`support`]: small utilities with one home each: hex, random bytes, atomic file replacement, IO errors with
//!   their path, child processes and their signals.
//! - [`startup`]: builds everything above and runs it, as named steps (database, log, JetStream, streams,
//!   listeners, state): the data directory and its lock, HTTPS for the listeners, one generic per-stream builder,
//!   the stop sequence, and the `migrate` and `new-key` commands.

pub mod config;
pub mod db;
pub mod http;
pub mod intake;
pub mod keys_file;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod secret_files;
pub mod startup;
pub mod support;
pub mod tcp;
pub mod telemetry;
pub mod wal;
