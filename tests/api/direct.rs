//! Direct messages: a client frame `direct` reaches every connection of the named user in the
//! sender's tenant, on every instance, and no one else; it is kept in the user channel's
//! history like any other message.

use serde_json::json;

use crate::helpers::*;
use crate::redis_support::RedisServer;

async fn instance(redis_url: &str) -> TestApp {
    spawn_on_redis(redis_url, &[]).await
}

#[tokio::test]
async fn a_direct_message_reaches_every_connection_of_the_user_on_every_instance_and_no_one_else() {
    let redis = RedisServer::start();
    let (a, b) = (instance(&redis.url()).await, instance(&redis.url()).await);
    let mut bob = a.connect("bob", "acme").await;
    let mut alice_a = a.connect("alice", "acme").await;
    let mut alice_b = b.connect("alice", "acme").await;
    let mut other_alice = b.connect("alice", "globex").await;
    let mut carol = b.connect("carol", "acme").await;

    bob.send_json(&json!({"type": "direct", "to_user": "alice", "payload": {"text": "psst"}})).await;
    for alice in [&mut alice_a, &mut alice_b] {
        let frame = alice.next_json().await;
        assert_eq!(frame["type"], "direct", "{frame}");
        assert_eq!(frame["from_user"], "bob");
        assert_eq!(frame["channel"], "user:acme:alice");
        assert_eq!(frame["payload"], json!({"text": "psst"}));
        assert_eq!(frame["offset"], 1, "kept in the user channel's history");
    }
    for nobody in [&mut bob, &mut other_alice, &mut carol] {
        nobody.expect_nothing_pending().await;
    }

    // A recipient id that could reach another tenant is refused.
    bob.send_json(&json!({"type": "direct", "to_user": "globex:alice", "payload": 1})).await;
    let error = bob.next_json().await;
    assert_eq!(
        (error["type"].as_str(), error["payload"]["code"].as_str()),
        (Some("error"), Some("bad_request"))
    );
    other_alice.expect_nothing_pending().await;
}

#[tokio::test]
async fn a_direct_message_sent_while_the_user_was_away_is_recovered_with_user_since() {
    let app = spawn_app().await;
    let alice = app.connect_with_welcome("alice", "acme").await;
    let position = &alice.1["payload"]["positions"]["user:acme:alice"];
    let since = since_of(position);
    alice.0.close().await;
    let mut bob = app.connect("bob", "acme").await;
    bob.send_json(&json!({"type": "direct", "to_user": "alice", "payload": "while you were away"})).await;
    bob.expect_nothing_pending().await;

    let (mut alice, welcome) = app.connect_with_query("alice", "acme", &format!("&user_since={since}")).await;
    assert_eq!(welcome["payload"]["recovered"], true);
    let missed = alice.next_json().await;
    assert_eq!(
        (missed["type"].as_str(), missed["payload"].as_str()),
        (Some("direct"), Some("while you were away"))
    );
}
