//! `GET /openapi.json`: the OpenAPI 3.1 document of every route, generated from the code.
//!
//! Each part comes from where its routes are registered: the server's own routes (health,
//! metrics, dashboard, identity, this document and the docs page) from [`ServerApi`], each
//! module's from [`Module::openapi`]; [`cascade_http::openapi::complete`] then adds what the
//! platform gives every route (the error shape, 413/415/429/503/504, `RateLimit-*`,
//! `Retry-After`, bearer auth). The document is built once, when the router is, and served
//! as bytes.
//!
//! What keeps it whole is `tests/openapi.rs`: it walks the composed router and fails on any
//! path or method the document does not describe, and on any the router does not answer.

#![allow(dead_code)] // the types describe bodies built elsewhere (core's `User`, `Tokens`)

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use cascade_http::Module;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::{InfoBuilder, OpenApi as Document};
use utoipa::{IntoParams, OpenApi, ToSchema};

/// The server's own operations and the identity bodies. `core` knows nothing of OpenAPI, so
/// its `User`, `Tokens` and `SessionInfo` are described here, beside the routes that send them.
#[derive(OpenApi)]
#[openapi(
    paths(
        super::health::health,
        super::health::health_db,
        super::metrics::scrape,
        super::live::live,
        super::dashboard::dashboard,
        super::statements::statements,
        openapi_json,
        super::docs::docs,
        crate::auth::register,
        crate::auth::login,
        crate::auth::refresh,
        crate::auth::revoke,
        crate::auth::logout,
        crate::auth::me,
        crate::auth::my_sessions,
        crate::auth::end_my_session,
        super::search::search,
    ),
    tags(
        (name = "operations", description = "Health, metrics, the dashboard and this description."),
        (name = "search", description = "Search across types at once: the caller's agents and workflows, and assets, ranked together."),
        (name = "identity", description = "Accounts, sessions and tokens. Access tokens are short-lived JWTs sent as `Authorization: Bearer`; refresh tokens rotate on use."),
    )
)]
pub struct ServerApi;

/// An account, as shown to its owner (`cascade_core::identity::User`).
#[derive(ToSchema)]
pub struct User {
    id: i64,
    username: String,
    email: Option<String>,
    /// `observer`, `participant` or `architect`.
    tier: String,
    created_at: String,
    last_login: Option<String>,
    /// The Venice citizen this account is linked to (`POST /me/citizen`), if any.
    venice_username: Option<String>,
}

/// A token pair (`cascade_core::identity::Tokens`).
#[derive(ToSchema)]
pub struct Tokens {
    /// Send as `Authorization: Bearer <access_token>`.
    access_token: String,
    /// Always `Bearer`.
    token_type: String,
    /// Seconds until the access token expires.
    #[schema(minimum = 0)]
    expires_in: i64,
    /// For `POST /auth/refresh`, once.
    refresh_token: String,
    #[schema(format = "uuid")]
    session_id: String,
}

/// The account and its first token pair (`Tokens`' fields, flattened).
#[derive(ToSchema)]
pub struct Authenticated {
    user: User,
    access_token: String,
    token_type: String,
    #[schema(minimum = 0)]
    expires_in: i64,
    refresh_token: String,
    #[schema(format = "uuid")]
    session_id: String,
}

#[derive(ToSchema)]
pub struct Revoked {
    revoked: bool,
}

#[derive(ToSchema)]
pub struct Me {
    user: User,
    #[schema(format = "uuid")]
    session_id: String,
}

/// One of the caller's sessions (`cascade_core::identity::SessionInfo`).
#[derive(ToSchema)]
pub struct Session {
    #[schema(format = "uuid")]
    id: String,
    created_at: String,
    last_seen_at: String,
    expires_at: String,
    user_agent: Option<String>,
    client_addr: Option<String>,
    /// The session of the token this listing was asked with.
    current: bool,
}

#[derive(ToSchema)]
pub struct Sessions {
    sessions: Vec<Session>,
}

/// `GET /health`.
#[derive(ToSchema)]
pub struct Health {
    /// `ok`, `degraded` (Redis is down) or `down` (PostgreSQL is).
    status: String,
    version: String,
    #[schema(minimum = 0)]
    uptime_s: i64,
    postgres: String,
    redis: String,
}

/// `GET /search` parameters. `types`'s pattern is set by [`document`] to the registered types.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SearchParams {
    /// The text to find: English stems of names and descriptions (`price` finds `Prices`),
    /// prefixes of names (`mach`) and names with typos (`machne lerning`).
    #[param(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\x00-\x1F\x7F-\x9F]*$"
    )]
    q: String,
    /// The types to search, comma-separated (default: all of them).
    types: Option<String>,
    /// Most hits, 1 to 50 (default 20).
    #[param(minimum = 1, maximum = 50)]
    limit: Option<i64>,
}

/// `GET /search`.
#[derive(ToSchema)]
pub struct SearchAnswer {
    q: String,
    /// The types searched.
    types: Vec<String>,
    /// Best first.
    items: Vec<SearchItem>,
}

/// One hit.
#[derive(ToSchema)]
pub struct SearchItem {
    /// `agents`, `workflows` or `assets`.
    #[schema(rename = "type")]
    kind: String,
    /// The entity's id (an agent's number as text, an asset's version id).
    id: String,
    name: String,
    /// Higher is better; comparable across types.
    score: f64,
    /// The entity, as its own `GET` shows it.
    #[schema(value_type = cascade_http::openapi::JsonObject)]
    item: serde_json::Value,
}

/// `types` accepts the registered type names only (a list, repeats allowed).
fn constrain_types(doc: &mut Document, kinds: &[&str]) {
    let one = format!("({})", kinds.join("|"));
    let pattern = format!("^{one}(,{one})*$");
    let Some(item) = doc.paths.paths.get_mut("/search") else {
        return;
    };
    let Some(get) = item.get.as_mut() else {
        return;
    };
    for parameter in get.parameters.iter_mut().flatten() {
        if parameter.name == "types" {
            parameter.schema = Some(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(pattern.clone()))
                    .into(),
            );
        }
    }
}

/// The whole document: the server's part, every module's, and the platform's responses.
pub fn document(modules: &[Arc<dyn Module>]) -> Document {
    let mut doc = ServerApi::openapi();
    let providers = super::search_providers(modules);
    constrain_types(&mut doc, &super::search::kinds(&providers));
    for module in modules {
        doc.merge(module.openapi());
    }
    doc.info = InfoBuilder::new()
        .title("Cascade")
        .version(env!("CARGO_PKG_VERSION"))
        .description(Some(
            "PostgreSQL (truth) and Redis (cache) behind one HTTP API. Every error is \
             `{\"error\": {\"code\", \"message\", \"field\"?}}` with a stable `code`.",
        ))
        .build();
    cascade_http::openapi::complete(&mut doc);
    doc
}

/// The document, rendered once (cloning shares the bytes).
#[derive(Clone)]
struct Rendered(Bytes);

pub fn router(doc: &Document) -> Router {
    let json = serde_json::to_string(&cascade_http::openapi::render(doc)).unwrap_or_else(|err| {
        tracing::error!(error = %err, "the OpenAPI document does not serialise");
        "{}".to_string()
    });
    let rendered = Rendered(Bytes::from(json));
    Router::new().route("/openapi.json", get(move || openapi_json(rendered.clone())))
}

/// The OpenAPI 3.1 document of every route.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "This document", content_type = "application/json", body = Object))
)]
async fn openapi_json(doc: Rendered) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        doc.0,
    )
}
