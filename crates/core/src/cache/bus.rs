//! Near-cache coherence across instances, over Redis pub/sub.
//!
//! Every instance publishes a heartbeat on the bus every [`HEARTBEAT`]; it trusts its
//! in-process tier only until [`TRUST`] after the *send time of its own latest heartbeat that
//! came back*. Pub/sub delivers in publish order, so an instance that has not yet processed an
//! invalidation has only heard its own heartbeats sent before that invalidation reached Redis:
//! its trust ends at most [`TRUST`] after it. `invalidate` therefore returns once every live
//! instance acknowledged, or once [`TRUST`] plus a margin has passed since the publish was
//! acknowledged by Redis, whichever comes first. Trust regained after a gap flushes the
//! in-process tier first: invalidations may have been missed meanwhile (PITFALLS 6).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::Inner;
use crate::db::Db;
use crate::redis::{Redis, ShardEvent};

/// What carries the bus (and domain events, `events.rs`): Redis pub/sub, or PostgreSQL
/// LISTEN/NOTIFY in unified mode. Both deliver a channel's messages to each listener in the
/// order they were published.
#[derive(Clone)]
pub(crate) enum Transport {
    Redis(Redis),
    Postgres(Db),
}

pub(crate) type Payloads = std::pin::Pin<Box<dyn futures_util::Stream<Item = Vec<u8>> + Send>>;

impl Transport {
    pub(crate) async fn publish(&self, channel: &str, payload: String) -> Result<(), String> {
        match self {
            Transport::Redis(redis) => redis
                .publish(channel, payload)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Transport::Postgres(db) => {
                let conn = db.conn().await.map_err(|e| e.to_string())?;
                conn.execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// A new subscription to `channel`, as a stream of payloads that ends when it breaks. On
    /// a Redis Cluster it is sharded (the channel's slot's master only), and it ends at the
    /// first sign that messages may have been missed (a node lost, the slot moved, a
    /// resubscription), as a broken subscription does elsewhere.
    pub(crate) async fn subscribe(&self, channel: &str) -> Result<Payloads, String> {
        match self {
            Transport::Redis(redis) if redis.is_cluster() => {
                let subscription = redis
                    .sharded_subscribe(vec![channel.to_string()])
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(Box::pin(futures_util::stream::unfold(
                    subscription,
                    |mut subscription| async move {
                        loop {
                            match subscription.next().await {
                                ShardEvent::Message { payload, .. } => {
                                    return Some((payload, subscription));
                                }
                                ShardEvent::Subscribed { again: false, .. } => {}
                                ShardEvent::Subscribed { again: true, .. }
                                | ShardEvent::Lost { .. } => return None,
                            }
                        }
                    },
                )))
            }
            Transport::Redis(redis) => {
                let mut pubsub = redis.pubsub().await.map_err(|e| e.to_string())?;
                pubsub.subscribe(channel).await.map_err(|e| e.to_string())?;
                Ok(Box::pin(
                    pubsub
                        .into_on_message()
                        .map(|m| m.get_payload_bytes().to_vec()),
                ))
            }
            Transport::Postgres(db) => {
                let config = db.maintenance_config().clone();
                let connect = config.connect(db.tls());
                let (client, mut connection) =
                    tokio::time::timeout(Duration::from_secs(5), connect)
                        .await
                        .map_err(|_| "LISTEN connection timed out".to_string())?
                        .map_err(|e| e.to_string())?;
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
                // The connection must be polled for notifications to arrive; the client is
                // kept alive with it, and both end when the stream's receiver is dropped.
                let driver = tokio::spawn(async move {
                    let mut messages =
                        futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(Ok(message)) = messages.next().await {
                        if let tokio_postgres::AsyncMessage::Notification(n) = message
                            && tx.send(n.payload().as_bytes().to_vec()).is_err()
                        {
                            return;
                        }
                    }
                });
                let listen = format!("LISTEN \"{}\"", channel.replace('"', ""));
                if let Err(err) = client.batch_execute(&listen).await {
                    driver.abort();
                    return Err(err.to_string());
                }
                let stream =
                    futures_util::stream::unfold((rx, client), |(mut rx, client)| async move {
                        rx.recv().await.map(|payload| (payload, (rx, client)))
                    });
                Ok(Box::pin(stream))
            }
        }
    }
}

pub(crate) const HEARTBEAT: Duration = Duration::from_millis(50);
pub(crate) const TRUST: Duration = Duration::from_millis(250);
/// Added to [`TRUST`] when waiting for silent instances: clock-rate slack between hosts.
pub(crate) const MARGIN: Duration = Duration::from_millis(50);
/// A subscription on which nothing (not even our own heartbeats, sent every [`HEARTBEAT`])
/// was heard for this long is presumed dead and replaced. Measured from the last message,
/// not from the last loop turn: a half-open connection (a paused or vanished peer that never
/// closed it) neither errs nor ends the stream; silence is its only symptom.
const SILENCE: Duration = Duration::from_millis(500);
/// Opening a subscription (connect, `SUBSCRIBE` or `LISTEN`, its reply) must finish within
/// this; a server that accepts the connection and then answers nothing would hold the bus
/// forever otherwise.
pub(crate) const SUBSCRIBE_DEADLINE: Duration = Duration::from_secs(2);
/// Instances heard within this window are expected to acknowledge.
const LIVE: Duration = Duration::from_secs(1);

#[derive(Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Message {
    Hb {
        from: String,
        sent: u64,
    },
    Inv {
        from: String,
        id: u64,
        keys: Vec<String>,
        tags: Vec<String>,
    },
    Ack {
        from: String,
        to: String,
        id: u64,
    },
}

struct Waiting {
    pending: HashSet<String>,
    done: Arc<Notify>,
}

pub(crate) struct Bus {
    pub id: String,
    channel: String,
    transport: Transport,
    origin: Instant,
    /// Micros since `origin` until which the in-process tier may be used; 0: untrusted.
    trusted_until: AtomicU64,
    /// Micros since `origin` before which the tier is not trusted: a fresh subscription first
    /// waits out one trust window, so that any invalidation published before other instances
    /// could have heard of us reaches us before we trust anything.
    warm_until: AtomicU64,
    next_id: AtomicU64,
    waiting: Mutex<HashMap<u64, Waiting>>,
    peers: Mutex<HashMap<String, Instant>>,
}

impl Bus {
    pub fn new(transport: Transport, prefix: &str) -> Self {
        Bus {
            id: format!("{:016x}", fastrand::u64(..)),
            channel: format!("{prefix}bus:cache"),
            transport,
            origin: Instant::now(),
            trusted_until: AtomicU64::new(0),
            warm_until: AtomicU64::new(u64::MAX),
            next_id: AtomicU64::new(1),
            waiting: Mutex::default(),
            peers: Mutex::default(),
        }
    }

    fn micros(&self) -> u64 {
        self.origin.elapsed().as_micros() as u64
    }

    pub fn trusted(&self) -> bool {
        let now = self.micros();
        now < self.trusted_until.load(Ordering::SeqCst)
            && now >= self.warm_until.load(Ordering::SeqCst)
    }

    /// None of our own heartbeats sent in the last [`TRUST`] + [`MARGIN`] came back (or none
    /// since this subscription began): by now, every instance that hears the bus no better
    /// than we do has stopped trusting its in-process tier.
    pub fn unheard(&self) -> bool {
        self.micros() > self.trusted_until.load(Ordering::SeqCst) + MARGIN.as_micros() as u64
    }

    /// How many instances (this one included) were heard on the bus within `window` of the
    /// latest heartbeat heard from anyone. Measured against the latest heartbeat rather than
    /// now, the count holds steady while the bus itself is down: it is the cluster's size as
    /// last seen, which is what a fallback that divides a shared budget needs.
    pub fn live_instances(&self, window: Duration) -> usize {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let Some(latest) = peers.values().max().copied() else {
            return 1;
        };
        let others = peers
            .iter()
            .filter(|(id, seen)| **id != self.id && latest.duration_since(**seen) <= window)
            .count();
        others + 1
    }

    async fn publish(&self, message: &Message) -> Result<(), String> {
        let payload = serde_json::to_string(message).unwrap_or_default();
        self.transport.publish(&self.channel, payload).await
    }

    /// Other instances heard before and not within [`LIVE`] (for at most `forget`): each
    /// may have logged invalidations it could not send (`log.rs`).
    pub fn silent_peers(&self, forget: Duration) -> HashSet<String> {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers
            .iter()
            .filter(|(id, seen)| **id != self.id && (LIVE..forget).contains(&seen.elapsed()))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Tells every instance to drop `keys` and `tags` from its in-process tier, and waits until
    /// each live one acknowledged or can no longer be trusting its tier. False when the
    /// message could not be published: nobody heard it.
    pub async fn broadcast(&self, keys: Vec<String>, tags: Vec<String>) -> bool {
        // An instance that does not hear the bus (yet) cannot know who is listening: it waits
        // the full window instead of counting acknowledgements.
        let know_peers = self.trusted();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let pending: HashSet<String> = {
            let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            peers
                .iter()
                .filter(|(p, seen)| **p != self.id && seen.elapsed() < LIVE)
                .map(|(p, _)| p.clone())
                .collect()
        };
        let done = Arc::new(Notify::new());
        if !pending.is_empty() {
            let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            waiting.insert(
                id,
                Waiting {
                    pending,
                    done: done.clone(),
                },
            );
        }
        let started = tokio::time::Instant::now();
        let published = self.publish_inv(id, keys, tags).await;
        // Published: Redis ordered it before every heartbeat sent from now on, so no instance
        // trusts its tier for longer than TRUST past this point without having processed it.
        // Not published (Redis did not answer within its deadline): there is no such point
        // to wait for; what remains is the trust of instances that cannot hear Redis either,
        // which ran out TRUST after their last heartbeat that Redis took, before we began.
        // So the wait counts from the start, and a failed publish costs max(REDIS_TIMEOUT,
        // TRUST + MARGIN) in all rather than their sum.
        let deadline = if published.is_ok() {
            tokio::time::Instant::now() + TRUST + MARGIN
        } else {
            started + TRUST + MARGIN
        };
        if published.is_ok() && know_peers {
            let waited = async {
                loop {
                    let notified = done.notified();
                    let finished = {
                        let waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
                        waiting.get(&id).is_none_or(|w| w.pending.is_empty())
                    };
                    if finished {
                        return;
                    }
                    notified.await;
                }
            };
            let _ = tokio::time::timeout_at(deadline, waited).await;
        } else {
            metrics::counter!(crate::metrics::BUS_BLIND_WAITS).increment(1);
            tokio::time::sleep_until(deadline).await;
        }
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        published.is_ok()
    }

    /// Publishes an invalidation without waiting for acknowledgements; whether it was.
    pub async fn announce(&self, keys: Vec<String>, tags: Vec<String>) -> bool {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.publish_inv(id, keys, tags).await.is_ok()
    }

    async fn publish_inv(
        &self,
        id: u64,
        keys: Vec<String>,
        tags: Vec<String>,
    ) -> Result<(), String> {
        self.publish(&Message::Inv {
            from: self.id.clone(),
            id,
            keys,
            tags,
        })
        .await
    }

    fn on_message(&self, inner: &Inner, payload: &[u8]) -> Option<Message> {
        let message: Message = serde_json::from_slice(payload).ok()?;
        match &message {
            Message::Hb { from, sent } => {
                self.peers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(from.clone(), Instant::now());
                if *from == self.id {
                    if !self.trusted() {
                        // Back after a gap: whatever was missed meanwhile is flushed first.
                        inner.flush_memory();
                    }
                    let until = sent + TRUST.as_micros() as u64;
                    self.trusted_until.fetch_max(until, Ordering::SeqCst);
                }
                None
            }
            Message::Inv {
                from,
                id,
                keys,
                tags,
            } => {
                // Our own comes back too: nothing to apply, and nobody waits for our ack of it.
                if *from == self.id {
                    return None;
                }
                inner.apply_invalidation(keys, tags);
                Some(Message::Ack {
                    from: self.id.clone(),
                    to: from.clone(),
                    id: *id,
                })
            }
            Message::Ack { from, to, id } => {
                if *to == self.id {
                    let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(w) = waiting.get_mut(id) {
                        w.pending.remove(from);
                        if w.pending.is_empty() {
                            w.done.notify_waiters();
                        }
                    }
                }
                None
            }
        }
    }
}

/// Subscribes, heartbeats and applies remote invalidations until the engine is dropped.
/// Reconnects by itself; while disconnected the in-process tier is not trusted.
pub(crate) async fn run(engine: Weak<Inner>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some(inner) = engine.upgrade() else {
            return;
        };
        let Some(bus) = inner.bus.as_ref() else {
            return;
        };
        let (transport, channel) = (bus.transport.clone(), bus.channel.clone());
        drop(inner);
        let subscribed = tokio::time::timeout(SUBSCRIBE_DEADLINE, transport.subscribe(&channel))
            .await
            .unwrap_or_else(|_| Err(format!("no subscription within {SUBSCRIBE_DEADLINE:?}")));
        let stream = match subscribed {
            Ok(stream) => stream,
            Err(err) => {
                tracing::debug!(error = %err, "cache bus: cannot subscribe yet");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        if let Some(inner) = engine.upgrade()
            && let Some(bus) = inner.bus.as_ref()
        {
            let warm = bus.micros() + (TRUST + MARGIN).as_micros() as u64;
            bus.warm_until.store(warm, Ordering::SeqCst);
            bus.trusted_until.store(0, Ordering::SeqCst);
            inner.flush_memory();
            // Messages missed while unsubscribed may have gone to the invalidation log.
            inner.doubt();
        }
        tracing::info!("cache bus subscribed");
        if listen(&engine, stream).await.is_break() {
            return;
        }
        tracing::warn!("cache bus lost; in-process tier bypassed until it is back");
    }
}

/// Heartbeats and applies messages until the subscription ends or falls silent for
/// [`SILENCE`] (`Continue`: subscribe again), or the engine is dropped (`Break`).
async fn listen(engine: &Weak<Inner>, mut stream: Payloads) -> std::ops::ControlFlow<()> {
    use std::ops::ControlFlow::{Break, Continue};
    let mut tick = tokio::time::interval(HEARTBEAT);
    // A heartbeat that waited out Redis's deadline is not followed by a burst of the ticks
    // it missed: those would keep the loop busy publishing and never let silence be seen.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Absolute: pushed back by each message heard, never by a heartbeat tick.
    let silence = tokio::time::sleep(SILENCE);
    tokio::pin!(silence);
    // Replays run beside this loop (a namespace's deletion takes many round trips), one at
    // a time, so that heartbeats and messages are never held up by them.
    let mut replay: Option<tokio::task::JoinHandle<()>> = None;
    // Heartbeats are published beside this loop too, one at a time: a publish that waits out
    // REDIS_TIMEOUT (a slow or paused Redis) would otherwise make the next tick ready at once,
    // every turn, and the biased select would never read a message or see the silence.
    let mut heartbeat: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tokio::select! {
            // Heartbeats first, then messages, and silence only when neither is ready: a
            // backlog of messages is read before the subscription is judged silent.
            biased;
            _ = tick.tick() => {
                let Some(inner) = engine.upgrade() else { return Break(()) };
                let Some(bus) = inner.bus.as_ref() else { return Break(()) };
                if heartbeat.as_ref().is_none_or(|task| task.is_finished()) {
                    let hb = Message::Hb { from: bus.id.clone(), sent: bus.micros() };
                    let inner = inner.clone();
                    heartbeat = Some(tokio::spawn(async move {
                        let Some(bus) = inner.bus.as_ref() else { return };
                        match bus.publish(&hb).await {
                            Ok(()) => inner.shared_ok(),
                            Err(_) => inner.note_outage(),
                        }
                    }));
                }
                // Deliver remembered invalidations as soon as Redis takes them, not only
                // when this instance next serves a request.
                if replay.as_ref().is_none_or(|task| task.is_finished()) {
                    let cache = super::Cache { inner: inner.clone() };
                    replay = Some(tokio::spawn(async move { cache.replay_if_pending().await }));
                }
            }
            message = stream.next() => {
                let Some(msg) = message else { return Continue(()) };
                silence.as_mut().reset(tokio::time::Instant::now() + SILENCE);
                let Some(inner) = engine.upgrade() else { return Break(()) };
                let Some(bus) = inner.bus.as_ref() else { return Break(()) };
                if let Some(reply) = bus.on_message(&inner, &msg) {
                    // The ack is sent beside this loop, not awaited in it: under many
                    // invalidations, a Redis round trip per message here delayed our own
                    // heartbeats past the trust window, and every invalidation sent
                    // meanwhile waited the whole window.
                    let inner = inner.clone();
                    tokio::spawn(async move {
                        if let Some(bus) = inner.bus.as_ref() {
                            let _ = bus.publish(&reply).await;
                        }
                    });
                }
            }
            () = &mut silence => {
                tracing::warn!(silence = ?SILENCE, "cache bus silent: subscription presumed dead");
                return Continue(());
            }
        }
    }
}
