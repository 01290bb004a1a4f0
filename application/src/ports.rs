//! Ports: what the application needs from the outside world, named by role.
//!
//! Every port is `Send + Sync` and used as `Arc<dyn Port>`. With the `mocks` feature (and in
//! this crate's tests) each has a mockall mock named `Mock<Port>`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Weak;

use async_trait::async_trait;
use bytes::Bytes;
use domain::{
    Channel, Claims, CloseReason, ConnectionId, MessageId, PresenceScope, Provider, StreamPosition, TenantId,
    Timestamp, TopicName, UserId,
};

/// Resolves once the broker confirmed that channels are subscribed.
pub type SubscribeAck = Pin<Box<dyn Future<Output = Result<(), BrokerError>> + Send>>;

/// A broker failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// The broker cannot be reached or refused the operation; retrying later may succeed.
    #[error("message broker unavailable: {0}")]
    Unavailable(String),
}

/// An order (or a report) for every instance, carried by the broker beside the channels (never
/// delivered to clients, never kept in a history).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlCommand {
    /// Close every connection of this user, wherever it is, with 4003.
    Disconnect { tenant_id: TenantId, user_id: UserId },
    /// End every subscription of this user to this topic, wherever it is.
    Unsubscribe { tenant_id: TenantId, user_id: UserId, channel: TopicName },
    /// Not an order: an instance's figures, sent every second, that every instance keeps for
    /// the cluster-wide statistics.
    Report(Box<crate::stats::InstanceReport>),
}

/// What a broker's history holds for one channel, as read by [`MessageBroker::history`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HistoryRead {
    /// The channel's current position: the offset of its latest message (0 before the first)
    /// and its epoch. `None` when the broker keeps no history (history turned off, or a
    /// broadcast channel).
    pub position: Option<StreamPosition>,
    /// Only when a `since` position was asked for: the messages published after it, oldest
    /// first, up to and including `position` (empty when nothing was missed); `None` when the
    /// history no longer reaches back to it (another epoch, trimmed, expired, or a position the
    /// channel never had). Never a part of what was missed.
    pub missed: Option<Vec<Bytes>>,
}

/// Carries messages between all instances of the service.
///
/// Guarantees:
/// - A message published to a channel reaches the [`InboundHandler`] of every instance that is
///   subscribed to that channel when the broker processes the message, at most once.
/// - Messages published on one channel by one instance are delivered in publication order.
/// - `subscribe` and `unsubscribe` record what the instance wants and return at once; the broker
///   converges on the latest wish (an `unsubscribe` followed by a `subscribe` of the same channel
///   leaves it subscribed). Callers hold the lock that orders their own bookkeeping while
///   calling them. [`MessageBroker::until_active`] tells when the wish is in effect.
/// - Subscriptions survive broker reconnections: the broker re-subscribes by itself.
/// - `global:broadcast` and `system:events` are subscribed for the broker's whole life.
/// - History (when the broker keeps one): every message published to a channel for which
///   [`Channel::has_history`] holds gets the channel's next offset and its epoch, added to the
///   envelope as `"offset"` and `"epoch"`, and is appended to the channel's bounded history in
///   the same atomic step as the publish: a message is in the history if and only if it was
///   published, and messages are delivered in offset order.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait MessageBroker: Send + Sync {
    /// Publishes `message` (an envelope, as one JSON object) on `channel`, with its offset and
    /// epoch added when the channel has a history. Returns once the broker has accepted the
    /// message (and appended it to the history), with the position it got there (`None`
    /// without a history).
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when the broker cannot take the message; it fails fast
    /// rather than waiting for the broker to come back.
    async fn publish(&self, channel: &Channel, message: Bytes)
    -> Result<Option<StreamPosition>, BrokerError>;

    /// Publishes like [`MessageBroker::publish`] and, where the broker can, records in the same
    /// atomic step that the webhook delivery `record` became this message, so that no crash
    /// between the two lets a retry of the delivery be relayed again. Brokers that cannot
    /// publish only; the caller records the delivery through its [`DeliveryLog`] afterwards
    /// either way.
    ///
    /// # Errors
    /// As [`MessageBroker::publish`].
    async fn publish_recorded(
        &self,
        channel: &Channel,
        message: Bytes,
        record: &DeliveryRecord,
    ) -> Result<Option<StreamPosition>, BrokerError> {
        let _ = record;
        self.publish(channel, message).await
    }

    /// Reads `channel`'s current position and, when `since` is given, every message published
    /// after it. A channel without a history yet starts one (offset 0, a new epoch).
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when the history cannot be read.
    async fn history(
        &self,
        channel: &Channel,
        since: Option<StreamPosition>,
    ) -> Result<HistoryRead, BrokerError>;

    /// Sends `command` to every instance (this one included); returns how many instances
    /// received it.
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when the broker cannot take it.
    async fn publish_control(&self, command: &ControlCommand) -> Result<usize, BrokerError>;

    /// Starts delivering messages of `channels` to this instance. Does not block.
    fn subscribe(&self, channels: &[Channel]);

    /// Stops delivering messages of `channels` to this instance. Does not block.
    fn unsubscribe(&self, channels: &[Channel]);

    /// Resolves once every one of `channels` (all previously passed to `subscribe`) is
    /// subscribed at the broker, so that every message published to them from then on reaches
    /// this instance. Resolves at once when they already are.
    ///
    /// # Errors
    /// The future resolves to [`BrokerError::Unavailable`] when the broker could not confirm
    /// in time; the subscriptions stay wanted and are retried.
    fn until_active(&self, channels: &[Channel]) -> SubscribeAck;

    /// Starts delivering inbound messages to `handler`; called once, at start-up. The broker
    /// holds the handler weakly: once the application is dropped, deliveries stop.
    fn start(&self, handler: Weak<dyn InboundHandler>);

    /// Whether publishing and receiving currently work.
    fn is_ready(&self) -> bool;

    /// Why the broker is not ready, in words for an operator (where it is, what failed); `None`
    /// when it is ready. Never a password.
    fn unavailable_reason(&self) -> Option<String> {
        (!self.is_ready()).then(|| "message broker unavailable".to_owned())
    }
}

/// Receives every message the broker delivers to this instance.
///
/// Called from the broker's receiving loop: implementations must not block or wait on clients.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
pub trait InboundHandler: Send + Sync {
    /// One message (an envelope as JSON, possibly with fields missing) arrived on `channel`.
    fn on_message(&self, channel: Channel, message: Bytes);

    /// The broker's link was re-established after an interruption: messages published
    /// meanwhile may never arrive.
    fn on_resubscribed(&self) {}

    /// A [`ControlCommand`] for every instance arrived.
    fn on_control(&self, command: ControlCommand) {
        let _ = command;
    }
}

impl TokenError {
    /// A short stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::BadSignature => "bad_signature",
            Self::WrongAlgorithm => "wrong_algorithm",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::MissingClaim(_) => "missing_claim",
            Self::WrongIssuer => "wrong_issuer",
            Self::WrongAudience => "wrong_audience",
            Self::UnsupportedCritical => "unsupported_critical",
        }
    }
}

/// Why a token was refused. Every variant means HTTP 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token uses an algorithm other than the accepted one")]
    WrongAlgorithm,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token lacks a required claim: {0}")]
    MissingClaim(String),
    #[error("token issuer is not the accepted one")]
    WrongIssuer,
    #[error("token audience does not include the accepted one")]
    WrongAudience,
    #[error("token header lists critical extensions that are not understood")]
    UnsupportedCritical,
}

/// Verifies client tokens.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait TokenVerifier: Send + Sync {
    /// Checks the token's signature, algorithm and validity window and returns its claims.
    ///
    /// # Errors
    /// [`TokenError`] naming the first check that failed.
    async fn verify(&self, token: &str) -> Result<Claims, TokenError>;
}

/// Why a webhook signature was refused, in words that tell the sender what to fix (never a
/// secret, nor what the right signature would be).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The scheme's signature header (or one of its headers) is absent or empty.
    #[error("the {header} header is missing")]
    Missing { header: &'static str },
    /// The header is there but not in the scheme's format.
    #[error("the signature header is malformed: expected {expected}")]
    Malformed { expected: &'static str },
    #[error("the signature does not match: signed with another secret, or the body changed on the way")]
    Mismatch,
    /// The signed timestamp is further from the server's clock than the scheme tolerates.
    #[error("the signature's timestamp is more than {tolerance_secs} s away from the server's clock")]
    Expired { tolerance_secs: u64 },
    /// No secret is configured for this tenant and provider.
    #[error("no webhook secret is configured for this tenant and provider")]
    UnknownTenant,
}

/// The headers of a webhook request, looked up by name without regard to case. A value that
/// is not visible ASCII is given as `"\u{fffd}"`, so it can never pass as a valid one.
#[derive(Debug, Clone, Copy, Default)]
pub struct Headers<'a>(pub &'a [(&'a str, &'a str)]);

impl<'a> Headers<'a> {
    /// The first value of header `name`, trimmed; `None` when absent or empty.
    pub fn get(&self, name: &str) -> Option<&'a str> {
        self.0
            .iter()
            .filter(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.trim())
            .find(|value| !value.is_empty())
    }
}

/// A webhook to verify: the tenant and provider it was addressed to, its headers and its raw
/// body.
#[derive(Debug, Clone, Copy)]
pub struct SignedWebhook<'a> {
    pub tenant: &'a TenantId,
    pub provider: &'a Provider,
    pub headers: Headers<'a>,
    pub body: &'a [u8],
}

/// What the signature scheme of a verified webhook says about it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verified {
    /// The provider's event name (`X-GitHub-Event`, the body's `type`), when the scheme has one.
    pub event: Option<String>,
    /// The sender's delivery id (`X-GitHub-Delivery`, Stripe's event id, `webhook-id`…), which
    /// deduplication is keyed on.
    pub delivery_id: Option<String>,
    /// The largest body accepted from this tenant and provider, when lower than the service's.
    pub max_body_bytes: Option<usize>,
}

/// Verifies that a webhook was signed by its tenant's provider, with the scheme and secrets
/// configured for that tenant and provider.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait WebhookVerifier: Send + Sync {
    /// Checks the webhook's signature over its raw body in constant time, and its timestamp
    /// against the scheme's tolerance where the scheme signs one.
    ///
    /// # Errors
    /// [`SignatureError`] when the signature is missing, malformed, wrong or too old or too
    /// new, or the tenant has no secret for this provider.
    async fn verify<'a>(&self, webhook: &SignedWebhook<'a>) -> Result<Verified, SignatureError>;
}

/// The current time.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;
}

/// Unique identifiers.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
pub trait IdGenerator: Send + Sync {
    /// A connection id never handed out before, by any instance.
    fn connection_id(&self) -> ConnectionId;
    /// A message id never handed out before, by any instance.
    fn message_id(&self) -> MessageId;
}

/// Why a frame could not be queued for a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    #[error("the client's outbound queue is full")]
    Full,
    #[error("the connection is closed")]
    Closed,
}

/// The way out to one connected client, whatever the transport: a bounded queue drained by
/// the transport's writer. A transport implements it once and hands it to
/// [`crate::session::Opening::connect`].
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
pub trait ClientSink: Send + Sync {
    /// Queues one frame (one JSON object) without waiting.
    ///
    /// # Errors
    /// [`PushError::Full`] when the queue is full, [`PushError::Closed`] when the connection
    /// is gone. Nothing is queued then.
    fn push(&self, frame: Bytes) -> Result<(), PushError>;

    /// Closes the connection with `reason`'s close code, ahead of anything still queued.
    fn close(&self, reason: CloseReason);

    /// Sends the transport's heartbeat ahead of anything still queued.
    fn ping(&self);
}

/// How a connection attempt ended, as counted by [`Metrics`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionOutcome {
    Accepted,
    Unauthorized,
    Forbidden,
    OverCapacity,
    RateLimited,
    Unavailable,
    /// No turn to open within the opening timeout (a burst of connections).
    Overloaded,
}

impl ConnectionOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::OverCapacity => "over_capacity",
            Self::RateLimited => "rate_limited",
            Self::Unavailable => "unavailable",
            Self::Overloaded => "overloaded",
        }
    }
}

/// Where a message entered the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageSource {
    /// A client's `message` frame.
    Client,
    /// An accepted webhook.
    Webhook,
    /// A message the broker delivered to this instance.
    Broker,
    /// A message a backend published through the server API.
    Api,
}

impl MessageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Webhook => "webhook",
            Self::Broker => "broker",
            Self::Api => "api",
        }
    }
}

/// Why a message or frame was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A recipient's outbound queue was full (the recipient is closed with 4008).
    SlowConsumer,
    /// A broker message that is not a valid envelope.
    Invalid,
    /// A client frame over the connection's rate limit.
    RateLimited,
    /// A client message the broker did not take.
    BrokerUnavailable,
    /// A broker message that revealed messages missing before it (or offsets handed out
    /// again): its channel's clients were closed with 4009 and recover from the history.
    Gap,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SlowConsumer => "slow_consumer",
            Self::Invalid => "invalid",
            Self::RateLimited => "rate_limited",
            Self::BrokerUnavailable => "broker_unavailable",
            Self::Gap => "gap",
        }
    }
}

/// What the use-cases report about their work. Implementations must be cheap and never block:
/// they are called on every message.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
pub trait Metrics: Send + Sync {
    /// A connection attempt over `transport` (the name its adapter gives) ended with
    /// `outcome`; `Accepted` opens a connection.
    fn connection_attempt(&self, transport: &'static str, outcome: ConnectionOutcome);
    /// An accepted connection over `transport` closed after `seconds`.
    fn connection_closed(&self, transport: &'static str, seconds: f64);
    /// A token was refused; `reason` is a short stable label.
    fn auth_failure(&self, reason: &'static str);
    fn message_received(&self, source: MessageSource);
    /// Frames queued for clients by a fan-out.
    fn messages_sent(&self, frames: u64);
    fn messages_dropped(&self, reason: DropReason, count: u64);
    /// A webhook ended with `result` after `seconds`; `provider` is only the real name for
    /// authenticated webhooks, so unauthenticated callers cannot create label values.
    fn webhook(&self, provider: &str, result: &'static str, seconds: f64);
    /// One broker publish took `seconds` (successful or not).
    fn broker_publish(&self, seconds: f64);
    /// A broker message arrived `seconds` after the time in its envelope.
    fn pubsub_lag(&self, seconds: f64);
    fn broker_up(&self, up: bool);
    fn subscribed_channels(&self, count: usize);
    /// Topic subscriptions the instance's connections hold.
    fn subscriptions(&self, count: usize);
    /// A reconnecting client asked for what it missed; `recovered` tells whether it got it.
    fn recovery(&self, recovered: bool);
    /// An outbox row was removed: `published` or `rejected`.
    fn outbox_row(&self, result: &'static str);
    /// Outbox rows waiting, and the age of the oldest in seconds.
    fn outbox_pending(&self, rows: u64, oldest_seconds: f64);
}

/// Metrics that go nowhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoMetrics;

impl Metrics for NoMetrics {
    fn connection_attempt(&self, _: &'static str, _: ConnectionOutcome) {}
    fn connection_closed(&self, _: &'static str, _: f64) {}
    fn auth_failure(&self, _: &'static str) {}
    fn message_received(&self, _: MessageSource) {}
    fn messages_sent(&self, _: u64) {}
    fn messages_dropped(&self, _: DropReason, _: u64) {}
    fn webhook(&self, _: &str, _: &'static str, _: f64) {}
    fn broker_publish(&self, _: f64) {}
    fn pubsub_lag(&self, _: f64) {}
    fn broker_up(&self, _: bool) {}
    fn subscribed_channels(&self, _: usize) {}
    fn subscriptions(&self, _: usize) {}
    fn recovery(&self, _: bool) {}
    fn outbox_row(&self, _: &'static str) {}
    fn outbox_pending(&self, _: u64, _: f64) {}
}

/// A webhook delivery that became a message, as recorded by [`DeliveryLog::complete`] or
/// [`MessageBroker::publish_recorded`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRecord {
    pub tenant: TenantId,
    pub delivery_id: String,
    pub message_id: MessageId,
    /// How long the record is kept.
    pub keep_secs: u64,
}

/// How a user's presence in a tenant or topic changed, across every instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceChange {
    /// The user had no connection anywhere and now has one.
    Joined,
    /// The user had connections and now has none anywhere.
    Left,
    Unchanged,
}

/// A user online in a tenant, or a present member of a topic.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PresentUser {
    pub user_id: UserId,
    /// Connections over every instance.
    pub connections: usize,
}

/// Who is present in each scope (a tenant: its users online; a topic: its members that
/// subscribed with presence), over every instance. Each instance keeps its own entries alive by
/// setting them again within the presence TTL; the entries of an instance that stopped doing so
/// (it crashed) expire.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait Presence: Send + Sync {
    /// This instance now has `connections` present connections of `user` in `scope` (0: none),
    /// valid for the presence TTL; returns how the user's presence in the scope changed.
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when the store cannot be reached.
    async fn set(
        &self,
        scope: &PresenceScope,
        user: &UserId,
        connections: usize,
    ) -> Result<PresenceChange, BrokerError>;

    /// The scope's present users, with their connections summed over instances.
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when the store cannot be reached.
    async fn list(&self, scope: &PresenceScope) -> Result<Vec<PresentUser>, BrokerError>;

    /// Forgets the users of `scope` whose every entry expired, and returns them: each is
    /// returned to exactly one caller, over every instance.
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when the store cannot be reached.
    async fn sweep(&self, scope: &PresenceScope) -> Result<Vec<UserId>, BrokerError>;
}

/// A message kept by a [`MessageStore`]: the bytes its clients received (its position
/// included), at its place in its channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub channel: Channel,
    pub position: StreamPosition,
    pub message: Bytes,
}

/// A message store failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or refused the operation; retrying later may succeed.
    #[error("message store unavailable: {0}")]
    Unavailable(String),
    /// A history page was asked from a position the store does not hold (never kept, or
    /// pruned).
    #[error("position {0} is not in the history (never kept, or older than the retention)")]
    UnknownPosition(String),
}

/// Which messages of a channel a history page holds, in the order they were published across
/// epochs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryQuery {
    /// Only messages published after this one.
    pub after: Option<StreamPosition>,
    /// Only messages published before this one.
    pub before: Option<StreamPosition>,
    /// At most this many.
    pub limit: usize,
    /// Newest first (the last `limit` ones), or oldest first (the first `limit` ones).
    pub newest_first: bool,
}

/// Keeps every message with a position durably, beyond the broker's bounded history.
///
/// Guarantees: a message `append` returned `Ok` for survives a restart of the store and of
/// every instance, until the retention prunes it; appending the same position twice keeps the
/// first (idempotent on replay).
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait MessageStore: Send + Sync {
    /// Keeps `message`; returns once it is committed.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when it could not be committed in time. The store keeps
    /// trying to commit it meanwhile (within a bound), so it may still be kept.
    async fn append(&self, message: StoredMessage) -> Result<(), StoreError>;

    /// The messages of `channel` in `epoch` from offset `from` on, oldest first, at most
    /// `limit`, each with its offset.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot be read.
    async fn read_from(
        &self,
        channel: &Channel,
        epoch: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Bytes)>, StoreError>;

    /// The epochs of `channel` the store holds messages of, in the order they began.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot be read.
    async fn epochs(&self, channel: &Channel) -> Result<Vec<String>, StoreError>;

    /// Resolves once the appends this instance made so far are committed (or a bound passed):
    /// what it published is then readable.
    async fn settle(&self);

    /// A page of `channel`'s history, across epochs, with each message's position.
    ///
    /// # Errors
    /// [`StoreError::UnknownPosition`] for an `after` or `before` the store does not hold,
    /// [`StoreError::Unavailable`] when the store cannot be read.
    async fn page(
        &self,
        channel: &Channel,
        query: &HistoryQuery,
    ) -> Result<Vec<(StreamPosition, Bytes)>, StoreError>;

    /// Whether appends currently succeed (and none waits to be retried beyond the bound).
    fn is_ready(&self) -> bool;
}

/// A row a backend wrote into the outbox table, in its own transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub id: i64,
    /// The channel's wire name, as written.
    pub channel: String,
    /// The frame type clients receive.
    pub kind: String,
    /// The payload, as JSON text.
    pub payload: String,
    /// The backend's key: a row whose key was already published is not published again.
    pub idempotency_key: Option<String>,
}

/// What became of an outbox row handed to the publisher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowOutcome {
    /// Published (or found published already): the row is removed.
    Published,
    /// It can never be published (a bad channel, type or payload): the row is removed, and
    /// the reason reported.
    Rejected(String),
    /// Not now (the broker or another publish of the same key is busy): the row stays, and
    /// the rows of its channel after it wait too.
    Retry,
}

/// Publishes one outbox row; see [`Outbox::consume`].
pub type RowPublisher<'a> =
    dyn Fn(OutboxRow) -> Pin<Box<dyn Future<Output = RowOutcome> + Send + 'a>> + Send + Sync + 'a;

/// The outbox table backends write into, consumed by every instance together.
#[async_trait]
pub trait Outbox: Send + Sync {
    /// Resolves when rows may be waiting: a notification of an insert, or the poll period.
    async fn wait(&self);

    /// Takes the oldest waiting rows (at most `max` per channel) of the channels no other
    /// instance is consuming, hands each to `publish` in insertion order per channel (the
    /// channels side by side), removes those published or rejected, and commits; returns how
    /// many rows it removed. A channel's rows stop at the first one to retry, so they are
    /// published in order.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the table cannot be read or changed; nothing is
    /// removed then, and what was published is found published again by its key.
    async fn consume(&self, max: usize, publish: &RowPublisher<'_>) -> Result<usize, StoreError>;

    /// Rows waiting, and the age in seconds of the oldest (0 when none).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the table cannot be read.
    async fn pending(&self) -> Result<(u64, f64), StoreError>;
}

/// What a [`DeliveryLog`] knows about a webhook delivery id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryClaim {
    /// First sight: the caller now owns the delivery and must complete or release it.
    Claimed,
    /// Another request with this id is being processed right now.
    InProgress,
    /// Already delivered, as this message.
    Delivered(MessageId),
}

/// Remembers which webhook deliveries a tenant's sender already made, so a retried delivery is
/// not relayed twice.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait DeliveryLog: Send + Sync {
    /// Claims `delivery_id` of `tenant`. A claim that is never completed lapses after
    /// `pending_secs`, so a crash cannot block the sender's retries for long.
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when the log cannot be reached.
    async fn claim(
        &self,
        tenant: &TenantId,
        delivery_id: &str,
        pending_secs: u64,
    ) -> Result<DeliveryClaim, BrokerError>;

    /// Records that the claimed delivery became a message (idempotent: the broker may already
    /// have recorded it with the publish).
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when the log cannot be reached.
    async fn complete(&self, record: &DeliveryRecord) -> Result<(), BrokerError>;

    /// Forgets a claim whose delivery failed, so the sender's retry goes through. A delivery
    /// already recorded as relayed (a publish that reached the broker although its answer did
    /// not arrive) is kept, so the retry is answered as a duplicate.
    async fn release(&self, tenant: &TenantId, delivery_id: &str);
}
