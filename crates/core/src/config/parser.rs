//! The collector every configuration group parses with, the core's and the modules' alike, so
//! that all problems are reported at once, each naming its variable.

use std::str::FromStr;
use std::time::Duration;

use super::values::{Decimal6, Secret, parse_duration};
use super::{ConfigError, ConfigIssue};

pub(crate) const SECOND: Duration = Duration::from_secs(1);

/// Collects issues while parsing. Every method returns a usable value (the default when the
/// input is bad) so parsing goes on and reports the next problem too.
#[derive(Debug, Default)]
pub struct Parser {
    issues: Vec<ConfigIssue>,
}

impl Parser {
    pub fn new() -> Parser {
        Parser::default()
    }

    /// Records a problem with `var`.
    pub fn fail(&mut self, var: &'static str, message: impl Into<String>) {
        self.issues.push(ConfigIssue {
            var,
            message: message.into(),
        });
    }

    /// Appends `other`'s problems after this one's.
    pub fn absorb(&mut self, other: Parser) {
        self.issues.extend(other.issues);
    }

    /// `value` if nothing failed, else every problem found.
    pub fn finish<T>(self, value: T) -> Result<T, ConfigError> {
        if self.issues.is_empty() {
            Ok(value)
        } else {
            Err(ConfigError(self.issues))
        }
    }

    /// A duration where a bare number is seconds.
    pub fn duration(
        &mut self,
        var: &'static str,
        raw: &Option<String>,
        default: Duration,
    ) -> Duration {
        self.duration_in(var, raw, default, SECOND)
    }

    /// A duration where a bare number is in `unit`.
    pub fn duration_in(
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

    pub fn positive_duration(
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

    pub fn number<T: FromStr>(
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

    pub fn decimal(&mut self, var: &'static str, raw: &Option<String>, default: &str) -> Decimal6 {
        let text = raw.as_deref().unwrap_or(default);
        Decimal6::parse(text).unwrap_or_else(|msg| {
            self.fail(var, msg);
            Decimal6::parse(default).unwrap_or(Decimal6::ZERO)
        })
    }

    pub fn boolean(&mut self, var: &'static str, raw: &Option<String>, default: bool) -> bool {
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

    /// An http:// or https:// base URL, without its trailing slash.
    pub fn http_url(&mut self, var: &'static str, raw: &Option<String>, default: &str) -> String {
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

    /// A secret; empty counts as unset.
    pub fn secret(&mut self, raw: &Option<String>) -> Option<Secret> {
        raw.as_deref().filter(|s| !s.is_empty()).map(Secret::new)
    }

    pub fn non_empty(&mut self, var: &'static str, raw: &Option<String>, default: &str) -> String {
        let value = raw.as_deref().unwrap_or(default).trim();
        if value.is_empty() {
            self.fail(var, "must not be empty");
            return default.to_string();
        }
        value.to_string()
    }
}
