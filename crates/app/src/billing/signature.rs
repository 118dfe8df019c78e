//! Stripe's webhook signatures: `Stripe-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>…]`,
//! where each `v1` is HMAC-SHA256 over `{t}.{raw body}` with an endpoint secret.
//!
//! Checked on the raw bytes before anything parses them, against every configured secret
//! (several during a rotation), with a constant-time comparison (`Mac::verify_slice`), and
//! within [`TOLERANCE`] of our clock in both directions (the official libraries' 300 s): a
//! captured delivery cannot be replayed later, nor one forged with a future timestamp.

use cascade_core::config::Secret;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// How far the signed timestamp may be from our clock, either way, in seconds.
pub const TOLERANCE_SECS: i64 = 300;

/// Why a delivery is refused (all 400s; the reason is counted and logged, and said).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the Stripe-Signature header is missing")]
    Missing,
    #[error("the Stripe-Signature header is malformed (expected t=<seconds>,v1=<hex>)")]
    Malformed,
    #[error("the Stripe-Signature timestamp is more than 300 s from our clock")]
    OutsideTolerance,
    #[error("no Stripe-Signature v1 signature matches the body")]
    Mismatch,
}

impl SignatureError {
    /// The `reason` label of the refusal metric.
    pub fn reason(self) -> &'static str {
        match self {
            SignatureError::Missing => "missing_signature",
            SignatureError::Malformed => "malformed_signature",
            SignatureError::OutsideTolerance => "outside_tolerance",
            SignatureError::Mismatch => "bad_signature",
        }
    }
}

/// The parts of a header: its timestamp and every `v1` signature (other schemes, such as
/// Stripe's test-mode `v0`, are ignored, as the official libraries do).
fn parse_header(header: &str) -> Result<(i64, Vec<[u8; 32]>), SignatureError> {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        let (key, value) = part
            .trim()
            .split_once('=')
            .ok_or(SignatureError::Malformed)?;
        match key {
            "t" if timestamp.is_none() => {
                let t = value
                    .parse::<i64>()
                    .map_err(|_| SignatureError::Malformed)?;
                timestamp = Some(t);
            }
            "t" => return Err(SignatureError::Malformed),
            "v1" => signatures.push(decode_hex32(value).ok_or(SignatureError::Malformed)?),
            _ => {}
        }
    }
    match timestamp {
        Some(t) if !signatures.is_empty() => Ok((t, signatures)),
        _ => Err(SignatureError::Malformed),
    }
}

/// Verifies `payload` against `header` with any of `secrets` at `now` (Unix seconds); the
/// signed timestamp when it holds.
pub fn verify(
    header: Option<&[u8]>,
    payload: &[u8],
    secrets: &[Secret],
    now: i64,
) -> Result<i64, SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let header = std::str::from_utf8(header).map_err(|_| SignatureError::Malformed)?;
    let (timestamp, signatures) = parse_header(header)?;
    if now.abs_diff(timestamp) > TOLERANCE_SECS as u64 {
        return Err(SignatureError::OutsideTolerance);
    }
    for secret in secrets {
        let mac = signed_mac(secret.expose(), timestamp, payload);
        // Every candidate is compared in constant time; which one matched is not observable
        // beyond "one did".
        if signatures
            .iter()
            .any(|signature| mac.clone().verify_slice(signature).is_ok())
        {
            return Ok(timestamp);
        }
    }
    Err(SignatureError::Mismatch)
}

fn signed_mac(secret: &str, timestamp: i64, payload: &[u8]) -> Hmac<Sha256> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload);
    mac
}

/// A `Stripe-Signature` header value for `payload` signed with `secret` at `timestamp` (what
/// Stripe sends; for `cascade billing replay` and tests).
pub fn header_for(secret: &str, timestamp: i64, payload: &[u8]) -> String {
    let digest = signed_mac(secret, timestamp, payload)
        .finalize()
        .into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("t={timestamp},v1={hex}")
}

fn decode_hex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in text.as_bytes().chunks(2).enumerate() {
        let pair = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000;

    fn secrets(list: &[&str]) -> Vec<Secret> {
        list.iter().map(|s| Secret::new(*s)).collect()
    }

    #[test]
    fn a_signature_made_with_any_configured_secret_holds() {
        let body = br#"{"id":"evt_1"}"#;
        let old = header_for("whsec_old", NOW, body);
        let new = header_for("whsec_new", NOW, body);
        let both = secrets(&["whsec_new", "whsec_old"]);
        assert_eq!(verify(Some(old.as_bytes()), body, &both, NOW), Ok(NOW));
        assert_eq!(verify(Some(new.as_bytes()), body, &both, NOW), Ok(NOW));
        // Stripe signs with both secrets during a rotation: one header, two v1.
        let two = format!("{new},v1={}", &old[old.find("v1=").unwrap() + 3..]);
        assert_eq!(
            verify(Some(two.as_bytes()), body, &secrets(&["whsec_old"]), NOW),
            Ok(NOW)
        );
    }

    #[test]
    fn refusals_say_why() {
        let body = br#"{"id":"evt_1"}"#;
        let only = secrets(&["whsec_a"]);
        let good = header_for("whsec_a", NOW, body);
        let check = |header: Option<&str>, body: &[u8], now: i64| {
            verify(header.map(str::as_bytes), body, &only, now)
        };
        assert_eq!(check(None, body, NOW), Err(SignatureError::Missing));
        for bad in ["", "t=1", "v1=00", "t=x,v1=00", "t=1,t=2,v1=00", "garbage"] {
            assert_eq!(
                check(Some(bad), body, NOW),
                Err(SignatureError::Malformed),
                "{bad}"
            );
        }
        assert_eq!(
            check(Some(&good), body, NOW + 301),
            Err(SignatureError::OutsideTolerance)
        );
        assert_eq!(
            check(Some(&good), body, NOW - 301),
            Err(SignatureError::OutsideTolerance)
        );
        assert_eq!(check(Some(&good), body, NOW + 300), Ok(NOW));
        assert_eq!(
            check(Some(&good), br#"{"id":"evt_2"}"#, NOW),
            Err(SignatureError::Mismatch)
        );
        let other = header_for("whsec_b", NOW, body);
        assert_eq!(
            check(Some(&other), body, NOW),
            Err(SignatureError::Mismatch)
        );
    }
}
