//! Where each subscription stands (epoch and last offset) and the one rule that moves it.
//!
//! A message is written only if it is the next offset of the subscription's epoch; an older
//! one is a duplicate and dropped; a jump or another epoch sends the subscription to the
//! history ([`catch_up`]), which delivers what is missing or a `gap` naming exactly the offsets
//! it cannot deliver. That one rule makes resume (`since`), offset jumps after a lost Redis
//! subscription, and Redis restarts (a new epoch) the same code path.
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
}

/// Hands `delivery` to `sub`: written, dropped as a duplicate, or preceded by what the
/// history says is missing before it.
pub(crate) async fn deliver(rt: &Realtime, sub: &mut Sub, delivery: &Delivery, out: &mut Outbox) {
    if !delivery.durable {
        if delivery.offset <= sub.local_floor {
            // Older than the history the subscription last read (see `local_floor`).
            return;
        }
        if !sub.degraded {
            let gap =
                protocol::degraded_gap(sub.channel.name(), sub.epoch.as_deref(), after(sub.last));
            out.text(gap);
            sub.degraded = true;
        }
        out.message(delivery.frame.clone());
        return;
    }
    if sub.degraded && sub.epoch.as_deref() == Some(&*delivery.epoch) {
        // Named by the `degraded` gap already.
        return;
    }
    if sub.epoch.as_deref() == Some(&*delivery.epoch) {
        if delivery.offset <= sub.last {
            return;
        }
        if delivery.offset == after(sub.last) {
            out.message(delivery.frame.clone());
            sub.last = delivery.offset;
            return;
        }
    }
    if catch_up(rt, sub, out).await.is_err() {
        // The history cannot be read: name what is missing, then go on live.
        let channel = sub.channel.name();
        let same = sub.epoch.as_deref() == Some(&*delivery.epoch);
        if !same
            && !std::mem::take(&mut sub.degraded)
            && let Some(old) = &sub.epoch
        {
            out.text(protocol::gap(
                channel,
                old,
                after(sub.last),
                None,
                "epoch_changed",
            ));
        }
        let from = if same { after(sub.last) } else { 1 };
        if delivery.offset > from {
            out.text(protocol::gap(
                channel,
                &delivery.epoch,
                from,
                Some(delivery.offset - 1),
                "unavailable",
            ));
        }
        if !delivery.frame.is_empty() {
            out.message(delivery.frame.clone());
        }
        sub.epoch = Some(delivery.epoch.clone());
        sub.last = delivery.offset;
    }
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
    catch_up_unboxed(rt, sub, out).boxed()
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
