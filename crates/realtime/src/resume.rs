//! Where each subscription stands (epoch and last offset) and the one rule that moves it.
//!
//! A message is written only if it is the next offset of the subscription's epoch; an older
//! one is a duplicate and dropped; a jump or another epoch sends the subscription to the
//! history ([`catch_up`]), which delivers what is missing or a `gap` naming exactly the offsets
//! it cannot deliver. That one rule makes resume (`since`), offset jumps after a lost Redis
//! subscription, and Redis restarts (a new epoch) the same code path.

use std::sync::Arc;

use yawc::Frame;

use crate::Realtime;
use crate::channel::Channel;
use crate::protocol;
use crate::store::{Delivery, StoreError};

/// Messages read from the history per call.
const PAGE: u64 = 200;

/// One subscription's position.
pub(crate) struct Sub {
    pub channel: Channel,
    /// The epoch of `last`; `None` while the channel has no history at all.
    pub epoch: Option<Arc<str>>,
    /// The last offset delivered (or skipped over by a `gap`).
    pub last: u64,
}

/// Hands `delivery` to `sub`: written, dropped as a duplicate, or preceded by what the
/// history says is missing before it.
pub(crate) async fn deliver(
    rt: &Realtime,
    sub: &mut Sub,
    delivery: &Delivery,
    out: &mut Vec<Frame>,
) {
    if sub.epoch.as_deref() == Some(&*delivery.epoch) {
        if delivery.offset <= sub.last {
            return;
        }
        if delivery.offset == sub.last + 1 {
            out.push(Frame::text(delivery.frame.clone()));
            sub.last = delivery.offset;
            return;
        }
    }
    if catch_up(rt, sub, out).await.is_err() {
        // The history cannot be read: name what is missing, then go on live.
        let channel = sub.channel.name();
        let same = sub.epoch.as_deref() == Some(&*delivery.epoch);
        if !same && let Some(old) = &sub.epoch {
            out.push(Frame::text(protocol::gap(
                channel,
                old,
                sub.last + 1,
                None,
                "epoch_changed",
            )));
        }
        let from = if same { sub.last + 1 } else { 1 };
        if delivery.offset > from {
            out.push(Frame::text(protocol::gap(
                channel,
                &delivery.epoch,
                from,
                Some(delivery.offset - 1),
                "unavailable",
            )));
        }
        out.push(Frame::text(delivery.frame.clone()));
        sub.epoch = Some(delivery.epoch.clone());
        sub.last = delivery.offset;
    }
}

/// Brings `sub` up to its channel's head from the history: the missing messages, or a `gap`
/// for each range the history no longer holds (or an epoch that ended). Returns the head.
/// Read in pages of [`PAGE`] (one Lua call each stays short), at most `WS_REPLAY_MAX` in all.
pub(crate) async fn catch_up(
    rt: &Realtime,
    sub: &mut Sub,
    out: &mut Vec<Frame>,
) -> Result<u64, StoreError> {
    let store = &rt.inner.store;
    let limit = rt.inner.config.replay_max;
    let name = sub.channel.shared_name();
    // At most a few epoch changes while reading (each read is atomic).
    'epochs: for _ in 0..3 {
        let mut history = store.read(&name, sub.last, PAGE, limit).await?;
        let Some(epoch) = history.epoch.clone() else {
            // The channel has no epoch: the one the subscriber had ended with no successor.
            end_epoch(&name, sub, None, out);
            return Ok(0);
        };
        if sub.epoch.as_deref() != Some(&*epoch) {
            end_epoch(&name, sub, Some(epoch), out);
            continue;
        }
        // Pages until the head of the first read (later messages arrive live).
        let head = history.head;
        let mut expected = sub.last + 1;
        loop {
            let empty = history.items.is_empty();
            for item in std::mem::take(&mut history.items) {
                if item.offset < expected {
                    continue;
                }
                if item.offset > expected {
                    out.push(Frame::text(protocol::gap(
                        &name,
                        &epoch,
                        expected,
                        Some(item.offset - 1),
                        "history_trimmed",
                    )));
                }
                out.push(Frame::text(item.frame.clone()));
                expected = item.offset + 1;
            }
            sub.last = expected - 1;
            if empty || expected > head {
                break;
            }
            history = store.read(&name, sub.last, PAGE, limit).await?;
            if history.epoch.as_deref() != Some(&*epoch) {
                continue 'epochs;
            }
        }
        if expected <= head {
            out.push(Frame::text(protocol::gap(
                &name,
                &epoch,
                expected,
                Some(head),
                "history_trimmed",
            )));
            sub.last = head;
        }
        return Ok(head);
    }
    Ok(sub.last)
}

/// Moves `sub` to `next` (from offset 0), with a `gap` for the rest of the epoch it leaves.
fn end_epoch(name: &str, sub: &mut Sub, next: Option<Arc<str>>, out: &mut Vec<Frame>) {
    if let Some(old) = std::mem::replace(&mut sub.epoch, next) {
        let gap = protocol::gap(name, &old, sub.last + 1, None, "epoch_changed");
        out.push(Frame::text(gap));
    }
    sub.last = 0;
}
