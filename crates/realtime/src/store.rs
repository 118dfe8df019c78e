//! Where each channel's messages get their offsets and are kept for resuming clients.
//!
//! **With Redis**, per channel (`{prefix}rt:{<channel>}:m` and `:h`, the name in a hash tag so
//! both keys live in one cluster slot):
//! - a hash `epoch`, `offset`, `run`: the epoch is created at random when the hash is missing
//!   (first publish, Redis flushed or restarted without its data, or the channel idle for
//!   [`META_TTL`]) or was written by another Redis process (`run` is the server's `run_id`,
//!   read by the scripts from `INFO server`: a restart that reloaded an RDB/AOF snapshot, or
//!   a failover, brings back an older offset counter, so its offsets would be reused), and
//!   with it the offset counter restarts at 1 and the stream is emptied; a read finds no
//!   epoch in a hash of another process;
//! - a stream whose entry ids are `<offset>-0`, holding the encoded `message` frame, trimmed
//!   to the family's `max_len` (approximately, as `MAXLEN ~` does) and `max_age`.
//!
//! One Lua script assigns the offset, appends, trims and publishes the frame on the channel's
//! pub/sub shard, so offsets are in publish order and nothing is appended that is not also
//! published (or the reverse). A subscriber that sees an offset jump reads the stream.
//! Another ([`ROTATE`]) ends a channel's epoch after an instance delivered messages on it only
//! locally while Redis could not take them (see `Realtime::heal`).
//!
//! **Without Redis** (embedded or unified mode: one instance), the same behaviour in process:
//! a bounded log per channel under one lock and an epoch drawn when the process starts (a
//! restart is a new epoch: resuming clients get a `gap`, never a silent hole).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cascade_core::cache::buckets;
use cascade_core::redis::Redis;

use crate::channel::Channel;
use crate::config::HistoryLimit;
use crate::hub::Hub;

/// A channel's epoch and offset counter outlive its history for this long after its last
/// publish, so a client that was away longer than the history but shorter than this learns
/// the exact range it missed rather than "everything of an ended epoch".
const META_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// One published message, as every subscriber receives it.
#[derive(Debug)]
pub struct Delivery {
    pub channel: Arc<str>,
    pub epoch: Arc<str>,
    /// The message's offset in `epoch`; for a local message (`durable` false), its number
    /// among this instance's local publishes (see `resume::Sub::local_floor`).
    pub offset: u64,
    /// The `message` frame, encoded once (empty for a rotation notice, offset 0: the
    /// channel's epoch changed, read the history).
    pub frame: Bytes,
    /// False for a message delivered only on this instance while Redis could not take it
    /// (`offset: null`, `"durable": false` in its frame; `epoch` unused).
    pub durable: bool,
}

/// A channel's history after some offset, read atomically with its head.
#[derive(Debug, Default)]
pub struct History {
    /// `None`: the channel has no epoch (nothing published since its data was lost).
    pub epoch: Option<Arc<str>>,
    /// The last offset assigned.
    pub head: u64,
    /// Messages after the offset asked for, oldest first, at most the count asked for (the
    /// newest ones when more are held).
    pub items: Vec<Arc<Delivery>>,
    /// The epoch began when an instance came back from a degraded period (messages delivered
    /// only where they were published): a client from an earlier epoch gets a `gap` with
    /// reason `degraded`.
    pub degraded: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Redis: {0}")]
    Redis(String),
}

pub enum Store {
    Redis(Box<RedisStore>),
    Memory(MemoryStore),
}

impl Store {
    /// Assigns the next offset of `channel` to `payload` (JSON text), keeps it in the history
    /// and delivers it to every instance's subscribers.
    pub async fn publish(
        &self,
        channel: &Channel,
        payload: &str,
        limit: HistoryLimit,
        hub: &Hub,
    ) -> Result<(Arc<str>, u64), StoreError> {
        match self {
            Store::Redis(store) => store.publish(channel, payload, limit, hub).await,
            Store::Memory(store) => Ok(store.publish(channel, payload, limit, hub)),
        }
    }

    /// The history of `channel` after `after` (or after `head - limit` when `after` is
    /// further behind): at most `count` messages, oldest first; `count` 0 reads only the
    /// epoch and head.
    pub async fn read(
        &self,
        channel: &str,
        after: u64,
        count: u64,
        limit: u64,
    ) -> Result<History, StoreError> {
        match self {
            Store::Redis(store) => store.read(channel, after, count, limit).await,
            Store::Memory(store) => Ok(store.read(channel, after, count, limit)),
        }
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn fresh_epoch() -> String {
    format!("{:016x}", fastrand::u64(..))
}

// ---------------------------------------------------------------------------------------------
// Redis

/// KEYS: meta hash, stream. ARGV: channel, payload, now ms, max len, max age ms, a fresh
/// epoch, the pub/sub channel (empty on a Redis Cluster: see [`RedisStore::publish`]), meta
/// ttl ms. Channel names need no JSON escaping (see
/// `channel.rs`: `[A-Za-z0-9_:-]`), epochs are hex.
const PUBLISH: &str = r#"
local run = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
local m = redis.call('HMGET', KEYS[1], 'epoch', 'run')
local epoch = m[1]
if not epoch or m[2] ~= run then
  epoch = ARGV[6]
  redis.call('DEL', KEYS[2])
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0, 'run', run)
end
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
local frame = '{"type":"message","channel":"' .. ARGV[1] .. '","offset":' .. offset ..
  ',"epoch":"' .. epoch .. '","time":' .. ARGV[3] .. ',"payload":' .. ARGV[2] .. '}'
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], offset .. '-0', 't', ARGV[3], 'f', frame)
local cutoff = tonumber(ARGV[3]) - tonumber(ARGV[5])
for i = 1, 100 do
  local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
  if #first == 0 or tonumber(first[1][2][2]) >= cutoff then break end
  redis.call('XDEL', KEYS[2], first[1][1])
end
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[8])
if ARGV[7] ~= '' then
  redis.call('PUBLISH', ARGV[7], ARGV[1] .. '\n' .. epoch .. '\n' .. offset .. '\n' .. frame)
end
return {epoch, offset}
"#;

/// KEYS: meta hash, stream. ARGV: after, count, limit. Reads at most `count` messages after
/// `after`, or after `head - limit` when the client is further behind than `limit`. Returns
/// nil without an epoch, else {epoch, head, {id, frame, id, frame, ...}, why} (`why`:
/// `degraded` for an epoch begun by [`ROTATE`], else empty).
const READ: &str = r#"
local run = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
local m = redis.call('HMGET', KEYS[1], 'epoch', 'offset', 'why', 'run')
if not m[1] or m[4] ~= run then return false end
local head = tonumber(m[2])
local after = tonumber(ARGV[1])
local count = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local out = {}
if count > 0 and head > after then
  if head - after > limit then after = head - limit end
  local start = '-'
  if after > 0 then start = '(' .. after .. '-0' end
  local items = redis.call('XRANGE', KEYS[2], start, '+', 'COUNT', count)
  for _, e in ipairs(items) do
    out[#out + 1] = e[1]
    out[#out + 1] = e[2][4]
  end
end
return {m[1], m[2], out, m[3] or ''}
"#;

/// KEYS: meta hash, stream. ARGV: channel, a fresh epoch, meta ttl ms, the pub/sub channel
/// (empty on a Redis Cluster, as for [`PUBLISH`]).
/// Ends the channel's epoch after a degraded period (messages some instance delivered only
/// locally): a new epoch marked `why=degraded`, the history emptied, and a notice (offset 0,
/// no frame) on the shard so every subscriber reads the history and gets its `gap` now.
const ROTATE: &str = r#"
local run = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
redis.call('DEL', KEYS[2])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'epoch', ARGV[2], 'offset', 0, 'why', 'degraded', 'run', run)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if ARGV[4] ~= '' then
  redis.call('PUBLISH', ARGV[4], ARGV[1] .. '\n' .. ARGV[2] .. '\n0\n')
end
return 1
"#;

pub struct RedisStore {
    redis: Redis,
    prefix: String,
    shards: usize,
    /// Each shard's pub/sub channel (see [`RedisStore::shard_channel`]).
    channels: Vec<String>,
    publish: redis::Script,
    read: redis::Script,
    rotate: redis::Script,
}

impl RedisStore {
    pub fn new(redis: Redis, key_prefix: &str, shards: usize) -> RedisStore {
        let prefix = format!("{key_prefix}rt:");
        let channels = (0..shards)
            .map(|n| match redis.is_cluster() {
                true => format!("{prefix}shard:{n}{}", buckets::spread_tag(n, shards)),
                false => format!("{prefix}shard:{n}"),
            })
            .collect();
        RedisStore {
            redis,
            prefix,
            shards,
            channels,
            publish: redis::Script::new(PUBLISH),
            read: redis::Script::new(READ),
            rotate: redis::Script::new(ROTATE),
        }
    }

    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    /// The pub/sub channel of shard `n`: `{prefix}rt:shard:{n}`. On a Redis Cluster, where
    /// pub/sub is sharded (a channel lives on its slot's master), followed by a hash tag that
    /// puts shard `n` of `WS_REDIS_SHARDS` in the `n`-th share of the slots, so the shards
    /// spread over the masters ([`buckets::spread_tag`]).
    pub fn shard_channel(&self, n: usize) -> &str {
        &self.channels[n]
    }

    /// Every shard's pub/sub channel, shard 0 first.
    pub fn shard_channels(&self) -> &[String] {
        &self.channels
    }

    /// The pub/sub channel the scripts publish on: none on a Redis Cluster, where a script
    /// may only touch its keys' slot and the shard channel is elsewhere; the publish is then
    /// an `SPUBLISH` of its own ([`Self::spublish`]).
    fn script_channel(&self, shard: usize) -> &str {
        match self.redis.is_cluster() {
            true => "",
            false => self.shard_channel(shard),
        }
    }

    /// On a Redis Cluster, `SPUBLISH`es what the script stored. Should it fail (the message is
    /// kept but not announced), the error makes the publisher deliver it locally and end the
    /// channel's epoch once Redis answers (`Realtime::heal`): other instances' subscribers get
    /// a `gap`, never a silent hole.
    async fn spublish(&self, shard: usize, envelope: String) -> Result<(), StoreError> {
        if self.redis.is_cluster() {
            self.redis
                .publish(self.shard_channel(shard), envelope)
                .await
                .map_err(|e| StoreError::Redis(format!("SPUBLISH: {e}")))?;
        }
        Ok(())
    }

    /// Which shard carries `channel`: the same on every instance (FNV-1a, not a seeded hash).
    pub fn shard_of(&self, channel: &str) -> usize {
        shard_of(channel, self.shards)
    }

    fn keys(&self, channel: &str) -> (String, String) {
        (
            format!("{}{{{channel}}}:m", self.prefix),
            format!("{}{{{channel}}}:h", self.prefix),
        )
    }

    async fn publish(
        &self,
        channel: &Channel,
        payload: &str,
        limit: HistoryLimit,
        _hub: &Hub,
    ) -> Result<(Arc<str>, u64), StoreError> {
        let (meta, stream) = self.keys(channel.name());
        let shard = self.shard_of(channel.name());
        let now = now_ms();
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.publish.get_hash())
            .arg(2)
            .arg(&meta)
            .arg(&stream)
            .arg(channel.name())
            .arg(payload)
            .arg(now)
            .arg(limit.max_len)
            .arg(limit.max_age.as_millis() as u64)
            .arg(fresh_epoch())
            .arg(self.script_channel(shard))
            .arg(META_TTL.max(limit.max_age).as_millis() as u64);
        let (epoch, offset): (String, u64) = self
            .redis
            .eval(&self.publish, &cmd)
            .await
            .map_err(|e| StoreError::Redis(e.to_string()))?;
        if self.redis.is_cluster() {
            // The frame the script stored: channel names and epochs need no JSON escaping.
            let frame = crate::protocol::message(channel.name(), &epoch, offset, now, payload);
            let envelope = format!("{}\n{epoch}\n{offset}\n{frame}", channel.name());
            self.spublish(shard, envelope).await?;
        }
        Ok((epoch.into(), offset))
    }

    async fn read(
        &self,
        channel: &str,
        after: u64,
        count: u64,
        limit: u64,
    ) -> Result<History, StoreError> {
        let (meta, stream) = self.keys(channel);
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.read.get_hash())
            .arg(2)
            .arg(&meta)
            .arg(&stream)
            .arg(after)
            .arg(count)
            .arg(limit);
        let found: Option<(String, u64, Vec<String>, String)> = self
            .redis
            .eval(&self.read, &cmd)
            .await
            .map_err(|e| StoreError::Redis(e.to_string()))?;
        let Some((epoch, head, flat, why)) = found else {
            return Ok(History::default());
        };
        let epoch: Arc<str> = epoch.into();
        let channel: Arc<str> = channel.into();
        let items = flat
            .chunks_exact(2)
            .filter_map(|pair| {
                let offset = pair[0].split_once('-')?.0.parse().ok()?;
                Some(Arc::new(Delivery {
                    channel: channel.clone(),
                    epoch: epoch.clone(),
                    offset,
                    frame: Bytes::from(pair[1].clone()),
                    durable: true,
                }))
            })
            .collect();
        Ok(History {
            epoch: Some(epoch),
            head,
            items,
            degraded: why == "degraded",
        })
    }

    /// Starts a new epoch of `channel` after a degraded period (see [`ROTATE`]).
    pub async fn rotate(&self, channel: &str) -> Result<(), StoreError> {
        let (meta, stream) = self.keys(channel);
        let shard = self.shard_of(channel);
        let epoch = fresh_epoch();
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.rotate.get_hash())
            .arg(2)
            .arg(&meta)
            .arg(&stream)
            .arg(channel)
            .arg(&epoch)
            .arg(META_TTL.as_millis() as u64)
            .arg(self.script_channel(shard));
        let _: i64 = self
            .redis
            .eval(&self.rotate, &cmd)
            .await
            .map_err(|e| StoreError::Redis(e.to_string()))?;
        // A failed notice fails the rotation: the heal task rotates again.
        self.spublish(shard, format!("{channel}\n{epoch}\n0\n"))
            .await
    }
}

/// FNV-1a of the name, modulo `shards`.
pub fn shard_of(channel: &str, shards: usize) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in channel.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % shards.max(1) as u64) as usize
}

/// Parses what the publish script sends on a shard: `channel \n epoch \n offset \n frame`.
pub fn parse_envelope(payload: &[u8]) -> Option<Delivery> {
    let mut parts = payload.splitn(4, |b| *b == b'\n');
    let channel = std::str::from_utf8(parts.next()?).ok()?;
    let epoch = std::str::from_utf8(parts.next()?).ok()?;
    let offset = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let frame = parts.next()?;
    Some(Delivery {
        channel: channel.into(),
        epoch: epoch.into(),
        offset,
        frame: Bytes::copy_from_slice(frame),
        durable: true,
    })
}

// ---------------------------------------------------------------------------------------------
// In process

pub struct MemoryStore {
    epoch: Arc<str>,
    logs: Mutex<HashMap<Arc<str>, Log>>,
}

struct Log {
    head: u64,
    /// (publish time ms, message), oldest first.
    items: VecDeque<(i64, Arc<Delivery>)>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            epoch: fresh_epoch().into(),
            logs: Mutex::new(HashMap::new()),
        }
    }
}

impl MemoryStore {
    /// Delivered under the lock, so subscribers see each channel's offsets in order.
    fn publish(
        &self,
        channel: &Channel,
        payload: &str,
        limit: HistoryLimit,
        hub: &Hub,
    ) -> (Arc<str>, u64) {
        let now = now_ms();
        let mut logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        let log = logs.entry(channel.shared_name()).or_insert_with(|| Log {
            head: 0,
            items: VecDeque::new(),
        });
        log.head += 1;
        let offset = log.head;
        let frame = crate::protocol::message(channel.name(), &self.epoch, offset, now, payload);
        let delivery = Arc::new(Delivery {
            channel: channel.shared_name(),
            epoch: self.epoch.clone(),
            offset,
            frame: Bytes::from(frame),
            durable: true,
        });
        log.items.push_back((now, delivery.clone()));
        let cutoff = now - limit.max_age.as_millis() as i64;
        while log.items.len() as u64 > limit.max_len
            || log.items.front().is_some_and(|(t, _)| *t < cutoff)
        {
            log.items.pop_front();
        }
        hub.deliver(delivery);
        (self.epoch.clone(), offset)
    }

    fn read(&self, channel: &str, after: u64, count: u64, limit: u64) -> History {
        let logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        let Some(log) = logs.get(channel) else {
            return History::default();
        };
        let after = after.max(log.head.saturating_sub(limit));
        let items = log
            .items
            .iter()
            .filter(|(_, d)| d.offset > after)
            .take(count as usize)
            .map(|(_, d)| d.clone())
            .collect();
        History {
            epoch: Some(self.epoch.clone()),
            head: log.head,
            items,
            degraded: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_split_on_the_first_three_newlines_only() {
        let d = parse_envelope(b"space:a\nabc\n42\n{\"x\":\"a\\nb\"}\n").unwrap();
        assert_eq!(&*d.channel, "space:a");
        assert_eq!(&*d.epoch, "abc");
        assert_eq!(d.offset, 42);
        assert_eq!(&d.frame[..], b"{\"x\":\"a\\nb\"}\n");
        assert!(parse_envelope(b"a\nb\nnot-a-number\n{}").is_none());
    }

    #[test]
    fn shards_are_stable_and_spread() {
        assert_eq!(shard_of("cascade-events", 4), shard_of("cascade-events", 4));
        let used: std::collections::HashSet<usize> = (0..64)
            .map(|n| shard_of(&format!("space:{n}"), 4))
            .collect();
        assert_eq!(used.len(), 4);
    }
}
