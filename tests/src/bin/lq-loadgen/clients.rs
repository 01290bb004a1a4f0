//! The WebSocket clients: open, read and count, send when asked, close.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use adapters::outbound::jwt::{JwtIssuer, TokenRequest};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::options::{Options, tenant_name};
use crate::stats::{Received, field};

/// Counters every connection updates, read for progress and the report.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) established: AtomicUsize,
    pub(crate) failed: AtomicUsize,
    /// Open right now.
    pub(crate) open: AtomicUsize,
    /// Closed by the server or the network before the end.
    pub(crate) dropped: AtomicUsize,
    pub(crate) deliveries: AtomicU64,
    /// `subscribed` frames received.
    pub(crate) subscribed: AtomicUsize,
    /// Subscriptions refused (`error` frames).
    pub(crate) refused: AtomicUsize,
    failures: Mutex<std::collections::BTreeMap<String, usize>>,
}

impl Counters {
    pub(crate) fn fail(&self, reason: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        *self.failures.lock().unwrap_or_else(PoisonError::into_inner).entry(reason).or_default() += 1;
    }

    /// Failure reasons and how often each happened.
    pub(crate) fn failures(&self) -> serde_json::Value {
        serde_json::json!(*self.failures.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// Everything a connection needs to open.
pub(crate) struct Dialer {
    issuer: JwtIssuer,
    endpoints: Vec<(String, SocketAddr)>,
    sources: u8,
    /// Tokens allow every topic.
    topics: bool,
}

impl Dialer {
    pub(crate) async fn new(options: &Options) -> Result<Self, String> {
        let mut endpoints = Vec::new();
        for url in &options.ws {
            let base = url.trim_end_matches("/ws").to_owned();
            let host = base
                .strip_prefix("ws://")
                .ok_or_else(|| format!("--ws {url}: only ws:// endpoints are supported"))?;
            let addr = tokio::net::lookup_host(host)
                .await
                .map_err(|e| format!("--ws {url}: {e}"))?
                .find(SocketAddr::is_ipv4)
                .ok_or_else(|| format!("--ws {url}: no IPv4 address"))?;
            endpoints.push((base, addr));
        }
        Ok(Self {
            issuer: JwtIssuer::hs256(options.secret.as_bytes()),
            endpoints,
            sources: options.sources,
            topics: options.topics > 0,
        })
    }

    fn token(&self, user: &str, tenant: &str) -> Result<String, String> {
        let now = crate::stats::now_micros() / 1_000_000;
        self.issuer
            .issue(&TokenRequest {
                user_id: user.to_owned(),
                tenant_id: tenant.to_owned(),
                scope: "ws:connect".to_owned(),
                iat: now,
                exp: now + 24 * 3600,
                iss: None,
                aud: None,
                caps: self.topics.then(|| serde_json::json!([{"channels": ["*"], "allow": ["sub"]}])),
                channel: None,
                allow: None,
            })
            .map_err(|e| e.to_string())
    }

    /// Opens connection number `n` (user `u{n}` of its tenant) from source address
    /// `127.0.0.{1 + n % sources}` and waits for its welcome frame.
    pub(crate) async fn open(&self, n: usize, tenant: usize) -> Result<WebSocketStream<TcpStream>, String> {
        let (base, addr) = &self.endpoints[n % self.endpoints.len()];
        let source = Ipv4Addr::new(127, 0, 0, 1 + (n % usize::from(self.sources)) as u8);
        let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
        if addr.ip().is_loopback() {
            socket.bind(SocketAddr::from((source, 0))).map_err(|e| format!("bind: {e}"))?;
        }
        let stream = socket.connect(*addr).await.map_err(|e| format!("connect: {}", e.kind()))?;
        let _ = stream.set_nodelay(true);
        let token = self.token(&format!("u{n}"), &tenant_name(tenant))?;
        let request =
            format!("{base}/ws?token={token}").into_client_request().map_err(|e| format!("request: {e}"))?;
        let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
        let (mut socket, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(config))
            .await
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(response) => {
                    format!("HTTP {}", response.status())
                }
                other => format!("handshake: {other}"),
            })?;
        match socket.next().await {
            Some(Ok(Message::Text(text))) if text.contains("\"welcome\"") => Ok(socket),
            other => Err(format!("no welcome: {other:?}")),
        }
    }
}

/// Reads the connection until told to stop, recording numbered messages; sends what it is
/// handed on `outgoing`.
pub(crate) async fn run(
    mut socket: WebSocketStream<TcpStream>,
    mut outgoing: mpsc::Receiver<String>,
    mut stop: watch::Receiver<bool>,
    counters: Arc<Counters>,
) -> Received {
    let mut received = Received::default();
    loop {
        tokio::select! {
            frame = socket.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    if let (Some(seq), Some(sent)) = (field(&text, "seq"), field(&text, "sent")) {
                        received.record(seq, sent);
                        counters.deliveries.fetch_add(1, Ordering::Relaxed);
                    } else if text.contains(r#""type":"subscribed""#) {
                        counters.subscribed.fetch_add(1, Ordering::Relaxed);
                    } else if text.contains(r#""type":"error""#) {
                        counters.refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => {
                    counters.dropped.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Some(Ok(_)) => {}
            },
            Some(text) = outgoing.recv() => {
                if socket.send(Message::text(text)).await.is_err() {
                    counters.dropped.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
            _ = stop.changed() => {
                let _ = socket.close(None).await;
                break;
            }
        }
    }
    counters.open.fetch_sub(1, Ordering::Relaxed);
    received
}
