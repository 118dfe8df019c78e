//! What `GET /search` finds of this module: the caller's own live agents and workflows (another
//! account's never appear, as they never do in `/agents`), by the platform's shared matching and
//! score (`cascade_http::search`).
//!
//! Each type's answers are cached briefly (`agent_search`, `workflow_search`) under the owner's
//! tag that the type's writes already remove (`agents-of:<owner>`, `workflows-of:<owner>`): the
//! next search after a create or rename sees it. The statement may run on a read replica
//! (`Db::read`), never one behind a write acknowledged before the search began.

use std::sync::Arc;

use cascade_http::search::{Hits, SearchHit, SearchQuery, cache_key, cached};
use cascade_http::{AppState, SearchProvider, search_matches, search_score};

use crate::config::{AGENT_SEARCH, WORKFLOW_SEARCH};
use crate::error::AgentError;

/// The tag of every cached search of `owner`'s workflows.
pub fn workflows_tag(owner: i64) -> String {
    format!("workflows-of:{owner}")
}

/// One owned type: its table, as its own `GET` shows a row, and where its answers are cached.
pub struct OwnedSearch {
    kind: &'static str,
    namespace: &'static str,
    tag: fn(i64) -> String,
    /// `$1` the text, `$2` the owner, `$3` the limit.
    statement: String,
}

impl OwnedSearch {
    /// The caller's agents.
    pub fn agents() -> OwnedSearch {
        OwnedSearch {
            kind: "agents",
            namespace: AGENT_SEARCH,
            tag: crate::routes::owner_tag,
            statement: statement(
                "agents a",
                "a",
                crate::queries::AGENT_JSON,
                search_matches!("a"),
                search_score!("a"),
            ),
        }
    }

    /// The caller's workflows.
    pub fn workflows() -> OwnedSearch {
        OwnedSearch {
            kind: "workflows",
            namespace: WORKFLOW_SEARCH,
            tag: workflows_tag,
            statement: statement(
                "workflows w",
                "w",
                crate::workflows::WORKFLOW_JSON,
                search_matches!("w"),
                search_score!("w"),
            ),
        }
    }

    /// Both, as the module hands them to the server.
    pub fn providers() -> Vec<Arc<dyn SearchProvider>> {
        vec![
            Arc::new(OwnedSearch::agents()),
            Arc::new(OwnedSearch::workflows()),
        ]
    }
}

fn statement(table: &str, alias: &str, json: &str, matches: &str, score: &str) -> String {
    format!(
        "SELECT {alias}.id::text, {alias}.name, {score} AS score, {json} FROM {table} \
         WHERE {alias}.owner_id = $2 AND {alias}.deleted_at IS NULL AND {matches} \
         ORDER BY score DESC, {alias}.id DESC LIMIT $3"
    )
}

impl SearchProvider for OwnedSearch {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn search<'a>(&'a self, state: &'a AppState, owner: i64, query: &'a SearchQuery) -> Hits<'a> {
        Box::pin(async move {
            let key = cache_key(&owner.to_string(), query);
            cached(state, self.namespace, &key, &[(self.tag)(owner)], || {
                state.db.read(|conn| async move {
                    let rows = conn
                        .query(&self.statement, &[&query.text, &owner, &query.limit])
                        .await
                        .map_err(AgentError::from)?;
                    Ok::<_, AgentError>(rows.iter().map(SearchHit::from_row).collect())
                })
            })
            .await
        })
    }
}
