//! The catalog's input types, parsed at the edge: a value of one of these types is valid, and
//! every refusal names the field it is about.
//!
//! Bodies are read as JSON objects and taken apart field by field (rather than derived with
//! serde) so that a missing or mistyped field is a 400 naming that field, not a 422 with
//! serde's wording.

use serde_json::{Map, Value};

use crate::error::CatalogError;

/// Longest accepted identifier (version ids, producer ids), in bytes.
const MAX_ID_BYTES: usize = 256;
/// Longest accepted name, in bytes.
const MAX_NAME_BYTES: usize = 1_000;

/// An asset version's identifier: 1 to 256 bytes from [`ID_CHARACTERS`] (it travels in URLs,
/// cache keys and tags, and is shown to people: no white space, no control, bidirectional or
/// zero-width characters that would make two ids look alike).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VersionId(String);

impl VersionId {
    pub fn parse(field: &'static str, raw: &str) -> Result<VersionId, CatalogError> {
        parse_id(field, raw).map(VersionId)
    }

    /// [`parse`](Self::parse) of a string the caller owns (a path parameter), kept without a
    /// copy.
    pub fn parse_owned(field: &'static str, raw: String) -> Result<VersionId, CatalogError> {
        check_id(field, &raw)?;
        Ok(VersionId(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for VersionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A producer's identifier, with the same rules as [`VersionId`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerId(String);

impl ProducerId {
    pub fn parse(field: &'static str, raw: &str) -> Result<ProducerId, CatalogError> {
        parse_id(field, raw).map(ProducerId)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What an id may contain besides ASCII letters and digits (README, "Catalog"). ASCII only:
/// every character of an id is visible and means what it looks like.
pub const ID_PUNCTUATION: &str = "-_.:@/+=~";
/// The documented character set, for messages.
pub const ID_CHARACTERS: &str = "ASCII letters, digits and - _ . : @ / + = ~";

fn parse_id(field: &'static str, raw: &str) -> Result<String, CatalogError> {
    check_id(field, raw)?;
    Ok(raw.to_string())
}

fn check_id(field: &'static str, raw: &str) -> Result<(), CatalogError> {
    if raw.is_empty() || raw.len() > MAX_ID_BYTES {
        return Err(CatalogError::bad_request(
            field,
            format!("{field}: expected 1 to {MAX_ID_BYTES} bytes"),
        ));
    }
    if !raw
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || ID_PUNCTUATION.contains(c))
    {
        return Err(CatalogError::bad_request(
            field,
            format!("{field}: may contain only {ID_CHARACTERS}"),
        ));
    }
    Ok(())
}

/// A non-empty display name of at most 1,000 bytes, trimmed, without control characters
/// (PostgreSQL's text cannot hold a NUL; the others have no place in a name either).
pub fn parse_name(field: &'static str, raw: &str) -> Result<String, CatalogError> {
    let name = raw.trim();
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(CatalogError::bad_request(
            field,
            format!("{field}: expected a non-empty string of at most {MAX_NAME_BYTES} bytes"),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(CatalogError::bad_request(
            field,
            format!("{field}: must not contain control characters"),
        ));
    }
    Ok(name.to_string())
}

/// Largest accepted asset metadata, serialised as compact JSON. A listing page holds up to 100
/// assets; without a cap one page could be a hundred times the body limit.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

/// Asset metadata: a JSON object of at most [`MAX_METADATA_BYTES`] that PostgreSQL's `jsonb`
/// can store (no NUL anywhere in it).
pub fn parse_metadata(field: &'static str, value: &Value) -> Result<Value, CatalogError> {
    refuse_nul(field, value)?;
    let size = serde_json::to_vec(value)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > MAX_METADATA_BYTES {
        return Err(CatalogError::bad_request(
            field,
            format!("{field}: at most {MAX_METADATA_BYTES} bytes of JSON, got {size}"),
        ));
    }
    Ok(value.clone())
}

/// Refuses a NUL character in any key or string of `value` (PostgreSQL's `jsonb` and `text`
/// cannot hold one and would fail the whole statement): a 400 naming `field`, whose message
/// says where inside it is (`metadata.a[2].b`).
pub fn refuse_nul(field: &'static str, value: &Value) -> Result<(), CatalogError> {
    match nul_path(value) {
        None => Ok(()),
        Some(path) => Err(CatalogError::bad_request(
            field,
            format!(
                "{}: must not contain a NUL character (\\u0000)",
                join(field, &path)
            ),
        )),
    }
}

/// Where the first NUL of `value` is: `""` for `value` itself, `a[2].b` inside it.
pub fn nul_path(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => s.contains('\0').then(String::new),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| nul_path(item).map(|inner| join(&format!("[{i}]"), &inner))),
        Value::Object(map) => map.iter().find_map(|(key, item)| {
            if key.contains('\0') {
                return Some(key.replace('\0', "\\u0000"));
            }
            nul_path(item).map(|inner| join(key, &inner))
        }),
        _ => None,
    }
}

/// `outer` followed by the path `inner` inside it.
pub fn join(outer: &str, inner: &str) -> String {
    match inner.as_bytes().first() {
        None => outer.to_string(),
        Some(b'[') => format!("{outer}{inner}"),
        Some(_) if outer.is_empty() => inner.to_string(),
        Some(_) => format!("{outer}.{inner}"),
    }
}

/// An RFC 3339 date-time (`2025-01-31T12:00:00Z`, `…T12:00:00.123+02:00`), parsed to the
/// instant it names: microseconds since the Unix epoch, as PostgreSQL's `timestamptz` keeps
/// it. Every spelling of one instant is one value, whose text ([`Timestamp::as_str`]) is its
/// canonical UTC form (`2025-01-31T10:00:00.123000Z`): what cache keys hold and what
/// PostgreSQL receives. Values PostgreSQL would refuse (a 30th of February, an offset past
/// ±15:59, a year outside 0001–9999) are refused here, naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timestamp {
    micros: i64,
    text: String,
}

/// PostgreSQL refuses time zone offsets of 16 hours or more.
const MAX_OFFSET_HOURS: i64 = 15;

impl Timestamp {
    pub fn parse(field: &'static str, raw: &str) -> Result<Timestamp, CatalogError> {
        let micros = parse_rfc3339(raw).map_err(|problem| {
            CatalogError::bad_request(
                field,
                format!(
                    "{field}: expected an RFC 3339 date-time such as 2025-01-31T12:00:00Z ({problem})"
                ),
            )
        })?;
        Ok(Timestamp::from_micros(micros))
    }

    /// The instant `micros` µs after the epoch; `None` outside years 0001–9999.
    pub fn from_micros_checked(micros: i64) -> Option<Timestamp> {
        (MIN_MICROS..=MAX_MICROS)
            .contains(&micros)
            .then(|| Timestamp::from_micros(micros))
    }

    fn from_micros(micros: i64) -> Timestamp {
        let mut text = Vec::with_capacity(27);
        write_utc(&mut text, i128::from(micros));
        let text = String::from_utf8(text).unwrap_or_default();
        Timestamp { micros, text }
    }

    /// Microseconds since 1970-01-01T00:00:00Z.
    pub fn micros(&self) -> i64 {
        self.micros
    }

    /// The canonical UTC text.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

/// Appends the instant `micros` µs after the epoch as PostgreSQL's
/// `to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')` prints it (the catalog's
/// time format, canonical within years 0001–9999): at least four digits of year, a year before
/// 0001 as `to_char`'s `YYYY` gives it (1 BC is `0001`: the era is not printed), and always six
/// of fraction. `micros` is wider than an `i64` only so that PostgreSQL's µs since 2000 can be
/// moved to 1970 without overflow: callers pass an `i64` plus at most that shift.
pub(crate) fn write_utc(out: &mut Vec<u8>, micros: i128) {
    debug_assert!(micros.unsigned_abs() < 1 << 64, "{micros} µs");
    let seconds = micros.div_euclid(1_000_000);
    // Below 10^6 and 86,400; the days of such µs (under 2.2 · 10^8) fit an i64 many times.
    let fraction = micros.rem_euclid(1_000_000) as i64;
    let second_of_day = seconds.rem_euclid(86_400) as i64;
    let (y, m, d) = civil_from_days(seconds.div_euclid(86_400) as i64);
    let year = if y > 0 { y } else { 1 - y };
    let (hour, minute, second) = (
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60,
    );
    digits(out, year, year.max(1).ilog10().max(3) + 1);
    for (separator, value, width) in [
        (b'-', m, 2),
        (b'-', d, 2),
        (b'T', hour, 2),
        (b':', minute, 2),
        (b':', second, 2),
        (b'.', fraction, 6),
    ] {
        out.push(separator);
        digits(out, value, width);
    }
    out.push(b'Z');
}

/// `value` (0 ≤ value < 10^width) in exactly `width` decimal digits.
fn digits(out: &mut Vec<u8>, value: i64, width: u32) {
    let mut place = 10_i64.pow(width - 1);
    while place > 0 {
        out.push(b'0' + (value / place % 10) as u8);
        place /= 10;
    }
}

/// 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999999Z in µs since the epoch.
const MIN_MICROS: i64 = -62_135_596_800_000_000;
const MAX_MICROS: i64 = 253_402_300_799_999_999;

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// `s` as µs since the epoch, or what is wrong with it.
fn parse_rfc3339(s: &str) -> Result<i64, &'static str> {
    let b = s.as_bytes();
    let number = |r: std::ops::Range<usize>| -> Option<i64> {
        let d = b.get(r.clone())?;
        (d.len() == r.len() && d.iter().all(u8::is_ascii_digit))
            .then(|| d.iter().fold(0, |n, c| n * 10 + i64::from(c - b'0')))
    };
    let shape = "not of the form YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)";
    let separators = b.get(4) == Some(&b'-')
        && b.get(7) == Some(&b'-')
        && matches!(b.get(10), Some(b'T' | b't' | b' '))
        && b.get(13) == Some(&b':')
        && b.get(16) == Some(&b':');
    let (Some(y), Some(mo), Some(d), Some(h), Some(mi), Some(sec), true) = (
        number(0..4),
        number(5..7),
        number(8..10),
        number(11..13),
        number(14..16),
        number(17..19),
        separators,
    ) else {
        return Err(shape);
    };
    if !(y >= 1 && (1..=12).contains(&mo) && d >= 1 && d <= days_in_month(y, mo)) {
        return Err("no such date");
    }
    if !(h < 24 && mi < 60 && sec <= 60) {
        return Err("no such time of day");
    }
    let mut rest = &s[19..];
    let mut micros = 0;
    if let Some(fraction) = rest.strip_prefix('.') {
        let n = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return Err(shape);
        }
        // Microseconds, rounded as PostgreSQL rounds finer fractions.
        let digits = fraction.as_bytes();
        for &digit in digits[..n.min(6)].iter() {
            micros = micros * 10 + i64::from(digit - b'0');
        }
        micros *= 10_i64.pow(6 - n.min(6) as u32);
        if n > 6 && digits[6] >= b'5' {
            micros += 1;
        }
        rest = &fraction[n..];
    }
    let offset_seconds = match rest {
        "Z" | "z" => 0,
        offset => {
            let o = offset.as_bytes();
            let field = |r: std::ops::Range<usize>| {
                o.get(r.clone())
                    .filter(|d| d.len() == r.len() && d.iter().all(u8::is_ascii_digit))
                    .map(|d| d.iter().fold(0, |n, c| n * 10 + i64::from(c - b'0')))
            };
            let (Some(oh), Some(om)) = (field(1..3), field(4..6)) else {
                return Err(shape);
            };
            let sign = match o.first() {
                Some(b'+') => 1,
                Some(b'-') => -1,
                _ => return Err(shape),
            };
            if o.len() != 6 || o[3] != b':' {
                return Err(shape);
            }
            if oh > MAX_OFFSET_HOURS || om > 59 {
                return Err("the offset must be within ±15:59");
            }
            sign * (oh * 3600 + om * 60)
        }
    };
    let seconds = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec - offset_seconds;
    let total = seconds * 1_000_000 + micros;
    if !(MIN_MICROS..=MAX_MICROS).contains(&total) {
        return Err("outside the years 0001 to 9999 in UTC");
    }
    Ok(total)
}

/// A JSON request body that must be an object, read field by field.
pub struct Body(Map<String, Value>);

impl Body {
    /// `value` (a JSON body, its content type already checked by the extractor) as an object.
    pub fn from_value(value: Value) -> Result<Body, CatalogError> {
        match value {
            Value::Object(map) => Ok(Body(map)),
            _ => Err(CatalogError::BadRequest {
                field: None,
                message: "the body must be a JSON object".into(),
            }),
        }
    }

    #[cfg(test)]
    fn parse(bytes: &[u8]) -> Result<Body, CatalogError> {
        Body::from_value(
            serde_json::from_slice(bytes).map_err(|err| CatalogError::BadRequest {
                field: None,
                message: format!("the body is not valid JSON: {err}"),
            })?,
        )
    }

    pub fn value(&self) -> Value {
        Value::Object(self.0.clone())
    }

    /// A string field that must be present.
    pub fn string(&self, field: &'static str) -> Result<&str, CatalogError> {
        self.opt_string(field)?.ok_or_else(|| {
            CatalogError::bad_request(field, format!("{field}: required string is missing"))
        })
    }

    /// A string field that may be absent or null.
    pub fn opt_string(&self, field: &'static str) -> Result<Option<&str>, CatalogError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(CatalogError::bad_request(
                field,
                format!("{field}: expected a string"),
            )),
        }
    }

    /// An object field that may be absent or null.
    pub fn opt_object(&self, field: &'static str) -> Result<Option<&Value>, CatalogError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v @ Value::Object(_)) => Ok(Some(v)),
            Some(_) => Err(CatalogError::bad_request(
                field,
                format!("{field}: expected a JSON object"),
            )),
        }
    }

    /// A non-negative integer field that must be present.
    pub fn non_negative(&self, field: &'static str) -> Result<i64, CatalogError> {
        // JSON has one number type: 150.0 is the integer 150 (JSON Schema agrees), 150.5 is not.
        let integer = |n: &serde_json::Number| {
            n.as_i64().or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && (0.0..9.0e15).contains(f))
                    .map(|f| f as i64)
            })
        };
        match self.0.get(field) {
            Some(Value::Number(n)) if integer(n).is_some_and(|n| n >= 0) => {
                Ok(integer(n).unwrap_or_default())
            }
            None | Some(Value::Null) => Err(CatalogError::bad_request(
                field,
                format!("{field}: required integer is missing"),
            )),
            Some(_) => Err(CatalogError::bad_request(
                field,
                format!("{field}: expected a non-negative integer"),
            )),
        }
    }

    pub fn opt_timestamp(&self, field: &'static str) -> Result<Option<Timestamp>, CatalogError> {
        self.opt_string(field)?
            .map(|s| Timestamp::parse(field, s))
            .transpose()
    }
}

/// `POST /producers`.
pub struct NewProducer {
    pub producer_id: ProducerId,
    pub name: String,
}

impl NewProducer {
    pub fn parse(body: &Body) -> Result<Self, CatalogError> {
        Ok(NewProducer {
            producer_id: ProducerId::parse("producerId", body.string("producerId")?)?,
            name: parse_name("name", body.string("name")?)?,
        })
    }
}

/// `POST /assets`.
pub struct NewAsset {
    pub version_id: VersionId,
    pub producer_id: ProducerId,
    pub name: String,
    pub metadata: Value,
}

impl NewAsset {
    pub fn parse(body: &Body) -> Result<Self, CatalogError> {
        Ok(NewAsset {
            version_id: VersionId::parse("versionId", body.string("versionId")?)?,
            producer_id: ProducerId::parse("producerId", body.string("producerId")?)?,
            name: parse_name("name", body.string("name")?)?,
            metadata: body
                .opt_object("metadata")?
                .map(|m| parse_metadata("metadata", m))
                .transpose()?
                .unwrap_or_else(|| Value::Object(Map::new())),
        })
    }
}

/// `PATCH /listings/:versionId`: a new name, new metadata (replacing the old), or both.
pub struct AssetChange {
    pub name: Option<String>,
    pub metadata: Option<Value>,
}

impl AssetChange {
    pub fn parse(body: &Body) -> Result<Self, CatalogError> {
        let change = AssetChange {
            name: body
                .opt_string("name")?
                .map(|n| parse_name("name", n))
                .transpose()?,
            metadata: body
                .opt_object("metadata")?
                .map(|m| parse_metadata("metadata", m))
                .transpose()?,
        };
        if change.name.is_none() && change.metadata.is_none() {
            return Err(CatalogError::BadRequest {
                field: None,
                message: "nothing to change: give name and/or metadata".into(),
            });
        }
        Ok(change)
    }
}

/// `POST /policies`.
pub struct NewPolicy {
    pub version_id: VersionId,
    pub document: Value,
    pub expires_at: Option<Timestamp>,
}

impl NewPolicy {
    pub fn parse(body: &Body) -> Result<Self, CatalogError> {
        Ok(NewPolicy {
            version_id: VersionId::parse("versionId", body.string("versionId")?)?,
            document: body
                .opt_object("document")?
                .map(|d| refuse_nul("document", d).map(|()| d.clone()))
                .transpose()?
                .ok_or_else(|| {
                    CatalogError::bad_request(
                        "document",
                        "document: required JSON object is missing",
                    )
                })?,
            expires_at: body.opt_timestamp("expiresAt")?,
        })
    }
}

/// `POST /receipts`.
pub struct NewReceipt {
    pub version_id: VersionId,
    pub payer: String,
    pub amount: i64,
    pub expires_at: Option<Timestamp>,
}

impl NewReceipt {
    pub fn parse(body: &Body) -> Result<Self, CatalogError> {
        Ok(NewReceipt {
            version_id: VersionId::parse("versionId", body.string("versionId")?)?,
            payer: parse_name("payer", body.string("payer")?)?,
            amount: body.non_negative("amount")?,
            expires_at: body.opt_timestamp("expiresAt")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_integer_valued_number_is_an_integer_and_a_fraction_is_not() {
        let body =
            Body::parse(br#"{"a": 150, "b": 150.0, "c": 150.5, "d": -1, "e": 1e300}"#).unwrap();
        assert_eq!(body.non_negative("a").unwrap(), 150);
        assert_eq!(body.non_negative("b").unwrap(), 150);
        for field in ["c", "d", "e"] {
            assert!(body.non_negative(field).is_err(), "{field}");
        }
    }

    fn canonical(raw: &str) -> Option<String> {
        Timestamp::parse("t", raw)
            .ok()
            .map(|t| t.as_str().to_string())
    }

    #[test]
    fn rfc3339_accepts_common_forms_and_refuses_others() {
        for (ok, utc) in [
            ("2025-01-31T12:00:00Z", "2025-01-31T12:00:00.000000Z"),
            ("2025-01-31T12:00:00.123456Z", "2025-01-31T12:00:00.123456Z"),
            ("2025-01-31T12:00:00.5z", "2025-01-31T12:00:00.500000Z"),
            (
                "2025-01-31T12:00:00.12345678Z",
                "2025-01-31T12:00:00.123457Z",
            ),
            ("2025-01-31T12:00:00+02:00", "2025-01-31T10:00:00.000000Z"),
            ("2025-01-31 12:00:00-05:30", "2025-01-31T17:30:00.000000Z"),
            ("2024-02-29T23:59:60Z", "2024-03-01T00:00:00.000000Z"),
            ("1969-12-31T23:59:59.999999Z", "1969-12-31T23:59:59.999999Z"),
            ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00.000000Z"),
            ("9999-12-31T23:59:59.999999Z", "9999-12-31T23:59:59.999999Z"),
            ("2025-01-31T12:00:00+15:59", "2025-01-30T20:01:00.000000Z"),
        ] {
            assert_eq!(canonical(ok).as_deref(), Some(utc), "{ok}");
        }
        for bad in [
            "",
            "2025-01-31",
            "2025-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2025-01-31T12:00:00",
            "2025-01-31T12:00:00.Z",
            "yesterday",
            "2025-01-31T12:00:00+0200",
            "2025-01-31T12:00:00+16:00",
            "2025-01-31T12:00:00-16:00",
            "2025-01-31T12:00:00+02:60",
            "0000-01-01T00:00:00Z",
            "0001-01-01T00:00:00+01:00",
            "9999-12-31T23:59:59-01:00",
            "2025-01-31T12:00:00Z\0",
        ] {
            assert_eq!(canonical(bad), None, "{bad}");
        }
    }

    #[test]
    fn every_spelling_of_an_instant_is_one_value() {
        let spellings = [
            "2025-01-31T12:00:00Z",
            "2025-01-31t12:00:00.000000z",
            "2025-01-31T14:00:00+02:00",
            "2025-01-31 07:30:00.0-04:30",
        ];
        let values: Vec<_> = spellings
            .iter()
            .map(|s| Timestamp::parse("t", s).unwrap())
            .collect();
        assert!(values.windows(2).all(|w| w[0] == w[1]), "{values:?}");
        assert_eq!(values[0].micros(), 1_738_324_800_000_000);
        assert_eq!(
            Timestamp::from_micros_checked(values[0].micros()),
            Some(values[0].clone())
        );
    }

    #[test]
    fn metadata_is_capped_and_nul_is_refused_wherever_it_is() {
        let big = serde_json::json!({"d": "x".repeat(MAX_METADATA_BYTES)});
        assert!(parse_metadata("metadata", &big).is_err());
        let fits = serde_json::json!({"d": "x".repeat(MAX_METADATA_BYTES - 8)});
        assert!(parse_metadata("metadata", &fits).is_ok());
        for (value, path) in [
            (serde_json::json!({"a": "x\u{0}"}), "a"),
            (
                serde_json::json!({"a": [1, {"b\u{0}": 2}]}),
                "a[1].b\\u0000",
            ),
            (serde_json::json!({"a": {"b": ["ok", "\u{0}"]}}), "a.b[1]"),
        ] {
            assert_eq!(nul_path(&value).as_deref(), Some(path));
            assert!(parse_metadata("metadata", &value).is_err());
        }
        assert_eq!(nul_path(&serde_json::json!({"a": ["b", {"c": 1}]})), None);
    }

    #[test]
    fn ids_refuse_empty_long_and_white_space() {
        assert!(VersionId::parse("versionId", "ds-1@v2").is_ok());
        assert_eq!(
            VersionId::parse_owned("versionId", "ds-1@v2".into()).unwrap(),
            VersionId::parse("versionId", "ds-1@v2").unwrap()
        );
        assert!(VersionId::parse_owned("versionId", "a b".into()).is_err());
        assert!(VersionId::parse("versionId", "").is_err());
        assert!(VersionId::parse("versionId", "a b").is_err());
        assert!(VersionId::parse("versionId", &"x".repeat(257)).is_err());
        assert!(VersionId::parse("versionId", "s3://lake/raw.csv:v=2+b~c_d").is_ok());
        for spoof in ["a\u{202e}b", "a\u{200b}b", "é", "a\0", "a?b", "a%b", "a#b"] {
            assert!(VersionId::parse("versionId", spoof).is_err(), "{spoof:?}");
        }
    }

    #[test]
    fn a_change_needs_something_to_change() {
        let body = Body::parse(br#"{}"#).unwrap();
        assert!(AssetChange::parse(&body).is_err());
        let body = Body::parse(br#"{"metadata": 3}"#).unwrap();
        assert!(AssetChange::parse(&body).is_err());
        let body = Body::parse(br#"{"name": "x"}"#).unwrap();
        assert!(AssetChange::parse(&body).is_ok());
    }
}
