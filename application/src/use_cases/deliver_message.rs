//! Deliver a broker message to the local connections of its channel.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use domain::{Channel, CloseReason, Continuity, InboundEnvelope, StreamPosition, UnsubscribeReason};

use crate::frames::FrameFactory;
use crate::hub::Hub;
use crate::ports::{
    ControlCommand, DropReason, HistoryRead, InboundHandler, MessageSource, Metrics, NoMetrics,
};
use crate::stats::{Activity, ClusterView};
use crate::use_cases::subscribe_topic::SubscribeTopic;

/// At most one warning about invalid broker messages per this many milliseconds.
const INVALID_WARNING_INTERVAL_MS: u64 = 10_000;

/// Largest broker message delivered to clients: room for a 1 MiB webhook body and its
/// envelope, and well within what a connection's writer accepts.
pub const MAX_BROKER_MESSAGE_BYTES: usize = 2 * 1024 * 1024;

/// The deliver-a-broker-message use-case. It is the broker's [`InboundHandler`].
pub struct DeliverBrokerMessage {
    hub: Arc<Hub>,
    frames: FrameFactory,
    metrics: Arc<dyn Metrics>,
    invalid: AtomicU64,
    last_warning: AtomicU64,
    /// Set when the broker link was re-established: positions must be checked.
    interrupted: AtomicBool,
    /// The latest positions read by the first step of [`Self::check_positions`].
    expected: Mutex<Option<Vec<(Channel, StreamPosition)>>>,
    /// Ends topic subscriptions that missed messages, or that a backend ended.
    topics: Option<Arc<SubscribeTopic>>,
    /// Counts deliveries per tenant, and keeps the reports of every instance.
    stats: Option<(Arc<Activity>, Arc<ClusterView>)>,
}

impl std::fmt::Debug for DeliverBrokerMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliverBrokerMessage").field("invalid", &self.invalid).finish_non_exhaustive()
    }
}

impl DeliverBrokerMessage {
    pub fn new(hub: Arc<Hub>, frames: FrameFactory) -> Self {
        Self {
            hub,
            frames,
            metrics: Arc::new(NoMetrics),
            invalid: AtomicU64::new(0),
            last_warning: AtomicU64::new(0),
            interrupted: AtomicBool::new(false),
            expected: Mutex::new(None),
            topics: None,
            stats: None,
        }
    }

    /// Counts deliveries in `activity`, and keeps the instances' reports in `cluster`.
    pub fn with_stats(mut self, activity: Arc<Activity>, cluster: Arc<ClusterView>) -> Self {
        self.stats = Some((activity, cluster));
        self
    }

    /// Ends topic subscriptions through `topics`.
    pub fn with_topics(mut self, topics: Arc<SubscribeTopic>) -> Self {
        self.topics = Some(topics);
        self
    }

    /// Reports to `metrics` instead of nowhere.
    pub fn with_metrics(mut self, metrics: Arc<dyn Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Broker messages dropped because they were not valid envelopes.
    pub fn invalid_messages(&self) -> u64 {
        self.invalid.load(Ordering::Relaxed)
    }

    fn reject(&self, channel: &Channel, error: &domain::envelope::EnvelopeError) {
        let dropped = self.invalid.fetch_add(1, Ordering::Relaxed) + 1;
        self.metrics.messages_dropped(DropReason::Invalid, 1);
        let now = self.frames.now().unix_millis();
        let last = self.last_warning.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= INVALID_WARNING_INTERVAL_MS)
            && self
                .last_warning
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(%channel, %error, dropped_so_far = dropped, "dropping invalid broker message");
        }
    }
}

impl DeliverBrokerMessage {
    /// Messages of `channel` never reached this instance: rather than let its clients skip
    /// them silently, closes them with 4009 so they reconnect with their positions and
    /// recover what they missed from the history. A topic's subscriptions end instead, with
    /// an `unsubscribed` frame telling them to subscribe again with `since`: the rest of the
    /// connection is not disturbed.
    fn missed(&self, channel: &Channel) {
        self.metrics.messages_dropped(DropReason::Gap, 1);
        if let (Channel::Topic(..), Some(topics)) = (channel, &self.topics) {
            let ended = self.hub.end_subscriptions(channel);
            let count = ended.len();
            topics.end(ended, channel, UnsubscribeReason::MissedMessages);
            tracing::warn!(%channel, subscriptions = count, "messages of a topic never arrived; its subscriptions were ended to recover");
            return;
        }
        let closed = self.hub.close_channel(channel, CloseReason::MissedMessages);
        tracing::warn!(%channel, closed, "messages of a channel never arrived; its clients were closed to recover");
    }

    /// Finds the channels whose messages were lost while the broker link was down, in two
    /// steps a second or more apart (call it periodically): after an interruption, reads the
    /// latest position of every channel with local connections; on the next call, every
    /// channel that still has not received up to that position missed messages, and its
    /// clients are closed with 4009 to recover them.
    pub async fn check_positions(&self) {
        let expected = self.expected.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(expected) = expected {
            for (channel, latest) in expected {
                let Some(received) = self.hub.received(&channel) else { continue };
                if received.epoch != latest.epoch || received.offset < latest.offset {
                    self.hub.skip_to(&channel, &latest);
                    self.missed(&channel);
                }
            }
        }
        if !self.interrupted.swap(false, Ordering::AcqRel) {
            return;
        }
        let mut expected = Vec::new();
        for (channel, received) in self.hub.received_positions() {
            match self.hub.broker().history(&channel, None).await {
                Ok(HistoryRead { position: Some(latest), .. }) if latest != received => {
                    expected.push((channel, latest));
                }
                Ok(_) => {}
                Err(error) => {
                    // Checked again on the next call.
                    tracing::warn!(%error, "channel positions could not be checked; retrying");
                    self.interrupted.store(true, Ordering::Release);
                    return;
                }
            }
        }
        *self.expected.lock().unwrap_or_else(PoisonError::into_inner) = Some(expected);
    }
}

impl InboundHandler for DeliverBrokerMessage {
    /// `Disconnect` closes every local connection of the user with 4003; `Unsubscribe` ends
    /// the user's local subscriptions to the topic; a `Report` is kept for the cluster-wide
    /// statistics.
    fn on_control(&self, command: ControlCommand) {
        match command {
            ControlCommand::Unsubscribe { tenant_id, user_id, channel: topic } => {
                let channel = Channel::Topic(tenant_id.clone(), topic);
                let ended = self.hub.unsubscribe_user(&tenant_id, &user_id, &channel);
                if let Some(topics) = &self.topics
                    && !ended.is_empty()
                {
                    tracing::info!(%channel, subscriptions = ended.len(), "subscriptions of a user ended by the server API");
                    topics.end(ended, &channel, UnsubscribeReason::Server);
                }
            }
            ControlCommand::Disconnect { tenant_id, user_id } => {
                let channel = Channel::User(tenant_id, user_id);
                let closed = self.hub.close_channel(&channel, CloseReason::Disconnected);
                if closed > 0 {
                    tracing::info!(%channel, closed, "connections of a user disconnected by the server API");
                }
            }
            ControlCommand::Report(report) => {
                if let Some((_, cluster)) = &self.stats {
                    cluster.receive(*report);
                }
            }
        }
    }

    fn on_resubscribed(&self) {
        self.interrupted.store(true, Ordering::Release);
    }

    /// Queues the message for every local connection on `channel`. A message that already is a
    /// complete envelope for this channel is forwarded byte for byte; one with `timestamp` or
    /// `message_id` missing is completed first. Anything that is not an envelope is counted
    /// and dropped.
    fn on_message(&self, channel: Channel, message: Bytes) {
        self.metrics.message_received(MessageSource::Broker);
        if message.len() > MAX_BROKER_MESSAGE_BYTES {
            return self.reject(&channel, &domain::envelope::EnvelopeError::TooLarge(message.len()));
        }
        let now = self.frames.now();
        let envelope = match InboundEnvelope::parse(&message) {
            Ok(envelope) => envelope,
            Err(error) => return self.reject(&channel, &error),
        };
        if let Some(sent) = envelope.timestamp() {
            self.metrics.pubsub_lag(now.millis_since(sent) as f64 / 1000.0);
        }
        let frame = if envelope.is_complete_for(&channel) {
            message.clone()
        } else {
            Bytes::from(envelope.complete(&channel, || (now, self.frames.message_id())))
        };
        let position = envelope.offset().zip(envelope.epoch());
        if let Some((offset, epoch)) = position
            && channel.has_history()
        {
            match self.hub.advance(&channel, &StreamPosition::new(epoch, offset)) {
                Continuity::Next => {}
                Continuity::Gap => return self.missed(&channel),
            }
        }
        let outcome = self.hub.fan_out(&channel, &frame, position);
        self.metrics.messages_sent(outcome.delivered);
        if let Some((activity, _)) = &self.stats {
            activity.delivered(&channel, outcome.delivered);
        }
        if outcome.overflowed > 0 {
            self.metrics.messages_dropped(DropReason::SlowConsumer, outcome.overflowed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::MockMessageBroker;
    use crate::use_cases::test_support::*;
    use domain::{CloseReason, TenantId};

    fn hub() -> Arc<Hub> {
        let mut broker = MockMessageBroker::new();
        broker.expect_subscribe().returning(|_| ());
        broker.expect_unsubscribe().returning(|_| ());
        broker.expect_until_active().returning(|_| ack_ok());
        broker.expect_history().returning(|_, _| Ok(crate::ports::HistoryRead::default()));
        Arc::new(Hub::new(Arc::new(broker), 10))
    }

    fn acme() -> Channel {
        Channel::Tenant(TenantId::parse("acme").expect("valid"))
    }

    #[tokio::test]
    async fn a_complete_envelope_reaches_exactly_the_tenants_connections_byte_for_byte() {
        let hub = hub();
        let (bob, eve, mallory) = (RecordingSink::new(), RecordingSink::new(), RecordingSink::new());
        let _s1 = session_with_sink(&hub, "bob", "acme", bob.clone()).await;
        let _s2 = session_with_sink(&hub, "eve", "acme", eve.clone()).await;
        let _s3 = session_with_sink(&hub, "bob", "globex", mallory.clone()).await;
        let message = Bytes::from_static(
            br#"{"type":"message","payload":{"x":1},"timestamp":"2025-01-01T00:00:00.000Z","from_user":"bob","message_id":"abc","channel":"tenant:acme"}"#,
        );
        DeliverBrokerMessage::new(hub, frames()).on_message(acme(), message.clone());
        for sink in [&bob, &eve] {
            let frames = sink.raw_frames();
            assert_eq!(frames.len(), 2, "welcome then the message");
            assert_eq!(frames[1], message);
        }
        assert_eq!(mallory.raw_frames().len(), 1, "only its welcome");
    }

    #[tokio::test]
    async fn a_message_published_by_another_service_is_completed_before_delivery() {
        let hub = hub();
        let sink = RecordingSink::new();
        let _s = session_with_sink(&hub, "bob", "acme", sink.clone()).await;
        DeliverBrokerMessage::new(hub, frames())
            .on_message(acme(), Bytes::from_static(br#"{"type":"notice","payload":{"text":"maintenance"}}"#));
        let frame = &sink.frames()[1];
        assert_eq!(frame["type"], "notice");
        assert_eq!(frame["payload"]["text"], "maintenance");
        assert_eq!(frame["timestamp"], "2025-01-01T00:00:00.000Z");
        assert_eq!(frame["channel"], "tenant:acme");
        assert!(frame["message_id"].as_str().is_some_and(|id| !id.is_empty()));
    }

    #[tokio::test]
    async fn garbage_is_counted_and_dropped_and_later_messages_still_arrive() {
        let hub = hub();
        let sink = RecordingSink::new();
        let _s = session_with_sink(&hub, "bob", "acme", sink.clone()).await;
        let deliver = DeliverBrokerMessage::new(hub, frames());
        deliver.on_message(acme(), Bytes::from_static(b"garbage"));
        deliver.on_message(acme(), Bytes::from_static(b"{\"no\":\"type\"}"));
        deliver.on_message(acme(), Bytes::from_static(br#"{"type":"notice","payload":1}"#));
        assert_eq!(deliver.invalid_messages(), 2);
        let frames = sink.frames();
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[1]["type"], "notice");
    }

    #[tokio::test]
    async fn a_message_over_two_mebibytes_is_dropped_and_counted() {
        let hub = hub();
        let sink = RecordingSink::new();
        let _s = session_with_sink(&hub, "bob", "acme", sink.clone()).await;
        let deliver = DeliverBrokerMessage::new(hub, frames());
        let huge = format!(r#"{{"type":"notice","payload":"{}"}}"#, "x".repeat(MAX_BROKER_MESSAGE_BYTES));
        deliver.on_message(acme(), Bytes::from(huge));
        assert_eq!(deliver.invalid_messages(), 1);
        assert_eq!(sink.raw_frames().len(), 1, "only the welcome");
    }

    #[tokio::test]
    async fn deliveries_drops_and_lag_are_reported() {
        use crate::ports::{DropReason, MessageSource, MockMetrics};
        let hub = hub();
        let _a = session_with_sink(&hub, "bob", "acme", RecordingSink::new()).await;
        let _b = session_with_sink(&hub, "eve", "acme", RecordingSink::new()).await;
        let _slow = session_with_sink(&hub, "carol", "acme", RecordingSink::with_capacity(1)).await;
        let mut metrics = MockMetrics::new();
        metrics.expect_message_received().withf(|s| *s == MessageSource::Broker).times(2).returning(|_| ());
        metrics.expect_messages_sent().withf(|n| *n == 2).times(1).returning(|_| ());
        metrics
            .expect_messages_dropped()
            .withf(|r, n| *r == DropReason::SlowConsumer && *n == 1)
            .times(1)
            .returning(|_, _| ());
        metrics
            .expect_messages_dropped()
            .withf(|r, n| *r == DropReason::Invalid && *n == 1)
            .times(1)
            .returning(|_, _| ());
        // Stamped one second before the test clock's now.
        metrics.expect_pubsub_lag().withf(|s| (*s - 1.0).abs() < 1e-9).times(1).returning(|_| ());
        let deliver = DeliverBrokerMessage::new(hub, frames()).with_metrics(Arc::new(metrics));
        deliver.on_message(
            acme(),
            Bytes::from_static(br#"{"type":"n","payload":1,"timestamp":"2024-12-31T23:59:59.000Z"}"#),
        );
        deliver.on_message(acme(), Bytes::from_static(b"garbage"));
    }

    #[tokio::test]
    async fn global_and_system_messages_reach_every_connection() {
        let hub = hub();
        let (a, b) = (RecordingSink::new(), RecordingSink::new());
        let _s1 = session_with_sink(&hub, "bob", "acme", a.clone()).await;
        let _s2 = session_with_sink(&hub, "bob", "globex", b.clone()).await;
        let deliver = DeliverBrokerMessage::new(hub, frames());
        deliver.on_message(Channel::Global, Bytes::from_static(br#"{"type":"announcement","payload":1}"#));
        deliver.on_message(Channel::System, Bytes::from_static(br#"{"type":"maintenance","payload":2}"#));
        for sink in [a, b] {
            let frames = sink.frames();
            assert_eq!(frames[1]["channel"], "global:broadcast");
            assert_eq!(frames[2]["channel"], "system:events");
        }
    }

    #[tokio::test]
    async fn a_client_whose_queue_is_full_is_closed_as_a_slow_consumer() {
        let hub = hub();
        let slow = RecordingSink::with_capacity(2);
        let _s = session_with_sink(&hub, "bob", "acme", slow.clone()).await;
        let deliver = DeliverBrokerMessage::new(hub, frames());
        for _ in 0..3 {
            deliver.on_message(acme(), Bytes::from_static(br#"{"type":"notice","payload":1}"#));
        }
        assert_eq!(slow.raw_frames().len(), 2);
        assert_eq!(slow.closed(), Some(CloseReason::SlowConsumer));
    }

    fn at(offset: u64, epoch: &str) -> Bytes {
        Bytes::from(format!(r#"{{"type":"n","payload":{offset},"offset":{offset},"epoch":"{epoch}"}}"#))
    }

    fn payloads(sink: &RecordingSink) -> Vec<u64> {
        sink.frames()[1..].iter().map(|f| f["payload"].as_u64().expect("n")).collect()
    }

    #[tokio::test]
    async fn a_message_revealing_a_gap_closes_the_channel_clients_with_4009_instead_of_skipping_silently() {
        let hub = hub();
        let (bob, eve) = (RecordingSink::new(), RecordingSink::new());
        let _s1 = session_with_sink(&hub, "bob", "acme", bob.clone()).await;
        let _s2 = session_with_sink(&hub, "eve", "globex", eve.clone()).await;
        let deliver = DeliverBrokerMessage::new(hub, frames());
        deliver.on_message(acme(), at(1, "e"));
        deliver.on_message(acme(), at(2, "e"));
        assert_eq!(bob.closed(), None);
        deliver.on_message(acme(), at(4, "e"));
        assert_eq!(payloads(&bob), [1, 2], "offset 3 never arrived: 4 is recovered with it");
        assert_eq!(bob.closed(), Some(CloseReason::MissedMessages));
        assert_eq!(eve.closed(), None, "other tenants are not affected");
    }

    #[tokio::test]
    async fn offsets_handed_out_again_after_redis_restored_older_data_close_the_channel_clients() {
        let hub = hub();
        let bob = RecordingSink::new();
        let _s = session_with_sink(&hub, "bob", "acme", bob.clone()).await;
        let deliver = DeliverBrokerMessage::new(hub, frames());
        deliver.on_message(acme(), at(5, "e"));
        deliver.on_message(acme(), at(3, "e"));
        assert_eq!(payloads(&bob), [5]);
        assert_eq!(bob.closed(), Some(CloseReason::MissedMessages));
    }

    #[tokio::test]
    async fn a_disconnect_order_closes_exactly_that_users_connections_with_4003() {
        let hub = hub();
        let (alice, alice_too, bob, other) =
            (RecordingSink::new(), RecordingSink::new(), RecordingSink::new(), RecordingSink::new());
        let _s1 = session_with_sink(&hub, "alice", "acme", alice.clone()).await;
        let _s2 = session_with_sink(&hub, "alice", "acme", alice_too.clone()).await;
        let _s3 = session_with_sink(&hub, "bob", "acme", bob.clone()).await;
        let _s4 = session_with_sink(&hub, "alice", "globex", other.clone()).await;
        let deliver = DeliverBrokerMessage::new(hub, frames());
        deliver.on_control(ControlCommand::Disconnect {
            tenant_id: TenantId::parse("acme").expect("valid"),
            user_id: domain::UserId::parse("alice").expect("valid"),
        });
        assert_eq!(
            (alice.closed(), alice_too.closed()),
            (Some(CloseReason::Disconnected), Some(CloseReason::Disconnected))
        );
        assert_eq!((bob.closed(), other.closed()), (None, None));
    }

    #[tokio::test]
    async fn a_new_epoch_is_a_gap_and_a_channel_subscribed_anew_starts_afresh() {
        let hub = hub();
        let bob = RecordingSink::new();
        let session = session_with_sink(&hub, "bob", "acme", bob.clone()).await;
        let deliver = DeliverBrokerMessage::new(hub.clone(), frames());
        deliver.on_message(acme(), at(7, "e"));
        deliver.on_message(acme(), at(1, "f"));
        assert_eq!(bob.closed(), Some(CloseReason::MissedMessages));
        drop(session);
        // Nobody listened here meanwhile: later offsets are no gap for the next client.
        let eve = RecordingSink::new();
        let _s = session_with_sink(&hub, "eve", "acme", eve.clone()).await;
        deliver.on_message(acme(), at(9, "f"));
        deliver.on_message(acme(), at(10, "f"));
        assert_eq!(payloads(&eve), [9, 10]);
        assert_eq!(eve.closed(), None);
    }

    /// A broker whose channels stand, in epoch `e`, at `offset(channel, admitted)`: `admitted`
    /// for the reads of two connections being admitted (two channels each), then not.
    fn positions_broker(offset: impl Fn(&str, bool) -> u64 + Send + 'static) -> MockMessageBroker {
        let mut broker = MockMessageBroker::new();
        broker.expect_subscribe().returning(|_| ());
        broker.expect_unsubscribe().returning(|_| ());
        broker.expect_until_active().returning(|_| ack_ok());
        let reads = std::sync::atomic::AtomicUsize::new(0);
        broker.expect_history().returning(move |channel, _| {
            let admitted = reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 4;
            let position = StreamPosition::new("e", offset(&channel.name(), admitted));
            Ok(HistoryRead { position: Some(position), missed: None })
        });
        broker
    }

    #[tokio::test]
    async fn after_an_interruption_a_channel_that_stays_behind_the_broker_is_closed_to_recover() {
        // The clients are admitted at acme 2 and globex 1; afterwards the broker's latest offsets
        // are acme 5 and globex 3.
        let broker = positions_broker(|channel, admitted| match (channel, admitted) {
            ("tenant:acme", true) => 2,
            ("tenant:acme", false) => 5,
            ("tenant:globex", true) => 1,
            ("tenant:globex", false) => 3,
            _ => 0,
        });
        let hub = Arc::new(Hub::new(Arc::new(broker), 10));
        let (bob, eve) = (RecordingSink::new(), RecordingSink::new());
        let _s1 = session_with_sink(&hub, "bob", "acme", bob.clone()).await;
        let _s2 = session_with_sink(&hub, "eve", "globex", eve.clone()).await;
        let deliver = DeliverBrokerMessage::new(hub, frames());
        let globex = Channel::Tenant(TenantId::parse("globex").expect("valid"));
        deliver.on_message(acme(), at(3, "e"));
        deliver.on_message(globex.clone(), at(2, "e"));

        deliver.check_positions().await;
        assert_eq!((bob.closed(), eve.closed()), (None, None), "nothing to check before an interruption");
        deliver.on_resubscribed();
        deliver.check_positions().await;
        assert_eq!((bob.closed(), eve.closed()), (None, None), "messages in flight get time to arrive");
        // globex's message 3 arrives in time; acme's 4 and 5 never do.
        deliver.on_message(globex, at(3, "e"));
        deliver.check_positions().await;
        assert_eq!(bob.closed(), Some(CloseReason::MissedMessages));
        assert_eq!(eve.closed(), None);
        deliver.on_message(acme(), at(6, "e"));
        assert_eq!(payloads(&bob), [3], "the clients recover 4 to 6 from the history");
    }

    #[tokio::test]
    async fn a_channel_that_received_nothing_yet_is_checked_from_the_position_its_clients_were_admitted_at() {
        // Every channel stands at offset 2 when the clients are admitted; afterwards, the tenant
        // channels at 3.
        let broker = positions_broker(
            |channel, admitted| {
                if admitted || !channel.starts_with("tenant:") { 2 } else { 3 }
            },
        );
        let hub = Arc::new(Hub::new(Arc::new(broker), 10));
        let (bob, eve) = (RecordingSink::new(), RecordingSink::new());
        let _s1 = session_with_sink(&hub, "bob", "acme", bob.clone()).await;
        let _s2 = session_with_sink(&hub, "eve", "globex", eve.clone()).await;
        let globex = Channel::Tenant(TenantId::parse("globex").expect("valid"));
        // acme's message 3 was lost while the broker link was down; globex's 2 was published
        // just before the admission read and is still on its way, then its 3 arrives.
        let deliver = DeliverBrokerMessage::new(hub, frames());
        deliver.on_message(globex.clone(), at(2, "e"));
        assert!(payloads(&eve).is_empty(), "covered by the position eve was admitted at");
        deliver.on_resubscribed();
        deliver.check_positions().await;
        deliver.on_message(globex, at(3, "e"));
        deliver.check_positions().await;
        assert_eq!(bob.closed(), Some(CloseReason::MissedMessages), "never a silent gap");
        assert_eq!(eve.closed(), None, "a message from before the admission read is no gap");
        assert_eq!(payloads(&eve), [3]);
    }
}
