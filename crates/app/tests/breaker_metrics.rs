//! Venice's circuit breaker in `/metrics` and `/health/db` (a binary of its own: the metrics
//! recorder is process-wide, and other tests open and close their breakers at the same time).

#[path = "citizens/support.rs"]
mod support;

use std::time::Duration;

use support::{World, http};

async fn breaker_gauge(world: &World) -> String {
    let text = world.metrics().await;
    text.lines()
        .find(|l| l.starts_with("cascade_upstream_breaker_state{upstream=\"venice\"}"))
        .unwrap_or_else(|| panic!("no breaker gauge in:\n{text}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .to_string()
}

const ADMIN_TOKEN: &str = "breaker-test-admin-token-0123456789abcdef";

/// What `/health/db` says of Venice's breaker.
async fn breaker_health(world: &World) -> String {
    let health: serde_json::Value = http()
        .get(world.url("/health/db"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    health["upstreams"]
        .as_array()
        .and_then(|ups| ups.iter().find(|u| u["name"] == "venice"))
        .unwrap_or_else(|| panic!("no venice upstream in {health}"))["breaker"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_state_is_exported_and_follows_venice() {
    let world = World::start(&[
        ("VENICE_RETRIES", "0".to_string()),
        ("VENICE_BREAKER_THRESHOLD", "2".to_string()),
        ("VENICE_BREAKER_COOL_DOWN", "1s".to_string()),
        ("ADMIN_TOKEN", ADMIN_TOKEN.to_string()),
    ])
    .await;
    assert_eq!(breaker_gauge(&world).await, "0");
    assert_eq!(breaker_health(&world).await, "closed");
    world.venice.fail(503);
    for name in ["b1", "b2"] {
        assert_eq!(world.citizen(name).await.status(), 503);
    }
    assert_eq!(breaker_gauge(&world).await, "2", "open");
    assert_eq!(breaker_health(&world).await, "open");
    world.venice.recover();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(world.citizen("Italia").await.status(), 200);
    assert_eq!(breaker_gauge(&world).await, "0");
    assert_eq!(breaker_health(&world).await, "closed");
    let text = world.metrics().await;
    assert!(
        text.contains("# HELP cascade_upstream_breaker_state"),
        "described"
    );
}
