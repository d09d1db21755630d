//! Runs `wrk` with one of the repository's Lua scripts and reads its figures.
//!
//! From wrk's text output: requests, latency distribution (`--latency`), socket errors, and the counts of
//! accepted and failed requests the scripts print in `done()`: `single.lua: 202=N non-202=M …` on the native route,
//! `osmand.lua: 200=N non-200=M …` on a tracker's, whose client counts a 200 with its exact body as success.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};

/// The figures of one `wrk` run.
#[derive(Debug, Clone, Default)]
pub struct WrkOutcome {
    /// Seconds wrk measured over (a little over the requested duration).
    pub duration_secs: f64,
    pub requests: u64,
    pub requests_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Responses the Lua script counted as success: 202 on the native route; on a tracker's, 200 with the body
    /// its client expects.
    pub accepted: u64,
    /// Every other response.
    pub failed: u64,
    /// What the failed responses were and how many of each, e.g. `[503=12]`.
    pub failed_detail: String,
    /// connect + read + write + timeout errors.
    pub socket_errors: u64,
    /// CPU seconds (user + system) the wrk process used: what generating the load cost.
    pub cpu_secs: f64,
}

/// Fails with a message that says how to install wrk when it is missing.
pub fn check_installed() -> anyhow::Result<String> {
    match Command::new("wrk").arg("-v").output() {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
            Ok(text.lines().next().unwrap_or("wrk").trim().to_owned())
        }
        Err(_) => bail!(
            "wrk is not installed; it is the load generator of this benchmark. \
             Install it (Debian/Ubuntu: `apt-get install -y wrk`; others: https://github.com/wg/wrk) and run again"
        ),
    }
}

/// Runs `wrk -t<threads> -c<connections> -d<secs>s --latency -s <script> <url>`.
pub fn run(script: &Path, url: &str, threads: u32, connections: u32, duration_secs: u64) -> anyhow::Result<WrkOutcome> {
    run_paced(script, url, threads, connections, duration_secs, None)
}

/// [`run`], each connection pausing `delay_ms` on average before each request (a script that reads
/// `WRK_DELAY_MS`, such as `single.lua`): a load below saturation.
pub fn run_paced(
    script: &Path,
    url: &str,
    threads: u32,
    connections: u32,
    duration_secs: u64,
    delay_ms: Option<f64>,
) -> anyhow::Result<WrkOutcome> {
    let mut command = Command::new("wrk");
    command.env_remove("WRK_DELAY_MS");
    if let Some(delay) = delay_ms {
        command.env("WRK_DELAY_MS", format!("{delay:.3}"));
    }
    let children_before = crate::procs::reaped_children_secs();
    let output = command
        .arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{duration_secs}s"))
        // wrk's default 2 s timeout would drop the slowest requests from the latency figures instead of showing
        // them.
        .args(["--timeout", "10s", "--latency", "-s"])
        .arg(script)
        .arg(url)
        .output()
        .context("could not run wrk")?;
    // `output` has reaped wrk, which added its CPU to this process's children's.
    let cpu_secs = (crate::procs::reaped_children_secs() - children_before).max(0.0);
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed ({}):\n{stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let mut outcome = parse(&stdout).with_context(|| format!("could not read wrk's output:\n{stdout}"))?;
    outcome.cpu_secs = cpu_secs;
    Ok(outcome)
}

fn parse(text: &str) -> anyhow::Result<WrkOutcome> {
    let mut out = WrkOutcome::default();
    let (mut have_p50, mut have_p99, mut have_max, mut have_requests, mut have_lua) =
        (false, false, false, false, false);
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            // "Latency   1.23ms  456.00us  12.34ms   89.00%" (the thread stats: avg, stdev, max, +/- stdev)
            ["Latency", _avg, _stdev, max, _pct] => {
                out.max_ms = parse_time_ms(max)?;
                have_max = true;
            }
            ["50%", t] => {
                out.p50_ms = parse_time_ms(t)?;
                have_p50 = true;
            }
            ["99%", t] => {
                out.p99_ms = parse_time_ms(t)?;
                have_p99 = true;
            }
            // "123456 requests in 20.00s, 12.34MB read"
            [n, "requests", "in", secs, ..] => {
                out.requests = n.parse()?;
                out.duration_secs = parse_time_ms(secs.trim_end_matches(','))? / 1000.0;
                have_requests = true;
            }
            ["Requests/sec:", n] => out.requests_per_sec = n.parse()?,
            // "Socket errors: connect 0, read 0, write 0, timeout 0"
            ["Socket", "errors:", rest @ ..] => {
                out.socket_errors = rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum();
            }
            _ => {}
        }
        if let Some((accepted, failed, detail)) = script_counts(line)? {
            (out.accepted, out.failed, out.failed_detail) = (accepted, failed, detail);
            have_lua = true;
        }
    }
    if !(have_p50 && have_p99 && have_max && have_requests) {
        bail!("latency distribution or request count missing");
    }
    if !have_lua {
        bail!("the script's `<status>=… non-<status>=…` line is missing");
    }
    Ok(out)
}

/// The counts of a script's closing line, `<script>.lua: <status>=N non-<status>=M [<what>=K …] …`, where
/// `<status>` is the route's success status; `None` for any other line.
fn script_counts(line: &str) -> anyhow::Result<Option<(u64, u64, String)>> {
    let Some((_, rest)) = line.split_once(".lua: ") else {
        return Ok(None);
    };
    let mut fields = rest.split_whitespace();
    let Some((status, accepted)) = fields.next().and_then(|f| f.split_once('=')) else {
        return Ok(None);
    };
    if !(status.len() == 3 && status.bytes().all(|b| b.is_ascii_digit())) {
        return Ok(None);
    }
    let failed = fields
        .next()
        .and_then(|f| f.strip_prefix("non-"))
        .and_then(|f| f.strip_prefix(status))
        .and_then(|f| f.strip_prefix('='))
        .with_context(|| format!("no non-{status} count"))?;
    let detail = match (rest.find('['), rest.find(']')) {
        (Some(open), Some(close)) if open < close => rest[open..=close].to_owned(),
        _ => String::new(),
    };
    Ok(Some((accepted.parse()?, failed.parse()?, detail)))
}

/// wrk's time format (`812.00us`, `1.23ms`, `2.00s`, `1.50m`, `1.00h`) in milliseconds.
fn parse_time_ms(text: &str) -> anyhow::Result<f64> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .with_context(|| format!("no unit in {text:?}"))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().with_context(|| format!("bad number in {text:?}"))?;
    let ms = match unit {
        "us" => number / 1000.0,
        "ms" => number,
        "s" => number * 1000.0,
        "m" => number * 60_000.0,
        "h" => number * 3_600_000.0,
        _ => bail!("unknown unit in {text:?}"),
    };
    Ok(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "Running 5s test @ http://127.0.0.1:8080/api/v1/location/update
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.10ms    2.05ms  41.07ms   88.12%
    Req/Sec    10.55k   812.33    12.20k    71.00%
  Latency Distribution
     50%    2.62ms
     75%    3.71ms
     90%    5.38ms
     99%   10.48ms
  105012 requests in 5.00s, 9.81MB read
  Socket errors: connect 0, read 1, write 0, timeout 2
  Non-2xx or 3xx responses: 5
Requests/sec:  20999.51
Transfer/sec:      1.96MB
single.lua: 202=105007 non-202=5 [503=5] updates_accepted=105007 socket_errors(connect=0 read=1 write=0 timeout=2)
";

    #[test]
    fn reads_every_figure_of_a_wrk_run() {
        let out = parse(SAMPLE).expect("parses");
        assert_eq!(out.requests, 105012);
        assert!((out.duration_secs - 5.0).abs() < 1e-9);
        assert!((out.p50_ms - 2.62).abs() < 1e-9);
        assert!((out.p99_ms - 10.48).abs() < 1e-9);
        assert!((out.max_ms - 41.07).abs() < 1e-9);
        assert_eq!(out.accepted, 105007);
        assert_eq!(out.failed, 5);
        assert_eq!(out.failed_detail, "[503=5]");
        assert_eq!(out.socket_errors, 3);
        assert!((out.requests_per_sec - 20999.51).abs() < 1e-9);
    }

    #[test]
    fn a_tracker_script_counts_its_own_success_status_and_the_answers_with_a_wrong_body() {
        let line = "overland200.lua: 200=310 non-200=4 [200-wrong-body=1 503=3] updates_accepted=62000 \
                    socket_errors(connect=0 read=0 write=0 timeout=0)";
        assert_eq!(
            script_counts(line).expect("parses"),
            Some((310, 4, "[200-wrong-body=1 503=3]".to_owned()))
        );
        assert_eq!(script_counts("  Latency Distribution").expect("other lines"), None);
        assert!(script_counts("osmand.lua: 200=3 non-202=1").is_err());
    }

    #[test]
    fn reads_every_wrk_time_unit() {
        assert!((parse_time_ms("812.00us").expect("us") - 0.812).abs() < 1e-9);
        assert!((parse_time_ms("2.00s").expect("s") - 2000.0).abs() < 1e-9);
        assert!((parse_time_ms("1.50m").expect("m") - 90_000.0).abs() < 1e-9);
    }
}
