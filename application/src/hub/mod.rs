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
//! - [`subscription`]: [`Subscription`], one connection's subscription to a topic or to
//!   presence announcements, with its own gate.
//! - `gate`: the gate both use to hold deliveries while a welcome or a replay is prepared.
//! - `continuity`: where each history channel stands per shard (a [`domain::ChannelContinuity`] each).

mod continuity;
mod gate;
pub mod handle;
pub mod subscription;

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;
use domain::{
    Channel, CloseReason, ConnectionId, ConnectionRegistry, PresenceScope, RegistryError, SubscribeError,
    TenantId, UserId,
};

pub use gate::MAX_HELD_FRAMES;
pub use handle::ConnectionHandle;
pub use subscription::Subscription;

use crate::ports::{MessageBroker, PushError, SubscribeAck};

/// Number of registry shards. A power of two well above the core count keeps lock contention
/// negligible while a global fan-out still walks few locks.
const SHARDS: usize = 64;

/// A message's place in its channel, as a fan-out hands it along: offset and epoch.
pub type Position<'a> = Option<(u64, &'a str)>;

type Registry = ConnectionRegistry<Arc<ConnectionHandle>, Arc<Subscription>>;
type Shard = RwLock<Registry>;

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
    max_topics: usize,
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
            max_topics: 0,
        }
    }

    /// Refuses a connection's topic subscription beyond `max` (0: no limit).
    #[must_use]
    pub fn with_topic_limit(mut self, max: usize) -> Self {
        self.max_topics = max;
        self
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

    fn read(shard: &Shard) -> RwLockReadGuard<'_, Registry> {
        shard.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(shard: &Shard) -> RwLockWriteGuard<'_, Registry> {
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

    /// Subscribes connection `id` of `tenant` to `channel` (a topic or presence channel)
    /// through `subscription`, subscribing the broker when it is the channel's first subscriber
    /// here. Returns the broker's confirmation that the channel is active.
    ///
    /// # Errors
    /// [`SubscribeError`] (already subscribed, over the limit, connection gone); nothing
    /// changes then.
    pub fn subscribe(
        &self,
        tenant: &TenantId,
        id: &ConnectionId,
        channel: &Channel,
        subscription: Arc<Subscription>,
    ) -> Result<SubscribeAck, SubscribeError> {
        let mut shard = Self::write(self.shard(tenant));
        if shard.subscribe(id, channel.clone(), subscription, self.max_topics)? {
            self.forget_positions(tenant, std::slice::from_ref(channel));
            self.broker.subscribe(std::slice::from_ref(channel));
        }
        drop(shard);
        Ok(self.broker.until_active(std::slice::from_ref(channel)))
    }

    /// Ends connection `id`'s subscription to `channel`, unsubscribing the broker when nobody
    /// else here needs it; returns the subscription, `None` when there was none. Once this
    /// returns, nothing more of `channel` reaches the connection.
    pub fn unsubscribe(
        &self,
        tenant: &TenantId,
        id: &ConnectionId,
        channel: &Channel,
    ) -> Option<Arc<Subscription>> {
        let mut shard = Self::write(self.shard(tenant));
        let (subscription, released) = shard.unsubscribe(id, channel)?;
        if released {
            self.forget_positions(tenant, std::slice::from_ref(channel));
            self.broker.unsubscribe(std::slice::from_ref(channel));
        }
        Some(subscription)
    }

    /// Ends every local subscription to `channel`; returns them.
    pub fn end_subscriptions(&self, channel: &Channel) -> Vec<Arc<Subscription>> {
        let Some(tenant) = channel.tenant() else { return Vec::new() };
        let mut shard = Self::write(self.shard(tenant));
        let ids: Vec<ConnectionId> = shard.subscribers(channel).map(|(id, _)| id.clone()).collect();
        let ended: Vec<_> =
            ids.iter().filter_map(|id| shard.unsubscribe(id, channel)).map(|(s, _)| s).collect();
        if !ended.is_empty() {
            self.forget_positions(tenant, std::slice::from_ref(channel));
            self.broker.unsubscribe(std::slice::from_ref(channel));
        }
        ended
    }

    /// Ends the subscriptions of `user`'s local connections to `channel`; returns them.
    pub fn unsubscribe_user(
        &self,
        tenant: &TenantId,
        user: &UserId,
        channel: &Channel,
    ) -> Vec<Arc<Subscription>> {
        let user_channel = Channel::User(tenant.clone(), user.clone());
        let ids: Vec<ConnectionId> =
            Self::read(self.shard(tenant)).recipients(&user_channel).map(|h| h.info().id.clone()).collect();
        ids.iter().filter_map(|id| self.unsubscribe(tenant, id, channel)).collect()
    }

    /// The channels connection `id` of `tenant` subscribed to, with their subscriptions.
    pub fn subscriptions_of(
        &self,
        tenant: &TenantId,
        id: &ConnectionId,
    ) -> Vec<(Channel, Arc<Subscription>)> {
        let shard = Self::read(self.shard(tenant));
        shard
            .subscriptions_of(id)
            .iter()
            .filter_map(|channel| {
                shard
                    .subscribers(channel)
                    .find(|(other, _)| *other == id)
                    .map(|(_, s)| (channel.clone(), s.clone()))
            })
            .collect()
    }

    /// How many local connections of `user` are present members of `scope`: for a tenant,
    /// every connection of the user; for a topic, its subscriptions with presence.
    pub fn present_connections_of(&self, scope: &PresenceScope, user: &UserId) -> usize {
        let shard = Self::read(self.shard(&scope.tenant));
        match &scope.topic {
            None => shard.connections_of(&scope.tenant, user),
            Some(_) => shard.subscribed_connections_of(&Channel::Presence(scope.clone()), user),
        }
    }

    /// Every topic with present members on this instance, with each member and how many of
    /// its connections are.
    pub fn topic_presence_members(&self) -> Vec<(PresenceScope, UserId, usize)> {
        self.shards
            .iter()
            .flat_map(|shard| {
                Self::read(shard)
                    .presence_members()
                    .filter_map(|(channel, user, n)| match channel {
                        Channel::Presence(scope) if scope.topic.is_some() => {
                            Some((scope.clone(), user.clone(), n))
                        }
                        _ => None,
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Queues `frame` for every local connection listening on `channel`; returns how many
    /// accepted it. The bytes are shared, never copied per recipient.
    /// `position` is the message's offset and epoch in `channel`, when it has one.
    pub fn fan_out(&self, channel: &Channel, frame: &Bytes, position: Position<'_>) -> FanOut {
        let mut outcome = FanOut::default();
        let mut count = |result: Result<(), PushError>| match result {
            Ok(()) => outcome.delivered += 1,
            Err(PushError::Full) => outcome.overflowed += 1,
            Err(PushError::Closed) => {}
        };
        let mut send_all = |registry: &Registry| {
            if channel.is_subscribed_to() {
                for (_, subscription) in registry.subscribers(channel) {
                    count(subscription.deliver(channel, position, frame));
                }
            } else {
                for handle in registry.recipients(channel) {
                    count(handle.deliver(channel, position, frame));
                }
            }
        };
        match channel {
            Channel::Tenant(tenant)
            | Channel::User(tenant, _)
            | Channel::Topic(tenant, _)
            | Channel::Presence(PresenceScope { tenant, .. }) => send_all(&Self::read(self.shard(tenant))),
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

    /// Per tenant with a connection on this instance: its connections and distinct users.
    pub fn tenants(&self) -> crate::stats::activity::TenantCounts {
        let mut tenants = crate::stats::activity::TenantCounts::new();
        for shard in &self.shards {
            for (tenant, _, connections) in Self::read(shard).users() {
                let entry = match tenants.get_mut(tenant) {
                    Some(entry) => entry,
                    None => tenants.entry(tenant.clone()).or_default(),
                };
                entry.0 += connections;
                entry.1 += 1;
            }
        }
        tenants
    }

    /// Topic subscriptions held by the local connections.
    pub fn topic_subscriptions(&self) -> usize {
        self.shards.iter().map(|shard| Self::read(shard).topic_subscriptions()).sum()
    }

    /// Tenant, user and subscribed channels some local connection needs.
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
