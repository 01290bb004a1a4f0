//! Connect a client: authenticate its token, admit it, register it, greet it.
//!
//! Split in two steps so that every refusal (401, 403, 503) happens before the transport
//! answers its client: [`ConnectClient::authorize`] checks the token and reserves a slot,
//! [`ConnectClient::connect`] registers the connection and queues its welcome frame.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use bytes::Bytes;
use domain::{
    Caps, Channel, ClaimsError, ConnectionId, ConnectionInfo, Identity, PresenceScope, SCOPE_WS_CONNECT,
    StreamPosition, Timestamp, TokenBucket,
};

use crate::Settings;
use crate::frames::FrameFactory;
use crate::hub::{ConnectionHandle, Hub, Permit, RegisterError, Subscription};
use crate::ports::{
    BrokerError, ClientSink, ConnectionOutcome, Metrics, NoMetrics, TokenError, TokenVerifier,
};

/// Why a client may not connect.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// No token in the query string nor in an `Authorization: Bearer` header. HTTP 401.
    #[error("missing token")]
    MissingToken,
    /// The token failed verification. HTTP 401.
    #[error("invalid token: {0}")]
    InvalidToken(TokenError),
    /// The token is valid but does not name a valid user and tenant. HTTP 401.
    #[error("invalid token claims: {0}")]
    InvalidClaims(ClaimsError),
    /// The token lacks the `ws:connect` scope. HTTP 403.
    #[error("token lacks the ws:connect scope")]
    Forbidden,
    /// A token that is valid but for another user or tenant than the session it is presented
    /// to. HTTP 403.
    #[error("the token is for another user or tenant than this connection")]
    NotThisSession,
    /// The request comes from a web page whose origin is not in `ALLOWED_ORIGINS`. HTTP 403.
    #[error("this Origin may not connect")]
    OriginNotAllowed,
    /// The instance holds `MAX_CONNECTIONS` connections. HTTP 503.
    #[error("instance is at its connection limit")]
    AtCapacity,
    /// The user holds `MAX_CONNECTIONS_PER_USER` connections on this instance. HTTP 429.
    #[error("too many connections for this user: at most {0} per instance")]
    TooManyConnections(usize),
    /// No turn to open came within the opening timeout (a burst of connections). HTTP 503.
    #[error("too many connections opening; retry")]
    Overloaded,
    /// The broker could not subscribe the connection's channels. HTTP 503.
    #[error(transparent)]
    Broker(BrokerError),
    /// The connection went away while it was being registered.
    #[error("connection closed during registration")]
    Gone,
}

/// A client that passed authentication and holds a connection slot.
#[derive(Debug)]
pub struct Admission {
    identity: Identity,
    permit: Permit,
    resume: Resume,
    transport: &'static str,
}

impl Admission {
    /// Asks for the messages missed since the client's last positions.
    pub fn resuming(mut self, resume: Resume) -> Self {
        self.resume = resume;
        self
    }

    /// The transport the client came over, as its adapter names it.
    pub fn transport(&self) -> &'static str {
        self.transport
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }
}

/// What a client asks for as it opens: the positions it last saw, if it reconnects (what was
/// published after them is replayed), and the tenant's presence announcements.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resume {
    /// The client's last position in its tenant channel (`since=`).
    pub since: Option<StreamPosition>,
    /// The client's last position in its user channel (`user_since=`).
    pub user_since: Option<StreamPosition>,
    /// The client asked for the tenant's presence announcements (`presence=1`).
    pub presence: bool,
}

/// What a connection is sent before its live messages.
struct CatchUp {
    /// The welcome, then the replayed history.
    first: Vec<Bytes>,
    /// The position each history channel is delivered from.
    positions: Vec<(Channel, StreamPosition)>,
}

/// A registered connection. Hand it back to [`crate::use_cases::disconnect_client::DisconnectClient`]
/// when it ends.
#[derive(Debug)]
pub struct Session {
    handle: Arc<ConnectionHandle>,
    /// Locked by each client frame; frames of one connection seldom race.
    pub(crate) rate: Mutex<TokenBucket>,
    /// Unregisters the connection when the session is dropped, however that happens (a
    /// cancelled handshake, a failed subscription, a task that ended early): no connection
    /// outlives its session in the hub.
    hub: Arc<Hub>,
    /// Already unregistered by [`Session::release`].
    released: AtomicBool,
    transport: &'static str,
    /// What the connection's token allows on topics; replaced by a `refresh`.
    caps: RwLock<Option<Arc<Caps>>>,
    _permit: Permit,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.release();
    }
}

impl Session {
    /// Unregisters the connection (its slot is freed when the session is dropped); returns
    /// whether this call did it.
    pub(crate) fn release(&self) -> bool {
        if self.released.swap(true, Ordering::AcqRel) {
            return false;
        }
        let info = self.handle.info();
        self.hub.unregister(&info.tenant_id, &info.id).is_some()
    }

    /// Takes one frame from the connection's rate budget at `now`.
    pub(crate) fn rate_check(&self, now: Timestamp) -> domain::RateDecision {
        self.rate.lock().unwrap_or_else(PoisonError::into_inner).check(now)
    }

    /// The transport the connection runs over, as its adapter names it.
    pub fn transport(&self) -> &'static str {
        self.transport
    }

    pub fn info(&self) -> &ConnectionInfo {
        self.handle.info()
    }

    pub fn connection_id(&self) -> &ConnectionId {
        &self.handle.info().id
    }

    pub fn handle(&self) -> &Arc<ConnectionHandle> {
        &self.handle
    }

    /// Records a data frame from the client at `now`.
    pub fn touch(&self, now: Timestamp) {
        self.handle.touch(now);
    }

    /// What the connection's token allows on topics; `None`: nothing.
    pub fn caps(&self) -> Option<Arc<Caps>> {
        self.caps.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Replaces the caps (a refreshed token).
    pub(crate) fn set_caps(&self, caps: Option<Arc<Caps>>) {
        *self.caps.write().unwrap_or_else(PoisonError::into_inner) = caps;
    }

    /// The presence scopes the connection is a member of: its tenant, and the topics it
    /// subscribed to with presence.
    pub(crate) fn presence_scopes(&self) -> Vec<PresenceScope> {
        let info = self.info();
        let topics =
            self.hub.subscriptions_of(&info.tenant_id, &info.id).into_iter().filter_map(|(channel, _)| {
                match channel {
                    Channel::Presence(scope) if scope.topic.is_some() => Some(scope),
                    _ => None,
                }
            });
        std::iter::once(PresenceScope::tenant(info.tenant_id.clone())).chain(topics).collect()
    }
}

/// The connect use-case.
pub struct ConnectClient {
    tokens: Arc<dyn TokenVerifier>,
    hub: Arc<Hub>,
    frames: FrameFactory,
    settings: Settings,
    metrics: Arc<dyn Metrics>,
}

impl std::fmt::Debug for ConnectClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectClient").finish_non_exhaustive()
    }
}

impl ConnectClient {
    pub fn new(
        tokens: Arc<dyn TokenVerifier>,
        hub: Arc<Hub>,
        frames: FrameFactory,
        settings: &Settings,
    ) -> Self {
        Self { tokens, hub, frames, settings: settings.clone(), metrics: Arc::new(NoMetrics) }
    }

    /// Reports to `metrics` instead of nowhere.
    pub fn with_metrics(mut self, metrics: Arc<dyn Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Counts a refusal of a client of `transport` and returns it.
    pub(crate) fn refused(&self, transport: &'static str, error: ConnectError) -> ConnectError {
        let outcome = match &error {
            ConnectError::MissingToken => {
                self.metrics.auth_failure("missing_token");
                ConnectionOutcome::Unauthorized
            }
            ConnectError::InvalidToken(reason) => {
                self.metrics.auth_failure(reason.label());
                ConnectionOutcome::Unauthorized
            }
            ConnectError::InvalidClaims(_) => {
                self.metrics.auth_failure("invalid_claims");
                ConnectionOutcome::Unauthorized
            }
            ConnectError::Forbidden => {
                self.metrics.auth_failure("missing_scope");
                ConnectionOutcome::Forbidden
            }
            // Refused before anything else was looked at, or not an attempt to connect.
            ConnectError::OriginNotAllowed | ConnectError::NotThisSession => return error,
            ConnectError::AtCapacity => ConnectionOutcome::OverCapacity,
            ConnectError::TooManyConnections(_) => ConnectionOutcome::RateLimited,
            ConnectError::Overloaded => ConnectionOutcome::Overloaded,
            ConnectError::Broker(_) | ConnectError::Gone => ConnectionOutcome::Unavailable,
        };
        self.metrics.connection_attempt(transport, outcome);
        error
    }

    /// Verifies the token, checks the `ws:connect` scope and reserves a connection slot.
    ///
    /// # Errors
    /// [`ConnectError::MissingToken`], [`ConnectError::InvalidToken`],
    /// [`ConnectError::InvalidClaims`], [`ConnectError::Forbidden`] or
    /// [`ConnectError::AtCapacity`], checked in that order.
    pub async fn authorize(
        &self,
        transport: &'static str,
        token: Option<&str>,
    ) -> Result<Admission, ConnectError> {
        self.check(transport, token).await.map_err(|error| self.refused(transport, error))
    }

    async fn check(&self, transport: &'static str, token: Option<&str>) -> Result<Admission, ConnectError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(ConnectError::MissingToken)?;
        let claims = self.tokens.verify(token).await.map_err(ConnectError::InvalidToken)?;
        let identity = Identity::from_claims(claims).map_err(ConnectError::InvalidClaims)?;
        if !identity.has_scope(SCOPE_WS_CONNECT) {
            return Err(ConnectError::Forbidden);
        }
        let permit = self.hub.try_admit().ok_or(ConnectError::AtCapacity)?;
        Ok(Admission { identity, permit, resume: Resume::default(), transport })
    }

    /// Registers the connection, waits until its channels are subscribed, reads their
    /// positions (and, for a resuming client, what it missed), then queues on `sink` the
    /// welcome, the missed messages and the live messages that arrived meanwhile: no gap and
    /// no duplicate between replayed and live messages. From the moment this returns, every
    /// message published to the client's channels reaches it.
    ///
    /// # Errors
    /// [`ConnectError::TooManyConnections`] when the user is at the per-user limit,
    /// [`ConnectError::Broker`] when the subscription could not be confirmed or the history
    /// read (the connection is unregistered again), [`ConnectError::Gone`] when the sink is
    /// already closed.
    pub async fn connect(
        &self,
        admission: Admission,
        sink: Arc<dyn ClientSink>,
    ) -> Result<Session, ConnectError> {
        let transport = admission.transport;
        let session = self.register(admission, sink).await.map_err(|error| self.refused(transport, error))?;
        self.metrics.connection_attempt(transport, ConnectionOutcome::Accepted);
        Ok(session)
    }

    async fn register(
        &self,
        admission: Admission,
        sink: Arc<dyn ClientSink>,
    ) -> Result<Session, ConnectError> {
        let Admission { identity, permit, resume, transport } = admission;
        let now = self.frames.now();
        let info = ConnectionInfo {
            id: self.frames.connection_id(),
            user_id: identity.user_id().clone(),
            tenant_id: identity.tenant_id().clone(),
            connected_at: now,
        };
        let expires_at = token_deadline(&identity, self.settings.token_leeway_secs);
        // Live deliveries are held until the welcome and the replay are queued.
        let handle = Arc::new(ConnectionHandle::held(info.clone(), sink, expires_at));
        let ack = self.hub.register(handle.clone()).map_err(|error| match error {
            RegisterError::UserLimit(limit) => ConnectError::TooManyConnections(limit),
            RegisterError::Registry(_) => ConnectError::Gone,
        })?;
        let rate = Mutex::new(TokenBucket::new(self.settings.rate_per_sec, self.settings.rate_burst, now));
        // Built before waiting, so that a failure or a cancelled wait unregisters it on drop.
        let session = Session {
            handle: handle.clone(),
            rate,
            hub: self.hub.clone(),
            released: AtomicBool::new(false),
            transport,
            caps: RwLock::new(identity.caps().cloned()),
            _permit: permit,
        };
        ack.await.map_err(ConnectError::Broker)?;
        if resume.presence {
            // The announcements wait behind the connection's gate like every live delivery.
            let channel = Channel::Presence(PresenceScope::tenant(info.tenant_id.clone()));
            let watch = Arc::new(Subscription::open_now(handle));
            if let Ok(ack) = self.hub.subscribe(&info.tenant_id, &info.id, &channel, watch) {
                ack.await.map_err(ConnectError::Broker)?;
            }
        }
        // Read after the subscription is active: everything after these positions arrives live.
        let catch_up = self.catch_up(&info, resume).await.map_err(ConnectError::Broker)?;
        session.handle.open(catch_up.first, &catch_up.positions).map_err(|_| ConnectError::Gone)?;
        for (channel, position) in &catch_up.positions {
            self.hub.note_admitted(channel, position);
        }
        Ok(session)
    }

    /// Reads the positions of the connection's channels and what a resuming client missed.
    /// Recovery is all or nothing: when any asked-for channel cannot be recovered, or the
    /// missed messages exceed `max_replay_bytes`, nothing is replayed and the welcome says
    /// `"recovered": false`.
    async fn catch_up(&self, info: &ConnectionInfo, resume: Resume) -> Result<CatchUp, BrokerError> {
        let asked = resume.since.is_some() || resume.user_since.is_some();
        let channels = [
            (Channel::Tenant(info.tenant_id.clone()), resume.since),
            (Channel::User(info.tenant_id.clone(), info.user_id.clone()), resume.user_since),
        ];
        // Both read at once: an opening waits for one round trip, not two.
        let broker = self.hub.broker();
        let [(tenant, since), (user, user_since)] = &channels;
        let (tenant, user) =
            tokio::join!(broker.history(tenant, since.clone()), broker.history(user, user_since.clone()));
        let reads = [tenant?, user?];
        let mut positions = Vec::with_capacity(2);
        let mut replay = Vec::new();
        let mut recovered = true;
        for ((channel, since), read) in channels.into_iter().zip(reads) {
            let wanted = since.is_some();
            if wanted {
                match read.missed {
                    Some(missed) => replay.extend(missed),
                    None => recovered = false,
                }
            }
            if let Some(position) = read.position {
                positions.push((channel, position));
            }
        }
        if recovered && replay.iter().map(Bytes::len).sum::<usize>() > self.settings.max_replay_bytes {
            recovered = false;
        }
        if !recovered {
            replay.clear();
        }
        if asked {
            self.metrics.recovery(recovered);
        }
        let welcome = self.frames.welcome(info, &positions, asked.then_some(recovered));
        let mut first = Vec::with_capacity(1 + replay.len());
        first.push(welcome);
        first.append(&mut replay);
        Ok(CatchUp { first, positions })
    }
}

/// The instant a connection proved by `identity` must end: its token's `exp` plus the leeway.
pub(crate) fn token_deadline(identity: &Identity, leeway_secs: u64) -> Option<Timestamp> {
    identity
        .expires_at()
        .map(|exp| Timestamp::from_unix_millis(exp.saturating_add(leeway_secs).saturating_mul(1000)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::{HistoryRead, MockMessageBroker, MockTokenVerifier};
    use crate::use_cases::test_support::*;
    use domain::Claims;

    fn claims(scope: &str) -> Claims {
        Claims {
            user_id: Some("bob".into()),
            tenant_id: Some("acme".into()),
            scope: Some(scope.into()),
            ..Claims::default()
        }
    }

    fn verifier(result: Result<Claims, TokenError>) -> Arc<MockTokenVerifier> {
        let mut tokens = MockTokenVerifier::new();
        tokens.expect_verify().returning(move |_| result.clone());
        Arc::new(tokens)
    }

    fn use_case(
        tokens: Arc<MockTokenVerifier>,
        broker: MockMessageBroker,
        max: usize,
    ) -> (ConnectClient, Arc<Hub>) {
        let hub = Arc::new(Hub::new(Arc::new(broker), max));
        (ConnectClient::new(tokens, hub.clone(), frames(), &Settings::default()), hub)
    }

    #[tokio::test]
    async fn a_missing_or_empty_token_is_refused_without_asking_the_verifier() {
        let mut tokens = MockTokenVerifier::new();
        tokens.expect_verify().never();
        let (connect, _) = use_case(Arc::new(tokens), MockMessageBroker::new(), 10);
        assert_eq!(connect.authorize("test", None).await.err(), Some(ConnectError::MissingToken));
        assert_eq!(connect.authorize("test", Some("")).await.err(), Some(ConnectError::MissingToken));
    }

    #[tokio::test]
    async fn a_token_the_verifier_rejects_is_refused_with_its_reason() {
        let (connect, _) = use_case(verifier(Err(TokenError::Expired)), MockMessageBroker::new(), 10);
        assert_eq!(
            connect.authorize("test", Some("t")).await.err(),
            Some(ConnectError::InvalidToken(TokenError::Expired))
        );
    }

    #[tokio::test]
    async fn every_attempt_and_auth_failure_is_reported() {
        use crate::ports::{ConnectionOutcome, MockMetrics};
        let mut metrics = MockMetrics::new();
        metrics.expect_auth_failure().withf(|r| r == "expired").times(1).returning(|_| ());
        metrics
            .expect_connection_attempt()
            .withf(|t, o| t == "test" && *o == ConnectionOutcome::Unauthorized)
            .times(1)
            .returning(|_, _| ());
        let (connect, _) = use_case(verifier(Err(TokenError::Expired)), MockMessageBroker::new(), 10);
        let connect = connect.with_metrics(Arc::new(metrics));
        assert!(connect.authorize("test", Some("t")).await.is_err());

        let mut metrics = MockMetrics::new();
        metrics.expect_auth_failure().withf(|r| r == "missing_scope").times(1).returning(|_| ());
        metrics
            .expect_connection_attempt()
            .withf(|t, o| t == "test" && *o == ConnectionOutcome::Forbidden)
            .times(1)
            .returning(|_, _| ());
        let (connect, _) = use_case(verifier(Ok(claims("read"))), MockMessageBroker::new(), 10);
        assert!(connect.with_metrics(Arc::new(metrics)).authorize("test", Some("t")).await.is_err());

        let mut broker = MockMessageBroker::new();
        broker.expect_subscribe().returning(|_| ());
        broker.expect_unsubscribe().returning(|_| ());
        broker.expect_until_active().returning(|_| ack_ok());
        broker.expect_history().returning(|_, _| Ok(crate::ports::HistoryRead::default()));
        let mut metrics = MockMetrics::new();
        metrics
            .expect_connection_attempt()
            .withf(|t, o| t == "test" && *o == ConnectionOutcome::Accepted)
            .times(1)
            .returning(|_, _| ());
        let (connect, _) = use_case(verifier(Ok(claims("ws:connect"))), broker, 10);
        let connect = connect.with_metrics(Arc::new(metrics));
        let admission = connect.authorize("test", Some("t")).await.expect("admitted");
        assert!(connect.connect(admission, RecordingSink::new()).await.is_ok());
    }

    #[tokio::test]
    async fn a_token_without_a_tenant_is_refused() {
        let mut no_tenant = claims("ws:connect");
        no_tenant.tenant_id = None;
        let (connect, _) = use_case(verifier(Ok(no_tenant)), MockMessageBroker::new(), 10);
        assert_eq!(
            connect.authorize("test", Some("t")).await.err(),
            Some(ConnectError::InvalidClaims(ClaimsError::MissingTenant))
        );
    }

    #[tokio::test]
    async fn a_token_without_the_connect_scope_is_forbidden() {
        let (connect, _) = use_case(verifier(Ok(claims("read ws:connected"))), MockMessageBroker::new(), 10);
        assert_eq!(connect.authorize("test", Some("t")).await.err(), Some(ConnectError::Forbidden));
    }

    #[tokio::test]
    async fn admission_stops_at_the_connection_limit_and_resumes_when_a_slot_frees() {
        let (connect, _) = use_case(verifier(Ok(claims("ws:connect"))), MockMessageBroker::new(), 1);
        let first = connect.authorize("test", Some("t")).await.expect("admitted");
        assert_eq!(connect.authorize("test", Some("t")).await.err(), Some(ConnectError::AtCapacity));
        drop(first);
        assert!(connect.authorize("test", Some("t")).await.is_ok());
    }

    #[tokio::test]
    async fn the_first_connection_of_a_tenant_subscribes_its_channels_and_is_welcomed_first() {
        let mut broker = MockMessageBroker::new();
        broker.expect_unsubscribe().returning(|_| ());
        broker
            .expect_subscribe()
            .withf(|channels| names(channels) == ["tenant:acme", "user:acme:bob"])
            .times(1)
            .returning(|_| ());
        broker
            .expect_until_active()
            .withf(|channels| names(channels) == ["tenant:acme", "user:acme:bob"])
            .times(1)
            .returning(|_| ack_ok());
        broker.expect_history().times(2).returning(|channel, since| {
            assert_eq!(since, None, "a fresh connection asks for no history");
            let offset = if channel.name() == "tenant:acme" { 7 } else { 0 };
            Ok(HistoryRead { position: Some(StreamPosition::new("e1", offset)), missed: None })
        });
        let (connect, hub) = use_case(verifier(Ok(claims("ws:connect"))), broker, 10);
        let sink = RecordingSink::new();
        let admission = connect.authorize("test", Some("t")).await.expect("admitted");
        let session = connect.connect(admission, sink.clone()).await.expect("connected");
        let frames = sink.frames();
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0]["type"], "welcome");
        assert_eq!(frames[0]["payload"]["connection_id"], session.connection_id().as_str());
        assert_eq!(frames[0]["payload"]["user_id"], "bob");
        assert_eq!(frames[0]["payload"]["tenant_id"], "acme");
        assert_eq!(frames[0]["from_user"], serde_json::Value::Null);
        assert!(frames[0].get("channel").is_none());
        assert_eq!(
            frames[0]["payload"]["positions"],
            serde_json::json!({
                "tenant:acme": {"offset": 7, "epoch": "e1"},
                "user:acme:bob": {"offset": 0, "epoch": "e1"},
            })
        );
        assert!(frames[0]["payload"].get("recovered").is_none(), "only a resuming client is told");
        assert_eq!(hub.len(), 1);
    }

    /// A broker whose history read answers `reads` per channel and, while it is being read,
    /// publishes `live` (offset, payload) on the tenant channel through the hub, as a message
    /// published by another instance during the recovery would arrive.
    fn racing_broker(
        hub_slot: Arc<std::sync::OnceLock<Arc<Hub>>>,
        tenant_read: HistoryRead,
        live: Vec<(u64, &'static str)>,
    ) -> MockMessageBroker {
        let mut broker = MockMessageBroker::new();
        broker.expect_subscribe().returning(|_| ());
        broker.expect_unsubscribe().returning(|_| ());
        broker.expect_until_active().returning(|_| ack_ok());
        broker.expect_history().returning(move |channel, _| {
            if channel.name() != "tenant:acme" {
                return Ok(HistoryRead { position: Some(StreamPosition::new("u", 0)), missed: Some(vec![]) });
            }
            let hub = hub_slot.get().expect("hub set");
            for (offset, text) in &live {
                hub.fan_out(channel, &message(*offset, text), Some((*offset, "e1")));
            }
            Ok(tenant_read.clone())
        });
        broker
    }

    fn message(offset: u64, text: &str) -> Bytes {
        Bytes::from(format!(
            r#"{{"type":"n","payload":"{text}","channel":"tenant:acme","offset":{offset},"epoch":"e1"}}"#
        ))
    }

    async fn resume(
        tenant_read: HistoryRead,
        live: Vec<(u64, &'static str)>,
        resume: Resume,
    ) -> Vec<serde_json::Value> {
        let slot = Arc::new(std::sync::OnceLock::new());
        let broker = racing_broker(slot.clone(), tenant_read, live);
        let (connect, hub) = use_case(verifier(Ok(claims("ws:connect"))), broker, 10);
        slot.set(hub).expect("once");
        let sink = RecordingSink::new();
        let admission = connect.authorize("test", Some("t")).await.expect("admitted").resuming(resume);
        let _session = connect.connect(admission, sink.clone()).await.expect("connected");
        sink.frames()
    }

    fn payloads(frames: &[serde_json::Value]) -> Vec<String> {
        frames[1..].iter().map(|f| f["payload"].as_str().expect("text").to_owned()).collect()
    }

    #[tokio::test]
    async fn a_resuming_client_gets_what_it_missed_then_live_messages_without_gap_or_duplicate() {
        // The client saw offset 1; 2 and 3 are in the history; 3 and 4 are published while the
        // history is read, so 3 arrives both ways and 4 only live.
        let read = HistoryRead {
            position: Some(StreamPosition::new("e1", 3)),
            missed: Some(vec![message(2, "two"), message(3, "three")]),
        };
        let frames = resume(
            read,
            vec![(3, "three"), (4, "four")],
            Resume { since: Some(StreamPosition::new("e1", 1)), user_since: None, ..Resume::default() },
        )
        .await;
        assert_eq!(frames[0]["type"], "welcome");
        assert_eq!(frames[0]["payload"]["recovered"], true);
        assert_eq!(frames[0]["payload"]["positions"]["tenant:acme"]["offset"], 3);
        assert_eq!(payloads(&frames), ["two", "three", "four"]);
    }

    #[tokio::test]
    async fn a_message_already_replayed_that_reaches_the_instance_after_the_connection_opened_is_not_sent_again()
     {
        let read = HistoryRead {
            position: Some(StreamPosition::new("e1", 3)),
            missed: Some(vec![message(2, "two"), message(3, "three")]),
        };
        let slot = Arc::new(std::sync::OnceLock::new());
        let broker = racing_broker(slot.clone(), read, vec![]);
        let (connect, hub) = use_case(verifier(Ok(claims("ws:connect"))), broker, 10);
        slot.set(hub.clone()).expect("once");
        let sink = RecordingSink::new();
        let resume =
            Resume { since: Some(StreamPosition::new("e1", 1)), user_since: None, ..Resume::default() };
        let admission = connect.authorize("test", Some("t")).await.expect("admitted").resuming(resume);
        let _session = connect.connect(admission, sink.clone()).await.expect("connected");
        // The instance's subscriber ran behind: 3, published before the history was read,
        // reaches it only now; then 4, then a new epoch.
        let acme = Channel::Tenant(domain::TenantId::parse("acme").expect("valid"));
        hub.fan_out(&acme, &message(3, "three"), Some((3, "e1")));
        hub.fan_out(&acme, &message(4, "four"), Some((4, "e1")));
        hub.fan_out(&acme, &message(1, "one of a new epoch"), Some((1, "e2")));
        assert_eq!(payloads(&sink.frames()), ["two", "three", "four", "one of a new epoch"]);
    }

    #[tokio::test]
    async fn a_client_whose_position_is_out_of_reach_is_told_and_gets_no_partial_replay() {
        let read = HistoryRead { position: Some(StreamPosition::new("e2", 5)), missed: None };
        let frames = resume(
            read,
            vec![(6, "six")],
            Resume { since: Some(StreamPosition::new("e1", 1)), user_since: None, ..Resume::default() },
        )
        .await;
        assert_eq!(frames[0]["payload"]["recovered"], false);
        assert_eq!(payloads(&frames), ["six"], "only live messages after the current position");
    }

    #[tokio::test]
    async fn a_replay_larger_than_the_limit_is_not_sent_and_the_client_is_told() {
        let big = "x".repeat(300 * 1024);
        let big: &'static str = Box::leak(big.into_boxed_str());
        let read = HistoryRead {
            position: Some(StreamPosition::new("e1", 3)),
            missed: Some(vec![message(2, big), message(3, big)]),
        };
        let frames = resume(
            read,
            vec![],
            Resume { since: Some(StreamPosition::new("e1", 1)), user_since: None, ..Resume::default() },
        )
        .await;
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0]["payload"]["recovered"], false);
    }

    #[tokio::test]
    async fn a_fresh_client_starts_from_the_current_position_and_misses_nothing_after_it() {
        let read = HistoryRead { position: Some(StreamPosition::new("e1", 3)), missed: None };
        let frames = resume(read, vec![(3, "three"), (4, "four")], Resume::default()).await;
        assert!(frames[0]["payload"].get("recovered").is_none());
        assert_eq!(payloads(&frames), ["four"]);
    }

    #[tokio::test]
    async fn a_second_connection_of_the_same_user_subscribes_nothing_new() {
        let mut broker = MockMessageBroker::new();
        broker.expect_subscribe().times(1).returning(|_| ());
        broker.expect_unsubscribe().returning(|_| ());
        broker.expect_until_active().times(2).returning(|_| ack_ok());
        broker.expect_history().returning(|_, _| Ok(crate::ports::HistoryRead::default()));
        let (connect, hub) = use_case(verifier(Ok(claims("ws:connect"))), broker, 10);
        let mut sessions = Vec::new();
        for _ in 0..2 {
            let admission = connect.authorize("test", Some("t")).await.expect("admitted");
            sessions.push(connect.connect(admission, RecordingSink::new()).await.expect("connected"));
        }
        assert_eq!(hub.len(), 2);
        assert_ne!(sessions[0].connection_id(), sessions[1].connection_id());
    }

    #[tokio::test]
    async fn a_user_at_the_per_user_limit_is_refused_until_a_connection_ends() {
        let mut broker = MockMessageBroker::new();
        broker.expect_subscribe().returning(|_| ());
        broker.expect_unsubscribe().returning(|_| ());
        broker.expect_until_active().returning(|_| ack_ok());
        broker.expect_history().returning(|_, _| Ok(crate::ports::HistoryRead::default()));
        let hub = Arc::new(Hub::with_user_limit(Arc::new(broker), 10, 2));
        let connect = ConnectClient::new(
            verifier(Ok(claims("ws:connect"))),
            hub.clone(),
            frames(),
            &Settings::default(),
        );
        let mut sessions = Vec::new();
        for _ in 0..2 {
            let admission = connect.authorize("test", Some("t")).await.expect("admitted");
            sessions.push(connect.connect(admission, RecordingSink::new()).await.expect("connected"));
        }
        let admission = connect.authorize("test", Some("t")).await.expect("admitted");
        let refused = connect.connect(admission, RecordingSink::new()).await;
        assert_eq!(refused.err(), Some(ConnectError::TooManyConnections(2)));
        assert_eq!(hub.admitted(), 2, "the refused attempt released its slot");
        drop(sessions.remove(0));
        let admission = connect.authorize("test", Some("t")).await.expect("admitted");
        assert!(connect.connect(admission, RecordingSink::new()).await.is_ok());
    }

    #[tokio::test]
    async fn the_connection_ends_when_its_token_expires_plus_the_leeway() {
        let mut with_exp = claims("ws:connect");
        with_exp.exp = Some(2_000_000_000);
        let mut broker = MockMessageBroker::new();
        broker.expect_subscribe().returning(|_| ());
        broker.expect_unsubscribe().returning(|_| ());
        broker.expect_until_active().returning(|_| ack_ok());
        broker.expect_history().returning(|_, _| Ok(crate::ports::HistoryRead::default()));
        let (connect, _) = use_case(verifier(Ok(with_exp)), broker, 10);
        let admission = connect.authorize("test", Some("t")).await.expect("admitted");
        let session = connect.connect(admission, RecordingSink::new()).await.expect("connected");
        assert_eq!(session.handle().expires_at(), Some(Timestamp::from_unix_millis(2_000_000_005_000)));
    }

    #[tokio::test]
    async fn a_connect_abandoned_while_waiting_for_the_broker_leaves_nothing_behind() {
        let mut broker = MockMessageBroker::new();
        broker.expect_subscribe().returning(|_| ());
        broker.expect_unsubscribe().times(1).returning(|_| ());
        broker.expect_until_active().returning(|_| Box::pin(std::future::pending()));
        let (connect, hub) = use_case(verifier(Ok(claims("ws:connect"))), broker, 10);
        let admission = connect.authorize("test", Some("t")).await.expect("admitted");
        let waiting = connect.connect(admission, RecordingSink::new());
        // The client goes away: the request future is dropped mid-wait.
        assert!(tokio::time::timeout(std::time::Duration::from_millis(20), waiting).await.is_err());
        assert_eq!(hub.len(), 0);
        assert_eq!(hub.admitted(), 0);
    }

    #[tokio::test]
    async fn a_failed_subscription_refuses_the_connection_and_leaves_nothing_behind() {
        let mut broker = MockMessageBroker::new();
        broker
            .expect_until_active()
            .returning(|_| Box::pin(async { Err(BrokerError::Unavailable("down".into())) }));
        broker.expect_subscribe().returning(|_| ());
        broker.expect_unsubscribe().times(1).returning(|_| ());
        let (connect, hub) = use_case(verifier(Ok(claims("ws:connect"))), broker, 10);
        let admission = connect.authorize("test", Some("t")).await.expect("admitted");
        let result = connect.connect(admission, RecordingSink::new()).await;
        assert_eq!(result.err(), Some(ConnectError::Broker(BrokerError::Unavailable("down".into()))));
        assert_eq!(hub.len(), 0);
        assert_eq!(hub.admitted(), 0);
    }
}
