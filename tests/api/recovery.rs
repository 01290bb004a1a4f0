//! Positions and recovery as a client sees them: offsets on every tenant message, positions
//! in the welcome, missed messages replayed on reconnect with `since=`, and `recovered: false`
//! whenever the history cannot cover the gap.

use std::time::Duration;

use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::*;
use crate::redis_support::RedisServer;

/// Connects `bob` of `acme` with `query` appended after the token; returns the client and its
/// welcome.
async fn post(app: &TestApp, n: u64) {
    let answer = app.post_signed_webhook("github", "acme", ACME_SECRET, &json!({"n": n})).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
}

async fn next_n(client: &mut WsClient) -> u64 {
    let frame = client.next_json().await;
    frame["payload"]["data"]["n"].as_u64().unwrap_or_else(|| panic!("a numbered webhook, got {frame}"))
}

async fn recovery_round_trip(app: &TestApp) {
    let (mut client, welcome) = app.connect_with_query("bob", "acme", "").await;
    let positions = &welcome["payload"]["positions"];
    let start = &positions["tenant:acme"];
    assert!(start["offset"].is_u64() && start["epoch"].is_string(), "{welcome}");
    assert_eq!(positions["user:acme:bob"]["offset"], 0, "{welcome}");
    assert!(welcome["payload"].get("recovered").is_none());

    post(app, 1).await;
    let first = client.next_json().await;
    assert_eq!(first["offset"], start["offset"].as_u64().expect("offset") + 1);
    assert_eq!(first["epoch"], start["epoch"]);
    let last_seen = since_of(&first);
    client.close().await;

    // Missed while away: replayed after the welcome, in order, then live messages.
    for n in 2..=4 {
        post(app, n).await;
    }
    let user_since = format!("{}:0", positions["user:acme:bob"]["epoch"].as_str().expect("epoch"));
    let (mut client, welcome) =
        app.connect_with_query("bob", "acme", &format!("&since={last_seen}&user_since={user_since}")).await;
    assert_eq!(welcome["payload"]["recovered"], true, "{welcome}");
    assert_eq!(
        welcome["payload"]["positions"]["tenant:acme"]["offset"],
        first["offset"].as_u64().expect("o") + 3
    );
    for n in 2..=4 {
        assert_eq!(next_n(&mut client).await, n);
    }
    post(app, 5).await;
    assert_eq!(next_n(&mut client).await, 5);
    client.expect_nothing_pending().await;

    // A position of another epoch cannot be recovered: nothing partial is replayed.
    let (mut client, welcome) = app.connect_with_query("bob", "acme", "&since=another-epoch:1").await;
    assert_eq!(welcome["payload"]["recovered"], false, "{welcome}");
    client.expect_nothing_pending().await;
}

#[tokio::test]
async fn a_reconnecting_client_gets_what_it_missed_then_live_messages_in_process() {
    recovery_round_trip(&spawn_app().await).await;
}

#[tokio::test]
async fn a_reconnecting_client_gets_what_it_missed_then_live_messages_through_redis() {
    let redis = RedisServer::start();
    let app = spawn_on_redis(&redis.url(), &[]).await;
    recovery_round_trip(&app).await;
}

#[tokio::test]
async fn a_position_older_than_the_history_is_not_recovered() {
    let app = spawn_app_with(test_config(|vars| {
        vars.insert("HISTORY_SIZE".into(), "2".into());
    }))
    .await;
    let (client, welcome) = app.connect_with_query("bob", "acme", "").await;
    let start = welcome["payload"]["positions"]["tenant:acme"].clone();
    client.close().await;
    for n in 1..=3 {
        post(&app, n).await;
    }
    let epoch = start["epoch"].as_str().expect("epoch");
    // Offset 1 was trimmed: from 0 the gap cannot be covered; from 1 it can.
    let (mut client, welcome) = app.connect_with_query("bob", "acme", &format!("&since={epoch}:0")).await;
    assert_eq!(welcome["payload"]["recovered"], false);
    client.expect_nothing_pending().await;
    let (mut client, welcome) = app.connect_with_query("bob", "acme", &format!("&since={epoch}:1")).await;
    assert_eq!(welcome["payload"]["recovered"], true);
    assert_eq!((next_n(&mut client).await, next_n(&mut client).await), (2, 3));
    client.expect_nothing_pending().await;
}

#[tokio::test]
async fn with_history_off_there_are_no_positions_and_nothing_is_recovered() {
    let app = spawn_app_with(test_config(|vars| {
        vars.insert("HISTORY_SIZE".into(), "0".into());
    }))
    .await;
    let (mut client, welcome) = app.connect_with_query("bob", "acme", "&since=e:0").await;
    assert_eq!(welcome["payload"]["positions"], json!({}));
    assert_eq!(welcome["payload"]["recovered"], false);
    post(&app, 1).await;
    let frame = client.next_json().await;
    assert!(frame.get("offset").is_none() && frame.get("epoch").is_none(), "{frame}");
}

#[tokio::test]
async fn a_malformed_position_is_refused_with_400_before_the_upgrade() {
    let app = spawn_app().await;
    for query in ["&since=42", "&since=e:-1", "&user_since=e:x", "&since=", "&since=a%20b:1"] {
        let url = app.ws_url(&format!("?token={}{query}", token("bob", "acme")));
        let refused = WsClient::connect(url.into_client_request().expect("request")).await.err();
        let (status, body) = refused.unwrap_or_else(|| panic!("{query} was accepted"));
        assert_eq!(status, 400, "{query}");
        assert_eq!(body["code"], "invalid_position", "{query}: {body}");
    }
}

#[tokio::test]
async fn after_redis_loses_its_data_reconnecting_clients_are_told_and_a_new_epoch_begins() {
    let mut redis = RedisServer::start();
    let app = spawn_on_redis(&redis.url(), &[]).await;
    let (mut client, _) = app.connect_with_query("bob", "acme", "").await;
    post(&app, 1).await;
    let before = client.next_json().await;
    client.close().await;

    // Redis restarts without persistence: the history and the positions are gone.
    redis.kill();
    redis.restart();
    app.wait_ready(Duration::from_secs(10)).await;
    let (mut client, welcome) =
        app.connect_with_query("bob", "acme", &format!("&since={}", since_of(&before))).await;
    assert_eq!(welcome["payload"]["recovered"], false, "never a silent gap: {welcome}");
    let now = &welcome["payload"]["positions"]["tenant:acme"];
    assert_ne!(now["epoch"], before["epoch"]);
    post(&app, 2).await;
    let after = client.next_json().await;
    assert_eq!(after["payload"]["data"]["n"], 2);
    assert_eq!((after["epoch"].clone(), after["offset"].clone()), (now["epoch"].clone(), json!(1)));
}

#[tokio::test]
async fn clients_of_an_instance_that_missed_messages_are_closed_with_4009_and_recover_them() {
    use crate::proxy::FreezableProxy;
    let redis = RedisServer::start();
    let proxy = FreezableProxy::start(redis.port).await;
    let through_proxy = format!("redis://127.0.0.1:{}", proxy.port);
    let deaf = spawn_on_redis(&through_proxy, &[]).await;
    let healthy = spawn_on_redis(&redis.url(), &[]).await;
    let (mut client, _) = deaf.connect_with_query("bob", "acme", "").await;
    post(&healthy, 1).await;
    let first = client.next_json().await;
    assert_eq!(first["payload"]["data"]["n"], 1);

    // The deaf instance's Redis connections stop delivering without being closed; a message
    // published meanwhile through the other instance can never reach it live.
    proxy.freeze_existing();
    post(&healthy, 2).await;
    let started = std::time::Instant::now();
    client.patience = Duration::from_secs(15);
    let close = tokio::time::timeout(Duration::from_secs(15), client.expect_close())
        .await
        .expect("the client is told within 15 s")
        .expect("a close frame");
    assert_eq!(u16::from(close.code), 4009, "{close:?}");
    println!("missed messages detected and the client closed {:?} after the publish", started.elapsed());

    let (mut client, welcome) =
        healthy.connect_with_query("bob", "acme", &format!("&since={}", since_of(&first))).await;
    assert_eq!(welcome["payload"]["recovered"], true, "{welcome}");
    assert_eq!(next_n(&mut client).await, 2);
    client.expect_nothing_pending().await;
}
