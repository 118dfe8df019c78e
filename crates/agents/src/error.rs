//! What can go wrong with an agent, in the module's words; mapped to HTTP in one `From`.

use cascade_core::db::DbError;
use cascade_http::ApiError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Malformed input: a 400 naming the field. Nothing was written.
    #[error("{message}")]
    Invalid { field: String, message: String },
    /// No such agent of the caller's (another account's agents are not theirs to know about).
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Db(#[from] DbError),
    /// A bug or corrupt data: a 500, logged.
    #[error("{0}")]
    Internal(String),
}

impl AgentError {
    pub fn invalid(field: impl Into<String>, message: impl std::fmt::Display) -> AgentError {
        let field = field.into();
        AgentError::Invalid {
            message: format!("{field}: {message}"),
            field,
        }
    }
}

impl From<tokio_postgres::Error> for AgentError {
    fn from(err: tokio_postgres::Error) -> Self {
        AgentError::Db(DbError::from(err))
    }
}

impl From<AgentError> for ApiError {
    fn from(err: AgentError) -> Self {
        match err {
            AgentError::Invalid { field, message } => ApiError::BadRequest {
                field: Some(field),
                message,
            },
            AgentError::NotFound(message) => ApiError::NotFound(message),
            AgentError::Db(err) => err.into(),
            AgentError::Internal(message) => {
                ApiError::Internal(std::io::Error::other(message).into())
            }
        }
    }
}
