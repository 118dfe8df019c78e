//! Real-time channels (seed 004, issue 17): the authenticated WebSocket endpoint `GET /ws`,
//! fan-out to every instance over Redis, per-channel history with offsets and epochs, and
//! resume without silent gaps.
//!
//! - [`config`]: `WS_*` settings; [`channel`]: channel names and who may use them;
//! - [`protocol`]: the JSON messages of protocol v1 and their stable error codes;
//! - [`store`]: offsets, history and publishing (Redis Lua + streams, or in process);
//! - [`hub`]: this instance's subscribers and their bounded queues;
//! - [`fanout`]: the Redis pub/sub shards every instance listens to;
//! - [`connection`]: one WebSocket session (reading, the batched writer, heartbeats, deadlines);
//!   `resume`: each subscription's position and the delivery rule (history, gaps); `outbox`:
//!   what a session writes next (and the batch frames of clients that opted in);
//! - [`bridge`]: the platform's domain events into channels, and logouts into closes.
//!
//! [`Realtime`] is the handle the rest of the server uses: [`Realtime::publish`] for
//! server-side messages (the admin metrics channel, domain events).

pub mod bridge;
pub mod channel;
pub mod config;
pub mod connection;
pub mod fanout;
pub mod hub;
mod metrics;
mod outbox;
pub mod protocol;
mod queue;
mod resume;
pub mod store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use cascade_core::tasks::Supervisor;
use cascade_http::{ApiError, AppState, ChannelAuthorizer, Module};
use sha2::{Digest, Sha256};

pub use channel::{Channel, Who};
pub use config::{RawRealtimeConfig, RealtimeConfig};
use hub::Hub;
use store::{MemoryStore, RedisStore, Store};

/// Where a published message landed: its channel's epoch and its offset in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offset {
    pub epoch: Arc<str>,
    pub offset: u64,
}

/// What became of a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    /// In the channel's history and on its way to every instance's subscribers.
    Durable(Offset),
    /// Redis could not take it (an error or `REDIS_TIMEOUT`): delivered to this instance's
    /// subscribers only (`"durable": false`, no offset), in no history. When Redis answers
    /// again the channel gets a new epoch, so every other subscriber and every resuming
    /// client is told with a `gap` (reason `degraded`) that it may have missed messages.
    LocalOnly,
}

impl Published {
    pub fn is_durable(&self) -> bool {
        matches!(self, Published::Durable(_))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{0}")]
    BadChannel(String),
    #[error("the payload is {size} bytes; at most {max}")]
    TooLarge { size: usize, max: usize },
}

/// The real-time module's handle: cheap to clone.
#[derive(Clone)]
pub struct Realtime {
    inner: Arc<Inner>,
}

struct Inner {
    config: RealtimeConfig,
    app: AppState,
    store: Store,
    hub: Hub,
    authorizers: HashMap<String, Arc<dyn ChannelAuthorizer>>,
    /// One flag per Redis shard: its subscription is open (empty without Redis).
    listening: Vec<AtomicBool>,
    open: AtomicUsize,
    per_user: Mutex<HashMap<i64, usize>>,
    options: yawc::Options,
    /// `Some` while this instance is degraded: from a publish Redis could not take until
    /// every channel published on only locally meanwhile has a new epoch ([`Realtime::heal`]).
    /// Per channel, how many local publishes (so a channel published on again while its
    /// epoch was being ended is ended once more).
    degraded: Mutex<Option<HashMap<Arc<str>, u64>>>,
    /// Messages this instance has delivered only locally, ever; each local delivery carries
    /// its number, and a subscription notes the count after each history read it makes
    /// (`resume::Sub::local_floor`): a local message at or below it is older than the
    /// epoch that read found.
    local_published: AtomicU64,
}

impl Realtime {
    /// The module's state on top of the platform's. Over Redis when it is configured, else in
    /// process (one instance).
    pub fn new(
        config: RealtimeConfig,
        app: &AppState,
        authorizers: Vec<(&'static str, Arc<dyn ChannelAuthorizer>)>,
    ) -> Realtime {
        let (store, shards) = match &app.redis {
            Some(redis) => (
                Store::Redis(Box::new(RedisStore::new(
                    redis.clone(),
                    &app.config.cache.key_prefix,
                    config.redis_shards,
                ))),
                config.redis_shards,
            ),
            None => (Store::Memory(MemoryStore::default()), 0),
        };
        let mut options = yawc::Options::default()
            .with_max_payload_read(config.max_frame_bytes)
            .with_max_read_buffer(config.max_frame_bytes)
            .with_utf8()
            .with_no_delay()
            .with_read_buffer_capacity(1024)
            .with_write_buffer_capacity(1024);
        if let Some(threshold) = config.compression_threshold {
            // No context takeover either way, and deflate state borrowed from one pool per
            // message: an idle connection holds no compressor (~370 KiB otherwise).
            options = options
                .with_low_latency_compression()
                .server_no_context_takeover()
                .client_no_context_takeover()
                .with_deflate_pool(yawc::DeflatePool::new(16))
                .with_compression_threshold(threshold);
        }
        Realtime {
            inner: Arc::new(Inner {
                config,
                app: app.clone(),
                store,
                hub: Hub::default(),
                authorizers: authorizers
                    .into_iter()
                    .map(|(family, a)| (family.to_string(), a))
                    .collect(),
                listening: (0..shards).map(|_| AtomicBool::new(false)).collect(),
                open: AtomicUsize::new(0),
                per_user: Mutex::new(HashMap::new()),
                options,
                degraded: Mutex::new(None),
                local_published: AtomicU64::new(0),
            }),
        }
    }

    pub fn config(&self) -> &RealtimeConfig {
        &self.inner.config
    }

    /// Publishes `payload` on `channel` from the server: any channel, including those no
    /// client may publish on (`cascade-events`, `user:{id}`, `admin:metrics`). Every
    /// subscriber on every instance receives it once, and it is kept in the channel's history
    /// ([`Published::Durable`]); while Redis cannot take it, only this instance's subscribers
    /// receive it ([`Published::LocalOnly`]).
    pub async fn publish(
        &self,
        channel: &str,
        payload: serde_json::Value,
    ) -> Result<Published, PublishError> {
        let channel = Channel::parse(channel).map_err(PublishError::BadChannel)?;
        let payload = payload.to_string();
        self.publish_text(&channel, &payload).await
    }

    pub(crate) async fn publish_text(
        &self,
        channel: &Channel,
        payload: &str,
    ) -> Result<Published, PublishError> {
        let max = self.inner.config.max_message_bytes;
        if payload.len() > max {
            return Err(PublishError::TooLarge {
                size: payload.len(),
                max,
            });
        }
        let limit = self.inner.config.history_of(channel.family());
        // While degraded, Redis is not tried per publish (each would wait REDIS_TIMEOUT):
        // the heal task finds out when it answers again.
        if !self.degraded() {
            match self
                .inner
                .store
                .publish(channel, payload, limit, &self.inner.hub)
                .await
            {
                Ok((epoch, offset)) => return Ok(Published::Durable(Offset { epoch, offset })),
                Err(err) => {
                    tracing::warn!(channel = %channel, error = %err, "realtime: Redis cannot take publishes; delivering on this instance only until it answers again");
                }
            }
        }
        self.publish_local(channel, payload);
        Ok(Published::LocalOnly)
    }

    fn degraded_state(&self) -> std::sync::MutexGuard<'_, Option<HashMap<Arc<str>, u64>>> {
        self.inner
            .degraded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// How many messages this instance has delivered only locally (see `local_published`).
    pub(crate) fn local_published(&self) -> u64 {
        self.inner.local_published.load(Ordering::SeqCst)
    }

    /// True from a publish Redis could not take until [`heal`](Self::heal) has given every
    /// channel published on meanwhile a new epoch.
    pub fn degraded(&self) -> bool {
        self.degraded_state().is_some()
    }

    /// Delivers to this instance's subscribers only, and remembers the channel for `heal`.
    fn publish_local(&self, channel: &Channel, payload: &str) {
        let frame = protocol::local_message(channel.name(), store::now_ms(), payload);
        // Under the lock: local messages of a channel reach its subscribers in publish order,
        // numbered in that order.
        let mut degraded = self.degraded_state();
        let delivery = Arc::new(store::Delivery {
            channel: channel.shared_name(),
            epoch: Arc::from(""),
            offset: self.inner.local_published.fetch_add(1, Ordering::SeqCst) + 1,
            frame: bytes::Bytes::from(frame),
            durable: false,
        });
        *degraded
            .get_or_insert_with(HashMap::new)
            .entry(channel.shared_name())
            .or_default() += 1;
        self.inner.hub.deliver(delivery);
    }

    /// Ends the degraded period once Redis answers: each channel published on only locally
    /// gets a new epoch (its subscribers everywhere, and clients resuming from before, get a
    /// `gap` with reason `degraded`). Returns true when no channel is left (durable again).
    pub async fn heal(&self) -> bool {
        let Store::Redis(store) = &self.inner.store else {
            return true;
        };
        let pending: Vec<(Arc<str>, u64)> = match &*self.degraded_state() {
            None => return true,
            Some(channels) => channels.iter().map(|(c, n)| (c.clone(), *n)).collect(),
        };
        let mut ended = Vec::new();
        for (channel, n) in pending {
            match store.rotate(&channel).await {
                Ok(()) => ended.push((channel, n)),
                Err(err) => {
                    tracing::debug!(error = %err, "realtime: still degraded");
                    break;
                }
            }
        }
        let mut degraded = self.degraded_state();
        let Some(channels) = degraded.as_mut() else {
            return true;
        };
        for (channel, n) in ended {
            // Published on locally again meanwhile: that message is after the new epoch began.
            if channels.get(&channel) == Some(&n) {
                channels.remove(&channel);
            }
        }
        if channels.is_empty() {
            *degraded = None;
            tracing::info!("realtime: Redis answers again; publishes are durable again");
            return true;
        }
        false
    }

    /// Open WebSocket connections on this instance.
    pub fn connections(&self) -> usize {
        self.inner.open.load(Ordering::Relaxed)
    }

    /// True when every Redis shard's subscription is open (always true without Redis): a
    /// message published anywhere from now on reaches this instance's subscribers.
    pub fn listening(&self) -> bool {
        self.inner
            .listening
            .iter()
            .all(|l| l.load(Ordering::SeqCst))
    }

    /// `GET /ws`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/ws", get(upgrade))
            .with_state(self.clone())
    }

    /// Waits (at most `bound`) for the shard that carries `channel` to be subscribed.
    async fn shard_ready(&self, channel: &str, bound: Duration) -> bool {
        let Store::Redis(store) = &self.inner.store else {
            return true;
        };
        let flag = &self.inner.listening[store.shard_of(channel)];
        let deadline = tokio::time::Instant::now() + bound;
        while !flag.load(Ordering::SeqCst) {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Who presents `token`: the operator (`ADMIN_TOKEN`) or an account (its access token).
    async fn identify(
        &self,
        token: &str,
    ) -> Result<(Who, Option<cascade_core::identity::Principal>), ApiError> {
        if let Some(expected) = &self.inner.app.config.http.admin_token {
            // Digests compared, as `/health/db` does: the time taken says nothing of the token.
            if Sha256::digest(token.as_bytes())
                == Sha256::digest(expected.expose().trim().as_bytes())
            {
                return Ok((Who::Admin, None));
            }
        }
        let principal = self.inner.app.identity.authenticate(token).await?;
        Ok((
            Who::User {
                user_id: principal.user_id,
            },
            Some(principal),
        ))
    }

    /// Takes a place for a connection of `user` (None: not known yet); false when full.
    fn admit(&self, user: Option<i64>) -> bool {
        self.count_user(user, |n, max| {
            let admitted = *n < max;
            *n += usize::from(admitted);
            admitted
        })
    }

    fn release(&self, user: Option<i64>) {
        self.count_user(user, |n, _| {
            *n = n.saturating_sub(1);
            true
        });
    }

    /// Applies `change` to `user`'s connection count (forgotten at zero); true without a user.
    fn count_user(
        &self,
        user: Option<i64>,
        change: impl FnOnce(&mut usize, usize) -> bool,
    ) -> bool {
        let Some(user) = user else {
            return true;
        };
        let mut per_user = self
            .inner
            .per_user
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let n = per_user.entry(user).or_default();
        let done = change(n, self.inner.config.max_per_user);
        if *n == 0 {
            per_user.remove(&user);
        }
        done
    }
}

/// Holds one of the instance's places (and one of the user's) for a connection's life.
pub(crate) struct Place {
    realtime: Realtime,
    user: Option<i64>,
    _gauge: cascade_core::metrics::WsConnectionGuard,
}

impl Place {
    /// Moves the user's count to `user` (a connection authenticated by its first message);
    /// false when that account has no place left.
    pub(crate) fn assign(&mut self, user: i64) -> bool {
        if self.user == Some(user) {
            return true;
        }
        if !self.realtime.admit(Some(user)) {
            return false;
        }
        self.realtime.release(self.user.take());
        self.user = Some(user);
        true
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.realtime.inner.open.fetch_sub(1, Ordering::Relaxed);
        self.realtime.release(self.user);
    }
}

fn unavailable(message: &str) -> Response {
    ApiError::Unavailable {
        message: message.to_string(),
        retry_after: Duration::from_secs(5),
    }
    .into_response()
}

/// The WebSocket endpoint. Authenticates with `Authorization: Bearer <access token or
/// ADMIN_TOKEN>` or, without the header, by a first `auth` message within `WS_AUTH_TIMEOUT`.
/// The protocol is in README.md, "Real-time protocol".
#[utoipa::path(get, path = "/ws", tag = "realtime", security((), ("bearer" = [])),
    params(("batch" = Option<bool>, Query, description = "1 (or true): messages queued together arrive as one `batch` frame; default one message per frame")),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol v1"),
        (status = 400, description = "Not a WebSocket upgrade request, or `batch` is neither 0/false nor 1/true"),
        (status = 401, description = "The bearer token is not valid"),
        (status = 503, description = "This instance (WS_MAX_CONNECTIONS) or this account (WS_MAX_CONNECTIONS_PER_USER) has no connection left; retry after Retry-After")
    )
)]
async fn upgrade(
    State(rt): State<Realtime>,
    headers: HeaderMap,
    query: Result<Query<WsParams>, QueryRejection>,
    incoming: Result<yawc::IncomingUpgrade, StatusCode>,
) -> Response {
    let inner = &rt.inner;
    let batch = match query
        .map_err(|_| batch_error())
        .and_then(|q| parse_batch(q.0.batch.as_deref()))
    {
        Ok(batch) => batch,
        Err(err) => return err.into_response(),
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(|v| match v.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
            _ => "",
        });
    let (who, principal) = match token {
        None => (None, None),
        Some(token) => match rt.identify(token).await {
            Ok((who, principal)) => (Some(who), principal),
            Err(err) => {
                metrics::rejected("unauthorized");
                return err.into_response();
            }
        },
    };
    let Ok(incoming) = incoming else {
        return ApiError::BadRequest {
            field: None,
            message: "GET /ws is a WebSocket endpoint: send an upgrade request (Connection: Upgrade, Upgrade: websocket, Sec-WebSocket-Version: 13, Sec-WebSocket-Key)".into(),
        }
        .into_response();
    };
    if inner.open.fetch_add(1, Ordering::Relaxed) >= inner.config.max_connections {
        inner.open.fetch_sub(1, Ordering::Relaxed);
        metrics::rejected("instance_full");
        return unavailable(
            "this instance holds WS_MAX_CONNECTIONS WebSocket connections; retry later or elsewhere",
        );
    }
    let user = principal.as_ref().map(|p| p.user_id);
    if !rt.admit(user) {
        inner.open.fetch_sub(1, Ordering::Relaxed);
        metrics::rejected("user_full");
        return unavailable(
            "this account holds WS_MAX_CONNECTIONS_PER_USER WebSocket connections on this instance",
        );
    }
    let place = Place {
        realtime: rt.clone(),
        user,
        _gauge: cascade_core::metrics::WsConnectionGuard::open(),
    };
    let (response, socket) = match incoming.upgrade(inner.options.clone()) {
        Ok(upgraded) => upgraded,
        Err(err) => {
            return ApiError::BadRequest {
                field: None,
                message: format!("WebSocket handshake: {err}"),
            }
            .into_response();
        }
    };
    let session = connection::Session::new(rt.clone(), place, who, principal, batch);
    tokio::spawn(session.run(Box::pin(socket)));
    response.map(axum::body::Body::new)
}

/// The query of `GET /ws` (other parameters are ignored).
#[derive(serde::Deserialize)]
struct WsParams {
    batch: Option<String>,
}

/// `?batch=1` (or `true`, any case, percent-encoded or not): the client takes messages
/// queued together as one `batch` frame (README, "Real-time protocol"); `0` or `false`, or
/// no `batch`, one message per frame. Anything else (an empty value, `batch` twice) is a 400
/// naming it.
fn parse_batch(value: Option<&str>) -> Result<bool, ApiError> {
    match value {
        None => Ok(false),
        Some(v) if v == "1" || v.eq_ignore_ascii_case("true") => Ok(true),
        Some(v) if v == "0" || v.eq_ignore_ascii_case("false") => Ok(false),
        Some(_) => Err(batch_error()),
    }
}

fn batch_error() -> ApiError {
    ApiError::bad_request(
        "batch",
        "batch is 1 (or true) to receive messages queued together in one frame, 0 (or false) for one message per frame",
    )
}

#[derive(utoipa::OpenApi)]
#[openapi(paths(upgrade))]
struct RealtimeApi;

/// The module the server composes.
pub struct RealtimeModule {
    realtime: Realtime,
}

impl RealtimeModule {
    pub fn new(realtime: Realtime) -> Self {
        RealtimeModule { realtime }
    }
}

impl Module for RealtimeModule {
    fn name(&self) -> &'static str {
        "realtime"
    }

    fn router(&self, _state: &AppState) -> Router {
        self.realtime.router()
    }

    fn openapi(&self) -> utoipa::openapi::OpenApi {
        <RealtimeApi as utoipa::OpenApi>::openapi()
    }

    fn start_tasks(&self, _state: &AppState, tasks: &mut Supervisor) {
        fanout::start(&self.realtime, tasks);
        let rt = self.realtime.clone();
        tasks.spawn("realtime-events", move |stop| bridge::run(rt, stop));
    }
}
