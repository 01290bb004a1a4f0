//! Test doubles shared by the use-case tests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use domain::{Channel, Claims, CloseReason, ConnectionId, MessageId, Timestamp};

use crate::frames::FrameFactory;
use crate::hub::Hub;
use crate::ports::{ClientSink, MockClock, MockIdGenerator, MockTokenVerifier, PushError, SubscribeAck};
use crate::use_cases::connect_client::{ConnectClient, Session};

/// The instant every test clock reports by default: 2025-01-01T00:00:00.000Z.
pub(crate) const NOW: u64 = 1_735_689_600_000;

/// A clock a test moves by hand.
#[derive(Debug)]
pub(crate) struct SettableClock(AtomicU64);

impl SettableClock {
    pub(crate) fn at(millis: u64) -> Arc<Self> {
        Arc::new(Self(AtomicU64::new(millis)))
    }

    pub(crate) fn advance(&self, millis: u64) {
        self.0.fetch_add(millis, Ordering::Relaxed);
    }
}

impl crate::ports::Clock for SettableClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_unix_millis(self.0.load(Ordering::Relaxed))
    }
}

pub(crate) fn clock_at(millis: u64) -> MockClock {
    let mut clock = MockClock::new();
    clock.expect_now().returning(move || Timestamp::from_unix_millis(millis));
    clock
}

/// Connection ids are unique across every generator of the test process, as they are across
/// instances; message ids count from `m1` per generator.
pub(crate) fn sequential_ids() -> MockIdGenerator {
    static CONNECTIONS: AtomicU64 = AtomicU64::new(1);
    let next = Arc::new(AtomicU64::new(1));
    let mut ids = MockIdGenerator::new();
    ids.expect_connection_id().returning(|| {
        ConnectionId::parse(&format!("c{}", CONNECTIONS.fetch_add(1, Ordering::Relaxed))).expect("valid")
    });
    ids.expect_message_id().returning(move || {
        MessageId::parse(&format!("m{}", next.fetch_add(1, Ordering::Relaxed))).expect("valid")
    });
    ids
}

pub(crate) fn frames() -> FrameFactory {
    FrameFactory::new(Arc::new(clock_at(NOW)), Arc::new(sequential_ids()))
}

pub(crate) fn ack_ok() -> SubscribeAck {
    Box::pin(async { Ok(()) })
}

pub(crate) fn names(channels: &[Channel]) -> Vec<String> {
    channels.iter().map(Channel::name).collect()
}

/// A client sink that records what it is given, with an optional capacity.
#[derive(Debug, Default)]
pub(crate) struct RecordingSink {
    frames: Mutex<Vec<Bytes>>,
    closed: Mutex<Option<CloseReason>>,
    capacity: Option<usize>,
    pings: AtomicU64,
}

impl RecordingSink {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub(crate) fn with_capacity(capacity: usize) -> Arc<Self> {
        Arc::new(Self { capacity: Some(capacity), ..Self::default() })
    }

    pub(crate) fn frames(&self) -> Vec<serde_json::Value> {
        let frames = self.frames.lock().expect("lock");
        frames.iter().map(|f| serde_json::from_slice(f).expect("frames are JSON")).collect()
    }

    pub(crate) fn raw_frames(&self) -> Vec<Bytes> {
        self.frames.lock().expect("lock").clone()
    }

    pub(crate) fn pings(&self) -> u64 {
        self.pings.load(Ordering::Relaxed)
    }

    pub(crate) fn closed(&self) -> Option<CloseReason> {
        *self.closed.lock().expect("lock")
    }
}

impl ClientSink for RecordingSink {
    fn push(&self, frame: Bytes) -> Result<(), PushError> {
        if self.closed().is_some() {
            return Err(PushError::Closed);
        }
        let mut frames = self.frames.lock().expect("lock");
        if self.capacity.is_some_and(|c| frames.len() >= c) {
            return Err(PushError::Full);
        }
        frames.push(frame);
        Ok(())
    }

    fn close(&self, reason: CloseReason) {
        self.closed.lock().expect("lock").get_or_insert(reason);
    }

    fn ping(&self) {
        self.pings.fetch_add(1, Ordering::Relaxed);
    }
}

/// Connects `user` of `tenant` to `hub` through the real connect use-case.
pub(crate) async fn session_with_sink(
    hub: &Arc<Hub>,
    user: &str,
    tenant: &str,
    sink: Arc<RecordingSink>,
) -> Session {
    session_with_claims(hub, connect_claims(user, tenant), sink).await
}

/// The claims of a connection token of `user` of `tenant`.
pub(crate) fn connect_claims(user: &str, tenant: &str) -> Claims {
    Claims {
        user_id: Some(user.into()),
        tenant_id: Some(tenant.into()),
        scope: Some("ws:connect".into()),
        ..Claims::default()
    }
}

/// Connects the holder of a token with `claims` to `hub` through the real connect use-case.
pub(crate) async fn session_with_claims(hub: &Arc<Hub>, claims: Claims, sink: Arc<RecordingSink>) -> Session {
    let mut tokens = MockTokenVerifier::new();
    tokens.expect_verify().returning(move |_| Ok(claims.clone()));
    let connect = ConnectClient::new(Arc::new(tokens), hub.clone(), frames(), &crate::Settings::default());
    let admission = connect.authorize("test", Some("token")).await.expect("admitted");
    connect.connect(admission, sink).await.expect("connected")
}

pub(crate) async fn session(hub: &Arc<Hub>, user: &str, tenant: &str) -> Session {
    session_with_sink(hub, user, tenant, RecordingSink::new()).await
}
