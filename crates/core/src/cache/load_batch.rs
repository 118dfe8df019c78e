//! Batched loads: reads of different keys of one namespace that must load at the same time
//! share one loader call (for the catalog, one PostgreSQL statement, `WHERE id = ANY($1)`),
//! and the lease holders among them share one shared-tier round trip for their fills.
//!
//! Each namespace has a [`LoadGroup`]. A read that must load joins its group: while fewer
//! than [`MAX_IN_FLIGHT`] batches run, it leads a batch at once (its key and whatever is
//! queued); otherwise it queues, and the next batch to finish loading hands the lead to the
//! first caller queued, which takes up to [`MAX_BATCH`] keys. A caller alone therefore waits
//! for nobody; under load, batches grow with the load (DataLoader's idea, without a timer).
//!
//! The leader loads, hands the lead on (the next batch loads while this one fills) and
//! answers every caller of its batch at once; then a task of its own fills the shared tier
//! for every lease holder of the batch in one round trip, each fill still conditional on its
//! own lease token (an invalidation during the load refuses that key's fill and no other), and
//! installs each value whose fill was taken in the in-process tier, under its caller's epoch
//! and tags (`read.rs`: an invalidation since that read began refuses the install). No caller
//! waits for the fill's round trip, and a stalled Redis does not hold answers already loaded.
//! A batch so changes none of a single read's guarantees: one load per cold key among the
//! reads that load after their lease (a speculative load, `lease.rs`, loads without a lookup),
//! no stale set (the token, the epoch), read-after-write. Until its fill is
//! taken a key is still leased: a read of it then polls for the value, as for any loader's.
//!
//! A failed loader call is the leader's error; every other caller of the batch then loads its
//! key alone, so it gets its own answer or error. A leader whose future is dropped (its client
//! went away) hands the lead on; the callers of its batch load alone.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedMutexGuard, oneshot};

use super::Cache;
use super::codec::{decode, encode};
use super::lead_queue::{self, HandOff, Waiting, pass_lead, take_batch};
use super::lease::Settling;
use super::read::ReadCtx;
use super::read::{Fill, InstallKey};
use super::redis_tier::{Fresh, TOMB};
use super::stats::{NsCounters, add};
use super::tier::{FreshStore, LeasedStore};

/// Most keys one loader call is given.
pub(super) const MAX_BATCH: usize = 64;

/// Batches of one namespace loading at once: two let PostgreSQL run one batch while the
/// server parses the previous one's rows and fills them, on a 2-core machine.
pub(super) const MAX_IN_FLIGHT: usize = 2;

/// How a read loads its key: [`Alone`] (`get_or_load*`) or [`Batched`]
/// (`get_or_load_body_batched`). With `fill`, the loaded value is also stored in the shared
/// tier under the read's lease: before the read returns ([`Alone`]), or by its batch's fill
/// task once the batch's callers were answered ([`Batched`]).
pub(super) trait KeyLoader<E> {
    /// The read's shared-tier lookups join the concurrent ones (`lookup_batch.rs`).
    const BATCHED: bool = false;

    async fn load(self, read: &ReadCtx<'_>, fill: Option<LeaseFill>) -> Result<Loaded, E>;
}

/// A loader of one key: `None` is "not found".
pub(super) struct Alone<F>(pub F);

impl<E, F, Fut> KeyLoader<E> for Alone<F>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<Option<Vec<u8>>, E>>,
{
    async fn load(self, read: &ReadCtx<'_>, fill: Option<LeaseFill>) -> Result<Loaded, E> {
        let (loaded, delta) = read.timed_load(self.0).await?;
        Ok(read.fill_one(loaded.map(Arc::from), delta, fill).await)
    }
}

/// A loader of many keys of one namespace: given keys, it returns the values found, each
/// with its key; a key not among them is not found. Every caller of a namespace passes the
/// same one: a batch runs its leader's.
pub(super) struct Batched<B>(pub B);

impl<E, B: LoadMany<E>> KeyLoader<E> for Batched<B> {
    const BATCHED: bool = true;

    async fn load(self, read: &ReadCtx<'_>, fill: Option<LeaseFill>) -> Result<Loaded, E> {
        read.load_batched(fill, self.0).await
    }
}

/// A loader of many keys (see [`Batched`]): a closure `|keys| async { ... }`.
pub(super) trait LoadMany<E> {
    fn call(self, keys: Vec<String>) -> impl Future<Output = Result<Vec<(String, Vec<u8>)>, E>>;
}

impl<E, B, Fut> LoadMany<E> for B
where
    B: FnOnce(Vec<String>) -> Fut,
    Fut: Future<Output = Result<Vec<(String, Vec<u8>)>, E>>,
{
    fn call(self, keys: Vec<String>) -> impl Future<Output = Result<Vec<(String, Vec<u8>)>, E>> {
        self(keys)
    }
}

/// What the lease holder's fill needs beside the value: its lease and the TTLs it may store.
#[derive(Clone)]
pub(super) struct LeaseFill {
    /// The key as the shared tier names it.
    pub full: String,
    /// What the stored value carries (the PostgreSQL tier stores them with it).
    pub tags: Vec<String>,
    pub token: String,
    pub lease_ttl: Duration,
    /// The TTL of a found value and of a cached not-found.
    pub ttl_found: Duration,
    pub ttl_missing: Duration,
    /// When the lookup that granted the lease was sent: the value's time counts from then.
    pub asked: Instant,
    /// What installing the value in process needs once its batch's fill was taken (a batch
    /// answers its callers before it fills, see the module's doc); `None` for a read alone,
    /// which installs its own value.
    pub install: Option<Arc<Installer>>,
}

/// A lease holder's read, owned: a batch's fill task installs its value in process.
pub(super) struct Installer {
    pub namespace: String,
    /// The caller's tags (`LeaseFill::tags` adds the namespace's).
    pub tags: Vec<String>,
    /// The invalidation epoch when the read began.
    pub started_epoch: u64,
    pub counters: Arc<NsCounters>,
}

/// What became of a lease holder's fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FillOutcome {
    /// No fill was asked for (no lease).
    NotAsked,
    Stored,
    /// The lease was gone: an invalidation came during the load (or it expired).
    Refused,
    /// The shared tier failed; already counted against the breaker.
    Failed,
    /// A batch's fill, done after its callers were answered: its task installs the value in
    /// process if the fill is taken, or counts the stale set it refused.
    Deferred,
}

/// One key's load, as its caller receives it.
pub(super) struct Loaded {
    pub value: Option<Arc<[u8]>>,
    /// How long the load took (for early refresh).
    pub delta: Duration,
    /// With a fill: the time the value has left, counted from the lease's grant.
    pub left: Duration,
    pub fill: FillOutcome,
}

impl LeaseFill {
    /// The stored form of `value` and the TTL to store it with; also what is left of that TTL
    /// now, counted from `asked`.
    pub fn encode(&self, value: Option<&[u8]>, delta: Duration) -> (Vec<u8>, Duration, Duration) {
        let ttl = if value.is_some() {
            self.ttl_found
        } else {
            self.ttl_missing
        };
        let left = ttl.saturating_sub(self.asked.elapsed());
        (encode(value, left, delta), ttl, left)
    }
}

/// The load groups of every namespace loaded through a batch so far.
#[derive(Default)]
pub(super) struct LoadGroups {
    groups: RwLock<HashMap<String, Arc<LoadGroup>>>,
}

impl LoadGroups {
    fn get(&self, namespace: &str) -> Arc<LoadGroup> {
        if let Some(group) = self
            .groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(namespace)
        {
            return group.clone();
        }
        let mut groups = self.groups.write().unwrap_or_else(|p| p.into_inner());
        groups.entry(namespace.to_string()).or_default().clone()
    }
}

/// Callers waiting to load, and how many batches are loading.
#[derive(Default)]
pub(super) struct LoadGroup {
    state: Mutex<GroupState>,
}

#[derive(Default)]
struct GroupState {
    queue: VecDeque<Queued>,
    /// Batches leading now (loading, or handed the lead and about to). Not below
    /// [`MAX_IN_FLIGHT`] while anyone is queued.
    running: usize,
}

/// A caller's key in a batch.
struct Item {
    key: String,
    fill: Option<LeaseFill>,
}

/// A queued caller, told the lead or its batch's load (`None` if it failed).
type Queued = lead_queue::Queued<Item, Option<Loaded>>;
type Turn = lead_queue::Turn<Item, Option<Loaded>>;

impl LoadGroup {
    fn lock(&self) -> MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl HandOff<Item, Option<Loaded>> for LoadGroup {
    /// Puts `requeue` back at the head of the queue, then passes the lead to the first queued
    /// caller still waiting, with up to [`MAX_BATCH`] keys; or gives the lead up.
    fn hand_off(&self, requeue: Vec<Queued>) {
        let mut state = self.lock();
        if !pass_lead(&mut state.queue, requeue, MAX_BATCH) {
            state.running = state.running.saturating_sub(1);
        }
    }
}

/// How a caller joins its group.
enum Start {
    /// Lead a batch now: the caller's own item and the callers queued.
    Lead(Item, Vec<Queued>),
    /// Queued: wait for a turn; with what to fill, should it have to load alone.
    Queued(oneshot::Receiver<Turn>, Option<LeaseFill>),
}

/// Held while leading: dropped (the load done, or the leader's future dropped), it hands the
/// lead on.
struct Lead<'a>(&'a LoadGroup);

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        self.0.hand_off(Vec::new());
    }
}

impl ReadCtx<'_> {
    /// Loads this read's key in a batch with the concurrent loads of its namespace (see the
    /// module's doc); with `fill`, the value is then stored in the shared tier under the lease
    /// by the batch's fill task (its load says [`FillOutcome::Deferred`]).
    /// `load_many` is given keys and returns the values found, each with its key; a key not
    /// among them is not found.
    pub(super) async fn load_batched<E, B: LoadMany<E>>(
        &self,
        fill: Option<LeaseFill>,
        load_many: B,
    ) -> Result<Loaded, E> {
        let group = self.cache.inner.load_groups.get(self.namespace);
        let item = Item {
            key: self.key.to_string(),
            fill,
        };
        let start = {
            let mut state = group.lock();
            if state.running < MAX_IN_FLIGHT {
                state.running += 1;
                Start::Lead(item, take_batch(&mut state.queue, MAX_BATCH - 1))
            } else {
                // Kept to load alone, should the batch fail or its leader go away.
                let fill = item.fill.clone();
                let (reply, turn) = oneshot::channel();
                state.queue.push_back(Queued { item, reply });
                Start::Queued(turn, fill)
            }
        };
        let (own, rest) = match start {
            Start::Lead(own, rest) => (own, rest),
            Start::Queued(turn, fill) => {
                let mut waiting = Waiting {
                    group: &*group,
                    turn,
                };
                match (&mut waiting.turn).await {
                    Ok(Turn::Done(Some(loaded))) => return Ok(loaded),
                    Ok(Turn::Lead(own, rest)) => (own, rest),
                    // The batch failed or its leader went away: load alone.
                    Ok(Turn::Done(None)) | Err(_) => {
                        drop(waiting);
                        return self.load_alone(fill, load_many).await;
                    }
                }
            }
        };
        self.lead(&group, own, rest, load_many).await
    }

    /// Loads this read's key alone (and fills it, holding the lease): a caller whose batch
    /// failed, so that it gets its own answer, or whose leader went away.
    async fn load_alone<E, B: LoadMany<E>>(
        &self,
        fill: Option<LeaseFill>,
        load_many: B,
    ) -> Result<Loaded, E> {
        let started = Instant::now();
        let found = load_many.call(vec![self.key.to_string()]).await;
        let delta = started.elapsed();
        self.count_loads(1, delta);
        let value = found?
            .into_iter()
            .find(|(key, _)| key == self.key)
            .map(|(_, value)| Arc::from(value));
        Ok(self.fill_one(value, delta, fill).await)
    }

    /// `value`, loaded in `delta`, stored in the shared tier under `fill`'s lease if given.
    pub(super) async fn fill_one(
        &self,
        value: Option<Arc<[u8]>>,
        delta: Duration,
        fill: Option<LeaseFill>,
    ) -> Loaded {
        let mut loaded = Loaded {
            value,
            delta,
            left: Duration::ZERO,
            fill: FillOutcome::NotAsked,
        };
        let (Some(fill), Some(shared)) = (fill, self.cache.inner.shared.as_ref()) else {
            return loaded;
        };
        let (bytes, ttl, left) = fill.encode(loaded.value.as_deref(), delta);
        loaded.left = left;
        let stored = shared
            .store(
                &fill.full,
                Some((&fill.token, fill.lease_ttl)),
                &bytes,
                ttl,
                &fill.tags,
            )
            .await;
        loaded.fill = match stored {
            Ok(true) => FillOutcome::Stored,
            Ok(false) => FillOutcome::Refused,
            Err(err) => {
                self.cache.shared_failed(&self.counters, &err);
                FillOutcome::Failed
            }
        };
        loaded
    }

    /// The leader's work: one loader call for `own` and `rest`, the lead handed on, each
    /// caller told its value, then one fill round for the lease holders in a task of its own.
    async fn lead<E, B: LoadMany<E>>(
        &self,
        group: &LoadGroup,
        own: Item,
        rest: Vec<Queued>,
        load_many: B,
    ) -> Result<Loaded, E> {
        let lead = Lead(group);
        let mut keys: Vec<String> = Vec::with_capacity(1 + rest.len());
        keys.push(own.key.clone());
        for queued in &rest {
            if !keys.contains(&queued.item.key) {
                keys.push(queued.item.key.clone());
            }
        }
        let n = keys.len() as u64;
        let started = Instant::now();
        let found = load_many.call(keys).await;
        let delta = started.elapsed();
        // The next batch loads while this one fills.
        drop(lead);
        self.count_loads(n, delta);
        let found: HashMap<String, Arc<[u8]>> = match found {
            Ok(found) => found
                .into_iter()
                .map(|(key, value)| (key, Arc::from(value)))
                .collect(),
            Err(err) => {
                for queued in rest {
                    let _ = queued.reply.send(Turn::Done(None));
                }
                return Err(err);
            }
        };
        let (items, replies): (Vec<Item>, Vec<Option<oneshot::Sender<Turn>>>) =
            std::iter::once((own, None))
                .chain(rest.into_iter().map(|q| (q.item, Some(q.reply))))
                .unzip();
        // Every caller is answered now; the lease holders' fills follow in a task of their
        // own, so no caller waits for the shared tier's round trip.
        let (loaded, fills) = prepare_fills(items, &found, delta);
        if !fills.is_empty() && self.cache.inner.shared.is_some() {
            tokio::spawn(fill_and_install(self.cache.clone(), fills));
        }
        let mut loaded = loaded.into_iter();
        let own = loaded.next();
        for (reply, loaded) in replies.into_iter().skip(1).zip(loaded) {
            if let Some(reply) = reply {
                let _ = reply.send(Turn::Done(Some(loaded)));
            }
        }
        Ok(own.unwrap_or(Loaded {
            value: None,
            delta,
            left: Duration::ZERO,
            fill: FillOutcome::NotAsked,
        }))
    }

    /// Counts `n` keys loaded in one loader call that took `delta` (each key's caller waited
    /// that long).
    pub(super) fn count_loads(&self, n: u64, delta: Duration) {
        add(&self.counters.loads, n);
        add(&self.counters.loader_calls, 1);
        add(
            &self.counters.load_micros,
            n.saturating_mul(delta.as_micros() as u64),
        );
    }
}

/// Speculative loads' stores (`lease.rs`) waiting for the next store script: those that
/// arrive while one is in flight share the next (group commit, one task at a time).
#[derive(Default)]
pub(super) struct DeferredFills {
    state: Mutex<DeferredState>,
}

#[derive(Default)]
struct DeferredState {
    queue: Vec<FreshFill>,
    /// A task is sending stores.
    sending: bool,
}

/// A speculative load's store, waiting: what to store and install, and the key's flight lock
/// and in-flight count, released once its store is answered.
struct FreshFill {
    lease: LeaseFill,
    window: Duration,
    value: Option<Arc<[u8]>>,
    bytes: Vec<u8>,
    ttl: Duration,
    delta: Duration,
    _held: (OwnedMutexGuard<()>, Settling),
}

impl Cache {
    /// Stores `value`, loaded in `delta` by a speculative load that began at `lease.asked`,
    /// in the shared tier after its caller was answered (no lease: it must run within
    /// `window` of that start, `redis_tier.rs`), and installs it in process once stored.
    /// Stores deferred while one script is in flight share the next one. `held` is let go
    /// once the store is answered.
    pub(super) fn defer_fresh(
        &self,
        lease: LeaseFill,
        window: Duration,
        value: Option<Arc<[u8]>>,
        delta: Duration,
        held: (OwnedMutexGuard<()>, Settling),
    ) {
        let (bytes, ttl, _) = lease.encode(value.as_deref(), delta);
        let fill = FreshFill {
            lease,
            window,
            value,
            bytes,
            ttl,
            delta,
            _held: held,
        };
        let deferred = &self.inner.deferred_fills;
        {
            let mut state = deferred.state.lock().unwrap_or_else(|p| p.into_inner());
            state.queue.push(fill);
            if state.sending {
                return;
            }
            state.sending = true;
        }
        // Should the task die (a panic, the runtime shutting down, even before its first
        // poll), the guard goes with it and the next deferred store starts another sender.
        let sending = Sending(Some(self.clone()));
        tokio::spawn(async move {
            let mut sending = sending;
            let Some(cache) = sending.0.clone() else {
                return;
            };
            let deferred = &cache.inner.deferred_fills;
            loop {
                let fills = {
                    let mut state = deferred.state.lock().unwrap_or_else(|p| p.into_inner());
                    if state.queue.is_empty() {
                        state.sending = false;
                        // Done: a task started from now on is the next sender, not reset.
                        sending.0 = None;
                        return;
                    }
                    let n = state.queue.len().min(MAX_BATCH);
                    state.queue.drain(..n).collect::<Vec<_>>()
                };
                store_fresh_and_install(&cache, fills).await;
            }
        });
    }
}

/// Held by the task sending deferred stores: dropped while it still holds its cache (the task
/// died), the stores waiting are dropped (nothing stored; their keys' flight locks go) and
/// the next deferred store starts another sender.
struct Sending(Option<Cache>);

impl Drop for Sending {
    fn drop(&mut self) {
        if let Some(cache) = &self.0 {
            let deferred = &cache.inner.deferred_fills;
            let dropped = {
                let mut state = deferred.state.lock().unwrap_or_else(|p| p.into_inner());
                state.sending = false;
                std::mem::take(&mut state.queue)
            };
            count_unfilled(&dropped);
        }
    }
}

/// Counts `fills`, which store nothing, against each one's namespace.
fn count_unfilled(fills: &[FreshFill]) {
    for f in fills {
        if let Some(install) = &f.lease.install {
            add(&install.counters.speculative_unfilled, 1);
        }
    }
}

/// Speculative loads' stores in one round (one script per bucket), then what each answer
/// means: a stored value is installed in process (unless an invalidation came after its read
/// began, as for any install); a value already there is kept in process as a hit would be;
/// a tombstone, a Redis whose tombstones are not complete yet (lately started, flushed or
/// evicting, or whose evictions cannot be read) or a store past its deadline stores nothing
/// (the next read loads after its lease), and all but the first pause speculation.
/// Nothing is sent while the shared tier is out (or speculation paused): the stores are
/// dropped, so that no read waits on their flight locks for Redis's timeouts.
async fn store_fresh_and_install(cache: &Cache, mut fills: Vec<FreshFill>) {
    let Some(shared) = cache.inner.shared.as_ref() else {
        return;
    };
    if !cache.inner.may_speculate() {
        count_unfilled(&fills);
        return;
    }
    let stores: Vec<FreshStore<'_>> = fills
        .iter_mut()
        .map(|f| FreshStore {
            full_key: &f.lease.full,
            tags: &f.lease.tags,
            bytes: std::mem::take(&mut f.bytes),
            // The value's TTL counts from the load's start, as its header's does.
            ttl: f.ttl.saturating_sub(f.lease.asked.elapsed()),
            began: f.lease.asked,
            window: f.window,
        })
        .collect();
    let stored = shared.store_fresh(&stores).await;
    drop(stores);
    let outcomes = match stored {
        Ok(outcomes) => outcomes,
        Err(err) => {
            // Counted once against the breaker, with the first store's namespace (they may
            // mix several).
            if let Some(install) = fills.iter().find_map(|f| f.lease.install.as_ref()) {
                cache.shared_failed(&install.counters, &err);
            }
            count_unfilled(&fills);
            return;
        }
    };
    cache.inner.shared_ok();
    for (f, outcome) in fills.into_iter().zip(outcomes) {
        // Answered so late that the script may have run more than half of `TOMB` after it
        // was sent: its deadline (Redis's clock, from a bound this script could not check
        // that closely) is no longer proof that it ran before any tombstone it should have
        // seen expired. A store taken is taken back; speculation pauses.
        let outcome = match outcome {
            Fresh::Stored if f.lease.asked.elapsed() >= TOMB / 2 => {
                let taken_back = shared.invalidate(std::slice::from_ref(&f.lease.full), &[]);
                if let Err(err) = taken_back.await {
                    tracing::warn!(key = f.lease.full, error = %err, "late speculative store not taken back");
                }
                Fresh::Late
            }
            outcome => outcome,
        };
        let Some(install) = &f.lease.install else {
            continue;
        };
        let counters = &install.counters;
        let key = InstallKey {
            full: &f.lease.full,
            namespace: &install.namespace,
            tags: &install.tags,
            counters,
        };
        counters.lean(!matches!(outcome, Fresh::Found(_)));
        match outcome {
            Fresh::Stored => {
                add(&counters.speculative_fills, 1);
                let left = f.ttl.saturating_sub(f.lease.asked.elapsed());
                let fill = Fill::fresh(f.value, left, f.delta);
                cache.install(&key, install.started_epoch, fill);
            }
            Fresh::Found(stored) => {
                add(&counters.speculative_found, 1);
                // Kept in process, as a hit would be (unless stored before an outage ended:
                // that one is revalidated by the next read).
                let distrust_before = cache.inner.distrust_before_ms.load(Ordering::SeqCst);
                if let Some(entry) = decode(&stored)
                    && entry.stored_at_ms >= distrust_before
                {
                    let value = entry.value.map(Arc::from);
                    cache.install(&key, install.started_epoch, Fill::stored(value, &entry));
                }
            }
            Fresh::Tombstoned => add(&counters.speculative_unfilled, 1),
            Fresh::Unsettled | Fresh::Blind => {
                if matches!(outcome, Fresh::Blind) && !BLIND_WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "Redis refuses INFO to scripts: whether it evicts tombstones cannot be \
                         known, so speculative loads store nothing (grant +info, or set \
                         CACHE_SPECULATIVE_LOADS=false)"
                    );
                }
                cache.inner.unsettled();
                add(&counters.speculative_unfilled, 1);
            }
            Fresh::Late | Fresh::ClockBehind => {
                // Stores this slow would leave every speculative load unfilled: reads load
                // after their lease for a while, and fill. (A clock found behind: its bound
                // was just taken afresh, but the pause costs little.)
                cache.inner.pause_speculation();
                add(&counters.speculative_unfilled, 1);
            }
        }
    }
}

/// Whether this process has logged that Redis refuses `INFO` to the store script
/// ([`Fresh::Blind`]): once is enough, every store is refused alike.
static BLIND_WARNED: AtomicBool = AtomicBool::new(false);

/// A lease holder's fill in a batch's fill task: what to store, and the value to install.
struct BatchFill {
    lease: LeaseFill,
    value: Option<Arc<[u8]>>,
    bytes: Vec<u8>,
    ttl: Duration,
    delta: Duration,
}

/// Each item's load, in order, and the fills of the lease holders among them (their loads
/// say [`FillOutcome::Deferred`]).
fn prepare_fills(
    items: Vec<Item>,
    found: &HashMap<String, Arc<[u8]>>,
    delta: Duration,
) -> (Vec<Loaded>, Vec<BatchFill>) {
    let mut loaded: Vec<Loaded> = Vec::with_capacity(items.len());
    let mut fills: Vec<BatchFill> = Vec::new();
    for item in items {
        let value = found.get(&item.key).cloned();
        let (mut left, mut fill) = (Duration::ZERO, FillOutcome::NotAsked);
        if let Some(lease) = item.fill {
            let (bytes, ttl, value_left) = lease.encode(value.as_deref(), delta);
            (left, fill) = (value_left, FillOutcome::Deferred);
            fills.push(BatchFill {
                lease,
                value: value.clone(),
                bytes,
                ttl,
                delta,
            });
        }
        loaded.push(Loaded {
            value,
            delta,
            left,
            fill,
        });
    }
    (loaded, fills)
}

/// A batch's fill task: stores the lease holders' values in the shared tier in one round,
/// each still conditional on its own lease, then installs in process each value whose fill
/// was taken (unless an invalidation came after its read began, as for any install).
async fn fill_and_install(cache: Cache, mut fills: Vec<BatchFill>) {
    let Some(shared) = cache.inner.shared.as_ref() else {
        return;
    };
    let stores: Vec<LeasedStore<'_>> = fills
        .iter_mut()
        .map(|f| LeasedStore {
            full_key: &f.lease.full,
            tags: &f.lease.tags,
            token: &f.lease.token,
            lease_ttl: f.lease.lease_ttl,
            bytes: std::mem::take(&mut f.bytes),
            ttl: f.ttl,
        })
        .collect();
    let stored = shared.store_leased(&stores).await;
    drop(stores);
    let stored = match stored {
        Ok(stored) => stored,
        Err(err) => {
            // Counted once, against the first fill's namespace (a batch's fills are of one
            // namespace).
            if let Some(install) = fills.iter().find_map(|f| f.lease.install.as_ref()) {
                cache.shared_failed(&install.counters, &err);
            }
            return;
        }
    };
    for (f, stored) in fills.into_iter().zip(stored) {
        let Some(install) = &f.lease.install else {
            continue;
        };
        if !stored {
            add(&install.counters.stale_sets_refused, 1);
            continue;
        }
        let key = InstallKey {
            full: &f.lease.full,
            namespace: &install.namespace,
            tags: &install.tags,
            counters: &install.counters,
        };
        // What the value has left now, counted from its lease's lookup (as in the shared tier).
        let left = f.ttl.saturating_sub(f.lease.asked.elapsed());
        let fill = Fill::fresh(f.value, left, f.delta);
        cache.install(&key, install.started_epoch, fill);
    }
}
