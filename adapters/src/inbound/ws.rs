//! The WebSocket endpoint, `GET /ws`.
//!
//! warp routes the request and serves the HTTP side, but the upgrade is ours: we take hyper's
//! `OnUpgrade` from the request, answer `101 Switching Protocols` ourselves and build the
//! stream with a small [`WebSocketConfig`]. warp's built-in `ws()` gives every connection a
//! 128 KiB read buffer that cannot be configured; this way an idle connection costs a few KiB.
//!
//! Each connection is one task that owns the socket: it drains the bounded outbound queue
//! (welcome first, then fan-out deliveries and replies), reads client frames, and honours a
//! close request (shutdown, idle timeout, slow consumer) ahead of anything still queued.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use application::ports::{ClientSink, PushError};
use application::{ClientFrame, ConnectError, Realtime, Session};
use bytes::Bytes;
use domain::CloseReason;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::inbound::error::ApiError;

/// Tuning of WebSocket connections.
#[derive(Debug, Clone)]
pub struct WsSettings {
    /// Frames a client may have queued before it is closed as a slow consumer (4429).
    pub queue_capacity: usize,
    /// Largest client message accepted; larger ones close the connection with 1009.
    pub max_message_bytes: usize,
    /// How long one batch of writes may take before the socket is dropped.
    pub io_timeout: Duration,
    /// How long the server waits for the client's half of a close handshake.
    pub close_timeout: Duration,
}

impl Default for WsSettings {
    fn default() -> Self {
        Self {
            queue_capacity: 1024,
            max_message_bytes: 64 * 1024,
            io_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(2),
        }
    }
}

impl WsSettings {
    fn tungstenite_config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(4 * 1024)
            .write_buffer_size(16 * 1024)
            // Above the largest frame the service sends (a 2 MiB broker message).
            .max_write_buffer_size(8 * 1024 * 1024)
            .max_message_size(Some(self.max_message_bytes))
            .max_frame_size(Some(self.max_message_bytes))
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

/// The token from `?token=` or, failing that, from `Authorization: Bearer`.
fn token(query: Option<&str>, headers: &HeaderMap) -> Option<String> {
    let from_query = query.and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(key, _)| key == "token")
            .map(|(_, value)| value.into_owned())
    });
    from_query.or_else(|| {
        let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let (scheme, token) = value.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned())
    })
}

fn connect_rejection(error: &ConnectError) -> Rejection {
    let api = match error {
        ConnectError::MissingToken | ConnectError::InvalidToken(_) | ConnectError::InvalidClaims(_) => {
            ApiError::unauthorized(error.to_string())
        }
        ConnectError::Forbidden => ApiError::new(StatusCode::FORBIDDEN, "forbidden", error.to_string()),
        ConnectError::AtCapacity => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "at_capacity", error.to_string()).retry_after(1)
        }
        ConnectError::Broker(_) | ConnectError::Gone => ApiError::unavailable(error.to_string()),
    };
    warp::reject::custom(api)
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

async fn upgrade(
    (app, settings): (Arc<Realtime>, Arc<WsSettings>),
    query: Option<String>,
    headers: HeaderMap,
    on_upgrade: Option<OnUpgrade>,
) -> Result<Response, Rejection> {
    let token = token(query.as_deref(), &headers);
    let admission = app.connect.authorize(token.as_deref()).await.map_err(|e| connect_rejection(&e))?;
    let accept = accept_key(&headers).map_err(warp::reject::custom)?;
    let on_upgrade = on_upgrade
        .ok_or_else(|| warp::reject::custom(ApiError::bad_request("this connection cannot be upgraded")))?;
    let (sink, outbound) = WsSink::new(settings.queue_capacity);
    let close = sink.close.clone();
    let session = app.connect.connect(admission, sink).await.map_err(|e| connect_rejection(&e))?;
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let config = settings.tungstenite_config();
                let socket =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                        .await;
                let connection =
                    Connection { app: app.clone(), settings, session: &session, outbound, close };
                connection.run(socket).await;
            }
            Err(error) => tracing::debug!(%error, "WebSocket upgrade did not complete"),
        }
        tracing::debug!(connection_id = %session.connection_id(), "connection closed");
        app.disconnect.disconnect(session);
    });
    let mut response = Response::new(warp::hyper::body::Bytes::new().into());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    Ok(response.into_response())
}

/// A close request, set once, read by the connection task.
#[derive(Debug, Default)]
struct CloseSignal {
    reason: OnceLock<CloseReason>,
    notify: Notify,
}

/// The [`ClientSink`] of one connection: a bounded queue and a close signal.
#[derive(Debug)]
struct WsSink {
    queue: mpsc::Sender<Bytes>,
    close: Arc<CloseSignal>,
}

impl WsSink {
    fn new(capacity: usize) -> (Arc<Self>, mpsc::Receiver<Bytes>) {
        let (queue, outbound) = mpsc::channel(capacity.max(1));
        (Arc::new(Self { queue, close: Arc::new(CloseSignal::default()) }), outbound)
    }
}

impl ClientSink for WsSink {
    fn push(&self, frame: Bytes) -> Result<(), PushError> {
        if self.close.reason.get().is_some() {
            return Err(PushError::Closed);
        }
        self.queue.try_send(frame).map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => PushError::Full,
            mpsc::error::TrySendError::Closed(_) => PushError::Closed,
        })
    }

    fn close(&self, reason: CloseReason) {
        if self.close.reason.set(reason).is_ok() {
            self.close.notify.notify_one();
        }
    }
}

type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Frames written per flush at most, so one busy connection cannot starve its own reads.
const WRITE_BATCH: usize = 64;

struct Connection<'a> {
    app: Arc<Realtime>,
    settings: Arc<WsSettings>,
    session: &'a Session,
    outbound: mpsc::Receiver<Bytes>,
    close: Arc<CloseSignal>,
}

enum Next {
    Continue,
    Close(CloseCode, &'static str),
    Stop,
}

impl Connection<'_> {
    async fn run(mut self, mut socket: Socket) {
        loop {
            let next = tokio::select! {
                biased;
                () = self.close.notify.notified() => {
                    let reason = self.close.reason.get().copied().unwrap_or(CloseReason::GoingAway);
                    Next::Close(CloseCode::from(reason.code()), reason.reason())
                }
                frame = self.outbound.recv() => match frame {
                    Some(frame) => self.write(&mut socket, frame).await,
                    None => Next::Stop,
                },
                incoming = socket.next() => self.read(incoming).await,
            };
            match next {
                Next::Continue => {}
                Next::Stop => break,
                Next::Close(code, reason) => {
                    self.close_handshake(&mut socket, code, reason).await;
                    break;
                }
            }
        }
    }

    async fn write(&mut self, socket: &mut Socket, first: Bytes) -> Next {
        let io_timeout = self.settings.io_timeout;
        let batch = async {
            socket.feed(text(first)).await?;
            for _ in 1..WRITE_BATCH {
                match self.outbound.try_recv() {
                    Ok(frame) => socket.feed(text(frame)).await?,
                    Err(_) => break,
                }
            }
            socket.flush().await
        };
        match tokio::time::timeout(io_timeout, batch).await {
            Ok(Ok(())) => Next::Continue,
            Ok(Err(error)) => {
                tracing::debug!(%error, "write failed");
                Next::Stop
            }
            Err(_) => {
                tracing::debug!("write timed out");
                Next::Stop
            }
        }
    }

    async fn read(&mut self, incoming: Option<Result<Message, tungstenite::Error>>) -> Next {
        let frame = match incoming {
            Some(Ok(Message::Text(text))) => {
                self.app.frames.handle(self.session, ClientFrame::Text(text.as_str())).await
            }
            Some(Ok(Message::Binary(_))) => self.app.frames.handle(self.session, ClientFrame::Binary).await,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {
                self.app.frames.touch(self.session);
                None
            }
            Some(Ok(Message::Frame(_))) => None,
            // The client started the close handshake; tungstenite has queued the echo, which
            // the close path flushes.
            Some(Ok(Message::Close(_))) => return Next::Close(CloseCode::Normal, ""),
            Some(Err(tungstenite::Error::Capacity(_))) => {
                return Next::Close(CloseCode::Size, "message too big");
            }
            Some(Err(tungstenite::Error::Utf8(_))) => {
                return Next::Close(CloseCode::Invalid, "invalid UTF-8");
            }
            Some(Err(tungstenite::Error::Protocol(_))) => {
                return Next::Close(CloseCode::Protocol, "protocol error");
            }
            Some(Err(_)) | None => return Next::Stop,
        };
        if let Some(reply) = frame {
            // Through the queue, so replies keep their place among deliveries.
            let _ = self.session.handle().send(reply);
        }
        Next::Continue
    }

    /// Sends a close frame (or the echo of the client's) and waits, bounded, for the
    /// handshake to finish.
    async fn close_handshake(&mut self, socket: &mut Socket, code: CloseCode, reason: &'static str) {
        let close_timeout = self.settings.close_timeout;
        let handshake = async {
            let frame = CloseFrame { code, reason: Utf8Bytes::from_static(reason) };
            // After a client-initiated close this only flushes the queued echo.
            let _ = socket.close(Some(frame)).await;
            while let Some(Ok(_)) = socket.next().await {}
        };
        let _ = tokio::time::timeout(close_timeout, handshake).await;
    }
}

fn text(frame: Bytes) -> Message {
    // Frames are produced by serde_json and are valid UTF-8; the check does not copy.
    Message::Text(Utf8Bytes::try_from(frame).unwrap_or_else(|_| Utf8Bytes::from_static("{}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_comes_from_the_query_first_then_from_a_bearer_header() {
        let mut headers = HeaderMap::new();
        assert_eq!(token(Some("token=abc.def"), &headers), Some("abc.def".into()));
        assert_eq!(token(Some("a=1&token=x%2By"), &headers), Some("x+y".into()));
        assert_eq!(token(None, &headers), None);
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer hdr.tok"));
        assert_eq!(token(None, &headers), Some("hdr.tok".into()));
        assert_eq!(token(Some("other=1"), &headers), Some("hdr.tok".into()));
        assert_eq!(token(Some("token=q"), &headers), Some("q".into()));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic dXNlcg=="));
        assert_eq!(token(None, &headers), None);
    }

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
