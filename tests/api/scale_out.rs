//! Several instances joined by a real `redis-server`: cross-instance fan-out, messages injected
//! by other services, subscription reference counting, Redis outages and Sentinel failover.

use std::time::{Duration, Instant};

use deadpool_redis::redis;
use serde_json::json;

use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::*;
use crate::proxy::FreezableProxy;
use crate::redis_support::{RedisServer, pubsub_channels, redis_cli};

async fn instance(redis_url: &str) -> TestApp {
    spawn_on_redis(redis_url, &[]).await
}

#[tokio::test]
async fn messages_and_webhooks_reach_the_tenant_on_every_instance_and_no_one_else() {
    let redis = RedisServer::start();
    let (a, b) = (instance(&redis.url()).await, instance(&redis.url()).await);
    let mut bob_on_a = a.connect("bob", "acme").await;
    let mut eve_on_b = b.connect("eve", "acme").await;
    let mut outsider_on_b = b.connect("bob", "globex").await;

    bob_on_a.send_json(&json!({"type": "message", "payload": {"text": "from a"}})).await;
    for client in [&mut bob_on_a, &mut eve_on_b] {
        let frame = client.next_json().await;
        assert_eq!(frame["payload"]["text"], "from a");
        assert_eq!(frame["from_user"], "bob");
        assert_eq!(frame["channel"], "tenant:acme");
    }

    let answer = a.post_signed_webhook("github", "acme", ACME_SECRET, &json!({"n": 1})).await;
    assert_eq!(answer.status, 200);
    for client in [&mut bob_on_a, &mut eve_on_b] {
        let frame = client.next_json().await;
        assert_eq!(frame["type"], "webhook");
        assert_eq!(frame["message_id"], answer.body["message_id"]);
    }
    outsider_on_b.expect_nothing_pending().await;
}

#[tokio::test]
async fn a_message_published_to_redis_by_another_service_reaches_the_right_clients() {
    let redis = RedisServer::start();
    let app = instance(&redis.url()).await;
    let mut acme = app.connect("bob", "acme").await;
    let mut globex = app.connect("bob", "globex").await;
    let mut connection = redis.client().await;

    let publish =
        |channel: &'static str, body: &'static str| redis::cmd("PUBLISH").arg(channel).arg(body).clone();
    let _: i64 = publish("tenant:acme", r#"{"type":"notice","payload":{"text":"maintenance at 5"}}"#)
        .query_async(&mut connection)
        .await
        .expect("PUBLISH");
    let frame = acme.next_json().await;
    assert_eq!(frame["type"], "notice");
    assert_eq!(frame["payload"]["text"], "maintenance at 5");
    assert_eq!(frame["channel"], "tenant:acme");
    assert!(frame["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')), "filled in: {frame}");
    assert!(frame["message_id"].as_str().is_some_and(|id| !id.is_empty()), "filled in: {frame}");

    // Garbage is dropped, and what follows still arrives.
    for garbage in ["not json", "[1,2]", r#"{"payload":1}"#] {
        let _: i64 = redis::cmd("PUBLISH")
            .arg("tenant:acme")
            .arg(garbage)
            .query_async(&mut connection)
            .await
            .expect("PUBLISH");
    }
    let _: i64 = publish("user:acme:bob", r#"{"type":"direct","payload":"just bob"}"#)
        .query_async(&mut connection)
        .await
        .expect("PUBLISH");
    let _: i64 = publish("global:broadcast", r#"{"type":"announcement","payload":"everyone"}"#)
        .query_async(&mut connection)
        .await
        .expect("PUBLISH");
    let direct = acme.next_json().await;
    assert_eq!(
        (direct["type"].as_str(), direct["channel"].as_str()),
        (Some("direct"), Some("user:acme:bob"))
    );
    assert_eq!(acme.next_json().await["payload"], "everyone");
    assert_eq!(globex.next_json().await["payload"], "everyone");
    globex.expect_nothing_pending().await;
}

#[tokio::test]
async fn a_tenant_channel_is_subscribed_exactly_while_a_local_client_of_the_tenant_is_connected() {
    let redis = RedisServer::start();
    let app = instance(&redis.url()).await;
    let mut connection = redis.client().await;
    let base = ["global:broadcast", "system:events"];
    assert_eq!(pubsub_channels(&mut connection).await, base);

    let bob = app.connect("bob", "acme").await;
    assert_eq!(
        pubsub_channels(&mut connection).await,
        ["global:broadcast", "system:events", "tenant:acme", "user:acme:bob"],
        "subscribed before the welcome frame"
    );
    let eve = app.connect("eve", "acme").await;
    bob.close().await;
    eventually(Duration::from_secs(5), "user:acme:bob unsubscribed", async || {
        pubsub_channels(&mut redis.client().await).await
            == ["global:broadcast", "system:events", "tenant:acme", "user:acme:eve"]
    })
    .await;
    eve.close().await;
    eventually(Duration::from_secs(5), "tenant:acme unsubscribed", async || {
        pubsub_channels(&mut redis.client().await).await == base
    })
    .await;
    // Back again: subscribed again.
    let _carol = app.connect("carol", "acme").await;
    assert_eq!(
        pubsub_channels(&mut connection).await,
        ["global:broadcast", "system:events", "tenant:acme", "user:acme:carol"]
    );
}

#[tokio::test]
async fn an_instance_sends_every_redis_command_over_its_four_shared_connections() {
    let redis = RedisServer::start();
    let app = instance(&redis.url()).await;
    let app = &app;
    // Sixty clients open at once (each opening reads two positions), then sixty webhooks go at
    // once (each claims its delivery id and runs the publish script).
    let mut clients = futures_util::future::join_all((0..60).map(|n| async move {
        let user = format!("user{n}");
        app.connect(&user, "acme").await
    }))
    .await;
    let answers = futures_util::future::join_all((0..60).map(|n| async move {
        app.post_signed_webhook("github", "acme", ACME_SECRET, &json!({"n": n})).await
    }))
    .await;
    assert!(answers.iter().all(|answer| answer.status == 200), "every webhook was relayed");
    let mut received: Vec<i64> = Vec::new();
    for _ in 0..60 {
        received.push(clients[59].next_json().await["payload"]["data"]["n"].as_i64().expect("n"));
    }
    received.sort_unstable();
    assert_eq!(received, (0..60).collect::<Vec<_>>());

    let mut connection = redis.client().await;
    let list: String =
        redis::cmd("CLIENT").arg("LIST").query_async(&mut connection).await.expect("CLIENT LIST");
    // Every client but this test's own: REDIS_POOL_SIZE (4) for commands, one subscriber.
    let instance_clients = list.lines().count() - 1;
    assert!(
        (2..=5).contains(&instance_clients),
        "the instance holds {instance_clients} Redis connections:\n{list}"
    );
    // And it opened no more than those: Redis numbers its clients in order.
    let opened: u64 = redis::cmd("INFO")
        .arg("stats")
        .query_async::<String>(&mut connection)
        .await
        .expect("INFO")
        .lines()
        .find_map(|line| line.strip_prefix("total_connections_received:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("total_connections_received");
    assert!(opened <= 5 + 2, "the instance opened {opened} Redis connections in all (this test: 2)");
}

#[tokio::test]
async fn with_redis_unreachable_at_start_ready_tells_this_machine_where_redis_is_and_why_never_its_password()
{
    let port = crate::redis_support::free_port();
    let app = spawn_app_with(test_config(|vars| {
        vars.insert("REDIS_URL".into(), format!("redis://lq:pw-in-url@127.0.0.1:{port}"));
    }))
    .await;
    let expected = format!("Redis at redis://127.0.0.1:{port} cannot be reached");
    let deadline = Instant::now() + Duration::from_secs(5);
    let answer = loop {
        let answer = app.get("/ready").await;
        assert_eq!(answer.status, 503, "{:?}", answer.body);
        if answer.body["message"].as_str().is_some_and(|m| m.starts_with(&expected))
            || Instant::now() > deadline
        {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let message = answer.body["message"].as_str().unwrap_or_default();
    assert!(message.starts_with(&expected) && message.ends_with("; retrying"), "{message}");
    assert!(!message.contains("pw-in-url"), "no password in the answer: {message}");
    assert_eq!(answer.body["code"], "unavailable");
    // Through a proxy, where Redis is stays on this machine.
    let relayed =
        app.http.get(app.url("/ready")).header("x-forwarded-for", "203.0.113.9").send().await.expect("GET");
    assert_eq!(relayed.status(), 503);
    let relayed: serde_json::Value = relayed.json().await.expect("JSON");
    assert_eq!(relayed["message"], "message broker unavailable");
}

#[tokio::test]
async fn a_redis_outage_keeps_clients_connected_fails_fast_and_heals_within_two_seconds() {
    let mut redis = RedisServer::start();
    let app = instance(&redis.url()).await;
    let mut client = app.connect("bob", "acme").await;

    redis.kill();
    eventually(Duration::from_secs(5), "/ready turning 503", async || app.get("/ready").await.status == 503)
        .await;

    let started = Instant::now();
    let answer = app.post_signed_webhook("github", "acme", ACME_SECRET, &json!({"during": "outage"})).await;
    assert!(started.elapsed() < Duration::from_secs(3), "the webhook failed fast: {:?}", started.elapsed());
    assert_eq!(answer.status, 503);
    assert_eq!(answer.body["code"], "unavailable");
    assert!(answer.headers.contains_key("retry-after"));

    client.send_json(&json!({"type": "message", "payload": "during outage"})).await;
    let error = client.next_json().await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["payload"]["code"], "unavailable");
    client.expect_nothing_pending().await;

    redis.restart();
    let back = Instant::now();
    eventually(Duration::from_secs(5), "/ready turning 200", async || app.get("/ready").await.status == 200)
        .await;
    let answer = app.post_signed_webhook("github", "acme", ACME_SECRET, &json!({"after": "outage"})).await;
    assert_eq!(answer.status, 200);
    assert_eq!(client.next_json().await["payload"]["data"]["after"], "outage");
    let healed = back.elapsed();
    assert!(healed < Duration::from_secs(2), "delivery resumed {healed:?} after Redis came back");
}

#[tokio::test]
async fn delivery_resumes_within_five_seconds_of_a_sentinel_failover() {
    let mut master = RedisServer::start();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &master.port.to_string()]);
    let mut replica_connection = replica.client().await;
    eventually(Duration::from_secs(10), "the replica in sync", async || {
        let info: String =
            redis::cmd("INFO").arg("replication").query_async(&mut replica_connection).await.expect("INFO");
        info.contains("master_link_status:up")
    })
    .await;
    let sentinel = RedisServer::sentinel("lqmaster", master.port);
    let mut sentinel_connection = sentinel.client().await;
    eventually(Duration::from_secs(15), "the sentinel discovering the replica", async || {
        let replicas: Vec<redis::Value> = redis::cmd("SENTINEL")
            .arg("REPLICAS")
            .arg("lqmaster")
            .query_async(&mut sentinel_connection)
            .await
            .unwrap_or_default();
        !replicas.is_empty()
    })
    .await;

    let sentinels = format!("127.0.0.1:{}", sentinel.port);
    let app = spawn_app_with(test_config(|vars| {
        vars.insert("REDIS_SENTINELS".into(), sentinels);
        vars.insert("REDIS_SENTINEL_MASTER".into(), "lqmaster".into());
    }))
    .await;
    app.wait_ready(Duration::from_secs(10)).await;
    let mut client = app.connect("bob", "acme").await;
    assert_eq!(
        app.post_signed_webhook("github", "acme", ACME_SECRET, &json!({"n": "before"})).await.status,
        200
    );
    assert_eq!(client.next_json().await["payload"]["data"]["n"], "before");

    master.kill();
    let replica_port = replica.port.to_string();
    eventually(Duration::from_secs(30), "Sentinel promoting the replica", async || {
        let addr: Vec<String> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg("lqmaster")
            .query_async(&mut sentinel_connection)
            .await
            .unwrap_or_default();
        addr.get(1) == Some(&replica_port)
    })
    .await;
    let promoted = Instant::now();
    eventually(Duration::from_secs(5), "/ready after the failover", async || {
        app.get("/ready").await.status == 200
    })
    .await;
    let answer = app.post_signed_webhook("github", "acme", ACME_SECRET, &json!({"n": "after"})).await;
    assert_eq!(answer.status, 200);
    assert_eq!(client.next_json().await["payload"]["data"]["n"], "after");
    let resumed = promoted.elapsed();
    assert!(resumed < Duration::from_secs(5), "delivery resumed {resumed:?} after the promotion");
}

#[tokio::test]
async fn a_subscriber_connection_that_silently_stops_delivering_is_replaced() {
    let redis = RedisServer::start();
    let proxy = FreezableProxy::start(redis.port).await;
    let app = instance(&format!("redis://127.0.0.1:{}", proxy.port)).await;
    let mut client = app.connect("bob", "acme").await;
    assert_eq!(
        app.post_signed_webhook("github", "acme", ACME_SECRET, &json!({"n": "before"})).await.status,
        200
    );
    assert_eq!(client.next_json().await["payload"]["data"]["n"], "before");

    // Every Redis connection of the instance goes deaf without being closed. The deaf link is
    // detected and replaced; a client that may have missed messages meanwhile is closed with
    // 4009 to recover them (see the recovery tests). Deliveries resume for a client connected
    // afterwards.
    proxy.freeze_existing();
    let frozen = Instant::now();
    let mut delivered = false;
    while !delivered {
        assert!(frozen.elapsed() < Duration::from_secs(15), "deliveries never resumed");
        tokio::time::sleep(Duration::from_millis(200)).await;
        if app.get("/ready").await.status != 200 {
            continue;
        }
        let Ok(mut fresh) = app.try_connect(&token("eve", "acme")).await else { continue };
        assert_eq!(fresh.next_json().await["type"], "welcome");
        let answer = app.post_signed_webhook("github", "acme", ACME_SECRET, &json!({"n": "after"})).await;
        if answer.status == 200 {
            // Accepted by Redis: it must arrive, unless the subscriber was still the deaf one,
            // in which case the next round retries.
            let frame = tokio::time::timeout(Duration::from_secs(1), fresh.next_json()).await;
            delivered = frame.is_ok_and(|frame| frame["payload"]["data"]["n"] == "after");
        }
    }
    drop(client);
}

#[tokio::test]
async fn connections_beyond_the_opening_limit_wait_their_turn_and_are_told_to_retry_after_the_timeout() {
    let redis = RedisServer::start();
    let proxy = FreezableProxy::start(redis.port).await;
    let app = spawn_on_redis(
        &format!("redis://127.0.0.1:{}", proxy.port),
        &[("MAX_OPENING_CONNECTIONS", "1"), ("OPENING_TIMEOUT_MS", "300"), ("REDIS_POOL_SIZE", "1")],
    )
    .await;
    let _bob = app.connect("bob", "acme").await;
    // Redis stops answering: whichever connection gets the only turn holds it while it waits for
    // its positions (a second at least: the command's timeout, or a fresh pooled connection), so
    // the others wait for a turn and are refused once OPENING_TIMEOUT_MS passed.
    proxy.freeze_existing();
    let attempts: Vec<_> = ["eve", "carol", "dave"]
        .into_iter()
        .map(|user| {
            let url = app.ws_url(&format!("?token={}", token(user, "acme")));
            tokio::spawn(async move {
                let started = Instant::now();
                let outcome = WsClient::connect(url.into_client_request().expect("request")).await;
                (outcome.err(), started.elapsed())
            })
        })
        .collect();
    let mut overloaded = 0;
    for attempt in attempts {
        let (refused, took) = attempt.await.expect("attempt");
        if let Some((503, body)) = &refused
            && body["code"] == "overloaded"
        {
            assert!(took >= Duration::from_millis(300), "refused before its wait ended: {took:?}");
            overloaded += 1;
        } else {
            // The one that had the turn took its time, whatever it was told.
            assert!(took >= Duration::from_millis(400), "{refused:?} after {took:?}");
        }
    }
    assert_eq!(overloaded, 2, "all but the one with the turn");
    assert_eq!(
        value(&scrape(&app).await, r#"lq_connections_total{transport="websocket",result="overloaded"}"#),
        2.0
    );
    // The turn was given back: once the instance replaced its deaf Redis connections, a new
    // connection opens.
    eventually(Duration::from_secs(15), "a connection opening again", async || {
        app.try_connect(&token("frank", "acme")).await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn churn_of_the_last_and_first_client_of_a_tenant_never_leaves_it_unsubscribed() {
    let redis = RedisServer::start();
    let (a, b) = (instance(&redis.url()).await, instance(&redis.url()).await);
    for round in 0..20 {
        // The tenant's only client on A leaves while the next one arrives.
        let leaving = a.connect("bob", "acme").await;
        let (arriving, ()) = tokio::join!(a.connect("eve", "acme"), leaving.close());
        let mut arriving = arriving;
        let answer = b.post_signed_webhook("github", "acme", ACME_SECRET, &json!({"round": round})).await;
        assert_eq!(answer.status, 200);
        assert_eq!(arriving.next_json().await["payload"]["data"]["round"], round, "round {round}");
        arriving.close().await;
    }
}

#[tokio::test]
async fn a_delivery_whose_publish_fails_is_released_and_its_retry_relayed_without_a_hole() {
    let redis = RedisServer::start();
    let app = instance(&redis.url()).await;
    let mut client = app.connect("bob", "acme").await;
    let first = post_delivery(&app, "gh-1", 1).await;
    assert_eq!(first.status, 200);
    let frame = client.next_json().await;
    assert_eq!((frame["payload"]["data"]["n"].as_u64(), frame["offset"].as_u64()), (Some(1), Some(1)));

    // Redis takes the delivery's claim, then refuses the publish: the channel's history key
    // holds a value of another type, so the script fails at its append.
    let history = "lq-realtime:{tenant:acme}:history";
    redis_cli(redis.port, &["DEL", history]);
    assert_eq!(redis_cli(redis.port, &["SET", history, "not a stream"]), "OK");
    let failed = post_delivery(&app, "gh-2", 2).await;
    assert_eq!((failed.status, failed.body["code"].as_str()), (503, Some("unavailable")), "{}", failed.body);
    // The claim was released, so the sender's retry is relayed once Redis accepts it, with the
    // next offset: the failed attempt used none.
    redis_cli(redis.port, &["DEL", history]);
    let retried = post_delivery(&app, "gh-2", 2).await;
    assert_eq!(retried.status, 200, "{}", retried.body);
    assert_eq!(retried.body.get("duplicate"), None);
    let frame = client.next_json().await;
    assert_eq!((frame["payload"]["data"]["n"].as_u64(), frame["offset"].as_u64()), (Some(2), Some(2)));
    assert_eq!(frame["message_id"], retried.body["message_id"]);
    // A second retry is a duplicate of the relayed one.
    let again = post_delivery(&app, "gh-2", 2).await;
    assert_eq!((again.status, &again.body["message_id"]), (200, &retried.body["message_id"]));
    assert_eq!(again.body["duplicate"], true);
    client.expect_nothing_pending().await;
}

async fn post_delivery(app: &TestApp, id: &str, n: u64) -> Answer {
    app.post_acme_webhook_with("x-github-delivery", id, &json!({"n": n})).await
}

#[tokio::test]
async fn delivery_ids_are_shared_by_every_instance_and_a_failed_delivery_can_be_retried() {
    let mut redis = RedisServer::start();
    let (a, b) = (instance(&redis.url()).await, instance(&redis.url()).await);
    let mut client = b.connect("bob", "acme").await;

    let first = post_delivery(&a, "gh-1", 1).await;
    assert_eq!(first.status, 200);
    let retry_elsewhere = post_delivery(&b, "gh-1", 1).await;
    assert_eq!(retry_elsewhere.status, 200);
    assert_eq!(retry_elsewhere.body["message_id"], first.body["message_id"]);
    assert_eq!(retry_elsewhere.body["duplicate"], true);
    assert_eq!(client.next_json().await["payload"]["data"]["n"], 1);
    client.expect_nothing_pending().await;

    // While Redis is away the delivery fails; the sender's retry afterwards is relayed.
    redis.kill();
    eventually(Duration::from_secs(5), "/ready turning 503", async || a.get("/ready").await.status == 503)
        .await;
    assert_eq!(post_delivery(&a, "gh-2", 2).await.status, 503);
    redis.restart();
    eventually(Duration::from_secs(5), "both ready", async || {
        a.get("/ready").await.status == 200 && b.get("/ready").await.status == 200
    })
    .await;
    let retried = post_delivery(&a, "gh-2", 2).await;
    assert_eq!(retried.status, 200);
    assert_eq!(retried.body.get("duplicate"), None);
    // Redis restarted without its data: the history began a new epoch, so the client is told
    // it may have missed messages, and finds the retried delivery in the new history.
    let close = client.expect_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 4009);
    let (client, welcome) = b.connect_with_welcome("bob", "acme").await;
    let epoch = welcome["payload"]["positions"]["tenant:acme"]["epoch"].clone();
    client.close().await;
    let since = format!("&since={}:0", epoch.as_str().expect("epoch"));
    let (mut client, welcome) = b.connect_with_query("bob", "acme", &since).await;
    assert_eq!(welcome["payload"]["recovered"], true);
    assert_eq!(client.next_json().await["payload"]["data"]["n"], 2);
    client.expect_nothing_pending().await;
}
