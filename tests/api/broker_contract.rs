//! One contract, every broker: what the application relies on from `MessageBroker`, checked
//! against the in-process broker and against the Redis broker on a real `redis-server`.

use std::sync::Arc;
use std::time::Duration;

use adapters::outbound::memory::InMemoryBroker;
use adapters::outbound::redis::{RedisBroker, RedisBrokerSettings, RedisTarget};
use application::ports::{InboundHandler, MessageBroker};
use bytes::Bytes;
use domain::{Channel, TenantId};
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

async fn contract(broker: Arc<dyn MessageBroker>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let handler: Arc<dyn InboundHandler> = Arc::new(Collector(tx));
    broker.start(Arc::downgrade(&handler));
    let (acme, globex) = (tenant("acme"), tenant("globex"));

    broker.subscribe(std::slice::from_ref(&acme));
    broker.until_active(std::slice::from_ref(&acme)).await.expect("subscription confirmed");

    // Ordered per channel; unsubscribed channels are not delivered; broadcast always is.
    for n in 0..100 {
        broker.publish(&acme, Bytes::from(n.to_string())).await.expect("published");
    }
    broker.publish(&globex, Bytes::from_static(b"not for us")).await.expect("published");
    broker.publish(&Channel::Global, Bytes::from_static(b"everyone")).await.expect("published");
    broker.publish(&Channel::System, Bytes::from_static(b"notice")).await.expect("published");
    for n in 0..100 {
        assert_eq!(next(&mut rx).await, ("tenant:acme".to_owned(), n.to_string()));
    }
    assert_eq!(next(&mut rx).await, ("global:broadcast".to_owned(), "everyone".to_owned()));
    assert_eq!(next(&mut rx).await, ("system:events".to_owned(), "notice".to_owned()));

    // Unsubscribe, then a later broadcast proves nothing from acme slipped through.
    broker.unsubscribe(std::slice::from_ref(&acme));
    tokio::time::sleep(Duration::from_millis(200)).await;
    broker.publish(&acme, Bytes::from_static(b"after unsubscribe")).await.expect("published");
    broker.publish(&Channel::Global, Bytes::from_static(b"marker")).await.expect("published");
    assert_eq!(next(&mut rx).await, ("global:broadcast".to_owned(), "marker".to_owned()));

    // Unsubscribe followed at once by subscribe leaves the channel subscribed.
    broker.subscribe(std::slice::from_ref(&globex));
    broker.unsubscribe(std::slice::from_ref(&globex));
    broker.subscribe(std::slice::from_ref(&globex));
    broker.until_active(std::slice::from_ref(&globex)).await.expect("subscription confirmed");
    broker.publish(&globex, Bytes::from_static(b"welcome back")).await.expect("published");
    assert_eq!(next(&mut rx).await, ("tenant:globex".to_owned(), "welcome back".to_owned()));
    assert!(broker.is_ready());
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
