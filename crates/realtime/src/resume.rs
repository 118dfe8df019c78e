//! Where each subscription stands (epoch and last offset) and the one rule that moves it.
//!
//! A message is written only if it is the next offset of the subscription's epoch; an older
//! one is a duplicate and dropped; a jump or another epoch sends the subscription to the
//! history ([`catch_up`]), which delivers what is missing or a `gap` naming exactly the offsets
//! it cannot deliver. That one rule makes resume (`since`), offset jumps after a lost Redis
//! subscription, and Redis restarts (a new epoch) the same code path.
//!
//! A subscription takes its epoch from the history only, never from a live message: epochs
//! are random, so a message of another epoch may be of a newer one or a late one of an older
//! one (delayed in pub/sub, or published where the new epoch was not known yet), and only
//! the history tells which. Its epoch never moves back. When the read fails, a jump in the
//! subscription's own epoch is named by a `gap` (`unavailable`) and live delivery goes on; a
//! message of another epoch is dropped and the subscription keeps its position until a read
//! succeeds ([`Sub::unread`]), which delivers what is missing or the `gap` for it.
//!
//! Degraded delivery (Redis could not take a publish): a local message (`durable: false`)
//! is written as it comes, after a `gap` (reason `degraded`) that ends the subscription's
//! epoch from its next offset on; until the channel's epoch changes (the publishing
//! instance starts a new one when Redis answers again), messages of the ended epoch are
//! dropped, as the `gap` already named them. The next epoch is then delivered from its
//! start, without a second `gap`. A local message published before the subscription's last
//! history read is dropped, with no `gap` ([`Sub::local_floor`]).

use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use crate::Realtime;
use crate::channel::Channel;
use crate::outbox::Outbox;
use crate::protocol;
use crate::store::{Delivery, StoreError};

/// Messages read from the history per call.
const PAGE: u64 = 200;

/// The offset after `offset` (saturating: a client's `since` may be anything).
fn after(offset: u64) -> u64 {
    offset.saturating_add(1)
}

/// One subscription's position.
pub(crate) struct Sub {
    pub channel: Channel,
    /// The epoch of `last`; `None` while the channel has no history at all.
    pub epoch: Option<Arc<str>>,
    /// The last offset delivered (or skipped over by a `gap`).
    pub last: u64,
    /// A `degraded` gap ended `epoch` for this subscription (it received a local message).
    pub degraded: bool,
    /// How many local messages this instance had delivered when the subscription's history
    /// was last read (`Realtime::local_published`, taken after the read answered). A local
    /// message at or below it was queued before that read and handed over after it (a
    /// subscribe subscribes, then reads; its `ack` comes after the read) and is dropped: the
    /// read found the epoch begun after it (the degraded period's rotation), or the one it
    /// belongs to, which the rotation still to come ends with a `degraded` gap. A `degraded`
    /// gap for the epoch the read found would name messages this subscription then receives,
    /// and a publish that missed its deadline but reached Redis would arrive twice.
    pub local_floor: u64,
    /// A history read failed after a message of another epoch ([`after_failed_read`]): the
    /// session reads again until one succeeds ([`catch_up`] clears it). Meanwhile messages of
    /// another epoch are dropped without a read each (that read delivers them or names them
    /// in a `gap`), so a Redis that times out does not hold the connection for each.
    pub unread: bool,
}

/// What a durable message does to a subscription, from its position alone.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Delivered already, named by a `degraded` gap, or left to the pending read.
    Drop,
    /// The next offset of the subscription's epoch.
    Write,
    /// A jump, or another epoch: only the history says what is missing.
    Read,
}

fn step(sub: &Sub, delivery: &Delivery) -> Step {
    if sub.epoch.as_deref() != Some(&*delivery.epoch) {
        return if sub.unread { Step::Drop } else { Step::Read };
    }
    if sub.degraded || delivery.offset <= sub.last {
        Step::Drop
    } else if delivery.offset == after(sub.last) {
        Step::Write
    } else {
        Step::Read
    }
}

/// Hands `delivery` to `sub`: written, dropped, or preceded by what the history says is
/// missing before it. `Err`: the history could not be read for a message of another epoch,
/// which is dropped meanwhile ([`Sub::unread`]); the caller reads it again later
/// ([`catch_up`]).
pub(crate) async fn deliver(
    rt: &Realtime,
    sub: &mut Sub,
    delivery: &Delivery,
    out: &mut Outbox,
) -> Result<(), StoreError> {
    if !delivery.durable {
        if delivery.offset <= sub.local_floor {
            // Older than the history the subscription last read (see `local_floor`).
            return Ok(());
        }
        if !sub.degraded {
            let gap =
                protocol::degraded_gap(sub.channel.name(), sub.epoch.as_deref(), after(sub.last));
            out.text(gap);
            sub.degraded = true;
        }
        out.message(delivery.frame.clone());
        return Ok(());
    }
    match step(sub, delivery) {
        Step::Drop => Ok(()),
        Step::Write => {
            out.message(delivery.frame.clone());
            sub.last = delivery.offset;
            Ok(())
        }
        Step::Read => match catch_up(rt, sub, out).await {
            Ok(_) => Ok(()),
            Err(err) => after_failed_read(sub, delivery, out, err),
        },
    }
}

/// What `sub` is told of `delivery` when the history read it called for failed (`err`), as
/// far as that read left `sub`. A message of its epoch: the offsets before it are named by a
/// `gap` (`unavailable`) and it is written, so live delivery goes on. Of another epoch:
/// nothing says whether that epoch is newer or older than the subscription's, so the
/// subscription keeps its epoch and offset, and `err` has the caller read again later.
fn after_failed_read(
    sub: &mut Sub,
    delivery: &Delivery,
    out: &mut Outbox,
    err: StoreError,
) -> Result<(), StoreError> {
    if sub.epoch.as_deref() != Some(&*delivery.epoch) {
        sub.unread = true;
        return Err(err);
    }
    if step(sub, delivery) == Step::Drop {
        // Named by a `degraded` gap, or delivered by the read before it failed.
        return Ok(());
    }
    let from = after(sub.last);
    if delivery.offset > from {
        out.text(protocol::gap(
            sub.channel.name(),
            &delivery.epoch,
            from,
            Some(delivery.offset - 1),
            "unavailable",
        ));
    }
    out.message(delivery.frame.clone());
    sub.last = delivery.offset;
    Ok(())
}

/// Brings `sub` up to its channel's head from the history: the missing messages, or a `gap`
/// for each range the history no longer holds (or an epoch that ended). Returns the head.
/// Read in pages of [`PAGE`] (one Lua call each stays short), at most `WS_REPLAY_MAX` in all.
///
/// Boxed: its Redis reads make a future of kilobytes, which would otherwise be part of every
/// connection's task, idle ones included, though few ever read the history.
pub(crate) fn catch_up<'a>(
    rt: &'a Realtime,
    sub: &'a mut Sub,
    out: &'a mut Outbox,
) -> BoxFuture<'a, Result<u64, StoreError>> {
    async move {
        let head = catch_up_unboxed(rt, sub, out).await?;
        // Up to the head: no read is pending any more.
        sub.unread = false;
        Ok(head)
    }
    .boxed()
}

async fn catch_up_unboxed(
    rt: &Realtime,
    sub: &mut Sub,
    out: &mut Outbox,
) -> Result<u64, StoreError> {
    let store = &rt.inner.store;
    let limit = rt.inner.config.replay_max;
    // Most bytes of history one catch-up puts in the connection's write buffer; the rest is
    // a `gap` (`history_trimmed`), so a subscribe holds at most this much, not
    // `WS_REPLAY_MAX` × `WS_MAX_MESSAGE_BYTES`.
    let max_bytes = rt.inner.config.replay_max_bytes;
    let name = sub.channel.shared_name();
    // At most a few epoch changes while reading (each read is atomic).
    'epochs: for _ in 0..3 {
        let mut history = store.read(&name, sub.last, PAGE, limit).await?;
        sub.local_floor = rt.local_published();
        if sub.degraded {
            if history.epoch.is_none() || history.epoch == sub.epoch {
                // Still the epoch the `degraded` gap ended (or none yet): nothing of it is
                // delivered; the next epoch will be, from its start.
                sub.last = sub.last.max(history.head);
                return Ok(history.head);
            }
            // A new epoch: from its start, with no second gap for the one that ended.
            sub.degraded = false;
            sub.epoch = history.epoch;
            sub.last = 0;
            continue;
        }
        let Some(epoch) = history.epoch.clone() else {
            // The channel has no epoch: the one the subscriber had ended with no successor.
            end_epoch(&name, sub, None, false, out);
            return Ok(0);
        };
        if sub.epoch.as_deref() != Some(&*epoch) {
            end_epoch(&name, sub, Some(epoch), history.degraded, out);
            continue;
        }
        // Pages until the head of the first read (later messages arrive live).
        let head = history.head;
        if sub.last > head {
            // A position this epoch never reached (a client's made-up `since`, or offsets
            // of a Redis process that is gone): the client reloads, then follows from the
            // head.
            let gap = protocol::gap(&name, &epoch, after(sub.last), None, "offset_ahead");
            out.text(gap);
            sub.last = head;
            return Ok(head);
        }
        let mut expected = after(sub.last);
        let mut bytes = 0usize;
        loop {
            let empty = history.items.is_empty();
            for item in std::mem::take(&mut history.items) {
                if item.offset < expected {
                    continue;
                }
                if bytes >= max_bytes {
                    // The rest is named by the `gap` below.
                    break;
                }
                bytes += item.frame.len();
                if item.offset > expected {
                    out.text(protocol::gap(
                        &name,
                        &epoch,
                        expected,
                        Some(item.offset - 1),
                        "history_trimmed",
                    ));
                }
                out.message(item.frame.clone());
                expected = after(item.offset);
            }
            sub.last = expected - 1;
            if empty || expected > head || bytes >= max_bytes {
                break;
            }
            // `WS_REPLAY_MAX` applied to the first page only (it moved `sub.last` up): a
            // later page applying it again would skip messages the history holds.
            history = store.read(&name, sub.last, PAGE, u64::MAX).await?;
            sub.local_floor = rt.local_published();
            if history.epoch.as_deref() != Some(&*epoch) {
                continue 'epochs;
            }
        }
        if expected <= head {
            out.text(protocol::gap(
                &name,
                &epoch,
                expected,
                Some(head),
                "history_trimmed",
            ));
            sub.last = head;
        }
        return Ok(head);
    }
    Ok(sub.last)
}

/// Moves `sub` to `next` (from offset 0), with a `gap` for the rest of the epoch it leaves.
/// `degraded`: `next` began after messages were delivered only locally somewhere, so even a
/// subscription without an epoch gets a `gap` (reason `degraded`).
fn end_epoch(name: &str, sub: &mut Sub, next: Option<Arc<str>>, degraded: bool, out: &mut Outbox) {
    match std::mem::replace(&mut sub.epoch, next) {
        Some(old) => {
            let reason = if degraded {
                "degraded"
            } else {
                "epoch_changed"
            };
            let gap = protocol::gap(name, &old, after(sub.last), None, reason);
            out.text(gap);
        }
        None if degraded => {
            out.text(protocol::degraded_gap(name, None, after(sub.last)));
        }
        None => {}
    }
    sub.last = 0;
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use serde_json::{Value, json};

    use super::*;

    const CHANNEL: &str = "ai-collaborations";

    fn sub(epoch: Option<&str>, last: u64) -> Sub {
        Sub {
            channel: Channel::parse(CHANNEL).unwrap(),
            epoch: epoch.map(Arc::from),
            last,
            degraded: false,
            local_floor: 0,
            unread: false,
        }
    }

    fn live(epoch: &str, offset: u64) -> Delivery {
        Delivery {
            channel: CHANNEL.into(),
            epoch: epoch.into(),
            offset,
            frame: Bytes::from(protocol::message(CHANNEL, epoch, offset, 0, "{}")),
            durable: true,
        }
    }

    fn timed_out() -> StoreError {
        StoreError::Redis("timed out".into())
    }

    /// What the client would read: (type, epoch, offset or from, to).
    fn sent(out: &Outbox) -> Vec<(Value, Value, Value, Value)> {
        let mut at = 0;
        std::iter::from_fn(|| out.frame_at(&mut at, None))
            .map(|frame| serde_json::from_slice::<Value>(frame.payload()).unwrap())
            .map(|m| {
                let position = if m["type"] == "gap" {
                    m["from"].clone()
                } else {
                    m["offset"].clone()
                };
                (
                    m["type"].clone(),
                    m["epoch"].clone(),
                    position,
                    m["to"].clone(),
                )
            })
            .collect()
    }

    /// Epochs are random: without the history nothing tells a late message of an older epoch
    /// from the first of a newer one, so neither moves the subscription.
    #[test]
    fn another_epochs_message_whose_read_fails_leaves_the_position_and_writes_nothing() {
        for (epoch, last) in [(Some("current"), 5), (None, 0)] {
            let mut sub = sub(epoch, last);
            let mut out = Outbox::default();
            let result = after_failed_read(&mut sub, &live("other", 7), &mut out, timed_out());
            assert!(result.is_err(), "the caller is not asked to read again");
            assert_eq!((sub.epoch.as_deref(), sub.last), (epoch, last));
            assert!(sub.unread);
            assert!(out.is_empty(), "{:?}", sent(&out));
        }
    }

    #[test]
    fn while_a_read_is_pending_its_own_epoch_goes_on_live_and_others_wait_for_the_read() {
        let mut sub = sub(Some("current"), 5);
        sub.unread = true;
        assert_eq!(step(&sub, &live("current", 6)), Step::Write);
        assert_eq!(step(&sub, &live("current", 5)), Step::Drop);
        assert_eq!(step(&sub, &live("current", 9)), Step::Read);
        assert_eq!(step(&sub, &live("older", 8)), Step::Drop);
        assert_eq!(step(&sub, &live("newer", 1)), Step::Drop);
        sub.unread = false;
        assert_eq!(step(&sub, &live("newer", 1)), Step::Read);
    }

    #[test]
    fn a_jump_in_its_own_epoch_whose_read_fails_is_named_by_a_gap_and_delivery_goes_on() {
        let mut sub = sub(Some("current"), 5);
        let mut out = Outbox::default();
        after_failed_read(&mut sub, &live("current", 9), &mut out, timed_out()).unwrap();
        assert_eq!(
            sent(&out),
            [
                (json!("gap"), json!("current"), json!(6), json!(8)),
                (json!("message"), json!("current"), json!(9), Value::Null),
            ]
        );
        assert_eq!((sub.last, sub.unread), (9, false));
    }

    #[test]
    fn a_message_the_failed_read_delivered_already_is_not_written_again() {
        // The read's first pages reached offset 12 before a later page failed.
        let mut sub = sub(Some("current"), 12);
        let mut out = Outbox::default();
        after_failed_read(&mut sub, &live("current", 9), &mut out, timed_out()).unwrap();
        assert!(out.is_empty(), "{:?}", sent(&out));
        assert_eq!(sub.last, 12);
    }
}
