//! The cluster as this instance sees it: the latest report of every instance, merged on
//! demand, and one sample of it per second for the charts of the last 15 minutes.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

use super::report::{ClusterStats, InstanceReport, Sample};
use crate::ports::Clock;

/// Samples kept: 15 minutes at one per second.
pub const HISTORY_SAMPLES: usize = 900;
/// An instance silent for this long is forgotten.
pub const FORGET_AFTER_MS: u64 = 60_000;
/// How long merged figures are reused while nothing changes.
const MERGED_FOR_MS: u64 = 1_000;
/// Instances listed at most; the reports of more are ignored.
pub const MAX_INSTANCES: usize = 1024;

#[derive(Debug, Default)]
struct ViewState {
    /// Per instance id: its latest report and when it arrived (Unix ms, this instance's clock).
    reports: HashMap<String, (InstanceReport, u64)>,
    /// Oldest first.
    samples: VecDeque<Sample>,
}

/// Every instance's latest report, as received through the broker.
pub struct ClusterView {
    clock: Arc<dyn Clock>,
    state: Mutex<ViewState>,
    /// Bumped whenever a report arrives or a sample is taken.
    changed: watch::Sender<u64>,
    /// The figures merged at a version of `changed`, for every reader until the next change
    /// or for [`MERGED_FOR_MS`] at most.
    merged: Mutex<Option<(u64, Arc<ClusterStats>)>>,
}

impl std::fmt::Debug for ClusterView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterView").finish_non_exhaustive()
    }
}

impl ClusterView {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            state: Mutex::new(ViewState::default()),
            changed: watch::Sender::new(0),
            merged: Mutex::new(None),
        }
    }

    fn now_ms(&self) -> u64 {
        self.clock.now().unix_millis()
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut ViewState) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Keeps `report` as its instance's latest, and forgets the instances silent for
    /// [`FORGET_AFTER_MS`].
    pub fn receive(&self, report: InstanceReport) {
        let now = self.now_ms();
        let kept = self.with_state(|state| {
            state.reports.retain(|_, (_, at)| now.saturating_sub(*at) <= FORGET_AFTER_MS);
            if !state.reports.contains_key(&report.id) && state.reports.len() >= MAX_INSTANCES {
                return false;
            }
            state.reports.insert(report.id.clone(), (report, now));
            true
        });
        if kept {
            self.changed.send_modify(|version| *version = version.wrapping_add(1));
        }
    }

    /// The cluster-wide figures, merged once per change (a report, a sample) however many
    /// readers ask, so that their merging never holds up the reports arriving.
    pub fn stats(&self) -> Arc<ClusterStats> {
        let version = *self.changed.borrow();
        let now = self.now_ms();
        let mut merged = self.merged.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((at, stats)) = merged.as_ref()
            && *at == version
            && now.saturating_sub(stats.generated_at_ms) < MERGED_FOR_MS
        {
            return stats.clone();
        }
        let reports: Vec<(InstanceReport, u64)> = self.with_state(|state| {
            state.reports.values().map(|(report, at)| (report.clone(), now.saturating_sub(*at))).collect()
        });
        let stats = Arc::new(ClusterStats::merge(reports.iter().map(|(r, age)| (r, *age)), now));
        *merged = Some((version, stats.clone()));
        stats
    }

    /// Takes a sample of the figures now for the charts, and returns it.
    pub fn take_sample(&self) -> Sample {
        let sample = Sample::of(&self.stats());
        self.with_state(|state| {
            if state.samples.len() == HISTORY_SAMPLES {
                state.samples.pop_front();
            }
            state.samples.push_back(sample.clone());
        });
        self.changed.send_modify(|version| *version = version.wrapping_add(1));
        sample
    }

    /// The samples taken after `after_ms` (Unix ms), oldest first.
    pub fn samples_after(&self, after_ms: u64) -> Vec<Sample> {
        self.with_state(|state| state.samples.iter().filter(|s| s.at_ms > after_ms).cloned().collect())
    }

    /// Tells of every change: a report arrived, a sample was taken.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::use_cases::test_support::SettableClock;

    fn report(id: &str, connections: usize) -> InstanceReport {
        InstanceReport { id: id.to_owned(), connections, ..InstanceReport::default() }
    }

    #[test]
    fn the_latest_report_of_each_instance_counts_until_it_falls_silent_then_it_is_forgotten() {
        let clock = SettableClock::at(100_000);
        let view = ClusterView::new(clock.clone());
        let changes = view.changes();
        view.receive(report("a", 3));
        view.receive(report("b", 4));
        view.receive(report("a", 5));
        assert!(changes.has_changed().expect("open"));
        assert_eq!(view.stats().totals.connections, 9);

        clock.advance(2_000);
        view.receive(report("b", 4));
        clock.advance(2_000);
        let stats = view.stats();
        assert_eq!(stats.totals.connections, 4, "a fell silent: {stats:?}");
        assert_eq!(stats.instances.len(), 2);

        clock.advance(FORGET_AFTER_MS);
        view.receive(report("c", 1));
        assert_eq!(view.stats().instances.len(), 1, "a and b are forgotten");
    }

    #[test]
    fn samples_cover_the_last_fifteen_minutes() {
        let clock = SettableClock::at(0);
        let view = ClusterView::new(clock.clone());
        view.receive(report("a", 2));
        for _ in 0..HISTORY_SAMPLES + 10 {
            clock.advance(1_000);
            view.receive(report("a", 2));
            view.take_sample();
        }
        let samples = view.samples_after(0);
        assert_eq!(samples.len(), HISTORY_SAMPLES);
        assert_eq!(samples[0].at_ms, 11_000);
        assert!(samples.iter().all(|s| s.connections == 2));
        assert_eq!(view.samples_after(samples[HISTORY_SAMPLES - 2].at_ms).len(), 1);
    }
}
