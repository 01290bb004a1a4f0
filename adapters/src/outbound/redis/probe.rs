//! The probe: a subscriber connection can stay open and deliver nothing (the state a connection
//! can be left in after a failover), so every period a sequence number is published through the
//! pools on a channel of this instance, and expected back through the subscriber. One
//! [`ProbeTracker`] per probe channel judges what came back: one for the subscriber on one
//! Redis, one per master on a Redis Cluster.
//!
//! A probe is judged by its own age, not by a count of periods in a row with a probe missing, so
//! that a subscriber that keeps up with a delay (an instance busy with a burst, whose every probe
//! comes back, but late) is not replaced: that would lose what is published while it reconnects.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::Shared;

/// Periods a probe Redis accepted may take to come back before the subscription counts as
/// missing messages (the instance is not ready meanwhile)…
const LATE_AFTER: u32 = 2;
/// …and before it is presumed deaf.
const LOST_AFTER: u32 = 3;
/// Probes kept waiting at most; older ones are forgotten (the subscription is replaced long
/// before).
const PENDING_MAX: usize = 64;

/// What the oldest probe Redis accepted and that has not come back says of the subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// No probe has been waiting [`LATE_AFTER`] periods.
    OnTime,
    /// One has: the subscription may be missing messages.
    Late,
    /// One has been waiting [`LOST_AFTER`] periods or more, `periods` in all: the subscription
    /// is presumed deaf.
    Lost { periods: u32 },
}

/// The probes of one probe channel, sent and come back.
///
/// A tracker belongs to one subscription: a new one starts with a new tracker, so that probes
/// sent for an earlier one are not expected by it. Sequence numbers are unique in the process
/// (see [`send`]), so a late probe of an earlier subscription never stands for a later one.
#[derive(Debug)]
pub(super) struct ProbeTracker {
    period: Duration,
    /// Probes Redis accepted and not yet seen back, with when each was accepted, oldest first.
    pending: VecDeque<(u64, Instant)>,
    /// Highest probe seen back.
    received: u64,
    /// The last probe's publish failed: Redis (on a cluster, this master) cannot be reached.
    refused: bool,
}

impl ProbeTracker {
    /// A tracker for probes sent every `period`.
    pub(super) fn new(period: Duration) -> Self {
        Self { period, pending: VecDeque::new(), received: 0, refused: false }
    }

    /// A tracker shared by the subscriber and the tasks that send its probes.
    pub(super) fn shared(period: Duration) -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(Self::new(period)))
    }

    /// Records the publish of probe `seq` at `now`: only a probe Redis accepted is expected back.
    pub(super) fn sent(&mut self, seq: u64, accepted: bool, now: Instant) {
        self.refused = !accepted;
        if !accepted {
            return;
        }
        if self.pending.len() == PENDING_MAX {
            self.pending.pop_front();
        }
        self.pending.push_back((seq, now));
    }

    /// Records a probe message that came back through the subscriber (its payload is the
    /// sequence number); every probe up to it counts as back.
    pub(super) fn received(&mut self, payload: &[u8]) {
        if let Some(seq) = std::str::from_utf8(payload).ok().and_then(|s| s.parse().ok()) {
            self.received = self.received.max(seq);
        }
    }

    /// Whether the last probe's publish failed.
    pub(super) fn refused(&self) -> bool {
        self.refused
    }

    /// Judges the oldest probe Redis accepted and that has not come back, by its age at `now`.
    ///
    /// Judged once per period, half a period early: a probe is sent right after a period starts
    /// and accepted a round trip later, so its age at a period's start is just under a multiple
    /// of the period.
    pub(super) fn judge(&mut self, now: Instant) -> Verdict {
        let received = self.received;
        self.pending.retain(|(seq, _)| *seq > received);
        let Some((_, accepted)) = self.pending.front() else { return Verdict::OnTime };
        let age = now.saturating_duration_since(*accepted) + self.period / 2;
        let periods = u32::try_from(age.as_nanos() / self.period.as_nanos().max(1)).unwrap_or(u32::MAX);
        if periods >= LOST_AFTER {
            Verdict::Lost { periods }
        } else if periods >= LATE_AFTER {
            Verdict::Late
        } else {
            Verdict::OnTime
        }
    }
}

/// Locks `tracker`; its state stays usable even if a holder panicked.
pub(super) fn lock(tracker: &Mutex<ProbeTracker>) -> MutexGuard<'_, ProbeTracker> {
    tracker.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Publishes the next probe on `channel` through the pools and records it in `tracker`.
pub(super) async fn send(shared: Arc<Shared>, channel: Arc<str>, tracker: Arc<Mutex<ProbeTracker>>) {
    let seq = shared.probe_sequence.fetch_add(1, Ordering::Relaxed) + 1;
    let accepted = shared.publish_bytes(&channel, seq.to_string().as_bytes()).await.is_ok();
    lock(&tracker).sent(seq, accepted, Instant::now());
}

#[cfg(test)]
mod tests {
    use super::*;

    const PERIOD: Duration = Duration::from_secs(1);

    fn periods(n: f64) -> Duration {
        PERIOD.mul_f64(n)
    }

    #[test]
    fn a_probe_that_came_back_leaves_the_subscription_on_time() {
        let start = Instant::now();
        let mut tracker = ProbeTracker::new(PERIOD);
        tracker.sent(1, true, start);
        tracker.received(b"1");
        assert_eq!(tracker.judge(start + periods(10.0)), Verdict::OnTime);
    }

    #[test]
    fn a_probe_waiting_two_periods_is_late_and_three_is_lost() {
        let start = Instant::now();
        let mut tracker = ProbeTracker::new(PERIOD);
        tracker.sent(1, true, start);
        assert_eq!(tracker.judge(start + periods(1.0)), Verdict::OnTime);
        assert_eq!(tracker.judge(start + periods(2.0)), Verdict::Late);
        assert_eq!(tracker.judge(start + periods(3.0)), Verdict::Lost { periods: 3 });
        assert_eq!(tracker.judge(start + periods(6.0)), Verdict::Lost { periods: 6 });
    }

    #[test]
    fn ages_are_judged_half_a_period_early() {
        // Accepted a round trip after the period started: at the third period's start it is
        // just under three periods old.
        let start = Instant::now();
        let mut tracker = ProbeTracker::new(PERIOD);
        tracker.sent(1, true, start);
        assert_eq!(tracker.judge(start + periods(1.4)), Verdict::OnTime);
        assert_eq!(tracker.judge(start + periods(1.5)), Verdict::Late);
        assert_eq!(tracker.judge(start + periods(2.5)), Verdict::Lost { periods: 3 });
    }

    #[test]
    fn a_subscription_that_keeps_up_late_is_late_and_never_lost() {
        // Every probe comes back between two and three periods after it was accepted.
        let start = Instant::now();
        let mut tracker = ProbeTracker::new(PERIOD);
        for n in 1..=20u32 {
            let tick = start + PERIOD * n;
            let expected = if n > 2 { Verdict::Late } else { Verdict::OnTime };
            assert_eq!(tracker.judge(tick), expected, "period {n}");
            tracker.sent(u64::from(n), true, tick);
            if n > 2 {
                tracker.received((n - 2).to_string().as_bytes());
            }
        }
    }

    #[test]
    fn the_oldest_probe_not_back_is_judged_even_when_later_ones_wait_too() {
        let start = Instant::now();
        let mut tracker = ProbeTracker::new(PERIOD);
        tracker.sent(1, true, start);
        tracker.sent(2, true, start + periods(1.0));
        tracker.sent(3, true, start + periods(2.0));
        assert_eq!(tracker.judge(start + periods(3.0)), Verdict::Lost { periods: 3 });
        // The second one came back: every probe before it counts as back too.
        tracker.received(b"2");
        assert_eq!(tracker.judge(start + periods(3.0)), Verdict::OnTime);
    }

    #[test]
    fn a_probe_redis_did_not_accept_is_not_expected_back_and_tells_redis_is_unreachable() {
        let start = Instant::now();
        let mut tracker = ProbeTracker::new(PERIOD);
        tracker.sent(1, false, start);
        assert!(tracker.refused());
        assert_eq!(tracker.judge(start + periods(10.0)), Verdict::OnTime);
        tracker.sent(2, true, start + periods(10.0));
        assert!(!tracker.refused());
    }

    #[test]
    fn a_payload_that_is_no_sequence_number_changes_nothing() {
        let start = Instant::now();
        let mut tracker = ProbeTracker::new(PERIOD);
        tracker.sent(1, true, start);
        tracker.received(b"not a number");
        assert_eq!(tracker.judge(start + periods(2.0)), Verdict::Late);
    }

    #[test]
    fn only_the_latest_probes_are_kept_waiting() {
        let start = Instant::now();
        let mut tracker = ProbeTracker::new(PERIOD);
        let total = u32::try_from(PENDING_MAX).expect("small") + 1;
        for n in 0..total {
            tracker.sent(u64::from(n) + 1, true, start + PERIOD * n);
        }
        // The first probe was forgotten: the oldest kept was accepted a period later.
        let now = start + PERIOD * total;
        assert_eq!(tracker.judge(now), Verdict::Lost { periods: total - 1 });
    }
}
