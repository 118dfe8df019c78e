//! The CASCADE application's settings (seeds 000 and 001): the Venice ledger, the ducat/USD
//! bridge, consciousness, Stripe. Parsed with the platform's [`Parser`], so a bad value here is
//! reported together with every other configuration problem.

use std::time::Duration;

use cascade_core::config::{Decimal6, Namespace, Parser, Secret};

/// Seed 001's Venice citizen data, cached (`cascade:venice:{endpoint}:{params}`).
pub const VENICE: &str = "venice";
/// Consciousness patterns (seed 001), living `CONSCIOUSNESS_CACHE_TTL`.
pub const PATTERNS: &str = "patterns";
/// Investments: a space's totals and an investor's pages, until the next investment.
pub const INVESTMENTS: &str = "investments";
/// The last good copy of each Venice answer, living `VENICE_STALE_IF_ERROR`: what is served,
/// marked stale, while Venice fails (see `cascade_core::upstream::Connector`).
pub const VENICE_LAST_GOOD: &str = "venice_last_good";
/// A collaboration space's details (`GET /spaces/{id}`), removed by every write that changes them.
pub const SPACES: &str = "spaces";
/// Pages of `GET /spaces`, tagged by their filters.
pub const SPACE_LISTS: &str = "space_lists";
/// Who is in a space (`GET /spaces/{id}/participants`).
pub const SPACE_PARTICIPANTS: &str = "space_participants";

/// The CASCADE application's settings, as text.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RawAppConfig {
    /// Base URL of the Venice citizen ledger API [default: https://serenissima.ai/api].
    #[arg(long, env = "VENICE_API_URL", global = true)]
    pub venice_api_url: Option<String>,
    /// Bearer key of the Venice API.
    #[arg(long, env = "VENICE_API_KEY", global = true, hide_env_values = true)]
    pub venice_api_key: Option<String>,
    /// Oldest cached Venice answer served (marked stale) while Venice fails [default: 1h].
    #[arg(long, env = "VENICE_STALE_IF_ERROR", global = true)]
    pub venice_stale_if_error: Option<String>,
    /// Venice calls in flight at once, and idle connections kept [default: 16].
    #[arg(long, env = "VENICE_POOL_SIZE", global = true)]
    pub venice_pool_size: Option<String>,
    /// Deadline to connect to Venice [default: 5s].
    #[arg(long, env = "VENICE_CONNECT_TIMEOUT", global = true)]
    pub venice_connect_timeout: Option<String>,
    /// Deadline of a whole Venice call, retries included [default: 10s].
    #[arg(long, env = "VENICE_REQUEST_TIMEOUT", global = true)]
    pub venice_request_timeout: Option<String>,
    /// Retries of a failed Venice read (connection errors, 429, 502-504) [default: 2].
    #[arg(long, env = "VENICE_RETRIES", global = true)]
    pub venice_retries: Option<String>,
    /// Consecutive failed Venice calls that open its circuit breaker [default: 5].
    #[arg(long, env = "VENICE_BREAKER_THRESHOLD", global = true)]
    pub venice_breaker_threshold: Option<String>,
    /// How long Venice's open breaker skips calls before one probe [default: 30s].
    #[arg(long, env = "VENICE_BREAKER_COOL_DOWN", global = true)]
    pub venice_breaker_cool_down: Option<String>,
    /// USD value of one ducat [default: 0.10].
    #[arg(long, env = "DUCAT_TO_USD_RATE", global = true)]
    pub ducat_to_usd_rate: Option<String>,
    /// Fee of a ducat/USD exchange, in percent [default: 2.5].
    #[arg(long, env = "TRANSACTION_FEE_PERCENT", global = true)]
    pub transaction_fee_percent: Option<String>,
    /// Smallest accepted investment in USD [default: 100].
    #[arg(long, env = "MIN_INVESTMENT_USD", global = true)]
    pub min_investment_usd: Option<String>,
    /// Seconds between background syncs of consciousness patterns [default: 30].
    #[arg(long, env = "CONSCIOUSNESS_SYNC_INTERVAL", global = true)]
    pub consciousness_sync_interval: Option<String>,
    /// TTL of the `patterns` cache namespace, seconds [default: 300].
    #[arg(long, env = "CONSCIOUSNESS_CACHE_TTL", global = true)]
    pub consciousness_cache_ttl: Option<String>,
    /// Consciousness level from which a session counts as verified, in [0, 1] [default: 0.8].
    #[arg(long, env = "VERIFICATION_THRESHOLD", global = true)]
    pub verification_threshold: Option<String>,
    /// A consciousness session without a heartbeat for this long is ended, and leaves its
    /// spaces [default: 5m].
    #[arg(long, env = "CONSCIOUSNESS_SESSION_IDLE", global = true)]
    pub consciousness_session_idle: Option<String>,
    /// Interactions held in memory waiting to be written; more are dropped (counted) [default: 10000].
    #[arg(long, env = "INTERACTIONS_BUFFER", global = true)]
    pub interactions_buffer: Option<String>,
    /// Most interactions written by one INSERT [default: 500].
    #[arg(long, env = "INTERACTIONS_BATCH", global = true)]
    pub interactions_batch: Option<String>,
    /// Longest wait of a recorded interaction before its batch is written [default: 1s].
    #[arg(long, env = "INTERACTIONS_FLUSH_INTERVAL", global = true)]
    pub interactions_flush_interval: Option<String>,
    /// Age after which interactions are deleted; 0 keeps them [default: 720h (30 days)].
    #[arg(long, env = "INTERACTIONS_RETENTION", global = true)]
    pub interactions_retention: Option<String>,
    /// How often interactions past INTERACTIONS_RETENTION are deleted [default: 10m].
    #[arg(long, env = "INTERACTIONS_SWEEP_INTERVAL", global = true)]
    pub interactions_sweep_interval: Option<String>,
    /// Stripe secret key.
    #[arg(long, env = "STRIPE_API_KEY", global = true, hide_env_values = true)]
    pub stripe_api_key: Option<String>,
    /// Secret(s) that sign Stripe webhooks (Stripe-Signature), comma-separated during a rotation.
    #[arg(
        long,
        env = "STRIPE_WEBHOOK_SECRET",
        global = true,
        hide_env_values = true
    )]
    pub stripe_webhook_secret: Option<String>,
    /// Base URL of the Stripe API [default: https://api.stripe.com].
    #[arg(long, env = "STRIPE_API_URL", global = true)]
    pub stripe_api_url: Option<String>,
    /// Paid tiers and their Stripe price ids, a JSON object: {"explorer":"price_…"}.
    #[arg(long, env = "STRIPE_PRICES_JSON", global = true)]
    pub stripe_prices_json: Option<String>,
    /// Where Stripe Checkout sends the customer after paying [default: http://localhost:3000/billing/success].
    #[arg(long, env = "STRIPE_SUCCESS_URL", global = true)]
    pub stripe_success_url: Option<String>,
    /// Where Stripe Checkout sends a customer who gives up [default: http://localhost:3000/billing/cancel].
    #[arg(long, env = "STRIPE_CANCEL_URL", global = true)]
    pub stripe_cancel_url: Option<String>,
    /// Bound of a whole Stripe API call, retries included [default: 10s].
    #[arg(long, env = "STRIPE_REQUEST_TIMEOUT", global = true)]
    pub stripe_request_timeout: Option<String>,
    /// How often Stripe's recent events are listed and applied (lost webhooks healed); 0 turns it off [default: 10m].
    #[arg(long, env = "STRIPE_RECONCILE_INTERVAL", global = true)]
    pub stripe_reconcile_interval: Option<String>,
}

/// An upstream HTTP API: its base URL and bearer key.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub url: String,
    pub api_key: Option<Secret>,
}

/// How the Venice connector behaves (`VENICE_*` beyond the URL and key).
#[derive(Debug, Clone)]
pub struct VeniceClientConfig {
    pub stale_if_error: Duration,
    pub pool_size: usize,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub retries: u32,
    pub breaker_threshold: u32,
    pub breaker_cool_down: Duration,
}

pub use crate::economics::EconomyConfig;

#[derive(Debug, Clone)]
pub struct ConsciousnessConfig {
    pub sync_interval: Duration,
    pub cache_ttl: Duration,
    /// In millionths of 1.0, exact.
    pub verification_threshold: Decimal6,
    /// No heartbeat for this long ends a session (`CONSCIOUSNESS_SESSION_IDLE`).
    pub session_idle: Duration,
}

pub use crate::billing::StripeConfig;
/// The interaction log (`INTERACTIONS_*`): how much waits in memory, how it is written, how
/// long it is kept.
#[derive(Debug, Clone)]
pub struct InteractionsConfig {
    /// Interactions waiting to be written, at most; a full buffer drops (and counts) more.
    pub buffer: usize,
    /// Rows per INSERT, at most.
    pub batch: usize,
    /// A recorded interaction waits at most this long (plus the write) before its batch goes.
    pub flush_interval: Duration,
    /// Rows older than this are deleted; `None`: kept.
    pub retention: Option<Duration>,
    pub sweep_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct AppConfig {
    pub venice: UpstreamConfig,
    pub venice_client: VeniceClientConfig,
    pub economy: EconomyConfig,
    pub consciousness: ConsciousnessConfig,
    pub interactions: InteractionsConfig,
    pub stripe: StripeConfig,
}

impl AppConfig {
    pub fn parse(p: &mut Parser, raw: &RawAppConfig) -> AppConfig {
        let venice = UpstreamConfig {
            url: p.http_url(
                "VENICE_API_URL",
                &raw.venice_api_url,
                "https://serenissima.ai/api",
            ),
            api_key: p.secret(&raw.venice_api_key),
        };
        let venice_client = VeniceClientConfig {
            stale_if_error: p.duration(
                "VENICE_STALE_IF_ERROR",
                &raw.venice_stale_if_error,
                Duration::from_secs(3600),
            ),
            pool_size: p.number(
                "VENICE_POOL_SIZE",
                raw.venice_pool_size.as_deref(),
                16,
                "a number of connections",
            ),
            connect_timeout: p.positive_duration(
                "VENICE_CONNECT_TIMEOUT",
                &raw.venice_connect_timeout,
                Duration::from_secs(5),
            ),
            request_timeout: p.positive_duration(
                "VENICE_REQUEST_TIMEOUT",
                &raw.venice_request_timeout,
                Duration::from_secs(10),
            ),
            retries: p.number(
                "VENICE_RETRIES",
                raw.venice_retries.as_deref(),
                2,
                "a number of retries",
            ),
            breaker_threshold: p.number(
                "VENICE_BREAKER_THRESHOLD",
                raw.venice_breaker_threshold.as_deref(),
                5,
                "a number of failures",
            ),
            breaker_cool_down: p.positive_duration(
                "VENICE_BREAKER_COOL_DOWN",
                &raw.venice_breaker_cool_down,
                Duration::from_secs(30),
            ),
        };
        if venice_client.pool_size == 0 || venice_client.pool_size > 1024 {
            p.fail("VENICE_POOL_SIZE", "must be between 1 and 1024");
        }
        if venice_client.retries > 10 {
            p.fail("VENICE_RETRIES", "must be at most 10");
        }
        if venice_client.breaker_threshold == 0 {
            p.fail("VENICE_BREAKER_THRESHOLD", "must be at least 1");
        }
        let stripe = StripeConfig::parse(p, raw);
        let economy = EconomyConfig::parse(
            p,
            &raw.ducat_to_usd_rate,
            &raw.transaction_fee_percent,
            &raw.min_investment_usd,
        );
        let verification_threshold =
            p.decimal("VERIFICATION_THRESHOLD", &raw.verification_threshold, "0.8");
        if verification_threshold.millionths() > Decimal6::SCALE {
            p.fail("VERIFICATION_THRESHOLD", "must be between 0 and 1");
        }
        let consciousness = ConsciousnessConfig {
            sync_interval: p.positive_duration(
                "CONSCIOUSNESS_SYNC_INTERVAL",
                &raw.consciousness_sync_interval,
                Duration::from_secs(30),
            ),
            cache_ttl: p.positive_duration(
                "CONSCIOUSNESS_CACHE_TTL",
                &raw.consciousness_cache_ttl,
                Duration::from_secs(300),
            ),
            verification_threshold,
            session_idle: p.positive_duration(
                "CONSCIOUSNESS_SESSION_IDLE",
                &raw.consciousness_session_idle,
                Duration::from_secs(300),
            ),
        };
        let interactions = InteractionsConfig::parse(p, raw);
        AppConfig {
            venice,
            venice_client,
            economy,
            consciousness,
            interactions,
            stripe,
        }
    }

    /// The application's cache namespaces: Venice data 300 s (seed 001), its last good copies
    /// `VENICE_STALE_IF_ERROR`, patterns `CONSCIOUSNESS_CACHE_TTL`; spaces and their
    /// participants 300 s, list pages 180 s (as seed 003's listings), all removed by the
    /// writes that change them.
    pub fn namespaces(&self) -> Vec<Namespace> {
        vec![
            Namespace::new(VENICE, Duration::from_secs(300)),
            Namespace::new(
                VENICE_LAST_GOOD,
                self.venice_client
                    .stale_if_error
                    .max(Duration::from_secs(1)),
            ),
            Namespace::new(PATTERNS, self.consciousness.cache_ttl),
            Namespace::new(SPACES, Duration::from_secs(300)),
            Namespace::new(SPACE_LISTS, Duration::from_secs(180)),
            Namespace::new(SPACE_PARTICIPANTS, Duration::from_secs(300)),
            Namespace::new(INVESTMENTS, Duration::from_secs(300)),
        ]
    }

    /// Rows for `cascade config`, secrets redacted.
    pub fn describe(&self) -> Vec<(&'static str, String)> {
        let secs = |d: Duration| format!("{}s", d.as_secs_f64());
        let set = |s: &Option<Secret>| match s {
            Some(_) => "*** (set)".to_string(),
            None => "(not set)".to_string(),
        };
        vec![
            ("VENICE_API_URL", self.venice.url.clone()),
            ("VENICE_API_KEY", set(&self.venice.api_key)),
            (
                "VENICE_STALE_IF_ERROR",
                secs(self.venice_client.stale_if_error),
            ),
            ("VENICE_POOL_SIZE", self.venice_client.pool_size.to_string()),
            (
                "VENICE_CONNECT_TIMEOUT",
                secs(self.venice_client.connect_timeout),
            ),
            (
                "VENICE_REQUEST_TIMEOUT",
                secs(self.venice_client.request_timeout),
            ),
            ("VENICE_RETRIES", self.venice_client.retries.to_string()),
            (
                "VENICE_BREAKER_THRESHOLD",
                self.venice_client.breaker_threshold.to_string(),
            ),
            (
                "VENICE_BREAKER_COOL_DOWN",
                secs(self.venice_client.breaker_cool_down),
            ),
            (
                "DUCAT_TO_USD_RATE",
                self.economy.ducat_to_usd_rate.to_string(),
            ),
            (
                "TRANSACTION_FEE_PERCENT",
                self.economy.transaction_fee_percent.to_string(),
            ),
            (
                "MIN_INVESTMENT_USD",
                self.economy.min_investment_usd.to_string(),
            ),
            (
                "CONSCIOUSNESS_SYNC_INTERVAL",
                secs(self.consciousness.sync_interval),
            ),
            (
                "CONSCIOUSNESS_CACHE_TTL",
                secs(self.consciousness.cache_ttl),
            ),
            (
                "VERIFICATION_THRESHOLD",
                self.consciousness.verification_threshold.to_string(),
            ),
            (
                "CONSCIOUSNESS_SESSION_IDLE",
                secs(self.consciousness.session_idle),
            ),
            ("INTERACTIONS_BUFFER", self.interactions.buffer.to_string()),
            ("INTERACTIONS_BATCH", self.interactions.batch.to_string()),
            (
                "INTERACTIONS_FLUSH_INTERVAL",
                secs(self.interactions.flush_interval),
            ),
            (
                "INTERACTIONS_RETENTION",
                self.interactions
                    .retention
                    .map_or_else(|| "0 (kept)".to_string(), secs),
            ),
            (
                "INTERACTIONS_SWEEP_INTERVAL",
                secs(self.interactions.sweep_interval),
            ),
        ]
        .into_iter()
        .chain(self.stripe.describe())
        .collect()
    }
}

impl InteractionsConfig {
    fn parse(p: &mut Parser, raw: &RawAppConfig) -> InteractionsConfig {
        let buffer = p.number(
            "INTERACTIONS_BUFFER",
            raw.interactions_buffer.as_deref(),
            10_000,
            "a number of interactions",
        );
        if !(1..=1_000_000).contains(&buffer) {
            p.fail("INTERACTIONS_BUFFER", "must be between 1 and 1000000");
        }
        let batch = p.number(
            "INTERACTIONS_BATCH",
            raw.interactions_batch.as_deref(),
            500,
            "a number of rows",
        );
        if !(1..=10_000).contains(&batch) {
            p.fail("INTERACTIONS_BATCH", "must be between 1 and 10000");
        }
        let retention = p.duration(
            "INTERACTIONS_RETENTION",
            &raw.interactions_retention,
            Duration::from_secs(30 * 24 * 3600),
        );
        InteractionsConfig {
            buffer,
            batch,
            flush_interval: p.positive_duration(
                "INTERACTIONS_FLUSH_INTERVAL",
                &raw.interactions_flush_interval,
                Duration::from_secs(1),
            ),
            retention: (!retention.is_zero()).then_some(retention),
            sweep_interval: p.positive_duration(
                "INTERACTIONS_SWEEP_INTERVAL",
                &raw.interactions_sweep_interval,
                Duration::from_secs(600),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issue_vars(f: impl FnOnce(&mut RawAppConfig)) -> Vec<&'static str> {
        let mut raw = RawAppConfig::default();
        f(&mut raw);
        let mut p = Parser::new();
        let config = AppConfig::parse(&mut p, &raw);
        p.finish(config)
            .err()
            .map(|e| e.0.iter().map(|i| i.var).collect())
            .unwrap_or_default()
    }

    #[test]
    fn economy_values_are_exact_and_bounded() {
        let mut p = Parser::new();
        let c = AppConfig::parse(&mut p, &RawAppConfig::default());
        let c = p.finish(c).unwrap();
        assert_eq!(c.economy.ducat_to_usd_rate.to_string(), "0.10");
        assert_eq!(
            issue_vars(|r| r.verification_threshold = Some("1.5".into())),
            vec!["VERIFICATION_THRESHOLD"]
        );
        assert_eq!(
            issue_vars(|r| r.ducat_to_usd_rate = Some("0".into())),
            vec!["DUCAT_TO_USD_RATE"]
        );
        assert_eq!(
            issue_vars(|r| r.venice_api_url = Some("ftp://x".into())),
            vec!["VENICE_API_URL"]
        );
    }

    #[test]
    fn the_interaction_log_is_bounded_and_zero_retention_keeps_rows() {
        let mut p = Parser::new();
        let c = AppConfig::parse(&mut p, &RawAppConfig::default());
        let c = p.finish(c).unwrap();
        assert_eq!(c.interactions.buffer, 10_000);
        assert_eq!(
            c.interactions.retention,
            Some(Duration::from_secs(30 * 24 * 3600))
        );
        let mut p = Parser::new();
        let raw = RawAppConfig {
            interactions_retention: Some("0".into()),
            ..RawAppConfig::default()
        };
        let c = AppConfig::parse(&mut p, &raw);
        assert_eq!(c.interactions.retention, None);
        for (var, f) in [
            (
                "INTERACTIONS_BUFFER",
                (|r: &mut RawAppConfig| r.interactions_buffer = Some("0".into()))
                    as fn(&mut RawAppConfig),
            ),
            ("INTERACTIONS_BATCH", |r| {
                r.interactions_batch = Some("100000".into())
            }),
            ("INTERACTIONS_FLUSH_INTERVAL", |r| {
                r.interactions_flush_interval = Some("0".into())
            }),
            ("INTERACTIONS_RETENTION", |r| {
                r.interactions_retention = Some("a month".into())
            }),
        ] {
            assert_eq!(issue_vars(f), vec![var]);
        }
    }

    #[test]
    fn patterns_live_as_long_as_consciousness_cache_ttl_says() {
        let mut p = Parser::new();
        let raw = RawAppConfig {
            consciousness_cache_ttl: Some("45".into()),
            ..RawAppConfig::default()
        };
        let c = AppConfig::parse(&mut p, &raw);
        let patterns = c
            .namespaces()
            .into_iter()
            .find(|n| n.name == PATTERNS)
            .unwrap();
        assert_eq!(patterns.ttl, Some(Duration::from_secs(45)));
        assert!(p.finish(()).is_ok());
    }
}
