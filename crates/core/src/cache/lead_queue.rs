//! The queue behind the read path's group commits (`load_batch.rs`, `lookup_batch.rs`): callers
//! that cannot lead a batch now queue with a reply channel; whoever leads hands the lead on to
//! the first caller still waiting, with the callers queued behind it as its batch. No task of
//! its own: a batch is always led by one of its callers.

use std::collections::VecDeque;

use tokio::sync::oneshot;

/// A queued caller: its item, and where its turn is sent.
pub(super) struct Queued<I, D> {
    pub item: I,
    pub reply: oneshot::Sender<Turn<I, D>>,
}

/// What a queued caller is told.
pub(super) enum Turn<I, D> {
    /// Lead a batch: the receiver's own item, and the callers it works for.
    Lead(I, Vec<Queued<I, D>>),
    /// The batch that took the caller's item is done: its answer.
    Done(D),
}

/// Up to `n` callers from the head of `queue` that still wait.
pub(super) fn take_batch<I, D>(queue: &mut VecDeque<Queued<I, D>>, n: usize) -> Vec<Queued<I, D>> {
    let mut batch = Vec::with_capacity(n.min(queue.len()));
    while batch.len() < n {
        let Some(queued) = queue.pop_front() else {
            break;
        };
        if !queued.reply.is_closed() {
            batch.push(queued);
        }
    }
    batch
}

/// Puts `requeue` back at the head of `queue`, then passes the lead to the first queued
/// caller still waiting, with up to `max` items in all. False if nobody took it: the caller
/// gives the lead up.
pub(super) fn pass_lead<I, D>(
    queue: &mut VecDeque<Queued<I, D>>,
    requeue: Vec<Queued<I, D>>,
    max: usize,
) -> bool {
    for queued in requeue.into_iter().rev() {
        queue.push_front(queued);
    }
    while let Some(first) = queue.pop_front() {
        if first.reply.is_closed() {
            continue;
        }
        let rest = take_batch(queue, max - 1);
        match first.reply.send(Turn::Lead(first.item, rest)) {
            Ok(()) => return true,
            // Gone since: its batch goes back to the queue, the next caller leads.
            Err(Turn::Lead(_, rest)) => {
                for queued in rest.into_iter().rev() {
                    queue.push_front(queued);
                }
            }
            Err(Turn::Done(_)) => {}
        }
    }
    false
}

/// A group whose lead can be handed on, with callers to put back first.
pub(super) trait HandOff<I, D> {
    fn hand_off(&self, requeue: Vec<Queued<I, D>>);
}

/// A queued caller's wait. Dropped after the lead reached it but before it took it, it puts
/// the batch back and hands the lead on, so the queue is never left without a leader.
pub(super) struct Waiting<'a, G: HandOff<I, D>, I, D> {
    pub group: &'a G,
    pub turn: oneshot::Receiver<Turn<I, D>>,
}

impl<G: HandOff<I, D>, I, D> Drop for Waiting<'_, G, I, D> {
    fn drop(&mut self) {
        // Closed first: a lead sent after this fails to reach us and goes to the next caller;
        // one sent before is taken here and handed on. (Without the close, a lead sent
        // between `try_recv` and the receiver's drop was dropped with it, and the group was
        // left leading with no leader: every later caller waited forever.)
        self.turn.close();
        if let Ok(Turn::Lead(_, rest)) = self.turn.try_recv() {
            self.group.hand_off(rest);
        }
    }
}
