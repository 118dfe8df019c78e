//! Batched lookups: the shared-tier lookups of batched reads (`get_or_load_body_batched`)
//! that arrive while one is in flight share the next lookup script (`GET_OR_LEASE_MANY`,
//! `redis_tier.rs`), as their loads share a loader call and their fills one script
//! (`load_batch.rs`).
//!
//! Group commit, without a timer: a lookup that finds none of its group in flight is sent at
//! once, alone (a caller alone waits for nobody); lookups arriving meanwhile queue, and when
//! the lookup in flight is answered, its sender hands the lead to the first queued caller,
//! which sends up to [`MAX_BATCH`] queued lookups in one script. One group on one server; on
//! a Redis Cluster one per bucket, since a script's keys must share a slot.
//!
//! The script does for each key, in order, exactly what the single lookup does (the value, or
//! the lease granted to the key's own token and its tag sets entered, or `W`), so a batch
//! changes none of a lookup's guarantees: one lease per key (a key asked twice in one batch is
//! leased to the first, `W` to the second), each fill conditional on its own token.
//!
//! A lookup that timed out fails the callers queued behind it too, at once, so a stalled
//! Redis costs a queued caller the batch in flight's timeout, not one per batch ahead of it.
//! A queued caller otherwise waits for the batch in flight and then its own (two round
//! trips; more when over 64 lookups queue in one group). A caller whose batch's sender went
//! away (its future dropped) sends its lookup alone, with the same token: if the lost batch
//! had already leased its key, the script answers a lease again (`L`) for the lease it holds.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;

use super::lead_queue::{self, HandOff, Waiting, pass_lead};
use super::redis_tier::{Lookup, RedisTier};
use crate::redis::RedisError;

/// Most keys one lookup script is given.
const MAX_BATCH: usize = 64;

/// One key's lookup, as a batch sends it.
pub(crate) struct LookupKey {
    pub full_key: String,
    /// The tag sets its lease enters it in.
    pub tags: Vec<String>,
    /// Its lease's token, if it gets one.
    pub token: String,
    pub lease_ttl: Duration,
    /// The longest TTL its fill may store.
    pub value_ttl: Duration,
}

/// The lookup groups: one, or one per bucket on a cluster.
pub(super) struct LookupGroups {
    groups: Vec<LookupGroup>,
}

impl LookupGroups {
    pub fn new(groups: usize) -> Self {
        LookupGroups {
            groups: (0..groups.max(1)).map(|_| LookupGroup::default()).collect(),
        }
    }

    /// The group of a key's bucket (0 on one server).
    pub fn group(&self, bucket: usize) -> &LookupGroup {
        &self.groups[bucket % self.groups.len()]
    }
}

/// Lookups waiting for a turn, and whether one is in flight.
#[derive(Default)]
pub(super) struct LookupGroup {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Queued>,
    /// A caller leads: its lookup is in flight, or it was handed the lead and is about to send.
    leading: bool,
}

/// A queued caller: its key is shared with it, who sends it alone should its batch's sender
/// go away. Told the lead, or its key's answer.
type Queued = lead_queue::Queued<Arc<LookupKey>, Result<Lookup, RedisError>>;
type Turn = lead_queue::Turn<Arc<LookupKey>, Result<Lookup, RedisError>>;

impl LookupGroup {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives the lead up and fails every queued caller with `err` (a lookup that timed out:
    /// the next would most likely wait as long).
    fn fail_queue(&self, err: &RedisError) {
        let queued = {
            let mut state = self.lock();
            state.leading = false;
            std::mem::take(&mut state.queue)
        };
        for queued in queued {
            let _ = queued.reply.send(Turn::Done(Err(err.clone())));
        }
    }
}

impl HandOff<Arc<LookupKey>, Result<Lookup, RedisError>> for LookupGroup {
    /// Puts `requeue` back at the head of the queue, then passes the lead to the first queued
    /// caller still waiting, with up to [`MAX_BATCH`] keys; or gives the lead up.
    fn hand_off(&self, requeue: Vec<Queued>) {
        let mut state = self.lock();
        if !pass_lead(&mut state.queue, requeue, MAX_BATCH) {
            state.leading = false;
        }
    }
}

/// Held while leading: dropped before its batch was answered (the leader's future dropped),
/// it hands the lead on; [`Lead::finish`] hands it on once the batch was answered.
struct Lead<'a>(Option<&'a LookupGroup>);

impl Lead<'_> {
    /// The batch was answered: hands the lead on, or fails the queue after a timeout.
    fn finish<T>(mut self, result: &Result<T, RedisError>) {
        let Some(group) = self.0.take() else {
            return;
        };
        match result {
            Err(err) if is_timeout(err) => group.fail_queue(err),
            _ => group.hand_off(Vec::new()),
        }
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        if let Some(group) = self.0.take() {
            group.hand_off(Vec::new());
        }
    }
}

fn is_timeout(err: &RedisError) -> bool {
    match err {
        RedisError::Timeout(_) => true,
        RedisError::Command(err) => err.is_timeout(),
        RedisError::Config(_) => false,
    }
}

impl RedisTier {
    /// `key`'s lookup in a batch with the concurrent lookups of `group` (see the module's doc).
    pub(super) async fn lookup_batched(
        &self,
        group: &LookupGroup,
        key: LookupKey,
    ) -> Result<Lookup, RedisError> {
        let key = Arc::new(key);
        let turn = {
            let mut state = group.lock();
            if state.leading {
                let (reply, turn) = oneshot::channel();
                state.queue.push_back(Queued {
                    item: key.clone(),
                    reply,
                });
                Some(turn)
            } else {
                state.leading = true;
                None
            }
        };
        let (own, rest) = match turn {
            // Nothing in flight: alone, at once.
            None => (key, Vec::new()),
            Some(turn) => {
                let mut waiting = Waiting { group, turn };
                match (&mut waiting.turn).await {
                    Ok(Turn::Done(result)) => return result,
                    Ok(Turn::Lead(own, rest)) => (own, rest),
                    // The sender of the batch that took it went away: alone.
                    Err(_) => {
                        drop(waiting);
                        return self.lookup_one(&key).await;
                    }
                }
            }
        };
        self.lead(group, own, rest).await
    }

    /// Sends `own` and `rest` in one script, hands the lead on, tells each caller its answer.
    async fn lead(
        &self,
        group: &LookupGroup,
        own: Arc<LookupKey>,
        rest: Vec<Queued>,
    ) -> Result<Lookup, RedisError> {
        let lead = Lead(Some(group));
        let found = if rest.is_empty() {
            self.lookup_one(&own).await.map(|found| vec![found])
        } else {
            let keys: Vec<&LookupKey> = std::iter::once(&*own)
                .chain(rest.iter().map(|q| &*q.item))
                .collect();
            self.lookup_many(&keys).await
        };
        lead.finish(&found);
        match found {
            Ok(found) if found.len() == 1 + rest.len() => {
                let mut found = found.into_iter();
                let own = found.next();
                for (queued, lookup) in rest.into_iter().zip(found) {
                    let _ = queued.reply.send(Turn::Done(Ok(lookup)));
                }
                own.ok_or_else(|| short_reply(0))
            }
            Ok(found) => {
                let err = short_reply(found.len());
                for queued in rest {
                    let _ = queued.reply.send(Turn::Done(Err(err.clone())));
                }
                Err(err)
            }
            Err(err) => {
                for queued in rest {
                    let _ = queued.reply.send(Turn::Done(Err(err.clone())));
                }
                Err(err)
            }
        }
    }
}

/// A lookup script that answered for fewer keys than it was given (never, short of a bug).
fn short_reply(answers: usize) -> RedisError {
    RedisError::Command(redis::RedisError::from((
        redis::ErrorKind::Parse,
        "lookup script answered for the wrong number of keys",
        answers.to_string(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::redis_tier::Fresh;
    use crate::cache::tier::FreshStore;
    use crate::redis::Redis;
    use std::time::Instant;

    fn key(name: &str, token: &str) -> LookupKey {
        LookupKey {
            full_key: format!("assets:{name}"),
            tags: vec!["ns:assets".to_string(), format!("row:{name}")],
            token: token.to_string(),
            lease_ttl: Duration::from_secs(5),
            value_ttl: Duration::from_secs(60),
        }
    }

    /// A lease holder's fill of `key` with `token`: whether it was taken.
    async fn fill(tier: &RedisTier, key: &LookupKey, token: &str) -> bool {
        let lease = Some((token, key.lease_ttl));
        tier.store(&key.full_key, lease, b"Vfilled", key.value_ttl, &[])
            .await
            .unwrap()
    }

    async fn indexed(redis: &Redis, tag: &str, member: &str) -> bool {
        let score: Option<f64> = redis
            .query(redis::cmd("ZSCORE").arg(format!("t:tag:{tag}")).arg(member))
            .await
            .unwrap();
        score.is_some()
    }

    #[tokio::test]
    async fn one_script_answers_each_key_as_its_own_lookup_would() {
        let server = cascade_testkit::RedisServer::start().await;
        let redis = Redis::for_test(server.url());
        let tier = RedisTier::new(redis.clone(), "t:".to_string());
        // `hit` holds a value; `held` is leased to another loader.
        let hit = key("hit", "unused");
        let stored = b"Vstored value".to_vec();
        let ttl = Duration::from_secs(60);
        assert!(
            tier.store(&hit.full_key, None, &stored, ttl, &hit.tags)
                .await
                .unwrap()
        );
        let other = key("held", "other-loader");
        let held = tier.lookup_one(&other).await.unwrap();
        assert!(matches!(held, Lookup::Lease), "{held:?}");

        let fresh = key("fresh", "mine");
        let again = key("fresh", "a-second-caller");
        let asked = key("held", "mine-too");
        let found = tier
            .lookup_many(&[&hit, &fresh, &asked, &again])
            .await
            .unwrap();
        let found: Vec<String> = found
            .iter()
            .map(|f| match f {
                Lookup::Hit(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                Lookup::Lease => "L".to_string(),
                Lookup::Wait => "W".to_string(),
            })
            .collect();
        assert_eq!(found, ["Vstored value", "L", "W", "W"]);

        // `fresh` is leased to its first asker's token, and entered in its tag sets; the
        // other loader's lease on `held` is untouched.
        assert!(indexed(&redis, "ns:assets", "t:assets:fresh").await);
        assert!(indexed(&redis, "row:fresh", "t:assets:fresh").await);
        // A caller whose batch's answer was lost asks again alone, with its token: the lease
        // it already holds is `L`, alone or in a batch; another token still waits.
        let alone = tier.lookup_one(&fresh).await.unwrap();
        assert!(matches!(alone, Lookup::Lease), "{alone:?}");
        let found = tier.lookup_many(&[&fresh, &again]).await.unwrap();
        assert!(
            matches!(found.as_slice(), [Lookup::Lease, Lookup::Wait]),
            "{found:?}"
        );
        assert!(!fill(&tier, &again, &again.token).await);
        assert!(!fill(&tier, &asked, &asked.token).await);
        assert!(fill(&tier, &fresh, &fresh.token).await);
        assert!(fill(&tier, &other, &other.token).await);
    }

    /// `key`'s speculative store, of a load that began `ago` (a window of 500 ms).
    fn fresh_of(key: &LookupKey, ago: Duration) -> FreshStore<'_> {
        FreshStore {
            full_key: &key.full_key,
            tags: &key.tags,
            bytes: format!("V{}", key.full_key).into_bytes(),
            ttl: key.value_ttl,
            began: Instant::now() - ago,
            window: Duration::from_millis(500),
        }
    }

    /// What became of each of `keys`' speculative stores, sent in one script; as a letter:
    /// `S` stored, `l` tombstoned, `u` unsettled, `d` late, `F` a value found.
    async fn fresh(tier: &RedisTier, keys: &[&LookupKey]) -> String {
        let stores: Vec<FreshStore<'_>> =
            keys.iter().map(|k| fresh_of(k, Duration::ZERO)).collect();
        letters(tier.store_fresh(&stores).await.unwrap())
    }

    fn letters(found: Vec<Fresh>) -> String {
        found
            .iter()
            .map(|f| match f {
                Fresh::Stored => 'S',
                Fresh::Tombstoned => 'l',
                Fresh::Unsettled => 'u',
                Fresh::Blind => 'i',
                Fresh::Late => 'd',
                Fresh::ClockBehind => 'c',
                Fresh::Found(_) => 'F',
            })
            .collect()
    }

    #[tokio::test]
    async fn a_speculative_store_is_taken_only_where_no_recent_invalidation_left_a_tombstone() {
        use super::super::redis_tier::TOMB;
        let server = cascade_testkit::RedisServer::start().await;
        let redis = Redis::for_test(server.url());
        let tier = RedisTier::new(redis.clone(), "t:".to_string());
        let settle = TOMB + Duration::from_millis(100);
        // A Redis that never took a speculative store or an invalidation may have lost its
        // tombstones (restarted, flushed): nothing is stored until `TOMB` after the first.
        assert_eq!(fresh(&tier, &[&key("first", "a")]).await, "u");
        assert_eq!(
            fresh(&tier, &[&key("first-b", "a"), &key("first-c", "a")]).await,
            "uu"
        );
        tokio::time::sleep(settle).await;
        let cold = key("cold", "a");
        assert_eq!(fresh(&tier, &[&cold]).await, "S");
        // Stored, and entered in its tag sets: a tag's invalidation deletes it.
        assert_eq!(
            tier.get(&cold.full_key, &[]).await.unwrap(),
            Some(b"Vassets:cold".to_vec())
        );
        assert!(indexed(&redis, "ns:assets", "t:assets:cold").await);
        assert!(indexed(&redis, "row:cold", "t:assets:cold").await);
        // A value already there is returned, not overwritten.
        assert_eq!(fresh(&tier, &[&cold]).await, "F");
        tier.invalidate(&[], &["row:cold".to_string()])
            .await
            .unwrap();
        assert_eq!(tier.get(&cold.full_key, &[]).await.unwrap(), None);

        // Invalidations of a key and of a tag: the next store of what they named is refused,
        // alone or in a script with others; other keys' stores are taken.
        tier.invalidate(&["assets:k".to_string()], &[])
            .await
            .unwrap();
        tier.invalidate(&[], &["row:t".to_string()]).await.unwrap();
        assert_eq!(fresh(&tier, &[&key("k", "a")]).await, "l");
        assert_eq!(fresh(&tier, &[&key("t", "a")]).await, "l");
        tier.invalidate(&["assets:k2".to_string()], &["row:t2".to_string()])
            .await
            .unwrap();
        assert_eq!(
            fresh(
                &tier,
                &[&key("k2", "a"), &key("fresh", "a"), &key("t2", "a")]
            )
            .await,
            "lSl"
        );
        // The key's own tombstone counts whatever tags it is stored with; an unconditional
        // store of a key leaves one too.
        tier.invalidate(&["assets:d".to_string()], &[])
            .await
            .unwrap();
        let mut untagged = key("d", "c");
        untagged.tags = vec!["ns:other".to_string()];
        assert_eq!(fresh(&tier, &[&untagged]).await, "l");
        let set = key("set", "a");
        assert!(
            tier.store(&set.full_key, None, b"Vset", set.value_ttl, &set.tags)
                .await
                .unwrap()
        );
        let _: () = redis
            .query(redis::cmd("DEL").arg("t:assets:set"))
            .await
            .unwrap();
        assert_eq!(fresh(&tier, &[&set]).await, "l");
        // A namespace's invalidation: no key of it is stored.
        tier.invalidate(&[], &["ns:assets".to_string()])
            .await
            .unwrap();
        assert_eq!(fresh(&tier, &[&key("n1", "a")]).await, "l");
        assert_eq!(
            fresh(&tier, &[&key("n2", "a"), &key("n3", "a")]).await,
            "ll"
        );

        // The tombstones last `TOMB`: then the same names are stored again.
        tokio::time::sleep(settle).await;
        assert_eq!(
            fresh(&tier, &[&key("k", "a"), &key("t", "a"), &key("n1", "a")]).await,
            "SSS"
        );

        // A store whose load began longer ago than its window is refused, in a script with
        // one that is on time.
        let (late, on_time) = (key("late", "a"), key("on-time", "a"));
        let stores = [
            fresh_of(&late, Duration::from_millis(600)),
            fresh_of(&on_time, Duration::from_millis(100)),
        ];
        assert_eq!(letters(tier.store_fresh(&stores).await.unwrap()), "dS");
        assert_eq!(tier.get(&late.full_key, &[]).await.unwrap(), None);

        // Redis's clock found behind the bound the deadlines were computed with (a step back,
        // a failover): nothing stored, the bound is forgotten, and the next store is taken
        // with a fresh one.
        tier.clock_ahead(2_000);
        let behind = key("behind", "a");
        assert_eq!(fresh(&tier, &[&behind]).await, "c");
        assert_eq!(tier.get(&behind.full_key, &[]).await.unwrap(), None);
        assert_eq!(fresh(&tier, &[&behind]).await, "S");

        // A flushed Redis (as a restarted one) lost its tombstones: unsettled again.
        let _: () = redis.query(&redis::cmd("FLUSHALL")).await.unwrap();
        assert_eq!(fresh(&tier, &[&key("after-flush", "a")]).await, "u");
        assert_eq!(
            fresh(&tier, &[&key("flush-b", "a"), &key("flush-c", "a")]).await,
            "uu"
        );
    }
}
