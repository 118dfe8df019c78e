//! `get_or_load_body_batched` against a real Redis: misses of distinct keys of one namespace
//! that arrive while loads run share one loader call, and their lookups that arrive while one
//! is in flight share one lookup script; each caller gets its own value or not-found (or, in a
//! lookup batch, its own hit, lease or wait for another loader); an invalidation during the
//! batch's load refuses that key's fill and no other. A batch answers its callers as soon as
//! it is loaded: its fill (and the in-process copies it allows) follows, so a stalled Redis
//! does not hold answers already read from the source.
//!
//! Each test runs on one thread (`#[tokio::test]`), and the loader waits at a gate until the
//! test opens it: when the test sees every caller counted as a miss, every caller is parked in
//! the load group (a caller joins it in the same poll in which its lease is counted), so which
//! batches form does not depend on timing.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cascade_core::cache::{Backend, Cache, EngineOptions, NamespaceStats, Source};
use cascade_core::config::{CacheBackend, CacheConfig, RedisConfig, Secret};
use cascade_core::redis::Redis;
use cascade_testkit::RedisServer;
use tokio::sync::Semaphore;

fn engine(server: &RedisServer) -> Cache {
    engine_with_timeout(server, Duration::from_millis(500))
}

/// A client of `server` whose calls wait up to `timeout`.
fn client(server: &RedisServer, timeout: Duration) -> Redis {
    client_at(server.url(), timeout)
}

/// A client of the Redis at `url` whose calls wait up to `timeout`.
fn client_at(url: String, timeout: Duration) -> Redis {
    Redis::new(&RedisConfig {
        url: Secret::new(url.clone()),
        display: url,
        timeout,
        ca_cert: None,
        sentinel: None,
        cluster: None,
    })
    .unwrap()
}

/// An engine whose Redis calls wait up to `timeout`, whose reads load only after their lease
/// (the tests above the speculative ones count loads and lookups of that path).
fn engine_with_timeout(server: &RedisServer, timeout: Duration) -> Cache {
    engine_with(server, timeout, false)
}

/// An engine whose Redis calls wait up to `timeout`; `speculative`: its batched reads load
/// without a lookup once the namespace leans to misses (the default).
fn engine_with(server: &RedisServer, timeout: Duration, speculative: bool) -> Cache {
    engine_at(server.url(), timeout, speculative)
}

/// [`engine_with`] on the Redis at `url` (a user of its own, say).
fn engine_at(url: String, timeout: Duration, speculative: bool) -> Cache {
    let redis = client_at(url, timeout);
    let config = CacheConfig {
        backend: CacheBackend::Redis,
        ttls: BTreeMap::new(),
        key_names: Default::default(),
        default_ttl: Duration::from_secs(60),
        cleanup_interval: Duration::from_secs(60),
        key_prefix: "batch:".to_string(),
        early_refresh: Default::default(),
        speculative_loads: true,
        memory_bytes: cascade_core::config::DEFAULT_MEMORY_BYTES,
    };
    let options = EngineOptions {
        speculative_loads: speculative,
        // As wide as the engine allows (half of `timeout`, at most 500 ms), so that a busy
        // test machine's lookups come within it.
        speculation_window: Duration::from_millis(500),
        ..EngineOptions::default()
    };
    Cache::new(config, Backend::Redis(redis), options)
}

/// A loader of many keys that waits at `gate`, records each call's keys, and finds every
/// key but `absent`, as `"<value of key>"` (a JSON string).
#[derive(Clone)]
struct Rows {
    gate: Arc<Semaphore>,
    calls: Arc<Mutex<Vec<Vec<String>>>>,
    absent: &'static str,
    /// What each key's value is, read at load time.
    version: Arc<Mutex<u32>>,
}

impl Rows {
    fn new(absent: &'static str) -> Self {
        Rows {
            gate: Arc::new(Semaphore::new(0)),
            calls: Arc::default(),
            absent,
            version: Arc::new(Mutex::new(1)),
        }
    }

    async fn load(self, keys: Vec<String>) -> Result<Vec<(String, Vec<u8>)>, std::io::Error> {
        let version = *self.version.lock().unwrap();
        self.calls.lock().unwrap().push(keys.clone());
        self.gate.acquire().await.unwrap().forget();
        Ok(keys
            .into_iter()
            .filter(|k| k != self.absent)
            .map(|k| {
                let body = format!("\"{k}-v{version}\"").into_bytes();
                (k, body)
            })
            .collect())
    }

    fn calls(&self) -> Vec<Vec<String>> {
        self.calls.lock().unwrap().clone()
    }

    fn open(&self) {
        self.gate.add_permits(10_000);
    }
}

type Answer = (String, Option<String>, Source);

/// `keys` read concurrently through `engine`, each a task.
fn spawn_reads(
    engine: &Cache,
    source: &Rows,
    keys: &[String],
) -> Vec<tokio::task::JoinHandle<Answer>> {
    keys.iter()
        .map(|key| {
            let (engine, source, key) = (engine.clone(), source.clone(), key.clone());
            tokio::spawn(async move {
                let (body, from) = engine
                    .get_or_load_body_batched("assets", &key, &[], |keys| source.load(keys))
                    .await
                    .unwrap();
                let body = body.map(|b| String::from_utf8(b.bytes().to_vec()).unwrap());
                (key, body, from)
            })
        })
        .collect()
}

/// Waits (bounded) until the engine has counted `n` misses in `assets`.
async fn until_misses(engine: &Cache, n: u64) {
    until_counted(engine, "misses", n, |ns| ns.misses).await;
}

/// Waits (bounded) until `counter` of `assets` reaches `n`.
async fn until_counted(
    engine: &Cache,
    name: &str,
    n: u64,
    counter: impl Fn(&NamespaceStats) -> u64,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let counted = engine
            .stats()
            .iter()
            .find(|ns| ns.namespace == "assets")
            .map_or(0, &counter);
        if counted >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{counted} of {n} {name} after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Lookup scripts of the keys' leases, when no fill ran yet: each script is one `EVALSHA`.
async fn lookup_scripts_since(redis: &RedisServer, before: u64) -> u64 {
    redis.command_calls("evalsha").await - before
}

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("k{i:02}")).collect()
}

/// `n` keys read concurrently, each leased and its load parked at the source's gate.
struct Parked {
    redis: RedisServer,
    engine: Cache,
    source: Rows,
    keys: Vec<String>,
    reads: Vec<tokio::task::JoinHandle<Answer>>,
    /// The lookup scripts that leased them.
    lookups: u64,
}

async fn parked(n: usize, timeout: Duration) -> Parked {
    let redis = RedisServer::start().await;
    let engine = engine_with_timeout(&redis, timeout);
    until_trusted(&engine).await;
    let source = Rows::new("none");
    let keys = keys(n);
    let scripts_before = redis.command_calls("evalsha").await;
    let reads = spawn_reads(&engine, &source, &keys);
    until_misses(&engine, keys.len() as u64).await;
    let lookups = lookup_scripts_since(&redis, scripts_before).await;
    Parked {
        redis,
        engine,
        source,
        keys,
        reads,
        lookups,
    }
}

/// Until `engine` trusts its in-process tier (the bus's warm-up: before, nothing is kept in
/// process), as a read of a namespace of its own shows.
async fn until_trusted(engine: &Cache) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, from) = engine
            .get_or_load_bytes("warm", "w", &[], || async {
                Ok::<_, std::io::Error>(Some(b"1".to_vec()))
            })
            .await
            .unwrap();
        if from == Source::Memory {
            return;
        }
        assert!(Instant::now() < deadline, "no in-process hit within 5 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `key` read again through `engine`: its body and where it came from.
async fn read_again(engine: &Cache, source: &Rows, key: &str) -> (String, Source) {
    let (body, from) = engine
        .get_or_load_body_batched("assets", key, &[], |keys| source.clone().load(keys))
        .await
        .unwrap();
    (
        String::from_utf8(body.unwrap().bytes().to_vec()).unwrap(),
        from,
    )
}

#[tokio::test]
async fn concurrent_misses_share_loader_calls_and_each_gets_its_own_value() {
    let redis = RedisServer::start().await;
    let engine = engine(&redis);
    let source = Rows::new("k07");
    let keys = keys(20);
    let scripts_before = redis.command_calls("evalsha").await;
    let reads = spawn_reads(&engine, &source, &keys);
    until_misses(&engine, keys.len() as u64).await;
    // Every key is leased and no load finished: the scripts so far are the lookups. The first
    // is sent alone; those that arrived while it was in flight share the next (4 scripts
    // here, as the plain GETs each sends first come back; one each without batching).
    let lookups = lookup_scripts_since(&redis, scripts_before).await;
    assert!(
        (1..=keys.len() as u64 / 2).contains(&lookups),
        "{lookups} lookup scripts for {} concurrent misses",
        keys.len()
    );
    source.open();
    let mut answers = Vec::new();
    for read in reads {
        answers.push(read.await.unwrap());
    }

    for (key, body, from) in &answers {
        assert_eq!(*from, Source::Loaded, "{key}");
        if key == "k07" {
            assert_eq!(body, &None, "the absent key is not found, alone");
        } else {
            assert_eq!(body.as_deref(), Some(format!("\"{key}-v1\"").as_str()));
        }
    }
    // Two loads start at once (each alone: nothing was queued yet); the 18 callers that queued
    // behind them are one batch.
    let calls = source.calls();
    let mut sizes: Vec<usize> = calls.iter().map(Vec::len).collect();
    sizes.sort();
    assert_eq!(sizes, vec![1, 1, 18], "{calls:?}");
    let stats = engine.stats();
    let assets = stats.iter().find(|ns| ns.namespace == "assets").unwrap();
    assert_eq!((assets.loads, assets.loader_calls), (20, 3));

    // Every key's fill was stored, the not-found too: read again, nothing loads.
    for key in &keys {
        let (body, _) = engine
            .get_or_load_body_batched("assets", key, &[], |keys| source.clone().load(keys))
            .await
            .unwrap();
        assert_eq!(body.is_none(), key == "k07", "{key}");
    }
    assert_eq!(source.calls().len(), 3);
}

#[tokio::test]
async fn an_invalidation_during_a_batch_refuses_that_keys_fill_only() {
    // (Binding `redis` keeps the server running to the end.)
    let Parked {
        redis: _redis,
        engine,
        source,
        keys,
        reads,
        lookups,
    } = parked(6, Duration::from_millis(500)).await;
    // The leases were granted by batched lookups.
    assert!(lookups < keys.len() as u64, "{lookups} lookup scripts");
    // The row of k03 changes while every load is parked (a write, then its invalidation).
    *source.version.lock().unwrap() = 2;
    engine.invalidate("assets", "k03").await;
    source.open();
    for read in reads {
        let (key, body, _) = read.await.unwrap();
        // What each caller read is what the source held when its load began.
        assert!(body.is_some_and(|b| b.starts_with(&format!("\"{key}-v"))));
    }
    // The batch's fill follows its answers: k03's is refused (its lease was deleted).
    until_counted(&engine, "stale sets refused", 1, |ns| ns.stale_sets_refused).await;
    let loads_before = source.calls().iter().map(Vec::len).sum::<usize>();

    // Read again: k03 loads the new row; the others' fills were stored, nothing loads.
    for key in &keys {
        let (body, _) = read_again(&engine, &source, key).await;
        if key == "k03" {
            assert_eq!(body, "\"k03-v2\"");
        }
    }
    let calls = source.calls();
    let reloaded: Vec<String> = calls.iter().flatten().skip(loads_before).cloned().collect();
    assert_eq!(reloaded, vec!["k03".to_string()], "{calls:?}");
    let stats = engine.stats();
    let assets = stats.iter().find(|ns| ns.namespace == "assets").unwrap();
    assert_eq!(assets.stale_sets_refused, 1);
}

/// A namespace whose lookups lean to misses (its lookups go straight to the script): one
/// cold key read through `engine`.
async fn lean_to_misses(engine: &Cache) {
    let source = Rows::new("none");
    source.open();
    engine
        .get_or_load_body_batched("assets", "warm", &[], |keys| source.load(keys))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_lookup_batch_gives_each_key_its_hit_lease_or_wait_for_another_loader() {
    let redis = RedisServer::start().await;
    let (a, b) = (engine(&redis), engine(&redis));
    lean_to_misses(&a).await;
    // Through B: `hit` is stored; `held` is leased to B's loader, parked at its gate.
    let b_rows = Rows::new("none");
    *b_rows.version.lock().unwrap() = 7;
    let b_hit = Rows::new("none");
    *b_hit.version.lock().unwrap() = 7;
    b_hit.open();
    b.get_or_load_body_batched("assets", "hit", &[], |keys| b_hit.load(keys))
        .await
        .unwrap();
    let b_held = spawn_reads(&b, &b_rows, &["held".to_string()]);
    until_misses(&b, 2).await;

    // Through A, at once: `first` is sent alone, the other four share the next script.
    let a_rows = Rows::new("none");
    let names = ["first", "hit", "new1", "held", "new2"].map(String::from);
    // (How many scripts that took is not asserted: `held`'s polls for B's value are lookups
    // too, as many as time allows.)
    let reads = spawn_reads(&a, &a_rows, &names);
    // `warm`, `first`, `new1` and `new2` leased; `held` found B's lease.
    until_misses(&a, 4).await;
    until_counted(&a, "lease waits", 1, |ns| ns.lease_waits).await;
    b_rows.open();
    a_rows.open();
    let mut answers = BTreeMap::new();
    for read in reads {
        let (key, body, from) = read.await.unwrap();
        answers.insert(key, (body.unwrap(), from));
    }
    b_held.into_iter().next().unwrap().await.unwrap();

    let expect = |body: &str, from: Source| (body.to_string(), from);
    assert_eq!(answers["first"], expect("\"first-v1\"", Source::Loaded));
    assert_eq!(answers["new1"], expect("\"new1-v1\"", Source::Loaded));
    assert_eq!(answers["new2"], expect("\"new2-v1\"", Source::Loaded));
    assert_eq!(answers["hit"], expect("\"hit-v7\"", Source::Shared));
    // A waited for B's loader and was served its value.
    assert_eq!(answers["held"], expect("\"held-v7\"", Source::Shared));
    let mut loaded_by_a: Vec<String> = a_rows.calls().into_iter().flatten().collect();
    loaded_by_a.sort();
    assert_eq!(loaded_by_a, ["first", "new1", "new2"]);
    assert_eq!(b_rows.calls(), [["held".to_string()]]);
}

#[tokio::test]
async fn a_batch_answers_before_its_fill_and_keeps_its_values_once_the_fill_is_taken() {
    // Redis calls may wait 10 s: a caller that waited for its batch's fill would wait that long.
    let Parked {
        redis,
        engine,
        source,
        keys,
        reads,
        lookups: _,
    } = parked(5, Duration::from_secs(10)).await;
    // Every key is leased and its load parked; Redis stops answering, then the loads finish.
    redis.pause();
    source.open();
    for read in reads {
        let answered = tokio::time::timeout(Duration::from_secs(3), read).await;
        let (key, body, from) = answered.expect("answered while Redis is stalled").unwrap();
        assert_eq!(body.as_deref(), Some(format!("\"{key}-v1\"").as_str()));
        assert_eq!(from, Source::Loaded, "{key}");
    }
    // Redis answers again: the batch's fill is taken (each value key holds its value) ...
    redis.resume();
    let loads = source.calls().len();
    let raw = client(&redis, Duration::from_secs(5));
    let mut exists = redis::cmd("EXISTS");
    for key in &keys {
        exists.arg(format!("batch:assets:{key}"));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stored: usize = raw.query(&exists).await.unwrap();
        if stored == keys.len() {
            break;
        }
        assert!(Instant::now() < deadline, "{stored} fills taken after 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... and the task that sent it keeps each value in process as soon as it hears so: the
    // first read of each key is an in-process hit (a read of Redis would install it itself).
    tokio::time::sleep(Duration::from_millis(100)).await;
    for key in &keys {
        let (body, from) = read_again(&engine, &source, key).await;
        assert_eq!(body, format!("\"{key}-v1\""));
        assert_eq!(from, Source::Memory, "{key}");
    }
    assert_eq!(source.calls().len(), loads, "{:?}", source.calls());
    let stats = engine.stats();
    let assets = stats.iter().find(|ns| ns.namespace == "assets").unwrap();
    assert_eq!(assets.stale_sets_refused, 0);
}

#[tokio::test]
async fn a_namespace_invalidation_during_a_batch_refuses_every_fill_its_lookups_leased() {
    // (Binding `redis` keeps the server running to the end.)
    let Parked {
        redis: _redis,
        engine,
        source,
        keys,
        reads,
        lookups,
    } = parked(12, Duration::from_millis(500)).await;
    // The leases were granted by batched lookups, which entered every key in the namespace's
    // tag set at once: the namespace's invalidation finds each lease and deletes it.
    assert!(lookups < keys.len() as u64, "{lookups} lookup scripts");
    *source.version.lock().unwrap() = 2;
    engine.invalidate_namespace("assets").await;
    source.open();
    for read in reads {
        read.await.unwrap();
    }
    until_counted(&engine, "stale sets refused", keys.len() as u64, |ns| {
        ns.stale_sets_refused
    })
    .await;
    // Nothing was cached: read again, every key loads its new row.
    let loads_before = source.calls().iter().map(Vec::len).sum::<usize>();
    for key in &keys {
        let (body, _) = read_again(&engine, &source, key).await;
        assert_eq!(body, format!("\"{key}-v2\""));
    }
    let loads = source.calls().iter().map(Vec::len).sum::<usize>();
    assert_eq!(loads - loads_before, keys.len());
}

// Speculative loads: a batched read of a namespace whose lookups mostly miss loads without a
// lookup, and its value is stored only where no tombstone is found, within the window.

/// How long a Redis's tombstones take to be complete after its first lease (`TOMB`), and a
/// little more.
const SETTLE: Duration = Duration::from_millis(1100);

/// A source whose first load of each key reads the row as it was before a write (`v1`), as a
/// speculative read that began just before the write would, and every later load the row
/// after it (`v2`). Counts its loads.
#[derive(Clone, Default)]
struct BeforeTheWrite {
    loads: Arc<Mutex<Vec<String>>>,
}

impl BeforeTheWrite {
    async fn load(self, keys: Vec<String>) -> Result<Vec<(String, Vec<u8>)>, std::io::Error> {
        let mut loads = self.loads.lock().unwrap();
        let rows = keys
            .into_iter()
            .map(|k| {
                let version = if loads.contains(&k) { 2 } else { 1 };
                loads.push(k.clone());
                let body = format!("\"{k}-v{version}\"").into_bytes();
                (k, body)
            })
            .collect();
        Ok(rows)
    }

    fn loads_of(&self, key: &str) -> usize {
        self.loads
            .lock()
            .unwrap()
            .iter()
            .filter(|k| *k == key)
            .count()
    }

    /// `key` (with `tags`) read through `engine`: its body and where it came from.
    async fn read(&self, engine: &Cache, key: &str, tags: &[String]) -> (String, Source) {
        let source = self.clone();
        let (body, from) = engine
            .get_or_load_body_batched("assets", key, tags, |keys| source.load(keys))
            .await
            .unwrap();
        (
            String::from_utf8(body.unwrap().bytes().to_vec()).unwrap(),
            from,
        )
    }
}

/// A Redis, and an engine on it (its calls waiting up to `timeout`) whose reads of `assets`
/// now load speculatively: the namespace leans to misses and Redis's tombstones are complete.
async fn speculating(timeout: Duration) -> (RedisServer, Cache) {
    let redis = RedisServer::start().await;
    let engine = speculating_at(redis.url(), timeout).await;
    (redis, engine)
}

/// [`speculating`]'s engine, on the Redis at `url`.
async fn speculating_at(url: String, timeout: Duration) -> Cache {
    let engine = engine_at(url, timeout, true);
    until_trusted(&engine).await;
    // Sixteen cold reads: on balance, the namespace's lookups all miss lately.
    let source = Rows::new("none");
    source.open();
    for i in 0..16 {
        read_again(&engine, &source, &format!("cold{i}")).await;
    }
    tokio::time::sleep(SETTLE).await;
    engine
}

fn stats_of(engine: &Cache) -> NamespaceStats {
    let stats = engine.stats();
    stats
        .into_iter()
        .find(|ns| ns.namespace == "assets")
        .unwrap()
}

/// What another instance reads of `key` from Redis (it must not load).
async fn read_elsewhere(redis: &RedisServer, key: &str) -> String {
    let other = engine(redis);
    let (body, from) = BeforeTheWrite::default().read(&other, key, &[]).await;
    assert_eq!(from, Source::Shared, "{key} is not in Redis");
    body
}

#[tokio::test]
async fn a_speculative_load_fills_once_and_its_value_is_then_served_by_every_tier() {
    let (redis, engine) = speculating(Duration::from_millis(500)).await;
    let source = BeforeTheWrite::default();
    let (body, from) = source.read(&engine, "s1", &[]).await;
    assert_eq!((body.as_str(), from), ("\"s1-v1\"", Source::Loaded));
    // One load: no tombstone, and the store ran within the window, so the loaded value filled.
    until_counted(&engine, "speculative fills", 1, |ns| ns.speculative_fills).await;
    assert_eq!(source.loads_of("s1"), 1);
    assert_eq!(stats_of(&engine).speculative_unfilled, 0);
    assert_eq!(read_elsewhere(&redis, "s1").await, "\"s1-v1\"");
    // The fill task kept it in process too, once the fill was taken: the next read is an
    // in-process hit (a read of Redis would have loaded again, speculatively).
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (body, from) = source.read(&engine, "s1", &[]).await;
    assert_eq!((body.as_str(), from), ("\"s1-v1\"", Source::Memory));
    assert_eq!(source.loads_of("s1"), 1);
}

#[tokio::test]
async fn a_speculative_load_of_a_key_already_in_redis_keeps_that_value_and_counts_it_found() {
    let (redis, engine) = speculating(Duration::from_millis(500)).await;
    // Another instance, whose lookups do not lean to misses, leases `f1`, loads it (as its
    // version 7) and fills.
    let elsewhere = engine_with(&redis, Duration::from_millis(500), true);
    let rows = Rows::new("none");
    *rows.version.lock().unwrap() = 7;
    rows.open();
    let (body, from) = elsewhere
        .get_or_load_body_batched("assets", "f1", &[], |keys| rows.load(keys))
        .await
        .unwrap();
    assert_eq!(body.unwrap().bytes().as_ref(), b"\"f1-v7\"");
    assert_eq!(from, Source::Loaded);
    for _ in 0..100 {
        if in_redis(&redis, "f1").await.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(in_redis(&redis, "f1").await.0, "the other instance's fill");
    // This one loads without a lookup (its own version 1, as its caller is answered); its
    // store finds version 7 and stores nothing.
    let before = stats_of(&engine);
    let source = BeforeTheWrite::default();
    let (body, from) = source.read(&engine, "f1", &[]).await;
    assert_eq!((body.as_str(), from), ("\"f1-v1\"", Source::Loaded));
    until_counted(
        &engine,
        "speculative finds",
        before.speculative_found + 1,
        |ns| ns.speculative_found,
    )
    .await;
    let after = stats_of(&engine);
    assert_eq!(after.speculative_fills, before.speculative_fills);
    assert_eq!(after.speculative_unfilled, before.speculative_unfilled);
    // The value found is kept in process: the next read neither loads nor asks Redis, and
    // Redis still holds it.
    let (body, from) = source.read(&engine, "f1", &[]).await;
    assert_eq!((body.as_str(), from), ("\"f1-v7\"", Source::Memory));
    assert_eq!(source.loads_of("f1"), 1);
    assert_eq!(read_elsewhere(&redis, "f1").await, "\"f1-v7\"");
}

/// Whether Redis holds a value for `key` of `assets`, and what its lease slot holds.
async fn in_redis(redis: &RedisServer, key: &str) -> (bool, Option<String>) {
    let raw = client(redis, Duration::from_secs(5));
    let value = format!("batch:assets:{key}");
    let stored: bool = raw.query(redis::cmd("EXISTS").arg(&value)).await.unwrap();
    let lease: Option<String> = raw
        .query(redis::cmd("GET").arg(format!("batch:lease:{value}")))
        .await
        .unwrap();
    (stored, lease)
}

/// What another instance's invalidation of `key` (with `tag`) leaves in Redis, written by
/// hand: this test's engine must not hear of it on its bus before its own read, as it would
/// from a real instance a few milliseconds later (it then does not speculate on the key).
async fn invalidated_elsewhere(redis: &RedisServer, key: &str, tag: &str) {
    let raw = client(redis, Duration::from_secs(5));
    let value = format!("batch:assets:{key}");
    let _: () = raw
        .query(
            redis::cmd("DEL")
                .arg(&value)
                .arg(format!("batch:lease:{value}")),
        )
        .await
        .unwrap();
    for tomb in [
        format!("batch:gone:{value}"),
        format!("batch:tomb:batch:tag:{tag}"),
    ] {
        let _: () = raw
            .query(redis::cmd("SET").arg(tomb).arg(1).arg("PX").arg(1000))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_speculative_load_never_fills_what_a_recent_invalidation_may_have_made_stale() {
    let (redis, engine) = speculating(Duration::from_millis(500)).await;
    let source = BeforeTheWrite::default();
    // Writes on other instances, each then invalidating what it changed (a key; a tag), just
    // before a speculative read here of what they changed. That read models a row read before
    // the write (v1): its caller is answered with it (its read overlapped the write), but the
    // store found the invalidation's tombstone, so nothing fills (and no lease is left).
    // A control: a key nothing invalidated fills (the stores come within the window here).
    source.read(&engine, "z", &[]).await;
    until_counted(&engine, "speculative fills", 1, |ns| ns.speculative_fills).await;
    invalidated_elsewhere(&redis, "x", "unrelated").await;
    let (body, from) = source.read(&engine, "x", &[]).await;
    assert_eq!((body.as_str(), from), ("\"x-v1\"", Source::Loaded));
    let row_y = vec!["row:y".to_string()];
    invalidated_elsewhere(&redis, "unrelated", "row:y").await;
    let (body, _) = source.read(&engine, "y", &row_y).await;
    assert_eq!(body, "\"y-v1\"");
    until_counted(&engine, "unfilled speculative loads", 2, |ns| {
        ns.speculative_unfilled
    })
    .await;
    assert_eq!(stats_of(&engine).speculative_fills, 1);
    for key in ["x", "y"] {
        // Nothing cached, and no lease held.
        assert_eq!(in_redis(&redis, key).await, (false, None));
        // The next read (here on an instance whose reads load after their lease) loads the
        // row after the write and fills it.
        let other = engine_with(&redis, Duration::from_millis(500), false);
        let (body, from) = source.read(&other, key, &[]).await;
        assert_eq!((body, from), (format!("\"{key}-v2\""), Source::Loaded));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !in_redis(&redis, key).await.0 {
            assert!(Instant::now() < deadline, "{key} not filled after 5 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(read_elsewhere(&redis, key).await, format!("\"{key}-v2\""));
    }
    assert_eq!((source.loads_of("x"), source.loads_of("y")), (2, 2));
}

#[tokio::test]
async fn an_instance_that_invalidated_a_key_lately_reads_it_after_its_lease() {
    let (redis, engine) = speculating(Duration::from_millis(500)).await;
    let source = Rows::new("none");
    source.open();
    // A write here, then its read: no speculative load (it could not fill); one load, under
    // the lease, which fills.
    engine.invalidate("assets", "w").await;
    let (body, from) = read_again(&engine, &source, "w").await;
    assert_eq!((body.as_str(), from), ("\"w-v1\"", Source::Loaded));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !in_redis(&redis, "w").await.0 {
        assert!(Instant::now() < deadline, "w not filled after 5 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = stats_of(&engine);
    assert_eq!(
        (stats.speculative_fills, stats.speculative_unfilled),
        (0, 0)
    );
    assert_eq!(source.calls(), [["w".to_string()]]);
    // A control: a key it did not invalidate is read speculatively.
    read_again(&engine, &source, "other").await;
    until_counted(&engine, "speculative fills", 1, |ns| ns.speculative_fills).await;
}

#[tokio::test]
async fn a_speculative_load_answered_after_its_window_fills_nothing() {
    // Calls may wait 2 s: the store below is answered late, not failed.
    let (redis, engine) = speculating(Duration::from_secs(2)).await;
    let source = BeforeTheWrite::default();
    // Redis stalls for longer than the window (500 ms here) while the key is read: its store
    // runs too late to be sure that a tombstone of any invalidation since the read began is
    // still there (or that one was left: an invalidation may fail while Redis stalls), so it
    // stores nothing. The caller does not wait for Redis.
    redis.pause();
    let paused = Instant::now();
    let read = {
        let (engine, source) = (engine.clone(), source.clone());
        tokio::spawn(async move { source.read(&engine, "late", &[]).await })
    };
    let answered = tokio::time::timeout(Duration::from_secs(1), read).await;
    tokio::time::sleep(Duration::from_millis(700).saturating_sub(paused.elapsed())).await;
    redis.resume();
    let (body, from) = answered.expect("answered while Redis is stalled").unwrap();
    assert_eq!((body.as_str(), from), ("\"late-v1\"", Source::Loaded));
    until_counted(&engine, "unfilled speculative loads", 1, |ns| {
        ns.speculative_unfilled
    })
    .await;
    assert_eq!(stats_of(&engine).speculative_fills, 0);
    assert_eq!(in_redis(&redis, "late").await, (false, None));
}

/// A field of Redis's `INFO {section}`.
async fn info_field(raw: &Redis, section: &str, field: &str) -> u64 {
    let info: String = raw.query(redis::cmd("INFO").arg(section)).await.unwrap();
    info.lines()
        .find_map(|l| l.trim_end().strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in INFO {section}"))
}

#[tokio::test]
async fn a_speculative_load_fills_nothing_while_redis_evicts_keys() {
    let (redis, engine) = speculating(Duration::from_millis(500)).await;
    let source = BeforeTheWrite::default();
    // A control: nothing evicted, the store is taken.
    source.read(&engine, "before", &[]).await;
    until_counted(&engine, "speculative fills", 1, |ns| ns.speculative_fills).await;
    // Redis reaches its memory limit and evicts keys to make room. It may evict any key, a
    // tombstone too, which is the only guard a speculative store has: so until a tombstone's
    // life (1 s) has passed since the last eviction, no speculative store is taken.
    let raw = client(&redis, Duration::from_secs(5));
    let set = |name: &'static str, value: String| {
        let raw = raw.clone();
        async move {
            let _: () = raw
                .query(redis::cmd("CONFIG").arg("SET").arg(name).arg(value))
                .await
                .unwrap();
        }
    };
    let used = info_field(&raw, "memory", "used_memory").await;
    set("maxmemory-policy", "allkeys-lru".into()).await;
    set("maxmemory", (used + (2 << 20)).to_string()).await;
    let junk = vec![b'x'; 64 << 10];
    for i in 0..256 {
        if info_field(&raw, "stats", "evicted_keys").await > 0 {
            break;
        }
        let _: () = raw
            .query(redis::cmd("SET").arg(format!("junk:{i}")).arg(&junk[..]))
            .await
            .unwrap();
    }
    set("maxmemory", "0".into()).await;
    assert!(
        info_field(&raw, "stats", "evicted_keys").await > 0,
        "nothing evicted"
    );
    // Should the evictions have taken the marker of when this Redis's tombstones became
    // complete, the store would be refused for that reason alone: put it back, a minute old.
    let since_ttl: u64 = 10 * 365 * 24 * 3600 * 1000;
    let _: () = raw
        .query(
            redis::cmd("SET")
                .arg("batch:tomb-since")
                .arg(1)
                .arg("PX")
                .arg(since_ttl - 60_000),
        )
        .await
        .unwrap();
    // The read is answered with its row; its store is refused.
    let (body, from) = source.read(&engine, "during", &[]).await;
    assert_eq!((body.as_str(), from), ("\"during-v1\"", Source::Loaded));
    until_counted(&engine, "unfilled speculative loads", 1, |ns| {
        ns.speculative_unfilled
    })
    .await;
    assert_eq!(stats_of(&engine).speculative_fills, 1);
    assert_eq!(in_redis(&redis, "during").await, (false, None));
    // Refused for the evictions (not for being late, say): the marker is there.
    let marked: i64 = raw
        .query(redis::cmd("PTTL").arg("batch:evicting"))
        .await
        .unwrap();
    assert!(marked > 0, "no eviction marker: {marked}");
    // No eviction since, for longer than a tombstone lives: stores are taken again.
    tokio::time::sleep(SETTLE).await;
    source.read(&engine, "after", &[]).await;
    until_counted(&engine, "speculative fills", 2, |ns| ns.speculative_fills).await;
    assert!(in_redis(&redis, "after").await.0);
}

#[tokio::test]
async fn where_scripts_may_not_read_info_cold_reads_store_nothing_speculatively_and_fill_after_their_lease()
 {
    let redis = RedisServer::start().await;
    let raw = client(&redis, Duration::from_secs(5));
    // A user whose ACL keeps INFO from it, and so from the scripts it runs: a speculative
    // store cannot tell whether Redis evicted a tombstone.
    let _: () = raw
        .query(redis::cmd("ACL").arg(&[
            "SETUSER", "noinfo", "on", ">pw", "~*", "&*", "+@all", "-info",
        ]))
        .await
        .unwrap();
    let limited = redis.url().replace("redis://", "redis://noinfo:pw@");
    assert!(
        cascade_core::cache::scripts_read_info(&raw).await.unwrap(),
        "the default user's scripts read INFO"
    );
    let noinfo = client_at(limited.clone(), Duration::from_secs(5));
    assert!(
        !cascade_core::cache::scripts_read_info(&noinfo)
            .await
            .unwrap()
    );

    // Leaning to misses, past the first tombstones' life: only the blindness refuses stores.
    let engine = speculating_at(limited, Duration::from_millis(500)).await;
    let before = stats_of(&engine);
    let source = BeforeTheWrite::default();
    let (body, from) = source.read(&engine, "blind", &[]).await;
    assert_eq!((body.as_str(), from), ("\"blind-v1\"", Source::Loaded));
    until_counted(
        &engine,
        "unfilled speculative loads",
        before.speculative_unfilled + 1,
        |ns| ns.speculative_unfilled,
    )
    .await;
    assert_eq!(
        stats_of(&engine).speculative_fills,
        before.speculative_fills
    );
    assert_eq!(in_redis(&redis, "blind").await, (false, None));
    // The refusal pauses speculation: the next cold read looks up, takes the lease and fills,
    // so another instance finds it in Redis.
    let (body, from) = source.read(&engine, "leased", &[]).await;
    assert_eq!((body.as_str(), from), ("\"leased-v1\"", Source::Loaded));
    for _ in 0..100 {
        if in_redis(&redis, "leased").await.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(read_elsewhere(&redis, "leased").await, "\"leased-v1\"");
    assert_eq!(
        stats_of(&engine).speculative_fills,
        before.speculative_fills
    );
}

#[tokio::test]
async fn concurrent_reads_of_a_key_load_it_once_while_one_speculates() {
    let (_redis, engine) = speculating(Duration::from_millis(500)).await;
    let source = BeforeTheWrite::default();
    // A speculative load takes no lease: the instance's other reads of the key wait for its
    // store (its flight lock) instead of leasing and loading the key again.
    let reads: Vec<_> = (0..20)
        .map(|_| {
            let (engine, source) = (engine.clone(), source.clone());
            tokio::spawn(async move { source.read(&engine, "same", &[]).await })
        })
        .collect();
    let mut sources = Vec::new();
    for read in reads {
        let (body, from) = read.await.unwrap();
        assert_eq!(body, "\"same-v1\"");
        sources.push(from);
    }
    assert_eq!(source.loads_of("same"), 1);
    // The one that loaded installed its value in process before it let the key go: the
    // others are answered from there, none by a lookup in Redis.
    assert_eq!(
        sources.iter().filter(|s| **s == Source::Loaded).count(),
        1,
        "{sources:?}"
    );
    assert!(!sources.contains(&Source::Shared), "{sources:?}");
    until_counted(&engine, "speculative fills", 1, |ns| ns.speculative_fills).await;
}
