//! Domain events reach every instance once: two real instances on one PostgreSQL, over Redis
//! pub/sub and, without Redis, over PostgreSQL NOTIFY; and again after Redis restarts.

use std::sync::Arc;
use std::time::Duration;

use cascade_core::events::{Event, EventsError};
use cascade_server::testing::TestApp;
use cascade_testkit::{PgServer, RedisServer};
use serde_json::{Value, json};
use tokio::sync::broadcast::Receiver;

/// Two instances on one database (and one Redis when `redis` is given), both hearing events.
async fn two_instances(pg: &PgServer, redis: Option<&RedisServer>) -> (TestApp, TestApp) {
    let url = pg.fresh_database().await;
    let mut env = vec![("DATABASE_URL", url)];
    if let Some(redis) = redis {
        env.push(("REDIS_URL", redis.url()));
    }
    let a = TestApp::start(&env).await;
    let b = TestApp::start(&env).await;
    for app in [&a, &b] {
        assert!(
            app.events_listening(Duration::from_secs(10)).await,
            "an instance never subscribed to events"
        );
    }
    (a, b)
}

async fn publish(app: &TestApp, kind: &str, data: Value) -> Result<(), EventsError> {
    let events = app.events.clone();
    let kind = kind.to_string();
    app.run(async move { events.publish("cascade-events", &kind, data).await })
        .await
}

async fn metrics_text(app: &TestApp) -> String {
    let response = reqwest::get(format!("{}/metrics", app.base)).await.unwrap();
    response.text().await.unwrap()
}

/// The next event, within 5 s.
async fn next(rx: &mut Receiver<Arc<Event>>) -> Arc<Event> {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("an event within 5 s")
        .expect("the channel is open and did not lag")
}

/// An event published on `a` reaches `a` and `b` once each, in publish order; a marker
/// published afterwards by `b` is the next thing both see, so no copy came in between.
async fn each_event_arrives_once_everywhere(a: &TestApp, b: &TestApp) {
    let mut on_a = a.events.subscribe();
    let mut on_b = b.events.subscribe();
    for n in 1..=3 {
        publish(a, "pattern.changed", json!({ "n": n }))
            .await
            .unwrap();
    }
    for rx in [&mut on_a, &mut on_b] {
        for n in 1..=3 {
            let event = next(rx).await;
            assert_eq!(event.kind, "pattern.changed");
            assert_eq!(event.channel, "cascade-events");
            assert_eq!(event.data, json!({ "n": n }), "publish order is kept");
            assert_eq!(event.origin, a.events.instance_id());
        }
    }
    publish(b, "marker", json!(null)).await.unwrap();
    for rx in [&mut on_a, &mut on_b] {
        let event = next(rx).await;
        assert_eq!(event.kind, "marker", "an event was delivered twice");
        assert_eq!(event.origin, b.events.instance_id());
    }
    assert_ne!(a.events.instance_id(), b.events.instance_id());
}

#[tokio::test]
async fn an_event_published_on_one_instance_reaches_both_once_over_redis() {
    let pg = PgServer::start().await;
    let redis = RedisServer::start().await;
    let (a, b) = two_instances(&pg, Some(&redis)).await;
    assert_eq!(a.events.transport_channel(), "cascade:events");
    each_event_arrives_once_everywhere(&a, &b).await;

    let metrics = metrics_text(&a).await;
    assert!(
        metrics.contains("cascade_events_received_total"),
        "received events are counted in /metrics"
    );
}

#[tokio::test]
async fn without_redis_events_travel_over_postgres_notify() {
    let pg = PgServer::start().await;
    let (a, b) = two_instances(&pg, None).await;
    assert_eq!(a.events.transport_channel(), "cascade_events");
    each_event_arrives_once_everywhere(&a, &b).await;

    // NOTIFY carries 8000 bytes: a larger event is refused before anyone sees it.
    let mut on_a = a.events.subscribe();
    let refused = publish(&a, "big", json!("x".repeat(10_000))).await;
    assert!(
        matches!(refused, Err(EventsError::TooLarge { .. })),
        "{refused:?}"
    );
    publish(&a, "small", json!(1)).await.unwrap();
    assert_eq!(next(&mut on_a).await.kind, "small");
}

#[tokio::test]
async fn a_publish_while_redis_is_down_fails_and_is_counted_and_events_flow_again_after_it_restarts()
 {
    let pg = PgServer::start().await;
    let mut redis = RedisServer::start().await;
    let (a, b) = two_instances(&pg, Some(&redis)).await;

    // Redis gone: the publish says so (within its bound), and this instance's own
    // subscribers still have the event.
    redis.kill();
    let mut on_a = a.events.subscribe();
    let started = std::time::Instant::now();
    let failed = publish(&a, "during-outage", json!(null)).await;
    assert!(failed.is_err(), "{failed:?}");
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(next(&mut on_a).await.kind, "during-outage");
    let metrics = metrics_text(&a).await;
    let errors = metrics
        .lines()
        .find(|l| l.starts_with("cascade_events_publish_errors_total "))
        .unwrap_or_default();
    assert_ne!(
        errors, "cascade_events_publish_errors_total 0",
        "{errors:?}"
    );
    assert!(!errors.is_empty(), "publish errors are counted in /metrics");

    redis.restart().await;

    // Events published while the subscription was being replaced are lost (at most once);
    // one published after it is back arrives. Each instance resubscribes on its own, so both
    // ways: publish until one does, 20 s at most.
    for (from, to) in [(&a, &b), (&b, &a)] {
        let mut on_to = to.events.subscribe();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let mut heard = false;
        while tokio::time::Instant::now() < deadline && !heard {
            let _ = publish(from, "after-restart", json!(null)).await;
            if let Ok(Ok(event)) =
                tokio::time::timeout(Duration::from_millis(300), on_to.recv()).await
            {
                heard = event.kind == "after-restart" && event.origin == from.events.instance_id();
            }
        }
        assert!(
            heard,
            "no event crossed instances within 20 s of Redis restarting"
        );
        // Let earlier attempts that are still on their way arrive first: events of one
        // instance reach the other in order.
        publish(from, "drained", json!(null)).await.unwrap();
        while next(&mut on_to).await.kind != "drained" {}
    }
    each_event_arrives_once_everywhere(&a, &b).await;
}
