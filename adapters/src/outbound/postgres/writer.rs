//! The batching writer: appends wait in a bounded queue, a few writer tasks take everything
//! waiting (up to [`BATCH`]) and insert it in one statement, and answer each append once it is
//! committed. A batch that fails is retried, with backoff, until it is committed: an append
//! whose caller stopped waiting (its timeout) is still kept. Meanwhile the store reports itself
//! not ready, so no new publish is made that could not be kept.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use application::ports::{StoreError, StoredMessage};
use tokio::sync::{Mutex, mpsc, oneshot};

use super::Shared;

/// Most messages inserted by one statement.
pub(super) const BATCH: usize = 1000;

/// Writer tasks: one batch's round trip overlaps the others'.
pub(super) const WRITERS: usize = 4;

/// An append waiting to be committed.
pub(super) struct Pending {
    pub(super) message: StoredMessage,
    pub(super) done: oneshot::Sender<Result<(), StoreError>>,
    /// Counts the append as in flight until the writer answers it (and drops it).
    pub(super) _in_flight: InFlight,
}

/// One append not answered yet; [`super::PostgresStore::settle`] waits for none to be left.
pub(super) struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    pub(super) fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(count))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Inserts the batch in one statement, its epochs first.
const INSERT: &str = r#"
WITH batch AS (
    SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bytea[]) AS b(channel, epoch, "offset", message)
), epochs AS (
    INSERT INTO lq_epochs (channel, epoch)
    SELECT DISTINCT channel, epoch FROM batch ORDER BY channel, epoch
    ON CONFLICT DO NOTHING
)
INSERT INTO lq_messages (channel, epoch, "offset", message)
SELECT channel, epoch, "offset", message FROM batch
ON CONFLICT (channel, epoch, "offset") DO NOTHING
"#;

/// Takes batches from `queue` until it closes.
pub(super) async fn run(
    shared: Arc<Shared>,
    queue: Arc<Mutex<mpsc::Receiver<Pending>>>,
    healthy: Arc<AtomicBool>,
) {
    loop {
        let mut batch = Vec::new();
        {
            let mut queue = queue.lock().await;
            let Some(first) = queue.recv().await else { return };
            batch.push(first);
            while batch.len() < BATCH {
                match queue.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
        }
        let mut backoff = Duration::from_millis(50);
        loop {
            match insert(&shared, &batch).await {
                Ok(()) => {
                    healthy.store(true, Ordering::Release);
                    break;
                }
                Err(error) => {
                    if healthy.swap(false, Ordering::AcqRel) {
                        tracing::warn!(%error, messages = batch.len(), "messages not kept yet; retrying until PostgreSQL takes them");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
        for pending in batch {
            let _ = pending.done.send(Ok(()));
        }
    }
}

async fn insert(shared: &Shared, batch: &[Pending]) -> Result<(), String> {
    let client = shared.pool.get().await.map_err(|e| e.to_string())?;
    let statement = client.prepare_cached(INSERT).await.map_err(|e| e.to_string())?;
    let channels: Vec<String> = batch.iter().map(|p| p.message.channel.name()).collect();
    let epochs: Vec<&str> = batch.iter().map(|p| p.message.position.epoch.as_str()).collect();
    let offsets: Vec<i64> =
        batch.iter().map(|p| i64::try_from(p.message.position.offset).unwrap_or(i64::MAX)).collect();
    let messages: Vec<&[u8]> = batch.iter().map(|p| &p.message.message[..]).collect();
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] = [&channels, &epochs, &offsets, &messages];
    let insert = client.execute(&statement, &params);
    match tokio::time::timeout(shared.settings.statement_timeout, insert).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {:?}", shared.settings.statement_timeout)),
    }
}
