//! The Server-Sent Events transport: `GET /sse` streams a client session's frames as
//! `text/event-stream`, and `POST /sse/{connection_id}` carries the client's frames.
//!
//! It is built only on the client session port, as the WebSocket transport is: the stream is
//! the session's sink, a POST body is one client frame, and the session answers it. What the
//! transport adds is the encoding (`stream`) and the bookkeeping that finds a session by its
//! connection id for its POSTs.
//!
//! # Layout
//! - [`mod@self`]: the two routes and the task of each stream.
//! - `stream`: the sink bounded in bytes and the response body that drains it as events.

mod stream;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use application::{ClientSession, FrameOutcome, Realtime};
use bytes::Bytes;
use domain::ConnectionId;
use futures_util::Stream;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::inbound::error::ApiError;
use crate::inbound::handshake;
use crate::inbound::http::{read_limited_in_time, with};
use application::ports::ClientSink;
use stream::{SseSink, Status};

/// The transport's name, as the connection metrics label it.
pub const TRANSPORT: &str = "sse";

/// The header an `EventSource` sends when it reconnects, with the last event id it received.
const LAST_EVENT_ID: &str = "last-event-id";

/// Tuning of SSE connections.
#[derive(Debug, Clone)]
pub struct SseSettings {
    /// Bytes of frames that may wait for a client before it is closed as a slow consumer
    /// (4008).
    pub outbound_queue_bytes: usize,
    /// Largest client frame a POST may carry; larger ones are answered 413.
    pub max_message_bytes: usize,
    /// How long a stream that was asked to close may take to send its close event before its
    /// session ends anyway.
    pub close_timeout: Duration,
}

impl Default for SseSettings {
    fn default() -> Self {
        Self {
            outbound_queue_bytes: 1024 * 1024,
            max_message_bytes: 64 * 1024,
            close_timeout: Duration::from_secs(2),
        }
    }
}

/// The sessions of this instance's streams and their sinks, by connection id, for their POSTs.
type Streams = Arc<Mutex<HashMap<ConnectionId, (Arc<ClientSession>, Arc<SseSink>)>>>;

/// What every SSE request shares.
#[derive(Clone)]
struct Shared {
    app: Arc<Realtime>,
    settings: Arc<SseSettings>,
    streams: Streams,
}

/// `GET /sse` and `POST /sse/{connection_id}`.
pub fn routes(
    app: Arc<Realtime>,
    settings: SseSettings,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone + Send + Sync + 'static {
    let shared = Shared { app, settings: Arc::new(settings), streams: Arc::default() };
    let query = warp::query::raw().map(Some).or(warp::any().map(|| None)).unify();
    let open = warp::path!("sse")
        .and(warp::get())
        .and(with(shared.clone()))
        .and(query)
        .and(warp::header::headers_cloned())
        .and_then(open);
    let post = warp::path!("sse" / String)
        .and(warp::post())
        .and(with(shared))
        .and(query)
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .and_then(post);
    open.or(post).unify()
}

/// The positions to resume from: `since`/`user_since` in the query, then the event id of a
/// reconnecting `EventSource` (the `Last-Event-ID` header, or the `last_event_id` parameter for
/// clients that cannot set headers), which has the same form.
fn resume(query: Option<&str>, headers: &HeaderMap) -> Result<application::Resume, ApiError> {
    let mut resume = handshake::resume(query)?;
    let from_query = query.and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(key, _)| key == "last_event_id")
            .map(|(_, v)| v.into_owned())
    });
    let from_header = headers.get(LAST_EVENT_ID).map(|v| v.to_str().unwrap_or("\u{fffd}").to_owned());
    for id in [from_query, from_header].into_iter().flatten() {
        handshake::add_resume(&mut resume, &id).map_err(|error| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_position",
                format!("invalid Last-Event-ID: {}", error.message),
            )
        })?;
    }
    Ok(resume)
}

async fn open(shared: Shared, query: Option<String>, headers: HeaderMap) -> Result<Response, Rejection> {
    let resume = resume(query.as_deref(), &headers).map_err(warp::reject::custom)?;
    let opening = handshake::open(&shared.app, TRANSPORT, query.as_deref(), &headers, resume).await?;
    let sink = SseSink::new(shared.settings.outbound_queue_bytes);
    let session = opening.connect(sink.clone()).await.map_err(|e| handshake::rejection(&e))?;
    let session = Arc::new(session);
    let id = session.connection_id().clone();
    shared
        .streams
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(id.clone(), (session.clone(), sink.clone()));
    let body = sink.body();
    let info = session.info();
    let span =
        tracing::debug_span!("sse", connection_id = %info.id, tenant = %info.tenant_id, user = %info.user_id);
    let close_timeout = shared.settings.close_timeout;
    let task = async move {
        tracing::debug!("stream opened");
        session.start();
        run(&session, &sink, close_timeout).await;
        shared.streams.lock().unwrap_or_else(PoisonError::into_inner).remove(&id);
        sink.finish();
        session.close();
        tracing::debug!("stream closed");
    };
    tokio::spawn(tracing::Instrument::instrument(task, span));
    Ok(event_stream(body))
}

/// Follows the stream until it ends: every heartbeat handed to the client's connection counts
/// as a sign of life (the connection takes no more once the client stops reading or is gone).
/// A stream asked to close gets `close_timeout` to send its close event.
async fn run(session: &ClientSession, sink: &SseSink, close_timeout: Duration) {
    let mut known = Status::default();
    loop {
        let status = if known.closing {
            match tokio::time::timeout(close_timeout, sink.changed(known)).await {
                Ok(status) => status,
                Err(_) => return,
            }
        } else {
            sink.changed(known).await
        };
        if status.ended {
            return;
        }
        if status.heartbeats > known.heartbeats {
            session.seen();
        }
        known = status;
    }
}

/// The `200 text/event-stream` answer over `body`.
pub(crate) fn event_stream(
    body: impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + Sync + 'static,
) -> Response {
    let mut response = warp::reply::stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache, no-transform"));
    // Proxies that buffer responses (nginx) pass this one through as it comes.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// `POST /sse/{connection_id}`: one client frame for the session of that stream.
async fn post<S, B>(
    connection_id: String,
    shared: Shared,
    query: Option<String>,
    headers: HeaderMap,
    body: S,
) -> Result<Response, Rejection>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin + Send,
    B: bytes::Buf + Send,
{
    let unknown = || {
        warp::reject::custom(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_connection",
            "no such stream on this instance: it ended, or another instance holds it",
        ))
    };
    let id = ConnectionId::parse(&connection_id).map_err(|_| unknown())?;
    let stream = shared.streams.lock().unwrap_or_else(PoisonError::into_inner).get(&id).cloned();
    let (session, sink) = stream.ok_or_else(unknown)?;
    let token = handshake::token(query.as_deref(), &headers);
    session.authenticate(token.as_deref()).await.map_err(|e| handshake::rejection(&e))?;
    let frame =
        read_limited_in_time(body, shared.settings.max_message_bytes, "the frame did not arrive in time")
            .await?;
    Ok(match session.handle(&frame).await {
        FrameOutcome::Reply(reply) => {
            let mut response = Response::new(reply.into());
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        FrameOutcome::Nothing => StatusCode::ACCEPTED.into_response(),
        FrameOutcome::Close(reason) => {
            // The stream says so with its close event.
            sink.close(reason);
            StatusCode::ACCEPTED.into_response()
        }
    })
}
