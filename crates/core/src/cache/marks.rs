//! Recent invalidations ("marks": `k:<key>`, `t:<tag>`, `n:<namespace>`) with the epoch at
//! which each happened, so that a load which started before one can tell it was overtaken and
//! must not install what it read.
//!
//! A mark must never be forgotten while a load that started before it may still finish:
//! marks are kept for `window` (longer than any load lasts). When more than `capacity` marks
//! arrive within the window, the oldest are dropped, and the newest epoch dropped is kept:
//! every load that started before it is then treated as overtaken. That costs a few refused
//! installs under an invalidation storm, never a stale value. (A size-bounded cache with an
//! admission policy, such as TinyLFU, would instead silently reject fresh marks.)

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub(crate) struct Marks {
    window: Duration,
    capacity: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The latest epoch of each mark.
    latest: HashMap<String, u64>,
    /// Every recording, oldest first (epochs increase along it).
    order: VecDeque<(Instant, String, u64)>,
    /// The newest epoch of a mark dropped for room before its window ended.
    dropped_up_to: u64,
}

impl Marks {
    pub fn new(window: Duration, capacity: usize) -> Self {
        Marks {
            window,
            capacity: capacity.max(1),
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `marks` as invalidated at `epoch` (epochs must not decrease between calls).
    pub fn record(&self, marks: &[String], epoch: u64) {
        let now = Instant::now();
        let mut state = self.lock();
        for mark in marks {
            state.latest.insert(mark.clone(), epoch);
            state.order.push_back((now, mark.clone(), epoch));
        }
        while let Some((at, _, _)) = state.order.front() {
            let expired = now.duration_since(*at) > self.window;
            if !expired && state.order.len() <= self.capacity {
                break;
            }
            let Some((_, mark, e)) = state.order.pop_front() else {
                break;
            };
            if !expired {
                state.dropped_up_to = state.dropped_up_to.max(e);
            }
            if state.latest.get(&mark) == Some(&e) {
                state.latest.remove(&mark);
            }
        }
    }

    /// Whether any of `marks` was (or, dropped for room, may have been) recorded after `epoch`.
    pub fn any_after(&self, epoch: u64, mut marks: impl Iterator<Item = String>) -> bool {
        let state = self.lock();
        state.dropped_up_to > epoch
            || marks.any(|mark| state.latest.get(&mark).is_some_and(|e| *e > epoch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> String {
        s.to_string()
    }

    #[test]
    fn a_load_is_overtaken_only_by_marks_after_its_start() {
        let marks = Marks::new(Duration::from_secs(60), 100);
        marks.record(&[m("k:a"), m("t:x")], 5);
        assert!(marks.any_after(4, [m("k:a")].into_iter()));
        assert!(!marks.any_after(5, [m("k:a")].into_iter()));
        assert!(!marks.any_after(4, [m("k:b")].into_iter()));
        assert!(marks.any_after(4, [m("k:b"), m("t:x")].into_iter()));
        marks.record(&[m("k:a")], 9);
        assert!(marks.any_after(8, [m("k:a")].into_iter()));
    }

    #[test]
    fn marks_dropped_for_room_make_older_loads_overtaken_and_never_forget_fresh_ones() {
        let marks = Marks::new(Duration::from_secs(60), 3);
        for epoch in 1..=1000u64 {
            marks.record(&[format!("k:{epoch}")], epoch);
            // The newest mark is always remembered, however many came before it.
            assert!(marks.any_after(epoch - 1, [format!("k:{epoch}")].into_iter()));
        }
        // A load that started before the dropped marks is refused, whatever key it loaded.
        assert!(marks.any_after(500, [m("k:unrelated")].into_iter()));
        // One that started after all of them is not.
        assert!(!marks.any_after(1000, [m("k:unrelated")].into_iter()));
    }

    #[test]
    fn marks_expire_after_the_window_without_making_loads_overtaken() {
        let marks = Marks::new(Duration::from_millis(20), 100);
        marks.record(&[m("k:a")], 1);
        std::thread::sleep(Duration::from_millis(40));
        marks.record(&[m("k:b")], 2);
        assert!(!marks.any_after(0, [m("k:a")].into_iter()), "expired");
        assert!(!marks.any_after(1, [m("k:unrelated")].into_iter()));
        assert!(marks.any_after(1, [m("k:b")].into_iter()));
    }
}
