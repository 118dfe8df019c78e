//! The audit log: a row with every change, in the change's transaction; immutable in
//! PostgreSQL itself; read back through `GET /audit` with filters and a cursor.

use cascade_core::audit::{self, Change};
use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{Cluster, assert_bad_field};

fn actions(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|row| row["action"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_writes_a_row_with_before_after_and_the_request_id() {
    let cluster = Cluster::start(1).await;
    let base = cluster.base(0);
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;

    let client = cascade_core::upstream::http_client(
        std::time::Duration::from_secs(2),
        std::time::Duration::from_secs(10),
    )
    .unwrap();
    let created: Value = client
        .post(format!("{base}/agents"))
        .bearer_auth(&alice.token)
        .header("x-request-id", "req-create-1")
        .json(&json!({"name": "Audited", "type": "chat"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["id"].as_i64().unwrap();
    let path = format!("/agents/{id}");
    let (status, updated) = alice
        .send(base, Method::PATCH, &path, Some(json!({"name": "Renamed"})))
        .await;
    assert_eq!(status, 200);
    assert_eq!(alice.send(base, Method::DELETE, &path, None).await.0, 204);
    bob.agent(base, json!({"name": "Bob's", "type": "chat"}))
        .await;

    let (status, page) = alice.get(base, "/audit").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(
        actions(&page),
        ["agent.delete", "agent.update", "agent.create"]
    );
    let rows = page["items"].as_array().unwrap();
    let actor = format!("user:{}", alice.id);
    for row in rows {
        assert_eq!(row["actor"], actor.as_str());
        assert_eq!(row["entity_type"], "agent");
        assert_eq!(row["entity_id"], id.to_string());
        assert!(
            row["request_id"].as_str().is_some_and(|r| !r.is_empty()),
            "{row}"
        );
    }
    let (delete, update, create) = (&rows[0], &rows[1], &rows[2]);
    assert_eq!(create["request_id"], "req-create-1");
    assert_eq!(create["before"], Value::Null);
    assert_eq!(create["after"], created);
    assert_eq!(update["before"], created);
    assert_eq!(update["after"], updated);
    assert_eq!(delete["before"], updated);
    assert_eq!(delete["after"], Value::Null);

    // Bob sees only his own row.
    let (_, page) = bob.get(base, "/audit").await;
    assert_eq!(actions(&page), ["agent.create"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_filters_and_pages_with_a_cursor() {
    let cluster = Cluster::start(1).await;
    let base = cluster.base(0);
    let alice = cluster.user("alice").await;
    let first = alice.agent(base, json!({"name": "One", "type": "t"})).await;
    let second = alice.agent(base, json!({"name": "Two", "type": "t"})).await;
    for name in ["Uno", "Eins"] {
        let path = format!("/agents/{}", first["id"]);
        let (status, _) = alice
            .send(base, Method::PATCH, &path, Some(json!({"name": name})))
            .await;
        assert_eq!(status, 200);
    }

    let (_, page) = alice
        .get(
            base,
            &format!("/audit?entity_type=agent&entity_id={}", first["id"]),
        )
        .await;
    assert_eq!(
        actions(&page),
        ["agent.update", "agent.update", "agent.create"]
    );
    let (_, page) = alice.get(base, "/audit?action=agent.create").await;
    let ids: Vec<&Value> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["after"]["id"])
        .collect();
    assert_eq!(ids, [&second["id"], &first["id"]]);
    let (_, page) = alice
        .get(
            base,
            "/audit?since=2000-01-01T00:00:00Z&until=2999-01-01T00:00:00%2B01:00",
        )
        .await;
    assert_eq!(page["items"].as_array().unwrap().len(), 4);
    let (_, page) = alice.get(base, "/audit?until=2000-01-01T00:00:00Z").await;
    assert_eq!(page["items"], json!([]));

    // Pages of one, newest first, every row once.
    let mut seen = Vec::new();
    let mut path = "/audit?limit=1".to_string();
    loop {
        let (status, page) = alice.get(base, &path).await;
        assert_eq!(status, 200, "{page}");
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["id"].as_i64().unwrap()),
        );
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/audit?limit=1&cursor={cursor}"),
            None => break,
        }
        assert!(seen.len() <= 4, "the cursor does not end");
    }
    assert_eq!(seen.len(), 4);
    assert!(seen.windows(2).all(|w| w[0] > w[1]), "{seen:?}");

    for (query, field) in [
        ("since=yesterday", "since"),
        ("until=2026-02-30T00:00:00Z", "until"),
        ("limit=0", "limit"),
        ("cursor=x", "cursor"),
        ("entity_id=", "entity_id"),
    ] {
        let (status, body) = alice.get(base, &format!("/audit?{query}")).await;
        assert_bad_field(status, &body, field);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_cannot_be_changed_or_removed_even_by_a_superuser_without_disabling_the_trigger() {
    let cluster = Cluster::start(1).await;
    let base = cluster.base(0);
    let alice = cluster.user("alice").await;
    alice
        .agent(base, json!({"name": "Witness", "type": "t"}))
        .await;
    // The cluster migrated as the superuser: the table went to its own owner all the same.
    let sql = cluster.sql().await;
    let owner: String = sql
        .query_one(
            "SELECT schemaname || '.' || tableowner FROM pg_tables WHERE tablename = 'audit_log'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, "cascade_audit.cascade_audit_owner");

    for statement in [
        "UPDATE audit_log SET actor = 'user:0'",
        "UPDATE cascade_audit.audit_log SET after = NULL WHERE action = 'agent.create'",
        "DELETE FROM audit_log",
        "TRUNCATE cascade_audit.audit_log",
    ] {
        let err = sql.batch_execute(statement).await.expect_err(statement);
        let message = err
            .as_db_error()
            .map(|e| e.message().to_string())
            .unwrap_or_default();
        assert!(message.contains("append-only"), "{statement}: {err}");
    }
    let row: (String, i64) = sql
        .query_one("SELECT actor, count(*) OVER () FROM audit_log", &[])
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(row, (format!("user:{}", alice.id), 1));
}

/// The test: the module's own database role (not a superuser; the owner of the
/// database and of every other table, since it ran the migrations) can add audit rows and read
/// them, but not change, remove, unprotect or drop them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_cannot_be_changed_even_with_the_modules_own_database_role() {
    let pg = cascade_testkit::PgServer::start().await;
    let admin = pg.client("postgres").await;
    // CREATEROLE for the migration that hands the table over; taken back afterwards, as the
    // deployment notes say (a role with CREATEROLE can grant itself any role).
    for statement in [
        "CREATE ROLE cascade_app LOGIN CREATEROLE",
        "CREATE DATABASE app_db OWNER cascade_app",
    ] {
        admin.batch_execute(statement).await.unwrap();
    }
    let url = format!("postgresql://cascade_app@127.0.0.1:{}/app_db", pg.port());
    let config: tokio_postgres::Config = url.parse().unwrap();
    cascade_core::db::migrate(
        &config,
        &[
            cascade_core::db::CORE_MIGRATIONS,
            cascade_agents::MIGRATIONS,
        ],
    )
    .await
    .unwrap();
    admin
        .batch_execute("ALTER ROLE cascade_app NOCREATEROLE")
        .await
        .unwrap();

    let (mut app, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let superuser: bool = app
        .query_one(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!superuser);
    let user_id: i64 = app
        .query_one(
            "INSERT INTO cascade_users (username, password_hash) VALUES ('alice', 'x') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // The module writes its audit rows as this role.
    let actor = cascade_agents::queries::Actor {
        user_id,
        request_id: None,
    };
    let agent =
        cascade_agents::model::NewAgent::parse("", &json!({"name": "Kept", "type": "t"})).unwrap();
    let tx = app.transaction().await.unwrap();
    cascade_agents::queries::create(&tx, &actor, &[agent])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let before = audit_rows(&app).await;
    assert_eq!(before.len(), 1, "{before:?}");
    assert!(before[0].contains("agent.create"), "{before:?}");

    for statement in [
        "UPDATE audit_log SET actor = 'user:0'",
        "DELETE FROM audit_log",
        "UPDATE cascade_audit.audit_log SET actor = 'user:0'",
        "DELETE FROM cascade_audit.audit_log",
        "TRUNCATE cascade_audit.audit_log",
        "ALTER TABLE cascade_audit.audit_log DISABLE TRIGGER audit_log_no_update_or_delete",
        "ALTER TABLE cascade_audit.audit_log DISABLE TRIGGER ALL",
        "DROP TABLE cascade_audit.audit_log",
        "DROP SCHEMA cascade_audit CASCADE",
        "ALTER TABLE cascade_audit.audit_log OWNER TO cascade_app",
        "DROP FUNCTION cascade_audit.audit_log_is_append_only() CASCADE",
        "GRANT cascade_audit_owner TO cascade_app",
        "SET ROLE cascade_audit_owner",
        "REASSIGN OWNED BY cascade_audit_owner TO cascade_app",
    ] {
        let err = app.batch_execute(statement).await.expect_err(statement);
        let code = err.code().map(|c| c.code().to_string()).unwrap_or_default();
        assert_eq!(
            code, "42501",
            "refused for want of privilege: {statement}: {err}"
        );
    }
    // The view that keeps the old name is the role's own; without it no row is gone either.
    for statement in ["TRUNCATE audit_log", "DROP TABLE audit_log"] {
        app.batch_execute(statement).await.expect_err(statement);
    }
    app.batch_execute("DROP VIEW audit_log").await.unwrap();
    assert_eq!(audit_rows(&app).await, before);
    assert_eq!(audit_rows(&pg.client("app_db").await).await, before);
}

/// Every audit row, as JSON text, in order.
async fn audit_rows(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .query(
            "SELECT row_to_json(a)::text FROM cascade_audit.audit_log a ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_and_its_audit_row_commit_together_or_not_at_all() {
    let cluster = Cluster::start(1).await;
    let alice = cluster.user("alice").await;
    let mut sql = cluster.sql().await;
    let actor = cascade_agents::queries::Actor {
        user_id: alice.id,
        request_id: None,
    };
    let agent = cascade_agents::model::NewAgent::parse("", &json!({"name": "Atomic", "type": "t"}))
        .unwrap();

    // An audit row that cannot be written (an empty actor breaks its CHECK) fails the write
    // it belongs to: the agent created earlier in the transaction is gone with it.
    let tx = sql.transaction().await.unwrap();
    let created = cascade_agents::queries::create(&tx, &actor, std::slice::from_ref(&agent))
        .await
        .unwrap();
    let id = created[0]["id"].to_string();
    let bad = Change {
        actor: "",
        action: "agent.touch",
        entity_type: "agent",
        entity_id: &id,
        before: None,
        after: None,
        request_id: None,
    };
    assert!(audit::record(&tx, &bad).await.is_err());
    // PostgreSQL answers the COMMIT of a failed transaction by rolling it back.
    let _ = tx.commit().await;
    assert_eq!(cluster.count("SELECT count(*) FROM agents").await, 0);
    assert_eq!(cluster.count("SELECT count(*) FROM audit_log").await, 0);

    // A write that rolls back takes its audit row with it.
    let tx = sql.transaction().await.unwrap();
    cascade_agents::queries::create(&tx, &actor, std::slice::from_ref(&agent))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(cluster.count("SELECT count(*) FROM audit_log").await, 0);

    // And one that commits has exactly its row.
    let tx = sql.transaction().await.unwrap();
    cascade_agents::queries::create(&tx, &actor, &[agent])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(cluster.count("SELECT count(*) FROM agents").await, 1);
    assert_eq!(
        cluster
            .count("SELECT count(*) FROM audit_log WHERE action = 'agent.create'")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_read_every_actors_rows_with_the_admin_token_only() {
    let cluster = Cluster::start_with(1, &[("AGENTS_WORKERS", "1")]).await;
    let base = cluster.base(0);
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    alice.agent(base, json!({"name": "A", "type": "t"})).await;
    bob.agent(base, json!({"name": "B", "type": "t"})).await;
    let (status, flow) = alice
        .send(
            base,
            Method::POST,
            "/workflows",
            Some(json!({"name": "w", "steps": [{"capability": "noop"}]})),
        )
        .await;
    assert_eq!(status, 201, "{flow}");
    let (status, _) = alice
        .send(
            base,
            Method::POST,
            &format!("/workflows/{}/executions", flow["id"]),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 202);
    let started = std::time::Instant::now();
    while cluster
        .count("SELECT count(*) FROM audit_log WHERE actor = 'system:executions'")
        .await
        == 0
    {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "the execution never finished"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    let (status, page) = admin(base, "").await;
    assert_eq!(status, 200, "{page}");
    let mut actors: Vec<String> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["actor"].as_str().unwrap().to_string())
        .collect();
    actors.sort();
    actors.dedup();
    assert_eq!(
        actors,
        [
            "system:executions".to_string(),
            format!("user:{}", alice.id),
            format!("user:{}", bob.id)
        ]
    );
    let (_, page) = admin(base, &format!("?actor=user:{}", bob.id)).await;
    assert_eq!(actions(&page), ["agent.create"]);
    let (_, page) = admin(base, "?actor=system:executions").await;
    assert_eq!(actions(&page), ["execution.succeeded"]);
    let (status, body) = admin(base, "?actor=").await;
    assert_bad_field(status, &body, "actor");

    // An account's token is not the operators' token, and none is none.
    let (status, body) = alice.get(base, "/audit/all").await;
    assert_eq!(status, 401, "{body}");
    let (status, _) = crate::support::request(base, None, Method::GET, "/audit/all", None).await;
    assert_eq!(status, 401);
}

/// `GET /audit/all{query}` with the operators' token.
async fn admin(base: &str, query: &str) -> (u16, Value) {
    let path = format!("/audit/all{query}");
    crate::support::request(
        base,
        Some(crate::support::ADMIN_TOKEN),
        Method::GET,
        &path,
        None,
    )
    .await
}
