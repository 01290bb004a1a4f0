//! Positions in a channel's stream: the offset of a message and the epoch of the history it
//! belongs to.
//!
//! Every message published to a `tenant:` or `user:` channel gets the next offset of that
//! channel (1, 2, 3…, strictly increasing, with no gaps). The epoch names one unbroken history:
//! when a channel's history is lost (Redis restarted without persistence, the history expired)
//! the channel starts a new epoch and offsets start again from 1. A client that holds
//! `epoch:offset` can therefore ask for exactly what it missed, and learns when that is no
//! longer possible.

use std::fmt;

use serde::Serialize;

/// Longest accepted epoch, in bytes.
pub const MAX_EPOCH_LEN: usize = 64;

/// A channel's position: the offset of its latest message (0 before the first) in `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct StreamPosition {
    pub offset: u64,
    pub epoch: String,
}

/// Why a client-supplied position (`since=<epoch>:<offset>`) is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PositionError {
    #[error("a position is <epoch>:<offset>, e.g. 3f2a9c1e:42")]
    Malformed,
    #[error("an epoch is 1 to 64 characters among A-Z a-z 0-9 _ -")]
    InvalidEpoch,
    #[error("an offset is a non-negative integer")]
    InvalidOffset,
}

/// Whether `epoch` is 1 to 64 characters among `A-Z a-z 0-9 _ -`.
pub fn is_valid_epoch(epoch: &str) -> bool {
    !epoch.is_empty()
        && epoch.len() <= MAX_EPOCH_LEN
        && epoch.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl StreamPosition {
    pub fn new(epoch: impl Into<String>, offset: u64) -> Self {
        Self { offset, epoch: epoch.into() }
    }

    /// Parses `<epoch>:<offset>`.
    ///
    /// # Errors
    /// [`PositionError`] naming what is wrong.
    pub fn parse(text: &str) -> Result<Self, PositionError> {
        let (epoch, offset) = text.rsplit_once(':').ok_or(PositionError::Malformed)?;
        if !is_valid_epoch(epoch) {
            return Err(PositionError::InvalidEpoch);
        }
        if offset.is_empty() || !offset.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PositionError::InvalidOffset);
        }
        let offset = offset.parse().map_err(|_| PositionError::InvalidOffset)?;
        Ok(Self::new(epoch, offset))
    }
}

impl fmt::Display for StreamPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.epoch, self.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_through_their_text_form() {
        let position = StreamPosition::parse("3f2a-9c_1e:42").expect("valid");
        assert_eq!(position, StreamPosition::new("3f2a-9c_1e", 42));
        assert_eq!(position.to_string(), "3f2a-9c_1e:42");
        assert_eq!(StreamPosition::parse("e:0"), Ok(StreamPosition::new("e", 0)));
        assert_eq!(StreamPosition::parse(&format!("e:{}", u64::MAX)), Ok(StreamPosition::new("e", u64::MAX)));
    }

    #[test]
    fn malformed_positions_are_refused_with_the_reason() {
        assert_eq!(StreamPosition::parse("42"), Err(PositionError::Malformed));
        assert_eq!(StreamPosition::parse(":42"), Err(PositionError::InvalidEpoch));
        assert_eq!(StreamPosition::parse("a:b:42"), Err(PositionError::InvalidEpoch));
        assert_eq!(StreamPosition::parse(&format!("{}:1", "e".repeat(65))), Err(PositionError::InvalidEpoch));
        assert_eq!(StreamPosition::parse("e:"), Err(PositionError::InvalidOffset));
        assert_eq!(StreamPosition::parse("e:-1"), Err(PositionError::InvalidOffset));
        assert_eq!(StreamPosition::parse("e:+1"), Err(PositionError::InvalidOffset));
        assert_eq!(StreamPosition::parse("e:18446744073709551616"), Err(PositionError::InvalidOffset));
    }
}
