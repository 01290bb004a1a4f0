//! The outbound side of one connection: a queue bounded in bytes, a close request and a
//! heartbeat request, all drained by the connection's task.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use application::ports::{ClientSink, PushError};
use bytes::Bytes;
use domain::CloseReason;
use tokio::sync::Notify;

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<Bytes>,
    bytes: usize,
    close: Option<CloseReason>,
    ping: bool,
    /// The connection task is gone: nothing will be sent any more.
    finished: bool,
}

/// What the connection task takes out in one go.
#[derive(Debug, Default)]
pub(super) struct Batch {
    pub(super) close: Option<CloseReason>,
    pub(super) ping: bool,
    pub(super) frames: Vec<Bytes>,
    /// Frames are still queued after this batch.
    pub(super) more: bool,
}

/// The [`ClientSink`] of one WebSocket connection.
///
/// At most `limit` bytes of frames wait in the queue (a single frame larger than that is
/// accepted when the queue is empty, so any frame the service produces can be delivered). A
/// client that lets the queue fill up is closed as a slow consumer by the hub; nothing else
/// waits for it.
#[derive(Debug)]
pub(super) struct Outbox {
    state: Mutex<State>,
    /// Something is due: frames, a ping or a close request.
    pub(super) wake: Notify,
    /// A close request, for a writer blocked on a client that does not read.
    pub(super) closing: Notify,
    limit: usize,
}

impl Outbox {
    pub(super) fn new(limit: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            closing: Notify::new(),
            limit: limit.max(1),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes what is due: a close request first (anything queued is then dropped), a ping, and
    /// up to `max_frames` frames.
    pub(super) fn take(&self, max_frames: usize) -> Batch {
        let mut state = self.state();
        if let Some(reason) = state.close {
            state.frames.clear();
            state.bytes = 0;
            return Batch { close: Some(reason), ..Batch::default() };
        }
        let ping = std::mem::take(&mut state.ping);
        let n = state.frames.len().min(max_frames);
        let frames: Vec<Bytes> = state.frames.drain(..n).collect();
        state.bytes -= frames.iter().map(Bytes::len).sum::<usize>();
        Batch { close: None, ping, more: !state.frames.is_empty(), frames }
    }

    /// Marks the connection as gone; later pushes fail with [`PushError::Closed`].
    pub(super) fn finish(&self) {
        let mut state = self.state();
        state.finished = true;
        state.frames.clear();
        state.bytes = 0;
    }

    /// Bytes waiting in the queue.
    #[cfg(test)]
    pub(super) fn queued_bytes(&self) -> usize {
        self.state().bytes
    }
}

impl ClientSink for Outbox {
    fn push(&self, frame: Bytes) -> Result<(), PushError> {
        let mut state = self.state();
        if state.finished || state.close.is_some() {
            return Err(PushError::Closed);
        }
        if state.bytes > 0 && state.bytes + frame.len() > self.limit {
            return Err(PushError::Full);
        }
        state.bytes += frame.len();
        state.frames.push_back(frame);
        drop(state);
        self.wake.notify_one();
        Ok(())
    }

    fn close(&self, reason: CloseReason) {
        let mut state = self.state();
        if state.close.is_none() && !state.finished {
            state.close = Some(reason);
            drop(state);
            self.wake.notify_one();
            self.closing.notify_one();
        }
    }

    fn ping(&self) {
        let mut state = self.state();
        if !state.finished {
            state.ping = true;
            drop(state);
            self.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_is_bounded_in_bytes_but_always_takes_one_frame() {
        let outbox = Outbox::new(10);
        assert_eq!(outbox.push(Bytes::from(vec![0; 25])), Ok(()), "an oversized frame fits an empty queue");
        assert_eq!(outbox.push(Bytes::from_static(b"x")), Err(PushError::Full));
        let batch = outbox.take(64);
        assert_eq!(batch.frames.len(), 1);
        assert_eq!(outbox.queued_bytes(), 0);
        for _ in 0..2 {
            assert_eq!(outbox.push(Bytes::from_static(b"12345")), Ok(()));
        }
        assert_eq!(outbox.push(Bytes::from_static(b"1")), Err(PushError::Full));
        assert_eq!(outbox.queued_bytes(), 10);
    }

    #[test]
    fn a_close_request_overtakes_queued_frames_and_refuses_later_ones() {
        let outbox = Outbox::new(100);
        outbox.push(Bytes::from_static(b"queued")).expect("queued");
        outbox.ping();
        outbox.close(CloseReason::SlowConsumer);
        outbox.close(CloseReason::GoingAway);
        let batch = outbox.take(64);
        assert_eq!(batch.close, Some(CloseReason::SlowConsumer), "the first reason wins");
        assert!(batch.frames.is_empty());
        assert_eq!(outbox.push(Bytes::from_static(b"late")), Err(PushError::Closed));
    }

    #[test]
    fn batches_are_capped_and_say_when_more_is_waiting() {
        let outbox = Outbox::new(1000);
        for _ in 0..5 {
            outbox.push(Bytes::from_static(b"f")).expect("queued");
        }
        outbox.ping();
        let batch = outbox.take(3);
        assert!(batch.ping);
        assert_eq!((batch.frames.len(), batch.more), (3, true));
        let batch = outbox.take(3);
        assert!(!batch.ping);
        assert_eq!((batch.frames.len(), batch.more), (2, false));
        outbox.finish();
        assert_eq!(outbox.push(Bytes::from_static(b"f")), Err(PushError::Closed));
    }
}
