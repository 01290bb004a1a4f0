//! The life of one upgraded connection: one task reads the client's frames when the socket is
//! readable, writes what the outbox could not write at once when the socket is writable again,
//! honours a close request ahead of anything still queued, and always ends with a bounded close
//! handshake.
//!
//! Nothing is buffered while the connection is idle: bytes are read into a buffer on the stack,
//! and only an incomplete frame (or a fragmented message) is kept, until it is complete.

use std::io::{ErrorKind, IoSlice};
use std::sync::Arc;
use std::task::Poll;

use application::{ClientFrame, FrameOutcome, Realtime, Session};
use domain::CloseReason;
use tokio::net::TcpStream;

use super::WsSettings;
use super::frame::{self, Decoder, Event, Violation, opcode};
use super::outbox::{Flush, Outbox};

/// Bytes read from the socket at a time, on the stack.
const READ_CHUNK: usize = 4096;
/// Reads per wake-up at most, so one busy client cannot starve the connection's writes.
const READS_PER_WAKE: usize = 16;

pub(super) struct Connection<'a> {
    pub(super) app: Arc<Realtime>,
    pub(super) settings: Arc<WsSettings>,
    pub(super) session: &'a mut Session,
    pub(super) outbox: Arc<Outbox>,
}

/// What woke the connection's task.
enum Ready {
    Readable,
    Writable,
    /// The outbox has something to write or a close request.
    Due,
    Failed,
}

/// What the loop does next.
enum Next {
    Continue,
    /// Close with this code (none: an empty close frame) and reason; `echo` when answering the
    /// client's own close.
    Close {
        code: Option<u16>,
        reason: &'static str,
        echo: bool,
    },
    Stop,
}

fn close_with(reason: CloseReason) -> Next {
    Next::Close { code: Some(reason.code()), reason: reason.reason(), echo: false }
}

fn violation(violation: Violation) -> Next {
    match violation {
        Violation::Protocol => Next::Close { code: Some(1002), reason: "protocol error", echo: false },
        Violation::InvalidUtf8 => Next::Close { code: Some(1007), reason: "invalid UTF-8", echo: false },
        Violation::TooBig => close_with(CloseReason::MessageTooBig),
    }
}

/// The client's bytes on their way to becoming events.
struct Reader {
    decoder: Decoder,
    /// An incomplete frame, kept until the rest arrives; empty (and unallocated) otherwise.
    partial: Vec<u8>,
}

/// Why reading stopped for good.
enum ReadEnd {
    /// The client is gone (end of stream or a socket error).
    Gone,
    Violation(Violation),
}

impl Reader {
    /// Reads what the socket has (into a stack buffer) and decodes it.
    fn read(&mut self, stream: &TcpStream, events: &mut Vec<Event>) -> Result<(), ReadEnd> {
        let mut buf = [0u8; READ_CHUNK];
        for _ in 0..READS_PER_WAKE {
            let n = match stream.try_read(&mut buf) {
                Ok(0) => return Err(ReadEnd::Gone),
                Ok(n) => n,
                Err(error) if error.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(error) if error.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return Err(ReadEnd::Gone),
            };
            self.decode(&buf[..n], events)?;
            if n < buf.len() || matches!(events.last(), Some(Event::Close(_))) {
                break;
            }
        }
        Ok(())
    }

    fn decode(&mut self, bytes: &[u8], events: &mut Vec<Event>) -> Result<(), ReadEnd> {
        if self.partial.is_empty() {
            let used = self.decoder.decode(bytes, events).map_err(ReadEnd::Violation)?;
            self.partial.extend_from_slice(&bytes[used..]);
        } else {
            self.partial.extend_from_slice(bytes);
            let used = self.decoder.decode(&self.partial, events).map_err(ReadEnd::Violation)?;
            self.partial.drain(..used);
            if self.partial.is_empty() {
                self.partial = Vec::new();
            }
        }
        Ok(())
    }
}

/// Writes `parts` whole, waiting for the socket as needed.
async fn write_all(stream: &TcpStream, parts: &[&[u8]]) -> std::io::Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut written = 0;
    while written < total {
        let mut skip = written;
        let slices: Vec<IoSlice<'_>> = parts
            .iter()
            .filter_map(|part| {
                if skip >= part.len() {
                    skip -= part.len();
                    None
                } else {
                    let slice = IoSlice::new(&part[skip..]);
                    skip = 0;
                    Some(slice)
                }
            })
            .collect();
        match stream.try_write_vectored(&slices) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(error) if error.kind() == ErrorKind::WouldBlock => stream.writable().await?,
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

impl Connection<'_> {
    /// Runs the connection over `stream`; `leftover` holds bytes the client sent right after
    /// its handshake.
    pub(super) async fn run(mut self, stream: Arc<TcpStream>, leftover: Vec<u8>) {
        let mut reader =
            Reader { decoder: Decoder::new(self.settings.max_message_bytes), partial: Vec::new() };
        self.outbox.attach(stream.clone());
        let mut next = Next::Continue;
        if !leftover.is_empty() {
            let mut events = Vec::new();
            let decoded = reader.decode(&leftover, &mut events);
            drop(leftover);
            next = match decoded {
                Ok(()) => Box::pin(self.handle(events)).await,
                Err(end) => Self::ended(end),
            };
        }
        while matches!(next, Next::Continue) {
            let blocked = self.outbox.is_blocked();
            // Polled by hand rather than with `select!` over readiness futures: the idle task
            // waits with its wakers registered on the socket and the outbox, and no future of
            // its own.
            let ready = std::future::poll_fn(|cx| {
                if self.outbox.poll_due(cx).is_ready() {
                    return Poll::Ready(Ready::Due);
                }
                if blocked && let Poll::Ready(result) = stream.poll_write_ready(cx) {
                    return Poll::Ready(result.map_or(Ready::Failed, |()| Ready::Writable));
                }
                match stream.poll_read_ready(cx) {
                    Poll::Ready(result) => Poll::Ready(result.map_or(Ready::Failed, |()| Ready::Readable)),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await;
            next = match ready {
                Ready::Due | Ready::Writable => self.write(),
                Ready::Failed => Next::Stop,
                Ready::Readable => {
                    let mut events = Vec::new();
                    // Boxed, here and below: the idle connection's task keeps only what waiting
                    // needs, not the larger state of handling frames or closing.
                    match reader.read(&stream, &mut events) {
                        Ok(()) if events.is_empty() => Next::Continue,
                        Ok(()) => Box::pin(self.handle(events)).await,
                        Err(end) => {
                            // Events before the end still count (a message, then a bad frame).
                            match Box::pin(self.handle(events)).await {
                                Next::Continue => Self::ended(end),
                                other => other,
                            }
                        }
                    }
                }
            };
        }
        if let Next::Close { code, reason, echo } = next {
            Box::pin(self.close_handshake(&stream, &mut reader, code, reason, echo)).await;
        }
        self.outbox.finish();
        // The outbox's handle on the socket may outlive this task: end the TCP connection now.
        let _ = socket2::SockRef::from(&*stream).shutdown(std::net::Shutdown::Both);
    }

    fn ended(end: ReadEnd) -> Next {
        match end {
            ReadEnd::Gone => Next::Stop,
            ReadEnd::Violation(v) => violation(v),
        }
    }

    fn write(&self) -> Next {
        match self.outbox.flush() {
            Flush::Done | Flush::Blocked => Next::Continue,
            Flush::Failed => Next::Stop,
            Flush::Close(reason) => close_with(reason),
        }
    }

    async fn handle(&mut self, events: Vec<Event>) -> Next {
        for event in events {
            let outcome = match event {
                Event::Text(text) => self.app.frames.handle(self.session, ClientFrame::Text(&text)).await,
                Event::Binary => self.app.frames.handle(self.session, ClientFrame::Binary).await,
                Event::Ping(payload) => {
                    self.outbox.pong(payload);
                    self.app.frames.seen(self.session);
                    FrameOutcome::Nothing
                }
                Event::Pong => {
                    self.app.frames.seen(self.session);
                    FrameOutcome::Nothing
                }
                // The client started the close handshake: echo its code.
                Event::Close(code) => return Next::Close { code, reason: "", echo: true },
            };
            match outcome {
                FrameOutcome::Nothing => {}
                FrameOutcome::Reply(reply) => {
                    // Through the outbox, so replies keep their place among deliveries.
                    let _ = self.session.handle().send(reply);
                }
                FrameOutcome::Close(reason) => return close_with(reason),
            }
        }
        Next::Continue
    }

    /// Finishes a frame already partly written, sends the close frame and, unless answering
    /// the client's close, waits for the client's, all within the close timeout.
    async fn close_handshake(
        &mut self,
        stream: &TcpStream,
        reader: &mut Reader,
        code: Option<u16>,
        reason: &'static str,
        echo: bool,
    ) {
        self.outbox.seal();
        let handshake = async {
            loop {
                match self.outbox.flush_in_progress() {
                    Flush::Done => break,
                    Flush::Blocked => stream.writable().await?,
                    Flush::Failed | Flush::Close(_) => return Err(ErrorKind::BrokenPipe.into()),
                }
            }
            let payload = code.map(|code| frame::close_payload(code, reason)).unwrap_or_default();
            let (header, len) = frame::header(opcode::CLOSE, payload.len());
            write_all(stream, &[&header[..len], &payload]).await?;
            if !echo {
                let mut events = Vec::new();
                loop {
                    stream.readable().await?;
                    match reader.read(stream, &mut events) {
                        Ok(()) if matches!(events.last(), Some(Event::Close(_))) => break,
                        Ok(()) => events.clear(),
                        Err(_) => break,
                    }
                }
            }
            std::io::Result::Ok(())
        };
        let _ = tokio::time::timeout(self.settings.close_timeout, handshake).await;
    }
}
