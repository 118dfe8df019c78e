//! The domain events of spaces and sessions, published on the platform's event bus
//! (`cascade_core::events`) after the write that caused them committed, to every instance.
//!
//! | channel | kind | data |
//! |---|---|---|
//! | `cascade-events` | `space.created` | `space_id`, `creator`, `title`, `max_participants`, `consciousness_threshold` |
//! | `cascade-events`, `space:{space_id}` | `space.closed` | `space_id`, `participants_left` (how many) |
//! | `space:{space_id}` | `space.joined` | `space_id`, `username`, `participant_count`, `max_participants` |
//! | `space:{space_id}` | `space.left` | `space_id`, `user_id`, `username`, `reason` (`left`, `ended`, `idle`) |
//! | `user:{user_id}` | `session.started` | the session (`id`, `space_id`, `consciousness_level`, `verified`, …) |
//! | `user:{user_id}` | `session.level_changed` | `session_id`, `from`, `to`, `verified` |
//! | `user:{user_id}` | `session.verified` / `session.unverified` | `session_id`, `consciousness_level`: the level crossed `VERIFICATION_THRESHOLD` (a session that starts verified counts) |
//! | `user:{user_id}` | `session.ended` | `session_id`, `reason` (`ended`, `idle`) |
//!
//! Delivery is the bus's: at most once per instance (a subscriber that must not miss one reads
//! the tables). An event that cannot reach the other instances is logged and counted by the
//! bus; the write it reports stands.

use cascade_core::events::Events;
use serde_json::{Value, json};

use super::queries::Space;
use super::session_queries::{Ended, Session};

/// One event to publish.
#[derive(Debug, Clone)]
pub struct DomainEvent {
    pub channel: String,
    pub kind: &'static str,
    pub data: Value,
}

fn event(channel: String, kind: &'static str, data: Value) -> DomainEvent {
    DomainEvent {
        channel,
        kind,
        data,
    }
}

fn space_channel(space_id: &str) -> String {
    format!("space:{space_id}")
}

fn user_channel(user_id: i64) -> String {
    format!("user:{user_id}")
}

/// The global feed's channel (seed 004).
const FEED: &str = "cascade-events";

/// Publishes `events` in order; failures are the bus's to log and count.
pub async fn publish(bus: &Events, events: Vec<DomainEvent>) {
    for e in events {
        let _ = bus.publish(&e.channel, e.kind, e.data).await;
    }
}

pub fn space_created(space: &Space) -> DomainEvent {
    event(
        FEED.to_string(),
        "space.created",
        json!({
            "space_id": space.space_id,
            "creator": space.creator,
            "title": space.title,
            "max_participants": space.max_participants,
            "consciousness_threshold": space.consciousness_threshold,
        }),
    )
}

pub fn space_closed(space_id: &str, participants_left: u64) -> Vec<DomainEvent> {
    let data = json!({ "space_id": space_id, "participants_left": participants_left });
    vec![
        event(space_channel(space_id), "space.closed", data.clone()),
        event(FEED.to_string(), "space.closed", data),
    ]
}

pub fn space_joined(space: &Space, username: &str) -> DomainEvent {
    event(
        space_channel(&space.space_id),
        "space.joined",
        json!({
            "space_id": space.space_id,
            "username": username,
            "participant_count": space.participant_count,
            "max_participants": space.max_participants,
        }),
    )
}

/// `user_id`: whose subscriptions to the space's channel end (the real-time module).
pub fn space_left(space_id: &str, user_id: i64, username: &str, reason: &str) -> DomainEvent {
    event(
        space_channel(space_id),
        "space.left",
        json!({ "space_id": space_id, "user_id": user_id, "username": username, "reason": reason }),
    )
}

/// A session started; verified too when its level reaches the threshold.
pub fn session_started(session: &Session) -> Vec<DomainEvent> {
    let channel = user_channel(session.user_id);
    let mut events = vec![event(
        channel.clone(),
        "session.started",
        json!(session_without_token(session)),
    )];
    if session.verified {
        events.push(verification(session));
    }
    events
}

/// The level changed from `before`; `verified_before` is what the old level made it.
pub fn level_changed(session: &Session, before: &str, verified_before: bool) -> Vec<DomainEvent> {
    if session.consciousness_level.to_string() == before {
        return Vec::new();
    }
    let mut events = vec![event(
        user_channel(session.user_id),
        "session.level_changed",
        json!({
            "session_id": session.id,
            "from": before,
            "to": session.consciousness_level,
            "verified": session.verified,
        }),
    )];
    if session.verified != verified_before {
        events.push(verification(session));
    }
    events
}

fn verification(session: &Session) -> DomainEvent {
    let kind = if session.verified {
        "session.verified"
    } else {
        "session.unverified"
    };
    event(
        user_channel(session.user_id),
        kind,
        json!({ "session_id": session.id, "consciousness_level": session.consciousness_level }),
    )
}

/// Sessions that ended (`reason`: `ended` or `idle`) and the spaces their users left.
pub fn sessions_ended(ended: &[Ended], reason: &str) -> Vec<DomainEvent> {
    let mut events = Vec::new();
    for e in ended {
        for (space_id, username) in &e.left {
            events.push(space_left(space_id, e.user_id, username, reason));
        }
        events.push(event(
            user_channel(e.user_id),
            "session.ended",
            json!({ "session_id": e.session, "reason": reason }),
        ));
    }
    events
}

fn session_without_token(session: &Session) -> Session {
    Session {
        session_token: None,
        ..session.clone()
    }
}
