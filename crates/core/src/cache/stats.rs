//! Per-namespace counters, kept with atomics so recording never blocks a read.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::RwLock;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use serde::Serialize;

#[derive(Default)]
pub(crate) struct NsCounters {
    pub near_hits: AtomicU64,
    pub shared_hits: AtomicU64,
    pub misses: AtomicU64,
    /// Keys loaded.
    pub loads: AtomicU64,
    /// Loader calls that loaded them: a batch (`load_batch.rs`) loads many keys in one.
    pub loader_calls: AtomicU64,
    /// Time each key's caller waited for its load, summed.
    pub load_micros: AtomicU64,
    pub lease_waits: AtomicU64,
    pub invalidations: AtomicU64,
    pub negative_hits: AtomicU64,
    pub stale_sets_refused: AtomicU64,
    pub shared_errors: AtomicU64,
    pub early_refreshes: AtomicU64,
    /// Speculative loads (`lease.rs`) whose value Redis took, those whose store it refused
    /// (a tombstone, past the deadline, tombstones not yet complete) or that failed, and those
    /// whose store found a value already there (the load was not needed; that value is kept
    /// in process, unless it was stored before a shared-tier outage ended).
    pub speculative_fills: AtomicU64,
    pub speculative_unfilled: AtomicU64,
    pub speculative_found: AtomicU64,
    /// Which way this namespace's recent shared-tier lookups went: up a step per miss, down
    /// per hit, within ±[`LEAN_BOUND`]. Not a statistic: it picks how the next lookup asks.
    pub miss_lean: AtomicI32,
    /// Moved on by every removal of the tag `ns:<namespace>` from this process's in-process
    /// tier (an invalidation of the namespace, here, heard on the bus or read from the log;
    /// one invalidation may move it more than once): an in-process entry is served only under
    /// the generation it was installed under (`MemEntry`), so such a removal hides every
    /// entry of the namespace at once, without indexing each key under the namespace. Not a
    /// statistic either.
    pub generation: AtomicU64,
}

/// How far [`NsCounters::miss_lean`] goes either way: how many lookups of the other kind it
/// takes to turn it.
pub(crate) const LEAN_BOUND: i32 = 16;

impl NsCounters {
    /// Most recent shared-tier lookups of this namespace were misses.
    pub fn mostly_missing(&self) -> bool {
        self.miss_lean.load(Ordering::Relaxed) > 0
    }

    /// The namespace's recent shared-tier lookups all missed, on balance: as far as
    /// `miss_lean` goes (its reads may load without a lookup, `lease.rs`).
    pub fn missing_steadily(&self) -> bool {
        self.miss_lean.load(Ordering::Relaxed) >= LEAN_BOUND
    }

    /// Records a shared-tier lookup's outcome in `miss_lean`.
    pub fn lean(&self, missed: bool) {
        let step = if missed { 1 } else { -1 };
        let _ = self
            .miss_lean
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |lean| {
                let next = (lean + step).clamp(-LEAN_BOUND, LEAN_BOUND);
                (next != lean).then_some(next)
            });
    }
}

/// A snapshot of one namespace's counters.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct NamespaceStats {
    pub namespace: String,
    pub near_hits: u64,
    pub shared_hits: u64,
    pub misses: u64,
    /// Keys loaded.
    pub loads: u64,
    /// Loader calls that loaded them (fewer than `loads` when loads were batched).
    pub loader_calls: u64,
    pub load_micros_total: u64,
    pub lease_waits: u64,
    pub invalidations: u64,
    pub negative_hits: u64,
    pub stale_sets_refused: u64,
    pub shared_errors: u64,
    pub early_refreshes: u64,
    /// Speculative loads (a batched read loading without a lookup, its row stored afterwards)
    /// whose row Redis stored; those whose store it refused (a tombstone, past the deadline,
    /// tombstones not yet complete) or that failed; and those whose store found a value
    /// already there (their load was not needed).
    pub speculative_fills: u64,
    pub speculative_unfilled: u64,
    pub speculative_found: u64,
}

impl NamespaceStats {
    /// Hits (either tier) over lookups.
    pub fn hit_ratio(&self) -> f64 {
        let hits = self.near_hits + self.shared_hits;
        let total = hits + self.misses;
        if total == 0 {
            0.0
        } else {
            hits as f64 / total as f64
        }
    }
}

#[derive(Default)]
pub(crate) struct Stats {
    namespaces: RwLock<BTreeMap<String, Arc<NsCounters>>>,
}

impl Stats {
    /// The counters of `namespace`. Every lookup asks for them: the common case is a shared
    /// read lock and no allocation; a namespace's first use takes the write lock once.
    pub fn ns(&self, namespace: &str) -> Arc<NsCounters> {
        if let Some(counters) = self
            .namespaces
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(namespace)
        {
            return counters.clone();
        }
        let mut map = self.namespaces.write().unwrap_or_else(|p| p.into_inner());
        map.entry(namespace.to_string()).or_default().clone()
    }

    /// The counters of `namespace` if it was ever used; none are made for it.
    pub fn existing(&self, namespace: &str) -> Option<Arc<NsCounters>> {
        let map = self.namespaces.read().unwrap_or_else(|p| p.into_inner());
        map.get(namespace).cloned()
    }

    pub fn snapshot(&self) -> Vec<NamespaceStats> {
        let map = self.namespaces.read().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .map(|(ns, c)| NamespaceStats {
                namespace: ns.clone(),
                near_hits: c.near_hits.load(Ordering::Relaxed),
                shared_hits: c.shared_hits.load(Ordering::Relaxed),
                misses: c.misses.load(Ordering::Relaxed),
                loads: c.loads.load(Ordering::Relaxed),
                loader_calls: c.loader_calls.load(Ordering::Relaxed),
                load_micros_total: c.load_micros.load(Ordering::Relaxed),
                lease_waits: c.lease_waits.load(Ordering::Relaxed),
                invalidations: c.invalidations.load(Ordering::Relaxed),
                negative_hits: c.negative_hits.load(Ordering::Relaxed),
                stale_sets_refused: c.stale_sets_refused.load(Ordering::Relaxed),
                shared_errors: c.shared_errors.load(Ordering::Relaxed),
                early_refreshes: c.early_refreshes.load(Ordering::Relaxed),
                speculative_fills: c.speculative_fills.load(Ordering::Relaxed),
                speculative_unfilled: c.speculative_unfilled.load(Ordering::Relaxed),
                speculative_found: c.speculative_found.load(Ordering::Relaxed),
            })
            .collect()
    }
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}
