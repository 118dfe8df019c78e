//! The `catalog` module. Its routes are added here as the module grows.

use axum::Router;

use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
}
