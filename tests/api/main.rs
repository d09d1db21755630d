//! Integration tests: the gateway in-process (and, for signals, as a real process) against a real PostgreSQL
//! that the harness starts itself.

mod backpressure;
mod batching;
mod crash;
mod durability;
mod embedded;
mod helpers;
mod hostile;
mod ingest;
mod migrations;
mod observability;
mod signals;
mod validation;
