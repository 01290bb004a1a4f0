//! The client side of the protocol, whatever the transport: what a client may send, the error
//! codes it may receive, and why the server closes a connection.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::id::{IdError, TopicName, UserId};
use crate::position::{PositionError, StreamPosition};

/// A valid client→server frame.
#[derive(Debug, Clone)]
pub enum ClientCommand<'a> {
    /// `{"type":"message","payload":…}`: publish to the sender's tenant; with
    /// `"channel":"<topic>"`, to that topic of the sender's tenant.
    Message { channel: Option<TopicName>, payload: &'a RawValue },
    /// `{"type":"ping"}`: answered with a `pong` frame.
    Ping,
    /// `{"type":"refresh","token":"<JWT>"}`: extend the connection's lifetime.
    Refresh { token: Cow<'a, str> },
    /// `{"type":"direct","to_user":"<user id>","payload":…}`: deliver to every connection of
    /// that user in the sender's tenant.
    Direct { to_user: UserId, payload: &'a RawValue },
    /// `{"type":"presence"}`: answered with the tenant's users online; with
    /// `"channel":"<topic>"`, with the topic's members.
    Presence { channel: Option<TopicName> },
    /// `{"type":"subscribe","channel":"<topic>","since":"<epoch>:<offset>"?,"token":"<JWT>"?,
    /// "presence":true?}`: receive the topic's messages from now on (and what was missed since
    /// `since`); with `presence`, be one of its members and receive its joins and leaves.
    Subscribe {
        channel: TopicName,
        since: Option<StreamPosition>,
        token: Option<Cow<'a, str>>,
        presence: bool,
    },
    /// `{"type":"unsubscribe","channel":"<topic>"}`: nothing more from the topic.
    Unsubscribe { channel: TopicName },
    /// `{"type":"history","channel":"<topic>","since":"<epoch>:<offset>"?,
    /// "before":"<epoch>:<offset>"?,"limit":n?}`: a page of the topic's kept history.
    History {
        channel: TopicName,
        since: Option<StreamPosition>,
        before: Option<StreamPosition>,
        limit: Option<u64>,
    },
}

/// Why a client frame was refused. Answered with an `error` frame; the connection stays open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame is not valid JSON: {0}")]
    NotJson(String),
    #[error("frame must be a JSON object")]
    NotAnObject,
    #[error("frame has no string \"type\" field")]
    MissingType,
    #[error(
        "unknown frame type {0:?}; expected \"message\", \"direct\", \"subscribe\", \"unsubscribe\", \"history\", \"presence\", \"ping\" or \"refresh\""
    )]
    UnknownType(String),
    #[error(
        "a \"subscribe\", \"unsubscribe\" or \"history\" frame needs a string \"channel\": the topic's name"
    )]
    MissingChannel,
    #[error("invalid \"channel\": name a topic by its name alone ({0})")]
    InvalidChannel(IdError),
    #[error("invalid \"since\": {0}")]
    InvalidSince(PositionError),
    #[error("\"presence\" is true or false")]
    InvalidPresenceFlag,
    #[error("invalid \"before\": {0}")]
    InvalidBefore(PositionError),
    #[error("\"limit\" is a whole number")]
    InvalidLimit,
    #[error("a \"refresh\" frame needs a non-empty string \"token\"")]
    MissingToken,
    #[error("a \"message\" or \"direct\" frame needs a \"payload\"")]
    MissingPayload,
    #[error("a \"direct\" frame needs a string \"to_user\"")]
    MissingRecipient,
    #[error("invalid \"to_user\": {0}")]
    InvalidRecipient(IdError),
    #[error("frame is not UTF-8 text; send a JSON client frame")]
    NotText,
}

#[derive(Deserialize)]
struct RawFrame<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    /// `Some` whenever the field is present, `null` included.
    #[serde(borrow, default, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
    #[serde(borrow, default)]
    token: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    to_user: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    since: Option<Cow<'a, str>>,
    #[serde(default)]
    presence: Option<bool>,
    #[serde(borrow, default)]
    before: Option<Cow<'a, str>>,
    #[serde(default)]
    limit: Option<u64>,
}

/// The error for a JSON object whose known fields do not all have their type: the first field
/// found of the wrong type decides.
fn mistyped_field(text: &str) -> ProtocolError {
    let Ok(fields) = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text) else {
        return ProtocolError::MissingType;
    };
    let wrong = |name: &str, ok: fn(&serde_json::Value) -> bool| fields.get(name).is_some_and(|v| !ok(v));
    if wrong("type", serde_json::Value::is_string) {
        ProtocolError::MissingType
    } else if wrong("token", serde_json::Value::is_string) {
        ProtocolError::MissingToken
    } else if wrong("to_user", serde_json::Value::is_string) {
        ProtocolError::MissingRecipient
    } else if wrong("channel", serde_json::Value::is_string) {
        ProtocolError::MissingChannel
    } else if wrong("since", serde_json::Value::is_string) {
        ProtocolError::InvalidSince(PositionError::Malformed)
    } else if wrong("presence", serde_json::Value::is_boolean) {
        ProtocolError::InvalidPresenceFlag
    } else if wrong("before", serde_json::Value::is_string) {
        ProtocolError::InvalidBefore(PositionError::Malformed)
    } else if wrong("limit", serde_json::Value::is_u64) {
        ProtocolError::InvalidLimit
    } else {
        ProtocolError::MissingType
    }
}

fn topic(name: Option<Cow<'_, str>>) -> Result<Option<TopicName>, ProtocolError> {
    name.map(|name| TopicName::parse(&name).map_err(ProtocolError::InvalidChannel)).transpose()
}

fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(deserializer).map(Some)
}

impl<'a> ClientCommand<'a> {
    /// Parses a client data frame, whatever the transport carried it in: it must be a UTF-8
    /// JSON object.
    ///
    /// # Errors
    /// [`ProtocolError::NotText`] when the bytes are not UTF-8, otherwise as [`Self::parse`].
    pub fn parse_bytes(frame: &'a [u8]) -> Result<Self, ProtocolError> {
        std::str::from_utf8(frame).map_err(|_| ProtocolError::NotText).and_then(Self::parse)
    }

    /// Parses a client text frame.
    ///
    /// # Errors
    /// [`ProtocolError`] describing what is wrong with the frame.
    pub fn parse(text: &'a str) -> Result<Self, ProtocolError> {
        if !text.trim_start().starts_with('{') {
            return Err(match serde_json::from_str::<&RawValue>(text) {
                Ok(_) => ProtocolError::NotAnObject,
                Err(e) => ProtocolError::NotJson(e.to_string()),
            });
        }
        let frame: RawFrame<'a> = serde_json::from_str(text).map_err(|e| {
            if e.is_data() { mistyped_field(text) } else { ProtocolError::NotJson(e.to_string()) }
        })?;
        match frame.kind.as_deref() {
            Some("message") => match frame.payload {
                Some(payload) if crate::envelope::has_lone_surrogate(payload.get()) => {
                    Err(ProtocolError::NotJson("lone UTF-16 surrogate escape in payload".to_owned()))
                }
                Some(payload) => Ok(Self::Message { channel: topic(frame.channel)?, payload }),
                None => Err(ProtocolError::MissingPayload),
            },
            Some("subscribe") => {
                let channel = topic(frame.channel)?.ok_or(ProtocolError::MissingChannel)?;
                let since = frame
                    .since
                    .map(|since| StreamPosition::parse(&since).map_err(ProtocolError::InvalidSince))
                    .transpose()?;
                let token = frame.token.filter(|token| !token.is_empty());
                Ok(Self::Subscribe { channel, since, token, presence: frame.presence.unwrap_or(false) })
            }
            Some("history") => {
                let channel = topic(frame.channel)?.ok_or(ProtocolError::MissingChannel)?;
                let position = |raw: Option<Cow<'_, str>>, error: fn(PositionError) -> ProtocolError| {
                    raw.map(|raw| StreamPosition::parse(&raw).map_err(error)).transpose()
                };
                let since = position(frame.since, ProtocolError::InvalidSince)?;
                let before = position(frame.before, ProtocolError::InvalidBefore)?;
                Ok(Self::History { channel, since, before, limit: frame.limit })
            }
            Some("unsubscribe") => {
                Ok(Self::Unsubscribe { channel: topic(frame.channel)?.ok_or(ProtocolError::MissingChannel)? })
            }
            Some("direct") => {
                let to_user = frame.to_user.ok_or(ProtocolError::MissingRecipient)?;
                let to_user = UserId::parse(&to_user).map_err(ProtocolError::InvalidRecipient)?;
                match frame.payload {
                    Some(payload) if crate::envelope::has_lone_surrogate(payload.get()) => {
                        Err(ProtocolError::NotJson("lone UTF-16 surrogate escape in payload".to_owned()))
                    }
                    Some(payload) => Ok(Self::Direct { to_user, payload }),
                    None => Err(ProtocolError::MissingPayload),
                }
            }
            Some("ping") => Ok(Self::Ping),
            Some("presence") => Ok(Self::Presence { channel: topic(frame.channel)? }),
            Some("refresh") => match frame.token {
                Some(token) if !token.is_empty() => Ok(Self::Refresh { token }),
                _ => Err(ProtocolError::MissingToken),
            },
            Some(other) => Err(ProtocolError::UnknownType(other.chars().take(64).collect())),
            None => Err(ProtocolError::MissingType),
        }
    }
}

impl ProtocolError {
    /// The `code` of the `error` frame that answers this frame.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::MissingChannel | Self::InvalidChannel(_) => ErrorCode::InvalidChannel,
            _ => ErrorCode::BadRequest,
        }
    }
}

/// The stable `code` of an `error` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The frame is malformed.
    BadRequest,
    /// The deployment does not offer what the frame asks for (presence turned off).
    Unsupported,
    /// The broker is unreachable; retry later.
    Unavailable,
    /// Over the connection's message rate; the frame was dropped.
    RateLimited,
    /// A `refresh` token failed verification.
    Unauthorized,
    /// A `refresh` token names another user or tenant, or lacks the `ws:connect` scope; or
    /// the connection may not do that on that topic.
    Forbidden,
    /// A `channel` that is not a topic name.
    InvalidChannel,
    /// Over a limit of the connection (`MAX_SUBSCRIPTIONS_PER_CONNECTION`).
    Limit,
    /// A `subscribe` to a topic the connection already is subscribed to.
    AlreadySubscribed,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Unsupported => "unsupported",
            Self::Unavailable => "unavailable",
            Self::RateLimited => "rate_limited",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::InvalidChannel => "invalid_channel",
            Self::Limit => "limit",
            Self::AlreadySubscribed => "already_subscribed",
        }
    }
}

/// Why the server closes a connection, with its close code (the code of the WebSocket close
/// frame; transports without close frames carry the same code in their own close event).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// 1001: the instance is shutting down; reconnect (to another instance).
    GoingAway,
    /// 1001: nothing at all (not even a pong) from the client for the idle timeout; the peer
    /// is presumed gone. A client that is still there reconnects.
    IdleTimeout,
    /// 1008: the client kept sending past its rate limit.
    PolicyViolation,
    /// 1009: a client message over the size limit.
    MessageTooBig,
    /// 1011: the server failed; reconnect with backoff.
    InternalError,
    /// 4001: the token expired and was not refreshed; reconnect with a fresh token.
    TokenExpired,
    /// 4003: closed on purpose (no message for the inactivity timeout); do not reconnect
    /// automatically.
    Inactive,
    /// 4003: closed on purpose by a backend (`POST /api/disconnect`, the dashboard); do not
    /// reconnect automatically.
    Disconnected,
    /// 4008: the client reads too slowly and its outbound queue overflowed.
    SlowConsumer,
    /// 4009: the instance missed messages of one of the client's channels (its link to the
    /// broker was interrupted); reconnect with `since=` to recover them.
    MissedMessages,
}

impl CloseReason {
    pub fn code(self) -> u16 {
        match self {
            Self::GoingAway | Self::IdleTimeout => 1001,
            Self::PolicyViolation => 1008,
            Self::MessageTooBig => 1009,
            Self::InternalError => 1011,
            Self::TokenExpired => 4001,
            Self::Inactive | Self::Disconnected => 4003,
            Self::SlowConsumer => 4008,
            Self::MissedMessages => 4009,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Self::GoingAway => "server shutting down",
            Self::IdleTimeout => "idle timeout",
            Self::PolicyViolation => "rate limit exceeded",
            Self::MessageTooBig => "message too big",
            Self::InternalError => "internal error",
            Self::TokenExpired => "token expired",
            Self::Inactive => "inactive",
            Self::Disconnected => "disconnected by the server",
            Self::SlowConsumer => "slow consumer",
            Self::MissedMessages => "missed messages; reconnect with since to recover",
        }
    }
}

/// Why a subscription ended, as its `unsubscribed` frame says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnsubscribeReason {
    /// The client asked for it.
    Requested,
    /// A backend ended it through the server API.
    Server,
    /// The connection's refreshed token no longer allows it.
    Revoked,
    /// The instance missed messages of the topic: subscribe again with `since` to recover them.
    MissedMessages,
}

impl UnsubscribeReason {
    /// The `reason` of the `unsubscribed` frame.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Server => "server",
            Self::Revoked => "revoked",
            Self::MissedMessages => "missed_messages",
        }
    }

    /// Whether the client should subscribe again (with `since`, to recover what it missed).
    pub fn resubscribe(self) -> bool {
        matches!(self, Self::MissedMessages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribe_and_unsubscribe_frames_name_a_topic() {
        let frame =
            r#"{"type":"subscribe","channel":"chat.room-1","since":"e1:4","token":"a.b.c","presence":true}"#;
        match ClientCommand::parse(frame) {
            Ok(ClientCommand::Subscribe { channel, since, token, presence }) => {
                assert_eq!(channel.as_str(), "chat.room-1");
                assert_eq!(since, Some(StreamPosition::new("e1", 4)));
                assert_eq!(token.as_deref(), Some("a.b.c"));
                assert!(presence);
            }
            other => panic!("unexpected {other:?}"),
        }
        match ClientCommand::parse(r#"{"type":"subscribe","channel":"orders"}"#) {
            Ok(ClientCommand::Subscribe { since: None, token: None, presence: false, .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            ClientCommand::parse(r#"{"type":"unsubscribe","channel":"orders"}"#),
            Ok(ClientCommand::Unsubscribe { channel }) if channel.as_str() == "orders"
        ));
        match ClientCommand::parse(r#"{"type":"message","channel":"orders","payload":1}"#) {
            Ok(ClientCommand::Message { channel: Some(channel), .. }) => {
                assert_eq!(channel.as_str(), "orders")
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            ClientCommand::parse(r#"{"type":"presence","channel":"orders"}"#),
            Ok(ClientCommand::Presence { channel: Some(_) })
        ));
    }

    #[test]
    fn history_frames_name_a_topic_and_optional_positions_and_limit() {
        match ClientCommand::parse(r#"{"type":"history","channel":"orders","before":"e:9","limit":20}"#) {
            Ok(ClientCommand::History { channel, since: None, before, limit }) => {
                assert_eq!(
                    (channel.as_str(), before, limit),
                    ("orders", Some(StreamPosition::new("e", 9)), Some(20))
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        for (bad, expected) in [
            (r#"{"type":"history"}"#, ErrorCode::InvalidChannel),
            (r#"{"type":"history","channel":"orders","limit":-1}"#, ErrorCode::BadRequest),
            (r#"{"type":"history","channel":"orders","before":"x"}"#, ErrorCode::BadRequest),
        ] {
            assert_eq!(ClientCommand::parse(bad).expect_err(bad).code(), expected, "{bad}");
        }
    }

    #[test]
    fn a_bad_topic_is_an_invalid_channel_and_a_bad_since_a_bad_request() {
        type Check = fn(&ProtocolError) -> bool;
        let cases: [(&str, Check, ErrorCode); 7] = [
            (
                r#"{"type":"subscribe"}"#,
                |e| matches!(e, ProtocolError::MissingChannel),
                ErrorCode::InvalidChannel,
            ),
            (
                r#"{"type":"subscribe","channel":7}"#,
                |e| matches!(e, ProtocolError::MissingChannel),
                ErrorCode::InvalidChannel,
            ),
            (
                r#"{"type":"subscribe","channel":"topic:acme:orders"}"#,
                |e| matches!(e, ProtocolError::InvalidChannel(_)),
                ErrorCode::InvalidChannel,
            ),
            (
                r#"{"type":"message","channel":"a b","payload":1}"#,
                |e| matches!(e, ProtocolError::InvalidChannel(_)),
                ErrorCode::InvalidChannel,
            ),
            (
                r#"{"type":"subscribe","channel":"a","since":"nope"}"#,
                |e| matches!(e, ProtocolError::InvalidSince(_)),
                ErrorCode::BadRequest,
            ),
            (
                r#"{"type":"subscribe","channel":"a","presence":"yes"}"#,
                |e| matches!(e, ProtocolError::InvalidPresenceFlag),
                ErrorCode::BadRequest,
            ),
            (
                r#"{"type":"unsubscribe","channel":""}"#,
                |e| matches!(e, ProtocolError::InvalidChannel(_)),
                ErrorCode::InvalidChannel,
            ),
        ];
        for (text, expected, code) in cases {
            let err = ClientCommand::parse(text).expect_err(text);
            assert!(expected(&err), "{text}: {err:?}");
            assert_eq!(err.code(), code, "{text}");
        }
    }

    #[test]
    fn message_and_ping_frames_are_understood() {
        match ClientCommand::parse(r#"{"type":"message","payload":{"text":"hi"}}"#) {
            Ok(ClientCommand::Message { channel: None, payload }) => {
                assert_eq!(payload.get(), r#"{"text":"hi"}"#)
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(ClientCommand::parse(r#" {"type":"ping"}"#), Ok(ClientCommand::Ping)));
        assert!(matches!(
            ClientCommand::parse(r#"{"type":"m\u0065ssage","payload":1}"#),
            Ok(ClientCommand::Message { .. })
        ));
    }

    #[test]
    fn every_malformed_frame_gets_a_specific_error() {
        type Check = fn(&ProtocolError) -> bool;
        let cases: [(&str, Check); 7] = [
            ("hello", |e| matches!(e, ProtocolError::NotJson(_))),
            ("[1]", |e| matches!(e, ProtocolError::NotAnObject)),
            ("42", |e| matches!(e, ProtocolError::NotAnObject)),
            ("{\"payload\":1}", |e| matches!(e, ProtocolError::MissingType)),
            ("{\"type\":7}", |e| matches!(e, ProtocolError::MissingType)),
            ("{\"type\":\"shout\"}", |e| matches!(e, ProtocolError::UnknownType(t) if t == "shout")),
            ("{\"type\":\"message\"}", |e| matches!(e, ProtocolError::MissingPayload)),
        ];
        for (text, expected) in cases {
            let err = ClientCommand::parse(text).expect_err(text);
            assert!(expected(&err), "{text}: {err:?}");
        }
        assert!(matches!(ClientCommand::parse("{\"type\":\"message\""), Err(ProtocolError::NotJson(_))));
        match ClientCommand::parse(r#"{"type":"message","payload":null}"#) {
            Ok(ClientCommand::Message { payload, .. }) => assert_eq!(payload.get(), "null"),
            other => panic!("a null payload is a payload: {other:?}"),
        }
    }

    #[test]
    fn direct_frames_name_a_valid_recipient() {
        match ClientCommand::parse(r#"{"type":"direct","to_user":"alice","payload":{"hi":1}}"#) {
            Ok(ClientCommand::Direct { to_user, payload }) => {
                assert_eq!((to_user.as_str(), payload.get()), ("alice", r#"{"hi":1}"#));
            }
            other => panic!("unexpected {other:?}"),
        }
        type Check = fn(&ProtocolError) -> bool;
        let cases: [(&str, Check); 4] = [
            (r#"{"type":"direct","payload":1}"#, |e| matches!(e, ProtocolError::MissingRecipient)),
            (r#"{"type":"direct","to_user":7,"payload":1}"#, |e| {
                matches!(e, ProtocolError::MissingRecipient)
            }),
            (r#"{"type":"direct","to_user":"a:b","payload":1}"#, |e| {
                matches!(e, ProtocolError::InvalidRecipient(_))
            }),
            (r#"{"type":"direct","to_user":"alice"}"#, |e| matches!(e, ProtocolError::MissingPayload)),
        ];
        for (text, expected) in cases {
            let err = ClientCommand::parse(text).expect_err(text);
            assert!(expected(&err), "{text}: {err:?}");
            assert_eq!(err.code(), ErrorCode::BadRequest);
        }
    }

    #[test]
    fn refresh_frames_carry_a_token() {
        match ClientCommand::parse(r#"{"type":"refresh","token":"a.b.c"}"#) {
            Ok(ClientCommand::Refresh { token }) => assert_eq!(token, "a.b.c"),
            other => panic!("unexpected {other:?}"),
        }
        for bad in
            [r#"{"type":"refresh"}"#, r#"{"type":"refresh","token":""}"#, r#"{"type":"refresh","token":5}"#]
        {
            assert!(matches!(ClientCommand::parse(bad), Err(ProtocolError::MissingToken)), "{bad}");
        }
    }

    #[test]
    fn frames_are_parsed_from_bytes_that_must_be_utf8() {
        assert!(matches!(ClientCommand::parse_bytes(br#"{"type":"ping"}"#), Ok(ClientCommand::Ping)));
        let err = ClientCommand::parse_bytes(&[0x7b, 0xff, 0x7d]).expect_err("not UTF-8");
        assert_eq!(err, ProtocolError::NotText);
        assert_eq!(err.code(), ErrorCode::BadRequest);
    }

    #[test]
    fn close_codes_are_the_documented_ones() {
        assert_eq!(CloseReason::GoingAway.code(), 1001);
        assert_eq!(CloseReason::PolicyViolation.code(), 1008);
        assert_eq!(CloseReason::MessageTooBig.code(), 1009);
        assert_eq!(CloseReason::InternalError.code(), 1011);
        assert_eq!(CloseReason::TokenExpired.code(), 4001);
        assert_eq!(CloseReason::Inactive.code(), 4003);
        assert_eq!(CloseReason::Disconnected.code(), 4003);
        assert_eq!(CloseReason::Disconnected.reason(), "disconnected by the server");
        assert_eq!(CloseReason::SlowConsumer.code(), 4008);
        assert_eq!(CloseReason::MissedMessages.code(), 4009);
    }
}
