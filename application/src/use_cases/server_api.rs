//! The server API: backends publish to any channel without going through Redis themselves,
//! authenticated with an API key.

use std::borrow::Cow;
use std::sync::Arc;

use domain::envelope::{MAX_KIND_LEN, kind};
use domain::{Channel, Envelope, MessageId, PresenceScope, TenantId, TopicName, UserId};
use serde_json::value::RawValue;

use crate::frames::FrameFactory;
use crate::ports::{
    BrokerError, ControlCommand, DeliveryClaim, DeliveryLog, DeliveryRecord, HistoryQuery, MessageBroker,
    MessageSource, Metrics, NoMetrics,
};
use crate::use_cases::presence::TrackPresence;
use crate::use_cases::publish_timed;
use crate::use_cases::read_history::{HistoryError, HistoryPage, MAX_HISTORY_PAGE, ReadHistory};

/// The keys that open the server API. Their `Debug` output never shows them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ApiKeys(Vec<Vec<u8>>);

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys, <redacted>)", self.0.len())
    }
}

impl ApiKeys {
    pub fn new(keys: impl IntoIterator<Item = impl Into<Vec<u8>>>) -> Self {
        Self(keys.into_iter().map(Into::into).filter(|k: &Vec<u8>| !k.is_empty()).collect())
    }

    /// No key: the API is off and every call is refused.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many keys open the API.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether `presented` is one of the keys. Every key is compared, each in time that depends
    /// only on the lengths, so the answer's timing tells nothing about the keys' contents.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        self.0.iter().fold(false, |found, key| found | constant_time_eq(key, presented))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// Why a server API call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerApiError {
    /// No `Authorization: Bearer` key, or a wrong one. HTTP 401.
    #[error("a valid API key is required: Authorization: Bearer <key>")]
    Unauthorized,
    /// No key is configured: the server API is off. HTTP 404.
    #[error("the server API is off on this deployment: no API_KEYS are configured")]
    Disabled,
    /// The body is not what the call takes. HTTP 400.
    #[error("{0}")]
    BadRequest(String),
    /// The broker did not take the message. HTTP 503.
    #[error(transparent)]
    Broker(BrokerError),
    /// Another call with the same idempotency key is being published. HTTP 409.
    #[error("a message with this idempotency key is being published; retry later")]
    InProgress,
    /// A history page cannot be read: 400 (`NoHistory`, `Limit`), 404 (`PersistenceOff`,
    /// `UnknownPosition`) or 503 (`Unavailable`).
    #[error(transparent)]
    History(HistoryError),
}

/// Frame types only the server produces: a backend may not forge them.
const RESERVED_KINDS: [&str; 10] = [
    kind::WELCOME,
    kind::HISTORY,
    kind::SUBSCRIBED,
    kind::UNSUBSCRIBED,
    kind::PONG,
    kind::ERROR,
    kind::REFRESHED,
    kind::PRESENCE,
    kind::PRESENCE_JOIN,
    kind::PRESENCE_LEAVE,
];

/// The server API use-case.
pub struct ServerApi {
    keys: ApiKeys,
    broker: Arc<dyn MessageBroker>,
    frames: FrameFactory,
    metrics: Arc<dyn Metrics>,
    presence: Option<Arc<TrackPresence>>,
    history: ReadHistory,
    /// Which keys were published, and how long they are remembered.
    deliveries: Option<(Arc<dyn DeliveryLog>, u64)>,
}

/// A message published once per key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub message_id: MessageId,
    /// The key was published before: nothing was published now.
    pub duplicate: bool,
}

/// How long a claimed key blocks a second call while its publish is under way.
const PENDING_SECS: u64 = 10;

impl std::fmt::Debug for ServerApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerApi").field("keys", &self.keys).finish_non_exhaustive()
    }
}

impl ServerApi {
    pub fn new(keys: ApiKeys, broker: Arc<dyn MessageBroker>, frames: FrameFactory) -> Self {
        Self {
            keys,
            broker,
            frames,
            metrics: Arc::new(NoMetrics),
            presence: None,
            history: ReadHistory::default(),
            deliveries: None,
        }
    }

    /// Remembers the keys of [`ServerApi::publish_once`] in `log` for `keep_secs`.
    pub fn with_idempotency(mut self, log: Option<Arc<dyn DeliveryLog>>, keep_secs: u64) -> Self {
        self.deliveries = log.map(|log| (log, keep_secs));
        self
    }

    /// Answers history calls with `history`.
    pub fn with_history(mut self, history: ReadHistory) -> Self {
        self.history = history;
        self
    }

    /// A page of `channel`'s history (see [`ReadHistory::page`]), at most
    /// [`MAX_HISTORY_PAGE`] messages.
    ///
    /// # Errors
    /// [`ServerApiError::History`].
    pub async fn history(
        &self,
        channel: &Channel,
        query: HistoryQuery,
    ) -> Result<HistoryPage, ServerApiError> {
        self.history.page(channel, query, MAX_HISTORY_PAGE).await.map_err(ServerApiError::History)
    }

    /// Reports to `metrics` instead of nowhere.
    pub fn with_metrics(mut self, metrics: Arc<dyn Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Answers presence calls from `presence`.
    pub fn with_presence(mut self, presence: Arc<TrackPresence>) -> Self {
        self.presence = Some(presence);
        self
    }

    /// The users online in a tenant (`tenant:{tenant}`) or the present members of a topic
    /// (`topic:{tenant}:{name}`); `Ok(None)` when presence is turned off.
    ///
    /// # Errors
    /// [`ServerApiError::BadRequest`] for another channel, [`ServerApiError::Broker`] when the
    /// presence store cannot be reached.
    pub async fn presence(
        &self,
        channel: &Channel,
    ) -> Result<Option<Vec<crate::ports::PresentUser>>, ServerApiError> {
        let scope = match channel {
            Channel::Tenant(tenant) => PresenceScope::tenant(tenant.clone()),
            Channel::Topic(tenant, topic) => PresenceScope::topic(tenant.clone(), topic.clone()),
            _ => {
                return Err(ServerApiError::BadRequest(
                    "presence is kept for tenant:{tenant} and topic:{tenant}:{name} channels".to_owned(),
                ));
            }
        };
        match &self.presence {
            Some(presence) => presence.list(&scope).await.map_err(ServerApiError::Broker),
            None => Ok(None),
        }
    }

    /// Checks the key of an `Authorization: Bearer <key>` header.
    ///
    /// # Errors
    /// [`ServerApiError::Disabled`] when no key is configured, [`ServerApiError::Unauthorized`]
    /// when there is no key or a wrong one.
    pub fn authorize(&self, bearer: Option<&str>) -> Result<(), ServerApiError> {
        if self.keys.is_empty() {
            return Err(ServerApiError::Disabled);
        }
        match bearer {
            Some(key) if self.keys.accepts(key.as_bytes()) => Ok(()),
            _ => Err(ServerApiError::Unauthorized),
        }
    }

    /// Publishes a message of type `kind` with `payload` on `channel` and returns its message
    /// id once the broker accepted it. `kind` is 1 to 64 bytes and not one of the server's own
    /// frame types.
    ///
    /// # Errors
    /// [`ServerApiError::BadRequest`] for a `kind` or `payload` that is not that,
    /// [`ServerApiError::Broker`] when the broker did not take the message.
    pub async fn publish(
        &self,
        channel: Channel,
        kind: &str,
        payload: &RawValue,
    ) -> Result<MessageId, ServerApiError> {
        let envelope = self.envelope(&channel, kind, payload)?;
        self.metrics.message_received(MessageSource::Api);
        publish_timed(&*self.broker, &*self.metrics, &channel, &envelope, None)
            .await
            .map_err(ServerApiError::Broker)?;
        Ok(envelope.message_id)
    }

    /// Publishes like [`ServerApi::publish`] once per `key`: a second call with a key already
    /// published (within the delivery log's memory) publishes nothing and answers the first
    /// message's id as a duplicate. Without a delivery log, it publishes as `publish` does.
    ///
    /// # Errors
    /// As [`ServerApi::publish`], and [`ServerApiError::InProgress`] while another call with
    /// the same key is being published.
    pub async fn publish_once(
        &self,
        channel: Channel,
        kind: &str,
        payload: &RawValue,
        key: &str,
    ) -> Result<Published, ServerApiError> {
        let envelope = self.envelope(&channel, kind, payload)?;
        let Some((log, keep_secs)) = &self.deliveries else {
            let message_id = self.publish(channel, kind, payload).await?;
            return Ok(Published { message_id, duplicate: false });
        };
        // Keys of broadcasts are kept apart from every tenant's.
        let tenant = channel
            .tenant()
            .cloned()
            .unwrap_or_else(|| TenantId::parse("_broadcast").unwrap_or_else(|_| unreachable!("a valid id")));
        match log.claim(&tenant, key, PENDING_SECS).await.map_err(ServerApiError::Broker)? {
            DeliveryClaim::Delivered(message_id) => return Ok(Published { message_id, duplicate: true }),
            DeliveryClaim::InProgress => return Err(ServerApiError::InProgress),
            DeliveryClaim::Claimed => {}
        }
        let record = DeliveryRecord {
            tenant: tenant.clone(),
            delivery_id: key.to_owned(),
            message_id: envelope.message_id.clone(),
            keep_secs: *keep_secs,
        };
        self.metrics.message_received(MessageSource::Api);
        match publish_timed(&*self.broker, &*self.metrics, &channel, &envelope, Some(&record)).await {
            Ok(()) => {
                if let Err(error) = log.complete(&record).await {
                    tracing::warn!(%error, "published but its key not recorded");
                }
                Ok(Published { message_id: envelope.message_id, duplicate: false })
            }
            Err(error) => {
                log.release(&tenant, key).await;
                Err(ServerApiError::Broker(error))
            }
        }
    }

    /// The envelope a backend's message becomes, once its channel, type and payload are
    /// checked.
    fn envelope(
        &self,
        channel: &Channel,
        kind: &str,
        payload: &RawValue,
    ) -> Result<Envelope, ServerApiError> {
        if kind.is_empty() || kind.len() > MAX_KIND_LEN {
            return Err(ServerApiError::BadRequest(format!("\"type\" must be 1 to {MAX_KIND_LEN} bytes")));
        }
        if RESERVED_KINDS.contains(&kind) {
            return Err(ServerApiError::BadRequest(format!("\"type\" {kind:?} is reserved for the server")));
        }
        if let Channel::Presence(_) = channel {
            return Err(ServerApiError::BadRequest(
                "presence channels carry the server's announcements only".to_owned(),
            ));
        }
        if domain::envelope::has_lone_surrogate(payload.get()) {
            return Err(ServerApiError::BadRequest("payload has a lone UTF-16 surrogate escape".to_owned()));
        }
        let mut envelope =
            self.frames.envelope(kind::MESSAGE, payload.to_owned(), None, Some(channel.clone()));
        envelope.kind = Cow::Owned(kind.to_owned());
        Ok(envelope)
    }

    /// Closes every connection of `user` of `tenant` on every instance with 4003 (after a ban
    /// or a password change, say); returns how many instances received the order.
    ///
    /// # Errors
    /// [`ServerApiError::Broker`] when the broker did not take the order.
    pub async fn disconnect(&self, tenant: TenantId, user: UserId) -> Result<usize, ServerApiError> {
        let command = ControlCommand::Disconnect { tenant_id: tenant, user_id: user };
        self.broker.publish_control(&command).await.map_err(ServerApiError::Broker)
    }

    /// Ends every subscription of `user` of `tenant` to `topic` on every instance, each with
    /// an `unsubscribed` frame of reason `server`; returns how many instances received the
    /// order.
    ///
    /// # Errors
    /// [`ServerApiError::Broker`] when the broker did not take the order.
    pub async fn unsubscribe(
        &self,
        tenant: TenantId,
        user: UserId,
        topic: TopicName,
    ) -> Result<usize, ServerApiError> {
        let command = ControlCommand::Unsubscribe { tenant_id: tenant, user_id: user, channel: topic };
        self.broker.publish_control(&command).await.map_err(ServerApiError::Broker)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::MockMessageBroker;
    use crate::use_cases::test_support::*;
    use serde_json::Value;

    fn api(broker: MockMessageBroker) -> ServerApi {
        ServerApi::new(
            ApiKeys::new(["first-key-0123456789", "second-key-0123456789"]),
            Arc::new(broker),
            frames(),
        )
    }

    #[test]
    fn only_a_configured_key_opens_the_api_and_no_key_configured_opens_nothing() {
        let api = api(MockMessageBroker::new());
        assert_eq!(api.authorize(Some("second-key-0123456789")), Ok(()));
        for wrong in [None, Some(""), Some("second-key-012345678"), Some("second-key-01234567890"), Some("x")]
        {
            assert_eq!(api.authorize(wrong), Err(ServerApiError::Unauthorized), "{wrong:?}");
        }
        let closed = ServerApi::new(ApiKeys::default(), Arc::new(MockMessageBroker::new()), frames());
        assert_eq!(closed.authorize(Some("")), Err(ServerApiError::Disabled));
        assert!(!format!("{:?}", api).contains("first-key"), "keys never show in debug output");
    }

    fn channel(name: &str) -> Channel {
        Channel::parse(name).expect("valid")
    }

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_owned()).expect("JSON")
    }

    #[tokio::test]
    async fn a_message_is_published_to_the_named_channel_with_its_type() {
        let mut broker = MockMessageBroker::new();
        broker
            .expect_publish()
            .withf(|channel, bytes| {
                let v: Value = serde_json::from_slice(bytes).expect("json");
                channel.name() == "user:acme:alice"
                    && v["type"] == "invoice.paid"
                    && v["payload"] == serde_json::json!({"id": 7})
                    && v["from_user"].is_null()
                    && v["channel"] == "user:acme:alice"
            })
            .times(1)
            .returning(|_, _| Ok(None));
        let id = api(broker)
            .publish(channel("user:acme:alice"), "invoice.paid", &raw(r#"{"id":7}"#))
            .await
            .expect("published");
        assert!(!id.as_str().is_empty());
    }

    #[tokio::test]
    async fn reserved_or_bad_types_and_bad_payloads_are_refused_and_nothing_is_published() {
        let long = "x".repeat(MAX_KIND_LEN + 1);
        for (kind, payload) in [
            ("", "1"),
            (long.as_str(), "1"),
            ("welcome", "1"),
            ("presence.join", r#"{"user_id":"x"}"#),
            ("x", r#""\ud800""#),
        ] {
            let mut broker = MockMessageBroker::new();
            broker.expect_publish().never();
            let refused = api(broker).publish(channel("tenant:acme"), kind, &raw(payload)).await;
            assert!(matches!(refused, Err(ServerApiError::BadRequest(_))), "{kind} {payload}: {refused:?}");
        }
        let mut broker = MockMessageBroker::new();
        broker.expect_publish().never();
        let forged = api(broker).publish(channel("presence:acme"), "notice", &raw("1")).await;
        assert!(matches!(forged, Err(ServerApiError::BadRequest(_))), "{forged:?}");
    }

    #[tokio::test]
    async fn a_disconnect_is_sent_to_every_instance() {
        let mut broker = MockMessageBroker::new();
        broker
            .expect_publish_control()
            .withf(|command| {
                *command
                    == ControlCommand::Disconnect {
                        tenant_id: TenantId::parse("acme").expect("valid"),
                        user_id: UserId::parse("alice").expect("valid"),
                    }
            })
            .times(1)
            .returning(|_| Ok(3));
        let api = api(broker);
        let (tenant, user) =
            (TenantId::parse("acme").expect("valid"), UserId::parse("alice").expect("valid"));
        assert_eq!(api.disconnect(tenant, user).await, Ok(3));
    }

    #[tokio::test]
    async fn a_broker_failure_is_reported() {
        let mut broker = MockMessageBroker::new();
        broker.expect_publish().returning(|_, _| Err(BrokerError::Unavailable("down".into())));
        let refused = api(broker).publish(channel("global:broadcast"), "notice", &raw("null")).await;
        assert_eq!(refused, Err(ServerApiError::Broker(BrokerError::Unavailable("down".into()))));
    }
}
