//! One connection as the hub sees it: its times, its sink, and the gate that holds live
//! deliveries while it is being opened and drops, once open, a message already covered then.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use domain::{Channel, CloseReason, ConnectionInfo, StreamPosition, Timestamp};

use super::Position;
use super::gate::{Gate, Passage};
use crate::ports::{ClientSink, PushError};

/// The index of a connection's tenant (0) or user (1) channel among its gate's slots.
fn floor_slot(channel: &Channel) -> Option<usize> {
    match channel {
        Channel::Tenant(_) => Some(0),
        Channel::User(..) => Some(1),
        _ => None,
    }
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
    /// Holds live deliveries until [`ConnectionHandle::open`], so the welcome and any replayed
    /// history go first; then drops those the replay covered, on the tenant and user channels.
    gate: Gate<2>,
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
            gate: Gate::open_now(),
        }
    }

    /// A handle whose live deliveries are held back until [`ConnectionHandle::open`].
    pub fn held(info: ConnectionInfo, sink: Arc<dyn ClientSink>, expires_at: Option<Timestamp>) -> Self {
        Self { gate: Gate::closed(), ..Self::new(info, sink, expires_at) }
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
        let mut floors = [None; 2];
        for (channel, position) in covered {
            if let Some(slot) = floor_slot(channel) {
                floors[slot] = Some(position);
            }
        }
        self.gate.open(first, floors, |frame| self.send(frame))
    }

    /// Delivers a fan-out frame of `channel` at `position`: held while the connection is being
    /// opened, queued otherwise.
    pub(super) fn deliver(
        &self,
        channel: &Channel,
        position: Position<'_>,
        frame: &Bytes,
    ) -> Result<(), PushError> {
        match self.gate.pass(floor_slot(channel), position, frame) {
            Passage::Through => self.send(frame.clone()),
            Passage::Kept => Ok(()),
            Passage::Overflow => {
                self.close(CloseReason::SlowConsumer);
                Err(PushError::Full)
            }
        }
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
