//! Consume the outbox: every instance takes the rows backends wrote into the outbox table in
//! their own transactions and publishes each once, in insertion order per channel, through the
//! server API's checks, keyed by the row's idempotency key (or its id) so that an instance that
//! dies between publishing and removing a row does not make another publish it again.

use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;

use domain::Channel;

use crate::ports::{Metrics, NoMetrics, Outbox, OutboxRow, RowOutcome};
use crate::use_cases::server_api::{ServerApi, ServerApiError};

/// Rows taken at once.
const BATCH: usize = 100;

/// The consume-the-outbox use-case.
pub struct ConsumeOutbox {
    outbox: Arc<dyn Outbox>,
    api: Arc<ServerApi>,
    metrics: Arc<dyn Metrics>,
}

impl std::fmt::Debug for ConsumeOutbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumeOutbox").finish_non_exhaustive()
    }
}

impl ConsumeOutbox {
    pub fn new(outbox: Arc<dyn Outbox>, api: Arc<ServerApi>) -> Self {
        Self { outbox, api, metrics: Arc::new(NoMetrics) }
    }

    /// Reports to `metrics` instead of nowhere.
    pub fn with_metrics(mut self, metrics: Arc<dyn Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Publishes one row; see [`RowOutcome`].
    async fn publish(&self, row: OutboxRow) -> RowOutcome {
        let channel = match Channel::parse(&row.channel) {
            Ok(channel) => channel,
            Err(error) => return RowOutcome::Rejected(error.to_string()),
        };
        let Ok(payload) = serde_json::from_str::<&RawValue>(&row.payload) else {
            return RowOutcome::Rejected("payload is not JSON".to_owned());
        };
        let key = row.idempotency_key.clone().unwrap_or_else(|| format!("outbox-{}", row.id));
        if domain::MessageId::parse(&key).is_err() {
            return RowOutcome::Rejected(
                "idempotency_key: expected 1 to 128 characters of A-Z, a-z, 0-9, '.', '_' or '-'".to_owned(),
            );
        }
        match self.api.publish_once(channel, &row.kind, payload, &key).await {
            Ok(_) => RowOutcome::Published,
            Err(ServerApiError::BadRequest(reason)) => RowOutcome::Rejected(reason),
            Err(_) => RowOutcome::Retry,
        }
    }

    /// Takes and publishes rows until none is left that can be published now; returns how
    /// many were removed.
    ///
    /// # Errors
    /// The table could not be read or changed.
    pub async fn drain(&self) -> Result<usize, crate::ports::StoreError> {
        let mut removed = 0;
        loop {
            let metrics = &self.metrics;
            let taken = self
                .outbox
                .consume(BATCH, &|row| {
                    Box::pin(async move {
                        let id = row.id;
                        let outcome = self.publish(row).await;
                        match &outcome {
                            RowOutcome::Published => metrics.outbox_row("published"),
                            RowOutcome::Rejected(reason) => {
                                metrics.outbox_row("rejected");
                                tracing::warn!(id, %reason, "outbox row rejected and removed");
                            }
                            RowOutcome::Retry => {}
                        }
                        outcome
                    })
                })
                .await?;
            removed += taken;
            if taken == 0 {
                return Ok(removed);
            }
        }
    }

    /// Consumes the outbox for as long as it is polled: waits for rows, drains them, reports
    /// what waits.
    pub async fn run(&self) {
        loop {
            self.outbox.wait().await;
            if let Err(error) = self.drain().await {
                tracing::warn!(%error, "outbox not consumed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            if let Ok((rows, oldest)) = self.outbox.pending().await {
                self.metrics.outbox_pending(rows, oldest);
            }
        }
    }
}
