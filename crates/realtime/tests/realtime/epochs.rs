//! A live message of another epoch than its subscription's, when the history read it calls
//! for fails (Redis down or slow): one of an older epoch (late in pub/sub, or published where
//! the new epoch was not known yet) never moves the subscription back, and one of a newer
//! epoch is delivered by the next read that succeeds, after the exact `gap`.
//!
//! Redis fails the channel's history reads while its pub/sub goes on: the channel's hash
//! (epoch, offset, run) is set aside and a string stands in its place. The live messages are
//! sent as the publish script sends them (store.rs: `channel \n epoch \n offset \n frame` on
//! the channel's shard).

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Client, World};

const CHANNEL: &str = "ai-collaborations";
/// The channel's hash and stream (the default `CACHE_KEY_PREFIX`, `cascade:`).
const META: &str = "cascade:rt:{ai-collaborations}:m";
const STREAM: &str = "cascade:rt:{ai-collaborations}:h";
/// Where the hash waits while reads fail (the same hash tag).
const ASIDE: &str = "cascade:rt:{ai-collaborations}:aside";

/// The pub/sub channel of the channel's fan-out shard (`WS_REDIS_SHARDS` 4, the default).
fn shard() -> String {
    format!(
        "cascade:rt:shard:{}",
        cascade_realtime::store::shard_of(CHANNEL, 4)
    )
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The `message` frame of `offset` in `epoch`, as the publish script writes it.
fn frame(epoch: &str, offset: u64, n: &str) -> String {
    json!({"type": "message", "channel": CHANNEL, "offset": offset, "epoch": epoch,
        "time": now_ms(), "payload": {"n": n}})
    .to_string()
}

/// What the publish script sends on the shard for `frame`.
fn envelope(epoch: &str, offset: u64, frame: &str) -> String {
    format!("{CHANNEL}\n{epoch}\n{offset}\n{frame}")
}

/// How many commands Redis refused with `WRONGTYPE` (a history read of the channel while
/// its hash is set aside).
fn failed_reads(redis: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("errorstats").query(redis).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("errorstat_WRONGTYPE:count="))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// Waits (bounded) until a history read failed after `before` had.
async fn a_read_failed(redis: &mut redis::Connection, before: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while failed_reads(redis) <= before {
        assert!(Instant::now() < deadline, "the instance read no history");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The channel's hash back in its place: reads succeed again.
fn reads_succeed(redis: &mut redis::Connection) {
    let _: () = redis::pipe()
        .atomic()
        .del(META)
        .rename(ASIDE, META)
        .query(redis)
        .unwrap();
}

fn run_id(redis: &mut redis::Connection) -> String {
    let info: String = redis::cmd("INFO").arg("server").query(redis).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .unwrap()
        .trim()
        .to_string()
}

fn check_message(message: &Value, epoch: &str, offset: u64) {
    assert_eq!(message["type"], "message", "{message}");
    assert_eq!(message["epoch"], epoch, "{message}");
    assert_eq!(message["offset"], offset, "{message}");
}

/// Nothing more arrives.
async fn quiet(client: &mut Client, when: &str) {
    let extra = client.drain().await;
    assert!(extra.is_empty(), "{when}: {extra:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_epochs_message_whose_history_read_fails_never_moves_a_subscription_back() {
    // Publishes that miss their deadline on a busy machine would start epochs of their own
    // (the degraded period's): the reads here fail by their key, not by a deadline.
    let mut world = World::start(1, &[("REDIS_TIMEOUT", "5s".into())]).await;
    let mut redis = redis::Client::open(world.redis.server().url())
        .unwrap()
        .get_connection()
        .unwrap();
    let alice = world.register("alice").await;
    let mut client = world.connect(0, Some(&alice.token)).await;
    assert_eq!(client.subscribe(CHANNEL).await["type"], "ack");
    let (epoch, _) = world.publish_durable(CHANNEL, json!({"n": 1})).await;
    world.publish_durable(CHANNEL, json!({"n": 2})).await;
    for offset in 1..=2 {
        check_message(&client.json().await, &epoch, offset);
    }

    // A late message of an epoch the channel had before; the history read it calls for fails.
    let before = failed_reads(&mut redis);
    let old = "00000000000000e0";
    let _: () = redis::pipe()
        .atomic()
        .rename(META, ASIDE)
        .set(META, "history reads fail")
        .publish(shard(), envelope(old, 7, &frame(old, 7, "late")))
        .query(&mut redis)
        .unwrap();
    a_read_failed(&mut redis, before).await;
    // The current epoch is not said to have ended, and the late message is not written.
    quiet(&mut client, "while the history could not be read").await;
    reads_succeed(&mut redis);

    // The current epoch goes on live: its next message, once, with no gap, nothing again.
    world.publish_durable(CHANNEL, json!({"n": 3})).await;
    check_message(&client.json().await, &epoch, 3);
    quiet(&mut client, "after the current epoch's next message").await;

    // The channel moves to a new epoch; its first message arrives while reads fail.
    let next = "00000000000000e2";
    let first = frame(next, 1, "new");
    let before = failed_reads(&mut redis);
    let run = run_id(&mut redis);
    let _: () = redis::pipe()
        .atomic()
        .del(&[META, STREAM])
        .cmd("XADD")
        .arg(STREAM)
        .arg("1-0")
        .arg("t")
        .arg(now_ms())
        .arg("f")
        .arg(&first)
        .hset_multiple(ASIDE, &[("epoch", next), ("offset", "1"), ("run", &run)])
        .set(META, "history reads fail")
        .publish(shard(), envelope(next, 1, &first))
        .query(&mut redis)
        .unwrap();
    a_read_failed(&mut redis, before).await;
    reads_succeed(&mut redis);
    // The next read that succeeds: the exact gap for the rest of the old epoch, then the new
    // one from its start, then live.
    let gap = client.json().await;
    assert_eq!(gap["type"], "gap", "{gap}");
    assert_eq!(gap["epoch"], epoch, "{gap}");
    assert_eq!(gap["from"], 4, "{gap}");
    assert!(gap["to"].is_null(), "{gap}");
    assert_eq!(gap["reason"], "epoch_changed", "{gap}");
    check_message(&client.json().await, next, 1);
    assert_eq!(
        world.publish_durable(CHANNEL, json!({"n": 4})).await,
        (next.to_string(), 2)
    );
    check_message(&client.json().await, next, 2);
    quiet(&mut client, "after the new epoch's second message").await;
}
