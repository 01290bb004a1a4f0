//! Presence across instances: who is online, `presence.join` when a user's first connection
//! opens anywhere, `presence.leave` when the last one closes everywhere (to the connections that
//! asked with `presence=1`), and the users of a crashed instance leaving once their entries
//! expire.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;
use crate::redis_support::RedisServer;

const KEY: &str = "backend-api-key-0123456789";

async fn instance(redis_url: &str) -> TestApp {
    spawn_on_redis(redis_url, &[("API_KEYS", KEY), ("PRESENCE", "on")]).await
}

/// The next frame of `kind` (presence announcements interleave with other frames).
async fn next_of(client: &mut WsClient, kind: &str) -> Value {
    loop {
        let frame = client.next_json().await;
        if frame["type"] == kind {
            return frame;
        }
    }
}

/// The next `kind` announcement about `user`.
async fn announced(client: &mut WsClient, kind: &str, user: &str) -> Value {
    loop {
        let frame = next_of(client, kind).await;
        if frame["payload"]["user_id"] == user {
            return frame;
        }
    }
}

/// Connects `user` of `tenant` to `app`, asking for the tenant's presence announcements.
async fn watching(app: &TestApp, user: &str, tenant: &str) -> WsClient {
    app.connect_with_query(user, tenant, "&presence=1").await.0
}

async fn who(client: &mut WsClient) -> Value {
    client.send_json(&json!({"type": "presence"})).await;
    next_of(client, "presence").await["payload"]["users"].clone()
}

#[tokio::test]
async fn users_join_once_and_leave_only_when_their_last_connection_anywhere_closes() {
    let redis = RedisServer::start();
    let (a, b) = (instance(&redis.url()).await, instance(&redis.url()).await);
    let mut watcher = watching(&a, "watcher", "acme").await;
    let mut other_tenant = watching(&b, "watcher", "globex").await;
    let mut not_watching = a.connect("bystander", "acme").await;

    let alice_a = b.connect("alice", "acme").await;
    let joined = announced(&mut watcher, "presence.join", "alice").await;
    assert_eq!(
        (joined["payload"]["user_id"].as_str(), joined["channel"].as_str()),
        (Some("alice"), Some("presence:acme"))
    );
    let alice_b = a.connect("alice", "acme").await;
    assert_eq!(
        who(&mut watcher).await,
        json!([
            {"user_id": "alice", "connections": 2},
            {"user_id": "bystander", "connections": 1},
            {"user_id": "watcher", "connections": 1}
        ]),
        "a second connection, on another instance, is no second join"
    );
    let listed = reqwest::Client::new()
        .get(a.url("/api/tenants/acme/presence"))
        .header("authorization", format!("Bearer {KEY}"))
        .send()
        .await
        .expect("request");
    assert_eq!(listed.status(), 200);
    let listed: Value = listed.json().await.expect("json");
    assert_eq!(listed["users"][0], json!({"user_id": "alice", "connections": 2}));

    alice_a.close().await;
    // The instance records the close right after the handshake: ask until it has.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while who(&mut watcher).await[0] != json!({"user_id": "alice", "connections": 1}) {
        assert!(
            std::time::Instant::now() < deadline,
            "alice still on the other instance, with one connection"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    alice_b.close().await;
    announced(&mut watcher, "presence.leave", "alice").await;
    assert_eq!(
        who(&mut watcher).await,
        json!([{"user_id": "bystander", "connections": 1}, {"user_id": "watcher", "connections": 1}])
    );
    // Announcements stay within the tenant, and reach only those who asked.
    assert_eq!(who(&mut other_tenant).await, json!([{"user_id": "watcher", "connections": 1}]));
    other_tenant.expect_nothing_pending().await;
    not_watching.expect_nothing_pending().await;
}

#[tokio::test]
async fn presence_off_answers_the_frame_with_unsupported_and_the_api_with_404() {
    let app = spawn_app_with(test_config(|vars| {
        vars.insert("PRESENCE".into(), "off".into());
        vars.insert("API_KEYS".into(), KEY.into());
    }))
    .await;
    let mut client = app.connect("bob", "acme").await;
    client.send_json(&json!({"type": "presence"})).await;
    let error = client.next_json().await;
    assert_eq!(error["payload"]["code"], "unsupported", "{error}");
    let answer = reqwest::Client::new()
        .get(app.url("/api/tenants/acme/presence"))
        .header("authorization", format!("Bearer {KEY}"))
        .send()
        .await
        .expect("request");
    assert_eq!(answer.status(), 404);
    let unauthorized =
        reqwest::Client::new().get(app.url("/api/tenants/acme/presence")).send().await.expect("request");
    assert_eq!(unauthorized.status(), 401);
}

#[tokio::test]
async fn the_users_of_a_crashed_instance_leave_once_their_entries_expire() {
    use crate::process::start;
    let redis = RedisServer::start();
    let url = redis.url();
    let surviving = spawn_on_redis(&url, &[("PRESENCE_TTL_SECS", "3"), ("PRESENCE", "on")]).await;
    let secrets = json!({"acme": ACME_SECRET}).to_string();
    let crashing = start(&[
        ("REDIS_URL", &url),
        ("PRESENCE_TTL_SECS", "3"),
        ("WEBHOOK_SECRETS", &secrets),
        ("PRESENCE", "on"),
    ])
    .await;
    let mut watcher = watching(&surviving, "watcher", "acme").await;
    let request = format!("ws://{}/ws?token={}", crashing.addr, token("alice", "acme"));
    let request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(request)
        .expect("request");
    let mut alice = WsClient::connect(request).await.expect("connected");
    assert_eq!(alice.next_json().await["type"], "welcome");
    announced(&mut watcher, "presence.join", "alice").await;

    crashing.signal("KILL");
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), announced(&mut watcher, "presence.leave", "alice"))
        .await
        .expect("the leave within 10 s");
    println!("a crashed instance's user left {:?} after the crash", started.elapsed());
}
