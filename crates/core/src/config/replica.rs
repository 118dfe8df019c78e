//! PostgreSQL read replicas: where they are, how far behind one may fall before it leaves
//! rotation, and how long a replica may take to answer (`db/replica.rs` uses them).

use std::time::Duration;

use super::database::DatabaseSource;
use super::parser::{Parser, SECOND};

const MILLI: Duration = Duration::from_millis(1);

/// `DATABASE_REPLICA_URLS` and the replicas' bounds.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RawReplicas {
    /// Streaming replicas of DATABASE_URL, comma separated, same URL syntax (sslmode,
    /// sslrootcert; a comma inside a password must be written %2C). Cache loads of listings
    /// and assets, and search, may read from them; every other query goes to the primary
    /// [default: none].
    #[arg(
        long,
        env = "DATABASE_REPLICA_URLS",
        global = true,
        hide_env_values = true
    )]
    pub database_replica_urls: Option<String>,
    /// How far (in time) a replica may fall behind the primary before it leaves rotation;
    /// it comes back once it is within the bound again [default: 1s].
    #[arg(long, env = "DATABASE_REPLICA_MAX_LAG", global = true)]
    pub database_replica_max_lag: Option<String>,
    /// Deadline of a read or a health probe on a replica: past it the read is cancelled
    /// there and retried on the primary, and the replica leaves rotation until a probe
    /// answers; so it must exceed the slowest read routed to replicas [default: 1s].
    #[arg(long, env = "DATABASE_REPLICA_TIMEOUT", global = true)]
    pub database_replica_timeout: Option<String>,
}

/// The validated replica settings; `sources` is empty when none are configured.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    pub sources: Vec<DatabaseSource>,
    pub max_lag: Duration,
    pub timeout: Duration,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        ReplicaConfig {
            sources: Vec::new(),
            max_lag: SECOND,
            timeout: SECOND,
        }
    }
}

impl ReplicaConfig {
    pub(super) fn parse(p: &mut Parser, raw: &RawReplicas, primary: &DatabaseSource) -> Self {
        let var = "DATABASE_REPLICA_URLS";
        let mut sources = Vec::new();
        for url in raw
            .database_replica_urls
            .iter()
            .flat_map(|urls| urls.split(','))
            .map(str::trim)
            .filter(|url| !url.is_empty())
        {
            match DatabaseSource::from_url(url) {
                Ok(source) => sources.push(source),
                Err(why) => p.fail(var, why),
            }
        }
        if !sources.is_empty() && matches!(primary, DatabaseSource::Embedded { .. }) {
            p.fail(
                var,
                "replicas need an external primary: set DATABASE_URL (the embedded PostgreSQL has no replicas)",
            );
        }
        let max_lag = p.positive_duration(
            "DATABASE_REPLICA_MAX_LAG",
            &raw.database_replica_max_lag,
            SECOND,
        );
        let timeout = p.positive_duration(
            "DATABASE_REPLICA_TIMEOUT",
            &raw.database_replica_timeout,
            1000 * MILLI,
        );
        ReplicaConfig {
            sources,
            max_lag,
            timeout,
        }
    }

    /// Rows for `cascade config`, URLs redacted.
    pub fn describe(&self) -> Vec<(&'static str, String)> {
        let urls = self
            .sources
            .iter()
            .map(|source| match source {
                DatabaseSource::External { display, .. } => display.clone(),
                DatabaseSource::Embedded { .. } => String::new(),
            })
            .collect::<Vec<_>>();
        vec![
            (
                "DATABASE_REPLICA_URLS",
                if urls.is_empty() {
                    "(not set: every read on the primary)".into()
                } else {
                    urls.join(",")
                },
            ),
            (
                "DATABASE_REPLICA_MAX_LAG",
                format!("{}s", self.max_lag.as_secs_f64()),
            ),
            (
                "DATABASE_REPLICA_TIMEOUT",
                format!("{}s", self.timeout.as_secs_f64()),
            ),
        ]
    }
}
