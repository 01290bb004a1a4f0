//! Channel continuity on this instance: per shard, where each history channel with local
//! connections stands, so that a message after a gap is noticed.

use std::collections::HashMap;
use std::sync::{MutexGuard, PoisonError};

use domain::{Channel, StreamPosition, TenantId};

use super::Hub;

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

/// Where a history channel stands on this instance.
#[derive(Debug, Clone)]
pub(super) struct Known {
    position: StreamPosition,
    /// Read when a connection was admitted, before any message arrived since the channel was
    /// subscribed; replaced by the first message that arrives.
    admitted_at: bool,
}

impl Hub {
    fn positions_of(&self, tenant: &TenantId) -> MutexGuard<'_, HashMap<Channel, Known>> {
        self.positions[Self::shard_index(tenant)].lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets what was received on `channels`: they are subscribed anew or no longer.
    pub(super) fn forget_positions(&self, tenant: &TenantId, channels: &[Channel]) {
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
}
