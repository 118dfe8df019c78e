//! Moving the shared tier from Redis to PostgreSQL (`cascade migrate-to-unified`, seed 002's
//! migration script): what Redis holds is read, written to `cache_entries` with its remaining
//! TTL and its tags, and read back.
//!
//! Which keys are cache values: every value the Redis tier stores is listed in the sorted set
//! of each of its tags, its namespace's (`<prefix>tag:ns:<namespace>`) included
//! (`redis_tier.rs`), so the tag sets name every value key and give each its tags, without
//! guessing from key names what else (rate limits, the bus, real-time history) shares the
//! prefix. A listed key whose value is gone (expired, or a lease never filled) is skipped.
//!
//! Sessions are not here on purpose: their truth is PostgreSQL (`auth_sessions`,
//! `auth_refresh_tokens`); Redis only ever held cached copies (namespace `sessions`), which
//! are copied like any other entry.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::db::{Db, DbError};
use crate::redis::{Redis, RedisError};

/// Keys read from Redis per round trip.
const BATCH: usize = 500;

/// A live value read from Redis.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The key without the prefix, as both tiers name it (`<namespace key name>:<key>`).
    pub key: String,
    /// The stored bytes (header and payload), the same form on both tiers.
    pub value: Vec<u8>,
    /// Sorted, `ns:<namespace>` included.
    pub tags: Vec<String>,
    /// What the value had left when it was read.
    pub ttl: Duration,
}

/// What Redis holds under the prefix.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub entries: Vec<Entry>,
    /// Keys listed in a tag set whose value had expired (or was never filled).
    pub expired: Vec<String>,
    /// When the values were read: their TTLs count from here.
    pub read_at: Option<Instant>,
}

impl Snapshot {
    /// Keys looked at: copied candidates and expired ones.
    pub fn read(&self) -> usize {
        self.entries.len() + self.expired.len()
    }
}

/// A row of `cache_entries` as it was before the copy (what `--backup` keeps).
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub key: String,
    pub value: Vec<u8>,
    pub tags: Vec<String>,
    /// Unix milliseconds.
    pub expires_at_ms: i64,
}

/// The result of the write.
#[derive(Debug, Default)]
pub struct Copied {
    pub copied: Vec<String>,
    /// Live when read, expired by the time it would have been written.
    pub expired: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("Redis: {0}")]
    Redis(#[from] RedisError),
    #[error("PostgreSQL: {0}")]
    Db(#[from] DbError),
}

impl From<redis::RedisError> for MigrateError {
    fn from(err: redis::RedisError) -> Self {
        MigrateError::Redis(RedisError::Command(err))
    }
}

impl From<tokio_postgres::Error> for MigrateError {
    fn from(err: tokio_postgres::Error) -> Self {
        MigrateError::Db(DbError::from(err))
    }
}

/// `pattern` matched literally by `SCAN MATCH`.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Runs a pipeline under the client's deadline.
async fn pipeline<T: redis::FromRedisValue>(
    redis: &Redis,
    pipe: &redis::Pipeline,
) -> Result<T, MigrateError> {
    // A batch carries many commands: give it several times one command's deadline.
    let bound = redis.timeout() * 10;
    let run = async {
        let mut conn = redis.connection().await?;
        Ok::<T, MigrateError>(pipe.query_async(&mut conn).await?)
    };
    match tokio::time::timeout(bound, run).await {
        Ok(result) => result,
        Err(_) => Err(RedisError::Timeout(bound).into()),
    }
}

/// Every value key listed in the tag sets under `prefix`, with its tags.
async fn listed_keys(
    redis: &Redis,
    prefix: &str,
) -> Result<BTreeMap<String, BTreeSet<String>>, MigrateError> {
    let tag_prefix = format!("{prefix}tag:");
    let pattern = format!("{}*", glob_escape(&tag_prefix));
    let mut cursor: u64 = 0;
    let mut sets = Vec::new();
    loop {
        let (next, keys): (u64, Vec<String>) = redis
            .query(
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000),
            )
            .await?;
        sets.extend(keys);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    sets.sort();
    sets.dedup();
    let mut listed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for set in &sets {
        let tag = &set[tag_prefix.len()..];
        let kind: String = redis.query(redis::cmd("TYPE").arg(set)).await?;
        // Sorted sets today; plain sets from before tag sets were sorted.
        let members: Vec<String> = match kind.as_str() {
            "zset" => {
                redis
                    .query(redis::cmd("ZRANGE").arg(set).arg(0).arg(-1))
                    .await?
            }
            "set" => redis.query(redis::cmd("SMEMBERS").arg(set)).await?,
            _ => continue,
        };
        for member in members {
            if let Some(key) = member.strip_prefix(prefix) {
                listed
                    .entry(key.to_string())
                    .or_default()
                    .insert(tag.to_string());
            }
        }
    }
    Ok(listed)
}

/// Reads every live cache value under `prefix` (`CACHE_KEY_PREFIX`) with its remaining TTL.
pub async fn read_redis(redis: &Redis, prefix: &str) -> Result<Snapshot, MigrateError> {
    if redis.is_cluster() {
        // SCAN on a cluster client reaches one node: the migration would copy a part silently.
        return Err(RedisError::Config(
            "migrate-to-unified reads one Redis server; REDIS_CLUSTER_URLS names a Redis Cluster"
                .into(),
        )
        .into());
    }
    let listed = listed_keys(redis, prefix).await?;
    let mut snapshot = Snapshot {
        read_at: Some(Instant::now()),
        ..Snapshot::default()
    };
    let keys: Vec<(String, BTreeSet<String>)> = listed.into_iter().collect();
    for batch in keys.chunks(BATCH) {
        let mut pipe = redis::pipe();
        for (key, _) in batch {
            let full = format!("{prefix}{key}");
            pipe.cmd("GET").arg(&full).cmd("PTTL").arg(&full);
        }
        let replies: Vec<redis::Value> = pipeline(redis, &pipe).await?;
        for ((key, tags), pair) in batch.iter().zip(replies.chunks(2)) {
            let value: Option<Vec<u8>> =
                redis::from_redis_value(pair[0].clone()).map_err(redis::RedisError::from)?;
            let ttl_ms: i64 =
                redis::from_redis_value(pair[1].clone()).map_err(redis::RedisError::from)?;
            match value {
                // -1 (no expiry) never happens to a cache value; -2 is gone.
                Some(value) if ttl_ms > 0 => snapshot.entries.push(Entry {
                    key: key.clone(),
                    value,
                    tags: tags.iter().cloned().collect(),
                    ttl: Duration::from_millis(ttl_ms as u64),
                }),
                _ => snapshot.expired.push(key.clone()),
            }
        }
    }
    Ok(snapshot)
}

/// The rows of `cache_entries` the copy of `keys` would replace (expired ones included: the
/// copy replaces them too).
pub async fn existing_rows(db: &Db, keys: &[String]) -> Result<Vec<Row>, MigrateError> {
    let conn = db.conn().await?;
    let rows = conn
        .query(
            "SELECT key, value, tags, (extract(epoch FROM expires_at) * 1000)::int8
             FROM cache_entries WHERE key = ANY($1) ORDER BY key",
            &[&keys],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Row {
            key: r.get(0),
            value: r.get(1),
            tags: r.get(2),
            expires_at_ms: r.get(3),
        })
        .collect())
}

/// Writes `snapshot`'s entries into `cache_entries` in one transaction, each expiring when
/// it would have in Redis (its TTL less the time since it was read).
pub async fn write_postgres(db: &Db, snapshot: &Snapshot) -> Result<Copied, MigrateError> {
    let read_at = snapshot.read_at.unwrap_or_else(Instant::now);
    let mut conn = db.conn().await?;
    let tx = conn.transaction().await?;
    let statement = tx
        .prepare(
            "INSERT INTO cache_entries (key, value, tags, expires_at)
             VALUES ($1, $2, $3, now() + make_interval(secs => $4::float8 / 1000))
             ON CONFLICT (key) DO UPDATE
               SET value = EXCLUDED.value, tags = EXCLUDED.tags, expires_at = EXCLUDED.expires_at",
        )
        .await?;
    let mut copied = Copied::default();
    for entry in &snapshot.entries {
        let left = entry.ttl.saturating_sub(read_at.elapsed());
        if left.is_zero() {
            copied.expired.push(entry.key.clone());
            continue;
        }
        let ms = left.as_millis() as f64;
        tx.execute(&statement, &[&entry.key, &entry.value, &entry.tags, &ms])
            .await?;
        copied.copied.push(entry.key.clone());
    }
    tx.commit().await?;
    Ok(copied)
}

/// Re-reads the copied keys from PostgreSQL: the keys whose row is missing, expired, or not
/// what Redis held (value or tags).
pub async fn verify(
    db: &Db,
    snapshot: &Snapshot,
    copied: &[String],
) -> Result<Vec<String>, MigrateError> {
    let rows: BTreeMap<String, Row> = existing_rows(db, copied)
        .await?
        .into_iter()
        .map(|r| (r.key.clone(), r))
        .collect();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let wanted: BTreeSet<&String> = copied.iter().collect();
    Ok(snapshot
        .entries
        .iter()
        .filter(|e| wanted.contains(&e.key))
        .filter(|e| {
            rows.get(&e.key).is_none_or(|row| {
                row.value != e.value || row.tags != e.tags || row.expires_at_ms <= now_ms
            })
        })
        .map(|e| e.key.clone())
        .collect())
}

/// Live sessions in PostgreSQL (`auth_sessions`): the truth sessions are read from in every
/// mode, so none needs copying.
pub async fn live_sessions(db: &Db) -> Result<i64, MigrateError> {
    let conn = db.conn().await?;
    Ok(conn
        .query_one(
            "SELECT count(*) FROM auth_sessions WHERE revoked_at IS NULL AND expires_at > now()",
            &[],
        )
        .await?
        .get(0))
}
