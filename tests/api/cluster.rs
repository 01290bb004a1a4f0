//! The cluster broker on a real three-master Redis Cluster started by the test: the broker
//! contract, two instances delivering every kind of channel, channels spread over the masters
//! with one subscriber connection per node, recovery, and a master failover.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use adapters::outbound::history::HistorySettings;
use adapters::outbound::redis::{RedisBroker, RedisBrokerSettings, RedisTarget};
use serde_json::{Value, json};

use crate::broker_contract::{contract, five, history_contract};
use crate::helpers::*;
use crate::redis_support::{RedisCluster, redis_cli};

const KEY: &str = "backend-api-key-0123456789";

fn cluster_broker(cluster: &RedisCluster, history: HistorySettings) -> RedisBroker {
    let nodes = cluster.seeds().split(',').map(str::to_owned).collect();
    let mut settings = RedisBrokerSettings::new(RedisTarget::Cluster { nodes });
    settings.history = history;
    RedisBroker::new(settings).expect("valid settings")
}

#[tokio::test]
async fn the_cluster_broker_keeps_the_broker_contract() {
    let cluster = RedisCluster::start(false);
    contract(Arc::new(cluster_broker(&cluster, HistorySettings::default()))).await;
}

#[tokio::test]
async fn the_cluster_broker_keeps_the_history_contract() {
    let cluster = RedisCluster::start(false);
    history_contract(Arc::new(cluster_broker(&cluster, five()))).await;
}

async fn on_cluster(cluster: &RedisCluster) -> TestApp {
    on_cluster_with(cluster, &[]).await
}

async fn on_cluster_with(cluster: &RedisCluster, extra: &[(&str, &str)]) -> TestApp {
    let seeds = cluster.seeds();
    spawn_ready(&[&[("REDIS_CLUSTER_NODES", seeds.as_str()), ("API_KEYS", KEY)], extra].concat()).await
}

async fn publish(app: &TestApp, body: &Value) -> Answer {
    let response =
        app.http.post(app.url("/api/publish")).bearer_auth(KEY).json(body).send().await.expect("request");
    Answer::from_response(response).await
}

/// Tenants whose channels cover every master: one per master, in slot order.
fn tenant_per_master(cluster: &RedisCluster) -> BTreeMap<u16, String> {
    let mut per_master = BTreeMap::new();
    for n in 0.. {
        let tenant = format!("t{n}");
        let master = cluster.master_of(cluster.keyslot(&format!("tenant:{tenant}")));
        per_master.entry(master).or_insert(tenant);
        if per_master.len() == 3 {
            return per_master;
        }
        assert!(n < 1000, "three masters expected");
    }
    unreachable!()
}

/// Clients of `node` that hold at least one sharded subscription.
fn sharded_subscribers(node: u16) -> usize {
    redis_cli(node, &["CLIENT", "LIST"])
        .lines()
        .filter(|line| line.split(' ').any(|field| field.starts_with("ssub=") && field != "ssub=0"))
        .count()
}

#[tokio::test]
async fn two_instances_on_a_cluster_deliver_every_kind_of_channel_with_one_subscriber_connection_per_node() {
    let cluster = RedisCluster::start(false);
    let (a, b) = (on_cluster(&cluster).await, on_cluster(&cluster).await);
    let tenants = tenant_per_master(&cluster);
    // Each tenant has a client on each instance; the channels live on all three masters.
    let mut clients = Vec::new();
    for tenant in tenants.values() {
        clients.push((tenant.clone(), a.connect("u1", tenant).await, b.connect("u2", tenant).await));
    }
    for (master, tenant) in &tenants {
        let shard_channels = redis_cli(*master, &["PUBSUB", "SHARDCHANNELS", "tenant:*"]);
        assert_eq!(shard_channels, format!("tenant:{tenant}"), "master {master}");
        // One subscriber connection per instance on each master, however many channels.
        assert_eq!(sharded_subscribers(*master), 2, "master {master}");
    }
    // Tenant channels: published through one instance, delivered on both, to that tenant only.
    for (n, tenant) in tenants.values().enumerate() {
        let through = if n % 2 == 0 { &a } else { &b };
        let answer =
            publish(through, &json!({"channel": format!("tenant:{tenant}"), "type": "note", "payload": n}))
                .await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
    }
    for (n, (tenant, on_a, on_b)) in clients.iter_mut().enumerate() {
        for client in [on_a, on_b] {
            let frame = client.next_json().await;
            assert_eq!(
                (frame["channel"].as_str(), &frame["payload"]),
                (Some(format!("tenant:{tenant}").as_str()), &json!(n))
            );
            assert_eq!(frame["offset"], 1);
        }
    }
    // User channels: a direct message from an instance to a user connected to the other one.
    let (tenant, on_a, on_b) = &mut clients[1];
    on_a.send_json(&json!({"type": "direct", "to_user": "u2", "payload": "psst"})).await;
    let frame = on_b.next_json().await;
    assert_eq!((frame["type"].as_str(), frame["from_user"].as_str()), (Some("direct"), Some("u1")));
    assert_eq!(frame["channel"], format!("user:{tenant}:u2"));
    // Broadcast and system channels reach every client of every tenant on both instances.
    publish(&a, &json!({"channel": "global:broadcast", "type": "announcement", "payload": "all"})).await;
    publish(&b, &json!({"channel": "system:events", "type": "maintenance", "payload": "soon"})).await;
    for (_, on_a, on_b) in &mut clients {
        for client in [on_a, on_b] {
            let mut kinds = BTreeSet::new();
            for _ in 0..2 {
                kinds.insert(client.next_json().await["type"].as_str().expect("type").to_owned());
            }
            assert_eq!(kinds, BTreeSet::from(["announcement".to_owned(), "maintenance".to_owned()]));
            client.expect_nothing_pending().await;
        }
    }
}

#[tokio::test]
async fn a_client_recovers_what_it_missed_through_the_other_instance() {
    let cluster = RedisCluster::start(false);
    let (a, b) = (on_cluster(&cluster).await, on_cluster(&cluster).await);
    let (client, welcome) = a.connect_with_welcome("bob", "acme").await;
    let position = welcome["payload"]["positions"]["tenant:acme"].clone();
    client.close().await;
    for n in 1..=3 {
        assert_eq!(
            publish(&b, &json!({"channel": "tenant:acme", "type": "note", "payload": n})).await.status,
            200
        );
    }
    let (mut client, welcome) =
        b.connect_with_query("bob", "acme", &format!("&since={}", since_of(&position))).await;
    assert_eq!(welcome["payload"]["recovered"], true, "{welcome}");
    for n in 1..=3 {
        assert_eq!(client.next_json().await["payload"], n);
    }
    // Then live messages, none of the replayed ones again.
    assert_eq!(
        publish(&a, &json!({"channel": "tenant:acme", "type": "note", "payload": 4})).await.status,
        200
    );
    assert_eq!(client.next_json().await["payload"], 4);
    client.expect_nothing_pending().await;
}

#[tokio::test]
async fn when_a_master_fails_over_its_channels_resume_within_5_s_and_the_others_never_stop() {
    let mut cluster = RedisCluster::start(true);
    let app = on_cluster(&cluster).await;
    let tenants = tenant_per_master(&cluster);
    let (victim_master, victim) = tenants.iter().next().map(|(m, t)| (*m, t.clone())).expect("a tenant");
    let others: Vec<String> = tenants.values().filter(|t| **t != victim).cloned().collect();
    let (mut victim_client, welcome) = app.connect_with_welcome("u1", &victim).await;
    let position = welcome["payload"]["positions"][format!("tenant:{victim}")].clone();
    let mut other_clients = Vec::new();
    for tenant in &others {
        other_clients.push(app.connect("u1", tenant).await);
    }
    // The other tenants are published to every 20 ms throughout.
    let publisher = {
        let (url, http, others) = (app.url("/api/publish"), app.http.clone(), others.clone());
        tokio::spawn(async move {
            let mut sent = vec![0u64; others.len()];
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(6) {
                for (i, tenant) in others.iter().enumerate() {
                    let body = json!({"channel": format!("tenant:{tenant}"), "type": "tick", "payload": sent[i] + 1});
                    let response =
                        http.post(&url).bearer_auth(KEY).json(&body).send().await.expect("request");
                    let status = response.status();
                    let text = response.text().await.unwrap_or_default();
                    assert_eq!(
                        status,
                        200,
                        "publishing to a healthy master failed after {:?}: {text}",
                        started.elapsed()
                    );
                    sent[i] += 1;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            sent
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.node(victim_master).kill();
    let killed = Instant::now();
    // Until the replica took over, publishing to the victim's channel fails; then the message
    // arrives live, or, when it was published before this instance subscribed on the new
    // master, the client is closed with 4009 and recovers it: never silently lost.
    let mut n = 0;
    let resumed = loop {
        n += 1;
        let answer =
            publish(&app, &json!({"channel": format!("tenant:{victim}"), "type": "after", "payload": n}))
                .await;
        if answer.status == 200 {
            let frame = match victim_client.next_data_or_close().await {
                Ok(frame) => frame,
                Err(close) => {
                    assert_eq!(close.map(|c| u16::from(c.code)), Some(4009));
                    let since = format!("&since={}", since_of(&position));
                    let welcome;
                    (victim_client, welcome) = app.connect_with_query("u1", &victim, &since).await;
                    assert_eq!(welcome["payload"]["recovered"], true, "{welcome}");
                    victim_client.next_json().await
                }
            };
            assert_eq!((frame["type"].as_str(), &frame["payload"]), (Some("after"), &json!(n)), "{frame}");
            break killed.elapsed();
        }
        assert!(killed.elapsed() < Duration::from_secs(10), "no failover: {:?}", answer.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(resumed < Duration::from_secs(5), "delivery resumed only after {resumed:?}");
    assert_ne!(cluster.master_of(cluster.keyslot(&format!("tenant:{victim}"))), victim_master);
    // Every message to the other tenants arrived, in order, without a gap or a close.
    let sent = publisher.await.expect("publisher");
    for (client, count) in other_clients.iter_mut().zip(sent) {
        for expected in 1..=count {
            let frame = client.next_json().await;
            assert_eq!(
                (frame["type"].as_str(), &frame["payload"]),
                (Some("tick"), &json!(expected)),
                "{frame}"
            );
        }
        client.expect_nothing_pending().await;
    }
}

#[tokio::test]
async fn presence_is_shared_by_the_instances_of_a_cluster() {
    let cluster = RedisCluster::start(false);
    let (a, b) = (
        on_cluster_with(&cluster, &[("PRESENCE", "on")]).await,
        on_cluster_with(&cluster, &[("PRESENCE", "on")]).await,
    );
    let (mut watcher, _) = a.connect_with_query("ann", "acme", "&presence=1").await;
    let _bob = b.connect("bob", "acme").await;
    // Ann saw her own join first, then Bob's, announced by the other instance.
    let mut joined = Vec::new();
    while joined.len() < 2 {
        let frame = watcher.next_json().await;
        if frame["type"] == "presence.join" {
            joined.push(frame["payload"]["user_id"].as_str().expect("user").to_owned());
        }
    }
    assert!(joined.contains(&"bob".to_owned()), "{joined:?}");
    let answer =
        a.http.get(a.url("/api/tenants/acme/presence")).bearer_auth(KEY).send().await.expect("request");
    let body: Value = answer.json().await.expect("JSON");
    let mut users: Vec<String> = body["users"]
        .as_array()
        .expect("users")
        .iter()
        .map(|u| u["user_id"].as_str().expect("id").to_owned())
        .collect();
    users.sort();
    assert_eq!(users, ["ann", "bob"]);
}

/// Moves `slot` from the master on `from` to the master on `to`, its keys included, as
/// `redis-cli --cluster reshard` does.
fn migrate_slot(cluster: &RedisCluster, slot: u16, from: u16, to: u16) {
    let (from_id, to_id) = (redis_cli(from, &["CLUSTER", "MYID"]), redis_cli(to, &["CLUSTER", "MYID"]));
    let slot = slot.to_string();
    assert_eq!(redis_cli(to, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id]), "OK");
    assert_eq!(redis_cli(from, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id]), "OK");
    loop {
        let keys = redis_cli(from, &["CLUSTER", "GETKEYSINSLOT", &slot, "100"]);
        let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
        if keys.is_empty() {
            break;
        }
        let port = to.to_string();
        let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
        args.extend(keys);
        assert_eq!(redis_cli(from, &args), "OK");
    }
    for node in &cluster.nodes {
        redis_cli(node.port, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]);
    }
}

#[tokio::test]
async fn when_a_slot_moves_to_another_master_its_channels_follow_and_the_others_never_stop() {
    let cluster = RedisCluster::start(false);
    let app = on_cluster(&cluster).await;
    let tenants = tenant_per_master(&cluster);
    let mut owners = tenants.keys().copied();
    let (from, to) = (owners.next().expect("a master"), owners.next().expect("another"));
    let (moving, staying) = (tenants[&from].clone(), tenants[&to].clone());
    let (mut moving_client, welcome) = app.connect_with_welcome("u1", &moving).await;
    let position = welcome["payload"]["positions"][format!("tenant:{moving}")].clone();
    let mut staying_client = app.connect("u1", &staying).await;
    let note =
        |tenant: &str, n: u32| json!({"channel": format!("tenant:{tenant}"), "type": "note", "payload": n});
    assert_eq!(publish(&app, &note(&moving, 1)).await.status, 200);
    assert_eq!(moving_client.next_json().await["payload"], 1);

    let slot = cluster.keyslot(&format!("tenant:{moving}"));
    migrate_slot(&cluster, slot, from, to);
    assert_eq!(cluster.master_of(slot), to);
    // Publishing follows the slot at once (MOVED); the history moved with it, so offsets go on.
    let answer = publish(&app, &note(&moving, 2)).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(publish(&app, &note(&staying, 1)).await.status, 200);
    assert_eq!(staying_client.next_json().await["payload"], 1, "the other channels never stop");
    // The moved channel's message arrives live once the instance subscribed on the new owner, or
    // through a 4009 close and recovery when it was published before: never lost.
    let frame = match moving_client.next_data_or_close().await {
        Ok(frame) => frame,
        Err(close) => {
            assert_eq!(close.map(|c| u16::from(c.code)), Some(4009));
            let since = format!("&since={}:1", position["epoch"].as_str().expect("epoch"));
            let welcome;
            (moving_client, welcome) = app.connect_with_query("u1", &moving, &since).await;
            assert_eq!(welcome["payload"]["recovered"], true, "{welcome}");
            moving_client.next_json().await
        }
    };
    assert_eq!((frame["payload"].clone(), frame["offset"].clone()), (json!(2), json!(2)), "{frame}");
    // And later messages arrive live.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(publish(&app, &note(&moving, 3)).await.status, 200);
    assert_eq!(moving_client.next_json().await["payload"], 3);
}

#[tokio::test]
async fn the_topics_of_one_tenant_spread_over_the_masters_and_reach_their_subscribers_on_another_instance() {
    let cluster = RedisCluster::start(false);
    let (a, b) = (on_cluster(&cluster).await, on_cluster(&cluster).await);
    // One topic of tenant acme per master.
    let mut per_master = BTreeMap::new();
    for n in 0.. {
        let topic = format!("room-{n}");
        per_master.entry(cluster.master_of(cluster.keyslot(&format!("topic:acme:{topic}")))).or_insert(topic);
        if per_master.len() == 3 {
            break;
        }
    }
    let caps = json!({"caps": [{"channels": ["*"], "allow": ["sub", "pub"]}]});
    let subscriber = token_with("bob", "acme", &caps);
    let mut bob = a.try_connect(&subscriber).await.expect("connected");
    assert_eq!(bob.next_json().await["type"], "welcome");
    let publisher = token_with("eve", "acme", &caps);
    let mut eve = b.try_connect(&publisher).await.expect("connected");
    assert_eq!(eve.next_json().await["type"], "welcome");
    for topic in per_master.values() {
        bob.send_json(&json!({"type": "subscribe", "channel": topic})).await;
        let subscribed = bob.next_json().await;
        assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
    }
    for topic in per_master.values() {
        eve.send_json(&json!({"type": "message", "channel": topic, "payload": {"on": topic}})).await;
        let frame = bob.next_json().await;
        assert_eq!(frame["channel"], format!("topic:acme:{topic}"), "{frame}");
        assert_eq!(
            (frame["payload"]["on"].as_str(), frame["offset"].as_u64()),
            (Some(topic.as_str()), Some(1))
        );
    }
    eve.expect_nothing_pending().await;
}
