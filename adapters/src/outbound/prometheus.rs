//! `PrometheusMetrics`: the `Metrics` port in the Prometheus text format.
//!
//! Each instance owns its recorder (none is installed globally), so several instances in one
//! process — as in the tests — keep separate numbers. The metrics that move with every message
//! are registered once; the rest are looked up when they change.

use std::sync::Arc;

use application::ports::{ConnectionOutcome, DropReason, MessageSource, Metrics};
use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

static METADATA: Metadata<'static> = Metadata::new("lq_realtime", Level::INFO, None);

/// Buckets of the latency histograms, in seconds.
const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Buckets of the connection duration histogram, in seconds.
const DURATION_BUCKETS: &[f64] = &[1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0];

const ATTEMPTS: [ConnectionOutcome; 7] = [
    ConnectionOutcome::Accepted,
    ConnectionOutcome::Unauthorized,
    ConnectionOutcome::Forbidden,
    ConnectionOutcome::OverCapacity,
    ConnectionOutcome::RateLimited,
    ConnectionOutcome::Unavailable,
    ConnectionOutcome::Overloaded,
];
const SOURCES: [MessageSource; 4] =
    [MessageSource::Client, MessageSource::Webhook, MessageSource::Broker, MessageSource::Api];
const DROPS: [DropReason; 5] = [
    DropReason::SlowConsumer,
    DropReason::Invalid,
    DropReason::RateLimited,
    DropReason::BrokerUnavailable,
    DropReason::Gap,
];

/// The connection metrics of one transport.
struct TransportSeries {
    transport: &'static str,
    connections: Gauge,
    /// One per [`ATTEMPTS`], in its order.
    attempts: Vec<Counter>,
    duration: Histogram,
}

impl TransportSeries {
    fn register(recorder: &PrometheusRecorder, transport: &'static str) -> Self {
        let label = ("transport", transport);
        Self {
            transport,
            connections: recorder.register_gauge(&key("lq_connections", &[label]), &METADATA),
            attempts: ATTEMPTS
                .iter()
                .map(|o| {
                    recorder.register_counter(
                        &key("lq_connections_total", &[label, ("result", o.as_str())]),
                        &METADATA,
                    )
                })
                .collect(),
            duration: recorder
                .register_histogram(&key("lq_connection_duration_seconds", &[label]), &METADATA),
        }
    }
}

/// Metrics of one instance, rendered for Prometheus.
pub struct PrometheusMetrics {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
    /// The transports named at start; any other is registered when it is first reported.
    transports: Vec<TransportSeries>,
    received: Vec<Counter>,
    sent: Counter,
    dropped: Vec<Counter>,
    webhook_seconds: Histogram,
    publish_seconds: Histogram,
    lag_seconds: Histogram,
    broker_up: Gauge,
    subscribed: Gauge,
    subscriptions: Gauge,
    /// Outbox rows removed: published (0) and rejected (1).
    outbox_rows: [Counter; 2],
    outbox_pending: Gauge,
    outbox_lag: Gauge,
    /// `result="not_recovered"`, then `result="recovered"`.
    recoveries: [Counter; 2],
}

impl std::fmt::Debug for PrometheusMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrometheusMetrics").finish_non_exhaustive()
    }
}

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    let labels: Vec<Label> = labels.iter().map(|(k, v)| Label::new(*k, (*v).to_owned())).collect();
    Key::from_parts(name, labels)
}

impl PrometheusMetrics {
    /// The metrics of an instance of `version` whose clients connect over `transports` (their
    /// series are rendered from the start, at zero).
    pub fn new(version: &str, transports: &[&'static str]) -> Self {
        let builder = PrometheusBuilder::new()
            .set_buckets(LATENCY_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("lq_connection_duration_seconds".to_owned()),
                    DURATION_BUCKETS,
                )
            })
            .unwrap_or_else(|_| unreachable!("the bucket lists are not empty"));
        let recorder = Arc::new(builder.build_recorder());
        let handle = recorder.handle();
        let r = &recorder;
        let describe = |name: &'static str, unit: Option<Unit>, text: &'static str| {
            r.describe_counter(name.into(), unit, SharedString::const_str(text));
        };
        describe("lq_connections_total", None, "Client connection attempts by transport and result.");
        describe("lq_messages_received_total", None, "Messages that entered the service, by source.");
        describe("lq_messages_sent_total", None, "Frames queued for clients by channel fan-outs.");
        describe("lq_messages_dropped_total", None, "Messages or frames not delivered, by reason.");
        describe("lq_auth_failures_total", None, "Refused tokens, by reason.");
        describe("lq_webhooks_total", None, "Webhooks by provider and result.");
        describe(
            "lq_recoveries_total",
            None,
            "Reconnecting clients that asked for missed messages, by result (recovered or not).",
        );
        r.describe_gauge("lq_outbox_pending".into(), None, "Outbox rows waiting to be published.".into());
        r.describe_gauge(
            "lq_outbox_lag_seconds".into(),
            Some(Unit::Seconds),
            "Age of the oldest outbox row waiting.".into(),
        );
        describe("lq_outbox_rows_total", None, "Outbox rows removed, by result (published or rejected).");
        r.describe_gauge("lq_connections".into(), None, "Open client connections, by transport.".into());
        r.describe_gauge("lq_broker_up".into(), None, "1 when the broker can publish and receive.".into());
        r.describe_gauge(
            "lq_subscribed_channels".into(),
            None,
            "Broker channels this instance listens on.".into(),
        );
        r.describe_gauge(
            "lq_subscriptions".into(),
            None,
            "Topic subscriptions of this instance's connections.".into(),
        );
        r.describe_gauge("lq_build_info".into(), None, "Always 1; the version is a label.".into());
        for (name, text) in [
            ("lq_connection_duration_seconds", "Lifetime of closed client connections, by transport."),
            ("lq_webhook_processing_seconds", "Time from webhook received to answer decided."),
            ("lq_broker_publish_seconds", "Time for the broker to accept one publish."),
            ("lq_pubsub_lag_seconds", "Envelope timestamp to delivery on this instance."),
        ] {
            r.describe_histogram(name.into(), Some(Unit::Seconds), text.into());
        }
        r.register_gauge(&key("lq_build_info", &[("version", version)]), &METADATA).set(1.0);
        Self {
            transports: transports.iter().map(|t| TransportSeries::register(r, t)).collect(),
            received: SOURCES
                .iter()
                .map(|s| {
                    r.register_counter(
                        &key("lq_messages_received_total", &[("source", s.as_str())]),
                        &METADATA,
                    )
                })
                .collect(),
            sent: r.register_counter(&key("lq_messages_sent_total", &[]), &METADATA),
            dropped: DROPS
                .iter()
                .map(|d| {
                    r.register_counter(
                        &key("lq_messages_dropped_total", &[("reason", d.as_str())]),
                        &METADATA,
                    )
                })
                .collect(),
            webhook_seconds: r.register_histogram(&key("lq_webhook_processing_seconds", &[]), &METADATA),
            publish_seconds: r.register_histogram(&key("lq_broker_publish_seconds", &[]), &METADATA),
            lag_seconds: r.register_histogram(&key("lq_pubsub_lag_seconds", &[]), &METADATA),
            broker_up: r.register_gauge(&key("lq_broker_up", &[]), &METADATA),
            subscribed: r.register_gauge(&key("lq_subscribed_channels", &[]), &METADATA),
            subscriptions: r.register_gauge(&key("lq_subscriptions", &[]), &METADATA),
            outbox_rows: ["published", "rejected"].map(|result| {
                r.register_counter(&key("lq_outbox_rows_total", &[("result", result)]), &METADATA)
            }),
            outbox_pending: r.register_gauge(&key("lq_outbox_pending", &[]), &METADATA),
            outbox_lag: r.register_gauge(&key("lq_outbox_lag_seconds", &[]), &METADATA),
            recoveries: ["not_recovered", "recovered"].map(|result| {
                r.register_counter(&key("lq_recoveries_total", &[("result", result)]), &METADATA)
            }),
            recorder,
            handle,
        }
    }

    /// The metrics in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Runs `f` on the series of `transport`.
    fn with_transport(&self, transport: &'static str, f: impl FnOnce(&TransportSeries)) {
        match self.transports.iter().find(|series| series.transport == transport) {
            Some(series) => f(series),
            None => f(&TransportSeries::register(&self.recorder, transport)),
        }
    }

    /// Drains histogram buffers; run it every few seconds.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }
}

impl Metrics for PrometheusMetrics {
    fn connection_attempt(&self, transport: &'static str, outcome: ConnectionOutcome) {
        self.with_transport(transport, |series| {
            if let Some(index) = ATTEMPTS.iter().position(|o| *o == outcome) {
                series.attempts[index].increment(1);
            }
            if outcome == ConnectionOutcome::Accepted {
                series.connections.increment(1.0);
            }
        });
    }

    fn connection_closed(&self, transport: &'static str, seconds: f64) {
        self.with_transport(transport, |series| {
            series.connections.decrement(1.0);
            series.duration.record(seconds);
        });
    }

    fn auth_failure(&self, reason: &'static str) {
        self.recorder
            .register_counter(&key("lq_auth_failures_total", &[("reason", reason)]), &METADATA)
            .increment(1);
    }

    fn message_received(&self, source: MessageSource) {
        if let Some(index) = SOURCES.iter().position(|s| *s == source) {
            self.received[index].increment(1);
        }
    }

    fn messages_sent(&self, frames: u64) {
        self.sent.increment(frames);
    }

    fn messages_dropped(&self, reason: DropReason, count: u64) {
        if let Some(index) = DROPS.iter().position(|d| *d == reason) {
            self.dropped[index].increment(count);
        }
    }

    fn webhook(&self, provider: &str, result: &'static str, seconds: f64) {
        self.recorder
            .register_counter(
                &key("lq_webhooks_total", &[("provider", provider), ("result", result)]),
                &METADATA,
            )
            .increment(1);
        self.webhook_seconds.record(seconds);
    }

    fn broker_publish(&self, seconds: f64) {
        self.publish_seconds.record(seconds);
    }

    fn pubsub_lag(&self, seconds: f64) {
        self.lag_seconds.record(seconds);
    }

    fn broker_up(&self, up: bool) {
        self.broker_up.set(if up { 1.0 } else { 0.0 });
    }

    fn subscribed_channels(&self, count: usize) {
        self.subscribed.set(count as f64);
    }

    fn subscriptions(&self, count: usize) {
        self.subscriptions.set(count as f64);
    }

    fn outbox_row(&self, result: &'static str) {
        self.outbox_rows[usize::from(result != "published")].increment(1);
    }

    fn outbox_pending(&self, rows: u64, oldest_seconds: f64) {
        self.outbox_pending.set(rows as f64);
        self.outbox_lag.set(oldest_seconds);
    }

    fn recovery(&self, recovered: bool) {
        self.recoveries[usize::from(recovered)].increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    #[test]
    fn what_is_reported_is_rendered_with_its_labels() {
        let metrics = PrometheusMetrics::new("1.2.3", &["websocket", "sse"]);
        metrics.connection_attempt("websocket", ConnectionOutcome::Accepted);
        metrics.connection_attempt("websocket", ConnectionOutcome::Accepted);
        metrics.connection_attempt("websocket", ConnectionOutcome::Unauthorized);
        metrics.connection_closed("websocket", 3.0);
        metrics.connection_attempt("other", ConnectionOutcome::Accepted);
        metrics.auth_failure("expired");
        metrics.message_received(MessageSource::Webhook);
        metrics.messages_sent(5);
        metrics.messages_dropped(DropReason::SlowConsumer, 2);
        metrics.webhook("github", "accepted", 0.01);
        metrics.broker_up(true);
        metrics.subscribed_channels(7);
        metrics.subscriptions(3);
        let text = metrics.render();
        for (series, value) in [
            (r#"lq_connections{transport="websocket"}"#, 1),
            (r#"lq_connections{transport="sse"}"#, 0),
            (r#"lq_connections{transport="other"}"#, 1),
            (r#"lq_connections_total{transport="websocket",result="accepted"}"#, 2),
            (r#"lq_connections_total{transport="websocket",result="unauthorized"}"#, 1),
            (r#"lq_connections_total{transport="sse",result="accepted"}"#, 0),
        ] {
            assert_eq!(
                line(&text, &format!("{series} ")),
                Some(format!("{series} {value}").as_str()),
                "{text}"
            );
        }
        assert_eq!(
            line(&text, "lq_auth_failures_total{reason=\"expired\"}"),
            Some("lq_auth_failures_total{reason=\"expired\"} 1")
        );
        assert_eq!(line(&text, "lq_messages_sent_total "), Some("lq_messages_sent_total 5"));
        assert_eq!(
            line(&text, "lq_messages_dropped_total{reason=\"slow_consumer\"}"),
            Some("lq_messages_dropped_total{reason=\"slow_consumer\"} 2")
        );
        assert_eq!(
            line(&text, "lq_webhooks_total{provider=\"github\",result=\"accepted\"}"),
            Some("lq_webhooks_total{provider=\"github\",result=\"accepted\"} 1")
        );
        assert_eq!(line(&text, "lq_broker_up "), Some("lq_broker_up 1"));
        assert_eq!(line(&text, "lq_subscribed_channels "), Some("lq_subscribed_channels 7"));
        assert_eq!(line(&text, "lq_subscriptions "), Some("lq_subscriptions 3"));
        assert_eq!(
            line(&text, "lq_build_info{version=\"1.2.3\"}"),
            Some("lq_build_info{version=\"1.2.3\"} 1")
        );
        assert_eq!(
            line(&text, r#"lq_connection_duration_seconds_count{transport="websocket"}"#),
            Some(r#"lq_connection_duration_seconds_count{transport="websocket"} 1"#)
        );
        assert!(
            line(&text, r#"lq_connection_duration_seconds_bucket{transport="websocket",le="10"} 1"#)
                .is_some(),
            "{text}"
        );
    }

    #[test]
    fn two_instances_keep_separate_numbers() {
        let (a, b) = (PrometheusMetrics::new("x", &[]), PrometheusMetrics::new("x", &[]));
        a.messages_sent(3);
        assert_eq!(line(&b.render(), "lq_messages_sent_total "), Some("lq_messages_sent_total 0"));
    }
}
