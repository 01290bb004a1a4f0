//! One contract, every broker: what the application relies on from `MessageBroker`, checked
//! against the in-process broker and against the Redis broker on a real `redis-server`.

use std::sync::Arc;
use std::time::Duration;

use adapters::outbound::history::HistorySettings;
use adapters::outbound::memory::InMemoryBroker;
use adapters::outbound::redis::{RedisBroker, RedisBrokerSettings, RedisTarget};
use application::ports::{HistoryRead, InboundHandler, MessageBroker};
use bytes::Bytes;
use domain::{Channel, StreamPosition, TenantId, UserId};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::redis_support::RedisServer;

struct Collector(mpsc::UnboundedSender<(String, String)>);

impl InboundHandler for Collector {
    fn on_message(&self, channel: Channel, message: Bytes) {
        let _ = self.0.send((channel.name(), String::from_utf8_lossy(&message).into_owned()));
    }
}

fn tenant(name: &str) -> Channel {
    Channel::Tenant(TenantId::parse(name).expect("valid"))
}

async fn next(rx: &mut mpsc::UnboundedReceiver<(String, String)>) -> (String, String) {
    tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("a message in time").expect("open")
}

pub(crate) async fn contract(broker: Arc<dyn MessageBroker>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let handler: Arc<dyn InboundHandler> = Arc::new(Collector(tx));
    broker.start(Arc::downgrade(&handler));
    let (acme, globex) = (tenant("acme"), tenant("globex"));

    broker.subscribe(std::slice::from_ref(&acme));
    broker.until_active(std::slice::from_ref(&acme)).await.expect("subscription confirmed");

    // Ordered per channel; unsubscribed channels are not delivered; broadcast always is.
    for n in 0..100 {
        broker.publish(&acme, envelope(n)).await.expect("published");
    }
    broker.publish(&globex, envelope(1000)).await.expect("published");
    broker.publish(&Channel::Global, Bytes::from_static(b"everyone")).await.expect("published");
    broker.publish(&Channel::System, Bytes::from_static(b"notice")).await.expect("published");
    // In order within a channel; channels of different cluster nodes may interleave.
    let mut acme_seen = Vec::new();
    let mut others = Vec::new();
    for _ in 0..102 {
        let (channel, message) = next(&mut rx).await;
        if channel == "tenant:acme" {
            acme_seen.push(payload(&message));
        } else {
            others.push((channel, message));
        }
    }
    assert_eq!(acme_seen, (0..100).collect::<Vec<_>>());
    others.sort();
    assert_eq!(
        others,
        [
            ("global:broadcast".to_owned(), "everyone".to_owned()),
            ("system:events".to_owned(), "notice".to_owned())
        ]
    );

    // Unsubscribe, then a later broadcast and a pause prove nothing from acme slipped through.
    broker.unsubscribe(std::slice::from_ref(&acme));
    tokio::time::sleep(Duration::from_millis(200)).await;
    broker.publish(&acme, envelope(2000)).await.expect("published");
    broker.publish(&Channel::Global, Bytes::from_static(b"marker")).await.expect("published");
    assert_eq!(next(&mut rx).await, ("global:broadcast".to_owned(), "marker".to_owned()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rx.try_recv().is_err(), "nothing arrives from an unsubscribed channel");

    // Unsubscribe followed at once by subscribe leaves the channel subscribed.
    broker.subscribe(std::slice::from_ref(&globex));
    broker.unsubscribe(std::slice::from_ref(&globex));
    broker.subscribe(std::slice::from_ref(&globex));
    broker.until_active(std::slice::from_ref(&globex)).await.expect("subscription confirmed");
    broker.publish(&globex, envelope(3000)).await.expect("published");
    let (channel, message) = next(&mut rx).await;
    assert_eq!((channel.as_str(), payload(&message)), ("tenant:globex", 3000));
    assert!(broker.is_ready());
}

fn envelope(n: u64) -> Bytes {
    Bytes::from(format!(r#"{{"type":"n","payload":{n}}}"#))
}

fn json(message: &str) -> Value {
    serde_json::from_str(message).expect("JSON")
}

fn payload(message: &str) -> u64 {
    json(message)["payload"].as_u64().expect("a number")
}

fn payloads(read: &HistoryRead) -> Option<Vec<u64>> {
    read.missed
        .as_ref()
        .map(|missed| missed.iter().map(|m| payload(std::str::from_utf8(m).expect("UTF-8"))).collect())
}

/// What recovery relies on, for a broker keeping 5 messages per channel.
pub(crate) async fn history_contract(broker: Arc<dyn MessageBroker>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let handler: Arc<dyn InboundHandler> = Arc::new(Collector(tx));
    broker.start(Arc::downgrade(&handler));
    let acme = tenant("acme");
    let user = Channel::User(TenantId::parse("acme").expect("valid"), UserId::parse("bob").expect("valid"));
    broker.subscribe(&[acme.clone(), user.clone()]);
    broker.until_active(&[acme.clone(), user.clone()]).await.expect("subscription confirmed");

    let start = broker.history(&acme, None).await.expect("read").position.expect("a history");
    assert_eq!(start.offset, 0, "a channel starts at offset 0");
    let epoch = start.epoch.clone();
    let at = |offset| Some(StreamPosition::new(epoch.clone(), offset));

    // Every published message carries the next offset and the epoch, live and in the history.
    for n in 1..=7 {
        broker.publish(&acme, envelope(n * 10)).await.expect("published");
        let (_, message) = next(&mut rx).await;
        let message = json(&message);
        assert_eq!(message["offset"], n, "{message}");
        assert_eq!(message["epoch"], epoch.as_str());
        assert_eq!(message["payload"], n * 10);
    }
    let read = broker.history(&acme, at(2)).await.expect("read");
    assert_eq!(read.position, at(7));
    assert_eq!(payloads(&read), Some(vec![30, 40, 50, 60, 70]));
    assert_eq!(payloads(&broker.history(&acme, at(7)).await.expect("read")), Some(vec![]));
    // Only the last 5 are kept: offset 2 is gone, so recovering from 1 is impossible.
    assert_eq!(broker.history(&acme, at(1)).await.expect("read").missed, None);
    assert_eq!(broker.history(&acme, at(8)).await.expect("read").missed, None, "never reached");
    let elsewhere = Some(StreamPosition::new("another-epoch", 2));
    assert_eq!(broker.history(&acme, elsewhere).await.expect("read").missed, None);

    // Channels count separately; broadcasts have no position.
    broker.publish(&user, envelope(1)).await.expect("published");
    assert_eq!(json(&next(&mut rx).await.1)["offset"], 1);
    broker.publish(&Channel::Global, envelope(2)).await.expect("published");
    let broadcast = json(&next(&mut rx).await.1);
    assert!(broadcast.get("offset").is_none() && broadcast.get("epoch").is_none(), "{broadcast}");
    assert_eq!(broker.history(&Channel::Global, None).await.expect("read").position, None);

    // Messages published while a recovery reads the history are either in what it returns or
    // after its position, never both and never neither. Bursts of 4 stay within the 5 kept.
    let mut seen = 7;
    for round in 0..25 {
        let publisher = {
            let broker = broker.clone();
            tokio::spawn(async move {
                for n in 0..4 {
                    broker.publish(&tenant("acme"), envelope(100 + round * 4 + n)).await.expect("published");
                }
            })
        };
        loop {
            let finished = publisher.is_finished();
            let read = broker.history(&acme, at(seen)).await.expect("read");
            let missed = read.missed.expect("within reach");
            let top = read.position.expect("a history").offset;
            assert_eq!(missed.len() as u64, top - seen, "exactly the messages after the position");
            for (i, message) in missed.iter().enumerate() {
                let offset = json(std::str::from_utf8(message).expect("UTF-8"))["offset"].clone();
                assert_eq!(offset, seen + 1 + i as u64);
            }
            seen = top;
            if finished {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
    assert_eq!(seen, 7 + 100);
}

fn redis_broker(redis: &RedisServer, history: HistorySettings) -> RedisBroker {
    let mut settings = RedisBrokerSettings::new(RedisTarget::Url(redis.url()));
    settings.history = history;
    RedisBroker::new(settings).expect("valid settings")
}

pub(crate) fn five() -> HistorySettings {
    HistorySettings { size: 5, ttl: Duration::from_secs(60) }
}

#[tokio::test]
async fn the_in_process_history_keeps_the_history_contract() {
    history_contract(Arc::new(InMemoryBroker::with_history(five()))).await;
}

#[tokio::test]
async fn the_redis_history_keeps_the_history_contract() {
    let redis = RedisServer::start();
    history_contract(Arc::new(redis_broker(&redis, five()))).await;
}

#[tokio::test]
async fn redis_history_expires_after_its_ttl_and_the_channel_starts_a_new_epoch() {
    let redis = RedisServer::start();
    let broker = redis_broker(&redis, HistorySettings { size: 5, ttl: Duration::from_secs(1) });
    let acme = tenant("acme");
    broker.publish(&acme, envelope(1)).await.expect("published");
    let before = broker.history(&acme, None).await.expect("read").position.expect("a history");
    assert_eq!(before.offset, 1);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let read = broker.history(&acme, Some(StreamPosition::new(before.epoch.clone(), 0))).await.expect("read");
    assert_eq!(read.missed, None, "the message expired with the history");
    let after = read.position.expect("a history");
    assert_eq!(after.offset, 0);
    assert_ne!(after.epoch, before.epoch);
}

#[tokio::test]
async fn with_history_off_messages_have_no_position_and_nothing_is_recovered() {
    let redis = RedisServer::start();
    let brokers: [Arc<dyn MessageBroker>; 2] = [
        Arc::new(InMemoryBroker::with_history(HistorySettings::off())),
        Arc::new(redis_broker(&redis, HistorySettings::off())),
    ];
    for broker in brokers {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let handler: Arc<dyn InboundHandler> = Arc::new(Collector(tx));
        broker.start(Arc::downgrade(&handler));
        let acme = tenant("acme");
        broker.subscribe(std::slice::from_ref(&acme));
        broker.until_active(std::slice::from_ref(&acme)).await.expect("subscription confirmed");
        broker.publish(&acme, envelope(1)).await.expect("published");
        assert!(json(&next(&mut rx).await.1).get("offset").is_none());
        let read = broker.history(&acme, Some(StreamPosition::new("e", 0))).await.expect("read");
        assert_eq!(read, HistoryRead { position: None, missed: None });
    }
}

#[tokio::test]
async fn the_in_process_broker_keeps_the_broker_contract() {
    contract(Arc::new(InMemoryBroker::new())).await;
}

#[tokio::test]
async fn the_redis_broker_keeps_the_broker_contract() {
    let redis = RedisServer::start();
    let broker =
        RedisBroker::new(RedisBrokerSettings::new(RedisTarget::Url(redis.url()))).expect("valid settings");
    contract(Arc::new(broker)).await;
}

#[tokio::test]
async fn redis_records_a_webhook_delivery_in_the_same_step_as_its_publish() {
    use application::ports::{DeliveryClaim, DeliveryLog, DeliveryRecord};
    use domain::MessageId;
    let redis = RedisServer::start();
    for history in [five(), HistorySettings::off()] {
        let broker = redis_broker(&redis, history);
        let log = broker.delivery_log();
        let acme = TenantId::parse("acme").expect("valid");
        let id = format!("d-{}", history.size);
        assert_eq!(log.claim(&acme, &id, 10).await, Ok(DeliveryClaim::Claimed));
        let record = DeliveryRecord {
            tenant: acme.clone(),
            delivery_id: id.clone(),
            message_id: MessageId::parse("m-1").expect("valid"),
            keep_secs: 60,
        };
        broker.publish_recorded(&tenant("acme"), envelope(1), &record).await.expect("published");
        // As if the instance died before completing: the retry is a duplicate, and a release
        // (the publish's answer was lost) does not undo the record.
        let delivered = Ok(DeliveryClaim::Delivered(record.message_id.clone()));
        assert_eq!(log.claim(&acme, &id, 10).await, delivered);
        log.release(&acme, &id).await;
        assert_eq!(log.claim(&acme, &id, 10).await, delivered);
        // A pending claim is released.
        assert_eq!(log.claim(&acme, "pending", 10).await, Ok(DeliveryClaim::Claimed));
        log.release(&acme, "pending").await;
        assert_eq!(log.claim(&acme, "pending", 10).await, Ok(DeliveryClaim::Claimed));
        log.release(&acme, "pending").await;
    }
}
