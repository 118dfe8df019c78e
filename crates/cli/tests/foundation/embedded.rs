use std::time::Duration;

use cascade_testkit::temp_dir;

use crate::common::Served;

#[tokio::test]
async fn embedded_default_starts_from_nothing_serves_and_is_reused() {
    let data = temp_dir("embedded");
    let pid_file = data.join("pg/data/postmaster.pid");
    for run in 0..2 {
        let mut served = Served::start(&[("CASCADE_DATA_DIR", data.display().to_string())]).await;
        let body = served
            .wait_for(
                "/health",
                Duration::from_secs(30),
                "embedded server healthy",
                |s, _| s == 200,
            )
            .await;
        assert_eq!(body["postgres"], "up");
        assert!(
            pid_file.exists(),
            "the embedded PostgreSQL runs from the data dir"
        );
        if run == 1 {
            assert!(
                !served.log().contains("initialising"),
                "second run reuses the cluster:\n{}",
                served.log()
            );
        }
        served.terminate();
        assert!(
            served.wait_exit(Duration::from_secs(30)).success(),
            "{}",
            served.log()
        );
        assert!(
            !pid_file.exists(),
            "the embedded PostgreSQL is stopped on exit:\n{}",
            served.log()
        );
    }
    let _ = std::fs::remove_dir_all(&data);
}
