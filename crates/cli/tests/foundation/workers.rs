//! `cascade worker`: execution workers in processes of their own, killed with SIGKILL at
//! random moments during a run of thousands of executions (the crash checker). At the end every
//! execution has finished (succeeded, or failed after its last attempt), none is stuck, and
//! none was completed twice.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use cascade_agents::queries::Actor;
use cascade_testkit::PgServer;
use serde_json::json;

use crate::common::{cascade, empty_dir, run_bounded};

const EXECUTIONS: usize = 2000;
const MAX_ATTEMPTS: i32 = 10;

/// Worker processes, killed when the test ends however it ends.
struct Workers {
    url: String,
    dir: std::path::PathBuf,
    children: Vec<Child>,
}

impl Workers {
    fn spawn(&mut self) {
        let mut command = cascade(&self.dir);
        command
            .arg("worker")
            .env("DATABASE_URL", &self.url)
            .env("AGENTS_WORKERS", "2")
            .env("AGENTS_WORKER_BATCH", "16")
            .env("AGENTS_HEARTBEAT_INTERVAL", "200ms")
            .env("AGENTS_HEARTBEAT_TIMEOUT", "1s")
            .env("AGENTS_RETRY_BACKOFF", "50ms")
            .env("AGENTS_POLL_INTERVAL", "200ms")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.children
            .push(command.spawn().expect("spawn cascade worker"));
    }

    /// SIGKILL: no shutdown, no completion, claims left behind mid-batch.
    fn kill(&mut self, index: usize) {
        let mut child = self.children.remove(index);
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_killed_at_random_moments_lose_nothing_and_complete_nothing_twice() {
    let pg = PgServer::start().await;
    let url = pg.fresh_database().await;
    let dir = empty_dir();
    let mut migrate = cascade(&dir);
    migrate.arg("migrate").env("DATABASE_URL", &url);
    let (out, _) = run_bounded(migrate, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut sql = pg.client(url.rsplit('/').next().unwrap()).await;
    let user: i64 = sql
        .query_one(
            "INSERT INTO cascade_users (username, password_hash) VALUES ('crash', '-') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let steps = json!([{"capability": "echo", "input": {"step": 0}},
                       {"capability": "noop"},
                       {"capability": "echo", "input": {"step": 2}}]);
    let workflow: i64 = sql
        .query_one(
            "INSERT INTO workflows (owner_id, name, steps) VALUES ($1, 'crash', $2) RETURNING id",
            &[&user, &steps],
        )
        .await
        .unwrap()
        .get(0);
    let tx = sql.transaction().await.unwrap();
    let actor = Actor {
        user_id: user,
        request_id: None,
    };
    for i in 0..EXECUTIONS {
        cascade_agents::queue::enqueue(&tx, &actor, workflow, &json!({"i": i}), MAX_ATTEMPTS)
            .await
            .unwrap()
            .expect("the workflow exists");
    }
    tx.commit().await.unwrap();

    let mut workers = Workers {
        url: url.clone(),
        dir,
        children: Vec::new(),
    };
    for _ in 0..3 {
        workers.spawn();
    }
    let live = "SELECT count(*) FROM executions WHERE state IN ('queued', 'running')";
    // Kill a random worker at a random moment, and start a fresh one, while work remains.
    let mut kills = 0;
    while kills < 8 {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(100..600))).await;
        let remaining: i64 = sql.query_one(live, &[]).await.unwrap().get(0);
        if remaining == 0 {
            break;
        }
        let victim = fastrand::usize(..workers.children.len());
        workers.kill(victim);
        workers.spawn();
        kills += 1;
    }
    let started = Instant::now();
    loop {
        let remaining: i64 = sql.query_one(live, &[]).await.unwrap().get(0);
        if remaining == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{remaining} executions stuck"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(workers);
    assert!(
        kills > 0,
        "the workers finished before any was killed: nothing was tested"
    );

    let states: Vec<(String, i64)> = sql
        .query(
            "SELECT state, count(*) FROM executions GROUP BY state ORDER BY state",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let total: i64 = states.iter().map(|(_, n)| n).sum();
    assert_eq!(total, EXECUTIONS as i64, "{states:?}");
    assert!(
        states
            .iter()
            .all(|(s, _)| s == "succeeded" || s == "failed"),
        "{states:?}"
    );
    // A failure is one that used every attempt.
    let early_failures: i64 = sql
        .query_one(
            "SELECT count(*) FROM executions WHERE state = 'failed' AND attempt < max_attempts",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(early_failures, 0);
    // Completed once: one final audit row per execution, and a success has every step's output.
    let not_once: i64 = sql
        .query_one(
            "SELECT count(*) FROM executions e WHERE (SELECT count(*) FROM audit_log a \
             WHERE a.entity_type = 'execution' AND a.entity_id = e.id::text \
               AND a.action IN ('execution.succeeded', 'execution.failed')) <> 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(not_once, 0);
    let wrong_results: i64 = sql
        .query_one(
            "SELECT count(*) FROM executions WHERE state = 'succeeded' \
             AND result <> '[{\"step\": 0}, null, {\"step\": 2}]'::jsonb",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(wrong_results, 0);
    let rescued: i64 = sql
        .query_one("SELECT count(*) FROM executions WHERE attempt > 1", &[])
        .await
        .unwrap()
        .get(0);
    eprintln!(
        "{kills} workers killed; {rescued} executions needed more than one attempt; {states:?}"
    );
}
