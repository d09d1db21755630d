//! Fuzzes the location stream: any bytes, read as a JSON or NDJSON body, then validated.
#![no_main]

mod common;

use ingest_gateway::model::LocationUpdate;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| common::parse_and_validate::<LocationUpdate>(data));
