//! Sweep connections: the heartbeat and every time limit of a live connection, in one pass
//! over the hub. Run it every fraction of a second; each connection costs a few atomic reads.
//!
//! For each connection, in this order:
//! 1. its token expired (plus leeway) and was not refreshed → close 4001;
//! 2. nothing at all (not even a pong) for the idle timeout → close 1001 (peer presumed gone);
//! 3. no data frame for the inactivity timeout → close 4003;
//! 4. otherwise, ping it if the last heartbeat ping is a ping interval old.

use std::sync::Arc;

use domain::CloseReason;

use crate::Settings;
use crate::hub::Hub;
use crate::ports::{Clock, Metrics, NoMetrics};

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub expired: usize,
    pub idle: usize,
    pub inactive: usize,
}

impl SweepReport {
    pub fn closed(&self) -> usize {
        self.expired + self.idle + self.inactive
    }
}

/// The sweep use-case.
pub struct SweepInactiveConnections {
    hub: Arc<Hub>,
    clock: Arc<dyn Clock>,
    ping_interval_ms: u64,
    idle_timeout_ms: u64,
    inactivity_timeout_ms: u64,
    metrics: Arc<dyn Metrics>,
}

impl std::fmt::Debug for SweepInactiveConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SweepInactiveConnections")
            .field("ping_interval_ms", &self.ping_interval_ms)
            .field("idle_timeout_ms", &self.idle_timeout_ms)
            .field("inactivity_timeout_ms", &self.inactivity_timeout_ms)
            .finish_non_exhaustive()
    }
}

impl SweepInactiveConnections {
    pub fn new(hub: Arc<Hub>, clock: Arc<dyn Clock>, settings: &Settings) -> Self {
        Self {
            hub,
            clock,
            ping_interval_ms: settings.ping_interval_ms,
            idle_timeout_ms: settings.idle_timeout_ms,
            inactivity_timeout_ms: settings.inactivity_timeout_ms,
            metrics: Arc::new(NoMetrics),
        }
    }

    /// Also reports the broker's state and the subscribed channels to `metrics` on every
    /// sweep.
    pub fn with_metrics(mut self, metrics: Arc<dyn Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// One pass over every connection. Closed connections unregister themselves once their
    /// socket is closed.
    pub fn sweep(&self) -> SweepReport {
        let now = self.clock.now();
        self.metrics.broker_up(self.hub.broker_ready());
        // The tenant and user channels, plus global:broadcast and system:events.
        self.metrics.subscribed_channels(self.hub.channel_count() + 2);
        self.metrics.subscriptions(self.hub.topic_subscriptions());
        let mut report = SweepReport::default();
        self.hub.for_each(|handle| {
            if handle.is_closing() {
                // Already on its way out; counted when it was closed.
                return;
            }
            if handle.expires_at().is_some_and(|deadline| now > deadline) {
                handle.close(CloseReason::TokenExpired);
                report.expired += 1;
            } else if now.millis_since(handle.last_seen()) > self.idle_timeout_ms {
                handle.close(CloseReason::IdleTimeout);
                report.idle += 1;
            } else if now.millis_since(handle.last_activity()) > self.inactivity_timeout_ms {
                handle.close(CloseReason::Inactive);
                report.inactive += 1;
            } else {
                handle.ping_if_due(now, self.ping_interval_ms);
            }
        });
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::MockMessageBroker;
    use crate::use_cases::test_support::*;
    use domain::Timestamp;

    fn hub() -> Arc<Hub> {
        let mut broker = MockMessageBroker::new();
        broker.expect_is_ready().returning(|| true);
        broker.expect_subscribe().returning(|_| ());
        broker.expect_unsubscribe().returning(|_| ());
        broker.expect_until_active().returning(|_| ack_ok());
        broker.expect_history().returning(|_, _| Ok(crate::ports::HistoryRead::default()));
        Arc::new(Hub::new(Arc::new(broker), 10))
    }

    fn settings() -> Settings {
        Settings {
            ping_interval_ms: 10_000,
            idle_timeout_ms: 30_000,
            inactivity_timeout_ms: 100_000,
            ..Settings::default()
        }
    }

    fn sweep_at(hub: &Arc<Hub>, millis: u64) -> SweepReport {
        SweepInactiveConnections::new(hub.clone(), Arc::new(clock_at(millis)), &settings()).sweep()
    }

    #[tokio::test]
    async fn live_connections_are_pinged_once_per_interval() {
        let hub = hub();
        let sink = RecordingSink::new();
        let session = session_with_sink(&hub, "bob", "acme", sink.clone()).await;
        assert_eq!(sweep_at(&hub, NOW + 5_000), SweepReport::default());
        assert_eq!(sink.pings(), 0, "not due yet");
        sweep_at(&hub, NOW + 10_000);
        sweep_at(&hub, NOW + 12_000);
        assert_eq!(sink.pings(), 1);
        session.handle().seen(Timestamp::from_unix_millis(NOW + 15_000));
        sweep_at(&hub, NOW + 20_000);
        assert_eq!(sink.pings(), 2);
        assert_eq!(sink.closed(), None);
    }

    #[tokio::test]
    async fn a_silent_peer_is_closed_after_the_idle_timeout_but_a_ponging_one_is_not() {
        let hub = hub();
        let (silent, ponging) = (RecordingSink::new(), RecordingSink::new());
        let _silent = session_with_sink(&hub, "bob", "acme", silent.clone()).await;
        let alive = session_with_sink(&hub, "eve", "acme", ponging.clone()).await;
        alive.handle().seen(Timestamp::from_unix_millis(NOW + 25_000));
        assert_eq!(sweep_at(&hub, NOW + 30_000).idle, 0, "exactly the timeout is not longer than it");
        assert_eq!(sweep_at(&hub, NOW + 30_001).idle, 1);
        assert_eq!(silent.closed(), Some(CloseReason::IdleTimeout));
        assert_eq!(ponging.closed(), None);
    }

    #[tokio::test]
    async fn a_connection_that_only_pongs_is_closed_after_the_inactivity_timeout() {
        let hub = hub();
        let sink = RecordingSink::new();
        let session = session_with_sink(&hub, "bob", "acme", sink.clone()).await;
        session.handle().seen(Timestamp::from_unix_millis(NOW + 95_000));
        assert_eq!(sweep_at(&hub, NOW + 100_001).inactive, 1);
        assert_eq!(sink.closed(), Some(CloseReason::Inactive));
    }

    #[tokio::test]
    async fn each_sweep_reports_the_broker_state_and_the_subscribed_channels() {
        let hub = hub();
        let _bob = session(&hub, "bob", "acme").await;
        let _eve = session(&hub, "eve", "acme").await;
        let mut metrics = crate::ports::MockMetrics::new();
        metrics.expect_broker_up().withf(|up| *up).times(1).returning(|_| ());
        // tenant:acme, user:acme:bob, user:acme:eve, global:broadcast, system:events.
        metrics.expect_subscribed_channels().withf(|n| *n == 5).times(1).returning(|_| ());
        metrics.expect_subscriptions().withf(|n| *n == 0).times(1).returning(|_| ());
        SweepInactiveConnections::new(hub, Arc::new(clock_at(NOW)), &settings())
            .with_metrics(Arc::new(metrics))
            .sweep();
    }

    #[tokio::test]
    async fn a_connection_whose_token_expired_is_closed_with_4001() {
        let hub = hub();
        let sink = RecordingSink::new();
        let session = session_with_sink(&hub, "bob", "acme", sink.clone()).await;
        session.handle().extend(Some(Timestamp::from_unix_millis(NOW + 1_000)));
        assert_eq!(sweep_at(&hub, NOW + 1_000).expired, 0);
        assert_eq!(sweep_at(&hub, NOW + 1_001).expired, 1);
        assert_eq!(sink.closed(), Some(CloseReason::TokenExpired));
    }
}
