//! One WebSocket session: its task reads client frames, drains its queue into the socket
//! (everything queued goes out in one flush), sends pings, and enforces its deadlines (the
//! first `auth`, the access token's expiry, idleness).
//!
//! What each subscription has been given, and what it gets next, is [`resume`](crate::resume).

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cascade_core::identity::Principal;
use futures_util::{FutureExt, SinkExt};
use serde_json::{Value, json};
use tokio::time::Instant;
use yawc::close::CloseCode;
use yawc::{Frame, HttpWebSocket, OpCode};

use crate::channel::{Channel, Rule, Who};
use crate::hub::{CloseOrder, ConnHandle, Outbound};
use crate::outbox::Outbox;
use crate::protocol::{self, ClientMessage, Code, ProtocolError, Since};
use crate::resume::{self, Sub};
use crate::{Place, Realtime, metrics};

/// Capacity the list of taken queue items keeps between bursts.
const IDLE_KEEP: usize = 4;
/// Most queued items taken per writer round (one flush).
const BATCH: usize = 256;
/// Queue rounds in a row after which the socket is read first (a client's own frames are
/// not starved by a busy channel).
const FAIR_ROUNDS: u32 = 4;
/// First and longest wait before reading a channel's history again after a failed resync.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// A subscribe waits at most this long for its Redis shard to be listening.
const SHARD_WAIT: Duration = Duration::from_secs(2);
/// Writing the final frames of a closing connection (a client that does not read cannot
/// hold the task).
const CLOSE_WRITE: Duration = Duration::from_secs(1);

/// Why the session ended (the `reason` label of `cascade_ws_closes_total`).
enum End {
    Client,
    Order(CloseOrder),
    Close(u16, &'static str, &'static str),
    /// Reading failed; the library may owe the client a close frame.
    Read(&'static str),
    /// A write did not finish within `WS_WRITE_TIMEOUT`: the client stopped reading.
    Stalled,
    Broken,
}

pub struct Session {
    rt: Realtime,
    place: Place,
    who: Option<Who>,
    session_id: Option<uuid::Uuid>,
    /// The access token's id (revoking that token closes the connection).
    jti: Option<uuid::Uuid>,
    /// When the access token expires (a fresh `auth` moves it).
    expires: Option<Instant>,
    subs: HashMap<Arc<str>, Sub>,
    /// Publishes this connection may still send now (a token bucket refilled at
    /// `WS_PUBLISH_RATE` per second, holding at most that many), and when it was refilled.
    publish_tokens: (f64, Instant),
    /// Channels whose history could not be read after their Redis shard came back, or after
    /// a message of another epoch (`Sub::unread`), retried at `retry_at`
    /// ([`Session::retry_resyncs`]).
    retry: HashSet<Arc<str>>,
    retry_at: Option<Instant>,
    retry_backoff: Duration,
    /// This connection in the hub, forgotten with every subscription when the session is
    /// dropped (also when its task panics: nothing leaks in the hub).
    handle: Option<Arc<ConnHandle>>,
    /// The client asked for batches (`GET /ws?batch=1`): the most bytes of one batch frame
    /// (`WS_MAX_MESSAGE_BYTES`, announced in `hello`). `None`: one message per frame.
    batch: Option<usize>,
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            self.rt
                .inner
                .hub
                .disconnect(&handle, self.subs.keys().cloned());
        }
    }
}

impl Session {
    pub(crate) fn new(
        rt: Realtime,
        place: Place,
        who: Option<Who>,
        principal: Option<Principal>,
        batch: bool,
    ) -> Session {
        let batch = batch.then_some(rt.inner.config.max_message_bytes);
        let publish_tokens = (rt.inner.config.publish_rate as f64, Instant::now());
        let mut session = Session {
            rt,
            place,
            who,
            session_id: None,
            jti: None,
            publish_tokens,
            retry: HashSet::new(),
            retry_at: None,
            retry_backoff: RETRY_FIRST,
            expires: None,
            subs: HashMap::new(),
            handle: None,
            batch,
        };
        if let Some(principal) = principal {
            session.adopt(&principal);
        }
        session
    }

    fn adopt(&mut self, principal: &Principal) {
        self.session_id = Some(principal.session_id);
        self.jti = Some(principal.jti);
        self.expires = Some(expiry(principal.token_exp));
    }

    /// The session, from the end of the upgrade to the close. One function (not the upgrade
    /// awaited by a wrapper that then calls it): a future keeps the storage of what it moved
    /// out, so a wrapper would hold the session twice for the connection's life.
    ///
    /// The upgrade comes boxed for the same reason: what it holds is freed once it is done,
    /// where a future parameter would keep its bytes in the task for the connection's life.
    pub(crate) async fn run(mut self, socket: Pin<Box<yawc::UpgradeFut>>) {
        let mut ws = match socket.await {
            Ok(ws) => ws,
            Err(err) => {
                tracing::debug!(error = %err, "WebSocket upgrade did not complete");
                return;
            }
        };
        let rt = self.rt.clone();
        let config = &rt.inner.config;
        let handle = self.rt.inner.hub.connect(config.queue_size);
        self.handle = Some(handle.clone());
        handle.set_session(self.session_id);
        handle.set_jti(self.jti);
        handle.set_user(self.user_id());
        let auth_deadline = self
            .who
            .is_none()
            .then(|| Instant::now() + config.auth_timeout);
        let mut out = Outbox::default();
        out.text(self.hello());
        // One timer for every deadline (a `Sleep` is ~100 bytes of the task, an `Interval` one
        // more on the heap): the next ping, the auth or token deadline, a delayed write, a
        // resync retry; whichever is due is handled when it fires.
        let mut next_ping = Instant::now() + config.ping_interval;
        let mut heard = Instant::now();
        let mut batch: Vec<Outbound> = Vec::new();
        // Queue rounds in a row: the biased select takes the queue before the socket, so on
        // a busy channel the client's own frames wait; every FAIR_ROUNDS, one is read first.
        let mut queue_rounds = 0u32;
        // When the last write went out: the next waits until `WS_WRITE_DELAY` after it, and
        // the queue is not read meanwhile (no wake-up per message), so what a busy channel
        // queues in that time leaves in one flush, one system call, instead of one each.
        let mut last_write: Option<Instant> = None;
        let end = loop {
            let mut flush_at = None;
            if !out.is_empty() {
                match last_write.map(|at| at + config.write_delay) {
                    Some(at) if at > Instant::now() => flush_at = Some(at),
                    _ => {
                        if last_write.is_some() {
                            // Everything that queued while the write waited goes out with it
                            // (not one batch: the queue was not read for a whole delay).
                            let mut taken = 0;
                            while taken < config.queue_size {
                                let n = handle.queue.take(&mut batch, BATCH);
                                if n == 0 {
                                    break;
                                }
                                taken += n;
                                metrics::dequeued(n);
                                for item in batch.drain(..) {
                                    self.outbound(item, &mut out).await;
                                }
                            }
                            batch.shrink_to(IDLE_KEEP);
                        }
                        match write(&mut ws, &mut out, self.batch, &handle, config.write_timeout)
                            .await
                        {
                            // An idle connection keeps no list of what it wrote (memory per
                            // idle connection is what bounds how many an instance holds; an
                            // allocation per write is cheap beside the write).
                            Ok(()) => out.reset(0),
                            Err(end) => break end,
                        }
                        if !config.write_delay.is_zero() {
                            last_write = Some(Instant::now());
                        }
                    }
                }
            }
            if queue_rounds >= FAIR_ROUNDS {
                queue_rounds = 0;
                if let Some(frame) = ws.next_frame().now_or_never() {
                    heard = Instant::now();
                    match Box::pin(self.on_frame(frame, &handle, &mut out)).await {
                        Some(end) => break end,
                        None => continue,
                    }
                }
            }
            let deadline = match (self.who.is_none(), auth_deadline, self.expires) {
                (true, Some(at), _) => Some((at, "auth_timeout", "no auth message in time")),
                (false, _, Some(at)) => Some((
                    at,
                    "expired",
                    "the access token expired; send auth with a fresh one before it does",
                )),
                _ => None,
            };
            let timer = [deadline.map(|d| d.0), flush_at, self.retry_at]
                .into_iter()
                .flatten()
                .fold(next_ping, Instant::min);
            tokio::select! {
                biased;
                () = handle.wake.notified() => {
                    if let Some(order) = handle.take_order() {
                        break End::Order(order);
                    }
                }
                () = tokio::time::sleep_until(timer) => {
                    let now = Instant::now();
                    if let Some((at, label, reason)) = deadline
                        && at <= now
                    {
                        break End::Close(4001, label, reason);
                    }
                    if self.retry_at.is_some_and(|at| at <= now) {
                        self.retry_resyncs(&mut out).await;
                    }
                    if next_ping <= now {
                        if heard.elapsed() >= config.idle_timeout {
                            break End::Close(1001, "idle", "idle timeout: no frame (not even a pong) received");
                        }
                        out.push(Frame::ping(Bytes::new()));
                        next_ping = now + config.ping_interval;
                    }
                    // A delayed write is made at the top of the loop once `flush_at` passed.
                }
                n = handle.queue.recv_many(&mut batch, BATCH), if flush_at.is_none() => {
                    metrics::dequeued(n);
                    queue_rounds += 1;
                    for item in batch.drain(..) {
                        self.outbound(item, &mut out).await;
                    }
                    batch.shrink_to(IDLE_KEEP);
                }
                frame = ws.next_frame() => {
                    queue_rounds = 0;
                    heard = Instant::now();
                    if let Some(end) = Box::pin(self.on_frame(frame, &handle, &mut out)).await {
                        break end;
                    }
                }
            }
        };
        // Whatever was answered before the end still goes out first.
        let (label, close) = match end {
            End::Client => ("client", None),
            End::Broken => ("error", None),
            End::Stalled => ("write_timeout", None),
            End::Read(label) => {
                let _ = tokio::time::timeout(CLOSE_WRITE, ws.flush()).await;
                (label, None)
            }
            End::Order(order) => {
                let label = match order.code {
                    1013 => "queue_full",
                    1001 => "shutdown",
                    4001 => "unauthorized",
                    _ => "server",
                };
                if order.reconnect {
                    out.text(json!({"type": "reconnect", "reason": order.reason}).to_string());
                }
                (label, Some((order.code, order.reason)))
            }
            End::Close(code, label, reason) => (label, Some((code, reason))),
        };
        metrics::closed(label);
        // Nothing is queued for it any more, and what was is not written. Before the final
        // write, which may take CLOSE_WRITE: a busy channel would otherwise fill the queue of
        // a closing connection meanwhile and count its messages as dropped (`queue_full`).
        metrics::dequeued(handle.queue.close());
        if let Some((code, reason)) = close {
            if label == "queue_full" {
                // The queued messages are not written: the client resumes from history.
                out.clear();
            }
            out.push(Frame::close(CloseCode::from(code), reason));
            let _ = tokio::time::timeout(CLOSE_WRITE, feed_all(&mut ws, &out, self.batch)).await;
        }
        // Dropping `self` forgets the connection in the hub and frees its place.
    }

    fn user_id(&self) -> Option<i64> {
        match self.who {
            Some(Who::User { user_id }) => Some(user_id),
            _ => None,
        }
    }

    fn hello(&self) -> String {
        let config = &self.rt.inner.config;
        let mut hello = json!({
            "type": "hello",
            "version": protocol::VERSION,
            "authenticated": self.who.is_some(),
            "user_id": match &self.who { Some(Who::User { user_id }) => json!(user_id), _ => Value::Null },
            "admin": matches!(self.who, Some(Who::Admin)),
            "ping_interval_ms": config.ping_interval.as_millis() as u64,
            "max_message_bytes": config.max_message_bytes,
            "max_channels": config.max_channels,
        });
        // Only for a client that asked: the others see the hello they always did.
        if self.batch.is_some() {
            hello["batch"] = json!(true);
        }
        hello.to_string()
    }

    /// What reading the socket gave; `Some` ends the session.
    async fn on_frame(
        &mut self,
        frame: Result<Frame, yawc::WebSocketError>,
        handle: &Arc<ConnHandle>,
        out: &mut Outbox,
    ) -> Option<End> {
        match frame {
            Ok(frame) => self.inbound(frame, handle, out).await,
            // yawc queued the close it owes (1009 past WS_MAX_FRAME_BYTES, 1002 for a
            // protocol error): flushed at the end.
            Err(yawc::WebSocketError::FrameTooLarge) => Some(End::Read("too_large")),
            Err(yawc::WebSocketError::ConnectionClosed) => Some(End::Client),
            Err(_) => Some(End::Read("error")),
        }
    }

    /// Reads `channel`'s history again at the next retry ([`Session::retry_resyncs`]).
    fn retry_later(&mut self, channel: Arc<str>) {
        self.retry.insert(channel);
        if self.retry_at.is_none() {
            self.retry_at = Some(Instant::now() + self.retry_backoff);
        }
    }

    /// Reads the history again for the channels whose resync, or read for a message of
    /// another epoch, could not (Redis did not answer): those still failing are tried again
    /// later, backing off up to [`RETRY_MAX`]. Nothing is lost meanwhile: the subscription's
    /// position stays, and a live message after a hole reads the history too.
    async fn retry_resyncs(&mut self, out: &mut Outbox) {
        for channel in std::mem::take(&mut self.retry) {
            if let Some(sub) = self.subs.get_mut(&channel)
                && resume::catch_up(&self.rt, sub, out).await.is_err()
            {
                self.retry.insert(channel);
            }
        }
        if self.retry.is_empty() {
            self.retry_at = None;
            self.retry_backoff = RETRY_FIRST;
        } else {
            self.retry_backoff = (self.retry_backoff * 2).min(RETRY_MAX);
            self.retry_at = Some(Instant::now() + self.retry_backoff);
        }
    }

    /// One frame from the client; `Some` ends the session.
    async fn inbound(
        &mut self,
        frame: Frame,
        handle: &Arc<ConnHandle>,
        out: &mut Outbox,
    ) -> Option<End> {
        match frame.opcode() {
            OpCode::Text => {}
            OpCode::Binary => {
                metrics::received();
                out.push(error(ProtocolError::new(
                    Code::BinaryUnsupported,
                    "binary frames are not part of the protocol: send JSON text",
                )));
                return None;
            }
            OpCode::Close => return Some(End::Client),
            _ => return None,
        }
        metrics::received();
        let max = self.rt.inner.config.max_message_bytes;
        if frame.payload().len() > max {
            out.push(error(ProtocolError::new(
                Code::TooLarge,
                format!("a message has at most {max} bytes (WS_MAX_MESSAGE_BYTES)"),
            )));
            return None;
        }
        let Ok(text) = std::str::from_utf8(frame.payload()) else {
            out.push(error(ProtocolError::new(Code::BadJson, "not UTF-8")));
            return None;
        };
        let message = match protocol::parse(text) {
            Ok(message) => message,
            Err(err) => {
                out.push(error(err));
                return None;
            }
        };
        if let ClientMessage::Auth { token, id } = message {
            return self.authenticate(&token, &id, handle, out).await;
        }
        let Some(who) = self.who.clone() else {
            out.push(error(
                ProtocolError::new(
                    Code::Unauthorized,
                    "authenticate first: {\"type\":\"auth\",\"token\":...}",
                )
                .with_id(message.id()),
            ));
            return None;
        };
        let answer = match message {
            ClientMessage::Subscribe { channel, since, id } => {
                match self
                    .subscribe(&who, &channel, since, &id, handle, out)
                    .await
                {
                    Ok(()) => return None,
                    Err(err) => Err(err.with_id(&id)),
                }
            }
            ClientMessage::Unsubscribe { channel, id } => {
                match self.subs.remove(channel.as_str()) {
                    Some(sub) => {
                        self.rt.inner.hub.unsubscribe(sub.channel.name(), handle.id);
                        Ok(protocol::ack(&id, json!({"channel": channel})))
                    }
                    None => Err(ProtocolError::new(
                        Code::NotSubscribed,
                        format!("not subscribed to {channel:?}"),
                    )
                    .with_id(&id)),
                }
            }
            ClientMessage::Publish {
                channel,
                payload,
                id,
            } => self
                .publish(&who, &channel, &payload)
                .await
                .map_err(|e| e.with_id(&id))
                .map(|ack| protocol::ack(&id, ack)),
            ClientMessage::Ping { id } => {
                let mut pong = json!({"type": "pong"});
                if let Some(id) = id {
                    pong["id"] = id;
                }
                Ok(pong.to_string())
            }
            ClientMessage::Auth { .. } => return None,
        };
        out.push(match answer {
            Ok(text) => Frame::text(text),
            Err(err) => error(err),
        });
        None
    }

    async fn authenticate(
        &mut self,
        token: &str,
        id: &Option<Value>,
        handle: &Arc<ConnHandle>,
        out: &mut Outbox,
    ) -> Option<End> {
        let (who, principal) = match self.rt.identify(token).await {
            Ok(found) => found,
            Err(_) => {
                return Some(End::Close(4001, "unauthorized", "the token is not valid"));
            }
        };
        if self.who.as_ref().is_some_and(|current| *current != who) {
            out.push(error(
                ProtocolError::new(
                    Code::Forbidden,
                    "a connection stays with the account it authenticated as",
                )
                .with_id(id),
            ));
            return None;
        }
        if let Who::User { user_id } = who
            && !self.place.assign(user_id)
        {
            metrics::rejected("user_full");
            return Some(End::Close(
                1013,
                "user_full",
                "this account holds WS_MAX_CONNECTIONS_PER_USER connections on this instance",
            ));
        }
        if let Some(principal) = &principal {
            self.adopt(principal);
        } else {
            self.expires = None;
        }
        handle.set_session(self.session_id);
        handle.set_jti(self.jti);
        let ack = json!({
            "user_id": principal.as_ref().map(|p| p.user_id),
            "admin": who == Who::Admin,
            "expires_at": principal.as_ref().map(|p| p.token_exp),
        });
        self.who = Some(who);
        handle.set_user(self.user_id());
        out.text(protocol::ack(id, ack));
        None
    }

    async fn authorize(
        &self,
        who: &Who,
        channel: &Channel,
        rule: Rule,
    ) -> Result<(), ProtocolError> {
        let forbidden = || {
            ProtocolError::new(
                Code::Forbidden,
                format!("{channel} is not open to this connection for that"),
            )
        };
        match rule {
            Rule::Allow => Ok(()),
            Rule::Deny => Err(forbidden()),
            Rule::AskModule => {
                let (Who::User { user_id }, Some(id)) = (who, channel.space_id()) else {
                    return Err(forbidden());
                };
                let Some(authorizer) = self.rt.inner.authorizers.get(channel.family()) else {
                    return Err(forbidden());
                };
                match authorizer.allows(&self.rt.inner.app, *user_id, id).await {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(ProtocolError::new(
                        Code::Forbidden,
                        format!("{channel} is for the space's participants"),
                    )),
                    Err(err) => {
                        tracing::warn!(error = %err, "realtime: channel authorization failed");
                        Err(ProtocolError::new(
                            Code::Unavailable,
                            "cannot check the channel's participants right now; retry",
                        ))
                    }
                }
            }
        }
    }

    async fn subscribe(
        &mut self,
        who: &Who,
        name: &str,
        since: Option<Since>,
        id: &Option<Value>,
        handle: &Arc<ConnHandle>,
        out: &mut Outbox,
    ) -> Result<(), ProtocolError> {
        let channel = Channel::parse(name).map_err(|e| ProtocolError::new(Code::BadChannel, e))?;
        if let Some(sub) = self.subs.get(name) {
            let ack = json!({"channel": name, "epoch": sub.epoch.as_deref(), "offset": sub.last, "already": true});
            out.text(protocol::ack(id, ack));
            return Ok(());
        }
        if let Some(Since {
            offset,
            epoch: None,
        }) = &since
            && *offset > 0
        {
            return Err(ProtocolError::new(
                Code::BadRequest,
                "since: an offset belongs to an epoch (epoch null goes with offset 0)",
            ));
        }
        let max = self.rt.inner.config.max_channels;
        if self.subs.len() >= max {
            return Err(ProtocolError::new(
                Code::TooManyChannels,
                format!("a connection subscribes to at most {max} channels (WS_MAX_CHANNELS)"),
            ));
        }
        self.authorize(who, &channel, who.may_read(&channel))
            .await?;
        let unavailable = |_| {
            ProtocolError::new(
                Code::Unavailable,
                "the channel's history cannot be reached right now; retry",
            )
        };
        if !self.rt.shard_ready(name, SHARD_WAIT).await {
            return Err(unavailable(()));
        }
        // Live delivery first (queued until this task reads it), then the history: nothing
        // published in between is missed, the offsets drop what arrives twice, and a local
        // message queued meanwhile does not end the epoch the read finds (`Sub::local_floor`).
        self.rt.inner.hub.subscribe(channel.shared_name(), handle);
        let mut sub = Sub {
            channel,
            epoch: since
                .as_ref()
                .and_then(|s| s.epoch.as_deref())
                .map(Arc::from),
            last: since.as_ref().map_or(0, |s| s.offset),
            degraded: false,
            local_floor: 0,
            unread: false,
        };
        let mut history = Outbox::default();
        let head = match since {
            Some(_) => resume::catch_up(&self.rt, &mut sub, &mut history).await,
            None => self.rt.inner.store.read(name, 0, 0, 0).await.map(|h| {
                sub.epoch = h.epoch;
                sub.last = h.head;
                sub.local_floor = self.rt.local_published();
                h.head
            }),
        };
        let head = match head {
            Ok(head) => head,
            Err(err) => {
                self.rt.inner.hub.unsubscribe(name, handle.id);
                tracing::debug!(error = %err, "realtime: subscribe without history");
                return Err(unavailable(()));
            }
        };
        out.text(protocol::ack(
            id,
            json!({"channel": name, "epoch": sub.epoch.as_deref(), "offset": head}),
        ));
        out.append(&mut history);
        self.subs.insert(sub.channel.shared_name(), sub);
        Ok(())
    }

    async fn publish(
        &mut self,
        who: &Who,
        name: &str,
        payload: &Value,
    ) -> Result<Value, ProtocolError> {
        let rate = self.rt.inner.config.publish_rate as f64;
        let (tokens, at) = &mut self.publish_tokens;
        *tokens = (*tokens + at.elapsed().as_secs_f64() * rate).min(rate);
        *at = Instant::now();
        if *tokens < 1.0 {
            return Err(ProtocolError::new(
                Code::RateLimited,
                format!("at most {rate} publishes per second per connection (WS_PUBLISH_RATE)"),
            ));
        }
        *tokens -= 1.0;
        let channel = Channel::parse(name).map_err(|e| ProtocolError::new(Code::BadChannel, e))?;
        self.authorize(who, &channel, who.may_publish(&channel))
            .await?;
        let text = payload.to_string();
        match self.rt.publish_text(&channel, &text).await {
            Ok(crate::Published::Durable(at)) => Ok(
                json!({"channel": name, "epoch": &*at.epoch, "offset": at.offset, "durable": true}),
            ),
            // Delivered on this instance only: in no history, so no position.
            Ok(crate::Published::LocalOnly) => {
                Ok(json!({"channel": name, "epoch": null, "offset": null, "durable": false}))
            }
            Err(crate::PublishError::TooLarge { max, .. }) => Err(ProtocolError::new(
                Code::TooLarge,
                format!("a payload has at most {max} bytes"),
            )),
            Err(err) => Err(ProtocolError::new(Code::BadChannel, err.to_string())),
        }
    }

    async fn outbound(&mut self, item: Outbound, out: &mut Outbox) {
        match item {
            Outbound::Message(delivery) => {
                if let Some(sub) = self.subs.get_mut(&delivery.channel)
                    && let Err(err) = resume::deliver(&self.rt, sub, &delivery, out).await
                {
                    tracing::debug!(error = %err, channel = %delivery.channel, "realtime: history read for another epoch failed; retrying");
                    self.retry_later(delivery.channel.clone());
                }
            }
            Outbound::Revoked(channel) => {
                if let Some(sub) = self.subs.remove(&channel) {
                    out.text(protocol::unsubscribed(
                        sub.channel.name(),
                        Code::Forbidden,
                        "no longer a participant of this space (left, removed, or the space closed)",
                    ));
                }
            }
            Outbound::Resync(channel) => {
                if let Some(sub) = self.subs.get_mut(&channel)
                    && let Err(err) = resume::catch_up(&self.rt, sub, out).await
                {
                    tracing::debug!(error = %err, %channel, "realtime: resync failed; retrying");
                    self.retry_later(channel);
                }
            }
        }
    }
}

/// Writes `out` in one flush, unless an order (overflow, logout, shutdown) arrives first or
/// the client does not take it within `timeout` (`WS_WRITE_TIMEOUT`).
async fn write(
    ws: &mut HttpWebSocket,
    out: &mut Outbox,
    batch: Option<usize>,
    handle: &ConnHandle,
    timeout: Duration,
) -> Result<(), End> {
    let n = out.len();
    let written = feed_all(ws, out, batch);
    let result = tokio::select! {
        written = tokio::time::timeout(timeout, written) => match written {
            Ok(Ok(())) => {
                metrics::sent(n);
                Ok(())
            }
            Ok(Err(_)) => Err(End::Broken),
            Err(_) => Err(End::Stalled),
        },
        () = handle.wake.notified() => match handle.take_order() {
            Some(order) => Err(End::Order(order)),
            None => Ok(()),
        },
    };
    out.clear();
    result
}

/// Writes every frame of `out` (its messages in batch frames when `batch` is set) and flushes.
async fn feed_all(
    ws: &mut HttpWebSocket,
    out: &Outbox,
    batch: Option<usize>,
) -> Result<(), yawc::WebSocketError> {
    let mut at = 0;
    while let Some(frame) = out.frame_at(&mut at, batch) {
        ws.feed(frame).await?;
    }
    ws.flush().await
}

fn error(err: ProtocolError) -> Frame {
    Frame::text(err.frame())
}

/// The instant of a token's `exp` (seconds since the epoch).
fn expiry(exp: u64) -> Instant {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Instant::now() + Duration::from_secs(exp.saturating_sub(now))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn future_size<A, B, F: std::future::Future>(_: impl FnOnce(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A connection's task is allocated whole for its life, so what only a request or a
    /// history read needs (their Redis futures) is boxed while it runs, not carried by every
    /// idle connection.
    #[test]
    fn a_connection_task_is_small() {
        let size = future_size(Session::run);
        assert!(size <= 2048, "Session::run is a future of {size} bytes");
    }
}
