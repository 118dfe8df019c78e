//! The stale-read probe: one writer puts an increasing `bench_version` into one asset's
//! metadata every 20 ms while readers read the hot set (every fourth read that asset). No
//! read may return a version older than one acknowledged to the writer before the read was
//! sent. The Redis outage runs it while Redis goes away; the writes rows run it beside wrk, so
//! a replica that serves a load before it has replayed the write it follows would show here.
//! Through several instances ([`Probe::across`]) the readers take them in turn, skipping one
//! taken out of rotation, and every instance's reads are checked against the writes
//! acknowledged by the one the writer goes through.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::client::Client;

/// What the readers and the writer share.
struct Shared {
    /// The last version acknowledged to the writer: no later read may return an older one.
    acknowledged: AtomicU64,
    stop: AtomicBool,
    /// Requests (reads or writes) that did not succeed.
    failed: AtomicU64,
    /// Reads of the written asset.
    checked: AtomicU64,
    /// Reads of the written asset older than what was acknowledged before they were sent.
    stale: AtomicU64,
    /// The instances the readers take in turn.
    instances: Vec<Instance>,
}

/// One instance the readers read through, and what its reads saw.
struct Instance {
    client: RwLock<Client>,
    /// In rotation (a load balancer's health check passing).
    up: AtomicBool,
    reads: AtomicU64,
    failed: AtomicU64,
    checked: AtomicU64,
    stale: AtomicU64,
}

impl Instance {
    fn seen(&self) -> Seen {
        Seen {
            reads: self.reads.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            checked: self.checked.load(Ordering::Relaxed),
            stale: self.stale.load(Ordering::Relaxed),
        }
    }
}

/// One instance's reads so far.
#[derive(Clone, Copy, Default)]
pub(super) struct Seen {
    pub reads: u64,
    pub failed: u64,
    pub checked: u64,
    pub stale: u64,
}

impl Seen {
    /// What was seen after `before` (a snapshot of the same instance).
    pub(super) fn since(self, before: Seen) -> Seen {
        Seen {
            reads: self.reads - before.reads,
            failed: self.failed - before.failed,
            checked: self.checked - before.checked,
            stale: self.stale - before.stale,
        }
    }
}

/// The running readers and writer; [`stop`](Probe::stop) them for the outcome.
pub(super) struct Probe {
    shared: Arc<Shared>,
    readers: Vec<JoinHandle<Vec<Duration>>>,
    writer: JoinHandle<Vec<Write>>,
}

/// One of the writer's writes.
pub(super) struct Write {
    pub begun: Instant,
    pub took: Duration,
    pub ok: bool,
}

/// What the probe saw.
pub(super) struct Outcome {
    /// Every read's latency.
    pub latencies: Vec<Duration>,
    pub failed: u64,
    /// Reads of the written asset, each checked against the acknowledged version.
    pub checked: u64,
    pub stale: u64,
    /// The writer's writes, in order (their failures are among `failed` too).
    pub writes: Vec<Write>,
    /// Each instance's reads, in the order they were given.
    pub instances: Vec<Seen>,
}

impl Probe {
    /// Starts `readers` readers of `hot` (and of `written`) and the writer of `written`, all
    /// through `client` (the bench account's: it owns every seeded asset).
    pub(super) fn start(client: &Client, hot: &[String], written: &str, readers: usize) -> Probe {
        Probe::across(client, std::slice::from_ref(client), hot, written, readers)
    }

    /// The same, the writer through `writer` and each read through the next of `instances`
    /// in rotation.
    pub(super) fn across(
        writer: &Client,
        instances: &[Client],
        hot: &[String],
        written: &str,
        readers: usize,
    ) -> Probe {
        let shared = Arc::new(Shared {
            acknowledged: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            failed: AtomicU64::new(0),
            checked: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            instances: instances
                .iter()
                .map(|client| Instance {
                    client: RwLock::new(client.clone()),
                    up: AtomicBool::new(true),
                    reads: AtomicU64::new(0),
                    failed: AtomicU64::new(0),
                    checked: AtomicU64::new(0),
                    stale: AtomicU64::new(0),
                })
                .collect(),
        });
        let readers = (0..readers)
            .map(|r| {
                let hot = hot.to_vec();
                tokio::spawn(read(hot, written.to_string(), r, shared.clone()))
            })
            .collect();
        let writer = tokio::spawn(write(writer.clone(), written.to_string(), shared.clone()));
        Probe {
            shared,
            readers,
            writer,
        }
    }

    /// Takes instance `i` out of rotation: no read is sent to it from now on.
    pub(super) fn leave(&self, i: usize) {
        self.shared.instances[i].up.store(false, Ordering::SeqCst);
    }

    /// Puts instance `i` back into rotation, now reached through `client`.
    pub(super) fn rejoin(&self, i: usize, client: Client) {
        let instance = &self.shared.instances[i];
        *instance.client.write().unwrap_or_else(|e| e.into_inner()) = client;
        instance.up.store(true, Ordering::SeqCst);
    }

    /// Instance `i`'s reads so far.
    pub(super) fn seen(&self, i: usize) -> Seen {
        self.shared.instances[i].seen()
    }

    pub(super) async fn stop(self) -> anyhow::Result<Outcome> {
        self.shared.stop.store(true, Ordering::Relaxed);
        let mut latencies = Vec::new();
        for reader in self.readers {
            latencies.extend(reader.await?);
        }
        let writes = self.writer.await?;
        Ok(Outcome {
            writes,
            latencies,
            failed: self.shared.failed.load(Ordering::Relaxed),
            checked: self.shared.checked.load(Ordering::Relaxed),
            stale: self.shared.stale.load(Ordering::Relaxed),
            instances: self.shared.instances.iter().map(Instance::seen).collect(),
        })
    }
}

/// Reads the hot set until told to stop, every fourth read the written asset, each read
/// through the next instance in rotation; returns each read's latency.
async fn read(
    hot: Vec<String>,
    written: String,
    first: usize,
    shared: Arc<Shared>,
) -> Vec<Duration> {
    let mut latencies = Vec::new();
    let mut i = first;
    let mut turn = first;
    while !shared.stop.load(Ordering::Relaxed) {
        let Some(instance) = next_up(&shared.instances, &mut turn) else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let client = instance
            .client
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        i += 1;
        let id = if i.is_multiple_of(4) {
            &written
        } else {
            &hot[i % hot.len()]
        };
        let floor = shared.acknowledged.load(Ordering::SeqCst);
        let begun = Instant::now();
        let answer = client.get_ok(&format!("/listings/{id}")).await;
        latencies.push(begun.elapsed());
        instance.reads.fetch_add(1, Ordering::Relaxed);
        match answer {
            Ok(body) if id == &written => {
                shared.checked.fetch_add(1, Ordering::Relaxed);
                instance.checked.fetch_add(1, Ordering::Relaxed);
                if version_of(&body) < floor {
                    shared.stale.fetch_add(1, Ordering::Relaxed);
                    instance.stale.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(_) => {}
            Err(_) => {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                instance.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    latencies
}

/// The next instance in rotation after `turn` (advanced past it); `None` while none is.
fn next_up<'a>(instances: &'a [Instance], turn: &mut usize) -> Option<&'a Instance> {
    for _ in 0..instances.len() {
        *turn = turn.wrapping_add(1);
        let instance = &instances[*turn % instances.len()];
        if instance.up.load(Ordering::SeqCst) {
            return Some(instance);
        }
    }
    None
}

/// Writes increasing versions of `written` every 20 ms until told to stop, publishing each
/// acknowledged one; returns every write.
async fn write(client: Client, written: String, shared: Arc<Shared>) -> Vec<Write> {
    let mut writes = Vec::new();
    let mut version = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        version += 1;
        let body = json!({ "metadata": { "bench_version": version } });
        let begun = Instant::now();
        let ok = match client.patch(&format!("/listings/{written}"), &body).await {
            Ok(()) => {
                shared.acknowledged.store(version, Ordering::SeqCst);
                true
            }
            Err(_) => {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                false
            }
        };
        writes.push(Write {
            begun,
            took: begun.elapsed(),
            ok,
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    writes
}

/// The `bench_version` the writer put in an asset's metadata (0 before any).
fn version_of(body: &[u8]) -> u64 {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["metadata"]["bench_version"].as_u64())
        .unwrap_or(0)
}

/// The writer's failures and its slowest write, as a drill's row says them (`event`: what
/// happened at `at`, e.g. "after the kill").
pub(super) fn writes_note(writes: &[Write], at: Instant, event: &str) -> String {
    let slowest = writes.iter().map(|w| w.took).max().unwrap_or_default();
    let failed: Vec<&Write> = writes.iter().filter(|w| !w.ok).collect();
    let failures = match failed.last() {
        None => "0 failed writes".to_string(),
        Some(last) => format!(
            "{} failed writes, the last begun {} ms {event}",
            failed.len(),
            last.begun.saturating_duration_since(at).as_millis()
        ),
    };
    format!(
        "{failures} of {}, the slowest {} ms",
        writes.len(),
        slowest.as_millis()
    )
}
