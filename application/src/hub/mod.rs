//! The hub: this instance's live connections and the fan-out to them.
//!
//! The domain registry is split into shards by tenant, each behind its own lock, so a fan-out
//! to one tenant locks one shard and never the whole instance, and connects of different
//! tenants do not contend. Broker subscribe/unsubscribe calls are made while the shard lock is
//! held: that is what keeps "last client of tenant T left" and "first client of tenant T
//! arrived" in order at the broker.

//!
//! # Layout
//! - this module: the [`Hub`] — registration, broker subscribe/unsubscribe, fan-out, closing.
//! - [`handle`]: [`ConnectionHandle`], one connection's times, sink and delivery gate.
//! - `continuity`: where each history channel stands per shard (a [`domain::ChannelContinuity`] each).

mod continuity;
pub mod handle;

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;
use domain::{Channel, CloseReason, ConnectionId, ConnectionRegistry, RegistryError, TenantId, UserId};

pub use handle::{ConnectionHandle, MAX_HELD_FRAMES};

use crate::ports::{MessageBroker, PushError, SubscribeAck};

/// Number of registry shards. A power of two well above the core count keeps lock contention
/// negligible while a global fan-out still walks few locks.
const SHARDS: usize = 64;

/// A message's place in its channel, as a fan-out hands it along: offset and epoch.
pub type Position<'a> = Option<(u64, &'a str)>;

type Shard = RwLock<ConnectionRegistry<Arc<ConnectionHandle>>>;

/// This instance's connections.
pub struct Hub {
    shards: Box<[Shard]>,
    /// Per shard: the position of the last message received on each history channel that
    /// has local connections, or the position a connection was admitted at. Reset when the
    /// channel is subscribed anew.
    positions: Box<[Mutex<HashMap<Channel, domain::ChannelContinuity>>]>,
    broker: Arc<dyn MessageBroker>,
    registered: AtomicUsize,
    admitted: Arc<AtomicUsize>,
    max_connections: usize,
    max_per_user: usize,
}

/// What one fan-out did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FanOut {
    /// Recipients whose queue took the frame.
    pub delivered: u64,
    /// Recipients whose queue was full: closed as slow consumers.
    pub overflowed: u64,
}

/// Why a connection cannot be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("the user already has {0} connections on this instance")]
    UserLimit(usize),
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("registered", &self.registered)
            .field("admitted", &self.admitted)
            .field("max_connections", &self.max_connections)
            .finish_non_exhaustive()
    }
}

/// A reserved connection slot, released when dropped.
#[derive(Debug)]
pub struct Permit {
    admitted: Arc<AtomicUsize>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Hub {
    pub fn new(broker: Arc<dyn MessageBroker>, max_connections: usize) -> Self {
        Self::with_user_limit(broker, max_connections, 0)
    }

    /// A hub that refuses a user's connection beyond `max_per_user` on this instance (0: no
    /// limit).
    pub fn with_user_limit(
        broker: Arc<dyn MessageBroker>,
        max_connections: usize,
        max_per_user: usize,
    ) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::new(ConnectionRegistry::new())).collect(),
            positions: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            broker,
            registered: AtomicUsize::new(0),
            admitted: Arc::new(AtomicUsize::new(0)),
            max_connections,
            max_per_user,
        }
    }

    fn shard_index(tenant: &TenantId) -> usize {
        let mut hasher = DefaultHasher::new();
        tenant.hash(&mut hasher);
        // The modulo keeps the index below SHARDS, which fits in usize.
        (hasher.finish() % SHARDS as u64) as usize
    }

    fn shard(&self, tenant: &TenantId) -> &Shard {
        &self.shards[Self::shard_index(tenant)]
    }

    /// Closes every local connection listening on `channel` with `reason`; returns how many.
    pub fn close_channel(&self, channel: &Channel, reason: CloseReason) -> usize {
        let Some(tenant) = channel.tenant() else { return 0 };
        let shard = Self::read(self.shard(tenant));
        let mut closed = 0;
        for handle in shard.recipients(channel) {
            handle.close(reason);
            closed += 1;
        }
        closed
    }

    fn read(shard: &Shard) -> RwLockReadGuard<'_, ConnectionRegistry<Arc<ConnectionHandle>>> {
        shard.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(shard: &Shard) -> RwLockWriteGuard<'_, ConnectionRegistry<Arc<ConnectionHandle>>> {
        shard.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reserves a connection slot, or `None` when the instance is at its limit.
    pub fn try_admit(&self) -> Option<Permit> {
        self.admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_connections).then_some(n + 1)
            })
            .ok()
            .map(|_| Permit { admitted: self.admitted.clone() })
    }

    /// Adds a connection, subscribing the channels it is the first to need. Returns the
    /// broker's confirmation that the connection's channels are active — awaited by every
    /// connection, not only the first, since the first one's subscription may still be on its
    /// way.
    ///
    /// # Errors
    /// [`RegisterError::Registry`] when the connection id is already registered,
    /// [`RegisterError::UserLimit`] when the user is at the per-user limit.
    pub fn register(&self, handle: Arc<ConnectionHandle>) -> Result<SubscribeAck, RegisterError> {
        let info = handle.info().clone();
        let mut shard = Self::write(self.shard(&info.tenant_id));
        if self.max_per_user > 0 && shard.connections_of(&info.tenant_id, &info.user_id) >= self.max_per_user
        {
            return Err(RegisterError::UserLimit(self.max_per_user));
        }
        let needed = shard.register(info.clone(), handle)?;
        self.registered.fetch_add(1, Ordering::AcqRel);
        if !needed.is_empty() {
            self.forget_positions(&info.tenant_id, &needed);
            self.broker.subscribe(&needed);
        }
        drop(shard);
        Ok(self.broker.until_active(&[
            Channel::Tenant(info.tenant_id.clone()),
            Channel::User(info.tenant_id, info.user_id),
        ]))
    }

    /// Removes a connection, unsubscribing the channels nobody else here needs.
    pub fn unregister(&self, tenant: &TenantId, id: &ConnectionId) -> Option<Arc<ConnectionHandle>> {
        let mut shard = Self::write(self.shard(tenant));
        let (_, handle, released) = shard.unregister(id)?;
        if !released.is_empty() {
            self.forget_positions(tenant, &released);
            self.broker.unsubscribe(&released);
        }
        self.registered.fetch_sub(1, Ordering::AcqRel);
        Some(handle)
    }

    /// Queues `frame` for every local connection listening on `channel`; returns how many
    /// accepted it. The bytes are shared, never copied per recipient.
    /// `position` is the message's offset and epoch in `channel`, when it has one.
    pub fn fan_out(&self, channel: &Channel, frame: &Bytes, position: Position<'_>) -> FanOut {
        let mut outcome = FanOut::default();
        let mut send_all = |registry: &ConnectionRegistry<Arc<ConnectionHandle>>| {
            for handle in registry.recipients(channel) {
                match handle.deliver(channel, position, frame) {
                    Ok(()) => outcome.delivered += 1,
                    Err(PushError::Full) => outcome.overflowed += 1,
                    Err(PushError::Closed) => {}
                }
            }
        };
        match channel {
            Channel::Tenant(tenant) | Channel::User(tenant, _) => send_all(&Self::read(self.shard(tenant))),
            Channel::Global | Channel::System => {
                for shard in self.shards.iter() {
                    send_all(&Self::read(shard));
                }
            }
        }
        outcome
    }

    /// How many connections `user` of `tenant` has on this instance.
    pub fn connections_of(&self, tenant: &TenantId, user: &UserId) -> usize {
        Self::read(self.shard(tenant)).connections_of(tenant, user)
    }

    /// Every user with a connection on this instance, with how many it has.
    pub fn local_users(&self) -> Vec<(TenantId, UserId, usize)> {
        self.shards
            .iter()
            .flat_map(|shard| {
                Self::read(shard).users().map(|(t, u, n)| (t.clone(), u.clone(), n)).collect::<Vec<_>>()
            })
            .collect()
    }

    /// Tenant and user channels some local connection needs.
    pub fn channel_count(&self) -> usize {
        self.shards.iter().map(|shard| Self::read(shard).channel_count()).sum()
    }

    /// The broker the hub subscribes through.
    pub fn broker(&self) -> &Arc<dyn MessageBroker> {
        &self.broker
    }

    /// Whether the broker can publish and receive.
    pub fn broker_ready(&self) -> bool {
        self.broker.is_ready()
    }

    /// Calls `f` on every connection, one shard at a time.
    pub fn for_each(&self, mut f: impl FnMut(&ConnectionHandle)) {
        for shard in self.shards.iter() {
            for (_, handle) in Self::read(shard).iter() {
                f(handle);
            }
        }
    }

    /// Closes up to `n` connections not already closing; returns how many it closed.
    pub fn close_batch(&self, n: usize, reason: CloseReason) -> usize {
        let mut closed = 0;
        for shard in self.shards.iter() {
            if closed >= n {
                break;
            }
            for (_, handle) in Self::read(shard).iter() {
                if closed >= n {
                    break;
                }
                if !handle.is_closing() {
                    handle.close(reason);
                    closed += 1;
                }
            }
        }
        closed
    }

    /// Closes every connection with `reason`.
    pub fn close_all(&self, reason: CloseReason) {
        self.for_each(|handle| handle.close(reason));
    }

    /// Registered connections.
    pub fn len(&self) -> usize {
        self.registered.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Connection slots in use, including connections still completing their handshake.
    pub fn admitted(&self) -> usize {
        self.admitted.load(Ordering::Acquire)
    }
}
