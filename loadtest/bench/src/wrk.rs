//! Runs `wrk` with one of the repository's Lua scripts and reads its figures.
//!
//! From wrk's text output: requests, latency distribution (`--latency`), socket errors, and the 202 / non-202
//! counts the scripts print in `done()`.

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
    /// Responses with status 202, as counted by the Lua script.
    pub accepted: u64,
    pub non_202: u64,
    /// The non-202 statuses and their counts, e.g. `[503=12]`.
    pub non_202_detail: String,
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
        // "single.lua: 202=N non-202=M [503=12] updates_accepted=..." from the scripts' done()
        if let Some(rest) = line.split_once(": 202=").map(|(_, r)| r) {
            let mut fields = rest.split_whitespace();
            out.accepted = fields.next().context("no 202 count")?.parse()?;
            out.non_202 = fields
                .next()
                .and_then(|f| f.strip_prefix("non-202="))
                .context("no non-202 count")?
                .parse()?;
            if let (Some(open), Some(close)) = (rest.find('['), rest.find(']')) {
                out.non_202_detail = rest[open..=close].to_owned();
            }
            have_lua = true;
        }
    }
    if !(have_p50 && have_p99 && have_max && have_requests) {
        bail!("latency distribution or request count missing");
    }
    if !have_lua {
        bail!("the script's `202=… non-202=…` line is missing");
    }
    Ok(out)
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
        assert_eq!(out.non_202, 5);
        assert_eq!(out.non_202_detail, "[503=5]");
        assert_eq!(out.socket_errors, 3);
        assert!((out.requests_per_sec - 20999.51).abs() < 1e-9);
    }

    #[test]
    fn reads_every_wrk_time_unit() {
        assert!((parse_time_ms("812.00us").expect("us") - 0.812).abs() < 1e-9);
        assert!((parse_time_ms("2.00s").expect("s") - 2000.0).abs() < 1e-9);
        assert!((parse_time_ms("1.50m").expect("m") - 90_000.0).abs() < 1e-9);
    }
}
