//! Cascade's core: everything the HTTP server and the modules share.
//!
//! - [`cache`]: the cache engine (namespaces, leases, tags, Redis behind a breaker);
//! - [`config`]: one typed configuration, parsed and validated before anything connects;
//! - [`db`]: the PostgreSQL pool, embedded migrations and the embedded default server;
//! - [`events`]: domain events published to every instance (Redis pub/sub or PostgreSQL NOTIFY);
//! - [`identity`]: accounts, sessions, access and refresh tokens, rate limiting;
//! - [`metrics`]: metric names, their help text, and recording for WebSocket and upstream code;
//! - [`redis`]: a Redis client that reconnects by itself, every call under a deadline;
//! - [`retry`]: bounded retries with backoff and jitter;
//! - [`shutdown`]: the signal that stops background tasks;
//! - [`tasks`]: the supervisor that owns background tasks and reports their failures;
//! - [`upstream`]: the HTTP client used for third-party APIs.

pub mod audit;
pub mod cache;
pub mod config;
pub mod db;
pub mod events;
pub mod identity;
pub mod metrics;
pub mod redis;
pub mod retry;
pub mod shutdown;
pub mod tasks;
pub mod upstream;
