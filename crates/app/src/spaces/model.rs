//! Input parsed into types that cannot hold bad values: a consciousness [`Level`], a
//! [`SpaceId`], a [`NewSpace`], a [`NewSession`], a [`ListQuery`]. Each parse names the
//! offending field; nothing reaches PostgreSQL before it passed.

use cascade_core::config::Decimal6;
use cascade_core::identity::Username;
use serde::Deserialize;
use serde_json::Value;

use super::error::SpaceError;

/// A consciousness level or threshold: an exact decimal in [0, 1] with at most two decimals,
/// held as hundredths (PostgreSQL's `NUMERIC(3,2)`).
///
/// In JSON it is a string (`"0.75"`): a JSON number is a binary float to most clients, and
/// `0.1 + 0.2` is not `0.3` there. A number is refused with a message that says so, as is a
/// third decimal (`"0.755"`: rounding it would store what nobody sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Level(u8);

impl Level {
    pub const MAX_HUNDREDTHS: u8 = 100;

    /// From the JSON value of `field`.
    pub fn from_json(field: &'static str, value: &Value) -> Result<Level, SpaceError> {
        match value {
            Value::String(text) => Level::parse(field, text),
            Value::Number(_) => Err(SpaceError::invalid(
                field,
                "must be a decimal string such as \"0.75\", not a JSON number (exact values only)",
            )),
            _ => Err(SpaceError::invalid(
                field,
                "must be a decimal string from \"0\" to \"1\" with at most two decimals",
            )),
        }
    }

    /// `0`, `0.5`, `0.75`, `1`, `1.00`: digits, at most two decimals, from 0 to 1.
    pub fn parse(field: &'static str, text: &str) -> Result<Level, SpaceError> {
        let refused = || {
            SpaceError::invalid(
                field,
                format!(
                    "expected a decimal from 0 to 1 with at most two decimals (\"0.75\"), got {:?}",
                    truncated(text)
                ),
            )
        };
        let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
        if whole.len() != 1
            || frac.len() > 2
            || text.ends_with('.')
            || !whole
                .bytes()
                .chain(frac.bytes())
                .all(|b| b.is_ascii_digit())
        {
            return Err(refused());
        }
        let frac = frac.bytes().fold(0u32, |n, b| n * 10 + u32::from(b - b'0'))
            * if frac.len() == 1 { 10 } else { 1 };
        let hundredths = u32::from(whole.as_bytes()[0] - b'0') * 100 + frac;
        u8::try_from(hundredths)
            .ok()
            .filter(|h| *h <= Self::MAX_HUNDREDTHS)
            .map(Level)
            .ok_or_else(refused)
    }

    /// As read from PostgreSQL (`(level * 100)::int4`).
    pub fn from_hundredths(hundredths: i32) -> Option<Level> {
        u8::try_from(hundredths)
            .ok()
            .filter(|h| *h <= Self::MAX_HUNDREDTHS)
            .map(Level)
    }

    /// What PostgreSQL receives (`($n::int4::numeric / 100)`).
    pub fn hundredths(self) -> i32 {
        i32::from(self.0)
    }

    /// At least `threshold` (`VERIFICATION_THRESHOLD`, in millionths): compared exactly.
    pub fn reaches(self, threshold: Decimal6) -> bool {
        i64::from(self.0) * (Decimal6::SCALE / 100) >= threshold.millionths()
    }
}

/// Always two decimals: `"0.50"`, `"1.00"` (as PostgreSQL prints `NUMERIC(3,2)`).
impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{:02}", self.0 / 100, self.0 % 100)
    }
}

impl serde::Serialize for Level {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// At most the first 40 characters of some input, for a message.
fn truncated(text: &str) -> String {
    text.chars().take(40).collect()
}

/// A space's public id: a slug of 1 to 100 lower-case ASCII letters, digits and `-`, neither
/// starting nor ending with `-` (the database checks the same rule).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpaceId(String);

impl SpaceId {
    pub const MAX_LEN: usize = 100;

    pub fn parse(field: &'static str, raw: &str) -> Result<SpaceId, SpaceError> {
        let ok = (1..=Self::MAX_LEN).contains(&raw.len())
            && raw
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !raw.starts_with('-')
            && !raw.ends_with('-');
        if ok {
            Ok(SpaceId(raw.to_string()))
        } else {
            Err(SpaceError::invalid(
                field,
                format!(
                    "a space id is 1 to {} lower-case letters, digits and '-', not starting or \
                     ending with '-'; got {:?}",
                    Self::MAX_LEN,
                    truncated(raw)
                ),
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The body of `POST /spaces`, as received: strings and numbers are checked by type here,
/// values by [`NewSpace::parse`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewSpaceBody {
    pub space_id: String,
    pub title: String,
    #[serde(default)]
    pub description: Option<String>,
    /// A whole JSON number (`10` or `10.0`, as JSON Schema's `integer`; `10.5` and `"10"`
    /// are refused).
    #[serde(default)]
    pub max_participants: Option<Value>,
    #[serde(default)]
    pub consciousness_threshold: Option<Value>,
}

/// A space to create, every field valid.
#[derive(Debug, Clone)]
pub struct NewSpace {
    pub space_id: SpaceId,
    pub title: String,
    pub description: String,
    pub max_participants: i32,
    pub threshold: Level,
}

impl NewSpace {
    pub const MAX_TITLE_CHARS: usize = 255;
    pub const MAX_DESCRIPTION_CHARS: usize = 4000;
    pub const MAX_PARTICIPANTS: i64 = 1000;
    pub const DEFAULT_MAX_PARTICIPANTS: i32 = 10;
    /// Seed 000's default threshold.
    pub const DEFAULT_THRESHOLD: Level = Level(50);

    pub fn parse(body: NewSpaceBody) -> Result<NewSpace, SpaceError> {
        let space_id = SpaceId::parse("space_id", &body.space_id)?;
        let title = text("title", &body.title, Self::MAX_TITLE_CHARS, false)?;
        if title.trim().is_empty() {
            return Err(SpaceError::invalid("title", "must not be blank"));
        }
        let description = match &body.description {
            Some(d) => text("description", d, Self::MAX_DESCRIPTION_CHARS, true)?,
            None => String::new(),
        };
        let max_participants = match &body.max_participants {
            None | Some(Value::Null) => Self::DEFAULT_MAX_PARTICIPANTS,
            Some(n) => whole(n)
                .filter(|n| (1..=Self::MAX_PARTICIPANTS).contains(n))
                .map(|n| n as i32)
                .ok_or_else(|| {
                    SpaceError::invalid(
                        "max_participants",
                        format!(
                            "expected a whole JSON number from 1 to {}",
                            Self::MAX_PARTICIPANTS
                        ),
                    )
                })?,
        };
        let threshold = match &body.consciousness_threshold {
            None | Some(Value::Null) => Self::DEFAULT_THRESHOLD,
            Some(v) => Level::from_json("consciousness_threshold", v)?,
        };
        Ok(NewSpace {
            space_id,
            title,
            description,
            max_participants,
            threshold,
        })
    }
}

/// A JSON number with no fractional part (`10`, `10.0`), within `i64`.
fn whole(value: &Value) -> Option<i64> {
    let n = value.as_number()?;
    n.as_i64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() < 1e15)
            .map(|f| f as i64)
    })
}

/// `raw` if it has at most `max` characters and no control character (newlines and tabs
/// allowed where `multiline`).
fn text(field: &'static str, raw: &str, max: usize, multiline: bool) -> Result<String, SpaceError> {
    // Counting stops past the bound: a 10 MB title costs no more than a 256-character one.
    if raw.chars().take(max + 1).count() > max {
        return Err(SpaceError::invalid(
            field,
            format!("at most {max} characters"),
        ));
    }
    let allowed = |c: char| multiline && matches!(c, '\n' | '\r' | '\t');
    if raw.chars().any(|c| c.is_control() && !allowed(c)) {
        return Err(SpaceError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(raw.to_string())
}

/// The body of `POST /consciousness/sessions`, as received.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewSessionBody {
    #[serde(default)]
    pub space_id: Option<String>,
    pub consciousness_level: Value,
}

/// The body of `PATCH /consciousness/sessions/{id}`, as received.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LevelBody {
    pub consciousness_level: Value,
}

/// A session to start.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub space_id: Option<SpaceId>,
    pub level: Level,
}

impl NewSession {
    pub fn parse(body: &NewSessionBody) -> Result<NewSession, SpaceError> {
        Ok(NewSession {
            space_id: body
                .space_id
                .as_deref()
                .map(|s| SpaceId::parse("space_id", s))
                .transpose()?,
            level: Level::from_json("consciousness_level", &body.consciousness_level)?,
        })
    }
}

/// A session id in a path: a positive whole number (anything else names no session: 404,
/// as for an id nobody has).
pub fn session_id(raw: &str) -> Result<i32, SpaceError> {
    raw.parse::<i32>()
        .ok()
        .filter(|id| *id > 0 && !raw.starts_with('+'))
        .ok_or_else(|| SpaceError::NotFound(format!("no session {:?} of yours", truncated(raw))))
}

/// `GET /spaces` parameters, as received.
#[derive(Debug, Default, Deserialize)]
pub struct ListParams {
    pub active: Option<String>,
    pub creator: Option<String>,
    pub limit: Option<String>,
    pub cursor: Option<String>,
}

/// A validated `GET /spaces` query. Its canonical form is its cache key, so two spellings of
/// one query (`creator=Ana` and `creator=ana`, `limit=010`) share one entry.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ListQuery {
    pub active: Option<bool>,
    /// The creator's username, case-folded (`Username::key`).
    pub creator: Option<String>,
    pub limit: i64,
    /// The internal id of the last space of the previous page: the page holds older ones.
    pub cursor: Option<i64>,
}

impl ListQuery {
    pub const DEFAULT_LIMIT: i64 = 20;
    pub const MAX_LIMIT: i64 = 100;

    pub fn parse(raw: &ListParams) -> Result<ListQuery, SpaceError> {
        let active = match raw.active.as_deref() {
            None => None,
            Some("true") => Some(true),
            Some("false") => Some(false),
            Some(_) => return Err(SpaceError::invalid("active", "expected true or false")),
        };
        let creator = raw
            .creator
            .as_deref()
            .map(|c| {
                Username::parse(c)
                    .map(|u| u.key().to_string())
                    .map_err(|err| SpaceError::invalid("creator", err.to_string()))
            })
            .transpose()?;
        let limit = match raw.limit.as_deref() {
            None => Self::DEFAULT_LIMIT,
            Some(l) => l
                .parse::<i64>()
                .ok()
                .filter(|l| (1..=Self::MAX_LIMIT).contains(l))
                .ok_or_else(|| {
                    SpaceError::invalid(
                        "limit",
                        format!("expected a whole number from 1 to {}", Self::MAX_LIMIT),
                    )
                })?,
        };
        let cursor = raw.cursor.as_deref().map(parse_cursor).transpose()?;
        Ok(ListQuery {
            active,
            creator,
            limit,
            cursor,
        })
    }

    /// The cache key: the canonical form (JSON, so no two queries share a key).
    pub fn key(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A cursor as `GET /spaces` hands it out: a positive whole number in its one spelling (no
/// sign, no leading zero), at most 18 digits.
fn parse_cursor(raw: &str) -> Result<i64, SpaceError> {
    let canonical = (1..=18).contains(&raw.len())
        && raw.bytes().all(|b| b.is_ascii_digit())
        && !raw.starts_with('0');
    canonical
        .then(|| raw.parse::<i64>().ok())
        .flatten()
        .ok_or_else(|| SpaceError::invalid("cursor", "not a cursor returned by GET /spaces"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level(text: &str) -> Option<String> {
        Level::parse("l", text).ok().map(|l| l.to_string())
    }

    #[test]
    fn levels_are_exact_with_at_most_two_decimals_in_zero_to_one() {
        assert_eq!(level("0").as_deref(), Some("0.00"));
        assert_eq!(level("0.5").as_deref(), Some("0.50"));
        assert_eq!(level("0.75").as_deref(), Some("0.75"));
        assert_eq!(level("0.05").as_deref(), Some("0.05"));
        assert_eq!(level("1").as_deref(), Some("1.00"));
        assert_eq!(level("1.00").as_deref(), Some("1.00"));
        for bad in [
            "", ".", "0.", ".5", "1.01", "2", "0.755", "-0.1", "+0.1", "1e-1", "00.5", " 0.5",
            "0,5", "0.5 ", "NaN", "١",
        ] {
            assert_eq!(level(bad), None, "{bad:?}");
        }
        assert!(Level::from_json("l", &serde_json::json!(0.5)).is_err());
        assert!(Level::from_json("l", &serde_json::json!(null)).is_err());
    }

    #[test]
    fn participant_limits_are_whole_json_numbers() {
        assert_eq!(whole(&serde_json::json!(10)), Some(10));
        assert_eq!(whole(&serde_json::json!(742.0)), Some(742));
        assert_eq!(whole(&serde_json::json!(10.5)), None);
        assert_eq!(whole(&serde_json::json!("10")), None);
        assert_eq!(whole(&serde_json::json!(1e300)), None);
    }

    #[test]
    fn verification_compares_exactly() {
        let threshold = Decimal6::parse("0.8").unwrap();
        assert!(Level::parse("l", "0.8").unwrap().reaches(threshold));
        assert!(!Level::parse("l", "0.79").unwrap().reaches(threshold));
        let odd = Decimal6::parse("0.805").unwrap();
        assert!(!Level::parse("l", "0.80").unwrap().reaches(odd));
        assert!(Level::parse("l", "0.81").unwrap().reaches(odd));
    }

    #[test]
    fn space_ids_are_slugs() {
        for good in ["a", "salon-1", "9", &"x".repeat(100)] {
            assert!(SpaceId::parse("s", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a b",
            "é",
            &"x".repeat(101),
            "a\0",
        ] {
            assert!(SpaceId::parse("s", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn list_queries_have_one_canonical_key() {
        let parse = |active: &str, creator: &str, limit: &str| {
            ListQuery::parse(&ListParams {
                active: Some(active.into()),
                creator: Some(creator.into()),
                limit: Some(limit.into()),
                cursor: None,
            })
            .map(|q| q.key())
        };
        assert_eq!(
            parse("true", "Ana", "010").unwrap(),
            parse("true", "ana", "10").unwrap()
        );
        assert!(parse("yes", "ana", "10").is_err());
        assert!(parse("true", "a", "10").is_err());
        assert!(parse("true", "ana", "0").is_err());
        assert!(parse("true", "ana", "101").is_err());
        for bad in ["0", "-5", "+5", "05", "abc", "1234567890123456789", ""] {
            assert!(parse_cursor(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_cursor("99999999999").unwrap(), 99_999_999_999);
    }
}
