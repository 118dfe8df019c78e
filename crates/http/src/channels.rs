//! Who may use a real-time channel of a module's family (`space:{id}` belongs to the CASCADE
//! application). The real-time module owns the WebSocket endpoint but not the modules'
//! tables: a module that owns a channel family hands the server a [`ChannelAuthorizer`]
//! ([`Module::channel_authorizers`](crate::Module::channel_authorizers)), and the real-time
//! module asks it on every subscribe and publish to a channel of that family.

use std::future::Future;
use std::pin::Pin;

use crate::error::ApiError;
use crate::state::AppState;

/// The answer's future (boxed: authorizers are trait objects of different modules).
pub type Allowed<'a> = Pin<Box<dyn Future<Output = Result<bool, ApiError>> + Send + 'a>>;

/// Decides whether an account may read and publish on `{family}:{id}`.
pub trait ChannelAuthorizer: Send + Sync + 'static {
    /// True when `user_id` may subscribe and publish to the channel `{family}:{id}`. An error
    /// (PostgreSQL down) refuses the request with a retryable error, never allows it.
    fn allows<'a>(&'a self, state: &'a AppState, user_id: i64, id: &'a str) -> Allowed<'a>;
}
