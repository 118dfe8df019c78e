//! `GET /listings` parameters, parsed into a query that cannot hold a bad value and whose
//! canonical form is its cache key.

use crate::error::CatalogError;
use crate::model::{ProducerId, Timestamp};

/// A validated `GET /listings` query.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ListingQuery {
    pub q: Option<String>,
    pub producer: Option<String>,
    pub created_after: Option<String>,
    pub created_before: Option<String>,
    pub limit: i64,
    /// (created_at in µs since the epoch, version_id) of the last item of the previous page.
    pub cursor: Option<(i64, String)>,
}

impl ListingQuery {
    pub const DEFAULT_LIMIT: i64 = 20;
    pub const MAX_LIMIT: i64 = 100;

    pub fn parse(raw: &ListingParams) -> Result<ListingQuery, CatalogError> {
        let q = raw.q.as_deref().map(str::trim).filter(|q| !q.is_empty());
        if q.is_some_and(|q| q.len() > 200) {
            return Err(CatalogError::bad_request("q", "q: at most 200 bytes"));
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
        let cursor = raw
            .cursor
            .as_deref()
            .map(|c| {
                c.split_once('.')
                    .and_then(|(us, id)| Some((us.parse::<i64>().ok()?, id.to_string())))
                    .filter(|(_, id)| !id.is_empty())
                    .ok_or_else(|| {
                        CatalogError::bad_request(
                            "cursor",
                            "cursor: not a cursor returned by GET /listings",
                        )
                    })
            })
            .transpose()?;
        let time = |field: &'static str, v: &Option<String>| {
            v.as_deref()
                .map(|t| Timestamp::parse(field, t).map(|t| t.as_str().to_string()))
                .transpose()
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
            cursor,
        })
    }

    /// The cache key: the canonical form of the query (JSON, so no two queries share a key).
    pub fn key(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
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
