//! `GET /search?q=&types=&limit=`: every requested type's [`SearchProvider`] at once (one
//! query each, run concurrently), their hits merged into one list by score.
//!
//! The server owns the endpoint, the modules own their types (`cascade_http::search`): an
//! account's agents and workflows are its own only, assets everyone's. Each provider caches its
//! answers briefly and its module's writes remove them, so the merge itself is not cached.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{FromRef, Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use cascade_http::search::{SearchHit, SearchQuery};
use cascade_http::{ApiError, AppState, CurrentUser, SearchProvider};
use serde::Serialize;

/// The platform and the providers of every module, by type name.
#[derive(Clone)]
pub struct SearchState {
    app: AppState,
    providers: Arc<Vec<Arc<dyn SearchProvider>>>,
}

impl FromRef<SearchState> for AppState {
    fn from_ref(state: &SearchState) -> AppState {
        state.app.clone()
    }
}

pub fn router(app: AppState, providers: Vec<Arc<dyn SearchProvider>>) -> Router {
    let state = SearchState {
        app,
        providers: Arc::new(providers),
    };
    Router::new()
        .route("/search", get(search))
        .with_state(state)
}

/// The query string, as text: each field is checked by [`parse`], which names it when wrong.
#[derive(Debug, Default, serde::Deserialize)]
pub struct SearchParams {
    q: Option<String>,
    types: Option<String>,
    limit: Option<String>,
}

/// The providers of the requested types, in registration order.
type Chosen<'a> = Vec<&'a Arc<dyn SearchProvider>>;

/// What was asked: the text and limit, and the providers of the types.
fn parse<'a>(
    params: &SearchParams,
    providers: &'a [Arc<dyn SearchProvider>],
) -> Result<(SearchQuery, Chosen<'a>), ApiError> {
    let text = params.q.as_deref().unwrap_or_default();
    if text.is_empty() {
        return Err(ApiError::bad_request("q", "q: required, the text to find"));
    }
    if text.chars().count() > SearchQuery::MAX_CHARS {
        return Err(ApiError::bad_request(
            "q",
            format!("q: at most {} characters", SearchQuery::MAX_CHARS),
        ));
    }
    if text.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "q",
            "q: must not contain control characters",
        ));
    }
    let limit = match params.limit.as_deref() {
        None => SearchQuery::DEFAULT_LIMIT,
        Some(raw) => raw
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=SearchQuery::MAX_LIMIT).contains(l))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "limit",
                    format!(
                        "limit: expected a whole number from 1 to {}",
                        SearchQuery::MAX_LIMIT
                    ),
                )
            })?,
    };
    let chosen: Chosen<'a> = match params.types.as_deref() {
        None => providers.iter().collect(),
        Some(raw) => {
            let asked: BTreeSet<&str> = raw.split(',').collect();
            if let Some(unknown) = asked
                .iter()
                .find(|t| !providers.iter().any(|p| p.kind() == **t))
            {
                return Err(ApiError::bad_request(
                    "types",
                    format!(
                        "types: {unknown:?} is not a type; the types are {}",
                        kinds(providers).join(", ")
                    ),
                ));
            }
            providers
                .iter()
                .filter(|p| asked.contains(p.kind()))
                .collect()
        }
    };
    let query = SearchQuery {
        text: text.to_string(),
        limit,
    };
    Ok((query, chosen))
}

/// The type names, in registration order.
pub fn kinds(providers: &[Arc<dyn SearchProvider>]) -> Vec<&'static str> {
    providers.iter().map(|p| p.kind()).collect()
}

/// One hit of the answer.
#[derive(Serialize)]
struct Found {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(flatten)]
    hit: SearchHit,
}

/// `GET /search`.
#[utoipa::path(get, path = "/search", tag = "search", security(("bearer" = [])),
    params(crate::http::openapi::SearchParams),
    responses(
        (status = 200, description = "The hits of every requested type the caller may see, best first", body = crate::http::openapi::SearchAnswer),
        (status = 400, description = "`q` is missing, empty, too long or holds a control character, `types` names an unknown type, or `limit` is out of range (named in `field`)"),
        (status = 401, description = "No valid access token"),
    )
)]
pub async fn search(
    State(state): State<SearchState>,
    CurrentUser(me): CurrentUser,
    Query(params): Query<SearchParams>,
) -> Result<Response, ApiError> {
    let (query, chosen) = parse(&params, &state.providers)?;
    let answers = futures_util::future::try_join_all(chosen.iter().map(|provider| async {
        let hits = provider.search(&state.app, me.user_id, &query).await?;
        Ok::<_, ApiError>(hits.into_iter().map(|hit| Found {
            kind: provider.kind(),
            hit,
        }))
    }))
    .await?;
    let mut items: Vec<Found> = answers.into_iter().flatten().collect();
    // Best first; ties in a stable order (type, then id), so a page does not shuffle.
    items.sort_by(|a, b| {
        b.hit
            .score
            .total_cmp(&a.hit.score)
            .then_with(|| a.kind.cmp(b.kind))
            .then_with(|| a.hit.id.cmp(&b.hit.id))
    });
    items.truncate(query.limit as usize);
    let types: Vec<&str> = chosen.iter().map(|p| p.kind()).collect();
    let mut response = Json(serde_json::json!({
        "q": query.text,
        "types": types,
        "items": items,
    }))
    .into_response();
    // The caller's own agents and workflows: never stored by a browser or a shared cache.
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Named(&'static str);

    impl SearchProvider for Named {
        fn kind(&self) -> &'static str {
            self.0
        }

        fn search<'a>(
            &'a self,
            _: &'a AppState,
            _: i64,
            _: &'a SearchQuery,
        ) -> cascade_http::search::Hits<'a> {
            Box::pin(async { Ok(Vec::new()) })
        }
    }

    fn params(q: Option<&str>, types: Option<&str>, limit: Option<&str>) -> SearchParams {
        SearchParams {
            q: q.map(str::to_string),
            types: types.map(str::to_string),
            limit: limit.map(str::to_string),
        }
    }

    fn field(err: ApiError) -> Option<String> {
        match err {
            ApiError::BadRequest { field, .. } => field,
            other => panic!("not a 400: {other:?}"),
        }
    }

    #[test]
    fn input_is_checked_and_the_field_named() {
        let providers: Vec<Arc<dyn SearchProvider>> =
            vec![Arc::new(Named("agents")), Arc::new(Named("assets"))];
        let long = "x".repeat(201);
        for (p, expected) in [
            (params(None, None, None), "q"),
            (params(Some(""), None, None), "q"),
            (params(Some(&long), None, None), "q"),
            (params(Some("a\u{7}b"), None, None), "q"),
            (params(Some("ml"), Some("robots"), None), "types"),
            (params(Some("ml"), Some(""), None), "types"),
            (params(Some("ml"), Some("agents,"), None), "types"),
            (params(Some("ml"), None, Some("0")), "limit"),
            (params(Some("ml"), None, Some("51")), "limit"),
            (params(Some("ml"), None, Some("ten")), "limit"),
        ] {
            let err = parse(&p, &providers).err().expect("refused");
            assert_eq!(field(err).as_deref(), Some(expected), "{p:?}");
        }
        let (query, chosen) = parse(
            &params(
                Some("é".repeat(200).as_str()),
                Some("assets,assets"),
                Some("50"),
            ),
            &providers,
        )
        .expect("accepted");
        assert_eq!((query.limit, kinds_of(&chosen)), (50, vec!["assets"]));
        let (query, chosen) = parse(&params(Some(" ml "), None, None), &providers).unwrap();
        assert_eq!(query.text, " ml ");
        assert_eq!(query.limit, SearchQuery::DEFAULT_LIMIT);
        assert_eq!(kinds_of(&chosen), ["agents", "assets"]);
    }

    fn kinds_of(chosen: &[&Arc<dyn SearchProvider>]) -> Vec<&'static str> {
        chosen.iter().map(|p| p.kind()).collect()
    }
}
