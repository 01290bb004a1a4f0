//! The operating system's clock and randomness.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use application::ports::{Clock, IdGenerator};
use domain::{ConnectionId, MessageId, Timestamp};

/// Wall-clock time.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let millis = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or_default();
        Timestamp::from_unix_millis(u64::try_from(millis).unwrap_or(u64::MAX))
    }
}

/// Ids made of a random 64-bit instance prefix and a counter: unique across instances without
/// coordination, and cheap (one atomic increment per id).
#[derive(Debug)]
pub struct RandomIdGenerator {
    prefix: String,
    counter: AtomicU64,
}

/// Why randomness could not be obtained.
#[derive(Debug, thiserror::Error)]
#[error("the operating system refused to provide random bytes: {0}")]
pub struct RandomnessError(String);

/// `n` random bytes from the operating system.
///
/// # Errors
/// [`RandomnessError`] when the operating system has no randomness to give.
pub fn random_bytes(n: usize) -> Result<Vec<u8>, RandomnessError> {
    let mut buf = vec![0u8; n];
    getrandom::fill(&mut buf).map_err(|e| RandomnessError(e.to_string()))?;
    Ok(buf)
}

/// `n` random bytes as lower-case hexadecimal (`2 n` characters).
///
/// # Errors
/// [`RandomnessError`] when the operating system has no randomness to give.
pub fn random_hex(n: usize) -> Result<String, RandomnessError> {
    Ok(hex(&random_bytes(n)?))
}

/// Lower-case hexadecimal of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl RandomIdGenerator {
    /// # Errors
    /// [`RandomnessError`] when the instance prefix cannot be drawn.
    pub fn new() -> Result<Self, RandomnessError> {
        let prefix = random_hex(8)?;
        Ok(Self { prefix, counter: AtomicU64::new(0) })
    }

    fn next(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n:x}", self.prefix)
    }
}

impl IdGenerator for RandomIdGenerator {
    fn connection_id(&self) -> ConnectionId {
        // Hex digits and a dash always make a valid id.
        ConnectionId::parse(&format!("c{}", self.next())).unwrap_or_else(|_| unreachable!("hex id"))
    }

    fn message_id(&self) -> MessageId {
        MessageId::parse(&self.next()).unwrap_or_else(|_| unreachable!("hex id"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_are_unique_within_and_across_generators() {
        let (a, b) = (RandomIdGenerator::new().expect("random"), RandomIdGenerator::new().expect("random"));
        let ids: HashSet<String> =
            (0..1000).flat_map(|_| [a.message_id().to_string(), b.message_id().to_string()]).collect();
        assert_eq!(ids.len(), 2000);
        assert_ne!(a.connection_id(), b.connection_id());
    }

    #[test]
    fn the_clock_reads_the_present() {
        let now = SystemClock.now();
        assert!(now.to_string().starts_with("20"), "{now}");
    }
}
