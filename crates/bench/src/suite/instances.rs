//! Three instances on one PostgreSQL and one Redis (docs/deploy.md's topology A), as a user
//! behind a load balancer sees them: the suite's client sends reads round-robin over the
//! three while one writer writes through the first (A), and the stale-read probe checks every
//! read, whichever instance answered it, against the writes A acknowledged before it was sent
//! (read-your-writes across instances). Then, under the same traffic, the drills: Redis
//! killed (failed requests, stale reads, time until every instance serves shared-tier hits
//! again), and instance C SIGKILLed, the client skipping it as a load balancer's health check
//! would, then started again and put back with an empty in-process tier (no stale read).

use std::time::{Duration, Instant};

use super::client::Client;
use super::freshness::{Outcome, Probe, Seen, Write, writes_note};
use super::redis_outage::{back_to_shared_hits, recovery_note};
use super::report::Row;
use super::server::ServerProc;
use super::{Suite, warm};

/// Concurrent readers, each taking the instances in turn.
const READERS: usize = 16;
/// The instances' names in the rows, in the probe's order.
const NAMES: [&str; 3] = ["A", "B", "C"];
/// The instance the third drill kills.
const KILLED: usize = 2;
/// How long the others still wait for a dead instance's acknowledgement (up to the bus's
/// 300 ms each) after they last heard it: its liveness window (ARCHITECTURE.md, "Keeping
/// in-process tiers coherent").
const HEARD_WITHIN: Duration = Duration::from_secs(1);
/// How long a started instance has to answer `/health`.
const READY_BOUND: Duration = Duration::from_secs(120);

pub(super) async fn run(suite: &mut Suite) -> anyhow::Result<Vec<Row>> {
    let b = start(suite, "instance-b").await?;
    let c = start(suite, "instance-c").await?;
    let clients = vec![
        suite.client.clone(),
        client_of(&b, suite)?,
        client_of(&c, suite)?,
    ];
    for client in &clients[1..] {
        warm(client, &suite.hot).await?;
    }
    let steady = steady(suite, &clients).await?;
    let redis = redis_killed(suite, &clients).await?;
    let killed = instance_killed(suite, &clients, c).await?;
    drop(b);
    Ok(vec![steady, redis, killed])
}

/// One more instance on the suite's PostgreSQL and Redis, answering.
async fn start(suite: &Suite, name: &str) -> anyhow::Result<ServerProc> {
    let mut server = suite.another_server(name, &[])?;
    server.wait_ready(READY_BOUND).await?;
    Ok(server)
}

/// A client of `server` with the bench account's token (one signing key for every instance).
fn client_of(server: &ServerProc, suite: &Suite) -> anyhow::Result<Client> {
    let mut client = Client::new(&server.base)?;
    client.token = suite.client.token.clone();
    Ok(client)
}

/// The probe through all three, nothing taken away.
async fn steady(suite: &Suite, clients: &[Client]) -> anyhow::Result<Row> {
    let started = Instant::now();
    let probe = Probe::across(&clients[0], clients, &suite.hot, &suite.hot[0], READERS);
    tokio::time::sleep(Duration::from_secs(suite.wrk.seconds)).await;
    let mut seen = probe.stop().await?;
    let notes = format!(
        "{}; {}",
        per_instance(&seen.instances),
        writes_note(&seen.writes, started, "after the start")
    );
    Ok(row(
        "three instances: reads round-robin, writes through A".into(),
        &mut seen,
        started,
        notes,
    ))
}

/// Redis killed for the outage time under the probe through all three.
async fn redis_killed(suite: &mut Suite, clients: &[Client]) -> anyhow::Result<Row> {
    let outage = suite.outage();
    let lead = outage / 2;
    let started = Instant::now();
    let probe = Probe::across(&clients[0], clients, &suite.hot, &suite.hot[0], READERS);
    tokio::time::sleep(lead).await;
    suite.redis.kill();
    let killed = Instant::now();
    tokio::time::sleep(outage).await;
    suite.redis.restart().await;
    let recovered = back_to_shared_hits(clients).await?;
    tokio::time::sleep(lead).await;
    let mut seen = probe.stop().await?;
    let each: Vec<String> = NAMES
        .iter()
        .zip(&recovered)
        .map(|(name, back)| format!("{name} {}", recovery_note(*back)))
        .collect();
    let all = if recovered.contains(&None) {
        None
    } else {
        recovered.iter().flatten().max().copied()
    };
    let notes = format!(
        "{}; {}; every instance back to shared-tier hits {} after Redis returned ({})",
        per_instance(&seen.instances),
        writes_note(&seen.writes, killed, "after the kill"),
        recovery_note(all),
        each.join(", ")
    );
    Ok(row(
        format!(
            "three instances, Redis killed for {}s under load",
            outage.as_secs()
        ),
        &mut seen,
        started,
        notes,
    ))
}

/// Instance C SIGKILLed under the probe, out of rotation while it is down, then started again
/// and put back: A and B must not notice, and C's empty in-process tier must serve no stale
/// read.
async fn instance_killed(
    suite: &Suite,
    clients: &[Client],
    mut victim: ServerProc,
) -> anyhow::Result<Row> {
    let down = suite.outage();
    let lead = down / 2;
    let name = NAMES[KILLED];
    let started = Instant::now();
    let probe = Probe::across(&clients[0], clients, &suite.hot, &suite.hot[0], READERS);
    tokio::time::sleep(lead).await;
    victim.kill();
    let killed = Instant::now();
    // The health check notices: reads sent before this moment may still have gone to it.
    probe.leave(KILLED);
    tokio::time::sleep(down).await;
    let restarting = Instant::now();
    let again = start(suite, "instance-c-again").await?;
    let ready = restarting.elapsed();
    let before = probe.seen(KILLED);
    probe.rejoin(KILLED, client_of(&again, suite)?);
    let rejoined = killed.elapsed();
    tokio::time::sleep(lead).await;
    let mut seen = probe.stop().await?;
    drop(again);

    let others: Vec<String> = NAMES
        .iter()
        .zip(&seen.instances)
        .enumerate()
        .filter(|(i, _)| *i != KILLED)
        .map(|(_, (name, seen))| describe(name, *seen))
        .collect();
    let back = seen.instances[KILLED].since(before);
    let notes = format!(
        "{}; {name}: {} reads failed (in flight at the kill, or sent before the client took it \
         out of rotation), started again (answering in {} ms) and back in rotation {} ms after \
         the kill, then {} reads, {} failed, {} stale of {} checked; {}; {}",
        others.join("; "),
        before.failed,
        ready.as_millis(),
        rejoined.as_millis(),
        back.reads,
        back.failed,
        back.stale,
        back.checked,
        writes_note(&seen.writes, killed, "after the kill"),
        writes_around(&seen.writes, killed),
    );
    Ok(row(
        format!("three instances, {name} SIGKILLed for {}s", down.as_secs()),
        &mut seen,
        started,
        notes,
    ))
}

/// The writes under way in the [`HEARD_WITHIN`] after the kill (those that may wait for the
/// dead instance), as a row says them.
fn writes_around(writes: &[Write], killed: Instant) -> String {
    let during: Vec<&Write> = writes
        .iter()
        .filter(|w| w.begun + w.took > killed && w.begun < killed + HEARD_WITHIN)
        .collect();
    let slowest = during.iter().map(|w| w.took).max().unwrap_or_default();
    format!(
        "{} writes under way in the {} ms after the kill, the slowest {} ms",
        during.len(),
        HEARD_WITHIN.as_millis(),
        slowest.as_millis()
    )
}

/// The probe's outcome as a row: every read's latency, every failed request in `errors`.
fn row(scenario: String, seen: &mut Outcome, started: Instant, notes: String) -> Row {
    Row::from_latencies(
        scenario,
        &mut seen.latencies,
        started.elapsed(),
        seen.failed,
        notes,
    )
}

/// Each instance's reads, failed and stale, as a row says them.
fn per_instance(instances: &[Seen]) -> String {
    NAMES
        .iter()
        .zip(instances)
        .map(|(name, seen)| describe(name, *seen))
        .collect::<Vec<_>>()
        .join("; ")
}

fn describe(name: &str, seen: Seen) -> String {
    format!(
        "{name}: {} reads, {} failed, {} stale of {} checked",
        seen.reads, seen.failed, seen.stale, seen.checked
    )
}
