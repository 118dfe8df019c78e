//! Reading the invalidation log (`log.rs`): the watcher every instance with the Redis tier
//! runs, and what it does with the undelivered rows it finds.

use std::collections::HashSet;
use std::sync::Weak;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};

use super::breaker::BreakerState;
use super::bus::{self, Payloads, Transport};
use super::log::{BATCH, CHANNEL, InvalidationLog};
use super::{Cache, Inner};
use crate::db::DbError;

/// How often the peers' silence is looked at (in memory, nothing is sent).
const SILENCE_CHECK: Duration = Duration::from_millis(100);
/// A peer unheard for longer than this stops being a reason to look: it was looked for when
/// it went silent.
const FORGET_PEER: Duration = Duration::from_secs(600);
/// How often an instance prunes the log (every instance does; a second prune finds nothing).
const PRUNE_EVERY: Duration = Duration::from_secs(60);

impl Cache {
    /// Reads the undelivered rows (`all`), or only those this instance has not seen yet (a
    /// notification: the others were delivered or remembered when they were seen, and a
    /// writer kept from Redis for long must not make every instance read its whole backlog
    /// on each write), and applies them (see `log.rs`'s doc). Returns whether the batch
    /// was full: more rows may wait.
    async fn consult(&self, log: &InvalidationLog, all: bool) -> Result<bool, DbError> {
        let except: Vec<i64> = if all {
            Vec::new()
        } else {
            log.seen().iter().copied().collect()
        };
        let entries = log.undelivered(&except).await?;
        if entries.is_empty() {
            if all {
                log.seen().clear();
            }
            return Ok(false);
        }
        let full = entries.len() as i64 >= BATCH;
        let (mut keys, mut tags) = (HashSet::new(), HashSet::new());
        let (mut new_keys, mut new_tags) = (HashSet::new(), HashSet::new());
        {
            let mut seen = log.seen();
            if all && !full {
                // What is not listed any more was delivered: forget it.
                let listed: HashSet<i64> = entries.iter().map(|e| e.id).collect();
                seen.retain(|id| listed.contains(id));
            }
            for entry in &entries {
                if seen.insert(entry.id) {
                    new_keys.extend(entry.keys.iter().cloned());
                    new_tags.extend(entry.tags.iter().cloned());
                }
                keys.extend(entry.keys.iter().cloned());
                tags.extend(entry.tags.iter().cloned());
            }
        }
        if !new_keys.is_empty() || !new_tags.is_empty() {
            let (new_keys, new_tags): (Vec<String>, Vec<String>) = (
                new_keys.into_iter().collect(),
                new_tags.into_iter().collect(),
            );
            self.forget(&new_keys, &new_tags, &[]);
        }
        let ids: Vec<i64> = entries.iter().map(|e| e.id).collect();
        let keys: Vec<String> = keys.into_iter().collect();
        let tags: Vec<String> = tags.into_iter().collect();
        if self.deliver_logged(keys, tags, &ids).await {
            log.mark_delivered(&ids).await?;
        }
        Ok(full)
    }

    /// Delivers logged invalidations to Redis and announces them: true when both were done.
    /// When the breaker keeps this instance off Redis, or the delivery fails, they are
    /// remembered instead: replayed (and their rows marked) before Redis is read again.
    async fn deliver_logged(&self, keys: Vec<String>, tags: Vec<String>, ids: &[i64]) -> bool {
        let Some(shared) = self.inner.shared.as_ref() else {
            return false;
        };
        let keep = |cache: &Cache, keys: &[String], tags: &[String]| {
            cache.remember(|p| {
                p.record(keys, tags);
                p.logged.extend(ids.iter().copied());
            });
        };
        if self.inner.breaker.state() != BreakerState::Closed || self.unresponsive() {
            keep(self, &keys, &tags);
            return false;
        }
        if let Err(err) = shared.invalidate(&keys, &tags).await {
            tracing::debug!(error = %err, "logged invalidations not delivered yet");
            keep(self, &keys, &tags);
            self.inner.note_outage();
            self.inner.breaker.trip();
            return false;
        }
        // Again, after Redis's delete: a local reader may have read the old value in between.
        self.forget(&keys, &tags, &[]);
        match &self.inner.bus {
            Some(bus) => bus.announce(keys, tags).await,
            None => true,
        }
    }

    /// Reads and applies the log until a batch is not full (or a few batches were); batches
    /// after the first read only rows not seen yet (the first one's rows are seen now).
    async fn consult_all(&self, log: &InvalidationLog, mut all: bool) {
        for _ in 0..16 {
            match self.consult(log, all).await {
                Ok(true) => all = false,
                Ok(false) => return,
                Err(err) => {
                    tracing::warn!(error = %err, "cache invalidation log unreadable");
                    return;
                }
            }
        }
    }
}

/// What woke the watcher.
enum Wake {
    Subscribe,
    Message(Option<Vec<u8>>),
    Doubt,
    Poll,
    SilenceCheck,
}

/// Listens for, polls and applies the log until the engine is dropped (see `log.rs`'s doc).
pub(super) async fn run(engine: Weak<Inner>) {
    let Some((transport, prefix, poll, doubt)) = engine.upgrade().and_then(|inner| {
        let log = inner.log.get()?;
        Some((
            Transport::Postgres(log.db.clone()),
            log.prefix.clone(),
            log.poll,
            log.doubt.clone(),
        ))
    }) else {
        return;
    };
    let mut stream: Option<Payloads> = None;
    let mut backoff = Duration::from_millis(100);
    let retry = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(retry);
    let mut polls = tokio::time::interval_at(tokio::time::Instant::now() + poll, poll);
    polls.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut silence = tokio::time::interval(SILENCE_CHECK);
    silence.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut silent: HashSet<String> = HashSet::new();
    let mut last_prune: Option<tokio::time::Instant> = None;
    loop {
        let wake = tokio::select! {
            () = &mut retry, if stream.is_none() => Wake::Subscribe,
            message = next_payload(&mut stream) => Wake::Message(message),
            () = doubt.notified() => Wake::Doubt,
            _ = polls.tick() => Wake::Poll,
            _ = silence.tick() => Wake::SilenceCheck,
        };
        let Some(inner) = engine.upgrade() else {
            return;
        };
        let Some(log) = inner.log.get() else {
            return;
        };
        let cache = Cache {
            inner: inner.clone(),
        };
        match wake {
            Wake::Subscribe => {
                let subscribed =
                    tokio::time::timeout(bus::SUBSCRIBE_DEADLINE, transport.subscribe(CHANNEL))
                        .await
                        .unwrap_or_else(|_| Err("LISTEN timed out".to_string()));
                match subscribed {
                    Ok(payloads) => {
                        stream = Some(payloads);
                        backoff = Duration::from_millis(100);
                        // Listening again: what was written meanwhile was not heard.
                        cache.consult_all(log, true).await;
                    }
                    Err(err) => {
                        // The poll goes on meanwhile.
                        tracing::debug!(error = %err, "cache invalidation log: cannot LISTEN yet");
                        retry.as_mut().reset(tokio::time::Instant::now() + backoff);
                        backoff = (backoff * 2).min(poll);
                    }
                }
            }
            Wake::Message(None) => {
                tracing::warn!("cache invalidation log: LISTEN connection lost");
                stream = None;
                retry.as_mut().reset(tokio::time::Instant::now());
            }
            Wake::Message(Some(payload)) => {
                // A burst of notifications is one reading of the log.
                let mut ours = payload == prefix.as_bytes();
                while let Some(Some(more)) = stream.as_mut().and_then(|s| s.next().now_or_never()) {
                    ours |= more == prefix.as_bytes();
                }
                if ours {
                    cache.consult_all(log, false).await;
                }
            }
            Wake::Doubt => cache.consult_all(log, true).await,
            Wake::Poll => {
                cache.consult_all(log, true).await;
                if last_prune.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
                    last_prune = Some(tokio::time::Instant::now());
                    match log.prune().await {
                        Ok(0) => {}
                        Ok(removed) => tracing::debug!(removed, "invalidation log pruned"),
                        Err(err) => tracing::debug!(error = %err, "invalidation log not pruned"),
                    }
                }
            }
            Wake::SilenceCheck => {
                let Some(bus) = inner.bus.as_ref() else {
                    return;
                };
                let now_silent = bus.silent_peers(FORGET_PEER);
                let newly = now_silent.iter().any(|peer| !silent.contains(peer));
                silent = now_silent;
                if newly {
                    // A peer that stopped being heard may have logged what it could not send.
                    cache.consult_all(log, true).await;
                }
            }
        }
    }
}

/// The next notification, or never while there is no `LISTEN` connection.
async fn next_payload(stream: &mut Option<Payloads>) -> Option<Vec<u8>> {
    match stream {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}
