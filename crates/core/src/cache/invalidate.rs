//! Writes and invalidations, and their replay after a shared-tier outage.
//!
//! An invalidation first bumps the engine's epoch and marks what it removes (`k:` key, `t:`
//! tag, `n:` namespace), then removes: a load that started before can tell it was overtaken
//! and refuses to install what it read (see `install` in `read.rs`). Invalidations the shared
//! tier cannot take are remembered ([`Pending`]) and replayed before the shared tier is read
//! again, so a Redis that was only paused never serves a value invalidated meanwhile; and
//! written to the invalidation log (`log.rs`) before the caller returns, so that the other
//! instances, which may still be reading that Redis, apply them too.
//!
//! Whatever one call names (keys of several namespaces, tags, whole namespaces: an
//! [`Invalidations`]) is removed in one round, and concurrent callers share rounds
//! (`batcher.rs`): one shared-tier script and one bus message for all of them.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use moka::sync::Cache as Moka;
use serde::Serialize;

use super::batcher::Round;
use super::breaker::Permit;
use super::codec::{encode, now_ms};
use super::marks::Mark;
use super::stats::{NsCounters, add};
use super::tier::{SharedTier, TierError};
use super::{Cache, Inner, MemEntry, namespace_tag, tag_namespace};
use crate::shutdown::ShutdownSignal;

/// How many times an invalidation is sent to the shared tier before it is only remembered.
/// Only a call that failed at once (a connection found broken, replaced for the next try) is
/// tried again: one that timed out spent the whole `REDIS_TIMEOUT`, and Redis is not
/// answering, so trying again would only multiply what the write waits.
const DELIVERY_ATTEMPTS: u32 = 3;

/// Entries stored up to this long after an outage ended are revalidated too: the storing and
/// the reading instance's clocks may differ slightly.
const CLOCK_SLACK_MS: u64 = 1000;

/// What one call makes stale, removed together by [`Cache::invalidate_batch`]: keys of any
/// namespaces, tags and whole namespaces. A write that makes several kinds of entries stale
/// names them all here, and pays one shared-tier round and one bus round for all of them.
#[derive(Debug, Default, Clone)]
pub struct Invalidations {
    keys: Vec<(String, String)>,
    tags: Vec<String>,
    namespaces: Vec<String>,
}

impl Invalidations {
    pub fn new() -> Self {
        Self::default()
    }

    /// Keys of `namespace`.
    pub fn keys(&mut self, namespace: &str, keys: &[&str]) -> &mut Self {
        self.keys
            .extend(keys.iter().map(|k| (namespace.to_string(), k.to_string())));
        self
    }

    /// Every value carrying any of `tags`.
    pub fn tags(&mut self, tags: impl IntoIterator<Item = String>) -> &mut Self {
        self.tags.extend(tags);
        self
    }

    /// Every value of `namespace`.
    pub fn namespace(&mut self, namespace: &str) -> &mut Self {
        self.namespaces.push(namespace.to_string());
        self
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.tags.is_empty() && self.namespaces.is_empty()
    }
}

/// What became of a round's announcement on the bus ([`Cache::tell_instances`]).
pub(super) enum Told {
    Announced,
    /// Redis does not answer us: remembered, announced by the replay.
    Remembered,
    /// The publish failed: nobody heard it.
    Lost,
}

/// Invalidations not yet delivered to Redis.
#[derive(Default)]
pub(super) struct Pending {
    keys: HashSet<String>,
    tags: HashSet<String>,
    /// Rows of the invalidation log (`log.rs`) these keys and tags cover: the replay that
    /// delivers them marks the rows delivered.
    pub logged: HashSet<i64>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.tags.is_empty() && self.logged.is_empty()
    }

    pub fn record(&mut self, keys: &[String], tags: &[String]) {
        self.keys.extend(keys.iter().cloned());
        self.tags.extend(tags.iter().cloned());
    }
}

impl Inner {
    /// The shared tier answered. The first answer after an outage starts distrusting entries
    /// stored before now: invalidations other instances could not deliver meanwhile are not
    /// known here (a paused Redis comes back with its old data).
    pub(crate) fn shared_ok(&self) {
        self.breaker.success();
        if self.outage.swap(false, Ordering::SeqCst) {
            self.distrust_before_ms
                .store(now_ms() + CLOCK_SLACK_MS, Ordering::SeqCst);
            tracing::info!(
                "shared cache tier back: entries stored before now are revalidated on read"
            );
            // Others may have logged what they could not deliver while we were away.
            self.doubt();
        }
    }

    /// Whether a read may load speculatively now (`lease.rs`): the shared tier is not in an
    /// outage for this instance, and came back from the last one at least its distrust window
    /// and the tombstones' life ago (an invalidation another instance could not deliver
    /// meanwhile left no tombstone; it reaches Redis through the replay or the log).
    /// And Redis did not say lately that its tombstones are not yet complete
    /// ([`unsettled`](Self::unsettled)).
    pub(crate) fn may_speculate(&self) -> bool {
        let now = now_ms();
        !self.outage.load(Ordering::Relaxed)
            && now
                >= self.distrust_before_ms.load(Ordering::Relaxed)
                    + super::redis_tier::TOMB.as_millis() as u64
            && now >= self.unsettled_until_ms.load(Ordering::Relaxed)
    }

    /// A speculative store found Redis's tombstones not yet complete (a Redis started or
    /// flushed less than `TOMB` ago, or one that evicted keys lately, or whose evictions
    /// cannot be read): reads load after their lease until they are, since no speculative
    /// store could be taken meanwhile.
    pub(crate) fn unsettled(&self) {
        self.pause_speculation();
    }

    /// No speculative load for the tombstones' life (`TOMB`): Redis's tombstones are not
    /// complete yet, or speculative stores ran too late (or found its clock behind) to be
    /// taken.
    pub(crate) fn pause_speculation(&self) {
        let until = now_ms() + super::redis_tier::TOMB.as_millis() as u64;
        self.unsettled_until_ms.fetch_max(until, Ordering::Relaxed);
    }

    /// The shared tier (or the bus on it) failed.
    pub(crate) fn note_outage(&self) {
        self.outage.store(true, Ordering::SeqCst);
    }

    /// The marks of `keys` and `tags`, and `extra`.
    fn marks_of(&self, keys: &[String], tags: &[String], extra: &[Mark]) -> Vec<Mark> {
        let marks = &self.invalidated;
        keys.iter()
            .map(|k| marks.key(k))
            .chain(tags.iter().map(|t| marks.tag(t)))
            .chain(extra.iter().copied())
            .collect()
    }

    fn bump(&self, marks: &[Mark]) {
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        self.invalidated.record(marks, epoch);
    }

    /// Drops everything from the in-process tier (the bus was lost and is back).
    pub(crate) fn flush_memory(&self) {
        self.bump(&[]);
        if let Some(memory) = &self.memory {
            self.tag_index.invalidate_all(memory);
            self.front.changed();
        }
    }

    /// Applies an invalidation heard on the bus from another instance.
    pub(crate) fn apply_invalidation(&self, keys: &[String], tags: &[String]) {
        let marks = self.marks_of(keys, tags, &[]);
        self.bump(&marks);
        if let Some(memory) = &self.memory {
            for key in keys {
                memory.invalidate(key);
            }
            self.drop_tags(memory, tags);
            self.front.changed();
        }
    }

    /// Removes the in-process entries that carry `tags`: a namespace's (`ns:<namespace>`)
    /// all at once, by moving its generation on (an entry of an older one is never served),
    /// the others' through the tag index. After the marks: see [`Cache::install`].
    pub(super) fn drop_tags(&self, memory: &Moka<String, MemEntry>, tags: &[String]) {
        for tag in tags {
            // No counters: nothing of the namespace was ever installed here.
            if let Some(namespace) = tag_namespace(tag)
                && let Some(counters) = self.stats.existing(namespace)
            {
                counters.generation.fetch_add(1, Ordering::SeqCst);
            }
        }
        self.tag_index.invalidate(memory, tags);
    }
}

impl Cache {
    /// Stores `value` unconditionally (a write-through), replacing any lease in progress.
    pub async fn set<T: Serialize>(
        &self,
        namespace: &str,
        key: &str,
        value: &T,
        tags: &[String],
    ) -> Result<(), serde_json::Error> {
        let bytes = serde_json::to_vec(value)?;
        let full = self.full_key(namespace, key);
        let mut all_tags: Vec<String> = tags.to_vec();
        all_tags.push(namespace_tag(namespace));
        let ttl = self.ttl(namespace);
        let counters = self.inner.stats.ns(namespace);
        // A set also overtakes loads in flight: they must not install what they read before.
        self.bump(&[self.inner.invalidated.key(&full)]);
        if let Some(memory) = &self.inner.memory {
            self.inner.tag_index.insert(
                memory,
                full.clone(),
                MemEntry {
                    bytes: Some(bytes.clone().into()),
                    etag: std::sync::Arc::default(),
                    generation: counters.generation.load(Ordering::SeqCst),
                    ttl,
                    expires_at_ms: now_ms() + ttl.as_millis() as u64,
                    delta_ms: 0,
                },
                tags,
            );
            self.inner.front.put(&full);
        }
        let mut delivered = true;
        match self.shared_tier().await {
            Some(shared) => {
                if let Err(err) = shared
                    .store(
                        &full,
                        None,
                        &encode(Some(&bytes), ttl, Duration::ZERO),
                        ttl,
                        &all_tags,
                    )
                    .await
                {
                    self.shared_failed(&counters, &err);
                    self.remember(|p| p.record(std::slice::from_ref(&full), &[]));
                    self.inner.breaker.trip();
                    delivered = false;
                }
            }
            // The breaker keeps Redis away: its old value is deleted by the replay.
            None if self.inner.shared.is_some() => {
                self.remember(|p| p.record(std::slice::from_ref(&full), &[]));
                delivered = false;
            }
            None => {}
        }
        self.announce_round(
            Round {
                keys: vec![full],
                ..Round::default()
            },
            delivered,
        )
        .await;
        Ok(())
    }

    /// Removes one key (see [`invalidate_batch`](Self::invalidate_batch)).
    pub async fn invalidate(&self, namespace: &str, key: &str) {
        self.invalidate_keys(namespace, &[key]).await;
    }

    /// [`invalidate`](Self::invalidate) for several keys of one namespace: one shared-tier
    /// call and one bus message for all of them.
    pub async fn invalidate_keys(&self, namespace: &str, keys: &[&str]) {
        self.invalidate_batch(Invalidations::new().keys(namespace, keys))
            .await;
    }

    /// Removes every value carrying `tag`.
    pub async fn invalidate_tag(&self, tag: &str) {
        self.invalidate_tags(&[tag.to_string()]).await;
    }

    /// Removes every value carrying any of `tags`: one shared-tier call and one bus message
    /// for all of them, however many (a write that affects many cached answers).
    pub async fn invalidate_tags(&self, tags: &[String]) {
        self.invalidate_batch(Invalidations::new().tags(tags.iter().cloned()))
            .await;
    }

    /// Removes every value of a namespace.
    pub async fn invalidate_namespace(&self, namespace: &str) {
        self.invalidate_batch(Invalidations::new().namespace(namespace))
            .await;
    }

    /// Removes everything `what` names. When this returns, no reader gets an old value from
    /// this engine's tiers or another instance's in-process tier, and no load that started
    /// before can install one; if the shared tier cannot be reached, what it holds is
    /// remembered and deleted before it is read again. One shared-tier round (one script on
    /// Redis) and one bus message, shared with concurrent callers (`batcher.rs`).
    pub async fn invalidate_batch(&self, what: &Invalidations) {
        if what.is_empty() {
            return;
        }
        let mut round = Round::default();
        for (namespace, key) in &what.keys {
            add(&self.inner.stats.ns(namespace).invalidations, 1);
            round.keys.push(self.full_key(namespace, key));
        }
        for namespace in &what.namespaces {
            add(&self.inner.stats.ns(namespace).invalidations, 1);
            round.tags.push(namespace_tag(namespace));
        }
        round.tags.extend(what.tags.iter().cloned());
        round.label = match (what.keys.first(), what.namespaces.first()) {
            (Some((namespace, _)), _) | (None, Some(namespace)) => namespace.clone(),
            (None, None) => "tags".to_string(),
        };
        let namespaces: Vec<Mark> = what
            .namespaces
            .iter()
            .map(|n| self.inner.invalidated.namespace(n))
            .collect();
        self.forget(&round.keys, &round.tags, &namespaces);
        if self.inner.shared.is_none() && self.inner.bus.is_none() {
            return;
        }
        self.commit(round).await;
    }

    /// Delivery to the shared tier and the second removal of a round; whether the shared
    /// tier took it (true without one).
    pub(super) async fn deliver_and_forget(&self, round: &Round) -> bool {
        if self.inner.shared.is_none() {
            return true;
        }
        let delivered = self.deliver(&round.label, &round.keys, &round.tags).await;
        // Again, after the shared tier's delete: a reader that started after the first bump
        // may have read the old value from the shared tier before the delete; the second bump
        // refuses its install, the second removal drops it if it got in.
        self.forget(&round.keys, &round.tags, &[]);
        delivered
    }

    /// The announcement of a round on the bus; what was not delivered (`delivered` false) or
    /// cannot be announced goes to the invalidation log first (`log.rs`), before the round's
    /// callers return.
    pub(super) async fn announce_round(&self, round: Round, delivered: bool) {
        if !delivered {
            // Logged before the bus wait: the others learn of it at once.
            self.log_undelivered(&round.keys, &round.tags, true).await;
            self.tell_instances(round.keys, round.tags).await;
            return;
        }
        let logged = self.inner.log.get().is_some();
        let (keys, tags) = if logged {
            (round.keys.clone(), round.tags.clone())
        } else {
            (Vec::new(), Vec::new())
        };
        match self.tell_instances(round.keys, round.tags).await {
            Told::Announced => {}
            Told::Remembered => self.log_undelivered(&keys, &tags, true).await,
            Told::Lost => self.log_undelivered(&keys, &tags, false).await,
        }
    }

    /// Removes `keys` and values carrying `tags` from this instance's in-process tier, and
    /// marks them (and `extra` marks) invalidated: one epoch bump for all.
    pub(super) fn forget(&self, keys: &[String], tags: &[String], extra: &[Mark]) {
        let marks = self.inner.marks_of(keys, tags, extra);
        self.bump(&marks);
        if let Some(memory) = &self.inner.memory {
            for key in keys {
                memory.invalidate(key);
            }
            if !tags.is_empty() {
                self.inner.drop_tags(memory, tags);
            }
            self.inner.front.changed();
        }
    }

    /// Removes expired rows of the PostgreSQL tier every `interval` until shutdown (a no-op
    /// loop for the other tiers, which expire entries themselves).
    pub async fn run_cleanup(self, interval: Duration, mut stop: ShutdownSignal) {
        let Some(SharedTier::Postgres(pg)) = &self.inner.shared else {
            return;
        };
        loop {
            tokio::select! {
                _ = stop.recv() => return,
                _ = tokio::time::sleep(interval) => match pg.cleanup().await {
                    Ok(0) => {}
                    Ok(removed) => tracing::debug!(removed, "expired cache rows removed"),
                    Err(err) => tracing::warn!(error = %err, "cache cleanup failed"),
                },
            }
        }
    }

    fn bump(&self, marks: &[Mark]) {
        self.inner.bump(marks);
    }

    /// Whether `full` (of `namespace`, carrying `tags`) was invalidated since `epoch`: the
    /// check a finishing load makes before (and after) it installs what it read.
    /// Whether this instance knows of an invalidation of `full`, of its namespace or of one
    /// of `all_tags` (the caller's tags and the namespace's) less than `within` ago.
    pub(super) fn invalidated_within(
        &self,
        within: Duration,
        full: &str,
        namespace: &str,
        all_tags: &[String],
    ) -> bool {
        let marks = &self.inner.invalidated;
        let own = [marks.key(full), marks.namespace(namespace)];
        marks.any_within(
            within,
            own.into_iter().chain(all_tags.iter().map(|t| marks.tag(t))),
        )
    }

    pub(super) fn invalidated_since(
        &self,
        epoch: u64,
        full: &str,
        namespace: &str,
        tags: &[String],
    ) -> bool {
        if self.inner.epoch.load(Ordering::SeqCst) == epoch {
            return false;
        }
        let marks = &self.inner.invalidated;
        let own = [
            marks.key(full),
            marks.namespace(namespace),
            marks.tag(&namespace_tag(namespace)),
        ];
        marks.any_after(
            epoch,
            own.into_iter().chain(tags.iter().map(|t| marks.tag(t))),
        )
    }

    pub(super) fn remember(&self, f: impl FnOnce(&mut Pending)) {
        let mut pending = self.inner.pending.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut pending);
    }

    fn has_pending(&self) -> bool {
        let pending = self.inner.pending.lock().unwrap_or_else(|p| p.into_inner());
        !pending.is_empty()
    }

    pub(super) fn shared_failed(&self, counters: &NsCounters, err: &TierError) {
        add(&counters.shared_errors, 1);
        self.inner.outage.store(true, Ordering::SeqCst);
        if self.inner.breaker.failure() {
            tracing::warn!(error = %err, "Redis cache tier failing: breaker open, reading through to the source");
        }
    }

    /// Whether the shared tier has stopped answering this instance: a call failed since the
    /// last success, and none of our own heartbeats came back for longer than any instance
    /// trusts its in-process tier without hearing the bus. Not a single failed call: a
    /// connection found broken once fails one command while Redis is fine.
    pub(super) fn unresponsive(&self) -> bool {
        self.inner.outage.load(Ordering::SeqCst)
            && self.inner.bus.as_ref().is_some_and(|bus| bus.unheard())
    }

    /// Tells every instance's in-process tier (`bus.rs`), unless the shared tier has stopped
    /// answering: then nothing can carry the message now, and every instance cut off as we
    /// are has stopped trusting its tier already. The invalidation is remembered instead;
    /// the replay announces it on the bus once Redis answers.
    pub(super) async fn tell_instances(&self, keys: Vec<String>, tags: Vec<String>) -> Told {
        let Some(bus) = &self.inner.bus else {
            return Told::Announced;
        };
        if self.unresponsive() {
            self.remember(|p| {
                p.keys.extend(keys);
                p.tags.extend(tags);
            });
            return Told::Remembered;
        }
        if bus.broadcast(keys, tags).await {
            Told::Announced
        } else {
            Told::Lost
        }
    }

    /// Sends an invalidation to Redis, or remembers it (and keeps Redis out of reads) when
    /// Redis cannot take it now.
    ///
    /// What it costs a write when Redis does not answer is bounded: the first invalidation
    /// of an outage waits one `REDIS_TIMEOUT` here (no retry after a timeout); once the
    /// outage is established ([`unresponsive`](Self::unresponsive)) later ones are only
    /// remembered, at once: they are delivered (and announced on the bus) by the replay,
    /// before this instance reads Redis again. A round is always tried while Redis is not
    /// established as unresponsive, even right after another round's call timed out: only
    /// remembering it would let the bus announce it while Redis still holds the old values.
    async fn deliver(&self, namespace: &str, keys: &[String], tags: &[String]) -> bool {
        let Some(shared) = self.inner.shared.as_ref() else {
            return true;
        };
        if self.unresponsive() {
            self.remember(|p| p.record(keys, tags));
            self.inner.breaker.trip();
            return false;
        }
        // An invalidation matters more than a read: it goes to the shared tier even while the
        // breaker keeps reads away (other instances may be reading it), and a call that
        // failed at once is tried again, before it is only remembered.
        let mut last = None;
        for attempt in 0..DELIVERY_ATTEMPTS {
            match shared.invalidate(keys, tags).await {
                Ok(()) => return true,
                Err(err) => {
                    tracing::debug!(attempt, error = %err, "invalidation not delivered yet");
                    let timed_out = err.timed_out();
                    last = Some(err);
                    if timed_out {
                        break;
                    }
                }
            }
        }
        self.remember(|p| p.record(keys, tags));
        if let Some(err) = last {
            let counters = self.inner.stats.ns(namespace);
            self.shared_failed(&counters, &err);
        }
        // Until it is delivered, the shared tier may hold the old value: stop reading it.
        self.inner.breaker.trip();
        false
    }

    /// The Redis tier if it may be used now. Undelivered invalidations are replayed first;
    /// if that fails, Redis stays out of the way.
    pub(super) async fn shared_tier(&self) -> Option<&SharedTier> {
        let shared = self.inner.shared.as_ref()?;
        match self.inner.breaker.permit() {
            Permit::Skip => return None,
            Permit::Call | Permit::Probe => {}
        }
        if self.has_pending() && !self.replay_pending(shared).await {
            self.inner.breaker.abandon_probe();
            return None;
        }
        Some(shared)
    }

    /// Replays undelivered invalidations if there are any and the breaker lets a call through.
    pub(crate) async fn replay_if_pending(&self) {
        if self.has_pending() {
            let _ = self.shared_tier().await;
        }
    }

    async fn replay_pending(&self, shared: &SharedTier) -> bool {
        let _one = self.inner.replay.lock().await;
        let (keys, tags, logged) = {
            let mut p = self.inner.pending.lock().unwrap_or_else(|p| p.into_inner());
            (
                std::mem::take(&mut p.keys),
                std::mem::take(&mut p.tags),
                std::mem::take(&mut p.logged),
            )
        };
        if keys.is_empty() && tags.is_empty() {
            // Their keys and tags went with an earlier replay (the rows were written after).
            self.mark_logged_delivered(logged.into_iter().collect());
            return true;
        }
        let keys: Vec<String> = keys.into_iter().collect();
        let tags: Vec<String> = tags.into_iter().collect();
        // One call: a failure means Redis is still away, and each further call would cost its
        // caller (a reader that is the breaker's probe) another deadline.
        if let Err(err) = shared.invalidate(&keys, &tags).await {
            tracing::debug!(error = %err, "undelivered invalidations still not delivered");
            self.remember(|p| {
                p.keys.extend(keys);
                p.tags.extend(tags);
                p.logged.extend(logged);
            });
            return false;
        }
        // Instances that missed them while the bus was down flushed their tiers when it came
        // back; this reaches the ones whose bus never dropped. Logged rows count as delivered
        // once announced (else another instance's reading of the log announces them).
        let announced = match &self.inner.bus {
            Some(bus) => bus.announce(keys, tags).await,
            None => true,
        };
        if announced {
            self.mark_logged_delivered(logged.into_iter().collect());
        }
        tracing::info!("Redis cache tier back: undelivered invalidations replayed");
        self.inner.shared_ok();
        true
    }
}
