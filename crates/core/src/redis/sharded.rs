//! Sharded pub/sub on a Redis Cluster (`SSUBSCRIBE`/`SPUBLISH`, Redis 7).
//!
//! A classic `PUBLISH` on a cluster is broadcast over the cluster bus to every node; a sharded
//! one reaches only the master (and replicas) of its channel's slot, so pub/sub load spreads
//! over the masters like keys do. The price: a subscription lives on the node that owns its
//! channel's slot, and moves (or vanishes) with it.
//!
//! redis-rs's cluster client (RESP3 with a push sender) tracks the subscriptions and sends
//! them again after it reconnects to a node or refreshes its slot map. It is not enough on
//! its own, so [`ShardedSubscription`] keeps its own account:
//! - a node's `sunsubscribe` (its slot moved away, or it was demoted) removes the channel from
//!   redis-rs's tracker: nothing would subscribe it again;
//! - redis-rs resubscribes a node with one `SSUBSCRIBE` of all its channels, which Redis
//!   refuses (`CROSSSLOT`) when they are in different slots;
//! - a `Disconnection` push does not say which node was lost;
//! - a half-open connection never reports anything.
//!
//! So every channel not known to be subscribed is subscribed again, one `SSUBSCRIBE` each,
//! every [`RETRY`] (a repeated `SSUBSCRIBE` is harmless: the server confirms it again), and
//! every channel is checked that way every [`CHECK`]. Whatever may have dropped a channel's
//! subscription is reported ([`ShardEvent::Lost`]), and its next confirmation says it is back
//! after a possible gap (`again`): pub/sub is at most once (PITFALLS 6), the caller reads
//! what it missed from where it keeps it.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;

use super::RedisError;

/// A channel not known to be subscribed is subscribed again this often.
const RETRY: Duration = Duration::from_millis(250);
/// Every channel's subscription is checked this often (a half-open connection reports
/// nothing by itself).
const CHECK: Duration = Duration::from_secs(5);

/// What a [`ShardedSubscription`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardEvent {
    /// A message published on `channel`.
    Message { channel: String, payload: Vec<u8> },
    /// The server confirmed the subscription of `channel`: messages published from now on
    /// arrive. `again`: it was subscribed before and may have been lost since (reported by
    /// [`Lost`](ShardEvent::Lost) or not), so messages published meanwhile may be missing.
    Subscribed { channel: String, again: bool },
    /// The subscription of `channel` may be gone (its node's connection broke, the node gave
    /// its slot away, a check failed): messages may be missed until it is
    /// [`Subscribed`](ShardEvent::Subscribed) again, which follows by itself.
    Lost { channel: String },
}

/// A cluster connection subscribed to a fixed set of shard channels; see the module doc.
/// Dropping it ends the subscriptions (its connections close).
pub struct ShardedSubscription {
    conn: ClusterConnection,
    /// redis-rs's pushes: messages, confirmations, `sunsubscribe`s, disconnections. `None`
    /// once the client is gone (never while `conn` lives, in redis-rs 1.8).
    pushes: Option<UnboundedReceiver<PushInfo>>,
    channels: Vec<String>,
    /// Channels confirmed and not lost since.
    live: HashSet<String>,
    /// Channels confirmed at least once: a later confirmation follows a possible gap.
    confirmed: HashSet<String>,
    events: VecDeque<ShardEvent>,
    /// When the next round starts ([`CHECK`] after one that found every channel live,
    /// [`RETRY`] otherwise).
    next_check: Instant,
    /// The next round checks every channel; otherwise it subscribes only those not live
    /// (and every channel anyway once `full_due` has passed, while some node stays down).
    check_all: bool,
    full_due: Instant,
    /// The round of `SSUBSCRIBE`s under way, if any: its failures. It runs beside the
    /// reading of pushes, so a node that hangs delays no other node's messages.
    round: Option<tokio::task::JoinHandle<Failures>>,
    timeout: Duration,
}

/// The channels a round of `SSUBSCRIBE`s failed to subscribe, with why.
type Failures = Vec<(String, Result<(), RedisError>)>;

impl ShardedSubscription {
    /// Subscribes `channels` on `conn`, whose pushes arrive on `pushes`; a channel that cannot
    /// be subscribed yet is tried again by [`next`](Self::next).
    pub(super) async fn start(
        conn: ClusterConnection,
        pushes: UnboundedReceiver<PushInfo>,
        channels: Vec<String>,
        timeout: Duration,
    ) -> Result<ShardedSubscription, RedisError> {
        let mut subscription = ShardedSubscription {
            conn,
            pushes: Some(pushes),
            channels,
            live: HashSet::new(),
            confirmed: HashSet::new(),
            events: VecDeque::new(),
            next_check: Instant::now(),
            check_all: true,
            full_due: Instant::now() + CHECK,
            round: None,
            timeout,
        };
        let failed = subscription.round().await;
        if failed.len() == subscription.channels.len()
            && let Some((_, Err(err))) = failed.into_iter().next()
        {
            return Err(err);
        }
        Ok(subscription)
    }

    /// The next event; waits as long as it takes (subscribing lost channels again meanwhile).
    pub async fn next(&mut self) -> ShardEvent {
        loop {
            if let Some(event) = self.events.pop_front() {
                return event;
            }
            if self.round.is_none() && Instant::now() >= self.next_check {
                let wanted: Vec<String> = if self.check_all || Instant::now() >= self.full_due {
                    self.full_due = Instant::now() + CHECK;
                    self.channels.clone()
                } else {
                    let live = &self.live;
                    self.channels
                        .iter()
                        .filter(|c| !live.contains(*c))
                        .cloned()
                        .collect()
                };
                if wanted.is_empty() {
                    // Confirmed since the round was scheduled: the next one is a check.
                    self.check_all = true;
                    self.next_check = Instant::now() + CHECK;
                    continue;
                }
                self.round = Some(tokio::spawn(subscribe_all(
                    self.conn.clone(),
                    wanted,
                    self.timeout,
                )));
            }
            let (pushes, round, next_check) = (&mut self.pushes, &mut self.round, self.next_check);
            let push = async {
                match pushes.as_mut() {
                    Some(pushes) => pushes.recv().await,
                    None => std::future::pending().await,
                }
            };
            let ended = async {
                match round.as_mut() {
                    Some(round) => round.await.unwrap_or_default(),
                    None => {
                        tokio::time::sleep_until(next_check).await;
                        Vec::new()
                    }
                }
            };
            tokio::select! {
                push = push => match push {
                    Some(push) => self.on_push(push),
                    None => {
                        self.pushes = None;
                        self.lose_all();
                    }
                },
                failed = ended => {
                    if self.round.take().is_some() {
                        self.after_round(&failed);
                    }
                }
            }
        }
    }

    /// One round of `SSUBSCRIBE`s, waited for (at the start); its failures.
    async fn round(&mut self) -> Failures {
        let failed = subscribe_all(self.conn.clone(), self.channels.clone(), self.timeout).await;
        self.after_round(&failed);
        failed
    }

    /// A round ended: its failures are lost channels; the next round is scheduled.
    fn after_round(&mut self, failed: &Failures) {
        for (channel, result) in failed {
            if let Err(err) = result {
                tracing::debug!(channel, error = %err, "redis: SSUBSCRIBE failed");
                self.lose(channel);
            }
        }
        self.check_all = failed.is_empty() && self.live.len() == self.channels.len();
        self.next_check = Instant::now() + if self.check_all { CHECK } else { RETRY };
    }

    fn on_push(&mut self, push: PushInfo) {
        let channel = push.data.first().and_then(text);
        match (push.kind, channel) {
            (PushKind::SMessage, Some(channel)) => {
                if let Some(payload) = push.data.get(1).and_then(bytes) {
                    self.events.push_back(ShardEvent::Message {
                        channel,
                        payload: payload.to_vec(),
                    });
                }
            }
            (PushKind::SSubscribe, Some(channel)) => self.confirm(channel),
            (PushKind::SUnsubscribe, Some(channel)) => {
                tracing::info!(
                    channel,
                    "redis: the server ended a sharded subscription (its slot moved)"
                );
                self.lose(&channel);
            }
            (PushKind::Disconnection, _) => self.lose_all(),
            _ => {}
        }
    }

    /// A confirmation: news only for a channel of ours not known to be live.
    fn confirm(&mut self, channel: String) {
        if !self.channels.contains(&channel) || !self.live.insert(channel.clone()) {
            return;
        }
        let again = !self.confirmed.insert(channel.clone());
        self.events
            .push_back(ShardEvent::Subscribed { channel, again });
    }

    fn lose(&mut self, channel: &str) {
        if self.live.remove(channel) {
            self.events.push_back(ShardEvent::Lost {
                channel: channel.to_string(),
            });
        }
        self.check_all = false;
        self.next_check = self.next_check.min(Instant::now() + RETRY);
    }

    /// A node's connection broke (redis-rs does not say which): every channel may be lost.
    fn lose_all(&mut self) {
        for channel in self.channels.clone() {
            self.lose(&channel);
        }
    }
}

/// Sends `SSUBSCRIBE` for each channel (one each: channels of different slots cannot share
/// one), concurrently, each under the deadline; returns the failures.
async fn subscribe_all(
    conn: ClusterConnection,
    channels: Vec<String>,
    timeout: Duration,
) -> Failures {
    let attempts = channels.into_iter().map(|channel| {
        let mut conn = conn.clone();
        async move {
            let result = match tokio::time::timeout(timeout, conn.ssubscribe(&channel)).await {
                Ok(result) => result.map_err(RedisError::from),
                Err(_) => Err(RedisError::Timeout(timeout)),
            };
            (channel, result)
        }
    });
    futures_util::future::join_all(attempts)
        .await
        .into_iter()
        .filter(|(_, result)| result.is_err())
        .collect()
}

impl Drop for ShardedSubscription {
    fn drop(&mut self) {
        if let Some(round) = self.round.take() {
            round.abort();
        }
    }
}

fn bytes(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(text) => Some(text.as_bytes()),
        _ => None,
    }
}

fn text(value: &Value) -> Option<String> {
    bytes(value).and_then(|b| String::from_utf8(b.to_vec()).ok())
}
