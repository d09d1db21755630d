//! The benchmark's output: summary table, targets with PASS/MISS, and the Markdown report.
//!
//! Each variant is reported by its best figures over the rounds; the ratios against the targets are computed for
//! each durability mode; the table goes to stdout and the report next to the chart.

use std::fmt::Write as _;

use crate::endurance::{RampOutcome, SoakOutcome};
use crate::plot::format_rate;
use crate::variants::{Kind, Measurement, Shape, Variant};

/// Peak resident memory the gateway should stay under, at saturation, in every mode and request size.
pub const MAX_GATEWAY_RSS_MB: f64 = 64.0;
/// Gateway CPU per landed row (single updates) ÷ the HTTP ceiling's CPU per request, at most, per durability mode:
/// what the gateway's work costs beyond answering the same request.
const MAX_COST_RATIO: [(&str, f64); 2] = [("wal", 1.3), ("memory", 1.1)];
/// Gateway CPU per landed row with 1000-update requests, at most (µs).
const MAX_BATCH_MICROS_PER_ROW: f64 = 1.5;
/// PostgreSQL's CPU per landed row with 1000-update requests ÷ the sink ceiling's (a bare binary COPY into the
/// same table), at most: what the batch write costs the database beyond the rows themselves.
const MAX_PG_OVER_SINK: f64 = 1.5;
/// PostgreSQL's CPU per landed row with single updates in `wal` mode, at most (µs).
const MAX_SINGLE_PG_MICROS_PER_ROW: f64 = 4.0;
/// `?ack=commit` with single updates: updates committed per second, at least, and p99, at most (ms).
const MIN_COMMIT_ACK_RATE: f64 = 10_000.0;
const MAX_COMMIT_ACK_P99_MS: f64 = 20.0;
/// `wal` single updates: p50 at most (ms): a request waits about one fsync.
const MAX_WAL_P50_MS: f64 = 0.5;
/// `wal` rows landed/s ÷ `memory` rows landed/s in the same run, at least: what the log's durability costs.
const MIN_WAL_OVER_MEMORY: f64 = 0.85;
/// A tracker route's gateway CPU per landed row ÷ the native route's in the same mode and run, at most: OsmAnd
/// (one fix per GET) against single updates, Overland (200 per request) against 1000-update requests. What reading
/// a client's own protocol may cost beyond the native JSON.
const MAX_TRACKER_COST_RATIO: f64 = 1.1;
/// Teltonika units over TCP (1000 connections, 10 records a packet, each waiting for its answer): the gateway's CPU
/// per landed row ÷ with 1000-update native requests, same mode and run, at most. A binary packet is cheaper to read
/// than JSON, which pays for the small packets and the connections.
const MAX_TELTONIKA_COST_RATIO: f64 = 1.0;

/// A variant and its runs, with the figures that are reported.
pub struct Summary<'a> {
    pub variant: &'a Variant,
    pub runs: Vec<&'a Measurement>,
    /// The best of each figure over the rounds: the highest rates, the lowest latencies, and — the conservative
    /// side for targets on them — the highest peak memory and error counts; CPU, rows and the chart's line come
    /// from the round with the most rows landed per second. Interference from other processes only ever makes
    /// rates lower and latencies higher, so on a shared machine the best of each is the nearest to the truth,
    /// for ceilings and gateway alike.
    pub best: Measurement,
    /// The lowest and highest share of the CPU other processes took in a round of this variant.
    pub others_range: (f64, f64),
}

pub fn summarize<'a>(variants: &'a [Variant], measurements: &'a [(usize, Measurement)]) -> Vec<Summary<'a>> {
    variants
        .iter()
        .enumerate()
        .filter_map(|(index, variant)| {
            let runs: Vec<&Measurement> = measurements
                .iter()
                .filter(|(i, _)| *i == index)
                .map(|(_, m)| m)
                .collect();
            let top = runs
                .iter()
                .copied()
                .max_by(|a, b| a.rows_per_sec.total_cmp(&b.rows_per_sec))?;
            let mut best = top.clone();
            let max = |f: fn(&Measurement) -> Option<f64>| runs.iter().filter_map(|m| f(m)).reduce(f64::max);
            let min = |f: fn(&Measurement) -> Option<f64>| runs.iter().filter_map(|m| f(m)).reduce(f64::min);
            best.accepted_rows_per_sec = max(|m| m.accepted_rows_per_sec);
            best.peak_rss_kib = runs.iter().filter_map(|m| m.peak_rss_kib).max();
            if let Some(wrk) = best.wrk.as_mut() {
                wrk.requests_per_sec = max(|m| m.wrk.as_ref().map(|w| w.requests_per_sec)).unwrap_or(0.0);
                wrk.p50_ms = min(|m| m.wrk.as_ref().map(|w| w.p50_ms)).unwrap_or(0.0);
                wrk.p99_ms = min(|m| m.wrk.as_ref().map(|w| w.p99_ms)).unwrap_or(0.0);
                wrk.max_ms = min(|m| m.wrk.as_ref().map(|w| w.max_ms)).unwrap_or(0.0);
                if let Some(worst) = runs
                    .iter()
                    .filter_map(|m| m.wrk.as_ref())
                    .max_by_key(|w| w.failed + w.socket_errors)
                {
                    wrk.failed = worst.failed;
                    wrk.socket_errors = worst.socket_errors;
                    wrk.failed_detail = worst.failed_detail.clone();
                }
            }
            let others_range = (
                min(|m| Some(m.others_cpu_share)).unwrap_or(0.0),
                max(|m| Some(m.others_cpu_share)).unwrap_or(0.0),
            );
            Some(Summary {
                variant,
                runs,
                best,
                others_range,
            })
        })
        .collect()
}

/// Which way a target points.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    AtLeast(f64),
    AtMost(f64),
    /// A figure that is shown, not judged: it never passes or misses.
    Reported,
}

/// One figure checked against its target.
pub struct Check {
    pub what: String,
    pub value: Option<f64>,
    pub target: Target,
    pub unit: &'static str,
}

impl Check {
    pub fn passed(&self) -> Option<bool> {
        let v = self.value?;
        match self.target {
            Target::AtLeast(t) => Some(v >= t),
            Target::AtMost(t) => Some(v <= t),
            Target::Reported => None,
        }
    }

    fn verdict(&self) -> &'static str {
        match (self.passed(), self.target) {
            (Some(true), _) => "PASS",
            (Some(false), _) => "MISS",
            (None, Target::Reported) if self.value.is_some() => "reported",
            (None, _) => "—",
        }
    }

    fn target_text(&self) -> String {
        match self.target {
            Target::AtLeast(t) if self.unit == "/s" => format!("≥ {}/s", format_rate(t)),
            Target::AtLeast(t) => format!("≥ {t}{}", self.unit),
            Target::AtMost(t) => format!("≤ {t}{}", self.unit),
            Target::Reported => "—".to_owned(),
        }
    }

    fn value_text(&self) -> String {
        match self.value {
            Some(v) if self.unit.is_empty() => format!("{v:.2}"),
            Some(v) if self.unit == "/s" => format!("{}/s", format_rate(v)),
            Some(v) => format!("{v:.1}{}", self.unit),
            None => "not measured".to_owned(),
        }
    }
}

fn find<'a>(summaries: &'a [Summary<'a>], pred: impl Fn(&Kind) -> bool) -> Option<&'a Measurement> {
    summaries.iter().find(|s| pred(&s.variant.kind)).map(|s| &s.best)
}

fn is_gateway(kind: &Kind, want_shape: Shape, want_mode: &Option<String>) -> bool {
    matches!(kind, Kind::Gateway { shape, durability, .. } if *shape == want_shape && durability == want_mode)
}

fn p99(m: &Measurement) -> Option<f64> {
    m.wrk.as_ref().map(|w| w.p99_ms)
}

fn p50(m: &Measurement) -> Option<f64> {
    m.wrk.as_ref().map(|w| w.p50_ms)
}

/// Gateway CPU per landed row (single updates) ÷ HTTP ceiling CPU per request in a durability mode (`None`: the
/// default one), and the two figures: what `--max-cost-ratio` checks.
pub fn cost_ratio(summaries: &[Summary], mode: Option<&str>) -> Option<(f64, f64, f64)> {
    let ceiling = find(summaries, |k| *k == Kind::HttpCeiling).and_then(server_micros_per_row)?;
    let gateway = find(summaries, |k| match k {
        Kind::Gateway {
            shape: Shape::Single,
            durability,
            default_mode,
        } => match mode {
            Some(mode) => durability.as_deref() == Some(mode),
            None => *default_mode,
        },
        _ => false,
    })
    .and_then(server_micros_per_row)?;
    Some((ratio(Some(gateway), Some(ceiling))?, gateway, ceiling))
}

/// PostgreSQL's CPU per landed row with 1000-update requests (`None`: the default mode) ÷ the sink ceiling's, and
/// the two figures: what `--max-pg-cost-ratio` checks.
pub fn pg_cost_ratio(summaries: &[Summary], mode: Option<&str>) -> Option<(f64, f64, f64)> {
    let sink = find(summaries, |k| *k == Kind::SinkCeiling).and_then(pg_micros_per_row)?;
    let gateway = find(summaries, |k| match k {
        Kind::Gateway {
            shape: Shape::Batch1000,
            durability,
            default_mode,
        } => match mode {
            Some(mode) => durability.as_deref() == Some(mode),
            None => *default_mode,
        },
        _ => false,
    })
    .and_then(pg_micros_per_row)?;
    Some((ratio(Some(gateway), Some(sink))?, gateway, sink))
}

fn pg_micros_per_row(m: &Measurement) -> Option<f64> {
    micros_per_row(Some(m.pg_cpu_secs), m.rows)
}

/// What each landed row cost the whole system, by process: the server under test (each of its processes), the
/// sink ceiling's psql processes (they do the writer's part), and PostgreSQL. The load generator is left out.
fn cost_parts(variant: &Variant, m: &Measurement) -> Vec<(&'static str, f64)> {
    let mut parts: Vec<(&'static str, f64)> = match (&variant.kind, m.cpu_parts.is_empty()) {
        (Kind::SinkCeiling, _) => m.load_cpu_secs.map(|s| ("psql", s)).into_iter().collect(),
        (_, false) => m.cpu_parts.clone(),
        (Kind::HttpCeiling, true) => m.cpu_secs.map(|s| ("HTTP server", s)).into_iter().collect(),
        (Kind::NaiveBaseline, true) => m.cpu_secs.map(|s| ("naive server", s)).into_iter().collect(),
        (_, true) => m.cpu_secs.map(|s| ("gateway", s)).into_iter().collect(),
    };
    if variant.kind != Kind::HttpCeiling {
        parts.push(("PostgreSQL", m.pg_cpu_secs));
    }
    parts
}

/// Whole-system CPU microseconds per landed row: the sum of [`cost_parts`].
fn whole_micros_per_row(variant: &Variant, m: &Measurement) -> Option<f64> {
    let secs: f64 = cost_parts(variant, m).iter().map(|(_, s)| s).sum();
    micros_per_row(Some(secs), m.rows)
}

/// One line per variant: where each µs of a landed row goes.
pub fn where_the_micros_go(summaries: &[Summary]) -> String {
    let mut out = String::new();
    for s in summaries {
        let m = &s.best;
        if m.rows == 0 {
            continue;
        }
        let parts: Vec<String> = cost_parts(s.variant, m)
            .iter()
            .map(|(what, secs)| format!("{what} {:.1}", secs * 1e6 / m.rows as f64))
            .collect();
        let _ = writeln!(
            out,
            "- {}: {} = **{} µs** a row",
            s.variant.name,
            parts.join(" + "),
            opt(whole_micros_per_row(s.variant, m), 1)
        );
    }
    out
}

/// CPU microseconds of the server under test per row it landed (the HTTP ceiling: per update it parsed).
fn server_micros_per_row(m: &Measurement) -> Option<f64> {
    micros_per_row(m.cpu_secs, m.rows)
}

/// CPU seconds spread over rows, in microseconds per row; `None` without CPU figures or rows.
fn micros_per_row(cpu_secs: Option<f64>, rows: u64) -> Option<f64> {
    match cpu_secs {
        Some(secs) if rows > 0 => Some(secs * 1e6 / rows as f64),
        _ => None,
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// The targets, for each durability mode the gateway was measured in.
pub fn checks(summaries: &[Summary]) -> Vec<Check> {
    let ceiling = find(summaries, |k| *k == Kind::HttpCeiling);
    let sink = find(summaries, |k| *k == Kind::SinkCeiling);
    let naive = find(summaries, |k| *k == Kind::NaiveBaseline);
    let mut modes: Vec<Option<String>> = Vec::new();
    for s in summaries {
        if let Kind::Gateway { durability, .. } = &s.variant.kind {
            if !modes.contains(durability) {
                modes.push(durability.clone());
            }
        }
    }
    let mut checks = Vec::new();
    let single_in =
        |mode: &str| find(summaries, |k| is_gateway(k, Shape::Single, &Some(mode.to_owned()))).map(|m| m.rows_per_sec);
    if let (Some(wal), Some(memory)) = (single_in("wal"), single_in("memory")) {
        checks.push(Check {
            what: "gateway single: wal rows landed/s ÷ memory rows landed/s".to_owned(),
            value: ratio(Some(wal), Some(memory)),
            target: Target::AtLeast(MIN_WAL_OVER_MEMORY),
            unit: "",
        });
    }
    for mode in &modes {
        let label = |shape: &str| match mode {
            Some(m) => format!("gateway {shape}, {m}"),
            None => format!("gateway {shape}"),
        };
        let single = find(summaries, |k| is_gateway(k, Shape::Single, mode));
        let batch = find(summaries, |k| is_gateway(k, Shape::Batch1000, mode));
        let rows = |m: Option<&Measurement>| m.map(|m| m.rows_per_sec);
        if single.is_some() {
            checks.push(Check {
                what: format!("{} rows/s ÷ HTTP ceiling rows/s", label("single")),
                value: ratio(rows(single), rows(ceiling)),
                target: Target::AtLeast(0.75),
                unit: "",
            });
            checks.push(Check {
                what: format!("{} p99 ÷ HTTP ceiling p99", label("single")),
                value: ratio(single.and_then(p99), ceiling.and_then(p99)),
                target: Target::AtMost(2.0),
                unit: "",
            });
            // What the gateway's work costs beyond answering the same request: the ceiling's CPU per request is
            // the HTTP layer's share, the rest is the queue, the log and the COPY encoding.
            let (gateway_us, ceiling_us) = (
                single.and_then(server_micros_per_row),
                ceiling.and_then(server_micros_per_row),
            );
            let cost_target = MAX_COST_RATIO
                .iter()
                .find(|(m, _)| mode.as_deref() == Some(*m))
                .map_or(Target::Reported, |(_, t)| Target::AtMost(*t));
            checks.push(Check {
                what: format!(
                    "{} CPU per landed row ÷ HTTP ceiling CPU per request ({} ÷ {} µs)",
                    label("single"),
                    opt(gateway_us, 1),
                    opt(ceiling_us, 1)
                ),
                value: ratio(gateway_us, ceiling_us),
                target: cost_target,
                unit: "",
            });
            if mode.as_deref() == Some("wal") {
                checks.push(Check {
                    what: format!("{} p50", label("single")),
                    value: single.and_then(p50),
                    target: Target::AtMost(MAX_WAL_P50_MS),
                    unit: " ms",
                });
            }
        }
        if mode.as_deref() == Some("wal") && single.is_some() {
            checks.push(Check {
                what: format!("{} PostgreSQL CPU per landed row", label("single")),
                value: single.and_then(pg_micros_per_row),
                target: Target::AtMost(MAX_SINGLE_PG_MICROS_PER_ROW),
                unit: " µs",
            });
        }
        if batch.is_some() && sink.is_some() {
            let (gateway_us, sink_us) = (batch.and_then(pg_micros_per_row), sink.and_then(pg_micros_per_row));
            checks.push(Check {
                what: format!(
                    "{} PostgreSQL CPU per landed row ÷ sink ceiling's ({} ÷ {} µs)",
                    label("1000/request"),
                    opt(gateway_us, 1),
                    opt(sink_us, 1)
                ),
                value: ratio(gateway_us, sink_us),
                target: Target::AtMost(MAX_PG_OVER_SINK),
                unit: "",
            });
        }
        if batch.is_some() {
            checks.push(Check {
                what: format!("{} CPU per landed row", label("1000/request")),
                value: batch.and_then(server_micros_per_row),
                target: Target::AtMost(MAX_BATCH_MICROS_PER_ROW),
                unit: " µs",
            });
            checks.push(Check {
                what: format!("{} rows/s ÷ sink ceiling rows/s", label("1000/request")),
                value: ratio(rows(batch), rows(sink)),
                target: Target::AtLeast(0.8),
                unit: "",
            });
        }
        // Each tracker route against the native route with the nearest request size, both per landed row.
        for (tracker_shape, native_shape, native, target) in [
            (Shape::Osmand, Shape::Single, single, MAX_TRACKER_COST_RATIO),
            (Shape::Overland200, Shape::Batch1000, batch, MAX_TRACKER_COST_RATIO),
            (Shape::Teltonika, Shape::Batch1000, batch, MAX_TELTONIKA_COST_RATIO),
        ] {
            let Some(tracker) = find(summaries, |k| is_gateway(k, tracker_shape, mode)) else {
                continue;
            };
            let (tracker_us, native_us) = (server_micros_per_row(tracker), native.and_then(server_micros_per_row));
            checks.push(Check {
                what: format!(
                    "{} CPU per landed row ÷ {} CPU per landed row ({} ÷ {} µs)",
                    label(tracker_shape.label()),
                    native_shape.label(),
                    opt(tracker_us, 1),
                    opt(native_us, 1)
                ),
                value: ratio(tracker_us, native_us),
                target: Target::AtMost(target),
                unit: "",
            });
            if tracker_shape == Shape::Teltonika {
                checks.push(Check {
                    what: format!(
                        "{}: gateway RSS with the {} connections open, after the load",
                        label(tracker_shape.label()),
                        crate::teltonika::UNITS
                    ),
                    value: tracker.connections_rss_kib.map(|k| k as f64 / 1024.0),
                    target: Target::Reported,
                    unit: " MB",
                });
            }
        }
        if single.is_some() && naive.is_some() {
            checks.push(Check {
                what: format!("{} rows/s ÷ naive baseline rows/s", label("single")),
                value: ratio(rows(single), rows(naive)),
                target: Target::AtLeast(5.0),
                unit: "",
            });
        }
        let commit = find(summaries, |k| is_gateway(k, Shape::SingleCommit, mode));
        if let Some(c) = commit {
            let name = label("single ?ack=commit");
            checks.push(Check {
                what: format!("{name}: updates committed/s"),
                value: Some(c.rows_per_sec),
                target: Target::AtLeast(MIN_COMMIT_ACK_RATE),
                unit: "/s",
            });
            checks.push(Check {
                what: format!("{name}: p50"),
                value: p50(c),
                target: Target::Reported,
                unit: " ms",
            });
            checks.push(Check {
                what: format!("{name}: p99"),
                value: p99(c),
                target: Target::AtMost(MAX_COMMIT_ACK_P99_MS),
                unit: " ms",
            });
        }
        let tracker = |shape: Shape| find(summaries, |k| is_gateway(k, shape, mode));
        for (shape, m) in [
            (Shape::Single, single),
            (Shape::Batch1000, batch),
            (Shape::SingleCommit, commit),
            (Shape::Osmand, tracker(Shape::Osmand)),
            (Shape::Overland200, tracker(Shape::Overland200)),
            (Shape::Teltonika, tracker(Shape::Teltonika)),
        ] {
            if let Some(m) = m {
                checks.push(Check {
                    what: format!("{} peak RSS", label(shape.label())),
                    value: m.peak_rss_kib.map(|k| k as f64 / 1024.0),
                    target: Target::AtMost(MAX_GATEWAY_RSS_MB),
                    unit: " MB",
                });
            }
        }
    }
    checks
}

/// The soak's targets: memory that does not grow, and nothing acknowledged missing.
pub fn soak_checks(soak: &SoakOutcome) -> Vec<Check> {
    let label = mode_label("soak", soak.durability.as_deref());
    vec![
        Check {
            what: format!(
                "{label}: RSS growth over {:.0} min at {:.0} % of saturation",
                soak_minutes(soak),
                soak.load * 100.0
            ),
            value: soak.rss_growth_percent(),
            target: Target::AtMost(5.0),
            unit: " %",
        },
        Check {
            what: format!("{label}: acknowledged updates missing from the table"),
            value: Some(soak.missing() as f64),
            target: Target::AtMost(0.0),
            unit: "",
        },
        Check {
            what: format!("{label}: peak RSS"),
            value: Some(soak.peak_rss_kib as f64 / 1024.0),
            target: Target::AtMost(MAX_GATEWAY_RSS_MB),
            unit: " MB",
        },
    ]
}

/// The ramp's targets: every check passes, p99 under 50 ms.
pub fn ramp_checks(ramp: &RampOutcome) -> Vec<Check> {
    let label = mode_label("ramp 50 → 500 users", ramp.durability.as_deref());
    vec![
        Check {
            what: format!("{label}: k6 checks passed"),
            value: ramp.checks_percent(),
            target: Target::AtLeast(100.0),
            unit: " %",
        },
        Check {
            what: format!("{label}: p99"),
            value: Some(ramp.p99_ms),
            target: Target::AtMost(50.0),
            unit: " ms",
        },
        Check {
            what: format!("{label}: updates answered 202 missing from the table"),
            value: Some(ramp.updates_accepted.saturating_sub(ramp.rows) as f64),
            target: Target::AtMost(0.0),
            unit: "",
        },
    ]
}

fn mode_label(what: &str, durability: Option<&str>) -> String {
    match durability {
        Some(mode) => format!("{what}, {mode}"),
        None => what.to_owned(),
    }
}

fn soak_minutes(soak: &SoakOutcome) -> f64 {
    soak.windows.iter().map(|w| w.wrk.duration_secs).sum::<f64>() / 60.0
}

/// The soak's section of the report: its settings, and each window's rate, latency and memory.
pub fn soak_section(soak: &SoakOutcome) -> String {
    let mut out = String::from("\n## Soak\n\n");
    let _ = writeln!(
        out,
        "The gateway ({}) was driven unpaced, after a warm-up, to find its saturation with single updates \
         ({:.0} req/s), then held at {:.0} % of it for {:.1} minutes: wrk with a pause before each request, set \
         again after each window from the rate the last one reached. RSS is read after each window; growth is from \
         the first window to the last. After the load the gateway drained its queues ({:.1} s), stopped on SIGTERM \
         (exit {:?}) and the table was counted.\n",
        soak.durability.as_deref().unwrap_or("default settings"),
        soak.saturation_rps,
        soak.load * 100.0,
        soak_minutes(soak),
        soak.drain_secs,
        soak.exit_code,
    );
    let _ = writeln!(
        out,
        "- mean rate {:.0} req/s (target {:.0}); acknowledged {} updates, table {} rows, missing {}; peak RSS {:.1} MB\n",
        soak.mean_rps(),
        soak.saturation_rps * soak.load,
        soak.acknowledged,
        soak.rows,
        soak.missing(),
        soak.peak_rss_kib as f64 / 1024.0
    );
    out.push_str("| at s | pause ms | req/s | p50 ms | p99 ms | max ms | non-202 / socket errors | RSS MB |\n");
    out.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for w in &soak.windows {
        let _ = writeln!(
            out,
            "| {:.0} | {:.2} | {:.0} | {:.2} | {:.2} | {:.1} | {} / {} | {:.1} |",
            w.at_secs,
            w.delay_ms,
            w.wrk.requests_per_sec,
            w.wrk.p50_ms,
            w.wrk.p99_ms,
            w.wrk.max_ms,
            w.wrk.failed,
            w.wrk.socket_errors,
            w.rss_kib as f64 / 1024.0
        );
    }
    for n in &soak.notes {
        let _ = writeln!(out, "\n- note: {n}");
    }
    out
}

/// The ramp's section of the report.
pub fn ramp_section(ramp: &RampOutcome) -> String {
    let mut out = String::from("\n## Ramp (k6)\n\n");
    let _ = writeln!(
        out,
        "`k6 run loadtest/ramp.js` (stage durations × {}) against a fresh gateway ({}): 50 → 500 users over 4 \
         minutes, 500 for 4, down over 2; each user posts a fix (every 10th time 100 of them) and sleeps 0.5–1.5 s. \
         k6 exited with {:?}{}.\n",
        ramp.scale,
        ramp.durability.as_deref().unwrap_or("default settings"),
        ramp.k6_exit,
        ramp.html_report
            .as_ref()
            .map(|f| format!("; its HTML report: [{f}]({f})"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "- requests {}; checks {} passed, {} failed; p99 {:.2} ms, max {:.1} ms; updates answered 202 {}, rows in \
         the table {}; gateway peak RSS {:.1} MB",
        ramp.requests,
        ramp.checks_passed,
        ramp.checks_failed,
        ramp.p99_ms,
        ramp.max_ms,
        ramp.updates_accepted,
        ramp.rows,
        ramp.peak_rss_kib as f64 / 1024.0
    );
    for n in &ramp.notes {
        let _ = writeln!(out, "- note: {n}");
    }
    out
}

/// Gateway single-update rows/s ÷ HTTP ceiling rows/s in a durability mode (`None`: the default one): what
/// `--min-ceiling-ratio` checks.
pub fn ceiling_ratio(summaries: &[Summary], mode: Option<&str>) -> Option<f64> {
    let ceiling = find(summaries, |k| *k == Kind::HttpCeiling)?;
    let gateway = find(summaries, |k| match k {
        Kind::Gateway {
            shape: Shape::Single,
            durability,
            default_mode,
        } => match mode {
            Some(mode) => durability.as_deref() == Some(mode),
            None => *default_mode,
        },
        _ => false,
    })?;
    ratio(Some(gateway.rows_per_sec), Some(ceiling.rows_per_sec))
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map(|v| format!("{v:.decimals$}")).unwrap_or_else(|| "—".to_owned())
}

fn row(variant: &Variant, m: &Measurement, with_round: bool, others: Option<(f64, f64)>) -> String {
    let name = &variant.name;
    let wrk = m.wrk.as_ref();
    // The sink ceiling's CPU s is its psql processes', which are its load: counted there, not twice.
    let server_us = match variant.kind {
        Kind::SinkCeiling => None,
        _ => server_micros_per_row(m),
    };
    let errors = wrk
        .map(|w| {
            let mut text = format!("{} / {}", w.failed, w.socket_errors);
            if !w.failed_detail.is_empty() {
                text.push(' ');
                text.push_str(&w.failed_detail);
            }
            text
        })
        .unwrap_or_else(|| "—".to_owned());
    let round = if with_round {
        format!(" {} | {:.1} |", m.round, m.landed_secs)
    } else {
        String::new()
    };
    format!(
        "| {name} |{round} {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {} | {} | {} | {} | {} | {} |",
        format_rate(m.rows_per_sec),
        m.accepted_rows_per_sec
            .map(format_rate)
            .unwrap_or_else(|| "—".to_owned()),
        wrk.map(|w| format_rate(w.requests_per_sec))
            .unwrap_or_else(|| "—".to_owned()),
        opt(wrk.map(|w| w.p50_ms), 2),
        opt(wrk.map(|w| w.p99_ms), 2),
        opt(wrk.map(|w| w.max_ms), 1),
        errors,
        opt(m.peak_rss_kib.map(|k| k as f64 / 1024.0), 1),
        opt(m.cpu_secs, 1),
        m.pg_cpu_secs,
        m.rows,
        opt(server_us, 1),
        opt(micros_per_row(Some(m.pg_cpu_secs), m.rows), 1),
        opt(whole_micros_per_row(variant, m), 1),
        opt(micros_per_row(m.load_cpu_secs, m.rows), 1),
        match others {
            Some((low, high)) if (high - low) * 100.0 >= 0.5 => format!("{:.0}–{:.0}", low * 100.0, high * 100.0),
            _ => format!("{:.0}", m.others_cpu_share * 100.0),
        },
    )
}

const HEADER: &str = "rows landed/s | accepted/s | req/s | p50 ms | p99 ms | max ms | failed / socket errors | \
                      peak RSS MB | CPU s | PostgreSQL CPU s | rows | CPU µs/row | PostgreSQL µs/row | \
                      whole system µs/row | load generator µs/row | others' CPU %";
/// Columns of [`HEADER`].
const COLUMNS: usize = 16;

/// The table of each variant's best figures.
pub fn results_table(summaries: &[Summary]) -> String {
    let mut out = format!("| variant | {HEADER} |\n|---|{}\n", "---:|".repeat(COLUMNS));
    for s in summaries {
        let _ = writeln!(out, "{}", row(s.variant, &s.best, false, Some(s.others_range)));
    }
    out
}

/// The targets as a table.
pub fn checks_table(checks: &[Check]) -> String {
    if checks.is_empty() {
        return "No target could be checked: the gateway was not measured.\n".to_owned();
    }
    let mut out = String::from("| target | value | wanted | result |\n|---|---:|---:|---|\n");
    for c in checks {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            c.what,
            c.value_text(),
            c.target_text(),
            c.verdict()
        );
    }
    out
}

/// Everything the report says besides the figures.
pub struct Context {
    pub title_time: String,
    pub command: String,
    pub machine: Vec<(String, String)>,
    pub settings: Vec<String>,
    pub wall_secs: f64,
    /// File name of the chart next to the report, when one was drawn, and whether it has text.
    pub chart: Option<(String, bool)>,
    /// Variants that could not be measured: each error, which names the variant and round.
    pub failures: Vec<String>,
    /// Sections of the long runs (soak, ramp), after the targets.
    pub sections: Vec<String>,
}

/// Above this share of the CPU taken by other processes, the report warns that its figures are depressed.
const BUSY_MACHINE_SHARE: f64 = 0.10;

pub fn markdown(ctx: &Context, summaries: &[Summary], checks: &[Check]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# ingest-gateway benchmark, {}\n", ctx.title_time);
    let _ = writeln!(
        out,
        "`{}` — {:.0} s wall time (after the build).\n",
        ctx.command, ctx.wall_secs
    );
    out.push_str("## Machine\n\n");
    for (k, v) in &ctx.machine {
        let _ = writeln!(out, "- {k}: {v}");
    }
    out.push_str("\n## Settings\n\n");
    for s in &ctx.settings {
        let _ = writeln!(out, "- {s}");
    }
    out.push_str("\n## Results (best of each figure over the rounds)\n\n");
    // The best figures come from the least disturbed rounds: what matters is whether a variant had a quiet one.
    let no_quiet_round = summaries.iter().map(|s| s.others_range.0).fold(0.0, f64::max);
    let busiest_round = summaries.iter().map(|s| s.others_range.1).fold(0.0, f64::max);
    if no_quiet_round > BUSY_MACHINE_SHARE {
        let _ = writeln!(
            out,
            "**The machine was shared**: in every round of at least one variant, processes outside the benchmark \
             took {:.0} % or more of its CPU (last column), so its figures are lower and noisier than on a quiet \
             machine.\n",
            no_quiet_round * 100.0
        );
    } else if busiest_round > BUSY_MACHINE_SHARE {
        let _ = writeln!(
            out,
            "Processes outside the benchmark took up to {:.0} % of the CPU in some rounds (last column), but every \
             variant also had a round with at most {:.0} %.\n",
            busiest_round * 100.0,
            no_quiet_round * 100.0
        );
    }
    out.push_str(&results_table(summaries));
    out.push_str(
        "\nHighest rates, lowest latencies, highest peak RSS and error counts over the rounds; CPU s, rows and CPU \
         per row from the round with the most rows landed/s. Every round is listed below.\n",
    );
    out.push_str("\n### Where each µs of a landed row goes\n\n");
    out.push_str(&where_the_micros_go(summaries));
    out.push_str("\n## Targets\n\n");
    out.push_str(&checks_table(checks));
    for section in &ctx.sections {
        out.push_str(section);
    }

    out.push_str("\n## Every round\n\n");
    let _ = writeln!(
        out,
        "| variant | round | landed over s | {HEADER} |\n|---|---:|---:|{}",
        "---:|".repeat(COLUMNS)
    );
    for s in summaries {
        for m in &s.runs {
            let _ = writeln!(out, "{}", row(s.variant, m, true, None));
        }
    }
    let notes: Vec<String> = summaries
        .iter()
        .flat_map(|s| {
            s.runs.iter().flat_map(move |m| {
                m.notes
                    .iter()
                    .map(move |n| format!("- {} (round {}): {n}", s.variant.name, m.round))
            })
        })
        .collect();
    let notes: Vec<String> = ctx
        .failures
        .iter()
        // A failure's message may span lines (a log tail): indented, it stays inside its list item.
        .map(|f| format!("- FAILED: {}", f.replace('\n', "\n  ")))
        .chain(notes)
        .collect();
    if !notes.is_empty() {
        out.push_str("\n## Notes\n\n");
        for n in notes {
            let _ = writeln!(out, "{n}");
        }
    }

    out.push_str(HOW);
    if let Some((file, with_text)) = &ctx.chart {
        let _ = writeln!(
            out,
            "\n## Rows landed per second over time\n\n![rows landed per second]({file})\n"
        );
        if !with_text {
            out.push_str("No font was found to label the chart; the lines are:\n\n");
        } else {
            out.push_str("Colours:\n\n");
        }
        for (index, s) in summaries.iter().enumerate() {
            let colour = crate::plot::COLOURS[index % crate::plot::COLOURS.len()].0;
            let _ = writeln!(out, "- {colour}: {} (round {})", s.variant.name, s.best.round);
        }
    }
    out
}

const HOW: &str = "
## How each figure is measured

- **rows landed/s**: rows in PostgreSQL per second, from the start of the load until the flow of rows stopped,
  read every 100 ms from each variant's own counter (gateway: `/stats` `written`; naive baseline: inserts
  committed; sink: `\\copy` batches done) and checked against `count(*)` at the end. For the gateway, the last
  partial batches, which wait for the flush interval once the load stops, are written at the stop (SIGTERM) and
  left out of the rate (the notes say how many). The HTTP ceiling writes nothing: its figure is updates parsed
  per second, the most the HTTP layer can hand on.
- **accepted/s**: updates answered as accepted per second over wrk's run (202; on a tracker route, its client's
  success: 200 with the exact body the client expects); above rows landed/s when the queue absorbs load.
- **req/s, p50, p99, max**: wrk (`--latency`, `--timeout 10s`); failed: every other answer, counted by the Lua
  script (a tracker's 200 with another body as `200-wrong-body`); socket errors are connect + read + write +
  timeout.
- **peak RSS, CPU s**: the server process under test over its whole life (wait4 rusage, and `VmHWM` sampled
  every 100 ms); for the sink ceiling, the CPU of the psql processes.
- **PostgreSQL CPU s**: CPU time of the PostgreSQL server and its backends over the variant, load and drain.
- **CPU µs/row, PostgreSQL µs/row, load generator µs/row**: what each landed row cost — CPU s, PostgreSQL CPU s
  and the load generator's CPU, each divided by rows (the HTTP ceiling: by updates parsed, so its CPU µs/row is
  per request). The load generator is wrk (its CPU from getrusage of the reaped process); for the sink ceiling,
  the psql processes, whose CPU is then left out of CPU µs/row.
- **whole system µs/row**: every process's CPU per landed row but the load generator's: the gateway (with
  JetStream: the gateway, the writer and nats-server), PostgreSQL, and for the sink ceiling its psql processes,
  which do the writer's part. Where each µs goes (below the table) splits it by process.
- **PostgreSQL ÷ sink ceiling**: PostgreSQL's CPU per landed row with 1000-update requests over the sink
  ceiling's, a bare binary COPY of 1000-row batches into the same table with the same indexes: what the
  batch write's other statements (the `device_positions` upsert, the log positions, `NOTIFY`) cost the database.
- **tracker routes ÷ native route**: the gateway's CPU per landed row on the OsmAnd route (one fix per `GET`,
  the query form) over its CPU per landed row with single native updates, and on the Overland route (200 fixes a
  request) over 1000-update native requests, in the same mode and run: what reading each client's protocol costs
  beyond the native JSON. Every fix has a new (device, time), as in the native scripts, so every fix is a row.
- **teltonika**: 1000 simulated units on the gateway's Teltonika TCP listener, each one connection handshaken
  with its IMEI, sending Codec 8 packets of 10 records and waiting for the answer (the record count, sent once
  the records are durable) before the next, as real units do. The load generator is this benchmark's own
  (`teltonika.rs`, a hidden subcommand run as a child process, its CPU from `wait4`), not wrk: req/s is packets
  answered per second, p50/p99/max the wait from a packet's write to its answer, failed the answers with another
  count, socket errors the connections lost or timed out. Its CPU per landed row is set against 1000-update
  native requests (target ≤ 1.0); the gateway's RSS is read with all 1000 connections still open right after the
  load, and (in the notes) once every unit is handshaken, before it.
- **others' CPU %**: the share of the machine's CPU (all cores) taken during the variant by processes outside
  the benchmark (`/proc/stat` user, system and steal time minus the benchmark's own processes and its
  PostgreSQL; interrupt time, mostly the benchmark's own loopback traffic, is left out); above a few
  per cent, that variant competed with something else.
- Every variant starts on emptied tables after a `CHECKPOINT`, against the same PostgreSQL.
";

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(cpu_secs: f64, rows: u64) -> Measurement {
        Measurement {
            cpu_secs: Some(cpu_secs),
            load_cpu_secs: Some(cpu_secs / 2.0),
            pg_cpu_secs: cpu_secs / 5.0,
            rows,
            rows_per_sec: rows as f64 / 10.0,
            ..Measurement::default()
        }
    }

    #[test]
    fn cpu_per_row_is_in_microseconds_and_absent_without_rows() {
        assert_eq!(micros_per_row(Some(1.5), 100_000), Some(15.0));
        assert_eq!(micros_per_row(Some(1.5), 0), None);
        assert_eq!(micros_per_row(None, 10), None);
    }

    #[test]
    fn the_cost_ratio_is_checked_for_each_mode_against_its_target() {
        let variants = [
            Variant::new(Kind::HttpCeiling),
            Variant::new(Kind::Gateway {
                shape: Shape::Single,
                durability: Some("wal".to_owned()),
                default_mode: true,
            }),
            Variant::new(Kind::Gateway {
                shape: Shape::Single,
                durability: Some("memory".to_owned()),
                default_mode: false,
            }),
        ];
        let measurements = [
            (0, measured(0.5, 100_000)),
            (1, measured(1.5, 100_000)),
            (2, measured(1.0, 100_000)),
        ];
        let summaries = summarize(&variants, &measurements);
        let all = checks(&summaries);
        let cost: Vec<&Check> = all
            .iter()
            .filter(|c| c.what.contains("CPU per landed row") && !c.what.contains("PostgreSQL"))
            .collect();
        assert_eq!(cost.len(), 2);
        assert!((cost[0].value.unwrap_or(0.0) - 3.0).abs() < 1e-9);
        assert!(cost[0].what.contains("wal") && cost[0].what.contains("(15.0 ÷ 5.0 µs)"));
        assert!((cost[1].value.unwrap_or(0.0) - 2.0).abs() < 1e-9);
        assert!(cost.iter().all(|c| c.passed() == Some(false)));
        let (r, gateway, ceiling) = cost_ratio(&summaries, Some("memory")).unwrap_or_default();
        assert!((r - 2.0).abs() < 1e-9 && (gateway - 10.0).abs() < 1e-9 && (ceiling - 5.0).abs() < 1e-9);
        let over = all.iter().find(|c| c.what.contains("wal rows landed/s ÷ memory"));
        assert!(over.is_some_and(|c| c.passed() == Some(true)));
        let table = results_table(&summaries);
        assert!(table.contains("| 15.0 | 3.0 | 18.0 | 7.5 |"), "{table}");
    }

    #[test]
    fn postgresql_is_set_against_the_sink_ceiling_and_each_micro_is_accounted_for() {
        let variants = [
            Variant::new(Kind::SinkCeiling),
            Variant::new(Kind::Gateway {
                shape: Shape::Batch1000,
                durability: Some("wal".to_owned()),
                default_mode: true,
            }),
            Variant::new(Kind::JetStream { shape: Shape::Single }),
        ];
        let mut jetstream = measured(3.0, 100_000);
        jetstream.cpu_parts = vec![("gateway", 1.0), ("writer", 0.5), ("nats-server", 1.5)];
        // Sink: psql 0.25 s, PostgreSQL 0.1 s; gateway: 0.5 s and PostgreSQL 0.5 s, for 100,000 rows each.
        let measurements = [
            (0, measured(0.5, 100_000)),
            (
                1,
                Measurement {
                    pg_cpu_secs: 0.5,
                    ..measured(0.5, 100_000)
                },
            ),
            (2, jetstream),
        ];
        let summaries = summarize(&variants, &measurements);
        let (r, gateway, sink) = pg_cost_ratio(&summaries, None).unwrap_or_default();
        assert!((r - 5.0).abs() < 1e-9 && (gateway - 5.0).abs() < 1e-9 && (sink - 1.0).abs() < 1e-9);
        let all = checks(&summaries);
        let check = all.iter().find(|c| c.what.contains("÷ sink ceiling's (5.0 ÷ 1.0 µs)"));
        assert!(
            check.is_some_and(|c| c.passed() == Some(false)),
            "{:?}",
            all.iter().map(|c| &c.what).collect::<Vec<_>>()
        );
        let lines = where_the_micros_go(&summaries);
        assert!(lines.contains("psql 2.5 + PostgreSQL 1.0 = **3.5 µs**"), "{lines}");
        assert!(lines.contains("gateway 5.0 + PostgreSQL 5.0 = **10.0 µs**"), "{lines}");
        assert!(
            lines.contains("gateway 10.0 + writer 5.0 + nats-server 15.0 + PostgreSQL 6.0 = **36.0 µs**"),
            "{lines}"
        );
    }

    #[test]
    fn each_tracker_route_is_judged_against_the_native_route_of_its_request_size() {
        let gateway = |shape| {
            Variant::new(Kind::Gateway {
                shape,
                durability: Some("wal".to_owned()),
                default_mode: true,
            })
        };
        let variants = [
            gateway(Shape::Single),
            gateway(Shape::Batch1000),
            gateway(Shape::Osmand),
            gateway(Shape::Overland200),
        ];
        let measurements = [
            (0, measured(1.0, 100_000)),
            (1, measured(0.2, 100_000)),
            (2, measured(1.05, 100_000)),
            (3, measured(0.3, 100_000)),
        ];
        let summaries = summarize(&variants, &measurements);
        let all = checks(&summaries);
        let tracker: Vec<&Check> = all
            .iter()
            .filter(|c| {
                c.what.contains(" ÷ ")
                    && ["gateway osmand", "gateway overland"]
                        .iter()
                        .any(|p| c.what.starts_with(p))
            })
            .collect();
        assert_eq!(tracker.len(), 2);
        assert!(tracker[0].what.contains("gateway osmand GET, wal") && tracker[0].what.contains("(10.5 ÷ 10.0 µs)"));
        assert!((tracker[0].value.unwrap_or(0.0) - 1.05).abs() < 1e-9);
        assert_eq!(tracker[0].passed(), Some(true));
        assert!(tracker[1]
            .what
            .contains("÷ 1000/request CPU per landed row (3.0 ÷ 2.0 µs)"));
        assert_eq!(tracker[1].passed(), Some(false));
        assert!(all
            .iter()
            .any(|c| c.what == "gateway overland 200/request, wal peak RSS"));
    }

    #[test]
    fn teltonika_is_judged_against_1000_update_requests_and_its_connections_memory_reported() {
        let gateway = |shape| {
            Variant::new(Kind::Gateway {
                shape,
                durability: Some("wal".to_owned()),
                default_mode: true,
            })
        };
        let variants = [gateway(Shape::Batch1000), gateway(Shape::Teltonika)];
        let mut teltonika = measured(0.18, 100_000);
        teltonika.connections_rss_kib = Some(20 * 1024);
        let measurements = [(0, measured(0.2, 100_000)), (1, teltonika)];
        let summaries = summarize(&variants, &measurements);
        let all = checks(&summaries);
        let cost = all
            .iter()
            .find(|c| c.what.starts_with("gateway teltonika") && c.what.contains("÷ 1000/request"));
        assert!(cost.is_some_and(|c| c.what.contains("(1.8 ÷ 2.0 µs)") && c.passed() == Some(true)));
        let rss = all.iter().find(|c| c.what.contains("connections open"));
        assert!(rss.is_some_and(|c| c.value == Some(20.0) && c.passed().is_none()));
        assert!(all
            .iter()
            .any(|c| c.what == "gateway teltonika 1000 units × 10/packet, wal peak RSS"));
    }

    #[test]
    fn a_tracker_route_without_its_native_route_is_not_measured_rather_than_judged() {
        let variants = [Variant::new(Kind::Gateway {
            shape: Shape::Osmand,
            durability: None,
            default_mode: true,
        })];
        let measurements = [(0, measured(1.0, 100_000))];
        let summaries = summarize(&variants, &measurements);
        let all = checks(&summaries);
        let osmand = all
            .iter()
            .find(|c| c.what.starts_with("gateway osmand GET CPU per landed row"));
        assert!(osmand.is_some_and(|c| c.value.is_none() && c.passed().is_none()));
    }
}
