//! The in-process store of the rate limiters when Redis is unavailable: keys that expire.

use std::collections::HashMap;

/// Entries are never pruned below this size: scanning a small map buys nothing.
const MIN_PRUNE: usize = 1024;

/// A map whose entries expire at a time in micros (of the limiter's clock), pruned lazily.
///
/// Expired entries are invisible at once and removed by a full scan that runs only when the
/// map has doubled in size since the previous scan. A scan of `n` entries so follows at least
/// `n / 2` insertions, and every operation costs O(1) amortised. (The table this replaces
/// scanned every entry on every check once it held 100,000 live keys, all under the one
/// mutex every login and API call takes.) Its size is bounded by the keys live at once, which
/// the limits themselves bound: a GCRA key lives at most one period.
pub(super) struct LocalTable<V> {
    entries: HashMap<String, (u64, V)>,
    /// The size at which the next insertion scans and prunes.
    prune_at: usize,
    /// Entries visited by scans so far: what the amortised bound is tested against.
    scanned: u64,
}

impl<V> Default for LocalTable<V> {
    fn default() -> Self {
        LocalTable {
            entries: HashMap::new(),
            prune_at: MIN_PRUNE,
            scanned: 0,
        }
    }
}

impl<V> LocalTable<V> {
    /// The live value of `key` at `now`.
    pub(super) fn get(&self, key: &str, now: u64) -> Option<&V> {
        self.entries
            .get(key)
            .filter(|(expires, _)| *expires > now)
            .map(|(_, value)| value)
    }

    /// Sets `key` to `value` until `expires`.
    pub(super) fn insert(&mut self, key: &str, expires: u64, value: V, now: u64) {
        if self.entries.len() >= self.prune_at && !self.entries.contains_key(key) {
            self.prune(now);
        }
        match self.entries.get_mut(key) {
            Some(entry) => *entry = (expires, value),
            None => {
                self.entries.insert(key.to_string(), (expires, value));
            }
        }
    }

    pub(super) fn remove(&mut self, key: &str) {
        self.entries.remove(key);
    }

    fn prune(&mut self, now: u64) {
        self.scanned += self.entries.len() as u64;
        self.entries.retain(|_, (expires, _)| *expires > now);
        self.prune_at = (2 * self.entries.len()).max(MIN_PRUNE);
    }

    #[cfg(test)]
    pub(super) fn scanned(&self) -> u64 {
        self.scanned
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expired_entries_are_invisible_and_pruned_without_a_scan_per_insertion() {
        let mut table = LocalTable::default();
        table.insert("a", 10, 1, 0);
        assert_eq!(table.get("a", 9), Some(&1));
        assert_eq!(table.get("a", 10), None);

        // 200,000 keys that all stay live: the old table rescanned all of them on every
        // insertion past 100,000 (10^10 visits); this one visits each about twice.
        let mut table = LocalTable::default();
        let n = 200_000u64;
        for i in 0..n {
            table.insert(&format!("k{i}"), u64::MAX, (), i);
        }
        assert_eq!(table.len(), n as usize);
        assert!(
            table.scanned() <= 2 * n,
            "{} entries scanned for {n} insertions",
            table.scanned()
        );
        // Dead entries go at the next scan.
        let mut table = LocalTable::default();
        for i in 0..5_000u64 {
            table.insert(&format!("k{i}"), i + 1, (), i);
        }
        assert!(table.len() < 5_000, "expired keys were pruned");
    }
}
