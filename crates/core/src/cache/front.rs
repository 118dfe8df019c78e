//! A per-thread front of the in-process tier: the entries a worker thread read last, checked
//! before moka.
//!
//! moka's `get` hashes the key with SipHash, pins an epoch, reads its clock, asks the expiry
//! policy and queues the read for its eviction policy: about 1,400 instructions a hit, more
//! than the rest of a cached read's handler (issue 13, `bench/callgrind.sh`). A front hit is
//! one hash-map probe, two atomic loads and one clock read.
//!
//! It answers exactly what moka would, because it never outlives what could change moka's
//! answer:
//!
//! - every change to the tier is followed by a bump: an invalidation (of keys, tags or a
//!   namespace) or a flush bumps the engine's front generation ([`Front::changed`]); a value
//!   put under one key (an install, a `set`) bumps only that key's stripe ([`Front::put`]), one
//!   of [`STRIPES`] counters that keys share by hash. A front entry is served only under the
//!   generation and the stripe's count both read *before* the moka read that filled it: a read
//!   that raced with a change sees the bump on its next lookup, and an invalidation returns
//!   only after its bump. A miss's install thus leaves the other threads' copies of other keys
//!   in place (but for the few that share its stripe), where a bump of the generation would
//!   empty every front: under hot reads mixed with misses, the fronts stay full;
//! - an entry is served only before its own expiry (the TTL moka gives it) and while the clock
//!   has not gone back since it was copied;
//! - the bus's trust is checked before the front, as before moka.
//!
//! What moka evicts for room can still be answered here (it is not stale: nothing invalidated
//! it), so the front is bounded on its own: at most [`FRONT_ENTRIES`] entries and
//! [`FRONT_BYTES`] of bodies per thread (emptied when either is reached), bodies above
//! [`FRONT_MAX_BODY`] are not kept. Its bodies are the same allocations as moka's while moka
//! keeps them.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

use moka::sync::Cache as Moka;

use super::MemEntry;
use super::codec::now_ms;

/// Entries per thread before the front is emptied.
pub(crate) const FRONT_ENTRIES: usize = 4096;
/// Bytes of bodies per thread before the front is emptied.
pub(crate) const FRONT_BYTES: usize = 4 << 20;
/// Bodies larger than this are read from moka each time.
pub(crate) const FRONT_MAX_BODY: usize = 16 << 10;
/// Counters of puts, keys sharing them by hash (a power of two: 32 KiB an engine).
pub(crate) const STRIPES: usize = 4096;
const _: () = assert!(STRIPES.is_power_of_two());

/// One engine's side of the front: its identity (threads' fronts are shared by every engine of
/// the process; tests run several), its generation and its stripes' counts of puts.
pub(crate) struct Front {
    engine: u64,
    generation: AtomicU64,
    stripes: Box<[AtomicU64]>,
    /// Which stripe a key falls in: seeded at random per engine, so that keys a client
    /// spells are much harder to choose to share one stripe (whose puts would then drop
    /// each other's copies on every thread).
    hasher: foldhash::fast::RandomState,
}

struct Slot {
    engine: u64,
    generation: u64,
    /// The key's stripe, and its count of puts when copied.
    stripe: u32,
    puts: u64,
    /// Wall-clock ms when copied, and the entry's expiry.
    copied_ms: u64,
    entry: MemEntry,
}

#[derive(Default)]
struct Entries {
    /// Seeded at random per thread: keys a client spells are much harder to choose to
    /// collide and make every probe of the map walk them.
    map: HashMap<String, Slot, foldhash::fast::RandomState>,
    bytes: usize,
    /// The engine and generation of the newest copy: a copy of another generation can never
    /// be served again, so the map is emptied (its bodies freed, not held past moka's
    /// eviction) before the first copy of a new generation goes in. A copy whose stripe moved
    /// on, or that expired, goes at its key's next lookup.
    engine: u64,
    generation: u64,
}

thread_local! {
    static ENTRIES: RefCell<Entries> = RefCell::default();
}

impl Default for Front {
    fn default() -> Front {
        static ENGINES: AtomicU64 = AtomicU64::new(0);
        Front {
            engine: ENGINES.fetch_add(1, Ordering::Relaxed),
            generation: AtomicU64::new(0),
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }
}

impl Front {
    /// The stripe of `full`: the top bits of its hash.
    fn stripe_of(&self, full: &str) -> usize {
        (self.hasher.hash_one(full) >> (64 - STRIPES.trailing_zeros())) as usize
    }

    /// After an invalidation or a flush of the tier: every thread's copies taken before it are
    /// dropped on their next lookup.
    pub(crate) fn changed(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// After a value was put under `full` (moka's insert, and its removal again should an
    /// invalidation have overtaken it): the copies of `full` taken before, and of the keys
    /// sharing its stripe, are not served again.
    pub(crate) fn put(&self, full: &str) {
        self.stripes[self.stripe_of(full)].fetch_add(1, Ordering::SeqCst);
    }

    /// `memory`'s entry for `full`, from this thread's front when it holds a current copy.
    pub(crate) fn get(&self, memory: &Moka<String, MemEntry>, full: &str) -> Option<MemEntry> {
        // Read before moka: a change after this read bumps past it.
        let generation = self.generation.load(Ordering::SeqCst);
        let now = now_ms();
        let held = ENTRIES.with_borrow_mut(|entries| {
            let slot = entries.map.get(full)?;
            if slot.engine != self.engine || slot.generation != generation {
                // The whole map goes before the next copy.
                return None;
            }
            if slot.copied_ms <= now
                && now < slot.entry.expires_at_ms
                && self.stripes[slot.stripe as usize].load(Ordering::SeqCst) == slot.puts
            {
                return Some(slot.entry.clone());
            }
            // Put over or expired: never served again, so its body is not held either.
            if let Some(old) = entries.map.remove(full) {
                entries.bytes -= old.entry.bytes.as_ref().map_or(0, |b| b.len());
            }
            None
        });
        if held.is_some() {
            return held;
        }
        // Read before moka too, as the generation.
        let stripe = self.stripe_of(full);
        let puts = self.stripes[stripe].load(Ordering::SeqCst);
        let entry = memory.get(full)?;
        let size = entry.bytes.as_ref().map_or(0, |b| b.len());
        if size <= FRONT_MAX_BODY {
            ENTRIES.with_borrow_mut(|entries| {
                let outdated = entries.engine != self.engine || entries.generation != generation;
                if outdated
                    || entries.map.len() >= FRONT_ENTRIES
                    || entries.bytes + size > FRONT_BYTES
                {
                    entries.map.clear();
                    entries.bytes = 0;
                    entries.engine = self.engine;
                    entries.generation = generation;
                }
                let slot = Slot {
                    engine: self.engine,
                    generation,
                    stripe: stripe as u32,
                    puts,
                    copied_ms: now,
                    entry: entry.clone(),
                };
                entries.bytes += size;
                if let Some(old) = entries.map.insert(full.to_string(), slot) {
                    entries.bytes -= old.entry.bytes.as_ref().map_or(0, |b| b.len());
                }
            });
        }
        Some(entry)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn entry(body: &str, ttl: Duration) -> MemEntry {
        MemEntry {
            bytes: Some(Arc::from(body.as_bytes())),
            etag: Arc::default(),
            generation: 0,
            ttl,
            expires_at_ms: now_ms() + ttl.as_millis() as u64,
            delta_ms: 0,
        }
    }

    fn memory() -> Moka<String, MemEntry> {
        Moka::builder().max_capacity(1000).build()
    }

    fn body(entry: Option<MemEntry>) -> Option<String> {
        entry.and_then(|e| e.bytes.map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    #[test]
    fn a_change_announced_after_it_is_seen_by_the_next_read() {
        let (front, memory) = (Front::default(), memory());
        memory.insert("k".into(), entry("old", Duration::from_secs(60)));
        assert_eq!(body(front.get(&memory, "k")).as_deref(), Some("old"));
        memory.insert("k".into(), entry("new", Duration::from_secs(60)));
        front.changed();
        assert_eq!(body(front.get(&memory, "k")).as_deref(), Some("new"));
        memory.invalidate("k");
        front.changed();
        assert_eq!(body(front.get(&memory, "k")), None);
    }

    #[test]
    fn a_put_drops_the_copies_of_its_key_and_leaves_the_others() {
        let (front, memory) = (Front::default(), memory());
        let a = "cache:assets:a";
        // A key of another stripe than a's (the engine's hash is seeded at random).
        let b = &(0..)
            .map(|i| format!("cache:assets:b{i}"))
            .find(|b| front.stripe_of(b) != front.stripe_of(a))
            .unwrap();
        let b = b.as_str();
        for key in [a, b] {
            memory.insert(key.into(), entry("old", Duration::from_secs(60)));
            assert_eq!(body(front.get(&memory, key)).as_deref(), Some("old"));
        }
        memory.insert(a.into(), entry("new", Duration::from_secs(60)));
        front.put(a);
        assert_eq!(body(front.get(&memory, a)).as_deref(), Some("new"));
        // Changed in moka without a bump (which no engine does): only a copy answers "old",
        // so b's copy outlived a's put.
        memory.insert(b.into(), entry("unannounced", Duration::from_secs(60)));
        assert_eq!(body(front.get(&memory, b)).as_deref(), Some("old"));
        front.put(b);
        assert_eq!(body(front.get(&memory, b)).as_deref(), Some("unannounced"));
        // A copy put over is dropped at its key's next lookup, its body with it.
        let held = ENTRIES.with_borrow(|e| e.bytes);
        memory.invalidate(a);
        front.put(a);
        assert_eq!(body(front.get(&memory, a)), None);
        ENTRIES.with_borrow(|e| {
            assert!(!e.map.contains_key(a));
            assert_eq!(e.bytes, held - "new".len());
        });
    }

    #[test]
    fn which_keys_share_a_stripe_is_each_engines_own() {
        // Keys a client spells: with an unkeyed hash it could pick many of one stripe, whose
        // puts would drop all their copies on every thread. Each engine seeds its own.
        let (a, b) = (Front::default(), Front::default());
        let keys: Vec<String> = (0..256).map(|i| format!("cache:assets:v{i}")).collect();
        let same = keys
            .iter()
            .filter(|k| a.stripe_of(k) == b.stripe_of(k))
            .count();
        // By chance, about 256 / 4096 of them.
        assert!(
            same < 8,
            "{same} of 256 keys in the same stripe of both engines"
        );
        let stripes: std::collections::HashSet<usize> =
            keys.iter().map(|k| a.stripe_of(k)).collect();
        assert!(stripes.len() > 224, "256 keys in {} stripes", stripes.len());
    }

    #[test]
    fn engines_do_not_answer_from_each_others_copies() {
        let (a, b) = (Front::default(), Front::default());
        let (memory_a, memory_b) = (memory(), memory());
        memory_a.insert("k".into(), entry("a", Duration::from_secs(60)));
        assert_eq!(body(a.get(&memory_a, "k")).as_deref(), Some("a"));
        assert_eq!(body(b.get(&memory_b, "k")), None);
    }

    #[test]
    fn a_copy_is_not_served_past_its_entrys_expiry() {
        let (front, memory) = (Front::default(), memory());
        let mut short = entry("short", Duration::from_secs(60));
        short.expires_at_ms = now_ms() + 50;
        memory.insert("k".into(), short);
        assert_eq!(body(front.get(&memory, "k")).as_deref(), Some("short"));
        // moka still holds it (its own TTL is 60 s): the copy's expiry alone decides.
        std::thread::sleep(Duration::from_millis(80));
        memory.invalidate("k");
        assert_eq!(
            body(front.get(&memory, "k")),
            None,
            "served an expired copy"
        );
    }

    #[test]
    fn copies_of_an_old_generation_are_freed_not_kept_until_the_map_fills() {
        let (front, memory) = (Front::default(), memory());
        for key in ["a", "b", "c"] {
            memory.insert(key.into(), entry(key, Duration::from_secs(60)));
            front.get(&memory, key);
        }
        ENTRIES.with_borrow(|e| assert_eq!(e.map.len(), 3));
        // A flush: moka lets go of the bodies, and so must this thread at its next copy.
        memory.invalidate_all();
        front.changed();
        memory.insert("d".into(), entry("d", Duration::from_secs(60)));
        front.get(&memory, "d");
        ENTRIES.with_borrow(|e| {
            assert_eq!(e.map.len(), 1, "old copies still held");
            assert_eq!(e.bytes, 1);
        });
    }

    #[test]
    fn the_front_stays_within_its_bounds() {
        let (front, memory) = (Front::default(), memory());
        for i in 0..FRONT_ENTRIES + 10 {
            let key = format!("k{i}");
            memory.insert(key.clone(), entry("x", Duration::from_secs(60)));
            front.get(&memory, &key);
        }
        ENTRIES.with_borrow(|e| assert!(e.map.len() <= FRONT_ENTRIES));
        let big = "y".repeat(FRONT_MAX_BODY + 1);
        memory.insert("big".into(), entry(&big, Duration::from_secs(60)));
        front.get(&memory, "big");
        ENTRIES.with_borrow(|e| assert!(!e.map.contains_key("big")));
    }
}
