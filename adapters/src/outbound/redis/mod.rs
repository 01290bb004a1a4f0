//! `RedisBroker`: the broker that joins any number of instances through Redis Pub/Sub.
//!
//! - PUBLISH goes through a `deadpool-redis` pool whose wait, create and recycle timeouts, plus
//!   a timeout around each command, make a dead Redis fail a publish within about a second.
//! - One dedicated subscriber connection per instance (not from the pool) carries every
//!   SUBSCRIBE. The application's subscribe/unsubscribe calls only record what is wanted; the
//!   subscriber reconciles Redis with that wish, batching everything pending into one SUBSCRIBE
//!   and one UNSUBSCRIBE. On every (re)connection it subscribes the whole wish again.
//! - The subscriber socket is drained by redis-rs's own task into memory and each message is
//!   handed to the application without waiting on any client.
//! - A probe message published every second through the pool must come back through the
//!   subscriber; when one has waited too long the subscriber is presumed deaf (the state a
//!   connection can be left in after a failover) and is reconnected. Each probe is judged by
//!   its own age, on a cluster per master (see `probe`).
//! - The broker draws a random instance id once; presence entries are kept under it, and the
//!   probe channels are named after it.
//! - With Sentinel, both the pool and the subscriber ask the sentinels for the current master.
//! - On a Redis Cluster, channels are sharded (`SPUBLISH`/`SSUBSCRIBE`): commands go through a
//!   pool per master, routed by hash slot, and the subscriptions through one cluster connection
//!   (one connection per node); see `cluster`.
//! - Messages of `tenant:` and `user:` channels are published by a Lua script that also
//!   appends them to the channel's history (see `history`).
//!
//! # Layout
//! - [`mod@self`]: settings, the broker and its port implementation.
//! - `subscriber`: what the subscribers of both topologies share: the reconnection loop with
//!   backoff, handing a message to the application, the wish's changes.
//! - `single`: the subscriber on one Redis or a Sentinel-managed master: connect, reconcile,
//!   dispatch, probe.
//! - `cluster`: the subscriber on a Redis Cluster: slot-grouped subscriptions, re-subscription
//!   where slots moved, a probe per master; `cluster::routing`: the cluster's topology, hash
//!   slots, and the per-master pools commands go through.
//! - `probe`: the probe tracker both subscribers judge their subscriptions by.
//! - `target`: a plain Redis URL, a Sentinel-managed master, or a cluster.
//! - `error`: [`RedisError`], what went wrong, translated into `BrokerError` at the ports.
//! - `history`: the publish-and-append and read scripts.
//! - `delivery_log`, `presence`: webhook delivery ids and presence, on the same pools.

mod cluster;
mod delivery_log;
mod error;
mod history;
mod presence;
mod probe;
mod shared;
mod single;
mod subscriber;
mod target;

pub use delivery_log::RedisDeliveryLog;
pub use error::RedisError;
pub use presence::RedisPresence;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use application::ports::{
    BrokerError, ControlCommand, DeliveryRecord, HistoryRead, InboundHandler, MessageBroker, SubscribeAck,
};
use async_trait::async_trait;
use bytes::Bytes;
use domain::{Channel, StreamPosition};
use tokio::sync::{Notify, watch};

pub use target::RedisTarget;

use crate::outbound::history::{Epochs, HistorySettings};
use crate::outbound::system::random_hex;
use target::PublishPool;

/// The channel every instance subscribes for [`ControlCommand`]s; never a valid application
/// channel name.
const CONTROL_CHANNEL: &str = "lq-realtime:control";

/// Tuning of the Redis broker. The defaults suit production; tests shorten them.
#[derive(Debug, Clone)]
pub struct RedisBrokerSettings {
    pub target: RedisTarget,
    /// Connections every command is pipelined over (to each master, on a cluster).
    pub pool_size: usize,
    /// Longest wait for one Redis operation (pool checkout, connect, command).
    pub op_timeout: Duration,
    /// Period of the subscriber probe.
    pub probe_interval: Duration,
    /// Longest pause between two reconnection attempts.
    pub max_backoff: Duration,
    /// How long `until_active` waits for Redis to confirm a subscription.
    pub confirm_timeout: Duration,
    /// History kept per `tenant:` and `user:` channel.
    pub history: HistorySettings,
}

impl RedisBrokerSettings {
    pub fn new(target: RedisTarget) -> Self {
        Self {
            target,
            pool_size: 4,
            op_timeout: Duration::from_secs(1),
            probe_interval: Duration::from_secs(1),
            max_backoff: Duration::from_secs(1),
            confirm_timeout: Duration::from_secs(3),
            history: HistorySettings::default(),
        }
    }
}

/// What the instance wants subscribed and what the current connection has confirmed.
#[derive(Debug, Default)]
struct Subscriptions {
    /// Channel names, each allocated once and shared by the three sets.
    wanted: HashSet<Arc<str>>,
    active: HashSet<Arc<str>>,
    /// Channels whose wish changed since the last reconcile: what it has to look at, so that
    /// a change costs the same however many channels are subscribed.
    changed: HashSet<Arc<str>>,
}

impl Subscriptions {
    /// A new connection has nothing subscribed: everything wanted must be subscribed again.
    fn reset(&mut self) {
        self.active.clear();
        self.changed = self.wanted.clone();
    }
}

/// State shared by the broker handle and its subscriber task.
struct Shared {
    settings: RedisBrokerSettings,
    pool: PublishPool,
    /// This instance's id, random per process: its presence entries are kept under it, and its
    /// probe channels are named after it.
    instance: Arc<str>,
    /// Per-instance channel of the probe; never a valid application channel name.
    probe_channel: Arc<str>,
    handler: OnceLock<Weak<dyn InboundHandler>>,
    subscriptions: Mutex<Subscriptions>,
    /// Wakes the subscriber when the wish changed.
    wish_changed: Notify,
    /// Bumped whenever `active` or the connection state changes; `until_active` waits on it.
    progress: watch::Sender<u64>,
    subscriber_up: AtomicBool,
    publisher_up: AtomicBool,
    /// Set while published probes are not coming back through the subscriber.
    probe_missing: AtomicBool,
    stopped: AtomicBool,
    stop: Notify,
    /// The last probe's sequence number, over every probe channel of the process.
    probe_sequence: AtomicU64,
    invalid_channels: AtomicU64,
    epochs: Epochs,
    /// Why the subscriber's last attempt failed, for `/ready`.
    last_failure: Mutex<Option<String>>,
}

impl Shared {
    /// Remembers why reaching Redis failed.
    fn failed(&self, reason: &RedisError) {
        *self.last_failure.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason.to_string());
    }

    fn subscriptions(&self) -> std::sync::MutexGuard<'_, Subscriptions> {
        self.subscriptions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.progress.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn all_active(&self, names: &[String]) -> bool {
        self.subscriber_up.load(Ordering::Acquire) && {
            let subscriptions = self.subscriptions();
            names.iter().all(|name| subscriptions.active.contains(name.as_str()))
        }
    }

    async fn publish_bytes(&self, channel: &str, message: &[u8]) -> Result<(), RedisError> {
        self.timed(self.pool.publish(channel, message)).await
    }

    /// Runs one Redis operation within `op_timeout`.
    async fn within<T>(
        &self,
        operation: impl std::future::Future<Output = Result<T, RedisError>>,
    ) -> Result<T, RedisError> {
        let after = self.settings.op_timeout;
        match tokio::time::timeout(after, operation).await {
            Ok(result) => result,
            Err(_) => {
                // A connection Redis no longer answers on (a master gone without a reset) is
                // not used again.
                self.pool.forget_connections(after);
                Err(RedisError::Timeout { what: "no answer from Redis", after })
            }
        }
    }

    /// Runs one Redis operation within `op_timeout`, recording whether Redis answered.
    async fn timed<T>(
        &self,
        operation: impl std::future::Future<Output = Result<T, RedisError>>,
    ) -> Result<T, RedisError> {
        let result = self.within(operation).await;
        // On a cluster one failing master says nothing of the others: there, whether Redis
        // answers is judged by the topology refresh of every probe interval.
        if self.pool.cluster().is_none() {
            self.publisher_up.store(result.is_ok(), Ordering::Release);
        }
        result
    }
}

/// The Redis broker. Dropping it stops its subscriber.
pub struct RedisBroker {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker").field("instance", &self.shared.instance).finish_non_exhaustive()
    }
}

impl RedisBroker {
    /// Creates the broker. Nothing is connected yet: Redis may be down at start, and the
    /// instance becomes ready once it is reachable.
    ///
    /// # Errors
    /// [`RedisError`] when the URL, the Sentinel settings or the cluster's nodes are invalid.
    pub fn new(settings: RedisBrokerSettings) -> Result<Self, RedisError> {
        let pool = PublishPool::new(&settings)?;
        let instance = random_hex(8)?;
        let shared = Arc::new(Shared {
            settings,
            pool,
            probe_channel: format!("lq-realtime:probe:{instance}").into(),
            instance: instance.into(),
            handler: OnceLock::new(),
            subscriptions: Mutex::new(Subscriptions::default()),
            wish_changed: Notify::new(),
            progress: watch::Sender::new(0),
            subscriber_up: AtomicBool::new(false),
            publisher_up: AtomicBool::new(false),
            probe_missing: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            stop: Notify::new(),
            probe_sequence: AtomicU64::new(0),
            invalid_channels: AtomicU64::new(0),
            epochs: Epochs::default(),
            last_failure: Mutex::new(None),
        });
        Ok(Self { shared })
    }

    /// The presence store on this broker's Redis; this instance's entries expire `ttl` after
    /// they were last set.
    pub fn presence(&self, ttl: Duration) -> RedisPresence {
        RedisPresence { shared: self.shared.clone(), instance: self.shared.instance.clone(), ttl }
    }

    /// The webhook delivery log on this broker's Redis.
    pub fn delivery_log(&self) -> RedisDeliveryLog {
        RedisDeliveryLog { shared: self.shared.clone() }
    }
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::Release);
        self.shared.stop.notify_waiters();
        self.shared.wish_changed.notify_one();
    }
}

#[async_trait]
impl MessageBroker for RedisBroker {
    async fn publish(
        &self,
        channel: &Channel,
        message: Bytes,
    ) -> Result<Option<StreamPosition>, BrokerError> {
        if self.shared.settings.history.is_on() && channel.has_history() {
            Ok(Some(self.shared.publish_with_history(channel, &message, None).await?))
        } else {
            self.shared.publish_bytes(&channel.name(), &message).await?;
            Ok(None)
        }
    }

    async fn publish_recorded(
        &self,
        channel: &Channel,
        message: Bytes,
        record: &DeliveryRecord,
    ) -> Result<Option<StreamPosition>, BrokerError> {
        if self.shared.settings.history.is_on() && channel.has_history() {
            Ok(Some(self.shared.publish_with_history(channel, &message, Some(record)).await?))
        } else {
            self.shared.publish_recorded_plain(channel, &message, record).await?;
            Ok(None)
        }
    }

    async fn publish_control(&self, command: &ControlCommand) -> Result<usize, BrokerError> {
        let message = serde_json::to_vec(command).map_err(|e| BrokerError::Unavailable(e.to_string()))?;
        let mut publish = deadpool_redis::redis::cmd(self.shared.pool.publish_command());
        publish.arg(CONTROL_CHANNEL).arg(message);
        match self.shared.timed(self.shared.pool.query(CONTROL_CHANNEL, publish)).await? {
            deadpool_redis::redis::Value::Int(receivers) => Ok(usize::try_from(receivers).unwrap_or(0)),
            _ => Err(RedisError::UnexpectedReply("PUBLISH").into()),
        }
    }

    async fn history(
        &self,
        channel: &Channel,
        since: Option<StreamPosition>,
    ) -> Result<HistoryRead, BrokerError> {
        if self.shared.settings.history.is_on() && channel.has_history() {
            Ok(self.shared.read_history(channel, since).await?)
        } else {
            // Nothing can be recovered without a history.
            Ok(HistoryRead { position: None, missed: None })
        }
    }

    fn subscribe(&self, channels: &[Channel]) {
        let mut subscriptions = self.shared.subscriptions();
        for channel in channels {
            let name: Arc<str> = channel.name().into();
            subscriptions.wanted.insert(name.clone());
            subscriptions.changed.insert(name);
        }
        drop(subscriptions);
        self.shared.wish_changed.notify_one();
    }

    fn unsubscribe(&self, channels: &[Channel]) {
        let mut subscriptions = self.shared.subscriptions();
        for channel in channels {
            let name: Arc<str> = channel.name().into();
            subscriptions.wanted.remove(&name);
            subscriptions.changed.insert(name);
        }
        drop(subscriptions);
        self.shared.wish_changed.notify_one();
    }

    fn until_active(&self, channels: &[Channel]) -> SubscribeAck {
        let shared = self.shared.clone();
        let names: Vec<String> = channels.iter().map(Channel::name).collect();
        Box::pin(async move {
            let mut progress = shared.progress.subscribe();
            let deadline = tokio::time::sleep(shared.settings.confirm_timeout);
            tokio::pin!(deadline);
            loop {
                if shared.all_active(&names) {
                    return Ok(());
                }
                tokio::select! {
                    changed = progress.changed() => if changed.is_err() {
                        return Err(BrokerError::Unavailable("broker stopped".to_owned()));
                    },
                    () = &mut deadline => return Err(RedisError::Timeout {
                        what: "Redis did not confirm the subscription",
                        after: shared.settings.confirm_timeout,
                    }.into()),
                }
            }
        })
    }

    fn start(&self, handler: Weak<dyn InboundHandler>) {
        if self.shared.handler.set(handler).is_ok() {
            tokio::spawn(subscriber::run(self.shared.clone()));
        }
    }

    fn is_ready(&self) -> bool {
        self.shared.subscriber_up.load(Ordering::Acquire)
            && self.shared.publisher_up.load(Ordering::Acquire)
            && !self.shared.probe_missing.load(Ordering::Acquire)
    }

    fn unavailable_reason(&self) -> Option<String> {
        let shared = &self.shared;
        let location = shared.settings.target.location();
        if !shared.subscriber_up.load(Ordering::Acquire) {
            let failure = shared.last_failure.lock().unwrap_or_else(PoisonError::into_inner).clone();
            return Some(match failure {
                Some(failure) => format!("Redis at {location} cannot be reached ({failure}); retrying"),
                None => format!("connecting to Redis at {location}"),
            });
        }
        if !shared.publisher_up.load(Ordering::Acquire) {
            return Some(format!("Redis at {location} does not take commands"));
        }
        if shared.probe_missing.load(Ordering::Acquire) {
            return Some(format!("Redis at {location} does not deliver this instance's probe messages"));
        }
        None
    }
}
