//! Read replicas against a real primary and a real streaming replica (`pg_basebackup -R`):
//! which server answers a lag-tolerant read (`Db::read`), read-your-writes while the replica
//! is paused, and rotation as the replica falls behind and catches up.

use std::time::{Duration, Instant};

use cascade_core::config::{DatabaseSource, ReplicaConfig};
use cascade_core::db::{Conn, Db, DbError, ReplicaHealth, ReplicaSet};
use cascade_core::shutdown::Shutdown;
use cascade_testkit::PgServer;

mod support;

const REPLICA_TIMEOUT: Duration = Duration::from_millis(500);
const MAX_LAG: Duration = Duration::from_secs(1);

/// A primary, its replica, and a pool on the primary with the replica attached and its
/// health loop running (stopped when this is dropped).
struct Pair {
    primary: PgServer,
    replica: PgServer,
    db: Db,
    _health: Shutdown,
}

impl Drop for Pair {
    fn drop(&mut self) {
        self._health.trigger();
    }
}

async fn pair() -> Pair {
    let primary = PgServer::start_primary().await;
    let url = primary.fresh_database().await;
    let name = url.rsplit('/').next().unwrap().to_string();
    let replica = primary.start_replica().await;
    let settings = support::db_settings();
    let db = Db::connect(
        &settings,
        url.parse().unwrap(),
        format!("127.0.0.1:{}", primary.port()),
    )
    .await
    .expect("connect to the primary");
    db.conn()
        .await
        .unwrap()
        .batch_execute(
            "CREATE TABLE kv (k int PRIMARY KEY, v text); INSERT INTO kv VALUES (1, 'one')",
        )
        .await
        .unwrap();
    let replicas = ReplicaConfig {
        sources: vec![DatabaseSource::from_url(&replica.url(&name)).unwrap()],
        max_lag: MAX_LAG,
        timeout: REPLICA_TIMEOUT,
    };
    let set = ReplicaSet::new(&replicas, &settings).unwrap();
    db.attach_replicas(set.clone()).unwrap();
    let health = Shutdown::new();
    tokio::spawn(set.run_health(db.clone(), health.signal()));
    let pair = Pair {
        primary,
        replica,
        db,
        _health: health,
    };
    pair.wait_for("the replica to join rotation", |r| r.in_rotation)
        .await;
    pair
}

/// `(answered by a server in recovery, kv's value)`, through the lag-tolerant read path.
async fn read(db: &Db) -> (bool, Option<String>) {
    db.read(|conn| async move {
        let row = conn
            .query_one(
                "SELECT pg_is_in_recovery(), (SELECT v FROM kv WHERE k = 1)",
                &[],
            )
            .await?;
        Ok::<_, DbError>((row.get(0), row.get(1)))
    })
    .await
    .expect("read")
}

/// [`read`] that must answer within a few replica timeouts: no read may hang on a replica.
async fn bounded_read(db: &Db) -> (bool, Option<String>) {
    let started = Instant::now();
    tokio::time::timeout(REPLICA_TIMEOUT * 6, read(db))
        .await
        .unwrap_or_else(|_| panic!("a read hung for {:?}", started.elapsed()))
}

async fn write(db: &Db, value: &str) {
    db.conn()
        .await
        .unwrap()
        .execute("UPDATE kv SET v = $1 WHERE k = 1", &[&value])
        .await
        .unwrap();
}

impl Pair {
    fn health(&self) -> ReplicaHealth {
        self.db.replicas().unwrap().health().remove(0)
    }

    /// Polls the replica's health (bounded: 20 s) until `done`.
    async fn wait_for(&self, what: &str, done: impl Fn(&ReplicaHealth) -> bool) -> ReplicaHealth {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let health = self.health();
            if done(&health) {
                return health;
            }
            assert!(
                Instant::now() < deadline,
                "waited 20s for {what}: {health:?}\nreplica log: {}",
                self.replica.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Reads until one is answered by the replica (bounded), checking every answer's value.
    async fn read_from_replica(&self, expected: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (in_recovery, value) = bounded_read(&self.db).await;
            assert_eq!(value.as_deref(), Some(expected));
            if in_recovery {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no read reached the replica in 10s: {:?}",
                self.health()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_served_by_a_caught_up_replica_and_see_the_latest_write() {
    let pair = pair().await;
    pair.read_from_replica("one").await;
    for value in ["two", "three", "four"] {
        write(&pair.db, value).await;
        // Whichever server answers, the write just acknowledged is there.
        let (_, seen) = bounded_read(&pair.db).await;
        assert_eq!(seen.as_deref(), Some(value));
    }
    pair.read_from_replica("four").await;
    assert!(pair.health().reads >= 2, "{:?}", pair.health());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_holds_while_the_replica_is_paused() {
    let pair = pair().await;
    pair.read_from_replica("one").await;
    pair.replica.pause();
    write(&pair.db, "two").await;
    let started = Instant::now();
    let (in_recovery, seen) = bounded_read(&pair.db).await;
    let first = started.elapsed();
    assert_eq!(seen.as_deref(), Some("two"));
    assert!(!in_recovery, "a paused replica cannot have answered");
    // Reads that find the replica silent do not hang either, written to or not.
    let started = Instant::now();
    for _ in 0..5 {
        let (_, seen) = bounded_read(&pair.db).await;
        assert_eq!(seen.as_deref(), Some("two"));
    }
    eprintln!(
        "paused replica: first read after the write {first:?}, the next 5 {:?}",
        started.elapsed()
    );
    pair.replica.resume();
    let resumed = Instant::now();
    pair.wait_for("the resumed replica to rejoin", |r| r.in_rotation)
        .await;
    eprintln!("back in rotation {:?} after SIGCONT", resumed.elapsed());
    pair.read_from_replica("two").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_past_the_lag_bound_leaves_rotation_and_returns_when_it_catches_up() {
    let pair = pair().await;
    let replica_client = pair.replica.client(&pair.db_name()).await;
    // The replica keeps answering but stops replaying: its lag grows with every write.
    replica_client
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    // pg_wal_replay_pause() only requests the pause: wait until recovery has stopped.
    let mut polls = 0;
    loop {
        let state: String = replica_client
            .query_one("SELECT pg_get_wal_replay_pause_state()", &[])
            .await
            .unwrap()
            .get(0);
        if state == "paused" {
            break;
        }
        polls += 1;
        assert!(polls < 100, "replay still {state:?} after 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut n = 0;
    let paused = Instant::now();
    let out = loop {
        n += 1;
        write(&pair.db, &format!("w{n}")).await;
        let (in_recovery, seen) = bounded_read(&pair.db).await;
        assert_eq!(
            seen,
            Some(format!("w{n}")),
            "a read missed the write before it"
        );
        assert!(
            !in_recovery,
            "a replica that has not replayed w{n} answered"
        );
        let health = pair.health();
        if !health.in_rotation {
            break health;
        }
        assert!(n < 200, "still in rotation after {n} writes: {health:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "replay paused: out of rotation after {:?} and {n} writes (lag {:.2}s, {} bytes)",
        paused.elapsed(),
        out.lag_seconds,
        out.lag_bytes
    );
    assert!(out.up, "{out:?}");
    assert!(out.lag_seconds > MAX_LAG.as_secs_f64(), "{out:?}");
    assert!(out.lag_bytes > 0, "{out:?}");
    assert!(
        out.error.as_deref().is_some_and(|e| e.contains("behind")),
        "{out:?}"
    );
    replica_client
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    let resumed = Instant::now();
    let back = pair
        .wait_for("the replica to catch up and rejoin", |r| r.in_rotation)
        .await;
    eprintln!(
        "replay resumed: back in rotation after {:?}",
        resumed.elapsed()
    );
    assert!(back.lag_seconds <= MAX_LAG.as_secs_f64(), "{back:?}");
    pair.read_from_replica(&format!("w{n}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_replica_leaves_rotation_and_returns_after_sigcont() {
    let pair = pair().await;
    pair.replica.pause();
    for n in 0..5 {
        write(&pair.db, &format!("p{n}")).await;
    }
    let paused = Instant::now();
    let out = pair
        .wait_for("the paused replica to leave rotation", |r| !r.in_rotation)
        .await;
    eprintln!(
        "SIGSTOP: out of rotation {:?} after 5 writes",
        paused.elapsed()
    );
    assert!(!out.up, "{out:?}");
    let (in_recovery, seen) = bounded_read(&pair.db).await;
    assert_eq!((in_recovery, seen.as_deref()), (false, Some("p4")));
    pair.replica.resume();
    pair.wait_for("the resumed replica to rejoin", |r| r.in_rotation)
        .await;
    pair.read_from_replica("p4").await;
    let _ = &pair.primary;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_under_a_read_leaves_the_read_to_the_primary() {
    let mut pair = pair().await;
    pair.read_from_replica("one").await;
    let slow_read = pair.db.read(|conn| answer(conn, SLOW_READ));
    let kill = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        pair.replica.kill();
    };
    let (answer, ()) = tokio::join!(slow_read, kill);
    let (in_recovery, seen) = answer.expect("the primary answers the read the replica dropped");
    assert_eq!((in_recovery, seen.as_deref()), (false, Some("one")));
    pair.wait_for("the killed replica to leave rotation", |r| !r.in_rotation)
        .await;
    let (in_recovery, seen) = bounded_read(&pair.db).await;
    assert_eq!((in_recovery, seen.as_deref()), (false, Some("one")));
}

/// A read of kv that takes 0.3 s: shorter than the replica timeout.
const SLOW_READ: &str =
    "SELECT pg_is_in_recovery(), (SELECT v FROM kv WHERE k = 1) FROM pg_sleep(0.3)";

/// `(answered by a server in recovery, kv's value)` of `sql` on `conn`.
async fn answer(conn: Conn, sql: &'static str) -> Result<(bool, Option<String>), DbError> {
    let row = conn.query_one(sql, &[]).await?;
    Ok((row.get(0), row.get(1)))
}

impl Pair {
    fn db_name(&self) -> String {
        self.db
            .maintenance_config()
            .get_dbname()
            .unwrap()
            .to_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_every_connection_busy_stays_in_rotation() {
    let pair = pair().await;
    pair.read_from_replica("one").await;
    // Three waves' worth of reads for the replica's 8 connections, each read shorter than
    // the replica timeout but the third wave's wait longer: the replica is busy, not dead.
    let reads = (0..24).map(|_| pair.db.read(|conn| answer(conn, SLOW_READ)));
    let all = futures_util::future::join_all(reads);
    tokio::pin!(all);
    // Watched while they run: a busy replica must never leave rotation.
    let mut taken_out = None;
    let answers = loop {
        tokio::select! {
            answers = &mut all => break answers,
            _ = tokio::time::sleep(Duration::from_millis(10)) => {
                let health = pair.health();
                if !(health.in_rotation && health.up) {
                    taken_out.get_or_insert(health);
                }
            }
        }
    };
    assert!(
        taken_out.is_none(),
        "a busy replica was taken out: {taken_out:?}"
    );
    let mut by_replica = 0;
    for answer in answers {
        let (in_recovery, seen) = answer.expect("read");
        assert_eq!(seen.as_deref(), Some("one"));
        by_replica += usize::from(in_recovery);
    }
    assert!(
        (1..24).contains(&by_replica),
        "{by_replica} of 24 reads answered by the replica"
    );
    // The health loop has probed since (its own connection, not the busy pool).
    tokio::time::sleep(MAX_LAG).await;
    let health = pair.health();
    assert!(health.in_rotation && health.up, "{health:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_abandoned_on_the_replica_is_cancelled_there() {
    let pair = pair().await;
    pair.read_from_replica("one").await;
    let mut calls = 0;
    let (in_recovery, seen) = pair
        .db
        .read(|conn| {
            calls += 1;
            // Longer than the replica timeout on the replica, instant on the primary.
            let sql = if calls == 1 {
                "SELECT pg_is_in_recovery(), (SELECT v FROM kv WHERE k = 1) FROM pg_sleep(4)"
            } else {
                "SELECT pg_is_in_recovery(), (SELECT v FROM kv WHERE k = 1)"
            };
            answer(conn, sql)
        })
        .await
        .expect("read");
    assert_eq!((in_recovery, seen.as_deref()), (false, Some("one")));
    let replica = pair.replica.client(&pair.db_name()).await;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let running: i64 = replica
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE query LIKE '%FROM pg_sleep(4)' AND state = 'active' \
                 AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if running == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the abandoned statement still runs on the replica"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
