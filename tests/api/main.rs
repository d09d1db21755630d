//! Integration tests: the gateway in-process (and, for signals, as a real process) against a real PostgreSQL
//! that the harness starts itself.

mod abuse;
mod attack;
mod auth;
mod backpressure;
mod batching;
mod budget;
// Shared with the model's property tests, which are a binary of their own.
#[path = "../cases/mod.rs"]
mod cases;
mod crash;
mod dead_letters;
mod durability;
mod embedded;
mod exposure;
mod gt06;
mod hardening;
mod helpers;
mod hostile;
mod hostile_memory;
mod ingest;
mod jetstream;
mod migrations;
mod nats_trust;
mod observability;
mod openapi;
mod partitions;
mod pg_cost;
mod positions;
mod progress;
mod replicas;
mod scopes;
mod signals;
mod stalls;
mod status_page;
mod tcp_units;
mod teltonika;
mod tls;
mod tracker_crash;
// The trackers' own requests, kept apart from the cases the model's property tests share.
#[path = "../cases/trackers.rs"]
mod tracker_cases;
mod trackers;
mod unix_socket;
mod validation;
