//! Every instance listens to every shard: `WS_REDIS_SHARDS` pub/sub channels
//! `{prefix}rt:shard:{n}`, a channel on shard FNV-1a(name) mod n.
//!
//! Why fixed shards rather than one Redis subscription per channel: subscribing happens once
//! per instance, not per channel, so a subscribe is acknowledged as soon as its shard is
//! listening, with no per-channel round trip, and Redis holds `instances × shards`
//! subscriptions whatever the number of channels. The price: each instance receives every
//! channel's messages and drops those it has no subscriber for. A hot channel fills one
//! shard's connection; the others go on.
//!
//! On one Redis (or with Sentinel): classic `PUBLISH`/`SUBSCRIBE`, one connection per shard.
//! On a Redis Cluster, where a classic `PUBLISH` is broadcast to every node, sharded pub/sub
//! (`SPUBLISH`/`SSUBSCRIBE`): each shard channel carries a hash tag that puts it in its own
//! share of the slots, so the shards spread over the masters (`RedisStore::shard_channel`),
//! and one sharded subscription ([`cascade_core::redis::ShardedSubscription`]) holds them all.
//!
//! A lost subscription (Redis restarted, the connection cut, on a cluster also a failover or
//! the shard's slot moved) is opened again by itself; once it is back, the subscribers of its
//! channels are told to read the history ([`Outbound::Resync`](crate::hub::Outbound)), so what
//! was published meanwhile is delivered or reported as a gap. While it is lost, the shard is
//! not listening: a subscribe on it waits (see `Realtime::shard_ready`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use cascade_core::redis::ShardEvent;
use cascade_core::shutdown::ShutdownSignal;
use cascade_core::tasks::Supervisor;
use futures_util::StreamExt;

use crate::Realtime;
use crate::store::{RedisStore, Store, parse_envelope, shard_of};

/// Opening a subscription must finish within this.
const SUBSCRIBE_DEADLINE: Duration = Duration::from_secs(2);
/// A subscription silent for this long is checked with a `PING` (a half-open connection
/// never ends its stream by itself).
const SILENCE: Duration = Duration::from_secs(5);

/// How often a degraded instance tries to end its degraded period.
const HEAL_EVERY: Duration = Duration::from_millis(200);

/// Starts one listener per shard and the heal task (nothing without Redis).
pub fn start(rt: &Realtime, tasks: &mut Supervisor) {
    let Store::Redis(store) = &rt.inner.store else {
        return;
    };
    if store.redis().is_cluster() {
        let rt = rt.clone();
        tasks.spawn("realtime-shards", move |stop| listen_sharded(rt, stop));
    } else {
        for shard in 0..rt.inner.listening.len() {
            let rt = rt.clone();
            tasks.spawn("realtime-shard", move |stop| listen(rt, shard, stop));
        }
    }
    let rt = rt.clone();
    tasks.spawn("realtime-heal", move |stop| heal(rt, stop));
}

/// While the instance is degraded (it delivered publishes only locally), tries every
/// [`HEAL_EVERY`] to give those channels a new epoch ([`Realtime::heal`]).
async fn heal(rt: Realtime, mut stop: ShutdownSignal) {
    loop {
        tokio::select! {
            _ = stop.recv() => return,
            () = tokio::time::sleep(HEAL_EVERY) => {}
        }
        if rt.degraded() {
            rt.heal().await;
        }
    }
}

async fn listen(rt: Realtime, shard: usize, mut stop: ShutdownSignal) {
    let Store::Redis(store) = &rt.inner.store else {
        return;
    };
    let flag = &rt.inner.listening[shard];
    let name = store.shard_channel(shard);
    let mut backoff = Duration::from_millis(50);
    let mut first = true;
    loop {
        let opened = async {
            let mut pubsub = store.redis().pubsub().await.map_err(|e| e.to_string())?;
            pubsub.subscribe(&name).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(pubsub)
        };
        let opened = tokio::select! {
            _ = stop.recv() => return,
            opened = tokio::time::timeout(SUBSCRIBE_DEADLINE, opened) => {
                opened.unwrap_or_else(|_| Err("no subscription in time".into()))
            }
        };
        let pubsub = match opened {
            Ok(pubsub) => pubsub,
            Err(err) => {
                tracing::debug!(shard, error = %err, "realtime: cannot subscribe yet");
                tokio::select! {
                    _ = stop.recv() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        flag.store(true, Ordering::SeqCst);
        if !first {
            resync(&rt, store, shard).await;
        }
        first = false;
        let (mut sink, mut stream) = pubsub.split();
        loop {
            tokio::select! {
                _ = stop.recv() => {
                    flag.store(false, Ordering::SeqCst);
                    return;
                }
                message = tokio::time::timeout(SILENCE, stream.next()) => match message {
                    Ok(Some(message)) => {
                        deliver(&rt, message.get_payload_bytes());
                    }
                    Ok(None) => break,
                    Err(_) => {
                        let ping = tokio::time::timeout(SUBSCRIBE_DEADLINE, sink.ping::<redis::Value>()).await;
                        if !matches!(ping, Ok(Ok(_))) {
                            break;
                        }
                    }
                },
            }
        }
        flag.store(false, Ordering::SeqCst);
        tracing::warn!(shard, "realtime: shard subscription lost; reconnecting");
    }
}

/// On a Redis Cluster: one sharded subscription to every shard's channel, opened again until
/// it is; it then heals itself and reports each shard lost (not listening) and back (listening,
/// and its channels resynced).
async fn listen_sharded(rt: Realtime, mut stop: ShutdownSignal) {
    let Store::Redis(store) = &rt.inner.store else {
        return;
    };
    let mut backoff = Duration::from_millis(50);
    let mut subscription = loop {
        let opened = store
            .redis()
            .sharded_subscribe(store.shard_channels().to_vec());
        let opened = tokio::select! {
            _ = stop.recv() => return,
            opened = tokio::time::timeout(SUBSCRIBE_DEADLINE, opened) => {
                opened.map_err(|_| "no subscription in time".to_string())
                    .and_then(|opened| opened.map_err(|e| e.to_string()))
            }
        };
        match opened {
            Ok(subscription) => break subscription,
            Err(err) => {
                tracing::debug!(error = %err, "realtime: cannot subscribe to the shards yet");
                tokio::select! {
                    _ = stop.recv() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    };
    let shard_of_channel = |channel: &str| {
        store
            .shard_channels()
            .iter()
            .position(|name| name == channel)
    };
    // Resyncs run beside the delivery of the other shards' messages (a lost node brings every
    // shard back at once, and each resync may wait for Redis); dropped at the end, they stop.
    let mut resyncs = tokio::task::JoinSet::new();
    loop {
        while resyncs.try_join_next().is_some() {}
        let event = tokio::select! {
            _ = stop.recv() => break,
            event = subscription.next() => event,
        };
        match event {
            ShardEvent::Message { payload, .. } => deliver(&rt, &payload),
            ShardEvent::Subscribed { channel, again } => {
                let Some(shard) = shard_of_channel(&channel) else {
                    continue;
                };
                rt.inner.listening[shard].store(true, Ordering::SeqCst);
                if again {
                    let rt = rt.clone();
                    resyncs.spawn(async move {
                        if let Store::Redis(store) = &rt.inner.store {
                            resync(&rt, store, shard).await;
                        }
                    });
                }
            }
            ShardEvent::Lost { channel } => {
                let Some(shard) = shard_of_channel(&channel) else {
                    continue;
                };
                rt.inner.listening[shard].store(false, Ordering::SeqCst);
                tracing::warn!(shard, "realtime: shard subscription lost; resubscribing");
            }
        }
    }
    for flag in &rt.inner.listening {
        flag.store(false, Ordering::SeqCst);
    }
}

/// Hands what the publish script sent on a shard to this instance's subscribers.
fn deliver(rt: &Realtime, payload: &[u8]) {
    if let Some(delivery) = parse_envelope(payload) {
        rt.inner.hub.deliver(Arc::new(delivery));
    }
}

/// After shard `shard`'s subscription came back: its channels' subscribers read the history,
/// to get what was published while it was away (or a `gap`).
async fn resync(rt: &Realtime, store: &RedisStore, shard: usize) {
    tracing::info!(
        shard,
        "realtime: shard subscription restored; resyncing its channels"
    );
    // The command connection may have broken with it, and redis-rs fails the first command on
    // a broken connection: have it answer before the subscribers read the history (a resync
    // whose read fails would wait for the channel's next message).
    for _ in 0..20 {
        let ping = store.redis().query::<String>(&redis::cmd("PING")).await;
        if ping.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let shards = rt.inner.listening.len();
    rt.inner
        .hub
        .resync(|channel| shard_of(channel, shards) == shard);
}
