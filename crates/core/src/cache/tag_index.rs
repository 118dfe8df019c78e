//! Which keys of the in-process tier carry each tag, so that invalidating a tag removes
//! exactly those keys. Namespaces are not indexed here: an invalidation of one moves its
//! generation on instead (`NsCounters::generation`), so a key with no tag of its own (most
//! keys) takes no lock and adds nothing here.
//!
//! moka can invalidate by predicate, but every registered predicate is checked against
//! entries on read and in background scans until it has been applied: with one predicate per
//! tag invalidation (a write-heavy load makes hundreds a second) that halved concurrent write
//! throughput in the benchmark. This index makes a tag invalidation a few hash-map removals.
//!
//! Entering a key under its tags and inserting it into the tier happen under one lock, and
//! an invalidation takes a tag's keys under the same lock, after the engine bumped the tag's
//! mark: so either the invalidation finds the key, or the inserter's re-check (after its
//! insert) sees the mark and removes it. Keys that leave the tier otherwise (expiry,
//! eviction, key invalidation) are pruned from time to time.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use moka::sync::Cache as Moka;

use super::MemEntry;

/// Fewest inserts of tagged keys between two prunes of keys that left the tier. A prune walks
/// the whole index under the lock, so it also waits for four times the entries the last one
/// kept: amortised O(1) per insert, an index at most five times its live entries (plus this),
/// and rare pauses in a big one.
const PRUNE_EVERY: u64 = 10_000;

#[derive(Default)]
pub(crate) struct TagIndex {
    keys_by_tag: Mutex<HashMap<String, HashSet<String>>>,
    /// Inserts of tagged keys since the last prune.
    inserts: AtomicU64,
    /// Entries (a key under a tag) the last prune kept.
    kept: AtomicU64,
}

impl TagIndex {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashSet<String>>> {
        self.keys_by_tag.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Inserts `key` into `memory` and enters it under each of `tags` (the caller's: a
    /// namespace is not a tag here, see [`NsCounters::generation`](super::stats::NsCounters)).
    /// A key with no tags takes no lock: nothing here has to agree with it.
    pub fn insert(
        &self,
        memory: &Moka<String, MemEntry>,
        key: String,
        entry: MemEntry,
        tags: &[String],
    ) {
        if tags.is_empty() {
            memory.insert(key, entry);
            return;
        }
        let since = self.inserts.fetch_add(1, Ordering::Relaxed) + 1;
        if since >= PRUNE_EVERY.max(self.kept.load(Ordering::Relaxed).saturating_mul(4)) {
            self.inserts.store(0, Ordering::Relaxed);
            self.prune(memory);
        }
        let mut index = self.lock();
        for tag in tags {
            index.entry(tag.clone()).or_default().insert(key.clone());
        }
        memory.insert(key, entry);
    }

    /// Removes from `memory` every key entered under any of `tags`.
    pub fn invalidate(&self, memory: &Moka<String, MemEntry>, tags: &[String]) {
        let keys: Vec<String> = {
            let mut index = self.lock();
            tags.iter()
                .filter_map(|tag| index.remove(tag))
                .flatten()
                .collect()
        };
        for key in keys {
            memory.invalidate(&key);
        }
    }

    /// Empties `memory` and the index together: a tagged insert racing with this lands either
    /// before (and goes) or after (and stays indexed), never in the tier but not the index. An
    /// untagged one takes no lock: moka orders it before `invalidate_all` (gone) or after.
    pub fn invalidate_all(&self, memory: &Moka<String, MemEntry>) {
        let mut index = self.lock();
        index.clear();
        memory.invalidate_all();
    }

    /// Forgets keys that are no longer in `memory`, so the index stays the size of what it
    /// points at.
    fn prune(&self, memory: &Moka<String, MemEntry>) {
        let mut index = self.lock();
        let mut kept = 0;
        index.retain(|_, keys| {
            keys.retain(|key| memory.contains_key(key));
            kept += keys.len() as u64;
            !keys.is_empty()
        });
        self.kept.store(kept, Ordering::Relaxed);
    }

    /// Tags and keys entered, for tests.
    #[cfg(test)]
    fn size(&self) -> (usize, usize) {
        let index = self.lock();
        (index.len(), index.values().map(HashSet::len).sum())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn entry() -> MemEntry {
        MemEntry {
            bytes: Some(Arc::from(&b"v"[..])),
            etag: Arc::default(),
            generation: 0,
            ttl: Duration::from_secs(60),
            expires_at_ms: 0,
            delta_ms: 0,
        }
    }

    fn tags(tags: &[&str]) -> Vec<String> {
        tags.iter().map(|t| t.to_string()).collect()
    }

    #[test]
    fn a_tag_removes_exactly_its_keys_and_the_index_forgets_what_left() {
        let memory: Moka<String, MemEntry> = Moka::new(1000);
        let index = TagIndex::default();
        index.insert(&memory, "a".into(), entry(), &tags(&["t1", "x"]));
        index.insert(&memory, "b".into(), entry(), &tags(&["t2", "x"]));
        index.insert(&memory, "c".into(), entry(), &tags(&["t2", "y"]));

        index.invalidate(&memory, &["t2".to_string()]);
        assert!(memory.contains_key("a"));
        assert!(!memory.contains_key("b") && !memory.contains_key("c"));

        index.invalidate(&memory, &["x".to_string()]);
        assert!(!memory.contains_key("a"));

        // Keys that left by other means are pruned.
        index.insert(&memory, "d".into(), entry(), &tags(&["t3"]));
        memory.invalidate("d");
        index.prune(&memory);
        assert_eq!(index.size(), (0, 0), "nothing left to point at");
    }

    #[test]
    fn many_untagged_entries_do_not_let_dead_tagged_keys_pile_up() {
        let memory: Moka<String, MemEntry> = Moka::new(1_000_000);
        let index = TagIndex::default();
        for i in 0..20_000 {
            index.insert(&memory, format!("u{i}"), entry(), &[]);
        }
        memory.run_pending_tasks();
        assert_eq!(index.size(), (0, 0), "untagged keys are not indexed");
        // Tagged keys that leave the tier as soon as they are in: prunes keep up with them,
        // whatever the number of untagged entries beside them.
        let tag = tags(&["churn"]);
        for i in 0..30_000 {
            let key = format!("t{i}");
            index.insert(&memory, key.clone(), entry(), &tag);
            memory.invalidate(&key);
        }
        let (_, keys) = index.size();
        assert!(
            keys as u64 <= PRUNE_EVERY,
            "{keys} dead keys indexed, more than a prune's period"
        );
    }
}
