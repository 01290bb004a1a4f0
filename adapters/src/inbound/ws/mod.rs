//! The WebSocket transport, `GET /ws`.
//!
//! warp routes the request and serves the HTTP side, but the upgrade and the WebSocket protocol
//! are ours: we take hyper's `OnUpgrade` from the request, answer `101 Switching Protocols`
//! ourselves, take the TCP socket back from hyper and speak RFC 6455 over it with a hand-written
//! codec. warp's built-in `ws()` gives every connection a 128 KiB read buffer, and tungstenite
//! streams keep read and write buffers per connection; here an idle connection holds no buffer
//! at all.
//!
//! The transport only decodes frames and pumps bytes: everything else about the client is its
//! [`ClientSession`]. Frames for a client (the welcome, the replay, fan-out deliveries, replies)
//! wait in the connection's queue, bounded in bytes. Each connection has one task: it reads
//! client frames when the socket is readable, writes everything queued with one `writev` when
//! woken (and the rest when the socket is writable again), and honours a close request
//! (shutdown, time limits, slow consumer) ahead of anything still queued.
//!
//! # Layout
//! - [`mod@self`]: the route, the handshake checks and the `101` answer.
//! - `frame`: the frame codec.
//! - `outbox`: the write side: the queue, bounded in bytes, and its `writev`.
//! - `connection`: the task of an upgraded socket, and what its messages go to (a `Peer`).
//! - [`echo`]: the same transport answering every message with itself, for conformance runs.

mod connection;
pub mod echo;
mod frame;
mod outbox;

use std::sync::Arc;
use std::time::Duration;

use application::{ClientSession, FrameOutcome, Realtime};
use domain::CloseReason;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::inbound::error::ApiError;
use crate::inbound::handshake;
use connection::{Connection, Peer};
use outbox::Outbox;

/// The transport's name, as the connection metrics label it.
pub const TRANSPORT: &str = "websocket";

/// Tuning of WebSocket connections.
#[derive(Debug, Clone)]
pub struct WsSettings {
    /// Bytes of frames that may wait for a client before it is closed as a slow consumer
    /// (4008).
    pub outbound_queue_bytes: usize,
    /// Largest client message or frame accepted; larger ones close the connection with 1009.
    pub max_message_bytes: usize,
    /// How long the server waits for the client's half of a close handshake it started.
    pub close_timeout: Duration,
}

impl Default for WsSettings {
    fn default() -> Self {
        Self {
            outbound_queue_bytes: 1024 * 1024,
            max_message_bytes: 64 * 1024,
            close_timeout: Duration::from_secs(2),
        }
    }
}

/// The `/ws` route.
pub fn route(
    app: Arc<Realtime>,
    settings: WsSettings,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone + Send + Sync + 'static {
    let settings = Arc::new(settings);
    warp::path!("ws")
        .and(warp::get())
        .and(warp::any().map(move || (app.clone(), settings.clone())))
        .and(warp::query::raw().map(Some).or(warp::any().map(|| None)).unify())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<OnUpgrade>())
        .and_then(upgrade)
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Checks the upgrade headers and returns `Sec-WebSocket-Accept`.
fn accept_key(headers: &HeaderMap) -> Result<HeaderValue, ApiError> {
    if !header_has_token(headers, header::UPGRADE, "websocket")
        || !header_has_token(headers, header::CONNECTION, "upgrade")
    {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "this endpoint only speaks WebSocket",
        ));
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes) != Some(b"13") {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "unsupported WebSocket version; use 13",
        ));
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| ApiError::bad_request("missing Sec-WebSocket-Key header"))?;
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    HeaderValue::from_str(&accept).map_err(|_| ApiError::bad_request("invalid Sec-WebSocket-Key header"))
}

/// The `101 Switching Protocols` answer.
fn switching_protocols(accept: HeaderValue) -> Response {
    let mut response = Response::new(warp::hyper::body::Bytes::new().into());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    response
}

/// The socket of a completed upgrade and the bytes the client sent right after its handshake.
async fn upgraded(on_upgrade: OnUpgrade) -> Option<(TcpStream, Vec<u8>)> {
    match on_upgrade.await.map(|upgraded| upgraded.downcast::<TokioIo<TcpStream>>()) {
        // Copied out: the bytes share hyper's whole read buffer, which must not live on.
        Ok(Ok(parts)) => Some((parts.io.into_inner(), parts.read_buf.to_vec())),
        Ok(Err(_)) => {
            tracing::warn!("WebSocket upgrade over an unexpected transport; connection dropped");
            None
        }
        Err(error) => {
            tracing::debug!(%error, "WebSocket upgrade did not complete");
            None
        }
    }
}

async fn upgrade(
    (app, settings): (Arc<Realtime>, Arc<WsSettings>),
    query: Option<String>,
    headers: HeaderMap,
    on_upgrade: Option<OnUpgrade>,
) -> Result<Response, Rejection> {
    let resume = handshake::resume(query.as_deref()).map_err(warp::reject::custom)?;
    let opening = handshake::open(&app, TRANSPORT, query.as_deref(), &headers, resume).await?;
    let accept = accept_key(&headers).map_err(warp::reject::custom)?;
    let on_upgrade = on_upgrade
        .ok_or_else(|| warp::reject::custom(ApiError::bad_request("this connection cannot be upgraded")))?;
    let outbox = Arc::new(Outbox::new(settings.outbound_queue_bytes));
    let session = opening.connect(outbox.clone()).await.map_err(|e| handshake::rejection(&e))?;
    let info = session.info();
    let span = tracing::debug_span!(
        "connection",
        connection_id = %info.id,
        tenant = %info.tenant_id,
        user = %info.user_id
    );
    let task = async move {
        tracing::debug!("connection opened");
        // The socket and the early bytes are taken out before the connection runs, so that
        // nothing else of the upgrade stays in this task's state.
        if let Some((stream, leftover)) = upgraded(on_upgrade).await {
            session.start();
            let connection = Connection { peer: &session, settings, outbox };
            connection.run(Arc::new(stream), leftover).await;
        }
        tracing::debug!("connection closed");
        session.close();
    };
    // Without a subscriber for the span, the task does without it: 40 bytes less per connection.
    if span.is_disabled() {
        tokio::spawn(task);
    } else {
        tokio::spawn(tracing::Instrument::instrument(task, span));
    }
    Ok(switching_protocols(accept).into_response())
}

/// A client session's messages: client frames, answered through the session.
impl Peer for ClientSession {
    async fn message(&self, _outbox: &Outbox, _text: bool, payload: Vec<u8>) -> Option<CloseReason> {
        match self.handle(&payload).await {
            FrameOutcome::Nothing => None,
            FrameOutcome::Reply(reply) => {
                // Through the session's queue, so replies keep their place among deliveries.
                let _ = self.send(reply);
                None
            }
            FrameOutcome::Close(reason) => Some(reason),
        }
    }

    fn alive(&self) {
        self.seen();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_headers_are_checked() {
        let mut headers = HeaderMap::new();
        assert_eq!(accept_key(&headers).map_err(|e| e.status), Err(StatusCode::UPGRADE_REQUIRED));
        headers.insert(header::UPGRADE, HeaderValue::from_static("WebSocket"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        headers.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("8"));
        assert_eq!(accept_key(&headers).map_err(|e| e.status), Err(StatusCode::UPGRADE_REQUIRED));
        headers.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        assert_eq!(accept_key(&headers).map_err(|e| e.status), Err(StatusCode::BAD_REQUEST));
        // The example of RFC 6455, section 1.3.
        headers.insert(header::SEC_WEBSOCKET_KEY, HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="));
        assert_eq!(accept_key(&headers).ok(), Some(HeaderValue::from_static("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")));
    }
}
