//! The use-cases, one module each.

pub mod connect_client;
pub mod consume_outbox;
pub mod deliver_message;
pub mod disconnect_client;
pub mod handle_client_frame;
pub mod ingest_webhook;
pub mod presence;
pub mod read_history;
pub mod report_stats;
pub mod server_api;
pub mod subscribe_topic;
pub mod sweep_inactive;

#[cfg(test)]
pub(crate) mod test_support;

use std::time::Instant;

use domain::{Channel, Envelope};

use crate::frames::encode;
use crate::ports::{BrokerError, DeliveryRecord, MessageBroker, Metrics};

/// Publishes `envelope` on `channel`, reporting how long the broker took, success or not.
pub(crate) async fn publish_timed(
    broker: &dyn MessageBroker,
    metrics: &dyn Metrics,
    channel: &Channel,
    envelope: &Envelope,
    record: Option<&DeliveryRecord>,
) -> Result<(), BrokerError> {
    let started = Instant::now();
    let published = match record {
        Some(record) => broker.publish_recorded(channel, encode(envelope), record).await,
        None => broker.publish(channel, encode(envelope)).await,
    };
    metrics.broker_publish(started.elapsed().as_secs_f64());
    published.map(|_| ())
}
