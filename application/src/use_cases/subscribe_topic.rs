//! Subscribe a connection to a topic of its tenant, and end subscriptions: at the client's
//! request, by a backend, when a refreshed token no longer allows them, or when the instance
//! missed messages of the topic.
//!
//! A subscription gets the same guarantee as the tenant channel: its `subscribed` frame says
//! where the topic stands, then come the messages missed since the client's `since` (when
//! given and still in the history), then live messages, with no gap and no duplicate.

use std::sync::Arc;

use bytes::Bytes;
use domain::{
    Allowed, Capability, Channel, ErrorCode, PresenceScope, StreamPosition, SubscribeError, TenantId,
    TopicName, UnsubscribeReason, UserId,
};

use crate::Settings;
use crate::frames::FrameFactory;
use crate::hub::{Hub, Subscription};
use crate::ports::{Metrics, NoMetrics, TokenVerifier};
use crate::use_cases::connect_client::Session;
use crate::use_cases::presence::TrackPresence;

/// A `subscribe` frame, as the client sent it.
#[derive(Debug, Clone, Default)]
pub struct SubscribeRequest<'a> {
    pub since: Option<StreamPosition>,
    /// A subscription token, for a topic the connection's caps do not allow.
    pub token: Option<&'a str>,
    /// Be one of the topic's present members and receive its joins and leaves.
    pub presence: bool,
}

/// Why a subscription or a topic operation was refused; answered with an `error` frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("{0}")]
    Forbidden(String),
    #[error(transparent)]
    Subscribe(SubscribeError),
    #[error("the topic could not be subscribed: broker unavailable, retry later")]
    Unavailable,
}

impl TopicError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Forbidden(_) => ErrorCode::Forbidden,
            Self::Subscribe(SubscribeError::Limit(_)) => ErrorCode::Limit,
            Self::Subscribe(SubscribeError::Already(_)) => ErrorCode::AlreadySubscribed,
            Self::Subscribe(SubscribeError::UnknownConnection) | Self::Unavailable => ErrorCode::Unavailable,
        }
    }
}

/// The topic-subscription use-case.
pub struct SubscribeTopic {
    hub: Arc<Hub>,
    tokens: Arc<dyn TokenVerifier>,
    frames: FrameFactory,
    presence: Arc<TrackPresence>,
    max_replay_bytes: usize,
    metrics: Arc<dyn Metrics>,
}

impl std::fmt::Debug for SubscribeTopic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscribeTopic").finish_non_exhaustive()
    }
}

impl SubscribeTopic {
    pub fn new(
        hub: Arc<Hub>,
        tokens: Arc<dyn TokenVerifier>,
        frames: FrameFactory,
        presence: Arc<TrackPresence>,
        settings: &Settings,
    ) -> Self {
        Self {
            hub,
            tokens,
            frames,
            presence,
            max_replay_bytes: settings.max_replay_bytes,
            metrics: Arc::new(NoMetrics),
        }
    }

    /// Reports to `metrics` instead of nowhere.
    pub fn with_metrics(mut self, metrics: Arc<dyn Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// What the connection may do on `topic`: its caps, and what its subscription token
    /// granted when it is subscribed.
    pub fn allowed(&self, session: &Session, topic: &TopicName) -> Allowed {
        let caps = session.caps().map_or(Allowed::NONE, |caps| caps.allowed(topic));
        let info = session.info();
        let channel = Channel::Topic(info.tenant_id.clone(), topic.clone());
        let granted = self
            .hub
            .subscriptions_of(&info.tenant_id, &info.id)
            .into_iter()
            .find(|(c, _)| *c == channel)
            .map_or(Allowed::NONE, |(_, s)| s.grant());
        caps.union(granted)
    }

    /// Subscribes the session to `request.topic`: checks the permission (caps, or the
    /// subscription token), registers the subscription, waits until the broker delivers the
    /// topic here, reads where it stands and what the client missed, then queues on the
    /// connection the `subscribed` frame, the missed messages and the live ones held meanwhile.
    ///
    /// # Errors
    /// [`TopicError`]; nothing changes then.
    pub async fn subscribe(
        &self,
        session: &Session,
        topic: TopicName,
        request: SubscribeRequest<'_>,
    ) -> Result<(), TopicError> {
        let info = session.info();
        let granted = match request.token {
            Some(token) => self.grant(&info.tenant_id, &info.user_id, &topic, token).await?,
            None => Allowed::NONE,
        };
        let caps = session.caps().map_or(Allowed::NONE, |caps| caps.allowed(&topic));
        let allowed = caps.union(granted);
        if !allowed.contains(Capability::Subscribe) {
            return Err(TopicError::Forbidden(format!(
                "the token does not allow subscribing to {topic}; add it to the caps or send a subscription token"
            )));
        }
        if request.presence && !allowed.contains(Capability::Presence) {
            return Err(TopicError::Forbidden(format!("the token does not allow presence on {topic}")));
        }
        let channel = Channel::Topic(info.tenant_id.clone(), topic.clone());
        let subscription = Arc::new(Subscription::held(session.handle().clone(), granted, request.presence));
        let ack = self
            .hub
            .subscribe(&info.tenant_id, &info.id, &channel, subscription.clone())
            .map_err(TopicError::Subscribe)?;
        // Until it is open, a failure leaves nothing behind.
        let mut undo = Undo { hub: &self.hub, session, channel: &channel, armed: true };
        ack.await.map_err(|_| TopicError::Unavailable)?;
        let read = self
            .hub
            .broker()
            .history(&channel, request.since.clone())
            .await
            .map_err(|_| TopicError::Unavailable)?;
        let mut replay = Vec::new();
        let recovered = request.since.as_ref().map(|_| match read.missed {
            Some(missed) if missed.iter().map(Bytes::len).sum::<usize>() <= self.max_replay_bytes => {
                replay = missed;
                true
            }
            _ => false,
        });
        if let Some(recovered) = recovered {
            self.metrics.recovery(recovered);
        }
        let scope = PresenceScope::topic(info.tenant_id.clone(), topic);
        if request.presence {
            let watch = Arc::new(Subscription::open_now(session.handle().clone()));
            let presence_channel = Channel::Presence(scope.clone());
            let ack = self.hub.subscribe(&info.tenant_id, &info.id, &presence_channel, watch);
            if let Ok(ack) = ack
                && ack.await.is_err()
            {
                self.hub.unsubscribe(&info.tenant_id, &info.id, &presence_channel);
                return Err(TopicError::Unavailable);
            }
        }
        let first = std::iter::once(self.frames.subscribed(&channel, read.position.as_ref(), recovered))
            .chain(replay);
        // A full queue closes the connection as a slow consumer: nothing more to answer.
        let _ = subscription.open(first, read.position.as_ref());
        if let Some(position) = &read.position {
            self.hub.note_admitted(&channel, position);
        }
        undo.armed = false;
        if request.presence {
            self.presence.changed(&scope, &info.user_id).await;
        }
        Ok(())
    }

    /// What the subscription token `token` grants the session on `topic`.
    async fn grant(
        &self,
        tenant: &TenantId,
        user: &UserId,
        topic: &TopicName,
        token: &str,
    ) -> Result<Allowed, TopicError> {
        let claims = self
            .tokens
            .verify(token)
            .await
            .map_err(|error| TopicError::Forbidden(format!("subscription token refused: {error}")))?;
        domain::permissions::subscription_grant(&claims, tenant, user, topic)
            .map_err(|error| TopicError::Forbidden(format!("subscription token refused: {error}")))
    }

    /// Ends the session's subscription to `topic` (nothing when there is none) and queues the
    /// `unsubscribed` frame, after which nothing more of the topic reaches the client.
    pub async fn unsubscribe(&self, session: &Session, topic: &TopicName, reason: UnsubscribeReason) {
        let info = session.info();
        let channel = Channel::Topic(info.tenant_id.clone(), topic.clone());
        let ended = self.hub.unsubscribe(&info.tenant_id, &info.id, &channel);
        let _ = session.handle().send(self.frames.unsubscribed(&channel, reason));
        if ended.is_some_and(|s| s.presence()) {
            let scope = PresenceScope::topic(info.tenant_id.clone(), topic.clone());
            self.hub.unsubscribe(&info.tenant_id, &info.id, &Channel::Presence(scope.clone()));
            self.presence.changed(&scope, &info.user_id).await;
        }
    }

    /// Ends the session's subscriptions that its caps (just refreshed) and their own grants no
    /// longer allow, each with an `unsubscribed` frame of reason `revoked`.
    pub async fn revoke_disallowed(&self, session: &Session) {
        let info = session.info();
        for (channel, subscription) in self.hub.subscriptions_of(&info.tenant_id, &info.id) {
            let Channel::Topic(_, topic) = &channel else { continue };
            let allowed =
                session.caps().map_or(Allowed::NONE, |caps| caps.allowed(topic)).union(subscription.grant());
            let presence_lost = subscription.presence() && !allowed.contains(Capability::Presence);
            if !allowed.contains(Capability::Subscribe) || presence_lost {
                self.unsubscribe(session, topic, UnsubscribeReason::Revoked).await;
            }
        }
    }

    /// Ends every local subscription to `channel` with `reason` (the instance missed messages
    /// of it, or a backend ended a user's); their presence is recorded by the next settling.
    pub fn end(&self, subscriptions: Vec<Arc<Subscription>>, channel: &Channel, reason: UnsubscribeReason) {
        let Channel::Topic(tenant, topic) = channel else { return };
        let scope = PresenceScope::topic(tenant.clone(), topic.clone());
        for subscription in subscriptions {
            let handle = subscription.handle();
            let _ = handle.send(self.frames.unsubscribed(channel, reason));
            if subscription.presence() {
                self.hub.unsubscribe(tenant, &handle.info().id, &Channel::Presence(scope.clone()));
                self.presence.changed_later(&scope, &handle.info().user_id);
            }
        }
    }
}

/// Unregisters a subscription that did not open (a failure, or the frame's handling was
/// dropped) when it goes out of scope.
struct Undo<'a> {
    hub: &'a Hub,
    session: &'a Session,
    channel: &'a Channel,
    armed: bool,
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        if self.armed {
            let info = self.session.info();
            self.hub.unsubscribe(&info.tenant_id, &info.id, self.channel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::{HistoryRead, MessageBroker, MockMessageBroker, MockTokenVerifier, TokenError};
    use crate::use_cases::test_support::*;
    use domain::{Claims, TenantId};
    use serde_json::{Value, json};
    use std::sync::Mutex;

    /// What the mocked broker was asked to subscribe and unsubscribe.
    #[derive(Default)]
    struct Calls {
        subscribed: Mutex<Vec<String>>,
        unsubscribed: Mutex<Vec<String>>,
    }

    /// A broker whose topics stand at `e1:5` with messages 4 and 5 in their history.
    fn broker(calls: Arc<Calls>) -> Arc<dyn MessageBroker> {
        let mut broker = MockMessageBroker::new();
        let (sub, unsub) = (calls.clone(), calls);
        broker.expect_subscribe().returning(move |c| sub.subscribed.lock().expect("lock").extend(names(c)));
        broker
            .expect_unsubscribe()
            .returning(move |c| unsub.unsubscribed.lock().expect("lock").extend(names(c)));
        broker.expect_until_active().returning(|_| ack_ok());
        broker.expect_history().returning(|channel, since| {
            if !matches!(channel, Channel::Topic(..)) {
                return Ok(HistoryRead::default());
            }
            let missed = match since.map(|s| (s.epoch, s.offset)) {
                Some((epoch, 3)) if epoch == "e1" => Some(vec![message(channel, 4), message(channel, 5)]),
                Some((epoch, 5)) if epoch == "e1" => Some(vec![]),
                _ => None,
            };
            Ok(HistoryRead { position: Some(StreamPosition::new("e1", 5)), missed })
        });
        Arc::new(broker)
    }

    fn message(channel: &Channel, offset: u64) -> Bytes {
        Bytes::from(format!(
            r#"{{"type":"n","payload":{offset},"channel":"{channel}","offset":{offset},"epoch":"e1"}}"#
        ))
    }

    /// Subscription tokens are `grant:<topic>:<allow…>` for bob of acme; anything else fails.
    fn tokens() -> Arc<dyn TokenVerifier> {
        let mut tokens = MockTokenVerifier::new();
        tokens.expect_verify().returning(|token| {
            let mut parts = token.split(':');
            (parts.next() == Some("grant")).then_some(()).ok_or(TokenError::BadSignature)?;
            let channel = parts.next().map(str::to_owned);
            let allow: Vec<&str> = parts.collect();
            Ok(Claims {
                sub: Some("bob".into()),
                tenant_id: Some("acme".into()),
                channel,
                allow: (!allow.is_empty()).then(|| json!(allow)),
                ..Claims::default()
            })
        });
        Arc::new(tokens)
    }

    struct Setup {
        hub: Arc<Hub>,
        topics: SubscribeTopic,
        calls: Arc<Calls>,
    }

    fn setup(max_topics: usize) -> Setup {
        let calls = Arc::new(Calls::default());
        let broker = broker(calls.clone());
        let hub = Arc::new(Hub::new(broker.clone(), 10).with_topic_limit(max_topics));
        let presence = Arc::new(TrackPresence::new(None, hub.clone(), broker, frames()));
        let topics = SubscribeTopic::new(hub.clone(), tokens(), frames(), presence, &Settings::default());
        Setup { hub, topics, calls }
    }

    async fn bob(hub: &Arc<Hub>, caps: Value) -> (Session, Arc<RecordingSink>) {
        let sink = RecordingSink::new();
        let claims = Claims { caps: Some(caps), ..connect_claims("bob", "acme") };
        (session_with_claims(hub, claims, sink.clone()).await, sink)
    }

    fn topic(name: &str) -> TopicName {
        TopicName::parse(name).expect("valid")
    }

    fn acme(name: &str) -> Channel {
        Channel::Topic(TenantId::parse("acme").expect("valid"), topic(name))
    }

    fn sub(since: Option<StreamPosition>) -> SubscribeRequest<'static> {
        SubscribeRequest { since, ..SubscribeRequest::default() }
    }

    fn after_welcome(sink: &RecordingSink) -> Vec<Value> {
        sink.frames().into_iter().skip(1).collect()
    }

    #[tokio::test]
    async fn without_a_cap_or_a_token_a_subscription_is_forbidden_and_nothing_is_subscribed() {
        let s = setup(0);
        let (session, sink) = bob(&s.hub, json!([{"channels": ["chat.*"], "allow": ["sub"]}])).await;
        let refused = s.topics.subscribe(&session, topic("orders"), sub(None)).await;
        assert!(matches!(&refused, Err(TopicError::Forbidden(_))), "{refused:?}");
        assert_eq!(refused.expect_err("refused").code(), ErrorCode::Forbidden);
        let with_presence = SubscribeRequest { presence: true, ..sub(None) };
        let refused = s.topics.subscribe(&session, topic("chat.1"), with_presence).await;
        assert!(matches!(refused, Err(TopicError::Forbidden(m)) if m.contains("presence")));
        assert!(s.calls.subscribed.lock().expect("lock").iter().all(|c| !c.starts_with("topic:")));
        assert!(after_welcome(&sink).is_empty());
    }

    #[tokio::test]
    async fn a_subscription_is_answered_with_the_topics_position_then_live_messages_follow() {
        let s = setup(0);
        let (session, sink) = bob(&s.hub, json!([{"channels": ["*"], "allow": ["sub"]}])).await;
        s.topics.subscribe(&session, topic("orders"), sub(None)).await.expect("subscribed");
        let orders = acme("orders");
        assert_eq!(
            *s.calls.subscribed.lock().expect("lock"),
            ["tenant:acme", "user:acme:bob", "topic:acme:orders"]
        );
        s.hub.fan_out(&orders, &message(&orders, 5), Some((5, "e1")));
        s.hub.fan_out(&orders, &message(&orders, 6), Some((6, "e1")));
        s.hub.fan_out(&acme("other"), &message(&acme("other"), 1), Some((1, "e1")));
        let frames = after_welcome(&sink);
        assert_eq!(frames[0]["type"], "subscribed");
        assert_eq!(frames[0]["channel"], "topic:acme:orders");
        assert_eq!(frames[0]["payload"], json!({"position": {"offset": 5, "epoch": "e1"}}));
        let live: Vec<u64> = frames[1..].iter().map(|f| f["payload"].as_u64().expect("n")).collect();
        assert_eq!(live, [6], "5 is where the subscription starts; other topics never arrive");
        let again = s.topics.subscribe(&session, topic("orders"), sub(None)).await;
        assert_eq!(again.expect_err("twice").code(), ErrorCode::AlreadySubscribed);
    }

    #[tokio::test]
    async fn a_subscription_with_since_gets_what_it_missed_or_is_told_it_cannot() {
        let s = setup(0);
        let (session, sink) = bob(&s.hub, json!([{"channels": ["*"], "allow": ["sub"]}])).await;
        let since = |offset| Some(StreamPosition::new("e1", offset));
        s.topics.subscribe(&session, topic("a"), sub(since(3))).await.expect("subscribed");
        s.topics.subscribe(&session, topic("b"), sub(since(1))).await.expect("subscribed");
        let frames = after_welcome(&sink);
        assert_eq!(frames[0]["payload"]["recovered"], true);
        assert_eq!((frames[1]["payload"].as_u64(), frames[2]["payload"].as_u64()), (Some(4), Some(5)));
        assert_eq!(frames[3]["channel"], "topic:acme:b");
        assert_eq!(frames[3]["payload"]["recovered"], false);
        assert_eq!(frames.len(), 4, "nothing partial is replayed");
    }

    #[tokio::test]
    async fn a_subscription_token_grants_its_own_topic_only() {
        let s = setup(0);
        let (session, _) = bob(&s.hub, Value::Null).await;
        let with = |token| SubscribeRequest { token: Some(token), ..sub(None) };
        s.topics.subscribe(&session, topic("orders"), with("grant:orders:sub:pub")).await.expect("granted");
        assert!(s.topics.allowed(&session, &topic("orders")).contains(Capability::Publish));
        for (token, name) in [("grant:orders", "billing"), ("forged", "billing")] {
            let refused = s.topics.subscribe(&session, topic(name), with(token)).await;
            assert!(
                matches!(refused, Err(TopicError::Forbidden(m)) if m.starts_with("subscription token refused"))
            );
        }
    }

    #[tokio::test]
    async fn subscriptions_beyond_the_limit_are_refused() {
        let s = setup(1);
        let (session, _) = bob(&s.hub, json!([{"channels": ["*"], "allow": ["sub"]}])).await;
        s.topics.subscribe(&session, topic("a"), sub(None)).await.expect("first");
        let refused = s.topics.subscribe(&session, topic("b"), sub(None)).await;
        assert_eq!(refused.expect_err("over").code(), ErrorCode::Limit);
    }

    #[tokio::test]
    async fn after_unsubscribe_nothing_more_of_the_topic_arrives() {
        let s = setup(0);
        let (session, sink) = bob(&s.hub, json!([{"channels": ["*"], "allow": ["sub"]}])).await;
        s.topics.subscribe(&session, topic("orders"), sub(None)).await.expect("subscribed");
        s.topics.unsubscribe(&session, &topic("orders"), UnsubscribeReason::Requested).await;
        let orders = acme("orders");
        s.hub.fan_out(&orders, &message(&orders, 6), Some((6, "e1")));
        let frames = after_welcome(&sink);
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[1]["type"], "unsubscribed");
        assert_eq!(frames[1]["payload"], json!({"reason": "requested", "resubscribe": false}));
        assert_eq!(*s.calls.unsubscribed.lock().expect("lock"), ["topic:acme:orders"]);
    }

    #[tokio::test]
    async fn caps_refreshed_without_a_topic_end_its_subscription_but_not_a_token_granted_one() {
        let s = setup(0);
        let (session, sink) = bob(&s.hub, json!([{"channels": ["*"], "allow": ["sub"]}])).await;
        s.topics.subscribe(&session, topic("news"), sub(None)).await.expect("subscribed");
        let granted = SubscribeRequest { token: Some("grant:orders"), ..sub(None) };
        s.topics.subscribe(&session, topic("orders"), granted).await.expect("subscribed");
        session.set_caps(None);
        s.topics.revoke_disallowed(&session).await;
        let ended: Vec<_> = after_welcome(&sink)
            .into_iter()
            .filter(|f| f["type"] == "unsubscribed")
            .map(|f| f["channel"].clone())
            .collect();
        assert_eq!(ended, ["topic:acme:news"]);
        let left = s.hub.subscriptions_of(&TenantId::parse("acme").expect("valid"), session.connection_id());
        assert_eq!(left.into_iter().map(|(c, _)| c.name()).collect::<Vec<_>>(), ["topic:acme:orders"]);
    }

    #[tokio::test]
    async fn ending_a_topics_subscriptions_tells_each_client_to_resubscribe_and_keeps_the_connection() {
        let s = setup(0);
        let (session, sink) = bob(&s.hub, json!([{"channels": ["*"], "allow": ["sub"]}])).await;
        s.topics.subscribe(&session, topic("orders"), sub(None)).await.expect("subscribed");
        let orders = acme("orders");
        s.topics.end(s.hub.end_subscriptions(&orders), &orders, UnsubscribeReason::MissedMessages);
        let last = after_welcome(&sink).pop().expect("a frame");
        assert_eq!(last["payload"], json!({"reason": "missed_messages", "resubscribe": true}));
        assert_eq!(sink.closed(), None);
        assert!(s.topics.subscribe(&session, topic("orders"), sub(None)).await.is_ok(), "subscribes again");
    }
}
