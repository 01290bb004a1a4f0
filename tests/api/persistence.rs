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

/// A client of `bob` of `acme` that saw message 1 of the tenant channel, then went away while
/// messages `2..=last` were published; returns the frame of 1, whose position it resumes from.
async fn away_after_one(app: &TestApp, last: u64) -> Value {
    let (mut client, _) = app.connect_with_welcome("bob", "acme").await;
    published(app, "tenant:acme", 1).await;
    let seen = client.next_json().await;
    client.close().await;
    for n in 2..=last {
        published(app, "tenant:acme", n).await;
    }
    seen
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
    let first = away_after_one(&app, 10).await;
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
    let seen = away_after_one(&app, 3).await;
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
    // The history runs across both epochs in publication order.
    let page = history(&app, "tenant:acme", "order=asc").await;
    assert_eq!(page.status, 200, "{:?}", page.body);
    assert_eq!(ns(&page.body), [1, 2, 3, 4, 5]);
}

async fn history(app: &TestApp, channel: &str, query: &str) -> Answer {
    let url = app.url(&format!("/api/channels/{channel}/history?{query}"));
    Answer::from_response(app.http.get(url).bearer_auth(KEY).send().await.expect("sent")).await
}

fn ns(page: &Value) -> Vec<u64> {
    page["messages"].as_array().expect("messages").iter().map(n_of).collect()
}

#[tokio::test]
async fn the_history_api_pages_a_channel_newest_or_oldest_first_and_explains_refusals() {
    let postgres = PostgresServer::start();
    let app = on(&postgres, None, &[]).await;
    for n in 1..=5 {
        published(&app, "topic:acme:orders", n).await;
    }
    let newest = history(&app, "topic:acme:orders", "limit=2").await;
    assert_eq!((newest.status, ns(&newest.body)), (200, vec![5, 4]), "{:?}", newest.body);
    let next = newest.body["next"].as_str().expect("a next page").to_owned();
    let older = history(&app, "topic%3Aacme%3Aorders", &format!("before={next}&limit=2")).await;
    assert_eq!(ns(&older.body), [3, 2]);
    let from = older.body["next"].as_str().expect("a next page").to_owned();
    let oldest_first = history(&app, "topic:acme:orders", &format!("since={from}")).await;
    assert_eq!((ns(&oldest_first.body), oldest_first.body["next"].clone()), (vec![3, 4, 5], Value::Null));

    let refusals = [
        ("global:broadcast", "", 400, "bad_request"),
        ("topic:acme:orders", "limit=0", 400, "bad_request"),
        ("topic:acme:orders", "limit=1001", 400, "bad_request"),
        ("topic:acme:orders", "since=nope", 400, "invalid_position"),
        ("topic:acme:orders", "order=sideways", 400, "bad_request"),
        ("topic:acme:orders", "page=2", 400, "bad_request"),
        ("topic:acme:orders", "since=unknown-epoch:1", 404, "unknown_position"),
    ];
    for (channel, query, status, code) in refusals {
        let answer = history(&app, channel, query).await;
        assert_eq!(
            (answer.status, answer.body["code"].as_str()),
            (status, Some(code)),
            "{channel}?{query}: {:?}",
            answer.body
        );
    }
    let unauthorized = app.http.get(app.url("/api/channels/tenant:acme/history")).send().await.expect("sent");
    assert_eq!(unauthorized.status(), 401);
    let without = spawn_ready(&[("API_KEYS", KEY)]).await;
    let off = history(&without, "tenant:acme", "").await;
    assert_eq!((off.status, off.body["code"].as_str()), (404, Some("persistence_off")));
}

#[tokio::test]
async fn a_client_with_the_history_cap_reads_a_topics_history() {
    let postgres = PostgresServer::start();
    let app = on(&postgres, None, &[]).await;
    for n in 1..=3 {
        published(&app, "topic:acme:orders", n).await;
    }
    let reader =
        token_with("bob", "acme", &json!({"caps": [{"channels": ["orders"], "allow": ["history"]}]}));
    let mut client = app.try_connect(&reader).await.expect("connected");
    client.next_json().await;
    client.send_json(&json!({"type": "history", "channel": "orders", "limit": 2})).await;
    let page = client.next_json().await;
    assert_eq!(
        (page["type"].as_str(), page["channel"].as_str()),
        (Some("history"), Some("topic:acme:orders"))
    );
    assert_eq!(ns(&page["payload"]), [3, 2]);
    client
        .send_json(&json!({"type": "history", "channel": "orders", "before": page["payload"]["next"]}))
        .await;
    assert_eq!(ns(&client.next_json().await["payload"]), [1]);
    client.send_json(&json!({"type": "history", "channel": "billing"})).await;
    assert_eq!(client.next_json().await["payload"]["code"], "forbidden");
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
    assert_eq!(postgres.query("SELECT version FROM lq_schema_migrations ORDER BY version").await, ["1", "2"]);
    drop((a, b));
}

/// Inserts rows `from..to` numbered `n` into `lq_outbox`, `per_transaction` at a time, each on
/// `channel_of(n)`.
async fn insert_outbox(
    postgres: &PostgresServer,
    range: std::ops::Range<u64>,
    channel_of: fn(u64) -> String,
) {
    let (client, connection) =
        tokio_postgres::connect(&postgres.url(), tokio_postgres::NoTls).await.expect("connects");
    tokio::spawn(connection);
    let rows: Vec<u64> = range.collect();
    for chunk in rows.chunks(50) {
        let values: Vec<String> =
            chunk.iter().map(|n| format!("('{}', 'order', '{{\"n\":{n}}}')", channel_of(*n))).collect();
        // As a backend does: in its own transaction.
        client
            .batch_execute(&format!(
                "BEGIN; INSERT INTO lq_outbox (channel, type, payload) VALUES {}; COMMIT;",
                values.join(",")
            ))
            .await
            .expect("inserted");
    }
}

/// The `n` of every `order` frame `client` receives until it has `count` of them.
async fn orders(client: &mut WsClient, count: usize) -> Vec<u64> {
    let mut got = Vec::new();
    while got.len() < count {
        let frame = client.next_json().await;
        if frame["type"] == "order" {
            got.push(n_of(&frame));
        }
    }
    got
}

#[tokio::test]
async fn two_instances_publish_the_outbox_once_each_row_in_order_per_channel() {
    let (postgres, redis) = (PostgresServer::start(), RedisServer::start());
    let vars = [("OUTBOX_TABLE", "lq_outbox")];
    let (a, b) = (on(&postgres, Some(&redis), &vars).await, on(&postgres, Some(&redis), &vars).await);
    let mut acme = a.connect("bob", "acme").await;
    let caps = json!({"caps": [{"channels": ["*"], "allow": ["sub"]}]});
    let mut subscriber = b.try_connect(&token_with("eve", "globex", &caps)).await.expect("connected");
    subscriber.next_json().await;
    subscriber.send_json(&json!({"type": "subscribe", "channel": "orders"})).await;
    assert_eq!(subscriber.next_json().await["type"], "subscribed");
    insert_outbox(&postgres, 0..300, |n| {
        if n % 3 == 0 { "topic:globex:orders".to_owned() } else { "tenant:acme".to_owned() }
    })
    .await;
    let to_acme: Vec<u64> = (0..300).filter(|n| n % 3 != 0).collect();
    let to_topic: Vec<u64> = (0..300).filter(|n| n % 3 == 0).collect();
    acme.patience = Duration::from_secs(20);
    subscriber.patience = Duration::from_secs(20);
    assert_eq!(orders(&mut acme, to_acme.len()).await, to_acme, "every row once, in insertion order");
    assert_eq!(orders(&mut subscriber, to_topic.len()).await, to_topic);
    eventually(Duration::from_secs(10), "the outbox empty", async || {
        postgres.query("SELECT count(*) FROM lq_outbox").await == ["0"]
    })
    .await;
    acme.expect_nothing_pending().await;
    eventually(Duration::from_secs(5), "the gauges", async || {
        value(&scrape(&a).await, "lq_outbox_pending") == 0.0
    })
    .await;
    let published = value(&scrape(&a).await, r#"lq_outbox_rows_total{result="published"}"#)
        + value(&scrape(&b).await, r#"lq_outbox_rows_total{result="published"}"#);
    assert!(published >= 300.0, "every row counted by the instance that removed it: {published}");
}

#[tokio::test]
async fn a_row_that_can_never_be_published_is_removed_and_counted_and_the_rest_goes_on() {
    let postgres = PostgresServer::start();
    let app = on(&postgres, None, &[("OUTBOX_TABLE", "lq_outbox")]).await;
    let mut client = app.connect("bob", "acme").await;
    insert_outbox(&postgres, 0..1, |_| "nowhere:at-all".to_owned()).await;
    insert_outbox(&postgres, 1..3, |_| "tenant:acme".to_owned()).await;
    assert_eq!(orders(&mut client, 2).await, [1, 2]);
    eventually(Duration::from_secs(5), "the rejection counted", async || {
        value(&scrape(&app).await, r#"lq_outbox_rows_total{result="rejected"}"#) == 1.0
    })
    .await;
    assert_eq!(postgres.query("SELECT count(*) FROM lq_outbox").await, ["0"]);
}

#[tokio::test]
async fn an_instance_killed_while_it_consumes_the_outbox_makes_no_row_published_twice() {
    let (postgres, redis) = (PostgresServer::start(), RedisServer::start());
    let (database, redis_url) = (postgres.url(), redis.url());
    let env = [
        ("DATABASE_URL", database.as_str()),
        ("REDIS_URL", redis_url.as_str()),
        ("OUTBOX_TABLE", "lq_outbox"),
    ];
    let doomed = crate::process::start(&env).await;
    let survivor = on(&postgres, Some(&redis), &[("OUTBOX_TABLE", "lq_outbox")]).await;
    let mut client = survivor.connect("bob", "acme").await;
    client.patience = Duration::from_secs(30);
    insert_outbox(&postgres, 0..2000, |_| "tenant:acme".to_owned()).await;
    let mut got = orders(&mut client, 200).await;
    doomed.signal("KILL");
    got.extend(orders(&mut client, 1800).await);
    assert_eq!(got, (0..2000).collect::<Vec<_>>(), "every row once and in order across the kill");
    // The rows the killed instance published but did not remove are found published by their
    // key, and removed without a second publish.
    eventually(Duration::from_secs(20), "the outbox empty", async || {
        postgres.query("SELECT count(*) FROM lq_outbox").await == ["0"]
    })
    .await;
    client.expect_nothing_pending().await;
}

#[tokio::test]
async fn messages_older_than_the_retention_are_pruned() {
    use adapters::outbound::postgres::{PostgresSettings, PostgresStore};
    use application::ports::{MessageStore, StoredMessage};
    let postgres = PostgresServer::start();
    let mut settings = PostgresSettings::new(postgres.url());
    settings.retention = Duration::from_secs(1);
    settings.prune_period = Duration::from_millis(200);
    let store = PostgresStore::connect(settings).await.expect("connected");
    let channel = domain::Channel::parse("tenant:acme").expect("valid");
    let message = |offset| StoredMessage {
        channel: channel.clone(),
        position: domain::StreamPosition::new("e1", offset),
        message: bytes::Bytes::from_static(br#"{"type":"n"}"#),
    };
    store.append(message(1)).await.expect("kept");
    store.append(message(1)).await.expect("a second append of one position keeps the first");
    assert_eq!(store.read_from(&channel, "e1", 1, 10).await.expect("read").len(), 1);
    eventually(Duration::from_secs(5), "the message pruned", async || {
        store.read_from(&channel, "e1", 1, 10).await.expect("read").is_empty()
    })
    .await;
}

#[tokio::test]
async fn a_server_api_publish_with_an_idempotency_key_is_published_once() {
    let postgres = PostgresServer::start();
    let app = on(&postgres, None, &[]).await;
    let mut client = app.connect("bob", "acme").await;
    let send = async |key: &str| {
        let answer = app
            .http
            .post(app.url("/api/publish"))
            .bearer_auth(KEY)
            .header("idempotency-key", key)
            .json(&json!({"channel": "tenant:acme", "type": "note", "payload": {"n": 1}}))
            .send()
            .await
            .expect("sent");
        Answer::from_response(answer).await
    };
    let first = send("order-1-shipped").await;
    assert_eq!((first.status, first.body["duplicate"].clone()), (200, json!(false)), "{:?}", first.body);
    let again = send("order-1-shipped").await;
    assert_eq!((again.status, again.body["duplicate"].clone()), (200, json!(true)));
    assert_eq!(again.body["message_id"], first.body["message_id"]);
    assert_eq!(n_of(&client.next_json().await), 1);
    client.expect_nothing_pending().await;
    let bad = send("not a key").await;
    assert_eq!((bad.status, bad.body["code"].as_str()), (400, Some("bad_request")));
}

#[tokio::test]
async fn a_client_back_after_the_redis_history_expired_recovers_from_postgresql() {
    let (postgres, redis) = (PostgresServer::start(), RedisServer::start());
    let app = on(&postgres, Some(&redis), &[("HISTORY_TTL_SECS", "1")]).await;
    let seen = away_after_one(&app, 3).await;
    // Longer than HISTORY_TTL_SECS without a publish or a read: Redis forgot the messages and
    // the channel's position; the next publish starts a new epoch.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    published(&app, "tenant:acme", 4).await;
    let (mut client, welcome) =
        app.connect_with_query("bob", "acme", &format!("&since={}", since_of(&seen))).await;
    assert_eq!(welcome["payload"]["recovered"], true, "{welcome}");
    for n in 2..=4 {
        assert_eq!(n_of(&client.next_json().await), n);
    }
    client.expect_nothing_pending().await;
}
