//! Command-line options.

use std::time::Duration;

pub(crate) const USAGE: &str = "\
lq-loadgen: load for lq-realtime; progress on stderr, one JSON report on stdout. Exits 0,
1 when it could not run or every message it published was refused (the first answer on
stderr), 2 for bad options.

  --help, --version     this text, or the version, on stdout

  --ws URL              WebSocket endpoint, e.g. ws://127.0.0.1:8080 (repeat: connections are
                        spread round-robin over every endpoint)
  --connections N       connections to open (default 1000)
  --connect-rate R      connections opened per second (default 1000)
  --tenants T           tenants bench0..bench{T-1} the connections are spread over (default 10)
  --sources K           client source addresses 127.0.0.1..127.0.0.K (default 1; ~28k
                        connections per source address and server port)
  --jwt-secret-key S    JWT_SECRET_KEY of the instances (default: $JWT_SECRET_KEY)
  --hold SECS           keep the connections idle this long before any load, and again after
                        subscribing when there are subscriptions (default 0)
  --topics N            topics t0..t{N-1} per tenant (default 0: no topic)
  --subscriptions S     topics each connection subscribes to, once every connection is open;
                        the subscribers of each topic are spread evenly (default 0)
  --load KIND           idle | webhook | message | redis | topic (default idle); topic: Redis
                        PUBLISH to the topics, round-robin over tenants and topics
  --messages M          messages to publish, spread over the tenants (default 0)
  --publish-rate P      messages published per second (default 1000)
  --payload-bytes B     padding added to every message (default 0)
  --webhook URL         webhook base URL, e.g. http://127.0.0.1:8080 (repeat to spread)
  --webhook-secrets J   WEBHOOK_SECRETS of the instances: a JSON object of every bench
                        tenant's secret (default: $WEBHOOK_SECRETS)
  --redis URL           Redis the instances use, for --load redis: redis://host:port, or
                        redis+cluster://host:port,host:port… for a Redis Cluster (SPUBLISH)
  --drain SECS          wait at most this long after the last publish for deliveries (default 5)
  --churn SECS          instead of holding connections: open and close connections at
                        --connect-rate for SECS
  --server-pid PID      an instance's pid: RSS and CPU are read from /proc (repeat)
  --metrics URL         an instance's /metrics URL: lq_connections is read at the end
                        (repeat)
";

/// How messages are published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Load {
    Idle,
    Webhook,
    Message,
    Redis,
    Topic,
}

#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) ws: Vec<String>,
    pub(crate) connections: usize,
    pub(crate) connect_rate: f64,
    pub(crate) tenants: usize,
    pub(crate) sources: u8,
    pub(crate) topics: usize,
    pub(crate) subscriptions: usize,
    pub(crate) secret: String,
    pub(crate) hold: Duration,
    pub(crate) load: Load,
    pub(crate) messages: u64,
    pub(crate) publish_rate: f64,
    pub(crate) payload_bytes: usize,
    pub(crate) webhook: Vec<String>,
    /// Per tenant name, its webhook secret.
    pub(crate) webhook_secrets: std::collections::HashMap<String, String>,
    pub(crate) redis: Option<String>,
    pub(crate) drain: Duration,
    pub(crate) churn: Option<Duration>,
    pub(crate) server_pids: Vec<u32>,
    pub(crate) metrics: Vec<String>,
}

/// A `WEBHOOK_SECRETS` value: a JSON object of tenant to secret.
fn secrets(raw: &str) -> Result<std::collections::HashMap<String, String>, String> {
    serde_json::from_str(raw)
        .map_err(|e| format!("expected a JSON object of tenant to secret, e.g. {{\"bench0\":\"s\"}}: {e}"))
}

fn number<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, String> {
    value.parse().map_err(|_| format!("{flag}: expected a number, got {value:?}"))
}

impl Options {
    /// Parses `args` (without the program name); `env` supplies defaults for secrets.
    pub(crate) fn parse(args: &[String], env: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let mut options = Self {
            ws: Vec::new(),
            connections: 1000,
            connect_rate: 1000.0,
            tenants: 10,
            sources: 1,
            topics: 0,
            subscriptions: 0,
            secret: env("JWT_SECRET_KEY").unwrap_or_default(),
            hold: Duration::ZERO,
            load: Load::Idle,
            messages: 0,
            publish_rate: 1000.0,
            payload_bytes: 0,
            webhook: Vec::new(),
            webhook_secrets: match env("WEBHOOK_SECRETS") {
                Some(raw) => secrets(&raw).map_err(|e| format!("$WEBHOOK_SECRETS: {e}"))?,
                None => std::collections::HashMap::new(),
            },
            redis: None,
            drain: Duration::from_secs(5),
            churn: None,
            server_pids: Vec::new(),
            metrics: Vec::new(),
        };
        let mut rest = args.iter();
        while let Some(flag) = rest.next() {
            let value = rest.next().ok_or_else(|| format!("{flag}: missing value"))?;
            let secs = |v: &str| number::<f64>(flag, v).map(Duration::from_secs_f64);
            match flag.as_str() {
                "--ws" => options.ws.push(value.trim_end_matches('/').to_owned()),
                "--connections" => options.connections = number(flag, value)?,
                "--connect-rate" => options.connect_rate = number(flag, value)?,
                "--tenants" => options.tenants = number(flag, value)?,
                "--sources" => options.sources = number(flag, value)?,
                "--topics" => options.topics = number(flag, value)?,
                "--subscriptions" => options.subscriptions = number(flag, value)?,
                "--jwt-secret-key" => options.secret.clone_from(value),
                "--hold" => options.hold = secs(value)?,
                "--load" => {
                    options.load = match value.as_str() {
                        "idle" => Load::Idle,
                        "webhook" => Load::Webhook,
                        "message" => Load::Message,
                        "redis" => Load::Redis,
                        "topic" => Load::Topic,
                        other => {
                            return Err(format!(
                                "--load: expected idle, webhook, message, redis or topic, got {other:?}"
                            ));
                        }
                    }
                }
                "--messages" => options.messages = number(flag, value)?,
                "--publish-rate" => options.publish_rate = number(flag, value)?,
                "--payload-bytes" => options.payload_bytes = number(flag, value)?,
                "--webhook" => options.webhook.push(value.trim_end_matches('/').to_owned()),
                "--webhook-secrets" => {
                    options.webhook_secrets =
                        secrets(value).map_err(|e| format!("--webhook-secrets: {e}"))?;
                }
                "--redis" => options.redis = Some(value.clone()),
                "--drain" => options.drain = secs(value)?,
                "--churn" => options.churn = Some(secs(value)?),
                "--server-pid" => options.server_pids.push(number(flag, value)?),
                "--metrics" => options.metrics.push(value.clone()),
                other => return Err(format!("unknown option {other}")),
            }
        }
        options.check()?;
        Ok(options)
    }

    fn check(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        if self.ws.is_empty() {
            problems.push("--ws: at least one WebSocket endpoint is needed".to_owned());
        }
        if self.secret.is_empty() {
            problems
                .push("--jwt-secret-key: the instances' JWT_SECRET_KEY is needed to mint tokens".to_owned());
        }
        if self.tenants == 0 || self.connections == 0 || self.sources == 0 {
            problems.push("--tenants, --connections and --sources must be at least 1".to_owned());
        }
        if !(self.connect_rate > 0.0 && self.publish_rate > 0.0) {
            problems.push("--connect-rate and --publish-rate must be positive".to_owned());
        }
        match self.load {
            Load::Webhook => {
                if self.webhook.is_empty() {
                    problems.push("--load webhook needs --webhook".to_owned());
                }
                let missing: Vec<String> = (0..self.tenants)
                    .map(tenant_name)
                    .filter(|t| !self.webhook_secrets.contains_key(t))
                    .collect();
                if !missing.is_empty() {
                    problems.push(format!(
                        "--load webhook needs every tenant's secret in --webhook-secrets (or $WEBHOOK_SECRETS); missing: {}",
                        missing.join(", ")
                    ));
                }
            }
            Load::Redis if self.redis.is_none() => problems.push("--load redis needs --redis".to_owned()),
            Load::Topic if self.redis.is_none() || self.subscriptions == 0 => {
                problems.push("--load topic needs --redis and --subscriptions".to_owned());
            }
            Load::Idle if self.messages > 0 => {
                problems.push("--messages needs a --load other than idle".to_owned())
            }
            _ => {}
        }
        if self.subscriptions > self.topics {
            problems.push("--subscriptions: at most --topics".to_owned());
        }
        if problems.is_empty() { Ok(()) } else { Err(problems.join("\n")) }
    }

    pub(crate) fn tenant(&self, connection: usize) -> usize {
        connection % self.tenants
    }

    /// The topics connection `n` subscribes to: `--subscriptions` consecutive ones, starting
    /// where its place among its tenant's connections puts it, so each topic gets as many
    /// subscribers as the others.
    pub(crate) fn topics_of(&self, connection: usize) -> Vec<usize> {
        let place = connection / self.tenants;
        (0..self.subscriptions).map(|k| (place * self.subscriptions + k) % self.topics.max(1)).collect()
    }
}

pub(crate) fn tenant_name(tenant: usize) -> String {
    format!("bench{tenant}")
}
