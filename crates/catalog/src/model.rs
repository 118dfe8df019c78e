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

/// An asset version's identifier: 1 to 256 bytes, no white space or control characters (it
/// travels in URLs, cache keys and tags).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VersionId(String);

impl VersionId {
    pub fn parse(field: &'static str, raw: &str) -> Result<VersionId, CatalogError> {
        parse_id(field, raw).map(VersionId)
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

fn parse_id(field: &'static str, raw: &str) -> Result<String, CatalogError> {
    if raw.is_empty() || raw.len() > MAX_ID_BYTES {
        return Err(CatalogError::bad_request(
            field,
            format!("{field}: expected 1 to {MAX_ID_BYTES} bytes"),
        ));
    }
    if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(CatalogError::bad_request(
            field,
            format!("{field}: must not contain white space or control characters"),
        ));
    }
    Ok(raw.to_string())
}

/// A non-empty display name of at most 1,000 bytes, trimmed.
pub fn parse_name(field: &'static str, raw: &str) -> Result<String, CatalogError> {
    let name = raw.trim();
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(CatalogError::bad_request(
            field,
            format!("{field}: expected a non-empty string of at most {MAX_NAME_BYTES} bytes"),
        ));
    }
    Ok(name.to_string())
}

/// An RFC 3339 date-time (`2025-01-31T12:00:00Z`, `…T12:00:00.123+02:00`), kept as text:
/// PostgreSQL does the arithmetic, this only guarantees it will accept the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timestamp(String);

impl Timestamp {
    pub fn parse(field: &'static str, raw: &str) -> Result<Timestamp, CatalogError> {
        if is_rfc3339(raw) {
            Ok(Timestamp(raw.to_string()))
        } else {
            Err(CatalogError::bad_request(
                field,
                format!("{field}: expected an RFC 3339 date-time such as 2025-01-31T12:00:00Z"),
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| {
        b.get(r.clone())
            .is_some_and(|d| d.len() == r.len() && d.iter().all(u8::is_ascii_digit))
    };
    let number = |r: std::ops::Range<usize>| -> u32 {
        s.get(r).and_then(|d| d.parse().ok()).unwrap_or(u32::MAX)
    };
    if !(digits(0..4)
        && b.get(4) == Some(&b'-')
        && digits(5..7)
        && b.get(7) == Some(&b'-')
        && digits(8..10)
        && matches!(b.get(10), Some(b'T' | b't' | b' '))
        && digits(11..13)
        && b.get(13) == Some(&b':')
        && digits(14..16)
        && b.get(16) == Some(&b':')
        && digits(17..19))
    {
        return false;
    }
    if !((1..=12).contains(&number(5..7))
        && (1..=31).contains(&number(8..10))
        && number(11..13) < 24
        && number(14..16) < 60
        && number(17..19) < 61)
    {
        return false;
    }
    let mut rest = &s[19..];
    if let Some(fraction) = rest.strip_prefix('.') {
        let n = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return false;
        }
        rest = &fraction[n..];
    }
    match rest {
        "Z" | "z" => true,
        offset => {
            let o = offset.as_bytes();
            o.len() == 6
                && matches!(o[0], b'+' | b'-')
                && o[1..3].iter().all(u8::is_ascii_digit)
                && o[3] == b':'
                && o[4..6].iter().all(u8::is_ascii_digit)
        }
    }
}

/// A JSON request body that must be an object, read field by field.
pub struct Body(Map<String, Value>);

impl Body {
    pub fn parse(bytes: &[u8]) -> Result<Body, CatalogError> {
        match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(map)) => Ok(Body(map)),
            Ok(_) => Err(CatalogError::BadRequest {
                field: None,
                message: "the body must be a JSON object".into(),
            }),
            Err(err) => Err(CatalogError::BadRequest {
                field: None,
                message: format!("the body is not valid JSON: {err}"),
            }),
        }
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
        match self.0.get(field) {
            Some(Value::Number(n)) if n.as_i64().is_some_and(|n| n >= 0) => {
                Ok(n.as_i64().unwrap_or_default())
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
                .cloned()
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
            metadata: body.opt_object("metadata")?.cloned(),
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
            document: body.opt_object("document")?.cloned().ok_or_else(|| {
                CatalogError::bad_request("document", "document: required JSON object is missing")
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
    fn rfc3339_accepts_common_forms_and_refuses_others() {
        for ok in [
            "2025-01-31T12:00:00Z",
            "2025-01-31T12:00:00.123456Z",
            "2025-01-31T12:00:00+02:00",
            "2025-01-31 12:00:00-05:30",
        ] {
            assert!(is_rfc3339(ok), "{ok}");
        }
        for bad in [
            "",
            "2025-01-31",
            "2025-13-01T00:00:00Z",
            "2025-01-31T12:00:00",
            "2025-01-31T12:00:00.Z",
            "yesterday",
            "2025-01-31T12:00:00+0200",
        ] {
            assert!(!is_rfc3339(bad), "{bad}");
        }
    }

    #[test]
    fn ids_refuse_empty_long_and_white_space() {
        assert!(VersionId::parse("versionId", "ds-1@v2").is_ok());
        assert!(VersionId::parse("versionId", "").is_err());
        assert!(VersionId::parse("versionId", "a b").is_err());
        assert!(VersionId::parse("versionId", &"x".repeat(257)).is_err());
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
