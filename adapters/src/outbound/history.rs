//! What both brokers share about channel history: its settings, epochs, and the way a
//! position is written into an envelope.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::outbound::system::random_bytes;

/// How much history each `tenant:` and `user:` channel keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistorySettings {
    /// Messages kept per channel; 0 turns history (and offsets) off.
    pub size: usize,
    /// How long a message is kept; a channel's position itself is forgotten (and its next
    /// message starts a new epoch) once nothing was published to or read from it for this long.
    pub ttl: Duration,
}

impl Default for HistorySettings {
    fn default() -> Self {
        Self { size: 100, ttl: Duration::from_secs(3600) }
    }
}

impl HistorySettings {
    /// History turned off.
    pub fn off() -> Self {
        Self { size: 0, ..Self::default() }
    }

    pub fn is_on(&self) -> bool {
        self.size > 0
    }
}

/// Hands out epochs no other instance or run ever hands out: a random prefix per process and a
/// counter.
#[derive(Debug)]
pub struct Epochs {
    prefix: String,
    counter: AtomicU64,
}

impl Default for Epochs {
    fn default() -> Self {
        // Without randomness, the start time in nanoseconds still differs between runs.
        let bytes = random_bytes(6).unwrap_or_else(|_| {
            let nanos =
                SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
            nanos.to_le_bytes()[..6].to_vec()
        });
        Self { prefix: crate::outbound::system::hex(&bytes), counter: AtomicU64::new(0) }
    }
}

impl Epochs {
    pub fn next(&self) -> String {
        format!("{}-{}", self.prefix, self.counter.fetch_add(1, Ordering::Relaxed))
    }
}

/// `envelope` with `"offset"` and `"epoch"` added as its last fields (see
/// [`domain::envelope::with_position`]).
pub fn with_position(envelope: &[u8], offset: u64, epoch: &str) -> Option<Bytes> {
    domain::envelope::with_position(envelope, offset, epoch).map(Bytes::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_are_never_repeated_and_are_valid_epochs() {
        let (a, b) = (Epochs::default(), Epochs::default());
        let all = [a.next(), a.next(), b.next()];
        assert_ne!(all[0], all[1]);
        assert_ne!(all[0], all[2]);
        assert!(all.iter().all(|e| domain::position::is_valid_epoch(e)));
    }
}
