//! The life of one upgraded connection: one task reads the client's frames when the socket is
//! readable, hands each complete message to its [`Peer`], writes what the outbox could not
//! write at once when the socket is writable again, honours a close request ahead of anything
//! still queued, and always ends with a close: a bounded handshake when the server closes on
//! purpose, the echo of a valid client close, or — after a protocol violation, an invalid close
//! frame included — the close frame and the TCP connection dropped at once (RFC 6455, 7.1.7).
//!
//! Nothing is buffered while the connection is idle: bytes are read into a buffer on the stack,
//! and only an incomplete frame (or a fragmented message) is kept, until it is complete.

use std::io::{ErrorKind, IoSlice};
use std::sync::Arc;
use std::task::Poll;

use domain::CloseReason;
use tokio::net::TcpStream;

use super::WsSettings;
use super::frame::{self, Decoder, Event, Violation, opcode};
use super::outbox::{Flush, Outbox};

/// Bytes read from the socket at a time, on the stack.
const READ_CHUNK: usize = 4096;
/// Reads per wake-up at most, so one busy client cannot starve the connection's writes.
const READS_PER_WAKE: usize = 16;

/// What a connection's messages go to.
pub(super) trait Peer: Sync {
    /// A complete data message arrived (`text`: a text message, else binary; a text message is
    /// valid UTF-8). Returns the reason to close the connection, if it must close.
    fn message(
        &self,
        outbox: &Outbox,
        text: bool,
        payload: Vec<u8>,
    ) -> impl std::future::Future<Output = Option<CloseReason>> + Send;

    /// A ping or a pong arrived: the client is alive.
    fn alive(&self);
}

pub(super) struct Connection<'a, P> {
    pub(super) peer: &'a P,
    pub(super) settings: Arc<WsSettings>,
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
    /// Send a close frame with this code (none: an empty close frame) and reason, then end as
    /// `then` says.
    Close {
        code: Option<u16>,
        reason: &'static str,
        then: AfterClose,
    },
    Stop,
}

/// What follows the server's close frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterClose {
    /// The server closes on purpose: wait (bounded) for the client's close frame.
    AwaitClient,
    /// It answered the client's close, or the client broke the protocol: drop the TCP
    /// connection at once.
    Drop,
}

fn close_with(reason: CloseReason) -> Next {
    Next::Close { code: Some(reason.code()), reason: reason.reason(), then: AfterClose::AwaitClient }
}

fn violation(violation: Violation) -> Next {
    let (code, reason) = match violation {
        Violation::Protocol => (1002, "protocol error"),
        Violation::InvalidUtf8 => (1007, "invalid UTF-8"),
        Violation::TooBig => (CloseReason::MessageTooBig.code(), CloseReason::MessageTooBig.reason()),
    };
    Next::Close { code: Some(code), reason, then: AfterClose::Drop }
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

impl<P: Peer> Connection<'_, P> {
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
        if let Next::Close { code, reason, then } = next {
            Box::pin(self.close_handshake(&stream, &mut reader, code, reason, then)).await;
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
            let closing = match event {
                Event::Text(text) => self.peer.message(&self.outbox, true, text.into_bytes()).await,
                Event::Binary(payload) => self.peer.message(&self.outbox, false, payload).await,
                Event::Ping(payload) => {
                    self.outbox.pong(payload);
                    self.peer.alive();
                    None
                }
                Event::Pong => {
                    self.peer.alive();
                    None
                }
                // The client started the close handshake: echo its code.
                Event::Close(code) => return Next::Close { code, reason: "", then: AfterClose::Drop },
            };
            if let Some(reason) = closing {
                return close_with(reason);
            }
        }
        Next::Continue
    }

    /// Finishes a frame already partly written, sends the close frame and, when the server
    /// closes on purpose, waits for the client's, all within the close timeout.
    async fn close_handshake(
        &mut self,
        stream: &TcpStream,
        reader: &mut Reader,
        code: Option<u16>,
        reason: &'static str,
        then: AfterClose,
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
            if then == AfterClose::AwaitClient {
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
