//! The cached upstream connector: a third-party JSON API (Venice's ledger, Stripe) behind the
//! cache engine, with deadlines, retries, a circuit breaker and stale-if-error.
//!
//! One [`Connector`] per upstream: its own pooled client (so one slow upstream cannot take
//! another's connections), at most `pool_size` calls in flight, bearer auth.
//!
//! **Reads go through the cache engine** (`get_or_load_bytes` in the upstream's namespace),
//! so its single-flight and Redis leases apply: however many requests, on however many
//! instances, miss one key at once, one of them calls the upstream. A 404 is cached briefly as
//! "not found" (the engine's negative TTL).
//!
//! **A call** is bounded by `request_timeout` as a whole, retries included: a hung upstream
//! costs a request at most that. Only idempotent calls are retried (this connector only
//! makes GETs; a POST added later must not go through [`Connector::call_with_retries`]),
//! on connection failures and 429/502/503/504, with exponential backoff and full jitter.
//! Every call reports to the breaker; when it is open no call is made.
//!
//! **Stale-if-error.** The namespace's TTL says how long a copy is *fresh*; past it, the
//! engine forgets the entry, so it cannot be what we fall back on. Each successful fetch
//! therefore also writes a second entry, the *last good copy*, in a namespace of its own
//! whose TTL is the stale bound (`VENICE_STALE_IF_ERROR`). When a load fails (the upstream
//! errs, times out, or its breaker is open), the last good copy is served if it is younger
//! than the bound, marked stale with its age; otherwise the caller gets
//! [`UpstreamError::Unavailable`] with a `Retry-After`. Why a second entry and not a longer
//! TTL on the first: the first's TTL is what makes reads refetch every 300 s; keeping it
//! longer would serve old data while the upstream is healthy. Why it is written after the
//! load and not inside it: a write tells every instance (the bus), and the load holds the
//! key's lease; the one caller that loaded pays for it, once per fetch.
//!
//! Both entries hold the same bytes, an envelope `{"fetched_at_ms":N,"data":<the upstream's
//! JSON>}`: the time of the fetch (wall clock, the same on every instance) gives the age, and
//! the data is sliced out without parsing it again.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::breaker::{Breaker, Permit};
use crate::cache::{BreakerState, Cache, Source};
use crate::config::Secret;
use crate::metrics;
use crate::retry::Backoff;

/// The largest upstream body accepted; larger answers count as failures.
const MAX_BODY: usize = 4 * 1024 * 1024;

/// How one upstream is reached and cached.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// A fixed name: the metrics label, log field and what an error names.
    pub name: &'static str,
    /// Base URL, without a trailing slash.
    pub base_url: String,
    pub api_key: Option<Secret>,
    pub connect_timeout: Duration,
    /// Bound of a whole call, retries included.
    pub request_timeout: Duration,
    /// Calls in flight at once, and idle connections kept.
    pub pool_size: usize,
    /// Retries of an idempotent call after the first attempt.
    pub retries: u32,
    /// Consecutive failed calls that open the breaker, and how long it stays open.
    pub breaker_threshold: u32,
    pub breaker_cool_down: Duration,
    /// Cache namespace of fresh copies (its TTL: how long a copy is served without a call).
    pub namespace: &'static str,
    /// Cache namespace of the last good copies; registered with a TTL of `stale_if_error`.
    pub last_good_namespace: &'static str,
    /// The oldest copy served when the upstream fails.
    pub stale_if_error: Duration,
}

/// One upstream's JSON, as fetched: the data, when it was fetched, and whether it is served
/// because a fresh copy could not be had.
#[derive(Clone, Debug)]
pub struct Fetched {
    envelope: Arc<[u8]>,
    data: Range<usize>,
    pub fetched_at_ms: u64,
    pub stale: bool,
}

impl Fetched {
    /// The upstream's JSON, as it sent it.
    pub fn data(&self) -> &[u8] {
        &self.envelope[self.data.clone()]
    }

    /// Time since the fetch (what an `Age` header says).
    pub fn age(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.fetched_at_ms))
    }

    fn decode(envelope: Arc<[u8]>) -> Option<Fetched> {
        let rest = envelope.strip_prefix(PREFIX)?;
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let fetched_at_ms = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
        let after = rest[digits..].strip_prefix(b",\"data\":")?;
        let start = envelope.len() - after.len();
        let end = envelope.len().checked_sub(1)?;
        (envelope.last() == Some(&b'}') && start < end).then(|| Fetched {
            data: start..end,
            envelope: envelope.clone(),
            fetched_at_ms,
            stale: false,
        })
    }
}

const PREFIX: &[u8] = b"{\"fetched_at_ms\":";

/// The envelope's serde form: what the last good copy is written and read as. Its field
/// order is the one [`Fetched::decode`] reads.
#[derive(Serialize, Deserialize)]
struct Envelope {
    fetched_at_ms: u64,
    data: serde_json::Value,
}

/// Why no answer could be given.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The upstream failed (or its breaker is open) and no copy within the stale bound is
    /// cached. The message names the upstream.
    #[error("{upstream} is unavailable ({cause}) and no copy of this resource younger than {}s is cached", bound.as_secs())]
    Unavailable {
        upstream: &'static str,
        cause: String,
        bound: Duration,
        retry_after: Duration,
    },
}

/// Why one call failed (what the breaker and the log see).
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("circuit breaker open")]
    BreakerOpen,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Transport(String),
    /// 429 or 5xx: the upstream is in trouble.
    #[error("HTTP {0}")]
    Status(u16),
    /// Any other 4xx: the upstream is up but refuses us (a bad key, say).
    #[error("HTTP {0}")]
    Refused(u16),
    #[error("unusable answer: {0}")]
    Invalid(String),
}

impl CallError {
    fn retryable(&self) -> bool {
        match self {
            CallError::Transport(_) => true,
            CallError::Status(code) => matches!(code, 429 | 502 | 503 | 504),
            _ => false,
        }
    }

    /// Whether the upstream is unhealthy (counts toward opening the breaker).
    fn counts_against_upstream(&self) -> bool {
        !matches!(self, CallError::Refused(_) | CallError::BreakerOpen)
    }
}

/// A cheap-to-clone handle on one upstream.
#[derive(Clone)]
pub struct Connector {
    inner: Arc<Inner>,
}

struct Inner {
    settings: UpstreamSettings,
    client: reqwest::Client,
    breaker: Breaker,
    /// Bounds the calls in flight to `pool_size`.
    slots: Semaphore,
    cache: Cache,
}

impl Connector {
    pub fn new(settings: UpstreamSettings, cache: Cache) -> reqwest::Result<Connector> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let pool_size = settings.pool_size.max(1);
        let client = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.request_timeout)
            .pool_max_idle_per_host(pool_size)
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("cascade/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Connector {
            inner: Arc::new(Inner {
                breaker: Breaker::new(
                    settings.name,
                    settings.breaker_threshold,
                    settings.breaker_cool_down,
                ),
                slots: Semaphore::new(pool_size),
                settings,
                client,
                cache,
            }),
        })
    }

    pub fn name(&self) -> &'static str {
        self.inner.settings.name
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.inner.breaker.state()
    }

    /// `GET {base_url}{path}?{query}`, cached under `key` in the upstream's namespace.
    /// `Ok(None)`: the upstream answered 404 (cached briefly). A failed load falls back on
    /// the last good copy within the stale bound (see the module doc).
    pub async fn get_json(
        &self,
        key: &str,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<Option<Fetched>, UpstreamError> {
        let settings = &self.inner.settings;
        let url = url(&settings.base_url, path, query);
        let loaded = self
            .inner
            .cache
            .get_or_load_bytes(settings.namespace, key, &[], || self.load(&url))
            .await;
        match loaded {
            Ok((None, _)) => Ok(None),
            Ok((Some(bytes), source)) => match Fetched::decode(bytes) {
                Some(fetched) => {
                    if source == Source::Loaded {
                        self.keep_last_good(key, &fetched).await;
                    }
                    Ok(Some(fetched))
                }
                None => {
                    // Not an envelope (written by something else): refetch it next time.
                    self.inner.cache.invalidate(settings.namespace, key).await;
                    self.stale_or_unavailable(key, CallError::Invalid("bad cache entry".into()))
                        .await
                }
            },
            Err(err) => self.stale_or_unavailable(key, err).await,
        }
    }

    /// The loader: one call, its outcome reported to the breaker, the data wrapped in the
    /// envelope. `None`: a 404.
    async fn load(&self, url: &str) -> Result<Option<Vec<u8>>, CallError> {
        let breaker = &self.inner.breaker;
        if breaker.permit() == Permit::Skip {
            return Err(CallError::BreakerOpen);
        }
        let bound = self.inner.settings.request_timeout;
        let result = tokio::time::timeout(bound, self.call_with_retries(url))
            .await
            .unwrap_or(Err(CallError::Timeout(bound)));
        match &result {
            Err(err) if err.counts_against_upstream() => {
                breaker.failure();
            }
            _ => breaker.success(),
        }
        let data = match result {
            Ok(Some(data)) => data,
            Ok(None) => return Ok(None),
            Err(err) => {
                tracing::warn!(upstream = self.name(), error = %err, "upstream call failed");
                return Err(err);
            }
        };
        let mut envelope = Vec::with_capacity(data.len() + 48);
        envelope.extend_from_slice(PREFIX);
        envelope.extend_from_slice(now_ms().to_string().as_bytes());
        envelope.extend_from_slice(b",\"data\":");
        envelope.extend_from_slice(data.trim_ascii());
        envelope.push(b'}');
        Ok(Some(envelope))
    }

    /// Attempts of an idempotent GET, with backoff and full jitter between them.
    async fn call_with_retries(&self, url: &str) -> Result<Option<Vec<u8>>, CallError> {
        self.with_retries(|| self.attempt(url)).await
    }

    /// Runs `attempt` again after a retryable failure, up to `retries` more times, with backoff
    /// and full jitter in between: only for calls that are safe to repeat.
    async fn with_retries<T, F: Future<Output = Result<T, CallError>>>(
        &self,
        attempt: impl Fn() -> F,
    ) -> Result<T, CallError> {
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            total: self.inner.settings.request_timeout,
        };
        let mut tries = 0;
        loop {
            match attempt().await {
                Err(err) if err.retryable() && tries < self.inner.settings.retries => {
                    tracing::debug!(upstream = self.name(), attempt = tries, error = %err, "retrying");
                    tokio::time::sleep(backoff.delay(tries)).await;
                    tries += 1;
                }
                other => return other,
            }
        }
    }

    /// Sends `request` with the bearer key, holding one of the `pool_size` slots for as long as
    /// the returned permit lives (until the body is read).
    async fn send_in_slot(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<(tokio::sync::SemaphorePermit<'_>, reqwest::Response), CallError> {
        let inner = &self.inner;
        let slot = inner
            .slots
            .acquire()
            .await
            .map_err(|_| CallError::Transport("connector closed".into()))?;
        let request = match &inner.settings.api_key {
            Some(key) => request.bearer_auth(key.expose()),
            None => request,
        };
        let response = super::send(inner.settings.name, request)
            .await
            .map_err(|err| self.transport_error(err))?;
        Ok((slot, response))
    }

    fn transport_error(&self, err: reqwest::Error) -> CallError {
        match err.is_timeout() {
            true => CallError::Timeout(self.inner.settings.request_timeout),
            false => CallError::Transport(crate::db::error_chain(&err)),
        }
    }

    async fn attempt(&self, url: &str) -> Result<Option<Vec<u8>>, CallError> {
        let (_slot, response) = self.send_in_slot(self.inner.client.get(url)).await?;
        let status = response.status().as_u16();
        match status {
            404 => return Ok(None),
            200..=299 => {}
            429 | 500..=599 => return Err(CallError::Status(status)),
            _ => return Err(CallError::Refused(status)),
        }
        if response
            .content_length()
            .is_some_and(|n| n > MAX_BODY as u64)
        {
            return Err(CallError::Invalid("body too large".into()));
        }
        let body = response
            .bytes()
            .await
            .map_err(|err| self.transport_error(err))?;
        if body.len() > MAX_BODY {
            return Err(CallError::Invalid("body too large".into()));
        }
        serde_json::from_slice::<serde::de::IgnoredAny>(&body)
            .map_err(|err| CallError::Invalid(format!("not JSON: {err}")))?;
        Ok(Some(body.to_vec()))
    }

    /// `POST {base_url}{path}` with a form-encoded body and an `Idempotency-Key` (Stripe's
    /// convention): never cached, under the same breaker, slots, deadline and metrics as reads,
    /// and retried as they are, which the key makes safe (the upstream answers a replayed key
    /// with its first answer and does nothing twice). `Ok` with the status and JSON of any
    /// answer but 429 and 5xx (a 4xx is the upstream's word on the request, for the caller).
    pub async fn post_form(
        &self,
        path: &str,
        form: &[(&str, &str)],
        idempotency_key: &str,
    ) -> Result<(u16, serde_json::Value), UpstreamError> {
        let url = url(&self.inner.settings.base_url, path, &[]);
        let mut body = String::new();
        for (i, (name, value)) in form.iter().enumerate() {
            if i > 0 {
                body.push('&');
            }
            encode_into(&mut body, name);
            body.push('=');
            encode_into(&mut body, value);
        }
        self.uncached(|| self.post_attempt(&url, &body, idempotency_key))
            .await
    }

    /// `GET {base_url}{path}?{query}`, never cached (a listing that must be current, such as
    /// Stripe's events): the status and JSON of any answer but 429 and 5xx, under the same
    /// breaker, slots, deadline, retries and metrics as [`Connector::post_form`].
    pub async fn get_uncached(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<(u16, serde_json::Value), UpstreamError> {
        let url = url(&self.inner.settings.base_url, path, query);
        self.uncached(|| self.get_attempt(&url)).await
    }

    /// One uncached call, retried, bounded by the deadline and reported to the breaker.
    async fn uncached<F, Fut>(&self, attempt: F) -> Result<(u16, serde_json::Value), UpstreamError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(u16, serde_json::Value), CallError>>,
    {
        let settings = &self.inner.settings;
        let breaker = &self.inner.breaker;
        let unavailable = |cause: CallError| UpstreamError::Unavailable {
            upstream: settings.name,
            retry_after: match cause {
                CallError::BreakerOpen => breaker.retry_after(),
                _ => Duration::from_secs(1),
            },
            cause: cause.to_string(),
            bound: Duration::ZERO,
        };
        if breaker.permit() == Permit::Skip {
            return Err(unavailable(CallError::BreakerOpen));
        }
        let calls = self.with_retries(attempt);
        let result = tokio::time::timeout(settings.request_timeout, calls)
            .await
            .unwrap_or(Err(CallError::Timeout(settings.request_timeout)));
        match result {
            Ok(answer) => {
                breaker.success();
                Ok(answer)
            }
            Err(err) => {
                if err.counts_against_upstream() {
                    breaker.failure();
                }
                tracing::warn!(upstream = self.name(), error = %err, "upstream call failed");
                Err(unavailable(err))
            }
        }
    }

    async fn get_attempt(&self, url: &str) -> Result<(u16, serde_json::Value), CallError> {
        self.answer(self.inner.client.get(url)).await
    }

    async fn post_attempt(
        &self,
        url: &str,
        body: &str,
        idempotency_key: &str,
    ) -> Result<(u16, serde_json::Value), CallError> {
        let request = self
            .inner
            .client
            .post(url)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("idempotency-key", idempotency_key)
            .body(body.to_string());
        self.answer(request).await
    }

    /// Sends `request` in a slot: the status and JSON of any answer but 429 and 5xx.
    async fn answer(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<(u16, serde_json::Value), CallError> {
        let (_slot, response) = self.send_in_slot(request).await?;
        let status = response.status().as_u16();
        if matches!(status, 429 | 500..=599) {
            return Err(CallError::Status(status));
        }
        let body = response
            .bytes()
            .await
            .map_err(|err| self.transport_error(err))?;
        if body.len() > MAX_BODY {
            return Err(CallError::Invalid("body too large".into()));
        }
        let json = serde_json::from_slice(&body)
            .map_err(|err| CallError::Invalid(format!("not JSON: {err}")))?;
        Ok((status, json))
    }

    /// Writes the last good copy: the fallback once the fresh entry has expired.
    async fn keep_last_good(&self, key: &str, fetched: &Fetched) {
        let settings = &self.inner.settings;
        let Ok(data) = serde_json::from_slice(fetched.data()) else {
            return;
        };
        let envelope = Envelope {
            fetched_at_ms: fetched.fetched_at_ms,
            data,
        };
        if let Err(err) = self
            .inner
            .cache
            .set(settings.last_good_namespace, key, &envelope, &[])
            .await
        {
            tracing::warn!(upstream = settings.name, error = %err, "last good copy not kept");
        }
    }

    async fn stale_or_unavailable(
        &self,
        key: &str,
        cause: CallError,
    ) -> Result<Option<Fetched>, UpstreamError> {
        let settings = &self.inner.settings;
        let kept = self
            .inner
            .cache
            .get::<Envelope>(settings.last_good_namespace, key)
            .await
            .ok()
            .flatten();
        if let Some(envelope) = kept {
            let age = Duration::from_millis(now_ms().saturating_sub(envelope.fetched_at_ms));
            if age <= settings.stale_if_error
                && let Ok(bytes) = serde_json::to_vec(&envelope)
                && let Some(mut fetched) = Fetched::decode(bytes.into())
            {
                fetched.stale = true;
                metrics::record_upstream_stale(settings.name);
                return Ok(Some(fetched));
            }
        }
        let retry_after = match cause {
            CallError::BreakerOpen => self.inner.breaker.retry_after(),
            _ => Duration::from_secs(1),
        };
        Err(UpstreamError::Unavailable {
            upstream: settings.name,
            cause: cause.to_string(),
            bound: settings.stale_if_error,
            retry_after,
        })
    }
}

/// `base` + `path` + the query, percent-encoded (RFC 3986 unreserved characters kept).
fn url(base: &str, path: &str, query: &[(&str, &str)]) -> String {
    let mut url = String::with_capacity(base.len() + path.len() + 32);
    url.push_str(base);
    url.push_str(path);
    for (i, (name, value)) in query.iter().enumerate() {
        url.push(if i == 0 { '?' } else { '&' });
        encode_into(&mut url, name);
        url.push('=');
        encode_into(&mut url, value);
    }
    url
}

fn encode_into(out: &mut String, text: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &byte in text.as_bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_envelope_is_sliced_without_parsing_and_matches_its_serde_form() {
        let serde = serde_json::to_vec(&Envelope {
            fetched_at_ms: 1234,
            data: serde_json::json!({"a": [1, 2]}),
        })
        .unwrap();
        let fetched = Fetched::decode(serde.into()).unwrap();
        assert_eq!(fetched.fetched_at_ms, 1234);
        assert_eq!(fetched.data(), br#"{"a":[1,2]}"#);
        assert!(Fetched::decode(Arc::from(&b"{\"a\":1}"[..])).is_none());
        assert!(Fetched::decode(Arc::from(&b"{\"fetched_at_ms\":1,\"data\":}"[..])).is_none());
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(
            url(
                "http://v/api",
                "/get-ledger",
                &[("citizenUsername", "a b&c/é")]
            ),
            "http://v/api/get-ledger?citizenUsername=a%20b%26c%2F%C3%A9"
        );
    }
}
