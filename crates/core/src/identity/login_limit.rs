//! The per-username login ceiling: slows a guesser spread over many addresses without
//! locking the account's owner out.
//!
//! A login is counted three ways before its password is checked (the HTTP layer runs the
//! first two through [`RateLimiter::check`]):
//!
//! 1. per client network (`RATE_LIMIT_AUTH`): one network spraying many usernames;
//! 2. per (username, client network) pair (`RATE_LIMIT_LOGIN`): one network guessing at one
//!    account. Nobody else shares this budget, so nobody else can spend the owner's;
//! 3. per username, from networks that have never logged in to it ([`RateLimiter::login_admit`]):
//!    after [`LoginBackoff::free`] failures without a success, each further attempt waits
//!    [`LoginBackoff::base`], doubled per failure, at most [`LoginBackoff::cap`]. A network
//!    the username logged in from (within [`KNOWN_FOR`]) is not held back, so the owner at
//!    home still gets in while a spray from everywhere else is slowed to one guess per `cap`.
//!    A success resets the count.
//!
//! An attempt from an unknown network is counted, and the wait reserved, when it is admitted,
//! not when its password turns out wrong (after the hash): concurrent guesses cannot all slip
//! through while the count is below the free failures, nor when a wait ends. A success resets
//! the count, so the owner's own attempts cost nothing once they get in. Keys use the username's
//! [`key`](super::Username::key), the same case folding as the account lookup, under one
//! Redis Cluster hash tag per username (`ratelimit:login:{alice}:…`). State lives in Redis
//! with Redis's clock; while Redis is unavailable, each instance keeps its own, with `1/n` of
//! the free failures, like the GCRA limits.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use super::Username;
use super::local_table::LocalTable;
use super::ratelimit::{Decision, RateLimiter};
use crate::config::LoginBackoff;

/// How long a network stays known to a username after a successful login from it.
pub const KNOWN_FOR: Duration = Duration::from_secs(30 * 24 * 3600);

/// KEYS: the username's failure record (hash: `n` failures, `blocked` until, ms), the
/// network's known marker. ARGV: free, base ms, cap ms, forget ms.
/// Returns `{admitted, wait ms}`.
static ADMIT: LazyLock<Script> = LazyLock::new(|| Script::new(ADMIT_LUA));
const ADMIT_LUA: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then return {1, 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
local blocked = tonumber(redis.call('HGET', KEYS[1], 'blocked') or '0')
if blocked > now then return {0, blocked - now} end
local free = tonumber(ARGV[1])
if n >= free then
  local wait = math.min(tonumber(ARGV[2]) * 2 ^ math.min(n - free, 40), tonumber(ARGV[3]))
  redis.call('HSET', KEYS[1], 'blocked', string.format('%d', now + wait))
end
redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {1, 0}
";

/// KEYS: the failure record, the network's known marker. ARGV: forget ms. An attempt from an
/// unknown network was counted when it was admitted; one from a known network counts here.
static FAILED: LazyLock<Script> = LazyLock::new(|| Script::new(FAILED_LUA));
const FAILED_LUA: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'n', 1)
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return 1
";

/// KEYS: the failure record, the network's known marker. ARGV: known-for ms.
static SUCCEEDED: LazyLock<Script> = LazyLock::new(|| Script::new(SUCCEEDED_LUA));
const SUCCEEDED_LUA: &str = r"
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[1])
return 1
";

/// The per-username state of one instance while Redis is unavailable.
#[derive(Default)]
pub(crate) struct LoginLocal {
    /// Username key → (failures, blocked until), in the limiter's micros.
    failures: LocalTable<(u32, u64)>,
    /// `<username key> <network>` pairs that logged in.
    known: LocalTable<()>,
}

fn ms(d: Duration) -> u64 {
    d.as_millis().max(1) as u64
}

impl RateLimiter {
    fn login_keys(&self, user: &Username, net: &str) -> (String, String) {
        let tag = format!("login:{{{}}}", user.key());
        (
            self.key(&format!("{tag}:failures")),
            self.key(&format!("{tag}:known:{net}")),
        )
    }

    /// May `user` try a password from `net` now? Refused (with the wait as `retry_after`)
    /// while the username backs off and `net` is not one it logged in from.
    pub async fn login_admit(&self, user: &Username, net: &str, policy: LoginBackoff) -> Decision {
        let (failures, known) = self.login_keys(user, net);
        if let Some(redis) = self.shared() {
            let mut invocation = ADMIT.prepare_invoke();
            invocation
                .key(&failures)
                .key(&known)
                .arg(policy.free)
                .arg(ms(policy.base))
                .arg(ms(policy.cap))
                .arg(ms(policy.forget));
            match redis.invoke::<Vec<i64>>(&invocation).await {
                Ok(reply) if reply.len() == 2 => {
                    return verdict(reply[0] == 1, reply[1].max(0) as u64 * 1000, policy, false);
                }
                Ok(reply) => tracing::warn!(?reply, "unexpected login backoff reply"),
                Err(err) => {
                    tracing::warn!(error = %err, "Redis unavailable for login backoff; limiting locally")
                }
            }
            self.redis_failed();
        }
        let free = (policy.free as u64 / self.instances()).max(1) as u32;
        let now = self.micros();
        let mut local = self.login_local();
        if local.known.get(&known, now).is_some() {
            return verdict(true, 0, policy, true);
        }
        let (n, blocked) = local
            .failures
            .get(&failures, now)
            .copied()
            .unwrap_or((0, 0));
        if blocked > now {
            return verdict(false, blocked - now, policy, true);
        }
        let blocked = if n >= free {
            now + backoff(policy, n - free).as_micros() as u64
        } else {
            blocked
        };
        let expires = now + policy.forget.as_micros() as u64;
        local
            .failures
            .insert(&failures, expires, (n.saturating_add(1), blocked), now);
        verdict(true, 0, policy, true)
    }

    /// A wrong password (or no such user) for `user`.
    pub async fn login_failed(&self, user: &Username, net: &str, policy: LoginBackoff) {
        let (failures, known) = self.login_keys(user, net);
        if let Some(redis) = self.shared() {
            let mut invocation = FAILED.prepare_invoke();
            invocation.key(&failures).key(&known).arg(ms(policy.forget));
            match redis.invoke::<i64>(&invocation).await {
                Ok(_) => return,
                Err(err) => tracing::warn!(error = %err, "login failure not recorded in Redis"),
            }
            self.redis_failed();
        }
        let now = self.micros();
        let mut local = self.login_local();
        // Unknown networks were counted when admitted.
        if local.known.get(&known, now).is_none() {
            return;
        }
        let (n, blocked) = local
            .failures
            .get(&failures, now)
            .copied()
            .unwrap_or((0, 0));
        let expires = now + policy.forget.as_micros() as u64;
        local
            .failures
            .insert(&failures, expires, (n.saturating_add(1), blocked), now);
    }

    /// `user` logged in from `net`: its failures are forgotten and `net` becomes known.
    pub async fn login_succeeded(&self, user: &Username, net: &str) {
        let (failures, known) = self.login_keys(user, net);
        {
            let now = self.micros();
            let mut local = self.login_local();
            local.failures.remove(&failures);
            local
                .known
                .insert(&known, now + KNOWN_FOR.as_micros() as u64, (), now);
        }
        if let Some(redis) = self.shared() {
            let mut invocation = SUCCEEDED.prepare_invoke();
            invocation.key(&failures).key(&known).arg(ms(KNOWN_FOR));
            if let Err(err) = redis.invoke::<i64>(&invocation).await {
                tracing::warn!(error = %err, "login success not recorded in Redis");
                self.redis_failed();
            }
        }
    }
}

/// The wait after `extra` failures past the free ones: `base * 2^extra`, at most `cap`.
fn backoff(policy: LoginBackoff, extra: u32) -> Duration {
    policy
        .base
        .checked_mul(1u32.checked_shl(extra.min(31)).unwrap_or(u32::MAX))
        .unwrap_or(policy.cap)
        .min(policy.cap)
}

fn verdict(allowed: bool, wait_us: u64, policy: LoginBackoff, local: bool) -> Decision {
    let wait = Duration::from_micros(wait_us);
    Decision {
        allowed,
        limit: policy.free,
        remaining: 0,
        reset: wait,
        retry_after: wait,
        local,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ratelimit::tests::memory_cache;

    fn limiter() -> RateLimiter {
        RateLimiter::new(None, memory_cache(), "test:")
    }

    const POLICY: LoginBackoff = LoginBackoff {
        free: 3,
        base: Duration::from_secs(10),
        cap: Duration::from_secs(60),
        forget: Duration::from_secs(120),
    };

    #[tokio::test]
    async fn in_redis_the_wait_doubles_per_failure_is_shared_and_a_success_resets_it() {
        let server = cascade_testkit::RedisServer::start().await;
        let redis = crate::redis::Redis::for_test(server.url());
        let one = RateLimiter::new(Some(redis.clone()), memory_cache(), "test:");
        let two = RateLimiter::new(Some(redis.clone()), memory_cache(), "test:");
        let alice = Username::parse("alice").unwrap();
        one.login_succeeded(&alice, "192.0.2.1").await;
        for _ in 0..POLICY.free {
            assert!(
                one.login_admit(&alice, "198.51.100.9", POLICY)
                    .await
                    .allowed
            );
            two.login_failed(&alice, "198.51.100.9", POLICY).await;
        }
        let mut waits = Vec::new();
        for i in 0..5 {
            let admitted = one.login_admit(&alice, "203.0.113.5", POLICY).await;
            assert!(admitted.allowed && !admitted.local, "{i}: {admitted:?}");
            one.login_failed(&alice, "203.0.113.5", POLICY).await;
            // Another instance sees the same wait.
            let held = two.login_admit(&alice, "203.0.113.6", POLICY).await;
            assert!(!held.allowed && !held.local, "{i}: {held:?}");
            waits.push(held.retry_after.as_millis().div_ceil(1000));
            // The owner's network is never held back.
            assert!(two.login_admit(&alice, "192.0.2.1", POLICY).await.allowed);
            // Time passes: the wait is over.
            let cmd = redis::cmd("HSET")
                .arg("test:ratelimit:login:{alice}:failures")
                .arg("blocked")
                .arg(0)
                .clone();
            redis.query::<i64>(&cmd).await.unwrap();
        }
        assert_eq!(waits, vec![10, 20, 40, 60, 60]);
        two.login_succeeded(&alice, "192.0.2.1").await;
        for _ in 0..POLICY.free + 1 {
            assert!(one.login_admit(&alice, "203.0.113.6", POLICY).await.allowed);
        }
    }

    #[tokio::test]
    async fn concurrent_guesses_are_counted_when_admitted_not_when_their_hash_ends() {
        let limiter = limiter();
        let alice = Username::parse("alice").unwrap();
        // Guesses from many networks at once: none has failed yet (their hashes still run).
        let mut admitted = 0;
        for i in 0..10 {
            if limiter
                .login_admit(&alice, &format!("198.51.100.{i}"), POLICY)
                .await
                .allowed
            {
                admitted += 1;
            }
        }
        // The free ones, and the one that reserved the first wait.
        assert_eq!(admitted, POLICY.free + 1);
    }

    #[test]
    fn the_wait_doubles_per_failure_up_to_the_cap() {
        let waits: Vec<u64> = (0..6).map(|k| backoff(POLICY, k).as_secs()).collect();
        assert_eq!(waits, vec![10, 20, 40, 60, 60, 60]);
        assert_eq!(backoff(POLICY, u32::MAX), POLICY.cap);
    }

    #[tokio::test]
    async fn strangers_back_off_after_the_free_failures_while_the_owners_network_does_not() {
        let limiter = limiter();
        let alice = Username::parse("alice").unwrap();
        limiter.login_succeeded(&alice, "192.0.2.1").await;
        for _ in 0..POLICY.free {
            assert!(
                limiter
                    .login_admit(&alice, "198.51.100.9", POLICY)
                    .await
                    .allowed
            );
            limiter.login_failed(&alice, "198.51.100.9", POLICY).await;
        }
        // The next attempt is admitted and reserves the first wait; the one after waits.
        assert!(
            limiter
                .login_admit(&alice, "203.0.113.5", POLICY)
                .await
                .allowed
        );
        limiter.login_failed(&alice, "203.0.113.5", POLICY).await;
        let held = limiter.login_admit(&alice, "203.0.113.6", POLICY).await;
        assert!(!held.allowed);
        assert!((9..=10).contains(&held.retry_after.as_secs()), "{held:?}");
        // Another spelling of the name is the same account and the same ceiling.
        let shouted = Username::parse("ALICE").unwrap();
        assert!(
            !limiter
                .login_admit(&shouted, "203.0.113.7", POLICY)
                .await
                .allowed
        );
        // The owner's network is not held back, and a success resets the count.
        assert!(
            limiter
                .login_admit(&alice, "192.0.2.1", POLICY)
                .await
                .allowed
        );
        limiter.login_succeeded(&alice, "192.0.2.1").await;
        assert!(
            limiter
                .login_admit(&alice, "203.0.113.6", POLICY)
                .await
                .allowed
        );
        // Other usernames were never affected.
        let bob = Username::parse("bob").unwrap();
        assert!(
            limiter
                .login_admit(&bob, "203.0.113.6", POLICY)
                .await
                .allowed
        );
    }
}
