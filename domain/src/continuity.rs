//! Continuity of one channel as an instance receives it: whether a message follows the one
//! received before it, or messages were lost in between.
//!
//! Pub/Sub delivers each message at most once and in order, so on an unbroken history the
//! offsets an instance receives on a channel go 1, 2, 3… without a hole. Anything else — a
//! skipped offset, an offset already seen (the history was restored from an older copy), a new
//! epoch (the history was lost) — is a gap, and the channel's local clients must recover.

use crate::StreamPosition;

/// What a message's position says about the messages received before it on its channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Continuity {
    /// The next message, or the first since the channel was subscribed here.
    Next,
    /// Messages before it never arrived, or the channel's history was lost or went back.
    Gap,
}

/// Where one history channel stands on an instance.
///
/// It starts either from the first message received ([`ChannelContinuity::received`]) or from
/// a position read from the history when a connection was admitted
/// ([`ChannelContinuity::admitted`]). An admitted position lets a message lost before the first
/// arrival be noticed later, when the history is compared with it, but an arriving message is
/// never judged against it: one published just before the read may still be on its way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelContinuity {
    position: StreamPosition,
    admitted: bool,
}

impl ChannelContinuity {
    /// The channel stands at `position`, the position of a message that arrived.
    pub fn received(position: StreamPosition) -> Self {
        Self { position, admitted: false }
    }

    /// The channel stands at `position`, read from its history when a connection was admitted;
    /// no message has arrived yet.
    pub fn admitted(position: StreamPosition) -> Self {
        Self { position, admitted: true }
    }

    /// The last position received, or else the one admitted at.
    pub fn position(&self) -> &StreamPosition {
        &self.position
    }

    /// Records the arrival of a message at `next` and tells whether it follows the previous one.
    pub fn advance(&mut self, next: &StreamPosition) -> Continuity {
        // An admitted position is not judged against (see the type's docs).
        let follows = self.admitted
            || (self.position.epoch == next.epoch
                && self.position.offset.checked_add(1) == Some(next.offset));
        let continuity = if follows { Continuity::Next } else { Continuity::Gap };
        self.position = next.clone();
        self.admitted = false;
        continuity
    }

    /// Moves to `position` when it is ahead (messages up to it are accounted for, e.g. a
    /// recovery read them from the history) or in another epoch; never goes back.
    pub fn skip_to(&mut self, position: &StreamPosition) {
        if self.position.epoch != position.epoch || self.position.offset < position.offset {
            self.position = position.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(epoch: &str, offset: u64) -> StreamPosition {
        StreamPosition::new(epoch, offset)
    }

    #[test]
    fn consecutive_offsets_are_next() {
        let mut channel = ChannelContinuity::received(at("e", 1));
        assert_eq!(channel.advance(&at("e", 2)), Continuity::Next);
        assert_eq!(channel.advance(&at("e", 3)), Continuity::Next);
        assert_eq!(channel.position(), &at("e", 3));
    }

    #[test]
    fn a_skipped_offset_is_a_gap_and_the_position_moves_on() {
        let mut channel = ChannelContinuity::received(at("e", 1));
        assert_eq!(channel.advance(&at("e", 3)), Continuity::Gap);
        assert_eq!(channel.position(), &at("e", 3));
        assert_eq!(channel.advance(&at("e", 4)), Continuity::Next);
    }

    #[test]
    fn an_offset_seen_again_is_a_gap() {
        let mut channel = ChannelContinuity::received(at("e", 5));
        assert_eq!(channel.advance(&at("e", 5)), Continuity::Gap);
        assert_eq!(channel.advance(&at("e", 2)), Continuity::Gap);
        assert_eq!(channel.position(), &at("e", 2));
    }

    #[test]
    fn a_new_epoch_is_a_gap_even_at_offset_one() {
        let mut channel = ChannelContinuity::received(at("old", 7));
        assert_eq!(channel.advance(&at("new", 1)), Continuity::Gap);
        assert_eq!(channel.position(), &at("new", 1));
        assert_eq!(channel.advance(&at("new", 2)), Continuity::Next);
    }

    #[test]
    fn the_first_arrival_after_an_admission_is_not_judged() {
        let mut channel = ChannelContinuity::admitted(at("e", 10));
        assert_eq!(channel.advance(&at("e", 10)), Continuity::Next, "published just before the read");
        assert_eq!(channel.advance(&at("e", 11)), Continuity::Next);
        assert_eq!(channel.advance(&at("e", 13)), Continuity::Gap);
    }

    #[test]
    fn the_last_offset_has_no_next() {
        let mut channel = ChannelContinuity::received(at("e", u64::MAX));
        assert_eq!(channel.advance(&at("e", 0)), Continuity::Gap);
    }

    #[test]
    fn the_admitted_position_stands_until_a_message_arrives() {
        let channel = ChannelContinuity::admitted(at("e", 4));
        assert_eq!(channel.position(), &at("e", 4));
    }

    #[test]
    fn skip_to_moves_forward_only_within_an_epoch() {
        let mut channel = ChannelContinuity::received(at("e", 5));
        channel.skip_to(&at("e", 3));
        assert_eq!(channel.position(), &at("e", 5));
        channel.skip_to(&at("e", 5));
        assert_eq!(channel.position(), &at("e", 5));
        channel.skip_to(&at("e", 9));
        assert_eq!(channel.position(), &at("e", 9));
        assert_eq!(channel.advance(&at("e", 10)), Continuity::Next);
    }

    #[test]
    fn skip_to_another_epoch_always_moves() {
        let mut channel = ChannelContinuity::received(at("old", 50));
        channel.skip_to(&at("new", 2));
        assert_eq!(channel.position(), &at("new", 2));
        assert_eq!(channel.advance(&at("new", 3)), Continuity::Next);
    }

    #[test]
    fn skip_to_keeps_an_admitted_position_unjudged() {
        let mut channel = ChannelContinuity::admitted(at("e", 4));
        channel.skip_to(&at("e", 6));
        assert_eq!(channel.position(), &at("e", 6));
        assert_eq!(channel.advance(&at("e", 5)), Continuity::Next);
    }
}
