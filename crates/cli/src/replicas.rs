//! `cascade check`'s look at each read replica (`DATABASE_REPLICA_URLS`): the conditions on
//! which a server's health loop puts a replica in rotation (`crates/core/src/db/replica.rs`),
//! checked once. A replica that does not answer, is not in recovery (a primary, a standalone
//! server, a promoted replica) or is a copy of another cluster fails the check: the server
//! would never read from it, so the configuration is wrong. A replica further behind than
//! `DATABASE_REPLICA_MAX_LAG` is a warning: it is out of rotation until it catches up, its
//! reads go to the primary meanwhile.

use std::time::{Duration, Instant};

use cascade_core::config::{DatabaseConfig, DatabaseSource, ReplicaConfig};
use cascade_core::db::{Conn, Db};

use crate::check::connect;
use tokio_postgres::types::PgLsn;

/// How often the lag check asks the replica how far it has replayed.
const POLL: Duration = Duration::from_millis(20);

/// One line of the check: `fails` makes `cascade check` exit 1, a line that is neither ok nor
/// failing is a warning.
pub struct Verdict {
    pub name: String,
    pub ok: bool,
    pub fails: bool,
    pub detail: String,
}

impl Verdict {
    fn new(name: &str, ok: bool, fails: bool, detail: String) -> Verdict {
        Verdict {
            name: name.to_string(),
            ok,
            fails,
            detail,
        }
    }
}

/// What the replicas are compared with: the primary's cluster and its WAL.
struct Primary {
    db: Db,
    conn: Conn,
    system_id: i64,
    synchronous_commit: String,
}

impl Primary {
    async fn open(database: &DatabaseConfig, deadline: Duration) -> Result<Primary, String> {
        let (db, conn) = connect(database, &database.source, deadline).await?;
        let row = bounded(
            deadline,
            conn.query_one(
                "SELECT (SELECT system_identifier FROM pg_control_system()), \
                 current_setting('synchronous_commit')",
                &[],
            ),
        )
        .await?;
        Ok(Primary {
            db,
            conn,
            system_id: row.get(0),
            synchronous_commit: row.get(1),
        })
    }

    async fn wal_position(&self, deadline: Duration) -> Result<u64, String> {
        let row = bounded(
            deadline,
            self.conn.query_one("SELECT pg_current_wal_lsn()", &[]),
        )
        .await?;
        Ok(u64::from(row.get::<_, PgLsn>(0)))
    }
}

/// Every configured replica's verdict (none when no replica is configured), and one on the
/// primary's `synchronous_commit`, on which read-your-writes through replicas relies.
pub async fn check(
    database: &DatabaseConfig,
    replicas: &ReplicaConfig,
    deadline: Duration,
) -> Vec<Verdict> {
    if replicas.sources.is_empty() {
        return vec![Verdict::new(
            "pg replicas",
            true,
            false,
            "not configured: every read on the primary".into(),
        )];
    }
    let primary = Primary::open(database, deadline).await;
    let mut verdicts = Vec::new();
    for (i, source) in replicas.sources.iter().enumerate() {
        let name = if replicas.sources.len() == 1 {
            "pg replica".to_string()
        } else {
            format!("pg replica {}", i + 1)
        };
        let address = match source {
            DatabaseSource::External { address, .. } => address.as_str(),
            DatabaseSource::Embedded { .. } => "?",
        };
        let (ok, fails, detail) = match check_one(
            database,
            source,
            primary.as_ref(),
            replicas.max_lag,
            deadline,
        )
        .await
        {
            Ok(Ok(fine)) => (true, false, fine),
            Ok(Err(lagging)) => (false, false, lagging),
            Err(wrong) => (false, true, wrong),
        };
        verdicts.push(Verdict::new(
            &name,
            ok,
            fails,
            format!("{address}: {detail}"),
        ));
    }
    if let Ok(primary) = &primary {
        let commit = primary.synchronous_commit.as_str();
        verdicts.push(if matches!(commit, "on" | "local" | "remote_write" | "remote_apply") {
            Verdict::new(
                "synchronous_commit",
                true,
                false,
                format!("{commit} on the primary: a write is acknowledged after its WAL is written, so a read's fence covers it"),
            )
        } else {
            Verdict::new(
                "synchronous_commit",
                false,
                false,
                format!(
                    "{commit} on the primary: a write can be acknowledged before its WAL is \
                     written, and a replica read right after it can miss it (read-your-writes \
                     breaks); set synchronous_commit to on or local"
                ),
            )
        });
        primary.db.close();
    }
    verdicts
}

/// `Ok(Ok(_))` a replica in order, `Ok(Err(_))` one too far behind or not fully checked (a
/// warning), `Err(_)` one the server would never read from (a failure).
async fn check_one(
    database: &DatabaseConfig,
    source: &DatabaseSource,
    primary: Result<&Primary, &String>,
    max_lag: Duration,
    deadline: Duration,
) -> Result<Result<String, String>, String> {
    let (db, conn) = connect(database, source, deadline).await?;
    let judged = judge(&conn, primary, max_lag, deadline).await;
    drop(conn);
    db.close();
    judged
}

async fn judge(
    replica: &Conn,
    primary: Result<&Primary, &String>,
    max_lag: Duration,
    deadline: Duration,
) -> Result<Result<String, String>, String> {
    let row = bounded(
        deadline,
        replica.query_one(
            "SELECT pg_is_in_recovery(), (SELECT system_identifier FROM pg_control_system())",
            &[],
        ),
    )
    .await?;
    let (in_recovery, system_id): (bool, i64) = (row.get(0), row.get(1));
    if !in_recovery {
        return Err(
            "answers, but is not in recovery: a primary or a standalone server (or a \
             promoted replica), not a streaming replica; the server never reads from it. \
             Point DATABASE_REPLICA_URLS at a replica (pg_basebackup -R, docs/deploy.md)"
                .into(),
        );
    }
    let primary = match primary {
        Ok(primary) => primary,
        // The primary's own line fails the check; this one can only say what is unknown.
        Err(why) => {
            return Ok(Err(format!(
                "in recovery; its cluster and lag not checked: the primary does not answer ({why})"
            )));
        }
    };
    if system_id != primary.system_id {
        return Err(format!(
            "a replica of another cluster: system_identifier {system_id}, the primary's is {}; \
             the server never reads from it",
            primary.system_id
        ));
    }
    // The lag as the server measures it: how long the replica takes to replay the position
    // the primary has now. A caught-up replica has replayed it already.
    let target = primary.wal_position(deadline).await?;
    let bound = max_lag.min(deadline);
    let started = Instant::now();
    loop {
        let row = bounded(
            deadline,
            replica.query_one("SELECT pg_last_wal_replay_lsn()", &[]),
        )
        .await?;
        let replayed = row.get::<_, Option<PgLsn>>(0).map_or(0, u64::from);
        let waited = started.elapsed();
        if replayed >= target {
            return Ok(Ok(format!(
                "in recovery, a replica of the primary's cluster, replayed the primary's \
                 current WAL position in {} ms (DATABASE_REPLICA_MAX_LAG {max_lag:?})",
                waited.as_millis()
            )));
        }
        if waited >= bound {
            let behind = format!(
                "{} bytes of the primary's WAL not replayed after {} ms",
                target - replayed,
                waited.as_millis()
            );
            return Ok(Err(if bound < max_lag {
                format!(
                    "{behind}: at least that far behind (DATABASE_REPLICA_MAX_LAG \
                     {max_lag:?}); replay paused, or the replica cannot keep up?"
                )
            } else {
                format!(
                    "{behind}: further behind than DATABASE_REPLICA_MAX_LAG {max_lag:?}, so \
                     out of rotation (its reads go to the primary) until it catches up; \
                     replay paused, or the replica cannot keep up?"
                )
            }));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `query` under `deadline`, its error as text.
async fn bounded<T>(
    deadline: Duration,
    query: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, String> {
    tokio::time::timeout(deadline, query)
        .await
        .map_err(|_| format!("no answer within {deadline:?}"))?
        .map_err(|e| cascade_core::db::error_chain(&e))
}
