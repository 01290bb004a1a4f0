//! Handle a frame a client sent: relay a message to its tenant, answer a ping, refresh the
//! connection's token, or explain what is wrong with the frame — within the connection's rate
//! limit.

use std::sync::Arc;

use bytes::Bytes;
use domain::envelope::{kind, raw_payload};
use domain::{
    Capability, Channel, ClientCommand, CloseReason, ErrorCode, Identity, PresenceScope, RateDecision,
    SCOPE_WS_CONNECT, TopicName, UnsubscribeReason,
};
use serde::Serialize;

use crate::Settings;
use crate::frames::{FrameFactory, encode};
use crate::ports::{
    DropReason, HistoryQuery, MessageBroker, MessageSource, Metrics, NoMetrics, TokenVerifier,
};
use crate::use_cases::connect_client::{Session, token_deadline};
use crate::use_cases::presence::TrackPresence;
use crate::use_cases::publish_timed;
use crate::use_cases::read_history::{HistoryError, ReadHistory};
use crate::use_cases::subscribe_topic::{SubscribeRequest, SubscribeTopic};

/// What the connection does after a client frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameOutcome {
    /// Nothing to send back.
    Nothing,
    /// Send this frame back to the client.
    Reply(Bytes),
    /// Close the connection.
    Close(CloseReason),
}

#[derive(Serialize)]
struct PresencePayload {
    users: Vec<crate::ports::PresentUser>,
}

#[derive(Serialize)]
struct Refreshed {
    exp: u64,
}

/// The handle-a-client-frame use-case.
pub struct HandleClientFrame {
    broker: Arc<dyn MessageBroker>,
    tokens: Arc<dyn TokenVerifier>,
    frames: FrameFactory,
    token_leeway_secs: u64,
    metrics: Arc<dyn Metrics>,
    presence: Option<Arc<TrackPresence>>,
    topics: Option<Arc<SubscribeTopic>>,
    history: ReadHistory,
}

/// Most messages one `history` frame is answered with.
pub const MAX_CLIENT_HISTORY_PAGE: usize = 100;

#[derive(Serialize)]
struct HistoryPayload<'a> {
    messages: Vec<&'a serde_json::value::RawValue>,
    next: Option<String>,
}

impl std::fmt::Debug for HandleClientFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandleClientFrame").finish_non_exhaustive()
    }
}

impl HandleClientFrame {
    pub fn new(
        broker: Arc<dyn MessageBroker>,
        tokens: Arc<dyn TokenVerifier>,
        frames: FrameFactory,
        settings: &Settings,
    ) -> Self {
        Self {
            broker,
            tokens,
            frames,
            token_leeway_secs: settings.token_leeway_secs,
            metrics: Arc::new(NoMetrics),
            presence: None,
            topics: None,
            history: ReadHistory::default(),
        }
    }

    /// Answers `history` frames with `history`.
    pub fn with_history(mut self, history: ReadHistory) -> Self {
        self.history = history;
        self
    }

    /// Answers `subscribe`, `unsubscribe` and topic frames with `topics`.
    pub fn with_topics(mut self, topics: Arc<SubscribeTopic>) -> Self {
        self.topics = Some(topics);
        self
    }

    /// Reports to `metrics` instead of nowhere.
    pub fn with_metrics(mut self, metrics: Arc<dyn Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Answers `presence` frames from `presence`.
    pub fn with_presence(mut self, presence: Arc<TrackPresence>) -> Self {
        self.presence = Some(presence);
        self
    }

    /// Records a sign of life from the client that is not a data frame (a heartbeat answer):
    /// the connection is alive, though not active.
    pub fn seen(&self, session: &Session) {
        session.handle().seen(self.frames.now());
    }

    /// Handles one data frame: the bytes of one client frame, which must be a UTF-8 JSON
    /// object.
    ///
    /// - Over the rate limit: an `error` frame with code `rate_limited`, nothing published;
    ///   after 10 s of that without a break, close with 1008.
    /// - `message`: published to `tenant:<tenant>`; nothing is sent back when the broker took
    ///   it (the sender receives its own message through the channel like everyone else), an
    ///   `error` frame with code `unavailable` when it did not.
    /// - `direct`: published to `user:<tenant>:<to_user>` (the sender's tenant, always), with
    ///   the same answers as `message`.
    /// - `ping`: a `pong` frame.
    /// - `refresh`: a `refreshed` frame with the new expiry, or an `error` frame (`unauthorized`
    ///   for a token that fails verification, `forbidden` for another user or tenant or a
    ///   token without `ws:connect`) that changes nothing.
    /// - anything else (bytes that are not UTF-8 included): an `error` frame with code
    ///   `bad_request`.
    pub async fn handle(&self, session: &Session, frame: &[u8]) -> FrameOutcome {
        let now = self.frames.now();
        session.touch(now);
        match session.rate_check(now) {
            RateDecision::Allowed => {}
            RateDecision::Limited => {
                self.metrics.messages_dropped(DropReason::RateLimited, 1);
                return self.error(ErrorCode::RateLimited, "rate limit exceeded: frame dropped, slow down");
            }
            RateDecision::Flooding => return FrameOutcome::Close(CloseReason::PolicyViolation),
        }
        match ClientCommand::parse_bytes(frame) {
            Ok(ClientCommand::Ping) => FrameOutcome::Reply(self.frames.pong()),
            Ok(ClientCommand::Presence { channel: None }) => {
                self.presence(PresenceScope::tenant(session.info().tenant_id.clone())).await
            }
            Ok(ClientCommand::Presence { channel: Some(topic) }) => {
                if let Some(refused) =
                    self.refused(session, &topic, Capability::Presence, "see the presence of")
                {
                    return refused;
                }
                self.presence(PresenceScope::topic(session.info().tenant_id.clone(), topic)).await
            }
            Ok(ClientCommand::Message { channel: None, payload }) => {
                let channel = Channel::Tenant(session.info().tenant_id.clone());
                self.publish(session, kind::MESSAGE, channel, payload).await
            }
            Ok(ClientCommand::Message { channel: Some(topic), payload }) => {
                if let Some(refused) = self.refused(session, &topic, Capability::Publish, "publish to") {
                    return refused;
                }
                let channel = Channel::Topic(session.info().tenant_id.clone(), topic);
                self.publish(session, kind::MESSAGE, channel, payload).await
            }
            Ok(ClientCommand::Subscribe { channel: topic, since, token, presence }) => {
                let Some(topics) = &self.topics else { return self.no_topics() };
                let request = SubscribeRequest { since, token: token.as_deref(), presence };
                match topics.subscribe(session, topic.clone(), request).await {
                    Ok(()) => FrameOutcome::Nothing,
                    Err(error) => {
                        let channel = Channel::Topic(session.info().tenant_id.clone(), topic);
                        FrameOutcome::Reply(self.frames.error_on(
                            error.code(),
                            &error.to_string(),
                            Some(&channel),
                        ))
                    }
                }
            }
            Ok(ClientCommand::History { channel: topic, since, before, limit }) => {
                if let Some(refused) =
                    self.refused(session, &topic, Capability::History, "read the history of")
                {
                    return refused;
                }
                let channel = Channel::Topic(session.info().tenant_id.clone(), topic);
                let limit = limit.map_or(50, |l| usize::try_from(l).unwrap_or(usize::MAX));
                let query = HistoryQuery { newest_first: since.is_none(), after: since, before, limit };
                self.history_page(channel, query).await
            }
            Ok(ClientCommand::Unsubscribe { channel: topic }) => {
                let Some(topics) = &self.topics else { return self.no_topics() };
                topics.unsubscribe(session, &topic, UnsubscribeReason::Requested).await;
                FrameOutcome::Nothing
            }
            Ok(ClientCommand::Direct { to_user, payload }) => {
                // Always within the sender's tenant, whatever id it names.
                let channel = Channel::User(session.info().tenant_id.clone(), to_user);
                self.publish(session, kind::DIRECT, channel, payload).await
            }
            Ok(ClientCommand::Refresh { token }) => self.refresh(session, &token).await,
            Err(error) => self.error(error.code(), &error.to_string()),
        }
    }

    /// Publishes the client's `payload` as a `kind` envelope from the sender on `channel`.
    /// Nothing is sent back when the broker took it; an `error` frame `unavailable` when not.
    async fn publish(
        &self,
        session: &Session,
        kind: &'static str,
        channel: Channel,
        payload: &serde_json::value::RawValue,
    ) -> FrameOutcome {
        self.metrics.message_received(MessageSource::Client);
        let info = session.info();
        let envelope =
            self.frames.envelope(kind, payload.to_owned(), Some(info.user_id.clone()), Some(channel.clone()));
        match publish_timed(&*self.broker, &*self.metrics, &channel, &envelope, None).await {
            Ok(()) => FrameOutcome::Nothing,
            Err(error) => {
                self.metrics.messages_dropped(DropReason::BrokerUnavailable, 1);
                tracing::warn!(%error, connection_id = %info.id, "client message not published");
                self.error(ErrorCode::Unavailable, "message not delivered: broker unavailable, retry later")
            }
        }
    }

    /// An `error` frame `forbidden` when the connection may not do `cap` on `topic`.
    fn refused(
        &self,
        session: &Session,
        topic: &TopicName,
        cap: Capability,
        doing: &str,
    ) -> Option<FrameOutcome> {
        let Some(topics) = &self.topics else { return Some(self.no_topics()) };
        if topics.allowed(session, topic).contains(cap) {
            return None;
        }
        let channel = Channel::Topic(session.info().tenant_id.clone(), topic.clone());
        let message = format!("the token does not allow this connection to {doing} {topic}");
        Some(FrameOutcome::Reply(self.frames.error_on(ErrorCode::Forbidden, &message, Some(&channel))))
    }

    /// Answers a `history` frame with a page of `channel`'s kept history.
    async fn history_page(&self, channel: Channel, query: HistoryQuery) -> FrameOutcome {
        let page = match self.history.page(&channel, query, MAX_CLIENT_HISTORY_PAGE).await {
            Ok(page) => page,
            Err(error) => {
                let code = match error {
                    HistoryError::PersistenceOff => ErrorCode::Unsupported,
                    HistoryError::Unavailable(_) => ErrorCode::Unavailable,
                    HistoryError::NoHistory | HistoryError::Limit(_) | HistoryError::UnknownPosition(_) => {
                        ErrorCode::BadRequest
                    }
                };
                return FrameOutcome::Reply(self.frames.error_on(code, &error.to_string(), Some(&channel)));
            }
        };
        let messages: Vec<_> = page
            .messages
            .iter()
            .filter_map(|m| serde_json::from_slice::<&serde_json::value::RawValue>(m).ok())
            .collect();
        let next = page.next.map(|p| format!("{}:{}", p.epoch, p.offset));
        let payload = raw_payload(&HistoryPayload { messages, next });
        FrameOutcome::Reply(encode(&self.frames.envelope(kind::HISTORY, payload, None, Some(channel))))
    }

    fn no_topics(&self) -> FrameOutcome {
        self.error(ErrorCode::Unsupported, "topics are not offered here")
    }

    /// Answers a `presence` frame with the scope's present users.
    async fn presence(&self, scope: PresenceScope) -> FrameOutcome {
        let listed = match &self.presence {
            Some(presence) => presence.list(&scope).await,
            None => Ok(None),
        };
        match listed {
            Ok(Some(users)) => {
                let payload = raw_payload(&PresencePayload { users });
                let channel = scope.topic.is_some().then(|| scope.members());
                FrameOutcome::Reply(encode(&self.frames.envelope(kind::PRESENCE, payload, None, channel)))
            }
            Ok(None) => self.error(ErrorCode::Unsupported, "presence is turned off on this deployment"),
            Err(_) => {
                self.error(ErrorCode::Unavailable, "presence unavailable: broker unreachable, retry later")
            }
        }
    }

    async fn refresh(&self, session: &Session, token: &str) -> FrameOutcome {
        let identity = match self.tokens.verify(token).await.map(Identity::from_claims) {
            Ok(Ok(identity)) => identity,
            Ok(Err(error)) => {
                return self.error(ErrorCode::Unauthorized, &format!("refresh refused: {error}"));
            }
            Err(error) => return self.error(ErrorCode::Unauthorized, &format!("refresh refused: {error}")),
        };
        let info = session.info();
        if identity.user_id() != &info.user_id || identity.tenant_id() != &info.tenant_id {
            return self
                .error(ErrorCode::Forbidden, "refresh refused: the token is for another user or tenant");
        }
        if !identity.has_scope(SCOPE_WS_CONNECT) {
            return self.error(ErrorCode::Forbidden, "refresh refused: the token lacks the ws:connect scope");
        }
        session.handle().extend(token_deadline(&identity, self.token_leeway_secs));
        session.set_caps(identity.caps().cloned());
        if let Some(topics) = &self.topics {
            topics.revoke_disallowed(session).await;
        }
        let payload = raw_payload(&Refreshed { exp: identity.expires_at().unwrap_or_default() });
        FrameOutcome::Reply(encode(&self.frames.envelope(kind::REFRESHED, payload, None, None)))
    }

    fn error(&self, code: ErrorCode, message: &str) -> FrameOutcome {
        FrameOutcome::Reply(self.frames.error(code, message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Hub;
    use crate::ports::{BrokerError, MockMessageBroker, MockTokenVerifier, TokenError};
    use crate::use_cases::test_support::*;
    use domain::{Claims, Timestamp};
    use serde_json::Value;

    fn hub() -> Arc<Hub> {
        let mut hub_broker = MockMessageBroker::new();
        hub_broker.expect_subscribe().returning(|_| ());
        hub_broker.expect_unsubscribe().returning(|_| ());
        hub_broker.expect_until_active().returning(|_| ack_ok());
        hub_broker.expect_history().returning(|_, _| Ok(crate::ports::HistoryRead::default()));
        Arc::new(Hub::new(Arc::new(hub_broker), 10))
    }

    fn use_case(broker: MockMessageBroker, tokens: MockTokenVerifier) -> HandleClientFrame {
        HandleClientFrame::new(Arc::new(broker), Arc::new(tokens), frames(), &Settings::default())
    }

    fn json(outcome: FrameOutcome) -> Option<Value> {
        match outcome {
            FrameOutcome::Reply(bytes) => Some(serde_json::from_slice(&bytes).expect("json")),
            FrameOutcome::Nothing => None,
            FrameOutcome::Close(reason) => panic!("unexpected close {reason:?}"),
        }
    }

    async fn run(broker: MockMessageBroker, frame: &[u8]) -> Option<Value> {
        let session = session(&hub(), "bob", "acme").await;
        json(use_case(broker, MockTokenVerifier::new()).handle(&session, frame).await)
    }

    #[tokio::test]
    async fn a_message_is_published_to_the_senders_tenant_in_the_envelope_format() {
        let mut broker = MockMessageBroker::new();
        broker
            .expect_publish()
            .withf(|channel, bytes| {
                let v: Value = serde_json::from_slice(bytes).expect("json");
                channel.name() == "tenant:acme"
                    && v["type"] == "message"
                    && v["payload"] == serde_json::json!({"text": "hi", "n": [1, 2]})
                    && v["from_user"] == "bob"
                    && v["channel"] == "tenant:acme"
                    && v["timestamp"] == "2025-01-01T00:00:00.000Z"
                    && v["message_id"].as_str().is_some_and(|id| !id.is_empty())
            })
            .times(1)
            .returning(|_, _| Ok(None));
        let reply = run(broker, br#"{"type":"message","payload":{"text":"hi","n":[1,2]}}"#).await;
        assert_eq!(reply, None);
    }

    #[tokio::test]
    async fn a_direct_message_goes_to_the_named_users_channel_in_the_senders_tenant_only() {
        let mut broker = MockMessageBroker::new();
        broker
            .expect_publish()
            .withf(|channel, bytes| {
                let v: Value = serde_json::from_slice(bytes).expect("json");
                channel.name() == "user:acme:alice"
                    && v["type"] == "direct"
                    && v["payload"] == serde_json::json!({"secret": 1})
                    && v["from_user"] == "bob"
                    && v["channel"] == "user:acme:alice"
            })
            .times(1)
            .returning(|_, _| Ok(None));
        let frame = r#"{"type":"direct","to_user":"alice","payload":{"secret":1}}"#;
        assert_eq!(run(broker, frame.as_bytes()).await, None);

        let mut broker = MockMessageBroker::new();
        broker.expect_publish().never();
        let frame = r#"{"type":"direct","to_user":"globex:alice","payload":1}"#;
        let reply = run(broker, frame.as_bytes()).await.expect("reply");
        assert_eq!(reply["payload"]["code"], "bad_request", "{reply}");
    }

    #[tokio::test]
    async fn a_message_the_broker_cannot_take_is_answered_with_an_unavailable_error() {
        let mut broker = MockMessageBroker::new();
        broker.expect_publish().returning(|_, _| Err(BrokerError::Unavailable("down".into())));
        let reply = run(broker, br#"{"type":"message","payload":1}"#).await.expect("reply");
        assert_eq!(reply["type"], "error");
        assert_eq!(reply["payload"]["code"], "unavailable");
    }

    #[tokio::test]
    async fn a_ping_is_answered_with_a_pong_and_publishes_nothing() {
        let mut broker = MockMessageBroker::new();
        broker.expect_publish().never();
        let reply = run(broker, br#"{"type":"ping"}"#).await.expect("reply");
        assert_eq!(reply["type"], "pong");
        assert_eq!(reply["from_user"], Value::Null);
    }

    #[tokio::test]
    async fn malformed_frames_are_answered_with_bad_request_errors() {
        let frames: [&[u8]; 6] = [
            b"not json",
            b"[1,2]",
            br#"{"type":"dance"}"#,
            br#"{"type":"message"}"#,
            br#"{"type":"refresh"}"#,
            &[0x7b, 0xff, 0x7d],
        ];
        for frame in frames {
            let code = "bad_request";
            let mut broker = MockMessageBroker::new();
            broker.expect_publish().never();
            let reply = run(broker, frame).await.expect("reply");
            assert_eq!(reply["type"], "error", "{frame:?}");
            assert_eq!(reply["payload"]["code"], code, "{frame:?}");
            assert!(reply["payload"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
    }

    #[tokio::test]
    async fn frames_over_the_rate_limit_are_refused_and_not_published() {
        let mut broker = MockMessageBroker::new();
        // The default burst is 100 frames.
        broker.expect_publish().times(100).returning(|_, _| Ok(None));
        let handle = use_case(broker, MockTokenVerifier::new());
        let session = session(&hub(), "bob", "acme").await;
        for _ in 0..100 {
            let outcome = handle.handle(&session, br#"{"type":"message","payload":1}"#).await;
            assert_eq!(outcome, FrameOutcome::Nothing);
        }
        let reply = json(handle.handle(&session, br#"{"type":"message","payload":1}"#).await);
        assert_eq!(reply.expect("reply")["payload"]["code"], "rate_limited");
    }

    fn refresh_verifier(result: Result<Claims, TokenError>) -> MockTokenVerifier {
        let mut tokens = MockTokenVerifier::new();
        tokens.expect_verify().returning(move |_| result.clone());
        tokens
    }

    fn claims(user: &str, tenant: &str, scope: &str, exp: u64) -> Claims {
        Claims {
            user_id: Some(user.into()),
            tenant_id: Some(tenant.into()),
            scope: Some(scope.into()),
            exp: Some(exp),
            ..Claims::default()
        }
    }

    #[tokio::test]
    async fn a_valid_refresh_extends_the_connection_and_says_until_when() {
        let handle = use_case(
            MockMessageBroker::new(),
            refresh_verifier(Ok(claims("bob", "acme", "ws:connect", 2_000_000_000))),
        );
        let session = session(&hub(), "bob", "acme").await;
        let reply = json(handle.handle(&session, br#"{"type":"refresh","token":"t"}"#).await);
        let reply = reply.expect("reply");
        assert_eq!(reply["type"], "refreshed");
        assert_eq!(reply["payload"]["exp"], 2_000_000_000u64);
        assert_eq!(session.handle().expires_at(), Some(Timestamp::from_unix_millis(2_000_000_005_000)));
    }

    #[tokio::test]
    async fn a_refresh_that_fails_changes_nothing() {
        let cases = [
            (Err(TokenError::Expired), "unauthorized"),
            (Ok(Claims { tenant_id: None, ..claims("bob", "acme", "ws:connect", 1) }), "unauthorized"),
            (Ok(claims("eve", "acme", "ws:connect", 2_000_000_000)), "forbidden"),
            (Ok(claims("bob", "globex", "ws:connect", 2_000_000_000)), "forbidden"),
            (Ok(claims("bob", "acme", "read", 2_000_000_000)), "forbidden"),
        ];
        for (result, code) in cases {
            let handle = use_case(MockMessageBroker::new(), refresh_verifier(result.clone()));
            let session = session(&hub(), "bob", "acme").await;
            let before = session.handle().expires_at();
            let reply = json(handle.handle(&session, br#"{"type":"refresh","token":"t"}"#).await);
            assert_eq!(reply.expect("reply")["payload"]["code"], code, "{result:?}");
            assert_eq!(session.handle().expires_at(), before, "{result:?}");
        }
    }
}
