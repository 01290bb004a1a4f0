//! The envelope: the one message format on every server→client frame and in the broker.
//!
//! ```json
//! {"type":"message","payload":{"text":"hi"},"timestamp":"2025-01-01T00:00:00.000Z",
//!  "from_user":"bob","message_id":"…","channel":"tenant:acme"}
//! ```
//! Payloads are kept as raw JSON text: they are validated once and never re-encoded.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::channel::Channel;
use crate::id::{MessageId, UserId};
use crate::time::Timestamp;

/// Well-known values of the envelope `type` field.
pub mod kind {
    /// A client message relayed to its tenant.
    pub const MESSAGE: &str = "message";
    /// A webhook relayed to its tenant.
    pub const WEBHOOK: &str = "webhook";
    /// A client's message to one user of its tenant, on that user's channel.
    pub const DIRECT: &str = "direct";
    /// The answer to a `presence` frame: who is online in the tenant, or in a topic.
    pub const PRESENCE: &str = "presence";
    /// A user's first connection in the tenant (or subscription with presence to the topic)
    /// opened, on any instance.
    pub const PRESENCE_JOIN: &str = "presence.join";
    /// A user's last connection in the tenant (or subscription with presence to the topic)
    /// ended, on every instance.
    pub const PRESENCE_LEAVE: &str = "presence.leave";
    /// The first frame of every connection.
    pub const WELCOME: &str = "welcome";
    /// The answer to a client `ping`.
    pub const PONG: &str = "pong";
    /// The answer to a valid `refresh`.
    pub const REFRESHED: &str = "refreshed";
    /// A problem with what the client sent; the connection stays open.
    pub const ERROR: &str = "error";
    /// The answer to a `subscribe`: the topic's messages follow.
    pub const SUBSCRIBED: &str = "subscribed";
    /// A subscription ended (asked for, or ended by the server, with a reason).
    pub const UNSUBSCRIBED: &str = "unsubscribed";
    /// The answer to a `history` frame: a page of a topic's kept history.
    pub const HISTORY: &str = "history";
}

/// A message as clients receive it and as it travels through the broker.
#[derive(Debug, Serialize)]
pub struct Envelope {
    #[serde(rename = "type")]
    pub kind: Cow<'static, str>,
    pub payload: Box<RawValue>,
    pub timestamp: Timestamp,
    pub from_user: Option<UserId>,
    pub message_id: MessageId,
    /// Present on every frame delivered through a channel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<Channel>,
}

impl Envelope {
    /// The envelope as one line of JSON.
    pub fn to_json(&self) -> String {
        // Every field is a string, a validated id or already-valid raw JSON: encoding cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Whether valid JSON text `raw` is free of lone UTF-16 surrogate escapes (`"\ud800"`). RFC 8259
/// lets the grammar through but leaves their meaning undefined, and strict parsers refuse
/// them, so the service neither accepts nor relays them. Linear, allocation-free.
pub fn has_lone_surrogate(raw: &str) -> bool {
    let bytes = raw.as_bytes();
    let hex = |at: usize| -> Option<u32> {
        let digits = raw.get(at..at + 4)?;
        u32::from_str_radix(digits, 16).ok()
    };
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            i += 1;
            continue;
        }
        if bytes.get(i + 1) != Some(&b'u') {
            i += 2;
            continue;
        }
        match hex(i + 2) {
            Some(0xD800..=0xDBFF) => {
                let low = (bytes.get(i + 6) == Some(&b'\\') && bytes.get(i + 7) == Some(&b'u'))
                    .then(|| hex(i + 8))
                    .flatten();
                if !matches!(low, Some(0xDC00..=0xDFFF)) {
                    return true;
                }
                i += 12;
            }
            Some(0xDC00..=0xDFFF) => return true,
            _ => i += 6,
        }
    }
    false
}

/// `envelope` (one JSON object) without its closing brace, ready for `,"offset":…}` to be
/// appended; `None` when it does not end with `}`.
pub fn open_envelope(envelope: &[u8]) -> Option<&[u8]> {
    let end = envelope.iter().rposition(|b| !b.is_ascii_whitespace())?;
    let last_field = envelope[..end].iter().rposition(|b| !b.is_ascii_whitespace())?;
    // `{}` has no field to follow.
    (envelope[end] == b'}' && envelope[last_field] != b'{').then(|| &envelope[..end])
}

/// `envelope` with `"offset"` and `"epoch"` added as its last fields: the bytes every broker
/// publishes for a message with a position, and a durable store keeps.
pub fn with_position(envelope: &[u8], offset: u64, epoch: &str) -> Option<Vec<u8>> {
    let open = open_envelope(envelope)?;
    let mut out = Vec::with_capacity(open.len() + epoch.len() + 40);
    out.extend_from_slice(open);
    out.extend_from_slice(format!(r#","offset":{offset},"epoch":"{epoch}"}}"#).as_bytes());
    Some(out)
}

/// Turns any serializable value into a raw JSON payload.
pub fn raw_payload<T: Serialize + ?Sized>(value: &T) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).unwrap_or_else(|_| null_payload())
}

/// The payload `null`.
pub fn null_payload() -> Box<RawValue> {
    RawValue::from_string("null".to_owned()).unwrap_or_else(|_| unreachable!("null is valid JSON"))
}

/// Why a broker message cannot be delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("broker message is not a JSON object with a string \"type\": {0}")]
    Malformed(String),
    #[error("broker message has an empty or overlong \"type\"")]
    InvalidType,
    #[error("broker message of {0} bytes exceeds the size limit")]
    TooLarge(usize),
    #[error("broker message has an invalid \"from_user\": {0}")]
    InvalidUser(crate::id::IdError),
    #[error("broker message has an invalid \"message_id\": {0}")]
    InvalidMessageId(crate::id::IdError),
    #[error("broker message has an invalid \"epoch\"")]
    InvalidEpoch,
}

/// A message read from the broker, possibly published by another service with fields missing.
#[derive(Debug, Deserialize)]
pub struct InboundEnvelope<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
    #[serde(borrow, default)]
    timestamp: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    from_user: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    message_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    channel: Option<Cow<'a, str>>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(borrow, default)]
    epoch: Option<Cow<'a, str>>,
}

/// Longest accepted envelope `type`, in bytes.
pub const MAX_KIND_LEN: usize = 64;

#[derive(Serialize)]
struct Completed<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    payload: &'a RawValue,
    timestamp: &'a str,
    from_user: Option<&'a str>,
    message_id: &'a str,
    channel: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    epoch: Option<&'a str>,
}

impl<'a> InboundEnvelope<'a> {
    /// Parses a broker message.
    ///
    /// # Errors
    /// [`EnvelopeError`] when the bytes are not a JSON object with a string `type` of 1 to 64
    /// bytes.
    pub fn parse(raw: &'a [u8]) -> Result<Self, EnvelopeError> {
        let first = raw.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            return Err(EnvelopeError::Malformed("not a JSON object".to_owned()));
        }
        let parsed: Self =
            serde_json::from_slice(raw).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        if std::str::from_utf8(raw).is_ok_and(has_lone_surrogate) {
            return Err(EnvelopeError::Malformed("lone UTF-16 surrogate escape".to_owned()));
        }
        if parsed.kind.is_empty() || parsed.kind.len() > MAX_KIND_LEN {
            return Err(EnvelopeError::InvalidType);
        }
        if let Some(user) = &parsed.from_user {
            UserId::parse(user).map_err(EnvelopeError::InvalidUser)?;
        }
        if let Some(id) = &parsed.message_id {
            MessageId::parse(id).map_err(EnvelopeError::InvalidMessageId)?;
        }
        if parsed.epoch.as_deref().is_some_and(|e| !crate::position::is_valid_epoch(e)) {
            return Err(EnvelopeError::InvalidEpoch);
        }
        Ok(parsed)
    }

    /// The envelope's `timestamp`, when it is present and in the service's RFC 3339 form.
    pub fn timestamp(&self) -> Option<Timestamp> {
        self.timestamp.as_deref().and_then(Timestamp::parse_rfc3339)
    }

    /// The message's offset in its channel's history, when it has one.
    pub fn offset(&self) -> Option<u64> {
        self.offset
    }

    /// The epoch of the message's offset, when it has one.
    pub fn epoch(&self) -> Option<&str> {
        self.epoch.as_deref()
    }

    /// Whether the message already carries every field a client frame needs, for `channel`.
    pub fn is_complete_for(&self, channel: &Channel) -> bool {
        self.payload.is_some()
            && self.timestamp.is_some()
            && self.message_id.is_some()
            && self.channel.as_deref().is_some_and(|c| *c == *channel.name())
    }

    /// The message as a client frame on `channel`, with a missing `timestamp` or `message_id`
    /// taken from `fill`, a missing payload as `null` and `channel` set to `channel`.
    pub fn complete(&self, channel: &Channel, fill: impl FnOnce() -> (Timestamp, MessageId)) -> String {
        let (now, id) = if self.timestamp.is_none() || self.message_id.is_none() {
            let (now, id) = fill();
            (Some(now.to_string()), Some(id))
        } else {
            (None, None)
        };
        let null = null_payload();
        let completed = Completed {
            kind: &self.kind,
            payload: self.payload.unwrap_or(&null),
            timestamp: self.timestamp.as_deref().or(now.as_deref()).unwrap_or_default(),
            from_user: self.from_user.as_deref(),
            message_id: self.message_id.as_deref().or(id.as_ref().map(MessageId::as_str)).unwrap_or_default(),
            channel: &channel.name(),
            offset: self.offset,
            epoch: self.epoch.as_deref(),
        };
        serde_json::to_string(&completed).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_is_added_as_the_last_fields_of_the_envelope() {
        let got = with_position(br#"{"type":"n","payload":{"a":1}} "#, 7, "e-1").expect("object");
        assert_eq!(&got[..], br#"{"type":"n","payload":{"a":1},"offset":7,"epoch":"e-1"}"#);
        assert_eq!(with_position(b"[1]", 1, "e"), None);
        assert_eq!(with_position(b"}", 1, "e"), None);
        assert_eq!(with_position(b"{ }", 1, "e"), None);
    }
    use crate::id::TenantId;

    fn acme() -> Channel {
        Channel::Tenant(TenantId::parse("acme").expect("valid"))
    }

    #[test]
    fn envelopes_serialize_in_the_documented_shape() {
        let envelope = Envelope {
            kind: kind::MESSAGE.into(),
            payload: RawValue::from_string(r#"{"text":"hi"}"#.into()).expect("json"),
            timestamp: Timestamp::from_unix_millis(1_735_689_600_000),
            from_user: Some(UserId::parse("bob").expect("valid")),
            message_id: MessageId::parse("m-1").expect("valid"),
            channel: Some(acme()),
        };
        assert_eq!(
            envelope.to_json(),
            r#"{"type":"message","payload":{"text":"hi"},"timestamp":"2025-01-01T00:00:00.000Z","from_user":"bob","message_id":"m-1","channel":"tenant:acme"}"#
        );
    }

    #[test]
    fn frames_not_sent_through_a_channel_have_no_channel_field() {
        let envelope = Envelope {
            kind: kind::PONG.into(),
            payload: null_payload(),
            timestamp: Timestamp::from_unix_millis(0),
            from_user: None,
            message_id: MessageId::parse("m-2").expect("valid"),
            channel: None,
        };
        assert_eq!(
            envelope.to_json(),
            r#"{"type":"pong","payload":null,"timestamp":"1970-01-01T00:00:00.000Z","from_user":null,"message_id":"m-2"}"#
        );
    }

    #[test]
    fn complete_broker_messages_are_recognised_as_such() {
        let raw = br#"{"type":"notice","payload":1,"timestamp":"t","from_user":null,"message_id":"x","channel":"tenant:acme"}"#;
        let parsed = InboundEnvelope::parse(raw).expect("valid");
        assert!(parsed.is_complete_for(&acme()));
        assert!(!parsed.is_complete_for(&Channel::Global));
    }

    #[test]
    fn a_position_is_read_and_kept_when_fields_are_filled_in() {
        let raw = br#"{"type":"notice","payload":1,"offset":7,"epoch":"e1"}"#;
        let parsed = InboundEnvelope::parse(raw).expect("valid");
        assert_eq!((parsed.offset(), parsed.epoch()), (Some(7), Some("e1")));
        let completed = parsed
            .complete(&acme(), || (Timestamp::from_unix_millis(0), MessageId::parse("gen").expect("valid")));
        assert!(completed.ends_with(r#""channel":"tenant:acme","offset":7,"epoch":"e1"}"#), "{completed}");
        assert_eq!(
            InboundEnvelope::parse(br#"{"type":"n","epoch":"a:b"}"#).err(),
            Some(EnvelopeError::InvalidEpoch)
        );
        assert!(InboundEnvelope::parse(br#"{"type":"n","offset":-1}"#).is_err());
    }

    #[test]
    fn missing_fields_are_filled_in() {
        let raw = br#"{"type":"notice","payload":{"a":1}}"#;
        let parsed = InboundEnvelope::parse(raw).expect("valid");
        assert!(!parsed.is_complete_for(&acme()));
        let completed = parsed
            .complete(&acme(), || (Timestamp::from_unix_millis(0), MessageId::parse("gen").expect("valid")));
        assert_eq!(
            completed,
            r#"{"type":"notice","payload":{"a":1},"timestamp":"1970-01-01T00:00:00.000Z","from_user":null,"message_id":"gen","channel":"tenant:acme"}"#
        );
    }

    #[test]
    fn a_wrong_channel_field_is_replaced_by_the_channel_it_arrived_on() {
        let raw = br#"{"type":"x","payload":2,"timestamp":"t","message_id":"m","channel":"tenant:other"}"#;
        let parsed = InboundEnvelope::parse(raw).expect("valid");
        let completed = parsed.complete(&acme(), || unreachable!("nothing to fill"));
        assert!(completed.contains(r#""channel":"tenant:acme""#), "{completed}");
        assert!(completed.contains(r#""message_id":"m""#), "{completed}");
    }

    #[test]
    fn lone_surrogates_are_found_and_pairs_are_not() {
        assert!(!has_lone_surrogate(r#"{"a":"\ud83d\ude00","b":"\\ud800","c":"\u00e9"}"#));
        assert!(has_lone_surrogate(r#""\ud83d""#));
        assert!(has_lone_surrogate(r#""\ud83dx""#));
        assert!(has_lone_surrogate(r#""\ude00""#));
        assert!(has_lone_surrogate(r#""\ud83d\u0041""#));
        assert!(!has_lone_surrogate(r#""\\ude00""#), "an escaped backslash, not an escape");
    }

    #[test]
    fn garbage_is_rejected() {
        for raw in [
            &b"not json"[..],
            b"[1,2]",
            b"{\"payload\":1}",
            b"{\"type\":5}",
            b"{\"type\":\"\"}",
            b"\xff\xfe",
            br#"{"type":"x","from_user":"bob:admin"}"#,
            br#"{"type":"x","message_id":"a b"}"#,
            br#"{"type":"x","payload":"\ud83d"}"#,
        ] {
            assert!(InboundEnvelope::parse(raw).is_err(), "{raw:?}");
        }
    }
}
