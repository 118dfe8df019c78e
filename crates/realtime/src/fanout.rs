//! Every instance listens to every shard: `WS_REDIS_SHARDS` pub/sub connections, channel
//! `{prefix}rt:shard:{n}`, a channel on shard FNV-1a(name) mod n.
//!
//! Why fixed shards rather than one Redis subscription per channel: subscribing happens once
//! per instance, not per channel, so a subscribe is acknowledged as soon as its shard is
//! listening, with no per-channel round trip, and Redis holds `instances × shards`
//! subscriptions whatever the number of channels. The price: each instance receives every
//! channel's messages and drops those it has no subscriber for. A hot channel fills one
//! shard's connection; the others go on. Plain `PUBLISH`/`SUBSCRIBE`: on one (non-cluster)
//! Redis sharded pub/sub (`SPUBLISH`) behaves the same, and redis-rs 1.x offers
//! `SSUBSCRIBE` only on cluster connections; the keys already carry hash tags for a cluster.
//!
//! A lost subscription (Redis restarted, the connection cut) is opened again with backoff;
//! once it is back, the subscribers of its channels are told to read the history
//! ([`Outbound::Resync`](crate::hub::Outbound)), so what was published meanwhile is delivered
//! or reported as a gap.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use cascade_core::shutdown::ShutdownSignal;
use cascade_core::tasks::Supervisor;
use futures_util::StreamExt;

use crate::Realtime;
use crate::store::{Store, parse_envelope, shard_of};

/// Opening a subscription must finish within this.
const SUBSCRIBE_DEADLINE: Duration = Duration::from_secs(2);
/// A subscription silent for this long is checked with a `PING` (a half-open connection
/// never ends its stream by itself).
const SILENCE: Duration = Duration::from_secs(5);

/// Starts one listener per shard (nothing without Redis).
pub fn start(rt: &Realtime, tasks: &mut Supervisor) {
    if !matches!(rt.inner.store, Store::Redis(_)) {
        return;
    }
    for shard in 0..rt.inner.listening.len() {
        let rt = rt.clone();
        tasks.spawn("realtime-shard", move |stop| listen(rt, shard, stop));
    }
}

async fn listen(rt: Realtime, shard: usize, mut stop: ShutdownSignal) {
    let Store::Redis(store) = &rt.inner.store else {
        return;
    };
    let flag = &rt.inner.listening[shard];
    let name = store.shard_channel(shard);
    let shards = rt.inner.listening.len();
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
            tracing::info!(
                shard,
                "realtime: shard subscription restored; resyncing its channels"
            );
            rt.inner
                .hub
                .resync(|channel| shard_of(channel, shards) == shard);
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
                        if let Some(delivery) = parse_envelope(message.get_payload_bytes()) {
                            rt.inner.hub.deliver(Arc::new(delivery));
                        }
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
