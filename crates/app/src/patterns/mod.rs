//! Consciousness patterns (seed 001's flow): `GET /patterns/{type}` and
//! `GET /patterns?type=&limit=&cursor=`.
//!
//! A read goes cache (namespace `patterns`, key the type: `cascade:patterns:{type}`, TTL
//! `CONSCIOUSNESS_CACHE_TTL`) → the `consciousness_patterns` row if it has not expired →
//! Venice (the list the type reads, through the Venice connector: its pool, retries and
//! breaker) → the transform (`transform.rs`) → the row, upserted with `expires_at` = now +
//! `CONSCIOUSNESS_CACHE_TTL` → the cache. The cached copy carries `expires_at`: a copy past it
//! is dropped and read again, so nobody is served a pattern past its expiry as fresh.
//!
//! A load from Venice invalidates the connector's own copy of the list first: a pattern's
//! `cached_at` is when Venice was read, not when an older cached answer was. While Venice
//! fails (or its breaker is open), an expired row younger than `VENICE_STALE_IF_ERROR` is
//! served with `stale: true` and `Warning: 110` (and not cached, so the next read tries
//! Venice again); without one, a 503 with `Retry-After`.
//!
//! Background: `sync.rs` refreshes rows about to expire, on one instance at a time. Any
//! refresh whose content differs from the stored one publishes `pattern.changed` on the
//! `cascade-events` channel (`state.events`).

pub mod store;
pub mod sync;
pub mod transform;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use cascade_core::cache::CacheError;
use cascade_http::{ApiError, CurrentUser};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::config::{PATTERNS, VENICE};
use crate::{AppModuleState, AppShared, venice};
use store::Pattern;

/// Where pattern events go (seed 004's channel of CASCADE-wide events).
pub const EVENTS_CHANNEL: &str = "cascade-events";
/// The event a content change publishes.
pub const CHANGED: &str = "pattern.changed";

/// The pattern types: a fixed set, each computed from one Venice list. Ordered by name (the
/// listing's order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PatternType {
    CollectiveActivity,
    EconomicConsciousness,
    SocialConsciousness,
}

impl PatternType {
    /// Every type, by name.
    pub const ALL: [PatternType; 3] = [
        PatternType::CollectiveActivity,
        PatternType::EconomicConsciousness,
        PatternType::SocialConsciousness,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PatternType::CollectiveActivity => "collective_activity",
            PatternType::EconomicConsciousness => "economic_consciousness",
            PatternType::SocialConsciousness => "social_consciousness",
        }
    }

    /// The Venice endpoint it reads (`venice_source`).
    pub fn source(self) -> &'static str {
        match self {
            PatternType::CollectiveActivity => "/activities",
            PatternType::EconomicConsciousness => "/citizens",
            PatternType::SocialConsciousness => "/relationships",
        }
    }

    /// The connector's cache key of that list (`cascade:venice:{endpoint}:{params}`).
    fn venice_key(self) -> &'static str {
        match self {
            PatternType::CollectiveActivity => "activities:all",
            PatternType::EconomicConsciousness => "citizens:all",
            PatternType::SocialConsciousness => "relationships:all",
        }
    }

    fn transform(self, answer: &Value) -> Result<Value, transform::Unusable> {
        match self {
            PatternType::CollectiveActivity => transform::activity(answer),
            PatternType::EconomicConsciousness => transform::economic(answer),
            PatternType::SocialConsciousness => transform::social(answer),
        }
    }

    pub fn from_name(name: &str) -> Option<PatternType> {
        PatternType::ALL.into_iter().find(|t| t.name() == name)
    }

    /// One of the known names, exactly; anything else is a 400 that lists them (and does not
    /// echo what was sent: it may be 10 KB or hold control characters).
    pub fn parse(field: &'static str, text: &str) -> Result<PatternType, ApiError> {
        PatternType::from_name(text).ok_or_else(|| {
            let known: Vec<&str> = PatternType::ALL.iter().map(|t| t.name()).collect();
            ApiError::bad_request(
                field,
                format!("{field} must be one of {}", known.join(", ")),
            )
        })
    }
}

/// A pattern as served: fresh, or the last stored one while Venice fails.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Served {
    #[serde(flatten)]
    pub pattern: Pattern,
    /// True when Venice could not be read and this copy is past its `expires_at`.
    pub stale: bool,
}

/// Why a load gave no fresh pattern.
#[derive(Debug, thiserror::Error)]
enum LoadError {
    /// Venice failed; this expired row is within the stale bound.
    #[error("Venice failed; serving the stored pattern")]
    Stale(Box<Pattern>),
    #[error(transparent)]
    Api(ApiError),
}

/// The pattern of `kind`, through the cache (see the module doc).
pub async fn current(state: &AppShared, kind: PatternType) -> Result<Served, ApiError> {
    let cache = &state.app.cache;
    let mut last = None;
    // Twice at most: a cached copy past its expiry is dropped once and read again.
    for _ in 0..2 {
        let loaded = cache
            .get_or_load(PATTERNS, kind.name(), &[], || load(state, kind))
            .await;
        match loaded {
            Ok(Some(pattern)) if !pattern.expired() => {
                return Ok(Served {
                    pattern,
                    stale: false,
                });
            }
            Ok(Some(pattern)) => {
                cache.invalidate(PATTERNS, kind.name()).await;
                last = Some(pattern);
            }
            Ok(None) => break,
            Err(CacheError::Load(LoadError::Stale(pattern))) => {
                return Ok(Served {
                    pattern: *pattern,
                    stale: true,
                });
            }
            Err(CacheError::Load(LoadError::Api(err))) => return Err(err),
            Err(CacheError::Codec(err)) => return Err(ApiError::Internal(err.into())),
        }
    }
    // Expired again at once (a TTL shorter than a load): it is still the newest there is.
    last.map(|pattern| Served {
        pattern,
        stale: false,
    })
    .ok_or_else(|| ApiError::Internal(std::io::Error::other("a pattern load gave nothing").into()))
}

/// The loader: the row while it is fresh, else Venice (falling back on the expired row).
async fn load(state: &AppShared, kind: PatternType) -> Result<Option<Pattern>, LoadError> {
    let row = store::find(&state.app.db, kind.name())
        .await
        .map_err(|err| LoadError::Api(err.into()))?;
    if let Some(pattern) = &row
        && !pattern.expired()
    {
        return Ok(row);
    }
    match refresh(state, kind).await {
        Ok(stored) => Ok(Some(stored.pattern)),
        Err(err) => {
            let bound = state.config.venice_client.stale_if_error.as_millis() as i64;
            match row {
                Some(pattern)
                    if matches!(err, ApiError::Unavailable { .. })
                        && store::now_ms() - pattern.cached_at_ms <= bound =>
                {
                    Err(LoadError::Stale(Box::new(pattern)))
                }
                _ => Err(LoadError::Api(err)),
            }
        }
    }
}

/// Reads Venice afresh, transforms, upserts; publishes `pattern.changed` when the content
/// changed. A stale answer of the connector (Venice failing) is no refresh: an error.
pub async fn refresh(state: &AppShared, kind: PatternType) -> Result<store::Stored, ApiError> {
    let app = &state.app;
    app.cache.invalidate(VENICE, kind.venice_key()).await;
    let fetched = state
        .venice
        .get_json(kind.venice_key(), kind.source(), &[])
        .await
        .map_err(venice::unavailable)?;
    let fetched = match fetched {
        Some(fetched) if !fetched.stale => fetched,
        Some(_) => {
            return Err(venice_failed(format!(
                "Venice {} is failing",
                kind.source()
            )));
        }
        None => return Err(venice_failed(format!("Venice has no {}", kind.source()))),
    };
    let answer: Value = serde_json::from_slice(fetched.data())
        .map_err(|err| venice_failed(format!("Venice {}: {err}", kind.source())))?;
    let data = kind
        .transform(&answer)
        .map_err(|err| venice_failed(err.to_string()))?;
    let ttl = state.config.consciousness.cache_ttl;
    let stored = store::upsert(&app.db, kind.name(), kind.source(), &data, ttl).await?;
    if stored.changed {
        let pattern = &stored.pattern;
        let event = json!({
            "type": pattern.pattern_type,
            "version": pattern.version,
            "changed_at": pattern.changed_at,
            "emergence_score": pattern.data.get("emergence_score"),
        });
        // Failures are logged and counted by `publish`; the refresh itself stands.
        let _ = app.events.publish(EVENTS_CHANNEL, CHANGED, event).await;
    }
    Ok(stored)
}

fn venice_failed(message: String) -> ApiError {
    ApiError::Unavailable {
        message,
        retry_after: std::time::Duration::from_secs(1),
    }
}

fn respond(served: &Served) -> Response {
    let mut response = Json(served).into_response();
    if served.stale {
        response.headers_mut().insert(
            header::WARNING,
            HeaderValue::from_static("110 - \"Response is Stale\""),
        );
    }
    response
}

/// `GET /patterns/{type}`.
#[utoipa::path(get, path = "/patterns/{type}", tag = "patterns", security((), ("bearer" = [])),
    params(("type" = String, Path, description = "A pattern type: collective_activity, economic_consciousness or social_consciousness", pattern = "^(collective_activity|economic_consciousness|social_consciousness)$")),
    responses(
        (status = 200, description = "The pattern (`stale: true` and `Warning: 110` when Venice failed and it is past its expiry)", body = Served),
        (status = 400, description = "Not a known pattern type"),
        (status = 401, description = "An Authorization header with a bad token (without one, the read is anonymous; with a good one, the view is logged)"),
        (status = 503, description = "Venice is unavailable and no stored pattern younger than VENICE_STALE_IF_ERROR exists (Retry-After)"),
    )
)]
pub async fn pattern(
    State(state): State<AppModuleState>,
    viewer: Option<CurrentUser>,
    Path(kind): Path<String>,
) -> Result<Response, ApiError> {
    let kind = PatternType::parse("type", &kind)?;
    let served = current(&state, kind).await?;
    record_view(&state, viewer.as_ref(), &served);
    Ok(respond(&served))
}

/// A signed-in reader's view goes to the interaction log (seed 001's `pattern_view`, with the
/// type, the emergence score and the citizens it names); anonymous reads are not logged.
fn record_view(state: &AppShared, viewer: Option<&CurrentUser>, served: &Served) {
    let Some(CurrentUser(me)) = viewer else {
        return;
    };
    let data = &served.pattern.data;
    state.interactions.record(
        me.user_id,
        crate::InteractionKind::PatternView,
        serde_json::json!({
            "type": served.pattern.pattern_type,
            "version": served.pattern.version,
            "emergence_score": data.get("emergence_score"),
            "venice_citizens": data.get("venice_citizens"),
        }),
    );
}

/// `GET /patterns` parameters as received: parsed by [`ListQuery::parse`].
#[derive(Debug, Default, Deserialize)]
pub struct ListParams {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub limit: Option<String>,
    pub cursor: Option<String>,
}

/// A parsed `GET /patterns` query.
#[derive(Debug, PartialEq)]
pub struct ListQuery {
    pub kind: Option<PatternType>,
    pub limit: usize,
    /// The last type of the previous page.
    pub after: Option<PatternType>,
}

impl ListQuery {
    pub const MAX_LIMIT: usize = 100;
    pub const DEFAULT_LIMIT: usize = 20;

    pub fn parse(raw: &ListParams) -> Result<ListQuery, ApiError> {
        let kind = raw
            .kind
            .as_deref()
            .map(|t| PatternType::parse("type", t))
            .transpose()?;
        let limit = match raw.limit.as_deref() {
            None => Self::DEFAULT_LIMIT,
            Some(text) => text
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=Self::MAX_LIMIT).contains(n))
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "limit",
                        format!("limit must be a whole number from 1 to {}", Self::MAX_LIMIT),
                    )
                })?,
        };
        let after = raw
            .cursor
            .as_deref()
            .map(|c| {
                PatternType::from_name(c).ok_or_else(|| {
                    ApiError::bad_request("cursor", "cursor must be a nextCursor this API gave")
                })
            })
            .transpose()?;
        Ok(ListQuery { kind, limit, after })
    }

    /// The types of this page, and whether more follow.
    pub fn page(&self) -> (Vec<PatternType>, bool) {
        let mut types: Vec<PatternType> = PatternType::ALL
            .into_iter()
            .filter(|t| self.kind.is_none_or(|k| k == *t))
            .filter(|t| self.after.is_none_or(|after| *t > after))
            .collect();
        let more = types.len() > self.limit;
        types.truncate(self.limit);
        (types, more)
    }
}

/// `GET /patterns?type=&limit=&cursor=`.
#[utoipa::path(get, path = "/patterns", tag = "patterns", security((), ("bearer" = [])), params(crate::openapi::PatternListParams),
    responses(
        (status = 200, description = "Patterns by type name, each read as `GET /patterns/{type}` reads it", body = Page),
        (status = 400, description = "An unknown type, a limit outside 1-100, or a cursor this API did not give"),
        (status = 401, description = "An Authorization header with a bad token (without one, the read is anonymous; with a good one, the views are logged)"),
        (status = 503, description = "Venice is unavailable and a pattern of the page has no stored copy younger than VENICE_STALE_IF_ERROR (Retry-After)"),
    )
)]
pub async fn list(
    State(state): State<AppModuleState>,
    viewer: Option<CurrentUser>,
    Query(params): Query<ListParams>,
) -> Result<Json<Page>, ApiError> {
    let query = ListQuery::parse(&params)?;
    let (types, more) = query.page();
    let mut items = Vec::with_capacity(types.len());
    for kind in &types {
        let served = current(&state, *kind).await?;
        record_view(&state, viewer.as_ref(), &served);
        items.push(served);
    }
    let next_cursor = more.then(|| types.last().map(|t| t.name())).flatten();
    Ok(Json(Page { items, next_cursor }))
}

/// A page of patterns, by type name.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Page {
    items: Vec<Served>,
    /// The `cursor` of the next page; null on the last.
    next_cursor: Option<&'static str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(kind: Option<&str>, limit: Option<&str>, cursor: Option<&str>) -> ListParams {
        ListParams {
            kind: kind.map(String::from),
            limit: limit.map(String::from),
            cursor: cursor.map(String::from),
        }
    }

    #[test]
    fn pages_walk_the_types_by_name() {
        let first = ListQuery::parse(&params(None, Some("2"), None)).unwrap();
        let (types, more) = first.page();
        assert_eq!(
            types,
            [
                PatternType::CollectiveActivity,
                PatternType::EconomicConsciousness
            ]
        );
        assert!(more);
        let second =
            ListQuery::parse(&params(None, Some("2"), Some("economic_consciousness"))).unwrap();
        assert_eq!(
            second.page(),
            (vec![PatternType::SocialConsciousness], false)
        );
        let one = ListQuery::parse(&params(Some("social_consciousness"), None, None)).unwrap();
        assert_eq!(one.page(), (vec![PatternType::SocialConsciousness], false));
    }

    #[test]
    fn bad_queries_name_their_field() {
        let long = "x".repeat(10_000);
        for (raw, field) in [
            (params(Some("telepathy"), None, None), "type"),
            (params(Some("economic_consciousness\n"), None, None), "type"),
            (params(Some(&long), None, None), "type"),
            (params(None, Some("0"), None), "limit"),
            (params(None, Some("101"), None), "limit"),
            (params(None, Some("99999999999999999999999"), None), "limit"),
            (params(None, Some("-1"), None), "limit"),
            (params(None, None, Some("nope")), "cursor"),
            (params(None, None, Some(&long)), "cursor"),
        ] {
            match ListQuery::parse(&raw) {
                Err(ApiError::BadRequest { field: f, .. }) => {
                    assert_eq!(f.as_deref(), Some(field))
                }
                other => panic!("{raw:?}: {other:?}"),
            }
        }
    }
}
