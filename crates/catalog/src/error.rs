//! The catalog's own error: what its parsing and its SQL can say went wrong, mapped to the HTTP
//! layer's [`ApiError`] by the one `From` below (so the seed command and the store never see
//! HTTP).

use cascade_core::db::DbError;
use cascade_http::ApiError;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The input is malformed; `field` names it when there is one.
    #[error("{message}")]
    BadRequest {
        field: Option<String>,
        message: String,
    },
    #[error("{0}")]
    NotFound(String),
    /// The caller does not own what it tried to change.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Db(#[from] DbError),
    /// A bug or corrupt data: a 500, logged.
    #[error("{0}")]
    Internal(String),
}

impl CatalogError {
    pub fn bad_request(field: &'static str, message: impl Into<String>) -> Self {
        CatalogError::BadRequest {
            field: Some(field.to_string()),
            message: message.into(),
        }
    }

    /// A query failed for a reason the client did not cause.
    pub fn query(err: tokio_postgres::Error) -> Self {
        CatalogError::Db(DbError::Query(err))
    }
}

impl From<CatalogError> for ApiError {
    fn from(err: CatalogError) -> Self {
        match err {
            CatalogError::BadRequest { field, message } => ApiError::BadRequest { field, message },
            CatalogError::NotFound(message) => ApiError::NotFound(message),
            CatalogError::Forbidden(message) => ApiError::Forbidden(message),
            CatalogError::Conflict(message) => ApiError::Conflict(message),
            CatalogError::Db(err) => err.into(),
            CatalogError::Internal(message) => {
                ApiError::Internal(std::io::Error::other(message).into())
            }
        }
    }
}
