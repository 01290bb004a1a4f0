//! Disconnect a client: forget it and release the channels nobody else here needs.

use std::sync::Arc;

use crate::ports::{Clock, Metrics, NoMetrics};
use crate::use_cases::connect_client::Session;

/// The disconnect use-case.
pub struct DisconnectClient {
    clock: Option<Arc<dyn Clock>>,
    metrics: Arc<dyn Metrics>,
}

impl std::fmt::Debug for DisconnectClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DisconnectClient").finish_non_exhaustive()
    }
}

impl Default for DisconnectClient {
    fn default() -> Self {
        Self::new()
    }
}

impl DisconnectClient {
    pub fn new() -> Self {
        Self { clock: None, metrics: Arc::new(NoMetrics) }
    }

    /// Reports each connection's duration, measured with `clock`, to `metrics`.
    pub fn with_metrics(mut self, clock: Arc<dyn Clock>, metrics: Arc<dyn Metrics>) -> Self {
        self.clock = Some(clock);
        self.metrics = metrics;
        self
    }

    /// Unregisters the session's connection (its slot is freed when the session is dropped).
    /// Idempotent: only the first call unregisters and counts the connection as closed.
    pub fn disconnect(&self, session: &Session) {
        let connected_at = session.info().connected_at;
        if session.release() {
            let now = self.clock.as_ref().map_or(connected_at, |clock| clock.now());
            self.metrics
                .connection_closed(session.transport(), now.millis_since(connected_at) as f64 / 1000.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Hub;
    use crate::ports::MockMessageBroker;
    use crate::use_cases::test_support::*;

    #[tokio::test]
    async fn the_last_connection_of_a_tenant_leaving_unsubscribes_its_channels() {
        let mut broker = MockMessageBroker::new();
        broker.expect_subscribe().returning(|_| ());
        broker.expect_until_active().returning(|_| ack_ok());
        broker.expect_history().returning(|_, _| Ok(crate::ports::HistoryRead::default()));
        broker
            .expect_unsubscribe()
            .withf(|channels| names(channels) == ["user:acme:bob"])
            .times(1)
            .returning(|_| ());
        broker
            .expect_unsubscribe()
            .withf(|channels| names(channels) == ["tenant:acme", "user:acme:eve"])
            .times(1)
            .returning(|_| ());
        let hub = Arc::new(Hub::new(Arc::new(broker), 10));
        let bob = session(&hub, "bob", "acme").await;
        let eve = session(&hub, "eve", "acme").await;
        let disconnect = DisconnectClient::new();
        disconnect.disconnect(&bob);
        disconnect.disconnect(&bob);
        assert_eq!(hub.len(), 1);
        disconnect.disconnect(&eve);
        assert_eq!(hub.len(), 0);
        drop((bob, eve));
        assert_eq!(hub.admitted(), 0);
    }
}
