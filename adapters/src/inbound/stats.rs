//! `GET /api/stats`: the cluster-wide statistics, from the latest report of every instance; and
//! `GET /api/stats/stream`: the same as Server-Sent Events, sent as they change (what the
//! dashboard reads). Both are server API calls: `Authorization: Bearer <key>`.

use std::sync::Arc;
use std::time::Duration;

use application::Realtime;
use bytes::Bytes;
use futures_util::Stream;
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::inbound::error::ApiError;
use crate::inbound::http::with;
use crate::inbound::server_api::{api_rejection, bearer};
use crate::inbound::sse::event_stream;

/// Statistics streams open at once on one instance; beyond it, 503.
const MAX_STATS_STREAMS: usize = 64;

/// Changes that arrive within this time are sent as one event.
const COALESCE: Duration = Duration::from_millis(250);

/// A comment line is sent when nothing else was for this long, so proxies keep the stream.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// How often a quiet stream checks whether the instance is draining.
const CHECK_PERIOD: Duration = Duration::from_secs(1);

pub(crate) fn routes(
    app: Arc<Realtime>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone + Send + Sync + 'static {
    let once = warp::path!("api" / "stats")
        .and(warp::get())
        .and(with(app.clone()))
        .and(warp::header::optional::<String>("authorization"))
        .and_then(stats);
    let streams = Arc::new(Semaphore::new(MAX_STATS_STREAMS));
    let stream = warp::path!("api" / "stats" / "stream")
        .and(warp::get())
        .and(with((app, streams)))
        .and(warp::header::optional::<String>("authorization"))
        .and_then(stream);
    once.or(stream).unify()
}

async fn stats(app: Arc<Realtime>, authorization: Option<String>) -> Result<Response, Rejection> {
    app.api().authorize(bearer(authorization.as_deref())).map_err(|e| api_rejection(&e))?;
    Ok(warp::reply::json(&*app.cluster().stats()).into_response())
}

async fn stream(
    (app, streams): (Arc<Realtime>, Arc<Semaphore>),
    authorization: Option<String>,
) -> Result<Response, Rejection> {
    app.api().authorize(bearer(authorization.as_deref())).map_err(|e| api_rejection(&e))?;
    let permit = streams.try_acquire_owned().map_err(|_| {
        warp::reject::custom(ApiError::unavailable("too many statistics streams open; retry later"))
    })?;
    Ok(event_stream(events(app, permit)))
}

/// One Server-Sent Event.
fn event(name: &str, data: &impl Serialize) -> Bytes {
    let json = serde_json::to_string(data).unwrap_or_else(|_| "null".to_owned());
    Bytes::from(format!("event: {name}\ndata: {json}\n\n"))
}

struct StreamState {
    app: Arc<Realtime>,
    changes: watch::Receiver<u64>,
    /// The `history` event was sent.
    history_sent: bool,
    /// The newest sample sent (Unix ms).
    sent_until_ms: u64,
    quiet_since: tokio::time::Instant,
    _permit: OwnedSemaphorePermit,
}

impl StreamState {
    /// The samples not sent yet (all of them at first, as one `history` event), then `stats`.
    fn update(&mut self) -> Bytes {
        let samples = self.app.cluster().samples_after(self.sent_until_ms);
        let mut chunk = Vec::new();
        if !self.history_sent {
            self.history_sent = true;
            chunk.extend_from_slice(&event("history", &samples));
        } else {
            for sample in &samples {
                chunk.extend_from_slice(&event("sample", sample));
            }
        }
        if let Some(newest) = samples.last() {
            self.sent_until_ms = newest.at_ms;
        }
        chunk.extend_from_slice(&event("stats", &*self.app.cluster().stats()));
        self.quiet_since = tokio::time::Instant::now();
        Bytes::from(chunk)
    }
}

/// `history` (the samples of the last 15 minutes) and `stats` at once, then `sample` and
/// `stats` as they change, until the instance drains.
fn events(
    app: Arc<Realtime>,
    permit: OwnedSemaphorePermit,
) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + Sync + 'static {
    let mut changes = app.cluster().changes();
    changes.mark_unchanged();
    let state = StreamState {
        app,
        changes,
        history_sent: false,
        sent_until_ms: 0,
        quiet_since: tokio::time::Instant::now(),
        _permit: permit,
    };
    futures_util::stream::unfold(state, |mut state| async move {
        if !state.history_sent {
            let chunk = state.update();
            return Some((Ok(chunk), state));
        }
        loop {
            if state.app.is_draining() {
                return None;
            }
            let changed = tokio::time::timeout(CHECK_PERIOD, state.changes.changed()).await;
            match changed {
                Ok(Ok(())) => {
                    tokio::time::sleep(COALESCE).await;
                    state.changes.mark_unchanged();
                    let chunk = state.update();
                    return Some((Ok(chunk), state));
                }
                Ok(Err(_)) => return None,
                Err(_) if state.quiet_since.elapsed() >= KEEPALIVE => {
                    state.quiet_since = tokio::time::Instant::now();
                    return Some((Ok(Bytes::from_static(b": keepalive\n\n")), state));
                }
                Err(_) => {}
            }
        }
    })
}
