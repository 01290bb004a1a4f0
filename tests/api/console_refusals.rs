//! The console in a real browser when a connection is refused: it shows why (the status and the
//! server's message, which browsers hide from WebSocket pages), and stops instead of retrying.

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
