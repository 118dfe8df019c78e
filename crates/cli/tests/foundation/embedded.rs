use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use cascade_core::db::{RELOCATED_ROOT, cluster_dir};
use cascade_testkit::temp_dir;

use crate::common::Served;

/// The new cluster, reached on its socket in `socket_dir`, runs with seed 002's settings (its
/// memory figures are scaled to the machine and not checked here).
async fn assert_seed_002_settings(socket_dir: &Path) {
    let mut config = tokio_postgres::Config::new();
    config
        .host_path(socket_dir)
        .port(5432)
        .user("postgres")
        .dbname("cascade");
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.expect("socket");
    tokio::spawn(connection);
    for (setting, value) in [
        ("random_page_cost", "1.1"),
        ("work_mem", "16MB"),
        ("max_connections", "100"),
        ("checkpoint_completion_target", "0.9"),
    ] {
        let row = client
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .expect("SHOW");
        assert_eq!(row.get::<_, String>(0), value, "{setting}");
    }
    // Not a seed 002 setting: full-page images compressed, lz4 where the server has it.
    let row = client
        .query_one(
            "SELECT setting, coalesce('lz4' = ANY(enumvals), false) FROM pg_settings WHERE name = 'wal_compression'",
            &[],
        )
        .await
        .expect("wal_compression");
    let (method, has_lz4): (String, bool) = (row.get(0), row.get(1));
    if has_lz4 {
        assert_eq!(method, "lz4");
    } else {
        // PostgreSQL 15 without lz4 spells `on` as pglz; before 15 it was a boolean.
        assert!(["pglz", "on"].contains(&method.as_str()), "{method}");
    }
}

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
        if run == 0 {
            assert_seed_002_settings(&data.join("pg/run")).await;
        }
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

/// Two runs of `cascade serve` with the embedded default from `project` as the working
/// directory: both serve `/health` from PostgreSQL, the second reuses the cluster in `cluster`,
/// and each stops it on exit.
async fn serve_twice_from(project: &Path, cluster: &Path) -> String {
    let pid_file = cluster.join("data/postmaster.pid");
    let mut logs = String::new();
    for run in 0..2 {
        let mut served = Served::start_in(project, &[]).await;
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
            "the embedded PostgreSQL runs from {}:\n{}",
            cluster.display(),
            served.log()
        );
        if run == 0 {
            assert_seed_002_settings(&cluster.join("run")).await;
        }
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
        assert!(!pid_file.exists(), "stopped on exit:\n{}", served.log());
        logs.push_str(&served.log());
    }
    logs
}

/// A clone under root's home (mode 700): the `postgres` user, which the embedded PostgreSQL runs
/// as when we are root, cannot reach `./.cascade`, so the cluster goes under RELOCATED_ROOT.
#[tokio::test]
async fn as_root_a_project_in_a_closed_home_directory_serves_with_the_embedded_default() {
    let home = temp_dir("home-700");
    if std::fs::metadata(&home).unwrap().uid() != 0 {
        eprintln!("skipped: only root's embedded PostgreSQL runs as another user");
        return;
    }
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
    let project = home.join("cascade");
    std::fs::create_dir_all(&project).unwrap();
    let cluster = cluster_dir(&project.join(".cascade")).unwrap();
    assert!(
        cluster.starts_with(RELOCATED_ROOT),
        "the postgres user cannot reach {}, yet the cluster stays at {}",
        project.display(),
        cluster.display()
    );

    let logs = serve_twice_from(&project, &cluster).await;
    assert!(
        logs.contains(&cluster.display().to_string()),
        "the log says where the cluster is:\n{logs}"
    );
    let mode = std::fs::metadata(&cluster).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o700, "the relocated cluster is private");
    assert!(
        !project.join(".cascade/pg/data").exists(),
        "nothing is initialised where PostgreSQL cannot run"
    );
    let _ = std::fs::remove_dir_all(&cluster);
    let _ = std::fs::remove_dir_all(&home);
}
