//! What `GET /search` finds of the catalog: assets, by the platform's shared matching and
//! score (`cascade_http::search`). Assets are public (as `/listings` is), so every caller sees
//! the same answers: cached once per text and limit (`asset_search`), removed with the
//! listings by every asset write (`invalidation.rs`).

use cascade_http::search::{Hits, SearchQuery, cache_key, cached};
use cascade_http::{AppState, SearchProvider};

use crate::config::ASSET_SEARCH;
use crate::queries;

pub struct AssetSearch;

impl SearchProvider for AssetSearch {
    fn kind(&self) -> &'static str {
        "assets"
    }

    fn search<'a>(&'a self, state: &'a AppState, _user: i64, query: &'a SearchQuery) -> Hits<'a> {
        Box::pin(async move {
            cached(state, ASSET_SEARCH, &cache_key("all", query), &[], || {
                state.db.read(|conn| async move {
                    queries::search(&conn, &query.text, query.limit).await
                })
            })
            .await
        })
    }
}
