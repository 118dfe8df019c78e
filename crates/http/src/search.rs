//! Search across types at once (`GET /search`, seed 002's `db.search("machine learning")`).
//! The server owns the endpoint but not the modules' tables: a module that owns a searchable
//! type hands the server a [`SearchProvider`] ([`Module::search_providers`](crate::Module::search_providers)),
//! and the server runs every requested type's provider at once and merges their hits by score.
//!
//! A provider answers only what the caller may see (an account's own agents, never another
//! account's), caches its answers briefly through the cache engine under tags its module's
//! writes already invalidate, and scores the same way as the others (PostgreSQL's `ts_rank`
//! over a vector with names in weight A, plus pg_trgm's `word_similarity` of the query to the
//! name), so one list ordered by score is meaningful across types.

use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ApiError;
use crate::state::AppState;

/// What to look for, already validated by the server.
#[derive(Debug, Clone)]
pub struct SearchQuery {
    /// The text as given, 1 to [`SearchQuery::MAX_CHARS`] characters, no control characters.
    pub text: String,
    /// Most hits of each type.
    pub limit: i64,
}

impl SearchQuery {
    /// The longest query text.
    pub const MAX_CHARS: usize = 200;
    /// Most hits per type and in the merged answer.
    pub const MAX_LIMIT: i64 = 50;
    pub const DEFAULT_LIMIT: i64 = 20;
}

/// One result: the entity as its own `GET` shows it, with its score.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SearchHit {
    /// The entity's id, as text (agents have numbers, assets version ids).
    pub id: String,
    pub name: String,
    /// Higher is better; comparable across types.
    pub score: f64,
    pub item: Value,
}

/// The answer's future (boxed: providers are trait objects of different modules).
pub type Hits<'a> = Pin<Box<dyn Future<Output = Result<Vec<SearchHit>, ApiError>> + Send + 'a>>;

/// Searches one type of one module.
pub trait SearchProvider: Send + Sync + 'static {
    /// The type's name in `types=` and in each hit's `type` (`agents`, `assets`).
    fn kind(&self) -> &'static str;

    /// At most `query.limit` hits that `user_id` may see, best first.
    fn search<'a>(&'a self, state: &'a AppState, user_id: i64, query: &'a SearchQuery) -> Hits<'a>;
}

impl SearchHit {
    /// A row of a provider's statement: `id::text, name, score::float8, item` (JSON).
    pub fn from_row(row: &tokio_postgres::Row) -> SearchHit {
        SearchHit {
            id: row.get(0),
            name: row.get(1),
            score: row.get(2),
            item: row.get(3),
        }
    }
}

/// The hits of `key` in `namespace` (tagged `tags`), or those `load` finds, cached.
pub async fn cached<E, F, Fut>(
    state: &AppState,
    namespace: &str,
    key: &str,
    tags: &[String],
    load: F,
) -> Result<Vec<SearchHit>, ApiError>
where
    E: Into<ApiError>,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<Vec<SearchHit>, E>>,
{
    let coding = |err: serde_json::Error| ApiError::Internal(anyhow::anyhow!("search hits: {err}"));
    let (body, _) = state
        .cache
        .get_or_load_body(namespace, key, tags, || async {
            let hits = load().await.map_err(Into::into)?;
            serde_json::to_vec(&hits).map(Some).map_err(coding)
        })
        .await?;
    match body {
        Some(body) => serde_json::from_slice(body.bytes()).map_err(coding),
        None => Ok(Vec::new()),
    }
}

/// The cache key of a query: the limit and the text (its own key: a query's text is never
/// rewritten, so two spellings are two entries, and the answer is what that text finds).
/// The text is keyed as the matching reads it (case and runs of spaces do not change an
/// answer: full-text search and pg_trgm both fold case), so spellings of one query share one
/// entry instead of each paying the ranking.
pub fn cache_key(scope: &str, query: &SearchQuery) -> String {
    let text = query
        .text
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase();
    format!("{scope}:{}:{text}", query.limit)
}

/// The condition every provider's statement selects by, on the row alias `$alias` (a table
/// with a `search` tsvector and a `name`), the query text being `$1`: the English stems
/// ("price" finds "Prices", "running" finds "run"), or a name close to the text: `<%` (the text
/// is much like a part of the name: prefixes, "mach" finds "Machine") and `<<%` (the text's
/// words are much like whole words of the name: typos, "machne lerning" finds "Machine
/// learning"). Both trigram operators are index-backed at pg_trgm's default thresholds (0.6
/// and 0.5), so no connection setting is needed.
#[macro_export]
macro_rules! search_matches {
    ($alias:literal) => {
        concat!(
            "(",
            $alias,
            ".search @@ websearch_to_tsquery('english', $1) OR $1 <% ",
            $alias,
            ".name OR $1 <<% ",
            $alias,
            ".name)"
        )
    };
}

/// The score every provider orders by (a `float8`), on the row alias `$alias`, the text being
/// `$1`: `ts_rank` over the weighted vector (a name match, weight A, counts well above one in
/// a description or capability, weight B) plus how much the name looks like the text.
#[macro_export]
macro_rules! search_score {
    ($alias:literal) => {
        concat!(
            "(ts_rank(",
            $alias,
            ".search, websearch_to_tsquery('english', $1)) + word_similarity($1, ",
            $alias,
            ".name))::float8"
        )
    };
}

#[cfg(test)]
mod tests {
    use super::{SearchQuery, cache_key};

    #[test]
    fn spellings_of_one_query_share_a_cache_entry() {
        let key = |text: &str, limit| {
            cache_key(
                "agents:7",
                &SearchQuery {
                    text: text.into(),
                    limit,
                },
            )
        };
        assert_eq!(key("Machine  Learning", 20), key(" machine learning ", 20));
        assert_eq!(key("A", 20), key("a", 20));
        assert_ne!(key("machine", 20), key("machine", 10));
        assert_ne!(key("machine learning", 20), key("machinelearning", 20));
    }
}
