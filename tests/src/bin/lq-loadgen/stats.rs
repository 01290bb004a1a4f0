//! What the connections saw, and what the server's /proc says.

use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch: the send time written into every message.
pub(crate) fn now_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or_default()
}

/// One connection's deliveries.
#[derive(Debug, Default)]
pub(crate) struct Received {
    /// Bit `seq` is set once message `seq` of the tenant arrived.
    seen: Vec<u64>,
    pub(crate) deliveries: u64,
    pub(crate) duplicated: u64,
    /// End-to-end latencies in microseconds.
    pub(crate) latencies: Vec<u32>,
}

impl Received {
    pub(crate) fn record(&mut self, seq: u64, sent_micros: u64) {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if self.seen.len() <= word {
            self.seen.resize(word + 1, 0);
        }
        if self.seen[word] & (1 << bit) != 0 {
            self.duplicated += 1;
            return;
        }
        self.seen[word] |= 1 << bit;
        self.deliveries += 1;
        let latency = now_micros().saturating_sub(sent_micros);
        self.latencies.push(u32::try_from(latency).unwrap_or(u32::MAX));
    }

    pub(crate) fn has(&self, seq: u64) -> bool {
        self.seen.get((seq / 64) as usize).is_some_and(|w| w & (1 << (seq % 64)) != 0)
    }
}

/// The value after the first `"name":` in `text`, when it is an unsigned integer.
pub(crate) fn field(text: &str, name: &str) -> Option<u64> {
    let key = format!("\"{name}\":");
    let at = text.find(&key)? + key.len();
    let digits: &str = &text[at..];
    let end = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// p50, p99, p99.9 and max of `values` (sorted in place), in milliseconds.
pub(crate) fn percentiles_ms(values: &mut [u32]) -> serde_json::Value {
    if values.is_empty() {
        return serde_json::Value::Null;
    }
    values.sort_unstable();
    let at = |q: f64| {
        let index = ((values.len() as f64 * q).ceil() as usize).clamp(1, values.len()) - 1;
        f64::from(values[index]) / 1000.0
    };
    serde_json::json!({
        "p50": at(0.50),
        "p99": at(0.99),
        "p99_9": at(0.999),
        "max": at(1.0),
        "samples": values.len(),
    })
}

/// A server process as /proc shows it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ProcSample {
    pub(crate) rss_kib: u64,
    /// utime + stime, in seconds.
    pub(crate) cpu_secs: f64,
}

/// Clock ticks per second of /proc/<pid>/stat times (`getconf CLK_TCK`, 100 on Linux).
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Reads `pid`'s resident memory and CPU time; `None` when the process is gone.
pub(crate) fn sample(pid: u32) -> Option<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ProcSample { rss_kib, cpu_secs: ticks / clock_ticks() })
}

/// The sum over `pids` (a missing process counts as zero).
pub(crate) fn sample_all(pids: &[u32]) -> ProcSample {
    pids.iter().filter_map(|pid| sample(*pid)).fold(ProcSample::default(), |a, b| ProcSample {
        rss_kib: a.rss_kib + b.rss_kib,
        cpu_secs: a.cpu_secs + b.cpu_secs,
    })
}

/// The sum of gauge `name` over all its series (every label set) in a Prometheus text page;
/// `None` when the page has no series of it.
pub(crate) fn gauge(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = match rest.strip_prefix('{') {
                Some(labelled) => labelled.split_once("} ")?.1,
                None => rest.strip_prefix(' ')?,
            };
            value.trim().parse::<f64>().ok()
        })
        .fold(None, |sum, v| Some(sum.unwrap_or(0.0) + v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_read_from_raw_frames() {
        let frame = r#"{"type":"webhook","payload":{"provider":"bench","data":{"seq":42,"sent":1700000000000001,"pad":""}}}"#;
        assert_eq!(field(frame, "seq"), Some(42));
        assert_eq!(field(frame, "sent"), Some(1_700_000_000_000_001));
        assert_eq!(field(frame, "missing"), None);
    }

    #[test]
    fn duplicates_are_counted_once_and_percentiles_are_nearest_rank() {
        let mut received = Received::default();
        received.record(3, now_micros());
        received.record(3, now_micros());
        received.record(200, now_micros());
        assert_eq!((received.deliveries, received.duplicated), (2, 1));
        assert!(received.has(3) && received.has(200) && !received.has(4));
        let mut values: Vec<u32> = (1..=1000).collect();
        let p = percentiles_ms(&mut values);
        assert_eq!(p["p50"], 0.5);
        assert_eq!(p["p99"], 0.99);
        assert_eq!(p["max"], 1.0);
    }

    #[test]
    fn gauges_are_read_from_a_metrics_page() {
        let page = "# TYPE lq_connections gauge\nlq_connections{transport=\"websocket\"} 2\n\
                    lq_connections{transport=\"sse\"} 1\nlq_connections_total{result=\"accepted\"} 5\n";
        assert_eq!(gauge(page, "lq_connections"), Some(3.0));
        assert_eq!(gauge(page, "lq_missing"), None);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let me = sample(std::process::id()).expect("/proc is readable");
        assert!(me.rss_kib > 0);
    }
}
