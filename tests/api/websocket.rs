//! `GET /ws`: authentication, the welcome frame, tenant messages, pings and bad frames.

use jsonwebtoken::Algorithm;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::helpers::*;

#[tokio::test]
async fn a_valid_token_is_welcomed_with_the_connection_identity() {
    let app = spawn_app().await;
    let mut client = app.try_connect(&token("bob", "acme")).await.expect("connected");
    let welcome = client.next_json().await;
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["payload"]["user_id"], "bob");
    assert_eq!(welcome["payload"]["tenant_id"], "acme");
    assert!(welcome["payload"]["connection_id"].as_str().is_some_and(|id| !id.is_empty()));
    assert!(welcome["message_id"].as_str().is_some_and(|id| !id.is_empty()));
    let timestamp = welcome["timestamp"].as_str().expect("timestamp");
    assert!(
        timestamp.len() == 24 && timestamp.ends_with('Z') && timestamp.as_bytes()[10] == b'T',
        "{timestamp}"
    );
    assert_eq!(welcome["from_user"], Value::Null);
}

#[tokio::test]
async fn a_token_in_an_authorization_header_is_accepted() {
    let app = spawn_app().await;
    let mut request = app.ws_url("").into_client_request().expect("request");
    let bearer = format!("Bearer {}", token("bob", "acme"));
    request.headers_mut().insert("authorization", bearer.parse().expect("header"));
    let mut client = WsClient::connect(request).await.expect("connected");
    assert_eq!(client.next_json().await["type"], "welcome");
}

#[tokio::test]
async fn user_id_falls_back_to_sub_and_scopes_may_be_an_array() {
    let app = spawn_app().await;
    let claims = json!({"sub": "carol", "tenant_id": "acme", "scopes": ["read", "ws:connect"], "exp": now_secs() + 60});
    let mut client =
        app.try_connect(&sign_claims(&claims, Algorithm::HS256, JWT_SECRET)).await.expect("connected");
    assert_eq!(client.next_json().await["payload"]["user_id"], "carol");
}

#[tokio::test]
async fn every_unauthenticated_request_is_refused_with_401_before_the_upgrade() {
    let app = spawn_app().await;
    let exp = now_secs() + 600;
    let cases = [
        ("no token", String::new()),
        ("garbage", "not-a-jwt".to_owned()),
        (
            "wrong secret",
            sign_claims(
                &json!({"user_id": "bob", "tenant_id": "acme", "scope": "ws:connect", "exp": exp}),
                Algorithm::HS256,
                "another-secret-of-enough-length-0000",
            ),
        ),
        (
            "wrong algorithm",
            sign_claims(
                &json!({"user_id": "bob", "tenant_id": "acme", "scope": "ws:connect", "exp": exp}),
                Algorithm::HS384,
                JWT_SECRET,
            ),
        ),
        (
            "expired",
            sign_claims(
                &json!({"user_id": "bob", "tenant_id": "acme", "scope": "ws:connect", "exp": now_secs() - 3600}),
                Algorithm::HS256,
                JWT_SECRET,
            ),
        ),
        (
            "not yet valid",
            sign_claims(
                &json!({"user_id": "bob", "tenant_id": "acme", "scope": "ws:connect", "exp": exp, "nbf": exp - 60}),
                Algorithm::HS256,
                JWT_SECRET,
            ),
        ),
        (
            "no exp",
            sign_claims(
                &json!({"user_id": "bob", "tenant_id": "acme", "scope": "ws:connect"}),
                Algorithm::HS256,
                JWT_SECRET,
            ),
        ),
        (
            "no tenant",
            sign_claims(
                &json!({"user_id": "bob", "scope": "ws:connect", "exp": exp}),
                Algorithm::HS256,
                JWT_SECRET,
            ),
        ),
        (
            "no user",
            sign_claims(
                &json!({"tenant_id": "acme", "scope": "ws:connect", "exp": exp}),
                Algorithm::HS256,
                JWT_SECRET,
            ),
        ),
        (
            "channel injection in the tenant",
            sign_claims(
                &json!({"user_id": "bob", "tenant_id": "acme:*", "scope": "ws:connect", "exp": exp}),
                Algorithm::HS256,
                JWT_SECRET,
            ),
        ),
        (
            "invalid user id",
            sign_claims(
                &json!({"user_id": "bob smith", "tenant_id": "acme", "scope": "ws:connect", "exp": exp}),
                Algorithm::HS256,
                JWT_SECRET,
            ),
        ),
        (
            "alg none",
            unsigned_token(
                "none",
                &json!({"user_id": "bob", "tenant_id": "acme", "scope": "ws:connect", "exp": exp}),
            ),
        ),
    ];
    for (case, token) in cases {
        let (status, body) =
            app.try_connect(&token).await.err().unwrap_or_else(|| panic!("{case}: accepted"));
        assert_eq!(status, 401, "{case}");
        assert_eq!(body["code"], "unauthorized", "{case}: {body}");
    }
}

#[tokio::test]
async fn a_valid_token_without_the_connect_scope_is_refused_with_403() {
    let app = spawn_app().await;
    let exp = now_secs() + 600;
    for scope in [json!("read"), json!("ws:connect-admin ws"), json!(null)] {
        let claims = json!({"user_id": "bob", "tenant_id": "acme", "scope": scope, "exp": exp});
        let (status, body) = app
            .try_connect(&sign_claims(&claims, Algorithm::HS256, JWT_SECRET))
            .await
            .err()
            .expect("refused");
        assert_eq!(status, 403, "{scope}");
        assert_eq!(body["code"], "forbidden");
    }
}

#[tokio::test]
async fn an_instance_at_its_connection_limit_answers_503_until_a_slot_frees() {
    let app = spawn_app_with(test_config(|vars| {
        vars.insert("MAX_CONNECTIONS".into(), "1".into());
    }))
    .await;
    let first = app.connect("bob", "acme").await;
    let (status, body) = app.try_connect(&token("eve", "acme")).await.err().expect("refused");
    assert_eq!(status, 503);
    assert_eq!(body["code"], "at_capacity");
    first.close().await;
    // The slot is released once the server has processed the close.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match app.try_connect(&token("eve", "acme")).await {
            Ok(_) => break,
            Err((503, _)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(other) => panic!("still refused: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_plain_http_request_to_the_websocket_endpoint_is_told_to_upgrade() {
    let app = spawn_app().await;
    let answer = app.get(&format!("/ws?token={}", token("bob", "acme"))).await;
    assert_eq!(answer.status, 426);
    assert_eq!(answer.body["code"], "upgrade_required");
}

#[tokio::test]
async fn a_message_reaches_every_connection_of_the_tenant_including_the_sender() {
    let app = spawn_app().await;
    let mut bob = app.connect("bob", "acme").await;
    let mut eve = app.connect("eve", "acme").await;
    bob.send_json(&json!({"type": "message", "payload": {"text": "hello", "n": [1, 2.5, null]}})).await;
    let mut ids = Vec::new();
    for client in [&mut bob, &mut eve] {
        let frame = client.next_json().await;
        assert_eq!(frame["type"], "message");
        assert_eq!(frame["payload"], json!({"text": "hello", "n": [1, 2.5, null]}));
        assert_eq!(frame["from_user"], "bob");
        assert_eq!(frame["channel"], "tenant:acme");
        assert!(frame["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
        ids.push(frame["message_id"].clone());
    }
    assert_eq!(ids[0], ids[1], "one message, one id");
}

#[tokio::test]
async fn no_connection_of_another_tenant_ever_receives_a_tenant_message() {
    let app = spawn_app().await;
    let mut bob_acme = app.connect("bob", "acme").await;
    // The same user id in another tenant is another user.
    let mut bob_globex = app.connect("bob", "globex").await;
    bob_acme.send_json(&json!({"type": "message", "payload": "for acme only"})).await;
    assert_eq!(bob_acme.next_json().await["payload"], "for acme only");
    bob_globex.send_json(&json!({"type": "message", "payload": "for globex only"})).await;
    assert_eq!(bob_globex.next_json().await["payload"], "for globex only");
    bob_acme.expect_nothing_pending().await;
    bob_globex.expect_nothing_pending().await;
}

#[tokio::test]
async fn messages_from_one_sender_arrive_in_order() {
    let app = spawn_app_with(test_config(|vars| {
        vars.insert("RATE_LIMIT_PER_SEC".into(), "0".into());
    }))
    .await;
    let mut sender = app.connect("bob", "acme").await;
    let mut reader = app.connect("eve", "acme").await;
    for n in 0..200 {
        sender.send_json(&json!({"type": "message", "payload": n})).await;
    }
    for n in 0..200 {
        assert_eq!(reader.next_json().await["payload"], n);
    }
}

#[tokio::test]
async fn a_ping_frame_is_answered_with_pong() {
    let app = spawn_app().await;
    let mut client = app.connect("bob", "acme").await;
    client.send_json(&json!({"type": "ping"})).await;
    let pong = client.next_json().await;
    assert_eq!(pong["type"], "pong");
    assert!(pong["message_id"].as_str().is_some());
}

#[tokio::test]
async fn malformed_frames_get_an_error_frame_and_the_connection_stays_open() {
    let app = spawn_app().await;
    let mut client = app.connect("bob", "acme").await;
    let frames = [
        Message::text("hello"),
        Message::text("[1,2,3]"),
        Message::text("\"just a string\""),
        Message::text(r#"{"payload":1}"#),
        Message::text(r#"{"type":"shout","payload":1}"#),
        Message::text(r#"{"type":"message"}"#),
        Message::text(r#"{"type":"refresh"}"#),
    ];
    let frames = frames
        .into_iter()
        .chain([Message::binary(vec![1u8, 2, 3]), Message::binary(vec![b'{', 0xff, b'}'])])
        .map(|f| (f, "bad_request"));
    for (frame, code) in frames {
        let description = format!("{frame:?}");
        client.send(frame).await;
        let error = client.next_json().await;
        assert_eq!(error["type"], "error", "{description}");
        assert_eq!(error["payload"]["code"], code, "{description}");
        assert!(error["payload"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    client.expect_nothing_pending().await;
}

#[tokio::test]
async fn a_binary_frame_holding_a_client_frame_is_answered_like_a_text_frame() {
    let app = spawn_app().await;
    let mut client = app.connect("bob", "acme").await;
    client.send(Message::binary(br#"{"type":"ping"}"#.to_vec())).await;
    assert_eq!(client.next_json().await["type"], "pong");
    client.send(Message::binary(br#"{"type":"message","payload":{"n":1}}"#.to_vec())).await;
    let own = client.next_json().await;
    assert_eq!((own["type"].as_str(), own["payload"]["n"].as_u64()), (Some("message"), Some(1)));
}

#[tokio::test]
async fn an_oversized_message_closes_the_connection_with_1009() {
    let app = spawn_app().await;
    let mut client = app.connect("bob", "acme").await;
    let huge = format!(r#"{{"type":"message","payload":"{}"}}"#, "x".repeat(128 * 1024));
    client.send_text(&huge).await;
    let frame = client.expect_close().await.expect("a close frame with a code");
    assert_eq!(frame.code, CloseCode::Size);
}
