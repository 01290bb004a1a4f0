//! The frames the server sends, each serialized once into shared bytes.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use domain::envelope::{Envelope, kind, null_payload, raw_payload};
use domain::{Channel, ConnectionInfo, ErrorCode, MessageId, StreamPosition, UnsubscribeReason, UserId};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::ports::{Clock, IdGenerator};

/// Stamps envelopes with the time and a fresh id, and serializes them.
#[derive(Clone)]
pub struct FrameFactory {
    clock: Arc<dyn Clock>,
    ids: Arc<dyn IdGenerator>,
}

impl std::fmt::Debug for FrameFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameFactory").finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Welcome<'a> {
    connection_id: &'a str,
    user_id: &'a str,
    tenant_id: &'a str,
    /// The latest position of each of the connection's channels that keeps a history.
    positions: BTreeMap<String, &'a StreamPosition>,
    /// Only for a client that asked to resume: whether it was sent everything it missed.
    #[serde(skip_serializing_if = "Option::is_none")]
    recovered: Option<bool>,
}

#[derive(Serialize)]
struct ErrorPayload<'a> {
    code: &'a str,
    message: &'a str,
    /// The topic a refused `subscribe`, `unsubscribe`, `message` or `presence` frame named.
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a Channel>,
}

#[derive(Serialize)]
struct Subscribed<'a> {
    /// Where the topic stands: live messages follow this position.
    #[serde(skip_serializing_if = "Option::is_none")]
    position: Option<&'a StreamPosition>,
    /// Only for a `since` subscription: whether what was missed follows.
    #[serde(skip_serializing_if = "Option::is_none")]
    recovered: Option<bool>,
}

#[derive(Serialize)]
struct Unsubscribed {
    reason: &'static str,
    /// Subscribe again with `since` to recover what was missed.
    resubscribe: bool,
}

impl FrameFactory {
    pub fn new(clock: Arc<dyn Clock>, ids: Arc<dyn IdGenerator>) -> Self {
        Self { clock, ids }
    }

    /// A new envelope stamped now with a fresh message id.
    pub fn envelope(
        &self,
        kind: &'static str,
        payload: Box<RawValue>,
        from_user: Option<UserId>,
        channel: Option<Channel>,
    ) -> Envelope {
        Envelope {
            kind: kind.into(),
            payload,
            timestamp: self.clock.now(),
            from_user,
            message_id: self.ids.message_id(),
            channel,
        }
    }

    /// The first frame of a connection: who it is, where its channels stand and, for a
    /// resuming client, whether what it missed follows.
    pub fn welcome(
        &self,
        info: &ConnectionInfo,
        positions: &[(Channel, StreamPosition)],
        recovered: Option<bool>,
    ) -> Bytes {
        let payload = raw_payload(&Welcome {
            connection_id: info.id.as_str(),
            user_id: info.user_id.as_str(),
            tenant_id: info.tenant_id.as_str(),
            positions: positions.iter().map(|(channel, position)| (channel.name(), position)).collect(),
            recovered,
        });
        encode(&self.envelope(kind::WELCOME, payload, None, None))
    }

    /// The answer to a client `ping`.
    pub fn pong(&self) -> Bytes {
        encode(&self.envelope(kind::PONG, null_payload(), None, None))
    }

    /// An `error` frame with a stable code and a human-readable message.
    pub fn error(&self, code: ErrorCode, message: &str) -> Bytes {
        self.error_on(code, message, None)
    }

    /// An `error` frame about what a client asked of `channel`.
    pub fn error_on(&self, code: ErrorCode, message: &str, channel: Option<&Channel>) -> Bytes {
        let payload = raw_payload(&ErrorPayload { code: code.as_str(), message, channel });
        encode(&self.envelope(kind::ERROR, payload, None, None))
    }

    /// The answer to a `subscribe`: where `channel` stands and, for a `since` subscription,
    /// whether what was missed follows.
    pub fn subscribed(
        &self,
        channel: &Channel,
        position: Option<&StreamPosition>,
        recovered: Option<bool>,
    ) -> Bytes {
        let payload = raw_payload(&Subscribed { position, recovered });
        encode(&self.envelope(kind::SUBSCRIBED, payload, None, Some(channel.clone())))
    }

    /// The end of a subscription to `channel`, and why.
    pub fn unsubscribed(&self, channel: &Channel, reason: UnsubscribeReason) -> Bytes {
        let payload =
            raw_payload(&Unsubscribed { reason: reason.as_str(), resubscribe: reason.resubscribe() });
        encode(&self.envelope(kind::UNSUBSCRIBED, payload, None, Some(channel.clone())))
    }

    /// A fresh message id.
    pub fn message_id(&self) -> MessageId {
        self.ids.message_id()
    }

    /// A fresh connection id.
    pub fn connection_id(&self) -> domain::ConnectionId {
        self.ids.connection_id()
    }

    /// The current time.
    pub fn now(&self) -> domain::Timestamp {
        self.clock.now()
    }
}

/// The envelope as the bytes of a text frame.
pub fn encode(envelope: &Envelope) -> Bytes {
    Bytes::from(envelope.to_json())
}
