//! What an instance tells the others about itself every second ([`InstanceReport`]), and the
//! cluster-wide figures merged from the latest report of every instance ([`ClusterStats`]).

use std::collections::{BTreeMap, HashMap};

use domain::activity::WINDOW_SECS;
use serde::{Deserialize, Serialize};

/// Tenants one report names at most (the busiest); the rest only count in the totals.
pub const MAX_REPORTED_TENANTS: usize = 100;
/// Channels one report and the cluster-wide figures rank.
pub const TOP_CHANNELS: usize = 10;
/// Webhook failures one instance and the cluster-wide figures list, newest first.
pub const FAILURES_KEPT: usize = 20;
/// A report older than this marks its instance silent: it is listed, but its figures no longer
/// count.
pub const SILENT_AFTER_MS: u64 = 3_000;

/// Messages and webhooks over the last [`WINDOW_SECS`] seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Flow {
    /// Messages published through the service (client frames, webhooks, server API, outbox,
    /// presence announcements).
    pub messages_in: u64,
    /// Frames of those messages queued for clients.
    pub messages_out: u64,
    pub webhooks_accepted: u64,
    pub webhooks_refused: u64,
}

impl Flow {
    fn add(&mut self, other: &Self) {
        self.messages_in += other.messages_in;
        self.messages_out += other.messages_out;
        self.webhooks_accepted += other.webhooks_accepted;
        self.webhooks_refused += other.webhooks_refused;
    }

    /// Messages in and out.
    pub(crate) fn traffic(&self) -> u64 {
        self.messages_in + self.messages_out
    }
}

/// One tenant's figures on one instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TenantFigures {
    pub tenant: String,
    pub connections: usize,
    /// Distinct users with a connection on this instance.
    pub users: usize,
    pub flow: Flow,
    /// Per provider, webhooks accepted and refused over the window (providers configured for
    /// the tenant only).
    pub webhooks: BTreeMap<String, Verdicts>,
}

/// Webhooks accepted and refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Verdicts {
    pub accepted: u64,
    pub refused: u64,
}

/// A channel and its messages over the window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelFigures {
    pub channel: String,
    pub messages: u64,
}

/// A refused webhook: when, to whom, and why. Never its secrets, signature or payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookFailure {
    /// Unix milliseconds.
    pub at_ms: u64,
    /// The tenant named by the request, when it is a valid tenant id.
    pub tenant: Option<String>,
    /// The provider named by the request, when it is a valid provider name.
    pub provider: Option<String>,
    /// The outcome, as labelled in the metrics: `unauthorized`, `bad_request`, `not_found`,
    /// `too_large`, `invalid_json`, `in_progress`, `unavailable`.
    pub result: String,
    pub reason: String,
}

/// One instance's figures, sent to every instance every second through the broker.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct InstanceReport {
    /// Drawn at random when the instance starts.
    pub id: String,
    /// The instance's host name, when the environment gives one (`HOSTNAME`).
    pub host: Option<String>,
    pub version: String,
    /// Unix milliseconds.
    pub started_at_ms: u64,
    /// Unix milliseconds.
    pub sent_at_ms: u64,
    pub connections: usize,
    /// Topic subscriptions of its connections.
    pub subscriptions: usize,
    pub broker_ready: bool,
    pub draining: bool,
    /// Every tenant's, those left out of `tenants` included.
    pub totals: Flow,
    /// The busiest tenants, at most [`MAX_REPORTED_TENANTS`].
    pub tenants: Vec<TenantFigures>,
    /// Tenants with connections or traffic that `tenants` leaves out.
    pub tenants_left_out: usize,
    /// The channels with the most messages published through this instance.
    pub top_channels: Vec<ChannelFigures>,
    /// This instance's latest refused webhooks, newest first.
    pub webhook_failures: Vec<WebhookFailure>,
}

/// Messages per second over the window, from a count over it (two decimals).
fn per_sec(count: u64) -> f64 {
    let rate = count as f64 / WINDOW_SECS as f64;
    (rate * 100.0).round() / 100.0
}

/// Message figures over the window, as `GET /api/stats` shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowStats {
    pub messages_in_per_sec: f64,
    pub messages_out_per_sec: f64,
    pub messages_in_last_minute: u64,
    pub messages_out_last_minute: u64,
    pub webhooks_accepted_last_minute: u64,
    pub webhooks_refused_last_minute: u64,
}

impl From<Flow> for FlowStats {
    fn from(flow: Flow) -> Self {
        Self {
            messages_in_per_sec: per_sec(flow.messages_in),
            messages_out_per_sec: per_sec(flow.messages_out),
            messages_in_last_minute: flow.messages_in,
            messages_out_last_minute: flow.messages_out,
            webhooks_accepted_last_minute: flow.webhooks_accepted,
            webhooks_refused_last_minute: flow.webhooks_refused,
        }
    }
}

/// One instance as `GET /api/stats` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub id: String,
    pub host: Option<String>,
    pub version: String,
    pub uptime_secs: u64,
    pub connections: usize,
    pub subscriptions: usize,
    /// `up` or `down`.
    pub broker: String,
    pub draining: bool,
    /// How long ago its latest report arrived.
    pub report_age_ms: u64,
    /// No report for [`SILENT_AFTER_MS`]: stopped, or cut off from the broker. Its figures are
    /// left out of the rest.
    pub silent: bool,
}

/// One tenant over every instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantStats {
    pub tenant: String,
    pub connections: usize,
    /// Distinct users per instance, summed: a user connected to two instances counts twice.
    pub users: usize,
    /// Instances the tenant has connections on.
    pub instances: usize,
    /// The tenant's connections on each instance that has some, by instance id.
    pub connections_by_instance: BTreeMap<String, usize>,
    #[serde(flatten)]
    pub flow: FlowStats,
    pub webhooks: BTreeMap<String, Verdicts>,
}

/// One channel over every instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelStats {
    pub channel: String,
    pub messages_per_sec: f64,
    pub messages_last_minute: u64,
}

/// The sums over every live instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    /// Instances that reported within [`SILENT_AFTER_MS`].
    pub instances: usize,
    pub connections: usize,
    pub subscriptions: usize,
    /// Tenants the reports name (each instance names its busiest).
    pub tenants: usize,
    #[serde(flatten)]
    pub flow: FlowStats,
}

/// The cluster-wide figures: `GET /api/stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStats {
    /// Unix milliseconds.
    pub generated_at_ms: u64,
    /// The span of every "last minute" figure and rate.
    pub window_secs: u64,
    pub instances: Vec<InstanceStatus>,
    pub totals: Totals,
    /// Busiest first: by connections, then by messages.
    pub tenants: Vec<TenantStats>,
    /// Tenants left out of `tenants`: by an instance's report (it names its busiest only; a
    /// tenant left out by two instances counts twice), or beyond [`MAX_REPORTED_TENANTS`] here.
    pub tenants_left_out: usize,
    pub top_channels: Vec<ChannelStats>,
    pub webhook_failures: Vec<WebhookFailure>,
}

impl ClusterStats {
    /// Merges the latest report of each instance, with how long ago (ms) it arrived, as of
    /// `now_ms`. Silent instances are listed and otherwise left out.
    pub fn merge<'a>(reports: impl IntoIterator<Item = (&'a InstanceReport, u64)>, now_ms: u64) -> Self {
        let mut instances = Vec::new();
        let mut tenants: HashMap<&str, TenantStatsSum> = HashMap::new();
        let mut channels: HashMap<&str, u64> = HashMap::new();
        let mut failures: Vec<&WebhookFailure> = Vec::new();
        let (mut flow, mut connections, mut subscriptions, mut live, mut left_out) =
            (Flow::default(), 0, 0, 0, 0);
        for (report, age_ms) in reports {
            let silent = age_ms > SILENT_AFTER_MS;
            instances.push(InstanceStatus {
                id: report.id.clone(),
                host: report.host.clone(),
                version: report.version.clone(),
                uptime_secs: now_ms.saturating_sub(report.started_at_ms) / 1000,
                connections: report.connections,
                subscriptions: report.subscriptions,
                broker: if report.broker_ready { "up" } else { "down" }.to_owned(),
                draining: report.draining,
                report_age_ms: age_ms,
                silent,
            });
            if silent {
                continue;
            }
            failures.extend(&report.webhook_failures);
            live += 1;
            connections += report.connections;
            subscriptions += report.subscriptions;
            flow.add(&report.totals);
            left_out += report.tenants_left_out;
            for figures in &report.tenants {
                let sum = tenants.entry(&figures.tenant).or_default();
                sum.connections += figures.connections;
                sum.users += figures.users;
                if figures.connections > 0 {
                    sum.instances += 1;
                    sum.by_instance.insert(report.id.clone(), figures.connections);
                }
                sum.flow.add(&figures.flow);
                for (provider, verdicts) in &figures.webhooks {
                    let entry = sum.webhooks.entry(provider.clone()).or_default();
                    entry.accepted += verdicts.accepted;
                    entry.refused += verdicts.refused;
                }
            }
            for channel in &report.top_channels {
                *channels.entry(&channel.channel).or_default() += channel.messages;
            }
        }
        instances.sort_by(|a, b| (a.host.as_deref(), &a.id).cmp(&(b.host.as_deref(), &b.id)));
        let tenant_count = tenants.len();
        let mut tenants: Vec<TenantStats> = tenants
            .into_iter()
            .map(|(tenant, sum)| TenantStats {
                tenant: tenant.to_owned(),
                connections: sum.connections,
                users: sum.users,
                instances: sum.instances,
                connections_by_instance: sum.by_instance,
                flow: sum.flow.into(),
                webhooks: sum.webhooks,
            })
            .collect();
        tenants.sort_by(|a, b| {
            let traffic = |t: &TenantStats| t.flow.messages_in_last_minute + t.flow.messages_out_last_minute;
            (b.connections, traffic(b))
                .cmp(&(a.connections, traffic(a)))
                .then_with(|| a.tenant.cmp(&b.tenant))
        });
        left_out += tenants.len().saturating_sub(MAX_REPORTED_TENANTS);
        tenants.truncate(MAX_REPORTED_TENANTS);
        let mut top_channels: Vec<ChannelStats> = channels
            .into_iter()
            .map(|(channel, messages)| ChannelStats {
                channel: channel.to_owned(),
                messages_per_sec: per_sec(messages),
                messages_last_minute: messages,
            })
            .collect();
        top_channels.sort_by(|a, b| {
            b.messages_last_minute.cmp(&a.messages_last_minute).then_with(|| a.channel.cmp(&b.channel))
        });
        top_channels.truncate(TOP_CHANNELS);
        failures.sort_by_key(|failure| std::cmp::Reverse(failure.at_ms));
        let webhook_failures = failures.into_iter().take(FAILURES_KEPT).cloned().collect();
        Self {
            generated_at_ms: now_ms,
            window_secs: WINDOW_SECS,
            instances,
            totals: Totals {
                instances: live,
                connections,
                subscriptions,
                tenants: tenant_count,
                flow: flow.into(),
            },
            tenants,
            tenants_left_out: left_out,
            top_channels,
            webhook_failures,
        }
    }
}

#[derive(Default)]
struct TenantStatsSum {
    connections: usize,
    users: usize,
    instances: usize,
    by_instance: BTreeMap<String, usize>,
    flow: Flow,
    webhooks: BTreeMap<String, Verdicts>,
}

/// One point of the charts: the cluster at one second.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Unix milliseconds.
    pub at_ms: u64,
    pub connections: usize,
    pub messages_in_per_sec: f64,
    pub messages_out_per_sec: f64,
    /// The busiest tenants at that second, at most [`CHARTED_TENANTS`].
    pub tenants: Vec<TenantSample>,
}

/// Tenants one [`Sample`] holds.
pub const CHARTED_TENANTS: usize = 8;

/// One tenant in a [`Sample`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantSample {
    pub tenant: String,
    pub connections: usize,
    pub messages_in_per_sec: f64,
    pub messages_out_per_sec: f64,
}

impl Sample {
    pub fn of(stats: &ClusterStats) -> Self {
        Self {
            at_ms: stats.generated_at_ms,
            connections: stats.totals.connections,
            messages_in_per_sec: stats.totals.flow.messages_in_per_sec,
            messages_out_per_sec: stats.totals.flow.messages_out_per_sec,
            tenants: stats
                .tenants
                .iter()
                .take(CHARTED_TENANTS)
                .map(|t| TenantSample {
                    tenant: t.tenant.clone(),
                    connections: t.connections,
                    messages_in_per_sec: t.flow.messages_in_per_sec,
                    messages_out_per_sec: t.flow.messages_out_per_sec,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(id: &str, tenants: &[(&str, usize, u64)]) -> InstanceReport {
        InstanceReport {
            id: id.to_owned(),
            version: "1".to_owned(),
            started_at_ms: 1_000,
            broker_ready: true,
            connections: tenants.iter().map(|t| t.1).sum(),
            totals: Flow { messages_in: tenants.iter().map(|t| t.2).sum(), ..Flow::default() },
            tenants: tenants
                .iter()
                .map(|(tenant, connections, messages_in)| TenantFigures {
                    tenant: (*tenant).to_owned(),
                    connections: *connections,
                    users: *connections,
                    flow: Flow { messages_in: *messages_in, ..Flow::default() },
                    webhooks: BTreeMap::new(),
                })
                .collect(),
            top_channels: vec![ChannelFigures { channel: "tenant:acme".to_owned(), messages: 60 }],
            ..InstanceReport::default()
        }
    }

    #[test]
    fn the_cluster_sums_live_instances_and_lists_silent_ones_without_counting_them() {
        let a = report("a", &[("acme", 3, 60), ("globex", 1, 0)]);
        let b = report("b", &[("acme", 2, 120)]);
        let gone = report("c", &[("acme", 50, 6000)]);
        let stats = ClusterStats::merge([(&a, 100), (&b, 900), (&gone, SILENT_AFTER_MS + 1)], 61_000);
        assert_eq!(stats.instances.len(), 3);
        assert!(stats.instances.iter().any(|i| i.id == "c" && i.silent));
        assert_eq!(stats.instances[0].uptime_secs, 60);
        assert_eq!(stats.totals.instances, 2);
        assert_eq!(stats.totals.connections, 6);
        assert_eq!(stats.totals.flow.messages_in_last_minute, 180);
        assert_eq!(stats.totals.flow.messages_in_per_sec, 3.0);
        let acme = &stats.tenants[0];
        assert_eq!((acme.tenant.as_str(), acme.connections, acme.instances), ("acme", 5, 2));
        let by_instance: Vec<(&str, usize)> =
            acme.connections_by_instance.iter().map(|(id, n)| (id.as_str(), *n)).collect();
        assert_eq!(by_instance, [("a", 3), ("b", 2)]);
        assert_eq!(acme.flow.messages_in_per_sec, 3.0);
        assert_eq!(stats.tenants[1].tenant, "globex");
        assert_eq!(stats.top_channels[0].messages_last_minute, 120, "summed over live instances");
    }

    #[test]
    fn failures_of_every_instance_are_merged_newest_first_and_bounded() {
        let mut a = report("a", &[]);
        let mut b = report("b", &[]);
        for n in 0..FAILURES_KEPT as u64 {
            let failure = |at_ms| WebhookFailure {
                at_ms,
                tenant: None,
                provider: None,
                result: "unauthorized".to_owned(),
                reason: "x".to_owned(),
            };
            a.webhook_failures.push(failure(2 * n));
            b.webhook_failures.push(failure(2 * n + 1));
        }
        let stats = ClusterStats::merge([(&a, 0), (&b, 0)], 100);
        assert_eq!(stats.webhook_failures.len(), FAILURES_KEPT);
        assert_eq!(stats.webhook_failures[0].at_ms, 2 * FAILURES_KEPT as u64 - 1);
    }

    #[test]
    fn a_report_survives_the_broker_as_json_and_tolerates_fields_it_does_not_know() {
        let a = report("a", &[("acme", 1, 2)]);
        let json = serde_json::to_string(&a).expect("serializable");
        let back: InstanceReport = serde_json::from_str(&json).expect("readable");
        assert_eq!(back, a);
        let newer: InstanceReport =
            serde_json::from_str(r#"{"id":"x","something_new":1}"#).expect("unknown fields ignored");
        assert_eq!(newer.id, "x");
        let command = crate::ports::ControlCommand::Report(Box::new(a));
        let json = serde_json::to_string(&command).expect("serializable");
        assert!(json.starts_with(r#"{"command":"report","#), "{json}");
        let back: crate::ports::ControlCommand = serde_json::from_str(&json).expect("readable");
        assert_eq!(back, command);
    }
}
