//! Configuration: one typed struct, parsed once from flags, the environment and `.env`.
//!
//! [`RawConfig`] is what clap reads (every field has a `--flag` and the seeds' env var, so
//! `cascade --help` documents them all). [`Config::from_raw`] turns it into domain values and
//! collects *every* problem, each naming its variable, before anything connects.

mod values;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

pub use values::{Decimal6, Secret, parse_duration, redact_url};

const SECOND: Duration = Duration::from_secs(1);
const MILLI: Duration = Duration::from_millis(1);

/// Everything Cascade reads from flags and the environment, as text.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RawConfig {
    /// PostgreSQL URL (postgresql://user:password@host:port/db). Unset: a private embedded
    /// PostgreSQL is started from the installed server binaries.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,
    /// Alias of DATABASE_URL (seed 003).
    #[arg(long, env = "PG_URL", global = true, hide_env_values = true)]
    pub pg_url: Option<String>,
    /// PostgreSQL host, used when no URL is given (seed 002).
    #[arg(long, env = "POSTGRES_HOST", global = true)]
    pub postgres_host: Option<String>,
    /// PostgreSQL port, with POSTGRES_HOST.
    #[arg(long, env = "POSTGRES_PORT", global = true)]
    pub postgres_port: Option<String>,
    /// PostgreSQL database, with POSTGRES_HOST.
    #[arg(long, env = "POSTGRES_DB", global = true)]
    pub postgres_db: Option<String>,
    /// PostgreSQL user, with POSTGRES_HOST.
    #[arg(long, env = "POSTGRES_USER", global = true)]
    pub postgres_user: Option<String>,
    /// PostgreSQL password, with POSTGRES_HOST.
    #[arg(long, env = "POSTGRES_PASSWORD", global = true, hide_env_values = true)]
    pub postgres_password: Option<String>,
    /// Connections kept open in the pool [default: 2].
    #[arg(long, env = "PG_POOL_MIN", global = true)]
    pub pg_pool_min: Option<String>,
    /// Most connections the pool opens [default: 20].
    #[arg(long, env = "PG_POOL_MAX", global = true)]
    pub pg_pool_max: Option<String>,
    /// Alias of PG_POOL_MIN (seed 002).
    #[arg(long, env = "POSTGRES_POOL_MIN_SIZE", global = true)]
    pub postgres_pool_min_size: Option<String>,
    /// Alias of PG_POOL_MAX (seed 002).
    #[arg(long, env = "POSTGRES_POOL_MAX_SIZE", global = true)]
    pub postgres_pool_max_size: Option<String>,
    /// How long a request waits for a pool connection before failing with 503 [default: 2s].
    #[arg(long, env = "PG_ACQUIRE_TIMEOUT", global = true)]
    pub pg_acquire_timeout: Option<String>,
    /// Server-side statement_timeout of request connections [default: 10s].
    #[arg(long, env = "PG_STATEMENT_TIMEOUT", global = true)]
    pub pg_statement_timeout: Option<String>,
    /// Deadline of one connection attempt [default: 3s].
    #[arg(long, env = "PG_CONNECT_TIMEOUT", global = true)]
    pub pg_connect_timeout: Option<String>,
    /// Total time startup keeps retrying PostgreSQL before exiting [default: 30s].
    #[arg(long, env = "PG_STARTUP_TIMEOUT", global = true)]
    pub pg_startup_timeout: Option<String>,
    /// Data directory of the embedded PostgreSQL [default: ./.cascade].
    #[arg(long, env = "CASCADE_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Redis URL. Unset: no Redis, the cache tier is in-process only.
    #[arg(long, env = "REDIS_URL", global = true, hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Deadline of every Redis call [default: 250ms].
    #[arg(long, env = "REDIS_TIMEOUT", global = true)]
    pub redis_timeout: Option<String>,
    /// Shared cache tier: redis, postgres (UNLOGGED table, seed 002) or memory [default: redis
    /// when REDIS_URL is set, else memory].
    #[arg(long, env = "CACHE_BACKEND", global = true)]
    pub cache_backend: Option<String>,
    /// Per-namespace TTLs as a JSON object of milliseconds, e.g. {"assets":300000} (seed 003).
    #[arg(long, env = "CACHE_TTLS_JSON", global = true)]
    pub cache_ttls_json: Option<String>,
    /// TTL of namespaces without their own [default: 300s].
    #[arg(long, env = "CACHE_DEFAULT_TTL", global = true)]
    pub cache_default_ttl: Option<String>,
    /// How often expired rows leave the PostgreSQL cache table [default: 60s].
    #[arg(long, env = "CACHE_CLEANUP_INTERVAL", global = true)]
    pub cache_cleanup_interval: Option<String>,
    /// Namespaces refreshed early (probabilistically, before expiry, by one caller), comma-separated.
    #[arg(long, env = "CACHE_EARLY_REFRESH", global = true)]
    pub cache_early_refresh: Option<String>,
    /// Prefix of every key Cascade writes to Redis [default: cascade:].
    #[arg(long, env = "CACHE_KEY_PREFIX", global = true)]
    pub cache_key_prefix: Option<String>,
    /// Sliding lifetime of a login session [default: 1800s].
    #[arg(long, env = "SESSION_DEFAULT_TTL", global = true)]
    pub session_default_ttl: Option<String>,
    /// How often expired sessions are removed [default: 300s].
    #[arg(long, env = "SESSION_CLEANUP_INTERVAL", global = true)]
    pub session_cleanup_interval: Option<String>,
    /// HS256 signing secret of access tokens, at least 32 bytes.
    #[arg(long, env = "JWT_SECRET", global = true, hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Lifetime of an access token (JWT) [default: 15m].
    #[arg(long, env = "ACCESS_TOKEN_TTL", global = true)]
    pub access_token_ttl: Option<String>,
    /// `iss` claim of access tokens [default: cascade].
    #[arg(long, env = "JWT_ISSUER", global = true)]
    pub jwt_issuer: Option<String>,
    /// `aud` claim of access tokens [default: cascade-api].
    #[arg(long, env = "JWT_AUDIENCE", global = true)]
    pub jwt_audience: Option<String>,
    /// Login attempts allowed per username and per client address, as N/period [default: 5/1m].
    #[arg(long, env = "RATE_LIMIT_LOGIN", global = true)]
    pub rate_limit_login: Option<String>,
    /// Registrations and token refreshes per client address, as N/period [default: 20/1m].
    #[arg(long, env = "RATE_LIMIT_AUTH", global = true)]
    pub rate_limit_auth: Option<String>,
    /// Authenticated API calls per user, as N/period, or off [default: 100/1s].
    #[arg(long, env = "RATE_LIMIT_API", global = true)]
    pub rate_limit_api: Option<String>,
    /// Base URL of the Venice citizen ledger API [default: https://serenissima.ai/api].
    #[arg(long, env = "VENICE_API_URL", global = true)]
    pub venice_api_url: Option<String>,
    /// Bearer key of the Venice API.
    #[arg(long, env = "VENICE_API_KEY", global = true, hide_env_values = true)]
    pub venice_api_key: Option<String>,
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
    /// Whether lineage bundles use the shared (Redis) tier [default: true].
    #[arg(long, env = "USE_REDIS_BUNDLES", global = true)]
    pub use_redis_bundles: Option<String>,
    /// Stripe secret key.
    #[arg(long, env = "STRIPE_API_KEY", global = true, hide_env_values = true)]
    pub stripe_api_key: Option<String>,
    /// Secret that signs Stripe webhooks (Stripe-Signature).
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
    /// Address the HTTP server listens on [default: 127.0.0.1].
    #[arg(long, env = "HOST", global = true)]
    pub host: Option<String>,
    /// Port the HTTP server listens on [default: 8000].
    #[arg(long, env = "PORT", global = true)]
    pub port: Option<String>,
    /// Deadline of one HTTP request [default: 30s].
    #[arg(long, env = "REQUEST_TIMEOUT", global = true)]
    pub request_timeout: Option<String>,
    /// Largest accepted request body in bytes [default: 1048576].
    #[arg(long, env = "BODY_LIMIT_BYTES", global = true)]
    pub body_limit_bytes: Option<String>,
    /// How long shutdown waits for in-flight requests [default: 30s].
    #[arg(long, env = "SHUTDOWN_TIMEOUT", global = true)]
    pub shutdown_timeout: Option<String>,
    /// Serve the benchmark's routes (`/bench/*`: a fixed body, queries without the cache).
    #[arg(long, env = "BENCH_ROUTES", global = true, hide = true)]
    pub bench_routes: Option<String>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "LOG_FORMAT", global = true)]
    pub log_format: Option<String>,
}

/// One configuration problem: which variable, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {message}")]
pub struct ConfigIssue {
    pub var: &'static str,
    pub message: String,
}

/// Every problem found in the configuration; startup refuses to go on while there is one.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid configuration:\n{}", .0.iter().map(|i| format!("  - {i}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError(pub Vec<ConfigIssue>);

/// Where PostgreSQL comes from.
#[derive(Debug, Clone)]
pub enum DatabaseSource {
    /// A server the user runs, from DATABASE_URL, PG_URL or POSTGRES_*.
    External {
        config: Box<tokio_postgres::Config>,
        /// The URL with its password redacted, for logs and `cascade config`.
        display: String,
        /// `host:port` as the user wrote it, for errors that must name the address.
        address: String,
    },
    /// A private PostgreSQL started from the installed binaries in this directory.
    Embedded { data_dir: PathBuf },
}

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    pub source: DatabaseSource,
    pub pool_min: usize,
    pub pool_max: usize,
    pub acquire_timeout: Duration,
    pub statement_timeout: Duration,
    pub connect_timeout: Duration,
    pub startup_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: Secret,
    pub display: String,
    pub timeout: Duration,
}

/// Which shared tier sits behind the in-process near cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheBackend {
    Redis,
    Postgres,
    Memory,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub backend: CacheBackend,
    /// TTL of each named namespace (seed defaults, then CACHE_TTLS_JSON).
    pub ttls: BTreeMap<String, Duration>,
    pub default_ttl: Duration,
    pub cleanup_interval: Duration,
    pub key_prefix: String,
    /// Namespaces whose hot keys are reloaded shortly before they expire.
    pub early_refresh: std::collections::BTreeSet<String>,
}

impl CacheConfig {
    /// The TTL of a namespace, or the default TTL when it has none of its own.
    pub fn ttl(&self, namespace: &str) -> Duration {
        self.ttls
            .get(namespace)
            .copied()
            .unwrap_or(self.default_ttl)
    }
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub host: String,
    pub port: u16,
    pub request_timeout: Duration,
    pub body_limit_bytes: usize,
    pub shutdown_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct EconomyConfig {
    pub ducat_to_usd_rate: Decimal6,
    pub transaction_fee_percent: Decimal6,
    pub min_investment_usd: Decimal6,
}

#[derive(Debug, Clone)]
pub struct ConsciousnessConfig {
    pub sync_interval: Duration,
    pub cache_ttl: Duration,
    /// In millionths of 1.0, exact.
    pub verification_threshold: Decimal6,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub url: String,
    pub api_key: Option<Secret>,
}

#[derive(Debug, Clone)]
pub struct StripeConfig {
    pub api_url: String,
    pub api_key: Option<Secret>,
    pub webhook_secret: Option<Secret>,
}

/// The validated configuration. Holding one means every value was checked.
#[derive(Debug, Clone)]
pub struct Config {
    pub http: HttpConfig,
    pub log_format: LogFormat,
    pub database: DatabaseConfig,
    pub redis: Option<RedisConfig>,
    pub cache: CacheConfig,
    pub session_default_ttl: Duration,
    pub session_cleanup_interval: Duration,
    /// None: tokens are signed with a random per-process key (logged as a warning).
    pub jwt_secret: Option<Secret>,
    pub auth: AuthConfig,
    pub venice: UpstreamConfig,
    pub economy: EconomyConfig,
    pub consciousness: ConsciousnessConfig,
    pub use_redis_bundles: bool,
    pub stripe: StripeConfig,
    /// `/bench/*` routes for `cascade bench`; off unless `BENCH_ROUTES=true`.
    pub bench_routes: bool,
}

/// Tokens and rate limits of the identity layer.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub access_token_ttl: Duration,
    pub issuer: String,
    pub audience: String,
    /// Per username and, separately, per client address.
    pub login_limit: Option<RateLimit>,
    /// Registration and refresh, per client address.
    pub auth_limit: Option<RateLimit>,
    /// Authenticated calls, per user.
    pub api_limit: Option<RateLimit>,
}

/// `count` requests per `period`, with a burst of `count`. Parsed from `N/period` (`5/1m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub count: u32,
    pub period: Duration,
}

impl std::fmt::Display for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}s", self.count, self.period.as_secs_f64())
    }
}

/// Cache namespaces and their TTLs from seed 003 (and `venice` from seed 001).
const DEFAULT_TTLS: &[(&str, u64)] = &[
    ("headers", 60),
    ("bundles", 60),
    ("assets", 300),
    ("listings", 180),
    ("lineage", 120),
    ("sessions", 1800),
    ("policies", 600),
    ("prices", 120),
    ("venice", 300),
];

/// Reads `.env` from the working directory into the environment (values already set win).
pub fn load_dotenv() {
    // A missing .env is normal; a malformed one is worth a warning, not a refusal.
    if let Err(err) = dotenvy::dotenv()
        && !err.not_found()
    {
        eprintln!("warning: .env could not be read: {err}");
    }
}

/// Collects issues while parsing so all of them are reported at once.
struct Parser {
    issues: Vec<ConfigIssue>,
}

impl Parser {
    fn fail(&mut self, var: &'static str, message: impl Into<String>) {
        self.issues.push(ConfigIssue {
            var,
            message: message.into(),
        });
    }

    fn duration(&mut self, var: &'static str, raw: &Option<String>, default: Duration) -> Duration {
        self.duration_in(var, raw, default, SECOND)
    }

    fn duration_in(
        &mut self,
        var: &'static str,
        raw: &Option<String>,
        default: Duration,
        unit: Duration,
    ) -> Duration {
        match raw.as_deref() {
            None => default,
            Some(text) => parse_duration(text, unit).unwrap_or_else(|msg| {
                self.fail(var, msg);
                default
            }),
        }
    }

    fn positive_duration(
        &mut self,
        var: &'static str,
        raw: &Option<String>,
        default: Duration,
    ) -> Duration {
        let value = self.duration(var, raw, default);
        if value.is_zero() {
            self.fail(var, "must be greater than zero");
            return default;
        }
        value
    }

    fn number<T: FromStr>(
        &mut self,
        var: &'static str,
        raw: Option<&str>,
        default: T,
        what: &str,
    ) -> T {
        match raw {
            None => default,
            Some(text) => text.trim().parse().unwrap_or_else(|_| {
                self.fail(var, format!("expected {what}, got {text:?}"));
                default
            }),
        }
    }

    fn decimal(&mut self, var: &'static str, raw: &Option<String>, default: &str) -> Decimal6 {
        let text = raw.as_deref().unwrap_or(default);
        Decimal6::parse(text).unwrap_or_else(|msg| {
            self.fail(var, msg);
            Decimal6::parse(default).unwrap_or(Decimal6::parse("0").expect("zero parses"))
        })
    }

    fn boolean(&mut self, var: &'static str, raw: &Option<String>, default: bool) -> bool {
        match raw.as_deref().map(|s| s.trim().to_ascii_lowercase()) {
            None => default,
            Some(s) if ["1", "true", "yes", "on"].contains(&s.as_str()) => true,
            Some(s) if ["0", "false", "no", "off"].contains(&s.as_str()) => false,
            Some(s) => {
                self.fail(var, format!("expected true or false, got {s:?}"));
                default
            }
        }
    }

    fn http_url(&mut self, var: &'static str, raw: &Option<String>, default: &str) -> String {
        let url = raw
            .as_deref()
            .unwrap_or(default)
            .trim()
            .trim_end_matches('/')
            .to_string();
        let ok = ["http://", "https://"].iter().any(|scheme| {
            url.strip_prefix(scheme)
                .is_some_and(|rest| !rest.is_empty())
        });
        if !ok {
            self.fail(
                var,
                format!("expected an http:// or https:// URL, got {url:?}"),
            );
        }
        url
    }

    fn secret(&mut self, raw: &Option<String>) -> Option<Secret> {
        raw.as_deref().filter(|s| !s.is_empty()).map(Secret::new)
    }

    fn non_empty(&mut self, var: &'static str, raw: &Option<String>, default: &str) -> String {
        let value = raw.as_deref().unwrap_or(default).trim();
        if value.is_empty() {
            self.fail(var, "must not be empty");
            return default.to_string();
        }
        value.to_string()
    }

    /// `N/period` (`5/1m`, `100/1s`), or `off`.
    fn rate_limit(
        &mut self,
        var: &'static str,
        raw: &Option<String>,
        default: &str,
    ) -> Option<RateLimit> {
        let text = raw.as_deref().unwrap_or(default).trim();
        if ["off", "0", "none"].contains(&text.to_ascii_lowercase().as_str()) {
            return None;
        }
        let parsed = text.split_once('/').and_then(|(count, period)| {
            let count: u32 = count.trim().parse().ok().filter(|c| *c > 0)?;
            let period = parse_duration(period.trim(), SECOND)
                .ok()
                .filter(|p| !p.is_zero())?;
            Some(RateLimit { count, period })
        });
        if parsed.is_none() {
            self.fail(
                var,
                format!("expected N/period such as 5/1m or 100/1s, or off; got {text:?}"),
            );
        }
        parsed
    }
}

impl Config {
    /// Validates the raw configuration into domain values, reporting every problem at once.
    pub fn from_raw(raw: &RawConfig) -> Result<Config, ConfigError> {
        let mut p = Parser { issues: Vec::new() };

        let database = Self::database(&mut p, raw);
        let redis = Self::redis(&mut p, raw);
        let cache = Self::cache(&mut p, raw, redis.is_some());

        let port = p.number(
            "PORT",
            raw.port.as_deref(),
            8000u16,
            "a TCP port number from 0 to 65535",
        );
        let host = raw.host.clone().unwrap_or_else(|| "127.0.0.1".into());
        if host.trim().is_empty() {
            p.fail("HOST", "must not be empty");
        }
        let body_limit_bytes = p.number(
            "BODY_LIMIT_BYTES",
            raw.body_limit_bytes.as_deref(),
            1024 * 1024usize,
            "a size in bytes",
        );
        let http = HttpConfig {
            host,
            port,
            request_timeout: p.positive_duration(
                "REQUEST_TIMEOUT",
                &raw.request_timeout,
                30 * SECOND,
            ),
            body_limit_bytes,
            shutdown_timeout: p.duration("SHUTDOWN_TIMEOUT", &raw.shutdown_timeout, 30 * SECOND),
        };
        let log_format = match raw
            .log_format
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                p.fail(
                    "LOG_FORMAT",
                    format!("expected text or json, got {other:?}"),
                );
                LogFormat::Text
            }
        };

        let jwt_secret = p.secret(&raw.jwt_secret);
        if let Some(secret) = &jwt_secret
            && secret.expose().len() < 32
        {
            p.fail(
                "JWT_SECRET",
                format!(
                    "must be at least 32 bytes long (got {}); generate one with `openssl rand -hex 32`",
                    secret.expose().len()
                ),
            );
        }

        let auth = AuthConfig {
            access_token_ttl: p.positive_duration(
                "ACCESS_TOKEN_TTL",
                &raw.access_token_ttl,
                15 * 60 * SECOND,
            ),
            issuer: p.non_empty("JWT_ISSUER", &raw.jwt_issuer, "cascade"),
            audience: p.non_empty("JWT_AUDIENCE", &raw.jwt_audience, "cascade-api"),
            login_limit: p.rate_limit("RATE_LIMIT_LOGIN", &raw.rate_limit_login, "5/1m"),
            auth_limit: p.rate_limit("RATE_LIMIT_AUTH", &raw.rate_limit_auth, "20/1m"),
            api_limit: p.rate_limit("RATE_LIMIT_API", &raw.rate_limit_api, "100/1s"),
        };

        let venice = UpstreamConfig {
            url: p.http_url(
                "VENICE_API_URL",
                &raw.venice_api_url,
                "https://serenissima.ai/api",
            ),
            api_key: p.secret(&raw.venice_api_key),
        };
        let stripe = StripeConfig {
            api_url: p.http_url(
                "STRIPE_API_URL",
                &raw.stripe_api_url,
                "https://api.stripe.com",
            ),
            api_key: p.secret(&raw.stripe_api_key),
            webhook_secret: p.secret(&raw.stripe_webhook_secret),
        };

        let economy = EconomyConfig {
            ducat_to_usd_rate: p.decimal("DUCAT_TO_USD_RATE", &raw.ducat_to_usd_rate, "0.10"),
            transaction_fee_percent: p.decimal(
                "TRANSACTION_FEE_PERCENT",
                &raw.transaction_fee_percent,
                "2.5",
            ),
            min_investment_usd: p.decimal("MIN_INVESTMENT_USD", &raw.min_investment_usd, "100"),
        };
        if economy.ducat_to_usd_rate.millionths() == 0 {
            p.fail("DUCAT_TO_USD_RATE", "must be greater than zero");
        }
        if economy.transaction_fee_percent.millionths() >= 100 * Decimal6::SCALE {
            p.fail("TRANSACTION_FEE_PERCENT", "must be below 100");
        }
        let verification_threshold =
            p.decimal("VERIFICATION_THRESHOLD", &raw.verification_threshold, "0.8");
        if verification_threshold.millionths() > Decimal6::SCALE {
            p.fail("VERIFICATION_THRESHOLD", "must be between 0 and 1");
        }
        let consciousness = ConsciousnessConfig {
            sync_interval: p.positive_duration(
                "CONSCIOUSNESS_SYNC_INTERVAL",
                &raw.consciousness_sync_interval,
                30 * SECOND,
            ),
            cache_ttl: cache.ttl("patterns"),
            verification_threshold,
        };

        let config = Config {
            http,
            log_format,
            database,
            redis,
            cache,
            session_default_ttl: p.positive_duration(
                "SESSION_DEFAULT_TTL",
                &raw.session_default_ttl,
                1800 * SECOND,
            ),
            session_cleanup_interval: p.positive_duration(
                "SESSION_CLEANUP_INTERVAL",
                &raw.session_cleanup_interval,
                300 * SECOND,
            ),
            jwt_secret,
            auth,
            venice,
            economy,
            consciousness,
            use_redis_bundles: p.boolean("USE_REDIS_BUNDLES", &raw.use_redis_bundles, true),
            stripe,
            bench_routes: p.boolean("BENCH_ROUTES", &raw.bench_routes, false),
        };
        if p.issues.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError(p.issues))
        }
    }

    fn database(p: &mut Parser, raw: &RawConfig) -> DatabaseConfig {
        let source = if let Some((var, url)) = raw
            .database_url
            .as_ref()
            .map(|u| ("DATABASE_URL", u))
            .or(raw.pg_url.as_ref().map(|u| ("PG_URL", u)))
        {
            Self::database_url(p, var, url)
        } else if let Some(host) = &raw.postgres_host {
            let port: u16 = p.number(
                "POSTGRES_PORT",
                raw.postgres_port.as_deref(),
                5432,
                "a TCP port number",
            );
            let mut config = tokio_postgres::Config::new();
            config
                .host(host)
                .port(port)
                .dbname(raw.postgres_db.as_deref().unwrap_or("cascade"))
                .user(raw.postgres_user.as_deref().unwrap_or("postgres"));
            if let Some(password) = &raw.postgres_password {
                config.password(password);
            }
            DatabaseSource::External {
                display: format!(
                    "postgresql://{}{}@{host}:{port}/{}",
                    raw.postgres_user.as_deref().unwrap_or("postgres"),
                    if raw.postgres_password.is_some() {
                        ":***"
                    } else {
                        ""
                    },
                    raw.postgres_db.as_deref().unwrap_or("cascade")
                ),
                address: format!("{host}:{port}"),
                config: Box::new(config),
            }
        } else {
            DatabaseSource::Embedded {
                data_dir: raw
                    .data_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(".cascade")),
            }
        };

        let pool_min_raw = raw
            .pg_pool_min
            .as_deref()
            .or(raw.postgres_pool_min_size.as_deref());
        let pool_max_raw = raw
            .pg_pool_max
            .as_deref()
            .or(raw.postgres_pool_max_size.as_deref());
        let pool_min_var = if raw.pg_pool_min.is_some() || raw.postgres_pool_min_size.is_none() {
            "PG_POOL_MIN"
        } else {
            "POSTGRES_POOL_MIN_SIZE"
        };
        let pool_max_var = if raw.pg_pool_max.is_some() || raw.postgres_pool_max_size.is_none() {
            "PG_POOL_MAX"
        } else {
            "POSTGRES_POOL_MAX_SIZE"
        };
        let pool_min: usize = p.number(
            pool_min_var,
            pool_min_raw,
            2,
            "a whole number of connections",
        );
        let pool_max: usize = p.number(
            pool_max_var,
            pool_max_raw,
            20,
            "a whole number of connections",
        );
        if pool_max == 0 {
            p.fail(pool_max_var, "must be at least 1");
        } else if pool_min > pool_max {
            p.fail(
                pool_min_var,
                format!("must not exceed {pool_max_var} (got {pool_min} > {pool_max})"),
            );
        }

        DatabaseConfig {
            source,
            pool_min,
            pool_max,
            acquire_timeout: p.positive_duration(
                "PG_ACQUIRE_TIMEOUT",
                &raw.pg_acquire_timeout,
                2 * SECOND,
            ),
            statement_timeout: p.positive_duration(
                "PG_STATEMENT_TIMEOUT",
                &raw.pg_statement_timeout,
                10 * SECOND,
            ),
            connect_timeout: p.positive_duration(
                "PG_CONNECT_TIMEOUT",
                &raw.pg_connect_timeout,
                3 * SECOND,
            ),
            startup_timeout: p.positive_duration(
                "PG_STARTUP_TIMEOUT",
                &raw.pg_startup_timeout,
                30 * SECOND,
            ),
        }
    }

    fn database_url(p: &mut Parser, var: &'static str, url: &str) -> DatabaseSource {
        let expected = "expected postgresql://user:password@host:port/database";
        let bad = || DatabaseSource::Embedded {
            data_dir: PathBuf::new(),
        };
        if !(url.starts_with("postgresql://") || url.starts_with("postgres://")) {
            p.fail(var, format!("{expected}, got {:?}", redact_url(url)));
            return bad();
        }
        match tokio_postgres::Config::from_str(url) {
            Ok(config) if !config.get_hosts().is_empty() => {
                let host = match &config.get_hosts()[0] {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
                };
                let port = config.get_ports().first().copied().unwrap_or(5432);
                DatabaseSource::External {
                    display: redact_url(url),
                    address: format!("{host}:{port}"),
                    config: Box::new(config),
                }
            }
            Ok(_) => {
                p.fail(var, format!("{expected}: the URL names no host"));
                bad()
            }
            Err(err) => {
                p.fail(var, format!("{expected}: {err}"));
                bad()
            }
        }
    }

    fn redis(p: &mut Parser, raw: &RawConfig) -> Option<RedisConfig> {
        let url = raw.redis_url.as_deref().filter(|u| !u.trim().is_empty())?;
        let timeout = p.positive_duration("REDIS_TIMEOUT", &raw.redis_timeout, 250 * MILLI);
        let scheme_ok = ["redis://", "rediss://", "redis+unix://", "unix://"]
            .iter()
            .any(|s| url.starts_with(s));
        if !scheme_ok || redis::Client::open(url).is_err() {
            p.fail(
                "REDIS_URL",
                format!(
                    "expected redis://[:password@]host[:port][/db], got {:?}",
                    redact_url(url)
                ),
            );
            return None;
        }
        Some(RedisConfig {
            url: Secret::new(url),
            display: redact_url(url),
            timeout,
        })
    }

    fn cache(p: &mut Parser, raw: &RawConfig, has_redis: bool) -> CacheConfig {
        let backend = match raw
            .cache_backend
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None => {
                if has_redis {
                    CacheBackend::Redis
                } else {
                    CacheBackend::Memory
                }
            }
            Some("redis") => {
                if !has_redis && raw.redis_url.is_none() {
                    p.fail("CACHE_BACKEND", "is redis but REDIS_URL is not set");
                }
                CacheBackend::Redis
            }
            Some("postgres" | "postgresql") => CacheBackend::Postgres,
            Some("memory") => CacheBackend::Memory,
            Some(other) => {
                p.fail(
                    "CACHE_BACKEND",
                    format!("expected redis, postgres or memory, got {other:?}"),
                );
                CacheBackend::Memory
            }
        };

        let mut ttls: BTreeMap<String, Duration> = DEFAULT_TTLS
            .iter()
            .map(|(ns, secs)| (ns.to_string(), Duration::from_secs(*secs)))
            .collect();
        let patterns = p.positive_duration(
            "CONSCIOUSNESS_CACHE_TTL",
            &raw.consciousness_cache_ttl,
            300 * SECOND,
        );
        ttls.insert("patterns".into(), patterns);

        if let Some(json) = raw.cache_ttls_json.as_deref() {
            match serde_json::from_str::<serde_json::Value>(json) {
                Ok(serde_json::Value::Object(map)) => {
                    for (namespace, value) in map {
                        match value.as_u64() {
                            Some(ms) if ms > 0 => {
                                ttls.insert(namespace, Duration::from_millis(ms));
                            }
                            _ => p.fail(
                                "CACHE_TTLS_JSON",
                                format!(
                                    "the TTL of {namespace:?} must be a positive whole number of milliseconds, got {value}"
                                ),
                            ),
                        }
                    }
                }
                Ok(_) => p.fail(
                    "CACHE_TTLS_JSON",
                    "expected a JSON object of namespace to milliseconds, e.g. {\"assets\":300000}",
                ),
                Err(err) => p.fail("CACHE_TTLS_JSON", format!("is not valid JSON: {err}")),
            }
        }

        let key_prefix = raw
            .cache_key_prefix
            .clone()
            .unwrap_or_else(|| "cascade:".into());
        if key_prefix.chars().any(|c| c.is_whitespace()) {
            p.fail("CACHE_KEY_PREFIX", "must not contain white space");
        }

        CacheConfig {
            backend,
            ttls,
            default_ttl: p.positive_duration(
                "CACHE_DEFAULT_TTL",
                &raw.cache_default_ttl,
                300 * SECOND,
            ),
            cleanup_interval: p.positive_duration(
                "CACHE_CLEANUP_INTERVAL",
                &raw.cache_cleanup_interval,
                60 * SECOND,
            ),
            key_prefix,
            early_refresh: raw
                .cache_early_refresh
                .as_deref()
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .filter(|ns| !ns.is_empty())
                .map(String::from)
                .collect(),
        }
    }

    /// The effective configuration as `(VARIABLE, value)` rows, secrets redacted. This is
    /// what `cascade config` and `cascade check` print.
    pub fn describe(&self) -> Vec<(&'static str, String)> {
        let secs = |d: Duration| format!("{}s", d.as_secs_f64());
        let limit = |l: Option<RateLimit>| l.map_or_else(|| "off".to_string(), |l| l.to_string());
        let set = |s: &Option<Secret>| match s {
            Some(_) => "*** (set)".to_string(),
            None => "(not set)".to_string(),
        };
        let mut rows = vec![
            ("HOST", self.http.host.clone()),
            ("PORT", self.http.port.to_string()),
            ("REQUEST_TIMEOUT", secs(self.http.request_timeout)),
            ("BODY_LIMIT_BYTES", self.http.body_limit_bytes.to_string()),
            ("SHUTDOWN_TIMEOUT", secs(self.http.shutdown_timeout)),
            (
                "LOG_FORMAT",
                format!("{:?}", self.log_format).to_lowercase(),
            ),
        ];
        match &self.database.source {
            DatabaseSource::External { display, .. } => {
                rows.push(("DATABASE_URL", display.clone()))
            }
            DatabaseSource::Embedded { data_dir } => {
                rows.push(("DATABASE_URL", "(not set: embedded PostgreSQL)".into()));
                rows.push(("CASCADE_DATA_DIR", data_dir.display().to_string()));
            }
        }
        let db = &self.database;
        rows.extend([
            ("PG_POOL_MIN", db.pool_min.to_string()),
            ("PG_POOL_MAX", db.pool_max.to_string()),
            ("PG_ACQUIRE_TIMEOUT", secs(db.acquire_timeout)),
            ("PG_STATEMENT_TIMEOUT", secs(db.statement_timeout)),
            ("PG_CONNECT_TIMEOUT", secs(db.connect_timeout)),
            ("PG_STARTUP_TIMEOUT", secs(db.startup_timeout)),
        ]);
        match &self.redis {
            Some(r) => {
                rows.push(("REDIS_URL", r.display.clone()));
                rows.push(("REDIS_TIMEOUT", secs(r.timeout)));
            }
            None => rows.push(("REDIS_URL", "(not set: in-process cache only)".into())),
        }
        let c = &self.cache;
        rows.extend([
            ("CACHE_BACKEND", format!("{:?}", c.backend).to_lowercase()),
            (
                "CACHE_TTLS",
                c.ttls
                    .iter()
                    .map(|(ns, ttl)| format!("{ns}={}", secs(*ttl)))
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            ("CACHE_DEFAULT_TTL", secs(c.default_ttl)),
            ("CACHE_CLEANUP_INTERVAL", secs(c.cleanup_interval)),
            ("CACHE_KEY_PREFIX", c.key_prefix.clone()),
            (
                "CACHE_EARLY_REFRESH",
                c.early_refresh
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            ("SESSION_DEFAULT_TTL", secs(self.session_default_ttl)),
            (
                "SESSION_CLEANUP_INTERVAL",
                secs(self.session_cleanup_interval),
            ),
            (
                "JWT_SECRET",
                match &self.jwt_secret {
                    Some(_) => "*** (set)".into(),
                    None => "(not set: random per-process key)".into(),
                },
            ),
            ("ACCESS_TOKEN_TTL", secs(self.auth.access_token_ttl)),
            ("JWT_ISSUER", self.auth.issuer.clone()),
            ("JWT_AUDIENCE", self.auth.audience.clone()),
            ("RATE_LIMIT_LOGIN", limit(self.auth.login_limit)),
            ("RATE_LIMIT_AUTH", limit(self.auth.auth_limit)),
            ("RATE_LIMIT_API", limit(self.auth.api_limit)),
            ("VENICE_API_URL", self.venice.url.clone()),
            ("VENICE_API_KEY", set(&self.venice.api_key)),
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
            ("USE_REDIS_BUNDLES", self.use_redis_bundles.to_string()),
            ("STRIPE_API_URL", self.stripe.api_url.clone()),
            ("STRIPE_API_KEY", set(&self.stripe.api_key)),
            ("STRIPE_WEBHOOK_SECRET", set(&self.stripe.webhook_secret)),
        ]);
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(f: impl FnOnce(&mut RawConfig)) -> Result<Config, ConfigError> {
        let mut raw = RawConfig::default();
        f(&mut raw);
        Config::from_raw(&raw)
    }

    fn issue_vars(f: impl FnOnce(&mut RawConfig)) -> Vec<&'static str> {
        parse(f)
            .err()
            .map(|e| e.0.iter().map(|i| i.var).collect())
            .unwrap_or_default()
    }

    #[test]
    fn defaults_are_valid_and_embedded() {
        let config = parse(|_| {}).expect("defaults parse");
        assert!(matches!(
            config.database.source,
            DatabaseSource::Embedded { .. }
        ));
        assert_eq!(config.cache.backend, CacheBackend::Memory);
        assert_eq!(config.cache.ttl("assets"), Duration::from_secs(300));
        assert_eq!(config.cache.ttl("unknown"), Duration::from_secs(300));
        assert_eq!(config.http.port, 8000);
    }

    #[test]
    fn rate_limits_parse_as_count_per_period() {
        let c = parse(|_| {}).expect("defaults parse");
        let login = c.auth.login_limit.expect("login limit on by default");
        assert_eq!((login.count, login.period), (5, Duration::from_secs(60)));
        let c = parse(|r| {
            r.rate_limit_api = Some("off".into());
            r.rate_limit_auth = Some("7/30s".into());
        })
        .expect("parses");
        assert_eq!(c.auth.api_limit, None);
        let auth = c.auth.auth_limit.expect("auth limit");
        assert_eq!((auth.count, auth.period), (7, Duration::from_secs(30)));
        assert_eq!(
            issue_vars(|r| r.rate_limit_login = Some("five per minute".into())),
            vec!["RATE_LIMIT_LOGIN"]
        );
        assert_eq!(
            issue_vars(|r| r.rate_limit_api = Some("0/1s".into())),
            vec!["RATE_LIMIT_API"]
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_variable() {
        let vars = issue_vars(|r| {
            r.jwt_secret = Some("short".into());
            r.pg_pool_min = Some("abc".into());
            r.port = Some("eighty".into());
            r.cache_ttls_json = Some("{not json".into());
        });
        assert_eq!(
            vars,
            vec!["PG_POOL_MIN", "CACHE_TTLS_JSON", "PORT", "JWT_SECRET"]
        );
    }

    #[test]
    fn pool_min_above_max_is_refused() {
        assert_eq!(
            issue_vars(|r| {
                r.pg_pool_min = Some("30".into());
                r.pg_pool_max = Some("10".into());
            }),
            vec!["PG_POOL_MIN"]
        );
        assert_eq!(
            issue_vars(|r| r.postgres_pool_max_size = Some("x".into())),
            vec!["POSTGRES_POOL_MAX_SIZE"]
        );
    }

    #[test]
    fn database_url_aliases_and_parts() {
        let c = parse(|r| r.pg_url = Some("postgres://u:pw@db.example:6543/x".into())).unwrap();
        match c.database.source {
            DatabaseSource::External {
                address, display, ..
            } => {
                assert_eq!(address, "db.example:6543");
                assert!(!display.contains("pw"));
            }
            other => panic!("expected external, got {other:?}"),
        }
        let c = parse(|r| {
            r.postgres_host = Some("pghost".into());
            r.postgres_password = Some("topsecret".into());
        })
        .unwrap();
        assert!(
            matches!(c.database.source, DatabaseSource::External { ref address, .. } if address == "pghost:5432")
        );
        assert!(!format!("{:?}", c.describe()).contains("topsecret"));
        assert_eq!(
            issue_vars(|r| r.database_url = Some("mysql://x".into())),
            vec!["DATABASE_URL"]
        );
        assert_eq!(
            issue_vars(|r| r.database_url = Some("postgresql://u@h:notaport/db".into())),
            vec!["DATABASE_URL"]
        );
    }

    #[test]
    fn cache_ttls_json_takes_milliseconds() {
        let c = parse(|r| r.cache_ttls_json = Some(r#"{"assets": 1500, "custom": 60000}"#.into()))
            .unwrap();
        assert_eq!(c.cache.ttl("assets"), Duration::from_millis(1500));
        assert_eq!(c.cache.ttl("custom"), Duration::from_secs(60));
        assert_eq!(c.cache.ttl("listings"), Duration::from_secs(180));
        assert_eq!(
            issue_vars(|r| r.cache_ttls_json = Some(r#"{"assets": -1}"#.into())),
            vec!["CACHE_TTLS_JSON"]
        );
        assert_eq!(
            issue_vars(|r| r.cache_ttls_json = Some("[1]".into())),
            vec!["CACHE_TTLS_JSON"]
        );
    }

    #[test]
    fn redis_url_and_backend() {
        let c = parse(|r| r.redis_url = Some("redis://:pw@localhost:6379/0".into())).unwrap();
        assert_eq!(c.cache.backend, CacheBackend::Redis);
        assert!(!format!("{:?}", c.describe()).contains("pw@"));
        assert_eq!(
            issue_vars(|r| r.redis_url = Some("http://nope".into())),
            vec!["REDIS_URL"]
        );
        assert_eq!(
            issue_vars(|r| r.cache_backend = Some("redis".into())),
            vec!["CACHE_BACKEND"]
        );
        let c = parse(|r| r.cache_backend = Some("postgres".into())).unwrap();
        assert_eq!(c.cache.backend, CacheBackend::Postgres);
    }

    #[test]
    fn economy_values_are_exact_and_bounded() {
        let c = parse(|_| {}).unwrap();
        assert_eq!(c.economy.ducat_to_usd_rate.millionths(), 100_000);
        assert_eq!(
            issue_vars(|r| r.verification_threshold = Some("1.5".into())),
            vec!["VERIFICATION_THRESHOLD"]
        );
        assert_eq!(
            issue_vars(|r| r.ducat_to_usd_rate = Some("0".into())),
            vec!["DUCAT_TO_USD_RATE"]
        );
        assert_eq!(
            issue_vars(|r| r.use_redis_bundles = Some("maybe".into())),
            vec!["USE_REDIS_BUNDLES"]
        );
        assert_eq!(
            issue_vars(|r| r.venice_api_url = Some("ftp://x".into())),
            vec!["VENICE_API_URL"]
        );
    }
}
