//! The PostgreSQL tier (`CACHE_BACKEND=postgres`, seed 002's unified mode): the same lease
//! protocol as the Redis tier, on the UNLOGGED tables `cache_entries` and `cache_leases`.
//!
//! Ordering matters for the stale-set race: an invalidation deletes the *lease first*, in its
//! own statement, then the entry. A fill deletes its lease and inserts the entry in one
//! statement. If the fill wins the lease row, the entry delete that follows sees its entry
//! (a fresh snapshot); if the invalidation wins, the fill finds no lease and stores nothing.

use std::time::Duration;

use super::redis_tier::Lookup;
use crate::db::{Db, DbError};

pub(crate) struct PgTier {
    db: Db,
}

fn millis(d: Duration) -> f64 {
    d.as_millis().max(1) as f64
}

impl PgTier {
    pub fn new(db: Db) -> Self {
        PgTier { db }
    }

    pub async fn lookup(
        &self,
        full_key: &str,
        tags: &[String],
        token: &str,
        lease_ttl: Duration,
    ) -> Result<Lookup, DbError> {
        let conn = self.db.conn().await?;
        let statement = conn
            .prepare_cached(
                "WITH hit AS (
                   SELECT value FROM cache_entries WHERE key = $1 AND expires_at > now()
                 ), lease AS (
                   INSERT INTO cache_leases AS l (key, token, tags, expires_at)
                   SELECT $1, $2, $3, now() + make_interval(secs => $4::float8 / 1000)
                   WHERE NOT EXISTS (SELECT 1 FROM hit)
                   ON CONFLICT (key) DO UPDATE
                     SET token = EXCLUDED.token, tags = EXCLUDED.tags, expires_at = EXCLUDED.expires_at
                     WHERE l.expires_at <= now()
                   RETURNING token
                 )
                 SELECT (SELECT value FROM hit), (SELECT token FROM lease)",
            )
            .await?;
        let row = conn
            .query_one(&statement, &[&full_key, &token, &tags, &millis(lease_ttl)])
            .await?;
        let value: Option<Vec<u8>> = row.get(0);
        let lease: Option<String> = row.get(1);
        Ok(match (value, lease) {
            (Some(bytes), _) => Lookup::Hit(bytes),
            (None, Some(granted)) if granted == token => Lookup::Lease,
            _ => Lookup::Wait,
        })
    }

    /// Takes the lease of a key whatever its value (early refresh); false if someone holds it.
    pub async fn try_lease(
        &self,
        full_key: &str,
        tags: &[String],
        token: &str,
        lease_ttl: Duration,
    ) -> Result<bool, DbError> {
        let conn = self.db.conn().await?;
        let statement = conn
            .prepare_cached(
                "INSERT INTO cache_leases AS l (key, token, tags, expires_at)
                 VALUES ($1, $2, $3, now() + make_interval(secs => $4::float8 / 1000))
                 ON CONFLICT (key) DO UPDATE
                   SET token = EXCLUDED.token, tags = EXCLUDED.tags, expires_at = EXCLUDED.expires_at
                   WHERE l.expires_at <= now()
                 RETURNING token",
            )
            .await?;
        let row = conn
            .query_opt(&statement, &[&full_key, &token, &tags, &millis(lease_ttl)])
            .await?;
        Ok(row.is_some())
    }

    /// Gives back the lease `token` holds on `full_key`, if it still does.
    pub async fn release(&self, full_key: &str, token: &str) -> Result<bool, DbError> {
        let conn = self.db.conn().await?;
        let statement = conn
            .prepare_cached("DELETE FROM cache_leases WHERE key = $1 AND token = $2")
            .await?;
        Ok(conn.execute(&statement, &[&full_key, &token]).await? == 1)
    }

    pub async fn get(&self, full_key: &str) -> Result<Option<Vec<u8>>, DbError> {
        let conn = self.db.conn().await?;
        let statement = conn
            .prepare_cached("SELECT value FROM cache_entries WHERE key = $1 AND expires_at > now()")
            .await?;
        Ok(conn
            .query_opt(&statement, &[&full_key])
            .await?
            .map(|r| r.get(0)))
    }

    pub async fn store(
        &self,
        full_key: &str,
        token: Option<&str>,
        bytes: &[u8],
        ttl: Duration,
        tags: &[String],
    ) -> Result<bool, DbError> {
        let conn = self.db.conn().await?;
        let upsert = "ON CONFLICT (key) DO UPDATE
                        SET value = EXCLUDED.value, tags = EXCLUDED.tags, expires_at = EXCLUDED.expires_at";
        let stored = match token {
            Some(token) => {
                let sql = format!(
                    "WITH lease AS (DELETE FROM cache_leases WHERE key = $1 AND token = $5 RETURNING 1)
                     INSERT INTO cache_entries (key, value, tags, expires_at)
                     SELECT $1, $2, $3, now() + make_interval(secs => $4::float8 / 1000)
                     WHERE EXISTS (SELECT 1 FROM lease) {upsert}"
                );
                let statement = conn.prepare_cached(&sql).await?;
                conn.execute(
                    &statement,
                    &[&full_key, &bytes, &tags, &millis(ttl), &token],
                )
                .await?
            }
            None => {
                conn.execute("DELETE FROM cache_leases WHERE key = $1", &[&full_key])
                    .await?;
                let sql = format!(
                    "INSERT INTO cache_entries (key, value, tags, expires_at)
                     VALUES ($1, $2, $3, now() + make_interval(secs => $4::float8 / 1000)) {upsert}"
                );
                let statement = conn.prepare_cached(&sql).await?;
                conn.execute(&statement, &[&full_key, &bytes, &tags, &millis(ttl)])
                    .await?
            }
        };
        Ok(stored == 1)
    }

    pub async fn invalidate_keys(&self, full_keys: &[String]) -> Result<(), DbError> {
        let conn = self.db.conn().await?;
        conn.execute(
            "DELETE FROM cache_leases WHERE key = ANY($1)",
            &[&full_keys],
        )
        .await?;
        conn.execute(
            "DELETE FROM cache_entries WHERE key = ANY($1)",
            &[&full_keys],
        )
        .await?;
        Ok(())
    }

    /// Removes every entry and lease carrying any of `tags` (`&&`: arrays overlap).
    pub async fn invalidate_tags(&self, tags: &[String]) -> Result<u64, DbError> {
        let conn = self.db.conn().await?;
        conn.execute("DELETE FROM cache_leases WHERE tags && $1", &[&tags])
            .await?;
        Ok(conn
            .execute("DELETE FROM cache_entries WHERE tags && $1", &[&tags])
            .await?)
    }

    /// Removes expired entries and leases; returns how many entries went.
    pub async fn cleanup(&self) -> Result<u64, DbError> {
        let conn = self.db.conn().await?;
        conn.execute("DELETE FROM cache_leases WHERE expires_at <= now()", &[])
            .await?;
        Ok(conn
            .execute("DELETE FROM cache_entries WHERE expires_at <= now()", &[])
            .await?)
    }
}
