//! The per-connection message rate limit: a token bucket, and the rule for a client that keeps
//! flooding.

use crate::time::Timestamp;

/// How long a client may keep sending past its limit before it is disconnected.
pub const FLOOD_WINDOW_MS: u64 = 10_000;

/// A pause this long without a refused frame ends a flood.
pub const FLOOD_PAUSE_MS: u64 = 1_000;

/// What to do with one client frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateDecision {
    /// Within the limit.
    Allowed,
    /// Over the limit: drop the frame and tell the client.
    Limited,
    /// Over the limit without a break for [`FLOOD_WINDOW_MS`]: disconnect.
    Flooding,
}

/// A token bucket: `burst` tokens at most, refilled at `per_sec` tokens a second; one token a
/// frame. A rate of zero means unlimited.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    last_ms: u64,
    /// First refusal of the current flood.
    limited_since_ms: Option<u64>,
    last_limited_ms: u64,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(per_sec: u32, burst: u32, now: Timestamp) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            per_sec: f64::from(per_sec),
            burst,
            tokens: burst,
            last_ms: now.unix_millis(),
            limited_since_ms: None,
            last_limited_ms: 0,
        }
    }

    /// Takes a token for one frame arriving at `now`.
    pub fn check(&mut self, now: Timestamp) -> RateDecision {
        if self.per_sec <= 0.0 {
            return RateDecision::Allowed;
        }
        let now_ms = now.unix_millis();
        let elapsed = now_ms.saturating_sub(self.last_ms) as f64 / 1000.0;
        self.last_ms = self.last_ms.max(now_ms);
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            if now_ms.saturating_sub(self.last_limited_ms) >= FLOOD_PAUSE_MS {
                self.limited_since_ms = None;
            }
            return RateDecision::Allowed;
        }
        self.last_limited_ms = now_ms;
        let since = *self.limited_since_ms.get_or_insert(now_ms);
        if now_ms.saturating_sub(since) >= FLOOD_WINDOW_MS {
            RateDecision::Flooding
        } else {
            RateDecision::Limited
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Timestamp {
        Timestamp::from_unix_millis(ms)
    }

    #[test]
    fn a_burst_is_allowed_then_the_rate_applies() {
        let mut bucket = TokenBucket::new(10, 5, at(0));
        for _ in 0..5 {
            assert_eq!(bucket.check(at(0)), RateDecision::Allowed);
        }
        assert_eq!(bucket.check(at(0)), RateDecision::Limited);
        // 100 ms at 10/s is one token.
        assert_eq!(bucket.check(at(100)), RateDecision::Allowed);
        assert_eq!(bucket.check(at(100)), RateDecision::Limited);
        // Refill never exceeds the burst.
        for _ in 0..5 {
            assert_eq!(bucket.check(at(60_000)), RateDecision::Allowed);
        }
        assert_eq!(bucket.check(at(60_000)), RateDecision::Limited);
    }

    #[test]
    fn sending_over_the_rate_for_the_whole_window_is_flooding_even_if_some_frames_pass() {
        let mut bucket = TokenBucket::new(1, 1, at(0));
        let mut t = 0;
        let mut last = RateDecision::Allowed;
        // Ten frames a second against a limit of one: one in ten passes.
        while t <= 10_100 {
            last = bucket.check(at(t));
            if last == RateDecision::Flooding {
                break;
            }
            t += 100;
        }
        assert_eq!(last, RateDecision::Flooding);
        assert!((10_000..=10_200).contains(&t), "flooding declared at {t} ms");
    }

    #[test]
    fn a_pause_ends_a_flood() {
        let mut bucket = TokenBucket::new(1, 1, at(0));
        assert_eq!(bucket.check(at(0)), RateDecision::Allowed);
        assert_eq!(bucket.check(at(100)), RateDecision::Limited);
        // Quiet for over a second: the next frame passes and the flood clock restarts.
        assert_eq!(bucket.check(at(5_000)), RateDecision::Allowed);
        assert_eq!(bucket.check(at(5_100)), RateDecision::Limited);
        assert_eq!(bucket.check(at(14_000)), RateDecision::Allowed, "a token, and no refusal for a second");
        assert_eq!(bucket.check(at(14_050)), RateDecision::Limited);
        assert_eq!(bucket.check(at(14_900)), RateDecision::Limited, "a refusal, not a flood yet");
    }

    #[test]
    fn a_rate_of_zero_is_unlimited() {
        let mut bucket = TokenBucket::new(0, 1, at(0));
        for t in 0..1000 {
            assert_eq!(bucket.check(at(t)), RateDecision::Allowed);
        }
    }
}
