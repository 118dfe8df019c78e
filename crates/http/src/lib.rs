//! What a module's router needs from HTTP, below every module so no module imports the server:
//!
//! - [`state`]: [`AppState`], the platform's handles (pool, Redis, cache engine, identity,
//!   rate limiter, configuration) that every handler reaches;
//! - [`error`]: [`ApiError`], the one error type of the HTTP layer, with its stable code table;
//! - [`extract`]: [`JsonBody`], the JSON body extractor whose errors name the field;
//! - [`auth`]: [`CurrentUser`], the authenticated caller, and the rate limits it enforces;
//! - [`module`]: [`Module`], what an application module hands the server (migrations, router,
//!   background tasks, its part of the OpenAPI document);
//! - [`channels`]: [`ChannelAuthorizer`], how a module says who may use its real-time channels;
//! - [`search`]: [`SearchProvider`], how a module lets `GET /search` find its types;
//! - [`fast`]: [`FastRoute`], a hot `GET` route the edge serves past the router;
//! - [`openapi`]: the platform's part of that document (the error shape, bearer auth, the
//!   responses every route can give).

pub mod auth;
pub mod channels;
pub mod error;
pub mod extract;
pub mod fast;
pub mod module;
pub mod openapi;
pub mod search;
pub mod state;

pub use auth::CurrentUser;
pub use channels::ChannelAuthorizer;
pub use error::ApiError;
pub use extract::JsonBody;
pub use fast::FastRoute;
pub use module::Module;
pub use search::SearchProvider;
pub use state::AppState;
