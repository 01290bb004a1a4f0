//! The dashboard at `/admin` in a real browser (headless Chromium through `chromedriver`), over
//! two instances joined by a real `redis-server`. A screenshot is saved to
//! `target/browser/admin.png`.

use serde_json::json;

use crate::browser::{Browser, PATIENCE_IN_PAGE};
use crate::helpers::*;
use crate::redis_support::RedisServer;
use crate::stats::KEY;

/// The text of `css` in the page, or `null` when nothing matches.
fn text_of(css: &str) -> String {
    format!("const e = document.querySelector('{css}'); return e && e.textContent;")
}

/// Whether the text of `css` in the page is `text`.
fn text_equals(css: &str, text: &str) -> String {
    format!("const e = document.querySelector('{css}'); return e !== null && e.textContent === '{text}';")
}

#[tokio::test]
async fn the_dashboard_shows_both_instances_live_then_a_failing_webhook_and_its_actions_reach_clients() {
    let redis = RedisServer::start();
    let vars = [("API_KEYS", KEY), ("ADMIN", "on")];
    let (a, b) = (spawn_on_redis(&redis.url(), &vars).await, spawn_on_redis(&redis.url(), &vars).await);
    let browser = Browser::start().await;
    browser.goto(&a.url("/admin")).await;

    browser.fill("#key", "not-a-key-of-this-cluster").await;
    browser.click("#sign-in").await;
    let refused = browser
        .until("a wrong key is refused", "return document.getElementById('state').dataset.state === 'refused' && document.getElementById('state').textContent;", PATIENCE_IN_PAGE)
        .await;
    assert!(refused.as_str().is_some_and(|t| t.contains("401")), "{refused}");
    assert_eq!(browser.eval("return document.getElementById('dashboard').hidden;").await, true);

    browser.fill("#key", KEY).await;
    browser.click("#sign-in").await;
    browser
        .until(
            "both instances listed live",
            "return document.querySelectorAll('#instances tbody tr[data-state=live]').length === 2;",
            PATIENCE_IN_PAGE,
        )
        .await;
    assert_eq!(
        browser.eval("return location.href.includes('operator');").await,
        false,
        "the key is not in the URL"
    );

    // Connections rise on both instances; the page shows the tenant's sum.
    let mut alice_on_b = b.connect("alice", "acme").await;
    let mut bob_on_a = a.connect("bob", "acme").await;
    let connections = browser
        .until(
            "acme's two connections",
            &text_of("#tenants tr[data-tenant=acme] .connections"),
            PATIENCE_IN_PAGE,
        )
        .await;
    assert_eq!(connections, "2");
    let spread = browser.eval(&text_of("#tenants tr[data-tenant=acme] .per-instance")).await;
    assert!(spread.as_str().is_some_and(|t| t.matches(" 1").count() == 2), "one on each instance: {spread}");
    browser.until("the total", &text_equals("#total-connections", "2"), PATIENCE_IN_PAGE).await;

    // A webhook refused by instance b appears on the page served by instance a.
    let refused = b.post_signed_webhook("github", "acme", "not-the-secret", &json!({"n": 1})).await;
    assert_eq!(refused.status, 401);
    let failure = browser
        .until(
            "the failing webhook",
            "const r = document.querySelector('#failures tbody tr'); return r && r.textContent;",
            PATIENCE_IN_PAGE,
        )
        .await;
    let failure = failure.as_str().unwrap_or_default();
    assert!(
        failure.contains("acme")
            && failure.contains("github")
            && failure.contains("signature does not match"),
        "{failure}"
    );
    assert!(!failure.contains("not-the-secret"));

    // A test message published from the page reaches the tenant's clients.
    browser.fill("#publish-channel", "tenant:acme").await;
    browser.click("#publish").await;
    let frame = bob_on_a.next_json().await;
    assert_eq!(
        (frame["type"].as_str(), frame["payload"]["text"].as_str()),
        (Some("test"), Some("test message from the dashboard"))
    );
    browser.until("the publish result", "return document.getElementById('action-result').textContent.startsWith('Published to tenant:acme');", PATIENCE_IN_PAGE).await;

    // The charts have drawn the tenant before the screenshot.
    browser
        .until(
            "acme charted",
            "return document.querySelector('#chart-connections polyline[data-series=acme]') !== null;",
            PATIENCE_IN_PAGE,
        )
        .await;
    browser.eval("window.scrollTo(0, 0); return true;").await;
    let shot = browser.screenshot("admin.png").await;
    assert!(
        std::fs::metadata(&shot).is_ok_and(|m| m.len() > 10_000),
        "a real screenshot at {}",
        shot.display()
    );

    // Disconnecting alice from the page closes her connection on the other instance with 4003.
    browser.fill("#disconnect-tenant", "acme").await;
    browser.fill("#disconnect-user", "alice").await;
    browser.click("#disconnect").await;
    let close = alice_on_b.expect_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 4003);
    let result = browser
        .until("the disconnect result", "const t = document.getElementById('action-result').textContent; return t.startsWith('Disconnected') && t;", PATIENCE_IN_PAGE)
        .await;
    assert!(result.as_str().is_some_and(|t| t.contains("2 instance")), "{result}");
    bob_on_a.expect_nothing_pending().await;
    browser
        .until(
            "acme down to one connection",
            &text_equals("#tenants tr[data-tenant=acme] .connections", "1"),
            PATIENCE_IN_PAGE,
        )
        .await;
}
