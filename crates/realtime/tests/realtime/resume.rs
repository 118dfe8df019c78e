//! The resume checker: clients drop their connections at random points while a publisher
//! writes numbered messages, and come back with the last offset they had. At the end each
//! client has every acknowledged message exactly once and in order, or a `gap` naming it —
//! and no gap names a message it did get. Also with Redis restarted (empty) mid-run: the
//! epoch changes and the messages of the lost one are reported, never silently missing.
//! While Redis is away the publisher's instance delivers locally (`durable: false`, no
//! offset): those messages are outside the history, so the publisher publishes the same
//! number again until it is durable, and the clients set them aside. Half the clients take
//! batches (`?batch=1`, several messages per frame), on both instances, and are held to the
//! same checks.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Client, Incoming, World};

const CHANNEL: &str = "ai-collaborations";
const MESSAGES: u64 = 400;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_clients_get_every_message_once_in_order_or_an_exact_gap() {
    run(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_across_a_redis_restart_reports_the_lost_epoch_as_a_gap() {
    run(true).await;
}

async fn run(restart_redis: bool) {
    let mut world = World::start(2, &[]).await;
    let alice = world.register("alice").await;
    let published: Published = Arc::default();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));

    // The clients start first (subscribed before the first message), alternating instances.
    let mut clients = Vec::new();
    for n in 0..CLIENTS {
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
        clients.push(tokio::spawn(async move {
            follow(n as u64, &base, &token, client, start, published, done).await
        }));
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
    // Redis restarted (empty) halfway through, while the publisher goes on.
    let redis = world.redis.server();
    let halfway = published.clone();
    let restart = async move {
        if restart_redis {
            while halfway.lock().unwrap().len() < (MESSAGES / 2) as usize {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            redis.restart().await;
        }
    };
    let (finished, ()) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(60), publisher),
        restart
    );
    finished.expect("the publisher finished");
    done.store(true, std::sync::atomic::Ordering::SeqCst);

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
    if restart_redis {
        assert_eq!(
            epochs.len(),
            2,
            "a Redis without its data starts a new epoch"
        );
    } else {
        assert_eq!(epochs.len(), 1);
    }
    for client in clients {
        let seen = tokio::time::timeout(Duration::from_secs(60), client)
            .await
            .expect("a client caught up in time")
            .unwrap();
        check(&published, &epochs, &seen);
    }
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

/// Reads, drops the connection at random points, resumes with `since`, until the client has
/// the last published message (after the publisher is done).
async fn follow(
    seed: u64,
    base: &str,
    token: &str,
    mut client: Client,
    start: (Option<String>, u64),
    published: Published,
    done: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<Seen> {
    let mut rng = fastrand::Rng::with_seed(seed * 7919 + 1);
    let mut seen = Vec::new();
    let (mut epoch, mut last) = start;
    loop {
        // Read a random number of messages (or until a pause), then drop the connection.
        let budget = rng.u64(5..60);
        let mut read = 0;
        while read < budget {
            let finished = done.load(std::sync::atomic::Ordering::SeqCst)
                && published
                    .lock()
                    .unwrap()
                    .last()
                    .is_some_and(|(e, o)| epoch.as_deref() == Some(e.as_str()) && last >= *o);
            if finished {
                return seen;
            }
            match client.next_within(Duration::from_millis(500)).await {
                Some(Incoming::Json(m)) => record(&m, &mut seen, &mut epoch, &mut last),
                Some(Incoming::Close(code)) => panic!("closed by the server: {code:?}"),
                None => break,
            }
            read += 1;
        }
        drop(client);
        tokio::time::sleep(Duration::from_millis(rng.u64(0..80))).await;
        client = loop {
            match connect(seed, base, token).await {
                Ok(client) => break client,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let mut subscribe = json!({"type": "subscribe", "channel": CHANNEL, "id": "resume"});
        if let Some(e) = &epoch {
            subscribe["since"] = json!({"offset": last, "epoch": e});
        }
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
            "silent hole: {epoch}#{offset} neither received nor in a gap"
        );
        assert!(
            !(got && gapped),
            "{epoch}#{offset} received and also reported missing"
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
