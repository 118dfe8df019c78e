//! Channel names and who may use them.
//!
//! | channel | read | publish (client) |
//! |---|---|---|
//! | `consciousness-stream`, `ai-collaborations` | any account | any account |
//! | `cascade-events` | any account | nobody (server only) |
//! | `space:{id}` | the space's participants | the space's participants |
//! | `user:{id}` | that account | nobody (server only) |
//! | `admin:{name}` (`admin:metrics`) | the operator (`ADMIN_TOKEN`) | nobody (server only) |
//!
//! The operator's connection reads every channel and publishes none. `space:` is decided by the
//! CASCADE application's [`ChannelAuthorizer`](cascade_http::ChannelAuthorizer) (this crate
//! does not read its tables).

use std::fmt;
use std::sync::Arc;

/// Longest channel name accepted.
pub const MAX_CHANNEL_BYTES: usize = 128;

/// A valid channel name, parsed once.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Channel {
    name: Arc<str>,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `consciousness-stream`, `ai-collaborations`.
    Open,
    /// `cascade-events`.
    Feed,
    /// `space:{id}`.
    Space,
    /// `user:{id}`.
    User(i64),
    /// `admin:{name}`.
    Admin,
}

impl Channel {
    /// Parses a channel name; the error says what is wrong with it.
    pub fn parse(name: &str) -> Result<Channel, String> {
        if name.len() > MAX_CHANNEL_BYTES {
            return Err(format!(
                "a channel name has at most {MAX_CHANNEL_BYTES} bytes"
            ));
        }
        let kind = match name {
            "consciousness-stream" | "ai-collaborations" => Kind::Open,
            "cascade-events" => Kind::Feed,
            _ => match name.split_once(':') {
                Some(("space", id)) if is_id(id) => Kind::Space,
                Some(("user", id)) => match id.parse::<i64>() {
                    Ok(n) if n > 0 && id == n.to_string() => Kind::User(n),
                    _ => return Err(format!("{name:?}: a user channel is user:{{account id}}")),
                },
                Some(("admin", id)) if is_id(id) => Kind::Admin,
                _ => {
                    return Err(format!(
                        "no channel {name:?}: channels are consciousness-stream, \
                         ai-collaborations, cascade-events, space:{{id}}, user:{{id}}, admin:{{name}}"
                    ));
                }
            },
        };
        Ok(Channel {
            name: name.into(),
            kind,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn shared_name(&self) -> Arc<str> {
        self.name.clone()
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The family its history limits are configured by (`WS_HISTORY_JSON`).
    pub fn family(&self) -> &str {
        match self.kind {
            Kind::Open | Kind::Feed => &self.name,
            Kind::Space => "space",
            Kind::User(_) => "user",
            Kind::Admin => "admin",
        }
    }

    /// The id part of `space:{id}`.
    pub fn space_id(&self) -> Option<&str> {
        match self.kind {
            Kind::Space => self.name.split_once(':').map(|(_, id)| id),
            _ => None,
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// Ids of `space:` and `admin:` channels: 1 to 100 of `[A-Za-z0-9_-]`.
fn is_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 100
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Who {
    /// An account, by its access token.
    User { user_id: i64 },
    /// The operator, by `ADMIN_TOKEN`.
    Admin,
}

/// What the connection may do on a channel, before any module's authorizer is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    Allow,
    Deny,
    /// The family's authorizer decides (`space:`).
    AskModule,
}

impl Who {
    pub fn may_read(&self, channel: &Channel) -> Rule {
        match (self, channel.kind()) {
            (Who::Admin, _) => Rule::Allow,
            (Who::User { .. }, Kind::Open | Kind::Feed) => Rule::Allow,
            (Who::User { .. }, Kind::Space) => Rule::AskModule,
            (Who::User { user_id }, Kind::User(owner)) if *user_id == owner => Rule::Allow,
            (Who::User { .. }, _) => Rule::Deny,
        }
    }

    pub fn may_publish(&self, channel: &Channel) -> Rule {
        match (self, channel.kind()) {
            (Who::User { .. }, Kind::Open) => Rule::Allow,
            (Who::User { .. }, Kind::Space) => Rule::AskModule,
            _ => Rule::Deny,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_into_their_families() {
        assert_eq!(Channel::parse("cascade-events").unwrap().kind(), Kind::Feed);
        assert_eq!(Channel::parse("user:42").unwrap().kind(), Kind::User(42));
        assert_eq!(
            Channel::parse("space:abc-1").unwrap().space_id(),
            Some("abc-1")
        );
        assert_eq!(Channel::parse("admin:metrics").unwrap().family(), "admin");
        for bad in [
            "",
            "user:0",
            "user:042",
            "user:x",
            "space:",
            "space:a b",
            "other",
            "x:y",
        ] {
            assert!(Channel::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Channel::parse(&format!("space:{}", "a".repeat(200))).is_err());
    }

    #[test]
    fn only_the_owner_reads_a_user_channel_and_nobody_publishes_server_channels() {
        let me = Who::User { user_id: 7 };
        let mine = Channel::parse("user:7").unwrap();
        let theirs = Channel::parse("user:8").unwrap();
        assert_eq!(me.may_read(&mine), Rule::Allow);
        assert_eq!(me.may_read(&theirs), Rule::Deny);
        assert_eq!(me.may_publish(&mine), Rule::Deny);
        let feed = Channel::parse("cascade-events").unwrap();
        assert_eq!(me.may_read(&feed), Rule::Allow);
        assert_eq!(me.may_publish(&feed), Rule::Deny);
        let admin = Channel::parse("admin:metrics").unwrap();
        assert_eq!(me.may_read(&admin), Rule::Deny);
        assert_eq!(Who::Admin.may_read(&admin), Rule::Allow);
        assert_eq!(Who::Admin.may_publish(&admin), Rule::Deny);
    }
}
