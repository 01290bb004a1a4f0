//! The WebSocket endpoint, `GET /ws`.
//!
//! warp routes the request and serves the HTTP side, but the upgrade and the WebSocket protocol
//! are ours: we take hyper's `OnUpgrade` from the request, answer `101 Switching Protocols`
//! ourselves, take the TCP socket back from hyper and speak RFC 6455 over it with a hand-written
//! codec. warp's built-in `ws()` gives every connection a 128 KiB read buffer, and tungstenite
//! streams keep read and write buffers per connection; here an idle connection holds no buffer
//! at all.
//!
//! Frames for a client (the welcome, the replay, fan-out deliveries, replies) wait in the
//! connection's queue, bounded in bytes. Each connection has one task: it reads client frames
//! when the socket is readable, writes everything queued with one `writev` when woken (and the
//! rest when the socket is writable again), and honours a close request (shutdown, time limits,
//! slow consumer) ahead of anything still queued.
//!
//! # Layout
//! - [`mod@self`]: the route, the checks before the upgrade and the `101` answer.
//! - `frame`: the frame codec.
//! - `outbox`: the write side: direct writes and the queue, bounded in bytes.
//! - `connection`: the task of an upgraded socket.

mod connection;
mod frame;
mod outbox;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use application::{ConnectError, Realtime, Resume};
use domain::StreamPosition;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::inbound::error::ApiError;
use connection::Connection;
use outbox::Outbox;

/// Tuning of WebSocket connections.
#[derive(Debug, Clone)]
pub struct WsSettings {
    /// Bytes of frames that may wait for a client before it is closed as a slow consumer
    /// (4008).
    pub outbound_queue_bytes: usize,
    /// Largest client message or frame accepted; larger ones close the connection with 1009.
    pub max_message_bytes: usize,
    /// When set, the only `Origin` values accepted on an upgrade (exact match). Requests
    /// without an `Origin` header are accepted either way.
    pub allowed_origins: Option<HashSet<String>>,
    /// How long the server waits for the client's half of a close handshake.
    pub close_timeout: Duration,
    /// Upgrades that may be opening at once (reading their positions, subscribing, recording
    /// their presence); the next ones wait for a turn.
    pub concurrent_opens: usize,
    /// How long an upgrade waits for its turn before it is refused with 503 `overloaded`.
    pub open_queue_timeout: Duration,
}

impl Default for WsSettings {
    fn default() -> Self {
        Self {
            outbound_queue_bytes: 1024 * 1024,
            max_message_bytes: 64 * 1024,
            allowed_origins: None,
            close_timeout: Duration::from_secs(2),
            concurrent_opens: 128,
            open_queue_timeout: Duration::from_secs(5),
        }
    }
}

/// The `/ws` route.
pub fn route(
    app: Arc<Realtime>,
    settings: WsSettings,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone + Send + Sync + 'static {
    let opens = Arc::new(Semaphore::new(settings.concurrent_opens.max(1)));
    let settings = Arc::new(settings);
    warp::path!("ws")
        .and(warp::get())
        .and(warp::any().map(move || (app.clone(), settings.clone(), opens.clone())))
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

/// The positions a reconnecting client asks to resume from: `since=<epoch>:<offset>` for its
/// tenant channel, `user_since=<epoch>:<offset>` for its user channel.
fn resume(query: Option<&str>) -> Result<Resume, ApiError> {
    let mut resume = Resume::default();
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let slot = match &*key {
            "since" => &mut resume.since,
            "user_since" => &mut resume.user_since,
            _ => continue,
        };
        let position = StreamPosition::parse(&value).map_err(|error| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_position", format!("invalid {key}: {error}"))
        })?;
        slot.get_or_insert(position);
    }
    Ok(resume)
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
        ConnectError::TooManyConnections(_) => {
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_connections", error.to_string())
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

/// Refuses a browser page of an origin outside `allowed` (cross-site WebSocket hijacking).
fn check_origin(allowed: Option<&HashSet<String>>, headers: &HeaderMap) -> Result<(), ApiError> {
    let (Some(allowed), Some(origin)) = (allowed, headers.get(header::ORIGIN)) else {
        return Ok(());
    };
    match origin.to_str() {
        Ok(origin) if allowed.contains(origin) => Ok(()),
        _ => Err(ApiError::new(StatusCode::FORBIDDEN, "origin_not_allowed", "this Origin may not connect")),
    }
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
    (app, settings, opens): (Arc<Realtime>, Arc<WsSettings>, Arc<Semaphore>),
    query: Option<String>,
    headers: HeaderMap,
    on_upgrade: Option<OnUpgrade>,
) -> Result<Response, Rejection> {
    check_origin(settings.allowed_origins.as_ref(), &headers).map_err(warp::reject::custom)?;
    let resume = resume(query.as_deref()).map_err(warp::reject::custom)?;
    let token = token(query.as_deref(), &headers);
    let admission = app.connect.authorize(token.as_deref()).await.map_err(|e| connect_rejection(&e))?;
    let admission = admission.resuming(resume);
    let accept = accept_key(&headers).map_err(warp::reject::custom)?;
    let on_upgrade = on_upgrade
        .ok_or_else(|| warp::reject::custom(ApiError::bad_request("this connection cannot be upgraded")))?;
    // A burst of upgrades (a reconnection storm) opens a bounded number at a time, so that the
    // broker's answers to those it serves, and to everything else, stay prompt; the rest wait
    // their turn, or are told to retry.
    let turn = tokio::time::timeout(settings.open_queue_timeout, opens.acquire_owned())
        .await
        .ok()
        .and_then(Result::ok)
        .ok_or_else(|| {
            app.connect.overloaded();
            warp::reject::custom(
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded",
                    "too many connections opening; retry",
                )
                .retry_after(1),
            )
        })?;
    let outbox = Arc::new(Outbox::new(settings.outbound_queue_bytes));
    let mut session =
        app.connect.connect(admission, outbox.clone()).await.map_err(|e| connect_rejection(&e))?;
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
        let socket = match on_upgrade.await.map(|upgraded| upgraded.downcast::<TokioIo<TcpStream>>()) {
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
        };
        let (tenant, user) = (session.info().tenant_id.clone(), session.info().user_id.clone());
        if socket.is_some() {
            // Boxed: presence's state need not stay in the connection's task.
            Box::pin(app.presence.changed(&tenant, &user)).await;
        }
        // The opening is over: the next upgrade may take its turn.
        drop(turn);
        if let Some((stream, leftover)) = socket {
            let connection = Connection { app: app.clone(), settings, session: &mut session, outbox };
            connection.run(Arc::new(stream), leftover).await;
        }
        tracing::debug!("connection closed");
        app.disconnect.disconnect(session);
        Box::pin(app.presence.changed(&tenant, &user)).await;
    };
    tokio::spawn(tracing::Instrument::instrument(task, span));
    let mut response = Response::new(warp::hyper::body::Bytes::new().into());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    Ok(response.into_response())
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
    fn origins_match_exactly_and_requests_without_one_pass() {
        let allowed: HashSet<String> = ["https://app.example.com".to_owned()].into();
        let mut headers = HeaderMap::new();
        assert!(check_origin(Some(&allowed), &headers).is_ok(), "no Origin: not a browser");
        for (origin, ok) in [
            ("https://app.example.com", true),
            ("https://app.example.com.evil.test", false),
            ("http://app.example.com", false),
            ("null", false),
        ] {
            headers.insert(header::ORIGIN, HeaderValue::from_static(origin));
            assert_eq!(check_origin(Some(&allowed), &headers).is_ok(), ok, "{origin}");
            assert!(check_origin(None, &headers).is_ok(), "unset: every origin");
        }
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
