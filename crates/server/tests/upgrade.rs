//! A database made by the release before module version spaces upgrades in place: its
//! bookkeeping is re-keyed to `(module, version)`, nothing is applied again, nothing is lost,
//! and the application serves the old data (and the old password) at once.
//!
//! The fixture is a `pg_dump` of what that release's `cascade migrate` and API wrote.

use std::time::Duration;

use cascade_server::application::{self, Database};
use cascade_server::testing::TestApp;
use cascade_server::{Application, BuildOptions, Settings};
use cascade_testkit::PgServer;
use serde_json::{Value, json};

const OLD_RELEASE: &str = include_str!("fixtures/release-0.1.0-catalog.sql");

/// What the old data says, in one row: accounts, assets with their names, lineage.
const FINGERPRINT: &str = "SELECT format('%s|%s|%s', (SELECT count(*) FROM cascade_users), \
     (SELECT string_agg(version_id || ':' || name, ',' ORDER BY version_id) FROM assets), \
     (SELECT string_agg(parent_version_id || '>' || child_version_id, ',') FROM lineage_edges))";

async fn old_database(pg: &PgServer) -> (String, String) {
    let url = pg.fresh_database().await;
    let name = url.rsplit('/').next().unwrap().to_string();
    // The dump empties search_path for its session: a connection of its own.
    pg.client(&name)
        .await
        .batch_execute(OLD_RELEASE)
        .await
        .unwrap();
    (url, name)
}

async fn get_json(http: &reqwest::Client, url: String) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

async fn rows(client: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    client
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

#[tokio::test]
async fn a_database_of_the_previous_release_upgrades_in_place_and_loses_nothing() {
    let pg = PgServer::start().await;
    let (url, name) = old_database(&pg).await;
    let client = pg.client(&name).await;
    let before = rows(&client, FINGERPRINT).await;
    assert_eq!(
        before,
        ["1|clean-1:Clean data,raw-1:Raw data|raw-1>clean-1"]
    );

    let settings = Settings::from_vars(&[("DATABASE_URL", url.clone())]).unwrap();
    let database = Database::open(&settings.core).await.unwrap();
    let modules = application::modules(&settings);
    let report = application::migrate(&database.db, &modules).await.unwrap();
    // Nothing the old release applied runs again; only migrations newer than it do.
    let applied: Vec<String> = report.applied.iter().map(|id| id.to_string()).collect();
    assert_eq!(
        applied,
        [
            "core/4",
            "core/5",
            "core/6",
            "core/7",
            "catalog/3",
            "catalog/4",
            "app/1",
            "app/2",
            "app/3",
            "app/4",
            "app/5",
            "app/6",
            "app/7",
            "agents/1",
            "agents/2",
            "agents/3",
            "agents/4"
        ],
        "{report}"
    );
    assert_eq!(report.legacy_rows_rekeyed, 5, "{report}");
    let again = application::migrate(&database.db, &modules).await.unwrap();
    assert!(
        again.applied.is_empty() && again.legacy_rows_rekeyed == 0,
        "{again}"
    );
    database.db.close();

    let recorded = rows(
        &client,
        "SELECT module || '/' || version || ' ' || name FROM cascade_schema_migrations \
         ORDER BY module, version",
    )
    .await;
    assert_eq!(
        recorded,
        [
            "agents/1 agents",
            "agents/2 workflows",
            "agents/3 agent_memories",
            "agents/4 search",
            "app/1 citizen_link",
            "app/2 patterns",
            "app/3 interactions",
            "app/4 spaces",
            "app/5 investments",
            "app/6 billing",
            "app/7 billing_reconcile",
            "catalog/1 catalog",
            "catalog/2 catalog_owners",
            "catalog/3 lineage_pending",
            "catalog/4 search",
            "core/1 cache_entries",
            "core/2 cache_leases",
            "core/3 identity",
            "core/4 audit_log",
            "core/5 rate_limits",
            "core/6 audit_log_owner",
            "core/7 cache_invalidation_log",
        ]
    );
    let after = rows(&client, FINGERPRINT).await;
    assert_eq!(after, before);
    // The application's columns of `cascade_users`, filled for the old account.
    let account = rows(
        &client,
        "SELECT format('%s|%s|%s|%s|%s', username, coalesce(venice_username, '-'), \
         subscription_tier, is_active, updated_at IS NOT NULL) FROM cascade_users",
    )
    .await;
    assert_eq!(account, ["publisher|-|observer|t|t"]);

    // The upgraded database serves: old rows, the old account's password, its ownership.
    let app = TestApp::start(&[("DATABASE_URL", url), ("RATE_LIMIT_API", "off".to_string())]).await;
    let http = cascade_core::upstream::http_client(Duration::from_secs(2), Duration::from_secs(10))
        .unwrap();
    let asset = get_json(&http, format!("{}/listings/clean-1", app.base)).await;
    assert_eq!(asset["name"], "Clean data");
    let login: Value = http
        .post(format!("{}/auth/login", app.base))
        .json(&json!({"username": "publisher", "password": "correct horse battery staple"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = login["access_token"]
        .as_str()
        .expect("the old password still logs in");
    let renamed = http
        .patch(format!("{}/listings/raw-1", app.base))
        .bearer_auth(token)
        .json(&json!({"name": "Raw data, renamed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(renamed.status(), 200, "the old owner still owns acme");
    let ready = get_json(&http, format!("{}/ready?versionId=clean-1", app.base)).await;
    assert_eq!(ready["checked"], 2, "the old lineage is walked: {ready}");
    // Catalog migration 4 rebuilt the search column of the old rows: a prefix finds one.
    let found = get_json(&http, format!("{}/listings?q=clea", app.base)).await;
    let items = found["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{found}");
    assert_eq!(items[0]["versionId"], "clean-1", "{found}");
}

#[tokio::test]
async fn the_application_builds_once_and_stops_its_tasks() {
    let pg = PgServer::start().await;
    let url = pg.fresh_database().await;
    let settings = Settings::from_vars(&[("DATABASE_URL", url.clone())]).unwrap();
    let app = Application::build(settings, BuildOptions::default())
        .await
        .unwrap();
    let state = app.state.clone();
    // Every background task is still running a moment after the start (one that returns at
    // once, like a cleanup with nothing to clean, would count here).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.failed_tasks(), 0);
    let stopped = tokio::time::timeout(Duration::from_secs(20), app.stop()).await;
    assert!(
        stopped.is_ok(),
        "every background task stopped within its bound"
    );
    assert!(state.db.conn().await.is_err(), "the pool is closed");
}
