//! The pool and the Redis client against real servers: bounded waits, statement timeouts,
//! and recovery after the server is killed, restarted or paused.

use std::time::{Duration, Instant};

use cascade_core::config::{DatabaseConfig, DatabaseSource, RedisConfig, Secret};
use cascade_core::db::{Db, DbError};
use cascade_core::redis::{Redis, RedisError};
use cascade_testkit::{PgServer, RedisServer};

fn settings(pool_max: usize) -> DatabaseConfig {
    DatabaseConfig {
        source: DatabaseSource::Embedded {
            data_dir: Default::default(),
        },
        pool_min: 1,
        pool_max,
        acquire_timeout: Duration::from_millis(800),
        statement_timeout: Duration::from_millis(300),
        connect_timeout: Duration::from_secs(1),
        startup_timeout: Duration::from_secs(10),
        pooler: cascade_core::db::Pooler::Auto,
        direct: None,
    }
}

async fn open(pg: &PgServer, pool_max: usize) -> Db {
    let url = pg.fresh_database().await;
    Db::connect(
        &settings(pool_max),
        url.parse().unwrap(),
        format!("127.0.0.1:{}", pg.port()),
    )
    .await
    .expect("connect")
}

#[tokio::test]
async fn an_exhausted_pool_fails_fast_instead_of_hanging() {
    let pg = PgServer::start().await;
    let db = open(&pg, 1).await;
    let held = db.conn().await.unwrap();
    let started = Instant::now();
    let Err(err) = db.conn().await else {
        panic!("second acquire must fail while the only slot is held");
    };
    assert!(matches!(err, DbError::Unavailable(_)), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "waited {:?}",
        started.elapsed()
    );
    assert_eq!(db.stats().acquire_timeouts, 1);
    drop(held);
    let _again = db.conn().await.expect("the slot is free again");
}

#[tokio::test]
async fn request_connections_carry_a_statement_timeout_and_migrations_do_not() {
    let pg = PgServer::start().await;
    let db = open(&pg, 2).await;
    let conn = db.conn().await.unwrap();
    let err = conn.simple_query("SELECT pg_sleep(3)").await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{err}"
    );

    let (client, connection) = db
        .maintenance_config()
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let row = client
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "0");
}

#[tokio::test]
async fn the_pool_recovers_by_itself_after_postgres_restarts() {
    let mut pg = PgServer::start().await;
    let db = open(&pg, 4).await;
    db.conn()
        .await
        .unwrap()
        .simple_query("SELECT 1")
        .await
        .unwrap();

    pg.kill();
    let started = Instant::now();
    let health = db.health(Duration::from_secs(2)).await;
    assert!(!health.up);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "health took {:?}",
        started.elapsed()
    );

    pg.restart().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ok = match db.conn().await {
            Ok(conn) => conn.simple_query("SELECT 1").await.is_ok(),
            Err(_) => false,
        };
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "pool did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(db.health(Duration::from_secs(2)).await.up);
}

/// Connections are handed out without a check when they were handed out within the last
/// second (`pool.rs`, `Recycler`): a server restart must still never hand a caller one of the
/// dead connections it left, however soon after the restart the caller asks.
#[tokio::test]
async fn no_dead_connection_is_handed_out_after_postgres_restarts() {
    let mut pg = PgServer::start().await;
    let db = open(&pg, 4).await;
    let fill = (0..4).map(|_| async {
        let conn = db.conn().await.unwrap();
        conn.simple_query("SELECT pg_sleep(0.05)").await.unwrap();
    });
    futures_util::future::join_all(fill).await;
    assert_eq!(db.stats().size, 4, "four live connections in the pool");

    pg.kill();
    pg.restart().await;
    let db = &db;
    let queries = (0..8).map(|i| async move {
        let conn = db.conn().await.map_err(|e| format!("{i}: {e}"))?;
        conn.simple_query("SELECT 1")
            .await
            .map(|_| ())
            .map_err(|e| format!("{i}: {e}"))
    });
    let failed: Vec<String> = futures_util::future::join_all(queries)
        .await
        .into_iter()
        .filter_map(Result::err)
        .collect();
    assert!(
        failed.is_empty(),
        "dead connections were handed out: {failed:?}"
    );
}

fn redis_client(server: &RedisServer) -> Redis {
    Redis::new(&RedisConfig {
        url: Secret::new(server.url()),
        display: server.url(),
        timeout: Duration::from_millis(250),
        ca_cert: None,
        sentinel: None,
        cluster: None,
    })
    .unwrap()
}

#[tokio::test]
async fn redis_reconnects_by_itself_after_a_restart() {
    let mut server = RedisServer::start().await;
    let redis = redis_client(&server);
    let _: () = redis
        .query(redis::cmd("SET").arg("k").arg("v"))
        .await
        .unwrap();

    server.kill();
    let started = Instant::now();
    assert!(
        redis
            .query::<Option<String>>(redis::cmd("GET").arg("k"))
            .await
            .is_err()
    );
    assert!(!redis.health().await.up);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "failing took {:?}",
        started.elapsed()
    );

    server.restart().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !redis.health().await.up {
        assert!(Instant::now() < deadline, "client did not reconnect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let value: Option<String> = redis.query(redis::cmd("GET").arg("k")).await.unwrap();
    assert_eq!(value, None, "a restarted Redis is empty");
}

#[tokio::test]
async fn a_paused_redis_costs_one_deadline_not_a_hang() {
    let server = RedisServer::start().await;
    let redis = redis_client(&server);
    assert!(redis.health().await.up);
    server.pause();
    let started = Instant::now();
    let err = redis
        .query::<String>(&redis::cmd("PING"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, RedisError::Timeout(_) | RedisError::Command(_)),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    server.resume();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !redis.health().await.up {
        assert!(
            Instant::now() < deadline,
            "client did not recover after SIGCONT"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
