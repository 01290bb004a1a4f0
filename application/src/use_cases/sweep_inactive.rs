//! Sweep inactive connections: close those that sent nothing for longer than the idle timeout.

use std::sync::Arc;

use domain::CloseReason;

use crate::hub::Hub;
use crate::ports::Clock;

/// The sweep use-case. Run it periodically.
pub struct SweepInactiveConnections {
    hub: Arc<Hub>,
    clock: Arc<dyn Clock>,
    idle_timeout_ms: u64,
}

impl std::fmt::Debug for SweepInactiveConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SweepInactiveConnections").field("idle_timeout_ms", &self.idle_timeout_ms).finish()
    }
}

impl SweepInactiveConnections {
    pub fn new(hub: Arc<Hub>, clock: Arc<dyn Clock>, idle_timeout_ms: u64) -> Self {
        Self { hub, clock, idle_timeout_ms }
    }

    /// Closes, with close code 4408, every connection whose last frame is older than the idle
    /// timeout. Returns how many were closed. The connections unregister themselves once
    /// their socket is closed.
    pub fn sweep(&self) -> usize {
        let now = self.clock.now();
        let mut closed = 0;
        self.hub.for_each(|handle| {
            if now.millis_since(handle.last_activity()) > self.idle_timeout_ms {
                handle.close(CloseReason::IdleTimeout);
                closed += 1;
            }
        });
        closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::MockMessageBroker;
    use crate::use_cases::test_support::*;
    use domain::Timestamp;

    #[tokio::test]
    async fn only_connections_idle_for_longer_than_the_timeout_are_closed() {
        let mut broker = MockMessageBroker::new();
        broker.expect_subscribe().returning(|_| ());
        broker.expect_until_active().returning(|_| ack_ok());
        let hub = Arc::new(Hub::new(Arc::new(broker), 10));
        let (idle, active) = (RecordingSink::new(), RecordingSink::new());
        let _idle = session_with_sink(&hub, "bob", "acme", idle.clone()).await;
        let active_session = session_with_sink(&hub, "eve", "acme", active.clone()).await;
        active_session.touch(Timestamp::from_unix_millis(NOW + 50_000));

        let sweep = SweepInactiveConnections::new(hub.clone(), Arc::new(clock_at(NOW + 60_001)), 60_000);
        assert_eq!(sweep.sweep(), 1);
        assert_eq!(idle.closed(), Some(CloseReason::IdleTimeout));
        assert_eq!(active.closed(), None);

        let not_yet = SweepInactiveConnections::new(hub, Arc::new(clock_at(NOW + 60_000)), 60_000);
        assert_eq!(not_yet.sweep(), 0, "idle for exactly the timeout is not longer than it");
    }
}
