//! Topics: channels clients choose. Subscribing and unsubscribing, the permissions of the token
//! (`caps`, subscription tokens), tenant isolation, recovery with `since` per subscription,
//! presence per topic, and the server API's side — over both transports, and across instances
//! joined by a real Redis.

use serde_json::{Value, json};

use crate::helpers::*;
use crate::redis_support::RedisServer;
use crate::transport::{Client, Transport};

const KEY: &str = "topics-api-key-0123456789";

/// Caps that allow everything on every topic.
fn all_caps() -> Value {
    json!({"caps": [{"channels": ["*"], "allow": ["sub", "pub", "presence", "history"]}]})
}

async fn app(vars: &[(&str, &str)]) -> TestApp {
    let mut all = vec![("API_KEYS", KEY)];
    all.extend_from_slice(vars);
    spawn_ready(&all).await
}

/// `user` of `tenant` connected over `t` with `claims` added to its token.
async fn open(app: &TestApp, t: Transport, user: &str, tenant: &str, claims: &Value) -> Client {
    let (client, welcome) =
        app.open_with_token(t, &token_with(user, tenant, claims), "", &[]).await.expect("connected");
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    client
}

/// Subscribes to `name` with the extra fields of `frame`; returns the `subscribed` frame.
async fn subscribe(client: &mut Client, name: &str, frame: Value) -> Value {
    let mut subscribe = json!({"type": "subscribe", "channel": name});
    if let (Some(all), Some(extra)) = (subscribe.as_object_mut(), frame.as_object()) {
        all.extend(extra.clone());
    }
    client.send_json(&subscribe).await;
    let answer = client.next_json().await;
    assert_eq!(answer["type"], "subscribed", "{answer}");
    answer
}

/// Sends `frame` and returns the error it is answered with.
async fn refused(client: &mut Client, frame: Value) -> Value {
    client.send_json(&frame).await;
    let answer = client.next_json().await;
    assert_eq!(answer["type"], "error", "{frame} answered {answer}");
    answer["payload"].clone()
}

async fn publish(app: &TestApp, channel: &str, n: u64) {
    let answer = app
        .http
        .post(app.url("/api/publish"))
        .bearer_auth(KEY)
        .json(&json!({"channel": channel, "type": "order", "payload": {"n": n}}))
        .send()
        .await
        .expect("published");
    assert_eq!(answer.status(), 200, "{:?}", answer.text().await);
}

/// The `n` of the next frame, which must be a message of `channel`.
async fn next_n(client: &mut Client, channel: &str) -> u64 {
    let frame = client.next_json().await;
    assert_eq!(frame["channel"], channel, "{frame}");
    frame["payload"]["n"].as_u64().unwrap_or_else(|| panic!("a numbered message, got {frame}"))
}

async fn a_subscriber_receives_its_topics_messages_and_nothing_of_the_others(t: Transport) {
    let app = app(&[]).await;
    let mut bob = open(&app, t, "bob", "acme", &all_caps()).await;
    let mut eve = open(&app, t, "eve", "acme", &all_caps()).await;
    let subscribed = subscribe(&mut bob, "orders", json!({})).await;
    assert_eq!(subscribed["channel"], "topic:acme:orders");
    assert_eq!(subscribed["payload"]["position"]["offset"], 0, "{subscribed}");
    subscribe(&mut eve, "chat.lobby", json!({})).await;

    publish(&app, "topic:acme:orders", 1).await;
    assert_eq!(next_n(&mut bob, "topic:acme:orders").await, 1);
    eve.send_json(&json!({"type": "message", "channel": "orders", "payload": {"n": 2}})).await;
    let frame = bob.next_json().await;
    assert_eq!((frame["from_user"].as_str(), frame["offset"].as_u64()), (Some("eve"), Some(2)), "{frame}");
    // Neither the tenant's messages nor another topic's reach a subscriber through its topic.
    publish(&app, "topic:acme:chat.lobby", 3).await;
    assert_eq!(next_n(&mut eve, "topic:acme:chat.lobby").await, 3);
    bob.expect_nothing_pending().await;
    eve.expect_nothing_pending().await;
}

async fn a_token_without_the_cap_is_refused_and_changes_nothing(t: Transport) {
    let app = app(&[]).await;
    let only_chat = json!({"caps": [{"channels": ["chat.*"], "allow": ["sub"]}]});
    let mut carl = open(&app, t, "carl", "acme", &only_chat).await;
    let error = refused(&mut carl, json!({"type": "subscribe", "channel": "orders"})).await;
    assert_eq!(
        (error["code"].as_str(), error["channel"].as_str()),
        (Some("forbidden"), Some("topic:acme:orders"))
    );
    let error = refused(&mut carl, json!({"type": "message", "channel": "chat.x", "payload": 1})).await;
    assert_eq!(error["code"], "forbidden", "sub does not allow pub");
    let error = refused(&mut carl, json!({"type": "subscribe", "channel": "chat.x", "presence": true})).await;
    assert_eq!(error["code"], "forbidden", "nor presence");
    let mut plain = open(&app, t, "dan", "acme", &json!({})).await;
    let error = refused(&mut plain, json!({"type": "subscribe", "channel": "chat.x"})).await;
    assert_eq!(error["code"], "forbidden", "no caps: no topic");
    publish(&app, "topic:acme:orders", 1).await;
    carl.expect_nothing_pending().await;
    // What the caps allow still works.
    subscribe(&mut carl, "chat.x", json!({})).await;
}

async fn refusals_name_the_problem(t: Transport) {
    let app = app(&[("MAX_SUBSCRIPTIONS_PER_CONNECTION", "1")]).await;
    let mut bob = open(&app, t, "bob", "acme", &all_caps()).await;
    for bad in ["topic:acme:orders", "a b", "", "x".repeat(129).as_str()] {
        let error = refused(&mut bob, json!({"type": "subscribe", "channel": bad})).await;
        assert_eq!(error["code"], "invalid_channel", "{bad:?}: {error}");
    }
    let error = refused(&mut bob, json!({"type": "unsubscribe"})).await;
    assert_eq!(error["code"], "invalid_channel");
    let error = refused(&mut bob, json!({"type": "subscribe", "channel": "a", "since": "nope"})).await;
    assert_eq!(error["code"], "bad_request");
    subscribe(&mut bob, "a", json!({})).await;
    let error = refused(&mut bob, json!({"type": "subscribe", "channel": "a"})).await;
    assert_eq!(error["code"], "already_subscribed");
    let error = refused(&mut bob, json!({"type": "subscribe", "channel": "b"})).await;
    assert_eq!(error["code"], "limit", "{error}");
}

async fn the_same_topic_name_in_two_tenants_never_crosses(t: Transport) {
    let app = app(&[]).await;
    let mut acme = open(&app, t, "bob", "acme", &all_caps()).await;
    let mut globex = open(&app, t, "bob", "globex", &all_caps()).await;
    subscribe(&mut acme, "orders", json!({})).await;
    subscribe(&mut globex, "orders", json!({})).await;
    acme.send_json(&json!({"type": "message", "channel": "orders", "payload": {"n": 1}})).await;
    assert_eq!(next_n(&mut acme, "topic:acme:orders").await, 1);
    publish(&app, "topic:globex:orders", 2).await;
    assert_eq!(next_n(&mut globex, "topic:globex:orders").await, 2);
    acme.expect_nothing_pending().await;
    globex.expect_nothing_pending().await;
}

async fn a_subscription_with_since_gets_what_it_missed_then_live_messages(t: Transport) {
    let app = app(&[]).await;
    let mut bob = open(&app, t, "bob", "acme", &all_caps()).await;
    let subscribed = subscribe(&mut bob, "orders", json!({})).await;
    let epoch = subscribed["payload"]["position"]["epoch"].as_str().expect("epoch").to_owned();
    publish(&app, "topic:acme:orders", 1).await;
    assert_eq!(next_n(&mut bob, "topic:acme:orders").await, 1);
    bob.send_json(&json!({"type": "unsubscribe", "channel": "orders"})).await;
    let ended = bob.next_json().await;
    assert_eq!(
        (ended["type"].as_str(), ended["payload"]["reason"].as_str()),
        (Some("unsubscribed"), Some("requested"))
    );
    for n in 2..=3 {
        publish(&app, "topic:acme:orders", n).await;
    }
    bob.expect_nothing_pending().await;
    let resumed = subscribe(&mut bob, "orders", json!({"since": format!("{epoch}:1")})).await;
    assert_eq!(resumed["payload"]["recovered"], true, "{resumed}");
    assert_eq!(resumed["payload"]["position"]["offset"], 3);
    for n in 2..=3 {
        assert_eq!(next_n(&mut bob, "topic:acme:orders").await, n);
    }
    publish(&app, "topic:acme:orders", 4).await;
    assert_eq!(next_n(&mut bob, "topic:acme:orders").await, 4);
    // Out of reach: told so, and nothing partial.
    let mut eve = open(&app, t, "eve", "acme", &all_caps()).await;
    let lost = subscribe(&mut eve, "orders", json!({"since": "another-epoch:1"})).await;
    assert_eq!(lost["payload"]["recovered"], false);
    eve.expect_nothing_pending().await;
}

async fn topic_presence_reaches_only_the_subscribers_who_asked(t: Transport) {
    let app = app(&[]).await;
    let mut bob = open(&app, t, "bob", "acme", &all_caps()).await;
    let mut eve = open(&app, t, "eve", "acme", &all_caps()).await;
    let mut alice = open(&app, t, "alice", "acme", &all_caps()).await;
    subscribe(&mut bob, "room", json!({"presence": true})).await;
    let own = bob.next_of("presence.join").await;
    assert_eq!(
        (own["channel"].as_str(), own["payload"]["user_id"].as_str()),
        (Some("presence:acme:room"), Some("bob"))
    );
    subscribe(&mut eve, "room", json!({})).await;
    subscribe(&mut alice, "room", json!({"presence": true})).await;
    let joined = bob.next_of("presence.join").await;
    assert_eq!(joined["payload"]["user_id"], "alice");
    bob.send_json(&json!({"type": "presence", "channel": "room"})).await;
    let listed = bob.next_of("presence").await;
    assert_eq!(listed["channel"], "topic:acme:room");
    let users: Vec<&str> = listed["payload"]["users"]
        .as_array()
        .expect("users")
        .iter()
        .filter_map(|u| u["user_id"].as_str())
        .collect();
    assert_eq!(users, ["alice", "bob"], "eve subscribed without presence");
    alice.send_json(&json!({"type": "unsubscribe", "channel": "room"})).await;
    let left = bob.next_of("presence.leave").await;
    assert_eq!(left["payload"]["user_id"], "alice");
    eve.expect_nothing_pending().await;
}

async fn a_subscription_token_grants_a_topic_the_caps_do_not(t: Transport) {
    let app = app(&[]).await;
    let mut bob = open(&app, t, "bob", "acme", &json!({})).await;
    let grant = token_with("bob", "acme", &json!({"channel": "orders", "allow": ["sub", "pub"]}));
    subscribe(&mut bob, "orders", json!({"token": grant})).await;
    bob.send_json(&json!({"type": "message", "channel": "orders", "payload": {"n": 1}})).await;
    assert_eq!(next_n(&mut bob, "topic:acme:orders").await, 1);
    let others = [
        token_with("bob", "acme", &json!({"channel": "orders"})),
        token_with("eve", "acme", &json!({"channel": "billing"})),
        token_with("bob", "globex", &json!({"channel": "billing"})),
        "not.a.token".to_owned(),
    ];
    for token in others {
        let error =
            refused(&mut bob, json!({"type": "subscribe", "channel": "billing", "token": token})).await;
        assert_eq!(error["code"], "forbidden", "{error}");
    }
}

async fn the_server_api_and_a_narrower_refresh_end_subscriptions(t: Transport) {
    let app = app(&[]).await;
    let mut bob = open(&app, t, "bob", "acme", &all_caps()).await;
    subscribe(&mut bob, "orders", json!({})).await;
    subscribe(&mut bob, "news", json!({})).await;
    let answer = app
        .http
        .post(app.url("/api/unsubscribe"))
        .bearer_auth(KEY)
        .json(&json!({"tenant_id": "acme", "user_id": "bob", "channel": "orders"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(answer.status(), 200);
    let ended = bob.next_json().await;
    assert_eq!(
        (ended["type"].as_str(), ended["channel"].as_str(), ended["payload"]["reason"].as_str()),
        (Some("unsubscribed"), Some("topic:acme:orders"), Some("server"))
    );
    let narrower = token_with("bob", "acme", &json!({"caps": [{"channels": ["orders"], "allow": ["sub"]}]}));
    bob.send_json(&json!({"type": "refresh", "token": narrower})).await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let frame = bob.next_json().await;
        seen.push((
            frame["type"].as_str().unwrap_or_default().to_owned(),
            frame["payload"]["reason"].clone(),
        ));
    }
    assert!(seen.contains(&("unsubscribed".to_owned(), json!("revoked"))), "{seen:?}");
    assert!(seen.iter().any(|(kind, _)| kind == "refreshed"), "{seen:?}");
    publish(&app, "topic:acme:news", 1).await;
    bob.expect_nothing_pending().await;
}

over_every_transport!(
    a_subscriber_receives_its_topics_messages_and_nothing_of_the_others,
    a_token_without_the_cap_is_refused_and_changes_nothing,
    refusals_name_the_problem,
    the_same_topic_name_in_two_tenants_never_crosses,
    a_subscription_with_since_gets_what_it_missed_then_live_messages,
    topic_presence_reaches_only_the_subscribers_who_asked,
    a_subscription_token_grants_a_topic_the_caps_do_not,
    the_server_api_and_a_narrower_refresh_end_subscriptions,
    a_subscription_that_missed_messages_is_ended_with_resubscribe_and_recovers_with_since,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_and_their_presence_cross_instances_through_redis() {
    let redis = RedisServer::start();
    let vars = [("API_KEYS", KEY)];
    let (a, b) = (spawn_on_redis(&redis.url(), &vars).await, spawn_on_redis(&redis.url(), &vars).await);
    let mut bob = open(&a, Transport::WebSocket, "bob", "acme", &all_caps()).await;
    let mut eve = open(&b, Transport::Sse, "eve", "acme", &all_caps()).await;
    let mut outsider = open(&b, Transport::WebSocket, "bob", "globex", &all_caps()).await;
    subscribe(&mut bob, "orders", json!({"presence": true})).await;
    subscribe(&mut eve, "orders", json!({"presence": true})).await;
    subscribe(&mut outsider, "orders", json!({})).await;
    let joined = loop {
        let frame = bob.next_of("presence.join").await;
        if frame["payload"]["user_id"] == "eve" {
            break frame;
        }
    };
    assert_eq!(joined["channel"], "presence:acme:orders");
    eve.send_json(&json!({"type": "message", "channel": "orders", "payload": {"n": 1}})).await;
    assert_eq!(next_n(&mut bob, "topic:acme:orders").await, 1);
    let listed: Value = a
        .http
        .get(a.url("/api/channels/topic%3Aacme%3Aorders/presence"))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("listed")
        .json()
        .await
        .expect("JSON");
    assert_eq!(
        listed["users"],
        json!([{"user_id": "bob", "connections": 1}, {"user_id": "eve", "connections": 1}])
    );
    outsider.expect_nothing_pending().await;
}

async fn a_subscription_that_missed_messages_is_ended_with_resubscribe_and_recovers_with_since(t: Transport) {
    use crate::proxy::FreezableProxy;
    let redis = RedisServer::start();
    let proxy = FreezableProxy::start(redis.port).await;
    let vars = [("API_KEYS", KEY)];
    let deaf = spawn_on_redis(&format!("redis://127.0.0.1:{}", proxy.port), &vars).await;
    let healthy = spawn_on_redis(&redis.url(), &vars).await;
    let mut bob = open(&deaf, t, "bob", "acme", &all_caps()).await;
    let subscribed = subscribe(&mut bob, "orders", json!({})).await;
    let epoch = subscribed["payload"]["position"]["epoch"].as_str().expect("epoch").to_owned();
    publish(&healthy, "topic:acme:orders", 1).await;
    assert_eq!(next_n(&mut bob, "topic:acme:orders").await, 1);
    // The deaf instance's Redis connections stop delivering without being closed.
    proxy.freeze_existing();
    publish(&healthy, "topic:acme:orders", 2).await;
    bob.set_patience(std::time::Duration::from_secs(15));
    let ended = loop {
        let frame = bob.next_data_or_close().await.expect("the connection stays open");
        if frame["type"] == "unsubscribed" {
            break frame;
        }
        assert_ne!(frame["channel"], "topic:acme:orders", "nothing of the topic out of order: {frame}");
    };
    assert_eq!(ended["payload"], json!({"reason": "missed_messages", "resubscribe": true}));
    bob.set_patience(PATIENCE);
    let resumed = subscribe(&mut bob, "orders", json!({"since": format!("{epoch}:1")})).await;
    assert_eq!(resumed["payload"]["recovered"], true, "{resumed}");
    assert_eq!(next_n(&mut bob, "topic:acme:orders").await, 2);
    bob.expect_nothing_pending().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscription_gauges_follow_the_subscriptions() {
    let app = app(&[]).await;
    let mut bob = open(&app, Transport::WebSocket, "bob", "acme", &all_caps()).await;
    let mut eve = open(&app, Transport::Sse, "eve", "acme", &all_caps()).await;
    subscribe(&mut bob, "orders", json!({})).await;
    subscribe(&mut bob, "news", json!({})).await;
    subscribe(&mut eve, "orders", json!({})).await;
    let gauges = async |subscriptions: f64, channels: f64| {
        eventually(PATIENCE, "the gauges", async || {
            let metrics = scrape(&app).await;
            value(&metrics, "lq_subscriptions") == subscriptions
                && value(&metrics, "lq_subscribed_channels") == channels
        })
        .await;
    };
    // tenant:acme, two user channels, two topics, global:broadcast and system:events.
    gauges(3.0, 7.0).await;
    bob.send_json(&json!({"type": "unsubscribe", "channel": "news"})).await;
    gauges(2.0, 6.0).await;
    bob.close().await;
    eve.close().await;
    gauges(0.0, 2.0).await;
}
