//! The outbound side of one connection.
//!
//! Frames wait in a queue bounded in bytes until the connection's task writes them: everything
//! queued at once goes out in one `writev`, without copying, so a busy connection writes many
//! frames per system call, and a fan-out to many connections is written by every worker thread
//! rather than by the one delivering it. What the socket does not take waits until it is
//! writable again. Close and heartbeat requests go ahead of anything still queued (after a frame
//! already partly written).
//!
//! An idle connection holds no buffer: the queue is empty and allocates nothing.

use std::collections::VecDeque;
use std::io::{ErrorKind, IoSlice};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll};

use application::ports::{ClientSink, PushError};
use bytes::Bytes;
use domain::CloseReason;
use futures_util::task::AtomicWaker;
use tokio::net::TcpStream;

use super::frame::{self, MAX_HEADER, opcode};

/// Frames handed to one `writev`.
const WRITE_BATCH: usize = 32;

/// One frame: its header and its shared payload.
#[derive(Debug)]
struct Frame {
    header: [u8; MAX_HEADER],
    header_len: u8,
    payload: Bytes,
}

impl Frame {
    fn new(opcode: u8, payload: Bytes) -> Self {
        let (header, header_len) = frame::header(opcode, payload.len());
        Self { header, header_len: header_len as u8, payload }
    }

    fn len(&self) -> usize {
        usize::from(self.header_len) + self.payload.len()
    }

    /// The unwritten parts of the frame once `written` bytes of it went out.
    fn slices(&self, written: usize) -> [&[u8]; 2] {
        let header = &self.header[..usize::from(self.header_len)];
        if written < header.len() {
            [&header[written..], &self.payload]
        } else {
            [&[], &self.payload[written - header.len()..]]
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// Frames waiting for the socket; the first may be partly written.
    queue: VecDeque<Frame>,
    /// Bytes of the first frame already written.
    written: usize,
    /// Payload bytes waiting in `queue`.
    queued: usize,
    /// Control frames to send next (after the frame in progress): a pong, a ping.
    control: Vec<Frame>,
    close: Option<CloseReason>,
    /// The close handshake began: nothing new is accepted.
    sealed: bool,
    /// The connection task is gone, or a write failed: nothing will be sent any more.
    finished: bool,
}

/// What [`Outbox::flush`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flush {
    /// Everything is written.
    Done,
    /// The socket is full; wait until it is writable.
    Blocked,
    /// A close was requested: send it (after [`Outbox::flush_in_progress`]).
    Close(CloseReason),
    /// The socket failed.
    Failed,
}

/// The [`ClientSink`] of one WebSocket connection.
///
/// At most `limit` payload bytes wait in the queue (a single frame larger than that is accepted
/// when the queue is empty, so any frame the service produces can be delivered). A client that
/// lets the queue fill up is closed as a slow consumer by the hub; nothing else waits for it.
#[derive(Debug)]
pub(super) struct Outbox {
    state: Mutex<State>,
    /// Set once the upgrade completed; frames queued before are written by the task.
    stream: OnceLock<Arc<TcpStream>>,
    /// Something needs the task: queued frames, a control frame or a close request. A flag and
    /// a waker rather than a `Notify`, so the idle task waits without a future of its own.
    due: AtomicBool,
    waker: AtomicWaker,
    limit: usize,
}

impl Outbox {
    pub(super) fn new(limit: usize) -> Self {
        Self {
            state: Mutex::default(),
            stream: OnceLock::new(),
            due: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            limit: limit.max(1),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wake(&self) {
        self.due.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Ready once something was queued or requested since the last time it was ready.
    pub(super) fn poll_due(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.due.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        if self.due.swap(false, Ordering::AcqRel) { Poll::Ready(()) } else { Poll::Pending }
    }

    /// Hands the socket over: from now on [`Outbox::flush`] writes to it.
    pub(super) fn attach(&self, stream: Arc<TcpStream>) {
        let _ = self.stream.set(stream);
        self.wake();
    }

    /// Whether frames wait for the socket to become writable.
    pub(super) fn is_blocked(&self) -> bool {
        !self.state().queue.is_empty()
    }

    /// Queues a pong answering a client's ping.
    pub(super) fn pong(&self, payload: Vec<u8>) {
        let mut state = self.state();
        if !state.finished {
            state.control.push(Frame::new(opcode::PONG, Bytes::from(payload)));
            drop(state);
            self.wake();
        }
    }

    /// Writes what is due, in order: the rest of a frame in progress, control frames, queued
    /// frames. A close request comes first (queued frames are then dropped).
    pub(super) fn flush(&self) -> Flush {
        let mut state = self.state();
        if state.finished {
            return Flush::Failed;
        }
        if let Some(reason) = state.close {
            return Flush::Close(reason);
        }
        let Some(stream) = self.stream.get() else { return Flush::Blocked };
        // Control frames go right after the frame in progress.
        if !state.control.is_empty() {
            let at = usize::from(state.written > 0);
            // Taken whole, so an idle connection keeps no allocation for its heartbeats.
            for (i, frame) in std::mem::take(&mut state.control).into_iter().enumerate() {
                state.queue.insert(at + i, frame);
            }
        }
        write_queue(stream, &mut state)
    }

    /// Before a close frame: finishes the frame in progress, if any, and drops the rest.
    /// Returns whether the socket is in a state to take the close frame.
    pub(super) fn flush_in_progress(&self) -> Flush {
        let mut state = self.state();
        state.control.clear();
        if state.written == 0 {
            state.queue.clear();
        } else {
            state.queue.truncate(1);
        }
        state.queued = state.queue.iter().map(|f| f.payload.len()).sum();
        match self.stream.get() {
            Some(stream) if !state.finished => write_queue(stream, &mut state),
            _ => Flush::Failed,
        }
    }

    /// Refuses every new frame: the close handshake begins.
    pub(super) fn seal(&self) {
        self.state().sealed = true;
    }

    /// Marks the connection as gone; later pushes fail with [`PushError::Closed`].
    pub(super) fn finish(&self) {
        let mut state = self.state();
        state.finished = true;
        state.queue.clear();
        state.control.clear();
        state.queued = 0;
    }

    /// Payload bytes waiting in the queue.
    #[cfg(test)]
    pub(super) fn queued_bytes(&self) -> usize {
        self.state().queued
    }
}

/// Writes the first `N` frames of `state.queue` (fewer if it holds fewer) in one `writev`.
fn write_frames<const N: usize>(stream: &TcpStream, state: &State) -> std::io::Result<usize> {
    let mut slices = [[IoSlice::new(&[]); 2]; N];
    let mut count = 0;
    for (i, frame) in state.queue.iter().take(N).enumerate() {
        let [header, payload] = frame.slices(if i == 0 { state.written } else { 0 });
        slices[i] = [IoSlice::new(header), IoSlice::new(payload)];
        count += 1;
    }
    stream.try_write_vectored(slices[..count].as_flattened())
}

/// Writes `state.queue` to `stream` until it is empty or the socket is full.
fn write_queue(stream: &TcpStream, state: &mut State) -> Flush {
    while !state.queue.is_empty() {
        // A connection that is not busy has one frame to write: it does not fill the slices
        // of a whole batch.
        let written = if state.queue.len() == 1 {
            write_frames::<1>(stream, state)
        } else {
            write_frames::<WRITE_BATCH>(stream, state)
        };
        match written {
            Ok(0) => {
                state.finished = true;
                return Flush::Failed;
            }
            Ok(mut n) => {
                while n > 0 {
                    let Some(front) = state.queue.front() else { break };
                    let left = front.len() - state.written;
                    if n >= left {
                        n -= left;
                        state.written = 0;
                        state.queued -= front.payload.len();
                        state.queue.pop_front();
                    } else {
                        state.written += n;
                        n = 0;
                    }
                }
            }
            Err(error) if error.kind() == ErrorKind::WouldBlock => return Flush::Blocked,
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(_) => {
                state.finished = true;
                return Flush::Failed;
            }
        }
    }
    // Nothing waits: an idle connection keeps no allocation for its queue.
    state.queue = VecDeque::new();
    Flush::Done
}

impl Outbox {
    /// Queues a binary message (the echo of the conformance harness; clients get text).
    ///
    /// # Errors
    /// As [`ClientSink::push`].
    pub(super) fn push_binary(&self, payload: Bytes) -> Result<(), PushError> {
        self.enqueue(opcode::BINARY, payload)
    }

    fn enqueue(&self, opcode: u8, payload: Bytes) -> Result<(), PushError> {
        let mut state = self.state();
        if state.finished || state.sealed || state.close.is_some() {
            return Err(PushError::Closed);
        }
        let frame = Frame::new(opcode, payload);
        if state.queued > 0 && state.queued + frame.payload.len() > self.limit {
            return Err(PushError::Full);
        }
        state.queued += frame.payload.len();
        state.queue.push_back(frame);
        drop(state);
        self.wake();
        Ok(())
    }
}

impl ClientSink for Outbox {
    fn push(&self, payload: Bytes) -> Result<(), PushError> {
        self.enqueue(opcode::TEXT, payload)
    }

    fn close(&self, reason: CloseReason) {
        let mut state = self.state();
        if state.close.is_none() && !state.finished {
            state.close = Some(reason);
            drop(state);
            self.wake();
        }
    }

    fn ping(&self) {
        let mut state = self.state();
        if !state.finished {
            state.control.push(Frame::new(opcode::PING, Bytes::new()));
            drop(state);
            self.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn pair() -> (Arc<TcpStream>, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        socket2::SockRef::from(&server).set_send_buffer_size(4096).expect("SO_SNDBUF");
        socket2::SockRef::from(&client).set_recv_buffer_size(4096).expect("SO_RCVBUF");
        (Arc::new(server), client)
    }

    /// Reads `n` frames of the server's and returns their (opcode, payload).
    async fn read_frames(client: &mut TcpStream, n: usize) -> Vec<(u8, Vec<u8>)> {
        let mut frames = Vec::new();
        for _ in 0..n {
            let mut head = [0u8; 2];
            client.read_exact(&mut head).await.expect("header");
            let len = match head[1] {
                126 => {
                    let mut l = [0u8; 2];
                    client.read_exact(&mut l).await.expect("len");
                    usize::from(u16::from_be_bytes(l))
                }
                127 => {
                    let mut l = [0u8; 8];
                    client.read_exact(&mut l).await.expect("len");
                    u64::from_be_bytes(l) as usize
                }
                short => usize::from(short),
            };
            let mut payload = vec![0; len];
            client.read_exact(&mut payload).await.expect("payload");
            frames.push((head[0] & 0x0F, payload));
        }
        frames
    }

    #[tokio::test]
    async fn frames_wait_for_the_socket_and_go_out_in_order() {
        let (server, mut client) = pair().await;
        let outbox = Outbox::new(1 << 20);
        outbox.push(Bytes::from_static(b"welcome")).expect("queued");
        assert_eq!(outbox.flush(), Flush::Blocked, "no socket yet");
        outbox.attach(server);
        outbox.push(Bytes::from_static(b"live")).expect("queued");
        assert_eq!(outbox.queued_bytes(), 11);
        assert_eq!(outbox.flush(), Flush::Done);
        assert_eq!(outbox.queued_bytes(), 0);
        let frames = read_frames(&mut client, 2).await;
        assert_eq!(frames, [(opcode::TEXT, b"welcome".to_vec()), (opcode::TEXT, b"live".to_vec())]);
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_fills_the_bounded_queue_and_nothing_is_lost_or_reordered() {
        let (server, mut client) = pair().await;
        let outbox = Outbox::new(64 * 1024);
        outbox.attach(server);
        let payload = |n: usize| Bytes::from(format!("{n:08}").repeat(128));
        let mut pushed = 0;
        while outbox.push(payload(pushed)).is_ok() {
            pushed += 1;
            // The task writes what the socket takes.
            let _ = outbox.flush();
            assert!(pushed < 10_000, "the queue must fill up");
        }
        assert!(outbox.queued_bytes() <= 64 * 1024);
        assert_eq!(outbox.push(payload(pushed)), Err(PushError::Full));
        // The client reads; the connection's task flushes as the socket drains.
        let reader = tokio::spawn(async move { read_frames(&mut client, pushed).await });
        while outbox.flush() != Flush::Done {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let frames = reader.await.expect("reader");
        for (n, (_, frame)) in frames.iter().enumerate() {
            assert_eq!(frame, &payload(n).to_vec(), "frame {n}");
        }
    }

    #[tokio::test]
    async fn control_frames_go_after_the_frame_in_progress_and_before_the_queue() {
        let (server, mut client) = pair().await;
        let outbox = Outbox::new(1 << 20);
        outbox.attach(server);
        let big = Bytes::from(vec![b'x'; 256 * 1024]);
        outbox.push(big.clone()).expect("queued");
        assert_eq!(outbox.flush(), Flush::Blocked, "partly written");
        outbox.push(Bytes::from_static(b"queued")).expect("queued");
        outbox.ping();
        let reader = tokio::spawn(async move { read_frames(&mut client, 3).await });
        while outbox.flush() != Flush::Done {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let frames = reader.await.expect("reader");
        let kinds: Vec<u8> = frames.iter().map(|(op, _)| *op).collect();
        assert_eq!(kinds, [opcode::TEXT, opcode::PING, opcode::TEXT]);
        assert_eq!(frames[0].1.len(), big.len());
        assert_eq!(frames[2].1, b"queued");
    }

    #[tokio::test]
    async fn a_close_request_overtakes_queued_frames_and_refuses_later_ones() {
        let outbox = Outbox::new(100);
        outbox.push(Bytes::from_static(b"queued")).expect("queued");
        outbox.ping();
        outbox.close(CloseReason::SlowConsumer);
        outbox.close(CloseReason::GoingAway);
        assert_eq!(outbox.flush(), Flush::Close(CloseReason::SlowConsumer), "the first reason wins");
        assert_eq!(outbox.push(Bytes::from_static(b"late")), Err(PushError::Closed));
        let (server, _client) = pair().await;
        outbox.attach(server);
        assert_eq!(outbox.flush_in_progress(), Flush::Done, "nothing was in progress");
        assert_eq!(outbox.queued_bytes(), 0);
        outbox.finish();
        assert_eq!(outbox.flush(), Flush::Failed);
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_bytes_but_always_takes_one_frame() {
        let outbox = Outbox::new(10);
        assert_eq!(outbox.push(Bytes::from(vec![0; 25])), Ok(()), "an oversized frame fits an empty queue");
        assert_eq!(outbox.push(Bytes::from_static(b"x")), Err(PushError::Full));
        assert_eq!(outbox.queued_bytes(), 25);
    }
}
