//! `InMemoryBroker`: the broker of a single instance, used when no `REDIS_URL` is configured.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Mutex, OnceLock, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use application::ports::{
    BrokerError, ControlCommand, HistoryRead, InboundHandler, MessageBroker, SubscribeAck,
};
use async_trait::async_trait;
use bytes::Bytes;
use domain::{Channel, StreamPosition};

use crate::outbound::history::{Epochs, HistorySettings, with_position};

/// Delivers published messages straight to this instance's inbound handler.
///
/// Deliveries are serialized, so every local recipient sees the messages of a channel in the
/// same order. It never fails and is always ready. History lives in this process: it is lost
/// (and every channel starts a new epoch) when the process restarts.
pub struct InMemoryBroker {
    handler: OnceLock<Weak<dyn InboundHandler>>,
    subscribed: RwLock<HashSet<Channel>>,
    histories: Mutex<Histories>,
    /// Held while a message is appended and delivered, so deliveries follow offsets.
    delivery: Mutex<()>,
    settings: HistorySettings,
    epochs: Epochs,
}

impl Default for InMemoryBroker {
    fn default() -> Self {
        Self::with_history(HistorySettings::default())
    }
}

impl std::fmt::Debug for InMemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryBroker").field("history", &self.settings).finish_non_exhaustive()
    }
}

/// One channel's history: its epoch, its latest offset and its last `size` messages.
struct ChannelHistory {
    epoch: String,
    top: u64,
    /// (when appended, message), oldest first; the last one has offset `top`.
    messages: VecDeque<(Instant, Bytes)>,
    /// Last publish or read: the channel is forgotten once this is older than the TTL.
    touched: Instant,
}

impl ChannelHistory {
    fn new(epoch: String, now: Instant) -> Self {
        Self { epoch, top: 0, messages: VecDeque::new(), touched: now }
    }

    /// Drops the messages older than `ttl`.
    fn expire(&mut self, now: Instant, ttl: Duration) {
        while self.messages.front().is_some_and(|(at, _)| now.duration_since(*at) >= ttl) {
            self.messages.pop_front();
        }
    }

    fn position(&self) -> StreamPosition {
        StreamPosition::new(self.epoch.clone(), self.top)
    }

    /// The messages after `since`, or `None` when they are no longer all here.
    fn after(&self, since: &StreamPosition) -> Option<Vec<Bytes>> {
        if since.epoch != self.epoch || since.offset > self.top {
            return None;
        }
        let missed = usize::try_from(self.top - since.offset).ok()?;
        (missed <= self.messages.len()).then(|| {
            self.messages.iter().skip(self.messages.len() - missed).map(|(_, m)| m.clone()).collect()
        })
    }
}

#[derive(Default)]
struct Histories {
    channels: HashMap<Channel, ChannelHistory>,
    last_sweep: Option<Instant>,
}

impl InMemoryBroker {
    pub fn new() -> Self {
        Self::default()
    }

    /// A broker keeping `settings` of history per channel.
    pub fn with_history(settings: HistorySettings) -> Self {
        Self {
            handler: OnceLock::new(),
            subscribed: RwLock::default(),
            histories: Mutex::default(),
            delivery: Mutex::new(()),
            settings,
            epochs: Epochs::default(),
        }
    }

    fn is_subscribed(&self, channel: &Channel) -> bool {
        channel.is_broadcast()
            || self.subscribed.read().unwrap_or_else(PoisonError::into_inner).contains(channel)
    }

    fn histories(&self) -> std::sync::MutexGuard<'_, Histories> {
        self.histories.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `channel`'s history, created (with a new epoch) when it has none; forgets the channels
    /// idle for longer than the TTL, at most once per TTL.
    fn channel<'a>(
        &self,
        histories: &'a mut Histories,
        channel: &Channel,
        now: Instant,
    ) -> &'a mut ChannelHistory {
        let ttl = self.settings.ttl;
        if histories.last_sweep.is_none_or(|at| now.duration_since(at) >= ttl) {
            histories.channels.retain(|_, history| now.duration_since(history.touched) < ttl);
            histories.last_sweep = Some(now);
        }
        let history = histories
            .channels
            .entry(channel.clone())
            .or_insert_with(|| ChannelHistory::new(self.epochs.next(), now));
        if now.duration_since(history.touched) >= ttl {
            *history = ChannelHistory::new(self.epochs.next(), now);
        }
        history.touched = now;
        history.expire(now, ttl);
        history
    }
}

impl InMemoryBroker {
    /// Appends `message` to `channel`'s history at `now`; returns it with its position, and
    /// the position.
    fn append(
        &self,
        channel: &Channel,
        message: &[u8],
        now: Instant,
    ) -> Result<(Bytes, StreamPosition), BrokerError> {
        let mut histories = self.histories();
        let history = self.channel(&mut histories, channel, now);
        let offset = history.top + 1;
        let message = with_position(message, offset, &history.epoch).ok_or_else(|| {
            BrokerError::Unavailable("a message with a history must be a JSON object".to_owned())
        })?;
        history.top = offset;
        history.messages.push_back((now, message.clone()));
        while history.messages.len() > self.settings.size {
            history.messages.pop_front();
        }
        Ok((message, history.position()))
    }

    fn read(&self, channel: &Channel, since: Option<StreamPosition>, now: Instant) -> HistoryRead {
        if !self.settings.is_on() || !channel.has_history() {
            // Nothing can be recovered without a history.
            return HistoryRead { position: None, missed: None };
        }
        let mut histories = self.histories();
        let history = self.channel(&mut histories, channel, now);
        HistoryRead { position: Some(history.position()), missed: since.and_then(|s| history.after(&s)) }
    }
}

#[async_trait]
impl MessageBroker for InMemoryBroker {
    async fn publish(
        &self,
        channel: &Channel,
        message: Bytes,
    ) -> Result<Option<StreamPosition>, BrokerError> {
        // Held from the append to the delivery, so deliveries follow offsets.
        let _in_order = self.delivery.lock().unwrap_or_else(PoisonError::into_inner);
        let (message, position) = if self.settings.is_on() && channel.has_history() {
            let (message, position) = self.append(channel, &message, Instant::now())?;
            (message, Some(position))
        } else {
            (message, None)
        };
        if let Some(handler) = self.handler.get().and_then(Weak::upgrade)
            && self.is_subscribed(channel)
        {
            handler.on_message(channel.clone(), message);
        }
        Ok(position)
    }

    async fn publish_control(&self, command: &ControlCommand) -> Result<usize, BrokerError> {
        match self.handler.get().and_then(Weak::upgrade) {
            Some(handler) => {
                handler.on_control(command.clone());
                Ok(1)
            }
            None => Ok(0),
        }
    }

    async fn history(
        &self,
        channel: &Channel,
        since: Option<StreamPosition>,
    ) -> Result<HistoryRead, BrokerError> {
        Ok(self.read(channel, since, Instant::now()))
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
        let broker = InMemoryBroker::with_history(HistorySettings::off());
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

    fn message(n: u32) -> Vec<u8> {
        format!(r#"{{"type":"n","payload":{n}}}"#).into_bytes()
    }

    fn payloads(messages: &[Bytes]) -> Vec<u64> {
        messages
            .iter()
            .map(|m| {
                serde_json::from_slice::<serde_json::Value>(m).expect("json")["payload"].as_u64().expect("n")
            })
            .collect()
    }

    #[test]
    fn offsets_count_up_from_one_and_only_the_last_size_messages_are_kept() {
        let broker = InMemoryBroker::with_history(HistorySettings { size: 3, ttl: Duration::from_secs(60) });
        let (acme, now) = (tenant("acme"), Instant::now());
        let start = broker.read(&acme, None, now).position.expect("kept");
        assert_eq!(start.offset, 0);
        for n in 1..=5 {
            let (stored, _) = broker.append(&acme, &message(n), now).expect("appended");
            let value: serde_json::Value = serde_json::from_slice(&stored).expect("json");
            assert_eq!(
                (value["offset"].as_u64(), value["epoch"].as_str()),
                (Some(u64::from(n)), Some(&*start.epoch))
            );
        }
        let at = |offset| Some(StreamPosition::new(start.epoch.clone(), offset));
        let read = broker.read(&acme, at(2), now);
        assert_eq!(read.position, at(5));
        assert_eq!(payloads(&read.missed.expect("reachable")), [3, 4, 5]);
        assert_eq!(broker.read(&acme, at(5), now).missed, Some(vec![]), "nothing missed");
        assert_eq!(broker.read(&acme, at(1), now).missed, None, "offset 2 was trimmed");
        assert_eq!(broker.read(&acme, at(6), now).missed, None, "a position the channel never had");
        let other = Some(StreamPosition::new("other", 2));
        assert_eq!(broker.read(&acme, other, now).missed, None, "another epoch");
        assert_eq!(broker.read(&tenant("globex"), None, now).position.map(|p| p.offset), Some(0));
        assert_ne!(broker.read(&tenant("globex"), None, now).position.map(|p| p.epoch), Some(start.epoch));
    }

    #[test]
    fn messages_older_than_the_ttl_are_not_replayed_and_an_idle_channel_starts_a_new_epoch() {
        let ttl = Duration::from_secs(60);
        let broker = InMemoryBroker::with_history(HistorySettings { size: 10, ttl });
        let (acme, t0) = (tenant("acme"), Instant::now());
        let start = broker.read(&acme, None, t0).position.expect("kept");
        broker.append(&acme, &message(1), t0).expect("appended");
        broker.append(&acme, &message(2), t0 + ttl / 2).expect("appended");
        let later = t0 + ttl + Duration::from_secs(1);
        let at = |offset| Some(StreamPosition::new(start.epoch.clone(), offset));
        assert_eq!(broker.read(&acme, at(0), later).missed, None, "message 1 expired");
        assert_eq!(payloads(&broker.read(&acme, at(1), later).missed.expect("reachable")), [2]);
        let idle = later + ttl;
        let read = broker.read(&acme, at(2), idle);
        let position = read.position.expect("kept");
        assert_ne!(position.epoch, start.epoch, "an idle channel's history is forgotten");
        assert_eq!((position.offset, read.missed), (0, None));
    }

    #[test]
    fn without_history_nothing_has_a_position_and_nothing_is_recovered() {
        let broker = InMemoryBroker::with_history(HistorySettings::off());
        let read = broker.read(&tenant("acme"), Some(StreamPosition::new("e", 0)), Instant::now());
        assert_eq!(read, HistoryRead { position: None, missed: None });
        let with = InMemoryBroker::new();
        assert_eq!(with.read(&Channel::Global, None, Instant::now()).position, None);
    }
}
