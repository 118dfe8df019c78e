//! Spaces under churn: one client per connection (64 by default), each an account with an
//! active consciousness session, joining and leaving random spaces for the scenario's time.
//! There are fewer places than clients (a space of 6 per 8 clients: 8 spaces for 64), so
//! joins meet full spaces all along.
//!
//! Measured: join and leave requests per second and their latency. Checked: every answer is
//! one the API promises (201/200 joined, 409 full, 204 left; anything else is an error), and
//! no space is ever above its limit: sampled from PostgreSQL while the clients run, and at
//! the end, where each space's count must also equal its participant rows. A broken
//! invariant fails the suite.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};

use super::Suite;
use super::client::Client;
use super::report::Row;

/// Clients per space; each space takes [`LIMIT`] of them.
const CLIENTS_PER_SPACE: usize = 8;
const LIMIT: i64 = 6;

pub(super) async fn run(suite: &Suite) -> anyhow::Result<Row> {
    let clients = suite.wrk.connections.max(2);
    let spaces = (clients / CLIENTS_PER_SPACE).max(1);
    let base = suite.wrk.base.clone();
    let http =
        cascade_core::upstream::http_client(Duration::from_secs(2), Duration::from_secs(30))?;
    let sql = connect(&suite.pg.url()).await?;
    // Creating spaces needs a paid tier (billing would set it).
    sql.execute(
        "UPDATE cascade_users SET subscription_tier = 'participant' WHERE username = $1",
        &[&super::BENCH_ACCOUNT],
    )
    .await?;
    let owner = suite.client.token.clone();
    for i in 0..spaces {
        let body = json!({"space_id": format!("bench-{i}"), "title": format!("Bench {i}"),
                          "max_participants": LIMIT, "consciousness_threshold": "0.50"});
        expect(&http, &base, "/spaces", &owner, Some(body), &[201]).await?;
    }
    let mut tokens = Vec::with_capacity(clients);
    for i in 0..clients {
        let mut member = Client::new(&base)?;
        member.register(&format!("bench-member-{i}")).await?;
        let token = member.token;
        let session = json!({ "consciousness_level": "0.90" });
        expect(
            &http,
            &base,
            "/consciousness/sessions",
            &token,
            Some(session),
            &[201],
        )
        .await?;
        tokens.push(token);
    }

    let seconds = suite.wrk.seconds;
    let stop = Arc::new(AtomicBool::new(false));
    let admitted = Arc::new(AtomicU64::new(0));
    let full = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for token in tokens {
        let (http, base, stop) = (http.clone(), base.clone(), stop.clone());
        let (admitted, full, errors) = (admitted.clone(), full.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let space = format!("/spaces/bench-{}", fastrand::usize(..spaces));
                let (status, took) = post(&http, &base, &format!("{space}/join"), &token).await;
                latencies.push(took);
                match status {
                    Some(200 | 201) => {
                        admitted.fetch_add(1, Ordering::Relaxed);
                        let (status, took) =
                            post(&http, &base, &format!("{space}/leave"), &token).await;
                        latencies.push(took);
                        if status != Some(204) {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Some(409) => {
                        full.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            latencies
        }));
    }
    // Sample the invariant while the clients run.
    let deadline = started + Duration::from_secs(seconds);
    let mut samples = 0u64;
    let mut fullest = 0i64;
    while Instant::now() < deadline {
        let most: i64 = sql
            .query_one(
                "SELECT COALESCE(max(participant_count), 0)::int8, \
                        count(*) FILTER (WHERE participant_count > max_participants) \
                 FROM collaboration_spaces WHERE space_id LIKE 'bench-%'",
                &[],
            )
            .await
            .map(|row| {
                let over: i64 = row.get(1);
                if over > 0 { i64::MAX } else { row.get(0) }
            })?;
        ensure!(most != i64::MAX, "a space went above its limit of {LIMIT}");
        fullest = fullest.max(most);
        samples += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await?);
    }
    let elapsed = started.elapsed();

    let wrong: i64 = sql
        .query_one(
            "SELECT count(*) FROM collaboration_spaces s WHERE s.space_id LIKE 'bench-%' AND \
               (s.participant_count > s.max_participants OR s.participant_count <> \
                (SELECT count(*) FROM space_participants p WHERE p.space_pk = s.id))",
            &[],
        )
        .await?
        .get(0);
    if wrong > 0 {
        bail!("{wrong} space(s) above their limit or with a count unlike their participants");
    }
    let notes = format!(
        "{clients} clients, {spaces} spaces of {LIMIT}: {} joins admitted, {} refused full (409); \
         no space above its limit ({samples} samples while running, fullest {fullest}/{LIMIT}; \
         counts equal participant rows at the end)",
        admitted.load(Ordering::Relaxed),
        full.load(Ordering::Relaxed),
    );
    Ok(Row::from_latencies(
        "spaces: join and leave (concurrent clients)".to_string(),
        &mut latencies,
        elapsed,
        errors.load(Ordering::Relaxed),
        notes,
    ))
}

pub(super) async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connecting to the suite's PostgreSQL")?;
    tokio::spawn(connection);
    Ok(client)
}

/// A `POST` as `token`: its status (`None` when no answer came) and how long it took.
async fn post(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    token: &str,
) -> (Option<u16>, Duration) {
    let begun = Instant::now();
    let status = http
        .post(format!("{base}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16());
    (status, begun.elapsed())
}

/// A `POST` whose status must be one of `ok`; its JSON body.
async fn expect(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
    ok: &[u16],
) -> anyhow::Result<Value> {
    let mut request = http.post(format!("{base}{path}")).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    ensure!(ok.contains(&status), "POST {path}: {status}: {body}");
    Ok(body)
}
