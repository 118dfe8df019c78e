//! PostgreSQL: the shared pool, its read replicas, embedded migrations, and the private
//! embedded server.

mod conn;
mod embedded;
mod migrate;
mod pool;
mod replica;
pub mod tls;

use std::time::Duration;

pub use conn::{Conn, Pooler, Prepared, Sql, Statement, param_type};
pub use embedded::{EmbeddedPostgres, RELOCATED_ROOT, cluster_dir, find_server_binaries};
pub use migrate::{
    CORE_MIGRATIONS, Migration, MigrationId, MigrationReport, check_migrations, migrate,
    migrate_with,
};
pub use pool::{Db, DbHealth, PoolStats, Recycler, TableStats, error_chain};
pub use replica::{ReplicaHealth, ReplicaSet, probe_interval};

/// What went wrong talking to PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// Startup could not reach the server within the configured bound.
    #[error(
        "PostgreSQL at {address} is unreachable: gave up after {attempts} attempt(s) over {:.1}s; last error: {last}",
        elapsed.as_secs_f64()
    )]
    Unreachable {
        address: String,
        attempts: u32,
        elapsed: Duration,
        last: String,
    },
    /// No pool connection could be had in time (pool exhausted or server down): a 503.
    #[error("{0}")]
    Unavailable(String),
    #[error("{}", error_chain(.0))]
    Query(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Migration(String),
    #[error("invalid database configuration: {0}")]
    Config(String),
    /// The database holds something the operation must not overwrite (another account's rows).
    #[error("{0}")]
    Conflict(String),
    #[error("embedded PostgreSQL: {0}")]
    Embedded(String),
}

impl DbError {
    /// Whether the server could not be used (no connection, the connection died, the server
    /// is shutting down or starting): worth retrying shortly. A statement that ran and failed
    /// (a constraint, bad SQL, a timeout) is not. When the connection died during a `COMMIT`
    /// its outcome is unknown to us, as to any client: the write was not acknowledged.
    pub fn is_unavailable(&self) -> bool {
        match self {
            DbError::Unavailable(_) | DbError::Unreachable { .. } => true,
            DbError::Query(err) => connection_lost(err),
            _ => false,
        }
    }
}

/// A query error that says the connection or the server went away, not that the query failed.
fn connection_lost(err: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    if err.is_closed() {
        return true;
    }
    match err.code() {
        // Class 08: connection exception (but not 08P01, a protocol violation: a bug, not an
        // outage); 57P01-03: admin/crash shutdown, cannot connect now.
        Some(code) => {
            (code.code().starts_with("08") && *code != SqlState::PROTOCOL_VIOLATION)
                || [
                    SqlState::ADMIN_SHUTDOWN,
                    SqlState::CRASH_SHUTDOWN,
                    SqlState::CANNOT_CONNECT_NOW,
                ]
                .contains(code)
        }
        // No SQLSTATE: a socket that failed under us (not an encoding error of our own).
        None => std::error::Error::source(err)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .is_some_and(|io| {
                use std::io::ErrorKind::*;
                matches!(
                    io.kind(),
                    ConnectionReset
                        | ConnectionAborted
                        | ConnectionRefused
                        | BrokenPipe
                        | NotConnected
                        | UnexpectedEof
                        | TimedOut
                )
            }),
    }
}
