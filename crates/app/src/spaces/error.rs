//! What can go wrong with a space or a consciousness session, said in the domain's words;
//! mapped to HTTP in one `From` (status and code from the platform's table).

use cascade_core::db::DbError;
use cascade_http::ApiError;

#[derive(Debug, thiserror::Error)]
pub enum SpaceError {
    /// Malformed input: a 400 naming the field. Nothing was written.
    #[error("{message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// No such space, or no such session of the caller's (another user's session is not
    /// theirs to know about).
    #[error("{0}")]
    NotFound(String),
    /// The caller may not do this (not the space's creator; no session at the level a space
    /// needs; a tier that does not include the feature). The message says why.
    #[error("{0}")]
    Forbidden(String),
    /// The state refuses it: the space is closed or full, the session has ended, a space id or
    /// an active session exists already.
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Db(#[from] DbError),
    /// A bug or corrupt data (a stored value its type refuses): a 500, logged.
    #[error("{0}")]
    Internal(String),
}

impl SpaceError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> SpaceError {
        SpaceError::Invalid {
            field,
            message: format!("{field}: {}", message.into()),
        }
    }
}

impl From<tokio_postgres::Error> for SpaceError {
    fn from(err: tokio_postgres::Error) -> Self {
        SpaceError::Db(DbError::from(err))
    }
}

impl From<SpaceError> for ApiError {
    fn from(err: SpaceError) -> Self {
        match err {
            SpaceError::Invalid { field, message } => ApiError::BadRequest {
                field: Some(field.to_string()),
                message,
            },
            SpaceError::NotFound(message) => ApiError::NotFound(message),
            SpaceError::Forbidden(message) => ApiError::Forbidden(message),
            SpaceError::Conflict(message) => ApiError::Conflict(message),
            SpaceError::Db(err) => err.into(),
            SpaceError::Internal(message) => {
                ApiError::Internal(std::io::Error::other(message).into())
            }
        }
    }
}
