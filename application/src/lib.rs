//! The application layer of lq-realtime: the ports it needs from the outside world and the
//! use-cases that drive the domain through them.
//!
//! It depends on `domain` and on no transport or broker technology: no warp, no redis, no
//! tokio networking. Adapters implement the ports; inbound adapters call the use-cases.
//!
//! # Layout
//! - [`ports`]: `MessageBroker`, `InboundHandler`, `TokenVerifier`, `WebhookVerifier`, `Clock`,
//!   `IdGenerator`, `ClientSink` — each documents what it guarantees and how it fails.
//! - [`hub`]: the instance's live connections, sharded by tenant, and the fan-out.
//! - [`frames`]: the server→client frames the use-cases produce, serialized once.
//! - [`use_cases`]: connect, disconnect, handle a client frame, ingest a webhook, deliver a
//!   broker message, sweep inactive connections.
//! - [`Realtime`]: every use-case wired to one set of ports, for the inbound adapters.

pub mod frames;
pub mod hub;
pub mod ports;
pub mod use_cases;

use std::sync::Arc;

pub use hub::{ConnectionHandle, Hub};
pub use use_cases::connect_client::{Admission, ConnectClient, ConnectError, Session};
pub use use_cases::deliver_message::DeliverBrokerMessage;
pub use use_cases::disconnect_client::DisconnectClient;
pub use use_cases::handle_client_frame::{ClientFrame, HandleClientFrame};
pub use use_cases::ingest_webhook::{IngestWebhook, WebhookError, WebhookRequest};
pub use use_cases::sweep_inactive::SweepInactiveConnections;

use ports::{Clock, IdGenerator, MessageBroker, TokenVerifier, WebhookVerifier};

/// The ports a [`Realtime`] is built from.
#[derive(Clone)]
pub struct Ports {
    pub broker: Arc<dyn MessageBroker>,
    pub tokens: Arc<dyn TokenVerifier>,
    pub webhooks: Arc<dyn WebhookVerifier>,
    pub clock: Arc<dyn Clock>,
    pub ids: Arc<dyn IdGenerator>,
}

impl std::fmt::Debug for Ports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ports").finish_non_exhaustive()
    }
}

/// Every use-case of one instance, sharing one hub.
pub struct Realtime {
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn MessageBroker>,
    pub connect: ConnectClient,
    pub disconnect: DisconnectClient,
    pub frames: HandleClientFrame,
    pub webhooks: IngestWebhook,
    pub sweep: SweepInactiveConnections,
    /// The broker's inbound handler; the broker only holds it weakly.
    pub deliver: Arc<DeliverBrokerMessage>,
}

impl std::fmt::Debug for Realtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Realtime").field("hub", &self.hub).finish_non_exhaustive()
    }
}

impl Realtime {
    /// Wires the use-cases to `ports` and starts the broker's deliveries to this instance's
    /// connections.
    pub fn new(ports: Ports, max_connections: usize, idle_timeout_ms: u64) -> Self {
        let frames = frames::FrameFactory::new(ports.clock.clone(), ports.ids.clone());
        let hub = Arc::new(Hub::new(ports.broker.clone(), max_connections));
        let deliver = Arc::new(DeliverBrokerMessage::new(hub.clone(), frames.clone()));
        let handler: Arc<dyn ports::InboundHandler> = deliver.clone();
        ports.broker.start(Arc::downgrade(&handler));
        Self {
            deliver,
            connect: ConnectClient::new(ports.tokens, hub.clone(), frames.clone()),
            disconnect: DisconnectClient::new(hub.clone()),
            frames: HandleClientFrame::new(ports.broker.clone(), frames.clone()),
            webhooks: IngestWebhook::new(ports.webhooks, ports.broker.clone(), frames.clone()),
            sweep: SweepInactiveConnections::new(hub.clone(), ports.clock, idle_timeout_ms),
            broker: ports.broker,
            hub,
        }
    }

    /// Whether the instance can publish and receive messages.
    pub fn is_ready(&self) -> bool {
        self.broker.is_ready()
    }
}
