//! How a value is stored in the shared tier: a fixed header (kind, when stored, TTL, how long
//! its load took) before the payload, so any instance can tell a cached "not found" from a
//! value, how long either has left, and whether it is due for an early refresh.

use std::time::Duration;

const NEGATIVE: u8 = b'N';
const VALUE: u8 = b'V';
/// kind (1) + stored_at ms (8) + ttl ms (4) + load time ms (4).
const HEADER: usize = 17;

/// Wall-clock milliseconds: stored entries are compared across instances, so not `Instant`.
pub(super) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A stored entry: the value (or a cached not-found) with when it was stored, for how long,
/// and how long its load took (for early refresh).
pub(super) struct Stored<'a> {
    pub value: Option<&'a [u8]>,
    pub stored_at_ms: u64,
    pub ttl_ms: u32,
    pub delta_ms: u32,
}

impl Stored<'_> {
    pub fn expires_at_ms(&self) -> u64 {
        self.stored_at_ms + u64::from(self.ttl_ms)
    }

    /// Time left, by this host's clock.
    pub fn remaining(&self) -> Duration {
        Duration::from_millis(self.expires_at_ms().saturating_sub(now_ms()))
    }
}

/// Probabilistic early expiration ("XFetch", Vattani et al., VLDB 2015): refresh when
/// `now - delta·ln(rand) ≥ expiry`, so one caller, rarely early and more likely near the end,
/// reloads a hot key before it expires and nobody sees a miss.
pub(super) fn due_for_refresh(expires_at_ms: u64, delta_ms: u32) -> bool {
    let gap = -(f64::from(delta_ms.max(1))) * fastrand::f64().max(f64::MIN_POSITIVE).ln();
    now_ms() as f64 + gap >= expires_at_ms as f64
}

/// The stored form of `value` (`None`: a cached not-found), stamped now.
pub(super) fn encode(value: Option<&[u8]>, ttl: Duration, delta: Duration) -> Vec<u8> {
    let payload = value.unwrap_or_default();
    let mut out = Vec::with_capacity(payload.len() + HEADER);
    out.push(if value.is_some() { VALUE } else { NEGATIVE });
    out.extend_from_slice(&now_ms().to_be_bytes());
    out.extend_from_slice(&(ttl.as_millis().min(u128::from(u32::MAX)) as u32).to_be_bytes());
    out.extend_from_slice(&(delta.as_millis().min(u128::from(u32::MAX)) as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Reads what [`encode`] wrote; `None` for anything else (the caller reloads).
pub(super) fn decode(stored: &[u8]) -> Option<Stored<'_>> {
    if stored.len() < HEADER {
        return None;
    }
    let stored_at_ms = u64::from_be_bytes(stored[1..9].try_into().ok()?);
    let ttl_ms = u32::from_be_bytes(stored[9..13].try_into().ok()?);
    let delta_ms = u32::from_be_bytes(stored[13..17].try_into().ok()?);
    let value = match stored[0] {
        VALUE => Some(&stored[HEADER..]),
        NEGATIVE => None,
        _ => return None,
    };
    Some(Stored {
        value,
        stored_at_ms,
        ttl_ms,
        delta_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_and_a_not_found_survive_the_round_trip() {
        let ttl = Duration::from_secs(60);
        let delta = Duration::from_millis(7);
        let stored = encode(Some(b"{\"a\":1}"), ttl, delta);
        let entry = decode(&stored).expect("decodes");
        assert_eq!(entry.value, Some(&b"{\"a\":1}"[..]));
        assert_eq!((entry.ttl_ms, entry.delta_ms), (60_000, 7));
        assert!(entry.remaining() <= ttl && entry.remaining() > Duration::from_secs(59));

        let stored = encode(None, ttl, delta);
        assert_eq!(decode(&stored).expect("decodes").value, None);
    }

    #[test]
    fn anything_else_does_not_decode() {
        assert!(decode(b"V123").is_none());
        let mut stored = encode(Some(b"x"), Duration::from_secs(1), Duration::ZERO);
        stored[0] = b'?';
        assert!(decode(&stored).is_none());
    }
}
