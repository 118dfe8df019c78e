//! Recent invalidations ("marks": a key, a tag, a namespace) with the epoch at which each
//! happened, so that a load which started before one can tell it was overtaken and must not
//! install what it read.
//!
//! A mark must never be forgotten while a load that started before it may still finish:
//! marks are kept for `window` (longer than any load lasts). When more than `capacity` marks
//! arrive within the window, the oldest are dropped, and the newest epoch dropped is kept:
//! every load that started before it is then treated as overtaken. That costs a few refused
//! installs under an invalidation storm, never a stale value. (A size-bounded cache with an
//! admission policy, such as TinyLFU, would instead silently reject fresh marks.)
//!
//! A mark is kept as a 64-bit hash of its kind and name (seeded per process), not as a string:
//! a write that changes a version with a hundred descendants records a hundred tag marks, two
//! or three times (its own, its round's, the bus's), and allocating, copying and SipHashing
//! each twice was a tenth of the server's work under 64 writers. Two names with the same hash
//! only make a load that the other's invalidation did not concern look overtaken (its install
//! is refused, it is served what it read): never a stale value.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A key, tag or namespace, hashed ([`Marks::key`], [`Marks::tag`], [`Marks::namespace`]).
pub(crate) type Mark = u64;

pub(crate) struct Marks {
    window: Duration,
    capacity: usize,
    /// Seeded at random per process, so that names cannot be chosen to collide.
    hasher: foldhash::fast::RandomState,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The latest epoch of each mark, and when it was recorded.
    latest: foldhash::HashMap<Mark, (u64, Instant)>,
    /// Every recording, oldest first (epochs increase along it).
    order: VecDeque<(Instant, Mark, u64)>,
    /// The newest epoch of a mark dropped for room before its window ended, and when that
    /// mark was recorded.
    dropped_up_to: u64,
    dropped_at: Option<Instant>,
}

impl Marks {
    pub fn new(window: Duration, capacity: usize) -> Self {
        Marks {
            window,
            capacity: capacity.max(1),
            hasher: foldhash::fast::RandomState::default(),
            state: Mutex::default(),
        }
    }

    fn mark(&self, kind: u8, name: &str) -> Mark {
        let mut hasher = self.hasher.build_hasher();
        hasher.write_u8(kind);
        hasher.write(name.as_bytes());
        hasher.finish()
    }

    /// The mark of the full key `full`.
    pub fn key(&self, full: &str) -> Mark {
        self.mark(b'k', full)
    }

    /// The mark of the tag `tag` (a namespace's tag is `ns:<namespace>`).
    pub fn tag(&self, tag: &str) -> Mark {
        self.mark(b't', tag)
    }

    /// The mark of a whole namespace.
    pub fn namespace(&self, namespace: &str) -> Mark {
        self.mark(b'n', namespace)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `marks` as invalidated at `epoch` (epochs must not decrease between calls).
    pub fn record(&self, marks: &[Mark], epoch: u64) {
        let now = Instant::now();
        let mut state = self.lock();
        for &mark in marks {
            state.latest.insert(mark, (epoch, now));
            state.order.push_back((now, mark, epoch));
        }
        while let Some(&(at, mark, e)) = state.order.front() {
            let expired = now.duration_since(at) > self.window;
            if !expired && state.order.len() <= self.capacity {
                break;
            }
            state.order.pop_front();
            if !expired {
                state.dropped_up_to = state.dropped_up_to.max(e);
                state.dropped_at = Some(at);
            }
            if state
                .latest
                .get(&mark)
                .is_some_and(|(latest, _)| *latest == e)
            {
                state.latest.remove(&mark);
            }
        }
    }

    /// Whether any of `marks` was (or, dropped for room, may have been) recorded after `epoch`.
    pub fn any_after(&self, epoch: u64, mut marks: impl Iterator<Item = Mark>) -> bool {
        let state = self.lock();
        state.dropped_up_to > epoch
            || marks.any(|mark| state.latest.get(&mark).is_some_and(|(e, _)| *e > epoch))
    }

    /// Whether any of `marks` was (or, dropped for room, may have been) recorded less than
    /// `within` ago.
    pub fn any_within(&self, within: Duration, mut marks: impl Iterator<Item = Mark>) -> bool {
        let state = self.lock();
        let recent = |at: &Instant| at.elapsed() < within;
        state.dropped_at.as_ref().is_some_and(recent)
            || marks.any(|mark| state.latest.get(&mark).is_some_and(|(_, at)| recent(at)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mark by its old spelling: `k:`, `t:` or `n:` and the name.
    fn m(marks: &Marks, s: &str) -> Mark {
        let (kind, name) = s.split_once(':').expect("kind:name");
        match kind {
            "k" => marks.key(name),
            "t" => marks.tag(name),
            _ => marks.namespace(name),
        }
    }

    #[test]
    fn a_load_is_overtaken_only_by_marks_after_its_start() {
        let marks = Marks::new(Duration::from_secs(60), 100);
        marks.record(&[m(&marks, "k:a"), m(&marks, "t:x")], 5);
        assert!(marks.any_after(4, [m(&marks, "k:a")].into_iter()));
        assert!(!marks.any_after(5, [m(&marks, "k:a")].into_iter()));
        assert!(!marks.any_after(4, [m(&marks, "k:b")].into_iter()));
        assert!(marks.any_after(4, [m(&marks, "k:b"), m(&marks, "t:x")].into_iter()));
        marks.record(&[m(&marks, "k:a")], 9);
        assert!(marks.any_after(8, [m(&marks, "k:a")].into_iter()));
        // Recorded just now: within any window but none.
        assert!(marks.any_within(Duration::from_secs(1), [m(&marks, "k:a")].into_iter()));
        assert!(!marks.any_within(Duration::ZERO, [m(&marks, "k:a")].into_iter()));
        assert!(!marks.any_within(Duration::from_secs(1), [m(&marks, "k:b")].into_iter()));
    }

    #[test]
    fn a_key_a_tag_and_a_namespace_of_one_name_are_different_marks() {
        let marks = Marks::new(Duration::from_secs(60), 100);
        marks.record(&[marks.key("a")], 5);
        assert!(marks.any_after(4, [marks.key("a")].into_iter()));
        assert!(!marks.any_after(4, [marks.tag("a"), marks.namespace("a")].into_iter()));
    }

    #[test]
    fn marks_dropped_for_room_make_older_loads_overtaken_and_never_forget_fresh_ones() {
        let marks = Marks::new(Duration::from_secs(60), 3);
        for epoch in 1..=1000u64 {
            marks.record(&[m(&marks, &format!("k:{epoch}"))], epoch);
            // The newest mark is always remembered, however many came before it.
            assert!(marks.any_after(epoch - 1, [m(&marks, &format!("k:{epoch}"))].into_iter()));
        }
        // A load that started before the dropped marks is refused, whatever key it loaded.
        assert!(marks.any_after(500, [m(&marks, "k:unrelated")].into_iter()));
        // One that started after all of them is not.
        assert!(!marks.any_after(1000, [m(&marks, "k:unrelated")].into_iter()));
    }

    #[test]
    fn marks_expire_after_the_window_without_making_loads_overtaken() {
        let marks = Marks::new(Duration::from_millis(20), 100);
        marks.record(&[m(&marks, "k:a")], 1);
        std::thread::sleep(Duration::from_millis(40));
        marks.record(&[m(&marks, "k:b")], 2);
        assert!(
            !marks.any_after(0, [m(&marks, "k:a")].into_iter()),
            "expired"
        );
        assert!(!marks.any_after(1, [m(&marks, "k:unrelated")].into_iter()));
        assert!(marks.any_after(1, [m(&marks, "k:b")].into_iter()));
    }
}
