//! The real-time module's settings (`WS_*`).

use std::collections::HashMap;
use std::time::Duration;

use cascade_core::config::Parser;
use serde::Deserialize;

/// The settings, as text.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RawRealtimeConfig {
    /// Messages waiting to be written per connection; a client that lets this many pile up is
    /// closed (1013) and resumes from history [default: 1000].
    #[arg(long = "ws-queue-size", env = "WS_QUEUE_SIZE", global = true)]
    pub ws_queue_size: Option<String>,
    /// Channels one connection may subscribe to [default: 100].
    #[arg(long = "ws-max-channels", env = "WS_MAX_CHANNELS", global = true)]
    pub ws_max_channels: Option<String>,
    /// Largest client message (and published payload) in bytes; larger ones get an error
    /// `too_large` [default: 65536].
    #[arg(
        long = "ws-max-message-bytes",
        env = "WS_MAX_MESSAGE_BYTES",
        global = true
    )]
    pub ws_max_message_bytes: Option<String>,
    /// Largest WebSocket frame in bytes; a larger one closes the connection with 1009
    /// [default: 1048576].
    #[arg(long = "ws-max-frame-bytes", env = "WS_MAX_FRAME_BYTES", global = true)]
    pub ws_max_frame_bytes: Option<String>,
    /// WebSocket connections on this instance; past it the upgrade is refused with a 503
    /// [default: 20000].
    #[arg(long = "ws-max-connections", env = "WS_MAX_CONNECTIONS", global = true)]
    pub ws_max_connections: Option<String>,
    /// WebSocket connections per account on this instance (503 past it) [default: 20].
    #[arg(
        long = "ws-max-connections-per-user",
        env = "WS_MAX_CONNECTIONS_PER_USER",
        global = true
    )]
    pub ws_max_per_user: Option<String>,
    /// How long a connection opened without `Authorization` has to send `auth` [default: 5s].
    #[arg(long = "ws-auth-timeout", env = "WS_AUTH_TIMEOUT", global = true)]
    pub ws_auth_timeout: Option<String>,
    /// Server ping period [default: 20s].
    #[arg(long = "ws-ping-interval", env = "WS_PING_INTERVAL", global = true)]
    pub ws_ping_interval: Option<String>,
    /// A connection from which nothing (not even a pong) arrived for this long is closed
    /// [default: 60s].
    #[arg(long = "ws-idle-timeout", env = "WS_IDLE_TIMEOUT", global = true)]
    pub ws_idle_timeout: Option<String>,
    /// A write the client does not take within this long (it stopped reading) closes the
    /// connection [default: 10s].
    #[arg(long = "ws-write-timeout", env = "WS_WRITE_TIMEOUT", global = true)]
    pub ws_write_timeout: Option<String>,
    /// Writes to one connection at most this often: messages queued meanwhile go out together,
    /// in one system call. The first message after a quiet spell is written at once; a bare
    /// number is milliseconds; `0` writes every message at once [default: 0].
    #[arg(long = "ws-write-delay", env = "WS_WRITE_DELAY", global = true)]
    pub ws_write_delay: Option<String>,
    /// Messages smaller than this many bytes are sent uncompressed even when permessage-deflate
    /// was negotiated; `off` never negotiates it [default: 512].
    #[arg(
        long = "ws-compression-threshold",
        env = "WS_COMPRESSION_THRESHOLD",
        global = true
    )]
    pub ws_compression_threshold: Option<String>,
    /// History kept per channel: at most this many messages [default: 1000] ...
    #[arg(long = "ws-history-max-len", env = "WS_HISTORY_MAX_LEN", global = true)]
    pub ws_history_max_len: Option<String>,
    /// ... and none older than this [default: 1h].
    #[arg(long = "ws-history-max-age", env = "WS_HISTORY_MAX_AGE", global = true)]
    pub ws_history_max_age: Option<String>,
    /// Per channel family overrides, e.g. `{"user": {"max_len": 100, "max_age_s": 600}}`
    /// (families: consciousness-stream, ai-collaborations, cascade-events, space, user, admin).
    #[arg(long = "ws-history-json", env = "WS_HISTORY_JSON", global = true)]
    pub ws_history_json: Option<String>,
    /// Most messages replayed to one resuming subscription; older missed ones are a `gap`
    /// [default: 1000].
    #[arg(long = "ws-replay-max", env = "WS_REPLAY_MAX", global = true)]
    pub ws_replay_max: Option<String>,
    /// Most bytes of messages replayed to one resuming subscription at once (what one
    /// subscribe may hold in memory); the rest is a `gap` [default: 4194304].
    #[arg(
        long = "ws-replay-max-bytes",
        env = "WS_REPLAY_MAX_BYTES",
        global = true
    )]
    pub ws_replay_max_bytes: Option<String>,
    /// Publishes per second one connection may send (a burst of as many is allowed); past
    /// it a publish gets an error `rate_limited` [default: 100].
    #[arg(long = "ws-publish-rate", env = "WS_PUBLISH_RATE", global = true)]
    pub ws_publish_rate: Option<String>,
    /// Redis pub/sub connections per instance that channels are spread over by hash
    /// [default: 4].
    #[arg(long = "ws-redis-shards", env = "WS_REDIS_SHARDS", global = true)]
    pub ws_redis_shards: Option<String>,
}

/// How much history one channel family keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimit {
    pub max_len: u64,
    pub max_age: Duration,
}

/// The validated settings.
#[derive(Debug, Clone)]
pub struct RealtimeConfig {
    pub queue_size: usize,
    pub max_channels: usize,
    pub max_message_bytes: usize,
    pub max_frame_bytes: usize,
    pub max_connections: usize,
    pub max_per_user: usize,
    pub auth_timeout: Duration,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
    /// Least time between two writes to one connection (zero: none).
    pub write_delay: Duration,
    /// `None`: permessage-deflate is not negotiated.
    pub compression_threshold: Option<usize>,
    pub history: HistoryLimit,
    pub history_by_family: HashMap<String, HistoryLimit>,
    pub replay_max: u64,
    pub replay_max_bytes: usize,
    pub publish_rate: usize,
    pub redis_shards: usize,
}

impl Default for RealtimeConfig {
    fn default() -> Self {
        let mut p = Parser::new();
        RealtimeConfig::parse(&mut p, &RawRealtimeConfig::default())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FamilyLimit {
    max_len: Option<u64>,
    max_age_s: Option<u64>,
}

const FAMILIES: [&str; 6] = [
    "consciousness-stream",
    "ai-collaborations",
    "cascade-events",
    "space",
    "user",
    "admin",
];

impl RealtimeConfig {
    pub fn parse(p: &mut Parser, raw: &RawRealtimeConfig) -> RealtimeConfig {
        let count = |p: &mut Parser, var, raw: &Option<String>, default: usize| {
            let n: usize = p.number(var, raw.as_deref(), default, "a positive whole number");
            if n == 0 {
                p.fail(var, "must be at least 1");
                return default;
            }
            n
        };
        let queue_size = count(p, "WS_QUEUE_SIZE", &raw.ws_queue_size, 1000);
        let max_channels = count(p, "WS_MAX_CHANNELS", &raw.ws_max_channels, 100);
        let max_message_bytes = count(p, "WS_MAX_MESSAGE_BYTES", &raw.ws_max_message_bytes, 65_536);
        let max_frame_bytes = count(p, "WS_MAX_FRAME_BYTES", &raw.ws_max_frame_bytes, 1 << 20);
        if max_frame_bytes <= max_message_bytes {
            p.fail(
                "WS_MAX_FRAME_BYTES",
                "must be larger than WS_MAX_MESSAGE_BYTES (a frame past the message limit gets an error, past the frame limit a close)",
            );
        }
        let max_connections = count(p, "WS_MAX_CONNECTIONS", &raw.ws_max_connections, 20_000);
        let max_per_user = count(p, "WS_MAX_CONNECTIONS_PER_USER", &raw.ws_max_per_user, 20);
        let auth_timeout = p.positive_duration(
            "WS_AUTH_TIMEOUT",
            &raw.ws_auth_timeout,
            Duration::from_secs(5),
        );
        let ping_interval = p.positive_duration(
            "WS_PING_INTERVAL",
            &raw.ws_ping_interval,
            Duration::from_secs(20),
        );
        let idle_timeout = p.positive_duration(
            "WS_IDLE_TIMEOUT",
            &raw.ws_idle_timeout,
            Duration::from_secs(60),
        );
        if idle_timeout <= ping_interval {
            p.fail("WS_IDLE_TIMEOUT", "must be longer than WS_PING_INTERVAL");
        }
        let write_timeout = p.positive_duration(
            "WS_WRITE_TIMEOUT",
            &raw.ws_write_timeout,
            Duration::from_secs(10),
        );
        let write_delay = p.duration_in(
            "WS_WRITE_DELAY",
            &raw.ws_write_delay,
            Duration::ZERO,
            Duration::from_millis(1),
        );
        if write_delay > Duration::from_millis(100) {
            p.fail(
                "WS_WRITE_DELAY",
                "at most 100ms (it is added to a message's delivery time under load, and a \
                 connection's queue must hold what arrives meanwhile)",
            );
        }
        let compression_threshold = match raw.ws_compression_threshold.as_deref().map(str::trim) {
            Some("off") => None,
            other => Some(p.number(
                "WS_COMPRESSION_THRESHOLD",
                other,
                512usize,
                "a number of bytes or `off`",
            )),
        };
        let max_len: u64 = p.number(
            "WS_HISTORY_MAX_LEN",
            raw.ws_history_max_len.as_deref(),
            1000,
            "a whole number",
        );
        let max_age = p.positive_duration(
            "WS_HISTORY_MAX_AGE",
            &raw.ws_history_max_age,
            Duration::from_secs(3600),
        );
        let history = HistoryLimit { max_len, max_age };
        let mut history_by_family = HashMap::new();
        if let Some(json) = raw
            .ws_history_json
            .as_deref()
            .filter(|j| !j.trim().is_empty())
        {
            match serde_json::from_str::<HashMap<String, FamilyLimit>>(json) {
                Ok(map) => {
                    for (family, limit) in map {
                        if !FAMILIES.contains(&family.as_str()) {
                            p.fail(
                                "WS_HISTORY_JSON",
                                format!(
                                    "no channel family {family:?}; known: {}",
                                    FAMILIES.join(", ")
                                ),
                            );
                            continue;
                        }
                        let limit = HistoryLimit {
                            max_len: limit.max_len.unwrap_or(history.max_len),
                            max_age: limit
                                .max_age_s
                                .map(Duration::from_secs)
                                .unwrap_or(history.max_age),
                        };
                        if limit.max_age.is_zero() {
                            p.fail(
                                "WS_HISTORY_JSON",
                                format!("{family}: max_age_s must be positive"),
                            );
                        }
                        history_by_family.insert(family, limit);
                    }
                }
                Err(err) => p.fail("WS_HISTORY_JSON", err.to_string()),
            }
        }
        let replay_max: u64 = p.number(
            "WS_REPLAY_MAX",
            raw.ws_replay_max.as_deref(),
            1000,
            "a whole number",
        );
        let replay_max_bytes = count(p, "WS_REPLAY_MAX_BYTES", &raw.ws_replay_max_bytes, 4 << 20);
        let publish_rate = count(p, "WS_PUBLISH_RATE", &raw.ws_publish_rate, 100);
        let redis_shards = count(p, "WS_REDIS_SHARDS", &raw.ws_redis_shards, 4);
        RealtimeConfig {
            queue_size,
            max_channels,
            max_message_bytes,
            max_frame_bytes,
            max_connections,
            max_per_user,
            auth_timeout,
            ping_interval,
            idle_timeout,
            write_timeout,
            write_delay,
            compression_threshold,
            history,
            history_by_family,
            replay_max,
            replay_max_bytes,
            publish_rate,
            redis_shards,
        }
    }

    /// The history limit of a channel family.
    pub fn history_of(&self, family: &str) -> HistoryLimit {
        self.history_by_family
            .get(family)
            .copied()
            .unwrap_or(self.history)
    }

    /// Rows for `cascade config`.
    pub fn describe(&self) -> Vec<(&'static str, String)> {
        vec![
            ("WS_QUEUE_SIZE", self.queue_size.to_string()),
            ("WS_MAX_CHANNELS", self.max_channels.to_string()),
            ("WS_MAX_MESSAGE_BYTES", self.max_message_bytes.to_string()),
            ("WS_MAX_FRAME_BYTES", self.max_frame_bytes.to_string()),
            ("WS_MAX_CONNECTIONS", self.max_connections.to_string()),
            ("WS_MAX_CONNECTIONS_PER_USER", self.max_per_user.to_string()),
            ("WS_AUTH_TIMEOUT", format!("{:?}", self.auth_timeout)),
            ("WS_PING_INTERVAL", format!("{:?}", self.ping_interval)),
            ("WS_IDLE_TIMEOUT", format!("{:?}", self.idle_timeout)),
            ("WS_WRITE_TIMEOUT", format!("{:?}", self.write_timeout)),
            ("WS_WRITE_DELAY", format!("{:?}", self.write_delay)),
            (
                "WS_COMPRESSION_THRESHOLD",
                self.compression_threshold
                    .map_or("off".to_string(), |n| n.to_string()),
            ),
            ("WS_HISTORY_MAX_LEN", self.history.max_len.to_string()),
            ("WS_HISTORY_MAX_AGE", format!("{:?}", self.history.max_age)),
            ("WS_REPLAY_MAX", self.replay_max.to_string()),
            ("WS_REPLAY_MAX_BYTES", self.replay_max_bytes.to_string()),
            ("WS_PUBLISH_RATE", self.publish_rate.to_string()),
            ("WS_REDIS_SHARDS", self.redis_shards.to_string()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(delay: &str) -> Result<RealtimeConfig, String> {
        let mut p = Parser::new();
        let raw = RawRealtimeConfig {
            ws_write_delay: Some(delay.to_string()),
            ..RawRealtimeConfig::default()
        };
        let config = RealtimeConfig::parse(&mut p, &raw);
        p.finish(config).map_err(|e| e.to_string())
    }

    #[test]
    fn the_write_delay_takes_milliseconds_and_zero_and_refuses_more_than_100ms() {
        assert_eq!(RealtimeConfig::default().write_delay, Duration::ZERO);
        assert_eq!(parse("20").unwrap().write_delay, Duration::from_millis(20));
        assert_eq!(parse("0").unwrap().write_delay, Duration::ZERO);
        assert_eq!(
            parse("100ms").unwrap().write_delay,
            Duration::from_millis(100)
        );
        let err = parse("101ms").unwrap_err();
        assert!(
            err.contains("WS_WRITE_DELAY") && err.contains("at most 100ms"),
            "{err}"
        );
        let err = parse("soon").unwrap_err();
        assert!(err.contains("WS_WRITE_DELAY"), "{err}");
    }
}
