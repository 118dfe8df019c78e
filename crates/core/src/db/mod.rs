//! PostgreSQL: the shared pool, embedded migrations, and the private embedded server.

mod embedded;
mod migrate;
mod pool;

use std::time::Duration;

pub use embedded::{EmbeddedPostgres, find_server_binaries};
pub use migrate::{MIGRATIONS, Migration, MigrationReport, migrate, migrate_list};
pub use pool::{Db, DbHealth, PoolStats, TableStats, error_chain};

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
    #[error("embedded PostgreSQL: {0}")]
    Embedded(String),
}
