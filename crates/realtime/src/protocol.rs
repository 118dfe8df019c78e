//! Protocol v1: JSON text frames, one message per frame (README, "Real-time protocol"); a
//! client that connects with `?batch=1` also gets `batch` frames of several `message`s
//! (`outbox.rs`).
//!
//! Client → server: `auth`, `subscribe`, `unsubscribe`, `publish`, `ping`.
//! Server → client: `hello`, `ack`, `message`, `batch` (opted in), `gap`, `unsubscribed`,
//! `error`, `pong`, `reconnect`.

use serde::Deserialize;
use serde_json::{Value, json};

/// The protocol's version, announced in `hello`.
pub const VERSION: u32 = 1;

/// A position in a channel's history: the last offset the client has, in the epoch it
/// belongs to. `epoch: null` with `offset: 0`: the client has nothing yet (it subscribed
/// while the channel was empty) and wants everything the history holds.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Since {
    pub offset: u64,
    pub epoch: Option<String>,
}

/// A client's message, parsed.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    Auth {
        token: String,
        #[serde(default)]
        id: Option<Value>,
    },
    Subscribe {
        channel: String,
        #[serde(default)]
        since: Option<Since>,
        #[serde(default)]
        id: Option<Value>,
    },
    Unsubscribe {
        channel: String,
        #[serde(default)]
        id: Option<Value>,
    },
    Publish {
        channel: String,
        payload: Value,
        #[serde(default)]
        id: Option<Value>,
    },
    Ping {
        #[serde(default)]
        id: Option<Value>,
    },
}

impl ClientMessage {
    /// The request's `id`, echoed in its answer.
    pub fn id(&self) -> &Option<Value> {
        match self {
            ClientMessage::Auth { id, .. }
            | ClientMessage::Subscribe { id, .. }
            | ClientMessage::Unsubscribe { id, .. }
            | ClientMessage::Publish { id, .. }
            | ClientMessage::Ping { id } => id,
        }
    }
}

const TYPES: [&str; 5] = ["auth", "subscribe", "unsubscribe", "publish", "ping"];

/// The stable error codes of `error` messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// The frame is not JSON (or not an object).
    BadJson,
    /// A known type with missing, extra or mistyped fields.
    BadRequest,
    /// `type` is missing or not one of the protocol's.
    UnknownType,
    /// A binary frame: the protocol is text.
    BinaryUnsupported,
    /// Past `WS_MAX_MESSAGE_BYTES`.
    TooLarge,
    /// Not authenticated (yet), or the token is not valid.
    Unauthorized,
    /// Authenticated, but this channel is not yours to read or publish.
    Forbidden,
    /// No such channel name.
    BadChannel,
    /// Past `WS_MAX_CHANNELS` subscriptions.
    TooManyChannels,
    /// `unsubscribe` from a channel the connection is not subscribed to.
    NotSubscribed,
    /// Redis (or PostgreSQL, for a space's participants) cannot be reached: retry later.
    Unavailable,
    /// Past `WS_PUBLISH_RATE` publishes per second on this connection: slow down.
    RateLimited,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::BadJson => "bad_json",
            Code::BadRequest => "bad_request",
            Code::UnknownType => "unknown_type",
            Code::BinaryUnsupported => "binary_unsupported",
            Code::TooLarge => "too_large",
            Code::Unauthorized => "unauthorized",
            Code::Forbidden => "forbidden",
            Code::BadChannel => "bad_channel",
            Code::TooManyChannels => "too_many_channels",
            Code::NotSubscribed => "not_subscribed",
            Code::Unavailable => "unavailable",
            Code::RateLimited => "rate_limited",
        }
    }
}

/// A protocol error: the code, a sentence, and the request's `id` when it had one.
#[derive(Debug, Clone)]
pub struct ProtocolError {
    pub code: Code,
    pub message: String,
    pub id: Option<Value>,
}

impl ProtocolError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        ProtocolError {
            code,
            message: message.into(),
            id: None,
        }
    }

    pub fn with_id(mut self, id: &Option<Value>) -> Self {
        self.id = id.clone();
        self
    }

    pub fn frame(&self) -> String {
        let mut body =
            json!({"type": "error", "code": self.code.as_str(), "message": self.message});
        if let Some(id) = &self.id {
            body["id"] = id.clone();
        }
        body.to_string()
    }
}

/// Parses one text frame. Unknown types and bad fields are told apart, so a client learns
/// which it sent.
pub fn parse(text: &str) -> Result<ClientMessage, ProtocolError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ProtocolError::new(Code::BadJson, format!("not JSON: {e}")))?;
    let Some(object) = value.as_object() else {
        return Err(ProtocolError::new(
            Code::BadJson,
            "a message is a JSON object",
        ));
    };
    let id = object.get("id").cloned();
    match object.get("type").and_then(Value::as_str) {
        Some(t) if TYPES.contains(&t) => {}
        Some(t) => {
            return Err(ProtocolError::new(
                Code::UnknownType,
                format!("unknown type {t:?}; known: {}", TYPES.join(", ")),
            )
            .with_id(&id));
        }
        None => {
            return Err(
                ProtocolError::new(Code::UnknownType, "a message needs a string `type`")
                    .with_id(&id),
            );
        }
    }
    serde_json::from_value(value)
        .map_err(|e| ProtocolError::new(Code::BadRequest, e.to_string()).with_id(&id))
}

/// `ack`, with extra fields.
pub fn ack(id: &Option<Value>, extra: Value) -> String {
    let mut body = json!({"type": "ack"});
    if let Some(id) = id {
        body["id"] = id.clone();
    }
    if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
    body.to_string()
}

/// `unsubscribed`: the server ended a subscription (`code` says why, e.g. `forbidden` once
/// the account may no longer read the channel); nothing more arrives on it.
pub fn unsubscribed(channel: &str, code: Code, message: &str) -> String {
    json!({"type": "unsubscribed", "channel": channel, "code": code.as_str(), "message": message})
        .to_string()
}

/// `gap`: offsets `from..=to` of `epoch` cannot be delivered (`to` null: every offset from
/// `from` on in that epoch, which ended). The client reloads from the source of truth.
pub fn gap(channel: &str, epoch: &str, from: u64, to: Option<u64>, reason: &str) -> String {
    json!({"type": "gap", "channel": channel, "epoch": epoch, "from": from, "to": to, "reason": reason})
        .to_string()
}

/// The `gap` a subscriber gets when messages of `epoch` from `from` on may not reach it
/// because Redis could not be used (this instance delivers only its own publishes, or
/// another instance did while it was cut off): that epoch has ended for this subscription.
/// `epoch` is null when the subscription had no epoch yet.
pub fn degraded_gap(channel: &str, epoch: Option<&str>, from: u64) -> String {
    json!({"type": "gap", "channel": channel, "epoch": epoch, "from": from, "to": null, "reason": "degraded"})
        .to_string()
}

/// A `message` delivered only to this instance's subscribers while Redis cannot take it: no
/// offset, no epoch (it is in no history), `"durable": false`.
pub fn local_message(channel: &str, time_ms: i64, payload: &str) -> String {
    format!(
        "{{\"type\":\"message\",\"channel\":{},\"offset\":null,\"epoch\":null,\"durable\":false,\"time\":{time_ms},\"payload\":{payload}}}",
        Value::from(channel),
    )
}

/// `message`, as built once per publish and sent as is to every subscriber.
pub fn message(channel: &str, epoch: &str, offset: u64, time_ms: i64, payload: &str) -> String {
    // The payload is JSON text already validated (it was a `serde_json::Value`).
    format!(
        "{{\"type\":\"message\",\"channel\":{},\"offset\":{offset},\"epoch\":{},\"time\":{time_ms},\"payload\":{payload}}}",
        Value::from(channel),
        Value::from(epoch),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_types_and_bad_fields_are_told_apart() {
        assert_eq!(parse("nope").unwrap_err().code, Code::BadJson);
        assert_eq!(parse("[1]").unwrap_err().code, Code::BadJson);
        assert_eq!(
            parse(r#"{"type":"dance"}"#).unwrap_err().code,
            Code::UnknownType
        );
        assert_eq!(parse(r#"{"id":3}"#).unwrap_err().code, Code::UnknownType);
        let err = parse(r#"{"type":"subscribe","id":"a"}"#).unwrap_err();
        assert_eq!(err.code, Code::BadRequest);
        assert_eq!(err.id, Some(json!("a")));
        assert!(matches!(
            parse(r#"{"type":"subscribe","channel":"x","since":{"offset":3,"epoch":"e"}}"#),
            Ok(ClientMessage::Subscribe { since: Some(_), .. })
        ));
    }

    #[test]
    fn a_message_frame_is_json_with_the_payload_inside() {
        let frame = message("space:a\"b", "e1", 7, 99, r#"{"n":1}"#);
        let v: Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(v["channel"], "space:a\"b");
        assert_eq!(v["offset"], 7);
        assert_eq!(v["payload"]["n"], 1);
        let local: Value = serde_json::from_str(&local_message("a", 5, "[1]")).unwrap();
        assert_eq!(local["durable"], false);
        assert!(local["offset"].is_null() && local["epoch"].is_null());
        assert_eq!(local["payload"][0], 1);
    }
}
