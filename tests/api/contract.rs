//! The client contract, proven over every transport by one suite: each test below is written
//! once against [`Client`] and runs over WebSocket and over Server-Sent Events (the
//! `websocket` and `sse` modules at the end).

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;
use crate::redis_support::RedisServer;
use crate::transport::{Client, Transport};

const KEY: &str = "contract-api-key-0123456789";

async fn post(app: &TestApp, n: u64) {
    let answer = app.post_signed_webhook("github", "acme", ACME_SECRET, &json!({"n": n})).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
}

async fn next_n(client: &mut Client) -> u64 {
    let frame = client.next_json().await;
    frame["payload"]["data"]["n"].as_u64().unwrap_or_else(|| panic!("a numbered webhook, got {frame}"))
}

async fn the_welcome_names_the_connection_and_where_its_channels_stand(t: Transport) {
    let app = spawn_app().await;
    let (_client, welcome) = app.open(t, "bob", "acme").await;
    let payload = &welcome["payload"];
    assert_eq!((payload["user_id"].as_str(), payload["tenant_id"].as_str()), (Some("bob"), Some("acme")));
    assert!(payload["connection_id"].as_str().is_some_and(|id| !id.is_empty()), "{welcome}");
    assert!(payload["positions"]["tenant:acme"]["epoch"].is_string(), "{welcome}");
    assert_eq!(payload["positions"]["user:acme:bob"]["offset"], 0, "{welcome}");
}

async fn a_webhook_reaches_every_connection_of_its_tenant_and_no_other(t: Transport) {
    let app = spawn_app().await;
    let (mut bob, _) = app.open(t, "bob", "acme").await;
    let (mut eve, _) = app.open(t, "eve", "acme").await;
    let (mut outsider, _) = app.open(t, "bob", "globex").await;
    post(&app, 7).await;
    for client in [&mut bob, &mut eve] {
        let frame = client.next_json().await;
        assert_eq!(
            (frame["type"].as_str(), frame["channel"].as_str()),
            (Some("webhook"), Some("tenant:acme"))
        );
        assert_eq!(frame["payload"]["data"]["n"], 7);
    }
    outsider.expect_nothing_pending().await;
}

async fn a_client_message_reaches_its_whole_tenant_sender_included(t: Transport) {
    let app = spawn_app().await;
    let (mut sender, _) = app.open(t, "bob", "acme").await;
    let (mut reader, _) = app.open(Transport::WebSocket, "eve", "acme").await;
    let (mut outsider, _) = app.open(t, "eve", "globex").await;
    sender.send_json(&json!({"type": "message", "payload": {"text": "hi"}})).await;
    for client in [&mut sender, &mut reader] {
        let frame = client.next_json().await;
        assert_eq!(frame["type"], "message");
        assert_eq!(
            (frame["from_user"].as_str(), frame["payload"]["text"].as_str()),
            (Some("bob"), Some("hi"))
        );
    }
    outsider.expect_nothing_pending().await;
}

async fn a_direct_message_reaches_only_the_named_user_of_the_senders_tenant(t: Transport) {
    let app = spawn_app().await;
    let (mut sender, _) = app.open(t, "bob", "acme").await;
    let (mut alice, _) = app.open(t, "alice", "acme").await;
    let (mut eve, _) = app.open(t, "eve", "acme").await;
    let (mut other_alice, _) = app.open(t, "alice", "globex").await;
    sender.send_json(&json!({"type": "direct", "to_user": "alice", "payload": {"secret": 1}})).await;
    let frame = alice.next_json().await;
    assert_eq!(
        (frame["type"].as_str(), frame["channel"].as_str()),
        (Some("direct"), Some("user:acme:alice"))
    );
    assert_eq!(frame["from_user"], "bob");
    for client in [&mut sender, &mut eve, &mut other_alice] {
        client.expect_nothing_pending().await;
    }
}

async fn presence_announces_joins_and_leaves_to_those_who_asked_and_lists_who_is_online(t: Transport) {
    let app = spawn_ready(&[("PRESENCE", "on")]).await;
    let (mut bob, _) = app.open_with(t, "bob", "acme", "&presence=1", &[]).await.expect("connected");
    let (mut eve, _) = app.open(t, "eve", "acme").await;
    let (alice, _) = app.open(t, "alice", "acme").await;
    let joined = bob.next_of("presence.join").await;
    assert_eq!(
        (joined["channel"].as_str(), joined["payload"]["user_id"].as_str()),
        (Some("presence:acme"), Some("bob"))
    );
    announced(&mut bob, "presence.join", "alice").await;
    bob.send_json(&json!({"type": "presence"})).await;
    let listed = bob.next_of("presence").await;
    let users: Vec<&str> = listed["payload"]["users"]
        .as_array()
        .expect("users")
        .iter()
        .filter_map(|u| u["user_id"].as_str())
        .collect();
    assert_eq!(users, ["alice", "bob", "eve"], "{listed}");
    alice.close().await;
    announced(&mut bob, "presence.leave", "alice").await;
    eve.expect_nothing_pending().await;
}

/// Waits for the announcement `kind` of `user` (others, such as the client's own join, are
/// skipped).
async fn announced(client: &mut Client, kind: &str, user: &str) {
    while client.next_of(kind).await["payload"]["user_id"] != user {}
}

async fn recovery(t: Transport, app: &TestApp) {
    let (mut client, welcome) = app.open(t, "bob", "acme").await;
    assert!(welcome["payload"].get("recovered").is_none());
    post(app, 1).await;
    assert_eq!(next_n(&mut client).await, 1);
    // Missed while away: replayed after the welcome, in order, then live messages.
    let (away, _) = (client, ());
    for n in 2..=4 {
        post(app, n).await;
    }
    let (mut client, welcome) = app.resume(&away, "bob", "acme").await;
    away.close().await;
    assert_eq!(welcome["payload"]["recovered"], true, "{welcome}");
    for n in 2..=4 {
        assert_eq!(next_n(&mut client).await, n);
    }
    post(app, 5).await;
    assert_eq!(next_n(&mut client).await, 5);
    client.expect_nothing_pending().await;

    // A position of another epoch cannot be recovered: nothing partial is replayed.
    let unreachable = [("Last-Event-ID", "since=another-epoch:1")];
    let (query, headers): (&str, &[(&str, &str)]) = match t {
        Transport::WebSocket => ("&since=another-epoch:1", &[]),
        Transport::Sse => ("", &unreachable),
    };
    let (mut client, welcome) = app.open_with(t, "bob", "acme", query, headers).await.expect("connected");
    assert_eq!(welcome["payload"]["recovered"], false, "{welcome}");
    client.expect_nothing_pending().await;
}

async fn a_reconnecting_client_gets_what_it_missed_then_live_messages(t: Transport) {
    recovery(t, &spawn_app().await).await;
}

async fn a_reconnecting_client_gets_what_it_missed_then_live_messages_through_redis(t: Transport) {
    let redis = RedisServer::start();
    recovery(t, &spawn_on_redis(&redis.url(), &[]).await).await;
}

async fn a_client_of_an_instance_that_stops_recovers_on_another_without_gap_or_repeat(t: Transport) {
    let redis = RedisServer::start();
    let stopping = spawn_on_redis(&redis.url(), &[]).await;
    let staying = spawn_on_redis(&redis.url(), &[]).await;
    let (mut client, _) = stopping.open(t, "bob", "acme").await;
    post(&staying, 1).await;
    assert_eq!(next_n(&mut client).await, 1);
    stopping.shutdown().await;
    assert_eq!(client.expect_close().await, 1001, "going away");
    for n in 2..=3 {
        post(&staying, n).await;
    }
    let (mut resumed, welcome) = staying.resume(&client, "bob", "acme").await;
    assert_eq!(welcome["payload"]["recovered"], true, "{welcome}");
    for n in 2..=3 {
        assert_eq!(next_n(&mut resumed).await, n);
    }
    resumed.expect_nothing_pending().await;
}

async fn a_refresh_extends_the_connection_and_a_bad_one_changes_nothing(t: Transport) {
    let app = spawn_app().await;
    let (mut client, _) = app.open(t, "bob", "acme").await;
    client.send_json(&json!({"type": "refresh", "token": token("bob", "acme")})).await;
    let refreshed = client.next_json().await;
    assert_eq!(refreshed["type"], "refreshed", "{refreshed}");
    assert!(refreshed["payload"]["exp"].as_u64().is_some_and(|exp| exp > now_secs()), "{refreshed}");
    client.send_json(&json!({"type": "refresh", "token": token("eve", "acme")})).await;
    let refused = client.next_json().await;
    assert_eq!(
        (refused["type"].as_str(), refused["payload"]["code"].as_str()),
        (Some("error"), Some("forbidden"))
    );
    client.send_json(&json!({"type": "refresh", "token": "not.a.token"})).await;
    assert_eq!(client.next_json().await["payload"]["code"], "unauthorized");
    client.expect_nothing_pending().await;
}

async fn malformed_frames_are_answered_with_bad_request_and_the_connection_stays(t: Transport) {
    let app = spawn_app().await;
    let (mut client, _) = app.open(t, "bob", "acme").await;
    for frame in [json!("just a string"), json!({"type": "shout"}), json!({"type": "message"})] {
        client.send_json(&frame).await;
        let error = client.next_json().await;
        assert_eq!(
            (error["type"].as_str(), error["payload"]["code"].as_str()),
            (Some("error"), Some("bad_request"))
        );
    }
    client.expect_nothing_pending().await;
}

async fn a_user_disconnected_by_the_server_api_is_closed_with_4003(t: Transport) {
    let app = spawn_ready(&[("API_KEYS", KEY)]).await;
    let (mut bob, _) = app.open(t, "bob", "acme").await;
    let (mut eve, _) = app.open(t, "eve", "acme").await;
    let answer = app
        .http
        .post(app.url("/api/disconnect"))
        .bearer_auth(KEY)
        .json(&json!({"tenant_id": "acme", "user_id": "bob"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(answer.status().as_u16(), 200);
    assert_eq!(bob.expect_close().await, 4003);
    eve.expect_nothing_pending().await;
}

async fn a_client_that_stops_reading_is_closed_with_4008(t: Transport) {
    let app = spawn_ready(&[("OUTBOUND_QUEUE_BYTES", "65536")]).await;
    let mut slow = match t {
        Transport::WebSocket => {
            let url = app.ws_url(&format!("?token={}", token("slow", "acme")));
            let socket = WsClient::connect_with_small_buffer(&url, 4096).await;
            let mut slow = Client::Ws { socket, since: None, user_since: None };
            assert_eq!(slow.next_json().await["type"], "welcome");
            slow
        }
        Transport::Sse => {
            Client::open_sse(app.addr, &app.http, "slow", "acme", "", &[], Some(4096)).await.expect("open").0
        }
    };
    let filler = "x".repeat(8 * 1024);
    // Well past what the client's buffers, the server's socket buffer and the 64 KiB queue hold.
    for n in 0..200 {
        post_filled(&app, n, &filler).await;
    }
    assert_eq!(slow.expect_close().await, 4008);
}

async fn post_filled(app: &TestApp, n: u64, filler: &str) {
    let answer =
        app.post_signed_webhook("github", "acme", ACME_SECRET, &json!({"n": n, "filler": filler})).await;
    assert_eq!(answer.status, 200);
}

async fn clients_of_an_instance_that_missed_messages_are_closed_with_4009_and_recover_them(t: Transport) {
    use crate::proxy::FreezableProxy;
    let redis = RedisServer::start();
    let proxy = FreezableProxy::start(redis.port).await;
    let deaf = spawn_on_redis(&format!("redis://127.0.0.1:{}", proxy.port), &[]).await;
    let healthy = spawn_on_redis(&redis.url(), &[]).await;
    let (mut client, _) = deaf.open(t, "bob", "acme").await;
    post(&healthy, 1).await;
    assert_eq!(next_n(&mut client).await, 1);
    // The deaf instance's Redis connections stop delivering without being closed: a message
    // published meanwhile never reaches it live.
    proxy.freeze_existing();
    post(&healthy, 2).await;
    assert_eq!(client.expect_close_within(Duration::from_secs(15)).await, 4009);
    let (mut resumed, welcome) = healthy.resume(&client, "bob", "acme").await;
    assert_eq!(welcome["payload"]["recovered"], true, "{welcome}");
    assert_eq!(next_n(&mut resumed).await, 2);
    resumed.expect_nothing_pending().await;
}

async fn refusals_are_answered_before_anything_is_streamed(t: Transport) {
    let app = spawn_app().await;
    let refused = |query: &'static str| {
        let app = &app;
        async move {
            match t {
                Transport::WebSocket => WsClient::connect(
                    tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                        app.ws_url(query),
                    )
                    .expect("request"),
                )
                .await
                .err(),
                Transport::Sse => {
                    crate::sse_client::SseClient::open(app.addr, &format!("/sse{query}"), &[], None)
                        .await
                        .err()
                }
            }
            .expect("refused")
        }
    };
    let (status, body) = refused("").await;
    assert_eq!((status, body["code"].as_str()), (401, Some("unauthorized")));
    let (status, body) = refused("?token=a.b.c").await;
    assert_eq!((status, body["code"].as_str()), (401, Some("unauthorized")));
    let (status, body) = refused("?since=nope").await;
    assert_eq!((status, body["code"].as_str()), (400, Some("invalid_position")));
    let _: Value = body;
}

over_every_transport!(
    the_welcome_names_the_connection_and_where_its_channels_stand,
    a_webhook_reaches_every_connection_of_its_tenant_and_no_other,
    a_client_message_reaches_its_whole_tenant_sender_included,
    a_direct_message_reaches_only_the_named_user_of_the_senders_tenant,
    presence_announces_joins_and_leaves_to_those_who_asked_and_lists_who_is_online,
    a_reconnecting_client_gets_what_it_missed_then_live_messages,
    a_reconnecting_client_gets_what_it_missed_then_live_messages_through_redis,
    a_client_of_an_instance_that_stops_recovers_on_another_without_gap_or_repeat,
    a_refresh_extends_the_connection_and_a_bad_one_changes_nothing,
    malformed_frames_are_answered_with_bad_request_and_the_connection_stays,
    a_user_disconnected_by_the_server_api_is_closed_with_4003,
    a_client_that_stops_reading_is_closed_with_4008,
    clients_of_an_instance_that_missed_messages_are_closed_with_4009_and_recover_them,
    refusals_are_answered_before_anything_is_streamed,
);
