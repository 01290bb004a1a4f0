//! `PostgresOutbox`: the outbox table, consumed by every instance together.
//!
//! A round takes, in one transaction, the channels with the oldest waiting rows; for each it
//! tries a transaction-scoped advisory lock keyed by the channel, so one instance at a time
//! consumes a channel and its rows are published in insertion order; it publishes them, deletes
//! those published or rejected, and commits. An instance that dies mid-round leaves its rows
//! and locks to the next round of another. Rounds are woken by `LISTEN lq_outbox` (the table's
//! trigger notifies after each insert) and run at least every [`POLL`] as a fallback.

use std::sync::Arc;
use std::time::Duration;

use application::ports::{Outbox, OutboxRow, RowOutcome, RowPublisher, StoreError};
use async_trait::async_trait;
use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, NoTls};

use super::{PostgresError, Shared, column};

/// What is named when an outbox table's column does not have the expected type.
const COLUMN: &str = "an outbox column";

/// Rounds run at least this often, notification or not.
pub const POLL: Duration = Duration::from_secs(1);

/// Channels one round looks at.
const CHANNELS: i64 = 16;

/// First key of the advisory locks ("lqoutbox" folded to 32 bits).
const LOCK_CLASS: i32 = 0x6c71_6f62;

/// The outbox table of a [`super::PostgresStore`]'s database.
pub struct PostgresOutbox {
    shared: Arc<Shared>,
    /// Validated: letters, digits and `_`, optionally `schema.`-qualified.
    table: String,
    notified: Arc<Notify>,
    listener: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for PostgresOutbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresOutbox").field("table", &self.table).finish_non_exhaustive()
    }
}

impl Drop for PostgresOutbox {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// Whether `name` is a table name the outbox accepts: `[a-z_][a-z0-9_]*`, at most 63 bytes,
/// optionally preceded by a schema of the same form and a dot.
pub fn valid_table(name: &str) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && p.len() <= 63
            && p.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
            && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    match name.split_once('.') {
        Some((schema, table)) => part(schema) && part(table),
        None => part(name),
    }
}

impl PostgresOutbox {
    /// The outbox `table` (see [`valid_table`]) of `store`'s database, listening for its
    /// inserts.
    ///
    /// # Errors
    /// [`PostgresError::InvalidUrl`] for a table name that is not valid.
    pub fn new(store: &super::PostgresStore, table: &str) -> Result<Self, PostgresError> {
        if !valid_table(table) {
            return Err(PostgresError::InvalidUrl(format!(
                "OUTBOX_TABLE {table:?}: expected a table name of a-z, 0-9 and _, optionally schema-qualified"
            )));
        }
        let notified = Arc::new(Notify::new());
        let listener = tokio::spawn(listen(store.shared.settings.url.clone(), notified.clone()));
        Ok(Self { shared: store.shared.clone(), table: table.to_owned(), notified, listener })
    }
}

/// Holds a connection that `LISTEN`s on `lq_outbox` and wakes the consumer on each
/// notification; reconnects after a failure.
async fn listen(url: String, notified: Arc<Notify>) {
    loop {
        if let Ok((client, mut connection)) = tokio_postgres::connect(&url, NoTls).await {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            let listening = client.batch_execute("LISTEN lq_outbox");
            tokio::pin!(listening);
            let mut subscribed = false;
            loop {
                tokio::select! {
                    done = &mut listening, if !subscribed => {
                        if done.is_err() { break; }
                        subscribed = true;
                    }
                    message = messages.next() => match message {
                        Some(Ok(AsyncMessage::Notification(_))) => notified.notify_one(),
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => break,
                    },
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

fn unavailable(what: &str, error: &tokio_postgres::Error) -> StoreError {
    StoreError::from(PostgresError::query(what, error))
}

#[async_trait]
impl Outbox for PostgresOutbox {
    async fn wait(&self) {
        let _ = tokio::time::timeout(POLL, self.notified.notified()).await;
    }

    async fn consume(&self, max: usize, publish: &RowPublisher<'_>) -> Result<usize, StoreError> {
        let mut client = self.shared.pool.get().await.map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let transaction = client.transaction().await.map_err(|e| unavailable("the outbox", &e))?;
        let table = &self.table;
        let channels = transaction
            .query(
                &format!("SELECT channel FROM {table} GROUP BY channel ORDER BY min(id) LIMIT $1"),
                &[&CHANNELS],
            )
            .await
            .map_err(|e| unavailable("the outbox", &e))?;
        // The rows of each channel this instance holds, taken first; then the channels are
        // published side by side, each in its rows' order.
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let mut held: Vec<Vec<OutboxRow>> = Vec::new();
        for channel in channels {
            let channel: String = column(&channel, 0, COLUMN)?;
            let lock = transaction
                .query_one("SELECT pg_try_advisory_xact_lock($1, hashtext($2))", &[&LOCK_CLASS, &channel])
                .await
                .map_err(|e| unavailable("the outbox's lock", &e))?;
            let locked: bool = column(&lock, 0, COLUMN)?;
            if !locked {
                continue;
            }
            let rows = transaction
                .query(
                    &format!(
                        "SELECT id, channel, type, payload::text, idempotency_key FROM {table} \
                         WHERE channel = $1 ORDER BY id LIMIT $2"
                    ),
                    &[&channel, &limit],
                )
                .await
                .map_err(|e| unavailable("the outbox", &e))?;
            held.push(
                rows.iter()
                    .map(|row| {
                        Ok(OutboxRow {
                            id: column(row, 0, COLUMN)?,
                            channel: column(row, 1, COLUMN)?,
                            kind: column(row, 2, COLUMN)?,
                            payload: column(row, 3, COLUMN)?,
                            idempotency_key: column(row, 4, COLUMN)?,
                        })
                    })
                    .collect::<Result<_, StoreError>>()?,
            );
        }
        let channels = held.into_iter().map(|rows| async move {
            let mut done = Vec::with_capacity(rows.len());
            for row in rows {
                let id = row.id;
                match publish(row).await {
                    RowOutcome::Published | RowOutcome::Rejected(_) => done.push(id),
                    // Its channel's next rows wait behind it.
                    RowOutcome::Retry => break,
                }
            }
            done
        });
        let removed: Vec<i64> =
            futures_util::future::join_all(channels).await.into_iter().flatten().collect();
        if !removed.is_empty() {
            transaction
                .execute(&format!("DELETE FROM {table} WHERE id = ANY($1)"), &[&removed])
                .await
                .map_err(|e| unavailable("the outbox", &e))?;
        }
        transaction.commit().await.map_err(|e| unavailable("the outbox", &e))?;
        Ok(removed.len())
    }

    async fn pending(&self) -> Result<(u64, f64), StoreError> {
        let client = self.shared.pool.get().await.map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(created_at))::float8, 0) FROM {}",
                    self.table
                ),
                &[],
            )
            .await
            .map_err(|e| unavailable("the outbox", &e))?;
        let (rows, oldest): (i64, f64) = (column(&row, 0, COLUMN)?, column(&row, 1, COLUMN)?);
        Ok((u64::try_from(rows).unwrap_or(0), oldest.max(0.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_identifiers() {
        for ok in ["lq_outbox", "app.outbox", "_x", "outbox_2"] {
            assert!(valid_table(ok), "{ok}");
        }
        for bad in ["", "Outbox", "1x", "a;drop", "a.b.c", "a b", "a.", &"x".repeat(64)] {
            assert!(!valid_table(bad), "{bad}");
        }
    }
}
