//! The client side of the WebSocket protocol: what a client may send, the error codes it may
//! receive, and why the server closes a connection.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

/// A valid client→server frame.
#[derive(Debug, Clone, Copy)]
pub enum ClientCommand<'a> {
    /// `{"type":"message","payload":…}`: publish to the sender's tenant.
    Message { payload: &'a RawValue },
    /// `{"type":"ping"}`: answered with a `pong` frame.
    Ping,
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
    #[error("unknown frame type {0:?}; expected \"message\" or \"ping\"")]
    UnknownType(String),
    #[error("a \"message\" frame needs a \"payload\"")]
    MissingPayload,
    #[error("binary frames are not supported; send JSON text frames")]
    Binary,
}

#[derive(Deserialize)]
struct RawFrame<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    /// `Some` whenever the field is present, `null` included.
    #[serde(borrow, default, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
}

fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(deserializer).map(Some)
}

impl<'a> ClientCommand<'a> {
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
            if e.is_data() { ProtocolError::MissingType } else { ProtocolError::NotJson(e.to_string()) }
        })?;
        match frame.kind.as_deref() {
            Some("message") => match frame.payload {
                Some(payload) => Ok(Self::Message { payload }),
                None => Err(ProtocolError::MissingPayload),
            },
            Some("ping") => Ok(Self::Ping),
            Some(other) => Err(ProtocolError::UnknownType(other.chars().take(64).collect())),
            None => Err(ProtocolError::MissingType),
        }
    }
}

/// The stable `code` of an `error` frame or an HTTP error body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The frame or request is malformed.
    BadRequest,
    /// The broker is unreachable; retry later.
    Unavailable,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Unavailable => "unavailable",
        }
    }
}

/// Why the server closes a WebSocket connection, with its close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// 1001: the instance is shutting down; reconnect (to another instance).
    GoingAway,
    /// 4408: no frame from the client for longer than the idle timeout.
    IdleTimeout,
    /// 4429: the client reads too slowly and its outbound queue is full.
    SlowConsumer,
}

impl CloseReason {
    pub fn code(self) -> u16 {
        match self {
            Self::GoingAway => 1001,
            Self::IdleTimeout => 4408,
            Self::SlowConsumer => 4429,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Self::GoingAway => "server shutting down",
            Self::IdleTimeout => "idle timeout",
            Self::SlowConsumer => "slow consumer",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_and_ping_frames_are_understood() {
        match ClientCommand::parse(r#"{"type":"message","payload":{"text":"hi"}}"#) {
            Ok(ClientCommand::Message { payload }) => assert_eq!(payload.get(), r#"{"text":"hi"}"#),
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
            Ok(ClientCommand::Message { payload }) => assert_eq!(payload.get(), "null"),
            other => panic!("a null payload is a payload: {other:?}"),
        }
    }

    #[test]
    fn close_codes_are_the_documented_ones() {
        assert_eq!(CloseReason::GoingAway.code(), 1001);
        assert_eq!(CloseReason::IdleTimeout.code(), 4408);
        assert_eq!(CloseReason::SlowConsumer.code(), 4429);
    }
}
