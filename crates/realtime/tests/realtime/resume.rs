//! The resume checker: clients drop their connections at random points while a publisher
//! writes numbered messages, and come back with the last offset they had. At the end each
//! client has every acknowledged message exactly once and in order, or a `gap` naming it —
//! and no gap names a message it did get. Also with Redis restarted (empty) mid-run: the
//! epoch changes and the messages of the lost one are reported, never silently missing.
//! While Redis is away the publisher's instance delivers locally (`durable: false`, no
//! offset): those messages are outside the history, so the publisher publishes the same
//! number again until it is durable, and the clients set them aside. Half the clients take
//! batches (`?batch=1`, several messages per frame), on both instances, and are held to the
//! same checks. And on a Redis Cluster whose channel's master is killed mid-run: the
//! failover drill.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Client, Incoming, Shared, World};

const CHANNEL: &str = "ai-collaborations";
const MESSAGES: u64 = 400;
/// Clients that drop and resume at random points, on both instances.
const CLIENTS: usize = 4;

/// What one client saw, in order.
#[derive(Debug, Clone)]
enum Seen {
    Message {
        epoch: String,
        offset: u64,
    },
    Gap {
        epoch: String,
        from: u64,
        to: Option<u64>,
    },
}

/// Acknowledged publishes, in order: (epoch, offset).
type Published = Arc<Mutex<Vec<(String, u64)>>>;

/// What happens to Redis halfway through the run.
#[derive(Clone, Copy, PartialEq)]
enum Disruption {
    None,
    /// The one Redis server restarts without its data.
    Restart,
    /// On a cluster of 3 masters and 3 replicas, the master of the channel's slot is killed
    /// (SIGKILL) and its replica promoted.
    Failover,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_clients_get_every_message_once_in_order_or_an_exact_gap() {
    run(Disruption::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_across_a_redis_restart_reports_the_lost_epoch_as_a_gap() {
    run(Disruption::Restart).await;
}

/// The failover drill (docs/deploy.md, "Redis Cluster"): while the channel's master is down
/// the publisher's instance delivers locally; once a replica took over, publishes are
/// durable again (a new epoch: the new master is another Redis process), both instances'
/// fan-out resumes without help, and every client has every message once or a `gap`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_across_a_redis_cluster_failover_reports_the_lost_epoch_as_a_gap() {
    run(Disruption::Failover).await;
}

/// How a client reads.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// Drops its connection at random points and resumes with `since`.
    Drops,
    /// Never drops its connection: what it gets after a disruption, live delivery brought.
    Steady,
    /// Reads a few messages, drops its connection before the disruption and resumes with
    /// `since` once the publisher is done (after it).
    Late,
}

async fn run(disruption: Disruption) {
    let mut world = match disruption {
        Disruption::Failover => World::start_on_cluster(2).await,
        _ => World::start(2, &[]).await,
    };
    let alice = world.register("alice").await;
    let published: Published = Arc::default();
    let done = Arc::new(AtomicBool::new(false));

    // The clients start first (subscribed before the first message), on both instances:
    // those that drop alternate instances, one steady client on each, the late one on the
    // instance without the publisher.
    let mut readers: Vec<(usize, Mode)> = (0..CLIENTS).map(|n| (n, Mode::Drops)).collect();
    readers.extend([(CLIENTS, Mode::Steady), (CLIENTS + 1, Mode::Steady)]);
    readers.push((CLIENTS + 3, Mode::Late));
    let mut clients = Vec::new();
    for (n, mode) in readers {
        let base = world.base(n).to_string();
        let token = alice.token.clone();
        let (published, done) = (published.clone(), done.clone());
        let mut client = connect(n as u64, &base, &token).await.unwrap();
        let ack = client.subscribe(CHANNEL).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        let start = (
            ack["epoch"].as_str().map(str::to_string),
            ack["offset"].as_u64().unwrap(),
        );
        let reader = Reader {
            seed: n as u64,
            base,
            token,
            mode,
            published,
            done,
        };
        clients.push((mode, tokio::spawn(reader.follow(client, start))));
    }

    if let Shared::Cluster(cluster) = &world.redis {
        listen_on_the_master(&world, cluster).await;
    }

    // The publisher, on instance 0, retrying what was only delivered locally while Redis
    // was away.
    let rt = world.servers[0].realtime.clone();
    let log = published.clone();
    let publisher = world.servers[0].run(async move {
        for n in 1..=MESSAGES {
            loop {
                match rt.publish(CHANNEL, json!({"n": n})).await.unwrap() {
                    cascade_realtime::Published::Durable(at) => {
                        log.lock().unwrap().push((at.epoch.to_string(), at.offset));
                        break;
                    }
                    cascade_realtime::Published::LocalOnly => {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    });
    // Redis restarted (empty), or the channel's master killed, halfway through, while the
    // publisher goes on.
    let halfway = published.clone();
    let redis = &mut world.redis;
    let disrupt = async move {
        if disruption == Disruption::None {
            return;
        }
        while halfway.lock().unwrap().len() < (MESSAGES / 2) as usize {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        match redis {
            Shared::One(server) => server.restart().await,
            Shared::Cluster(cluster) => failover(cluster, &halfway).await,
        }
    };
    let (finished, ()) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(90), publisher),
        disrupt
    );
    finished.expect("the publisher finished");
    done.store(true, Ordering::SeqCst);
    // Each instance's shard subscriptions (those on the killed node or the restarted
    // server too) are open again, without help.
    for (i, server) in world.servers.iter().enumerate() {
        assert!(
            server.realtime_listening(Duration::from_secs(10)).await,
            "instance {i} does not hear every shard again"
        );
    }
    if let Shared::Cluster(cluster) = &world.redis {
        // Both moved the channel's shard to a live node.
        let deadline = Instant::now() + Duration::from_secs(10);
        while listeners(cluster).iter().map(|(_, n)| n).sum::<i64>() != 2 {
            assert!(
                Instant::now() < deadline,
                "the channel's shard is not subscribed by both instances on live nodes: {:?}",
                listeners(cluster)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    let published = published.lock().unwrap().clone();
    assert_eq!(published.len() as u64, MESSAGES);
    let epochs: Vec<String> = {
        let mut seen = Vec::new();
        for (epoch, _) in &published {
            if !seen.contains(epoch) {
                seen.push(epoch.clone());
            }
        }
        seen
    };
    match disruption {
        Disruption::None => assert_eq!(epochs.len(), 1),
        Disruption::Restart => assert_eq!(
            epochs.len(),
            2,
            "a Redis without its data starts a new epoch"
        ),
        // The new master is another process (its run id differs): a new epoch, whether the
        // publisher's instance rotated it after its local deliveries or the first durable
        // publish found the old master's run in the channel's hash.
        Disruption::Failover => assert_eq!(
            epochs.len(),
            2,
            "a promoted replica starts a new epoch: {epochs:?}"
        ),
    }
    for (mode, client) in clients {
        // Live delivery on both instances came back by itself: the steady clients, which
        // never reconnect, reach the last message soon after the publisher is done.
        let bound = if mode == Mode::Steady { 20 } else { 60 };
        let seen = tokio::time::timeout(Duration::from_secs(bound), client)
            .await
            .unwrap_or_else(|_| panic!("a {mode:?} client did not catch up within {bound} s"))
            .unwrap();
        check(&published, &epochs, &seen);
        if mode == Mode::Late && disruption != Disruption::None {
            // It left in the first epoch and came back in the second: told of the rest of
            // the first as a gap, then given the second from its start.
            assert!(
                seen.iter()
                    .any(|s| matches!(s, Seen::Gap { epoch, to: None, .. } if *epoch == epochs[0])),
                "the late client was not told its epoch ended: {seen:?}"
            );
            assert!(
                seen.iter().any(
                    |s| matches!(s, Seen::Message { epoch, offset: 1 } if *epoch == epochs[1])
                ),
                "the late client did not get the new epoch from its start: {seen:?}"
            );
        }
    }
}

/// The Redis channel of the channel's fan-out shard on a cluster (`WS_REDIS_SHARDS` 4, the
/// default): tagged into the shard's quarter of the slots.
fn shard_channel() -> String {
    let shard = cascade_realtime::store::shard_of(CHANNEL, 4);
    format!(
        "cascade:rt:shard:{shard}{}",
        cascade_core::cache::buckets::spread_tag(shard, 4)
    )
}

/// Each live node's count of sharded subscribers of the channel's shard (by port).
fn listeners(cluster: &cascade_testkit::RedisCluster) -> Vec<(u16, i64)> {
    cluster.subscribers(&shard_channel(), true)
}

/// Waits for both instances' sharded subscription of the channel's shard, on the master of
/// its slot, which also serves the channel's keys (`ai-collaborations` is in slot 603, its
/// shard channel in 2048: the first master of three), so killing it cuts both the channel's
/// history and its fan-out.
async fn listen_on_the_master(world: &World, cluster: &cascade_testkit::RedisCluster) {
    let master = cluster
        .master_of_slot(cluster.slot_of(CHANNEL))
        .expect("the slot has a master");
    assert_eq!(
        cluster.master_of_slot(cluster.slot_of(&shard_channel())),
        Some(master),
        "the drill needs the channel's keys and its shard on one master"
    );
    for server in &world.servers {
        assert!(server.realtime_listening(Duration::from_secs(10)).await);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !listeners(cluster).contains(&(master, 2)) {
        assert!(
            Instant::now() < deadline,
            "the shard's subscriptions never both reached {master}: {:?}",
            listeners(cluster)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Kills the master of the channel's slot, waits for its replica to take over, and for a
/// publish to be durable again (within bounds: the drill's recovery times).
async fn failover(cluster: &mut cascade_testkit::RedisCluster, published: &Published) {
    let slot = cluster.slot_of(CHANNEL);
    let before = published.lock().unwrap().len();
    let killed_at = Instant::now();
    let old = cluster.kill_master_of(slot);
    // cluster-node-timeout is 1 s: a replica is promoted within a few.
    cluster
        .wait_for_master(slot, old, Duration::from_secs(20))
        .await;
    let promoted = killed_at.elapsed();
    // Publishing works again by itself: a durable publish in a new epoch.
    let first_epoch = published.lock().unwrap()[0].0.clone();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        {
            let log = published.lock().unwrap();
            if log.len() > before && log.last().is_some_and(|(e, _)| *e != first_epoch) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no durable publish within 15 s of the promotion"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "failover drill: replica promoted {:.1} s after the kill, publishes durable again {:.1} s after it",
        promoted.as_secs_f64(),
        killed_at.elapsed().as_secs_f64()
    );
}

/// Client `n`: those with `n / 2` odd take batches, so each instance has clients of both
/// kinds (`World::base` alternates instances with `n`).
async fn connect(n: u64, base: &str, token: &str) -> Result<Client, String> {
    if (n / 2) % 2 == 1 {
        Client::connect_batched(base, Some(token)).await
    } else {
        Client::connect(base, Some(token)).await
    }
}

/// One client's way of reading.
struct Reader {
    seed: u64,
    base: String,
    token: String,
    mode: Mode,
    published: Published,
    done: Arc<AtomicBool>,
}

impl Reader {
    /// The publisher is done and the client has its last message.
    fn finished(&self, epoch: &Option<String>, last: u64) -> bool {
        self.done.load(Ordering::SeqCst)
            && self
                .published
                .lock()
                .unwrap()
                .last()
                .is_some_and(|(e, o)| epoch.as_deref() == Some(e.as_str()) && last >= *o)
    }

    /// Reads (dropping the connection and resuming with `since` as its mode says) until the
    /// client has the last published message, after the publisher is done.
    async fn follow(self, mut client: Client, start: (Option<String>, u64)) -> Vec<Seen> {
        let mut rng = fastrand::Rng::with_seed(self.seed * 7919 + 1);
        let mut seen = Vec::new();
        let (mut epoch, mut last) = start;
        let mut round = 0;
        loop {
            // Read a number of messages (or until a pause), then drop the connection.
            let budget = match (self.mode, round) {
                (Mode::Drops, _) => rng.u64(5..60),
                (Mode::Late, 0) => 20,
                _ => u64::MAX,
            };
            round += 1;
            let mut read = 0;
            while read < budget {
                if self.finished(&epoch, last) {
                    return seen;
                }
                match client.next_within(Duration::from_millis(500)).await {
                    Some(Incoming::Json(m)) => record(&m, &mut seen, &mut epoch, &mut last),
                    Some(Incoming::Close(code)) => panic!("closed by the server: {code:?}"),
                    None if self.mode == Mode::Drops => break,
                    None => continue,
                }
                read += 1;
            }
            drop(client);
            if self.mode == Mode::Late {
                while !self.done.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            } else {
                tokio::time::sleep(Duration::from_millis(rng.u64(0..80))).await;
            }
            client = loop {
                match connect(self.seed, &self.base, &self.token).await {
                    Ok(client) => break client,
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            };
            // Always from where it stands, also before its first message (`epoch` null,
            // offset 0: the channel from its start). A subscribe without `since` starts at
            // the head instead: one racing the first publish skipped it, a silent hole the
            // failover drill's idle start made likely (`#1` of the first epoch, under load).
            let since = json!({"offset": last, "epoch": epoch});
            let subscribe =
                json!({"type": "subscribe", "channel": CHANNEL, "since": since, "id": "resume"});
            client.send(subscribe.clone()).await;
            loop {
                match client.next().await {
                    Some(Incoming::Json(m)) if m["id"] == "resume" => {
                        if m["type"] == "ack" {
                            break;
                        }
                        // Redis is away: try again shortly.
                        assert_eq!(m["code"], "unavailable", "{m}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        client.send(subscribe.clone()).await;
                    }
                    Some(Incoming::Json(m)) => record(&m, &mut seen, &mut epoch, &mut last),
                    other => panic!("no answer to the resume: {other:?}"),
                }
            }
        }
    }
}

fn record(m: &Value, seen: &mut Vec<Seen>, epoch: &mut Option<String>, last: &mut u64) {
    let e = m["epoch"].as_str().map(str::to_string);
    if m["durable"] == false {
        // Delivered locally while Redis was away: no position, in no history.
        assert!(m["offset"].is_null() && m["epoch"].is_null(), "{m}");
        return;
    }
    match m["type"].as_str() {
        Some("message") => {
            let offset = m["offset"].as_u64().unwrap();
            seen.push(Seen::Message {
                epoch: e.clone().unwrap(),
                offset,
            });
            *epoch = e;
            *last = offset;
        }
        // A `degraded` gap of a subscription that had no epoch yet names no offset.
        Some("gap") if e.is_none() => assert_eq!(m["reason"], "degraded", "{m}"),
        Some("gap") => {
            let from = m["from"].as_u64().unwrap();
            let to = m["to"].as_u64();
            seen.push(Seen::Gap {
                epoch: e.clone().unwrap(),
                from,
                to,
            });
            // A gap to the end of an epoch leaves the position to the next message.
            if let Some(to) = to {
                *epoch = e;
                *last = to;
            }
        }
        _ => panic!("unexpected message {m}"),
    }
}

/// Every acknowledged message received once, in publish order, or inside a gap; no gap over
/// a message received; nothing received that was not published.
fn check(published: &[(String, u64)], epochs: &[String], seen: &[Seen]) {
    let rank = |epoch: &str, offset: u64| {
        let e = epochs
            .iter()
            .position(|x| x == epoch)
            .expect("an epoch nobody published in");
        (e, offset)
    };
    let mut received = HashSet::new();
    let mut previous = None;
    for s in seen {
        if let Seen::Message { epoch, offset } = s {
            let here = rank(epoch, *offset);
            assert!(
                previous < Some(here),
                "out of order or twice: {here:?} after {previous:?}"
            );
            previous = Some(here);
            received.insert((epoch.clone(), *offset));
        }
    }
    let acked: HashSet<(String, u64)> = published.iter().cloned().collect();
    for r in &received {
        assert!(
            acked.contains(r),
            "received {r:?}, which was never acknowledged"
        );
    }
    let gaps: Vec<(&String, u64, Option<u64>)> = seen
        .iter()
        .filter_map(|s| match s {
            Seen::Gap { epoch, from, to } => Some((epoch, *from, *to)),
            Seen::Message { .. } => None,
        })
        .collect();
    let in_gap = |epoch: &String, offset: u64| {
        gaps.iter()
            .any(|(e, from, to)| *e == epoch && offset >= *from && to.is_none_or(|to| offset <= to))
    };
    let mut missing_per_epoch: HashMap<&String, u64> = HashMap::new();
    for (epoch, offset) in published {
        let got = received.contains(&(epoch.clone(), *offset));
        let gapped = in_gap(epoch, *offset);
        assert!(
            got || gapped,
            "silent hole: {epoch}#{offset} (epoch {} of {}) neither received nor in a gap; the \
             client saw (around the epoch's start) {:?}",
            rank(epoch, *offset).0 + 1,
            epochs.len(),
            around(seen, epoch)
        );
        assert!(
            !(got && gapped),
            "{epoch}#{offset} (epoch {} of {}) received and also reported missing; the client \
             saw (around the epoch's start) {:?}",
            rank(epoch, *offset).0 + 1,
            epochs.len(),
            around(seen, epoch)
        );
        if gapped {
            *missing_per_epoch.entry(epoch).or_default() += 1;
        }
    }
    // Without a restart nothing may be lost (the history holds it all).
    if epochs.len() == 1 {
        assert!(
            missing_per_epoch.is_empty(),
            "gaps without a reason: {gaps:?}"
        );
    }
}

/// What a client saw from a little before the first sight of `epoch` to a little after: the
/// part of its record a failed check needs.
fn around<'a>(seen: &'a [Seen], epoch: &str) -> &'a [Seen] {
    let of_epoch = |s: &Seen| match s {
        Seen::Message { epoch: e, .. } | Seen::Gap { epoch: e, .. } => e == epoch,
    };
    let first = seen.iter().position(of_epoch).unwrap_or(seen.len());
    &seen[first.saturating_sub(8)..(first + 8).min(seen.len())]
}
