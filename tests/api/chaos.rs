//! Chaos: an instance is killed with SIGKILL while webhooks flow to 300 clients' tenants and
//! server-API messages to the topics they subscribed to, a third of the clients over
//! Server-Sent Events; its clients reconnect elsewhere with their last positions (`since=`, or
//! the stream's `Last-Event-ID`) and subscribe again with their topic's last position. Every
//! client must end up with every message of its tenant and of its topic exactly once and in
//! order, and every frame of either channel at the offset after the previous one. Presence is on,
//! as by default, and a third of the clients ask for the tenant's announcements.
//!
//! The same run is made a second time with the instances keeping every message in PostgreSQL
//! and Redis, instead of an instance, killed and restarted empty: every client is told its
//! instance missed messages (the channels start new epochs), reconnects, and recovers the old
//! epoch's tail from PostgreSQL and then the new epoch.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::*;
use crate::process::{Process, start};
use crate::redis_support::RedisServer;

const INSTANCES: usize = 3;
const CLIENTS: usize = 300;
const TENANTS: usize = 10;
/// Per tenant: 3,000 messages in all.
const MESSAGES_PER_TENANT: u64 = 300;
/// Topics per tenant; client `i` subscribes to topic `i % TOPICS` of its tenant.
const TOPICS: usize = 3;
/// Per topic: 3,000 topic messages in all, published through the server API.
const MESSAGES_PER_TOPIC: u64 = 100;
const API_KEY: &str = "chaos-api-key-0123456789";
/// Each tenant's publisher sends one message per interval: 200 messages/s in all.
const INTERVAL: Duration = Duration::from_millis(50);

fn tenant(i: usize) -> String {
    format!("chaos{}", i % TENANTS)
}

fn topic(i: usize) -> String {
    format!("t{}", i % TOPICS)
}

fn secret(tenant: &str) -> String {
    format!("{tenant}-webhook-secret")
}

/// What one client received.
#[derive(Debug, Default)]
struct Received {
    sequence: Vec<u64>,
    reconnects: u32,
    /// Reconnections over SSE, with `Last-Event-ID`.
    sse_reconnects: u32,
    not_recovered: u32,
    /// Frames of the tenant channel or the topic whose offset did not follow the previous one:
    /// a gap or a repeat.
    offset_faults: u32,
    /// What arrived of the client's topic.
    topic_sequence: Vec<u64>,
    /// Subscriptions again with `since` (after a reconnection, or an `unsubscribed` that asked
    /// for it), and those not recovered.
    resubscribes: u32,
    topic_not_recovered: u32,
}

/// Where a client stands in one channel: `<epoch>:<offset>` of its last frame, and the offset.
#[derive(Debug, Default)]
struct Stand {
    position: Option<String>,
    last: Option<u64>,
}

impl Stand {
    /// Takes the position of a frame: counts a fault unless its offset follows the last one,
    /// or starts a new epoch at 1 (after Redis lost its data).
    fn advance(&mut self, frame: &Value, faults: &mut u32) {
        let offset = frame["offset"].as_u64().expect("an offset");
        let epoch = frame["epoch"].as_str().expect("epoch");
        let same_epoch =
            self.position.as_ref().is_some_and(|p| p.rsplit_once(':').is_some_and(|(e, _)| e == epoch));
        let follows = match self.last {
            None => true,
            Some(last) if same_epoch => offset == last + 1,
            Some(_) => offset == 1,
        };
        if !follows {
            *faults += 1;
        }
        self.at(epoch, offset);
    }

    fn at(&mut self, epoch: &str, offset: u64) {
        self.last = Some(offset);
        self.position = Some(format!("{epoch}:{offset}"));
    }

    /// Where a channel stands, from a welcome's or a `subscribed` frame's position.
    fn reset(&mut self, position: &Value) {
        self.at(position["epoch"].as_str().expect("epoch"), position["offset"].as_u64().expect("offset"));
    }
}

/// What the client must do after a frame.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Read,
    /// Subscribe to its topic, from where it stands in it.
    Subscribe,
    Done,
}

/// What a client keeps between connections.
#[derive(Debug, Default)]
struct Follow {
    received: Received,
    /// The tenant channel: a WebSocket client's `since`.
    tenant: Stand,
    /// The topic: the `since` of each subscription after the first.
    topic: Stand,
    /// The last event id of an SSE client's stream: its `Last-Event-ID`.
    event_id: Option<String>,
    /// The current connection's id (an SSE client posts its frames there).
    connection_id: String,
}

impl Follow {
    fn done(&self) -> bool {
        self.received.sequence.len() == MESSAGES_PER_TENANT as usize
            && self.received.topic_sequence.len() == MESSAGES_PER_TOPIC as usize
    }

    /// The `subscribe` frame for the client's topic.
    fn subscribe(&self, i: usize) -> Value {
        match &self.topic.position {
            Some(since) => json!({"type": "subscribe", "channel": topic(i), "since": since}),
            None => json!({"type": "subscribe", "channel": topic(i)}),
        }
    }

    /// Takes one frame.
    fn frame(&mut self, frame: &Value, tenant: &str, connected: &AtomicUsize) -> Next {
        let Self { received, tenant: position, event_id, .. } = self;
        match frame["type"].as_str() {
            Some("welcome") => {
                let payload = &frame["payload"];
                self.connection_id = payload["connection_id"].as_str().expect("an id").to_owned();
                if position.position.is_some() {
                    received.reconnects += 1;
                    received.sse_reconnects += u32::from(event_id.is_some());
                    if payload["recovered"] != true {
                        received.not_recovered += 1;
                    }
                }
                // Recovered: the replay follows and moves the position on. Not recovered
                // (counted above): the client would resync; it carries on from here.
                if position.position.is_none() || payload["recovered"] != true {
                    position.reset(&payload["positions"][format!("tenant:{tenant}")]);
                }
                return Next::Subscribe;
            }
            Some("webhook") => {
                received.sequence.push(frame["payload"]["data"]["seq"].as_u64().expect("a sequence number"));
                position.advance(frame, &mut received.offset_faults);
            }
            Some("subscribed") => {
                let payload = &frame["payload"];
                if self.topic.position.is_some() {
                    received.resubscribes += 1;
                    if payload["recovered"] != true {
                        received.topic_not_recovered += 1;
                    }
                } else {
                    // Ready once subscribed: a message published before would not be its to get.
                    connected.fetch_add(1, Ordering::Relaxed);
                }
                if self.topic.position.is_none() || payload["recovered"] != true {
                    self.topic.reset(&payload["position"]);
                }
            }
            Some("order") => {
                received.topic_sequence.push(frame["payload"]["seq"].as_u64().expect("a sequence number"));
                self.topic.advance(frame, &mut received.offset_faults);
            }
            // Subscribed again from where it stands: what was missed is recovered.
            Some("unsubscribed") if frame["payload"]["resubscribe"] == true => return Next::Subscribe,
            // Announcements travel on the presence channel, without offsets.
            Some("presence.join" | "presence.leave") => {}
            other => panic!("unexpected frame {other:?}: {frame}"),
        }
        if self.done() { Next::Done } else { Next::Read }
    }
}

/// A client of `tenant(i)` that starts on instance `i % INSTANCES`, and on any disconnection
/// reconnects to the next instance that answers from where it was: a third of the clients over
/// Server-Sent Events with `Last-Event-ID`, the others over WebSocket with `since=`.
async fn client(
    i: usize,
    addrs: Arc<Vec<String>>,
    connected: Arc<AtomicUsize>,
    mut stop: watch::Receiver<bool>,
) -> Received {
    let (tenant, user) = (tenant(i), format!("user{i}"));
    let caps = json!({"caps": [{"channels": ["t*"], "allow": ["sub"]}]});
    let token = token_with(&user, &tenant, &caps);
    // Spread over the instances: each holds SSE and WebSocket clients.
    let over_sse = (i / INSTANCES).is_multiple_of(3);
    let presence = if (i / INSTANCES) % 3 == 1 { "&presence=1" } else { "" };
    let http = reqwest::Client::new();
    let mut follow = Follow::default();
    let mut at = i % INSTANCES;
    while !follow.done() && !*stop.borrow() {
        if over_sse {
            let headers: Vec<(&str, &str)> =
                follow.event_id.iter().map(|id| ("Last-Event-ID", id.as_str())).collect();
            let addr = addrs[at].parse().expect("address");
            let path = format!("/sse?token={token}");
            if let Ok(Ok(mut stream)) = tokio::time::timeout(
                Duration::from_secs(5),
                crate::sse_client::SseClient::open(addr, &path, &headers, None),
            )
            .await
            {
                loop {
                    let event = tokio::select! {
                        event = stream.next_event_or_end() => event,
                        _ = stop.changed() => break,
                    };
                    follow.event_id.clone_from(&stream.last_id);
                    let Some(crate::sse_client::SseEvent::Frame(frame)) = event else { break };
                    match follow.frame(&frame, &tenant, &connected) {
                        Next::Read => {}
                        Next::Done => break,
                        Next::Subscribe => {
                            let url = format!("http://{}/sse/{}", addrs[at], follow.connection_id);
                            let body = follow.subscribe(i).to_string();
                            let posted = http.post(url).bearer_auth(&token).body(body).send().await;
                            // The answer is 202: `subscribed` comes on the stream. A POST that
                            // fails means the stream is ending too.
                            if !posted.is_ok_and(|answer| answer.status() == 202) {
                                break;
                            }
                        }
                    }
                }
            }
        } else {
            let since = follow.tenant.position.as_ref().map(|p| format!("&since={p}")).unwrap_or_default();
            let url = format!("ws://{}/ws?token={token}{since}{presence}", addrs[at]);
            if let Ok((mut socket, _)) = tokio_tungstenite::connect_async(url).await {
                loop {
                    let frame = tokio::select! {
                        frame = socket.next() => frame,
                        _ = stop.changed() => break,
                    };
                    let Some(Ok(Message::Text(text))) = frame else {
                        if matches!(frame, Some(Ok(Message::Ping(_) | Message::Pong(_)))) {
                            continue;
                        }
                        break;
                    };
                    let frame: Value = serde_json::from_str(&text).expect("frames are JSON");
                    match follow.frame(&frame, &tenant, &connected) {
                        Next::Read => {}
                        Next::Done => break,
                        Next::Subscribe => {
                            let subscribe = Message::text(follow.subscribe(i).to_string());
                            if futures_util::SinkExt::send(&mut socket, subscribe).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            }
        }
        at = (at + 1) % INSTANCES;
        if !follow.done() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    follow.received
}

/// Publishes numbered message `seq` to topic `name` of `tenant` through the server API of an
/// instance that stays up (the last two): a publish is not idempotent, so none is left in
/// flight on the instance that is killed. A refused publish was not made (it is atomic) and is
/// sent again.
async fn publish_to_topic(http: &reqwest::Client, addrs: &[String], tenant: &str, name: &str, seq: u64) {
    let body = json!({"channel": format!("topic:{tenant}:{name}"), "type": "order", "payload": {"seq": seq}});
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut at = 1 + seq as usize % (INSTANCES - 1);
    loop {
        let sent = http
            .post(format!("http://{}/api/publish", addrs[at]))
            .bearer_auth(API_KEY)
            .json(&body)
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        if sent.is_ok_and(|response| response.status().is_success()) {
            return;
        }
        assert!(Instant::now() < deadline, "topic message {tenant}:{name}-{seq} not accepted within 60 s");
        at = 1 + (at % (INSTANCES - 1));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends one numbered webhook, retrying on the next instance (same delivery id) until one
/// accepts it: connection refused, 5xx and 409 (the delivery is still in flight elsewhere)
/// are all retried, as a webhook sender does.
async fn publish(http: &reqwest::Client, addrs: &[String], tenant: &str, seq: u64, first: usize) {
    let body = serde_json::to_vec(&json!({"seq": seq})).expect("JSON");
    let signature = signature(&secret(tenant), &body);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut at = first;
    loop {
        let sent = http
            .post(format!("http://{}/webhooks/chaos", addrs[at]))
            .header("x-tenant-id", tenant)
            .header("x-signature", &signature)
            .header("x-webhook-id", format!("{tenant}-{seq}"))
            .timeout(Duration::from_secs(5))
            .body(body.clone())
            .send()
            .await;
        if sent.is_ok_and(|response| response.status().is_success()) {
            return;
        }
        assert!(Instant::now() < deadline, "webhook {tenant}-{seq} not accepted within 60 s");
        at = (at + 1) % INSTANCES;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn ready(http: &reqwest::Client, addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = http.get(format!("http://{addr}/ready")).send().await.map(|r| r.status().as_u16());
        if status.is_ok_and(|s| s == 200) {
            return;
        }
        assert!(Instant::now() < deadline, "{addr} not ready within 10 s");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Lost, duplicated and out-of-order messages of a sequence that should be `0..expected` in
/// order.
fn count_faults(sequence: &[u64], expected: u64) -> (u64, u64, u64) {
    let mut seen = std::collections::HashSet::new();
    let duplicated = sequence.iter().filter(|seq| !seen.insert(**seq)).count() as u64;
    let lost = (0..expected).filter(|seq| !seen.contains(seq)).count() as u64;
    let out_of_order = sequence.windows(2).filter(|w| w[1] <= w[0]).count() as u64;
    (lost, duplicated, out_of_order)
}

/// What the chaos kills halfway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kill {
    /// The first instance, with SIGKILL.
    Instance,
    /// Redis, with SIGKILL, restarted empty a second later; the instances keep every message
    /// in PostgreSQL.
    RedisWithPostgres,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_under_load_loses_and_duplicates_no_message() {
    chaos(Kill::Instance).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_empty_under_load_loses_and_duplicates_no_message_kept_in_postgresql() {
    chaos(Kill::RedisWithPostgres).await;
}

async fn chaos(kill: Kill) {
    let mut redis = RedisServer::start();
    let postgres = (kill == Kill::RedisWithPostgres).then(crate::postgres_support::PostgresServer::start);
    let database = postgres.as_ref().map(|p| p.url()).unwrap_or_default();
    let secrets: serde_json::Map<String, Value> =
        (0..TENANTS).map(|t| (tenant(t), Value::String(secret(&tenant(t))))).collect();
    let secrets = Value::Object(secrets).to_string();
    let url = redis.url();
    let mut env = vec![
        ("REDIS_URL", url.as_str()),
        ("WEBHOOK_SECRETS", secrets.as_str()),
        ("PRESENCE", "on"),
        ("API_KEYS", API_KEY),
    ];
    if postgres.is_some() {
        env.push(("DATABASE_URL", database.as_str()));
    }
    let mut processes: Vec<Process> = Vec::new();
    for _ in 0..INSTANCES {
        processes.push(start(&env).await);
    }
    let addrs: Arc<Vec<String>> = Arc::new(processes.iter().map(|p| p.addr.clone()).collect());
    let http = reqwest::Client::new();
    for addr in addrs.iter() {
        ready(&http, addr).await;
    }

    let connected = Arc::new(AtomicUsize::new(0));
    let (stop, stopped) = watch::channel(false);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| tokio::spawn(client(i, addrs.clone(), connected.clone(), stopped.clone())))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while connected.load(Ordering::Relaxed) < CLIENTS {
        assert!(Instant::now() < deadline, "only {} clients subscribed", connected.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // One publisher per tenant, each at a steady rate, spread over every instance.
    let published = Arc::new(AtomicUsize::new(0));
    let mut publishers: Vec<_> = (0..TENANTS)
        .map(|t| {
            let (http, addrs, published) = (http.clone(), addrs.clone(), published.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                for seq in 0..MESSAGES_PER_TENANT {
                    tick.tick().await;
                    publish(&http, &addrs, &tenant(t), seq, (t + seq as usize) % INSTANCES).await;
                    published.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // One publisher per topic, spread over the same time as the webhooks.
    let topic_interval = INTERVAL * (MESSAGES_PER_TENANT / MESSAGES_PER_TOPIC) as u32;
    publishers.extend((0..TENANTS * TOPICS).map(|k| {
        let (http, addrs) = (http.clone(), addrs.clone());
        tokio::spawn(async move {
            let (tenant, name) = (tenant(k / TOPICS), topic(k));
            let mut tick = tokio::time::interval(topic_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for seq in 0..MESSAGES_PER_TOPIC {
                tick.tick().await;
                publish_to_topic(&http, &addrs, &tenant, &name, seq).await;
            }
        })
    }));

    // Halfway, the first instance (or Redis) dies without a chance to say goodbye.
    let total = TENANTS * MESSAGES_PER_TENANT as usize;
    while published.load(Ordering::Relaxed) < total / 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    match kill {
        Kill::Instance => processes[0].signal("KILL"),
        Kill::RedisWithPostgres => {
            redis.kill();
            tokio::time::sleep(Duration::from_secs(1)).await;
            redis.restart();
        }
    }
    for publisher in publishers {
        publisher.await.expect("publisher");
    }

    // Give the clients time to drain, then stop whoever is still waiting.
    let drain = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(45)).await;
        let _ = stop.send(true);
    });
    let mut reports = Vec::new();
    for client in clients {
        reports.push(client.await.expect("client"));
    }
    drain.abort();

    let (mut lost, mut duplicated, mut out_of_order, mut reconnects, mut not_recovered) = (0, 0, 0, 0, 0);
    let offset_faults: u32 = reports.iter().map(|r| r.offset_faults).sum();
    let (mut topic_lost, mut topic_duplicated, mut topic_out_of_order) = (0, 0, 0);
    for report in &reports {
        let (l, d, o) = count_faults(&report.topic_sequence, MESSAGES_PER_TOPIC);
        (topic_lost, topic_duplicated, topic_out_of_order) =
            (topic_lost + l, topic_duplicated + d, topic_out_of_order + o);
    }
    let resubscribes: u32 = reports.iter().map(|r| r.resubscribes).sum();
    let topic_not_recovered: u32 = reports.iter().map(|r| r.topic_not_recovered).sum();
    let topic_delivered: usize = reports.iter().map(|r| r.topic_sequence.len()).sum();
    for (n, report) in reports.iter().enumerate() {
        let (l, _, _) = count_faults(&report.topic_sequence, MESSAGES_PER_TOPIC);
        if l > 0 {
            let missing: Vec<u64> =
                (0..MESSAGES_PER_TOPIC).filter(|seq| !report.topic_sequence.contains(seq)).collect();
            println!(
                "client {n}: {} reconnections, {} subscriptions again, topic messages missing: {missing:?}",
                report.reconnects, report.resubscribes
            );
        }
        let (l, d, o) = count_faults(&report.sequence, MESSAGES_PER_TENANT);
        if l + d + o > 0 {
            // What a failure looks like, to tell where it comes from.
            let at = report.sequence.windows(2).position(|w| w[1] <= w[0]).unwrap_or(0);
            let around = &report.sequence[at.saturating_sub(3)..report.sequence.len().min(at + 4)];
            println!(
                "client {n}: {} reconnections, sequence around the fault: {around:?}",
                report.reconnects
            );
        }
        lost += l;
        duplicated += d;
        out_of_order += o;
        reconnects += report.reconnects;
        not_recovered += report.not_recovered;
    }
    let delivered: usize = reports.iter().map(|r| r.sequence.len()).sum();
    let sse_reconnects: u32 = reports.iter().map(|r| r.sse_reconnects).sum();
    println!(
        "chaos: {CLIENTS} clients, {total} messages, {delivered} deliveries, {reconnects} reconnections \
         ({sse_reconnects} over SSE with Last-Event-ID, {not_recovered} not recovered): lost = {lost}, duplicated = {duplicated}, out of order = {out_of_order}, \
         offsets not following = {offset_faults}"
    );
    println!(
        "chaos topics: {} topic messages, {topic_delivered} deliveries, {resubscribes} subscriptions again with since \
         ({topic_not_recovered} not recovered): lost = {topic_lost}, duplicated = {topic_duplicated}, out of order = {topic_out_of_order}",
        TENANTS * TOPICS * MESSAGES_PER_TOPIC as usize
    );
    assert!(reconnects as usize >= CLIENTS / INSTANCES, "the killed instance's clients reconnected");
    assert!(sse_reconnects > 0 && sse_reconnects < reconnects, "both transports reconnected");
    assert_eq!(not_recovered, 0, "every reconnection recovered");
    assert_eq!((lost, duplicated, out_of_order, offset_faults), (0, 0, 0, 0));
    assert_eq!(delivered, CLIENTS * MESSAGES_PER_TENANT as usize);
    // A reconnection closed again before its `subscribed` arrived subscribes once more on the
    // next one: what counts is that every client ends with every topic message, below.
    assert!(
        resubscribes as usize >= CLIENTS / INSTANCES,
        "the reconnected clients subscribed again with since"
    );
    assert_eq!(topic_not_recovered, 0, "every subscription again recovered");
    assert_eq!((topic_lost, topic_duplicated, topic_out_of_order), (0, 0, 0));
    assert_eq!(topic_delivered, CLIENTS * MESSAGES_PER_TOPIC as usize);
}
