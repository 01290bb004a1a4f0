//! Read a channel's kept history a page at a time, for backends (the server API) and for
//! clients (the `history` frame, on topics they may read).

use std::sync::Arc;

use bytes::Bytes;
use domain::{Channel, StreamPosition};

use crate::ports::{HistoryQuery, MessageStore, StoreError};

/// Most messages one history page holds.
pub const MAX_HISTORY_PAGE: usize = 1000;

/// A page of a channel's history and where the next one starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    /// The messages, as their clients received them, in the order asked.
    pub messages: Vec<Bytes>,
    /// When the page is full: the position to ask the next page from (as `since` when oldest
    /// first, as `before` when newest first).
    pub next: Option<StreamPosition>,
}

/// Why a page cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    #[error("a history is kept for tenant:, user: and topic: channels only")]
    NoHistory,
    #[error("limit is 1 to {0}")]
    Limit(usize),
    #[error("history is kept only with persistence on (DATABASE_URL)")]
    PersistenceOff,
    #[error("{0}")]
    UnknownPosition(String),
    #[error(transparent)]
    Unavailable(StoreError),
}

/// The read-history use-case. Without a store (no `DATABASE_URL`) it reads nothing.
#[derive(Clone, Default)]
pub struct ReadHistory {
    store: Option<Arc<dyn MessageStore>>,
}

impl std::fmt::Debug for ReadHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadHistory").field("on", &self.store.is_some()).finish()
    }
}

impl ReadHistory {
    pub fn new(store: Option<Arc<dyn MessageStore>>) -> Self {
        Self { store }
    }

    /// A page of `channel`'s history across epochs in publication order: at most
    /// `query.limit` (1 to `max`) messages after `query.after`, before `query.before`, newest
    /// or oldest first.
    ///
    /// # Errors
    /// [`HistoryError`] naming what is wrong.
    pub async fn page(
        &self,
        channel: &Channel,
        query: HistoryQuery,
        max: usize,
    ) -> Result<HistoryPage, HistoryError> {
        if !channel.has_history() {
            return Err(HistoryError::NoHistory);
        }
        if !(1..=max).contains(&query.limit) {
            return Err(HistoryError::Limit(max));
        }
        let store = self.store.as_ref().ok_or(HistoryError::PersistenceOff)?;
        let rows = store.page(channel, &query).await.map_err(|error| match error {
            StoreError::UnknownPosition(_) => HistoryError::UnknownPosition(error.to_string()),
            StoreError::Unavailable(_) => HistoryError::Unavailable(error),
        })?;
        let next =
            (rows.len() == query.limit).then(|| rows.last().map(|(position, _)| position.clone())).flatten();
        Ok(HistoryPage { messages: rows.into_iter().map(|(_, message)| message).collect(), next })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::MockMessageStore;

    fn query(limit: usize) -> HistoryQuery {
        HistoryQuery { after: None, before: None, limit, newest_first: true }
    }

    #[tokio::test]
    async fn a_full_page_says_where_the_next_one_starts() {
        let mut store = MockMessageStore::new();
        store.expect_page().returning(|_, q| {
            Ok((1..=q.limit as u64)
                .rev()
                .map(|o| (StreamPosition::new("e", o), Bytes::from(o.to_string())))
                .collect())
        });
        let read = ReadHistory::new(Some(Arc::new(store)));
        let channel = Channel::parse("tenant:acme").expect("valid");
        let page = read.page(&channel, query(2), 10).await.expect("page");
        assert_eq!(page.messages, [Bytes::from("2"), Bytes::from("1")]);
        assert_eq!(page.next, Some(StreamPosition::new("e", 1)));
    }

    #[tokio::test]
    async fn channels_without_history_limits_out_of_range_and_no_store_are_refused() {
        let read = ReadHistory::new(Some(Arc::new(MockMessageStore::new())));
        let global = Channel::parse("global:broadcast").expect("valid");
        assert_eq!(read.page(&global, query(1), 10).await, Err(HistoryError::NoHistory));
        let acme = Channel::parse("tenant:acme").expect("valid");
        assert_eq!(read.page(&acme, query(0), 10).await, Err(HistoryError::Limit(10)));
        assert_eq!(read.page(&acme, query(11), 10).await, Err(HistoryError::Limit(10)));
        assert_eq!(ReadHistory::new(None).page(&acme, query(1), 10).await, Err(HistoryError::PersistenceOff));
    }
}
