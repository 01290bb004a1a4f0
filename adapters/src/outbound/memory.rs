//! `InMemoryBroker`: the broker of a single instance, used when no `REDIS_URL` is configured.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock, PoisonError, RwLock, Weak};

use application::ports::{BrokerError, InboundHandler, MessageBroker, SubscribeAck};
use async_trait::async_trait;
use bytes::Bytes;
use domain::Channel;

/// Delivers published messages straight to this instance's inbound handler.
///
/// Deliveries are serialized, so every local recipient sees the messages of a channel in the
/// same order. It never fails and is always ready.
#[derive(Default)]
pub struct InMemoryBroker {
    handler: OnceLock<Weak<dyn InboundHandler>>,
    subscribed: RwLock<HashSet<Channel>>,
    delivery: Mutex<()>,
}

impl std::fmt::Debug for InMemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryBroker").finish_non_exhaustive()
    }
}

impl InMemoryBroker {
    pub fn new() -> Self {
        Self::default()
    }

    fn is_subscribed(&self, channel: &Channel) -> bool {
        channel.is_broadcast()
            || self.subscribed.read().unwrap_or_else(PoisonError::into_inner).contains(channel)
    }
}

#[async_trait]
impl MessageBroker for InMemoryBroker {
    async fn publish(&self, channel: &Channel, message: Bytes) -> Result<(), BrokerError> {
        let Some(handler) = self.handler.get().and_then(Weak::upgrade) else {
            return Ok(());
        };
        let _in_order = self.delivery.lock().unwrap_or_else(PoisonError::into_inner);
        if self.is_subscribed(channel) {
            handler.on_message(channel.clone(), message);
        }
        Ok(())
    }

    fn subscribe(&self, channels: &[Channel]) {
        self.subscribed.write().unwrap_or_else(PoisonError::into_inner).extend(channels.iter().cloned());
    }

    fn until_active(&self, _channels: &[Channel]) -> SubscribeAck {
        Box::pin(std::future::ready(Ok(())))
    }

    fn unsubscribe(&self, channels: &[Channel]) {
        let mut subscribed = self.subscribed.write().unwrap_or_else(PoisonError::into_inner);
        for channel in channels {
            subscribed.remove(channel);
        }
    }

    fn start(&self, handler: Weak<dyn InboundHandler>) {
        // Only the first handler counts; the broker serves one application.
        let _ = self.handler.set(handler);
    }

    fn is_ready(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Default)]
    struct Collect(Mutex<Vec<(String, Bytes)>>);

    impl InboundHandler for Collect {
        fn on_message(&self, channel: Channel, message: Bytes) {
            self.0.lock().expect("lock").push((channel.name(), message));
        }
    }

    fn tenant(name: &str) -> Channel {
        Channel::parse(&format!("tenant:{name}")).expect("valid")
    }

    #[tokio::test]
    async fn only_subscribed_and_broadcast_channels_are_delivered_in_order() {
        let broker = InMemoryBroker::new();
        let collect = Arc::new(Collect::default());
        let handler: Arc<dyn InboundHandler> = collect.clone();
        broker.start(Arc::downgrade(&handler));
        broker.subscribe(&[tenant("acme")]);
        broker.until_active(&[tenant("acme")]).await.expect("subscribed");
        for (channel, body) in
            [(tenant("acme"), "1"), (tenant("globex"), "2"), (Channel::Global, "3"), (tenant("acme"), "4")]
        {
            broker.publish(&channel, Bytes::from(body)).await.expect("published");
        }
        broker.unsubscribe(&[tenant("acme")]);
        broker.publish(&tenant("acme"), Bytes::from("5")).await.expect("published");
        let got: Vec<_> = collect
            .0
            .lock()
            .expect("lock")
            .iter()
            .map(|(c, b)| format!("{c}={}", String::from_utf8_lossy(b)))
            .collect();
        assert_eq!(got, ["tenant:acme=1", "global:broadcast=3", "tenant:acme=4"]);
        assert!(broker.is_ready());
    }
}
