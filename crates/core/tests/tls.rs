//! TLS to PostgreSQL as `sslmode` asks, against a real server started with certificates made
//! by the test kit's `openssl`: a private CA, a server certificate for `localhost` and one for another
//! name.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cascade_core::config::{DatabaseConfig, DatabaseSource};
use cascade_core::db::{Db, DbError};
use cascade_testkit::{PgServer, Pki};

fn settings(source: DatabaseSource) -> DatabaseConfig {
    DatabaseConfig {
        source,
        pool_min: 1,
        pool_max: 2,
        acquire_timeout: Duration::from_secs(2),
        statement_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        startup_timeout: Duration::from_secs(20),
        pooler: cascade_core::db::Pooler::Auto,
        direct: None,
    }
}

/// Opens a pool on `url` as `cascade serve` would.
async fn open(url: &str) -> Result<Db, DbError> {
    let source = DatabaseSource::from_url(url).map_err(DbError::Config)?;
    let DatabaseSource::External {
        config, address, ..
    } = &source
    else {
        unreachable!("a URL is an external server");
    };
    let (config, address) = ((**config).clone(), address.clone());
    Db::connect(&settings(source), config, address).await
}

/// Whether the pool's connection is encrypted, as the server sees it.
async fn encrypted(db: &Db) -> bool {
    let conn = db.conn().await.expect("a connection");
    conn.query_one(
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        &[],
    )
    .await
    .expect("pg_stat_ssl")
    .get(0)
}

fn url(pg: &PgServer, host: &str, params: &str) -> String {
    format!(
        "postgresql://postgres@{host}:{}/postgres?{params}",
        pg.port()
    )
}

/// [`open`] on `localhost` with a verifying `mode` and the roots in `ca`.
async fn to_localhost(pg: &PgServer, mode: &str, ca: &str) -> Result<Db, DbError> {
    open(&url(
        pg,
        "localhost",
        &format!("sslmode={mode}&sslrootcert={ca}"),
    ))
    .await
}

#[tokio::test]
async fn verify_full_connects_encrypted_to_the_named_server() {
    let pki = Pki::new();
    let (cert, key) = pki.server("localhost");
    let pg = PgServer::start_tls(&cert, &key).await;

    let db = to_localhost(&pg, "verify-full", &pki.ca())
        .await
        .expect("verify-full with the right CA and name");
    assert!(encrypted(&db).await);
    // Migrations and LISTEN connections use the same TLS as the pool.
    let report = cascade_core::db::migrate_with(
        db.maintenance_config(),
        db.tls(),
        &[cascade_core::db::CORE_MIGRATIONS],
    )
    .await
    .expect("migrations over TLS");
    assert!(!report.applied.is_empty());

    // prefer (the default) takes TLS when the server offers it; disable never does.
    let db = open(&url(&pg, "127.0.0.1", "")).await.expect("prefer");
    assert!(encrypted(&db).await, "prefer uses the server's TLS");
    let db = open(&url(&pg, "127.0.0.1", "sslmode=disable"))
        .await
        .expect("disable");
    assert!(!encrypted(&db).await);
    // require encrypts without checking the certificate (libpq's meaning).
    let db = open(&url(&pg, "127.0.0.1", "sslmode=require"))
        .await
        .expect("require");
    assert!(encrypted(&db).await);
}

#[tokio::test]
async fn a_certificate_for_another_name_fails_verify_full_at_once_with_a_clear_message() {
    let pki = Pki::new();
    let (cert, key) = pki.server("wrong.example");
    let pg = PgServer::start_tls(&cert, &key).await;

    let started = Instant::now();
    let err = to_localhost(&pg, "verify-full", &pki.ca())
        .await
        .err()
        .expect("the name does not match");
    let message = err.to_string();
    assert!(
        message.contains("not valid for name") && message.contains("localhost"),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a refused certificate is not retried for the whole startup bound: {:?}",
        started.elapsed()
    );

    // verify-ca checks the chain only: the same server is accepted.
    let db = to_localhost(&pg, "verify-ca", &pki.ca())
        .await
        .expect("verify-ca ignores the name");
    assert!(encrypted(&db).await);

    // A CA that did not sign the certificate: refused, even by verify-ca.
    let err = to_localhost(&pg, "verify-ca", &pki.other_ca())
        .await
        .err()
        .expect("unknown issuer");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
}

#[tokio::test]
async fn require_refuses_a_server_without_tls_and_prefer_falls_back() {
    let pg = PgServer::start().await;
    let started = Instant::now();
    let err = open(&url(&pg, "127.0.0.1", "sslmode=require"))
        .await
        .err()
        .expect("the server offers no TLS");
    assert!(
        err.to_string().contains("server does not support TLS"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    let db = open(&url(&pg, "127.0.0.1", "sslmode=prefer"))
        .await
        .expect("prefer accepts plain text");
    assert!(!encrypted(&db).await);
}

#[test]
fn bad_ssl_parameters_are_refused_naming_them() {
    let err = DatabaseSource::from_url("postgresql://u@db/app?sslmode=verify")
        .err()
        .unwrap();
    assert!(err.contains("sslmode"), "{err}");
    let err = DatabaseSource::from_url("postgresql://u@db/app?sslkey=/k.pem")
        .err()
        .unwrap();
    assert!(err.contains("sslkey"), "{err}");
}

fn redis_config(url: String, ca_cert: Option<String>) -> cascade_core::config::RedisConfig {
    cascade_core::config::RedisConfig {
        display: url.clone(),
        url: cascade_core::config::Secret::new(url),
        timeout: Duration::from_secs(2),
        ca_cert: ca_cert.map(PathBuf::from),
        sentinel: None,
        cluster: None,
    }
}

/// `PING` through Cascade's Redis client.
async fn redis_ping(config: &cascade_core::config::RedisConfig) -> Result<String, String> {
    let redis = cascade_core::redis::Redis::new(config).map_err(|e| e.to_string())?;
    redis
        .query::<String>(&redis::cmd("PING"))
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn rediss_checks_the_server_against_redis_ca_cert() {
    let pki = Pki::new();
    let (cert, key) = pki.server("localhost");
    let server = cascade_testkit::RedisServer::start_tls(&cert, &key).await;

    let answer = redis_ping(&redis_config(server.tls_url(), Some(pki.ca())))
        .await
        .expect("rediss:// with the CA that signed the server");
    assert_eq!(answer, "PONG");

    // The system's roots do not know the test CA: refused, not silently accepted.
    let err = redis_ping(&redis_config(server.tls_url(), None))
        .await
        .expect_err("an unknown issuer");
    assert!(err.contains("UnknownIssuer"), "{err}");

    // Another CA: refused as well.
    let err = redis_ping(&redis_config(server.tls_url(), Some(pki.other_ca())))
        .await
        .expect_err("signed by another CA");
    assert!(err.contains("UnknownIssuer"), "{err}");
}

#[tokio::test]
async fn rediss_refuses_a_certificate_for_another_name() {
    let pki = Pki::new();
    let (cert, key) = pki.server("wrong.example");
    let server = cascade_testkit::RedisServer::start_tls(&cert, &key).await;
    let err = redis_ping(&redis_config(server.tls_url(), Some(pki.ca())))
        .await
        .expect_err("the name does not match");
    assert!(err.contains("not valid for name \"localhost\""), "{err}");
}

#[tokio::test]
async fn an_acl_user_and_password_in_the_url_authenticate() {
    let server = cascade_testkit::RedisServer::start_with_args(&[
        "--user",
        "default",
        "off",
        "--user",
        "cascade",
        "on",
        ">s3cret-pw",
        "~*",
        "&*",
        "+@all",
    ])
    .await;
    let port = server.port();
    let answer = redis_ping(&redis_config(
        format!("redis://cascade:s3cret-pw@127.0.0.1:{port}"),
        None,
    ))
    .await
    .expect("the ACL user's password");
    assert_eq!(answer, "PONG");

    let err = redis_ping(&redis_config(
        format!("redis://cascade:wrong@127.0.0.1:{port}"),
        None,
    ))
    .await
    .expect_err("a wrong password");
    assert!(err.contains("authentication failed"), "{err}");
    let err = redis_ping(&redis_config(format!("redis://127.0.0.1:{port}"), None))
        .await
        .expect_err("no user: the default user is off");
    assert!(err.contains("NOAUTH"), "{err}");
}
