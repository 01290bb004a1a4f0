//! The application layer of lq-realtime: the ports it needs from the outside world and the
//! use-cases that drive the domain through them.
//!
//! It depends on `domain` and on no transport or broker technology: no warp, no redis, no
//! tokio networking (only tokio's synchronisation and timers). Adapters implement the ports;
//! inbound adapters drive [`Realtime`].
//!
//! # Layout
//! - [`ports`]: `MessageBroker`, `InboundHandler`, `TokenVerifier`, `WebhookVerifier`, `Clock`,
//!   `IdGenerator`, `ClientSink` — each documents what it guarantees and how it fails.
//! - [`session`]: the client session, the inbound port every transport drives.
//! - [`durable`]: the broker wrapped so every positioned message is kept in a `MessageStore`.
//! - [`hub`]: the instance's live connections, sharded by tenant, and the fan-out.
//! - [`frames`]: the server→client frames the use-cases produce, serialized once.
//! - [`stats`]: the instance's recent activity and the cluster-wide figures merged from every
//!   instance's reports.
//! - [`use_cases`]: connect, disconnect, handle a client frame, ingest a webhook, deliver a
//!   broker message, presence, the server API, sweep inactive connections, report statistics.
//! - [`Realtime`]: every use-case wired to one set of ports, for the inbound adapters.

pub mod durable;
pub mod frames;
pub mod hub;
pub mod ports;
pub mod session;
pub mod stats;
pub mod use_cases;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use domain::CloseReason;

pub use session::{ClientSession, ClientSessions, OpeningLimits, SessionRequest};
pub use use_cases::connect_client::{ConnectError, Resume};
pub use use_cases::handle_client_frame::FrameOutcome;
pub use use_cases::ingest_webhook::{IngestWebhook, WebhookError, WebhookRequest};
pub use use_cases::read_history::{HistoryError, HistoryPage};
pub use use_cases::report_stats::InstanceInfo;
pub use use_cases::server_api::{ApiKeys, Published, ServerApi, ServerApiError};
pub use use_cases::sweep_inactive::SweepReport;

use hub::Hub;
use ports::{Clock, DeliveryLog, IdGenerator, MessageBroker, Metrics, TokenVerifier, WebhookVerifier};
use session::SessionParts;
use use_cases::connect_client::ConnectClient;
use use_cases::consume_outbox::ConsumeOutbox;
use use_cases::deliver_message::DeliverBrokerMessage;
use use_cases::disconnect_client::DisconnectClient;
use use_cases::handle_client_frame::HandleClientFrame;
use use_cases::presence::TrackPresence;
use use_cases::read_history::ReadHistory;
use use_cases::report_stats::ReportStats;
use use_cases::subscribe_topic::SubscribeTopic;
use use_cases::sweep_inactive::SweepInactiveConnections;

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
    /// Which webhook deliveries were already relayed; `None`: no deduplication.
    pub deliveries: Option<Arc<dyn DeliveryLog>>,
    /// Where every message with a position is kept durably; `None`: only the broker's history.
    pub store: Option<Arc<dyn ports::MessageStore>>,
    /// The outbox table backends write into; `None`: no outbox consumed.
    pub outbox: Option<Arc<dyn ports::Outbox>>,
}

impl std::fmt::Debug for Ports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ports").finish_non_exhaustive()
    }
}

/// The limits and timings of one instance.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Client connections on this instance, whatever their transport.
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
    /// How long a relayed webhook delivery id is remembered (with [`Ports::deliveries`]).
    pub webhook_dedup_secs: u64,
    /// The origin rule and the opening turns of client sessions.
    pub opening: OpeningLimits,
    /// Topic subscriptions one connection may hold; 0 for no limit.
    pub max_subscriptions_per_connection: usize,
    /// Who this instance is in the cluster-wide statistics.
    pub instance: InstanceInfo,
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
            webhook_dedup_secs: 86_400,
            opening: OpeningLimits::default(),
            max_subscriptions_per_connection: 128,
            instance: InstanceInfo::default(),
        }
    }
}

/// Every use-case of one instance, sharing one hub: what the inbound adapters and the
/// instance's periodic upkeep drive.
pub struct Realtime {
    hub: Arc<Hub>,
    broker: Arc<dyn MessageBroker>,
    sessions: ClientSessions,
    webhooks: IngestWebhook,
    api: Arc<ServerApi>,
    /// The outbox consumer, with an outbox table configured.
    outbox: Option<ConsumeOutbox>,
    presence: Arc<TrackPresence>,
    sweep: SweepInactiveConnections,
    /// The broker's inbound handler; the broker only holds it weakly.
    deliver: Arc<DeliverBrokerMessage>,
    stats: ReportStats,
    draining: AtomicBool,
}

impl std::fmt::Debug for Realtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Realtime").field("hub", &self.hub).finish_non_exhaustive()
    }
}

impl Realtime {
    /// Wires the use-cases to `ports` and starts the broker's deliveries to this instance's
    /// connections.
    pub fn new(mut ports: Ports, settings: &Settings) -> Self {
        if let Some(store) = &ports.store {
            ports.broker = Arc::new(durable::DurableBroker::new(ports.broker.clone(), store.clone()));
        }
        let activity = Arc::new(stats::Activity::new(ports.clock.clone()));
        let cluster = Arc::new(stats::ClusterView::new(ports.clock.clone()));
        ports.broker = Arc::new(stats::CountingBroker::new(ports.broker.clone(), activity.clone()));
        let frames = frames::FrameFactory::new(ports.clock.clone(), ports.ids.clone());
        let hub = Arc::new(
            Hub::with_user_limit(
                ports.broker.clone(),
                settings.max_connections,
                settings.max_connections_per_user,
            )
            .with_topic_limit(settings.max_subscriptions_per_connection),
        );
        let metrics = ports.metrics.clone();
        let presence = Arc::new(TrackPresence::new(
            ports.presence.clone(),
            hub.clone(),
            ports.broker.clone(),
            frames.clone(),
        ));
        let topics = Arc::new(
            SubscribeTopic::new(
                hub.clone(),
                ports.tokens.clone(),
                frames.clone(),
                presence.clone(),
                settings,
            )
            .with_metrics(metrics.clone()),
        );
        let deliver = Arc::new(
            DeliverBrokerMessage::new(hub.clone(), frames.clone())
                .with_metrics(metrics.clone())
                .with_topics(topics.clone())
                .with_stats(activity.clone(), cluster.clone()),
        );
        let handler: Arc<dyn ports::InboundHandler> = deliver.clone();
        ports.broker.start(Arc::downgrade(&handler));
        let parts = SessionParts {
            connect: ConnectClient::new(ports.tokens.clone(), hub.clone(), frames.clone(), settings)
                .with_metrics(metrics.clone()),
            frames: HandleClientFrame::new(
                ports.broker.clone(),
                ports.tokens.clone(),
                frames.clone(),
                settings,
            )
            .with_metrics(metrics.clone())
            .with_presence(presence.clone())
            .with_topics(topics)
            .with_history(ReadHistory::new(ports.store.clone())),
            disconnect: DisconnectClient::new().with_metrics(ports.clock.clone(), metrics.clone()),
            presence: presence.clone(),
            tokens: ports.tokens,
        };
        let mut webhooks = IngestWebhook::new(ports.webhooks, ports.broker.clone(), frames.clone())
            .with_metrics(metrics.clone())
            .with_activity(activity.clone());
        let idempotency = ports.deliveries.clone();
        if let Some(deliveries) = ports.deliveries {
            webhooks = webhooks.with_delivery_log(deliveries, settings.webhook_dedup_secs);
        }
        let api = Arc::new(
            ServerApi::new(settings.api_keys.clone(), ports.broker.clone(), frames.clone())
                .with_metrics(metrics.clone())
                .with_presence(presence.clone())
                .with_history(ReadHistory::new(ports.store.clone()))
                .with_idempotency(idempotency, settings.webhook_dedup_secs),
        );
        let outbox =
            ports.outbox.map(|outbox| ConsumeOutbox::new(outbox, api.clone()).with_metrics(metrics.clone()));
        let stats =
            ReportStats::new(settings.instance.clone(), hub.clone(), ports.clock.clone(), activity, cluster);
        Self {
            draining: AtomicBool::new(false),
            deliver,
            stats,
            sessions: ClientSessions::new(parts, settings.opening.clone()),
            webhooks,
            api,
            outbox,
            presence,
            sweep: SweepInactiveConnections::new(hub.clone(), ports.clock, settings).with_metrics(metrics),
            broker: ports.broker,
            hub,
        }
    }

    /// Where every transport opens its client sessions.
    pub fn sessions(&self) -> &ClientSessions {
        &self.sessions
    }

    /// Signed webhooks from external services.
    pub fn webhooks(&self) -> &IngestWebhook {
        &self.webhooks
    }

    /// The server API for backends.
    pub fn api(&self) -> &ServerApi {
        &self.api
    }

    /// The outbox consumer, when an outbox table is configured: run
    /// [`ConsumeOutbox::run`] for as long as the instance serves.
    pub fn outbox(&self) -> Option<&ConsumeOutbox> {
        self.outbox.as_ref()
    }

    /// One pass over every connection: time limits and heartbeats. Run it every fraction of a
    /// second.
    pub fn sweep(&self) -> SweepReport {
        self.sweep.sweep()
    }

    /// Keeps this instance's presence entries alive and announces the users whose instance
    /// stopped keeping theirs. Run it well within the presence TTL.
    pub async fn refresh_presence(&self) {
        self.presence.refresh().await;
    }

    /// Records the presence changes of the sessions that started or ended since the last call.
    /// Run it whenever [`Realtime::presence_unsettled`] resolves.
    pub async fn settle_presence(&self) {
        self.presence.settle().await;
    }

    /// Resolves once presence changes wait for [`Realtime::settle_presence`].
    pub async fn presence_unsettled(&self) {
        self.presence.unsettled().await;
    }

    /// Finds the channels whose messages were lost while the broker link was down; run it
    /// every second or so (see [`DeliverBrokerMessage::check_positions`]).
    pub async fn check_positions(&self) {
        self.deliver.check_positions().await;
    }

    /// Sends this instance's figures to every instance and takes the second's sample of the
    /// cluster's: run it every second.
    pub async fn report_stats(&self) {
        self.stats.report(self.is_draining()).await;
    }

    /// The cluster-wide statistics, from every instance's latest report.
    pub fn cluster(&self) -> &stats::ClusterView {
        self.stats.cluster()
    }

    /// Registered connections.
    pub fn connections(&self) -> usize {
        self.hub.len()
    }

    /// Connection slots in use, including connections still opening.
    pub fn admitted(&self) -> usize {
        self.hub.admitted()
    }

    /// Closes up to `n` connections not already closing with `reason`; returns how many.
    pub fn close_batch(&self, n: usize, reason: CloseReason) -> usize {
        self.hub.close_batch(n, reason)
    }

    /// Closes every connection with `reason`.
    pub fn close_all(&self, reason: CloseReason) {
        self.hub.close_all(reason);
    }

    /// Whether the instance should receive new clients: the broker works and the instance is
    /// not draining.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.broker.is_ready()
    }

    /// Why the instance should not receive new clients, for `/ready`'s answer; `None` when
    /// it should.
    pub fn unready_reason(&self) -> Option<String> {
        if self.is_draining() {
            return Some("instance is draining".to_owned());
        }
        self.broker.unavailable_reason()
    }

    /// From now on the instance reports itself not ready, so load balancers send new clients
    /// elsewhere.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}
