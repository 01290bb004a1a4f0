//! Persistence in PostgreSQL: messages kept before their publish is answered, recovery beyond
//! what Redis still holds — a history trimmed, or lost with Redis — the answers while
//! PostgreSQL is down, and migrations applied once. Every test starts its own PostgreSQL (and
//! Redis) on free ports.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;
use crate::postgres_support::PostgresServer;
use crate::redis_support::RedisServer;

const KEY: &str = "persistence-api-key-0123456789";

async fn on(postgres: &PostgresServer, redis: Option<&RedisServer>, extra: &[(&str, &str)]) -> TestApp {
    let url = postgres.url();
    let mut vars = vec![("DATABASE_URL", url.as_str()), ("API_KEYS", KEY)];
    vars.extend_from_slice(extra);
    match redis {
        Some(redis) => spawn_on_redis(&redis.url(), &vars).await,
        None => spawn_ready(&vars).await,
    }
}

async fn publish(app: &TestApp, channel: &str, n: u64) -> Answer {
    let answer = app
        .http
        .post(app.url("/api/publish"))
        .bearer_auth(KEY)
        .json(&json!({"channel": channel, "type": "note", "payload": {"n": n}}))
        .send()
        .await
        .expect("sent");
    Answer::from_response(answer).await
}

async fn published(app: &TestApp, channel: &str, n: u64) {
    let answer = publish(app, channel, n).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
}

fn n_of(frame: &Value) -> u64 {
    frame["payload"]["n"].as_u64().unwrap_or_else(|| panic!("a numbered note, got {frame}"))
}

#[tokio::test]
async fn a_message_is_kept_in_postgresql_before_its_publish_is_answered() {
    let postgres = PostgresServer::start();
    let app = on(&postgres, None, &[]).await;
    let (mut client, _) = app.connect_with_welcome("bob", "acme").await;
    published(&app, "tenant:acme", 1).await;
    let delivered = client.next_json().await;
    // Answered: already committed, byte for byte what the client received.
    let kept = postgres
        .query(r#"SELECT convert_from(message, 'UTF8') FROM lq_messages WHERE channel = 'tenant:acme'"#)
        .await;
    assert_eq!(kept.len(), 1);
    let kept: Value = serde_json::from_str(&kept[0]).expect("JSON");
    assert_eq!(kept, delivered);
    // Broadcasts have no position, and are not kept.
    published(&app, "global:broadcast", 2).await;
    assert_eq!(postgres.query("SELECT count(*) FROM lq_messages").await, ["1"]);
}

#[tokio::test]
async fn a_client_further_behind_than_the_redis_history_recovers_from_postgresql() {
    let (postgres, redis) = (PostgresServer::start(), RedisServer::start());
    let app = on(&postgres, Some(&redis), &[("HISTORY_SIZE", "3")]).await;
    let (mut client, _) = app.connect_with_welcome("bob", "acme").await;
    published(&app, "tenant:acme", 1).await;
    let first = client.next_json().await;
    client.close().await;
    for n in 2..=10 {
        published(&app, "tenant:acme", n).await;
    }
    // Redis keeps 8, 9 and 10 only.
    let (mut client, welcome) =
        app.connect_with_query("bob", "acme", &format!("&since={}", since_of(&first))).await;
    assert_eq!(welcome["payload"]["recovered"], true, "{welcome}");
    for n in 2..=10 {
        assert_eq!(n_of(&client.next_json().await), n);
    }
    published(&app, "tenant:acme", 11).await;
    assert_eq!(n_of(&client.next_json().await), 11);
    client.expect_nothing_pending().await;
}

#[tokio::test]
async fn after_redis_lost_everything_a_client_recovers_the_old_epoch_from_postgresql_then_the_new_one() {
    let (postgres, mut redis) = (PostgresServer::start(), RedisServer::start());
    let app = on(&postgres, Some(&redis), &[]).await;
    let (mut client, _) = app.connect_with_welcome("bob", "acme").await;
    published(&app, "tenant:acme", 1).await;
    let seen = client.next_json().await;
    client.close().await;
    for n in 2..=3 {
        published(&app, "tenant:acme", n).await;
    }
    // Redis restarts without persistence: positions and history gone, a new epoch begins.
    redis.kill();
    redis.restart();
    app.wait_ready(Duration::from_secs(10)).await;
    published(&app, "tenant:acme", 4).await;
    let (mut client, welcome) =
        app.connect_with_query("bob", "acme", &format!("&since={}", since_of(&seen))).await;
    assert_eq!(welcome["payload"]["recovered"], true, "{welcome}");
    let (two, three, four) = (client.next_json().await, client.next_json().await, client.next_json().await);
    assert_eq!((n_of(&two), n_of(&three), n_of(&four)), (2, 3, 4));
    assert_eq!((two["epoch"].clone(), three["offset"].clone()), (seen["epoch"].clone(), json!(3)));
    assert_ne!(four["epoch"], seen["epoch"], "4 is of the new epoch");
    assert_eq!(four["offset"], 1);
    published(&app, "tenant:acme", 5).await;
    assert_eq!(n_of(&client.next_json().await), 5);
    client.expect_nothing_pending().await;
}

#[tokio::test]
async fn while_postgresql_is_down_publishes_are_refused_with_503_and_ready_says_so_then_both_resume() {
    let mut postgres = PostgresServer::start();
    let app = on(&postgres, None, &[]).await;
    published(&app, "tenant:acme", 1).await;
    postgres.kill();
    eventually(Duration::from_secs(10), "the instance not ready", async || {
        app.get("/ready").await.status == 503
    })
    .await;
    let refused = publish(&app, "tenant:acme", 2).await;
    assert_eq!(refused.status, 503, "{:?}", refused.body);
    assert!(
        refused.body["message"].as_str().is_some_and(|m| m.contains("message store")),
        "{:?}",
        refused.body
    );
    // A channel without a history is not kept, and still works.
    published(&app, "global:broadcast", 3).await;
    postgres.restart();
    eventually(Duration::from_secs(15), "the instance ready again", async || {
        app.get("/ready").await.status == 200
    })
    .await;
    published(&app, "tenant:acme", 4).await;
    let kept = postgres.query(r#"SELECT "offset" FROM lq_messages ORDER BY "offset""#).await;
    assert_eq!(kept, ["1", "2"], "1, and 4 at the next offset: 2 was never published");
}

#[tokio::test]
async fn instances_starting_together_apply_the_migrations_once() {
    let postgres = PostgresServer::start();
    let url = postgres.url();
    let vars = [("DATABASE_URL", url.as_str())];
    let (a, b) = tokio::join!(spawn_ready(&vars), spawn_ready(&vars));
    assert_eq!(postgres.query("SELECT version FROM lq_schema_migrations").await, ["1"]);
    drop((a, b));
}
