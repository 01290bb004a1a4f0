//! Wiring: build every adapter from the configuration, bind the listener, serve until told to
//! stop, then shut down gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use adapters::inbound::admin::AdminSettings;
use adapters::inbound::console::{CONSOLE_PROVIDER, ConsoleSettings, DEMO_TENANT, Demo};
use adapters::inbound::http::{HttpSettings, serve, serve_metrics};
use adapters::inbound::sse::{self, SseSettings};
use adapters::inbound::ws::{self, WsSettings};
use adapters::outbound::delivery_log::InMemoryDeliveryLog;
use adapters::outbound::jwt::{JwtIssuer, JwtRules, JwtVerifier, TokenRequest};
use adapters::outbound::memory::InMemoryBroker;
use adapters::outbound::postgres::PostgresStore;
use adapters::outbound::postgres::outbox::PostgresOutbox;
use adapters::outbound::presence::InMemoryPresence;
use adapters::outbound::prometheus::PrometheusMetrics;
use adapters::outbound::redis::{RedisBroker, RedisBrokerSettings};
use adapters::outbound::signatures::{Endpoint, Secret, SignatureVerifier};
use adapters::outbound::system::{RandomIdGenerator, SystemClock, random_bytes, random_hex};
use application::ports::{Clock, DeliveryLog, MessageBroker, Presence};
use application::{Ports, Realtime};
use domain::{CloseReason, Provider, SCOPE_WS_CONNECT, TenantId};
use tokio::net::TcpListener;

use crate::config::{BrokerConfig, Config, JwtSecret};

/// Everything a shutdown may take: stop accepting, close every client, finish.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(8);

/// Why the application could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("BIND_ADDR: cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("Redis broker: {0}")]
    Redis(String),
    #[error("{0}")]
    Randomness(String),
    #[error("JWT_PUBLIC_KEY_FILE: {0}")]
    PublicKey(String),
    #[error("METRICS_ADDR: cannot listen on {addr}: {source}")]
    MetricsBind { addr: SocketAddr, source: std::io::Error },
    #[error("{0}")]
    Database(#[from] adapters::outbound::postgres::PostgresError),
}

/// A bound, wired instance, ready to [`run`](Application::run_until).
pub struct Application {
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    metrics: Arc<PrometheusMetrics>,
    addr: SocketAddr,
    realtime: Arc<Realtime>,
    config: Config,
    /// Set when no `JWT_SECRET_KEY` was configured: the generated secret, to mint a demo token.
    ephemeral_secret: Option<JwtSecret>,
    /// The browser console, when `CONSOLE` is on.
    console: Option<ConsoleSettings>,
    /// The dashboard, when `ADMIN` is on.
    admin: Option<AdminSettings>,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl Application {
    /// Wires the adapters and binds `config.bind_addr` (port 0 picks a free port).
    ///
    /// # Errors
    /// [`StartError`] when the address cannot be bound or a configured part is unavailable.
    pub async fn build(mut config: Config) -> Result<Self, StartError> {
        let rules = JwtRules {
            issuer: config.jwt_issuer.clone(),
            audience: config.jwt_audience.clone(),
            leeway_secs: config.settings.token_leeway_secs,
        };
        let mut ephemeral_secret = None;
        let tokens = match (&config.jwt_secret, &config.jwt_public_key_file) {
            (_, Some(path)) => {
                let pem = std::fs::read(path)
                    .map_err(|e| StartError::PublicKey(format!("cannot read {}: {e}", path.display())))?;
                JwtVerifier::with_public_key(&pem, &rules)
                    .map_err(|e| StartError::PublicKey(format!("{}: {e}", path.display())))?
            }
            (Some(secret), None) => JwtVerifier::with_secret(secret.as_bytes(), &rules),
            (None, None) => {
                let bytes = random_bytes(32).map_err(|e| StartError::Randomness(e.to_string()))?;
                let secret = JwtSecret::new(bytes);
                let verifier = JwtVerifier::with_secret(secret.as_bytes(), &rules);
                ephemeral_secret = Some(secret);
                verifier
            }
        };
        type Stores = (Arc<dyn MessageBroker>, Arc<dyn DeliveryLog>, Arc<dyn Presence>);
        let (broker, deliveries, presence): Stores = match &config.broker {
            BrokerConfig::InProcess => (
                Arc::new(InMemoryBroker::with_history(config.history)),
                Arc::new(InMemoryDeliveryLog::new()),
                Arc::new(InMemoryPresence::new()),
            ),
            BrokerConfig::Redis { target, pool_size } => {
                let mut settings = RedisBrokerSettings::new(target.clone());
                settings.pool_size = *pool_size;
                settings.history = config.history;
                let redis = RedisBroker::new(settings).map_err(|e| StartError::Redis(e.to_string()))?;
                let deliveries = Arc::new(redis.delivery_log());
                let presence = Arc::new(redis.presence(config.presence_ttl));
                (Arc::new(redis), deliveries, presence)
            }
        };
        let ids = RandomIdGenerator::new().map_err(|e| StartError::Randomness(e.to_string()))?;
        let metrics =
            Arc::new(PrometheusMetrics::new(env!("CARGO_PKG_VERSION"), &[ws::TRANSPORT, sse::TRANSPORT]));
        // In demo mode the console relays test webhooks of the demo tenant, signed with a secret
        // of this process.
        let demo = match (&ephemeral_secret, config.console) {
            (Some(secret), true) => {
                let webhook_secret = random_bytes(32).map_err(|e| StartError::Randomness(e.to_string()))?;
                let (secret, iss, aud) =
                    (secret.clone(), config.jwt_issuer.clone(), config.jwt_audience.clone());
                let token = move |user: &domain::UserId, tenant: &TenantId| {
                    mint_demo_token(&secret, user.as_str(), tenant.as_str(), iss.clone(), aud.clone())
                };
                Some(Demo { token: Arc::new(token), webhook_secret: Arc::from(webhook_secret) })
            }
            _ => None,
        };
        let mut verifier = signature_verifier(&config);
        // Both names are valid constants; the console's browser test relays a test webhook.
        if let (Some(demo), Ok(tenant), Ok(provider)) =
            (&demo, TenantId::parse(DEMO_TENANT), Provider::parse(CONSOLE_PROVIDER))
        {
            let endpoint = Endpoint::hmac_sha256(Secret::new(demo.webhook_secret.to_vec()));
            verifier = verifier.with_endpoint(tenant, provider, endpoint);
        }
        let console = config.console.then(|| ConsoleSettings { demo });
        // In demo mode without API_KEYS, the dashboard signs in with a key of this process.
        let mut demo_key = None;
        if config.admin && ephemeral_secret.is_some() && config.settings.api_keys.is_empty() {
            let key = random_hex(24).map_err(|e| StartError::Randomness(e.to_string()))?;
            config.settings.api_keys = application::ApiKeys::new([key.clone()]);
            demo_key = Some(key);
        }
        let admin = config.admin.then_some(AdminSettings { demo_key });
        config.settings.instance = application::InstanceInfo {
            id: random_hex(6).map_err(|e| StartError::Randomness(e.to_string()))?,
            host: config.hostname.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        let postgres = match &config.database {
            Some(settings) => Some(Arc::new(PostgresStore::connect(settings.clone()).await?)),
            None => None,
        };
        let outbox: Option<Arc<dyn application::ports::Outbox>> = match (&postgres, &config.outbox_table) {
            (Some(store), Some(table)) => Some(Arc::new(PostgresOutbox::new(store, table)?)),
            _ => None,
        };
        let store = postgres.map(|store| store as Arc<dyn application::ports::MessageStore>);
        let ports = Ports {
            store,
            outbox,
            broker,
            tokens: Arc::new(tokens),
            webhooks: Arc::new(verifier),
            clock: Arc::new(SystemClock),
            ids: Arc::new(ids),
            metrics: metrics.clone(),
            presence: config.presence.then_some(presence),
            deliveries: Some(deliveries),
        };
        let realtime = Arc::new(Realtime::new(ports, &config.settings));
        let metrics_listener = match config.metrics_addr {
            Some(addr) => Some(
                TcpListener::bind(addr).await.map_err(|source| StartError::MetricsBind { addr, source })?,
            ),
            None => None,
        };
        let listener =
            listen(config.bind_addr).map_err(|source| StartError::Bind { addr: config.bind_addr, source })?;
        let addr =
            listener.local_addr().map_err(|source| StartError::Bind { addr: config.bind_addr, source })?;
        Ok(Self {
            listener,
            metrics_listener,
            addr,
            realtime,
            metrics,
            config,
            ephemeral_secret,
            console,
            admin,
        })
    }

    /// Whether the console (`/`) and the dashboard (`/admin`) are served.
    pub fn pages(&self) -> (bool, bool) {
        (self.console.is_some(), self.admin.is_some())
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address `/metrics` is served on when it has a listener of its own.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// When no `JWT_SECRET_KEY` was configured: a token for user `demo` of tenant `demo`,
    /// valid for an hour, signed with this process's ephemeral secret.
    pub fn demo_token(&self) -> Option<String> {
        let secret = self.ephemeral_secret.as_ref()?;
        mint_demo_token(
            secret,
            DEMO_TENANT,
            DEMO_TENANT,
            self.config.jwt_issuer.clone(),
            self.config.jwt_audience.clone(),
        )
    }

    /// Serves until `shutdown` resolves, then drains (see [`Application::run_until_hurried`]),
    /// taking the whole drain.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) {
        self.run_until_hurried(shutdown, std::future::pending()).await;
    }

    /// Serves until `shutdown` resolves, then stops accepting, closes every connection with
    /// 1001 and returns once they are gone or [`SHUTDOWN_DEADLINE`] has passed. The drain
    /// (`DRAIN_GRACE_SECS`, then `DRAIN_SECS`) is skipped when no connection is open, and cut
    /// short when `hurry` resolves (a second signal): every connection is then closed at once.
    pub async fn run_until_hurried(
        self,
        shutdown: impl Future<Output = ()> + Send,
        hurry: impl Future<Output = ()> + Send,
    ) {
        let Self { listener, metrics_listener, addr, realtime, metrics, config, console, admin, .. } = self;
        let websocket = WsSettings {
            outbound_queue_bytes: config.outbound_queue_bytes,
            max_message_bytes: config.max_message_bytes,
            ..WsSettings::default()
        };
        let sse = SseSettings {
            outbound_queue_bytes: config.outbound_queue_bytes,
            max_message_bytes: config.max_message_bytes,
            ..SseSettings::default()
        };
        let http_pages = (console.is_some(), admin.is_some());
        let http = HttpSettings {
            header_read_timeout: config.header_read_timeout,
            metrics: Some(metrics.clone()),
            separate_metrics_listener: metrics_listener.is_some(),
            console,
            admin,
            websocket,
            sse,
        };
        let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
        if let Some(listener) = metrics_listener {
            tokio::spawn(serve_metrics(listener, metrics.clone(), async {
                let _ = metrics_stopped.await;
            }));
        }
        let upkeep = tokio::spawn({
            let metrics = metrics.clone();
            async move {
                let mut ticks = tokio::time::interval(Duration::from_secs(5));
                loop {
                    ticks.tick().await;
                    metrics.run_upkeep();
                }
            }
        });
        let (stop_accepting, accepting_stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, realtime.clone(), http, async {
            let _ = accepting_stopped.await;
        }));
        let sweeper = every(SWEEP_PERIOD, &realtime, |realtime| async move { sweep(&realtime) });
        // Three refreshes per TTL: an entry survives one missed refresh.
        let presence_period = (config.presence_ttl / 3).max(Duration::from_millis(500));
        let presence_refresher =
            every(presence_period, &realtime, |realtime| async move { realtime.refresh_presence().await });
        let presence_settler = tokio::spawn({
            let realtime = realtime.clone();
            async move {
                loop {
                    realtime.presence_unsettled().await;
                    realtime.settle_presence().await;
                }
            }
        });
        let position_checker = every(POSITION_CHECK_PERIOD, &realtime, |realtime| async move {
            realtime.check_positions().await;
        });
        let stats_reporter =
            every(STATS_PERIOD, &realtime, |realtime| async move { realtime.report_stats().await });
        let outbox_consumer = tokio::spawn({
            let realtime = realtime.clone();
            async move {
                match realtime.outbox() {
                    Some(outbox) => outbox.run().await,
                    None => std::future::pending().await,
                }
            }
        });
        let summary = Summary::of(&config, addr, http_pages);
        tracing::info!(
            %addr,
            console = %summary.console,
            dashboard = %summary.dashboard,
            broker = %summary.broker,
            server_api = %summary.server_api,
            webhooks = %summary.webhooks,
            history = %summary.history,
            presence = config.presence,
            persistence = config.database.is_some(),
            max_connections = config.settings.max_connections,
            "lq-realtime listening"
        );

        shutdown.await;
        realtime.start_draining();
        let mut hurry = std::pin::pin!(hurry);
        if realtime.admitted() == 0 && !config.drain_grace_set {
            // Nobody to drain, and no grace asked for: a load balancer that still sends requests
            // here gets connection errors, which it retries elsewhere.
            tracing::info!("no connection open: stopping at once");
            let _ = stop_accepting.send(());
        } else {
            tracing::info!(
                connections = realtime.connections(),
                grace_secs = config.drain_grace.as_secs(),
                drain_secs = config.drain.as_secs(),
                "draining: /ready now answers 503; a second signal closes every connection at once"
            );
            let drained = async {
                tokio::time::sleep(config.drain_grace).await;
                let _ = stop_accepting.send(());
                drain(&realtime, config.drain).await;
            };
            // On a second signal `drained` is dropped, and with it `stop_accepting`: the server
            // stops accepting all the same.
            tokio::select! {
                () = drained => {}
                () = &mut hurry => tracing::warn!(connections = realtime.connections(), "second signal: closing every connection now"),
            }
        }
        sweeper.abort();
        position_checker.abort();
        stats_reporter.abort();
        outbox_consumer.abort();
        presence_refresher.abort();
        upkeep.abort();
        let _ = stop_metrics.send(());
        let deadline = tokio::time::Instant::now() + SHUTDOWN_DEADLINE;
        // Repeated, so that a connection completing its handshake during shutdown is closed too.
        while realtime.admitted() > 0 && tokio::time::Instant::now() < deadline {
            realtime.close_all(CloseReason::GoingAway);
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        // The leaves of the last connections, recorded before the process goes.
        presence_settler.abort();
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let _ = tokio::time::timeout(remaining, realtime.settle_presence()).await;
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if tokio::time::timeout(remaining, server).await.is_err() {
            tracing::warn!("HTTP requests still in flight at the shutdown deadline were dropped");
        }
        tracing::info!(connections_left = realtime.connections(), "stopped");
    }
}

/// What the start-up line says of the instance, in words.
struct Summary {
    console: String,
    dashboard: String,
    broker: String,
    server_api: String,
    webhooks: String,
    history: String,
}

impl Summary {
    fn of(config: &Config, addr: SocketAddr, (console, dashboard): (bool, bool)) -> Self {
        // An address that listens everywhere is reached, from this machine, on loopback.
        let host =
            if addr.ip().is_unspecified() { SocketAddr::from(([127, 0, 0, 1], addr.port())) } else { addr };
        let page = |on: bool, path: &str| if on { format!("http://{host}{path}") } else { "off".to_owned() };
        let broker = match &config.broker {
            BrokerConfig::InProcess => "in-process (single instance)".to_owned(),
            BrokerConfig::Redis { target, .. } => format!("redis: {}", target.location()),
        };
        let keys = config.settings.api_keys.len();
        let server_api = match keys {
            0 => "off (no API_KEYS)".to_owned(),
            1 => "on (1 key)".to_owned(),
            keys => format!("on ({keys} keys)"),
        };
        let tenants: std::collections::HashSet<&TenantId> =
            config.webhook_secrets.keys().chain(config.webhook_endpoints.iter().map(|e| &e.tenant)).collect();
        let webhooks = format!(
            "{} tenants ({} with WEBHOOK_SECRETS, {} provider entries in WEBHOOK_CONFIG)",
            tenants.len(),
            config.webhook_secrets.len(),
            config.webhook_endpoints.len()
        );
        let history = match config.history.size {
            0 => "off".to_owned(),
            size => format!("{size} messages per channel for {} s", config.history.ttl.as_secs()),
        };
        Self {
            console: page(console, "/"),
            dashboard: page(dashboard, "/admin"),
            broker,
            server_api,
            webhooks,
            history,
        }
    }
}

/// Pending connections the kernel queues for `accept` (capped by `net.core.somaxconn`): room
/// for a burst of reconnecting clients, where the usual 128 would refuse them.
const LISTEN_BACKLOG: u32 = 4096;

/// A token for `user` of `tenant`, valid for an hour, allowing everything on every topic, signed
/// with `secret`.
fn mint_demo_token(
    secret: &JwtSecret,
    user: &str,
    tenant: &str,
    iss: Option<String>,
    aud: Option<String>,
) -> Option<String> {
    let now = SystemClock.now().unix_seconds();
    JwtIssuer::hs256(secret.as_bytes())
        .issue(&TokenRequest {
            user_id: user.into(),
            tenant_id: tenant.into(),
            scope: SCOPE_WS_CONNECT.into(),
            iat: now,
            exp: now + 3600,
            iss,
            aud,
            caps: Some(
                serde_json::json!([{"channels": ["*"], "allow": ["sub", "pub", "presence", "history"]}]),
            ),
            channel: None,
            allow: None,
        })
        .ok()
}

/// `WEBHOOK_SECRETS` for every provider of their tenants, and `WEBHOOK_CONFIG`'s entries
/// above them for their tenant and provider.
fn signature_verifier(config: &Config) -> SignatureVerifier {
    let verifier = config
        .webhook_secrets
        .iter()
        .fold(SignatureVerifier::new(Arc::new(SystemClock)), |v, (tenant, secret)| {
            v.with_tenant_secret(tenant.clone(), secret.clone())
        });
    config.webhook_endpoints.iter().fold(verifier, |v, entry| {
        v.with_endpoint(entry.tenant.clone(), entry.provider.clone(), entry.endpoint.clone())
    })
}

/// Binds the client listener with [`LISTEN_BACKLOG`].
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket =
        if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    // As std's listeners do: a restarted instance binds while old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Closes every connection with 1001, in batches spread over `over`, so clients reconnect to
/// other instances without arriving all at once.
async fn drain(realtime: &Realtime, over: Duration) {
    const STEP: Duration = Duration::from_millis(100);
    let steps = (over.as_millis() / STEP.as_millis()).max(1) as usize;
    let batch = realtime.connections().div_ceil(steps).max(1);
    let started = tokio::time::Instant::now();
    while started.elapsed() < over && realtime.close_batch(batch, CloseReason::GoingAway) > 0 {
        tokio::time::sleep(STEP).await;
    }
}

/// How often channel positions are checked after the broker link was interrupted; also the
/// time messages in flight get to arrive before a channel counts as having missed them.
const POSITION_CHECK_PERIOD: Duration = Duration::from_secs(1);

/// How often the instance sends its figures to every instance for the cluster-wide statistics.
const STATS_PERIOD: Duration = Duration::from_secs(1);

/// How often every connection's time limits are checked and heartbeats sent when due.
const SWEEP_PERIOD: Duration = Duration::from_millis(250);

/// Runs `job` every `period` (a late run delays the next ones rather than bunching them) until
/// the returned task is aborted.
fn every<F, Fut>(period: Duration, realtime: &Arc<Realtime>, job: F) -> tokio::task::JoinHandle<()>
where
    F: Fn(Arc<Realtime>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let realtime = realtime.clone();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            job(realtime.clone()).await;
        }
    })
}

/// Closes the connections whose token expired or that went idle or inactive.
fn sweep(realtime: &Realtime) {
    let report = realtime.sweep();
    if report.closed() > 0 {
        tracing::info!(
            token_expired = report.expired,
            idle = report.idle,
            inactive = report.inactive,
            "closed connections"
        );
    }
}
