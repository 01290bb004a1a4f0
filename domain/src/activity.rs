//! Recent activity in bounded memory: counts over a sliding minute, and the heaviest keys of a
//! stream of events (which channels carry the most messages) without one counter per key.
//!
//! Times are whole Unix seconds, given by the caller.

use std::collections::HashMap;
use std::hash::Hash;

/// The span every sliding count covers, in seconds.
pub const WINDOW_SECS: u64 = 60;

/// How many seconds each slot of a [`SlidingTop`] covers: the window it ranks is the last 55
/// to 60 seconds, the current slot being partly over.
const TOP_SLOT_SECS: u64 = 5;
const TOP_SLOTS: usize = (WINDOW_SECS / TOP_SLOT_SECS) as usize;

/// A ring of `N` slots, each covering `span` seconds, the newest at `newest`: what both
/// sliding structures advance the same way.
#[derive(Debug, Clone)]
struct Ring<T, const N: usize> {
    slots: [T; N],
    span: u64,
    /// The index (second / span) of the newest slot written.
    newest: u64,
}

impl<T: Default, const N: usize> Ring<T, N> {
    fn new(span: u64) -> Self {
        Self { slots: std::array::from_fn(|_| T::default()), span, newest: 0 }
    }

    /// The slot of `second`, clearing the slots skipped since the newest one; `None` for a
    /// second already out of the window.
    fn slot(&mut self, second: u64) -> Option<&mut T> {
        let index = second / self.span;
        if index > self.newest {
            let skipped = index - self.newest;
            if skipped >= N as u64 {
                self.slots.iter_mut().for_each(|slot| *slot = T::default());
            } else {
                for cleared in self.newest + 1..=index {
                    self.slots[(cleared % N as u64) as usize] = T::default();
                }
            }
            self.newest = index;
        } else if self.newest - index >= N as u64 {
            return None;
        }
        Some(&mut self.slots[(index % N as u64) as usize])
    }

    /// The slots within the window that ends at `second` (inclusive).
    fn within(&self, second: u64) -> impl Iterator<Item = &T> {
        let index = second / self.span;
        (0..N as u64).filter_map(move |age| {
            let slot = self.newest.checked_sub(age)?;
            (slot + (N as u64) > index && slot <= index).then(|| &self.slots[(slot % N as u64) as usize])
        })
    }
}

/// Events counted per second over the last [`WINDOW_SECS`] seconds: 60 counters, whatever
/// the rate.
#[derive(Debug, Clone)]
pub struct SlidingCount(Ring<u32, { WINDOW_SECS as usize }>);

impl Default for SlidingCount {
    fn default() -> Self {
        Self(Ring::new(1))
    }
}

impl SlidingCount {
    /// Counts `n` events at `second`. A second older than the window is ignored.
    pub fn add(&mut self, second: u64, n: u64) {
        if let Some(slot) = self.0.slot(second) {
            *slot = slot.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        }
    }

    /// The events of the [`WINDOW_SECS`] seconds ending with `second`.
    pub fn total(&self, second: u64) -> u64 {
        self.0.within(second).map(|count| u64::from(*count)).sum()
    }
}

/// The keys with the most events, counted with the Space-Saving algorithm in at most
/// `capacity` counters: a key not counted yet takes the place of the smallest counter and
/// inherits its count. Every key whose true count exceeds `total / capacity` is kept, and a
/// kept key's count exceeds its true count by at most the count it inherited.
#[derive(Debug, Clone)]
pub struct HeavyKeys<K> {
    capacity: usize,
    counts: HashMap<K, u64>,
}

impl<K> Default for HeavyKeys<K> {
    fn default() -> Self {
        Self { capacity: 0, counts: HashMap::new() }
    }
}

impl<K: Clone + Eq + Hash> HeavyKeys<K> {
    pub fn new(capacity: usize) -> Self {
        Self { capacity: capacity.max(1), counts: HashMap::with_capacity(capacity.max(1)) }
    }

    /// Counts `n` events of `key`.
    pub fn add(&mut self, key: &K, n: u64) {
        if let Some(count) = self.counts.get_mut(key) {
            *count += n;
            return;
        }
        let capacity = self.capacity.max(1);
        let inherited = if self.counts.len() < capacity {
            0
        } else {
            let Some((smallest, count)) =
                self.counts.iter().min_by_key(|(_, count)| **count).map(|(k, c)| (k.clone(), *c))
            else {
                return;
            };
            self.counts.remove(&smallest);
            count
        };
        self.counts.insert(key.clone(), inherited + n);
    }

    /// Every counted key with its count.
    pub fn iter(&self) -> impl Iterator<Item = (&K, u64)> {
        self.counts.iter().map(|(key, count)| (key, *count))
    }
}

/// The heaviest keys of the last [`WINDOW_SECS`] seconds, in slots of 5 seconds with
/// `capacity` counters each.
#[derive(Debug, Clone)]
pub struct SlidingTop<K> {
    ring: Ring<HeavyKeys<K>, TOP_SLOTS>,
    capacity: usize,
}

impl<K: Clone + Eq + Hash> SlidingTop<K> {
    pub fn new(capacity: usize) -> Self {
        Self { ring: Ring::new(TOP_SLOT_SECS), capacity }
    }

    /// Counts `n` events of `key` at `second`. A second older than the window is ignored.
    pub fn add(&mut self, second: u64, key: &K, n: u64) {
        let capacity = self.capacity;
        if let Some(slot) = self.ring.slot(second) {
            if slot.capacity == 0 {
                *slot = HeavyKeys::new(capacity);
            }
            slot.add(key, n);
        }
    }

    /// The `n` heaviest keys of the window ending with `second`, heaviest first, with their
    /// counts (ties in no particular order).
    pub fn top(&self, second: u64, n: usize) -> Vec<(K, u64)> {
        let mut sums: HashMap<&K, u64> = HashMap::new();
        for slot in self.ring.within(second) {
            for (key, count) in slot.iter() {
                *sums.entry(key).or_default() += count;
            }
        }
        let mut top: Vec<(K, u64)> = sums.into_iter().map(|(key, count)| (key.clone(), count)).collect();
        top.sort_unstable_by_key(|entry| std::cmp::Reverse(entry.1));
        top.truncate(n);
        top
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sliding_count_holds_the_last_minute_and_forgets_the_rest() {
        let mut count = SlidingCount::default();
        count.add(1000, 5);
        count.add(1030, 2);
        count.add(1059, 1);
        assert_eq!(count.total(1059), 8);
        assert_eq!(count.total(1060), 3, "second 1000 left the window");
        assert_eq!(count.total(1089), 3);
        assert_eq!(count.total(1090), 1);
        assert_eq!(count.total(1119), 0);
        count.add(1200, 4);
        assert_eq!(count.total(1200), 4, "a gap longer than the window clears it");
        count.add(1100, 9);
        assert_eq!(count.total(1200), 4, "a second older than the window is ignored");
        count.add(1190, 1);
        assert_eq!(count.total(1200), 5, "a late second within the window counts");
    }

    #[test]
    fn a_sliding_count_queried_before_its_newest_second_leaves_out_the_later_ones() {
        let mut count = SlidingCount::default();
        count.add(500, 1);
        count.add(510, 1);
        assert_eq!(count.total(505), 1);
    }

    #[test]
    fn heavy_keys_keep_the_frequent_keys_in_bounded_counters() {
        // Distinct cold keys only ever take the smallest counter.
        let mut heavy: HeavyKeys<String> = HeavyKeys::new(4);
        for round in 0..1000u64 {
            heavy.add(&"hot".to_owned(), 3);
            heavy.add(&"warm".to_owned(), 1);
            heavy.add(&format!("cold-{round}"), 1);
        }
        assert_eq!(heavy.iter().count(), 4);
        let counts: HashMap<&String, u64> = heavy.iter().collect();
        assert_eq!(counts[&"hot".to_owned()], 3000);
        assert_eq!(counts[&"warm".to_owned()], 1000);
    }

    #[test]
    fn the_sliding_top_ranks_the_keys_of_the_last_minute() {
        let mut top = SlidingTop::new(8);
        top.add(100, &"old", 50);
        top.add(150, &"a", 3);
        top.add(155, &"b", 5);
        top.add(158, &"a", 4);
        assert_eq!(top.top(159, 2), vec![("old", 50), ("a", 7)]);
        assert_eq!(top.top(160, 3), vec![("a", 7), ("b", 5)], "second 100 left the window");
        assert!(top.top(400, 3).is_empty());
    }
}
