//! A real Server-Sent Events client over a plain TCP socket: `GET /sse` with HTTP/1.1, the
//! chunked body decoded and split into events, and `POST /sse/{connection_id}` for its frames.
//! A socket of its own rather than an HTTP library, so a test can shrink its receive buffer.

use std::collections::VecDeque;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::PATIENCE;

/// One event of the stream.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum SseEvent {
    /// A `data:` event: one frame.
    Frame(Value),
    /// `event: close`, with its code.
    Close(u16),
}

/// An open event stream.
pub(crate) struct SseClient {
    stream: TcpStream,
    /// Bytes read and not yet decoded from the chunked body.
    raw: Vec<u8>,
    /// The decoded body not yet split into events.
    body: Vec<u8>,
    events: VecDeque<(Option<String>, SseEvent)>,
    ended: bool,
    /// The last `id:` the stream sent: what a reconnecting `EventSource` sends back.
    pub(crate) last_id: Option<String>,
    /// Heartbeat comments seen.
    pub(crate) heartbeats: usize,
    /// How long it waits for the stream: [`PATIENCE`] unless a test says otherwise.
    pub(crate) patience: std::time::Duration,
}

impl SseClient {
    /// Opens `GET {path}` on `addr` with `headers`; on refusal returns the status and JSON body
    /// (status 0 when no answer came: nothing listens, or the connection broke).
    pub(crate) async fn open(
        addr: std::net::SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
        recv_buffer: Option<u32>,
    ) -> Result<Self, (u16, Value)> {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        if let Some(size) = recv_buffer {
            socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
        }
        let Ok(mut stream) = socket.connect(addr).await else { return Err((0, Value::Null)) };
        let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        if stream.write_all(request.as_bytes()).await.is_err() {
            return Err((0, Value::Null));
        }
        let mut client = Self {
            stream,
            raw: Vec::new(),
            body: Vec::new(),
            events: VecDeque::new(),
            ended: false,
            last_id: None,
            heartbeats: 0,
            patience: PATIENCE,
        };
        let Some(head) = client.read_head().await else { return Err((0, Value::Null)) };
        let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status line");
        let lower = head.to_ascii_lowercase();
        if status != 200 {
            let length = lower
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            while client.raw.len() < length {
                client.read_more().await;
            }
            let body = serde_json::from_slice(&client.raw[..length]).unwrap_or(Value::Null);
            return Err((status, body));
        }
        assert!(lower.contains("content-type: text/event-stream"), "{head}");
        assert!(lower.contains("transfer-encoding: chunked"), "a streamed body: {head}");
        Ok(client)
    }

    async fn read_more(&mut self) -> bool {
        let mut buf = [0u8; 16 * 1024];
        match tokio::time::timeout(self.patience, self.stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(n)) => {
                self.raw.extend_from_slice(&buf[..n]);
                true
            }
            Err(_) => panic!("nothing from the stream within {:?}", self.patience),
        }
    }

    /// The answer's head; `None` when the connection ended before it.
    async fn read_head(&mut self) -> Option<String> {
        loop {
            if let Some(end) = find(&self.raw, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.raw[..end]).into_owned();
                self.raw.drain(..end + 4);
                return Some(head);
            }
            if !self.read_more().await {
                return None;
            }
        }
    }

    /// Moves complete chunks from `raw` to `body`; marks the end at the last chunk.
    fn dechunk(&mut self) {
        while let Some(line_end) = find(&self.raw, b"\r\n") {
            let size_text = String::from_utf8_lossy(&self.raw[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.trim(), 16).expect("a chunk size");
            if size == 0 {
                self.ended = true;
                self.raw.clear();
                return;
            }
            let start = line_end + 2;
            if self.raw.len() < start + size + 2 {
                return;
            }
            self.body.extend_from_slice(&self.raw[start..start + size]);
            self.raw.drain(..start + size + 2);
        }
    }

    /// Splits complete events out of `body`.
    fn split_events(&mut self) {
        while let Some(end) = find(&self.body, b"\n\n") {
            let block = String::from_utf8(self.body[..end].to_vec()).expect("UTF-8 events");
            self.body.drain(..end + 2);
            let (mut id, mut kind, mut data) = (None, None, None);
            for line in block.lines() {
                if line.starts_with(':') {
                    self.heartbeats += 1;
                } else if let Some(v) = line.strip_prefix("id: ") {
                    id = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("event: ") {
                    kind = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    assert!(data.is_none(), "one data line per event: {block}");
                    data = Some(v.to_owned());
                } else {
                    panic!("unexpected line {line:?} in {block:?}");
                }
            }
            let Some(data) = data else { continue };
            let value: Value = serde_json::from_str(&data).expect("data is JSON");
            let event = match kind.as_deref() {
                None => SseEvent::Frame(value),
                Some("close") => SseEvent::Close(value["code"].as_u64().expect("a code") as u16),
                Some(other) => panic!("unexpected event type {other}"),
            };
            self.events.push_back((id, event));
        }
    }

    /// The next event, which must arrive within [`PATIENCE`].
    pub(crate) async fn next_event(&mut self) -> SseEvent {
        loop {
            if let Some((id, event)) = self.events.pop_front() {
                if id.is_some() {
                    self.last_id = id;
                }
                return event;
            }
            self.dechunk();
            self.split_events();
            if !self.events.is_empty() {
                continue;
            }
            assert!(!self.ended, "the stream ended without a close event");
            if !self.read_more().await {
                panic!("the connection ended without a close event");
            }
        }
    }

    /// The next event, or `None` when the connection ends first (a killed server) or nothing
    /// comes within the client's patience.
    pub(crate) async fn next_event_or_end(&mut self) -> Option<SseEvent> {
        loop {
            if let Some((id, event)) = self.events.pop_front() {
                if id.is_some() {
                    self.last_id = id;
                }
                return Some(event);
            }
            self.dechunk();
            self.split_events();
            if !self.events.is_empty() {
                continue;
            }
            if self.ended {
                return None;
            }
            let mut buf = [0u8; 16 * 1024];
            match tokio::time::timeout(self.patience, self.stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => self.raw.extend_from_slice(&buf[..n]),
                _ => return None,
            }
        }
    }

    /// Whether an event (not a heartbeat) arrives within `within`.
    pub(crate) async fn event_within(&mut self, within: std::time::Duration) -> Option<SseEvent> {
        if self.events.is_empty() {
            let mut buf = [0u8; 16 * 1024];
            let deadline = tokio::time::Instant::now() + within;
            while self.events.is_empty() && !self.ended {
                match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => self.raw.extend_from_slice(&buf[..n]),
                    Ok(_) => break,
                    Err(_) => return None,
                }
                self.dechunk();
                self.split_events();
            }
        }
        match self.events.is_empty() {
            true => None,
            false => Some(self.next_event().await),
        }
    }

    /// After the close event: the body ends and the server closes nothing else.
    pub(crate) async fn expect_end(&mut self) {
        while !self.ended {
            if !self.read_more().await {
                return;
            }
            self.dechunk();
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
