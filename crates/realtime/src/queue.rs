//! One connection's bounded queue: what the hub hands it, waiting for its task.
//!
//! Why not tokio's bounded `mpsc`: a channel is allocated whole when it is created, an `Arc`
//! of cache-padded halves (~0.5 KB) and a first block of 32 slots (~0.8 KB), before any
//! message, and a drained channel keeps a block. Most connections are idle most of the time,
//! and memory per idle connection is what bounds how many an instance holds. A `VecDeque`
//! under a mutex allocates on the first message and gives its memory back once drained. The
//! lock is held for a push (the hub, per delivery) or a drain (the task, per round), never
//! across an await, so it is contended only when both touch one connection at once.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::hub::Outbound;

/// Slots a drained queue keeps (a quiet connection's next message needs no allocation).
const IDLE_KEEP: usize = 4;

/// What became of an offered item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Queued,
    /// `capacity` items were waiting: the item is dropped.
    Full,
    /// The connection's task has ended: the item is dropped.
    Closed,
}

pub struct Queue {
    state: Mutex<State>,
    capacity: usize,
    /// Wakes the task when the queue stops being empty (a stored permit if it is busy).
    ready: Notify,
}

struct State {
    items: VecDeque<Outbound>,
    open: bool,
}

impl Queue {
    /// A queue of at most `capacity` items (`WS_QUEUE_SIZE`); nothing allocated yet.
    pub fn new(capacity: usize) -> Queue {
        Queue {
            state: Mutex::new(State {
                items: VecDeque::new(),
                open: true,
            }),
            capacity,
            ready: Notify::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn offer(&self, item: Outbound) -> Offer {
        let mut state = self.state();
        if !state.open {
            return Offer::Closed;
        }
        if state.items.len() >= self.capacity {
            return Offer::Full;
        }
        state.items.push_back(item);
        let first = state.items.len() == 1;
        drop(state);
        // The task looks at the queue before it waits, so only the first item needs a wake-up.
        if first {
            self.ready.notify_one();
        }
        Offer::Queued
    }

    /// Moves up to `max` items into `into`; 0 when none is waiting.
    ///
    /// A drained queue gives back what a burst grew it to, but not under the lock: the hub
    /// offers under it while it holds the channel map's read lock for a whole fan-out, so
    /// freeing a big buffer there would hold up every subscriber of the channel (and every
    /// subscribe waiting for the write lock). The burst's buffer is swapped out for a small
    /// one and freed after unlocking.
    pub fn take(&self, into: &mut Vec<Outbound>, max: usize) -> usize {
        let mut state = self.state();
        let n = state.items.len().min(max);
        if n == state.items.len() && state.items.capacity() > IDLE_KEEP {
            let burst = std::mem::replace(&mut state.items, VecDeque::with_capacity(IDLE_KEEP));
            drop(state);
            into.extend(burst);
            return n;
        }
        into.extend(state.items.drain(..n));
        n
    }

    /// Waits for items and moves up to `max` of them into `into` (at least one). Cancel-safe:
    /// items leave the queue only in the synchronous [`take`](Self::take).
    pub async fn recv_many(&self, into: &mut Vec<Outbound>, max: usize) -> usize {
        loop {
            let n = self.take(into, max);
            if n > 0 {
                return n;
            }
            self.ready.notified().await;
        }
    }

    /// Refuses every later offer and drops what is waiting; how many items that was. The
    /// items (up to `WS_QUEUE_SIZE` of them) are dropped after unlocking, as in
    /// [`take`](Self::take).
    pub fn close(&self) -> usize {
        let mut state = self.state();
        state.open = false;
        let items = std::mem::take(&mut state.items);
        drop(state);
        items.len()
    }

    /// Runs `f` on the locked state (tests look at the buffer).
    #[cfg(test)]
    fn locked<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn item(n: usize) -> Outbound {
        Outbound::Resync(Arc::from(n.to_string()))
    }

    fn names(items: &[Outbound]) -> Vec<String> {
        items
            .iter()
            .map(|i| match i {
                Outbound::Resync(name) => name.to_string(),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[tokio::test]
    async fn items_arrive_in_order_up_to_the_capacity_and_none_after_close() {
        let queue = Queue::new(3);
        for n in 0..3 {
            assert_eq!(queue.offer(item(n)), Offer::Queued);
        }
        assert_eq!(queue.offer(item(3)), Offer::Full);
        let mut got = Vec::new();
        assert_eq!(queue.recv_many(&mut got, 2).await, 2);
        assert_eq!(queue.recv_many(&mut got, 2).await, 1);
        assert_eq!(names(&got), ["0", "1", "2"]);
        assert_eq!(queue.offer(item(4)), Offer::Queued);
        assert_eq!(queue.close(), 1);
        assert_eq!(queue.offer(item(5)), Offer::Closed);
        assert_eq!(queue.take(&mut got, 10), 0);
    }

    #[test]
    fn a_drained_queue_gives_back_what_a_burst_grew_it_to() {
        let queue = Queue::new(1_000);
        for n in 0..1_000 {
            assert_eq!(queue.offer(item(n)), Offer::Queued);
        }
        let mut got = Vec::new();
        assert_eq!(queue.take(&mut got, 600), 600);
        assert!(queue.locked(|s| s.items.capacity()) >= 400);
        assert_eq!(queue.take(&mut got, 600), 400);
        assert_eq!(
            names(&got),
            (0..1_000).map(|n| n.to_string()).collect::<Vec<_>>()
        );
        assert!(queue.locked(|s| s.items.capacity()) <= IDLE_KEEP);
        // Still a queue: the next offer is taken, in order.
        assert_eq!(queue.offer(item(7)), Offer::Queued);
        got.clear();
        assert_eq!(queue.take(&mut got, 10), 1);
        assert_eq!(names(&got), ["7"]);
    }

    #[tokio::test]
    async fn a_waiting_task_is_woken_by_an_offer_from_another() {
        let queue = Arc::new(Queue::new(10));
        let waiting = tokio::spawn({
            let queue = queue.clone();
            async move {
                let mut got = Vec::new();
                queue.recv_many(&mut got, 10).await;
                names(&got)
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(queue.offer(item(7)), Offer::Queued);
        let got = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(got, ["7"]);
    }
}
