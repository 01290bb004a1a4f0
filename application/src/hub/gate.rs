//! The gate in front of a connection or a subscription: it holds live deliveries while the
//! welcome (or the `subscribed` frame) and the replay are being prepared, then lets them through
//! except those already covered by the replay.
//!
//! A gate has `N` slots, one per history channel it guards (a connection: its tenant and user
//! channels; a subscription: its topic). A slot's floor is the position the client has
//! everything up to once opened: a live message at or below it was already replayed or precedes
//! where the client starts, and is dropped. The first message beyond a floor lifts it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use domain::StreamPosition;

use super::Position;
use crate::ports::PushError;

/// Live deliveries held by one gate while it is closed; beyond this the client is closed as a
/// slow consumer (it reconnects or resubscribes and recovers from its last position).
pub const MAX_HELD_FRAMES: usize = 4096;

/// A live delivery that arrived while the gate was closed.
struct Held {
    slot: Option<usize>,
    position: Option<(u64, String)>,
    frame: Bytes,
}

/// A position reduced to what a floor compares.
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

enum State<const N: usize> {
    /// Being opened: deliveries wait here, to follow what [`Gate::open`] queues first.
    Holding(Vec<Held>),
    /// Open, with a floor per slot until a message beyond it arrives.
    Open([Option<Floor>; N]),
}

/// What a delivery through the gate came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Passage {
    /// Pass it on to the client.
    Through,
    /// Held, or dropped as already covered: nothing to do.
    Kept,
    /// Too many held: the client must be closed as a slow consumer.
    Overflow,
}

/// A gate with `N` slots.
pub(super) struct Gate<const N: usize> {
    /// Set while deliveries must go through `state` (closed, or a floor set): an open gate
    /// without floors costs one atomic load per delivery.
    gated: AtomicBool,
    state: Mutex<State<N>>,
}

impl<const N: usize> Gate<N> {
    /// An open gate without floors.
    pub(super) fn open_now() -> Self {
        Self { gated: AtomicBool::new(false), state: Mutex::new(State::Open([None; N])) }
    }

    /// A closed gate: deliveries are held until [`Gate::open`].
    pub(super) fn closed() -> Self {
        Self { gated: AtomicBool::new(true), state: Mutex::new(State::Holding(Vec::new())) }
    }

    /// Sends `first` through `send`, then the deliveries held meanwhile except those at or below
    /// the floor of their slot in `floors` (same epoch), and opens the gate with those floors.
    ///
    /// # Errors
    /// The first [`PushError`] of `send`; the gate is open all the same.
    pub(super) fn open(
        &self,
        first: impl IntoIterator<Item = Bytes>,
        floors: [Option<&StreamPosition>; N],
        send: impl Fn(Bytes) -> Result<(), PushError>,
    ) -> Result<(), PushError> {
        // Deliveries racing with this wait on the lock and, finding nothing held any more,
        // queue behind everything sent here.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let set = floors.map(|p| p.map(|p| Floor { offset: p.offset, epoch: epoch_hash(&p.epoch) }));
        let waiting = match std::mem::replace(&mut *state, State::Open(set)) {
            State::Holding(waiting) => waiting,
            State::Open(_) => Vec::new(),
        };
        let result = (|| {
            for frame in first {
                send(frame)?;
            }
            for Held { slot, position, frame } in waiting {
                let covered = slot
                    .and_then(|slot| floors[slot])
                    .zip(position.as_ref())
                    .is_some_and(|(floor, (offset, epoch))| floor.epoch == *epoch && *offset <= floor.offset);
                if !covered {
                    send(frame)?;
                }
            }
            Ok(())
        })();
        self.gated.store(set.iter().any(Option::is_some), Ordering::Release);
        result
    }

    /// Passes a delivery of slot `slot` at `position` through the gate.
    pub(super) fn pass(&self, slot: Option<usize>, position: Position<'_>, frame: &Bytes) -> Passage {
        if !self.gated.load(Ordering::Acquire) {
            return Passage::Through;
        }
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match &mut *state {
            State::Holding(waiting) => {
                if waiting.len() >= MAX_HELD_FRAMES {
                    return Passage::Overflow;
                }
                waiting.push(Held {
                    slot,
                    position: position.map(|(offset, epoch)| (offset, epoch.to_owned())),
                    frame: frame.clone(),
                });
                Passage::Kept
            }
            State::Open(floors) => {
                if let (Some(slot), Some((offset, epoch))) = (slot, position)
                    && let Some(floor) = floors[slot]
                {
                    if floor.epoch == epoch_hash(epoch) && offset <= floor.offset {
                        return Passage::Kept;
                    }
                    floors[slot] = None;
                    if floors.iter().all(Option::is_none) {
                        self.gated.store(false, Ordering::Release);
                    }
                }
                Passage::Through
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u64) -> Bytes {
        Bytes::from(n.to_string())
    }

    fn collect(gate: &Gate<1>, first: &[u64], floor: Option<StreamPosition>) -> Vec<Bytes> {
        let sent = Mutex::new(Vec::new());
        gate.open(first.iter().map(|n| frame(*n)), [floor.as_ref()], |f| {
            sent.lock().expect("lock").push(f);
            Ok(())
        })
        .expect("sent");
        sent.into_inner().expect("lock")
    }

    #[test]
    fn a_closed_gate_holds_deliveries_and_drops_those_the_replay_covered() {
        let gate = Gate::<1>::closed();
        for n in [3, 4] {
            assert_eq!(gate.pass(Some(0), Some((n, "e")), &frame(n)), Passage::Kept);
        }
        assert_eq!(gate.pass(None, None, &frame(99)), Passage::Kept);
        let sent = collect(&gate, &[0, 2, 3], Some(StreamPosition::new("e", 3)));
        assert_eq!(sent, [frame(0), frame(2), frame(3), frame(4), frame(99)]);
        assert_eq!(gate.pass(Some(0), Some((3, "e")), &frame(3)), Passage::Kept, "at the floor: covered");
        assert_eq!(gate.pass(Some(0), Some((5, "e")), &frame(5)), Passage::Through);
        assert_eq!(gate.pass(Some(0), Some((2, "e")), &frame(2)), Passage::Through, "the floor was lifted");
    }

    #[test]
    fn a_message_of_another_epoch_is_never_covered() {
        let gate = Gate::<1>::closed();
        gate.pass(Some(0), Some((1, "new")), &frame(1));
        assert_eq!(collect(&gate, &[], Some(StreamPosition::new("old", 5))), [frame(1)]);
    }

    #[test]
    fn too_many_held_deliveries_overflow() {
        let gate = Gate::<1>::closed();
        for n in 0..MAX_HELD_FRAMES as u64 {
            assert_eq!(gate.pass(None, None, &frame(n)), Passage::Kept);
        }
        assert_eq!(gate.pass(None, None, &frame(0)), Passage::Overflow);
    }

    #[test]
    fn an_open_gate_lets_everything_through() {
        let gate = Gate::<2>::open_now();
        assert_eq!(gate.pass(Some(1), Some((1, "e")), &frame(1)), Passage::Through);
    }
}
