//! Small value types that configuration parses into: durations, exact decimals and secrets.
//!
//! Each parser returns a message that says what was expected; the caller prefixes it with the
//! variable's name, so every configuration error names both the variable and the fix.

use std::fmt;
use std::time::Duration;

/// A secret string (API key, JWT secret, password). Its `Debug` and `Display` never show the
/// value, so a config struct can be logged or printed without leaking it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The real value, for the one place that must use it (signing, an Authorization header).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Parses a duration. A bare number is read in `bare_unit` (the seeds give most intervals in
/// seconds, and `CACHE_TTLS_JSON` in milliseconds); a suffix `ms`, `s`, `m` or `h` overrides it.
pub fn parse_duration(raw: &str, bare_unit: Duration) -> Result<Duration, String> {
    let text = raw.trim();
    let expected = || {
        format!(
            "expected a non-negative duration such as 30, 250ms, 5s, 2m or 1h (a bare number is {}), got {raw:?}",
            if bare_unit == Duration::from_millis(1) {
                "milliseconds"
            } else {
                "seconds"
            }
        )
    };
    let (number, unit) = if let Some(n) = text.strip_suffix("ms") {
        (n, Duration::from_millis(1))
    } else if let Some(n) = text.strip_suffix('s') {
        (n, Duration::from_secs(1))
    } else if let Some(n) = text.strip_suffix('m') {
        (n, Duration::from_secs(60))
    } else if let Some(n) = text.strip_suffix('h') {
        (n, Duration::from_secs(3600))
    } else {
        (text, bare_unit)
    };
    let value: f64 = number.trim().parse().map_err(|_| expected())?;
    if !value.is_finite() || !(0.0..=1e9).contains(&value) {
        return Err(expected());
    }
    Ok(unit.mul_f64(value))
}

/// An exact non-negative decimal with up to six fractional digits, stored as millionths.
/// Money and rates are never floating point: `0.10` ducats-to-USD is `100_000` millionths.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Decimal6(i64);

impl Decimal6 {
    pub const SCALE: i64 = 1_000_000;
    pub const ZERO: Decimal6 = Decimal6(0);

    pub fn parse(raw: &str) -> Result<Self, String> {
        let expected = || {
            format!("expected a non-negative decimal number with at most 6 decimals, got {raw:?}")
        };
        let text = raw.trim();
        let (whole, frac) = match text.split_once('.') {
            Some((w, f)) => (w, f),
            None => (text, ""),
        };
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() && frac.is_empty()
            || !digits(whole)
            || !digits(frac)
            || frac.len() > 6
            || whole.len() > 12
        {
            return Err(expected());
        }
        let whole: i64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| expected())?
        };
        let mut frac_value: i64 = if frac.is_empty() {
            0
        } else {
            frac.parse().map_err(|_| expected())?
        };
        for _ in frac.len()..6 {
            frac_value *= 10;
        }
        Ok(Self(whole * Self::SCALE + frac_value))
    }

    /// The value in millionths.
    pub fn millionths(self) -> i64 {
        self.0
    }
}

impl fmt::Display for Decimal6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 / Self::SCALE;
        let frac = self.0 % Self::SCALE;
        if frac == 0 {
            write!(f, "{whole}")
        } else {
            let frac = format!("{frac:06}");
            write!(f, "{whole}.{}", frac.trim_end_matches('0'))
        }
    }
}

/// Replaces the password of a `scheme://user:password@host/...` URL, and the value of every
/// `password=` query parameter (libpq accepts one there), with `***`.
pub fn redact_url(url: &str) -> String {
    let url = redact_userinfo(url);
    let Some((head, query)) = url.split_once('?') else {
        return url;
    };
    let query = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&");
    format!("{head}?{query}")
}

fn redact_userinfo(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &authority[..at];
    let redacted_userinfo = match userinfo.split_once(':') {
        Some((user, _password)) => format!("{user}:***"),
        None if userinfo.is_empty() => String::new(),
        // `redis://secret@host` puts the password where the user would be.
        None if url.starts_with("redis") => "***".to_string(),
        None => userinfo.to_string(),
    };
    format!(
        "{}{}@{}",
        &url[..scheme_end + 3],
        redacted_userinfo,
        &rest[at + 1..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_the_bare_unit_or_a_suffix() {
        let s = Duration::from_secs(1);
        assert_eq!(parse_duration("30", s), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms", s), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m", s), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s", s), Ok(Duration::from_millis(1500)));
        assert_eq!(
            parse_duration("60000", Duration::from_millis(1)),
            Ok(Duration::from_secs(60))
        );
        assert!(parse_duration("soon", s).is_err());
        assert!(parse_duration("-1", s).is_err());
        assert!(parse_duration("", s).is_err());
    }

    #[test]
    fn decimals_are_exact() {
        assert_eq!(Decimal6::parse("0.10").unwrap().millionths(), 100_000);
        assert_eq!(Decimal6::parse("2.5").unwrap().millionths(), 2_500_000);
        assert_eq!(Decimal6::parse("100").unwrap().millionths(), 100_000_000);
        assert_eq!(Decimal6::parse("2.5").unwrap().to_string(), "2.5");
        assert!(Decimal6::parse("1e3").is_err());
        assert!(Decimal6::parse("-1").is_err());
        assert!(Decimal6::parse("0.1234567").is_err());
        assert!(Decimal6::parse(".").is_err());
    }

    #[test]
    fn urls_lose_their_passwords() {
        assert_eq!(
            redact_url("postgresql://cascade:hunter2@db:5432/cascade"),
            "postgresql://cascade:***@db:5432/cascade"
        );
        assert_eq!(
            redact_url("redis://:pw@localhost:6379/0"),
            "redis://:***@localhost:6379/0"
        );
        assert_eq!(redact_url("redis://pw@localhost"), "redis://***@localhost");
        assert_eq!(
            redact_url("redis://localhost:6379"),
            "redis://localhost:6379"
        );
        assert_eq!(
            redact_url("postgres://u:p@ss@h/db"),
            "postgres://u:***@h/db"
        );
    }

    #[test]
    fn password_query_parameters_lose_their_values() {
        assert_eq!(
            redact_url("postgresql://u@h/db?sslmode=require&password=hunter2&x=1"),
            "postgresql://u@h/db?sslmode=require&password=***&x=1"
        );
        assert_eq!(
            redact_url("postgresql://u:a@h/db?PASSWORD=b"),
            "postgresql://u:***@h/db?PASSWORD=***"
        );
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("super-secret-value");
        assert!(!format!("{s} {s:?}").contains("super"));
    }
}
