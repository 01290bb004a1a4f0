//! Handle a frame a client sent: relay a message to its tenant, answer a ping, or explain
//! what is wrong with the frame.

use std::sync::Arc;

use bytes::Bytes;
use domain::envelope::kind;
use domain::{Channel, ClientCommand, ErrorCode, ProtocolError};

use crate::frames::{FrameFactory, encode};
use crate::ports::MessageBroker;
use crate::use_cases::connect_client::Session;

/// A frame as received from the client.
#[derive(Debug, Clone, Copy)]
pub enum ClientFrame<'a> {
    Text(&'a str),
    Binary,
}

/// The handle-a-client-frame use-case.
pub struct HandleClientFrame {
    broker: Arc<dyn MessageBroker>,
    frames: FrameFactory,
}

impl std::fmt::Debug for HandleClientFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandleClientFrame").finish_non_exhaustive()
    }
}

impl HandleClientFrame {
    pub fn new(broker: Arc<dyn MessageBroker>, frames: FrameFactory) -> Self {
        Self { broker, frames }
    }

    /// Records client activity that carries no data (a WebSocket ping or pong).
    pub fn touch(&self, session: &Session) {
        session.touch(self.frames.now());
    }

    /// Handles one frame and returns the frame to send back to this client, if any.
    ///
    /// - `message`: published to `tenant:<tenant>`; nothing is returned when the broker took
    ///   it (the sender receives its own message through the channel like everyone else), an
    ///   `error` frame with code `unavailable` when it did not.
    /// - `ping`: a `pong` frame.
    /// - anything else: an `error` frame with code `bad_request`.
    pub async fn handle(&self, session: &Session, frame: ClientFrame<'_>) -> Option<Bytes> {
        session.touch(self.frames.now());
        let command = match frame {
            ClientFrame::Text(text) => ClientCommand::parse(text),
            ClientFrame::Binary => Err(ProtocolError::Binary),
        };
        match command {
            Ok(ClientCommand::Ping) => Some(self.frames.pong()),
            Ok(ClientCommand::Message { payload }) => {
                let info = session.info();
                let channel = Channel::Tenant(info.tenant_id.clone());
                let envelope = self.frames.envelope(
                    kind::MESSAGE,
                    payload.to_owned(),
                    Some(info.user_id.clone()),
                    Some(channel.clone()),
                );
                match self.broker.publish(&channel, encode(&envelope)).await {
                    Ok(()) => None,
                    Err(error) => {
                        tracing::warn!(%error, connection_id = %info.id, "client message not published");
                        Some(self.frames.error(
                            ErrorCode::Unavailable,
                            "message not delivered: broker unavailable, retry later",
                        ))
                    }
                }
            }
            Err(error) => Some(self.frames.error(ErrorCode::BadRequest, &error.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Hub;
    use crate::ports::{BrokerError, MockMessageBroker};
    use crate::use_cases::test_support::*;
    use serde_json::Value;

    async fn run(broker: MockMessageBroker, frame: ClientFrame<'_>) -> Option<Value> {
        let broker: Arc<MockMessageBroker> = Arc::new(broker);
        let mut hub_broker = MockMessageBroker::new();
        hub_broker.expect_subscribe().returning(|_| ());
        hub_broker.expect_until_active().returning(|_| ack_ok());
        let hub = Arc::new(Hub::new(Arc::new(hub_broker), 10));
        let session = session(&hub, "bob", "acme").await;
        let reply = HandleClientFrame::new(broker, frames()).handle(&session, frame).await;
        reply.map(|bytes| serde_json::from_slice(&bytes).expect("json"))
    }

    #[tokio::test]
    async fn a_message_is_published_to_the_senders_tenant_in_the_envelope_format() {
        let mut broker = MockMessageBroker::new();
        broker
            .expect_publish()
            .withf(|channel, bytes| {
                let v: Value = serde_json::from_slice(bytes).expect("json");
                channel.name() == "tenant:acme"
                    && v["type"] == "message"
                    && v["payload"] == serde_json::json!({"text": "hi", "n": [1, 2]})
                    && v["from_user"] == "bob"
                    && v["channel"] == "tenant:acme"
                    && v["timestamp"] == "2025-01-01T00:00:00.000Z"
                    && v["message_id"].as_str().is_some_and(|id| !id.is_empty())
            })
            .times(1)
            .returning(|_, _| Ok(()));
        let reply =
            run(broker, ClientFrame::Text(r#"{"type":"message","payload":{"text":"hi","n":[1,2]}}"#)).await;
        assert_eq!(reply, None);
    }

    #[tokio::test]
    async fn a_message_the_broker_cannot_take_is_answered_with_an_unavailable_error() {
        let mut broker = MockMessageBroker::new();
        broker.expect_publish().returning(|_, _| Err(BrokerError::Unavailable("down".into())));
        let reply = run(broker, ClientFrame::Text(r#"{"type":"message","payload":1}"#)).await.expect("reply");
        assert_eq!(reply["type"], "error");
        assert_eq!(reply["payload"]["code"], "unavailable");
    }

    #[tokio::test]
    async fn a_ping_is_answered_with_a_pong_and_publishes_nothing() {
        let mut broker = MockMessageBroker::new();
        broker.expect_publish().never();
        let reply = run(broker, ClientFrame::Text(r#"{"type":"ping"}"#)).await.expect("reply");
        assert_eq!(reply["type"], "pong");
        assert_eq!(reply["from_user"], Value::Null);
    }

    #[tokio::test]
    async fn malformed_frames_are_answered_with_bad_request_errors() {
        for frame in [
            ClientFrame::Text("not json"),
            ClientFrame::Text("[1,2]"),
            ClientFrame::Text(r#"{"type":"dance"}"#),
            ClientFrame::Text(r#"{"type":"message"}"#),
            ClientFrame::Binary,
        ] {
            let mut broker = MockMessageBroker::new();
            broker.expect_publish().never();
            let reply = run(broker, frame).await.expect("reply");
            assert_eq!(reply["type"], "error", "{frame:?}");
            assert_eq!(reply["payload"]["code"], "bad_request", "{frame:?}");
            assert!(reply["payload"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
    }
}
