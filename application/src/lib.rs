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

pub use hub::{ConnectionHandle, FanOut, Hub, RegisterError};
pub use use_cases::connect_client::{Admission, ConnectClient, ConnectError, Resume, Session};
pub use use_cases::deliver_message::DeliverBrokerMessage;
pub use use_cases::disconnect_client::DisconnectClient;
pub use use_cases::handle_client_frame::{ClientFrame, FrameOutcome, HandleClientFrame};
pub use use_cases::ingest_webhook::{IngestWebhook, WebhookError, WebhookRequest};
pub use use_cases::presence::TrackPresence;
pub use use_cases::server_api::{ApiKeys, ServerApi, ServerApiError};
pub use use_cases::sweep_inactive::{SweepInactiveConnections, SweepReport};

use ports::{Clock, IdGenerator, MessageBroker, Metrics, TokenVerifier, WebhookVerifier};

/// The ports a [`Realtime`] is built from.
#[derive(Clone)]
pub struct Ports {
    pub broker: Arc<dyn MessageBroker>,
    pub tokens: Arc<dyn TokenVerifier>,
    pub webhooks: Arc<dyn WebhookVerifier>,
    pub clock: Arc<dyn Clock>,
    pub ids: Arc<dyn IdGenerator>,
    pub metrics: Arc<dyn Metrics>,
    /// Who is online; `None`: presence turned off.
    pub presence: Option<Arc<dyn ports::Presence>>,
}

impl std::fmt::Debug for Ports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ports").finish_non_exhaustive()
    }
}

/// The limits and timings of one instance.
#[derive(Debug, Clone)]
pub struct Settings {
    /// WebSocket connections on this instance.
    pub max_connections: usize,
    /// Connections of one user on this instance; 0 for no limit.
    pub max_connections_per_user: usize,
    /// Period of the heartbeat ping.
    pub ping_interval_ms: u64,
    /// A connection from which nothing (not even a pong) arrived for this long is closed.
    pub idle_timeout_ms: u64,
    /// A connection whose client sent no data frame for this long is closed.
    pub inactivity_timeout_ms: u64,
    /// Client frames per second a connection may send; 0 for no limit.
    pub rate_per_sec: u32,
    /// Client frames a connection may send at once.
    pub rate_burst: u32,
    /// Seconds a token stays usable after its `exp`.
    pub token_leeway_secs: u64,
    /// Largest replay of missed messages sent to a reconnecting client; beyond it the client
    /// is told `"recovered": false` instead. Keep it below the outbound queue size.
    pub max_replay_bytes: usize,
    /// The keys of the server API; none: the API refuses every call.
    pub api_keys: ApiKeys,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_connections_per_user: 0,
            ping_interval_ms: 25_000,
            idle_timeout_ms: 60_000,
            inactivity_timeout_ms: 3_600_000,
            rate_per_sec: 50,
            rate_burst: 100,
            token_leeway_secs: 5,
            max_replay_bytes: 512 * 1024,
            api_keys: ApiKeys::default(),
        }
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
    /// The server API for backends.
    pub api: ServerApi,
    /// Who is online in each tenant.
    pub presence: Arc<TrackPresence>,
    pub sweep: SweepInactiveConnections,
    /// The broker's inbound handler; the broker only holds it weakly.
    pub deliver: Arc<DeliverBrokerMessage>,
    draining: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Realtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Realtime").field("hub", &self.hub).finish_non_exhaustive()
    }
}

impl Realtime {
    /// Wires the use-cases to `ports` and starts the broker's deliveries to this instance's
    /// connections.
    pub fn new(ports: Ports, settings: &Settings) -> Self {
        let frames = frames::FrameFactory::new(ports.clock.clone(), ports.ids.clone());
        let hub = Arc::new(Hub::with_user_limit(
            ports.broker.clone(),
            settings.max_connections,
            settings.max_connections_per_user,
        ));
        let metrics = ports.metrics.clone();
        let deliver =
            Arc::new(DeliverBrokerMessage::new(hub.clone(), frames.clone()).with_metrics(metrics.clone()));
        let presence = Arc::new(TrackPresence::new(
            ports.presence.clone(),
            hub.clone(),
            ports.broker.clone(),
            frames.clone(),
        ));
        let handler: Arc<dyn ports::InboundHandler> = deliver.clone();
        ports.broker.start(Arc::downgrade(&handler));
        Self {
            draining: std::sync::atomic::AtomicBool::new(false),
            deliver,
            connect: ConnectClient::new(ports.tokens.clone(), hub.clone(), frames.clone(), settings)
                .with_metrics(metrics.clone()),
            disconnect: DisconnectClient::new().with_metrics(ports.clock.clone(), metrics.clone()),
            frames: HandleClientFrame::new(ports.broker.clone(), ports.tokens, frames.clone(), settings)
                .with_metrics(metrics.clone())
                .with_presence(presence.clone()),
            webhooks: IngestWebhook::new(ports.webhooks, ports.broker.clone(), frames.clone())
                .with_metrics(metrics.clone()),
            api: ServerApi::new(settings.api_keys.clone(), ports.broker.clone(), frames.clone())
                .with_metrics(metrics.clone())
                .with_presence(presence.clone()),
            presence,
            sweep: SweepInactiveConnections::new(hub.clone(), ports.clock, settings).with_metrics(metrics),
            broker: ports.broker,
            hub,
        }
    }

    /// Whether the instance should receive new clients: the broker works and the instance is
    /// not draining.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.broker.is_ready()
    }

    /// From now on the instance reports itself not ready, so load balancers send new clients
    /// elsewhere.
    pub fn start_draining(&self) {
        self.draining.store(true, std::sync::atomic::Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Acquire)
    }
}
