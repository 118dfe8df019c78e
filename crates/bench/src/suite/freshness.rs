//! The stale-read probe: one writer puts an increasing `bench_version` into one asset's
//! metadata every 20 ms while readers read the hot set (every fourth read that asset). No
//! read may return a version older than one acknowledged to the writer before the read was
//! sent. The Redis outage runs it while Redis goes away; the writes rows run it beside wrk, so
//! a replica that serves a load before it has replayed the write it follows would show here.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::client::Client;

/// What the readers and the writer share.
#[derive(Default)]
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
}

impl Probe {
    /// Starts `readers` readers of `hot` (and of `written`) and the writer of `written`, all
    /// through `client` (the bench account's: it owns every seeded asset).
    pub(super) fn start(client: &Client, hot: &[String], written: &str, readers: usize) -> Probe {
        let shared = Arc::new(Shared::default());
        let readers = (0..readers)
            .map(|r| {
                let (client, hot) = (client.clone(), hot.to_vec());
                tokio::spawn(read(client, hot, written.to_string(), r, shared.clone()))
            })
            .collect();
        let writer = tokio::spawn(write(client.clone(), written.to_string(), shared.clone()));
        Probe {
            shared,
            readers,
            writer,
        }
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
        })
    }
}

/// Reads the hot set until told to stop, every fourth read the written asset; returns each
/// read's latency.
async fn read(
    client: Client,
    hot: Vec<String>,
    written: String,
    first: usize,
    shared: Arc<Shared>,
) -> Vec<Duration> {
    let mut latencies = Vec::new();
    let mut i = first;
    while !shared.stop.load(Ordering::Relaxed) {
        i += 1;
        let id = if i.is_multiple_of(4) {
            &written
        } else {
            &hot[i % hot.len()]
        };
        let floor = shared.acknowledged.load(Ordering::SeqCst);
        let begun = Instant::now();
        match client.get_ok(&format!("/listings/{id}")).await {
            Ok(body) if id == &written => {
                shared.checked.fetch_add(1, Ordering::Relaxed);
                if version_of(&body) < floor {
                    shared.stale.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(_) => {}
            Err(_) => {
                shared.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        latencies.push(begun.elapsed());
    }
    latencies
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
