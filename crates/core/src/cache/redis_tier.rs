//! The Redis tier: values, leases and tag sets, each multi-step operation one atomic Lua script.
//!
//! Keys (under the configured prefix `P`, e.g. `cascade:`):
//! - `P{ns}:{key}` — the value, with a one-byte header (`V` value, `N` cached not-found);
//! - `Please:P{ns}:{key}` — the lease: which loader may fill the key right now;
//! - `Pgone:P{ns}:{key}` — the key's tombstone, for [`TOMB`] after an invalidation or an
//!   unconditional store of the key (a speculative store meanwhile is refused);
//! - `Ptomb:Ptag:{tag}` — a tag's tombstone, for [`TOMB`] after an invalidation of the tag;
//!   `Ptomb-since` — when this Redis first granted a lease, took a speculative store or an
//!   invalidation (its tombstones are complete from [`TOMB`] after that);
//!   `Pevicted` — this Redis's eviction state as the last store script saw it (`INFO`: its
//!   count of evicted keys, of commands processed and its run id; first taken with
//!   `Ptomb-since`), and `Pevicting`, set for [`TOMB`] whenever a store script finds that
//!   state moved (more evictions, or a counter reset, a restart or another server, after
//!   which evictions may have gone uncounted): an evicted key may have been a tombstone, so
//!   no speculative store is taken meanwhile;
//! - `Ptag:{tag}` — a sorted set of the value keys carrying the tag (namespaces are the tag
//!   `ns:{ns}`), each scored by when its value (or lease) expires, by Redis's clock;
//! - `Ptag-retired:{tag}` — the tag's sets taken out of service by an invalidation and not
//!   yet fully deleted (`Ptag-draining:{n}`, numbered by `Ptag-draining-seq`).
//!
//! The lease is what makes cache-aside safe ("Scaling Memcache at Facebook", NSDI 2013): a
//! miss hands out a token; invalidation deletes the value *and* the lease; a fill succeeds only
//! while its token is still the lease. A loader that read the old row before a write
//! therefore cannot install it after the write's invalidation. An invalidation also leaves
//! tombstones for [`TOMB`] (keys of their own: no lease, release or drain touches them): a
//! speculative load (`lease.rs`), which takes no lease, stores its row only where none is
//! found and only before its deadline, less than [`TOMB`] after its load began
//! ([`STORE_FRESH_MANY`]).
//!
//! A speculative miss costs one script, its store (per key a `GET`, an `EXISTS` of its
//! tombstone and a `SET`; per script a `TIME`, a `PTTL` of `tomb-since`, `INFO stats` and
//! `INFO server`, a `GET` and a `SET` of `evicted` and an `EXISTS` of `evicting`, and per tag
//! set an `EXISTS` of its tombstone and one `ZADD` for the stores of concurrent loads). Any other miss costs two: the lookup (reads or leases, one round trip; a namespace whose
//! lookups mostly hit sends a plain `GET` first instead, after one `ZSCORE` per tag set, all
//! pipelined) and the fill (four commands; the
//! lease holders of one batch of loads, `load_batch.rs`, fill in one script, after their
//! callers were answered, and the lookups of batched reads that arrive while one is in flight
//! share one script, `lookup_batch.rs`, which enters the keys it leases in each tag set with
//! one `ZADD`). The lease enters the key in its tag sets until the value would expire, and the
//! value's TTL counts from the lease's grant, so the fill has no tag set to touch.
//!
//! Tag sets stay as small as what they index: a member leaves its set once its value has
//! expired (each member a script adds trims up to [`TRIM`] expired members of its set, so
//! expired members cannot pile up faster than they are removed), and a set expires with its
//! longest-lived member. Anonymous reads of random ids no longer grow them without bound.
//!
//! A tag invalidation never holds Redis for long, whatever the tag's size (a namespace of
//! 200,000 keys): one short script deletes the keys named and *retires* each tag's set
//! (`RENAME` to a draining set, registered under the tag), so keys entered from then on go to
//! a fresh set, and deletes the first [`DRAIN_BATCH`] members of the draining sets (values and
//! leases together); what is left is deleted in batches of as many, one short script each.
//! An invalidation of a few keys and small tags (a write) is therefore one round trip. The
//! invalidation returns when every batch is done. A fill whose lease was
//! granted before the invalidation either lands before its key's batch (and is deleted by it)
//! or after (its lease is gone: refused). A draining set left behind by an interrupted
//! invalidation stays registered, and the next invalidation of the tag (the engine's replay)
//! finishes it.
//!
//! On a Redis Cluster every name above also carries its key's bucket hash tag right after
//! the prefix (`P{b}ns:key`, `Please:P{b}ns:key`, `P{b}tag:T`, …; `buckets.rs`), so each
//! script's keys share one slot; a tag's set is then one per bucket, and an invalidation by
//! tag or namespace runs its script once per bucket, concurrently. On one server (or with
//! Sentinel) the names and the cost are as above.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::{Cmd, Script};

use super::buckets::{BUCKETS, Buckets};
use super::lookup_batch::{LookupGroups, LookupKey};
use super::tier::{FreshStore, LeasedStore};
use crate::redis::{Redis, RedisError};

/// Most expired members one script removes from each tag set it enters a key into.
const TRIM: usize = 64;

/// The most tag sets (the namespace's included) a lookup's plain read first checks with one
/// `ZSCORE` each ([`RedisTier::get`]); a key with more goes straight to the lookup script.
const PROBE_TAGS: usize = 4;

/// Members of a draining tag set deleted per script: ~1 ms of Redis time each.
const DRAIN_BATCH: usize = 512;

/// How long an invalidation leaves a tombstone: a key's `Pgone:<value key>` (an
/// invalidation or an unconditional store of the key), a tag's `Ptomb:<tag set>` (an
/// invalidation of the tag or namespace). A speculative store that finds one of the key's is
/// refused ([`Fresh::Tombstoned`]). `Ptomb-since` was set when this Redis first granted a
/// lease, took a speculative store or an invalidation, with a TTL of [`SINCE_TTL`] (its age is
/// what its TTL lost): until it is [`TOMB`] old, tombstones may have been lost (a restart, a
/// flush, its own eviction) and no speculative store is taken. Tombstones are keys with a
/// TTL, and a Redis that evicts may drop one under memory pressure (`volatile-ttl` picks the
/// shortest-lived keys first, the random policies any, and even LRU or LFU may pick a
/// tombstone, which nothing reads after it is written): so no speculative store is taken
/// either until [`TOMB`] after a store script last saw Redis's eviction state move
/// (`Pevicted`, `Pevicting`; README, "Cache guarantees").
pub(crate) const TOMB: Duration = Duration::from_millis(1000);

/// The TTL `Ptomb-since` is set with: its age is this minus what it has left (`PTTL`, by
/// Redis's clock; no `GET`, no `TIME`). Ten years.
const SINCE_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// What a lookup found.
#[derive(Debug)]
pub(crate) enum Lookup {
    /// The stored bytes (with their header).
    Hit(Vec<u8>),
    /// Nobody is loading: this caller holds the lease and must load.
    Lease,
    /// Another loader holds the lease: wait for its value.
    Wait,
}

pub(crate) struct RedisTier {
    redis: Redis,
    prefix: String,
    /// On a Redis Cluster, the buckets whose hash tags follow the prefix; None on one server.
    buckets: Option<Buckets>,
    get_or_lease: Script,
    get_or_lease_many: Script,
    /// Concurrent lookups of batched reads, merged into [`GET_OR_LEASE_MANY`] scripts: one
    /// group on one server, one per bucket on a cluster (`lookup_batch.rs`).
    lookups: LookupGroups,
    try_lease: Script,
    release: Script,
    fill: Script,
    fill_many: Script,
    store_fresh_many: Script,
    /// Where Redis's clock stands against ours: the deadlines of speculative stores.
    clock: RedisClock,
    set: Script,
    invalidate: Script,
    drain: Script,
}

/// `eviction_state()`: this Redis's count of evicted keys, of commands processed and its run
/// id, as a store script reads them (`INFO stats`, `INFO server`), joined and apart; `nil`
/// where a script may not read them (an ACL without `+info`, a renamed command). Prepended to
/// the scripts before [`INDEX_TAGS`], and to [`scripts_read_info`]'s probe.
const EVICTION_STATE: &str = r"
local function eviction_state()
  local stats, server = redis.pcall('INFO', 'stats'), redis.pcall('INFO', 'server')
  if type(stats) ~= 'string' or type(server) ~= 'string' then return nil end
  local evicted = string.match(stats, '\nevicted_keys:(%d+)')
  local commands = string.match(stats, '\ntotal_commands_processed:(%d+)')
  local run = string.match(server, '\nrun_id:(%x+)')
  if not (evicted and commands and run) then return nil end
  return evicted .. ':' .. commands .. ':' .. run, evicted, commands, run
end
";

/// Whether `redis` lets a script read its eviction state ([`EVICTION_STATE`]), as the store
/// script of a speculative load does: where it may not, no such store is taken (whether a
/// tombstone was evicted cannot be known), and cold reads wait for a lookup and its lease.
/// `cascade check` reports it. An error is the probe's own (no `EVAL`, Redis down).
pub async fn scripts_read_info(redis: &Redis) -> Result<bool, RedisError> {
    let probe = format!("{EVICTION_STATE}if eviction_state() then return 1 end\nreturn 0\n");
    let readable: i64 = redis.query(redis::cmd("EVAL").arg(probe).arg(0)).await?;
    Ok(readable == 1)
}

/// Enters `KEYS[1]` in the tag sets `KEYS[3..]` until `ttl` ms from now by Redis's clock:
/// exactly (`exact`: the value expires then) or at least (`ZADD GT`, a lease: the key may hold
/// a value that lives longer). `index_set` does it for one set and any number of keys at once
/// (one `ZADD`; the many-key lookup enters every key it leases in one call per set). New
/// members trim up to [`TRIM`] expired ones each (a member whose expiry only moves adds
/// nothing to trim for), and each set lives as long as its longest-lived member. A set of the
/// former kind (a plain set, written before tag sets were sorted) is retired first, so the
/// next invalidation of its tag still deletes what it lists. Prepended to every script that
/// grants a lease or stores, after the prefix's key names ([`RedisTier::new`]: constants of
/// the script, so no call sends them).
///
/// `indexed_value` reads a value only if it is still a member of each of its tag sets (the
/// namespace's among them), and deletes it otherwise: a Redis at its `maxmemory` may evict a
/// tag set (a key of its own, with a TTL) and keep values it lists, which the next
/// invalidation of that tag or namespace would then miss. A value is entered in its sets
/// before it is stored (the lease's entry, or the store's own), its entries outlive it, and an
/// invalidation deletes the set with its values, so only an evicted set, a set being drained
/// after its invalidation (whose values are being deleted) or a retired plain set leaves a
/// value out of its set.
const INDEX_TAGS: &str = r"
local function retire(tag)
  local registry = RETIRED .. string.sub(tag, #TAG + 1)
  local dead = DRAINING .. redis.call('INCR', DRAINING_SEQ)
  redis.call('RENAME', tag, dead)
  redis.call('SADD', registry, dead)
  local ttl = redis.call('PTTL', dead)
  if ttl > 0 and redis.call('PTTL', registry) < ttl then redis.call('PEXPIRE', registry, ttl) end
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function index_set(tag, scored, ttl, now, exact)
  if redis.call('TYPE', tag).ok == 'set' then retire(tag) end
  local added
  if exact then
    added = redis.call('ZADD', tag, unpack(scored))
  else
    added = redis.call('ZADD', tag, 'GT', unpack(scored))
  end
  if added > 0 then
    local stale = redis.call('ZRANGEBYSCORE', tag, '-inf', '(' .. now, 'LIMIT', 0, TRIM * added)
    if #stale > 0 then redis.call('ZREM', tag, unpack(stale)) end
  end
  if redis.call('PTTL', tag) < ttl then redis.call('PEXPIRE', tag, ttl) end
end
local function enter(sets, order, tag, ttl, score, member)
  local set = sets[tag]
  if not set then
    set = {ttl = 0, keys = {}}
    sets[tag] = set
    order[#order + 1] = tag
  end
  if ttl > set.ttl then set.ttl = ttl end
  set.keys[#set.keys + 1] = score
  set.keys[#set.keys + 1] = member
end
local function index_tags(ttl, exact)
  local now = now_ms()
  for i = 3, #KEYS do index_set(KEYS[i], {now + ttl, KEYS[1]}, ttl, now, exact) end
  return now
end
local function settled()
  local left = redis.call('PTTL', SINCE)
  if left < 0 then
    redis.call('SET', SINCE, '1', 'PX', SINCE_MS)
    local state = eviction_state()
    if state then redis.call('SET', EVICTED, state) end
    return false
  end
  return SINCE_MS - left >= TOMB_MS
end
local function evicting()
  local state, evicted, commands, run = eviction_state()
  if not state then return nil end
  local e, c, r = string.match(redis.call('GET', EVICTED) or '', '^(%d+):(%d+):(%x+)$')
  redis.call('SET', EVICTED, state)
  if e ~= evicted or r ~= run or tonumber(commands) < tonumber(c) then
    redis.call('SET', EVICTING, '1', 'PX', TOMB_MS)
    return true
  end
  return redis.call('EXISTS', EVICTING) == 1
end
local function indexed(value_key, first, last)
  for t = first, last do
    local score = redis.pcall('ZSCORE', KEYS[t], value_key)
    if type(score) == 'table' then score = redis.call('SISMEMBER', KEYS[t], value_key) == 1 end
    if not score then return false end
  end
  return true
end
local function indexed_value(value_key, first, last)
  local v = redis.call('GET', value_key)
  if v and not indexed(value_key, first, last) then
    redis.call('DEL', value_key)
    return false
  end
  return v
end
local function tag_tombstoned(set)
  return redis.call('EXISTS', TOMBS .. set) == 1
end
local function key_tombstoned(value_key)
  return redis.call('EXISTS', GONE .. value_key) == 1
end
";

/// The whole lookup, one round trip: the value if there is one (and it is still in its tag
/// sets: `indexed_value`), else the lease (`L`) or
/// another loader's (`W`). A lease that is already this token's is `L` again: a caller whose batched lookup was sent for it but whose answer was
/// lost (the batch's sender dropped) asks alone with the same token. Granting the lease enters
/// the key in its tag sets until its value would expire if stored now (`ARGV[3]`, the longest
/// TTL its fill may use): a tag or namespace invalidation during the load deletes the lease
/// (the fill is refused), and the fill has no tag set to touch.
const GET_OR_LEASE: &str = r"
local v = indexed_value(KEYS[1], 3, #KEYS)
if v then return v end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  index_tags(tonumber(ARGV[3]), false)
  settled()
  return 'L'
end
if redis.call('GET', KEYS[2]) == ARGV[1] then return 'L' end
return 'W'
";

/// [`GET_OR_LEASE`] for several keys of one bucket, in order, one round trip: `KEYS` hold
/// each key's value key, lease key and tag sets in turn, `ARGV` a (token, lease TTL, value
/// TTL, number of tag sets) quadruple per key. Returns, per key, what [`GET_OR_LEASE`] would:
/// the value, `L` or `W`; a key asked twice is leased to the first and `W` to the second. The
/// keys leased are entered in their tag sets at the end, one `ZADD` per set: a batch of keys
/// of one namespace costs its set one call, not one per key.
const GET_OR_LEASE_MANY: &str = r"
local out = {}
local sets, order = {}, {}
local k = 1
for i = 1, #ARGV / 4 do
  local a = 4 * (i - 1)
  local value_key, lease_key, tags = KEYS[k], KEYS[k + 1], tonumber(ARGV[a + 4])
  local v = indexed_value(value_key, k + 2, k + 1 + tags)
  if v then
    out[i] = v
  elseif redis.call('SET', lease_key, ARGV[a + 1], 'NX', 'PX', ARGV[a + 2]) then
    local ttl = tonumber(ARGV[a + 3])
    for t = k + 2, k + 1 + tags do enter(sets, order, KEYS[t], ttl, ttl, value_key) end
    out[i] = 'L'
  elseif redis.call('GET', lease_key) == ARGV[a + 1] then
    out[i] = 'L'
  else
    out[i] = 'W'
  end
  k = k + 2 + tags
end
if #order > 0 then
  local now = now_ms()
  for _, tag in ipairs(order) do
    local set = sets[tag]
    for j = 1, #set.keys, 2 do set.keys[j] = now + set.keys[j] end
    index_set(tag, set.keys, set.ttl, now, false)
  end
  settled()
end
return out
";

/// A speculative load's store (`lease.rs`), for several keys of one bucket in one round trip:
/// `KEYS` hold each key's value key and tag sets in turn; `ARGV[1]` is the sender's bound of
/// Redis's clock when it sent the script, then a (deadline, TTL, value, number of tag sets)
/// quadruple per key. No lease: the store is safe because it runs before its deadline (by
/// Redis's clock: the load's start plus the speculation window, under half of [`TOMB`]), so
/// any invalidation since the load began is less than [`TOMB`] old and its tombstone is
/// still there to refuse it. A clock behind the sender's bound (stepped back, or another
/// server after a failover) proves the deadlines wrong: every key is then `c`. Per key,
/// returns the value already there (nothing stored), `S` stored (and entered in its tag sets
/// until it expires), `l` a tombstone of the key or one of its tag sets was found, `u` this
/// Redis's tombstones are not [`TOMB`] old yet, or a store script saw its eviction state move
/// less than [`TOMB`] ago (`evicting`), `i` that state could not be read (`INFO` refused),
/// `d` past its deadline, or `c`; then, last, Redis's clock (ms) when it ran.
const STORE_FRESH_MANY: &str = r"
local out = {}
local now = now_ms()
local ready, blind = settled(), false
if ready and #ARGV > 1 then
  local moved = evicting()
  if moved == nil then ready, blind = false, true else ready = not moved end
end
local behind = now < tonumber(ARGV[1] or 0)
local sets, order, tombstoned = {}, {}, {}
local k = 1
for i = 1, (#ARGV - 1) / 4 do
  local a = 1 + 4 * (i - 1)
  local value_key, tags = KEYS[k], tonumber(ARGV[a + 4])
  local v = indexed_value(value_key, k + 1, k + tags)
  if v then
    out[i] = v
  elseif behind then
    out[i] = 'c'
  elseif now > tonumber(ARGV[a + 1]) then
    out[i] = 'd'
  elseif not ready then
    out[i] = blind and 'i' or 'u'
  elseif key_tombstoned(value_key) then
    out[i] = 'l'
  else
    local clean = true
    for t = k + 1, k + tags do
      local set = KEYS[t]
      if tombstoned[set] == nil then tombstoned[set] = tag_tombstoned(set) end
      if tombstoned[set] then clean = false end
    end
    if clean then
      local ttl = tonumber(ARGV[a + 2])
      redis.call('SET', value_key, ARGV[a + 3], 'PX', ttl)
      for t = k + 1, k + tags do enter(sets, order, KEYS[t], ttl, now + ttl, value_key) end
      out[i] = 'S'
    else
      out[i] = 'l'
    end
  end
  k = k + 1 + tags
end
for _, tag in ipairs(order) do
  local set = sets[tag]
  index_set(tag, set.keys, set.ttl, now, false)
end
out[#out + 1] = tostring(now)
return out
";

/// Gives the lease `KEYS[2]` back if it is still the token `ARGV[1]` (its load failed: a
/// waiter may load at once instead of waiting the lease out). 1 if it was released.
const RELEASE: &str = r"
if redis.call('GET', KEYS[2]) == ARGV[1] then return redis.call('DEL', KEYS[2]) end
return 0
";

/// A lease on a key that still has a value: early refresh and revalidation. Indexed as in
/// [`GET_OR_LEASE`]. A value found out of one of its tag sets since the caller read it (the
/// set evicted meanwhile, so an invalidation may have missed it) is deleted first: indexing
/// the key again would make it look indexed to every later read until the refresh fills.
const TRY_LEASE: &str = r"
indexed_value(KEYS[1], 3, #KEYS)
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  index_tags(tonumber(ARGV[3]), false)
  return 1
end
return 0
";

/// The lease holder's store, only while `ARGV[1]` is still the lease (an invalidation deleted
/// it otherwise: no stale set). The value's TTL (`ARGV[2]`) counts from when the lease was
/// granted (`ARGV[4]`, the lease's TTL, minus what it has left), so it expires no later than
/// the lease's entry in its tag sets and nothing needs indexing: an invalidation by tag finds
/// the key for as long as it has a value. (A load that outlasts the TTL stores nothing.) One
/// millisecond less again: the tag entry's expiry was read from `TIME` and the lease's from
/// Redis's own clock of that command, which may be a millisecond apart.
const FILL: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
local left = tonumber(ARGV[2]) - (tonumber(ARGV[4]) - redis.call('PTTL', KEYS[2])) - 1
redis.call('DEL', KEYS[2])
if left < 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[3], 'PX', left)
return 1
";

/// [`FILL`] for many keys at once: `KEYS` are (value key, lease key) pairs, `ARGV` (token,
/// TTL, value, lease TTL) quadruples in the same order. Returns 1 or 0 for each pair.
const FILL_MANY: &str = r"
local out = {}
for i = 1, #KEYS / 2 do
  local value_key, lease_key, a = KEYS[2 * i - 1], KEYS[2 * i], 4 * (i - 1)
  local stored = 0
  if redis.call('GET', lease_key) == ARGV[a + 1] then
    local left = tonumber(ARGV[a + 2]) - (tonumber(ARGV[a + 4]) - redis.call('PTTL', lease_key)) - 1
    redis.call('DEL', lease_key)
    if left >= 1 then
      redis.call('SET', value_key, ARGV[a + 3], 'PX', left)
      stored = 1
    end
  end
  out[i] = stored
end
return out
";

/// An unconditional store (no lease): indexes the tags exactly.
const SET: &str = r"
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
redis.call('DEL', KEYS[2])
redis.call('SET', GONE .. KEYS[1], '1', 'PX', TOMB_MS)
index_tags(tonumber(ARGV[2]), true)
return 1
";

/// Deletes up to `count` members of the draining set `set` (their values and, under the
/// prefix `lease_prefix`, their leases); unregisters it from `registry` once empty. Returns
/// how many were deleted and how many remain. Shared by INVALIDATE and DRAIN.
const DRAIN_FN: &str = r"
local function drain(set, registry, lease_prefix, count)
  local members
  if redis.call('TYPE', set).ok == 'set' then
    members = redis.call('SPOP', set, count)
  else
    members = redis.call('ZRANGE', set, 0, count - 1)
    if #members > 0 then redis.call('ZREM', set, unpack(members)) end
  end
  for _, k in ipairs(members) do
    redis.call('DEL', k, lease_prefix .. k)
  end
  local left
  if redis.call('TYPE', set).ok == 'set' then
    left = redis.call('SCARD', set)
  else
    left = redis.call('ZCARD', set)
  end
  if left == 0 then redis.call('SREM', registry, set) end
  return #members, left
end
";

/// Deletes the values `KEYS[2..ARGV[3]+1]` and leaves their leases (under the prefix
/// `ARGV[2]`) a tombstone; retires each tag set `KEYS[i]` that follows (registering it in
/// `KEYS[i+1]`; `KEYS[1]` numbers the draining sets, named from `ARGV[1]`) and leaves it a
/// tombstone (under `ARGV[5]`); then deletes up to `ARGV[4]` members of the tags' draining
/// sets, those left by earlier, interrupted invalidations included. Starts `ARGV[6]`
/// (`tomb-since`) if this Redis has none yet: tombstones are complete from then on.
/// Returns how many members it deleted, and the draining sets not emptied, each followed by
/// its registry. O(keys + tags + `ARGV[4]`).
const INVALIDATE: &str = r"
redis.call('SET', ARGV[6], '1', 'NX', 'PX', SINCE_MS)
local n = tonumber(ARGV[3])
for i = 2, n + 1 do
  redis.call('DEL', KEYS[i], ARGV[2] .. KEYS[i])
  redis.call('SET', ARGV[7] .. KEYS[i], '1', 'PX', TOMB_MS)
end
local draining = {}
for i = n + 2, #KEYS, 2 do
  local tag, registry = KEYS[i], KEYS[i + 1]
  redis.call('SET', ARGV[5] .. tag, '1', 'PX', TOMB_MS)
  if redis.call('EXISTS', tag) == 1 then
    local dead = ARGV[1] .. redis.call('INCR', KEYS[1])
    redis.call('RENAME', tag, dead)
    redis.call('SADD', registry, dead)
    local ttl = redis.call('PTTL', dead)
    if ttl > 0 and redis.call('PTTL', registry) < ttl then redis.call('PEXPIRE', registry, ttl) end
  end
  for _, d in ipairs(redis.call('SMEMBERS', registry)) do
    table.insert(draining, d)
    table.insert(draining, registry)
  end
end
local budget = tonumber(ARGV[4])
local deleted_here = 0
local left_over = {}
for j = 1, #draining, 2 do
  local left = 1
  if budget > 0 then
    local deleted
    deleted, left = drain(draining[j], draining[j + 1], ARGV[2], budget)
    budget = budget - deleted
    deleted_here = deleted_here + deleted
  end
  if left > 0 then
    table.insert(left_over, draining[j])
    table.insert(left_over, draining[j + 1])
  end
end
return {deleted_here, left_over}
";

/// Deletes up to `ARGV[2]` members of the draining set `KEYS[1]` (see DRAIN_FN), registered
/// in `KEYS[2]`, leases under the prefix `ARGV[1]`. Returns how many were deleted and how
/// many remain.
const DRAIN: &str = r"
local deleted, left = drain(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2]))
return {deleted, left}
";

impl RedisTier {
    pub fn new(redis: Redis, prefix: String) -> Self {
        let buckets = redis.is_cluster().then(Buckets::new);
        // The names `retire` needs, fixed per prefix: constants of the script text rather
        // than arguments every call would send. On a cluster they depend on the bucket too:
        // the value key `KEYS[1]` starts with the prefix and the bucket's tag, up to its `}`.
        let names = match buckets {
            None => format!(
                "local RETIRED, TAG, DRAINING_SEQ, DRAINING, TOMBS, SINCE, GONE, EVICTED, EVICTING = {}, {}, {}, {}, {}, {}, {}, {}, {}\n",
                lua_string(&format!("{prefix}tag-retired:")),
                lua_string(&format!("{prefix}tag:")),
                lua_string(&format!("{prefix}tag-draining-seq")),
                lua_string(&format!("{prefix}tag-draining:")),
                lua_string(&format!("{prefix}tomb:")),
                lua_string(&format!("{prefix}tomb-since")),
                lua_string(&format!("{prefix}gone:")),
                lua_string(&format!("{prefix}evicted")),
                lua_string(&format!("{prefix}evicting")),
            ),
            Some(_) => format!(
                "local B = string.sub(KEYS[1], 1, string.find(KEYS[1], '}}', 1, true))\n\
                 local RETIRED, TAG, DRAINING_SEQ, DRAINING, TOMBS, SINCE, GONE, EVICTED, EVICTING = \
                 B .. 'tag-retired:', B .. 'tag:', B .. 'tag-draining-seq', B .. 'tag-draining:', \
                 B .. 'tomb:', B .. 'tomb-since', {}, B .. 'evicted', B .. 'evicting'\n",
                lua_string(&format!("{prefix}gone:")),
            ),
        };
        let tomb = TOMB.as_millis().to_string();
        let since = SINCE_TTL.as_millis().to_string();
        let index_tags = format!(
            "{names}{EVICTION_STATE}{}",
            INDEX_TAGS
                .replace("TRIM", &TRIM.to_string())
                .replace("TOMB_MS", &tomb)
                .replace("SINCE_MS", &since)
        );
        RedisTier {
            redis,
            prefix,
            buckets,
            get_or_lease: Script::new(&format!("{index_tags}{GET_OR_LEASE}")),
            get_or_lease_many: Script::new(&format!("{index_tags}{GET_OR_LEASE_MANY}")),
            lookups: LookupGroups::new(if buckets.is_some() { BUCKETS } else { 1 }),
            try_lease: Script::new(&format!("{index_tags}{TRY_LEASE}")),
            release: Script::new(RELEASE),
            fill: Script::new(FILL),
            fill_many: Script::new(FILL_MANY),
            store_fresh_many: Script::new(&format!("{index_tags}{STORE_FRESH_MANY}")),
            clock: RedisClock::default(),
            set: Script::new(&format!("{index_tags}{}", SET.replace("TOMB_MS", &tomb))),
            invalidate: Script::new(&format!(
                "{DRAIN_FN}{}",
                INVALIDATE
                    .replace("TOMB_MS", &tomb)
                    .replace("SINCE_MS", &since)
            )),
            drain: Script::new(&format!("{DRAIN_FN}{DRAIN}")),
        }
    }

    /// How long each call may wait for Redis (`REDIS_TIMEOUT`).
    pub fn timeout(&self) -> Duration {
        self.redis.timeout()
    }

    /// The bucket of `full_key` on a cluster; None on one server.
    fn bucket(&self, full_key: &str) -> Option<usize> {
        self.buckets.as_ref().map(|b| b.of(full_key))
    }

    /// Appends what every name of `bucket` starts with: the prefix, then (on a cluster) the
    /// bucket's hash tag.
    fn push_base(&self, name: &mut String, bucket: Option<usize>) {
        name.push_str(&self.prefix);
        if let (Some(buckets), Some(bucket)) = (&self.buckets, bucket) {
            name.push_str(buckets.tag(bucket));
        }
    }

    /// `name` under the base of `bucket`.
    fn named(&self, bucket: Option<usize>, name: &str) -> String {
        let mut out = String::with_capacity(self.prefix.len() + 8 + name.len());
        self.push_base(&mut out, bucket);
        out.push_str(name);
        out
    }

    /// An `EVALSHA` of `script` on the value key of `full_key`, its lease and the tag sets
    /// of `tags`, with `args` as `ARGV`. Built straight into one command buffer: the key
    /// names are written through one scratch string, not allocated one by one.
    fn keyed(&self, script: &Script, full_key: &str, tags: &[String], args: &[&[u8]]) -> Cmd {
        let prefix = &self.prefix;
        let bucket = self.bucket(full_key);
        let size = 64
            + 3 * (prefix.len() + 8 + full_key.len())
            + args.iter().map(|a| a.len()).sum::<usize>()
            + tags
                .iter()
                .map(|t| prefix.len() + 12 + t.len())
                .sum::<usize>();
        let mut cmd = Cmd::with_capacity(5 + tags.len() + args.len(), size);
        cmd.arg("EVALSHA")
            .arg(script.get_hash())
            .arg(2 + tags.len());
        let mut name = String::with_capacity(2 * prefix.len() + 14 + full_key.len());
        self.push_names(&mut cmd, &mut name, bucket, full_key, tags);
        for arg in args {
            cmd.arg(*arg);
        }
        cmd
    }

    /// Appends to `cmd` the value key of `full_key` (in `bucket`), its lease and the tag sets
    /// of `tags`, each spelled in the scratch string `name`.
    fn push_names(
        &self,
        cmd: &mut Cmd,
        name: &mut String,
        bucket: Option<usize>,
        full_key: &str,
        tags: &[String],
    ) {
        name.clear();
        self.push_base(name, bucket);
        name.push_str(full_key);
        cmd.arg(&*name);
        // The lease key: `<prefix>lease:<value key>`.
        name.insert_str(0, "lease:");
        name.insert_str(0, &self.prefix);
        cmd.arg(&*name);
        for tag in tags {
            self.tag_set_name(name, bucket, tag);
            cmd.arg(&*name);
        }
    }

    /// Spells in `name` the tag set of `tag` in `bucket`: `<prefix>[{bucket}]tag:<tag>`, the
    /// one spelling of the scripts' keys and of [`get`](Self::get)'s `ZSCORE`s (a reader that
    /// named a set its writers did not would refuse the value at every read).
    fn tag_set_name(&self, name: &mut String, bucket: Option<usize>, tag: &str) {
        name.clear();
        self.push_base(name, bucket);
        name.push_str("tag:");
        name.push_str(tag);
    }

    /// The value of `full_key`, or the lease on it (for `lease_ttl`), or word that another
    /// caller holds it: one script, one round trip. `value_ttl`: the longest TTL the lease
    /// holder's fill may store. `probe_first`: try a plain read ([`get`](Self::get)) before the
    /// script, when the key has at most [`PROBE_TAGS`] tag sets (past that, the script's own
    /// checks cost Redis less than as many commands and their replies).
    /// `batched`: the script is shared with the concurrent batched lookups of the key's
    /// bucket (`lookup_batch.rs`; a lookup alone is still sent at once).
    #[allow(clippy::too_many_arguments)]
    pub async fn lookup(
        &self,
        full_key: &str,
        tags: &[String],
        token: &str,
        lease_ttl: Duration,
        value_ttl: Duration,
        probe_first: bool,
        batched: bool,
    ) -> Result<Lookup, RedisError> {
        if probe_first && tags.len() <= PROBE_TAGS {
            // Most lookups of this namespace hit lately: plain commands are cheaper than the
            // script (a command called from Lua costs Redis about twice the command), and only
            // a miss pays for both.
            if let Some(bytes) = self.get(full_key, tags).await? {
                return Ok(Lookup::Hit(bytes));
            }
        }
        let key = LookupKey {
            full_key: full_key.to_string(),
            tags: tags.to_vec(),
            token: token.to_string(),
            lease_ttl,
            value_ttl,
        };
        if batched {
            let group = self.lookups.group(self.bucket(full_key).unwrap_or(0));
            return self.lookup_batched(group, key).await;
        }
        self.lookup_one(&key).await
    }

    /// One [`GET_OR_LEASE`].
    pub(super) async fn lookup_one(&self, key: &LookupKey) -> Result<Lookup, RedisError> {
        let cmd = self.keyed(
            &self.get_or_lease,
            &key.full_key,
            &key.tags,
            &[
                key.token.as_bytes(),
                millis(key.lease_ttl).as_bytes(),
                millis(key.value_ttl).as_bytes(),
            ],
        );
        let bytes: Vec<u8> = self.redis.eval(&self.get_or_lease, &cmd).await?;
        Ok(Lookup::from_reply(bytes))
    }

    /// One [`GET_OR_LEASE_MANY`] of `keys`, all of one bucket on a cluster: what each found,
    /// in order.
    pub(super) async fn lookup_many(&self, keys: &[&LookupKey]) -> Result<Vec<Lookup>, RedisError> {
        let prefix = &self.prefix;
        let (names, size) = keys.iter().fold((0, 64), |(names, size), k| {
            let tags: usize = k.tags.iter().map(|t| prefix.len() + 12 + t.len()).sum();
            (
                names + 2 + k.tags.len(),
                size + 3 * (prefix.len() + 8 + k.full_key.len()) + 64 + tags,
            )
        });
        let mut cmd = Cmd::with_capacity(3 + names + 4 * keys.len(), size);
        cmd.arg("EVALSHA")
            .arg(self.get_or_lease_many.get_hash())
            .arg(names);
        let mut name = String::new();
        for k in keys {
            let bucket = self.bucket(&k.full_key);
            self.push_names(&mut cmd, &mut name, bucket, &k.full_key, &k.tags);
        }
        for k in keys {
            cmd.arg(&k.token)
                .arg(millis(k.lease_ttl))
                .arg(millis(k.value_ttl))
                .arg(k.tags.len());
        }
        let replies: Vec<Vec<u8>> = self.redis.eval(&self.get_or_lease_many, &cmd).await?;
        Ok(replies.into_iter().map(Lookup::from_reply).collect())
    }

    /// Takes the lease of a key whatever its value (early refresh); false if someone holds it.
    /// `value_ttl` as for [`lookup`](Self::lookup).
    pub async fn try_lease(
        &self,
        full_key: &str,
        tags: &[String],
        token: &str,
        lease_ttl: Duration,
        value_ttl: Duration,
    ) -> Result<bool, RedisError> {
        let cmd = self.keyed(
            &self.try_lease,
            full_key,
            tags,
            &[
                token.as_bytes(),
                millis(lease_ttl).as_bytes(),
                millis(value_ttl).as_bytes(),
            ],
        );
        let granted: i64 = self.redis.eval(&self.try_lease, &cmd).await?;
        Ok(granted == 1)
    }

    /// Gives back the lease `token` holds on `full_key`, if it still does.
    pub async fn release(&self, full_key: &str, token: &str) -> Result<bool, RedisError> {
        let cmd = self.keyed(&self.release, full_key, &[], &[token.as_bytes()]);
        let released: i64 = self.redis.eval(&self.release, &cmd).await?;
        Ok(released == 1)
    }

    /// A read without script or lease: the value of `full_key` if it is still in each of the
    /// tag sets of `tags` (as `indexed_value` checks in the scripts, [`INDEX_TAGS`]), by one
    /// `ZSCORE` per set and a `GET`, pipelined. `None` for no value, a value out of one of
    /// its sets (evicted: the lookup script deletes it), or a set of the former kind (a plain
    /// set of an earlier release: the script reads those). `tags`, as the lookups', include
    /// the namespace's, and must be those the key's writers index it under (every reader of a
    /// key passes the same tags: [`Cache::get_or_load`](super::Cache::get_or_load)).
    pub async fn get(
        &self,
        full_key: &str,
        tags: &[String],
    ) -> Result<Option<Vec<u8>>, RedisError> {
        let bucket = self.bucket(full_key);
        let value_key = self.named(bucket, full_key);
        if tags.is_empty() {
            return self.redis.query(redis::cmd("GET").arg(&value_key)).await;
        }
        // The memberships first, the value last: a value read after its entries were seen
        // is one they were seen for, or one an invalidation in flight is about to delete (as
        // for any read that overlaps a write). In the other order, another instance could
        // delete the value read, lease the key and enter it again between the two.
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let mut name = String::new();
        for tag in tags {
            self.tag_set_name(&mut name, bucket, tag);
            pipe.cmd("ZSCORE").arg(&name).arg(&value_key);
        }
        pipe.cmd("GET").arg(&value_key);
        let mut replies: Vec<redis::RedisResult<redis::Value>> = self.redis.pipeline(&pipe).await?;
        let value = replies.pop();
        let indexed = replies
            .iter()
            .all(|score| matches!(score, Ok(v) if *v != redis::Value::Nil));
        match value {
            Some(Ok(redis::Value::BulkString(bytes))) if indexed => Ok(Some(bytes)),
            Some(Err(err)) => Err(err.into()),
            _ => Ok(None),
        }
    }

    /// Stores `bytes` for `ttl` if `lease` (its token and the TTL it was taken with) is still
    /// the key's lease, or unconditionally (`None`). Under a lease, `ttl` counts from when the
    /// lease was granted and must not exceed the `value_ttl` it was taken with; `tags` are not
    /// sent (the lease entered them). Returns whether it was stored.
    pub async fn store(
        &self,
        full_key: &str,
        lease: Option<(&str, Duration)>,
        bytes: &[u8],
        ttl: Duration,
        tags: &[String],
    ) -> Result<bool, RedisError> {
        let ttl = millis(ttl);
        let (script, cmd) = match lease {
            Some((token, lease_ttl)) => {
                let lease_ttl = millis(lease_ttl);
                let args = [
                    token.as_bytes(),
                    ttl.as_bytes(),
                    bytes,
                    lease_ttl.as_bytes(),
                ];
                (&self.fill, self.keyed(&self.fill, full_key, &[], &args))
            }
            None => {
                let args = [&b""[..], ttl.as_bytes(), bytes];
                (&self.set, self.keyed(&self.set, full_key, tags, &args))
            }
        };
        let stored: i64 = self.redis.eval(script, &cmd).await?;
        Ok(stored == 1)
    }

    /// [`store`](Self::store) under a lease for each of `stores`, in one script: a batch of
    /// loads fills in one round trip. Whether each was stored, in order.
    /// On a cluster, one script per bucket the keys fall in, sent concurrently.
    pub async fn store_leased(&self, stores: &[LeasedStore<'_>]) -> Result<Vec<bool>, RedisError> {
        let Some(buckets) = &self.buckets else {
            return self.fill_group(stores.iter()).await;
        };
        let mut groups: Vec<Vec<usize>> = vec![Vec::new(); BUCKETS];
        for (i, s) in stores.iter().enumerate() {
            groups[buckets.of(s.full_key)].push(i);
        }
        let groups: Vec<Vec<usize>> = groups.into_iter().filter(|g| !g.is_empty()).collect();
        let fills = groups
            .iter()
            .map(|group| self.fill_group(group.iter().map(|&i| &stores[i])));
        let filled = futures_util::future::try_join_all(fills).await?;
        let mut stored = vec![false; stores.len()];
        for (group, filled) in groups.iter().zip(filled) {
            for (&i, ok) in group.iter().zip(filled) {
                stored[i] = ok;
            }
        }
        Ok(stored)
    }

    /// One [`FILL_MANY`] of `stores` (all of one bucket on a cluster).
    async fn fill_group<'s, 'k: 's>(
        &self,
        stores: impl Iterator<Item = &'s LeasedStore<'k>> + Clone,
    ) -> Result<Vec<bool>, RedisError> {
        let prefix = &self.prefix;
        let (count, size) = stores.clone().fold((0, 64), |(n, size), s| {
            (
                n + 1,
                size + 3 * (prefix.len() + 8 + s.full_key.len()) + 64 + s.bytes.len(),
            )
        });
        let mut cmd = Cmd::with_capacity(3 + 6 * count, size);
        cmd.arg("EVALSHA")
            .arg(self.fill_many.get_hash())
            .arg(2 * count);
        let mut name = String::new();
        for s in stores.clone() {
            name.clear();
            self.push_base(&mut name, self.bucket(s.full_key));
            name.push_str(s.full_key);
            cmd.arg(&name);
            name.insert_str(0, "lease:");
            name.insert_str(0, prefix);
            cmd.arg(&name);
        }
        for s in stores {
            cmd.arg(s.token)
                .arg(millis(s.ttl))
                .arg(&s.bytes[..])
                .arg(millis(s.lease_ttl));
        }
        let stored: Vec<i64> = self.redis.eval(&self.fill_many, &cmd).await?;
        Ok(stored.into_iter().map(|s| s == 1).collect())
    }

    /// Each of `stores` (speculative loads' values, `lease.rs`) stored unless a value is
    /// already there, an invalidation since its load began left a tombstone, or it would run
    /// past its deadline: see [`STORE_FRESH_MANY`]. One script per bucket the keys fall in
    /// (one on a single server), sent concurrently. What became of each, in order.
    pub async fn store_fresh(&self, stores: &[FreshStore<'_>]) -> Result<Vec<Fresh>, RedisError> {
        let Some(buckets) = &self.buckets else {
            return self.store_fresh_group(None, stores.iter()).await;
        };
        let mut groups: Vec<Vec<usize>> = vec![Vec::new(); BUCKETS];
        for (i, s) in stores.iter().enumerate() {
            groups[buckets.of(s.full_key)].push(i);
        }
        let groups: Vec<(usize, Vec<usize>)> = groups
            .into_iter()
            .enumerate()
            .filter(|(_, g)| !g.is_empty())
            .collect();
        let runs = groups.iter().map(|(bucket, group)| {
            self.store_fresh_group(Some(*bucket), group.iter().map(|&i| &stores[i]))
        });
        let done = futures_util::future::try_join_all(runs).await?;
        let mut out: Vec<Option<Fresh>> = (0..stores.len()).map(|_| None).collect();
        for ((_, group), done) in groups.iter().zip(done) {
            for (&i, fresh) in group.iter().zip(done) {
                out[i] = Some(fresh);
            }
        }
        // Every index is in exactly one group, each of which answered for all of its keys.
        Ok(out.into_iter().map(|f| f.unwrap_or(Fresh::Late)).collect())
    }

    /// Makes this tier's bound of a single server's clock `ms` too high, as a step back of
    /// Redis's clock (or a failover to a server behind) would.
    #[cfg(test)]
    pub(crate) fn clock_ahead(&self, ms: i64) {
        let now = Instant::now();
        if let (Some(offset), Some(local)) = (self.clock.offset(0), self.clock.local_ms(now)) {
            self.clock.sample_at(0, local + offset + 1 + ms, now);
        }
    }

    /// One [`STORE_FRESH_MANY`] of `stores`, all of `bucket` (`None`: one server). Each
    /// deadline is its load's start plus its window by Redis's clock, as far as it can be
    /// known from here: taken from [`RedisClock`], which a script with no key to store
    /// first samples if it holds no recent sample of this bucket's server.
    async fn store_fresh_group<'s, 'k: 's>(
        &self,
        bucket: Option<usize>,
        stores: impl Iterator<Item = &'s FreshStore<'k>> + Clone,
    ) -> Result<Vec<Fresh>, RedisError> {
        let clock = bucket.unwrap_or(0);
        if self.clock.offset(clock).is_none() {
            let mut probe = Cmd::new();
            probe
                .arg("EVALSHA")
                .arg(self.store_fresh_many.get_hash())
                .arg(1)
                .arg(self.named(bucket, "clock"));
            let reply: Vec<Vec<u8>> = self.redis.eval(&self.store_fresh_many, &probe).await?;
            self.clock.sample(clock, reply.last().map(Vec::as_slice));
        }
        let offset = self.clock.offset(clock);
        let prefix = &self.prefix;
        let (count, names, size) = stores.clone().fold((0, 0, 64), |(n, names, size), s| {
            let tags: usize = s.tags.iter().map(|t| prefix.len() + 12 + t.len()).sum();
            (
                n + 1,
                names + 1 + s.tags.len(),
                size + 2 * (prefix.len() + 8 + s.full_key.len()) + 64 + tags + s.bytes.len(),
            )
        });
        let mut cmd = Cmd::with_capacity(3 + names + 4 * count, size);
        cmd.arg("EVALSHA")
            .arg(self.store_fresh_many.get_hash())
            .arg(names);
        let mut name = String::new();
        for s in stores.clone() {
            name.clear();
            self.push_base(&mut name, bucket);
            name.push_str(s.full_key);
            cmd.arg(&name);
            for tag in s.tags {
                self.tag_set_name(&mut name, bucket, tag);
                cmd.arg(&name);
            }
        }
        // Redis's clock is at least this now, if the bound holds (the script checks it).
        let sent = offset.map_or(0, |offset| {
            self.clock.deadline(Instant::now(), Duration::ZERO, offset)
        });
        cmd.arg(sent);
        for s in stores {
            // No known offset (the probe's reply was unreadable): a deadline already past.
            let deadline =
                offset.map_or(0, |offset| self.clock.deadline(s.began, s.window, offset));
            cmd.arg(deadline)
                .arg(millis(s.ttl))
                .arg(&s.bytes[..])
                .arg(s.tags.len());
        }
        let mut replies: Vec<Vec<u8>> = self.redis.eval(&self.store_fresh_many, &cmd).await?;
        if replies.len() != count + 1 {
            return Err(RedisError::Command(redis::RedisError::from((
                redis::ErrorKind::Parse,
                "store script answered for the wrong number of keys",
                format!("{} answers for {count} keys", replies.len()),
            ))));
        }
        let now = replies.pop();
        let found: Vec<Fresh> = replies.into_iter().map(Fresh::from_reply).collect();
        if found.iter().any(|f| matches!(f, Fresh::ClockBehind)) {
            // The bound was wrong (a clock stepped back, another server): start again from
            // this reply.
            self.clock.reset(clock);
        }
        self.clock.sample(clock, now.as_deref());
        Ok(found)
    }

    /// Deletes the values and leases of `full_keys` and every value carrying any of `tags`,
    /// in one script when the tags list few keys (see the module's doc): a write's whole
    /// invalidation is one round trip. Returns how many keys the tags listed.
    ///
    /// On a cluster: one script per bucket holding one of the keys, or per bucket when there
    /// are tags (each bucket has its own set of each tag), sent concurrently; every one runs
    /// even if another fails, and the first error is returned.
    pub async fn invalidate(
        &self,
        full_keys: &[String],
        tags: &[String],
    ) -> Result<u64, RedisError> {
        let mut tags: Vec<&String> = tags.iter().collect();
        tags.sort_unstable();
        tags.dedup();
        let Some(buckets) = &self.buckets else {
            return self.invalidate_in(None, full_keys, &tags).await;
        };
        let mut keys: Vec<Vec<&String>> = vec![Vec::new(); BUCKETS];
        for full_key in full_keys {
            keys[buckets.of(full_key)].push(full_key);
        }
        let runs = keys
            .iter()
            .enumerate()
            .filter(|(_, keys)| !keys.is_empty() || !tags.is_empty())
            .map(|(bucket, keys)| self.invalidate_in(Some(bucket), keys, &tags));
        let mut listed = 0;
        for result in futures_util::future::join_all(runs).await {
            listed += result?;
        }
        Ok(listed)
    }

    /// [`invalidate`](Self::invalidate) of keys and tag sets of one bucket (`None`: one
    /// server's names).
    async fn invalidate_in(
        &self,
        bucket: Option<usize>,
        full_keys: &[impl AsRef<str>],
        tags: &[&String],
    ) -> Result<u64, RedisError> {
        let mut script = self.invalidate.prepare_invoke();
        script.key(self.named(bucket, "tag-draining-seq"));
        for full_key in full_keys {
            script.key(self.named(bucket, full_key.as_ref()));
        }
        for tag in tags {
            script
                .key(self.named(bucket, &format!("tag:{tag}")))
                .key(self.named(bucket, &format!("tag-retired:{tag}")));
        }
        script
            .arg(self.named(bucket, "tag-draining:"))
            .arg(format!("{}lease:", self.prefix))
            .arg(full_keys.len())
            .arg(DRAIN_BATCH)
            .arg(self.named(bucket, "tomb:"))
            .arg(self.named(bucket, "tomb-since"))
            .arg(format!("{}gone:", self.prefix));
        // Flat pairs: (draining set, the registry it is listed in), each with members left.
        let (mut listed, draining): (u64, Vec<String>) = self.redis.invoke(&script).await?;
        for pair in draining.chunks_exact(2) {
            let mut drain = self.drain.prepare_invoke();
            drain.key(&pair[0]).key(&pair[1]);
            drain.arg(format!("{}lease:", self.prefix)).arg(DRAIN_BATCH);
            // Bounded: a draining set gains no member, and each batch removes some or ends.
            loop {
                let (deleted, left): (u64, u64) = self.redis.invoke(&drain).await?;
                listed += deleted;
                if left == 0 || deleted == 0 {
                    break;
                }
            }
        }
        Ok(listed)
    }
}

/// What became of a speculative store ([`RedisTier::store_fresh`]).
#[derive(Debug)]
pub(crate) enum Fresh {
    /// A value was already there (the stored bytes): nothing stored.
    Found(Vec<u8>),
    Stored,
    /// An invalidation of the key, its tags or its namespace within [`TOMB`]: the row may be
    /// older than it.
    Tombstoned,
    /// This Redis's tombstones are not [`TOMB`] old yet (a restart, a flush), or a store script
    /// saw its eviction state move less than [`TOMB`] ago (an evicted key may have been a
    /// tombstone): nothing stored.
    Unsettled,
    /// Redis refused `INFO` to the script (an ACL without `+info`, a renamed command), so
    /// whether it evicts cannot be known: nothing stored.
    Blind,
    /// It would have run past its deadline: nothing stored.
    Late,
    /// Redis's clock was behind where the sender knew it to be at least (stepped back, or
    /// another server): the deadlines were wrong, nothing stored.
    ClockBehind,
}

impl Fresh {
    fn from_reply(bytes: Vec<u8>) -> Fresh {
        match bytes.as_slice() {
            b"S" => Fresh::Stored,
            b"l" => Fresh::Tombstoned,
            b"u" => Fresh::Unsettled,
            b"i" => Fresh::Blind,
            b"d" => Fresh::Late,
            b"c" => Fresh::ClockBehind,
            _ => Fresh::Found(bytes),
        }
    }
}

/// How long a sample of Redis's clock is used: samples are kept for one period and the one
/// before, then dropped (our monotonic clock and Redis's wall clock drift apart slowly).
const CLOCK_PERIOD: Duration = Duration::from_secs(5);

/// Where each server's clock stands against ours (one per bucket on a cluster, whose servers
/// each have their own; one on a single server): a *lower* bound of Redis's clock minus ours,
/// in ms. A script that returns Redis's clock ran before its reply came back, so its clock
/// minus ours at the reply is below the true difference; the largest such sample of the last
/// period or two is the bound. A deadline computed with it falls no later, by Redis's clock,
/// than it would with the true difference.
pub(crate) struct RedisClock {
    /// Our clock's zero: times before it are never given a deadline.
    base: Instant,
    samples: Mutex<Vec<ClockSamples>>,
}

#[derive(Clone, Copy, Default)]
struct ClockSamples {
    /// The largest sample of this period and of the one before.
    current: Option<i64>,
    previous: Option<i64>,
    /// When this period began.
    since: Option<Instant>,
}

impl Default for RedisClock {
    fn default() -> Self {
        RedisClock {
            base: Instant::now(),
            samples: Mutex::new(vec![ClockSamples::default(); BUCKETS]),
        }
    }
}

impl RedisClock {
    fn local_ms(&self, at: Instant) -> Option<i64> {
        at.checked_duration_since(self.base)
            .map(|d| d.as_millis() as i64)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<ClockSamples>> {
        self.samples.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes Redis's clock (ms, as a script returned it) of server `clock`, read before now.
    fn sample(&self, clock: usize, redis_ms: Option<&[u8]>) {
        let redis_ms = redis_ms
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|s| s.parse::<i64>().ok());
        if let Some(redis_ms) = redis_ms {
            self.sample_at(clock, redis_ms, Instant::now());
        }
    }

    /// [`sample`](Self::sample), received at `now`.
    fn sample_at(&self, clock: usize, redis_ms: i64, now: Instant) {
        let Some(local) = self.local_ms(now) else {
            return;
        };
        // Both clocks are read in whole milliseconds: one less covers the rounding.
        let sample = redis_ms - local - 1;
        let mut samples = self.lock();
        let Some(s) = samples.get_mut(clock) else {
            return;
        };
        match s.since.map(|since| now.saturating_duration_since(since)) {
            Some(age) if age < CLOCK_PERIOD => {}
            // The last period ended: it becomes the one before, unless it ended longer ago.
            Some(age) if age < 2 * CLOCK_PERIOD => {
                s.previous = s.current.take();
                s.since = Some(now);
            }
            _ => {
                *s = ClockSamples {
                    since: Some(now),
                    ..ClockSamples::default()
                };
            }
        }
        s.current = Some(s.current.map_or(sample, |c| c.max(sample)));
    }

    /// Forgets what is known of server `clock` (its bound proved wrong).
    fn reset(&self, clock: usize) {
        if let Some(s) = self.lock().get_mut(clock) {
            *s = ClockSamples::default();
        }
    }

    /// The lower bound of server `clock`'s offset, from samples of this period and the last;
    /// `None` if there are none that recent.
    fn offset(&self, clock: usize) -> Option<i64> {
        self.offset_at(clock, Instant::now())
    }

    /// [`offset`](Self::offset) at `now`.
    fn offset_at(&self, clock: usize, now: Instant) -> Option<i64> {
        let samples = self.lock();
        let s = samples.get(clock)?;
        let age = now.saturating_duration_since(s.since?);
        if age >= 2 * CLOCK_PERIOD {
            return None;
        }
        let previous = if age < CLOCK_PERIOD { s.previous } else { None };
        match (s.current, previous) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// `began + window` by Redis's clock (ms), or 0 (already past) for a time before our
    /// clock's zero.
    fn deadline(&self, began: Instant, window: Duration, offset: i64) -> i64 {
        match self.local_ms(began) {
            Some(began) => began + offset + window.as_millis() as i64,
            None => 0,
        }
    }
}

impl Lookup {
    /// A lookup script's reply for one key. A stored value is at least a codec header long:
    /// never `L` or `W`.
    fn from_reply(bytes: Vec<u8>) -> Lookup {
        match bytes.as_slice() {
            b"L" => Lookup::Lease,
            b"W" => Lookup::Wait,
            _ => Lookup::Hit(bytes),
        }
    }
}

/// A duration as whole milliseconds (at least 1: `PX 0` is an error), for `ARGV`.
fn millis(d: Duration) -> String {
    d.as_millis().max(1).to_string()
}

/// `s` as a Lua string literal, whatever bytes the configured prefix holds.
fn lua_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for byte in s.bytes() {
        if byte.is_ascii_alphanumeric() || b":-_.{}/ ".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("\\{byte:03}"));
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The many-key scripts answer each key of a batch as if it were alone: a value found, a
    /// key tombstoned beside keys that are not, a key named twice (a second lookup waits, a
    /// second fill under one lease is refused), and a value out of its tag set (as after an
    /// eviction of the set) is never answered or kept.
    #[tokio::test]
    async fn each_key_of_a_many_key_script_is_answered_on_its_own() {
        use crate::config::{RedisConfig, Secret};
        let server = cascade_testkit::RedisServer::start().await;
        let redis = Redis::new(&RedisConfig {
            url: Secret::new(server.url()),
            display: server.url(),
            timeout: Duration::from_secs(5),
            ca_cert: None,
            sentinel: None,
            cluster: None,
        })
        .unwrap();
        let raw = redis.clone();
        // Full keys are named without the prefix: `items:a` is `t:items:a` in Redis.
        let tier = RedisTier::new(redis, "t:".to_string());
        let ns = vec!["ns:items".to_string()];
        let fresh = |key: &'static str, bytes: &str| FreshStore {
            full_key: key,
            tags: &ns,
            bytes: bytes.as_bytes().to_vec(),
            ttl: Duration::from_secs(60),
            began: Instant::now(),
            window: Duration::from_millis(400),
        };
        let get = |key: &'static str| {
            let raw = raw.clone();
            async move {
                let v: Option<String> = raw.query(redis::cmd("GET").arg(key)).await.unwrap();
                v
            }
        };
        let in_set = |key: &'static str| {
            let raw = raw.clone();
            async move {
                let score: Option<f64> = raw
                    .query(redis::cmd("ZSCORE").arg("t:tag:ns:items").arg(key))
                    .await
                    .unwrap();
                score.is_some()
            }
        };

        // A new Redis's tombstones are not a TOMB old: nothing is stored until they are.
        let first = tier.store_fresh(&[fresh("items:c", "c1")]).await.unwrap();
        assert!(matches!(first[..], [Fresh::Unsettled]), "{first:?}");
        tokio::time::sleep(TOMB + Duration::from_millis(200)).await;
        let stored = tier
            .store_fresh(&[fresh("items:c", "c1"), fresh("items:d", "d1")])
            .await
            .unwrap();
        assert!(
            matches!(stored[..], [Fresh::Stored, Fresh::Stored]),
            "{stored:?}"
        );
        // d leaves its set (as if the set had been evicted and entered again without it); b
        // was invalidated a moment ago.
        let () = raw
            .query(redis::cmd("ZREM").arg("t:tag:ns:items").arg("t:items:d"))
            .await
            .map(|_: i64| ())
            .unwrap();
        let () = raw
            .query(
                redis::cmd("SET")
                    .arg("t:gone:t:items:b")
                    .arg(1)
                    .arg("PX")
                    .arg(1000),
            )
            .await
            .unwrap();
        let answers = tier
            .store_fresh(&[
                fresh("items:a", "a1"),
                fresh("items:b", "b1"),
                fresh("items:c", "c2"),
                fresh("items:d", "d2"),
            ])
            .await
            .unwrap();
        match &answers[..] {
            [
                Fresh::Stored,
                Fresh::Tombstoned,
                Fresh::Found(c),
                Fresh::Stored,
            ] => {
                assert_eq!(&c[..], &b"c1"[..])
            }
            other => panic!("store answers: {other:?}"),
        }
        assert_eq!(get("t:items:a").await.as_deref(), Some("a1"));
        assert_eq!(get("t:items:b").await, None, "a tombstoned key stored");
        assert_eq!(get("t:items:d").await.as_deref(), Some("d2"));
        assert!(in_set("t:items:a").await && in_set("t:items:d").await);

        // The lookups: hits, a lease, the same key's second lookup waits, and a value out of
        // its set is deleted and leased like a miss.
        let () = raw
            .query(redis::cmd("ZREM").arg("t:tag:ns:items").arg("t:items:a"))
            .await
            .map(|_: i64| ())
            .unwrap();
        let lookup = |key: &str, token: &str| LookupKey {
            full_key: key.to_string(),
            tags: ns.clone(),
            token: token.to_string(),
            lease_ttl: Duration::from_secs(5),
            value_ttl: Duration::from_secs(60),
        };
        let keys = [
            lookup("items:c", "tc"),
            lookup("items:e", "te"),
            lookup("items:e", "te2"),
            lookup("items:a", "ta"),
            lookup("items:d", "td"),
        ];
        let found = tier
            .lookup_many(&keys.iter().collect::<Vec<_>>())
            .await
            .unwrap();
        match &found[..] {
            [
                Lookup::Hit(c),
                Lookup::Lease,
                Lookup::Wait,
                Lookup::Lease,
                Lookup::Hit(d),
            ] => assert_eq!((&c[..], &d[..]), (&b"c1"[..], &b"d2"[..])),
            other => panic!("lookup answers: {other:?}"),
        }
        assert_eq!(get("t:items:a").await, None, "a value out of its set kept");

        // The fills: each lease fills once (a second fill under the same lease is refused, as
        // is a fill under a token that is not the lease's), and every lease used is gone.
        let leased = |key: &'static str, token: &'static str, bytes: &str| LeasedStore {
            full_key: key,
            tags: &ns,
            token,
            lease_ttl: Duration::from_secs(5),
            bytes: bytes.as_bytes().to_vec(),
            ttl: Duration::from_secs(60),
        };
        let filled = tier
            .store_leased(&[
                leased("items:e", "te", "e1"),
                leased("items:e", "te", "e2"),
                leased("items:a", "ta", "a2"),
                leased("items:f", "tf", "f1"),
            ])
            .await
            .unwrap();
        assert_eq!(filled, [true, false, true, false]);
        assert_eq!(get("t:items:e").await.as_deref(), Some("e1"));
        assert_eq!(get("t:items:a").await.as_deref(), Some("a2"));
        assert_eq!(get("t:items:f").await, None);
        for lease in ["t:lease:t:items:e", "t:lease:t:items:a"] {
            assert_eq!(get(lease).await, None, "{lease} left after its fill");
        }
    }

    /// Redis's clock `offset` ms ahead of the sampler's, replied at `at` ms past its zero
    /// `latency` ms after it ran.
    fn sample(clock: &RedisClock, at: u64, offset: i64, latency: i64) {
        let now = clock.base + Duration::from_millis(at);
        clock.sample_at(0, at as i64 + offset - latency, now);
    }

    fn offset(clock: &RedisClock, at: u64) -> Option<i64> {
        clock.offset_at(0, clock.base + Duration::from_millis(at))
    }

    #[test]
    fn the_clock_bound_stays_below_the_true_offset_and_forgets_old_samples() {
        let clock = RedisClock::default();
        assert_eq!(offset(&clock, 0), None);
        // Replies that took 3 ms and 1 ms: the bound is the closer one, still below 500.
        sample(&clock, 10, 500, 3);
        sample(&clock, 20, 500, 1);
        assert_eq!(offset(&clock, 30), Some(498));
        // A sample of the next period is kept beside this one's for a period.
        sample(&clock, 5_100, 500, 10);
        assert_eq!(offset(&clock, 5_200), Some(498));
        // Samples older than two periods are not used: none left after a silence.
        assert_eq!(offset(&clock, 10_100), Some(489));
        assert_eq!(offset(&clock, 15_200), None);
        // After a silence longer than two periods, a new sample starts afresh: the bound
        // from before the silence (here higher than Redis's clock is now) is gone.
        sample(&clock, 40_000, 200, 1);
        assert_eq!(offset(&clock, 40_001), Some(198));
        // A bound proved wrong is forgotten at once.
        sample(&clock, 40_010, 200, 1);
        clock.reset(0);
        assert_eq!(offset(&clock, 40_011), None);
        sample(&clock, 40_020, 100, 1);
        assert_eq!(offset(&clock, 40_021), Some(98));
        // Deadlines count from the load's start on Redis's clock, by the bound.
        let began = clock.base + Duration::from_millis(40_000);
        assert_eq!(
            clock.deadline(began, Duration::from_millis(100), 98),
            40_198
        );
        assert_eq!(
            clock.deadline(clock.base - Duration::from_millis(1), Duration::ZERO, 98),
            0
        );
    }
}
