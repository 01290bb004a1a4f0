//! The server API: `POST /api/publish` with `Authorization: Bearer <API key>`.

use serde_json::{Value, json};

use crate::helpers::*;

const KEY: &str = "backend-api-key-0123456789";

async fn app_with_key() -> TestApp {
    spawn_app_with(test_config(|vars| {
        vars.insert("API_KEYS".into(), format!("another-key-0123456789,{KEY}"));
    }))
    .await
}

/// `POST` of `body` to the server API's `path`, with `key` as the bearer when given.
async fn call(app: &TestApp, path: &str, key: Option<&str>, body: &Value) -> Answer {
    let mut request = reqwest::Client::new().post(app.url(path)).json(body);
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    Answer::from_response(request.send().await.expect("request")).await
}

async fn publish(app: &TestApp, key: Option<&str>, body: &Value) -> Answer {
    call(app, "/api/publish", key, body).await
}

#[tokio::test]
async fn without_keys_the_api_says_it_is_off_and_without_a_valid_key_every_call_is_refused_with_401() {
    let body = json!({"channel": "tenant:acme", "type": "notice", "payload": 1});
    let kick = json!({"tenant_id": "acme", "user_id": "bob"});
    // Every call of the API, with `key` as its bearer when given.
    async fn every_call(app: &TestApp, key: Option<&str>, body: &Value, kick: &Value) -> Vec<Answer> {
        let mut presence = reqwest::Client::new().get(app.url("/api/tenants/acme/presence"));
        if let Some(key) = key {
            presence = presence.header("authorization", format!("Bearer {key}"));
        }
        vec![
            publish(app, key, body).await,
            disconnect(app, key, kick).await,
            Answer::from_response(presence.send().await.expect("request")).await,
        ]
    }
    // No keys configured: the API is off, whatever key is sent, and says so.
    let closed = spawn_app().await;
    let mut client = closed.connect("bob", "acme").await;
    for key in [Some(KEY), None] {
        for answer in every_call(&closed, key, &body, &kick).await {
            assert_eq!(
                (answer.status, answer.body["code"].as_str()),
                (404, Some("api_disabled")),
                "no keys: API off ({key:?}): {}",
                answer.body
            );
            assert_eq!(
                answer.body["message"],
                "the server API is off on this deployment: no API_KEYS are configured"
            );
        }
    }
    client.expect_nothing_pending().await;
    let app = app_with_key().await;
    let mut client = app.connect("bob", "acme").await;
    for key in [None, Some("backend-api-key-012345678"), Some("wrong"), Some("")] {
        for answer in every_call(&app, key, &body, &kick).await {
            assert_eq!(answer.status, 401, "{key:?}: {}", answer.body);
        }
    }
    // Nothing was published and bob was not disconnected.
    client.expect_nothing_pending().await;
}

#[tokio::test]
async fn a_backend_publishes_to_each_kind_of_channel_and_exactly_its_clients_receive_it() {
    // Two instances on a real Redis: the call goes to one, the clients are spread over both.
    let redis = crate::redis_support::RedisServer::start();
    let apps = [
        spawn_on_redis(&redis.url(), &[("API_KEYS", KEY)]).await,
        spawn_on_redis(&redis.url(), &[("API_KEYS", KEY)]).await,
    ];
    let app = &apps[0];
    let mut bob = apps[0].connect("bob", "acme").await;
    let mut alice = apps[1].connect("alice", "acme").await;
    let mut eve = apps[1].connect("eve", "globex").await;

    let answer =
        publish(app, Some(KEY), &json!({"channel": "tenant:acme", "type": "notice", "payload": {"n": 1}}))
            .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let message_id = answer.body["message_id"].as_str().expect("message_id").to_owned();
    for client in [&mut bob, &mut alice] {
        let frame = client.next_json().await;
        assert_eq!(
            (frame["type"].as_str(), frame["channel"].as_str()),
            (Some("notice"), Some("tenant:acme"))
        );
        assert_eq!((frame["payload"]["n"].as_u64(), frame["from_user"].is_null()), (Some(1), true));
        assert_eq!(frame["message_id"], message_id.as_str());
        assert!(frame["offset"].is_u64(), "kept in the tenant's history: {frame}");
    }
    eve.expect_nothing_pending().await;

    let answer =
        publish(app, Some(KEY), &json!({"channel": "user:acme:alice", "type": "invoice.paid", "payload": 7}))
            .await;
    assert_eq!(answer.status, 200);
    assert_eq!(alice.next_json().await["type"], "invoice.paid");
    for other in [&mut bob, &mut eve] {
        other.expect_nothing_pending().await;
    }

    for channel in ["global:broadcast", "system:events"] {
        let answer =
            publish(app, Some(KEY), &json!({"channel": channel, "type": "maintenance", "payload": null}))
                .await;
        assert_eq!(answer.status, 200);
        for client in [&mut bob, &mut alice, &mut eve] {
            let frame = client.next_json().await;
            assert_eq!(
                (frame["type"].as_str(), frame["channel"].as_str()),
                (Some("maintenance"), Some(channel))
            );
        }
    }
}

#[tokio::test]
async fn bad_requests_are_refused_with_400_or_413_and_nothing_is_delivered() {
    let app = app_with_key().await;
    let mut bob = app.connect("bob", "acme").await;
    for body in [
        json!({"channel": "room:1", "type": "x", "payload": 1}),
        json!({"channel": "tenant:acme", "type": "welcome", "payload": 1}),
        json!({"channel": "tenant:acme", "type": "", "payload": 1}),
        json!({"channel": "tenant:acme", "type": "x"}),
        json!([1, 2]),
    ] {
        let answer = publish(&app, Some(KEY), &body).await;
        assert_eq!((answer.status, answer.body["code"].as_str()), (400, Some("bad_request")), "{body}");
    }
    let huge = json!({"channel": "tenant:acme", "type": "x", "payload": "x".repeat(1024 * 1024)});
    assert_eq!(publish(&app, Some(KEY), &huge).await.status, 413);
    bob.expect_nothing_pending().await;
}

async fn disconnect(app: &TestApp, key: Option<&str>, body: &Value) -> Answer {
    call(app, "/api/disconnect", key, body).await
}

#[tokio::test]
async fn a_disconnect_closes_every_connection_of_the_user_on_every_instance_with_4003() {
    use crate::redis_support::RedisServer;
    let redis = RedisServer::start();
    let apps = [
        spawn_on_redis(&redis.url(), &[("API_KEYS", KEY)]).await,
        spawn_on_redis(&redis.url(), &[("API_KEYS", KEY)]).await,
    ];
    let mut alice_a = apps[0].connect("alice", "acme").await;
    let mut alice_b = apps[1].connect("alice", "acme").await;
    let mut bob = apps[0].connect("bob", "acme").await;
    let mut other_alice = apps[1].connect("alice", "globex").await;

    let body = json!({"tenant_id": "acme", "user_id": "alice"});
    assert_eq!(disconnect(&apps[0], None, &body).await.status, 401);
    let answer = disconnect(&apps[0], Some(KEY), &body).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["instances"], 2, "both instances received the order");
    for alice in [&mut alice_a, &mut alice_b] {
        let close = alice.expect_close().await.expect("a close frame");
        assert_eq!(u16::from(close.code), 4003);
    }
    bob.expect_nothing_pending().await;
    other_alice.expect_nothing_pending().await;

    let bad = disconnect(&apps[0], Some(KEY), &json!({"tenant_id": "acme", "user_id": "a:b"})).await;
    assert_eq!((bad.status, bad.body["code"].as_str()), (400, Some("bad_request")));
}
