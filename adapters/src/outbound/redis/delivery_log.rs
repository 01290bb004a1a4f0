//! `RedisDeliveryLog`: webhook delivery ids shared by every instance, as Redis keys with expiry.
//!
//! `lq-realtime:{tenant:<tenant>}:delivery:<id>` holds `""` while the delivery is being processed (set
//! with NX, so exactly one instance claims it) and the message id once it was relayed. The
//! broker's publish script writes the message id in the same step as the publish (see
//! `RedisBroker::publish_recorded`), so a crash right after a publish cannot let a retry of the
//! delivery through.

use std::sync::Arc;

use std::sync::LazyLock;

use application::ports::{BrokerError, DeliveryClaim, DeliveryLog, DeliveryRecord};
use async_trait::async_trait;
use deadpool_redis::redis::{self, Script, Value};
use domain::{MessageId, TenantId};

use super::{RedisError, Shared};

/// Deletes a claim only while it is pending: a delivery the publish script already recorded
/// (its answer lost on the way back) stays recorded, so the sender's retry is a duplicate.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new("if redis.call('GET', KEYS[1]) == '' then return redis.call('DEL', KEYS[1]) end return 0")
});

/// The delivery log of a [`super::RedisBroker`], on its publish pool.
pub struct RedisDeliveryLog {
    pub(super) shared: Arc<Shared>,
}

impl std::fmt::Debug for RedisDeliveryLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDeliveryLog").finish_non_exhaustive()
    }
}

pub(super) fn key(tenant: &TenantId, delivery_id: &str) -> String {
    // Both parts are validated ids: no ':' can shift the key's structure. The hash tag is the
    // tenant channel's, so on a cluster the key lives on the node that publishes to it.
    format!("lq-realtime:{{tenant:{tenant}}}:delivery:{delivery_id}")
}

impl RedisDeliveryLog {
    async fn run(&self, key: &str, command: redis::Cmd) -> Result<Value, RedisError> {
        self.shared.within(self.shared.pool.query(key, command)).await
    }
}

#[async_trait]
impl DeliveryLog for RedisDeliveryLog {
    async fn claim(
        &self,
        tenant: &TenantId,
        delivery_id: &str,
        pending_secs: u64,
    ) -> Result<DeliveryClaim, BrokerError> {
        let key = key(tenant, delivery_id);
        let mut set = redis::cmd("SET");
        set.arg(&key).arg("").arg("NX").arg("EX").arg(pending_secs.max(1));
        if matches!(self.run(&key, set).await?, Value::Okay | Value::SimpleString(_)) {
            return Ok(DeliveryClaim::Claimed);
        }
        let mut get = redis::cmd("GET");
        get.arg(&key);
        match self.run(&key, get).await? {
            Value::BulkString(bytes) if bytes.is_empty() => Ok(DeliveryClaim::InProgress),
            Value::BulkString(bytes) => {
                match std::str::from_utf8(&bytes).ok().and_then(|s| MessageId::parse(s).ok()) {
                    Some(id) => Ok(DeliveryClaim::Delivered(id)),
                    None => Ok(DeliveryClaim::InProgress),
                }
            }
            // Expired between the two commands: claim again on the sender's retry.
            _ => Ok(DeliveryClaim::InProgress),
        }
    }

    async fn complete(&self, record: &DeliveryRecord) -> Result<(), BrokerError> {
        let key = key(&record.tenant, &record.delivery_id);
        let mut set = redis::cmd("SET");
        set.arg(&key).arg(record.message_id.as_str()).arg("EX").arg(record.keep_secs.max(1));
        self.run(&key, set).await?;
        Ok(())
    }

    async fn release(&self, tenant: &TenantId, delivery_id: &str) {
        let key = key(tenant, delivery_id);
        let mut invocation = RELEASE.prepare_invoke();
        invocation.key(&key);
        if let Err(error) = self.shared.within(self.shared.pool.invoke(&key, &invocation)).await {
            tracing::warn!(%error, "webhook delivery claim not released; it lapses by itself");
        }
    }
}
