//! Workflows and their executions: every execution is run and completed exactly once, across
//! instances and workers, through a dead worker's abandoned claims and a PostgreSQL restart.

use std::time::{Duration, Instant};

use cascade_agents::queries::Actor;
use cascade_agents::queue::{self, Finished, Outcome};
use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{Cluster, UNIFIED, User, assert_bad_field};

/// Fast heartbeats and retries, so rescues happen within a test's patience.
const FAST: &[(&str, &str)] = &[
    ("AGENTS_HEARTBEAT_INTERVAL", "200ms"),
    ("AGENTS_HEARTBEAT_TIMEOUT", "1s"),
    ("AGENTS_RETRY_BACKOFF", "100ms"),
    ("AGENTS_POLL_INTERVAL", "250ms"),
];

fn with<'a>(base: &[(&'a str, &'a str)], more: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    base.iter().chain(more).copied().collect()
}

async fn workflow(user: &User, base: &str, steps: usize) -> i64 {
    let steps: Vec<Value> = (0..steps)
        .map(|i| json!({"capability": "echo", "input": {"step": i}}))
        .collect();
    let (status, body) = user
        .send(
            base,
            Method::POST,
            "/workflows",
            Some(json!({"name": "pipeline", "steps": steps})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["id"].as_i64().unwrap()
}

/// Enqueues `n` executions of `workflow` in one transaction of the test's own, through the
/// library (as another module's write would).
async fn enqueue_in_one_transaction(cluster: &Cluster, user: &User, workflow: i64, n: usize) {
    let mut sql = cluster.sql().await;
    let tx = sql.transaction().await.unwrap();
    let actor = Actor {
        user_id: user.id,
        request_id: None,
    };
    for i in 0..n {
        let queued = queue::enqueue(&tx, &actor, workflow, &json!({"n": i}), 3)
            .await
            .unwrap();
        assert!(queued.is_some());
    }
    tx.commit().await.unwrap();
}

/// Waits (at most `bound`) until no execution is queued or running; returns the counts by state.
async fn settle(cluster: &Cluster, bound: Duration) -> Vec<(String, i64)> {
    let started = Instant::now();
    loop {
        let live = cluster
            .count("SELECT count(*) FROM executions WHERE state IN ('queued', 'running')")
            .await;
        if live == 0 || started.elapsed() > bound {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rows = cluster
        .sql()
        .await
        .query(
            "SELECT state, count(*) FROM executions GROUP BY state ORDER BY state",
            &[],
        )
        .await
        .unwrap();
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

/// Executions whose number of `execution.succeeded` audit rows is not exactly one.
/// `cascade_executions_finished_total{state}` on `base`'s `/metrics`.
async fn finished_metric(base: &str, state: &str) -> f64 {
    let client =
        cascade_core::upstream::http_client(Duration::from_secs(2), Duration::from_secs(10))
            .expect("client");
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("/metrics")
        .text()
        .await
        .expect("/metrics body");
    let series = format!("cascade_executions_finished_total{{state=\"{state}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&series))
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
        .trim()
        .parse()
        .expect("a number")
}

async fn not_completed_once(cluster: &Cluster) -> i64 {
    cluster
        .count(
            "SELECT count(*) FROM executions e WHERE (SELECT count(*) FROM audit_log a \
             WHERE a.entity_type = 'execution' AND a.entity_id = e.id::text \
               AND a.action = 'execution.succeeded') <> 1",
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_execution_runs_once_across_two_instances_and_four_workers() {
    executions_run_once_on_two_instances(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_execution_runs_once_across_two_instances_in_unified_mode() {
    executions_run_once_on_two_instances(&[UNIFIED]).await;
}

/// Two instances of two workers each, with `extra` settings.
async fn executions_run_once_on_two_instances(extra: &[(&str, &str)]) {
    let workers = [("AGENTS_WORKERS", "2"), ("AGENTS_WORKER_BATCH", "8")];
    let settings = with(&with(FAST, &workers), extra);
    let cluster = Cluster::start_with(2, &settings).await;
    let alice = cluster.user("alice").await;
    let flow = workflow(&alice, cluster.base(0), 2).await;

    // Some over HTTP, to both instances, and many in one transaction of the caller's.
    let path = format!("/workflows/{flow}/executions");
    for i in 0..40 {
        let base = cluster.base(i % 2);
        let (status, body) = alice
            .send(
                base,
                Method::POST,
                &path,
                Some(json!({"input": {"http": i}})),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["state"], "queued");
    }
    enqueue_in_one_transaction(&cluster, &alice, flow, 400).await;

    let states = settle(&cluster, Duration::from_secs(90)).await;
    assert_eq!(states, [("succeeded".to_string(), 440)]);
    assert_eq!(not_completed_once(&cluster).await, 0);
    // The workers counted the completions by the state they left. The test's instances share
    // the process's metrics registry with the other tests running beside it: at least these.
    let counted = finished_metric(cluster.base(0), "succeeded").await;
    assert!(
        counted >= 440.0,
        "cascade_executions_finished_total{{state=succeeded}} {counted}"
    );
    // Claimed once each: `attempt` counts claims.
    assert_eq!(
        cluster
            .count("SELECT count(*) FROM executions WHERE attempt <> 1")
            .await,
        0
    );
    // Each step's output, in order.
    let results = cluster
        .count(
            "SELECT count(*) FROM executions \
             WHERE result = '[{\"step\": 0}, {\"step\": 1}]'::jsonb AND finished_at IS NOT NULL",
        )
        .await;
    assert_eq!(results, 440);

    // And through the API: the owner sees the execution; another account does not.
    let (status, one) = alice.get(cluster.base(1), "/executions/1").await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["state"], "succeeded");
    let bob = cluster.user("bob").await;
    assert_eq!(bob.get(cluster.base(0), "/executions/1").await.0, 404);
    assert_eq!(
        bob.send(cluster.base(0), Method::POST, &path, Some(json!({})))
            .await
            .0,
        404
    );
    assert_eq!(
        bob.get(cluster.base(0), &format!("/workflows/{flow}"))
            .await
            .0,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_workers_claims_are_rescued_and_completed_once() {
    // No workers at first: the test plays a worker that claims and dies.
    let mut cluster = Cluster::start_with(1, &with(FAST, &[("AGENTS_WORKERS", "0")])).await;
    let alice = cluster.user("alice").await;
    let base = cluster.base(0).to_string();
    let base = base.as_str();
    let flow = workflow(&alice, base, 1).await;
    let path = format!("/workflows/{flow}/executions");
    let (_, retried) = alice.send(base, Method::POST, &path, Some(json!({}))).await;
    let (_, last_try) = alice
        .send(base, Method::POST, &path, Some(json!({"max_attempts": 1})))
        .await;

    let sql = cluster.sql().await;
    let claimed = queue::claim(&sql, "ghost", 10, &builtin()).await.unwrap();
    assert_eq!(claimed.len(), 2);
    assert!(claimed.iter().all(|c| c.attempt == 1));

    // The ghost stops heartbeating: after the timeout its claims are taken back.
    let started = Instant::now();
    while cluster
        .count("SELECT count(*) FROM executions WHERE state = 'running'")
        .await
        > 0
    {
        assert!(started.elapsed() < Duration::from_secs(15), "no rescue");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, failed) = alice
        .get(base, &format!("/executions/{}", last_try["id"]))
        .await;
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("ghost stopped heartbeating during attempt 1 of 1"),
        "{failed}"
    );
    assert!(failed["finished_at"].is_string());

    // The ghost wakes up and reports: refused, the claims are no longer its own.
    let mut sql = cluster.sql().await;
    let tx = sql.transaction().await.unwrap();
    let late: Vec<Finished> = claimed
        .iter()
        .map(|c| Finished {
            id: c.id,
            attempt: c.attempt,
            outcome: Outcome::Succeeded(json!(["late"])),
        })
        .collect();
    let done = queue::complete(&tx, "ghost", &late, Duration::from_millis(100))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(done, Vec::<i64>::new());

    // A live worker takes the requeued one and completes it, on its second attempt.
    cluster
        .add_server(&with(FAST, &[("AGENTS_WORKERS", "1")]))
        .await;
    let states = settle(&cluster, Duration::from_secs(30)).await;
    assert_eq!(
        states,
        [("failed".to_string(), 1), ("succeeded".to_string(), 1)]
    );
    let (_, succeeded) = alice
        .get(base, &format!("/executions/{}", retried["id"]))
        .await;
    assert_eq!(succeeded["state"], "succeeded", "{succeeded}");
    assert_eq!(succeeded["attempt"], 2);
    assert_eq!(succeeded["result"], json!([{"step": 0}]));
    let completions = cluster
        .count(
            "SELECT count(*) FROM audit_log WHERE entity_type = 'execution' \
             AND action IN ('execution.succeeded', 'execution.failed')",
        )
        .await;
    assert_eq!(completions, 2, "each execution finished once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_mid_run_loses_nothing_and_runs_nothing_twice() {
    let settings = with(
        &[
            ("AGENTS_HEARTBEAT_INTERVAL", "500ms"),
            ("AGENTS_HEARTBEAT_TIMEOUT", "20s"),
            ("AGENTS_RETRY_BACKOFF", "100ms"),
            ("AGENTS_POLL_INTERVAL", "250ms"),
        ],
        &[("AGENTS_WORKERS", "2"), ("AGENTS_WORKER_BATCH", "4")],
    );
    let mut cluster = Cluster::start_with(2, &settings).await;
    let alice = cluster.user("alice").await;
    let flow = workflow(&alice, cluster.base(0), 3).await;
    enqueue_in_one_transaction(&cluster, &alice, flow, 600).await;
    // Let the workers start, then restart PostgreSQL under them.
    let started = Instant::now();
    while cluster
        .count("SELECT count(*) FROM executions WHERE state = 'succeeded'")
        .await
        == 0
    {
        assert!(started.elapsed() < Duration::from_secs(20), "nothing ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = cluster
        .count("SELECT count(*) FROM executions WHERE state = 'succeeded'")
        .await;
    cluster.pg.restart().await;
    eprintln!("succeeded before the restart: {before}");
    assert!(
        before < 600,
        "all ran before the restart: nothing was tested"
    );

    let states = settle(&cluster, Duration::from_secs(90)).await;
    assert_eq!(states, [("succeeded".to_string(), 600)]);
    assert_eq!(not_completed_once(&cluster).await, 0);
    // No attempt failed for the outage (that would run its steps again). The one way to a
    // second claim is a claim whose answer was lost with the connection: no worker knew of
    // it, and it was rescued after the heartbeat timeout.
    let retried_otherwise = cluster
        .count(
            "SELECT count(*) FROM executions e WHERE e.attempt > 1 AND NOT EXISTS ( \
               SELECT 1 FROM audit_log a WHERE a.entity_type = 'execution' \
                 AND a.entity_id = e.id::text AND a.action = 'execution.retry' \
                 AND a.after->>'error' LIKE '%stopped heartbeating%')",
        )
        .await;
    assert_eq!(retried_otherwise, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_queued_execution_and_marks_a_running_one() {
    let cluster = Cluster::start_with(1, &with(FAST, &[("AGENTS_WORKERS", "0")])).await;
    let alice = cluster.user("alice").await;
    let base = cluster.base(0);
    let flow = workflow(&alice, base, 2).await;
    let path = format!("/workflows/{flow}/executions");
    let (_, queued) = alice.send(base, Method::POST, &path, Some(json!({}))).await;
    let (_, running) = alice.send(base, Method::POST, &path, Some(json!({}))).await;

    let cancel = |id: &Value| format!("/executions/{id}/cancel");
    let (status, cancelled) = alice
        .send(base, Method::POST, &cancel(&queued["id"]), None)
        .await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["state"], "cancelled");
    let (status, body) = alice
        .send(base, Method::POST, &cancel(&queued["id"]), None)
        .await;
    assert_eq!(status, 409, "{body}");

    // A worker holds the other one; the cancel is seen before its next step.
    let sql = cluster.sql().await;
    let claimed = queue::claim(&sql, "worker-x", 10, &builtin())
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1, "a cancelled execution is never claimed");
    let (status, marked) = alice
        .send(base, Method::POST, &cancel(&running["id"]), None)
        .await;
    assert_eq!(status, 200, "{marked}");
    assert_eq!(
        (
            marked["state"].as_str(),
            marked["cancel_requested"].as_bool()
        ),
        (Some("running"), Some(true))
    );
    let seen = queue::cancel_requested(&sql, "worker-x", claimed[0].id, claimed[0].attempt)
        .await
        .unwrap();
    assert_eq!(seen, Some(true));

    let other = cluster.user("mallory").await;
    let (status, _) = other
        .send(base, Method::POST, &cancel(&running["id"]), None)
        .await;
    assert_eq!(status, 404);
    let cancels = cluster
        .count("SELECT count(*) FROM audit_log WHERE action = 'execution.cancel'")
        .await;
    assert_eq!(cancels, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_workflows_and_enqueues_are_400s_and_write_nothing() {
    let cluster = Cluster::start_with(1, &[("AGENTS_WORKERS", "0")]).await;
    let alice = cluster.user("alice").await;
    let base = cluster.base(0);
    for (body, field) in [
        (
            json!({"name": "x", "steps": [{"capability": "teleport"}]}),
            "steps[0].capability",
        ),
        (json!({"name": "x", "steps": []}), "steps"),
        (
            json!({"name": "x", "steps": [{"capability": "echo", "extra": 1}]}),
            "steps[0].extra",
        ),
        (json!({"steps": [{"capability": "echo"}]}), "name"),
        (
            json!({"name": "x", "steps": [{"capability": "echo", "input": "\u{0}"}]}),
            "steps",
        ),
    ] {
        let (status, answer) = alice
            .send(base, Method::POST, "/workflows", Some(body))
            .await;
        assert_bad_field(status, &answer, field);
    }
    let flow = workflow(&alice, base, 1).await;
    let path = format!("/workflows/{flow}/executions");
    for (body, field) in [
        (json!({"input": []}), "input"),
        (json!({"max_attempts": 0}), "max_attempts"),
        (json!({"max_attempts": 101}), "max_attempts"),
        (json!({"priority": 1}), "priority"),
    ] {
        let (status, answer) = alice.send(base, Method::POST, &path, Some(body)).await;
        assert_bad_field(status, &answer, field);
    }
    let (status, answer) = alice
        .send(
            base,
            Method::POST,
            "/workflows/0/executions",
            Some(json!({})),
        )
        .await;
    assert_bad_field(status, &answer, "id");
    assert_eq!(cluster.count("SELECT count(*) FROM workflows").await, 1);
    assert_eq!(cluster.count("SELECT count(*) FROM executions").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_deletes_only_executions_finished_long_enough_ago() {
    let cluster = Cluster::start_with(1, &with(FAST, &[("AGENTS_WORKERS", "1")])).await;
    let alice = cluster.user("alice").await;
    let flow = workflow(&alice, cluster.base(0), 1).await;
    enqueue_in_one_transaction(&cluster, &alice, flow, 6).await;
    settle(&cluster, Duration::from_secs(30)).await;
    let sql = cluster.sql().await;
    // Three finished a day ago; one is queued again (not finished), old or not.
    sql.batch_execute(
        "UPDATE executions SET finished_at = now() - interval '1 day' WHERE id <= 3; \
         INSERT INTO executions (workflow_id, owner_id, steps, max_attempts, run_at) \
           SELECT workflow_id, owner_id, steps, 1, now() + interval '1 hour' FROM executions LIMIT 1",
    )
    .await
    .unwrap();
    let pruned = queue::prune(&sql, Duration::from_secs(3600), 100)
        .await
        .unwrap();
    assert_eq!(pruned, 3);
    assert_eq!(cluster.count("SELECT count(*) FROM executions").await, 4);
    assert_eq!(
        cluster
            .count("SELECT count(*) FROM executions WHERE id <= 3")
            .await,
        0
    );
}

/// Polls an execution until it has finished (at most `bound`).
async fn finished(user: &User, base: &str, id: &Value, bound: Duration) -> Value {
    let started = Instant::now();
    loop {
        let (status, execution) = user.get(base, &format!("/executions/{id}")).await;
        assert_eq!(status, 200, "{execution}");
        if execution["finished_at"].is_string() {
            return execution;
        }
        assert!(started.elapsed() < bound, "not finished: {execution}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_step_calls_the_configured_service_through_the_connector() {
    let venice = cascade_testkit::VeniceStandin::start(std::collections::HashMap::from([(
        "ada".to_string(),
        json!({"username": "ada", "ducats": 5}),
    )]))
    .await;
    let url = venice.url();
    let cluster = Cluster::start_with(
        1,
        &with(
            FAST,
            &[("AGENTS_WORKERS", "1"), ("AGENTS_HTTP_URL", url.as_str())],
        ),
    )
    .await;
    let base = cluster.base(0);
    let alice = cluster.user("alice").await;
    let steps = json!([
        {"capability": "http",
         "input": {"method": "GET", "path": "/get-ledger", "query": {"citizenUsername": "ada"}}},
        {"capability": "echo", "input": "done"},
    ]);
    let (status, flow) = alice
        .send(
            base,
            Method::POST,
            "/workflows",
            Some(json!({"name": "ledger", "steps": steps})),
        )
        .await;
    assert_eq!(status, 201, "{flow}");
    let path = format!("/workflows/{}/executions", flow["id"]);

    let (_, queued) = alice
        .send(base, Method::POST, &path, Some(json!({"max_attempts": 2})))
        .await;
    let done = finished(&alice, base, &queued["id"], Duration::from_secs(20)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["result"][0]["status"], 200);
    assert_eq!(done["result"][0]["body"]["username"], "ada", "{done}");
    assert_eq!(done["result"][1], "done");
    assert_eq!(venice.ledger_calls(), 1);

    // The service refuses: the step fails, is retried once, then the execution fails saying why.
    venice.fail(404);
    let (_, queued) = alice
        .send(base, Method::POST, &path, Some(json!({"max_attempts": 2})))
        .await;
    let failed = finished(&alice, base, &queued["id"], Duration::from_secs(20)).await;
    assert_eq!(failed["state"], "failed", "{failed}");
    assert_eq!(failed["attempt"], 2);
    assert!(
        failed["error"].as_str().unwrap().contains("answered 404"),
        "{failed}"
    );
    assert_eq!(venice.ledger_calls(), 3);

    // A cancel while the slow first step runs is honoured before the second: the first step's
    // call was made once, the second step never ran.
    venice.recover();
    venice.slow_down(Duration::from_millis(1500));
    let (_, queued) = alice
        .send(base, Method::POST, &path, Some(json!({"max_attempts": 2})))
        .await;
    let id = &queued["id"];
    let started = Instant::now();
    while venice.ledger_calls() < 4 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the step never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cancel_running(&alice, base, id).await;
    let cancelled = finished(&alice, base, id, Duration::from_secs(20)).await;
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    assert_eq!(cancelled["error"], "cancelled between steps");
    assert_eq!(cancelled["attempt"], 1);
    assert_eq!(venice.ledger_calls(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_depth_counts_live_executions_and_the_oldest_wait() {
    let cluster = Cluster::start_with(1, &[("AGENTS_WORKERS", "0")]).await;
    let alice = cluster.user("alice").await;
    let flow = workflow(&alice, cluster.base(0), 1).await;
    let sql = cluster.sql().await;
    let empty = queue::depth(&sql).await.unwrap();
    assert_eq!(
        (empty.queued, empty.running, empty.oldest_queued_seconds),
        (0, 0, 0.0)
    );
    enqueue_in_one_transaction(&cluster, &alice, flow, 3).await;
    sql.batch_execute("UPDATE executions SET run_at = now() - interval '90 seconds' WHERE id = 1")
        .await
        .unwrap();
    let waiting = queue::depth(&sql).await.unwrap();
    assert_eq!((waiting.queued, waiting.running), (3, 0));
    assert!(
        (90.0..120.0).contains(&waiting.oldest_queued_seconds),
        "{waiting:?}"
    );
    queue::claim(&sql, "w", 1, &builtin()).await.unwrap();
    let depth = queue::depth(&sql).await.unwrap();
    assert_eq!((depth.queued, depth.running), (2, 1));
    // The one that waited 90 s was claimed first; the others were enqueued just now.
    assert!(depth.oldest_queued_seconds < 60.0, "{depth:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enqueue_wakes_idle_workers_without_waiting_for_the_poll() {
    // Workers that poll once a minute: only the NOTIFY of the enqueue's commit can wake them
    // in time. Another instance polls only (`AGENTS_LISTEN=false`, as behind PgBouncer).
    let cluster = Cluster::start_with(
        1,
        &[("AGENTS_WORKERS", "1"), ("AGENTS_POLL_INTERVAL", "60s")],
    )
    .await;
    let base = cluster.base(0);
    let alice = cluster.user("alice").await;
    let flow = workflow(&alice, base, 1).await;
    // Let the worker go idle (its first claim found nothing).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let path = format!("/workflows/{flow}/executions");
    for _ in 0..3 {
        let (_, queued) = alice.send(base, Method::POST, &path, Some(json!({}))).await;
        let done = finished(&alice, base, &queued["id"], Duration::from_secs(20)).await;
        assert_eq!(done["state"], "succeeded", "{done}");
    }

    let mut polling = Cluster::start_with(1, &[("AGENTS_WORKERS", "0")]).await;
    polling
        .add_server(&[
            ("AGENTS_WORKERS", "1"),
            ("AGENTS_LISTEN", "false"),
            ("AGENTS_POLL_INTERVAL", "100ms"),
        ])
        .await;
    let bob = polling.user("bob").await;
    let flow = workflow(&bob, polling.base(0), 1).await;
    let (_, queued) = bob
        .send(
            polling.base(0),
            Method::POST,
            &format!("/workflows/{flow}/executions"),
            Some(json!({})),
        )
        .await;
    let done = finished(
        &bob,
        polling.base(0),
        &queued["id"],
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(done["state"], "succeeded", "{done}");
}

/// A custom executor that panics: what a buggy plug-in does.
struct Panicking;

impl cascade_agents::executor::Executor for Panicking {
    fn run<'a>(
        &'a self,
        _step: &'a cascade_agents::executor::Step,
    ) -> std::pin::Pin<Box<dyn Future<Output = cascade_agents::executor::StepResult> + Send + 'a>>
    {
        Box::pin(async { panic!("a plug-in bug") })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_executor_runs_its_steps_and_its_panic_fails_the_step_not_the_worker() {
    let cluster = Cluster::start_with(1, &[("AGENTS_WORKERS", "0")]).await;
    let alice = cluster.user("alice").await;
    // A worker of the test's own, with an executor the server does not have.
    let (tasks, database) = own_worker(&cluster, "boom", std::sync::Arc::new(Panicking)).await;

    // Workflows naming "boom" cannot be created on the server (it has no such executor): the
    // test writes them as another module would, then enqueues.
    let mut ids = Vec::new();
    for capability in ["boom", "echo"] {
        let steps = json!([{"capability": capability, "input": {"x": 1}}]);
        ids.push(written_and_enqueued(&cluster, &alice, &steps).await.1);
    }
    let boom = finished(&alice, cluster.base(0), &ids[0], Duration::from_secs(20)).await;
    assert_eq!(boom["state"], "failed", "{boom}");
    assert!(
        boom["error"].as_str().unwrap().contains("panicked"),
        "{boom}"
    );
    let echo = finished(&alice, cluster.base(0), &ids[1], Duration::from_secs(20)).await;
    assert_eq!(echo["state"], "succeeded", "{echo}");
    assert_eq!(echo["result"], json!([{"x": 1}]));
    assert_eq!(tasks.failures(), 0, "no worker task died");
    tasks.stop(Duration::from_secs(5)).await;
    database.db.close();
}

/// Asks to cancel the running execution `id`: it stays running, marked.
async fn cancel_running(user: &User, base: &str, id: &Value) {
    let path = format!("/executions/{id}/cancel");
    let (status, marked) = user.send(base, Method::POST, &path, None).await;
    assert_eq!(status, 200, "{marked}");
    assert_eq!(marked["state"], "running", "{marked}");
    assert_eq!(marked["cancel_requested"], true, "{marked}");
}

/// Writes a workflow of `steps` as another module would (the server may have no executor for
/// them), enqueues it once with one attempt; returns the workflow's and execution's ids.
async fn written_and_enqueued(cluster: &Cluster, user: &User, steps: &Value) -> (i64, Value) {
    let flow: i64 = cluster
        .sql()
        .await
        .query_one(
            "INSERT INTO workflows (owner_id, name, steps) VALUES ($1, 'w', $2) RETURNING id",
            &[&user.id, steps],
        )
        .await
        .unwrap()
        .get(0);
    let (status, queued) = user
        .send(
            cluster.base(0),
            Method::POST,
            &format!("/workflows/{flow}/executions"),
            Some(json!({"max_attempts": 1})),
        )
        .await;
    assert_eq!(status, 202, "{queued}");
    (flow, queued["id"].clone())
}

/// Starts one worker of the test's own on the cluster's database, with `executor` for
/// `capability` (which the server does not have); stop its tasks, then close the pool.
async fn own_worker(
    cluster: &Cluster,
    capability: &str,
    executor: std::sync::Arc<dyn cascade_agents::executor::Executor>,
) -> (
    cascade_core::tasks::Supervisor,
    cascade_server::application::Database,
) {
    let url = cluster.pg.url(&cluster.database);
    let settings = cascade_server::Settings::from_vars(&[
        ("DATABASE_URL", url),
        ("AGENTS_WORKERS", "1".to_string()),
        ("AGENTS_POLL_INTERVAL", "100ms".to_string()),
    ])
    .unwrap();
    let database = cascade_server::application::Database::open(&settings.core)
        .await
        .unwrap();
    let module = cascade_agents::AgentsModule::new(settings.agents.clone())
        .with_executor(capability, executor);
    let mut tasks = cascade_core::tasks::Supervisor::new();
    module.start_workers(
        &database.db,
        module.executors(&memory_cache(&settings)),
        &mut tasks,
    );
    (tasks, database)
}

/// An in-process cache, for the executors' connector (unused without AGENTS_HTTP_URL).
fn memory_cache(settings: &cascade_server::Settings) -> cascade_core::cache::Cache {
    cascade_core::cache::Cache::new(
        settings.core.cache.clone(),
        cascade_core::cache::Backend::Memory,
        cascade_core::cache::EngineOptions::default(),
    )
}

/// A custom executor answering what a hostile upstream could: by its step's input `kind`, an
/// output with a NUL character, an oversized output, a failure whose text holds a NUL, an
/// output the database refuses (see the test's constraint), or its input.
struct Hostile;

impl cascade_agents::executor::Executor for Hostile {
    fn run<'a>(
        &'a self,
        step: &'a cascade_agents::executor::Step,
    ) -> std::pin::Pin<Box<dyn Future<Output = cascade_agents::executor::StepResult> + Send + 'a>>
    {
        Box::pin(async move {
            match step.input["kind"].as_str() {
                Some("nul") => Ok(json!({"x": "a\u{0}b"})),
                Some("big") => Ok(json!({"x": "y".repeat(2 * 1024 * 1024)})),
                Some("nul-error") => Err("upstream said \u{0} here".to_string()),
                Some("forbidden") => Ok(json!({"x": "forbidden"})),
                _ => Ok(step.input.clone()),
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unstorable_outputs_fail_their_execution_not_the_batch_or_the_worker() {
    let cluster = Cluster::start_with(1, &[("AGENTS_WORKERS", "0")]).await;
    let alice = cluster.user("alice").await;
    let sql = cluster.sql().await;
    let mut flows = Vec::new();
    // A rule of the database's that the workers do not know: PostgreSQL rejects the batch
    // holding such a result (SQLSTATE 23514), as it would any data it cannot store.
    sql.batch_execute(
        "ALTER TABLE executions ADD CONSTRAINT no_forbidden \
         CHECK (result IS NULL OR result::text NOT LIKE '%forbidden%')",
    )
    .await
    .unwrap();
    // All are queued before the worker starts: it claims them as one batch.
    let mut ids = Vec::new();
    for kind in ["nul", "big", "nul-error", "forbidden", "fine"] {
        let steps = json!([{"capability": "hostile", "input": {"kind": kind}}]);
        let (flow, id) = written_and_enqueued(&cluster, &alice, &steps).await;
        flows.push(flow);
        ids.push(id);
    }
    let (tasks, database) = own_worker(&cluster, "hostile", std::sync::Arc::new(Hostile)).await;

    let bound = Duration::from_secs(20);
    let nul = finished(&alice, cluster.base(0), &ids[0], bound).await;
    assert_eq!(nul["state"], "failed", "{nul}");
    assert!(nul["error"].as_str().unwrap().contains("NUL"), "{nul}");
    let big = finished(&alice, cluster.base(0), &ids[1], bound).await;
    assert_eq!(big["state"], "failed");
    assert!(
        big["error"].as_str().unwrap().contains("more than the"),
        "{}",
        big["error"]
    );
    assert_eq!(big["result"], Value::Null);
    let nul_error = finished(&alice, cluster.base(0), &ids[2], bound).await;
    assert_eq!(nul_error["state"], "failed", "{nul_error}");
    assert_eq!(
        nul_error["error"], "step 0: upstream said \\u0000 here",
        "the reason is kept, its NUL shown escaped"
    );
    let forbidden = finished(&alice, cluster.base(0), &ids[3], bound).await;
    assert_eq!(forbidden["state"], "failed", "{forbidden}");
    assert!(
        forbidden["error"]
            .as_str()
            .unwrap()
            .starts_with("its outcome could not be stored"),
        "{forbidden}"
    );
    let fine = finished(&alice, cluster.base(0), &ids[4], bound).await;
    assert_eq!(fine["state"], "succeeded", "{fine}");
    assert_eq!(fine["result"], json!([{"kind": "fine"}]));

    // The worker goes on with later executions.
    let (status, later) = alice
        .send(
            cluster.base(0),
            Method::POST,
            &format!("/workflows/{}/executions", flows[4]),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 202, "{later}");
    let later = finished(&alice, cluster.base(0), &later["id"], bound).await;
    assert_eq!(later["state"], "succeeded", "{later}");
    assert_eq!(tasks.failures(), 0, "no worker task died");
    tasks.stop(Duration::from_secs(5)).await;
    database.db.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_execution_whose_attempt_fails_or_lapses_is_cancelled_not_retried() {
    let cluster = Cluster::start_with(1, &with(FAST, &[("AGENTS_WORKERS", "0")])).await;
    let alice = cluster.user("alice").await;
    let base = cluster.base(0);
    let flow = workflow(&alice, base, 2).await;
    let path = format!("/workflows/{flow}/executions");
    let body = Some(json!({"max_attempts": 3}));
    let (_, failing) = alice.send(base, Method::POST, &path, body.clone()).await;
    let (_, lapsing) = alice.send(base, Method::POST, &path, body).await;

    let mut sql = cluster.sql().await;
    let claimed = queue::claim(&sql, "worker-x", 10, &builtin())
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2);
    for id in [&failing["id"], &lapsing["id"]] {
        cancel_running(&alice, base, id).await;
    }

    // The running step fails after the cancel: cancelled at once, not requeued for attempt 2.
    let failing_claim = claimed
        .iter()
        .find(|c| json!(c.id) == failing["id"])
        .unwrap();
    let tx = sql.transaction().await.unwrap();
    let done = queue::complete(
        &tx,
        "worker-x",
        &[Finished {
            id: failing_claim.id,
            attempt: failing_claim.attempt,
            outcome: Outcome::Failed("step 0: upstream down".into()),
        }],
        Duration::from_millis(100),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(done, vec![failing_claim.id]);
    let (_, after) = alice
        .get(base, &format!("/executions/{}", failing["id"]))
        .await;
    assert_eq!(after["state"], "cancelled", "{after}");
    assert_eq!(after["attempt"], 1);
    assert!(after["finished_at"].is_string(), "{after}");

    // The other's worker stops heartbeating: the rescue cancels it rather than requeue it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let tx = sql.transaction().await.unwrap();
    let rescued = queue::rescue(
        &tx,
        Duration::from_millis(1),
        Duration::from_millis(100),
        100,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(rescued, 1);
    let (_, after) = alice
        .get(base, &format!("/executions/{}", lapsing["id"]))
        .await;
    assert_eq!(after["state"], "cancelled", "{after}");
    assert_eq!(after["attempt"], 1);
}

/// An executor that takes its time: `secs` seconds per step.
struct Slow(u64);

impl cascade_agents::executor::Executor for Slow {
    fn run<'a>(
        &'a self,
        step: &'a cascade_agents::executor::Step,
    ) -> std::pin::Pin<Box<dyn Future<Output = cascade_agents::executor::StepResult> + Send + 'a>>
    {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_secs(self.0)).await;
            Ok(step.input.clone())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_execution_is_completed_when_it_finishes_not_when_its_batchs_slowest_does() {
    let cluster = Cluster::start_with(1, &[("AGENTS_WORKERS", "0")]).await;
    let alice = cluster.user("alice").await;
    // Both queued before the worker starts: it claims them in one batch.
    let slow = written_and_enqueued(&cluster, &alice, &json!([{"capability": "slow"}])).await;
    let quick = written_and_enqueued(&cluster, &alice, &json!([{"capability": "echo"}])).await;
    let (tasks, database) = own_worker(&cluster, "slow", std::sync::Arc::new(Slow(20))).await;

    let done = finished(&alice, cluster.base(0), &quick.1, Duration::from_secs(15)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let (_, waiting) = alice
        .get(cluster.base(0), &format!("/executions/{}", slow.1))
        .await;
    assert_eq!(waiting["state"], "running", "{waiting}");
    assert_eq!(
        cluster
            .count("SELECT count(DISTINCT claimed_by) FROM executions WHERE started_at IS NOT NULL")
            .await,
        1,
        "one worker claimed both"
    );
    tasks.stop(Duration::from_secs(5)).await;
    database.db.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_leaves_executions_it_has_no_executor_for_to_one_that_has() {
    let cluster = Cluster::start_with(1, &with(FAST, &[("AGENTS_WORKERS", "1")])).await;
    let alice = cluster.user("alice").await;
    // The server's worker has no "rare" executor: it runs the echo enqueued after, and leaves
    // the "rare" one queued, unclaimed and not failed.
    let rare = written_and_enqueued(
        &cluster,
        &alice,
        &json!([{"capability": "echo"}, {"capability": "rare"}]),
    )
    .await;
    let echo = written_and_enqueued(&cluster, &alice, &json!([{"capability": "echo"}])).await;
    let done = finished(&alice, cluster.base(0), &echo.1, Duration::from_secs(20)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (_, waiting) = alice
        .get(cluster.base(0), &format!("/executions/{}", rare.1))
        .await;
    assert_eq!(waiting["state"], "queued", "{waiting}");
    assert_eq!(waiting["attempt"], 0, "never claimed: {waiting}");

    // A worker that has it runs it.
    let (tasks, database) = own_worker(&cluster, "rare", std::sync::Arc::new(Slow(0))).await;
    let done = finished(&alice, cluster.base(0), &rare.1, Duration::from_secs(20)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    tasks.stop(Duration::from_secs(5)).await;
    database.db.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_keeps_up_with_more_than_one_statements_worth_of_rows() {
    let cluster = Cluster::start_with(1, &[("AGENTS_WORKERS", "0")]).await;
    let alice = cluster.user("alice").await;
    let flow = workflow(&alice, cluster.base(0), 1).await;
    let sql = cluster.sql().await;
    sql.execute(
        "INSERT INTO executions (workflow_id, owner_id, steps, max_attempts, state, finished_at) \
         SELECT w.id, w.owner_id, w.steps, 1, 'succeeded', now() - interval '2 days' \
         FROM workflows w, generate_series(1, 12001) WHERE w.id = $1",
        &[&flow],
    )
    .await
    .unwrap();
    enqueue_in_one_transaction(&cluster, &alice, flow, 2).await;
    let pruned = queue::prune_due(
        &sql,
        Duration::from_secs(3600),
        5000,
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert_eq!(pruned, 12001, "every due row, in statements of 5000");
    assert_eq!(cluster.count("SELECT count(*) FROM executions").await, 2);
}

/// The capabilities of a server's built-in executors (no `http` without AGENTS_HTTP_URL).
fn builtin() -> Vec<String> {
    vec!["echo".to_string(), "noop".to_string()]
}
