//! Through PgBouncer 1.18 in transaction mode (two server connections): the hazard is real
//! for tokio-postgres's named statements, and the pool's connections do not hit it.

use cascade_core::db::{Db, Pooler};
use cascade_testkit::{PgBouncer, PgServer};

mod support;

/// A client's next statement lands on another server connection when a transaction holds the
/// one it last used (PgBouncer hands out the most recently used idle one first).
#[tokio::test]
async fn a_named_statement_is_lost_between_transactions_through_pgbouncer() {
    let pg = PgServer::start().await;
    let bouncer = PgBouncer::start(&pg).await;
    let a = bouncer.client("postgres").await;
    let b = bouncer.client("postgres").await;
    let statement = a.prepare("SELECT $1::int8").await.unwrap();
    b.batch_execute("BEGIN").await.unwrap();
    let lost = a.query_one(&statement, &[&1_i64]).await;
    b.batch_execute("COMMIT").await.unwrap();
    let err = lost.expect_err("the statement ran on a server connection that never prepared it");
    assert!(
        err.to_string().contains("prepared statement")
            || format!("{err:?}").contains("does not exist"),
        "{err:?}"
    );
}

#[tokio::test]
async fn the_pool_detects_pgbouncer_and_its_statements_survive_shared_server_connections() {
    let pg = PgServer::start().await;
    let bouncer = PgBouncer::start(&pg).await;
    pg.client("postgres")
        .await
        .batch_execute("CREATE DATABASE shared")
        .await
        .unwrap();
    let db = Db::connect(
        &support::db_settings(),
        bouncer.url("shared").parse().unwrap(),
        "pgbouncer".into(),
    )
    .await
    .unwrap();
    assert_eq!(db.pooler(), Pooler::PgBouncer);
    let direct = Db::connect(
        &support::db_settings(),
        pg.url("shared").parse().unwrap(),
        "direct".into(),
    )
    .await
    .unwrap();
    assert_eq!(direct.pooler(), Pooler::None);
    // Also when PgBouncer's admin console lets the user in (it then says its version).
    let admin = PgBouncer::start_with_admin(&pg).await;
    let through_admin = Db::connect(
        &support::db_settings(),
        admin.url("shared").parse().unwrap(),
        "pgbouncer-admin".into(),
    )
    .await
    .unwrap();
    assert_eq!(through_admin.pooler(), Pooler::PgBouncer);

    let setup = db.conn().await.unwrap();
    setup
        .execute(
            "CREATE TABLE t (id int8 PRIMARY KEY, name text, tags text[], doc jsonb)",
            &[],
        )
        .await
        .unwrap();
    // More client connections than server connections, interleaved, each statement cached
    // per connection as a direct pool would, with a transaction holding a server connection.
    let holder = bouncer.client("shared").await;
    holder.batch_execute("BEGIN").await.unwrap();
    let conns = [db.conn().await.unwrap(), db.conn().await.unwrap(), setup];
    for round in 0..20_i64 {
        for (i, conn) in conns.iter().enumerate() {
            let id = round * 10 + i as i64;
            let insert = conn
                .prepare_cached("INSERT INTO t (id, name, tags, doc) VALUES ($1, $2, $3, $4)")
                .await
                .unwrap();
            let name = format!("n{id}");
            let tags = vec!["a".to_string(), name.clone()];
            let doc = serde_json::json!({ "id": id });
            conn.execute(&insert, &[&id, &name, &tags, &doc])
                .await
                .unwrap();
            let row = conn
                .query_one("SELECT name, doc FROM t WHERE id = $1", &[&id])
                .await
                .unwrap();
            assert_eq!(row.get::<_, String>(0), name);
            assert_eq!(row.get::<_, serde_json::Value>(1), doc);
            let none: Option<String> = None;
            let missing = conn
                .query_opt("SELECT id FROM t WHERE name = $1", &[&none])
                .await
                .unwrap();
            assert!(missing.is_none());
        }
        if round == 10 {
            holder.batch_execute("COMMIT; BEGIN").await.unwrap();
        }
    }
    holder.batch_execute("COMMIT").await.unwrap();
    let count: i64 = conns[0]
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 60);
}
