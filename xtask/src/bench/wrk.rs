//! wrk, the HTTP load tool of the benches: one run and what its report says.

use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use super::common::pinned;

/// What one wrk run measured.
#[derive(Debug, Clone)]
pub(crate) struct WrkResult {
    /// Requests completed in the run.
    pub(crate) requests: u64,
    pub(crate) requests_per_second: f64,
    /// CPU time the proxy used per request, when the bench measured it.
    pub(crate) cpu_us_per_request: Option<f64>,
    /// The user-space part of `cpu_us_per_request`.
    pub(crate) user_us_per_request: Option<f64>,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    /// Socket errors and responses other than 2xx and 3xx.
    pub(crate) errors: u64,
    /// wrk's report as it printed it.
    pub(crate) raw: String,
}

/// One wrk run against `url`: `threads` threads holding `connections` connections for
/// `duration`.
pub(crate) fn wrk(
    url: &str,
    threads: u32,
    connections: u32,
    duration: Duration,
) -> anyhow::Result<WrkResult> {
    wrk_with(url, threads, connections, duration, &[], None)
}

/// [`wrk`] with `headers` on each request, wrk pinned to `cpus` when given.
pub(crate) fn wrk_with(
    url: &str,
    threads: u32,
    connections: u32,
    duration: Duration,
    headers: &[String],
    cpus: Option<&str>,
) -> anyhow::Result<WrkResult> {
    let mut command: Command = pinned("wrk", cpus);
    command
        .args(["--latency", "-t", &threads.to_string()])
        .args(["-c", &connections.to_string()])
        .args(["-d", &format!("{}s", duration.as_secs().max(1))])
        .args(["--timeout", "5s"]);
    for header in headers {
        command.args(["-H", header]);
    }
    let output = command.arg(url).output().context("cannot run wrk")?;
    let raw = String::from_utf8_lossy(&output.stdout).into_owned();
    anyhow::ensure!(
        output.status.success(),
        "wrk {url} failed: {raw}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    parse_wrk(&raw).with_context(|| format!("cannot read wrk's output:\n{raw}"))
}

/// Reads wrk's `--latency` report; `None` when a figure every run has is missing.
pub(crate) fn parse_wrk(raw: &str) -> Option<WrkResult> {
    let mut requests = None;
    let mut requests_per_second = None;
    let mut p50_ms = None;
    let mut p99_ms = None;
    let mut errors = 0;
    for line in raw.lines() {
        let line = line.trim();
        if let Some((count, _)) = line.split_once(" requests in ") {
            requests = count.trim().parse().ok();
        } else if let Some(value) = line.strip_prefix("Requests/sec:") {
            requests_per_second = value.trim().parse::<f64>().ok();
        } else if let Some(value) = line.strip_prefix("50%") {
            p50_ms = duration_ms(value.trim());
        } else if let Some(value) = line.strip_prefix("99%") {
            p99_ms = duration_ms(value.trim());
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            errors += rest
                .split(',')
                .filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += rest.trim().parse::<u64>().unwrap_or(0);
        }
    }
    Some(WrkResult {
        requests: requests?,
        requests_per_second: requests_per_second?,
        cpu_us_per_request: None,
        user_us_per_request: None,
        p50_ms: p50_ms?,
        p99_ms: p99_ms?,
        errors,
        raw: raw.to_owned(),
    })
}

/// `812.00us`, `1.23ms`, `2.00s` → milliseconds.
fn duration_ms(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    Some(match unit {
        "us" => number / 1000.0,
        "ms" => number,
        "s" => number * 1000.0,
        "m" => number * 60_000.0,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_parsed() {
        let raw = "Running 1s test @ http://localhost:1/\n  2 threads and 10 connections\n\
                   \x20 12346 requests in 1.00s, 1.00MB read\n\x20 Latency Distribution\n     50%  812.00us\n     75%    1.00ms\n\
                   \x20    99%    2.50ms\n  Socket errors: connect 0, read 2, write 0, timeout 1\n\
                   \x20 Non-2xx or 3xx responses: 2\n\
                   Requests/sec:  12345.67\nTransfer/sec:      1.00MB\n";
        let result = parse_wrk(raw).unwrap();
        assert_eq!(result.requests, 12346);
        assert_eq!(result.requests_per_second, 12345.67);
        assert!((result.p50_ms - 0.812).abs() < 1e-9);
        assert_eq!(result.p99_ms, 2.5);
        assert_eq!(result.errors, 5);
    }

    #[test]
    fn a_report_without_its_figures_is_refused() {
        assert!(parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n").is_none());
        let no_p99 = "  10 requests in 1.00s, 1.00KB read\n     50%  1.00ms\nRequests/sec: 10.00\n";
        assert!(parse_wrk(no_p99).is_none());
    }

    #[test]
    fn durations_of_every_unit_become_milliseconds() {
        assert_eq!(duration_ms("2.00s"), Some(2000.0));
        assert_eq!(duration_ms("1.50m"), Some(90_000.0));
        assert_eq!(duration_ms("3.00h"), None);
        assert_eq!(duration_ms("fast"), None);
    }
}
