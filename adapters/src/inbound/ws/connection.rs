//! The life of one upgraded connection: one task owns the socket, drains the outbox (close
//! request first, then heartbeat, then frames in batches), reads client frames, and always
//! ends with a bounded close handshake.

use std::sync::Arc;

use application::{ClientFrame, FrameOutcome, Realtime, Session};
use bytes::Bytes;
use domain::CloseReason;
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};

use super::WsSettings;
use super::outbox::Outbox;

pub(super) type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Frames written per flush at most, so one busy connection cannot starve its own reads.
const WRITE_BATCH: usize = 64;

pub(super) struct Connection<'a> {
    pub(super) app: Arc<Realtime>,
    pub(super) settings: Arc<WsSettings>,
    pub(super) session: &'a mut Session,
    pub(super) outbox: Arc<Outbox>,
}

enum Next {
    Continue,
    Close(CloseCode, &'static str),
    Stop,
}

fn close_with(reason: CloseReason) -> Next {
    Next::Close(CloseCode::from(reason.code()), reason.reason())
}

impl Connection<'_> {
    pub(super) async fn run(mut self, mut socket: Socket) {
        loop {
            let outbox = self.outbox.clone();
            // Unbiased: a connection that always has frames to write still reads its client
            // (pongs, messages, close) half of the time.
            let next = tokio::select! {
                () = outbox.wake.notified() => self.write(&mut socket).await,
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
        self.outbox.finish();
    }

    async fn write(&mut self, socket: &mut Socket) -> Next {
        let batch = self.outbox.take(WRITE_BATCH);
        if let Some(reason) = batch.close {
            return close_with(reason);
        }
        let io_timeout = self.settings.io_timeout;
        let write = async {
            if batch.ping {
                socket.feed(Message::Ping(Bytes::new())).await?;
            }
            for frame in batch.frames {
                socket.feed(text(frame)).await?;
            }
            socket.flush().await
        };
        let outbox = self.outbox.clone();
        let next = tokio::select! {
            written = tokio::time::timeout(io_timeout, write) => match written {
                Ok(Ok(())) => Next::Continue,
                Ok(Err(error)) => {
                    tracing::debug!(%error, "write failed");
                    Next::Stop
                }
                Err(_) => {
                    tracing::debug!("write timed out");
                    Next::Stop
                }
            },
            // A client that does not read blocks the write; a close request (a slow consumer,
            // typically) stops waiting and queues the close frame behind what is pending.
            () = outbox.closing.notified() => match self.outbox.take(0).close {
                Some(reason) => close_with(reason),
                None => Next::Continue,
            },
        };
        if batch.more {
            self.outbox.wake.notify_one();
        }
        next
    }

    async fn read(&mut self, incoming: Option<Result<Message, tungstenite::Error>>) -> Next {
        let outcome = match incoming {
            Some(Ok(Message::Text(text))) => {
                self.app.frames.handle(self.session, ClientFrame::Text(text.as_str())).await
            }
            Some(Ok(Message::Binary(_))) => self.app.frames.handle(self.session, ClientFrame::Binary).await,
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {
                self.app.frames.seen(self.session);
                FrameOutcome::Nothing
            }
            // The client started the close handshake; tungstenite has queued the echo, which
            // the close path flushes.
            Some(Ok(Message::Close(_))) => return Next::Close(CloseCode::Normal, ""),
            Some(Err(tungstenite::Error::Capacity(_))) => return close_with(CloseReason::MessageTooBig),
            Some(Err(tungstenite::Error::Utf8(_))) => {
                return Next::Close(CloseCode::Invalid, "invalid UTF-8");
            }
            Some(Err(tungstenite::Error::Protocol(_))) => {
                return Next::Close(CloseCode::Protocol, "protocol error");
            }
            Some(Err(_)) | None => return Next::Stop,
        };
        match outcome {
            FrameOutcome::Nothing => Next::Continue,
            FrameOutcome::Reply(reply) => {
                // Through the queue, so replies keep their place among deliveries.
                let _ = self.session.handle().send(reply);
                Next::Continue
            }
            FrameOutcome::Close(reason) => close_with(reason),
        }
    }

    /// Sends a close frame (or the echo of the client's) and waits, bounded, for the
    /// handshake to finish.
    async fn close_handshake(&mut self, socket: &mut Socket, code: CloseCode, reason: &'static str) {
        self.outbox.finish();
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
