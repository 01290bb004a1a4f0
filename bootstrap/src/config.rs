//! Configuration from the environment.
//!
//! Every variable is a named constant with its default beside it, parsed by
//! [`Config::from_lookup`] from any lookup function, so tests pass a map instead of touching
//! the process environment. Every problem is reported, one line each, naming the variable.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use adapters::outbound::history::HistorySettings;
use adapters::outbound::postgres::PostgresSettings;
use adapters::outbound::redis::RedisTarget;
use adapters::outbound::signatures::Secret;
use application::{ApiKeys, OpeningLimits, Settings};
use domain::{OriginPolicy, TenantId};

use crate::webhook_config::{self, WebhookEndpoint};

/// HTTP + WebSocket listen address; in demo mode, 127.0.0.1:8080 unless set.
pub const ENV_BIND_ADDR: &str = "BIND_ADDR";
pub const DEFAULT_BIND_ADDR: &str = "0.0.0.0:8080";
/// In demo mode (no token key): this machine only.
pub const DEFAULT_DEMO_BIND_ADDR: &str = "127.0.0.1:8080";
/// Every variable the configuration reads.
pub const VARIABLES: &[&str] = &[
    ENV_BIND_ADDR,
    ENV_JWT_SECRET_KEY,
    ENV_REDIS_URL,
    ENV_REDIS_POOL_SIZE,
    ENV_DATABASE_URL,
    ENV_DATABASE_POOL_SIZE,
    ENV_OUTBOX_TABLE,
    ENV_PERSIST_RETENTION_DAYS,
    ENV_REDIS_SENTINELS,
    ENV_REDIS_CLUSTER_NODES,
    ENV_REDIS_SENTINEL_MASTER,
    ENV_WEBHOOK_SECRETS,
    ENV_WEBHOOK_CONFIG,
    ENV_MAX_CONNECTIONS,
    ENV_MAX_OPENING_CONNECTIONS,
    ENV_OPENING_TIMEOUT_MS,
    ENV_PING_INTERVAL_SECS,
    ENV_IDLE_TIMEOUT_SECS,
    ENV_INACTIVITY_TIMEOUT_SECS,
    ENV_MAX_CONNECTIONS_PER_USER,
    ENV_MAX_SUBSCRIPTIONS_PER_CONNECTION,
    ENV_RATE_LIMIT_PER_SEC,
    ENV_RATE_LIMIT_BURST,
    ENV_MAX_MESSAGE_BYTES,
    ENV_OUTBOUND_QUEUE_BYTES,
    ENV_ALLOWED_ORIGINS,
    ENV_HEADER_READ_TIMEOUT_SECS,
    ENV_WEBHOOK_DEDUP_SECS,
    ENV_API_KEYS,
    ENV_PRESENCE,
    ENV_PRESENCE_TTL_SECS,
    ENV_CONSOLE,
    ENV_HOSTNAME,
    ENV_ADMIN,
    ENV_HISTORY_SIZE,
    ENV_HISTORY_TTL_SECS,
    ENV_METRICS_ADDR,
    ENV_DRAIN_GRACE_SECS,
    ENV_DRAIN_SECS,
    ENV_JWT_PUBLIC_KEY_FILE,
    ENV_JWT_ISSUER,
    ENV_JWT_AUDIENCE,
    ENV_JWT_LEEWAY_SECS,
    ENV_RUST_LOG,
    ENV_LOG_FORMAT,
];

/// HS256 secret for client tokens, at least [`MIN_JWT_SECRET_BYTES`] bytes.
pub const ENV_JWT_SECRET_KEY: &str = "JWT_SECRET_KEY";
pub const MIN_JWT_SECRET_BYTES: usize = 32;
/// Redis URL of the broker (`redis+cluster://host:port,…` for a Redis Cluster); unset (and no
/// Sentinel nor cluster) means the in-process broker.
pub const ENV_REDIS_URL: &str = "REDIS_URL";
/// Redis connections every command is pipelined over (to each master, on a cluster).
pub const ENV_REDIS_POOL_SIZE: &str = "REDIS_POOL_SIZE";
pub const DEFAULT_REDIS_POOL_SIZE: usize = 4;
/// PostgreSQL where every message with a position is kept (`postgres://…`); unset: no
/// persistence.
pub const ENV_DATABASE_URL: &str = "DATABASE_URL";
/// Connections to PostgreSQL per instance.
pub const ENV_DATABASE_POOL_SIZE: &str = "DATABASE_POOL_SIZE";
pub const DEFAULT_DATABASE_POOL_SIZE: usize = 16;
/// The outbox table backends write into (`lq_outbox`, created by the migrations, or a table of
/// the same columns); unset: no outbox consumed.
pub const ENV_OUTBOX_TABLE: &str = "OUTBOX_TABLE";
/// Days a kept message stays in PostgreSQL.
pub const ENV_PERSIST_RETENTION_DAYS: &str = "PERSIST_RETENTION_DAYS";
pub const DEFAULT_PERSIST_RETENTION_DAYS: u64 = 7;
/// Comma-separated `host:port` of Redis Sentinels; selects the Sentinel-managed master.
pub const ENV_REDIS_SENTINELS: &str = "REDIS_SENTINELS";
/// Comma-separated `host:port` of Redis Cluster nodes (any of them; the rest is discovered);
/// selects the cluster broker with sharded Pub/Sub. `REDIS_URL=redis+cluster://host:port,…`
/// is the same.
pub const ENV_REDIS_CLUSTER_NODES: &str = "REDIS_CLUSTER_NODES";
/// The `REDIS_URL` scheme that names cluster nodes.
pub const CLUSTER_URL_SCHEME: &str = "redis+cluster://";
/// Name of the master the sentinels monitor.
pub const ENV_REDIS_SENTINEL_MASTER: &str = "REDIS_SENTINEL_MASTER";
/// JSON object mapping tenant id to webhook secret (`hmac-sha256`, every provider).
pub const ENV_WEBHOOK_SECRETS: &str = "WEBHOOK_SECRETS";
/// Path of the TOML file listing each tenant's webhook providers: scheme, secrets, tolerance,
/// body limit. Its entries win over `WEBHOOK_SECRETS` for their tenant and provider.
pub const ENV_WEBHOOK_CONFIG: &str = "WEBHOOK_CONFIG";
/// WebSocket connections per instance.
pub const ENV_MAX_CONNECTIONS: &str = "MAX_CONNECTIONS";
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// WebSocket upgrades opening at once (reading positions, subscribing, recording presence).
pub const ENV_MAX_OPENING_CONNECTIONS: &str = "MAX_OPENING_CONNECTIONS";
pub const DEFAULT_MAX_OPENING_CONNECTIONS: usize = 128;
/// Milliseconds an upgrade waits for its turn to open before 503 `overloaded`.
pub const ENV_OPENING_TIMEOUT_MS: &str = "OPENING_TIMEOUT_MS";
pub const DEFAULT_OPENING_TIMEOUT_MS: u64 = 5000;
/// Seconds between heartbeat pings.
pub const ENV_PING_INTERVAL_SECS: &str = "PING_INTERVAL_SECS";
pub const DEFAULT_PING_INTERVAL_SECS: u64 = 25;
/// Seconds without any frame (pongs included) after which a connection is closed with 1001.
pub const ENV_IDLE_TIMEOUT_SECS: &str = "IDLE_TIMEOUT_SECS";
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 60;
/// Seconds without a data frame after which a connection is closed with 4003.
pub const ENV_INACTIVITY_TIMEOUT_SECS: &str = "INACTIVITY_TIMEOUT_SECS";
pub const DEFAULT_INACTIVITY_TIMEOUT_SECS: u64 = 3600;
/// Connections of one user on one instance; 0 for no limit.
pub const ENV_MAX_CONNECTIONS_PER_USER: &str = "MAX_CONNECTIONS_PER_USER";
/// Topic subscriptions one connection may hold; 0 for no limit.
pub const ENV_MAX_SUBSCRIPTIONS_PER_CONNECTION: &str = "MAX_SUBSCRIPTIONS_PER_CONNECTION";
pub const DEFAULT_MAX_SUBSCRIPTIONS_PER_CONNECTION: usize = 128;
/// Client frames per second per connection (token bucket rate); 0 for no limit.
pub const ENV_RATE_LIMIT_PER_SEC: &str = "RATE_LIMIT_PER_SEC";
pub const DEFAULT_RATE_LIMIT_PER_SEC: u32 = 50;
/// Client frames a connection may send at once (token bucket size).
pub const ENV_RATE_LIMIT_BURST: &str = "RATE_LIMIT_BURST";
pub const DEFAULT_RATE_LIMIT_BURST: u32 = 100;
/// Largest client message or frame, in bytes.
pub const ENV_MAX_MESSAGE_BYTES: &str = "MAX_MESSAGE_BYTES";
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 65_536;
/// Bytes of frames that may wait for one client before it is closed with 4008.
pub const ENV_OUTBOUND_QUEUE_BYTES: &str = "OUTBOUND_QUEUE_BYTES";
pub const DEFAULT_OUTBOUND_QUEUE_BYTES: usize = 1_048_576;
/// Comma-separated origins allowed to open a WebSocket from a browser; unset: every origin.
pub const ENV_ALLOWED_ORIGINS: &str = "ALLOWED_ORIGINS";
/// Seconds a client has to send a complete request head.
pub const ENV_HEADER_READ_TIMEOUT_SECS: &str = "HEADER_READ_TIMEOUT_SECS";
pub const DEFAULT_HEADER_READ_TIMEOUT_SECS: u64 = 10;
/// Seconds a webhook delivery id is remembered, so a retried delivery is not relayed twice;
/// 0 turns deduplication off.
pub const ENV_WEBHOOK_DEDUP_SECS: &str = "WEBHOOK_DEDUP_SECS";
pub const DEFAULT_WEBHOOK_DEDUP_SECS: u64 = 86_400;
/// Comma-separated keys of the server API (`Authorization: Bearer <key>`); unset: the API
/// refuses every call.
pub const ENV_API_KEYS: &str = "API_KEYS";
/// Shortest accepted API key.
pub const MIN_API_KEY_LEN: usize = 16;
/// `on` (default) or `off`: who is online in each tenant, with join and leave announcements.
pub const ENV_PRESENCE: &str = "PRESENCE";
/// Seconds after which the users of an instance that stopped refreshing them (it crashed)
/// leave.
pub const ENV_PRESENCE_TTL_SECS: &str = "PRESENCE_TTL_SECS";
pub const DEFAULT_PRESENCE_TTL_SECS: u64 = 30;
/// `on` or `off`: the browser console at `/`. Default: `on` in demo mode (no
/// `JWT_SECRET_KEY` nor `JWT_PUBLIC_KEY_FILE`), `off` otherwise.
pub const ENV_CONSOLE: &str = "CONSOLE";
/// The instance's host name in the cluster statistics; container runtimes set it.
pub const ENV_HOSTNAME: &str = "HOSTNAME";
/// `on` or `off`: the operators' dashboard at `/admin`. Default: `on` in demo mode, `off`
/// otherwise; `on` outside demo mode needs `API_KEYS`.
pub const ENV_ADMIN: &str = "ADMIN";
/// Messages kept per `tenant:` and `user:` channel for reconnecting clients; 0 turns history
/// and message offsets off.
pub const ENV_HISTORY_SIZE: &str = "HISTORY_SIZE";
pub const DEFAULT_HISTORY_SIZE: usize = 100;
/// Seconds a message stays in its channel's history.
pub const ENV_HISTORY_TTL_SECS: &str = "HISTORY_TTL_SECS";
pub const DEFAULT_HISTORY_TTL_SECS: u64 = 3600;
/// Separate `host:port` for `GET /metrics`; unset: served on `BIND_ADDR`.
pub const ENV_METRICS_ADDR: &str = "METRICS_ADDR";
/// Seconds between turning `/ready` to 503 and closing the first client, on SIGTERM.
pub const ENV_DRAIN_GRACE_SECS: &str = "DRAIN_GRACE_SECS";
pub const DEFAULT_DRAIN_GRACE_SECS: u64 = 5;
/// Seconds over which clients are closed in batches, on SIGTERM.
pub const ENV_DRAIN_SECS: &str = "DRAIN_SECS";
pub const DEFAULT_DRAIN_SECS: u64 = 10;
/// PEM file of an RSA or EC public key verifying client tokens (RS256 or ES256).
pub const ENV_JWT_PUBLIC_KEY_FILE: &str = "JWT_PUBLIC_KEY_FILE";
/// When set, tokens must carry this `iss`.
pub const ENV_JWT_ISSUER: &str = "JWT_ISSUER";
/// When set, tokens' `aud` must contain this value.
pub const ENV_JWT_AUDIENCE: &str = "JWT_AUDIENCE";
/// Seconds of clock skew tolerated on `exp` and `nbf`.
pub const ENV_JWT_LEEWAY_SECS: &str = "JWT_LEEWAY_SECS";
pub const DEFAULT_JWT_LEEWAY_SECS: u64 = 5;
/// Log filter, in `tracing_subscriber::EnvFilter` syntax.
pub const ENV_RUST_LOG: &str = "RUST_LOG";
pub const DEFAULT_RUST_LOG: &str = "info";
/// `text` or `json`.
pub const ENV_LOG_FORMAT: &str = "LOG_FORMAT";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The HS256 secret for client tokens. Its `Debug` output never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct JwtSecret(Vec<u8>);

impl JwtSecret {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for JwtSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JwtSecret(<redacted>)")
    }
}

/// Which broker joins this instance to the others.
#[derive(Debug, Clone)]
pub enum BrokerConfig {
    /// No Redis configured: a single instance with the in-process broker.
    InProcess,
    /// Redis, reached directly, through Sentinel, or as a cluster.
    Redis { target: RedisTarget, pool_size: usize },
}

/// The validated configuration of one instance.
#[derive(Debug, Clone)]
pub struct Config {
    pub bind_addr: SocketAddr,
    /// `None` (and no public key file): an ephemeral secret is generated at start.
    pub jwt_secret: Option<JwtSecret>,
    pub jwt_public_key_file: Option<PathBuf>,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    pub broker: BrokerConfig,
    pub webhook_secrets: HashMap<TenantId, Secret>,
    /// The providers of `WEBHOOK_CONFIG`.
    pub webhook_endpoints: Vec<WebhookEndpoint>,
    /// Connection limits, timings, the token leeway, the origin rule and the opening turns.
    pub settings: Settings,
    pub max_message_bytes: usize,
    pub outbound_queue_bytes: usize,
    pub header_read_timeout: Duration,
    /// `None`: `/metrics` is served on `bind_addr`.
    pub metrics_addr: Option<SocketAddr>,
    pub drain_grace: Duration,
    /// `DRAIN_GRACE_SECS` was set: the grace is kept even with no connection open.
    pub drain_grace_set: bool,
    pub drain: Duration,
    /// History kept per `tenant:` and `user:` channel.
    pub history: HistorySettings,
    /// Presence on (`PRESENCE`), and how long an instance's entries live without a refresh.
    pub presence: bool,
    pub presence_ttl: Duration,
    /// The browser console at `/` (`CONSOLE`).
    pub console: bool,
    /// The operators' dashboard at `/admin` (`ADMIN`).
    pub admin: bool,
    /// The host name the statistics show for this instance (`HOSTNAME`).
    pub hostname: Option<String>,
    /// Where messages are kept durably (`DATABASE_URL`); `None`: no persistence.
    pub database: Option<PostgresSettings>,
    /// The outbox table consumed (`OUTBOX_TABLE`, with `DATABASE_URL` only).
    pub outbox_table: Option<String>,
    pub log_filter: String,
    pub log_format: LogFormat,
}

/// One configuration problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub variable: &'static str,
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.variable, self.problem)
    }
}

/// Every configuration problem found, one per line when displayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&lines.join("\n"))
    }
}

struct Reader<F> {
    lookup: F,
    errors: Vec<ConfigError>,
}

impl<F: Fn(&str) -> Option<String>> Reader<F> {
    /// The variable's value; empty counts as unset.
    fn get(&self, variable: &str) -> Option<String> {
        (self.lookup)(variable).filter(|v| !v.trim().is_empty())
    }

    fn fail(&mut self, variable: &'static str, problem: impl Into<String>) {
        self.errors.push(ConfigError { variable, problem: problem.into() });
    }

    fn parse<T>(
        &mut self,
        variable: &'static str,
        default: T,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> T {
        let Some(raw) = self.get(variable) else { return default };
        parse(raw.trim()).unwrap_or_else(|problem| {
            self.fail(variable, problem);
            default
        })
    }
}

/// `host:port[,host:port…]`, each problem reported against `variable`.
fn host_ports<F: Fn(&str) -> Option<String>>(
    r: &mut Reader<F>,
    variable: &'static str,
    list: &str,
) -> Vec<String> {
    let mut nodes = Vec::new();
    for entry in list.split(',').map(str::trim) {
        match entry.rsplit_once(':') {
            Some((host, port))
                if !host.is_empty()
                    && !host.contains(['/', '@', ' '])
                    && port.parse::<u16>().is_ok_and(|p| p > 0) =>
            {
                nodes.push(entry.to_owned());
            }
            _ => r.fail(
                variable,
                format!("expected host:port[,host:port…] (no scheme, no password), got {entry:?}"),
            ),
        }
    }
    nodes
}

fn broker<F: Fn(&str) -> Option<String>>(r: &mut Reader<F>) -> BrokerConfig {
    let mut url = r.get(ENV_REDIS_URL).map(|raw| raw.trim().to_owned());
    let sentinels = r.get(ENV_REDIS_SENTINELS);
    let master = r.get(ENV_REDIS_SENTINEL_MASTER).map(|m| m.trim().to_owned());
    let pool_size = r.parse(ENV_REDIS_POOL_SIZE, DEFAULT_REDIS_POOL_SIZE, positive::<usize>);
    let mut cluster =
        r.get(ENV_REDIS_CLUSTER_NODES).map(|raw| (ENV_REDIS_CLUSTER_NODES, raw.trim().to_owned()));
    if let Some(nodes) = url.as_deref().and_then(|u| u.strip_prefix(CLUSTER_URL_SCHEME)) {
        if cluster.is_some() {
            r.fail(
                ENV_REDIS_URL,
                format!("set either {ENV_REDIS_URL} or {ENV_REDIS_CLUSTER_NODES}, not both"),
            );
        }
        cluster = Some((ENV_REDIS_URL, nodes.to_owned()));
        url = None;
    }
    if let Some((variable, list)) = cluster {
        let nodes = host_ports(r, variable, &list);
        for (set, name) in [(url.is_some(), ENV_REDIS_URL), (sentinels.is_some(), ENV_REDIS_SENTINELS)] {
            if set {
                r.fail(name, format!("set either {name} or a Redis Cluster ({variable}), not both"));
            }
        }
        if master.is_some() {
            r.fail(ENV_REDIS_SENTINEL_MASTER, format!("only used with {ENV_REDIS_SENTINELS}"));
        }
        return BrokerConfig::Redis { target: RedisTarget::Cluster { nodes }, pool_size };
    }
    if let Some(url) = &url {
        if url.starts_with("rediss://") {
            r.fail(ENV_REDIS_URL, "rediss:// (Redis over TLS) is not supported by this build; use redis://");
        } else if !url.starts_with("redis://") {
            r.fail(ENV_REDIS_URL, "expected a redis:// URL such as redis://redis:6379");
        }
    }
    let target = match (url, sentinels, master) {
        (None, None, None) => return BrokerConfig::InProcess,
        (Some(_), Some(_), _) => {
            r.fail(ENV_REDIS_URL, format!("set either {ENV_REDIS_URL} or {ENV_REDIS_SENTINELS}, not both"));
            return BrokerConfig::InProcess;
        }
        (Some(url), None, master) => {
            if master.is_some() {
                r.fail(ENV_REDIS_SENTINEL_MASTER, format!("only used with {ENV_REDIS_SENTINELS}"));
            }
            RedisTarget::Url(url)
        }
        (None, Some(list), master) => {
            let sentinels = host_ports(r, ENV_REDIS_SENTINELS, &list);
            let Some(master) = master else {
                r.fail(ENV_REDIS_SENTINEL_MASTER, format!("required with {ENV_REDIS_SENTINELS}"));
                return BrokerConfig::InProcess;
            };
            if master.chars().any(char::is_whitespace) {
                r.fail(ENV_REDIS_SENTINEL_MASTER, "must not contain whitespace");
            }
            RedisTarget::Sentinel { sentinels, master }
        }
        (None, None, Some(_)) => {
            r.fail(ENV_REDIS_SENTINEL_MASTER, format!("only used with {ENV_REDIS_SENTINELS}"));
            return BrokerConfig::InProcess;
        }
    };
    BrokerConfig::Redis { target, pool_size }
}

fn positive<T: std::str::FromStr + PartialOrd + From<u8>>(raw: &str) -> Result<T, String> {
    match raw.parse::<T>() {
        Ok(n) if n >= T::from(1) => Ok(n),
        _ => Err(format!("expected a positive whole number, got {raw:?}")),
    }
}

/// A whole number, zero included.
fn whole<T: std::str::FromStr>(raw: &str) -> Result<T, String> {
    raw.parse::<T>().map_err(|_| format!("expected a whole number (0 or more), got {raw:?}"))
}

/// `scheme://host[:port]` entries, compared exactly; no wildcards.
fn origins(raw: &str) -> Result<HashSet<String>, String> {
    let mut set = HashSet::new();
    for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let rest = entry.strip_prefix("https://").or_else(|| entry.strip_prefix("http://"));
        match rest {
            Some(host) if !host.is_empty() && !host.contains(['/', '*', '?', '#', ' ']) => {
                set.insert(entry.to_owned());
            }
            _ => {
                return Err(format!(
                    "expected comma-separated origins such as https://app.example.com (scheme and host, no path, no wildcard), got {entry:?}"
                ));
            }
        }
    }
    if set.is_empty() {
        return Err("lists no origin".to_owned());
    }
    Ok(set)
}

fn api_keys(raw: &str) -> Result<ApiKeys, String> {
    let keys: Vec<&str> = raw.split(',').map(str::trim).collect();
    let mut problems = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        if key.len() < MIN_API_KEY_LEN {
            problems.push(format!("key {} is shorter than {MIN_API_KEY_LEN} characters", i + 1));
        } else if !key.bytes().all(|b| b.is_ascii_graphic()) {
            problems.push(format!("key {} holds characters other than printable ASCII", i + 1));
        }
    }
    if problems.is_empty() { Ok(ApiKeys::new(keys)) } else { Err(problems.join("; ")) }
}

fn webhook_secrets(raw: &str) -> Result<HashMap<TenantId, Secret>, String> {
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(raw).map_err(|e| {
        format!("expected a JSON object mapping tenant id to secret, e.g. {{\"acme\":\"s3cret\"}}: {e}")
    })?;
    let mut secrets = HashMap::with_capacity(map.len());
    let mut problems = Vec::new();
    for (tenant, secret) in map {
        match (TenantId::parse(&tenant), secret) {
            (Err(e), _) => problems.push(format!("key {tenant:?}: {e}")),
            (Ok(_), serde_json::Value::String(s)) if s.is_empty() => {
                problems.push(format!("tenant {tenant:?}: secret is empty"));
            }
            (Ok(id), serde_json::Value::String(s)) => {
                secrets.insert(id, Secret::new(s));
            }
            (Ok(_), _) => problems.push(format!("tenant {tenant:?}: secret must be a string")),
        }
    }
    if problems.is_empty() { Ok(secrets) } else { Err(problems.join("; ")) }
}

/// Reads and parses the webhook configuration file at `path`; each problem names the file and
/// its line.
fn webhook_endpoints(path: &str) -> Result<Vec<WebhookEndpoint>, Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| vec![format!("cannot read {path}: {e}")])?;
    webhook_config::parse(&text)
        .map_err(|problems| problems.into_iter().map(|p| format!("{path} {p}")).collect())
}

/// `on` or `off`.
fn on_off(raw: &str) -> Result<bool, String> {
    match raw {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("expected on or off, got {other:?}")),
    }
}

/// An address to listen on: `IP:port`, or `localhost:port` for 127.0.0.1 (no other host name is
/// resolved).
pub(crate) fn listen_addr(raw: &str) -> Option<SocketAddr> {
    match raw.strip_prefix("localhost:") {
        Some(port) => port.parse::<u16>().ok().map(|port| SocketAddr::from(([127, 0, 0, 1], port))),
        None => raw.parse().ok(),
    }
}

/// Parses `JWT_SECRET_KEY` alone, for commands that need nothing else.
///
/// # Errors
/// [`ConfigError`] when the secret is set but shorter than 32 bytes.
pub fn jwt_secret_from_lookup(
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Option<JwtSecret>, ConfigError> {
    match lookup(ENV_JWT_SECRET_KEY) {
        None => Ok(None),
        Some(secret) if secret.len() < MIN_JWT_SECRET_BYTES => Err(ConfigError {
            variable: ENV_JWT_SECRET_KEY,
            problem: format!(
                "too short: {} bytes, at least {MIN_JWT_SECRET_BYTES} required (e.g. `openssl rand -hex 32`)",
                secret.len()
            ),
        }),
        Some(secret) => Ok(Some(JwtSecret::new(secret.into_bytes()))),
    }
}

impl Config {
    /// Reads the configuration through `lookup` (`std::env::var` in production).
    ///
    /// # Errors
    /// [`ConfigErrors`] listing every problem, one per variable.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigErrors> {
        let mut r = Reader { lookup, errors: Vec::new() };
        let demo_mode = r.get(ENV_JWT_SECRET_KEY).is_none() && r.get(ENV_JWT_PUBLIC_KEY_FILE).is_none();
        // A demo hands out tokens and a server API key: to this machine only, unless asked.
        let fallback_addr = (if demo_mode { DEFAULT_DEMO_BIND_ADDR } else { DEFAULT_BIND_ADDR })
            .parse()
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080)));
        let bind_addr = r.parse(ENV_BIND_ADDR, fallback_addr, |raw| {
            listen_addr(raw).ok_or_else(|| {
                format!("expected IP:port such as {DEFAULT_BIND_ADDR} or 127.0.0.1:8080 (or localhost:8080), got {raw:?}")
            })
        });
        // An empty secret is refused, not taken as unset: it is almost always a missing
        // variable in a deployment template.
        let jwt_secret = jwt_secret_from_lookup(&r.lookup).unwrap_or_else(|error| {
            r.errors.push(error);
            None
        });
        let broker = broker(&mut r);
        let webhook_secrets = r.parse(ENV_WEBHOOK_SECRETS, HashMap::new(), webhook_secrets);
        let webhook_endpoints = r.get(ENV_WEBHOOK_CONFIG).map_or_else(Vec::new, |path| {
            webhook_endpoints(path.trim()).unwrap_or_else(|problems| {
                for problem in problems {
                    r.fail(ENV_WEBHOOK_CONFIG, problem);
                }
                Vec::new()
            })
        });
        let api_keys = r.parse(ENV_API_KEYS, ApiKeys::default(), api_keys);
        let presence = r.parse(ENV_PRESENCE, true, on_off);
        let console = r.parse(ENV_CONSOLE, demo_mode, on_off);
        let admin = r.parse(ENV_ADMIN, demo_mode, on_off);
        if admin && !demo_mode && api_keys.is_empty() {
            r.fail(ENV_ADMIN, format!("needs {ENV_API_KEYS}: the dashboard signs in with a server API key"));
        }
        let hostname = r.get(ENV_HOSTNAME).map(|host| host.trim().to_owned());
        let database_pool = r.parse(ENV_DATABASE_POOL_SIZE, DEFAULT_DATABASE_POOL_SIZE, positive::<usize>);
        let retention_days = r.parse(ENV_PERSIST_RETENTION_DAYS, DEFAULT_PERSIST_RETENTION_DAYS, |raw| {
            positive::<u64>(raw)
                .ok()
                .filter(|n| *n <= 36_500)
                .ok_or_else(|| format!("expected 1 to 36500 days, got {raw:?}"))
        });
        let database = r.get(ENV_DATABASE_URL).and_then(|url| {
            let url = url.trim().to_owned();
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                r.fail(ENV_DATABASE_URL, "expected postgres://user:password@host:port/database".to_owned());
                return None;
            }
            let mut settings = PostgresSettings::new(url);
            settings.pool_size = database_pool;
            settings.retention = Duration::from_secs(retention_days.saturating_mul(86_400));
            Some(settings)
        });
        let outbox_table = r.get(ENV_OUTBOX_TABLE).map(|t| t.trim().to_owned()).filter(|table| {
            if !adapters::outbound::postgres::outbox::valid_table(table) {
                r.fail(
                    ENV_OUTBOX_TABLE,
                    format!(
                        "expected a table name of a-z, 0-9 and _ (optionally schema.table), got {table:?}"
                    ),
                );
                return false;
            }
            if database.is_none() {
                r.fail(
                    ENV_OUTBOX_TABLE,
                    format!("needs {ENV_DATABASE_URL}: the outbox is a PostgreSQL table"),
                );
                return false;
            }
            true
        });
        let presence_ttl = r.parse(ENV_PRESENCE_TTL_SECS, DEFAULT_PRESENCE_TTL_SECS, |raw| {
            positive::<u64>(raw)
                .ok()
                .filter(|n| (3..=3600).contains(n))
                .ok_or_else(|| format!("expected 3 to 3600 seconds, got {raw:?}"))
        });
        let jwt_public_key_file = r.get(ENV_JWT_PUBLIC_KEY_FILE).map(|p| PathBuf::from(p.trim()));
        if jwt_public_key_file.is_some() && (r.lookup)(ENV_JWT_SECRET_KEY).is_some() {
            r.fail(
                ENV_JWT_PUBLIC_KEY_FILE,
                format!("set either {ENV_JWT_SECRET_KEY} or {ENV_JWT_PUBLIC_KEY_FILE}, not both"),
            );
        }
        let jwt_issuer = r.get(ENV_JWT_ISSUER).map(|v| v.trim().to_owned());
        let jwt_audience = r.get(ENV_JWT_AUDIENCE).map(|v| v.trim().to_owned());
        let jwt_leeway = r.parse(ENV_JWT_LEEWAY_SECS, DEFAULT_JWT_LEEWAY_SECS, |raw| {
            raw.parse::<u64>()
                .ok()
                .filter(|n| *n <= 600)
                .ok_or_else(|| format!("expected 0 to 600 seconds, got {raw:?}"))
        });
        let allowed_origins = r.get(ENV_ALLOWED_ORIGINS).and_then(|raw| match origins(&raw) {
            Ok(set) => Some(set),
            Err(problem) => {
                r.fail(ENV_ALLOWED_ORIGINS, problem);
                None
            }
        });
        let max_connections = r.parse(ENV_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS, positive::<usize>);
        let per_user = r.parse(ENV_MAX_CONNECTIONS_PER_USER, 0, whole::<usize>);
        let max_subscriptions = r.parse(
            ENV_MAX_SUBSCRIPTIONS_PER_CONNECTION,
            DEFAULT_MAX_SUBSCRIPTIONS_PER_CONNECTION,
            whole::<usize>,
        );
        let max_opening =
            r.parse(ENV_MAX_OPENING_CONNECTIONS, DEFAULT_MAX_OPENING_CONNECTIONS, positive::<usize>);
        let opening_ms = r.parse(ENV_OPENING_TIMEOUT_MS, DEFAULT_OPENING_TIMEOUT_MS, positive::<u64>);
        let ping_secs = r.parse(ENV_PING_INTERVAL_SECS, DEFAULT_PING_INTERVAL_SECS, positive::<u64>);
        let idle_secs = r.parse(ENV_IDLE_TIMEOUT_SECS, DEFAULT_IDLE_TIMEOUT_SECS, positive::<u64>);
        if idle_secs <= ping_secs {
            r.fail(
                ENV_IDLE_TIMEOUT_SECS,
                format!("must be greater than {ENV_PING_INTERVAL_SECS} ({ping_secs}), or live clients are closed between two pings"),
            );
        }
        let inactivity_secs =
            r.parse(ENV_INACTIVITY_TIMEOUT_SECS, DEFAULT_INACTIVITY_TIMEOUT_SECS, positive::<u64>);
        let rate = r.parse(ENV_RATE_LIMIT_PER_SEC, DEFAULT_RATE_LIMIT_PER_SEC, whole::<u32>);
        let burst = r.parse(ENV_RATE_LIMIT_BURST, DEFAULT_RATE_LIMIT_BURST, positive::<u32>);
        let max_message_bytes = r.parse(ENV_MAX_MESSAGE_BYTES, DEFAULT_MAX_MESSAGE_BYTES, |raw| {
            positive::<usize>(raw)
                .ok()
                .filter(|n| (1024..=16 * 1024 * 1024).contains(n))
                .ok_or_else(|| format!("expected 1024 to 16777216 bytes, got {raw:?}"))
        });
        let outbound_queue_bytes = r.parse(ENV_OUTBOUND_QUEUE_BYTES, DEFAULT_OUTBOUND_QUEUE_BYTES, |raw| {
            positive::<usize>(raw)
                .ok()
                .filter(|n| *n >= 4096)
                .ok_or_else(|| format!("expected at least 4096 bytes, got {raw:?}"))
        });
        let header_secs =
            r.parse(ENV_HEADER_READ_TIMEOUT_SECS, DEFAULT_HEADER_READ_TIMEOUT_SECS, positive::<u64>);
        let metrics_addr = r.get(ENV_METRICS_ADDR).and_then(|raw| match listen_addr(raw.trim()) {
            Some(addr) => Some(addr),
            None => {
                r.fail(
                    ENV_METRICS_ADDR,
                    format!("expected IP:port such as 0.0.0.0:9090 (or localhost:9090), got {raw:?}"),
                );
                None
            }
        });
        let drain_grace = r.parse(ENV_DRAIN_GRACE_SECS, DEFAULT_DRAIN_GRACE_SECS, whole::<u64>);
        let drain_grace_set = r.get(ENV_DRAIN_GRACE_SECS).is_some();
        let drain = r.parse(ENV_DRAIN_SECS, DEFAULT_DRAIN_SECS, whole::<u64>);
        let webhook_dedup_secs = r.parse(ENV_WEBHOOK_DEDUP_SECS, DEFAULT_WEBHOOK_DEDUP_SECS, |raw| {
            whole::<u64>(raw)
                .ok()
                .filter(|n| *n <= 2_592_000)
                .ok_or_else(|| format!("expected 0 to 2592000 seconds (30 days), got {raw:?}"))
        });
        let history_size = r.parse(ENV_HISTORY_SIZE, DEFAULT_HISTORY_SIZE, |raw| {
            whole::<usize>(raw)
                .ok()
                .filter(|n| *n <= 10_000)
                .ok_or_else(|| format!("expected 0 to 10000 messages, got {raw:?}"))
        });
        let history_ttl = r.parse(ENV_HISTORY_TTL_SECS, DEFAULT_HISTORY_TTL_SECS, |raw| {
            positive::<u64>(raw)
                .ok()
                .filter(|n| *n <= 2_592_000)
                .ok_or_else(|| format!("expected 1 to 2592000 seconds (30 days), got {raw:?}"))
        });
        if drain_grace + drain > 300 {
            r.fail(
                ENV_DRAIN_SECS,
                format!("{ENV_DRAIN_GRACE_SECS} + {ENV_DRAIN_SECS} must not exceed 300 seconds"),
            );
        }
        let log_filter = r.get(ENV_RUST_LOG).unwrap_or_else(|| DEFAULT_RUST_LOG.to_owned());
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log_filter) {
            r.fail(ENV_RUST_LOG, format!("invalid filter: {e}"));
        }
        let log_format = r.parse(ENV_LOG_FORMAT, LogFormat::Text, |raw| match raw {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("expected text or json, got {other:?}")),
        });
        if !r.errors.is_empty() {
            return Err(ConfigErrors(r.errors));
        }
        Ok(Self {
            bind_addr,
            jwt_secret,
            jwt_public_key_file,
            jwt_issuer,
            jwt_audience,
            broker,
            webhook_secrets,
            webhook_endpoints,
            settings: Settings {
                max_connections,
                max_connections_per_user: per_user,
                max_subscriptions_per_connection: max_subscriptions,
                ping_interval_ms: ping_secs.saturating_mul(1000),
                idle_timeout_ms: idle_secs.saturating_mul(1000),
                inactivity_timeout_ms: inactivity_secs.saturating_mul(1000),
                rate_per_sec: rate,
                rate_burst: burst,
                token_leeway_secs: jwt_leeway,
                // The replay is queued at once: it must leave room in the outbound queue.
                max_replay_bytes: outbound_queue_bytes / 2,
                api_keys,
                // 0: no deduplication.
                webhook_dedup_secs,
                opening: OpeningLimits {
                    origins: allowed_origins.map_or(OriginPolicy::Any, OriginPolicy::Only),
                    concurrent: max_opening,
                    timeout: Duration::from_millis(opening_ms),
                },
                // Drawn when the application is built.
                instance: application::InstanceInfo::default(),
            },
            max_message_bytes,
            outbound_queue_bytes,
            header_read_timeout: Duration::from_secs(header_secs),
            metrics_addr,
            drain_grace: Duration::from_secs(drain_grace),
            drain_grace_set,
            drain: Duration::from_secs(drain),
            history: HistorySettings { size: history_size, ttl: Duration::from_secs(history_ttl) },
            presence,
            presence_ttl: Duration::from_secs(presence_ttl),
            console,
            admin,
            hostname,
            database,
            outbox_table,
            log_filter,
            log_format,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(vars: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        let map: HashMap<String, String> =
            vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Config::from_lookup(|key| map.get(key).cloned())
    }

    #[test]
    fn no_configuration_at_all_gives_the_documented_defaults() {
        let config = parse(&[]).expect("valid");
        assert_eq!(config.bind_addr.to_string(), DEFAULT_DEMO_BIND_ADDR, "no token key: demo mode");
        assert_eq!(config.jwt_secret, None);
        assert!(matches!(config.broker, BrokerConfig::InProcess));
        assert!(config.webhook_secrets.is_empty());
        assert_eq!(config.settings.max_connections, 10_000);
        assert_eq!(config.settings.max_connections_per_user, 0);
        assert_eq!(config.settings.max_subscriptions_per_connection, 128);
        assert_eq!(config.settings.ping_interval_ms, 25_000);
        assert_eq!(config.settings.idle_timeout_ms, 60_000);
        assert_eq!(config.settings.inactivity_timeout_ms, 3_600_000);
        assert_eq!((config.settings.rate_per_sec, config.settings.rate_burst), (50, 100));
        assert_eq!(config.settings.token_leeway_secs, 5);
        assert_eq!(config.max_message_bytes, 65_536);
        assert_eq!(config.outbound_queue_bytes, 1_048_576);
        assert_eq!(config.settings.max_replay_bytes, 524_288);
        assert_eq!(config.history, HistorySettings { size: 100, ttl: Duration::from_secs(3600) });
        assert_eq!(config.header_read_timeout, Duration::from_secs(10));
        let opening = &config.settings.opening;
        assert_eq!((opening.concurrent, opening.timeout), (128, Duration::from_secs(5)));
        assert_eq!(opening.origins, OriginPolicy::Any);
        assert!(
            config.jwt_issuer.is_none()
                && config.jwt_audience.is_none()
                && config.jwt_public_key_file.is_none()
        );
        assert_eq!(config.log_filter, "info");
        assert_eq!(config.log_format, LogFormat::Text);
    }

    #[test]
    fn every_variable_is_read() {
        let config = parse(&[
            (ENV_BIND_ADDR, "127.0.0.1:9000"),
            (ENV_JWT_SECRET_KEY, "0123456789abcdef0123456789abcdef"),
            (ENV_REDIS_URL, "redis://127.0.0.1:6380/0"),
            (ENV_WEBHOOK_SECRETS, r#"{"acme":"s3cret","globex":"other"}"#),
            (ENV_MAX_CONNECTIONS, "5"),
            (ENV_IDLE_TIMEOUT_SECS, "90"),
            (ENV_ALLOWED_ORIGINS, "https://app.example.com, http://localhost:3000"),
            (ENV_MAX_CONNECTIONS_PER_USER, "3"),
            (ENV_MAX_SUBSCRIPTIONS_PER_CONNECTION, "5"),
            (ENV_MAX_OPENING_CONNECTIONS, "16"),
            (ENV_OPENING_TIMEOUT_MS, "250"),
            (ENV_RATE_LIMIT_PER_SEC, "0"),
            (ENV_RUST_LOG, "debug,hyper=info"),
            (ENV_LOG_FORMAT, "json"),
            (ENV_API_KEYS, "first-key-0123456789, second-key-0123456789"),
        ])
        .expect("valid");
        assert!(config.settings.api_keys.accepts(b"second-key-0123456789"), "keys are trimmed");
        assert!(!format!("{config:?}").contains("first-key"), "keys never show in debug output");
        assert_eq!(config.bind_addr.to_string(), "127.0.0.1:9000");
        assert_eq!(config.jwt_secret.map(|s| s.as_bytes().len()), Some(32));
        assert!(matches!(
            config.broker,
            BrokerConfig::Redis { target: RedisTarget::Url(url), pool_size: 4 } if url == "redis://127.0.0.1:6380/0"
        ));
        assert_eq!(config.webhook_secrets.len(), 2);
        assert_eq!(config.settings.max_connections, 5);
        assert_eq!(config.settings.idle_timeout_ms, 90_000);
        assert_eq!(config.settings.max_connections_per_user, 3);
        assert_eq!(config.settings.max_subscriptions_per_connection, 5);
        assert_eq!(
            (config.settings.opening.concurrent, config.settings.opening.timeout),
            (16, Duration::from_millis(250))
        );
        assert_eq!(config.settings.rate_per_sec, 0);
        assert!(matches!(&config.settings.opening.origins, OriginPolicy::Only(o) if o.len() == 2));
        assert_eq!(config.log_format, LogFormat::Json);
    }

    #[test]
    fn every_problem_is_reported_on_its_own_line_naming_its_variable() {
        let errors = parse(&[
            (ENV_BIND_ADDR, "nowhere"),
            (ENV_JWT_SECRET_KEY, "short"),
            (ENV_REDIS_URL, "rediss://x"),
            (ENV_WEBHOOK_SECRETS, "{not json"),
            (ENV_MAX_CONNECTIONS, "0"),
            (ENV_IDLE_TIMEOUT_SECS, "-1"),
            (ENV_RUST_LOG, "[[["),
            (ENV_LOG_FORMAT, "yaml"),
        ])
        .expect_err("invalid");
        let text = errors.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 8, "{text}");
        for (line, variable) in lines.iter().zip([
            ENV_BIND_ADDR,
            ENV_JWT_SECRET_KEY,
            ENV_REDIS_URL,
            ENV_WEBHOOK_SECRETS,
            ENV_MAX_CONNECTIONS,
            ENV_IDLE_TIMEOUT_SECS,
            ENV_RUST_LOG,
            ENV_LOG_FORMAT,
        ]) {
            assert!(line.starts_with(&format!("{variable}: ")), "{line}");
        }
        assert!(!text.contains("short\""), "the secret itself is not echoed: {text}");
    }

    #[test]
    fn the_demo_listens_on_this_machine_only_unless_told_otherwise() {
        assert_eq!(parse(&[]).expect("valid").bind_addr, SocketAddr::from(([127, 0, 0, 1], 8080)));
        let secret = (ENV_JWT_SECRET_KEY, "0123456789abcdef0123456789abcdef");
        assert_eq!(parse(&[secret]).expect("valid").bind_addr, SocketAddr::from(([0, 0, 0, 0], 8080)));
        let everywhere = parse(&[(ENV_BIND_ADDR, "0.0.0.0:8080")]).expect("valid");
        assert_eq!(everywhere.bind_addr, SocketAddr::from(([0, 0, 0, 0], 8080)));
    }

    #[test]
    fn listen_addresses_are_ips_or_localhost() {
        let config =
            parse(&[(ENV_BIND_ADDR, "localhost:8181"), (ENV_METRICS_ADDR, "localhost:9191")]).expect("valid");
        assert_eq!(config.bind_addr, SocketAddr::from(([127, 0, 0, 1], 8181)));
        assert_eq!(config.metrics_addr, Some(SocketAddr::from(([127, 0, 0, 1], 9191))));
        let errors = parse(&[(ENV_BIND_ADDR, "example.com:8080")]).expect_err("not resolved");
        assert!(errors.to_string().contains("expected IP:port such as 0.0.0.0:8080"), "{errors}");
    }

    #[test]
    fn webhook_secrets_must_map_valid_tenants_to_non_empty_strings() {
        for bad in [r#"["acme"]"#, r#"{"a:b":"x"}"#, r#"{"acme":""}"#, r#"{"acme":5}"#] {
            let errors = parse(&[(ENV_WEBHOOK_SECRETS, bad)]).expect_err(bad);
            assert_eq!(errors.0.len(), 1);
            assert_eq!(errors.0[0].variable, ENV_WEBHOOK_SECRETS);
        }
    }

    #[test]
    fn sentinel_settings_select_the_sentinel_managed_master() {
        let config = parse(&[
            (ENV_REDIS_SENTINELS, "10.0.0.1:26379, sentinel-2:26379"),
            (ENV_REDIS_SENTINEL_MASTER, "mymaster"),
            (ENV_REDIS_POOL_SIZE, "16"),
        ])
        .expect("valid");
        match config.broker {
            BrokerConfig::Redis { target: RedisTarget::Sentinel { sentinels, master }, pool_size } => {
                assert_eq!(sentinels, ["10.0.0.1:26379", "sentinel-2:26379"]);
                assert_eq!(master, "mymaster");
                assert_eq!(pool_size, 16);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn the_console_is_on_by_default_only_in_demo_mode() {
        assert!(Config::from_lookup(|_| None).expect("valid").console);
        let secret = (ENV_JWT_SECRET_KEY, "0123456789abcdef0123456789abcdef");
        assert!(!parse(&[secret]).expect("valid").console, "a secret turns the demo off");
        assert!(parse(&[secret, (ENV_CONSOLE, "on")]).expect("valid").console);
        assert!(!parse(&[(ENV_CONSOLE, "off")]).expect("valid").console);
        assert!(parse(&[]).expect("valid").admin, "the dashboard is on in demo mode");
        assert!(!parse(&[secret]).expect("valid").admin);
        let errors = parse(&[secret, (ENV_ADMIN, "on")]).expect_err("no key to sign in with");
        assert!(errors.to_string().contains("ADMIN: needs API_KEYS"), "{errors}");
        let key = (ENV_API_KEYS, "an-api-key-of-16-bytes-or-more");
        assert!(parse(&[secret, key, (ENV_ADMIN, "on")]).expect("valid").admin);
        let errors = parse(&[(ENV_CONSOLE, "yes")]).expect_err("refused");
        assert_eq!(errors.0[0].to_string(), "CONSOLE: expected on or off, got \"yes\"");
    }

    #[test]
    fn cluster_nodes_select_the_cluster_broker_in_either_form() {
        for vars in [
            &[(ENV_REDIS_CLUSTER_NODES, "10.0.0.1:7000, redis-2:7001")][..],
            &[(ENV_REDIS_URL, "redis+cluster://10.0.0.1:7000,redis-2:7001")][..],
        ] {
            match parse(vars).expect("valid").broker {
                BrokerConfig::Redis { target: RedisTarget::Cluster { nodes }, .. } => {
                    assert_eq!(nodes, ["10.0.0.1:7000", "redis-2:7001"]);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn inconsistent_or_out_of_range_settings_are_refused_one_line_each() {
        for (vars, variable) in [
            (&[(ENV_REDIS_URL, "redis://a"), (ENV_REDIS_SENTINELS, "a:1")][..], ENV_REDIS_URL),
            (&[(ENV_REDIS_SENTINELS, "a:1")][..], ENV_REDIS_SENTINEL_MASTER),
            (&[(ENV_REDIS_SENTINEL_MASTER, "m")][..], ENV_REDIS_SENTINEL_MASTER),
            (&[(ENV_REDIS_SENTINELS, "a"), (ENV_REDIS_SENTINEL_MASTER, "m")][..], ENV_REDIS_SENTINELS),
            (&[(ENV_REDIS_SENTINELS, "a:0"), (ENV_REDIS_SENTINEL_MASTER, "m")][..], ENV_REDIS_SENTINELS),
            (&[(ENV_REDIS_URL, "redis://a"), (ENV_REDIS_POOL_SIZE, "0")][..], ENV_REDIS_POOL_SIZE),
            (&[(ENV_REDIS_CLUSTER_NODES, "a:1,b")][..], ENV_REDIS_CLUSTER_NODES),
            (&[(ENV_REDIS_CLUSTER_NODES, "a:1"), (ENV_REDIS_URL, "redis://a")][..], ENV_REDIS_URL),
            (&[(ENV_REDIS_CLUSTER_NODES, "a:1"), (ENV_REDIS_SENTINELS, "s:1")][..], ENV_REDIS_SENTINELS),
            (&[(ENV_REDIS_URL, "redis+cluster://a:1"), (ENV_REDIS_CLUSTER_NODES, "a:1")][..], ENV_REDIS_URL),
            (&[(ENV_REDIS_URL, "redis+cluster://a:0")][..], ENV_REDIS_URL),
            (&[(ENV_REDIS_CLUSTER_NODES, "redis://a:1")][..], ENV_REDIS_CLUSTER_NODES),
            (&[(ENV_REDIS_CLUSTER_NODES, "user:pw@a:1")][..], ENV_REDIS_CLUSTER_NODES),
            (&[(ENV_WEBHOOK_DEDUP_SECS, "2592001")][..], ENV_WEBHOOK_DEDUP_SECS),
            (&[(ENV_HISTORY_SIZE, "-1")][..], ENV_HISTORY_SIZE),
            (&[(ENV_API_KEYS, "short")][..], ENV_API_KEYS),
            (&[(ENV_PRESENCE, "yes")][..], ENV_PRESENCE),
            (&[(ENV_MAX_OPENING_CONNECTIONS, "0")][..], ENV_MAX_OPENING_CONNECTIONS),
            (&[(ENV_OPENING_TIMEOUT_MS, "soon")][..], ENV_OPENING_TIMEOUT_MS),
            (&[(ENV_PRESENCE_TTL_SECS, "2")][..], ENV_PRESENCE_TTL_SECS),
            (&[(ENV_API_KEYS, "0123456789abcdef,with space 0123456")][..], ENV_API_KEYS),
            (&[(ENV_HISTORY_SIZE, "10001")][..], ENV_HISTORY_SIZE),
            (&[(ENV_HISTORY_TTL_SECS, "0")][..], ENV_HISTORY_TTL_SECS),
            (&[(ENV_DRAIN_SECS, "400")][..], ENV_DRAIN_SECS),
            (&[(ENV_METRICS_ADDR, "metrics")][..], ENV_METRICS_ADDR),
            (&[(ENV_IDLE_TIMEOUT_SECS, "20")][..], ENV_IDLE_TIMEOUT_SECS),
            (&[(ENV_ALLOWED_ORIGINS, "*")][..], ENV_ALLOWED_ORIGINS),
            (&[(ENV_MAX_MESSAGE_BYTES, "100")][..], ENV_MAX_MESSAGE_BYTES),
        ] {
            let errors = parse(vars).expect_err("invalid");
            assert_eq!(errors.0.len(), 1, "{vars:?}: {errors}");
            assert_eq!(errors.0[0].variable, variable, "{vars:?}");
        }
    }

    #[test]
    fn an_empty_jwt_secret_is_refused_rather_than_replaced() {
        let errors = parse(&[(ENV_JWT_SECRET_KEY, "")]).expect_err("empty");
        assert_eq!(errors.0[0].variable, ENV_JWT_SECRET_KEY);
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let config = parse(&[
            (ENV_JWT_SECRET_KEY, "0123456789abcdef0123456789abcdef-topsecret"),
            (ENV_WEBHOOK_SECRETS, r#"{"acme":"webhook-topsecret"}"#),
            (ENV_REDIS_URL, "redis://:redis-topsecret@localhost"),
        ])
        .expect("valid");
        assert!(!format!("{config:?}").contains("topsecret"));
    }
}
