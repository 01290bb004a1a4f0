//! Channel continuity on this instance: per shard, where each history channel with local
//! connections stands ([`ChannelContinuity`]), so that a message after a gap is noticed.

use std::collections::HashMap;
use std::sync::{MutexGuard, PoisonError};

use domain::{Channel, ChannelContinuity, Continuity, StreamPosition, TenantId};

use super::Hub;

impl Hub {
    fn positions_of(&self, tenant: &TenantId) -> MutexGuard<'_, HashMap<Channel, ChannelContinuity>> {
        self.positions[Self::shard_index(tenant)].lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets what was received on `channels`: they are subscribed anew or no longer.
    pub(super) fn forget_positions(&self, tenant: &TenantId, channels: &[Channel]) {
        let mut positions = self.positions_of(tenant);
        for channel in channels {
            positions.remove(channel);
        }
    }

    /// Records that a message at `position` arrived on `channel` and tells whether it follows
    /// the previous one.
    pub fn advance(&self, channel: &Channel, position: &StreamPosition) -> Continuity {
        let Some(tenant) = channel.tenant() else { return Continuity::Next };
        let mut positions = self.positions_of(tenant);
        match positions.get_mut(channel) {
            Some(known) => known.advance(position),
            None => {
                positions.insert(channel.clone(), ChannelContinuity::received(position.clone()));
                Continuity::Next
            }
        }
    }

    /// Records `position`, read when a connection was admitted on `channel`, as where the
    /// channel stands when nothing was received on it since it was subscribed.
    pub fn note_admitted(&self, channel: &Channel, position: &StreamPosition) {
        let Some(tenant) = channel.tenant() else { return };
        self.positions_of(tenant)
            .entry(channel.clone())
            .or_insert_with(|| ChannelContinuity::admitted(position.clone()));
    }

    /// The position of the last message received on `channel` since it was subscribed, or else
    /// the position a connection was admitted at, if any.
    pub fn received(&self, channel: &Channel) -> Option<StreamPosition> {
        let tenant = channel.tenant()?;
        self.positions_of(tenant).get(channel).map(|known| known.position().clone())
    }

    /// Moves `channel`'s received position to `position` (messages up to it are accounted
    /// for), unless it is already there or beyond, or the channel has no local connections.
    pub fn skip_to(&self, channel: &Channel, position: &StreamPosition) {
        let Some(tenant) = channel.tenant() else { return };
        if let Some(known) = self.positions_of(tenant).get_mut(channel) {
            known.skip_to(position);
        }
    }

    /// Every history channel with local connections and the last position received on it.
    pub fn received_positions(&self) -> Vec<(Channel, StreamPosition)> {
        self.positions
            .iter()
            .flat_map(|positions| {
                let positions = positions.lock().unwrap_or_else(PoisonError::into_inner);
                positions.iter().map(|(c, known)| (c.clone(), known.position().clone())).collect::<Vec<_>>()
            })
            .collect()
    }
}
