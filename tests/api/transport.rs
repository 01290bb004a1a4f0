//! One client for both transports, so that a contract test runs over WebSocket and over
//! Server-Sent Events alike: frames in, frames out, the close code, and reconnecting from where
//! the client was the way each transport does it (`since`/`user_since` for WebSocket, the last
//! event id as `Last-Event-ID` for SSE).

use std::time::Duration;

use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::*;
use crate::sse_client::{SseClient, SseEvent};

/// Runs each test function (`async fn name(t: Transport)` in the calling module) over both
/// transports, as `websocket::name` and `sse::name`.
macro_rules! over_every_transport {
    ($($test:ident),* $(,)?) => {
        mod websocket {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() { super::$test(crate::transport::Transport::WebSocket).await })*
        }
        mod sse {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() { super::$test(crate::transport::Transport::Sse).await })*
        }
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    WebSocket,
    Sse,
}

/// A connected client of either transport.
pub(crate) enum Client {
    Ws {
        socket: WsClient,
        /// The last positions seen in the tenant and the user channel: what it resumes from.
        since: Option<String>,
        user_since: Option<String>,
    },
    Sse {
        stream: SseClient,
        addr: std::net::SocketAddr,
        token: String,
        connection_id: String,
        http: reqwest::Client,
        /// Answers to its POSTs, read before the stream's events.
        replies: std::collections::VecDeque<Value>,
    },
}

/// How long a client waits to be sure that nothing more arrives.
const QUIET: Duration = Duration::from_millis(300);

impl TestApp {
    /// Connects `user` of `tenant` over `transport` with `query` after the token (e.g.
    /// `&since=E:3`) and `headers`; returns the client and its welcome.
    pub(crate) async fn open_with(
        &self,
        transport: Transport,
        user: &str,
        tenant: &str,
        query: &str,
        headers: &[(&str, &str)],
    ) -> Result<(Client, Value), (u16, Value)> {
        self.open_with_token(transport, &token(user, tenant), query, headers).await
    }

    /// Connects the holder of `token` over `transport` with `query` after the token and
    /// `headers`; returns the client and its welcome.
    pub(crate) async fn open_with_token(
        &self,
        transport: Transport,
        token: &str,
        query: &str,
        headers: &[(&str, &str)],
    ) -> Result<(Client, Value), (u16, Value)> {
        match transport {
            Transport::WebSocket => {
                let mut request =
                    self.ws_url(&format!("?token={token}{query}")).into_client_request().expect("request");
                for (name, value) in headers {
                    request.headers_mut().insert(
                        tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())
                            .expect("name"),
                        tokio_tungstenite::tungstenite::http::HeaderValue::from_str(value).expect("value"),
                    );
                }
                let socket = WsClient::connect(request).await?;
                let mut client = Client::Ws { socket, since: None, user_since: None };
                let welcome = client.next_json().await;
                Ok((client, welcome))
            }
            Transport::Sse => Client::open_sse_with(self.addr, &self.http, token, query, headers, None).await,
        }
    }

    /// Connects `user` of `tenant` over `transport`; returns the client and its welcome.
    pub(crate) async fn open(&self, transport: Transport, user: &str, tenant: &str) -> (Client, Value) {
        let (client, welcome) = self.open_with(transport, user, tenant, "", &[]).await.expect("connected");
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        (client, welcome)
    }

    /// Connects `user` of `tenant` again over the transport of `previous`, from where it was:
    /// the way that transport resumes.
    pub(crate) async fn resume(&self, previous: &Client, user: &str, tenant: &str) -> (Client, Value) {
        let (transport, query, header) = match previous {
            Client::Ws { since, user_since, .. } => {
                let mut query = String::new();
                if let Some(since) = since {
                    query.push_str(&format!("&since={since}"));
                }
                if let Some(user_since) = user_since {
                    query.push_str(&format!("&user_since={user_since}"));
                }
                (Transport::WebSocket, query, None)
            }
            Client::Sse { stream, .. } => (Transport::Sse, String::new(), stream.last_id.clone()),
        };
        let headers: Vec<(&str, &str)> = header.iter().map(|id| ("Last-Event-ID", id.as_str())).collect();
        let (client, welcome) =
            self.open_with(transport, user, tenant, &query, &headers).await.expect("connected");
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        (client, welcome)
    }
}

impl Client {
    /// Opens an SSE stream of `user` of `tenant` on `addr` (a receive buffer of `recv_buffer`
    /// bytes when given) with `query` after the token and `headers`; returns the client and its
    /// welcome.
    pub(crate) async fn open_sse(
        addr: std::net::SocketAddr,
        http: &reqwest::Client,
        user: &str,
        tenant: &str,
        query: &str,
        headers: &[(&str, &str)],
        recv_buffer: Option<u32>,
    ) -> Result<(Client, Value), (u16, Value)> {
        Self::open_sse_with(addr, http, &token(user, tenant), query, headers, recv_buffer).await
    }

    /// Opens an SSE stream with `token` on `addr`; see [`Client::open_sse`].
    pub(crate) async fn open_sse_with(
        addr: std::net::SocketAddr,
        http: &reqwest::Client,
        token: &str,
        query: &str,
        headers: &[(&str, &str)],
        recv_buffer: Option<u32>,
    ) -> Result<(Client, Value), (u16, Value)> {
        let token = token.to_owned();
        let path = format!("/sse?token={token}{query}");
        let stream = SseClient::open(addr, &path, headers, recv_buffer).await?;
        let mut client = Client::Sse {
            stream,
            addr,
            token,
            connection_id: String::new(),
            http: http.clone(),
            replies: Default::default(),
        };
        let welcome = client.next_json().await;
        if let Client::Sse { connection_id, .. } = &mut client {
            *connection_id = welcome["payload"]["connection_id"].as_str().expect("an id").to_owned();
        }
        Ok((client, welcome))
    }

    /// The next frame, or the close code if the connection closes first.
    pub(crate) async fn next_data_or_close(&mut self) -> Result<Value, u16> {
        match self {
            Self::Ws { socket, since, user_since } => {
                let frame =
                    socket.next_data_or_close().await.map_err(|f| f.map_or(1005, |f| u16::from(f.code)))?;
                track(&frame, since, user_since);
                Ok(frame)
            }
            Self::Sse { stream, replies, .. } => {
                if let Some(reply) = replies.pop_front() {
                    return Ok(reply);
                }
                match stream.next_event().await {
                    SseEvent::Frame(frame) => Ok(frame),
                    SseEvent::Close(code) => Err(code),
                }
            }
        }
    }

    /// The next frame, which must arrive within [`PATIENCE`].
    pub(crate) async fn next_json(&mut self) -> Value {
        self.next_data_or_close().await.unwrap_or_else(|code| panic!("closed with {code}"))
    }

    /// The next frame of type `kind`, skipping others.
    pub(crate) async fn next_of(&mut self, kind: &str) -> Value {
        loop {
            let frame = self.next_json().await;
            if frame["type"] == kind {
                return frame;
            }
        }
    }

    /// Sends one client frame: a text frame, or a POST to the stream's connection.
    pub(crate) async fn send_json(&mut self, frame: &Value) {
        match self {
            Self::Ws { socket, .. } => socket.send_json(frame).await,
            Self::Sse { addr, token, connection_id, http, replies, .. } => {
                let answer = http
                    .post(format!("http://{addr}/sse/{connection_id}"))
                    .bearer_auth(token.as_str())
                    .body(frame.to_string())
                    .send()
                    .await
                    .expect("posted");
                let answer = Answer::from_response(answer).await;
                match answer.status {
                    200 => replies.push_back(answer.body),
                    202 => {}
                    other => panic!("POST answered {other}: {:?}", answer.body),
                }
            }
        }
    }

    /// The close code; frames before it are skipped.
    pub(crate) async fn expect_close(&mut self) -> u16 {
        loop {
            if let Err(code) = self.next_data_or_close().await {
                if let Self::Sse { stream, .. } = self {
                    stream.expect_end().await;
                }
                return code;
            }
        }
    }

    /// The close code, which may take up to `within` to come; frames before it are skipped.
    pub(crate) async fn expect_close_within(&mut self, within: Duration) -> u16 {
        self.set_patience(within);
        let code = self.expect_close().await;
        self.set_patience(PATIENCE);
        code
    }

    /// How long to wait for each frame from now on ([`PATIENCE`] at first).
    pub(crate) fn set_patience(&mut self, within: Duration) {
        match self {
            Self::Ws { socket, .. } => socket.patience = within,
            Self::Sse { stream, .. } => stream.patience = within,
        }
    }

    /// Proves that nothing else was queued for this client: a ping's pong comes next, and
    /// nothing else arrives.
    pub(crate) async fn expect_nothing_pending(&mut self) {
        self.send_json(&json!({"type": "ping"})).await;
        let next = self.next_json().await;
        assert_eq!(next["type"], "pong", "expected nothing before the pong, got {next}");
        if let Self::Sse { stream, .. } = self {
            // The pong came back in the POST's answer: the stream must stay quiet.
            let event = stream.event_within(QUIET).await;
            assert_eq!(event, None, "nothing more on the stream");
        }
    }

    /// Ends the connection from the client's side.
    pub(crate) async fn close(self) {
        match self {
            Self::Ws { socket, .. } => socket.close().await,
            Self::Sse { stream, .. } => drop(stream),
        }
    }
}

/// Moves the WebSocket client's positions past `frame`.
fn track(frame: &Value, since: &mut Option<String>, user_since: &mut Option<String>) {
    if frame["type"] == "welcome" {
        for (channel, position) in frame["payload"]["positions"].as_object().into_iter().flatten() {
            if channel.starts_with("tenant:") {
                *since = Some(since_of(position));
            } else if channel.starts_with("user:") {
                *user_since = Some(since_of(position));
            }
        }
    } else if let Some(channel) = frame["channel"].as_str()
        && frame["offset"].is_u64()
    {
        if channel.starts_with("tenant:") {
            *since = Some(since_of(frame));
        } else if channel.starts_with("user:") {
            *user_since = Some(since_of(frame));
        }
    }
}
