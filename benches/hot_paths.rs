//! Micro-benchmarks of the per-update hot paths: reading and validating request bodies, encoding a binary COPY
//! batch, and encoding a write-ahead log record. Run with `cargo bench --bench hot_paths`.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ingest_gateway::intake::record as codec;
use ingest_gateway::model::{self, BodyFormat, LocationUpdate, Update, ValidationRules};
use ingest_gateway::pipeline::copy::encode_batch;
use time::OffsetDateTime;

fn location_json(i: usize, now: &str) -> String {
    format!(
        r#"{{"device_id":"truck-{i:06}","recorded_at":"{now}","lat":48.8566,"lon":2.3522,"speed_kmh":42.5,"heading_deg":181.0,"accuracy_m":4,"driver":"ana"}}"#
    )
}

fn parse_and_validate(body: &[u8], now: OffsetDateTime) -> Vec<LocationUpdate> {
    let raw = model::parse_body(body, BodyFormat::Json, LocationUpdate::FIELDS, 10_000).expect("valid JSON");
    model::validate_all::<LocationUpdate>(raw, &ValidationRules::with_defaults(now), now, 100).expect("valid updates")
}

fn benches(c: &mut Criterion) {
    let now = OffsetDateTime::now_utc();
    let now_text = now.format(&time::format_description::well_known::Rfc3339).unwrap();
    let one = location_json(1, &now_text);
    let thousand = format!(
        "[{}]",
        (0..1000)
            .map(|i| location_json(i, &now_text))
            .collect::<Vec<_>>()
            .join(",")
    );
    let updates = parse_and_validate(thousand.as_bytes(), now);

    let mut group = c.benchmark_group("request");
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse_and_validate_one_update", |b| {
        b.iter(|| parse_and_validate(black_box(one.as_bytes()), now))
    });
    group.throughput(Throughput::Elements(1000));
    group.bench_function("parse_and_validate_1000_updates", |b| {
        b.iter(|| parse_and_validate(black_box(thousand.as_bytes()), now))
    });
    group.finish();

    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(1000));
    let mut out = BytesMut::new();
    group.bench_function("copy_batch_1000_rows", |b| {
        b.iter(|| {
            out.clear();
            encode_batch(black_box(&updates), &mut out);
            out.len()
        })
    });
    group.bench_function("wal_record_1000_updates", |b| {
        b.iter(|| codec::encode_record(0, black_box(&updates)))
    });
    group.finish();
}

criterion_group!(hot_paths, benches);
criterion_main!(hot_paths);
