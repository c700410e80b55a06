//! Prometheus text exposition (format 0.0.4), written by hand: a handful of
//! counters, gauges and one histogram do not need a registry.

use std::fmt::Write;
use std::sync::Arc;

use crate::dispatch::DeliveryMetrics;
use crate::feed::FeedMetrics;

/// A metrics page being written.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
    declared: Vec<String>,
}

impl Exposition {
    fn declare(&mut self, name: &str, help: &str, kind: &str) {
        if !self.declared.iter().any(|d| d == name) {
            let _ = writeln!(self.out, "# HELP {name} {help}");
            let _ = writeln!(self.out, "# TYPE {name} {kind}");
            self.declared.push(name.to_owned());
        }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"");
                for c in v.chars() {
                    match c {
                        '\\' => self.out.push_str("\\\\"),
                        '"' => self.out.push_str("\\\""),
                        '\n' => self.out.push_str("\\n"),
                        c => self.out.push(c),
                    }
                }
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A counter sample (`name` should end in `_total`).
    pub fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.declare(name, help, "counter");
        self.sample(name, labels, value);
    }

    /// A gauge sample.
    pub fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.declare(name, help, "gauge");
        self.sample(name, labels, value);
    }

    /// A histogram: cumulative counts per upper bound (seconds), the sum and the count.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        buckets: &[(f64, u64)],
        sum: f64,
        count: u64,
    ) {
        self.declare(name, help, "histogram");
        let bucket = format!("{name}_bucket");
        for (le, n) in buckets {
            self.sample(&bucket, &[("le", &le.to_string())], *n as f64);
        }
        self.sample(&bucket, &[("le", "+Inf")], count as f64);
        self.sample(&format!("{name}_sum"), &[], sum);
        self.sample(&format!("{name}_count"), &[], count as f64);
    }

    /// The page.
    pub fn finish(self) -> String {
        self.out
    }
}

/// A renderer of further metrics (the pipeline's, from the binary).
pub type Render = Arc<dyn Fn(&mut Exposition) + Send + Sync>;

/// Everything `/metrics` shows.
#[derive(Clone, Default)]
pub struct Sources {
    /// The dispatcher's counters, when this process dispatches.
    pub delivery: Option<Arc<DeliveryMetrics>>,
    /// The feed's counters (set by the server itself).
    pub feed: Option<Arc<FeedMetrics>>,
    /// Anything else (the Kafka pipeline's metrics).
    pub extra: Option<Render>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources")
            .field("delivery", &self.delivery.is_some())
            .field("feed", &self.feed.is_some())
            .field("extra", &self.extra.is_some())
            .finish()
    }
}

impl Sources {
    /// Writes every source's metrics.
    pub fn render(&self, out: &mut Exposition) {
        if let Some(extra) = &self.extra {
            extra(out);
        }
        if let Some(d) = &self.delivery {
            for ((receiver, outcome), n) in d.snapshot() {
                out.counter(
                    "keywatch_deliveries_total",
                    "Alert deliveries by receiver and outcome (delivered, retry, rejected, gone, suppressed).",
                    &[("receiver", &receiver), ("outcome", outcome)],
                    n as f64,
                );
            }
            out.counter(
                "keywatch_alerts_routed_total",
                "Alerts the dispatcher turned into deliveries.",
                &[],
                d.routed.load(std::sync::atomic::Ordering::Relaxed) as f64,
            );
            out.counter(
                "keywatch_dispatcher_errors_total",
                "Dispatcher rounds that failed on a Postgres error (retried).",
                &[],
                d.errors.load(std::sync::atomic::Ordering::Relaxed) as f64,
            );
        }
        if let Some(f) = &self.feed {
            for ((endpoint, status), n) in f.snapshot() {
                out.counter(
                    "keywatch_feed_requests_total",
                    "Feed requests by endpoint and HTTP status.",
                    &[("endpoint", endpoint), ("status", &status.to_string())],
                    n as f64,
                );
            }
            f.connections.render(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_format() {
        let mut e = Exposition::default();
        e.counter("a_total", "A.", &[("k", "x\"y")], 2.0);
        e.counter("a_total", "A.", &[("k", "z")], 3.0);
        e.histogram("h_seconds", "H.", &[(0.1, 1), (1.0, 3)], 1.5, 4);
        let s = e.finish();
        assert_eq!(s.matches("# TYPE a_total counter").count(), 1);
        assert!(s.contains("a_total{k=\"x\\\"y\"} 2\n"), "{s}");
        assert!(s.contains("h_seconds_bucket{le=\"+Inf\"} 4\n"), "{s}");
        assert!(s.contains("h_seconds_count 4\n"), "{s}");
    }
}
