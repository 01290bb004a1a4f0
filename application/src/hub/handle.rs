//! One connection as the hub sees it: its times, its sink, and the gate that holds live
//! deliveries while it is being opened and drops, once open, a message already covered then.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use domain::{Channel, CloseReason, ConnectionInfo, StreamPosition, Timestamp};

use super::Position;
use crate::ports::{ClientSink, PushError};

/// Live deliveries held for one connection while it is being opened; beyond this it is closed
/// as a slow consumer (it reconnects and recovers from its last position).
pub const MAX_HELD_FRAMES: usize = 4096;

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
    pub(super) fn deliver(
        &self,
        channel: &Channel,
        position: Position<'_>,
        frame: &Bytes,
    ) -> Result<(), PushError> {
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
