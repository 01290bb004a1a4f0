//! A few pipelined connections shared by every command.
//!
//! A Redis connection of `redis-rs` is multiplexed: commands sent from many tasks at once go
//! out together and their answers come back in order. Taking a connection from the pool for
//! each command (the pool hands it to one caller at a time, after a `PING` that checks it)
//! costs a round trip and a system call per command on both sides; sharing a few connections
//! lets concurrent commands — the position reads of a burst of openings, the publishes of a
//! burst of webhooks — travel in one write. The pool only opens the connections; one that
//! failed is forgotten and the next command of its turn opens a new one.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use deadpool_redis::redis::{RedisResult, aio::MultiplexedConnection};

use super::RedisError;

/// Where the connections come from: one Redis, or the master Sentinel names.
pub(super) enum Opener {
    Direct(deadpool_redis::Pool),
    Sentinel(deadpool_redis::sentinel::Pool),
}

impl Opener {
    /// A new connection, taken out of the pool for good.
    async fn open(&self) -> Result<MultiplexedConnection, RedisError> {
        // Boxed: the pool's futures are large, and the command's future would hold them.
        Ok(match self {
            Self::Direct(pool) => deadpool_redis::Connection::take(Box::pin(pool.get()).await?),
            Self::Sentinel(pool) => deadpool_redis::sentinel::Connection::take(Box::pin(pool.get()).await?),
        })
    }

    /// Drops the pool's idle connections (after a failover, they may point at the old master).
    fn drop_idle(&self) {
        match self {
            Self::Direct(pool) => pool.retain(|_, _| false),
            Self::Sentinel(pool) => pool.retain(|_, _| false),
        };
    }
}

/// One shared connection and the slot it came from, for [`SharedConnections::failed`].
struct Lease {
    connection: MultiplexedConnection,
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
    opener: Opener,
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
    /// `size` connections (at least one) opened by `opener`, none open yet.
    pub(super) fn new(opener: Opener, size: usize) -> Self {
        Self {
            opener,
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

    /// Runs `send` on a shared connection: `Err` when none could be opened, otherwise what
    /// Redis answered. A connection the answer says is broken is forgotten.
    pub(super) async fn run<T>(
        &self,
        send: impl AsyncFnOnce(&mut MultiplexedConnection) -> RedisResult<T>,
    ) -> Result<RedisResult<T>, RedisError> {
        let mut lease = self.lease().await?;
        // Boxed: `redis-rs`'s futures are kilobytes large, and every layer around them (the
        // timeout, the broker's call) would otherwise copy them whole.
        let answer = Box::pin(send(&mut lease.connection)).await;
        if let Err(error) = &answer {
            self.failed(&lease, error);
        }
        Ok(answer)
    }

    /// A shared connection, opened when its slot holds none.
    async fn lease(&self) -> Result<Lease, RedisError> {
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        if let Some((generation, connection)) = self.slot(slot).clone() {
            return Ok(Lease { connection, slot, generation });
        }
        let _opening = self.opening[slot].lock().await;
        // Opened by the command that held the lock before.
        if let Some((generation, connection)) = self.slot(slot).clone() {
            return Ok(Lease { connection, slot, generation });
        }
        let connection = self.opener.open().await?;
        let generation = self.opened.fetch_add(1, Ordering::Relaxed);
        *self.slot(slot) = Some((generation, connection.clone()));
        Ok(Lease { connection, slot, generation })
    }

    /// Forgets the lease's connection when `error` says it is broken, so that the next command
    /// of its slot takes a new one (unless the slot already has). Commands still in flight on
    /// it finish or fail on their own.
    fn failed(&self, lease: &Lease, error: &deadpool_redis::redis::RedisError) {
        if error.is_io_error() || error.is_connection_dropped() || error.is_unrecoverable_error() {
            let mut slot = self.slot(lease.slot);
            if slot.as_ref().is_some_and(|(generation, _)| *generation == lease.generation) {
                slot.take();
            }
        }
    }

    /// Forgets every connection and the pool's idle ones: after a failover they may point at
    /// the old master.
    pub(super) fn reset(&self) {
        self.clear();
        self.opener.drop_idle();
    }

    /// Forgets every connection.
    fn clear(&self) {
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
