//! The server API: backends publish to any channel without going through Redis themselves,
//! authenticated with an API key.

use std::borrow::Cow;
use std::sync::Arc;

use domain::envelope::{MAX_KIND_LEN, kind};
use domain::{Channel, MessageId, TenantId, UserId};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::frames::FrameFactory;
use crate::ports::{BrokerError, ControlCommand, MessageBroker, MessageSource, Metrics, NoMetrics};
use crate::use_cases::presence::TrackPresence;
use crate::use_cases::publish_timed;

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
    /// No `Authorization: Bearer` key, a wrong one, or no keys configured. HTTP 401.
    #[error("a valid API key is required: Authorization: Bearer <key>")]
    Unauthorized,
    /// The body is not what the call takes. HTTP 400.
    #[error("{0}")]
    BadRequest(String),
    /// The broker did not take the message. HTTP 503.
    #[error(transparent)]
    Broker(BrokerError),
}

/// `POST /api/publish`'s body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody<'a> {
    #[serde(borrow)]
    channel: Cow<'a, str>,
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    payload: &'a RawValue,
}

/// `POST /api/disconnect`'s body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectBody {
    tenant_id: TenantId,
    user_id: UserId,
}

/// Frame types only the server produces: a backend may not forge them.
const RESERVED_KINDS: [&str; 7] = [
    kind::WELCOME,
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
}

impl std::fmt::Debug for ServerApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerApi").field("keys", &self.keys).finish_non_exhaustive()
    }
}

impl ServerApi {
    pub fn new(keys: ApiKeys, broker: Arc<dyn MessageBroker>, frames: FrameFactory) -> Self {
        Self { keys, broker, frames, metrics: Arc::new(NoMetrics), presence: None }
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

    /// The users online in `tenant`; `Ok(None)` when presence is turned off.
    ///
    /// # Errors
    /// [`ServerApiError::BadRequest`] for an invalid tenant id, [`ServerApiError::Broker`] when
    /// the presence store cannot be reached.
    pub async fn presence(
        &self,
        tenant: &str,
    ) -> Result<Option<Vec<crate::ports::PresentUser>>, ServerApiError> {
        let tenant = TenantId::parse(tenant).map_err(|e| ServerApiError::BadRequest(e.to_string()))?;
        match &self.presence {
            Some(presence) => presence.list(&tenant).await.map_err(ServerApiError::Broker),
            None => Ok(None),
        }
    }

    /// Checks the key of an `Authorization: Bearer <key>` header.
    ///
    /// # Errors
    /// [`ServerApiError::Unauthorized`] when there is no key, a wrong one, or no keys at all.
    pub fn authorize(&self, bearer: Option<&str>) -> Result<(), ServerApiError> {
        match bearer {
            Some(key) if !self.keys.is_empty() && self.keys.accepts(key.as_bytes()) => Ok(()),
            _ => Err(ServerApiError::Unauthorized),
        }
    }

    /// Publishes `{"channel","type","payload"}` and returns its message id once the broker
    /// accepted it. `channel` is `tenant:<t>`, `user:<t>:<u>`, `global:broadcast` or
    /// `system:events`; `type` is 1 to 64 bytes and not one of the server's own frame types.
    ///
    /// # Errors
    /// [`ServerApiError::BadRequest`] for a body that is not that, [`ServerApiError::Broker`]
    /// when the broker did not take the message.
    pub async fn publish(&self, body: &[u8]) -> Result<MessageId, ServerApiError> {
        let body: PublishBody<'_> = serde_json::from_slice(body).map_err(|e| {
            ServerApiError::BadRequest(format!("expected {{\"channel\",\"type\",\"payload\"}}: {e}"))
        })?;
        let channel = Channel::parse(&body.channel).map_err(|e| match e {
            domain::ChannelError::Unknown(_) => ServerApiError::BadRequest(format!("invalid channel: {e}")),
            domain::ChannelError::InvalidId(_) => ServerApiError::BadRequest(e.to_string()),
        })?;
        if body.kind.is_empty() || body.kind.len() > MAX_KIND_LEN {
            return Err(ServerApiError::BadRequest(format!("\"type\" must be 1 to {MAX_KIND_LEN} bytes")));
        }
        if RESERVED_KINDS.contains(&&*body.kind) {
            return Err(ServerApiError::BadRequest(format!(
                "\"type\" {:?} is reserved for the server",
                body.kind
            )));
        }
        if domain::envelope::has_lone_surrogate(body.payload.get()) {
            return Err(ServerApiError::BadRequest("payload has a lone UTF-16 surrogate escape".to_owned()));
        }
        let mut envelope =
            self.frames.envelope(kind::MESSAGE, body.payload.to_owned(), None, Some(channel.clone()));
        envelope.kind = Cow::Owned(body.kind.into_owned());
        self.metrics.message_received(MessageSource::Api);
        publish_timed(&*self.broker, &*self.metrics, &channel, &envelope, None)
            .await
            .map_err(ServerApiError::Broker)?;
        Ok(envelope.message_id)
    }
}

impl ServerApi {
    /// Closes every connection of `{"tenant_id","user_id"}` on every instance with 4003 (after
    /// a ban or a password change, say); returns how many instances received the order.
    ///
    /// # Errors
    /// [`ServerApiError::BadRequest`] for a body that is not that (ids are checked like token
    /// claims), [`ServerApiError::Broker`] when the broker did not take the order.
    pub async fn disconnect(&self, body: &[u8]) -> Result<usize, ServerApiError> {
        let body: DisconnectBody = serde_json::from_slice(body).map_err(|e| {
            ServerApiError::BadRequest(format!("expected {{\"tenant_id\",\"user_id\"}}: {e}"))
        })?;
        let command = ControlCommand::Disconnect { tenant_id: body.tenant_id, user_id: body.user_id };
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
        assert_eq!(closed.authorize(Some("")), Err(ServerApiError::Unauthorized));
        assert!(!format!("{:?}", api).contains("first-key"), "keys never show in debug output");
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
            .returning(|_, _| Ok(()));
        let body = br#"{"channel":"user:acme:alice","type":"invoice.paid","payload":{"id":7}}"#;
        let id = api(broker).publish(body).await.expect("published");
        assert!(!id.as_str().is_empty());
    }

    #[tokio::test]
    async fn bad_bodies_are_refused_and_nothing_is_published() {
        for body in [
            &b"not json"[..],
            br#"{"channel":"tenant:acme","type":"x"}"#,
            br#"{"channel":"room:1","type":"x","payload":1}"#,
            br#"{"channel":"tenant:ac me","type":"x","payload":1}"#,
            br#"{"channel":"tenant:acme","type":"","payload":1}"#,
            br#"{"channel":"tenant:acme","type":"welcome","payload":1}"#,
            br#"{"channel":"tenant:acme","type":"presence.join","payload":{"user_id":"x"}}"#,
            br#"{"channel":"tenant:acme","type":"x","payload":1,"extra":true}"#,
            br#"{"channel":"tenant:acme","type":"x","payload":"\ud800"}"#,
        ] {
            let mut broker = MockMessageBroker::new();
            broker.expect_publish().never();
            let refused = api(broker).publish(body).await;
            assert!(
                matches!(refused, Err(ServerApiError::BadRequest(_))),
                "{}: {refused:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[tokio::test]
    async fn a_disconnect_is_sent_to_every_instance_and_bad_ids_are_refused() {
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
        assert_eq!(api.disconnect(br#"{"tenant_id":"acme","user_id":"alice"}"#).await, Ok(3));
        for body in [&br#"{"tenant_id":"acme"}"#[..], br#"{"tenant_id":"a:b","user_id":"alice"}"#, b"[]"] {
            assert!(matches!(api.disconnect(body).await, Err(ServerApiError::BadRequest(_))));
        }
    }

    #[tokio::test]
    async fn a_broker_failure_is_reported() {
        let mut broker = MockMessageBroker::new();
        broker.expect_publish().returning(|_, _| Err(BrokerError::Unavailable("down".into())));
        let refused =
            api(broker).publish(br#"{"channel":"global:broadcast","type":"notice","payload":null}"#).await;
        assert_eq!(refused, Err(ServerApiError::Broker(BrokerError::Unavailable("down".into()))));
    }
}
