//! `InMemoryDeliveryLog`: webhook delivery ids of a single instance, kept in memory.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use application::ports::{BrokerError, DeliveryClaim, DeliveryLog};
use async_trait::async_trait;
use domain::{MessageId, TenantId};

/// Most delivery ids remembered at once; the oldest are forgotten first beyond it, so a sender
/// cannot grow the log without bound.
pub const MAX_REMEMBERED: usize = 100_000;

#[derive(Debug)]
enum State {
    Pending,
    Delivered(MessageId),
}

#[derive(Debug, Default)]
struct Log {
    entries: HashMap<(TenantId, String), (State, Instant)>,
    order: VecDeque<(TenantId, String)>,
}

impl Log {
    fn purge(&mut self, now: Instant) {
        while let Some(key) = self.order.front() {
            let expired = self.entries.get(key).is_none_or(|(_, until)| *until <= now);
            if expired || self.entries.len() > MAX_REMEMBERED {
                let key = self.order.pop_front().unwrap_or_else(|| unreachable!("front exists"));
                if expired || self.entries.len() > MAX_REMEMBERED {
                    self.entries.remove(&key);
                }
            } else {
                break;
            }
        }
    }
}

/// Delivery ids per tenant, with expiry.
#[derive(Debug, Default)]
pub struct InMemoryDeliveryLog {
    log: Mutex<Log>,
}

impl InMemoryDeliveryLog {
    pub fn new() -> Self {
        Self::default()
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl DeliveryLog for InMemoryDeliveryLog {
    async fn claim(
        &self,
        tenant: &TenantId,
        delivery_id: &str,
        pending_secs: u64,
    ) -> Result<DeliveryClaim, BrokerError> {
        let now = Instant::now();
        let mut log = self.log();
        log.purge(now);
        let key = (tenant.clone(), delivery_id.to_owned());
        match log.entries.get(&key) {
            Some((State::Pending, until)) if *until > now => Ok(DeliveryClaim::InProgress),
            Some((State::Delivered(id), until)) if *until > now => Ok(DeliveryClaim::Delivered(id.clone())),
            _ => {
                log.entries.insert(key.clone(), (State::Pending, now + Duration::from_secs(pending_secs)));
                log.order.push_back(key);
                Ok(DeliveryClaim::Claimed)
            }
        }
    }

    async fn complete(
        &self,
        tenant: &TenantId,
        delivery_id: &str,
        message_id: &MessageId,
        keep_secs: u64,
    ) -> Result<(), BrokerError> {
        let key = (tenant.clone(), delivery_id.to_owned());
        let until = Instant::now() + Duration::from_secs(keep_secs);
        let mut log = self.log();
        log.entries.insert(key.clone(), (State::Delivered(message_id.clone()), until));
        log.order.push_back(key);
        Ok(())
    }

    async fn release(&self, tenant: &TenantId, delivery_id: &str) {
        self.log().entries.remove(&(tenant.clone(), delivery_id.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_delivery_is_claimed_once_then_remembered_until_it_expires() {
        let log = InMemoryDeliveryLog::new();
        let acme = TenantId::parse("acme").expect("valid");
        let globex = TenantId::parse("globex").expect("valid");
        assert_eq!(log.claim(&acme, "d", 60).await, Ok(DeliveryClaim::Claimed));
        assert_eq!(log.claim(&acme, "d", 60).await, Ok(DeliveryClaim::InProgress));
        assert_eq!(log.claim(&globex, "d", 60).await, Ok(DeliveryClaim::Claimed), "ids are per tenant");
        let id = MessageId::parse("m").expect("valid");
        log.complete(&acme, "d", &id, 60).await.expect("recorded");
        assert_eq!(log.claim(&acme, "d", 60).await, Ok(DeliveryClaim::Delivered(id.clone())));
        log.complete(&acme, "short", &id, 0).await.expect("recorded");
        assert_eq!(log.claim(&acme, "short", 60).await, Ok(DeliveryClaim::Claimed), "expired");
    }

    #[tokio::test]
    async fn a_released_claim_can_be_claimed_again() {
        let log = InMemoryDeliveryLog::new();
        let acme = TenantId::parse("acme").expect("valid");
        assert_eq!(log.claim(&acme, "d", 60).await, Ok(DeliveryClaim::Claimed));
        log.release(&acme, "d").await;
        assert_eq!(log.claim(&acme, "d", 60).await, Ok(DeliveryClaim::Claimed));
    }
}
