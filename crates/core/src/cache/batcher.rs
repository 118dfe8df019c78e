//! Group commit of invalidations: callers that invalidate at the same time share one
//! shared-tier round and one bus message.
//!
//! A round *delivers* (the shared tier's deletes: one script on Redis), removes again from the
//! in-process tier, then *announces* (one bus message, and every instance's acknowledgement,
//! `bus.rs`); a round not delivered or not announced is written to the invalidation log
//! (`log.rs`) before its callers are woken. Deliveries run one at a time: invalidations that arrive while one runs queue up,
//! and the next round takes them all. The batcher has no task of its own: the caller that
//! finds no delivery running leads a round; when its delivery is done it hands the lead to
//! the first queued caller, then announces, beside that next delivery. Every caller returns
//! once the round that took its invalidation finished, so it keeps the guarantees of an
//! invalidation alone: each caller's epoch bump and marks come before its round's deletes,
//! and the announcement waits for every trusted instance's acknowledgement. With 64 writers a
//! round takes dozens of invalidations for one script, one message and one acknowledgement per
//! instance; a caller alone waits for nobody.
//!
//! Waiting for a delivery in progress adds nothing to what a write spends while Redis does not
//! answer: a round whose previous delivery timed out does not try Redis again (its callers
//! waited for that timeout), it remembers at once, as `deliver` does once the outage is
//! established. A write so waits at most one timed-out delivery, then its own announcement.
//!
//! A caller whose future is dropped (only outside `Detached` work) hands the lead on; the
//! callers of a round whose leader was dropped each invalidate alone.

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::oneshot;

use super::Cache;

/// What one round removes: full keys, and tags (a namespace is its tag `ns:<namespace>`).
#[derive(Debug, Default, Clone)]
pub(super) struct Round {
    pub keys: Vec<String>,
    pub tags: Vec<String>,
    /// The namespace a failed delivery is counted against.
    pub label: String,
}

impl Round {
    /// Everything `rounds` name, each key and tag once.
    fn merge(rounds: Vec<Round>) -> Round {
        let mut rounds = rounds.into_iter();
        let mut merged = rounds.next().unwrap_or_default();
        let mut keys: HashSet<String> = merged.keys.drain(..).collect();
        let mut tags: HashSet<String> = merged.tags.drain(..).collect();
        for round in rounds {
            keys.extend(round.keys);
            tags.extend(round.tags);
        }
        merged.keys = keys.into_iter().collect();
        merged.tags = tags.into_iter().collect();
        merged
    }
}

/// Callers waiting for a round, and whether one is delivering.
#[derive(Default)]
pub(super) struct Batcher {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    queue: Vec<Queued>,
    /// A caller leads: it is delivering, or has been handed the lead and is about to.
    leading: bool,
}

struct Queued {
    round: Round,
    /// `None` once the lead was offered to it and it was gone.
    wake: Option<oneshot::Sender<Turn>>,
}

enum Turn {
    /// Deliver the queue.
    Lead,
    /// The round that took this caller's invalidation is finished.
    Done,
}

impl Batcher {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lead passes to the first queued caller still waiting, or is given up.
    fn hand_off(&self) {
        let mut state = self.lock();
        for queued in state.queue.iter_mut() {
            if let Some(wake) = queued.wake.take()
                && wake.send(Turn::Lead).is_ok()
            {
                return;
            }
        }
        // Callers gone leave their invalidations queued: the next caller's round takes them.
        state.leading = false;
    }
}

/// Held while leading: dropped (delivery done, or the leader's future dropped), it hands off.
struct Lead<'a>(&'a Batcher);

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        self.0.hand_off();
    }
}

/// A queued caller's wait. Dropped after the lead reached it but before it took it, it hands
/// the lead on, so a dropped caller never leaves the queue without a leader.
struct Waiting<'a> {
    batcher: &'a Batcher,
    turn: oneshot::Receiver<Turn>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Ok(Turn::Lead) = self.turn.try_recv() {
            self.batcher.hand_off();
        }
    }
}

impl Cache {
    /// Delivers and announces `round` in a round shared with concurrent callers; returns when
    /// the round that took it finished.
    pub(super) async fn commit(&self, round: Round) {
        let batcher = &self.inner.batcher;
        let (wake, turn) = oneshot::channel();
        let lead = {
            let mut state = batcher.lock();
            state.queue.push(Queued {
                round: round.clone(),
                wake: Some(wake),
            });
            !std::mem::replace(&mut state.leading, true)
        };
        if !lead {
            let mut waiting = Waiting { batcher, turn };
            match (&mut waiting.turn).await {
                Ok(Turn::Done) => return,
                Ok(Turn::Lead) => {}
                // The leader of the round that took it was dropped midway.
                Err(_) => {
                    let delivered = self.deliver_and_forget(&round).await;
                    self.announce_round(round, delivered).await;
                    return;
                }
            }
        }
        self.lead().await;
    }

    /// Delivers everything queued as one round, hands the lead on, announces the round and
    /// wakes its callers.
    async fn lead(&self) {
        let batcher = &self.inner.batcher;
        let lead = Lead(batcher);
        let (round, wakes) = {
            let mut state = batcher.lock();
            let queued = std::mem::take(&mut state.queue);
            let (rounds, wakes): (Vec<Round>, Vec<_>) =
                queued.into_iter().map(|q| (q.round, q.wake)).unzip();
            (Round::merge(rounds), wakes)
        };
        let delivered = self.deliver_and_forget(&round).await;
        drop(lead);
        self.announce_round(round, delivered).await;
        for wake in wakes.into_iter().flatten() {
            let _ = wake.send(Turn::Done);
        }
    }
}
