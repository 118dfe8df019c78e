//! This instance's subscribers: which connections listen to which channel, and the handle
//! through which anything (a delivery, a revocation, shutdown) reaches a connection.
//!
//! Delivery never waits: a message is offered to each subscriber's bounded queue
//! (`WS_QUEUE_SIZE`, `queue.rs`); a full queue closes that connection (1013) and no
//! other, so one slow client costs the others nothing and memory stays bounded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::Notify;
use uuid::Uuid;

use crate::metrics;
use crate::queue::{Offer, Queue};
use crate::store::Delivery;

/// What a connection's queue carries.
#[derive(Debug)]
pub enum Outbound {
    Message(Arc<Delivery>),
    /// The instance's subscription for this channel was re-established: messages may have
    /// been missed meanwhile, read the history.
    Resync(Arc<str>),
    /// The connection may no longer read this channel (its account left the space, or the
    /// space closed): its subscription ends, and the client is told.
    Revoked(Arc<str>),
}

/// Why a connection is being closed from outside its task.
#[derive(Debug, Clone)]
pub struct CloseOrder {
    pub code: u16,
    pub reason: &'static str,
    /// Send a `reconnect` message first (shutdown).
    pub reconnect: bool,
}

/// One connection, as the hub and the rest of the instance see it.
pub struct ConnHandle {
    pub id: u64,
    /// What its task has yet to write (`WS_QUEUE_SIZE` at most).
    pub(crate) queue: Queue,
    order: Mutex<Option<CloseOrder>>,
    /// Wakes the connection's task for an order (a stored permit if it is busy).
    pub wake: Notify,
    /// The login session it authenticated with (revoking the session closes it).
    session: Mutex<Option<Uuid>>,
    /// The access token it authenticated with (its `jti`; revoking the token closes it).
    jti: Mutex<Option<Uuid>>,
    /// The account it authenticated as (0: none, or the operator).
    user: AtomicI64,
}

impl ConnHandle {
    /// Closes the connection with `order` (the first order wins).
    pub fn close(&self, order: CloseOrder) {
        let mut slot = self.order.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(order);
        }
        drop(slot);
        self.wake.notify_one();
    }

    pub fn take_order(&self) -> Option<CloseOrder> {
        self.order.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_session(&self, session: Option<Uuid>) {
        *self.session.lock().unwrap_or_else(|p| p.into_inner()) = session;
    }

    pub fn set_jti(&self, jti: Option<Uuid>) {
        *self.jti.lock().unwrap_or_else(|p| p.into_inner()) = jti;
    }

    fn jti(&self) -> Option<Uuid> {
        *self.jti.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_user(&self, user: Option<i64>) {
        self.user.store(user.unwrap_or(0), Ordering::Relaxed);
    }

    fn session(&self) -> Option<Uuid> {
        *self.session.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Offers `item` to the queue; a full queue closes the connection. True if queued.
    fn offer(&self, item: Outbound) -> bool {
        match self.queue.offer(item) {
            Offer::Queued => return true,
            Offer::Full => {
                metrics::dropped("queue_full");
                self.close(CloseOrder {
                    code: 1013,
                    reason: "send queue full: the client reads too slowly; resume with since",
                    reconnect: false,
                });
            }
            Offer::Closed => {}
        }
        false
    }

    /// [`ConnHandle::offer`], counted in the queue-depth gauge.
    fn offer_one(&self, item: Outbound) {
        if self.offer(item) {
            metrics::queued(1);
        }
    }
}

#[derive(Default)]
pub struct Hub {
    channels: RwLock<HashMap<Arc<str>, Vec<Arc<ConnHandle>>>>,
    connections: Mutex<HashMap<u64, Arc<ConnHandle>>>,
    next_id: AtomicU64,
}

impl Hub {
    /// A new connection's handle, with its queue of at most `queue_size` items.
    pub fn connect(&self, queue_size: usize) -> Arc<ConnHandle> {
        let handle = Arc::new(ConnHandle {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            queue: Queue::new(queue_size),
            order: Mutex::new(None),
            wake: Notify::new(),
            session: Mutex::new(None),
            jti: Mutex::new(None),
            user: AtomicI64::new(0),
        });
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(handle.id, handle.clone());
        handle
    }

    /// Forgets a connection and every subscription of it.
    pub fn disconnect(&self, handle: &ConnHandle, channels: impl Iterator<Item = Arc<str>>) {
        for channel in channels {
            self.unsubscribe(&channel, handle.id);
        }
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&handle.id);
    }

    pub fn subscribe(&self, channel: Arc<str>, handle: &Arc<ConnHandle>) {
        let mut channels = self.channels.write().unwrap_or_else(|p| p.into_inner());
        let list = channels.entry(channel).or_default();
        if !list.iter().any(|c| c.id == handle.id) {
            list.push(handle.clone());
        }
    }

    pub fn unsubscribe(&self, channel: &str, id: u64) {
        let mut channels = self.channels.write().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = channels.get_mut(channel) {
            list.retain(|c| c.id != id);
            if list.is_empty() {
                channels.remove(channel);
            }
        }
    }

    /// Offers a message to every subscriber of its channel here.
    pub fn deliver(&self, delivery: Arc<Delivery>) {
        let channels = self.channels.read().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = channels.get(&delivery.channel) {
            // One gauge update per message, not one per subscriber; counted before the
            // offers (a subscriber may take its copy at once), the refused ones after.
            metrics::queued(list.len());
            let refused = list
                .iter()
                .filter(|conn| !conn.offer(Outbound::Message(delivery.clone())))
                .count();
            metrics::dequeued(refused);
        }
    }

    /// Tells the subscribers of every channel `affected` says yes to that they may have
    /// missed messages.
    pub fn resync(&self, affected: impl Fn(&str) -> bool) {
        let channels = self.channels.read().unwrap_or_else(|p| p.into_inner());
        for (channel, list) in channels.iter().filter(|(c, _)| affected(c)) {
            for conn in list {
                conn.offer_one(Outbound::Resync(channel.clone()));
            }
        }
    }

    /// Ends the subscriptions to `channel` of the connections of `user` (every connection's
    /// when `None`): no further message is queued for them, and each is told
    /// ([`Outbound::Revoked`]).
    pub fn revoke(&self, channel: &str, user: Option<i64>) -> usize {
        let mut channels = self.channels.write().unwrap_or_else(|p| p.into_inner());
        let Some((name, list)) = channels.get_key_value(channel) else {
            return 0;
        };
        let name = name.clone();
        let matches = |c: &ConnHandle| user.is_none_or(|u| c.user.load(Ordering::Relaxed) == u);
        let (gone, kept): (Vec<_>, Vec<_>) = list.iter().cloned().partition(|c| matches(c));
        if kept.is_empty() {
            channels.remove(channel);
        } else {
            channels.insert(name.clone(), kept);
        }
        drop(channels);
        for conn in &gone {
            conn.offer_one(Outbound::Revoked(name.clone()));
        }
        gone.len()
    }

    /// Closes every connection authenticated with `session`.
    pub fn close_session(&self, session: Uuid, order: &CloseOrder) -> usize {
        let connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        let mut closed = 0;
        for conn in connections.values() {
            if conn.session() == Some(session) {
                conn.close(order.clone());
                closed += 1;
            }
        }
        closed
    }

    /// Closes every connection authenticated with the access token `jti`.
    pub fn close_token(&self, jti: Uuid, order: &CloseOrder) -> usize {
        let connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        let mut closed = 0;
        for conn in connections.values().filter(|c| c.jti() == Some(jti)) {
            conn.close(order.clone());
            closed += 1;
        }
        closed
    }

    /// Closes every connection (shutdown).
    pub fn close_all(&self, order: &CloseOrder) {
        let connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        for conn in connections.values() {
            conn.close(order.clone());
        }
    }

    pub fn connection_count(&self) -> usize {
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}
