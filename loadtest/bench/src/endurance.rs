//! The long runs against one gateway each: the soak (a steady share of its saturation for minutes: does its
//! memory grow, is every acknowledged update in the table?) and k6's 50 → 500 user ramp (`loadtest/ramp.js`).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::procs::{self, Monitor};
use crate::variants::{gateway_stats, wait_until_written, Bench, Shape};
use crate::wrk::{self, WrkOutcome};

/// The soak's load is set again after each window of this length, from the rate the last one reached.
const SOAK_WINDOW_SECS: u64 = 30;
/// The unpaced runs before the soak: a warm-up, then the one that finds the gateway's saturation.
const WARM_UP_SECS: u64 = 10;
const SATURATION_SECS: u64 = 15;

/// One window of the soak.
#[derive(Debug, Clone)]
pub struct SoakWindow {
    /// Seconds since the soak's start, at the window's end.
    pub at_secs: f64,
    pub delay_ms: f64,
    pub wrk: WrkOutcome,
    /// Resident memory of the gateway at the window's end.
    pub rss_kib: u64,
}

/// What a soak saw.
#[derive(Debug, Clone)]
pub struct SoakOutcome {
    pub durability: Option<String>,
    /// Single-update requests per second the gateway answered when not paced.
    pub saturation_rps: f64,
    pub load: f64,
    pub windows: Vec<SoakWindow>,
    /// `VmHWM` of the gateway at the end: its peak, the saturation run included.
    pub peak_rss_kib: u64,
    /// Updates answered 202 over the warm-up, the saturation run and the soak.
    pub acknowledged: u64,
    /// Rows in the table after the gateway stopped.
    pub rows: u64,
    /// Seconds from the end of the load until every queue was empty.
    pub drain_secs: f64,
    pub exit_code: Option<i32>,
    pub notes: Vec<String>,
}

impl SoakOutcome {
    /// Growth of resident memory from the end of the first window (warm) to the end of the last, in per cent.
    pub fn rss_growth_percent(&self) -> Option<f64> {
        let first = self.windows.first()?.rss_kib as f64;
        let last = self.windows.last()?.rss_kib as f64;
        (first > 0.0 && self.windows.len() > 1).then(|| (last - first) / first * 100.0)
    }

    /// Acknowledged updates not in the table (0 when nothing was lost).
    pub fn missing(&self) -> u64 {
        self.acknowledged.saturating_sub(self.rows)
    }

    /// Mean requests per second over the windows.
    pub fn mean_rps(&self) -> f64 {
        let (requests, secs) = self.windows.iter().fold((0.0, 0.0), |(r, s), w| {
            (r + w.wrk.requests as f64, s + w.wrk.duration_secs)
        });
        if secs > 0.0 {
            requests / secs
        } else {
            0.0
        }
    }
}

/// What the ramp saw.
#[derive(Debug, Clone)]
pub struct RampOutcome {
    pub durability: Option<String>,
    pub scale: f64,
    pub checks_passed: u64,
    pub checks_failed: u64,
    pub requests: u64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub updates_accepted: u64,
    pub rows: u64,
    pub peak_rss_kib: u64,
    pub k6_exit: Option<i32>,
    /// The HTML report k6 wrote, next to the Markdown report.
    pub html_report: Option<String>,
    pub notes: Vec<String>,
}

impl RampOutcome {
    pub fn checks_percent(&self) -> Option<f64> {
        let total = self.checks_passed + self.checks_failed;
        (total > 0).then(|| self.checks_passed as f64 / total as f64 * 100.0)
    }
}

/// The next window's pause per request: wrk's connections each cycle through latency + pause, so the pause that
/// gives `target` requests/s is the cycle that rate needs minus the latency the last window showed. Halfway
/// there each time, since the latency falls as the load does.
fn next_delay_ms(connections: u32, target_rps: f64, last_rps: f64, last_delay_ms: f64) -> f64 {
    if !(target_rps > 0.0 && last_rps > 0.0) {
        return last_delay_ms;
    }
    let cycle = |rps: f64| f64::from(connections) * 1000.0 / rps;
    let latency = (cycle(last_rps) - last_delay_ms).max(0.0);
    let wanted = (cycle(target_rps) - latency).max(0.0);
    (last_delay_ms + wanted) / 2.0
}

impl Bench {
    /// Finds the gateway's saturation with single updates, then holds it at `load` × that rate for `secs`, reading
    /// its memory after each window; at the end waits until it has written everything, stops it (SIGTERM) and
    /// counts the table.
    pub fn soak(&self, secs: u64, load: f64, durability: Option<&str>) -> anyhow::Result<SoakOutcome> {
        self.admin.reset().context("could not empty the tables")?;
        let slug = "soak";
        let (service, data_dir) = self.start_gateway(slug, durability)?;
        let port = service.port;
        let pid = service.pid().context("the gateway is not running")?;
        let script = self.script(Shape::Single);
        let url = Self::url(Shape::Single, port);
        let run = |secs: u64, delay: Option<f64>| {
            wrk::run_paced(&script, &url, self.wrk_threads, self.connections, secs, delay)
        };

        // A fresh gateway (and a just-emptied table) runs slower for its first seconds: warm up first.
        let warm_up = run(WARM_UP_SECS, None)?;
        let saturation = run(SATURATION_SECS, None)?;
        let mut acknowledged = warm_up.accepted + saturation.accepted;
        let saturation_rps = saturation.requests_per_sec;
        let target = saturation_rps * load;
        eprintln!(
            "  soak: saturation {saturation_rps:.0} req/s; holding {target:.0} req/s for {secs} s in windows of \
             {SOAK_WINDOW_SECS} s"
        );
        // First guess: the latency at saturation.
        let mut delay = next_delay_ms(self.connections, target, saturation_rps, 0.0) * 2.0;
        let started = Instant::now();
        let mut windows = Vec::new();
        let mut left = secs;
        while left > 0 {
            let length = left.min(SOAK_WINDOW_SECS);
            let outcome = run(length, Some(delay))?;
            acknowledged += outcome.accepted;
            let rss = procs::rss_kib(pid).unwrap_or(0);
            eprintln!(
                "  soak {:>4.0} s: {:>7.0} req/s  p99 {:>6.2} ms  non-202 {}  RSS {:.1} MB  (pause {delay:.2} ms)",
                started.elapsed().as_secs_f64(),
                outcome.requests_per_sec,
                outcome.p99_ms,
                outcome.failed,
                rss as f64 / 1024.0
            );
            let next = next_delay_ms(self.connections, target, outcome.requests_per_sec, delay);
            windows.push(SoakWindow {
                at_secs: started.elapsed().as_secs_f64(),
                delay_ms: delay,
                wrk: outcome,
                rss_kib: rss,
            });
            delay = next;
            left -= length;
        }

        let load_end = Instant::now();
        let monitor = Monitor::start(load_end, None, Box::new(move || gateway_stats(port).map(|s| s.written)));
        let mut notes = Vec::new();
        if let Err(note) = wait_until_written(port, &monitor) {
            notes.push(note);
        }
        drop(monitor);
        let drain_secs = load_end.elapsed().as_secs_f64();
        let peak_rss_kib = procs::peak_rss_kib(pid).unwrap_or(0);
        let usage = service.stop(Duration::from_secs(60))?;
        let _ = std::fs::remove_dir_all(&data_dir);
        let rows = self.admin.count_rows("location_updates")?;
        if rows > acknowledged {
            // Requests in flight when a wrk run ended were written but never counted as answered.
            notes.push(format!(
                "{} rows more than acknowledged: requests in flight when a wrk run stopped",
                rows - acknowledged
            ));
        }
        Ok(SoakOutcome {
            durability: durability.map(str::to_owned),
            saturation_rps,
            load,
            windows,
            peak_rss_kib: peak_rss_kib.max(usage.max_rss_kib),
            acknowledged,
            rows,
            drain_secs,
            exit_code: usage.exit_code,
            notes,
        })
    }

    /// Runs `k6 run loadtest/ramp.js` (durations × `scale`) against a fresh gateway, then checks the table. The
    /// caller has checked that k6 is installed, before the variants rather than after them.
    pub fn ramp(
        &self,
        scale: f64,
        durability: Option<&str>,
        results_dir: &Path,
        stamp: &str,
    ) -> anyhow::Result<RampOutcome> {
        self.admin.reset().context("could not empty the tables")?;
        let (service, data_dir) = self.start_gateway("ramp", durability)?;
        let pid = service.pid().context("the gateway is not running")?;
        let export = self.scratch("ramp-summary.json");
        let html_name = format!("{stamp}-ramp.html");
        let log = self.scratch("ramp-k6.log");
        eprintln!(
            "  ramp: k6 run loadtest/ramp.js (STAGES_SCALE={scale}); its output goes to {}",
            log.display()
        );
        let output = std::fs::File::create(&log).with_context(|| format!("could not create {}", log.display()))?;
        let status = Command::new("k6")
            .args(["run", "--no-color", "--summary-export"])
            .arg(&export)
            .arg(self.repo.join("loadtest").join("ramp.js"))
            .env("BASE_URL", format!("http://127.0.0.1:{}", service.port))
            .env("STAGES_SCALE", scale.to_string())
            .env("HTML_REPORT", results_dir.join(&html_name))
            .stdout(output.try_clone()?)
            .stderr(output)
            .status()
            .context("could not run k6")?;
        let mut notes = Vec::new();
        let peak_rss_kib = procs::peak_rss_kib(pid).unwrap_or(0);
        let usage = service.stop(Duration::from_secs(60))?;
        if usage.exit_code != Some(0) {
            notes.push(format!("the gateway exited with {:?} after SIGTERM", usage.exit_code));
        }
        let _ = std::fs::remove_dir_all(&data_dir);
        let rows = self.admin.count_rows("location_updates")?;
        let summary: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&export)
                .with_context(|| format!("k6 wrote no summary; its log:\n{}", procs::file_tail(&log, 30)))?,
        )
        .context("k6's summary is not JSON")?;
        let metric = |name: &str, field: &str| summary["metrics"][name][field].as_f64();
        let mut outcome = RampOutcome {
            durability: durability.map(str::to_owned),
            scale,
            checks_passed: metric("checks", "passes").unwrap_or(0.0) as u64,
            checks_failed: metric("checks", "fails").unwrap_or(0.0) as u64,
            requests: metric("http_reqs", "count").unwrap_or(0.0) as u64,
            p99_ms: metric("http_req_duration", "p(99)").context("k6's summary has no p(99)")?,
            max_ms: metric("http_req_duration", "max").unwrap_or(0.0),
            updates_accepted: metric("updates_accepted", "count").unwrap_or(0.0) as u64,
            rows,
            peak_rss_kib: peak_rss_kib.max(usage.max_rss_kib),
            k6_exit: status.code(),
            html_report: results_dir.join(&html_name).is_file().then_some(html_name),
            notes,
        };
        if outcome.rows < outcome.updates_accepted {
            let missing = outcome.updates_accepted - outcome.rows;
            outcome
                .notes
                .push(format!("{missing} updates answered 202 are not in the table"));
        }
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pause_moves_halfway_to_the_one_that_gives_the_target_rate() {
        // 64 connections at 32 000 req/s with no pause: 2 ms a cycle, all of it latency. 16 000 req/s needs
        // 4 ms cycles, so 2 ms of pause; the step goes halfway.
        let next = next_delay_ms(64, 16_000.0, 32_000.0, 0.0);
        assert!((next - 1.0).abs() < 1e-9, "{next}");
        // At the target already: the pause stays.
        let same = next_delay_ms(64, 16_000.0, 16_000.0, 2.0);
        assert!((same - 2.0).abs() < 1e-9, "{same}");
    }

    #[test]
    fn memory_growth_is_from_the_first_window_to_the_last() {
        let window = |rss_kib| SoakWindow {
            at_secs: 0.0,
            delay_ms: 0.0,
            wrk: WrkOutcome::default(),
            rss_kib,
        };
        let outcome = SoakOutcome {
            durability: None,
            saturation_rps: 1.0,
            load: 0.8,
            windows: vec![window(100_000), window(120_000), window(102_000)],
            peak_rss_kib: 120_000,
            acknowledged: 10,
            rows: 10,
            drain_secs: 0.0,
            exit_code: Some(0),
            notes: Vec::new(),
        };
        assert!((outcome.rss_growth_percent().unwrap() - 2.0).abs() < 1e-9);
        assert_eq!(outcome.missing(), 0);
    }
}
