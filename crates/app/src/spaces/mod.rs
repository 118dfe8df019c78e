//! Collaboration spaces and consciousness sessions (seed 000): a user starts a session at a
//! consciousness level, joins spaces whose threshold that level reaches, up to each space's
//! participant limit; a session that stops sending heartbeats ends, and its user leaves the
//! spaces they joined through it.
//!
//! - [`model`]: input parsed into types that cannot hold bad values (levels are exact);
//! - [`queries`] and [`session_queries`]: the SQL, with the lock order that keeps the limit
//!   under concurrency on any number of instances; [`error`]: [`SpaceError`];
//! - [`cache`]: cache keys and tags, and what each write removes;
//! - [`routes`] (`/spaces…`) and [`sessions`] (`/consciousness/sessions…`): the handlers;
//! - [`idle`]: the background sweep that ends idle sessions, once cluster-wide.

/// `to_char` of a `TIMESTAMPTZ` column as RFC 3339 in UTC, to the millisecond.
macro_rules! utc {
    ($column:literal) => {
        concat!(
            "to_char(",
            $column,
            " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
        )
    };
}

pub mod cache;
pub mod channel;
pub mod error;
pub mod events;
pub mod idle;
pub mod model;
pub mod queries;
pub mod routes;
pub mod session_queries;
pub mod sessions;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use cascade_core::cache::{CachedBody, Invalidations};
use cascade_http::ApiError;
use tokio_postgres::Transaction;

pub use error::SpaceError;

use crate::AppModuleState;

/// A write's work inside its transaction, as a boxed future borrowing the transaction.
pub type TxWork<T> = Box<
    dyn for<'t> FnOnce(
            &'t Transaction<'t>,
        ) -> Pin<Box<dyn Future<Output = Result<T, SpaceError>> + Send + 't>>
        + Send,
>;

/// What a committed write causes: cache entries to remove, domain events to publish.
#[derive(Default)]
pub struct Effects {
    pub stale: Invalidations,
    pub events: Vec<events::DomainEvent>,
}

/// Runs `work` in a transaction, commits it, then removes what `after` says the result made
/// stale, before the caller answers (the next read anywhere sees the write), and publishes
/// the domain events `after` names.
///
/// All of it runs in the application's detached tasks (`cascade_core::tasks::Detached`): a
/// client that hangs up mid-write does not cut the invalidations short. They also run when the
/// commit fails (the connection may have died after PostgreSQL committed): removing entries
/// that did not go stale costs a reload, keeping ones that did would serve the old value.
/// Events are published only for a write that committed.
pub async fn write<T, A>(state: &AppModuleState, work: TxWork<T>, after: A) -> Result<T, ApiError>
where
    T: Send + 'static,
    A: FnOnce(&T) -> Effects + Send + 'static,
{
    let app = state.app.clone();
    let detached = app.detached.clone();
    let task = detached.run(async move {
        let mut conn = app.db.conn().await?;
        let tx = conn
            .transaction()
            .await
            .map_err(|err| ApiError::from(SpaceError::from(err)))?;
        let done = work(&tx).await?;
        let committed = tx.commit().await;
        // The connection goes back to the pool before the invalidations, which wait for every
        // instance's acknowledgement.
        drop(conn);
        let effects = after(&done);
        app.cache.invalidate_batch(&effects.stale).await;
        committed.map_err(|err| ApiError::from(SpaceError::from(err)))?;
        events::publish(&app.events, effects.events).await;
        Ok::<_, ApiError>(done)
    });
    task.await.map_err(|stopping| ApiError::Unavailable {
        message: stopping.to_string(),
        retry_after: Duration::from_secs(1),
    })?
}

/// A cached JSON body, served as a view of the cached bytes. `no-cache`: a client revalidates
/// (the server's own cache is exact, an HTTP cache's copy would not be).
pub fn json_response(body: &CachedBody) -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        Bytes::from_owner(body.bytes().clone()),
    )
        .into_response()
}

/// JSON bytes of a value read for the cache.
pub fn to_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, SpaceError> {
    serde_json::to_vec(value).map_err(|err| SpaceError::Internal(format!("encoding: {err}")))
}
