//! `spawn_app()` and the clients the tests drive it with.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bootstrap::{Application, Config};
use futures_util::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The JWT secret every test instance uses.
pub(crate) const JWT_SECRET: &str = "integration-tests-jwt-secret-0123456789";
/// Webhook secrets of the test tenants; `nosecret` deliberately has none.
pub(crate) const ACME_SECRET: &str = "acme-webhook-secret";
pub(crate) const GLOBEX_SECRET: &str = "globex-webhook-secret";

/// How long a test waits for something that should happen.
pub(crate) const PATIENCE: Duration = Duration::from_secs(5);

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_secs()
}

/// Signs arbitrary claims with `secret` and `alg`.
pub(crate) fn sign_claims(claims: &Value, alg: jsonwebtoken::Algorithm, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(alg),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("signed")
}

/// A valid token for `user` of `tenant` with the `ws:connect` scope.
pub(crate) fn token(user: &str, tenant: &str) -> String {
    token_with(user, tenant, &json!({}))
}

/// A valid token for `user` of `tenant` with the `ws:connect` scope and the claims of `extra`
/// (`caps`, or `channel` and `allow` for a subscription token).
pub(crate) fn token_with(user: &str, tenant: &str, extra: &Value) -> String {
    let mut claims =
        json!({"user_id": user, "tenant_id": tenant, "scope": "ws:connect", "exp": now_secs() + 600});
    if let (Some(claims), Some(extra)) = (claims.as_object_mut(), extra.as_object()) {
        claims.extend(extra.clone());
    }
    sign_claims(&claims, jsonwebtoken::Algorithm::HS256, JWT_SECRET)
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Base64url without padding, as in JWTs.
pub(crate) fn b64url(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(char::from(B64[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// Decodes base64url without padding.
pub(crate) fn b64url_decode(text: &str) -> Vec<u8> {
    let values: Vec<u32> =
        text.bytes().map(|c| B64.iter().position(|&b| b == c).expect("base64url") as u32).collect();
    let mut out = Vec::new();
    for chunk in values.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, v)| acc | (v << (18 - 6 * i)));
        for i in 0..chunk.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

/// A token with `alg: none` (any spelling) and no signature.
pub(crate) fn unsigned_token(alg: &str, claims: &Value) -> String {
    let header = json!({"alg": alg, "typ": "JWT"}).to_string();
    format!("{}.{}.", b64url(header.as_bytes()), b64url(claims.to_string().as_bytes()))
}

/// `sha256=<hex>` of the body under `secret`, computed independently of the service.
pub(crate) fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// One running instance on a free port, stopped when dropped.
pub(crate) struct TestApp {
    pub(crate) addr: SocketAddr,
    /// Where `/metrics` is served when `METRICS_ADDR` was set.
    pub(crate) metrics_addr: Option<SocketAddr>,
    pub(crate) http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// The test configuration: port 0, the test secrets, and whatever `adjust` changes.
pub(crate) fn test_config(adjust: impl FnOnce(&mut HashMap<String, String>)) -> Config {
    let mut vars = HashMap::from([
        ("BIND_ADDR".to_owned(), "127.0.0.1:0".to_owned()),
        ("JWT_SECRET_KEY".to_owned(), JWT_SECRET.to_owned()),
        ("WEBHOOK_SECRETS".to_owned(), json!({"acme": ACME_SECRET, "globex": GLOBEX_SECRET}).to_string()),
        // Shut down at once unless a test is about draining.
        ("DRAIN_GRACE_SECS".to_owned(), "0".to_owned()),
        ("DRAIN_SECS".to_owned(), "0".to_owned()),
    ]);
    adjust(&mut vars);
    Config::from_lookup(|key| vars.get(key).cloned()).expect("valid test configuration")
}

pub(crate) async fn spawn_app() -> TestApp {
    spawn_app_with(test_config(|_| {})).await
}

/// An instance joined to the Redis at `redis_url`, with `vars` on top of the test configuration,
/// once it answers `/ready` with 200.
pub(crate) async fn spawn_on_redis(redis_url: &str, vars: &[(&str, &str)]) -> TestApp {
    spawn_ready(&[&[("REDIS_URL", redis_url)], vars].concat()).await
}

/// An instance with `vars` on top of the test configuration, once it answers `/ready` with 200.
pub(crate) async fn spawn_ready(vars: &[(&str, &str)]) -> TestApp {
    let app = spawn_app_with(test_config(|config| {
        for (key, value) in vars {
            config.insert((*key).to_owned(), (*value).to_owned());
        }
    }))
    .await;
    app.wait_ready(Duration::from_secs(10)).await;
    app
}

/// An instance in demo mode (no token key, so the console and the dashboard are on), once it
/// answers `/ready`.
pub(crate) async fn spawn_demo() -> TestApp {
    let config = Config::from_lookup(|name| match name {
        "BIND_ADDR" => Some("127.0.0.1:0".to_owned()),
        "DRAIN_GRACE_SECS" | "DRAIN_SECS" => Some("0".to_owned()),
        _ => None,
    })
    .expect("demo mode");
    let demo = spawn_app_with(config).await;
    demo.wait_ready(Duration::from_secs(10)).await;
    demo
}

pub(crate) async fn spawn_app_with(config: Config) -> TestApp {
    let app = Application::build(config).await.expect("application starts");
    let addr = app.local_addr();
    let metrics_addr = app.metrics_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));
    TestApp { addr, metrics_addr, http: reqwest::Client::new(), stop: Some(stop), task: Some(task) }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// An HTTP answer: status, headers and the body parsed as JSON (`Null` when it is not JSON).
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) headers: reqwest::header::HeaderMap,
    pub(crate) body: Value,
}

impl Answer {
    pub(crate) async fn from_response(response: reqwest::Response) -> Self {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.expect("body");
        Self { status, headers, body: serde_json::from_slice(&bytes).unwrap_or(Value::Null) }
    }
}

impl TestApp {
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub(crate) fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws{query}", self.addr)
    }

    /// Waits until `/ready` answers 200.
    pub(crate) async fn wait_ready(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while self.get("/ready").await.status != 200 {
            assert!(tokio::time::Instant::now() < deadline, "not ready within {within:?}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub(crate) async fn get(&self, path: &str) -> Answer {
        Answer::from_response(self.http.get(self.url(path)).send().await.expect("request")).await
    }

    /// Posts a webhook; `tenant` and `signature` are sent only when given.
    pub(crate) async fn post_webhook(
        &self,
        provider: &str,
        tenant: Option<&str>,
        signature: Option<&str>,
        body: Vec<u8>,
    ) -> Answer {
        let mut request = self.http.post(self.url(&format!("/webhooks/{provider}"))).body(body);
        if let Some(tenant) = tenant {
            request = request.header("x-tenant-id", tenant);
        }
        if let Some(signature) = signature {
            request = request.header("x-signature", signature);
        }
        Answer::from_response(request.send().await.expect("request")).await
    }

    /// Posts a correctly signed webhook for `tenant`.
    pub(crate) async fn post_signed_webhook(
        &self,
        provider: &str,
        tenant: &str,
        secret: &str,
        body: &Value,
    ) -> Answer {
        let body = serde_json::to_vec(body).expect("json");
        let signature = signature(secret, &body);
        self.post_webhook(provider, Some(tenant), Some(&signature), body).await
    }

    /// Posts a correctly signed GitHub webhook for tenant `acme` with one more header.
    pub(crate) async fn post_acme_webhook_with(&self, header: &str, value: &str, body: &Value) -> Answer {
        let body = serde_json::to_vec(body).expect("json");
        let response = self
            .http
            .post(self.url("/webhooks/github"))
            .header("x-tenant-id", "acme")
            .header("x-signature", signature(ACME_SECRET, &body))
            .header(header, value)
            .body(body)
            .send()
            .await
            .expect("sent");
        Answer::from_response(response).await
    }

    /// Stops the instance as a signal would, and waits until it has finished.
    pub(crate) async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("stops in time")
                .expect("no panic");
        }
    }

    /// Connects with `?token=`; on refusal returns the HTTP status and JSON body.
    pub(crate) async fn try_connect(&self, token: &str) -> Result<WsClient, (u16, Value)> {
        let request = self.ws_url(&format!("?token={token}")).into_client_request().expect("request");
        WsClient::connect(request).await
    }

    /// Connects `user` of `tenant` and returns the client with its welcome frame.
    pub(crate) async fn connect_with_welcome(&self, user: &str, tenant: &str) -> (WsClient, Value) {
        self.connect_with_query(user, tenant, "").await
    }

    /// Connects `user` of `tenant` with `query` after the token (e.g. `&since=E:3`) and returns
    /// the client with its welcome frame.
    pub(crate) async fn connect_with_query(
        &self,
        user: &str,
        tenant: &str,
        query: &str,
    ) -> (WsClient, Value) {
        let url = self.ws_url(&format!("?token={}{query}", token(user, tenant)));
        let mut client =
            WsClient::connect(url.into_client_request().expect("request")).await.expect("connected");
        let welcome = client.next_json().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        (client, welcome)
    }

    /// Connects `user` of `tenant` and consumes the welcome frame.
    pub(crate) async fn connect(&self, user: &str, tenant: &str) -> WsClient {
        let mut client = self.try_connect(&token(user, tenant)).await.expect("connected");
        let welcome = client.next_json().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        client
    }
}

/// A real WebSocket client.
pub(crate) struct WsClient {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// How long it waits for each frame: [`PATIENCE`] unless a test says otherwise.
    pub(crate) patience: Duration,
}

impl WsClient {
    pub(crate) async fn connect(
        request: tungstenite::handshake::client::Request,
    ) -> Result<Self, (u16, Value)> {
        match tokio_tungstenite::connect_async(request).await {
            Ok((socket, _)) => Ok(Self { socket, patience: PATIENCE }),
            Err(tungstenite::Error::Http(response)) => {
                let status = response.status().as_u16();
                let body = response
                    .body()
                    .as_deref()
                    .and_then(|b| serde_json::from_slice(b).ok())
                    .unwrap_or(Value::Null);
                Err((status, body))
            }
            Err(other) => panic!("WebSocket connection failed unexpectedly: {other}"),
        }
    }

    /// Connects over a TCP socket whose receive buffer is `recv_buffer` bytes, so that a client
    /// that stops reading pushes back on the server quickly.
    pub(crate) async fn connect_with_small_buffer(url: &str, recv_buffer: u32) -> Self {
        let request = url.into_client_request().expect("request");
        let host = request.uri().authority().expect("authority").as_str().to_owned();
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(recv_buffer).expect("SO_RCVBUF");
        let stream = socket.connect(host.parse().expect("addr")).await.expect("tcp connect");
        let (socket, _) =
            tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream)).await.expect("handshake");
        Self { socket, patience: PATIENCE }
    }

    /// The next frame, which must arrive within the client's patience.
    pub(crate) async fn next_message(&mut self) -> Message {
        match tokio::time::timeout(self.patience, self.socket.next()).await {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(error))) => panic!("socket error: {error}"),
            Ok(None) => panic!("socket closed"),
            Err(_) => panic!("no frame within {:?}", self.patience),
        }
    }

    /// The next data frame, parsed as JSON; control frames are skipped.
    pub(crate) async fn next_json(&mut self) -> Value {
        loop {
            match self.next_message().await {
                Message::Text(text) => return serde_json::from_str(&text).expect("text frames are JSON"),
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    pub(crate) async fn send_text(&mut self, text: &str) {
        self.socket.send(Message::text(text)).await.expect("sent");
    }

    pub(crate) async fn send_json(&mut self, value: &Value) {
        self.send_text(&value.to_string()).await;
    }

    pub(crate) async fn send(&mut self, message: Message) {
        self.socket.send(message).await.expect("sent");
    }

    /// Proves that nothing else was queued for this client: a ping's pong must be the very next
    /// frame. Everything published before the ping was delivered before the pong.
    pub(crate) async fn expect_nothing_pending(&mut self) {
        self.send_json(&json!({"type": "ping"})).await;
        let next = self.next_json().await;
        assert_eq!(next["type"], "pong", "expected nothing before the pong, got {next}");
    }

    /// Reads (and so answers pings) for `duration`; the connection must stay open.
    pub(crate) async fn pump_for(&mut self, duration: Duration) {
        let deadline = tokio::time::Instant::now() + duration;
        while let Ok(next) = tokio::time::timeout_at(deadline, self.socket.next()).await {
            match next {
                Some(Ok(Message::Close(frame))) => panic!("closed while pumping: {frame:?}"),
                Some(Ok(_)) => {}
                Some(Err(error)) => panic!("socket error while pumping: {error}"),
                None => panic!("socket ended while pumping"),
            }
        }
    }

    /// Waits for the server's close frame and returns it.
    /// The next data frame as JSON, or the close frame if the server closes first.
    pub(crate) async fn next_data_or_close(&mut self) -> Result<Value, Option<CloseFrame>> {
        loop {
            match self.next_message().await {
                Message::Text(text) => return Ok(serde_json::from_str(&text).expect("a JSON frame")),
                Message::Close(frame) => {
                    let _ = tokio::time::timeout(PATIENCE, self.socket.next()).await;
                    return Err(frame);
                }
                _ => {}
            }
        }
    }

    pub(crate) async fn expect_close(&mut self) -> Option<CloseFrame> {
        loop {
            match tokio::time::timeout(self.patience, self.socket.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => {
                    // Reading on sends the client's half of the close handshake, as a
                    // well-behaved client does.
                    let _ = tokio::time::timeout(PATIENCE, self.socket.next()).await;
                    return frame;
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(error))) => panic!("socket error before the close frame: {error}"),
                Ok(None) => panic!("socket ended without a close frame"),
                Err(_) => panic!("no close frame within {:?}", self.patience),
            }
        }
    }

    pub(crate) async fn close(mut self) {
        let _ = self.socket.close(None).await;
        while let Ok(Some(Ok(_))) = tokio::time::timeout(PATIENCE, self.socket.next()).await {}
    }
}

/// A file in the temporary directory, removed when dropped.
#[derive(Debug)]
pub(crate) struct TempFile {
    pub(crate) path: std::path::PathBuf,
}

impl TempFile {
    /// Writes `contents` to a new file whose name ends with `suffix`.
    pub(crate) fn with_contents(suffix: &str, contents: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("lq-realtime-{}-{n}-{suffix}", std::process::id()));
        std::fs::write(&path, contents).expect("temporary file written");
        Self { path }
    }

    pub(crate) fn path_str(&self) -> &str {
        self.path.to_str().expect("UTF-8 temporary path")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `name{labels}` → value, for every sample line of a Prometheus text scrape.
pub(crate) fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

pub(crate) async fn scrape(app: &TestApp) -> HashMap<String, f64> {
    let response = app.http.get(app.url("/metrics")).send().await.expect("scraped");
    assert_eq!(response.status().as_u16(), 200);
    assert!(response.headers()["content-type"].to_str().is_ok_and(|t| t.starts_with("text/plain")));
    samples(&response.text().await.expect("text"))
}

pub(crate) fn value(samples: &HashMap<String, f64>, name: &str) -> f64 {
    samples
        .get(name)
        .copied()
        .unwrap_or_else(|| panic!("{name} missing from {:#?}", samples.keys().collect::<Vec<_>>()))
}

/// `<epoch>:<offset>` of a frame, or of a position in a welcome: what `since=` takes.
pub(crate) fn since_of(position: &Value) -> String {
    format!(
        "{}:{}",
        position["epoch"].as_str().expect("an epoch"),
        position["offset"].as_u64().expect("an offset")
    )
}

/// Polls `check` every 25 ms until it holds or `within` has passed.
pub(crate) async fn eventually(within: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !check().await {
        assert!(std::time::Instant::now() < deadline, "{what} did not happen within {within:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
