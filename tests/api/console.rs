//! The console in a real browser, as a newcomer meets it: a refused connection shows why (the
//! status and the server's message, which browsers hide from WebSocket pages) and stops instead of
//! retrying; the quick start's two demo users in two tabs.

use std::time::Duration;

use serde_json::json;

use crate::browser::{Browser, PATIENCE_IN_PAGE};
use crate::helpers::*;

/// What the console shows once its state is `closed`: close code, meaning and notice.
async fn closed_with(browser: &Browser, what: &str) -> String {
    browser
        .until(
            what,
            "const s = document.getElementById('state'); if (s.dataset.state !== 'closed') return null; \
             const t = (id) => document.getElementById(id).textContent; \
             return [t('close-code'), t('close-meaning'), t('notice')].join(' | ');",
            PATIENCE_IN_PAGE,
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The state stays `closed`: no reconnection loop.
async fn stays_closed(browser: &Browser) {
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let state = browser.eval("return document.getElementById('state').dataset.state;").await;
    assert_eq!(state, "closed", "the console kept trying");
}

#[tokio::test]
async fn a_bad_an_expired_and_a_missing_token_are_explained_and_not_retried() {
    let app = spawn_ready(&[("CONSOLE", "on")]).await;
    let browser = Browser::start().await;
    browser.goto(&app.url("/")).await;

    browser.fill("#token", "not-a-token").await;
    browser.click("#connect").await;
    let shown = closed_with(&browser, "a bad token refused").await;
    assert!(shown.starts_with("HTTP 401"), "{shown}");
    assert!(
        shown.contains("refused by the server: 401 unauthorized") && shown.contains("token is malformed"),
        "{shown}"
    );
    stays_closed(&browser).await;

    let expired = sign_claims(
        &json!({"sub": "bob", "tenant_id": "acme", "scope": "ws:connect", "exp": now_secs() - 600}),
        jsonwebtoken::Algorithm::HS256,
        JWT_SECRET,
    );
    browser.fill("#token", &expired).await;
    browser.click("#connect").await;
    let shown = closed_with(&browser, "an expired token").await;
    assert!(shown.contains("expired"), "{shown}");
    stays_closed(&browser).await;

    browser.eval("document.getElementById('token').value = ''; return true;").await;
    browser.click("#connect").await;
    let shown = closed_with(&browser, "no token").await;
    assert!(shown.contains("no token"), "{shown}");
    stays_closed(&browser).await;

    // A good token then connects, and the frames carry their time.
    browser.fill("#token", &token("bob", "acme")).await;
    browser.click("#connect").await;
    browser
        .until("open", "return document.getElementById('state').dataset.state === 'open';", PATIENCE_IN_PAGE)
        .await;
    let stamped = browser
        .until(
            "a timestamped frame",
            "const t = document.querySelector('#log li time'); return t && t.textContent;",
            PATIENCE_IN_PAGE,
        )
        .await;
    assert!(stamped.as_str().is_some_and(|t| t.len() >= 12 && t.contains(':')), "{stamped}");
}

/// Opens a new tab and makes it the current one; returns the handle of the tab it left.
async fn new_tab(browser: &Browser) -> String {
    let left = browser.command(reqwest::Method::GET, "/window", serde_json::Value::Null).await;
    let tab = browser.command(reqwest::Method::POST, "/window/new", json!({"type": "tab"})).await;
    switch_to(browser, tab["handle"].as_str().expect("handle")).await;
    left.as_str().expect("handle").to_owned()
}

async fn switch_to(browser: &Browser, handle: &str) {
    browser.command(reqwest::Method::POST, "/window", json!({"handle": handle})).await;
}

async fn connect_as(browser: &Browser, url: &str) {
    browser.goto(url).await;
    browser.until("a demo token", "return document.getElementById('token').value;", PATIENCE_IN_PAGE).await;
    browser.click("#connect").await;
    browser
        .until("open", "return document.getElementById('state').dataset.state === 'open';", PATIENCE_IN_PAGE)
        .await;
}

#[tokio::test]
async fn the_quick_start_two_demo_users_in_two_tabs_exchange_a_direct_message_and_see_a_test_webhook() {
    let demo = spawn_demo().await;
    let browser = Browser::start().await;
    connect_as(&browser, &demo.url("/?user=alice")).await;
    let alice = new_tab(&browser).await;
    connect_as(&browser, &demo.url("/?user=bob")).await;
    let bob = browser.command(reqwest::Method::GET, "/window", serde_json::Value::Null).await;
    let bob = bob.as_str().expect("handle").to_owned();

    switch_to(&browser, &alice).await;
    browser.fill("#direct-to", "bob").await;
    browser.click("#send-direct").await;
    switch_to(&browser, &bob).await;
    let direct = browser
        .until("bob's direct message", "const li = document.querySelector('#log li[data-type=\"direct\"]'); return li && li.textContent;", PATIENCE_IN_PAGE)
        .await;
    assert!(direct.as_str().is_some_and(|t| t.contains("from_user=alice")), "{direct}");

    browser.click("#send-webhook").await;
    for tab in [&bob, &alice] {
        switch_to(&browser, tab).await;
        browser
            .until(
                "the test webhook",
                "return document.querySelector('#log li[data-type=\"webhook\"]') !== null;",
                PATIENCE_IN_PAGE,
            )
            .await;
    }
}
