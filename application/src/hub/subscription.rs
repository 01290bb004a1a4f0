//! One connection's subscription to a channel it chose (a topic, or presence announcements):
//! its own gate, so that the `subscribed` frame and the replay go before live messages, and
//! what the subscription was granted.

use std::sync::Arc;

use bytes::Bytes;
use domain::{Allowed, CloseReason, StreamPosition};

use super::Position;
use super::gate::{Gate, Passage};
use super::handle::ConnectionHandle;
use crate::ports::PushError;

/// A subscription of one connection.
pub struct Subscription {
    handle: Arc<ConnectionHandle>,
    gate: Gate<1>,
    /// What the subscription token granted on the topic (nothing without one): kept with the
    /// subscription, so a refreshed connection token cannot take it away.
    grant: Allowed,
    /// The subscriber is one of the topic's present members.
    presence: bool,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("connection", &self.handle.info().id)
            .field("grant", &self.grant)
            .field("presence", &self.presence)
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// A subscription whose live deliveries are held until [`Subscription::open`].
    pub fn held(handle: Arc<ConnectionHandle>, grant: Allowed, presence: bool) -> Self {
        Self { handle, gate: Gate::closed(), grant, presence }
    }

    /// A subscription that delivers at once (a channel without history).
    pub fn open_now(handle: Arc<ConnectionHandle>) -> Self {
        Self { handle, gate: Gate::open_now(), grant: Allowed::NONE, presence: false }
    }

    /// Queues `first` (the `subscribed` frame, then the replay), then the live deliveries held
    /// meanwhile except those at or below `floor`.
    ///
    /// # Errors
    /// [`PushError`] when the client's queue is full (it is closed as a slow consumer) or the
    /// connection is gone.
    pub fn open(
        &self,
        first: impl IntoIterator<Item = Bytes>,
        floor: Option<&StreamPosition>,
    ) -> Result<(), PushError> {
        self.gate.open(first, [floor], |frame| self.handle.send(frame))
    }

    /// Delivers a fan-out frame at `position`; it still waits behind the connection's own gate
    /// while the connection is being opened.
    pub(super) fn deliver(
        &self,
        channel: &domain::Channel,
        position: Position<'_>,
        frame: &Bytes,
    ) -> Result<(), PushError> {
        match self.gate.pass(Some(0), position, frame) {
            Passage::Through => self.handle.deliver(channel, position, frame),
            Passage::Kept => Ok(()),
            Passage::Overflow => {
                self.handle.close(CloseReason::SlowConsumer);
                Err(PushError::Full)
            }
        }
    }

    pub fn handle(&self) -> &Arc<ConnectionHandle> {
        &self.handle
    }

    /// What the subscription token granted.
    pub fn grant(&self) -> Allowed {
        self.grant
    }

    /// Whether the subscriber is one of the topic's present members.
    pub fn presence(&self) -> bool {
        self.presence
    }
}
