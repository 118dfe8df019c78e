//! Domain events across instances: "a pattern changed", "someone joined a space".
//!
//! An event published on any instance reaches every instance's subscribers, each once. The
//! transport is the cache bus's (`cache/bus.rs`): Redis pub/sub on `{prefix}events`
//! (`cascade:events`) when Redis is configured, else PostgreSQL `NOTIFY` on the same name with
//! `:` spelled `_` (`cascade_events`, unified mode). The publishing instance hands the event to
//! its own subscribers at once and ignores its own copy when the transport brings it back, so
//! local subscribers neither wait for a round trip nor see an event twice.
//!
//! Delivery is at most once (PITFALLS 6): an event published while an instance's subscription
//! is down (a Redis restart, a partition) does not reach that instance. The listener notices a
//! broken subscription by its end or by silence (it hears its own heartbeat every
//! [`HEARTBEAT`]; nothing for [`SILENCE`] means a half-open connection) and subscribes again by
//! itself. Subscribers that must not miss anything keep their own durable record (the
//! real-time channels' history) and use events as the prompt to read it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::cache::bus::{Payloads, Transport};
use crate::db::Db;
use crate::redis::Redis;
use crate::shutdown::ShutdownSignal;

/// The channel of account events that are not for clients (the real-time module bridges
/// only its own channel names).
pub const AUTH_CHANNEL: &str = "auth";
/// A login session ended (logout, revocation): `data` has `session_id` and `user_id`. Every
/// instance closes that session's WebSocket connections.
pub const SESSION_REVOKED: &str = "auth.session_revoked";
/// One access token was revoked (`POST /auth/revoke`): `data` has `session_id` and `jti`.
/// Every instance closes the WebSocket connections authenticated with that token.
pub const TOKEN_REVOKED: &str = "auth.token_revoked";

/// One domain event as every subscriber sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unique per event: the publishing instance's id and a counter.
    pub id: String,
    /// Who it is for, e.g. `cascade-events`, `space:{id}`, `user:{id}`.
    pub channel: String,
    /// What happened, e.g. `pattern.changed`, `space.joined`.
    pub kind: String,
    pub data: serde_json::Value,
    /// When it was published, Unix milliseconds (the publisher's clock).
    pub at_ms: i64,
    /// The publishing instance's id.
    pub origin: String,
}

#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    /// PostgreSQL's `NOTIFY` carries at most 8000 bytes; Redis is given the same kind of bound
    /// so that a publisher cannot flood every instance with one message.
    #[error("the event is {size} bytes; at most {max} can be published")]
    TooLarge { size: usize, max: usize },
    #[error("publishing the event failed: {0}")]
    Transport(String),
    #[error("publishing the event took longer than {0:?}")]
    Timeout(Duration),
}

/// Every instance's heartbeat period on the events channel.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A subscription that heard nothing, not even its own heartbeat, for this long is replaced.
const SILENCE: Duration = Duration::from_secs(3);
/// Opening a subscription must finish within this (a server that accepts and never answers).
const SUBSCRIBE_DEADLINE: Duration = Duration::from_secs(2);
/// A whole publish, connection included; the transports' own deadlines are usually shorter.
const PUBLISH_DEADLINE: Duration = Duration::from_secs(3);
/// Largest encoded event over PostgreSQL (`NOTIFY`'s payload limit is 8000 bytes).
const MAX_NOTIFY_BYTES: usize = 7_900;
/// Largest encoded event over Redis.
const MAX_REDIS_BYTES: usize = 256 * 1024;
/// Events held for a subscriber that has not read them yet; a slower one loses the oldest
/// (its next `recv` says `Lagged(n)`) rather than hold memory or slow the publisher.
const LOCAL_CAPACITY: usize = 4096;
/// PostgreSQL truncates identifiers past 63 bytes; `LISTEN` would quietly listen elsewhere.
const PG_CHANNEL_MAX: usize = 63;

/// What travels on the transport: events, and the heartbeats that prove a subscription alive.
#[derive(Serialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Outgoing<'a> {
    Event(&'a Event),
    Hb { from: &'a str },
}

#[derive(Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Incoming {
    Event(Event),
    Hb {
        #[allow(dead_code)]
        from: String,
    },
}

/// The event bus's handle: cheap to clone, shared by every module of one instance.
#[derive(Clone)]
pub struct Events {
    inner: Arc<Inner>,
}

struct Inner {
    /// This instance's id, the `origin` of what it publishes.
    id: String,
    transport: Transport,
    channel: String,
    max_bytes: usize,
    local: broadcast::Sender<Arc<Event>>,
    next: AtomicU64,
    /// A subscription is open right now.
    listening: AtomicBool,
}

impl Events {
    /// Events over Redis when it is configured, else over PostgreSQL `NOTIFY`. Nothing is
    /// received from other instances until [`run`](Self::run) is running.
    pub fn new(redis: Option<Redis>, db: Db, key_prefix: &str) -> Events {
        let name = format!("{key_prefix}events");
        let (transport, channel, max_bytes) = match redis {
            Some(redis) => (Transport::Redis(redis), name, MAX_REDIS_BYTES),
            None => (Transport::Postgres(db), pg_channel(&name), MAX_NOTIFY_BYTES),
        };
        Events {
            inner: Arc::new(Inner {
                id: format!("{:016x}", fastrand::u64(..)),
                transport,
                channel,
                max_bytes,
                local: broadcast::channel(LOCAL_CAPACITY).0,
                next: AtomicU64::new(1),
                listening: AtomicBool::new(false),
            }),
        }
    }

    /// This instance's id (the `origin` of its events).
    pub fn instance_id(&self) -> &str {
        &self.inner.id
    }

    /// The transport channel's name (`cascade:events` or `cascade_events` by default).
    pub fn transport_channel(&self) -> &str {
        &self.inner.channel
    }

    /// True while a subscription is open: events published elsewhere from now on reach this
    /// instance.
    pub fn listening(&self) -> bool {
        self.inner.listening.load(Ordering::SeqCst)
    }

    /// Every event from any instance, each once per subscriber, in publish order per instance
    /// (for publishes that follow one another; concurrent ones have no order).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.inner.local.subscribe()
    }

    /// Publishes to every instance; this instance's subscribers have it when this returns,
    /// whatever the transport does. Bounded by [`PUBLISH_DEADLINE`]; a transport failure is
    /// logged, counted (`cascade_events_publish_errors_total`) and returned: the other
    /// instances may not have the event. Too large an event is refused before anyone sees it.
    pub async fn publish(
        &self,
        channel: &str,
        kind: &str,
        data: serde_json::Value,
    ) -> Result<(), EventsError> {
        let inner = &self.inner;
        let event = Arc::new(Event {
            id: format!(
                "{}-{}",
                inner.id,
                inner.next.fetch_add(1, Ordering::Relaxed)
            ),
            channel: channel.to_string(),
            kind: kind.to_string(),
            data,
            at_ms: now_ms(),
            origin: inner.id.clone(),
        });
        let payload = serde_json::to_string(&Outgoing::Event(&event))
            .map_err(|e| EventsError::Transport(e.to_string()))?;
        if payload.len() > inner.max_bytes {
            return Err(EventsError::TooLarge {
                size: payload.len(),
                max: inner.max_bytes,
            });
        }
        metrics::counter!(crate::metrics::EVENTS_PUBLISHED).increment(1);
        // No subscriber here is not an error: the event is for the other instances too.
        let _ = inner.local.send(event);
        let sent = tokio::time::timeout(
            PUBLISH_DEADLINE,
            inner.transport.publish(&inner.channel, payload),
        )
        .await;
        let failure = match sent {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(err)) => EventsError::Transport(err),
            Err(_) => EventsError::Timeout(PUBLISH_DEADLINE),
        };
        metrics::counter!(crate::metrics::EVENTS_PUBLISH_ERRORS).increment(1);
        tracing::warn!(channel, kind, error = %failure, "event not published to other instances");
        Err(failure)
    }

    /// Subscribes to the transport and hands other instances' events to this instance's
    /// subscribers until `stop`; subscribes again by itself after an outage (with backoff up
    /// to 1 s). The application runs it under its supervisor.
    pub async fn run(self, mut stop: ShutdownSignal) {
        let mut backoff = Duration::from_millis(50);
        let mut warned = false;
        loop {
            let inner = &self.inner;
            let subscribe = tokio::time::timeout(
                SUBSCRIBE_DEADLINE,
                inner.transport.subscribe(&inner.channel),
            );
            let subscribed = tokio::select! {
                _ = stop.recv() => return,
                subscribed = subscribe => subscribed.unwrap_or_else(|_| {
                    Err(format!("no subscription within {SUBSCRIBE_DEADLINE:?}"))
                }),
            };
            let stream = match subscribed {
                Ok(stream) => stream,
                Err(err) => {
                    if !warned {
                        tracing::warn!(error = %err, "events: cannot subscribe yet; retrying");
                        warned = true;
                    }
                    tokio::select! {
                        _ = stop.recv() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            backoff = Duration::from_millis(50);
            warned = false;
            metrics::counter!(crate::metrics::EVENTS_SUBSCRIPTIONS).increment(1);
            inner.listening.store(true, Ordering::SeqCst);
            tracing::info!(channel = %inner.channel, "events: subscribed");
            let stopped = self.listen(stream, &mut stop).await;
            inner.listening.store(false, Ordering::SeqCst);
            if stopped {
                return;
            }
            tracing::warn!("events: subscription lost; events published meanwhile are missed");
        }
    }

    /// Reads one subscription until it ends or falls silent (false) or `stop` (true).
    async fn listen(&self, mut stream: Payloads, stop: &mut ShutdownSignal) -> bool {
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let silence = tokio::time::sleep(SILENCE);
        tokio::pin!(silence);
        // Heartbeats are sent beside the loop, one at a time, so a slow transport never holds
        // up reading.
        let mut heartbeat: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            tokio::select! {
                biased;
                _ = stop.recv() => {
                    if let Some(task) = heartbeat { task.abort(); }
                    return true;
                }
                _ = tick.tick() => {
                    if heartbeat.as_ref().is_none_or(|task| task.is_finished()) {
                        let events = self.clone();
                        heartbeat = Some(tokio::spawn(async move { events.heartbeat().await }));
                    }
                }
                message = stream.next() => {
                    let Some(payload) = message else { return false };
                    silence.as_mut().reset(tokio::time::Instant::now() + SILENCE);
                    self.deliver(&payload);
                }
                () = &mut silence => {
                    tracing::warn!(silence = ?SILENCE, "events: subscription silent, presumed dead");
                    return false;
                }
            }
        }
    }

    async fn heartbeat(&self) {
        let inner = &self.inner;
        let Ok(payload) = serde_json::to_string(&Outgoing::Hb { from: &inner.id }) else {
            return;
        };
        let _ = tokio::time::timeout(
            PUBLISH_DEADLINE,
            inner.transport.publish(&inner.channel, payload),
        )
        .await;
    }

    /// Hands another instance's event to this instance's subscribers; our own events were
    /// delivered when published, and heartbeats only prove the subscription alive.
    fn deliver(&self, payload: &[u8]) {
        match serde_json::from_slice::<Incoming>(payload) {
            Ok(Incoming::Event(event)) if event.origin != self.inner.id => {
                metrics::counter!(crate::metrics::EVENTS_RECEIVED).increment(1);
                let _ = self.inner.local.send(Arc::new(event));
            }
            Ok(_) => {}
            Err(err) => tracing::debug!(error = %err, "events: an unreadable message ignored"),
        }
    }
}

/// `name` as a PostgreSQL channel: `:` spelled `_`, at most [`PG_CHANNEL_MAX`] bytes.
fn pg_channel(name: &str) -> String {
    let mut channel = name.replace(':', "_");
    while channel.len() > PG_CHANNEL_MAX {
        channel.pop();
    }
    channel
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_channel_names_are_identifiers_postgres_keeps_whole() {
        assert_eq!(pg_channel("cascade:events"), "cascade_events");
        let long = format!("{}:events", "é".repeat(40));
        let channel = pg_channel(&long);
        assert!(channel.len() <= PG_CHANNEL_MAX);
        assert!(long.replace(':', "_").starts_with(&channel));
    }

    #[test]
    fn an_event_travels_tagged_and_comes_back_equal() {
        let event = Event {
            id: "a-1".into(),
            channel: "cascade-events".into(),
            kind: "pattern.changed".into(),
            data: serde_json::json!({"type": "economic"}),
            at_ms: 1,
            origin: "a".into(),
        };
        let wire = serde_json::to_string(&Outgoing::Event(&event)).unwrap();
        assert!(wire.starts_with(r#"{"t":"event""#), "{wire}");
        match serde_json::from_str::<Incoming>(&wire).unwrap() {
            Incoming::Event(back) => assert_eq!(back, event),
            Incoming::Hb { .. } => panic!("decoded as a heartbeat"),
        }
    }
}
