//! The hub: this instance's live connections and the fan-out to them.
//!
//! The domain registry is split into shards by tenant, each behind its own lock, so a fan-out
//! to one tenant locks one shard and never the whole instance, and connects of different
//! tenants do not contend. Broker subscribe/unsubscribe calls are made while the shard lock is
//! held: that is what keeps "last client of tenant T left" and "first client of tenant T
//! arrived" in order at the broker.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;
use domain::{
    Channel, CloseReason, ConnectionId, ConnectionInfo, ConnectionRegistry, RegistryError, StreamPosition,
    TenantId, Timestamp, UserId,
};

use crate::ports::{ClientSink, MessageBroker, PushError, SubscribeAck};

/// Number of registry shards. A power of two well above the core count keeps lock contention
/// negligible while a global fan-out still walks few locks.
const SHARDS: usize = 64;

/// Live deliveries held for one connection while it is being opened; beyond this it is closed
/// as a slow consumer (it reconnects and recovers from its last position).
pub const MAX_HELD_FRAMES: usize = 4096;

/// A message's place in its channel, as a fan-out hands it along: offset and epoch.
pub type Position<'a> = Option<(u64, &'a str)>;

/// What a message's position says about the messages this instance received before it on its
/// channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Continuity {
    /// The next message, or the first since the channel was subscribed here.
    Next,
    /// Messages before it never arrived here, or the channel's history was lost or went back
    /// (a new epoch, or an offset already seen: Redis restored an older copy of its data): the
    /// local clients of the channel must recover.
    Gap,
}

/// A live delivery that arrived while its connection was still being opened.
struct Held {
    channel: Channel,
    position: Option<(u64, String)>,
    frame: Bytes,
}

/// Where a connection stood in its tenant or user channel when it was opened: the welcome's
/// position, up to which the client has everything (replayed, or before where it starts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Floor {
    offset: u64,
    /// A hash of the epoch, enough to tell two epochs apart.
    epoch: u64,
}

fn epoch_hash(epoch: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    epoch.hash(&mut hasher);
    hasher.finish()
}

/// The index of a connection's tenant (0) or user (1) channel among its floors.
fn floor_slot(channel: &Channel) -> Option<usize> {
    match channel {
        Channel::Tenant(_) => Some(0),
        Channel::User(..) => Some(1),
        _ => None,
    }
}

/// How a connection takes live deliveries.
enum Gate {
    /// Being opened: they wait here, to follow the welcome and the replay.
    Holding(Vec<Held>),
    /// Open. A live message at or below the floor of its channel was already covered when the
    /// connection was opened: one published before the position was read may still reach this
    /// instance afterwards (its subscriber running behind), and is dropped. The first message
    /// beyond a floor lifts it.
    Open([Option<Floor>; 2]),
}

/// One live connection as the hub sees it. The timestamps are atomics, in Unix milliseconds,
/// so the connection's reader and the heartbeat never take a lock for them.
pub struct ConnectionHandle {
    info: ConnectionInfo,
    sink: Arc<dyn ClientSink>,
    /// Any frame from the client, control frames (pongs) included.
    last_seen: AtomicU64,
    /// The client's last data frame.
    last_activity: AtomicU64,
    /// The last heartbeat ping sent.
    last_ping: AtomicU64,
    /// When the connection's token stops being valid (leeway included); 0 for never.
    expires_at: AtomicU64,
    /// The server asked the connection to close; a drain skips it.
    closing: AtomicBool,
    /// Set while live deliveries go through `gate`: until [`ConnectionHandle::open`] (they
    /// wait there, so the welcome and any replayed history go first), then while a floor is
    /// set.
    gated: AtomicBool,
    gate: Mutex<Gate>,
}

impl std::fmt::Debug for ConnectionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionHandle").field("info", &self.info).finish_non_exhaustive()
    }
}

impl ConnectionHandle {
    /// A handle for a connection whose token expires at `expires_at` (never when `None`).
    pub fn new(info: ConnectionInfo, sink: Arc<dyn ClientSink>, expires_at: Option<Timestamp>) -> Self {
        let now = info.connected_at.unix_millis();
        Self {
            info,
            sink,
            last_seen: AtomicU64::new(now),
            last_activity: AtomicU64::new(now),
            last_ping: AtomicU64::new(now),
            expires_at: AtomicU64::new(expires_at.map_or(0, Timestamp::unix_millis)),
            closing: AtomicBool::new(false),
            gated: AtomicBool::new(false),
            gate: Mutex::new(Gate::Open([None; 2])),
        }
    }

    /// A handle whose live deliveries are held back until [`ConnectionHandle::open`].
    pub fn held(info: ConnectionInfo, sink: Arc<dyn ClientSink>, expires_at: Option<Timestamp>) -> Self {
        let handle = Self::new(info, sink, expires_at);
        *handle.gate.lock().unwrap_or_else(PoisonError::into_inner) = Gate::Holding(Vec::new());
        handle.gated.store(true, Ordering::Release);
        handle
    }

    /// Queues `first` (the welcome, then any replayed history), then the live deliveries held
    /// meanwhile except those already covered: a held message of a channel in `covered`, of
    /// the same epoch and at or below its offset, was already replayed or precedes the
    /// position the client starts from. From then on deliveries go straight to the client.
    ///
    /// # Errors
    /// [`PushError`] when the client's queue is full (it is closed as a slow consumer) or the
    /// connection is gone.
    pub fn open(
        &self,
        first: impl IntoIterator<Item = Bytes>,
        covered: &[(Channel, StreamPosition)],
    ) -> Result<(), PushError> {
        // Deliveries racing with this wait on the lock and, finding nothing held any more,
        // queue behind everything queued here.
        let mut gate = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
        let mut floors = [None; 2];
        for (channel, position) in covered {
            if let Some(slot) = floor_slot(channel) {
                floors[slot] = Some(Floor { offset: position.offset, epoch: epoch_hash(&position.epoch) });
            }
        }
        let waiting = match std::mem::replace(&mut *gate, Gate::Open(floors)) {
            Gate::Holding(waiting) => waiting,
            Gate::Open(_) => Vec::new(),
        };
        let result = (|| {
            for frame in first {
                self.send(frame)?;
            }
            for Held { channel, position, frame } in waiting {
                let already = position.as_ref().is_some_and(|(offset, epoch)| {
                    covered.iter().any(|(c, p)| *c == channel && p.epoch == *epoch && *offset <= p.offset)
                });
                if !already {
                    self.send(frame)?;
                }
            }
            Ok(())
        })();
        self.gated.store(floors.iter().any(Option::is_some), Ordering::Release);
        drop(gate);
        result
    }

    /// Delivers a fan-out frame of `channel` at `position`: held while the connection is being
    /// opened, queued otherwise.
    fn deliver(&self, channel: &Channel, position: Position<'_>, frame: &Bytes) -> Result<(), PushError> {
        if self.gated.load(Ordering::Acquire) {
            let mut gate = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
            match &mut *gate {
                Gate::Holding(waiting) => {
                    if waiting.len() >= MAX_HELD_FRAMES {
                        drop(gate);
                        self.close(CloseReason::SlowConsumer);
                        return Err(PushError::Full);
                    }
                    waiting.push(Held {
                        channel: channel.clone(),
                        position: position.map(|(offset, epoch)| (offset, epoch.to_owned())),
                        frame: frame.clone(),
                    });
                    return Ok(());
                }
                Gate::Open(floors) => {
                    if let (Some(slot), Some((offset, epoch))) = (floor_slot(channel), position)
                        && let Some(floor) = floors[slot]
                    {
                        if floor.epoch == epoch_hash(epoch) && offset <= floor.offset {
                            return Ok(());
                        }
                        floors[slot] = None;
                        if floors.iter().all(Option::is_none) {
                            self.gated.store(false, Ordering::Release);
                        }
                    }
                }
            }
        }
        self.send(frame.clone())
    }

    pub fn info(&self) -> &ConnectionInfo {
        &self.info
    }

    /// Records a data frame from the client at `now`.
    pub fn touch(&self, now: Timestamp) {
        self.last_activity.fetch_max(now.unix_millis(), Ordering::Relaxed);
        self.seen(now);
    }

    /// Records any frame from the client (a pong too) at `now`.
    pub fn seen(&self, now: Timestamp) {
        self.last_seen.fetch_max(now.unix_millis(), Ordering::Relaxed);
    }

    pub fn last_activity(&self) -> Timestamp {
        Timestamp::from_unix_millis(self.last_activity.load(Ordering::Relaxed))
    }

    pub fn last_seen(&self) -> Timestamp {
        Timestamp::from_unix_millis(self.last_seen.load(Ordering::Relaxed))
    }

    /// When the connection's token expires, if ever.
    pub fn expires_at(&self) -> Option<Timestamp> {
        match self.expires_at.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Timestamp::from_unix_millis(ms)),
        }
    }

    /// Moves the expiry to `expires_at` (a refreshed token; never for `None`).
    pub fn extend(&self, expires_at: Option<Timestamp>) {
        self.expires_at.store(expires_at.map_or(0, Timestamp::unix_millis), Ordering::Relaxed);
    }

    /// Sends a heartbeat ping if the last one is at least `interval_ms` old.
    pub fn ping_if_due(&self, now: Timestamp, interval_ms: u64) {
        let last = self.last_ping.load(Ordering::Relaxed);
        if now.unix_millis().saturating_sub(last) >= interval_ms
            && self
                .last_ping
                .compare_exchange(last, now.unix_millis(), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.sink.ping();
        }
    }

    /// Queues a frame. A client whose queue is full is closed as a slow consumer rather than
    /// silently skipped: it reconnects and knows it missed messages.
    pub fn send(&self, frame: Bytes) -> Result<(), PushError> {
        let result = self.sink.push(frame);
        if result == Err(PushError::Full) {
            self.close(CloseReason::SlowConsumer);
        }
        result
    }

    pub fn close(&self, reason: CloseReason) {
        self.closing.store(true, Ordering::Relaxed);
        self.sink.close(reason);
    }

    /// Whether the server already asked this connection to close.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }
}

type Shard = RwLock<ConnectionRegistry<Arc<ConnectionHandle>>>;

/// Where a history channel stands on this instance.
#[derive(Debug, Clone)]
struct Known {
    position: StreamPosition,
    /// Read when a connection was admitted, before any message arrived since the channel was
    /// subscribed; replaced by the first message that arrives.
    admitted_at: bool,
}

/// This instance's connections.
pub struct Hub {
    shards: Box<[Shard]>,
    /// Per shard: the position of the last message received on each history channel that
    /// has local connections, or the position a connection was admitted at. Reset when the
    /// channel is subscribed anew.
    positions: Box<[Mutex<HashMap<Channel, Known>>]>,
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

    fn positions_of(&self, tenant: &TenantId) -> std::sync::MutexGuard<'_, HashMap<Channel, Known>> {
        self.positions[Self::shard_index(tenant)].lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets what was received on `channels`: they are subscribed anew or no longer.
    fn forget_positions(&self, tenant: &TenantId, channels: &[Channel]) {
        let mut positions = self.positions_of(tenant);
        for channel in channels {
            positions.remove(channel);
        }
    }

    /// Records that a message at `offset` of `epoch` arrived on `channel` and tells whether it
    /// follows the previous one.
    pub fn advance(&self, channel: &Channel, offset: u64, epoch: &str) -> Continuity {
        let Some(tenant) = channel.tenant() else { return Continuity::Next };
        let mut positions = self.positions_of(tenant);
        match positions.get_mut(channel).filter(|known| !known.admitted_at).map(|known| &mut known.position) {
            None => {
                positions.insert(
                    channel.clone(),
                    Known { position: StreamPosition::new(epoch, offset), admitted_at: false },
                );
                Continuity::Next
            }
            Some(last) if last.epoch == epoch => {
                // Pub/Sub never delivers a message twice: an offset at or below the last one
                // means the offsets are being handed out again.
                let next = offset == last.offset + 1;
                last.offset = offset;
                if next { Continuity::Next } else { Continuity::Gap }
            }
            Some(last) => {
                *last = StreamPosition::new(epoch, offset);
                Continuity::Gap
            }
        }
    }

    /// Records `position`, read when a connection was admitted on `channel`, as where the
    /// channel stands when nothing was received on it since it was subscribed: a message lost
    /// before the first one that arrives is then noticed too. Messages that arrive are not
    /// judged against it (one published just before the read may still be on its way).
    pub fn note_admitted(&self, channel: &Channel, position: &StreamPosition) {
        let Some(tenant) = channel.tenant() else { return };
        self.positions_of(tenant)
            .entry(channel.clone())
            .or_insert_with(|| Known { position: position.clone(), admitted_at: true });
    }

    /// The position of the last message received on `channel` since it was subscribed, or else
    /// the position a connection was admitted at, if any.
    pub fn received(&self, channel: &Channel) -> Option<StreamPosition> {
        let tenant = channel.tenant()?;
        self.positions_of(tenant).get(channel).map(|known| known.position.clone())
    }

    /// Moves `channel`'s received position to `position` (messages up to it are accounted
    /// for), unless it is already there or beyond, or the channel has no local connections.
    pub fn skip_to(&self, channel: &Channel, position: &StreamPosition) {
        let Some(tenant) = channel.tenant() else { return };
        if let Some(last) = self.positions_of(tenant).get_mut(channel).map(|known| &mut known.position)
            && (last.epoch != position.epoch || last.offset < position.offset)
        {
            *last = position.clone();
        }
    }

    /// Every history channel with local connections and the last position received on it.
    pub fn received_positions(&self) -> Vec<(Channel, StreamPosition)> {
        self.positions
            .iter()
            .flat_map(|positions| {
                let positions = positions.lock().unwrap_or_else(PoisonError::into_inner);
                positions.iter().map(|(c, known)| (c.clone(), known.position.clone())).collect::<Vec<_>>()
            })
            .collect()
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
        let info = handle.info.clone();
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
