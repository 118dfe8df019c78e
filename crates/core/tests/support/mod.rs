//! Helpers shared by the core's test binaries (each `mod support;`s it; not every binary
//! uses every helper, hence the `dead_code` allowances).

use std::time::Duration;

use cascade_core::config::{DatabaseConfig, DatabaseSource, RedisConfig, Secret};
use cascade_core::db::Db;
use cascade_core::redis::Redis;
use cascade_testkit::PgServer;

/// Pool settings for tests: small, with deadlines of a few seconds.
pub fn db_settings() -> DatabaseConfig {
    DatabaseConfig {
        source: DatabaseSource::Embedded {
            data_dir: Default::default(),
        },
        pool_min: 1,
        pool_max: 8,
        acquire_timeout: Duration::from_secs(2),
        statement_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        startup_timeout: Duration::from_secs(10),
        pooler: cascade_core::db::Pooler::Auto,
        direct: None,
    }
}

/// A pool on a fresh database of `pg` with the core migrations applied, and the database's
/// name (for [`PgServer::client`]).
#[allow(dead_code)]
pub async fn migrated_db(pg: &PgServer) -> (Db, String) {
    let url = pg.fresh_database().await;
    let db = Db::connect(&db_settings(), url.parse().unwrap(), "test".into())
        .await
        .unwrap();
    cascade_core::db::migrate(
        db.maintenance_config(),
        &[cascade_core::db::CORE_MIGRATIONS],
    )
    .await
    .unwrap();
    (db, url.rsplit('/').next().unwrap().to_string())
}

/// A client of the Redis at `url` (a proxy in front of a test server, say), with a 200 ms
/// deadline: an outage costs a test little.
#[allow(dead_code)]
pub fn redis(url: &str) -> Redis {
    Redis::new(&RedisConfig {
        url: Secret::new(url.to_string()),
        display: url.to_string(),
        timeout: Duration::from_millis(200),
        ca_cert: None,
        sentinel: None,
        cluster: None,
    })
    .unwrap()
}
