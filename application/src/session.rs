//! The client session: the inbound port every transport drives.
//!
//! A transport adapter knows how to carry frames between a client and the service; everything
//! else about a client's connection happens here, whatever the transport: the origin rule,
//! authorization, admission, the opening turn, registration with its welcome and replay,
//! presence, client frames, and the end. A transport makes three calls and implements one
//! port ([`ClientSink`]):
//!
//! ```text
//!  transport adapter                         ClientSessions / ClientSession
//!  ─────────────────                         ──────────────────────────────
//!  request in ─────── sessions.open(request) ──▶ origin, token, scope, a slot
//!                     ◀── Err(ConnectError) ───  refused: the adapter answers (401, 403, 503…)
//!  its own checks (handshake headers…)
//!  a sink ready ───── opening.connect(sink) ───▶ an opening turn, registration; the welcome
//!                                                and the replay queued on the sink
//!  pipe up ────────── session.start() ─────────▶ the turn given back, presence to record
//!  client frame ───── session.handle(bytes) ───▶ FrameOutcome: nothing, a reply, or close
//!  heartbeat answer ─ session.seen()
//!  the end ────────── session.close() ─────────▶ unregistered, presence to record (on drop too)
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use domain::{ConnectionId, ConnectionInfo, Identity, OriginPolicy, PresenceScope, SCOPE_WS_CONNECT};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::ports::{ClientSink, PushError, TokenVerifier};
use crate::use_cases::connect_client::{Admission, ConnectClient, ConnectError, Resume, Session};
use crate::use_cases::disconnect_client::DisconnectClient;
use crate::use_cases::handle_client_frame::{FrameOutcome, HandleClientFrame};
use crate::use_cases::presence::TrackPresence;

/// What a transport received from a client that wants to open a session.
#[derive(Debug, Clone, Default)]
pub struct SessionRequest<'a> {
    /// The transport's name, as its adapter gives it: a label of the connection metrics.
    pub transport: &'static str,
    /// The connection token, wherever the transport found it.
    pub token: Option<&'a str>,
    /// The positions a reconnecting client resumes from.
    pub resume: Resume,
    /// The `Origin` of the web page that opens the session; none when not a browser page.
    pub origin: Option<&'a str>,
}

/// How sessions open: the parts every session shares.
struct Shared {
    connect: ConnectClient,
    frames: HandleClientFrame,
    disconnect: DisconnectClient,
    presence: Arc<TrackPresence>,
    tokens: Arc<dyn TokenVerifier>,
    origins: OriginPolicy,
    /// Openings in progress at once; the next ones wait for a turn.
    turns: Arc<Semaphore>,
    opening_timeout: Duration,
}

/// Opens client sessions: the entry point of every transport.
pub struct ClientSessions {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ClientSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSessions").field("origins", &self.shared.origins).finish_non_exhaustive()
    }
}

/// The limits on opening sessions.
#[derive(Debug, Clone)]
pub struct OpeningLimits {
    /// Which web pages may open a session.
    pub origins: OriginPolicy,
    /// Sessions that may be opening at once (reading their positions, subscribing, recording
    /// their presence); the next ones wait for a turn.
    pub concurrent: usize,
    /// How long an opening waits for its turn before it is refused with
    /// [`ConnectError::Overloaded`].
    pub timeout: Duration,
}

impl Default for OpeningLimits {
    fn default() -> Self {
        Self { origins: OriginPolicy::Any, concurrent: 128, timeout: Duration::from_secs(5) }
    }
}

/// The use-cases a session runs through.
pub(crate) struct SessionParts {
    pub(crate) connect: ConnectClient,
    pub(crate) frames: HandleClientFrame,
    pub(crate) disconnect: DisconnectClient,
    pub(crate) presence: Arc<TrackPresence>,
    pub(crate) tokens: Arc<dyn TokenVerifier>,
}

impl ClientSessions {
    pub(crate) fn new(parts: SessionParts, limits: OpeningLimits) -> Self {
        let SessionParts { connect, frames, disconnect, presence, tokens } = parts;
        Self {
            shared: Arc::new(Shared {
                connect,
                frames,
                disconnect,
                presence,
                tokens,
                origins: limits.origins,
                turns: Arc::new(Semaphore::new(limits.concurrent.max(1))),
                opening_timeout: limits.timeout,
            }),
        }
    }

    /// Checks the request's origin, its token and scope, and reserves a connection slot:
    /// every refusal a transport must answer before it commits to its client.
    ///
    /// # Errors
    /// [`ConnectError::OriginNotAllowed`], then as [`ConnectClient::authorize`].
    pub async fn open(&self, request: SessionRequest<'_>) -> Result<Opening, ConnectError> {
        if !self.shared.origins.allows(request.origin) {
            return Err(ConnectError::OriginNotAllowed);
        }
        let admission = self.shared.connect.authorize(request.transport, request.token).await?;
        Ok(Opening { admission: admission.resuming(request.resume), shared: self.shared.clone() })
    }
}

/// A client that may connect and holds a connection slot, until it is connected.
pub struct Opening {
    admission: Admission,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Opening {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opening").field("admission", &self.admission).finish_non_exhaustive()
    }
}

impl Opening {
    /// Who the client is.
    pub fn identity(&self) -> &Identity {
        self.admission.identity()
    }

    /// Waits for an opening turn, registers the connection and queues on `sink` its welcome
    /// and, for a resuming client, what it missed; live messages follow without gap or
    /// duplicate. The turn is held until [`ClientSession::start`].
    ///
    /// # Errors
    /// [`ConnectError::Overloaded`] when no turn came within the opening timeout, then as
    /// [`ConnectClient::connect`].
    pub async fn connect(self, sink: Arc<dyn ClientSink>) -> Result<ClientSession, ConnectError> {
        let Self { admission, shared } = self;
        let transport = admission.transport();
        // A burst of openings (a reconnection storm) goes a bounded number at a time, so that
        // the broker's answers to those it serves, and to everything else, stay prompt.
        let turn = tokio::time::timeout(shared.opening_timeout, shared.turns.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| shared.connect.refused(transport, ConnectError::Overloaded))?;
        let session = shared.connect.connect(admission, sink).await?;
        Ok(ClientSession {
            session,
            shared,
            turn: Mutex::new(Some(turn)),
            joined: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        })
    }
}

/// One client's live connection, whatever carries it.
pub struct ClientSession {
    session: Session,
    shared: Arc<Shared>,
    /// The opening turn, given back by [`ClientSession::start`] (or the end).
    turn: Mutex<Option<OwnedSemaphorePermit>>,
    /// Presence was recorded for this session: its end must be recorded too.
    joined: AtomicBool,
    closed: AtomicBool,
}

impl std::fmt::Debug for ClientSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSession").field("info", self.info()).finish_non_exhaustive()
    }
}

impl ClientSession {
    pub fn info(&self) -> &ConnectionInfo {
        self.session.info()
    }

    pub fn connection_id(&self) -> &ConnectionId {
        self.session.connection_id()
    }

    /// The transport's pipe to the client is up: gives the opening turn back and has the
    /// user's presence recorded (by the presence settler, so the connection does not wait for
    /// the store). Call it once; a session never started is never announced.
    pub fn start(&self) {
        self.turn.lock().unwrap_or_else(PoisonError::into_inner).take();
        if !self.joined.swap(true, Ordering::AcqRel) {
            let info = self.info();
            self.shared.presence.changed_later(&PresenceScope::tenant(info.tenant_id.clone()), &info.user_id);
        }
    }

    /// Handles one client data frame (the bytes of one JSON object); see
    /// [`HandleClientFrame::handle`] for the answers.
    pub async fn handle(&self, frame: &[u8]) -> FrameOutcome {
        self.shared.frames.handle(&self.session, frame).await
    }

    /// Records a sign of life that is not a data frame (a heartbeat answer).
    pub fn seen(&self) {
        self.shared.frames.seen(&self.session);
    }

    /// Queues `frame` (a reply) behind what is already queued for the client; a client whose
    /// queue is full is closed as a slow consumer.
    ///
    /// # Errors
    /// [`PushError`] when the frame was not queued.
    pub fn send(&self, frame: Bytes) -> Result<(), PushError> {
        self.session.handle().send(frame)
    }

    /// Checks that `token` speaks for this session's client (for a transport whose client
    /// sends its frames in separate requests): valid, with the `ws:connect` scope, for the
    /// session's user and tenant.
    ///
    /// # Errors
    /// [`ConnectError::MissingToken`], [`ConnectError::InvalidToken`],
    /// [`ConnectError::InvalidClaims`], [`ConnectError::Forbidden`] or
    /// [`ConnectError::NotThisSession`].
    pub async fn authenticate(&self, token: Option<&str>) -> Result<(), ConnectError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(ConnectError::MissingToken)?;
        let claims = self.shared.tokens.verify(token).await.map_err(ConnectError::InvalidToken)?;
        let identity = Identity::from_claims(claims).map_err(ConnectError::InvalidClaims)?;
        if !identity.has_scope(SCOPE_WS_CONNECT) {
            return Err(ConnectError::Forbidden);
        }
        let info = self.info();
        if identity.user_id() != &info.user_id || identity.tenant_id() != &info.tenant_id {
            return Err(ConnectError::NotThisSession);
        }
        Ok(())
    }

    /// Ends the session: unregisters the connection and has the user's presence (in its tenant
    /// and in the topics it was present in) recorded by the presence settler. Only the first
    /// call does anything; dropping the session does the same.
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let scopes = self.session.presence_scopes();
        self.shared.disconnect.disconnect(&self.session);
        self.turn.lock().unwrap_or_else(PoisonError::into_inner).take();
        if self.joined.load(Ordering::Acquire) {
            for scope in scopes {
                self.shared.presence.changed_later(&scope, &self.session.info().user_id);
            }
        }
    }
}

impl Drop for ClientSession {
    /// A session dropped without [`ClientSession::close`] (its task was cancelled) ends all
    /// the same.
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Settings;
    use crate::hub::Hub;
    use crate::ports::{
        HistoryRead, MessageBroker, MockMessageBroker, MockPresence, MockTokenVerifier, PresenceChange,
    };
    use crate::use_cases::test_support::*;
    use domain::Claims;

    fn broker() -> Arc<dyn MessageBroker> {
        let mut broker = MockMessageBroker::new();
        broker.expect_subscribe().returning(|_| ());
        broker.expect_unsubscribe().returning(|_| ());
        broker.expect_until_active().returning(|_| ack_ok());
        broker.expect_history().returning(|_, _| Ok(HistoryRead::default()));
        broker.expect_publish().returning(|_, _| Ok(None));
        Arc::new(broker)
    }

    /// Tokens are `user@tenant`; `nobody` is refused.
    fn tokens() -> Arc<dyn TokenVerifier> {
        let mut tokens = MockTokenVerifier::new();
        tokens.expect_verify().returning(|token| {
            let (user, tenant) = token.split_once('@').ok_or(crate::ports::TokenError::Malformed)?;
            Ok(Claims {
                user_id: Some(user.into()),
                tenant_id: Some(tenant.into()),
                scope: Some("ws:connect".into()),
                ..Claims::default()
            })
        });
        Arc::new(tokens)
    }

    /// Sessions over a hub of 10 connections, with `presence` as the store.
    fn sessions(
        limits: OpeningLimits,
        presence: Option<MockPresence>,
    ) -> (ClientSessions, Arc<TrackPresence>) {
        let broker = broker();
        let hub = Arc::new(Hub::new(broker.clone(), 10));
        let store = presence.map(|p| Arc::new(p) as Arc<dyn crate::ports::Presence>);
        let presence = Arc::new(TrackPresence::new(store, hub.clone(), broker.clone(), frames()));
        let settings = Settings::default();
        let parts = SessionParts {
            connect: ConnectClient::new(tokens(), hub, frames(), &settings),
            frames: HandleClientFrame::new(broker, tokens(), frames(), &settings),
            disconnect: DisconnectClient::new(),
            presence: presence.clone(),
            tokens: tokens(),
        };
        (ClientSessions::new(parts, limits), presence)
    }

    fn request(token: &str) -> SessionRequest<'_> {
        SessionRequest { transport: "test", token: Some(token), ..SessionRequest::default() }
    }

    #[tokio::test]
    async fn a_page_of_an_origin_not_allowed_is_refused_and_one_allowed_opens() {
        let limits = OpeningLimits {
            origins: OriginPolicy::Only(["https://app.example".to_owned()].into()),
            ..OpeningLimits::default()
        };
        let (sessions, _) = sessions(limits, None);
        let foreign = SessionRequest { origin: Some("https://evil.example"), ..request("bob@acme") };
        assert_eq!(sessions.open(foreign).await.err(), Some(ConnectError::OriginNotAllowed));
        let own = SessionRequest { origin: Some("https://app.example"), ..request("bob@acme") };
        let session = sessions.open(own).await.expect("allowed").connect(RecordingSink::new()).await;
        assert_eq!(session.expect("connected").info().user_id.as_str(), "bob");
        assert!(sessions.open(request("bob@acme")).await.is_ok(), "no Origin: not a browser page");
    }

    #[tokio::test(start_paused = true)]
    async fn an_opening_waits_for_its_turn_and_is_refused_as_overloaded_after_the_timeout() {
        let limits =
            OpeningLimits { concurrent: 1, timeout: Duration::from_secs(5), ..OpeningLimits::default() };
        let (sessions, _) = sessions(limits, None);
        let first =
            sessions.open(request("bob@acme")).await.expect("opens").connect(RecordingSink::new()).await;
        let first = first.expect("connected");
        let second = sessions.open(request("eve@acme")).await.expect("opens");
        // The first holds the only turn until it starts: the second waits, then is refused.
        let refused = second.connect(RecordingSink::new()).await;
        assert_eq!(refused.err(), Some(ConnectError::Overloaded));
        first.start();
        let third =
            sessions.open(request("eve@acme")).await.expect("opens").connect(RecordingSink::new()).await;
        assert!(third.is_ok(), "the turn was given back");
    }

    #[tokio::test]
    async fn presence_is_recorded_when_a_session_starts_and_ends_and_a_dropped_one_is_settled_later() {
        let counts = Arc::new(Mutex::new(Vec::new()));
        let mut store = MockPresence::new();
        let seen = counts.clone();
        store.expect_set().returning(move |_, user, n| {
            seen.lock().expect("lock").push((user.to_string(), n));
            Ok(PresenceChange::Unchanged)
        });
        let (sessions, presence) = sessions(OpeningLimits::default(), Some(store));
        let sessions = &sessions;
        let open = |token: &'static str| async move {
            sessions
                .open(request(token))
                .await
                .expect("opens")
                .connect(RecordingSink::new())
                .await
                .expect("ok")
        };
        let bob = open("bob@acme").await;
        bob.start();
        presence.settle().await;
        bob.close();
        bob.close();
        presence.settle().await;
        drop(bob);
        let never_started = open("eve@acme").await;
        never_started.close();
        let dropped = open("ann@acme").await;
        dropped.start();
        presence.settle().await;
        drop(dropped);
        assert_eq!(*counts.lock().expect("lock"), [("bob".into(), 1), ("bob".into(), 0), ("ann".into(), 1)]);
        presence.settle().await;
        presence.settle().await;
        let recorded = counts.lock().expect("lock").clone();
        assert_eq!(recorded.last(), Some(&("ann".to_owned(), 0)), "the dropped session's end, once");
        assert_eq!(recorded.len(), 4);
    }

    #[tokio::test]
    async fn only_a_valid_token_of_the_sessions_user_and_tenant_speaks_for_it() {
        let (sessions, _) = sessions(OpeningLimits::default(), None);
        let session = sessions
            .open(request("bob@acme"))
            .await
            .expect("opens")
            .connect(RecordingSink::new())
            .await
            .expect("ok");
        assert_eq!(session.authenticate(Some("bob@acme")).await, Ok(()));
        assert_eq!(session.authenticate(None).await, Err(ConnectError::MissingToken));
        assert!(matches!(session.authenticate(Some("garbage")).await, Err(ConnectError::InvalidToken(_))));
        assert_eq!(session.authenticate(Some("eve@acme")).await, Err(ConnectError::NotThisSession));
        assert_eq!(session.authenticate(Some("bob@globex")).await, Err(ConnectError::NotThisSession));
    }
}
