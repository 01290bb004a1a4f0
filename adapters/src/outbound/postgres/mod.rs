//! `PostgresStore`: the message store on PostgreSQL (`tokio-postgres` through a
//! `deadpool-postgres` pool), where every message with a position is kept for
//! `PERSIST_RETENTION_DAYS`.
//!
//! # Layout
//! - this module: connecting (the migrations applied first), reading, pruning, readiness.
//! - `schema`: the tables and the migrations that create them.
//! - [`outbox`]: the outbox table, consumed by every instance together.
//! - `writer`: the batching writer behind [`PostgresStore::append`](application::ports::MessageStore::append).

pub mod outbox;
mod schema;
mod writer;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use application::ports::{HistoryQuery, MessageStore, StoreError, StoredMessage};
use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use domain::{Channel, StreamPosition};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_postgres::NoTls;

use writer::{InFlight, Pending};

/// How the store connects and keeps messages.
#[derive(Debug, Clone)]
pub struct PostgresSettings {
    /// `postgres://user:password@host:port/database` (no TLS in this build).
    pub url: String,
    /// Connections of the pool.
    pub pool_size: usize,
    /// How long a message is kept.
    pub retention: Duration,
    /// Appends waiting to be committed at most; beyond, the store is not ready.
    pub buffer: usize,
    /// How long an append waits for its commit before it is answered as not kept (it stays
    /// queued and is kept once PostgreSQL takes it).
    pub append_timeout: Duration,
    /// Longest one statement may take.
    pub statement_timeout: Duration,
    /// How often messages older than the retention are pruned.
    pub prune_period: Duration,
}

impl PostgresSettings {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            pool_size: 16,
            retention: Duration::from_secs(7 * 86_400),
            buffer: 10_000,
            append_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(5),
            prune_period: Duration::from_secs(60),
        }
    }
}

/// Why the store cannot start or answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PostgresError {
    #[error("DATABASE_URL: {0}")]
    InvalidUrl(String),
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(String),
    #[error("PostgreSQL refused {what}: {reason}")]
    Query { what: String, reason: String },
}

impl PostgresError {
    fn query(what: &str, error: &tokio_postgres::Error) -> Self {
        let reason = error.as_db_error().map_or_else(|| error.to_string(), |db| db.message().to_owned());
        Self::Query { what: what.to_owned(), reason }
    }
}

impl From<PostgresError> for StoreError {
    fn from(error: PostgresError) -> Self {
        StoreError::Unavailable(error.to_string())
    }
}

/// What the store's tasks share.
struct Shared {
    pool: Pool,
    settings: PostgresSettings,
}

/// The message store on PostgreSQL.
pub struct PostgresStore {
    shared: Arc<Shared>,
    queue: mpsc::Sender<Pending>,
    /// The last insert or probe succeeded.
    healthy: Arc<AtomicBool>,
    /// Appends queued or being inserted.
    in_flight: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").field("healthy", &self.healthy).finish_non_exhaustive()
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Tries to reach PostgreSQL at start this many times, half a second apart.
const CONNECT_ATTEMPTS: u32 = 10;

/// Probes an idle store this often, so readiness follows PostgreSQL without traffic.
const PROBE_PERIOD: Duration = Duration::from_secs(1);
/// How long [`MessageStore::settle`] waits for this instance's appends at most.
const SETTLE_BOUND: Duration = Duration::from_secs(1);
/// Rows one prune statement deletes at most: short statements, no long lock.
const PRUNE_BATCH: i64 = 5000;

impl PostgresStore {
    /// Connects, applies the migrations, and starts the writers, the probe and the pruner.
    ///
    /// # Errors
    /// [`PostgresError`] when the URL is invalid, PostgreSQL cannot be reached, or a migration
    /// fails.
    pub async fn connect(settings: PostgresSettings) -> Result<Self, PostgresError> {
        let mut config: tokio_postgres::Config = settings
            .url
            .parse()
            .map_err(|e: tokio_postgres::Error| PostgresError::InvalidUrl(e.to_string()))?;
        if matches!(config.get_ssl_mode(), tokio_postgres::config::SslMode::Require) {
            return Err(PostgresError::InvalidUrl(
                "sslmode=require: this build speaks to PostgreSQL without TLS; keep it on a private network"
                    .to_owned(),
            ));
        }
        if config.get_options().is_none() {
            // Reads (history pages, the outbox) are bounded by the server too.
            config.options(format!("-c statement_timeout={}", settings.statement_timeout.as_millis()));
        }
        let manager =
            Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size.max(WRITERS_MIN))
            .wait_timeout(Some(settings.statement_timeout))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| PostgresError::Connect(e.to_string()))?;
        // A PostgreSQL that was just started answers "starting up" for a moment: a few tries.
        let mut attempt = 0;
        let mut client = loop {
            attempt += 1;
            match tokio::time::timeout(settings.statement_timeout, pool.get()).await {
                Ok(Ok(client)) => break client,
                Ok(Err(error)) if attempt >= CONNECT_ATTEMPTS => {
                    return Err(PostgresError::Connect(error.to_string()));
                }
                Err(_) if attempt >= CONNECT_ATTEMPTS => {
                    return Err(PostgresError::Connect(format!(
                        "no answer within {:?}",
                        settings.statement_timeout
                    )));
                }
                _ => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        };
        let applied = schema::migrate(&mut client).await?;
        drop(client);
        if applied > 0 {
            tracing::info!(applied, "PostgreSQL migrations applied");
        }
        let shared = Arc::new(Shared { pool, settings });
        let (queue, receiver) = mpsc::channel(shared.settings.buffer.max(1));
        let receiver = Arc::new(Mutex::new(receiver));
        let healthy = Arc::new(AtomicBool::new(true));
        let mut tasks: Vec<_> = (0..writer::WRITERS)
            .map(|_| tokio::spawn(writer::run(shared.clone(), receiver.clone(), healthy.clone())))
            .collect();
        tasks.push(tokio::spawn(probe(shared.clone(), healthy.clone())));
        tasks.push(tokio::spawn(prune(shared.clone())));
        Ok(Self { shared, queue, healthy, in_flight: Arc::new(AtomicUsize::new(0)), tasks })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.shared.pool.get().await.map_err(|e| StoreError::Unavailable(e.to_string()))
    }

    /// Where `position` of `channel` stands in the history's order: its epoch's `began` and
    /// its offset; `UnknownPosition` when no such message is kept.
    async fn order_of(&self, channel: &str, position: &StreamPosition) -> Result<(i64, i64), StoreError> {
        let client = self.client().await?;
        let offset = i64::try_from(position.offset).unwrap_or(i64::MAX);
        let row = client
            .query_opt(
                r#"SELECT e.began FROM lq_messages m JOIN lq_epochs e ON e.channel = m.channel AND e.epoch = m.epoch
                   WHERE m.channel = $1 AND m.epoch = $2 AND m."offset" = $3"#,
                &[&channel, &position.epoch, &offset],
            )
            .await
            .map_err(|e| StoreError::from(PostgresError::query("a history position", &e)))?;
        let began: i64 = row
            .ok_or_else(|| StoreError::UnknownPosition(format!("{}:{}", position.epoch, position.offset)))?
            .get(0);
        Ok((began, offset))
    }
}

/// The pool's size is at least the writers plus a reader and the probe.
const WRITERS_MIN: usize = writer::WRITERS + 2;

/// Column `index` of `row`, or what was being read when its type did not match.
fn column<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a tokio_postgres::Row,
    index: usize,
    what: &str,
) -> Result<T, StoreError> {
    row.try_get(index).map_err(|e| StoreError::from(PostgresError::query(what, &e)))
}

/// Marks the store healthy or not from `SELECT 1`, every [`PROBE_PERIOD`].
async fn probe(shared: Arc<Shared>, healthy: Arc<AtomicBool>) {
    let mut ticks = tokio::time::interval(PROBE_PERIOD);
    loop {
        ticks.tick().await;
        let answered = async {
            let client = shared.pool.get().await.ok()?;
            client.simple_query("SELECT 1").await.ok()
        };
        let up =
            tokio::time::timeout(shared.settings.statement_timeout, answered).await.ok().flatten().is_some();
        if healthy.swap(up, Ordering::AcqRel) != up {
            if up {
                tracing::info!("PostgreSQL answers again: messages are kept and publishes accepted");
            } else {
                tracing::warn!(
                    "PostgreSQL does not answer: publishes to channels with a history are refused"
                );
            }
        }
    }
}

/// Deletes the messages older than the retention, a batch at a time, every `prune_period`:
/// the oldest rows by `seq` (kept in insertion order, so no index on `kept_at` is needed and
/// every insert maintains one index less).
async fn prune(shared: Arc<Shared>) {
    let mut ticks = tokio::time::interval(shared.settings.prune_period);
    let seconds = shared.settings.retention.as_secs_f64();
    loop {
        ticks.tick().await;
        let Ok(client) = shared.pool.get().await else { continue };
        loop {
            let deleted = client
                .execute(
                    "DELETE FROM lq_messages WHERE seq IN (SELECT seq FROM lq_messages ORDER BY seq LIMIT $2) \
                     AND kept_at < now() - make_interval(secs => $1)",
                    &[&seconds, &PRUNE_BATCH],
                )
                .await;
            match deleted {
                Ok(n) if n as i64 == PRUNE_BATCH => continue,
                Ok(0) => break,
                Ok(n) => {
                    tracing::debug!(deleted = n, "messages older than the retention pruned");
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, "messages older than the retention not pruned; retrying later");
                    break;
                }
            }
        }
    }
}

#[async_trait]
impl MessageStore for PostgresStore {
    async fn append(&self, message: StoredMessage) -> Result<(), StoreError> {
        let (done, committed) = oneshot::channel();
        let _in_flight = InFlight::new(&self.in_flight);
        self.queue.try_send(Pending { message, done, _in_flight }).map_err(|_| {
            StoreError::Unavailable(format!(
                "{} messages already wait for PostgreSQL",
                self.shared.settings.buffer
            ))
        })?;
        match tokio::time::timeout(self.shared.settings.append_timeout, committed).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(StoreError::Unavailable("the store stopped".to_owned())),
            Err(_) => Err(StoreError::Unavailable(format!(
                "not committed within {:?}; still queued",
                self.shared.settings.append_timeout
            ))),
        }
    }

    async fn read_from(
        &self,
        channel: &Channel,
        epoch: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Bytes)>, StoreError> {
        let client = self.client().await?;
        let (from, limit) =
            (i64::try_from(from).unwrap_or(i64::MAX), i64::try_from(limit).unwrap_or(i64::MAX));
        let rows = client
            .query(
                r#"SELECT "offset", message FROM lq_messages WHERE channel = $1 AND epoch = $2 AND "offset" >= $3
                   ORDER BY "offset" LIMIT $4"#,
                &[&channel.name(), &epoch, &from, &limit],
            )
            .await
            .map_err(|e| StoreError::from(PostgresError::query("a history read", &e)))?;
        Ok(rows
            .iter()
            .map(|row| {
                let offset: i64 = row.get(0);
                let message: Vec<u8> = row.get(1);
                (u64::try_from(offset).unwrap_or(0), Bytes::from(message))
            })
            .collect())
    }

    async fn epochs(&self, channel: &Channel) -> Result<Vec<String>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT epoch FROM lq_epochs WHERE channel = $1 ORDER BY began, epoch", &[&channel.name()])
            .await
            .map_err(|e| StoreError::from(PostgresError::query("an epoch read", &e)))?;
        rows.iter().map(|row| column(row, 0, "an epoch read")).collect()
    }

    async fn settle(&self) {
        let deadline = tokio::time::Instant::now() + SETTLE_BOUND;
        while self.in_flight.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn page(
        &self,
        channel: &Channel,
        query: &HistoryQuery,
    ) -> Result<Vec<(StreamPosition, Bytes)>, StoreError> {
        let name = channel.name();
        let after = match &query.after {
            Some(position) => self.order_of(&name, position).await?,
            None => (i64::MIN, i64::MIN),
        };
        let before = match &query.before {
            Some(position) => self.order_of(&name, position).await?,
            None => (i64::MAX, i64::MAX),
        };
        let order = if query.newest_first { "DESC" } else { "ASC" };
        let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    r#"SELECT m.epoch, m."offset", m.message FROM lq_messages m
                       JOIN lq_epochs e ON e.channel = m.channel AND e.epoch = m.epoch
                       WHERE m.channel = $1 AND (e.began, m."offset") > ($2, $3) AND (e.began, m."offset") < ($4, $5)
                       ORDER BY e.began {order}, m."offset" {order} LIMIT $6"#
                ),
                &[&name, &after.0, &after.1, &before.0, &before.1, &limit],
            )
            .await
            .map_err(|e| StoreError::from(PostgresError::query("a history page", &e)))?;
        Ok(rows
            .iter()
            .map(|row| {
                let epoch: String = row.get(0);
                let offset: i64 = row.get(1);
                let message: Vec<u8> = row.get(2);
                (StreamPosition::new(epoch, u64::try_from(offset).unwrap_or(0)), Bytes::from(message))
            })
            .collect())
    }

    fn is_ready(&self) -> bool {
        self.healthy.load(Ordering::Acquire) && self.queue.capacity() > 0
    }
}
