//! Consciousness patterns end to end: the real application in-process (one or two instances on
//! one PostgreSQL and one Redis), Venice played by the test kit's stand-in through the
//! production connector, whose call counts say when Venice was read.

use std::sync::Arc;
use std::time::Duration;

use cascade_core::events::Event;
use cascade_server::testing::TestApp;
use cascade_testkit::venice::sample_citizens;
use cascade_testkit::{PgServer, VeniceStandin};
use serde_json::{Value, json};
use tokio::sync::broadcast::Receiver;
use tokio::sync::broadcast::error::TryRecvError;

// The citizens tests' world; its citizen and account helpers are not used here.
#[allow(dead_code)]
#[path = "citizens/support.rs"]
mod support;

use support::http;

const ECONOMIC: &str = "/patterns/economic_consciousness";

/// The citizens tests' world (PostgreSQL, Redis, the stand-in, one instance) and more
/// instances on the same servers. Fields drop in declaration order: the extra instances stop
/// before the servers they use.
struct World {
    others: Vec<TestApp>,
    first: support::World,
}

impl World {
    /// `instances` instances with patterns living `ttl` and a sync every `sync`.
    async fn start(instances: usize, ttl: &str, sync: &str, extra: &[(&str, String)]) -> World {
        let mut env = vec![
            ("CONSCIOUSNESS_CACHE_TTL", ttl.to_string()),
            ("CONSCIOUSNESS_SYNC_INTERVAL", sync.to_string()),
        ];
        env.extend(extra.iter().cloned());
        let first = support::World::start(&env).await;
        env.extend([
            ("DATABASE_URL", first.pg.url(&first.database)),
            ("REDIS_URL", first.redis.url()),
            ("VENICE_API_URL", first.venice.url()),
        ]);
        let mut others = Vec::new();
        for _ in 1..instances {
            others.push(TestApp::start(&env).await);
        }
        let world = World { others, first };
        for instance in 0..instances {
            assert!(
                world
                    .app(instance)
                    .events_listening(Duration::from_secs(10))
                    .await
            );
        }
        world
    }

    fn app(&self, instance: usize) -> &TestApp {
        match instance {
            0 => &self.first.server,
            n => &self.others[n - 1],
        }
    }

    async fn get(&self, instance: usize, path: &str) -> reqwest::Response {
        http()
            .get(format!("{}{path}", self.app(instance).base))
            .send()
            .await
            .expect("the server answers")
    }

    /// `GET path` on `instance`, which must answer 200: its body.
    async fn body(&self, instance: usize, path: &str) -> Value {
        let response = self.get(instance, path).await;
        assert_eq!(response.status(), 200, "{path}");
        response.json().await.unwrap()
    }

    /// One SQL value as text.
    async fn sql(&self, query: &str) -> String {
        self.first
            .pg
            .client(&self.first.database)
            .await
            .query_one(query, &[])
            .await
            .unwrap()
            .get(0)
    }
}

/// Waits until the pattern's `expires_at_ms` has passed.
async fn until_expired(pattern: &Value) {
    let expires = pattern["expires_at_ms"].as_i64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let wait = (expires - now).clamp(0, 30_000) as u64 + 100;
    tokio::time::sleep(Duration::from_millis(wait)).await;
}

async fn next_event(rx: &mut Receiver<Arc<Event>>, within: Duration) -> Arc<Event> {
    tokio::time::timeout(within, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no event within {within:?}"))
        .expect("the channel is open and did not lag")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_is_read_from_venice_once_then_from_the_cache_until_it_expires() {
    let world = World::start(1, "2s", "1h", &[]).await;
    let first = world.body(0, ECONOMIC).await;
    assert_eq!(first["type"], "economic_consciousness");
    assert_eq!(first["venice_source"], "/citizens");
    assert_eq!(first["stale"], false);
    assert_eq!(first["version"], 1);
    let data = &first["data"];
    assert_eq!(data["citizens"], 3);
    assert_eq!(data["total_ducats"], 341_700.5);
    assert_eq!(
        data["venice_citizens"],
        json!(["Italia", "Foscari_Banker", "sea_trader"])
    );
    assert_eq!(
        data["by_social_class"],
        json!({"Cittadini": 1, "Nobili": 1, "Popolani": 1})
    );
    // 1 - Gini(1200, 90500.5, 250000) = 1 - 0.4854.
    assert_eq!(data["emergence_score"], 0.5146);
    assert_eq!(world.first.venice.list_calls("citizens"), 1);

    for _ in 0..5 {
        assert_eq!(world.body(0, ECONOMIC).await, first);
    }
    assert_eq!(
        world.first.venice.list_calls("citizens"),
        1,
        "reads before expiry are cached"
    );
    assert_eq!(
        world
            .sql("SELECT format('%s|%s|%s', pattern_type, venice_source, pattern_data->>'citizens') FROM consciousness_patterns")
            .await,
        "economic_consciousness|/citizens|3"
    );
    // Seed 001's key: cascade:patterns:{id}, the id being the type.
    let out = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &world.first.redis.port().to_string(),
            "--scan",
            "--pattern",
            "*patterns*",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("cascade:patterns:economic_consciousness"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    until_expired(&first).await;
    let again = world.body(0, ECONOMIC).await;
    assert_eq!(
        world.first.venice.list_calls("citizens"),
        2,
        "expired: Venice is read again"
    );
    assert_eq!(again["data"], first["data"]);
    assert_eq!(again["version"], 1, "same content, same version");
    assert!(again["expires_at_ms"].as_i64() > first["expires_at_ms"].as_i64());
    assert_eq!(world.first.venice.list_calls("relationships"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sync_refreshes_an_expiring_pattern_once_across_two_instances_and_emits_one_event() {
    // Patterns live 4 s; each instance syncs every 250 ms, looking 500 ms ahead.
    let world = World::start(2, "4s", "250ms", &[]).await;
    let first = world.body(0, ECONOMIC).await;
    assert_eq!(world.first.venice.list_calls("citizens"), 1);
    assert_eq!(world.body(1, ECONOMIC).await["version"], 1);

    let mut on_a = world.app(0).events.subscribe();
    let mut on_b = world.app(1).events.subscribe();
    // A refresh now takes longer than a sync interval: without the cluster-wide lock, the
    // other instance's next round would find the pattern still due and read Venice too.
    world.first.venice.slow_down(Duration::from_millis(400));
    let mut richer = sample_citizens()["sea_trader"].clone();
    richer["citizen"]["ducats"] = json!(5_000.0);
    world.first.venice.set_citizen("sea_trader", richer);

    // Refreshed about 3.5 s after the read, by one of the two instances.
    let event = next_event(&mut on_a, Duration::from_secs(10)).await;
    assert_eq!(event.channel, "cascade-events");
    assert_eq!(event.kind, "pattern.changed");
    assert_eq!(event.data["type"], "economic_consciousness");
    assert_eq!(event.data["version"], 2);
    let on_b_event = next_event(&mut on_b, Duration::from_secs(2)).await;
    assert_eq!(on_b_event.id, event.id, "both instances get the one event");
    assert_eq!(
        world.first.venice.list_calls("citizens"),
        2,
        "one refresh, not one per instance"
    );

    // Every instance serves the new content at once (the cached copies were invalidated),
    // without reading Venice.
    for instance in [0, 1] {
        let now = world.body(instance, ECONOMIC).await;
        assert_eq!(now["version"], 2);
        assert_eq!(now["data"]["total_ducats"], 345_500.5);
        assert_ne!(now["changed_at"], first["changed_at"]);
    }
    assert_eq!(world.first.venice.list_calls("citizens"), 2);

    // The next refresh finds the same content: it extends the pattern and says nothing.
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    assert_eq!(
        world.first.venice.list_calls("citizens"),
        3,
        "refreshed once more, once"
    );
    for rx in [&mut on_a, &mut on_b] {
        assert!(
            matches!(rx.try_recv(), Err(TryRecvError::Empty)),
            "an event without a change, or a second one"
        );
    }
    let last = world.body(1, ECONOMIC).await;
    assert_eq!(last["version"], 2);
    assert!(last["expires_at_ms"].as_i64() > first["expires_at_ms"].as_i64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patterns_are_listed_by_type_a_page_at_a_time() {
    let world = World::start(1, "5m", "1h", &[]).await;
    let page = world.body(0, "/patterns?limit=2").await;
    let types: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["collective_activity", "economic_consciousness"]);
    assert_eq!(page["nextCursor"], "economic_consciousness");
    let rest = world
        .body(0, "/patterns?limit=2&cursor=economic_consciousness")
        .await;
    assert_eq!(rest["items"][0]["type"], "social_consciousness");
    assert_eq!(rest["items"][0]["data"]["relationships"], 2);
    assert_eq!(rest["items"].as_array().unwrap().len(), 1);
    assert_eq!(rest["nextCursor"], Value::Null);
    let only = world.body(0, "/patterns?type=collective_activity").await;
    assert_eq!(only["items"].as_array().unwrap().len(), 1);
    assert_eq!(only["items"][0]["data"]["activities"], 4);
    for list in ["citizens", "relationships", "activities"] {
        assert_eq!(world.first.venice.list_calls(list), 1, "{list}");
    }
    assert_eq!(
        world
            .sql("SELECT count(*)::text FROM consciousness_patterns")
            .await,
        "3"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_venice_fails_an_expired_pattern_is_served_stale_and_the_sync_leaves_venice_alone() {
    let world = World::start(
        1,
        "1s",
        "100ms",
        &[
            ("VENICE_BREAKER_THRESHOLD", "1".into()),
            ("VENICE_BREAKER_COOL_DOWN", "1h".into()),
            ("VENICE_RETRIES", "0".into()),
        ],
    )
    .await;
    let first = world.body(0, ECONOMIC).await;
    world.first.venice.fail(503);
    until_expired(&first).await;
    // By now the sync tried once (the pattern was due), failed and opened the breaker.
    let response = world.get(0, ECONOMIC).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["warning"], "110 - \"Response is Stale\"");
    let stale: Value = response.json().await.unwrap();
    assert_eq!(stale["stale"], true);
    assert_eq!(stale["data"], first["data"]);
    let calls = world.first.venice.list_calls("citizens");
    assert!(
        calls <= 2,
        "{calls} calls: the breaker should have opened at the first failure"
    );
    // Ten sync rounds with the breaker open: none reaches Venice.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(world.first.venice.list_calls("citizens"), calls);
    // A type never stored has no stale copy: 503 with Retry-After.
    let missing = world.get(0, "/patterns/social_consciousness").await;
    assert_eq!(missing.status(), 503);
    assert!(missing.headers().get("retry-after").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_400_with_the_json_error_and_writes_nothing() {
    let world = World::start(1, "5m", "1h", &[]).await;
    let long = "a".repeat(10 * 1024);
    let bad = [
        "/patterns/telepathy".to_string(),
        "/patterns/economic%0Aconsciousness".into(),
        "/patterns/economic_consciousness%00".into(),
        "/patterns/%1B%5B31m".into(),
        format!("/patterns/{long}"),
        "/patterns?type=telepathy".into(),
        "/patterns?type=economic_consciousness%0D%0A".into(),
        format!("/patterns?type={long}"),
        "/patterns?limit=0".into(),
        "/patterns?limit=101".into(),
        "/patterns?limit=-1".into(),
        "/patterns?limit=abc".into(),
        "/patterns?limit=1e3".into(),
        "/patterns?limit=18446744073709551616".into(),
        "/patterns?cursor=nope".into(),
        "/patterns?cursor=%00".into(),
        format!("/patterns?cursor={long}"),
    ];
    for path in &bad {
        let response = world.get(0, path).await;
        let shown = &path[..path.len().min(60)];
        assert_eq!(response.status(), 400, "{shown}");
        let body: Value = response.json().await.expect("a JSON error body");
        assert_eq!(body["error"]["code"], "bad_request", "{shown}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.len() < 200, "{shown}: the input is not echoed back");
    }
    assert_eq!(
        world
            .sql("SELECT count(*)::text FROM consciousness_patterns")
            .await,
        "0"
    );
    for list in ["citizens", "relationships", "activities"] {
        assert_eq!(world.first.venice.list_calls(list), 0, "{list}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_made_by_seed_001s_script_is_taken_over() {
    let pg = PgServer::start().await;
    let venice = VeniceStandin::start(sample_citizens()).await;
    let url = pg.fresh_database().await;
    let database = url.rsplit('/').next().unwrap().to_string();
    pg.client(&database)
        .await
        .batch_execute(
            "CREATE TABLE consciousness_patterns (
                 id SERIAL PRIMARY KEY, pattern_type VARCHAR(100), venice_source VARCHAR(255),
                 pattern_data JSONB, cached_at TIMESTAMP DEFAULT NOW(), expires_at TIMESTAMP);
             INSERT INTO consciousness_patterns (pattern_type, venice_source, pattern_data, cached_at, expires_at) VALUES
                 ('economic_consciousness', '/citizens', '{\"old\": 1}', now() - interval '2 hours', now() - interval '1 hour'),
                 ('economic_consciousness', '/citizens', '{\"old\": 2}', now() - interval '1 hour', now() - interval '1 minute'),
                 (NULL, NULL, NULL, now(), NULL);",
        )
        .await
        .unwrap();
    let app = TestApp::start(&[("DATABASE_URL", url), ("VENICE_API_URL", venice.url())]).await;
    // The newest seed-era row stays (expired, so it is read from Venice again); the others go.
    let response = http()
        .get(format!("{}{ECONOMIC}", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["data"]["citizens"], 3);
    assert_eq!(
        body["version"], 2,
        "the seed-era content counts as the previous one"
    );
    let rows: i64 = pg
        .client(&database)
        .await
        .query_one("SELECT count(*) FROM consciousness_patterns", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);
    drop(app);
}
