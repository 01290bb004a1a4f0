//! The WebSocket framing, byte by byte, from a raw TCP client: fragmented messages, control
//! frames between fragments, frames sent with the handshake, and every kind of bad frame with
//! its close code.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

const TEXT: u8 = 0x1;
const CONTINUATION: u8 = 0x0;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// A client frame, masked unless `masked` is false.
fn frame(fin: bool, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
    let bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(bit | n as u8),
        n if n <= 0xFFFF => {
            out.push(bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

struct RawClient {
    stream: TcpStream,
}

impl RawClient {
    /// Completes the handshake, sending `extra` in the same write, and checks the 101.
    async fn connect(app: &TestApp, extra: &[u8]) -> Self {
        let mut stream =
            TcpStream::connect(app.url("").trim_start_matches("http://")).await.expect("connect");
        let mut request = format!(
            "GET /ws?token={} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            token("bob", "acme")
        )
        .into_bytes();
        request.extend_from_slice(extra);
        stream.write_all(&request).await.expect("handshake sent");
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await.expect("response head");
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).expect("ASCII head");
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
        Self { stream }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("sent");
    }

    /// The next server frame: (opcode, payload). Server frames are final and unmasked.
    async fn next(&mut self) -> (u8, Vec<u8>) {
        tokio::time::timeout(PATIENCE, async {
            let mut head = [0u8; 2];
            self.stream.read_exact(&mut head).await.expect("frame header");
            assert_eq!(head[0] & 0xF0, 0x80, "final, no extension bits");
            assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
            let len = match head[1] {
                126 => {
                    let mut len = [0u8; 2];
                    self.stream.read_exact(&mut len).await.expect("length");
                    usize::from(u16::from_be_bytes(len))
                }
                127 => {
                    let mut len = [0u8; 8];
                    self.stream.read_exact(&mut len).await.expect("length");
                    usize::try_from(u64::from_be_bytes(len)).expect("fits")
                }
                short => usize::from(short),
            };
            let mut payload = vec![0; len];
            self.stream.read_exact(&mut payload).await.expect("payload");
            (head[0] & 0x0F, payload)
        })
        .await
        .expect("a frame in time")
    }

    async fn next_json(&mut self) -> Value {
        loop {
            let (opcode, payload) = self.next().await;
            if opcode == TEXT {
                return serde_json::from_slice(&payload).expect("JSON");
            }
            assert_eq!(opcode, PING, "only heartbeats between data frames");
        }
    }

    /// Expects a close frame with `code`, then the end of the connection.
    async fn expect_close(&mut self, code: u16) {
        loop {
            let (opcode, payload) = self.next().await;
            if opcode == CLOSE {
                assert_eq!(
                    u16::from_be_bytes([payload[0], payload[1]]),
                    code,
                    "{:?}",
                    String::from_utf8_lossy(&payload)
                );
                // Completes the handshake, as a well-behaved client does (the server may have
                // stopped reading already).
                let _ = self.stream.write_all(&frame(true, CLOSE, &payload[..2], true)).await;
                break;
            }
        }
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(5), self.stream.read_to_end(&mut rest)).await;
        assert!(ended.is_ok(), "the server ends the connection after its close frame");
    }
}

#[tokio::test]
async fn a_fragmented_message_with_a_ping_between_its_fragments_is_one_message() {
    let app = spawn_app().await;
    let mut client = RawClient::connect(&app, b"").await;
    assert_eq!(client.next_json().await["type"], "welcome");
    let mut bytes = frame(false, TEXT, br#"{"type":"#, true);
    bytes.extend(frame(true, PING, b"are you there", true));
    bytes.extend(frame(false, CONTINUATION, br#""pi"#, true));
    bytes.extend(frame(true, CONTINUATION, br#"ng"}"#, true));
    client.send(&bytes).await;
    assert_eq!(client.next().await, (PONG, b"are you there".to_vec()), "a pong echoes the ping's payload");
    assert_eq!(client.next_json().await["type"], "pong", "the reassembled message was a ping command");
}

#[tokio::test]
async fn frames_sent_together_with_the_handshake_are_read() {
    let app = spawn_app().await;
    let mut client = RawClient::connect(&app, &frame(true, TEXT, br#"{"type":"ping"}"#, true)).await;
    assert_eq!(client.next_json().await["type"], "welcome");
    assert_eq!(client.next_json().await["type"], "pong");
}

#[tokio::test]
async fn a_long_message_in_the_16_bit_length_form_is_read() {
    let app = spawn_app().await;
    let mut client = RawClient::connect(&app, b"").await;
    assert_eq!(client.next_json().await["type"], "welcome");
    let text = format!(r#"{{"type":"message","payload":"{}"}}"#, "x".repeat(1000));
    client.send(&frame(true, TEXT, text.as_bytes(), true)).await;
    let delivered = client.next_json().await;
    assert_eq!(delivered["payload"].as_str().map(str::len), Some(1000));
}

#[tokio::test]
async fn a_client_close_is_echoed_with_its_code() {
    let app = spawn_app().await;
    let mut client = RawClient::connect(&app, b"").await;
    assert_eq!(client.next_json().await["type"], "welcome");
    let mut payload = 4000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"bye");
    client.send(&frame(true, CLOSE, &payload, true)).await;
    client.expect_close(4000).await;
}

#[tokio::test]
async fn bad_frames_close_the_connection_with_the_matching_code() {
    let app = spawn_app().await;
    let mut huge_header = vec![0x81, 0x80 | 127];
    huge_header.extend_from_slice(&(1u64 << 40).to_be_bytes());
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unmasked", frame(true, TEXT, br#"{"type":"ping"}"#, false), 1002),
        (
            "reserved bits",
            {
                let mut f = frame(true, TEXT, b"{}", true);
                f[0] |= 0x40;
                f
            },
            1002,
        ),
        ("unknown opcode", frame(true, 0x3, b"", true), 1002),
        ("continuation without a start", frame(true, CONTINUATION, b"x", true), 1002),
        ("fragmented ping", frame(false, PING, b"", true), 1002),
        ("invalid UTF-8", frame(true, TEXT, &[0x7b, 0xff, 0x7d], true), 1007),
        // Refused from the header alone: the 1 TiB never has to arrive.
        ("a frame over the size limit", huge_header, 1009),
    ];
    for (case, bytes, code) in cases {
        let mut client = RawClient::connect(&app, b"").await;
        assert_eq!(client.next_json().await["type"], "welcome", "{case}");
        client.send(&bytes).await;
        client.expect_close(code).await;
    }
}
