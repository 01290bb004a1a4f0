//! Report this instance's figures to every instance, and keep the cluster's figures for the
//! charts: run [`ReportStats::report`] every second.

use std::sync::Arc;

use crate::hub::Hub;
use crate::ports::{Clock, ControlCommand};
use crate::stats::{Activity, ClusterView, InstanceReport};

/// Who this instance is, as its reports name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceInfo {
    /// Unique among the instances: drawn at random at start.
    pub id: String,
    /// The host name, when the environment gives one.
    pub host: Option<String>,
    pub version: String,
}

impl Default for InstanceInfo {
    fn default() -> Self {
        Self { id: "local".to_owned(), host: None, version: env!("CARGO_PKG_VERSION").to_owned() }
    }
}

/// The report-stats use-case.
pub struct ReportStats {
    instance: InstanceInfo,
    started_at_ms: u64,
    hub: Arc<Hub>,
    clock: Arc<dyn Clock>,
    activity: Arc<Activity>,
    cluster: Arc<ClusterView>,
}

impl std::fmt::Debug for ReportStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReportStats").field("instance", &self.instance).finish_non_exhaustive()
    }
}

impl ReportStats {
    pub fn new(
        instance: InstanceInfo,
        hub: Arc<Hub>,
        clock: Arc<dyn Clock>,
        activity: Arc<Activity>,
        cluster: Arc<ClusterView>,
    ) -> Self {
        Self { instance, started_at_ms: clock.now().unix_millis(), hub, clock, activity, cluster }
    }

    /// The cluster as this instance sees it.
    pub fn cluster(&self) -> &Arc<ClusterView> {
        &self.cluster
    }

    /// This instance's figures now.
    pub fn own_report(&self, draining: bool) -> InstanceReport {
        let figures = self.activity.figures(&self.hub.tenants());
        InstanceReport {
            id: self.instance.id.clone(),
            host: self.instance.host.clone(),
            version: self.instance.version.clone(),
            started_at_ms: self.started_at_ms,
            sent_at_ms: self.clock.now().unix_millis(),
            connections: self.hub.len(),
            subscriptions: self.hub.topic_subscriptions(),
            broker_ready: self.hub.broker_ready(),
            draining,
            totals: figures.totals,
            tenants: figures.tenants,
            tenants_left_out: figures.tenants_left_out,
            top_channels: figures.top_channels,
            webhook_failures: figures.webhook_failures,
        }
    }

    /// Keeps this instance's figures, takes the second's sample for the charts, then sends the
    /// figures to every other instance (when the broker takes them: a broker that hangs delays
    /// the next round, never the sample).
    pub async fn report(&self, draining: bool) {
        let report = self.own_report(draining);
        self.cluster.receive(report.clone());
        self.cluster.take_sample();
        if let Err(error) = self.hub.broker().publish_control(&ControlCommand::Report(Box::new(report))).await
        {
            tracing::debug!(%error, "statistics not sent to the other instances");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::ports::{BrokerError, MockMessageBroker};
    use crate::use_cases::test_support::*;

    fn broker(sent: Arc<Mutex<Vec<ControlCommand>>>, up: bool) -> MockMessageBroker {
        let mut broker = MockMessageBroker::new();
        broker.expect_subscribe().returning(|_| ());
        broker.expect_unsubscribe().returning(|_| ());
        broker.expect_until_active().returning(|_| ack_ok());
        broker.expect_history().returning(|_, _| Ok(crate::ports::HistoryRead::default()));
        broker.expect_is_ready().return_const(up);
        broker.expect_publish_control().returning(move |command| {
            sent.lock().expect("lock").push(command.clone());
            if up { Ok(1) } else { Err(BrokerError::Unavailable("down".to_owned())) }
        });
        broker
    }

    fn use_case(broker: MockMessageBroker) -> (ReportStats, Arc<Hub>) {
        let hub = Arc::new(Hub::new(Arc::new(broker), 10));
        let clock: Arc<dyn Clock> = Arc::new(clock_at(NOW));
        let instance =
            InstanceInfo { id: "i1".to_owned(), host: Some("box".to_owned()), version: "9".to_owned() };
        let activity = Arc::new(Activity::new(clock.clone()));
        let cluster = Arc::new(ClusterView::new(clock.clone()));
        (ReportStats::new(instance, hub.clone(), clock, activity, cluster), hub)
    }

    #[tokio::test]
    async fn the_report_names_the_instance_and_its_tenants_and_reaches_the_broker_and_the_charts() {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let (stats, hub) = use_case(broker(sent.clone(), true));
        let _alice = session_with_sink(&hub, "alice", "acme", RecordingSink::new()).await;
        let _alice_again = session_with_sink(&hub, "alice", "acme", RecordingSink::new()).await;
        let _bob = session_with_sink(&hub, "bob", "globex", RecordingSink::new()).await;

        stats.report(false).await;

        let sent = sent.lock().expect("lock").clone();
        let [ControlCommand::Report(report)] = sent.as_slice() else { panic!("one report: {sent:?}") };
        assert_eq!(
            (report.id.as_str(), report.host.as_deref(), report.version.as_str()),
            ("i1", Some("box"), "9")
        );
        assert_eq!(report.connections, 3);
        assert!(report.broker_ready && !report.draining);
        let acme = report.tenants.iter().find(|t| t.tenant == "acme").expect("acme reported");
        assert_eq!((acme.connections, acme.users), (2, 1));
        let seen = stats.cluster().stats();
        assert_eq!(seen.totals.connections, 3, "its own figures count at once");
        assert_eq!(stats.cluster().samples_after(0).len(), 1);
    }

    #[tokio::test]
    async fn with_the_broker_down_the_instance_still_sees_itself() {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let (stats, _hub) = use_case(broker(sent, false));
        stats.report(true).await;
        let seen = stats.cluster().stats();
        assert_eq!(seen.instances.len(), 1);
        assert_eq!((seen.instances[0].broker.as_str(), seen.instances[0].draining), ("down", true));
    }
}
