//! `InMemoryDeliveryLog`: webhook delivery ids of a single instance, kept in memory.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use application::ports::{BrokerError, DeliveryClaim, DeliveryLog, DeliveryRecord};
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

type Key = (TenantId, String);

#[derive(Debug, Default)]
struct Log {
    entries: HashMap<Key, (State, Instant)>,
    /// Insertion order with each record's expiry; a record whose entry was since replaced or
    /// removed is stale and only dropped.
    order: VecDeque<(Key, Instant)>,
}

impl Log {
    fn insert(&mut self, key: Key, state: State, until: Instant) {
        self.entries.insert(key.clone(), (state, until));
        self.order.push_back((key, until));
    }

    /// Forgets expired entries, and the oldest ones beyond [`MAX_REMEMBERED`].
    fn purge(&mut self, now: Instant) {
        while let Some((key, until)) = self.order.front() {
            let current = self.entries.get(key).is_some_and(|(_, u)| u == until);
            let over = self.entries.len() > MAX_REMEMBERED;
            if current && *until > now && !over {
                break;
            }
            let (key, _) = self.order.pop_front().unwrap_or_else(|| unreachable!("front exists"));
            if current {
                self.entries.remove(&key);
            }
        }
    }
}

fn deadline(secs: u64) -> Instant {
    let now = Instant::now();
    now.checked_add(Duration::from_secs(secs)).unwrap_or(now + Duration::from_secs(86_400 * 365))
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
                log.insert(key, State::Pending, deadline(pending_secs));
                Ok(DeliveryClaim::Claimed)
            }
        }
    }

    async fn complete(&self, record: &DeliveryRecord) -> Result<(), BrokerError> {
        let key = (record.tenant.clone(), record.delivery_id.clone());
        self.log().insert(key, State::Delivered(record.message_id.clone()), deadline(record.keep_secs));
        Ok(())
    }

    async fn release(&self, tenant: &TenantId, delivery_id: &str) {
        let mut log = self.log();
        let key = (tenant.clone(), delivery_id.to_owned());
        // Only a pending claim: a recorded delivery stays recorded.
        if log.entries.get(&key).is_some_and(|(state, _)| matches!(state, State::Pending)) {
            log.entries.remove(&key);
        }
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
        let record = |delivery_id: &str, keep_secs| DeliveryRecord {
            tenant: acme.clone(),
            delivery_id: delivery_id.to_owned(),
            message_id: id.clone(),
            keep_secs,
        };
        log.complete(&record("d", 60)).await.expect("recorded");
        assert_eq!(log.claim(&acme, "d", 60).await, Ok(DeliveryClaim::Delivered(id.clone())));
        log.release(&acme, "d").await;
        assert_eq!(log.claim(&acme, "d", 60).await, Ok(DeliveryClaim::Delivered(id.clone())), "kept");
        log.complete(&record("short", 0)).await.expect("recorded");
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
