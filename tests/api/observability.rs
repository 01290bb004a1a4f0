//! Metrics and logs as an operator sees them: a scripted session, then a scrape of `/metrics`.

use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn every_counter_gauge_and_histogram_moves_by_exactly_what_happened() {
    let app = spawn_app().await;
    let before = scrape(&app).await;
    assert_eq!(value(&before, r#"lq_connections{transport="websocket"}"#), 0.0);
    assert_eq!(value(&before, r#"lq_build_info{version="0.1.0"}"#), 1.0);

    // Three clients connect; two bad tokens and one without the scope are refused.
    let mut clients = Vec::new();
    for user in ["bob", "eve", "carol"] {
        clients.push(app.connect(user, "acme").await);
    }
    for bad in ["garbage", "also-garbage"] {
        assert_eq!(app.try_connect(bad).await.err().map(|e| e.0), Some(401));
    }
    let no_scope = sign_claims(
        &json!({"user_id": "dan", "tenant_id": "acme", "scope": "read", "exp": now_secs() + 60}),
        jsonwebtoken::Algorithm::HS256,
        JWT_SECRET,
    );
    assert_eq!(app.try_connect(&no_scope).await.err().map(|e| e.0), Some(403));

    // Four client messages and two webhooks, each fanned out to the three clients.
    for n in 0..4 {
        clients[0].send_json(&json!({"type": "message", "payload": n})).await;
    }
    for n in 0..2 {
        assert_eq!(
            app.post_signed_webhook("github", "acme", ACME_SECRET, &json!({"n": n})).await.status,
            200
        );
    }
    assert_eq!(app.post_webhook("github", Some("acme"), Some("sha256=00"), b"{}".to_vec()).await.status, 401);
    for client in &mut clients {
        for _ in 0..6 {
            client.next_json().await;
        }
    }
    // The channel gauges follow within a sweep (250 ms): tenant:acme, three user channels,
    // global:broadcast and system:events.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let during = loop {
        let during = scrape(&app).await;
        if value(&during, "lq_subscribed_channels") == 6.0 {
            break during;
        }
        assert!(tokio::time::Instant::now() < deadline, "lq_subscribed_channels never reached 6");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(value(&during, r#"lq_connections{transport="websocket"}"#), 3.0);
    assert_eq!(value(&during, r#"lq_connections_total{transport="websocket",result="accepted"}"#), 3.0);
    assert_eq!(value(&during, r#"lq_connections_total{transport="websocket",result="unauthorized"}"#), 2.0);
    assert_eq!(value(&during, r#"lq_connections_total{transport="websocket",result="forbidden"}"#), 1.0);
    assert_eq!(value(&during, r#"lq_auth_failures_total{reason="malformed"}"#), 2.0);
    assert_eq!(value(&during, r#"lq_auth_failures_total{reason="missing_scope"}"#), 1.0);
    assert_eq!(value(&during, r#"lq_messages_received_total{source="client"}"#), 4.0);
    assert_eq!(value(&during, r#"lq_messages_received_total{source="webhook"}"#), 2.0);
    assert_eq!(value(&during, r#"lq_messages_received_total{source="broker"}"#), 6.0);
    assert_eq!(value(&during, "lq_messages_sent_total"), 18.0);
    assert_eq!(value(&during, r#"lq_webhooks_total{provider="github",result="accepted"}"#), 2.0);
    assert_eq!(value(&during, r#"lq_webhooks_total{provider="unverified",result="unauthorized"}"#), 1.0);
    assert_eq!(value(&during, "lq_webhook_processing_seconds_count"), 3.0);
    assert_eq!(value(&during, "lq_broker_publish_seconds_count"), 6.0);
    assert_eq!(value(&during, "lq_pubsub_lag_seconds_count"), 6.0);
    assert_eq!(value(&during, r#"lq_messages_dropped_total{reason="slow_consumer"}"#), 0.0);

    // Everyone leaves.
    for client in clients {
        client.close().await;
    }
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let after = loop {
        let after = scrape(&app).await;
        if value(&after, r#"lq_connections{transport="websocket"}"#) == 0.0
            && value(&after, "lq_subscribed_channels") == 2.0
        {
            break after;
        }
        assert!(tokio::time::Instant::now() < deadline, "gauges did not return to idle: {after:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(value(&after, r#"lq_connection_duration_seconds_count{transport="websocket"}"#), 3.0);
    assert_eq!(value(&after, "lq_broker_up"), 1.0);
}

#[tokio::test]
async fn metrics_can_be_served_on_their_own_address_instead() {
    let app = spawn_app_with(test_config(|vars| {
        vars.insert("METRICS_ADDR".into(), "127.0.0.1:0".into());
    }))
    .await;
    assert_eq!(app.get("/metrics").await.status, 404, "not on the main listener");
    let addr = app.metrics_addr.expect("a metrics listener");
    let text =
        reqwest::get(format!("http://{addr}/metrics")).await.expect("scraped").text().await.expect("text");
    assert!(text.contains(r#"lq_connections{transport="websocket"} 0"#), "{text}");
}
