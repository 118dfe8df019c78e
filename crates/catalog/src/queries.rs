//! The catalog's SQL (tables: `crates/catalog/migrations/0001_catalog.sql`, owners in `0002`).
//!
//! Reads return the response body itself, built by PostgreSQL with `json_build_object` (one
//! asset's, the read misses are made of, by `asset_body` from its row, the same bytes): the
//! bytes go into the cache and out to the client unchanged, and every read is one statement
//! (one round trip when the statement is already prepared on the connection), which is what
//! the benchmark counts as "a PostgreSQL query". PostgreSQL prints JSON with spaces
//! (`"key" : value`, `[a, b]`); [`compact`] removes them once, when the body is loaded, so
//! every body is compact and the same bytes keep the same ETag.

use cascade_core::audit::{self, Change};
use cascade_core::db::Conn as Object;
use tokio_postgres::Transaction;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, Type};

use crate::error::CatalogError;
use crate::listing::ListingQuery;
use crate::model::{
    AssetChange, NewAsset, NewPolicy, NewProducer, NewReceipt, Timestamp, VersionId,
};
use crate::openlineage::RunEvent;

/// Deepest ancestry walked for readiness (and so for descendant invalidation). Lineage longer
/// than this is checked up to this depth.
pub const READY_MAX_DEPTH: i32 = 32;
/// Deepest `GET /bundle?depth=`.
pub const BUNDLE_MAX_DEPTH: i32 = 10;
/// Largest `GET /listings` page body. With metadata capped at 16 KiB, 100 items can pass it:
/// such a page ends early with a `nextCursor` (and items stored before the cap existed cannot
/// make a page a hundred times the body limit).
pub const MAX_PAGE_BYTES: usize = 1024 * 1024;
/// Room kept for what follows the items (`],"nextCursor":"<cursor>"}`).
const PAGE_TAIL_BYTES: usize = 512;

/// One asset row as the API shows it (table alias `a`).
macro_rules! asset_json {
    () => {
        "json_build_object('versionId', a.version_id, 'producerId', a.producer_id, \
         'name', a.name, 'metadata', a.metadata, \
         'createdAt', to_char(a.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
         'updatedAt', to_char(a.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'))"
    };
}

/// `asset_json!`, PostgreSQL's spelling of one asset (pages and bundles), which [`asset_body`]
/// must match byte for byte: for the test that compares them (`tests/api/bodies.rs`).
#[doc(hidden)]
pub const ASSET_JSON: &str = asset_json!();

/// The columns [`asset_body`] builds one asset's body from (table alias `a`): the reads of one
/// asset (`GET /listings/{id}`, [`asset`] and [`assets`]) build it in the server, where
/// `asset_json!`'s `json_build_object` and two `to_char` calls per row were a quarter of a
/// batched statement's time in PostgreSQL (`bench/asset-statement.sh`). The bytes are the same ones
/// (`tests/api/bodies.rs` compares them).
macro_rules! asset_columns {
    () => {
        "a.version_id, a.producer_id, a.name, a.metadata, a.created_at, a.updated_at"
    };
}

/// The ancestry of `$1` to depth `$2` (0: the version alone) as `members(version_id, depth)`,
/// each at its shortest distance. `UNION` (not `UNION ALL`) drops repeated (version, depth)
/// pairs and the depth bound ends the walk, so a cycle in the lineage cannot loop.
macro_rules! ancestry_cte {
    () => {
        "WITH RECURSIVE anc(version_id, depth) AS ( \
             SELECT $1::text, 0 \
             UNION \
             SELECT e.parent_version_id, anc.depth + 1 \
             FROM anc JOIN lineage_edges e ON e.child_version_id = anc.version_id \
             WHERE anc.depth < $2 \
         ), members AS (SELECT version_id, min(depth) AS depth FROM anc GROUP BY version_id) "
    };
}

/// Maps PostgreSQL errors a client caused to 4xx; anything else is internal.
pub fn client_error(err: tokio_postgres::Error, conflict: &str, missing: &str) -> CatalogError {
    match err.code() {
        Some(code) if *code == SqlState::UNIQUE_VIOLATION => {
            CatalogError::Conflict(conflict.into())
        }
        Some(code) if *code == SqlState::FOREIGN_KEY_VIOLATION => {
            CatalogError::NotFound(missing.into())
        }
        Some(code)
            if *code == SqlState::INVALID_DATETIME_FORMAT
                || *code == SqlState::DATETIME_FIELD_OVERFLOW =>
        {
            CatalogError::BadRequest {
                field: None,
                message: format!("a date-time is out of range: {}", err),
            }
        }
        _ => internal(err),
    }
}

pub fn internal(err: tokio_postgres::Error) -> CatalogError {
    CatalogError::query(err)
}

fn text(row: &tokio_postgres::Row) -> Vec<u8> {
    compact(row.get::<_, &str>(0))
}

/// One asset's body from the row of `asset_columns!`, byte for byte what `asset_json!`
/// makes PostgreSQL print (then [`compact`]): the same keys in the same order, strings escaped
/// as PostgreSQL's `escape_json` escapes them (serde_json's escapes are the same ones: `"`,
/// `\\`, the short control escapes, `\u00xx` in lower case for the other bytes below 0x20),
/// the metadata as `jsonb` prints it without white space, times as `to_char` prints them
/// (`model::write_utc`; an infinite one is `null`, as `to_char` gives NULL). A column of
/// another type or shape (a `jsonb` binary version this code does not know) is an error
/// naming it, a 500.
fn asset_body(row: &tokio_postgres::Row) -> Result<Vec<u8>, CatalogError> {
    let text = |i: usize| row.try_get::<_, &str>(i).map_err(internal);
    let (version, producer, name) = (text(0)?, text(1)?, text(2)?);
    let metadata: Json = row.try_get(3).map_err(internal)?;
    let created: PgTime = row.try_get(4).map_err(internal)?;
    let updated: PgTime = row.try_get(5).map_err(internal)?;
    let mut out =
        Vec::with_capacity(160 + version.len() + producer.len() + name.len() + metadata.0.len());
    for (key, value) in [
        (&b"{\"versionId\":"[..], version),
        (b",\"producerId\":", producer),
        (b",\"name\":", name),
    ] {
        out.extend_from_slice(key);
        // Into memory, a string cannot fail; kept as an error all the same.
        serde_json::to_writer(&mut out, value)
            .map_err(|err| CatalogError::Internal(format!("an asset's text: {err}")))?;
    }
    out.extend_from_slice(b",\"metadata\":");
    compact_into(&mut out, metadata.0);
    for (key, time) in [
        (&b",\"createdAt\":"[..], created),
        (b",\"updatedAt\":", updated),
    ] {
        out.extend_from_slice(key);
        time.write_json(&mut out);
    }
    out.push(b'}');
    Ok(out)
}

/// A `json` or `jsonb` value as the text PostgreSQL prints for it (`jsonb`'s binary form is
/// a version byte, 1, then that text), not parsed.
struct Json<'a>(&'a str);

impl<'a> FromSql<'a> for Json<'a> {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let text = if *ty == Type::JSONB {
            match raw.split_first() {
                Some((1, text)) => text,
                _ => return Err("unknown jsonb binary version".into()),
            }
        } else {
            raw
        };
        Ok(Json(std::str::from_utf8(text)?))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSON || *ty == Type::JSONB
    }
}

/// A `timestamptz` as PostgreSQL sends it: µs since 2000-01-01T00:00:00Z, or ±infinity as
/// the largest and smallest `i64`.
#[derive(Clone, Copy)]
struct PgTime(i64);

/// 2000-01-01T00:00:00Z in µs since the Unix epoch.
const PG_EPOCH_MICROS: i128 = 946_684_800_000_000;

impl PgTime {
    fn write_json(self, out: &mut Vec<u8>) {
        if self.0 == i64::MAX || self.0 == i64::MIN {
            out.extend_from_slice(b"null");
        } else {
            out.push(b'"');
            crate::model::write_utc(out, i128::from(self.0) + PG_EPOCH_MICROS);
            out.push(b'"');
        }
    }
}

impl<'a> FromSql<'a> for PgTime {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(PgTime(i64::from_be_bytes(raw.try_into()?)))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TIMESTAMPTZ
    }
}

/// `json` (valid JSON text, as PostgreSQL prints it) without white space between tokens;
/// strings are copied unchanged. One pass, no parsing into values: key order and the digits
/// of every number stay as PostgreSQL wrote them.
pub fn compact(json: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len());
    compact_into(&mut out, json);
    out
}

/// [`compact`], appended to `out`.
fn compact_into(out: &mut Vec<u8>, json: &str) {
    let (mut in_string, mut escaped) = (false, false);
    for &b in json.as_bytes() {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if !matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
            in_string = b == b'"';
            out.push(b);
        }
    }
}

/// Registers a producer owned by the account `owner`.
pub async fn insert_producer(
    tx: &Transaction<'_>,
    p: &NewProducer,
    owner: i64,
) -> Result<Vec<u8>, CatalogError> {
    let row = tx
        .query_one(
            "INSERT INTO producers (producer_id, name, owner_id) VALUES ($1, $2, $3) \
             RETURNING json_build_object('producerId', producer_id, 'name', name, \
               'createdAt', to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'))::text",
            &[&p.producer_id.as_str(), &p.name, &owner],
        )
        .await
        .map_err(|e| {
            client_error(
                e,
                &format!("producer {:?} already exists", p.producer_id.as_str()),
                "",
            )
        })?;
    Ok(text(&row))
}

/// Publishes `a` for the account `publisher`. Lineage recorded into the version before it was
/// published takes effect now if `publisher` sent it; anyone else's is dropped (see
/// [`insert_event`]).
pub async fn insert_asset(
    tx: &Transaction<'_>,
    a: &NewAsset,
    publisher: i64,
) -> Result<Vec<u8>, CatalogError> {
    let row = tx
        .query_one(
            concat!(
                "INSERT INTO assets AS a (version_id, producer_id, name, metadata) \
                 VALUES ($1, $2, $3, $4) RETURNING ",
                asset_json!(),
                "::text"
            ),
            &[
                &a.version_id.as_str(),
                &a.producer_id.as_str(),
                &a.name,
                &a.metadata,
            ],
        )
        .await
        .map_err(|e| {
            client_error(
                e,
                &format!("asset version {:?} already exists", a.version_id.as_str()),
                &format!("producer {:?} does not exist", a.producer_id.as_str()),
            )
        })?;
    let version = [a.version_id.as_str()];
    lock_lineage_into(tx, &version).await?;
    tx.execute(
        "WITH claimed AS ( \
             DELETE FROM lineage_pending_edges WHERE child_version_id = $1 \
             RETURNING parent_version_id, submitted_by, event_id) \
         INSERT INTO lineage_edges (child_version_id, parent_version_id, event_id) \
         SELECT $1, parent_version_id, min(event_id) FROM claimed WHERE submitted_by = $2 \
         GROUP BY parent_version_id ON CONFLICT DO NOTHING",
        &[&version[0], &publisher],
    )
    .await
    .map_err(internal)?;
    Ok(text(&row))
}

/// How many advisory locks lineage and publication share (see [`lock_lineage_into`]).
const LINEAGE_LOCK_BUCKETS: i64 = 64;

/// Serialises lineage into `versions` with their publication until the transaction ends.
/// Without it, an event that found a version unpublished could commit its pending edges just
/// after the publication claimed the pending edges it could see, and they would stay pending
/// for good.
///
/// The locks are per bucket of versions ([`LINEAGE_LOCK_BUCKETS`] of them), taken in sorted
/// order, not per version: advisory locks live in PostgreSQL's shared lock table (about 64 ×
/// `max_connections` slots), and an event of 1,000 outputs taking 1,000 locks, a few at once,
/// would fill it and make every lock request in the cluster fail. Two versions in one bucket
/// merely serialise with each other.
async fn lock_lineage_into(tx: &Transaction<'_>, versions: &[&str]) -> Result<(), CatalogError> {
    if versions.is_empty() {
        return Ok(());
    }
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('cascade.catalog.lineage', b)) \
         FROM (SELECT DISTINCT (hashtextextended(v, 0) % $2 + $2) % $2 AS b \
               FROM unnest($1::text[]) AS t(v) ORDER BY b) AS sorted",
        &[&versions, &LINEAGE_LOCK_BUCKETS],
    )
    .await
    .map_err(internal)?;
    Ok(())
}

/// Whether `user` may change what `producer` publishes: `Ok` for its owner, 404 when there is
/// no such producer, 403 otherwise. Nothing is locked: producers are never deleted and their
/// owner never changes once set.
pub async fn authorize_producer(
    tx: &Transaction<'_>,
    producer: &str,
    user: i64,
) -> Result<(), CatalogError> {
    let row = tx
        .query_opt(
            "SELECT owner_id FROM producers WHERE producer_id = $1",
            &[&producer],
        )
        .await
        .map_err(internal)?
        .ok_or_else(|| CatalogError::NotFound(format!("producer {producer:?} does not exist")))?;
    owned(row.get(0), user, &format!("producer {producer:?}"))
}

/// Why a write conditioned on ownership of `version` touched nothing: 404 when there is no
/// such asset, 403 when it is another account's. (The writes carry the ownership condition
/// themselves, so the successful path costs no extra query and cannot race a change of the
/// asset between a check and the write.)
async fn refusal(tx: &impl cascade_core::db::Sql, version: &VersionId, user: i64) -> CatalogError {
    let row = tx
        .query_opt(
            "SELECT p.owner_id FROM assets a JOIN producers p USING (producer_id) \
             WHERE a.version_id = $1",
            &[&version.as_str()],
        )
        .await;
    match row {
        Err(err) => internal(err),
        Ok(None) => CatalogError::NotFound(missing_version(version)),
        Ok(Some(row)) => owned(
            row.get(0),
            user,
            &format!("asset version {:?}", version.as_str()),
        )
        .err()
        // Owned after all: it was (re)created under the caller's producer meanwhile.
        .unwrap_or_else(|| CatalogError::NotFound(missing_version(version))),
    }
}

/// Which of `outputs` are published assets, checking that each is `user`'s (403 otherwise):
/// lineage into a published version is its owner's to record. Versions not (yet) in the
/// catalog may be named by anyone's lineage, which stays pending until they are published
/// ([`insert_event`]). Locks lineage into `outputs` against a concurrent publication.
pub async fn published_outputs(
    tx: &Transaction<'_>,
    outputs: &[&str],
    user: i64,
) -> Result<Vec<String>, CatalogError> {
    if outputs.is_empty() {
        return Ok(Vec::new());
    }
    lock_lineage_into(tx, outputs).await?;
    let rows = tx
        .query(
            "SELECT a.version_id, p.owner_id FROM assets a JOIN producers p USING (producer_id) \
             WHERE a.version_id = ANY($1)",
            &[&outputs],
        )
        .await
        .map_err(internal)?;
    let mut published = Vec::with_capacity(rows.len());
    for row in &rows {
        let version: String = row.get(0);
        owned(row.get(1), user, &format!("asset version {version:?}"))?;
        published.push(version);
    }
    published.sort_unstable();
    Ok(published)
}

fn owned(owner: Option<i64>, user: i64, what: &str) -> Result<(), CatalogError> {
    if owner == Some(user) {
        Ok(())
    } else {
        Err(CatalogError::Forbidden(format!(
            "{what} belongs to another account"
        )))
    }
}

/// Most characters of an audit row's `entity_id` (core migration 4's bound).
const AUDIT_ID_MAX: usize = 200;

/// `id` as an audit row's `entity_id`: itself when it fits, else its first 160 characters, `~`
/// and 32 hex digits of its SHA-256. Catalog ids may be 256 characters (an edge's
/// `parent>child` 513), the column holds 200; the full id is in the row's `before`/`after`.
pub fn audit_id(id: &str) -> std::borrow::Cow<'_, str> {
    if id.chars().count() <= AUDIT_ID_MAX {
        return id.into();
    }
    let head: String = id.chars().take(160).collect();
    let digest = cascade_core::cache::etag(id.as_bytes());
    format!("{head}~{}", digest.trim_matches('"')).into()
}

/// Who changes the catalog and under which request: what each audit row carries
/// (`cascade_core::audit`).
#[derive(Debug, Clone)]
pub struct Author {
    /// `user:<id>`.
    pub actor: String,
    pub user_id: i64,
    pub request_id: Option<String>,
}

impl Author {
    /// Records one change of a catalog entity in `tx`, `before` and `after` being the entity's
    /// JSON as its answers show it.
    pub async fn record(
        &self,
        tx: &Transaction<'_>,
        action: &str,
        entity: (&str, &str),
        before: Option<&[u8]>,
        after: Option<&[u8]>,
    ) -> Result<(), CatalogError> {
        let parse = |json: Option<&[u8]>| {
            json.map(serde_json::from_slice::<serde_json::Value>)
                .transpose()
                .map_err(|err| CatalogError::Internal(format!("audit JSON: {err}")))
        };
        let (before, after) = (parse(before)?, parse(after)?);
        audit::record(
            tx,
            &Change {
                actor: &self.actor,
                action,
                entity_type: entity.0,
                entity_id: &audit_id(entity.1),
                before: before.as_ref(),
                after: after.as_ref(),
                request_id: self.request_id.as_deref(),
            },
        )
        .await?;
        Ok(())
    }
}

/// The updated asset, if it is one of `author`'s (404 or 403 otherwise), with its audit row.
pub async fn update_asset(
    conn: &Object,
    version: &VersionId,
    author: &Author,
    change: &AssetChange,
) -> Result<Vec<u8>, CatalogError> {
    // One statement, prepared once per connection, run alone (no transaction around it): a
    // write's PostgreSQL cost is its round trips, and 64 writers share two cores with it. The
    // audit row is written by the same statement (so with the change, or not at all): `old`
    // locks the row and shows it before the change (a concurrent writer's committed version,
    // if one got there first), `changed` updates it.
    let statement = conn
        .prepare_cached(concat!(
            "WITH changed AS ( \
               UPDATE assets AS a SET name = coalesce($2, a.name), \
               metadata = coalesce($3, a.metadata), updated_at = now() \
               FROM (SELECT a.version_id, ",
            asset_json!(),
            "::jsonb AS before FROM assets a WHERE a.version_id = $1 AND a.producer_id IN \
                      (SELECT producer_id FROM producers WHERE owner_id = $4) FOR UPDATE) AS old \
               WHERE a.version_id = old.version_id \
               RETURNING old.before, ",
            asset_json!(),
            " AS after), \
             logged AS ( \
               INSERT INTO audit_log (actor, action, entity_type, entity_id, before, after, request_id) \
               SELECT $5, 'asset.update', 'asset', $7, before, after::jsonb, $6 FROM changed) \
             SELECT after::text FROM changed"
        ))
        .await
        .map_err(internal)?;
    let entity_id = audit_id(version.as_str());
    let row = conn
        .query_opt(
            &statement,
            &[
                &version.as_str(),
                &change.name,
                &change.metadata,
                &author.user_id,
                &author.actor,
                &author.request_id,
                &entity_id.as_ref(),
            ],
        )
        .await
        .map_err(internal)?;
    match row {
        Some(row) => Ok(text(&row)),
        None => Err(refusal(conn, version, author.user_id).await),
    }
}

/// Deletes `version`, if it is one of `user`'s (404 or 403 otherwise); returns it as it was.
pub async fn delete_asset(
    tx: &Transaction<'_>,
    version: &VersionId,
    user: i64,
) -> Result<Vec<u8>, CatalogError> {
    let deleted = tx
        .query_opt(
            concat!(
                "DELETE FROM assets AS a WHERE a.version_id = $1 AND a.producer_id IN \
                   (SELECT producer_id FROM producers WHERE owner_id = $2) RETURNING ",
                asset_json!(),
                "::text"
            ),
            &[&version.as_str(), &user],
        )
        .await
        .map_err(internal)?;
    match deleted {
        Some(row) => Ok(text(&row)),
        None => Err(refusal(tx, version, user).await),
    }
}

fn missing_version(version: &VersionId) -> String {
    format!("asset version {:?} does not exist", version.as_str())
}

/// A policy for `p.version_id`, if it is one of `user`'s (404 or 403 otherwise).
pub async fn insert_policy(
    tx: &Transaction<'_>,
    p: &NewPolicy,
    user: i64,
) -> Result<Vec<u8>, CatalogError> {
    let expires = p.expires_at.as_ref().map(Timestamp::as_str);
    let row = tx
        .query_opt(
            "INSERT INTO policies (version_id, document, expires_at) \
             SELECT $1, $2, $3::text::timestamptz \
             WHERE EXISTS (SELECT 1 FROM assets a JOIN producers o USING (producer_id) \
                           WHERE a.version_id = $1 AND o.owner_id = $4) \
             RETURNING json_build_object('policyId', policy_id, 'versionId', version_id, 'document', document, \
               'createdAt', to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
               'expiresAt', to_char(expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'))::text",
            &[&p.version_id.as_str(), &p.document, &expires, &user],
        )
        .await
        .map_err(|e| client_error(e, "", &missing_version(&p.version_id)))?;
    match row {
        Some(row) => Ok(text(&row)),
        None => Err(refusal(tx, &p.version_id, user).await),
    }
}

/// A receipt for `r.version_id`, if it is one of `user`'s (404 or 403 otherwise).
pub async fn insert_receipt(
    tx: &Transaction<'_>,
    r: &NewReceipt,
    user: i64,
) -> Result<Vec<u8>, CatalogError> {
    let expires = r.expires_at.as_ref().map(Timestamp::as_str);
    let row = tx
        .query_opt(
            "INSERT INTO receipts (version_id, payer, amount, expires_at) \
             SELECT $1, $2, $3, $4::text::timestamptz \
             WHERE EXISTS (SELECT 1 FROM assets a JOIN producers o USING (producer_id) \
                           WHERE a.version_id = $1 AND o.owner_id = $5) \
             RETURNING json_build_object('receiptId', receipt_id, 'versionId', version_id, 'payer', payer, \
               'amount', amount, \
               'createdAt', to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
               'expiresAt', to_char(expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'))::text",
            &[&r.version_id.as_str(), &r.payer, &r.amount, &expires, &user],
        )
        .await
        .map_err(|e| client_error(e, "", &missing_version(&r.version_id)))?;
    match row {
        Some(row) => Ok(text(&row)),
        None => Err(refusal(tx, &r.version_id, user).await),
    }
}

/// What one event changed: edges now in effect, and edges kept pending until their child is
/// published (both only the new ones).
#[derive(Debug, Default)]
pub struct RecordedEdges {
    pub added: Vec<(String, String)>,
    pub pending: Vec<(String, String)>,
}

/// Records the event and its edges; returns the event id and the edges that are new. An edge
/// into one of `published` (the caller's, checked by [`published_outputs`]) takes effect; one
/// into a version not in the catalog is kept pending in `lineage_pending_edges`, attributed to
/// `submitted_by`, and takes effect only if that account publishes the version: nobody can
/// give someone else's future asset ancestors.
pub async fn insert_event(
    tx: &Transaction<'_>,
    event: &RunEvent,
    submitted_by: i64,
    published: &[String],
) -> Result<(i64, RecordedEdges), CatalogError> {
    let row = tx
        .query_one(
            "INSERT INTO lineage_event_audit \
               (run_id, event_type, event_time, job_namespace, job_name, producer, event, submitted_by) \
             VALUES ($1, $2, $3::text::timestamptz, $4, $5, $6, $7, $8) RETURNING event_id",
            &[
                &event.run_id,
                &event.event_type,
                &event.event_time.as_str(),
                &event.job_namespace,
                &event.job_name,
                &event.producer,
                &event.raw,
                &submitted_by,
            ],
        )
        .await
        .map_err(|e| match client_error(e, "", "") {
            CatalogError::BadRequest { message, .. } => CatalogError::bad_request("eventTime", message),
            other => other,
        })?;
    let event_id: i64 = row.get(0);
    let (mut effective, mut pending) = (
        (Vec::<&str>::new(), Vec::<&str>::new()),
        (Vec::<&str>::new(), Vec::<&str>::new()),
    );
    for (p, c) in &event.edges {
        let side = if published
            .binary_search_by(|v| v.as_str().cmp(c.as_str()))
            .is_ok()
        {
            &mut effective
        } else {
            &mut pending
        };
        side.0.push(p.as_str());
        side.1.push(c.as_str());
    }
    let mut recorded = RecordedEdges::default();
    if !effective.0.is_empty() {
        let rows = tx
            .query(
                "INSERT INTO lineage_edges (parent_version_id, child_version_id, event_id) \
                 SELECT p, c, $3 FROM unnest($1::text[], $2::text[]) AS t(p, c) \
                 ON CONFLICT DO NOTHING RETURNING parent_version_id, child_version_id",
                &[&effective.0, &effective.1, &event_id],
            )
            .await
            .map_err(internal)?;
        recorded.added = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    }
    if !pending.0.is_empty() {
        let rows = tx
            .query(
                "INSERT INTO lineage_pending_edges \
                   (parent_version_id, child_version_id, submitted_by, event_id) \
                 SELECT p, c, $3, $4 FROM unnest($1::text[], $2::text[]) AS t(p, c) \
                 ON CONFLICT DO NOTHING RETURNING parent_version_id, child_version_id",
                &[&pending.0, &pending.1, &submitted_by, &event_id],
            )
            .await
            .map_err(internal)?;
        recorded.pending = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    }
    Ok((event_id, recorded))
}

/// Removes the edge `parent` → `child`, if `child` is one of `user`'s assets: 404 when there
/// is no such asset or no such edge, 403 when the asset is someone else's.
pub async fn delete_edge(
    tx: &Transaction<'_>,
    child: &VersionId,
    parent: &VersionId,
    user: i64,
) -> Result<(), CatalogError> {
    let deleted = tx
        .execute(
            "DELETE FROM lineage_edges WHERE child_version_id = $1 AND parent_version_id = $2 \
             AND EXISTS (SELECT 1 FROM assets a JOIN producers o USING (producer_id) \
                         WHERE a.version_id = $1 AND o.owner_id = $3)",
            &[&child.as_str(), &parent.as_str(), &user],
        )
        .await
        .map_err(internal)?;
    if deleted == 1 {
        return Ok(());
    }
    let owner = tx
        .query_opt(
            "SELECT p.owner_id FROM assets a JOIN producers p USING (producer_id) \
             WHERE a.version_id = $1",
            &[&child.as_str()],
        )
        .await
        .map_err(internal)?
        .ok_or_else(|| CatalogError::NotFound(missing_version(child)))?;
    owned(
        owner.get(0),
        user,
        &format!("asset version {:?}", child.as_str()),
    )?;
    Err(CatalogError::NotFound(format!(
        "asset version {:?} has no parent {:?}",
        child.as_str(),
        parent.as_str()
    )))
}

/// `roots` and every version below them (children, grandchildren, …) to `depth` levels;
/// `None` when there are more than `limit`.
pub async fn descendants(
    conn: &Object,
    roots: &[&str],
    depth: i32,
    limit: usize,
) -> Result<Option<Vec<String>>, CatalogError> {
    // Rows are (version, depth) pairs: allow for repeats before concluding there are too many.
    let row_cap = (limit * 8) as i64;
    // The depth and the cap are written into the statement (a few fixed values, one cached
    // statement each), and a single root (every `PATCH`) is a `text` parameter rather than an
    // array: then PostgreSQL's generic plan is as cheap as a custom one and it stops planning
    // the recursive walk on every execution (with `unnest($1)` or `LIMIT $3` it planned each
    // time, ~0.5 ms, more than the walk itself).
    let seed = if roots.len() == 1 {
        "SELECT $1::text, 0"
    } else {
        "SELECT unnest($1::text[]), 0"
    };
    // One row: the distinct versions found (PostgreSQL drops the repeats) and how many pairs
    // the walk gave, to tell whether it was cut at the cap.
    let sql = format!(
        "WITH RECURSIVE d(version_id, depth) AS ( \
             {seed} \
             UNION \
             SELECT e.child_version_id, d.depth + 1 \
             FROM d JOIN lineage_edges e ON e.parent_version_id = d.version_id \
             WHERE d.depth < {depth} \
         ) SELECT coalesce(array_agg(DISTINCT version_id), '{{}}'), count(*) \
           FROM (SELECT version_id FROM d LIMIT {row_cap}) AS walked"
    );
    let statement = conn.prepare_cached(&sql).await.map_err(internal)?;
    let row = match roots {
        [root] => conn.query_one(&statement, &[root]).await,
        _ => conn.query_one(&statement, &[&roots]).await,
    }
    .map_err(internal)?;
    let (versions, pairs): (Vec<String>, i64) = (row.get(0), row.get(1));
    Ok((pairs < row_cap && versions.len() <= limit).then_some(versions))
}

/// `GET /listings/:versionId`.
pub async fn asset(conn: &Object, version: &str) -> Result<Option<Vec<u8>>, CatalogError> {
    let statement = conn
        .prepare_cached(concat!(
            "/* catalog:asset */ SELECT ",
            asset_columns!(),
            " FROM assets a WHERE a.version_id = $1"
        ))
        .await
        .map_err(internal)?;
    let row = conn
        .query_opt(&statement, &[&version])
        .await
        .map_err(internal)?;
    row.as_ref().map(asset_body).transpose()
}

/// `GET /listings/:versionId` of many versions in one statement (concurrent misses batched by
/// the cache, `get_or_load_body_batched`): each version found, with its body as
/// [`asset`] gives it. A version not among them does not exist.
pub async fn assets(
    conn: &Object,
    versions: &[String],
) -> Result<Vec<(String, Vec<u8>)>, CatalogError> {
    let statement = conn
        .prepare_cached(concat!(
            "/* catalog:assets */ SELECT ",
            asset_columns!(),
            " FROM assets a WHERE a.version_id = ANY($1)"
        ))
        .await
        .map_err(internal)?;
    let rows = conn
        .query(&statement, &[&versions])
        .await
        .map_err(internal)?;
    rows.iter()
        .map(|row| Ok((row.try_get(0).map_err(internal)?, asset_body(row)?)))
        .collect()
}

/// `GET /listings`: newest first, `{"items": [...], "nextCursor": "..." | null}`.
pub async fn listings(conn: &Object, query: &ListingQuery) -> Result<Vec<u8>, CatalogError> {
    let statement = conn
        .prepare_cached(concat!(
            "/* catalog:listings */ SELECT ",
            asset_json!(),
            "::text, (extract(epoch FROM a.created_at) * 1000000)::bigint, a.version_id \
             FROM assets a \
             WHERE ($1::text IS NULL OR ",
            cascade_http::search_matches!("a"),
            ") \
               AND ($2::text IS NULL OR a.producer_id = $2) \
               AND ($3::text IS NULL OR a.created_at >= $3::timestamptz) \
               AND ($4::text IS NULL OR a.created_at < $4::timestamptz) \
               AND ($5::bigint IS NULL OR (a.created_at, a.version_id) < \
                    ('epoch'::timestamptz + $5 * interval '1 microsecond', $6::text)) \
             ORDER BY a.created_at DESC, a.version_id DESC LIMIT $7"
        ))
        .await
        .map_err(internal)?;
    let (cursor_us, cursor_id) = match &query.cursor {
        Some((us, id)) => (Some(*us), Some(id.as_str())),
        None => (None, None),
    };
    let time = |t: &Option<Timestamp>| t.as_ref().map(|t| t.as_str().to_string());
    let rows = conn
        .query(
            &statement,
            &[
                &query.q,
                &query.producer,
                &time(&query.created_after),
                &time(&query.created_before),
                &cursor_us,
                &cursor_id,
                &(query.limit + 1),
            ],
        )
        .await
        .map_err(|e| client_error(e, "", ""))?;
    let mut more = rows.len() as i64 > query.limit;
    let mut body = Vec::with_capacity(64 + rows.len() * 256);
    body.extend_from_slice(b"{\"items\":[");
    let mut last = None;
    for row in rows.iter().take(query.limit as usize) {
        let item = compact(row.get::<_, &str>(0));
        // The page stops early (and says where to go on) rather than pass the byte bound;
        // it always holds one item, so paging makes progress.
        if last.is_some() && body.len() + 1 + item.len() + PAGE_TAIL_BYTES > MAX_PAGE_BYTES {
            more = true;
            break;
        }
        if last.is_some() {
            body.push(b',');
        }
        body.extend_from_slice(&item);
        last = Some(row);
    }
    body.extend_from_slice(b"],\"nextCursor\":");
    let next = last
        .filter(|_| more)
        .map(|row| format!("{}.{}", row.get::<_, i64>(1), row.get::<_, &str>(2)));
    body.extend_from_slice(
        serde_json::to_string(&next)
            .unwrap_or_else(|_| "null".into())
            .as_bytes(),
    );
    body.push(b'}');
    Ok(body)
}

/// `GET /bundle`: the asset, its ancestors to `depth` (each with its asset, or `null` when the
/// lineage names a version the catalog does not have) and the edges between them; `None`
/// when the asset does not exist.
pub async fn bundle(
    conn: &Object,
    version: &str,
    depth: i32,
) -> Result<Option<Vec<u8>>, CatalogError> {
    Ok(bundle_with_members(conn, version, depth)
        .await?
        .map(|(body, _)| body))
}

/// The versions a bundle of `version` to `depth` shows (itself and its ancestry, whether in
/// the catalog or not), sorted: what its cache entry is tagged with before it is loaded
/// (`invalidation.rs`).
pub async fn bundle_members(
    conn: &Object,
    version: &str,
    depth: i32,
) -> Result<Vec<String>, CatalogError> {
    let statement = conn
        .prepare_cached(concat!(
            "/* catalog:bundle_members */ ",
            ancestry_cte!(),
            "SELECT array_agg(version_id ORDER BY version_id) FROM members"
        ))
        .await
        .map_err(internal)?;
    let row = conn
        .query_one(&statement, &[&version, &depth])
        .await
        .map_err(internal)?;
    Ok(row.get::<_, Option<Vec<String>>>(0).unwrap_or_default())
}

/// [`bundle`], with the versions it shows as [`bundle_members`] gives them, read by the same
/// statement.
pub async fn bundle_with_members(
    conn: &Object,
    version: &str,
    depth: i32,
) -> Result<Option<(Vec<u8>, Vec<String>)>, CatalogError> {
    let statement = conn
        .prepare_cached(concat!(
            "/* catalog:bundle */ ",
            ancestry_cte!(),
            "SELECT json_build_object( \
               'versionId', $1::text, 'depth', $2::int, \
               'asset', (SELECT ",
            asset_json!(),
            " FROM assets a WHERE a.version_id = $1), \
               'ancestors', (SELECT coalesce(json_agg(json_build_object( \
                    'versionId', m.version_id, 'depth', m.depth, 'asset', \
                    CASE WHEN a.version_id IS NULL THEN NULL ELSE ",
            asset_json!(),
            " END) ORDER BY m.depth, m.version_id), '[]') \
                  FROM members m LEFT JOIN assets a ON a.version_id = m.version_id \
                  WHERE m.depth > 0), \
               'edges', (SELECT coalesce(json_agg(json_build_object( \
                    'parent', e.parent_version_id, 'child', e.child_version_id) \
                    ORDER BY e.child_version_id, e.parent_version_id), '[]') \
                  FROM members c \
                  JOIN lineage_edges e ON e.child_version_id = c.version_id AND c.depth < $2 \
                  JOIN members p ON p.version_id = e.parent_version_id) \
             )::text, (SELECT array_agg(version_id ORDER BY version_id) FROM members) \
             WHERE EXISTS (SELECT 1 FROM assets WHERE version_id = $1)"
        ))
        .await
        .map_err(internal)?;
    let row = conn
        .query_opt(&statement, &[&version, &depth])
        .await
        .map_err(internal)?;
    Ok(row.map(|row| {
        let members: Option<Vec<String>> = row.get(1);
        (text(&row), members.unwrap_or_default())
    }))
}

/// `GET /ready`: whether the asset and every ancestor (to `READY_MAX_DEPTH`) is in the catalog
/// with a valid (unexpired) receipt and policy; which are not, and why. Lineage deeper than
/// that is not vouched for: `truncated` is true and the answer is not ready. `validUntil` is when
/// the first receipt or policy this answer relies on expires (the answer may change then
/// without any write). `None` when the asset does not exist.
pub async fn readiness(conn: &Object, version: &str) -> Result<Option<Vec<u8>>, CatalogError> {
    let statement = conn
        .prepare_cached(concat!(
            "/* catalog:readiness */ ",
            ancestry_cte!(),
            ", checked AS ( \
               SELECT m.version_id, m.depth, a.version_id IS NOT NULL AS present, \
                      r.until AS receipt_until, p.until AS policy_until \
               FROM members m \
               LEFT JOIN assets a ON a.version_id = m.version_id \
               LEFT JOIN LATERAL (SELECT max(coalesce(expires_at, 'infinity')) AS until FROM receipts \
                    WHERE version_id = m.version_id AND (expires_at IS NULL OR expires_at > now())) r ON true \
               LEFT JOIN LATERAL (SELECT max(coalesce(expires_at, 'infinity')) AS until FROM policies \
                    WHERE version_id = m.version_id AND (expires_at IS NULL OR expires_at > now())) p ON true \
             ), validity AS ( \
               SELECT nullif(least(min(receipt_until), min(policy_until)), 'infinity') AS until FROM checked \
             ), beyond AS ( \
               SELECT EXISTS (SELECT 1 FROM members m \
                 JOIN lineage_edges e ON e.child_version_id = m.version_id \
                 WHERE m.depth = $2 \
                   AND NOT EXISTS (SELECT 1 FROM members o WHERE o.version_id = e.parent_version_id) \
               ) AS truncated \
             ) \
             SELECT json_build_object( \
               'versionId', $1::text, \
               'ready', bool_and(present AND receipt_until IS NOT NULL AND policy_until IS NOT NULL) \
                        AND NOT (SELECT truncated FROM beyond), \
               'checked', count(*), \
               'truncated', (SELECT truncated FROM beyond), \
               'missing', coalesce(json_agg(json_build_object( \
                    'versionId', version_id, 'depth', depth, 'missing', array_remove(ARRAY[ \
                        CASE WHEN NOT present THEN 'asset' END, \
                        CASE WHEN receipt_until IS NULL THEN 'receipt' END, \
                        CASE WHEN policy_until IS NULL THEN 'policy' END], NULL)) \
                    ORDER BY depth, version_id) \
                  FILTER (WHERE NOT (present AND receipt_until IS NOT NULL AND policy_until IS NOT NULL)), '[]'), \
               'validUntil', (SELECT to_char(until AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') FROM validity), \
               'validUntilMs', (SELECT (extract(epoch FROM until) * 1000)::bigint FROM validity) \
             )::text FROM checked \
             HAVING bool_or(version_id = $1 AND present)"
        ))
        .await
        .map_err(internal)?;
    let row = conn
        .query_opt(&statement, &[&version, &READY_MAX_DEPTH])
        .await
        .map_err(internal)?;
    Ok(row.as_ref().map(text))
}

/// `GET /search`'s assets: those `$1` matches, best first (`cascade_http::search`).
pub async fn search(
    conn: &Object,
    text: &str,
    limit: i64,
) -> Result<Vec<cascade_http::search::SearchHit>, CatalogError> {
    let statement = conn
        .prepare_cached(concat!(
            "/* catalog:search */ SELECT a.version_id, a.name, ",
            cascade_http::search_score!("a"),
            " AS score, ",
            asset_json!(),
            " FROM assets a WHERE ",
            cascade_http::search_matches!("a"),
            " ORDER BY score DESC, a.created_at DESC, a.version_id DESC LIMIT $2"
        ))
        .await
        .map_err(internal)?;
    let rows = conn
        .query(&statement, &[&text, &limit])
        .await
        .map_err(internal)?;
    Ok(rows
        .iter()
        .map(cascade_http::search::SearchHit::from_row)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::{audit_id, compact};

    #[test]
    fn audit_ids_fit_the_column_and_stay_distinct() {
        assert_eq!(audit_id("ds-1@v1"), "ds-1@v1");
        let fits = "a".repeat(200);
        assert_eq!(audit_id(&fits), fits);
        let (long, other) = ("a".repeat(256), format!("{}b", "a".repeat(255)));
        let (short, short_other) = (audit_id(&long), audit_id(&other));
        assert!(short.starts_with(&"a".repeat(160)) && short.chars().count() <= 200);
        assert_ne!(short, short_other);
        assert_eq!(short, audit_id(&long), "stable");
    }

    #[test]
    fn compact_drops_white_space_between_tokens_and_keeps_strings() {
        let printed = "{\"a\" : 1, \"b\" : [1, 2, {\"c\": \"x : y, \\\" z\"}],\n \"d\" : null}";
        assert_eq!(
            String::from_utf8(compact(printed)).unwrap(),
            "{\"a\":1,\"b\":[1,2,{\"c\":\"x : y, \\\" z\"}],\"d\":null}"
        );
    }
}
