//! The SQL of `consciousness_patterns` (app migration 2, `migrations/0002_patterns.sql`): one
//! row per pattern type, replaced in place by each refresh.
//!
//! A refresh tells whether the content changed in the same statement that writes it: the
//! row keeps an MD5 of its `pattern_data` (jsonb's text form, which orders keys, so equal
//! content is equal text), and the update bumps `version` and `changed_at` only when the new
//! hash differs. `changed_at = cached_at` after the statement then means "changed now" (both
//! are the statement's `now()`); a first insert is version 1 and is not a change.

use std::time::Duration;

use cascade_core::db::{Db, DbError};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A stored pattern, as served and cached.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Pattern {
    pub id: i64,
    /// The pattern type.
    #[serde(rename = "type")]
    #[schema(pattern = "^(collective_activity|economic_consciousness|social_consciousness)$")]
    pub pattern_type: String,
    /// The Venice endpoint it was computed from, e.g. `/citizens`.
    pub venice_source: String,
    /// 1 for the first content, bumped by each refresh that changed it.
    #[schema(minimum = 1)]
    pub version: i64,
    /// RFC 3339, UTC: when Venice's data was last read into it, when its content last
    /// changed, when it must be read again.
    pub cached_at: String,
    pub changed_at: String,
    pub expires_at: String,
    /// `expires_at` in Unix milliseconds (what a cached copy is checked against).
    pub expires_at_ms: i64,
    /// `cached_at` in Unix milliseconds.
    pub cached_at_ms: i64,
    /// What the transform computed: counts, `venice_citizens` (the five citizens who weigh
    /// most) and `emergence_score` in [0, 1] (`transform.rs`, the README).
    #[schema(value_type = cascade_http::openapi::JsonObject)]
    pub data: Value,
}

/// The columns every query returns, in [`Pattern::from_row`]'s order.
const COLUMNS: &str = "id::int8, pattern_type::text, venice_source::text, version, \
     to_char(cached_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
     to_char(changed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
     to_char(expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
     (extract(epoch FROM expires_at) * 1000)::int8, \
     (extract(epoch FROM cached_at) * 1000)::int8, \
     pattern_data";

impl Pattern {
    fn from_row(row: &tokio_postgres::Row) -> Result<Pattern, tokio_postgres::Error> {
        Ok(Pattern {
            id: row.try_get(0)?,
            pattern_type: row.try_get(1)?,
            venice_source: row.try_get(2)?,
            version: row.try_get(3)?,
            cached_at: row.try_get(4)?,
            changed_at: row.try_get(5)?,
            expires_at: row.try_get(6)?,
            expires_at_ms: row.try_get(7)?,
            cached_at_ms: row.try_get(8)?,
            data: row.try_get(9)?,
        })
    }

    /// Not to be served as fresh any more.
    pub fn expired(&self) -> bool {
        self.expires_at_ms <= now_ms()
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The stored pattern of `pattern_type`, expired or not.
pub async fn find(db: &Db, pattern_type: &str) -> Result<Option<Pattern>, DbError> {
    let conn = db.conn().await?;
    let sql = format!("SELECT {COLUMNS} FROM consciousness_patterns WHERE pattern_type = $1");
    let row = conn.query_opt(&sql, &[&pattern_type]).await?;
    Ok(row.map(|r| Pattern::from_row(&r)).transpose()?)
}

/// A pattern written, and whether its content differs from what was stored before.
pub struct Stored {
    pub pattern: Pattern,
    pub changed: bool,
}

/// Inserts or replaces the pattern of `pattern_type`, expiring `ttl` from now.
pub async fn upsert(
    db: &Db,
    pattern_type: &str,
    venice_source: &str,
    data: &Value,
    ttl: Duration,
) -> Result<Stored, DbError> {
    let conn = db.conn().await?;
    let sql = format!(
        "INSERT INTO consciousness_patterns AS p \
             (pattern_type, venice_source, pattern_data, content_hash, \
              cached_at, changed_at, expires_at, version) \
         VALUES ($1, $2, $3, md5($3::jsonb::text), now(), now(), \
                 now() + make_interval(secs => $4::float8), 1) \
         ON CONFLICT (pattern_type) DO UPDATE SET \
             venice_source = EXCLUDED.venice_source, \
             pattern_data = EXCLUDED.pattern_data, \
             content_hash = EXCLUDED.content_hash, \
             cached_at = EXCLUDED.cached_at, \
             expires_at = EXCLUDED.expires_at, \
             version = p.version + (p.content_hash IS DISTINCT FROM EXCLUDED.content_hash)::int, \
             changed_at = CASE WHEN p.content_hash IS DISTINCT FROM EXCLUDED.content_hash \
                               THEN EXCLUDED.changed_at ELSE p.changed_at END \
         RETURNING {COLUMNS}, version > 1 AND changed_at = cached_at"
    );
    let row = conn
        .query_one(
            &sql,
            &[&pattern_type, &venice_source, data, &ttl.as_secs_f64()],
        )
        .await?;
    Ok(Stored {
        pattern: Pattern::from_row(&row)?,
        changed: row.try_get(10)?,
    })
}

/// Pattern types whose row expires within `horizon` (soonest first).
pub async fn expiring(
    conn: &impl cascade_core::db::Sql,
    horizon: Duration,
) -> Result<Vec<String>, DbError> {
    let rows = conn
        .query(
            "SELECT pattern_type::text FROM consciousness_patterns \
             WHERE expires_at < now() + make_interval(secs => $1::float8) \
             ORDER BY expires_at",
            &[&horizon.as_secs_f64()],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| r.try_get::<_, String>(0).ok())
        .collect())
}
