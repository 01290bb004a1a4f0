//! Cluster-wide statistics: two instances joined by a real `redis-server`, each answering
//! `GET /api/stats` with what both did; its event stream; and who may read them.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::*;
use crate::redis_support::RedisServer;

pub(crate) const KEY: &str = "operator-api-key-0123456789";

/// `GET /api/stats` with the operator's key.
async fn stats(app: &TestApp) -> Value {
    let response = app.http.get(app.url("/api/stats")).bearer_auth(KEY).send().await.expect("GET /api/stats");
    assert_eq!(response.status(), 200);
    response.json().await.expect("JSON")
}

/// The statistics of `app` once `expected` holds of them.
async fn until(app: &TestApp, what: &str, expected: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = stats(app).await;
        if expected(&seen) {
            return seen;
        }
        assert!(Instant::now() < deadline, "{what}: not within 10 s; last seen {seen:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn tenant<'a>(stats: &'a Value, name: &str) -> &'a Value {
    stats["tenants"].as_array().and_then(|t| t.iter().find(|t| t["tenant"] == name)).unwrap_or(&Value::Null)
}

/// The events of a statistics stream.
pub(crate) struct EventReader {
    response: reqwest::Response,
    buffer: String,
}

impl EventReader {
    pub(crate) fn new(response: reqwest::Response) -> Self {
        Self { response, buffer: String::new() }
    }

    /// The next event's name and data (comments skipped).
    async fn next(&mut self) -> (String, Value) {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut name = String::from("message");
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("event: ") {
                        name = value.to_owned();
                    } else if let Some(value) = line.strip_prefix("data: ") {
                        data.push_str(value);
                    }
                }
                if data.is_empty() {
                    continue;
                }
                return (name, serde_json::from_str(&data).expect("JSON data"));
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.response.chunk())
                .await
                .expect("an event within 10 s")
                .expect("the stream reads")
                .expect("the stream goes on");
            self.buffer.push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
        }
    }

    /// The first `name` event for which `expected` holds.
    pub(crate) async fn until(&mut self, name: &str, expected: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (event, data) = self.next().await;
            if event == name && expected(&data) {
                return data;
            }
            assert!(Instant::now() < deadline, "no {name} event as expected within 15 s; last: {data}");
        }
    }
}

#[tokio::test]
async fn either_instance_reports_the_connections_messages_and_webhooks_of_both() {
    let redis = RedisServer::start();
    // Without presence, no join announcement is published: every message counted is the test's.
    let vars = [("API_KEYS", KEY), ("PRESENCE", "off")];
    let (a, b) = (spawn_on_redis(&redis.url(), &vars).await, spawn_on_redis(&redis.url(), &vars).await);
    let mut alice_on_a = a.connect("alice", "acme").await;
    let mut bob_on_b = b.connect("bob", "acme").await;
    let mut bob_again_on_b = b.connect("bob", "acme").await;
    let _carol_on_b = b.connect("carol", "globex").await;

    for n in 0..3 {
        alice_on_a.send_json(&json!({"type": "message", "payload": {"n": n}})).await;
    }
    let accepted = b.post_signed_webhook("github", "acme", ACME_SECRET, &json!({"n": 3})).await;
    assert_eq!(accepted.status, 200);
    for client in [&mut alice_on_a, &mut bob_on_b, &mut bob_again_on_b] {
        for _ in 0..4 {
            client.next_json().await;
        }
    }
    let wrong = a.post_signed_webhook("github", "acme", "not-the-secret", &json!({})).await;
    assert_eq!(wrong.status, 401);
    let stranger = a.post_signed_webhook("github", "nobody", ACME_SECRET, &json!({})).await;
    assert_eq!(stranger.status, 404);

    for (name, app) in [("a", &a), ("b", &b)] {
        let seen = until(app, &format!("instance {name} sees both instances' figures"), |s| {
            s["totals"]["instances"] == 2
                && s["totals"]["connections"] == 4
                && tenant(s, "acme")["messages_out_last_minute"] == 12
                && s["webhook_failures"].as_array().is_some_and(|f| f.len() == 2)
        })
        .await;
        let mut per_instance: Vec<u64> = seen["instances"]
            .as_array()
            .expect("instances")
            .iter()
            .map(|i| i["connections"].as_u64().unwrap_or(99))
            .collect();
        per_instance.sort_unstable();
        assert_eq!(per_instance, [1, 3], "{seen:#}");
        assert!(
            seen["instances"]
                .as_array()
                .expect("instances")
                .iter()
                .all(|i| i["broker"] == "up" && i["silent"] == false)
        );

        let acme = tenant(&seen, "acme");
        assert_eq!(acme["connections"], 3);
        assert_eq!(acme["users"], 2, "alice on a, bob on b");
        assert_eq!(acme["instances"], 2);
        let mut by_instance: Vec<u64> = acme["connections_by_instance"]
            .as_object()
            .expect("by instance")
            .values()
            .filter_map(Value::as_u64)
            .collect();
        by_instance.sort_unstable();
        assert_eq!(by_instance, [1, 2]);
        assert_eq!(acme["messages_in_last_minute"], 4, "three client messages and a webhook: {acme}");
        assert_eq!(acme["messages_in_per_sec"], 0.07, "4 over the last 60 s");
        assert_eq!(acme["webhooks"]["github"], json!({"accepted": 1, "refused": 1}));
        let globex = tenant(&seen, "globex");
        assert_eq!(
            (globex["connections"].as_u64(), globex["messages_in_last_minute"].as_u64()),
            (Some(1), Some(0))
        );
        assert!(tenant(&seen, "nobody").is_null(), "a tenant without a secret is not counted: {seen:#}");

        assert_eq!(seen["totals"]["webhooks_accepted_last_minute"], 1);
        assert_eq!(seen["totals"]["webhooks_refused_last_minute"], 2);
        assert_eq!(
            seen["top_channels"][0],
            json!({"channel": "tenant:acme", "messages_per_sec": 0.07, "messages_last_minute": 4})
        );
        let failures = seen["webhook_failures"].as_array().expect("failures");
        assert_eq!(failures[0]["tenant"], "nobody", "newest first");
        assert_eq!(failures[0]["result"], "not_found");
        assert_eq!(failures[0]["reason"], "no webhook secret is configured for this tenant and provider");
        assert_eq!(failures[1]["tenant"], "acme");
        assert_eq!(failures[1]["provider"], "github");
        assert_eq!(failures[1]["result"], "unauthorized");
        assert_eq!(
            failures[1]["reason"],
            "the signature does not match: signed with another secret, or the body changed on the way"
        );
        let text = seen.to_string();
        for secret in ["not-the-secret", ACME_SECRET, KEY] {
            assert!(!text.contains(secret), "no secret in the statistics");
        }
    }

    drop(bob_on_b);
    drop(bob_again_on_b);
    until(&a, "the closed connections leave the figures", |s| tenant(s, "acme")["connections"] == 1).await;
}

#[tokio::test]
async fn the_stream_sends_the_history_then_each_change_and_a_stopped_instance_falls_silent() {
    let redis = RedisServer::start();
    let vars = [("API_KEYS", KEY)];
    let (a, b) = (spawn_on_redis(&redis.url(), &vars).await, spawn_on_redis(&redis.url(), &vars).await);
    until(&a, "both instances report", |s| s["totals"]["instances"] == 2).await;
    let response =
        a.http.get(a.url("/api/stats/stream")).bearer_auth(KEY).send().await.expect("GET /api/stats/stream");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut events = EventReader::new(response);
    let (name, history) = events.next().await;
    assert_eq!(name, "history");
    assert!(
        history.as_array().is_some_and(|samples| !samples.is_empty()),
        "samples since the start: {history}"
    );
    let (name, first) = events.next().await;
    assert_eq!(name, "stats");
    assert_eq!(first["totals"]["instances"], 2);

    let _dave = b.connect("dave", "initech").await;
    let seen = events.until("stats", |s| tenant(s, "initech")["connections"] == 1).await;
    assert_eq!(seen["totals"]["instances"], 2);
    let sample = events
        .until("sample", |s| {
            s["tenants"].as_array().is_some_and(|t| t.iter().any(|t| t["tenant"] == "initech"))
        })
        .await;
    assert_eq!(sample["connections"], 1);

    b.shutdown().await;
    let seen = events
        .until("stats", |s| s["instances"].as_array().is_some_and(|i| i.iter().any(|i| i["silent"] == true)))
        .await;
    assert_eq!(seen["totals"]["instances"], 1);
    assert_eq!(seen["totals"]["connections"], 0, "the stopped instance's connections no longer count");
}

#[tokio::test]
async fn the_statistics_need_a_key_and_the_dashboard_is_served_only_when_turned_on() {
    let app = spawn_ready(&[("API_KEYS", KEY)]).await;
    for path in ["/api/stats", "/api/stats/stream"] {
        let anonymous = app.get(path).await;
        assert_eq!(anonymous.status, 401, "{path}");
        assert_eq!(anonymous.body["code"], "unauthorized");
        let wrong =
            app.http.get(app.url(path)).bearer_auth("wrong-key-0123456789").send().await.expect("GET");
        assert_eq!(wrong.status(), 401, "{path}");
    }
    assert_eq!(app.get("/admin").await.status, 404, "off by default outside demo mode");

    let on = spawn_ready(&[("API_KEYS", KEY), ("ADMIN", "on")]).await;
    let page = on.http.get(on.url("/admin")).send().await.expect("GET /admin");
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"].to_str().expect("ASCII").to_owned();
    assert!(csp.contains("script-src 'self'") && csp.contains("connect-src 'self'"), "{csp}");
    let html = page.text().await.expect("text");
    assert!(!html.contains("http://") && !html.contains("https://"), "nothing from elsewhere: no CDN");
    for asset in ["/admin/admin.js", "/admin/admin.css"] {
        assert_eq!(on.get(asset).await.status, 200, "{asset}");
    }
    assert_eq!(
        on.get("/admin/config").await.body,
        json!({"demo_key": null}),
        "no key handed out outside demo mode"
    );
}

#[tokio::test]
async fn in_demo_mode_the_dashboard_is_on_and_hands_its_page_the_key_of_the_process() {
    let demo = spawn_demo().await;
    assert_eq!(demo.get("/admin").await.status, 200);
    let key = demo.get("/admin/config").await.body["demo_key"].as_str().expect("a demo key").to_owned();
    let response = demo.http.get(demo.url("/api/stats")).bearer_auth(&key).send().await.expect("GET");
    assert_eq!(response.status(), 200, "the demo key opens the server API");
    // A page whose name merely resolves to this machine (DNS rebinding) gets no key.
    let rebound = demo
        .http
        .get(demo.url("/admin/config"))
        .header("host", format!("lq.example.com:{}", demo.addr.port()))
        .send()
        .await
        .expect("GET");
    assert_eq!(rebound.json::<Value>().await.expect("JSON"), json!({"demo_key": null}));
}
