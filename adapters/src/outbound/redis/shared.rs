//! A few pipelined connections shared by every command.
//!
//! A Redis connection of `redis-rs` is multiplexed: commands sent from many tasks at once go
//! out together and their answers come back in order. Taking a connection from the pool for
//! each command (the pool hands it to one caller at a time, after a `PING` that checks it)
//! costs a round trip and a system call per command on both sides; sharing a few connections
//! lets concurrent commands — the position reads of a burst of openings, the publishes of a
//! burst of webhooks — travel in one write. The pool still creates and checks the connections;
//! one that failed is forgotten and the next command takes a new one.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use deadpool_redis::redis::aio::MultiplexedConnection;

use super::RedisError;

/// One shared connection and the slot it came from, for [`SharedConnections::failed`].
pub(super) struct Lease {
    pub(super) connection: MultiplexedConnection,
    slot: usize,
    /// Which of the slot's successive connections this is.
    generation: u64,
}

/// A slot's connection and its generation (how many connections the slot had before it).
type Slot = Option<(u64, MultiplexedConnection)>;

/// `REDIS_POOL_SIZE` connections, each shared by every command: more than one, so that one
/// slow answer (a large history read) does not hold up every command behind it, and so that
/// the answers are read on more than one worker thread.
pub(super) struct SharedConnections {
    slots: Box<[Mutex<Slot>]>,
    /// Held while a slot's connection is opened, so that a burst of commands finding the slot
    /// empty opens one connection, not one each.
    opening: Box<[tokio::sync::Mutex<()>]>,
    next: AtomicUsize,
    /// Connections opened so far, over every slot: the next one's generation.
    opened: AtomicU64,
    /// When [`SharedConnections::clear_at_most_every`] last cleared them.
    cleared: Mutex<Option<Instant>>,
}

impl SharedConnections {
    /// `size` connections (at least one), none open yet.
    pub(super) fn new(size: usize) -> Self {
        Self {
            slots: (0..size.max(1)).map(|_| Mutex::new(None)).collect(),
            opening: (0..size.max(1)).map(|_| tokio::sync::Mutex::new(())).collect(),
            next: AtomicUsize::new(0),
            opened: AtomicU64::new(0),
            cleared: Mutex::new(None),
        }
    }

    fn slot(&self, slot: usize) -> std::sync::MutexGuard<'_, Slot> {
        self.slots[slot].lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A shared connection, taken from `fresh` (the pool) when its slot holds none.
    pub(super) async fn lease<F, Fut>(&self, fresh: F) -> Result<Lease, RedisError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<MultiplexedConnection, RedisError>>,
    {
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        if let Some((generation, connection)) = self.slot(slot).clone() {
            return Ok(Lease { connection, slot, generation });
        }
        let _opening = self.opening[slot].lock().await;
        // Opened by the command that held the lock before.
        if let Some((generation, connection)) = self.slot(slot).clone() {
            return Ok(Lease { connection, slot, generation });
        }
        let connection = fresh().await?;
        let generation = self.opened.fetch_add(1, Ordering::Relaxed);
        *self.slot(slot) = Some((generation, connection.clone()));
        Ok(Lease { connection, slot, generation })
    }

    /// Forgets the lease's connection when `error` says it is broken, so that the next command
    /// of its slot takes a new one (unless the slot already has). Commands still in flight on
    /// it finish or fail on their own.
    pub(super) fn failed(&self, lease: &Lease, error: &deadpool_redis::redis::RedisError) {
        if error.is_io_error() || error.is_connection_dropped() || error.is_unrecoverable_error() {
            let mut slot = self.slot(lease.slot);
            if slot.as_ref().is_some_and(|(generation, _)| *generation == lease.generation) {
                slot.take();
            }
        }
    }

    /// Forgets every connection: after a failover, or when Redis stopped answering on them.
    pub(super) fn clear(&self) {
        for slot in &self.slots {
            slot.lock().unwrap_or_else(PoisonError::into_inner).take();
        }
    }

    /// Forgets every connection unless that was done less than `period` ago: a burst of
    /// commands that time out together replaces the connections once, not once each.
    pub(super) fn clear_at_most_every(&self, period: Duration) {
        let mut cleared = self.cleared.lock().unwrap_or_else(PoisonError::into_inner);
        if cleared.is_none_or(|at| at.elapsed() >= period) {
            *cleared = Some(Instant::now());
            drop(cleared);
            self.clear();
        }
    }
}
