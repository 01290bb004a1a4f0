//! A broker whose history outlives the broker: every message with a position is kept in a
//! [`MessageStore`] before its publish is acknowledged, and what the broker's bounded history
//! no longer holds — trimmed, expired, or lost with Redis — is read back from the store.
//!
//! ```text
//!  publish ──▶ store ready? ──no──▶ Unavailable (nothing published)
//!                 │yes
//!                 ▼
//!          broker.publish ──▶ position ──▶ store.append ──▶ Ok (acknowledged once kept)
//!
//!  history(since) ──▶ broker.history ──▶ missed? ──yes──▶ as is
//!                                          │no (out of the broker's reach)
//!                                          ▼
//!          same epoch:  store[since+1 ..] then the broker's newest, up to the position
//!          new epoch:   store[since ..] of the old epoch (it must hold `since` itself),
//!                       then the new epoch from its first offset
//! ```
//!
//! The end of an old epoch is the last message the store holds of it. Every acknowledged message
//! is there; a recovery across epochs first waits for this instance's appends to land and a
//! moment for other instances' batches in flight. A message published by an instance that died
//! between the broker's publish and the store's commit (never acknowledged), or one whose append
//! is still being retried while PostgreSQL is unreachable, can be missing at an epoch's end.

use std::sync::{Arc, Weak};

use async_trait::async_trait;
use bytes::Bytes;
use domain::{Channel, StreamPosition};

use crate::ports::{
    BrokerError, ControlCommand, DeliveryRecord, HistoryRead, InboundHandler, MessageBroker, MessageStore,
    StoreError, StoredMessage, SubscribeAck,
};

/// Most messages read back from the store for one recovery; beyond, it is not recovered.
pub const MAX_RECOVERED_MESSAGES: usize = 10_000;

/// Most bytes read back from the store for one recovery; beyond, it is not recovered.
pub const MAX_RECOVERED_BYTES: usize = 8 * 1024 * 1024;

/// How long a recovery across epochs waits for other instances' appends still in flight.
const OTHERS_IN_FLIGHT: std::time::Duration = std::time::Duration::from_millis(250);

/// What one recovery read so far, against its bounds.
#[derive(Default)]
struct Budget {
    messages: usize,
    bytes: usize,
}

impl Budget {
    /// Appends `rows` to `into`, skipping the first `skip`, when their offsets run from
    /// `first` without a hole and the recovery stays within its bounds.
    fn take_contiguous(
        &mut self,
        rows: Vec<(u64, Bytes)>,
        first: u64,
        skip: usize,
        into: &mut Vec<Bytes>,
    ) -> bool {
        for (n, (offset, message)) in rows.into_iter().enumerate() {
            if offset != first + n as u64 {
                return false;
            }
            if n < skip {
                continue;
            }
            self.messages += 1;
            self.bytes += message.len();
            if self.messages > MAX_RECOVERED_MESSAGES || self.bytes > MAX_RECOVERED_BYTES {
                return false;
            }
            into.push(message);
        }
        true
    }
}

/// A [`MessageBroker`] that keeps every positioned message in a [`MessageStore`].
pub struct DurableBroker {
    inner: Arc<dyn MessageBroker>,
    store: Arc<dyn MessageStore>,
}

impl std::fmt::Debug for DurableBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableBroker").finish_non_exhaustive()
    }
}

fn unavailable(error: StoreError) -> BrokerError {
    BrokerError::Unavailable(error.to_string())
}

impl DurableBroker {
    pub fn new(inner: Arc<dyn MessageBroker>, store: Arc<dyn MessageStore>) -> Self {
        Self { inner, store }
    }

    /// Refuses a publish that could not be kept, before anything is published.
    fn ready_for(&self, channel: &Channel) -> Result<(), BrokerError> {
        if channel.has_history() && !self.store.is_ready() {
            return Err(BrokerError::Unavailable(
                "message store unavailable: nothing was published, retry later".to_owned(),
            ));
        }
        Ok(())
    }

    /// Keeps the message `message` became at `position`.
    async fn keep(
        &self,
        channel: &Channel,
        message: &[u8],
        position: Option<StreamPosition>,
    ) -> Result<Option<StreamPosition>, BrokerError> {
        let Some(position) = position else { return Ok(None) };
        let kept =
            domain::envelope::with_position(message, position.offset, &position.epoch).ok_or_else(|| {
                BrokerError::Unavailable("a message with a history must be a JSON object".to_owned())
            })?;
        let stored = StoredMessage {
            channel: channel.clone(),
            position: position.clone(),
            message: Bytes::from(kept),
        };
        self.store.append(stored).await.map_err(|error| {
            BrokerError::Unavailable(format!("published but not yet kept ({error}); the store keeps trying"))
        })?;
        Ok(Some(position))
    }

    /// Offsets `from..=to` of `epoch`, from the store and then the broker's history for what
    /// the store does not hold yet (commits of other instances still on their way); `None`
    /// unless every one of them was found.
    async fn range(
        &self,
        channel: &Channel,
        epoch: &str,
        from: u64,
        to: u64,
    ) -> Result<Option<Vec<Bytes>>, BrokerError> {
        if from > to {
            return Ok(Some(Vec::new()));
        }
        let wanted = usize::try_from(to - from + 1).unwrap_or(usize::MAX);
        if wanted > MAX_RECOVERED_MESSAGES {
            return Ok(None);
        }
        let rows = self.store.read_from(channel, epoch, from, wanted).await.map_err(unavailable)?;
        let mut messages = Vec::with_capacity(wanted);
        let mut next = from;
        for (offset, message) in rows {
            if offset != next {
                return Ok(None);
            }
            messages.push(message);
            next += 1;
        }
        if next > to {
            return Ok(Some(messages));
        }
        // The newest ones, from the broker.
        let since = StreamPosition::new(epoch, next - 1);
        let read = self.inner.history(channel, Some(since)).await?;
        let Some(rest) = read.missed else { return Ok(None) };
        if read.position.is_none_or(|p| p.epoch != epoch || p.offset < to)
            || rest.len() < usize::try_from(to - next + 1).unwrap_or(usize::MAX)
        {
            return Ok(None);
        }
        messages.extend(rest.into_iter().take(usize::try_from(to - next + 1).unwrap_or(usize::MAX)));
        Ok(Some(messages))
    }

    /// What was published on `channel` after `since`, up to `position`, when the broker's own
    /// history no longer reaches back to it.
    async fn recover(
        &self,
        channel: &Channel,
        since: &StreamPosition,
        position: &StreamPosition,
    ) -> Result<Option<Vec<Bytes>>, BrokerError> {
        if since.epoch == position.epoch {
            if since.offset > position.offset {
                return Ok(None);
            }
            return self.range(channel, &since.epoch, since.offset + 1, position.offset).await;
        }
        // The epoch changed. Let the appends still on their way land first: this instance's,
        // then (a short pause) other instances' batches in flight.
        self.store.settle().await;
        tokio::time::sleep(OTHERS_IN_FLIGHT).await;
        let epochs = self.store.epochs(channel).await.map_err(unavailable)?;
        let (since_at, now_at) =
            (epochs.iter().position(|e| *e == since.epoch), epochs.iter().position(|e| *e == position.epoch));
        let between = match (since_at, now_at) {
            (Some(s), Some(n)) if n > s => &epochs[s + 1..n],
            // The current epoch began before the client's (a lagging replica): nothing to replay.
            (Some(_), Some(_)) => return Ok(None),
            // Nothing of the current epoch kept yet.
            (Some(s), None) => &epochs[s + 1..],
            // An epoch the store never held a message of, seen from its start: only when the
            // store holds no other epoch of the channel can nothing have been missed.
            (None, _) if since.offset == 0 && epochs.iter().all(|e| *e == position.epoch) => &[][..],
            (None, _) => return Ok(None),
        };
        let mut budget = Budget::default();
        let mut messages = Vec::new();
        if since_at.is_some() {
            // The old epoch's tail, which must start with `since` itself (proof that the store
            // holds that epoch up to there); at offset 0 everything it holds of it.
            let first = since.offset.max(1);
            let rows = self
                .store
                .read_from(channel, &since.epoch, first, MAX_RECOVERED_MESSAGES + 1)
                .await
                .map_err(unavailable)?;
            if since.offset > 0 && rows.first().is_none_or(|(o, _)| *o != first) {
                return Ok(None);
            }
            let skip = usize::from(since.offset > 0);
            if !budget.take_contiguous(rows, first, skip, &mut messages) {
                return Ok(None);
            }
        }
        // The epochs that began and ended in between, each whole from its first offset.
        for epoch in between {
            let rows = self
                .store
                .read_from(channel, epoch, 1, MAX_RECOVERED_MESSAGES + 1)
                .await
                .map_err(unavailable)?;
            if !budget.take_contiguous(rows, 1, 0, &mut messages) {
                return Ok(None);
            }
        }
        match self.range(channel, &position.epoch, 1, position.offset).await? {
            Some(newer) => {
                messages.extend(newer);
                Ok(Some(messages))
            }
            None => Ok(None),
        }
    }
}

#[async_trait]
impl MessageBroker for DurableBroker {
    async fn publish(
        &self,
        channel: &Channel,
        message: Bytes,
    ) -> Result<Option<StreamPosition>, BrokerError> {
        self.ready_for(channel)?;
        let position = self.inner.publish(channel, message.clone()).await?;
        self.keep(channel, &message, position).await
    }

    async fn publish_recorded(
        &self,
        channel: &Channel,
        message: Bytes,
        record: &DeliveryRecord,
    ) -> Result<Option<StreamPosition>, BrokerError> {
        self.ready_for(channel)?;
        let position = self.inner.publish_recorded(channel, message.clone(), record).await?;
        self.keep(channel, &message, position).await
    }

    async fn history(
        &self,
        channel: &Channel,
        since: Option<StreamPosition>,
    ) -> Result<HistoryRead, BrokerError> {
        let read = self.inner.history(channel, since.clone()).await?;
        let (Some(since), Some(position)) = (since, read.position.clone()) else { return Ok(read) };
        if read.missed.is_some() {
            return Ok(read);
        }
        match self.recover(channel, &since, &position).await {
            Ok(missed) => Ok(HistoryRead { position: Some(position), missed }),
            Err(error) => {
                // Not recoverable now: the client is told, as when the history does not reach.
                tracing::warn!(%error, %channel, "the message store could not be read for a recovery");
                Ok(read)
            }
        }
    }

    async fn publish_control(&self, command: &ControlCommand) -> Result<usize, BrokerError> {
        self.inner.publish_control(command).await
    }

    fn subscribe(&self, channels: &[Channel]) {
        self.inner.subscribe(channels);
    }

    fn unsubscribe(&self, channels: &[Channel]) {
        self.inner.unsubscribe(channels);
    }

    fn until_active(&self, channels: &[Channel]) -> SubscribeAck {
        self.inner.until_active(channels)
    }

    fn start(&self, handler: Weak<dyn InboundHandler>) {
        self.inner.start(handler);
    }

    /// Ready when the broker is and the store takes appends: `/ready` answers 503 otherwise.
    fn is_ready(&self) -> bool {
        self.inner.is_ready() && self.store.is_ready()
    }

    fn unavailable_reason(&self) -> Option<String> {
        self.inner.unavailable_reason().or_else(|| {
            (!self.store.is_ready()).then(|| "PostgreSQL does not take the messages to keep".to_owned())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::{MockMessageBroker, MockMessageStore};
    use std::sync::Mutex;

    fn acme() -> Channel {
        Channel::parse("tenant:acme").expect("valid")
    }

    fn at(epoch: &str, offset: u64) -> StreamPosition {
        StreamPosition::new(epoch, offset)
    }

    fn message(epoch: &str, offset: u64) -> Bytes {
        Bytes::from(format!(r#"{{"type":"n","payload":{offset},"offset":{offset},"epoch":"{epoch}"}}"#))
    }

    /// A store holding `rows` (epoch, offset), ready or not.
    fn store(rows: Vec<(&'static str, u64)>, ready: bool) -> MockMessageStore {
        let mut store = MockMessageStore::new();
        store.expect_is_ready().return_const(ready);
        store.expect_settle().returning(|| ());
        let mut epochs: Vec<String> = Vec::new();
        for (e, _) in &rows {
            if !epochs.iter().any(|k| k == e) {
                epochs.push((*e).to_owned());
            }
        }
        store.expect_epochs().returning(move |_| Ok(epochs.clone()));
        store.expect_read_from().returning(move |_, epoch, from, limit| {
            Ok(rows
                .iter()
                .filter(|(e, o)| *e == epoch && *o >= from)
                .take(limit)
                .map(|(e, o)| (*o, message(e, *o)))
                .collect())
        });
        store
    }

    /// A broker standing at `position`, whose history holds `window` (offsets of that epoch).
    fn broker(position: StreamPosition, window: std::ops::RangeInclusive<u64>) -> MockMessageBroker {
        let mut broker = MockMessageBroker::new();
        broker.expect_history().returning(move |_, since| {
            let missed = since.and_then(|s| {
                (s.epoch == position.epoch && s.offset + 1 >= *window.start() && s.offset <= position.offset)
                    .then(|| (s.offset + 1..=position.offset).map(|o| message(&position.epoch, o)).collect())
            });
            Ok(HistoryRead { position: Some(position.clone()), missed })
        });
        broker
    }

    fn payloads(read: &HistoryRead) -> Option<Vec<String>> {
        read.missed.as_ref().map(|m| {
            m.iter()
                .map(|b| {
                    let v: serde_json::Value = serde_json::from_slice(b).expect("json");
                    format!("{}:{}", v["epoch"].as_str().expect("epoch"), v["offset"])
                })
                .collect()
        })
    }

    #[tokio::test]
    async fn a_publish_is_acknowledged_once_the_store_kept_the_positioned_message() {
        let kept = Arc::new(Mutex::new(Vec::new()));
        let mut store = MockMessageStore::new();
        store.expect_is_ready().return_const(true);
        let seen = kept.clone();
        store.expect_append().times(1).returning(move |m| {
            seen.lock().expect("lock").push(m);
            Ok(())
        });
        let mut inner = MockMessageBroker::new();
        inner.expect_publish().times(1).returning(|_, _| Ok(Some(StreamPosition::new("e1", 7))));
        let durable = DurableBroker::new(Arc::new(inner), Arc::new(store));
        let position = durable.publish(&acme(), Bytes::from_static(br#"{"type":"n","payload":1}"#)).await;
        assert_eq!(position, Ok(Some(at("e1", 7))));
        let kept = kept.lock().expect("lock");
        assert_eq!(kept[0].position, at("e1", 7));
        assert_eq!(&kept[0].message[..], br#"{"type":"n","payload":1,"offset":7,"epoch":"e1"}"#);
    }

    #[tokio::test]
    async fn nothing_is_published_while_the_store_cannot_keep_it_and_a_failed_append_is_reported() {
        let mut inner = MockMessageBroker::new();
        inner.expect_publish().never();
        let durable = DurableBroker::new(Arc::new(inner), Arc::new(store(vec![], false)));
        let refused = durable.publish(&acme(), Bytes::from_static(b"{\"type\":\"n\"}")).await;
        assert!(matches!(refused, Err(BrokerError::Unavailable(m)) if m.contains("nothing was published")));

        let mut inner = MockMessageBroker::new();
        inner.expect_publish().times(1).returning(|_, _| Ok(Some(StreamPosition::new("e1", 1))));
        let mut failing = store(vec![], true);
        failing.expect_append().returning(|_| Err(StoreError::Unavailable("down".into())));
        let durable = DurableBroker::new(Arc::new(inner), Arc::new(failing));
        let refused = durable.publish(&acme(), Bytes::from_static(b"{\"type\":\"n\"}")).await;
        assert!(matches!(refused, Err(BrokerError::Unavailable(m)) if m.contains("not yet kept")));
    }

    #[tokio::test]
    async fn what_the_broker_still_holds_is_read_from_the_broker_only() {
        let mut store = MockMessageStore::new();
        store.expect_read_from().never();
        let durable = DurableBroker::new(Arc::new(broker(at("e1", 5), 1..=5)), Arc::new(store));
        let read = durable.history(&acme(), Some(at("e1", 3))).await.expect("read");
        assert_eq!(payloads(&read), Some(vec!["e1:4".into(), "e1:5".into()]));
    }

    #[tokio::test]
    async fn a_position_the_broker_trimmed_is_recovered_from_the_store_then_the_broker() {
        // The broker keeps 5..=6 only; the store holds 2..=5 (6 is still on its way).
        let rows = vec![("e1", 2), ("e1", 3), ("e1", 4), ("e1", 5)];
        let durable = DurableBroker::new(Arc::new(broker(at("e1", 6), 5..=6)), Arc::new(store(rows, true)));
        let read = durable.history(&acme(), Some(at("e1", 2))).await.expect("read");
        assert_eq!(payloads(&read), Some(vec!["e1:3".into(), "e1:4".into(), "e1:5".into(), "e1:6".into()]));
    }

    #[tokio::test]
    async fn after_the_broker_lost_its_history_the_old_epoch_is_recovered_then_the_new_one() {
        // Redis restarted empty: the channel is at e2:2, its history holds e2:1..=2.
        let rows = vec![("e1", 1), ("e1", 2), ("e1", 3), ("e2", 1)];
        let durable = DurableBroker::new(Arc::new(broker(at("e2", 2), 1..=2)), Arc::new(store(rows, true)));
        let read = durable.history(&acme(), Some(at("e1", 2))).await.expect("read");
        assert_eq!(payloads(&read), Some(vec!["e1:3".into(), "e2:1".into(), "e2:2".into()]));
        assert_eq!(read.position, Some(at("e2", 2)));
    }

    #[tokio::test]
    async fn a_client_that_saw_nothing_of_the_old_epoch_gets_all_the_store_holds_of_it_then_the_new_one() {
        let rows = vec![("e1", 1), ("e2", 1)];
        let durable = DurableBroker::new(Arc::new(broker(at("e2", 1), 1..=1)), Arc::new(store(rows, true)));
        let read = durable.history(&acme(), Some(at("e1", 0))).await.expect("read");
        assert_eq!(payloads(&read), Some(vec!["e1:1".into(), "e2:1".into()]));
        let durable = DurableBroker::new(Arc::new(broker(at("e2", 0), 1..=1)), Arc::new(store(vec![], true)));
        let read = durable.history(&acme(), Some(at("e1", 0))).await.expect("read");
        assert_eq!(payloads(&read), Some(vec![]), "nothing in either epoch: nothing missed");
    }

    #[tokio::test]
    async fn the_epochs_in_between_are_recovered_whole_and_an_older_current_epoch_is_refused() {
        let rows = vec![("e1", 1), ("e1", 2), ("e2", 1), ("e2", 2), ("e3", 1)];
        let durable = DurableBroker::new(Arc::new(broker(at("e3", 1), 1..=1)), Arc::new(store(rows, true)));
        let read = durable.history(&acme(), Some(at("e1", 1))).await.expect("read");
        assert_eq!(payloads(&read), Some(vec!["e1:2".into(), "e2:1".into(), "e2:2".into(), "e3:1".into()]));
        // The client's epoch began after the broker's current one.
        let rows = vec![("e1", 1), ("e2", 1)];
        let durable = DurableBroker::new(Arc::new(broker(at("e1", 1), 1..=1)), Arc::new(store(rows, true)));
        assert_eq!(durable.history(&acme(), Some(at("e2", 1))).await.expect("read").missed, None);
        // An epoch never kept, seen from its start, while another epoch is kept: unprovable.
        let rows = vec![("e1", 1), ("e2", 1)];
        let durable = DurableBroker::new(Arc::new(broker(at("e2", 1), 1..=1)), Arc::new(store(rows, true)));
        assert_eq!(durable.history(&acme(), Some(at("bogus", 0))).await.expect("read").missed, None);
    }

    #[tokio::test]
    async fn what_the_store_cannot_prove_is_not_recovered() {
        // The store does not hold `since` itself (another epoch it never saw, or pruned).
        let durable =
            DurableBroker::new(Arc::new(broker(at("e2", 1), 1..=1)), Arc::new(store(vec![("e1", 3)], true)));
        assert_eq!(durable.history(&acme(), Some(at("e1", 2))).await.expect("read").missed, None);
        // A hole in the store and nothing more in the broker.
        let rows = vec![("e1", 2), ("e1", 4)];
        let durable = DurableBroker::new(Arc::new(broker(at("e1", 4), 4..=4)), Arc::new(store(rows, true)));
        assert_eq!(durable.history(&acme(), Some(at("e1", 1))).await.expect("read").missed, None);
        // A position beyond the channel's.
        let durable = DurableBroker::new(Arc::new(broker(at("e1", 4), 4..=4)), Arc::new(store(vec![], true)));
        assert_eq!(durable.history(&acme(), Some(at("e1", 9))).await.expect("read").missed, None);
    }
}
