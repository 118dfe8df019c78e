//! The platform's domain events ([`cascade_core::events`]) into channels, and the events that
//! end connections.
//!
//! An event whose channel is a real-time channel (`cascade-events`, `space:{id}`,
//! `user:{id}`) is published on it, as `{"event": kind, "data": …, "id": …, "at": ms}`, by the
//! instance that raised it only (`origin`): once in the history, and every instance's
//! subscribers get it through the fan-out. `auth.session_revoked` (a logout, a revocation,
//! refresh-token reuse, on any instance) closes the connections of that session with 4001,
//! `auth.token_revoked` those authenticated with that access token.
//!
//! On shutdown every connection is told to `reconnect` and closed with 1001.

use std::time::Duration;

use cascade_core::events::{Event, SESSION_REVOKED, TOKEN_REVOKED};
use cascade_core::shutdown::ShutdownSignal;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use crate::Realtime;
use crate::channel::{Channel, Kind};
use crate::hub::CloseOrder;

/// How long shutdown waits for connections to close after telling them to.
const CLOSE_WAIT: Duration = Duration::from_secs(3);

pub async fn run(rt: Realtime, mut stop: ShutdownSignal) {
    let app = &rt.inner.app;
    let mut events = app.events.subscribe();
    let me = app.events.instance_id().to_string();
    loop {
        tokio::select! {
            _ = stop.recv() => break,
            event = events.recv() => match event {
                Ok(event) => handle(&rt, &me, &event).await,
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "realtime: domain events missed (the bridge lagged)");
                }
                Err(RecvError::Closed) => {
                    let _ = stop.recv().await;
                    break;
                }
            }
        }
    }
    shutdown(&rt).await;
}

async fn handle(rt: &Realtime, me: &str, event: &Event) {
    if event.kind == SESSION_REVOKED {
        let session = event.data["session_id"]
            .as_str()
            .and_then(|s| s.parse::<uuid::Uuid>().ok());
        if let Some(session) = session {
            let closed = rt.inner.hub.close_session(
                session,
                &CloseOrder {
                    code: 4001,
                    reason: "the session ended (logout or revocation)",
                    reconnect: false,
                },
            );
            if closed > 0 {
                tracing::debug!(%session, closed, "realtime: connections of an ended session closed");
            }
        }
        return;
    }
    if event.kind == TOKEN_REVOKED {
        let jti = event.data["jti"]
            .as_str()
            .and_then(|s| s.parse::<uuid::Uuid>().ok());
        if let Some(jti) = jti {
            rt.inner.hub.close_token(
                jti,
                &CloseOrder {
                    code: 4001,
                    reason: "the access token was revoked",
                    reconnect: false,
                },
            );
        }
        return;
    }
    revoke_space_access(rt, event);
    if event.origin != me {
        return;
    }
    let Ok(channel) = Channel::parse(&event.channel) else {
        return;
    };
    if !matches!(channel.kind(), Kind::Feed | Kind::Space | Kind::User(_)) {
        return;
    }
    let payload =
        json!({"event": event.kind, "data": event.data, "id": event.id, "at": event.at_ms});
    match rt.publish_text(&channel, &payload.to_string()).await {
        Ok(crate::Published::Durable(_)) => {}
        // Subscribers elsewhere are told with a `degraded` gap once Redis answers again.
        Ok(crate::Published::LocalOnly) => {
            tracing::debug!(channel = %channel, kind = %event.kind, "realtime: a domain event delivered on this instance only (Redis unavailable)");
        }
        Err(err) => {
            tracing::warn!(channel = %channel, kind = %event.kind, error = %err, "realtime: a domain event was not published");
        }
    }
}

/// `space.left` (that account) and `space.closed` (everyone), raised on any instance, end
/// the matching subscriptions to the space's channel here: authorization is checked at
/// subscribe, so without this a former participant would go on reading.
fn revoke_space_access(rt: &Realtime, event: &Event) {
    let user = match event.kind.as_str() {
        "space.left" => match event.data["user_id"].as_i64() {
            Some(user) => Some(user),
            None => return,
        },
        "space.closed" => None,
        _ => return,
    };
    if !event.channel.starts_with("space:") {
        return;
    }
    let ended = rt.inner.hub.revoke(&event.channel, user);
    if ended > 0 {
        tracing::debug!(channel = %event.channel, ended, "realtime: space subscriptions ended");
    }
}

async fn shutdown(rt: &Realtime) {
    let hub = &rt.inner.hub;
    hub.close_all(&CloseOrder {
        code: 1001,
        reason: "server shutting down; reconnect (resume with since)",
        reconnect: true,
    });
    let deadline = tokio::time::Instant::now() + CLOSE_WAIT;
    while hub.connection_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
