//! `GET /listings` parameters, parsed into a query that cannot hold a bad value and whose
//! canonical form is its cache key.

use crate::error::CatalogError;
use crate::model::{ProducerId, Timestamp, VersionId};

/// A validated `GET /listings` query. Every field holds a parsed value, so two spellings of
/// one query (`createdAfter` as `…T12:00:00Z` or `…T14:00:00+02:00`, `limit=010`, a cursor
/// with leading zeros) are one value, one cache key and one load; and every field is bounded,
/// so a key is too.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ListingQuery {
    /// Trimmed, 1 to 200 bytes, no control characters.
    pub q: Option<String>,
    pub producer: Option<String>,
    /// Canonical UTC text (`Timestamp::as_str`): what PostgreSQL receives.
    pub created_after: Option<Timestamp>,
    pub created_before: Option<Timestamp>,
    pub limit: i64,
    /// (created_at in µs since the epoch, version_id) of the last item of the previous page.
    pub cursor: Option<(i64, String)>,
}

impl ListingQuery {
    pub const DEFAULT_LIMIT: i64 = 20;
    pub const MAX_LIMIT: i64 = 100;
    /// Longest `q`, in bytes.
    pub const MAX_Q_BYTES: usize = 200;
    /// Longest cursor looked at (a real one is at most 17 characters of microseconds, a dot
    /// and a version id of 256 bytes): anything longer is refused before it is parsed.
    pub const MAX_CURSOR_BYTES: usize = 300;

    pub fn parse(raw: &ListingParams) -> Result<ListingQuery, CatalogError> {
        let q = raw.q.as_deref().map(str::trim).filter(|q| !q.is_empty());
        if q.is_some_and(|q| q.len() > Self::MAX_Q_BYTES) {
            return Err(CatalogError::bad_request(
                "q",
                format!("q: at most {} bytes", Self::MAX_Q_BYTES),
            ));
        }
        if q.is_some_and(|q| q.chars().any(char::is_control)) {
            return Err(CatalogError::bad_request(
                "q",
                "q: must not contain control characters",
            ));
        }
        let limit = match raw.limit.as_deref() {
            None => Self::DEFAULT_LIMIT,
            Some(l) => l
                .parse::<i64>()
                .ok()
                .filter(|l| (1..=Self::MAX_LIMIT).contains(l))
                .ok_or_else(|| {
                    CatalogError::bad_request(
                        "limit",
                        format!(
                            "limit: expected a whole number from 1 to {}",
                            Self::MAX_LIMIT
                        ),
                    )
                })?,
        };
        let time = |field: &'static str, v: &Option<String>| {
            v.as_deref().map(|t| Timestamp::parse(field, t)).transpose()
        };
        Ok(ListingQuery {
            q: q.map(String::from),
            producer: raw
                .producer
                .as_deref()
                .map(|p| ProducerId::parse("producer", p).map(|p| p.as_str().to_string()))
                .transpose()?,
            created_after: time("createdAfter", &raw.created_after)?,
            created_before: time("createdBefore", &raw.created_before)?,
            limit,
            cursor: raw.cursor.as_deref().map(parse_cursor).transpose()?,
        })
    }

    /// The cache key: the canonical form of the query (JSON, so no two queries share a key).
    pub fn key(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// `<µs>.<versionId>` as `GET /listings` hands it out: bounded in length, at most 16 digits of
/// microseconds (one spelling per instant but for leading zeros, and within the years
/// [`Timestamp`] accepts), the id by the id rules.
fn parse_cursor(raw: &str) -> Result<(i64, String), CatalogError> {
    let refused =
        || CatalogError::bad_request("cursor", "cursor: not a cursor returned by GET /listings");
    if raw.len() > ListingQuery::MAX_CURSOR_BYTES {
        return Err(CatalogError::bad_request(
            "cursor",
            format!(
                "cursor: at most {} bytes; not a cursor returned by GET /listings",
                ListingQuery::MAX_CURSOR_BYTES
            ),
        ));
    }
    let (us, id) = raw.split_once('.').ok_or_else(refused)?;
    // As the OpenAPI document describes it: `-?[0-9]{1,16}` (years 1653 to 2286).
    let digits = us.strip_prefix('-').unwrap_or(us);
    if !(1..=16).contains(&digits.len()) || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(refused());
    }
    let us = us
        .parse::<i64>()
        .ok()
        .and_then(Timestamp::from_micros_checked)
        .ok_or_else(refused)?;
    let id = VersionId::parse("cursor", id).map_err(|_| refused())?;
    Ok((us.micros(), id.as_str().to_string()))
}

/// `GET /listings` parameters as received.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListingParams {
    pub q: Option<String>,
    pub producer: Option<String>,
    pub created_after: Option<String>,
    pub created_before: Option<String>,
    pub limit: Option<String>,
    pub cursor: Option<String>,
}
