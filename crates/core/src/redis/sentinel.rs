//! Following the master Redis Sentinel names.
//!
//! redis-rs's `sentinel` module hands out a new `Client` per lookup and nothing that keeps a
//! `ConnectionManager` on the current master, and its lookups connect without our deadlines;
//! so the lookup is ours, as the Sentinel client guidelines describe it: ask each sentinel in
//! turn `SENTINEL GET-MASTER-ADDR-BY-NAME`, connect to the address it gives and believe it only
//! if `ROLE` answers `master` (a sentinel that has not yet seen the failover names the dead
//! or demoted one). The found master gets a lazily connecting `ConnectionManager`, replaced
//! when a later lookup finds another address.
//!
//! When to look again: when a sentinel announces `+switch-master` (a listener per client,
//! [`Sentinels::watch`]: a failover that leaves the old master running is followed at once);
//! after any failure that may mean the master moved (connection refused or dropped, no answer
//! within the deadline, `READONLY`, `MASTERDOWN`), in the background, at most once per
//! [`SPACING`]; and before every new pub/sub connection, so the bus and the real-time fan-out,
//! which reopen their subscription whenever it breaks (a sentinel's `CLIENT KILL` after a
//! failover, a dead master), subscribe on the master of now.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, ConnectionAddr, ConnectionInfo};

use super::RedisError;

/// At most one background lookup per this interval, however many commands fail.
const SPACING: Duration = Duration::from_millis(100);

/// A lookup, type-erased: its future is deep (sentinel, then master connections), and every
/// command's future would otherwise embed it, past the compiler's recursion limits where
/// commands are awaited deep in handlers.
pub(super) type MasterFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Arc<Master>, RedisError>> + Send + 'a>>;

/// The master as last found.
pub(super) struct Master {
    /// `host:port`, as the sentinels name it.
    pub addr: String,
    pub client: Client,
    pub manager: ConnectionManager,
}

struct Node {
    info: ConnectionInfo,
    display: String,
}

/// The outcome of the last lookup, shared with the callers that waited for it.
#[derive(Default)]
struct Lookup {
    finished: Option<Instant>,
    error: Option<String>,
}

pub(super) struct Sentinels {
    nodes: Vec<Node>,
    master_name: String,
    /// The master's connection settings (TLS, credentials, database), its address replaced.
    template: ConnectionInfo,
    manager_config: ConnectionManagerConfig,
    timeout: Duration,
    current: Mutex<Option<Arc<Master>>>,
    lookup: tokio::sync::Mutex<Lookup>,
    refreshing: AtomicBool,
    watching: AtomicBool,
}

impl Sentinels {
    pub(super) fn new(
        nodes: Vec<(ConnectionInfo, String)>,
        master_name: String,
        template: ConnectionInfo,
        manager_config: ConnectionManagerConfig,
        timeout: Duration,
    ) -> Sentinels {
        Sentinels {
            nodes: nodes
                .into_iter()
                .map(|(info, display)| Node { info, display })
                .collect(),
            master_name,
            template,
            manager_config,
            timeout,
            current: Mutex::new(None),
            lookup: tokio::sync::Mutex::new(Lookup::default()),
            refreshing: AtomicBool::new(false),
            watching: AtomicBool::new(false),
        }
    }

    /// The master last found, if any.
    pub(super) fn current(&self) -> Option<Arc<Master>> {
        self.current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The master last found, or, when none is known yet, the one a lookup finds now.
    pub(super) fn master(&self) -> MasterFuture<'_> {
        Box::pin(async move {
            match self.current() {
                Some(master) => Ok(master),
                None => self.resolve(Instant::now()).await,
            }
        })
    }

    /// The master as of a lookup finished after `since`: this caller's own, or one that was
    /// under way while it waited (callers that pile up share one lookup and its outcome).
    pub(super) fn resolve(&self, since: Instant) -> MasterFuture<'_> {
        Box::pin(self.resolve_now(since))
    }

    async fn resolve_now(&self, since: Instant) -> Result<Arc<Master>, RedisError> {
        let mut lookup = self.lookup.lock().await;
        if lookup.finished.is_some_and(|at| at >= since) {
            return match (&lookup.error, self.current()) {
                (None, Some(master)) => Ok(master),
                (Some(error), _) => Err(RedisError::Config(error.clone())),
                (None, None) => Err(RedisError::Config("no master found".into())),
            };
        }
        let found = self.find().await;
        lookup.finished = Some(Instant::now());
        lookup.error = found.as_ref().err().map(|e| e.to_string());
        let (addr, info) = found?;
        self.install(addr, info)
    }

    /// A failure that may mean the master moved: look it up again in the background.
    pub(super) fn suspect(self: &Arc<Self>) {
        if self.refreshing.swap(true, Ordering::SeqCst) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let since = Instant::now();
            // Each sentinel is asked under the deadline; a lookup of them all is bounded too.
            let bound = this.timeout * (2 * this.nodes.len() as u32 + 2);
            let _ = tokio::time::timeout(bound, this.resolve(since)).await;
            tokio::time::sleep(SPACING).await;
            this.refreshing.store(false, Ordering::SeqCst);
        });
    }

    /// Listens (once per client) for the sentinels' `+switch-master` announcements, so a
    /// failover that leaves the old master running (`SENTINEL FAILOVER`, a partition) is
    /// followed at once, not when a command fails there (the sentinels demote it only some
    /// seconds after the promotion; until then it would accept writes that are then lost).
    pub(super) fn watch(self: &Arc<Self>) {
        if self.watching.swap(true, Ordering::SeqCst) {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut turn = 0usize;
            loop {
                let Some(this) = weak.upgrade() else {
                    return;
                };
                let node = &this.nodes[turn % this.nodes.len()];
                turn += 1;
                let subscribe = async {
                    let mut pubsub = Client::open(node.info.clone())?.get_async_pubsub().await?;
                    pubsub.subscribe("+switch-master").await?;
                    Ok::<_, redis::RedisError>(pubsub)
                };
                let bound = this.timeout * 4;
                let Ok(Ok(pubsub)) = tokio::time::timeout(bound, subscribe).await else {
                    drop(this);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                };
                drop(this);
                let mut messages = Box::pin(pubsub.into_on_message());
                loop {
                    let next = futures_util::StreamExt::next(&mut messages);
                    match tokio::time::timeout(Duration::from_secs(1), next).await {
                        Ok(Some(message)) => {
                            let Some(this) = weak.upgrade() else {
                                return;
                            };
                            let payload: String = message.get_payload().unwrap_or_default();
                            if payload.split(' ').next() == Some(this.master_name.as_str()) {
                                let bound = this.timeout * (2 * this.nodes.len() as u32 + 2);
                                let _ =
                                    tokio::time::timeout(bound, this.resolve(Instant::now())).await;
                            }
                        }
                        // That sentinel is gone: listen to the next one.
                        Ok(None) => break,
                        Err(_) if weak.strong_count() == 0 => return,
                        Err(_) => {}
                    }
                }
            }
        });
    }

    fn install(&self, addr: String, info: ConnectionInfo) -> Result<Arc<Master>, RedisError> {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(master) = current.as_ref().filter(|m| m.addr == addr) {
            return Ok(master.clone());
        }
        let client = Client::open(info)?;
        let manager =
            ConnectionManager::new_lazy_with_config(client.clone(), self.manager_config.clone())?;
        match current.as_ref() {
            Some(old) => tracing::warn!(
                master = %self.master_name,
                from = %old.addr,
                to = %addr,
                "redis sentinel: the master moved; following it"
            ),
            None => {
                tracing::info!(master = %self.master_name, at = %addr, "redis sentinel: master found")
            }
        }
        let master = Arc::new(Master {
            addr,
            client,
            manager,
        });
        *current = Some(master.clone());
        Ok(master)
    }

    /// Asks the sentinels in turn; the first whose master answers `ROLE` as a master wins.
    async fn find(&self) -> Result<(String, ConnectionInfo), RedisError> {
        let mut errors = Vec::new();
        for node in &self.nodes {
            match self.ask(node).await {
                Ok(found) => return Ok(found),
                Err(err) => errors.push(format!("{}: {err}", node.display)),
            }
        }
        Err(RedisError::Config(format!(
            "no sentinel named a reachable master {:?} ({})",
            self.master_name,
            errors.join("; ")
        )))
    }

    async fn ask(&self, node: &Node) -> Result<(String, ConnectionInfo), RedisError> {
        let mut sentinel = self.connect(node.info.clone()).await?;
        let addr: Option<(String, u16)> = self
            .bounded(
                redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg(&self.master_name)
                    .query_async(&mut sentinel),
            )
            .await?;
        let Some((host, port)) = addr else {
            return Err(RedisError::Config(format!(
                "does not monitor a master named {:?}",
                self.master_name
            )));
        };
        let info = self.master_info(host.clone(), port);
        let mut master = self.connect(info.clone()).await?;
        let role: redis::Role = self
            .bounded(redis::cmd("ROLE").query_async(&mut master))
            .await?;
        match role {
            redis::Role::Primary { .. } => Ok((format!("{host}:{port}"), info)),
            _ => Err(RedisError::Config(format!(
                "names {host}:{port}, which is not a master (yet)"
            ))),
        }
    }

    fn master_info(&self, host: String, port: u16) -> ConnectionInfo {
        let addr = match self.template.addr() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host,
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(host, port),
        };
        self.template.clone().set_addr(addr)
    }

    async fn connect(&self, info: ConnectionInfo) -> Result<MultiplexedConnection, RedisError> {
        let client = Client::open(info)?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        self.bounded(client.get_multiplexed_async_connection_with_config(&config))
            .await
    }

    async fn bounded<T>(
        &self,
        step: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, RedisError> {
        match tokio::time::timeout(self.timeout, step).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(RedisError::Timeout(self.timeout)),
        }
    }
}

/// Whether `err` may mean the master is no longer where we connect.
pub(super) fn may_have_moved(err: &RedisError) -> bool {
    match err {
        RedisError::Timeout(_) => true,
        RedisError::Config(_) => false,
        RedisError::Command(err) => {
            err.is_io_error()
                || err.is_connection_refusal()
                || err.is_connection_dropped()
                || err.is_timeout()
                || err.is_unrecoverable_error()
                || matches!(
                    err.kind(),
                    redis::ErrorKind::Server(
                        redis::ServerErrorKind::ReadOnly | redis::ServerErrorKind::MasterDown
                    )
                )
        }
    }
}
