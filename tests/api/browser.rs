//! The console at `/` in a real browser: Debian's Chromium, headless, driven through
//! `chromedriver` over the WebDriver protocol. A screenshot of the console after the scripted
//! session is saved to `target/browser/console.png`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::helpers::*;
use crate::process;
use crate::redis_support::{RedisServer, free_port};

/// The W3C WebDriver key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A headless Chromium session; the browser and its driver end with it.
pub(crate) struct Browser {
    driver: tokio::process::Child,
    base: String,
    http: reqwest::Client,
    _profile: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Browser {
    pub(crate) async fn start() -> Self {
        let port = free_port();
        let driver = tokio::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start chromedriver ({e}); install it with `apt-get install -y chromium chromium-driver`")
            });
        let http = reqwest::Client::new();
        let root = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = http.get(format!("{root}/status")).send().await;
            if let Ok(response) = ready
                && response.json::<Value>().await.is_ok_and(|v| v["value"]["ready"] == true)
            {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let profile =
            std::env::temp_dir().join(format!("lq-realtime-chromium-{}-{port}", std::process::id()));
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            // The browser's console log, where Chromium reports a refused WebSocket handshake.
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1200,900", format!("--user-data-dir={}", profile.display())],
            },
        }}});
        let session: Value = http
            .post(format!("{root}/session"))
            .json(&capabilities)
            .send()
            .await
            .expect("new session")
            .json()
            .await
            .expect("session JSON");
        let id = session["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {session}"));
        Self { driver, base: format!("{root}/session/{id}"), http, _profile: TempDir(profile) }
    }

    pub(crate) async fn command(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let request = self.http.request(method, format!("{}{path}", self.base));
        let request = if body.is_null() { request } else { request.json(&body) };
        let answer: Value =
            request.send().await.expect("WebDriver request").json().await.expect("WebDriver JSON");
        assert!(answer["value"]["error"].is_null(), "WebDriver {path}: {answer}");
        answer["value"].clone()
    }

    pub(crate) async fn goto(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", json!({"url": url})).await;
    }

    async fn element(&self, css: &str) -> String {
        let found = self
            .command(reqwest::Method::POST, "/element", json!({"using": "css selector", "value": css}))
            .await;
        found[ELEMENT].as_str().expect("element id").to_owned()
    }

    pub(crate) async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.command(reqwest::Method::POST, &format!("/element/{id}/click"), json!({})).await;
    }

    pub(crate) async fn fill(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.command(reqwest::Method::POST, &format!("/element/{id}/clear"), json!({})).await;
        self.command(reqwest::Method::POST, &format!("/element/{id}/value"), json!({"text": text})).await;
    }

    /// Runs `script` (a function body) in the page and returns what it returns.
    pub(crate) async fn eval(&self, script: &str) -> Value {
        self.command(reqwest::Method::POST, "/execute/sync", json!({"script": script, "args": []})).await
    }

    /// The page's console messages since the last call.
    async fn console_log(&self) -> Vec<String> {
        let entries = self.command(reqwest::Method::POST, "/se/log", json!({"type": "browser"})).await;
        let entries = entries.as_array().cloned().unwrap_or_default();
        entries.iter().filter_map(|entry| entry["message"].as_str().map(str::to_owned)).collect()
    }

    /// Waits until `script` returns something truthy, and returns it.
    pub(crate) async fn until(&self, what: &str, script: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let value = self.eval(script).await;
            if !(value.is_null() || value == false || value == "") {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {within:?}; page state: {}",
                self.state().await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The console's visible state, for failure messages.
    async fn state(&self) -> Value {
        self.eval(
            "const t = (id) => (document.getElementById(id) || {}).textContent; \
             return {state: t('state'), close: t('close-code') + ' ' + t('close-meaning'), recovered: t('recovered'), \
                     notice: t('notice'), log: [...document.querySelectorAll('#log li')].slice(0, 5).map(li => li.textContent)};",
        )
        .await
    }

    /// Waits until the console's state reads `state`.
    async fn until_state(&self, state: &str, within: Duration) {
        let script = format!("return document.getElementById('state').textContent === '{state}';");
        self.until(state, &script, within).await;
    }

    /// Loads the console at `url`, types `token` (or waits for the demo token), connects, and
    /// waits until the connection is open.
    async fn connect_console(&self, url: &str, token: Option<&str>) {
        self.goto(url).await;
        self.connect_loaded_console(token, "auto").await;
    }

    /// [`Browser::connect_console`] on the page already loaded, with `transport` chosen in the
    /// page's switch (`auto`, `websocket` or `sse`).
    async fn connect_loaded_console(&self, token: Option<&str>, transport: &str) {
        match token {
            Some(token) => self.fill("#token", token).await,
            None => {
                self.until(
                    "demo token prefilled",
                    "return document.getElementById('token').value;",
                    PATIENCE_IN_PAGE,
                )
                .await;
            }
        }
        self.click(&format!("#transport-choice option[value=\"{transport}\"]")).await;
        self.click("#connect").await;
        self.until_state("open", PATIENCE_IN_PAGE).await;
    }

    /// The transport the console's state line names.
    async fn transport(&self) -> Value {
        self.eval("return document.getElementById('transport').textContent;").await
    }

    pub(crate) async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.command(reqwest::Method::GET, "/screenshot", Value::Null).await;
        let bytes = b64_decode(png.as_str().expect("base64 PNG"));
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/browser");
        std::fs::create_dir_all(&dir).expect("target/browser");
        let path = dir.join(name);
        std::fs::write(&path, bytes).expect("screenshot written");
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends the session (and the browser) before the driver is killed.
        let url = self.base.clone();
        let _ = std::thread::spawn(move || {
            let _ = std::process::Command::new("curl").args(["-s", "-X", "DELETE", &url]).output();
        })
        .join();
        let _ = self.driver.start_kill();
    }
}

fn b64_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for byte in text.bytes().filter(|b| *b != b'=') {
        let value = ALPHABET.iter().position(|c| *c == byte).expect("base64") as u32;
        buffer = (buffer << 6) | value;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
        }
    }
    out
}

pub(crate) const PATIENCE_IN_PAGE: Duration = Duration::from_secs(10);

/// The newest log entry of `kind`, as the page shows it.
fn newest(kind: &str) -> String {
    format!(
        "const li = document.querySelector('#log li[data-type=\"{kind}\"]'); return li && li.textContent;"
    )
}

/// The newest log entry of `kind` whose text holds `text`.
fn newest_with(kind: &str, text: &str) -> String {
    format!(
        "const li = [...document.querySelectorAll('#log li[data-type=\"{kind}\"]')].find(li => li.textContent.includes('{text}')); \
         return li && li.textContent;"
    )
}

#[tokio::test]
async fn in_demo_mode_the_console_connects_sends_and_shows_a_test_webhook_arriving() {
    // Demo mode: no JWT_SECRET_KEY, so the console is on and prefilled.
    let app = spawn_app_with(test_config(|vars| {
        vars.remove("JWT_SECRET_KEY");
        vars.insert("PRESENCE".to_owned(), "on".to_owned());
    }))
    .await;
    let browser = Browser::start().await;
    browser.connect_console(&app.url("/"), None).await;
    let welcome = browser.until("welcome logged", &newest("welcome"), PATIENCE_IN_PAGE).await;
    assert!(welcome.as_str().expect("text").contains("\"user_id\":\"demo\""), "{welcome}");

    browser.fill("#message", r#"{"text":"hello from the browser"}"#).await;
    browser.click("#send-message").await;
    let message = browser.until("own message received", &newest("message"), PATIENCE_IN_PAGE).await;
    let message = message.as_str().expect("text");
    assert!(message.contains("channel=tenant:demo") && message.contains("from_user=demo"), "{message}");
    assert!(message.contains(r#"payload={"text":"hello from the browser"}"#), "{message}");

    browser.click("#send-presence").await;
    let presence = browser.until("presence answered", &newest("presence"), PATIENCE_IN_PAGE).await;
    assert!(presence.as_str().expect("text").contains(r#"{"user_id":"demo","connections":1}"#), "{presence}");

    // Topics: subscribe with presence, publish, see who is present.
    browser.fill("#topic-name", "chat.lobby").await;
    browser.click("#topic-presence").await;
    browser.click("#subscribe").await;
    let joined = browser.until("own join", &newest("presence.join"), PATIENCE_IN_PAGE).await;
    assert!(joined.as_str().expect("text").contains("channel=presence:demo:chat.lobby"), "{joined}");
    browser.fill("#message", r#"{"text":"to the lobby"}"#).await;
    browser.click("#subscriptions li[data-topic=\"chat.lobby\"] button[data-action=\"publish\"]").await;
    let published = browser
        .until("topic message", &newest_with("message", "channel=topic:demo:chat.lobby"), PATIENCE_IN_PAGE)
        .await;
    assert!(published.as_str().expect("text").contains("to the lobby"), "{published}");
    browser.click("#subscriptions li[data-topic=\"chat.lobby\"] button[data-action=\"presence\"]").await;
    let present = browser
        .until("topic presence", &newest_with("presence", "channel=topic:demo:chat.lobby"), PATIENCE_IN_PAGE)
        .await;
    assert!(present.as_str().expect("text").contains(r#"{"user_id":"demo","connections":1}"#), "{present}");
    let listed = browser.eval("return document.querySelector('#subscriptions li').textContent;").await;
    assert!(listed.as_str().expect("text").starts_with("chat.lobby — subscribed at "), "{listed}");

    browser.fill("#message", r#"{"action":"deployed"}"#).await;
    browser.click("#send-webhook").await;
    let webhook = browser.until("test webhook received", &newest("webhook"), PATIENCE_IN_PAGE).await;
    let webhook = webhook.as_str().expect("text");
    assert!(webhook.contains(r#"payload={"provider":"console","data":{"action":"deployed"}}"#), "{webhook}");
    let notice = browser.eval("return document.getElementById('notice').textContent;").await;
    assert!(notice.as_str().expect("text").starts_with("webhook accepted: "), "{notice}");
    let path = browser.screenshot("console.png").await;
    assert!(std::fs::metadata(&path).expect("screenshot").len() > 1000);

    browser.click("#disconnect").await;
    browser.until_state("closed", PATIENCE_IN_PAGE).await;
    let close = browser.eval("return document.getElementById('close-code').textContent;").await;
    assert_eq!(close, "1000");
    // The server saw the page's close: no connection is left open on it.
    eventually(PATIENCE_IN_PAGE, "the server no longer counting the page's connection", async || {
        value(&scrape(&app).await, r#"lq_connections{transport="websocket"}"#) == 0.0
    })
    .await;
}

/// Serves one HTML page on a free port of 127.0.0.1, for as long as the task lives.
async fn serve_page(html: String) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bound");
    let origin = format!("http://{}", listener.local_addr().expect("address"));
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let html = html.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut request).await;
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{html}",
                    html.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    (origin, task)
}

#[tokio::test]
async fn with_allowed_origins_set_the_console_connects_and_a_page_from_another_origin_is_refused() {
    let port = free_port();
    let own_origin = format!("http://127.0.0.1:{port}");
    let app = spawn_app_with(test_config(|vars| {
        vars.insert("BIND_ADDR".to_owned(), format!("127.0.0.1:{port}"));
        vars.insert("ALLOWED_ORIGINS".to_owned(), own_origin.clone());
        vars.insert("CONSOLE".to_owned(), "on".to_owned());
    }))
    .await;
    let browser = Browser::start().await;
    // The console's own origin is allowed.
    browser.connect_console(&app.url("/"), Some(&token("ann", "acme"))).await;

    let page = format!(
        "<!doctype html><title>foreign</title><script>\
         const ws = new WebSocket('ws://127.0.0.1:{port}/ws?token={}');\
         ws.onopen = () => document.title = 'open';\
         ws.onclose = (e) => document.title = 'closed ' + e.code;\
         </script>",
        token("mallory", "acme")
    );
    let (foreign, _server) = serve_page(page).await;
    assert_ne!(foreign, own_origin);
    browser.goto(&format!("{foreign}/")).await;
    let title = browser
        .until(
            "the foreign page's socket ended",
            "return document.title.startsWith('closed') && document.title;",
            PATIENCE_IN_PAGE,
        )
        .await;
    // The server answered the upgrade with 403: the browser reports an abnormal closure to the
    // page, and the status in its console.
    assert_eq!(title, "closed 1006");
    let log = browser.console_log().await;
    assert!(
        log.iter().any(|line| line.contains("/ws?token=") && line.contains("403")),
        "no 403 for the foreign page's handshake in the browser's log: {log:#?}"
    );
    // The foreign page never reached the token check: only the console's own attempt counts.
    let metrics = scrape(&app).await;
    let attempts: f64 =
        metrics.iter().filter(|(name, _)| name.starts_with("lq_connections_total{")).map(|(_, n)| n).sum();
    assert_eq!(attempts, 1.0, "{metrics:?}");
    assert_eq!(value(&metrics, r#"lq_connections_total{transport="websocket",result="accepted"}"#), 1.0);
}

#[tokio::test]
async fn the_console_is_on_in_demo_mode_off_with_a_secret_unless_turned_on_and_demo_only_endpoints_say_so() {
    let demo = spawn_app_with(test_config(|vars| {
        vars.remove("JWT_SECRET_KEY");
    }))
    .await;
    let page = demo.http.get(demo.url("/")).send().await.expect("request");
    assert_eq!(page.status(), 200);
    let headers = page.headers().clone();
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    let policy = headers["content-security-policy"].to_str().expect("ascii");
    for directive in
        ["default-src 'none'", "script-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"]
    {
        assert!(policy.contains(directive), "{directive} in {policy}");
    }
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["referrer-policy"], "no-referrer");
    assert!(page.text().await.expect("body").contains("lq-realtime console"));
    let config = demo.get("/console/config").await;
    assert_eq!(config.headers["cache-control"], "no-store");
    assert_eq!((config.body["demo"].clone(), config.body["webhook"].clone()), (json!(true), json!(true)));
    // Another site's page cannot post test webhooks from a visitor's browser.
    let foreign = demo
        .http
        .post(demo.url("/console/webhook"))
        .header("origin", "https://elsewhere.example")
        .body("{}")
        .send()
        .await
        .expect("request");
    assert_eq!(foreign.status(), 403);
    assert_eq!(config.body["token"].as_str().expect("a token").split('.').count(), 3);

    let with_secret = spawn_app().await;
    let answer = with_secret.get("/").await;
    assert_eq!((answer.status, answer.body["message"].as_str()), (404, Some("no such route")));

    let turned_on = spawn_app_with(test_config(|vars| {
        vars.insert("CONSOLE".to_owned(), "on".to_owned());
    }))
    .await;
    assert_eq!(turned_on.get("/").await.status, 200);
    let config = turned_on.get("/console/config").await;
    assert_eq!(config.body, json!({"demo": false, "token": null, "tenant": null, "webhook": false}));
    let refused =
        turned_on.http.post(turned_on.url("/console/webhook")).body("{}").send().await.expect("request");
    assert_eq!(refused.status(), 404);
    let body: Value = refused.json().await.expect("JSON");
    assert_eq!(body["message"], "the test webhook exists in demo mode only (without JWT_SECRET_KEY)");
}

#[tokio::test]
async fn the_client_refreshes_its_token_before_it_expires_and_does_not_reconnect_after_4003() {
    let app = spawn_app_with(test_config(|vars| {
        vars.insert("CONSOLE".to_owned(), "on".to_owned());
        vars.insert("API_KEYS".to_owned(), "backend-api-key-0123456789".to_owned());
    }))
    .await;
    let minted = Instant::now();
    let short = sign_claims(
        &json!({"user_id": "ann", "tenant_id": "acme", "scope": "ws:connect", "exp": now_secs() + 10}),
        jsonwebtoken::Algorithm::HS256,
        JWT_SECRET,
    );
    let browser = Browser::start().await;
    browser.connect_console(&app.url("/"), Some(&short)).await;
    // The page's token source now gives a longer-lived token: the client sends it as a refresh
    // before the first one expires (10 s, plus the server's 5 s leeway).
    browser.fill("#token", &token("ann", "acme")).await;
    let refreshed = browser.until("token refreshed", &newest("refreshed"), PATIENCE_IN_PAGE).await;
    assert!(refreshed.as_str().expect("text").contains("exp"), "{refreshed}");
    tokio::time::sleep_until((minted + Duration::from_secs(17)).into()).await;
    let state = browser.state().await;
    assert_eq!(state["state"], "open", "still connected after the first token's deadline: {state}");
    assert_eq!(state["close"], "— ", "never closed: {state}");

    // A backend disconnects the user: 4003, and the client stays closed.
    let answer = app
        .http
        .post(app.url("/api/disconnect"))
        .bearer_auth("backend-api-key-0123456789")
        .json(&json!({"tenant_id": "acme", "user_id": "ann"}))
        .send()
        .await
        .expect("request");
    assert_eq!(answer.status(), 200);
    browser.until_state("closed", PATIENCE_IN_PAGE).await;
    assert_eq!(browser.eval("return document.getElementById('close-code').textContent;").await, "4003");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(browser.eval("return document.getElementById('state').textContent;").await, "closed");
}

#[tokio::test]
async fn forced_to_sse_the_console_connects_sends_a_message_sees_it_arrive_and_shows_the_transport() {
    let app = spawn_app_with(test_config(|vars| {
        vars.insert("CONSOLE".to_owned(), "on".to_owned());
        vars.insert("PRESENCE".to_owned(), "on".to_owned());
    }))
    .await;
    let browser = Browser::start().await;
    browser.goto(&app.url("/")).await;
    browser.connect_loaded_console(Some(&token("ann", "acme")), "sse").await;
    assert_eq!(browser.transport().await, "over SSE");
    let welcome = browser.until("welcome logged", &newest("welcome"), PATIENCE_IN_PAGE).await;
    assert!(welcome.as_str().expect("text").contains("\"user_id\":\"ann\""), "{welcome}");
    let metrics = scrape(&app).await;
    assert_eq!(value(&metrics, r#"lq_connections{transport="sse"}"#), 1.0, "{metrics:?}");
    assert_eq!(value(&metrics, r#"lq_connections{transport="websocket"}"#), 0.0, "{metrics:?}");

    // Posted to /sse/{connection_id}, broadcast back through the stream.
    browser.fill("#message", r#"{"text":"hello over SSE"}"#).await;
    browser.click("#send-message").await;
    let message = browser.until("own message received", &newest("message"), PATIENCE_IN_PAGE).await;
    let message = message.as_str().expect("text");
    assert!(message.contains("channel=tenant:acme") && message.contains("from_user=ann"), "{message}");
    assert!(message.contains(r#"payload={"text":"hello over SSE"}"#), "{message}");
    // The answer to a POST reaches the page like a WebSocket reply.
    browser.click("#send-presence").await;
    let presence = browser.until("presence answered", &newest("presence"), PATIENCE_IN_PAGE).await;
    assert!(presence.as_str().expect("text").contains(r#"{"user_id":"ann","connections":1}"#), "{presence}");

    browser.click("#disconnect").await;
    browser.until_state("closed", PATIENCE_IN_PAGE).await;
    eventually(PATIENCE_IN_PAGE, "the server no longer counting the page's stream", async || {
        value(&scrape(&app).await, r#"lq_connections{transport="sse"}"#) == 0.0
    })
    .await;
}

/// The console over `transport` (`websocket` or `sse`), subscribed to a topic, sees its server
/// killed and restarted on the same Redis: it reconnects over the same transport, resumes its
/// tenant channel (`recovered`) and subscribes again from its topic's last position, so the next
/// messages of both carry the offsets after the ones it saw.
async fn killed_and_restarted_the_console_reconnects_recovers_and_subscribes_again(transport: &str) {
    let redis = RedisServer::start();
    let addr = format!("127.0.0.1:{}", free_port());
    let env = [
        ("BIND_ADDR", addr.as_str()),
        ("REDIS_URL", &redis.url()),
        ("CONSOLE", "on"),
        ("API_KEYS", "backend-api-key-0123456789"),
    ];
    let server = process::start(&env).await;
    let browser = Browser::start().await;
    browser.goto(&format!("http://{addr}/")).await;
    let caps = json!({"caps": [{"channels": ["*"], "allow": ["sub", "pub"]}]});
    browser.connect_loaded_console(Some(&token_with("ann", "acme", &caps)), transport).await;
    browser.fill("#topic-name", "orders").await;
    browser.click("#subscribe").await;
    let subscribed = "const li = document.querySelector('#subscriptions li[data-topic=\"orders\"]'); \
                      return li && li.dataset.state === 'subscribed' && li.textContent;";
    browser.until("subscribed to orders", subscribed, PATIENCE_IN_PAGE).await;
    // A message of each gives the page a position to resume from.
    assert_eq!(publish_note(&addr, "tenant:acme", 1).await, 200);
    assert_eq!(publish_note(&addr, "topic:acme:orders", 1).await, 200);
    browser.until("first note", &newest_with("note", "channel=topic:acme:orders"), PATIENCE_IN_PAGE).await;
    browser
        .until("first note of the tenant", &newest_with("note", "channel=tenant:acme"), PATIENCE_IN_PAGE)
        .await;

    server.signal("KILL");
    browser
        .until(
            "reconnecting",
            "return document.getElementById('state').textContent.startsWith('reconnecting');",
            PATIENCE_IN_PAGE,
        )
        .await;
    let close = browser.eval("return document.getElementById('close-code').textContent;").await;
    assert_eq!(close, "1006", "the connection was lost without a close frame");
    // Two refused reconnections: what would make a client that never got through try SSE.
    browser
        .until("two refused reconnections", "return window.lqConsole.client.attempts >= 3;", PATIENCE_IN_PAGE)
        .await;
    let restarted = process::start(&env).await;
    browser.until_state("open", Duration::from_secs(30)).await;
    // Refused reconnections after a working WebSocket are an outage, not a blocked WebSocket.
    let expected = if transport == "sse" { "over SSE" } else { "over WebSocket" };
    assert_eq!(browser.transport().await, expected);
    let recovered = browser.eval("return document.getElementById('recovered').textContent;").await;
    assert_eq!(recovered, "true", "{}", browser.state().await);
    let again = browser.until("subscribed again", &newest("subscribed"), PATIENCE_IN_PAGE).await;
    assert!(
        again.as_str().expect("text").contains(r#""recovered":true"#),
        "subscribed again with since: {again}"
    );
    assert_eq!(publish_note(&addr, "tenant:acme", 2).await, 200);
    assert_eq!(publish_note(&addr, "topic:acme:orders", 2).await, 200);
    for channel in ["tenant:acme", "topic:acme:orders"] {
        let script = format!(
            "const li = [...document.querySelectorAll('#log li[data-type=\"note\"]')].find(li => li.textContent.includes('channel={channel}')); \
             return li && li.textContent.includes('payload=2') && li.textContent;"
        );
        let note = browser.until("second note", &script, PATIENCE_IN_PAGE).await;
        assert!(note.as_str().expect("text").contains("offset=2"), "{note}");
    }
    drop(restarted);
}

#[tokio::test]
async fn after_the_server_is_killed_and_restarted_the_console_reconnects_recovers_and_subscribes_again() {
    killed_and_restarted_the_console_reconnects_recovers_and_subscribes_again("websocket").await;
}

#[tokio::test]
async fn after_the_server_is_killed_and_restarted_an_sse_client_reconnects_recovers_and_subscribes_again() {
    killed_and_restarted_the_console_reconnects_recovers_and_subscribes_again("sse").await;
}

#[tokio::test]
async fn in_auto_mode_a_browser_whose_websockets_fail_falls_back_to_sse_after_two_attempts() {
    let app = spawn_app_with(test_config(|vars| {
        vars.insert("CONSOLE".to_owned(), "on".to_owned());
    }))
    .await;
    let browser = Browser::start().await;
    browser.goto(&app.url("/")).await;
    // What a proxy that blocks WebSockets looks like to a page: every socket ends with 1006.
    browser
        .eval(
            "window.webSocketsTried = 0; \
             window.WebSocket = class { \
               static CONNECTING = 0; static OPEN = 1; static CLOSING = 2; static CLOSED = 3; \
               constructor() { window.webSocketsTried += 1; this.readyState = 0; \
                 setTimeout(() => { this.readyState = 3; this.onclose({ code: 1006, reason: '' }); }, 10); } \
               send() {} close() {} \
             }; return true;",
        )
        .await;
    browser.connect_loaded_console(Some(&token("ann", "acme")), "auto").await;
    assert_eq!(browser.transport().await, "over SSE");
    assert_eq!(browser.eval("return window.webSocketsTried;").await, 2);
    browser.fill("#message", r#"{"text":"through the fallback"}"#).await;
    browser.click("#send-message").await;
    let message = browser.until("own message received", &newest("message"), PATIENCE_IN_PAGE).await;
    assert!(message.as_str().expect("text").contains("through the fallback"), "{message}");
    assert_eq!(value(&scrape(&app).await, r#"lq_connections{transport="sse"}"#), 1.0);
}

#[tokio::test]
async fn over_sse_the_client_refreshes_its_token_by_post_and_stays_connected_past_the_first_deadline() {
    let app = spawn_app_with(test_config(|vars| {
        vars.insert("CONSOLE".to_owned(), "on".to_owned());
    }))
    .await;
    let minted = Instant::now();
    let short = sign_claims(
        &json!({"user_id": "ann", "tenant_id": "acme", "scope": "ws:connect", "exp": now_secs() + 10}),
        jsonwebtoken::Algorithm::HS256,
        JWT_SECRET,
    );
    let browser = Browser::start().await;
    browser.goto(&app.url("/")).await;
    browser.connect_loaded_console(Some(&short), "sse").await;
    browser.fill("#token", &token("ann", "acme")).await;
    // The `refreshed` frame is the POST's answer.
    let refreshed = browser.until("token refreshed", &newest("refreshed"), PATIENCE_IN_PAGE).await;
    assert!(refreshed.as_str().expect("text").contains("exp"), "{refreshed}");
    tokio::time::sleep_until((minted + Duration::from_secs(17)).into()).await;
    let state = browser.state().await;
    assert_eq!(state["state"], "open", "still connected after the first token's deadline: {state}");
    assert_eq!(state["close"], "— ", "never closed: {state}");
    assert_eq!(browser.transport().await, "over SSE");
}

/// Publishes note `n` to `channel` through the server API of the instance at `addr`; returns
/// the answer's status.
async fn publish_note(addr: &str, channel: &str, n: u32) -> u16 {
    reqwest::Client::new()
        .post(format!("http://{addr}/api/publish"))
        .bearer_auth("backend-api-key-0123456789")
        .json(&json!({"channel": channel, "type": "note", "payload": n}))
        .send()
        .await
        .expect("published")
        .status()
        .as_u16()
}
