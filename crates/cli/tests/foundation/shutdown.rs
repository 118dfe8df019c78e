use std::time::{Duration, Instant};

use cascade_testkit::PgServer;

use crate::common::{Served, http};

#[tokio::test]
async fn sigterm_lets_an_in_flight_request_finish() {
    let pg = PgServer::start().await;
    let mut served = Served::start(&[
        ("DATABASE_URL", pg.fresh_database().await),
        ("PG_ACQUIRE_TIMEOUT", "1s".into()),
        ("PG_CONNECT_TIMEOUT", "1s".into()),
    ])
    .await;

    // A paused PostgreSQL makes /health/db wait for its 2 s probe deadline: a request that is
    // genuinely in flight when the signal arrives.
    pg.pause();
    let url = format!("{}/health/db", served.base);
    let in_flight = tokio::spawn(async move {
        let started = Instant::now();
        let response = http()
            .get(url)
            .bearer_auth(crate::common::ADMIN_TOKEN)
            .send()
            .await;
        (response.map(|r| r.status().as_u16()), started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    served.terminate();

    let (status, elapsed) = in_flight.await.unwrap();
    assert_eq!(status.expect("the in-flight request got its answer"), 503);
    assert!(
        elapsed >= Duration::from_millis(1500),
        "answered before the probe deadline: {elapsed:?}"
    );
    pg.resume();
    let exit = served.wait_exit(Duration::from_secs(30));
    assert!(exit.success(), "exit {exit}:\n{}", served.log());
    assert!(served.log().contains("draining in-flight requests"));
    // New connections are refused once it has exited.
    assert!(
        http()
            .get(format!("{}/health", served.base))
            .send()
            .await
            .is_err()
    );
}
