//! Property-based fuzz targets for every parser that reads untrusted input: client frames,
//! broker envelopes and token claims. Each runs a few hundred cases in the test suite; run
//! longer with `PROPTEST_CASES=<n> cargo test --release -p domain fuzz_`.
//!
//! Inputs are drawn three ways: arbitrary bytes, JSON-shaped text built from the protocol's
//! own vocabulary, and random single-byte mutations of a seed corpus of valid and nearly-valid
//! inputs (the `*_SEEDS` arrays).

use proptest::prelude::*;
use serde_json::Value;

use crate::channel::Channel;
use crate::envelope::InboundEnvelope;
use crate::id::{MessageId, TenantId, TopicName, UserId};
use crate::identity::{Claims, Identity};
use crate::protocol::ClientCommand;
use crate::time::Timestamp;

const FRAME_SEEDS: &[&str] = &[
    r#"{"type":"message","payload":{"text":"hi"}}"#,
    r#"{"type":"message","payload":null}"#,
    r#"{"type":"ping"}"#,
    r#"{"type":"refresh","token":"a.b.c"}"#,
    r#"{"type":"message","payload":[1,2,{"a":"\u00e9"}],"extra":true}"#,
    r#"{"type":"m\u0065ssage","payload":"escaped type"}"#,
    r#"  {"type" : "ping" }  "#,
    r#"["message",{"x":1}]"#,
    // Found by the envelope target: a lone surrogate escape, which strict parsers refuse.
    r#"{"type":"message","payload":"\ud83d"}"#,
];

const ENVELOPE_SEEDS: &[&str] = &[
    r#"{"type":"notice","payload":{"text":"maintenance"}}"#,
    r#"{"type":"message","payload":1,"timestamp":"2025-01-01T00:00:00.000Z","from_user":"bob","message_id":"m-1","channel":"tenant:acme"}"#,
    r#"{"type":"x","from_user":null,"channel":"tenant:other"}"#,
    r#"{"type":"x","payload":"\ud83d\ude00","message_id":"a.b_c-d"}"#,
    r#"{"type":"x","payload":"\ud83d\ude0"}"#,
    r#"{"type":"x","payload":"\ude00"}"#,
];

const CLAIMS_SEEDS: &[&str] = &[
    r#"{"user_id":"bob","tenant_id":"acme","scope":"ws:connect","exp":1}"#,
    r#"{"sub":"bob","tenant_id":"acme","scopes":["read","ws:connect"]}"#,
    r#"{"user_id":"bob:x","tenant_id":"acme","scope":"ws:connect-admin"}"#,
    r#"{"user_id":null,"sub":"s","tenant_id":"t","scope":"  ws:connect\t"}"#,
    // Found by the claims target: an empty entry in the scopes array.
    r#"{"user_id":"u","tenant_id":"t","scopes":[""]}"#,
];

/// A seed with one byte replaced, inserted or removed.
fn mutated(seeds: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    (0..seeds.len(), any::<usize>(), any::<u8>(), 0..3u8).prop_map(move |(i, at, byte, op)| {
        let mut bytes = seeds[i].as_bytes().to_vec();
        let at = at % (bytes.len() + 1);
        match op {
            0 if at < bytes.len() => bytes[at] = byte,
            1 => bytes.insert(at, byte),
            _ if at < bytes.len() => {
                bytes.remove(at);
            }
            _ => {}
        }
        bytes
    })
}

/// JSON objects made of the protocol's keys and values of every JSON type.
fn json_object() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("type"),
        Just("payload"),
        Just("token"),
        Just("timestamp"),
        Just("from_user"),
        Just("message_id"),
        Just("channel"),
        Just("user_id"),
        Just("sub"),
        Just("tenant_id"),
        Just("scope"),
        Just("scopes"),
        Just("exp"),
    ];
    let value = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        "[a-z:._*? -]{0,12}".prop_map(Value::from),
        prop_oneof![Just("message"), Just("ping"), Just("refresh"), Just("ws:connect"), Just("tenant:acme")]
            .prop_map(Value::from),
        prop::collection::vec("[a-z:]{0,6}".prop_map(Value::from), 0..3).prop_map(Value::from),
    ];
    prop::collection::vec((key, value), 0..6).prop_map(|pairs| {
        let map: serde_json::Map<String, Value> = pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        Value::Object(map).to_string()
    })
}

fn inputs(seeds: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        json_object().prop_map(String::into_bytes),
        mutated(seeds),
    ]
}

fn check_frame(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    match ClientCommand::parse(text) {
        Ok(ClientCommand::Message { channel, payload }) => {
            assert!(serde_json::from_str::<Value>(payload.get()).is_ok(), "payload is JSON");
            assert!(channel.is_none_or(|c| TopicName::parse(c.as_str()).is_ok()), "a valid topic");
        }
        Ok(ClientCommand::Subscribe { channel, token, .. }) => {
            assert!(TopicName::parse(channel.as_str()).is_ok(), "a valid topic");
            assert!(token.is_none_or(|t| !t.is_empty()));
        }
        Ok(ClientCommand::Unsubscribe { channel } | ClientCommand::History { channel, .. }) => {
            assert!(TopicName::parse(channel.as_str()).is_ok());
        }
        Ok(ClientCommand::Direct { to_user, payload }) => {
            assert!(serde_json::from_str::<Value>(payload.get()).is_ok(), "payload is JSON");
            assert!(UserId::parse(to_user.as_str()).is_ok(), "the recipient is a valid id");
        }
        Ok(ClientCommand::Refresh { token }) => assert!(!token.is_empty()),
        Ok(ClientCommand::Ping | ClientCommand::Presence { .. }) => {}
        Err(error) => assert!(!error.to_string().is_empty()),
    }
}

fn check_envelope(bytes: &[u8]) {
    let channel = Channel::Tenant(TenantId::parse("acme").expect("valid"));
    let Ok(envelope) = InboundEnvelope::parse(bytes) else { return };
    let completed = envelope
        .complete(&channel, || (Timestamp::from_unix_millis(0), MessageId::parse("filled").expect("valid")));
    let value: Value = serde_json::from_str(&completed).expect("a completed envelope is JSON");
    assert_eq!(value["channel"], "tenant:acme");
    assert!(value["type"].as_str().is_some_and(|t| !t.is_empty() && t.len() <= 64));
    assert!(value["message_id"].as_str().is_some_and(|id| MessageId::parse(id).is_ok()));
    assert!(
        value["from_user"].is_null() || value["from_user"].as_str().is_some_and(|u| UserId::parse(u).is_ok())
    );
}

fn check_claims(bytes: &[u8]) {
    let Ok(claims) = serde_json::from_slice::<Claims>(bytes) else { return };
    if let Ok(identity) = Identity::from_claims(claims) {
        // Whatever an identity holds can name a channel without injection.
        for id in [identity.user_id().as_str(), identity.tenant_id().as_str()] {
            assert!(!id.is_empty() && id.len() <= 128);
            assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)), "{id}");
        }
        assert!(!identity.has_scope(""));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn fuzz_client_frame_parser(bytes in inputs(FRAME_SEEDS)) {
        check_frame(&bytes);
    }

    #[test]
    fn fuzz_broker_envelope_parser(bytes in inputs(ENVELOPE_SEEDS)) {
        check_envelope(&bytes);
    }

    #[test]
    fn fuzz_claims_extraction(bytes in inputs(CLAIMS_SEEDS)) {
        check_claims(&bytes);
    }
}

#[test]
fn the_seed_corpus_passes_every_check() {
    for seed in FRAME_SEEDS {
        check_frame(seed.as_bytes());
    }
    for seed in ENVELOPE_SEEDS {
        check_envelope(seed.as_bytes());
    }
    for seed in CLAIMS_SEEDS {
        check_claims(seed.as_bytes());
    }
}
