//! The write side of one Server-Sent Events connection: the session's sink, bounded in bytes,
//! and the response body that drains it as `text/event-stream` events.
//!
//! A frame becomes `data: <the frame's JSON>`; a frame with a position also gets an `id:`, the
//! client's cursor (see [`Cursor`]). A heartbeat is a comment. A close request goes ahead of
//! anything still queued, as `event: close` with the code, and ends the body.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use application::ports::{ClientSink, PushError};
use bytes::{BufMut, Bytes, BytesMut};
use domain::{CloseReason, StreamPosition};
use serde::Deserialize;
use tokio::sync::Notify;

/// The position a client has reached in its tenant and user channels, as an SSE event id:
/// `since=<epoch>:<offset>&user_since=<epoch>:<offset>`, the same parameters a reconnecting
/// WebSocket client sends. Sent back as `Last-Event-ID`, it resumes after both.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Cursor {
    tenant: Option<StreamPosition>,
    user: Option<StreamPosition>,
}

/// What the cursor needs of a frame.
#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    channel: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(borrow, default)]
    epoch: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    payload: Option<&'a serde_json::value::RawValue>,
}

impl<'de> Deserialize<'de> for StreamPositionDe {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            epoch: String,
            offset: u64,
        }
        let raw = Raw::deserialize(deserializer)?;
        Ok(Self(StreamPosition::new(raw.epoch, raw.offset)))
    }
}

/// A position as the frames spell it.
struct StreamPositionDe(StreamPosition);

impl Cursor {
    /// Moves the cursor past `frame`; returns whether it moved (the frame then gets an id).
    fn advance(&mut self, frame: &[u8]) -> bool {
        let Ok(peek) = serde_json::from_slice::<Peek<'_>>(frame) else { return false };
        if peek.kind == "welcome" {
            let Some(positions) = peek.payload.and_then(|p| serde_json::from_str::<WelcomeDe>(p.get()).ok())
            else {
                return false;
            };
            let mut moved = false;
            for (channel, StreamPositionDe(position)) in positions.positions {
                moved |= self.set(&channel, position);
            }
            return moved;
        }
        match (peek.channel, peek.offset, peek.epoch) {
            (Some(channel), Some(offset), Some(epoch)) => {
                self.set(&channel, StreamPosition::new(epoch, offset))
            }
            _ => false,
        }
    }

    fn set(&mut self, channel: &str, position: StreamPosition) -> bool {
        let slot = if channel.starts_with("tenant:") {
            &mut self.tenant
        } else if channel.starts_with("user:") {
            &mut self.user
        } else {
            return false;
        };
        *slot = Some(position);
        true
    }

    /// The event id: the query parameters that resume from here.
    fn id(&self) -> String {
        let parts = [("since", &self.tenant), ("user_since", &self.user)];
        parts
            .iter()
            .filter_map(|(key, position)| {
                position.as_ref().map(|p| format!("{key}={}:{}", p.epoch, p.offset))
            })
            .collect::<Vec<_>>()
            .join("&")
    }
}

#[derive(Deserialize)]
struct WelcomeDe {
    #[serde(default)]
    positions: std::collections::HashMap<String, StreamPositionDe>,
}

/// Appends the event carrying `frame` (with the cursor's id when it has a position).
fn encode_frame(out: &mut BytesMut, cursor: &mut Cursor, frame: &[u8]) {
    if cursor.advance(frame) {
        out.put_slice(b"id: ");
        out.put_slice(cursor.id().as_bytes());
        out.put_u8(b'\n');
    }
    // A frame is one line of compact JSON: one data line carries it.
    out.put_slice(b"data: ");
    out.put_slice(frame);
    out.put_slice(b"\n\n");
}

/// The final event: `event: close` with the close code and reason.
fn close_event(reason: CloseReason) -> Bytes {
    let data = serde_json::json!({"code": reason.code(), "reason": reason.reason()});
    Bytes::from(format!("event: close\ndata: {data}\n\n"))
}

/// A heartbeat: a comment line, which clients ignore.
const HEARTBEAT: &[u8] = b": ping\n\n";

/// Where a stream stands, as its connection's task follows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Status {
    /// The body ended (its last event went out, or the client went away).
    pub(super) ended: bool,
    /// A close was requested.
    pub(super) closing: bool,
    /// Heartbeats handed to the HTTP connection so far.
    pub(super) heartbeats: u64,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Bytes>,
    /// Bytes waiting in `queue`.
    queued: usize,
    heartbeat: bool,
    close: Option<CloseReason>,
    /// The body ended (its last event went out, or the client went away).
    finished: bool,
    /// Heartbeats handed to the HTTP connection so far.
    heartbeats: u64,
    waker: Option<Waker>,
}

/// The [`ClientSink`] of one SSE connection, shared by the session and the response body.
///
/// At most `limit` bytes wait (a single frame larger than that is accepted when nothing
/// waits). A client that lets it fill up is closed as a slow consumer by the hub.
#[derive(Debug)]
pub(super) struct SseSink {
    state: Mutex<State>,
    /// Tells the connection's task that the body ended or a heartbeat went out.
    changed: Notify,
    limit: usize,
}

impl SseSink {
    pub(super) fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self { state: Mutex::default(), changed: Notify::new(), limit: limit.max(1) })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wake(mut state: MutexGuard<'_, State>) {
        let waker = state.waker.take();
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// The response body that drains this sink.
    pub(super) fn body(self: &Arc<Self>) -> EventStream {
        EventStream { sink: self.clone(), cursor: Cursor::default() }
    }

    fn status(&self) -> Status {
        let state = self.state();
        Status { ended: state.finished, closing: state.close.is_some(), heartbeats: state.heartbeats }
    }

    /// Waits until the sink's status differs from `known`, and returns it.
    pub(super) async fn changed(&self, known: Status) -> Status {
        loop {
            let notified = self.changed.notified();
            let status = self.status();
            if status != known {
                return status;
            }
            notified.await;
        }
    }

    /// Nothing will be sent any more: later pushes fail with [`PushError::Closed`].
    pub(super) fn finish(&self) {
        let mut state = self.state();
        state.finished = true;
        state.queue = VecDeque::new();
        state.queued = 0;
        Self::wake(state);
        self.changed.notify_waiters();
    }
}

impl ClientSink for SseSink {
    fn push(&self, frame: Bytes) -> Result<(), PushError> {
        let mut state = self.state();
        if state.finished || state.close.is_some() {
            return Err(PushError::Closed);
        }
        if state.queued > 0 && state.queued + frame.len() > self.limit {
            return Err(PushError::Full);
        }
        state.queued += frame.len();
        state.queue.push_back(frame);
        Self::wake(state);
        Ok(())
    }

    fn close(&self, reason: CloseReason) {
        let mut state = self.state();
        if state.close.is_none() && !state.finished {
            state.close = Some(reason);
            Self::wake(state);
            self.changed.notify_waiters();
        }
    }

    fn ping(&self) {
        let mut state = self.state();
        if !state.finished {
            state.heartbeat = true;
            Self::wake(state);
        }
    }
}

/// The body of an SSE response: everything queued at once, as one chunk.
#[derive(Debug)]
pub(super) struct EventStream {
    sink: Arc<SseSink>,
    cursor: Cursor,
}

impl futures_util::Stream for EventStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let mut state = this.sink.state();
        if state.finished {
            return Poll::Ready(None);
        }
        if let Some(reason) = state.close {
            // The close goes ahead of what waits; the body ends after it.
            state.queue = VecDeque::new();
            state.queued = 0;
            state.finished = true;
            drop(state);
            this.sink.changed.notify_waiters();
            return Poll::Ready(Some(Ok(close_event(reason))));
        }
        if state.queue.is_empty() && !state.heartbeat {
            state.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let mut out = BytesMut::with_capacity(state.queued + 64 * state.queue.len() + HEARTBEAT.len());
        for frame in state.queue.drain(..) {
            encode_frame(&mut out, &mut this.cursor, &frame);
        }
        // Nothing waits: an idle connection keeps no allocation for its queue.
        state.queue = VecDeque::new();
        state.queued = 0;
        let heartbeat = std::mem::take(&mut state.heartbeat);
        if heartbeat {
            out.put_slice(HEARTBEAT);
            state.heartbeats += 1;
        }
        drop(state);
        if heartbeat {
            this.sink.changed.notify_waiters();
        }
        Poll::Ready(Some(Ok(out.freeze())))
    }
}

impl Drop for EventStream {
    /// The HTTP connection is done with the body: the client went away or the last event went
    /// out.
    fn drop(&mut self) {
        self.sink.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn text(bytes: &Bytes) -> &str {
        std::str::from_utf8(bytes).expect("UTF-8")
    }

    #[tokio::test]
    async fn frames_become_events_and_those_with_a_position_carry_the_cursor_as_id() {
        let sink = SseSink::new(1 << 20);
        let mut body = sink.body();
        let welcome = r#"{"type":"welcome","payload":{"connection_id":"c1","positions":{"tenant:acme":{"offset":4,"epoch":"e1"},"user:acme:bob":{"offset":0,"epoch":"e2"}}}}"#;
        sink.push(Bytes::from(welcome)).expect("queued");
        let first = body.next().await.expect("an event").expect("ok");
        assert_eq!(text(&first), format!("id: since=e1:4&user_since=e2:0\ndata: {welcome}\n\n"));
        let message = r#"{"type":"message","channel":"tenant:acme","offset":5,"epoch":"e1","payload":1}"#;
        let pong = r#"{"type":"pong","payload":null}"#;
        let direct = r#"{"type":"direct","channel":"user:acme:bob","offset":1,"epoch":"e2","payload":2}"#;
        for frame in [message, pong, direct] {
            sink.push(Bytes::from(frame)).expect("queued");
        }
        sink.ping();
        let batch = body.next().await.expect("events").expect("ok");
        assert_eq!(
            text(&batch),
            format!(
                "id: since=e1:5&user_since=e2:0\ndata: {message}\n\ndata: {pong}\n\n\
                 id: since=e1:5&user_since=e2:1\ndata: {direct}\n\n: ping\n\n"
            )
        );
    }

    #[tokio::test]
    async fn a_close_overtakes_what_waits_ends_the_body_and_refuses_later_frames() {
        let sink = SseSink::new(1 << 20);
        let mut body = sink.body();
        sink.push(Bytes::from_static(b"{\"type\":\"pong\"}")).expect("queued");
        sink.close(CloseReason::SlowConsumer);
        sink.close(CloseReason::GoingAway);
        assert_eq!(sink.push(Bytes::from_static(b"{}")), Err(PushError::Closed));
        let last = body.next().await.expect("the close").expect("ok");
        assert_eq!(text(&last), "event: close\ndata: {\"code\":4008,\"reason\":\"slow consumer\"}\n\n");
        assert!(body.next().await.is_none(), "the body ends after the close");
        assert!(sink.status().ended);
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_bytes_but_always_takes_one_frame_and_a_dropped_body_finishes() {
        let sink = SseSink::new(10);
        assert_eq!(sink.push(Bytes::from(vec![b'x'; 25])), Ok(()));
        assert_eq!(sink.push(Bytes::from_static(b"x")), Err(PushError::Full));
        drop(sink.body());
        assert!(sink.changed(Status::default()).await.ended);
        assert_eq!(sink.push(Bytes::from_static(b"x")), Err(PushError::Closed));
    }
}
