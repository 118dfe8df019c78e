//! The Redis tier: values, leases and tag sets, each multi-step operation one atomic Lua script.
//!
//! Keys (under the configured prefix `P`, e.g. `cascade:`):
//! - `P{ns}:{key}` — the value, with a one-byte header (`V` value, `N` cached not-found);
//! - `Please:P{ns}:{key}` — the lease: which loader may fill the key right now;
//! - `Ptag:{tag}` — a set of the value keys carrying the tag (namespaces are the tag `ns:{ns}`).
//!
//! The lease is what makes cache-aside safe ("Scaling Memcache at Facebook", NSDI 2013): a
//! miss hands out a token; invalidation deletes the value *and* the lease; a fill succeeds only
//! while its token is still the lease. A loader that read the old row before a write
//! therefore cannot install it after the write's invalidation.

use std::time::Duration;

use redis::Script;

use crate::redis::{Redis, RedisError};

/// What a lookup found.
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
    get_or_lease: Script,
    try_lease: Script,
    fill: Script,
    set: Script,
    invalidate_tags: Script,
}

/// Enters `KEYS[1]` in the tag sets `KEYS[3..]`, keeping each set alive at least `ttl` ms.
/// Prepended to every script that grants a lease or stores a value.
const INDEX_TAGS: &str = r"
local function index_tags(ttl)
  for i = 3, #KEYS do
    redis.call('SADD', KEYS[i], KEYS[1])
    if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
  end
end
";

/// On a miss the lease is granted and the key is entered in its tag sets at once, so a tag or
/// namespace invalidation during the load deletes the lease and the fill is refused.
const GET_OR_LEASE: &str = r"
local v = redis.call('GET', KEYS[1])
if v then return v end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  index_tags(tonumber(ARGV[2]))
  return 'L'
end
return 'W'
";

/// A lease on a key that still has a value: early refresh and revalidation.
const TRY_LEASE: &str = r"
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  index_tags(tonumber(ARGV[2]))
  return 1
end
return 0
";

/// Shared by FILL (guarded by the lease) and SET (unconditional): store, index tags.
const STORE: &str = r"
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
redis.call('DEL', KEYS[2])
index_tags(tonumber(ARGV[2]))
return 1
";

/// Every tag set in KEYS: its members (values and their leases) and the set itself.
const INVALIDATE_TAGS: &str = r"
local n = 0
for _, tag in ipairs(KEYS) do
  local members = redis.call('SMEMBERS', tag)
  for _, k in ipairs(members) do
    redis.call('DEL', k)
    redis.call('DEL', ARGV[1] .. k)
  end
  redis.call('DEL', tag)
  n = n + #members
end
return n
";

impl RedisTier {
    pub fn new(redis: Redis, prefix: String) -> Self {
        let fill = format!(
            "{INDEX_TAGS}if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end\n{STORE}"
        );
        RedisTier {
            redis,
            prefix,
            get_or_lease: Script::new(&format!("{INDEX_TAGS}{GET_OR_LEASE}")),
            try_lease: Script::new(&format!("{INDEX_TAGS}{TRY_LEASE}")),
            fill: Script::new(&fill),
            set: Script::new(&format!("{INDEX_TAGS}{STORE}")),
            invalidate_tags: Script::new(INVALIDATE_TAGS),
        }
    }

    pub fn value_key(&self, full_key: &str) -> String {
        format!("{}{full_key}", self.prefix)
    }

    fn lease_key(&self, value_key: &str) -> String {
        format!("{}lease:{value_key}", self.prefix)
    }

    fn tag_key(&self, tag: &str) -> String {
        format!("{}tag:{tag}", self.prefix)
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<T, RedisError> {
        self.redis.invoke(&invocation).await
    }

    pub async fn lookup(
        &self,
        full_key: &str,
        tags: &[String],
        token: &str,
        lease_ttl: Duration,
    ) -> Result<Lookup, RedisError> {
        let key = self.value_key(full_key);
        // Hits are the common case: a plain GET, as cheap as Redis gets. Only a miss pays for
        // the script that grants the lease.
        let hit: Option<Vec<u8>> = self.redis.query(redis::cmd("GET").arg(&key)).await?;
        if let Some(bytes) = hit {
            return Ok(Lookup::Hit(bytes));
        }
        let mut invocation = self.get_or_lease.prepare_invoke();
        invocation.key(&key).key(self.lease_key(&key));
        for tag in tags {
            invocation.key(self.tag_key(tag));
        }
        invocation.arg(token).arg(lease_ttl.as_millis() as u64);
        let bytes: Vec<u8> = self.run(invocation).await?;
        Ok(match bytes.as_slice() {
            b"L" => Lookup::Lease,
            b"W" => Lookup::Wait,
            _ => Lookup::Hit(bytes),
        })
    }

    /// Takes the lease of a key whatever its value (early refresh); false if someone holds it.
    pub async fn try_lease(
        &self,
        full_key: &str,
        tags: &[String],
        token: &str,
        lease_ttl: Duration,
    ) -> Result<bool, RedisError> {
        let key = self.value_key(full_key);
        let mut invocation = self.try_lease.prepare_invoke();
        invocation.key(&key).key(self.lease_key(&key));
        for tag in tags {
            invocation.key(self.tag_key(tag));
        }
        invocation.arg(token).arg(lease_ttl.as_millis() as u64);
        let granted: i64 = self.run(invocation).await?;
        Ok(granted == 1)
    }

    /// Plain read, no lease (for waiters).
    pub async fn get(&self, full_key: &str) -> Result<Option<Vec<u8>>, RedisError> {
        self.redis
            .query(redis::cmd("GET").arg(self.value_key(full_key)))
            .await
    }

    /// Stores `bytes` if `token` is still the lease (`Some`) or unconditionally (`None`).
    /// Returns whether it was stored.
    pub async fn store(
        &self,
        full_key: &str,
        token: Option<&str>,
        bytes: &[u8],
        ttl: Duration,
        tags: &[String],
    ) -> Result<bool, RedisError> {
        let key = self.value_key(full_key);
        let script = if token.is_some() {
            &self.fill
        } else {
            &self.set
        };
        let mut invocation = script.prepare_invoke();
        invocation.key(&key).key(self.lease_key(&key));
        for tag in tags {
            invocation.key(self.tag_key(tag));
        }
        invocation
            .arg(token.unwrap_or(""))
            .arg(ttl.as_millis().max(1) as u64)
            .arg(bytes);
        let stored: i64 = self.run(invocation).await?;
        Ok(stored == 1)
    }

    /// Deletes the values and leases of `full_keys`, in one command.
    pub async fn invalidate_keys(&self, full_keys: &[String]) -> Result<(), RedisError> {
        let mut del = redis::cmd("DEL");
        for full_key in full_keys {
            let key = self.value_key(full_key);
            del.arg(self.lease_key(&key)).arg(key);
        }
        self.redis.query(&del).await
    }

    /// Removes every value carrying any of `tags`, in one script.
    pub async fn invalidate_tags(&self, tags: &[String]) -> Result<u64, RedisError> {
        let mut invocation = self.invalidate_tags.prepare_invoke();
        for tag in tags {
            invocation.key(self.tag_key(tag));
        }
        invocation.arg(format!("{}lease:", self.prefix));
        self.run(invocation).await
    }
}
